//! A fake Hugging Face hub for tests (cargo feature `fake-hub`, like tokio's `test-util`): a
//! loopback HTTP server speaking the layout `huggingface_hub`'s `file_download.py` and hf-hub
//! read: the model info API (`/api/models/{repo}/revision/{rev}` with `sha` and `siblings`) and
//! `/{repo}/resolve/{rev}/{path}` with `x-repo-commit`, `etag` / `x-linked-etag` and
//! `Content-Range` for `Range` requests; safetensors files are redirected (302) to a CDN path as the
//! real hub does for LFS files. Every request is logged, so a test can assert what was downloaded.

use crate::{Error, HubOptions, Result};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The commit a [`FakeRepo`] is at unless [`FakeRepo::with_commit`] says otherwise.
pub const DEFAULT_COMMIT: &str = "1111111111111111111111111111111111111111";

/// Files of a real Stable Diffusion repo besides the regular weights: a README, a full `.ckpt`,
/// the safety checker and feature extractor, pickled `.bin` weights, fp16 and non-EMA unets.
pub const SD_EXTRAS: &[(&str, &str)] = &[
    ("README.md", "# sd1-tiny"),
    ("v1-5-pruned.ckpt", "pickled full checkpoint"),
    ("safety_checker/config.json", "{}"),
    ("safety_checker/model.safetensors", "safety weights"),
    ("feature_extractor/preprocessor_config.json", "{}"),
    ("unet/diffusion_pytorch_model.bin", "pickled unet"),
    ("unet/diffusion_pytorch_model.fp16.safetensors", "fp16 unet"),
    (
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "non-ema unet",
    ),
    ("text_encoder/pytorch_model.bin", "pickled text encoder"),
    ("vae/diffusion_pytorch_model.bin", "pickled vae"),
];

/// One repo the fake hub serves: its files by repo path, at one commit.
#[derive(Debug, Clone)]
pub struct FakeRepo {
    repo_id: String,
    commit: String,
    files: BTreeMap<String, Vec<u8>>,
    /// Gated: answers 403 `GatedRepo` unless this bearer token is sent.
    token: Option<String>,
}

impl FakeRepo {
    /// A repo `repo_id` ("org/name") holding `files` (repo path → content) at [`DEFAULT_COMMIT`].
    pub fn new(repo_id: &str, files: BTreeMap<String, Vec<u8>>) -> Self {
        Self {
            repo_id: repo_id.into(),
            commit: DEFAULT_COMMIT.into(),
            files,
            token: None,
        }
    }

    /// A repo holding every file under `dir` (a diffusers checkpoint folder), paths relative to it.
    pub fn from_dir(repo_id: &str, dir: impl AsRef<Path>) -> Result<Self> {
        let root = dir.as_ref();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        let mut files = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
                let path = entry.map_err(io(&dir))?.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let rel = path
                    .strip_prefix(root)
                    .ok()
                    .and_then(Path::to_str)
                    .ok_or_else(|| Error::Malformed {
                        path: path.clone(),
                        reason: "not a UTF-8 path under the repo folder".into(),
                    })?
                    .replace('\\', "/");
                files.insert(rel, std::fs::read(&path).map_err(io(&path))?);
            }
        }
        Ok(Self::new(repo_id, files))
    }

    /// The same repo at `commit` (40 hex digits).
    pub fn with_commit(mut self, commit: &str) -> Self {
        self.commit = commit.into();
        self
    }

    /// The same repo, gated: only requests bearing `token` are answered.
    pub fn with_token(mut self, token: &str) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The same repo with one more file (or `path` replaced).
    pub fn with_file(mut self, path: &str, content: impl Into<Vec<u8>>) -> Self {
        self.files.insert(path.into(), content.into());
        self
    }

    /// The same repo plus what a real Stable Diffusion repo also holds and a pipeline asking for
    /// no variant must not download (placeholder bytes, see [`SD_EXTRAS`]).
    pub fn with_sd_extras(mut self) -> Self {
        for (path, content) in SD_EXTRAS {
            self.files
                .insert(path.to_string(), content.as_bytes().to_vec());
        }
        self
    }

    /// The repo id, "org/name".
    pub fn repo_id(&self) -> &str {
        &self.repo_id
    }

    /// The files, repo path → content.
    pub fn files(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.files
    }
}

/// One HTTP request the fake hub received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `HEAD`, …
    pub method: String,
    /// The URL path, query string dropped.
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
}

