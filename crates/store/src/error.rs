//! Store errors, each carrying the status code a client sees.

/// How a store error maps onto gRPC status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidArgument,
    NotFound,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
    Cancelled,
    DeadlineExceeded,
    Internal,
}

/// An error from the store, local or remote.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    pub code: Code,
    pub message: String,
}

impl StoreError {
    /// An error with a code and message.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

impl From<autopipe_models::Error> for StoreError {
    fn from(e: autopipe_models::Error) -> Self {
        use autopipe_models::Error as E;
        let code = match &e {
            E::Config(_) | E::Weights(_) => Code::FailedPrecondition,
            E::Input(_) => Code::InvalidArgument,
            E::Io(io) if io.kind() == std::io::ErrorKind::NotFound => Code::NotFound,
            _ => Code::Internal,
        };
        Self::new(code, e.to_string())
    }
}
