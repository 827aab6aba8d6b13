//! diffusers' UNet2DConditionModel (`models/unets/unet_2d_condition.py`): `forward` takes `sample`,
//! `timestep` (a scalar or [batch]), `encoder_hidden_states` and, for SDXL, `text_embeds` with
//! `time_ids`; it returns the predicted `sample`.

use super::{float_input, model_error, ComponentClass, Method};
use autopipe_models::unet;
use std::path::Path;
use tch::{Device, Kind};

/// UNet2DConditionModel: the denoiser of SD 1.x/2.x and SDXL.
pub(super) struct UNet2DConditionModel(unet::UNet2DConditionModel);

// SAFETY: methods only read the model (see `ComponentClass`).
unsafe impl Sync for UNet2DConditionModel {}

impl ComponentClass for UNet2DConditionModel {
    const NAME: &'static str = "UNet2DConditionModel";
    const METHODS: &'static [Method<Self>] = &[Method {
        name: "forward",
        required: &["sample", "timestep", "encoder_hidden_states"],
        optional: &["text_embeds", "time_ids"],
        outputs: &["sample"],
        run: |m, inputs| {
            let (kind, device) = (m.0.kind(), m.0.device());
            let sample = inputs.with_rank("sample", 4)?;
            let ehs = inputs.with_rank("encoder_hidden_states", 3)?;
            let timestep = inputs.required("timestep")?;
            if timestep.dim() > 1 {
                return Err(inputs.invalid(
                    "timestep",
                    format_args!("needs a scalar or [batch], got shape {:?}", timestep.size()),
                ));
            }
            let timestep = timestep.to_device(device);
            let added = match (inputs.optional("text_embeds"), inputs.optional("time_ids")) {
                (Some(te), Some(ti)) => Some(unet::SdxlConditioning {
                    text_embeds: float_input(te, kind, device),
                    time_ids: float_input(ti, kind, device),
                }),
                (None, None) => None,
                _ => {
                    return Err(inputs.invalid(
                        "time_ids",
                        "takes text_embeds and time_ids together or neither",
                    ))
                }
            };
            let out =
                m.0.forward(
                    &float_input(sample, kind, device),
                    &timestep,
                    &float_input(ehs, kind, device),
                    added.as_ref(),
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
