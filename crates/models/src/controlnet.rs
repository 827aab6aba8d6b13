//! ControlNet (Zhang et al., "Adding Conditional Control to Text-to-Image Diffusion Models"),
//! following diffusers 0.42.1 `models/controlnets/controlnet.py` (`ControlNetModel`,
//! `ControlNetConditioningEmbedding`).
//!
//! A ControlNet is a copy of a UNet's down half (time and SDXL added embeddings, `conv_in`, down
//! blocks, mid block: [`crate::unet::DownPath`], at the same parameter paths) plus a small
//! convolutional encoder of the control image added after `conv_in`, and one 1x1 "zero
//! convolution" per skip connection and for the mid block. Its outputs are what the UNet adds to
//! its skip connections (`down_block_additional_residuals`) and mid block output.

use crate::layers::Conv2d;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::unet::{DownPath, PerBlock, SdxlConditioning, UNet2DConditionConfig};
use crate::weights;
use crate::{Error, Result};

fn default_conditioning_channels() -> i64 {
    3
}
fn default_channel_order() -> String {
    "rgb".to_string()
}
fn default_conditioning_embedding_out_channels() -> Option<Vec<i64>> {
    Some(vec![16, 32, 96, 256])
}

/// `controlnet/config.json`: diffusers' `ControlNetModel.__init__` arguments. The fields it shares
/// with `UNet2DConditionModel` (same names, same defaults) are read into `unet`.
#[derive(Debug, Clone, Deserialize)]
pub struct ControlNetConfig {
    /// Channels of the control image.
    #[serde(default = "default_conditioning_channels")]
    pub conditioning_channels: i64,
    /// `"rgb"`, or `"bgr"` (the control image's channels are flipped first).
    #[serde(default = "default_channel_order")]
    pub controlnet_conditioning_channel_order: String,
    /// Channels of the control image encoder's levels (each level after the first halves the
    /// resolution).
    #[serde(default = "default_conditioning_embedding_out_channels")]
    pub conditioning_embedding_out_channels: Option<Vec<i64>>,
    /// Residuals averaged over their spatial dimensions (the shuffle ControlNet); implies guess mode.
    #[serde(default)]
    pub global_pool_conditions: bool,
    /// The UNet fields of the copied down half.
    #[serde(flatten)]
    pub unet: UNet2DConditionConfig,
}

impl ControlNetConfig {
    /// The config as a UNet config for the shared down half: the fields a ControlNet does not
    /// have take the values `ControlNetModel.__init__` hard-wires; the up path mirrors the down
    /// path (never built, but `plan` checks it).
    fn down_path_config(&self) -> Result<UNet2DConditionConfig> {
        let mut unet = self.unet.clone();
        let unsupported = |field: &str, value: &dyn std::fmt::Debug| {
            Err(Error::Config(format!(
                "{field}: {value:?} is not supported"
            )))
        };
        if unet.encoder_hid_dim.is_some() || unet.encoder_hid_dim_type.is_some() {
            // ControlNetModel.forward never applies encoder_hid_proj.
            return unsupported("encoder_hid_dim", &unet.encoder_hid_dim);
        }
        if !matches!(unet.layers_per_block, PerBlock::One(_)) {
            return unsupported("layers_per_block", &"a per-block list");
        }
        if !matches!(unet.cross_attention_dim, PerBlock::One(_)) {
            return unsupported("cross_attention_dim", &"a per-block list");
        }
        match self.controlnet_conditioning_channel_order.as_str() {
            "rgb" | "bgr" => {}
            other => {
                return Err(Error::Config(format!(
                    "controlnet_conditioning_channel_order: {other:?} (expected \"rgb\" or \"bgr\")"
                )))
            }
        }
        if self.conditioning_channels <= 0 {
            return Err(Error::Config(format!(
                "conditioning_channels: {} must be positive",
                self.conditioning_channels
            )));
        }
        match &self.conditioning_embedding_out_channels {
            Some(c) if !c.is_empty() && c.iter().all(|&x| x > 0) => {}
            other => {
                return Err(Error::Config(format!(
                    "conditioning_embedding_out_channels: {other:?} must be a non-empty list of positive widths"
                )))
            }
        }
        unet.up_block_types = unet
            .down_block_types
            .iter()
            .rev()
            .map(|t| t.replace("Down", "Up"))
            .collect();
        unet.conv_in_kernel = 3;
        unet.time_embedding_dim = None;
        unet.time_embedding_act_fn = None;
        unet.timestep_post_act = None;
        unet.time_cond_proj_dim = None;
        unet.center_input_sample = false;
        Ok(unet)
    }
}

