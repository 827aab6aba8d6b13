//! AutoencoderKL against diffusers 0.42 goldens from `scripts/fixtures/components_clip_vae.py`.

use std::collections::HashMap;
use std::path::PathBuf;

use autopipe_models::vae::{vae_legacy_rename, AutoencoderKL, AutoencoderKLConfig};
use autopipe_models::{weights, Error};
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/components")
}

fn golden(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join(format!("{name}_golden.safetensors"));
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn max_diff(what: &str, got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    let d = (got.to_kind(Kind::Float) - want.to_kind(Kind::Float))
        .abs()
        .max()
        .double_value(&[]);
    println!("{what}: max abs diff {d:.3e}");
    d
}

fn check(name: &str, variant: Option<&str>) {
    let g = golden(name);
    let vae = AutoencoderKL::load(&fixtures().join(name), variant, Kind::Float, Device::Cpu)
        .expect("load");
    let (dist, decoded) = tch::no_grad(|| {
        let dist = vae.encode(&g["image"]).expect("encode");
        let decoded = vae.decode(&g["z"]).expect("decode");
        (dist, decoded)
    });
    assert!(max_diff(&format!("{name} mean"), &dist.mean, &g["mean"]) < 1e-4);
    assert!(max_diff(&format!("{name} logvar"), &dist.logvar, &g["logvar"]) < 1e-4);
    assert!(max_diff(&format!("{name} decoded"), &decoded, &g["decoded"]) < 1e-4);
}

#[test]
fn vae_fp16_variant_matches_diffusers() {
    check("vae_fp16", Some("fp16"));
}

#[test]
fn vae_legacy_attention_names_match_diffusers() {
    check("vae_legacy", None);
}

#[test]
fn vae_sharded_matches_diffusers() {
    check("vae_sharded", None);
}

#[test]
fn vae_without_the_variant_file_is_an_error() {
    // vae_fp16 holds only the fp16 variant: asking for the plain weights must fail, naming the folder.
    let err = AutoencoderKL::load(&fixtures().join("vae_fp16"), None, Kind::Float, Device::Cpu)
        .expect_err("must fail");
    println!("{err}");
    assert!(matches!(err, Error::Weights(_)));
    assert!(err.to_string().contains("vae_fp16"));
}

#[test]
fn vae_legacy_names_need_the_rename() {
    let dir = fixtures().join("vae_legacy");
    let cfg: AutoencoderKLConfig = weights::read_config(&dir).expect("config");
    let files = weights::weight_files(&dir, None).expect("files");
    let mut vs = weights::var_store(Kind::Float, Device::Cpu);
    let _vae = AutoencoderKL::new(&vs.root(), cfg.clone()).expect("build");
    let err = weights::load(
        &mut vs,
        &files,
        &|k: &str| k.to_string(),
        weights::Layout::Contiguous,
    )
    .expect_err("must fail");
    let msg = err.to_string();
    println!("{msg}");
    assert!(
        msg.contains("missing") && msg.contains("mid_block.attentions.0.to_q.weight"),
        "{msg}"
    );
    assert!(
        msg.contains("unexpected") && msg.contains("mid_block.attentions.0.query.weight"),
        "{msg}"
    );

    let mut vs = weights::var_store(Kind::Float, Device::Cpu);
    let _vae = AutoencoderKL::new(&vs.root(), cfg).expect("build");
    weights::load(
        &mut vs,
        &files,
        &vae_legacy_rename,
        weights::Layout::Contiguous,
    )
    .expect("renamed load");
}

#[test]
fn vae_rejects_bad_inputs() {
    let vae = AutoencoderKL::load(
        &fixtures().join("vae_sharded"),
        None,
        Kind::Float,
        Device::Cpu,
    )
    .expect("load");
    let wrong_channels = Tensor::zeros([1, 4, 32, 32], (Kind::Float, Device::Cpu));
    assert!(matches!(vae.encode(&wrong_channels), Err(Error::Input(_))));
    let three_d = Tensor::zeros([4, 16, 16], (Kind::Float, Device::Cpu));
    assert!(matches!(vae.decode(&three_d), Err(Error::Input(_))));
    let ints = Tensor::zeros([1, 4, 16, 16], (Kind::Int64, Device::Cpu));
    assert!(matches!(vae.decode(&ints), Err(Error::Input(_))));
}

#[test]
fn vae_half_precision_decode_is_close() {
    let g = golden("vae_sharded");
    let vae = AutoencoderKL::load(
        &fixtures().join("vae_sharded"),
        None,
        Kind::Half,
        Device::Cpu,
    )
    .expect("load");
    let decoded = tch::no_grad(|| vae.decode(&g["z"])).expect("decode");
    assert_eq!(decoded.kind(), Kind::Half);
    assert!(max_diff("vae_sharded decoded (f16)", &decoded, &g["decoded"]) < 5e-2);
}
