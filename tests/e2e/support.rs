//! Shared helpers for end-to-end tests: start the real `autopipe-store` / `autopipe-orchestrator`
//! binaries on loopback, wait for grpc.health.v1 to say SERVING, and build requests from the
//! diffusers reference cases.

pub use autopipe_proto::tls::ClientTls;
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

/// A folder for checkpoints a test builds at run time (inside the servers' model roots).
pub fn scratch_models() -> PathBuf {
    let dir = std::env::temp_dir().join("autopipe-e2e-models");
    std::fs::create_dir_all(&dir).expect("scratch model folder");
    dir.canonicalize().expect("scratch model folder")
}

/// The `--model-root` folders every test server gets (AUTOPIPE_MODEL_ROOTS): the committed
/// checkpoints and [`scratch_models`]. Servers read local models only under their roots.
pub fn model_roots() -> String {
    let checkpoints = fixtures()
        .join("checkpoints")
        .canonicalize()
        .expect("fixture checkpoints");
    format!("{}:{}", checkpoints.display(), scratch_models().display())
}

/// The `--max-*` limits every test server gets: the request validation's own bounds, so that the
/// suites that test something else (long runs to cancel, large messages) are not cut short by the
/// public-facing defaults. tests/e2e/security.rs gives its servers limits of their own.
pub const VALIDATION_BOUNDS: [(&str, &str); 4] = [
    ("AUTOPIPE_MAX_STEPS", "1000"),
    ("AUTOPIPE_MAX_IMAGES_PER_REQUEST", "16"),
    ("AUTOPIPE_MAX_IMAGE_PIXELS", "16777216"),
    ("AUTOPIPE_MAX_REQUEST_BYTES", "268435456"),
];

/// Where cargo put the workspace binaries (target/<profile>/), next to this test's `deps/`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile> directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// A free loopback port (bound then released; the service binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A running service process, killed when dropped.
pub struct Service {
    pub child: Child,
    pub address: Address,
    pub name: &'static str,
    /// How this harness reaches it (health checks): plaintext unless it serves TLS.
    pub tls: ClientTls,
}

impl Service {
    /// Starts `binary args…` and waits until its health service reports SERVING.
    pub fn start(name: &'static str, address: Address, args: &[String]) -> Self {
        Self::start_with_env(name, address, args, &[])
    }

    /// Like [`Service::start`], with `env` (name, value) pairs set for the process.
    pub fn start_with_env(
        name: &'static str,
        address: Address,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_with_tls(name, address, args, env, ClientTls::none())
    }

    /// Like [`Service::start_with_env`] for a service this harness reaches over `tls`.
    pub fn start_with_tls(
        name: &'static str,
        address: Address,
        args: &[String],
        env: &[(&str, &str)],
        tls: ClientTls,
    ) -> Self {
        let child = Command::new(bin(name))
            .args(args)
            .env("AUTOPIPE_MODEL_ROOTS", model_roots())
            .envs(VALIDATION_BOUNDS)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let service = Self {
            child,
            address,
            name,
            tls,
        };
        service.wait_serving(Duration::from_secs(60));
        service
    }

    /// Polls grpc.health.v1 until SERVING.
    pub fn wait_serving(&self, timeout: Duration) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let deadline = Instant::now() + timeout;
        loop {
            let ok = rt.block_on(async {
                let channel = transport::channel(&self.address, &self.tls).ok()?;
                let mut c = tonic_health::pb::health_client::HealthClient::new(channel);
                let r = c
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .ok()?;
                Some(
                    r.into_inner().status
                        == tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
                )
            });
            if ok == Some(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not become healthy on {}",
                self.name,
                self.address
            );
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
        Self::start_with_env(store_args, &[])
    }