/// diffusers' `ControlNetConditioningEmbedding`: the control image encoder
/// (conv, then per level a conv and a stride-2 conv, SiLU after each, then a zero conv).
#[derive(Debug)]
struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ConditioningEmbedding {
    fn new(
        vs: &nn::Path,
        embedding_channels: i64,
        conditioning_channels: i64,
        channels: &[i64],
    ) -> Self {
        let conv_in = weights::conv2d(vs / "conv_in", conditioning_channels, channels[0], 3, 1, 1);
        let mut blocks = Vec::new();
        for (i, pair) in channels.windows(2).enumerate() {
            let (c_in, c_out) = (pair[0], pair[1]);
            blocks.push(weights::conv2d(
                vs / "blocks" / (2 * i),
                c_in,
                c_in,
                3,
                1,
                1,
            ));
            blocks.push(weights::conv2d(
                vs / "blocks" / (2 * i + 1),
                c_in,
                c_out,
                3,
                2,
                1,
            ));
        }
        let last = channels[channels.len() - 1];
        let conv_out = weights::conv2d(vs / "conv_out", last, embedding_channels, 3, 1, 1);
        Self {
            conv_in,
            blocks,
            conv_out,
        }
    }

    fn forward(&self, conditioning: &Tensor) -> Tensor {
        let mut xs = self.conv_in.forward(conditioning).silu();
        for block in &self.blocks {
            xs = block.forward(&xs).silu();
        }
        self.conv_out.forward(&xs)
    }

    /// How much the encoder downsamples.
    fn factor(&self) -> i64 {
        1 << (self.blocks.len() / 2)
    }
}

/// What [`ControlNetModel::forward`] returns: the residuals for the UNet.
#[derive(Debug)]
pub struct ControlNetOutput {
    /// One per UNet skip connection (`conv_in` output first).
    pub down_block_res_samples: Vec<Tensor>,
    pub mid_block_res_sample: Tensor,
}

/// diffusers' `ControlNetModel`.
#[derive(Debug)]
pub struct ControlNetModel {
    config: ControlNetConfig,
    down: DownPath,
    cond_embedding: ConditioningEmbedding,
    controlnet_down_blocks: Vec<Conv2d>,
    controlnet_mid_block: Conv2d,
    var_store: Option<nn::VarStore>,
}

impl ControlNetModel {
    /// Declares the parameters under `vs` (at the checkpoint's key paths).
    pub fn new(vs: &nn::Path, config: ControlNetConfig) -> Result<Self> {
        let cfg = config.down_path_config()?;
        let plan = cfg.plan()?;
        let down = DownPath::new(vs, &cfg, &plan);
        let b0 = cfg.block_out_channels[0];
        let cond_embedding = ConditioningEmbedding::new(
            &(vs / "controlnet_cond_embedding"),
            b0,
            config.conditioning_channels,
            config
                .conditioning_embedding_out_channels
                .as_deref()
                .unwrap_or_default(),
        );
        let layers = match cfg.layers_per_block {
            PerBlock::One(l) => l,
            PerBlock::Many(_) => unreachable!("checked by down_path_config"),
        };
        let n = cfg.block_out_channels.len();
        let mut channels = vec![b0];
        for (i, &c) in cfg.block_out_channels.iter().enumerate() {
            channels.extend(std::iter::repeat_n(c, layers as usize));
            if i + 1 < n {
                channels.push(c);
            }
        }
        let controlnet_down_blocks = channels
            .iter()
            .enumerate()
            .map(|(i, &c)| weights::conv2d(vs / "controlnet_down_blocks" / i, c, c, 1, 1, 0))
            .collect();
        let mid = cfg.block_out_channels[n - 1];
        let controlnet_mid_block = weights::conv2d(vs / "controlnet_mid_block", mid, mid, 1, 1, 0);
        Ok(Self {
            config,
            down,
            cond_embedding,
            controlnet_down_blocks,
            controlnet_mid_block,
            var_store: None,
        })
    }

    /// Loads `config.json` and the (optionally `variant`) safetensors weights of `dir`.
    pub fn load(dir: &Path, variant: Option<&str>, kind: Kind, device: Device) -> Result<Self> {
        let config: ControlNetConfig = weights::read_config(dir)?;
        Self::load_with_config(config, &weights::weight_files(dir, variant)?, kind, device)
    }

    /// Builds the model from `config` and loads `files` into it.
    pub fn load_with_config(
        config: ControlNetConfig,
        files: &[PathBuf],
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let (mut model, vs) = weights::load_files(
            files,
            kind,
            device,
            &|name| name.to_string(),
            weights::Layout::ChannelsLast,
            |p| Self::new(p, config),
        )?;
        model.var_store = Some(vs);
        Ok(model)
    }

