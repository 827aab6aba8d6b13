//! diffusers' AutoPipeline resolution (`diffusers/pipelines/auto_pipeline.py`, 0.42.1) as a pure
//! library: (`model_index.json` `_class_name`, task, controlnet?) → the pipeline class diffusers
//! would instantiate, the components it loads, or diffusers' own error.
//!
//! # How diffusers resolves
//! `AutoPipelineFor{Text2Image,Image2Image,Inpainting}.from_pretrained` reads `_class_name` and
//! rewrites it by string replacement before looking it up:
//! - the part to rewrite (`to_replace`) is `"Img2ImgPipeline"` if the name contains `Img2Img`
//!   (image-to-image only), `"InpaintPipeline"` if it contains `Inpaint` (inpainting only),
//!   `"ControlPipeline"` for Flux-tools checkpoints, else `"Pipeline"`;
//! - a `controlnet` kwarg (any value, even `None`) turns it into `ControlNet…` (`ControlNetUnion…`
//!   for a `ControlNetUnionModel`); `enable_pag=True` into `PAG…`;
//! - the name's *model name* is the key of the first table entry holding that class (all tables,
//!   video, audio and the Kandinsky decoder tables included, in `SUPPORTED_TASKS_MAPPINGS` order),
//!   and the task's table entry for that key is the answer. If the name is in no table, or the
//!   task's table has no such key, diffusers raises
//!   `AutoPipeline can't find a pipeline linked to {class} for {model name or None}`.
//!
//! Consequences worth knowing (all pinned by tests): an SDXL refiner
//! (`StableDiffusionXLImg2ImgPipeline`) asked for text2img gives `StableDiffusionXLPipeline`, but with
//! a ControlNet it becomes `StableDiffusionXLImg2ImgControlNetPipeline`, which no table holds (for
//! img2img it correctly becomes `StableDiffusionXLControlNetImg2ImgPipeline`); an inpainting
//! checkpoint asked for text2img gives the plain text-to-image pipeline, and with a ControlNet fails
//! the same way; `IFInpaintingPipeline` has no `InpaintPipeline` substring, so a ControlNet leaves
//! it unchanged.
//!
//! `from_pipe` (switching task on an already-built pipeline) uses different rewrites; see
//! [`resolve_from_pipe`].
//!
//! # Kandinsky: connected pipelines
//! A Kandinsky checkpoint is a *decoder* repo whose `model_index.json` names the decoder pipeline
//! (`KandinskyV22Pipeline`, `KandinskyPipeline`, or their Img2Img/Inpaint variants). Those classes
//! sit only in the `_AUTO_*_DECODER_PIPELINES_MAPPING` tables under the model names `kandinsky` /
//! `kandinsky22`, so every task resolves to the *Combined* pipeline
//! (`KandinskyV22CombinedPipeline`, …). A Combined pipeline has `_load_connected_pipes = True`:
//! `DiffusionPipeline.from_pretrained` loads the decoder components (`unet`, `scheduler`, `movq`,
//! and for 2.1 `text_encoder`, `tokenizer`) from the checkpoint folder itself, then reads the
//! folder's `README.md` model card, takes the first repo id listed under its `prior:` key
//! ([`CONNECTED_PIPES_KEYS`]), loads that repo as its own pipeline (a `KandinskyV22PriorPipeline`
//! whose components are `prior`, `image_encoder`, `text_encoder`, `tokenizer`, `scheduler`,
//! `image_processor`) and passes each of its components as `prior_<name>` (`prior_prior`,
//! `prior_text_encoder`, …). Without that model card entry the `prior_*` components are missing and
//! diffusers fails. [`Resolution::connected_prior`] names the prior pipeline class and
//! [`ComponentSlot::connected`] splits a `prior_*` slot into (`"prior"`, component name).
//!
//! # Scope
//! Every class the diffusers tables know resolves as diffusers resolves it; autopipe runs the
//! families of [`Family`] other than [`Family::Other`], whose resolutions carry their component
//! lists. The Kolors entries diffusers adds when sentencepiece is installed are included.

