//! SentencePiece Unigram tokenizers (T5, XLM-RoBERTa) as transformers 5.24 builds them: reading a
//! `*.model` file (the `ModelProto` of sentencepiece's `sentencepiece_model.proto`, as
//! `SentencePieceExtractor` in `convert_slow_tokenizer.py` reads it) or a tokenizer.json's model into
//! [`UnigramParts`], and the pipeline both classes' `__init__` build on them.

use std::path::Path;

use prost::Message;
use serde_json::{Map, Value};
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::precompiled::Precompiled;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::Tokenizer;

use crate::files::bad;
use crate::{Error, Result};

/// SentencePiece's word-boundary mark.
const METASPACE: char = '\u{2581}';

/// `ModelProto`: only the fields the conversion reads (prost skips the rest).
#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(message, repeated, tag = "1")]
    pieces: Vec<PieceProto>,
    #[prost(message, optional, tag = "2")]
    trainer_spec: Option<TrainerSpec>,
    #[prost(message, optional, tag = "3")]
    normalizer_spec: Option<NormalizerSpec>,
}

/// `ModelProto.SentencePiece`.
#[derive(Clone, PartialEq, Message)]
struct PieceProto {
    #[prost(string, optional, tag = "1")]
    piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    score: Option<f32>,
    #[prost(int32, optional, tag = "3")]
    kind: Option<i32>,
}

/// `TrainerSpec`.
#[derive(Clone, PartialEq, Message)]
struct TrainerSpec {
    #[prost(int32, optional, tag = "3")]
    model_type: Option<i32>,
}

/// `NormalizerSpec`.
#[derive(Clone, PartialEq, Message)]
struct NormalizerSpec {
    #[prost(bytes = "vec", optional, tag = "2")]
    precompiled_charsmap: Option<Vec<u8>>,
}

/// `SentencePiece.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    /// `NORMAL` (1, the default).
    Normal,
    /// `UNKNOWN` (2).
    Unknown,
    /// `CONTROL` (3): special tokens such as `</s>`, matched as added tokens.
    Control,
    /// `USER_DEFINED` (4): always kept whole, not special.
    UserDefined,
    /// `UNUSED` (5) or `BYTE` (6).
    Other,
}

/// One vocabulary entry of a SentencePiece model.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The piece (`▁` marks a word start).
    pub piece: String,
    /// Its log probability.
    pub score: f64,
    /// What kind of piece it is.
    pub kind: PieceType,
}

/// A SentencePiece unigram model: its pieces in id order and its normalization table.
#[derive(Debug, Clone, PartialEq)]
pub struct SentencePieceModel {
    /// The pieces; a piece's index is its id.
    pub pieces: Vec<Piece>,
    /// `normalizer_spec.precompiled_charsmap` (absent for identity normalization).
    pub precompiled_charsmap: Option<Vec<u8>>,
}

impl SentencePieceModel {
    /// Parses `path` (e.g. `tokenizer/spiece.model`); only unigram models are accepted.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| {
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
        })?;
        let proto = ModelProto::decode(bytes.as_slice())
            .map_err(|e| bad(path, format!("not a SentencePiece model: {e}")))?;
        // TrainerSpec.ModelType: UNIGRAM = 1 (the default), BPE = 2, WORD = 3, CHAR = 4.
        let model_type = proto
            .trainer_spec
            .as_ref()
            .and_then(|t| t.model_type)
            .unwrap_or(1);
        if model_type != 1 {
            return Err(bad(
                path,
                format!("model_type {model_type} is not a unigram model (1)"),
            ));
        }
        if proto.pieces.is_empty() {
            return Err(bad(path, "no pieces"));
        }
        let pieces = proto
            .pieces
            .into_iter()
            .map(|p| Piece {
                piece: p.piece.unwrap_or_default(),
                score: f64::from(p.score.unwrap_or(0.0)),
                kind: match p.kind.unwrap_or(1) {
                    1 => PieceType::Normal,
                    2 => PieceType::Unknown,
                    3 => PieceType::Control,
                    4 => PieceType::UserDefined,
                    _ => PieceType::Other,
                },
            })
            .collect();
        Ok(Self {
            pieces,
            precompiled_charsmap: proto
                .normalizer_spec
                .and_then(|n| n.precompiled_charsmap)
                .filter(|c| !c.is_empty()),
        })
    }
}

