//! CLIP text and image encoders, following transformers' `models/clip/modeling_clip.py`
//! (`CLIPTextModel`, `CLIPTextModelWithProjection`, `CLIPVisionTransformer` (= `CLIPVisionModel`),
//! `CLIPVisionModelWithProjection`) and
//! `configuration_clip.py` (`CLIPTextConfig`, `CLIPVisionConfig`).
//!
//! Forward passes take `&self` and never mutate weights, so one loaded model serves many threads;
//! running them under `tch::no_grad` is the caller's job (loaded weights are frozen, so no graph
//! is recorded either way).

use crate::layers::Linear;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::weights;

fn default_vocab_size() -> i64 {
    49408
}
fn default_hidden_size() -> i64 {
    512
}
fn default_intermediate_size() -> i64 {
    2048
}
fn default_projection_dim() -> Option<i64> {
    Some(512)
}
fn default_num_hidden_layers() -> i64 {
    12
}
fn default_num_attention_heads() -> i64 {
    8
}
fn default_max_position_embeddings() -> i64 {
    77
}
fn default_hidden_act() -> Activation {
    Activation::QuickGelu
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_pad_token_id() -> Option<i64> {
    Some(1)
}
fn default_bos_token_id() -> Option<i64> {
    Some(49406)
}
fn default_eos_token_id() -> i64 {
    49407
}

/// The MLP activation named by `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`, OpenAI CLIP's (SD 1.x / 2.x `text_encoder`).
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact (erf) GELU (SDXL's `text_encoder_2`, OpenCLIP).
    #[serde(rename = "gelu")]
    Gelu,
    /// Tanh-approximated GELU.
    #[serde(rename = "gelu_pytorch_tanh", alias = "gelu_new")]
    GeluTanh,
}

impl Activation {
    pub(crate) fn forward(self, xs: &Tensor) -> Tensor {
        match self {
            Activation::QuickGelu => xs * (xs * 1.702).sigmoid(),
            Activation::Gelu => xs.gelu("none"),
            Activation::GeluTanh => xs.gelu("tanh"),
        }
    }
}

/// Mirror of `text_encoder/config.json` (`CLIPTextConfig`), with transformers' defaults for omitted fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CLIPTextConfig {
    /// Size of the token embedding table.
    #[serde(default = "default_vocab_size")]
    pub vocab_size: i64,
    /// Width of the transformer.
    #[serde(default = "default_hidden_size")]
    pub hidden_size: i64,
    /// Width of the MLP.
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: i64,
    /// Output width of `text_projection` (required by `CLIPTextModelWithProjection`).
    #[serde(default = "default_projection_dim")]
    pub projection_dim: Option<i64>,
    /// Number of encoder layers.
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: i64,
    /// Attention heads per layer.
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: i64,
    /// Longest accepted sequence (77 for SD).
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: i64,
    /// MLP activation.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: Activation,
    /// Epsilon of every layer norm.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Padding token id.
    #[serde(default = "default_pad_token_id")]
    pub pad_token_id: Option<i64>,
    /// Start-of-text token id.
    #[serde(default = "default_bos_token_id")]
    pub bos_token_id: Option<i64>,
    /// End-of-text token id; `2` selects the legacy argmax pooling.
    #[serde(default = "default_eos_token_id")]
    pub eos_token_id: i64,
}

impl Default for CLIPTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: default_vocab_size(),
            hidden_size: default_hidden_size(),
            intermediate_size: default_intermediate_size(),
            projection_dim: default_projection_dim(),
            num_hidden_layers: default_num_hidden_layers(),
            num_attention_heads: default_num_attention_heads(),
            max_position_embeddings: default_max_position_embeddings(),
            hidden_act: default_hidden_act(),
            layer_norm_eps: default_layer_norm_eps(),
            pad_token_id: default_pad_token_id(),
            bos_token_id: default_bos_token_id(),
            eos_token_id: default_eos_token_id(),
        }
    }
}

