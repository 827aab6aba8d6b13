//! The conditional denoising UNet of Stable Diffusion 1.x/2.x/XL (and their inpainting
//! variants), the Kandinsky 2.2 decoder (image-embedding conditioning) and DeepFloyd IF stages I
//! and II (pixel space, `SimpleCrossAttn` blocks, text-pooled and noise-level embeddings),
//! following diffusers `models/unets/unet_2d_condition.py` (`UNet2DConditionModel`).
//!
//! Parameters live at the checkpoint's own key paths (`down_blocks.0.attentions.0...`), so
//! loading `diffusion_pytorch_model.safetensors` is a lookup by name.

use crate::layers::{Conv2d, Linear};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use serde::Deserialize;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::embeddings::{Activation, TextTimeEmbedding, TimestepEmbedding, Timesteps};
use crate::resnet::TimeEmbeddingNorm;
use crate::unet_blocks::{
    BlockAttention, BlockType, CrossAttnSettings, DownBlock, DownBlockConfig, MidBlock,
    ResnetSettings, SimpleCrossAttnSettings, UpBlock, UpBlockConfig,
};
use crate::weights;
use crate::{Error, Result};

/// A config value given either once for every block or as one value per block.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// One value per block (listed first so that nested lists parse as lists).
    Many(Vec<T>),
    /// The same value for every block.
    One(T),
}

impl<T: Clone> PerBlock<T> {
    /// Expands to `n` values, or errors naming `field` when a list has the wrong length.
    pub fn expand(&self, n: usize, field: &str) -> Result<Vec<T>> {
        match self {
            Self::One(v) => Ok(vec![v.clone(); n]),
            Self::Many(vs) if vs.len() == n => Ok(vs.clone()),
            Self::Many(vs) => Err(Error::Config(format!(
                "{field}: {} values given for {n} down blocks",
                vs.len()
            ))),
        }
    }
}

/// A bool that some published configs write as `null` (SDXL's `upcast_attention`), which
/// diffusers treats as false.
fn bool_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

fn default_in_channels() -> i64 {
    4
}
fn default_true() -> bool {
    true
}
fn default_down_block_types() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn default_mid_block_type() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".to_string())
}
fn default_up_block_types() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn default_only_cross_attention() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn default_block_out_channels() -> Vec<i64> {
    vec![320, 640, 1280, 1280]
}
fn default_layers_per_block() -> PerBlock<i64> {
    PerBlock::One(2)
}
fn default_one_i64() -> i64 {
    1
}
fn default_one_f64() -> f64 {
    1.0
}
fn default_act_fn() -> String {
    "silu".to_string()
}
fn default_norm_num_groups() -> Option<i64> {
    Some(32)
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_cross_attention_dim() -> PerBlock<i64> {
    PerBlock::One(1280)
}
fn default_transformer_layers_per_block() -> PerBlock<PerBlock<i64>> {
    PerBlock::One(PerBlock::One(1))
}
fn default_attention_head_dim() -> PerBlock<i64> {
    PerBlock::One(8)
}
fn default_resnet_time_scale_shift() -> String {
    "default".to_string()
}
fn default_time_embedding_type() -> String {
    "positional".to_string()
}
fn default_kernel() -> i64 {
    3
}
fn default_attention_type() -> String {
    "default".to_string()
}
fn default_addition_embed_type_num_heads() -> i64 {
    64
}

/// `unet/config.json`, field for field as diffusers' `UNet2DConditionModel.__init__` takes it,
/// with diffusers' defaults for what a config omits.
#[derive(Debug, Clone, Deserialize)]
pub struct UNet2DConditionConfig {
    /// Nominal latent height/width (informational).
    #[serde(default)]
    pub sample_size: Option<PerBlock<i64>>,
    /// Input channels: 4, or 9 for inpainting checkpoints (latents + mask + masked latents).
    #[serde(default = "default_in_channels")]
    pub in_channels: i64,
    /// Output channels.
    #[serde(default = "default_in_channels")]
    pub out_channels: i64,
    /// Maps the input sample from [0, 1] to [-1, 1] first.
    #[serde(default, deserialize_with = "bool_or_null")]
    pub center_input_sample: bool,
    /// Timestep embedding order `cos, sin` (true) or `sin, cos`.
    #[serde(default = "default_true", deserialize_with = "bool_or_null")]
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the timestep embedding.
    #[serde(default)]
    pub freq_shift: f64,
    /// Down block class names.
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    /// Mid block class name; `null` for no mid block.
    #[serde(default = "default_mid_block_type")]
    pub mid_block_type: Option<String>,
    /// Up block class names.
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    /// Whether `attn1` is a cross-attention, once or per block.
    #[serde(default = "default_only_cross_attention")]
    pub only_cross_attention: PerBlock<bool>,
    /// Output channels of each down block.
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<i64>,
    /// Resnets per down block (up blocks have one more), once or per block.
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: PerBlock<i64>,
    /// Padding of the downsampling convs.
    #[serde(default = "default_one_i64")]
    pub downsample_padding: i64,
    /// Output scale factor of the mid block's resnets.
    #[serde(default = "default_one_f64")]
    pub mid_block_scale_factor: f64,
    /// Training dropout (unused at inference).
    #[serde(default)]
    pub dropout: f64,
    /// Activation of the time embedding and output head (resnets use SiLU).
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    /// Group-norm groups; `null` (no output norm) is not supported.
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: Option<i64>,
    /// Group-norm epsilon.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Feature width of `encoder_hidden_states`, once or per block.
    #[serde(default = "default_cross_attention_dim")]
    pub cross_attention_dim: PerBlock<i64>,
    /// Transformer blocks per attention, once, per block, or per block and layer.
    #[serde(default = "default_transformer_layers_per_block")]
    pub transformer_layers_per_block: PerBlock<PerBlock<i64>>,
    /// Per-block, per-layer transformer depths of the up path, for asymmetric UNets.
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<PerBlock<i64>>>,
    /// Width of `encoder_hidden_states` before `encoder_hid_proj` (`text_proj`, `text_image_proj`),
    /// or of the image embeddings (`image_proj`, Kandinsky 2.2).
    #[serde(default)]
    pub encoder_hid_dim: Option<i64>,
    /// How `encoder_hidden_states` is made: `text_proj` (a linear projection of the text states),
    /// `text_image_proj` (Kandinsky 2.1: image tokens before the projected text states) or
    /// `image_proj` (Kandinsky 2.2: tokens projected from the image embeddings).
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    /// Number of attention heads per block, despite the name (diffusers' naming quirk).
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: PerBlock<i64>,
    /// The real number of heads when set; `null` means "use `attention_head_dim`".
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<i64>>,
    /// Dual transformers (not supported).
    #[serde(default, deserialize_with = "bool_or_null")]
    pub dual_cross_attention: bool,
    /// `proj_in`/`proj_out` are `Linear` rather than 1x1 `Conv2d`.
    #[serde(default, deserialize_with = "bool_or_null")]
    pub use_linear_projection: bool,
    /// Class conditioning: `null` or `"timestep"` (IF stage II: the noise level, embedded like a
    /// timestep, is added to the time embedding).
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// Extra conditioning added to the time embedding: `null`, `"text_time"` (SDXL), `"text_image"`
    /// (Kandinsky 2.1), `"image"` (Kandinsky 2.2) or `"text"` (DeepFloyd IF: attention-pooled text
    /// states).
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of each SDXL `time_ids` embedding.
    #[serde(default)]
    pub addition_time_embed_dim: Option<i64>,
    /// Number of class embeddings (not supported).
    #[serde(default)]
    pub num_class_embeds: Option<i64>,
    /// Compute attention in f32 (SD 2.x).
    #[serde(default, deserialize_with = "bool_or_null")]
    pub upcast_attention: bool,
    /// Resnet time-embedding mode: `"default"` or `"scale_shift"`.
    #[serde(default = "default_resnet_time_scale_shift")]
    pub resnet_time_scale_shift: String,
    /// Resnets of the `ResnetDownsample`/`SimpleCrossAttn` blocks skip the activation before
    /// their time projection.
    #[serde(default, deserialize_with = "bool_or_null")]
    pub resnet_skip_time_act: bool,
    /// Output scale of the resnets of the `ResnetDownsample`/`SimpleCrossAttn` down and up blocks.
    #[serde(default = "default_one_f64")]
    pub resnet_out_scale_factor: f64,
    /// Timestep embedding kind; only `"positional"` is supported.
    #[serde(default = "default_time_embedding_type")]
    pub time_embedding_type: String,
    /// Width of the time embedding; defaults to `4 * block_out_channels[0]`.
    #[serde(default)]
    pub time_embedding_dim: Option<i64>,
    /// Activation applied once to the summed embeddings.
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    /// Activation after the time embedding's second linear layer.
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    /// Width of the optional `timestep_cond` input (LCM guidance embedding).
    #[serde(default)]
    pub time_cond_proj_dim: Option<i64>,
    /// Kernel size of `conv_in`.
    #[serde(default = "default_kernel")]
    pub conv_in_kernel: i64,
    /// Kernel size of `conv_out`.
    #[serde(default = "default_kernel")]
    pub conv_out_kernel: i64,
    /// Input width of `add_embedding` (SDXL: pooled text embeds + `time_ids` embeddings).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<i64>,
    /// Attention kind; only `"default"` is supported.
    #[serde(default = "default_attention_type")]
    pub attention_type: String,
    /// Concatenate class embeddings (not supported).
    #[serde(default, deserialize_with = "bool_or_null")]
    pub class_embeddings_concat: bool,
    /// `only_cross_attention` of `UNetMidBlock2DSimpleCrossAttn`; `null` means the single
    /// `only_cross_attention` bool, or false when that is a list.
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    /// Norm of the text states in `SimpleCrossAttn` attention: `null` or `"group_norm"`.
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    /// Heads of the attention pooling of `addition_embed_type="text"`.
    #[serde(default = "default_addition_embed_type_num_heads")]
    pub addition_embed_type_num_heads: i64,
}

/// The [`BlockType`] a down (`up == false`) or up block type name denotes.
fn parse_block_type(name: &str, up: bool, field: &str) -> Result<BlockType> {
    BlockType::parse(name, up).ok_or_else(|| {
        let supported = if up {
            "UpBlock2D, CrossAttnUpBlock2D, ResnetUpsampleBlock2D, SimpleCrossAttnUpBlock2D"
        } else {
            "DownBlock2D, CrossAttnDownBlock2D, ResnetDownsampleBlock2D, SimpleCrossAttnDownBlock2D"
        };
        Error::Config(format!(
            "{field}: unsupported block type {name:?} (supported: {supported})"
        ))
    })
}

/// The SDXL micro-conditioning (`added_cond_kwargs`) for `addition_embed_type="text_time"`.
#[derive(Debug)]
pub struct SdxlConditioning {
    /// Pooled text embeddings, `[batch, D]`.
    pub text_embeds: Tensor,
    /// Original size, crop offset and target size, `[batch, 6]` (refiner: `[batch, 5]`).
    pub time_ids: Tensor,
}

/// `encoder_hid_proj`: a linear projection of the text states (`text_proj`), diffusers'
/// `TextImageProjection` (`text_image_proj`) or `ImageProjection` (`image_proj`).
#[derive(Debug)]
enum EncoderHidProj {
    Text(Linear),
    TextImage(TextImageProjection),
    Image(ImageProjection),
}

/// Which `encoder_hid_proj` a config asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HidProjType {
    Text,
    TextImage,
    Image,
}

