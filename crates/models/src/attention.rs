//! Attention and transformer blocks of the diffusers UNet, following diffusers
//! `models/attention_processor.py` (`Attention` with `AttnProcessor2_0`), `models/attention.py`
//! (`BasicTransformerBlock`, `FeedForward`), `models/activations.py` (`GEGLU`) and
//! `models/transformers/transformer_2d.py` (`Transformer2DModel`, continuous input); the added-KV
//! attention of the `SimpleCrossAttn` blocks follows `AttnAddedKVProcessor2_0`.

use crate::layers::{Conv2d, Linear};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::weights::{conv2d, group_norm, layer_norm, linear};

/// Attention-score elements per sample (`heads × queries × keys`) up to which a bf16 CPU
/// attention runs as two matmuls around a softmax rather than libtorch's fused kernel (see
/// [`scaled_dot_product`]). Per sample, not per call: the store joins requests' calls into one
/// batch (`autopipe_store` step-level batching), and a joined call must take the same path as
/// each call alone or its images would change.
const EXPLICIT_BF16_SCORES: i64 = 1 << 20;

/// `softmax(q kᵀ / √d + mask) v` on `[batch, heads, tokens, head_dim]`: PyTorch's
/// `scaled_dot_product_attention` (no dropout, not causal), as diffusers' `AttnProcessor2_0` calls
/// it; `mask` is additive, broadcastable to the scores.
///
/// In bf16 on the CPU, libtorch's fused (flash) kernel computes in fp32 tiles and is slower than
/// plain bf16 matmuls when the scores are small: on this project's 2-core AVX-512 machine,
/// single-threaded, 256 self-attention tokens 3.7 → 1.3 ms, 1024 tokens × 77 text tokens 4.0 →
/// 1.5 ms, the VAE's 1024-token single 512-wide head 39 → 10 ms (all batch 2 but the VAE's); from
/// ~2 M score elements per sample up (SD's 1024-token self-attention, 8 M: 34 vs 41 ms) the fused
/// kernel wins. So up to [`EXPLICIT_BF16_SCORES`] per sample the scores are one bf16 matmul, the
/// softmax runs in fp32 (as the fused kernel's does) and is rounded to bf16 for the second
/// matmul. Other dtypes and devices, and larger scores, use the fused kernel.
pub(crate) fn scaled_dot_product(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Tensor {
    let (qs, ks) = (q.size(), k.size());
    // Heads × queries × keys: every dim of `q` but the batch and the head width.
    let scores: i64 = qs[1..qs.len() - 1].iter().product::<i64>() * ks[ks.len() - 2];
    if q.kind() == Kind::BFloat16 && q.device() == Device::Cpu && scores <= EXPLICIT_BF16_SCORES {
        let scale = (qs[qs.len() - 1] as f64).powf(-0.5);
        let s = q.matmul(&k.transpose(-2, -1)).to_kind(Kind::Float) * scale;
        let s = match mask {
            Some(m) => s + m.to_kind(Kind::Float),
            None => s,
        };
        return s.softmax(-1, Kind::Float).to_kind(Kind::BFloat16).matmul(v);
    }
    Tensor::scaled_dot_product_attention(q, k, v, mask, 0.0, false, None, false)
}

/// diffusers' `Attention` as used by `BasicTransformerBlock`: multi-head (cross-)attention on
/// `[batch, tokens, dim]` through `scaled_dot_product_attention`.
#[derive(Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: i64,
    upcast_attention: bool,
}

impl Attention {
    /// Builds `to_q`, `to_k`, `to_v` and `to_out.0`; keys and values come from
    /// `cross_attention_dim` features when given, else from the queries' `query_dim`.
    pub fn new(
        vs: &nn::Path,
        query_dim: i64,
        cross_attention_dim: Option<i64>,
        heads: i64,
        dim_head: i64,
        bias: bool,
        upcast_attention: bool,
    ) -> Self {
        let inner_dim = heads * dim_head;
        let kv_dim = cross_attention_dim.unwrap_or(query_dim);
        Self {
            to_q: linear(vs / "to_q", query_dim, inner_dim, bias),
            to_k: linear(vs / "to_k", kv_dim, inner_dim, bias),
            to_v: linear(vs / "to_v", kv_dim, inner_dim, bias),
            to_out: linear(vs / "to_out" / "0", inner_dim, query_dim, true),
            heads,
            upcast_attention,
        }
    }

