//! `bench`: autopipe (embedded and split) against diffusers' AutoPipelines and OpenVINO
//! (optimum-intel), side by side in one run on one machine: same checkpoint, seed, parameters, dtype and intra-op thread count. Prints a
//! table and writes the samples, summary and targets as JSON (see bench/README.md).

mod embedded;
mod report;
mod spec;
mod systems;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use report::Sample;
use spec::Spec;
use std::path::{Path, PathBuf};
use systems::{Launch, System, SystemKind};

#[derive(Debug, Parser)]
#[command(about = "autopipe vs diffusers and OpenVINO, side by side")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

// Parsed once per process: the size of the biggest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs the benchmark and prints the table.
    Run(RunArgs),
    /// (internal) autopipe embedded mode serving specs on stdin.
    EmbeddedWorker {
        #[arg(long, default_value = "float32")]
        dtype: String,
        #[arg(long)]
        threads: i32,
    },
}

#[derive(Debug, Clone, clap::Args)]
struct RunArgs {
    /// Real-architecture SD 1.5 checkpoint (scripts/fixtures/sd15_arch.py builds it).
    #[arg(long, default_value_t = default_sd15())]
    sd15: String,
    /// The small test checkpoint.
    #[arg(long, default_value_t = repo_path("tests/fixtures/checkpoints/sd1-tiny"))]
    tiny: String,
    /// Which checkpoints: sd15, tiny (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = ["tiny".to_string(), "sd15".to_string()])]
    checkpoints: Vec<String>,
    /// Weight dtypes: float32, bfloat16.
    #[arg(long, value_delimiter = ',', default_values_t = ["float32".to_string(), "bfloat16".to_string()])]
    dtypes: Vec<String>,
    /// Systems: embedded, split, diffusers, openvino (and embedded-nchw: embedded without
    /// channels-last).
    #[arg(long, value_delimiter = ',', default_values_t = ["embedded".to_string(), "split".to_string(), "diffusers".to_string(), "openvino".to_string()])]
    systems: Vec<String>,
    /// Timed runs per task on sd15 (after the cold start and the task switches).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Timed runs per task on the small checkpoint.
    #[arg(long, default_value_t = 10)]
    tiny_runs: usize,
    /// Cold starts per system (each restarts its processes).
    #[arg(long, default_value_t = 1)]
    cold_runs: usize,
    /// Cold starts per system on the small checkpoint.
    #[arg(long, default_value_t = 3)]
    tiny_cold_runs: usize,
    /// Denoising steps on sd15.
    #[arg(long, default_value_t = 4)]
    steps: u32,
    /// Denoising steps on the small checkpoint.
    #[arg(long, default_value_t = 10)]
    tiny_steps: u32,
    /// Image side on sd15.
    #[arg(long, default_value_t = 256)]
    size: u32,
    /// Image side on the small checkpoint.
    #[arg(long, default_value_t = 64)]
    tiny_size: u32,
    /// Intra-op threads on every side (default: the machine's cores).
    #[arg(long)]
    threads: Option<i32>,
    /// Python with torch + diffusers.
    #[arg(long, env = "AUTOPIPE_BENCH_PYTHON", default_value = "python")]
    python: String,
    /// Python of the OpenVINO venv (optimum-intel; scripts/setup-openvino installs it).
    #[arg(long, env = "AUTOPIPE_BENCH_OPENVINO_PYTHON", default_value_t = cache_path("openvino-venv/bin/python"))]
    openvino_python: String,
    /// Weight-file variant for both sides (e.g. fp16); default: the plain files.
    #[arg(long)]
    variant: Option<String>,
    /// Transport between the bench, the orchestrator and the store in split mode: unix (sockets,
    /// as beside each other in one pod) or tcp (loopback).
    #[arg(long, default_value = "unix")]
    split_transport: String,
    /// Concurrent clients of the throughput rows (split mode, text2img, batched vs unbatched
    /// store); 0 = no throughput rows.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 8])]
    clients: Vec<usize>,
    /// Requests each client sends, one after another, in a throughput row (small checkpoint).
    #[arg(long, default_value_t = 4)]
    tiny_client_requests: usize,
    /// Requests each client sends in a throughput row on sd15.
    #[arg(long, default_value_t = 1)]
    client_requests: usize,
    /// Steps of the small checkpoint's requests while the store loads the SD 1.5-arch checkpoint
    /// (split mode; needs both folders): the load-interference row. Steps per request there.
    #[arg(long, default_value_t = 100)]
    load_interference_steps: u32,
    /// Skips the load-interference row.
    #[arg(long)]
    no_load_interference: bool,
    /// The batched store's --max-batch.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// The batched store's --batch-window-ms (default: the store's).
    #[arg(long)]
    batch_window_ms: Option<u64>,
    /// JSON output file; default bench/results/<checkpoints>-<unix time>.json.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn repo_path(p: &str) -> String {
    systems::repo_root().join(p).display().to_string()
}

