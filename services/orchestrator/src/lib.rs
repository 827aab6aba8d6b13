//! The orchestrator: validates `Generate` requests, resolves the pipeline as diffusers'
//! AutoPipeline does, leases the components it needs from the store, and runs the pipeline's
//! control flow. It holds no weights; with [`RemoteStore`] the store is another process, with
//! [`autopipe_store::Store`] it is in-process (embedded mode), and the pipelines are the same.

mod orchestrator;
mod remote_store;
mod service;
mod status;
mod validate;

pub use orchestrator::{Orchestrator, OrchestratorConfig};
pub use remote_store::RemoteStore;
pub use service::{serve, OrchestratorService, ServeOptions};
pub use status::{status_from_store_error, store_error_from_status};

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// A dtype flag value (`float32`, `float16`, `bfloat16`, short forms); empty = none.
pub fn parse_dtype(name: &str) -> Result<Option<tch::Kind>, String> {
    validate::dtype(name, "dtype").map_err(|s| s.message().to_string())
}
