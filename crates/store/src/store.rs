//! The in-process store engine: residency by content key, leases, pins, LRU eviction under a budget.
//!
//! Eviction follows InvokeAI's model cache (`invokeai/backend/model_manager/load/model_cache`): a
//! held entry (leased or pinned) is never evicted; unloading a leased entry marks it stale and frees it
//! when its last lease ends.

use crate::batch::{BatchStats, Batcher, Signature};
use crate::components::{self, Component};
use crate::digest::{DigestCache, Source};
use crate::executor::{Executor, Kernels};
use crate::{
    kind_name, AcquireRequest, Code, ComponentSpec, ComponentStore, Handle, Lease, StoreError,
    Tensors,
};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tch::{Device, Kind};

/// Expired lease ids remembered so that a late call hears "expired" rather than "unknown".
const REMEMBERED_EXPIRED_LEASES: usize = 4096;

/// Times a request's components are keyed again because a possible twin appeared meanwhile.
const REKEY_ROUNDS: usize = 4;

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
    /// Where component folders may be read from (`--model-root`, the hub cache); the store checks
    /// again what the orchestrator checked, since it is the process that opens the files.
    pub roots: autopipe_repo::ModelRoots,
    /// Most calls joined into one forward (`--max-batch`; 1 = every call runs alone): see `batch`.
    pub max_batch: usize,
    /// How long a joinable call waits for partners that hold a lease on its component
    /// (`--batch-window-ms`).
    pub batch_window: Duration,
    /// CPU priority steps the loader thread runs below the compute thread (`--load-nice`; 0 =
    /// the same): see `executor`.
    pub load_nice: i32,
}

/// `--load-nice` when not given.
/// The lowest priority: the loader gets the cores the compute thread's team leaves, so a running
/// request's steps keep their pace. Bench, sd1-tiny steps while the SD 1.5-arch checkpoint loads,
/// in three runs each: fp32 1.10 / 1.43 / 1.14 × their undisturbed time at 19 against 1.61 / 1.18 /
/// 1.24 × at 10; bf16 1.00 / 1.13 / 0.97 × against 1.26 / 1.35 / 1.28 ×. A load beside a request
/// that never pauses takes 2–4 × longer (fp32 47–110 s against 20–29 s); one on an idle store as
/// long as at 0.
pub const DEFAULT_LOAD_NICE: i32 = 19;

/// `--batch-window-ms` when not given: a scheduler step between two UNet calls of a request on
/// the orchestrator's side takes well under this.
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_millis(5);

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            default_kind: Kind::Float,
            memory_budget: None,
            lease_ttl: Duration::from_secs(60),
            roots: autopipe_repo::ModelRoots::unconfined(),
            max_batch: 1,
            batch_window: DEFAULT_BATCH_WINDOW,
            load_nice: DEFAULT_LOAD_NICE,
        }
    }
}

/// Receives the store's events (for metrics); every method defaults to doing nothing.
pub trait StoreObserver: Send + Sync {
    /// A component finished loading (`ok`) or failed to.
    fn loaded(&self, _class_name: &str, _bytes: u64, _took: Duration, _ok: bool) {}
    /// An unheld component was evicted to make room.
    fn evicted(&self, _class_name: &str, _bytes: u64) {}
    /// A component method ran; `code` is `None` on success.
    fn invoked(&self, _class_name: &str, _method: &str, _took: Duration, _code: Option<Code>) {}
    /// A lease expired without being released.
    fn lease_expired(&self) {}
}

struct NoObserver;
impl StoreObserver for NoObserver {}

/// The identity of a resident component: same bytes, dtype and device → one copy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ComponentKey {
    /// The [`Source::identity`] of the files it was first loaded from (see `digest`).
    digest: String,
    kind: Kind,
    /// The kind's name, checked when the key is made.
    dtype: &'static str,
    device: Device,
}

impl std::fmt::Display for ComponentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}",
            self.digest,
            self.dtype,
            device_name(self.device)
        )
    }
}

struct Resident {
    class_name: String,
    component: Arc<dyn Component>,
    bytes: u64,
}

/// A component's place in the store: filled once, by whichever holder gets there first; others wait.
/// `loading` is held for a whole load (coalescing); `resident` only for moments, so that eviction,
/// which inspects every slot under the state lock, never waits on a load.
#[derive(Default)]
struct Slot {
    loading: Mutex<()>,
    resident: Mutex<Option<Arc<Resident>>>,
}

