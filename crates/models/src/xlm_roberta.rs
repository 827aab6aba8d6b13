//! Kandinsky 2.1's text encoder: diffusers' `MultilingualCLIP` (pipelines/kandinsky/text_encoder.py,
//! 0.42.1), an XLM-RoBERTa encoder (transformers 5.24 `models/xlm_roberta/modeling_xlm_roberta.py`,
//! `XLMRobertaModel`) whose last hidden states, mean-pooled over the attention mask, go through
//! `LinearTransformation`.
//!
//! Forward passes take `&self` and never mutate weights; running them under `tch::no_grad` is the
//! caller's job.

use crate::layers::Linear;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

use crate::clip::Activation;
use crate::error::{Error, Result};
use crate::weights;

fn default_vocab_size() -> i64 {
    30522
}
fn default_hidden_size() -> i64 {
    768
}
fn default_num_hidden_layers() -> i64 {
    12
}
fn default_num_attention_heads() -> i64 {
    12
}
fn default_intermediate_size() -> i64 {
    3072
}
fn default_hidden_act() -> Activation {
    Activation::Gelu
}
fn default_max_position_embeddings() -> i64 {
    512
}
fn default_type_vocab_size() -> i64 {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_pad_token_id() -> i64 {
    1
}
fn default_transformer_dimensions() -> i64 {
    1024
}
fn default_num_dims() -> i64 {
    768
}

/// `text_encoder/config.json` (diffusers' `MCLIPConfig`, an `XLMRobertaConfig` with the projection
/// sizes), with transformers' defaults for omitted fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MCLIPConfig {
    /// Size of the token embedding table.
    #[serde(default = "default_vocab_size")]
    pub vocab_size: i64,
    /// Width of the transformer.
    #[serde(default = "default_hidden_size")]
    pub hidden_size: i64,
    /// Number of encoder layers.
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: i64,
    /// Attention heads per layer.
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: i64,
    /// Width of the MLP.
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: i64,
    /// MLP activation.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: Activation,
    /// Rows of the position embedding table (positions start after `pad_token_id`).
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: i64,
    /// Rows of the token type embedding table (type 0 is used).
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: i64,
    /// Epsilon of every layer norm.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Padding token id, also the position embeddings' padding index.
    #[serde(default = "default_pad_token_id")]
    pub pad_token_id: i64,
    /// Input width of `LinearTransformation` (the transformer's width).
    #[serde(
        rename = "transformerDimensions",
        default = "default_transformer_dimensions"
    )]
    pub transformer_dimensions: i64,
    /// Output width of `LinearTransformation` (the CLIP image embedding width).
    #[serde(rename = "numDims", default = "default_num_dims")]
    pub num_dims: i64,
}

impl MCLIPConfig {
    fn validate(&self) -> Result<()> {
        let cerr = |m: String| Err(Error::Config(m));
        if self.num_attention_heads <= 0 || self.hidden_size % self.num_attention_heads != 0 {
            return cerr(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.transformer_dimensions != self.hidden_size {
            return cerr(format!(
                "transformerDimensions {} must equal hidden_size {}",
                self.transformer_dimensions, self.hidden_size
            ));
        }
        if self.type_vocab_size < 1 || self.pad_token_id < 0 {
            return cerr("type_vocab_size must be >= 1 and pad_token_id >= 0".into());
        }
        Ok(())
    }
}

/// What [`MultilingualCLIP::forward`] returns, as diffusers' `(LinearTransformation(pooled), embs)`.
#[derive(Debug)]
pub struct MultilingualCLIPOutput {
    /// The masked mean of the last hidden states, projected: `[B, numDims]`.
    pub text_embeds: Tensor,
    /// The encoder's last hidden states, `[B, T, hidden]`.
    pub last_hidden_state: Tensor,
}

#[derive(Debug)]
struct XLMRobertaLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: nn::LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: nn::LayerNorm,
    act: Activation,
    heads: i64,
}

impl XLMRobertaLayer {
    fn new(vs: nn::Path, cfg: &MCLIPConfig) -> Self {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let attn = &vs / "attention";
        Self {
            query: weights::linear(&attn / "self" / "query", d, d, true),
            key: weights::linear(&attn / "self" / "key", d, d, true),
            value: weights::linear(&attn / "self" / "value", d, d, true),
            attention_output: weights::linear(&attn / "output" / "dense", d, d, true),
            attention_norm: weights::layer_norm(&attn / "output" / "LayerNorm", d, eps),
            intermediate: weights::linear(
                &vs / "intermediate" / "dense",
                d,
                cfg.intermediate_size,
                true,
            ),
            output: weights::linear(&vs / "output" / "dense", cfg.intermediate_size, d, true),
            output_norm: weights::layer_norm(&vs / "output" / "LayerNorm", d, eps),
            act: cfg.hidden_act,
            heads: cfg.num_attention_heads,
        }
    }

