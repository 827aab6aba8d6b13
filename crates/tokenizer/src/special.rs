//! Special and added tokens, resolved the way transformers 5.24 resolves them when diffusers calls
//! `CLIPTokenizer.from_pretrained(folder)` (or another tokenizers-backed class): `PreTrainedTokenizerBase.from_pretrained` (tokenizer_config.json,
//! legacy special_tokens_map.json / tokenizer.json `added_tokens`), the class's `__init__` defaults and
//! `TokenizersBackend.__init__` (which tokens get added to the backend, with which flags).

use std::path::Path;

use serde_json::{Map, Value};
use tokenizers::AddedToken;

use crate::files::bad;
use crate::Result;

/// `SPECIAL_TOKENS_ATTRIBUTES`, in transformers' order (the order tokens are added in).
pub(crate) const SPECIAL_TOKEN_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// `CLIPTokenizer.__init__` defaults for the keys it names.
pub(crate) fn clip_default(key: &str) -> Option<&'static str> {
    match key {
        "bos_token" => Some("<|startoftext|>"),
        "eos_token" | "unk_token" | "pad_token" => Some("<|endoftext|>"),
        _ => None,
    }
}

/// A special-token value as transformers holds it: a plain string or an `AddedToken`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum SpecialValue {
    /// A string (becomes `AddedToken(s, special=True)`, i.e. not normalized, when added).
    Str(String),
    /// An `AddedToken` with its flags.
    Token(AddedToken),
}

impl SpecialValue {
    /// The token's text.
    pub fn content(&self) -> &str {
        match self {
            Self::Str(s) => s,
            Self::Token(t) => &t.content,
        }
    }
}

/// `AddedToken(**dict)` (Python defaults: special=False unless given, normalized = not special).
fn added_token_from_dict(
    path: &Path,
    what: &str,
    map: &Map<String, Value>,
    force_special: bool,
) -> Result<AddedToken> {
    let content = map.get("content").and_then(Value::as_str).ok_or_else(|| {
        bad(
            path,
            format!("{what}: AddedToken without a string \"content\""),
        )
    })?;
    let flag = |name: &str, default: bool| -> Result<bool> {
        match map.get(name) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(bad(
                path,
                format!("{what}: \"{name}\" is not a boolean: {other}"),
            )),
        }
    };
    let special = if force_special {
        true
    } else {
        flag("special", false)?
    };
    Ok(AddedToken {
        content: content.to_owned(),
        single_word: flag("single_word", false)?,
        lstrip: flag("lstrip", false)?,
        rstrip: flag("rstrip", false)?,
        normalized: flag("normalized", !special)?,
        special,
    })
}

/// A special-token entry of tokenizer_config.json / special_tokens_map.json; `None` for JSON null.
fn special_value(
    path: &Path,
    key: &str,
    value: &Value,
    force_special: bool,
) -> Result<Option<SpecialValue>> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(SpecialValue::Str(s.clone()))),
        Value::Object(map) => Ok(Some(SpecialValue::Token(added_token_from_dict(
            path,
            key,
            map,
            force_special,
        )?))),
        other => Err(bad(
            path,
            format!("{key} is neither a string nor an AddedToken: {other}"),
        )),
    }
}

/// Special tokens by key and the tokens added to the backend, with their final flags.
pub(crate) struct SpecialTokens {
    /// `(key, value)` for each of [`SPECIAL_TOKEN_KEYS`] that is set.
    pub named: Vec<(&'static str, SpecialValue)>,
    /// What ends up in the backend's added vocabulary: one entry per content, last flags win.
    pub added: Vec<AddedToken>,
}

impl SpecialTokens {
    /// The named special token's text (`bos_token`, `eos_token`, `pad_token`, …).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.named
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.content())
    }
}

/// Inputs of the resolution, each with the file it came from (for errors).
pub(crate) struct SpecialSources<'a> {
    /// tokenizer_config.json.
    pub config: (&'a Path, &'a Map<String, Value>),
    /// special_tokens_map.json, if present.
    pub special_tokens_map: Option<(&'a Path, &'a Map<String, Value>)>,
    /// tokenizer.json's `added_tokens`, if a tokenizer.json is present.
    pub tokenizer_json_added: Option<(&'a Path, &'a [Value])>,
    /// The tokenizer class's `__init__` default for a special-token key.
    pub class_default: fn(&str) -> Option<&'static str>,
}

