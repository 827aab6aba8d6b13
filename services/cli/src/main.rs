//! `autopipe`: the command line. `serve` runs the orchestrator with an in-process store (the
//! single-machine default); `generate`, `resolve` and `stats` are gRPC clients (`generate
//! --embedded` runs the same pipeline in-process without any server).

use anyhow::{bail, Context};
use autopipe_orchestrator::metrics::{Histogram, LATENCY_BUCKETS};
use autopipe_orchestrator::{
    serve, Orchestrator, OrchestratorConfig, SafetyCheckerMode, ServeOptions,
};
use autopipe_pipelines::{PipelineError, Progress, StepObserver};
use autopipe_proto::auth::{Authenticate, BearerToken, TokenAuth};
use autopipe_proto::tls::{ClientTlsArgs, ServerTlsArgs};
use autopipe_proto::transport::{self, Address, MAX_MESSAGE_BYTES};
use autopipe_proto::v1;
use autopipe_store::{Store, StoreArgs, StoreConfig, StoreObserver};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;

#[derive(Debug, Parser)]
#[command(version, about = "autopipe: diffusers' AutoPipeline as a gRPC service")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the biggest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the orchestrator with an in-process component store (one machine, no separate store).
    Serve(ServeArgs),
    /// Generate images: through a server (--server) or in-process (--embedded).
    Generate(GenerateArgs),
    /// Which diffusers pipeline a (model, task, controlnet) resolves to.
    Resolve(ResolveArgs),
    /// What a store holds: resident components, bytes, leases.
    Stats(StatsArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to serve autopipe.v1.Orchestrator on: host:port or unix:///path.sock.
    #[arg(long, env = "AUTOPIPE_LISTEN", default_value = "127.0.0.1:50051")]
    listen: Address,
    #[command(flatten)]
    tls: ServerTlsArgs,
    #[command(flatten)]
    store: StoreArgs,
    /// Requests generating at once.
    #[arg(long, env = "AUTOPIPE_MAX_CONCURRENCY", default_value_t = 4)]
    max_concurrency: usize,
    /// Requests waiting for a slot before RESOURCE_EXHAUSTED.
    #[arg(long, env = "AUTOPIPE_MAX_QUEUE", default_value_t = 64)]
    max_queue: usize,
    /// Seconds in-flight requests may take to finish after SIGTERM.
    #[arg(long, env = "AUTOPIPE_DRAIN_TIMEOUT", default_value_t = 30)]
    drain_timeout: u64,
    /// Serve Prometheus metrics on this host:port (GET /metrics); off when unset.
    #[arg(long, env = "AUTOPIPE_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Models to warm up at start (local folders or hub repo ids, comma-separated): their
    /// components are loaded into the store before the Orchestrator service reports SERVING.
    #[arg(long, env = "AUTOPIPE_PRELOAD", value_delimiter = ',')]
    preload: Vec<String>,
    /// Checkpoints' safety checkers: auto (run the one model_index.json names, as diffusers does)
    /// or off (never).
    #[arg(long, env = "AUTOPIPE_SAFETY_CHECKER", default_value = "auto")]
    safety_checker: SafetyCheckerMode,
    /// Let requests skip the safety checker (GenerateRequest.skip_safety_checker); otherwise
    /// such requests are PERMISSION_DENIED.
    #[arg(long, env = "AUTOPIPE_ALLOW_REQUEST_SAFETY_OFF")]
    allow_request_safety_off: bool,
    /// Folders local models may be read from (repeatable; AUTOPIPE_MODEL_ROOTS: colon-separated).
    /// A model is then a name relative to one (`sd15` → DIR/sd15), a path inside one, or a hub
    /// repo id; anything else is PERMISSION_DENIED. None: hub repo ids (and the hub cache) only.
    #[arg(
        long = "model-root",
        env = "AUTOPIPE_MODEL_ROOTS",
        value_delimiter = ':'
    )]
    model_roots: Vec<PathBuf>,
    /// Hub repo ids that may be named (repeatable; AUTOPIPE_ALLOW_HUB: comma-separated): org/name
    /// or org/*. Default: every repo id.
    #[arg(long = "allow-hub", env = "AUTOPIPE_ALLOW_HUB", value_delimiter = ',')]
    allow_hub: Vec<String>,
    /// Bearer tokens the Orchestrator service accepts, one per line (re-read when the file
    /// changes). Unset: no authentication. Health and reflection stay open.
    #[arg(long, env = "AUTOPIPE_AUTH_TOKENS_FILE")]
    auth_tokens_file: Option<PathBuf>,
    #[command(flatten)]
    limits: autopipe_orchestrator::Limits,
}

