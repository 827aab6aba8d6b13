//! ResNet building blocks shared by the UNet and the VAE, following diffusers'
//! `models/resnet.py` (`ResnetBlock2D`), `models/downsampling.py` (`Downsample2D`) and
//! `models/upsampling.py` (`Upsample2D`).

use crate::layers::{Conv2d, Linear};
use tch::nn::{self, Module};
use tch::Tensor;

use crate::embeddings::Activation;
use crate::weights;

/// How a [`ResnetBlock2D`] applies the timestep embedding (diffusers' `time_embedding_norm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeEmbeddingNorm {
    /// `"default"`: added after `conv1`, before `norm2`.
    Default,
    /// `"scale_shift"`: `norm2(h) * (1 + scale) + shift`, the projection twice as wide (DeepFloyd IF).
    ScaleShift,
}

/// A resampling step inside a [`ResnetBlock2D`] (diffusers' `up=True` / `down=True`), applied to
/// both the input and the normed hidden states before `conv1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// Nearest-neighbour 2x (`Upsample2D(use_conv=False)`).
    Up,
    /// 2x2 average pooling (`Downsample2D(use_conv=False)`).
    Down,
}

/// Construction parameters of a [`ResnetBlock2D`] (the subset of diffusers' arguments used by SD models).
#[derive(Debug, Clone, PartialEq)]
pub struct ResnetBlock2DConfig {
    /// Channels of the input.
    pub in_channels: i64,
    /// Channels of the output.
    pub out_channels: i64,
    /// Width of the timestep embedding, `None` for blocks without one (the VAE).
    pub temb_channels: Option<i64>,
    /// Groups of `norm1` (and of `norm2` unless `groups_out` is set).
    pub groups: i64,
    /// Groups of `norm2`, defaulting to `groups`.
    pub groups_out: Option<i64>,
    /// Epsilon of both group norms.
    pub eps: f64,
    /// The output `(shortcut + hidden)` is divided by this.
    pub output_scale_factor: f64,
    /// Forces the 1x1 `conv_shortcut` on or off; `None` means "when `in_channels != out_channels`".
    pub use_in_shortcut: Option<bool>,
    /// The block's non-linearity (diffusers' `non_linearity`, `"swish"` by default).
    pub non_linearity: Activation,
    /// How the timestep embedding enters.
    pub time_embedding_norm: TimeEmbeddingNorm,
    /// The timestep embedding goes into `time_emb_proj` without the non-linearity first.
    pub skip_time_act: bool,
    /// Up- or downsampling inside the block.
    pub resample: Option<Resample>,
}

impl ResnetBlock2DConfig {
    /// A block from `in_channels` to `out_channels` with diffusers' defaults (32 groups, eps 1e-6, temb 512).
    pub fn new(in_channels: i64, out_channels: i64) -> Self {
        Self {
            in_channels,
            out_channels,
            temb_channels: Some(512),
            groups: 32,
            groups_out: None,
            eps: 1e-6,
            output_scale_factor: 1.0,
            use_in_shortcut: None,
            non_linearity: Activation::Silu,
            time_embedding_norm: TimeEmbeddingNorm::Default,
            skip_time_act: false,
            resample: None,
        }
    }
}

/// diffusers' `ResnetBlock2D` (`pre_norm`, no FIR kernels).
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: nn::GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: nn::GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
    act: Activation,
    time_embedding_norm: TimeEmbeddingNorm,
    skip_time_act: bool,
    resample: Option<Resample>,
}

