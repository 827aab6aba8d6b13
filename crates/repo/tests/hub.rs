//! Hub fetching against `autopipe_repo::fake_hub`, a local server that speaks the hub's HTTP
//! layout: the model info API, `/{repo}/resolve/{rev}/{path}` with the headers hf-hub reads, LFS
//! files redirected to a CDN path as the real hub does.

use autopipe_repo::fake_hub::{sha256, FakeHub, FakeRepo};
use autopipe_repo::{fetch_components, fetch_model_index, Checkpoint, Error, HubOptions};
use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};

const SD_COMPONENTS: [&str; 5] = ["text_encoder", "tokenizer", "unet", "vae", "scheduler"];
const TOKEN: &str = "hf_test_token";

fn fixture_repo(repo_id: &str, name: &str) -> FakeRepo {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/checkpoints")
        .join(name);
    FakeRepo::from_dir(repo_id, dir).unwrap()
}

fn fixture_files(name: &str) -> BTreeMap<String, Vec<u8>> {
    fixture_repo("org/fixture", name).files().clone()
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

const COMMIT1: &str = autopipe_repo::fake_hub::DEFAULT_COMMIT;
const COMMIT2: &str = "2222222222222222222222222222222222222222";

#[test]
fn fetches_only_what_the_pipeline_needs_and_reuses_the_cache() {
    let hub = FakeHub::start(vec![
        fixture_repo("org/sd1-tiny", "sd1-tiny").with_sd_extras()
    ]);
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
    assert!(hub.set_commit("org/sd1-tiny", COMMIT2));
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
    let hub = FakeHub::start(vec![
        fixture_repo("org/sd2-tiny", "sd2-tiny"),
        fixture_repo("org/sd1-tiny", "sd1-tiny").with_sd_extras(),
    ]);
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
    let hub = FakeHub::start(vec![FakeRepo::new("org/sharded", files)]);
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
    let hub = FakeHub::start(vec![
        fixture_repo("org/sd1-tiny", "sd1-tiny"),
        fixture_repo("org/gated", "sd1-tiny")
            .with_commit(COMMIT2)
            .with_token(TOKEN),
    ]);
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
