//! The orchestrator: validates `Generate` requests, resolves the pipeline as diffusers'
//! AutoPipeline does, leases the components it needs from the store, and runs the pipeline's
//! control flow. It holds no weights; with [`RemoteStore`] the store is another process, with
//! `autopipe_store::Store` it is in-process (embedded mode), and the pipelines are the same.

pub mod limits;
pub mod metrics;
mod orchestrator;
mod remote_store;
mod service;
mod validate;

pub use limits::Limits;
pub use metrics::Metrics;
pub use orchestrator::{Orchestrator, OrchestratorConfig, SafetyCheckerMode};
pub use remote_store::RemoteStore;
pub use service::{serve, OrchestratorService, ServeOptions};

pub use autopipe_proto::transport::shutdown_signal;

/// A dtype flag value (`float32`, `float16`, `bfloat16`, short forms); empty = none.
pub fn parse_dtype(name: &str) -> Result<Option<tch::Kind>, String> {
    validate::dtype(name, "dtype").map_err(|s| s.message().to_string())
}
