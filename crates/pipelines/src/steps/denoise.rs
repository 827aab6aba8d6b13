//! The denoising loop every family runs: classifier-free guidance (one batched model call for
//! the negative and positive halves), a learned variance carried through guidance, ControlNet
//! residuals, extra input channels (the 9-channel inpainting input, IF stage II's upscaled
//! image), the inpainting blend after each step, progress and cancellation between steps. The model is a [`Denoiser`]: a UNet with its conditioning, or the Kandinsky prior.

use crate::steps::components::{AddedConditioning, Components, Prior, PriorConditioning, Unet};
use crate::steps::controlnet::ControlNets;
use crate::steps::latents::{Blend, Prepared};
use crate::PipelineError;
use crate::{Progress, Result, StepObserver};
use autopipe_rng::Generator;
use autopipe_schedulers::Scheduler;
use tch::Tensor;

/// What conditions each UNet call, already CFG-batched (`[negative; positive]`) when guiding.
pub struct Conditioning<'a> {
    /// Text conditioning; `None` for a UNet that makes its own from `image_embeds`.
    pub encoder_hidden_states: Option<&'a Tensor>,
    pub added: Option<&'a AddedConditioning>,
    /// Kandinsky's `added_cond_kwargs["image_embeds"]`.
    pub image_embeds: Option<&'a Tensor>,
    /// Kandinsky 2.1's `added_cond_kwargs["text_embeds"]` (the pooled text embedding).
    pub text_embeds: Option<&'a Tensor>,
    /// `class_labels` (DeepFloyd IF stage II: the noise level of the upscaled image), batched
    /// like the model input.
    pub class_labels: Option<&'a Tensor>,
    /// `guidance_scale`; guidance runs when it is above 1.
    pub guidance_scale: f64,
    /// ControlNets whose residuals the UNet adds (ControlNet pipelines).
    pub controlnets: Option<&'a ControlNets>,
}

impl Conditioning<'_> {
    /// Whether classifier-free guidance runs.
    pub fn guide(&self) -> bool {
        self.guidance_scale > 1.0
    }
}

/// A model the loop denoises with: one (CFG-batched) prediction per timestep.
pub trait Denoiser {
    /// The model output for `model_input` at timestep `t`, step `step.index` of `step.total`.
    fn predict(&self, model_input: Tensor, t: f64, step: Step<'_>) -> Result<Tensor>;
}

/// Where the loop is when it asks a [`Denoiser`] for a prediction.
pub struct Step<'a> {
    /// The step's index, from 0.
    pub index: usize,
    /// The number of steps.
    pub total: usize,
    /// The scaled model input before the inpainting channels are added (what ControlNets see).
    pub latent_input: &'a Tensor,
    /// Whether the input is CFG-batched (`[negative; positive]`).
    pub guide: bool,
}

struct UnetDenoiser<'a> {
    components: &'a Components<'a>,
    unet: Unet<'a>,
    cond: &'a Conditioning<'a>,
}

impl Denoiser for UnetDenoiser<'_> {
    fn predict(&self, model_input: Tensor, t: f64, step: Step<'_>) -> Result<Tensor> {
        let residuals = match self.cond.controlnets {
            Some(nets) => {
                let embeds = self.cond.encoder_hidden_states.ok_or_else(|| {
                    PipelineError::Internal("ControlNets need encoder_hidden_states".into())
                })?;
                nets.residuals(
                    self.components,
                    step.index,
                    step.total,
                    step.latent_input,
                    t,
                    embeds,
                    self.cond.added,
                    step.guide,
                )?
            }
            None => None,
        };
        self.unet.forward(
            model_input,
            t,
            self.cond.encoder_hidden_states,
            self.cond.added,
            self.cond.image_embeds,
            self.cond.text_embeds,
            self.cond.class_labels,
            residuals.as_ref(),
        )
    }
}

/// The Kandinsky prior with its text conditioning.
pub struct PriorDenoiser<'a> {
    pub prior: &'a Prior<'a>,
    pub cond: &'a PriorConditioning,
}

