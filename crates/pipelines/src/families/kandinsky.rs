//! Kandinsky 2.1 and 2.2: diffusers' `KandinskyCombinedPipeline`, `KandinskyImg2ImgCombinedPipeline`,
//! `KandinskyInpaintCombinedPipeline` (diffusers/pipelines/kandinsky/, 0.42.1) and their V22
//! equivalents (diffusers/pipelines/kandinsky2_2/): the prior (`KandinskyPriorPipeline` /
//! `KandinskyV22PriorPipeline`, the same computation: prompt → CLIP image embeddings) then the
//! decoder (image embeddings → MoVQ latents → image). The prior's components are the checkpoint's
//! `prior_*` slots (a Combined folder, or the prior connected from the decoder's model card, see
//! `autopipe_repo::Checkpoint::connect`).
//!
//! Where 2.1's decoder differs: it also reads the prompt (XLM-R tokenizer + `MultilingualCLIP`;
//! the Combined pipeline passes it no negative prompt, so its negative text is ""), its UNet adds
//! `text_image` embeddings, img2img noises the image latents on a fixed linear schedule of its own
//! (`KandinskyImg2ImgPipeline.add_noise`), and inpainting has no per-step blend.

use crate::steps::components::{Components, PriorConditioning};
use crate::steps::denoise::{denoise, denoise_with, Conditioning, PriorDenoiser};
use crate::steps::image;
use crate::steps::latents::{Blend, LatentSpace, Prepared};
use crate::steps::schedule::{self, Start};
use crate::{
    as_python_float, Context, GenerateParams, InitImage, Output, OutputType, Pipeline,
    PipelineError, Result, StageTimings, StepObserver, Task,
};
use autopipe_auto::Family;
use autopipe_rng::Generator;
use autopipe_schedulers::Scheduler;
use autopipe_tokenizer::{ClipTokenizer, PretrainedTokenizer};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// The Kandinsky family of one version.
pub enum Kandinsky {
    /// Kandinsky 2.1 (`KandinskyCombinedPipeline`, …).
    V21,
    /// Kandinsky 2.2 (`KandinskyV22CombinedPipeline`, …).
    V22,
}

/// The Combined pipelines' call defaults.
const STEPS: u32 = 100;
const GUIDANCE: f64 = 4.0;
const SIZE: u32 = 512;
const IMG2IMG_STRENGTH: f64 = 0.3;
const PRIOR_STEPS: u32 = 25;
const PRIOR_GUIDANCE: f64 = 4.0;
/// `KandinskyPipeline._encode_prompt`'s `max_length`.
const DECODER_MAX_LENGTH: usize = 77;

/// What a request resolves to before any component runs.
struct Configured {
    space: LatentSpace,
    /// (width, height) as the decoder takes them.
    size: (u32, u32),
    num_images: i64,
    guidance_scale: f64,
    prior_guidance_scale: f64,
    scheduler: Box<dyn Scheduler>,
    timesteps: Vec<f64>,
    prior_scheduler: Box<dyn Scheduler>,
    /// `prior.config.embedding_dim`.
    embedding_dim: i64,
    /// `image_encoder.config.image_size` (for the zero image).
    image_size: i64,
    /// 2.1 img2img: the timestep `add_noise` noises the image latents to.
    latent_timestep: i64,
}

/// `downscale_height_and_width`: the latent side for a pixel side (rounded up to whole
/// `scale_factor ** 2` pixel blocks).
fn downscale(side: u32, scale_factor: u32) -> i64 {
    let block = scale_factor * scale_factor;
    (side.div_ceil(block) * scale_factor) as i64
}

fn int(v: &Value, key: &str) -> Option<i64> {
    v.get(key).and_then(Value::as_i64)
}

/// The prior's scheduler (`prior_scheduler`) with `prior_num_inference_steps` set.
fn prior_scheduler(ctx: &Context, steps: u32) -> Result<Box<dyn Scheduler>> {
    let config = ctx
        .checkpoint
        .read_json("prior_scheduler", "scheduler_config.json")?;
    let class = config
        .get("_class_name")
        .and_then(Value::as_str)
        .unwrap_or("UnCLIPScheduler")
        .to_string();
    let mut scheduler = autopipe_schedulers::from_config(&class, &config)?;
    scheduler
        .set_timesteps(steps as usize)
        .map_err(|e| PipelineError::invalid("prior_num_inference_steps", e.to_string()))?;
    Ok(scheduler)
}

