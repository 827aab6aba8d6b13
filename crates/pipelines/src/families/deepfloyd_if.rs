//! DeepFloyd IF: diffusers' `IFPipeline`, `IFImg2ImgPipeline` and `IFInpaintingPipeline`
//! (diffusers/pipelines/deepfloyd_if/, 0.42.1), and with `upscale_model` the matching
//! `IFSuperResolutionPipeline`, `IFImg2ImgSuperResolutionPipeline` or
//! `IFInpaintingSuperResolutionPipeline` on stage I's images, chained as diffusers' documentation
//! chains them: the prompt encoded once by stage I's T5 (`encode_prompt`), stage I's images handed
//! over unquantized (`output_type="pt"`), one generator through both stages.
//!
//! IF denoises pixels: a T5 conditions a UNet that predicts noise and a learned variance (the
//! DDPM's `learned_range`), so the shared loop runs on images, not VAE latents. Where IF differs
//! from the latent-diffusion pipelines: its own image and mask preprocessing (Pillow bicubic to the
//! UNet's `sample_size` keeping the aspect ratio), the inpainting blend that keeps the unmasked
//! pixels at their value before each step ([`Blend::KeepPrevious`]), and stage II's input: the
//! bilinearly upscaled stage I image, noised to `noise_level` by `image_noising_scheduler`, beside
//! the noisy image, with the noise level as the UNet's `class_labels`.
//!
//! A checkpoint that ships IF's `safety_checker` (with its `feature_extractor`) and `watermarker`
//! runs them as every IF pipeline does on its PIL output: the checker first (NSFW or watermark hits
//! come back black), then the watermark on every image, black ones included, placed for the last
//! stage's UNet `sample_size`. With `upscale_model` the chain's final images go through the request
//! checkpoint's modules (diffusers' documentation hands stage I's modules on down the chain; the
//! IF-II repos ship the same ones). `skip_safety_checker` skips the checker, not the watermark, as
//! diffusers' `safety_checker=None` does.

use crate::steps::components::Components;
use crate::steps::denoise::{denoise, Conditioning};
use crate::steps::image;
use crate::steps::latents::{Blend, Prepared};
use crate::steps::pil::{self, Filter};
use crate::steps::prompt::{PromptEncoder, Prompts, T5Prompt};
use crate::steps::safety_checker::{SafetyCheck, FEATURE_EXTRACTOR, SAFETY_CHECKER};
use crate::steps::schedule::{self, Start};
use crate::steps::watermark::{Watermark, WATERMARKER};
use crate::{
    as_python_float, Chain, Context, GenerateParams, InitImage, Output, OutputType, Pipeline,
    PipelineError, Result, StageTimings, StepObserver, Task,
};
use autopipe_auto::{Family, Resolution};
use autopipe_rng::Generator;
use autopipe_schedulers::Scheduler;
use serde_json::Value;
use tch::{Kind, Tensor};

/// The DeepFloyd IF family (stage I pipelines, stage II chained).
pub struct DeepFloydIF;

/// The prefix of stage II's components in the connected checkpoint.
const UPSCALE: &str = "upscale";
/// The `model_index.json` class of a stage II checkpoint (the IF-II repos).
const STAGE_II_CLASS: &str = "IFSuperResolutionPipeline";
/// The image channels both stages denoise (RGB).
const IMAGE_CHANNELS: i64 = 3;

/// A pipeline's call-argument defaults.
struct Defaults {
    steps: u32,
    guidance_scale: f64,
    strength: f64,
    noise_level: u32,
}

/// `IFPipeline`, `IFImg2ImgPipeline`, `IFInpaintingPipeline`.
fn stage_i_defaults(task: Task) -> Defaults {
    match task {
        Task::Text2Img => Defaults {
            steps: 100,
            guidance_scale: 7.0,
            strength: 1.0,
            noise_level: 0,
        },
        Task::Img2Img => Defaults {
            steps: 80,
            guidance_scale: 10.0,
            strength: 0.7,
            noise_level: 0,
        },
        Task::Inpaint => Defaults {
            steps: 50,
            guidance_scale: 7.0,
            strength: 1.0,
            noise_level: 0,
        },
    }
}