impl Request {
    /// The repo path this request fetched from `repo_id` through `/resolve/`, if it did.
    pub fn resolved_file(&self, repo_id: &str) -> Option<&str> {
        let rest = self.path.strip_prefix(&format!("/{repo_id}/resolve/"))?;
        rest.split_once('/').map(|(_revision, file)| file)
    }

    /// A metadata probe (`Range: bytes=0-0`, as hf-hub sends before downloading), not a download.
    pub fn is_probe(&self) -> bool {
        self.range.as_deref() == Some("bytes=0-0")
    }

    /// A file download: a `/resolve/` or CDN request that is not a probe.
    pub fn is_file_request(&self) -> bool {
        self.path.contains("/resolve/") || self.path.starts_with("/cdn/")
    }
}

#[derive(Default)]
struct State {
    repos: BTreeMap<String, FakeRepo>,
    /// sha256 → content, for the CDN path LFS files redirect to.
    blobs: BTreeMap<String, Vec<u8>>,
    log: Vec<Request>,
}

impl State {
    fn add(&mut self, repo: FakeRepo) {
        for content in repo.files.values() {
            self.blobs.insert(sha256(content), content.clone());
        }
        self.repos.insert(repo.repo_id.clone(), repo);
    }
}

/// A running fake hub on a loopback port; stops when dropped.
pub struct FakeHub {
    addr: SocketAddr,
    endpoint: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl FakeHub {
    /// Starts serving `repos` on a free loopback port.
    ///
    /// # Panics
    /// If no loopback port can be bound.
    pub fn start(repos: Vec<FakeRepo>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("fake hub: bind a loopback port");
        let addr = listener.local_addr().expect("fake hub: local address");
        let endpoint = format!("http://{addr}");
        let state = Arc::new(Mutex::new(State::default()));
        for repo in repos {
            lock(&state).add(repo);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (shared, base, stopped) = (state.clone(), endpoint.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (state, base) = (shared.clone(), base.clone());
                std::thread::spawn(move || serve(stream, &state, &base));
            }
        });
        Self {
            addr,
            endpoint,
            state,
            stop,
        }
    }

    /// The base URL, for `HF_ENDPOINT` or [`HubOptions::endpoint`].
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// [`HubOptions`] for this hub, caching into `cache_dir`, no token, online.
    pub fn options(&self, cache_dir: &Path) -> HubOptions {
        HubOptions {
            endpoint: self.endpoint.clone(),
            cache_dir: cache_dir.to_path_buf(),
            token: None,
            offline: false,
        }
    }

    /// Adds (or replaces) a repo.
    pub fn add_repo(&self, repo: FakeRepo) {
        lock(&self.state).add(repo);
    }

