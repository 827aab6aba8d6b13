//! The VQ autoencoder of Kandinsky (MoVQ), following diffusers 0.42.1
//! `models/autoencoders/vq_model.py` (`VQModel`), `autoencoders/vae.py` (`Encoder` with
//! `double_z=False`, `Decoder` with `norm_type="spatial"`), `models/attention_processor.py`
//! (`SpatialNorm`) and `models/resnet.py` (`ResnetBlockCondNorm2D`). The real MoVQ (kandinsky-2-1 /
//! 2-2 `movq/config.json`) ends its encoder with an `AttnDownEncoderBlock2D` (the VAE's block) and
//! starts its decoder with an `AttnUpDecoderBlock2D`, whose attentions are spatially normalised.
//!
//! Pipelines decode with `force_not_quantize=True` and never look up the codebook, so the
//! quantizer's codebook is not part of this model (its weights are skipped on load).

use crate::layers::Conv2d;
use std::path::Path;

use serde::Deserialize;
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::resnet::Upsample2D;
use crate::vae::{
    block_has_attention, AutoencoderKLConfig, Decoder, Encoder, SampleSize, SpatialSelfAttention,
};
use crate::weights;

/// Epsilon diffusers hard-codes for every norm of the decoder.
const EPS: f64 = 1e-6;

fn default_channels() -> i64 {
    3
}
fn default_down_block_types() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn default_up_block_types() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn default_block_out_channels() -> Vec<i64> {
    vec![64]
}
fn default_one() -> i64 {
    1
}
fn default_act_fn() -> String {
    "silu".into()
}
fn default_latent_channels() -> i64 {
    3
}
fn default_num_vq_embeddings() -> i64 {
    256
}
fn default_norm_num_groups() -> i64 {
    32
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_norm_type() -> String {
    "group".into()
}
fn default_true() -> bool {
    true
}

/// `movq/config.json` (`VQModel`'s registered config), with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct VQModelConfig {
    #[serde(default = "default_channels")]
    pub in_channels: i64,
    #[serde(default = "default_channels")]
    pub out_channels: i64,
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<i64>,
    #[serde(default = "default_one")]
    pub layers_per_block: i64,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: i64,
    #[serde(default = "default_num_vq_embeddings")]
    pub num_vq_embeddings: i64,
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: i64,
    /// Width of the codebook vectors; `latent_channels` when null.
    #[serde(default)]
    pub vq_embed_dim: Option<i64>,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// `"group"` or `"spatial"` (MoVQ: decoder norms conditioned on the latent).
    #[serde(default = "default_norm_type")]
    pub norm_type: String,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    /// Decoding looks latents up in the codebook (not supported).
    #[serde(default)]
    pub lookup_from_codebook: bool,
}

impl VQModelConfig {
    /// The encoder/decoder settings in the shape the VAE's blocks take.
    fn blocks(&self) -> AutoencoderKLConfig {
        AutoencoderKLConfig {
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            down_block_types: self.down_block_types.clone(),
            up_block_types: self.up_block_types.clone(),
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block,
            act_fn: self.act_fn.clone(),
            latent_channels: self.latent_channels,
            norm_num_groups: self.norm_num_groups,
            sample_size: SampleSize::Square(32),
            scaling_factor: self.scaling_factor,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: false,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: self.mid_block_add_attention,
        }
    }
}

/// diffusers' `SpatialNorm`: a 32-group norm of `f` modulated by 1x1 convs of the latent `zq`
/// (resized to `f` by nearest neighbour).
#[derive(Debug)]
struct SpatialNorm {
    norm_layer: nn::GroupNorm,
    conv_y: Conv2d,
    conv_b: Conv2d,
}

impl SpatialNorm {
    fn new(vs: &nn::Path, f_channels: i64, zq_channels: i64) -> Self {
        Self {
            norm_layer: weights::group_norm(vs / "norm_layer", 32, f_channels, EPS),
            conv_y: weights::conv2d(vs / "conv_y", zq_channels, f_channels, 1, 1, 0),
            conv_b: weights::conv2d(vs / "conv_b", zq_channels, f_channels, 1, 1, 0),
        }
    }

    fn forward(&self, f: &Tensor, zq: &Tensor) -> Tensor {
        let s = f.size();
        let zq = zq.upsample_nearest2d([s[2], s[3]], None, None);
        self.norm_layer.forward(f) * self.conv_y.forward(&zq) + self.conv_b.forward(&zq)
    }
}