#[derive(Debug, Args)]
struct GenerateArgs {
    /// Orchestrator to call: host:port, http://host:port, https://host:port (TLS: --tls-ca) or
    /// unix:///path.sock.
    #[arg(long, env = "AUTOPIPE_SERVER", conflicts_with = "embedded")]
    server: Option<Address>,
    /// Bearer token for a server started with --auth-tokens-file.
    #[arg(
        long,
        env = "AUTOPIPE_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    token: String,
    #[command(flatten)]
    tls: ClientTlsArgs,
    /// Run in this process (own store, no server).
    #[arg(long)]
    embedded: bool,
    #[command(flatten)]
    store: StoreArgs,
    /// text2img, img2img or inpaint.
    #[arg(long, default_value = "text2img")]
    task: String,
    /// A local diffusers folder or a hub repo id.
    #[arg(long)]
    model: String,
    /// Hub revision.
    #[arg(long, default_value = "")]
    revision: String,
    #[arg(long, default_value = "")]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long)]
    width: Option<u32>,
    #[arg(long)]
    height: Option<u32>,
    /// Denoising steps (diffusers' default: 50).
    #[arg(long)]
    steps: Option<u32>,
    /// Classifier-free guidance scale (diffusers' default: 7.5).
    #[arg(long)]
    guidance_scale: Option<f32>,
    /// Seed for torch.Generator("cpu").manual_seed; random when unset.
    #[arg(long)]
    seed: Option<u64>,
    /// Scheduler class override, e.g. EulerDiscreteScheduler.
    #[arg(long, default_value = "")]
    scheduler: String,
    /// Init image (img2img, inpaint).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Mask image, white = repaint (inpaint).
    #[arg(long)]
    mask: Option<PathBuf>,
    /// img2img/inpaint strength in [0, 1].
    #[arg(long)]
    strength: Option<f32>,
    /// Images to generate.
    #[arg(long)]
    num_images: Option<u32>,
    /// Ask to run without the checkpoint's safety checker (a server refuses unless started with
    /// --allow-request-safety-off; --embedded runs as its own operator and allows it).
    #[arg(long)]
    skip_safety_checker: bool,
    /// Weight-file variant, e.g. fp16.
    #[arg(long, default_value = "")]
    variant: String,
    /// SDXL: prompt for the second text encoder (default: --prompt).
    #[arg(long, default_value = "")]
    prompt_2: String,
    /// SDXL: negative prompt for the second text encoder (default: --negative-prompt).
    #[arg(long, default_value = "")]
    negative_prompt_2: String,
    /// SDXL micro-conditioning, HEIGHTxWIDTH (default: the output size).
    #[arg(long, value_parser = parse_size)]
    original_size: Option<v1::Size>,
    /// SDXL micro-conditioning, TOP,LEFT (default: 0,0).
    #[arg(long, value_parser = parse_coords)]
    crops_coords_top_left: Option<v1::Coords>,
    /// SDXL micro-conditioning, HEIGHTxWIDTH (default: the output size).
    #[arg(long, value_parser = parse_size)]
    target_size: Option<v1::Size>,
    #[arg(long, value_parser = parse_size)]
    negative_original_size: Option<v1::Size>,
    #[arg(long, value_parser = parse_coords)]
    negative_crops_coords_top_left: Option<v1::Coords>,
    #[arg(long, value_parser = parse_size)]
    negative_target_size: Option<v1::Size>,
    /// SDXL refiner img2img/inpaint (default 6.0).
    #[arg(long)]
    aesthetic_score: Option<f32>,
    /// SDXL refiner img2img/inpaint (default 2.5).
    #[arg(long)]
    negative_aesthetic_score: Option<f32>,
    /// SDXL hand-off: skip this fraction of the schedule (the refiner's side).
    #[arg(long)]
    denoising_start: Option<f32>,
    /// SDXL hand-off: stop after this fraction of the schedule (the base's side; use with
    /// --output-type latent).
    #[arg(long)]
    denoising_end: Option<f32>,
    /// Combined pipelines (Kandinsky): the prior's denoising steps (diffusers' default: 25).
    #[arg(long)]
    prior_steps: Option<u32>,
    /// Combined pipelines (Kandinsky): the prior's guidance scale (diffusers' default: 4.0).
    #[arg(long)]
    prior_guidance_scale: Option<f32>,
    /// DeepFloyd IF: a stage II (super-resolution) checkpoint run on stage I's images.
    #[arg(long)]
    upscale_model: Option<String>,
    /// DeepFloyd IF stage II: noise added to the upscaled image (diffusers' default: 250, 0 for
    /// inpainting).
    #[arg(long)]
    noise_level: Option<u32>,
    /// DeepFloyd IF stage II: denoising steps (diffusers' default: 50, 100 for inpainting).
    #[arg(long)]
    upscale_steps: Option<u32>,
    /// DeepFloyd IF stage II: guidance scale (diffusers' default: 4.0).
    #[arg(long)]
    upscale_guidance_scale: Option<f32>,
    /// image (PNG) or latent (a .safetensors file with tensor "latents", for --image-latents).
    #[arg(long, default_value = "image")]
    output_type: String,
    /// Latents from an earlier --output-type latent run, as the img2img image.
    #[arg(long, conflicts_with = "image")]
    image_latents: Option<PathBuf>,
    /// A ControlNet folder (repeatable: several = MultiControlNet), paired in order with
    /// --control-image.
    #[arg(long)]
    controlnet: Vec<String>,
    /// The control image (PNG/JPEG) of the --controlnet at the same position.
    #[arg(long)]
    control_image: Vec<PathBuf>,
    /// ControlNet conditioning scale: once for every ControlNet, or once per ControlNet.
    #[arg(long)]
    controlnet_conditioning_scale: Vec<f32>,
    /// Fraction of the steps at which the ControlNet starts applying (once, or per ControlNet).
    #[arg(long)]
    control_guidance_start: Vec<f32>,
    /// Fraction of the steps at which the ControlNet stops applying (once, or per ControlNet).
    #[arg(long)]
    control_guidance_end: Vec<f32>,
    /// ControlNets see only the conditional half of the guidance batch.
    #[arg(long)]
    guess_mode: bool,
    /// Output PNG (or .safetensors for --output-type latent); several images get -0, -1, … suffixes.
    #[arg(long, default_value = "out.png")]
    output: PathBuf,
}

