//! The unCLIP / Kandinsky prior: text embeddings to a CLIP image embedding, following diffusers
//! `models/transformers/prior_transformer.py` (`PriorTransformer`, 0.42.1) and its
//! `BasicTransformerBlock` (self-attention only, `attention_bias=True`, GELU feed-forward).

use crate::layers::Linear;
use std::path::Path;

use serde::Deserialize;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::attention::Attention;
use crate::embeddings::{Activation, TimestepEmbedding, Timesteps};
use crate::weights;
use crate::{Error, Result};

fn default_heads() -> i64 {
    32
}
fn default_head_dim() -> i64 {
    64
}
fn default_layers() -> i64 {
    20
}
fn default_embedding_dim() -> i64 {
    768
}
fn default_num_embeddings() -> i64 {
    77
}
fn default_additional_embeddings() -> i64 {
    4
}
fn default_act() -> String {
    "silu".into()
}
fn default_linear() -> Option<String> {
    Some("linear".into())
}
fn default_prd() -> Option<String> {
    Some("prd".into())
}

/// `prior/config.json`, as `PriorTransformer.__init__` takes it.
#[derive(Debug, Clone, Deserialize)]
pub struct PriorTransformerConfig {
    #[serde(default = "default_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: i64,
    #[serde(default = "default_layers")]
    pub num_layers: i64,
    /// Width of the image embedding being denoised (and of the text embeddings).
    #[serde(default = "default_embedding_dim")]
    pub embedding_dim: i64,
    /// Text tokens (`encoder_hidden_states` length).
    #[serde(default = "default_num_embeddings")]
    pub num_embeddings: i64,
    /// Tokens after the text: projected embedding, time, the sample, `prd`.
    #[serde(default = "default_additional_embeddings")]
    pub additional_embeddings: i64,
    #[serde(default = "default_act")]
    pub time_embed_act_fn: String,
    /// `null` or `"layer"`.
    #[serde(default)]
    pub norm_in_type: Option<String>,
    /// `null` or `"layer"`.
    #[serde(default)]
    pub embedding_proj_norm_type: Option<String>,
    /// `null` or `"linear"`.
    #[serde(default = "default_linear")]
    pub encoder_hid_proj_type: Option<String>,
    /// `null` or `"prd"`.
    #[serde(default = "default_prd")]
    pub added_emb_type: Option<String>,
    #[serde(default)]
    pub time_embed_dim: Option<i64>,
    #[serde(default)]
    pub embedding_proj_dim: Option<i64>,
    #[serde(default)]
    pub clip_embed_dim: Option<i64>,
}

/// `BasicTransformerBlock(dim, heads, head_dim, activation_fn="gelu", attention_bias=True)`
/// without cross-attention: self-attention and a GELU feed-forward, pre-normed and residual.
#[derive(Debug)]
struct PriorBlock {
    norm1: nn::LayerNorm,
    attn1: Attention,
    norm3: nn::LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
}

impl PriorBlock {
    fn new(vs: &nn::Path, dim: i64, heads: i64, head_dim: i64) -> Self {
        Self {
            norm1: weights::layer_norm(vs / "norm1", dim, 1e-5),
            attn1: Attention::new(&(vs / "attn1"), dim, None, heads, head_dim, true, false),
            norm3: weights::layer_norm(vs / "norm3", dim, 1e-5),
            ff_proj: weights::linear(vs / "ff" / "net" / "0" / "proj", dim, dim * 4, true),
            ff_out: weights::linear(vs / "ff" / "net" / "2", dim * 4, dim, true),
        }
    }

    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let xs = self
            .attn1
            .forward_masked(&self.norm1.forward(xs), None, mask)
            + xs;
        let ff = self
            .ff_out
            .forward(&self.ff_proj.forward(&self.norm3.forward(&xs)).gelu("none"));
        ff + xs
    }
}

/// diffusers' `PriorTransformer`.
#[derive(Debug)]
pub struct PriorTransformer {
    config: PriorTransformerConfig,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    proj_in: Linear,
    embedding_proj_norm: Option<nn::LayerNorm>,
    embedding_proj: Linear,
    encoder_hidden_states_proj: Option<Linear>,
    positional_embedding: Tensor,
    prd_embedding: Option<Tensor>,
    blocks: Vec<PriorBlock>,
    norm_in: Option<nn::LayerNorm>,
    norm_out: nn::LayerNorm,
    proj_to_clip_embeddings: Linear,
    clip_mean: Tensor,
    clip_std: Tensor,
    kind: Kind,
    device: Device,
    _vs: Option<nn::VarStore>,
}

// SAFETY: the model only reads its tensors after loading; concurrent reads are safe in libtorch.
unsafe impl Sync for PriorTransformer {}

