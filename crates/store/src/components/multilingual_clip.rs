//! diffusers' MultilingualCLIP (`pipelines/kandinsky/text_encoder.py`), Kandinsky 2.1's text
//! encoder: `encode` takes `input_ids` (int64 [B, T]) and `attention_mask` ([B, T], 1 = token) and
//! returns the projected masked-mean `text_embeds` and the `last_hidden_state`.

use super::{model_error, ComponentClass, Inputs, Method};
use crate::StoreError;
use autopipe_models::xlm_roberta;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// MultilingualCLIP: XLM-RoBERTa + `LinearTransformation`.
pub(super) struct MultilingualCLIP(xlm_roberta::MultilingualCLIP);

// SAFETY: methods only read the model (see `ComponentClass`).
unsafe impl Sync for MultilingualCLIP {}

impl ComponentClass for MultilingualCLIP {
    const NAME: &'static str = "MultilingualCLIP";
    const METHODS: &'static [Method<Self>] = &[Method {
        name: "encode",
        required: &["input_ids", "attention_mask"],
        optional: &[],
        outputs: &["text_embeds", "last_hidden_state"],
        run: |m, inputs| {
            let ids = integer(inputs, "input_ids")?;
            let mask = integer(inputs, "attention_mask")?;
            let o = m.0.forward(ids, mask).map_err(model_error)?;
            Ok(vec![
                ("text_embeds".to_string(), o.text_embeds),
                ("last_hidden_state".to_string(), o.last_hidden_state),
            ])
        },
    }];

    fn load(
        dir: &Path,
        variant: Option<&str>,
        kind: Kind,
        device: Device,
    ) -> Result<Self, autopipe_models::Error> {
        xlm_roberta::MultilingualCLIP::load(dir, variant, kind, device).map(Self)
    }
}

/// An int64 `[B, T]` input.
fn integer<'a>(inputs: &Inputs<'a>, name: &str) -> Result<&'a Tensor, StoreError> {
    let t = inputs.with_rank(name, 2)?;
    if t.kind() != Kind::Int64 {
        return Err(inputs.invalid(name, format_args!("needs int64, got {:?}", t.kind())));
    }
    Ok(t)
}
