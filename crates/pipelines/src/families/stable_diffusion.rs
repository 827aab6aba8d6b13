//! Stable Diffusion 1.x/2.x: diffusers' `StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline`
//! and `StableDiffusionInpaintPipeline` (diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion*.py),
//! and with ControlNet conditioning ([`crate::steps::controlnet`]) `StableDiffusionControlNetPipeline`,
//! `…ControlNetImg2ImgPipeline` and `…ControlNetInpaintPipeline`
//! (diffusers/pipelines/controlnet/pipeline_controlnet{,_img2img,_inpaint}.py). All six run the
//! checkpoint's safety checker on their decoded images ([`crate::steps::safety_checker`]).

use crate::steps::components::Components;
use crate::steps::controlnet;
use crate::steps::latent_diffusion::{self, Configured, Defaults};
use crate::steps::prompt::ClipPrompt;
use crate::steps::safety_checker::{SafetyCheck, FEATURE_EXTRACTOR, SAFETY_CHECKER};
use crate::steps::schedule;
use crate::{Context, GenerateParams, Output, Pipeline, PipelineError, Result, StepObserver};
use autopipe_auto::Family;
use serde_json::{Map, Value};

/// The Stable Diffusion family; `controlnet`: its ControlNet pipelines.
pub struct StableDiffusion {
    pub controlnet: bool,
}

/// The ControlNet pipelines' `controlnet_conditioning_scale` default.
fn controlnet_scale(task: crate::Task) -> f64 {
    match task {
        crate::Task::Text2Img => 1.0,
        crate::Task::Img2Img => 0.8,
        crate::Task::Inpaint => 0.5,
    }
}

const DEFAULTS: Defaults = Defaults {
    guidance_scale: 7.5,
    img2img_strength: 0.8,
    inpaint_strength: 1.0,
};

/// The ControlNet pipelines take the saved scheduler config as it is.
fn keep_scheduler(_: &mut Map<String, Value>) {}

/// `StableDiffusionPipeline.__init__` rewrites outdated scheduler configs: `steps_offset != 1`
/// becomes 1 and `clip_sample: true` becomes false (with a deprecation warning).
fn rewrite_scheduler(config: &mut Map<String, Value>) {
    config.insert("steps_offset".into(), Value::from(1));
    if config.get("clip_sample").and_then(Value::as_bool) == Some(true) {
        config.insert("clip_sample".into(), Value::Bool(false));
    }
}

impl StableDiffusion {
    fn configure(&self, ctx: &Context, params: &GenerateParams) -> Result<Configured> {
        if let Some(field) = params.first_sdxl_field().or(params.first_prior_field()) {
            return Err(PipelineError::invalid(
                field,
                format!("is not an argument of {}", ctx.resolution.pipeline),
            ));
        }
        let setup = latent_diffusion::setup(ctx, params, DEFAULTS, None)?;
        let rewrite: fn(&mut Map<String, Value>) = if self.controlnet {
            controlnet::validate(params, setup.size, setup.space.scale_factor)?;
            keep_scheduler
        } else {
            if let Some(field) = params.first_controlnet_field() {
                return Err(PipelineError::invalid(
                    field,
                    format!("is not an argument of {}", ctx.resolution.pipeline),
                ));
            }
            rewrite_scheduler
        };
        let mut scheduler = schedule::build(ctx.checkpoint, params, rewrite)?;
        let timesteps = schedule::select(scheduler.as_mut(), params, setup.start, None)?;
        Ok(Configured {
            setup,
            scheduler,
            timesteps,
            controlnet_scale: self.controlnet.then(|| controlnet_scale(ctx.task)),
            safety_check: SafetyCheck::configure(ctx, params)?,
        })
    }
}

impl Pipeline for StableDiffusion {
    fn family(&self) -> Family {
        if self.controlnet {
            Family::StableDiffusionControlNet
        } else {
            Family::StableDiffusion
        }
    }

    fn optional_components(&self) -> &'static [&'static str] {
        &[SAFETY_CHECKER, FEATURE_EXTRACTOR]
    }

    fn warm_up(&self, ctx: &Context) -> Result<()> {
        ctx.tokenizers.clip(ctx.checkpoint, "tokenizer").map(drop)
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
        let encoder = ClipPrompt {
            tokenizer: ctx.tokenizers.clip(ctx.checkpoint, "tokenizer")?,
            encoder: "text_encoder",
        };
        let configured = self.configure(ctx, params)?;
        latent_diffusion::run(
            ctx,
            components,
            params,
            configured,
            &encoder,
            &|_, _| None,
            observer,
        )
    }
}
