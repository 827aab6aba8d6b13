//! CLIP text encoders against transformers 5.24 goldens from `scripts/fixtures/components_clip_vae.py`.

use std::collections::HashMap;
use std::path::PathBuf;

use autopipe_models::clip::{CLIPTextModel, CLIPTextModelWithProjection};
use autopipe_models::Error;
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

#[test]
fn clip_quick_gelu_legacy_eos_matches_transformers() {
    let g = golden("clip_quick_gelu");
    let model = CLIPTextModel::load(
        &fixtures().join("clip_quick_gelu"),
        None,
        Kind::Float,
        Device::Cpu,
    )
    .expect("load");
    assert_eq!(model.config().eos_token_id, 2);
    let out = tch::no_grad(|| model.forward(&g["input_ids"])).expect("forward");
    assert!(
        max_diff(
            "last_hidden_state",
            &out.last_hidden_state,
            &g["last_hidden_state"]
        ) < 1e-4
    );
    assert!(max_diff("pooler_output", &out.pooler_output, &g["pooler_output"]) < 1e-4);
    assert_eq!(out.hidden_states.len(), 3);
    for (i, h) in out.hidden_states.iter().enumerate() {
        assert!(
            max_diff(
                &format!("hidden_states[{i}]"),
                h,
                &g[&format!("hidden_states.{i}")]
            ) < 1e-4
        );
    }
}

#[test]
fn clip_gelu_with_projection_sharded_matches_transformers() {
    let g = golden("clip_gelu_proj");
    let model = CLIPTextModelWithProjection::load(
        &fixtures().join("clip_gelu_proj"),
        None,
        Kind::Float,
        Device::Cpu,
    )
    .expect("load");
    let out = tch::no_grad(|| model.forward(&g["input_ids"])).expect("forward");
    assert!(
        max_diff(
            "last_hidden_state",
            &out.last_hidden_state,
            &g["last_hidden_state"]
        ) < 1e-4
    );
    assert!(max_diff("text_embeds", &out.text_embeds, &g["text_embeds"]) < 1e-4);
    for (i, h) in out.hidden_states.iter().enumerate() {
        assert!(
            max_diff(
                &format!("hidden_states[{i}]"),
                h,
                &g[&format!("hidden_states.{i}")]
            ) < 1e-4
        );
    }
}

#[test]
fn clip_first_eos_pooling_differs_from_argmax() {
    // eos_token_id 50: the pooled row must be the first 50, not the argmax (the bos 98).
    let g = golden("clip_gelu_proj");
    let proj = CLIPTextModelWithProjection::load(
        &fixtures().join("clip_gelu_proj"),
        None,
        Kind::Float,
        Device::Cpu,
    )
    .expect("load");
    let out = tch::no_grad(|| proj.forward(&g["input_ids"])).expect("forward");
    let at_bos = out.last_hidden_state.select(1, 0);
    assert!(max_diff("pooled vs bos row", &at_bos, &g["pooler_output"]) > 1e-2);
    let at_first_eos = Tensor::stack(
        &[
            out.last_hidden_state.get(0).get(4),
            out.last_hidden_state.get(1).get(8),
        ],
        0,
    );
    assert!(
        max_diff(
            "pooled vs first eos rows",
            &at_first_eos,
            &g["pooler_output"]
        ) < 1e-4
    );
}

#[test]
fn clip_half_precision_is_close() {
    let g = golden("clip_quick_gelu");
    let model = CLIPTextModel::load(
        &fixtures().join("clip_quick_gelu"),
        None,
        Kind::Half,
        Device::Cpu,
    )
    .expect("load");
    let out = tch::no_grad(|| model.forward(&g["input_ids"])).expect("forward");
    assert_eq!(out.last_hidden_state.kind(), Kind::Half);
    assert!(
        max_diff(
            "last_hidden_state (f16)",
            &out.last_hidden_state,
            &g["last_hidden_state"]
        ) < 5e-2
    );
}

#[test]
fn clip_text_model_rejects_projection_checkpoint() {
    // Strict loading: `text_projection.weight` has no home in a bare CLIPTextModel.
    let err = CLIPTextModel::load(
        &fixtures().join("clip_gelu_proj"),
        None,
        Kind::Float,
        Device::Cpu,
    )
    .expect_err("must fail");
    let msg = err.to_string();
    println!("{msg}");
    assert!(matches!(err, Error::Weights(_)));
    assert!(
        msg.contains("unexpected") && msg.contains("text_projection.weight"),
        "{msg}"
    );
}

#[test]
fn clip_rejects_bad_input_ids() {
    let model = CLIPTextModel::load(
        &fixtures().join("clip_quick_gelu"),
        None,
        Kind::Float,
        Device::Cpu,
    )
    .expect("load");
    let too_long = Tensor::zeros([1, 17], (Kind::Int64, Device::Cpu));
    assert!(matches!(model.forward(&too_long), Err(Error::Input(_))));
    let out_of_vocab = Tensor::from_slice(&[0i64, 100]).unsqueeze(0);
    assert!(matches!(model.forward(&out_of_vocab), Err(Error::Input(_))));
    let float_ids = Tensor::zeros([1, 4], (Kind::Float, Device::Cpu));
    assert!(matches!(model.forward(&float_ids), Err(Error::Input(_))));
    let one_d = Tensor::zeros([4], (Kind::Int64, Device::Cpu));
    assert!(matches!(model.forward(&one_d), Err(Error::Input(_))));
}

#[test]
fn models_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CLIPTextModel>();
    assert_send_sync::<CLIPTextModelWithProjection>();
    assert_send_sync::<autopipe_models::vae::AutoencoderKL>();
}

#[test]
fn clip_forward_from_several_threads_agrees() {
    let g = golden("clip_quick_gelu");
    let model = CLIPTextModel::load(
        &fixtures().join("clip_quick_gelu"),
        None,
        Kind::Float,
        Device::Cpu,
    )
    .expect("load");
    let ids = &g["input_ids"];
    let want = &g["last_hidden_state"];
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let ids = ids.shallow_clone();
                let model = &model;
                s.spawn(move || {
                    tch::no_grad(|| model.forward(&ids))
                        .expect("forward")
                        .last_hidden_state
                })
            })
            .collect();
        for h in handles {
            let got = h.join().expect("thread");
            assert!(max_diff("threaded last_hidden_state", &got, want) < 1e-4);
        }
    });
}
