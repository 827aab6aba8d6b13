//! Reading a CLIP tokenizer folder's files: vocab.json, merges.txt, tokenizer.json, tokenizer_config.json,
//! special_tokens_map.json (formats as transformers reads them in `tokenization_utils_tokenizers.py`).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tokenizers::models::bpe::{Merges, Vocab};

use crate::{Error, Result};

/// `tokenizer.json`: the `tokenizers` serialization.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// `vocab.json`: token → id.
pub const VOCAB_FILE: &str = "vocab.json";
/// `merges.txt`: one BPE merge per line, in rank order.
pub const MERGES_FILE: &str = "merges.txt";
/// `tokenizer_config.json`: model_max_length, special tokens, ….
pub const CONFIG_FILE: &str = "tokenizer_config.json";
/// `special_tokens_map.json`: legacy special tokens (read when the config has no `added_tokens_decoder`).
pub const SPECIAL_TOKENS_MAP_FILE: &str = "special_tokens_map.json";

/// Reads a whole file, naming it in the error.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile {
                path: path.to_path_buf(),
            }
        } else {
            Error::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// Reads a JSON file whose top level must be an object.
pub(crate) fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    let text = read_text(path)?;
    match autopipe_json::parse(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(bad(path, "top level is not a JSON object")),
        Err(source) => Err(Error::Json {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// An [`Error::BadFile`] for `path`.
pub(crate) fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::BadFile {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// A token → id map (vocab.json, or tokenizer.json's `model.vocab`).
pub(crate) fn parse_vocab(path: &Path, value: &Value) -> Result<Vocab> {
    let Value::Object(map) = value else {
        return Err(bad(path, "vocab is not a JSON object of token -> id"));
    };
    map.iter()
        .map(|(token, id)| {
            id.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .map(|id| (token.clone(), id))
                .ok_or_else(|| bad(path, format!("vocab id of {token:?} is not a u32: {id}")))
        })
        .collect()
}

/// vocab.json.
pub(crate) fn read_vocab(path: &Path) -> Result<Vocab> {
    let text = read_text(path)?;
    let value = autopipe_json::parse(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    parse_vocab(path, &value)
}

/// merges.txt as `tokenizers` reads it: a `#version` line is skipped, every other line is "left right".
pub(crate) fn read_merges(path: &Path) -> Result<Merges> {
    let text = read_text(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.starts_with("#version"))
        .map(|(i, line)| match line.split(' ').collect::<Vec<_>>()[..] {
            [left, right] => Ok((left.to_owned(), right.to_owned())),
            _ => Err(bad(
                path,
                format!(
                    "line {}: expected two space-separated symbols, got {line:?}",
                    i + 1
                ),
            )),
        })
        .collect()
}

/// The parts of tokenizer.json that transformers' `CLIPTokenizer` uses: BPE vocab, merges, added tokens.
pub(crate) struct TokenizerJson {
    /// `model.vocab`.
    pub vocab: Vocab,
    /// `model.merges` ("a b" strings or ["a", "b"] pairs).
    pub merges: Merges,
    /// `added_tokens`, each an object with `id`, `content` and the AddedToken flags.
    pub added_tokens: Vec<Value>,
}

/// tokenizer.json: only the BPE model's vocab/merges and the added tokens, as transformers 5 extracts them
/// (`TokenizersBackend.convert_to_native_format`); its normalizer/pre-tokenizer are rebuilt by `CLIPTokenizer`.
pub(crate) fn read_tokenizer_json(path: &Path) -> Result<TokenizerJson> {
    let root = read_json_object(path)?;
    let model = root
        .get("model")
        .and_then(Value::as_object)
        .ok_or_else(|| bad(path, "no \"model\" object"))?;
    match model.get("type").and_then(Value::as_str) {
        Some("BPE") | None => {}
        Some(other) => return Err(bad(path, format!("model type {other:?} is not BPE"))),
    }
    let vocab = parse_vocab(
        path,
        model
            .get("vocab")
            .ok_or_else(|| bad(path, "no model.vocab"))?,
    )?;
    let merges = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(path, "no model.merges array"))?
        .iter()
        .enumerate()
        .map(|(i, merge)| {
            let pair = match merge {
                Value::String(s) => match s.split(' ').collect::<Vec<_>>()[..] {
                    [left, right] => Some((left.to_owned(), right.to_owned())),
                    _ => None,
                },
                Value::Array(parts) => match &parts[..] {
                    [Value::String(left), Value::String(right)] => {
                        Some((left.clone(), right.clone()))
                    }
                    _ => None,
                },
                _ => None,
            };
            pair.ok_or_else(|| bad(path, format!("model.merges[{i}] is not a pair: {merge}")))
        })
        .collect::<Result<Merges>>()?;
    let added_tokens = match root.get("added_tokens") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(tokens)) => tokens.clone(),
        Some(_) => return Err(bad(path, "added_tokens is not an array")),
    };
    Ok(TokenizerJson {
        vocab,
        merges,
        added_tokens,
    })
}

/// The files of one tokenizer folder.
pub(crate) struct FolderFiles {
    /// tokenizer.json, when the folder has one.
    pub tokenizer_json: Option<PathBuf>,
    /// vocab.json.
    pub vocab: PathBuf,
    /// merges.txt.
    pub merges: PathBuf,
    /// tokenizer_config.json.
    pub config: PathBuf,
    /// special_tokens_map.json, when the folder has one.
    pub special_tokens_map: Option<PathBuf>,
}

impl FolderFiles {
    /// Looks at which files `dir` has.
    pub fn locate(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
            });
        }
        let existing = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        Ok(Self {
            tokenizer_json: existing(TOKENIZER_FILE),
            vocab: dir.join(VOCAB_FILE),
            merges: dir.join(MERGES_FILE),
            config: dir.join(CONFIG_FILE),
            special_tokens_map: existing(SPECIAL_TOKENS_MAP_FILE),
        })
    }
}
