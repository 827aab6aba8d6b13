//! The `autopipe.v1.Orchestrator` gRPC service: admission control, deadlines and cancellation
//! (checked before every denoising step), progress streaming, health, reflection and drain.

use crate::metrics::{spawn_metrics_server, Metrics};
use crate::{Limits, Orchestrator};
use autopipe_pipelines::{PipelineError, Progress, StepObserver};
use autopipe_proto::auth::Authenticate;
use autopipe_proto::tls::ServerTls;
use autopipe_proto::transport::{self, Address, Incoming, MAX_MESSAGE_BYTES};
use autopipe_proto::v1::{self, orchestrator_server::OrchestratorServer};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// Server settings shared by `autopipe-orchestrator` and `autopipe serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: Address,
    /// Requests generating at once.
    pub max_concurrency: usize,
    /// Requests waiting for a slot before new ones are refused with RESOURCE_EXHAUSTED.
    pub max_queue: usize,
    /// How long in-flight requests may run after SIGTERM before they are stopped (UNAVAILABLE).
    pub drain_timeout: Duration,
    /// Where to serve Prometheus metrics (`host:port`, `GET /metrics`); `None` = nowhere.
    pub metrics_listen: Option<String>,
    /// Models to warm up ([`Orchestrator::warm_up`]) before the Orchestrator service reports
    /// SERVING (readiness); the server as a whole ("" , liveness) serves from the start.
    pub preload: Vec<String>,
    /// Bearer tokens the Orchestrator service requires (`--auth-tokens-file`); health and
    /// reflection stay open for probes.
    pub auth: Authenticate,
    /// What one request may ask (`--max-*`).
    pub limits: Limits,
    /// TLS on a TCP `listen` (`--tls-*`); `None` = plaintext.
    pub tls: Option<ServerTls>,
    /// Where to serve grpc.health.v1 alone, in plaintext, for probes (`--health-listen`).
    pub health_listen: Option<Address>,
}

/// Bounded concurrency plus a bounded queue (TGI-style admission).
struct Admission {
    slots: Arc<Semaphore>,
    concurrency: usize,
    waiting: AtomicUsize,
    max_queue: usize,
    /// Moving average of how long a request holds a slot, in ms (0 = none seen yet): the retry hint.
    mean_ms: AtomicU64,
}

impl Admission {
    /// How long a refused client should wait: about one slot's turnover per request ahead of it.
    fn retry_after_ms(&self) -> u64 {
        match self.mean_ms.load(Ordering::Relaxed) {
            0 => 1000,
            mean => {
                let ahead = self.waiting.load(Ordering::Relaxed) as u64 + 1;
                (mean * ahead / self.concurrency.max(1) as u64).clamp(100, 60_000)
            }
        }
    }

    fn record(&self, held: Duration) {
        let ms = (held.as_millis() as u64).max(1);
        let old = self.mean_ms.load(Ordering::Relaxed);
        let new = if old == 0 { ms } else { (old * 7 + ms) / 8 };
        self.mean_ms.store(new.max(1), Ordering::Relaxed);
    }
}

/// The gRPC face of an [`Orchestrator`].
#[derive(Clone)]
pub struct OrchestratorService {
    inner: Arc<Orchestrator>,
    admission: Arc<Admission>,
    /// Set on SIGTERM: refuse new work, finish what was admitted.
    draining: Arc<AtomicBool>,
    /// Set when the drain timeout passes: running pipelines stop at their next step.
    stopping: Arc<AtomicBool>,
    /// Requests admitted or queued and not finished (their blocking work included).
    active: Arc<AtomicUsize>,
    limits: Arc<Limits>,
    /// Calls in flight per client connection (TCP peer address), for `--max-concurrent-streams`.
    streams: Arc<Mutex<HashMap<SocketAddr, u32>>>,
}

