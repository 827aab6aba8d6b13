//! Stable Diffusion 1.x/2.x: diffusers' `StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline`
//! and `StableDiffusionInpaintPipeline` (diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion*.py).

use crate::steps::components::Components;
use crate::steps::denoise::{denoise, Conditioning};
use crate::steps::latent_diffusion::{self, Defaults};
use crate::steps::prompt::{ClipPrompt, PromptEncoder, Prompts};
use crate::steps::schedule;
use crate::{
    Context, GenerateParams, Output, Pipeline, PipelineError, Result, StageTimings, StepObserver,
};
use autopipe_auto::Family;
use autopipe_rng::Generator;
use autopipe_schedulers::Scheduler;
use serde_json::{Map, Value};

/// The Stable Diffusion family.
pub struct StableDiffusion;

const DEFAULTS: Defaults = Defaults {
    guidance_scale: 7.5,
    img2img_strength: 0.8,
    inpaint_strength: 1.0,
};

/// `StableDiffusionPipeline.__init__` rewrites outdated scheduler configs: `steps_offset != 1`
/// becomes 1 and `clip_sample: true` becomes false (with a deprecation warning).
fn rewrite_scheduler(config: &mut Map<String, Value>) {
    config.insert("steps_offset".into(), Value::from(1));
    if config.get("clip_sample").and_then(Value::as_bool) == Some(true) {
        config.insert("clip_sample".into(), Value::Bool(false));
    }
}

impl StableDiffusion {
    fn configure(
        &self,
        ctx: &Context,
        params: &GenerateParams,
    ) -> Result<(latent_diffusion::Setup, Box<dyn Scheduler>, Vec<f64>)> {
        if let Some(field) = params.first_sdxl_field().or(params.first_prior_field()) {
            return Err(PipelineError::invalid(
                field,
                format!("is not an argument of {}", ctx.resolution.pipeline),
            ));
        }
        let setup = latent_diffusion::setup(ctx, params, DEFAULTS, None)?;
        let mut scheduler = schedule::build(ctx.checkpoint, params, rewrite_scheduler)?;
        let timesteps = schedule::select(scheduler.as_mut(), params, setup.start, None)?;
        Ok((setup, scheduler, timesteps))
    }
}

impl Pipeline for StableDiffusion {
    fn family(&self) -> Family {
        Family::StableDiffusion
    }

    fn validate(&self, ctx: &Context, params: &GenerateParams) -> Result<()> {
        self.configure(ctx, params)?;
        ctx.tokenizers.clip(ctx.checkpoint, "tokenizer")?;
        Ok(())
    }

    fn run(
        &self,
        ctx: &Context,
        components: &Components,
        params: &GenerateParams,
        observer: &dyn StepObserver,
    ) -> Result<Output> {
        let (setup, mut scheduler, timesteps) = self.configure(ctx, params)?;
        let mut generator = Generator::new(params.seed);
        let mut timings = StageTimings::default();
        let mut warnings = Vec::new();

        let encoder = ClipPrompt {
            tokenizer: ctx.tokenizers.clip(ctx.checkpoint, "tokenizer")?,
            encoder: "text_encoder",
        };
        let prompts = Prompts {
            prompt: &params.prompt,
            prompt_2: None,
            negative_prompt: params.negative_prompt.as_deref(),
            negative_prompt_2: None,
            num_images: setup.num_images,
            guide: setup.guide(),
        };
        let embeds = timings.time("encode_prompt", || {
            encoder.encode(components, &prompts, &mut warnings)
        })?;
        let at = (embeds.embeds.kind(), embeds.embeds.device());

        let prepared = latent_diffusion::prepare(
            ctx,
            components,
            params,
            &setup,
            &timesteps,
            scheduler.as_ref(),
            &mut generator,
            at,
        )?;
        let cond = Conditioning {
            encoder_hidden_states: Some(&embeds.embeds),
            image_embeds: None,
            added: None,
            guidance_scale: setup.guidance_scale,
        };
        let latents = timings.time("denoise", || {
            denoise(
                &components.unet("unet"),
                &cond,
                &prepared,
                &timesteps,
                scheduler.as_mut(),
                &mut generator,
                observer,
            )
        })?;
        timings.steps = timesteps.len() as u32;
        latent_diffusion::finish(
            components,
            &setup.space,
            latents,
            params.output_type,
            timings,
            warnings,
        )
    }
}