    /// Like [`Split::start`], with `env` (name, value) pairs set for both processes.
    pub fn start_with_env(store_args: &[&str], env: &[(&str, &str)]) -> Self {
        let store_addr = Address::Tcp(format!("127.0.0.1:{}", free_port()));
        let mut args = vec![
            "--listen".to_string(),
            store_addr.to_string(),
            "--threads".into(),
            "1".into(),
        ];
        args.extend(store_args.iter().map(|s| s.to_string()));
        let store = Service::start_with_env("autopipe-store", store_addr.clone(), &args, env);
        let orchestrator = orchestrator_with_env(&store.address, env);
        Self {
            store,
            orchestrator,
        }
    }
}

/// Starts an `autopipe-orchestrator` process leasing from the store at `store`, with `env` set.
pub fn orchestrator_with_env(store: &Address, env: &[(&str, &str)]) -> Service {
    let address = Address::Tcp(format!("127.0.0.1:{}", free_port()));
    let args = [
        "--listen".to_string(),
        address.to_string(),
        "--store".into(),
        store.to_string(),
    ];
    Service::start_with_env("autopipe-orchestrator", address, &args, env)
}

/// An orchestrator client over a real socket.
pub async fn orchestrator_client(
    address: &Address,
) -> v1::orchestrator_client::OrchestratorClient<tonic::transport::Channel> {
    orchestrator_client_over(address, &ClientTls::none())
}

/// An orchestrator client over a real socket, TLS on TCP when `tls` is configured.
pub fn orchestrator_client_over(
    address: &Address,
    tls: &ClientTls,
) -> v1::orchestrator_client::OrchestratorClient<tonic::transport::Channel> {
    v1::orchestrator_client::OrchestratorClient::new(
        transport::channel(address, tls).expect("channel"),
    )
    .max_decoding_message_size(transport::MAX_MESSAGE_BYTES)
}

/// A store client over a real socket.
pub async fn store_client(
    address: &Address,
) -> v1::store_client::StoreClient<tonic::transport::Channel> {
    v1::store_client::StoreClient::new(
        transport::channel(address, &ClientTls::none()).expect("channel"),
    )
}

/// A change made to a request (bad-input tables: each case mutates a valid request).
pub type Mutation = Box<dyn Fn(&mut v1::GenerateRequest)>;

/// A certificate authority made in the test, issuing PEM files into a folder: the CA
/// certificate, and certificates for `localhost` / `127.0.0.1` usable by servers and clients.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    /// The CA certificate (what `--tls-ca` / `--tls-client-ca` name).
    pub cert: PathBuf,
    dir: PathBuf,
}

impl TestCa {
    /// A new CA named `name`, its certificate written to `dir/name-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("autopipe test CA {name}"),
        );
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let cert = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&cert, AsRef::<rcgen::Certificate>::as_ref(&issuer).pem()).unwrap();
        Self {
            issuer,
            cert,
            dir: dir.to_path_buf(),
        }
    }

    /// Issues a certificate named `name` (`dir/name.pem`, `dir/name.key`).
    pub fn issue(&self, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        self.issue_to(name, &cert, &key);
        (cert, key)
    }

    /// Issues a certificate with common name `name` into `cert` and `key`, each replaced
    /// atomically (rename), as a rotation rewrites a mounted Secret.
    pub fn issue_to(&self, name: &str, cert: &Path, key: &Path) {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let pair = rcgen::KeyPair::generate().unwrap();
        let signed = params.signed_by(&pair, &self.issuer).unwrap();
        for (path, pem) in [(key, pair.serialize_pem()), (cert, signed.pem())] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, pem).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
    }
}

