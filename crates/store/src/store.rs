//! The in-process store engine: residency by content key, leases, LRU eviction under a budget.

use crate::component::{load_component, Component, Tensors};
use crate::digest::DigestCache;
use crate::{AcquireRequest, Code, ComponentSpec, ComponentStore, Handle, Lease, StoreError};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tch::{Device, Kind};

/// How a store is set up.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub device: Device,
    /// Weight dtype when a request names none.
    pub default_kind: Kind,
    /// Resident bytes allowed; `None` = unlimited.
    pub memory_budget: Option<u64>,
    /// A lease not renewed (or used) for this long expires.
    pub lease_ttl: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self { device: Device::Cpu, default_kind: Kind::Float, memory_budget: None, lease_ttl: Duration::from_secs(60) }
    }
}

/// The identity of a resident component: same bytes, dtype and device → one copy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ComponentKey {
    digest: String,
    kind: Kind,
    device: Device,
}

impl std::fmt::Display for ComponentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.digest, kind_name(self.kind), device_name(self.device))
    }
}

struct Resident {
    class_name: String,
    component: Arc<dyn Component>,
    bytes: u64,
}

/// A component's place in the store: filled once, by whichever acquirer gets there first; others wait.
/// `loading` is held for a whole load (coalescing); `resident` only for moments, so that eviction,
/// which inspects every slot under the state lock, never waits on a load.
#[derive(Default)]
struct Slot {
    loading: Mutex<()>,
    resident: Mutex<Option<Arc<Resident>>>,
}

