//! The T5 tokenizer as transformers 5.24 builds it (`models/t5/tokenization_t5.py`, `T5Tokenizer`):
//! a `tokenizers` Unigram over the SentencePiece pieces plus `<extra_id_N>` sentinels (unk id 2),
//! the model's precompiled normalization, `WhitespaceSplit` + `Metaspace("▁", always)`
//! pre-tokenization and `$A </s>`. The vocabulary comes from `tokenizer.json` when the folder has
//! one, else from `spiece.model` (converted as `T5Converter.convert_from_spm` does); transformers
//! rebuilds the same pipeline from either.

use std::path::Path;

use serde_json::{Map, Value};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use crate::files::{self, bad, CONFIG_FILE, TOKENIZER_FILE};
use crate::sentencepiece::{Piece, UnigramParts};
use crate::{tk_err, Encoded, Result};

/// The SentencePiece model file T5 checkpoints ship.
pub const SPIECE_FILE: &str = "spiece.model";
/// `T5Tokenizer` builds its Unigram with this unknown-token id.
const UNK_ID: usize = 2;

/// transformers' `T5Tokenizer` loaded from a tokenizer folder, for DeepFloyd IF's call
/// `tokenizer(prompt, padding="max_length", max_length=…, truncation=True)`.
#[derive(Clone, Debug)]
pub struct T5Tokenizer {
    /// The pipeline without truncation or padding (for the untruncated ids).
    tokenizer: Tokenizer,
    /// The same pipeline truncating and padding to `max_length`.
    padded: Tokenizer,
    max_length: usize,
    eos_token_id: u32,
    pad_token_id: u32,
}

impl T5Tokenizer {
    /// Loads `dir` (tokenizer.json, else spiece.model; plus tokenizer_config.json when present)
    /// to pad and truncate to `max_length` tokens.
    pub fn from_folder(dir: &Path, max_length: usize) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let config = if config_path.is_file() {
            files::read_json_object(&config_path)?
        } else {
            Map::new()
        };
        let token = |key: &str, default: &str| -> Result<String> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(default.to_string()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => Ok(s.clone()),
                    _ => Err(bad(&config_path, format!("{key} has no content"))),
                },
                Some(v) => Err(bad(&config_path, format!("{key} is not a token: {v}"))),
            }
        };
        let (eos, unk, pad) = (
            token("eos_token", "</s>")?,
            token("unk_token", "<unk>")?,
            token("pad_token", "<pad>")?,
        );
        let extra_ids = match config.get("extra_ids") {
            None | Some(Value::Null) => 100,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| bad(&config_path, format!("extra_ids is not a count: {v}")))?,
        };

        let json_path = dir.join(TOKENIZER_FILE);
        let (mut parts, source) = if json_path.is_file() {
            let json = files::read_json_object(&json_path)?;
            (
                UnigramParts::from_tokenizer_json(&json_path, &json)?,
                json_path,
            )
        } else {
            let spiece = dir.join(SPIECE_FILE);
            let parts =
                UnigramParts::from_sentencepiece(&spiece, |pieces| t5_vocab(pieces, extra_ids))?;
            (parts, spiece)
        };
        let file_added = std::mem::take(&mut parts.added);
        let mut tokenizer = parts.pipeline(UNK_ID, &source)?;
        // Special tokens and sentinels are matched whole on the raw text, as transformers adds them.
        let mut added: Vec<(String, bool)> = [&pad, &eos, &unk]
            .into_iter()
            .map(|t| (t.clone(), true))
            .chain((0..extra_ids).map(|i| (format!("<extra_id_{i}>"), true)))
            .collect();
        added.extend(file_added);
        let (special, plain): (Vec<_>, Vec<_>) = added.into_iter().partition(|(_, s)| *s);
        let as_tokens = |v: Vec<(String, bool)>, special: bool| -> Vec<AddedToken> {
            v.into_iter()
                .map(|(t, _)| AddedToken::from(t, special).normalized(false))
                .collect()
        };
        tokenizer.add_special_tokens(&as_tokens(special, true));
        tokenizer.add_tokens(&as_tokens(plain, false));

        let id_of = |key: &str, t: &str| {
            tokenizer.token_to_id(t).ok_or_else(|| {
                bad(
                    &config_path,
                    format!("{key} {t:?} is not in the vocabulary"),
                )
            })
        };
        let eos_token_id = id_of("eos_token", &eos)?;
        let pad_token_id = id_of("pad_token", &pad)?;
        let template = TemplateProcessing::builder()
            .try_single(format!("$A {eos}"))
            .and_then(|b| b.try_pair(format!("$A {eos} $B {eos}")))
            .map_err(|e| bad(&config_path, e.to_string()))?
            .special_tokens(vec![(eos.clone(), eos_token_id)])
            .build()
            .map_err(|e| bad(&config_path, e.to_string()))?;
        tokenizer.with_post_processor(Some(template));

        let mut padded = tokenizer.clone();
        padded
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(tk_err)?;
        padded.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id: pad_token_id,
            pad_type_id: 0,
            pad_token: pad,
        }));
        Ok(Self {
            tokenizer,
            padded,
            max_length,
            eos_token_id,
            pad_token_id,
        })
    }

    /// Tokenizes one prompt: `max_length` ids (`</s>` appended, padded with the pad id, cut to fit).
    pub fn encode(&self, prompt: &str) -> Result<Encoded> {
        let padded = self.padded.encode(prompt, true).map_err(tk_err)?;
        let untruncated = self.tokenizer.encode(prompt, true).map_err(tk_err)?;
        Encoded::new(&padded, untruncated.get_ids(), self.max_length, |ids| {
            self.tokenizer.decode(ids, true).map_err(tk_err)
        })
    }

    /// The padded length (`max_length`).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// `tokenizer.eos_token_id` (1 for T5).
    pub fn eos_token_id(&self) -> i64 {
        i64::from(self.eos_token_id)
    }

    /// `tokenizer.pad_token_id` (0 for T5).
    pub fn pad_token_id(&self) -> i64 {
        i64::from(self.pad_token_id)
    }

    /// The underlying `tokenizers` pipeline (no truncation or padding).
    pub fn backend(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// `T5Converter.convert_from_spm`'s vocabulary: the pieces, then `<extra_id_{N-1}>` …
/// `<extra_id_0>` (score 0).
fn t5_vocab(pieces: Vec<Piece>, extra_ids: u64) -> Vec<(String, f64)> {
    pieces
        .into_iter()
        .map(|p| (p.piece, p.score))
        .chain(
            (0..extra_ids)
                .rev()
                .map(|i| (format!("<extra_id_{i}>"), 0.0)),
        )
        .collect()
}
