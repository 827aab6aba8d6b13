//! Resident components and the methods the store runs on them (`Invoke`).
//!
//! | class | method | inputs | outputs |
//! |---|---|---|---|
//! | CLIPTextModel | `encode` | `input_ids` (int64 [B, T]) | `last_hidden_state`, `pooler_output`, `penultimate_hidden_state` |
//! | CLIPTextModelWithProjection | `encode` | `input_ids` (int64 [B, T]) | `last_hidden_state`, `text_embeds`, `penultimate_hidden_state` |
//! | UNet2DConditionModel | `forward` | `sample`, `timestep`, `encoder_hidden_states` (unless `image_proj`), optional `text_embeds` + `time_ids`, optional `image_embeds` | `sample` |
//! | AutoencoderKL | `encode` | `sample` (images in [-1, 1]) | `mean`, `logvar` |
//! | AutoencoderKL | `decode` | `latents` (already divided by `scaling_factor`) | `sample` |
//! | CLIPVisionModelWithProjection | `encode` | `pixel_values` ([B, 3, S, S]) | `image_embeds`, `last_hidden_state` |
//! | PriorTransformer | `forward` | `hidden_states`, `timestep`, `proj_embedding`, `encoder_hidden_states`, `attention_mask` (bool [B, T]) | `predicted_image_embedding` |
//! | PriorTransformer | `post_process_latents` | `latents` | `latents` (`* clip_std + clip_mean`) |
//! | VQModel | `encode` | `sample` (images in [-1, 1]) | `latents` |
//! | VQModel | `decode` | `latents` (decoded with `force_not_quantize=True`) | `sample` |
//!
//! Floating-point inputs are moved to the component's device and dtype; outputs stay there.

use crate::{Code, StoreError};
use autopipe_models::{clip, prior_transformer, unet, vae, vq_model};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Named tensors in and out of a component method.
pub type Tensors = Vec<(String, Tensor)>;

