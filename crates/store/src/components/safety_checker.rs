//! diffusers' StableDiffusionSafetyChecker (`pipelines/stable_diffusion/safety_checker.py`):
//! `check` takes the feature extractor's `clip_input` ([B, 3, S, S]) and returns
//! `has_nsfw_concepts` ([B] uint8, 1 = flagged). Blacking out flagged images is the pipeline's
//! part: the decoded images never travel to the store.

use super::{model_error, ComponentClass, Method};
use autopipe_models::safety_checker;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// StableDiffusionSafetyChecker: Stable Diffusion 1.x's NSFW filter.
pub(super) struct StableDiffusionSafetyChecker(safety_checker::StableDiffusionSafetyChecker);

// SAFETY: methods only read the model (see `ComponentClass`).
unsafe impl Sync for StableDiffusionSafetyChecker {}

impl ComponentClass for StableDiffusionSafetyChecker {
    const NAME: &'static str = "StableDiffusionSafetyChecker";
    const METHODS: &'static [Method<Self>] = &[Method {
        name: "check",
        required: &["clip_input"],
        optional: &[],
        outputs: &["has_nsfw_concepts"],
        run: |m, inputs| {
            let flags =
                m.0.forward(inputs.with_rank("clip_input", 4)?)
                    .map_err(model_error)?;
            let flags: Vec<u8> = flags.into_iter().map(u8::from).collect();
            Ok(vec![(
                "has_nsfw_concepts".to_string(),
                Tensor::from_slice(&flags),
            )])
        },
    }];

    fn load(
        dir: &Path,
        variant: Option<&str>,
        kind: Kind,
        device: Device,
    ) -> Result<Self, autopipe_models::Error> {
        safety_checker::StableDiffusionSafetyChecker::load(dir, variant, kind, device).map(Self)
    }
}
