//! `bench embedded-worker`: autopipe in embedded mode (orchestrator over an in-process store) in a
//! process of its own, so its start-up and peak RSS are measured per configuration. Reads [`Spec`]
//! lines on stdin, answers [`Reply`] lines on stdout.

use crate::spec::{reply_from_response, Reply, Spec};
use anyhow::Result;
use autopipe_orchestrator::{Orchestrator, OrchestratorConfig};
use autopipe_pipelines::{PipelineError, Progress, StepObserver};
use autopipe_store::{Store, StoreConfig, StoreObserver};
use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Silent;

impl StepObserver for Silent {
    fn on_step(&self, _: Progress) {}
    fn should_stop(&self) -> Option<PipelineError> {
        None
    }
}

/// The store's loads during one request: their summed time and the peak RSS as the last ended.
#[derive(Default)]
struct Loads(Mutex<(f64, Option<u64>)>);

impl Loads {
    fn take(&self) -> (f64, Option<u64>) {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl StoreObserver for Loads {
    fn loaded(&self, _: &str, _: u64, took: Duration, _: bool) {
        let peak = crate::systems::peak_rss(std::process::id());
        let mut l = self.0.lock().unwrap_or_else(|p| p.into_inner());
        l.0 += took.as_secs_f64() * 1e3;
        l.1 = peak;
    }
}

fn run_one(
    orchestrator: &Orchestrator,
    store: &Store,
    loads: &Loads,
    spec: &Spec,
    n: usize,
) -> Result<Reply> {
    let request = spec.to_request()?;
    loads.take();
    let rss_before = crate::systems::rss(std::process::id());
    let t0 = Instant::now();
    let resp = orchestrator
        .generate(&request, &format!("bench-{n}"), &Silent)
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?;
    let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    let png = resp
        .images
        .first()
        .map(|i| i.png.as_slice())
        .unwrap_or_default();
    std::fs::write(&spec.out, png)?;
    let stats = store.stats();
    let mut reply = reply_from_response(&resp, wall_ms);
    let (load_ms, load_peak) = loads.take();
    if load_peak.is_some() {
        reply.load_ms = Some(load_ms);
        reply.load_peak_rss_bytes = load_peak;
        reply.rss_before_bytes = rss_before;
    }
    reply.loads = Some(stats.components.iter().map(|c| c.load_count).sum());
    reply.resident_bytes = Some(stats.resident_bytes);
    Ok(reply)
}

/// Serves specs from stdin until it closes.
pub fn worker(dtype: &str, threads: i32) -> Result<()> {
    autopipe_store::allocator::tune_for_libtorch();
    tch::set_num_threads(threads);
    let kind = autopipe_store::parse_kind(dtype).map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    let loads = Arc::new(Loads::default());
    let store = Arc::new(
        Store::new(StoreConfig {
            device: tch::Device::Cpu,
            default_kind: kind,
            memory_budget: None,
            lease_ttl: Duration::from_secs(600),
            ..Default::default()
        })
        .with_observer(loads.clone()),
    );
    let orchestrator = Orchestrator::new(
        store.clone(),
        OrchestratorConfig {
            default_kind: Some(kind),
            ..Default::default()
        },
    );
    let mut stdout = std::io::stdout().lock();
    let ready = serde_json::json!({ "ready": true, "threads": threads });
    writeln!(stdout, "{ready}")?;
    stdout.flush()?;
    for (n, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let reply = serde_json::from_str::<Spec>(&line)
            .map_err(anyhow::Error::from)
            .and_then(|spec| run_one(&orchestrator, &store, &loads, &spec, n))
            .unwrap_or_else(|e| Reply {
                ok: false,
                error: Some(format!("{e:#}")),
                ..Default::default()
            });
        writeln!(stdout, "{}", serde_json::to_string(&reply)?)?;
        stdout.flush()?;
    }
    Ok(())
}
