//! ControlNet conditioning, the add-on the Stable Diffusion and SDXL ControlNet pipelines share
//! (diffusers 0.42.1 `pipelines/controlnet/pipeline_controlnet*.py`): the control images prepared
//! as `prepare_image` / `prepare_control_image` do, `controlnet_keep` from each net's guidance
//! window, and per denoising step the nets' residuals (summed, as `MultiControlNetModel` does),
//! guess mode running them on the conditional half of the CFG batch only.

use crate::steps::components::{AddedConditioning, Components, ControlNetCall, Residuals};
use crate::steps::image;
use crate::{as_python_float, GenerateParams, PipelineError, Result};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// A control image's size after preprocessing: the request's `width` / `height`, else its own
/// size rounded down to the VAE factor.
fn control_size(
    params: &GenerateParams,
    img: &::image::DynamicImage,
    vae_scale_factor: u32,
) -> (u32, u32) {
    let (w, h) = image::default_size(img, vae_scale_factor);
    (params.width.unwrap_or(w), params.height.unwrap_or(h))
}

/// The request's ControlNet fields, checked as diffusers' `check_inputs` does, and every control
/// image's preprocessed size against the output `size` (width, height).
pub fn validate(params: &GenerateParams, size: (u32, u32), vae_scale_factor: u32) -> Result<()> {
    if params.controlnets.is_empty() {
        return Err(PipelineError::invalid(
            "controlnet",
            "is required: this pipeline runs with at least one ControlNet",
        ));
    }
    for net in &params.controlnets {
        let start = net.guidance_start.map(as_python_float).unwrap_or(0.0);
        let end = net.guidance_end.map(as_python_float).unwrap_or(1.0);
        if start >= end {
            return Err(PipelineError::invalid(
                "control_guidance_start",
                format!("control guidance start: {start} cannot be larger or equal to control guidance end: {end}."),
            ));
        }
        if start < 0.0 {
            return Err(PipelineError::invalid(
                "control_guidance_start",
                format!("control guidance start: {start} can't be smaller than 0."),
            ));
        }
        if end > 1.0 {
            return Err(PipelineError::invalid(
                "control_guidance_end",
                format!("control guidance end: {end} can't be larger than 1.0."),
            ));
        }
        let (w, h) = control_size(params, &net.image, vae_scale_factor);
        if (w, h) != size {
            return Err(PipelineError::invalid(
                "control_image",
                format!(
                    "a control image is {w}x{h} after preprocessing but the output is {}x{}: \
                     give control images of the output size (or width and height)",
                    size.0, size.1
                ),
            ));
        }
    }
    Ok(())
}

/// The control image's size when the request gives no `width` / `height`: its own size, rounded
/// down to the VAE factor (`get_default_height_width`). Text-to-image takes its output size from the
/// first control image.
pub fn default_size(params: &GenerateParams, vae_scale_factor: u32) -> Option<(u32, u32)> {
    params
        .controlnets
        .first()
        .map(|net| image::default_size(&net.image, vae_scale_factor))
}

struct Net {
    /// The lease component.
    component: String,
    /// Preprocessed, repeated per image, CFG-doubled unless in guess mode.
    image: Tensor,
    scale: f64,
    start: f64,
    end: f64,
}

/// The request's ControlNets, ready for the denoising loop.
pub struct ControlNets {
    nets: Vec<Net>,
    guess_mode: bool,
}

