//! Split mode end to end: `autopipe-store` and `autopipe-orchestrator` as separate processes on
//! loopback; `Generate` and `GenerateStream` over real gRPC; the same images as diffusers and as
//! the embedded (in-process) mode.

use autopipe_e2e::*;
use autopipe_orchestrator::{Orchestrator, OrchestratorConfig};
use autopipe_proto::v1;
use autopipe_store::{Store, StoreConfig};
use std::sync::Arc;
use tokio_stream::StreamExt;

#[test]
fn split_mode_matches_diffusers_and_embedded() {
    // Same intra-op thread count as the store process (Split starts it with --threads 1), so both
    // modes run the same kernels.
    tch::set_num_threads(1);
    let split = Split::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    for case in [
        "sd1_t2i_euler_a",
        "sd1_i2i_s060",
        "sdinp_inpaint_soft_s075",
        "sd2_t2i_dpmpp",
    ] {
        let req = reference_request(case);
        let resp = rt
            .block_on(async {
                orchestrator_client(&split.orchestrator.address)
                    .await
                    .generate(req.clone())
                    .await
            })
            .unwrap()
            .into_inner();
        assert_eq!(resp.images.len(), 1, "{case}");
        let got = decode(&resp.images[0]);
        let p = psnr(&got, &reference_image(case, 0));
        println!(
            "{case:<28} split vs diffusers PSNR {p:.2} dB ({}; {:.1} ms/step)",
            resp.pipeline,
            resp.timings.as_ref().unwrap().step_ms_mean
        );
        assert!(p >= 40.0, "{case}: PSNR {p:.2} dB");

        let embedded = Orchestrator::new(
            Arc::new(Store::new(StoreConfig::default())),
            OrchestratorConfig::default(),
        );
        let local = embedded.generate(&req, "embedded", &Silent).unwrap();
        assert!(
            local.images[0].png == resp.images[0].png,
            "{case}: embedded and split images differ"
        );
        assert_eq!(local.pipeline, resp.pipeline);
    }
}

#[test]
fn generate_stream_reports_every_step_then_the_result() {
    let split = Split::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let req = reference_request("sd1_t2i_euler");
    let steps = req.num_inference_steps.unwrap();
    let (progress, result) = rt.block_on(async {
        let mut stream = orchestrator_client(&split.orchestrator.address)
            .await
            .generate_stream(req)
            .await
            .unwrap()
            .into_inner();
        let mut progress = Vec::new();
        let mut result = None;
        while let Some(ev) = stream.next().await {
            match ev.unwrap().event.unwrap() {
                v1::generate_event::Event::Progress(p) => progress.push((p.step, p.total_steps)),
                v1::generate_event::Event::Result(r) => result = Some(r),
            }
        }
        (progress, result)
    });
    let expected: Vec<(u32, u32)> = (1..=steps).map(|s| (s, steps)).collect();
    assert_eq!(progress, expected);
    let result = result.expect("a result event");
    assert_eq!(result.pipeline, "StableDiffusionPipeline");
    let p = psnr(
        &decode(&result.images[0]),
        &reference_image("sd1_t2i_euler", 0),
    );
    assert!(p >= 40.0, "PSNR {p:.2}");
}

#[test]
fn health_and_resolve_over_the_wire() {
    let split = Split::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let model = fixtures()
        .join("checkpoints/sd-inpaint-tiny")
        .canonicalize()
        .unwrap()
        .display()
        .to_string();
    let mut client = rt.block_on(orchestrator_client(&split.orchestrator.address));
    let resolve = |task: v1::Task, controlnet: &str| {
        rt.block_on(client.clone().resolve(v1::ResolveRequest {
            model: model.clone(),
            task: task as i32,
            controlnet: controlnet.into(),
            ..Default::default()
        }))
    };
    let r = resolve(v1::Task::Inpaint, "").unwrap().into_inner();
    assert_eq!(
        (r.pipeline.as_str(), r.model_class.as_str(), r.implemented),
        (
            "StableDiffusionInpaintPipeline",
            "StableDiffusionInpaintPipeline",
            true
        )
    );
    assert!(r
        .components
        .iter()
        .any(|c| c.name == "unet" && c.class_name == "UNet2DConditionModel"));
    let r = resolve(v1::Task::Text2img, "").unwrap().into_inner();
    assert_eq!(r.pipeline, "StableDiffusionPipeline");
    let r = resolve(v1::Task::Inpaint, "lllyasviel/control_v11p_sd15_inpaint")
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.pipeline.as_str(), r.implemented),
        ("StableDiffusionControlNetInpaintPipeline", true)
    );
    let err = resolve(v1::Task::Unspecified, "").unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // A 9-channel inpainting UNet cannot run text2img: a precise error, and the store holds no lease.
    let mut req = reference_request("sdinp_inpaint_rect_s100");
    req.task = v1::Task::Text2img as i32;
    req.image.clear();
    req.mask_image.clear();
    req.strength = None;
    let err = rt.block_on(client.generate(req)).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let stats = rt
        .block_on(async {
            store_client(&split.store.address)
                .await
                .stats(v1::StatsRequest {})
                .await
        })
        .unwrap()
        .into_inner();
    assert_eq!(stats.active_leases, 0);
}
