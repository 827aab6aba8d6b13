//! The class tables of diffusers' `pipelines/auto_pipeline.py` (0.42.1), entry for entry and in
//! order, with `_get_model` / `_get_task_class` over them.
//!
//! Each table is a list of (model name, pipeline class name). Every family diffusers knows is here,
//! in scope for autopipe or not, so that resolution (and its errors) match diffusers exactly; which
//! resolved classes autopipe runs is decided in `pipelines.rs`.

/// One AutoPipeline table: (diffusers model name, pipeline class name), in diffusers' order.
pub(crate) type Mapping = &'static [(&'static str, &'static str)];

/// `AUTO_TEXT2IMAGE_PIPELINES_MAPPING`, including the Kolors entries diffusers appends when
/// sentencepiece is installed.
pub(crate) const AUTO_TEXT2IMAGE_PIPELINES_MAPPING: Mapping = &[
    ("stable-diffusion", "StableDiffusionPipeline"),
    ("stable-diffusion-xl", "StableDiffusionXLPipeline"),
    ("stable-diffusion-3", "StableDiffusion3Pipeline"),
    ("stable-diffusion-3-pag", "StableDiffusion3PAGPipeline"),
    ("if", "IFPipeline"),
    ("hunyuan", "HunyuanDiTPipeline"),
    ("hunyuan-pag", "HunyuanDiTPAGPipeline"),
    ("kandinsky", "KandinskyCombinedPipeline"),
    ("kandinsky22", "KandinskyV22CombinedPipeline"),
    ("kandinsky3", "Kandinsky3Pipeline"),
    (
        "stable-diffusion-controlnet",
        "StableDiffusionControlNetPipeline",
    ),
    (
        "stable-diffusion-xl-controlnet",
        "StableDiffusionXLControlNetPipeline",
    ),
    (
        "stable-diffusion-xl-controlnet-union",
        "StableDiffusionXLControlNetUnionPipeline",
    ),
    (
        "stable-diffusion-3-controlnet",
        "StableDiffusion3ControlNetPipeline",
    ),
    ("wuerstchen", "WuerstchenCombinedPipeline"),
    ("cascade", "StableCascadeCombinedPipeline"),
    ("lcm", "LatentConsistencyModelPipeline"),
    ("pixart-alpha", "PixArtAlphaPipeline"),
    ("pixart-sigma", "PixArtSigmaPipeline"),
    ("sana", "SanaPipeline"),
    ("sana-pag", "SanaPAGPipeline"),
    ("stable-diffusion-pag", "StableDiffusionPAGPipeline"),
    (
        "stable-diffusion-controlnet-pag",
        "StableDiffusionControlNetPAGPipeline",
    ),
    ("stable-diffusion-xl-pag", "StableDiffusionXLPAGPipeline"),
    (
        "stable-diffusion-xl-controlnet-pag",
        "StableDiffusionXLControlNetPAGPipeline",
    ),
    ("pixart-sigma-pag", "PixArtSigmaPAGPipeline"),
    ("auraflow", "AuraFlowPipeline"),
    ("flux", "FluxPipeline"),
    ("flux-control", "FluxControlPipeline"),
    ("flux-controlnet", "FluxControlNetPipeline"),
    ("flux-kontext", "FluxKontextPipeline"),
    ("flux2-klein", "Flux2KleinPipeline"),
    ("flux2", "Flux2Pipeline"),
    ("ideogram4", "Ideogram4Pipeline"),
    ("krea2", "Krea2Pipeline"),
    ("lumina", "LuminaPipeline"),
    ("lumina2", "Lumina2Pipeline"),
    ("chroma", "ChromaPipeline"),
    ("cogview3", "CogView3PlusPipeline"),
    ("cogview4", "CogView4Pipeline"),
    ("glm_image", "GlmImagePipeline"),
    ("helios", "HeliosPipeline"),
    ("helios-pyramid", "HeliosPyramidPipeline"),
    ("cogview4-control", "CogView4ControlPipeline"),
    ("nucleusmoe-image", "NucleusMoEImagePipeline"),
    ("qwenimage", "QwenImagePipeline"),
    ("qwenimage21", "QwenImage21Pipeline"),
    ("qwenimage-controlnet", "QwenImageControlNetPipeline"),
    ("z-image", "ZImagePipeline"),
    ("z-image-controlnet", "ZImageControlNetPipeline"),
    (
        "z-image-controlnet-inpaint",
        "ZImageControlNetInpaintPipeline",
    ),
    ("z-image-omni", "ZImageOmniPipeline"),
    ("ovis", "OvisImagePipeline"),
    ("prx", "PRXPipeline"),
    ("kolors", "KolorsPipeline"),
    ("kolors-pag", "KolorsPAGPipeline"),
];

