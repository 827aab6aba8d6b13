//! diffusers' VQModel (`models/autoencoders/vq_model.py`), Kandinsky's MoVQ: `encode` takes
//! `sample` (images in [-1, 1]) and returns the un-quantized `latents`; `decode` takes `latents` and
//! returns the image `sample` (`force_not_quantize=True`, as the Kandinsky pipelines call it). The
//! model checks shapes and moves inputs to its device and dtype itself.

use super::{model_error, ComponentClass, Method};
use autopipe_models::vq_model;
use std::path::Path;
use tch::{Device, Kind};

/// VQModel: Kandinsky's MoVQ image autoencoder.
pub(super) struct VQModel(vq_model::VQModel);

// SAFETY: methods only read the model (see `ComponentClass`).
unsafe impl Sync for VQModel {}

impl ComponentClass for VQModel {
    const NAME: &'static str = "VQModel";
    const METHODS: &'static [Method<Self>] = &[
        Method {
            name: "encode",
            required: &["sample"],
            optional: &[],
            outputs: &["latents"],
            run: |m, inputs| {
                let latents =
                    m.0.encode(inputs.with_rank("sample", 4)?)
                        .map_err(model_error)?;
                Ok(vec![("latents".to_string(), latents)])
            },
        },
        Method {
            name: "decode",
            required: &["latents"],
            optional: &[],
            outputs: &["sample"],
            run: |m, inputs| {
                let z = inputs.with_rank("latents", 4)?;
                Ok(vec![(
                    "sample".to_string(),
                    m.0.decode(z).map_err(model_error)?,
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
        vq_model::VQModel::load(dir, variant, kind, device).map(Self)
    }
}
