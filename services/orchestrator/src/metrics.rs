//! Prometheus metrics for the orchestrator (text exposition format 0.0.4), served over plain HTTP
//! on `--metrics-listen`: request counts by task/model/status, queue depth, requests in flight,
//! denoising-step and end-to-end latency histograms, acquire latency and lease renewals.
//! Written by hand (a few atomics and maps) to keep the service free of a metrics runtime.

pub use autopipe_proto::metrics::Histogram;
use autopipe_proto::metrics::{code_name, escape};
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Latency buckets in seconds, from a fast GPU step to a slow CPU request.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// Distinct `model` label values kept; later models are counted as `other` (bounded cardinality).
const MAX_MODEL_LABELS: usize = 64;

/// Appends extra samples to a scrape.
type Collector = Box<dyn Fn(&mut String) + Send + Sync>;

/// The orchestrator's metrics; one set per [`crate::Orchestrator`].
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, String), u64>>,
    models: Mutex<HashSet<String>>,
    queue_depth: AtomicI64,
    in_flight: AtomicI64,
    step_seconds: Histogram,
    request_seconds: Mutex<BTreeMap<String, Arc<Histogram>>>,
    acquire_seconds: Histogram,
    lease_renewals: Mutex<BTreeMap<&'static str, u64>>,
    /// Images the safety checker flagged (and blacked out), by model label.
    nsfw_images: Mutex<BTreeMap<String, u64>>,
    collectors: Mutex<Vec<Collector>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::default(),
            models: Mutex::default(),
            queue_depth: AtomicI64::new(0),
            in_flight: AtomicI64::new(0),
            step_seconds: Histogram::new(LATENCY_BUCKETS),
            request_seconds: Mutex::default(),
            acquire_seconds: Histogram::new(LATENCY_BUCKETS),
            lease_renewals: Mutex::default(),
            nsfw_images: Mutex::default(),
            collectors: Mutex::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    /// Marks `model` as a real model (it opened), so it gets its own label value.
    pub fn known_model(&self, model: &str) {
        let mut models = lock(&self.models);
        if models.len() < MAX_MODEL_LABELS {
            models.insert(model.to_string());
        }
    }

    fn model_label(&self, model: &str) -> String {
        let models = lock(&self.models);
        if models.contains(model) {
            model.to_string()
        } else if model.trim().is_empty() {
            "none".into()
        } else {
            // Unknown or never-opened references (typos, attacks) must not grow the label set.
            "other".into()
        }
    }

    /// Counts a finished request and its end-to-end latency.
    pub fn request_done(&self, task: &str, model: &str, code: tonic::Code, elapsed: Duration) {
        let key = (
            task.to_string(),
            self.model_label(model),
            code_name(code).to_ascii_lowercase(),
        );
        *lock(&self.requests).entry(key).or_default() += 1;
        let h = lock(&self.request_seconds)
            .entry(task.to_string())
            .or_insert_with(|| Arc::new(Histogram::new(LATENCY_BUCKETS)))
            .clone();
        h.observe(elapsed);
    }

    /// Requests counted with this (task, model label, status label).
    pub fn requests(&self, task: &str, model: &str, status: &str) -> u64 {
        lock(&self.requests)
            .iter()
            .filter(|((t, m, s), _)| t == task && (m == model || model.is_empty()) && s == status)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Adds `delta` to the number of requests waiting for a slot.
    pub fn queue_add(&self, delta: i64) {
        self.queue_depth.fetch_add(delta, Ordering::Relaxed);
    }

    /// Adds `delta` to the number of requests generating.
    pub fn in_flight_add(&self, delta: i64) {
        self.in_flight.fetch_add(delta, Ordering::Relaxed);
    }

    /// Requests generating now.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Records one denoising step's latency.
    pub fn step(&self, d: Duration) {
        self.step_seconds.observe(d);
    }

    /// Denoising steps run so far.
    pub fn steps(&self) -> u64 {
        self.step_seconds.count()
    }

    /// Records how long an Acquire (load or lookup) took.
    pub fn acquire(&self, d: Duration) {
        self.acquire_seconds.observe(d);
    }

    /// Counts a lease renewal (`ok` or `error`).
    pub fn lease_renewal(&self, result: &'static str) {
        *lock(&self.lease_renewals).entry(result).or_default() += 1;
    }

    /// Lease renewals with this result so far.
    pub fn lease_renewals(&self, result: &str) -> u64 {
        lock(&self.lease_renewals).get(result).copied().unwrap_or(0)
    }

    /// Adds a function that appends more metrics (already in exposition format) on every scrape,
    /// e.g. the embedded store's resident bytes.
    pub fn add_collector(&self, f: impl Fn(&mut String) + Send + Sync + 'static) {
        lock(&self.collectors).push(Box::new(f));
    }

    /// Counts `n` images of `model` that the safety checker flagged.
    pub fn nsfw_images_add(&self, model: &str, n: u64) {
        let label = self.model_label(model);
        *lock(&self.nsfw_images).entry(label).or_default() += n;
    }

    /// Flagged images counted for `model`'s label.
    pub fn nsfw_images(&self, model: &str) -> u64 {
        let label = self.model_label(model);
        lock(&self.nsfw_images).get(&label).copied().unwrap_or(0)
    }

    /// Everything, in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP autopipe_requests_total Generate requests by task, model and final gRPC status.\n");
        out.push_str("# TYPE autopipe_requests_total counter\n");
        for ((task, model, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "autopipe_requests_total{{task=\"{}\",model=\"{}\",status=\"{}\"}} {n}",
                escape(task),
                escape(model),
                escape(status)
            );
        }
        out.push_str("# HELP autopipe_queue_depth Requests waiting for a generation slot.\n");
        out.push_str("# TYPE autopipe_queue_depth gauge\n");
        let _ = writeln!(
            out,
            "autopipe_queue_depth {}",
            self.queue_depth.load(Ordering::Relaxed)
        );
        out.push_str("# HELP autopipe_requests_in_flight Requests holding a generation slot.\n");
        out.push_str("# TYPE autopipe_requests_in_flight gauge\n");
        let _ = writeln!(out, "autopipe_requests_in_flight {}", self.in_flight());
        out.push_str("# HELP autopipe_denoise_step_seconds Latency of one denoising step (UNet + scheduler).\n");
        out.push_str("# TYPE autopipe_denoise_step_seconds histogram\n");
        self.step_seconds
            .render(&mut out, "autopipe_denoise_step_seconds", "");
        out.push_str("# HELP autopipe_request_duration_seconds End-to-end Generate latency, queueing included.\n");
        out.push_str("# TYPE autopipe_request_duration_seconds histogram\n");
        for (task, h) in lock(&self.request_seconds).iter() {
            h.render(
                &mut out,
                "autopipe_request_duration_seconds",
                &format!("task=\"{}\"", escape(task)),
            );
        }
        out.push_str("# HELP autopipe_acquire_seconds Latency of leasing a pipeline's components from the store.\n");
        out.push_str("# TYPE autopipe_acquire_seconds histogram\n");
        self.acquire_seconds
            .render(&mut out, "autopipe_acquire_seconds", "");
        out.push_str("# HELP autopipe_lease_renewals_total Background lease renewals during long requests.\n");
        out.push_str("# TYPE autopipe_lease_renewals_total counter\n");
        for (result, n) in lock(&self.lease_renewals).iter() {
            let _ = writeln!(
                out,
                "autopipe_lease_renewals_total{{result=\"{result}\"}} {n}"
            );
        }
        out.push_str("# HELP autopipe_nsfw_images_total Images the checkpoint's safety checker flagged and returned black, by model.\n");
        out.push_str("# TYPE autopipe_nsfw_images_total counter\n");
        for (model, n) in lock(&self.nsfw_images).iter() {
            let _ = writeln!(
                out,
                "autopipe_nsfw_images_total{{model=\"{}\"}} {n}",
                escape(model)
            );
        }
        for f in lock(&self.collectors).iter() {
            f(&mut out);
        }
        out
    }
}