/// diffusers' `TextImageProjection` (models/embeddings.py): `num_image_text_embeds` (10) tokens
/// projected from the image embeddings, then the projected text states.
#[derive(Debug)]
struct TextImageProjection {
    image_embeds: Linear,
    text_proj: Linear,
    tokens: i64,
}

impl TextImageProjection {
    const NUM_IMAGE_TEXT_EMBEDS: i64 = 10;

    /// `image_embed_dim` is the cross-attention width, as diffusers' UNet builds it.
    fn new(vs: &nn::Path, text_embed_dim: i64, cross_attention_dim: i64) -> Self {
        let tokens = Self::NUM_IMAGE_TEXT_EMBEDS;
        Self {
            image_embeds: weights::linear(
                vs / "image_embeds",
                cross_attention_dim,
                tokens * cross_attention_dim,
                true,
            ),
            text_proj: weights::linear(vs / "text_proj", text_embed_dim, cross_attention_dim, true),
            tokens,
        }
    }

    fn forward(&self, text_states: &Tensor, image_embeds: &Tensor) -> Tensor {
        let batch = text_states.size()[0];
        let image_tokens =
            self.image_embeds
                .forward(image_embeds)
                .reshape([batch, self.tokens, -1]);
        Tensor::cat(&[image_tokens, self.text_proj.forward(text_states)], 1)
    }
}

/// diffusers' `ImageProjection` (models/embeddings.py): image embeddings to
/// `num_image_text_embeds` (32) layer-normed cross-attention tokens.
#[derive(Debug)]
struct ImageProjection {
    image_embeds: Linear,
    norm: nn::LayerNorm,
    tokens: i64,
}

impl ImageProjection {
    const NUM_IMAGE_TEXT_EMBEDS: i64 = 32;

    fn new(vs: &nn::Path, image_embed_dim: i64, cross_attention_dim: i64) -> Self {
        let tokens = Self::NUM_IMAGE_TEXT_EMBEDS;
        Self {
            image_embeds: weights::linear(
                vs / "image_embeds",
                image_embed_dim,
                tokens * cross_attention_dim,
                true,
            ),
            norm: weights::layer_norm(vs / "norm", cross_attention_dim, 1e-5),
            tokens,
        }
    }

    fn forward(&self, image_embeds: &Tensor) -> Tensor {
        let batch = image_embeds.size()[0];
        let xs = self
            .image_embeds
            .forward(image_embeds)
            .reshape([batch, self.tokens, -1]);
        self.norm.forward(&xs)
    }
}

/// diffusers' `ImageTimeEmbedding`: `image_norm(image_proj(x))`.
#[derive(Debug)]
struct ImageTimeEmbedding {
    image_proj: Linear,
    image_norm: nn::LayerNorm,
}

/// diffusers' `TextImageTimeEmbedding`: `image_proj(image) + text_norm(text_proj(text))`.
#[derive(Debug)]
struct TextImageTimeEmbedding {
    text_proj: Linear,
    text_norm: nn::LayerNorm,
    image_proj: Linear,
}

impl TextImageTimeEmbedding {
    /// Both embedding widths are the cross-attention width, as diffusers' UNet builds it.
    fn new(vs: &nn::Path, embed_dim: i64, time_embed_dim: i64) -> Self {
        Self {
            text_proj: weights::linear(vs / "text_proj", embed_dim, time_embed_dim, true),
            text_norm: weights::layer_norm(vs / "text_norm", time_embed_dim, 1e-5),
            image_proj: weights::linear(vs / "image_proj", embed_dim, time_embed_dim, true),
        }
    }

    fn forward(&self, text_embeds: &Tensor, image_embeds: &Tensor) -> Tensor {
        self.image_proj.forward(image_embeds)
            + self.text_norm.forward(&self.text_proj.forward(text_embeds))
    }
}

impl ImageTimeEmbedding {
    fn new(vs: &nn::Path, image_embed_dim: i64, time_embed_dim: i64) -> Self {
        Self {
            image_proj: weights::linear(vs / "image_proj", image_embed_dim, time_embed_dim, true),
            image_norm: weights::layer_norm(vs / "image_norm", time_embed_dim, 1e-5),
        }
    }

