//! The request path: validate → resolve (AutoPipeline) → acquire a lease → run the pipeline →
//! release the lease (always, also on error or cancellation).

use crate::validate;
use autopipe_auto::Family;
use autopipe_pipelines::{PipelineError, StableDiffusion, StepObserver, Task};
use autopipe_proto::v1;
use autopipe_repo::hub::{self, HubOptions};
use autopipe_repo::{Checkpoint, ModelRef};
use autopipe_store::{AcquireRequest, ComponentSpec, ComponentStore, Lease};
use autopipe_tokenizer::ClipTokenizer;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tch::Kind;
use tonic::Status;

/// The diffusers pipeline classes this server runs.
pub const IMPLEMENTED: &[&str] =
    &["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"];

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
        autopipe_repo::Error::InvalidReference(_) => Status::invalid_argument(format!("model: {e}")),
        autopipe_repo::Error::Malformed { .. } => Status::failed_precondition(format!("model: {e}")),
        autopipe_repo::Error::Unauthorized(_) => Status::permission_denied(format!("model: {e}")),
        autopipe_repo::Error::Unavailable(_) => Status::unavailable(format!("model: {e}")),
        autopipe_repo::Error::Io { .. } => Status::internal(format!("model: {e}")),
    }
}

fn auto_status(e: autopipe_auto::Error) -> Status {
    Status::invalid_argument(e.to_string())
}

impl Orchestrator {
    /// An orchestrator over `store`.
    pub fn new(store: Arc<dyn ComponentStore>, config: OrchestratorConfig) -> Self {
        let hub = config.hub.clone().unwrap_or_else(HubOptions::from_env);
        Self { store, config, hub, tokenizers: Mutex::new(HashMap::new()) }
    }

    /// The component store this orchestrator leases from.
    pub fn store(&self) -> &Arc<dyn ComponentStore> {
        &self.store
    }

    /// Opens a model reference. A hub repo gets `model_index.json` only, unless `components` names
    /// what to download (config, tokenizer and weight files of those components, of `variant`).
    fn open(&self, model: &str, revision: &str, components: &[&str], variant: Option<&str>) -> Result<Checkpoint, Status> {
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
        if let Some(t) = self.tokenizers.lock().unwrap_or_else(|p| p.into_inner()).get(&dir) {
            return Ok(t.clone());
        }
        let t = Arc::new(
            ClipTokenizer::from_folder(&dir).map_err(|e| Status::failed_precondition(format!("model: tokenizer: {e}")))?,
        );
        self.tokenizers.lock().unwrap_or_else(|p| p.into_inner()).insert(dir, t.clone());
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
        let r = autopipe_auto::resolve(class, task, !req.controlnet.trim().is_empty()).map_err(auto_status)?;
        Ok(v1::ResolveResponse {
            pipeline: r.pipeline.to_string(),
            model_class: class.clone(),
            components: r
                .components
                .iter()
                .map(|c| v1::ComponentSlot { name: c.name.to_string(), class_name: c.class.to_string(), optional: c.optional })
                .collect(),
            implemented: IMPLEMENTED.contains(&r.pipeline),
        })
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
        let index = self.open(&valid.model, &valid.revision, &[], None)?;
        let resolution = autopipe_auto::resolve(&index.index().class_name, valid.task, false).map_err(auto_status)?;
        if resolution.family != Family::StableDiffusion || !IMPLEMENTED.contains(&resolution.pipeline) {
            return Err(Status::unimplemented(format!("{} is not implemented by this server yet", resolution.pipeline)));
        }
        // Everything the Stable Diffusion pipelines read: leased components plus tokenizer and scheduler.
        let mut needed: Vec<&str> = autopipe_pipelines::stable_diffusion::COMPONENTS.to_vec();
        needed.extend(["tokenizer", "scheduler"]);
        let ckpt = self.open(&valid.model, &valid.revision, &needed, valid.variant.as_deref())?;
        let tokenizer = self.tokenizer(&ckpt)?;
        let specs = autopipe_pipelines::stable_diffusion::COMPONENTS
            .iter()
            .map(|name| {
                let class_name = ckpt
                    .index()
                    .component_class(name)
                    .ok_or_else(|| Status::failed_precondition(format!("model: model_index.json has no {name}")))?;
                Ok(ComponentSpec {
                    name: name.to_string(),
                    class_name: class_name.to_string(),
                    path: ckpt.component_dir(name).map_err(repo_status)?,
                    variant: valid.variant.clone(),
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
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
        let acquire_ms = t_acquire.elapsed().as_secs_f64() * 1e3;
        let guard = LeaseGuard { store: self.store.as_ref(), lease };
        let pipeline = StableDiffusion::new(self.store.as_ref(), &guard.lease, &ckpt, &tokenizer, request_id);
        let task: Task = valid.task;
        let out = pipeline.run(task, &valid.params, observer).map_err(|e| pipeline_status(&e))?;
        drop(guard);
        let steps = out.timings.steps.max(1) as f64;
        Ok(v1::GenerateResponse {
            images: out
                .images
                .into_iter()
                .map(|img| v1::Image { png: img.png, width: img.width, height: img.height, seed: valid.params.seed })
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

