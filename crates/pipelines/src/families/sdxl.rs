//! Stable Diffusion XL: diffusers' `StableDiffusionXLPipeline`, `StableDiffusionXLImg2ImgPipeline`
//! (also the refiner, which has no first text encoder and may ask for aesthetic scores) and
//! `StableDiffusionXLInpaintPipeline` (4- and 9-channel UNets)
//! (diffusers/pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl*.py).
//!
//! What differs from Stable Diffusion: two CLIP text encoders (penultimate hidden states
//! concatenated, pooled `text_embeds` of the second), the UNet's `text_time` added conditioning
//! (pooled embeddings + micro-conditioning time ids), `denoising_start` / `denoising_end` for the
//! base → refiner hand-off, and its own defaults.
//!
//! With ControlNet conditioning ([`crate::steps::controlnet`]): `StableDiffusionXLControlNetPipeline`,
//! `…ControlNetImg2ImgPipeline` and `…ControlNetInpaintPipeline`
//! (diffusers/pipelines/controlnet/pipeline_controlnet{_sd_xl,_sd_xl_img2img,_inpaint_sd_xl}.py),
//! which differ in defaults and in which SDXL arguments they take.

use crate::steps::components::{AddedConditioning, Components};
use crate::steps::controlnet;
use crate::steps::latent_diffusion::{self, Configured, Defaults};
use crate::steps::prompt::{DualClipPrompt, PromptEmbeds};
use crate::steps::schedule;
use crate::{
    as_python_float, Context, GenerateParams, MicroConditioning, Output, Pair, Pipeline,
    PipelineError, Result, StepObserver, Task,
};
use autopipe_auto::Family;
use autopipe_repo::Checkpoint;
use serde_json::{Map, Value};
use tch::{Device, Kind, Tensor};

/// The SDXL family; `controlnet`: its ControlNet pipelines.
pub struct StableDiffusionXL {
    pub controlnet: bool,
}

fn defaults(task: Task, controlnet: bool) -> Defaults {
    Defaults {
        guidance_scale: 5.0,
        img2img_strength: if controlnet { 0.8 } else { 0.3 },
        // StableDiffusionXLInpaintPipeline's default is 0.9999, not 1.0: the image still counts.
        inpaint_strength: if task == Task::Inpaint { 0.9999 } else { 1.0 },
    }
}

/// The ControlNet pipelines' `controlnet_conditioning_scale` default.
fn controlnet_scale(task: Task) -> f64 {
    if task == Task::Img2Img {
        0.8
    } else {
        1.0
    }
}

/// Request fields the SDXL pipeline for `task` does not take.
fn not_arguments(
    task: Task,
    controlnet: bool,
    params: &GenerateParams,
) -> Vec<(&'static str, bool)> {
    let micro = &params.micro;
    match (task, controlnet) {
        (Task::Text2Img, _) => vec![
            ("denoising_start", params.denoising_start.is_some()),
            ("aesthetic_score", micro.aesthetic_score.is_some()),
            (
                "negative_aesthetic_score",
                micro.negative_aesthetic_score.is_some(),
            ),
        ],
        (Task::Img2Img, true) => vec![
            ("denoising_start", params.denoising_start.is_some()),
            ("denoising_end", params.denoising_end.is_some()),
        ],
        (Task::Inpaint, true) => vec![
            (
                "negative_original_size",
                micro.negative_original_size.is_some(),
            ),
            (
                "negative_crops_coords_top_left",
                micro.negative_crops_coords_top_left.is_some(),
            ),
            ("negative_target_size", micro.negative_target_size.is_some()),
        ],
        _ => Vec::new(),
    }
}

/// (tokenizer, text encoder) pairs, in `encode_prompt`'s order; a refiner has only the second.
const ENCODERS: [(&str, &str); 2] = [
    ("tokenizer", "text_encoder"),
    ("tokenizer_2", "text_encoder_2"),
];

/// SDXL pipelines take the saved scheduler config as it is.
fn keep_scheduler(_: &mut Map<String, Value>) {}

/// The numbers `_get_add_time_ids` needs from the checkpoint.
struct TimeIdConfig {
    requires_aesthetics_score: bool,
    addition_time_embed_dim: i64,
    /// `unet.add_embedding.linear_1.in_features`.
    expected_add_embed_dim: i64,
    /// `text_encoder_2.config.projection_dim`.
    text_encoder_projection_dim: i64,
}

struct SdxlConfigured {
    configured: Configured,
    /// (positive, negative) time ids, one row each.
    time_ids: (Vec<f64>, Vec<f64>),
    encoders: Vec<(&'static str, &'static str)>,
    force_zeros_for_empty_prompt: bool,
}

fn option_bool(ctx: &Context, key: &str, default: bool) -> bool {
    ctx.checkpoint
        .index()
        .options
        .get(key)
        .and_then(Value::as_bool)
        .unwrap_or(default)
}

