//! Replays the denoising loops of `scripts/fixtures/schedulers.py` and compares every recorded
//! tensor with diffusers' output (`tests/fixtures/schedulers/`).

use std::collections::HashMap;
use std::path::PathBuf;

use autopipe_rng::Generator;
use autopipe_schedulers::{from_config, Scheduler};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

/// Absolute difference allowed between a Rust tensor and diffusers' (in practice they are nearly
/// identical: the same libtorch kernels run the same float32 ops in the same order) ...
const TOLERANCE: f64 = 1e-5;
/// ... or this much of the tensor's largest element, whichever is larger: MKL and numpy pick SIMD
/// code paths by CPU (AVX-512 or not), so the last bits of a float32 op differ between machines,
/// which shows on tensors in the hundreds or thousands (zero-SNR and cosine-schedule sigmas and
/// the latents they scale). 2**-15 is 256 float32 ulps of that element.
const RELATIVE_TOLERANCE: f64 = 1.0 / (1u32 << 15) as f64;
/// Karras/exponential timesteps go through numpy's float32 `log`, a SIMD routine whose last bit
/// differs from libm's; they are compared to within two float32 ulps (relative 2**-22).
const TIMESTEP_RELATIVE_TOLERANCE: f64 = 1.0 / (1u32 << 22) as f64;

#[derive(Deserialize)]
struct Meta {
    shape: Vec<i64>,
    seed: u64,
    strength: f64,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    class_name: String,
    config: serde_json::Value,
    steps: usize,
    img2img: bool,
    eta: Option<f64>,
    dtype: String,
    model: String,
    latent_scale: f64,
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/schedulers")
}

fn load() -> (Meta, HashMap<String, Tensor>) {
    let dir = fixtures();
    let meta: Meta =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).expect("cases.json"))
            .expect("cases.json parses");
    let tensors =
        Tensor::read_safetensors(dir.join("goldens.safetensors")).expect("goldens.safetensors");
    (meta, tensors.into_iter().collect())
}

/// The fake UNet of the fixture script.
fn fake_model(x: &Tensor, t: f64, model: &str) -> Tensor {
    let out = x * 0.3 + t * 1e-5;
    if model == "learned" {
        Tensor::cat(&[out, (x * 0.5).tanh()], 1)
    } else {
        out
    }
}

struct Run<'a> {
    meta: &'a Meta,
    case: &'a Case,
    kind: Kind,
    goldens: &'a HashMap<String, Tensor>,
    worst: f64,
    worst_timesteps: f64,
    failures: Vec<String>,
}

