//! Prometheus metrics for the store (text exposition format 0.0.4), served over plain HTTP on
//! `--metrics-listen` (`GET /metrics`): resident bytes, components, leases, loads and their duration,
//! evictions, invoke latency by class and method, RPCs by status code.
//! Written by hand (a few maps under a mutex) to keep the daemon free of a metrics runtime.

use autopipe_proto::metrics::{code_name, escape, Histogram};
use autopipe_store::{Code, Store, StoreObserver};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Load buckets in seconds: a tiny CPU checkpoint to a multi-GB UNet from a cold disk.
const LOAD_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Invoke buckets in seconds: a GPU UNet step to a CPU VAE decode.
const INVOKE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default)]
struct Inner {
    /// (class, result) → loads.
    loads: BTreeMap<(String, &'static str), u64>,
    load_duration: BTreeMap<String, Histogram>,
    evicted_bytes: u64,
    /// (class, method) → latency of successful invokes (method names come from clients, so only
    /// methods that ran are labels: bounded cardinality).
    invoke_duration: BTreeMap<(String, String), Histogram>,
    /// (rpc, code) → calls.
    rpcs: BTreeMap<(&'static str, &'static str), u64>,
}

/// The store's metrics; also the engine's [`StoreObserver`].
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one RPC by its outcome.
    pub fn rpc(&self, rpc: &'static str, code: tonic::Code) {
        *self.inner().rpcs.entry((rpc, code_name(code))).or_default() += 1;
    }

    /// The exposition text: counters kept here plus gauges read from `store` now.
    pub fn render(&self, store: &Store) -> String {
        let stats = store.stats();
        let mut out = String::with_capacity(4096);
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            &mut out,
            "autopipe_store_resident_bytes",
            "Bytes of resident component weights.",
            stats.resident_bytes,
        );
        gauge(
            &mut out,
            "autopipe_store_memory_budget_bytes",
            "Configured resident-bytes budget (0 = unlimited).",
            stats.memory_budget.unwrap_or(0),
        );
        gauge(
            &mut out,
            "autopipe_store_components",
            "Resident components.",
            stats.components.len() as u64,
        );
        gauge(
            &mut out,
            "autopipe_store_pinned_components",
            "Components pinned by Load.",
            stats.components.iter().filter(|c| c.pinned).count() as u64,
        );
        gauge(
            &mut out,
            "autopipe_store_active_leases",
            "Leases held now.",
            stats.active_leases as u64,
        );
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            &mut out,
            "autopipe_store_evictions_total",
            "Components evicted to make room (LRU).",
            stats.evictions,
        );
        counter(
            &mut out,
            "autopipe_store_lease_expirations_total",
            "Leases that expired unreleased.",
            stats.expired_leases,
        );
        counter(
            &mut out,
            "autopipe_store_batched_forwards_total",
            "Forwards that joined several requests' calls (--max-batch).",
            stats.batching.batched_forwards,
        );
        counter(
            &mut out,
            "autopipe_store_batched_calls_total",
            "Calls run inside joined forwards.",
            stats.batching.batched_calls,
        );

        let m = self.inner();
        counter(
            &mut out,
            "autopipe_store_evicted_bytes_total",
            "Bytes freed by evictions.",
            m.evicted_bytes,
        );
        let _ = writeln!(
            out,
            "# HELP autopipe_store_loads_total Component loads by class and result."
        );
        let _ = writeln!(out, "# TYPE autopipe_store_loads_total counter");
        for ((class, result), n) in &m.loads {
            let _ = writeln!(
                out,
                "autopipe_store_loads_total{{class=\"{}\",result=\"{result}\"}} {n}",
                escape(class)
            );
        }
        let _ = writeln!(
            out,
            "# HELP autopipe_store_load_duration_seconds Time to load a component."
        );
        let _ = writeln!(out, "# TYPE autopipe_store_load_duration_seconds histogram");
        for (class, h) in &m.load_duration {
            h.render(
                &mut out,
                "autopipe_store_load_duration_seconds",
                &format!("class=\"{}\"", escape(class)),
            );
        }
        let _ = writeln!(out, "# HELP autopipe_store_invoke_duration_seconds Successful component calls by class and method.");
        let _ = writeln!(
            out,
            "# TYPE autopipe_store_invoke_duration_seconds histogram"
        );
        for ((class, method), h) in &m.invoke_duration {
            let labels = format!("class=\"{}\",method=\"{}\"", escape(class), escape(method));
            h.render(&mut out, "autopipe_store_invoke_duration_seconds", &labels);
        }
        let _ = writeln!(
            out,
            "# HELP autopipe_store_rpcs_total Store RPCs by method and status code."
        );
        let _ = writeln!(out, "# TYPE autopipe_store_rpcs_total counter");
        for ((rpc, code), n) in &m.rpcs {
            let _ = writeln!(
                out,
                "autopipe_store_rpcs_total{{rpc=\"{rpc}\",code=\"{code}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP autopipe_store_errors_total Failed store RPCs by status code."
        );
        let _ = writeln!(out, "# TYPE autopipe_store_errors_total counter");
        let mut errors: BTreeMap<&str, u64> = BTreeMap::new();
        for ((_, code), n) in m.rpcs.iter().filter(|((_, c), _)| *c != "OK") {
            *errors.entry(code).or_default() += n;
        }
        for (code, n) in errors {
            let _ = writeln!(out, "autopipe_store_errors_total{{code=\"{code}\"}} {n}");
        }
        out
    }
}

