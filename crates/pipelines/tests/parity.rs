//! Parity with diffusers: every case in tests/fixtures/reference/cases.json (made by
//! scripts/fixtures/pipelines.py with diffusers 0.42.1 on the same checkpoints and seeds) is run
//! through the Rust pipeline with an in-process store, and the images are compared pixel for pixel.

use autopipe_pipelines::{GenerateParams, NoObserver, StableDiffusion, Task};
use autopipe_repo::Checkpoint;
use autopipe_store::{AcquireRequest, ComponentSpec, ComponentStore, Store, StoreConfig};
use autopipe_tokenizer::ClipTokenizer;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    model: String,
    variant: Option<String>,
    task: String,
    scheduler: Option<String>,
    #[serde(default)]
    scheduler_kwargs: serde_json::Map<String, serde_json::Value>,
    prompt: String,
    negative_prompt: String,
    width: u32,
    height: u32,
    num_inference_steps: u32,
    guidance_scale: f32,
    strength: Option<f32>,
    seed: u64,
    num_images_per_prompt: u32,
    image: Option<String>,
    mask_image: Option<String>,
    outputs: Vec<String>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// PSNR in dB between two uint8 images of the same size.
fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mse: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

fn run_case(store: &Store, case: &Case) -> Vec<(String, f64, f64)> {
    let reference = fixtures().join("reference");
    let ckpt = Checkpoint::open(fixtures().join("checkpoints").join(&case.model)).unwrap();
    let tokenizer = ClipTokenizer::from_folder(&ckpt.component_dir("tokenizer").unwrap()).unwrap();
    let specs = autopipe_pipelines::stable_diffusion::COMPONENTS
        .iter()
        .map(|name| ComponentSpec {
            name: name.to_string(),
            class_name: ckpt.index().component_class(name).unwrap().to_string(),
            path: ckpt.component_dir(name).unwrap(),
            variant: case.variant.clone(),
        })
        .collect();
    let lease = store
        .acquire(&AcquireRequest {
            components: specs,
            kind: Some(Kind::Float),
            request_id: case.name.clone(),
        })
        .unwrap();
    let task: Task = case.task.parse().unwrap();
    let read = |p: &Option<String>| {
        p.as_ref()
            .map(|p| std::fs::read(reference.join(p)).unwrap())
    };
    let params = GenerateParams {
        prompt: case.prompt.clone(),
        negative_prompt: Some(case.negative_prompt.clone()),
        width: Some(case.width),
        height: Some(case.height),
        num_inference_steps: Some(case.num_inference_steps),
        guidance_scale: Some(case.guidance_scale),
        strength: case.strength,
        seed: case.seed,
        image: read(&case.image),
        mask_image: read(&case.mask_image),
        scheduler: case.scheduler.clone(),
        scheduler_options: case.scheduler_kwargs.clone(),
        num_images_per_prompt: Some(case.num_images_per_prompt),
    };
    let out = StableDiffusion::new(store, &lease, &ckpt, &tokenizer, &case.name)
        .run(task, &params, &NoObserver)
        .unwrap();
    store.release(&lease.id).unwrap();
    assert_eq!(
        out.images.len(),
        case.outputs.len(),
        "{}: image count",
        case.name
    );
    let expected_f32 =
        Tensor::read_safetensors(reference.join(format!("{}.safetensors", case.name))).unwrap();
    let expected_f32 = &expected_f32.iter().find(|(n, _)| n == "images").unwrap().1;
    let max_diff = (&out.images_f32 - expected_f32.to_device(Device::Cpu))
        .abs()
        .max()
        .double_value(&[]);
    out.images
        .iter()
        .zip(&case.outputs)
        .map(|(got, name)| {
            let got = image::load_from_memory(&got.png).unwrap().to_rgb8();
            let want = image::open(reference.join(name)).unwrap().to_rgb8();
            assert_eq!(got.dimensions(), want.dimensions(), "{}: size", case.name);
            (name.clone(), psnr(got.as_raw(), want.as_raw()), max_diff)
        })
        .collect()
}

#[test]
fn every_reference_case_matches_diffusers() {
    tch::set_num_threads(1);
    let cases: Vec<Case> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/cases.json")).unwrap(),
    )
    .unwrap();
    let filter = std::env::var("PARITY_CASE").ok();
    let store = Store::new(StoreConfig::default());
    let mut failures = Vec::new();
    println!("{:<34} {:>10} {:>12}", "case", "PSNR (dB)", "max |Δ| f32");
    for case in cases
        .iter()
        .filter(|c| filter.as_deref().is_none_or(|f| c.name.contains(f)))
    {
        for (image, psnr, max_diff) in run_case(&store, case) {
            println!("{image:<34} {psnr:>10.2} {max_diff:>12.2e}");
            if psnr < 40.0 {
                failures.push(format!("{image}: PSNR {psnr:.2} dB < 40"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "parity failures:\n{}",
        failures.join("\n")
    );
}
