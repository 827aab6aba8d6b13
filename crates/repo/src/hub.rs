//! Hub model references: fetch the files one pipeline needs from a Hugging Face hub repo into the
//! HF cache (`models--org--name/snapshots/<commit>/…`) through `hf-hub`, choosing them the way
//! diffusers' `DiffusionPipeline.download` (`pipelines/pipeline_utils.py`) and
//! `variant_compatible_siblings` / `_get_ignore_patterns` (`pipelines/pipeline_loading_utils.py`)
//! do: a folder holding weights gets its `config.json` plus the safetensors of the asked variant,
//! any other folder (scheduler, tokenizer) everything in it. The environment is read as
//! huggingface_hub's `constants.py` reads it.

use crate::{Error, ModelIndex, Result};
use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
const MODEL_INDEX: &str = "model_index.json";
/// Extensions of weight files (diffusers' `filter_model_files`, plus other pickle/framework formats).
const WEIGHT_EXTENSIONS: &[&str] = &[
    "safetensors",
    "bin",
    "ckpt",
    "pt",
    "pth",
    "msgpack",
    "onnx",
    "onnx_data",
    "pb",
    "h5",
    "gguf",
];

/// Where the hub is and how to talk to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// Hub base URL without a trailing slash (`HF_ENDPOINT`, default `https://huggingface.co`).
    pub endpoint: String,
    /// The hub cache folder that holds `models--org--name/` (`HF_HUB_CACHE`, else `$HF_HOME/hub`).
    pub cache_dir: PathBuf,
    /// Bearer token (`HF_TOKEN`, else the `$HF_HOME/token` file that `huggingface-cli login` writes).
    pub token: Option<String>,
    /// Use only the local cache, never the network (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

impl HubOptions {
    /// Reads `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_CACHE`, `HF_TOKEN` and `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let var = |name: &str| {
            var(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = var("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
                PathBuf::from(var("HOME").unwrap_or_else(|| ".".into())).join(".cache")
            });
            cache.join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join("hub"));
        let endpoint = var("HF_ENDPOINT")
            .unwrap_or_else(|| DEFAULT_ENDPOINT.into())
            .trim_end_matches('/')
            .to_string();
        let token_path = var("HF_TOKEN_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join("token"));
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                std::fs::read_to_string(token_path)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
            });
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE")
        });
        Self {
            endpoint,
            cache_dir,
            token,
            offline,
        }
    }
}

/// Fetches `model_index.json` of a hub repo and returns the local snapshot folder that holds it.
pub fn fetch_model_index(opts: &HubOptions, repo_id: &str, revision: &str) -> Result<PathBuf> {
    fetch_components(opts, repo_id, revision, &[], None)
}

/// Fetches `model_index.json` and the files of `components` (configs, tokenizer files, safetensors
/// of `variant` where a component has them, else the regular ones) and returns the snapshot
/// folder, a diffusers checkpoint folder for [`crate::Checkpoint::open`]. Files already cached are
/// not downloaded again.
pub fn fetch_components(
    opts: &HubOptions,
    repo_id: &str,
    revision: &str,
    components: &[&str],
    variant: Option<&str>,
) -> Result<PathBuf> {
    let revision = match revision.trim() {
        "" => "main",
        r => r,
    };
    let repo_id = repo_id.trim();
    if !is_safe_path(repo_id) || repo_id.matches('/').count() > 1 || !is_safe_path(revision) {
        return Err(Error::InvalidReference(format!("{repo_id}@{revision}")));
    }
    if let Some(bad) = components
        .iter()
        .find(|c| !is_safe_path(c) || c.contains('/'))
    {
        return Err(Error::NotFound(format!("{bad:?} is not a component name")));
    }
    let variant = variant.map(str::trim).filter(|v| !v.is_empty());
    let hub = HubRepo::new(opts, repo_id, revision);
    let lock = repo_lock(&hub.dir);
    let _guard = lock.lock().unwrap_or_else(PoisonError::into_inner);
    if opts.offline {
        return hub.cached(components, variant).map_err(|e| match e {
            Error::NotFound(msg) => Error::NotFound(format!(
                "{msg} (HF_HUB_OFFLINE is set: only the local cache was searched)"
            )),
            e => e,
        });
    }
    let remote = match hub.remote_listing() {
        Ok(remote) => remote,
        // As huggingface_hub does: when the hub cannot be reached, a fully cached snapshot still serves.
        Err(Error::Unavailable(reason)) => {
            return match hub.cached(components, variant) {
                Ok(snapshot) => {
                    tracing::warn!(repo = repo_id, %reason, "hub unreachable; using the cached snapshot");
                    Ok(snapshot)
                }
                Err(cache_err) => Err(Error::Unavailable(format!(
                    "{reason}; and the local cache cannot serve it: {cache_err}"
                ))),
            };
        }
        Err(e) => return Err(e),
    };
    hub.download(&remote, components, variant)
}

