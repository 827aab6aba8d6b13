//! EulerDiscreteScheduler, after `diffusers/schedulers/scheduling_euler_discrete.py`
//! (Algorithm 2 of Karras et al., 2206.00364, without churn).

use autopipe_rng::Generator;
use serde::Deserialize;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::config::{parse, PredictionType, SchedulerConfig, TimestepSpacing};
use crate::schedule::{
    self, check_shapes, check_steps, FinalSigmasType, SigmaRamp, SigmaRampConfig, SigmaSchedule,
    SpacedSigmas,
};
use crate::{Result, Scheduler};

const CLASS: &str = "EulerDiscreteScheduler";

/// diffusers' `interpolation_type`: how sigmas are placed between training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InterpolationType {
    /// `np.interp` of the training sigmas at the timesteps.
    #[default]
    Linear,
    /// Log-uniform between the largest and smallest training sigma.
    LogLinear,
}

/// diffusers' `timestep_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimestepType {
    /// Timesteps are (fractional) training timesteps.
    #[default]
    Discrete,
    /// With v-prediction, timesteps are `0.25 * log(sigma)`.
    Continuous,
}

/// EulerDiscreteScheduler's own `scheduler_config.json` fields (the shared ones are in [`SchedulerConfig`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EulerDiscreteSchedulerConfig {
    /// `interpolation_type` (default linear).
    #[serde(default)]
    pub interpolation_type: InterpolationType,
    /// `timestep_type` (default discrete).
    #[serde(default)]
    pub timestep_type: TimestepType,
    /// `rescale_betas_zero_snr` (default false).
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// `final_sigmas_type` (default zero).
    #[serde(default)]
    pub final_sigmas_type: FinalSigmasType,
    /// Karras / exponential sigma ramps.
    #[serde(flatten)]
    pub sigmas: SigmaRampConfig,
}

/// diffusers' EulerDiscreteScheduler.
#[derive(Debug)]
pub struct EulerDiscreteScheduler {
    config: SchedulerConfig,
    options: EulerDiscreteSchedulerConfig,
    ramp: Option<SigmaRamp>,
    alphas_cumprod: Tensor,
    schedule: SigmaSchedule,
}

impl EulerDiscreteScheduler {
    /// Builds the scheduler from `scheduler_config.json` (diffusers' `EulerDiscreteScheduler.from_config`).
    pub fn from_config(json: &Value) -> Result<Self> {
        let config = SchedulerConfig::parse(CLASS, json, TimestepSpacing::Linspace)?;
        let options: EulerDiscreteSchedulerConfig = parse(CLASS, json)?;
        let ramp = options.sigmas.ramp(CLASS)?;
        let betas = schedule::betas(&config, false, options.rescale_betas_zero_snr)?;
        let alphas_cumprod = schedule::alphas_cumprod(&betas, options.rescale_betas_zero_snr);
        let train_sigmas = schedule::train_sigmas(&alphas_cumprod);
        let mut this = Self {
            schedule: SigmaSchedule::training(CLASS, &train_sigmas, Vec::new()),
            config,
            options,
            ramp,
            alphas_cumprod,
        };
        let train = this.config.num_train_timesteps;
        let timesteps = if this.continuous() {
            let sigmas = this
                .schedule
                .sigmas
                .narrow(0, 0, this.schedule.len() as i64 - 1);
            continuous_timesteps(&sigmas)?
        } else {
            schedule::linspace(0.0, (train - 1) as f64, train)
                .into_iter()
                .rev()
                .map(|t| f64::from(t as f32))
                .collect()
        };
        this.schedule.timesteps = timesteps;
        Ok(this)
    }

    /// The class-specific config.
    pub fn options(&self) -> &EulerDiscreteSchedulerConfig {
        &self.options
    }

    /// diffusers' `sigmas` (float32, one more than the timesteps).
    pub fn sigmas(&self) -> &Tensor {
        &self.schedule.sigmas
    }

    fn continuous(&self) -> bool {
        self.options.timestep_type == TimestepType::Continuous
            && self.config.prediction_type == PredictionType::VPrediction
    }
}

/// `torch.Tensor([0.25 * sigma.log() for sigma in sigmas])`: continuous-time timesteps.
fn continuous_timesteps(sigmas: &Tensor) -> Result<Vec<f64>> {
    Ok(schedule::f32_values(&(sigmas.log() * 0.25))?
        .into_iter()
        .map(f64::from)
        .collect())
}

impl Scheduler for EulerDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        check_steps(CLASS, num_inference_steps)?;
        let n = num_inference_steps;
        let mut spaced = SpacedSigmas::new(&self.config, &self.alphas_cumprod, n)?;
        if self.options.interpolation_type == InterpolationType::LogLinear {
            let train = &spaced.train_sigmas;
            let (first, last) = (train[0], train[train.len() - 1]);
            let ramp = Tensor::linspace(
                f64::from(last.ln()),
                f64::from(first.ln()),
                n as i64 + 1,
                (Kind::Float, Device::Cpu),
            );
            spaced.sigmas = schedule::f32_values(&ramp.exp())?
                .into_iter()
                .map(f64::from)
                .collect();
        }
        spaced.apply_ramp(&self.options.sigmas, self.ramp, true);
        let sigma_last = match self.options.final_sigmas_type {
            FinalSigmasType::SigmaMin => schedule::sigma_min(&self.alphas_cumprod),
            FinalSigmasType::Zero => 0.0,
        };
        self.schedule
            .reset(&spaced.sigmas, sigma_last, spaced.float32_timesteps());
        if self.continuous() {
            let n = self.schedule.len() as i64 - 1;
            self.schedule.timesteps = continuous_timesteps(&self.schedule.sigmas.narrow(0, 0, n))?;
        }
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
        _generator: &mut Generator,
    ) -> Result<Tensor> {
        check_shapes(CLASS, model_output, sample)?;
        let i = self.schedule.step_index(timestep)?;
        let sample = sample.to_kind(Kind::Float);
        // s_churn is 0 in diffusers' pipelines, so gamma = 0 and sigma_hat = sigma.
        let sigma = self.schedule.sigma(i);
        let pred_original_sample = schedule::pred_original_sample_sigma(
            CLASS,
            self.config.prediction_type,
            model_output,
            &sample,
            &sigma,
            true,
        )?;
        let derivative = (&sample - pred_original_sample) / sigma.t();
        let dt = self.schedule.sigma(i + 1) - &sigma;
        let prev_sample = sample + derivative * dt.t();
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