/// `IFSuperResolutionPipeline`, `IFImg2ImgSuperResolutionPipeline`,
/// `IFInpaintingSuperResolutionPipeline`.
fn stage_ii_defaults(task: Task) -> Defaults {
    match task {
        Task::Text2Img => Defaults {
            steps: 50,
            guidance_scale: 4.0,
            strength: 1.0,
            noise_level: 250,
        },
        Task::Img2Img => Defaults {
            steps: 50,
            guidance_scale: 4.0,
            strength: 0.8,
            noise_level: 250,
        },
        Task::Inpaint => Defaults {
            steps: 100,
            guidance_scale: 4.0,
            strength: 0.8,
            noise_level: 0,
        },
    }
}

/// The size diffusers' deepfloyd_if `resize` gives an input image for a UNet of `sample_size`:
/// `sample_size` on the short side, `round(sample_size / 8 * aspect) * 8` on the long one
/// (Python's round: half to even).
fn resized_size((w, h): (u32, u32), sample_size: u32) -> (u32, u32) {
    let coef = w as f64 / h as f64;
    let stretched = |c: f64| ((sample_size as f64 / 8.0 * c).round_ties_even() * 8.0) as u32;
    if coef >= 1.0 {
        (stretched(coef), sample_size)
    } else {
        (sample_size, stretched(1.0 / coef))
    }
}

/// `preprocess_image` / `preprocess_original_image` for a PIL image: RGB, resized (Pillow
/// bicubic) to `size`, `x / 127.5 - 1`: [1, 3, H, W] float32.
fn preprocess_image(img: &::image::DynamicImage, (w, h): (u32, u32)) -> Tensor {
    let rgb = img.to_rgb8();
    let rgb = if rgb.dimensions() == (w, h) {
        rgb
    } else {
        pil::resize(&rgb, w, h, Filter::Bicubic)
    };
    let (wu, hu) = (w as usize, h as usize);
    let mut chw = vec![0f32; 3 * hu * wu];
    for (i, px) in rgb.as_raw().chunks_exact(3).enumerate() {
        for (c, &v) in px.iter().enumerate() {
            chw[c * hu * wu + i] = v as f32 / 127.5 - 1.0;
        }
    }
    Tensor::from_slice(&chw).reshape([1, 3, h as i64, w as i64])
}

/// `preprocess_mask_image` for a PIL image: `convert("L")`, resized (Pillow bicubic) to `size`,
/// `/ 255`, binarized at 0.5: [1, 1, H, W] float32, 1 = repaint.
fn preprocess_mask(img: &::image::DynamicImage, (w, h): (u32, u32)) -> Tensor {
    let gray = image::pil_luma(img);
    let gray = if gray.dimensions() == (w, h) {
        gray
    } else {
        pil::resize_gray(&gray, w, h, Filter::Bicubic)
    };
    let binary: Vec<f32> = gray
        .as_raw()
        .iter()
        .map(|&v| if v as f32 / 255.0 >= 0.5 { 1.0 } else { 0.0 })
        .collect();
    Tensor::from_slice(&binary).reshape([1, 1, h as i64, w as i64])
}

/// One stage's denoising, configured.
struct Stage {
    /// The UNet's lease name.
    unet: &'static str,
    /// (width, height) it denoises at.
    size: (u32, u32),
    /// The UNet's `sample_size` (what the watermark is placed for).
    sample_size: u32,
    guidance_scale: f64,
    scheduler: Box<dyn Scheduler>,
    timesteps: Vec<f64>,
}

impl Stage {
    fn guide(&self) -> bool {
        self.guidance_scale > 1.0
    }
}

/// Stage II beside its stage: the noising of the upscaled image.
struct Upscale {
    stage: Stage,
    image_noising_scheduler: Box<dyn Scheduler>,
    noise_level: u32,
}

/// What a request resolves to before any component runs.
struct Configured {
    stage_i: Stage,
    upscale: Option<Upscale>,
    num_images: i64,
    safety_check: Option<SafetyCheck>,
    watermark: Option<Watermark>,
}

