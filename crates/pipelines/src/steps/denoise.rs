//! The denoising loop every UNet family runs: classifier-free guidance (one batched UNet call for
//! the negative and positive halves), ControlNet residuals, the 9-channel inpainting input, the
//! 4-channel inpainting blend after each step, progress and cancellation between steps.

use crate::steps::components::{AddedConditioning, Components};
use crate::steps::controlnet::ControlNets;
use crate::steps::latents::Prepared;
use crate::{Progress, Result, StepObserver};
use autopipe_rng::Generator;
use autopipe_schedulers::Scheduler;
use tch::Tensor;

/// What conditions each UNet call, already CFG-batched (`[negative; positive]`) when guiding.
pub struct Conditioning<'a> {
    pub encoder_hidden_states: &'a Tensor,
    pub added: Option<&'a AddedConditioning>,
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

/// Runs `timesteps` from `prepared` with the UNet leased as `unet`; returns the denoised latents.
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
    let guide = cond.guide();
    let unet = components.unet(unet);
    let mut latents = prepared.latents.shallow_clone();
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
        let model_input = scheduler.scale_model_input(&model_input, t);
        // ControlNets see the 4-channel latents, before the inpainting channels are added.
        let residuals = match cond.controlnets {
            Some(nets) => nets.residuals(
                components,
                i,
                timesteps.len(),
                &model_input,
                t,
                cond.encoder_hidden_states,
                cond.added,
                guide,
            )?,
            None => None,
        };
        let model_input = match &prepared.unet_extra {
            Some(extra) => Tensor::cat(&[&model_input, extra], 1),
            None => model_input,
        };
        let mut noise_pred = unet.forward(
            model_input,
            t,
            cond.encoder_hidden_states,
            cond.added,
            residuals.as_ref(),
        )?;
        if guide {
            let chunks = noise_pred.chunk(2, 0);
            noise_pred = &chunks[0] + (&chunks[1] - &chunks[0]) * cond.guidance_scale;
        }
        latents = scheduler.step(&noise_pred, t, &latents, generator)?;
        if let Some(blend) = &prepared.blend {
            let proper = match timesteps.get(i + 1) {
                Some(&next) => scheduler.add_noise(&blend.image_latents, &blend.noise, next),
                None => blend.image_latents.shallow_clone(),
            };
            latents = (1.0 - &blend.mask) * proper + &blend.mask * &latents;
        }
        observer.on_step(Progress {
            step: i as u32 + 1,
            total_steps: total,
            timestep: t,
        });
    }
    Ok(latents)
}
