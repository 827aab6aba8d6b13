//! The component store as its clients see it: the [`ComponentStore`] interface pipelines are
//! written against, leases and handles, errors with their gRPC codes, and the dtype, device and
//! memory-budget names every binary parses. The engine (`autopipe-store`) and the orchestrator's
//! gRPC client both implement [`ComponentStore`]; neither the interface nor its users link the
//! model code.

mod error;
mod parse;
mod threads;

pub use error::{Code, StoreError};
pub use parse::{kind_name, open_device, parse_budget, parse_device, parse_kind, parse_kind_opt};
pub use threads::single_threaded_kernels;

use std::time::Duration;

/// Named tensors in and out of a component method.
pub type Tensors = Vec<(String, tch::Tensor)>;

/// One component of a checkpoint to acquire: `<path>` holds its `config.json` and weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentSpec {
    /// `model_index.json` key, e.g. `unet`.
    pub name: String,
    /// diffusers/transformers class name, e.g. `UNet2DConditionModel`.
    pub class_name: String,
    /// The component folder on the store's filesystem.
    pub path: std::path::PathBuf,
    /// Weight-file variant (`fp16`), if any.
    pub variant: Option<String>,
    /// diffusers' `force_upcast`: held in float32 when the request's dtype is float16 (the SDXL
    /// VAE overflows in float16; diffusers upcasts it for encode and decode).
    pub upcast_half: bool,
}

/// What `acquire` asks for.
#[derive(Debug, Clone)]
pub struct AcquireRequest {
    pub components: Vec<ComponentSpec>,
    /// Weight dtype; `None` = the store's default.
    pub kind: Option<tch::Kind>,
    pub request_id: String,
}

/// A leased, resident component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle {
    pub name: String,
    pub id: String,
    pub class_name: String,
}

/// Components held for a caller until released or expired.
#[derive(Debug, Clone)]
pub struct Lease {
    pub id: String,
    pub handles: Vec<Handle>,
    pub ttl: Duration,
}

impl Lease {
    /// The handle of the component acquired under `name`.
    pub fn handle(&self, name: &str) -> Result<&Handle, StoreError> {
        self.handles.iter().find(|h| h.name == name).ok_or_else(|| {
            StoreError::new(
                Code::Internal,
                format!("lease {} holds no component {name:?}", self.id),
            )
        })
    }
}

/// The store's operations, in-process or over gRPC: the interface pipelines are written against.
pub trait ComponentStore: Send + Sync {
    /// Loads (or finds) the components and leases them.
    fn acquire(&self, request: &AcquireRequest) -> Result<Lease, StoreError>;
    /// Extends a lease; returns its new time to live.
    fn renew(&self, lease_id: &str) -> Result<Duration, StoreError>;
    /// Ends a lease.
    fn release(&self, lease_id: &str) -> Result<(), StoreError>;
    /// Runs `method` of a leased component.
    fn invoke(
        &self,
        lease_id: &str,
        handle_id: &str,
        method: &str,
        inputs: Tensors,
        request_id: &str,
    ) -> Result<Tensors, StoreError>;
}