    /// Post-norm BERT layer; `mask` is the additive `[B, 1, 1, T]` key mask.
    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Tensor {
        let (b, t, c) = xs.size3().unwrap_or((0, 0, 0));
        let head_dim = c / self.heads;
        let split = |p: &Linear| {
            p.forward(xs)
                .view([b, t, self.heads, head_dim])
                .transpose(1, 2)
        };
        let attn = Tensor::scaled_dot_product_attention(
            &split(&self.query),
            &split(&self.key),
            &split(&self.value),
            Some(mask),
            0.0,
            false,
            (head_dim as f64).powf(-0.5),
            false,
        )
        .transpose(1, 2)
        .reshape([b, t, c]);
        let xs = self
            .attention_norm
            .forward(&(self.attention_output.forward(&attn) + xs));
        let mlp = self
            .output
            .forward(&self.act.forward(&self.intermediate.forward(&xs)));
        self.output_norm.forward(&(mlp + xs))
    }
}

/// diffusers' `MultilingualCLIP`: `transformer` (XLM-RoBERTa) + `LinearTransformation`.
#[derive(Debug)]
pub struct MultilingualCLIP {
    word_embeddings: nn::Embedding,
    position_embeddings: nn::Embedding,
    token_type_embeddings: nn::Embedding,
    embeddings_norm: nn::LayerNorm,
    layers: Vec<XLMRobertaLayer>,
    linear_transformation: Linear,
    config: MCLIPConfig,
    device: Device,
    _vs: Option<VarStore>,
}

// SAFETY: the model only holds tensors that are never mutated after loading (forward reads them),
// and concurrent reads of a libtorch tensor from several threads are safe.
unsafe impl Sync for MultilingualCLIP {}

/// Checkpoint keys to module paths: the unused pooler and the non-persistent buffers are skipped.
fn mclip_rename(key: &str) -> String {
    if key.starts_with("transformer.pooler.")
        || key.ends_with("embeddings.position_ids")
        || key.ends_with("embeddings.token_type_ids")
    {
        return String::new();
    }
    key.to_string()
}

impl MultilingualCLIP {
    /// Declares the parameters under `vs` with the checkpoint's paths
    /// (`transformer.embeddings.word_embeddings.weight`, …, `LinearTransformation.weight`).
    pub fn new(vs: &nn::Path, cfg: MCLIPConfig) -> Result<Self> {
        cfg.validate()?;
        let tr = vs / "transformer";
        let emb = &tr / "embeddings";
        let d = cfg.hidden_size;
        let layers_vs = &tr / "encoder" / "layer";
        Ok(Self {
            word_embeddings: weights::embedding(&emb / "word_embeddings", cfg.vocab_size, d),
            position_embeddings: weights::embedding(
                &emb / "position_embeddings",
                cfg.max_position_embeddings,
                d,
            ),
            token_type_embeddings: weights::embedding(
                &emb / "token_type_embeddings",
                cfg.type_vocab_size,
                d,
            ),
            embeddings_norm: weights::layer_norm(&emb / "LayerNorm", d, cfg.layer_norm_eps),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| XLMRobertaLayer::new(&layers_vs / i, &cfg))
                .collect(),
            linear_transformation: weights::linear(
                vs / "LinearTransformation",
                cfg.transformer_dimensions,
                cfg.num_dims,
                true,
            ),
            device: vs.device(),
            config: cfg,
            _vs: None,
        })
    }