fn layer_or_none(v: &Option<String>, field: &str) -> Result<bool> {
    match v.as_deref() {
        None => Ok(false),
        Some("layer") => Ok(true),
        Some(other) => Err(Error::Config(format!(
            "{field}: {other:?} is not supported"
        ))),
    }
}

impl PriorTransformer {
    /// Declares the parameters under `vs` with the checkpoint's names.
    pub fn new(vs: &nn::Path, config: PriorTransformerConfig) -> Result<Self> {
        let cfg = &config;
        let inner = cfg.num_attention_heads * cfg.attention_head_dim;
        if inner <= 0 || cfg.num_layers < 0 {
            return Err(Error::Config(
                "num_attention_heads, attention_head_dim: must be positive".into(),
            ));
        }
        let time_embed_dim = cfg.time_embed_dim.unwrap_or(inner);
        let embedding_proj_dim = cfg.embedding_proj_dim.unwrap_or(cfg.embedding_dim);
        let clip_embed_dim = cfg.clip_embed_dim.unwrap_or(cfg.embedding_dim);
        let act = Activation::from_name(&cfg.time_embed_act_fn, "time_embed_act_fn")?;
        let encoder_proj = match cfg.encoder_hid_proj_type.as_deref() {
            None => false,
            Some("linear") => true,
            Some(other) => {
                return Err(Error::Config(format!(
                    "encoder_hid_proj_type: {other:?} is not supported"
                )))
            }
        };
        let prd = match cfg.added_emb_type.as_deref() {
            None => false,
            Some("prd") => true,
            Some(other) => {
                return Err(Error::Config(format!(
                    "added_emb_type: {other:?} is not supported"
                )))
            }
        };
        let tokens = cfg.num_embeddings + cfg.additional_embeddings;
        Ok(Self {
            time_proj: Timesteps::new(inner, true, 0.0),
            time_embedding: TimestepEmbedding::new(
                &(vs / "time_embedding"),
                inner,
                time_embed_dim,
                act,
                Some(inner),
                None,
                None,
            ),
            proj_in: weights::linear(vs / "proj_in", cfg.embedding_dim, inner, true),
            embedding_proj_norm: layer_or_none(
                &cfg.embedding_proj_norm_type,
                "embedding_proj_norm_type",
            )?
            .then(|| weights::layer_norm(vs / "embedding_proj_norm", embedding_proj_dim, 1e-5)),
            embedding_proj: weights::linear(vs / "embedding_proj", embedding_proj_dim, inner, true),
            encoder_hidden_states_proj: encoder_proj.then(|| {
                weights::linear(
                    vs / "encoder_hidden_states_proj",
                    cfg.embedding_dim,
                    inner,
                    true,
                )
            }),
            positional_embedding: weights::param(vs, "positional_embedding", &[1, tokens, inner]),
            prd_embedding: prd.then(|| weights::param(vs, "prd_embedding", &[1, 1, inner])),
            blocks: (0..cfg.num_layers)
                .map(|i| {
                    PriorBlock::new(
                        &(vs / "transformer_blocks" / i),
                        inner,
                        cfg.num_attention_heads,
                        cfg.attention_head_dim,
                    )
                })
                .collect(),
            norm_in: layer_or_none(&cfg.norm_in_type, "norm_in_type")?
                .then(|| weights::layer_norm(vs / "norm_in", inner, 1e-5)),
            norm_out: weights::layer_norm(vs / "norm_out", inner, 1e-5),
            proj_to_clip_embeddings: weights::linear(
                vs / "proj_to_clip_embeddings",
                inner,
                clip_embed_dim,
                true,
            ),
            clip_mean: weights::param(vs, "clip_mean", &[1, clip_embed_dim]),
            clip_std: weights::param(vs, "clip_std", &[1, clip_embed_dim]),
            kind: vs.kind(),
            device: vs.device(),
            _vs: None,
            config,
        })
    }

