//! The down, mid and up blocks of `UNet2DConditionModel`, following diffusers
//! `models/unets/unet_2d_blocks.py` (`DownBlock2D`, `CrossAttnDownBlock2D`, `UNetMidBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `UpBlock2D`, `CrossAttnUpBlock2D`).

use tch::nn;
use tch::Tensor;

use crate::attention::{Transformer2DConfig, Transformer2DModel};
use crate::resnet::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};

/// Resnet settings shared by every block of one UNet.
#[derive(Debug, Clone, Copy)]
pub struct ResnetSettings {
    /// Width of the timestep embedding fed to every resnet.
    pub temb_channels: i64,
    /// Group-norm groups (`norm_num_groups`).
    pub groups: i64,
    /// Group-norm epsilon (`norm_eps`).
    pub eps: f64,
}

impl ResnetSettings {
    fn resnet(&self, vs: &nn::Path, in_channels: i64, out_channels: i64) -> ResnetBlock2D {
        self.resnet_scaled(vs, in_channels, out_channels, 1.0)
    }

    fn resnet_scaled(
        &self,
        vs: &nn::Path,
        in_channels: i64,
        out_channels: i64,
        output_scale_factor: f64,
    ) -> ResnetBlock2D {
        ResnetBlock2D::new(
            vs,
            &ResnetBlock2DConfig {
                in_channels,
                out_channels,
                temb_channels: Some(self.temb_channels),
                groups: self.groups,
                groups_out: None,
                eps: self.eps,
                output_scale_factor,
                use_in_shortcut: None,
            },
        )
    }
}

/// Cross-attention settings of one block: what its `Transformer2DModel`s are built from.
#[derive(Debug, Clone)]
pub struct CrossAttnSettings {
    /// `BasicTransformerBlock`s in each of the block's transformers (one entry per layer).
    pub transformer_layers: Vec<i64>,
    /// Attention heads (diffusers' `num_attention_heads`, i.e. usually `attention_head_dim`).
    pub num_attention_heads: i64,
    /// Feature width of `encoder_hidden_states`.
    pub cross_attention_dim: i64,
    /// Linear rather than 1x1-conv `proj_in`/`proj_out`.
    pub use_linear_projection: bool,
    /// `attn1` is a cross-attention too.
    pub only_cross_attention: bool,
    /// Compute attention in f32 for half-precision models.
    pub upcast_attention: bool,
}

impl CrossAttnSettings {
    fn transformer(
        &self,
        vs: &nn::Path,
        layer: usize,
        channels: i64,
        groups: i64,
    ) -> Transformer2DModel {
        let heads = self.num_attention_heads;
        Transformer2DModel::new(
            vs,
            &Transformer2DConfig {
                num_attention_heads: heads,
                attention_head_dim: channels / heads,
                in_channels: channels,
                num_layers: self.transformer_layers.get(layer).copied().unwrap_or(1),
                cross_attention_dim: self.cross_attention_dim,
                norm_num_groups: groups,
                use_linear_projection: self.use_linear_projection,
                only_cross_attention: self.only_cross_attention,
                upcast_attention: self.upcast_attention,
            },
        )
    }
}

/// Shape of one down block.
#[derive(Debug, Clone, Copy)]
pub struct DownBlockConfig {
    /// Channels coming in.
    pub in_channels: i64,
    /// Channels of every resnet output.
    pub out_channels: i64,
    /// Resnets (and transformers, for the cross-attention variant).
    pub num_layers: i64,
    /// Ends with a stride-2 `Downsample2D` (all but the last block).
    pub add_downsample: bool,
    /// Padding of the downsampling conv.
    pub downsample_padding: i64,
}

/// A down block, with or without cross-attention.
#[derive(Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// diffusers' `DownBlock2D` (`cross_attn` `None`) or `CrossAttnDownBlock2D`.
    pub fn new(
        vs: &nn::Path,
        cfg: &DownBlockConfig,
        resnet: &ResnetSettings,
        cross_attn: Option<&CrossAttnSettings>,
    ) -> Self {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..cfg.num_layers {
            let in_ch = if i == 0 {
                cfg.in_channels
            } else {
                cfg.out_channels
            };
            resnets.push(resnet.resnet(&(vs / "resnets" / i), in_ch, cfg.out_channels));
            if let Some(ca) = cross_attn {
                attentions.push(ca.transformer(
                    &(vs / "attentions" / i),
                    i as usize,
                    cfg.out_channels,
                    resnet.groups,
                ));
            }
        }
        let downsampler = cfg.add_downsample.then(|| {
            Downsample2D::new(
                &(vs / "downsamplers" / 0),
                cfg.out_channels,
                true,
                cfg.out_channels,
                cfg.downsample_padding,
            )
        });
        Self {
            resnets,
            attentions,
            downsampler,
        }
    }

    /// Whether this block attends to `encoder_hidden_states`.
    pub fn has_cross_attention(&self) -> bool {
        !self.attentions.is_empty()
    }

    /// How many skip connections [`DownBlock::forward`] returns.
    pub fn num_outputs(&self) -> usize {
        self.resnets.len() + usize::from(self.downsampler.is_some())
    }

    /// Runs the block; returns the output and the skip connections for the up path.
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> (Tensor, Vec<Tensor>) {
        let mut outputs = Vec::with_capacity(self.num_outputs());
        let mut xs = xs.shallow_clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, Some(temb));
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, encoder_hidden_states);
            }
            outputs.push(xs.shallow_clone());
        }
        if let Some(down) = &self.downsampler {
            xs = down.forward(&xs);
            outputs.push(xs.shallow_clone());
        }
        (xs, outputs)
    }
}