fn parse_size(s: &str) -> Result<v1::Size, String> {
    let (h, w) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("expected HEIGHTxWIDTH, got {s:?}"))?;
    Ok(v1::Size {
        height: h.trim().parse().map_err(|e| format!("height: {e}"))?,
        width: w.trim().parse().map_err(|e| format!("width: {e}"))?,
    })
}

fn parse_coords(s: &str) -> Result<v1::Coords, String> {
    let (t, l) = s
        .split_once(',')
        .ok_or_else(|| format!("expected TOP,LEFT, got {s:?}"))?;
    Ok(v1::Coords {
        top: t.trim().parse().map_err(|e| format!("top: {e}"))?,
        left: l.trim().parse().map_err(|e| format!("left: {e}"))?,
    })
}

/// Reads the tensor "latents" of a safetensors file, for the wire.
fn read_latents(path: &Option<PathBuf>) -> anyhow::Result<Option<v1::Tensor>> {
    let Some(path) = path else { return Ok(None) };
    let tensors = tch::Tensor::read_safetensors(path)
        .with_context(|| format!("--image-latents {}", path.display()))?;
    let (_, latents) = tensors
        .into_iter()
        .find(|(n, _)| n == "latents")
        .with_context(|| format!("--image-latents {}: no tensor \"latents\"", path.display()))?;
    Ok(Some(autopipe_proto::tensor_to_wire(&latents)?))
}

