//! Variational autoencoder of Stable Diffusion, following diffusers'
//! `models/autoencoders/autoencoder_kl.py` (`AutoencoderKL`), `autoencoders/vae.py` (`Encoder`,
//! `Decoder`, `DiagonalGaussianDistribution`) and `unets/unet_2d_blocks.py` (`DownEncoderBlock2D`,
//! `UpDecoderBlock2D`, their `Attn…` variants with a self-attention after each resnet, and
//! `UNetMidBlock2D`; every attention is diffusers' single-head `Attention` / `AttnProcessor2_0`).
//!
//! `encode`/`decode` take `&self` and never mutate weights, so one loaded model serves many
//! threads; running them under `tch::no_grad` is the caller's job.

use crate::layers::{Conv2d, Linear};
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::resnet::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};
use crate::weights;

/// Epsilon diffusers hard-codes for every norm of the VAE.
const VAE_EPS: f64 = 1e-6;

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
fn default_layers_per_block() -> i64 {
    1
}
fn default_act_fn() -> String {
    "silu".into()
}
fn default_latent_channels() -> i64 {
    4
}
fn default_norm_num_groups() -> i64 {
    32
}
fn default_sample_size() -> SampleSize {
    SampleSize::Square(32)
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

/// `sample_size` of a VAE config: one side or `[height, width]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    /// A square image side.
    Square(i64),
    /// `[height, width]`.
    HeightWidth(Vec<i64>),
}

/// Mirror of `vae/config.json` (`AutoencoderKL`'s registered config), with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoencoderKLConfig {
    /// Image channels in.
    #[serde(default = "default_channels")]
    pub in_channels: i64,
    /// Image channels out.
    #[serde(default = "default_channels")]
    pub out_channels: i64,
    /// Encoder block classes: `DownEncoderBlock2D` or `AttnDownEncoderBlock2D`.
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    /// Decoder block classes: `UpDecoderBlock2D` or `AttnUpDecoderBlock2D`.
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    /// Channels of each resolution level.
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<i64>,
    /// ResNet blocks per encoder level (the decoder uses one more).
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: i64,
    /// Activation; only `silu` (alias `swish`) is supported.
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    /// Channels of the latent.
    #[serde(default = "default_latent_channels")]
    pub latent_channels: i64,
    /// Groups of every group norm.
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: i64,
    /// Training image size (only used by tiling in diffusers).
    #[serde(default = "default_sample_size")]
    pub sample_size: SampleSize,
    /// Latents are multiplied by this after encoding (and divided before decoding) by pipelines.
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// Latents are shifted by this before scaling (SD3/Flux VAEs); `None` for SD.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Per-channel latent means (some SDXL-derived VAEs).
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent standard deviations.
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// Pipelines run this VAE in float32 even when the rest is half precision.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    /// Whether the encoder output goes through the 1x1 `quant_conv`.
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    /// Whether the latent goes through the 1x1 `post_quant_conv` before decoding.
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have their self-attention layer.
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        serde_json::from_str("{}").unwrap_or_else(|_| unreachable!("every field has a default"))
    }
}