impl Slot {
    fn get(&self) -> Option<Arc<Resident>> {
        self.resident.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

struct Entry {
    slot: Arc<Slot>,
    class_name: String,
    paths: BTreeSet<String>,
    leases: u32,
    last_used_ms: u64,
}

struct LeaseState {
    handles: Vec<(Handle, ComponentKey)>,
    expires: Instant,
}

#[derive(Default)]
struct State {
    entries: HashMap<ComponentKey, Entry>,
    leases: HashMap<String, LeaseState>,
    load_counts: HashMap<ComponentKey, u64>,
    evictions: u64,
}

impl State {
    fn resident_bytes(&self) -> u64 {
        self.entries.values().filter_map(|e| e.slot.resident.lock().ok()?.as_ref().map(|r| r.bytes)).sum()
    }
}

/// One resident component, as `Stats` reports it.
#[derive(Debug, Clone)]
pub struct ComponentStats {
    pub key: String,
    pub class_name: String,
    pub bytes: u64,
    pub dtype: String,
    pub device: String,
    pub load_count: u64,
    pub active_leases: u32,
    pub last_used_ms: u64,
    pub paths: Vec<String>,
}

/// The whole store, as `Stats` reports it.
#[derive(Debug, Clone)]
pub struct StoreStats {
    pub components: Vec<ComponentStats>,
    pub resident_bytes: u64,
    pub active_leases: u32,
    pub memory_budget: Option<u64>,
    pub evictions: u64,
}

/// The in-process component store.
pub struct Store {
    config: StoreConfig,
    state: Mutex<State>,
    digests: DigestCache,
}

impl Store {
    /// An empty store.
    pub fn new(config: StoreConfig) -> Self {
        Self { config, state: Mutex::new(State::default()), digests: DigestCache::default() }
    }

    /// How this store was configured.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated in a way later calls
        // could trip over (every update is a single insert/remove), so keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends every lease whose expiry has passed; returns how many.
    pub fn reap_expired(&self) -> usize {
        let mut st = self.state();
        let now = Instant::now();
        let expired: Vec<String> =
            st.leases.iter().filter(|(_, l)| l.expires <= now).map(|(id, _)| id.clone()).collect();
        for id in &expired {
            tracing::warn!(lease = %id, "lease expired");
            Self::end_lease(&mut st, id);
        }
        expired.len()
    }

    fn end_lease(st: &mut State, lease_id: &str) -> bool {
        let Some(lease) = st.leases.remove(lease_id) else { return false };
        for (_, key) in lease.handles {
            if let Some(e) = st.entries.get_mut(&key) {
                e.leases = e.leases.saturating_sub(1);
            }
        }
        true
    }

    /// What is resident and leased.
    pub fn stats(&self) -> StoreStats {
        self.reap_expired();
        let st = self.state();
        let mut components: Vec<ComponentStats> = st
            .entries
            .iter()
            .filter_map(|(key, e)| {
                let bytes = e.slot.resident.lock().ok()?.as_ref()?.bytes;
                Some(ComponentStats {
                    key: key.to_string(),
                    class_name: e.class_name.clone(),
                    bytes,
                    dtype: kind_name(key.kind).to_string(),
                    device: device_name(key.device),
                    load_count: st.load_counts.get(key).copied().unwrap_or(0),
                    active_leases: e.leases,
                    last_used_ms: e.last_used_ms,
                    paths: e.paths.iter().cloned().collect(),
                })
            })
            .collect();
        components.sort_by(|a, b| a.key.cmp(&b.key));
        StoreStats {
            resident_bytes: components.iter().map(|c| c.bytes).sum(),
            components,
            active_leases: st.leases.len() as u32,
            memory_budget: self.config.memory_budget,
            evictions: st.evictions,
        }
    }

    fn key_for(&self, spec: &ComponentSpec, kind: Kind) -> Result<(ComponentKey, Vec<PathBuf>), StoreError> {
        if !spec.path.is_dir() {
            return Err(StoreError::new(
                Code::NotFound,
                format!("component {:?}: folder {} does not exist", spec.name, spec.path.display()),
            ));
        }
        let files = autopipe_models::weights::weight_files(&spec.path, spec.variant.as_deref())
            .map_err(|e| StoreError::new(Code::NotFound, format!("component {:?}: {e}", spec.name)))?;
        let digest = self.digests.component(&spec.class_name, &spec.path, &files)?;
        Ok((ComponentKey { digest, kind, device: self.config.device }, files))
    }

    /// Makes room for `need` more bytes by evicting unleased components, least recently used first.
    fn make_room(&self, st: &mut State, need: u64) -> Result<(), StoreError> {
        let Some(budget) = self.config.memory_budget else { return Ok(()) };
        let mut resident = st.resident_bytes();
        while resident + need > budget {
            let victim = st
                .entries
                .iter()
                .filter(|(_, e)| e.leases == 0)
                .filter_map(|(k, e)| {
                    let bytes = e.slot.resident.lock().ok()?.as_ref()?.bytes;
                    Some((k.clone(), e.last_used_ms, bytes))
                })
                .min_by_key(|(_, used, _)| *used);
            let Some((key, _, bytes)) = victim else {
                return Err(StoreError::new(
                    Code::ResourceExhausted,
                    format!(
                        "memory budget exhausted: {need} bytes needed, {resident} of {budget} resident and all of it leased"
                    ),
                ));
            };
            tracing::info!(component = %key, bytes, "evicting");
            st.entries.remove(&key);
            st.evictions += 1;
            resident -= bytes;
        }
        Ok(())
    }

    fn load_into(&self, key: &ComponentKey, slot: &Slot, spec: &ComponentSpec, files: &[PathBuf]) -> Result<(), StoreError> {
        let _loading = slot.loading.lock().unwrap_or_else(|p| p.into_inner());
        if slot.get().is_some() {
            return Ok(());
        }
        let bytes = estimate_bytes(files, key.kind)?;
        {
            let mut st = self.state();
            self.make_room(&mut st, bytes)?;
        }
        let started = Instant::now();
        let component = load_component(&spec.class_name, &spec.path, spec.variant.as_deref(), key.kind, key.device)?;
        tracing::info!(component = %spec.name, class = %spec.class_name, key = %key, bytes, ms = started.elapsed().as_millis() as u64, "loaded");
        *slot.resident.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Arc::new(Resident { class_name: spec.class_name.clone(), component: Arc::from(component), bytes }));
        *self.state().load_counts.entry(key.clone()).or_default() += 1;
        Ok(())
    }

    fn acquire_inner(&self, request: &AcquireRequest) -> Result<Lease, StoreError> {
        self.reap_expired();
        if request.components.is_empty() {
            return Err(StoreError::new(Code::InvalidArgument, "components: at least one component is required"));
        }
        let kind = request.kind.unwrap_or(self.config.default_kind);
        let mut keyed = Vec::with_capacity(request.components.len());
        for spec in &request.components {
            if !crate::SUPPORTED_CLASSES.contains(&spec.class_name.as_str()) {
                return Err(StoreError::new(
                    Code::Unimplemented,
                    format!("component {:?}: class {} is not supported by this store", spec.name, spec.class_name),
                ));
            }
            let (key, files) = self.key_for(spec, kind)?;
            keyed.push((spec, key, files));
        }
        // Take the lease first, so nothing this request needs is evicted while its siblings load.
        let lease_id = uuid::Uuid::new_v4().to_string();
        let mut slots = Vec::with_capacity(keyed.len());
        {
            let mut st = self.state();
            let mut handles = Vec::new();
            for (spec, key, _) in &keyed {
                let e = st.entries.entry(key.clone()).or_insert_with(|| Entry {
                    slot: Arc::new(Slot::default()),
                    class_name: spec.class_name.clone(),
                    paths: BTreeSet::new(),
                    leases: 0,
                    last_used_ms: now_ms(),
                });
                e.leases += 1;
                e.last_used_ms = now_ms();
                e.paths.insert(spec.path.display().to_string());
                slots.push(e.slot.clone());
                let handle = Handle {
                    name: spec.name.clone(),
                    id: uuid::Uuid::new_v4().to_string(),
                    class_name: spec.class_name.clone(),
                };
                handles.push((handle, key.clone()));
            }
            st.leases.insert(lease_id.clone(), LeaseState { handles, expires: Instant::now() + self.config.lease_ttl });
        }
        for ((spec, key, files), slot) in keyed.iter().zip(&slots) {
            if let Err(e) = self.load_into(key, slot, spec, files) {
                let mut st = self.state();
                Self::end_lease(&mut st, &lease_id);
                // Drop placeholders that never loaded, so a failed load leaves nothing behind.
                st.entries.retain(|_, e| e.leases > 0 || e.slot.resident.lock().map(|r| r.is_some()).unwrap_or(false));
                return Err(e);
            }
        }
        let st = self.state();
        let lease = st.leases.get(&lease_id).expect("lease inserted above");
        Ok(Lease { id: lease_id, handles: lease.handles.iter().map(|(h, _)| h.clone()).collect(), ttl: self.config.lease_ttl })
    }

    fn resolve_handle(&self, lease_id: &str, handle_id: &str) -> Result<Arc<Resident>, StoreError> {
        let mut st = self.state();
        let now = Instant::now();
        let ttl = self.config.lease_ttl;
        let lease = match st.leases.get_mut(lease_id) {
            Some(l) if l.expires > now => l,
            Some(_) => {
                Self::end_lease(&mut st, lease_id);
                return Err(StoreError::new(Code::FailedPrecondition, format!("lease {lease_id} has expired")));
            }
            None => {
                return Err(StoreError::new(Code::FailedPrecondition, format!("lease {lease_id:?} is unknown or has ended")))
            }
        };
        // Using a lease keeps it alive, like a renewal.
        lease.expires = now + ttl;
        let key = lease
            .handles
            .iter()
            .find(|(h, _)| h.id == handle_id)
            .map(|(_, k)| k.clone())
            .ok_or_else(|| StoreError::new(Code::InvalidArgument, format!("handle {handle_id:?} does not belong to lease {lease_id}")))?;
        let entry = st.entries.get_mut(&key).ok_or_else(|| StoreError::new(Code::Internal, "leased component missing"))?;
        entry.last_used_ms = now_ms();
        entry.slot.get().ok_or_else(|| StoreError::new(Code::Internal, "leased component is not loaded"))
    }
}

impl ComponentStore for Store {
    fn acquire(&self, request: &AcquireRequest) -> Result<Lease, StoreError> {
        self.acquire_inner(request)
    }

