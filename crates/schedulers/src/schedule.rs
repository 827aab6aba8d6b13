//! Pieces the schedulers share, each a port of the function diffusers copies between its scheduler
//! files: beta schedules (`betas_for_alpha_bar`, `rescale_zero_terminal_snr`), the numpy ranges the
//! timestep spacings are built from, sigma helpers (`_sigma_to_t`, `_convert_to_karras`,
//! `_convert_to_exponential`), step-index tracking (`index_for_timestep`, `_init_step_index`),
//! `add_noise` and `_threshold_sample`.

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::config::{
    unsupported, BetaSchedule, PredictionType, SchedulerConfig, Thresholding, TimestepSpacing,
};
use crate::scalar::S;
use crate::{Error, Result};

/// diffusers' `final_sigmas_type`: the sigma appended after the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    /// Zero: the last step lands on the clean sample.
    #[default]
    Zero,
    /// The smallest training sigma.
    SigmaMin,
}

/// The training betas as a float32 CPU tensor, as each scheduler's `__init__` builds them.
/// `extended` admits DDPM's extra `sigmoid`/`laplace` schedules.
pub(crate) fn betas(
    cfg: &SchedulerConfig,
    extended: bool,
    rescale_zero_snr: bool,
) -> Result<Tensor> {
    let n = cfg.num_train_timesteps as i64;
    let opts = (Kind::Float, Device::Cpu);
    let betas = if let Some(trained) = &cfg.trained_betas {
        Tensor::from_slice(trained).to_kind(Kind::Float)
    } else {
        match cfg.beta_schedule {
            BetaSchedule::Linear => Tensor::linspace(cfg.beta_start, cfg.beta_end, n, opts),
            BetaSchedule::ScaledLinear => {
                Tensor::linspace(cfg.beta_start.powf(0.5), cfg.beta_end.powf(0.5), n, opts)
                    .pow_tensor_scalar(2)
            }
            BetaSchedule::SquaredcosCapV2 => {
                betas_for_alpha_bar(cfg.num_train_timesteps, AlphaBar::Cosine)
            }
            BetaSchedule::Sigmoid if extended => {
                Tensor::linspace(-6.0, 6.0, n, opts).sigmoid() * (cfg.beta_end - cfg.beta_start)
                    + cfg.beta_start
            }
            BetaSchedule::Laplace if extended => {
                betas_for_alpha_bar(cfg.num_train_timesteps, AlphaBar::Laplace)
            }
            other => {
                return Err(unsupported(
                    cfg.class_name,
                    "beta_schedule",
                    format!("{other:?}"),
                ))
            }
        }
    };
    Ok(if rescale_zero_snr {
        rescale_zero_terminal_snr(&betas)
    } else {
        betas
    })
}

enum AlphaBar {
    Cosine,
    Laplace,
}

/// diffusers' `betas_for_alpha_bar` (max_beta 0.999): float64 Python math, stored as float32.
fn betas_for_alpha_bar(num_diffusion_timesteps: usize, transform: AlphaBar) -> Tensor {
    let alpha_bar = |t: f64| match transform {
        AlphaBar::Cosine => ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2),
        AlphaBar::Laplace => {
            let lmb = -0.5 * (0.5 - t).signum() * (1.0 - 2.0 * (0.5 - t).abs() + 1e-6).ln();
            let snr = lmb.exp();
            (snr / (1.0 + snr)).sqrt()
        }
    };
    let n = num_diffusion_timesteps as f64;
    let betas: Vec<f64> = (0..num_diffusion_timesteps)
        .map(|i| {
            let (t1, t2) = (i as f64 / n, (i + 1) as f64 / n);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
        })
        .collect();
    Tensor::from_slice(&betas).to_kind(Kind::Float)
}

