//! The request path: validate → resolve (AutoPipeline) → acquire a lease → run the pipeline →
//! release the lease (always, also on error or cancellation).

use crate::metrics::Metrics;
use crate::validate;
use autopipe_pipelines::{
    Chain, Components, Context, LeaseGuard, Pipeline, PipelineError, Plan, StepObserver, Task,
    TokenizerCache,
};
use autopipe_proto::v1;
use autopipe_repo::hub::{self, HubOptions};
use autopipe_repo::{Checkpoint, ModelRef, ModelRoots};
use autopipe_store_api::{AcquireRequest, ComponentStore, Lease};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::Kind;
use tonic::Status;

/// How an orchestrator is set up.
#[derive(Debug, Clone, Default)]
pub struct OrchestratorConfig {
    /// Weight dtype when a request names none; `None` = the store's default.
    pub default_kind: Option<Kind>,
    /// Where hub model references are fetched from and cached; `None` = from the environment
    /// (`HF_ENDPOINT`, `HF_HOME`, `HF_TOKEN`, `HF_HUB_OFFLINE`).
    pub hub: Option<HubOptions>,
    /// `--safety-checker`: whether checkpoints' safety checkers run.
    pub safety_checker: SafetyCheckerMode,
    /// `--allow-request-safety-off`: requests may set `skip_safety_checker`; otherwise asking is
    /// PERMISSION_DENIED.
    pub allow_request_safety_off: bool,
    /// `--model-root` / `--allow-hub`: where every model reference (model, ControlNets, a
    /// connected prior) may point; unconfined by default (a process that is its own operator).
    pub roots: ModelRoots,
}

/// Whether the server runs checkpoints' safety checkers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SafetyCheckerMode {
    /// As diffusers loads the checkpoint: a `safety_checker` entry in `model_index.json` runs.
    #[default]
    Auto,
    /// Never (diffusers' `safety_checker=None` for every model).
    Off,
}

impl std::str::FromStr for SafetyCheckerMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            other => Err(format!("expected auto or off, got {other:?}")),
        }
    }
}

/// The stateless request path over a component store.
pub struct Orchestrator {
    store: Arc<dyn ComponentStore>,
    config: OrchestratorConfig,
    hub: HubOptions,
    // Tokenizers are immutable after loading and shared; everything mutable (scheduler, generator)
    // is created per request.
    tokenizers: TokenizerCache,
    metrics: Arc<Metrics>,
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
        autopipe_repo::Error::Unauthorized(_) | autopipe_repo::Error::PermissionDenied(_) => {
            Status::permission_denied(format!("model: {e}"))
        }
        autopipe_repo::Error::Unavailable(_) => Status::unavailable(format!("model: {e}")),
        autopipe_repo::Error::Io { .. } => Status::internal(format!("model: {e}")),
    }
}

