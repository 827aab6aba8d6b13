//! diffusers' `StableDiffusionSafetyChecker` (diffusers 0.42.1
//! `pipelines/stable_diffusion/safety_checker.py`): a CLIP vision tower's pooled output through
//! `visual_projection`, cosine similarities to 17 concept and 3 special-care embeddings, each
//! compared with its threshold from the checkpoint (`*_embeds_weights`) as diffusers scores them.

use crate::layers::Linear;
use std::path::Path;

use serde::Deserialize;
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

use crate::clip::{vision_rename, CLIPVisionConfig, CLIPVisionTransformer};
use crate::error::{Error, Result};
use crate::weights;

/// The concept embeddings diffusers declares.
const CONCEPTS: i64 = 17;
/// The special-care embeddings diffusers declares.
const SPECIAL_CARE: i64 = 3;
/// What a special-care hit adds to every concept score of that image.
const SPECIAL_CARE_ADJUSTMENT: f32 = 0.01;

fn default_projection_dim() -> i64 {
    512
}

/// `safety_checker/config.json`: transformers' `CLIPConfig`, of which the checker reads the vision
/// tower and the top-level `projection_dim`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SafetyCheckerConfig {
    #[serde(default = "default_projection_dim")]
    pub projection_dim: i64,
    pub vision_config: CLIPVisionConfig,
}

/// `StableDiffusionSafetyChecker`: which images show one of its concepts.
#[derive(Debug)]
pub struct StableDiffusionSafetyChecker {
    vision_model: CLIPVisionTransformer,
    visual_projection: Linear,
    concept_embeds: Tensor,
    special_care_embeds: Tensor,
    concept_embeds_weights: Tensor,
    special_care_embeds_weights: Tensor,
    _vs: Option<VarStore>,
}

// SAFETY: as for the CLIP models, only read-only tensors.
unsafe impl Sync for StableDiffusionSafetyChecker {}

/// transformers 5 saves `CLIPVisionModel` flat (`vision_model.embeddings…`); checkpoints written
/// before it (Stable Diffusion 1.x's) nest it once more (`vision_model.vision_model.embeddings…`).
fn rename(key: &str) -> String {
    let key = vision_rename(key);
    match key.strip_prefix("vision_model.vision_model.") {
        Some(rest) => format!("vision_model.{rest}"),
        None => key,
    }
}

/// `nn.functional.normalize(a) @ nn.functional.normalize(b).T`.
fn cosine_distance(a: &Tensor, b: &Tensor) -> Tensor {
    let unit = |t: &Tensor| t / t.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
    unit(a).mm(&unit(b).tr())
}

/// Python's `round(np.float32(x), 3)`: numpy scales, rounds half to even and divides in float32.
fn round3(x: f32) -> f32 {
    (x * 1000.0).round_ties_even() / 1000.0
}

/// A [rows, cols] float tensor as rows of f32 on the CPU.
fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    let t = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    let cols = t.size()[1] as usize;
    let flat: Vec<f32> = Vec::<f32>::try_from(t.flatten(0, -1))?;
    Ok(flat.chunks(cols.max(1)).map(<[f32]>::to_vec).collect())
}

/// A threshold vector as float32, as numpy meets the Python floats `.item()` gives.
fn thresholds(t: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(
        t.to_device(Device::Cpu).to_kind(Kind::Float),
    )?)
}

