//! Pipelines: diffusers' pipeline control flow (tokenize, encode the prompt, the scheduler's
//! denoising loop, decode) written against [`autopipe_store_api::ComponentStore`], so the same code runs
//! with an in-process store or a remote one. Per-request state (scheduler, generator) lives here and
//! is never shared; weights live in the store.
//!
//! # Shape
//! - [`Pipeline`]: one implementation per family (`families/`), found through [`registry`] by the
//!   [`Family`] that `autopipe_auto` resolves. A pipeline names the optional components it borrows,
//!   validates a request before anything is leased, and runs.
//! - `steps/`: what families share, as plain functions and small traits: typed component clients
//!   over the store ([`steps::components`]), prompt encoders ([`steps::prompt`]), scheduler setup and
//!   timestep selection ([`steps::schedule`]), latent preparation per task ([`steps::latents`]), the
//!   one denoising loop that owns classifier-free guidance and the inpainting blend
//!   ([`steps::denoise`]), image pre/post-processing ([`steps::image`]).
//!
//! A new family is a file in `families/` composing those steps, plus one line in [`registry`].

pub mod families;
pub mod steps;

use autopipe_auto::{Family, Resolution};
use autopipe_repo::Checkpoint;
use autopipe_store_api::{Code, ComponentStore, Lease, StoreError};

pub use autopipe_auto::Task;
pub use steps::components::Components;
pub use steps::tokenizers::TokenizerCache;

/// How a request wants its result (diffusers' `output_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OutputType {
    /// Decoded images (PNG).
    #[default]
    Image,
    /// The denoised latents, not decoded (for a hand-off to another pipeline, e.g. SDXL refiner).
    Latent,
}

/// The `image` argument: pixels, or latents from an earlier `output_type="latent"` run
/// (diffusers passes a 4-channel tensor through its image processor untouched).
#[derive(Debug)]
pub enum InitImage {
    Pixels(image::DynamicImage),
    Latents(tch::Tensor),
}

impl Clone for InitImage {
    fn clone(&self) -> Self {
        match self {
            Self::Pixels(img) => Self::Pixels(img.clone()),
            Self::Latents(t) => Self::Latents(t.shallow_clone()),
        }
    }
}

/// One ControlNet of a request: diffusers' `controlnet=` model (loaded from its own folder, not
/// the checkpoint) with its entries of `control_image`, `controlnet_conditioning_scale`,
/// `control_guidance_start` and `control_guidance_end`.
#[derive(Debug, Clone)]
pub struct ControlNetInput {
    /// The ControlNet's folder (`config.json` and weights).
    pub path: std::path::PathBuf,
    /// The control image, decoded.
    pub image: image::DynamicImage,
    /// `None` = the pipeline's default.
    pub conditioning_scale: Option<f32>,
    /// Fraction of the steps at which it starts applying; `None` = 0.
    pub guidance_start: Option<f32>,
    /// Fraction of the steps at which it stops applying; `None` = 1.
    pub guidance_end: Option<f32>,
}

/// A `(height, width)` or `(top, left)` pair as diffusers' micro-conditioning tuples.
pub type Pair = (u32, u32);

/// SDXL's micro-conditioning (`original_size`, `crops_coords_top_left`, `target_size`, their
/// `negative_*` forms, and the refiner's aesthetic scores); `None` takes diffusers' default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MicroConditioning {
    pub original_size: Option<Pair>,
    pub crops_coords_top_left: Option<Pair>,
    pub target_size: Option<Pair>,
    pub negative_original_size: Option<Pair>,
    pub negative_crops_coords_top_left: Option<Pair>,
    pub negative_target_size: Option<Pair>,
    pub aesthetic_score: Option<f32>,
    pub negative_aesthetic_score: Option<f32>,
}

