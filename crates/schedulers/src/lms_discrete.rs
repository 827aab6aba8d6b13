//! LMSDiscreteScheduler, after `diffusers/schedulers/scheduling_lms_discrete.py` (k-diffusion's
//! `sample_lms`): a linear multistep method of order 4 on the sigma ODE.
//!
//! diffusers integrates each Lagrange basis polynomial (degree at most 3) with `scipy.integrate.quad`.
//! For such an integrand QUADPACK's QAGS accepts its first 21-point Gauss-Kronrod estimate, which
//! is exact for polynomials up to degree 31; [`gauss_kronrod_21`] is that rule with QUADPACK's
//! constants and summation order, and the integrand is evaluated in float32 as diffusers' tensor
//! arithmetic does, so the coefficients match diffusers' to the last bit.

use autopipe_rng::Generator;
use serde::Deserialize;
use serde_json::Value;
use tch::Tensor;

use crate::config::{parse, PredictionType, SchedulerConfig, TimestepSpacing};
use crate::schedule::{
    self, check_shapes, check_steps, SigmaRamp, SigmaRampConfig, SigmaSchedule, SpacedSigmas,
};
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
    alphas_cumprod: Tensor,
    schedule: SigmaSchedule,
    sigma_values: Vec<f32>,
    derivatives: Vec<Tensor>,
}

impl LMSDiscreteScheduler {
    /// Builds the scheduler from `scheduler_config.json`.
    pub fn from_config(json: &Value) -> Result<Self> {
        let config = SchedulerConfig::parse(CLASS, json, TimestepSpacing::Linspace)?;
        config.require_prediction(&[
            PredictionType::Epsilon,
            PredictionType::Sample,
            PredictionType::VPrediction,
        ])?;
        let options: LMSDiscreteSchedulerConfig = parse(CLASS, json)?;
        let ramp = options.sigmas.ramp(CLASS)?;
        let betas = schedule::betas(&config, false, false)?;
        let alphas_cumprod = schedule::alphas_cumprod(&betas, false);
        let schedule =
            SigmaSchedule::training(CLASS, &schedule::train_sigmas(&alphas_cumprod), Vec::new());
        let mut this = Self {
            config,
            options,
            ramp,
            alphas_cumprod,
            schedule,
            sigma_values: Vec::new(),
            derivatives: Vec::new(),
        };
        // diffusers' __init__ ends with set_timesteps(num_train_timesteps).
        this.set_timesteps(this.config.num_train_timesteps)?;
        Ok(this)
    }

    /// The class-specific config.
    pub fn options(&self) -> &LMSDiscreteSchedulerConfig {
        &self.options
    }

    /// diffusers' `sigmas` (float32, one more than the timesteps).
    pub fn sigmas(&self) -> &Tensor {
        &self.schedule.sigmas
    }

    /// diffusers' `get_lms_coefficient`: the integral of the `current_order`-th Lagrange basis
    /// polynomial over the sigmas `t - k` (k < order), from `sigmas[t]` to `sigmas[t + 1]`.
    fn lms_coefficient(&self, order: usize, t: usize, current_order: usize) -> f64 {
        let sigmas = &self.sigma_values;
        // `lms_derivative(tau)`: `tau - sigmas[..]` etc. are float32 0-d tensor ops in diffusers.
        let basis = |tau: f64| {
            let tau = tau as f32;
            let product =
                (0..order)
                    .filter(|&k| k != current_order)
                    .fold(None, |prod: Option<f32>, k| {
                        let factor =
                            (tau - sigmas[t - k]) / (sigmas[t - current_order] - sigmas[t - k]);
                        Some(prod.map_or(factor, |p| p * factor))
                    });
            product.map_or(1.0, f64::from)
        };
        gauss_kronrod_21(basis, f64::from(sigmas[t]), f64::from(sigmas[t + 1]))
    }
}

/// QUADPACK's 21-point Gauss-Kronrod rule (`dqk21`): abscissae and weights of the Kronrod rule,
/// and the weights of the embedded 10-point Gauss rule (only used for QUADPACK's error estimate).
#[allow(clippy::excessive_precision)] // QUADPACK's literals, verbatim.
const XGK: [f64; 11] = [
    0.995657163025808080735527280689003,
    0.973906528517171720077964012084452,
    0.930157491355708226001207180059508,
    0.865063366688984510732096688423493,
    0.780817726586416897063717578345042,
    0.679409568299024406234327365114874,
    0.562757134668604683339000099272694,
    0.433395394129247190799265943165784,
    0.294392862701460198131126603103866,
    0.148874338981631210884826001129720,
    0.000000000000000000000000000000000,
];
#[allow(clippy::excessive_precision)] // QUADPACK's literals, verbatim.
const WGK: [f64; 11] = [
    0.011694638867371874278064396062192,
    0.032558162307964727478818972459390,
    0.054755896574351996031381300244580,
    0.075039674810919952767043140916190,
    0.093125454583697605535065465083366,
    0.109387158802297641899210590325805,
    0.123491976262065851077600525478996,
    0.134709217311473325928054001771707,
    0.142775938577060080797094273138717,
    0.147739104901338491374841515972068,
    0.149445554002916905664936468389821,
];

/// The integral of `f` over `[a, b]` by QUADPACK's `dqk21`, summed in its order.
fn gauss_kronrod_21(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    let centr = 0.5 * (a + b);
    let hlgth = 0.5 * (b - a);
    let mut resk = WGK[10] * f(centr);
    // QUADPACK adds the Gauss points (odd 0-based indices) first, then the Kronrod-only ones.
    for j in (1..10).step_by(2).chain((0..10).step_by(2)) {
        let absc = hlgth * XGK[j];
        let fsum = f(centr - absc) + f(centr + absc);
        resk += WGK[j] * fsum;
    }
    resk * hlgth
}

impl Scheduler for LMSDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        check_steps(CLASS, num_inference_steps)?;
        let n = num_inference_steps;
        let mut spaced = SpacedSigmas::new(&self.config, &self.alphas_cumprod, n)?;
        // LMS's `_convert_to_karras` ignores the config's sigma_min/sigma_max.
        spaced.apply_ramp(&self.options.sigmas, self.ramp, false);
        self.schedule
            .reset(&spaced.sigmas, 0.0, spaced.float32_timesteps());
        self.sigma_values = schedule::f32_values(&self.schedule.sigmas)?;
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

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _generator: &mut Generator,
    ) -> Result<Tensor> {
        check_shapes(CLASS, model_output, sample)?;
        let i = self.schedule.step_index(timestep)?;
        let sigma = self.schedule.sigma(i);
        let pred_original_sample = schedule::pred_original_sample_sigma(
            CLASS,
            self.config.prediction_type,
            model_output,
            sample,
            &sigma,
            false,
        )?;
        let derivative = (sample - pred_original_sample) / sigma.t();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauss_kronrod_integrates_cubics() {
        let cubic = |x: f64| 4.0 * x * x * x - 3.0 * x * x + 2.0 * x - 1.0;
        // Antiderivative x^4 - x^3 + x^2 - x from -1.5 to 2.5.
        let exact = |x: f64| x.powi(4) - x.powi(3) + x * x - x;
        let got = gauss_kronrod_21(cubic, -1.5, 2.5);
        assert!((got - (exact(2.5) - exact(-1.5))).abs() < 1e-12, "{got}");
        // Reversed bounds give the negated integral, as in quad.
        assert!((gauss_kronrod_21(cubic, 2.5, -1.5) + got).abs() < 1e-12);
    }
}
