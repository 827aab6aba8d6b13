//! Request-level steps of every family that denoises VAE latents with a UNet (Stable Diffusion,
//! SDXL, their ControlNet variants): sizes and defaults, the task's starting latents, and the end
//! (decode, or the latents themselves for `output_type="latent"`).

use crate::steps::components::{AddedConditioning, Components};
use crate::steps::controlnet::{self, ControlNets};
use crate::steps::denoise::{denoise, Conditioning};
use crate::steps::image;
use crate::steps::latents::{self, InpaintInputs, LatentSpace, Prepared};
use crate::steps::prompt::{PromptEmbeds, PromptEncoder, Prompts};
use crate::steps::safety_checker::SafetyCheck;
use crate::steps::schedule::Start;
use crate::{
    as_python_float, Context, GenerateParams, InitImage, Output, OutputType, PipelineError, Result,
    StageTimings, StepObserver, Task,
};
use autopipe_rng::Generator;
use autopipe_schedulers::Scheduler;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// A pipeline's call-argument defaults (diffusers' `__call__` signature).
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub guidance_scale: f64,
    pub img2img_strength: f64,
    pub inpaint_strength: f64,
}

/// What a request resolves to before any component runs.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    pub unet_in_channels: i64,
    pub space: LatentSpace,
    /// (width, height) of the output.
    pub size: (u32, u32),
    pub num_images: i64,
    pub guidance_scale: f64,
    /// The task's strength (1 for text-to-image).
    pub strength: f64,
    /// Where the schedule starts.
    pub start: Start,
}

impl Setup {
    /// Whether classifier-free guidance runs.
    pub fn guide(&self) -> bool {
        self.guidance_scale > 1.0
    }
}

/// Checks the UNet fits the task and resolves sizes, guidance, strength and the schedule's start.
/// `denoising_start` is the request's (already validated) fraction, if the family takes it.
pub fn setup(
    ctx: &Context,
    params: &GenerateParams,
    defaults: Defaults,
    denoising_start: Option<f64>,
) -> Result<Setup> {
    let unet = ctx.checkpoint.read_json("unet", "config.json")?;
    let int = |k: &str, default: i64| unet.get(k).and_then(Value::as_i64).unwrap_or(default);
    let unet_in_channels = int("in_channels", 4);
    match ctx.task {
        Task::Inpaint if unet_in_channels != 4 && unet_in_channels != 9 => {
            return Err(PipelineError::invalid(
                "model",
                format!("the unet should have either 4 or 9 input channels for inpainting, not {unet_in_channels}"),
            ))
        }
        Task::Text2Img | Task::Img2Img if unet_in_channels != 4 => {
            return Err(PipelineError::invalid(
                "task",
                format!("this model's unet has {unet_in_channels} input channels (an inpainting checkpoint); it can only run TASK_INPAINT"),
            ))
        }
        _ => {}
    }
    if unet.get("time_cond_proj_dim").is_some_and(|v| !v.is_null()) {
        return Err(PipelineError::invalid(
            "model",
            "UNets with time_cond_proj_dim (LCM) are not supported",
        ));
    }
    let space = LatentSpace::read(ctx.checkpoint, "vae")?;
    let strength = match ctx.task {
        Task::Text2Img => 1.0,
        Task::Img2Img => params
            .strength
            .map(as_python_float)
            .unwrap_or(defaults.img2img_strength),
        Task::Inpaint => params
            .strength
            .map(as_python_float)
            .unwrap_or(defaults.inpaint_strength),
    };
    if !(0.0..=1.0).contains(&strength) {
        return Err(PipelineError::invalid(
            "strength",
            format!("must be in [0.0, 1.0], got {strength}"),
        ));
    }
    let default_side = int("sample_size", 64) as u32 * space.scale_factor;
    let given = |(w, h): (u32, u32)| (params.width.unwrap_or(w), params.height.unwrap_or(h));
    let controlnet = !params.controlnets.is_empty();
    let size = match (ctx.task, &params.image) {
        // ControlNet pipelines take `width` / `height`, defaulting to the first control image's
        // size (text-to-image) or the init image's.
        (Task::Text2Img, _) if controlnet => {
            given(controlnet::default_size(params, space.scale_factor).unwrap_or_default())
        }
        (Task::Img2Img | Task::Inpaint, Some(InitImage::Pixels(img))) if controlnet => {
            given(image::default_size(img, space.scale_factor))
        }
        // Image-to-image takes its size from the image (diffusers' `get_default_height_width`).
        (Task::Img2Img, Some(InitImage::Pixels(img))) => {
            image::default_size(img, space.scale_factor)
        }
        (Task::Img2Img, Some(InitImage::Latents(l))) => {
            let s = l.size();
            (
                s[3] as u32 * space.scale_factor,
                s[2] as u32 * space.scale_factor,
            )
        }
        _ => (
            params.width.unwrap_or(default_side),
            params.height.unwrap_or(default_side),
        ),
    };
    if size.0 % 8 != 0 || size.1 % 8 != 0 || size.0 == 0 || size.1 == 0 {
        let field = if size.0 % 8 != 0 || size.0 == 0 {
            "width"
        } else {
            "height"
        };
        return Err(PipelineError::invalid(
            field,
            format!(
                "height and width must be positive multiples of 8, got {}x{}",
                size.1, size.0
            ),
        ));
    }
    if let Some(InitImage::Latents(l)) = &params.image {
        if l.dim() != 4 || l.size()[1] != space.channels {
            return Err(PipelineError::invalid(
                "image_latents",
                format!(
                    "must have shape [batch, {}, h, w] for this model, got {:?}",
                    space.channels,
                    l.size()
                ),
            ));
        }
    }
    let start = match (ctx.task, denoising_start) {
        (Task::Text2Img, _) => Start::Full,
        (_, Some(fraction)) => Start::Fraction(fraction),
        (_, None) => Start::Strength(strength),
    };
    Ok(Setup {
        unet_in_channels,
        space,
        size,
        num_images: params.num_images_per_prompt.unwrap_or(1).max(1) as i64,
        guidance_scale: params
            .guidance_scale
            .map(as_python_float)
            .unwrap_or(defaults.guidance_scale),
        strength,
        start,
    })
}

