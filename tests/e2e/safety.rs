//! The Stable Diffusion safety checker over real gRPC: a checkpoint that ships one
//! (tests/fixtures/checkpoints/sd1-safety-tiny, scripts/fixtures/safety.py) runs it by default,
//! the response flags the same images as diffusers (black), the metric counts them; the operator
//! turns it off with --safety-checker off, and a request may skip it only with
//! --allow-request-safety-off. The CLI warns per flagged image. DeepFloyd IF's checker
//! (if-safety-tiny, scripts/fixtures/if_safety.py) adds `watermark_detected`, and its watermarker
//! marks every image whether the checker runs or not.

use autopipe_e2e::*;
use autopipe_proto::v1;
use tonic::Code;

/// diffusers' flags `field` for a case of the reference file `file`.
fn flags_of(file: &str, case: &str, field: &str) -> Vec<bool> {
    let text = std::fs::read_to_string(fixtures().join("reference").join(file)).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let c = cases.iter().find(|c| c["name"] == case).unwrap();
    serde_json::from_value(c[field].clone()).unwrap()
}

/// diffusers' flags for a case of safety_cases.json.
fn expected_flags(case: &str) -> Vec<bool> {
    flags_of("safety_cases.json", case, "nsfw_content_detected")
}

fn is_black(img: &image::RgbImage) -> bool {
    img.as_raw().iter().all(|&v| v == 0)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn flags_cross_the_wire_and_the_operator_decides_who_may_skip() {
    let m = format!("127.0.0.1:{}", free_port());
    let split = Split::start_with(&[], &["--metrics-listen", &m]);
    let off = start_orchestrator(&split.store.address, &["--safety-checker", "off"]);
    let allowing = start_orchestrator(&split.store.address, &["--allow-request-safety-off"]);
    let rt = runtime();
    let generate = |address, req: v1::GenerateRequest| {
        rt.block_on(async { orchestrator_client(address).await.generate(req).await })
            .map(|r| r.into_inner())
    };
    let case = "safety_t2i";
    let flags = expected_flags(case);
    let req = reference_request(case);

    // Default (auto): the checkpoint's checker runs; flags and pixels as diffusers.
    let resp = generate(&split.orchestrator.address, req.clone()).expect("generate");
    let got: Vec<bool> = resp
        .images
        .iter()
        .map(|i| i.nsfw_content_detected)
        .collect();
    assert_eq!(got, flags, "nsfw_content_detected");
    assert!(resp.images.iter().all(|i| i.safety_checked));
    for (i, img) in resp.images.iter().enumerate() {
        let (got, want) = (decode(img), reference_image(case, i));
        let p = psnr(&got, &want);
        println!("{case}_{i}: flagged {} PSNR {p:.2} dB", flags[i]);
        assert_eq!(is_black(&got), flags[i], "image {i}");
        assert!(p >= 40.0, "image {i}: PSNR {p:.2}");
    }
    let flagged = flags.iter().filter(|&&f| f).count() as f64;
    let series = format!("autopipe_nsfw_images_total{{model=\"{}\"}}", req.model);
    assert_eq!(metric(&scrape(&m), &series), flagged, "{series}");

    // A request asking to skip it, where the operator did not allow that: refused, nothing leased.
    let skip = v1::GenerateRequest {
        skip_safety_checker: true,
        ..req.clone()
    };
    let err = generate(&split.orchestrator.address, skip.clone()).unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().starts_with("skip_safety_checker: ")
            && err.message().contains("--allow-request-safety-off"),
        "{}",
        err.message()
    );
    assert_eq!(
        metric(&scrape(&m), &series),
        flagged,
        "a refusal counts nothing"
    );

    // Where the operator allows it, and where the operator turned checking off: the same images
    // unfiltered (the flagged ones are no longer black), no flags.
    for (who, address, req) in [
        ("--allow-request-safety-off", &allowing.address, skip),
        ("--safety-checker off", &off.address, req),
    ] {
        let resp = generate(address, req).unwrap_or_else(|e| panic!("{who}: {e:?}"));
        assert_eq!(resp.images.len(), flags.len());
        for (i, img) in resp.images.iter().enumerate() {
            assert!(!img.nsfw_content_detected && !img.safety_checked, "{who}");
            let got = decode(img);
            assert!(!is_black(&got), "{who}: image {i} is black");
            if !flags[i] {
                let p = psnr(&got, &reference_image(case, i));
                assert!(p >= 40.0, "{who}: image {i}: PSNR {p:.2}");
            }
        }
    }
    assert_eq!(split.stats().active_leases, 0);
}

