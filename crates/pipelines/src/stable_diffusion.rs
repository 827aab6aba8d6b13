//! Stable Diffusion 1.x/2.x: diffusers' `StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline`
//! and `StableDiffusionInpaintPipeline` (diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion*.py),
//! one control flow with the three tasks' differences where diffusers has them: how the initial
//! latents are made, which timesteps run (`strength`), and the inpainting mask (9-channel UNet input,
//! or the 4-channel blend after each step).

use crate::image_processor;
use crate::{
    GenerateParams, Output, PipelineError, Progress, Result, StageTimings, StepObserver, Task,
};
use autopipe_repo::Checkpoint;
use autopipe_rng::Generator;
use autopipe_schedulers::Scheduler;
use autopipe_store_api::{ComponentStore, Lease, Tensors};
use autopipe_tokenizer::ClipTokenizer;
use serde_json::Value;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// The components a Stable Diffusion pipeline borrows from the store: (model_index key, class).
pub const COMPONENTS: &[&str] = &["text_encoder", "unet", "vae"];

/// The configuration values the control flow needs, read from the checkpoint's `config.json`s.
#[derive(Debug, Clone)]
struct Configs {
    unet_in_channels: i64,
    unet_sample_size: u32,
    vae_scale_factor: u32,
    scaling_factor: f64,
    latent_channels: i64,
    scheduler_class: String,
    scheduler_config: Value,
}

impl Configs {
    fn read(ckpt: &Checkpoint) -> Result<Self> {
        let unet = ckpt.read_json("unet", "config.json")?;
        let vae = ckpt.read_json("vae", "config.json")?;
        let mut scheduler_config = ckpt.read_json("scheduler", "scheduler_config.json")?;
        // StableDiffusionPipeline.__init__ rewrites outdated scheduler configs: steps_offset != 1
        // becomes 1 and clip_sample true becomes false (with a deprecation warning).
        if let Some(obj) = scheduler_config.as_object_mut() {
            obj.insert("steps_offset".into(), Value::from(1));
            if obj.get("clip_sample").and_then(Value::as_bool) == Some(true) {
                obj.insert("clip_sample".into(), Value::Bool(false));
            }
        }
        if unet.get("time_cond_proj_dim").is_some_and(|v| !v.is_null()) {
            return Err(PipelineError::invalid(
                "model",
                "UNets with time_cond_proj_dim (LCM) are not supported",
            ));
        }
        let int =
            |v: &Value, k: &str, default: i64| v.get(k).and_then(Value::as_i64).unwrap_or(default);
        let blocks = vae
            .get("block_out_channels")
            .and_then(Value::as_array)
            .map(Vec::len)
            .unwrap_or(4);
        let scheduler_class = scheduler_config
            .get("_class_name")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                PipelineError::invalid("model", "scheduler_config.json has no _class_name")
            })?
            .to_string();
        Ok(Self {
            unet_in_channels: int(&unet, "in_channels", 4),
            unet_sample_size: int(&unet, "sample_size", 64) as u32,
            vae_scale_factor: 1 << (blocks.max(1) - 1),
            scaling_factor: vae
                .get("scaling_factor")
                .and_then(Value::as_f64)
                .unwrap_or(0.18215),
            latent_channels: int(&vae, "latent_channels", 4),
            scheduler_class,
            scheduler_config,
        })
    }
}

/// A float request argument as Python would have it: the f32 from the wire read back as the decimal
/// a user typed (0.7f32 → 0.7, not 0.699999988), so `int(steps * strength)` rounds as in diffusers.
fn as_python_float(v: f32) -> f64 {
    format!("{v}").parse().unwrap_or(v as f64)
}

/// A Stable Diffusion pipeline borrowing leased components.
pub struct StableDiffusion<'a> {
    store: &'a dyn ComponentStore,
    lease: &'a Lease,
    checkpoint: &'a Checkpoint,
    tokenizer: &'a ClipTokenizer,
    request_id: &'a str,
}

struct Prepared {
    latents: Tensor,
    /// 4-channel inpainting: the clean image latents, the noise and the latent-size mask to blend with.
    blend: Option<(Tensor, Tensor, Tensor)>,
    /// 9-channel inpainting: mask and masked-image latents concatenated to the UNet input (CFG-doubled).
    unet_extra: Option<Tensor>,
}

impl<'a> StableDiffusion<'a> {
    /// A pipeline over `lease` (which holds [`COMPONENTS`]) for `checkpoint`.
    pub fn new(
        store: &'a dyn ComponentStore,
        lease: &'a Lease,
        checkpoint: &'a Checkpoint,
        tokenizer: &'a ClipTokenizer,
        request_id: &'a str,
    ) -> Self {
        Self {
            store,
            lease,
            checkpoint,
            tokenizer,
            request_id,
        }
    }