    /// Attends from `xs` (`[batch, tokens, query_dim]`) to `context` (or to `xs` itself).
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Tensor {
        self.forward_masked(xs, context, None)
    }

    /// [`Self::forward`] with an additive attention mask broadcastable to
    /// `[batch, heads, queries, keys]`.
    pub fn forward_masked(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> Tensor {
        let batch = xs.size()[0];
        let context = context.unwrap_or(xs);
        let query = self.to_q.forward(xs);
        let key = self.to_k.forward(context);
        let value = self.to_v.forward(context);
        let inner_dim = key.size()[2];
        let head_dim = inner_dim / self.heads;
        let split = |t: Tensor| t.view([batch, -1, self.heads, head_dim]).transpose(1, 2);
        let (query, key, value) = (split(query), split(key), split(value));
        let kind = query.kind();
        // diffusers' SDPA processor ignores `upcast_attention`; the flag exists for checkpoints
        // (SD 2.x) whose attention overflows in half precision, so honour it by computing in f32.
        let upcast = self.upcast_attention && matches!(kind, Kind::Half | Kind::BFloat16);
        let out = if upcast {
            scaled_dot_product(
                &query.to_kind(Kind::Float),
                &key.to_kind(Kind::Float),
                &value.to_kind(Kind::Float),
                mask.map(|m| m.to_kind(Kind::Float)).as_ref(),
            )
            .to_kind(kind)
        } else {
            scaled_dot_product(&query, &key, &value, mask)
        };
        let out = out
            .transpose(1, 2)
            .reshape([batch, -1, self.heads * head_dim]);
        self.to_out.forward(&out)
    }
}

/// diffusers' `Attention` with `added_kv_proj_dim` run by `AttnAddedKVProcessor2_0` (the
/// `SimpleCrossAttn` blocks of DeepFloyd IF and unCLIP UNets): group-normed pixels attend to the
/// projected text tokens (`add_k_proj`/`add_v_proj`) followed, unless `only_cross_attention`, by
/// themselves; the output is added back onto the `[batch, channels, height, width]` input.
#[derive(Debug)]
pub struct AddedKvAttention {
    group_norm: nn::GroupNorm,
    norm_cross: Option<nn::GroupNorm>,
    to_q: Linear,
    /// `to_k`, `to_v`: absent with `only_cross_attention`.
    self_kv: Option<(Linear, Linear)>,
    add_k_proj: Linear,
    add_v_proj: Linear,
    to_out: Linear,
    heads: i64,
}

/// Construction parameters of an [`AddedKvAttention`].
#[derive(Debug, Clone, Copy)]
pub struct AddedKvAttentionConfig {
    /// Channels of the feature map (`query_dim`).
    pub query_dim: i64,
    /// Attention heads.
    pub heads: i64,
    /// Width of each head.
    pub dim_head: i64,
    /// Feature width of `encoder_hidden_states` (`added_kv_proj_dim`).
    pub added_kv_proj_dim: i64,
    /// Groups of the input `group_norm` (eps 1e-5).
    pub norm_num_groups: i64,
    /// Keys and values come from the text tokens only.
    pub only_cross_attention: bool,
    /// `cross_attention_norm="group_norm"`: 32-group norm of the text tokens.
    pub group_norm_cross: bool,
}

impl AddedKvAttention {
    /// Builds the attention under `vs` (`group_norm`, `norm_cross`, `to_q`, `to_k`, `to_v`,
    /// `add_k_proj`, `add_v_proj`, `to_out.0`; every projection with a bias).
    pub fn new(vs: &nn::Path, cfg: &AddedKvAttentionConfig) -> Self {
        let inner_dim = cfg.heads * cfg.dim_head;
        let dim = cfg.query_dim;
        let added = cfg.added_kv_proj_dim;
        Self {
            group_norm: group_norm(vs / "group_norm", cfg.norm_num_groups, dim, 1e-5),
            norm_cross: cfg
                .group_norm_cross
                .then(|| group_norm(vs / "norm_cross", 32, added, 1e-5)),
            to_q: linear(vs / "to_q", dim, inner_dim, true),
            self_kv: (!cfg.only_cross_attention).then(|| {
                (
                    linear(vs / "to_k", dim, inner_dim, true),
                    linear(vs / "to_v", dim, inner_dim, true),
                )
            }),
            add_k_proj: linear(vs / "add_k_proj", added, inner_dim, true),
            add_v_proj: linear(vs / "add_v_proj", added, inner_dim, true),
            to_out: linear(vs / "to_out" / "0", inner_dim, dim, true),
            heads: cfg.heads,
        }
    }

