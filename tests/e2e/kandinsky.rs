//! Kandinsky 2.1 and 2.2 end to end over real gRPC: the Combined pipelines (a decoder folder whose model
//! card names its prior, and a Combined folder) give diffusers' images in split mode and the same
//! bytes embedded; one prior serves all three tasks and both decoders and is loaded once.

use autopipe_e2e::*;
use autopipe_orchestrator::{Orchestrator, OrchestratorConfig};
use autopipe_store::{Store, StoreConfig};
use std::sync::Arc;

#[test]
fn kandinsky22_split_matches_diffusers_and_embedded_and_loads_the_prior_once() {
    tch::set_num_threads(1);
    let split = Split::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let embedded = Orchestrator::new(
        Arc::new(Store::new(StoreConfig::default())),
        OrchestratorConfig::default(),
    );
    for case in [
        "k22_t2i_neg",
        "k22_i2i",
        "k22_inpaint",
        "k22_t2i_combined",
        "k22_t2i",
    ] {
        let req = reference_request(case);
        let resp = split
            .generate(&rt, req.clone())
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let p = psnr(&decode(&resp.images[0]), &reference_image(case, 0));
        println!(
            "{case:<20} {:<38} split vs diffusers PSNR {p:.2} dB",
            resp.pipeline
        );
        assert!(p >= 40.0, "{case}: PSNR {p:.2} dB");
        let local = embedded.generate(&req, "embedded", &Silent).unwrap();
        assert!(
            local.images[0].png == resp.images[0].png,
            "{case}: embedded and split images differ"
        );
    }
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
    // The decoder folders' README prior and the Combined folder's prior_* files are the same bytes:
    // one PriorTransformer, image encoder and text encoder; one MoVQ; two UNets (4- and 9-channel).
    assert_eq!(count("PriorTransformer"), 1);
    assert_eq!(count("CLIPVisionModelWithProjection"), 1);
    assert_eq!(count("CLIPTextModelWithProjection"), 1);
    assert_eq!(count("VQModel"), 1);
    assert_eq!(count("UNet2DConditionModel"), 2);
    assert_eq!(s.active_leases, 0);
}

#[test]
fn kandinsky22_bad_prior_fields_are_invalid_arguments() {
    let split = Split::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut req = reference_request("k22_t2i");
    req.prior_num_inference_steps = Some(1);
    let err = split.generate(&rt, req).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("prior_num_inference_steps:"),
        "{}",
        err.message()
    );
    let mut req = reference_request("sd1_t2i_pndm");
    req.prior_guidance_scale = Some(2.0);
    let err = split.generate(&rt, req).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("prior_guidance_scale:"),
        "{}",
        err.message()
    );
}

#[test]
fn kandinsky21_split_matches_diffusers_and_embedded_and_shares_the_prior_with_2_2() {
    tch::set_num_threads(1);
    let split = Split::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let embedded = Orchestrator::new(
        Arc::new(Store::new(StoreConfig::default())),
        OrchestratorConfig::default(),
    );
    for case in [
        "k21_t2i_neg",
        "k21_i2i",
        "k21_inpaint",
        "k21_t2i_combined",
        "k22_t2i",
    ] {
        let req = reference_request(case);
        let resp = split
            .generate(&rt, req.clone())
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let p = psnr(&decode(&resp.images[0]), &reference_image(case, 0));
        println!(
            "{case:<20} {:<38} split vs diffusers PSNR {p:.2} dB",
            resp.pipeline
        );
        assert!(p >= 40.0, "{case}: PSNR {p:.2} dB");
        let local = embedded.generate(&req, "embedded", &Silent).unwrap();
        assert!(
            local.images[0].png == resp.images[0].png,
            "{case}: embedded and split images differ"
        );
    }
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
    // Both 2.1 decoders, the 2.1 Combined folder and the 2.2 decoder name the same prior; the 2.1
    // decoders share their text encoder and (by content) the 2.2 MoVQ; three UNets differ.
    assert_eq!(count("PriorTransformer"), 1);
    assert_eq!(count("CLIPVisionModelWithProjection"), 1);
    assert_eq!(count("CLIPTextModelWithProjection"), 1);
    assert_eq!(count("MultilingualCLIP"), 1);
    assert_eq!(count("VQModel"), 1);
    assert_eq!(count("UNet2DConditionModel"), 3);
    assert_eq!(s.active_leases, 0);
}

#[test]
fn kandinsky21_img2img_with_several_images_is_refused_as_diffusers_fails() {
    let split = Split::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut req = reference_request("k21_i2i");
    req.num_images_per_prompt = Some(2);
    let err = split.generate(&rt, req).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("num_images_per_prompt:"),
        "{}",
        err.message()
    );
    assert_eq!(split.stats().active_leases, 0);
}