/// `p` under the machine's autopipe cache (`$AUTOPIPE_CACHE`, default `~/.cache/autopipe`).
fn cache_path(p: &str) -> String {
    let cache = std::env::var("AUTOPIPE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/autopipe")
        });
    cache.join(p).display().to_string()
}

fn default_sd15() -> String {
    cache_path("sd15-arch")
}

const TASKS: [&str; 3] = ["text2img", "img2img", "inpaint"];
const PROMPT: &str = "a photograph of an astronaut riding a horse on the moon, highly detailed";
const SEED: u64 = 1234;
const GUIDANCE: f32 = 7.5;

/// Writes the deterministic init image and mask (white = repaint) every system reads.
fn make_inputs(dir: &Path, side: u32) -> Result<(String, String)> {
    std::fs::create_dir_all(dir)?;
    let image = image::RgbImage::from_fn(side, side, |x, y| {
        let (fx, fy) = (x as f32 / side as f32, y as f32 / side as f32);
        image::Rgb([
            (255.0 * fx) as u8,
            (255.0 * fy) as u8,
            (128.0 + 127.0 * (12.0 * fx * fy).sin()) as u8,
        ])
    });
    let mask = image::GrayImage::from_fn(side, side, |x, y| {
        let inside = (side / 4..3 * side / 4).contains(&x) && (side / 4..3 * side / 4).contains(&y);
        image::Luma([if inside { 255 } else { 0 }])
    });
    let (ip, mp) = (
        dir.join(format!("init-{side}.png")),
        dir.join(format!("mask-{side}.png")),
    );
    image.save(&ip)?;
    mask.save(&mp)?;
    Ok((ip.display().to_string(), mp.display().to_string()))
}

/// One (checkpoint, dtype) configuration.
struct Config<'a> {
    name: &'a str,
    model: String,
    dtype: String,
    side: u32,
    steps: u32,
    runs: usize,
    cold_runs: usize,
    /// Requests per client in the throughput rows.
    client_requests: usize,
}

struct Driver<'a> {
    args: &'a RunArgs,
    work: PathBuf,
    threads: i32,
    measured: report::Measured,
    versions: serde_json::Value,
    openvino_versions: serde_json::Value,
}

