//! UnCLIPScheduler, after `diffusers/schedulers/scheduling_unclip.py` (the Karlo / Kandinsky
//! prior's DDPM variant: cosine betas, `fixed_small_log` variance, clipped `x_0`).
//!
//! diffusers' prior pipelines pass `prev_timestep=timesteps[i + 1]` (none after the last step) to
//! `step`; this port follows its own schedule the same way, one entry per `step` call.

use autopipe_rng::Generator;
use serde::Deserialize;
use serde_json::Value;
use tch::Tensor;

use crate::config::{
    default_one, default_true, parse, BetaSchedule, PredictionType, SchedulerConfig,
    TimestepSpacing,
};
use crate::scalar::S;
use crate::schedule::{self, add_noise_alphas, train_index};
use crate::{Error, Result, Scheduler};

const CLASS: &str = "UnCLIPScheduler";

/// UnCLIPScheduler's `variance_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnCLIPVarianceType {
    /// `exp(0.5 * log(clamp(posterior variance, 1e-20)))`.
    #[default]
    FixedSmallLog,
    /// The model's second half of channels interpolates between the log variances.
    LearnedRange,
}

/// UnCLIPScheduler's own `scheduler_config.json` fields.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UnCLIPSchedulerConfig {
    /// `variance_type` (default fixed_small_log).
    #[serde(default)]
    pub variance_type: UnCLIPVarianceType,
    /// `clip_sample` (default true).
    #[serde(default = "default_true")]
    pub clip_sample: bool,
    /// `clip_sample_range` (default 1.0).
    #[serde(default = "default_one")]
    pub clip_sample_range: f64,
}

/// diffusers' UnCLIPScheduler.
#[derive(Debug)]
pub struct UnCLIPScheduler {
    config: SchedulerConfig,
    options: UnCLIPSchedulerConfig,
    betas: Tensor,
    alphas: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Vec<f64>,
    step_index: usize,
}

impl UnCLIPScheduler {
    /// Builds the scheduler from `scheduler_config.json` (diffusers' `UnCLIPScheduler.from_config`).
    pub fn from_config(json: &Value) -> Result<Self> {
        let mut config = SchedulerConfig::parse(CLASS, json, TimestepSpacing::Leading)?;
        // UnCLIP's default (and only) schedule is the cosine one.
        match json.get("beta_schedule") {
            None | Some(Value::Null) => config.beta_schedule = BetaSchedule::SquaredcosCapV2,
            Some(_) if config.beta_schedule == BetaSchedule::SquaredcosCapV2 => {}
            Some(other) => {
                return Err(Error::Config {
                    class: CLASS,
                    message: format!(
                        "UnCLIPScheduler only supports `beta_schedule`: 'squaredcos_cap_v2', got {other}"
                    ),
                })
            }
        }
        config.require_prediction(&[PredictionType::Epsilon, PredictionType::Sample])?;
        let options: UnCLIPSchedulerConfig = parse(CLASS, json)?;
        let betas = schedule::betas(&config, false, false)?;
        let alphas = betas.ones_like() - &betas;
        let alphas_cumprod = alphas.cumprod(0, None);
        let timesteps = (0..config.num_train_timesteps)
            .rev()
            .map(|t| t as f64)
            .collect();
        Ok(Self {
            config,
            options,
            betas,
            alphas,
            alphas_cumprod,
            timesteps,
            step_index: 0,
        })
    }

    /// The class-specific config.
    pub fn options(&self) -> &UnCLIPSchedulerConfig {
        &self.options
    }
}

impl Scheduler for UnCLIPScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        if num_inference_steps < 2 {
            // diffusers divides by `num_inference_steps - 1`.
            return Err(Error::InvalidArgument {
                class: CLASS,
                message: format!(
                    "num_inference_steps must be at least 2, got {num_inference_steps}"
                ),
            });
        }
        let ratio = (self.config.num_train_timesteps - 1) as f64 / (num_inference_steps - 1) as f64;
        self.timesteps = (0..num_inference_steps)
            .rev()
            .map(|i| (i as f64 * ratio).round_ties_even())
            .collect();
        self.step_index = 0;
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
        let prev_t = match self.timesteps.get(self.step_index + 1) {
            Some(&p) => p as i64,
            None => t - 1,
        };
        self.step_index += 1;
        let channels = sample.size().get(1).copied().unwrap_or(0);
        let (model_output, predicted_variance) = if model_output.size().get(1).copied()
            == Some(channels * 2)
            && self.options.variance_type == UnCLIPVarianceType::LearnedRange
        {
            let parts = model_output.split(channels, 1);
            (parts[0].shallow_clone(), Some(parts[1].shallow_clone()))
        } else {
            (model_output.shallow_clone(), None)
        };
        schedule::check_shapes(CLASS, &model_output, sample)?;

        let alpha_prod_t = S::at(&self.alphas_cumprod, t as usize);
        let alpha_prod_t_prev = if prev_t >= 0 {
            S::at(&self.alphas_cumprod, prev_t as usize)
        } else {
            S::new(1.0)
        };
        let beta_prod_t = alpha_prod_t.rsub(1.0);
        let beta_prod_t_prev = alpha_prod_t_prev.rsub(1.0);
        let (beta, alpha) = if prev_t == t - 1 {
            (
                S::at(&self.betas, t as usize),
                S::at(&self.alphas, t as usize),
            )
        } else {
            let beta = (&alpha_prod_t / &alpha_prod_t_prev).rsub(1.0);
            let alpha = beta.rsub(1.0);
            (beta, alpha)
        };

        let pred_original_sample = schedule::pred_original_sample(
            CLASS,
            self.config.prediction_type,
            &model_output,
            sample,
            &alpha_prod_t,
        )?;
        let pred_original_sample = if self.options.clip_sample {
            let r = self.options.clip_sample_range;
            pred_original_sample.clamp(-r, r)
        } else {
            pred_original_sample
        };
        let pred_original_sample_coeff = (alpha_prod_t_prev.sqrt() * &beta) / &beta_prod_t;
        let current_sample_coeff = alpha.sqrt() * &beta_prod_t_prev / &beta_prod_t;
        let pred_prev_sample = pred_original_sample_coeff.t() * pred_original_sample
            + current_sample_coeff.t() * sample;
        if t <= 0 {
            return Ok(pred_prev_sample);
        }
        let noise = generator.randn(
            &model_output.size(),
            model_output.kind(),
            model_output.device(),
        );
        let variance = beta_prod_t_prev / &beta_prod_t * &beta;
        let std = match (self.options.variance_type, &predicted_variance) {
            (UnCLIPVarianceType::FixedSmallLog, _) => {
                (variance.clamp_min(1e-20).ln() * 0.5).exp().t().shallow_clone()
            }
            (UnCLIPVarianceType::LearnedRange, Some(v)) => {
                let (min_log, max_log) = (variance.ln(), beta.ln());
                let frac = (v + 1.0) / 2.0;
                let log_variance = &frac * max_log.t() + (-(&frac - 1.0)) * min_log.t();
                (log_variance * 0.5).exp()
            }
            (UnCLIPVarianceType::LearnedRange, None) => {
                return Err(Error::InvalidArgument {
                    class: CLASS,
                    message: "variance_type learned_range needs a model output with twice the sample's channels".into(),
                })
            }
        };
        Ok(pred_prev_sample + std * noise)
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
        self.options.variance_type == UnCLIPVarianceType::LearnedRange
    }
}