impl Kandinsky {
    /// The UNet's `addition_embed_type` for this version.
    fn addition_embed_type(&self) -> &'static str {
        match self {
            Self::V21 => "text_image",
            Self::V22 => "image",
        }
    }

    fn configure(&self, ctx: &Context, params: &GenerateParams) -> Result<Configured> {
        let pipeline = ctx.resolution.pipeline;
        let not_an_argument =
            |field| PipelineError::invalid(field, format!("is not an argument of {pipeline}"));
        if let Some(field) = params
            .first_sdxl_field()
            .or(params.first_controlnet_field())
        {
            return Err(not_an_argument(field));
        }
        if ctx.task == Task::Inpaint && params.strength.is_some() {
            return Err(not_an_argument("strength"));
        }
        if matches!(params.image, Some(InitImage::Latents(_))) {
            return Err(PipelineError::invalid(
                "image_latents",
                format!("{pipeline} takes an image, not latents"),
            ));
        }
        let unet = ctx.checkpoint.read_json("unet", "config.json")?;
        let embed_type = self.addition_embed_type();
        if unet.get("addition_embed_type").and_then(Value::as_str) != Some(embed_type) {
            let version = match self {
                Self::V21 => "2.1",
                Self::V22 => "2.2",
            };
            return Err(PipelineError::invalid(
                "model",
                format!(
                    "a Kandinsky {version} unet must have addition_embed_type \"{embed_type}\""
                ),
            ));
        }
        let num_images = params.num_images_per_prompt.unwrap_or(1).max(1) as i64;
        if matches!(self, Self::V21) && ctx.task == Task::Img2Img && num_images > 1 {
            // KandinskyImg2ImgCombinedPipeline hands its decoder one image for several embeddings,
            // whose latents then fail `prepare_latents`' shape check.
            return Err(PipelineError::invalid(
                "num_images_per_prompt",
                format!("{pipeline} makes one image per prompt (diffusers fails on more), got {num_images}"),
            ));
        }
        let space = LatentSpace::read(ctx.checkpoint, "movq")?;
        let in_channels = int(&unet, "in_channels").unwrap_or(4);
        let inpaint_channels = 2 * space.channels + 1;
        match ctx.task {
            Task::Inpaint if in_channels != inpaint_channels => {
                return Err(PipelineError::invalid(
                    "model",
                    format!("inpainting needs a {inpaint_channels}-channel inpaint decoder (latents, masked image latents, mask); this unet takes {in_channels} input channels (diffusers fails on it too)"),
                ))
            }
            Task::Text2Img | Task::Img2Img if in_channels != space.channels => {
                return Err(PipelineError::invalid(
                    "task",
                    format!("this model's unet has {in_channels} input channels (an inpainting decoder); it can only run TASK_INPAINT"),
                ))
            }
            _ => {}
        }
        let width = params.width.unwrap_or(SIZE);
        let height = params.height.unwrap_or(SIZE);
        let sf = space.scale_factor;
        let size = match ctx.task {
            // The img2img processor rounds down to the MoVQ's scale factor.
            Task::Img2Img => (width - width % sf, height - height % sf),
            _ => (width, height),
        };
        for (field, side) in [("width", size.0), ("height", size.1)] {
            if side == 0 {
                return Err(PipelineError::invalid(
                    field,
                    format!("must be at least {sf} (the MoVQ's scale factor)"),
                ));
            }
            // The inpaint decoder concatenates the image latents to latents of the
            // `downscale_height_and_width` size: both agree only on whole sf² blocks.
            if ctx.task == Task::Inpaint && side % (sf * sf) != 0 {
                return Err(PipelineError::invalid(
                    field,
                    format!(
                        "must be a multiple of {} for inpainting with this MoVQ, got {side}",
                        sf * sf
                    ),
                ));
            }
        }
        let strength = match ctx.task {
            Task::Img2Img => params
                .strength
                .map(as_python_float)
                .unwrap_or(IMG2IMG_STRENGTH),
            _ => 1.0,
        };
        if !(0.0..=1.0).contains(&strength) {
            return Err(PipelineError::invalid(
                "strength",
                format!("must be in [0.0, 1.0], got {strength}"),
            ));
        }
        let mut params = params.clone();
        params.num_inference_steps = Some(params.num_inference_steps.unwrap_or(STEPS));
        let mut scheduler = schedule::build(ctx.checkpoint, &params, |_| {})?;
        let start = match ctx.task {
            Task::Img2Img => Start::Strength(strength),
            _ => Start::Full,
        };
        let timesteps = schedule::select(scheduler.as_mut(), &params, start, None)?;
        // `int(num_train_timesteps * strength) - 2`, from the original Kandinsky repo.
        let latent_timestep = (scheduler.config().num_train_timesteps as f64 * strength) as i64 - 2;
        let prior_steps = params.prior_num_inference_steps.unwrap_or(PRIOR_STEPS);
        let prior_scheduler = prior_scheduler(ctx, prior_steps)?;
        let prior = ctx.checkpoint.read_json("prior_prior", "config.json")?;
        let image_encoder = ctx
            .checkpoint
            .read_json("prior_image_encoder", "config.json")?;
        Ok(Configured {
            space,
            size,
            num_images,
            guidance_scale: params
                .guidance_scale
                .map(as_python_float)
                .unwrap_or(GUIDANCE),
            prior_guidance_scale: params
                .prior_guidance_scale
                .map(as_python_float)
                .unwrap_or(PRIOR_GUIDANCE),
            scheduler,
            timesteps,
            prior_scheduler,
            embedding_dim: int(&prior, "embedding_dim").unwrap_or(768),
            image_size: int(&image_encoder, "image_size").unwrap_or(224),
            latent_timestep,
        })
    }
}