impl Driver<'_> {
    fn spec(
        &self,
        cfg: &Config,
        system: SystemKind,
        task: &str,
        inputs: &(String, String),
    ) -> Spec {
        let out = self.work.join(format!(
            "{}-{}-{}-{task}.png",
            cfg.name,
            cfg.dtype,
            system.name()
        ));
        Spec {
            model: cfg.model.clone(),
            task: task.to_string(),
            prompt: PROMPT.to_string(),
            negative_prompt: String::new(),
            width: cfg.side,
            height: cfg.side,
            steps: cfg.steps,
            guidance: GUIDANCE,
            strength: None,
            seed: SEED,
            image: (task != "text2img").then(|| inputs.0.clone()),
            mask_image: (task == "inpaint").then(|| inputs.1.clone()),
            dtype: cfg.dtype.clone(),
            variant: self.args.variant.clone(),
            out: out.display().to_string(),
        }
    }

    fn record(
        &mut self,
        cfg: &Config,
        system: SystemKind,
        phase: &'static str,
        task: &str,
        reply: &spec::Reply,
        before: Option<u64>,
    ) {
        let s = Sample {
            checkpoint: cfg.name.to_string(),
            dtype: cfg.dtype.clone(),
            system: system.name(),
            phase,
            task: task.to_string(),
            wall_ms: reply.wall_ms,
            denoise_ms: reply.denoise_ms,
            steps: reply.steps,
            acquire_ms: reply.acquire_ms,
            load_ms: reply.load_ms,
            load_peak_rss_bytes: reply.load_peak_rss_bytes,
            rss_before_bytes: reply.rss_before_bytes,
            loads_before: before,
            loads_after: reply.loads,
            resident_bytes: reply.resident_bytes,
        };
        eprintln!(
            "  {:<9} {:<6} {:<8} {:>10.1} ms  ({:.3} s/step){}",
            s.system,
            phase,
            task,
            s.wall_ms,
            s.step_s(),
            match (reply.acquire_ms, reply.load_ms) {
                (Some(a), _) =>
                    format!("  acquire {a:.2} ms, loads {:?}", reply.loads.unwrap_or(0)),
                (_, Some(l)) if l > 0.0 => format!("  load {l:.1} ms"),
                _ => String::new(),
            }
        );
        self.measured.samples.push(s);
    }

    fn launch(&self, cfg: &Config) -> Result<Launch> {
        Ok(Launch {
            bin_dir: std::env::current_exe()?
                .parent()
                .context("bench binary directory")?
                .to_path_buf(),
            python: self.args.python.clone(),
            script: systems::repo_root().join("bench/diffusers_bench.py"),
            openvino_python: self.args.openvino_python.clone(),
            openvino_script: systems::repo_root().join("bench/openvino_bench.py"),
            openvino_model: None,
            threads: self.threads,
            dtype: cfg.dtype.clone(),
            model: cfg.model.clone(),
            variant: self.args.variant.clone(),
            log_dir: self.work.join("logs"),
            unix: self.args.split_transport != "tcp",
            store_args: Vec::new(),
            orchestrator_args: Vec::new(),
        })
    }

    /// Throughput rows: `clients` concurrent text2img clients against a split system whose store
    /// runs every call alone (`--max-batch 1`), then one that joins them (step-level batching);
    /// each batched image against the same request's unbatched one (PSNR).
    fn run_throughput(&mut self, cfg: &Config) -> Result<()> {
        let clients: Vec<usize> = self
            .args
            .clients
            .iter()
            .copied()
            .filter(|c| *c > 0)
            .collect();
        let Some(&most) = clients.iter().max() else {
            return Ok(());
        };
        let inputs = make_inputs(&self.work, cfg.side)?;
        for (mode, max_batch) in [("unbatched", 1), ("batched", self.args.max_batch)] {
            let mut launch = self.launch(cfg)?;
            launch.store_args = vec!["--max-batch".into(), max_batch.to_string()];
            if let Some(w) = self.args.batch_window_ms {
                launch
                    .store_args
                    .extend(["--batch-window-ms".into(), w.to_string()]);
            }
            // Every client generating at once: admission must not be what limits them.
            launch.orchestrator_args = vec![
                "--max-concurrency".into(),
                most.to_string(),
                "--max-queue".into(),
                (4 * most).to_string(),
            ];
            let mut sys = System::start(SystemKind::Split, &launch)?;
            // Warm-up: load the model, let oneDNN make its kernels.
            sys.call(&self.spec(cfg, SystemKind::Split, "text2img", &inputs))?;
            for &c in &clients {
                let specs: Vec<Vec<spec::Spec>> = (0..c)
                    .map(|k| {
                        (0..cfg.client_requests)
                            .map(|i| {
                                let mut s = self.spec(cfg, SystemKind::Split, "text2img", &inputs);
                                s.seed = SEED + (1000 * k + i) as u64;
                                s.out = self
                                    .work
                                    .join(format!(
                                        "{}-{}-{mode}-c{c}-{k}-{i}.png",
                                        cfg.name, cfg.dtype
                                    ))
                                    .display()
                                    .to_string();
                                s
                            })
                            .collect()
                    })
                    .collect();
                let before = sys.concurrent(&[])?.batching;
                let round = sys.concurrent(&specs)?;
                let (forwards, calls) = (round.batching.0 - before.0, round.batching.1 - before.1);
                let psnr = (mode == "batched").then(|| {
                    specs
                        .iter()
                        .flatten()
                        .filter_map(|s| {
                            let alone = s.out.replace("-batched-", "-unbatched-");
                            report::psnr_files(&s.out, &alone).ok()
                        })
                        .fold(f64::INFINITY, f64::min)
                });
                let row = report::Throughput::new(
                    cfg.name,
                    &cfg.dtype,
                    mode,
                    c,
                    round.wall,
                    round.latencies_ms,
                    (forwards, calls),
                    psnr,
                );
                eprintln!(
                    "  split     {mode:<9} {c} clients  {:>7.1} images/min  p50 {:.0} ms  p95 {:.0} ms  joined forwards {forwards} (calls {calls}){}",
                    row.images_per_min,
                    row.p50_ms,
                    row.p95_ms,
                    psnr.map(|p| format!("  min PSNR vs unbatched {p:.1} dB")).unwrap_or_default()
                );
                self.measured.throughput.push(row);
            }
        }
        Ok(())
    }

    /// Load interference: a split store serving `cfg`'s model (the small checkpoint's requests,
    /// `--load-interference-steps` each, one after another) while an operator `Load` brings the
    /// SD 1.5-arch checkpoint's text encoder, UNet and VAE in at the same dtype; the running
    /// request's step times during that load against the same request undisturbed.
    fn run_load_interference(&mut self, cfg: &Config) -> Result<()> {
        let other = Path::new(&self.args.sd15);
        if !other.join("model_index.json").is_file() {
            eprintln!(
                "  load interference: skipped ({} is not built)",
                other.display()
            );
            return Ok(());
        }
        let checkpoint = autopipe_repo::Checkpoint::open(other)?;
        let components = ["text_encoder", "unet", "vae"]
            .iter()
            .map(|name| {
                Ok(autopipe_proto::v1::ComponentRequest {
                    name: name.to_string(),
                    class_name: checkpoint
                        .component_class(name)
                        .with_context(|| format!("model_index.json: {name}"))?
                        .to_string(),
                    path: checkpoint.component_dir(name)?.display().to_string(),
                    variant: self.args.variant.clone().unwrap_or_default(),
                    upcast_half: false,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let inputs = make_inputs(&self.work, cfg.side)?;
        // The store's default loader priority, and the loader at the compute thread's own (the
        // A/B of `--load-nice`).
        for load_nice in [autopipe_store::DEFAULT_LOAD_NICE, 0] {
            let mut launch = self.launch(cfg)?;
            // The servers take local models from under their roots: the other checkpoint's too.
            let root = checkpoint
                .root()
                .parent()
                .context("checkpoint folder's parent")?;
            launch.store_args = vec![
                "--model-root".into(),
                root.display().to_string(),
                "--load-nice".into(),
                load_nice.to_string(),
            ];
            let mut sys = System::start(SystemKind::Split, &launch)?;
            let mut running = self.spec(cfg, SystemKind::Split, "text2img", &inputs);
            running.steps = self.args.load_interference_steps;
            // Warm-up: the running model loaded, oneDNN's kernels made.
            sys.call(&running)?;
            let seen = sys.steps_during_load(
                &running,
                autopipe_proto::v1::LoadRequest {
                    components: components.clone(),
                    dtype: cfg.dtype.clone(),
                    request_id: "bench-load-interference".into(),
                },
            )?;
            let row = report::LoadInterference::new(
                cfg.name,
                &cfg.dtype,
                "sd15-arch",
                load_nice,
                seen.load_ms,
                seen.undisturbed_ms,
                seen.during_load_ms,
            );
            eprintln!(
                "  split     {} steps while sd15-arch loads (--load-nice {load_nice}, {:.0} ms): {:.1} ms/step (n {}) vs {:.1} undisturbed (n {}) = {:.2}×",
                cfg.name,
                row.load_ms,
                row.during_load_mean_ms,
                row.during_load_steps,
                row.undisturbed_mean_ms,
                row.undisturbed_steps,
                row.ratio
            );
            self.measured.load_interference.push(row);
        }
        Ok(())
    }

    /// Cold starts, task switches, then `runs` rounds of every task on every system, interleaved.
    fn run_config(&mut self, cfg: &Config, kinds: &[SystemKind]) -> Result<()> {
        eprintln!(
            "== {} {} {}x{} {} steps, {} threads",
            cfg.name, cfg.dtype, cfg.side, cfg.side, cfg.steps, self.threads
        );
        let mut launch = self.launch(cfg)?;
        if kinds.contains(&SystemKind::OpenVino) {
            // Once per machine and checkpoint, before anything is timed.
            let export = PathBuf::from(cache_path(&format!("openvino/{}-fp32", cfg.name)));
            systems::openvino_export(&launch, &export)?;
            launch.openvino_model = Some(export);
        }
        let inputs = make_inputs(&self.work, cfg.side)?;
        let mut running: Vec<Option<System>> = kinds.iter().map(|_| None).collect();
        // What reading the weight files costs, right before the loads it is compared with.
        let files =
            report::leased_weight_files(Path::new(&cfg.model), self.args.variant.as_deref())?;
        let cat_ms = report::time_cat(&files)?;
        eprintln!(
            "  cat {} weight files > /dev/null: {cat_ms:.1} ms",
            files.len()
        );
        let tensor_bytes = report::checkpoint_tensor_bytes(
            Path::new(&cfg.model),
            self.args.variant.as_deref(),
            &cfg.dtype,
        )?;
        let first_touch_ms = report::time_first_touch(tensor_bytes)?;
        eprintln!("  first touch of {tensor_bytes} bytes of fresh memory: {first_touch_ms:.1} ms");
        self.measured.cat.push(report::Cat {
            checkpoint: cfg.name.to_string(),
            dtype: cfg.dtype.clone(),
            file_bytes: files
                .iter()
                .filter_map(|f| f.metadata().ok())
                .map(|m| m.len())
                .sum(),
            cat_ms,
            tensor_bytes,
            first_touch_ms,
        });
        // Cold start: process start → first image (text2img); the order rotates between rounds.
        for round in 0..cfg.cold_runs.max(1) {
            for j in 0..kinds.len() {
                let i = (j + round) % kinds.len();
                running[i] = None; // stop the previous round's processes first (memory)
                let spec = self.spec(cfg, kinds[i], "text2img", &inputs);
                let mut sys = System::start(kinds[i], &launch)?;
                let mut reply = sys.call(&spec)?;
                reply.wall_ms = sys.started.elapsed().as_secs_f64() * 1e3;
                if kinds[i] == SystemKind::Diffusers && self.versions.is_null() {
                    self.versions = sys.ready_info();
                }
                if kinds[i] == SystemKind::OpenVino && self.openvino_versions.is_null() {
                    self.openvino_versions = sys.ready_info();
                }
                self.record(cfg, kinds[i], "cold", "text2img", &reply, Some(0));
                running[i] = Some(sys);
            }
        }
        // Task switch: the first request of each other task on the already loaded model.
        let mut loads: Vec<Option<u64>> = vec![None; kinds.len()];
        for task in &TASKS[1..] {
            for (i, kind) in kinds.iter().enumerate() {
                let spec = self.spec(cfg, *kind, task, &inputs);
                let sys = running[i].as_mut().context("system running")?;
                let reply = sys.call(&spec)?;
                let before = self
                    .measured
                    .samples
                    .iter()
                    .rev()
                    .find(|s| s.system == kind.name())
                    .and_then(|s| s.loads_after);
                self.record(cfg, *kind, "switch", task, &reply, before);
                loads[i] = reply.loads;
            }
        }
        // Steady state, interleaved: every task on every system each round, order rotating.
        for round in 0..cfg.runs {
            for task in TASKS {
                for j in 0..kinds.len() {
                    let i = (j + round) % kinds.len();
                    let spec = self.spec(cfg, kinds[i], task, &inputs);
                    let sys = running[i].as_mut().context("system running")?;
                    let reply = sys.call(&spec)?;
                    self.record(cfg, kinds[i], "steady", task, &reply, loads[i]);
                    loads[i] = reply.loads;
                }
            }
        }
        // Images: autopipe vs diffusers on identical inputs.
        if let Some(d) = kinds.iter().position(|k| *k == SystemKind::Diffusers) {
            for kind in kinds.iter().filter(|k| **k != SystemKind::Diffusers) {
                for task in TASKS {
                    let a = self.spec(cfg, *kind, task, &inputs).out;
                    let b = self.spec(cfg, kinds[d], task, &inputs).out;
                    match report::psnr_files(&a, &b) {
                        Ok(psnr_db) => self.measured.psnr_vs_diffusers.push(report::Psnr {
                            checkpoint: cfg.name.to_string(),
                            dtype: cfg.dtype.clone(),
                            system: kind.name(),
                            task: task.to_string(),
                            psnr_db,
                        }),
                        Err(e) => eprintln!("  psnr {} {task}: {e:#}", kind.name()),
                    }
                }
            }
        }
        for (i, kind) in kinds.iter().enumerate() {
            let sys = running[i].as_ref().context("system running")?;
            for (process, peak_rss_bytes) in sys.peak_rss() {
                self.measured.peak_rss.push(report::Rss {
                    checkpoint: cfg.name.to_string(),
                    dtype: cfg.dtype.clone(),
                    process,
                    peak_rss_bytes,
                });
            }
            if kind.is_python() {
                continue;
            }
            let resident = self
                .measured
                .samples
                .iter()
                .rev()
                .find(|s| {
                    s.checkpoint == cfg.name && s.dtype == cfg.dtype && s.system == kind.name()
                })
                .and_then(|s| s.resident_bytes);
            self.measured.memory.push(report::Memory {
                checkpoint: cfg.name.to_string(),
                dtype: cfg.dtype.clone(),
                system: kind.name(),
                resident_bytes: resident,
                checkpoint_tensor_bytes: tensor_bytes,
                ratio: resident.map(|r| r as f64 / tensor_bytes as f64),
            });
        }
        Ok(())
    }
}

fn run(args: &RunArgs) -> Result<()> {
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as i32)
            .unwrap_or(1)
    });
    let kinds = args
        .systems
        .iter()
        .map(|s| SystemKind::parse(s))
        .collect::<Result<Vec<_>>>()?;
    let work = std::env::temp_dir().join(format!("autopipe-bench-{}", std::process::id()));
    let mut driver = Driver {
        args,
        work,
        threads,
        measured: report::Measured::default(),
        versions: serde_json::Value::Null,
        openvino_versions: serde_json::Value::Null,
    };
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let out = match &args.out {
        Some(p) => p.clone(),
        None => systems::repo_root()
            .join("bench/results")
            .join(format!("{}-{started}.json", args.checkpoints.join("-"))),
    };
    for ckpt in &args.checkpoints {
        for dtype in &args.dtypes {
            let dtype = match autopipe_store::parse_kind(dtype)
                .map_err(|e| anyhow::anyhow!("--dtypes: {e}"))?
            {
                tch::Kind::Float => "float32",
                tch::Kind::BFloat16 => "bfloat16",
                tch::Kind::Half => "float16",
                other => anyhow::bail!("--dtypes: {other:?} is not benchmarked"),
            }
            .to_string();
            let cfg = match ckpt.as_str() {
                "sd15" => Config {
                    name: "sd15-arch",
                    model: args.sd15.clone(),
                    dtype,
                    side: args.size,
                    steps: args.steps,
                    runs: args.runs,
                    cold_runs: args.cold_runs,
                    client_requests: args.client_requests,
                },
                "tiny" => Config {
                    name: "sd1-tiny",
                    model: args.tiny.clone(),
                    dtype,
                    side: args.tiny_size,
                    steps: args.tiny_steps,
                    runs: args.tiny_runs,
                    cold_runs: args.tiny_cold_runs,
                    client_requests: args.tiny_client_requests,
                },
                other => anyhow::bail!("--checkpoints: unknown checkpoint {other:?} (sd15, tiny)"),
            };
            anyhow::ensure!(
                Path::new(&cfg.model).join("model_index.json").is_file(),
                "{}: no model_index.json",
                cfg.model
            );
            driver.run_config(&cfg, &kinds)?;
            driver.report(&out)?;
            driver.run_throughput(&cfg)?;
            driver.report(&out)?;
            if cfg.name == "sd1-tiny" && !args.no_load_interference {
                driver.run_load_interference(&cfg)?;
                driver.report(&out)?;
            }
        }
    }
    let result = driver.report(&out)?;
    println!("{}", result.table());
    println!("wrote {}", out.display());
    Ok(())
}

