//! Zero-cost task switching (diffusers' `from_pipe`): text2img, img2img and inpaint on one model
//! borrow the same resident components — each is loaded once, resident bytes stop growing after
//! the first request, and a task gives the same image whether reached first or after a switch.

use autopipe_e2e::*;
use autopipe_proto::v1;

#[test]
fn three_tasks_share_one_set_of_weights() {
    let split = Split::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(orchestrator_client(&split.orchestrator.address));
    let stats = || {
        rt.block_on(async {
            store_client(&split.store.address)
                .await
                .stats(v1::StatsRequest {})
                .await
        })
        .unwrap()
        .into_inner()
    };
    let cases = ["sd1_t2i_pndm", "sd1_i2i_s060", "sd1_inpaint_rect_s075"];

    let mut resident_after_first = None;
    for (i, case) in cases.iter().enumerate() {
        let resp = rt
            .block_on(client.clone().generate(reference_request(case)))
            .unwrap()
            .into_inner();
        let p = psnr(&decode(&resp.images[0]), &reference_image(case, 0));
        let s = stats();
        println!(
            "{case:<24} {:<34} PSNR {p:.2} dB, resident {} bytes",
            resp.pipeline, s.resident_bytes
        );
        assert!(p >= 40.0, "{case}: PSNR {p:.2}");
        assert_eq!(s.active_leases, 0, "lease left behind after {case}");
        match resident_after_first {
            None => resident_after_first = Some(s.resident_bytes),
            Some(r) => assert_eq!(
                s.resident_bytes, r,
                "resident bytes grew at request {i} ({case})"
            ),
        }
    }

    // The same three tasks concurrently, each twice.
    let handles: Vec<_> = cases
        .iter()
        .chain(cases.iter())
        .map(|case| {
            let mut c = client.clone();
            let req = reference_request(case);
            rt.spawn(async move { c.generate(req).await })
        })
        .collect();
    for (h, case) in handles.into_iter().zip(cases.iter().chain(cases.iter())) {
        let resp = rt.block_on(h).unwrap().unwrap().into_inner();
        let p = psnr(&decode(&resp.images[0]), &reference_image(case, 0));
        assert!(p >= 40.0, "concurrent {case}: PSNR {p:.2}");
    }

    let s = stats();
    assert_eq!(
        s.resident_bytes,
        resident_after_first.unwrap(),
        "resident bytes grew under concurrency"
    );
    assert_eq!(s.active_leases, 0);
    let classes: Vec<&str> = s.components.iter().map(|c| c.class_name.as_str()).collect();
    assert_eq!(
        s.components.len(),
        3,
        "expected text_encoder, unet, vae resident once each: {classes:?}"
    );
    for c in &s.components {
        assert_eq!(
            c.load_count, 1,
            "{} loaded {} times",
            c.class_name, c.load_count
        );
    }
}

#[test]
fn identical_components_across_checkpoints_are_stored_once() {
    // sd-inpaint-tiny ships byte-identical text_encoder and vae to sd1-tiny: the store keys
    // components by content, so after both models only the two UNets differ.
    let split = Split::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(orchestrator_client(&split.orchestrator.address));
    for case in ["sd1_inpaint_rect_s100", "sdinp_inpaint_rect_s100"] {
        rt.block_on(client.clone().generate(reference_request(case)))
            .unwrap();
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
    let count = |class: &str| {
        s.components
            .iter()
            .filter(|c| c.class_name == class)
            .count()
    };
    assert_eq!(
        (
            count("CLIPTextModel"),
            count("AutoencoderKL"),
            count("UNet2DConditionModel")
        ),
        (1, 1, 2)
    );
    let vae = s
        .components
        .iter()
        .find(|c| c.class_name == "AutoencoderKL")
        .unwrap();
    assert_eq!(
        vae.paths.len(),
        2,
        "the shared VAE should list both checkpoints: {:?}",
        vae.paths
    );
    assert_eq!(
        s.resident_bytes,
        s.components.iter().map(|c| c.bytes).sum::<u64>()
    );
}
