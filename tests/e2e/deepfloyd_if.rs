//! DeepFloyd IF end to end over real gRPC: stage I text2img / img2img / inpaint and stage I ->
//! stage II chains (`upscale_model`) give diffusers' images in split mode and the same bytes
//! embedded; across all of them one T5 encoder is resident and each UNet is loaded once; bad IF
//! requests are INVALID_ARGUMENT naming the field, before anything is loaded or leased.

use autopipe_e2e::*;
use autopipe_orchestrator::{Orchestrator, OrchestratorConfig};
use autopipe_proto::v1;
use autopipe_store::{Store, StoreConfig};
use std::sync::Arc;

#[test]
fn deepfloyd_if_split_matches_diffusers_and_embedded_with_one_t5() {
    tch::set_num_threads(1);
    let split = Split::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let embedded = Orchestrator::new(
        Arc::new(Store::new(StoreConfig::default())),
        OrchestratorConfig::default(),
    );
    for case in [
        "if_t2i_64_neg",
        "if_i2i",
        "if_inpaint",
        "if_t2i_48x32_sr2",
        "if_inpaint_sr",
    ] {
        let req = reference_request(case);
        let resp = split
            .generate(&rt, req.clone())
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let local = embedded.generate(&req, "embedded", &Silent).unwrap();
        assert_eq!(local.images.len(), resp.images.len(), "{case}: image count");
        for (i, img) in resp.images.iter().enumerate() {
            let p = psnr(&decode(img), &reference_image(case, i));
            println!(
                "{case:<20} {:<22} image {i} {}x{} split vs diffusers PSNR {p:.2} dB",
                resp.pipeline, img.width, img.height
            );
            assert!(p >= 40.0, "{case} image {i}: PSNR {p:.2} dB");
            assert!(
                local.images[i].png == img.png,
                "{case} image {i}: embedded and split images differ"
            );
        }
    }
    // `autopipe generate --embedded` with the stage II flags: the split deployment's bytes.
    let case = "if_t2i_sr";
    let req = reference_request(case);
    let resp = split.generate(&rt, req.clone()).unwrap();
    let dir = std::env::temp_dir().join(format!("autopipe-if-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let output = std::process::Command::new(bin("autopipe"))
        .args([
            "generate",
            "--embedded",
            "--threads",
            "1",
            "--task",
            "text2img",
        ])
        .args(["--model", &req.model, "--prompt", &req.prompt])
        .args(["--steps", &req.num_inference_steps.unwrap().to_string()])
        .args(["--guidance-scale", &req.guidance_scale.unwrap().to_string()])
        .args(["--seed", &req.seed.unwrap().to_string()])
        .args(["--upscale-model", &req.upscale_model])
        .args([
            "--upscale-steps",
            &req.upscale_num_inference_steps.unwrap().to_string(),
        ])
        .arg("--output")
        .arg(dir.join("out.png"))
        .output()
        .expect("autopipe runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let cli = std::fs::read(dir.join("out.png")).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let p = psnr(&decode(&resp.images[0]), &reference_image(case, 0));
    println!(
        "cli {case}: PSNR {p:.2} dB vs diffusers, same bytes as split: {}",
        cli == resp.images[0].png
    );
    assert!(
        cli == resp.images[0].png,
        "{case}: CLI and split images differ"
    );

    let s = split.stats();
    for c in &s.components {
        assert_eq!(
            c.load_count, 1,
            "{} loaded {} times",
            c.class_name, c.load_count
        );
    }
    let count = |class: &str| {
        s.components
            .iter()
            .filter(|c| c.class_name == class)
            .count()
    };
    // Stage I's T5 encodes the prompt for both stages (stage II's text_encoder is never leased);
    // two UNets: stage I's and stage II's.
    assert_eq!(count("T5EncoderModel"), 1);
    assert_eq!(count("UNet2DConditionModel"), 2);
    assert_eq!(s.components.len(), 3, "{:?}", s.components);
    assert_eq!(s.active_leases, 0);
}

#[test]
fn deepfloyd_if_bad_requests_name_the_field_and_load_nothing() {
    let split = Split::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sd_folder = reference_request("sd1_t2i_pndm").model;
    let cases: Vec<(&str, &str, Mutation)> = vec![
        ("if_i2i", "width", Box::new(|r| r.width = 32)),
        ("if_inpaint", "height", Box::new(|r| r.height = 32)),
        (
            "if_t2i",
            "noise_level",
            Box::new(|r| r.noise_level = Some(10)),
        ),
        (
            "if_t2i",
            "upscale_guidance_scale",
            Box::new(|r| r.upscale_guidance_scale = Some(5.0)),
        ),
        (
            "if_t2i_sr",
            "noise_level",
            Box::new(|r| r.noise_level = Some(1000)),
        ),
        (
            "if_t2i",
            "upscale_model",
            Box::new(move |r| r.upscale_model = sd_folder.clone()),
        ),
        (
            "if_t2i_sr",
            "upscale_model",
            Box::new(|r| {
                r.upscale_model = scratch_models()
                    .join("nonexistent/if-sr")
                    .display()
                    .to_string()
            }),
        ),
        (
            "if_t2i",
            "clean_caption",
            Box::new(|r| r.clean_caption = true),
        ),
        (
            "if_t2i",
            "output_type",
            Box::new(|r| r.output_type = v1::OutputType::Latent as i32),
        ),
        ("if_t2i", "width", Box::new(|r| r.width = 36)),
        (
            "sd1_t2i_pndm",
            "upscale_model",
            Box::new(|r| r.upscale_model = reference_request("if_t2i_sr").upscale_model),
        ),
        (
            "sd1_t2i_pndm",
            "noise_level",
            Box::new(|r| r.noise_level = Some(100)),
        ),
        (
            "sd1_t2i_pndm",
            "clean_caption",
            Box::new(|r| r.clean_caption = true),
        ),
    ];
    for (case, field, edit) in cases {
        let mut req = reference_request(case);
        edit(&mut req);
        let err = split.generate(&rt, req).unwrap_err();
        println!("{case} / {field}: {:?} {}", err.code(), err.message());
        let code = if err.message().contains("/nonexistent/") {
            tonic::Code::NotFound
        } else {
            tonic::Code::InvalidArgument
        };
        assert_eq!(err.code(), code, "{case} / {field}: {err:?}");
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{case} / {field}: {}",
            err.message()
        );
    }
    let s = split.stats();
    assert!(s.components.is_empty(), "loaded: {:?}", s.components);
    assert_eq!(s.loads, 0);
    assert_eq!(s.active_leases, 0);
}
