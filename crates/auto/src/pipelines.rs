//! What each pipeline in autopipe's scope loads: the components of its `__init__` (diffusers
//! 0.42.1: `pipelines/stable_diffusion/pipeline_stable_diffusion*.py`,
//! `pipelines/controlnet/pipeline_controlnet*.py`, `pipelines/stable_diffusion_xl/*.py`,
//! `pipelines/deepfloyd_if/pipeline_if*.py`, `pipelines/kandinsky/*.py`,
//! `pipelines/kandinsky2_2/*.py`), in signature order, `optional` = listed in
//! `_optional_components`; and the prior pipeline a connected (`_load_connected_pipes`) pipeline
//! wraps.
//!
//! A slot's `class` is the first class of the `__init__` annotation as written in the source
//! (`KarrasDiffusionSchedulers` means any Karras scheduler; `ControlNetModel` stands for
//! `ControlNetModel | list[ControlNetModel] | … | MultiControlNetModel`).

use crate::{ComponentSlot, Family};

const fn slot(name: &'static str, class: &'static str) -> ComponentSlot {
    ComponentSlot {
        name,
        class,
        optional: false,
    }
}

const fn optional(name: &'static str, class: &'static str) -> ComponentSlot {
    ComponentSlot {
        name,
        class,
        optional: true,
    }
}

const STABLE_DIFFUSION: &[ComponentSlot] = &[
    slot("vae", "AutoencoderKL"),
    slot("text_encoder", "CLIPTextModel"),
    slot("tokenizer", "CLIPTokenizer"),
    slot("unet", "UNet2DConditionModel"),
    slot("scheduler", "KarrasDiffusionSchedulers"),
    optional("safety_checker", "StableDiffusionSafetyChecker"),
    optional("feature_extractor", "CLIPImageProcessor"),
    optional("image_encoder", "CLIPVisionModelWithProjection"),
];

const STABLE_DIFFUSION_CONTROLNET: &[ComponentSlot] = &[
    slot("vae", "AutoencoderKL"),
    slot("text_encoder", "CLIPTextModel"),
    slot("tokenizer", "CLIPTokenizer"),
    slot("unet", "UNet2DConditionModel"),
    slot("controlnet", "ControlNetModel"),
    slot("scheduler", "KarrasDiffusionSchedulers"),
    optional("safety_checker", "StableDiffusionSafetyChecker"),
    optional("feature_extractor", "CLIPImageProcessor"),
    optional("image_encoder", "CLIPVisionModelWithProjection"),
];

// The text encoders are optional so that the SDXL refiner (no `text_encoder`/`tokenizer`) loads.
const STABLE_DIFFUSION_XL: &[ComponentSlot] = &[
    slot("vae", "AutoencoderKL"),
    optional("text_encoder", "CLIPTextModel"),
    optional("text_encoder_2", "CLIPTextModelWithProjection"),
    optional("tokenizer", "CLIPTokenizer"),
    optional("tokenizer_2", "CLIPTokenizer"),
    slot("unet", "UNet2DConditionModel"),
    slot("scheduler", "KarrasDiffusionSchedulers"),
    optional("image_encoder", "CLIPVisionModelWithProjection"),
    optional("feature_extractor", "CLIPImageProcessor"),
];

const STABLE_DIFFUSION_XL_CONTROLNET: &[ComponentSlot] = &[
    slot("vae", "AutoencoderKL"),
    optional("text_encoder", "CLIPTextModel"),
    optional("text_encoder_2", "CLIPTextModelWithProjection"),
    optional("tokenizer", "CLIPTokenizer"),
    optional("tokenizer_2", "CLIPTokenizer"),
    slot("unet", "UNet2DConditionModel"),
    slot("controlnet", "ControlNetModel"),
    slot("scheduler", "KarrasDiffusionSchedulers"),
    optional("feature_extractor", "CLIPImageProcessor"),
    optional("image_encoder", "CLIPVisionModelWithProjection"),
];

const DEEPFLOYD_IF: &[ComponentSlot] = &[
    optional("tokenizer", "T5Tokenizer"),
    optional("text_encoder", "T5EncoderModel"),
    slot("unet", "UNet2DConditionModel"),
    slot("scheduler", "DDPMScheduler"),
    optional("safety_checker", "IFSafetyChecker"),
    optional("feature_extractor", "CLIPImageProcessor"),
    optional("watermarker", "IFWatermarker"),
];

