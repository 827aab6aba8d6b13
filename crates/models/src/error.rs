//! Errors from building or loading a model component.

/// What went wrong building, loading or running a component.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `config.json` is missing, unreadable or holds a value this implementation cannot build.
    #[error("config: {0}")]
    Config(String),
    /// Weight files are missing, malformed, or do not match the module's parameters.
    #[error("weights: {0}")]
    Weights(String),
    /// An input tensor has the wrong shape, dtype or device for this component.
    #[error("input: {0}")]
    Input(String),
    /// Reading a file failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// libtorch reported an error (e.g. a kernel rejected its inputs or ran out of memory).
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