/// The mid block: `UNetMidBlock2DCrossAttn` (resnet, then transformer + resnet) or, without
/// cross-attention, `UNetMidBlock2D` as `get_mid_block` builds it (a single resnet).
#[derive(Debug)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    /// Builds the mid block on `channels` channels; resnets divide by `output_scale_factor`.
    pub fn new(
        vs: &nn::Path,
        channels: i64,
        output_scale_factor: f64,
        resnet: &ResnetSettings,
        cross_attn: Option<&CrossAttnSettings>,
    ) -> Self {
        let mut resnets = vec![resnet.resnet_scaled(
            &(vs / "resnets" / 0),
            channels,
            channels,
            output_scale_factor,
        )];
        let mut attentions = Vec::new();
        if let Some(ca) = cross_attn {
            attentions.push(ca.transformer(&(vs / "attentions" / 0), 0, channels, resnet.groups));
            resnets.push(resnet.resnet_scaled(
                &(vs / "resnets" / 1),
                channels,
                channels,
                output_scale_factor,
            ));
        }
        Self {
            resnets,
            attentions,
        }
    }

    /// Runs the block.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, encoder_hidden_states: &Tensor) -> Tensor {
        let mut xs = xs.shallow_clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            if i > 0 {
                if let Some(attn) = self.attentions.get(i - 1) {
                    xs = attn.forward(&xs, encoder_hidden_states);
                }
            }
            xs = resnet.forward(&xs, Some(temb));
        }
        xs
    }
}

/// Shape of one up block.
#[derive(Debug, Clone, Copy)]
pub struct UpBlockConfig {
    /// Channels of the skip connection taken by the last resnet.
    pub in_channels: i64,
    /// Channels coming from the previous up block (or the mid block).
    pub prev_output_channel: i64,
    /// Channels of every resnet output.
    pub out_channels: i64,
    /// Resnets (and transformers); one more than the matching down block's layers.
    pub num_layers: i64,
    /// Ends with an `Upsample2D` (all but the last block).
    pub add_upsample: bool,
}

/// An up block, with or without cross-attention.
#[derive(Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// diffusers' `UpBlock2D` (`cross_attn` `None`) or `CrossAttnUpBlock2D`.
    pub fn new(
        vs: &nn::Path,
        cfg: &UpBlockConfig,
        resnet: &ResnetSettings,
        cross_attn: Option<&CrossAttnSettings>,
    ) -> Self {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..cfg.num_layers {
            let res_skip = if i == cfg.num_layers - 1 {
                cfg.in_channels
            } else {
                cfg.out_channels
            };
            let res_in = if i == 0 {
                cfg.prev_output_channel
            } else {
                cfg.out_channels
            };
            resnets.push(resnet.resnet(&(vs / "resnets" / i), res_in + res_skip, cfg.out_channels));
            if let Some(ca) = cross_attn {
                attentions.push(ca.transformer(
                    &(vs / "attentions" / i),
                    i as usize,
                    cfg.out_channels,
                    resnet.groups,
                ));
            }
        }
        let upsampler = cfg
            .add_upsample
            .then(|| Upsample2D::new(&(vs / "upsamplers" / 0), cfg.out_channels, cfg.out_channels));
        Self {
            resnets,
            attentions,
            upsampler,
        }
    }

    /// How many skip connections the block consumes.
    pub fn num_inputs(&self) -> usize {
        self.resnets.len()
    }

    /// Runs the block, consuming `res_hidden_states` from the last one backwards; the upsampler
    /// targets `upsample_size` when given, else twice the size.
    pub fn forward(
        &self,
        xs: &Tensor,
        res_hidden_states: &[Tensor],
        temb: &Tensor,
        encoder_hidden_states: &Tensor,
        upsample_size: Option<(i64, i64)>,
    ) -> Tensor {
        let mut xs = xs.shallow_clone();
        for (i, (resnet, res)) in self
            .resnets
            .iter()
            .zip(res_hidden_states.iter().rev())
            .enumerate()
        {
            xs = Tensor::cat(&[&xs, res], 1);
            xs = resnet.forward(&xs, Some(temb));
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, encoder_hidden_states);
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&xs, upsample_size),
            None => xs,
        }
    }
}