#[derive(Debug, Args)]
struct ResolveArgs {
    /// Orchestrator to ask; without it, resolves locally.
    #[arg(long, env = "AUTOPIPE_SERVER")]
    server: Option<Address>,
    /// Bearer token for a server started with --auth-tokens-file.
    #[arg(
        long,
        env = "AUTOPIPE_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    token: String,
    #[command(flatten)]
    tls: ClientTlsArgs,
    #[arg(long)]
    model: String,
    #[arg(long, default_value = "")]
    revision: String,
    #[arg(long, default_value = "text2img")]
    task: String,
    /// A ControlNet model (resolution only needs to know one is given).
    #[arg(long, default_value = "")]
    controlnet: String,
}

#[derive(Debug, Args)]
struct StatsArgs {
    /// The store: host:port, https://host:port (TLS: --tls-ca) or unix:///path.sock.
    #[arg(
        long,
        env = "AUTOPIPE_STORE",
        default_value = "unix:///tmp/autopipe/store.sock"
    )]
    store: Address,
    /// Bearer token for a server started with --auth-tokens-file.
    #[arg(
        long,
        env = "AUTOPIPE_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    token: String,
    #[command(flatten)]
    tls: ClientTlsArgs,
}

fn task(s: &str) -> anyhow::Result<v1::Task> {
    Ok(match s {
        "text2img" | "text-to-image" => v1::Task::Text2img,
        "img2img" | "image-to-image" => v1::Task::Img2img,
        "inpaint" | "inpainting" => v1::Task::Inpaint,
        other => bail!("--task: expected text2img, img2img or inpaint, got {other:?}"),
    })
}

fn read(path: &Option<PathBuf>, flag: &str) -> anyhow::Result<Vec<u8>> {
    match path {
        Some(p) => std::fs::read(p).with_context(|| format!("{flag} {}", p.display())),
        None => Ok(Vec::new()),
    }
}

fn request(a: &GenerateArgs) -> anyhow::Result<v1::GenerateRequest> {
    let model = if Path::new(&a.model).is_dir() {
        std::fs::canonicalize(&a.model)?.display().to_string()
    } else {
        a.model.clone()
    };
    Ok(v1::GenerateRequest {
        task: task(&a.task)? as i32,
        model,
        revision: a.revision.clone(),
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        width: a.width.unwrap_or(0),
        height: a.height.unwrap_or(0),
        num_inference_steps: a.steps,
        guidance_scale: a.guidance_scale,
        strength: a.strength,
        seed: a.seed,
        image: read(&a.image, "--image")?,
        mask_image: read(&a.mask, "--mask")?,
        scheduler: a.scheduler.clone(),
        num_images_per_prompt: a.num_images,
        dtype: String::new(),
        variant: a.variant.clone(),
        scheduler_options: String::new(),
        prompt_2: a.prompt_2.clone(),
        negative_prompt_2: a.negative_prompt_2.clone(),
        original_size: a.original_size,
        crops_coords_top_left: a.crops_coords_top_left,
        target_size: a.target_size,
        negative_original_size: a.negative_original_size,
        negative_crops_coords_top_left: a.negative_crops_coords_top_left,
        negative_target_size: a.negative_target_size,
        aesthetic_score: a.aesthetic_score,
        negative_aesthetic_score: a.negative_aesthetic_score,
        denoising_start: a.denoising_start,
        denoising_end: a.denoising_end,
        output_type: match a.output_type.as_str() {
            "image" | "pil" => v1::OutputType::Image,
            "latent" => v1::OutputType::Latent,
            other => bail!("--output-type: expected image or latent, got {other:?}"),
        } as i32,
        image_latents: read_latents(&a.image_latents)?,
        controlnet: a
            .controlnet
            .iter()
            .map(|c| match Path::new(c).is_dir() {
                true => std::fs::canonicalize(c).map(|p| p.display().to_string()),
                false => Ok(c.clone()),
            })
            .collect::<Result<_, _>>()?,
        control_image: a
            .control_image
            .iter()
            .map(|p| read(&Some(p.clone()), "--control-image"))
            .collect::<anyhow::Result<_>>()?,
        controlnet_conditioning_scale: a.controlnet_conditioning_scale.clone(),
        control_guidance_start: a.control_guidance_start.clone(),
        control_guidance_end: a.control_guidance_end.clone(),
        guess_mode: a.guess_mode,
        prior_num_inference_steps: a.prior_steps,
        prior_guidance_scale: a.prior_guidance_scale,
        skip_safety_checker: a.skip_safety_checker,
        upscale_model: match &a.upscale_model {
            Some(m) if Path::new(m).is_dir() => std::fs::canonicalize(m)?.display().to_string(),
            Some(m) => m.clone(),
            None => String::new(),
        },
        noise_level: a.noise_level,
        upscale_num_inference_steps: a.upscale_steps,
        upscale_guidance_scale: a.upscale_guidance_scale,
        clean_caption: false,
    })
}