impl AutoencoderKLConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::Config("block_out_channels is empty".into()));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::Config(format!(
                "down_block_types ({}) and up_block_types ({}) must match block_out_channels ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        for t in &self.down_block_types {
            block_has_attention(t, "DownEncoderBlock2D", "down_block_types")?;
        }
        for t in &self.up_block_types {
            block_has_attention(t, "UpDecoderBlock2D", "up_block_types")?;
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            return Err(Error::Config(format!(
                "unsupported act_fn {:?}",
                self.act_fn
            )));
        }
        if self.norm_num_groups <= 0 {
            return Err(Error::Config("norm_num_groups must be positive".into()));
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|c| **c <= 0 || *c % self.norm_num_groups != 0)
        {
            return Err(Error::Config(format!(
                "block_out_channels entry {c} is not a positive multiple of norm_num_groups {}",
                self.norm_num_groups
            )));
        }
        for (name, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("layers_per_block", self.layers_per_block),
        ] {
            if v <= 0 {
                return Err(Error::Config(format!("{name} must be positive, got {v}")));
            }
        }
        Ok(())
    }

    /// The group-normed attentions of block `bvs` (class `name`), one per resnet for an `Attn…`
    /// class, none otherwise: single-head, as diffusers' `Encoder`/`Decoder` pass
    /// `attention_head_dim=output_channel`.
    fn block_attentions(
        &self,
        name: &str,
        plain: &str,
        bvs: &nn::Path,
        layers: i64,
        channels: i64,
    ) -> Vec<VaeAttention> {
        if !block_has_attention(name, plain, "").unwrap_or(false) {
            return Vec::new();
        }
        (0..layers)
            .map(|j| VaeAttention::new(bvs / "attentions" / j, channels, self.norm_num_groups))
            .collect()
    }

    pub(crate) fn resnet(&self, in_channels: i64, out_channels: i64) -> ResnetBlock2DConfig {
        ResnetBlock2DConfig {
            temb_channels: None,
            groups: self.norm_num_groups,
            eps: VAE_EPS,
            ..ResnetBlock2DConfig::new(in_channels, out_channels)
        }
    }
}

/// Whether the VAE block class `name` (`plain` or `Attn` + `plain`) has attentions; an error
/// naming `field` for any other class.
pub(crate) fn block_has_attention(name: &str, plain: &str, field: &str) -> Result<bool> {
    match name.strip_prefix("Attn") {
        None if name == plain => Ok(false),
        Some(rest) if rest == plain => Ok(true),
        _ => Err(Error::Config(format!(
            "{field}: unsupported block type {name:?} (supported: {plain}, Attn{plain})"
        ))),
    }
}

/// Maps legacy attention names (`query`/`key`/`value`/`proj_attn`) of old VAE checkpoints to
/// `to_q`/`to_k`/`to_v`/`to_out.0`, as diffusers' `_fix_state_dict_keys_on_load` does.
pub fn vae_legacy_rename(key: &str) -> String {
    if !key.contains(".attentions.") {
        return key.to_string();
    }
    const MAP: [(&str, &str); 4] = [
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ];
    for (old, new) in MAP {
        if let Some(pos) = key.rfind(old) {
            return format!("{}{new}{}", &key[..pos], &key[pos + old.len()..]);
        }
    }
    key.to_string()
}

/// The projections of diffusers' single-head spatial self-attention (`Attention` with one head of
/// width C over the H×W positions), shared by the VAE and the MoVQ decoder.
#[derive(Debug)]
pub(crate) struct SpatialSelfAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialSelfAttention {
    pub(crate) fn new(vs: &nn::Path, channels: i64) -> Self {
        Self {
            to_q: weights::linear(vs / "to_q", channels, channels, true),
            to_k: weights::linear(vs / "to_k", channels, channels, true),
            to_v: weights::linear(vs / "to_v", channels, channels, true),
            to_out: weights::linear(vs / "to_out" / 0, channels, channels, true),
        }
    }

    /// Attention over `normed` (the normalised `xs`), plus the residual `xs`.
    pub(crate) fn forward(&self, xs: &Tensor, normed: &Tensor) -> Tensor {
        let (b, c, h, w) = xs.size4().unwrap_or((0, 0, 0, 0));
        // [B, C, H, W] -> [B, HW, C]; one head of width C.
        let hs = normed.view([b, c, h * w]).transpose(1, 2);
        let q = self.to_q.forward(&hs).unsqueeze(1);
        let k = self.to_k.forward(&hs).unsqueeze(1);
        let v = self.to_v.forward(&hs).unsqueeze(1);
        let attn = crate::attention::scaled_dot_product(&q, &k, &v, None);
        let out = self.to_out.forward(&attn.squeeze_dim(1));
        out.transpose(1, 2).reshape([b, c, h, w]) + xs
    }
}

/// The VAE's attention: group norm, then [`SpatialSelfAttention`].
#[derive(Debug)]
struct VaeAttention {
    group_norm: nn::GroupNorm,
    attention: SpatialSelfAttention,
}