    /// Runs on `xs` (`[batch, channels, height, width]`) attending to `encoder_hidden_states`
    /// (`[batch, tokens, added_kv_proj_dim]`); returns the same shape as `xs`.
    pub fn forward(&self, xs: &Tensor, encoder_hidden_states: &Tensor) -> Tensor {
        let size = xs.size();
        let (batch, channels) = (size[0], size[1]);
        let context = match &self.norm_cross {
            // GroupNorm over the feature dimension: tokens as the spatial axis.
            Some(norm) => norm
                .forward(&encoder_hidden_states.transpose(1, 2))
                .transpose(1, 2),
            None => encoder_hidden_states.shallow_clone(),
        };
        let hs = self
            .group_norm
            .forward(&xs.reshape([batch, channels, -1]))
            .transpose(1, 2);
        let split = |t: Tensor| {
            let inner = t.size()[2];
            t.reshape([batch, -1, self.heads, inner / self.heads])
                .transpose(1, 2)
        };
        let query = split(self.to_q.forward(&hs));
        let mut key = split(self.add_k_proj.forward(&context));
        let mut value = split(self.add_v_proj.forward(&context));
        if let Some((to_k, to_v)) = &self.self_kv {
            key = Tensor::cat(&[key, split(to_k.forward(&hs))], 2);
            value = Tensor::cat(&[value, split(to_v.forward(&hs))], 2);
        }
        let out = scaled_dot_product(&query, &key, &value, None);
        let inner = out.size()[1] * out.size()[3];
        let out = self
            .to_out
            .forward(&out.transpose(1, 2).reshape([batch, -1, inner]));
        out.transpose(1, 2).reshape(size.as_slice()) + xs
    }
}

/// diffusers' `GEGLU`: `proj` to twice the width, then `hidden * gelu(gate)`.
#[derive(Debug)]
pub struct GeGlu {
    proj: Linear,
}

impl GeGlu {
    /// Builds `proj` (`dim_in` → `2 * dim_out`).
    pub fn new(vs: &nn::Path, dim_in: i64, dim_out: i64) -> Self {
        Self {
            proj: linear(vs / "proj", dim_in, dim_out * 2, true),
        }
    }

    /// Applies the gated GELU.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let xs = self.proj.forward(xs);
        let chunks = xs.chunk(2, -1);
        &chunks[0] * chunks[1].gelu("none")
    }
}

/// diffusers' `FeedForward` with the `"geglu"` activation (`net.0` GEGLU, `net.2` Linear).
#[derive(Debug)]
pub struct FeedForward {
    geglu: GeGlu,
    out: Linear,
}

impl FeedForward {
    /// Builds the feed-forward of width `dim * mult`.
    pub fn new(vs: &nn::Path, dim: i64, mult: i64) -> Self {
        let inner_dim = dim * mult;
        let net = vs / "net";
        Self {
            geglu: GeGlu::new(&(&net / "0"), dim, inner_dim),
            out: linear(&net / "2", inner_dim, dim, true),
        }
    }

    /// Applies the feed-forward.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        self.out.forward(&self.geglu.forward(xs))
    }
}

/// Settings shared by every `BasicTransformerBlock` of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub struct TransformerBlockConfig {
    /// Attention heads.
    pub num_attention_heads: i64,
    /// Width of each head.
    pub attention_head_dim: i64,
    /// Feature width of `encoder_hidden_states`.
    pub cross_attention_dim: i64,
    /// `attn1` attends to `encoder_hidden_states` instead of to itself.
    pub only_cross_attention: bool,
    /// Compute attention in f32 for half-precision models.
    pub upcast_attention: bool,
}

/// diffusers' `BasicTransformerBlock` with `norm_type="layer_norm"`: self-attention,
/// cross-attention and a GEGLU feed-forward, each pre-normed and residual.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: nn::LayerNorm,
    attn1: Attention,
    norm2: nn::LayerNorm,
    attn2: Attention,
    norm3: nn::LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
}

