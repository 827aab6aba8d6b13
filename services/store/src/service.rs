//! The `autopipe.v1.Store` gRPC service over an in-process [`Store`].

use crate::metrics::Metrics;
use autopipe_proto::auth::Authenticate;
use autopipe_proto::tls::ServerTls;
use autopipe_proto::transport::{self, Address, Incoming, MAX_MESSAGE_BYTES};
use autopipe_proto::v1::{self, store_server::StoreServer};
use autopipe_proto::{tensor_from_wire, tensor_to_wire};
use autopipe_store::{
    AcquireRequest, Code, ComponentSpec, ComponentStore, Pinned, Store, StoreError,
};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};
use tracing::Instrument;

struct StoreService {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
}

/// Runs blocking store work (loads, forward passes) off the async workers, inside the caller's span.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Status> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        // Wire ⇄ tensor conversions only; the forward passes run on the store's compute thread.
        autopipe_store::single_threaded_kernels();
        span.in_scope(f)
    })
    .await
    .map_err(|e| Status::internal(format!("store task failed: {e}")))?
    .map_err(|e| e.to_status())
}

/// Checks the `components` of Acquire/Load/Unload and converts them; fields named by index.
fn component_specs(components: Vec<v1::ComponentRequest>) -> Result<Vec<ComponentSpec>, Status> {
    let mut specs = Vec::with_capacity(components.len());
    for (i, c) in components.into_iter().enumerate() {
        for (field, v) in [
            ("name", &c.name),
            ("class_name", &c.class_name),
            ("path", &c.path),
        ] {
            if v.trim().is_empty() {
                return Err(Status::invalid_argument(format!(
                    "components[{i}].{field}: is required"
                )));
            }
        }
        specs.push(ComponentSpec {
            name: c.name,
            class_name: c.class_name,
            path: c.path.into(),
            variant: (!c.variant.is_empty()).then_some(c.variant),
            upcast_half: c.upcast_half,
        });
    }
    Ok(specs)
}

fn dtype(name: &str) -> Result<Option<tch::Kind>, Status> {
    autopipe_store::parse_kind_opt(name)
        .map_err(|e| Status::invalid_argument(format!("dtype: {e}")))
}

fn pinned_to_wire(p: Vec<Pinned>) -> Vec<v1::PinnedComponent> {
    p.into_iter()
        .map(|p| v1::PinnedComponent {
            name: p.name,
            key: p.key,
            bytes: p.bytes,
            changed: p.changed,
            active_leases: p.active_leases,
        })
        .collect()
}

impl StoreService {
    /// Counts an RPC's outcome in the metrics and logs failures.
    fn counted<T>(&self, rpc: &'static str, r: Result<T, Status>) -> Result<T, Status> {
        let code = r
            .as_ref()
            .map(|_| tonic::Code::Ok)
            .unwrap_or_else(|s| s.code());
        self.metrics.rpc(rpc, code);
        if let Err(s) = &r {
            tracing::debug!(
                rpc,
                code = autopipe_proto::metrics::code_name(s.code()),
                message = s.message(),
                "rpc failed"
            );
        }
        r
    }

    async fn acquire_inner(&self, req: v1::AcquireRequest) -> Result<v1::AcquireResponse, Status> {
        let kind = dtype(&req.dtype)?;
        let components = component_specs(req.components)?;
        let request = AcquireRequest {
            components,
            kind,
            request_id: req.request_id,
        };
        let store = self.store.clone();
        let lease = blocking(move || store.acquire(&request)).await?;
        tracing::info!(lease = %lease.id, components = lease.handles.len(), "acquired");
        Ok(v1::AcquireResponse {
            lease_id: lease.id,
            handles: lease
                .handles
                .into_iter()
                .map(|h| v1::Handle {
                    name: h.name,
                    id: h.id,
                    class_name: h.class_name,
                })
                .collect(),
            ttl_ms: lease.ttl.as_millis() as u64,
        })
    }