    fn forward(&self, image_embeds: &Tensor) -> Tensor {
        self.image_norm
            .forward(&self.image_proj.forward(image_embeds))
    }
}

/// diffusers' `add_embedding` for the conditioning `get_aug_embed` adds to the time embedding
/// in the model (SDXL's `text_time` lives in the shared down path).
#[derive(Debug)]
enum AugEmbedding {
    /// `addition_embed_type="image"`.
    Image(ImageTimeEmbedding),
    /// `addition_embed_type="text_image"`.
    TextImage(TextImageTimeEmbedding),
    /// `addition_embed_type="text"`, on the text states before `encoder_hid_proj`.
    Text(Box<TextTimeEmbedding>),
}

/// Optional inputs of [`UNet2DConditionModel::forward_with`].
#[derive(Debug, Default, Clone, Copy)]
pub struct UNetExtraInputs<'a> {
    /// SDXL micro-conditioning; required when the config has `addition_embed_type="text_time"`.
    pub added: Option<&'a SdxlConditioning>,
    /// CLIP image embeddings (`added_cond_kwargs["image_embeds"]`): `[batch, encoder_hid_dim]`
    /// for `addition_embed_type="image"` / `encoder_hid_dim_type="image_proj"` (Kandinsky 2.2),
    /// `[batch, cross_attention_dim]` for `"text_image"` / `"text_image_proj"` (Kandinsky 2.1).
    pub image_embeds: Option<&'a Tensor>,
    /// Pooled text embeddings `[batch, cross_attention_dim]` (`added_cond_kwargs["text_embeds"]`)
    /// for `addition_embed_type="text_image"` (Kandinsky 2.1).
    pub text_embeds: Option<&'a Tensor>,
    /// Guidance embedding for `time_cond_proj_dim` UNets (LCM), `[batch, time_cond_proj_dim]`.
    pub timestep_cond: Option<&'a Tensor>,
    /// Class labels, `[batch]` or `[1]`; required by `class_embed_type="timestep"` (IF stage II's
    /// noise level).
    pub class_labels: Option<&'a Tensor>,
    /// ControlNet residuals added to each skip connection (conv_in output first).
    pub down_block_additional_residuals: Option<&'a [Tensor]>,
    /// ControlNet residual added to the mid block output.
    pub mid_block_additional_residual: Option<&'a Tensor>,
}

/// diffusers' `UNet2DConditionModel`: predicts noise (or v) from a noisy latent, a timestep and
/// text embeddings.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    config: UNet2DConditionConfig,
    down: DownPath,
    encoder_hid_proj: Option<EncoderHidProj>,
    aug_embedding: Option<AugEmbedding>,
    time_embed_act: Option<Activation>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: nn::GroupNorm,
    conv_act: Activation,
    conv_out: Conv2d,
    var_store: Option<nn::VarStore>,
}

/// The half of a UNet that a ControlNet copies, at the same parameter paths: the time (and SDXL
/// added) embeddings, `conv_in`, the down blocks and the mid block.
#[derive(Debug)]
pub(crate) struct DownPath {
    in_channels: i64,
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    add_time_proj: Option<Timesteps>,
    add_embedding: Option<TimestepEmbedding>,
    /// `projection_class_embeddings_input_dim` when `add_embedding` exists.
    add_embedding_dim: Option<i64>,
    /// `class_embed_type="timestep"`.
    class_embedding: Option<TimestepEmbedding>,
    time_cond_proj_dim: Option<i64>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    /// Feature width `encoder_hidden_states` must have.
    context_dim: Option<i64>,
    kind: Kind,
    device: Device,
}

/// The per-block values of a validated config, as diffusers' `__init__` derives them.
#[derive(Debug)]
pub(crate) struct BlockPlan {
    act: Activation,
    post_act: Option<Activation>,
    time_embed_act: Option<Activation>,
    /// `encoder_hid_proj`: its type, input and output widths.
    encoder_hid_proj: Option<(HidProjType, i64, i64)>,
    /// SDXL `add_time_proj` width and `add_embedding` input width.
    add_embedding: Option<(i64, i64)>,
    /// `addition_embed_type="image"`: the image embedding width.
    image_time_embedding: Option<i64>,
    /// `addition_embed_type="text_image"`: the text and image embedding width.
    text_image_time_embedding: Option<i64>,
    /// `addition_embed_type="text"`: the text state width and the pooling heads.
    text_time_embedding: Option<(i64, i64)>,
    time_embedding_norm: TimeEmbeddingNorm,
    groups: i64,
    down_types: Vec<BlockType>,
    up_types: Vec<BlockType>,
    /// `None`: no mid block.
    mid_type: Option<BlockType>,
    only_cross: Vec<bool>,
    mid_only_cross: bool,
    /// `cross_attention_norm="group_norm"`.
    group_norm_cross: bool,
    heads: Vec<i64>,
    /// `attention_head_dim` per block: the head width of `SimpleCrossAttn` blocks.
    head_dims: Vec<i64>,
    cross_dims: Vec<i64>,
    layers: Vec<i64>,
    /// Transformer depth per layer of each down block, each up block (in up order), the mid block.
    down_tl: Vec<Vec<i64>>,
    up_tl: Vec<Vec<i64>>,
    mid_tl: Vec<i64>,
}

