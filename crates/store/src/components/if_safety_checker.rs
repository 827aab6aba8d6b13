//! diffusers' IFSafetyChecker (`pipelines/deepfloyd_if/safety_checker.py`): `check` takes the
//! feature extractor's `clip_input` ([B, 3, S, S]) and returns `nsfw_detected` and
//! `watermark_detected` ([B] uint8, 1 = flagged). Blacking out flagged images is the pipeline's part:
//! the images never travel to the store.

use super::{model_error, ComponentClass, Method};
use autopipe_models::if_safety;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// IFSafetyChecker: DeepFloyd IF's NSFW and watermark filter.
pub(super) struct IFSafetyChecker(if_safety::IFSafetyChecker);

// SAFETY: methods only read the model (see `ComponentClass`).
unsafe impl Sync for IFSafetyChecker {}

/// Flags as a uint8 tensor (1 = flagged).
fn flag_tensor(flags: Vec<bool>) -> Tensor {
    let flags: Vec<u8> = flags.into_iter().map(u8::from).collect();
    Tensor::from_slice(&flags)
}

impl ComponentClass for IFSafetyChecker {
    const NAME: &'static str = "IFSafetyChecker";
    const METHODS: &'static [Method<Self>] = &[Method {
        name: "check",
        required: &["clip_input"],
        optional: &[],
        outputs: &["nsfw_detected", "watermark_detected"],
        run: |m, inputs| {
            let scores =
                m.0.forward(inputs.with_rank("clip_input", 4)?)
                    .map_err(model_error)?;
            let (nsfw, watermark) = scores.flags().map_err(model_error)?;
            Ok(vec![
                ("nsfw_detected".to_string(), flag_tensor(nsfw)),
                ("watermark_detected".to_string(), flag_tensor(watermark)),
            ])
        },
    }];

    fn load(
        dir: &Path,
        variant: Option<&str>,
        kind: Kind,
        device: Device,
    ) -> Result<Self, autopipe_models::Error> {
        if_safety::IFSafetyChecker::load(dir, variant, kind, device).map(Self)
    }
}
