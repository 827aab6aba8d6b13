//! Every golden prompt × every fixture folder against transformers 5.24's `CLIPTokenizer.from_pretrained`
//! (goldens written by scripts/fixtures/clip_tokenizer.py), plus loading errors.

use std::path::{Path, PathBuf};

use autopipe_tokenizer::{ClipTokenizer, Error};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer")
}

fn goldens() -> Value {
    let text = std::fs::read_to_string(fixtures().join("goldens.json")).expect("goldens.json");
    serde_json::from_str(&text).expect("goldens.json parses")
}

/// A scratch folder, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    /// A fresh, empty folder unique to this process and `tag`.
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("autopipe-tokenizer-{}-{tag}", std::process::id()));
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

/// The folder a golden entry names: a committed fixture, or (config-only variants) a temp copy of its
/// `base` folder's vocab.json + merges.txt with the golden's `config_files` written beside them.
fn golden_folder(name: &str, golden: &Value, tag: &str) -> (PathBuf, Option<TempDir>) {
    let Some(base) = golden.get("base").and_then(Value::as_str) else {
        return (fixtures().join(name), None);
    };
    let tmp = TempDir::new(&format!("{tag}-{name}"));
    for file in ["vocab.json", "merges.txt"] {
        std::fs::copy(fixtures().join(base).join(file), tmp.0.join(file)).unwrap();
    }
    for (file, content) in golden["config_files"].as_object().expect("config_files") {
        std::fs::write(
            tmp.0.join(file),
            serde_json::to_string_pretty(content).unwrap(),
        )
        .unwrap();
    }
    (tmp.0.clone(), Some(tmp))
}