/// The repo's file listing at one commit: path → the etag its blob is stored under, when known.
struct Remote {
    commit: String,
    files: BTreeMap<String, Option<String>>,
}

/// The hub's model info (`GET /api/models/{repo_id}/revision/{revision}?blobs=true`).
#[derive(Deserialize)]
struct ModelInfo {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: String,
}

/// One repo at one revision, with its folder in the cache.
struct HubRepo<'a> {
    opts: &'a HubOptions,
    repo_id: &'a str,
    revision: &'a str,
    /// `cache_dir/models--org--name`.
    dir: PathBuf,
}

impl<'a> HubRepo<'a> {
    fn new(opts: &'a HubOptions, repo_id: &'a str, revision: &'a str) -> Self {
        let dir = opts
            .cache_dir
            .join(Repo::model(repo_id.to_string()).folder_name());
        Self {
            opts,
            repo_id,
            revision,
            dir,
        }
    }

    fn whence(&self) -> String {
        format!("hub repo {} at revision {}", self.repo_id, self.revision)
    }

    fn snapshot(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    fn api(&self) -> Result<Api> {
        ApiBuilder::from_cache(Cache::new(self.opts.cache_dir.clone()))
            .with_endpoint(self.opts.endpoint.trim_end_matches('/').to_string())
            .with_token(self.opts.token.clone())
            .with_progress(false)
            .with_user_agent("autopipe", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|e| Error::Unavailable(format!("cannot set up the hub client: {e}")))
    }

    /// Asks the hub which commit the revision is at and which files that commit holds.
    fn remote_listing(&self) -> Result<Remote> {
        let repo = Repo::with_revision(
            self.repo_id.to_string(),
            RepoType::Model,
            self.revision.to_string(),
        );
        let response = self
            .api()?
            .repo(repo)
            .info_request()
            .query("blobs", "true")
            .call();
        let text = response
            .map_err(|e| self.request_error(e, None))?
            .into_string()
            .map_err(|e| {
                Error::Unavailable(format!(
                    "reading the hub's model info for {}: {e}",
                    self.whence()
                ))
            })?;
        let malformed = |reason: String| {
            Error::Unavailable(format!(
                "the hub's model info for {} is malformed: {reason}",
                self.whence()
            ))
        };
        let info: ModelInfo = serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))?;
        let commit = info
            .sha
            .filter(|s| is_hex_name(s))
            .ok_or_else(|| malformed("no commit \"sha\"".into()))?;
        let files = info
            .siblings
            .into_iter()
            .filter(|s| is_safe_path(&s.rfilename))
            .map(|s| {
                let etag = s
                    .lfs
                    .map(|l| l.sha256)
                    .or(s.blob_id)
                    .filter(|e| is_hex_name(e));
                (s.rfilename, etag)
            })
            .collect();
        Ok(Remote { commit, files })
    }

    /// Downloads what is not cached yet of `model_index.json` and the components' files.
    fn download(
        &self,
        remote: &Remote,
        components: &[&str],
        variant: Option<&str>,
    ) -> Result<PathBuf> {
        let api = self.api()?;
        let pinned = api.repo(Repo::with_revision(
            self.repo_id.to_string(),
            RepoType::Model,
            remote.commit.clone(),
        ));
        let snapshot = self.snapshot(&remote.commit);
        let ensure = |file: &str| -> Result<()> {
            let dst = snapshot.join(file);
            if dst.is_file() {
                tracing::debug!(repo = self.repo_id, file, "cached");
                return Ok(());
            }
            if dst.symlink_metadata().is_ok() {
                // A link whose blob was deleted: hf-hub would refuse to replace it.
                std::fs::remove_file(&dst).map_err(|source| Error::Io {
                    path: dst.clone(),
                    source,
                })?;
            }
            if let Some(etag) = remote.files.get(file).cloned().flatten() {
                let blob = self.dir.join("blobs").join(&etag);
                if blob.is_file() {
                    tracing::debug!(
                        repo = self.repo_id,
                        file,
                        "linking the cached blob of another commit"
                    );
                    return link_blob(&etag, file, &dst);
                }
            }
            tracing::info!(repo = self.repo_id, commit = %remote.commit, file, "downloading from the hub");
            let got = pinned.download(file).map_err(|e| self.api_error(e, file))?;
            if got != dst {
                return Err(Error::Unavailable(format!(
                    "the hub served {file} of {} as {}, expected {}",
                    self.whence(),
                    got.display(),
                    dst.display()
                )));
            }
            Ok(())
        };
        if !remote.files.contains_key(MODEL_INDEX) {
            return Err(Error::NotFound(format!(
                "{} is not a diffusers repo: it has no {MODEL_INDEX}",
                self.whence()
            )));
        }
        ensure(MODEL_INDEX)?;
        if remote.commit != self.revision {
            let cache_repo = Cache::new(self.opts.cache_dir.clone()).repo(Repo::with_revision(
                self.repo_id.to_string(),
                RepoType::Model,
                self.revision.to_string(),
            ));
            cache_repo
                .create_ref(&remote.commit)
                .map_err(|source| Error::Io {
                    path: self.dir.join("refs").join(self.revision),
                    source,
                })?;
        }
        let index = read_index(&snapshot)?;
        let listing: BTreeSet<String> = remote.files.keys().cloned().collect();
        let files = select_files(&listing, &index, components, variant, &self.whence())?;
        for file in &files {
            ensure(file)?;
        }
        verify_shards(&snapshot, &files, &self.whence())?;
        Ok(snapshot)
    }

    /// The snapshot of the revision as far as it is cached, if it holds every needed file.
    fn cached(&self, components: &[&str], variant: Option<&str>) -> Result<PathBuf> {
        let whence = format!(
            "{} in the local cache {}",
            self.whence(),
            self.opts.cache_dir.display()
        );
        let not_cached = || Error::NotFound(format!("{whence}: not downloaded"));
        let by_commit = is_hex_name(self.revision) && self.snapshot(self.revision).is_dir();
        let commit = if by_commit {
            self.revision.to_string()
        } else {
            let ref_path = self.dir.join("refs").join(self.revision);
            let commit = std::fs::read_to_string(&ref_path)
                .map_err(|_| not_cached())?
                .trim()
                .to_string();
            if !is_hex_name(&commit) {
                return Err(Error::Malformed {
                    path: ref_path,
                    reason: "not a commit hash".into(),
                });
            }
            commit
        };
        let snapshot = self.snapshot(&commit);
        if !snapshot.join(MODEL_INDEX).is_file() {
            return Err(not_cached());
        }
        let index = read_index(&snapshot)?;
        let mut listing = BTreeSet::new();
        list_files(&snapshot, "", &mut listing)?;
        let files = select_files(&listing, &index, components, variant, &whence)?;
        verify_shards(&snapshot, &files, &whence)?;
        Ok(snapshot)
    }

    fn request_error(&self, err: ureq::Error, file: Option<&str>) -> Error {
        match err {
            ureq::Error::Status(code, response) => self.status_error(code, &response, file),
            ureq::Error::Transport(t) => Error::Unavailable(format!(
                "cannot reach the hub at {}: {t}",
                self.opts.endpoint
            )),
        }
    }

    /// Maps an HTTP error the way huggingface_hub's `hf_raise_for_status` reads `X-Error-Code`.
    fn status_error(&self, code: u16, response: &ureq::Response, file: Option<&str>) -> Error {
        let (repo, rev) = (self.repo_id, self.revision);
        match (code, response.header("x-error-code").unwrap_or_default()) {
            (_, "RepoNotFound") => Error::NotFound(format!(
                "hub repo {repo} not found (a private repo reads as missing without a token that grants access)"
            )),
            (_, "RevisionNotFound") => Error::NotFound(format!("revision {rev:?} of hub repo {repo} not found")),
            (_, "GatedRepo") => Error::Unauthorized(format!(
                "hub repo {repo} is gated: accept its conditions on the hub, then set HF_TOKEN"
            )),
            (404, _) | (_, "EntryNotFound") => match file {
                Some(file) => Error::NotFound(format!("{file} not found in {}", self.whence())),
                None => Error::NotFound(format!("{} not found", self.whence())),
            },
            (401 | 403, _) => Error::Unauthorized(match self.opts.token {
                None => format!("the hub denied access to {repo} (HTTP {code}): set HF_TOKEN to a token with read access"),
                Some(_) => format!("the hub denied access to {repo} (HTTP {code}): the token in HF_TOKEN was rejected or lacks access"),
            }),
            _ => Error::Unavailable(format!("the hub answered HTTP {code} for {} of {}", file.unwrap_or("the model info"), self.whence())),
        }
    }

    fn api_error(&self, err: ApiError, file: &str) -> Error {
        match err {
            ApiError::RequestError(err) => self.request_error(*err, Some(file)),
            ApiError::IoError(source) => Error::Io {
                path: self.dir.clone(),
                source,
            },
            ApiError::LockAcquisition(path) => Error::Unavailable(format!(
                "{} is being downloaded by another process; retry later",
                path.display()
            )),
            err => Error::Unavailable(format!("downloading {file} of {}: {err}", self.whence())),
        }
    }
}