    /// Loads `config.json` and the safetensors weights of `component_dir` (`<model>/text_encoder`)
    /// as `kind` on `device`.
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
            &mclip_rename,
            weights::Layout::Contiguous,
            |p, config: MCLIPConfig| Self::new(p, config),
        )?;
        model._vs = Some(vs);
        Ok(model)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &MCLIPConfig {
        &self.config
    }

    /// Encodes `input_ids` (`[B, T]`, integer) with `attention_mask` (`[B, T]`, 1 = token).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<MultilingualCLIPOutput> {
        let cfg = &self.config;
        let size = input_ids.size();
        let [b, t] = size[..] else {
            return Err(Error::Input(format!(
                "input_ids must be [batch, seq], got {size:?}"
            )));
        };
        if b == 0 || t == 0 {
            return Err(Error::Input(format!("input_ids is empty: {size:?}")));
        }
        if attention_mask.size() != size {
            return Err(Error::Input(format!(
                "attention_mask: shape {:?}, expected {size:?}",
                attention_mask.size()
            )));
        }
        if !matches!(input_ids.kind(), Kind::Int64 | Kind::Int) {
            return Err(Error::Input(format!(
                "input_ids must be integer, got {:?}",
                input_ids.kind()
            )));
        }
        let ids = input_ids.to_device(self.device).to_kind(Kind::Int64);
        let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
        if lo < 0 || hi >= cfg.vocab_size {
            return Err(Error::Input(format!(
                "input_ids must lie in [0, {}), got values in [{lo}, {hi}]",
                cfg.vocab_size
            )));
        }
        // `create_position_ids_from_input_ids`: padding keeps position `pad_token_id`, tokens
        // count up from it.
        let not_pad = ids.ne(cfg.pad_token_id).to_kind(Kind::Int64);
        let positions = not_pad.cumsum(1, Kind::Int64) * &not_pad + cfg.pad_token_id;
        let last_position = positions.max().int64_value(&[]);
        if last_position >= cfg.max_position_embeddings {
            return Err(Error::Input(format!(
                "sequence length {t} exceeds max_position_embeddings {} (positions start after pad_token_id {})",
                cfg.max_position_embeddings, cfg.pad_token_id
            )));
        }
        let kind = self.linear_transformation.kind();
        let token_type = self
            .token_type_embeddings
            .ws
            .get(0)
            .reshape([1, 1, cfg.hidden_size]);
        let xs = self.word_embeddings.forward(&ids)
            + token_type
            + self.position_embeddings.forward(&positions);
        let mut xs = self.embeddings_norm.forward(&xs);
        let mask = attention_mask.to_device(self.device).to_kind(kind);
        // `create_bidirectional_mask`: padded keys get the dtype's lowest value.
        let additive = ((mask.neg() + 1.0) * min_value(kind)).reshape([b, 1, 1, t]);
        for layer in &self.layers {
            xs = layer.forward(&xs, &additive);
        }
        let weights_ = mask.unsqueeze(2);
        let pooled = (&xs * &weights_).sum_dim_intlist(1, false, None)
            / mask.sum_dim_intlist(1, false, None).unsqueeze(1);
        Ok(MultilingualCLIPOutput {
            text_embeds: self.linear_transformation.forward(&pooled),
            last_hidden_state: xs,
        })
    }
}

/// `torch.finfo(kind).min`.
fn min_value(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.3895313892515355e38,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}