/// A UNet's `config.json` fields IF reads.
struct UnetConfig {
    in_channels: i64,
    sample_size: u32,
    /// Each side must be a multiple of this (2 ** resampling blocks): the resampling resnets
    /// upsample by exactly 2, so other sizes break the skip connections (in diffusers too).
    multiple: u32,
}

fn unet_config(ctx: &Context, component: &str, field: &'static str) -> Result<UnetConfig> {
    let unet = ctx.checkpoint.read_json(component, "config.json")?;
    let int = |k: &str| unet.get(k).and_then(Value::as_i64);
    let sample_size = int("sample_size").filter(|&s| s > 0).ok_or_else(|| {
        PipelineError::invalid(
            field,
            format!("{component} has no sample_size (IF takes its default size from it)"),
        )
    })?;
    let blocks = unet
        .get("down_block_types")
        .and_then(Value::as_array)
        .map_or(4, Vec::len)
        .max(1);
    Ok(UnetConfig {
        in_channels: int("in_channels").unwrap_or(4),
        sample_size: sample_size as u32,
        multiple: 1 << (blocks - 1),
    })
}

/// Checks a side of `size` fits `unet`; `field` names what chose it.
fn check_side(side: u32, unet: &UnetConfig, field: &'static str, what: &str) -> Result<()> {
    let m = unet.multiple;
    if side == 0 || !side.is_multiple_of(m) {
        return Err(PipelineError::invalid(
            field,
            format!(
                "{what} must be a positive multiple of {m} for this UNet (its resampling blocks halve and double exactly), got {side}"
            ),
        ));
    }
    Ok(())
}

/// Checks an input image's resized `size` fits `unet` (`field` names the model or image).
fn check_resized(size: (u32, u32), unet: &UnetConfig, field: &'static str) -> Result<()> {
    check_side(size.0, unet, field, "the resized image's width")?;
    check_side(size.1, unet, field, "the resized image's height")
}

/// The request's image (img2img, inpaint).
fn init_image(params: &GenerateParams) -> Result<&::image::DynamicImage> {
    match &params.image {
        Some(InitImage::Pixels(img)) => Ok(img),
        _ => Err(PipelineError::invalid("image", "is required for this task")),
    }
}

fn mask_image(params: &GenerateParams) -> Result<&::image::DynamicImage> {
    params
        .mask_image
        .as_ref()
        .ok_or_else(|| PipelineError::invalid("mask_image", "is required for this task"))
}

/// A strength argument checked as diffusers' `check_inputs` would need it.
fn strength(v: Option<f32>, default: f64) -> Result<f64> {
    let s = v.map(as_python_float).unwrap_or(default);
    if !(0.0..=1.0).contains(&s) {
        return Err(PipelineError::invalid(
            "strength",
            format!("must be in [0.0, 1.0], got {s}"),
        ));
    }
    Ok(s)
}