    /// The config the model was built from.
    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// The dtype of the parameters (and of the residuals).
    pub fn kind(&self) -> Kind {
        self.down.kind()
    }

    /// The device of the parameters.
    pub fn device(&self) -> Device {
        self.down.device()
    }

    /// The var store holding the parameters, when built by [`Self::load`].
    pub fn var_store(&self) -> Option<&nn::VarStore> {
        self.var_store.as_ref()
    }

    /// How many down residuals [`Self::forward`] returns.
    pub fn num_down_block_residuals(&self) -> usize {
        self.controlnet_down_blocks.len()
    }

    /// The residuals for `sample` at `timestep` given the prompt embeddings, the control image
    /// `controlnet_cond` (`[batch, conditioning_channels, H, W]` in [0, 1], H and W the latent
    /// size times the encoder's factor) and, for SDXL, `added` conditioning, scaled by
    /// `conditioning_scale` (in guess mode by 10^-1 … 10^0 from the first residual to the mid one).
    /// With `global_pool_conditions` the residuals are averaged to 1x1.
    #[allow(clippy::too_many_arguments)] // diffusers' ControlNetModel.forward, argument for argument
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        controlnet_cond: &Tensor,
        conditioning_scale: f64,
        added: Option<&SdxlConditioning>,
        guess_mode: bool,
    ) -> Result<ControlNetOutput> {
        self.down.check_inputs(
            sample,
            timestep,
            Some(encoder_hidden_states),
            added,
            None,
            None,
        )?;
        let (s, c) = (sample.size(), controlnet_cond.size());
        let f = self.cond_embedding.factor();
        let want = [s[0], self.config.conditioning_channels, s[2] * f, s[3] * f];
        if c[..] != want[..] {
            return Err(Error::Input(format!(
                "controlnet_cond: shape {c:?}, expected {want:?}"
            )));
        }
        let run = || {
            let _guard = tch::no_grad_guard();
            self.forward_unchecked(
                sample,
                timestep,
                encoder_hidden_states,
                controlnet_cond,
                conditioning_scale,
                added,
                guess_mode,
            )
        };
        catch_unwind(AssertUnwindSafe(run)).map_err(|payload| {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "ControlNet forward panicked".to_string());
            Error::Torch(tch::TchError::Torch(msg))
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_unchecked(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        controlnet_cond: &Tensor,
        conditioning_scale: f64,
        added: Option<&SdxlConditioning>,
        guess_mode: bool,
    ) -> ControlNetOutput {
        let sample = self.down.input(sample);
        let batch = sample.size()[0];
        let encoder_hidden_states = self.down.to_model(encoder_hidden_states);
        let mut cond = self.down.input(controlnet_cond);
        if self.config.controlnet_conditioning_channel_order == "bgr" {
            cond = cond.flip([1]);
        }

        // 1. time
        let emb = self.down.embed(timestep, batch, added, None, None);
        // 2. pre-process: the control image's features join after conv_in.
        let xs = self.down.conv_in(&sample) + self.cond_embedding.forward(&cond);
        // 3. down, 4. mid
        let (xs, res_samples) = self.down.down(xs, &emb, &encoder_hidden_states);
        let xs = self.down.mid(xs, &emb, &encoder_hidden_states);
        // 5. zero convolutions
        let down: Vec<Tensor> = res_samples
            .iter()
            .zip(&self.controlnet_down_blocks)
            .map(|(res, conv)| conv.forward(res))
            .collect();
        let mid = self.controlnet_mid_block.forward(&xs);
        // 6. scaling
        let pool = self.config.global_pool_conditions;
        let (mut down, mut mid) = if guess_mode && !pool {
            // torch.logspace(-1, 0, n + 1) in f32, times the scale, each a 0-d tensor.
            let scales = Tensor::logspace(
                -1.0,
                0.0,
                down.len() as i64 + 1,
                10.0,
                (Kind::Float, self.device()),
            ) * conditioning_scale;
            let down: Vec<Tensor> = down
                .iter()
                .enumerate()
                .map(|(i, d)| d * scales.get(i as i64))
                .collect();
            let mid = mid * scales.get(scales.size()[0] - 1);
            (down, mid)
        } else {
            let down: Vec<Tensor> = down.iter().map(|d| d * conditioning_scale).collect();
            (down, mid * conditioning_scale)
        };
        if pool {
            let mean = |t: &Tensor| t.mean_dim([2i64, 3].as_slice(), true, None::<Kind>);
            down = down.iter().map(mean).collect();
            mid = mean(&mid);
        }
        ControlNetOutput {
            down_block_res_samples: down.into_iter().map(|t| t.contiguous()).collect(),
            mid_block_res_sample: mid.contiguous(),
        }
    }
}
