//! The systems under test, each a set of child processes the driver starts, sends requests
//! to, measures (peak RSS from `/proc/<pid>/status`) and stops:
//! - `embedded`: `bench embedded-worker` (orchestrator + in-process store);
//! - `split`: `autopipe-store` + `autopipe-orchestrator`, talking gRPC over loopback TCP;
//! - `diffusers`: `bench/diffusers_bench.py` (AutoPipeline `from_pretrained` / `from_pipe`);
//! - `openvino`: `bench/openvino_bench.py` (optimum-intel's OV pipelines on the checkpoint's
//!   OpenVINO export, in their own venv).

use crate::spec::{reply_from_response, Reply, Spec};
use anyhow::{bail, Context, Result};
use autopipe_proto::tls::ClientTls;
use autopipe_proto::transport::{self, Address};
use autopipe_proto::v1;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// Which system a process set belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SystemKind {
    Embedded,
    /// embedded with `AUTOPIPE_CHANNELS_LAST=0` (NCHW convolutions): the A/B of that change.
    EmbeddedNchw,
    Split,
    Diffusers,
    /// optimum-intel on the fp32 OpenVINO export (bf16: `INFERENCE_PRECISION_HINT`).
    OpenVino,
}

impl SystemKind {
    /// The name used in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::EmbeddedNchw => "embedded-nchw",
            Self::Split => "split",
            Self::Diffusers => "diffusers",
            Self::OpenVino => "openvino",
        }
    }

    /// The system `--systems` names `name`.
    pub fn parse(name: &str) -> Result<Self> {
        [
            Self::Embedded,
            Self::EmbeddedNchw,
            Self::Split,
            Self::Diffusers,
            Self::OpenVino,
        ]
        .into_iter()
        .find(|k| k.name() == name)
        .with_context(|| {
            format!("--systems: unknown system {name:?} (embedded, split, diffusers, openvino, embedded-nchw)")
        })
    }

    /// The Python workers, whose replies carry their own pipeline load time and no store stats.
    pub fn is_python(self) -> bool {
        matches!(self, Self::Diffusers | Self::OpenVino)
    }
}

/// How to start the systems.
#[derive(Debug, Clone)]
pub struct Launch {
    pub bin_dir: PathBuf,
    pub python: String,
    pub script: PathBuf,
    /// The OpenVINO venv's Python (optimum-intel) and its worker script.
    pub openvino_python: String,
    pub openvino_script: PathBuf,
    /// The checkpoint's OpenVINO export ([`openvino_export`]), once made.
    pub openvino_model: Option<PathBuf>,
    pub threads: i32,
    pub dtype: String,
    pub model: String,
    pub variant: Option<String>,
    pub log_dir: PathBuf,
    /// Split mode over Unix sockets (as in one pod) instead of loopback TCP.
    pub unix: bool,
    /// Extra `autopipe-store` flags (split mode), e.g. `--max-batch 8`.
    pub store_args: Vec<String>,
    /// Extra `autopipe-orchestrator` flags (split mode), e.g. `--max-concurrency 8`.
    pub orchestrator_args: Vec<String>,
}

fn log_file(launch: &Launch, name: &str) -> Result<std::fs::File> {
    std::fs::create_dir_all(&launch.log_dir)?;
    let path = launch.log_dir.join(format!("{name}.log"));
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| path.display().to_string())
}

/// Peak resident set size (VmHWM) of a live process, in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    proc_status_bytes(pid, "VmHWM:")
}

/// Resident set size now (VmRSS) of a live process, in bytes.
pub fn rss(pid: u32) -> Option<u64> {
    proc_status_bytes(pid, "VmRSS:")
}

/// A `kB` field of `/proc/<pid>/status`, in bytes.
fn proc_status_bytes(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A child speaking the JSON-lines protocol.
struct LineWorker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    ready: Value,
}