impl Slot {
    fn get(&self) -> Option<Arc<Resident>> {
        self.resident
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn is_resident(&self) -> bool {
        self.resident.lock().map(|r| r.is_some()).unwrap_or(false)
    }
}

struct Entry {
    slot: Arc<Slot>,
    class_name: String,
    /// The files it is loaded from, for telling whether another folder holds the same bytes.
    source: Source,
    paths: BTreeSet<String>,
    leases: u32,
    /// Loaded by an operator (`Load`): never evicted until `Unload`.
    pinned: bool,
    /// Unloaded while leased: freed when the last lease ends.
    stale: bool,
    /// Bytes charged against the budget: set when a load is admitted, so in-flight loads count too.
    charged: u64,
    /// LRU order: a store-wide counter, bumped on every acquire and invoke.
    tick: u64,
    last_used_ms: u64,
}

impl Entry {
    fn held(&self) -> bool {
        self.leases > 0 || self.pinned
    }
}

struct LeaseState {
    handles: Vec<(Handle, ComponentKey)>,
    expires: Instant,
    /// Its components are still loading: it cannot expire yet (its TTL starts once they are ready).
    loading: bool,
    /// The calls its request has made, as joining sees them (see [`LeaseState::expects`]).
    calls: CallHistory,
}

/// What a request has called, as joining sees it: the joinable (component, method) pairs it has
/// called, and the signature of its latest call if that one was joinable.
#[derive(Default)]
struct CallHistory {
    joinable: Vec<(usize, String)>,
    last: Option<Signature>,
}

impl CallHistory {
    fn has_called(&self, signature: &Signature) -> bool {
        self.joinable
            .iter()
            .any(|(c, m)| *c == signature.component() && m == signature.method())
    }
}

impl LeaseState {
    /// Whether this lease's request may be about to make a call with `signature`, so that a call
    /// with it should wait for this one (see `batch`): it has not called that component method
    /// yet (it is on its way: encoding its prompt, say), or its latest call was exactly this one
    /// (it is in its denoising loop, between two steps). A request that called the method and whose
    /// latest call went elsewhere since (its loop ended and it is decoding; it calls with another
    /// signature: another size) is not waited for: it would make every step wait out the window.
    fn expects(&self, signature: &Signature) -> bool {
        self.calls.last.as_ref() == Some(signature) || !self.calls.has_called(signature)
    }

    /// Records a call: `signature` if it can be joined, `None` if not.
    fn called(&mut self, signature: Option<&Signature>) {
        let h = &mut self.calls;
        if let Some(s) = signature {
            if !h.has_called(s) {
                h.joinable.push((s.component(), s.method().to_string()));
            }
        }
        h.last = signature.cloned();
    }
}

#[derive(Default)]
struct State {
    entries: HashMap<ComponentKey, Entry>,
    leases: HashMap<String, LeaseState>,
    load_counts: HashMap<ComponentKey, u64>,
    expired: VecDeque<String>,
    expired_set: HashSet<String>,
    tick: u64,
    loads: u64,
    evictions: u64,
    expired_leases: u64,
}

impl State {
    /// Entries in `kind` on `device` that could hold the same bytes as `source`: the same
    /// fingerprint (see `digest`).
    fn twins<'s>(
        &'s self,
        kind: Kind,
        device: Device,
        source: &'s Source,
    ) -> impl Iterator<Item = (&'s ComponentKey, &'s Entry)> {
        self.entries.iter().filter(move |(key, e)| {
            key.kind == kind && key.device == device && e.source.fingerprint == source.fingerprint
        })
    }

