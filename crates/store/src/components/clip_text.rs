//! transformers' CLIPTextModel and CLIPTextModelWithProjection (`models/clip/modeling_clip.py`):
//! `encode` takes `input_ids` (int64 [B, T]) and returns `last_hidden_state`, the pooled output
//! (`pooler_output`, or the projected `text_embeds`) and `penultimate_hidden_state` (SDXL, clip
//! skip).

use super::{model_error, ComponentClass, Inputs, Method};
use crate::{StoreError, Tensors};
use autopipe_models::clip;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// CLIPTextModel: SD 1.x/2.x's text encoder and SDXL's first one.
pub(super) struct CLIPTextModel(clip::CLIPTextModel);

/// CLIPTextModelWithProjection: SDXL's second text encoder.
pub(super) struct CLIPTextModelWithProjection(clip::CLIPTextModelWithProjection);

// SAFETY: methods only read the model (see `ComponentClass`).
unsafe impl Sync for CLIPTextModel {}
unsafe impl Sync for CLIPTextModelWithProjection {}

/// `encode` works per sequence: attention is causal within each row, pooling picks each row's
/// end-of-text position, and every output is per row.
const PER_SEQUENCE: &[&str] = &["encode"];

impl ComponentClass for CLIPTextModel {
    const NAME: &'static str = "CLIPTextModel";
    const BATCHED: &'static [&'static str] = PER_SEQUENCE;
    const METHODS: &'static [Method<Self>] = &[Method {
        name: "encode",
        required: &["input_ids"],
        optional: &[],
        outputs: &[
            "last_hidden_state",
            "pooler_output",
            "penultimate_hidden_state",
        ],
        run: |m, inputs| {
            let o = m.0.forward(token_ids(inputs)?).map_err(model_error)?;
            Ok(encoded(
                o.last_hidden_state,
                ("pooler_output", o.pooler_output),
                &o.hidden_states,
            ))
        },
    }];

    fn load(
        dir: &Path,
        variant: Option<&str>,
        kind: Kind,
        device: Device,
    ) -> Result<Self, autopipe_models::Error> {
        clip::CLIPTextModel::load(dir, variant, kind, device).map(Self)
    }
}

impl ComponentClass for CLIPTextModelWithProjection {
    const NAME: &'static str = "CLIPTextModelWithProjection";
    const BATCHED: &'static [&'static str] = PER_SEQUENCE;
    const METHODS: &'static [Method<Self>] = &[Method {
        name: "encode",
        required: &["input_ids"],
        optional: &[],
        outputs: &[
            "last_hidden_state",
            "text_embeds",
            "penultimate_hidden_state",
        ],
        run: |m, inputs| {
            let o = m.0.forward(token_ids(inputs)?).map_err(model_error)?;
            Ok(encoded(
                o.last_hidden_state,
                ("text_embeds", o.text_embeds),
                &o.hidden_states,
            ))
        },
    }];

    fn load(
        dir: &Path,
        variant: Option<&str>,
        kind: Kind,
        device: Device,
    ) -> Result<Self, autopipe_models::Error> {
        clip::CLIPTextModelWithProjection::load(dir, variant, kind, device).map(Self)
    }
}

/// `input_ids`: int64 token ids of shape [B, T].
fn token_ids<'a>(inputs: &Inputs<'a>) -> Result<&'a Tensor, StoreError> {
    let ids = inputs.with_rank("input_ids", 2)?;
    if ids.kind() != Kind::Int64 {
        return Err(inputs.invalid(
            "input_ids",
            format_args!("needs int64 token ids, got {:?}", ids.kind()),
        ));
    }
    Ok(ids)
}

/// The outputs of `encode`: the penultimate hidden state only when there is one.
fn encoded(last: Tensor, pooled: (&str, Tensor), hidden_states: &[Tensor]) -> Tensors {
    let mut result = vec![
        ("last_hidden_state".to_string(), last),
        (pooled.0.to_string(), pooled.1),
    ];
    if let Some(penultimate) = hidden_states
        .len()
        .checked_sub(2)
        .and_then(|i| hidden_states.get(i))
    {
        result.push((
            "penultimate_hidden_state".to_string(),
            penultimate.shallow_clone(),
        ));
    }
    result
}