/// diffusers' `rescale_zero_terminal_snr` (float32 torch ops).
fn rescale_zero_terminal_snr(betas: &Tensor) -> Tensor {
    let alphas = betas.ones_like() - betas;
    let alphas_bar_sqrt = alphas.cumprod(0, None).sqrt();
    let first = alphas_bar_sqrt.get(0);
    let last = alphas_bar_sqrt.get(-1);
    let shifted = &alphas_bar_sqrt - &last;
    let scaled = shifted * (&first / (&first - &last));
    let alphas_bar = scaled.pow_tensor_scalar(2);
    let n = alphas_bar.size()[0];
    let ratios = alphas_bar.narrow(0, 1, n - 1) / alphas_bar.narrow(0, 0, n - 1);
    let alphas = Tensor::cat(&[alphas_bar.narrow(0, 0, 1), ratios], 0);
    alphas.ones_like() - alphas
}

/// `torch.cumprod(1 - betas)`; with `zero_snr_fix` the last entry is set to 2**-24 as the
/// sigma-based schedulers do after rescaling.
pub(crate) fn alphas_cumprod(betas: &Tensor, zero_snr_fix: bool) -> Tensor {
    let alphas_cumprod = (betas.ones_like() - betas).cumprod(0, None);
    if zero_snr_fix {
        let _ = alphas_cumprod.get(-1).fill_(2f64.powi(-24));
    }
    alphas_cumprod
}

/// A 1-D float32 CPU tensor's values.
pub(crate) fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(
        &t.to_kind(Kind::Float).to_device(Device::Cpu).contiguous(),
    )?)
}

/// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` (float32 torch ops), ascending in training time.
pub(crate) fn train_sigmas(alphas_cumprod: &Tensor) -> Tensor {
    ((alphas_cumprod.ones_like() - alphas_cumprod) / alphas_cumprod).pow_tensor_scalar(0.5)
}

/// `((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5`: the smallest training sigma, as
/// `final_sigmas_type="sigma_min"` appends it.
pub(crate) fn sigma_min(alphas_cumprod: &Tensor) -> f32 {
    let a = S::at(alphas_cumprod, 0);
    (a.rsub(1.0) / &a).sqrt().value()
}

