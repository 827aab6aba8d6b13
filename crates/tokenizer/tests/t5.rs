//! T5 tokenizer parity with transformers 5.24's `T5Tokenizer` on DeepFloyd IF's call (pad and
//! truncate to 77, `</s>` appended): the same prompts through a folder with only `spiece.model`
//! and one with only `tokenizer.json` (goldens written by scripts/fixtures/t5_tokenizer.py).

use std::path::{Path, PathBuf};

use autopipe_tokenizer::{Error, T5Tokenizer};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer")
}

fn cases() -> Value {
    let text = std::fs::read_to_string(fixtures().join("t5_cases.json")).expect("t5_cases.json");
    serde_json::from_str(&text).expect("t5_cases.json parses")
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("list")
        .iter()
        .map(|x| x.as_i64().expect("int"))
        .collect()
}

fn check_folder(name: &str) {
    let meta = cases();
    let max_length = meta["max_length"].as_u64().expect("max_length") as usize;
    let tok = T5Tokenizer::from_folder(&fixtures().join(name), max_length)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(tok.eos_token_id(), meta["eos_token_id"].as_i64().unwrap());
    assert_eq!(tok.pad_token_id(), meta["pad_token_id"].as_i64().unwrap());
    assert_eq!(
        tok.backend().get_vocab_size(true) as u64,
        meta["vocab_size"].as_u64().unwrap()
    );
    let cases = meta["cases"].as_array().expect("cases");
    assert!(cases.len() >= 30, "{} prompts", cases.len());
    let mut truncated = 0;
    for case in cases {
        let prompt = case["prompt"].as_str().expect("prompt");
        let got = tok
            .encode(prompt)
            .unwrap_or_else(|e| panic!("{prompt:?}: {e}"));
        assert_eq!(got.input_ids, ids(&case["input_ids"]), "{name}: {prompt:?}");
        assert_eq!(
            got.attention_mask,
            ids(&case["attention_mask"]),
            "{name}: {prompt:?}"
        );
        let untruncated = ids(&case["untruncated_ids"]);
        assert_eq!(got.untruncated_len, untruncated.len(), "{name}: {prompt:?}");
        assert_eq!(got.truncated, untruncated.len() > max_length, "{prompt:?}");
        truncated += usize::from(got.truncated);
        if got.truncated {
            assert!(!got.removed_text.is_empty(), "{prompt:?}");
        }
    }
    assert!(truncated >= 3, "over-long prompts must be among the cases");
    println!(
        "{name}: {} prompts match transformers ({truncated} truncated)",
        cases.len()
    );
}

#[test]
fn spiece_model_folder_matches_transformers() {
    check_folder("t5-spiece");
}

#[test]
fn tokenizer_json_folder_matches_transformers() {
    check_folder("t5-json");
}

#[test]
fn unreadable_folders_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("autopipe-t5-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    match T5Tokenizer::from_folder(&dir, 77) {
        Err(Error::MissingFile { path }) => assert!(path.ends_with("spiece.model"), "{path:?}"),
        other => panic!("expected MissingFile, got {:?}", other.map(|_| ())),
    }
    std::fs::write(dir.join("spiece.model"), b"\xff\xff not a proto").expect("write");
    match T5Tokenizer::from_folder(&dir, 77) {
        Err(Error::BadFile { path, message }) => {
            assert!(path.ends_with("spiece.model"), "{path:?}");
            println!("garbage spiece.model: {message}");
        }
        other => panic!("expected BadFile, got {:?}", other.map(|_| ())),
    }
    std::fs::remove_dir_all(&dir).ok();
}
