//! The down, mid and up blocks of `UNet2DConditionModel`, following diffusers
//! `models/unets/unet_2d_blocks.py` (`DownBlock2D`, `CrossAttnDownBlock2D`,
//! `ResnetDownsampleBlock2D`, `SimpleCrossAttnDownBlock2D`, `UNetMidBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `UNetMidBlock2DSimpleCrossAttn`, `UpBlock2D`, `CrossAttnUpBlock2D`,
//! `ResnetUpsampleBlock2D`, `SimpleCrossAttnUpBlock2D`).

use tch::nn;
use tch::Tensor;

use crate::attention::{
    AddedKvAttention, AddedKvAttentionConfig, Transformer2DConfig, Transformer2DModel,
};
use crate::embeddings::Activation;
use crate::resnet::{
    Downsample2D, Resample, ResnetBlock2D, ResnetBlock2DConfig, TimeEmbeddingNorm, Upsample2D,
};

/// What a block type name stands for: which resnets, which attention, which resampler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockType {
    /// `DownBlock2D` / `UpBlock2D` / `UNetMidBlock2D`: resnets, conv resampler.
    Plain,
    /// `CrossAttnDownBlock2D` / `CrossAttnUpBlock2D` / `UNetMidBlock2DCrossAttn`: resnets and
    /// `Transformer2DModel`s, conv resampler.
    CrossAttn,
    /// `ResnetDownsampleBlock2D` / `ResnetUpsampleBlock2D`: resnets, a resampling resnet.
    ResnetResample,
    /// `SimpleCrossAttnDownBlock2D` / `SimpleCrossAttnUpBlock2D` /
    /// `UNetMidBlock2DSimpleCrossAttn`: resnets and added-KV attention, a resampling resnet.
    SimpleCrossAttn,
}

impl BlockType {
    /// Parses a down (`up == false`) or up block class name as diffusers' `get_down_block` /
    /// `get_up_block` do (a `UNetRes` prefix is dropped); `None` when unsupported.
    pub fn parse(name: &str, up: bool) -> Option<Self> {
        let name = name.strip_prefix("UNetRes").unwrap_or(name);
        let (plain, cross, resnet, simple) = if up {
            (
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "ResnetUpsampleBlock2D",
                "SimpleCrossAttnUpBlock2D",
            )
        } else {
            (
                "DownBlock2D",
                "CrossAttnDownBlock2D",
                "ResnetDownsampleBlock2D",
                "SimpleCrossAttnDownBlock2D",
            )
        };
        [
            (plain, Self::Plain),
            (cross, Self::CrossAttn),
            (resnet, Self::ResnetResample),
            (simple, Self::SimpleCrossAttn),
        ]
        .into_iter()
        .find_map(|(n, t)| (n == name).then_some(t))
    }

    /// Parses a `mid_block_type`; `None` when unsupported.
    pub fn parse_mid(name: &str) -> Option<Self> {
        match name {
            "UNetMidBlock2D" => Some(Self::Plain),
            "UNetMidBlock2DCrossAttn" => Some(Self::CrossAttn),
            "UNetMidBlock2DSimpleCrossAttn" => Some(Self::SimpleCrossAttn),
            _ => None,
        }
    }

    /// Whether the block attends to `encoder_hidden_states`.
    pub fn has_attention(self) -> bool {
        matches!(self, Self::CrossAttn | Self::SimpleCrossAttn)
    }

    /// Whether the block is of the IF/unCLIP family: resnets that take `resnet_skip_time_act`
    /// and `resnet_out_scale_factor`, resampling inside a resnet.
    fn resnet_family(self) -> bool {
        matches!(self, Self::ResnetResample | Self::SimpleCrossAttn)
    }
}

/// Resnet settings shared by every block of one UNet.
#[derive(Debug, Clone, Copy)]
pub struct ResnetSettings {
    /// Width of the timestep embedding fed to every resnet.
    pub temb_channels: i64,
    /// Group-norm groups (`norm_num_groups`).
    pub groups: i64,
    /// Group-norm epsilon (`norm_eps`).
    pub eps: f64,
    /// The resnets' non-linearity (`act_fn`).
    pub act: Activation,
    /// `resnet_time_scale_shift`.
    pub time_embedding_norm: TimeEmbeddingNorm,
    /// `resnet_skip_time_act` (IF/unCLIP-family blocks only, as diffusers passes it).
    pub skip_time_act: bool,
    /// `resnet_out_scale_factor` (IF/unCLIP-family down and up blocks only).
    pub out_scale_factor: f64,
}