/// A configured request: what [`run`] needs besides the components.
pub struct Configured {
    pub setup: Setup,
    pub scheduler: Box<dyn Scheduler>,
    /// The timesteps to run (after strength / denoising_start / denoising_end).
    pub timesteps: Vec<f64>,
    /// For a ControlNet pipeline, its `controlnet_conditioning_scale` default: the request's
    /// ControlNets then condition the UNet ([`ControlNets`]).
    pub controlnet_scale: Option<f64>,
    /// The safety check the decoded images go through, if the family and checkpoint have one.
    pub safety_check: Option<SafetyCheck>,
}

/// Builds the UNet's added conditioning from the prompt embeddings (SDXL's pooled embeddings and
/// time ids), at the embeddings' dtype and device.
pub type AddedConditioningFn<'a> =
    dyn Fn(&PromptEmbeds, (Kind, Device)) -> Option<AddedConditioning> + 'a;

/// The whole run of a latent-diffusion pipeline: encode the prompt, prepare the task's latents,
/// denoise, decode, with `added` conditioning for the UNet.
pub fn run(
    ctx: &Context,
    components: &Components,
    params: &GenerateParams,
    configured: Configured,
    prompt_encoder: &dyn PromptEncoder,
    added: &AddedConditioningFn<'_>,
    observer: &dyn StepObserver,
) -> Result<Output> {
    let Configured {
        setup,
        mut scheduler,
        timesteps,
        controlnet_scale,
        safety_check,
    } = configured;
    let mut generator = Generator::new(params.seed);
    let mut timings = StageTimings::default();
    let mut warnings = Vec::new();
    let prompts = Prompts {
        prompt: &params.prompt,
        prompt_2: params.prompt_2.as_deref(),
        negative_prompt: params.negative_prompt.as_deref(),
        negative_prompt_2: params.negative_prompt_2.as_deref(),
        num_images: setup.num_images,
        guide: setup.guide(),
    };
    let embeds = timings.time("encode_prompt", || {
        prompt_encoder.encode(components, &prompts, &mut warnings)
    })?;
    let at = (embeds.embeds.kind(), embeds.embeds.device());
    let prepared = prepare(
        ctx,
        components,
        params,
        &setup,
        &timesteps,
        scheduler.as_ref(),
        &mut generator,
        at,
    )?;
    let added = added(&embeds, at);
    let controlnets = controlnet_scale
        .map(|default_scale| {
            ControlNets::prepare(
                params,
                setup.size,
                setup.space.scale_factor,
                setup.num_images,
                setup.guide(),
                default_scale,
                at.1,
            )
        })
        .transpose()?;
    let cond = Conditioning {
        encoder_hidden_states: Some(&embeds.embeds),
        added: added.as_ref(),
        image_embeds: None,
        text_embeds: None,
        class_labels: None,
        guidance_scale: setup.guidance_scale,
        controlnets: controlnets.as_ref(),
    };
    let latents = timings.time("denoise", || {
        denoise(
            components,
            "unet",
            &cond,
            &prepared,
            &timesteps,
            scheduler.as_mut(),
            &mut generator,
            observer,
        )
    })?;
    timings.steps = timesteps.len() as u32;
    finish(
        components,
        &setup.space,
        latents,
        params.output_type,
        safety_check.as_ref(),
        timings,
        warnings,
    )
}