impl StableDiffusionXL {
    fn configure(&self, ctx: &Context, params: &GenerateParams) -> Result<SdxlConfigured> {
        if let Some(field) = params.first_prior_field() {
            return Err(PipelineError::invalid(
                field,
                format!("is not an argument of {}", ctx.resolution.pipeline),
            ));
        }
        let text2img = ctx.task == Task::Text2Img;
        let mut unknown = not_arguments(ctx.task, self.controlnet, params);
        if !self.controlnet {
            unknown.push(("controlnet", !params.controlnets.is_empty()));
            unknown.push(("guess_mode", params.guess_mode));
        }
        if let Some((field, _)) = unknown.into_iter().find(|(_, set)| *set) {
            return Err(PipelineError::invalid(
                field,
                format!("is not an argument of {}", ctx.resolution.pipeline),
            ));
        }
        let denoising_start = schedule::fraction(params.denoising_start, "denoising_start")?;
        let denoising_end = schedule::fraction(params.denoising_end, "denoising_end")?;
        let setup = latent_diffusion::setup(
            ctx,
            params,
            defaults(ctx.task, self.controlnet),
            denoising_start,
        )?;
        if self.controlnet {
            controlnet::validate(params, setup.size, setup.space.scale_factor)?;
        }
        let mut scheduler = schedule::build(ctx.checkpoint, params, keep_scheduler)?;
        let timesteps = schedule::select(scheduler.as_mut(), params, setup.start, denoising_end)?;

        let index = ctx.checkpoint.index();
        let encoders: Vec<(&'static str, &'static str)> = ENCODERS
            .into_iter()
            .filter(|(_, encoder)| index.component_class(encoder).is_some())
            .collect();
        if index.component_class("text_encoder_2").is_none() {
            return Err(PipelineError::invalid(
                "model",
                format!("{} needs text_encoder_2 (CLIPTextModelWithProjection) for the pooled prompt embeddings; model_index.json has none", ctx.resolution.pipeline),
            ));
        }
        let unet = ctx.checkpoint.read_json("unet", "config.json")?;
        let text_encoder_2 = ctx.checkpoint.read_json("text_encoder_2", "config.json")?;
        let int = |v: &Value, k: &str| v.get(k).and_then(Value::as_i64);
        let config = TimeIdConfig {
            requires_aesthetics_score: !text2img
                && option_bool(ctx, "requires_aesthetics_score", false),
            addition_time_embed_dim: int(&unet, "addition_time_embed_dim").unwrap_or(0),
            expected_add_embed_dim: int(&unet, "projection_class_embeddings_input_dim")
                .unwrap_or(0),
            text_encoder_projection_dim: int(&text_encoder_2, "projection_dim").unwrap_or(0),
        };
        if unet.get("addition_embed_type").and_then(Value::as_str) != Some("text_time") {
            return Err(PipelineError::invalid(
                "model",
                "an SDXL unet must have addition_embed_type \"text_time\"",
            ));
        }
        let time_ids = time_ids(ctx.task, &params.micro, setup.size, &config)?;
        Ok(SdxlConfigured {
            configured: Configured {
                setup,
                scheduler,
                timesteps,
                controlnet_scale: self.controlnet.then(|| controlnet_scale(ctx.task)),
                // diffusers' SDXL pipelines have no safety checker (an invisible watermarker).
                safety_check: None,
            },
            time_ids,
            encoders,
            force_zeros_for_empty_prompt: option_bool(ctx, "force_zeros_for_empty_prompt", true),
        })
    }
}

