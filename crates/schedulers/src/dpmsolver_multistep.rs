//! DPMSolverMultistepScheduler, after `diffusers/schedulers/scheduling_dpmsolver_multistep.py`
//! (DPM-Solver++, Lu et al., 2211.01095): multistep solvers of order 1–3 in the data-prediction
//! form, deterministic (`dpmsolver++`) or SDE (`sde-dpmsolver++`, noise from the request's generator).

use autopipe_rng::Generator;
use serde::Deserialize;
use serde_json::Value;
use tch::{Kind, Tensor};

use crate::config::{
    parse, unsupported, BetaSchedule, PredictionType, SchedulerConfig, Thresholding,
    TimestepSpacing,
};
use crate::scalar::S;
use crate::schedule::{
    self, check_shapes, check_steps, FinalSigmasType, SigmaRamp, SigmaRampConfig, StepIndex,
};
use crate::{Error, Result, Scheduler};

const CLASS: &str = "DPMSolverMultistepScheduler";

/// diffusers' `algorithm_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum AlgorithmType {
    /// DPM-Solver++ (data prediction, deterministic).
    #[default]
    #[serde(rename = "dpmsolver++")]
    DpmSolverPlusPlus,
    /// SDE DPM-Solver++ (data prediction, fresh noise each step).
    #[serde(rename = "sde-dpmsolver++")]
    SdeDpmSolverPlusPlus,
    /// DEIS; diffusers replaces it with `dpmsolver++`.
    #[serde(rename = "deis")]
    Deis,
    /// The deprecated noise-prediction DPM-Solver (not supported here).
    #[serde(rename = "dpmsolver")]
    DpmSolver,
    /// The deprecated noise-prediction SDE DPM-Solver (not supported here).
    #[serde(rename = "sde-dpmsolver")]
    SdeDpmSolver,
}

/// diffusers' `solver_type` for the second-order step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SolverType {
    /// The midpoint rule (diffusers' default).
    #[default]
    Midpoint,
    /// Heun's rule.
    Heun,
    /// UniPC/DEIS names; diffusers replaces them with `midpoint`.
    #[serde(alias = "bh1", alias = "bh2")]
    Logrho,
}

/// diffusers' `variance_type` for DPM-Solver (models that also predict a variance).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpmVarianceType {
    /// The model's output carries a learned variance after the first 3 channels.
    Learned,
    /// As `learned`, in the interpolated-range form.
    LearnedRange,
}

fn default_solver_order() -> usize {
    2
}
fn default_lambda_min_clipped() -> f64 {
    f64::NEG_INFINITY
}

/// DPMSolverMultistepScheduler's own `scheduler_config.json` fields.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DPMSolverMultistepSchedulerConfig {
    /// `solver_order` (default 2; 1, 2 or 3).
    #[serde(default = "default_solver_order")]
    pub solver_order: usize,
    /// `algorithm_type` (default dpmsolver++).
    #[serde(default)]
    pub algorithm_type: AlgorithmType,
    /// `solver_type` (default midpoint).
    #[serde(default)]
    pub solver_type: SolverType,
    /// `lower_order_final` (default true): first/second order at the end of short schedules.
    #[serde(default = "crate::config::default_true")]
    pub lower_order_final: bool,
    /// `euler_at_final` (default false): a first-order last step.
    #[serde(default)]
    pub euler_at_final: bool,
    /// `use_lu_lambdas` (default false; not supported here).
    #[serde(default)]
    pub use_lu_lambdas: bool,
    /// `use_flow_sigmas` (default false; not supported here).
    #[serde(default)]
    pub use_flow_sigmas: bool,
    /// `final_sigmas_type` (default zero).
    #[serde(default)]
    pub final_sigmas_type: FinalSigmasType,
    /// `lambda_min_clipped` (default -inf): truncates the schedule where log-SNR falls below it.
    #[serde(default = "default_lambda_min_clipped")]
    pub lambda_min_clipped: f64,
    /// `variance_type` (default none).
    #[serde(default)]
    pub variance_type: Option<DpmVarianceType>,
    /// `rescale_betas_zero_snr` (default false).
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// Karras / exponential sigma ramps.
    #[serde(flatten)]
    pub sigmas: SigmaRampConfig,
    /// Dynamic thresholding options.
    #[serde(flatten)]
    pub thresholding: Thresholding,
}

