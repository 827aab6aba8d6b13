//! `scheduler_config.json` reading, as diffusers' `ConfigMixin.extract_init_dict` does it
//! (`diffusers/configuration_utils.py`): keys starting with `_` and keys listed in
//! `_use_default_values` are dropped, unknown keys are ignored, missing keys take the class default.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::{Error, Result};

/// diffusers' `beta_schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `torch.linspace(beta_start, beta_end, n)`.
    Linear,
    /// `torch.linspace(beta_start**0.5, beta_end**0.5, n) ** 2` (Stable Diffusion).
    ScaledLinear,
    /// The cosine schedule (`betas_for_alpha_bar`, cosine transform).
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
    /// `sigmoid(linspace(-6, 6, n)) * (beta_end - beta_start) + beta_start` (DDPM only).
    Sigmoid,
    /// `betas_for_alpha_bar` with the laplace transform (DDPM only).
    Laplace,
}

/// diffusers' `prediction_type`: what the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise.
    Epsilon,
    /// The velocity `alpha_t * noise - sigma_t * x0`.
    VPrediction,
    /// The denoised sample.
    Sample,
    /// The denoised sample (EulerDiscreteScheduler's older name for `sample`).
    OriginalSample,
}

/// diffusers' `timestep_spacing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// Evenly spaced over `[0, num_train_timesteps - 1]`.
    Linspace,
    /// Multiples of `num_train_timesteps // steps`, plus `steps_offset`.
    Leading,
    /// Counted back from `num_train_timesteps`, minus one.
    Trailing,
}

/// The config fields every supported scheduler has, resolved with the class's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// The diffusers class these values were read for.
    pub class_name: &'static str,
    /// `num_train_timesteps` (default 1000).
    pub num_train_timesteps: usize,
    /// `beta_start` (default 0.0001).
    pub beta_start: f64,
    /// `beta_end` (default 0.02).
    pub beta_end: f64,
    /// `beta_schedule` (default linear).
    pub beta_schedule: BetaSchedule,
    /// `trained_betas`: explicit betas that override the schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// `prediction_type` (default epsilon).
    pub prediction_type: PredictionType,
    /// `timestep_spacing` (default leading for DDIM/DDPM/PNDM, linspace for the others).
    pub timestep_spacing: TimestepSpacing,
    /// `steps_offset` (default 0).
    pub steps_offset: i64,
}

#[derive(Deserialize)]
struct RawCommon {
    #[serde(default = "default_num_train_timesteps")]
    num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    beta_start: f64,
    #[serde(default = "default_beta_end")]
    beta_end: f64,
    #[serde(default = "default_beta_schedule")]
    beta_schedule: BetaSchedule,
    #[serde(default)]
    trained_betas: Option<Vec<f64>>,
    #[serde(default = "default_prediction_type")]
    prediction_type: PredictionType,
    #[serde(default)]
    timestep_spacing: Option<TimestepSpacing>,
    #[serde(default)]
    steps_offset: i64,
}

fn default_num_train_timesteps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> BetaSchedule {
    BetaSchedule::Linear
}
fn default_prediction_type() -> PredictionType {
    PredictionType::Epsilon
}

impl SchedulerConfig {
    /// Reads the shared fields of `class` from `json`, `timestep_spacing` defaulting to `spacing`.
    pub(crate) fn parse(
        class: &'static str,
        json: &Value,
        spacing: TimestepSpacing,
    ) -> Result<Self> {
        let raw: RawCommon = parse(class, json)?;
        if raw.num_train_timesteps == 0 {
            return Err(Error::Config {
                class,
                message: "num_train_timesteps must be positive".into(),
            });
        }
        if let Some(b) = &raw.trained_betas {
            if b.is_empty() {
                return Err(Error::Config {
                    class,
                    message: "trained_betas is empty".into(),
                });
            }
        }
        Ok(Self {
            class_name: class,
            num_train_timesteps: raw.num_train_timesteps,
            beta_start: raw.beta_start,
            beta_end: raw.beta_end,
            beta_schedule: raw.beta_schedule,
            trained_betas: raw.trained_betas,
            prediction_type: raw.prediction_type,
            timestep_spacing: raw.timestep_spacing.unwrap_or(spacing),
            steps_offset: raw.steps_offset,
        })
    }

    /// Errors unless the prediction type is one of `allowed`.
    pub(crate) fn require_prediction(&self, allowed: &[PredictionType]) -> Result<()> {
        if allowed.contains(&self.prediction_type) {
            Ok(())
        } else {
            Err(unsupported(
                self.class_name,
                "prediction_type",
                format!("{:?}", self.prediction_type),
            ))
        }
    }
}

/// An [`Error::Unsupported`] for `field` = `value`.
pub(crate) fn unsupported(
    class: &'static str,
    field: &'static str,
    value: impl Into<String>,
) -> Error {
    Error::Unsupported {
        class,
        field,
        value: value.into(),
    }
}

/// Deserializes a class's config struct from `scheduler_config.json` the way `extract_init_dict` filters it.
/// Non-finite numbers `autopipe_json` read (`"lambda_min_clipped": -Infinity`) arrive as floats.
pub(crate) fn parse<T: DeserializeOwned>(class: &'static str, json: &Value) -> Result<T> {
    let object = json.as_object().ok_or_else(|| Error::Config {
        class,
        message: "scheduler config must be a JSON object".into(),
    })?;
    let use_defaults: Vec<&str> = object
        .get("_use_default_values")
        .and_then(Value::as_array)
        .map(|keys| keys.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    // `null` means "not set": diffusers passes None, which every field here treats as its default.
    let filtered: Map<String, Value> = object
        .iter()
        .filter(|(k, v)| !k.starts_with('_') && !use_defaults.contains(&k.as_str()) && !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    autopipe_json::from_value(Value::Object(filtered)).map_err(|e| Error::Config {
        class,
        message: e.to_string(),
    })
}

/// serde default `true`.
pub(crate) fn default_true() -> bool {
    true
}

/// serde default `1.0`.
pub(crate) fn default_one() -> f64 {
    1.0
}

fn default_dynamic_thresholding_ratio() -> f64 {
    0.995
}

/// diffusers' dynamic-thresholding options (DDIM, DDPM, DPM-Solver).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Thresholding {
    /// `thresholding` (default false).
    #[serde(default)]
    pub thresholding: bool,
    /// `dynamic_thresholding_ratio` (default 0.995).
    #[serde(default = "default_dynamic_thresholding_ratio")]
    pub dynamic_thresholding_ratio: f64,
    /// `sample_max_value` (default 1.0).
    #[serde(default = "default_one")]
    pub sample_max_value: f64,
}
