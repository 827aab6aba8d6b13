//! `autopipe-store`: the component store daemon. Keeps weights resident on its device, leases them,
//! and runs component forward passes for orchestrators (`autopipe.v1.Store`).

mod metrics;
mod service;

use anyhow::Context;
use autopipe_proto::transport::Address;
use autopipe_store::{Store, StoreArgs};
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
    #[command(flatten)]
    store: StoreArgs,
    /// Seconds in-flight calls may take to finish after SIGTERM.
    #[arg(long, env = "AUTOPIPE_DRAIN_TIMEOUT", default_value_t = 30)]
    drain_timeout: u64,
    /// Serve Prometheus metrics at http://<host:port>/metrics (e.g. 0.0.0.0:9091); off when unset.
    #[arg(long, env = "AUTOPIPE_METRICS_LISTEN")]
    metrics_listen: Option<String>,
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
        Store::new(
            args.store
                .config(
                    autopipe_repo::ModelRoots::for_server(&args.model_roots, &args.allow_hub)
                        .map_err(|e| anyhow::anyhow!(e))?,
                )
                .map_err(|e| anyhow::anyhow!(e))?,
        )
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
