//! diffusers' AutoencoderKL (`models/autoencoders/autoencoder_kl.py`): `encode` takes `sample`
//! (images in [-1, 1]) and returns the latent distribution's `mean` and `logvar`; `decode` takes
//! `latents` (already divided by `scaling_factor`) and returns the image `sample`. The model checks
//! shapes and moves inputs to its device and dtype itself.

use super::{model_error, ComponentClass, Method};
use autopipe_models::vae;
use std::path::Path;
use tch::{Device, Kind};

/// AutoencoderKL: the latent-space VAE of SD 1.x/2.x and SDXL.
pub(super) struct AutoencoderKL(vae::AutoencoderKL);

// SAFETY: methods only read the model (see `ComponentClass`).
unsafe impl Sync for AutoencoderKL {}

impl ComponentClass for AutoencoderKL {
    const NAME: &'static str = "AutoencoderKL";
    // Not joined, although both methods work per image (GroupNorm and the mid-block attention
    // never mix images): a joined bfloat16 decode is not the same decode to the last bit (oneDNN
    // picks other kernels for another batch), and a bf16 rounding step in the decoded sample is a
    // pixel level, so the bench's sd1-tiny bf16 images came out at 57.3 dB against their unbatched
    // ones (86 dB in fp32), under the 60 dB batching promises. Joining saved 1.7 of ~120 ms of
    // store time per 10-step image (8 decodes: 6.3 ms each joined, 8.0 alone): not worth it.
    const METHODS: &'static [Method<Self>] = &[
        Method {
            name: "encode",
            required: &["sample"],
            optional: &[],
            outputs: &["mean", "logvar"],
            run: |m, inputs| {
                let dist =
                    m.0.encode(inputs.with_rank("sample", 4)?)
                        .map_err(model_error)?;
                Ok(vec![
                    ("mean".to_string(), dist.mean),
                    ("logvar".to_string(), dist.logvar),
                ])
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
        vae::AutoencoderKL::load(dir, variant, kind, device).map(Self)
    }
}
