//! Tokenizers that transformers 5.24 builds on a `tokenizers` pipeline (`TokenizersBackend`
//! subclasses), chosen by tokenizer_config.json's `tokenizer_class` (else the class the checkpoint's
//! model_index.json names), from a folder's tokenizer.json or, without one, the class's SentencePiece
//! model file.
//!
//! Like transformers, each class takes only the model (its vocabulary) and the SentencePiece
//! `Precompiled` normaliser out of tokenizer.json and rebuilds the rest of the pipeline the way its
//! `__init__` does (`TokenizersBackend.convert_to_native_format`); from a `.model` file the class's
//! converter lays the vocabulary out (`convert_from_spm` in `convert_slow_tokenizer.py`). Special and
//! added tokens resolve as for CLIP (`special.rs`). Supported classes: `XLMRobertaTokenizer`
//! (transformers/models/xlm_roberta/tokenization_xlm_roberta.py).

use std::path::Path;

use serde_json::Value;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::utils::padding::pad_encodings;
use tokenizers::utils::truncation::truncate_encodings;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, PostProcessor, Tokenizer,
    TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::files::{self, bad};
use crate::sentencepiece::{Piece, UnigramParts};
use crate::{config_side, config_usize, special, tk_err, Encoded, Error, Result};

/// The SentencePiece model file XLM-RoBERTa checkpoints ship (`VOCAB_FILES_NAMES["vocab_file"]`).
pub const SENTENCEPIECE_BPE_FILE: &str = "sentencepiece.bpe.model";
/// `XLMRobertaTokenizer` builds its Unigram with this unknown-token id (fairseq's `<unk>`).
const XLM_ROBERTA_UNK_ID: usize = 3;

/// The tokenizer classes this crate rebuilds (tokenizer_config.json `tokenizer_class`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerClass {
    /// `XLMRobertaTokenizer` (also named `XLMRobertaTokenizerFast` by older checkpoints).
    XlmRoberta,
}

impl TokenizerClass {
    /// The class a `tokenizer_class` name stands for in transformers 5 (fast and slow names alike).
    pub fn from_name(name: &str) -> Option<Self> {
        match name.strip_suffix("Fast").unwrap_or(name) {
            "XLMRobertaTokenizer" => Some(Self::XlmRoberta),
            _ => None,
        }
    }

    /// The SentencePiece model file the class converts when the folder has no tokenizer.json.
    pub fn sentencepiece_file(self) -> &'static str {
        match self {
            Self::XlmRoberta => SENTENCEPIECE_BPE_FILE,
        }
    }

    /// The class's `__init__` defaults for the special-token keys.
    fn special_defaults(self) -> fn(&str) -> Option<&'static str> {
        match self {
            Self::XlmRoberta => |key| match key {
                "bos_token" | "cls_token" => Some("<s>"),
                "eos_token" | "sep_token" => Some("</s>"),
                "unk_token" => Some("<unk>"),
                "pad_token" => Some("<pad>"),
                "mask_token" => Some("<mask>"),
                _ => None,
            },
        }
    }
}

/// A tokenizers-backed transformers tokenizer loaded from a folder, encoding as pipelines call it:
/// `tokenizer(text, padding="max_length", max_length=N, truncation=True)`.
#[derive(Clone, Debug)]
pub struct PretrainedTokenizer {
    class: TokenizerClass,
    /// The pipeline with its post-processor and no truncation or padding.
    tokenizer: Tokenizer,
    model_max_length: usize,
    truncation_direction: TruncationDirection,
    padding_direction: PaddingDirection,
    pad_token: String,
    pad_token_id: u32,
}

