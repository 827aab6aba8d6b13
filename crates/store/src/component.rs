//! Resident components and the methods the store runs on them (`Invoke`).
//!
//! | class | method | inputs | outputs |
//! |---|---|---|---|
//! | CLIPTextModel | `encode` | `input_ids` (int64 [B, T]) | `last_hidden_state`, `pooler_output`, `penultimate_hidden_state` |
//! | CLIPTextModelWithProjection | `encode` | `input_ids` (int64 [B, T]) | `last_hidden_state`, `text_embeds`, `penultimate_hidden_state` |
//! | UNet2DConditionModel | `forward` | `sample`, `timestep`, `encoder_hidden_states`, optional `text_embeds` + `time_ids`, optional ControlNet residuals `down_block_additional_residuals.{i}` + `mid_block_additional_residual` | `sample` |
//! | ControlNetModel | `forward` | `sample`, `timestep`, `encoder_hidden_states`, `controlnet_cond` (control images in [0, 1]), `conditioning_scale` (0-d), optional `guess_mode` (0-d, nonzero = on), optional `text_embeds` + `time_ids` | `down_block_res_samples.{i}`, `mid_block_res_sample` |
//! | AutoencoderKL | `encode` | `sample` (images in [-1, 1]) | `mean`, `logvar` |
//! | AutoencoderKL | `decode` | `latents` (already divided by `scaling_factor`) | `sample` |
//!
//! Floating-point inputs are moved to the component's device and dtype; outputs stay there.

use crate::{Code, StoreError};
use autopipe_models::{clip, controlnet, unet, vae};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Named tensors in and out of a component method.
pub type Tensors = Vec<(String, Tensor)>;

/// The component classes this store can load.
pub const SUPPORTED_CLASSES: &[&str] = &[
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "UNet2DConditionModel",
    "ControlNetModel",
    "AutoencoderKL",
];

/// A loaded component whose methods the store runs.
pub trait Component: Send + Sync {
    /// Runs `method` on named inputs. The caller holds `tch::no_grad`.
    fn invoke(&self, method: &str, inputs: &Tensors) -> Result<Tensors, StoreError>;
}

/// Loads a component folder as `class_name` onto `device` in `kind`.
pub fn load_component(
    class_name: &str,
    dir: &Path,
    variant: Option<&str>,
    kind: Kind,
    device: Device,
) -> Result<Box<dyn Component>, StoreError> {
    Ok(match class_name {
        "CLIPTextModel" => Box::new(TextEncoder::Plain(clip::CLIPTextModel::load(
            dir, variant, kind, device,
        )?)),
        "CLIPTextModelWithProjection" => Box::new(TextEncoder::WithProjection(
            clip::CLIPTextModelWithProjection::load(dir, variant, kind, device)?,
        )),
        "UNet2DConditionModel" => Box::new(Unet(unet::UNet2DConditionModel::load(
            dir, variant, kind, device,
        )?)),
        "ControlNetModel" => Box::new(ControlNet(controlnet::ControlNetModel::load(
            dir, variant, kind, device,
        )?)),
        "AutoencoderKL" => Box::new(Vae(vae::AutoencoderKL::load(dir, variant, kind, device)?)),
        other => {
            return Err(StoreError::new(
                Code::Unimplemented,
                format!(
                    "component class {other} is not supported by this store (supported: {})",
                    SUPPORTED_CLASSES.join(", ")
                ),
            ))
        }
    })
}

struct Inputs<'a> {
    class: &'static str,
    method: &'a str,
    tensors: &'a Tensors,
}