/// diffusers' DPMSolverMultistepScheduler (DPM-Solver++ and SDE DPM-Solver++).
#[derive(Debug)]
pub struct DPMSolverMultistepScheduler {
    config: SchedulerConfig,
    options: DPMSolverMultistepSchedulerConfig,
    ramp: Option<SigmaRamp>,
    sde: bool,
    alphas_cumprod: Tensor,
    lambda_t: Vec<f32>,
    sigmas: Tensor,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    index: StepIndex,
}

/// `_sigma_to_alpha_sigma_t`: `alpha_t = 1 / ((sigma**2 + 1) ** 0.5)`, `sigma_t = sigma * alpha_t`.
fn alpha_sigma(sigma: &S) -> (S, S) {
    let alpha_t = (sigma.sq() + 1.0).sqrt().rdiv(1.0);
    let sigma_t = sigma * &alpha_t;
    (alpha_t, sigma_t)
}

/// log-SNR `torch.log(alpha_t) - torch.log(sigma_t)`.
fn lambda(alpha_t: &S, sigma_t: &S) -> S {
    alpha_t.ln() - sigma_t.ln()
}

impl DPMSolverMultistepScheduler {
    /// Builds the scheduler from `scheduler_config.json`.
    pub fn from_config(json: &Value) -> Result<Self> {
        let config = SchedulerConfig::parse(CLASS, json, TimestepSpacing::Linspace)?;
        config.require_prediction(&[
            PredictionType::Epsilon,
            PredictionType::Sample,
            PredictionType::VPrediction,
        ])?;
        let mut options: DPMSolverMultistepSchedulerConfig = parse(CLASS, json)?;
        let ramp = options.sigmas.ramp(CLASS)?;
        match options.algorithm_type {
            AlgorithmType::Deis => options.algorithm_type = AlgorithmType::DpmSolverPlusPlus,
            AlgorithmType::DpmSolver => {
                return Err(unsupported(CLASS, "algorithm_type", "dpmsolver"))
            }
            AlgorithmType::SdeDpmSolver => {
                return Err(unsupported(CLASS, "algorithm_type", "sde-dpmsolver"))
            }
            _ => {}
        }
        if options.solver_type == SolverType::Logrho {
            options.solver_type = SolverType::Midpoint;
        }
        if !(1..=3).contains(&options.solver_order) {
            return Err(unsupported(
                CLASS,
                "solver_order",
                options.solver_order.to_string(),
            ));
        }
        if options.use_lu_lambdas {
            return Err(unsupported(CLASS, "use_lu_lambdas", "true"));
        }
        if options.use_flow_sigmas {
            return Err(unsupported(CLASS, "use_flow_sigmas", "true"));
        }
        let betas = schedule::betas(&config, false, options.rescale_betas_zero_snr)?;
        let alphas_cumprod = schedule::alphas_cumprod(&betas, options.rescale_betas_zero_snr);
        let lambda_t = schedule::f32_values(
            &(alphas_cumprod.sqrt().log()
                - (alphas_cumprod.ones_like() - &alphas_cumprod).sqrt().log()),
        )?;
        let sigmas = schedule::train_sigmas(&alphas_cumprod);
        let train = config.num_train_timesteps;
        let timesteps = schedule::linspace(0.0, (train - 1) as f64, train)
            .into_iter()
            .rev()
            .map(|t| f64::from(t as f32))
            .collect();
        Ok(Self {
            sde: options.algorithm_type == AlgorithmType::SdeDpmSolverPlusPlus,
            model_outputs: (0..options.solver_order).map(|_| None).collect(),
            config,
            options,
            ramp,
            alphas_cumprod,
            lambda_t,
            sigmas,
            timesteps,
            num_inference_steps: None,
            lower_order_nums: 0,
            index: StepIndex::default(),
        })
    }

