//! Every golden prompt against transformers 5.24's `XLMRobertaTokenizer.from_pretrained` as
//! `KandinskyPipeline._encode_prompt` calls it (goldens by scripts/fixtures/xlm_roberta_tokenizer.py),
//! plus loading errors.

use std::path::{Path, PathBuf};

use autopipe_tokenizer::{Error, PretrainedTokenizer, TokenizerClass};
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

#[test]
fn golden_prompts_match_transformers() {
    let text = std::fs::read_to_string(fixtures().join("xlm_roberta_goldens.json")).unwrap();
    let goldens: Value = serde_json::from_str(&text).unwrap();
    let tok = PretrainedTokenizer::from_folder(&fixtures().join("xlm-roberta")).unwrap();
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
    assert!(prompts.len() >= 30);
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
        "{} of {} prompts differ:\n{}",
        failures.len(),
        prompts.len(),
        failures.join("\n")
    );
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
    let err = PretrainedTokenizer::from_folder(&dir).unwrap_err();
    assert!(
        matches!(&err, Error::MissingFile { path } if path.ends_with("tokenizer.json")),
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
