//! Resident components and the methods the store runs on them (`Invoke`).
//!
//! | class | method | inputs | outputs |
//! |---|---|---|---|
//! | CLIPTextModel | `encode` | `input_ids` (int64 [B, T]) | `last_hidden_state`, `pooler_output`, `penultimate_hidden_state` |
//! | CLIPTextModelWithProjection | `encode` | `input_ids` (int64 [B, T]) | `last_hidden_state`, `text_embeds`, `penultimate_hidden_state` |
//! | UNet2DConditionModel | `forward` | `sample`, `timestep`, `encoder_hidden_states`, optional `text_embeds` + `time_ids` | `sample` |
//! | AutoencoderKL | `encode` | `sample` (images in [-1, 1]) | `mean`, `logvar` |
//! | AutoencoderKL | `decode` | `latents` (already divided by `scaling_factor`) | `sample` |
//!
//! Floating-point inputs are moved to the component's device and dtype; outputs stay there.

use crate::{Code, StoreError, Tensors};
use autopipe_models::{clip, unet, vae};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The component classes this store can load.
pub const SUPPORTED_CLASSES: &[&str] = &[
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "UNet2DConditionModel",
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
        "CLIPTextModel" => Box::new(TextEncoder::Plain(
            clip::CLIPTextModel::load(dir, variant, kind, device).map_err(model_error)?,
        )),
        "CLIPTextModelWithProjection" => Box::new(TextEncoder::WithProjection(
            clip::CLIPTextModelWithProjection::load(dir, variant, kind, device)
                .map_err(model_error)?,
        )),
        "UNet2DConditionModel" => Box::new(Unet(
            unet::UNet2DConditionModel::load(dir, variant, kind, device).map_err(model_error)?,
        )),
        "AutoencoderKL" => Box::new(Vae(
            vae::AutoencoderKL::load(dir, variant, kind, device).map_err(model_error)?
        )),
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

/// A store error for a model failure: a bad config or weights is the checkpoint's fault, a bad
/// input the caller's.
fn model_error(e: autopipe_models::Error) -> StoreError {
    use autopipe_models::Error as E;
    let code = match &e {
        E::Config(_) | E::Weights(_) => Code::FailedPrecondition,
        E::Input(_) => Code::InvalidArgument,
        E::Io(io) if io.kind() == std::io::ErrorKind::NotFound => Code::NotFound,
        // Running out of device memory is a resource limit, not a bug: say so rather than INTERNAL.
        E::Torch(t) if t.to_string().to_ascii_lowercase().contains("out of memory") => {
            Code::ResourceExhausted
        }
        _ => Code::Internal,
    };
    StoreError::new(code, e.to_string())
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
                let o = m.forward(ids).map_err(model_error)?;
                (
                    o.last_hidden_state,
                    ("pooler_output", o.pooler_output),
                    o.hidden_states,
                )
            }
            Self::WithProjection(m) => {
                let o = m.forward(ids).map_err(model_error)?;
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
        inputs.check_names(&[
            "sample",
            "timestep",
            "encoder_hidden_states",
            "text_embeds",
            "time_ids",
        ])?;
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
        let added = match (inputs.optional("text_embeds"), inputs.optional("time_ids")) {
            (Some(te), Some(ti)) => Some(unet::SdxlConditioning {
                text_embeds: float_input(te, kind, device),
                time_ids: float_input(ti, kind, device),
            }),
            (None, None) => None,
            _ => {
                return Err(StoreError::new(
                    Code::InvalidArgument,
                    "inputs.time_ids: UNet2DConditionModel.forward takes text_embeds and time_ids together or neither",
                ))
            }
        };
        let out = self
            .0
            .forward(
                &float_input(sample, kind, device),
                &timestep,
                &float_input(ehs, kind, device),
                added.as_ref(),
            )
            .map_err(model_error)?;
        Ok(vec![("sample".to_string(), out)])
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
                let dist = self.0.encode(x).map_err(model_error)?;
                Ok(vec![
                    ("mean".to_string(), dist.mean),
                    ("logvar".to_string(), dist.logvar),
                ])
            }
            "decode" => {
                inputs.check_names(&["latents"])?;
                let z = inputs.required("latents")?;
                inputs.rank("latents", z, 4)?;
                Ok(vec![(
                    "sample".to_string(),
                    self.0.decode(z).map_err(model_error)?,
                )])
            }
            _ => Err(inputs.unknown_method(&["encode", "decode"])),
        }
    }
}
