//! autopipe's wire contract (`proto/autopipe/v1`): generated tonic/prost code, and the conversion
//! between `tch` tensors and the wire's `Tensor` message.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("autopipe.v1");
}

/// Encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("autopipe_descriptor");

pub mod auth;
pub mod metrics;
mod tensor;
pub mod tls;
pub mod transport;
mod watch;
pub use tensor::{dtype_from_kind, kind_from_dtype, tensor_from_wire, tensor_to_wire, TensorError};
