//! Parity with diffusers: every case in tests/fixtures/reference/*cases.json (made by
//! scripts/fixtures/ with diffusers 0.42.1 on the same checkpoints and seeds) is resolved as
//! AutoPipeline resolves it, run through the registry's pipeline with an in-process store, and
//! compared pixel for pixel (or, for latent outputs, value for value).

use autopipe_pipelines::{
    Context, ControlNetInput, GenerateParams, InitImage, MicroConditioning, NoObserver, OutputType,
    Task, TokenizerCache,
};
use autopipe_repo::Checkpoint;
use autopipe_store::{Store, StoreConfig};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    model: String,
    variant: Option<String>,
    task: String,
    pipeline: String,
    scheduler: Option<String>,
    #[serde(default)]
    scheduler_kwargs: serde_json::Map<String, serde_json::Value>,
    prompt: String,
    negative_prompt: Option<String>,
    #[serde(default)]
    prompt_2: Option<String>,
    #[serde(default)]
    negative_prompt_2: Option<String>,
    width: Option<u32>,
    height: Option<u32>,
    num_inference_steps: u32,
    guidance_scale: Option<f32>,
    strength: Option<f32>,
    seed: u64,
    num_images_per_prompt: u32,
    image: Option<String>,
    #[serde(default)]
    image_latents: Option<String>,
    mask_image: Option<String>,
    #[serde(default)]
    original_size: Option<(u32, u32)>,
    #[serde(default)]
    crops_coords_top_left: Option<(u32, u32)>,
    #[serde(default)]
    target_size: Option<(u32, u32)>,
    #[serde(default)]
    negative_original_size: Option<(u32, u32)>,
    #[serde(default)]
    negative_crops_coords_top_left: Option<(u32, u32)>,
    #[serde(default)]
    negative_target_size: Option<(u32, u32)>,
    #[serde(default)]
    aesthetic_score: Option<f32>,
    #[serde(default)]
    negative_aesthetic_score: Option<f32>,
    #[serde(default)]
    denoising_start: Option<f32>,
    #[serde(default)]
    denoising_end: Option<f32>,
    #[serde(default)]
    output_type: Option<String>,
    /// ControlNet folders under checkpoints/ (controlnet_cases.json).
    #[serde(default)]
    controlnet: Vec<String>,
    #[serde(default)]
    control_image: Vec<String>,
    #[serde(default)]
    controlnet_conditioning_scale: Option<Vec<f32>>,
    #[serde(default)]
    control_guidance_start: Option<Vec<f32>>,
    #[serde(default)]
    control_guidance_end: Option<Vec<f32>>,
    #[serde(default)]
    guess_mode: Option<bool>,
    #[serde(default)]
    prior_num_inference_steps: Option<u32>,
    #[serde(default)]
    prior_guidance_scale: Option<f32>,
    /// DeepFloyd IF stage II folder under checkpoints/ (if_cases.json).
    #[serde(default)]
    upscale_model: Option<String>,
    #[serde(default)]
    noise_level: Option<u32>,
    #[serde(default)]
    upscale_num_inference_steps: Option<u32>,
    #[serde(default)]
    upscale_guidance_scale: Option<f32>,
    outputs: Vec<String>,
    outputs_f32: Option<String>,
    #[serde(default)]
    error: Option<serde_json::Value>,
    /// diffusers' per-image safety checker flags (safety_cases.json); absent = no checker ran.
    #[serde(default)]
    nsfw_content_detected: Option<Vec<bool>>,
    /// diffusers' per-image watermark flags of DeepFloyd IF's checker (if_safety_cases.json).
    #[serde(default)]
    watermark_detected: Option<Vec<bool>>,
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

fn read_tensor(file: &Path, name: &str) -> Tensor {
    Tensor::read_safetensors(file)
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{}: no tensor {name}", file.display()))
        .1
}