impl<'a> Inputs<'a> {
    fn check_names(&self, allowed: &[&str]) -> Result<(), StoreError> {
        for (name, _) in self.tensors {
            if !allowed.contains(&name.as_str()) {
                return Err(StoreError::new(
                    Code::InvalidArgument,
                    format!(
                        "inputs.{name}: {}.{} takes no input {name:?} (inputs: {})",
                        self.class,
                        self.method,
                        allowed.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    fn optional(&self, name: &str) -> Option<&'a Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    fn required(&self, name: &str) -> Result<&'a Tensor, StoreError> {
        self.optional(name).ok_or_else(|| {
            StoreError::new(
                Code::InvalidArgument,
                format!("inputs.{name}: {}.{} requires it", self.class, self.method),
            )
        })
    }

    fn rank(&self, name: &str, t: &Tensor, rank: usize) -> Result<(), StoreError> {
        if t.dim() != rank {
            return Err(StoreError::new(
                Code::InvalidArgument,
                format!(
                    "inputs.{name}: {}.{} needs {rank} dimensions, got shape {:?}",
                    self.class,
                    self.method,
                    t.size()
                ),
            ));
        }
        Ok(())
    }

    /// Inputs `{prefix}.0`, `{prefix}.1`, … in order (a list of tensors).
    fn numbered(&self, prefix: &str) -> Vec<&'a Tensor> {
        let mut out = Vec::new();
        while let Some(t) = self.optional(&format!("{prefix}.{}", out.len())) {
            out.push(t);
        }
        out
    }

    /// Rejects names outside `allowed` other than `{prefix}.{i}` for `i` below `count`.
    fn check_names_numbered(
        &self,
        allowed: &[&str],
        prefix: &str,
        count: usize,
    ) -> Result<(), StoreError> {
        for (name, _) in self.tensors {
            let numbered = name
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix('.'))
                .and_then(|i| i.parse::<usize>().ok())
                .is_some_and(|i| i < count);
            if !numbered && !allowed.contains(&name.as_str()) {
                return Err(StoreError::new(
                    Code::InvalidArgument,
                    format!(
                        "inputs.{name}: {}.{} takes no input {name:?} (inputs: {}, {prefix}.0, {prefix}.1, … in order)",
                        self.class,
                        self.method,
                        allowed.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A 0-d (or one-element) float input.
    fn scalar(&self, name: &str) -> Result<f64, StoreError> {
        let t = self.required(name)?;
        if t.numel() != 1 {
            return Err(StoreError::new(
                Code::InvalidArgument,
                format!(
                    "inputs.{name}: {}.{} needs one value, got shape {:?}",
                    self.class,
                    self.method,
                    t.size()
                ),
            ));
        }
        Ok(t.to_kind(Kind::Double).double_value(&[]))
    }

    fn unknown_method(&self, methods: &[&str]) -> StoreError {
        StoreError::new(
            Code::InvalidArgument,
            format!(
                "method: {} has no method {:?} (methods: {})",
                self.class,
                self.method,
                methods.join(", ")
            ),
        )
    }
}

/// Moves a floating-point input to the model's device and dtype.
fn float_input(t: &Tensor, kind: Kind, device: Device) -> Tensor {
    if t.kind() == kind && t.device() == device {
        t.shallow_clone()
    } else {
        t.to_device(device).to_kind(kind)
    }
}

enum TextEncoder {
    Plain(clip::CLIPTextModel),
    WithProjection(clip::CLIPTextModelWithProjection),
}

impl Component for TextEncoder {
    fn invoke(&self, method: &str, tensors: &Tensors) -> Result<Tensors, StoreError> {
        let inputs = Inputs {
            class: "CLIPTextModel",
            method,
            tensors,
        };
        if method != "encode" {
            return Err(inputs.unknown_method(&["encode"]));
        }
        inputs.check_names(&["input_ids"])?;
        let ids = inputs.required("input_ids")?;
        inputs.rank("input_ids", ids, 2)?;
        if ids.kind() != Kind::Int64 {
            return Err(StoreError::new(
                Code::InvalidArgument,
                format!(
                    "inputs.input_ids: CLIPTextModel.encode needs int64 token ids, got {:?}",
                    ids.kind()
                ),
            ));
        }
        let (last, pooled, hidden_states) = match self {
            Self::Plain(m) => {
                let o = m.forward(ids)?;
                (
                    o.last_hidden_state,
                    ("pooler_output", o.pooler_output),
                    o.hidden_states,
                )
            }
            Self::WithProjection(m) => {
                let o = m.forward(ids)?;
                (
                    o.last_hidden_state,
                    ("text_embeds", o.text_embeds),
                    o.hidden_states,
                )
            }
        };
        let mut result = vec![
            ("last_hidden_state".to_string(), last),
            (pooled.0.to_string(), pooled.1),
        ];
        if let Some(penultimate) = hidden_states
            .len()
            .checked_sub(2)
            .and_then(|i| hidden_states.get(i))
        {
            result.push((
                "penultimate_hidden_state".to_string(),
                penultimate.shallow_clone(),
            ));
        }
        Ok(result)
    }
}

struct Unet(unet::UNet2DConditionModel);

// SAFETY (all three): a loaded component is immutable; its methods only read parameter tensors and
// allocate new ones, and libtorch supports concurrent reads of a tensor from several threads (the
// same guarantee PyTorch relies on for multi-threaded inference). `tch::Tensor` is not `Sync` only
// because it wraps a raw pointer.
unsafe impl Sync for TextEncoder {}
unsafe impl Sync for Unet {}
unsafe impl Sync for Vae {}

impl Component for Unet {
    fn invoke(&self, method: &str, tensors: &Tensors) -> Result<Tensors, StoreError> {
        let inputs = Inputs {
            class: "UNet2DConditionModel",
            method,
            tensors,
        };
        if method != "forward" {
            return Err(inputs.unknown_method(&["forward"]));
        }
        let down = inputs.numbered("down_block_additional_residuals");
        inputs.check_names_numbered(
            &[
                "sample",
                "timestep",
                "encoder_hidden_states",
                "text_embeds",
                "time_ids",
                "mid_block_additional_residual",
            ],
            "down_block_additional_residuals",
            down.len(),
        )?;
        let (kind, device) = (self.0.kind(), self.0.device());
        let sample = inputs.required("sample")?;
        inputs.rank("sample", sample, 4)?;
        let ehs = inputs.required("encoder_hidden_states")?;
        inputs.rank("encoder_hidden_states", ehs, 3)?;
        let timestep = inputs.required("timestep")?;
        if timestep.dim() > 1 {
            return Err(StoreError::new(
                Code::InvalidArgument,
                format!("inputs.timestep: UNet2DConditionModel.forward needs a scalar or [batch], got shape {:?}", timestep.size()),
            ));
        }
        let timestep = timestep.to_device(device);
        let added = added_conditioning(&inputs, kind, device)?;
        let mid = inputs.optional("mid_block_additional_residual");
        if down.is_empty() != mid.is_none() {
            return Err(StoreError::new(
                Code::InvalidArgument,
                "inputs.mid_block_additional_residual: UNet2DConditionModel.forward takes the down_block_additional_residuals.{i} and mid_block_additional_residual together or neither",
            ));
        }
        let down: Vec<Tensor> = down.iter().map(|t| float_input(t, kind, device)).collect();
        let mid = mid.map(|t| float_input(t, kind, device));
        let extra = unet::UNetExtraInputs {
            added: added.as_ref(),
            timestep_cond: None,
            down_block_additional_residuals: mid.is_some().then_some(down.as_slice()),
            mid_block_additional_residual: mid.as_ref(),
        };
        let out = self.0.forward_with(
            &float_input(sample, kind, device),
            &timestep,
            &float_input(ehs, kind, device),
            &extra,
        )?;
        Ok(vec![("sample".to_string(), out)])
    }
}

/// `text_embeds` + `time_ids` (SDXL), both or neither.
fn added_conditioning(
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
        _ => Err(StoreError::new(
            Code::InvalidArgument,
            format!(
                "inputs.time_ids: {}.{} takes text_embeds and time_ids together or neither",
                inputs.class, inputs.method
            ),
        )),
    }
}

struct ControlNet(controlnet::ControlNetModel);

// SAFETY: as for the other components (see above).
unsafe impl Sync for ControlNet {}

impl Component for ControlNet {
    fn invoke(&self, method: &str, tensors: &Tensors) -> Result<Tensors, StoreError> {
        let inputs = Inputs {
            class: "ControlNetModel",
            method,
            tensors,
        };
        if method != "forward" {
            return Err(inputs.unknown_method(&["forward"]));
        }
        inputs.check_names(&[
            "sample",
            "timestep",
            "encoder_hidden_states",
            "controlnet_cond",
            "conditioning_scale",
            "guess_mode",
            "text_embeds",
            "time_ids",
        ])?;
        let (kind, device) = (self.0.kind(), self.0.device());
        let sample = inputs.required("sample")?;
        inputs.rank("sample", sample, 4)?;
        let ehs = inputs.required("encoder_hidden_states")?;
        inputs.rank("encoder_hidden_states", ehs, 3)?;
        let cond = inputs.required("controlnet_cond")?;
        inputs.rank("controlnet_cond", cond, 4)?;
        let timestep = inputs.required("timestep")?;
        if timestep.dim() > 1 {
            return Err(StoreError::new(
                Code::InvalidArgument,
                format!("inputs.timestep: ControlNetModel.forward needs a scalar or [batch], got shape {:?}", timestep.size()),
            ));
        }
        let scale = inputs.scalar("conditioning_scale")?;
        let guess_mode = match inputs.optional("guess_mode") {
            Some(_) => inputs.scalar("guess_mode")? != 0.0,
            None => false,
        };
        let added = added_conditioning(&inputs, kind, device)?;
        let out = self.0.forward(
            &float_input(sample, kind, device),
            &timestep.to_device(device),
            &float_input(ehs, kind, device),
            &float_input(cond, kind, device),
            scale,
            added.as_ref(),
            guess_mode,
        )?;
        let mut result: Tensors = out
            .down_block_res_samples
            .into_iter()
            .enumerate()
            .map(|(i, t)| (format!("down_block_res_samples.{i}"), t))
            .collect();
        result.push(("mid_block_res_sample".to_string(), out.mid_block_res_sample));
        Ok(result)
    }
}

struct Vae(vae::AutoencoderKL);

impl Component for Vae {
    fn invoke(&self, method: &str, tensors: &Tensors) -> Result<Tensors, StoreError> {
        let inputs = Inputs {
            class: "AutoencoderKL",
            method,
            tensors,
        };
        // AutoencoderKL checks shapes and moves inputs to its device and dtype itself.
        match method {
            "encode" => {
                inputs.check_names(&["sample"])?;
                let x = inputs.required("sample")?;
                inputs.rank("sample", x, 4)?;
                let dist = self.0.encode(x)?;
                Ok(vec![
                    ("mean".to_string(), dist.mean),
                    ("logvar".to_string(), dist.logvar),
                ])
            }
            "decode" => {
                inputs.check_names(&["latents"])?;
                let z = inputs.required("latents")?;
                inputs.rank("latents", z, 4)?;
                Ok(vec![("sample".to_string(), self.0.decode(z)?)])
            }
            _ => Err(inputs.unknown_method(&["encode", "decode"])),
        }
    }
}
