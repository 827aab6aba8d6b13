//! Parity of `ControlNetModel` with diffusers: the tiny ControlNets of the pipeline fixtures and
//! their fp32 CPU residuals (plain, guess mode, `global_pool_conditions`), written by
//! `scripts/fixtures/controlnet.py` as `tests/fixtures/components/controlnet_*_golden.safetensors`.

use std::collections::HashMap;
use std::path::PathBuf;

use autopipe_models::controlnet::{ControlNetConfig, ControlNetModel, ControlNetOutput};
use autopipe_models::unet::SdxlConditioning;
use autopipe_models::{weights, Error};
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn golden(tag: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join(format!("components/controlnet_{tag}_golden.safetensors"));
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn load(folder: &str, global_pool_conditions: bool) -> ControlNetModel {
    let dir = fixtures().join("checkpoints").join(folder);
    let mut config: ControlNetConfig = weights::read_config(&dir).expect("config");
    config.global_pool_conditions = global_pool_conditions;
    let files = weights::weight_files(&dir, None).expect("weights");
    ControlNetModel::load_with_config(config, &files, Kind::Float, Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape");
    (a - b).abs().max().double_value(&[])
}

fn run(
    model: &ControlNetModel,
    g: &HashMap<String, Tensor>,
    scale: f64,
    guess: bool,
) -> ControlNetOutput {
    let added = g.get("text_embeds").map(|t| SdxlConditioning {
        text_embeds: t.shallow_clone(),
        time_ids: g["time_ids"].shallow_clone(),
    });
    model
        .forward(
            &g["sample"],
            &g["timestep"],
            &g["encoder_hidden_states"],
            &g["controlnet_cond"],
            scale,
            added.as_ref(),
            guess,
        )
        .expect("forward")
}

fn check(tag: &str, folder: &str, residuals: usize) {
    tch::set_num_threads(1);
    let g = golden(tag);
    let model = load(folder, false);
    let pooled = load(folder, true);
    assert_eq!(model.num_down_block_residuals(), residuals);
    for (mode, m, scale, guess) in [
        ("plain", &model, 0.7, false),
        ("guess", &model, 0.7, true),
        ("pooled", &pooled, 1.3, false),
    ] {
        let out = run(m, &g, scale, guess);
        assert_eq!(out.down_block_res_samples.len(), residuals, "{tag} {mode}");
        // Relative to each residual's own peak: the scaled zero convolutions make them large.
        let rel = |got: &Tensor, want: &Tensor| {
            max_abs_diff(got, want) / want.abs().max().double_value(&[]).max(1e-6)
        };
        let mut worst = rel(&out.mid_block_res_sample, &g[&format!("{mode}_mid")]);
        for (i, d) in out.down_block_res_samples.iter().enumerate() {
            worst = worst.max(rel(d, &g[&format!("{mode}_down_{i}")]));
        }
        println!("{tag} {mode}: max |Δ| / peak {worst:.2e}");
        assert!(worst < 1e-5, "{tag} {mode}: max |Δ| / peak {worst:.2e}");
    }
}

#[test]
fn sd_controlnet_matches_diffusers() {
    check("sd1", "controlnet-sd1-tiny", 6);
}

#[test]
fn sdxl_controlnet_matches_diffusers() {
    check("sdxl", "controlnet-sdxl-tiny", 4);
}

#[test]
fn control_image_of_the_wrong_size_is_an_input_error() {
    let g = golden("sd1");
    let model = load("controlnet-sd1-tiny", false);
    let small = g["controlnet_cond"].slice(2, 0, 8, 1);
    let err = model
        .forward(
            &g["sample"],
            &g["timestep"],
            &g["encoder_hidden_states"],
            &small,
            1.0,
            None,
            false,
        )
        .expect_err("wrong size");
    assert!(
        matches!(&err, Error::Input(m) if m.starts_with("controlnet_cond: shape")),
        "{err}"
    );
}