/// Serializes fetches of one repo within this process, so concurrent requests share a download
/// instead of failing on hf-hub's blob lock.
fn repo_lock(dir: &Path) -> Arc<Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>> = OnceLock::new();
    let mut locks = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    locks.entry(dir.to_path_buf()).or_default().clone()
}

fn read_index(snapshot: &Path) -> Result<ModelIndex> {
    let path = snapshot.join(MODEL_INDEX);
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    ModelIndex::parse(&text, &path)
}

/// Links `snapshots/<commit>/<file>` to `blobs/<etag>` the way the hub cache does (relative link).
fn link_blob(etag: &str, file: &str, dst: &Path) -> Result<()> {
    let io = |source| Error::Io {
        path: dst.to_path_buf(),
        source,
    };
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    // snapshots/<commit>/<a>/<b> → ../../../blobs/<etag>: one `..` per path part, plus the commit folder.
    let target = format!("{}blobs/{etag}", "../".repeat(file.split('/').count() + 1));
    #[cfg(unix)]
    std::os::unix::fs::symlink(target, dst).map_err(io)?;
    #[cfg(not(unix))]
    std::fs::copy(dst.parent().unwrap_or(dst).join(target), dst)
        .map(drop)
        .map_err(io)?;
    Ok(())
}

/// Every file under `dir` (links followed), as `/`-joined paths relative to the snapshot.
fn list_files(dir: &Path, prefix: &str, out: &mut BTreeSet<String>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let path = entry.path();
        let rel = format!("{prefix}{name}");
        if path.is_dir() {
            list_files(&path, &format!("{rel}/"), out)?;
        } else if path.is_file() {
            out.insert(rel);
        }
    }
    Ok(())
}