impl UNet2DConditionConfig {
    /// Checks the config and expands its per-block values, rejecting (by field name) whatever
    /// this implementation does not build.
    pub(crate) fn plan(&self) -> Result<BlockPlan> {
        let cfg = self;
        let n = cfg.down_block_types.len();
        let cerr = |m: String| Err(Error::Config(m));
        if n == 0 {
            return cerr("down_block_types: empty".into());
        }
        if cfg.up_block_types.len() != n {
            return cerr(format!(
                "up_block_types: {} entries but {n} down_block_types",
                cfg.up_block_types.len()
            ));
        }
        if cfg.block_out_channels.len() != n {
            return cerr(format!(
                "block_out_channels: {} entries but {n} down_block_types",
                cfg.block_out_channels.len()
            ));
        }
        let unsupported = |field: &str, value: &dyn std::fmt::Debug| {
            Err(Error::Config(format!(
                "{field}: {value:?} is not supported"
            )))
        };
        if cfg.time_embedding_type != "positional" {
            return unsupported("time_embedding_type", &cfg.time_embedding_type);
        }
        let time_embedding_norm = match cfg.resnet_time_scale_shift.as_str() {
            "default" => TimeEmbeddingNorm::Default,
            "scale_shift" => TimeEmbeddingNorm::ScaleShift,
            other => return unsupported("resnet_time_scale_shift", &other),
        };
        if cfg.attention_type != "default" {
            return unsupported("attention_type", &cfg.attention_type);
        }
        if cfg.dual_cross_attention {
            return unsupported("dual_cross_attention", &true);
        }
        if !matches!(cfg.class_embed_type.as_deref(), None | Some("timestep")) {
            return unsupported("class_embed_type", &cfg.class_embed_type);
        }
        let group_norm_cross = match cfg.cross_attention_norm.as_deref() {
            None => false,
            Some("group_norm") => true,
            Some(other) => return unsupported("cross_attention_norm", &other),
        };
        if cfg.num_class_embeds.is_some() {
            return unsupported("num_class_embeds", &cfg.num_class_embeds);
        }
        if cfg.class_embeddings_concat {
            return unsupported("class_embeddings_concat", &true);
        }
        let act = Activation::from_name(&cfg.act_fn, "act_fn")?;
        let Some(groups) = cfg.norm_num_groups else {
            return unsupported("norm_num_groups", &cfg.norm_num_groups);
        };
        if groups <= 0 {
            return cerr(format!("norm_num_groups: {groups} must be positive"));
        }
        for &c in &cfg.block_out_channels {
            if c <= 0 || c % groups != 0 {
                return cerr(format!(
                    "block_out_channels: {c} is not a positive multiple of norm_num_groups {groups}"
                ));
            }
        }
        for (field, k) in [
            ("conv_in_kernel", cfg.conv_in_kernel),
            ("conv_out_kernel", cfg.conv_out_kernel),
        ] {
            if k <= 0 || k % 2 == 0 {
                return cerr(format!("{field}: {k} must be a positive odd number"));
            }
        }
        for (field, c) in [
            ("in_channels", cfg.in_channels),
            ("out_channels", cfg.out_channels),
        ] {
            if c <= 0 {
                return cerr(format!("{field}: {c} must be positive"));
            }
        }

        let down_types = cfg
            .down_block_types
            .iter()
            .map(|t| parse_block_type(t, false, "down_block_types"))
            .collect::<Result<Vec<_>>>()?;
        let up_types = cfg
            .up_block_types
            .iter()
            .map(|t| parse_block_type(t, true, "up_block_types"))
            .collect::<Result<Vec<_>>>()?;
        let mid_type = match cfg.mid_block_type.as_deref() {
            None => None,
            Some(name) => match BlockType::parse_mid(name) {
                Some(t) => Some(t),
                None => return unsupported("mid_block_type", &name),
            },
        };

        let only_cross = cfg.only_cross_attention.expand(n, "only_cross_attention")?;
        let mid_only_cross = match (
            cfg.mid_block_only_cross_attention,
            &cfg.only_cross_attention,
        ) {
            (Some(m), _) => m,
            (None, PerBlock::One(b)) => *b,
            (None, PerBlock::Many(_)) => false,
        };
        let heads = match &cfg.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads")?,
            None => cfg.attention_head_dim.expand(n, "attention_head_dim")?,
        };
        let head_dims = cfg.attention_head_dim.expand(n, "attention_head_dim")?;
        let cross_dims = cfg.cross_attention_dim.expand(n, "cross_attention_dim")?;
        let layers = cfg.layers_per_block.expand(n, "layers_per_block")?;
        let transformer_layers = cfg
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")?;
        // Whether block level `i` builds an attention of type `t` from the per-block lists in
        // down order (the up path of `CrossAttn` blocks reads them reversed).
        let uses = |t: BlockType, i: usize| {
            down_types[i] == t
                || (i == n - 1 && mid_type == Some(t))
                || (t == BlockType::CrossAttn && up_types[n - 1 - i] == t)
        };
        for (i, (&h, &c)) in heads.iter().zip(&cfg.block_out_channels).enumerate() {
            if uses(BlockType::CrossAttn, i) && (h <= 0 || c % h != 0) {
                return cerr(format!(
                    "attention_head_dim: {h} heads do not divide the {c} channels of block {i}"
                ));
            }
        }
        // SimpleCrossAttn blocks take `attention_head_dim` as the head width; the up path reads
        // the list in down order (diffusers does not reverse it).
        for (i, &c) in cfg.block_out_channels.iter().enumerate() {
            let d = head_dims[i];
            let up_c = cfg.block_out_channels[n - 1 - i];
            let bad = |ch: i64| d <= 0 || ch % d != 0;
            if (uses(BlockType::SimpleCrossAttn, i) && bad(c))
                || (up_types[i] == BlockType::SimpleCrossAttn && bad(up_c))
            {
                return cerr(format!(
                    "attention_head_dim: head width {d} does not divide the channels of block {i}"
                ));
            }
        }
        if (down_types
            .iter()
            .chain(&up_types)
            .any(|&t| t == BlockType::SimpleCrossAttn)
            || mid_type == Some(BlockType::SimpleCrossAttn))
            && group_norm_cross
            && cross_dims.iter().any(|d| d % 32 != 0)
        {
            return cerr(format!(
                "cross_attention_dim: {cross_dims:?} must be multiples of 32 for cross_attention_norm \"group_norm\""
            ));
        }
        if layers.iter().any(|&l| l <= 0) {
            return cerr(format!("layers_per_block: {layers:?} must be positive"));
        }
        // Per-layer transformer depths of the down path (and, reversed, of the up path).
        let per_layer = |v: &PerBlock<i64>, count: i64, field: &str| -> Result<Vec<i64>> {
            let d = v.expand(count as usize, field)?;
            if d.iter().any(|&x| x <= 0) {
                return Err(Error::Config(format!("{field}: {d:?} must be positive")));
            }
            Ok(d)
        };
        let down_tl = transformer_layers
            .iter()
            .zip(&layers)
            .map(|(t, &l)| per_layer(t, l, "transformer_layers_per_block"))
            .collect::<Result<Vec<_>>>()?;
        let up_tl = match &cfg.reverse_transformer_layers_per_block {
            Some(r) => {
                if r.len() != n {
                    return cerr(format!(
                        "reverse_transformer_layers_per_block: {} entries for {n} up blocks",
                        r.len()
                    ));
                }
                r.iter()
                    .zip(layers.iter().rev())
                    .map(|(t, &l)| per_layer(t, l + 1, "reverse_transformer_layers_per_block"))
                    .collect::<Result<Vec<_>>>()?
            }
            None => {
                if matches!(&cfg.transformer_layers_per_block, PerBlock::Many(v) if v.iter().any(|x| matches!(x, PerBlock::Many(_))))
                {
                    return cerr("reverse_transformer_layers_per_block: required when transformer_layers_per_block lists per-layer depths".into());
                }
                transformer_layers
                    .iter()
                    .rev()
                    .zip(layers.iter().rev())
                    .map(|(t, &l)| per_layer(t, l + 1, "transformer_layers_per_block"))
                    .collect::<Result<Vec<_>>>()?
            }
        };
        let mid_tl = match transformer_layers.last() {
            Some(PerBlock::One(v)) => vec![*v],
            Some(PerBlock::Many(v)) => v.clone(),
            None => vec![1],
        };

        let post_act = cfg
            .timestep_post_act
            .as_deref()
            .map(|a| Activation::from_name(a, "timestep_post_act"))
            .transpose()?;
        let time_embed_act = cfg
            .time_embedding_act_fn
            .as_deref()
            .map(|a| Activation::from_name(a, "time_embedding_act_fn"))
            .transpose()?;
        let encoder_hid_proj = match (cfg.encoder_hid_dim_type.as_deref(), cfg.encoder_hid_dim) {
            (None, None) => None,
            (t @ (None | Some("text_proj" | "text_image_proj" | "image_proj")), Some(d)) => {
                let kind = match t {
                    Some("image_proj") => HidProjType::Image,
                    Some("text_image_proj") => HidProjType::TextImage,
                    _ => HidProjType::Text,
                };
                match cfg.cross_attention_dim {
                    PerBlock::One(ca) => Some((kind, d, ca)),
                    PerBlock::Many(_) => {
                        return unsupported(
                            "cross_attention_dim",
                            &"a per-block list with encoder_hid_dim",
                        )
                    }
                }
            }
            (Some(t), None) => {
                return cerr(format!(
                    "encoder_hid_dim: required when encoder_hid_dim_type is {t:?}"
                ))
            }
            (Some(t), Some(_)) => return unsupported("encoder_hid_dim_type", &t),
        };
        let text_time_embedding = match cfg.addition_embed_type.as_deref() {
            Some("text") => {
                let dim = match (cfg.encoder_hid_dim, &cfg.cross_attention_dim) {
                    (Some(d), _) => d,
                    (None, PerBlock::One(d)) => *d,
                    (None, PerBlock::Many(_)) => {
                        return unsupported(
                            "cross_attention_dim",
                            &"a per-block list with addition_embed_type \"text\"",
                        )
                    }
                };
                let heads = cfg.addition_embed_type_num_heads;
                if heads <= 0 || dim % heads != 0 {
                    return cerr(format!(
                        "addition_embed_type_num_heads: {heads} heads do not divide the text width {dim}"
                    ));
                }
                Some((dim, heads))
            }
            _ => None,
        };
        let image_time_embedding = match cfg.addition_embed_type.as_deref() {
            Some("image") => match cfg.encoder_hid_dim {
                Some(d) => Some(d),
                None => {
                    return cerr(
                        "encoder_hid_dim: required for addition_embed_type \"image\"".into(),
                    )
                }
            },
            _ => None,
        };
        let text_image_time_embedding = match cfg.addition_embed_type.as_deref() {
            Some("text_image") => match cfg.cross_attention_dim {
                PerBlock::One(ca) => Some(ca),
                PerBlock::Many(_) => {
                    return unsupported(
                        "cross_attention_dim",
                        &"a per-block list with addition_embed_type \"text_image\"",
                    )
                }
            },
            _ => None,
        };
        let add_embedding = match cfg.addition_embed_type.as_deref() {
            None | Some("image" | "text" | "text_image") => None,
            Some("text_time") => {
                let (Some(dim), Some(input_dim)) = (
                    cfg.addition_time_embed_dim,
                    cfg.projection_class_embeddings_input_dim,
                ) else {
                    return cerr(
                        "addition_time_embed_dim, projection_class_embeddings_input_dim: both \
                         required for addition_embed_type \"text_time\""
                            .into(),
                    );
                };
                Some((dim, input_dim))
            }
            Some(other) => return unsupported("addition_embed_type", &other),
        };