/// Binds `listen` (host:port) and serves `metrics` there in the background; returns the bound address.
pub async fn spawn_metrics_server(
    metrics: Arc<Metrics>,
    listen: &str,
) -> std::io::Result<std::net::SocketAddr> {
    autopipe_proto::metrics::serve(listen, move || metrics.render()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn renders_counters_gauges_and_cumulative_histograms() {
        let m = Metrics::default();
        m.known_model("/m/sd1");
        m.request_done(
            "text2img",
            "/m/sd1",
            tonic::Code::Ok,
            Duration::from_millis(30),
        );
        m.request_done(
            "text2img",
            "/m/sd1",
            tonic::Code::Ok,
            Duration::from_millis(300),
        );
        m.request_done(
            "text2img",
            "/typo\"",
            tonic::Code::NotFound,
            Duration::from_millis(1),
        );
        m.step(Duration::from_millis(3));
        m.step(Duration::from_millis(7));
        m.queue_add(2);
        m.queue_add(-1);
        m.nsfw_images_add("/m/sd1", 2);
        m.nsfw_images_add("/m/sd1", 1);
        let text = m.render();
        assert!(
            text.contains("autopipe_nsfw_images_total{model=\"/m/sd1\"} 3"),
            "{text}"
        );
        assert!(
            text.contains(
                "autopipe_requests_total{task=\"text2img\",model=\"/m/sd1\",status=\"ok\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "autopipe_requests_total{task=\"text2img\",model=\"other\",status=\"not_found\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("autopipe_queue_depth 1"));
        assert!(
            text.contains("autopipe_denoise_step_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("autopipe_denoise_step_seconds_bucket{le=\"0.01\"} 2"),
            "{text}"
        );
        assert!(text.contains("autopipe_denoise_step_seconds_count 2"));
        assert!(
            text.contains(
                "autopipe_request_duration_seconds_bucket{task=\"text2img\",le=\"0.05\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("autopipe_request_duration_seconds_count{task=\"text2img\"} 3"),
            "{text}"
        );
        assert_eq!(m.requests("text2img", "", "ok"), 2);
    }

    #[test]
    fn model_labels_are_bounded() {
        let m = Metrics::default();
        for i in 0..(MAX_MODEL_LABELS + 10) {
            m.known_model(&format!("m{i}"));
        }
        assert_eq!(
            m.model_label(&format!("m{}", MAX_MODEL_LABELS + 5)),
            "other"
        );
        assert_eq!(m.model_label("m0"), "m0");
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[tokio::test]
    async fn serves_get_metrics_over_http() {
        let m = Arc::new(Metrics::default());
        m.add_collector(|out| out.push_str("extra_metric 7\n"));
        let addr = spawn_metrics_server(m, "127.0.0.1:0").await.unwrap();
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).await.unwrap();
            body
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(
            ok.contains("autopipe_requests_in_flight 0") && ok.contains("extra_metric 7"),
            "{ok}"
        );
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
    }
}
