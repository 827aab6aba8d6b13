//! Every `GenerateRequest` field checked before any work, each error naming its field.

use autopipe_pipelines::{
    ControlNetInput, GenerateParams, InitImage, MicroConditioning, OutputType, Pair, Task,
};
use autopipe_proto::v1;
use tch::Kind;
use tonic::Status;

/// Largest width or height accepted (pixels).
pub const MAX_SIDE: u32 = 4096;
/// Most denoising steps accepted.
pub const MAX_STEPS: u32 = 1000;
/// Most ControlNets per request.
pub const MAX_CONTROLNETS: usize = 8;
/// Most images per request.
pub const MAX_IMAGES: u32 = 16;
/// Longest prompt accepted, in bytes (longer ones are truncated to 77 tokens anyway).
pub const MAX_PROMPT_BYTES: usize = 64 * 1024;
/// Most output pixels one request may ask for (width × height × num_images_per_prompt).
pub const MAX_OUTPUT_PIXELS: u64 = 4096 * 4096;
/// Longest model reference or revision accepted, in bytes.
pub const MAX_REFERENCE_BYTES: usize = 4096;

/// A request that passed validation.
#[derive(Debug)]
pub struct Validated {
    pub task: Task,
    pub model: String,
    pub revision: String,
    pub kind: Option<Kind>,
    pub variant: Option<String>,
    pub params: GenerateParams,
}