/// diffusers' `ResnetBlockCondNorm2D` with `time_embedding_norm="spatial"`.
#[derive(Debug)]
struct CondResnet {
    norm1: SpatialNorm,
    conv1: Conv2d,
    norm2: SpatialNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl CondResnet {
    fn new(vs: &nn::Path, in_c: i64, out_c: i64, zq_c: i64) -> Self {
        Self {
            norm1: SpatialNorm::new(&(vs / "norm1"), in_c, zq_c),
            conv1: weights::conv2d(vs / "conv1", in_c, out_c, 3, 1, 1),
            norm2: SpatialNorm::new(&(vs / "norm2"), out_c, zq_c),
            conv2: weights::conv2d(vs / "conv2", out_c, out_c, 3, 1, 1),
            conv_shortcut: (in_c != out_c)
                .then(|| weights::conv2d(vs / "conv_shortcut", in_c, out_c, 1, 1, 0)),
        }
    }

    fn forward(&self, xs: &Tensor, zq: &Tensor) -> Tensor {
        let hs = self.conv1.forward(&self.norm1.forward(xs, zq).silu());
        let hs = self.conv2.forward(&self.norm2.forward(&hs, zq).silu());
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs),
            None => xs.shallow_clone(),
        };
        shortcut + hs
    }
}

/// The mid block's single-head self-attention with a `SpatialNorm` in place of the group norm.
#[derive(Debug)]
struct SpatialAttention {
    spatial_norm: SpatialNorm,
    attention: SpatialSelfAttention,
}

impl SpatialAttention {
    fn new(vs: &nn::Path, channels: i64, zq_c: i64) -> Self {
        Self {
            spatial_norm: SpatialNorm::new(&(vs / "spatial_norm"), channels, zq_c),
            attention: SpatialSelfAttention::new(vs, channels),
        }
    }

    fn forward(&self, xs: &Tensor, zq: &Tensor) -> Tensor {
        self.attention
            .forward(xs, &self.spatial_norm.forward(xs, zq))
    }
}

/// An `UpDecoderBlock2D` (or `AttnUpDecoderBlock2D`: one attention after each resnet) with
/// spatially normalised resnets and attentions.
#[derive(Debug)]
struct SpatialUpBlock {
    resnets: Vec<CondResnet>,
    /// Empty, or one per resnet.
    attentions: Vec<SpatialAttention>,
    upsampler: Option<Upsample2D>,
}

/// diffusers' `Decoder(norm_type="spatial")`.
#[derive(Debug)]
struct SpatialDecoder {
    conv_in: Conv2d,
    mid_resnets: [CondResnet; 2],
    mid_attention: Option<SpatialAttention>,
    up_blocks: Vec<SpatialUpBlock>,
    conv_norm_out: SpatialNorm,
    conv_out: Conv2d,
}

impl SpatialDecoder {
    /// Declares the decoder; `cfg`'s block types must have passed `AutoencoderKLConfig::validate`.
    fn new(vs: nn::Path, cfg: &VQModelConfig) -> Self {
        let zq = cfg.latent_channels;
        let rev: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let n = rev.len();
        let mid = &vs / "mid_block";
        let top = rev[0];
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_c = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let prev = out_c;
            out_c = c;
            let bvs = &vs / "up_blocks" / i;
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let rin = if j == 0 { prev } else { out_c };
                    CondResnet::new(&(&bvs / "resnets" / j), rin, out_c, zq)
                })
                .collect();
            let attended =
                block_has_attention(&cfg.up_block_types[i], "UpDecoderBlock2D", "up_block_types")
                    .unwrap_or(false);
            let attentions = if attended {
                (0..cfg.layers_per_block + 1)
                    .map(|j| SpatialAttention::new(&(&bvs / "attentions" / j), out_c, zq))
                    .collect()
            } else {
                Vec::new()
            };
            let upsampler =
                (i + 1 < n).then(|| Upsample2D::new(&(&bvs / "upsamplers" / 0), out_c, out_c));
            up_blocks.push(SpatialUpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }
        let first = cfg.block_out_channels[0];
        Self {
            conv_in: weights::conv2d(&vs / "conv_in", cfg.latent_channels, top, 3, 1, 1),
            mid_resnets: [
                CondResnet::new(&(&mid / "resnets" / 0), top, top, zq),
                CondResnet::new(&(&mid / "resnets" / 1), top, top, zq),
            ],
            mid_attention: cfg
                .mid_block_add_attention
                .then(|| SpatialAttention::new(&(&mid / "attentions" / 0), top, zq)),
            up_blocks,
            conv_norm_out: SpatialNorm::new(&(&vs / "conv_norm_out"), first, zq),
            conv_out: weights::conv2d(&vs / "conv_out", first, cfg.out_channels, 3, 1, 1),
        }
    }

    fn forward(&self, z: &Tensor, zq: &Tensor) -> Tensor {
        let mut xs = self.mid_resnets[0].forward(&self.conv_in.forward(z), zq);
        if let Some(attn) = &self.mid_attention {
            xs = attn.forward(&xs, zq);
        }
        xs = self.mid_resnets[1].forward(&xs, zq);
        for block in &self.up_blocks {
            for (i, r) in block.resnets.iter().enumerate() {
                xs = r.forward(&xs, zq);
                if let Some(attn) = block.attentions.get(i) {
                    xs = attn.forward(&xs, zq);
                }
            }
            if let Some(u) = &block.upsampler {
                xs = u.forward(&xs, None);
            }
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&xs, zq).silu())
    }
}