impl StableDiffusionSafetyChecker {
    /// Declares the parameters under `vs` with the checkpoint's key paths.
    pub fn new(vs: &nn::Path, cfg: SafetyCheckerConfig) -> Result<Self> {
        if cfg.projection_dim <= 0 {
            return Err(Error::Config(format!(
                "projection_dim must be positive, got {}",
                cfg.projection_dim
            )));
        }
        let d = cfg.vision_config.hidden_size;
        let p = cfg.projection_dim;
        Ok(Self {
            vision_model: CLIPVisionTransformer::new(&(vs / "vision_model"), cfg.vision_config)?,
            visual_projection: weights::linear(vs / "visual_projection", d, p, false),
            concept_embeds: weights::param(vs, "concept_embeds", &[CONCEPTS, p]),
            special_care_embeds: weights::param(vs, "special_care_embeds", &[SPECIAL_CARE, p]),
            concept_embeds_weights: weights::param(vs, "concept_embeds_weights", &[CONCEPTS]),
            special_care_embeds_weights: weights::param(
                vs,
                "special_care_embeds_weights",
                &[SPECIAL_CARE],
            ),
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
            |p, config: SafetyCheckerConfig| Self::new(p, config),
        )?;
        model._vs = Some(vs);
        Ok(model)
    }

    /// `has_nsfw_concepts` for each image of `clip_input` (the feature extractor's
    /// `pixel_values`): a special-care score above 0 raises every concept score of that image by
    /// 0.01; an image is flagged when a concept score, rounded to 3 decimals, is above 0.
    pub fn forward(&self, clip_input: &Tensor) -> Result<Vec<bool>> {
        let _guard = tch::no_grad_guard();
        let (_, pooled) = self.vision_model.forward(clip_input)?;
        let image_embeds = self.visual_projection.forward(&pooled);
        // diffusers moves the similarities to float32 numpy arrays; the arithmetic below is float32.
        let special = rows(&cosine_distance(&image_embeds, &self.special_care_embeds))?;
        let concept = rows(&cosine_distance(&image_embeds, &self.concept_embeds))?;
        Ok(flags(
            &special,
            &thresholds(&self.special_care_embeds_weights)?,
            &concept,
            &thresholds(&self.concept_embeds_weights)?,
        ))
    }
}

/// diffusers' per-image scoring loop over cosine similarities and their thresholds.
fn flags(
    special: &[Vec<f32>],
    special_thresholds: &[f32],
    concept: &[Vec<f32>],
    concept_thresholds: &[f32],
) -> Vec<bool> {
    special
        .iter()
        .zip(concept)
        .map(|(special, concept)| {
            let mut adjustment = 0f32;
            for (cos, threshold) in special.iter().zip(special_thresholds) {
                if round3(cos - threshold + adjustment) > 0.0 {
                    adjustment = SPECIAL_CARE_ADJUSTMENT;
                }
            }
            concept
                .iter()
                .zip(concept_thresholds)
                .any(|(cos, threshold)| round3(cos - threshold + adjustment) > 0.0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_key_layouts_load_into_one_module() {
        assert_eq!(
            rename("vision_model.vision_model.encoder.layers.0.mlp.fc1.weight"),
            "vision_model.encoder.layers.0.mlp.fc1.weight"
        );
        assert_eq!(
            rename("vision_model.post_layernorm.bias"),
            "vision_model.post_layernorm.bias"
        );
        assert_eq!(rename("concept_embeds"), "concept_embeds");
        assert_eq!(
            rename("vision_model.vision_model.embeddings.position_ids"),
            ""
        );
    }

    #[test]
    fn scores_round_to_three_decimals_in_float32() {
        // 0.0004 rounds to 0 (not flagged), 0.0006 to 0.001 (flagged); halves go to even.
        assert_eq!(round3(0.0004), 0.0);
        assert!(round3(0.0006) > 0.0);
        assert_eq!(round3(0.0005), 0.0);
        assert_eq!(round3(-0.0123), -0.012);
    }

    #[test]
    fn a_special_care_hit_lowers_the_bar_for_every_concept() {
        let thresholds = [0.5, 0.5];
        // Image 0: no special-care hit, concept 0.495 - 0.5 rounds to -0.005: not flagged.
        // Image 1: a special-care hit (0.6 > 0.5) adds 0.01: 0.495 - 0.5 + 0.01 = 0.005, flagged.
        // Image 2: 0.5004 - 0.5 rounds to 0.0: not flagged.
        let special = [vec![0.1, 0.2], vec![0.6, 0.1], vec![0.1, 0.1]];
        let concept = [vec![0.495, 0.1], vec![0.495, 0.1], vec![0.5004, 0.1]];
        assert_eq!(
            flags(&special, &thresholds, &concept, &thresholds),
            vec![false, true, false]
        );
    }
}