/// The component prefix of a connected prior (diffusers' `CONNECTED_PIPES_KEYS`).
const CONNECTED_PREFIX: &str = autopipe_auto::CONNECTED_PIPES_KEYS[0];

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
            tokenizers: TokenizerCache::default(),
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
        match self
            .config
            .roots
            .resolve(model, revision)
            .map_err(repo_status)?
        {
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
            implemented: autopipe_pipelines::implemented(&r),
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

    /// Resolves `model` for `task` (diffusers' AutoPipeline, with `controlnet=` when the request
    /// has ControlNets), finds the family's pipeline, and opens the checkpoint with the files that
    /// pipeline reads (fetching them for a hub reference), with the checkpoint the request chains
    /// after it (IF's `upscale_model`) connected.
    fn prepare(
        &self,
        model: &str,
        revision: &str,
        task: Task,
        variant: Option<&str>,
        params: &autopipe_pipelines::GenerateParams,
    ) -> Result<Prepared, Status> {
        let controlnet = !params.controlnets.is_empty();
        let mut index = self.open(model, revision, &[], None)?;
        let resolution = autopipe_auto::resolve(&index.index().class_name, task, controlnet)
            .map_err(auto_status)?;
        let pipeline = autopipe_pipelines::registry(resolution.family).ok_or_else(|| {
            Status::unimplemented(format!(
                "model: {} resolves to {}, which this server does not implement yet",
                index.index().class_name,
                resolution.pipeline
            ))
        })?;
        // A Combined pipeline over a decoder folder loads the prior its model card names.
        let prior = autopipe_pipelines::connected_prior_ref(&index, &resolution)
            .map_err(|e| pipeline_status(&e))?;
        if let Some(prior) = &prior {
            index.connect(CONNECTED_PREFIX, self.open(prior, "", &[], None)?);
        }
        // A second checkpoint run after this one (IF's stage II): its model_index.json first.
        let chain = pipeline
            .chain(&resolution, params)
            .map_err(|e| pipeline_status(&e))?;
        let open_chained = |chain: &Chain, folders: &[&str], variant| {
            self.open(&chain.model, "", folders, variant).map_err(|s| {
                let message = s.message().strip_prefix("model: ").unwrap_or(s.message());
                Status::new(s.code(), format!("{}: {message}", chain.field))
            })
        };
        if let Some(chain) = &chain {
            autopipe_pipelines::connect_chain(&mut index, chain, open_chained(chain, &[], None)?)
                .map_err(|e| pipeline_status(&e))?;
        }
        let plan = autopipe_pipelines::plan(
            pipeline,
            &resolution,
            index.index(),
            params.skip_safety_checker,
            chain.as_ref(),
        )
        .map_err(|e| pipeline_status(&e))?;
        let chained = |name: &&str| chain.as_ref().is_some_and(|c| c.folders.contains(name));
        let (connected, own): (Vec<&str>, Vec<&str>) = plan
            .folders
            .iter()
            .filter(|name| !chained(name))
            .partition(|name| {
                prior.is_some()
                    && resolution
                        .component(name)
                        .and_then(|slot| slot.connected())
                        .is_some()
            });
        let mut checkpoint = self.open(model, revision, &own, variant)?;
        if let Some(prior) = &prior {
            let folders: Vec<&str> = connected
                .iter()
                .filter_map(|name| resolution.component(name).and_then(|s| s.connected()))
                .map(|(_, inner)| inner)
                .collect();
            checkpoint.connect(CONNECTED_PREFIX, self.open(prior, "", &folders, variant)?);
        }
        if let Some(chain) = &chain {
            let folders: Vec<&str> = chain.folders.iter().map(|f| chain.own_name(f)).collect();
            let chained = open_chained(chain, &folders, variant)?;
            autopipe_pipelines::connect_chain(&mut checkpoint, chain, chained)
                .map_err(|e| pipeline_status(&e))?;
        }
        Ok(Prepared {
            resolution,
            pipeline,
            plan,
            checkpoint,
        })
    }

    /// Warm-up (`--preload`): makes `model`'s text2img components resident in the store at the
    /// default dtype (acquired and released: resident, evictable like any other) and reads its
    /// tokenizer, so the first request pays no load. Returns the components' names.
    pub fn warm_up(&self, model: &str) -> Result<Vec<String>, Status> {
        autopipe_store_api::single_threaded_kernels();
        let params = autopipe_pipelines::GenerateParams {
            skip_safety_checker: self.config.safety_checker == SafetyCheckerMode::Off,
            ..Default::default()
        };
        let prepared = self.prepare(model, "", Task::Text2Img, None, &params)?;
        let ctx = prepared.context(Task::Text2Img, &self.tokenizers);
        prepared
            .pipeline
            .warm_up(&ctx)
            .map_err(|e| pipeline_status(&e))?;
        let specs = prepared.specs(None, &params)?;
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
        autopipe_store_api::single_threaded_kernels();
        let started = Instant::now();
        let mut valid = validate::generate_request(req)?;
        if valid.params.skip_safety_checker && !self.config.allow_request_safety_off {
            return Err(Status::permission_denied(
                "skip_safety_checker: this server does not let requests skip the safety checker (its operator can allow it with --allow-request-safety-off)",
            ));
        }
        if self.config.safety_checker == SafetyCheckerMode::Off {
            valid.params.skip_safety_checker = true;
        }
        resolve_controlnets(&self.config.roots, &mut valid.params)?;
        let prepared = self.prepare(
            &valid.model,
            &valid.revision,
            valid.task,
            valid.variant.as_deref(),
            &valid.params,
        )?;
        self.metrics.known_model(&valid.model);
        let ctx = prepared.context(valid.task, &self.tokenizers);
        prepared
            .pipeline
            .validate(&ctx, &valid.params)
            .map_err(|e| pipeline_status(&e))?;
        let specs = prepared.specs(valid.variant.as_deref(), &valid.params)?;
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
        let components = Components::new(self.store.as_ref(), &guard.lease, request_id);
        // A step (or a decode) can outlast the lease's TTL on a slow device: renew in the
        // background for as long as the pipeline runs, so the lease never expires mid-request.
        let out = std::thread::scope(|scope| {
            let (stop, stopped) = mpsc::channel::<()>();
            let lease = &guard.lease;
            // Named: a thread otherwise takes its creator's name (the request thread's).
            std::thread::Builder::new()
                .name("autopipe-renew".into())
                .spawn_scoped(scope, move || self.renew_until(lease, stopped))
                .map_err(|e| {
                    autopipe_pipelines::PipelineError::Internal(format!(
                        "starting the lease renewal thread: {e}"
                    ))
                })?;
            let out = prepared
                .pipeline
                .run(&ctx, &components, &valid.params, observer);
            drop(stop);
            out
        })
        .map_err(|e| pipeline_status(&e))?;
        drop(guard);
        let steps = out.timings.steps.max(1) as f64;
        let flags = out.nsfw_content_detected.as_deref();
        let flagged = flags.map_or(0, |f| f.iter().filter(|&&x| x).count());
        if flagged > 0 {
            self.metrics.nsfw_images_add(&valid.model, flagged as u64);
        }
        let latents = out
            .latents
            .as_ref()
            .map(autopipe_proto::tensor_to_wire)
            .transpose()
            .map_err(|e| Status::internal(format!("latents: {e}")))?;
        Ok(v1::GenerateResponse {
            images: out
                .images
                .into_iter()
                .enumerate()
                .map(|(i, img)| v1::Image {
                    png: img.png,
                    width: img.width,
                    height: img.height,
                    seed: valid.params.seed,
                    nsfw_content_detected: flags.is_some_and(|f| f.get(i) == Some(&true)),
                    safety_checked: flags.is_some(),
                    watermark_detected: out
                        .watermark_detected
                        .as_deref()
                        .is_some_and(|f| f.get(i) == Some(&true)),
                })
                .collect(),
            pipeline: prepared.resolution.pipeline.to_string(),
            timings: Some(v1::Timings {
                total_ms: started.elapsed().as_secs_f64() * 1e3,
                acquire_ms,
                encode_prompt_ms: out.timings.get("encode_prompt"),
                denoise_ms: out.timings.get("denoise"),
                decode_ms: out.timings.get("decode"),
                step_ms_mean: out.timings.get("denoise") / steps,
                stages: out
                    .timings
                    .stages
                    .iter()
                    .map(|&(name, ms)| v1::Stage {
                        name: name.to_string(),
                        ms,
                    })
                    .collect(),
            }),
            warnings: out.warnings,
            request_id: request_id.to_string(),
            latents,
        })
    }
}

