//! [`ComponentStore`] over gRPC: the orchestrator's view of a separate `autopipe-store` process.
//! Pipelines run on blocking threads, so each call blocks on the async client.

use autopipe_proto::auth::BearerToken;
use autopipe_proto::tls::ClientTls;
use autopipe_proto::transport::{self, Address, MAX_MESSAGE_BYTES};
use autopipe_proto::v1::{self, store_client::StoreClient};
use autopipe_proto::{tensor_from_wire, tensor_to_wire};
use autopipe_store_api::{
    kind_name, AcquireRequest, Code, ComponentStore, Handle, Lease, StoreError, Tensors,
};
use std::time::Duration;
use tch::Device;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The store client: every call carries the orchestrator's bearer token (if it has one).
pub type StoreChannel = InterceptedService<Channel, BearerToken>;

/// A remote store reached at an address.
#[derive(Clone)]
pub struct RemoteStore {
    client: StoreClient<StoreChannel>,
    runtime: tokio::runtime::Handle,
    address: Address,
}

impl RemoteStore {
    /// A client for the store at `address` (connects lazily), driven by `runtime`, sending `token`
    /// with every call (`--store-token-file`), over `tls` on TCP (`--store-tls-*`).
    pub fn new(
        address: &Address,
        runtime: tokio::runtime::Handle,
        token: BearerToken,
        tls: &ClientTls,
    ) -> Result<Self, StoreError> {
        let channel = transport::channel(address, tls).map_err(|e| {
            StoreError::new(
                Code::InvalidArgument,
                format!("store address {address}: {e}"),
            )
        })?;
        let client = StoreClient::with_interceptor(channel, token)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self {
            client,
            runtime,
            address: address.clone(),
        })
    }

    /// The store's address.
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// The gRPC client (for Stats and the like).
    pub fn client(&self) -> StoreClient<StoreChannel> {
        self.client.clone()
    }

    fn call<T, F>(&self, f: impl FnOnce(StoreClient<StoreChannel>) -> F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.runtime
            .block_on(f(self.client.clone()))
            .map(tonic::Response::into_inner)
            .map_err(|s| StoreError::from_status(&s))
    }
}

impl ComponentStore for RemoteStore {
    fn acquire(&self, request: &AcquireRequest) -> Result<Lease, StoreError> {
        let req = v1::AcquireRequest {
            components: request
                .components
                .iter()
                .map(|c| v1::ComponentRequest {
                    name: c.name.clone(),
                    class_name: c.class_name.clone(),
                    path: c.path.display().to_string(),
                    variant: c.variant.clone().unwrap_or_default(),
                    upcast_half: c.upcast_half,
                })
                .collect(),
            dtype: request
                .kind
                .map(kind_name)
                .transpose()?
                .unwrap_or_default()
                .to_string(),
            request_id: request.request_id.clone(),
        };
        let resp = self.call(|mut c| async move { c.acquire(req).await })?;
        Ok(Lease {
            id: resp.lease_id,
            handles: resp
                .handles
                .into_iter()
                .map(|h| Handle {
                    name: h.name,
                    id: h.id,
                    class_name: h.class_name,
                })
                .collect(),
            ttl: Duration::from_millis(resp.ttl_ms),
        })
    }

    fn renew(&self, lease_id: &str) -> Result<Duration, StoreError> {
        let req = v1::RenewRequest {
            lease_id: lease_id.to_string(),
        };
        let resp = self.call(|mut c| async move { c.renew(req).await })?;
        Ok(Duration::from_millis(resp.ttl_ms))
    }

    fn release(&self, lease_id: &str) -> Result<(), StoreError> {
        let req = v1::ReleaseRequest {
            lease_id: lease_id.to_string(),
        };
        self.call(|mut c| async move { c.release(req).await })
            .map(|_| ())
    }

    fn invoke(
        &self,
        lease_id: &str,
        handle_id: &str,
        method: &str,
        inputs: Tensors,
        request_id: &str,
    ) -> Result<Tensors, StoreError> {
        let inputs = inputs
            .iter()
            .map(|(name, t)| {
                Ok(v1::NamedTensor {
                    name: name.clone(),
                    tensor: Some(tensor_to_wire(t).map_err(|e| {
                        StoreError::new(Code::InvalidArgument, format!("{name}: {e}"))
                    })?),
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let req = v1::InvokeRequest {
            lease_id: lease_id.to_string(),
            handle_id: handle_id.to_string(),
            method: method.to_string(),
            inputs,
            request_id: request_id.to_string(),
        };
        let resp = self.call(|mut c| async move { c.invoke(req).await })?;
        resp.outputs
            .into_iter()
            .map(|nt| {
                let wire = nt.tensor.ok_or_else(|| {
                    StoreError::new(Code::Internal, format!("output {} has no tensor", nt.name))
                })?;
                let t = tensor_from_wire(&wire, Device::Cpu).map_err(|e| {
                    StoreError::new(Code::Internal, format!("output {}: {e}", nt.name))
                })?;
                Ok((nt.name, t))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_that_is_not_a_component_dtype_is_an_error_not_float32() {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let _entered = runtime.enter();
        let address: Address = "127.0.0.1:1".parse().expect("address");
        let store = RemoteStore::new(
            &address,
            runtime.handle().clone(),
            BearerToken::none(),
            &ClientTls::none(),
        )
        .expect("client");
        let err = store
            .acquire(&AcquireRequest {
                components: Vec::new(),
                kind: Some(tch::Kind::Int64),
                request_id: String::new(),
            })
            .unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument, "{err}");
        assert!(err.message.starts_with("dtype:"), "{err}");
    }
}