        Ok(BlockPlan {
            act,
            post_act,
            time_embed_act,
            encoder_hid_proj,
            add_embedding,
            image_time_embedding,
            text_image_time_embedding,
            text_time_embedding,
            time_embedding_norm,
            groups,
            down_types,
            up_types,
            mid_type,
            only_cross,
            mid_only_cross,
            group_norm_cross,
            heads,
            head_dims,
            cross_dims,
            layers,
            down_tl,
            up_tl,
            mid_tl,
        })
    }
}

impl DownPath {
    /// Declares the shared parameters under `vs` from a config already checked by `plan`.
    pub(crate) fn new(vs: &nn::Path, cfg: &UNet2DConditionConfig, plan: &BlockPlan) -> Self {
        let n = cfg.down_block_types.len();
        let b0 = cfg.block_out_channels[0];
        let time_embed_dim = cfg.time_embedding_dim.unwrap_or(b0 * 4);
        let time_proj = Timesteps::new(b0, cfg.flip_sin_to_cos, cfg.freq_shift);
        let time_embedding = TimestepEmbedding::new(
            &(vs / "time_embedding"),
            b0,
            time_embed_dim,
            plan.act,
            None,
            plan.post_act,
            cfg.time_cond_proj_dim,
        );
        let context_dim = match (cfg.encoder_hid_dim, &cfg.cross_attention_dim) {
            _ if matches!(plan.encoder_hid_proj, Some((HidProjType::Image, _, _))) => None,
            (Some(d), _) => Some(d),
            (None, PerBlock::One(d)) => Some(*d),
            (None, PerBlock::Many(v)) => v.first().copied().filter(|f| v.iter().all(|x| x == f)),
        };
        // SDXL: pooled text embeddings + `time_ids` projections, added to the time embedding.
        let add_time_proj = plan
            .add_embedding
            .map(|(dim, _)| Timesteps::new(dim, cfg.flip_sin_to_cos, cfg.freq_shift));
        let add_embedding = plan.add_embedding.map(|(_, input_dim)| {
            TimestepEmbedding::new(
                &(vs / "add_embedding"),
                input_dim,
                time_embed_dim,
                Activation::Silu,
                None,
                None,
                None,
            )
        });
        let class_embedding = (cfg.class_embed_type.as_deref() == Some("timestep")).then(|| {
            TimestepEmbedding::new(
                &(vs / "class_embedding"),
                b0,
                time_embed_dim,
                plan.act,
                None,
                None,
                None,
            )
        });
        let conv_in = weights::conv2d(
            vs / "conv_in",
            cfg.in_channels,
            b0,
            cfg.conv_in_kernel,
            1,
            (cfg.conv_in_kernel - 1) / 2,
        );
        let resnet = plan.resnet_settings(cfg);
        let mut down_blocks = Vec::with_capacity(n);
        let mut output_channel = b0;
        for i in 0..n {
            let input_channel = output_channel;
            output_channel = cfg.block_out_channels[i];
            let block = plan.down_types[i];
            let attention = plan.attention(
                cfg,
                block,
                i,
                i,
                plan.down_tl[i].clone(),
                plan.only_cross[i],
            );
            down_blocks.push(DownBlock::new(
                &(vs / "down_blocks" / i),
                &DownBlockConfig {
                    block,
                    in_channels: input_channel,
                    out_channels: output_channel,
                    num_layers: plan.layers[i],
                    add_downsample: i + 1 < n,
                    downsample_padding: cfg.downsample_padding,
                },
                &resnet,
                attention.as_ref(),
            ));
        }
        // Mid block. diffusers builds the mid transformer without `only_cross_attention`.
        let last = n - 1;
        let mid_block = plan.mid_type.map(|block| {
            let only_cross = block == BlockType::SimpleCrossAttn && plan.mid_only_cross;
            let attention = plan.attention(cfg, block, last, last, plan.mid_tl.clone(), only_cross);
            MidBlock::new(
                &(vs / "mid_block"),
                cfg.block_out_channels[last],
                cfg.mid_block_scale_factor,
                block,
                &resnet,
                attention.as_ref(),
            )
        });
        Self {
            in_channels: cfg.in_channels,
            conv_in,
            time_proj,
            time_embedding,
            add_time_proj,
            add_embedding_dim: plan.add_embedding.map(|(_, d)| d),
            add_embedding,
            class_embedding,
            time_cond_proj_dim: cfg.time_cond_proj_dim,
            down_blocks,
            mid_block,
            context_dim,
            kind: vs.kind(),
            device: vs.device(),
        }
    }

    /// How many skip connections the down path produces (`conv_in` output first).
    pub(crate) fn num_residuals(&self) -> usize {
        1 + self
            .down_blocks
            .iter()
            .map(DownBlock::num_outputs)
            .sum::<usize>()
    }

    /// The dtype of the parameters.
    pub(crate) fn kind(&self) -> Kind {
        self.kind
    }

    /// The device of the parameters.
    pub(crate) fn device(&self) -> Device {
        self.device
    }

    /// Moves a float input to the model's device and dtype.
    pub(crate) fn to_model(&self, t: &Tensor) -> Tensor {
        t.to_device_(self.device, self.kind, false, false)
    }

