//! diffusers' PriorTransformer (`models/transformers/prior_transformer.py`): `forward` takes the
//! noisy image embedding `hidden_states` [B, D], `timestep`, the text encoder's `proj_embedding`
//! [B, D], `encoder_hidden_states` [B, T, D] and the tokens' `attention_mask` (uint8 [B, T], 1 =
//! token) and returns `predicted_image_embedding`; `post_process_latents` un-normalises the final
//! `latents` with the prior's `clip_std` / `clip_mean`.

use super::{float_input, model_error, ComponentClass, Method};
use autopipe_models::prior_transformer;
use std::path::Path;
use tch::{Device, Kind};

/// PriorTransformer: the unCLIP / Kandinsky prior.
pub(super) struct PriorTransformer(prior_transformer::PriorTransformer);

// SAFETY: methods only read the model (see `ComponentClass`).
unsafe impl Sync for PriorTransformer {}

impl ComponentClass for PriorTransformer {
    const NAME: &'static str = "PriorTransformer";
    const METHODS: &'static [Method<Self>] = &[
        Method {
            name: "forward",
            required: &["hidden_states", "timestep", "proj_embedding"],
            optional: &["encoder_hidden_states", "attention_mask"],
            outputs: &["predicted_image_embedding"],
            run: |m, inputs| {
                let (kind, device) = (m.0.kind(), m.0.device());
                let hidden = inputs.with_rank("hidden_states", 2)?;
                let proj = inputs.with_rank("proj_embedding", 2)?;
                let timestep = inputs.required("timestep")?;
                if timestep.dim() > 1 {
                    return Err(inputs.invalid(
                        "timestep",
                        format_args!("needs a scalar or [batch], got shape {:?}", timestep.size()),
                    ));
                }
                let ehs = match inputs.optional("encoder_hidden_states") {
                    Some(_) => Some(float_input(
                        inputs.with_rank("encoder_hidden_states", 3)?,
                        kind,
                        device,
                    )),
                    None => None,
                };
                let mask = match inputs.optional("attention_mask") {
                    Some(_) => Some(inputs.with_rank("attention_mask", 2)?),
                    None => None,
                };
                let out =
                    m.0.forward(
                        &float_input(hidden, kind, device),
                        timestep,
                        &float_input(proj, kind, device),
                        ehs.as_ref(),
                        mask,
                    )
                    .map_err(model_error)?;
                Ok(vec![("predicted_image_embedding".to_string(), out)])
            },
        },
        Method {
            name: "post_process_latents",
            required: &["latents"],
            optional: &[],
            outputs: &["latents"],
            run: |m, inputs| {
                let latents = inputs.with_rank("latents", 2)?;
                Ok(vec![(
                    "latents".to_string(),
                    m.0.post_process_latents(latents),
                )])
            },
        },
    ];

    fn load(
        dir: &Path,
        variant: Option<&str>,
        kind: Kind,
        device: Device,
    ) -> Result<Self, autopipe_models::Error> {
        prior_transformer::PriorTransformer::load(dir, variant, kind, device).map(Self)
    }
}