impl StoreObserver for Metrics {
    fn loaded(&self, class_name: &str, _bytes: u64, took: Duration, ok: bool) {
        let mut m = self.inner();
        *m.loads
            .entry((class_name.to_string(), if ok { "ok" } else { "error" }))
            .or_default() += 1;
        if ok {
            m.load_duration
                .entry(class_name.to_string())
                .or_insert_with(|| Histogram::new(LOAD_BUCKETS))
                .observe(took);
        }
    }

    fn evicted(&self, _class_name: &str, bytes: u64) {
        self.inner().evicted_bytes += bytes;
    }

    fn invoked(&self, class_name: &str, method: &str, took: Duration, code: Option<Code>) {
        if code.is_none() {
            let mut m = self.inner();
            m.invoke_duration
                .entry((class_name.to_string(), method.to_string()))
                .or_insert_with(|| Histogram::new(INVOKE_BUCKETS))
                .observe(took);
        }
    }
}

/// Binds `listen` (host:port) and answers `GET /metrics` until the process ends.
pub async fn serve(
    listen: &str,
    metrics: Arc<Metrics>,
    store: Arc<Store>,
) -> anyhow::Result<SocketAddr> {
    autopipe_proto::metrics::serve(listen, move || metrics.render(&store))
        .await
        .map_err(|e| anyhow::anyhow!("--metrics-listen {listen}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let store = Store::new(Default::default());
        let m = Metrics::default();
        m.loaded("AutoencoderKL", 10, Duration::from_millis(30), true);
        m.loaded("AutoencoderKL", 10, Duration::from_millis(30), false);
        m.evicted("AutoencoderKL", 10);
        m.invoked("AutoencoderKL", "decode", Duration::from_millis(3), None);
        m.invoked(
            "AutoencoderKL",
            "bogus",
            Duration::from_millis(3),
            Some(Code::InvalidArgument),
        );
        m.rpc("Invoke", tonic::Code::Ok);
        m.rpc("Invoke", tonic::Code::InvalidArgument);
        m.rpc("Acquire", tonic::Code::InvalidArgument);
        let text = m.render(&store);
        for line in [
            "autopipe_store_resident_bytes 0",
            "autopipe_store_loads_total{class=\"AutoencoderKL\",result=\"ok\"} 1",
            "autopipe_store_loads_total{class=\"AutoencoderKL\",result=\"error\"} 1",
            "autopipe_store_load_duration_seconds_bucket{class=\"AutoencoderKL\",le=\"0.025\"} 0",
            "autopipe_store_load_duration_seconds_bucket{class=\"AutoencoderKL\",le=\"0.05\"} 1",
            "autopipe_store_load_duration_seconds_count{class=\"AutoencoderKL\"} 1",
            "autopipe_store_evicted_bytes_total 10",
            "autopipe_store_invoke_duration_seconds_count{class=\"AutoencoderKL\",method=\"decode\"} 1",
            "autopipe_store_rpcs_total{rpc=\"Invoke\",code=\"OK\"} 1",
            "autopipe_store_errors_total{code=\"INVALID_ARGUMENT\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(
            !text.contains("bogus"),
            "failed calls' method names are not labels"
        );
    }

    #[test]
    fn serves_get_metrics_over_http() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let m = Arc::new(Metrics::default());
            m.rpc("Stats", tonic::Code::Ok);
            let addr = serve("127.0.0.1:0", m, Arc::new(Store::new(Default::default())))
                .await
                .unwrap();
            let get = |path: &'static str| async move {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                let mut resp = String::new();
                s.read_to_string(&mut resp).await.unwrap();
                resp
            };
            let resp = get("/metrics").await;
            assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
            assert!(
                resp.contains("autopipe_store_rpcs_total{rpc=\"Stats\",code=\"OK\"} 1"),
                "{resp}"
            );
            assert!(get("/other").await.starts_with("HTTP/1.1 404"));
        });
    }
}
