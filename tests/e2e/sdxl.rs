//! SDXL end to end over real gRPC: base, refiner and inpaint checkpoints give diffusers' images in
//! split mode and the same bytes embedded; the base → refiner hand-off passes latents through the
//! wire; task switching on one SDXL checkpoint loads each component once; a refiner asked for
//! text-to-image fails as diffusers does.

use autopipe_e2e::*;
use autopipe_orchestrator::{Orchestrator, OrchestratorConfig};
use autopipe_proto::v1;
use autopipe_store::{Store, StoreConfig};
use std::sync::Arc;

#[test]
fn sdxl_split_matches_diffusers_and_embedded() {
    tch::set_num_threads(1);
    let split = Split::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let embedded = Orchestrator::new(
        Arc::new(Store::new(StoreConfig::default())),
        OrchestratorConfig::default(),
    );
    for case in [
        "sdxl_t2i_prompt2",
        "sdxl_t2i_microcond",
        "refiner_i2i_aesthetic",
        "sdxl_inpaint_base",
        "sdxl_inpaint9_s075",
    ] {
        let req = reference_request(case);
        let resp = split
            .generate(&rt, req.clone())
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let p = psnr(&decode(&resp.images[0]), &reference_image(case, 0));
        println!(
            "{case:<24} {:<36} split vs diffusers PSNR {p:.2} dB",
            resp.pipeline
        );
        assert!(p >= 40.0, "{case}: PSNR {p:.2} dB");
        let local = embedded.generate(&req, "embedded", &Silent).unwrap();
        assert!(
            local.images[0].png == resp.images[0].png,
            "{case}: embedded and split images differ"
        );
    }
}

#[test]
fn base_to_refiner_hand_off_through_the_wire() {
    tch::set_num_threads(1);
    let split = Split::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let base = split
        .generate(&rt, reference_request("sdxl_handoff_base"))
        .unwrap();
    assert!(base.images.is_empty(), "a latent output has no images");
    let latents = base.latents.expect("latents in the response");
    let got = autopipe_proto::tensor_from_wire(&latents, tch::Device::Cpu).unwrap();
    let want = reference_tensor("sdxl_handoff_base", "latents");
    let diff = (&got - &want).abs().max().double_value(&[]);
    println!(
        "hand-off latents {:?}: max |Δ| vs diffusers {diff:.2e}",
        got.size()
    );
    assert!(diff < 1e-3, "latents differ from diffusers by {diff}");

    let mut refine = reference_request("sdxl_handoff_refiner");
    refine.image_latents = Some(latents);
    let resp = split.generate(&rt, refine).unwrap();
    let p = psnr(
        &decode(&resp.images[0]),
        &reference_image("sdxl_handoff_refiner", 0),
    );
    println!("hand-off refiner image PSNR {p:.2} dB ({})", resp.pipeline);
    assert!(p >= 40.0, "refiner after hand-off: PSNR {p:.2} dB");
}

#[test]
fn sdxl_task_switching_loads_each_component_once() {
    let split = Split::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    for case in [
        "sdxl_t2i_neg",
        "sdxl_i2i_s060",
        "sdxl_inpaint_base",
        "sdxl_t2i_neg",
    ] {
        let resp = split.generate(&rt, reference_request(case)).unwrap();
        let p = psnr(&decode(&resp.images[0]), &reference_image(case, 0));
        assert!(p >= 40.0, "{case}: PSNR {p:.2}");
    }
    let s = rt
        .block_on(async {
            store_client(&split.store.address)
                .await
                .stats(v1::StatsRequest {})
                .await
        })
        .unwrap()
        .into_inner();
    let mut classes: Vec<&str> = s.components.iter().map(|c| c.class_name.as_str()).collect();
    classes.sort();
    assert_eq!(
        classes,
        [
            "AutoencoderKL",
            "CLIPTextModel",
            "CLIPTextModelWithProjection",
            "UNet2DConditionModel"
        ]
    );
    for c in &s.components {
        assert_eq!(
            c.load_count, 1,
            "{} loaded {} times",
            c.class_name, c.load_count
        );
    }
    assert_eq!(s.active_leases, 0);
}

#[test]
fn a_refiner_asked_for_text2img_fails_as_diffusers_does() {
    let split = Split::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = split
        .generate(&rt, reference_request("sdxl_refiner_t2i_error"))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains(
            "Model expects an added time embedding vector of length 72, but a vector of 80 was created"
        ),
        "{}",
        err.message()
    );
    // Nothing was loaded for a request that could not run.
    let s = rt
        .block_on(async {
            store_client(&split.store.address)
                .await
                .stats(v1::StatsRequest {})
                .await
        })
        .unwrap()
        .into_inner();
    assert!(s.components.is_empty(), "{:?}", s.components);
}

#[test]
fn a_float16_sdxl_request_runs_the_vae_upcast_as_diffusers_does() {
    let split = Split::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut req = reference_request("sdxl_t2i_neg");
    req.dtype = "float16".into();
    let resp = split.generate(&rt, req).unwrap();
    // fp16 against diffusers' fp32 reference: close, not equal.
    let p = psnr(
        &decode(&resp.images[0]),
        &reference_image("sdxl_t2i_neg", 0),
    );
    println!("sdxl float16 vs diffusers float32: PSNR {p:.2} dB");
    assert!(p >= 30.0, "float16 SDXL image far from fp32: PSNR {p:.2}");
    let s = rt
        .block_on(async {
            store_client(&split.store.address)
                .await
                .stats(v1::StatsRequest {})
                .await
        })
        .unwrap()
        .into_inner();
    for c in &s.components {
        let want = if c.class_name == "AutoencoderKL" {
            "float32"
        } else {
            "float16"
        };
        assert_eq!(c.dtype, want, "{}", c.class_name);
    }
}
