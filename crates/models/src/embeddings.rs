//! Timestep embeddings, following diffusers `models/embeddings.py` (`get_timestep_embedding`,
//! `Timesteps`, `TimestepEmbedding`, `TextTimeEmbedding`, `AttentionPooling`) and the activations of
//! `models/activations.py`.

use crate::layers::Linear;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::weights::{layer_norm, linear};
use crate::{Error, Result};

/// An activation named as diffusers' `get_activation` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `"silu"` or `"swish"`.
    Silu,
    /// `"mish"`.
    Mish,
    /// `"gelu"` (exact, not the tanh approximation).
    Gelu,
    /// `"relu"`.
    Relu,
}

impl Activation {
    /// Parses a diffusers activation name; `field` names the config field in the error.
    pub fn from_name(name: &str, field: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Self::Silu),
            "mish" => Ok(Self::Mish),
            "gelu" => Ok(Self::Gelu),
            "relu" => Ok(Self::Relu),
            other => Err(Error::Config(format!(
                "{field}: unknown activation {other:?} (expected silu, swish, mish, gelu or relu)"
            ))),
        }
    }

    /// Applies the activation.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        match self {
            Self::Silu => xs.silu(),
            Self::Mish => xs.mish(),
            Self::Gelu => xs.gelu("none"),
            Self::Relu => xs.relu(),
        }
    }
}

/// Sinusoidal timestep embeddings of shape `[N, embedding_dim]` in f32, as diffusers'
/// `get_timestep_embedding` computes them from a 1-D tensor of (possibly fractional) timesteps.
pub fn get_timestep_embedding(
    timesteps: &Tensor,
    embedding_dim: i64,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
    scale: f64,
    max_period: f64,
) -> Tensor {
    let half_dim = embedding_dim / 2;
    // Same op order and dtypes as diffusers so the f32 rounding matches.
    let exponent = Tensor::arange(half_dim, (Kind::Float, timesteps.device())) * (-max_period.ln());
    let exponent = exponent / (half_dim as f64 - downscale_freq_shift);
    let freqs = exponent.exp();
    let emb = timesteps.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    let emb = if scale != 1.0 { emb * scale } else { emb };
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[emb.cos(), emb.sin()], -1)
    } else {
        Tensor::cat(&[emb.sin(), emb.cos()], -1)
    };
    if embedding_dim % 2 == 1 {
        emb.constant_pad_nd([0, 1, 0, 0])
    } else {
        emb
    }
}

/// diffusers' `Timesteps`: the parameter-free sinusoidal projection of timesteps.
#[derive(Debug, Clone)]
pub struct Timesteps {
    num_channels: i64,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
}

impl Timesteps {
    /// Creates the projection to `num_channels` features.
    pub fn new(num_channels: i64, flip_sin_to_cos: bool, downscale_freq_shift: f64) -> Self {
        Self {
            num_channels,
            flip_sin_to_cos,
            downscale_freq_shift,
        }
    }

    /// Width of the embedding.
    pub fn num_channels(&self) -> i64 {
        self.num_channels
    }

    /// Projects a 1-D tensor of timesteps to `[N, num_channels]` f32 embeddings.
    pub fn forward(&self, timesteps: &Tensor) -> Tensor {
        get_timestep_embedding(
            timesteps,
            self.num_channels,
            self.flip_sin_to_cos,
            self.downscale_freq_shift,
            1.0,
            10000.0,
        )
    }
}

/// diffusers' `TimestepEmbedding`: `linear_2(act(linear_1(sample [+ cond_proj(condition)])))`.
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    act: Activation,
    linear_2: Linear,
    cond_proj: Option<Linear>,
    post_act: Option<Activation>,
}

impl TimestepEmbedding {
    /// Builds the MLP under `vs` (`linear_1`, `linear_2`, optional bias-free `cond_proj`).
    pub fn new(
        vs: &nn::Path,
        in_channels: i64,
        time_embed_dim: i64,
        act: Activation,
        out_dim: Option<i64>,
        post_act: Option<Activation>,
        cond_proj_dim: Option<i64>,
    ) -> Self {
        let linear_1 = linear(vs / "linear_1", in_channels, time_embed_dim, true);
        let cond_proj = cond_proj_dim.map(|d| linear(vs / "cond_proj", d, in_channels, false));
        let linear_2 = linear(
            vs / "linear_2",
            time_embed_dim,
            out_dim.unwrap_or(time_embed_dim),
            true,
        );
        Self {
            linear_1,
            act,
            linear_2,
            cond_proj,
            post_act,
        }
    }