impl BasicTransformerBlock {
    /// Builds a block of width `dim`.
    pub fn new(vs: &nn::Path, dim: i64, cfg: &TransformerBlockConfig) -> Self {
        let heads = cfg.num_attention_heads;
        let head_dim = cfg.attention_head_dim;
        let attn1_ctx = cfg.only_cross_attention.then_some(cfg.cross_attention_dim);
        Self {
            norm1: layer_norm(vs / "norm1", dim, 1e-5),
            attn1: Attention::new(
                &(vs / "attn1"),
                dim,
                attn1_ctx,
                heads,
                head_dim,
                false,
                cfg.upcast_attention,
            ),
            norm2: layer_norm(vs / "norm2", dim, 1e-5),
            attn2: Attention::new(
                &(vs / "attn2"),
                dim,
                Some(cfg.cross_attention_dim),
                heads,
                head_dim,
                false,
                cfg.upcast_attention,
            ),
            norm3: layer_norm(vs / "norm3", dim, 1e-5),
            ff: FeedForward::new(&(vs / "ff"), dim, 4),
            only_cross_attention: cfg.only_cross_attention,
        }
    }

    /// Runs the block on `[batch, tokens, dim]`.
    pub fn forward(&self, xs: &Tensor, encoder_hidden_states: &Tensor) -> Tensor {
        let ctx1 = self.only_cross_attention.then_some(encoder_hidden_states);
        let xs = self.attn1.forward(&self.norm1.forward(xs), ctx1) + xs;
        let xs = self
            .attn2
            .forward(&self.norm2.forward(&xs), Some(encoder_hidden_states))
            + xs;
        self.ff.forward(&self.norm3.forward(&xs)) + xs
    }
}

/// Input/output projection of a `Transformer2DModel`: a `Linear` on tokens or a 1x1 `Conv2d` on
/// the feature map, depending on `use_linear_projection`.
#[derive(Debug)]
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

impl Projection {
    fn new(vs: nn::Path, in_dim: i64, out_dim: i64, use_linear: bool) -> Self {
        if use_linear {
            Self::Linear(linear(vs, in_dim, out_dim, true))
        } else {
            Self::Conv(conv2d(vs, in_dim, out_dim, 1, 1, 0))
        }
    }
}

/// Settings of one `Transformer2DModel` inside a UNet block.
#[derive(Debug, Clone, Copy)]
pub struct Transformer2DConfig {
    /// Attention heads.
    pub num_attention_heads: i64,
    /// Width of each head; `heads * head_dim` is the transformer's inner width.
    pub attention_head_dim: i64,
    /// Channels of the feature map it runs on.
    pub in_channels: i64,
    /// Number of stacked `BasicTransformerBlock`s.
    pub num_layers: i64,
    /// Feature width of `encoder_hidden_states`.
    pub cross_attention_dim: i64,
    /// Groups of the input `GroupNorm` (eps 1e-6).
    pub norm_num_groups: i64,
    /// `proj_in`/`proj_out` are `Linear` (SD 2.x, SDXL) rather than 1x1 `Conv2d` (SD 1.x).
    pub use_linear_projection: bool,
    /// `attn1` of every block is a cross-attention.
    pub only_cross_attention: bool,
    /// Compute attention in f32 for half-precision models.
    pub upcast_attention: bool,
}

/// diffusers' `Transformer2DModel` on continuous input: group norm, projection to tokens,
/// transformer blocks, projection back, residual.
#[derive(Debug)]
pub struct Transformer2DModel {
    norm: nn::GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    /// Builds the model under `vs` (`norm`, `proj_in`, `transformer_blocks.N`, `proj_out`).
    pub fn new(vs: &nn::Path, cfg: &Transformer2DConfig) -> Self {
        let inner_dim = cfg.num_attention_heads * cfg.attention_head_dim;
        let norm = group_norm(vs / "norm", cfg.norm_num_groups, cfg.in_channels, 1e-6);
        let proj_in = Projection::new(
            vs / "proj_in",
            cfg.in_channels,
            inner_dim,
            cfg.use_linear_projection,
        );
        let block_cfg = TransformerBlockConfig {
            num_attention_heads: cfg.num_attention_heads,
            attention_head_dim: cfg.attention_head_dim,
            cross_attention_dim: cfg.cross_attention_dim,
            only_cross_attention: cfg.only_cross_attention,
            upcast_attention: cfg.upcast_attention,
        };
        let blocks = vs / "transformer_blocks";
        let transformer_blocks = (0..cfg.num_layers)
            .map(|i| BasicTransformerBlock::new(&(&blocks / i), inner_dim, &block_cfg))
            .collect();
        let proj_out = Projection::new(
            vs / "proj_out",
            inner_dim,
            cfg.in_channels,
            cfg.use_linear_projection,
        );
        Self {
            norm,
            proj_in,
            transformer_blocks,
            proj_out,
        }
    }