    /// Checks the inputs both models take (sample, timestep, text, SDXL and class conditioning);
    /// `encoder_hidden_states` is checked when given (callers check that it is given when needed).
    pub(crate) fn check_inputs(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: Option<&Tensor>,
        added: Option<&SdxlConditioning>,
        timestep_cond: Option<&Tensor>,
        class_labels: Option<&Tensor>,
    ) -> Result<()> {
        let ierr = |m: String| Err(Error::Input(m));
        let s = sample.size();
        if s.len() != 4 || s[1] != self.in_channels {
            return ierr(format!(
                "sample: shape {s:?}, expected [batch, {}, height, width]",
                self.in_channels
            ));
        }
        let batch = s[0];
        if !sample.is_floating_point() {
            return ierr(format!(
                "sample: dtype {:?} is not a float type",
                sample.kind()
            ));
        }
        let t = timestep.size();
        let t_ok = match t[..] {
            [] => true,
            [len] => len == 1 || len == batch,
            _ => false,
        };
        if !t_ok {
            return ierr(format!(
                "timestep: shape {t:?}, expected a scalar, [1] or [{batch}]"
            ));
        }
        if let Some(e) = encoder_hidden_states.map(Tensor::size) {
            let e_ok = e.len() == 3 && e[0] == batch && self.context_dim.is_none_or(|d| e[2] == d);
            if !e_ok {
                let dim = self
                    .context_dim
                    .map_or_else(|| "dim".to_string(), |d| d.to_string());
                return ierr(format!(
                    "encoder_hidden_states: shape {e:?}, expected [{batch}, tokens, {dim}]"
                ));
            }
        }
        if let (Some(add_proj), Some(add_emb_dim)) = (&self.add_time_proj, self.add_embedding_dim) {
            let Some(added) = added else {
                return ierr(
                    "added: this model (addition_embed_type \"text_time\") needs text_embeds and time_ids"
                        .into(),
                );
            };
            let te = added.text_embeds.size();
            let ti = added.time_ids.size();
            let per_id = add_proj.num_channels();
            let ok = te.len() == 2
                && ti.len() == 2
                && te[0] == batch
                && ti[0] == batch
                && te[1] + ti[1] * per_id == add_emb_dim;
            if !ok {
                return ierr(format!(
                    "added: text_embeds {te:?} and time_ids {ti:?} do not fit batch {batch} and \
                     projection_class_embeddings_input_dim {add_emb_dim} ({per_id} features per time id)"
                ));
            }
        }
        if let (Some(tc), Some(dim)) = (timestep_cond, self.time_cond_proj_dim) {
            let ts = tc.size();
            if ts.len() != 2 || ts[1] != dim || (ts[0] != batch && ts[0] != 1) {
                return ierr(format!(
                    "timestep_cond: shape {ts:?}, expected [{batch}, {dim}]"
                ));
            }
        }
        if self.class_embedding.is_some() {
            match class_labels.map(Tensor::size) {
                Some(c) if c.len() == 1 && (c[0] == batch || c[0] == 1) => {}
                Some(c) => {
                    return ierr(format!(
                        "class_labels: shape {c:?}, expected [{batch}] or [1]"
                    ))
                }
                None => {
                    return ierr(
                        "class_labels: this model (class_embed_type \"timestep\") needs them"
                            .into(),
                    )
                }
            }
        }
        Ok(())
    }

    /// The time embedding plus the class embedding (`class_embed_type="timestep"`) and, for
    /// SDXL, the added `text_time` embedding.
    pub(crate) fn embed(
        &self,
        timestep: &Tensor,
        batch: i64,
        added: Option<&SdxlConditioning>,
        timestep_cond: Option<&Tensor>,
        class_labels: Option<&Tensor>,
    ) -> Tensor {
        let (kind, device) = (self.kind, self.device);
        let timesteps = timestep
            .to_device(device)
            .reshape([-1])
            .expand([batch], false);
        let t_emb = self.time_proj.forward(&timesteps).to_kind(kind);
        let timestep_cond = timestep_cond.map(|t| self.to_model(t));
        let mut emb = self.time_embedding.forward(&t_emb, timestep_cond.as_ref());
        if let (Some(class_embedding), Some(labels)) = (&self.class_embedding, class_labels) {
            let labels = self
                .time_proj
                .forward(&labels.to_device(device))
                .to_kind(kind);
            emb += class_embedding.forward(&labels, None);
        }
        if let (Some(add_proj), Some(add_emb), Some(added)) =
            (&self.add_time_proj, &self.add_embedding, added)
        {
            let time_ids = added.time_ids.to_device(device);
            let time_embeds = add_proj
                .forward(&time_ids.flatten(0, -1))
                .reshape([batch, -1])
                .to_kind(kind);
            let add_embeds = Tensor::cat(&[self.to_model(&added.text_embeds), time_embeds], -1);
            emb += add_emb.forward(&add_embeds, None);
        }
        emb
    }

    /// The sample in the model's layout (channels-last on CPU, matching the weights).
    pub(crate) fn input(&self, sample: &Tensor) -> Tensor {
        if weights::use_channels_last(self.device) {
            weights::channels_last(&self.to_model(sample))
        } else {
            self.to_model(sample)
        }
    }

    /// `conv_in`.
    pub(crate) fn conv_in(&self, sample: &Tensor) -> Tensor {
        self.conv_in.forward(sample)
    }

    /// The down blocks from `conv_in`'s output `xs`: the last output and every skip connection
    /// (`xs` itself first).
    pub(crate) fn down(
        &self,
        xs: Tensor,
        emb: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> (Tensor, Vec<Tensor>) {
        let mut res_samples = Vec::with_capacity(self.num_residuals());
        res_samples.push(xs.shallow_clone());
        let mut xs = xs;
        for block in &self.down_blocks {
            let (out, res) = block.forward(&xs, emb, encoder_hidden_states);
            xs = out;
            res_samples.extend(res);
        }
        (xs, res_samples)
    }

    /// The mid block (the identity when the config has none).
    pub(crate) fn mid(&self, xs: Tensor, emb: &Tensor, encoder_hidden_states: &Tensor) -> Tensor {
        match &self.mid_block {
            Some(mid) => mid.forward(&xs, emb, encoder_hidden_states),
            None => xs,
        }
    }
}

impl BlockPlan {
    fn resnet_settings(&self, cfg: &UNet2DConditionConfig) -> ResnetSettings {
        let b0 = cfg.block_out_channels[0];
        ResnetSettings {
            temb_channels: cfg.time_embedding_dim.unwrap_or(b0 * 4),
            groups: self.groups,
            eps: cfg.norm_eps,
            act: self.act,
            time_embedding_norm: self.time_embedding_norm,
            skip_time_act: cfg.resnet_skip_time_act,
            out_scale_factor: cfg.resnet_out_scale_factor,
        }
    }

    /// The attention settings of a `block` at level `i` (per-block lists in down order);
    /// `head_index` picks `attention_head_dim` for `SimpleCrossAttn` blocks, which diffusers
    /// indexes by the block's position in its own path.
    fn attention(
        &self,
        cfg: &UNet2DConditionConfig,
        block: BlockType,
        i: usize,
        head_index: usize,
        transformer_layers: Vec<i64>,
        only_cross_attention: bool,
    ) -> Option<BlockAttention> {
        match block {
            BlockType::CrossAttn => Some(BlockAttention::Transformer(CrossAttnSettings {
                transformer_layers,
                num_attention_heads: self.heads[i],
                cross_attention_dim: self.cross_dims[i],
                use_linear_projection: cfg.use_linear_projection,
                only_cross_attention,
                upcast_attention: cfg.upcast_attention,
            })),
            BlockType::SimpleCrossAttn => Some(BlockAttention::Simple(SimpleCrossAttnSettings {
                attention_head_dim: self.head_dims[head_index],
                cross_attention_dim: self.cross_dims[i],
                only_cross_attention,
                group_norm_cross: self.group_norm_cross,
            })),
            BlockType::Plain | BlockType::ResnetResample => None,
        }
    }
}

impl UNet2DConditionModel {
    /// Declares the model's parameters under `vs` (at the checkpoint's key paths), rejecting
    /// config values this implementation does not support.
    pub fn new(vs: &nn::Path, config: UNet2DConditionConfig) -> Result<Self> {
        let cfg = &config;
        let plan = cfg.plan()?;
        let down = DownPath::new(vs, cfg, &plan);
        let n = cfg.down_block_types.len();
        let b0 = cfg.block_out_channels[0];
        let time_embed_dim = cfg.time_embedding_dim.unwrap_or(b0 * 4);
        let encoder_hid_proj = plan.encoder_hid_proj.map(|(kind, d, ca)| {
            let vs = vs / "encoder_hid_proj";
            match kind {
                HidProjType::Image => EncoderHidProj::Image(ImageProjection::new(&vs, d, ca)),
                HidProjType::TextImage => {
                    EncoderHidProj::TextImage(TextImageProjection::new(&vs, d, ca))
                }
                HidProjType::Text => EncoderHidProj::Text(weights::linear(vs, d, ca, true)),
            }
        });
        let aug_embedding = match (
            plan.image_time_embedding,
            plan.text_image_time_embedding,
            plan.text_time_embedding,
        ) {
            (Some(d), _, _) => Some(AugEmbedding::Image(ImageTimeEmbedding::new(
                &(vs / "add_embedding"),
                d,
                time_embed_dim,
            ))),
            (None, Some(d), _) => Some(AugEmbedding::TextImage(TextImageTimeEmbedding::new(
                &(vs / "add_embedding"),
                d,
                time_embed_dim,
            ))),
            (None, None, Some((d, heads))) => Some(AugEmbedding::Text(Box::new(
                TextTimeEmbedding::new(&(vs / "add_embedding"), d, time_embed_dim, heads),
            ))),
            (None, None, None) => None,
        };
        let resnet = plan.resnet_settings(cfg);

        // Up path: per-block lists reversed.
        let rev_channels: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut output_channel = rev_channels[0];
        for i in 0..n {
            let prev_output_channel = output_channel;
            output_channel = rev_channels[i];
            let input_channel = rev_channels[(i + 1).min(n - 1)];
            let j = n - 1 - i;
            let block = plan.up_types[i];
            let attention =
                plan.attention(cfg, block, j, i, plan.up_tl[i].clone(), plan.only_cross[j]);
            up_blocks.push(UpBlock::new(
                &(vs / "up_blocks" / i),
                &UpBlockConfig {
                    block,
                    in_channels: input_channel,
                    prev_output_channel,
                    out_channels: output_channel,
                    num_layers: plan.layers[j] + 1,
                    add_upsample: i + 1 < n,
                },
                &resnet,
                attention.as_ref(),
            ));
        }

        let conv_norm_out =
            weights::group_norm(vs / "conv_norm_out", plan.groups, b0, cfg.norm_eps);
        let conv_out = weights::conv2d(
            vs / "conv_out",
            b0,
            cfg.out_channels,
            cfg.conv_out_kernel,
            1,
            (cfg.conv_out_kernel - 1) / 2,
        );

        Ok(Self {
            down,
            encoder_hid_proj,
            aug_embedding,
            time_embed_act: plan.time_embed_act,
            up_blocks,
            conv_norm_out,
            conv_act: plan.act,
            conv_out,
            var_store: None,
            config,
        })
    }