impl VaeAttention {
    fn new(vs: nn::Path, channels: i64, groups: i64) -> Self {
        Self {
            group_norm: weights::group_norm(&vs / "group_norm", groups, channels, VAE_EPS),
            attention: SpatialSelfAttention::new(&vs, channels),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        self.attention.forward(xs, &self.group_norm.forward(xs))
    }
}

/// diffusers' `UNetMidBlock2D` without time embedding: resnet, then (attention, resnet) once.
#[derive(Debug)]
struct UNetMidBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attention: Option<VaeAttention>,
}

impl UNetMidBlock2D {
    fn new(vs: nn::Path, cfg: &AutoencoderKLConfig) -> Self {
        let c = cfg.block_out_channels.last().copied().unwrap_or_default();
        let rcfg = cfg.resnet(c, c);
        let resnets = (0..2)
            .map(|i| ResnetBlock2D::new(&(&vs / "resnets" / i), &rcfg))
            .collect();
        let attention = cfg
            .mid_block_add_attention
            .then(|| VaeAttention::new(&vs / "attentions" / 0, c, cfg.norm_num_groups));
        Self { resnets, attention }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut xs = self.resnets[0].forward(xs, None);
        if let Some(attn) = &self.attention {
            xs = attn.forward(&xs);
        }
        self.resnets[1].forward(&xs, None)
    }
}

/// diffusers' `DownEncoderBlock2D` / `UpDecoderBlock2D` (and the `Attn…` variants: one
/// attention after each resnet): resnets, then an optional resampler.
#[derive(Debug)]
struct ResnetStack {
    resnets: Vec<ResnetBlock2D>,
    /// Empty, or one per resnet.
    attentions: Vec<VaeAttention>,
    downsampler: Option<Downsample2D>,
    upsampler: Option<Upsample2D>,
}

impl ResnetStack {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut xs = xs.shallow_clone();
        for (i, r) in self.resnets.iter().enumerate() {
            xs = r.forward(&xs, None);
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs);
            }
        }
        if let Some(d) = &self.downsampler {
            xs = d.forward(&xs);
        }
        if let Some(u) = &self.upsampler {
            xs = u.forward(&xs, None);
        }
        xs
    }
}

/// diffusers' VAE `Encoder`: `double_z=True` (mean and log-variance) for `AutoencoderKL`, false
/// for `VQModel`.
#[derive(Debug)]
pub(crate) struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<ResnetStack>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: nn::GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    /// Declares the encoder; `cfg` must have passed `validate`.
    pub(crate) fn new(vs: nn::Path, cfg: &AutoencoderKLConfig, double_z: bool) -> Self {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let mut down_blocks = Vec::with_capacity(n);
        let mut out_c = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            let bvs = &vs / "down_blocks" / i;
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let rin = if j == 0 { in_c } else { out_c };
                    ResnetBlock2D::new(&(&bvs / "resnets" / j), &cfg.resnet(rin, out_c))
                })
                .collect();
            let attentions = cfg.block_attentions(
                &cfg.down_block_types[i],
                "DownEncoderBlock2D",
                &bvs,
                cfg.layers_per_block,
                out_c,
            );
            let downsampler = (i + 1 < n)
                .then(|| Downsample2D::new(&(&bvs / "downsamplers" / 0), out_c, true, out_c, 0));
            down_blocks.push(ResnetStack {
                resnets,
                attentions,
                downsampler,
                upsampler: None,
            });
        }
        let last = ch[n - 1];
        Self {
            conv_in: weights::conv2d(&vs / "conv_in", cfg.in_channels, ch[0], 3, 1, 1),
            down_blocks,
            mid_block: UNetMidBlock2D::new(&vs / "mid_block", cfg),
            conv_norm_out: weights::group_norm(
                &vs / "conv_norm_out",
                cfg.norm_num_groups,
                last,
                VAE_EPS,
            ),
            conv_out: weights::conv2d(
                &vs / "conv_out",
                last,
                if double_z { 2 } else { 1 } * cfg.latent_channels,
                3,
                1,
                1,
            ),
        }
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Tensor {
        let mut xs = self.conv_in.forward(xs);
        for b in &self.down_blocks {
            xs = b.forward(&xs);
        }
        let xs = self.mid_block.forward(&xs);
        self.conv_out
            .forward(&self.conv_norm_out.forward(&xs).silu())
    }
}

