//! autopipe-tokenizer: the CLIP tokenizer exactly as Stable Diffusion pipelines call it, the T5
//! tokenizer of DeepFloyd IF ([`t5`], from `tokenizer.json` or a converted `spiece.model`) and
//! XLM-RoBERTa's (Kandinsky 2.1, [`PretrainedTokenizer`], from `tokenizer.json` or a converted
//! `sentencepiece.bpe.model`).
//!
//! Follows transformers 5.24 `models/clip/tokenization_clip.py` (`CLIPTokenizer`, a `tokenizers` backend:
//! NFC + `\s+`→" " + lowercase, CLIP's split regex + byte-level, BPE with "</w>", BOS/EOS post-processor),
//! the loading rules of `tokenization_utils_base.py` / `tokenization_utils_tokenizers.py`, and diffusers'
//! `StableDiffusionPipeline.encode_prompt` call:
//! `tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)`.
//! No ftfy or HTML unescaping is involved: transformers 5's CLIPTokenizer has no such step.

mod files;
mod pretrained;
pub mod sentencepiece;
mod special;
pub mod t5;

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{
    Lowercase, NormalizerWrapper, Replace, Sequence as NormalizerSequence, NFC,
};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior, Tokenizer,
    TruncationDirection, TruncationParams, TruncationStrategy,
};

pub use files::{CONFIG_FILE, MERGES_FILE, SPECIAL_TOKENS_MAP_FILE, TOKENIZER_FILE, VOCAB_FILE};
pub use pretrained::{PretrainedTokenizer, TokenizerClass, SENTENCEPIECE_BPE_FILE};
pub use t5::{T5Tokenizer, SPIECE_FILE};

/// CLIP's pre-tokenizer split pattern (`CLIPTokenizer.__init__`).
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// BPE end-of-word suffix; the decoder turns it back into a space.
const END_OF_WORD_SUFFIX: &str = "</w>";

/// Errors loading a tokenizer folder or encoding a prompt.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required file (or the folder itself) does not exist.
    #[error("missing tokenizer file {}", path.display())]
    MissingFile {
        /// The missing path.
        path: PathBuf,
    },
    /// A file exists but could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file does not parse.
    #[error("{} is not valid JSON: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A file parses but its content is not what a CLIP tokenizer needs.
    #[error("bad tokenizer file {}: {message}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The `tokenizers` library refused to build or run the pipeline.
    #[error("tokenizer: {0}")]
    Tokenizers(String),
}

/// This crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

fn tk_err(e: tokenizers::Error) -> Error {
    Error::Tokenizers(e.to_string())
}

/// One prompt tokenized as diffusers tokenizes it (CLIP or a [`PretrainedTokenizer`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// BOS, tokens, EOS, padding: exactly `model_max_length` (or the requested max_length) ids.
    pub input_ids: Vec<i64>,
    /// 1 for BOS, tokens and EOS, 0 for padding (`attention_mask`).
    pub attention_mask: Vec<i64>,
    /// Whether the prompt was cut to fit (diffusers logs a warning then).
    pub truncated: bool,
    /// Length of the ids (with BOS/EOS) without truncation or padding.
    pub untruncated_len: usize,
    /// The text that was cut (`tokenizer.batch_decode(untruncated_ids[:, model_max_length - 1 : -1])`), else empty.
    pub removed_text: String,
}

