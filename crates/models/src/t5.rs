//! The T5 text encoder DeepFloyd IF conditions on (T5 v1.1: gated-GELU feed-forward, RMS layer
//! norm, no biases, relative position buckets from the first layer), following transformers 5.24
//! `models/t5/modeling_t5.py` (`T5EncoderModel`) and `configuration_t5.py` (`T5Config`).
//!
//! Forward passes take `&self` and never mutate weights, so one loaded model serves many threads.

use crate::layers::Linear;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use serde::Deserialize;
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::weights;

fn default_vocab_size() -> i64 {
    32128
}
fn default_d_model() -> i64 {
    512
}
fn default_d_kv() -> i64 {
    64
}
fn default_d_ff() -> i64 {
    2048
}
fn default_num_layers() -> i64 {
    6
}
fn default_num_heads() -> i64 {
    8
}
fn default_num_buckets() -> i64 {
    32
}
fn default_max_distance() -> i64 {
    128
}
fn default_layer_norm_epsilon() -> f64 {
    1e-6
}
fn default_feed_forward_proj() -> String {
    "relu".to_string()
}

/// Mirror of `text_encoder/config.json` (`T5Config`, the fields the encoder uses), with
/// transformers' defaults for omitted fields.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct T5Config {
    /// Size of the token embedding table (`shared`).
    #[serde(default = "default_vocab_size")]
    pub vocab_size: i64,
    /// Width of the model.
    #[serde(default = "default_d_model")]
    pub d_model: i64,
    /// Width of each attention head.
    #[serde(default = "default_d_kv")]
    pub d_kv: i64,
    /// Width of the feed-forward.
    #[serde(default = "default_d_ff")]
    pub d_ff: i64,
    /// Encoder blocks.
    #[serde(default = "default_num_layers")]
    pub num_layers: i64,
    /// Attention heads per block.
    #[serde(default = "default_num_heads")]
    pub num_heads: i64,
    /// Relative position buckets.
    #[serde(default = "default_num_buckets")]
    pub relative_attention_num_buckets: i64,
    /// Distance beyond which relative positions share a bucket.
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: i64,
    /// Epsilon of every RMS layer norm.
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    /// `"gated-gelu"` (T5 v1.1, IF), `"relu"` (original T5) or `"[gated-]ACT"`.
    #[serde(default = "default_feed_forward_proj")]
    pub feed_forward_proj: String,
}

/// The feed-forward's activation, as `T5Config` derives `dense_act_fn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DenseAct {
    Relu,
    /// transformers' `gelu_new` (the tanh approximation, written out).
    GeluNew,
    Gelu,
    Silu,
}

impl DenseAct {
    fn forward(self, xs: &Tensor) -> Tensor {
        match self {
            Self::Relu => xs.relu(),
            Self::GeluNew => {
                let inner = (xs + xs.pow_tensor_scalar(3.0) * 0.044715)
                    * (2.0 / std::f64::consts::PI).sqrt();
                xs * 0.5 * (inner.tanh() + 1.0)
            }
            Self::Gelu => xs.gelu("none"),
            Self::Silu => xs.silu(),
        }
    }
}

impl T5Config {
    /// `(gated, activation)` from `feed_forward_proj`, as `T5Config.__init__` parses it.
    fn feed_forward(&self) -> Result<(bool, DenseAct)> {
        let proj = self.feed_forward_proj.as_str();
        let (gated, act) = match proj.split_once('-') {
            Some(("gated", act)) => (true, act),
            None => (false, proj),
            Some(_) => {
                return Err(Error::Config(format!(
                    "feed_forward_proj: {proj:?} is not \"ACT\" or \"gated-ACT\""
                )))
            }
        };
        // `gated-gelu` means `gelu_new` for backwards compatibility.
        let act = match (gated, act) {
            (true, "gelu") | (_, "gelu_new") => DenseAct::GeluNew,
            (false, "gelu") => DenseAct::Gelu,
            (_, "relu") => DenseAct::Relu,
            (_, "silu" | "swish") => DenseAct::Silu,
            (_, other) => {
                return Err(Error::Config(format!(
                    "feed_forward_proj: activation {other:?} is not supported"
                )))
            }
        };
        Ok((gated, act))
    }

    fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            (
                "relative_attention_num_buckets",
                self.relative_attention_num_buckets,
            ),
        ] {
            if v <= 0 {
                return Err(Error::Config(format!("{name}: {v} must be positive")));
            }
        }
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets / 4 {
            return Err(Error::Config(format!(
                "relative_attention_max_distance: {} must exceed relative_attention_num_buckets / 4",
                self.relative_attention_max_distance
            )));
        }
        self.feed_forward().map(|_| ())
    }
}

/// `T5LayerNorm`: RMS norm without mean subtraction or bias, computed in f32.
#[derive(Debug)]
struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn new(vs: nn::Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: weights::param(vs, "weight", &[dim]),
            eps,
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let variance = xs
            .to_kind(Kind::Float)
            .pow_tensor_scalar(2.0)
            .mean_dim(-1, true, None);
        let xs = xs * (variance + self.eps).rsqrt();
        let xs = match self.weight.kind() {
            k @ (Kind::Half | Kind::BFloat16) => xs.to_kind(k),
            _ => xs,
        };
        &self.weight * xs
    }
}

/// transformers' `T5Attention._relative_position_bucket` (bidirectional), `[q, k]` bucket ids.
fn relative_position_buckets(
    query_length: i64,
    key_length: i64,
    num_buckets: i64,
    max_distance: i64,
    device: Device,
) -> Tensor {
    let context = Tensor::arange(query_length, (Kind::Int64, device)).unsqueeze(1);
    let memory = Tensor::arange(key_length, (Kind::Int64, device)).unsqueeze(0);
    let relative_position = memory - context;
    let num_buckets = num_buckets / 2;
    let buckets = relative_position.gt(0).to_kind(Kind::Int64) * num_buckets;
    let relative_position = relative_position.abs();
    let max_exact = num_buckets / 2;
    let is_small = relative_position.lt(max_exact);
    let if_large = (relative_position.to_kind(Kind::Float) / max_exact as f64).log()
        / (max_distance as f64 / max_exact as f64).ln()
        * (num_buckets - max_exact) as f64;
    let if_large = (if_large.to_kind(Kind::Int64) + max_exact).clamp_max(num_buckets - 1);
    buckets + relative_position.where_self(&is_small, &if_large)
}

/// `T5Attention` of the encoder: no biases and no `1/sqrt(d)` scaling (folded into the weights).
#[derive(Debug)]
struct T5Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    relative_attention_bias: Option<nn::Embedding>,
    num_heads: i64,
    d_kv: i64,
}

impl T5Attention {
    fn new(vs: nn::Path, cfg: &T5Config, has_relative_attention_bias: bool) -> Self {
        let inner = cfg.num_heads * cfg.d_kv;
        Self {
            q: weights::linear(&vs / "q", cfg.d_model, inner, false),
            k: weights::linear(&vs / "k", cfg.d_model, inner, false),
            v: weights::linear(&vs / "v", cfg.d_model, inner, false),
            o: weights::linear(&vs / "o", inner, cfg.d_model, false),
            relative_attention_bias: has_relative_attention_bias.then(|| {
                weights::embedding(
                    &vs / "relative_attention_bias",
                    cfg.relative_attention_num_buckets,
                    cfg.num_heads,
                )
            }),
            num_heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        }
    }

    /// `[1, heads, len, len]` position bias from the relative position buckets.
    fn compute_bias(&self, len: i64, cfg: &T5Config, device: Device) -> Option<Tensor> {
        let bias = self.relative_attention_bias.as_ref()?;
        let buckets = relative_position_buckets(
            len,
            len,
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
            device,
        );
        Some(bias.forward(&buckets).permute([2, 0, 1]).unsqueeze(0))
    }

    /// Attends `xs` (`[B, T, d_model]`) to itself with `position_bias` (`[B or 1, heads, T, T]`,
    /// padded keys already at the dtype's lowest value) added to the unscaled scores, through SDPA
    /// as transformers 5.24 runs it by default.
    fn forward(&self, xs: &Tensor, position_bias: &Tensor) -> Tensor {
        let batch = xs.size()[0];
        let split = |t: Tensor| {
            t.view([batch, -1, self.num_heads, self.d_kv])
                .transpose(1, 2)
        };
        let q = split(self.q.forward(xs));
        let k = split(self.k.forward(xs));
        let v = split(self.v.forward(xs));
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            Some(position_bias),
            0.0,
            false,
            Some(1.0),
            false,
        )
        .transpose(1, 2)
        .contiguous()
        .view([batch, -1, self.num_heads * self.d_kv]);
        self.o.forward(&out)
    }
}

