//! The component store engine: loads each diffusers component once per (content, dtype, device), leases it out, evicts what no lease holds when the memory budget needs room, and runs
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