    async fn invoke_inner(&self, req: v1::InvokeRequest) -> Result<v1::InvokeResponse, Status> {
        if req.method.is_empty() {
            return Err(Status::invalid_argument("method: is required"));
        }
        let store = self.store.clone();
        let device = store.config().device;
        let outputs = blocking(move || {
            let mut inputs = Vec::with_capacity(req.inputs.len());
            for (i, nt) in req.inputs.iter().enumerate() {
                if nt.name.is_empty() {
                    return Err(StoreError::new(
                        Code::InvalidArgument,
                        format!("inputs[{i}].name: is required"),
                    ));
                }
                let wire = nt.tensor.as_ref().ok_or_else(|| {
                    StoreError::new(
                        Code::InvalidArgument,
                        format!("inputs.{}: no tensor", nt.name),
                    )
                })?;
                let t = tensor_from_wire(wire, device).map_err(|e| {
                    StoreError::new(Code::InvalidArgument, format!("inputs.{}: {e}", nt.name))
                })?;
                inputs.push((nt.name.clone(), t));
            }
            let outputs = store.invoke(
                &req.lease_id,
                &req.handle_id,
                &req.method,
                inputs,
                &req.request_id,
            )?;
            outputs
                .iter()
                .map(|(name, t)| {
                    Ok(v1::NamedTensor {
                        name: name.clone(),
                        tensor: Some(tensor_to_wire(t).map_err(|e| {
                            StoreError::new(Code::Internal, format!("{name}: {e}"))
                        })?),
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()
        })
        .await?;
        Ok(v1::InvokeResponse { outputs })
    }

    async fn load_inner(&self, req: v1::LoadRequest) -> Result<v1::LoadResponse, Status> {
        let kind = dtype(&req.dtype)?;
        let components = component_specs(req.components)?;
        let store = self.store.clone();
        let pinned = blocking(move || store.load(&components, kind)).await?;
        tracing::info!(components = pinned.len(), "loaded and pinned");
        Ok(v1::LoadResponse {
            components: pinned_to_wire(pinned),
        })
    }

    async fn unload_inner(&self, req: v1::UnloadRequest) -> Result<v1::UnloadResponse, Status> {
        let kind = dtype(&req.dtype)?;
        let components = component_specs(req.components)?;
        let store = self.store.clone();
        let keys = req.keys;
        let unpinned = blocking(move || store.unload(&components, kind, &keys)).await?;
        tracing::info!(components = unpinned.len(), "unloaded");
        Ok(v1::UnloadResponse {
            components: pinned_to_wire(unpinned),
        })
    }
}

#[tonic::async_trait]
impl v1::store_server::Store for StoreService {
    async fn acquire(
        &self,
        req: Request<v1::AcquireRequest>,
    ) -> Result<Response<v1::AcquireResponse>, Status> {
        let req = req.into_inner();
        let span = tracing::info_span!("acquire", request_id = %req.request_id);
        let r = self.acquire_inner(req).instrument(span).await;
        self.counted("Acquire", r).map(Response::new)
    }

    async fn renew(
        &self,
        req: Request<v1::RenewRequest>,
    ) -> Result<Response<v1::RenewResponse>, Status> {
        let r = self
            .store
            .renew(&req.into_inner().lease_id)
            .map_err(|e| e.to_status());
        self.counted("Renew", r).map(|ttl| {
            Response::new(v1::RenewResponse {
                ttl_ms: ttl.as_millis() as u64,
            })
        })
    }

    async fn release(
        &self,
        req: Request<v1::ReleaseRequest>,
    ) -> Result<Response<v1::ReleaseResponse>, Status> {
        let r = self
            .store
            .release(&req.into_inner().lease_id)
            .map_err(|e| e.to_status());
        self.counted("Release", r)
            .map(|_| Response::new(v1::ReleaseResponse {}))
    }

    async fn invoke(
        &self,
        req: Request<v1::InvokeRequest>,
    ) -> Result<Response<v1::InvokeResponse>, Status> {
        let req = req.into_inner();
        let span =
            tracing::debug_span!("invoke", request_id = %req.request_id, method = %req.method);
        let r = self.invoke_inner(req).instrument(span).await;
        self.counted("Invoke", r).map(Response::new)
    }

    async fn stats(
        &self,
        _: Request<v1::StatsRequest>,
    ) -> Result<Response<v1::StatsResponse>, Status> {
        let s = self.store.stats();
        self.metrics.rpc("Stats", tonic::Code::Ok);
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
                    pinned: c.pinned,
                    stale: c.stale,
                })
                .collect(),
            resident_bytes: s.resident_bytes,
            active_leases: s.active_leases,
            memory_budget_bytes: s.memory_budget.unwrap_or(0),
            evictions: s.evictions,
            loads: s.loads,
            expired_leases: s.expired_leases,
            batched_forwards: s.batching.batched_forwards,
            batched_calls: s.batching.batched_calls,
        }))
    }

    async fn load(
        &self,
        req: Request<v1::LoadRequest>,
    ) -> Result<Response<v1::LoadResponse>, Status> {
        let req = req.into_inner();
        let span = tracing::info_span!("load", request_id = %req.request_id);
        let r = self.load_inner(req).instrument(span).await;
        self.counted("Load", r).map(Response::new)
    }

    async fn unload(
        &self,
        req: Request<v1::UnloadRequest>,
    ) -> Result<Response<v1::UnloadResponse>, Status> {
        let req = req.into_inner();
        let span = tracing::info_span!("unload", request_id = %req.request_id);
        let r = self.unload_inner(req).instrument(span).await;
        self.counted("Unload", r).map(Response::new)
    }
}

/// Serves the store (plus grpc.health.v1 and reflection, which `auth` never guards) until
/// SIGTERM/Ctrl-C, then drains. A TCP `listen` serves TLS when `tls` is given (its client CA, if
/// any, is how the store admits only orchestrators); `health_listen` serves grpc.health.v1 alone,
/// in plaintext, for probes.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    listen: Address,
    metrics_listen: Option<String>,
    drain_timeout: Duration,
    auth: Authenticate,
    tls: Option<ServerTls>,
    health_listen: Option<Address>,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<StoreServer<StoreService>>().await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(autopipe_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    if let Some(addr) = &metrics_listen {
        let local = crate::metrics::serve(addr, metrics.clone(), store.clone()).await?;
        tracing::info!(listen = %local, "metrics on http://{local}/metrics");
    }
    if let Some(health_listen) = &health_listen {
        transport::serve_health(health_listen, health_service.clone()).await?;
    }
    let incoming = Incoming::bind(&listen, tls.as_ref()).await?;
    tracing::info!(
        listen = %incoming.local_address(),
        device = ?store.config().device,
        mtls = tls.as_ref().is_some_and(ServerTls::verifies_clients),
        "store serving"
    );
    // Expired leases are also reaped on every call; this keeps Stats honest when idle.
    let reaper = store.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            reaper.reap_expired();
        }
    });
    let router = transport::server()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            StoreServer::new(StoreService { store, metrics })
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            auth,
        ));
    let on_drain = async move {
        health.set_not_serving::<StoreServer<StoreService>>().await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    };
    transport::serve_with_drain(
        router,
        incoming,
        transport::shutdown_signal(),
        on_drain,
        drain_timeout,
    )
    .await?;
    Ok(())
}