    /// Embeds `sample` (`[N, in_channels]`), adding the projected `condition` when given.
    pub fn forward(&self, sample: &Tensor, condition: Option<&Tensor>) -> Tensor {
        let sample = match (condition, &self.cond_proj) {
            (Some(c), Some(proj)) => sample + proj.forward(c),
            _ => sample.shallow_clone(),
        };
        let xs = self.act.forward(&self.linear_1.forward(&sample));
        let xs = self.linear_2.forward(&xs);
        match self.post_act {
            Some(a) => a.forward(&xs),
            None => xs,
        }
    }
}

/// diffusers' `AttentionPooling` (from DeepFloyd IF): one query, the mean token plus a learned
/// position, attends over itself and the tokens; returns `[batch, dim]`.
#[derive(Debug)]
struct AttentionPooling {
    positional_embedding: Tensor,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    num_heads: i64,
}

impl AttentionPooling {
    fn new(vs: &nn::Path, num_heads: i64, dim: i64) -> Self {
        Self {
            positional_embedding: crate::weights::param(vs, "positional_embedding", &[1, dim]),
            q_proj: linear(vs / "q_proj", dim, dim, true),
            k_proj: linear(vs / "k_proj", dim, dim, true),
            v_proj: linear(vs / "v_proj", dim, dim, true),
            num_heads,
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let size = xs.size();
        let (batch, dim) = (size[0], size[2]);
        let per_head = dim / self.num_heads;
        // [batch, len, dim] -> [batch * heads, per_head, len], as diffusers' `shape`.
        let shape = |t: Tensor| {
            t.reshape([batch, -1, self.num_heads, per_head])
                .transpose(1, 2)
                .reshape([batch * self.num_heads, -1, per_head])
                .transpose(1, 2)
        };
        let class_token = xs.mean_dim(1, true, None) + self.positional_embedding.to_kind(xs.kind());
        let xs = Tensor::cat(&[&class_token, xs], 1);
        let q = shape(self.q_proj.forward(&class_token));
        let k = shape(self.k_proj.forward(&xs));
        let v = shape(self.v_proj.forward(&xs));
        // Scaling both sides is more stable in half precision than scaling the product.
        let scale = 1.0 / (per_head as f64).sqrt().sqrt();
        let weight = Tensor::einsum("bct,bcs->bts", &[q * scale, k * scale], None::<i64>);
        let weight = weight
            .to_kind(Kind::Float)
            .softmax(-1, Kind::Float)
            .to_kind(weight.kind());
        let a = Tensor::einsum("bts,bcs->bct", &[weight, v], None::<i64>);
        a.reshape([batch, -1, 1]).transpose(1, 2).select(1, 0)
    }
}

/// diffusers' `TextTimeEmbedding` (`addition_embed_type="text"`): layer norm, attention pooling
/// of the text tokens, projection to the time-embedding width, layer norm.
#[derive(Debug)]
pub struct TextTimeEmbedding {
    norm1: nn::LayerNorm,
    pool: AttentionPooling,
    proj: Linear,
    norm2: nn::LayerNorm,
}

impl TextTimeEmbedding {
    /// Builds the embedding under `vs` from `encoder_dim`-wide tokens to `time_embed_dim`.
    pub fn new(vs: &nn::Path, encoder_dim: i64, time_embed_dim: i64, num_heads: i64) -> Self {
        Self {
            norm1: layer_norm(vs / "norm1", encoder_dim, 1e-5),
            pool: AttentionPooling::new(&(vs / "pool"), num_heads, encoder_dim),
            proj: linear(vs / "proj", encoder_dim, time_embed_dim, true),
            norm2: layer_norm(vs / "norm2", time_embed_dim, 1e-5),
        }
    }

    /// Embeds `[batch, tokens, encoder_dim]` text states as `[batch, time_embed_dim]`.
    pub fn forward(&self, hidden_states: &Tensor) -> Tensor {
        let xs = self.pool.forward(&self.norm1.forward(hidden_states));
        self.norm2.forward(&self.proj.forward(&xs))
    }
}