/// One call counted against its connection's `--max-concurrent-streams` until dropped.
struct StreamSlot {
    streams: Arc<Mutex<HashMap<SocketAddr, u32>>>,
    peer: SocketAddr,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = streams.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                streams.remove(&self.peer);
            }
        }
    }
}

/// Sets a flag when dropped: a call whose client went away (or whose deadline passed) drops the
/// future awaiting the pipeline, and the pipeline sees the flag before its next step.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Counts a request in `active` (and optionally the in-flight gauge) until dropped.
struct Counted {
    active: Option<Arc<AtomicUsize>>,
    metrics: Option<Arc<Metrics>>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(a) = &self.active {
            a.fetch_sub(1, Ordering::SeqCst);
        }
        if let Some(m) = &self.metrics {
            m.in_flight_add(-1);
        }
    }
}

/// A place in the admission queue, given back when dropped (also when the client gives up waiting).
struct QueueSlot<'a> {
    admission: &'a Admission,
    metrics: &'a Metrics,
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.admission.waiting.fetch_sub(1, Ordering::SeqCst);
        self.metrics.queue_add(-1);
    }
}

/// Counts a request in the metrics when it ends, as CANCELLED if its caller went away first.
struct Outcome {
    metrics: Arc<Metrics>,
    task: &'static str,
    model: String,
    started: Instant,
    done: bool,
}

impl Outcome {
    fn done(&mut self, code: tonic::Code) {
        self.done = true;
        self.metrics
            .request_done(self.task, &self.model, code, self.started.elapsed());
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.request_done(
                self.task,
                &self.model,
                tonic::Code::Cancelled,
                self.started.elapsed(),
            );
        }
    }
}

struct RequestObserver {
    cancelled: Arc<AtomicBool>,
    stopping: Arc<AtomicBool>,
    deadline: Option<Instant>,
    events: Option<mpsc::Sender<Result<v1::GenerateEvent, Status>>>,
    metrics: Arc<Metrics>,
    /// When the current step began: `should_stop` is called right before every step.
    step_started: Mutex<Option<Instant>>,
    /// How long the last step took: the next one is expected to take as long.
    last_step: Mutex<Option<Duration>>,
}

impl StepObserver for RequestObserver {
    fn on_step(&self, p: Progress) {
        if let Some(t) = self
            .step_started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let took = t.elapsed();
            self.metrics.step(took);
            *self.last_step.lock().unwrap_or_else(|e| e.into_inner()) = Some(took);
        }
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
        *self.step_started.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        if self.cancelled.load(Ordering::SeqCst)
            || self.events.as_ref().is_some_and(|tx| tx.is_closed())
        {
            return Some(PipelineError::Cancelled);
        }
        // Stop when the next step cannot finish in time: answering now, not after overrunning,
        // is what lets the client see the server's DEADLINE_EXCEEDED.
        let next = self
            .last_step
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or_default();
        if self.deadline.is_some_and(|d| Instant::now() + next >= d) {
            return Some(PipelineError::DeadlineExceeded);
        }
        if self.stopping.load(Ordering::SeqCst) {
            return Some(PipelineError::Unavailable);
        }
        None
    }
}

/// Parses the `grpc-timeout` header (e.g. `250m`, `3S`).
fn grpc_timeout<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The caller's `x-request-id` (printable ASCII, ≤ 128 bytes) or a new UUID.
fn request_id<T>(req: &Request<T>) -> String {
    req.metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// The task field as a metrics label.
fn task_label(task: i32) -> &'static str {
    match v1::Task::try_from(task) {
        Ok(v1::Task::Text2img) => "text2img",
        Ok(v1::Task::Img2img) => "img2img",
        Ok(v1::Task::Inpaint) => "inpaint",
        Ok(v1::Task::Unspecified) => "unspecified",
        Err(_) => "invalid",
    }
}