#[test]
fn golden_prompts_match_transformers() {
    let goldens = goldens();
    let prompts: Vec<&str> = goldens["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| p.as_str().expect("prompt"))
        .collect();
    let folders = goldens["folders"].as_object().expect("folders");
    assert_eq!(folders.len(), 5);
    assert!(prompts.len() >= 30);
    let (mut checked, mut matched) = (0usize, 0usize);
    let mut failures = Vec::new();
    for (name, golden) in folders {
        let (dir, _tmp) = golden_folder(name, golden, "ids");
        let tok = ClipTokenizer::from_folder(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            tok.model_max_length() as u64,
            golden["model_max_length"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            tok.pad_token_id(),
            golden["pad_token_id"].as_i64().unwrap(),
            "{name}"
        );
        assert_eq!(
            tok.eos_token_id(),
            golden["eos_token_id"].as_i64().unwrap(),
            "{name}"
        );
        assert_eq!(
            tok.bos_token_id(),
            golden["bos_token_id"].as_i64().unwrap(),
            "{name}"
        );
        let cases = golden["cases"].as_array().expect("cases");
        assert_eq!(cases.len(), prompts.len());
        for (prompt, case) in prompts.iter().zip(cases) {
            checked += 1;
            let want_ids: Vec<i64> = case["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            let got = tok
                .encode(prompt)
                .unwrap_or_else(|e| panic!("{name} {prompt:?}: {e}"));
            assert_eq!(got.input_ids.len(), tok.model_max_length());
            let ok = got.input_ids == want_ids
                && got.untruncated_len as u64 == case["untruncated_len"].as_u64().unwrap()
                && got.truncated == case["truncated"].as_bool().unwrap()
                && got.removed_text == case["removed_text"].as_str().unwrap();
            if ok {
                matched += 1;
            } else {
                failures.push(format!("{name} {prompt:?}:\n  got  {got:?}\n  want {case}"));
            }
        }
    }
    println!("tokenizer goldens: {matched}/{checked} (prompt, folder) cases match transformers");
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The backend's added tokens (content, id, flags) equal what transformers' backend holds.
#[test]
fn added_tokens_match_transformers() {
    let goldens = goldens();
    for (name, golden) in goldens["folders"].as_object().unwrap() {
        let (dir, _tmp) = golden_folder(name, golden, "added");
        let tok = ClipTokenizer::from_folder(&dir).unwrap();
        let backend: Value =
            serde_json::from_str(&tok.backend().to_string(false).unwrap()).unwrap();
        assert_eq!(backend["added_tokens"], golden["added_tokens"], "{name}");
    }
}

#[test]
fn truncation_is_reported_like_diffusers() {
    let tok = ClipTokenizer::from_folder(&fixtures().join("sd1-vocab-merges")).unwrap();
    let exact = tok.encode(&["a"; 75].join(" ")).unwrap();
    assert!(!exact.truncated);
    assert_eq!(exact.untruncated_len, 77);
    let over = tok.encode(&["a"; 76].join(" ")).unwrap();
    assert!(over.truncated);
    assert_eq!(over.untruncated_len, 78);
    assert_eq!(over.removed_text, "a");
    assert_eq!(over.input_ids[76], tok.eos_token_id());
    assert_eq!(
        tok.encode("a photo").unwrap().input_ids[..4],
        [49406, 320, 1125, 49407]
    );
}

/// Copies a fixture folder into a fresh temp dir that the test may break.
fn scratch_copy(name: &str, tag: &str) -> TempDir {
    let tmp = TempDir::new(tag);
    for entry in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.0.join(entry.file_name())).unwrap();
    }
    tmp
}

fn load_err(dir: &Path) -> Error {
    ClipTokenizer::from_folder(dir).expect_err("loading should fail")
}

#[test]
fn missing_folder_and_files_are_named() {
    let err = load_err(&fixtures().join("no-such-folder"));
    assert!(
        matches!(&err, Error::MissingFile { path } if path.ends_with("no-such-folder")),
        "{err}"
    );

    let tmp = scratch_copy("sd1-vocab-merges", "missing-merges");
    let dir = &tmp.0;
    std::fs::remove_file(dir.join("merges.txt")).unwrap();
    let err = load_err(dir);
    assert!(
        matches!(&err, Error::MissingFile { path } if path.ends_with("merges.txt")),
        "{err}"
    );
    assert!(err.to_string().contains("merges.txt"));

    std::fs::remove_file(dir.join("vocab.json")).unwrap();
    let err = load_err(dir);
    assert!(
        matches!(&err, Error::MissingFile { path } if path.ends_with("vocab.json")),
        "{err}"
    );

    let tmp = scratch_copy("sd1-tokenizer-json", "missing-config");
    let dir = &tmp.0;
    std::fs::remove_file(dir.join("tokenizer_config.json")).unwrap();
    let err = load_err(dir);
    assert!(
        matches!(&err, Error::MissingFile { path } if path.ends_with("tokenizer_config.json")),
        "{err}"
    );
}

#[test]
fn malformed_files_are_named() {
    let tmp = scratch_copy("sd2-vocab-merges", "malformed");
    let dir = &tmp.0;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        "{\"model_max_length\": 77,",
    )
    .unwrap();
    let err = load_err(dir);
    assert!(
        matches!(&err, Error::Json { path, .. } if path.ends_with("tokenizer_config.json")),
        "{err}"
    );

    std::fs::write(
        dir.join("tokenizer_config.json"),
        "{\"model_max_length\": \"77\"}",
    )
    .unwrap();
    let err = load_err(dir);
    assert!(
        matches!(&err, Error::BadFile { path, .. } if path.ends_with("tokenizer_config.json")),
        "{err}"
    );

    std::fs::write(
        dir.join("tokenizer_config.json"),
        "{\"model_max_length\": 77}",
    )
    .unwrap();
    std::fs::write(dir.join("special_tokens_map.json"), "[1, 2]").unwrap();
    let err = load_err(dir);
    assert!(
        matches!(&err, Error::BadFile { path, .. } if path.ends_with("special_tokens_map.json")),
        "{err}"
    );

    std::fs::remove_file(dir.join("special_tokens_map.json")).unwrap();
    std::fs::write(dir.join("merges.txt"), "#version: 0.2\na b\nnot-a-pair\n").unwrap();
    let err = load_err(dir);
    assert!(
        matches!(&err, Error::BadFile { path, .. } if path.ends_with("merges.txt")),
        "{err}"
    );

    std::fs::write(dir.join("merges.txt"), "#version: 0.2\nxyzq qqqq\n").unwrap();
    let err = load_err(dir);
    assert!(
        matches!(&err, Error::BadFile { path, .. } if path.ends_with("merges.txt")),
        "{err}"
    );

    std::fs::write(dir.join("vocab.json"), "{\"a\": -1}").unwrap();
    let err = load_err(dir);
    assert!(
        matches!(&err, Error::BadFile { path, .. } if path.ends_with("vocab.json")),
        "{err}"
    );

    std::fs::write(
        dir.join("tokenizer.json"),
        "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {}}}",
    )
    .unwrap();
    let err = load_err(dir);
    assert!(
        matches!(&err, Error::BadFile { path, .. } if path.ends_with("tokenizer.json")),
        "{err}"
    );
}

/// With only the vocab/merges and no special token entries, CLIPTokenizer's defaults apply.
#[test]
fn config_without_special_tokens_uses_clip_defaults() {
    let tmp = scratch_copy("sd2-vocab-merges", "defaults");
    let dir = &tmp.0;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        "{\"model_max_length\": 77}",
    )
    .unwrap();
    std::fs::remove_file(dir.join("special_tokens_map.json")).unwrap();
    let tok = ClipTokenizer::from_folder(dir).unwrap();
    assert_eq!(tok.pad_token_id(), 49407);
    assert_eq!(
        tok.encode("hi!").unwrap().input_ids[..4],
        [49406, 1883, 256, 49407]
    );
}