    /// Loads `config.json` and the weights of `component_dir` (e.g. `<model>/prior`).
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
            weights::Layout::Contiguous,
            |p, config: PriorTransformerConfig| Self::new(p, config),
        )?;
        model._vs = Some(vs);
        Ok(model)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &PriorTransformerConfig {
        &self.config
    }

    /// The kind of the weights.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The device of the weights.
    pub fn device(&self) -> Device {
        self.device
    }

    /// `forward(...).predicted_image_embedding`: `hidden_states` `[B, embedding_dim]` at
    /// `timestep`, conditioned on `proj_embedding` `[B, embedding_proj_dim]`,
    /// `encoder_hidden_states` `[B, T, embedding_dim]` and its boolean `attention_mask` `[B, T]`.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        proj_embedding: &Tensor,
        encoder_hidden_states: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (kind, device) = (self.kind, self.device);
        let to_model = |t: &Tensor| t.to_device(device).to_kind(kind);
        let hs_size = hidden_states.size();
        if hs_size.len() != 2 || hs_size[1] != self.config.embedding_dim {
            return Err(Error::Input(format!(
                "hidden_states: shape {hs_size:?}, expected [batch, {}]",
                self.config.embedding_dim
            )));
        }
        let batch = hs_size[0];
        if proj_embedding.size().first() != Some(&batch) {
            return Err(Error::Input(format!(
                "proj_embedding: shape {:?}, expected batch {batch}",
                proj_embedding.size()
            )));
        }
        if let Some(e) = encoder_hidden_states {
            let s = e.size();
            if s.len() != 3 || s[0] != batch || s[2] != self.config.embedding_dim {
                return Err(Error::Input(format!(
                    "encoder_hidden_states: shape {s:?}, expected [{batch}, tokens, {}]",
                    self.config.embedding_dim
                )));
            }
        }
        if let (Some(m), Some(e)) = (attention_mask, encoder_hidden_states) {
            let s = m.size();
            if s != [batch, e.size()[1]] {
                return Err(Error::Input(format!(
                    "attention_mask: shape {s:?}, expected [{batch}, {}]",
                    e.size()[1]
                )));
            }
        }
        let _guard = tch::no_grad_guard();
        let timesteps = timestep
            .to_device(device)
            .reshape([-1])
            .expand([batch], false);
        let t_proj = self.time_proj.forward(&timesteps).to_kind(kind);
        let time_embeddings = self.time_embedding.forward(&t_proj, None);
        let mut proj_embedding = to_model(proj_embedding);
        if let Some(norm) = &self.embedding_proj_norm {
            proj_embedding = norm.forward(&proj_embedding);
        }
        let mut proj_embeddings = self.embedding_proj.forward(&proj_embedding);
        let encoder_hidden_states = match (&self.encoder_hidden_states_proj, encoder_hidden_states)
        {
            (Some(proj), Some(e)) => Some(proj.forward(&to_model(e))),
            (Some(_), None) => {
                return Err(Error::Input(
                    "encoder_hidden_states: required by encoder_hidden_states_proj".into(),
                ))
            }
            (None, e) => e.map(to_model),
        };
        let mut hidden = self.proj_in.forward(&to_model(hidden_states));
        let mut parts = Vec::new();
        let mut additional_len = 0;
        if let Some(e) = &encoder_hidden_states {
            additional_len += e.size()[1];
            parts.push(e.shallow_clone());
        }
        if proj_embeddings.dim() == 2 {
            proj_embeddings = proj_embeddings.unsqueeze(1);
        }
        if hidden.dim() == 2 {
            hidden = hidden.unsqueeze(1);
        }
        additional_len += proj_embeddings.size()[1] + 1;
        parts.push(proj_embeddings);
        parts.push(time_embeddings.unsqueeze(1));
        parts.push(hidden);
        if let Some(prd) = &self.prd_embedding {
            parts.push(prd.to_kind(kind).expand([batch, -1, -1], false));
        }
        let xs = Tensor::cat(&parts, 1);
        let total = xs.size()[1];
        let mut positional = self.positional_embedding.to_kind(kind);
        if positional.size()[1] < total {
            let tail = if self.prd_embedding.is_some() { 1 } else { 0 };
            positional = positional.constant_pad_nd([0, 0, additional_len, tail]);
        }
        if positional.size()[1] != total {
            return Err(Error::Input(format!(
                "encoder_hidden_states: {} tokens in all, the positional embedding has {}",
                total,
                positional.size()[1]
            )));
        }
        let mut xs = xs + positional;
        let mask = match attention_mask {
            Some(m) => {
                let m: Tensor = (1.0 - m.to_device(device).to_kind(kind)) * -10000.0;
                let m = m.constant_pad_nd([0, self.config.additional_embeddings]);
                let causal = Tensor::full([total, total], -10000.0, (kind, device)).triu(1);
                // [B, T] + [T, T] -> [B, 1, T, T], broadcast over heads.
                Some((m.unsqueeze(1) + causal.unsqueeze(0)).unsqueeze(1))
            }
            None => None,
        };
        if let Some(norm) = &self.norm_in {
            xs = norm.forward(&xs);
        }
        for block in &self.blocks {
            xs = block.forward(&xs, mask.as_ref());
        }
        let xs = self.norm_out.forward(&xs);
        let xs = if self.prd_embedding.is_some() {
            xs.select(1, -1)
        } else {
            xs.narrow(1, additional_len, total - additional_len)
        };
        Ok(self.proj_to_clip_embeddings.forward(&xs))
    }

    /// `post_process_latents`: `latents * clip_std + clip_mean`.
    pub fn post_process_latents(&self, latents: &Tensor) -> Tensor {
        latents.to_device(self.device).to_kind(self.kind) * &self.clip_std + &self.clip_mean
    }
}
