//! Pipelines: diffusers' pipeline control flow (tokenize, encode the prompt, the scheduler's
//! denoising loop, decode) written against [`autopipe_store_api::ComponentStore`], so the same code
//! runs with an in-process store or a remote one. Per-request state (scheduler, generator) lives
//! here and is never shared; weights live in the store.

pub mod image_processor;
pub mod stable_diffusion;

use autopipe_store_api::{Code, StoreError};

pub use stable_diffusion::StableDiffusion;

pub use autopipe_auto::Task;

/// A generation request after validation, in diffusers' call-argument terms. `None` takes the
/// pipeline's default.
#[derive(Debug, Clone, Default)]
pub struct GenerateParams {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub num_inference_steps: Option<u32>,
    pub guidance_scale: Option<f32>,
    pub strength: Option<f32>,
    pub seed: u64,
    /// Encoded PNG/JPEG bytes of the init image.
    pub image: Option<Vec<u8>>,
    /// Encoded PNG/JPEG bytes of the inpainting mask (white = repaint).
    pub mask_image: Option<Vec<u8>>,
    /// Scheduler class override; `None` = the checkpoint's own.
    pub scheduler: Option<String>,
    /// Keys merged over the checkpoint's scheduler config (diffusers' `from_config(config, **kwargs)`).
    pub scheduler_options: serde_json::Map<String, serde_json::Value>,
    pub num_images_per_prompt: Option<u32>,
}

/// One generated image.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

/// Time spent in each stage, in milliseconds.
#[derive(Debug, Clone, Default)]
pub struct StageTimings {
    pub encode_prompt_ms: f64,
    pub denoise_ms: f64,
    pub decode_ms: f64,
    pub steps: u32,
}

/// What a pipeline run returns.
#[derive(Debug)]
pub struct Output {
    pub images: Vec<GeneratedImage>,
    /// Float images in [0, 1], NHWC, before quantization (for parity checks).
    pub images_f32: tch::Tensor,
    pub timings: StageTimings,
    pub warnings: Vec<String>,
}

/// Progress after each denoising step.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub step: u32,
    pub total_steps: u32,
    pub timestep: f64,
}

/// Per-step hooks: progress reports and cancellation (checked before every step).
pub trait StepObserver: Sync {
    /// Called after each denoising step.
    fn on_step(&self, progress: Progress);
    /// `Some(error)` stops the run before the next step (cancelled, deadline exceeded, draining).
    fn should_stop(&self) -> Option<PipelineError>;
}

/// An observer that reports nothing and never stops.
pub struct NoObserver;

impl StepObserver for NoObserver {
    fn on_step(&self, _: Progress) {}
    fn should_stop(&self) -> Option<PipelineError> {
        None
    }
}

/// Why a pipeline run failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A request field is invalid; `field` names it as in `GenerateRequest`.
    #[error("{field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    /// The checkpoint is missing something this pipeline needs.
    #[error("{0}")]
    Checkpoint(#[from] autopipe_repo::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] autopipe_tokenizer::Error),
    #[error("scheduler: {0}")]
    Scheduler(#[from] autopipe_schedulers::Error),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("cancelled")]
    Cancelled,
    #[error("deadline exceeded")]
    DeadlineExceeded,
    #[error("server is shutting down")]
    Unavailable,
    #[error("internal: {0}")]
    Internal(String),
}

impl PipelineError {
    /// A field-level validation error.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            message: message.into(),
        }
    }

    /// The status code a client sees.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } | Self::Tokenizer(_) => Code::InvalidArgument,
            Self::Scheduler(autopipe_schedulers::Error::UnknownScheduler(_)) => {
                Code::InvalidArgument
            }
            Self::Scheduler(_) => Code::FailedPrecondition,
            Self::Checkpoint(autopipe_repo::Error::NotFound(_)) => Code::NotFound,
            Self::Checkpoint(_) => Code::FailedPrecondition,
            Self::Store(e) => e.code,
            Self::Cancelled => Code::Cancelled,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::Unavailable => Code::Unavailable,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<tch::TchError> for PipelineError {
    fn from(e: tch::TchError) -> Self {
        Self::Internal(format!("torch: {e}"))
    }
}

/// Result with [`PipelineError`].
pub type Result<T> = std::result::Result<T, PipelineError>;
