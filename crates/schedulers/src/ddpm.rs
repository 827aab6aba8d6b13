//! DDPMScheduler, after `diffusers/schedulers/scheduling_ddpm.py` (Ho et al., 2006.11239).

use autopipe_rng::Generator;
use serde::Deserialize;
use serde_json::Value;
use tch::Tensor;

use crate::config::{
    default_one, default_true, parse, PredictionType, SchedulerConfig, Thresholding,
    TimestepSpacing,
};
use crate::scalar::S;
use crate::schedule::{self, add_noise_alphas, check_not_above_train, train_index};
use crate::{Error, Result, Scheduler};

const CLASS: &str = "DDPMScheduler";

/// diffusers' `variance_type` for DDPM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    /// The posterior variance.
    #[default]
    FixedSmall,
    /// The posterior variance, applied through its log.
    FixedSmallLog,
    /// `beta_t`.
    FixedLarge,
    /// `log(beta_t)`.
    FixedLargeLog,
    /// The model predicts the variance (second half of its output channels).
    Learned,
    /// The model predicts an interpolation between the log variances (second half of its channels).
    LearnedRange,
}

/// DDPMScheduler's own `scheduler_config.json` fields (the shared ones are in [`SchedulerConfig`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DDPMSchedulerConfig {
    /// `variance_type` (default fixed_small).
    #[serde(default)]
    pub variance_type: VarianceType,
    /// `clip_sample` (default true).
    #[serde(default = "default_true")]
    pub clip_sample: bool,
    /// `clip_sample_range` (default 1.0).
    #[serde(default = "default_one")]
    pub clip_sample_range: f64,
    /// `rescale_betas_zero_snr` (default false).
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// Dynamic thresholding options.
    #[serde(flatten)]
    pub thresholding: Thresholding,
}

/// diffusers' DDPMScheduler (ancestral sampling; noise from the request's generator).
#[derive(Debug)]
pub struct DDPMScheduler {
    config: SchedulerConfig,
    options: DDPMSchedulerConfig,
    alphas_cumprod: Tensor,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
}

impl DDPMScheduler {
    /// Builds the scheduler from `scheduler_config.json` (diffusers' `DDPMScheduler.from_config`).
    pub fn from_config(json: &Value) -> Result<Self> {
        let config = SchedulerConfig::parse(CLASS, json, TimestepSpacing::Leading)?;
        config.require_prediction(&[
            PredictionType::Epsilon,
            PredictionType::Sample,
            PredictionType::VPrediction,
        ])?;
        let options: DDPMSchedulerConfig = parse(CLASS, json)?;
        let betas = schedule::betas(&config, true, options.rescale_betas_zero_snr)?;
        let alphas_cumprod = schedule::alphas_cumprod(&betas, false);
        let timesteps = (0..config.num_train_timesteps)
            .rev()
            .map(|t| t as f64)
            .collect();
        Ok(Self {
            config,
            options,
            alphas_cumprod,
            timesteps,
            num_inference_steps: None,
        })
    }

    /// The class-specific config.
    pub fn options(&self) -> &DDPMSchedulerConfig {
        &self.options
    }

    /// diffusers' `previous_timestep`: the next entry of the schedule, -1 after the last.
    fn previous_timestep(&self, timestep: i64) -> Result<i64> {
        if self.num_inference_steps.is_none() {
            return Ok(timestep - 1);
        }
        match self.timesteps.iter().position(|&t| t == timestep as f64) {
            Some(i) if i + 1 < self.timesteps.len() => Ok(self.timesteps[i + 1] as i64),
            Some(_) => Ok(-1),
            None => Err(Error::TimestepNotInSchedule {
                class: CLASS,
                timestep: timestep as f64,
            }),
        }
    }

    fn alpha_prod_prev(&self, prev_t: i64) -> S {
        if prev_t >= 0 {
            S::at(&self.alphas_cumprod, prev_t as usize)
        } else {
            S::new(1.0)
        }
    }

    /// diffusers' `_get_variance` before the variance type is applied: the clamped posterior
    /// variance and `current_beta_t`.
    fn posterior_variance(&self, alpha_prod_t: &S, alpha_prod_t_prev: &S) -> (S, S) {
        let current_beta_t = (alpha_prod_t / alpha_prod_t_prev).rsub(1.0);
        let variance = (alpha_prod_t_prev.rsub(1.0) / alpha_prod_t.rsub(1.0) * &current_beta_t)
            .clamp_min(1e-20);
        (variance, current_beta_t)
    }
}