impl Run<'_> {
    fn randn(&self, g: &mut Generator) -> Tensor {
        g.randn(&self.meta.shape, Kind::Float, Device::Cpu)
            .to_kind(self.kind)
    }

    fn scheduler(&self) -> Box<dyn Scheduler> {
        let mut s = from_config(&self.case.class_name, &self.case.config).expect("config builds");
        if let Some(eta) = self.case.eta {
            if s.accepts_eta() {
                s.set_eta(eta);
            }
        }
        s.set_timesteps(self.case.steps).expect("set_timesteps");
        s
    }

    fn compare(&mut self, key: &str, got: &Tensor) {
        let name = format!("{}.{key}", self.case.name);
        let Some(want) = self.goldens.get(&name) else {
            self.failures.push(format!("{name}: missing golden"));
            return;
        };
        if want.size() != got.size() {
            self.failures.push(format!(
                "{name}: shape {:?} != golden {:?}",
                got.size(),
                want.size()
            ));
            return;
        }
        if got.kind() != want.kind() {
            self.failures.push(format!(
                "{name}: dtype {:?} != golden {:?}",
                got.kind(),
                want.kind()
            ));
        }
        let want = want.to_kind(Kind::Double);
        let diff = (got.to_kind(Kind::Double) - &want)
            .abs()
            .max()
            .double_value(&[]);
        // Relative to the tensor's largest element, so tensors far from 1 (zero-SNR sigmas in the
        // thousands, the latents they scale) get the same few-ulp slack as the others.
        let relative = if key == "timesteps" {
            TIMESTEP_RELATIVE_TOLERANCE
        } else {
            RELATIVE_TOLERANCE
        };
        let tolerance = TOLERANCE.max(want.abs().max().double_value(&[]) * relative);
        if key == "timesteps" {
            self.worst_timesteps = self.worst_timesteps.max(diff);
        } else {
            self.worst = self.worst.max(diff);
        }
        if diff.is_nan() || diff >= tolerance {
            self.failures.push(format!(
                "{name}: max abs diff {diff:e} (tolerance {tolerance:e})"
            ));
        }
    }

    fn denoise(
        &mut self,
        s: &mut dyn Scheduler,
        timesteps: &[f64],
        mut latents: Tensor,
        g: &mut Generator,
    ) -> (Tensor, Tensor) {
        let mut inputs = Vec::new();
        for &t in timesteps {
            let x = s.scale_model_input(&latents, t);
            let out = fake_model(&x, t, &self.case.model);
            latents = s
                .step(&out, t, &latents, g)
                .unwrap_or_else(|e| panic!("{}: step at t={t}: {e}", self.case.name));
            inputs.push(x);
        }
        (Tensor::stack(&inputs, 0), latents)
    }

    fn run(&mut self) {
        let seed = self.meta.seed;

        // text2img
        let mut s = self.scheduler();
        self.compare("timesteps", &Tensor::from_slice(s.timesteps()));
        self.compare(
            "init_noise_sigma",
            &Tensor::from_slice(&[s.init_noise_sigma()]),
        );
        let mut g = Generator::new(seed);
        let latents = self.randn(&mut g) * self.case.latent_scale * s.init_noise_sigma();
        let timesteps = s.timesteps().to_vec();
        let (inputs, last) = self.denoise(s.as_mut(), &timesteps, latents, &mut g);
        self.compare("inputs", &inputs);
        self.compare("final", &last);

        // add_noise at the first, a middle and the last timestep
        let s = self.scheduler();
        let mut g = Generator::new(seed + 1);
        let original = self.randn(&mut g);
        let noise = self.randn(&mut g);
        let ts = s.timesteps();
        let noised: Vec<Tensor> = [0, ts.len() / 2, ts.len() - 1]
            .iter()
            .map(|&k| s.add_noise(&original, &noise, ts[k]))
            .collect();
        self.compare("add_noise", &Tensor::stack(&noised, 0));

        if self.case.img2img {
            // StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
            let mut s = self.scheduler();
            let steps = self.case.steps;
            let init_timestep = ((steps as f64 * self.meta.strength) as usize).min(steps);
            let t_start = steps.saturating_sub(init_timestep);
            let timesteps = s.timesteps()[t_start * s.order()..].to_vec();
            s.set_begin_index(t_start * s.order());
            let mut g = Generator::new(seed + 2);
            let image_latents = self.randn(&mut g);
            let noise = self.randn(&mut g);
            let latents = s.add_noise(&image_latents, &noise, timesteps[0]);
            self.compare("img2img_noised", &latents);
            let (inputs, last) = self.denoise(s.as_mut(), &timesteps, latents, &mut g);
            self.compare("img2img_inputs", &inputs);
            self.compare("img2img_final", &last);
        }
    }
}

#[test]
fn schedulers_match_diffusers_goldens() {
    let (meta, goldens) = load();
    assert!(
        meta.cases.len() >= 50,
        "expected the full case list, found {}",
        meta.cases.len()
    );
    let mut failures = Vec::new();
    for case in &meta.cases {
        let kind = match case.dtype.as_str() {
            "bfloat16" => Kind::BFloat16,
            "float16" => Kind::Half,
            _ => Kind::Float,
        };
        let mut run = Run {
            meta: &meta,
            case,
            kind,
            goldens: &goldens,
            worst: 0.0,
            worst_timesteps: 0.0,
            failures: Vec::new(),
        };
        run.run();
        println!(
            "{:<36} {:<32} max abs diff: tensors {:.3e}, timesteps {:.3e}",
            case.name, case.class_name, run.worst, run.worst_timesteps
        );
        failures.extend(run.failures);
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