    fn charged_bytes(&self) -> u64 {
        self.entries.values().map(|e| e.charged).sum()
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn remember_expired(&mut self, id: &str) {
        if self.expired_set.insert(id.to_string()) {
            self.expired.push_back(id.to_string());
        }
        while self.expired.len() > REMEMBERED_EXPIRED_LEASES {
            if let Some(old) = self.expired.pop_front() {
                self.expired_set.remove(&old);
            }
        }
    }

    /// Why `lease_id` is not a live lease.
    fn lease_gone(&self, lease_id: &str) -> StoreError {
        if lease_id.is_empty() {
            // No lease is an unknown lease: the same status as any other id the store does not hold.
            StoreError::new(
                Code::FailedPrecondition,
                "lease_id: empty; acquire a lease first",
            )
        } else if self.expired_set.contains(lease_id) {
            StoreError::new(
                Code::FailedPrecondition,
                format!("lease_id: lease {lease_id} has expired (not renewed in time)"),
            )
        } else {
            StoreError::new(
                Code::FailedPrecondition,
                format!("lease_id: lease {lease_id:?} is unknown or has ended"),
            )
        }
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
    /// Pinned by `Load`: never evicted.
    pub pinned: bool,
    /// Unloaded while leased: freed on its last release.
    pub stale: bool,
}

/// The whole store, as `Stats` reports it.
#[derive(Debug, Clone)]
pub struct StoreStats {
    pub components: Vec<ComponentStats>,
    pub resident_bytes: u64,
    pub active_leases: u32,
    pub memory_budget: Option<u64>,
    pub evictions: u64,
    /// Component loads completed since start.
    pub loads: u64,
    /// Leases that expired unreleased since start.
    pub expired_leases: u64,
    /// Component calls joined into one forward since start (`batch`).
    pub batching: BatchStats,
}

/// One component an operator loaded (pinned) or unloaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    /// The request's component name (empty when named by key).
    pub name: String,
    pub key: String,
    pub bytes: u64,
    /// `Load`: it was loaded by this call (not already resident). `Unload`: it was freed now.
    pub changed: bool,
    /// Leases holding it after the call (an unloaded, leased component is freed on its last release).
    pub active_leases: u32,
}

/// Who holds entries while they load: a lease, or an operator's pin.
#[derive(Clone, Copy)]
enum Holder<'a> {
    Lease(&'a str),
    Pin(&'a [ComponentKey]),
}

/// A requested component, resolved to its key.
struct Keyed<'a> {
    /// Position in the request, for error messages.
    index: usize,
    spec: &'a ComponentSpec,
    class: &'static components::Class,
    key: ComponentKey,
    bytes: u64,
    source: Source,
    /// Keys of the entries its bytes were compared with (see [`Store::key_digest`]).
    compared: Vec<String>,
}

/// The in-process component store.
pub struct Store {
    config: StoreConfig,
    state: Mutex<State>,
    digests: DigestCache,
    observer: Arc<dyn StoreObserver>,
    /// Runs every component method (see `executor`).
    compute: Executor,
    /// Runs every load, so that loads never wait behind, or hold up, component calls.
    loader: Executor,
    /// Joins calls of concurrent requests into one forward (see `batch`).
    batcher: Arc<Batcher>,
}

impl Store {
    /// An empty store.
    pub fn new(config: StoreConfig) -> Self {
        let load_nice = config.load_nice;
        Self {
            batcher: Arc::new(Batcher::new(config.max_batch, config.batch_window)),
            config,
            state: Mutex::new(State::default()),
            digests: DigestCache::default(),
            observer: Arc::new(NoObserver),
            compute: Executor::new("autopipe-compute", Kernels::Team),
            loader: Executor::new("autopipe-load", Kernels::Single { nice: load_nice }),
        }
    }

    /// The same store, reporting its events to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn StoreObserver>) -> Self {
        self.observer = observer;
        self
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
        let expired: Vec<String> = st
            .leases
            .iter()
            .filter(|(_, l)| !l.loading && l.expires <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            tracing::warn!(lease = %id, "lease expired");
            Self::end_lease(&mut st, id);
            st.remember_expired(id);
            st.expired_leases += 1;
            self.observer.lease_expired();
        }
        expired.len()
    }

    /// Ends a lease; a stale entry whose last lease this was is freed.
    fn end_lease(st: &mut State, lease_id: &str) -> bool {
        let Some(lease) = st.leases.remove(lease_id) else {
            return false;
        };
        for (_, key) in lease.handles {
            if let Some(e) = st.entries.get_mut(&key) {
                e.leases = e.leases.saturating_sub(1);
                if e.stale && !e.held() {
                    tracing::info!(component = %key, "freeing unloaded component on its last release");
                    st.entries.remove(&key);
                }
            }
        }
        true
    }