fn params(case: &Case, reference: &Path) -> GenerateParams {
    let image = match (&case.image, &case.image_latents) {
        (Some(p), _) => Some(InitImage::Pixels(image::open(reference.join(p)).unwrap())),
        (None, Some(p)) => Some(InitImage::Latents(read_tensor(
            &reference.join(p),
            "latents",
        ))),
        (None, None) => None,
    };
    GenerateParams {
        prompt: case.prompt.clone(),
        prompt_2: case.prompt_2.clone(),
        negative_prompt: case.negative_prompt.clone(),
        negative_prompt_2: case.negative_prompt_2.clone(),
        width: case.width,
        height: case.height,
        num_inference_steps: Some(case.num_inference_steps),
        guidance_scale: case.guidance_scale,
        strength: case.strength,
        seed: case.seed,
        image,
        mask_image: case
            .mask_image
            .as_ref()
            .map(|p| image::open(reference.join(p)).unwrap()),
        scheduler: case.scheduler.clone(),
        scheduler_options: case.scheduler_kwargs.clone(),
        num_images_per_prompt: Some(case.num_images_per_prompt),
        micro: MicroConditioning {
            original_size: case.original_size,
            crops_coords_top_left: case.crops_coords_top_left,
            target_size: case.target_size,
            negative_original_size: case.negative_original_size,
            negative_crops_coords_top_left: case.negative_crops_coords_top_left,
            negative_target_size: case.negative_target_size,
            aesthetic_score: case.aesthetic_score,
            negative_aesthetic_score: case.negative_aesthetic_score,
        },
        denoising_start: case.denoising_start,
        denoising_end: case.denoising_end,
        output_type: match case.output_type.as_deref() {
            Some("latent") => OutputType::Latent,
            _ => OutputType::Image,
        },
        controlnets: case
            .controlnet
            .iter()
            .zip(&case.control_image)
            .enumerate()
            .map(|(i, (net, img))| {
                let at = |v: &Option<Vec<f32>>| v.as_ref().map(|v| v[i]);
                ControlNetInput {
                    path: fixtures().join("checkpoints").join(net),
                    image: image::open(reference.join(img)).unwrap(),
                    conditioning_scale: at(&case.controlnet_conditioning_scale),
                    guidance_start: at(&case.control_guidance_start),
                    guidance_end: at(&case.control_guidance_end),
                }
            })
            .collect(),
        guess_mode: case.guess_mode.unwrap_or(false),
        prior_num_inference_steps: case.prior_num_inference_steps,
        prior_guidance_scale: case.prior_guidance_scale,
        skip_safety_checker: false,
        upscale_model: case.upscale_model.as_ref().map(|m| {
            fixtures()
                .join("checkpoints")
                .join(m)
                .to_string_lossy()
                .into_owned()
        }),
        noise_level: case.noise_level,
        upscale_num_inference_steps: case.upscale_num_inference_steps,
        upscale_guidance_scale: case.upscale_guidance_scale,
        clean_caption: false,
    }
}