/// diffusers' VAE `Decoder` (group-norm variant).
#[derive(Debug)]
pub(crate) struct Decoder {
    conv_in: Conv2d,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<ResnetStack>,
    conv_norm_out: nn::GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    /// Declares the decoder; `cfg` must have passed `validate`.
    pub(crate) fn new(vs: nn::Path, cfg: &AutoencoderKLConfig) -> Self {
        let rev: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let n = rev.len();
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_c = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let prev = out_c;
            out_c = c;
            let bvs = &vs / "up_blocks" / i;
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let rin = if j == 0 { prev } else { out_c };
                    ResnetBlock2D::new(&(&bvs / "resnets" / j), &cfg.resnet(rin, out_c))
                })
                .collect();
            let attentions = cfg.block_attentions(
                &cfg.up_block_types[i],
                "UpDecoderBlock2D",
                &bvs,
                cfg.layers_per_block + 1,
                out_c,
            );
            let upsampler =
                (i + 1 < n).then(|| Upsample2D::new(&(&bvs / "upsamplers" / 0), out_c, out_c));
            up_blocks.push(ResnetStack {
                resnets,
                attentions,
                downsampler: None,
                upsampler,
            });
        }
        let first = cfg.block_out_channels[0];
        Self {
            conv_in: weights::conv2d(&vs / "conv_in", cfg.latent_channels, rev[0], 3, 1, 1),
            mid_block: UNetMidBlock2D::new(&vs / "mid_block", cfg),
            up_blocks,
            conv_norm_out: weights::group_norm(
                &vs / "conv_norm_out",
                cfg.norm_num_groups,
                first,
                VAE_EPS,
            ),
            conv_out: weights::conv2d(&vs / "conv_out", first, cfg.out_channels, 3, 1, 1),
        }
    }

    pub(crate) fn forward(&self, z: &Tensor) -> Tensor {
        let mut xs = self.mid_block.forward(&self.conv_in.forward(z));
        for b in &self.up_blocks {
            xs = b.forward(&xs);
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&xs).silu())
    }
}

/// diffusers' `DiagonalGaussianDistribution`: the encoder's posterior over latents.
#[derive(Debug)]
pub struct DiagonalGaussian {
    /// Mean, `[B, latent_channels, h, w]`.
    pub mean: Tensor,
    /// Log-variance, clamped to `[-30, 20]`.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits the encoder output `[B, 2C, h, w]` into mean and clamped log-variance.
    pub fn from_parameters(parameters: &Tensor) -> Result<Self> {
        let chunks = parameters.f_chunk(2, 1)?;
        let [mean, logvar] = <[Tensor; 2]>::try_from(chunks).map_err(|c| {
            Error::Input(format!("expected 2 chunks of the moments, got {}", c.len()))
        })?;
        Ok(Self {
            mean,
            logvar: logvar.clamp(-30.0, 20.0),
        })
    }

    /// Standard deviation `exp(0.5 * logvar)`.
    pub fn std(&self) -> Tensor {
        (&self.logvar * 0.5).exp()
    }

    /// `mean + std * noise`, with `noise` drawn by the caller as diffusers' `randn_tensor(mean.shape)` would be.
    pub fn sample(&self, noise: &Tensor) -> Tensor {
        &self.mean + self.std() * noise
    }

    /// The distribution's mode (its mean).
    pub fn mode(&self) -> Tensor {
        self.mean.shallow_clone()
    }
}

/// diffusers' `AutoencoderKL` (no tiling or slicing).
#[derive(Debug)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: AutoencoderKLConfig,
    device: Device,
    kind: Kind,
    _vs: Option<VarStore>,
}