/// The component classes this store can load.
pub const SUPPORTED_CLASSES: &[&str] = &[
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "UNet2DConditionModel",
    "AutoencoderKL",
    "CLIPVisionModelWithProjection",
    "PriorTransformer",
    "VQModel",
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
        "AutoencoderKL" => Box::new(Vae(vae::AutoencoderKL::load(dir, variant, kind, device)?)),
        "CLIPVisionModelWithProjection" => Box::new(ImageEncoder(
            clip::CLIPVisionModelWithProjection::load(dir, variant, kind, device)?,
        )),
        "PriorTransformer" => Box::new(Prior(prior_transformer::PriorTransformer::load(
            dir, variant, kind, device,
        )?)),
        "VQModel" => Box::new(Movq(vq_model::VQModel::load(dir, variant, kind, device)?)),
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
        inputs.check_names(&[
            "sample",
            "timestep",
            "encoder_hidden_states",
            "text_embeds",
            "time_ids",
            "image_embeds",
        ])?;
        let (kind, device) = (self.0.kind(), self.0.device());
        let sample = inputs.required("sample")?;
        inputs.rank("sample", sample, 4)?;
        let image_embeds = inputs.optional("image_embeds");
        if let Some(ie) = image_embeds {
            inputs.rank("image_embeds", ie, 2)?;
        }
        let ehs = match (inputs.optional("encoder_hidden_states"), image_embeds) {
            (Some(ehs), _) => {
                inputs.rank("encoder_hidden_states", ehs, 3)?;
                Some(float_input(ehs, kind, device))
            }
            (None, Some(_)) => None,
            (None, None) => {
                return Err(StoreError::new(
                    Code::InvalidArgument,
                    "inputs.encoder_hidden_states: UNet2DConditionModel.forward requires it (or image_embeds for an image_proj UNet)",
                ))
            }
        };
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
        let image_embeds = image_embeds.map(|t| float_input(t, kind, device));
        let extra = unet::UNetExtraInputs {
            added: added.as_ref(),
            image_embeds: image_embeds.as_ref(),
            ..Default::default()
        };
        let out = self.0.forward_with(
            &float_input(sample, kind, device),
            &timestep,
            ehs.as_ref(),
            &extra,
        )?;
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

struct ImageEncoder(clip::CLIPVisionModelWithProjection);
struct Prior(prior_transformer::PriorTransformer);
struct Movq(vq_model::VQModel);

// SAFETY: as for the components above, loaded weights are only read.
unsafe impl Sync for ImageEncoder {}
unsafe impl Sync for Prior {}
unsafe impl Sync for Movq {}

impl Component for ImageEncoder {
    fn invoke(&self, method: &str, tensors: &Tensors) -> Result<Tensors, StoreError> {
        let inputs = Inputs {
            class: "CLIPVisionModelWithProjection",
            method,
            tensors,
        };
        if method != "encode" {
            return Err(inputs.unknown_method(&["encode"]));
        }
        inputs.check_names(&["pixel_values"])?;
        let pixels = inputs.required("pixel_values")?;
        inputs.rank("pixel_values", pixels, 4)?;
        let out = self.0.forward(pixels)?;
        Ok(vec![
            ("image_embeds".to_string(), out.image_embeds),
            ("last_hidden_state".to_string(), out.last_hidden_state),
        ])
    }
}

impl Component for Prior {
    fn invoke(&self, method: &str, tensors: &Tensors) -> Result<Tensors, StoreError> {
        let inputs = Inputs {
            class: "PriorTransformer",
            method,
            tensors,
        };
        let (kind, device) = (self.0.kind(), self.0.device());
        match method {
            "forward" => {
                inputs.check_names(&[
                    "hidden_states",
                    "timestep",
                    "proj_embedding",
                    "encoder_hidden_states",
                    "attention_mask",
                ])?;
                let hidden = inputs.required("hidden_states")?;
                inputs.rank("hidden_states", hidden, 2)?;
                let proj = inputs.required("proj_embedding")?;
                inputs.rank("proj_embedding", proj, 2)?;
                let timestep = inputs.required("timestep")?;
                if timestep.dim() > 1 {
                    return Err(StoreError::new(
                        Code::InvalidArgument,
                        format!("inputs.timestep: PriorTransformer.forward needs a scalar or [batch], got shape {:?}", timestep.size()),
                    ));
                }
                let ehs = inputs.optional("encoder_hidden_states");
                if let Some(e) = ehs {
                    inputs.rank("encoder_hidden_states", e, 3)?;
                }
                let mask = inputs.optional("attention_mask");
                if let Some(m) = mask {
                    inputs.rank("attention_mask", m, 2)?;
                }
                let out = self.0.forward(
                    &float_input(hidden, kind, device),
                    timestep,
                    &float_input(proj, kind, device),
                    ehs.map(|e| float_input(e, kind, device)).as_ref(),
                    mask,
                )?;
                Ok(vec![("predicted_image_embedding".to_string(), out)])
            }
            "post_process_latents" => {
                inputs.check_names(&["latents"])?;
                let latents = inputs.required("latents")?;
                inputs.rank("latents", latents, 2)?;
                Ok(vec![(
                    "latents".to_string(),
                    self.0.post_process_latents(latents),
                )])
            }
            _ => Err(inputs.unknown_method(&["forward", "post_process_latents"])),
        }
    }
}

impl Component for Movq {
    fn invoke(&self, method: &str, tensors: &Tensors) -> Result<Tensors, StoreError> {
        let inputs = Inputs {
            class: "VQModel",
            method,
            tensors,
        };
        // VQModel checks shapes and moves inputs to its device and dtype itself.
        match method {
            "encode" => {
                inputs.check_names(&["sample"])?;
                let x = inputs.required("sample")?;
                inputs.rank("sample", x, 4)?;
                Ok(vec![("latents".to_string(), self.0.encode(x)?)])
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
