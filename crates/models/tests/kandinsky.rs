//! Kandinsky's model classes against diffusers 0.42 / transformers 5.24 goldens on the fixture
//! checkpoints' weights: 2.2's (`scripts/fixtures/kandinsky.py`, `component_goldens`)
//! PriorTransformer (masked), CLIPVisionModelWithProjection, VQModel (MoVQ, spatial norm) and the
//! image-conditioned UNet2DConditionModel; 2.1's (`kandinsky21.py`) MultilingualCLIP and the
//! text_image UNet; and VQModels with the real MoVQ's attention blocks
//! (`scripts/fixtures/components_movq.py`).

use std::collections::HashMap;
use std::path::PathBuf;

use autopipe_models::clip::CLIPVisionModelWithProjection;
use autopipe_models::prior_transformer::PriorTransformer;
use autopipe_models::unet::{UNet2DConditionModel, UNetExtraInputs};
use autopipe_models::vq_model::VQModel;
use autopipe_models::xlm_roberta::MultilingualCLIP;
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn golden() -> HashMap<String, Tensor> {
    let path = fixtures().join("components/kandinsky22_golden.safetensors");
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn checkpoint(path: &str) -> PathBuf {
    fixtures().join("checkpoints").join(path)
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    let d = (got - want).abs().max().double_value(&[]);
    println!("{what}: max abs diff {d:.3e}");
    assert!(d < tol, "{what}: max abs diff {d}");
}

#[test]
fn prior_transformer_matches_diffusers() {
    tch::set_num_threads(1);
    let g = golden();
    let prior = PriorTransformer::load(
        &checkpoint("kandinsky22-prior/prior"),
        None,
        Kind::Float,
        Device::Cpu,
    )
    .unwrap();
    let out = prior
        .forward(
            &g["prior.hidden_states"],
            &g["prior.timestep"],
            &g["prior.proj_embedding"],
            Some(&g["prior.encoder_hidden_states"]),
            Some(&g["prior.attention_mask"]),
        )
        .unwrap();
    assert_close("prior forward", &out, &g["prior.out"], 1e-4);
    let post = prior.post_process_latents(&g["prior.hidden_states"]);
    assert_close(
        "post_process_latents",
        &post,
        &g["prior.post_processed"],
        1e-6,
    );
}

#[test]
fn clip_vision_model_with_projection_matches_transformers() {
    tch::set_num_threads(1);
    let g = golden();
    let vision = CLIPVisionModelWithProjection::load(
        &checkpoint("kandinsky22-prior/image_encoder"),
        None,
        Kind::Float,
        Device::Cpu,
    )
    .unwrap();
    let out = vision.forward(&g["vision.pixel_values"]).unwrap();
    assert_close(
        "image_embeds",
        &out.image_embeds,
        &g["vision.image_embeds"],
        1e-4,
    );
    assert_close(
        "last_hidden_state",
        &out.last_hidden_state,
        &g["vision.last_hidden_state"],
        1e-4,
    );
    let err = vision.forward(&Tensor::zeros([1, 3, 16, 16], (Kind::Float, Device::Cpu)));
    assert!(err.is_err(), "a wrong image size must be refused");
}

#[test]
fn movq_encode_and_decode_match_diffusers() {
    tch::set_num_threads(1);
    let g = golden();
    let movq = VQModel::load(
        &checkpoint("kandinsky22-decoder/movq"),
        None,
        Kind::Float,
        Device::Cpu,
    )
    .unwrap();
    assert_close(
        "encode",
        &movq.encode(&g["movq.image"]).unwrap(),
        &g["movq.encoded"],
        1e-4,
    );
    assert_close(
        "decode",
        &movq.decode(&g["movq.latents"]).unwrap(),
        &g["movq.decoded"],
        1e-4,
    );
}

/// Encode and decode of the `components/<case>` VQModel against its goldens.
fn check_vq_case(case: &str) {
    tch::set_num_threads(1);
    let dir = fixtures().join("components");
    let path = dir.join(format!("{case}_golden.safetensors"));
    let g: HashMap<String, Tensor> = Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect();
    let vq = VQModel::load(&dir.join(case), None, Kind::Float, Device::Cpu)
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    let attn = |types: &[String]| types.iter().filter(|t| t.starts_with("Attn")).count();
    assert_eq!(attn(&vq.config().down_block_types), 1, "{case}");
    assert_eq!(attn(&vq.config().up_block_types), 1, "{case}");
    assert_close(
        &format!("{case} encode"),
        &vq.encode(&g["image"]).unwrap(),
        &g["encoded"],
        1e-4,
    );
    assert_close(
        &format!("{case} decode"),
        &vq.decode(&g["latents"]).unwrap(),
        &g["decoded"],
        1e-4,
    );
}

#[test]
fn movq_with_attention_blocks_matches_diffusers() {
    check_vq_case("movq_attn");
}

#[test]
fn group_norm_vq_with_attention_blocks_matches_diffusers() {
    check_vq_case("vq_attn_group");
}

#[test]
fn unknown_vq_block_type_is_named() {
    let cfg: autopipe_models::vq_model::VQModelConfig = serde_json::from_str(
        r#"{"down_block_types": ["CrossAttnDownEncoderBlock2D"], "block_out_channels": [32]}"#,
    )
    .unwrap();
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let err = VQModel::new(&vs.root(), cfg).unwrap_err().to_string();
    assert!(
        err.contains("down_block_types") && err.contains("CrossAttnDownEncoderBlock2D"),
        "{err}"
    );
}

#[test]
fn image_conditioned_unet_matches_diffusers() {
    tch::set_num_threads(1);
    let g = golden();
    let unet = UNet2DConditionModel::load(
        &checkpoint("kandinsky22-decoder/unet"),
        None,
        Kind::Float,
        Device::Cpu,
    )
    .unwrap();
    let extra = UNetExtraInputs {
        image_embeds: Some(&g["unet.image_embeds"]),
        ..Default::default()
    };
    let out = unet
        .forward_with(&g["unet.sample"], &g["unet.timestep"], None, &extra)
        .unwrap();
    assert_close("unet (image_proj)", &out, &g["unet.out"], 1e-4);
    let missing = unet.forward_with(
        &g["unet.sample"],
        &g["unet.timestep"],
        None,
        &UNetExtraInputs::default(),
    );
    assert!(
        missing.unwrap_err().to_string().contains("image_embeds"),
        "an image_proj UNet without image_embeds must say so"
    );
}

/// Kandinsky 2.1's goldens (`scripts/fixtures/kandinsky21.py`, `component_goldens`).
fn golden21() -> HashMap<String, Tensor> {
    let path = fixtures().join("components/kandinsky21_golden.safetensors");
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

#[test]
fn multilingual_clip_matches_diffusers() {
    tch::set_num_threads(1);
    let g = golden21();
    let model = MultilingualCLIP::load(
        &checkpoint("kandinsky21-decoder/text_encoder"),
        None,
        Kind::Float,
        Device::Cpu,
    )
    .unwrap();
    let out = model
        .forward(&g["mclip.input_ids"], &g["mclip.attention_mask"])
        .unwrap();
    assert_close(
        "mclip text_embeds",
        &out.text_embeds,
        &g["mclip.text_embeds"],
        1e-4,
    );
    assert_close(
        "mclip last_hidden_state",
        &out.last_hidden_state,
        &g["mclip.last_hidden_state"],
        1e-4,
    );
    let short = g["mclip.attention_mask"].narrow(1, 0, 10);
    let err = model
        .forward(&g["mclip.input_ids"], &short)
        .unwrap_err()
        .to_string();
    assert!(err.contains("attention_mask: shape"), "{err}");
}

#[test]
fn text_image_unet_matches_diffusers() {
    tch::set_num_threads(1);
    let g = golden21();
    let unet = UNet2DConditionModel::load(
        &checkpoint("kandinsky21-decoder/unet"),
        None,
        Kind::Float,
        Device::Cpu,
    )
    .unwrap();
    let extra = UNetExtraInputs {
        image_embeds: Some(&g["unet.image_embeds"]),
        text_embeds: Some(&g["unet.text_embeds"]),
        ..Default::default()
    };
    let out = unet
        .forward_with(
            &g["unet.sample"],
            &g["unet.timestep"],
            Some(&g["unet.encoder_hidden_states"]),
            &extra,
        )
        .unwrap();
    assert_close("unet (text_image)", &out, &g["unet.out"], 1e-4);
    let without_text = UNetExtraInputs {
        image_embeds: Some(&g["unet.image_embeds"]),
        ..Default::default()
    };
    let err = unet
        .forward_with(
            &g["unet.sample"],
            &g["unet.timestep"],
            Some(&g["unet.encoder_hidden_states"]),
            &without_text,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("text_embeds"), "{err}");
}