    fn invoke(&self, component: &str, method: &str, inputs: Tensors) -> Result<Tensors> {
        let handle = self.lease.handle(component)?;
        Ok(self
            .store
            .invoke(&self.lease.id, &handle.id, method, inputs, self.request_id)?)
    }

    fn output(outputs: &mut Tensors, name: &str) -> Result<Tensor> {
        let i = outputs
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| PipelineError::Internal(format!("component returned no {name:?}")))?;
        Ok(outputs.swap_remove(i).1)
    }

    /// `encode_prompt`: [negative; positive] embeddings when guiding, each repeated per image.
    fn encode_prompt(
        &self,
        prompt: &str,
        negative_prompt: &str,
        num_images: i64,
        guide: bool,
        warnings: &mut Vec<String>,
    ) -> Result<Tensor> {
        let max_len = self.tokenizer.model_max_length();
        let mut ids = Vec::with_capacity(2 * max_len);
        let mut batch = 1;
        if guide {
            ids.extend(self.tokenizer.encode(negative_prompt)?.input_ids);
            batch = 2;
        }
        let enc = self.tokenizer.encode(prompt)?;
        if enc.truncated {
            warnings.push(format!(
                "The following part of your input was truncated because CLIP can only handle sequences up to {max_len} tokens: {}",
                enc.removed_text
            ));
        }
        ids.extend(enc.input_ids);
        let input_ids = Tensor::from_slice(&ids).reshape([batch, max_len as i64]);
        let mut out = self.invoke(
            "text_encoder",
            "encode",
            vec![("input_ids".into(), input_ids)],
        )?;
        let embeds = Self::output(&mut out, "last_hidden_state")?;
        // diffusers encodes positive and negative separately, then repeats each per image.
        let (b, s, d) = (num_images, embeds.size()[1], embeds.size()[2]);
        let per_prompt: Vec<Tensor> = (0..batch)
            .map(|i| embeds.get(i).unsqueeze(0).repeat([1, b, 1]).view([b, s, d]))
            .collect();
        Ok(Tensor::cat(&per_prompt, 0))
    }

    /// `retrieve_latents(vae.encode(image), generator)`, sampled, times `scaling_factor`.
    fn encode_image(
        &self,
        image: &Tensor,
        cfg: &Configs,
        generator: &mut Generator,
    ) -> Result<Tensor> {
        let mut out = self.invoke(
            "vae",
            "encode",
            vec![("sample".into(), image.shallow_clone())],
        )?;
        let mean = Self::output(&mut out, "mean")?;
        let logvar = Self::output(&mut out, "logvar")?;
        let noise = generator.randn(&mean.size(), mean.kind(), mean.device());
        let sample = &mean + (&logvar * 0.5).exp() * noise;
        Ok(sample * cfg.scaling_factor)
    }

    /// Runs the pipeline for `task` with already validated `params`.
    pub fn run(
        &self,
        task: Task,
        params: &GenerateParams,
        observer: &dyn StepObserver,
    ) -> Result<Output> {
        let cfg = Configs::read(self.checkpoint)?;
        let mut warnings = Vec::new();
        let steps = params.num_inference_steps.unwrap_or(50) as usize;
        let guidance = as_python_float(params.guidance_scale.unwrap_or(7.5));
        let num_images = params.num_images_per_prompt.unwrap_or(1).max(1) as i64;
        let guide = guidance > 1.0;
        let strength = match task {
            Task::Text2Img => 1.0,
            Task::Img2Img => as_python_float(params.strength.unwrap_or(0.8)),
            Task::Inpaint => as_python_float(params.strength.unwrap_or(1.0)),
        };
        if !(0.0..=1.0).contains(&strength) {
            return Err(PipelineError::invalid(
                "strength",
                format!("must be in [0.0, 1.0], got {strength}"),
            ));
        }
        if task == Task::Inpaint && cfg.unet_in_channels != 4 && cfg.unet_in_channels != 9 {
            return Err(PipelineError::invalid(
                "model",
                format!(
                    "the unet should have either 4 or 9 input channels, not {}",
                    cfg.unet_in_channels
                ),
            ));
        }
        if task != Task::Inpaint && cfg.unet_in_channels != 4 {
            return Err(PipelineError::invalid(
                "model",
                format!(
                    "a {}-channel (inpainting) unet can only run the inpaint task",
                    cfg.unet_in_channels
                ),
            ));
        }

        // Sizes: text2img and inpaint default to the UNet's sample size; img2img follows the image.
        let init_image = match task {
            Task::Text2Img => None,
            _ => Some(image_processor::decode(
                params.image.as_deref().unwrap_or_default(),
                "image",
            )?),
        };
        let default_side = cfg.unet_sample_size * cfg.vae_scale_factor;
        let (width, height) = match (&init_image, task) {
            (Some(img), Task::Img2Img) => image_processor::default_size(img, cfg.vae_scale_factor),
            _ => (
                params.width.unwrap_or(default_side),
                params.height.unwrap_or(default_side),
            ),
        };
        if width % 8 != 0 || height % 8 != 0 || width == 0 || height == 0 {
            let field = if width % 8 != 0 || width == 0 {
                "width"
            } else {
                "height"
            };
            return Err(PipelineError::invalid(
                field,
                format!("height and width must be positive multiples of 8, got {height}x{width}"),
            ));
        }

        let scheduler_class = params.scheduler.as_deref().unwrap_or(&cfg.scheduler_class);
        let mut scheduler_config = cfg.scheduler_config.clone();
        if let Some(obj) = scheduler_config.as_object_mut() {
            obj.extend(
                params
                    .scheduler_options
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
        }
        let mut scheduler = autopipe_schedulers::from_config(scheduler_class, &scheduler_config)?;
        let mut generator = Generator::new(params.seed);

        let t0 = Instant::now();
        let negative = params.negative_prompt.as_deref().unwrap_or("");
        let prompt_embeds =
            self.encode_prompt(&params.prompt, negative, num_images, guide, &mut warnings)?;
        let (kind, device) = (prompt_embeds.kind(), prompt_embeds.device());
        let encode_prompt_ms = t0.elapsed().as_secs_f64() * 1e3;

        scheduler.set_timesteps(steps)?;
        let mut timesteps = scheduler.timesteps().to_vec();
        if task != Task::Text2Img {
            // get_timesteps(num_inference_steps, strength)
            let init_timestep = ((steps as f64 * strength) as usize).min(steps);
            let t_start = steps.saturating_sub(init_timestep);
            let begin = t_start * scheduler.order();
            timesteps = timesteps
                .get(begin..)
                .map(<[f64]>::to_vec)
                .unwrap_or_default();
            scheduler.set_begin_index(begin);
            if steps - t_start < 1 {
                return Err(PipelineError::invalid(
                    "strength",
                    format!("After adjusting the num_inference_steps by strength parameter: {strength}, the number of pipeline steps is {} which is < 1 and not appropriate for this pipeline.", steps - t_start),
                ));
            }
        }

        let prepared = match task {
            Task::Text2Img => {
                let shape = [
                    num_images,
                    cfg.latent_channels,
                    (height / cfg.vae_scale_factor) as i64,
                    (width / cfg.vae_scale_factor) as i64,
                ];
                let latents = generator.randn(&shape, kind, device) * scheduler.init_noise_sigma();
                Prepared {
                    latents,
                    blend: None,
                    unet_extra: None,
                }
            }
            Task::Img2Img => {
                let img = init_image.as_ref().expect("decoded above");
                let image = image_processor::preprocess(img, width, height)
                    .to_device(device)
                    .to_kind(kind);
                let init = self.encode_image(&image, &cfg, &mut generator)?;
                let init = if num_images > 1 {
                    init.repeat([num_images, 1, 1, 1])
                } else {
                    init
                };
                let noise = generator.randn(&init.size(), kind, device);
                let latents = scheduler.add_noise(&init, &noise, timesteps[0]);
                Prepared {
                    latents,
                    blend: None,
                    unet_extra: None,
                }
            }
            Task::Inpaint => self.prepare_inpaint(
                params,
                &cfg,
                init_image.as_ref().expect("decoded above"),
                width,
                height,
                num_images,
                strength,
                guide,
                &timesteps,
                scheduler.as_mut(),
                &mut generator,
                kind,
                device,
            )?,
        };

        let t1 = Instant::now();
        let latents = self.denoise(
            &prepared,
            &prompt_embeds,
            &timesteps,
            guidance,
            guide,
            scheduler.as_mut(),
            &mut generator,
            observer,
        )?;
        let denoise_ms = t1.elapsed().as_secs_f64() * 1e3;

        let t2 = Instant::now();
        let mut out = self.invoke(
            "vae",
            "decode",
            vec![("latents".into(), latents / cfg.scaling_factor)],
        )?;
        let decoded = Self::output(&mut out, "sample")?;
        let (images_f32, images) = image_processor::postprocess(&decoded)?;
        let decode_ms = t2.elapsed().as_secs_f64() * 1e3;
        Ok(Output {
            images,
            images_f32,
            timings: StageTimings {
                encode_prompt_ms,
                denoise_ms,
                decode_ms,
                steps: timesteps.len() as u32,
            },
            warnings,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn prepare_inpaint(
        &self,
        params: &GenerateParams,
        cfg: &Configs,
        img: &image::DynamicImage,
        width: u32,
        height: u32,
        num_images: i64,
        strength: f64,
        guide: bool,
        timesteps: &[f64],
        scheduler: &mut dyn Scheduler,
        generator: &mut Generator,
        kind: Kind,
        device: Device,
    ) -> Result<Prepared> {
        let mask_img = image_processor::decode(
            params.mask_image.as_deref().unwrap_or_default(),
            "mask_image",
        )?;
        if (mask_img.width(), mask_img.height()) != (img.width(), img.height()) {
            return Err(PipelineError::invalid(
                "mask_image",
                format!(
                    "size {}x{} does not match image size {}x{}",
                    mask_img.width(),
                    mask_img.height(),
                    img.width(),
                    img.height()
                ),
            ));
        }
        let init_image = image_processor::preprocess(img, width, height);
        let is_strength_max = strength == 1.0;
        let four_channel = cfg.unet_in_channels == 4;
        let shape = [
            num_images,
            cfg.latent_channels,
            (height / cfg.vae_scale_factor) as i64,
            (width / cfg.vae_scale_factor) as i64,
        ];

        // prepare_latents(..., return_noise=True, return_image_latents=four_channel)
        let image_latents = if four_channel || !is_strength_max {
            let l =
                self.encode_image(&init_image.to_device(device).to_kind(kind), cfg, generator)?;
            let reps = num_images / l.size()[0];
            Some(l.repeat([reps, 1, 1, 1]))
        } else {
            None
        };
        let noise = generator.randn(&shape, kind, device);
        let latents = if is_strength_max {
            &noise * scheduler.init_noise_sigma()
        } else {
            scheduler.add_noise(
                image_latents.as_ref().expect("encoded when strength < 1"),
                &noise,
                timesteps[0],
            )
        };

        // prepare_mask_latents
        let mask_condition = image_processor::preprocess_mask(&mask_img, width, height);
        let masked_image = &init_image * mask_condition.lt(0.5).to_kind(Kind::Float);
        let latent_hw = [shape[2], shape[3]];
        let mask = mask_condition
            .upsample_nearest2d(latent_hw, None, None)
            .to_device(device)
            .to_kind(kind);
        let masked_latents = self.encode_image(
            &masked_image.to_device(device).to_kind(kind),
            cfg,
            generator,
        )?;
        let mask = mask.repeat([num_images / mask.size()[0], 1, 1, 1]);
        let masked_latents =
            masked_latents.repeat([num_images / masked_latents.size()[0], 1, 1, 1]);

        if four_channel {
            let image_latents = image_latents.expect("encoded for 4-channel unets");
            Ok(Prepared {
                latents,
                blend: Some((image_latents, noise, mask)),
                unet_extra: None,
            })
        } else {
            let extra = Tensor::cat(&[mask, masked_latents], 1);
            let extra = if guide {
                Tensor::cat(&[&extra, &extra], 0)
            } else {
                extra
            };
            Ok(Prepared {
                latents,
                blend: None,
                unet_extra: Some(extra),
            })
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn denoise(
        &self,
        prepared: &Prepared,
        prompt_embeds: &Tensor,
        timesteps: &[f64],
        guidance: f64,
        guide: bool,
        scheduler: &mut dyn Scheduler,
        generator: &mut Generator,
        observer: &dyn StepObserver,
    ) -> Result<Tensor> {
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
            let model_input = match &prepared.unet_extra {
                Some(extra) => Tensor::cat(&[&model_input, extra], 1),
                None => model_input,
            };
            let timestep = Tensor::from(t as f32);
            let mut out = self.invoke(
                "unet",
                "forward",
                vec![
                    ("sample".into(), model_input),
                    ("timestep".into(), timestep),
                    (
                        "encoder_hidden_states".into(),
                        prompt_embeds.shallow_clone(),
                    ),
                ],
            )?;
            let mut noise_pred = Self::output(&mut out, "sample")?;
            if guide {
                let chunks = noise_pred.chunk(2, 0);
                noise_pred = &chunks[0] + (&chunks[1] - &chunks[0]) * guidance;
            }
            latents = scheduler.step(&noise_pred, t, &latents, generator)?;
            if let Some((image_latents, noise, mask)) = &prepared.blend {
                let proper = match timesteps.get(i + 1) {
                    Some(&next) => scheduler.add_noise(image_latents, noise, next),
                    None => image_latents.shallow_clone(),
                };
                latents = (1.0 - mask) * proper + mask * &latents;
            }
            observer.on_step(Progress {
                step: i as u32 + 1,
                total_steps: total,
                timestep: t,
            });
        }
        Ok(latents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_of_wire_f32() {
        assert_eq!(as_python_float(0.7), 0.7);
        assert_eq!(((10.0 * as_python_float(0.7)) as usize), 7);
        assert_eq!(as_python_float(7.5), 7.5);
    }
}