// `KandinskyCombinedPipeline.__init__` annotates `scheduler: DDIMScheduler | DDPMScheduler`.
const KANDINSKY_COMBINED: &[ComponentSlot] = &[
    slot("text_encoder", "MultilingualCLIP"),
    slot("tokenizer", "XLMRobertaTokenizer"),
    slot("unet", "UNet2DConditionModel"),
    slot("scheduler", "DDIMScheduler"),
    slot("movq", "VQModel"),
    slot("prior_prior", "PriorTransformer"),
    slot("prior_image_encoder", "CLIPVisionModelWithProjection"),
    slot("prior_text_encoder", "CLIPTextModelWithProjection"),
    slot("prior_tokenizer", "CLIPTokenizer"),
    slot("prior_scheduler", "UnCLIPScheduler"),
    slot("prior_image_processor", "CLIPImageProcessor"),
];

const KANDINSKY: &[ComponentSlot] = &[
    slot("text_encoder", "MultilingualCLIP"),
    slot("tokenizer", "XLMRobertaTokenizer"),
    slot("unet", "UNet2DConditionModel"),
    slot("scheduler", "DDIMScheduler"),
    slot("movq", "VQModel"),
];

// Same components as `KANDINSKY`, in the order `KandinskyImg2ImgPipeline.__init__` lists them.
const KANDINSKY_IMG2IMG: &[ComponentSlot] = &[
    slot("text_encoder", "MultilingualCLIP"),
    slot("movq", "VQModel"),
    slot("tokenizer", "XLMRobertaTokenizer"),
    slot("unet", "UNet2DConditionModel"),
    slot("scheduler", "DDIMScheduler"),
];

const KANDINSKY_PRIOR: &[ComponentSlot] = &[
    slot("prior", "PriorTransformer"),
    slot("image_encoder", "CLIPVisionModelWithProjection"),
    slot("text_encoder", "CLIPTextModelWithProjection"),
    slot("tokenizer", "CLIPTokenizer"),
    slot("scheduler", "UnCLIPScheduler"),
    slot("image_processor", "CLIPImageProcessor"),
];

const KANDINSKY_V22_COMBINED: &[ComponentSlot] = &[
    slot("unet", "UNet2DConditionModel"),
    slot("scheduler", "DDPMScheduler"),
    slot("movq", "VQModel"),
    slot("prior_prior", "PriorTransformer"),
    slot("prior_image_encoder", "CLIPVisionModelWithProjection"),
    slot("prior_text_encoder", "CLIPTextModelWithProjection"),
    slot("prior_tokenizer", "CLIPTokenizer"),
    slot("prior_scheduler", "UnCLIPScheduler"),
    slot("prior_image_processor", "CLIPImageProcessor"),
];

const KANDINSKY_V22: &[ComponentSlot] = &[
    slot("unet", "UNet2DConditionModel"),
    slot("scheduler", "DDPMScheduler"),
    slot("movq", "VQModel"),
];

/// A pipeline class autopipe implements (or loads as a part: Kandinsky decoders and priors).
pub(crate) struct PipelineSpec {
    pub(crate) name: &'static str,
    pub(crate) family: Family,
    pub(crate) components: &'static [ComponentSlot],
}

const fn spec(
    name: &'static str,
    family: Family,
    components: &'static [ComponentSlot],
) -> PipelineSpec {
    PipelineSpec {
        name,
        family,
        components,
    }
}