#[test]
fn the_cli_writes_diffusers_images_and_warns_per_flagged_image() {
    let case = "safety_i2i";
    let flags = expected_flags(case);
    let req = reference_request(case);
    let dir = std::env::temp_dir().join(format!("autopipe-safety-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("in.png");
    std::fs::write(&image, &req.image).unwrap();
    let output = std::process::Command::new(bin("autopipe"))
        .args([
            "generate",
            "--embedded",
            "--threads",
            "1",
            "--task",
            "img2img",
        ])
        .args(["--model", &req.model, "--prompt", &req.prompt])
        .args(["--negative-prompt", &req.negative_prompt])
        .arg("--image")
        .arg(&image)
        .args(["--strength", &req.strength.unwrap().to_string()])
        .args(["--steps", &req.num_inference_steps.unwrap().to_string()])
        .args(["--guidance-scale", &req.guidance_scale.unwrap().to_string()])
        .args(["--seed", &req.seed.unwrap().to_string()])
        .args(["--num-images", &flags.len().to_string()])
        .arg("--output")
        .arg(dir.join("out.png"))
        .output()
        .expect("autopipe runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    for (i, flagged) in flags.iter().enumerate() {
        let path = dir.join(format!("out-{i}.png"));
        let got = image::open(&path).unwrap().to_rgb8();
        let p = psnr(&got, &reference_image(case, i));
        println!("cli {case}_{i}: flagged {flagged} PSNR {p:.2} dB");
        assert!(p >= 40.0, "image {i}: PSNR {p:.2}");
        let warning = format!(
            "warning: {}: the model's safety checker flagged image {i}",
            path.display()
        );
        assert_eq!(stderr.contains(&warning), *flagged, "{stderr}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn deepfloyd_if_flags_both_heads_and_always_watermarks() {
    let split = Split::start_with(&[], &[]);
    let off = start_orchestrator(&split.store.address, &["--safety-checker", "off"]);
    let rt = runtime();
    let generate = |address, req: v1::GenerateRequest| {
        rt.block_on(async { orchestrator_client(address).await.generate(req).await })
            .map(|r| r.into_inner())
    };
    let case = "if_safety_t2i";
    let nsfw = flags_of("if_safety_cases.json", case, "nsfw_content_detected");
    let watermark = flags_of("if_safety_cases.json", case, "watermark_detected");
    let req = reference_request(case);

    let resp = generate(&split.orchestrator.address, req.clone()).expect("generate");
    assert_eq!(resp.pipeline, "IFPipeline");
    let got = |f: fn(&v1::Image) -> bool| resp.images.iter().map(f).collect::<Vec<_>>();
    assert_eq!(got(|i| i.nsfw_content_detected), nsfw);
    assert_eq!(got(|i| i.watermark_detected), watermark);
    assert!(resp.images.iter().all(|i| i.safety_checked));
    for (i, img) in resp.images.iter().enumerate() {
        // The references are diffusers' PIL outputs: checked, then watermarked.
        let p = psnr(&decode(img), &reference_image(case, i));
        println!(
            "{case}_{i}: nsfw {} watermark {} PSNR {p:.2} dB",
            nsfw[i], watermark[i]
        );
        assert!(p >= 40.0, "image {i}: PSNR {p:.2}");
    }

    // Checking off: no flags, nothing black, and the unflagged images (marked) as before.
    let resp = generate(&off.address, req).expect("generate with the checker off");
    for (i, img) in resp.images.iter().enumerate() {
        assert!(!img.nsfw_content_detected && !img.watermark_detected && !img.safety_checked);
        let got = decode(img);
        assert!(!is_black(&got), "image {i} is black");
        if !(nsfw[i] || watermark[i]) {
            let p = psnr(&got, &reference_image(case, i));
            assert!(p >= 40.0, "image {i}: PSNR {p:.2}");
        }
    }
    assert_eq!(split.stats().active_leases, 0);
}