fn progress_bar() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} denoising [{bar:30}] {pos}/{len} steps {elapsed_precise}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

fn write_images(resp: &v1::GenerateResponse, output: &Path) -> anyhow::Result<()> {
    if let Some(latents) = &resp.latents {
        let t = autopipe_proto::tensor_from_wire(latents, tch::Device::Cpu)?;
        tch::Tensor::write_safetensors(&[("latents", &t)], output)
            .with_context(|| format!("writing {}", output.display()))?;
        println!("{} (latents {:?})", output.display(), t.size());
    }
    for (i, img) in resp.images.iter().enumerate() {
        let path = if resp.images.len() == 1 {
            output.to_path_buf()
        } else {
            let stem = output.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
            output.with_file_name(format!("{stem}-{i}.png"))
        };
        std::fs::write(&path, &img.png).with_context(|| format!("writing {}", path.display()))?;
        println!(
            "{} ({}x{}, seed {})",
            path.display(),
            img.width,
            img.height,
            img.seed
        );
        if img.nsfw_content_detected {
            eprintln!(
                "warning: {}: the model's safety checker flagged image {i} (potential NSFW content); it is returned black",
                path.display()
            );
        }
        if img.watermark_detected {
            eprintln!(
                "warning: {}: the model's safety checker flagged image {i} (potential watermarked content); it is returned black",
                path.display()
            );
        }
    }
    for w in &resp.warnings {
        eprintln!("warning: {w}");
    }
    if let Some(t) = &resp.timings {
        eprintln!(
            "{}: {:.0} ms total ({:.1} ms/step, acquire {:.0} ms{})",
            resp.pipeline,
            t.total_ms,
            t.step_ms_mean,
            t.acquire_ms,
            t.stages
                .iter()
                .map(|s| format!(", {} {:.0} ms", s.name.replace('_', " "), s.ms))
                .collect::<String>()
        );
    }
    Ok(())
}

struct BarObserver(ProgressBar);

impl StepObserver for BarObserver {
    fn on_step(&self, p: Progress) {
        self.0.set_length(p.total_steps as u64);
        self.0.set_position(p.step as u64);
    }
    fn should_stop(&self) -> Option<PipelineError> {
        None
    }
}

/// An Orchestrator client for `server` (over `tls` on TCP), sending `token` (if any) with every
/// call.
fn orchestrator_client(
    server: &Address,
    token: &str,
    tls: &ClientTlsArgs,
) -> anyhow::Result<
    v1::orchestrator_client::OrchestratorClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>,
    >,
> {
    Ok(
        v1::orchestrator_client::OrchestratorClient::with_interceptor(
            transport::channel(server, &tls.load().map_err(anyhow::Error::msg)?)?,
            BearerToken::fixed(token),
        ),
    )
}

async fn generate_remote(
    server: &Address,
    token: &str,
    tls: &ClientTlsArgs,
    req: v1::GenerateRequest,
) -> anyhow::Result<v1::GenerateResponse> {
    let mut client = orchestrator_client(server, token, tls)?
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let bar = progress_bar();
    let mut stream = client
        .generate_stream(req)
        .await
        .map_err(status_error)?
        .into_inner();
    while let Some(event) = stream.next().await {
        match event.map_err(status_error)?.event {
            Some(v1::generate_event::Event::Progress(p)) => {
                bar.set_length(p.total_steps as u64);
                bar.set_position(p.step as u64);
            }
            Some(v1::generate_event::Event::Result(r)) => {
                bar.finish_and_clear();
                return Ok(r);
            }
            None => {}
        }
    }
    bail!("the server closed the stream without a result")
}