mod pipelines;
mod tables;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The model-card keys naming connected pipelines, and the component-name prefix their components
/// get (diffusers' `CONNECTED_PIPES_KEYS`).
pub const CONNECTED_PIPES_KEYS: &[&str] = &["prior"];

/// What the caller asks a model to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// `AutoPipelineForText2Image`.
    Text2Img,
    /// `AutoPipelineForImage2Image`.
    Img2Img,
    /// `AutoPipelineForInpainting`.
    Inpaint,
}

impl Task {
    /// Every task, in diffusers' table order.
    pub const ALL: [Task; 3] = [Task::Text2Img, Task::Img2Img, Task::Inpaint];

    /// The task's wire name: "text2img", "img2img" or "inpaint".
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Text2Img => "text2img",
            Task::Img2Img => "img2img",
            Task::Inpaint => "inpaint",
        }
    }

    /// The diffusers AutoPipeline class serving this task.
    pub fn auto_pipeline_class(self) -> &'static str {
        match self {
            Task::Text2Img => "AutoPipelineForText2Image",
            Task::Img2Img => "AutoPipelineForImage2Image",
            Task::Inpaint => "AutoPipelineForInpainting",
        }
    }

    fn mapping(self) -> tables::Mapping {
        match self {
            Task::Text2Img => tables::AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
            Task::Img2Img => tables::AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
            Task::Inpaint => tables::AUTO_INPAINT_PIPELINES_MAPPING,
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Task {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Task::ALL
            .into_iter()
            .find(|task| task.as_str() == s)
            .ok_or_else(|| Error::InvalidTask(s.to_string()))
    }
}

/// The pipeline families; all but [`Family::Other`] are in autopipe's product scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Family {
    /// Stable Diffusion 1.x / 2.x: `StableDiffusion{,Img2Img,Inpaint}Pipeline`.
    StableDiffusion,
    /// `StableDiffusionControlNet{,Img2Img,Inpaint}Pipeline`.
    StableDiffusionControlNet,
    /// SDXL base, refiner and inpaint: `StableDiffusionXL{,Img2Img,Inpaint}Pipeline`.
    StableDiffusionXL,
    /// `StableDiffusionXLControlNet{,Img2Img,Inpaint}Pipeline`.
    StableDiffusionXLControlNet,
    /// DeepFloyd IF stage I: `IF{,Img2Img,Inpainting}Pipeline`.
    DeepFloydIF,
    /// Kandinsky 2.1: the Combined pipelines (prior + decoder) and their parts.
    Kandinsky21,
    /// Kandinsky 2.2: the Combined pipelines (prior + decoder) and their parts.
    Kandinsky22,
    /// A class diffusers resolves to but autopipe does not implement.
    Other,
}

impl Family {
    /// Whether autopipe implements this family.
    pub fn in_scope(self) -> bool {
        self != Family::Other
    }
}

/// One component a pipeline's `__init__` takes: a `model_index.json` key and its class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ComponentSlot {
    /// The `model_index.json` key / `__init__` argument: "unet", "text_encoder_2", "prior_prior", …
    pub name: &'static str,
    /// The first class of the `__init__` annotation, e.g. "UNet2DConditionModel".
    pub class: &'static str,
    /// Listed in the pipeline's `_optional_components` (may be absent or `[null, null]`).
    pub optional: bool,
}

impl ComponentSlot {
    /// For a slot a connected pipe fills (`prior_text_encoder`): (`"prior"`, `"text_encoder"`).
    pub fn connected(&self) -> Option<(&'static str, &'static str)> {
        let name = self.name;
        CONNECTED_PIPES_KEYS.iter().find_map(|key| {
            name.strip_prefix(key)
                .and_then(|rest| rest.strip_prefix('_'))
                .map(|rest| (*key, rest))
        })
    }
}