    /// The class-specific config.
    pub fn options(&self) -> &DPMSolverMultistepSchedulerConfig {
        &self.options
    }

    /// diffusers' `sigmas` (float32, one more than the timesteps after `set_timesteps`).
    pub fn sigmas(&self) -> &Tensor {
        &self.sigmas
    }

    fn sigma(&self, i: usize) -> S {
        S::at(&self.sigmas, i)
    }

    /// diffusers' `index_for_timestep`: the second match if repeated, the last step if absent.
    fn index_for_timestep(timesteps: &[f64], timestep: f64) -> usize {
        schedule::index_for_timestep(timesteps, timestep)
            .unwrap_or(timesteps.len().saturating_sub(1))
    }

    /// The integer timesteps of the configured spacing, before any sigma ramp.
    fn spaced_timesteps(&self, n: usize) -> Vec<f64> {
        let train = self.config.num_train_timesteps;
        // searchsorted(flip(lambda_t), lambda_min_clipped): how many log-SNRs lie below the clip.
        let clipped = self
            .lambda_t
            .iter()
            .filter(|&&l| f64::from(l) < self.options.lambda_min_clipped)
            .count();
        let last_timestep = train - clipped;
        match self.config.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut t: Vec<f64> = schedule::linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                    .into_iter()
                    .rev()
                    .map(f64::round_ties_even)
                    .collect();
                t.pop();
                t
            }
            TimestepSpacing::Leading => {
                let ratio = last_timestep / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio) as f64 + self.config.steps_offset as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                schedule::arange(last_timestep as f64, 0.0, -(train as f64 / n as f64))
                    .into_iter()
                    .map(|t| t.round_ties_even() - 1.0)
                    .collect()
            }
        }
    }

    /// diffusers' `convert_model_output` for the `++` algorithms: the predicted x0.
    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        i: usize,
    ) -> Result<Tensor> {
        let model_output = match (self.config.prediction_type, self.options.variance_type) {
            (PredictionType::Epsilon, Some(_)) => model_output.f_narrow(1, 0, 3)?,
            _ => model_output.shallow_clone(),
        };
        check_shapes(CLASS, &model_output, sample)?;
        let (alpha_t, sigma_t) = alpha_sigma(&self.sigma(i));
        let x0_pred = match self.config.prediction_type {
            PredictionType::Epsilon => (sample - sigma_t.t() * model_output) / alpha_t.t(),
            PredictionType::Sample => model_output.shallow_clone(),
            PredictionType::VPrediction => alpha_t.t() * sample - sigma_t.t() * model_output,
            other => return Err(unsupported(CLASS, "prediction_type", format!("{other:?}"))),
        };
        schedule::clip_or_threshold(x0_pred, &self.options.thresholding, None)
    }

    /// The model outputs of the last `k` steps, newest first.
    fn history(&self, k: usize) -> Result<Vec<&Tensor>> {
        self.model_outputs
            .iter()
            .rev()
            .take(k)
            .map(|m| {
                m.as_ref().ok_or(Error::InvalidArgument {
                    class: CLASS,
                    message: "missing multistep history".into(),
                })
            })
            .collect()
    }

    /// The solver update of the given order from step `i` (diffusers' `dpm_solver_first_order_update`,
    /// `multistep_dpm_solver_second_order_update`, `multistep_dpm_solver_third_order_update`).
    // Out-of-place sums as in diffusers: `x += t` would keep x's dtype instead of promoting.
    #[allow(clippy::assign_op_pattern)]
    fn update(
        &self,
        order: usize,
        i: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        if i + 1 < order {
            return Err(Error::InvalidArgument {
                class: CLASS,
                message: format!("order {order} update at step {i}"),
            });
        }
        let m = self.history(order)?;
        let (alpha_t, sigma_t) = alpha_sigma(&self.sigma(i + 1));
        let (alpha_s0, sigma_s0) = alpha_sigma(&self.sigma(i));
        let lambda_t = lambda(&alpha_t, &sigma_t);
        let lambda_s0 = lambda(&alpha_s0, &sigma_s0);
        let h = &lambda_t - &lambda_s0;
        let exp_neg_h = (-&h).exp();
        let exp_neg_2h = (&h * -2.0).exp();

        // D1 and D2, the divided differences of the model-output history.
        let (d1, d2) = match order {
            1 => (None, None),
            2 => {
                let (alpha_s1, sigma_s1) = alpha_sigma(&self.sigma(i - 1));
                let r0 = (&lambda_s0 - lambda(&alpha_s1, &sigma_s1)) / &h;
                (Some(r0.rdiv(1.0).t() * (m[0] - m[1])), None)
            }
            _ => {
                let (alpha_s1, sigma_s1) = alpha_sigma(&self.sigma(i - 1));
                let (alpha_s2, sigma_s2) = alpha_sigma(&self.sigma(i - 2));
                let lambda_s1 = lambda(&alpha_s1, &sigma_s1);
                let r0 = (&lambda_s0 - &lambda_s1) / &h;
                let r1 = (&lambda_s1 - lambda(&alpha_s2, &sigma_s2)) / &h;
                let d1_0 = r0.rdiv(1.0).t() * (m[0] - m[1]);
                let d1_1 = r1.rdiv(1.0).t() * (m[1] - m[2]);
                let d1 = &d1_0 + (&r0 / (&r0 + &r1)).t() * (&d1_0 - &d1_1);
                let d2 = (&r0 + &r1).rdiv(1.0).t() * (&d1_0 - &d1_1);
                (Some(d1), Some(d2))
            }
        };
        let heun = self.options.solver_type == SolverType::Heun;
        let x_t = if self.sde {
            let one_minus = exp_neg_2h.rsub(1.0);
            let mut x = (&sigma_t / &sigma_s0 * &exp_neg_h).t() * sample
                + (&alpha_t * &one_minus).t() * m[0];
            if let Some(d1) = &d1 {
                let c1 = if order == 2 && !heun {
                    (&alpha_t * &one_minus) * 0.5
                } else {
                    &alpha_t * (&one_minus / (&h * -2.0) + 1.0)
                };
                x = x + c1.t() * d1;
            }
            if let Some(d2) = &d2 {
                let c2 = &alpha_t * ((&one_minus - &h * 2.0) / (&h * 2.0).sq() - 0.5);
                x = x + c2.t() * d2;
            }
            match noise {
                Some(noise) => x + (&sigma_t * one_minus.sqrt()).t() * noise,
                None => x,
            }
        } else {
            let exp_m1 = &exp_neg_h - 1.0;
            let mut x = (&sigma_t / &sigma_s0).t() * sample - (&alpha_t * &exp_m1).t() * m[0];
            if let Some(d1) = &d1 {
                if order == 2 && !heun {
                    x = x - ((&alpha_t * &exp_m1) * 0.5).t() * d1;
                } else {
                    x = x + (&alpha_t * (&exp_m1 / &h + 1.0)).t() * d1;
                }
            }
            if let Some(d2) = &d2 {
                x = x - (&alpha_t * ((&exp_m1 + &h) / h.sq() - 0.5)).t() * d2;
            }
            x
        };
        Ok(x_t)
    }
}