/// The pipelines in autopipe's product scope.
pub(crate) const PIPELINES: &[PipelineSpec] = &[
    spec(
        "StableDiffusionPipeline",
        Family::StableDiffusion,
        STABLE_DIFFUSION,
    ),
    spec(
        "StableDiffusionImg2ImgPipeline",
        Family::StableDiffusion,
        STABLE_DIFFUSION,
    ),
    spec(
        "StableDiffusionInpaintPipeline",
        Family::StableDiffusion,
        STABLE_DIFFUSION,
    ),
    spec(
        "StableDiffusionControlNetPipeline",
        Family::StableDiffusionControlNet,
        STABLE_DIFFUSION_CONTROLNET,
    ),
    spec(
        "StableDiffusionControlNetImg2ImgPipeline",
        Family::StableDiffusionControlNet,
        STABLE_DIFFUSION_CONTROLNET,
    ),
    spec(
        "StableDiffusionControlNetInpaintPipeline",
        Family::StableDiffusionControlNet,
        STABLE_DIFFUSION_CONTROLNET,
    ),
    spec(
        "StableDiffusionXLPipeline",
        Family::StableDiffusionXL,
        STABLE_DIFFUSION_XL,
    ),
    spec(
        "StableDiffusionXLImg2ImgPipeline",
        Family::StableDiffusionXL,
        STABLE_DIFFUSION_XL,
    ),
    spec(
        "StableDiffusionXLInpaintPipeline",
        Family::StableDiffusionXL,
        STABLE_DIFFUSION_XL,
    ),
    spec(
        "StableDiffusionXLControlNetPipeline",
        Family::StableDiffusionXLControlNet,
        STABLE_DIFFUSION_XL_CONTROLNET,
    ),
    spec(
        "StableDiffusionXLControlNetImg2ImgPipeline",
        Family::StableDiffusionXLControlNet,
        STABLE_DIFFUSION_XL_CONTROLNET,
    ),
    spec(
        "StableDiffusionXLControlNetInpaintPipeline",
        Family::StableDiffusionXLControlNet,
        STABLE_DIFFUSION_XL_CONTROLNET,
    ),
    spec("IFPipeline", Family::DeepFloydIF, DEEPFLOYD_IF),
    spec("IFImg2ImgPipeline", Family::DeepFloydIF, DEEPFLOYD_IF),
    spec("IFInpaintingPipeline", Family::DeepFloydIF, DEEPFLOYD_IF),
    spec(
        "KandinskyCombinedPipeline",
        Family::Kandinsky21,
        KANDINSKY_COMBINED,
    ),
    spec(
        "KandinskyImg2ImgCombinedPipeline",
        Family::Kandinsky21,
        KANDINSKY_COMBINED,
    ),
    spec(
        "KandinskyInpaintCombinedPipeline",
        Family::Kandinsky21,
        KANDINSKY_COMBINED,
    ),
    spec("KandinskyPipeline", Family::Kandinsky21, KANDINSKY),
    spec(
        "KandinskyImg2ImgPipeline",
        Family::Kandinsky21,
        KANDINSKY_IMG2IMG,
    ),
    spec(
        "KandinskyInpaintPipeline",
        Family::Kandinsky21,
        KANDINSKY_IMG2IMG,
    ),
    spec(
        "KandinskyPriorPipeline",
        Family::Kandinsky21,
        KANDINSKY_PRIOR,
    ),
    spec(
        "KandinskyV22CombinedPipeline",
        Family::Kandinsky22,
        KANDINSKY_V22_COMBINED,
    ),
    spec(
        "KandinskyV22Img2ImgCombinedPipeline",
        Family::Kandinsky22,
        KANDINSKY_V22_COMBINED,
    ),
    spec(
        "KandinskyV22InpaintCombinedPipeline",
        Family::Kandinsky22,
        KANDINSKY_V22_COMBINED,
    ),
    spec("KandinskyV22Pipeline", Family::Kandinsky22, KANDINSKY_V22),
    spec(
        "KandinskyV22Img2ImgPipeline",
        Family::Kandinsky22,
        KANDINSKY_V22,
    ),
    spec(
        "KandinskyV22InpaintPipeline",
        Family::Kandinsky22,
        KANDINSKY_V22,
    ),
    spec(
        "KandinskyV22PriorPipeline",
        Family::Kandinsky22,
        KANDINSKY_PRIOR,
    ),
];

/// The spec of an in-scope pipeline class.
pub(crate) fn find(name: &str) -> Option<&'static PipelineSpec> {
    PIPELINES.iter().find(|spec| spec.name == name)
}

/// Pipelines with `_load_connected_pipes = True` and the prior pipeline class their `__init__`
/// wraps (`self.prior_pipe = …`), all families.
pub(crate) const CONNECTED_PRIORS: &[(&str, &str)] = &[
    ("KandinskyCombinedPipeline", "KandinskyPriorPipeline"),
    ("KandinskyImg2ImgCombinedPipeline", "KandinskyPriorPipeline"),
    ("KandinskyInpaintCombinedPipeline", "KandinskyPriorPipeline"),
    ("KandinskyV22CombinedPipeline", "KandinskyV22PriorPipeline"),
    (
        "KandinskyV22Img2ImgCombinedPipeline",
        "KandinskyV22PriorPipeline",
    ),
    (
        "KandinskyV22InpaintCombinedPipeline",
        "KandinskyV22PriorPipeline",
    ),
    ("WuerstchenCombinedPipeline", "WuerstchenPriorPipeline"),
    (
        "StableCascadeCombinedPipeline",
        "StableCascadePriorPipeline",
    ),
];

/// The prior pipeline class a connected pipeline loads beside itself.
pub(crate) fn connected_prior(name: &str) -> Option<&'static str> {
    CONNECTED_PRIORS
        .iter()
        .find(|(combined, _)| *combined == name)
        .map(|(_, prior)| *prior)
}
