//! Reading a SentencePiece `*.model` file (the `ModelProto` of sentencepiece's
//! `sentencepiece_model.proto`) into what a `tokenizers` Unigram pipeline is built from, as
//! transformers 5.24's `SentencePieceExtractor` (`convert_slow_tokenizer.py`) reads it.

use std::path::Path;

use prost::Message;

use crate::files::bad;
use crate::{Error, Result};

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