/// The files of every component to fetch, as repo paths; `whence` names the repo in errors.
fn select_files(
    listing: &BTreeSet<String>,
    index: &ModelIndex,
    components: &[&str],
    variant: Option<&str>,
    whence: &str,
) -> Result<Vec<String>> {
    let mut files = Vec::new();
    let (mut any_weights, mut any_variant) = (false, false);
    for &component in components {
        if index.component_class(component).is_none() {
            return Err(Error::NotFound(format!(
                "component {component:?} is not in the {MODEL_INDEX} of {whence}"
            )));
        }
        let selection = component_files(listing, component, variant)
            .map_err(|reason| Error::NotFound(format!("{whence}: {reason}")))?;
        any_weights |= selection.has_weights;
        any_variant |= selection.is_variant;
        files.extend(selection.files);
    }
    // diffusers' `variant_compatible_siblings`: a variant no component has is an error, not a fallback.
    if let (Some(variant), true, false) = (variant, any_weights, any_variant) {
        return Err(Error::NotFound(format!(
            "{whence}: no component of {components:?} has {variant:?} variant weights; leave the variant unset to load the regular ones"
        )));
    }
    Ok(files)
}

/// What one component folder contributes.
#[derive(Debug)]
struct Selection {
    files: Vec<String>,
    /// The folder holds weights (a model, not a scheduler or tokenizer).
    has_weights: bool,
    /// The chosen weights are the asked variant's.
    is_variant: bool,
}