/// The `GenerateRequest` for a diffusers reference case in tests/fixtures/reference/*cases.json.
pub fn reference_request(name: &str) -> v1::GenerateRequest {
    let cases: Vec<serde_json::Value> = [
        "cases.json",
        "sdxl_cases.json",
        "controlnet_cases.json",
        "kandinsky_cases.json",
        "kandinsky21_cases.json",
        "safety_cases.json",
        "if_cases.json",
        "if_safety_cases.json",
    ]
    .iter()
    .flat_map(|file| {
        let text = std::fs::read_to_string(fixtures().join("reference").join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        serde_json::from_str::<Vec<serde_json::Value>>(&text).expect("cases parse")
    })
    .collect();
    let c = cases
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no reference case {name}"));
    let task = match c["task"].as_str().unwrap_or_default() {
        "text2img" => v1::Task::Text2img,
        "img2img" => v1::Task::Img2img,
        _ => v1::Task::Inpaint,
    };
    let read = |k: &str| {
        c[k].as_str()
            .map(|p| std::fs::read(fixtures().join("reference").join(p)).expect("input image"))
            .unwrap_or_default()
    };
    let model = fixtures()
        .join("checkpoints")
        .join(c["model"].as_str().unwrap_or_default());
    v1::GenerateRequest {
        task: task as i32,
        model: model
            .canonicalize()
            .expect("checkpoint")
            .display()
            .to_string(),
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
        scheduler_options: c["scheduler_kwargs"]
            .as_object()
            .filter(|m| !m.is_empty())
            .map(|m| serde_json::Value::Object(m.clone()).to_string())
            .unwrap_or_default(),
        prompt_2: c["prompt_2"].as_str().unwrap_or_default().into(),
        negative_prompt_2: c["negative_prompt_2"].as_str().unwrap_or_default().into(),
        original_size: size(&c["original_size"]),
        crops_coords_top_left: coords(&c["crops_coords_top_left"]),
        target_size: size(&c["target_size"]),
        negative_original_size: size(&c["negative_original_size"]),
        negative_crops_coords_top_left: coords(&c["negative_crops_coords_top_left"]),
        negative_target_size: size(&c["negative_target_size"]),
        aesthetic_score: c["aesthetic_score"].as_f64().map(|v| v as f32),
        negative_aesthetic_score: c["negative_aesthetic_score"].as_f64().map(|v| v as f32),
        denoising_start: c["denoising_start"].as_f64().map(|v| v as f32),
        denoising_end: c["denoising_end"].as_f64().map(|v| v as f32),
        output_type: if c["output_type"] == "latent" {
            v1::OutputType::Latent as i32
        } else {
            v1::OutputType::Unspecified as i32
        },
        image_latents: c["image_latents"].as_str().map(|file| {
            let tensors =
                tch::Tensor::read_safetensors(fixtures().join("reference").join(file)).unwrap();
            let latents = &tensors.iter().find(|(n, _)| n == "latents").unwrap().1;
            autopipe_proto::tensor_to_wire(latents).unwrap()
        }),
        controlnet: strings(&c["controlnet"])
            .iter()
            .map(|folder| {
                let path = fixtures().join("checkpoints").join(folder);
                path.canonicalize()
                    .expect("controlnet")
                    .display()
                    .to_string()
            })
            .collect(),
        control_image: strings(&c["control_image"])
            .iter()
            .map(|p| std::fs::read(fixtures().join("reference").join(p)).expect("control image"))
            .collect(),
        controlnet_conditioning_scale: floats(&c["controlnet_conditioning_scale"]),
        control_guidance_start: floats(&c["control_guidance_start"]),
        control_guidance_end: floats(&c["control_guidance_end"]),
        guess_mode: c["guess_mode"].as_bool().unwrap_or(false),
        prior_num_inference_steps: c["prior_num_inference_steps"].as_u64().map(|v| v as u32),
        prior_guidance_scale: c["prior_guidance_scale"].as_f64().map(|v| v as f32),
        upscale_model: c["upscale_model"]
            .as_str()
            .map(|folder| {
                let path = fixtures().join("checkpoints").join(folder);
                path.canonicalize()
                    .expect("upscale_model")
                    .display()
                    .to_string()
            })
            .unwrap_or_default(),
        noise_level: c["noise_level"].as_u64().map(|v| v as u32),
        upscale_num_inference_steps: c["upscale_num_inference_steps"].as_u64().map(|v| v as u32),
        upscale_guidance_scale: c["upscale_guidance_scale"].as_f64().map(|v| v as f32),
        ..Default::default()
    }
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_f64().map(|f| f as f32))
                .collect()
        })
        .unwrap_or_default()
}