// SAFETY: the model only holds tensors that are never mutated after loading (encode/decode read
// them), and concurrent reads of a libtorch tensor from several threads are safe.
unsafe impl Sync for AutoencoderKL {}

impl AutoencoderKL {
    /// Declares the parameters under `vs` with the checkpoint's paths (`encoder.down_blocks.0.resnets.0.conv1.weight`, …).
    pub fn new(vs: &nn::Path, cfg: AutoencoderKLConfig) -> Result<Self> {
        cfg.validate()?;
        let l = cfg.latent_channels;
        Ok(Self {
            encoder: Encoder::new(vs / "encoder", &cfg, true),
            decoder: Decoder::new(vs / "decoder", &cfg),
            quant_conv: cfg
                .use_quant_conv
                .then(|| weights::conv2d(vs / "quant_conv", 2 * l, 2 * l, 1, 1, 0)),
            post_quant_conv: cfg
                .use_post_quant_conv
                .then(|| weights::conv2d(vs / "post_quant_conv", l, l, 1, 1, 0)),
            device: vs.device(),
            kind: vs.kind(),
            config: cfg,
            _vs: None,
        })
    }

    /// Loads `config.json` and the safetensors weights of `component_dir` (e.g. `<model>/vae`) as `kind` on `device`; legacy attention names are accepted.
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
            &vae_legacy_rename,
            weights::Layout::ChannelsLast,
            |p, config: AutoencoderKLConfig| Self::new(p, config),
        )?;
        model._vs = Some(vs);
        Ok(model)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// The kind of the weights (inputs are cast to it).
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Moves `xs` to the weights' device and kind after checking it is `[B, channels, H, W]`.
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
        let xs = xs.to_device(self.device).to_kind(self.kind);
        // Channels-last activations on CPU, matching the weights (see `weights::Layout::ChannelsLast`).
        Ok(if weights::use_channels_last(self.device) {
            weights::channels_last(&xs)
        } else {
            xs
        })
    }

    /// Encodes images `x` (`[B, in_channels, H, W]`, values in `[-1, 1]`) into the latent posterior.
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let x = self.prepare(x, self.config.in_channels, "image")?;
        let mut h = self.encoder.forward(&x);
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h);
        }
        let h = h.contiguous();
        DiagonalGaussian::from_parameters(&h)
    }

    /// Decodes latents `z` (`[B, latent_channels, h, w]`, already divided by `scaling_factor` by the caller) into images.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let mut z = self.prepare(z, self.config.latent_channels, "latents")?;
        if let Some(q) = &self.post_quant_conv {
            z = q.forward(&z);
        }
        Ok(self.decoder.forward(&z).contiguous())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_names_map_to_attention_processor_names() {
        assert_eq!(
            vae_legacy_rename("encoder.mid_block.attentions.0.query.weight"),
            "encoder.mid_block.attentions.0.to_q.weight"
        );
        assert_eq!(
            vae_legacy_rename("decoder.mid_block.attentions.0.proj_attn.bias"),
            "decoder.mid_block.attentions.0.to_out.0.bias"
        );
        assert_eq!(
            vae_legacy_rename("decoder.mid_block.attentions.0.group_norm.weight"),
            "decoder.mid_block.attentions.0.group_norm.weight"
        );
        assert_eq!(
            vae_legacy_rename("encoder.down_blocks.0.resnets.0.conv1.weight"),
            "encoder.down_blocks.0.resnets.0.conv1.weight"
        );
    }

    #[test]
    fn config_defaults_match_diffusers() {
        let cfg: AutoencoderKLConfig =
            serde_json::from_str(r#"{"block_out_channels": [128, 256]}"#)
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.latent_channels, 4);
        assert_eq!(cfg.norm_num_groups, 32);
        assert!((cfg.scaling_factor - 0.18215).abs() < 1e-12);
        assert!(cfg.force_upcast && cfg.use_quant_conv && cfg.mid_block_add_attention);
    }
}
