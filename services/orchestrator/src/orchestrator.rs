//! The request path: validate → resolve (AutoPipeline) → acquire a lease → run the pipeline →
//! release the lease (always, also on error or cancellation).

use crate::metrics::Metrics;
use crate::validate::{self, Validated};
use autopipe_auto::Family;
use autopipe_pipelines::{PipelineError, StableDiffusion, StepObserver, Task};
use autopipe_proto::v1;
use autopipe_repo::hub::{self, HubOptions};
use autopipe_repo::{Checkpoint, ModelRef};
use autopipe_store_api::{AcquireRequest, ComponentSpec, ComponentStore, Lease};
use autopipe_tokenizer::ClipTokenizer;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tch::Kind;
use tonic::Status;

/// The diffusers pipeline classes this server runs.
pub const IMPLEMENTED: &[&str] = &[
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
];

/// How an orchestrator is set up.
#[derive(Debug, Clone, Default)]
pub struct OrchestratorConfig {
    /// Weight dtype when a request names none; `None` = the store's default.
    pub default_kind: Option<Kind>,
    /// Where hub model references are fetched from and cached; `None` = from the environment
    /// (`HF_ENDPOINT`, `HF_HOME`, `HF_TOKEN`, `HF_HUB_OFFLINE`).
    pub hub: Option<HubOptions>,
}

/// The stateless request path over a component store.
pub struct Orchestrator {
    store: Arc<dyn ComponentStore>,
    config: OrchestratorConfig,
    hub: HubOptions,
    // Tokenizers are immutable after loading; sharing them saves re-reading a 49408-token vocab
    // per request. Everything mutable (scheduler, generator) is created per request.
    tokenizers: Mutex<HashMap<PathBuf, Arc<ClipTokenizer>>>,
    metrics: Arc<Metrics>,
}

/// A lease that is released when dropped, so no path leaks one.
struct LeaseGuard<'a> {
    store: &'a dyn ComponentStore,
    lease: Lease,
}

impl Drop for LeaseGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.store.release(&self.lease.id) {
            tracing::warn!(lease = %self.lease.id, error = %e, "release failed (the lease will expire)");
        }
    }
}

fn pipeline_status(e: &PipelineError) -> Status {
    match e {
        PipelineError::Store(s) => s.to_status(),
        other => other.code().status(other.to_string()),
    }
}

fn repo_status(e: autopipe_repo::Error) -> Status {
    match e {
        autopipe_repo::Error::NotFound(m) => Status::not_found(format!("model: {m}")),
        autopipe_repo::Error::InvalidReference(_) => {
            Status::invalid_argument(format!("model: {e}"))
        }
        autopipe_repo::Error::Malformed { .. } => {
            Status::failed_precondition(format!("model: {e}"))
        }
        autopipe_repo::Error::Unauthorized(_) => Status::permission_denied(format!("model: {e}")),
        autopipe_repo::Error::Unavailable(_) => Status::unavailable(format!("model: {e}")),
        autopipe_repo::Error::Io { .. } => Status::internal(format!("model: {e}")),
    }
}

fn auto_status(e: autopipe_auto::Error) -> Status {
    Status::invalid_argument(format!("model: {e}"))
}