/// Token ids and attention masks of `texts` as `[N, T]` batches (CLIP padding to
/// `model_max_length`), with diffusers' truncation warning for `warn_for`.
fn tokens(
    tokenizer: &ClipTokenizer,
    texts: &[&str],
    warn_for: Option<&str>,
    warnings: &mut Vec<String>,
) -> Result<(Tensor, Tensor)> {
    let max_len = tokenizer.model_max_length();
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for text in texts {
        let enc = tokenizer.encode(text)?;
        if enc.truncated && warn_for == Some(*text) {
            let warning = format!(
                "The following part of your input was truncated because CLIP can only handle sequences up to {max_len} tokens: {}",
                enc.removed_text
            );
            if !warnings.contains(&warning) {
                warnings.push(warning);
            }
        }
        ids.extend(enc.input_ids);
        mask.extend(enc.attention_mask.iter().map(|&m| m as u8));
    }
    let shape = [texts.len() as i64, max_len as i64];
    Ok((
        Tensor::from_slice(&ids).reshape(shape),
        Tensor::from_slice(&mask).reshape(shape),
    ))
}

/// `t.repeat_interleave(n, dim=0)`.
fn per_image(t: &Tensor, n: i64) -> Tensor {
    if n == 1 {
        t.shallow_clone()
    } else {
        t.repeat_interleave_self_int(n, 0, None)
    }
}

/// `KandinskyV22PriorPipeline._encode_prompt`: (text_embeds, last_hidden_state, mask), each
/// `[negative; positive]` when guiding.
fn encode_prior_prompt(
    components: &Components,
    tokenizer: &ClipTokenizer,
    prompts: &[&str],
    negatives: &[&str],
    num_images: i64,
    guide: bool,
    warnings: &mut Vec<String>,
) -> Result<PriorConditioning> {
    let encoder = components.text_encoder("prior_text_encoder");
    let encode = |texts: &[&str], warn: Option<&str>, warnings: &mut Vec<String>| -> Result<_> {
        let (ids, mask) = tokens(tokenizer, texts, warn, warnings)?;
        let out = encoder.encode(ids)?;
        let embeds = out.text_embeds.ok_or_else(|| {
            PipelineError::invalid(
                "model",
                "prior_text_encoder must be a CLIPTextModelWithProjection (text_embeds)",
            )
        })?;
        Ok((
            per_image(&embeds, num_images),
            per_image(&out.last_hidden_state, num_images),
            per_image(&mask.to_device(embeds.device()), num_images),
        ))
    };
    let (embeds, hidden, mask) = encode(prompts, Some(prompts[0]), warnings)?;
    if !guide {
        return Ok(PriorConditioning {
            proj_embedding: embeds,
            encoder_hidden_states: hidden,
            attention_mask: mask,
        });
    }
    let (neg_embeds, neg_hidden, neg_mask) = encode(negatives, None, warnings)?;
    Ok(PriorConditioning {
        proj_embedding: Tensor::cat(&[neg_embeds, embeds], 0),
        encoder_hidden_states: Tensor::cat(&[neg_hidden, hidden], 0),
        attention_mask: Tensor::cat(&[neg_mask, mask], 0),
    })
}