/// The pipeline diffusers resolves for a request, and what it loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolution {
    /// The diffusers pipeline class name, e.g. "StableDiffusionXLControlNetImg2ImgPipeline".
    pub pipeline: &'static str,
    /// The family it belongs to ([`Family::Other`]: not implemented by autopipe).
    pub family: Family,
    /// Its components in `__init__` order; empty for [`Family::Other`].
    pub components: &'static [ComponentSlot],
    /// For a connected (Combined) pipeline: the prior pipeline class loaded from the repo named
    /// under the checkpoint model card's `prior:` key; its components fill the `prior_*` slots.
    pub connected_prior: Option<&'static str>,
}

impl Resolution {
    fn of(pipeline: &'static str) -> Self {
        let (family, components) = match pipelines::find(pipeline) {
            Some(spec) => (spec.family, spec.components),
            None => (Family::Other, &[][..]),
        };
        Resolution {
            pipeline,
            family,
            components,
            connected_prior: pipelines::connected_prior(pipeline),
        }
    }

    /// The slot named `name`, if this pipeline takes it.
    pub fn component(&self, name: &str) -> Option<&'static ComponentSlot> {
        self.components.iter().find(|slot| slot.name == name)
    }
}

/// The `controlnet` keyword argument as diffusers' AutoPipeline sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ControlNetKwarg {
    /// Not passed.
    #[default]
    Absent,
    /// A `ControlNetModel` (or a list of them, or a `MultiControlNetModel`).
    Model,
    /// A `ControlNetUnionModel` (only `from_pretrained` tells it apart).
    Union,
    /// `controlnet=None`: `from_pretrained` treats it as a ControlNet, `from_pipe` as a removal.
    ExplicitNone,
}

/// The keyword arguments that change which class AutoPipeline resolves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Kwargs {
    /// `controlnet=`.
    pub controlnet: ControlNetKwarg,
    /// `enable_pag=` (None: not passed).
    pub enable_pag: Option<bool>,
}

/// Resolution failures; the first two display diffusers' own `ValueError` message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The model's class is known but has no pipeline for this task (with these kwargs): a bad
    /// task/controlnet choice for the model (gRPC INVALID_ARGUMENT).
    #[error(
        "AutoPipeline can't find a pipeline linked to {class_name} for {}",
        .model_name.unwrap_or("None")
    )]
    NotLinked {
        /// The class name diffusers looked up (after the controlnet/PAG rewrite).
        class_name: String,
        /// diffusers' model name of that class ("stable-diffusion-xl", …); None if no table has it.
        model_name: Option<&'static str>,
        /// The task asked for.
        task: Task,
    },
    /// The model's `_class_name` is in no diffusers AutoPipeline table (gRPC INVALID_ARGUMENT /
    /// UNIMPLEMENTED); holds the class name diffusers looked up (after any rewrite).
    #[error("AutoPipeline can't find a pipeline linked to {0} for None")]
    UnknownClass(String),
    /// A task name other than "text2img", "img2img", "inpaint" (gRPC INVALID_ARGUMENT).
    #[error("unknown task {0:?}: expected one of \"text2img\", \"img2img\", \"inpaint\"")]
    InvalidTask(String),
}

/// Whether any diffusers AutoPipeline table holds `class_name`.
pub fn is_known_class(class_name: &str) -> bool {
    tables::get_model(class_name).is_some()
}

/// Every pipeline class any diffusers AutoPipeline table holds, each once, in table order.
pub fn known_classes() -> impl Iterator<Item = &'static str> {
    tables::all_classes()
}

/// diffusers' `_get_model`: the model name ("stable-diffusion-xl", "kandinsky22", …) of a class.
pub fn model_name(class_name: &str) -> Option<&'static str> {
    tables::get_model(class_name)
}

