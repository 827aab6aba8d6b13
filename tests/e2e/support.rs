//! Shared helpers for end-to-end tests: start the real `autopipe-store` / `autopipe-orchestrator`
//! binaries on loopback, wait for grpc.health.v1 to say SERVING, and build requests from the
//! diffusers reference cases.

use autopipe_proto::transport::{self, Address};
use autopipe_proto::v1;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The repository's test fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Where cargo put the workspace binaries (target/<profile>/), next to this test's `deps/`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile> directory");
    let path = dir.join(name);
    assert!(path.exists(), "{} not built: run `cargo build --workspace --bins` first (scripts/test does)", path.display());
    path
}

/// A free loopback port (bound then released; the service binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A running service process, killed when dropped.
pub struct Service {
    pub child: Child,
    pub address: Address,
    pub name: &'static str,
}

impl Service {
    /// Starts `binary args…` and waits until its health service reports SERVING.
    pub fn start(name: &'static str, address: Address, args: &[String]) -> Self {
        let child = Command::new(bin(name))
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let service = Self { child, address, name };
        service.wait_serving(Duration::from_secs(60));
        service
    }

    /// Polls grpc.health.v1 until SERVING.
    pub fn wait_serving(&self, timeout: Duration) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let deadline = Instant::now() + timeout;
        loop {
            let ok = rt.block_on(async {
                let channel = transport::channel(&self.address).ok()?;
                let mut c = tonic_health::pb::health_client::HealthClient::new(channel);
                let r = c.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.ok()?;
                Some(r.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
            });
            if ok == Some(true) {
                return;
            }
            assert!(Instant::now() < deadline, "{} did not become healthy on {}", self.name, self.address);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends SIGKILL and waits for the process to end.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A store and an orchestrator as separate processes, talking gRPC over loopback TCP.
pub struct Split {
    pub store: Service,
    pub orchestrator: Service,
}

impl Split {
    /// Starts both; `store_args` are extra `autopipe-store` flags.
    pub fn start(store_args: &[&str]) -> Self {
        let store_addr = Address::Tcp(format!("127.0.0.1:{}", free_port()));
        let mut args = vec!["--listen".to_string(), store_addr.to_string(), "--threads".into(), "1".into()];
        args.extend(store_args.iter().map(|s| s.to_string()));
        let store = Service::start("autopipe-store", store_addr.clone(), &args);
        let orch_addr = Address::Tcp(format!("127.0.0.1:{}", free_port()));
        let orchestrator = Service::start(
            "autopipe-orchestrator",
            orch_addr.clone(),
            &["--listen".into(), orch_addr.to_string(), "--store".into(), format!("http://{store_addr}")],
        );
        Self { store, orchestrator }
    }
}

/// An orchestrator client over a real socket.
pub async fn orchestrator_client(address: &Address) -> v1::orchestrator_client::OrchestratorClient<tonic::transport::Channel> {
    v1::orchestrator_client::OrchestratorClient::new(transport::channel(address).expect("channel"))
        .max_decoding_message_size(transport::MAX_MESSAGE_BYTES)
}

/// A store client over a real socket.
pub async fn store_client(address: &Address) -> v1::store_client::StoreClient<tonic::transport::Channel> {
    v1::store_client::StoreClient::new(transport::channel(address).expect("channel"))
}

/// The `GenerateRequest` for a diffusers reference case in tests/fixtures/reference/cases.json.
pub fn reference_request(name: &str) -> v1::GenerateRequest {
    let cases: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/cases.json")).expect("cases.json"),
    )
    .expect("cases.json parses");
    let c = cases.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no reference case {name}"));
    let task = match c["task"].as_str().unwrap_or_default() {
        "text2img" => v1::Task::Text2img,
        "img2img" => v1::Task::Img2img,
        _ => v1::Task::Inpaint,
    };
    let read = |k: &str| c[k].as_str().map(|p| std::fs::read(fixtures().join("reference").join(p)).expect("input image")).unwrap_or_default();
    let model = fixtures().join("checkpoints").join(c["model"].as_str().unwrap_or_default());
    v1::GenerateRequest {
        task: task as i32,
        model: model.canonicalize().expect("checkpoint").display().to_string(),
        prompt: c["prompt"].as_str().unwrap_or_default().into(),
        negative_prompt: c["negative_prompt"].as_str().unwrap_or_default().into(),
        width: c["width"].as_u64().unwrap_or(0) as u32,
        height: c["height"].as_u64().unwrap_or(0) as u32,
        num_inference_steps: c["num_inference_steps"].as_u64().map(|v| v as u32),
        guidance_scale: c["guidance_scale"].as_f64().map(|v| v as f32),
        strength: c["strength"].as_f64().map(|v| v as f32),
        seed: c["seed"].as_u64(),
        image: read("image"),
        mask_image: read("mask_image"),
        scheduler: c["scheduler"].as_str().unwrap_or_default().into(),
        num_images_per_prompt: c["num_images_per_prompt"].as_u64().map(|v| v as u32),
        variant: c["variant"].as_str().unwrap_or_default().into(),
        scheduler_options: c["scheduler_kwargs"].as_object().filter(|m| !m.is_empty()).map(|m| serde_json::Value::Object(m.clone()).to_string()).unwrap_or_default(),
        ..Default::default()
    }
}

/// The reference PNG of a case's image `i`, decoded to RGB.
pub fn reference_image(name: &str, i: usize) -> image::RgbImage {
    image::open(fixtures().join("reference").join(format!("{name}_{i}.png"))).expect("reference png").to_rgb8()
}

/// PSNR in dB between two RGB images (infinite when identical).
pub fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes differ");
    let mse = a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>()
        / a.as_raw().len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64.powi(2) / mse).log10()
    }
}

/// Decodes a response image.
pub fn decode(img: &v1::Image) -> image::RgbImage {
    image::load_from_memory(&img.png).expect("response png").to_rgb8()
}

/// A step observer that reports nothing and never stops.
pub struct Silent;

impl autopipe_pipelines::StepObserver for Silent {
    fn on_step(&self, _: autopipe_pipelines::Progress) {}
    fn should_stop(&self) -> Option<autopipe_pipelines::PipelineError> {
        None
    }
}