fn pair(v: &serde_json::Value) -> Option<(u32, u32)> {
    let a = v.as_array()?;
    Some((a.first()?.as_u64()? as u32, a.get(1)?.as_u64()? as u32))
}

fn size(v: &serde_json::Value) -> Option<v1::Size> {
    pair(v).map(|(height, width)| v1::Size { height, width })
}

fn coords(v: &serde_json::Value) -> Option<v1::Coords> {
    pair(v).map(|(top, left)| v1::Coords { top, left })
}

/// A case's reference tensor `name` (e.g. the latents of an `output_type="latent"` case).
pub fn reference_tensor(case: &str, name: &str) -> tch::Tensor {
    let tensors = tch::Tensor::read_safetensors(
        fixtures()
            .join("reference")
            .join(format!("{case}.safetensors")),
    )
    .expect("reference tensors");
    tensors
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{case}: no tensor {name}"))
        .1
}

/// The reference PNG of a case's image `i`, decoded to RGB.
pub fn reference_image(name: &str, i: usize) -> image::RgbImage {
    image::open(fixtures().join("reference").join(format!("{name}_{i}.png")))
        .expect("reference png")
        .to_rgb8()
}

/// PSNR in dB between two RGB images (infinite when identical).
pub fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes differ");
    let mse = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.as_raw().len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64.powi(2) / mse).log10()
    }
}

/// Decodes a response image.
pub fn decode(img: &v1::Image) -> image::RgbImage {
    image::load_from_memory(&img.png)
        .expect("response png")
        .to_rgb8()
}

/// A step observer that reports nothing and never stops.
pub struct Silent;

impl autopipe_pipelines::StepObserver for Silent {
    fn on_step(&self, _: autopipe_pipelines::Progress) {}
    fn should_stop(&self) -> Option<autopipe_pipelines::PipelineError> {
        None
    }
}

/// Starts an `autopipe-store` listening on `address` (`--threads 1`) with extra flags.
pub fn start_store(address: &Address, extra: &[&str]) -> Service {
    let mut args = vec![
        "--listen".to_string(),
        address.to_string(),
        "--threads".into(),
        "1".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Service::start("autopipe-store", address.clone(), &args)
}

/// Starts an `autopipe-orchestrator` on a free loopback port, leasing from the store at `store`.
pub fn start_orchestrator(store: &Address, extra: &[&str]) -> Service {
    let address = Address::Tcp(format!("127.0.0.1:{}", free_port()));
    let mut args = vec![
        "--listen".to_string(),
        address.to_string(),
        "--store".into(),
        store.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Service::start("autopipe-orchestrator", address, &args)
}

impl Split {
    /// Starts both with extra flags for each.
    pub fn start_with(store_args: &[&str], orchestrator_args: &[&str]) -> Self {
        let store = start_store(
            &Address::Tcp(format!("127.0.0.1:{}", free_port())),
            store_args,
        );
        let orchestrator = start_orchestrator(&store.address, orchestrator_args);
        Self {
            store,
            orchestrator,
        }
    }

    /// Like [`Split::start_with`], with the store on a Unix socket in the temp folder (the
    /// one-pod deployment: orchestrator and store side by side).
    pub fn start_unix(store_args: &[&str], orchestrator_args: &[&str]) -> Self {
        let path = std::env::temp_dir().join(format!(
            "autopipe-e2e-{}-{}.sock",
            std::process::id(),
            free_port()
        ));
        let store = start_store(&Address::Unix(path), store_args);
        let orchestrator = start_orchestrator(&store.address, orchestrator_args);
        Self {
            store,
            orchestrator,
        }
    }

    /// `Generate(req)` on the orchestrator, driven by `rt`.
    pub fn generate(
        &self,
        rt: &tokio::runtime::Runtime,
        req: v1::GenerateRequest,
    ) -> Result<v1::GenerateResponse, tonic::Status> {
        rt.block_on(async {
            orchestrator_client(&self.orchestrator.address)
                .await
                .generate(req)
                .await
        })
        .map(tonic::Response::into_inner)
    }

    /// The store's Stats (panics when the store cannot be reached).
    pub fn stats(&self) -> v1::StatsResponse {
        stats(&self.store.address).expect("store Stats")
    }
}

impl Service {
    /// Sends SIGTERM (graceful shutdown).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success(), "kill -TERM {} failed", self.child.id());
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// grpc.health.v1 status of the whole server ("" service), or `None` if it does not answer.
    pub fn health(&self) -> Option<tonic_health::pb::health_check_response::ServingStatus> {
        self.health_of("")
    }

    /// grpc.health.v1 status of `service` (e.g. "autopipe.v1.Orchestrator", what readiness asks).
    pub fn health_of(
        &self,
        service: &str,
    ) -> Option<tonic_health::pb::health_check_response::ServingStatus> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            let channel = transport::channel(&self.address, &self.tls).ok()?;
            let mut c = tonic_health::pb::health_client::HealthClient::new(channel);
            let r = c
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.to_string(),
                })
                .await
                .ok()?;
            tonic_health::pb::health_check_response::ServingStatus::try_from(r.into_inner().status)
                .ok()
        })
    }
}