/// `AutoPipelineFor<task>.from_pretrained(model, controlnet=ControlNetModel)` when `controlnet`,
/// else without it: the pipeline for a checkpoint whose `model_index.json` names
/// `model_index_class_name`.
pub fn resolve(
    model_index_class_name: &str,
    task: Task,
    controlnet: bool,
) -> Result<Resolution, Error> {
    let kwargs = Kwargs {
        controlnet: if controlnet {
            ControlNetKwarg::Model
        } else {
            ControlNetKwarg::Absent
        },
        enable_pag: None,
    };
    resolve_from_pretrained(model_index_class_name, task, kwargs)
}

/// `AutoPipelineFor<task>.from_pretrained(model, **kwargs)`'s class choice, every kwarg honoured.
pub fn resolve_from_pretrained(
    model_index_class_name: &str,
    task: Task,
    kwargs: Kwargs,
) -> Result<Resolution, Error> {
    let original = model_index_class_name;
    let to_replace = match task {
        Task::Img2Img if original.contains("Img2Img") => "Img2ImgPipeline",
        Task::Inpaint if original.contains("Inpaint") => "InpaintPipeline",
        _ if original.contains("ControlPipeline") => "ControlPipeline",
        _ => "Pipeline",
    };
    // Text-to-image writes the whole suffix; the other two prefix `to_replace`, which is why a
    // Flux `…ControlPipeline` becomes `…ControlNetPipeline` in one and `…ControlNetControlPipeline`
    // in the others.
    let rewrite = |prefix: &str| match task {
        Task::Text2Img => format!("{prefix}Pipeline"),
        Task::Img2Img | Task::Inpaint => format!("{prefix}{to_replace}"),
    };
    let mut name = original.to_string();
    match kwargs.controlnet {
        ControlNetKwarg::Absent => {}
        ControlNetKwarg::Union => name = name.replace(to_replace, &rewrite("ControlNetUnion")),
        ControlNetKwarg::Model | ControlNetKwarg::ExplicitNone => {
            name = name.replace(to_replace, &rewrite("ControlNet"))
        }
    }
    if kwargs.enable_pag == Some(true) {
        name = name.replace(to_replace, &rewrite("PAG"));
    }
    if to_replace == "ControlPipeline" {
        match task {
            Task::Text2Img => {}
            Task::Img2Img => name = name.replace(to_replace, "ControlImg2ImgPipeline"),
            Task::Inpaint => name = name.replace(to_replace, "ControlInpaintPipeline"),
        }
    }
    Lookup::new(original, task).get(&name).map(Resolution::of)
}