/// `T5DenseActDense` / `T5DenseGatedActDense`.
#[derive(Debug)]
struct T5Dense {
    wi: Linear,
    /// `wi_1`, the linear half of the gated variant (`wi` is then `wi_0`).
    wi_1: Option<Linear>,
    wo: Linear,
    act: DenseAct,
}

impl T5Dense {
    fn new(vs: nn::Path, cfg: &T5Config, gated: bool, act: DenseAct) -> Self {
        let (wi, wi_1) = if gated {
            (
                weights::linear(&vs / "wi_0", cfg.d_model, cfg.d_ff, false),
                Some(weights::linear(&vs / "wi_1", cfg.d_model, cfg.d_ff, false)),
            )
        } else {
            (
                weights::linear(&vs / "wi", cfg.d_model, cfg.d_ff, false),
                None,
            )
        };
        Self {
            wi,
            wi_1,
            wo: weights::linear(&vs / "wo", cfg.d_ff, cfg.d_model, false),
            act,
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let hidden = self.act.forward(&self.wi.forward(xs));
        let hidden = match &self.wi_1 {
            Some(wi_1) => hidden * wi_1.forward(xs),
            None => hidden,
        };
        self.wo.forward(&hidden)
    }
}

/// One `T5Block` of the encoder: pre-normed self-attention and feed-forward, each residual.
#[derive(Debug)]
struct T5Block {
    attention_norm: T5LayerNorm,
    attention: T5Attention,
    ff_norm: T5LayerNorm,
    ff: T5Dense,
}

/// `torch.finfo(torch.float16).max`.
const F16_MAX: f64 = 65504.0;
/// `torch.finfo(torch.bfloat16).max`.
const BF16_MAX: f64 = 3.389_531_389_251_535_5e38;

/// transformers clamps float16 activations, once any overflowed, to keep them finite.
fn clamp_inf(xs: Tensor) -> Tensor {
    if xs.kind() == Kind::Half && xs.isinf().any().int64_value(&[]) != 0 {
        let max = F16_MAX - 1000.0;
        xs.clamp(-max, max)
    } else {
        xs
    }
}

impl T5Block {
    fn new(vs: nn::Path, cfg: &T5Config, first: bool, gated: bool, act: DenseAct) -> Self {
        let layer = &vs / "layer";
        let attn = &layer / 0;
        let ff = &layer / 1;
        Self {
            attention_norm: T5LayerNorm::new(
                &attn / "layer_norm",
                cfg.d_model,
                cfg.layer_norm_epsilon,
            ),
            attention: T5Attention::new(&attn / "SelfAttention", cfg, first),
            ff_norm: T5LayerNorm::new(&ff / "layer_norm", cfg.d_model, cfg.layer_norm_epsilon),
            ff: T5Dense::new(&ff / "DenseReluDense", cfg, gated, act),
        }
    }

    fn forward(&self, xs: &Tensor, position_bias: &Tensor) -> Tensor {
        let xs = clamp_inf(
            xs + self
                .attention
                .forward(&self.attention_norm.forward(xs), position_bias),
        );
        clamp_inf(&xs + self.ff.forward(&self.ff_norm.forward(&xs)))
    }
}

/// transformers' `T5EncoderModel`: token embeddings, encoder blocks, final RMS norm.
#[derive(Debug)]
pub struct T5EncoderModel {
    shared: nn::Embedding,
    blocks: Vec<T5Block>,
    final_layer_norm: T5LayerNorm,
    config: T5Config,
    kind: Kind,
    device: Device,
    _vs: Option<VarStore>,
}

// SAFETY: the model only holds tensors that are never mutated after loading (forward reads them),
// and concurrent reads of a libtorch tensor from several threads are safe.
unsafe impl Sync for T5EncoderModel {}

/// Maps checkpoint keys to this module's paths: the encoder's `embed_tokens` is tied to `shared`
/// (checkpoints carry either or both).
pub fn t5_rename(key: &str) -> String {
    if key == "encoder.embed_tokens.weight" {
        "shared.weight".to_string()
    } else {
        key.to_string()
    }
}

impl T5EncoderModel {
    /// Declares the parameters under `vs` at the checkpoint's paths (`shared.weight`,
    /// `encoder.block.N.layer.0.SelfAttention.q.weight`, …).
    pub fn new(vs: &nn::Path, cfg: T5Config) -> Result<Self> {
        cfg.validate()?;
        let (gated, act) = cfg.feed_forward()?;
        let encoder = vs / "encoder";
        let blocks = (0..cfg.num_layers)
            .map(|i| T5Block::new(&encoder / "block" / i, &cfg, i == 0, gated, act))
            .collect();
        Ok(Self {
            shared: weights::embedding(vs / "shared", cfg.vocab_size, cfg.d_model),
            blocks,
            final_layer_norm: T5LayerNorm::new(
                &encoder / "final_layer_norm",
                cfg.d_model,
                cfg.layer_norm_epsilon,
            ),
            kind: vs.kind(),
            device: vs.device(),
            config: cfg,
            _vs: None,
        })
    }