impl MicroConditioning {
    /// The first field that is set, as the request names it.
    pub fn first_set(&self) -> Option<&'static str> {
        [
            ("original_size", self.original_size.is_some()),
            (
                "crops_coords_top_left",
                self.crops_coords_top_left.is_some(),
            ),
            ("target_size", self.target_size.is_some()),
            (
                "negative_original_size",
                self.negative_original_size.is_some(),
            ),
            (
                "negative_crops_coords_top_left",
                self.negative_crops_coords_top_left.is_some(),
            ),
            ("negative_target_size", self.negative_target_size.is_some()),
            ("aesthetic_score", self.aesthetic_score.is_some()),
            (
                "negative_aesthetic_score",
                self.negative_aesthetic_score.is_some(),
            ),
        ]
        .into_iter()
        .find_map(|(name, set)| set.then_some(name))
    }
}

/// A generation request after validation, in diffusers' call-argument terms. `None` takes the
/// pipeline's default. Images arrive decoded (validation decodes each once).
#[derive(Debug, Clone, Default)]
pub struct GenerateParams {
    pub prompt: String,
    /// SDXL's second prompt (for `tokenizer_2` / `text_encoder_2`); `None` = `prompt`.
    pub prompt_2: Option<String>,
    /// `None` = not given (SDXL then zeroes the negative embeddings when the checkpoint says
    /// `force_zeros_for_empty_prompt`); Stable Diffusion treats it as "".
    pub negative_prompt: Option<String>,
    pub negative_prompt_2: Option<String>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub num_inference_steps: Option<u32>,
    pub guidance_scale: Option<f32>,
    pub strength: Option<f32>,
    pub seed: u64,
    /// The init image (img2img, inpaint).
    pub image: Option<InitImage>,
    /// The inpainting mask (white = repaint).
    pub mask_image: Option<image::DynamicImage>,
    /// Scheduler class override; `None` = the checkpoint's own.
    pub scheduler: Option<String>,
    /// Keys merged over the checkpoint's scheduler config (diffusers' `from_config(config, **kwargs)`).
    pub scheduler_options: serde_json::Map<String, serde_json::Value>,
    pub num_images_per_prompt: Option<u32>,
    pub micro: MicroConditioning,
    /// Skip the first part of the schedule (SDXL refiner hand-off), a fraction in (0, 1).
    pub denoising_start: Option<f32>,
    /// Stop before the end of the schedule (SDXL base hand-off), a fraction in (0, 1).
    pub denoising_end: Option<f32>,
    pub output_type: OutputType,
    /// ControlNets, in order (several = MultiControlNet, residuals summed).
    pub controlnets: Vec<ControlNetInput>,
    /// The ControlNets see only the conditional half of the CFG batch, their residuals scaled
    /// from 0.1 (first skip connection) to 1 (mid block).
    pub guess_mode: bool,
    /// A Combined pipeline's prior steps (`prior_num_inference_steps`).
    pub prior_num_inference_steps: Option<u32>,
    /// A Combined pipeline's prior guidance (`prior_guidance_scale`).
    pub prior_guidance_scale: Option<f32>,
    /// Run without the checkpoint's safety checker (diffusers' `safety_checker=None`); by default
    /// a checkpoint that names one runs it.
    pub skip_safety_checker: bool,
    /// DeepFloyd IF: a stage II (super-resolution) checkpoint run on stage I's images, a local
    /// folder or a hub repo id ([`Pipeline::chain`]).
    pub upscale_model: Option<String>,
    /// DeepFloyd IF stage II's `noise_level` (how much noise the upscaled image gets).
    pub noise_level: Option<u32>,
    /// DeepFloyd IF stage II's `num_inference_steps`.
    pub upscale_num_inference_steps: Option<u32>,
    /// DeepFloyd IF stage II's `guidance_scale`.
    pub upscale_guidance_scale: Option<f32>,
    /// DeepFloyd IF's `clean_caption` (bs4 + ftfy caption cleaning).
    pub clean_caption: bool,
}