impl Encoded {
    /// The result of one tokenizer call from its `padded` (cut and padded) encoding and the
    /// prompt's `untruncated` ids: flags the cut and decodes what was cut (with `decode`) as
    /// diffusers' truncation warning does, `untruncated_ids[:, model_max_length - 1 : -1]` (the
    /// tokenizer's own length, not the max_length it padded to).
    fn new(
        padded: &tokenizers::Encoding,
        untruncated_ids: &[u32],
        model_max_length: usize,
        decode: impl FnOnce(&[u32]) -> Result<String>,
    ) -> Result<Self> {
        let input_ids: Vec<i64> = padded.get_ids().iter().map(|&id| i64::from(id)).collect();
        // diffusers: untruncated.shape[-1] >= text_input_ids.shape[-1] and not torch.equal(both)
        let truncated = untruncated_ids.len() >= input_ids.len()
            && !untruncated_ids
                .iter()
                .map(|&id| i64::from(id))
                .eq(input_ids.iter().copied());
        let removed_text = if truncated {
            let start = model_max_length
                .saturating_sub(1)
                .min(untruncated_ids.len());
            let end = untruncated_ids.len().saturating_sub(1).max(start);
            decode(&untruncated_ids[start..end])?
        } else {
            String::new()
        };
        Ok(Self {
            attention_mask: padded
                .get_attention_mask()
                .iter()
                .map(|&m| i64::from(m))
                .collect(),
            input_ids,
            truncated,
            untruncated_len: untruncated_ids.len(),
            removed_text,
        })
    }
}

/// transformers' `CLIPTokenizer` loaded from a tokenizer folder, configured for diffusers' call.
#[derive(Clone, Debug)]
pub struct ClipTokenizer {
    /// The pipeline without truncation/padding (for the untruncated ids).
    tokenizer: Tokenizer,
    /// The same pipeline truncating and padding to `model_max_length`.
    padded: Tokenizer,
    model_max_length: usize,
    bos_token_id: u32,
    eos_token_id: u32,
    pad_token_id: u32,
}

impl ClipTokenizer {
    /// Loads a tokenizer folder: tokenizer.json when present, else vocab.json + merges.txt; plus tokenizer_config.json.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let located = files::FolderFiles::locate(dir)?;
        let config = files::read_json_object(&located.config)?;
        let special_map = match &located.special_tokens_map {
            Some(path) => Some((path.as_path(), files::read_json_object(path)?)),
            None => None,
        };
        let (vocab, merges, model_file, json_added) = match &located.tokenizer_json {
            Some(path) => {
                let json = files::read_tokenizer_json(path)?;
                (
                    json.vocab,
                    json.merges,
                    path.clone(),
                    Some((path.as_path(), json.added_tokens)),
                )
            }
            None => {
                if !located.vocab.is_file() {
                    return Err(Error::MissingFile {
                        path: located.vocab,
                    });
                }
                let vocab = files::read_vocab(&located.vocab)?;
                let merges = files::read_merges(&located.merges)?;
                (vocab, merges, located.merges.clone(), None)
            }
        };
        let specials = special::resolve(&special::SpecialSources {
            config: (&located.config, &config),
            special_tokens_map: special_map.as_ref().map(|(p, m)| (*p, m)),
            tokenizer_json_added: json_added.as_ref().map(|(p, t)| (*p, t.as_slice())),
            class_default: special::clip_default,
        })?;

        let model_max_length = config_usize(&located.config, &config, "model_max_length")?
            .ok_or_else(|| files::bad(&located.config, "no model_max_length"))?;
        let token = |key: &str| -> Result<String> {
            specials
                .get(key)
                .map(str::to_owned)
                .ok_or_else(|| files::bad(&located.config, format!("{key} is null")))
        };
        let (bos, eos, unk, pad) = (
            token("bos_token")?,
            token("eos_token")?,
            token("unk_token")?,
            token("pad_token")?,
        );