/// How long before a deadline autopipe answers, given the time `allowed` from the call's arrival:
/// the answer has to reach the client before the client's own timer fires (tonic's ends the call
/// locally with CANCELLED, "Timeout expired"), and that timer started before the call arrived.
/// 5 % of the time allowed, between 20 ms and 250 ms, covers a loaded machine's scheduling delays.
fn deadline_margin(allowed: Duration) -> Duration {
    (allowed / 20).clamp(Duration::from_millis(20), Duration::from_millis(250))
}

impl OrchestratorService {
    /// A service over `inner` with the given admission limits.
    pub fn new(inner: Arc<Orchestrator>, max_concurrency: usize, max_queue: usize) -> Self {
        let concurrency = max_concurrency.max(1);
        Self {
            inner,
            admission: Arc::new(Admission {
                slots: Arc::new(Semaphore::new(concurrency)),
                concurrency,
                waiting: AtomicUsize::new(0),
                max_queue,
                mean_ms: AtomicU64::new(0),
            }),
            draining: Arc::new(AtomicBool::new(false)),
            stopping: Arc::new(AtomicBool::new(false)),
            active: Arc::new(AtomicUsize::new(0)),
            limits: Arc::new(Limits::unlimited()),
            streams: Arc::default(),
        }
    }

    /// The same service enforcing `limits`.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = Arc::new(limits);
        self
    }

    /// Counts a call against its connection; RESOURCE_EXHAUSTED beyond `--max-concurrent-streams`.
    /// Calls over a Unix socket have no peer to tell connections apart and are not counted.
    fn stream_slot<T>(&self, req: &Request<T>) -> Result<Option<StreamSlot>, Status> {
        let Some(peer) = req.remote_addr() else {
            return Ok(None);
        };
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let n = streams.entry(peer).or_insert(0);
        if *n >= self.limits.max_concurrent_streams {
            return Err(self.limits.too_many_streams());
        }
        *n += 1;
        Ok(Some(StreamSlot {
            streams: self.streams.clone(),
            peer,
        }))
    }

    /// Whether a drain has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Refuses new work from now on (in-flight requests finish).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Requests admitted or queued and not yet finished.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Refuses new work, waits up to `timeout` for admitted requests to finish, then stops the
    /// rest at their next denoising step (they answer UNAVAILABLE and release their leases).
    pub async fn drain(&self, timeout: Duration) {
        self.start_draining();
        let deadline = tokio::time::Instant::now() + timeout;
        while self.active() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.active() > 0 {
            tracing::warn!(
                active = self.active(),
                "drain timeout passed; stopping in-flight requests"
            );
            self.stopping.store(true, Ordering::SeqCst);
            // One step (or a decode) may still be running; give it a moment to notice.
            let grace = tokio::time::Instant::now() + Duration::from_secs(5);
            while self.active() > 0 && tokio::time::Instant::now() < grace {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    async fn admit(&self) -> Result<OwnedSemaphorePermit, Status> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(Status::unavailable(
                "server is draining (shutting down); retry on another replica",
            ));
        }
        if let Ok(permit) = self.admission.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.admission.waiting.fetch_add(1, Ordering::SeqCst) >= self.admission.max_queue {
            self.admission.waiting.fetch_sub(1, Ordering::SeqCst);
            let retry = self.admission.retry_after_ms();
            let mut s = Status::resource_exhausted(format!(
                "queue full: {} generating and {} waiting; retry after {retry} ms",
                self.admission.concurrency, self.admission.max_queue
            ));
            s.metadata_mut().insert(
                "retry-after-ms",
                tonic::metadata::MetadataValue::from(retry),
            );
            return Err(s);
        }
        let metrics = self.inner.metrics();
        metrics.queue_add(1);
        let _slot = QueueSlot {
            admission: &self.admission,
            metrics,
        };
        self.admission
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("server is shutting down"))
    }

    async fn run(
        &self,
        req: Request<v1::GenerateRequest>,
        events: Option<mpsc::Sender<Result<v1::GenerateEvent, Status>>>,
        cancelled: Arc<AtomicBool>,
    ) -> Result<v1::GenerateResponse, Status> {
        let started = Instant::now();
        let arrived = transport::arrived(&req).unwrap_or(started);
        let asked = grpc_timeout(&req).and_then(|d| arrived.checked_add(d));
        // The operator's cap applies whatever the client asked (or when it asked for nothing).
        let cap = arrived.checked_add(self.limits.max_deadline());
        let deadline = match (asked, cap) {
            (Some(a), Some(c)) => Some(a.min(c)),
            (a, c) => a.or(c),
        };
        let capped = cap.is_some() && deadline == cap;
        // When autopipe answers: the deadline less the margin its answer needs to arrive in time.
        let deadline = deadline.map(|d| {
            d.checked_sub(deadline_margin(d.saturating_duration_since(arrived)))
                .unwrap_or(d)
        });
        let id = request_id(&req);
        let task = task_label(req.get_ref().task);
        let model = req.get_ref().model.trim().to_string();
        let span = tracing::info_span!("generate", request_id = %id, model = %model, task);
        let mut outcome = Outcome {
            metrics: self.inner.metrics().clone(),
            task,
            model,
            started,
            done: false,
        };
        let _slot = self.stream_slot(&req);
        let checked = match &_slot {
            Err(s) => Err(s.clone()),
            Ok(_) => self.limits.check(req.get_ref()),
        };
        let work = async {
            checked?;
            self.run_admitted(req, id.clone(), deadline, events, cancelled)
                .await
        }
        .instrument(span.clone());
        let result = match deadline {
            Some(d) => {
                match tokio::time::timeout_at(tokio::time::Instant::from_std(d), work).await {
                    Ok(r) => r,
                    Err(_) => Err(Status::deadline_exceeded(
                        "deadline exceeded (grpc-timeout)",
                    )),
                }
            }
            None => work.await,
        };
        let result = result.map_err(|s| match s.code() {
            tonic::Code::DeadlineExceeded if capped => Status::deadline_exceeded(format!(
                "deadline exceeded: requests run at most {} s on this server (--max-deadline)",
                self.limits.max_deadline
            )),
            _ => s,
        });
        outcome.done(
            result
                .as_ref()
                .map(|_| tonic::Code::Ok)
                .unwrap_or_else(|s| s.code()),
        );
        span.in_scope(|| match &result {
            Ok(r) => tracing::info!(ms = started.elapsed().as_millis() as u64, pipeline = %r.pipeline, "ok"),
            Err(s) => tracing::info!(code = ?s.code(), message = %s.message(), "failed"),
        });
        result.map_err(|mut s| {
            if let Ok(v) = tonic::metadata::MetadataValue::try_from(id.as_str()) {
                s.metadata_mut().insert("x-request-id", v);
            }
            s
        })
    }

    async fn run_admitted(
        &self,
        req: Request<v1::GenerateRequest>,
        id: String,
        deadline: Option<Instant>,
        events: Option<mpsc::Sender<Result<v1::GenerateEvent, Status>>>,
        cancelled: Arc<AtomicBool>,
    ) -> Result<v1::GenerateResponse, Status> {
        self.active.fetch_add(1, Ordering::SeqCst);
        let active = Counted {
            active: Some(self.active.clone()),
            metrics: None,
        };
        let permit = self.admit().await?;
        let metrics = self.inner.metrics().clone();
        metrics.in_flight_add(1);
        let in_flight = Counted {
            active: None,
            metrics: Some(metrics.clone()),
        };
        let observer = RequestObserver {
            cancelled: cancelled.clone(),
            stopping: self.stopping.clone(),
            deadline,
            events,
            metrics,
            step_started: Mutex::new(None),
            last_step: Mutex::new(None),
        };
        let inner = self.inner.clone();
        let admission = self.admission.clone();
        let body = req.into_inner();
        let span = tracing::Span::current();
        let handle = tokio::task::spawn_blocking(move || {
            // The slot and the counts are held until the pipeline really ends, even when the
            // caller stopped waiting for it.
            let (_permit, _active, _in_flight) = (permit, active, in_flight);
            let _e = span.enter();
            let held = Instant::now();
            let result = inner.generate(&body, &id, &observer);
            admission.record(held.elapsed());
            result
        });
        let _cancel_if_dropped = CancelOnDrop(cancelled);
        handle
            .await
            .map_err(|e| Status::internal(format!("generation task failed: {e}")))?
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl v1::orchestrator_server::Orchestrator for OrchestratorService {
    async fn generate(
        &self,
        req: Request<v1::GenerateRequest>,
    ) -> Result<Response<v1::GenerateResponse>, Status> {
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
            // A client that goes away also stops a request still waiting in the queue.
            let result = tokio::select! {
                r = this.run(req, Some(tx.clone()), cancelled) => r,
                _ = tx.closed() => return,
            };
            let event = result.map(|r| v1::GenerateEvent {
                event: Some(v1::generate_event::Event::Result(r)),
            });
            let _ = tx.send(event).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn resolve(
        &self,
        req: Request<v1::ResolveRequest>,
    ) -> Result<Response<v1::ResolveResponse>, Status> {
        let _slot = self.stream_slot(&req)?;
        let inner = self.inner.clone();
        let body = req.into_inner();
        tokio::task::spawn_blocking(move || inner.resolve(&body))
            .await
            .map_err(|e| Status::internal(format!("resolve task failed: {e}")))?
            .map(Response::new)
    }
}

/// Serves the orchestrator (plus grpc.health.v1, reflection and, with `metrics_listen`, Prometheus
/// metrics) until `shutdown` resolves, then drains: health goes NOT_SERVING and new requests get
/// UNAVAILABLE while the listener stays open, admitted requests get `drain_timeout` to finish
/// (then stop at their next step), and the server stops. `bound` receives the address listened on.
pub async fn serve(
    orchestrator: Arc<Orchestrator>,
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    bound: Option<tokio::sync::oneshot::Sender<Address>>,
) -> anyhow::Result<()> {
    if let Some(listen) = &options.metrics_listen {
        spawn_metrics_server(orchestrator.metrics().clone(), listen)
            .await
            .map_err(|e| anyhow::anyhow!("--metrics-listen {listen}: {e}"))?;
    }
    let service = OrchestratorService::new(
        orchestrator.clone(),
        options.max_concurrency,
        options.max_queue,
    )
    .with_limits(options.limits.clone());
    let (health, health_service) = tonic_health::server::health_reporter();
    if options.preload.is_empty() {
        health
            .set_serving::<OrchestratorServer<OrchestratorService>>()
            .await;
    } else {
        health
            .set_not_serving::<OrchestratorServer<OrchestratorService>>()
            .await;
    }
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(autopipe_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    if let Some(health_listen) = &options.health_listen {
        transport::serve_health(health_listen, health_service.clone()).await?;
    }
    let incoming = Incoming::bind(&options.listen, options.tls.as_ref()).await?;
    let local = incoming.local_address();
    tracing::info!(
        listen = %local,
        mtls = options.tls.as_ref().is_some_and(ServerTls::verifies_clients),
        "orchestrator serving"
    );
    if let Some(tx) = bound {
        let _ = tx.send(local);
    }
    let drain_service = service.clone();
    let (warm_up_failed, warm_up_failure) = tokio::sync::oneshot::channel();
    if !options.preload.is_empty() {
        tokio::spawn(warm_up(
            orchestrator,
            options.preload.clone(),
            health.clone(),
            service.clone(),
            warm_up_failed,
        ));
    }
    let router = transport::server()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(RequestBytesLimit {
            inner: tonic::service::interceptor::InterceptedService::new(
                OrchestratorServer::new(service)
                    .max_decoding_message_size(
                        options.limits.max_request_bytes.min(MAX_MESSAGE_BYTES),
                    )
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
                options.auth.clone(),
            ),
            limits: Arc::new(options.limits.clone()),
        });
    // Drain while still accepting connections, so probes see NOT_SERVING and late clients get a
    // clear UNAVAILABLE instead of a refused connection; only then stop the server.
    let drain_timeout = options.drain_timeout;
    let drained = async move {
        shutdown.await;
        tracing::info!(
            timeout_s = drain_timeout.as_secs_f64(),
            active = drain_service.active(),
            "draining"
        );
        drain_service.start_draining();
        health
            .set_not_serving::<OrchestratorServer<OrchestratorService>>()
            .await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        drain_service.drain(drain_timeout).await;
    };
    // What is left after the drain is sending the last responses.
    let served =
        transport::serve_with_drain(router, incoming, drained, async {}, Duration::from_secs(5));
    tokio::select! {
        r = served => r?,
        Ok(e) = warm_up_failure => return Err(e),
    }
    Ok(())
}

/// Warms up `models` one after the other, then reports the Orchestrator service SERVING (unless a
/// drain began meanwhile). A store that is not up yet (UNAVAILABLE) is retried every 2 s; any other
/// error (a model that does not exist, cannot be resolved, does not fit) is sent to `failed`,
/// which stops the server: a misconfigured replica fails visibly instead of never becoming ready.
async fn warm_up(
    orchestrator: Arc<Orchestrator>,
    models: Vec<String>,
    health: tonic_health::server::HealthReporter,
    service: OrchestratorService,
    failed: tokio::sync::oneshot::Sender<anyhow::Error>,
) {
    for model in models {
        let started = std::time::Instant::now();
        loop {
            let (o, m) = (orchestrator.clone(), model.clone());
            let result = tokio::task::spawn_blocking(move || o.warm_up(&m))
                .await
                .unwrap_or_else(|e| Err(Status::internal(format!("warm-up task failed: {e}"))));
            match result {
                Ok(components) => {
                    tracing::info!(%model, ?components, took_s = started.elapsed().as_secs_f64(), "warmed up");
                    break;
                }
                Err(s) if s.code() == tonic::Code::Unavailable && !service.is_draining() => {
                    tracing::warn!(%model, error = %s.message(), "warm-up: store unavailable, retrying in 2 s");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Err(s) => {
                    let _ = failed.send(anyhow::anyhow!(
                        "--preload {model}: {:?}: {}",
                        s.code(),
                        s.message()
                    ));
                    return;
                }
            }
        }
    }
    if !service.is_draining() {
        health
            .set_serving::<OrchestratorServer<OrchestratorService>>()
            .await;
    }
}

/// tonic refuses a request message over its decoding limit itself, before any handler runs, with
/// OUT_OF_RANGE and words of its own; this wrapper gives that refusal autopipe's status for it
/// (RESOURCE_EXHAUSTED naming the limit and `--max-request-bytes`). Only the status headers of
/// such a refusal are rewritten.
#[derive(Clone)]
struct RequestBytesLimit<S> {
    inner: S,
    limits: Arc<Limits>,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for RequestBytesLimit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>>
    for RequestBytesLimit<S>
where
    S: tonic::codegen::Service<
        tonic::codegen::http::Request<tonic::body::Body>,
        Response = tonic::codegen::http::Response<B>,
        Error = std::convert::Infallible,
    >,
    S::Future: Send + 'static,
{
    type Response = tonic::codegen::http::Response<B>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        let response = self.inner.call(req);
        let limits = self.limits.clone();
        Box::pin(async move {
            let mut response = response.await?;
            // tonic's refusal carries its Status in the response extensions (Status::into_http).
            let too_large = response.extensions().get::<Status>().is_some_and(|s| {
                s.code() == tonic::Code::OutOfRange
                    && s.message().contains("decoded message length too large")
            });
            if too_large {
                let status = limits.request_too_large();
                let headers = response.headers_mut();
                headers.remove("grpc-message");
                if status.add_header(headers).is_ok() {
                    response.extensions_mut().insert(status);
                }
            }
            Ok(response)
        })
    }
}