impl DeepFloydIF {
    fn configure(&self, ctx: &Context, params: &GenerateParams) -> Result<Configured> {
        let pipeline = ctx.resolution.pipeline;
        let task = ctx.task;
        let not_an_argument =
            |field| PipelineError::invalid(field, format!("is not an argument of {pipeline}"));
        if let Some(field) = params
            .first_sdxl_field()
            .or(params.first_controlnet_field())
            .or(params.first_prior_field())
        {
            return Err(not_an_argument(field));
        }
        if task != Task::Text2Img {
            for (field, set) in [("width", params.width), ("height", params.height)] {
                if set.is_some() {
                    return Err(PipelineError::invalid(
                        field,
                        format!("{pipeline} takes its size from the image (its __call__ has no width or height)"),
                    ));
                }
            }
        }
        if params.output_type == OutputType::Latent {
            return Err(PipelineError::invalid(
                "output_type",
                "DeepFloyd IF denoises pixels: it has no latents to return",
            ));
        }
        if matches!(params.image, Some(InitImage::Latents(_))) {
            return Err(PipelineError::invalid(
                "image_latents",
                format!("{pipeline} takes an image, not latents"),
            ));
        }
        if params.clean_caption {
            return Err(PipelineError::invalid(
                "clean_caption",
                "caption cleaning (diffusers' bs4 + ftfy path) is not implemented; leave it false, as diffusers runs without those packages (lower-cased, stripped prompts)",
            ));
        }
        if params.upscale_model.is_none() {
            for (field, set) in [
                ("noise_level", params.noise_level.is_some()),
                (
                    "upscale_num_inference_steps",
                    params.upscale_num_inference_steps.is_some(),
                ),
                (
                    "upscale_guidance_scale",
                    params.upscale_guidance_scale.is_some(),
                ),
            ] {
                if set {
                    return Err(PipelineError::invalid(
                        field,
                        "is a stage II argument: it needs upscale_model (a DeepFloyd IF super-resolution checkpoint)",
                    ));
                }
            }
        }
        for component in ["tokenizer", "text_encoder"] {
            if ctx.checkpoint.index().component_class(component).is_none() {
                return Err(PipelineError::invalid(
                    "model",
                    format!("{pipeline} encodes the prompt with the checkpoint's {component}, which model_index.json does not provide"),
                ));
            }
        }

        let defaults = stage_i_defaults(task);
        let unet = unet_config(ctx, "unet", "model")?;
        if unet.in_channels != IMAGE_CHANNELS {
            return Err(PipelineError::invalid(
                "model",
                format!(
                    "a DeepFloyd IF stage I unet denoises RGB images ({IMAGE_CHANNELS} input channels); this one takes {}",
                    unet.in_channels
                ),
            ));
        }
        let size = match task {
            Task::Text2Img => {
                let size = (
                    params.width.unwrap_or(unet.sample_size),
                    params.height.unwrap_or(unet.sample_size),
                );
                check_side(size.0, &unet, "width", "width")?;
                check_side(size.1, &unet, "height", "height")?;
                size
            }
            _ => {
                let img = init_image(params)?;
                let size = resized_size((img.width(), img.height()), unet.sample_size);
                check_resized(size, &unet, "image")?;
                size
            }
        };
        if task == Task::Inpaint {
            mask_image(params)?;
        }
        let strength = match task {
            Task::Text2Img => 1.0,
            _ => strength(params.strength, defaults.strength)?,
        };
        let mut stage_params = params.clone();
        stage_params.num_inference_steps =
            Some(params.num_inference_steps.unwrap_or(defaults.steps));
        let mut scheduler = schedule::build(ctx.checkpoint, &stage_params, |_| {})?;
        let start = match task {
            Task::Text2Img => Start::Full,
            _ => Start::Strength(strength),
        };
        let timesteps = schedule::select(scheduler.as_mut(), &stage_params, start, None)?;
        let stage_i = Stage {
            unet: "unet",
            size,
            sample_size: unet.sample_size,
            guidance_scale: params
                .guidance_scale
                .map(as_python_float)
                .unwrap_or(defaults.guidance_scale),
            scheduler,
            timesteps,
        };
        let upscale = match &params.upscale_model {
            Some(_) => Some(self.configure_upscale(ctx, params)?),
            None => None,
        };
        let last_sample_size = upscale
            .as_ref()
            .map_or(stage_i.sample_size, |u| u.stage.sample_size);
        Ok(Configured {
            stage_i,
            upscale,
            num_images: params.num_images_per_prompt.unwrap_or(1).max(1) as i64,
            safety_check: SafetyCheck::configure(ctx, params)?,
            watermark: Watermark::configure(ctx, last_sample_size),
        })
    }

