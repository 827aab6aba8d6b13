//! EulerAncestralDiscreteScheduler, after `diffusers/schedulers/scheduling_euler_ancestral_discrete.py`
//! (k-diffusion's `sample_euler_ancestral`): an Euler step to `sigma_down` plus fresh noise of `sigma_up`.

use autopipe_rng::Generator;
use serde::Deserialize;
use serde_json::Value;
use tch::{Kind, Tensor};

use crate::config::{parse, PredictionType, SchedulerConfig, TimestepSpacing};
use crate::schedule::{self, check_shapes, check_steps, SigmaSchedule, SpacedSigmas};
use crate::{Result, Scheduler};

const CLASS: &str = "EulerAncestralDiscreteScheduler";

/// EulerAncestralDiscreteScheduler's own `scheduler_config.json` fields.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EulerAncestralDiscreteSchedulerConfig {
    /// `rescale_betas_zero_snr` (default false).
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

/// diffusers' EulerAncestralDiscreteScheduler (noise from the request's generator at every step).
#[derive(Debug)]
pub struct EulerAncestralDiscreteScheduler {
    config: SchedulerConfig,
    options: EulerAncestralDiscreteSchedulerConfig,
    alphas_cumprod: Tensor,
    schedule: SigmaSchedule,
}

impl EulerAncestralDiscreteScheduler {
    /// Builds the scheduler from `scheduler_config.json`.
    pub fn from_config(json: &Value) -> Result<Self> {
        let config = SchedulerConfig::parse(CLASS, json, TimestepSpacing::Linspace)?;
        config.require_prediction(&[
            PredictionType::Epsilon,
            PredictionType::Sample,
            PredictionType::VPrediction,
        ])?;
        let options: EulerAncestralDiscreteSchedulerConfig = parse(CLASS, json)?;
        let betas = schedule::betas(&config, false, options.rescale_betas_zero_snr)?;
        let alphas_cumprod = schedule::alphas_cumprod(&betas, options.rescale_betas_zero_snr);
        let train = config.num_train_timesteps;
        let timesteps = schedule::linspace(0.0, (train - 1) as f64, train)
            .into_iter()
            .rev()
            .collect();
        let schedule =
            SigmaSchedule::training(CLASS, &schedule::train_sigmas(&alphas_cumprod), timesteps);
        Ok(Self {
            config,
            options,
            alphas_cumprod,
            schedule,
        })
    }

    /// The class-specific config.
    pub fn options(&self) -> &EulerAncestralDiscreteSchedulerConfig {
        &self.options
    }

    /// diffusers' `sigmas` (float32, one more than the timesteps).
    pub fn sigmas(&self) -> &Tensor {
        &self.schedule.sigmas
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        check_steps(CLASS, num_inference_steps)?;
        let spaced = SpacedSigmas::new(&self.config, &self.alphas_cumprod, num_inference_steps)?;
        self.schedule
            .reset(&spaced.sigmas, 0.0, spaced.float32_timesteps());
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma(self.config.timestep_spacing)
    }

    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Tensor {
        self.schedule.scale_model_input(sample, timestep)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        generator: &mut Generator,
    ) -> Result<Tensor> {
        check_shapes(CLASS, model_output, sample)?;
        let i = self.schedule.step_index(timestep)?;
        let sigma = self.schedule.sigma(i);
        let sample = sample.to_kind(Kind::Float);
        let pred_original_sample = schedule::pred_original_sample_sigma(
            CLASS,
            self.config.prediction_type,
            model_output,
            &sample,
            &sigma,
            false,
        )?;
        let (sigma_from, sigma_to) = (&sigma, self.schedule.sigma(i + 1));
        let sigma_up = (sigma_to.sq() * (sigma_from.sq() - sigma_to.sq()) / sigma_from.sq()).sqrt();
        let sigma_down = (sigma_to.sq() - sigma_up.sq()).sqrt();
        let derivative = (&sample - pred_original_sample) / sigma.t();
        let dt = sigma_down - &sigma;
        let prev_sample = sample + derivative * dt.t();
        let noise = generator.randn(
            &model_output.size(),
            model_output.kind(),
            model_output.device(),
        );
        let prev_sample = prev_sample + noise * sigma_up.t();
        self.schedule.index.step = Some(i + 1);
        Ok(prev_sample.to_kind(model_output.kind()))
    }

    fn add_noise(&self, original_samples: &Tensor, noise: &Tensor, timestep: f64) -> Tensor {
        self.schedule.add_noise(original_samples, noise, timestep)
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.schedule.index.begin = Some(begin_index);
    }

    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn class_name(&self) -> &'static str {
        CLASS
    }
}