/// How long the embedded store's component loads take.
struct LoadMetrics(Histogram);

impl StoreObserver for LoadMetrics {
    fn loaded(&self, _class_name: &str, _bytes: u64, took: Duration, ok: bool) {
        if ok {
            self.0.observe(took);
        }
    }
}

/// The embedded store's metrics, appended to the orchestrator's on every scrape.
fn store_metrics(store: &Store, loads: &LoadMetrics, out: &mut String) {
    use std::fmt::Write as _;
    let s = store.stats();
    out.push_str("# HELP autopipe_store_load_seconds Component load duration.\n# TYPE autopipe_store_load_seconds histogram\n");
    loads.0.render(out, "autopipe_store_load_seconds", "");
    let _ = write!(
        out,
        "# HELP autopipe_store_resident_bytes Bytes of resident component weights.\n\
         # TYPE autopipe_store_resident_bytes gauge\n\
         autopipe_store_resident_bytes {}\n\
         # HELP autopipe_store_active_leases Leases not yet released or expired.\n\
         # TYPE autopipe_store_active_leases gauge\n\
         autopipe_store_active_leases {}\n\
         # HELP autopipe_store_resident_components Resident components.\n\
         # TYPE autopipe_store_resident_components gauge\n\
         autopipe_store_resident_components {}\n\
         # HELP autopipe_store_evictions_total Components evicted to make room.\n\
         # TYPE autopipe_store_evictions_total counter\n\
         autopipe_store_evictions_total {}\n\
         # HELP autopipe_store_loads_total Component loads completed.\n\
         # TYPE autopipe_store_loads_total counter\n\
         autopipe_store_loads_total {}\n\
         # HELP autopipe_store_expired_leases_total Leases that expired without a release.\n\
         # TYPE autopipe_store_expired_leases_total counter\n\
         autopipe_store_expired_leases_total {}\n\
         # HELP autopipe_store_memory_budget_bytes Resident-bytes budget (0 = unlimited).\n\
         # TYPE autopipe_store_memory_budget_bytes gauge\n\
         autopipe_store_memory_budget_bytes {}\n\
         # HELP autopipe_store_batched_forwards_total Forwards that joined several requests' calls (--max-batch).\n\
         # TYPE autopipe_store_batched_forwards_total counter\n\
         autopipe_store_batched_forwards_total {}\n\
         # HELP autopipe_store_batched_calls_total Calls run inside joined forwards.\n\
         # TYPE autopipe_store_batched_calls_total counter\n\
         autopipe_store_batched_calls_total {}\n",
        s.resident_bytes,
        s.active_leases,
        s.components.len(),
        s.evictions,
        s.loads,
        s.expired_leases,
        s.memory_budget.unwrap_or(0),
        s.batching.batched_forwards,
        s.batching.batched_calls
    );
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
}