impl GenerateParams {
    /// The request's ControlNets as lease components: one per distinct folder, named
    /// `controlnet`, `controlnet_1`, … in order of first use.
    pub fn controlnet_components(&self) -> Vec<(String, &std::path::Path)> {
        let mut out: Vec<(String, &std::path::Path)> = Vec::new();
        for net in &self.controlnets {
            if !out.iter().any(|(_, p)| *p == net.path.as_path()) {
                let name = match out.len() {
                    0 => "controlnet".to_string(),
                    n => format!("controlnet_{n}"),
                };
                out.push((name, net.path.as_path()));
            }
        }
        out
    }

    /// The first ControlNet field that is set (for pipelines that take no ControlNet).
    pub fn first_controlnet_field(&self) -> Option<&'static str> {
        if !self.controlnets.is_empty() {
            return Some("controlnet");
        }
        self.guess_mode.then_some("guess_mode")
    }

    /// The first prior-only field that is set (for families without a prior).
    pub fn first_prior_field(&self) -> Option<&'static str> {
        if self.prior_num_inference_steps.is_some() {
            return Some("prior_num_inference_steps");
        }
        self.prior_guidance_scale
            .is_some()
            .then_some("prior_guidance_scale")
    }

    /// The first DeepFloyd IF-only field that is set (for families that take none of them).
    pub fn first_if_field(&self) -> Option<&'static str> {
        [
            ("upscale_model", self.upscale_model.is_some()),
            ("noise_level", self.noise_level.is_some()),
            (
                "upscale_num_inference_steps",
                self.upscale_num_inference_steps.is_some(),
            ),
            (
                "upscale_guidance_scale",
                self.upscale_guidance_scale.is_some(),
            ),
            ("clean_caption", self.clean_caption),
        ]
        .into_iter()
        .find_map(|(name, set)| set.then_some(name))
    }

    /// The first SDXL-only field that is set (for families that take none of them).
    pub fn first_sdxl_field(&self) -> Option<&'static str> {
        if self.prompt_2.is_some() {
            return Some("prompt_2");
        }
        if self.negative_prompt_2.is_some() {
            return Some("negative_prompt_2");
        }
        if let Some(field) = self.micro.first_set() {
            return Some(field);
        }
        if self.denoising_start.is_some() {
            return Some("denoising_start");
        }
        self.denoising_end.is_some().then_some("denoising_end")
    }
}

/// A float request argument as Python would have it: the f32 from the wire read back as the decimal
/// a user typed (0.7f32 → 0.7, not 0.699999988), so `int(steps * strength)` rounds as in diffusers.
pub fn as_python_float(v: f32) -> f64 {
    format!("{v}").parse().unwrap_or(v as f64)
}

/// One generated image.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

/// Time spent in each named stage, in order (a Combined pipeline has two loops).
#[derive(Debug, Clone, Default)]
pub struct StageTimings {
    pub stages: Vec<(&'static str, f64)>,
    /// Denoising steps run (all loops).
    pub steps: u32,
}

impl StageTimings {
    /// Adds `ms` to stage `name` (appended the first time).
    pub fn add(&mut self, name: &'static str, ms: f64) {
        match self.stages.iter_mut().find(|(n, _)| *n == name) {
            Some((_, total)) => *total += ms,
            None => self.stages.push((name, ms)),
        }
    }

    /// Milliseconds spent in `name` (0 if it did not run).
    pub fn get(&self, name: &str) -> f64 {
        self.stages
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0.0, |(_, ms)| *ms)
    }

    /// Runs `f` as stage `name`.
    pub fn time<T>(&mut self, name: &'static str, f: impl FnOnce() -> T) -> T {
        let t = std::time::Instant::now();
        let out = f();
        self.add(name, t.elapsed().as_secs_f64() * 1e3);
        out
    }
}