/// Runs one case; returns (output name, PSNR, max |Δ|) per output, or the error message.
fn run_case(
    store: &Store,
    tokenizers: &TokenizerCache,
    case: &Case,
) -> Result<Vec<(String, f64, f64)>, String> {
    let reference = fixtures().join("reference");
    let mut ckpt = Checkpoint::open(fixtures().join("checkpoints").join(&case.model)).unwrap();
    let task: Task = case.task.parse().unwrap();
    let controlnet = !case.controlnet.is_empty();
    let resolution = autopipe_auto::resolve(&ckpt.index().class_name, task, controlnet).unwrap();
    if let Some(prior) = autopipe_pipelines::connected_prior_ref(&ckpt, &resolution).unwrap() {
        ckpt.connect("prior", Checkpoint::open(prior).unwrap());
    }
    assert_eq!(
        resolution.pipeline, case.pipeline,
        "{}: resolution",
        case.name
    );
    let params = params(case, &reference);
    let pipeline = autopipe_pipelines::registry(resolution.family).expect("registered");
    if let Some(chain) = pipeline
        .chain(&resolution, &params)
        .map_err(|e| e.to_string())?
    {
        let chained = Checkpoint::open(&chain.model).unwrap();
        autopipe_pipelines::connect_chain(&mut ckpt, &chain, chained).map_err(|e| e.to_string())?;
    }
    let ctx = Context {
        task,
        resolution: &resolution,
        checkpoint: &ckpt,
        tokenizers,
    };
    let out = autopipe_pipelines::generate(
        store,
        &ctx,
        Some(store.config().default_kind),
        case.variant.as_deref(),
        &params,
        &case.name,
        &NoObserver,
    )
    .map_err(|e| e.to_string())?;
    let expected_file = reference.join(case.outputs_f32.as_ref().expect("outputs_f32"));
    if let Some(latents) = &out.latents {
        let expected = read_tensor(&expected_file, "latents");
        let diff = (latents.to_device(Device::Cpu) - expected)
            .abs()
            .max()
            .double_value(&[]);
        // Latents have no PNG: report PSNR over the latent range (peak = max |expected|).
        return Ok(vec![(
            format!("{} (latents)", case.name),
            -20.0 * diff.max(1e-30).log10(),
            diff,
        )]);
    }
    assert_eq!(
        out.images.len(),
        case.outputs.len(),
        "{}: image count",
        case.name
    );
    if out.nsfw_content_detected != case.nsfw_content_detected
        || out.watermark_detected != case.watermark_detected
    {
        return Err(format!(
            "nsfw_content_detected {:?}, watermark_detected {:?}; diffusers {:?}, {:?}",
            out.nsfw_content_detected,
            out.watermark_detected,
            case.nsfw_content_detected,
            case.watermark_detected
        ));
    }
    // A flagged image is black before any watermark is pasted on it: look at the float images.
    let images_f32 = out.images_f32.as_ref().expect("images");
    for (i, _) in out.images.iter().enumerate() {
        let at = |flags: &Option<Vec<bool>>| flags.as_ref().is_some_and(|f| f[i]);
        let flagged = at(&case.nsfw_content_detected) || at(&case.watermark_detected);
        let black = images_f32.get(i as i64).abs().max().double_value(&[]) == 0.0;
        if black != flagged {
            return Err(format!("image {i}: flagged {flagged}, black {black}"));
        }
    }
    if case.nsfw_content_detected.is_some() || case.watermark_detected.is_some() {
        println!(
            "{:<40} nsfw_content_detected {:?} watermark_detected {:?} (as diffusers)",
            case.name, case.nsfw_content_detected, case.watermark_detected
        );
    }
    let expected_f32 = read_tensor(&expected_file, "images");
    let max_diff = (out.images_f32.as_ref().unwrap() - expected_f32.to_device(Device::Cpu))
        .abs()
        .max()
        .double_value(&[]);
    Ok(out
        .images
        .iter()
        .zip(&case.outputs)
        .map(|(got, name)| {
            let got = image::load_from_memory(&got.png).unwrap().to_rgb8();
            let want = image::open(reference.join(name)).unwrap().to_rgb8();
            assert_eq!(got.dimensions(), want.dimensions(), "{}: size", case.name);
            (name.clone(), psnr(got.as_raw(), want.as_raw()), max_diff)
        })
        .collect())
}

/// Where the cases run: the CPU in float32 unless `PARITY_DEVICE` (cpu, cuda, cuda:N) and
/// `PARITY_DTYPE` (float32, float16, bfloat16) say otherwise, and the PSNR every image must reach
/// (`PARITY_MIN_PSNR`, default 40 dB) or the largest |Δ| of a latent output
/// (`PARITY_MAX_LATENT_DIFF`, default 1e-3). scripts/gpu-check runs the suite on a GPU with them;
/// the references stay diffusers' CPU float32 outputs.
fn run_config() -> (StoreConfig, f64, f64) {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let device = var("PARITY_DEVICE").map_or(Device::Cpu, |d| {
        autopipe_store::open_device(&d).unwrap_or_else(|e| panic!("PARITY_DEVICE={d}: {e}"))
    });
    let default_kind = var("PARITY_DTYPE").map_or(Kind::Float, |k| {
        autopipe_store::parse_kind(&k).unwrap_or_else(|e| panic!("PARITY_DTYPE={k}: {e}"))
    });
    let number = |name: &str, default: f64| {
        var(name).map_or(default, |v| {
            v.parse().unwrap_or_else(|e| panic!("{name}={v}: {e}"))
        })
    };
    let (min_psnr, max_latent_diff) = (
        number("PARITY_MIN_PSNR", 40.0),
        number("PARITY_MAX_LATENT_DIFF", 1e-3),
    );
    let config = StoreConfig {
        device,
        default_kind,
        ..StoreConfig::default()
    };
    (config, min_psnr, max_latent_diff)
}

