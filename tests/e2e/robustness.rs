//! Orchestrator robustness with the real binaries on loopback: admission control, cancellation
//! and deadlines between denoising steps, store and orchestrator crashes, graceful drain on
//! SIGTERM, large messages, metrics and request ids. Every test checks the store's Stats at the
//! end: no lease is left behind.

use autopipe_e2e::*;
use autopipe_proto::v1;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::Code;

/// A text2img request on sd1-tiny that would run for a long time (`steps` steps of a 128×128
/// image): slow enough to cancel, kill or drain in the middle of.
fn slow_request(steps: u32) -> v1::GenerateRequest {
    let mut req = reference_request("sd1_t2i_euler");
    req.width = 128;
    req.height = 128;
    req.num_inference_steps = Some(steps);
    req
}

/// A quick request (2 steps at 64×64).
fn quick_request() -> v1::GenerateRequest {
    let mut req = reference_request("sd1_t2i_euler");
    req.num_inference_steps = Some(2);
    req
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn metrics_port() -> String {
    format!("127.0.0.1:{}", free_port())
}

type Events = tonic::Streaming<v1::GenerateEvent>;

/// Starts a GenerateStream and waits for its `n`-th progress event.
async fn stream_until_step(
    split_orch: &autopipe_proto::transport::Address,
    req: v1::GenerateRequest,
    n: u32,
) -> Events {
    let mut stream = orchestrator_client(split_orch)
        .await
        .generate_stream(req)
        .await
        .expect("stream starts")
        .into_inner();
    loop {
        match stream
            .next()
            .await
            .expect("stream ended early")
            .expect("stream error")
            .event
        {
            Some(v1::generate_event::Event::Progress(p)) if p.step >= n => return stream,
            Some(v1::generate_event::Event::Result(_)) => {
                panic!("request finished before step {n}")
            }
            _ => {}
        }
    }
}

/// What a stream ends with: its result or its error.
async fn stream_outcome(mut stream: Events) -> Result<v1::GenerateResponse, tonic::Status> {
    while let Some(ev) = stream.next().await {
        if let Some(v1::generate_event::Event::Result(r)) = ev?.event {
            return Ok(r);
        }
    }
    Err(tonic::Status::unknown("stream ended without a result"))
}

fn leases(split: &Split) -> u32 {
    split.stats().active_leases
}

#[test]
fn admission_refuses_past_the_queue_with_a_retry_hint() {
    let m = metrics_port();
    let split = Split::start_with(
        &[],
        &[
            "--max-concurrency",
            "1",
            "--max-queue",
            "0",
            "--metrics-listen",
            &m,
        ],
    );
    let rt = runtime();
    let addr = split.orchestrator.address.clone();
    let running = rt.block_on(stream_until_step(&addr, slow_request(1000), 1));
    let err = rt
        .block_on(async {
            orchestrator_client(&addr)
                .await
                .generate(quick_request())
                .await
        })
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let retry: u64 = err
        .metadata()
        .get("retry-after-ms")
        .expect("retry-after-ms")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((100..=60_000).contains(&retry), "retry-after-ms {retry}");
    println!(
        "second request: {:?} {:?} (retry-after-ms {retry})",
        err.code(),
        err.message()
    );
    let text = scrape(&m);
    assert_eq!(
        metric_sum(
            &text,
            "autopipe_requests_total",
            &["status=\"resource_exhausted\""]
        ),
        1.0
    );
    assert_eq!(metric(&text, "autopipe_requests_in_flight"), 1.0);
    assert_eq!(metric(&text, "autopipe_queue_depth"), 0.0);

    // Freeing the slot admits the next request.
    drop(running);
    wait_until(Duration::from_secs(10), || {
        metric(&scrape(&m), "autopipe_requests_in_flight") == 0.0
    })
    .expect("slot freed");
    let ok = rt.block_on(async {
        orchestrator_client(&addr)
            .await
            .generate(quick_request())
            .await
    });
    assert!(ok.is_ok(), "{ok:?}");
    assert_eq!(leases(&split), 0);
}

#[test]
fn a_queued_request_waits_for_the_slot() {
    let split = Split::start_with(&[], &["--max-concurrency", "1", "--max-queue", "1"]);
    let rt = runtime();
    let addr = split.orchestrator.address.clone();
    let (a, b) = rt.block_on(async {
        let a = tokio::spawn({
            let addr = addr.clone();
            async move {
                orchestrator_client(&addr)
                    .await
                    .generate(quick_request())
                    .await
            }
        });
        let b = tokio::spawn({
            let addr = addr.clone();
            async move {
                orchestrator_client(&addr)
                    .await
                    .generate(quick_request())
                    .await
            }
        });
        (a.await.unwrap(), b.await.unwrap())
    });
    assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
    assert_eq!(
        a.unwrap().into_inner().images[0].png,
        b.unwrap().into_inner().images[0].png,
        "same seed, same image"
    );
}

#[test]
fn cancelling_a_stream_stops_within_one_step_and_releases_the_lease() {
    let m = metrics_port();
    let split = Split::start_with(&[], &["--metrics-listen", &m]);
    let rt = runtime();
    let stream = rt.block_on(stream_until_step(
        &split.orchestrator.address,
        slow_request(1000),
        3,
    ));
    assert_eq!(leases(&split), 1);
    let seen = metric(&scrape(&m), "autopipe_denoise_step_seconds_count");
    let t = Instant::now();
    drop(stream);
    let released = wait_until(Duration::from_secs(10), || leases(&split) == 0)
        .expect("lease released after cancel");
    let steps = metric(&scrape(&m), "autopipe_denoise_step_seconds_count");
    println!("stream cancelled after {seen} steps: {steps} steps ran in all, lease released {released:?} after the cancel");
    assert!(
        steps <= seen + 2.0,
        "work went on after the cancel: {steps} steps ran, {seen} when cancelled"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        metric(&scrape(&m), "autopipe_denoise_step_seconds_count"),
        steps,
        "steps still running"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    let text = scrape(&m);
    assert_eq!(
        metric_sum(&text, "autopipe_requests_total", &["status=\"cancelled\""]),
        1.0,
        "{text}"
    );
    assert_eq!(metric(&text, "autopipe_requests_in_flight"), 0.0);
}

#[test]
fn cancelling_a_unary_call_stops_the_work() {
    let m = metrics_port();
    let split = Split::start_with(&[], &["--metrics-listen", &m]);
    let rt = runtime();
    let addr = split.orchestrator.address.clone();
    let call = rt.spawn(async move {
        orchestrator_client(&addr)
            .await
            .generate(slow_request(1000))
            .await
    });
    wait_until(Duration::from_secs(30), || {
        metric(&scrape(&m), "autopipe_denoise_step_seconds_count") >= 2.0
    })
    .expect("steps run");
    let seen = metric(&scrape(&m), "autopipe_denoise_step_seconds_count");
    call.abort();
    let released = wait_until(Duration::from_secs(10), || leases(&split) == 0)
        .expect("lease released after cancel");
    let steps = metric(&scrape(&m), "autopipe_denoise_step_seconds_count");
    println!("unary call dropped after {seen} steps: {steps} ran in all, lease released {released:?} later");
    assert!(
        steps <= seen + 2.0,
        "work went on after the cancel: {steps} vs {seen}"
    );
}

#[test]
fn a_deadline_stops_the_work_with_deadline_exceeded() {
    let m = metrics_port();
    let split = Split::start_with(&[], &["--metrics-listen", &m]);
    let rt = runtime();
    let addr = split.orchestrator.address.clone();
    // Warm the store first, so the deadline falls in the denoising loop rather than the load.
    rt.block_on(async {
        orchestrator_client(&addr)
            .await
            .generate(quick_request())
            .await
    })
    .unwrap();
    let before = metric(&scrape(&m), "autopipe_denoise_step_seconds_count");
    let exceeded = || {
        metric_sum(
            &scrape(&m),
            "autopipe_requests_total",
            &["status=\"deadline_exceeded\""],
        )
    };
    let t = Instant::now();
    let err = rt
        .block_on(async {
            let mut req = tonic::Request::new(slow_request(1000));
            req.set_timeout(Duration::from_millis(1500));
            orchestrator_client(&addr).await.generate(req).await
        })
        .unwrap_err();
    let answered = t.elapsed();
    // What the server did is the assertion: it ended the request with DEADLINE_EXCEEDED. The
    // client's code also depends on whether that answer beat the client's own timer (tonic then
    // says CANCELLED, "Timeout expired"): the server answers a margin early, which a loaded
    // machine may still eat.
    assert!(
        err.code() == Code::DeadlineExceeded || is_client_timeout(&err),
        "{err:?}"
    );
    wait_until(Duration::from_secs(10), || exceeded() == 1.0)
        .expect("the server ended the request with DEADLINE_EXCEEDED");
    assert!(
        answered < Duration::from_secs(4),
        "answered after {answered:?}"
    );
    wait_until(Duration::from_secs(5), || leases(&split) == 0)
        .expect("lease released after the deadline");
    let steps = metric(&scrape(&m), "autopipe_denoise_step_seconds_count") - before;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        metric(&scrape(&m), "autopipe_denoise_step_seconds_count") - before,
        steps,
        "steps still running"
    );
    assert!(steps < 1000.0);

    // The same deadline on a stream arrives as the stream's error.
    let err = rt
        .block_on(async {
            let mut req = tonic::Request::new(slow_request(1000));
            req.set_timeout(Duration::from_millis(1000));
            let stream = orchestrator_client(&addr)
                .await
                .generate_stream(req)
                .await?
                .into_inner();
            stream_outcome(stream).await
        })
        .unwrap_err();
    assert!(
        err.code() == Code::DeadlineExceeded || is_client_timeout(&err),
        "{err:?}"
    );
    wait_until(Duration::from_secs(10), || exceeded() == 2.0)
        .expect("the server ended the stream with DEADLINE_EXCEEDED");
    wait_until(Duration::from_secs(5), || leases(&split) == 0)
        .expect("lease released after the stream deadline");
    println!(
        "deadline 1.5 s: {:?} after {answered:?}, {steps} steps ran",
        err.code()
    );
}

/// The client's own grpc-timeout timer ended the call (tonic's local CANCELLED).
fn is_client_timeout(err: &tonic::Status) -> bool {
    err.code() == Code::Cancelled && err.message() == "Timeout expired"
}

#[test]
fn a_store_restart_fails_the_request_in_flight_and_the_next_one_succeeds() {
    let mut split = Split::start_with(&[], &[]);
    let rt = runtime();
    let addr = split.orchestrator.address.clone();
    let generate = |req: v1::GenerateRequest| {
        rt.block_on(async { orchestrator_client(&addr).await.generate(req).await })
    };
    let stream = rt.block_on(stream_until_step(&addr, slow_request(1000), 2));
    split.store.kill();
    let err = rt.block_on(stream_outcome(stream)).unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    println!(
        "in flight when the store died: {:?} {}",
        err.code(),
        err.message()
    );

    // Straight to a restarted store: the orchestrator's channel reconnects by itself.
    split.store = start_store(&split.store.address, &[]);
    let t = Instant::now();
    let resp = generate(quick_request())
        .expect("the first request after the restart succeeds")
        .into_inner();
    assert_eq!(resp.images.len(), 1);
    println!(
        "after the restart: ok in {:?} (reload included)",
        t.elapsed()
    );
    assert_eq!(leases(&split), 0);

    // While the store is down, new requests fail fast with UNAVAILABLE; then recover again.
    split.store.kill();
    let t = Instant::now();
    let down = generate(quick_request()).unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?} to fail",
        t.elapsed()
    );
    split.store = start_store(&split.store.address, &[]);
    generate(quick_request()).expect("a request after the second restart succeeds");
    assert_eq!(leases(&split), 0);
}

