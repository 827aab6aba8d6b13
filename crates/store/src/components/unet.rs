//! diffusers' UNet2DConditionModel (`models/unets/unet_2d_condition.py`): `forward` takes `sample`,
//! `timestep` (a scalar or [batch]), `encoder_hidden_states` (not for an `image_proj` UNet), for
//! SDXL `text_embeds` with `time_ids`, for Kandinsky 2.2 `image_embeds`, for Kandinsky 2.1
//! `image_embeds` with `text_embeds`, for DeepFloyd IF stage II `class_labels` (the noise level,
//! [batch]), and with a ControlNet its
//! residuals `down_block_additional_residuals.{i}` with `mid_block_additional_residual`; it returns
//! the predicted `sample`.

use super::controlnet::{MAX_RESIDUALS, UNET_OPTIONAL};
use super::{float_input, model_error, ComponentClass, Inputs, Method};
use crate::StoreError;
use autopipe_models::unet;
use std::path::Path;
use tch::Tensor;
use tch::{Device, Kind};

/// UNet2DConditionModel: the denoiser of SD 1.x/2.x, SDXL, the Kandinsky decoders and both
/// DeepFloyd IF stages.
pub(super) struct UNet2DConditionModel(unet::UNet2DConditionModel);

// SAFETY: methods only read the model (see `ComponentClass`).
unsafe impl Sync for UNet2DConditionModel {}

impl ComponentClass for UNet2DConditionModel {
    const NAME: &'static str = "UNet2DConditionModel";
    // Every input is per sample (timestep and class_labels also as one value for all), and so is
    // the predicted sample: GroupNorm, attention and the embeddings never mix samples.
    const BATCHED: &'static [&'static str] = &["forward"];
    const METHODS: &'static [Method<Self>] = &[Method {
        name: "forward",
        required: &["sample", "timestep"],
        optional: UNET_OPTIONAL,
        outputs: &["sample"],
        run: |m, inputs| {
            let (kind, device) = (m.0.kind(), m.0.device());
            let sample = inputs.with_rank("sample", 4)?;
            let image_embeds = match inputs.optional("image_embeds") {
                Some(_) => Some(float_input(
                    inputs.with_rank("image_embeds", 2)?,
                    kind,
                    device,
                )),
                None => None,
            };
            // An image_proj UNet (Kandinsky 2.2) makes its own from `image_embeds`.
            let ehs = match (inputs.optional("encoder_hidden_states"), &image_embeds) {
                (None, Some(_)) => None,
                _ => Some(float_input(
                    inputs.with_rank("encoder_hidden_states", 3)?,
                    kind,
                    device,
                )),
            };
            let timestep = inputs.required("timestep")?;
            if timestep.dim() > 1 {
                return Err(inputs.invalid(
                    "timestep",
                    format_args!("needs a scalar or [batch], got shape {:?}", timestep.size()),
                ));
            }
            let timestep = timestep.to_device(device);
            // A text_image UNet (Kandinsky 2.1) takes `text_embeds` alone: the pooled text
            // embedding; others only with SDXL's `time_ids`.
            let text_image = m.0.config().addition_embed_type.as_deref() == Some("text_image");
            let (added, text_embeds) = match inputs.optional("text_embeds") {
                Some(_) if text_image => (
                    None,
                    Some(float_input(
                        inputs.with_rank("text_embeds", 2)?,
                        kind,
                        device,
                    )),
                ),
                _ => (added_conditioning(inputs, kind, device)?, None),
            };
            let class_labels = match inputs.optional("class_labels") {
                Some(_) => Some(inputs.with_rank("class_labels", 1)?.to_device(device)),
                None => None,
            };
            let down: Vec<Tensor> = (0..MAX_RESIDUALS)
                .map_while(|i| inputs.optional(&format!("down_block_additional_residuals.{i}")))
                .map(|t| float_input(t, kind, device))
                .collect();
            let mid = inputs
                .optional("mid_block_additional_residual")
                .map(|t| float_input(t, kind, device));
            if down.is_empty() != mid.is_none() {
                return Err(inputs.invalid(
                    "mid_block_additional_residual",
                    "takes it and down_block_additional_residuals.0, .1, … together or neither",
                ));
            }
            let extra = unet::UNetExtraInputs {
                added: added.as_ref(),
                timestep_cond: None,
                class_labels: class_labels.as_ref(),
                down_block_additional_residuals: mid.is_some().then_some(down.as_slice()),
                mid_block_additional_residual: mid.as_ref(),
                image_embeds: image_embeds.as_ref(),
                text_embeds: text_embeds.as_ref(),
            };
            let out =
                m.0.forward_with(
                    &float_input(sample, kind, device),
                    &timestep,
                    ehs.as_ref(),
                    &extra,
                )
                .map_err(model_error)?;
            Ok(vec![("sample".to_string(), out)])
        },
    }];

    fn load(
        dir: &Path,
        variant: Option<&str>,
        kind: Kind,
        device: Device,
    ) -> Result<Self, autopipe_models::Error> {
        unet::UNet2DConditionModel::load(dir, variant, kind, device).map(Self)
    }
}

/// `text_embeds` + `time_ids` (SDXL's added conditioning), both or neither.
pub(super) fn added_conditioning(
    inputs: &Inputs,
    kind: Kind,
    device: Device,
) -> Result<Option<unet::SdxlConditioning>, StoreError> {
    match (inputs.optional("text_embeds"), inputs.optional("time_ids")) {
        (Some(te), Some(ti)) => Ok(Some(unet::SdxlConditioning {
            text_embeds: float_input(te, kind, device),
            time_ids: float_input(ti, kind, device),
        })),
        (None, None) => Ok(None),
        _ => Err(inputs.invalid(
            "time_ids",
            "takes text_embeds and time_ids together or neither",
        )),
    }
}