/// `_get_add_time_ids` of the text-to-image pipeline (`original_size + crops_coords_top_left +
/// target_size`) and of the img2img/inpaint pipelines (aesthetic scores instead of the target size
/// when the checkpoint `requires_aesthetics_score`), with diffusers' defaults and checks.
fn time_ids(
    task: Task,
    micro: &MicroConditioning,
    (width, height): (u32, u32),
    config: &TimeIdConfig,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let pair = |p: Pair| [p.0 as f64, p.1 as f64];
    let original = micro.original_size.unwrap_or((height, width));
    let target = micro.target_size.unwrap_or((height, width));
    let crops = micro.crops_coords_top_left.unwrap_or((0, 0));
    let negative_crops = micro.negative_crops_coords_top_left.unwrap_or((0, 0));
    let ids = |parts: &[[f64; 2]], tail: Option<f64>| -> Vec<f64> {
        parts.iter().flatten().copied().chain(tail).collect()
    };
    let (positive, negative) = if task == Task::Text2Img {
        let positive = ids(&[pair(original), pair(crops), pair(target)], None);
        let negative = match (micro.negative_original_size, micro.negative_target_size) {
            (Some(o), Some(t)) => ids(&[pair(o), pair(negative_crops), pair(t)], None),
            _ => positive.clone(),
        };
        (positive, negative)
    } else {
        let negative_original = micro.negative_original_size.unwrap_or(original);
        let negative_target = micro.negative_target_size.unwrap_or(target);
        if config.requires_aesthetics_score {
            let score = micro.aesthetic_score.map(as_python_float).unwrap_or(6.0);
            let negative_score = micro
                .negative_aesthetic_score
                .map(as_python_float)
                .unwrap_or(2.5);
            (
                ids(&[pair(original), pair(crops)], Some(score)),
                ids(
                    &[pair(negative_original), pair(negative_crops)],
                    Some(negative_score),
                ),
            )
        } else {
            (
                ids(&[pair(original), pair(crops), pair(target)], None),
                ids(
                    &[pair(negative_original), pair(crops), pair(negative_target)],
                    None,
                ),
            )
        }
    };
    let passed =
        config.addition_time_embed_dim * positive.len() as i64 + config.text_encoder_projection_dim;
    let expected = config.expected_add_embed_dim;
    let step = config.addition_time_embed_dim;
    if expected != passed {
        let message = if task != Task::Text2Img && expected > passed && expected - passed == step {
            format!("Model expects an added time embedding vector of length {expected}, but a vector of {passed} was created. Please make sure to enable `requires_aesthetics_score` with `pipe.register_to_config(requires_aesthetics_score=True)` to make sure `aesthetic_score` {} and `negative_aesthetic_score` {} is correctly used by the model.",
                micro.aesthetic_score.unwrap_or(6.0), micro.negative_aesthetic_score.unwrap_or(2.5))
        } else if task != Task::Text2Img && passed > expected && passed - expected == step {
            format!("Model expects an added time embedding vector of length {expected}, but a vector of {passed} was created. Please make sure to disable `requires_aesthetics_score` with `pipe.register_to_config(requires_aesthetics_score=False)` to make sure `target_size` ({}, {}) is correctly used by the model.", target.0, target.1)
        } else {
            format!("Model expects an added time embedding vector of length {expected}, but a vector of {passed} was created. The model has an incorrect config. Please check `unet.config.time_embedding_type` and `text_encoder_2.config.projection_dim`.")
        };
        return Err(PipelineError::invalid("model", message));
    }
    Ok((positive, negative))
}

impl Pipeline for StableDiffusionXL {
    fn family(&self) -> Family {
        if self.controlnet {
            Family::StableDiffusionXLControlNet
        } else {
            Family::StableDiffusionXL
        }
    }

    fn optional_components(&self) -> &'static [&'static str] {
        &["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
    }

    fn upcast_half(&self, checkpoint: &Checkpoint, component: &str) -> Result<bool> {
        // The SDXL pipelines run the VAE in float32 when it is float16 and its config says
        // `force_upcast` (AutoencoderKL's default).
        Ok(component == "vae"
            && checkpoint
                .read_json("vae", "config.json")?
                .get("force_upcast")
                .and_then(Value::as_bool)
                .unwrap_or(true))
    }

    fn warm_up(&self, ctx: &Context) -> Result<()> {
        for (tokenizer, encoder) in ENCODERS {
            if ctx.checkpoint.index().component_class(encoder).is_some() {
                ctx.tokenizers.clip(ctx.checkpoint, tokenizer)?;
            }
        }
        Ok(())
    }

    fn validate(&self, ctx: &Context, params: &GenerateParams) -> Result<()> {
        self.configure(ctx, params)?;
        self.warm_up(ctx)
    }

    fn run(
        &self,
        ctx: &Context,
        components: &Components,
        params: &GenerateParams,
        observer: &dyn StepObserver,
    ) -> Result<Output> {
        let SdxlConfigured {
            configured,
            time_ids: (positive, negative),
            encoders,
            force_zeros_for_empty_prompt,
        } = self.configure(ctx, params)?;
        let encoder = DualClipPrompt {
            encoders: encoders
                .iter()
                .map(|(tokenizer, encoder)| {
                    Ok((ctx.tokenizers.clip(ctx.checkpoint, tokenizer)?, *encoder))
                })
                .collect::<Result<_>>()?,
            force_zeros_for_empty_prompt,
        };
        let (num_images, guide) = (configured.setup.num_images, configured.setup.guide());
        let added = |embeds: &PromptEmbeds, (kind, device): (Kind, Device)| {
            let row = |ids: &[f64]| {
                Tensor::from_slice(ids)
                    .to_kind(kind)
                    .to_device(device)
                    .unsqueeze(0)
                    .repeat([num_images, 1])
            };
            let time_ids = if guide {
                Tensor::cat(&[row(&negative), row(&positive)], 0)
            } else {
                row(&positive)
            };
            Some(AddedConditioning {
                text_embeds: embeds.pooled.as_ref()?.shallow_clone(),
                time_ids,
            })
        };
        latent_diffusion::run(
            ctx, components, params, configured, &encoder, &added, observer,
        )
    }
}