/// diffusers' rule for one folder: weights folder → `config.json` + the variant's safetensors
/// (falling back to the regular ones when the folder has no such variant), never pickle files;
/// any other folder → every file in it.
fn component_files(
    listing: &BTreeSet<String>,
    component: &str,
    variant: Option<&str>,
) -> std::result::Result<Selection, String> {
    let prefix = format!("{component}/");
    let names: Vec<&str> = listing
        .iter()
        .filter_map(|f| f.strip_prefix(&prefix))
        .collect();
    if names.is_empty() {
        return Err(format!("component folder {component}/ is missing"));
    }
    let weights: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !n.contains('/') && is_weight_file(n))
        .collect();
    if weights.is_empty() {
        let files = names.iter().map(|n| format!("{prefix}{n}")).collect();
        return Ok(Selection {
            files,
            has_weights: false,
            is_variant: false,
        });
    }
    if !names.contains(&"config.json") {
        return Err(format!("{component}/config.json is missing"));
    }
    let (mut regular, mut wanted, mut other_variants) = (Vec::new(), Vec::new(), BTreeSet::new());
    for &name in &weights {
        match safetensors_kind(name) {
            Some(WeightKind::Regular) => regular.push(name),
            Some(WeightKind::Variant(v)) if Some(v) == variant => wanted.push(name),
            Some(WeightKind::Variant(v)) => {
                other_variants.insert(v);
            }
            None => {}
        }
    }
    let is_variant = !wanted.is_empty();
    let chosen = if is_variant { wanted } else { regular };
    if !chosen.iter().any(|n| n.ends_with(".safetensors")) {
        return Err(if !other_variants.is_empty() {
            let have = other_variants.into_iter().collect::<Vec<_>>().join(", ");
            match variant {
                Some(v) => format!("{component} has no {v:?} or regular safetensors weights, only the variant(s) {have}"),
                None => format!("{component} has no regular safetensors weights, only the variant(s) {have}: ask for a variant"),
            }
        } else if weights.iter().any(|n| {
            n.ends_with(".bin") || n.ends_with(".ckpt") || n.ends_with(".pt") || n.ends_with(".pth")
        }) {
            format!(
                "{component} has only pickle weights ({}); autopipe loads .safetensors only",
                weights.join(", ")
            )
        } else {
            format!(
                "{component} has no .safetensors weights ({})",
                weights.join(", ")
            )
        });
    }
    let files = std::iter::once("config.json")
        .chain(chosen)
        .map(|n| format!("{prefix}{n}"))
        .collect();
    Ok(Selection {
        files,
        has_weights: true,
        is_variant,
    })
}

/// Which weights a safetensors file or safetensors index belongs to.
#[derive(Debug, PartialEq, Eq)]
enum WeightKind<'a> {
    /// `model.safetensors`, `model-00001-of-00002.safetensors`, `model.safetensors.index.json`.
    Regular,
    /// `model.fp16.safetensors`, `model.fp16-00001-of-00002.safetensors`,
    /// `model.safetensors.index.fp16.json`, and the legacy `model-00001-of-00002.fp16.safetensors`
    /// and `model.safetensors.fp16.index.json`.
    Variant(&'a str),
}

fn safetensors_kind(name: &str) -> Option<WeightKind<'_>> {
    if let Some(stem) = name.strip_suffix(".safetensors") {
        return Some(match stem.split_once('.') {
            None => WeightKind::Regular,
            Some((_, tag)) => WeightKind::Variant(strip_shard_suffix(tag)),
        });
    }
    let (_, rest) = name.split_once(".safetensors.")?;
    match rest.strip_suffix(".json")? {
        "index" => Some(WeightKind::Regular),
        rest => rest
            .strip_prefix("index.")
            .or_else(|| rest.strip_suffix(".index"))
            .map(WeightKind::Variant),
    }
}

