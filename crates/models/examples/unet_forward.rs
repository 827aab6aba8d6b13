//! Times UNet forwards the way a text2img step calls them (CFG batch 2, 77 text tokens):
//! `cargo run --release -p autopipe-models --example unet_forward -- UNET_DIR [float32|bfloat16]
//! [RUNS] [LATENT_SIZE] [THREADS]`. Prints each forward's milliseconds and the process RSS.
//! `AUTOPIPE_PREPACK` / `AUTOPIPE_CHANNELS_LAST` pick the paths to compare (see `layers`);
//! `UNET_OUT` saves the output, `UNET_REF` prints its largest difference to a saved one.

use std::time::Instant;

use autopipe_models::unet::UNet2DConditionModel;
use tch::{Device, Kind, Tensor};

fn rss_gib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / (1024.0 * 1024.0))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .ok_or("usage: unet_forward UNET_DIR [dtype] [runs] [size] [threads]")?;
    let kind = match args.get(2).map(String::as_str) {
        Some("bfloat16") => Kind::BFloat16,
        _ => Kind::Float,
    };
    let runs: usize = args.get(3).map_or(Ok(3), |s| s.parse())?;
    let size: i64 = args.get(4).map_or(Ok(32), |s| s.parse())?;
    let threads: i32 = args.get(5).map_or(Ok(2), |s| s.parse())?;
    tch::set_num_threads(threads);
    let started = Instant::now();
    let unet = UNet2DConditionModel::load(std::path::Path::new(dir), None, kind, Device::Cpu)?;
    println!(
        "load {:.0} ms, rss {:.3} GiB",
        started.elapsed().as_secs_f64() * 1e3,
        rss_gib()
    );
    tch::manual_seed(0);
    let sample = Tensor::randn([2, 4, size, size], (Kind::Float, Device::Cpu));
    let ctx = 768; // SD 1.x
    let ehs = Tensor::randn([2, 77, ctx], (kind, Device::Cpu));
    let t = Tensor::from(500i64);
    let mut first: Option<Tensor> = None;
    tch::no_grad(|| -> Result<(), Box<dyn std::error::Error>> {
        for run in 0..runs {
            let started = Instant::now();
            let out = unet.forward(&sample, &t, &ehs, None)?;
            let ms = started.elapsed().as_secs_f64() * 1e3;
            // What the store does after a call that prepacked (autopipe_store::allocator).
            if autopipe_models::layers::take_released_bytes() > 0 {
                // SAFETY: returns free heap memory to the system.
                unsafe { libc::malloc_trim(0) };
            }
            println!("forward {run}: {ms:.0} ms, rss {:.3} GiB", rss_gib());
            if let Some(f) = &first {
                let d = f64::try_from((&out - f).abs().max().to_kind(Kind::Float))?;
                assert!(d == 0.0, "forward {run} differs from the first by {d}");
            } else {
                first = Some(out);
            }
        }
        Ok(())
    })?;
    if let Some(f) = first {
        let f = f.to_kind(Kind::Float);
        // UNET_OUT saves this output, UNET_REF compares it with a saved one (A/B of two paths).
        if let Ok(path) = std::env::var("UNET_OUT") {
            f.save(&path)?;
        }
        if let Ok(path) = std::env::var("UNET_REF") {
            let r = Tensor::load(&path)?;
            let d = f64::try_from((&f - &r).abs().max())?;
            let scale = f64::try_from(r.abs().max())?;
            println!("max |diff| vs {path}: {d:.3e} (max |ref| {scale:.3})");
        }
        println!(
            "output mean {:.6} abs-mean {:.6}",
            f64::try_from(f.mean(Kind::Float))?,
            f64::try_from(f.abs().mean(Kind::Float))?
        );
    }
    Ok(())
}
