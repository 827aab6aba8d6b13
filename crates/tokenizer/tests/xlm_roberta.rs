//! Every golden prompt against transformers 5.24's `XLMRobertaTokenizer.from_pretrained` as
//! `KandinskyPipeline._encode_prompt` calls it (goldens by scripts/fixtures/xlm_roberta_tokenizer.py),
//! from a folder with tokenizer.json and from one with only `sentencepiece.bpe.model` (transformers
//! encodes both alike; the script checks it), plus loading errors and the class resolution.

use std::path::{Path, PathBuf};

use autopipe_tokenizer::{Error, PretrainedTokenizer, TokenizerClass, SENTENCEPIECE_BPE_FILE};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer")
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_i64().expect("int"))
        .collect()
}

fn check_folder(tok: &PretrainedTokenizer, name: &str) {
    let text = std::fs::read_to_string(fixtures().join("xlm_roberta_goldens.json")).unwrap();
    let goldens: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(tok.class(), TokenizerClass::XlmRoberta);
    assert_eq!(
        tok.model_max_length() as u64,
        goldens["model_max_length"].as_u64().unwrap()
    );
    assert_eq!(
        tok.pad_token_id(),
        goldens["pad_token_id"].as_i64().unwrap()
    );
    let max_length = goldens["max_length"].as_u64().unwrap() as usize;
    let prompts = goldens["prompts"].as_array().unwrap();
    let cases = goldens["cases"].as_array().unwrap();
    assert!(prompts.len() >= 48, "{} prompts", prompts.len());
    assert_eq!(prompts.len(), cases.len());
    let mut failures = Vec::new();
    let mut truncated = 0;
    for (prompt, case) in prompts.iter().zip(cases) {
        let prompt = prompt.as_str().unwrap();
        let enc = tok.encode(prompt, max_length).unwrap();
        let expected = (
            ids(&case["input_ids"]),
            ids(&case["attention_mask"]),
            case["truncated"].as_bool().unwrap(),
            case["untruncated_len"].as_u64().unwrap() as usize,
            case["removed_text"].as_str().unwrap().to_owned(),
        );
        let got = (
            enc.input_ids,
            enc.attention_mask,
            enc.truncated,
            enc.untruncated_len,
            enc.removed_text,
        );
        truncated += usize::from(expected.2);
        if got != expected {
            failures.push(format!(
                "{prompt:?}:\n  got      {got:?}\n  expected {expected:?}"
            ));
        }
    }
    assert!(truncated > 0, "the goldens exercise truncation");
    assert!(
        failures.is_empty(),
        "{name}: {} of {} prompts differ:\n{}",
        failures.len(),
        prompts.len(),
        failures.join("\n")
    );
    println!(
        "{name}: {} prompts match transformers ({truncated} truncated)",
        prompts.len()
    );
}

#[test]
fn tokenizer_json_folder_matches_transformers() {
    let tok = PretrainedTokenizer::from_folder(&fixtures().join("xlm-roberta")).unwrap();
    check_folder(&tok, "xlm-roberta");
}

#[test]
fn sentencepiece_model_folder_matches_transformers() {
    let dir = fixtures().join("xlm-roberta-spm");
    assert!(!dir.join("tokenizer.json").exists());
    assert!(dir.join(SENTENCEPIECE_BPE_FILE).is_file());
    let tok = PretrainedTokenizer::from_folder(&dir).unwrap();
    check_folder(&tok, "xlm-roberta-spm");
}

/// A copy of the .model-only fixture folder in a fresh temporary directory.
fn spm_copy(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("autopipe-xlmr-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures().join("xlm-roberta-spm");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

#[test]
fn class_comes_from_the_config_else_the_declared_class() {
    let dir = spm_copy("class");
    let config_path = dir.join("tokenizer_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("tokenizer_class");
    std::fs::write(&config_path, config.to_string()).unwrap();
    // Without tokenizer_class the folder alone does not say what it is ...
    let err = PretrainedTokenizer::from_folder(&dir).unwrap_err();
    assert!(err.to_string().contains("no tokenizer_class"), "{err}");
    // ... model_index.json's class does (diffusers names the fast class).
    let tok =
        PretrainedTokenizer::from_folder_declared(&dir, Some("XLMRobertaTokenizerFast")).unwrap();
    assert_eq!(tok.class(), TokenizerClass::XlmRoberta);
    let err = PretrainedTokenizer::from_folder_declared(&dir, Some("T5Tokenizer")).unwrap_err();
    assert!(err.to_string().contains("\"T5Tokenizer\""), "{err}");
    // The folder's own tokenizer_class wins over the declared one.
    config["tokenizer_class"] = Value::from("BertTokenizer");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = PretrainedTokenizer::from_folder_declared(&dir, Some("XLMRobertaTokenizerFast"))
        .unwrap_err();
    assert!(err.to_string().contains("\"BertTokenizer\""), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn garbage_sentencepiece_model_is_a_bad_file() {
    let dir = spm_copy("garbage");
    std::fs::write(dir.join(SENTENCEPIECE_BPE_FILE), b"\xff\xff not a proto").unwrap();
    match PretrainedTokenizer::from_folder(&dir) {
        Err(Error::BadFile { path, message }) => {
            assert!(path.ends_with(SENTENCEPIECE_BPE_FILE), "{path:?}");
            println!("garbage {SENTENCEPIECE_BPE_FILE}: {message}");
        }
        other => panic!("expected BadFile, got {:?}", other.map(|_| ())),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unknown_class_and_missing_files_are_named() {
    let dir = std::env::temp_dir().join(format!("autopipe-xlmr-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures().join("xlm-roberta");
    std::fs::copy(
        src.join("tokenizer_config.json"),
        dir.join("tokenizer_config.json"),
    )
    .unwrap();
    // Neither tokenizer.json nor the class's SentencePiece model: the model file is named.
    let err = PretrainedTokenizer::from_folder(&dir).unwrap_err();
    assert!(
        matches!(&err, Error::MissingFile { path } if path.ends_with(SENTENCEPIECE_BPE_FILE)),
        "{err}"
    );
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"tokenizer_class": "BertTokenizer", "model_max_length": 512}"#,
    )
    .unwrap();
    let err = PretrainedTokenizer::from_folder(&dir).unwrap_err();
    assert!(err.to_string().contains("\"BertTokenizer\""), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