/// `fp16-00001-of-00002` → `fp16`.
fn strip_shard_suffix(tag: &str) -> &str {
    const LEN: usize = "-00001-of-00002".len();
    let Some(split) = tag.len().checked_sub(LEN) else {
        return tag;
    };
    let Some(suffix) = tag.get(split..) else {
        return tag;
    };
    let b = suffix.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if b[0] == b'-' && digits(1..6) && &suffix[6..10] == "-of-" && digits(10..15) {
        &tag[..split]
    } else {
        tag
    }
}

fn is_weight_file(name: &str) -> bool {
    let is_index =
        name.ends_with(".json") && (name.contains(".safetensors.") || name.contains(".bin."));
    is_index
        || name
            .rsplit_once('.')
            .is_some_and(|(_, ext)| WEIGHT_EXTENSIONS.contains(&ext))
}

/// Every shard a selected safetensors index names must be in the snapshot.
fn verify_shards(snapshot: &Path, files: &[String], whence: &str) -> Result<()> {
    #[derive(Deserialize)]
    struct ShardIndex {
        weight_map: BTreeMap<String, String>,
    }
    for file in files
        .iter()
        .filter(|f| f.ends_with(".json") && f.contains(".safetensors."))
    {
        let path = snapshot.join(file);
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let index: ShardIndex = autopipe_json::from_str(&text).map_err(|e| Error::Malformed {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let folder = file.rsplit_once('/').map_or("", |(dir, _)| dir);
        for shard in index.weight_map.values().collect::<BTreeSet<_>>() {
            if !is_safe_path(shard) || shard.contains('/') {
                return Err(Error::Malformed {
                    path,
                    reason: format!("shard name {shard:?}"),
                });
            }
            if !snapshot.join(folder).join(shard).is_file() {
                return Err(Error::NotFound(format!(
                    "{whence}: shard {folder}/{shard} named by {file} is missing"
                )));
            }
        }
    }
    Ok(())
}

/// A relative `/`-separated path with no empty, `.` or `..` parts (safe to join under a folder).
fn is_safe_path(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\\')
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// A commit hash or blob etag: what may name a cache folder or blob file.
fn is_hex_name(s: &str) -> bool {
    (7..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(files: &[&str]) -> BTreeSet<String> {
        files.iter().map(|f| f.to_string()).collect()
    }

    fn pick(
        files: &[&str],
        component: &str,
        variant: Option<&str>,
    ) -> std::result::Result<Vec<String>, String> {
        component_files(&listing(files), component, variant).map(|s| s.files)
    }

    #[test]
    fn classifies_weight_names() {
        use WeightKind::*;
        for (name, kind) in [
            ("diffusion_pytorch_model.safetensors", Some(Regular)),
            ("model-00001-of-00002.safetensors", Some(Regular)),
            ("model.safetensors.index.json", Some(Regular)),
            (
                "diffusion_pytorch_model.fp16.safetensors",
                Some(Variant("fp16")),
            ),
            (
                "model.fp16-00001-of-00002.safetensors",
                Some(Variant("fp16")),
            ),
            (
                "model-00001-of-00002.fp16.safetensors",
                Some(Variant("fp16")),
            ),
            ("model.safetensors.index.fp16.json", Some(Variant("fp16"))),
            ("model.safetensors.fp16.index.json", Some(Variant("fp16"))),
            ("diffusion_pytorch_model.bin", None),
            ("pytorch_model.bin.index.json", None),
            ("config.json", None),
        ] {
            assert_eq!(safetensors_kind(name), kind, "{name}");
        }
        assert!(is_weight_file("pytorch_model.bin.index.json") && is_weight_file("model.onnx"));
        assert!(!is_weight_file("vocab.json") && !is_weight_file("spiece.model"));
    }

    #[test]
    fn picks_variant_then_regular_never_pickle() {
        let files = [
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.fp16.bin",
            "te/config.json",
            "te/model.safetensors",
            "te/pytorch_model.bin",
        ];
        assert_eq!(
            pick(&files, "unet", None).unwrap(),
            [
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors"
            ]
        );
        assert_eq!(
            pick(&files, "unet", Some("fp16")).unwrap(),
            [
                "unet/config.json",
                "unet/diffusion_pytorch_model.fp16.safetensors"
            ]
        );
        assert_eq!(
            pick(&files, "te", Some("fp16")).unwrap(),
            ["te/config.json", "te/model.safetensors"]
        );
        let err = pick(&["x/config.json", "x/pytorch_model.bin"], "x", None).unwrap_err();
        assert!(err.contains("pickle"), "{err}");
        let err = pick(&["x/config.json", "x/model.fp16.safetensors"], "x", None).unwrap_err();
        assert!(err.contains("fp16") && err.contains("variant"), "{err}");
        let err = pick(&["x/model.safetensors"], "x", None).unwrap_err();
        assert!(err.contains("config.json"), "{err}");
        assert!(pick(&files, "vae", None).unwrap_err().contains("missing"));
    }

    #[test]
    fn sharded_weights_come_with_their_index() {
        let files = [
            "t/config.json",
            "t/model.safetensors.index.json",
            "t/model-00001-of-00002.safetensors",
            "t/model-00002-of-00002.safetensors",
            "t/model.safetensors.index.fp16.json",
            "t/model.fp16-00001-of-00002.safetensors",
            "t/model.fp16-00002-of-00002.safetensors",
            "t/pytorch_model.bin.index.json",
            "t/pytorch_model-00001-of-00002.bin",
        ];
        assert_eq!(
            pick(&files, "t", None).unwrap(),
            [
                "t/config.json",
                "t/model-00001-of-00002.safetensors",
                "t/model-00002-of-00002.safetensors",
                "t/model.safetensors.index.json"
            ]
        );
        assert_eq!(
            pick(&files, "t", Some("fp16")).unwrap(),
            [
                "t/config.json",
                "t/model.fp16-00001-of-00002.safetensors",
                "t/model.fp16-00002-of-00002.safetensors",
                "t/model.safetensors.index.fp16.json"
            ]
        );
    }

    #[test]
    fn folders_without_weights_come_whole() {
        let files = [
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "scheduler/scheduler_config.json",
        ];
        assert_eq!(
            pick(&files, "tokenizer", Some("fp16")).unwrap(),
            ["tokenizer/merges.txt", "tokenizer/vocab.json"]
        );
    }

    #[test]
    fn options_follow_huggingface_hub_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            HubOptions::from_vars(move |k| {
                pairs
                    .iter()
                    .find(|(name, _)| *name == k)
                    .map(|(_, v)| v.to_string())
            })
        };
        let o = env(&[("HOME", "/home/u")]);
        assert_eq!(o.endpoint, "https://huggingface.co");
        assert_eq!(o.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert_eq!((o.token, o.offline), (None, false));
        let o = env(&[
            ("HF_HOME", "/data/hf"),
            ("HF_ENDPOINT", "http://mirror.local/"),
            ("HF_TOKEN", "hf_x"),
            ("HF_HUB_OFFLINE", "true"),
        ]);
        assert_eq!(o.endpoint, "http://mirror.local");
        assert_eq!(o.cache_dir, PathBuf::from("/data/hf/hub"));
        assert_eq!((o.token.as_deref(), o.offline), (Some("hf_x"), true));
        assert!(!env(&[("HF_HUB_OFFLINE", "0")]).offline);
        assert_eq!(
            env(&[("HF_HUB_CACHE", "/c")]).cache_dir,
            PathBuf::from("/c")
        );
    }

    #[test]
    fn rejects_unsafe_paths() {
        for bad in ["", "../x", "a/../b", "/abs", "a//b", "a\\b"] {
            assert!(!is_safe_path(bad), "{bad:?}");
        }
        assert!(is_safe_path("unet/diffusion_pytorch_model.safetensors"));
        assert_eq!(strip_shard_suffix("fp16-00001-of-00002"), "fp16");
        assert_eq!(strip_shard_suffix("fp16"), "fp16");
    }
}
