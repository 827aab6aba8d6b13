//! The component store engine: loads each diffusers component once per (content, dtype, device),
//! leases it out, evicts what no lease holds when the memory budget needs room, and runs
//! component forward passes so that weights never leave the process holding them.
//!
//! [`ComponentStore`] (from `autopipe-store-api`, re-exported here) is the one interface pipelines
//! use; [`Store`] implements it in-process and the orchestrator's gRPC client implements it for a
//! remote `autopipe-store`. The classes the store loads are in `components`.

pub mod allocator;
mod args;
mod batch;
mod components;
mod digest;
mod executor;
mod store;

pub use args::StoreArgs;
pub use autopipe_store_api::{
    kind_name, open_device, parse_budget, parse_device, parse_kind, parse_kind_opt,
    single_threaded_kernels, AcquireRequest, Code, ComponentSpec, ComponentStore, Handle, Lease,
    StoreError, Tensors,
};
pub use batch::BatchStats;
pub use store::{
    ComponentStats, Pinned, Store, StoreConfig, StoreObserver, StoreStats, DEFAULT_BATCH_WINDOW,
    DEFAULT_LOAD_NICE,
};

/// A fresh folder under the system's temp dir for this crate's tests, removed when dropped.
#[cfg(test)]
pub(crate) struct TempDir(std::path::PathBuf);

#[cfg(test)]
impl TempDir {
    /// `autopipe-store-<pid>-<n>`, empty; `n` counts up within the process.
    pub(crate) fn new() -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("autopipe-store-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    pub(crate) fn path(&self) -> &std::path::Path {
        &self.0
    }
}

#[cfg(test)]
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
