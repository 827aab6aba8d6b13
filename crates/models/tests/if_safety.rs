//! Parity of DeepFloyd IF's `IFSafetyChecker` and `IFWatermarker` with diffusers 0.42.1: the tiny
//! checkpoint `tests/fixtures/checkpoints/if-safety-tiny` and the checker's fp32 CPU outputs on a
//! random batch, written by `scripts/fixtures/if_safety.py`.

use std::collections::HashMap;
use std::path::PathBuf;

use autopipe_models::if_safety::{IFSafetyChecker, IFWatermarker};
use tch::{Device, Kind, Tensor};

fn checkpoint() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/checkpoints/if-safety-tiny")
}

fn golden() -> HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/components/if_safety_checker_golden.safetensors");
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape");
    (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn checker_matches_diffusers() {
    let g = golden();
    let dir = checkpoint().join("safety_checker");
    let checker = IFSafetyChecker::load(&dir, None, Kind::Float, Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let scores = checker.forward(&g["clip_input"]).expect("forward");
    let embeds = max_abs_diff(&scores.image_embeds, &g["image_embeds"]);
    let nsfw = max_abs_diff(&scores.nsfw, &g["nsfw_scores"]);
    let watermark = max_abs_diff(&scores.watermark, &g["watermark_scores"]);
    println!("IFSafetyChecker fp32: max abs diff embeds {embeds:.3e}, p_head {nsfw:.3e}, w_head {watermark:.3e}");
    assert!(embeds < 1e-4 && nsfw < 1e-4 && watermark < 1e-4);
    let (nsfw_flags, watermark_flags) = scores.flags().expect("flags");
    let want = |name: &str| Vec::<bool>::try_from(g[name].gt(0.5)).expect("bools");
    assert_eq!(nsfw_flags, want("nsfw_scores"));
    assert_eq!(watermark_flags, want("watermark_scores"));
    // The batch must fall on both sides of a threshold, or the flags could not be told apart.
    assert!(watermark_flags.contains(&true) && watermark_flags.contains(&false));
}

#[test]
fn watermarker_loads_its_rgba_buffer() {
    let dir = checkpoint().join("watermarker");
    let watermarker = IFWatermarker::load(&dir, None, Kind::Half, Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let image = watermarker.watermark_image();
    assert_eq!(image.size(), vec![62, 62, 4]);
    assert_eq!(image.kind(), Kind::Uint8);
    let file = Tensor::read_safetensors(dir.join("diffusion_pytorch_model.safetensors"))
        .expect("read")
        .into_iter()
        .find(|(n, _)| n == "watermark_image")
        .expect("watermark_image")
        .1;
    // 0..=255 integers survive fp16 exactly; alpha spans transparent to opaque.
    assert!(image.equal(&file.to_kind(Kind::Uint8)));
    let alpha = image.select(2, 3);
    assert_eq!(alpha.min().int64_value(&[]), 0);
    assert_eq!(alpha.max().int64_value(&[]), 255);
}