    /// Runs on a `[batch, channels, height, width]` map conditioned on `encoder_hidden_states`.
    pub fn forward(&self, xs: &Tensor, encoder_hidden_states: &Tensor) -> Tensor {
        let size = xs.size();
        let (batch, height, width) = (size[0], size[2], size[3]);
        let residual = xs;
        let xs = self.norm.forward(xs);
        let to_tokens = |t: &Tensor| {
            let c = t.size()[1];
            t.permute([0, 2, 3, 1]).reshape([batch, height * width, c])
        };
        let mut xs = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&xs)),
            Projection::Linear(lin) => lin.forward(&to_tokens(&xs)),
        };
        for block in &self.transformer_blocks {
            xs = block.forward(&xs, encoder_hidden_states);
        }
        let to_map = |t: &Tensor| {
            let c = t.size()[2];
            // NHWC viewed as NCHW: channels-last, which the convolution and residual add take as is.
            t.reshape([batch, height, width, c]).permute([0, 3, 1, 2])
        };
        let xs = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(&xs)),
            Projection::Linear(lin) => to_map(&lin.forward(&xs)),
        };
        xs + residual
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Tensor {
        Tensor::scaled_dot_product_attention(q, k, v, mask, 0.0, false, None, false)
    }

    /// Largest |a − b| over the largest |b|.
    fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
        f64::try_from((&a - &b).abs().max()).unwrap() / f64::try_from(b.abs().max()).unwrap()
    }

    #[test]
    fn bf16_small_scores_match_the_fused_kernel_and_other_cases_are_the_fused_kernel() {
        tch::manual_seed(0);
        let cpu = Device::Cpu;
        let r = |dims: &[i64]| Tensor::randn(dims, (Kind::Float, cpu));
        // [batch, heads, queries, head_dim] attending to 77 keys: 2·8·64·77 scores (explicit path).
        let (q, k, v) = (r(&[2, 8, 64, 40]), r(&[2, 8, 77, 40]), r(&[2, 8, 77, 40]));
        let mask = (r(&[2, 1, 1, 77]).gt(0.5).to_kind(Kind::Float)) * -10000.0;
        for mask in [None, Some(&mask)] {
            let want = sdpa(&q, &k, &v, mask);
            // fp32: the fused kernel itself, bit for bit.
            assert!(scaled_dot_product(&q, &k, &v, mask).equal(&want));
            let bf = |t: &Tensor| t.to_kind(Kind::BFloat16);
            let got = scaled_dot_product(&bf(&q), &bf(&k), &bf(&v), mask.map(bf).as_ref());
            assert_eq!(got.kind(), Kind::BFloat16);
            let fused = sdpa(&bf(&q), &bf(&k), &bf(&v), mask.map(bf).as_ref());
            // Both bf16 results are within bf16 rounding of the fp32 one.
            let (d_got, d_fused) = (rel_diff(&got, &want), rel_diff(&fused, &want));
            assert!(
                d_got <= 0.02,
                "explicit bf16: {d_got:.4} (fused {d_fused:.4})"
            );
        }
        // A joined batch takes the path of its calls alone: the same values, bit for bit.
        let bf = |t: &Tensor| t.to_kind(Kind::BFloat16);
        let (q, k) = (bf(&r(&[16, 8, 256, 40])), bf(&r(&[16, 8, 256, 40])));
        let joined = scaled_dot_product(&q, &k, &k, None);
        for i in (0..16).step_by(2) {
            let (qi, ki) = (q.narrow(0, i, 2), k.narrow(0, i, 2));
            let alone = scaled_dot_product(&qi, &ki, &ki, None);
            assert!(
                joined.narrow(0, i, 2).equal(&alone),
                "rows {i}..{} differ",
                i + 2
            );
        }
        // Past the threshold: the fused kernel's result exactly.
        let (q, k) = (r(&[2, 8, 1024, 40]), r(&[2, 8, 1024, 40]));
        let bf = |t: &Tensor| t.to_kind(Kind::BFloat16);
        let (q, k) = (bf(&q), bf(&k));
        assert!(scaled_dot_product(&q, &k, &k, None).equal(&sdpa(&q, &k, &k, None)));
    }
}