fn run_cases_file(file: &str) {
    tch::set_num_threads(1);
    let path = fixtures().join("reference").join(file);
    let cases: Vec<Case> = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let filter = std::env::var("PARITY_CASE").ok();
    let (config, min_psnr, max_latent_diff) = run_config();
    println!(
        "device {:?}, default dtype {:?}, images must reach {min_psnr} dB",
        config.device, config.default_kind
    );
    let store = Store::new(config);
    let tokenizers = TokenizerCache::default();
    let mut failures = Vec::new();
    println!("{:<40} {:>10} {:>12}", "case", "PSNR (dB)", "max |Δ| f32");
    for case in cases
        .iter()
        .filter(|c| filter.as_deref().is_none_or(|f| c.name.contains(f)))
    {
        match (run_case(&store, &tokenizers, case), &case.error) {
            (Ok(results), None) => {
                for (image, psnr, max_diff) in results {
                    println!("{image:<40} {psnr:>10.2} {max_diff:>12.2e}");
                    let latent = image.ends_with("(latents)");
                    if (!latent && psnr < min_psnr) || (latent && max_diff > max_latent_diff) {
                        failures.push(format!(
                            "{image}: PSNR {psnr:.2} dB, max |Δ| {max_diff:.2e}"
                        ));
                    }
                }
            }
            (Err(message), Some(expected)) => {
                let want = expected["message"].as_str().unwrap_or_default();
                println!(
                    "{:<40} error as diffusers: {}",
                    case.name,
                    message.contains(want)
                );
                if !message.contains(want) {
                    failures.push(format!(
                        "{}: error {message:?}, diffusers says {want:?}",
                        case.name
                    ));
                }
            }
            (Ok(_), Some(expected)) => failures.push(format!(
                "{}: ran, but diffusers fails with {expected}",
                case.name
            )),
            (Err(message), None) => failures.push(format!("{}: {message}", case.name)),
        }
    }
    assert_eq!(
        store.stats().active_leases,
        0,
        "leases left after the cases"
    );
    assert!(
        failures.is_empty(),
        "parity failures:\n{}",
        failures.join("\n")
    );
}

#[test]
fn stable_diffusion_matches_diffusers() {
    run_cases_file("cases.json");
}

#[test]
fn sdxl_matches_diffusers() {
    run_cases_file("sdxl_cases.json");
}

#[test]
fn controlnet_matches_diffusers() {
    run_cases_file("controlnet_cases.json");
}

/// A checkpoint with a StableDiffusionSafetyChecker: the flags per image equal diffusers', the
/// flagged images are black and the others match.
#[test]
fn safety_checker_matches_diffusers() {
    run_cases_file("safety_cases.json");
}

#[test]
fn kandinsky22_matches_diffusers() {
    run_cases_file("kandinsky_cases.json");
}

#[test]
fn kandinsky21_matches_diffusers() {
    run_cases_file("kandinsky21_cases.json");
}

/// DeepFloyd IF stage I (text2img, img2img, inpaint) and stage I -> stage II chains.
#[test]
fn deepfloyd_if_matches_diffusers() {
    run_cases_file("if_cases.json");
}

/// Kandinsky 2.1 with the real checkpoint's architecture: the IF-style UNet blocks with text_image
/// conditioning, the MoVQ's attention blocks and an XLM-R tokenizer from `sentencepiece.bpe.model`.
#[test]
fn kandinsky21_real_architecture_matches_diffusers() {
    run_cases_file("kandinsky21_arch_cases.json");
}

/// DeepFloyd IF with its safety checker and watermarker: the NSFW and watermark flags per image equal
/// diffusers', flagged images are black, and every PNG carries the watermark where diffusers' does.
#[test]
fn deepfloyd_if_safety_matches_diffusers() {
    run_cases_file("if_safety_cases.json");
}