impl Scheduler for DDPMScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        check_not_above_train(&self.config, num_inference_steps)?;
        self.num_inference_steps = Some(num_inference_steps);
        self.timesteps = schedule::discrete_timesteps(&self.config, num_inference_steps)
            .into_iter()
            .map(|t| t as f64)
            .collect();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&mut self, sample: &Tensor, _timestep: f64) -> Tensor {
        sample.shallow_clone()
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        generator: &mut Generator,
    ) -> Result<Tensor> {
        let t = train_index(CLASS, timestep, self.alphas_cumprod.size()[0] as usize)? as i64;
        let prev_t = self.previous_timestep(t)?;
        let channels = sample.size().get(1).copied().unwrap_or(0);
        let learned = matches!(
            self.options.variance_type,
            VarianceType::Learned | VarianceType::LearnedRange
        );
        let (model_output, predicted_variance) =
            if learned && model_output.size().get(1).copied() == Some(channels * 2) {
                let parts = model_output.split(channels, 1);
                (parts[0].shallow_clone(), Some(parts[1].shallow_clone()))
            } else {
                (model_output.shallow_clone(), None)
            };
        schedule::check_shapes(CLASS, &model_output, sample)?;

        let alpha_prod_t = S::at(&self.alphas_cumprod, t as usize);
        let alpha_prod_t_prev = self.alpha_prod_prev(prev_t);
        let beta_prod_t = alpha_prod_t.rsub(1.0);
        let beta_prod_t_prev = alpha_prod_t_prev.rsub(1.0);
        let current_alpha_t = &alpha_prod_t / &alpha_prod_t_prev;
        let current_beta_t = current_alpha_t.rsub(1.0);

        let pred_original_sample = schedule::pred_original_sample(
            CLASS,
            self.config.prediction_type,
            &model_output,
            sample,
            &alpha_prod_t,
        )?;
        let clip = self
            .options
            .clip_sample
            .then_some(self.options.clip_sample_range);
        let pred_original_sample =
            schedule::clip_or_threshold(pred_original_sample, &self.options.thresholding, clip)?;

        let pred_original_sample_coeff =
            (alpha_prod_t_prev.sqrt() * &current_beta_t) / &beta_prod_t;
        let current_sample_coeff = current_alpha_t.sqrt() * &beta_prod_t_prev / &beta_prod_t;
        let pred_prev_sample = pred_original_sample_coeff.t() * pred_original_sample
            + current_sample_coeff.t() * sample;
        if t == 0 {
            return Ok(pred_prev_sample);
        }
        let noise = generator.randn(
            &model_output.size(),
            model_output.kind(),
            model_output.device(),
        );
        let (variance, beta) = self.posterior_variance(&alpha_prod_t, &alpha_prod_t_prev);
        let variance = match (self.options.variance_type, &predicted_variance) {
            (VarianceType::FixedSmall, _) => variance.sqrt().t() * noise,
            (VarianceType::FixedSmallLog, _) => (variance.ln() * 0.5).exp().t() * noise,
            (VarianceType::FixedLarge, _) => beta.sqrt().t() * noise,
            (VarianceType::FixedLargeLog, _) => beta.ln().sqrt().t() * noise,
            (VarianceType::Learned, Some(v)) => v.pow_tensor_scalar(0.5) * noise,
            (VarianceType::LearnedRange, Some(v)) => {
                let (min_log, max_log) = (variance.ln(), beta.ln());
                let frac = (v + 1.0) / 2.0;
                let log_variance = &frac * max_log.t() + (-(&frac - 1.0)) * min_log.t();
                (log_variance * 0.5).exp() * noise
            }
            (_, None) => {
                return Err(Error::InvalidArgument {
                    class: CLASS,
                    message: format!(
                        "variance_type {:?} needs a model output with twice the sample's channels",
                        self.options.variance_type
                    ),
                })
            }
        };
        Ok(pred_prev_sample + variance)
    }

    fn add_noise(&self, original_samples: &Tensor, noise: &Tensor, timestep: f64) -> Tensor {
        add_noise_alphas(&self.alphas_cumprod, timestep, original_samples, noise)
    }

    fn set_begin_index(&mut self, _begin_index: usize) {}

    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn class_name(&self) -> &'static str {
        CLASS
    }

    fn takes_predicted_variance(&self) -> bool {
        matches!(
            self.options.variance_type,
            VarianceType::Learned | VarianceType::LearnedRange
        )
    }
}