#[test]
fn a_killed_orchestrators_lease_expires_within_the_ttl() {
    let mut split = Split::start_with(&["--lease-ttl", "2"], &[]);
    let rt = runtime();
    let stream = rt.block_on(stream_until_step(
        &split.orchestrator.address,
        slow_request(1000),
        2,
    ));
    assert_eq!(leases(&split), 1);
    split.orchestrator.kill();
    drop(stream);
    let t = Instant::now();
    let gone =
        wait_until(Duration::from_secs(8), || leases(&split) == 0).expect("the lease expires");
    println!("orchestrator killed: its lease expired {gone:?} later (TTL 2 s)");
    // TTL plus the store's 1 s reaper period.
    assert!(
        t.elapsed() <= Duration::from_millis(3500),
        "lease lived {:?}",
        t.elapsed()
    );
}

#[test]
fn sigterm_drains_in_flight_work_and_refuses_new_work() {
    let mut split = Split::start_with(&[], &["--drain-timeout", "20"]);
    let rt = runtime();
    let addr = split.orchestrator.address.clone();
    // About 2 s of work.
    let mut req = slow_request(40);
    req.width = 64;
    req.height = 64;
    let stream = rt.block_on(stream_until_step(&addr, req, 1));
    split.orchestrator.terminate();
    wait_until(Duration::from_secs(5), || {
        split.orchestrator.health()
            == Some(tonic_health::pb::health_check_response::ServingStatus::NotServing)
    })
    .expect("health goes NOT_SERVING");
    let refused = rt
        .block_on(async {
            orchestrator_client(&addr)
                .await
                .generate(quick_request())
                .await
        })
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("draining"), "{refused:?}");
    let finished = rt
        .block_on(stream_outcome(stream))
        .expect("the in-flight request finishes");
    assert_eq!(finished.images.len(), 1);
    let status = split
        .orchestrator
        .wait_exit(Duration::from_secs(10))
        .expect("the orchestrator exits after draining");
    assert!(status.success(), "{status:?}");
    assert_eq!(leases(&split), 0);
}

