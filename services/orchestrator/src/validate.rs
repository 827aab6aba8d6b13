//! Every `GenerateRequest` field checked before any work, each error naming its field.

use autopipe_pipelines::{GenerateParams, Task};
use autopipe_proto::v1;
use tch::Kind;
use tonic::Status;

/// Largest width or height accepted (pixels).
pub const MAX_SIDE: u32 = 4096;
/// Most denoising steps accepted.
pub const MAX_STEPS: u32 = 1000;
/// Most images per request.
pub const MAX_IMAGES: u32 = 16;
/// Longest prompt accepted, in bytes (longer ones are truncated to 77 tokens anyway).
pub const MAX_PROMPT_BYTES: usize = 64 * 1024;

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
        Ok(v1::Task::Unspecified) => Err(invalid("task", "is required (TASK_TEXT2IMG, TASK_IMG2IMG or TASK_INPAINT)")),
        Err(_) => Err(invalid("task", format!("unknown task {t}"))),
    }
}

/// A dtype field (see [`autopipe_store::parse_kind_opt`]).
pub fn dtype(name: &str, field: &str) -> Result<Option<Kind>, Status> {
    autopipe_store::parse_kind_opt(name).map_err(|e| invalid(field, e))
}

fn side(v: u32, field: &str) -> Result<Option<u32>, Status> {
    match v {
        0 => Ok(None),
        v if v % 8 != 0 => Err(invalid(field, format!("must be a multiple of 8, got {v}"))),
        v if v > MAX_SIDE => Err(invalid(field, format!("must be at most {MAX_SIDE}, got {v}"))),
        v => Ok(Some(v)),
    }
}

fn check_image(bytes: &[u8], field: &str) -> Result<(u32, u32), Status> {
    if bytes.is_empty() {
        return Err(invalid(field, "is required for this task"));
    }
    let img = image::load_from_memory(bytes).map_err(|e| invalid(field, format!("cannot decode image: {e}")))?;
    let (w, h) = (img.width(), img.height());
    if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
        return Err(invalid(field, format!("size {w}x{h} is outside 1..={MAX_SIDE}")));
    }
    Ok((w, h))
}

/// Checks every field; draws a random seed when none is given.
pub fn generate_request(req: &v1::GenerateRequest) -> Result<Validated, Status> {
    let task = task(req.task)?;
    if req.model.trim().is_empty() {
        return Err(invalid("model", "is required (a local diffusers folder or a hub repo id)"));
    }
    if req.prompt.len() > MAX_PROMPT_BYTES || req.negative_prompt.len() > MAX_PROMPT_BYTES {
        let field = if req.prompt.len() > MAX_PROMPT_BYTES { "prompt" } else { "negative_prompt" };
        return Err(invalid(field, format!("longer than {MAX_PROMPT_BYTES} bytes")));
    }
    let width = side(req.width, "width")?;
    let height = side(req.height, "height")?;
    let num_inference_steps = match req.num_inference_steps {
        Some(0) => return Err(invalid("num_inference_steps", "must be at least 1")),
        Some(n) if n > MAX_STEPS => return Err(invalid("num_inference_steps", format!("must be at most {MAX_STEPS}, got {n}"))),
        n => n,
    };
    if let Some(g) = req.guidance_scale {
        if !g.is_finite() || g < 0.0 {
            return Err(invalid("guidance_scale", format!("must be a finite number ≥ 0, got {g}")));
        }
    }
    if let Some(s) = req.strength {
        if !(0.0..=1.0).contains(&s) {
            return Err(invalid("strength", format!("must be in [0.0, 1.0], got {s}")));
        }
    }
    let num_images_per_prompt = match req.num_images_per_prompt {
        Some(0) => return Err(invalid("num_images_per_prompt", "must be at least 1")),
        Some(n) if n > MAX_IMAGES => {
            return Err(invalid("num_images_per_prompt", format!("must be at most {MAX_IMAGES}, got {n}")))
        }
        n => n,
    };
    let scheduler = match req.scheduler.trim() {
        "" => None,
        s if autopipe_schedulers::SUPPORTED.contains(&s) => Some(s.to_string()),
        s => return Err(invalid("scheduler", format!("unknown scheduler {s:?}; supported: {}", autopipe_schedulers::SUPPORTED.join(", ")))),
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
    match task {
        Task::Text2Img => {
            if !req.image.is_empty() || !req.mask_image.is_empty() {
                return Err(invalid(if req.image.is_empty() { "mask_image" } else { "image" }, "is not used by text2img"));
            }
            if req.strength.is_some() {
                return Err(invalid("strength", "is not used by text2img"));
            }
        }
        Task::Img2Img => {
            check_image(&req.image, "image")?;
            if !req.mask_image.is_empty() {
                return Err(invalid("mask_image", "is not used by img2img"));
            }
        }
        Task::Inpaint => {
            let image = check_image(&req.image, "image")?;
            let mask = check_image(&req.mask_image, "mask_image")?;
            if image != mask {
                return Err(invalid(
                    "mask_image",
                    format!("size {}x{} does not match image size {}x{}", mask.0, mask.1, image.0, image.1),
                ));
            }
        }
    }
    let variant = match req.variant.trim() {
        "" => None,
        v if v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') => Some(v.to_string()),
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
            negative_prompt: Some(req.negative_prompt.clone()),
            width,
            height,
            num_inference_steps,
            guidance_scale: req.guidance_scale,
            strength: req.strength,
            seed,
            image: (!req.image.is_empty()).then(|| req.image.clone()),
            mask_image: (!req.mask_image.is_empty()).then(|| req.mask_image.clone()),
            scheduler,
            scheduler_options,
            num_images_per_prompt,
        },
    })
}