impl ResnetSettings {
    fn resnet(
        &self,
        vs: &nn::Path,
        in_channels: i64,
        out_channels: i64,
        block: BlockType,
        output_scale_factor: f64,
        resample: Option<Resample>,
    ) -> ResnetBlock2D {
        ResnetBlock2D::new(
            vs,
            &ResnetBlock2DConfig {
                temb_channels: Some(self.temb_channels),
                groups: self.groups,
                eps: self.eps,
                output_scale_factor,
                non_linearity: self.act,
                time_embedding_norm: self.time_embedding_norm,
                skip_time_act: self.skip_time_act && block.resnet_family(),
                resample,
                ..ResnetBlock2DConfig::new(in_channels, out_channels)
            },
        )
    }

    /// The output scale of a down or up block's resnets.
    fn block_scale(&self, block: BlockType) -> f64 {
        if block.resnet_family() {
            self.out_scale_factor
        } else {
            1.0
        }
    }
}

/// Cross-attention settings of one `CrossAttn` block: what its `Transformer2DModel`s are built from.
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

/// Attention settings of one `SimpleCrossAttn` block.
#[derive(Debug, Clone, Copy)]
pub struct SimpleCrossAttnSettings {
    /// Width of each head (here really the head width: heads = channels / this).
    pub attention_head_dim: i64,
    /// Feature width of `encoder_hidden_states` (`added_kv_proj_dim`).
    pub cross_attention_dim: i64,
    /// Keys and values from the text tokens only.
    pub only_cross_attention: bool,
    /// `cross_attention_norm="group_norm"`.
    pub group_norm_cross: bool,
}

/// The attention of a block, by family.
#[derive(Debug, Clone)]
pub enum BlockAttention {
    /// `Transformer2DModel`s.
    Transformer(CrossAttnSettings),
    /// Added-KV attention.
    Simple(SimpleCrossAttnSettings),
}

impl BlockAttention {
    fn build(&self, vs: &nn::Path, layer: usize, channels: i64, groups: i64) -> Attn {
        match self {
            Self::Transformer(s) => {
                let heads = s.num_attention_heads;
                Attn::Transformer(Transformer2DModel::new(
                    vs,
                    &Transformer2DConfig {
                        num_attention_heads: heads,
                        attention_head_dim: channels / heads,
                        in_channels: channels,
                        num_layers: s.transformer_layers.get(layer).copied().unwrap_or(1),
                        cross_attention_dim: s.cross_attention_dim,
                        norm_num_groups: groups,
                        use_linear_projection: s.use_linear_projection,
                        only_cross_attention: s.only_cross_attention,
                        upcast_attention: s.upcast_attention,
                    },
                ))
            }
            Self::Simple(s) => Attn::AddedKv(AddedKvAttention::new(
                vs,
                &AddedKvAttentionConfig {
                    query_dim: channels,
                    heads: channels / s.attention_head_dim,
                    dim_head: s.attention_head_dim,
                    added_kv_proj_dim: s.cross_attention_dim,
                    norm_num_groups: groups,
                    only_cross_attention: s.only_cross_attention,
                    group_norm_cross: s.group_norm_cross,
                },
            )),
        }
    }
}

/// One built attention layer of a block.
#[derive(Debug)]
enum Attn {
    Transformer(Transformer2DModel),
    AddedKv(AddedKvAttention),
}

impl Attn {
    fn forward(&self, xs: &Tensor, encoder_hidden_states: &Tensor) -> Tensor {
        match self {
            Self::Transformer(t) => t.forward(xs, encoder_hidden_states),
            Self::AddedKv(a) => a.forward(xs, encoder_hidden_states),
        }
    }
}

/// A down block's downsampler: a strided conv, or a resnet that pools (IF/unCLIP family).
#[derive(Debug)]
enum Downsampler {
    Conv(Box<Downsample2D>),
    Resnet(Box<ResnetBlock2D>),
}

/// An up block's upsampler: nearest 2x then a conv, or a resnet that upsamples (IF/unCLIP family).
#[derive(Debug)]
enum Upsampler {
    Conv(Box<Upsample2D>),
    Resnet(Box<ResnetBlock2D>),
}

/// Shape of one down block.
#[derive(Debug, Clone, Copy)]
pub struct DownBlockConfig {
    /// Which block class.
    pub block: BlockType,
    /// Channels coming in.
    pub in_channels: i64,
    /// Channels of every resnet output.
    pub out_channels: i64,
    /// Resnets (and attentions, for the cross-attention variants).
    pub num_layers: i64,
    /// Ends with a downsampler (all but the last block).
    pub add_downsample: bool,
    /// Padding of the downsampling conv.
    pub downsample_padding: i64,
}

/// A down block of any supported type.
#[derive(Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Attn>,
    downsampler: Option<Downsampler>,
}