/// `KandinskyPipeline._encode_prompt` for the Combined pipeline's decoder call: `prompt` for each
/// of `n` images (and "" as each negative when guiding) through the XLM-R tokenizer and
/// `MultilingualCLIP`; (text_embeds, hidden states), each `[negative; positive]` when guiding.
fn encode_decoder_prompt(
    components: &Components,
    tokenizer: &PretrainedTokenizer,
    prompt: &str,
    n: i64,
    guide: bool,
    warnings: &mut Vec<String>,
) -> Result<(Tensor, Tensor)> {
    let texts: &[&str] = if guide { &["", prompt] } else { &[prompt] };
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for text in texts {
        let enc = tokenizer.encode(text, DECODER_MAX_LENGTH)?;
        if enc.truncated && *text == prompt {
            let warning = format!(
                "The following part of your input was truncated because CLIP can only handle sequences up to {} tokens: {}",
                tokenizer.model_max_length(),
                enc.removed_text
            );
            if !warnings.contains(&warning) {
                warnings.push(warning);
            }
        }
        ids.extend(enc.input_ids);
        mask.extend(enc.attention_mask);
    }
    let shape = [texts.len() as i64, DECODER_MAX_LENGTH as i64];
    let out = components
        .multilingual_text_encoder("text_encoder")
        .encode(
            Tensor::from_slice(&ids).reshape(shape),
            Tensor::from_slice(&mask).reshape(shape),
        )?;
    Ok((
        per_image(&out.text_embeds, n),
        per_image(&out.last_hidden_state, n),
    ))
}

/// `KandinskyImg2ImgPipeline.add_noise`: noising on the original repo's linear betas
/// (0.0001 to 0.02 over 1000 steps, float32), whatever the checkpoint's scheduler; a negative
/// `timestep` counts from the end, as Python indexing does.
fn add_noise_v21(original: &Tensor, noise: &Tensor, timestep: i64) -> Tensor {
    let betas = Tensor::linspace(0.0001, 0.02, 1000, (Kind::Float, Device::Cpu));
    let alphas_cumprod = (betas.neg() + 1.0).cumprod(0, Kind::Float);
    let index = if timestep < 0 {
        1000 + timestep
    } else {
        timestep
    };
    let alpha = alphas_cumprod
        .get(index)
        .to_device(original.device())
        .to_kind(original.kind());
    let sqrt_alpha = alpha.pow_tensor_scalar(0.5);
    let sqrt_one_minus_alpha = (alpha.neg() + 1.0).pow_tensor_scalar(0.5);
    sqrt_alpha * original + sqrt_one_minus_alpha * noise
}

/// `prepare_mask` of the inpaint decoder: every pixel to repaint (0 in the keep-mask) also
/// clears its neighbours above, left, above-left, below, right and below-right.
fn erode_keep_mask(mask: &Tensor) -> Result<Tensor> {
    let size = mask.size();
    let (h, w) = (size[2] as usize, size[3] as usize);
    let old = Vec::<f32>::try_from(mask.to_kind(Kind::Float).flatten(0, -1))?;
    let mut new = old.clone();
    for i in 0..h {
        for j in 0..w {
            if old[i * w + j] == 1.0 {
                continue;
            }
            let mut clear = |y: usize, x: usize| new[y * w + x] = 0.0;
            if i != 0 {
                clear(i - 1, j);
            }
            if j != 0 {
                clear(i, j - 1);
            }
            if i != 0 && j != 0 {
                clear(i - 1, j - 1);
            }
            if i + 1 != h {
                clear(i + 1, j);
            }
            if j + 1 != w {
                clear(i, j + 1);
            }
            if i + 1 != h && j + 1 != w {
                clear(i + 1, j + 1);
            }
        }
    }
    Ok(Tensor::from_slice(&new)
        .reshape(size.as_slice())
        .to_kind(mask.kind())
        .to_device(mask.device()))
}

impl Pipeline for Kandinsky {
    fn family(&self) -> Family {
        match self {
            Self::V21 => Family::Kandinsky21,
            Self::V22 => Family::Kandinsky22,
        }
    }

