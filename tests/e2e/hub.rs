//! Hub model references end to end: `autopipe-store` and `autopipe-orchestrator` processes with
//! `HF_ENDPOINT` pointing at `autopipe_repo::fake_hub` serving the fixture checkpoints as
//! `org/sd1-tiny` (plus the files a real SD repo holds that a pipeline must not download) and
//! `org/sd2-tiny` (fp16 weights only). The images must match diffusers' as for local folders, the
//! hub must see requests for needed files only, once, and an offline orchestrator
//! (`HF_HUB_OFFLINE=1`) must generate from the warm cache without a single request.

use autopipe_e2e::*;
use autopipe_proto::v1;
use autopipe_repo::fake_hub::{FakeHub, FakeRepo, SD_EXTRAS};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

/// A temporary `HF_HOME`, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("autopipe-e2e-hub-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp HF_HOME");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The reference case `case` with its model replaced by the hub repo `model`.
fn hub_request(case: &str, model: &str) -> v1::GenerateRequest {
    v1::GenerateRequest {
        model: model.into(),
        ..reference_request(case)
    }
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Generates `req` on the orchestrator at `service`, checks the image against diffusers' for `case`.
fn generate_matching(
    rt: &tokio::runtime::Runtime,
    service: &Service,
    case: &str,
    req: v1::GenerateRequest,
) -> v1::GenerateResponse {
    let resp = rt
        .block_on(async {
            orchestrator_client(&service.address)
                .await
                .generate(req)
                .await
        })
        .unwrap_or_else(|e| panic!("{case}: {e:?}"))
        .into_inner();
    assert_eq!(resp.images.len(), 1, "{case}");
    assert_eq!(resp.pipeline, "StableDiffusionPipeline", "{case}");
    let p = psnr(&decode(&resp.images[0]), &reference_image(case, 0));
    println!("{case:<16} from the hub vs diffusers PSNR {p:.2} dB");
    assert!(p >= 40.0, "{case}: PSNR {p:.2} dB");
    resp
}

#[test]
fn hub_references_fetch_only_what_the_pipeline_needs() {
    let started = Instant::now();
    let checkpoints = fixtures().join("checkpoints");
    let hub = FakeHub::start(vec![
        FakeRepo::from_dir("org/sd1-tiny", checkpoints.join("sd1-tiny"))
            .expect("sd1-tiny")
            .with_sd_extras(),
        FakeRepo::from_dir("org/sd2-tiny", checkpoints.join("sd2-tiny")).expect("sd2-tiny"),
    ]);
    let home = TempDir::new();
    let home_str = home.0.display().to_string();
    // Empty values read as unset, so nothing from the environment of the test run leaks in.
    let mut env = vec![
        ("HF_ENDPOINT", hub.endpoint()),
        ("HF_HOME", home_str.as_str()),
        ("HF_HUB_CACHE", ""),
        ("HF_TOKEN", ""),
        ("HUGGING_FACE_HUB_TOKEN", ""),
        ("HF_HUB_OFFLINE", ""),
    ];
    let split = Split::start_with_env(&[], &env);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut client = rt.block_on(orchestrator_client(&split.orchestrator.address));

    // Resolve reads model_index.json and nothing else.
    let r = rt
        .block_on(client.resolve(v1::ResolveRequest {
            model: "org/sd2-tiny".into(),
            task: v1::Task::Img2img as i32,
            ..Default::default()
        }))
        .expect("resolve org/sd2-tiny")
        .into_inner();
    assert_eq!(
        (r.pipeline.as_str(), r.model_class.as_str(), r.implemented),
        (
            "StableDiffusionImg2ImgPipeline",
            "StableDiffusionPipeline",
            true
        )
    );
    assert!(r
        .components
        .iter()
        .any(|c| c.name == "unet" && c.class_name == "UNet2DConditionModel"));
    assert_eq!(
        hub.downloads_since(0, "org/sd2-tiny"),
        set(&["model_index.json"])
    );

    // sd1: the regular safetensors of the five components, no safety checker, pickle, ckpt or
    // other variant; the image is diffusers' and the same as from the local folder.
    let sd1 = generate_matching(
        &rt,
        &split.orchestrator,
        "sd1_t2i_euler",
        hub_request("sd1_t2i_euler", "org/sd1-tiny"),
    );
    let sd1_files = hub.downloads_since(0, "org/sd1-tiny");
    assert_eq!(
        sd1_files,
        set(&[
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "tokenizer/merges.txt",
            "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer_config.json",
            "tokenizer/vocab.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ])
    );
    for (extra, _) in SD_EXTRAS {
        assert!(!sd1_files.contains(*extra), "{extra} was downloaded");
    }
    let local = rt
        .block_on(client.generate(reference_request("sd1_t2i_euler")))
        .expect("sd1 from its folder")
        .into_inner();
    assert!(
        local.images[0].png == sd1.images[0].png,
        "hub and local-folder images differ"
    );

    // sd2: fp16-only, asked for with variant fp16; its fp16 weights come, once each.
    let sd2_req = hub_request("sd2_t2i_dpmpp", "org/sd2-tiny");
    assert_eq!(sd2_req.variant, "fp16");
    let sd2 = generate_matching(&rt, &split.orchestrator, "sd2_t2i_dpmpp", sd2_req.clone());
    let sd2_weights: BTreeSet<_> = hub
        .downloads_since(0, "org/sd2-tiny")
        .into_iter()
        .filter(|f| f.ends_with(".safetensors"))
        .collect();
    assert_eq!(
        sd2_weights,
        set(&[
            "text_encoder/model.fp16.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors"
        ])
    );
    let cdn = hub
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/cdn/") && !r.is_probe())
        .count();
    assert_eq!(cdn, 3 + 3, "each weight file downloaded once");

    // Again: the cache serves, the hub is only asked for the repo listing.
    let mark = hub.log_len();
    let again = generate_matching(
        &rt,
        &split.orchestrator,
        "sd1_t2i_euler",
        hub_request("sd1_t2i_euler", "org/sd1-tiny"),
    );
    assert!(again.images[0].png == sd1.images[0].png);
    assert!(
        hub.resolves_since(mark).is_empty(),
        "{:?}",
        hub.resolves_since(mark)
    );
    assert!(
        hub.requests_since(mark)
            .iter()
            .all(|r| r.path.starts_with("/api/models/org/sd1-tiny/")),
        "{:?}",
        hub.requests_since(mark)
    );

    // A repo the hub does not have.
    for model in ["org/no-such-model", "org/sd1-tiny-typo"] {
        let err = rt
            .block_on(client.generate(hub_request("sd1_t2i_euler", model)))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{model}: {err:?}");
        assert!(err.message().contains(model), "{model}: {err:?}");
        let err = rt
            .block_on(client.resolve(v1::ResolveRequest {
                model: model.into(),
                task: v1::Task::Text2img as i32,
                ..Default::default()
            }))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{model}: {err:?}");
    }

    // Offline, on the warm cache: the same images, not one request to the hub.
    env.retain(|(k, _)| *k != "HF_HUB_OFFLINE");
    env.push(("HF_HUB_OFFLINE", "1"));
    let offline = orchestrator_with_env(&split.store.address, &env);
    let mark = hub.log_len();
    let sd1_offline = generate_matching(
        &rt,
        &offline,
        "sd1_t2i_euler",
        hub_request("sd1_t2i_euler", "org/sd1-tiny"),
    );
    let sd2_offline = generate_matching(&rt, &offline, "sd2_t2i_dpmpp", sd2_req);
    assert!(
        sd1_offline.images[0].png == sd1.images[0].png
            && sd2_offline.images[0].png == sd2.images[0].png
    );
    let mut offline_client = rt.block_on(orchestrator_client(&offline.address));
    let err = rt
        .block_on(offline_client.generate(hub_request("sd1_t2i_euler", "org/no-such-model")))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(err.message().contains("HF_HUB_OFFLINE"), "{err:?}");
    assert!(
        hub.requests_since(mark).is_empty(),
        "offline orchestrator asked the hub: {:?}",
        hub.requests_since(mark)
    );

    println!("hub end to end in {:.1} s", started.elapsed().as_secs_f64());
}
