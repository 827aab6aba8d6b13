//! Tokenizers that transformers 5.24 builds on a `tokenizers` pipeline from a folder's tokenizer.json
//! (`TokenizersBackend` subclasses), chosen by tokenizer_config.json's `tokenizer_class`.
//!
//! Like transformers, each class takes only the model (its vocabulary) and the SentencePiece
//! `Precompiled` normaliser out of tokenizer.json and rebuilds the rest of the pipeline the way its
//! `__init__` does (`TokenizersBackend.convert_to_native_format`); special and added tokens resolve as
//! for CLIP (`special.rs`). Supported classes: `XLMRobertaTokenizer`
//! (transformers/models/xlm_roberta/tokenization_xlm_roberta.py).

use std::path::Path;

use serde_json::{Map, Value};
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::utils::padding::pad_encodings;
use tokenizers::utils::truncation::truncate_encodings;
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, PostProcessor, Tokenizer,
    TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::files::{self, bad};
use crate::{config_side, config_usize, special, tk_err, Encoded, Error, Result};

/// SentencePiece's word-boundary mark.
const METASPACE: char = '\u{2581}';

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
    /// Loads a tokenizer folder: tokenizer.json + tokenizer_config.json (+ special_tokens_map.json).
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let located = files::FolderFiles::locate(dir)?;
        let config = files::read_json_object(&located.config)?;
        let class_name = config
            .get("tokenizer_class")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(&located.config, "no tokenizer_class"))?;
        let class = TokenizerClass::from_name(class_name).ok_or_else(|| {
            bad(
                &located.config,
                format!("tokenizer_class {class_name:?} is not supported"),
            )
        })?;
        let json_path = located
            .tokenizer_json
            .clone()
            .ok_or_else(|| Error::MissingFile {
                path: dir.join(files::TOKENIZER_FILE),
            })?;
        let json = files::read_json_object(&json_path)?;
        let added_tokens = match json.get("added_tokens") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(tokens)) => tokens.clone(),
            Some(_) => return Err(bad(&json_path, "added_tokens is not an array")),
        };
        let special_map = match &located.special_tokens_map {
            Some(path) => Some((path.as_path(), files::read_json_object(path)?)),
            None => None,
        };
        let specials = special::resolve(&special::SpecialSources {
            config: (&located.config, &config),
            special_tokens_map: special_map.as_ref().map(|(p, m)| (*p, m)),
            tokenizer_json_added: Some((&json_path, added_tokens.as_slice())),
            class_default: class.special_defaults(),
        })?;
        let token = |key: &str| -> Result<String> {
            specials
                .get(key)
                .map(str::to_owned)
                .ok_or_else(|| bad(&located.config, format!("{key} is null")))
        };

        let mut tokenizer = match class {
            TokenizerClass::XlmRoberta => xlm_roberta_pipeline(&json_path, &json)?,
        };
        tokenizer.add_tokens(&specials.added);
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

/// `XLMRobertaTokenizer.__init__`: the Unigram vocabulary (`<unk>` at id 3), the Precompiled
/// normaliser when tokenizer.json has one, whitespace split + metaspace (always prepended).
fn xlm_roberta_pipeline(path: &Path, json: &Map<String, Value>) -> Result<Tokenizer> {
    let model = json
        .get("model")
        .and_then(Value::as_object)
        .ok_or_else(|| bad(path, "no \"model\" object"))?;
    match model.get("type").and_then(Value::as_str) {
        Some("Unigram") => {}
        other => return Err(bad(path, format!("model type {other:?} is not Unigram"))),
    }
    let vocab = model
        .get("vocab")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(path, "no model.vocab array"))?
        .iter()
        .enumerate()
        .map(|(i, entry)| match entry.as_array().map(Vec::as_slice) {
            Some([Value::String(piece), score]) if score.is_number() => {
                Ok((piece.clone(), score.as_f64().unwrap_or_default()))
            }
            _ => Err(bad(
                path,
                format!("model.vocab[{i}] is not a [piece, score] pair: {entry}"),
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    let unigram = Unigram::from(vocab, Some(3), false).map_err(|e| bad(path, e.to_string()))?;
    let mut tokenizer = Tokenizer::new(unigram);
    if let Some(normalizer) = precompiled_normalizer(path, json)? {
        tokenizer.with_normalizer(Some(normalizer));
    }
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        WhitespaceSplit.into(),
        Metaspace::new(METASPACE, PrependScheme::Always, true).into(),
    ])));
    tokenizer.with_decoder(Some(MetaspaceDecoder::new(
        METASPACE,
        PrependScheme::Always,
        true,
    )));
    Ok(tokenizer)
}

/// The SentencePiece `Precompiled` normaliser of tokenizer.json (alone or inside a `Sequence`).
fn precompiled_normalizer(
    path: &Path,
    json: &Map<String, Value>,
) -> Result<Option<NormalizerWrapper>> {
    let normalizers = match json.get("normalizer") {
        None | Some(Value::Null) => return Ok(None),
        Some(n) if n.get("type").and_then(Value::as_str) == Some("Sequence") => n
            .get("normalizers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        Some(n) => vec![n.clone()],
    };
    normalizers
        .into_iter()
        .find(|n| {
            n.get("type").and_then(Value::as_str) == Some("Precompiled")
                && n.get("precompiled_charsmap").is_some()
        })
        .map(|n| {
            serde_json::from_value::<NormalizerWrapper>(n)
                .map_err(|e| bad(path, format!("Precompiled normalizer: {e}")))
        })
        .transpose()
}
