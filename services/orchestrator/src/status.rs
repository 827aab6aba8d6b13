//! The one mapping between autopipe's error codes and gRPC status codes.

use autopipe_store::{Code, StoreError};
use tonic::Status;

fn to_tonic(code: Code) -> tonic::Code {
    match code {
        Code::InvalidArgument => tonic::Code::InvalidArgument,
        Code::NotFound => tonic::Code::NotFound,
        Code::FailedPrecondition => tonic::Code::FailedPrecondition,
        Code::ResourceExhausted => tonic::Code::ResourceExhausted,
        Code::Unavailable => tonic::Code::Unavailable,
        Code::Unimplemented => tonic::Code::Unimplemented,
        Code::Cancelled => tonic::Code::Cancelled,
        Code::DeadlineExceeded => tonic::Code::DeadlineExceeded,
        Code::Internal => tonic::Code::Internal,
    }
}

/// A gRPC status for an error with autopipe's code.
pub fn status(code: Code, message: impl Into<String>) -> Status {
    Status::new(to_tonic(code), message)
}

/// The gRPC status a store error becomes.
pub fn status_from_store_error(e: &StoreError) -> Status {
    status(e.code, e.message.clone())
}

/// A store error from a remote store's status; transport failures become UNAVAILABLE.
pub fn store_error_from_status(s: &Status) -> StoreError {
    let code = match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => Code::InvalidArgument,
        tonic::Code::NotFound => Code::NotFound,
        tonic::Code::FailedPrecondition => Code::FailedPrecondition,
        tonic::Code::ResourceExhausted => Code::ResourceExhausted,
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Aborted => Code::Unavailable,
        tonic::Code::Unimplemented => Code::Unimplemented,
        tonic::Code::Cancelled => Code::Cancelled,
        tonic::Code::DeadlineExceeded => Code::DeadlineExceeded,
        _ => Code::Internal,
    };
    StoreError::new(code, format!("store: {}", s.message()))
}