    /// Moves `repo_id`'s branches to `commit`, its files unchanged; false if there is no such repo.
    pub fn set_commit(&self, repo_id: &str, commit: &str) -> bool {
        match lock(&self.state).repos.get_mut(repo_id) {
            Some(repo) => {
                repo.commit = commit.into();
                true
            }
            None => false,
        }
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.state).log.clone()
    }

    /// How many requests were received so far (a mark for the `*_since` methods).
    pub fn log_len(&self) -> usize {
        lock(&self.state).log.len()
    }

    /// The requests received after the first `from`.
    pub fn requests_since(&self, from: usize) -> Vec<Request> {
        lock(&self.state)
            .log
            .get(from..)
            .unwrap_or_default()
            .to_vec()
    }

    /// Repo paths of `repo_id` whose content was requested (not just probed) after the first `from`.
    pub fn downloads_since(&self, from: usize, repo_id: &str) -> BTreeSet<String> {
        self.requests_since(from)
            .iter()
            .filter(|r| !r.is_probe())
            .filter_map(|r| r.resolved_file(repo_id).map(str::to_string))
            .collect()
    }

    /// Every `/resolve/` and CDN request (probes included) after the first `from`.
    pub fn resolves_since(&self, from: usize) -> Vec<Request> {
        self.requests_since(from)
            .into_iter()
            .filter(Request::is_file_request)
            .collect()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees the flag and ends.
        let _ = TcpStream::connect(self.addr);
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Lowercase hex sha256 of `bytes`, the hub's LFS object id.
pub fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    fn error(status: u16, code: &str) -> Self {
        Self::new(status, format!("{{\"error\":\"{code}\"}}")).header("X-Error-Code", code)
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>, base: &str) {
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut words = request_line.split_whitespace();
    let method = words.next().unwrap_or("").to_string();
    if method.is_empty() {
        // The wake-up connection from `Drop`, or a client that sent nothing.
        return;
    }
    let target = words.next().unwrap_or("/");
    let path = target.split('?').next().unwrap_or("").to_string();
    let range = headers.get("range").cloned();
    let reply = {
        let mut state = lock(state);
        state.log.push(Request {
            method: method.clone(),
            path: path.clone(),
            range: range.clone(),
        });
        route(
            &state,
            &path,
            headers.get("authorization").map(String::as_str),
            range.as_deref(),
            base,
        )
    };
    let mut out = format!(
        "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reply.body.len()
    );
    for (k, v) in &reply.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut stream = &stream;
    let _ = stream
        .write_all(out.as_bytes())
        .and_then(|_| match method.as_str() {
            "HEAD" => Ok(()),
            _ => stream.write_all(&reply.body),
        });
}

fn route(state: &State, path: &str, auth: Option<&str>, range: Option<&str>, base: &str) -> Reply {
    if let Some(digest) = path.strip_prefix("/cdn/") {
        return match state.blobs.get(digest) {
            Some(content) => ranged(content, range),
            None => Reply::new(404, "no blob"),
        };
    }
    let (api, rest) = match path.strip_prefix("/api/models/") {
        Some(rest) => (true, rest),
        None => (false, path.trim_start_matches('/')),
    };
    let mut parts = rest.splitn(5, '/');
    let (org, name, kind, revision) = (parts.next(), parts.next(), parts.next(), parts.next());
    let (Some(org), Some(name), Some(kind), Some(revision)) = (org, name, kind, revision) else {
        return Reply::new(404, "bad path");
    };
    let file = parts.next();
    // The real hub hides missing and private repos alike behind 401 RepoNotFound.
    let Some(repo) = state.repos.get(&format!("{org}/{name}")) else {
        return Reply::error(401, "RepoNotFound");
    };
    if repo
        .token
        .as_ref()
        .is_some_and(|t| auth != Some(format!("Bearer {t}").as_str()))
    {
        return Reply::error(403, "GatedRepo");
    }
    if revision != "main" && revision != repo.commit {
        return Reply::error(404, "RevisionNotFound");
    }
    match (api, kind, file) {
        (true, "revision", None) => {
            let siblings: Vec<_> = repo
                .files
                .iter()
                .map(|(f, content)| {
                    let digest = sha256(content);
                    match f.ends_with(".safetensors") {
                        true => serde_json::json!({"rfilename": f, "blobId": "0".repeat(40), "lfs": {"sha256": digest}}),
                        false => serde_json::json!({"rfilename": f, "blobId": digest}),
                    }
                })
                .collect();
            let body =
                serde_json::json!({"id": repo.repo_id, "sha": repo.commit, "siblings": siblings});
            Reply::new(200, body.to_string()).header("Content-Type", "application/json")
        }
        (false, "resolve", Some(file)) => {
            let Some(content) = repo.files.get(file) else {
                return Reply::error(404, "EntryNotFound");
            };
            let digest = sha256(content);
            if file.ends_with(".safetensors") {
                Reply::new(302, "")
                    .header("Location", format!("{base}/cdn/{digest}"))
                    .header("X-Repo-Commit", repo.commit.clone())
                    .header("X-Linked-Etag", format!("\"{digest}\""))
                    .header("X-Linked-Size", content.len().to_string())
                    .header("ETag", "\"pointer-etag\"")
            } else {
                ranged(content, range)
                    .header("X-Repo-Commit", repo.commit.clone())
                    .header("ETag", format!("\"{digest}\""))
            }
        }
        _ => Reply::new(404, "bad path"),
    }
}

/// Serves `content`, honouring `Range: bytes=a-` / `bytes=a-b`; 416 for a range it cannot serve.
fn ranged(content: &[u8], range: Option<&str>) -> Reply {
    let Some(spec) = range.and_then(|r| r.strip_prefix("bytes=")) else {
        return Reply::new(200, content);
    };
    let last = content.len().checked_sub(1);
    let bounds = spec.split_once('-').and_then(|(a, b)| {
        let start: usize = a.trim().parse().ok()?;
        let end = match b.trim() {
            "" => last?,
            b => b.parse::<usize>().ok()?.min(last?),
        };
        (start <= end).then_some((start, end))
    });
    let Some((start, end)) = bounds else {
        return Reply::new(416, "").header("Content-Range", format!("bytes */{}", content.len()));
    };
    Reply::new(206, &content[start..=end]).header(
        "Content-Range",
        format!("bytes {start}-{end}/{}", content.len()),
    )
}
