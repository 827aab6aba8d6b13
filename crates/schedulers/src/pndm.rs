//! PNDMScheduler, after `diffusers/schedulers/scheduling_pndm.py` (Liu et al., 2202.09778):
//! Runge-Kutta warm-up steps (unless `skip_prk_steps`) followed by linear multistep (PLMS) steps.

use autopipe_rng::Generator;
use serde::Deserialize;
use serde_json::Value;
use tch::Tensor;

use crate::config::{parse, PredictionType, SchedulerConfig, TimestepSpacing};
use crate::scalar::S;
use crate::schedule::{self, add_noise_alphas, check_shapes, check_steps};
use crate::{Error, Result, Scheduler};

const CLASS: &str = "PNDMScheduler";
const PNDM_ORDER: usize = 4;

/// PNDMScheduler's own `scheduler_config.json` fields (the shared ones are in [`SchedulerConfig`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PNDMSchedulerConfig {
    /// `skip_prk_steps` (default false): start with PLMS steps instead of Runge-Kutta ones.
    #[serde(default)]
    pub skip_prk_steps: bool,
    /// `set_alpha_to_one` (default false).
    #[serde(default)]
    pub set_alpha_to_one: bool,
}

/// diffusers' PNDMScheduler (the Stable Diffusion 1.x default).
#[derive(Debug)]
pub struct PNDMScheduler {
    config: SchedulerConfig,
    options: PNDMSchedulerConfig,
    alphas_cumprod: Tensor,
    final_alpha_cumprod: S,
    num_inference_steps: Option<usize>,
    prk_timesteps: Vec<i64>,
    timesteps: Vec<f64>,
    counter: usize,
    cur_model_output: Option<Tensor>,
    cur_sample: Option<Tensor>,
    ets: Vec<Tensor>,
}

/// numpy's `a[start:end]` with negative indices counted from the end.
fn py_slice<T: Clone>(a: &[T], start: isize, end: isize) -> Vec<T> {
    let len = a.len() as isize;
    let clamp = |i: isize| if i < 0 { (len + i).max(0) } else { i.min(len) } as usize;
    let (s, e) = (clamp(start), clamp(end));
    if s < e {
        a[s..e].to_vec()
    } else {
        Vec::new()
    }
}

impl PNDMScheduler {
    /// Builds the scheduler from `scheduler_config.json` (diffusers' `PNDMScheduler.from_config`).
    pub fn from_config(json: &Value) -> Result<Self> {
        let config = SchedulerConfig::parse(CLASS, json, TimestepSpacing::Leading)?;
        config.require_prediction(&[PredictionType::Epsilon, PredictionType::VPrediction])?;
        let options: PNDMSchedulerConfig = parse(CLASS, json)?;
        let betas = schedule::betas(&config, false, false)?;
        let alphas_cumprod = schedule::alphas_cumprod(&betas, false);
        let final_alpha_cumprod = if options.set_alpha_to_one {
            S::new(1.0)
        } else {
            S::at(&alphas_cumprod, 0)
        };
        Ok(Self {
            config,
            options,
            alphas_cumprod,
            final_alpha_cumprod,
            num_inference_steps: None,
            prk_timesteps: Vec::new(),
            timesteps: Vec::new(),
            counter: 0,
            cur_model_output: None,
            cur_sample: None,
            ets: Vec::new(),
        })
    }

    /// The class-specific config.
    pub fn options(&self) -> &PNDMSchedulerConfig {
        &self.options
    }

    fn step_ratio(&self, n: usize) -> i64 {
        (self.config.num_train_timesteps / n) as i64
    }

    fn step_prk(
        &mut self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
        n: usize,
    ) -> Result<Tensor> {
        let diff_to_prev = if self.counter % 2 == 1 {
            0
        } else {
            self.step_ratio(n) / 2
        };
        let prev_timestep = timestep - diff_to_prev;
        let timestep = self.prk_timesteps[self.counter / 4 * 4];
        let model_output = match self.counter % 4 {
            0 => {
                self.accumulate(model_output * (1.0 / 6.0));
                self.ets.push(model_output.shallow_clone());
                self.cur_sample = Some(sample.shallow_clone());
                model_output.shallow_clone()
            }
            1 | 2 => {
                self.accumulate(model_output * (1.0 / 3.0));
                model_output.shallow_clone()
            }
            _ => {
                let scaled = model_output * (1.0 / 6.0);
                match self.cur_model_output.take() {
                    Some(acc) => acc + scaled,
                    None => scaled,
                }
            }
        };
        let cur_sample = self.cur_sample.as_ref().unwrap_or(sample).shallow_clone();
        let prev_sample =
            self.get_prev_sample(&cur_sample, timestep, prev_timestep, &model_output)?;
        self.counter += 1;
        Ok(prev_sample)
    }

    fn accumulate(&mut self, term: Tensor) {
        self.cur_model_output = Some(match self.cur_model_output.take() {
            Some(acc) => acc + term,
            None => term,
        });
    }