impl Denoiser for PriorDenoiser<'_> {
    fn predict(&self, model_input: Tensor, t: f64, _step: Step<'_>) -> Result<Tensor> {
        self.prior.forward(model_input, t, self.cond)
    }
}

/// Runs `timesteps` from `prepared` with the UNet leased as `unet` (and the conditioning's
/// ControlNets); returns the denoised latents.
#[allow(clippy::too_many_arguments)]
pub fn denoise(
    components: &Components,
    unet: &str,
    cond: &Conditioning,
    prepared: &Prepared,
    timesteps: &[f64],
    scheduler: &mut dyn Scheduler,
    generator: &mut Generator,
    observer: &dyn StepObserver,
) -> Result<Tensor> {
    denoise_with(
        &UnetDenoiser {
            components,
            unet: components.unet(unet),
            cond,
        },
        cond.guidance_scale,
        prepared,
        timesteps,
        scheduler,
        generator,
        observer,
    )
}

/// Runs `timesteps` from `prepared` with any [`Denoiser`]; guidance runs when `guidance_scale`
/// is above 1 (the model's conditioning is then `[negative; positive]`).
pub fn denoise_with(
    model: &dyn Denoiser,
    guidance_scale: f64,
    prepared: &Prepared,
    timesteps: &[f64],
    scheduler: &mut dyn Scheduler,
    generator: &mut Generator,
    observer: &dyn StepObserver,
) -> Result<Tensor> {
    let guide = guidance_scale > 1.0;
    let mut latents = prepared.latents.shallow_clone();
    let channels = latents.size()[1];
    let total = timesteps.len() as u32;
    for (i, &t) in timesteps.iter().enumerate() {
        if let Some(stop) = observer.should_stop() {
            return Err(stop);
        }
        let model_input = if guide {
            Tensor::cat(&[&latents, &latents], 0)
        } else {
            latents.shallow_clone()
        };
        let latent_input = scheduler.scale_model_input(&model_input, t);
        let model_input = match &prepared.unet_extra {
            Some(extra) => Tensor::cat(&[&latent_input, extra], 1),
            None => latent_input.shallow_clone(),
        };
        let step = Step {
            index: i,
            total: timesteps.len(),
            latent_input: &latent_input,
            guide,
        };
        let mut noise_pred = model.predict(model_input, t, step)?;
        // A model that also predicts a variance (Kandinsky's decoders): guidance mixes the noise
        // half only and keeps the positive half's variance.
        let with_variance = latents.dim() == 4 && noise_pred.size()[1] == 2 * channels;
        if guide {
            if with_variance {
                let parts = noise_pred.split(channels, 1);
                let noise = parts[0].chunk(2, 0);
                let variance = parts[1].chunk(2, 0);
                let guided = &noise[0] + (&noise[1] - &noise[0]) * guidance_scale;
                noise_pred = Tensor::cat(&[&guided, &variance[1]], 1);
            } else {
                let chunks = noise_pred.chunk(2, 0);
                noise_pred = &chunks[0] + (&chunks[1] - &chunks[0]) * guidance_scale;
            }
        }
        if with_variance && !scheduler.takes_predicted_variance() {
            noise_pred = noise_pred.narrow(1, 0, channels);
        }
        let stepped = scheduler.step(&noise_pred, t, &latents, generator)?;
        latents = match &prepared.blend {
            None => stepped,
            Some(Blend::Renoised {
                image_latents,
                noise,
                mask,
            }) => {
                let proper = match timesteps.get(i + 1) {
                    Some(&next) => scheduler.add_noise(image_latents, noise, next),
                    None => image_latents.shallow_clone(),
                };
                (1.0 - mask) * proper + mask * &stepped
            }
            Some(Blend::KeepPrevious { mask }) => (1.0 - mask) * &latents + mask * &stepped,
        };
        observer.on_step(Progress {
            step: i as u32 + 1,
            total_steps: total,
            timestep: t,
        });
    }
    Ok(latents)
}