    fn renew(&self, lease_id: &str) -> Result<Duration, StoreError> {
        self.reap_expired();
        let mut st = self.state();
        let lease = st
            .leases
            .get_mut(lease_id)
            .ok_or_else(|| StoreError::new(Code::FailedPrecondition, format!("lease {lease_id:?} is unknown or has expired")))?;
        lease.expires = Instant::now() + self.config.lease_ttl;
        Ok(self.config.lease_ttl)
    }

    fn release(&self, lease_id: &str) -> Result<(), StoreError> {
        let mut st = self.state();
        if Self::end_lease(&mut st, lease_id) {
            Ok(())
        } else {
            Err(StoreError::new(Code::FailedPrecondition, format!("lease {lease_id:?} is unknown or has expired")))
        }
    }

    fn invoke(
        &self,
        lease_id: &str,
        handle_id: &str,
        method: &str,
        inputs: Tensors,
        request_id: &str,
    ) -> Result<Tensors, StoreError> {
        let resident = self.resolve_handle(lease_id, handle_id)?;
        let _span = tracing::debug_span!("invoke", class = %resident.class_name, method, request_id).entered();
        let _guard = tch::no_grad_guard();
        // libtorch reports shape errors by exception; tch turns most into Err, but a few paths panic.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| resident.component.invoke(method, &inputs)))
            .unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "component panicked".into());
                Err(StoreError::new(Code::InvalidArgument, format!("{}.{method}: {msg}", resident.class_name)))
            })
    }
}

/// Parameter bytes of the weight files once converted to `kind` (from the safetensors headers).
fn estimate_bytes(files: &[PathBuf], kind: Kind) -> Result<u64, StoreError> {
    let mut total = 0u64;
    for f in files {
        let file = std::fs::File::open(f).map_err(|e| StoreError::new(Code::NotFound, format!("{}: {e}", f.display())))?;
        // SAFETY: read-only map of a weight file; the store does not modify weight files.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| StoreError::new(Code::Internal, format!("{}: {e}", f.display())))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&mmap)
            .map_err(|e| StoreError::new(Code::FailedPrecondition, format!("{}: {e}", f.display())))?;
        for info in meta.tensors().values() {
            let numel: usize = info.shape.iter().product();
            let elt = match info.dtype {
                safetensors::Dtype::F16 | safetensors::Dtype::BF16 | safetensors::Dtype::F32 | safetensors::Dtype::F64 => {
                    kind.elt_size_in_bytes()
                }
                other => other.bitsize().div_ceil(8),
            };
            total += (numel * elt) as u64;
        }
    }
    Ok(total)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// diffusers/torch dtype name of a kind.
pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "float32",
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        Kind::Double => "float64",
        _ => "other",
    }
}

fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}
