//! The scheduler a request runs (the checkpoint's own or an override, diffusers' `from_config`) and
//! which of its timesteps run: `strength` (`get_timesteps`), `denoising_start` and `denoising_end`.

use crate::{as_python_float, GenerateParams, PipelineError, Result};
use autopipe_repo::Checkpoint;
use autopipe_schedulers::Scheduler;
use serde_json::{Map, Value};

/// The saved config of the scheduler in `checkpoint`'s `folder` and its `_class_name`.
fn saved_config(checkpoint: &Checkpoint, folder: &str) -> Result<(Value, Option<String>)> {
    let config = checkpoint.read_json(folder, "scheduler_config.json")?;
    if !config.is_object() {
        return Err(malformed(checkpoint, folder, "not a JSON object"));
    }
    let class = config
        .get("_class_name")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok((config, class))
}

fn malformed(checkpoint: &Checkpoint, folder: &str, reason: &str) -> PipelineError {
    match checkpoint.component_dir(folder) {
        Ok(dir) => PipelineError::Checkpoint(autopipe_repo::Error::Malformed {
            path: dir.join("scheduler_config.json"),
            reason: reason.into(),
        }),
        Err(e) => e.into(),
    }
}

/// Builds the request's scheduler with `num_inference_steps` set. `rewrite` applies a pipeline's own
/// edits of the saved config (Stable Diffusion's `__init__` fixes outdated `steps_offset` /
/// `clip_sample`). Errors name the field that caused them: `scheduler_options`, `scheduler`,
/// `num_inference_steps`, or the model when its own config does not build.
pub fn build(
    checkpoint: &Checkpoint,
    params: &GenerateParams,
    rewrite: fn(&mut Map<String, Value>),
) -> Result<Box<dyn Scheduler>> {
    let (mut config, own_class) = saved_config(checkpoint, "scheduler")?;
    if let Some(obj) = config.as_object_mut() {
        rewrite(obj);
        obj.extend(
            params
                .scheduler_options
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
    }
    let class = match (&params.scheduler, own_class) {
        (Some(s), _) => s.clone(),
        (None, Some(c)) => c,
        (None, None) => return Err(malformed(checkpoint, "scheduler", "no _class_name")),
    };
    let field = if !params.scheduler_options.is_empty() {
        Some("scheduler_options")
    } else if params.scheduler.is_some() {
        Some("scheduler")
    } else {
        None
    };
    let mut scheduler =
        autopipe_schedulers::from_config(&class, &config).map_err(|e| match field {
            Some(field) => PipelineError::invalid(field, e.to_string()),
            None => PipelineError::Scheduler(e),
        })?;
    scheduler
        .set_timesteps(num_inference_steps(params))
        .map_err(|e| PipelineError::invalid("num_inference_steps", e.to_string()))?;
    Ok(scheduler)
}

/// The scheduler saved in `checkpoint`'s `folder` as it is (no request override: a second
/// pipeline's scheduler, IF stage II's `image_noising_scheduler`), with `steps` set when given;
/// `steps_field` names the request field that asked for them.
pub fn build_saved(
    checkpoint: &Checkpoint,
    folder: &str,
    steps: Option<(usize, &'static str)>,
) -> Result<Box<dyn Scheduler>> {
    let (config, class) = saved_config(checkpoint, folder)?;
    let class = class.ok_or_else(|| malformed(checkpoint, folder, "no _class_name"))?;
    let mut scheduler = autopipe_schedulers::from_config(&class, &config)?;
    if let Some((steps, field)) = steps {
        scheduler
            .set_timesteps(steps)
            .map_err(|e| PipelineError::invalid(field, e.to_string()))?;
    }
    Ok(scheduler)
}

/// `num_inference_steps`, diffusers' default 50 when unset.
pub fn num_inference_steps(params: &GenerateParams) -> usize {
    params.num_inference_steps.unwrap_or(50) as usize
}

/// Which part of the schedule a request runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Start {
    /// From the beginning (text-to-image).
    Full,
    /// diffusers' `get_timesteps(num_inference_steps, strength)`.
    Strength(f64),
    /// `denoising_start`: the fraction of the schedule already done (strength is then ignored).
    Fraction(f64),
}

/// The timesteps to run, after `start` and `denoising_end` (diffusers' SDXL pipelines:
/// `get_timesteps`, then the `discrete_timestep_cutoff` filter). Sets the scheduler's begin index
/// where diffusers does.
pub fn select(
    scheduler: &mut dyn Scheduler,
    params: &GenerateParams,
    start: Start,
    denoising_end: Option<f64>,
) -> Result<Vec<f64>> {
    let train = scheduler.config().num_train_timesteps as f64;
    let all = scheduler.timesteps().to_vec();
    // The requested count, not `all.len()`: PNDM's schedule repeats a timestep.
    let steps = num_inference_steps(params);
    let mut timesteps = match start {
        Start::Full => all,
        Start::Strength(strength) => {
            let init_timestep = ((steps as f64 * strength) as usize).min(steps);
            let t_start = steps.saturating_sub(init_timestep);
            let begin = t_start * scheduler.order();
            scheduler.set_begin_index(begin);
            if steps - t_start < 1 {
                return Err(PipelineError::invalid(
                    "strength",
                    format!("After adjusting the num_inference_steps by strength parameter: {strength}, the number of pipeline steps is {} which is < 1 and not appropriate for this pipeline.", steps - t_start),
                ));
            }
            all.get(begin..).map(<[f64]>::to_vec).unwrap_or_default()
        }
        Start::Fraction(start) => {
            let cutoff = (train - start * train).round_ties_even();
            let mut n = all.iter().filter(|&&t| t < cutoff).count();
            if scheduler.order() == 2 && n % 2 == 0 {
                n += 1;
            }
            let t_start = all.len().saturating_sub(n);
            scheduler.set_begin_index(t_start);
            all[t_start..].to_vec()
        }
    };
    if let Some(end) = denoising_end {
        if let Start::Fraction(start) = start {
            if start >= end {
                return Err(PipelineError::invalid(
                    "denoising_start",
                    format!("`denoising_start`: {start} cannot be larger than or equal to `denoising_end`:  {end} when using type float."),
                ));
            }
        }
        let cutoff = (train - end * train).round_ties_even();
        let n = timesteps.iter().filter(|&&t| t >= cutoff).count();
        timesteps.truncate(n);
    }
    if timesteps.is_empty() {
        return Err(PipelineError::invalid(
            "num_inference_steps",
            "no denoising step is left to run (raise num_inference_steps or widen the denoising_start/denoising_end window)",
        ));
    }
    Ok(timesteps)
}

/// A `(0, 1)` fraction field (`denoising_start`, `denoising_end`) as diffusers takes it.
pub fn fraction(v: Option<f32>, field: &'static str) -> Result<Option<f64>> {
    match v {
        None => Ok(None),
        Some(v) if v > 0.0 && v < 1.0 => Ok(Some(as_python_float(v))),
        Some(v) => Err(PipelineError::invalid(
            field,
            format!("must be in (0.0, 1.0), got {v}"),
        )),
    }
}