fn main() -> anyhow::Result<()> {
    autopipe_store::allocator::tune_for_libtorch();
    let cli = Cli::parse();
    init_tracing();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(a) => {
            let loads = Arc::new(LoadMetrics(Histogram::new(LATENCY_BUCKETS)));
            let roots = autopipe_repo::ModelRoots::for_server(&a.model_roots, &a.allow_hub)
                .map_err(|e| anyhow::anyhow!(e))?;
            let store = Arc::new(
                Store::new(
                    a.store
                        .config(roots.clone())
                        .map_err(|e| anyhow::anyhow!(e))?,
                )
                .with_observer(loads.clone()),
            );
            let orchestrator = Arc::new(Orchestrator::new(
                store.clone(),
                OrchestratorConfig {
                    safety_checker: a.safety_checker,
                    allow_request_safety_off: a.allow_request_safety_off,
                    roots,
                    ..Default::default()
                },
            ));
            orchestrator
                .metrics()
                .add_collector(move |out| store_metrics(&store, &loads, out));
            let options = ServeOptions {
                listen: a.listen,
                max_concurrency: a.max_concurrency,
                max_queue: a.max_queue,
                drain_timeout: Duration::from_secs(a.drain_timeout),
                metrics_listen: a.metrics_listen,
                preload: a
                    .preload
                    .into_iter()
                    .map(|m| m.trim().to_string())
                    .filter(|m| !m.is_empty())
                    .collect(),
                auth: Authenticate(
                    a.auth_tokens_file
                        .as_deref()
                        .map(TokenAuth::from_file)
                        .transpose()
                        .context("--auth-tokens-file")?,
                ),
                limits: a.limits,
                tls: a.tls.load().map_err(anyhow::Error::msg)?,
                health_listen: a.tls.health_listen.clone(),
            };
            let (tx, rx) = tokio::sync::oneshot::channel();
            runtime.spawn(async move {
                if let Ok(addr) = rx.await {
                    eprintln!("autopipe serving on {addr} (embedded store)");
                }
            });
            let result = runtime.block_on(serve(
                orchestrator,
                options,
                transport::shutdown_signal(),
                Some(tx),
            ));
            // Pipelines still running after the drain stop at their next step; don't wait longer.
            runtime.shutdown_timeout(Duration::from_secs(5));
            result
        }
        Command::Generate(a) => {
            let req = request(&a)?;
            let resp = if let Some(server) = &a.server {
                runtime.block_on(generate_remote(server, &a.token, &a.tls, req))?
            } else if a.embedded {
                // The caller's own machine and files: no model root confines it.
                let config = a.store.config(autopipe_repo::ModelRoots::unconfined());
                let store = Arc::new(Store::new(config.map_err(|e| anyhow::anyhow!(e))?));
                // In process, the caller is the operator: its own request decides.
                let config = OrchestratorConfig {
                    allow_request_safety_off: true,
                    ..Default::default()
                };
                let orchestrator = Orchestrator::new(store, config);
                let bar = progress_bar();
                let resp = orchestrator
                    .generate(&req, "cli", &BarObserver(bar.clone()))
                    .map_err(status_error)?;
                bar.finish_and_clear();
                resp
            } else {
                bail!("give --server ADDR (a running orchestrator) or --embedded (run in this process)");
            };
            write_images(&resp, &a.output)
        }
        Command::Resolve(a) => {
            let req = v1::ResolveRequest {
                model: a.model.clone(),
                revision: a.revision.clone(),
                task: task(&a.task)? as i32,
                controlnet: a.controlnet.clone(),
            };
            let resp = match &a.server {
                Some(server) => runtime.block_on(async {
                    let mut c = orchestrator_client(server, &a.token, &a.tls)?;
                    Ok::<_, anyhow::Error>(c.resolve(req).await.map_err(status_error)?.into_inner())
                })?,
                None => {
                    let store = Arc::new(Store::new(StoreConfig::default()));
                    Orchestrator::new(store, OrchestratorConfig::default())
                        .resolve(&req)
                        .map_err(status_error)?
                }
            };
            println!("{}", resp.pipeline);
            println!("  model class: {}", resp.model_class);
            println!("  implemented: {}", resp.implemented);
            for c in &resp.components {
                println!(
                    "  {:<22} {}{}",
                    c.name,
                    c.class_name,
                    if c.optional { " (optional)" } else { "" }
                );
            }
            Ok(())
        }
        Command::Stats(a) => runtime.block_on(async {
            let mut c = v1::store_client::StoreClient::with_interceptor(
                transport::channel(&a.store, &a.tls.load().map_err(anyhow::Error::msg)?)?,
                BearerToken::fixed(&a.token),
            );
            let s = c
                .stats(v1::StatsRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "resident {} bytes, {} active leases, {} evictions, budget {}",
                s.resident_bytes,
                s.active_leases,
                s.evictions,
                if s.memory_budget_bytes == 0 {
                    "unlimited".to_string()
                } else {
                    s.memory_budget_bytes.to_string()
                }
            );
            for comp in s.components {
                println!(
                    "{:<28} {:<12} {:>12} bytes {:>9} {:>5} loads={} leases={} {}",
                    comp.class_name,
                    &comp.key[..comp.key.len().min(12)],
                    comp.bytes,
                    comp.dtype,
                    comp.device,
                    comp.load_count,
                    comp.active_leases,
                    comp.paths.join(",")
                );
            }
            Ok(())
        }),
    }
}