impl DownBlock {
    /// Builds the block `cfg.block` names; `attention` is required by (and only used for) the
    /// cross-attention types.
    pub fn new(
        vs: &nn::Path,
        cfg: &DownBlockConfig,
        resnet: &ResnetSettings,
        attention: Option<&BlockAttention>,
    ) -> Self {
        let block = cfg.block;
        let scale = resnet.block_scale(block);
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..cfg.num_layers {
            let in_ch = if i == 0 {
                cfg.in_channels
            } else {
                cfg.out_channels
            };
            resnets.push(resnet.resnet(
                &(vs / "resnets" / i),
                in_ch,
                cfg.out_channels,
                block,
                scale,
                None,
            ));
            if let Some(a) = attention.filter(|_| block.has_attention()) {
                attentions.push(a.build(
                    &(vs / "attentions" / i),
                    i as usize,
                    cfg.out_channels,
                    resnet.groups,
                ));
            }
        }
        let down = vs / "downsamplers" / 0;
        let downsampler = cfg.add_downsample.then(|| {
            if block.resnet_family() {
                Downsampler::Resnet(Box::new(resnet.resnet(
                    &down,
                    cfg.out_channels,
                    cfg.out_channels,
                    block,
                    scale,
                    Some(Resample::Down),
                )))
            } else {
                Downsampler::Conv(Box::new(Downsample2D::new(
                    &down,
                    cfg.out_channels,
                    true,
                    cfg.out_channels,
                    cfg.downsample_padding,
                )))
            }
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
            xs = match down {
                Downsampler::Resnet(r) => r.forward(&xs, Some(temb)),
                Downsampler::Conv(d) => d.forward(&xs),
            };
            outputs.push(xs.shallow_clone());
        }
        (xs, outputs)
    }
}

/// The mid block: `UNetMidBlock2DCrossAttn` / `UNetMidBlock2DSimpleCrossAttn` (resnet, then
/// attention + resnet) or, without attention, `UNetMidBlock2D` as `get_mid_block` builds it (a
/// single resnet).
#[derive(Debug)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Attn>,
}

impl MidBlock {
    /// Builds a `block` mid block on `channels` channels; resnets divide by `output_scale_factor`.
    pub fn new(
        vs: &nn::Path,
        channels: i64,
        output_scale_factor: f64,
        block: BlockType,
        resnet: &ResnetSettings,
        attention: Option<&BlockAttention>,
    ) -> Self {
        let make_resnet = |i: i64| {
            resnet.resnet(
                &(vs / "resnets" / i),
                channels,
                channels,
                block,
                output_scale_factor,
                None,
            )
        };
        let mut resnets = vec![make_resnet(0)];
        let mut attentions = Vec::new();
        if let Some(a) = attention.filter(|_| block.has_attention()) {
            attentions.push(a.build(&(vs / "attentions" / 0), 0, channels, resnet.groups));
            resnets.push(make_resnet(1));
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
    /// Which block class.
    pub block: BlockType,
    /// Channels of the skip connection taken by the last resnet.
    pub in_channels: i64,
    /// Channels coming from the previous up block (or the mid block).
    pub prev_output_channel: i64,
    /// Channels of every resnet output.
    pub out_channels: i64,
    /// Resnets (and attentions); one more than the matching down block's layers.
    pub num_layers: i64,
    /// Ends with an upsampler (all but the last block).
    pub add_upsample: bool,
}

/// An up block of any supported type.
#[derive(Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Attn>,
    upsampler: Option<Upsampler>,
}

impl UpBlock {
    /// Builds the block `cfg.block` names; `attention` is required by (and only used for) the
    /// cross-attention types.
    pub fn new(
        vs: &nn::Path,
        cfg: &UpBlockConfig,
        resnet: &ResnetSettings,
        attention: Option<&BlockAttention>,
    ) -> Self {
        let block = cfg.block;
        let scale = resnet.block_scale(block);
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
            resnets.push(resnet.resnet(
                &(vs / "resnets" / i),
                res_in + res_skip,
                cfg.out_channels,
                block,
                scale,
                None,
            ));
            if let Some(a) = attention.filter(|_| block.has_attention()) {
                attentions.push(a.build(
                    &(vs / "attentions" / i),
                    i as usize,
                    cfg.out_channels,
                    resnet.groups,
                ));
            }
        }
        let up = vs / "upsamplers" / 0;
        let upsampler = cfg.add_upsample.then(|| {
            if block.resnet_family() {
                Upsampler::Resnet(Box::new(resnet.resnet(
                    &up,
                    cfg.out_channels,
                    cfg.out_channels,
                    block,
                    scale,
                    Some(Resample::Up),
                )))
            } else {
                Upsampler::Conv(Box::new(Upsample2D::new(
                    &up,
                    cfg.out_channels,
                    cfg.out_channels,
                )))
            }
        });
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

    /// Runs the block, consuming `res_hidden_states` from the last one backwards; a conv
    /// upsampler targets `upsample_size` when given, else twice the size (a resampling resnet
    /// always doubles, as in diffusers).
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
            Some(Upsampler::Conv(up)) => up.forward(&xs, upsample_size),
            Some(Upsampler::Resnet(r)) => r.forward(&xs, Some(temb)),
            None => xs,
        }
    }
}
