//! Hub fetching against a local fake hub that speaks the hub's HTTP layout: the model info API
//! (`/api/models/{repo}/revision/{rev}`) and `/{repo}/resolve/{rev}/{path}` with the headers hf-hub
//! reads (`x-repo-commit`, `etag`/`x-linked-etag`, `Content-Range` for `Range` requests), LFS files
//! redirected to a CDN path as the real hub does.

use autopipe_repo::{fetch_components, fetch_model_index, Checkpoint, Error, HubOptions};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const SD_COMPONENTS: [&str; 5] = ["text_encoder", "tokenizer", "unet", "vae", "scheduler"];
const TOKEN: &str = "hf_test_token";

/// One repo the fake hub serves.
struct FakeRepo {
    commit: String,
    files: BTreeMap<String, Vec<u8>>,
    /// Gated: answers 403 `GatedRepo` unless this token is sent.
    token: Option<String>,
}

/// One request the fake hub received.
#[derive(Debug, Clone)]
struct Logged {
    path: String,
    range: Option<String>,
}

#[derive(Default)]
struct State {
    repos: BTreeMap<String, FakeRepo>,
    /// sha256 → content, for the CDN path LFS files redirect to.
    blobs: BTreeMap<String, Vec<u8>>,
    log: Vec<Logged>,
}

struct FakeHub {
    base: String,
    state: Arc<Mutex<State>>,
}

impl FakeHub {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let (shared, base2) = (state.clone(), base.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (state, base) = (shared.clone(), base2.clone());
                std::thread::spawn(move || serve(stream, &state, &base));
            }
        });
        Self { base, state }
    }

    fn add_repo(
        &self,
        repo_id: &str,
        commit: &str,
        files: BTreeMap<String, Vec<u8>>,
        token: Option<&str>,
    ) {
        let mut state = self.state.lock().unwrap();
        for content in files.values() {
            state.blobs.insert(sha256(content), content.clone());
        }
        let repo = FakeRepo {
            commit: commit.into(),
            files,
            token: token.map(str::to_string),
        };
        state.repos.insert(repo_id.into(), repo);
    }

    fn set_commit(&self, repo_id: &str, commit: &str) {
        self.state
            .lock()
            .unwrap()
            .repos
            .get_mut(repo_id)
            .unwrap()
            .commit = commit.into();
    }

    fn log_len(&self) -> usize {
        self.state.lock().unwrap().log.len()
    }

    /// Repo paths whose content was requested (not just probed with `Range: bytes=0-0`) since `from`.
    fn downloads_since(&self, from: usize, repo_id: &str) -> BTreeSet<String> {
        let prefix = format!("/{repo_id}/resolve/");
        let state = self.state.lock().unwrap();
        state.log[from..]
            .iter()
            .filter(|r| r.range.as_deref() != Some("bytes=0-0"))
            .filter_map(|r| r.path.strip_prefix(&prefix))
            .map(|rest| rest.split_once('/').unwrap().1.to_string())
            .collect()
    }

    /// Every resolve path requested since `from`, probes included.
    fn resolves_since(&self, from: usize) -> Vec<Logged> {
        let state = self.state.lock().unwrap();
        state.log[from..]
            .iter()
            .filter(|r| r.path.contains("/resolve/") || r.path.starts_with("/cdn/"))
            .cloned()
            .collect()
    }

    fn options(&self, cache: &Path) -> HubOptions {
        HubOptions {
            endpoint: self.base.clone(),
            cache_dir: cache.to_path_buf(),
            token: None,
            offline: false,
        }
    }
}