impl ResnetBlock2D {
    /// Declares the block's parameters under `vs` (`norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`).
    pub fn new(vs: &nn::Path, cfg: &ResnetBlock2DConfig) -> Self {
        let groups_out = cfg.groups_out.unwrap_or(cfg.groups);
        let norm1 = weights::group_norm(vs / "norm1", cfg.groups, cfg.in_channels, cfg.eps);
        let conv1 = weights::conv2d(vs / "conv1", cfg.in_channels, cfg.out_channels, 3, 1, 1);
        let temb_width = match cfg.time_embedding_norm {
            TimeEmbeddingNorm::Default => cfg.out_channels,
            TimeEmbeddingNorm::ScaleShift => 2 * cfg.out_channels,
        };
        let time_emb_proj = cfg
            .temb_channels
            .map(|t| weights::linear(vs / "time_emb_proj", t, temb_width, true));
        let norm2 = weights::group_norm(vs / "norm2", groups_out, cfg.out_channels, cfg.eps);
        let conv2 = weights::conv2d(vs / "conv2", cfg.out_channels, cfg.out_channels, 3, 1, 1);
        let use_in_shortcut = cfg
            .use_in_shortcut
            .unwrap_or(cfg.in_channels != cfg.out_channels);
        let conv_shortcut = use_in_shortcut.then(|| {
            weights::conv2d(
                vs / "conv_shortcut",
                cfg.in_channels,
                cfg.out_channels,
                1,
                1,
                0,
            )
        });
        Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
            act: cfg.non_linearity,
            time_embedding_norm: cfg.time_embedding_norm,
            skip_time_act: cfg.skip_time_act,
            resample: cfg.resample,
        }
    }

    /// Applies the block to `xs` (`[B, C, H, W]`); `temb` (`[B, temb_channels]`) conditions it
    /// after `conv1` when the block has a projection.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let hs = self.act.forward(&self.norm1.forward(xs));
        let (input, hs) = match self.resample {
            None => (xs.shallow_clone(), hs),
            Some(Resample::Up) => (upsample_nearest_2x(xs), upsample_nearest_2x(&hs)),
            Some(Resample::Down) => (avg_pool_2x(xs), avg_pool_2x(&hs)),
        };
        let mut hs = self.conv1.forward(&hs);
        let temb = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                let temb = if self.skip_time_act {
                    temb.shallow_clone()
                } else {
                    self.act.forward(temb)
                };
                Some(proj.forward(&temb).unsqueeze(-1).unsqueeze(-1))
            }
            _ => None,
        };
        let hs = match (self.time_embedding_norm, temb) {
            (TimeEmbeddingNorm::ScaleShift, Some(temb)) => {
                let chunks = temb.chunk(2, 1);
                self.norm2.forward(&hs) * (chunks[0].shallow_clone() + 1.0) + &chunks[1]
            }
            (_, Some(temb)) => {
                hs += temb;
                self.norm2.forward(&hs)
            }
            (_, None) => self.norm2.forward(&hs),
        };
        let hs = self.conv2.forward(&self.act.forward(&hs));
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(&input),
            None => input,
        };
        let out = shortcut + hs;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

/// `F.interpolate(scale_factor=2.0, mode="nearest")` on `[B, C, H, W]`.
fn upsample_nearest_2x(xs: &Tensor) -> Tensor {
    let (h, w) = match xs.size()[..] {
        [_, _, h, w] => (h, w),
        _ => (0, 0),
    };
    xs.upsample_nearest2d([2 * h, 2 * w], 2.0, 2.0)
}

/// `F.avg_pool2d(kernel_size=2, stride=2)` on `[B, C, H, W]`.
fn avg_pool_2x(xs: &Tensor) -> Tensor {
    xs.avg_pool2d([2i64, 2], [2i64, 2], [0i64, 0], false, true, None::<i64>)
}

/// diffusers' `Downsample2D`: a stride-2 3x3 conv named `conv` (or 2x2 average pooling without conv).
#[derive(Debug)]
pub struct Downsample2D {
    conv: Option<Conv2d>,
    padding: i64,
}

impl Downsample2D {
    /// Declares `conv` under `vs` when `use_conv`; `padding == 0` pads `(0, 1, 0, 1)` before the conv, as the VAE encoder does.
    pub fn new(
        vs: &nn::Path,
        channels: i64,
        use_conv: bool,
        out_channels: i64,
        padding: i64,
    ) -> Self {
        let conv =
            use_conv.then(|| weights::conv2d(vs / "conv", channels, out_channels, 3, 2, padding));
        Self { conv, padding }
    }

    /// Halves the spatial size of `xs` (`[B, C, H, W]`).
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        match &self.conv {
            Some(conv) if self.padding == 0 => conv.forward(&xs.constant_pad_nd([0i64, 1, 0, 1])),
            Some(conv) => conv.forward(xs),
            None => avg_pool_2x(xs),
        }
    }
}

/// diffusers' `Upsample2D` with `use_conv=True`: nearest-neighbour 2x (or to a given size), then a 3x3 conv named `conv`.
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// Declares `conv` (`channels -> out_channels`, 3x3, padding 1) under `vs`.
    pub fn new(vs: &nn::Path, channels: i64, out_channels: i64) -> Self {
        Self {
            conv: weights::conv2d(vs / "conv", channels, out_channels, 3, 1, 1),
        }
    }

    /// Upsamples `xs` (`[B, C, H, W]`) by 2, or to `output_size` `(H, W)` when given, then convolves.
    pub fn forward(&self, xs: &Tensor, output_size: Option<(i64, i64)>) -> Tensor {
        let up = match output_size {
            Some((h, w)) => xs.upsample_nearest2d([h, w], None, None),
            None => upsample_nearest_2x(xs),
        };
        self.conv.forward(&up)
    }
}