#[test]
fn the_drain_timeout_stops_what_is_still_running() {
    let mut split = Split::start_with(&[], &["--drain-timeout", "1"]);
    let rt = runtime();
    let stream = rt.block_on(stream_until_step(
        &split.orchestrator.address,
        slow_request(1000),
        1,
    ));
    let t = Instant::now();
    split.orchestrator.terminate();
    let err = rt.block_on(stream_outcome(stream)).unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    split
        .orchestrator
        .wait_exit(Duration::from_secs(10))
        .expect("the orchestrator exits");
    println!(
        "drain timeout 1 s: in-flight request stopped with {:?}, process gone after {:?}",
        err.code(),
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    // Released (the store's TTL is 60 s, so only a release clears it this fast).
    assert_eq!(leases(&split), 0);
}

#[test]
fn large_images_pass_the_message_size_limits() {
    let split = Split::start_with(&[], &[]);
    let rt = runtime();
    // A 6 MB request (the init image carries a 6 MB ancillary PNG chunk), and 16 images of 152×152
    // make the VAE decode's output 16·3·152·152·4 B = 4.4 MB on the store → orchestrator hop: both
    // past tonic's 4 MB default.
    let mut req = reference_request("sd1_i2i_s060");
    req.image = noise_png(152, 152, 7, 6 << 20);
    req.width = 0;
    req.height = 0;
    req.num_inference_steps = Some(2);
    req.strength = Some(0.5);
    req.guidance_scale = Some(1.0);
    req.num_images_per_prompt = Some(16);
    let t = Instant::now();
    let resp = rt
        .block_on(async {
            orchestrator_client(&split.orchestrator.address)
                .await
                .generate(req)
                .await
        })
        .expect("large request")
        .into_inner();
    assert_eq!(resp.images.len(), 16);
    assert!(resp
        .images
        .iter()
        .all(|i| (i.width, i.height) == (152, 152)));
    println!("6 MB request, 16×152² images: ok in {:?}", t.elapsed());
    assert_eq!(leases(&split), 0);
}

#[test]
fn metrics_count_requests_and_the_request_id_comes_back() {
    let m = metrics_port();
    let split = Split::start_with(&[], &["--metrics-listen", &m]);
    let rt = runtime();
    let addr = split.orchestrator.address.clone();
    let resp = rt
        .block_on(async {
            let mut req = tonic::Request::new(quick_request());
            req.metadata_mut()
                .insert("x-request-id", "e2e-request-42".parse().unwrap());
            orchestrator_client(&addr).await.generate(req).await
        })
        .unwrap()
        .into_inner();
    assert_eq!(resp.request_id, "e2e-request-42");
    let err = rt
        .block_on(async {
            let mut bad = quick_request();
            bad.width = 65;
            let mut req = tonic::Request::new(bad);
            req.metadata_mut()
                .insert("x-request-id", "e2e-bad-1".parse().unwrap());
            orchestrator_client(&addr).await.generate(req).await
        })
        .unwrap_err();
    assert_eq!(
        err.metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("e2e-bad-1")
    );
    // Without an x-request-id the server makes one.
    let generated = rt
        .block_on(async {
            orchestrator_client(&addr)
                .await
                .generate(quick_request())
                .await
        })
        .unwrap()
        .into_inner();
    assert_eq!(generated.request_id.len(), 36, "{:?}", generated.request_id);

    let text = scrape(&m);
    let model = reference_request("sd1_t2i_euler").model;
    let ok =
        format!("autopipe_requests_total{{task=\"text2img\",model=\"{model}\",status=\"ok\"}}");
    assert_eq!(metric(&text, &ok), 2.0, "{text}");
    assert_eq!(
        metric_sum(
            &text,
            "autopipe_requests_total",
            &["status=\"invalid_argument\""]
        ),
        1.0
    );
    assert_eq!(
        metric(&text, "autopipe_denoise_step_seconds_count"),
        4.0,
        "2 requests × 2 steps"
    );
    assert_eq!(
        metric(
            &text,
            "autopipe_request_duration_seconds_count{task=\"text2img\"}"
        ),
        3.0
    );
    assert_eq!(metric(&text, "autopipe_acquire_seconds_count"), 2.0);
    assert_eq!(metric(&text, "autopipe_requests_in_flight"), 0.0);
    assert!(text.contains("# TYPE autopipe_denoise_step_seconds histogram"));
    println!(
        "{}",
        text.lines()
            .filter(|l| l.starts_with("autopipe_requests_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn autopipe_serve_exposes_orchestrator_and_store_metrics() {
    let m = metrics_port();
    let addr = autopipe_proto::transport::Address::Tcp(format!("127.0.0.1:{}", free_port()));
    let serve = Service::start(
        "autopipe",
        addr.clone(),
        &[
            "serve".into(),
            "--listen".into(),
            addr.to_string(),
            "--threads".into(),
            "1".into(),
            "--metrics-listen".into(),
            m.clone(),
        ],
    );
    let rt = runtime();
    rt.block_on(async {
        orchestrator_client(&serve.address)
            .await
            .generate(quick_request())
            .await
    })
    .unwrap();
    let text = scrape(&m);
    assert_eq!(
        metric_sum(&text, "autopipe_requests_total", &["status=\"ok\""]),
        1.0,
        "{text}"
    );
    assert!(
        metric(&text, "autopipe_store_resident_bytes") > 0.0,
        "{text}"
    );
    assert_eq!(metric(&text, "autopipe_store_active_leases"), 0.0);
    assert_eq!(metric(&text, "autopipe_store_resident_components"), 3.0);
}

/// An in-process store that is slow to start each Invoke (a slow device) and records the request
/// id of every call it gets.
struct SlowStore {
    inner: autopipe_store::Store,
    delay: Duration,
    request_ids: std::sync::Mutex<Vec<String>>,
}

impl SlowStore {
    fn new(lease_ttl: Duration, delay: Duration) -> Self {
        let config = autopipe_store::StoreConfig {
            lease_ttl,
            ..Default::default()
        };
        Self {
            inner: autopipe_store::Store::new(config),
            delay,
            request_ids: Default::default(),
        }
    }
}

impl autopipe_store::ComponentStore for SlowStore {
    fn acquire(
        &self,
        request: &autopipe_store::AcquireRequest,
    ) -> Result<autopipe_store::Lease, autopipe_store::StoreError> {
        self.request_ids
            .lock()
            .unwrap()
            .push(request.request_id.clone());
        self.inner.acquire(request)
    }
    fn renew(&self, lease_id: &str) -> Result<Duration, autopipe_store::StoreError> {
        self.inner.renew(lease_id)
    }
    fn release(&self, lease_id: &str) -> Result<(), autopipe_store::StoreError> {
        self.inner.release(lease_id)
    }
    fn invoke(
        &self,
        lease_id: &str,
        handle_id: &str,
        method: &str,
        inputs: autopipe_store::Tensors,
        request_id: &str,
    ) -> Result<autopipe_store::Tensors, autopipe_store::StoreError> {
        self.request_ids
            .lock()
            .unwrap()
            .push(request_id.to_string());
        // Sleeping before the store sees the call: the store's own keep-alive-on-use cannot help.
        std::thread::sleep(self.delay);
        self.inner
            .invoke(lease_id, handle_id, method, inputs, request_id)
    }
}

#[test]
fn the_lease_is_renewed_while_calls_outlast_its_ttl() {
    use autopipe_orchestrator::{Orchestrator, OrchestratorConfig};
    let store = std::sync::Arc::new(SlowStore::new(
        Duration::from_millis(300),
        Duration::from_millis(700),
    ));
    let orchestrator = Orchestrator::new(store.clone(), OrchestratorConfig::default());
    let resp = orchestrator
        .generate(&quick_request(), "renew-test", &Silent)
        .expect("no lease expiry mid-request");
    assert_eq!(resp.images.len(), 1);
    let renewals = orchestrator.metrics().lease_renewals("ok");
    println!(
        "TTL 300 ms, 700 ms per call: {renewals} renewals, {:.0} ms total",
        resp.timings.unwrap().total_ms
    );
    assert!(renewals >= 3, "{renewals} renewals");
    assert_eq!(orchestrator.metrics().lease_renewals("error"), 0);
    assert_eq!(store.inner.stats().active_leases, 0);
}

#[test]
fn the_request_id_reaches_every_store_call() {
    use autopipe_orchestrator::{serve, Orchestrator, OrchestratorConfig, ServeOptions};
    let store = std::sync::Arc::new(SlowStore::new(Duration::from_secs(60), Duration::ZERO));
    let orchestrator = std::sync::Arc::new(Orchestrator::new(
        store.clone(),
        OrchestratorConfig::default(),
    ));
    let rt = runtime();
    let options = ServeOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        max_concurrency: 2,
        max_queue: 2,
        drain_timeout: Duration::from_secs(1),
        metrics_listen: None,
        preload: Vec::new(),
        auth: Default::default(),
        limits: Default::default(),
        tls: None,
        health_listen: None,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    rt.spawn(serve(
        orchestrator,
        options,
        std::future::pending(),
        Some(tx),
    ));
    let addr = rt.block_on(rx).unwrap();
    let resp = rt
        .block_on(async {
            let mut req = tonic::Request::new(quick_request());
            req.metadata_mut()
                .insert("x-request-id", "trace-me-7".parse().unwrap());
            orchestrator_client(&addr).await.generate(req).await
        })
        .unwrap()
        .into_inner();
    assert_eq!(resp.request_id, "trace-me-7");
    let ids = store.request_ids.lock().unwrap().clone();
    // Acquire, the text encoder, 2 UNet steps and the VAE decode.
    assert!(ids.len() >= 5, "{ids:?}");
    assert!(ids.iter().all(|id| id == "trace-me-7"), "{ids:?}");
}

#[test]
fn a_long_prompt_is_truncated_with_a_warning_and_any_u64_seed_works() {
    let split = Split::start_with(&[], &[]);
    let rt = runtime();
    let mut req = reference_request("sd1_t2i_long_prompt");
    req.num_inference_steps = Some(2);
    // torch maps a negative seed s to s + 2^64: a client's -1 arrives as u64::MAX.
    req.seed = Some(u64::MAX);
    let resp = rt
        .block_on(async {
            orchestrator_client(&split.orchestrator.address)
                .await
                .generate(req)
                .await
        })
        .expect("a long prompt is not an error")
        .into_inner();
    assert_eq!(resp.images[0].seed, u64::MAX);
    assert_eq!(resp.warnings.len(), 1, "{:?}", resp.warnings);
    assert!(
        resp.warnings[0]
            .contains("truncated because CLIP can only handle sequences up to 77 tokens"),
        "{:?}",
        resp.warnings
    );
}
