//! The store's command-line settings, shared by every binary that runs a store: the
//! `autopipe-store` daemon and `autopipe serve` / `generate --embedded`, which run one in process
//! (flattened into their arguments with `#[command(flatten)]`).

use std::time::Duration;

use autopipe_repo::ModelRoots;

use crate::{
    open_device, parse_budget, parse_kind, StoreConfig, DEFAULT_BATCH_WINDOW, DEFAULT_LOAD_NICE,
};

/// Device, dtype, budget, leases, threads, batching and loader priority of a store.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// Device for weights and compute: cpu, cuda, cuda:N.
    #[arg(long, env = "AUTOPIPE_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Default weight dtype: float32, float16, bfloat16.
    #[arg(long, env = "AUTOPIPE_DTYPE", default_value = "float32")]
    pub dtype: String,
    /// Resident-bytes budget: bytes (e.g. 8000000000, 8G, 512M) or a percentage of device memory
    /// (e.g. 80%).
    #[arg(long, env = "AUTOPIPE_MEMORY_BUDGET")]
    pub memory_budget: Option<String>,
    /// Seconds a lease lives unless renewed or used.
    #[arg(long, env = "AUTOPIPE_LEASE_TTL", default_value_t = 60)]
    pub lease_ttl: u64,
    /// libtorch intra-op threads (default: libtorch's choice, one per core).
    #[arg(long, env = "AUTOPIPE_THREADS")]
    pub threads: Option<i32>,
    /// Most concurrent requests' UNet calls joined into one forward per denoising step (step-level
    /// batching; 1 = off). Joined images match unjoined ones to float rounding (PSNR ≥ 60 dB), not
    /// bit for bit.
    #[arg(long, env = "AUTOPIPE_MAX_BATCH", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_batch: u32,
    /// Milliseconds a joinable call waits for partners (requests holding a lease on the same
    /// component) before running with those already queued.
    #[arg(long, env = "AUTOPIPE_BATCH_WINDOW_MS", default_value_t = DEFAULT_BATCH_WINDOW.as_millis() as u64)]
    pub batch_window_ms: u64,
    /// CPU priority steps (nice) the weight-loading thread runs below the compute thread, so that
    /// loading a model does not slow the denoising steps of requests already running (0 = the
    /// same priority; a load on an otherwise idle store takes as long either way).
    #[arg(long, env = "AUTOPIPE_LOAD_NICE", default_value_t = DEFAULT_LOAD_NICE, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub load_nice: i32,
}

impl StoreArgs {
    /// The store's configuration, reading models under `roots`; sets libtorch's thread count
    /// when `--threads` is given. Errors name the flag.
    pub fn config(&self, roots: ModelRoots) -> Result<StoreConfig, String> {
        if let Some(n) = self.threads {
            tch::set_num_threads(n);
        }
        let device = open_device(&self.device).map_err(|e| format!("--device: {e}"))?;
        Ok(StoreConfig {
            device,
            default_kind: parse_kind(&self.dtype).map_err(|e| format!("--dtype: {e}"))?,
            memory_budget: self
                .memory_budget
                .as_deref()
                .map(|s| parse_budget(s, device))
                .transpose()
                .map_err(|e| format!("--memory-budget: {e}"))?,
            lease_ttl: Duration::from_secs(self.lease_ttl.max(1)),
            roots,
            max_batch: self.max_batch as usize,
            batch_window: Duration::from_millis(self.batch_window_ms),
            load_nice: self.load_nice,
        })
    }
}