impl LineWorker {
    fn spawn(mut cmd: Command, log: std::fs::File) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("worker stdout")?);
        let mut w = Self {
            child,
            stdin,
            stdout,
            ready: Value::Null,
        };
        w.ready = w.read_line()?;
        Ok(w)
    }

    fn read_line(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            let status = self.child.wait()?;
            bail!("worker exited ({status}) without answering; see its log");
        }
        serde_json::from_str(&line).with_context(|| format!("worker said {line:?}"))
    }

    fn call(&mut self, spec: &Spec) -> Result<Reply> {
        writeln!(self.stdin, "{}", serde_json::to_string(spec)?)?;
        self.stdin.flush()?;
        let reply: Reply = serde_json::from_value(self.read_line()?)?;
        if !reply.ok {
            bail!("{}", reply.error.unwrap_or_default());
        }
        Ok(reply)
    }
}

impl Drop for LineWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A service process killed when dropped.
struct Service {
    child: Child,
    address: Address,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn serving(address: &Address) -> bool {
    let Ok(channel) = transport::channel(address, &ClientTls::none()) else {
        return false;
    };
    let mut c = tonic_health::pb::health_client::HealthClient::new(channel);
    match c
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
    {
        Ok(r) => {
            r.into_inner().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        }
        Err(_) => false,
    }
}

/// Store + orchestrator processes and clients to them.
struct SplitProcs {
    store: Service,
    orchestrator: Service,
    rt: tokio::runtime::Runtime,
    client: v1::orchestrator_client::OrchestratorClient<tonic::transport::Channel>,
    store_client: v1::store_client::StoreClient<tonic::transport::Channel>,
}

impl SplitProcs {
    fn start(launch: &Launch) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (store_addr, orch_addr) = if launch.unix {
            let n = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            (
                Address::Unix(launch.log_dir.join(format!("store-{n}.sock"))),
                Address::Unix(launch.log_dir.join(format!("orchestrator-{n}.sock"))),
            )
        } else {
            (
                Address::Tcp(format!("127.0.0.1:{}", free_port()?)),
                Address::Tcp(format!("127.0.0.1:{}", free_port()?)),
            )
        };
        std::fs::create_dir_all(&launch.log_dir)?;
        let store_url = match &store_addr {
            Address::Tcp(hp) => format!("http://{hp}"),
            unix => unix.to_string(),
        };
        let threads = launch.threads.to_string();
        // The servers read local models only under their roots: the checkpoint's own folder's parent.
        let roots: Vec<String> = std::path::Path::new(&launch.model)
            .canonicalize()
            .ok()
            .and_then(|p| p.parent().map(|d| d.display().to_string()))
            .map(|root| vec!["--model-root".to_string(), root])
            .unwrap_or_default();
        let store = Command::new(launch.bin_dir.join("autopipe-store"))
            .args(["--listen", &store_addr.to_string(), "--threads", &threads, "--dtype", &launch.dtype])
            .args(["--lease-ttl", "600"])
            .args(&roots)
            .args(&launch.store_args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file(launch, "split-store")?))
            .spawn()
            .context("starting autopipe-store (build it: cargo build --release -p autopipe-store-daemon)")?;
        let store = Service {
            child: store,
            address: store_addr.clone(),
        };
        // The orchestrator as deployed: its own `--threads` default (1; the store computes).
        let orchestrator = Command::new(launch.bin_dir.join("autopipe-orchestrator"))
            .args(["--listen", &orch_addr.to_string(), "--store", &store_url])
            .args(["--dtype", &launch.dtype])
            .args(&roots)
            .args(&launch.orchestrator_args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file(launch, "split-orchestrator")?))
            .spawn()
            .context("starting autopipe-orchestrator (build it: cargo build --release -p autopipe-orchestrator)")?;
        let orchestrator = Service {
            child: orchestrator,
            address: orch_addr.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        for s in [&store, &orchestrator] {
            while !rt.block_on(serving(&s.address)) {
                if Instant::now() > deadline {
                    bail!("{} did not become healthy", s.address);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _entered = rt.enter();
        let client = v1::orchestrator_client::OrchestratorClient::new(transport::channel(
            &orch_addr,
            &ClientTls::none(),
        )?)
        .max_decoding_message_size(transport::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(transport::MAX_MESSAGE_BYTES);
        let store_client = v1::store_client::StoreClient::new(transport::channel(
            &store_addr,
            &ClientTls::none(),
        )?);
        drop(_entered);
        Ok(Self {
            store,
            orchestrator,
            rt,
            client,
            store_client,
        })
    }

    fn call(&mut self, spec: &Spec) -> Result<Reply> {
        let request = spec.to_request()?;
        let t0 = Instant::now();
        let resp = self
            .rt
            .block_on(self.client.generate(request))
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
        let png = resp
            .images
            .first()
            .map(|i| i.png.as_slice())
            .unwrap_or_default();
        std::fs::write(&spec.out, png)?;
        let mut reply = reply_from_response(&resp, wall_ms);
        let stats = self
            .rt
            .block_on(self.store_client.stats(v1::StatsRequest {}))?
            .into_inner();
        reply.loads = Some(stats.components.iter().map(|c| c.load_count).sum());
        reply.resident_bytes = Some(stats.resident_bytes);
        Ok(reply)
    }
}

/// What a round of concurrent clients measured.
pub struct ConcurrentRound {
    /// First request sent → last image back.
    pub wall: Duration,
    /// Each request's latency as its client saw it, in ms.
    pub latencies_ms: Vec<f64>,
    /// The store's (joined forwards, calls in them) after the round.
    pub batching: (u64, u64),
}

impl SplitProcs {
    /// `clients[c]` are the requests client `c` sends one after another; all clients at once.
    fn concurrent(&mut self, clients: &[Vec<Spec>]) -> Result<ConcurrentRound> {
        let requests = clients
            .iter()
            .map(|specs| {
                specs
                    .iter()
                    .map(|s| Ok((s.to_request()?, s.out.clone())))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let t0 = Instant::now();
        let latencies = self.rt.block_on(async {
            let tasks: Vec<_> = requests
                .into_iter()
                .map(|reqs| {
                    let mut client = self.client.clone();
                    tokio::spawn(async move {
                        let mut out = Vec::new();
                        for (req, path) in reqs {
                            let t = Instant::now();
                            let resp = client
                                .generate(req)
                                .await
                                .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
                                .into_inner();
                            out.push(t.elapsed().as_secs_f64() * 1e3);
                            let png = resp.images.first().map(|i| i.png.clone());
                            std::fs::write(&path, png.unwrap_or_default())?;
                        }
                        anyhow::Ok(out)
                    })
                })
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await??);
            }
            anyhow::Ok(all)
        })?;
        let wall = t0.elapsed();
        let stats = self
            .rt
            .block_on(self.store_client.stats(v1::StatsRequest {}))?
            .into_inner();
        Ok(ConcurrentRound {
            wall,
            latencies_ms: latencies,
            batching: (stats.batched_forwards, stats.batched_calls),
        })
    }
}

/// What [`System::steps_during_load`] saw: step times in ms.
pub struct StepsDuringLoad {
    pub undisturbed_ms: Vec<f64>,
    pub during_load_ms: Vec<f64>,
    pub load_ms: f64,
}

/// Arrival times of one streamed request's progress events (one per denoising step).
async fn step_times(
    mut client: v1::orchestrator_client::OrchestratorClient<tonic::transport::Channel>,
    request: v1::GenerateRequest,
    first_step: Option<std::sync::Arc<tokio::sync::Notify>>,
) -> Result<Vec<Instant>> {
    let mut events = client
        .generate_stream(request)
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let mut times = Vec::new();
    while let Some(event) = events
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
    {
        if let Some(v1::generate_event::Event::Progress(_)) = event.event {
            times.push(Instant::now());
            if let Some(n) = &first_step {
                n.notify_one();
            }
        }
    }
    Ok(times)
}

impl SplitProcs {
    /// `running` streamed alone, then again (request after request) while the store loads
    /// `load`'s components; the steps that began and ended inside that load, against the
    /// undisturbed ones. The loaded components are unloaded again afterwards.
    fn steps_during_load(
        &mut self,
        running: &Spec,
        load: v1::LoadRequest,
    ) -> Result<StepsDuringLoad> {
        let request = running.to_request()?;
        let gaps = |times: &[Instant], within: Option<(Instant, Instant)>| -> Vec<f64> {
            times
                .windows(2)
                .filter(|w| within.is_none_or(|(a, b)| w[0] >= a && w[1] <= b))
                .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
                .collect()
        };
        let undisturbed =
            self.rt
                .block_on(step_times(self.client.clone(), request.clone(), None))?;
        let unload = v1::UnloadRequest {
            components: load.components.clone(),
            dtype: load.dtype.clone(),
            keys: Vec::new(),
            request_id: String::new(),
        };
        let client = self.client.clone();
        let mut store = self.store_client.clone();
        let (runs, window) = self.rt.block_on(async move {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let first_step = std::sync::Arc::new(tokio::sync::Notify::new());
            let runner = {
                let (stop, first_step) = (stop.clone(), first_step.clone());
                tokio::spawn(async move {
                    let mut runs = Vec::new();
                    // Request after request until the load has ended, so that every moment of
                    // the load has a request stepping.
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        runs.push(
                            step_times(client.clone(), request.clone(), Some(first_step.clone()))
                                .await?,
                        );
                    }
                    anyhow::Ok(runs)
                })
            };
            first_step.notified().await;
            let t0 = Instant::now();
            store
                .load(load)
                .await
                .map_err(|s| anyhow::anyhow!("Load: {:?}: {}", s.code(), s.message()))?;
            let t1 = Instant::now();
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            let runs = runner.await??;
            anyhow::Ok((runs, (t0, t1)))
        })?;
        self.rt
            .block_on(self.store_client.unload(unload))
            .map_err(|s| anyhow::anyhow!("Unload: {:?}: {}", s.code(), s.message()))?;
        Ok(StepsDuringLoad {
            undisturbed_ms: gaps(&undisturbed, None),
            during_load_ms: runs.iter().flat_map(|r| gaps(r, Some(window))).collect(),
            load_ms: (window.1 - window.0).as_secs_f64() * 1e3,
        })
    }
}

enum Procs {
    Line(LineWorker),
    Split(Box<SplitProcs>),
}

/// A started system.
pub struct System {
    pub kind: SystemKind,
    procs: Procs,
    /// Wall time from spawning its processes to the first image.
    pub started: Instant,
}

impl System {
    /// Spawns the system's processes (the clock for cold start starts here).
    pub fn start(kind: SystemKind, launch: &Launch) -> Result<Self> {
        let started = Instant::now();
        let threads = launch.threads.to_string();
        let procs = match kind {
            SystemKind::Embedded | SystemKind::EmbeddedNchw => {
                let mut cmd = Command::new(std::env::current_exe()?);
                cmd.args([
                    "embedded-worker",
                    "--dtype",
                    &launch.dtype,
                    "--threads",
                    &threads,
                ])
                .env("RUST_LOG", "warn");
                if kind == SystemKind::EmbeddedNchw {
                    cmd.env("AUTOPIPE_CHANNELS_LAST", "0");
                }
                Procs::Line(LineWorker::spawn(cmd, log_file(launch, kind.name())?)?)
            }
            SystemKind::Diffusers => {
                let mut cmd = Command::new(&launch.python);
                cmd.arg(&launch.script).args([
                    "--model",
                    &launch.model,
                    "--dtype",
                    &launch.dtype,
                    "--threads",
                    &threads,
                ]);
                if let Some(v) = &launch.variant {
                    cmd.args(["--variant", v]);
                }
                cmd.env("OMP_NUM_THREADS", &threads)
                    .env("TQDM_DISABLE", "1")
                    .env("HF_HUB_OFFLINE", "1");
                Procs::Line(LineWorker::spawn(cmd, log_file(launch, "diffusers")?)?)
            }
            SystemKind::OpenVino => {
                let model = launch
                    .openvino_model
                    .as_ref()
                    .context("openvino: the checkpoint has no OpenVINO export yet")?;
                let mut cmd = Command::new(&launch.openvino_python);
                cmd.arg(&launch.openvino_script)
                    .arg("--model")
                    .arg(model)
                    .args(["--dtype", &launch.dtype, "--threads", &threads])
                    .env("OMP_NUM_THREADS", &threads)
                    .env("TQDM_DISABLE", "1")
                    .env("HF_HUB_OFFLINE", "1");
                Procs::Line(LineWorker::spawn(cmd, log_file(launch, "openvino")?)?)
            }
            SystemKind::Split => Procs::Split(Box::new(SplitProcs::start(launch)?)),
        };
        Ok(Self {
            kind,
            procs,
            started,
        })
    }

    /// The worker's start-up line (diffusers, openvino: library versions).
    pub fn ready_info(&self) -> Value {
        match &self.procs {
            Procs::Line(w) => w.ready.clone(),
            Procs::Split(_) => Value::Null,
        }
    }

    /// Runs one generation.
    pub fn call(&mut self, spec: &Spec) -> Result<Reply> {
        match &mut self.procs {
            Procs::Line(w) => w.call(spec),
            Procs::Split(s) => s.call(spec),
        }
        .with_context(|| format!("{} {}", self.kind.name(), spec.task))
    }

    /// Split mode only: every client's requests at once (see [`ConcurrentRound`]).
    pub fn concurrent(&mut self, clients: &[Vec<Spec>]) -> Result<ConcurrentRound> {
        match &mut self.procs {
            Procs::Split(s) => s.concurrent(clients),
            Procs::Line(_) => bail!("{}: concurrent clients need split mode", self.kind.name()),
        }
    }

    /// Split mode only: see [`StepsDuringLoad`].
    pub fn steps_during_load(
        &mut self,
        running: &Spec,
        load: v1::LoadRequest,
    ) -> Result<StepsDuringLoad> {
        match &mut self.procs {
            Procs::Split(s) => s.steps_during_load(running, load),
            Procs::Line(_) => bail!(
                "{}: loading beside a request needs split mode",
                self.kind.name()
            ),
        }
    }

    /// Peak RSS of each process: (role, bytes).
    pub fn peak_rss(&self) -> Vec<(String, Option<u64>)> {
        match &self.procs {
            Procs::Line(w) => vec![(self.kind.name().to_string(), peak_rss(w.child.id()))],
            Procs::Split(s) => vec![
                ("split-store".to_string(), peak_rss(s.store.child.id())),
                (
                    "split-orchestrator".to_string(),
                    peak_rss(s.orchestrator.child.id()),
                ),
            ],
        }
    }
}

/// The repository root (bench/..).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Exports `launch.model` for OpenVINO into `out` unless a current export is there
/// (`bench/openvino_bench.py --export`: `optimum-cli export openvino --weight-format fp32` of the
/// checkpoint, text encoder re-saved first); its log goes to the run's `openvino-export.log`.
pub fn openvino_export(launch: &Launch, out: &Path) -> Result<()> {
    anyhow::ensure!(
        Path::new(&launch.openvino_python).exists() || !launch.openvino_python.contains('/'),
        "openvino: no Python at {} (scripts/bench installs the OpenVINO venv; or leave openvino out of --systems)",
        launch.openvino_python
    );
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let t0 = Instant::now();
    let status = Command::new(&launch.openvino_python)
        .arg(&launch.openvino_script)
        .args(["--export", "--model", &launch.model, "--out"])
        .arg(out)
        .env("TQDM_DISABLE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file(launch, "openvino-export")?))
        .status()
        .context("starting the OpenVINO export")?;
    anyhow::ensure!(
        status.success(),
        "openvino export of {} failed ({status}); see {}",
        launch.model,
        launch.log_dir.join("openvino-export.log").display()
    );
    eprintln!(
        "  openvino export {} ({:.1} s; cached for the next runs)",
        out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::SystemKind;

    #[test]
    fn systems_parse_by_their_table_name() {
        for kind in [
            SystemKind::Embedded,
            SystemKind::EmbeddedNchw,
            SystemKind::Split,
            SystemKind::Diffusers,
            SystemKind::OpenVino,
        ] {
            assert_eq!(SystemKind::parse(kind.name()).unwrap(), kind);
        }
        let err = SystemKind::parse("onnx").unwrap_err().to_string();
        assert!(
            err.contains("\"onnx\"") && err.contains("openvino"),
            "{err}"
        );
        assert!(SystemKind::OpenVino.is_python() && !SystemKind::Split.is_python());
    }
}
