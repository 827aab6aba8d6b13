//! ControlNet end to end over real gRPC: on one Stable Diffusion checkpoint, text-to-image without
//! a ControlNet, then with one, then img2img and inpaint with it (and the same net twice as a
//! MultiControlNet) give diffusers' images in split mode and the same bytes embedded, while the
//! base components and the ControlNet each load once; SDXL's ControlNet pipelines split ==
//! embedded; bad ControlNet fields are refused before anything loads.

use autopipe_e2e::*;
use autopipe_orchestrator::{Orchestrator, OrchestratorConfig};
use autopipe_proto::v1;
use autopipe_store::{Store, StoreConfig};
use std::sync::Arc;

fn store_stats(split: &Split, rt: &tokio::runtime::Runtime) -> v1::StatsResponse {
    rt.block_on(async {
        store_client(&split.store.address)
            .await
            .stats(v1::StatsRequest {})
            .await
    })
    .unwrap()
    .into_inner()
}

/// Runs reference `cases` split and embedded: diffusers' pixels, identical bytes.
fn split_matches_diffusers_and_embedded(
    split: &Split,
    rt: &tokio::runtime::Runtime,
    cases: &[&str],
) {
    let embedded = Orchestrator::new(
        Arc::new(Store::new(StoreConfig::default())),
        OrchestratorConfig::default(),
    );
    for case in cases {
        let req = reference_request(case);
        let resp = split
            .generate(rt, req.clone())
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let p = psnr(&decode(&resp.images[0]), &reference_image(case, 0));
        println!(
            "{case:<20} {:<44} split vs diffusers PSNR {p:.2} dB",
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
fn adding_a_controlnet_loads_only_the_controlnet() {
    tch::set_num_threads(1);
    let split = Split::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    split_matches_diffusers_and_embedded(
        &split,
        &rt,
        &[
            "sd1_t2i_negative",
            "cn_sd1_t2i",
            "cn_sd1_i2i",
            "cn_sd1_inpaint",
            "cn_sd1_multi",
        ],
    );
    let s = store_stats(&split, &rt);
    let mut classes: Vec<&str> = s.components.iter().map(|c| c.class_name.as_str()).collect();
    classes.sort();
    assert_eq!(
        classes,
        [
            "AutoencoderKL",
            "CLIPTextModel",
            "ControlNetModel",
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
    assert_eq!(s.loads, 4);
    assert_eq!(s.active_leases, 0);
}

#[test]
fn sdxl_controlnet_split_matches_diffusers_and_embedded() {
    tch::set_num_threads(1);
    let split = Split::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    split_matches_diffusers_and_embedded(
        &split,
        &rt,
        &[
            "cn_sdxl_t2i",
            "cn_sdxl_i2i",
            "cn_sdxl_inpaint9",
            "cn_sdxl_guess",
        ],
    );
}

#[test]
fn bad_controlnet_fields_are_refused_before_anything_loads() {
    let split = Split::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let good = reference_request("cn_sd1_t2i");
    let unet_folder = fixtures().join("checkpoints/sd1-tiny/unet");
    let cases: Vec<(tonic::Code, &str, Mutation)> = vec![
        (
            tonic::Code::InvalidArgument,
            "control_image:",
            Box::new(|r| r.control_image.clear()),
        ),
        (
            tonic::Code::InvalidArgument,
            "controlnet:",
            Box::new(move |r| r.controlnet = vec![unet_folder.display().to_string()]),
        ),
        (
            tonic::Code::Unimplemented,
            "controlnet:",
            Box::new(|r| r.controlnet = vec!["lllyasviel/sd-controlnet-canny".into()]),
        ),
        (
            tonic::Code::InvalidArgument,
            "control_guidance_start:",
            Box::new(|r| {
                r.control_guidance_start = vec![0.8];
                r.control_guidance_end = vec![0.2];
            }),
        ),
        (
            tonic::Code::InvalidArgument,
            "guess_mode:",
            Box::new(|r| {
                r.controlnet.clear();
                r.control_image.clear();
                r.guess_mode = true;
            }),
        ),
    ];
    for (code, prefix, edit) in cases {
        let mut req = good.clone();
        edit(&mut req);
        let err = split.generate(&rt, req).expect_err(prefix);
        assert_eq!(err.code(), code, "{prefix} {err:?}");
        assert!(err.message().starts_with(prefix), "{}", err.message());
    }
    // img2img takes its size from the init image (64x64): a 64x48 control image does not fit.
    let mut req = reference_request("cn_sd1_i2i");
    req.control_image = reference_request("cn_sd1_t2i").control_image;
    let err = split.generate(&rt, req).expect_err("control image size");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .starts_with("control_image: a control image is 64x48"),
        "{}",
        err.message()
    );
    let s = store_stats(&split, &rt);
    assert!(s.components.is_empty(), "{:?}", s.components);
}