fn sha256(bytes: &[u8]) -> String {
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
    let target = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    let path = target.split('?').next().unwrap_or("").to_string();
    let range = headers.get("range").cloned();
    let reply = {
        let mut state = state.lock().unwrap();
        state.log.push(Logged {
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
        .and_then(|_| stream.write_all(&reply.body));
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
            let body = serde_json::json!({"id": format!("{org}/{name}"), "sha": repo.commit, "siblings": siblings});
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

/// Serves `content`, honouring `Range: bytes=a-` / `bytes=a-b`.
fn ranged(content: &[u8], range: Option<&str>) -> Reply {
    let Some(spec) = range.and_then(|r| r.strip_prefix("bytes=")) else {
        return Reply::new(200, content);
    };
    let (a, b) = spec.split_once('-').unwrap();
    let start: usize = a.parse().unwrap();
    let end = b
        .parse::<usize>()
        .map_or(content.len() - 1, |e| e.min(content.len() - 1));
    Reply::new(206, &content[start..=end]).header(
        "Content-Range",
        format!("bytes {start}-{end}/{}", content.len()),
    )
}

fn fixture_files(name: &str) -> BTreeMap<String, Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/checkpoints")
        .join(name);
    let mut files = BTreeMap::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path
                    .strip_prefix(&root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .replace('\\', "/");
                files.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// sd1-tiny plus what a real SD repo also holds and a pipeline must not download.
fn sd1_with_extras() -> BTreeMap<String, Vec<u8>> {
    let mut files = fixture_files("sd1-tiny");
    for (f, content) in [
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
    ] {
        files.insert(f.into(), content.as_bytes().to_vec());
    }
    files
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("autopipe-hub-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

const COMMIT1: &str = "1111111111111111111111111111111111111111";
const COMMIT2: &str = "2222222222222222222222222222222222222222";

#[test]
fn fetches_only_what_the_pipeline_needs_and_reuses_the_cache() {
    let hub = FakeHub::start();
    hub.add_repo("org/sd1-tiny", COMMIT1, sd1_with_extras(), None);
    let tmp = TempDir::new("needs");
    let opts = hub.options(&tmp.0);

    let snapshot = fetch_components(&opts, "org/sd1-tiny", "main", &SD_COMPONENTS, None).unwrap();
    assert_eq!(
        snapshot,
        tmp.0.join("models--org--sd1-tiny/snapshots").join(COMMIT1)
    );
    let expected = set(&[
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]);
    assert_eq!(hub.downloads_since(0, "org/sd1-tiny"), expected);
    // The weights went the LFS way: resolve → 302 → CDN, as on the real hub.
    assert_eq!(
        hub.resolves_since(0)
            .iter()
            .filter(|r| r.path.starts_with("/cdn/"))
            .count(),
        3 * 2
    );
    let checkpoint = Checkpoint::open(&snapshot).unwrap();
    assert_eq!(checkpoint.index().class_name, "StableDiffusionPipeline");
    for c in SD_COMPONENTS {
        checkpoint.component_dir(c).unwrap();
    }
    let fixture = fixture_files("sd1-tiny");
    for file in &expected {
        assert_eq!(
            &std::fs::read(snapshot.join(file)).unwrap(),
            &fixture[file],
            "{file}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(tmp.0.join("models--org--sd1-tiny/refs/main")).unwrap(),
        COMMIT1
    );

    // Everything cached: only the listing is asked for, no file is requested.
    for revision in ["main", COMMIT1] {
        let from = hub.log_len();
        assert_eq!(
            fetch_components(&opts, "org/sd1-tiny", revision, &SD_COMPONENTS, None).unwrap(),
            snapshot
        );
        assert!(
            hub.resolves_since(from).is_empty(),
            "{revision}: {:?}",
            hub.resolves_since(from)
        );
        assert_eq!(hub.log_len(), from + 1);
    }

    // Offline: the cache alone, no request at all.
    let offline = HubOptions {
        offline: true,
        ..opts.clone()
    };
    let from = hub.log_len();
    assert_eq!(
        fetch_components(&offline, "org/sd1-tiny", "main", &SD_COMPONENTS, None).unwrap(),
        snapshot
    );
    assert_eq!(
        fetch_model_index(&offline, "org/sd1-tiny", "").unwrap(),
        snapshot
    );
    assert_eq!(hub.log_len(), from);
    let err = fetch_components(&offline, "org/sd2-tiny", "main", &["unet"], None).unwrap_err();
    assert!(
        matches!(&err, Error::NotFound(m) if m.contains("org/sd2-tiny") && m.contains("HF_HUB_OFFLINE")),
        "{err}"
    );
    let err =
        fetch_components(&offline, "org/sd1-tiny", "main", &["unet"], Some("fp16")).unwrap_err();
    assert!(
        matches!(&err, Error::NotFound(m) if m.contains("fp16")),
        "{err}"
    );
    assert_eq!(hub.log_len(), from);

    // The branch moves to a commit with the same files: a new snapshot of links to the cached
    // blobs, nothing downloaded.
    hub.set_commit("org/sd1-tiny", COMMIT2);
    let from = hub.log_len();
    let moved = fetch_components(&opts, "org/sd1-tiny", "main", &SD_COMPONENTS, None).unwrap();
    assert_eq!(
        moved,
        tmp.0.join("models--org--sd1-tiny/snapshots").join(COMMIT2)
    );
    assert!(
        hub.resolves_since(from).is_empty(),
        "{:?}",
        hub.resolves_since(from)
    );
    Checkpoint::open(&moved).unwrap();
    assert_eq!(
        std::fs::read(moved.join("unet/diffusion_pytorch_model.safetensors")).unwrap(),
        fixture["unet/diffusion_pytorch_model.safetensors"]
    );

    // The hub unreachable: a fully cached snapshot still serves, a missing one is Unavailable.
    let dead = HubOptions {
        endpoint: dead_endpoint(),
        ..opts.clone()
    };
    assert_eq!(
        fetch_components(&dead, "org/sd1-tiny", "main", &SD_COMPONENTS, None).unwrap(),
        moved
    );
    let err =
        fetch_components(&dead, "org/sd1-tiny", "main", &["safety_checker"], None).unwrap_err();
    assert!(
        matches!(&err, Error::Unavailable(m) if m.contains("cannot reach")),
        "{err}"
    );
}

#[test]
fn variants_come_only_when_asked() {
    let hub = FakeHub::start();
    hub.add_repo("org/sd2-tiny", COMMIT1, fixture_files("sd2-tiny"), None);
    hub.add_repo("org/sd1-tiny", COMMIT1, sd1_with_extras(), None);
    let tmp = TempDir::new("variants");
    let opts = hub.options(&tmp.0);

    // fp16-only repo without a variant: a clear error, and no weights fetched.
    let err = fetch_components(&opts, "org/sd2-tiny", "main", &SD_COMPONENTS, None).unwrap_err();
    assert!(
        matches!(&err, Error::NotFound(m) if m.contains("fp16") && m.contains("variant")),
        "{err}"
    );
    assert!(hub
        .downloads_since(0, "org/sd2-tiny")
        .iter()
        .all(|f| !f.ends_with(".safetensors")));

    let from = hub.log_len();
    let snapshot =
        fetch_components(&opts, "org/sd2-tiny", "main", &SD_COMPONENTS, Some("fp16")).unwrap();
    let weights: BTreeSet<_> = hub
        .downloads_since(from, "org/sd2-tiny")
        .into_iter()
        .filter(|f| f.ends_with(".safetensors"))
        .collect();
    assert_eq!(
        weights,
        set(&[
            "text_encoder/model.fp16.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors"
        ])
    );
    assert!(hub
        .downloads_since(from, "org/sd2-tiny")
        .contains("tokenizer/tokenizer.json"));
    Checkpoint::open(&snapshot)
        .unwrap()
        .component_dir("unet")
        .unwrap();

    // A repo with an fp16 unet only: fp16 where it exists, the regular weights elsewhere.
    let from = hub.log_len();
    fetch_components(
        &opts,
        "org/sd1-tiny",
        "main",
        &["unet", "vae"],
        Some("fp16"),
    )
    .unwrap();
    assert_eq!(
        hub.downloads_since(from, "org/sd1-tiny"),
        set(&[
            "model_index.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors"
        ])
    );
    // A variant no needed component has is an error, as in diffusers.
    let err = fetch_components(&opts, "org/sd1-tiny", "main", &["vae"], Some("bf16")).unwrap_err();
    assert!(
        matches!(&err, Error::NotFound(m) if m.contains("bf16")),
        "{err}"
    );
}

#[test]
fn sharded_and_pickle_only_components() {
    let index = |shards: [&str; 2]| {
        serde_json::json!({"metadata": {}, "weight_map": {"a.weight": shards[0], "b.weight": shards[1]}}).to_string()
    };
    let regular = [
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
    ];
    let fp16 = [
        "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
    ];
    let model_index = r#"{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "safety_checker": [null, null]}"#;
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut add = |f: &str, content: &str| files.insert(f.into(), content.as_bytes().to_vec());
    add("model_index.json", model_index);
    add("unet/config.json", "{}");
    add(
        "unet/diffusion_pytorch_model.safetensors.index.json",
        &index(regular),
    );
    add(
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
        &index(fp16),
    );
    add("unet/diffusion_pytorch_model.bin.index.json", "{}");
    add(
        "unet/diffusion_pytorch_model-00001-of-00002.bin",
        "pickle 1",
    );
    for (i, shard) in regular.iter().chain(&fp16).enumerate() {
        add(&format!("unet/{shard}"), &format!("shard {i}"));
    }
    add("text_encoder/config.json", "{}");
    add("text_encoder/pytorch_model.bin", "pickle");
    let hub = FakeHub::start();
    hub.add_repo("org/sharded", COMMIT1, files, None);
    let tmp = TempDir::new("sharded");
    let opts = hub.options(&tmp.0);

    let snapshot = fetch_components(&opts, "org/sharded", "main", &["unet"], None).unwrap();
    let mut expected = set(&[
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors.index.json",
    ]);
    expected.extend(regular.iter().map(|s| format!("unet/{s}")));
    assert_eq!(hub.downloads_since(0, "org/sharded"), expected);
    assert!(snapshot.join("unet").join(regular[1]).is_file());

    let from = hub.log_len();
    fetch_components(&opts, "org/sharded", "main", &["unet"], Some("fp16")).unwrap();
    let mut expected = set(&["unet/diffusion_pytorch_model.safetensors.index.fp16.json"]);
    expected.extend(fp16.iter().map(|s| format!("unet/{s}")));
    assert_eq!(hub.downloads_since(from, "org/sharded"), expected);

    let err = fetch_components(&opts, "org/sharded", "main", &["text_encoder"], None).unwrap_err();
    assert!(
        matches!(&err, Error::NotFound(m) if m.contains("pickle") && m.contains("text_encoder")),
        "{err}"
    );
    let err =
        fetch_components(&opts, "org/sharded", "main", &["safety_checker"], None).unwrap_err();
    assert!(
        matches!(&err, Error::NotFound(m) if m.contains("safety_checker")),
        "{err}"
    );
    assert!(hub
        .downloads_since(0, "org/sharded")
        .iter()
        .all(|f| !f.ends_with(".bin") && !f.starts_with("text_encoder/")));

    // A shard the cache lost is reported offline, not silently skipped.
    let link = snapshot.join("unet").join(regular[0]);
    std::fs::remove_file(&link).unwrap();
    let offline = HubOptions {
        offline: true,
        ..opts.clone()
    };
    let err = fetch_components(&offline, "org/sharded", "main", &["unet"], None).unwrap_err();
    assert!(
        matches!(&err, Error::NotFound(m) if m.contains(regular[0])),
        "{err}"
    );
    // Online, it is linked again from its cached blob, without a download.
    let from = hub.log_len();
    fetch_components(&opts, "org/sharded", "main", &["unet"], None).unwrap();
    assert!(hub.downloads_since(from, "org/sharded").is_empty());
    assert_eq!(std::fs::read(&link).unwrap(), b"shard 0");
    // A deleted blob leaves a dangling link: that file alone is downloaded again.
    std::fs::remove_file(
        tmp.0
            .join("models--org--sharded/blobs")
            .join(sha256(b"shard 0")),
    )
    .unwrap();
    let from = hub.log_len();
    fetch_components(&opts, "org/sharded", "main", &["unet"], None).unwrap();
    assert_eq!(
        hub.downloads_since(from, "org/sharded"),
        set(&[&format!("unet/{}", regular[0])])
    );
    assert_eq!(std::fs::read(&link).unwrap(), b"shard 0");
}

#[test]
fn hub_errors_are_told_apart() {
    let hub = FakeHub::start();
    hub.add_repo("org/sd1-tiny", COMMIT1, fixture_files("sd1-tiny"), None);
    hub.add_repo("org/gated", COMMIT2, fixture_files("sd1-tiny"), Some(TOKEN));
    let tmp = TempDir::new("errors");
    let opts = hub.options(&tmp.0);

    let err = fetch_model_index(&opts, "org/no-such-model", "main").unwrap_err();
    assert!(
        matches!(&err, Error::NotFound(m) if m.contains("org/no-such-model")),
        "{err}"
    );
    let err = fetch_model_index(&opts, "org/sd1-tiny", "no-such-branch").unwrap_err();
    assert!(
        matches!(&err, Error::NotFound(m) if m.contains("no-such-branch") && m.contains("org/sd1-tiny")),
        "{err}"
    );

    let err = fetch_model_index(&opts, "org/gated", "main").unwrap_err();
    assert!(
        matches!(&err, Error::Unauthorized(m) if m.contains("org/gated") && m.contains("HF_TOKEN")),
        "{err}"
    );
    let with_token = HubOptions {
        token: Some(TOKEN.into()),
        ..opts.clone()
    };
    let snapshot =
        fetch_components(&with_token, "org/gated", "main", &["scheduler"], None).unwrap();
    assert_eq!(
        Checkpoint::open(&snapshot)
            .unwrap()
            .read_json("scheduler", "scheduler_config.json")
            .unwrap()["_class_name"],
        "PNDMScheduler"
    );

    let dead = HubOptions {
        endpoint: dead_endpoint(),
        ..opts.clone()
    };
    let err = fetch_model_index(&dead, "org/sd1-tiny", "main").unwrap_err();
    assert!(
        matches!(&err, Error::Unavailable(m) if m.contains("cannot reach")),
        "{err}"
    );

    for bad in ["../etc", "a/b/c", ""] {
        assert!(
            matches!(
                fetch_model_index(&opts, bad, "main"),
                Err(Error::InvalidReference(_))
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        fetch_model_index(&opts, "org/sd1-tiny", "../x"),
        Err(Error::InvalidReference(_))
    ));
    assert!(matches!(
        fetch_components(&opts, "org/sd1-tiny", "main", &["../unet"], None),
        Err(Error::NotFound(_))
    ));
}

/// An endpoint nothing listens on.
fn dead_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}