impl PretrainedTokenizer {
    /// Loads a tokenizer folder whose tokenizer_config.json names its `tokenizer_class`.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        Self::from_folder_declared(dir, None)
    }

    /// Loads a tokenizer folder: tokenizer.json, else the class's SentencePiece model file; plus
    /// tokenizer_config.json (+ special_tokens_map.json). The class is tokenizer_config.json's
    /// `tokenizer_class`, else `declared_class` (what model_index.json names for the component).
    pub fn from_folder_declared(dir: &Path, declared_class: Option<&str>) -> Result<Self> {
        let located = files::FolderFiles::locate(dir)?;
        let config = files::read_json_object(&located.config)?;
        let class_name = match config.get("tokenizer_class") {
            Some(Value::String(name)) => name.as_str(),
            None | Some(Value::Null) => declared_class.ok_or_else(|| {
                bad(
                    &located.config,
                    "no tokenizer_class, and the checkpoint declares no tokenizer class",
                )
            })?,
            Some(v) => {
                return Err(bad(
                    &located.config,
                    format!("tokenizer_class is not a string: {v}"),
                ))
            }
        };
        let class = TokenizerClass::from_name(class_name).ok_or_else(|| {
            bad(
                &located.config,
                format!("tokenizer_class {class_name:?} is not supported"),
            )
        })?;
        let json = match &located.tokenizer_json {
            Some(path) => Some((path.as_path(), files::read_json_object(path)?)),
            None => None,
        };
        let added_tokens = match &json {
            None => Vec::new(),
            Some((path, json)) => match json.get("added_tokens") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(tokens)) => tokens.clone(),
                Some(_) => return Err(bad(path, "added_tokens is not an array")),
            },
        };
        let special_map = match &located.special_tokens_map {
            Some(path) => Some((path.as_path(), files::read_json_object(path)?)),
            None => None,
        };
        let specials = special::resolve(&special::SpecialSources {
            config: (&located.config, &config),
            special_tokens_map: special_map.as_ref().map(|(p, m)| (*p, m)),
            tokenizer_json_added: json
                .as_ref()
                .map(|(path, _)| (*path, added_tokens.as_slice())),
            class_default: class.special_defaults(),
        })?;
        let token = |key: &str| -> Result<String> {
            specials
                .get(key)
                .map(str::to_owned)
                .ok_or_else(|| bad(&located.config, format!("{key} is null")))
        };

        // tokenizer.json's added tokens are resolved with the specials; a .model file's control and
        // user-defined pieces are added after them, as `SentencePieceExtractor` passes them on.
        let (parts, source, file_added) = match &json {
            Some((path, json)) => (
                UnigramParts::from_tokenizer_json(path, json)?,
                path.to_path_buf(),
                Vec::new(),
            ),
            None => {
                let path = dir.join(class.sentencepiece_file());
                let mut parts = match class {
                    TokenizerClass::XlmRoberta => {
                        let name = |key: &str| {
                            specials
                                .get(key)
                                .or_else(|| (class.special_defaults())(key))
                                .unwrap_or_default()
                        };
                        let names = [
                            name("bos_token"),
                            name("pad_token"),
                            name("eos_token"),
                            name("unk_token"),
                            name("mask_token"),
                        ];
                        UnigramParts::from_sentencepiece(&path, |pieces| {
                            xlm_roberta_vocab(pieces, names)
                        })?
                    }
                };
                let added = std::mem::take(&mut parts.added);
                (parts, path, added)
            }
        };
        let unk_id = match class {
            TokenizerClass::XlmRoberta => XLM_ROBERTA_UNK_ID,
        };
        let mut tokenizer = parts.pipeline(unk_id, &source)?;
        tokenizer.add_tokens(&specials.added);
        let (special_pieces, plain_pieces): (Vec<_>, Vec<_>) = file_added
            .into_iter()
            .filter(|(content, _)| !specials.added.iter().any(|t| &t.content == content))
            .partition(|(_, special)| *special);
        let as_tokens = |pieces: Vec<(String, bool)>, special: bool| -> Vec<AddedToken> {
            pieces
                .into_iter()
                .map(|(t, _)| AddedToken::from(t, special).normalized(false))
                .collect()
        };
        tokenizer.add_special_tokens(&as_tokens(special_pieces, true));
        tokenizer.add_tokens(&as_tokens(plain_pieces, false));
        let id_of = |key: &str, token: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                bad(
                    &located.config,
                    format!("{key} {token:?} is not in the vocabulary"),
                )
            })
        };
        let (bos, eos, pad) = (
            token("bos_token")?,
            token("eos_token")?,
            token("pad_token")?,
        );
        let bos_id = id_of("bos_token", &bos)?;
        let eos_id = id_of("eos_token", &eos)?;
        let pad_token_id = id_of("pad_token", &pad)?;
        match class {
            TokenizerClass::XlmRoberta => {
                let processor = TemplateProcessing::builder()
                    .try_single(format!("{bos} $A {eos}"))
                    .and_then(|b| b.try_pair(format!("{bos} $A {eos} {eos} $B {eos}")))
                    .map_err(|e| bad(&located.config, e))?
                    .special_tokens(vec![(bos, bos_id), (eos, eos_id)])
                    .build()
                    .map_err(|e| bad(&located.config, e.to_string()))?;
                tokenizer.with_post_processor(Some(processor));
            }
        }
        let model_max_length = config_usize(&located.config, &config, "model_max_length")?
            .ok_or_else(|| bad(&located.config, "no model_max_length"))?;
        let side = |key| -> Result<bool> { config_side(&located.config, &config, key) };
        Ok(Self {
            class,
            tokenizer,
            model_max_length,
            truncation_direction: if side("truncation_side")? {
                TruncationDirection::Right
            } else {
                TruncationDirection::Left
            },
            padding_direction: if side("padding_side")? {
                PaddingDirection::Right
            } else {
                PaddingDirection::Left
            },
            pad_token: pad,
            pad_token_id,
        })
    }

    /// Tokenizes `text` truncated and padded to `max_length` ids (special tokens included), as
    /// `tokenizer(text, padding="max_length", max_length=max_length, truncation=True)`; the
    /// truncation report compares against the untruncated ids as diffusers does.
    pub fn encode(&self, text: &str, max_length: usize) -> Result<Encoded> {
        let raw = self.tokenizer.encode(text, false).map_err(tk_err)?;
        let processor = self
            .tokenizer
            .get_post_processor()
            .expect("every class sets a post-processor");
        let special = processor.added_tokens(false);
        if max_length < special {
            return Err(Error::Tokenizers(format!(
                "max_length {max_length} leaves no room for the {special} special tokens"
            )));
        }
        let untruncated = processor.process(raw.clone(), None, true).map_err(tk_err)?;
        let (cut, _) = truncate_encodings(
            raw,
            None,
            &TruncationParams {
                direction: self.truncation_direction,
                max_length: max_length - special,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            },
        )
        .map_err(tk_err)?;
        let mut padded = [processor.process(cut, None, true).map_err(tk_err)?];
        pad_encodings(
            &mut padded,
            &PaddingParams {
                strategy: PaddingStrategy::Fixed(max_length),
                direction: self.padding_direction,
                pad_to_multiple_of: None,
                pad_id: self.pad_token_id,
                pad_type_id: 0,
                pad_token: self.pad_token.clone(),
            },
        )
        .map_err(tk_err)?;
        let [padded] = padded;
        Encoded::new(
            &padded,
            untruncated.get_ids(),
            self.model_max_length,
            |ids| self.decode(ids),
        )
    }

    /// Decodes ids with the class's decoder, special tokens kept.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, false).map_err(tk_err)
    }

    /// The tokenizer class.
    pub fn class(&self) -> TokenizerClass {
        self.class
    }

    /// `tokenizer.model_max_length` (512 for Kandinsky 2.1's XLM-R).
    pub fn model_max_length(&self) -> usize {
        self.model_max_length
    }

    /// `tokenizer.pad_token_id`.
    pub fn pad_token_id(&self) -> i64 {
        i64::from(self.pad_token_id)
    }
}

/// `XLMRobertaConverter.convert_from_spm`'s vocabulary: fairseq's four specials first (named as
/// the tokenizer's own `<s>`, `<pad>`, `</s>`, `<unk>`), the pieces after SentencePiece's own three
/// (`<unk>`, `<s>`, `</s>`) shifted up by one, `<mask>` last.
fn xlm_roberta_vocab(pieces: Vec<Piece>, specials: [&str; 5]) -> Vec<(String, f64)> {
    let [bos, pad, eos, unk, mask] = specials;
    [bos, pad, eos, unk]
        .into_iter()
        .map(|t| (t.to_owned(), 0.0))
        .chain(pieces.into_iter().skip(3).map(|p| (p.piece, p.score)))
        .chain([(mask.to_owned(), 0.0)])
        .collect()
}
