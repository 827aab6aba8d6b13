//! The `autopipe.v1.Store` gRPC service over an in-process [`Store`].

use autopipe_proto::transport::{self, Address, Incoming, MAX_MESSAGE_BYTES};
use autopipe_proto::v1::{self, store_server::StoreServer};
use autopipe_proto::{tensor_from_wire, tensor_to_wire};
use autopipe_store::{AcquireRequest, Code, ComponentSpec, ComponentStore, Store, StoreError};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

struct StoreService {
    store: Arc<Store>,
}

fn status(e: &StoreError) -> Status {
    e.to_status()
}

/// Runs blocking store work (loads, forward passes) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, StoreError> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("store task failed: {e}")))?
        .map_err(|e| status(&e))
}

#[tonic::async_trait]
impl v1::store_server::Store for StoreService {
    async fn acquire(&self, req: Request<v1::AcquireRequest>) -> Result<Response<v1::AcquireResponse>, Status> {
        let req = req.into_inner();
        let kind = autopipe_store::parse_kind_opt(&req.dtype).map_err(|e| Status::invalid_argument(format!("dtype: {e}")))?;
        let mut components = Vec::with_capacity(req.components.len());
        for (i, c) in req.components.into_iter().enumerate() {
            for (field, v) in [("name", &c.name), ("class_name", &c.class_name), ("path", &c.path)] {
                if v.trim().is_empty() {
                    return Err(Status::invalid_argument(format!("components[{i}].{field}: is required")));
                }
            }
            components.push(ComponentSpec {
                name: c.name,
                class_name: c.class_name,
                path: c.path.into(),
                variant: (!c.variant.is_empty()).then_some(c.variant),
            });
        }
        let request = AcquireRequest { components, kind, request_id: req.request_id };
        let store = self.store.clone();
        let lease = blocking(move || store.acquire(&request)).await?;
        Ok(Response::new(v1::AcquireResponse {
            lease_id: lease.id,
            handles: lease
                .handles
                .into_iter()
                .map(|h| v1::Handle { name: h.name, id: h.id, class_name: h.class_name })
                .collect(),
            ttl_ms: lease.ttl.as_millis() as u64,
        }))
    }

    async fn renew(&self, req: Request<v1::RenewRequest>) -> Result<Response<v1::RenewResponse>, Status> {
        let ttl = self.store.renew(&req.into_inner().lease_id).map_err(|e| status(&e))?;
        Ok(Response::new(v1::RenewResponse { ttl_ms: ttl.as_millis() as u64 }))
    }

    async fn release(&self, req: Request<v1::ReleaseRequest>) -> Result<Response<v1::ReleaseResponse>, Status> {
        self.store.release(&req.into_inner().lease_id).map_err(|e| status(&e))?;
        Ok(Response::new(v1::ReleaseResponse {}))
    }

    async fn invoke(&self, req: Request<v1::InvokeRequest>) -> Result<Response<v1::InvokeResponse>, Status> {
        let req = req.into_inner();
        let store = self.store.clone();
        let device = store.config().device;
        let outputs = blocking(move || {
            let mut inputs = Vec::with_capacity(req.inputs.len());
            for nt in &req.inputs {
                let wire = nt
                    .tensor
                    .as_ref()
                    .ok_or_else(|| StoreError::new(Code::InvalidArgument, format!("inputs.{}: no tensor", nt.name)))?;
                let t = tensor_from_wire(wire, device)
                    .map_err(|e| StoreError::new(Code::InvalidArgument, format!("inputs.{}: {e}", nt.name)))?;
                inputs.push((nt.name.clone(), t));
            }
            let outputs = store.invoke(&req.lease_id, &req.handle_id, &req.method, inputs, &req.request_id)?;
            outputs
                .iter()
                .map(|(name, t)| {
                    Ok(v1::NamedTensor {
                        name: name.clone(),
                        tensor: Some(tensor_to_wire(t).map_err(|e| StoreError::new(Code::Internal, format!("{name}: {e}")))?),
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()
        })
        .await?;
        Ok(Response::new(v1::InvokeResponse { outputs }))
    }

    async fn stats(&self, _: Request<v1::StatsRequest>) -> Result<Response<v1::StatsResponse>, Status> {
        let s = self.store.stats();
        Ok(Response::new(v1::StatsResponse {
            components: s
                .components
                .into_iter()
                .map(|c| v1::ComponentStats {
                    key: c.key,
                    class_name: c.class_name,
                    bytes: c.bytes,
                    dtype: c.dtype,
                    device: c.device,
                    load_count: c.load_count,
                    active_leases: c.active_leases,
                    last_used_ms: c.last_used_ms,
                    paths: c.paths,
                })
                .collect(),
            resident_bytes: s.resident_bytes,
            active_leases: s.active_leases,
            memory_budget_bytes: s.memory_budget.unwrap_or(0),
            evictions: s.evictions,
        }))
    }
}

/// Serves the store (plus grpc.health.v1 and reflection) until SIGTERM/Ctrl-C, then drains.
pub async fn serve(store: Arc<Store>, listen: Address, drain_timeout: Duration) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<StoreServer<StoreService>>().await;
    health.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(autopipe_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let incoming = Incoming::bind(&listen).await?;
    tracing::info!(listen = %incoming.local_address(), device = ?store.config().device, "store serving");
    // Expired leases are also reaped on every call; this keeps Stats honest when idle.
    let reaper = store.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            reaper.reap_expired();
        }
    });
    let router = tonic::transport::Server::builder().add_service(health_service).add_service(reflection).add_service(
        StoreServer::new(StoreService { store })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    let on_drain = async move {
        health.set_not_serving::<StoreServer<StoreService>>().await;
        health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    };
    transport::serve_with_drain(router, incoming, transport::shutdown_signal(), on_drain, drain_timeout).await?;
    Ok(())
}