/// `skip_safety_checker` on DeepFloyd IF is diffusers' `safety_checker=None`: no flags, no black
/// image, and still the watermark (the watermarker is not a safety checker).
#[test]
fn deepfloyd_if_without_its_checker_still_watermarks() {
    tch::set_num_threads(1);
    let reference = fixtures().join("reference");
    let cases: Vec<Case> = serde_json::from_str(
        &std::fs::read_to_string(reference.join("if_safety_cases.json")).unwrap(),
    )
    .unwrap();
    let case = cases
        .iter()
        .find(|c| c.task == "text2img")
        .expect("a text2img case");
    let ckpt = Checkpoint::open(fixtures().join("checkpoints").join(&case.model)).unwrap();
    let resolution =
        autopipe_auto::resolve(&ckpt.index().class_name, Task::Text2Img, false).unwrap();
    let tokenizers = TokenizerCache::default();
    let ctx = Context {
        task: Task::Text2Img,
        resolution: &resolution,
        checkpoint: &ckpt,
        tokenizers: &tokenizers,
    };
    let mut params = params(case, &reference);
    params.skip_safety_checker = true;
    let store = Store::new(StoreConfig::default());
    let out = autopipe_pipelines::generate(
        &store,
        &ctx,
        Some(Kind::Float),
        None,
        &params,
        "skip",
        &NoObserver,
    )
    .unwrap();
    assert_eq!(out.nsfw_content_detected, None);
    assert_eq!(out.watermark_detected, None);
    let images_f32 = out.images_f32.as_ref().unwrap();
    for (i, png) in out.images.iter().enumerate() {
        let plain = images_f32.get(i as i64);
        assert!(
            plain.abs().max().double_value(&[]) > 0.0,
            "image {i} is black"
        );
        let got = image::load_from_memory(&png.png).unwrap().to_rgb8();
        let plain: Vec<u8> = Vec::<f32>::try_from(plain.flatten(0, -1))
            .unwrap()
            .iter()
            .map(|v| (v * 255.0).round_ties_even() as u8)
            .collect();
        let marked = got
            .as_raw()
            .chunks(3)
            .zip(plain.chunks(3))
            .filter(|(a, b)| a != b)
            .count();
        // 48x48 on a 32 px UNet: a 2x2 mark in the bottom-right corner (some pixels may blend to
        // their own value).
        assert!(
            (1..=4).contains(&marked),
            "image {i}: {marked} pixels differ"
        );
    }
    assert_eq!(store.stats().active_leases, 0);
}

/// diffusers fails deep in the UNet (a conv shape error) when a 4-channel Kandinsky decoder is asked
/// to inpaint; autopipe refuses the request up front, naming the model.
#[test]
fn kandinsky22_inpaint_on_a_4_channel_decoder_is_refused() {
    let mut ckpt = Checkpoint::open(fixtures().join("checkpoints/kandinsky22-decoder")).unwrap();
    let resolution =
        autopipe_auto::resolve(&ckpt.index().class_name, Task::Inpaint, false).unwrap();
    let prior = autopipe_pipelines::connected_prior_ref(&ckpt, &resolution)
        .unwrap()
        .expect("the README names a prior");
    ckpt.connect("prior", Checkpoint::open(prior).unwrap());
    let tokenizers = TokenizerCache::default();
    let ctx = Context {
        task: Task::Inpaint,
        resolution: &resolution,
        checkpoint: &ckpt,
        tokenizers: &tokenizers,
    };
    let pipeline = autopipe_pipelines::registry(resolution.family).unwrap();
    let image = image::DynamicImage::new_rgb8(64, 64);
    let params = GenerateParams {
        prompt: "a cat".into(),
        image: Some(InitImage::Pixels(image.clone())),
        mask_image: Some(image),
        ..Default::default()
    };
    let err = pipeline.validate(&ctx, &params).unwrap_err();
    assert_eq!(err.code(), autopipe_store::Code::InvalidArgument);
    assert!(
        err.to_string()
            .starts_with("model: inpainting needs a 9-channel inpaint decoder"),
        "{err}"
    );
}

#[test]
fn every_family_autopipe_resolves_to_is_registered_or_unimplemented() {
    use autopipe_auto::Family;
    for family in [
        Family::StableDiffusion,
        Family::StableDiffusionXL,
        Family::StableDiffusionControlNet,
        Family::StableDiffusionXLControlNet,
        Family::Kandinsky21,
        Family::Kandinsky22,
        Family::DeepFloydIF,
    ] {
        let p = autopipe_pipelines::registry(family).expect("registered");
        assert_eq!(p.family(), family);
    }
    assert!(autopipe_pipelines::registry(Family::Other).is_none());
}