/// What a pipeline run returns.
#[derive(Debug)]
pub struct Output {
    /// Decoded images (empty for [`OutputType::Latent`]).
    pub images: Vec<GeneratedImage>,
    /// Float images in [0, 1], NHWC, before quantization (for parity checks); `None` for latents.
    pub images_f32: Option<tch::Tensor>,
    /// The denoised latents, for [`OutputType::Latent`].
    pub latents: Option<tch::Tensor>,
    /// Per image, whether the safety checker flagged it (and blacked it out); `None` when no
    /// checker ran (diffusers' `nsfw_content_detected`).
    pub nsfw_content_detected: Option<Vec<bool>>,
    /// Per image, whether DeepFloyd IF's checker saw a watermark (and blacked the image out);
    /// `None` when no such checker ran (diffusers' `watermark_detected`).
    pub watermark_detected: Option<Vec<bool>>,
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

/// What a pipeline reads besides leased weights: the request's task and resolution, the checkpoint
/// on disk, and shared immutable helpers (tokenizers).
pub struct Context<'a> {
    pub task: Task,
    pub resolution: &'a Resolution,
    pub checkpoint: &'a Checkpoint,
    pub tokenizers: &'a TokenizerCache,
}

/// A family's pipelines (diffusers' T2I / I2I / inpaint classes of one model family).
pub trait Pipeline: Send + Sync {
    /// The family this implements.
    fn family(&self) -> Family;

    /// Optional component slots (`_optional_components`) this family borrows when the checkpoint
    /// has them; required slots are always borrowed.
    fn optional_components(&self) -> &'static [&'static str] {
        &[]
    }

    /// Whether `component` runs in float32 when the request asks for float16 (diffusers upcasts the
    /// SDXL VAE, whose activations overflow float16).
    fn upcast_half(&self, _checkpoint: &Checkpoint, _component: &str) -> Result<bool> {
        Ok(false)
    }

    /// Reads what a first request would otherwise read from disk (tokenizers), for `--preload`.
    fn warm_up(&self, _ctx: &Context) -> Result<()> {
        Ok(())
    }

    /// Everything that can be checked before leasing: the checkpoint fits the task, the request's
    /// fields are ones this family takes, the scheduler builds, the sizes and step counts work.
    fn validate(&self, ctx: &Context, params: &GenerateParams) -> Result<()>;

    /// The second checkpoint `params` chain after this pipeline (DeepFloyd IF's stage II), if
    /// any: the orchestrator opens it (fetching its folders for a hub reference), connects it to
    /// the checkpoint with [`connect_chain`] and leases its weights with the first checkpoint's.
    /// By default a pipeline chains nothing and refuses the fields that would ask for it.
    fn chain(&self, resolution: &Resolution, params: &GenerateParams) -> Result<Option<Chain>> {
        match params.first_if_field() {
            Some(field) => Err(PipelineError::invalid(
                field,
                format!("is not an argument of {}", resolution.pipeline),
            )),
            None => Ok(None),
        }
    }

    /// Runs the pipeline on leased components.
    fn run(
        &self,
        ctx: &Context,
        components: &Components,
        params: &GenerateParams,
        observer: &dyn StepObserver,
    ) -> Result<Output>;
}

/// The pipeline for a family, if autopipe implements it.
pub fn registry(family: Family) -> Option<&'static dyn Pipeline> {
    static PIPELINES: &[&dyn Pipeline] = &[
        &families::stable_diffusion::StableDiffusion { controlnet: false },
        &families::stable_diffusion::StableDiffusion { controlnet: true },
        &families::sdxl::StableDiffusionXL { controlnet: false },
        &families::sdxl::StableDiffusionXL { controlnet: true },
        &families::kandinsky::Kandinsky::V21,
        &families::kandinsky::Kandinsky::V22,
        &families::deepfloyd_if::DeepFloydIF,
    ];
    PIPELINES.iter().copied().find(|p| p.family() == family)
}

/// Whether autopipe runs a resolved pipeline class.
pub fn implemented(resolution: &Resolution) -> bool {
    registry(resolution.family).is_some()
}

