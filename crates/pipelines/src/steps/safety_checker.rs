//! diffusers' `run_safety_checker` (diffusers 0.42.1 `pipelines/stable_diffusion/
//! pipeline_stable_diffusion*.py`, the ControlNet pipelines alike, and `pipelines/deepfloyd_if/
//! pipeline_if*.py`): the decoded images as PIL (`numpy_to_pil` rounding) through the checkpoint's
//! `feature_extractor`, the `safety_checker` component on those pixel values, and every flagged image
//! replaced by a black one (Stable Diffusion: `postprocess` with `do_denormalize=False` on the zeros
//! the checker wrote; DeepFloyd IF: the zeros its checker writes for an NSFW or a watermark hit).

use crate::steps::clip_image_processor::CLIPImageProcessor;
use crate::steps::components::{Components, SafetyFlags};
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
    /// the flagged ones (NSFW or, for DeepFloyd IF's checker, watermarked) in both, and returns the
    /// flags.
    pub fn run(
        &self,
        components: &Components,
        images_f32: &mut Tensor,
        images: &mut [crate::GeneratedImage],
    ) -> Result<SafetyFlags> {
        let pil = image::to_pil(images_f32)?;
        let clip_input = self.feature_extractor.preprocess(&pil)?;
        let flags = components
            .safety_checker(SAFETY_CHECKER)
            .check(clip_input)?;
        let counts = [Some(&flags.nsfw), flags.watermark.as_ref()];
        if let Some(n) = counts
            .iter()
            .flatten()
            .map(|f| f.len())
            .find(|n| *n != images.len())
        {
            return Err(PipelineError::Internal(format!(
                "the safety checker returned {n} flags for {} images",
                images.len()
            )));
        }
        for i in 0..images.len() {
            let watermarked = flags.watermark.as_ref().is_some_and(|w| w[i]);
            if flags.nsfw[i] || watermarked {
                let _ = images_f32.get(i as i64).zero_();
                images[i] = image::png(&::image::RgbImage::new(images[i].width, images[i].height))?;
            }
        }
        Ok(flags)
    }
}