impl Scheduler for DPMSolverMultistepScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        check_steps(CLASS, num_inference_steps)?;
        let n = num_inference_steps;
        let mut timesteps = self.spaced_timesteps(n);
        let train_sigmas = schedule::f32_values(&schedule::train_sigmas(&self.alphas_cumprod))?;
        let log_sigmas = schedule::log_f32(&train_sigmas);
        let sigmas: Vec<f64> = match self.ramp {
            Some(ramp) => {
                let flipped: Vec<f64> = train_sigmas.iter().rev().map(|&s| f64::from(s)).collect();
                let (sigmas, t) = self
                    .options
                    .sigmas
                    .apply(ramp, &flipped, n, &log_sigmas, true);
                let round = ramp == SigmaRamp::Karras
                    && self.config.beta_schedule != BetaSchedule::SquaredcosCapV2;
                // Unrounded timesteps are truncated by diffusers' cast to int64.
                timesteps = t
                    .into_iter()
                    .map(|t| {
                        if round {
                            t.round_ties_even()
                        } else {
                            t.trunc()
                        }
                    })
                    .collect();
                sigmas
            }
            None => timesteps
                .iter()
                .map(|&t| schedule::interp(t, &train_sigmas))
                .collect(),
        };
        let sigma_last = match self.options.final_sigmas_type {
            FinalSigmasType::SigmaMin => schedule::sigma_min(&self.alphas_cumprod),
            FinalSigmasType::Zero => 0.0,
        };
        let sigmas: Vec<f32> = sigmas
            .iter()
            .map(|&s| s as f32)
            .chain(std::iter::once(sigma_last))
            .collect();
        self.sigmas = Tensor::from_slice(&sigmas);
        self.num_inference_steps = Some(timesteps.len());
        self.timesteps = timesteps;
        self.model_outputs = (0..self.options.solver_order).map(|_| None).collect();
        self.lower_order_nums = 0;
        self.index = StepIndex::default();
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
        self.num_inference_steps
            .ok_or(Error::TimestepsNotSet(CLASS))?;
        let timesteps = &self.timesteps;
        let i = self
            .index
            .ensure(|| Some(Self::index_for_timestep(timesteps, timestep)))
            .unwrap_or(0);
        if i + 1 >= self.sigmas.size()[0] as usize {
            return Err(Error::InvalidArgument {
                class: CLASS,
                message: format!("step index {i} is past the last step"),
            });
        }
        let len = self.timesteps.len();
        let short = self.options.lower_order_final && len < 15;
        let lower_order_final = i == len - 1
            && (self.options.euler_at_final
                || short
                || self.options.final_sigmas_type == FinalSigmasType::Zero);
        let lower_order_second = len >= 2 && i == len - 2 && short;

        let model_output = self.convert_model_output(model_output, sample, i)?;
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(model_output.shallow_clone()));

        let sample = sample.to_kind(Kind::Float);
        let noise = self
            .sde
            .then(|| generator.randn(&model_output.size(), Kind::Float, model_output.device()));
        let order = self.options.solver_order;
        let step_order = if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            1
        } else if order == 2 || self.lower_order_nums < 2 || lower_order_second {
            2
        } else {
            3
        };
        let prev_sample = self.update(step_order, i, &sample, noise.as_ref())?;
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.index.step = Some(i + 1);
        Ok(prev_sample.to_kind(model_output.kind()))
    }

    fn add_noise(&self, original_samples: &Tensor, noise: &Tensor, timestep: f64) -> Tensor {
        let i = self
            .index
            .for_add_noise(|| Self::index_for_timestep(&self.timesteps, timestep));
        let i = i.min(self.sigmas.size()[0] as usize - 1);
        let sigma = schedule::scalar_like(
            self.sigmas.double_value(&[i as i64]) as f32,
            original_samples,
        );
        let alpha_t = (sigma.pow_tensor_scalar(2) + 1.0)
            .pow_tensor_scalar(0.5)
            .reciprocal()
            * 1.0;
        let sigma_t = &sigma * &alpha_t;
        alpha_t * original_samples + sigma_t * noise
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.index.begin = Some(begin_index);
    }

    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn class_name(&self) -> &'static str {
        CLASS
    }
}
