//! diffusers' ControlNetModel (`models/controlnets/controlnet.py`): `forward` takes `sample`,
//! `timestep`, `encoder_hidden_states`, the control images `controlnet_cond` (in [0, 1]),
//! `conditioning_scale` (one value), optionally `guess_mode` (one value, nonzero = on) and, for SDXL,
//! `text_embeds` with `time_ids`; it returns the UNet's residuals `down_block_res_samples.{i}`
//! (one per skip connection) and `mid_block_res_sample`, which
//! [`super::unet::UNet2DConditionModel`] takes as `down_block_additional_residuals.{i}` and
//! `mid_block_additional_residual`.

use super::{float_input, model_error, ComponentClass, Inputs, Method};
use crate::StoreError;
use autopipe_models::controlnet;
use std::path::Path;
use tch::{Device, Kind};

/// Most skip connections a residual list may have (SD 1.x/2.x: 12, SDXL: 9): the declared names
/// `down_block_res_samples.0` … and `down_block_additional_residuals.0` … go this far (a class
/// declares its input and output names up front).
pub(super) const MAX_RESIDUALS: usize = 24;

/// The ControlNet's outputs.
const OUTPUTS: &[&str] = &[
    "mid_block_res_sample",
    "down_block_res_samples.0",
    "down_block_res_samples.1",
    "down_block_res_samples.2",
    "down_block_res_samples.3",
    "down_block_res_samples.4",
    "down_block_res_samples.5",
    "down_block_res_samples.6",
    "down_block_res_samples.7",
    "down_block_res_samples.8",
    "down_block_res_samples.9",
    "down_block_res_samples.10",
    "down_block_res_samples.11",
    "down_block_res_samples.12",
    "down_block_res_samples.13",
    "down_block_res_samples.14",
    "down_block_res_samples.15",
    "down_block_res_samples.16",
    "down_block_res_samples.17",
    "down_block_res_samples.18",
    "down_block_res_samples.19",
    "down_block_res_samples.20",
    "down_block_res_samples.21",
    "down_block_res_samples.22",
    "down_block_res_samples.23",
];

/// The UNet's optional inputs: text states (not for an `image_proj` UNet), SDXL's added
/// conditioning, Kandinsky 2.2's `image_embeds` and the residuals.
pub(super) const UNET_OPTIONAL: &[&str] = &[
    "encoder_hidden_states",
    "text_embeds",
    "time_ids",
    "image_embeds",
    "class_labels",
    "mid_block_additional_residual",
    "down_block_additional_residuals.0",
    "down_block_additional_residuals.1",
    "down_block_additional_residuals.2",
    "down_block_additional_residuals.3",
    "down_block_additional_residuals.4",
    "down_block_additional_residuals.5",
    "down_block_additional_residuals.6",
    "down_block_additional_residuals.7",
    "down_block_additional_residuals.8",
    "down_block_additional_residuals.9",
    "down_block_additional_residuals.10",
    "down_block_additional_residuals.11",
    "down_block_additional_residuals.12",
    "down_block_additional_residuals.13",
    "down_block_additional_residuals.14",
    "down_block_additional_residuals.15",
    "down_block_additional_residuals.16",
    "down_block_additional_residuals.17",
    "down_block_additional_residuals.18",
    "down_block_additional_residuals.19",
    "down_block_additional_residuals.20",
    "down_block_additional_residuals.21",
    "down_block_additional_residuals.22",
    "down_block_additional_residuals.23",
];

/// ControlNetModel: UNet residuals from a control image.
pub(super) struct ControlNetModel(controlnet::ControlNetModel);

// SAFETY: methods only read the model (see `ComponentClass`).
unsafe impl Sync for ControlNetModel {}

/// A one-value input as f64.
fn scalar(inputs: &Inputs, name: &str) -> Result<f64, StoreError> {
    let t = inputs.required(name)?;
    if t.numel() != 1 {
        return Err(inputs.invalid(
            name,
            format_args!("needs one value, got shape {:?}", t.size()),
        ));
    }
    Ok(t.to_kind(Kind::Double).double_value(&[]))
}

impl ComponentClass for ControlNetModel {
    const NAME: &'static str = "ControlNetModel";
    const METHODS: &'static [Method<Self>] = &[Method {
        name: "forward",
        required: &[
            "sample",
            "timestep",
            "encoder_hidden_states",
            "controlnet_cond",
            "conditioning_scale",
        ],
        optional: &["guess_mode", "text_embeds", "time_ids"],
        outputs: OUTPUTS,
        run: |m, inputs| {
            let (kind, device) = (m.0.kind(), m.0.device());
            let sample = inputs.with_rank("sample", 4)?;
            let ehs = inputs.with_rank("encoder_hidden_states", 3)?;
            let cond = inputs.with_rank("controlnet_cond", 4)?;
            let timestep = inputs.required("timestep")?;
            if timestep.dim() > 1 {
                return Err(inputs.invalid(
                    "timestep",
                    format_args!("needs a scalar or [batch], got shape {:?}", timestep.size()),
                ));
            }
            let scale = scalar(inputs, "conditioning_scale")?;
            let guess_mode = match inputs.optional("guess_mode") {
                Some(_) => scalar(inputs, "guess_mode")? != 0.0,
                None => false,
            };
            let added = super::unet::added_conditioning(inputs, kind, device)?;
            if m.0.num_down_block_residuals() > MAX_RESIDUALS {
                return Err(StoreError::new(
                    crate::Code::FailedPrecondition,
                    format!(
                        "ControlNetModel.forward: {} residuals, more than the {MAX_RESIDUALS} this store declares",
                        m.0.num_down_block_residuals()
                    ),
                ));
            }
            let out =
                m.0.forward(
                    &float_input(sample, kind, device),
                    &timestep.to_device(device),
                    &float_input(ehs, kind, device),
                    &float_input(cond, kind, device),
                    scale,
                    added.as_ref(),
                    guess_mode,
                )
                .map_err(model_error)?;
            let mut result: crate::Tensors = out
                .down_block_res_samples
                .into_iter()
                .enumerate()
                .map(|(i, t)| (format!("down_block_res_samples.{i}"), t))
                .collect();
            result.push(("mid_block_res_sample".to_string(), out.mid_block_res_sample));
            Ok(result)
        },
    }];

    fn load(
        dir: &Path,
        variant: Option<&str>,
        kind: Kind,
        device: Device,
    ) -> Result<Self, autopipe_models::Error> {
        controlnet::ControlNetModel::load(dir, variant, kind, device).map(Self)
    }
}