    fn validate(&self, ctx: &Context, params: &GenerateParams) -> Result<()> {
        self.configure(ctx, params)?;
        ctx.tokenizers.clip(ctx.checkpoint, "prior_tokenizer")?;
        if matches!(self, Self::V21) {
            ctx.tokenizers.pretrained(ctx.checkpoint, "tokenizer")?;
        }
        Ok(())
    }

    fn run(
        &self,
        ctx: &Context,
        components: &Components,
        params: &GenerateParams,
        observer: &dyn StepObserver,
    ) -> Result<Output> {
        let Configured {
            space,
            size: (width, height),
            num_images,
            guidance_scale,
            prior_guidance_scale,
            mut scheduler,
            timesteps,
            mut prior_scheduler,
            embedding_dim,
            image_size,
            latent_timestep,
        } = self.configure(ctx, params)?;
        let mut generator = Generator::new(params.seed);
        let mut timings = StageTimings::default();
        let mut warnings = Vec::new();

        // The prior (`KandinskyV22PriorPipeline.__call__`): a negative prompt joins the batch,
        // and its image embedding becomes the decoder's negative.
        let tokenizer = ctx.tokenizers.clip(ctx.checkpoint, "prior_tokenizer")?;
        let mut prompts = vec![params.prompt.as_str()];
        let negatives = match params.negative_prompt.as_deref() {
            Some(negative) => {
                prompts.push(negative);
                vec![negative, negative]
            }
            None => vec![""],
        };
        let prior_guide = prior_guidance_scale > 1.0;
        let cond = timings.time("encode_prompt", || {
            encode_prior_prompt(
                components,
                &tokenizer,
                &prompts,
                &negatives,
                num_images,
                prior_guide,
                &mut warnings,
            )
        })?;
        let at = (cond.proj_embedding.kind(), cond.proj_embedding.device());
        let batch = prompts.len() as i64 * num_images;
        let latents = generator.randn(&[batch, embedding_dim], at.0, at.1)
            * prior_scheduler.init_noise_sigma();
        let prior = components.prior("prior_prior");
        let prior_timesteps = prior_scheduler.timesteps().to_vec();
        let latents = timings.time("prior_denoise", || {
            denoise_with(
                &PriorDenoiser {
                    prior: &prior,
                    cond: &cond,
                },
                prior_guidance_scale,
                &Prepared::plain(latents),
                &prior_timesteps,
                prior_scheduler.as_mut(),
                &mut generator,
                observer,
            )
        })?;
        let image_embeds = prior.post_process_latents(latents)?;
        let (image_embeds, negative_embeds) = if params.negative_prompt.is_some() {
            let halves = image_embeds.chunk(2, 0);
            (halves[0].shallow_clone(), halves[1].shallow_clone())
        } else {
            // `get_zero_embed`: the image encoder's embedding of an all-zero image.
            let zeros = Tensor::zeros([1, 3, image_size, image_size], at);
            let zero = components
                .image_encoder("prior_image_encoder")
                .image_embeds(zeros)?;
            (image_embeds, zero.repeat([batch, 1]))
        };

        // The decoder.
        let guide = guidance_scale > 1.0;
        let n = image_embeds.size()[0];
        let at = (image_embeds.kind(), image_embeds.device());
        let text = match self {
            Self::V21 => {
                let tokenizer = ctx.tokenizers.pretrained(ctx.checkpoint, "tokenizer")?;
                Some(timings.time("encode_prompt", || {
                    encode_decoder_prompt(
                        components,
                        &tokenizer,
                        &params.prompt,
                        n,
                        guide,
                        &mut warnings,
                    )
                })?)
            }
            Self::V22 => None,
        };
        let embeds = if guide {
            Tensor::cat(&[&negative_embeds, &image_embeds], 0)
        } else {
            image_embeds.shallow_clone()
        };
        let movq = components.movq("movq");
        let image = || match &params.image {
            Some(InitImage::Pixels(img)) => Ok(img),
            _ => Err(PipelineError::invalid("image", "is required for this task")),
        };
        let prepared = match ctx.task {
            Task::Text2Img => {
                let shape = [
                    n,
                    space.channels,
                    downscale(height, space.scale_factor),
                    downscale(width, space.scale_factor),
                ];
                Prepared::plain(generator.randn(&shape, at.0, at.1) * scheduler.init_noise_sigma())
            }
            Task::Img2Img => {
                let pixels = image::preprocess_resampled(
                    image()?,
                    width,
                    height,
                    ::image::imageops::FilterType::CatmullRom,
                );
                let init = movq
                    .encode(pixels.to_device(at.1).to_kind(at.0))?
                    .to_kind(at.0);
                let init = init.repeat([n, 1, 1, 1]);
                match self {
                    Self::V21 => {
                        let init = init * scheduler.init_noise_sigma();
                        let noise = generator.randn(&init.size(), at.0, at.1);
                        Prepared::plain(add_noise_v21(&init, &noise, latent_timestep))
                    }
                    Self::V22 => {
                        let noise = generator.randn(&init.size(), at.0, at.1);
                        Prepared::plain(scheduler.add_noise(&init, &noise, timesteps[0]))
                    }
                }
            }
            Task::Inpaint => {
                let mask_image = params.mask_image.as_ref().ok_or_else(|| {
                    PipelineError::invalid("mask_image", "is required for this task")
                })?;
                let pixels = image::preprocess_resampled(
                    image()?,
                    width,
                    height,
                    ::image::imageops::FilterType::CatmullRom,
                );
                let keep: Tensor = 1.0 - image::preprocess_mask(mask_image, width, height);
                let image_latents = movq
                    .encode(pixels.to_device(at.1).to_kind(at.0))?
                    .to_kind(at.0);
                let ls = image_latents.size();
                let keep = keep.to_device(at.1).to_kind(at.0).upsample_nearest2d(
                    [ls[2], ls[3]],
                    None,
                    None,
                );
                let keep = erode_keep_mask(&keep)?;
                let masked = &image_latents * &keep;
                let (keep_n, masked_n) = (keep.repeat([n, 1, 1, 1]), masked.repeat([n, 1, 1, 1]));
                let extra = Tensor::cat(&[masked_n, keep_n], 1);
                let extra = if guide {
                    extra.repeat([2, 1, 1, 1])
                } else {
                    extra
                };
                let shape = [
                    n,
                    space.channels,
                    downscale(height, space.scale_factor),
                    downscale(width, space.scale_factor),
                ];
                let latents = generator.randn(&shape, at.0, at.1) * scheduler.init_noise_sigma();
                let blend = match self {
                    Self::V21 => None,
                    Self::V22 => Some(Blend::Renoised {
                        image_latents,
                        noise: latents.shallow_clone(),
                        mask: 1.0 - keep,
                    }),
                };
                Prepared {
                    blend,
                    latents,
                    unet_extra: Some(extra),
                }
            }
        };
        let cond = Conditioning {
            encoder_hidden_states: text.as_ref().map(|(_, hidden)| hidden),
            added: None,
            image_embeds: Some(&embeds),
            text_embeds: text.as_ref().map(|(embeds, _)| embeds),
            class_labels: None,
            guidance_scale,
            controlnets: None,
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
        timings.steps = (prior_timesteps.len() + timesteps.len()) as u32;
        if params.output_type == OutputType::Latent {
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
        let decoded = timings.time("decode", || movq.decode(latents))?;
        let (images_f32, images) = image::postprocess(&decoded)?;
        Ok(Output {
            images,
            images_f32: Some(images_f32),
            latents: None,
            nsfw_content_detected: None,
            watermark_detected: None,
            timings,
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downscale_rounds_up_to_whole_blocks() {
        // diffusers: downscale_height_and_width(512, 512, 8) == (64, 64); 520 -> 72.
        assert_eq!(downscale(512, 8), 64);
        assert_eq!(downscale(520, 8), 72);
        assert_eq!(downscale(32, 2), 16);
        assert_eq!(downscale(34, 2), 18);
    }

    #[test]
    fn erosion_clears_the_six_neighbours() {
        let mut keep = vec![1f32; 9];
        keep[4] = 0.0; // centre of a 3x3
        let t = Tensor::from_slice(&keep).reshape([1, 1, 3, 3]);
        let out = Vec::<f32>::try_from(erode_keep_mask(&t).unwrap().flatten(0, -1)).unwrap();
        // cleared: centre, above, left, above-left, below, right, below-right.
        assert_eq!(out, vec![0., 0., 1., 0., 0., 0., 1., 0., 0.]);
    }
}