    /// Loads `config.json` and the (optionally `variant`, possibly sharded) safetensors weights
    /// of `component_dir` as `kind` on `device`.
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
            &t5_rename,
            weights::Layout::Contiguous,
            |p, config: T5Config| Self::new(p, config),
        )?;
        model._vs = Some(vs);
        Ok(model)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &T5Config {
        &self.config
    }

    /// `last_hidden_state` (`[B, T, d_model]`) for `input_ids` (`[B, T]`, integer) and an
    /// `attention_mask` (`[B, T]`, 1 = attend, 0 = padding) when given.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let size = input_ids.size();
        let [batch, len] = size[..] else {
            return Err(Error::Input(format!(
                "input_ids: shape {size:?}, expected [batch, tokens]"
            )));
        };
        if batch == 0 || len == 0 {
            return Err(Error::Input(format!("input_ids: empty, shape {size:?}")));
        }
        if !matches!(
            input_ids.kind(),
            Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8
        ) {
            return Err(Error::Input(format!(
                "input_ids: dtype {:?} is not an integer type",
                input_ids.kind()
            )));
        }
        let input_ids = input_ids.to_device(self.device).to_kind(Kind::Int64);
        let (min, max) = (
            input_ids.min().int64_value(&[]),
            input_ids.max().int64_value(&[]),
        );
        if min < 0 || max >= self.config.vocab_size {
            return Err(Error::Input(format!(
                "input_ids: ids must be in [0, {}), got [{min}, {max}]",
                self.config.vocab_size
            )));
        }
        if let Some(m) = attention_mask {
            if m.size() != size {
                return Err(Error::Input(format!(
                    "attention_mask: shape {:?}, expected {size:?}",
                    m.size()
                )));
            }
        }
        let run = || {
            let _guard = tch::no_grad_guard();
            self.forward_unchecked(&input_ids, attention_mask)
        };
        catch_unwind(AssertUnwindSafe(run)).map_err(|payload| {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "T5 forward panicked".to_string());
            Error::Torch(tch::TchError::Torch(msg))
        })
    }

    fn forward_unchecked(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Tensor {
        let len = input_ids.size()[1];
        let mut xs = self.shared.forward(input_ids);
        let first = self.blocks.first().map(|b| &b.attention);
        let mut position_bias = first
            .and_then(|a| a.compute_bias(len, &self.config, self.device))
            .unwrap_or_else(|| {
                Tensor::zeros(
                    [1, self.config.num_heads, len, len],
                    (self.kind, self.device),
                )
            })
            .to_kind(self.kind);
        if let Some(mask) = attention_mask {
            // Padding keys get the dtype's lowest value (transformers' `create_position_bias_mask`).
            let min = match self.kind {
                Kind::Half => -F16_MAX,
                Kind::BFloat16 => -BF16_MAX,
                Kind::Double => f64::MIN,
                _ => f64::from(f32::MIN),
            };
            let keep = mask.to_device(self.device).ne(0).unsqueeze(1).unsqueeze(1);
            let lowest = Tensor::full([1], min, (self.kind, self.device));
            position_bias = position_bias.where_self(&keep, &lowest).contiguous();
        }
        for block in &self.blocks {
            xs = block.forward(&xs, &position_bias);
        }
        self.final_layer_norm.forward(&xs)
    }
}