/// A second checkpoint one request runs after the first (DeepFloyd IF's stage II): its
/// components join the first checkpoint's as `<prefix>_<name>` ([`Checkpoint::connect`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The request field that names it (errors about it name this field).
    pub field: &'static str,
    /// The model reference: a local folder or a hub repo id.
    pub model: String,
    /// The prefix of its components in the connected checkpoint.
    pub prefix: &'static str,
    /// The `model_index.json` `_class_name`s it may have.
    pub classes: &'static [&'static str],
    /// Its weight components the run leases (prefixed names).
    pub leased: &'static [&'static str],
    /// Every folder of it the run reads (prefixed names; the leased ones included).
    pub folders: &'static [&'static str],
}

impl Chain {
    /// A prefixed component name as the chained checkpoint names it.
    pub fn own_name<'a>(&self, name: &'a str) -> &'a str {
        name.strip_prefix(self.prefix)
            .and_then(|n| n.strip_prefix('_'))
            .unwrap_or(name)
    }
}

/// Connects `chained` (the checkpoint `chain.model` names) to `checkpoint` under `chain.prefix`,
/// after checking it is a pipeline of the class the chain takes (INVALID_ARGUMENT naming
/// `chain.field` otherwise).
pub fn connect_chain(
    checkpoint: &mut Checkpoint,
    chain: &Chain,
    chained: Checkpoint,
) -> Result<()> {
    let class = &chained.index().class_name;
    if !chain.classes.contains(&class.as_str()) {
        return Err(PipelineError::invalid(
            chain.field,
            format!(
                "{} is a {class}, not {}",
                chain.model,
                chain.classes.join(" or ")
            ),
        ));
    }
    checkpoint.connect(chain.prefix, chained);
    Ok(())
}

/// What a resolved pipeline reads from a checkpoint: the components it leases from the store
/// (weights) and every folder it needs on disk (those plus tokenizers and the scheduler).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// `model_index.json` keys to lease, in the pipeline's `__init__` order.
    pub leased: Vec<&'static str>,
    /// Every component folder the run reads (leased ones, tokenizers, scheduler).
    pub folders: Vec<&'static str>,
}

/// The plan for `resolution` over a checkpoint whose `model_index.json` is `index`: every required
/// weight slot, and the optional ones `pipeline` uses where the checkpoint has them (the safety
/// checker and its feature extractor only unless `skip_safety_checker`); then the `chain`ed
/// checkpoint's folders (already connected to `index`).
pub fn plan(
    pipeline: &dyn Pipeline,
    resolution: &Resolution,
    index: &autopipe_repo::ModelIndex,
    skip_safety_checker: bool,
    chain: Option<&Chain>,
) -> Result<Plan> {
    use steps::safety_checker::{FEATURE_EXTRACTOR, SAFETY_CHECKER};
    let mut leased = Vec::new();
    let mut folders = Vec::new();
    for slot in resolution.components {
        // The ControlNet comes with the request (its own folder), never from the checkpoint.
        if slot.class == steps::components::CONTROLNET_CLASS {
            continue;
        }
        let present = index.component_class(slot.name).is_some();
        let skipped =
            skip_safety_checker && [SAFETY_CHECKER, FEATURE_EXTRACTOR].contains(&slot.name);
        if slot.optional
            && (skipped || !(present && pipeline.optional_components().contains(&slot.name)))
        {
            continue;
        }
        if !present {
            return Err(PipelineError::invalid(
                "model",
                format!(
                    "{} needs the component {:?}, which model_index.json does not provide",
                    resolution.pipeline, slot.name
                ),
            ));
        }
        folders.push(slot.name);
        if steps::components::holds_weights(slot) {
            leased.push(slot.name);
        }
    }
    if let Some(chain) = chain {
        for &name in chain.folders {
            if index.component_class(name).is_none() {
                return Err(PipelineError::invalid(
                    chain.field,
                    format!(
                        "{}: its model_index.json has no {:?} component",
                        chain.model,
                        chain.own_name(name)
                    ),
                ));
            }
            folders.push(name);
        }
        leased.extend(chain.leased);
    }
    Ok(Plan { leased, folders })
}

