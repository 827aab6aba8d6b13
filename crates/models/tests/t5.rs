//! Parity of `T5EncoderModel` with transformers 5.24: a tiny random T5 v1.1 encoder saved sharded
//! (fp32 and an fp16 variant) and its fp32 CPU outputs, written by
//! `scripts/fixtures/components_t5.py` under `tests/fixtures/components/`.

use std::collections::HashMap;
use std::path::PathBuf;

use autopipe_models::t5::T5EncoderModel;
use autopipe_models::Error;
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/components")
}

fn golden() -> HashMap<String, Tensor> {
    let path = fixtures().join("t5_encoder_golden.safetensors");
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn load(variant: Option<&str>, kind: Kind) -> T5EncoderModel {
    let dir = fixtures().join("t5_encoder");
    T5EncoderModel::load(&dir, variant, kind, Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape");
    (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn sharded_fp32_matches_transformers_with_and_without_mask() {
    let g = golden();
    let model = load(None, Kind::Float);
    let masked = model
        .forward(&g["input_ids"], Some(&g["attention_mask"]))
        .expect("forward");
    let unmasked = model.forward(&g["input_ids"], None).expect("forward");
    let d_masked = max_abs_diff(&masked, &g["out_masked"]);
    let d_unmasked = max_abs_diff(&unmasked, &g["out_unmasked"]);
    println!("t5 fp32: max abs diff masked {d_masked:.3e}, unmasked {d_unmasked:.3e}");
    assert!(d_masked < 1e-4 && d_unmasked < 1e-4);
    // The mask must matter, or this test could not catch it being ignored.
    assert!(max_abs_diff(&g["out_masked"], &g["out_unmasked"]) > 1e-2);
}

#[test]
fn fp16_variant_shards_load_to_the_same_values() {
    let g = golden();
    let model = load(Some("fp16"), Kind::Float);
    let out = model
        .forward(&g["input_ids"], Some(&g["attention_mask"]))
        .expect("forward");
    let diff = max_abs_diff(&out, &g["out_masked"]);
    println!("t5 fp16 variant as fp32: max abs diff {diff:.3e}");
    assert!(diff < 1e-4);
}

#[test]
fn bf16_close_to_fp32_reference() {
    let g = golden();
    let model = load(Some("fp16"), Kind::BFloat16);
    let out = model
        .forward(&g["input_ids"], Some(&g["attention_mask"]))
        .expect("forward");
    assert_eq!(out.kind(), Kind::BFloat16);
    let diff = max_abs_diff(&out, &g["out_masked"]);
    let scale = g["out_masked"].abs().max().double_value(&[]);
    println!("t5 bf16: max abs diff {diff:.3e} (output max {scale:.3})");
    assert!(diff < 0.05 * scale.max(1.0));
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let g = golden();
    let model = load(None, Kind::Float);
    let ids = &g["input_ids"];
    let cases: Vec<(&str, Result<Tensor, Error>)> = vec![
        ("1-d ids", model.forward(&ids.get(0), None)),
        ("float ids", model.forward(&ids.to_kind(Kind::Float), None)),
        (
            "id beyond the vocabulary",
            model.forward(&Tensor::from_slice(&[1i64, 96]).reshape([1, 2]), None),
        ),
        (
            "mask of another shape",
            model.forward(ids, Some(&g["attention_mask"].narrow(1, 0, 10))),
        ),
    ];
    for (what, result) in cases {
        match result {
            Err(Error::Input(msg)) => println!("{what}: {msg}"),
            other => panic!("{what}: expected Error::Input, got {:?}", other.map(|_| ())),
        }
    }
}