    /// Stage II: its UNet fits stage I's images, `noise_level` is a timestep of its noising
    /// scheduler, its schedule has steps to run.
    fn configure_upscale(&self, ctx: &Context, params: &GenerateParams) -> Result<Upscale> {
        let task = ctx.task;
        let defaults = stage_ii_defaults(task);
        let field = "upscale_model";
        let unet_name = "upscale_unet";
        let unet = unet_config(ctx, unet_name, field)?;
        if unet.in_channels != 2 * IMAGE_CHANNELS {
            return Err(PipelineError::invalid(
                field,
                format!(
                    "a DeepFloyd IF stage II unet takes {} input channels (the noisy image and the upscaled one); this one takes {}",
                    2 * IMAGE_CHANNELS,
                    unet.in_channels
                ),
            ));
        }
        let size = match task {
            Task::Text2Img => (unet.sample_size, unet.sample_size),
            _ => {
                let img = init_image(params)?;
                resized_size((img.width(), img.height()), unet.sample_size)
            }
        };
        check_resized(size, &unet, field)?;
        let image_noising_scheduler =
            schedule::build_saved(ctx.checkpoint, "upscale_image_noising_scheduler", None)?;
        let noise_level = params.noise_level.unwrap_or(defaults.noise_level);
        let train = image_noising_scheduler.config().num_train_timesteps;
        if noise_level as usize >= train {
            return Err(PipelineError::invalid(
                "noise_level",
                format!("`noise_level`: {noise_level} must be a valid timestep in `self.noising_scheduler`, [0, {train})"),
            ));
        }
        let steps = params.upscale_num_inference_steps.unwrap_or(defaults.steps);
        let steps_field = "upscale_num_inference_steps";
        let mut scheduler = schedule::build_saved(
            ctx.checkpoint,
            "upscale_scheduler",
            Some((steps as usize, steps_field)),
        )?;
        let stage_params = GenerateParams {
            num_inference_steps: Some(steps),
            ..GenerateParams::default()
        };
        let start = match task {
            Task::Text2Img => Start::Full,
            _ => Start::Strength(defaults.strength),
        };
        // Stage II's own schedule: any step-count problem is its steps field's.
        let timesteps = schedule::select(scheduler.as_mut(), &stage_params, start, None).map_err(
            |e| match e {
                PipelineError::InvalidArgument { message, .. } => {
                    PipelineError::invalid(steps_field, message)
                }
                other => other,
            },
        )?;
        Ok(Upscale {
            stage: Stage {
                unet: unet_name,
                size,
                sample_size: unet.sample_size,
                guidance_scale: params
                    .upscale_guidance_scale
                    .map(as_python_float)
                    .unwrap_or(defaults.guidance_scale),
                scheduler,
                timesteps,
            },
            image_noising_scheduler,
            noise_level,
        })
    }
}

/// Stage II's conditioning image: stage I's images upscaled (`F.interpolate(image, (height,
/// width), mode="bilinear", align_corners=True)`) and noised to `noise_level`.
struct Upscaled<'a> {
    images: &'a Tensor,
    image_noising_scheduler: &'a dyn Scheduler,
    noise_level: u32,
}