/// For a Combined (connected) pipeline over a decoder checkpoint that lacks the `prior_*`
/// components: the prior reference diffusers' `load_connected_pipeline` loads, the first entry
/// under `prior:` in the model card's front matter. A relative local path is taken relative to
/// the checkpoint folder (diffusers resolves it against the working directory). `None` when the
/// pipeline has no connected prior or the checkpoint is a Combined folder with its own.
pub fn connected_prior_ref(
    checkpoint: &Checkpoint,
    resolution: &Resolution,
) -> Result<Option<String>> {
    let Some(prior_class) = resolution.connected_prior else {
        return Ok(None);
    };
    let index = checkpoint.index();
    let missing = resolution
        .components
        .iter()
        .any(|slot| slot.connected().is_some() && index.component_class(slot.name).is_none());
    if !missing {
        return Ok(None);
    }
    let key = autopipe_auto::CONNECTED_PIPES_KEYS[0];
    let reference = checkpoint
        .model_card_list(key)?
        .and_then(|list| list.into_iter().next())
        .ok_or_else(|| {
            PipelineError::invalid(
                "model",
                format!(
                    "{} loads a {prior_class} beside the decoder: the checkpoint has no prior_* components and its model card (README.md) names no `{key}:` repository",
                    resolution.pipeline
                ),
            )
        })?;
    let local = checkpoint.root().join(&reference);
    Ok(Some(if local.is_dir() {
        local.to_string_lossy().into_owned()
    } else {
        reference
    }))
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
    /// The checkpoint is missing something this pipeline needs, or ships it malformed.
    #[error("model: {0}")]
    Checkpoint(#[from] autopipe_repo::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] autopipe_tokenizer::Error),
    /// The checkpoint's own scheduler config does not build.
    #[error("model: scheduler: {0}")]
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

/// Runs `params` for a resolved pipeline on `store`: plans, leases the components (released on
/// every path), runs. A chained checkpoint ([`Pipeline::chain`]) must already be connected to
/// `ctx.checkpoint` ([`connect_chain`]). What the orchestrator does per request, minus the wire; tests and the bench
/// use it directly.
pub fn generate(
    store: &dyn ComponentStore,
    ctx: &Context,
    kind: Option<tch::Kind>,
    variant: Option<&str>,
    params: &GenerateParams,
    request_id: &str,
    observer: &dyn StepObserver,
) -> Result<Output> {
    let pipeline = registry(ctx.resolution.family).ok_or_else(|| {
        PipelineError::Internal(format!("{} is not implemented", ctx.resolution.pipeline))
    })?;
    let chain = pipeline.chain(ctx.resolution, params)?;
    if let Some(chain) = &chain {
        if ctx.checkpoint.connected(chain.prefix).is_none() {
            return Err(PipelineError::Internal(format!(
                "{} is not connected to the checkpoint (connect_chain)",
                chain.field
            )));
        }
    }
    let plan = plan(
        pipeline,
        ctx.resolution,
        ctx.checkpoint.index(),
        params.skip_safety_checker,
        chain.as_ref(),
    )?;
    pipeline.validate(ctx, params)?;
    let lease = store.acquire(&autopipe_store_api::AcquireRequest {
        components: steps::components::specs(pipeline, ctx.checkpoint, &plan, variant, params)?,
        kind,
        request_id: request_id.to_string(),
    })?;
    let lease = LeaseGuard { store, lease };
    let components = Components::new(store, &lease.lease, request_id);
    pipeline.run(ctx, &components, params, observer)
}

/// A lease that is released when dropped, so no path leaks one.
pub struct LeaseGuard<'a> {
    pub store: &'a dyn ComponentStore,
    pub lease: Lease,
}

impl Drop for LeaseGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.store.release(&self.lease.id) {
            tracing::warn!(lease = %self.lease.id, error = %e, "release failed (the lease will expire)");
        }
    }
}
