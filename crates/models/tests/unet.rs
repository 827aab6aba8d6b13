//! Parity of `UNet2DConditionModel` with diffusers: tiny random UNets and their fp32 CPU outputs,
//! written by `scripts/fixtures/components_unet.py` under `tests/fixtures/components/`.

use std::collections::HashMap;
use std::path::PathBuf;

use autopipe_models::unet::{SdxlConditioning, UNet2DConditionModel, UNetExtraInputs};
use autopipe_models::Error;
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/components")
}

fn golden(case: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join(format!("unet_{case}_golden.safetensors"));
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn load(case: &str, variant: Option<&str>, kind: Kind) -> UNet2DConditionModel {
    let dir = fixtures().join(format!("unet_{case}"));
    UNet2DConditionModel::load(&dir, variant, kind, Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape");
    (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
        .abs()
        .max()
        .double_value(&[])
}

/// Runs `case` as diffusers did and returns (output, expected).
fn run(case: &str, variant: Option<&str>, kind: Kind) -> (Tensor, Tensor) {
    let g = golden(case);
    let model = load(case, variant, kind);
    let added = match (g.get("text_embeds"), g.get("time_ids")) {
        (Some(t), Some(i)) => Some(SdxlConditioning {
            text_embeds: t.shallow_clone(),
            time_ids: i.shallow_clone(),
        }),
        _ => None,
    };
    // Kandinsky 2.1's text_image conditioning: pooled text and image embeds together.
    let image_embeds = g.get("image_embeds");
    let extra = UNetExtraInputs {
        added: added.as_ref(),
        image_embeds,
        text_embeds: image_embeds.and(g.get("text_embeds")),
        timestep_cond: g.get("timestep_cond"),
        class_labels: g.get("class_labels"),
        ..Default::default()
    };
    let out = model
        .forward_with(
            &g["sample"],
            &g["timestep"],
            Some(&g["encoder_hidden_states"]),
            &extra,
        )
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    assert_eq!(out.kind(), kind);
    (out, g["out"].shallow_clone())
}

fn check_fp32(case: &str, variant: Option<&str>) {
    let (out, expected) = run(case, variant, Kind::Float);
    let diff = max_abs_diff(&out, &expected);
    let scale = expected.abs().max().double_value(&[]);
    println!("unet_{case} fp32: max abs diff {diff:.3e} (output max {scale:.3})");
    assert!(diff < 1e-4, "unet_{case} fp32: max abs diff {diff}");
}

fn check_bf16(case: &str, variant: Option<&str>) {
    let (out, expected) = run(case, variant, Kind::BFloat16);
    let diff = max_abs_diff(&out, &expected);
    let scale = expected.abs().max().double_value(&[]);
    println!("unet_{case} bf16: max abs diff {diff:.3e} (output max {scale:.3})");
    assert!(
        diff < 0.05 * scale.max(1.0),
        "unet_{case} bf16: max abs diff {diff}"
    );
}

#[test]
fn sd1_matches_diffusers() {
    check_fp32("sd1", None);
}

#[test]
fn sd1_bf16_close_to_fp32_reference() {
    check_bf16("sd1", None);
}

#[test]
fn sd2_linear_projection_upcast_matches_diffusers() {
    check_fp32("sd2", Some("fp16"));
}

#[test]
fn sd2_bf16_close_to_fp32_reference() {
    check_bf16("sd2", Some("fp16"));
}

#[test]
fn inpaint_odd_size_matches_diffusers() {
    check_fp32("inpaint", None);
}

#[test]
fn sdxl_text_time_matches_diffusers() {
    check_fp32("sdxl", None);
}

#[test]
fn sdxl_bf16_close_to_fp32_reference() {
    check_bf16("sdxl", None);
}

#[test]
fn misc_config_paths_match_diffusers() {
    check_fp32("misc", None);
}

#[test]
fn if_stage1_simple_cross_attn_matches_diffusers() {
    check_fp32("if1", None);
}

#[test]
fn if_stage1_bf16_close_to_fp32_reference() {
    check_bf16("if1", None);
}

#[test]
fn kandinsky21_decoder_architecture_matches_diffusers() {
    check_fp32("kandinsky21", None);
}

#[test]
fn kandinsky21_decoder_bf16_close_to_fp32_reference() {
    check_bf16("kandinsky21", None);
}

#[test]
fn if_stage2_class_labels_match_diffusers() {
    check_fp32("if2", None);
}

#[test]
fn if_stage2_needs_class_labels_of_the_batch() {
    let g = golden("if2");
    let model = load("if2", None, Kind::Float);
    let forward = |class_labels: Option<&Tensor>| {
        model.forward_with(
            &g["sample"],
            &g["timestep"],
            Some(&g["encoder_hidden_states"]),
            &UNetExtraInputs {
                class_labels,
                ..Default::default()
            },
        )
    };
    for (what, labels) in [
        ("missing", None),
        ("wrong batch", Some(Tensor::from_slice(&[1i64, 2, 3]))),
        ("2-d", Some(Tensor::from_slice(&[1i64, 2]).reshape([1, 2]))),
    ] {
        match forward(labels.as_ref()) {
            Err(Error::Input(msg)) => assert!(msg.contains("class_labels"), "{what}: {msg}"),
            other => panic!("{what}: expected Error::Input, got {:?}", other.map(|_| ())),
        }
    }
    // The noise level must matter, or the parity test could not catch a dropped class embedding.
    let other = forward(Some(&Tensor::from_slice(&[900i64, 900]))).expect("forward");
    assert!(max_abs_diff(&other, &g["out"]) > 1e-2);
}

#[test]
fn controlnet_residuals_match_diffusers() {
    let g = golden("sd1");
    let model = load("sd1", None, Kind::Float);
    let n = model.num_down_block_residuals();
    let down: Vec<Tensor> = (0..n)
        .map(|i| g[&format!("down_residual_{i}")].shallow_clone())
        .collect();
    let out = model
        .forward_with_residuals(
            &g["sample"],
            &g["timestep"],
            &g["encoder_hidden_states"],
            None,
            Some(&down),
            Some(&g["mid_residual"]),
        )
        .expect("forward");
    let diff = max_abs_diff(&out, &g["out_residuals"]);
    println!("unet_sd1 residuals fp32: max abs diff {diff:.3e}");
    assert!(diff < 1e-4, "max abs diff {diff}");
    // The residuals must matter, or this test could not fail.
    assert!(max_abs_diff(&g["out_residuals"], &g["out"]) > 1e-2);

    let err = model
        .forward_with_residuals(
            &g["sample"],
            &g["timestep"],
            &g["encoder_hidden_states"],
            None,
            Some(&down[1..]),
            Some(&g["mid_residual"]),
        )
        .expect_err("wrong residual count");
    assert!(matches!(err, Error::Input(_)), "{err}");
}

#[test]
fn timestep_forms_agree() {
    // A 0-d timestep, a [1] timestep and a [batch] timestep are the same thing for diffusers.
    let g = golden("sd2");
    let model = load("sd2", Some("fp16"), Kind::Float);
    let ehs = &g["encoder_hidden_states"];
    let t0 = model
        .forward(&g["sample"], &Tensor::from(981i64), ehs, None)
        .expect("0-d");
    let t1 = model
        .forward(&g["sample"], &Tensor::from_slice(&[981.0f32]), ehs, None)
        .expect("[1]");
    let tb = model
        .forward(&g["sample"], &Tensor::from_slice(&[981i64, 981]), ehs, None)
        .expect("[batch]");
    assert!(max_abs_diff(&t0, &g["out"]) < 1e-4);
    assert!(max_abs_diff(&t0, &t1) < 1e-6);
    assert!(max_abs_diff(&t0, &tb) < 1e-6);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let g = golden("sdxl");
    let model = load("sdxl", None, Kind::Float);
    let sample = &g["sample"];
    let t = &g["timestep"];
    let ehs = &g["encoder_hidden_states"];
    let added = SdxlConditioning {
        text_embeds: g["text_embeds"].shallow_clone(),
        time_ids: g["time_ids"].shallow_clone(),
    };
    let cases: Vec<(&str, Result<Tensor, Error>)> = vec![
        ("missing added", model.forward(sample, t, ehs, None)),
        (
            "3-d sample",
            model.forward(&sample.get(0), t, ehs, Some(&added)),
        ),
        (
            "wrong channels",
            model.forward(&sample.narrow(1, 0, 3), t, ehs, Some(&added)),
        ),
        (
            "wrong context width",
            model.forward(sample, t, &ehs.narrow(2, 0, 8), Some(&added)),
        ),
        (
            "timestep batch mismatch",
            model.forward(
                sample,
                &Tensor::from_slice(&[1.0f32, 2.0, 3.0]),
                ehs,
                Some(&added),
            ),
        ),
        (
            "time_ids width",
            model.forward(
                sample,
                t,
                ehs,
                Some(&SdxlConditioning {
                    text_embeds: added.text_embeds.shallow_clone(),
                    time_ids: added.time_ids.narrow(1, 0, 5),
                }),
            ),
        ),
    ];
    for (what, result) in cases {
        match result {
            Err(Error::Input(msg)) => println!("{what}: {msg}"),
            other => panic!("{what}: expected Error::Input, got {other:?}"),
        }
    }
}

#[test]
fn unsupported_config_values_are_rejected_by_name() {
    let base = std::fs::read_to_string(fixtures().join("unet_sd1/config.json")).expect("config");
    let base: serde_json::Value = serde_json::from_str(&base).expect("json");
    for (field, value) in [
        ("class_embed_type", serde_json::json!("projection")),
        ("resnet_time_scale_shift", serde_json::json!("ada_group")),
        ("time_embedding_type", serde_json::json!("fourier")),
        ("addition_embed_type", serde_json::json!("image_hint")),
        ("cross_attention_norm", serde_json::json!("layer_norm")),
        (
            "mid_block_type",
            serde_json::json!("UNetMidBlock3DCrossAttn"),
        ),
        (
            "down_block_types",
            serde_json::json!(["AttnDownBlock2D", "DownBlock2D"]),
        ),
        (
            "up_block_types",
            serde_json::json!(["UpBlock2D", "AttnUpBlock2D"]),
        ),
        ("attention_head_dim", serde_json::json!([2, 4, 8])),
        ("dual_cross_attention", serde_json::json!(true)),
        ("act_fn", serde_json::json!("tanh")),
    ] {
        let mut cfg = base.clone();
        cfg[field] = value;
        let cfg = serde_json::from_value(cfg).expect("parse");
        let vs = tch::nn::VarStore::new(Device::Cpu);
        match UNet2DConditionModel::new(&vs.root(), cfg) {
            Err(Error::Config(msg)) => assert!(msg.contains(field), "{field}: {msg}"),
            other => panic!(
                "{field}: expected Error::Config, got {:?}",
                other.map(|_| ())
            ),
        }
    }
}