/// `AUTO_TEXT2AUDIO_PIPELINES_MAPPING`.
pub(crate) const AUTO_TEXT2AUDIO_PIPELINES_MAPPING: Mapping = &[
    ("audioldm2", "AudioLDM2Pipeline"),
    ("stable-audio", "StableAudioPipeline"),
    ("stable-audio-3", "StableAudio3Pipeline"),
    ("longcat-audio-dit", "LongCatAudioDiTPipeline"),
];

/// `AUTO_IMAGE2IMAGE_PIPELINES_MAPPING`, including the Kolors entry (sentencepiece installed).
pub(crate) const AUTO_IMAGE2IMAGE_PIPELINES_MAPPING: Mapping = &[
    ("stable-diffusion", "StableDiffusionImg2ImgPipeline"),
    ("stable-diffusion-xl", "StableDiffusionXLImg2ImgPipeline"),
    ("stable-diffusion-3", "StableDiffusion3Img2ImgPipeline"),
    (
        "stable-diffusion-3-pag",
        "StableDiffusion3PAGImg2ImgPipeline",
    ),
    ("if", "IFImg2ImgPipeline"),
    ("kandinsky", "KandinskyImg2ImgCombinedPipeline"),
    ("kandinsky22", "KandinskyV22Img2ImgCombinedPipeline"),
    ("kandinsky3", "Kandinsky3Img2ImgPipeline"),
    (
        "stable-diffusion-controlnet",
        "StableDiffusionControlNetImg2ImgPipeline",
    ),
    ("stable-diffusion-pag", "StableDiffusionPAGImg2ImgPipeline"),
    (
        "stable-diffusion-xl-controlnet",
        "StableDiffusionXLControlNetImg2ImgPipeline",
    ),
    (
        "stable-diffusion-xl-controlnet-union",
        "StableDiffusionXLControlNetUnionImg2ImgPipeline",
    ),
    (
        "stable-diffusion-xl-pag",
        "StableDiffusionXLPAGImg2ImgPipeline",
    ),
    (
        "stable-diffusion-xl-controlnet-pag",
        "StableDiffusionXLControlNetPAGImg2ImgPipeline",
    ),
    ("lcm", "LatentConsistencyModelImg2ImgPipeline"),
    ("flux", "FluxImg2ImgPipeline"),
    ("flux-controlnet", "FluxControlNetImg2ImgPipeline"),
    ("flux-control", "FluxControlImg2ImgPipeline"),
    ("flux-kontext", "FluxKontextPipeline"),
    ("flux2-klein", "Flux2KleinPipeline"),
    ("flux2", "Flux2Pipeline"),
    ("qwenimage", "QwenImageImg2ImgPipeline"),
    ("qwenimage-edit", "QwenImageEditPipeline"),
    ("qwenimage-edit-plus", "QwenImageEditPlusPipeline"),
    ("qwenimage-layered", "QwenImageLayeredPipeline"),
    ("z-image", "ZImageImg2ImgPipeline"),
    ("kolors", "KolorsImg2ImgPipeline"),
];

/// `AUTO_INPAINT_PIPELINES_MAPPING`.
pub(crate) const AUTO_INPAINT_PIPELINES_MAPPING: Mapping = &[
    ("stable-diffusion", "StableDiffusionInpaintPipeline"),
    ("stable-diffusion-xl", "StableDiffusionXLInpaintPipeline"),
    ("stable-diffusion-3", "StableDiffusion3InpaintPipeline"),
    ("if", "IFInpaintingPipeline"),
    ("kandinsky", "KandinskyInpaintCombinedPipeline"),
    ("kandinsky22", "KandinskyV22InpaintCombinedPipeline"),
    (
        "stable-diffusion-controlnet",
        "StableDiffusionControlNetInpaintPipeline",
    ),
    (
        "stable-diffusion-controlnet-pag",
        "StableDiffusionControlNetPAGInpaintPipeline",
    ),
    (
        "stable-diffusion-xl-controlnet",
        "StableDiffusionXLControlNetInpaintPipeline",
    ),
    (
        "stable-diffusion-xl-controlnet-union",
        "StableDiffusionXLControlNetUnionInpaintPipeline",
    ),
    (
        "stable-diffusion-3-controlnet",
        "StableDiffusion3ControlNetInpaintingPipeline",
    ),
    (
        "stable-diffusion-xl-pag",
        "StableDiffusionXLPAGInpaintPipeline",
    ),
    ("flux", "FluxInpaintPipeline"),
    ("flux-controlnet", "FluxControlNetInpaintPipeline"),
    ("flux-control", "FluxControlInpaintPipeline"),
    ("stable-diffusion-pag", "StableDiffusionPAGInpaintPipeline"),
    ("qwenimage", "QwenImageInpaintPipeline"),
    ("qwenimage-edit", "QwenImageEditInpaintPipeline"),
    ("z-image", "ZImageInpaintPipeline"),
];

