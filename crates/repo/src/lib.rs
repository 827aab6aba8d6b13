//! Model references and diffusers checkpoints on disk: `model_index.json`, component folders and
//! their `config.json` files (diffusers' `pipeline_utils.py` / `pipeline_loading_utils.py` layout).

mod checkpoint;
#[cfg(feature = "fake-hub")]
pub mod fake_hub;
pub mod hub;
mod model_ref;
mod roots;

pub use checkpoint::{Checkpoint, ComponentEntry, ModelIndex};
pub use hub::{fetch_components, fetch_model_index, HubOptions};
pub use model_ref::ModelRef;
pub use roots::ModelRoots;

use std::path::PathBuf;

/// A model reference or checkpoint that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The folder, hub repo or file does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A file exists but is not what diffusers writes.
    #[error("malformed {path}: {reason}")]
    Malformed { path: PathBuf, reason: String },
    /// The model reference itself is not a path or a hub repo id.
    #[error("invalid model reference {0:?}: expected a local diffusers folder or a hub repo id like \"org/name\"")]
    InvalidReference(String),
    #[error("io error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The reference names something outside the server's model roots or hub allowlist.
    #[error("{0}")]
    PermissionDenied(String),
    /// The hub refused access (HTTP 401/403): a private or gated repo, or a rejected token.
    #[error("{0}")]
    Unauthorized(String),
    /// The hub could not be reached or answered with a server error; worth retrying later.
    #[error("{0}")]
    Unavailable(String),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
