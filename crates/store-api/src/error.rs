//! Store errors, each carrying the status code a client sees.

/// How a store error maps onto gRPC status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidArgument,
    NotFound,
    /// A path outside the store's model roots.
    PermissionDenied,
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
        Self {
            code,
            message: message.into(),
        }
    }
}

impl Code {
    /// The gRPC code: the one mapping both services use.
    pub fn to_tonic(self) -> tonic::Code {
        match self {
            Code::InvalidArgument => tonic::Code::InvalidArgument,
            Code::NotFound => tonic::Code::NotFound,
            Code::PermissionDenied => tonic::Code::PermissionDenied,
            Code::FailedPrecondition => tonic::Code::FailedPrecondition,
            Code::ResourceExhausted => tonic::Code::ResourceExhausted,
            Code::Unavailable => tonic::Code::Unavailable,
            Code::Unimplemented => tonic::Code::Unimplemented,
            Code::Cancelled => tonic::Code::Cancelled,
            Code::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            Code::Internal => tonic::Code::Internal,
        }
    }

    /// A gRPC status with this code.
    pub fn status(self, message: impl Into<String>) -> tonic::Status {
        tonic::Status::new(self.to_tonic(), message)
    }
}

impl StoreError {
    /// The gRPC status a client sees.
    pub fn to_status(&self) -> tonic::Status {
        self.code.status(self.message.clone())
    }

    /// A store error from a remote store's status; transport failures become UNAVAILABLE.
    pub fn from_status(s: &tonic::Status) -> Self {
        let code = match s.code() {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => Code::InvalidArgument,
            tonic::Code::NotFound => Code::NotFound,
            tonic::Code::PermissionDenied => Code::PermissionDenied,
            tonic::Code::FailedPrecondition => Code::FailedPrecondition,
            tonic::Code::ResourceExhausted => Code::ResourceExhausted,
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Aborted => {
                Code::Unavailable
            }
            tonic::Code::Unimplemented => Code::Unimplemented,
            // A transport failure (a connection refused at its TLS handshake, or dropped) comes
            // back from hyper as "operation was canceled", with the error as its source; a
            // status the store itself answered has none. The first is an unreachable store.
            tonic::Code::Cancelled if std::error::Error::source(s).is_some() => Code::Unavailable,
            tonic::Code::Cancelled => Code::Cancelled,
            tonic::Code::DeadlineExceeded => Code::DeadlineExceeded,
            _ => Code::Internal,
        };
        // The whole cause chain: a refused handshake's reason is at its bottom.
        let mut message = format!("store: {}", s.message());
        let mut cause = std::error::Error::source(s);
        while let Some(c) = cause {
            let text = c.to_string();
            if !message.ends_with(&text) {
                message = format!("{message}: {text}");
            }
            cause = c.source();
        }
        Self::new(code, message)
    }
}