impl ControlNets {
    /// Prepares the control images for an output of `size` (width, height) (each is resized to
    /// the request's `width` / `height` or kept at its own size, which [`validate`] checks is the
    /// output's). `default_scale` is the pipeline's `controlnet_conditioning_scale` default.
    pub fn prepare(
        params: &GenerateParams,
        size: (u32, u32),
        vae_scale_factor: u32,
        num_images: i64,
        guide: bool,
        default_scale: f64,
        device: Device,
    ) -> Result<Self> {
        validate(params, size, vae_scale_factor)?;
        // `guess_mode or controlnet(.nets[0]).config.global_pool_conditions`.
        let first = &params.controlnets[0];
        let config = std::fs::read_to_string(first.path.join("config.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .ok_or_else(|| {
                PipelineError::invalid(
                    "controlnet",
                    format!("{}: no readable config.json", first.path.display()),
                )
            })?;
        let global_pool = config
            .get("global_pool_conditions")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let guess_mode = params.guess_mode || global_pool;
        let components = params.controlnet_components();
        let mut nets = Vec::with_capacity(params.controlnets.len());
        for net in &params.controlnets {
            let (w, h) = size;
            let mut img = image::preprocess_control(&net.image, w, h)
                .repeat_interleave_self_int(num_images, 0, None::<i64>)
                .to_device(device);
            if guide && !guess_mode {
                img = Tensor::cat(&[&img, &img], 0);
            }
            let component = components
                .iter()
                .find(|(_, path)| *path == net.path.as_path())
                .map(|(name, _)| name.clone())
                .ok_or_else(|| PipelineError::Internal("controlnet component missing".into()))?;
            nets.push(Net {
                component,
                image: img.to_kind(Kind::Float),
                scale: net
                    .conditioning_scale
                    .map(as_python_float)
                    .unwrap_or(default_scale),
                start: net.guidance_start.map(as_python_float).unwrap_or(0.0),
                end: net.guidance_end.map(as_python_float).unwrap_or(1.0),
            });
        }
        Ok(Self { nets, guess_mode })
    }

    /// The summed residuals of step `step` of `total` for the scaled UNet input `model_input`
    /// (CFG-batched when `guide`); `None` when every net is outside its guidance window (its
    /// residuals would all be zero).
    #[allow(clippy::too_many_arguments)]
    pub fn residuals(
        &self,
        components: &Components,
        step: usize,
        total: usize,
        model_input: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditioning>,
        guide: bool,
    ) -> Result<Option<Residuals>> {
        // Guess mode with CFG: the nets see only the conditional half.
        let conditional = self.guess_mode && guide;
        let half = |t: &Tensor| t.chunk(2, 0)[1].shallow_clone();
        let (sample, embeds, added_half) = if conditional {
            (
                half(model_input),
                half(encoder_hidden_states),
                added.map(|a| AddedConditioning {
                    text_embeds: half(&a.text_embeds),
                    time_ids: half(&a.time_ids),
                }),
            )
        } else {
            (
                model_input.shallow_clone(),
                encoder_hidden_states.shallow_clone(),
                None,
            )
        };
        let added = if conditional {
            added_half.as_ref()
        } else {
            added
        };
        let (i, n) = (step as f64, total as f64);
        let mut sum: Option<Residuals> = None;
        for net in &self.nets {
            // controlnet_keep: 1 - float(i / n < start or (i + 1) / n > end).
            let keep = if i / n < net.start || (i + 1.0) / n > net.end {
                0.0
            } else {
                1.0
            };
            let scale = net.scale * keep;
            if scale == 0.0 {
                // Its residuals would be zeros: adding them changes nothing.
                continue;
            }
            let call = ControlNetCall {
                sample: sample.shallow_clone(),
                timestep,
                encoder_hidden_states: &embeds,
                added,
                conditioning_scale: scale,
                guess_mode: self.guess_mode,
            };
            let r = components
                .controlnet(&net.component)
                .forward(&call, &net.image)?;
            sum = Some(match sum {
                None => r,
                Some(acc) => acc + r,
            });
        }
        Ok(sum.map(|r| {
            if !conditional {
                return r;
            }
            // The unconditional half gets zeros (unchanged).
            let pad = |t: &Tensor| Tensor::cat(&[t.zeros_like(), t.shallow_clone()], 0);
            Residuals {
                down: r.down.iter().map(pad).collect(),
                mid: pad(&r.mid),
            }
        }))
    }
}