/// The task's starting latents.
#[allow(clippy::too_many_arguments)]
pub fn prepare(
    ctx: &Context,
    components: &Components,
    params: &GenerateParams,
    setup: &Setup,
    timesteps: &[f64],
    scheduler: &dyn Scheduler,
    generator: &mut Generator,
    at: (Kind, Device),
) -> Result<Prepared> {
    let vae = components.vae("vae");
    // `denoising_start` hands over latents mid-schedule: they are not noised again.
    let add_noise = !matches!(setup.start, Start::Fraction(_));
    let image = || {
        params
            .image
            .as_ref()
            .ok_or_else(|| PipelineError::invalid("image", "is required for this task"))
    };
    match ctx.task {
        Task::Text2Img => Ok(latents::text2img(
            &setup.space,
            setup.num_images,
            setup.size,
            scheduler,
            generator,
            at,
        )),
        Task::Img2Img => latents::img2img(
            &vae,
            &setup.space,
            image()?,
            setup.size,
            setup.num_images,
            timesteps[0],
            add_noise,
            scheduler,
            generator,
            at,
        ),
        Task::Inpaint => {
            let mask = params
                .mask_image
                .as_ref()
                .ok_or_else(|| PipelineError::invalid("mask_image", "is required for this task"))?;
            latents::inpaint(
                &vae,
                &setup.space,
                &InpaintInputs {
                    image: image()?,
                    mask,
                    size: setup.size,
                    num_images: setup.num_images,
                    strength: setup.strength,
                    add_noise,
                    unet_in_channels: setup.unet_in_channels,
                    guide: setup.guide(),
                },
                timesteps[0],
                scheduler,
                generator,
                at,
            )
        }
    }
}

/// The end of a run: decoded images (through the safety check, if any), or the latents for
/// `output_type="latent"` (which diffusers never checks).
pub fn finish(
    components: &Components,
    space: &LatentSpace,
    latents: Tensor,
    output_type: OutputType,
    safety_check: Option<&SafetyCheck>,
    mut timings: StageTimings,
    warnings: Vec<String>,
) -> Result<Output> {
    if output_type == OutputType::Latent {
        return Ok(Output {
            images: Vec::new(),
            images_f32: None,
            latents: Some(latents),
            nsfw_content_detected: None,
            watermark_detected: None,
            timings,
            warnings,
        });
    }
    let mut decoded = timings.time("decode", || {
        latents::decode(&components.vae("vae"), space, &latents)
    })?;
    let nsfw_content_detected = safety_check
        .map(|check| {
            timings.time("safety_checker", || {
                check.run(components, &mut decoded.images_f32, &mut decoded.images)
            })
        })
        .transpose()?
        .map(|flags| flags.nsfw);
    Ok(Output {
        images: decoded.images,
        images_f32: Some(decoded.images_f32),
        latents: None,
        nsfw_content_detected,
        watermark_detected: None,
        timings,
        warnings,
    })
}
