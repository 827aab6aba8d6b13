//! transformers' CLIPVisionModelWithProjection (`models/clip/modeling_clip.py`): `encode` takes
//! preprocessed `pixel_values` ([B, C, S, S]) and returns the projected `image_embeds` and the
//! encoder's `last_hidden_state`.

use super::{model_error, ComponentClass, Method};
use autopipe_models::clip;
use std::path::Path;
use tch::{Device, Kind};

/// CLIPVisionModelWithProjection: the Kandinsky prior's image encoder.
pub(super) struct CLIPVisionModelWithProjection(clip::CLIPVisionModelWithProjection);

// SAFETY: methods only read the model (see `ComponentClass`).
unsafe impl Sync for CLIPVisionModelWithProjection {}

impl ComponentClass for CLIPVisionModelWithProjection {
    const NAME: &'static str = "CLIPVisionModelWithProjection";
    const METHODS: &'static [Method<Self>] = &[Method {
        name: "encode",
        required: &["pixel_values"],
        optional: &[],
        outputs: &["image_embeds", "last_hidden_state"],
        run: |m, inputs| {
            let out =
                m.0.forward(inputs.with_rank("pixel_values", 4)?)
                    .map_err(model_error)?;
            Ok(vec![
                ("image_embeds".to_string(), out.image_embeds),
                ("last_hidden_state".to_string(), out.last_hidden_state),
            ])
        },
    }];

    fn load(
        dir: &Path,
        variant: Option<&str>,
        kind: Kind,
        device: Device,
    ) -> Result<Self, autopipe_models::Error> {
        clip::CLIPVisionModelWithProjection::load(dir, variant, kind, device).map(Self)
    }
}