/// Runs one stage: the task's starting images (diffusers' `prepare_intermediate_images`), stage
/// II's upscaled input, the denoising loop. `embeds` is the text conditioning already in the
/// stage's CFG form; `image` / `mask` the request's, resized for this stage.
#[allow(clippy::too_many_arguments)]
fn run_stage(
    components: &Components,
    task: Task,
    stage: &mut Stage,
    embeds: &Tensor,
    num_images: i64,
    inputs: Option<(Tensor, Option<Tensor>)>,
    upscaled: Option<Upscaled>,
    generator: &mut Generator,
    observer: &dyn StepObserver,
) -> Result<Tensor> {
    let (kind, device) = (embeds.kind(), embeds.device());
    let (w, h) = stage.size;
    let shape = [num_images, IMAGE_CHANNELS, h as i64, w as i64];
    let guide = stage.guide();
    let scheduler = stage.scheduler.as_mut();
    let mut prepared = match (task, inputs) {
        (Task::Text2Img, _) => {
            Prepared::plain(generator.randn(&shape, kind, device) * scheduler.init_noise_sigma())
        }
        (_, Some((image, mask))) => {
            let noise = generator.randn(&shape, kind, device);
            let image = image.to_device(device).to_kind(kind);
            let image = image.repeat([num_images, 1, 1, 1]);
            let noised = scheduler.add_noise(&image, &noise, stage.timesteps[0]);
            match mask {
                None => Prepared::plain(noised),
                Some(mask) => {
                    let mask = mask
                        .to_device(device)
                        .to_kind(kind)
                        .repeat([num_images, 1, 1, 1]);
                    let latents = (1.0 - &mask) * &image + &mask * noised;
                    Prepared {
                        latents,
                        blend: Some(Blend::KeepPrevious { mask }),
                        unet_extra: None,
                    }
                }
            }
        }
        (_, None) => return Err(PipelineError::invalid("image", "is required for this task")),
    };
    let class_labels = match upscaled {
        None => None,
        Some(up) => {
            let images = up.images.to_device(device).to_kind(kind);
            let images = images.upsample_bilinear2d([h as i64, w as i64], true, None, None);
            let noise = generator.randn(&images.size(), kind, device);
            let images =
                up.image_noising_scheduler
                    .add_noise(&images, &noise, up.noise_level as f64);
            prepared.unet_extra = Some(if guide {
                Tensor::cat(&[&images, &images], 0)
            } else {
                images
            });
            let n = if guide { 2 * num_images } else { num_images };
            Some(Tensor::full(
                [n],
                up.noise_level as i64,
                (Kind::Int64, device),
            ))
        }
    };
    let cond = Conditioning {
        encoder_hidden_states: Some(embeds),
        added: None,
        image_embeds: None,
        text_embeds: None,
        class_labels: class_labels.as_ref(),
        guidance_scale: stage.guidance_scale,
        controlnets: None,
    };
    denoise(
        components,
        stage.unet,
        &cond,
        &prepared,
        &stage.timesteps,
        scheduler,
        generator,
        observer,
    )
}

/// The stage's text conditioning from embeddings computed for `guide_any` (`[negative; positive]`
/// when any stage guides): the positive half alone for a stage that does not guide.
fn stage_embeds(embeds: &Tensor, guide_any: bool, stage: &Stage) -> Tensor {
    if guide_any && !stage.guide() {
        embeds.chunk(2, 0)[1].shallow_clone()
    } else {
        embeds.shallow_clone()
    }
}

impl Pipeline for DeepFloydIF {
    fn family(&self) -> Family {
        Family::DeepFloydIF
    }