impl CLIPTextConfig {
    fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v <= 0 {
                return Err(Error::Config(format!("{name} must be positive, got {v}")));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::Config(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        Ok(())
    }
}

/// What [`CLIPTextModel::forward`] returns (transformers' `BaseModelOutputWithPooling` with hidden states).
#[derive(Debug)]
pub struct CLIPTextOutput {
    /// Final-layer-normed output of the last layer, `[B, T, hidden]`.
    pub last_hidden_state: Tensor,
    /// `last_hidden_state` at each sequence's end-of-text token, `[B, hidden]`.
    pub pooler_output: Tensor,
    /// As `output_hidden_states=True`: the embeddings, then each layer's output (not final-normed).
    pub hidden_states: Vec<Tensor>,
}

/// What [`CLIPTextModelWithProjection::forward`] returns (transformers' `CLIPTextModelOutput`).
#[derive(Debug)]
pub struct CLIPTextModelOutput {
    /// `text_projection(pooler_output)`, `[B, projection_dim]`.
    pub text_embeds: Tensor,
    /// Final-layer-normed output of the last layer, `[B, T, hidden]`.
    pub last_hidden_state: Tensor,
    /// The embeddings, then each layer's output (not final-normed).
    pub hidden_states: Vec<Tensor>,
}

#[derive(Debug)]
struct CLIPTextEmbeddings {
    token_embedding: nn::Embedding,
    position_embedding: nn::Embedding,
}

impl CLIPTextEmbeddings {
    fn new(vs: nn::Path, cfg: &CLIPTextConfig) -> Self {
        Self {
            token_embedding: weights::embedding(
                &vs / "token_embedding",
                cfg.vocab_size,
                cfg.hidden_size,
            ),
            position_embedding: weights::embedding(
                &vs / "position_embedding",
                cfg.max_position_embeddings,
                cfg.hidden_size,
            ),
        }
    }

    fn forward(&self, input_ids: &Tensor) -> Tensor {
        let seq_len = input_ids.size()[1];
        let positions = Tensor::arange(seq_len, (Kind::Int64, input_ids.device())).unsqueeze(0);
        self.token_embedding.forward(input_ids) + self.position_embedding.forward(&positions)
    }
}

#[derive(Debug)]
struct CLIPAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: i64,
    head_dim: i64,
    causal: bool,
}

/// What one encoder layer is built from (shared by the text and vision towers).
#[derive(Debug, Clone, Copy)]
struct LayerDims {
    hidden_size: i64,
    intermediate_size: i64,
    num_attention_heads: i64,
    layer_norm_eps: f64,
    hidden_act: Activation,
    /// The text tower attends causally; the vision tower does not.
    causal: bool,
}

impl From<&CLIPTextConfig> for LayerDims {
    fn from(cfg: &CLIPTextConfig) -> Self {
        Self {
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_attention_heads: cfg.num_attention_heads,
            layer_norm_eps: cfg.layer_norm_eps,
            hidden_act: cfg.hidden_act,
            causal: true,
        }
    }
}

impl CLIPAttention {
    fn new(vs: nn::Path, cfg: &LayerDims) -> Self {
        let d = cfg.hidden_size;
        Self {
            q_proj: weights::linear(&vs / "q_proj", d, d, true),
            k_proj: weights::linear(&vs / "k_proj", d, d, true),
            v_proj: weights::linear(&vs / "v_proj", d, d, true),
            out_proj: weights::linear(&vs / "out_proj", d, d, true),
            num_heads: cfg.num_attention_heads,
            head_dim: d / cfg.num_attention_heads,
            causal: cfg.causal,
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let (b, t, c) = xs.size3().unwrap_or((0, 0, 0));
        let heads = |p: &Linear| {
            p.forward(xs)
                .view([b, t, self.num_heads, self.head_dim])
                .transpose(1, 2)
        };
        let (q, k, v) = (
            heads(&self.q_proj),
            heads(&self.k_proj),
            heads(&self.v_proj),
        );
        let scale = (self.head_dim as f64).powf(-0.5);
        let attn = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            self.causal,
            scale,
            false,
        );
        self.out_proj
            .forward(&attn.transpose(1, 2).reshape([b, t, c]))
    }
}

#[derive(Debug)]
struct CLIPEncoderLayer {
    self_attn: CLIPAttention,
    layer_norm1: nn::LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: nn::LayerNorm,
    act: Activation,
}

