//! ResNet building blocks shared by the UNet and the VAE, following diffusers'
//! `models/resnet.py` (`ResnetBlock2D`), `models/downsampling.py` (`Downsample2D`) and
//! `models/upsampling.py` (`Upsample2D`).

use tch::nn::{self, Module};
use tch::Tensor;

use crate::weights;

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
        }
    }
}

/// diffusers' `ResnetBlock2D` with `time_embedding_norm="default"` and the SiLU non-linearity.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    time_emb_proj: Option<nn::Linear>,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    /// Declares the block's parameters under `vs` (`norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`).
    pub fn new(vs: &nn::Path, cfg: &ResnetBlock2DConfig) -> Self {
        let groups_out = cfg.groups_out.unwrap_or(cfg.groups);
        let norm1 = weights::group_norm(vs / "norm1", cfg.groups, cfg.in_channels, cfg.eps);
        let conv1 = weights::conv2d(vs / "conv1", cfg.in_channels, cfg.out_channels, 3, 1, 1);
        let time_emb_proj = cfg
            .temb_channels
            .map(|t| weights::linear(vs / "time_emb_proj", t, cfg.out_channels, true));
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
        }
    }

    /// Applies the block to `xs` (`[B, C, H, W]`); `temb` (`[B, temb_channels]`) is added after `conv1` when the block has a projection.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let mut hs = self.conv1.forward(&self.norm1.forward(xs).silu());
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&temb.silu()).unsqueeze(-1).unsqueeze(-1);
            hs += t;
        }
        let hs = self.conv2.forward(&self.norm2.forward(&hs).silu());
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs),
            None => xs.shallow_clone(),
        };
        let out = shortcut + hs;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

/// diffusers' `Downsample2D`: a stride-2 3x3 conv named `conv` (or 2x2 average pooling without conv).
#[derive(Debug)]
pub struct Downsample2D {
    conv: Option<nn::Conv2D>,
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
            None => xs.avg_pool2d([2i64, 2], [2i64, 2], [0i64, 0], false, true, None::<i64>),
        }
    }
}

/// diffusers' `Upsample2D` with `use_conv=True`: nearest-neighbour 2x (or to a given size), then a 3x3 conv named `conv`.
#[derive(Debug)]
pub struct Upsample2D {
    conv: nn::Conv2D,
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
            None => {
                let (h, w) = match xs.size()[..] {
                    [_, _, h, w] => (h, w),
                    _ => (0, 0),
                };
                xs.upsample_nearest2d([2 * h, 2 * w], 2.0, 2.0)
            }
        };
        self.conv.forward(&up)
    }
}