        let mut tokenizer = build_pipeline(vocab, merges, &unk).map_err(|e| match e {
            Error::Tokenizers(message) => files::bad(&model_file, message),
            other => other,
        })?;
        tokenizer.add_tokens(&specials.added);
        let id_of = |key: &str, token: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                files::bad(
                    &located.config,
                    format!("{key} {token:?} is not in the vocabulary"),
                )
            })
        };
        let bos_token_id = id_of("bos_token", &bos)?;
        let eos_token_id = id_of("eos_token", &eos)?;
        let pad_token_id = id_of("pad_token", &pad)?;
        tokenizer.with_post_processor(Some(
            RobertaProcessing::new((eos, eos_token_id), (bos, bos_token_id))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));

        let mut padded = tokenizer.clone();
        let truncation_right = config_side(&located.config, &config, "truncation_side")?;
        let padding_right = config_side(&located.config, &config, "padding_side")?;
        padded
            .with_truncation(Some(TruncationParams {
                direction: if truncation_right {
                    TruncationDirection::Right
                } else {
                    TruncationDirection::Left
                },
                max_length: model_max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(tk_err)?;
        padded.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(model_max_length),
            direction: if padding_right {
                PaddingDirection::Right
            } else {
                PaddingDirection::Left
            },
            pad_to_multiple_of: None,
            pad_id: pad_token_id,
            pad_type_id: 0,
            pad_token: pad,
        }));
        Ok(Self {
            tokenizer,
            padded,
            model_max_length,
            bos_token_id,
            eos_token_id,
            pad_token_id,
        })
    }

    /// Tokenizes one prompt as diffusers' `encode_prompt` does (pad/truncate to `model_max_length`).
    pub fn encode(&self, prompt: &str) -> Result<Encoded> {
        let padded = self.padded.encode(prompt, true).map_err(tk_err)?;
        let untruncated = self.tokenizer.encode(prompt, true).map_err(tk_err)?;
        Encoded::new(
            &padded,
            untruncated.get_ids(),
            self.model_max_length,
            |ids| self.decode(ids),
        )
    }

    /// Decodes ids as transformers' CLIPTokenizer does ("</w>" → " ", then stripped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = self.tokenizer.decode(ids, false).map_err(tk_err)?;
        Ok(python_strip(&text.replace(END_OF_WORD_SUFFIX, " ")).to_owned())
    }

    /// `tokenizer.model_max_length` (77 for SD's CLIP).
    pub fn model_max_length(&self) -> usize {
        self.model_max_length
    }

    /// `tokenizer.pad_token_id` (49407 for SD 1.x, 0 = "!" for SD 2.x).
    pub fn pad_token_id(&self) -> i64 {
        i64::from(self.pad_token_id)
    }

    /// `tokenizer.eos_token_id` (49407).
    pub fn eos_token_id(&self) -> i64 {
        i64::from(self.eos_token_id)
    }

    /// `tokenizer.bos_token_id` (49406).
    pub fn bos_token_id(&self) -> i64 {
        i64::from(self.bos_token_id)
    }

    /// The underlying `tokenizers` pipeline (no truncation or padding).
    pub fn backend(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// The `tokenizers` pipeline `CLIPTokenizer.__init__` builds (post-processor added by the caller).
fn build_pipeline(vocab: Vocab, merges: Merges, unk: &str) -> Result<Tokenizer> {
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(END_OF_WORD_SUFFIX.to_owned())
        .fuse_unk(false)
        .unk_token(unk.to_owned())
        .build()
        .map_err(tk_err)?;
    let mut tokenizer = Tokenizer::new(bpe);
    let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".to_owned()), " ").map_err(tk_err)?;
    tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![
        NormalizerWrapper::NFC(NFC),
        NormalizerWrapper::Replace(whitespace),
        NormalizerWrapper::Lowercase(Lowercase),
    ])));
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT_PATTERN.to_owned()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(tk_err)?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}

/// An optional non-negative integer entry of tokenizer_config.json.
fn config_usize(
    path: &Path,
    config: &serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<usize>> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| files::bad(path, format!("{key} is not a non-negative integer: {v}"))),
    }
}

/// `truncation_side` / `padding_side`: true for "right" (the default), false for "left".
fn config_side(path: &Path, config: &serde_json::Map<String, Value>, key: &str) -> Result<bool> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(true),
        Some(Value::String(s)) if s == "right" => Ok(true),
        Some(Value::String(s)) if s == "left" => Ok(false),
        Some(v) => Err(files::bad(
            path,
            format!("{key} is neither \"left\" nor \"right\": {v}"),
        )),
    }
}

/// Python's `str.strip()`: Unicode White_Space plus the separators \x1c-\x1f that Python counts as space.
fn python_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

#[cfg(test)]
mod tests {
    use super::python_strip;

    #[test]
    fn strip_matches_python() {
        assert_eq!(python_strip(" \u{1f}a b\u{a0}\n"), "a b");
        assert_eq!(python_strip("\u{200b}x"), "\u{200b}x");
    }
}
