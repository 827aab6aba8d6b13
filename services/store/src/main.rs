//! `autopipe-store`: the component store daemon. Keeps weights resident on its device, leases them,
//! and runs component forward passes for orchestrators (`autopipe.v1.Store`).

mod metrics;
mod service;

use anyhow::Context;
use autopipe_proto::transport::Address;
use autopipe_store::{Store, StoreConfig};
use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// autopipe store: resident diffusion components, leased by orchestrators.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to serve autopipe.v1.Store on: host:port or unix:///path.sock.
    #[arg(
        long,
        env = "AUTOPIPE_STORE_LISTEN",
        default_value = "unix:///tmp/autopipe/store.sock"
    )]
    listen: Address,
    /// Device for weights and compute: cpu, cuda, cuda:N.
    #[arg(long, env = "AUTOPIPE_DEVICE", default_value = "cpu")]
    device: String,
    /// Default weight dtype: float32, float16, bfloat16.
    #[arg(long, env = "AUTOPIPE_DTYPE", default_value = "float32")]
    dtype: String,
    /// Resident-bytes budget: bytes (e.g. 8000000000, 8G, 512M) or a percentage of device memory (e.g. 80%).
    #[arg(long, env = "AUTOPIPE_MEMORY_BUDGET")]
    memory_budget: Option<String>,
    /// Seconds a lease lives unless renewed or used.
    #[arg(long, env = "AUTOPIPE_LEASE_TTL", default_value_t = 60)]
    lease_ttl: u64,
    /// Seconds in-flight calls may take to finish after SIGTERM.
    #[arg(long, env = "AUTOPIPE_DRAIN_TIMEOUT", default_value_t = 30)]
    drain_timeout: u64,
    /// Serve Prometheus metrics at http://<host:port>/metrics (e.g. 0.0.0.0:9091); off when unset.
    #[arg(long, env = "AUTOPIPE_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// libtorch intra-op threads (default: libtorch's choice, one per core).
    #[arg(long, env = "AUTOPIPE_THREADS")]
    threads: Option<i32>,
    /// Most concurrent requests' UNet calls joined into one forward per denoising step (step-level
    /// batching; 1 = off). Joined images match unjoined ones to float rounding (PSNR ≥ 60 dB), not
    /// bit for bit.
    #[arg(long, env = "AUTOPIPE_MAX_BATCH", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    max_batch: u32,
    /// Milliseconds a joinable call waits for partners (requests holding a lease on the same
    /// component) before running with those already queued.
    #[arg(long, env = "AUTOPIPE_BATCH_WINDOW_MS", default_value_t = autopipe_store::DEFAULT_BATCH_WINDOW.as_millis() as u64)]
    batch_window_ms: u64,
    /// CPU priority steps (nice) the weight-loading thread runs below the compute thread, so that
    /// loading a model does not slow the denoising steps of requests already running (0 = the
    /// same priority; a load on an otherwise idle store takes as long either way).
    #[arg(long, env = "AUTOPIPE_LOAD_NICE", default_value_t = autopipe_store::DEFAULT_LOAD_NICE, value_parser = clap::value_parser!(i32).range(0..=19))]
    load_nice: i32,
    /// Folders local models may be read from (repeatable; AUTOPIPE_MODEL_ROOTS: colon-separated).
    /// A model is then a name relative to one (`sd15` → DIR/sd15), a path inside one, or a hub
    /// repo id; anything else is PERMISSION_DENIED. None: hub repo ids (and the hub cache) only.
    #[arg(
        long = "model-root",
        env = "AUTOPIPE_MODEL_ROOTS",
        value_delimiter = ':'
    )]
    model_roots: Vec<PathBuf>,
    /// Bearer tokens the Store service accepts, one per line (re-read when the file changes): the
    /// orchestrators' --store-token-file. Unset: no authentication. Health and reflection stay open.
    #[arg(long, env = "AUTOPIPE_AUTH_TOKENS_FILE")]
    auth_tokens_file: Option<PathBuf>,
    /// Hub repo ids that may be named (repeatable; AUTOPIPE_ALLOW_HUB: comma-separated): org/name
    /// or org/*. Default: every repo id.
    #[arg(long = "allow-hub", env = "AUTOPIPE_ALLOW_HUB", value_delimiter = ',')]
    allow_hub: Vec<String>,
    #[command(flatten)]
    tls: autopipe_proto::tls::ServerTlsArgs,
}

fn main() -> anyhow::Result<()> {
    autopipe_store::allocator::tune_for_libtorch();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let device =
        autopipe_store::open_device(&args.device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let default_kind =
        autopipe_store::parse_kind(&args.dtype).map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    let memory_budget = args
        .memory_budget
        .as_deref()
        .map(|s| autopipe_store::parse_budget(s, device))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--memory-budget: {e}"))?;
    let auth = autopipe_proto::auth::Authenticate(
        args.auth_tokens_file
            .as_deref()
            .map(autopipe_proto::auth::TokenAuth::from_file)
            .transpose()
            .context("--auth-tokens-file")?,
    );
    let tls = args.tls.load().map_err(|e| anyhow::anyhow!(e))?;
    let metrics = Arc::new(metrics::Metrics::default());
    let store = Arc::new(
        Store::new(StoreConfig {
            device,
            default_kind,
            memory_budget,
            lease_ttl: Duration::from_secs(args.lease_ttl.max(1)),
            roots: autopipe_repo::ModelRoots::for_server(&args.model_roots, &args.allow_hub)
                .map_err(|e| anyhow::anyhow!(e))?,
            max_batch: args.max_batch as usize,
            batch_window: Duration::from_millis(args.batch_window_ms),
            load_nice: args.load_nice,
        })
        .with_observer(metrics.clone()),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime
        .block_on(service::serve(
            store,
            metrics,
            args.listen,
            args.metrics_listen,
            Duration::from_secs(args.drain_timeout),
            auth,
            tls,
            args.tls.health_listen,
        ))
        .context("store")
}
