//! DeepFloyd IF's safety modules (diffusers 0.42.1 `pipelines/deepfloyd_if/safety_checker.py` and
//! `watermark.py`): `IFSafetyChecker`, a CLIP vision tower with projection whose image embeddings
//! feed two one-logit heads (NSFW `p_head`, watermark `w_head`), each thresholded at 0.5; and
//! `IFWatermarker`, which only holds the 62x62 RGBA `watermark_image` the pipelines paste.

use crate::layers::Linear;
use std::path::Path;

use serde::Deserialize;
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

use crate::clip::{vision_rename, CLIPVisionConfig, CLIPVisionModelWithProjection};
use crate::error::Result;
use crate::weights;

/// `IFSafetyChecker.forward`'s default `p_threshold`.
pub const P_THRESHOLD: f64 = 0.5;
/// `IFSafetyChecker.forward`'s default `w_threshold`.
pub const W_THRESHOLD: f64 = 0.5;
/// The side of `IFWatermarker.watermark_image` (`torch.zeros((62, 62, 4))`).
pub const WATERMARK_SIDE: i64 = 62;

/// `safety_checker/config.json`: transformers' `CLIPConfig`, of which the checker reads the vision
/// tower (its own `projection_dim` sizes the heads).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct IFSafetyCheckerConfig {
    pub vision_config: CLIPVisionConfig,
}

/// What the checker computes for a batch.
#[derive(Debug)]
pub struct IFSafetyScores {
    /// The projected image embeddings, `[batch, projection_dim]`.
    pub image_embeds: Tensor,
    /// `p_head(image_embeds).flatten()`, `[batch]`.
    pub nsfw: Tensor,
    /// `w_head(image_embeds).flatten()`, `[batch]`.
    pub watermark: Tensor,
}

impl IFSafetyScores {
    /// diffusers' per-image `(nsfw_detected, watermark_detected)`: each score above its threshold,
    /// compared in the model's dtype as diffusers does.
    pub fn flags(&self) -> Result<(Vec<bool>, Vec<bool>)> {
        let above = |t: &Tensor, threshold: f64| -> Result<Vec<bool>> {
            Ok(Vec::<bool>::try_from(
                t.gt(threshold).to_device(Device::Cpu),
            )?)
        };
        Ok((
            above(&self.nsfw, P_THRESHOLD)?,
            above(&self.watermark, W_THRESHOLD)?,
        ))
    }
}

/// `IFSafetyChecker`: which images look NSFW and which look watermarked.
#[derive(Debug)]
pub struct IFSafetyChecker {
    vision_model: CLIPVisionModelWithProjection,
    p_head: Linear,
    w_head: Linear,
    _vs: Option<VarStore>,
}

// SAFETY: as for the CLIP models, only read-only tensors.
unsafe impl Sync for IFSafetyChecker {}

/// The checker nests a whole `CLIPVisionModelWithProjection` under `vision_model`
/// (`vision_model.vision_model.embeddings…`, `vision_model.visual_projection.weight`), as every
/// transformers version saves it; a flat export of the tower (`vision_model.embeddings…`) is read
/// into the same place.
fn rename(key: &str) -> String {
    let key = vision_rename(key);
    match key.strip_prefix("vision_model.") {
        Some(rest)
            if !rest.starts_with("vision_model.") && !rest.starts_with("visual_projection.") =>
        {
            format!("vision_model.vision_model.{rest}")
        }
        _ => key,
    }
}

impl IFSafetyChecker {
    /// Declares the parameters under `vs` with the checkpoint's key paths.
    pub fn new(vs: &nn::Path, cfg: IFSafetyCheckerConfig) -> Result<Self> {
        let vision_model =
            CLIPVisionModelWithProjection::new(&(vs / "vision_model"), cfg.vision_config)?;
        // `new` checked that the projection dimension is positive.
        let p = vision_model.config().projection_dim.unwrap_or_default();
        Ok(Self {
            vision_model,
            p_head: weights::linear(vs / "p_head", p, 1, true),
            w_head: weights::linear(vs / "w_head", p, 1, true),
            _vs: None,
        })
    }

    /// Loads `config.json` and the weights of a `safety_checker` folder.
    pub fn load(
        component_dir: &Path,
        variant: Option<&str>,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let (mut model, vs) = weights::load_model(
            component_dir,
            variant,
            kind,
            device,
            &rename,
            weights::Layout::Contiguous,
            |p, config: IFSafetyCheckerConfig| Self::new(p, config),
        )?;
        model._vs = Some(vs);
        Ok(model)
    }

    /// The head scores for `clip_input` (the feature extractor's `pixel_values`).
    pub fn forward(&self, clip_input: &Tensor) -> Result<IFSafetyScores> {
        let _guard = tch::no_grad_guard();
        let image_embeds = self.vision_model.forward(clip_input)?.image_embeds;
        Ok(IFSafetyScores {
            nsfw: self.p_head.forward(&image_embeds).flatten(0, -1),
            watermark: self.w_head.forward(&image_embeds).flatten(0, -1),
            image_embeds,
        })
    }
}

/// `IFWatermarker`: the RGBA mark IF pipelines paste into every output image.
#[derive(Debug)]
pub struct IFWatermarker {
    watermark_image: Tensor,
    _vs: VarStore,
}

// SAFETY: only a read-only tensor.
unsafe impl Sync for IFWatermarker {}

impl IFWatermarker {
    /// Loads the `watermark_image` buffer of a `watermarker` folder.
    pub fn load(
        component_dir: &Path,
        variant: Option<&str>,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let (watermark_image, vs) = weights::load_files(
            &weights::weight_files(component_dir, variant)?,
            kind,
            device,
            &|k| k.to_string(),
            weights::Layout::Contiguous,
            |p| {
                Ok(weights::param(
                    p,
                    "watermark_image",
                    &[WATERMARK_SIDE, WATERMARK_SIDE, 4],
                ))
            },
        )?;
        Ok(Self {
            watermark_image,
            _vs: vs,
        })
    }

    /// `watermark_image.to(torch.uint8)` on the CPU: `[62, 62, 4]` RGBA bytes, row-major.
    pub fn watermark_image(&self) -> Tensor {
        self.watermark_image
            .to_device(Device::Cpu)
            .to_kind(Kind::Uint8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_and_flat_towers_load_into_one_module() {
        assert_eq!(
            rename("vision_model.vision_model.encoder.layers.0.mlp.fc1.weight"),
            "vision_model.vision_model.encoder.layers.0.mlp.fc1.weight"
        );
        assert_eq!(
            rename("vision_model.encoder.layers.0.mlp.fc1.weight"),
            "vision_model.vision_model.encoder.layers.0.mlp.fc1.weight"
        );
        assert_eq!(
            rename("vision_model.visual_projection.weight"),
            "vision_model.visual_projection.weight"
        );
        assert_eq!(rename("p_head.bias"), "p_head.bias");
        assert_eq!(
            rename("vision_model.vision_model.embeddings.position_ids"),
            ""
        );
    }

    #[test]
    fn flags_compare_strictly_above_the_threshold() {
        let scores = IFSafetyScores {
            image_embeds: Tensor::zeros([3, 2], (Kind::Float, Device::Cpu)),
            nsfw: Tensor::from_slice(&[0.5f32, 0.5001, -3.0]),
            watermark: Tensor::from_slice(&[2.0f32, 0.4999, 0.5]),
        };
        let (nsfw, watermark) = scores.flags().unwrap();
        assert_eq!(nsfw, vec![false, true, false]);
        assert_eq!(watermark, vec![true, false, false]);
    }
}