/// A store's Stats over a fresh connection (its own runtime, so callable from anywhere).
pub fn stats(address: &Address) -> Result<v1::StatsResponse, tonic::Status> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        store_client(address)
            .await
            .stats(v1::StatsRequest {})
            .await
            .map(tonic::Response::into_inner)
    })
}

/// Polls `f` every 20 ms until it is true or `timeout` passes; returns how long it took.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if f() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET /metrics` from a Prometheus endpoint at `host:port`.
pub fn scrape(address: &str) -> String {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect(address).unwrap_or_else(|e| panic!("metrics {address}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: autopipe\r\n\r\n")
        .expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read metrics");
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "metrics: {}",
        text.lines().next().unwrap_or("")
    );
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// The value of the sample `series` (name plus labels exactly as exposed, e.g.
/// `autopipe_requests_total{task="text2img",model="m",status="ok"}`) in a scrape; 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Sum of every sample of metric `name` whose labels contain all of `labels` (`key="value"`).
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|lab| rest.contains(lab)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// A PNG of `w`×`h` pseudo-random pixels (deterministic), plus an optional ancillary chunk of
/// `padding` bytes that decoders skip: a way to make a request large without making it slow.
pub fn noise_png(w: u32, h: u32, seed: u32, padding: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2654435761).wrapping_add(1);
    let img = image::RgbImage::from_fn(w, h, |_, _| {
        let mut px = [0u8; 3];
        for c in &mut px {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            *c = (state >> 24) as u8;
        }
        image::Rgb(px)
    });
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png)
        .expect("encode png");
    let mut png = png.into_inner();
    if padding > 0 {
        // A private ancillary chunk ("apAd": lowercase first letter = ancillary) before IEND.
        let iend = png.len() - 12;
        let mut chunk = Vec::with_capacity(padding + 12);
        chunk.extend_from_slice(&(padding as u32).to_be_bytes());
        chunk.extend_from_slice(b"apAd");
        chunk.extend(std::iter::repeat_n(0u8, padding));
        chunk.extend_from_slice(&png_crc(&chunk[4..]).to_be_bytes());
        png.splice(iend..iend, chunk);
    }
    png
}

fn png_crc(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                0xedb8_8320 ^ (crc >> 1)
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