impl CLIPEncoderLayer {
    fn new(vs: nn::Path, cfg: &LayerDims) -> Self {
        let mlp = &vs / "mlp";
        Self {
            self_attn: CLIPAttention::new(&vs / "self_attn", cfg),
            layer_norm1: weights::layer_norm(
                &vs / "layer_norm1",
                cfg.hidden_size,
                cfg.layer_norm_eps,
            ),
            fc1: weights::linear(&mlp / "fc1", cfg.hidden_size, cfg.intermediate_size, true),
            fc2: weights::linear(&mlp / "fc2", cfg.intermediate_size, cfg.hidden_size, true),
            layer_norm2: weights::layer_norm(
                &vs / "layer_norm2",
                cfg.hidden_size,
                cfg.layer_norm_eps,
            ),
            act: cfg.hidden_act,
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let xs = xs + self.self_attn.forward(&self.layer_norm1.forward(xs));
        let mlp = self.fc2.forward(
            &self
                .act
                .forward(&self.fc1.forward(&self.layer_norm2.forward(&xs))),
        );
        xs + mlp
    }
}

/// transformers' `CLIPTextModel`: token + position embeddings, causal pre-norm transformer, final layer norm.
#[derive(Debug)]
pub struct CLIPTextModel {
    embeddings: CLIPTextEmbeddings,
    layers: Vec<CLIPEncoderLayer>,
    final_layer_norm: nn::LayerNorm,
    config: CLIPTextConfig,
    device: Device,
    _vs: Option<VarStore>,
}

// SAFETY: the model only holds tensors that are never mutated after loading (forward reads them),
// and concurrent reads of a libtorch tensor from several threads are safe.
unsafe impl Sync for CLIPTextModel {}

/// Maps checkpoint keys to this module's paths: transformers 5 saves a bare `CLIPTextModel`
/// without the `text_model.` prefix that hub checkpoints carry; the `position_ids` buffer is skipped.
pub fn clip_rename(key: &str) -> String {
    if key.ends_with("embeddings.position_ids") {
        return String::new();
    }
    if key.starts_with("embeddings.")
        || key.starts_with("encoder.")
        || key.starts_with("final_layer_norm.")
    {
        format!("text_model.{key}")
    } else {
        key.to_string()
    }
}

impl CLIPTextModel {
    /// Declares the parameters under `vs` with the checkpoint's paths (`text_model.embeddings.token_embedding.weight`, …).
    pub fn new(vs: &nn::Path, cfg: CLIPTextConfig) -> Result<Self> {
        cfg.validate()?;
        let tm = vs / "text_model";
        let layers_vs = &tm / "encoder" / "layers";
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| CLIPEncoderLayer::new(&layers_vs / i, &LayerDims::from(&cfg)))
            .collect();
        Ok(Self {
            embeddings: CLIPTextEmbeddings::new(&tm / "embeddings", &cfg),
            layers,
            final_layer_norm: weights::layer_norm(
                &tm / "final_layer_norm",
                cfg.hidden_size,
                cfg.layer_norm_eps,
            ),
            device: vs.device(),
            config: cfg,
            _vs: None,
        })
    }

    /// Loads `config.json` and the safetensors weights of the folder `component_dir` (e.g. `<model>/text_encoder`) as `kind` on `device`.
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
            &clip_rename,
            weights::Layout::Contiguous,
            |p, config: CLIPTextConfig| Self::new(p, config),
        )?;
        model._vs = Some(vs);
        Ok(model)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &CLIPTextConfig {
        &self.config
    }

    /// Encodes `input_ids` (`[B, T]`, integer, `T <= max_position_embeddings`).
    pub fn forward(&self, input_ids: &Tensor) -> Result<CLIPTextOutput> {
        let input_ids = check_input_ids(input_ids, &self.config, self.device)?;
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        let mut xs = self.embeddings.forward(&input_ids);
        for layer in &self.layers {
            let next = layer.forward(&xs);
            hidden_states.push(xs);
            xs = next;
        }
        hidden_states.push(xs.shallow_clone());
        let last_hidden_state = self.final_layer_norm.forward(&xs);
        let pooler_output = self.pool(&last_hidden_state, &input_ids)?;
        Ok(CLIPTextOutput {
            last_hidden_state,
            pooler_output,
            hidden_states,
        })
    }

    /// Picks each sequence's end-of-text position as transformers 5.24 does: the argmax of the ids
    /// when `eos_token_id == 2` (legacy configs), else the first position equal to `eos_token_id`.
    fn pool(&self, last_hidden_state: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
        let ids = input_ids.to_kind(Kind::Int);
        let positions = if self.config.eos_token_id == 2 {
            ids.argmax(-1, false)
        } else {
            ids.eq(self.config.eos_token_id)
                .to_kind(Kind::Int)
                .argmax(-1, false)
        };
        let batch = Tensor::arange(input_ids.size()[0], (Kind::Int64, self.device));
        Ok(last_hidden_state.f_index(&[Some(batch), Some(positions)])?)
    }
}