impl Orchestrator {
    /// An orchestrator over `store`.
    pub fn new(store: Arc<dyn ComponentStore>, config: OrchestratorConfig) -> Self {
        let hub = config.hub.clone().unwrap_or_else(HubOptions::from_env);
        Self {
            store,
            config,
            hub,
            tokenizers: Mutex::new(HashMap::new()),
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// This orchestrator's metrics (served by `--metrics-listen`).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The component store this orchestrator leases from.
    pub fn store(&self) -> &Arc<dyn ComponentStore> {
        &self.store
    }

    /// Opens a model reference. A hub repo gets `model_index.json` only, unless `components` names
    /// what to download (config, tokenizer and weight files of those components, of `variant`).
    fn open(
        &self,
        model: &str,
        revision: &str,
        components: &[&str],
        variant: Option<&str>,
    ) -> Result<Checkpoint, Status> {
        match ModelRef::parse(model, revision).map_err(repo_status)? {
            ModelRef::Local(path) => Checkpoint::open(path).map_err(repo_status),
            ModelRef::Hub { repo_id, revision } => {
                let snapshot = if components.is_empty() {
                    hub::fetch_model_index(&self.hub, &repo_id, &revision)
                } else {
                    hub::fetch_components(&self.hub, &repo_id, &revision, components, variant)
                }
                .map_err(repo_status)?;
                Checkpoint::open(snapshot).map_err(repo_status)
            }
        }
    }

    fn tokenizer(&self, ckpt: &Checkpoint) -> Result<Arc<ClipTokenizer>, Status> {
        let dir = ckpt.component_dir("tokenizer").map_err(repo_status)?;
        if let Some(t) = self
            .tokenizers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&dir)
        {
            return Ok(t.clone());
        }
        let t = Arc::new(
            ClipTokenizer::from_folder(&dir)
                .map_err(|e| Status::failed_precondition(format!("model: tokenizer: {e}")))?,
        );
        self.tokenizers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(dir, t.clone());
        Ok(t)
    }

    /// `Resolve`: the pipeline class and components for (model, task, controlnet).
    pub fn resolve(&self, req: &v1::ResolveRequest) -> Result<v1::ResolveResponse, Status> {
        let task = validate::task(req.task)?;
        if req.model.trim().is_empty() {
            return Err(Status::invalid_argument("model: is required"));
        }
        let ckpt = self.open(req.model.trim(), req.revision.trim(), &[], None)?;
        let class = &ckpt.index().class_name;
        let r = autopipe_auto::resolve(class, task, !req.controlnet.trim().is_empty())
            .map_err(auto_status)?;
        Ok(v1::ResolveResponse {
            pipeline: r.pipeline.to_string(),
            model_class: class.clone(),
            components: r
                .components
                .iter()
                .map(|c| v1::ComponentSlot {
                    name: c.name.to_string(),
                    class_name: c.class.to_string(),
                    optional: c.optional,
                })
                .collect(),
            implemented: IMPLEMENTED.contains(&r.pipeline),
        })
    }

    /// Renews `lease` every third of its TTL until `stopped` fires (or its sender is dropped).
    fn renew_until(&self, lease: &Lease, stopped: mpsc::Receiver<()>) {
        let mut ttl = lease.ttl;
        loop {
            let interval = (ttl / 3).clamp(Duration::from_millis(50), Duration::from_secs(30));
            match stopped.recv_timeout(interval) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            match self.store.renew(&lease.id) {
                Ok(t) => {
                    self.metrics.lease_renewal("ok");
                    ttl = t;
                }
                Err(e) => {
                    self.metrics.lease_renewal("error");
                    tracing::warn!(lease = %lease.id, error = %e, "lease renewal failed");
                    // An expired or unknown lease cannot come back; the next Invoke reports it.
                    if e.code == autopipe_store_api::Code::FailedPrecondition
                        || e.code == autopipe_store_api::Code::NotFound
                    {
                        return;
                    }
                }
            }
        }
    }

    /// Resolves `model` for `task` (diffusers' AutoPipeline), opens it with the files that
    /// pipeline reads (fetching them for a hub reference) and names the components it leases.
    fn prepare(
        &self,
        model: &str,
        revision: &str,
        task: Task,
        variant: Option<&str>,
    ) -> Result<(autopipe_auto::Resolution, Checkpoint, Vec<ComponentSpec>), Status> {
        let index = self.open(model, revision, &[], None)?;
        let resolution =
            autopipe_auto::resolve(&index.index().class_name, task, false).map_err(auto_status)?;
        if resolution.family != Family::StableDiffusion
            || !IMPLEMENTED.contains(&resolution.pipeline)
        {
            return Err(Status::unimplemented(format!(
                "model: {} resolves to {}, which this server does not implement yet",
                index.index().class_name,
                resolution.pipeline
            )));
        }
        // Everything the Stable Diffusion pipelines read: leased components plus tokenizer and scheduler.
        let mut needed: Vec<&str> = autopipe_pipelines::stable_diffusion::COMPONENTS.to_vec();
        needed.extend(["tokenizer", "scheduler"]);
        let ckpt = self.open(model, revision, &needed, variant)?;
        let specs = autopipe_pipelines::stable_diffusion::COMPONENTS
            .iter()
            .map(|name| {
                let class_name = ckpt.index().component_class(name).ok_or_else(|| {
                    Status::failed_precondition(format!("model: model_index.json has no {name}"))
                })?;
                Ok(ComponentSpec {
                    name: name.to_string(),
                    class_name: class_name.to_string(),
                    path: ckpt.component_dir(name).map_err(repo_status)?,
                    variant: variant.map(str::to_string),
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        Ok((resolution, ckpt, specs))
    }

    /// Warm-up (`--preload`): makes `model`'s text2img components resident in the store at the
    /// default dtype (acquired and released: resident, evictable like any other) and reads its
    /// tokenizer, so the first request pays no load. Returns the components' names.
    pub fn warm_up(&self, model: &str) -> Result<Vec<String>, Status> {
        let (_, ckpt, specs) = self.prepare(model, "", Task::Text2Img, None)?;
        self.tokenizer(&ckpt)?;
        let names = specs.iter().map(|s| s.name.clone()).collect();
        let lease = self
            .store
            .acquire(&AcquireRequest {
                components: specs,
                kind: self.config.default_kind,
                request_id: "warm-up".to_string(),
            })
            .map_err(|e| e.to_status())?;
        drop(LeaseGuard {
            store: self.store.as_ref(),
            lease,
        });
        self.metrics.known_model(model);
        Ok(names)
    }

    /// `Generate`, on the calling (blocking) thread.
    pub fn generate(
        &self,
        req: &v1::GenerateRequest,
        request_id: &str,
        observer: &dyn StepObserver,
    ) -> Result<v1::GenerateResponse, Status> {
        let started = Instant::now();
        let valid = validate::generate_request(req)?;
        let (resolution, ckpt, specs) = self.prepare(
            &valid.model,
            &valid.revision,
            valid.task,
            valid.variant.as_deref(),
        )?;
        self.metrics.known_model(&valid.model);
        preflight(&ckpt, &valid)?;
        let tokenizer = self.tokenizer(&ckpt)?;
        if let Some(stop) = observer.should_stop() {
            return Err(pipeline_status(&stop));
        }
        let t_acquire = Instant::now();
        let lease = self
            .store
            .acquire(&AcquireRequest {
                components: specs,
                kind: valid.kind.or(self.config.default_kind),
                request_id: request_id.to_string(),
            })
            .map_err(|e| e.to_status())?;
        self.metrics.acquire(t_acquire.elapsed());
        let acquire_ms = t_acquire.elapsed().as_secs_f64() * 1e3;
        let guard = LeaseGuard {
            store: self.store.as_ref(),
            lease,
        };
        let pipeline = StableDiffusion::new(
            self.store.as_ref(),
            &guard.lease,
            &ckpt,
            &tokenizer,
            request_id,
        );
        let task: Task = valid.task;
        // A step (or a decode) can outlast the lease's TTL on a slow device: renew in the
        // background for as long as the pipeline runs, so the lease never expires mid-request.
        let out = std::thread::scope(|scope| {
            let (stop, stopped) = mpsc::channel::<()>();
            let lease = &guard.lease;
            scope.spawn(move || self.renew_until(lease, stopped));
            let out = pipeline.run(task, &valid.params, observer);
            drop(stop);
            out
        })
        .map_err(|e| pipeline_status(&e))?;
        drop(guard);
        let steps = out.timings.steps.max(1) as f64;
        Ok(v1::GenerateResponse {
            images: out
                .images
                .into_iter()
                .map(|img| v1::Image {
                    png: img.png,
                    width: img.width,
                    height: img.height,
                    seed: valid.params.seed,
                })
                .collect(),
            pipeline: resolution.pipeline.to_string(),
            timings: Some(v1::Timings {
                total_ms: started.elapsed().as_secs_f64() * 1e3,
                acquire_ms,
                encode_prompt_ms: out.timings.encode_prompt_ms,
                denoise_ms: out.timings.denoise_ms,
                decode_ms: out.timings.decode_ms,
                step_ms_mean: out.timings.denoise_ms / steps,
            }),
            warnings: out.warnings,
            request_id: request_id.to_string(),
        })
    }
}

/// A float request argument read back as the decimal a user typed (0.7f32 → 0.7), as the pipeline
/// does, so `int(steps * strength)` rounds as in diffusers.
fn as_python_float(v: f32) -> f64 {
    format!("{v}").parse().unwrap_or(v as f64)
}

/// What the pipeline would reject only after leasing, checked before any work: the UNet fits the
/// task, the scheduler (override and options) builds and accepts the step count, and `strength`
/// leaves at least one denoising step (diffusers' `get_timesteps`).
fn preflight(ckpt: &Checkpoint, valid: &Validated) -> Result<(), Status> {
    let unet = ckpt.read_json("unet", "config.json").map_err(repo_status)?;
    let in_channels = unet.get("in_channels").and_then(Value::as_i64).unwrap_or(4);
    match valid.task {
        Task::Inpaint if in_channels != 4 && in_channels != 9 => {
            return Err(Status::invalid_argument(format!(
                "model: the unet should have either 4 or 9 input channels for inpainting, not {in_channels}"
            )))
        }
        Task::Text2Img | Task::Img2Img if in_channels != 4 => {
            return Err(Status::invalid_argument(format!(
                "task: this model's unet has {in_channels} input channels (an inpainting checkpoint); it can only run TASK_INPAINT"
            )))
        }
        _ => {}
    }

    let mut config = ckpt
        .read_json("scheduler", "scheduler_config.json")
        .map_err(repo_status)?;
    let own_class = config
        .get("_class_name")
        .and_then(Value::as_str)
        .map(str::to_string);
    let Some(obj) = config.as_object_mut() else {
        return Err(Status::failed_precondition(
            "model: scheduler_config.json is not a JSON object",
        ));
    };
    // The pipeline's own rewrite of outdated configs (StableDiffusionPipeline.__init__).
    obj.insert("steps_offset".into(), Value::from(1));
    if obj.get("clip_sample").and_then(Value::as_bool) == Some(true) {
        obj.insert("clip_sample".into(), Value::Bool(false));
    }
    obj.extend(
        valid
            .params
            .scheduler_options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    let class = match (&valid.params.scheduler, own_class) {
        (Some(s), _) => s.clone(),
        (None, Some(c)) => c,
        (None, None) => {
            return Err(Status::failed_precondition(
                "model: scheduler_config.json has no _class_name",
            ))
        }
    };
    let field = if !valid.params.scheduler_options.is_empty() {
        "scheduler_options"
    } else if valid.params.scheduler.is_some() {
        "scheduler"
    } else {
        "model"
    };
    let mut scheduler = autopipe_schedulers::from_config(&class, &config).map_err(|e| {
        let message = format!("{field}: {e}");
        if field == "model" {
            Status::failed_precondition(message)
        } else {
            Status::invalid_argument(message)
        }
    })?;
    let steps = valid.params.num_inference_steps.unwrap_or(50) as usize;
    scheduler
        .set_timesteps(steps)
        .map_err(|e| Status::invalid_argument(format!("num_inference_steps: {e}")))?;
    if valid.task != Task::Text2Img {
        let default = if valid.task == Task::Img2Img {
            0.8
        } else {
            1.0
        };
        let strength = valid
            .params
            .strength
            .map(as_python_float)
            .unwrap_or(default);
        let init_timestep = ((steps as f64 * strength) as usize).min(steps);
        if init_timestep < 1 {
            return Err(Status::invalid_argument(format!(
                "strength: {strength} × num_inference_steps {steps} leaves {init_timestep} denoising steps; at least 1 is needed"
            )));
        }
    }
    Ok(())
}
