//! diffusers' `run_safety_checker` (diffusers 0.42.1 `pipelines/stable_diffusion/
//! pipeline_stable_diffusion*.py`, the ControlNet pipelines alike): the decoded images as PIL
//! (`numpy_to_pil` rounding) through the checkpoint's `feature_extractor`, the `safety_checker`
//! component on those pixel values, and every flagged image replaced by a black one
//! (`postprocess` with `do_denormalize=False` on the zeros the checker wrote).

use crate::steps::clip_image_processor::CLIPImageProcessor;
use crate::steps::components::Components;
use crate::steps::image;
use crate::{Context, GenerateParams, PipelineError, Result};
use tch::Tensor;

/// The `model_index.json` slot of the checker.
pub const SAFETY_CHECKER: &str = "safety_checker";
/// The `model_index.json` slot of its image processor.
pub const FEATURE_EXTRACTOR: &str = "feature_extractor";

/// The safety check of one request.
#[derive(Debug)]
pub struct SafetyCheck {
    feature_extractor: CLIPImageProcessor,
}

impl SafetyCheck {
    /// The check a request runs: `None` when the checkpoint names no `safety_checker` (diffusers
    /// then returns `nsfw_content_detected=None`) or the request turned it off.
    pub fn configure(ctx: &Context, params: &GenerateParams) -> Result<Option<Self>> {
        let index = ctx.checkpoint.index();
        if params.skip_safety_checker || index.component_class(SAFETY_CHECKER).is_none() {
            return Ok(None);
        }
        if index.component_class(FEATURE_EXTRACTOR).is_none() {
            return Err(PipelineError::invalid(
                "model",
                format!(
                    "model_index.json names a {SAFETY_CHECKER} but no {FEATURE_EXTRACTOR} (diffusers refuses to load such a pipeline: the checker needs its image processor)"
                ),
            ));
        }
        Ok(Some(Self {
            feature_extractor: CLIPImageProcessor::from_checkpoint(
                ctx.checkpoint,
                FEATURE_EXTRACTOR,
            )?,
        }))
    }

    /// Checks `images_f32` (NHWC in [0, 1], what `postprocess` returns beside `images`), blacks out
    /// the flagged ones in both, and returns the flags.
    pub fn run(
        &self,
        components: &Components,
        images_f32: &mut Tensor,
        images: &mut [crate::GeneratedImage],
    ) -> Result<Vec<bool>> {
        let pil = image::to_pil(images_f32)?;
        let clip_input = self.feature_extractor.preprocess(&pil)?;
        let flags = components
            .safety_checker(SAFETY_CHECKER)
            .check(clip_input)?;
        if flags.len() != images.len() {
            return Err(PipelineError::Internal(format!(
                "the safety checker returned {} flags for {} images",
                flags.len(),
                images.len()
            )));
        }
        for (i, _) in flags.iter().enumerate().filter(|(_, f)| **f) {
            let _ = images_f32.get(i as i64).zero_();
            images[i] = image::png(&::image::RgbImage::new(images[i].width, images[i].height))?;
        }
        Ok(flags)
    }
}
