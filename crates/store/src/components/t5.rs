//! transformers' T5EncoderModel (`models/t5/modeling_t5.py`, DeepFloyd IF's text encoder):
//! `encode` takes `input_ids` (int64 [B, T]) and optionally `attention_mask` ([B, T], 1 = token)
//! and returns `last_hidden_state`.

use super::{model_error, ComponentClass, Method};
use autopipe_models::t5;
use std::path::Path;
use tch::{Device, Kind};

/// T5EncoderModel: the T5 v1.1 encoder of DeepFloyd IF (both stages).
pub(super) struct T5EncoderModel(t5::T5EncoderModel);

// SAFETY: methods only read the model (see `ComponentClass`).
unsafe impl Sync for T5EncoderModel {}

impl ComponentClass for T5EncoderModel {
    const NAME: &'static str = "T5EncoderModel";
    const METHODS: &'static [Method<Self>] = &[Method {
        name: "encode",
        required: &["input_ids"],
        optional: &["attention_mask"],
        outputs: &["last_hidden_state"],
        run: |m, inputs| {
            let ids = inputs.with_rank("input_ids", 2)?;
            if ids.kind() != Kind::Int64 {
                return Err(inputs.invalid(
                    "input_ids",
                    format_args!("needs int64 token ids, got {:?}", ids.kind()),
                ));
            }
            let mask = match inputs.optional("attention_mask") {
                Some(_) => Some(inputs.with_rank("attention_mask", 2)?),
                None => None,
            };
            let out = m.0.forward(ids, mask).map_err(model_error)?;
            Ok(vec![("last_hidden_state".to_string(), out)])
        },
    }];

    fn load(
        dir: &Path,
        variant: Option<&str>,
        kind: Kind,
        device: Device,
    ) -> Result<Self, autopipe_models::Error> {
        t5::T5EncoderModel::load(dir, variant, kind, device).map(Self)
    }
}
