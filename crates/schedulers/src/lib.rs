//! Diffusion schedulers ported from diffusers 0.42.1 (`diffusers/schedulers/scheduling_*.py`).
//!
//! Each scheduler is per-request state (timesteps, step index, multistep history) built from a
//! checkpoint's `scheduler_config.json` the way diffusers' `ConfigMixin.from_config` reads it:
//! known keys are taken, unknown keys (another class's, after a scheduler swap) are ignored, and
//! missing keys take the class's defaults. The arithmetic mirrors diffusers op for op: float32
//! libtorch ops where diffusers uses torch tensors (its step coefficients are 0-d tensors, see
//! `scalar.rs`), float64 where it uses numpy, so the same inputs give the same latents bit for bit
//! on the CPU, in float32, float16 and bfloat16. Noise (ancestral, DDPM, DDIM with `eta > 0`) is drawn from the request's
//! [`autopipe_rng::Generator`] exactly where diffusers calls `randn_tensor`.

#![warn(missing_docs)]

mod config;
mod ddim;
mod ddpm;
mod dpmsolver_multistep;
mod euler_ancestral_discrete;
mod euler_discrete;
mod lms_discrete;
mod pndm;
mod scalar;
mod schedule;
mod unclip;

pub use config::{BetaSchedule, PredictionType, SchedulerConfig, Thresholding, TimestepSpacing};
pub use ddim::{DDIMScheduler, DDIMSchedulerConfig};
pub use ddpm::{DDPMScheduler, DDPMSchedulerConfig, VarianceType};
pub use dpmsolver_multistep::{
    AlgorithmType, DPMSolverMultistepScheduler, DPMSolverMultistepSchedulerConfig, SolverType,
};
pub use euler_ancestral_discrete::{
    EulerAncestralDiscreteScheduler, EulerAncestralDiscreteSchedulerConfig,
};
pub use euler_discrete::{
    EulerDiscreteScheduler, EulerDiscreteSchedulerConfig, InterpolationType, TimestepType,
};
pub use lms_discrete::{LMSDiscreteScheduler, LMSDiscreteSchedulerConfig};
pub use pndm::{PNDMScheduler, PNDMSchedulerConfig};
pub use schedule::{FinalSigmasType, SigmaRampConfig};
pub use unclip::{UnCLIPScheduler, UnCLIPSchedulerConfig, UnCLIPVarianceType};

use autopipe_rng::Generator;
use tch::Tensor;

/// The scheduler class names [`from_config`] accepts (diffusers' `_class_name`).
pub const SUPPORTED: &[&str] = &[
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "UnCLIPScheduler",
];

/// Errors from building or stepping a scheduler.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The class name is not one of [`SUPPORTED`].
    #[error("unknown scheduler `{0}`; supported schedulers: {list}", list = SUPPORTED.join(", "))]
    UnknownScheduler(String),
    /// `scheduler_config.json` could not be read into the class's config (bad type or value).
    #[error("invalid {class} config: {message}")]
    Config {
        /// The scheduler class.
        class: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A config option diffusers has but this port does not implement.
    #[error("{class}: `{field}` = {value} is not supported")]
    Unsupported {
        /// The scheduler class.
        class: &'static str,
        /// The config key.
        field: &'static str,
        /// The value given.
        value: String,
    },
    /// A bad argument to `set_timesteps` or `step` (e.g. zero inference steps).
    #[error("{class}: {message}")]
    InvalidArgument {
        /// The scheduler class.
        class: &'static str,
        /// What is wrong.
        message: String,
    },
    /// `step` was called before `set_timesteps`.
    #[error("{0}: `set_timesteps` must be called before `step`")]
    TimestepsNotSet(&'static str),
    /// The timestep passed to `step` is not one of the scheduler's timesteps.
    #[error("{class}: timestep {timestep} is not in the schedule")]
    TimestepNotInSchedule {
        /// The scheduler class.
        class: &'static str,
        /// The timestep passed.
        timestep: f64,
    },
    /// An error from libtorch.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// A diffusion scheduler with diffusers' calling convention (per request, not shared).
pub trait Scheduler: Send {
    /// diffusers' `set_timesteps(num_inference_steps)`: builds the schedule and resets all state.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;
    /// diffusers' `scheduler.timesteps` as f64 (integer-valued for DDIM/PNDM/DDPM/DPM-Solver).
    fn timesteps(&self) -> &[f64];
    /// diffusers' `init_noise_sigma`: the initial latents are `randn * init_noise_sigma`.
    fn init_noise_sigma(&self) -> f64;
    /// diffusers' `scheduler.order` (model evaluations per step; 1 for every scheduler here).
    fn order(&self) -> usize {
        1
    }
    /// diffusers' `scale_model_input(sample, t)`: the UNet's input at timestep `t`.
    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Tensor;
    /// diffusers' `step(model_output, t, sample, generator=…).prev_sample`.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        generator: &mut Generator,
    ) -> Result<Tensor>;
    /// diffusers' `add_noise(original_samples, noise, timesteps)` with every sample at `timestep`.
    fn add_noise(&self, original_samples: &Tensor, noise: &Tensor, timestep: f64) -> Tensor;
    /// diffusers' `set_begin_index` (a no-op for the schedulers that do not have it).
    fn set_begin_index(&mut self, begin_index: usize);
    /// The parsed config fields every scheduler has.
    fn config(&self) -> &SchedulerConfig;
    /// The diffusers class name (`_class_name`).
    fn class_name(&self) -> &'static str;
    /// Whether `step` takes diffusers' `eta` argument (pipelines pass `eta` only then).
    fn accepts_eta(&self) -> bool {
        false
    }
    /// Sets diffusers' `eta` step argument (DDIM); ignored by schedulers without it.
    fn set_eta(&mut self, _eta: f64) {}
    /// Whether `step` reads a predicted variance from the second half of the model output's
    /// channels (`variance_type` "learned" / "learned_range"); pipelines drop that half otherwise.
    fn takes_predicted_variance(&self) -> bool {
        false
    }
}

/// Builds the scheduler `class_name` from a `scheduler_config.json` value (diffusers' `from_config`).
pub fn from_config(class_name: &str, config: &serde_json::Value) -> Result<Box<dyn Scheduler>> {
    Ok(match class_name {
        "DDIMScheduler" => Box::new(DDIMScheduler::from_config(config)?),
        "DDPMScheduler" => Box::new(DDPMScheduler::from_config(config)?),
        "DPMSolverMultistepScheduler" => {
            Box::new(DPMSolverMultistepScheduler::from_config(config)?)
        }
        "EulerAncestralDiscreteScheduler" => {
            Box::new(EulerAncestralDiscreteScheduler::from_config(config)?)
        }
        "EulerDiscreteScheduler" => Box::new(EulerDiscreteScheduler::from_config(config)?),
        "LMSDiscreteScheduler" => Box::new(LMSDiscreteScheduler::from_config(config)?),
        "PNDMScheduler" => Box::new(PNDMScheduler::from_config(config)?),
        "UnCLIPScheduler" => Box::new(UnCLIPScheduler::from_config(config)?),
        other => return Err(Error::UnknownScheduler(other.to_string())),
    })
}