    /// Drops entries nothing holds that never finished loading, so a failed load leaves nothing behind.
    fn drop_placeholders(st: &mut State) {
        st.entries.retain(|_, e| e.held() || e.slot.is_resident());
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
                    dtype: key.dtype.to_string(),
                    device: device_name(key.device),
                    load_count: st.load_counts.get(key).copied().unwrap_or(0),
                    active_leases: e.leases,
                    last_used_ms: e.last_used_ms,
                    paths: e.paths.iter().cloned().collect(),
                    pinned: e.pinned,
                    stale: e.stale,
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
            loads: st.loads,
            expired_leases: st.expired_leases,
            batching: self.batcher.stats(),
        }
    }

    /// Checks a request's components and finds each one's content key and size.
    fn resolve<'a>(
        &self,
        components: &'a [ComponentSpec],
        kind: Kind,
    ) -> Result<Vec<Keyed<'a>>, StoreError> {
        if components.is_empty() {
            return Err(StoreError::new(
                Code::InvalidArgument,
                "components: at least one component is required",
            ));
        }
        kind_name(kind)?;
        let mut names = HashSet::new();
        let mut keyed = Vec::with_capacity(components.len());
        for (i, spec) in components.iter().enumerate() {
            if !names.insert(spec.name.as_str()) {
                return Err(StoreError::new(
                    Code::InvalidArgument,
                    format!(
                        "components[{i}].name: {:?} appears more than once",
                        spec.name
                    ),
                ));
            }
            let class = components::find(&spec.class_name).ok_or_else(|| {
                StoreError::new(
                    Code::Unimplemented,
                    format!(
                        "components[{i}].class_name: {} ({:?}) is not supported by this store (supported: {})",
                        spec.class_name,
                        spec.name,
                        components::supported()
                    ),
                )
            })?;
            // A folder missing inside a root is reported below, like any missing folder.
            if let Err(autopipe_repo::Error::PermissionDenied(reason)) =
                self.config.roots.component_folder(&spec.path)
            {
                return Err(StoreError::new(
                    Code::PermissionDenied,
                    format!("components[{i}].path: {reason}"),
                ));
            }
            if !spec.path.is_dir() {
                return Err(StoreError::new(
                    Code::NotFound,
                    format!(
                        "components[{i}].path: folder {} of {:?} does not exist",
                        spec.path.display(),
                        spec.name
                    ),
                ));
            }
            let kind = if spec.upcast_half && kind == Kind::Half {
                Kind::Float
            } else {
                kind
            };
            let dtype = kind_name(kind)?;
            let files = autopipe_models::weights::weight_files(&spec.path, spec.variant.as_deref())
                .map_err(|e| {
                    StoreError::new(
                        Code::NotFound,
                        format!("components[{i}].path: {:?}: {e}", spec.name),
                    )
                })?;
            let source = self.digests.source(&spec.class_name, &spec.path, &files)?;
            let mut compared = Vec::new();
            let digest = self.key_digest(&source, kind, &mut compared)?;
            let bytes = estimate_bytes(&files, kind).map_err(|e| {
                StoreError::new(
                    e.code,
                    format!("components[{i}].path: {:?}: {}", spec.name, e.message),
                )
            })?;
            keyed.push(Keyed {
                index: i,
                spec,
                class,
                key: ComponentKey {
                    digest,
                    kind,
                    dtype,
                    device: self.config.device,
                },
                bytes,
                source,
                compared,
            });
        }
        Ok(keyed)
    }

    /// The key digest for `source` in `kind`: its own identity, unless an entry of the same
    /// fingerprint, loaded from other files, holds the same bytes: then that entry's key. Hashes
    /// bytes only when there is such an entry, and records the keys compared in `compared`.
    fn key_digest(
        &self,
        source: &Source,
        kind: Kind,
        compared: &mut Vec<String>,
    ) -> Result<String, StoreError> {
        let twins: Vec<(String, Source)> = {
            let st = self.state();
            let twins = st.twins(kind, self.config.device, source);
            let twins: Vec<_> = twins
                .map(|(key, e)| (key.digest.clone(), e.source.clone()))
                .collect();
            // Already keyed by its own identity (which includes the fingerprint, so such an entry
            // is among the twins).
            if twins.iter().any(|(digest, _)| *digest == source.identity) {
                return Ok(source.identity.clone());
            }
            twins
        };
        if twins.is_empty() {
            return Ok(source.identity.clone());
        }
        let Some(mine) = self.digests.content(source)? else {
            // Rewritten since it was resolved: key it as found (a later request sees the new files).
            return Ok(source.identity.clone());
        };
        for (digest, theirs) in twins {
            compared.push(digest.clone());
            if self.digests.content(&theirs)? == Some(mine) {
                return Ok(digest);
            }
        }
        Ok(source.identity.clone())
    }

    /// The state lock, once no entry that could hold the same bytes as one of `keyed` has appeared
    /// since it was resolved (a concurrent request for a copy of the same component in another
    /// folder): such components are keyed again, so that both requests share one load.
    fn state_for(&self, keyed: &mut [Keyed<'_>]) -> Result<MutexGuard<'_, State>, StoreError> {
        for _ in 0..REKEY_ROUNDS {
            let st = self.state();
            let unexamined = |k: &Keyed<'_>| {
                !st.entries.contains_key(&k.key)
                    && st
                        .twins(k.key.kind, k.key.device, &k.source)
                        .any(|(key, _)| !k.compared.contains(&key.digest))
            };
            let stale: Vec<usize> = (0..keyed.len())
                .filter(|&i| unexamined(&keyed[i]))
                .collect();
            if stale.is_empty() {
                return Ok(st);
            }
            drop(st);
            for i in stale {
                let k = &mut keyed[i];
                k.key.digest = self.key_digest(&k.source, k.key.kind, &mut k.compared)?;
            }
        }
        // Entries keep appearing: go on; at worst one component is resident twice.
        Ok(self.state())
    }

    /// Fails fast when the components that still need loading cannot fit even after evicting every
    /// unheld component; evicts nothing.
    fn admit(&self, st: &State, keyed: &[Keyed<'_>]) -> Result<(), StoreError> {
        let Some(budget) = self.config.memory_budget else {
            return Ok(());
        };
        let wanted: HashSet<&ComponentKey> = keyed.iter().map(|k| &k.key).collect();
        let mut need = 0u64;
        let mut counted = HashSet::new();
        for k in keyed {
            if k.bytes > budget {
                return Err(StoreError::new(
                    Code::ResourceExhausted,
                    format!(
                        "memory budget: {:?} ({}) needs {} bytes, more than the whole budget of {budget} bytes",
                        k.spec.name, k.spec.class_name, k.bytes
                    ),
                ));
            }
            let charged = st.entries.get(&k.key).is_some_and(|e| e.charged > 0);
            if !charged && counted.insert(&k.key) {
                need += k.bytes;
            }
        }
        // What stays whatever happens: held, loading, or needed by this request.
        let kept: u64 = st
            .entries
            .iter()
            .filter(|(key, e)| e.held() || !e.slot.is_resident() || wanted.contains(key))
            .map(|(_, e)| e.charged)
            .sum();
        if kept + need > budget {
            return Err(StoreError::new(
                Code::ResourceExhausted,
                format!(
                    "memory budget: {need} more bytes needed but {kept} of {budget} bytes are held by leases, pins or loads in progress"
                ),
            ));
        }
        Ok(())
    }

    /// Makes room for `need` more bytes by evicting unheld components, least recently used first;
    /// evicts nothing when even that would not be enough.
    fn make_room(&self, st: &mut State, need: u64) -> Result<(), StoreError> {
        let Some(budget) = self.config.memory_budget else {
            return Ok(());
        };
        let charged = st.charged_bytes();
        if charged + need <= budget {
            return Ok(());
        }
        let mut victims: Vec<(ComponentKey, u64, u64)> = st
            .entries
            .iter()
            .filter(|(_, e)| !e.held() && e.slot.is_resident())
            .map(|(k, e)| (k.clone(), e.tick, e.charged))
            .collect();
        let evictable: u64 = victims.iter().map(|v| v.2).sum();
        if charged - evictable + need > budget {
            return Err(StoreError::new(
                Code::ResourceExhausted,
                format!(
                    "memory budget: {need} bytes needed, {charged} of {budget} charged and {} of it held by leases, pins or loads in progress",
                    charged - evictable
                ),
            ));
        }
        victims.sort_by_key(|v| v.1);
        let mut resident = charged;
        for (key, _, bytes) in victims {
            if resident + need <= budget {
                break;
            }
            if let Some(e) = st.entries.remove(&key) {
                tracing::info!(component = %key, class = %e.class_name, bytes, "evicting (least recently used)");
                self.observer.evicted(&e.class_name, bytes);
            }
            st.evictions += 1;
            resident -= bytes;
        }
        Ok(())
    }

    /// Loads `k` into its slot unless already there; concurrent callers for one slot wait for the
    /// first and then find it resident.
    fn load_into(&self, k: &Keyed<'_>, slot: &Slot) -> Result<(), StoreError> {
        let _loading = slot.loading.lock().unwrap_or_else(|p| p.into_inner());
        if slot.get().is_some() {
            return Ok(());
        }
        {
            let mut st = self.state();
            self.make_room(&mut st, k.bytes)?;
            if let Some(e) = st.entries.get_mut(&k.key) {
                e.charged = k.bytes;
            }
        }
        let spec = k.spec;
        let started = Instant::now();
        // On the loader thread: calls of other requests go on meanwhile (see `executor`).
        let (class, path, variant) = (k.class, spec.path.clone(), spec.variant.clone());
        let (kind, device) = (k.key.kind, k.key.device);
        let loaded = self
            .loader
            .run(move || class.load(&path, variant.as_deref(), kind, device))
            .and_then(|r| r);
        let took = started.elapsed();
        self.observer
            .loaded(&spec.class_name, k.bytes, took, loaded.is_ok());
        let component = match loaded {
            Ok(c) => c,
            Err(e) => {
                if let Some(entry) = self.state().entries.get_mut(&k.key) {
                    entry.charged = 0;
                }
                let msg = format!(
                    "components[{}]: {:?} ({}) failed to load: {}",
                    k.index, spec.name, spec.class_name, e.message
                );
                return Err(StoreError::new(e.code, msg));
            }
        };
        tracing::info!(component = %spec.name, class = %spec.class_name, key = %k.key, bytes = k.bytes, ms = took.as_millis() as u64, "loaded");
        *slot.resident.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(Resident {
            class_name: spec.class_name.clone(),
            component: Arc::from(component),
            bytes: k.bytes,
        }));
        let mut st = self.state();
        *st.load_counts.entry(k.key.clone()).or_default() += 1;
        st.loads += 1;
        Ok(())
    }

    /// Loads what is not resident of entries `holder` already holds. On failure the holder is taken
    /// off again and placeholders are dropped.
    fn hold_and_load(&self, keyed: &[Keyed<'_>], holder: Holder<'_>) -> Result<(), StoreError> {
        let slots: Vec<Arc<Slot>> = {
            let st = self.state();
            keyed
                .iter()
                .map(|k| st.entries.get(&k.key).map(|e| e.slot.clone()))
                .collect::<Option<_>>()
        }
        .ok_or_else(|| StoreError::new(Code::Internal, "held component vanished"))?;
        for (k, slot) in keyed.iter().zip(&slots) {
            if let Err(e) = self.load_into(k, slot) {
                let mut st = self.state();
                match holder {
                    Holder::Lease(id) => {
                        Self::end_lease(&mut st, id);
                    }
                    Holder::Pin(newly_pinned) => {
                        for key in newly_pinned {
                            if let Some(e) = st.entries.get_mut(key) {
                                e.pinned = false;
                            }
                        }
                    }
                }
                Self::drop_placeholders(&mut st);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Finds or creates the entry for `k` and marks it used.
    fn touch<'s>(st: &'s mut State, k: &Keyed<'_>) -> &'s mut Entry {
        let tick = st.next_tick();
        let e = st.entries.entry(k.key.clone()).or_insert_with(|| Entry {
            slot: Arc::new(Slot::default()),
            class_name: k.spec.class_name.clone(),
            source: k.source.clone(),
            paths: BTreeSet::new(),
            leases: 0,
            pinned: false,
            stale: false,
            charged: 0,
            tick,
            last_used_ms: now_ms(),
        });
        e.tick = tick;
        e.last_used_ms = now_ms();
        e.paths.insert(k.spec.path.display().to_string());
        e
    }

    fn acquire_inner(&self, request: &AcquireRequest) -> Result<Lease, StoreError> {
        self.reap_expired();
        let kind = request.kind.unwrap_or(self.config.default_kind);
        let mut keyed = self.resolve(&request.components, kind)?;
        // Take the lease first, so nothing this request needs is evicted while its siblings load.
        let lease_id = uuid::Uuid::new_v4().to_string();
        {
            let mut st = self.state_for(&mut keyed)?;
            self.admit(&st, &keyed)?;
            let mut handles = Vec::with_capacity(keyed.len());
            for k in &keyed {
                Self::touch(&mut st, k).leases += 1;
                let handle = Handle {
                    name: k.spec.name.clone(),
                    id: uuid::Uuid::new_v4().to_string(),
                    class_name: k.spec.class_name.clone(),
                };
                handles.push((handle, k.key.clone()));
            }
            let lease = LeaseState {
                handles,
                expires: Instant::now() + self.config.lease_ttl,
                loading: true,
                calls: CallHistory::default(),
            };
            st.leases.insert(lease_id.clone(), lease);
        }
        self.hold_and_load(&keyed, Holder::Lease(&lease_id))?;
        let mut st = self.state();
        let lease = st
            .leases
            .get_mut(&lease_id)
            .ok_or_else(|| StoreError::new(Code::Internal, "lease vanished while loading"))?;
        lease.loading = false;
        lease.expires = Instant::now() + self.config.lease_ttl;
        Ok(Lease {
            id: lease_id,
            handles: lease.handles.iter().map(|(h, _)| h.clone()).collect(),
            ttl: self.config.lease_ttl,
        })
    }

    /// Loads components if not resident and pins them: a pinned component is never evicted and
    /// counts toward the budget until [`Store::unload`].
    pub fn load(
        &self,
        components: &[ComponentSpec],
        kind: Option<Kind>,
    ) -> Result<Vec<Pinned>, StoreError> {
        self.reap_expired();
        let kind = kind.unwrap_or(self.config.default_kind);
        let mut keyed = self.resolve(components, kind)?;
        let mut newly_pinned = Vec::new();
        let mut was_resident = Vec::with_capacity(keyed.len());
        {
            let mut st = self.state_for(&mut keyed)?;
            self.admit(&st, &keyed)?;
            for k in &keyed {
                let e = Self::touch(&mut st, k);
                was_resident.push(e.slot.is_resident());
                e.stale = false;
                if !e.pinned {
                    e.pinned = true;
                    newly_pinned.push(k.key.clone());
                }
            }
        }
        self.hold_and_load(&keyed, Holder::Pin(&newly_pinned))?;
        let st = self.state();
        Ok(keyed
            .iter()
            .zip(was_resident)
            .map(|(k, was)| Pinned {
                name: k.spec.name.clone(),
                key: k.key.to_string(),
                bytes: k.bytes,
                changed: !was,
                active_leases: st.entries.get(&k.key).map(|e| e.leases).unwrap_or(0),
            })
            .collect())
    }

    /// Unpins components (named by spec or by `Stats` key) and frees those no lease holds; a leased
    /// one is marked stale and freed when its last lease ends. NOT_FOUND for one not resident.
    pub fn unload(
        &self,
        components: &[ComponentSpec],
        kind: Option<Kind>,
        keys: &[String],
    ) -> Result<Vec<Pinned>, StoreError> {
        self.reap_expired();
        let kind = kind.unwrap_or(self.config.default_kind);
        let keyed = if components.is_empty() {
            Vec::new()
        } else {
            self.resolve(components, kind)?
        };
        if keyed.is_empty() && keys.is_empty() {
            return Err(StoreError::new(
                Code::InvalidArgument,
                "components: name at least one component or key",
            ));
        }
        let mut st = self.state();
        let mut targets: Vec<(String, ComponentKey)> = Vec::new();
        for k in &keyed {
            if !st.entries.get(&k.key).is_some_and(|e| e.slot.is_resident()) {
                return Err(StoreError::new(
                    Code::NotFound,
                    format!(
                        "components[{}]: {:?} ({}) is not resident",
                        k.index, k.spec.name, k.key
                    ),
                ));
            }
            targets.push((k.spec.name.clone(), k.key.clone()));
        }
        for (i, wanted) in keys.iter().enumerate() {
            let key = st
                .entries
                .iter()
                .find(|(key, e)| key.to_string() == *wanted && e.slot.is_resident())
                .map(|(key, _)| key.clone())
                .ok_or_else(|| {
                    StoreError::new(
                        Code::NotFound,
                        format!("keys[{i}]: {wanted:?} is not resident"),
                    )
                })?;
            targets.push((String::new(), key));
        }
        let mut out = Vec::with_capacity(targets.len());
        for (name, key) in targets {
            let Some(e) = st.entries.get_mut(&key) else {
                continue;
            };
            e.pinned = false;
            let (bytes, leases) = (e.charged, e.leases);
            let freed = leases == 0;
            if freed {
                st.entries.remove(&key);
                tracing::info!(component = %key, "unloaded");
            } else {
                e.stale = true;
                tracing::info!(component = %key, leases, "unloaded while leased: freed on its last release");
            }
            out.push(Pinned {
                name,
                key: key.to_string(),
                bytes,
                changed: freed,
                active_leases: leases,
            });
        }
        Ok(out)
    }

    /// The leased component behind `handle_id`, with its key.
    fn resolve_handle(
        &self,
        lease_id: &str,
        handle_id: &str,
    ) -> Result<(Arc<Resident>, ComponentKey), StoreError> {
        let mut st = self.state();
        let now = Instant::now();
        let ttl = self.config.lease_ttl;
        match st.leases.get(lease_id) {
            Some(l) if !l.loading && l.expires <= now => {
                drop(st);
                self.reap_expired();
                return Err(self.state().lease_gone(lease_id));
            }
            Some(_) => {}
            None => return Err(st.lease_gone(lease_id)),
        }
        if handle_id.is_empty() {
            return Err(StoreError::new(
                Code::InvalidArgument,
                "handle_id: is required",
            ));
        }
        let tick = st.next_tick();
        let lease = st
            .leases
            .get_mut(lease_id)
            .ok_or_else(|| StoreError::new(Code::Internal, "lease vanished"))?;
        // Using a lease keeps it alive, like a renewal.
        lease.expires = now + ttl;
        let key = lease
            .handles
            .iter()
            .find(|(h, _)| h.id == handle_id)
            .map(|(_, k)| k.clone())
            .ok_or_else(|| {
                StoreError::new(
                    Code::InvalidArgument,
                    format!("handle_id: {handle_id:?} does not belong to lease {lease_id}"),
                )
            })?;
        let entry = st
            .entries
            .get_mut(&key)
            .ok_or_else(|| StoreError::new(Code::Internal, "leased component missing"))?;
        entry.tick = tick;
        entry.last_used_ms = now_ms();
        let resident = entry
            .slot
            .get()
            .ok_or_else(|| StoreError::new(Code::Internal, "leased component is not loaded"))?;
        Ok((resident, key))
    }

    /// Records a call of `lease_id` on the component `key` (`signature`: if it can be joined) and
    /// returns how many requests can be expected to make the same call: itself and every other
    /// lease on the component whose request [`LeaseState::expects`] to make it.
    fn record_call(
        &self,
        lease_id: &str,
        key: &ComponentKey,
        signature: Option<&Signature>,
    ) -> usize {
        let mut st = self.state();
        let others = signature.map_or(0, |signature| {
            st.leases
                .iter()
                .filter(|(id, l)| {
                    id.as_str() != lease_id
                        && l.handles.iter().any(|(_, k)| k == key)
                        && l.expects(signature)
                })
                .count()
        });
        if let Some(lease) = st.leases.get_mut(lease_id) {
            lease.called(signature);
        }
        1 + others
    }

    /// Runs a call on the compute thread: joined with other requests' calls of the same signature
    /// when the component allows it (see `batch`), alone otherwise.
    fn run_call(
        &self,
        (lease_id, key): (&str, &ComponentKey),
        resident: &Arc<Resident>,
        method: &str,
        inputs: Tensors,
        span: tracing::Span,
    ) -> Result<Tensors, StoreError> {
        let component = resident.component.clone();
        let joinable = self.batcher.enabled() && component.batched(method);
        let signature = joinable
            .then(|| Signature::of(Arc::as_ptr(resident) as usize, method, &inputs))
            .flatten();
        // Every call of a request, joinable or not, says where it is (see `LeaseState::expects`).
        let partners = if self.batcher.enabled() {
            self.record_call(lease_id, key, signature.as_ref().map(|(s, _)| s))
        } else {
            1
        };
        let method = method.to_string();
        let Some((signature, rows)) = signature else {
            return self
                .compute
                .run(move || span.in_scope(|| component.invoke(&method, &inputs)))
                .and_then(|r| r);
        };
        let reply = self
            .batcher
            .enqueue(signature.clone(), inputs, rows, partners);
        let batcher = self.batcher.clone();
        let backlog = self.compute.backlog();
        // The call's own job; an earlier job of the same signature may have answered it already.
        self.compute.submit(move || {
            span.in_scope(|| batcher.run(&signature, &|i| component.invoke(&method, i), &backlog))
        })?;
        reply.recv().map_err(|_| {
            StoreError::new(
                Code::Internal,
                "a component call panicked on the autopipe-compute thread",
            )
        })?
    }
}

impl ComponentStore for Store {
    fn acquire(&self, request: &AcquireRequest) -> Result<Lease, StoreError> {
        self.acquire_inner(request)
    }

    fn renew(&self, lease_id: &str) -> Result<Duration, StoreError> {
        self.reap_expired();
        let mut st = self.state();
        match st.leases.get_mut(lease_id) {
            Some(lease) => {
                lease.expires = Instant::now() + self.config.lease_ttl;
                Ok(self.config.lease_ttl)
            }
            None => Err(st.lease_gone(lease_id)),
        }
    }

    fn release(&self, lease_id: &str) -> Result<(), StoreError> {
        let mut st = self.state();
        if Self::end_lease(&mut st, lease_id) {
            Ok(())
        } else {
            Err(st.lease_gone(lease_id))
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
        let (resident, key) = self.resolve_handle(lease_id, handle_id)?;
        let span = tracing::debug_span!("invoke", class = %resident.class_name, method, request_id);
        let started = Instant::now();
        let result = self.run_call((lease_id, &key), &resident, method, inputs, span);
        self.observer.invoked(
            &resident.class_name,
            method,
            started.elapsed(),
            result.as_ref().err().map(|e| e.code),
        );
        result
    }
}

/// Parameter bytes of the weight files once converted to `kind` (from the safetensors headers).
pub(crate) fn estimate_bytes(files: &[PathBuf], kind: Kind) -> Result<u64, StoreError> {
    let mut total = 0u64;
    for f in files {
        let file = std::fs::File::open(f)
            .map_err(|e| StoreError::new(Code::NotFound, format!("{}: {e}", f.display())))?;
        // SAFETY: read-only map of a weight file; the store does not modify weight files.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| StoreError::new(Code::Internal, format!("{}: {e}", f.display())))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
            StoreError::new(Code::FailedPrecondition, format!("{}: {e}", f.display()))
        })?;
        for info in meta.tensors().values() {
            let numel: usize = info.shape.iter().product();
            let elt = match info.dtype {
                safetensors::Dtype::F16
                | safetensors::Dtype::BF16
                | safetensors::Dtype::F32
                | safetensors::Dtype::F64 => kind.elt_size_in_bytes(),
                other => other.bitsize().div_ceil(8),
            };
            total += (numel * elt) as u64;
        }
    }
    Ok(total)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
