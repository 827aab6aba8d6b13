//! DDIMScheduler, after `diffusers/schedulers/scheduling_ddim.py` (Song et al., 2010.02502).

use autopipe_rng::Generator;
use serde::Deserialize;
use serde_json::Value;
use tch::Tensor;

use crate::config::{
    default_one, default_true, parse, PredictionType, SchedulerConfig, Thresholding,
    TimestepSpacing,
};
use crate::scalar::S;
use crate::schedule::{self, add_noise_alphas, check_not_above_train, check_shapes, train_index};
use crate::{Error, Result, Scheduler};

const CLASS: &str = "DDIMScheduler";

/// DDIMScheduler's own `scheduler_config.json` fields (the shared ones are in [`SchedulerConfig`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DDIMSchedulerConfig {
    /// `clip_sample` (default true): clamp the predicted x0 to `±clip_sample_range`.
    #[serde(default = "default_true")]
    pub clip_sample: bool,
    /// `clip_sample_range` (default 1.0).
    #[serde(default = "default_one")]
    pub clip_sample_range: f64,
    /// `set_alpha_to_one` (default true): the alpha product after the last step is 1.
    #[serde(default = "default_true")]
    pub set_alpha_to_one: bool,
    /// `rescale_betas_zero_snr` (default false).
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// Dynamic thresholding options.
    #[serde(flatten)]
    pub thresholding: Thresholding,
}

/// diffusers' DDIMScheduler (deterministic for `eta = 0`, stochastic with the request's generator otherwise).
#[derive(Debug)]
pub struct DDIMScheduler {
    config: SchedulerConfig,
    options: DDIMSchedulerConfig,
    alphas_cumprod: Tensor,
    final_alpha_cumprod: S,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
    eta: f64,
}

impl DDIMScheduler {
    /// Builds the scheduler from `scheduler_config.json` (diffusers' `DDIMScheduler.from_config`).
    pub fn from_config(json: &Value) -> Result<Self> {
        let config = SchedulerConfig::parse(CLASS, json, TimestepSpacing::Leading)?;
        config.require_prediction(&[
            PredictionType::Epsilon,
            PredictionType::Sample,
            PredictionType::VPrediction,
        ])?;
        let options: DDIMSchedulerConfig = parse(CLASS, json)?;
        let betas = schedule::betas(&config, false, options.rescale_betas_zero_snr)?;
        let alphas_cumprod = schedule::alphas_cumprod(&betas, false);
        let final_alpha_cumprod = if options.set_alpha_to_one {
            S::new(1.0)
        } else {
            S::at(&alphas_cumprod, 0)
        };
        let timesteps = (0..config.num_train_timesteps)
            .rev()
            .map(|t| t as f64)
            .collect();
        Ok(Self {
            config,
            options,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps,
            num_inference_steps: None,
            eta: 0.0,
        })
    }

    /// The class-specific config.
    pub fn options(&self) -> &DDIMSchedulerConfig {
        &self.options
    }

    fn alpha_prod(&self, timestep: i64) -> S {
        if timestep >= 0 {
            S::at(&self.alphas_cumprod, timestep as usize)
        } else {
            self.final_alpha_cumprod.clone()
        }
    }
}

impl Scheduler for DDIMScheduler {
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
        let n = self
            .num_inference_steps
            .ok_or(Error::TimestepsNotSet(CLASS))?;
        check_shapes(CLASS, model_output, sample)?;
        let t = train_index(CLASS, timestep, self.alphas_cumprod.size()[0] as usize)? as i64;
        // diffusers steps back by num_train_timesteps // n whatever the spacing.
        let prev_t = t - (self.config.num_train_timesteps / n) as i64;
        let alpha_prod_t = S::at(&self.alphas_cumprod, t as usize);
        let alpha_prod_t_prev = self.alpha_prod(prev_t);
        let beta_prod_t = alpha_prod_t.rsub(1.0);

        let pred_original_sample = schedule::pred_original_sample(
            CLASS,
            self.config.prediction_type,
            model_output,
            sample,
            &alpha_prod_t,
        )?;
        let pred_epsilon = match self.config.prediction_type {
            PredictionType::Sample => {
                (sample - alpha_prod_t.sqrt().t() * &pred_original_sample) / beta_prod_t.sqrt().t()
            }
            PredictionType::VPrediction => {
                alpha_prod_t.sqrt().t() * model_output + beta_prod_t.sqrt().t() * sample
            }
            _ => model_output.shallow_clone(),
        };
        let clip = self
            .options
            .clip_sample
            .then_some(self.options.clip_sample_range);
        let pred_original_sample =
            schedule::clip_or_threshold(pred_original_sample, &self.options.thresholding, clip)?;

        // _get_variance
        let beta_prod_t_prev = alpha_prod_t_prev.rsub(1.0);
        let variance =
            (&beta_prod_t_prev / &beta_prod_t) * (&alpha_prod_t / &alpha_prod_t_prev).rsub(1.0);
        let std_dev_t = variance.sqrt() * self.eta;
        let direction_coeff = (alpha_prod_t_prev.rsub(1.0) - std_dev_t.sq()).sqrt();
        let pred_sample_direction = direction_coeff.t() * pred_epsilon;
        let prev_sample =
            alpha_prod_t_prev.sqrt().t() * pred_original_sample + pred_sample_direction;
        if self.eta > 0.0 {
            let noise = generator.randn(
                &model_output.size(),
                model_output.kind(),
                model_output.device(),
            );
            return Ok(prev_sample + std_dev_t.t() * noise);
        }
        Ok(prev_sample)
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

    fn accepts_eta(&self) -> bool {
        true
    }

    fn set_eta(&mut self, eta: f64) {
        self.eta = eta;
    }
}