/// What a Unigram pipeline is built from, whichever file it came from.
pub(crate) struct UnigramParts {
    /// `(piece, score)` in id order.
    pub vocab: Vec<(String, f64)>,
    /// The SentencePiece normalization table, when the model has one.
    pub precompiled_charsmap: Option<Precompiled>,
    /// Tokens matched whole before normalization, `(content, special)`: control pieces (special)
    /// and user-defined pieces (not), as `SentencePieceExtractor` lists them, or tokenizer.json's
    /// `added_tokens`.
    pub added: Vec<(String, bool)>,
}

impl UnigramParts {
    /// The parts of a `*.model` file at `path`, its vocabulary laid out by `vocab` (each class's
    /// converter orders and extends the pieces its own way).
    pub(crate) fn from_sentencepiece(
        path: &Path,
        vocab: impl FnOnce(Vec<Piece>) -> Vec<(String, f64)>,
    ) -> Result<Self> {
        let model = SentencePieceModel::read(path)?;
        let precompiled_charsmap = model
            .precompiled_charsmap
            .as_deref()
            .map(|c| {
                Precompiled::from(c).map_err(|e| bad(path, format!("precompiled_charsmap: {e}")))
            })
            .transpose()?;
        let added = model
            .pieces
            .iter()
            .filter_map(|p| match p.kind {
                PieceType::Control => Some((p.piece.clone(), true)),
                PieceType::UserDefined => Some((p.piece.clone(), false)),
                _ => None,
            })
            .collect();
        Ok(Self {
            vocab: vocab(model.pieces),
            precompiled_charsmap,
            added,
        })
    }

    /// The Unigram vocabulary, the `Precompiled` normalizer (alone or in a `Sequence`) and the added
    /// tokens of the tokenizer.json `json` read from `path`, as `convert_to_native_format` extracts them.
    pub(crate) fn from_tokenizer_json(path: &Path, json: &Map<String, Value>) -> Result<Self> {
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
                Some([Value::String(piece), score]) => score
                    .as_f64()
                    .map(|s| (piece.clone(), s))
                    .ok_or_else(|| bad(path, format!("model.vocab[{i}]: bad score in {entry}"))),
                _ => Err(bad(
                    path,
                    format!("model.vocab[{i}] is not a [piece, score] pair: {entry}"),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        let normalizers = match json.get("normalizer") {
            Some(Value::Object(n)) if n.get("type").and_then(Value::as_str) == Some("Sequence") => {
                n.get("normalizers")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
            }
            Some(n @ Value::Object(_)) => vec![n.clone()],
            _ => Vec::new(),
        };
        let precompiled_charsmap = normalizers
            .into_iter()
            .find(|n| {
                n.get("type").and_then(Value::as_str) == Some("Precompiled")
                    && n.get("precompiled_charsmap").is_some()
            })
            .map(|n| {
                // From text: the base64 charsmap deserializes from a borrowed string only.
                serde_json::from_str::<Precompiled>(&n.to_string())
                    .map_err(|e| bad(path, format!("Precompiled normalizer: {e}")))
            })
            .transpose()?;
        let added = match json.get("added_tokens") {
            Some(Value::Array(tokens)) => tokens
                .iter()
                .filter_map(|t| {
                    let content = t.get("content")?.as_str()?.to_string();
                    let special = t.get("special").and_then(Value::as_bool).unwrap_or(false);
                    Some((content, special))
                })
                .collect(),
            _ => Vec::new(),
        };
        Ok(Self {
            vocab,
            precompiled_charsmap,
            added,
        })
    }

    /// The pipeline `T5Tokenizer.__init__` and `XLMRobertaTokenizer.__init__` build alike: Unigram
    /// (`unk_id`), the precompiled normalizer when there is one, `WhitespaceSplit` +
    /// `Metaspace("▁", always)` and the Metaspace decoder. Added tokens and the post-processor are
    /// the caller's; `source` names the file for errors.
    pub(crate) fn pipeline(self, unk_id: usize, source: &Path) -> Result<Tokenizer> {
        if self.vocab.len() <= unk_id {
            return Err(bad(
                source,
                format!("{} pieces: too few for unk id {unk_id}", self.vocab.len()),
            ));
        }
        let unigram = Unigram::from(self.vocab, Some(unk_id), false)
            .map_err(|e| bad(source, e.to_string()))?;
        let mut tokenizer = Tokenizer::new(unigram);
        if let Some(charsmap) = self.precompiled_charsmap {
            tokenizer.with_normalizer(Some(charsmap));
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
}