/// Resolves named special tokens and the backend's added tokens as transformers 5.24 does.
pub(crate) fn resolve(src: &SpecialSources<'_>) -> Result<SpecialTokens> {
    let (config_path, config) = src.config;

    // from_pretrained: added_tokens_decoder (config) or, legacy, special_tokens_map.json + tokenizer.json.
    let mut decoder: Vec<(u64, AddedToken)> = Vec::new();
    let mut overrides: Vec<(String, Option<SpecialValue>)> = Vec::new();
    if let Some(entries) = config.get("added_tokens_decoder") {
        let entries = entries
            .as_object()
            .ok_or_else(|| bad(config_path, "added_tokens_decoder is not an object"))?;
        for (idx, token) in entries {
            let id = idx.parse::<u64>().map_err(|_| {
                bad(
                    config_path,
                    format!("added_tokens_decoder key {idx:?} is not an id"),
                )
            })?;
            let map = token.as_object().ok_or_else(|| {
                bad(
                    config_path,
                    format!("added_tokens_decoder[{idx}] is not an object"),
                )
            })?;
            decoder.push((
                id,
                added_token_from_dict(config_path, "added_tokens_decoder", map, false)?,
            ));
        }
    } else {
        if let Some((path, map)) = src.special_tokens_map {
            for key in SPECIAL_TOKEN_KEYS {
                if let Some(value) = map.get(key) {
                    overrides.push((key.to_owned(), special_value(path, key, value, true)?));
                }
            }
        }
        if let Some((path, tokens)) = src.tokenizer_json_added {
            for token in tokens {
                let map = token
                    .as_object()
                    .ok_or_else(|| bad(path, format!("added token is not an object: {token}")))?;
                let id = map
                    .get("id")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| bad(path, format!("added token without an id: {token}")))?;
                decoder.retain(|(i, _)| *i != id);
                decoder.push((id, added_token_from_dict(path, "added_tokens", map, false)?));
            }
        }
    }
    decoder.sort_by_key(|(id, _)| *id);

    // Named special tokens: config value, legacy override, the class's default; then mapped onto the
    // decoder's AddedToken of the same content (transformers' `added_tokens_map`).
    let mut named = Vec::new();
    for key in SPECIAL_TOKEN_KEYS {
        let mut value = match config.get(key) {
            Some(v) => special_value(config_path, key, v, false)?,
            None => (src.class_default)(key).map(|s| SpecialValue::Str(s.to_owned())),
        };
        if let Some((_, v)) = overrides.iter().find(|(k, _)| k == key) {
            value = v.clone();
        }
        if let Some(v) = value {
            let mapped = decoder
                .iter()
                .find(|(_, t)| t.content == v.content())
                .map(|(_, t)| t.clone());
            named.push((key, mapped.map_or(v, SpecialValue::Token)));
        }
    }

    // TokenizersBackend.__init__: decoder tokens, then named tokens not yet there (by content, or equal value).
    let decoder_contents: Vec<String> = decoder.iter().map(|(_, t)| t.content.clone()).collect();
    let mut to_add: Vec<SpecialValue> = decoder
        .into_iter()
        .map(|(_, t)| SpecialValue::Token(t))
        .collect();
    for (_, value) in &named {
        if !decoder_contents.iter().any(|c| c == value.content()) && !to_add.contains(value) {
            to_add.push(value.clone());
        }
    }
    let named_contents: Vec<&str> = named.iter().map(|(_, v)| v.content()).collect();
    let mut added: Vec<AddedToken> = Vec::new();
    for value in to_add {
        let token = match value {
            SpecialValue::Str(s) => AddedToken::from(s, true),
            SpecialValue::Token(mut t) => {
                t.special |= named_contents.contains(&t.content.as_str());
                t
            }
        };
        // Adding one content twice keeps the last flags (what the Python backend ends up matching with).
        match added.iter_mut().find(|t| t.content == token.content) {
            Some(existing) => *existing = token,
            None => added.push(token),
        }
    }
    Ok(SpecialTokens { named, added })
}
