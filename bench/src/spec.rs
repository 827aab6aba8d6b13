//! The request every system under test runs, and the reply each gives back, as JSON lines: the
//! driver writes one [`Spec`] per line to a worker's stdin and reads one [`Reply`] per line.

use anyhow::{Context, Result};
use autopipe_proto::v1;
use serde::{Deserialize, Serialize};

/// One generation, described identically for autopipe and diffusers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    /// Checkpoint folder.
    pub model: String,
    /// `text2img`, `img2img` or `inpaint`.
    pub task: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance: f32,
    /// img2img/inpaint strength; `None` = diffusers' default.
    pub strength: Option<f32>,
    pub seed: u64,
    /// Init image (PNG path), img2img and inpaint.
    pub image: Option<String>,
    /// Mask (PNG path), inpaint.
    pub mask_image: Option<String>,
    /// `float32` or `bfloat16`.
    pub dtype: String,
    /// Weight-file variant (`fp16`) or none.
    pub variant: Option<String>,
    /// Where the worker writes the image.
    pub out: String,
}

impl Spec {
    /// The autopipe `GenerateRequest` for this spec.
    pub fn to_request(&self) -> Result<v1::GenerateRequest> {
        let task = match self.task.as_str() {
            "text2img" => v1::Task::Text2img,
            "img2img" => v1::Task::Img2img,
            "inpaint" => v1::Task::Inpaint,
            other => anyhow::bail!("unknown task {other:?}"),
        };
        let read = |p: &Option<String>| -> Result<Vec<u8>> {
            match p {
                Some(p) => std::fs::read(p).with_context(|| format!("reading {p}")),
                None => Ok(Vec::new()),
            }
        };
        // img2img takes its size from the init image, as diffusers' img2img pipeline does.
        let sized = task != v1::Task::Img2img;
        Ok(v1::GenerateRequest {
            task: task as i32,
            model: self.model.clone(),
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width: if sized { self.width } else { 0 },
            height: if sized { self.height } else { 0 },
            num_inference_steps: Some(self.steps),
            guidance_scale: Some(self.guidance),
            strength: self.strength,
            seed: Some(self.seed),
            image: read(&self.image)?,
            mask_image: read(&self.mask_image)?,
            dtype: self.dtype.clone(),
            variant: self.variant.clone().unwrap_or_default(),
            ..Default::default()
        })
    }
}

/// What one generation measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    /// Request wall time as the caller sees it.
    #[serde(default)]
    pub wall_ms: f64,
    /// The denoising loop (first UNet call to the end of the last step).
    #[serde(default)]
    pub denoise_ms: f64,
    /// Denoising steps run (UNet calls).
    #[serde(default)]
    pub steps: u32,
    /// autopipe: time to acquire the components' lease (where a load would happen).
    #[serde(default)]
    pub acquire_ms: Option<f64>,
    /// diffusers: `from_pretrained` / `from_pipe` time inside this request; autopipe embedded:
    /// the store's component loads inside this request.
    #[serde(default)]
    pub load_ms: Option<f64>,
    /// autopipe embedded: the process's peak RSS (`VmHWM`) as its last load in this request
    /// finished, before any component ran.
    #[serde(default)]
    pub load_peak_rss_bytes: Option<u64>,
    /// autopipe embedded: the process's RSS when the request arrived (before its loads).
    #[serde(default)]
    pub rss_before_bytes: Option<u64>,
    /// autopipe: component loads the store has done so far (all components).
    #[serde(default)]
    pub loads: Option<u64>,
    /// autopipe: store resident bytes after this request.
    #[serde(default)]
    pub resident_bytes: Option<u64>,
}

/// `denoise_ms / steps` from autopipe's `step_ms_mean`.
pub fn reply_from_response(resp: &v1::GenerateResponse, wall_ms: f64) -> Reply {
    let t = resp.timings.clone().unwrap_or_default();
    let steps = if t.step_ms_mean > 0.0 {
        (t.denoise_ms / t.step_ms_mean).round() as u32
    } else {
        0
    };
    Reply {
        ok: true,
        wall_ms,
        denoise_ms: t.denoise_ms,
        steps,
        acquire_ms: Some(t.acquire_ms),
        ..Default::default()
    }
}