    /// Loads `unet/config.json` and the (optionally `variant`) safetensors weights of
    /// `component_dir` into a model of `kind` on `device`.
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
            &|name| name.to_string(),
            weights::Layout::ChannelsLast,
            |p, config: UNet2DConditionConfig| Self::new(p, config),
        )?;
        model.var_store = Some(vs);
        Ok(model)
    }

    /// The config the model was built from.
    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// The dtype of the model's parameters (and of its output).
    pub fn kind(&self) -> Kind {
        self.down.kind()
    }

    /// The device the model's parameters live on.
    pub fn device(&self) -> Device {
        self.down.device()
    }

    /// The var store holding the parameters, when the model was built by [`Self::load`].
    pub fn var_store(&self) -> Option<&nn::VarStore> {
        self.var_store.as_ref()
    }

    /// How many skip connections the down path produces (the length ControlNet residuals need).
    pub fn num_down_block_residuals(&self) -> usize {
        self.down.num_residuals()
    }

    /// Predicts the model output for `sample` (`[batch, in_channels, h, w]`) at `timestep`
    /// (0-d or `[batch]`/`[1]`, float or int) given `encoder_hidden_states`
    /// (`[batch, tokens, cross_attention_dim]`) and, for SDXL, `added` conditioning.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&SdxlConditioning>,
    ) -> Result<Tensor> {
        let extra = UNetExtraInputs {
            added,
            ..Default::default()
        };
        self.forward_with(sample, timestep, Some(encoder_hidden_states), &extra)
    }

    /// [`Self::forward`] with ControlNet residuals added to the skip connections and mid block.
    pub fn forward_with_residuals(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&SdxlConditioning>,
        down_block_additional_residuals: Option<&[Tensor]>,
        mid_block_additional_residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let extra = UNetExtraInputs {
            added,
            down_block_additional_residuals,
            mid_block_additional_residual,
            ..Default::default()
        };
        self.forward_with(sample, timestep, Some(encoder_hidden_states), &extra)
    }

    /// The full forward pass. Inputs are moved to the model's device and dtype; shapes are
    /// checked first, and a libtorch failure (e.g. out of memory) comes back as
    /// [`Error::Torch`] rather than a panic. `encoder_hidden_states` is `None` only for
    /// `encoder_hid_dim_type="image_proj"` UNets, which make it from `extra.image_embeds`.
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: Option<&Tensor>,
        extra: &UNetExtraInputs,
    ) -> Result<Tensor> {
        self.check_inputs(sample, timestep, encoder_hidden_states, extra)?;
        let run = || {
            let _guard = tch::no_grad_guard();
            self.forward_unchecked(sample, timestep, encoder_hidden_states, extra)
        };
        match catch_unwind(AssertUnwindSafe(run)) {
            Ok(result) => result,
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "UNet forward panicked".to_string());
                Err(Error::Torch(tch::TchError::Torch(msg)))
            }
        }
    }

    fn check_inputs(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: Option<&Tensor>,
        extra: &UNetExtraInputs,
    ) -> Result<()> {
        let ierr = |m: String| Err(Error::Input(m));
        let image_proj = matches!(self.encoder_hid_proj, Some(EncoderHidProj::Image(_)));
        self.down.check_inputs(
            sample,
            timestep,
            encoder_hidden_states,
            extra.added,
            extra.timestep_cond,
            extra.class_labels,
        )?;
        let batch = sample.size()[0];
        let text_image_time = matches!(self.aug_embedding, Some(AugEmbedding::TextImage(_)));
        let text_image =
            text_image_time || matches!(self.encoder_hid_proj, Some(EncoderHidProj::TextImage(_)));
        // Kandinsky 2.1's embeddings have the cross-attention width, 2.2's `encoder_hid_dim`.
        let embed_dim = match &self.config.cross_attention_dim {
            PerBlock::One(ca) if text_image => *ca,
            _ => self.config.encoder_hid_dim.unwrap_or_default(),
        };
        let check_embeds =
            |name: &str, given: Option<&Tensor>, needed_by: &str| match given.map(Tensor::size) {
                Some(i) if i.len() == 2 && i[0] == batch && i[1] == embed_dim => Ok(()),
                Some(i) => ierr(format!(
                    "{name}: shape {i:?}, expected [{batch}, {embed_dim}]"
                )),
                None => ierr(format!("{name}: this UNet ({needed_by}) needs them")),
            };
        let image_time = matches!(self.aug_embedding, Some(AugEmbedding::Image(_)));
        if image_proj || text_image || image_time {
            check_embeds(
                "image_embeds",
                extra.image_embeds,
                "addition_embed_type \"image\"/\"text_image\" or encoder_hid_dim_type \"image_proj\"/\"text_image_proj\"",
            )?;
        }
        if text_image_time {
            check_embeds(
                "text_embeds",
                extra.text_embeds,
                "addition_embed_type \"text_image\"",
            )?;
        }
        if encoder_hidden_states.is_none() && !image_proj {
            return ierr("encoder_hidden_states: required by this UNet".into());
        }
        match (
            extra.down_block_additional_residuals,
            extra.mid_block_additional_residual,
        ) {
            (None, None) => {}
            (Some(down), Some(_)) => {
                let want = self.num_down_block_residuals();
                if down.len() != want {
                    return ierr(format!(
                        "down_block_additional_residuals: {} tensors, this UNet has {want} skip connections",
                        down.len()
                    ));
                }
            }
            _ => {
                return ierr(
                    "down_block_additional_residuals and mid_block_additional_residual must be given together"
                        .into(),
                )
            }
        }
        Ok(())
    }

    fn forward_unchecked(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: Option<&Tensor>,
        extra: &UNetExtraInputs,
    ) -> Result<Tensor> {
        let mut sample = self.down.input(sample);
        let size = sample.size();
        let (batch, height, width) = (size[0], size[2], size[3]);
        let encoder_hidden_states = encoder_hidden_states.map(|e| self.down.to_model(e));
        let image_embeds = extra.image_embeds.map(|e| self.down.to_model(e));

        // Upsampling sizes must be forced when the sample is not a multiple of the overall factor.
        let up_factor = 1i64 << self.up_blocks.len().saturating_sub(1);
        let forward_upsample_size = height % up_factor != 0 || width % up_factor != 0;

        if self.config.center_input_sample {
            sample = sample * 2.0 - 1.0;
        }

        // 1. time
        let mut emb = self.down.embed(
            timestep,
            batch,
            extra.added,
            extra.timestep_cond,
            extra.class_labels,
        );
        match (&self.aug_embedding, &image_embeds, &encoder_hidden_states) {
            (Some(AugEmbedding::Image(image_time)), Some(image_embeds), _) => {
                emb += image_time.forward(image_embeds);
            }
            (Some(AugEmbedding::TextImage(text_image)), Some(image_embeds), _) => {
                let text_embeds = extra
                    .text_embeds
                    .ok_or_else(|| Error::Input("text_embeds: required".into()))?;
                emb += text_image.forward(&self.down.to_model(text_embeds), image_embeds);
            }
            (Some(AugEmbedding::Text(text_time)), _, Some(text)) => {
                emb += text_time.forward(text);
            }
            _ => {}
        }
        if let Some(act) = self.time_embed_act {
            emb = act.forward(&emb);
        }
        let encoder_hidden_states = match (&self.encoder_hid_proj, encoder_hidden_states) {
            (Some(EncoderHidProj::Image(proj)), _) => match &image_embeds {
                Some(image_embeds) => proj.forward(image_embeds),
                None => return Err(Error::Input("image_embeds: required".into())),
            },
            (Some(EncoderHidProj::TextImage(proj)), Some(e)) => match &image_embeds {
                Some(image_embeds) => proj.forward(&e, image_embeds),
                None => return Err(Error::Input("image_embeds: required".into())),
            },
            (Some(EncoderHidProj::Text(proj)), Some(e)) => proj.forward(&e),
            (None, Some(e)) => e,
            (_, None) => return Err(Error::Input("encoder_hidden_states: required".into())),
        };

        // 2. pre-process
        let xs = self.down.conv_in(&sample);

        // 3. down
        let (xs, mut res_samples) = self.down.down(xs, &emb, &encoder_hidden_states);
        if let Some(down_residuals) = extra.down_block_additional_residuals {
            for (i, (res, add)) in res_samples.iter_mut().zip(down_residuals).enumerate() {
                if !residual_fits(add, res) {
                    return Err(Error::Input(format!(
                        "down_block_additional_residuals[{i}]: shape {:?}, expected {:?}",
                        add.size(),
                        res.size()
                    )));
                }
                *res = &*res + self.down.to_model(add);
            }
        }

        // 4. mid
        let mut xs = self.down.mid(xs, &emb, &encoder_hidden_states);
        if let Some(add) = extra.mid_block_additional_residual {
            if !residual_fits(add, &xs) {
                return Err(Error::Input(format!(
                    "mid_block_additional_residual: shape {:?}, expected {:?}",
                    add.size(),
                    xs.size()
                )));
            }
            // Not in place: without a mid block `xs` is also the last skip connection.
            xs = &xs + self.down.to_model(add);
        }

        // 5. up
        let last = self.up_blocks.len().saturating_sub(1);
        for (i, block) in self.up_blocks.iter().enumerate() {
            let take = block.num_inputs().min(res_samples.len());
            let res = res_samples.split_off(res_samples.len() - take);
            let upsample_size = match res_samples.last() {
                Some(next) if i < last && forward_upsample_size => {
                    let s = next.size();
                    Some((s[2], s[3]))
                }
                _ => None,
            };
            xs = block.forward(&xs, &res, &emb, &encoder_hidden_states, upsample_size);
        }

        // 6. post-process
        let xs = self.conv_act.forward(&self.conv_norm_out.forward(&xs));
        Ok(self.conv_out.forward(&xs).contiguous())
    }
}