/// `np.linspace(start, stop, num)` (float64).
pub(crate) fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let div = (num - 1) as f64;
    let delta = stop - start;
    let step = delta / div;
    let mut y: Vec<f64> = (0..num)
        .map(|i| {
            let i = i as f64;
            if num > 1 && step == 0.0 {
                i / div * delta + start
            } else if num > 1 {
                i * step + start
            } else {
                i * delta + start
            }
        })
        .collect();
    if num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` for a float step: numpy fills `start + i * ((start + step) - start)`.
pub(crate) fn arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// The integer timesteps DDIM and DDPM use (descending): diffusers' three `timestep_spacing` branches.
/// PNDM's `_timesteps` are the same values ascending.
pub(crate) fn discrete_timesteps(cfg: &SchedulerConfig, n: usize) -> Vec<i64> {
    let train = cfg.num_train_timesteps;
    match cfg.timestep_spacing {
        TimestepSpacing::Linspace => linspace(0.0, (train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| t.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (train / n) as i64;
            (0..n as i64)
                .rev()
                .map(|i| i * ratio + cfg.steps_offset)
                .collect()
        }
        TimestepSpacing::Trailing => arange(train as f64, 0.0, -(train as f64 / n as f64))
            .into_iter()
            .map(|t| t.round_ties_even() as i64 - 1)
            .collect(),
    }
}

/// The float32 timesteps the sigma schedulers (Euler, Euler ancestral, LMS) use, descending.
pub(crate) fn sigma_timesteps(cfg: &SchedulerConfig, n: usize) -> Vec<f32> {
    match cfg.timestep_spacing {
        TimestepSpacing::Linspace => linspace(0.0, (cfg.num_train_timesteps - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        _ => discrete_timesteps(cfg, n)
            .into_iter()
            .map(|t| t as f32)
            .collect(),
    }
}

/// The start of the sigma schedulers' `set_timesteps` (Euler, Euler ancestral, LMS): the spaced
/// float32 timesteps, the training sigmas and their logs, and `np.interp` of the sigmas at the
/// timesteps.
pub(crate) struct SpacedSigmas {
    pub timesteps: Vec<f64>,
    pub train_sigmas: Vec<f32>,
    pub log_sigmas: Vec<f32>,
    pub sigmas: Vec<f64>,
}

impl SpacedSigmas {
    /// The schedule for `n` steps of `cfg` over `alphas_cumprod`.
    pub fn new(cfg: &SchedulerConfig, alphas_cumprod: &Tensor, n: usize) -> Result<Self> {
        let timesteps: Vec<f64> = sigma_timesteps(cfg, n).into_iter().map(f64::from).collect();
        let train_sigmas = f32_values(&train_sigmas(alphas_cumprod))?;
        let log_sigmas = log_f32(&train_sigmas);
        let sigmas = timesteps
            .iter()
            .map(|&t| interp(t, &train_sigmas))
            .collect();
        Ok(Self {
            timesteps,
            train_sigmas,
            log_sigmas,
            sigmas,
        })
    }

    /// Replaces the sigmas and timesteps by a Karras/exponential ramp when one is configured.
    pub fn apply_ramp(
        &mut self,
        config: &SigmaRampConfig,
        ramp: Option<SigmaRamp>,
        karras_reads_bounds: bool,
    ) {
        if let Some(ramp) = ramp {
            let n = self.timesteps.len();
            (self.sigmas, self.timesteps) =
                config.apply(ramp, &self.sigmas, n, &self.log_sigmas, karras_reads_bounds);
        }
    }

    /// The timesteps as float32 values (`timesteps.astype(np.float32)`).
    pub fn float32_timesteps(&self) -> Vec<f64> {
        self.timesteps
            .iter()
            .map(|&t| f64::from(t as f32))
            .collect()
    }
}

/// `np.interp(x, np.arange(len(fp)), fp)` (float64 arithmetic on float32 table values).
pub(crate) fn interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x < 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    let (y0, y1) = (fp[j] as f64, fp[j + 1] as f64);
    if j as f64 == x {
        return y0;
    }
    let slope = (y1 - y0) / 1.0;
    let r = slope * (x - j as f64) + y0;
    if r.is_nan() {
        let r = slope * (x - (j + 1) as f64) + y1;
        if r.is_nan() && y0 == y1 {
            return y0;
        }
        return r;
    }
    r
}

/// `np.log` of a float32 array.
pub(crate) fn log_f32(values: &[f32]) -> Vec<f32> {
    values.iter().map(|v| v.ln()).collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of `sigma` (log-sigma interpolation).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    if log_sigmas.len() < 2 {
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    // argmax of cumsum(dists >= 0): the last index whose log sigma is <= log_sigma, else 0.
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len().saturating_sub(2));
    let high = low + 1;
    let (lo, hi) = (log_sigmas[low], log_sigmas[high]);
    let w = ((lo as f64 - log_sigma) / (lo - hi) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// diffusers' `_convert_to_karras` (rho 7) from `sigma_max` down to `sigma_min`.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// diffusers' `_convert_to_exponential`: log-uniform from `sigma_max` down to `sigma_min`.
pub(crate) fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// diffusers' `index_for_timestep` for the sigma schedulers: the second match when the timestep
/// occurs twice (so img2img starting mid-schedule does not skip a sigma), else the first.
pub(crate) fn index_for_timestep(schedule: &[f64], timestep: f64) -> Option<usize> {
    let mut matches = schedule
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == timestep)
        .map(|(i, _)| i);
    let first = matches.next()?;
    Some(matches.next().unwrap_or(first))
}

/// The index of the schedule entry closest to `timestep` (add_noise's fallback for a timestep
/// outside the schedule, where diffusers would raise).
pub(crate) fn nearest_index(schedule: &[f64], timestep: f64) -> usize {
    index_for_timestep(schedule, timestep).unwrap_or_else(|| {
        schedule
            .iter()
            .enumerate()
            .min_by(|a, b| (a.1 - timestep).abs().total_cmp(&(b.1 - timestep).abs()))
            .map_or(0, |(i, _)| i)
    })
}

/// diffusers' `_step_index` / `_begin_index` pair.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StepIndex {
    pub step: Option<usize>,
    pub begin: Option<usize>,
}

impl StepIndex {
    /// `_init_step_index` when no step index is set yet; `lookup` is the class's `index_for_timestep`.
    pub fn ensure(&mut self, lookup: impl FnOnce() -> Option<usize>) -> Option<usize> {
        if self.step.is_none() {
            self.step = match self.begin {
                Some(begin) => Some(begin),
                None => lookup(),
            };
        }
        self.step
    }

    /// The index `add_noise` uses: by timestep without a begin index, else the current step index,
    /// else the begin index.
    pub fn for_add_noise(&self, lookup: impl FnOnce() -> usize) -> usize {
        match (self.begin, self.step) {
            (None, _) => lookup(),
            (Some(_), Some(step)) => step,
            (Some(begin), None) => begin,
        }
    }
}

/// A scalar as a `[1, 1, …]` tensor of `like`'s kind and device (diffusers casts its float32
/// schedule tables to the sample's dtype before `add_noise` arithmetic).
pub(crate) fn scalar_like(value: f32, like: &Tensor) -> Tensor {
    let shape = vec![1i64; like.dim().max(1)];
    Tensor::from_slice(&[value])
        .to_kind(like.kind())
        .to_device(like.device())
        .reshape(shape)
}

/// `add_noise` of DDIM/DDPM/PNDM: `sqrt(alphas_cumprod[t]) * x0 + sqrt(1 - alphas_cumprod[t]) * noise`
/// with `alphas_cumprod` cast to the sample dtype first. A timestep outside the table is clamped
/// into it (diffusers would raise).
pub(crate) fn add_noise_alphas(
    alphas_cumprod: &Tensor,
    timestep: f64,
    original: &Tensor,
    noise: &Tensor,
) -> Tensor {
    let len = alphas_cumprod.size()[0];
    let t = (timestep.round() as i64).clamp(0, len - 1);
    let alpha_prod = scalar_like(alphas_cumprod.double_value(&[t]) as f32, original);
    let sqrt_alpha_prod = alpha_prod.pow_tensor_scalar(0.5);
    let sqrt_one_minus_alpha_prod = (alpha_prod.ones_like() - &alpha_prod).pow_tensor_scalar(0.5);
    sqrt_alpha_prod * original + sqrt_one_minus_alpha_prod * noise
}

/// diffusers' `_threshold_sample` (dynamic thresholding, Imagen).
pub(crate) fn threshold_sample(sample: &Tensor, ratio: f64, max_value: f64) -> Result<Tensor> {
    if sample.dim() < 2 {
        return Err(Error::InvalidArgument {
            class: "dynamic thresholding",
            message: format!(
                "sample shape {:?} has no batch and channel dimensions",
                sample.size()
            ),
        });
    }
    let kind = sample.kind();
    let shape = sample.size();
    let upcast = match kind {
        Kind::Float | Kind::Double => sample.shallow_clone(),
        _ => sample.to_kind(Kind::Float),
    };
    let flat = upcast.f_reshape([shape[0], -1])?;
    let s = flat.abs().f_quantile_scalar(ratio, 1, false, "linear")?;
    let s = s.clamp(1.0, max_value).unsqueeze(1);
    let neg = -&s;
    let clamped = flat.f_clamp_tensor(Some(&neg), Some(&s))? / &s;
    Ok(clamped.reshape(shape.as_slice()).to_kind(kind))
}

/// Errors unless `model_output` and `sample` have the same shape.
pub(crate) fn check_shapes(
    class: &'static str,
    model_output: &Tensor,
    sample: &Tensor,
) -> Result<()> {
    if model_output.size() == sample.size() {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            class,
            message: format!(
                "model_output shape {:?} does not match sample shape {:?}",
                model_output.size(),
                sample.size()
            ),
        })
    }
}

/// Errors on zero inference steps (diffusers would divide by zero).
pub(crate) fn check_steps(class: &'static str, num_inference_steps: usize) -> Result<()> {
    if num_inference_steps == 0 {
        return Err(Error::InvalidArgument {
            class,
            message: "num_inference_steps must be at least 1".into(),
        });
    }
    Ok(())
}

/// Errors when `num_inference_steps` exceeds `num_train_timesteps` (DDIM/DDPM check this).
pub(crate) fn check_not_above_train(
    cfg: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<()> {
    check_steps(cfg.class_name, num_inference_steps)?;
    if num_inference_steps > cfg.num_train_timesteps {
        return Err(Error::InvalidArgument {
            class: cfg.class_name,
            message: format!(
                "num_inference_steps {num_inference_steps} cannot be larger than num_train_timesteps {}",
                cfg.num_train_timesteps
            ),
        });
    }
    Ok(())
}

/// A training timestep as an index into `alphas_cumprod`; errors when it is outside the table.
pub(crate) fn train_index(class: &'static str, timestep: f64, len: usize) -> Result<usize> {
    let t = timestep.round();
    if t >= 0.0 && (t as usize) < len && t == timestep {
        Ok(t as usize)
    } else {
        Err(Error::TimestepNotInSchedule { class, timestep })
    }
}

/// `pred_original_sample` from the model output in the alpha parametrisation (DDIM, DDPM).
pub(crate) fn pred_original_sample(
    class: &'static str,
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_prod_t: &S,
) -> Result<Tensor> {
    let beta_prod_t = alpha_prod_t.rsub(1.0);
    Ok(match prediction_type {
        PredictionType::Epsilon => {
            (sample - beta_prod_t.sqrt().t() * model_output) / alpha_prod_t.sqrt().t()
        }
        PredictionType::Sample => model_output.shallow_clone(),
        PredictionType::VPrediction => {
            alpha_prod_t.sqrt().t() * sample - beta_prod_t.sqrt().t() * model_output
        }
        other => return Err(unsupported(class, "prediction_type", format!("{other:?}"))),
    })
}

/// Dynamic thresholding when configured, else `clamp(-clip_range, clip_range)` when `clip` is set.
pub(crate) fn clip_or_threshold(
    sample: Tensor,
    thresholding: &Thresholding,
    clip: Option<f64>,
) -> Result<Tensor> {
    if thresholding.thresholding {
        threshold_sample(
            &sample,
            thresholding.dynamic_thresholding_ratio,
            thresholding.sample_max_value,
        )
    } else if let Some(range) = clip {
        Ok(sample.clamp(-range, range))
    } else {
        Ok(sample)
    }
}

/// The sigma-ramp options of Euler, LMS and DPM-Solver (`use_karras_sigmas` etc.). `sigma_min` and
/// `sigma_max` are read even where the class does not declare them: diffusers registers unknown
/// config keys as hidden attributes and its `_convert_to_*` helpers look them up with `hasattr`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Default)]
pub struct SigmaRampConfig {
    /// `use_karras_sigmas` (default false).
    #[serde(default)]
    pub use_karras_sigmas: bool,
    /// `use_exponential_sigmas` (default false).
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    /// `use_beta_sigmas` (default false; not supported here: it needs scipy's beta quantile).
    #[serde(default)]
    pub use_beta_sigmas: bool,
    /// `sigma_min`: lower end of the ramp (default: the schedule's smallest sigma).
    #[serde(default)]
    pub sigma_min: Option<f64>,
    /// `sigma_max`: upper end of the ramp (default: the schedule's largest sigma).
    #[serde(default)]
    pub sigma_max: Option<f64>,
}

/// Which ramp replaces the interpolated sigmas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SigmaRamp {
    /// `_convert_to_karras`.
    Karras,
    /// `_convert_to_exponential`.
    Exponential,
}

impl SigmaRampConfig {
    /// The configured ramp; errors on more than one, or on beta sigmas.
    pub(crate) fn ramp(&self, class: &'static str) -> Result<Option<SigmaRamp>> {
        let set = [
            self.use_karras_sigmas,
            self.use_exponential_sigmas,
            self.use_beta_sigmas,
        ];
        if set.iter().filter(|&&b| b).count() > 1 {
            return Err(Error::Config {
                class,
                message: "only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be used".into(),
            });
        }
        if self.use_beta_sigmas {
            return Err(unsupported(class, "use_beta_sigmas", "true"));
        }
        Ok(if self.use_karras_sigmas {
            Some(SigmaRamp::Karras)
        } else if self.use_exponential_sigmas {
            Some(SigmaRamp::Exponential)
        } else {
            None
        })
    }

    /// The ramp's sigmas (descending, float64) and their fractional training timesteps.
    /// `in_sigmas` is the descending schedule the bounds default to; `karras_reads_bounds` is false
    /// for LMS, whose `_convert_to_karras` ignores `sigma_min`/`sigma_max`.
    pub(crate) fn apply(
        &self,
        ramp: SigmaRamp,
        in_sigmas: &[f64],
        n: usize,
        log_sigmas: &[f32],
        karras_reads_bounds: bool,
    ) -> (Vec<f64>, Vec<f64>) {
        let reads_bounds = ramp == SigmaRamp::Exponential || karras_reads_bounds;
        let default_min = in_sigmas.last().copied().unwrap_or(0.0);
        let default_max = in_sigmas.first().copied().unwrap_or(0.0);
        let (min, max) = if reads_bounds {
            (
                self.sigma_min.unwrap_or(default_min),
                self.sigma_max.unwrap_or(default_max),
            )
        } else {
            (default_min, default_max)
        };
        let sigmas = match ramp {
            SigmaRamp::Karras => karras_sigmas(min, max, n),
            SigmaRamp::Exponential => exponential_sigmas(min, max, n),
        };
        let timesteps = sigmas.iter().map(|&s| sigma_to_t(s, log_sigmas)).collect();
        (sigmas, timesteps)
    }
}

/// The schedule state shared by the sigma schedulers (Euler, Euler ancestral, LMS): `sigmas`
/// (float32, one more than the timesteps), `timesteps` and the step index.
#[derive(Debug)]
pub(crate) struct SigmaSchedule {
    pub class: &'static str,
    pub sigmas: Tensor,
    pub timesteps: Vec<f64>,
    pub index: StepIndex,
}

impl SigmaSchedule {
    /// The schedule before `set_timesteps`: every training sigma, descending, then 0.
    pub fn training(class: &'static str, train_sigmas: &Tensor, timesteps: Vec<f64>) -> Self {
        let sigmas = Tensor::cat(
            &[
                train_sigmas.flip([0]),
                Tensor::zeros([1], (Kind::Float, Device::Cpu)),
            ],
            0,
        );
        Self {
            class,
            sigmas,
            timesteps,
            index: StepIndex::default(),
        }
    }

    /// Replaces the schedule (`np.concatenate([sigmas, [last]]).astype(np.float32)`) and clears the
    /// step and begin indices.
    pub fn reset(&mut self, sigmas: &[f64], last: f32, timesteps: Vec<f64>) {
        let values: Vec<f32> = sigmas
            .iter()
            .map(|&s| s as f32)
            .chain(std::iter::once(last))
            .collect();
        self.sigmas = Tensor::from_slice(&values);
        self.timesteps = timesteps;
        self.index = StepIndex::default();
    }

    /// The number of sigmas.
    pub fn len(&self) -> usize {
        self.sigmas.size()[0] as usize
    }

    /// `sigmas[i]` as a 0-d tensor.
    pub fn sigma(&self, i: usize) -> S {
        S::at(&self.sigmas, i)
    }

    /// `init_noise_sigma`: the largest sigma, or `(max**2 + 1) ** 0.5` for leading spacing.
    pub fn init_noise_sigma(&self, spacing: TimestepSpacing) -> f64 {
        let max = S(self.sigmas.max());
        let sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max.sq() + 1.0).sqrt(),
        };
        f64::from(sigma.value())
    }

    /// `scale_model_input`: `sample / ((sigma**2 + 1) ** 0.5)`. A timestep outside the schedule
    /// leaves the sample unscaled and the step index unset, so the following `step` reports it.
    pub fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Tensor {
        let timesteps = &self.timesteps;
        match self
            .index
            .ensure(|| index_for_timestep(timesteps, timestep))
        {
            Some(i) if i < self.len() => sample / (self.sigma(i).sq() + 1.0).sqrt().t(),
            _ => sample.shallow_clone(),
        }
    }

    /// The step index for `step` (initialised from the timestep on the first call).
    pub fn step_index(&mut self, timestep: f64) -> Result<usize> {
        let timesteps = &self.timesteps;
        let class = self.class;
        let i = self
            .index
            .ensure(|| index_for_timestep(timesteps, timestep))
            .ok_or(Error::TimestepNotInSchedule { class, timestep })?;
        if i + 1 >= self.len() {
            return Err(Error::InvalidArgument {
                class,
                message: format!("step index {i} is past the last step"),
            });
        }
        Ok(i)
    }

    /// `add_noise`: `x0 + noise * sigma` at the timestep's (or the begin/step index's) sigma, cast
    /// to the sample dtype.
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Tensor {
        let i = self
            .index
            .for_add_noise(|| nearest_index(&self.timesteps, timestep))
            .min(self.len() - 1);
        original + noise * scalar_like(self.sigmas.double_value(&[i as i64]) as f32, original)
    }
}

/// `pred_original_sample` of the sigma (VE) parametrisation: Euler, Euler ancestral and LMS.
pub(crate) fn pred_original_sample_sigma(
    class: &'static str,
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: &S,
    allow_original_sample: bool,
) -> Result<Tensor> {
    Ok(match prediction_type {
        PredictionType::Epsilon => sample - sigma.t() * model_output,
        PredictionType::VPrediction => {
            model_output * (-sigma / (sigma.sq() + 1.0).sqrt()).t()
                + sample / (sigma.sq() + 1.0).t()
        }
        PredictionType::Sample => model_output.shallow_clone(),
        PredictionType::OriginalSample if allow_original_sample => model_output.shallow_clone(),
        other => return Err(unsupported(class, "prediction_type", format!("{other:?}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_numpy_endpoints_and_step() {
        let y = linspace(0.0, 999.0, 4);
        assert_eq!(y, vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(linspace(0.0, 1.0, 1), vec![0.0]);
    }

    #[test]
    fn arange_float_step_length_follows_numpy() {
        // np.arange(1000, 0, -1000/30) has 30 entries; np.arange(1000, 0, -1000/3) has 3.
        assert_eq!(arange(1000.0, 0.0, -1000.0 / 30.0).len(), 30);
        assert_eq!(arange(1000.0, 0.0, -1000.0 / 3.0).len(), 3);
    }

    #[test]
    fn interp_is_exact_at_integers_and_linear_between() {
        let fp = [1.0f32, 3.0, 7.0];
        assert_eq!(interp(1.0, &fp), 3.0);
        assert_eq!(interp(1.5, &fp), 5.0);
        assert_eq!(interp(-1.0, &fp), 1.0);
        assert_eq!(interp(5.0, &fp), 7.0);
    }

    #[test]
    fn index_for_timestep_prefers_the_second_duplicate() {
        let schedule = [901.0, 801.0, 801.0, 701.0];
        assert_eq!(index_for_timestep(&schedule, 801.0), Some(2));
        assert_eq!(index_for_timestep(&schedule, 901.0), Some(0));
        assert_eq!(index_for_timestep(&schedule, 5.0), None);
        assert_eq!(nearest_index(&schedule, 700.0), 3);
    }
}