    fn optional_components(&self) -> &'static [&'static str] {
        // Optional in IFPipeline (IF-II repos load without them); stage I needs both.
        &[
            "tokenizer",
            "text_encoder",
            SAFETY_CHECKER,
            FEATURE_EXTRACTOR,
            WATERMARKER,
        ]
    }

    fn warm_up(&self, ctx: &Context) -> Result<()> {
        ctx.tokenizers.t5(ctx.checkpoint, "tokenizer").map(drop)
    }

    fn chain(&self, _resolution: &Resolution, params: &GenerateParams) -> Result<Option<Chain>> {
        Ok(params.upscale_model.as_ref().map(|model| Chain {
            field: "upscale_model",
            model: model.clone(),
            prefix: UPSCALE,
            classes: &[STAGE_II_CLASS],
            leased: &["upscale_unet"],
            folders: &[
                "upscale_unet",
                "upscale_scheduler",
                "upscale_image_noising_scheduler",
            ],
        }))
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
        let Configured {
            mut stage_i,
            mut upscale,
            num_images,
            safety_check,
            watermark,
        } = self.configure(ctx, params)?;
        let mut generator = Generator::new(params.seed);
        let mut timings = StageTimings::default();
        let mut warnings = Vec::new();
        let task = ctx.task;

        // The prompt, encoded once for both stages.
        let guide_any = stage_i.guide() || upscale.as_ref().is_some_and(|u| u.stage.guide());
        let encoder = T5Prompt {
            tokenizer: ctx.tokenizers.t5(ctx.checkpoint, "tokenizer")?,
            encoder: "text_encoder",
        };
        let prompts = Prompts {
            prompt: &params.prompt,
            prompt_2: None,
            negative_prompt: params.negative_prompt.as_deref(),
            negative_prompt_2: None,
            num_images,
            guide: guide_any,
        };
        let embeds = timings
            .time("encode_prompt", || {
                encoder.encode(components, &prompts, &mut warnings)
            })?
            .embeds;

        let inputs = |size: (u32, u32)| -> Result<Option<(Tensor, Option<Tensor>)>> {
            Ok(match task {
                Task::Text2Img => None,
                Task::Img2Img => Some((preprocess_image(init_image(params)?, size), None)),
                Task::Inpaint => Some((
                    preprocess_image(init_image(params)?, size),
                    Some(preprocess_mask(mask_image(params)?, size)),
                )),
            })
        };
        let stage_i_inputs = inputs(stage_i.size)?;
        let stage_i_embeds = stage_embeds(&embeds, guide_any, &stage_i);
        let images = timings.time("denoise", || {
            run_stage(
                components,
                task,
                &mut stage_i,
                &stage_i_embeds,
                num_images,
                stage_i_inputs,
                None,
                &mut generator,
                observer,
            )
        })?;
        let mut steps = stage_i.timesteps.len();
        let images = match &mut upscale {
            None => images,
            Some(up) => {
                let stage_ii_inputs = inputs(up.stage.size)?;
                let stage_embeds = stage_embeds(&embeds, guide_any, &up.stage);
                steps += up.stage.timesteps.len();
                timings.time("upscale_denoise", || {
                    run_stage(
                        components,
                        task,
                        &mut up.stage,
                        &stage_embeds,
                        num_images,
                        stage_ii_inputs,
                        Some(Upscaled {
                            images: &images,
                            image_noising_scheduler: up.image_noising_scheduler.as_ref(),
                            noise_level: up.noise_level,
                        }),
                        &mut generator,
                        observer,
                    )
                })?
            }
        };
        timings.steps = steps as u32;
        let (mut images_f32, mut images) =
            timings.time("postprocess", || image::postprocess(&images))?;
        let flags = safety_check
            .map(|check| {
                timings.time("safety_checker", || {
                    check.run(components, &mut images_f32, &mut images)
                })
            })
            .transpose()?;
        if let Some(watermark) = &watermark {
            images = timings.time("watermark", || watermark.run(components, &images_f32))?;
        }
        let (nsfw_content_detected, watermark_detected) =
            flags.map_or((None, None), |f| (Some(f.nsfw), f.watermark));
        Ok(Output {
            images,
            images_f32: Some(images_f32),
            latents: None,
            nsfw_content_detected,
            watermark_detected,
            timings,
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_keeps_the_aspect_ratio_as_diffusers() {
        // deepfloyd_if's resize(): coef = w / h; the long side round(size / 8 * coef) * 8.
        assert_eq!(resized_size((64, 64), 32), (32, 32));
        assert_eq!(resized_size((64, 48), 32), (40, 32));
        assert_eq!(resized_size((48, 64), 32), (32, 40));
        // 32 / 8 * 1.125 = 4.5 rounds half to even: 4 * 8.
        assert_eq!(resized_size((72, 64), 32), (32, 32));
        assert_eq!(resized_size((1024, 512), 64), (128, 64));
    }

    #[test]
    fn the_mask_binarizes_at_half() {
        let img = ::image::DynamicImage::ImageLuma8(::image::GrayImage::from_fn(4, 1, |x, _| {
            ::image::Luma([[0, 127, 128, 255][x as usize]])
        }));
        let m = Vec::<f32>::try_from(preprocess_mask(&img, (4, 1)).flatten(0, -1)).unwrap();
        assert_eq!(m, vec![0.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn images_normalize_as_numpy() {
        let img = ::image::DynamicImage::ImageRgb8(::image::RgbImage::from_fn(2, 1, |x, _| {
            ::image::Rgb([[0, 255][x as usize], 128, 0])
        }));
        let t = Vec::<f32>::try_from(preprocess_image(&img, (2, 1)).flatten(0, -1)).unwrap();
        assert_eq!(
            t,
            vec![
                -1.0,
                1.0,
                128.0 / 127.5 - 1.0,
                128.0 / 127.5 - 1.0,
                -1.0,
                -1.0
            ]
        );
    }
}