/// `AUTO_TEXT2VIDEO_PIPELINES_MAPPING`.
pub(crate) const AUTO_TEXT2VIDEO_PIPELINES_MAPPING: Mapping = &[
    ("anyflow", "AnyFlowPipeline"),
    ("ltx", "LTXPipeline"),
    ("wan", "WanPipeline"),
];

/// `AUTO_CONDITION2VIDEO_PIPELINES_MAPPING`.
pub(crate) const AUTO_CONDITION2VIDEO_PIPELINES_MAPPING: Mapping =
    &[("cosmos3-omni", "Cosmos3OmniPipeline")];

/// `AUTO_IMAGE2VIDEO_PIPELINES_MAPPING`.
pub(crate) const AUTO_IMAGE2VIDEO_PIPELINES_MAPPING: Mapping = &[
    ("anyflow-far", "AnyFlowFARPipeline"),
    ("ltx", "LTXImageToVideoPipeline"),
    ("wan-i2v", "WanImageToVideoPipeline"),
];

/// `AUTO_VIDEO2VIDEO_PIPELINES_MAPPING`.
pub(crate) const AUTO_VIDEO2VIDEO_PIPELINES_MAPPING: Mapping = &[
    ("anyflow-far", "AnyFlowFARPipeline"),
    ("wan", "WanVideoToVideoPipeline"),
];

/// `_AUTO_TEXT2IMAGE_DECODER_PIPELINES_MAPPING`: the decoder classes a Kandinsky (or Würstchen,
/// Stable Cascade) decoder checkpoint's `model_index.json` names.
pub(crate) const AUTO_TEXT2IMAGE_DECODER_PIPELINES_MAPPING: Mapping = &[
    ("kandinsky", "KandinskyPipeline"),
    ("kandinsky22", "KandinskyV22Pipeline"),
    ("wuerstchen", "WuerstchenDecoderPipeline"),
    ("cascade", "StableCascadeDecoderPipeline"),
];

/// `_AUTO_IMAGE2IMAGE_DECODER_PIPELINES_MAPPING`.
pub(crate) const AUTO_IMAGE2IMAGE_DECODER_PIPELINES_MAPPING: Mapping = &[
    ("kandinsky", "KandinskyImg2ImgPipeline"),
    ("kandinsky22", "KandinskyV22Img2ImgPipeline"),
];

/// `_AUTO_INPAINT_DECODER_PIPELINES_MAPPING`.
pub(crate) const AUTO_INPAINT_DECODER_PIPELINES_MAPPING: Mapping = &[
    ("kandinsky", "KandinskyInpaintPipeline"),
    ("kandinsky22", "KandinskyV22InpaintPipeline"),
];

/// `SUPPORTED_TASKS_MAPPINGS`: the order `_get_model` searches in.
pub(crate) const SUPPORTED_TASKS_MAPPINGS: &[Mapping] = &[
    AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
    AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
    AUTO_INPAINT_PIPELINES_MAPPING,
    AUTO_TEXT2VIDEO_PIPELINES_MAPPING,
    AUTO_CONDITION2VIDEO_PIPELINES_MAPPING,
    AUTO_IMAGE2VIDEO_PIPELINES_MAPPING,
    AUTO_VIDEO2VIDEO_PIPELINES_MAPPING,
    AUTO_TEXT2AUDIO_PIPELINES_MAPPING,
    AUTO_TEXT2IMAGE_DECODER_PIPELINES_MAPPING,
    AUTO_IMAGE2IMAGE_DECODER_PIPELINES_MAPPING,
    AUTO_INPAINT_DECODER_PIPELINES_MAPPING,
];

/// diffusers' `_get_model`: the model name of the first table entry whose class is `class_name`.
pub(crate) fn get_model(class_name: &str) -> Option<&'static str> {
    SUPPORTED_TASKS_MAPPINGS
        .iter()
        .flat_map(|mapping| mapping.iter())
        .find(|(_, class)| *class == class_name)
        .map(|(model, _)| *model)
}

/// diffusers' `_get_task_class` (with `throw_error_if_not_exist=True`): `Ok(class)` or
/// `Err(model name)` for the "can't find a pipeline linked to" error.
pub(crate) fn get_task_class(
    mapping: Mapping,
    class_name: &str,
) -> Result<&'static str, Option<&'static str>> {
    let model_name = get_model(class_name);
    model_name
        .and_then(|model| mapping.iter().find(|(m, _)| *m == model))
        .map(|(_, class)| *class)
        .ok_or(model_name)
}

/// Every class name any table holds, each once, in `_get_model`'s search order.
pub(crate) fn all_classes() -> impl Iterator<Item = &'static str> {
    let mut seen: Vec<&'static str> = Vec::new();
    SUPPORTED_TASKS_MAPPINGS
        .iter()
        .flat_map(|mapping| mapping.iter())
        .filter_map(move |(_, class)| {
            if seen.contains(class) {
                None
            } else {
                seen.push(class);
                Some(*class)
            }
        })
}