fn invalid(field: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

/// The task enum as the pipelines name it.
pub fn task(t: i32) -> Result<Task, Status> {
    match v1::Task::try_from(t) {
        Ok(v1::Task::Text2img) => Ok(Task::Text2Img),
        Ok(v1::Task::Img2img) => Ok(Task::Img2Img),
        Ok(v1::Task::Inpaint) => Ok(Task::Inpaint),
        Ok(v1::Task::Unspecified) => Err(invalid(
            "task",
            "is required (TASK_TEXT2IMG, TASK_IMG2IMG or TASK_INPAINT)",
        )),
        Err(_) => Err(invalid("task", format!("unknown task {t}"))),
    }
}

/// A dtype field (see [`autopipe_store_api::parse_kind_opt`]).
pub fn dtype(name: &str, field: &str) -> Result<Option<Kind>, Status> {
    autopipe_store_api::parse_kind_opt(name).map_err(|e| invalid(field, e))
}

fn side(v: u32, field: &str) -> Result<Option<u32>, Status> {
    match v {
        0 => Ok(None),
        v if v % 8 != 0 => Err(invalid(field, format!("must be a multiple of 8, got {v}"))),
        v if v > MAX_SIDE => Err(invalid(
            field,
            format!("must be at most {MAX_SIDE}, got {v}"),
        )),
        v => Ok(Some(v)),
    }
}

/// A model reference or revision: bounded, no control characters (a NUL would fail deep in the OS).
fn reference(v: &str, field: &str) -> Result<(), Status> {
    if v.len() > MAX_REFERENCE_BYTES {
        return Err(invalid(
            field,
            format!("longer than {MAX_REFERENCE_BYTES} bytes"),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(invalid(field, "contains control characters"));
    }
    Ok(())
}

/// Decodes an image field (once: the pipeline takes the decoded image).
fn check_image(bytes: &[u8], field: &str) -> Result<image::DynamicImage, Status> {
    if bytes.is_empty() {
        return Err(invalid(field, "is required for this task"));
    }
    let img = image::load_from_memory(bytes)
        .map_err(|e| invalid(field, format!("cannot decode image: {e}")))?;
    let (w, h) = (img.width(), img.height());
    if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
        return Err(invalid(
            field,
            format!("size {w}x{h} is outside 1..={MAX_SIDE}"),
        ));
    }
    Ok(img)
}

/// The ControlNet fields: `controlnet` and `control_image` paired in order; the per-net floats
/// empty (the pipeline's default), one value (for every net, as diffusers takes a float) or one
/// per net. `path` holds the reference as given; the orchestrator resolves it to a folder.
fn controlnets(req: &v1::GenerateRequest) -> Result<Vec<ControlNetInput>, Status> {
    let n = req.controlnet.len();
    if n == 0 {
        for (field, set) in [
            ("control_image", !req.control_image.is_empty()),
            (
                "controlnet_conditioning_scale",
                !req.controlnet_conditioning_scale.is_empty(),
            ),
            (
                "control_guidance_start",
                !req.control_guidance_start.is_empty(),
            ),
            ("control_guidance_end", !req.control_guidance_end.is_empty()),
            ("guess_mode", req.guess_mode),
        ] {
            if set {
                return Err(invalid(field, "is only used with a controlnet"));
            }
        }
        return Ok(Vec::new());
    }
    if n > MAX_CONTROLNETS {
        return Err(invalid(
            "controlnet",
            format!("{n} ControlNets; at most {MAX_CONTROLNETS}"),
        ));
    }
    if req.control_image.len() != n {
        return Err(invalid(
            "control_image",
            format!(
                "{} images for {n} ControlNets: give one control image per controlnet, in order",
                req.control_image.len()
            ),
        ));
    }
    let per_net = |values: &[f32], field: &str| -> Result<Vec<Option<f32>>, Status> {
        if let Some(v) = values.iter().find(|v| !v.is_finite()) {
            return Err(invalid(field, format!("must be finite, got {v}")));
        }
        match values.len() {
            0 => Ok(vec![None; n]),
            1 => Ok(vec![Some(values[0]); n]),
            len if len == n => Ok(values.iter().copied().map(Some).collect()),
            len => Err(invalid(
                field,
                format!("{len} values for {n} ControlNets: give one, or one per controlnet"),
            )),
        }
    };
    let scales = per_net(
        &req.controlnet_conditioning_scale,
        "controlnet_conditioning_scale",
    )?;
    let starts = per_net(&req.control_guidance_start, "control_guidance_start")?;
    let ends = per_net(&req.control_guidance_end, "control_guidance_end")?;
    req.controlnet
        .iter()
        .zip(&req.control_image)
        .enumerate()
        .map(|(i, (reference_, image))| {
            let r = reference_.trim();
            if r.is_empty() {
                return Err(invalid("controlnet", format!("entry {i} is empty")));
            }
            reference(r, "controlnet")?;
            Ok(ControlNetInput {
                path: r.into(),
                image: check_image(image, "control_image")?,
                conditioning_scale: scales[i],
                guidance_start: starts[i],
                guidance_end: ends[i],
            })
        })
        .collect()
}

/// A micro-conditioning size: both sides set and bounded.
fn size_pair(v: &Option<v1::Size>, field: &str) -> Result<Option<Pair>, Status> {
    match v {
        None => Ok(None),
        Some(s)
            if s.height == 0
                || s.width == 0
                || s.height > MAX_SIDE * 4
                || s.width > MAX_SIDE * 4 =>
        {
            Err(invalid(
                field,
                format!(
                    "height and width must be in 1..={}, got {}x{}",
                    MAX_SIDE * 4,
                    s.height,
                    s.width
                ),
            ))
        }
        Some(s) => Ok(Some((s.height, s.width))),
    }
}

/// A crop offset, bounded.
fn coords_pair(v: &Option<v1::Coords>, field: &str) -> Result<Option<Pair>, Status> {
    match v {
        None => Ok(None),
        Some(c) if c.top > MAX_SIDE * 4 || c.left > MAX_SIDE * 4 => Err(invalid(
            field,
            format!(
                "top and left must be at most {}, got ({}, {})",
                MAX_SIDE * 4,
                c.top,
                c.left
            ),
        )),
        Some(c) => Ok(Some((c.top, c.left))),
    }
}

/// An optional finite float.
fn finite(v: Option<f32>, field: &str) -> Result<Option<f32>, Status> {
    match v {
        Some(x) if !x.is_finite() => {
            Err(invalid(field, format!("must be a finite number, got {x}")))
        }
        v => Ok(v),
    }
}

/// An optional prompt: bounded; empty = not given.
fn optional_prompt(v: &str, field: &str) -> Result<Option<String>, Status> {
    if v.len() > MAX_PROMPT_BYTES {
        return Err(invalid(
            field,
            format!("longer than {MAX_PROMPT_BYTES} bytes"),
        ));
    }
    Ok((!v.is_empty()).then(|| v.to_string()))
}

/// Checks every field; draws a random seed when none is given.
pub fn generate_request(req: &v1::GenerateRequest) -> Result<Validated, Status> {
    let task = task(req.task)?;
    if req.model.trim().is_empty() {
        return Err(invalid(
            "model",
            "is required (a local diffusers folder or a hub repo id)",
        ));
    }
    reference(&req.model, "model")?;
    reference(&req.revision, "revision")?;
    if req.revision.split('/').any(|part| part == "..") {
        return Err(invalid("revision", "must not contain \"..\""));
    }
    if req.prompt.len() > MAX_PROMPT_BYTES || req.negative_prompt.len() > MAX_PROMPT_BYTES {
        let field = if req.prompt.len() > MAX_PROMPT_BYTES {
            "prompt"
        } else {
            "negative_prompt"
        };
        return Err(invalid(
            field,
            format!("longer than {MAX_PROMPT_BYTES} bytes"),
        ));
    }
    let width = side(req.width, "width")?;
    let height = side(req.height, "height")?;
    let num_inference_steps = match req.num_inference_steps {
        Some(0) => return Err(invalid("num_inference_steps", "must be at least 1")),
        Some(n) if n > MAX_STEPS => {
            return Err(invalid(
                "num_inference_steps",
                format!("must be at most {MAX_STEPS}, got {n}"),
            ))
        }
        n => n,
    };
    if let Some(g) = req.guidance_scale {
        if !g.is_finite() || g < 0.0 {
            return Err(invalid(
                "guidance_scale",
                format!("must be a finite number ≥ 0, got {g}"),
            ));
        }
    }
    let prior_num_inference_steps = match req.prior_num_inference_steps {
        Some(0) => return Err(invalid("prior_num_inference_steps", "must be at least 1")),
        Some(n) if n > MAX_STEPS => {
            return Err(invalid(
                "prior_num_inference_steps",
                format!("must be at most {MAX_STEPS}, got {n}"),
            ))
        }
        n => n,
    };
    if let Some(g) = req.prior_guidance_scale {
        if !g.is_finite() || g < 0.0 {
            return Err(invalid(
                "prior_guidance_scale",
                format!("must be a finite number ≥ 0, got {g}"),
            ));
        }
    }
    let upscale_num_inference_steps = match req.upscale_num_inference_steps {
        Some(0) => return Err(invalid("upscale_num_inference_steps", "must be at least 1")),
        Some(n) if n > MAX_STEPS => {
            return Err(invalid(
                "upscale_num_inference_steps",
                format!("must be at most {MAX_STEPS}, got {n}"),
            ))
        }
        n => n,
    };
    if let Some(g) = req.upscale_guidance_scale {
        if !g.is_finite() || g < 0.0 {
            return Err(invalid(
                "upscale_guidance_scale",
                format!("must be a finite number ≥ 0, got {g}"),
            ));
        }
    }
    let upscale_model = match req.upscale_model.trim() {
        "" => None,
        m => {
            reference(m, "upscale_model")?;
            Some(m.to_string())
        }
    };
    if let Some(s) = req.strength {
        if !(0.0..=1.0).contains(&s) {
            return Err(invalid(
                "strength",
                format!("must be in [0.0, 1.0], got {s}"),
            ));
        }
    }
    let num_images_per_prompt = match req.num_images_per_prompt {
        Some(0) => return Err(invalid("num_images_per_prompt", "must be at least 1")),
        Some(n) if n > MAX_IMAGES => {
            return Err(invalid(
                "num_images_per_prompt",
                format!("must be at most {MAX_IMAGES}, got {n}"),
            ))
        }
        n => n,
    };
    let pixels = width.unwrap_or(512) as u64
        * height.unwrap_or(512) as u64
        * num_images_per_prompt.unwrap_or(1) as u64;
    if pixels > MAX_OUTPUT_PIXELS {
        return Err(invalid(
            "num_images_per_prompt",
            format!("width × height × num_images_per_prompt = {pixels} pixels is more than {MAX_OUTPUT_PIXELS} per request"),
        ));
    }
    let scheduler = match req.scheduler.trim() {
        "" => None,
        s if autopipe_schedulers::SUPPORTED.contains(&s) => Some(s.to_string()),
        s => {
            return Err(invalid(
                "scheduler",
                format!(
                    "unknown scheduler {s:?}; supported: {}",
                    autopipe_schedulers::SUPPORTED.join(", ")
                ),
            ))
        }
    };
    let scheduler_options = match req.scheduler_options.trim() {
        "" => serde_json::Map::new(),
        text => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(m)) => m,
            Ok(_) => return Err(invalid("scheduler_options", "must be a JSON object")),
            Err(e) => return Err(invalid("scheduler_options", format!("invalid JSON: {e}"))),
        },
    };
    let kind = dtype(&req.dtype, "dtype")?;
    let image_latents = match &req.image_latents {
        None => None,
        Some(t) => {
            if !req.image.is_empty() {
                return Err(invalid(
                    "image_latents",
                    "give either image or image_latents, not both",
                ));
            }
            if task != Task::Img2Img {
                return Err(invalid("image_latents", "is only used by img2img"));
            }
            let latents = autopipe_proto::tensor_from_wire(t, tch::Device::Cpu)
                .map_err(|e| invalid("image_latents", e))?;
            if latents.dim() != 4
                || latents.kind() == Kind::Int64
                || latents.numel() > (MAX_SIDE as usize / 8).pow(2) * 16 * MAX_IMAGES as usize
            {
                return Err(invalid(
                    "image_latents",
                    format!(
                        "must be a float tensor [batch, channels, h, w] of latents, got {:?} {:?}",
                        latents.kind(),
                        latents.size()
                    ),
                ));
            }
            Some(latents.to_kind(Kind::Float))
        }
    };
    let (mut image, mut mask_image) = (None, None);
    match task {
        Task::Text2Img => {
            if !req.image.is_empty() || !req.mask_image.is_empty() {
                return Err(invalid(
                    if req.image.is_empty() {
                        "mask_image"
                    } else {
                        "image"
                    },
                    "is not used by text2img",
                ));
            }
            if req.strength.is_some() {
                return Err(invalid("strength", "is not used by text2img"));
            }
        }
        Task::Img2Img => {
            image = match image_latents {
                Some(latents) => Some(InitImage::Latents(latents)),
                None => Some(InitImage::Pixels(check_image(&req.image, "image")?)),
            };
            if !req.mask_image.is_empty() {
                return Err(invalid("mask_image", "is not used by img2img"));
            }
        }
        Task::Inpaint => {
            let img = check_image(&req.image, "image")?;
            let mask = check_image(&req.mask_image, "mask_image")?;
            if (img.width(), img.height()) != (mask.width(), mask.height()) {
                return Err(invalid(
                    "mask_image",
                    format!(
                        "size {}x{} does not match image size {}x{}",
                        mask.width(),
                        mask.height(),
                        img.width(),
                        img.height()
                    ),
                ));
            }
            image = Some(InitImage::Pixels(img));
            mask_image = Some(mask);
        }
    }
    let variant = match req.variant.trim() {
        "" => None,
        v if v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
        {
            Some(v.to_string())
        }
        v => return Err(invalid("variant", format!("invalid variant {v:?}"))),
    };
    let seed = req.seed.unwrap_or_else(|| {
        let u = uuid::Uuid::new_v4();
        u.as_u64_pair().0 & 0xffff_ffff
    });
    Ok(Validated {
        task,
        model: req.model.trim().to_string(),
        revision: req.revision.trim().to_string(),
        kind,
        variant,
        params: GenerateParams {
            prompt: req.prompt.clone(),
            prompt_2: optional_prompt(&req.prompt_2, "prompt_2")?,
            negative_prompt: (!req.negative_prompt.is_empty()).then(|| req.negative_prompt.clone()),
            negative_prompt_2: optional_prompt(&req.negative_prompt_2, "negative_prompt_2")?,
            width,
            height,
            num_inference_steps,
            guidance_scale: req.guidance_scale,
            strength: req.strength,
            seed,
            image,
            mask_image,
            scheduler,
            scheduler_options,
            num_images_per_prompt,
            micro: MicroConditioning {
                original_size: size_pair(&req.original_size, "original_size")?,
                crops_coords_top_left: coords_pair(
                    &req.crops_coords_top_left,
                    "crops_coords_top_left",
                )?,
                target_size: size_pair(&req.target_size, "target_size")?,
                negative_original_size: size_pair(
                    &req.negative_original_size,
                    "negative_original_size",
                )?,
                negative_crops_coords_top_left: coords_pair(
                    &req.negative_crops_coords_top_left,
                    "negative_crops_coords_top_left",
                )?,
                negative_target_size: size_pair(&req.negative_target_size, "negative_target_size")?,
                aesthetic_score: finite(req.aesthetic_score, "aesthetic_score")?,
                negative_aesthetic_score: finite(
                    req.negative_aesthetic_score,
                    "negative_aesthetic_score",
                )?,
            },
            denoising_start: finite(req.denoising_start, "denoising_start")?,
            denoising_end: finite(req.denoising_end, "denoising_end")?,
            prior_num_inference_steps,
            prior_guidance_scale: req.prior_guidance_scale,
            output_type: match v1::OutputType::try_from(req.output_type) {
                Ok(v1::OutputType::Unspecified | v1::OutputType::Image) => OutputType::Image,
                Ok(v1::OutputType::Latent) => OutputType::Latent,
                Err(_) => {
                    return Err(invalid(
                        "output_type",
                        format!("unknown output type {}", req.output_type),
                    ))
                }
            },
            controlnets: controlnets(req)?,
            guess_mode: req.guess_mode,
            skip_safety_checker: req.skip_safety_checker,
            upscale_model,
            noise_level: req.noise_level,
            upscale_num_inference_steps,
            upscale_guidance_scale: req.upscale_guidance_scale,
            clean_caption: req.clean_caption,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([120, 30, 200]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn good(task: v1::Task) -> v1::GenerateRequest {
        let (image, mask_image) = match task {
            v1::Task::Img2img => (png(64, 64), Vec::new()),
            v1::Task::Inpaint => (png(64, 64), png(64, 64)),
            _ => (Vec::new(), Vec::new()),
        };
        v1::GenerateRequest {
            task: task as i32,
            model: "/models/sd1".into(),
            prompt: "a cat".into(),
            width: 64,
            height: 64,
            num_inference_steps: Some(4),
            image,
            mask_image,
            ..Default::default()
        }
    }

    #[test]
    fn good_requests_pass_for_every_task() {
        for task in [v1::Task::Text2img, v1::Task::Img2img, v1::Task::Inpaint] {
            let v = generate_request(&good(task)).unwrap_or_else(|e| panic!("{task:?}: {e:?}"));
            assert_eq!(v.model, "/models/sd1");
        }
        // The full u64 range is a valid seed (torch maps a negative seed s to s + 2^64).
        let mut r = good(v1::Task::Text2img);
        r.seed = Some(u64::MAX);
        assert_eq!(generate_request(&r).unwrap().params.seed, u64::MAX);
    }

    #[test]
    fn controlnet_fields_pair_in_order_and_broadcast_one_value() {
        let mut r = good(v1::Task::Text2img);
        r.controlnet = vec!["/cn/a".into(), " /cn/b ".into()];
        r.control_image = vec![png(64, 64), png(32, 48)];
        r.controlnet_conditioning_scale = vec![0.7];
        r.control_guidance_end = vec![0.5, 0.9];
        r.guess_mode = true;
        let p = generate_request(&r).unwrap().params;
        let nets: Vec<_> = p
            .controlnets
            .iter()
            .map(|n| {
                (
                    n.path.display().to_string(),
                    n.image.width(),
                    n.conditioning_scale,
                    n.guidance_start,
                    n.guidance_end,
                )
            })
            .collect();
        assert_eq!(
            nets,
            vec![
                ("/cn/a".to_string(), 64, Some(0.7), None, Some(0.5)),
                ("/cn/b".to_string(), 32, Some(0.7), None, Some(0.9)),
            ]
        );
        assert!(p.guess_mode);
    }

    #[test]
    fn every_bad_field_is_named() {
        type Edit = Box<dyn Fn(&mut v1::GenerateRequest)>;
        let t2i = v1::Task::Text2img;
        let i2i = v1::Task::Img2img;
        let inp = v1::Task::Inpaint;
        let cases: Vec<(v1::Task, &str, Edit)> = vec![
            (t2i, "task", Box::new(|r| r.task = 0)),
            (t2i, "task", Box::new(|r| r.task = 42)),
            (t2i, "model", Box::new(|r| r.model = "  ".into())),
            (t2i, "model", Box::new(|r| r.model = "/a\0b".into())),
            (
                t2i,
                "model",
                Box::new(|r| r.model = "x".repeat(MAX_REFERENCE_BYTES + 1)),
            ),
            (
                t2i,
                "revision",
                Box::new(|r| r.revision = "../../etc".into()),
            ),
            (
                t2i,
                "prompt",
                Box::new(|r| r.prompt = "a".repeat(MAX_PROMPT_BYTES + 1)),
            ),
            (
                t2i,
                "negative_prompt",
                Box::new(|r| r.negative_prompt = "a".repeat(MAX_PROMPT_BYTES + 1)),
            ),
            (t2i, "width", Box::new(|r| r.width = 65)),
            (t2i, "height", Box::new(|r| r.height = 100)),
            (t2i, "width", Box::new(|r| r.width = MAX_SIDE + 8)),
            (
                t2i,
                "num_inference_steps",
                Box::new(|r| r.num_inference_steps = Some(0)),
            ),
            (
                t2i,
                "num_inference_steps",
                Box::new(|r| r.num_inference_steps = Some(MAX_STEPS + 1)),
            ),
            (
                t2i,
                "guidance_scale",
                Box::new(|r| r.guidance_scale = Some(-1.0)),
            ),
            (
                t2i,
                "guidance_scale",
                Box::new(|r| r.guidance_scale = Some(f32::NAN)),
            ),
            (
                t2i,
                "guidance_scale",
                Box::new(|r| r.guidance_scale = Some(f32::INFINITY)),
            ),
            (
                t2i,
                "control_image",
                Box::new(|r| r.control_image = vec![png(64, 64)]),
            ),
            (t2i, "guess_mode", Box::new(|r| r.guess_mode = true)),
            (
                t2i,
                "upscale_num_inference_steps",
                Box::new(|r| r.upscale_num_inference_steps = Some(0)),
            ),
            (
                t2i,
                "upscale_guidance_scale",
                Box::new(|r| r.upscale_guidance_scale = Some(f32::NAN)),
            ),
            (
                t2i,
                "upscale_model",
                Box::new(|r| r.upscale_model = "a\0b".into()),
            ),
            (
                t2i,
                "control_image",
                Box::new(|r| r.controlnet = vec!["/cn/a".into(), "/cn/b".into()]),
            ),
            (
                t2i,
                "control_image",
                Box::new(|r| {
                    r.controlnet = vec!["/cn/a".into()];
                    r.control_image = vec![b"not an image".to_vec()];
                }),
            ),
            (
                t2i,
                "controlnet",
                Box::new(|r| {
                    r.controlnet = vec![" ".into()];
                    r.control_image = vec![png(64, 64)];
                }),
            ),
            (
                t2i,
                "controlnet_conditioning_scale",
                Box::new(|r| {
                    r.controlnet = vec!["/cn/a".into(), "/cn/b".into()];
                    r.control_image = vec![png(64, 64), png(64, 64)];
                    r.controlnet_conditioning_scale = vec![0.5, 0.5, 0.5];
                }),
            ),
            (
                t2i,
                "control_guidance_end",
                Box::new(|r| {
                    r.controlnet = vec!["/cn/a".into()];
                    r.control_image = vec![png(64, 64)];
                    r.control_guidance_end = vec![f32::NAN];
                }),
            ),
            (i2i, "strength", Box::new(|r| r.strength = Some(1.5))),
            (i2i, "strength", Box::new(|r| r.strength = Some(-0.1))),
            (i2i, "strength", Box::new(|r| r.strength = Some(f32::NAN))),
            (t2i, "strength", Box::new(|r| r.strength = Some(0.5))),
            (
                t2i,
                "num_images_per_prompt",
                Box::new(|r| r.num_images_per_prompt = Some(0)),
            ),
            (
                t2i,
                "num_images_per_prompt",
                Box::new(|r| r.num_images_per_prompt = Some(MAX_IMAGES + 1)),
            ),
            (
                t2i,
                "num_images_per_prompt",
                Box::new(|r| {
                    r.width = 4096;
                    r.height = 4096;
                    r.num_images_per_prompt = Some(2);
                }),
            ),
            (
                t2i,
                "scheduler",
                Box::new(|r| r.scheduler = "FancyScheduler".into()),
            ),
            (
                t2i,
                "scheduler_options",
                Box::new(|r| r.scheduler_options = "{not json".into()),
            ),
            (
                t2i,
                "scheduler_options",
                Box::new(|r| r.scheduler_options = "[1, 2]".into()),
            ),
            (t2i, "dtype", Box::new(|r| r.dtype = "int8".into())),
            (t2i, "variant", Box::new(|r| r.variant = "../fp16".into())),
            (t2i, "image", Box::new(|r| r.image = png(8, 8))),
            (t2i, "mask_image", Box::new(|r| r.mask_image = png(8, 8))),
            (i2i, "image", Box::new(|r| r.image.clear())),
            (
                i2i,
                "image",
                Box::new(|r| r.image = b"not an image".to_vec()),
            ),
            (i2i, "mask_image", Box::new(|r| r.mask_image = png(64, 64))),
            (inp, "mask_image", Box::new(|r| r.mask_image.clear())),
            (inp, "mask_image", Box::new(|r| r.mask_image = png(32, 64))),
            (
                inp,
                "image",
                Box::new(|r| r.image = png(64, 64)[..40].to_vec()),
            ),
        ];
        for (i, (task, field, edit)) in cases.iter().enumerate() {
            let mut r = good(*task);
            edit(&mut r);
            let err = generate_request(&r).expect_err(&format!("case {i} ({field}) should fail"));
            assert_eq!(
                err.code(),
                tonic::Code::InvalidArgument,
                "case {i}: {err:?}"
            );
            assert!(
                err.message().starts_with(&format!("{field}: ")),
                "case {i}: expected field {field}, got {:?}",
                err.message()
            );
        }
    }
}