/// `AutoPipelineFor<task>.from_pipe(pipeline, **kwargs)`'s class choice, where `pipeline_class_name`
/// is the class of the pipeline already built.
///
/// Unlike `from_pretrained`, the pipeline's own class is looked up first, then rewritten:
/// `controlnet=<model>` swaps in the ControlNet variant, `controlnet=None` takes the ControlNet out,
/// `enable_pag` adds or removes PAG; each rewrite is looked up again in the task's table.
pub fn resolve_from_pipe(
    pipeline_class_name: &str,
    task: Task,
    kwargs: Kwargs,
) -> Result<Resolution, Error> {
    let lookup = Lookup::new(pipeline_class_name, task);
    let mut class = lookup.get(pipeline_class_name)?;
    let controlnet = match kwargs.controlnet {
        ControlNetKwarg::Absent => None,
        ControlNetKwarg::ExplicitNone => Some(false),
        ControlNetKwarg::Model | ControlNetKwarg::Union => Some(true),
    };
    match (task, controlnet) {
        (_, None) => {}
        (Task::Text2Img, Some(true)) => {
            let to_replace = if class.contains("PAG") {
                "PAGPipeline"
            } else {
                "Pipeline"
            };
            let name = class
                .replace("ControlNet", "")
                .replace(to_replace, &format!("ControlNet{to_replace}"));
            class = lookup.get(&name)?;
        }
        (Task::Img2Img, Some(true)) => {
            let to_replace = if class.contains("PAG") {
                "PAGImg2ImgPipeline"
            } else {
                "Img2ImgPipeline"
            };
            let name = class
                .replace("ControlNet", "")
                .replace(to_replace, &format!("ControlNet{to_replace}"));
            class = lookup.get(&name)?;
        }
        (Task::Inpaint, Some(true)) => {
            let name = class
                .replace("ControlNet", "")
                .replace("InpaintPipeline", "ControlNetInpaintPipeline");
            class = lookup.get(&name)?;
        }
        (Task::Text2Img | Task::Img2Img, Some(false)) => {
            class = lookup.get(&class.replace("ControlNet", ""))?;
        }
        (Task::Inpaint, Some(false)) => {
            class = lookup.get(&class.replace("ControlNetInpaintPipeline", "InpaintPipeline"))?;
        }
    }
    match (task, kwargs.enable_pag) {
        (_, None) => {}
        (Task::Text2Img, Some(true)) => {
            class = lookup.get(&class.replace("PAG", "").replace("Pipeline", "PAGPipeline"))?;
        }
        (Task::Img2Img, Some(true)) => {
            let name = class
                .replace("PAG", "")
                .replace("Img2ImgPipeline", "PAGImg2ImgPipeline");
            class = lookup.get(&name)?;
        }
        (Task::Inpaint, Some(true)) => {
            let name = class
                .replace("PAG", "")
                .replace("InpaintPipeline", "PAGInpaintPipeline");
            class = lookup.get(&name)?;
        }
        (Task::Text2Img | Task::Img2Img, Some(false)) => {
            class = lookup.get(&class.replace("PAG", ""))?;
        }
        (Task::Inpaint, Some(false)) => {
            class = lookup.get(&class.replace("PAGInpaintPipeline", "InpaintPipeline"))?;
        }
    }
    Ok(Resolution::of(class))
}

/// diffusers' `_get_connected_pipeline`: the Combined pipeline a decoder pipeline class is loaded
/// as under `DiffusionPipeline.from_pretrained(..., load_connected_pipeline=True)`.
pub fn connected_pipeline(pipeline_class_name: &str) -> Option<&'static str> {
    [
        (
            tables::AUTO_TEXT2IMAGE_DECODER_PIPELINES_MAPPING,
            tables::AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
        ),
        (
            tables::AUTO_IMAGE2IMAGE_DECODER_PIPELINES_MAPPING,
            tables::AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
        ),
        (
            tables::AUTO_INPAINT_DECODER_PIPELINES_MAPPING,
            tables::AUTO_INPAINT_PIPELINES_MAPPING,
        ),
    ]
    .into_iter()
    .find(|(decoders, _)| decoders.iter().any(|(_, c)| *c == pipeline_class_name))
    .and_then(|(_, mapping)| tables::get_task_class(mapping, pipeline_class_name).ok())
}

/// The components of an in-scope pipeline class, including the Kandinsky decoder and prior
/// pipelines a Combined pipeline is built from; None for a class outside autopipe's scope.
pub fn pipeline_components(pipeline_class_name: &str) -> Option<&'static [ComponentSlot]> {
    pipelines::find(pipeline_class_name).map(|spec| spec.components)
}

/// `_get_task_class` over one task's table, turning a miss into the matching [`Error`].
struct Lookup {
    task: Task,
    original_known: bool,
}

impl Lookup {
    fn new(original: &str, task: Task) -> Self {
        Lookup {
            task,
            original_known: is_known_class(original),
        }
    }

    fn get(&self, class_name: &str) -> Result<&'static str, Error> {
        tables::get_task_class(self.task.mapping(), class_name).map_err(|model_name| {
            if self.original_known || model_name.is_some() {
                Error::NotLinked {
                    class_name: class_name.to_string(),
                    model_name,
                    task: self.task,
                }
            } else {
                Error::UnknownClass(class_name.to_string())
            }
        })
    }
}

#[cfg(test)]
mod tests;
