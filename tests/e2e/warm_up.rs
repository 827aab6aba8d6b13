//! Warm-up (`--preload`): the orchestrator loads a model's components into the store before its
//! readiness (the Orchestrator health service) reports SERVING, so the first request loads nothing;
//! a preload that cannot succeed stops the process with the model named, instead of a replica that
//! never becomes ready.

use autopipe_e2e::*;
use autopipe_proto::transport::Address;
use autopipe_proto::v1;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tonic_health::pb::health_check_response::ServingStatus;

const READINESS: &str = "autopipe.v1.Orchestrator";

fn sd1_tiny() -> String {
    fixtures()
        .join("checkpoints/sd1-tiny")
        .canonicalize()
        .expect("sd1-tiny")
        .display()
        .to_string()
}

fn loads(stats: &v1::StatsResponse) -> u64 {
    stats.components.iter().map(|c| c.load_count).sum()
}

#[test]
fn readiness_waits_for_the_preloaded_model_and_the_first_request_loads_nothing() {
    // The tiny model loads fast, so what is checked is the order: by the time readiness reports
    // SERVING, the store already holds the model.
    let store = start_store(&Address::Tcp(format!("127.0.0.1:{}", free_port())), &[]);
    assert_eq!(loads(&stats(&store.address).unwrap()), 0);
    let orchestrator = start_orchestrator(&store.address, &["--preload", &sd1_tiny()]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match orchestrator.health_of(READINESS) {
            Some(ServingStatus::Serving) => break,
            status => {
                assert!(
                    Instant::now() < deadline,
                    "not ready after 60 s: {status:?}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let warmed = stats(&store.address).unwrap();
    let names: Vec<_> = warmed
        .components
        .iter()
        .map(|c| c.class_name.as_str())
        .collect();
    assert_eq!(
        warmed.components.len(),
        3,
        "CLIPTextModel, UNet2DConditionModel, AutoencoderKL resident: {names:?}"
    );
    assert_eq!(loads(&warmed), 3);
    assert_eq!(warmed.active_leases, 0, "the warm-up lease was released");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut client = rt.block_on(orchestrator_client(&orchestrator.address));
    let resp = rt
        .block_on(client.generate(reference_request("sd1_t2i_pndm")))
        .unwrap()
        .into_inner();
    let p = psnr(
        &decode(&resp.images[0]),
        &reference_image("sd1_t2i_pndm", 0),
    );
    assert!(p >= 40.0, "PSNR {p:.2}");
    let after = stats(&store.address).unwrap();
    assert_eq!(
        loads(&after),
        3,
        "the first request after warm-up loaded something"
    );
    assert_eq!(after.resident_bytes, warmed.resident_bytes);
}

#[test]
fn a_preload_that_cannot_succeed_stops_the_process_naming_the_model() {
    let store = start_store(&Address::Tcp(format!("127.0.0.1:{}", free_port())), &[]);
    let listen = format!("127.0.0.1:{}", free_port());
    let missing = scratch_models().join("autopipe-no-such-model");
    let out = Command::new(bin("autopipe-orchestrator"))
        .env("AUTOPIPE_MODEL_ROOTS", model_roots())
        .args([
            "--listen",
            &listen,
            "--store",
            &store.address.to_string(),
            "--preload",
        ])
        .arg(&missing)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run autopipe-orchestrator");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exited successfully: {stderr}");
    assert!(
        stderr.contains("--preload") && stderr.contains("autopipe-no-such-model"),
        "stderr: {stderr}"
    );
    assert!(stderr.contains("NotFound"), "stderr: {stderr}");
    assert_eq!(stats(&store.address).unwrap().active_leases, 0);
}