/// The decoder a `norm_type` selects.
#[derive(Debug)]
// One per loaded model, never moved in a loop: boxing would only add an indirection.
#[allow(clippy::large_enum_variant)]
enum VqDecoder {
    Group(Decoder),
    Spatial(SpatialDecoder),
}

/// diffusers' `VQModel`: `encode` (encoder + `quant_conv`, un-quantized) and
/// `decode(force_not_quantize=True)`.
#[derive(Debug)]
pub struct VQModel {
    encoder: Encoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    decoder: VqDecoder,
    config: VQModelConfig,
    device: Device,
    kind: Kind,
    _vs: Option<VarStore>,
}

// SAFETY: the model only reads its tensors after loading; concurrent reads are safe in libtorch.
unsafe impl Sync for VQModel {}

/// Skips the codebook (`quantize.embedding.weight`), which decoding without quantization never reads.
fn vq_rename(key: &str) -> String {
    if key.starts_with("quantize.") {
        String::new()
    } else {
        crate::vae::vae_legacy_rename(key)
    }
}

impl VQModel {
    /// Declares the parameters under `vs` with the checkpoint's paths.
    pub fn new(vs: &nn::Path, cfg: VQModelConfig) -> Result<Self> {
        let blocks = cfg.blocks();
        blocks.validate()?;
        if cfg.lookup_from_codebook {
            return Err(Error::Config(
                "lookup_from_codebook: true is not supported".into(),
            ));
        }
        let decoder = match cfg.norm_type.as_str() {
            "group" => VqDecoder::Group(Decoder::new(vs / "decoder", &blocks)),
            "spatial" => {
                if cfg.block_out_channels.iter().any(|c| c % 32 != 0) {
                    return Err(Error::Config(format!(
                        "block_out_channels: {:?} must be multiples of 32 (SpatialNorm's groups)",
                        cfg.block_out_channels
                    )));
                }
                VqDecoder::Spatial(SpatialDecoder::new(vs / "decoder", &cfg))
            }
            other => {
                return Err(Error::Config(format!(
                    "norm_type: {other:?} is not supported"
                )))
            }
        };
        let l = cfg.latent_channels;
        let vq = cfg.vq_embed_dim.unwrap_or(l);
        Ok(Self {
            encoder: Encoder::new(vs / "encoder", &blocks, false),
            quant_conv: weights::conv2d(vs / "quant_conv", l, vq, 1, 1, 0),
            post_quant_conv: weights::conv2d(vs / "post_quant_conv", vq, l, 1, 1, 0),
            decoder,
            device: vs.device(),
            kind: vs.kind(),
            config: cfg,
            _vs: None,
        })
    }

    /// Loads `config.json` and the weights of `component_dir` (e.g. `<model>/movq`).
    pub fn load(
        component_dir: &Path,
        variant: Option<&str>,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let (mut model, vs) = weights::load_model(
            component_dir,
            variant,
            kind,
            device,
            &vq_rename,
            weights::Layout::Contiguous,
            |p, config: VQModelConfig| Self::new(p, config),
        )?;
        model._vs = Some(vs);
        Ok(model)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &VQModelConfig {
        &self.config
    }

    fn prepare(&self, xs: &Tensor, channels: i64, what: &str) -> Result<Tensor> {
        let size = xs.size();
        match size[..] {
            [b, c, h, w] if c == channels && b > 0 && h > 0 && w > 0 => {}
            _ => {
                return Err(Error::Input(format!(
                    "{what} must be [batch, {channels}, height, width], got {size:?}"
                )))
            }
        }
        if !xs.is_floating_point() {
            return Err(Error::Input(format!(
                "{what} must be floating point, got {:?}",
                xs.kind()
            )));
        }
        Ok(xs.to_device(self.device).to_kind(self.kind))
    }

    /// `encode(x).latents`: images in [-1, 1] to (un-quantized) latents.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.prepare(x, self.config.in_channels, "image")?;
        let _guard = tch::no_grad_guard();
        Ok(self
            .quant_conv
            .forward(&self.encoder.forward(&x))
            .contiguous())
    }

    /// `decode(h, force_not_quantize=True).sample`: latents to images in about [-1, 1].
    pub fn decode(&self, h: &Tensor) -> Result<Tensor> {
        let vq = self
            .config
            .vq_embed_dim
            .unwrap_or(self.config.latent_channels);
        let quant = self.prepare(h, vq, "latents")?;
        let _guard = tch::no_grad_guard();
        let quant2 = self.post_quant_conv.forward(&quant);
        let out = match &self.decoder {
            VqDecoder::Group(d) => d.forward(&quant2),
            VqDecoder::Spatial(d) => d.forward(&quant2, &quant),
        };
        Ok(out.contiguous())
    }
}