impl Driver<'_> {
    /// Summarises everything measured so far and writes it to `out` (after every configuration,
    /// so an interrupted run keeps what it measured).
    fn report(&self, out: &Path) -> Result<report::Report> {
        let args = self.args;
        let mut machine = report::machine(self.threads, self.versions.clone());
        machine["openvino_side"] = self.openvino_versions.clone();
        let result = report::Report::build(
            machine,
            serde_json::json!({
                "prompt": PROMPT, "seed": SEED, "guidance_scale": GUIDANCE, "threads": self.threads,
                "sd15": {"path": args.sd15, "side": args.size, "steps": args.steps, "runs": args.runs, "cold_runs": args.cold_runs},
                "tiny": {"path": args.tiny, "side": args.tiny_size, "steps": args.tiny_steps, "runs": args.tiny_runs, "cold_runs": args.tiny_cold_runs},
                "variant": args.variant, "systems": args.systems, "openvino_python": args.openvino_python, "split_transport": args.split_transport,
                "clients": args.clients, "max_batch": args.max_batch, "batch_window_ms": args.batch_window_ms,
                "client_requests": {"tiny": args.tiny_client_requests, "sd15": args.client_requests},
            }),
            self.measured.clone(),
        );
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(out, serde_json::to_string_pretty(&result)?)?;
        Ok(result)
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Run(args) => run(&args),
        Cmd::EmbeddedWorker { dtype, threads } => embedded::worker(&dtype, threads),
    }
}