/// A resolved request: the diffusers pipeline, autopipe's implementation of its family, what it
/// reads, and the checkpoint opened with those files.
struct Prepared {
    resolution: autopipe_auto::Resolution,
    pipeline: &'static dyn Pipeline,
    plan: Plan,
    checkpoint: Checkpoint,
}

impl Prepared {
    fn context<'a>(&'a self, task: Task, tokenizers: &'a TokenizerCache) -> Context<'a> {
        Context {
            task,
            resolution: &self.resolution,
            checkpoint: &self.checkpoint,
            tokenizers,
        }
    }

    fn specs(
        &self,
        variant: Option<&str>,
        params: &autopipe_pipelines::GenerateParams,
    ) -> Result<Vec<autopipe_store_api::ComponentSpec>, Status> {
        autopipe_pipelines::steps::components::specs(
            self.pipeline,
            &self.checkpoint,
            &self.plan,
            variant,
            params,
        )
        .map_err(|e| pipeline_status(&e))
    }
}

/// Resolves each ControlNet reference to its local folder (confined like the model), which must
/// hold a `ControlNetModel` (`config.json` `_class_name`). ControlNets are not fetched from the
/// hub yet.
fn resolve_controlnets(
    roots: &ModelRoots,
    params: &mut autopipe_pipelines::GenerateParams,
) -> Result<(), Status> {
    let field = |s: Status| {
        let message = s.message().strip_prefix("model: ").unwrap_or(s.message());
        Status::new(s.code(), format!("controlnet: {message}"))
    };
    for net in &mut params.controlnets {
        let given = net.path.to_string_lossy().into_owned();
        let path = match roots.resolve(&given, "").map_err(|e| field(repo_status(e)))? {
            ModelRef::Local(path) => path,
            ModelRef::Hub { repo_id, .. } => {
                return Err(Status::unimplemented(format!(
                    "controlnet: {repo_id}: ControlNets are not fetched from the hub yet; give a local folder"
                )))
            }
        };
        let class = std::fs::read_to_string(path.join("config.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|config| config["_class_name"].as_str().map(str::to_string));
        match class.as_deref() {
            Some(autopipe_pipelines::steps::components::CONTROLNET_CLASS) => net.path = path,
            Some(other) => {
                return Err(Status::invalid_argument(format!(
                    "controlnet: {given} holds a {other}, not a ControlNetModel"
                )))
            }
            None => {
                return Err(Status::invalid_argument(format!(
                    "controlnet: {given} has no readable config.json naming its _class_name"
                )))
            }
        }
    }
    Ok(())
}