    fn step_plms(
        &mut self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
        n: usize,
    ) -> Result<Tensor> {
        if !self.options.skip_prk_steps && self.ets.len() < 3 {
            return Err(Error::InvalidArgument {
                class: CLASS,
                message: "PLMS steps can only run after at least 12 Runge-Kutta steps".into(),
            });
        }
        let mut timestep = timestep;
        let mut prev_timestep = timestep - self.step_ratio(n);
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.shallow_clone());
        } else {
            prev_timestep = timestep;
            timestep += self.step_ratio(n);
        }
        let e = &self.ets;
        let l = e.len();
        let mut sample = sample.shallow_clone();
        let model_output = if l == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.shallow_clone());
            model_output.shallow_clone()
        } else if l == 1 && self.counter == 1 {
            let averaged = (model_output + &e[l - 1]) / 2.0;
            if let Some(cur) = self.cur_sample.take() {
                sample = cur;
            }
            averaged
        } else if l == 2 {
            (&e[l - 1] * 3.0 - &e[l - 2]) / 2.0
        } else if l == 3 {
            (&e[l - 1] * 23.0 - &e[l - 2] * 16.0 + &e[l - 3] * 5.0) / 12.0
        } else {
            (&e[l - 1] * 55.0 - &e[l - 2] * 59.0 + &e[l - 3] * 37.0 - &e[l - 4] * 9.0)
                * (1.0 / 24.0)
        };
        let prev_sample = self.get_prev_sample(&sample, timestep, prev_timestep, &model_output)?;
        self.counter += 1;
        Ok(prev_sample)
    }

    /// diffusers' `_get_prev_sample` (formula (9) of the PNDM paper).
    fn get_prev_sample(
        &self,
        sample: &Tensor,
        timestep: i64,
        prev_timestep: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let len = self.alphas_cumprod.size()[0];
        let alpha = |t: i64| {
            if (0..len).contains(&t) {
                Ok(S::at(&self.alphas_cumprod, t as usize))
            } else {
                Err(Error::TimestepNotInSchedule {
                    class: CLASS,
                    timestep: t as f64,
                })
            }
        };
        let alpha_prod_t = alpha(timestep)?;
        let alpha_prod_t_prev = if prev_timestep >= 0 {
            alpha(prev_timestep)?
        } else {
            self.final_alpha_cumprod.clone()
        };
        let beta_prod_t = alpha_prod_t.rsub(1.0);
        let beta_prod_t_prev = alpha_prod_t_prev.rsub(1.0);
        let model_output = match self.config.prediction_type {
            PredictionType::VPrediction => {
                alpha_prod_t.sqrt().t() * model_output + beta_prod_t.sqrt().t() * sample
            }
            _ => model_output.shallow_clone(),
        };
        let sample_coeff = (&alpha_prod_t_prev / &alpha_prod_t).sqrt();
        let model_output_denom_coeff = &alpha_prod_t * beta_prod_t_prev.sqrt()
            + (&alpha_prod_t * &beta_prod_t * &alpha_prod_t_prev).sqrt();
        Ok(sample_coeff.t() * sample
            - (&alpha_prod_t_prev - &alpha_prod_t).t() * model_output
                / model_output_denom_coeff.t())
    }
}

impl Scheduler for PNDMScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        check_steps(CLASS, num_inference_steps)?;
        let n = num_inference_steps;
        self.num_inference_steps = Some(n);
        let mut ascending = schedule::discrete_timesteps(&self.config, n);
        ascending.reverse();
        let plms: Vec<i64>;
        if self.options.skip_prk_steps {
            self.prk_timesteps = Vec::new();
            let mut t = py_slice(&ascending, 0, -1);
            t.extend(py_slice(&ascending, -2, -1));
            t.extend(py_slice(&ascending, -1, isize::MAX));
            t.reverse();
            plms = t;
        } else {
            let half = self.step_ratio(n) / 2;
            let last = py_slice(&ascending, -(PNDM_ORDER as isize), isize::MAX);
            let prk: Vec<i64> = last.iter().flat_map(|&t| [t, t + half]).collect();
            let doubled: Vec<i64> = py_slice(&prk, 0, -1)
                .into_iter()
                .flat_map(|t| [t, t])
                .collect();
            let mut prk = py_slice(&doubled, 1, -1);
            prk.reverse();
            self.prk_timesteps = prk;
            let mut t = py_slice(&ascending, 0, -3);
            t.reverse();
            plms = t;
        }
        self.timesteps = self
            .prk_timesteps
            .iter()
            .chain(plms.iter())
            .map(|&t| t as f64)
            .collect();
        self.ets.clear();
        self.counter = 0;
        self.cur_model_output = None;
        self.cur_sample = None;
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
        _generator: &mut Generator,
    ) -> Result<Tensor> {
        let n = self
            .num_inference_steps
            .ok_or(Error::TimestepsNotSet(CLASS))?;
        check_shapes(CLASS, model_output, sample)?;
        if timestep.fract() != 0.0 {
            return Err(Error::TimestepNotInSchedule {
                class: CLASS,
                timestep,
            });
        }
        let timestep = timestep as i64;
        if self.counter < self.prk_timesteps.len() && !self.options.skip_prk_steps {
            self.step_prk(model_output, timestep, sample, n)
        } else {
            self.step_plms(model_output, timestep, sample, n)
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prk_timesteps_follow_diffusers_layout() {
        let mut s = PNDMScheduler::from_config(&serde_json::json!({})).unwrap();
        s.set_timesteps(10).unwrap();
        // _timesteps = [0, 100, ..., 900]; prk uses the last four with half-steps of 50.
        let expected_prk = [900, 850, 850, 800, 800, 750, 750, 700, 700, 650, 650, 600];
        let got: Vec<i64> = s.timesteps()[..12].iter().map(|&t| t as i64).collect();
        assert_eq!(got, expected_prk);
        assert_eq!(
            s.timesteps()[12..]
                .iter()
                .map(|&t| t as i64)
                .collect::<Vec<_>>(),
            [600, 500, 400, 300, 200, 100, 0]
        );
    }
}
