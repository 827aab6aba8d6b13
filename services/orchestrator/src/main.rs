//! `autopipe-orchestrator`: the stateless orchestrator daemon, leasing from a remote `autopipe-store`.

use anyhow::Context;
use autopipe_orchestrator::{
    serve, Orchestrator, OrchestratorConfig, RemoteStore, SafetyCheckerMode, ServeOptions,
};
use autopipe_proto::transport::Address;
use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// autopipe orchestrator: diffusers' AutoPipeline as a gRPC service over a component store.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to serve autopipe.v1.Orchestrator on: host:port or unix:///path.sock.
    #[arg(long, env = "AUTOPIPE_LISTEN", default_value = "0.0.0.0:50051")]
    listen: Address,
    /// The store to lease components from: host:port, http://host:port or unix:///path.sock.
    #[arg(
        long,
        env = "AUTOPIPE_STORE",
        default_value = "unix:///tmp/autopipe/store.sock"
    )]
    store: Address,
    /// Weight dtype when a request names none (float32, float16, bfloat16); default: the store's.
    #[arg(long, env = "AUTOPIPE_DTYPE")]
    dtype: Option<String>,
    /// Requests generating at once.
    #[arg(long, env = "AUTOPIPE_MAX_CONCURRENCY", default_value_t = 4)]
    max_concurrency: usize,
    /// Requests waiting for a slot before RESOURCE_EXHAUSTED.
    #[arg(long, env = "AUTOPIPE_MAX_QUEUE", default_value_t = 64)]
    max_queue: usize,
    /// Seconds in-flight requests may take to finish after SIGTERM.
    #[arg(long, env = "AUTOPIPE_DRAIN_TIMEOUT", default_value_t = 30)]
    drain_timeout: u64,
    /// Serve Prometheus metrics on this host:port (GET /metrics); off when unset.
    #[arg(long, env = "AUTOPIPE_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// libtorch intra-op threads for the orchestrator's own tensor work (scheduler steps, CFG,
    /// image processing: small tensors). The store does the model compute; more threads here only
    /// spin against it for the same cores.
    #[arg(long, env = "AUTOPIPE_THREADS", default_value_t = 1)]
    threads: i32,
    /// Models to warm up at start (local folders or hub repo ids, comma-separated): their
    /// components are loaded into the store before the Orchestrator service reports SERVING.
    #[arg(long, env = "AUTOPIPE_PRELOAD", value_delimiter = ',')]
    preload: Vec<String>,
    /// Checkpoints' safety checkers: auto (run the one model_index.json names, as diffusers does)
    /// or off (never).
    #[arg(long, env = "AUTOPIPE_SAFETY_CHECKER", default_value = "auto")]
    safety_checker: SafetyCheckerMode,
    /// Let requests skip the safety checker (GenerateRequest.skip_safety_checker); otherwise
    /// such requests are PERMISSION_DENIED.
    #[arg(long, env = "AUTOPIPE_ALLOW_REQUEST_SAFETY_OFF")]
    allow_request_safety_off: bool,
    /// Folders local models may be read from (repeatable; AUTOPIPE_MODEL_ROOTS: colon-separated).
    /// A model is then a name relative to one (`sd15` → DIR/sd15), a path inside one, or a hub
    /// repo id; anything else is PERMISSION_DENIED. None: hub repo ids (and the hub cache) only.
    #[arg(
        long = "model-root",
        env = "AUTOPIPE_MODEL_ROOTS",
        value_delimiter = ':'
    )]
    model_roots: Vec<PathBuf>,
    /// Hub repo ids that may be named (repeatable; AUTOPIPE_ALLOW_HUB: comma-separated): org/name
    /// or org/*. Default: every repo id.
    #[arg(long = "allow-hub", env = "AUTOPIPE_ALLOW_HUB", value_delimiter = ',')]
    allow_hub: Vec<String>,
    /// Bearer tokens the Orchestrator service accepts, one per line (re-read when the file
    /// changes). Unset: no authentication. Health and reflection stay open.
    #[arg(long, env = "AUTOPIPE_AUTH_TOKENS_FILE")]
    auth_tokens_file: Option<PathBuf>,
    /// The token this orchestrator sends to the store (first line of the file, re-read when it
    /// changes): one of the store's --auth-tokens-file tokens.
    #[arg(long, env = "AUTOPIPE_STORE_TOKEN_FILE")]
    store_token_file: Option<PathBuf>,
    /// PEM CA bundle the store's certificate must chain to: talk to a TCP store over TLS (an
    /// https:// --store needs it).
    #[arg(long, env = "AUTOPIPE_STORE_TLS_CA")]
    store_tls_ca: Option<PathBuf>,
    /// mTLS to the store: PEM client certificate chain to present (the store's --tls-client-ca
    /// must have signed it).
    #[arg(long, env = "AUTOPIPE_STORE_TLS_CLIENT_CERT", requires_all = ["store_tls_client_key", "store_tls_ca"])]
    store_tls_client_cert: Option<PathBuf>,
    /// PEM private key of --store-tls-client-cert.
    #[arg(
        long,
        env = "AUTOPIPE_STORE_TLS_CLIENT_KEY",
        requires = "store_tls_client_cert"
    )]
    store_tls_client_key: Option<PathBuf>,
    #[command(flatten)]
    tls: autopipe_proto::tls::ServerTlsArgs,
    #[command(flatten)]
    limits: autopipe_orchestrator::Limits,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    tch::set_num_threads(args.threads);
    let default_kind = autopipe_orchestrator::parse_dtype(args.dtype.as_deref().unwrap_or(""))
        .map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Channels spawn their connection workers on the runtime they are created in.
    let _entered = runtime.enter();
    let store_token = match &args.store_token_file {
        Some(path) => {
            autopipe_proto::auth::BearerToken::from_file(path).context("--store-token-file")?
        }
        None => autopipe_proto::auth::BearerToken::none(),
    };
    let auth = autopipe_proto::auth::Authenticate(
        args.auth_tokens_file
            .as_deref()
            .map(autopipe_proto::auth::TokenAuth::from_file)
            .transpose()
            .context("--auth-tokens-file")?,
    );
    let store_tls = autopipe_proto::tls::ClientTls::from_flags(
        args.store_tls_ca.as_deref(),
        args.store_tls_client_cert.as_deref(),
        args.store_tls_client_key.as_deref(),
    )
    .map_err(|e| anyhow::anyhow!("--store-tls-*: {e}"))?;
    let tls = args.tls.load().map_err(|e| anyhow::anyhow!(e))?;
    let store = RemoteStore::new(
        &args.store,
        runtime.handle().clone(),
        store_token,
        &store_tls,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let orchestrator = Arc::new(Orchestrator::new(
        Arc::new(store),
        OrchestratorConfig {
            default_kind,
            safety_checker: args.safety_checker,
            allow_request_safety_off: args.allow_request_safety_off,
            roots: autopipe_repo::ModelRoots::for_server(&args.model_roots, &args.allow_hub)
                .map_err(|e| anyhow::anyhow!(e))?,
            ..Default::default()
        },
    ));
    let options = ServeOptions {
        listen: args.listen,
        max_concurrency: args.max_concurrency,
        max_queue: args.max_queue,
        drain_timeout: Duration::from_secs(args.drain_timeout),
        metrics_listen: args.metrics_listen,
        preload: args
            .preload
            .into_iter()
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .collect(),
        auth,
        limits: args.limits,
        tls,
        health_listen: args.tls.health_listen,
    };
    let result = runtime.block_on(serve(
        orchestrator,
        options,
        autopipe_orchestrator::shutdown_signal(),
        None,
    ));
    // Pipelines still running after the drain stop at their next step; don't wait longer than that.
    drop(_entered);
    runtime.shutdown_timeout(Duration::from_secs(5));
    result.context("orchestrator")
}