/// Whether a ControlNet residual adds to `target`: the same shape, or pooled to 1x1
/// (`global_pool_conditions`), which broadcasts over the spatial dimensions.
fn residual_fits(residual: &Tensor, target: &Tensor) -> bool {
    let (r, t) = (residual.size(), target.size());
    r.len() == 4 && r[..2] == t[..2] && ((r[2] == t[2] && r[3] == t[3]) || (r[2] == 1 && r[3] == 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// stabilityai/stable-diffusion-xl-base-1.0 unet/config.json.
    const SDXL_BASE: &str = r#"{
      "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0",
      "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
      "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
      "block_out_channels": [320, 640, 1280], "center_input_sample": false,
      "class_embed_type": null, "class_embeddings_concat": false, "conv_in_kernel": 3,
      "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": null,
      "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
      "downsample_padding": 1, "dual_cross_attention": false, "encoder_hid_dim": null,
      "encoder_hid_dim_type": null, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
      "layers_per_block": 2, "mid_block_only_cross_attention": null, "mid_block_scale_factor": 1,
      "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
      "num_attention_heads": null, "num_class_embeds": null, "only_cross_attention": false,
      "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
      "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": false,
      "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": null,
      "time_embedding_act_fn": null, "time_embedding_dim": null,
      "time_embedding_type": "positional", "timestep_post_act": null,
      "transformer_layers_per_block": [1, 2, 10],
      "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
      "upcast_attention": null, "use_linear_projection": true
    }"#;

    /// CompVis/stable-diffusion-v1-4 unet/config.json as diffusers 0.2 wrote it (most fields absent).
    const SD14_OLD: &str = r#"{
      "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.2.2", "act_fn": "silu",
      "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
      "center_input_sample": false, "cross_attention_dim": 768,
      "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
      "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
      "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
      "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    }"#;

    #[test]
    fn sdxl_base_config_plans_like_diffusers() {
        let cfg: UNet2DConditionConfig = serde_json::from_str(SDXL_BASE).expect("parse");
        assert!(!cfg.upcast_attention);
        let plan = cfg.plan().expect("plan");
        assert_eq!(plan.heads, vec![5, 10, 20]);
        use BlockType::{CrossAttn, Plain};
        assert_eq!(plan.down_types, vec![Plain, CrossAttn, CrossAttn]);
        assert_eq!(plan.up_types, vec![CrossAttn, CrossAttn, Plain]);
        assert_eq!(plan.down_tl, vec![vec![1, 1], vec![2, 2], vec![10, 10]]);
        assert_eq!(plan.up_tl, vec![vec![10; 3], vec![2; 3], vec![1; 3]]);
        assert_eq!(plan.mid_tl, vec![10]);
        assert_eq!(plan.add_embedding, Some((256, 2816)));
        assert_eq!(plan.mid_type, Some(CrossAttn));
    }

    #[test]
    fn old_sd14_config_takes_diffusers_defaults() {
        let cfg: UNet2DConditionConfig = serde_json::from_str(SD14_OLD).expect("parse");
        assert_eq!(
            cfg.mid_block_type.as_deref(),
            Some("UNetMidBlock2DCrossAttn")
        );
        assert_eq!(cfg.time_embedding_type, "positional");
        let plan = cfg.plan().expect("plan");
        assert_eq!(plan.heads, vec![8; 4]);
        assert_eq!(plan.cross_dims, vec![768; 4]);
        assert_eq!(plan.up_tl, vec![vec![1; 3]; 4]);
        assert!(plan.add_embedding.is_none() && plan.encoder_hid_proj.is_none());
    }

    #[test]
    fn null_mid_block_type_means_no_mid_block() {
        let mut v: serde_json::Value = serde_json::from_str(SD14_OLD).expect("parse");
        v["mid_block_type"] = serde_json::Value::Null;
        let cfg: UNet2DConditionConfig = serde_json::from_value(v).expect("parse");
        assert_eq!(cfg.plan().expect("plan").mid_type, None);
    }
}