/// Checks that `input_ids` is a `[B, T]` integer tensor the model can embed and moves it to `device`.
fn check_input_ids(input_ids: &Tensor, cfg: &CLIPTextConfig, device: Device) -> Result<Tensor> {
    let size = input_ids.size();
    let [b, t] = size[..] else {
        return Err(Error::Input(format!(
            "input_ids must be [batch, seq], got {size:?}"
        )));
    };
    if b == 0 || t == 0 {
        return Err(Error::Input(format!("input_ids is empty: {size:?}")));
    }
    if t > cfg.max_position_embeddings {
        return Err(Error::Input(format!(
            "sequence length {t} exceeds max_position_embeddings {}",
            cfg.max_position_embeddings
        )));
    }
    let kind = input_ids.kind();
    if !matches!(
        kind,
        Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8
    ) {
        return Err(Error::Input(format!(
            "input_ids must be integer, got {kind:?}"
        )));
    }
    let ids = input_ids.to_device(device).to_kind(Kind::Int64);
    // An out-of-range id would make the embedding lookup abort inside libtorch.
    let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
    if lo < 0 || hi >= cfg.vocab_size {
        return Err(Error::Input(format!(
            "input_ids must lie in [0, {}), got values in [{lo}, {hi}]",
            cfg.vocab_size
        )));
    }
    Ok(ids)
}

/// transformers' `CLIPTextModelWithProjection`: a [`CLIPTextModel`] plus `text_projection` (no bias) of the pooled output.
#[derive(Debug)]
pub struct CLIPTextModelWithProjection {
    text_model: CLIPTextModel,
    text_projection: Linear,
    _vs: Option<VarStore>,
}

// SAFETY: as for `CLIPTextModel`, only read-only tensors.
unsafe impl Sync for CLIPTextModelWithProjection {}

impl CLIPTextModelWithProjection {
    /// Declares the parameters under `vs` (`text_model.…` and `text_projection.weight`).
    pub fn new(vs: &nn::Path, cfg: CLIPTextConfig) -> Result<Self> {
        let projection_dim = cfg
            .projection_dim
            .filter(|d| *d > 0)
            .ok_or_else(|| Error::Config("projection_dim must be a positive integer".into()))?;
        let text_projection = weights::linear(
            vs / "text_projection",
            cfg.hidden_size,
            projection_dim,
            false,
        );
        Ok(Self {
            text_model: CLIPTextModel::new(vs, cfg)?,
            text_projection,
            _vs: None,
        })
    }

    /// Loads `config.json` and the safetensors weights of `component_dir` (e.g. `<model>/text_encoder_2`) as `kind` on `device`.
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
            &clip_rename,
            weights::Layout::Contiguous,
            |p, config: CLIPTextConfig| Self::new(p, config),
        )?;
        model._vs = Some(vs);
        Ok(model)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &CLIPTextConfig {
        self.text_model.config()
    }

    /// Encodes `input_ids` (`[B, T]`) and projects the pooled output.
    pub fn forward(&self, input_ids: &Tensor) -> Result<CLIPTextModelOutput> {
        let out = self.text_model.forward(input_ids)?;
        Ok(CLIPTextModelOutput {
            text_embeds: self.text_projection.forward(&out.pooler_output),
            last_hidden_state: out.last_hidden_state,
            hidden_states: out.hidden_states,
        })
    }
}

fn default_vision_hidden_size() -> i64 {
    768
}
fn default_vision_intermediate_size() -> i64 {
    3072
}
fn default_vision_heads() -> i64 {
    12
}
fn default_num_channels() -> i64 {
    3
}
fn default_image_size() -> i64 {
    224
}
fn default_patch_size() -> i64 {
    32
}

