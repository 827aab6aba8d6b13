//! LMSDiscreteScheduler, after `diffusers/schedulers/scheduling_lms_discrete.py` (k-diffusion's
//! `sample_lms`): a linear multistep method of order 4 on the sigma ODE.
//!
//! diffusers integrates each Lagrange basis polynomial with `scipy.integrate.quad`; the basis is a
//! polynomial of degree at most 3, so a two-point Gauss-Legendre rule integrates it exactly.

use autopipe_rng::Generator;
use serde::Deserialize;
use serde_json::Value;
use tch::Tensor;

use crate::config::{parse, PredictionType, SchedulerConfig, TimestepSpacing};
use crate::schedule::{self, check_shapes, check_steps, SigmaRamp, SigmaRampConfig, SigmaSchedule};
use crate::{Result, Scheduler};

const CLASS: &str = "LMSDiscreteScheduler";
/// diffusers' default `order` argument of `step`.
const LMS_ORDER: usize = 4;

/// LMSDiscreteScheduler's own `scheduler_config.json` fields.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LMSDiscreteSchedulerConfig {
    /// Karras / exponential sigma ramps.
    #[serde(flatten)]
    pub sigmas: SigmaRampConfig,
}

/// diffusers' LMSDiscreteScheduler.
#[derive(Debug)]
pub struct LMSDiscreteScheduler {
    config: SchedulerConfig,
    options: LMSDiscreteSchedulerConfig,
    ramp: Option<SigmaRamp>,
    alphas_cumprod: Vec<f32>,
    schedule: SigmaSchedule,
    derivatives: Vec<Tensor>,
}

impl LMSDiscreteScheduler {
    /// Builds the scheduler from `scheduler_config.json`.
    pub fn from_config(json: &Value) -> Result<Self> {
        let config = SchedulerConfig::parse(CLASS, json, TimestepSpacing::Linspace)?;
        config.require_prediction(&[PredictionType::Epsilon, PredictionType::Sample, PredictionType::VPrediction])?;
        let options: LMSDiscreteSchedulerConfig = parse(CLASS, json)?;
        let ramp = options.sigmas.ramp(CLASS)?;
        let betas = schedule::betas(&config, false, false)?;
        let alphas_cumprod = schedule::f32_values(&schedule::alphas_cumprod(&betas, false))?;
        let schedule = SigmaSchedule::training(CLASS, &schedule::train_sigmas(&alphas_cumprod), Vec::new());
        let mut this = Self { config, options, ramp, alphas_cumprod, schedule, derivatives: Vec::new() };
        // diffusers' __init__ ends with set_timesteps(num_train_timesteps).
        this.set_timesteps(this.config.num_train_timesteps)?;
        Ok(this)
    }

    /// The class-specific config.
    pub fn options(&self) -> &LMSDiscreteSchedulerConfig {
        &self.options
    }

    /// diffusers' `sigmas` (one more than the timesteps).
    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }

    /// diffusers' `get_lms_coefficient`: the integral of the `current_order`-th Lagrange basis
    /// polynomial over the sigmas `t - k` (k < order), from `sigmas[t]` to `sigmas[t + 1]`.
    fn lms_coefficient(&self, order: usize, t: usize, current_order: usize) -> f64 {
        let sigmas = &self.schedule.sigmas;
        let basis = |tau: f64| {
            (0..order).filter(|&k| k != current_order).fold(1.0, |prod, k| {
                let node = f64::from(sigmas[t - k]);
                prod * (tau - node) / (f64::from(sigmas[t - current_order]) - node)
            })
        };
        let (a, b) = (f64::from(sigmas[t]), f64::from(sigmas[t + 1]));
        let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
        let offset = half / 3f64.sqrt();
        half * (basis(mid - offset) + basis(mid + offset))
    }
}

impl Scheduler for LMSDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        check_steps(CLASS, num_inference_steps)?;
        let n = num_inference_steps;
        let mut timesteps: Vec<f64> =
            schedule::sigma_timesteps(&self.config, n).into_iter().map(f64::from).collect();
        let train_sigmas = schedule::train_sigmas(&self.alphas_cumprod);
        let log_sigmas = schedule::log_f32(&train_sigmas);
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| schedule::interp(t, &train_sigmas)).collect();
        if let Some(ramp) = self.ramp {
            (sigmas, timesteps) = self.options.sigmas.apply(ramp, &sigmas, n, &log_sigmas, false);
        }
        let sigmas = sigmas.iter().map(|&s| s as f32).chain(std::iter::once(0.0)).collect();
        self.schedule.reset(sigmas, timesteps.into_iter().map(|t| f64::from(t as f32)).collect());
        self.derivatives.clear();
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

    fn step(&mut self, model_output: &Tensor, timestep: f64, sample: &Tensor, _generator: &mut Generator) -> Result<Tensor> {
        check_shapes(CLASS, model_output, sample)?;
        let i = self.schedule.step_index(timestep)?;
        let sigma = self.schedule.sigmas[i];
        let pred_original_sample = schedule::pred_original_sample_sigma(
            CLASS,
            self.config.prediction_type,
            model_output,
            sample,
            sigma,
            false,
        )?;
        let derivative = (sample - pred_original_sample) / f64::from(sigma);
        self.derivatives.push(derivative);
        if self.derivatives.len() > LMS_ORDER {
            drop(self.derivatives.remove(0));
        }
        let order = (i + 1).min(LMS_ORDER);
        // Python's zip stops at the shorter list: after img2img's begin index there are fewer
        // derivatives than the order.
        let mut update: Option<Tensor> = None;
        for (k, derivative) in (0..order).zip(self.derivatives.iter().rev()) {
            let term = derivative * self.lms_coefficient(order, i, k);
            update = Some(match update {
                Some(acc) => acc + term,
                None => term,
            });
        }
        self.schedule.index.step = Some(i + 1);
        Ok(match update {
            Some(update) => sample + update,
            None => sample.shallow_clone(),
        })
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
