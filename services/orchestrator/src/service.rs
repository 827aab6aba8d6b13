//! The `autopipe.v1.Orchestrator` gRPC service: admission control, deadlines and cancellation
//! (checked before every denoising step), progress streaming, health, reflection and drain.

use crate::Orchestrator;
use autopipe_pipelines::{PipelineError, Progress, StepObserver};
use autopipe_proto::transport::{self, Address, Incoming, MAX_MESSAGE_BYTES};
use autopipe_proto::v1::{self, orchestrator_server::OrchestratorServer};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Server settings shared by `autopipe-orchestrator` and `autopipe serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: Address,
    /// Requests generating at once.
    pub max_concurrency: usize,
    /// Requests waiting for a slot before new ones are refused with RESOURCE_EXHAUSTED.
    pub max_queue: usize,
    /// How long in-flight requests may run after SIGTERM before the server stops anyway.
    pub drain_timeout: Duration,
}

/// Bounded concurrency plus a bounded queue (TGI-style admission).
struct Admission {
    slots: Semaphore,
    waiting: AtomicUsize,
    max_queue: usize,
}

/// The gRPC face of an [`Orchestrator`].
#[derive(Clone)]
pub struct OrchestratorService {
    inner: Arc<Orchestrator>,
    admission: Arc<Admission>,
    draining: Arc<AtomicBool>,
}

/// Sets a flag when dropped: a unary call whose client went away drops its handler future.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

struct RequestObserver {
    cancelled: Arc<AtomicBool>,
    draining: Arc<AtomicBool>,
    deadline: Option<Instant>,
    events: Option<mpsc::Sender<Result<v1::GenerateEvent, Status>>>,
}

impl StepObserver for RequestObserver {
    fn on_step(&self, p: Progress) {
        if let Some(tx) = &self.events {
            let event = v1::GenerateEvent {
                event: Some(v1::generate_event::Event::Progress(v1::Progress {
                    step: p.step,
                    total_steps: p.total_steps,
                    timestep: p.timestep,
                })),
            };
            // A full or closed channel only loses a progress event; should_stop notices a closed one.
            let _ = tx.try_send(Ok(event));
        }
    }

    fn should_stop(&self) -> Option<PipelineError> {
        if self.cancelled.load(Ordering::SeqCst) || self.events.as_ref().is_some_and(|tx| tx.is_closed()) {
            return Some(PipelineError::Cancelled);
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Some(PipelineError::DeadlineExceeded);
        }
        let _ = &self.draining;
        None
    }
}

/// Parses the `grpc-timeout` header (e.g. `250m`, `3S`).
fn grpc_timeout<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn request_id<T>(req: &Request<T>) -> String {
    req.metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

impl OrchestratorService {
    /// A service over `inner` with the given admission limits.
    pub fn new(inner: Arc<Orchestrator>, max_concurrency: usize, max_queue: usize) -> Self {
        Self {
            inner,
            admission: Arc::new(Admission {
                slots: Semaphore::new(max_concurrency.max(1)),
                waiting: AtomicUsize::new(0),
                max_queue,
            }),
            draining: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Refuses new work from now on (in-flight requests finish).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    async fn admit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Status> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(Status::unavailable("server is draining; retry on another replica"));
        }
        if let Ok(permit) = self.admission.slots.try_acquire() {
            return Ok(permit);
        }
        if self.admission.waiting.fetch_add(1, Ordering::SeqCst) >= self.admission.max_queue {
            self.admission.waiting.fetch_sub(1, Ordering::SeqCst);
            let mut s = Status::resource_exhausted("queue full: too many requests in flight; retry later");
            s.metadata_mut().insert("retry-after-ms", tonic::metadata::MetadataValue::from_static("1000"));
            return Err(s);
        }
        let permit = self.admission.slots.acquire().await;
        self.admission.waiting.fetch_sub(1, Ordering::SeqCst);
        permit.map_err(|_| Status::unavailable("server is shutting down"))
    }

    async fn run(
        &self,
        req: Request<v1::GenerateRequest>,
        events: Option<mpsc::Sender<Result<v1::GenerateEvent, Status>>>,
        cancelled: Arc<AtomicBool>,
    ) -> Result<v1::GenerateResponse, Status> {
        let deadline = grpc_timeout(&req).map(|d| Instant::now() + d);
        let id = request_id(&req);
        let _permit = self.admit().await?;
        let observer = RequestObserver { cancelled, draining: self.draining.clone(), deadline, events };
        let inner = self.inner.clone();
        let body = req.into_inner();
        let span = tracing::info_span!("generate", request_id = %id, model = %body.model, task = body.task);
        tokio::task::spawn_blocking(move || {
            let _e = span.enter();
            let started = Instant::now();
            let result = inner.generate(&body, &id, &observer);
            match &result {
                Ok(r) => tracing::info!(ms = started.elapsed().as_millis() as u64, pipeline = %r.pipeline, "ok"),
                Err(s) => tracing::info!(code = ?s.code(), message = %s.message(), "failed"),
            }
            result
        })
        .await
        .map_err(|e| Status::internal(format!("generation task failed: {e}")))?
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl v1::orchestrator_server::Orchestrator for OrchestratorService {
    async fn generate(&self, req: Request<v1::GenerateRequest>) -> Result<Response<v1::GenerateResponse>, Status> {
        let cancelled = Arc::new(AtomicBool::new(false));
        let _cancel = CancelOnDrop(cancelled.clone());
        self.run(req, None, cancelled).await.map(Response::new)
    }

    type GenerateStreamStream = EventStream;

    async fn generate_stream(
        &self,
        req: Request<v1::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            let cancelled = Arc::new(AtomicBool::new(false));
            let result = this.run(req, Some(tx.clone()), cancelled).await;
            let event = result.map(|r| v1::GenerateEvent { event: Some(v1::generate_event::Event::Result(r)) });
            let _ = tx.send(event).await;
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn resolve(&self, req: Request<v1::ResolveRequest>) -> Result<Response<v1::ResolveResponse>, Status> {
        let inner = self.inner.clone();
        let body = req.into_inner();
        tokio::task::spawn_blocking(move || inner.resolve(&body))
            .await
            .map_err(|e| Status::internal(format!("resolve task failed: {e}")))?
            .map(Response::new)
    }
}

/// Serves the orchestrator (plus grpc.health.v1 and reflection) until `shutdown` resolves, then
/// drains: health goes NOT_SERVING, new requests get UNAVAILABLE, in-flight ones get
/// `drain_timeout` to finish. `bound` receives the address actually listened on.
pub async fn serve(
    orchestrator: Arc<Orchestrator>,
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    bound: Option<tokio::sync::oneshot::Sender<Address>>,
) -> anyhow::Result<()> {
    let service = OrchestratorService::new(orchestrator, options.max_concurrency, options.max_queue);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<OrchestratorServer<OrchestratorService>>().await;
    health.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(autopipe_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let incoming = Incoming::bind(&options.listen).await?;
    let local = incoming.local_address();
    tracing::info!(listen = %local, "orchestrator serving");
    if let Some(tx) = bound {
        let _ = tx.send(local);
    }
    let drain_service = service.clone();
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            OrchestratorServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        );
    let on_drain = async move {
        drain_service.start_draining();
        health.set_not_serving::<OrchestratorServer<OrchestratorService>>().await;
        health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    };
    transport::serve_with_drain(router, incoming, shutdown, on_drain, options.drain_timeout).await?;
    Ok(())
}