/// `image_encoder/config.json` (transformers' `CLIPVisionConfig`), with its defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CLIPVisionConfig {
    #[serde(default = "default_vision_hidden_size")]
    pub hidden_size: i64,
    #[serde(default = "default_vision_intermediate_size")]
    pub intermediate_size: i64,
    #[serde(default = "default_projection_dim")]
    pub projection_dim: Option<i64>,
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "default_vision_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "default_num_channels")]
    pub num_channels: i64,
    /// Side of the square input image.
    #[serde(default = "default_image_size")]
    pub image_size: i64,
    #[serde(default = "default_patch_size")]
    pub patch_size: i64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
}

impl CLIPVisionConfig {
    fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_channels", self.num_channels),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
        ] {
            if v <= 0 {
                return Err(Error::Config(format!("{name} must be positive, got {v}")));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::Config(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.image_size % self.patch_size != 0 {
            return Err(Error::Config(format!(
                "image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            )));
        }
        Ok(())
    }
}

/// What a `CLIPVisionModelWithProjection` returns.
#[derive(Debug)]
pub struct CLIPVisionModelOutput {
    /// `image_embeds`: the projected, post-layer-normed class token, `[batch, projection_dim]`.
    pub image_embeds: Tensor,
    /// `last_hidden_state`, `[batch, 1 + patches, hidden_size]`.
    pub last_hidden_state: Tensor,
}

/// transformers' `CLIPVisionTransformer` (what `CLIPVisionModel` is): patch embeddings plus a class
/// token through the (non-causal) encoder.
#[derive(Debug)]
pub struct CLIPVisionTransformer {
    class_embedding: Tensor,
    patch_embedding: nn::Conv2D,
    position_embedding: nn::Embedding,
    pre_layrnorm: nn::LayerNorm,
    layers: Vec<CLIPEncoderLayer>,
    post_layernorm: nn::LayerNorm,
    config: CLIPVisionConfig,
    device: Device,
    kind: Kind,
}

impl CLIPVisionTransformer {
    /// Declares the parameters under `vs` (`embeddings`, `pre_layrnorm`, `encoder`, `post_layernorm`).
    pub fn new(vs: &nn::Path, cfg: CLIPVisionConfig) -> Result<Self> {
        cfg.validate()?;
        let emb = vs / "embeddings";
        let d = cfg.hidden_size;
        let patches = (cfg.image_size / cfg.patch_size).pow(2);
        let dims = LayerDims {
            hidden_size: d,
            intermediate_size: cfg.intermediate_size,
            num_attention_heads: cfg.num_attention_heads,
            layer_norm_eps: cfg.layer_norm_eps,
            hidden_act: cfg.hidden_act,
            causal: false,
        };
        let conv = nn::ConvConfig {
            stride: cfg.patch_size,
            bias: false,
            ws_init: nn::Init::Const(0.),
            ..Default::default()
        };
        Ok(Self {
            class_embedding: weights::param(&emb, "class_embedding", &[d]),
            patch_embedding: nn::conv2d(
                &emb / "patch_embedding",
                cfg.num_channels,
                d,
                cfg.patch_size,
                conv,
            ),
            position_embedding: weights::embedding(&emb / "position_embedding", patches + 1, d),
            pre_layrnorm: weights::layer_norm(vs / "pre_layrnorm", d, cfg.layer_norm_eps),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| CLIPEncoderLayer::new(vs / "encoder" / "layers" / i, &dims))
                .collect(),
            post_layernorm: weights::layer_norm(vs / "post_layernorm", d, cfg.layer_norm_eps),
            device: vs.device(),
            kind: vs.kind(),
            config: cfg,
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &CLIPVisionConfig {
        &self.config
    }

    /// Encodes `pixel_values` (`[batch, num_channels, image_size, image_size]`, already
    /// preprocessed by the image processor): `(last_hidden_state, pooled_output)`, the pooled
    /// output being the post-layer-normed class token.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<(Tensor, Tensor)> {
        let size = pixel_values.size();
        let side = self.config.image_size;
        match size[..] {
            [b, c, h, w] if b > 0 && c == self.config.num_channels && h == side && w == side => {}
            _ => {
                return Err(Error::Input(format!(
                    "pixel_values must be [batch, {}, {side}, {side}], got {size:?}",
                    self.config.num_channels
                )))
            }
        }
        if !pixel_values.is_floating_point() {
            return Err(Error::Input(format!(
                "pixel_values must be floating point, got {:?}",
                pixel_values.kind()
            )));
        }
        let batch = size[0];
        let _guard = tch::no_grad_guard();
        let xs = pixel_values.to_device(self.device).to_kind(self.kind);
        let patches = self
            .patch_embedding
            .forward(&xs)
            .flatten(2, -1)
            .transpose(1, 2);
        let class = self
            .class_embedding
            .view([1, 1, -1])
            .expand([batch, 1, -1], false);
        let xs = Tensor::cat(&[class, patches], 1);
        let positions = Tensor::arange(xs.size()[1], (Kind::Int64, self.device)).unsqueeze(0);
        let mut xs = self
            .pre_layrnorm
            .forward(&(xs + self.position_embedding.forward(&positions)));
        for layer in &self.layers {
            xs = layer.forward(&xs);
        }
        let pooled = self.post_layernorm.forward(&xs.select(1, 0));
        Ok((xs, pooled))
    }
}

/// transformers' `CLIPVisionModelWithProjection`: the vision transformer's pooled output through
/// `visual_projection` is `image_embeds`.
#[derive(Debug)]
pub struct CLIPVisionModelWithProjection {
    vision_model: CLIPVisionTransformer,
    visual_projection: Linear,
    _vs: Option<VarStore>,
}

// SAFETY: as for `CLIPTextModel`, only read-only tensors.
unsafe impl Sync for CLIPVisionModelWithProjection {}

/// Drops the non-persistent `position_ids` buffer some exports carry.
pub fn vision_rename(key: &str) -> String {
    if key.ends_with("embeddings.position_ids") {
        String::new()
    } else {
        key.to_string()
    }
}

impl CLIPVisionModelWithProjection {
    /// Declares the parameters under `vs` (`vision_model.…`, `visual_projection`).
    pub fn new(vs: &nn::Path, cfg: CLIPVisionConfig) -> Result<Self> {
        let projection_dim = cfg
            .projection_dim
            .filter(|d| *d > 0)
            .ok_or_else(|| Error::Config("projection_dim must be a positive integer".into()))?;
        let d = cfg.hidden_size;
        Ok(Self {
            vision_model: CLIPVisionTransformer::new(&(vs / "vision_model"), cfg)?,
            visual_projection: weights::linear(vs / "visual_projection", d, projection_dim, false),
            _vs: None,
        })
    }

    /// Loads `config.json` and the weights of `component_dir` (e.g. `<prior>/image_encoder`).
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
            &vision_rename,
            weights::Layout::Contiguous,
            |p, config: CLIPVisionConfig| Self::new(p, config),
        )?;
        model._vs = Some(vs);
        Ok(model)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &CLIPVisionConfig {
        self.vision_model.config()
    }

    /// Encodes `pixel_values` (`[batch, num_channels, image_size, image_size]`, already
    /// preprocessed by the image processor).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<CLIPVisionModelOutput> {
        let (last_hidden_state, pooled) = self.vision_model.forward(pixel_values)?;
        Ok(CLIPVisionModelOutput {
            image_embeds: self.visual_projection.forward(&pooled),
            last_hidden_state,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rename_adds_prefix_and_skips_position_ids() {
        assert_eq!(
            clip_rename("embeddings.token_embedding.weight"),
            "text_model.embeddings.token_embedding.weight"
        );
        assert_eq!(
            clip_rename("text_model.final_layer_norm.bias"),
            "text_model.final_layer_norm.bias"
        );
        assert_eq!(
            clip_rename("text_projection.weight"),
            "text_projection.weight"
        );
        assert_eq!(clip_rename("text_model.embeddings.position_ids"), "");
    }

    #[test]
    fn old_configs_get_transformers_defaults() {
        let cfg: CLIPTextConfig = serde_json::from_str(
            r#"{"hidden_size": 768, "eos_token_id": 2, "projection_dim": null}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.hidden_act, Activation::QuickGelu);
        assert_eq!(cfg.max_position_embeddings, 77);
        assert_eq!(cfg.projection_dim, None);
        let gelu: CLIPTextConfig =
            serde_json::from_str(r#"{"hidden_act": "gelu"}"#).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(gelu.hidden_act, Activation::Gelu);
        assert!(serde_json::from_str::<CLIPTextConfig>(r#"{"hidden_act": "relu"}"#).is_err());
    }
}
