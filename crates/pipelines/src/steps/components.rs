//! Typed clients for leased components: what a pipeline calls instead of raw `Invoke`s. Each client
//! names the store method and its inputs and outputs once (the store's component registry is the
//! other side of the same contract).

use crate::{GenerateParams, Pipeline, PipelineError, Plan, Result};
use autopipe_auto::ComponentSlot;
use autopipe_repo::Checkpoint;
use autopipe_store_api::{ComponentSpec, ComponentStore, Lease, Tensors};
use tch::Tensor;

/// Whether a component slot holds weights the store loads (as opposed to a tokenizer, a scheduler
/// or an image processor, which the pipeline reads from disk itself).
pub fn holds_weights(slot: &ComponentSlot) -> bool {
    !(slot.name == "scheduler"
        || slot.class.ends_with("Scheduler")
        || slot.class.ends_with("Tokenizer")
        || slot.class.ends_with("TokenizerFast")
        || slot.class.ends_with("Processor")
        || slot.class.ends_with("FeatureExtractor"))
}

/// The store's view of `plan.leased` (each component's class, folder, weight variant, and whether
/// `pipeline` runs it upcast from float16), then the request's ControlNets (from their own folders,
/// each leased once as [`GenerateParams::controlnet_components`] names it).
pub fn specs(
    pipeline: &dyn Pipeline,
    checkpoint: &Checkpoint,
    plan: &Plan,
    variant: Option<&str>,
    params: &GenerateParams,
) -> Result<Vec<ComponentSpec>> {
    let controlnets = params
        .controlnet_components()
        .into_iter()
        .map(|(name, path)| ComponentSpec {
            name,
            class_name: CONTROLNET_CLASS.to_string(),
            path: path.to_path_buf(),
            variant: None,
            upcast_half: false,
        });
    let mut specs = plan
        .leased
        .iter()
        .map(|name| {
            let class_name = checkpoint.index().component_class(name).ok_or_else(|| {
                PipelineError::invalid("model", format!("model_index.json has no {name}"))
            })?;
            Ok(ComponentSpec {
                name: name.to_string(),
                class_name: class_name.to_string(),
                path: checkpoint.component_dir(name)?,
                variant: variant.map(str::to_string),
                upcast_half: pipeline.upcast_half(checkpoint, name)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    specs.extend(controlnets);
    Ok(specs)
}

/// The store class of a ControlNet.
pub const CONTROLNET_CLASS: &str = "ControlNetModel";

/// The leased components of one request.
pub struct Components<'a> {
    store: &'a dyn ComponentStore,
    lease: &'a Lease,
    request_id: &'a str,
}

impl<'a> Components<'a> {
    pub fn new(store: &'a dyn ComponentStore, lease: &'a Lease, request_id: &'a str) -> Self {
        Self {
            store,
            lease,
            request_id,
        }
    }

    /// Whether the lease holds `name`.
    pub fn has(&self, name: &str) -> bool {
        self.lease.handles.iter().any(|h| h.name == name)
    }

    fn invoke(&self, component: &str, method: &str, inputs: Tensors) -> Result<Outputs> {
        let handle = self.lease.handle(component)?;
        let tensors =
            self.store
                .invoke(&self.lease.id, &handle.id, method, inputs, self.request_id)?;
        Ok(Outputs {
            component: handle.class_name.clone(),
            tensors,
        })
    }

    /// The CLIP text encoder leased as `name`.
    pub fn text_encoder(&'a self, name: &'a str) -> TextEncoder<'a> {
        TextEncoder {
            components: self,
            name,
        }
    }

    /// The `MultilingualCLIP` text encoder (Kandinsky 2.1) leased as `name`.
    pub fn multilingual_text_encoder(&'a self, name: &'a str) -> MultilingualTextEncoder<'a> {
        MultilingualTextEncoder {
            components: self,
            name,
        }
    }

    /// The `T5EncoderModel` (DeepFloyd IF) leased as `name`.
    pub fn t5_encoder(&'a self, name: &'a str) -> T5Encoder<'a> {
        T5Encoder {
            components: self,
            name,
        }
    }

    /// The UNet leased as `name`.
    pub fn unet(&'a self, name: &'a str) -> Unet<'a> {
        Unet {
            components: self,
            name,
        }
    }

    /// The ControlNet leased as `name`.
    pub fn controlnet(&'a self, name: &'a str) -> ControlNet<'a> {
        ControlNet {
            components: self,
            name,
        }
    }

    /// The VAE leased as `name`.
    pub fn vae(&'a self, name: &'a str) -> Vae<'a> {
        Vae {
            components: self,
            name,
        }
    }

    /// The `VQModel` (MoVQ) leased as `name`.
    pub fn movq(&'a self, name: &'a str) -> Movq<'a> {
        Movq {
            components: self,
            name,
        }
    }

    /// The `PriorTransformer` leased as `name`.
    pub fn prior(&'a self, name: &'a str) -> Prior<'a> {
        Prior {
            components: self,
            name,
        }
    }

    /// The safety checker (`StableDiffusionSafetyChecker` or `IFSafetyChecker`) leased as `name`.
    pub fn safety_checker(&'a self, name: &'a str) -> SafetyChecker<'a> {
        SafetyChecker {
            components: self,
            name,
        }
    }

    /// The `IFWatermarker` leased as `name`.
    pub fn watermarker(&'a self, name: &'a str) -> Watermarker<'a> {
        Watermarker {
            components: self,
            name,
        }
    }

    /// The `CLIPVisionModelWithProjection` leased as `name`.
    pub fn image_encoder(&'a self, name: &'a str) -> ImageEncoder<'a> {
        ImageEncoder {
            components: self,
            name,
        }
    }
}

/// A method's named outputs.
struct Outputs {
    component: String,
    tensors: Tensors,
}

impl Outputs {
    fn take(&mut self, name: &str) -> Result<Tensor> {
        let i = self
            .tensors
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| {
                PipelineError::Internal(format!("{} returned no {name:?}", self.component))
            })?;
        Ok(self.tensors.swap_remove(i).1)
    }
}

/// What a CLIP text encoder returns.
pub struct TextEncoding {
    pub last_hidden_state: Tensor,
    /// `hidden_states[-2]`.
    pub penultimate_hidden_state: Tensor,
    /// `text_embeds` of a CLIPTextModelWithProjection (2-D: what SDXL pools); `None` for a plain
    /// CLIPTextModel.
    pub text_embeds: Option<Tensor>,
}

/// `CLIPTextModel` / `CLIPTextModelWithProjection`.
pub struct TextEncoder<'a> {
    components: &'a Components<'a>,
    name: &'a str,
}

impl TextEncoder<'_> {
    /// Encodes `input_ids` ([B, T] int64).
    pub fn encode(&self, input_ids: Tensor) -> Result<TextEncoding> {
        let mut out =
            self.components
                .invoke(self.name, "encode", vec![("input_ids".into(), input_ids)])?;
        let text_embeds = out.take("text_embeds").ok();
        Ok(TextEncoding {
            last_hidden_state: out.take("last_hidden_state")?,
            penultimate_hidden_state: out.take("penultimate_hidden_state")?,
            text_embeds,
        })
    }
}

/// What `MultilingualCLIP` returns.
pub struct MultilingualTextEncoding {
    /// The projected masked mean of the hidden states, `[B, numDims]`.
    pub text_embeds: Tensor,
    pub last_hidden_state: Tensor,
}

/// `MultilingualCLIP` (Kandinsky 2.1's text encoder).
pub struct MultilingualTextEncoder<'a> {
    components: &'a Components<'a>,
    name: &'a str,
}

impl MultilingualTextEncoder<'_> {
    /// Encodes `input_ids` with its `attention_mask` (both [B, T] int64).
    pub fn encode(
        &self,
        input_ids: Tensor,
        attention_mask: Tensor,
    ) -> Result<MultilingualTextEncoding> {
        let mut out = self.components.invoke(
            self.name,
            "encode",
            vec![
                ("input_ids".into(), input_ids),
                ("attention_mask".into(), attention_mask),
            ],
        )?;
        Ok(MultilingualTextEncoding {
            text_embeds: out.take("text_embeds")?,
            last_hidden_state: out.take("last_hidden_state")?,
        })
    }
}

/// transformers' `T5EncoderModel` (DeepFloyd IF's text encoder).
pub struct T5Encoder<'a> {
    components: &'a Components<'a>,
    name: &'a str,
}

impl T5Encoder<'_> {
    /// `text_encoder(input_ids, attention_mask=attention_mask)[0]` (both [B, T] int64).
    pub fn encode(&self, input_ids: Tensor, attention_mask: Tensor) -> Result<Tensor> {
        self.components
            .invoke(
                self.name,
                "encode",
                vec![
                    ("input_ids".into(), input_ids),
                    ("attention_mask".into(), attention_mask),
                ],
            )?
            .take("last_hidden_state")
    }
}

/// SDXL's added conditioning (`added_cond_kwargs`): pooled text embeddings and time ids.
pub struct AddedConditioning {
    pub text_embeds: Tensor,
    pub time_ids: Tensor,
}

/// `UNet2DConditionModel`.
pub struct Unet<'a> {
    components: &'a Components<'a>,
    name: &'a str,
}

/// ControlNet residuals for the UNet's skip connections and mid block.
pub struct Residuals {
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

impl Residuals {
    /// Named inputs (`down_block_additional_residuals.{i}`, `mid_block_additional_residual`).
    fn inputs(&self) -> Tensors {
        let mut inputs: Tensors = self
            .down
            .iter()
            .enumerate()
            .map(|(i, t)| {
                (
                    format!("down_block_additional_residuals.{i}"),
                    t.shallow_clone(),
                )
            })
            .collect();
        inputs.push((
            "mid_block_additional_residual".into(),
            self.mid.shallow_clone(),
        ));
        inputs
    }
}

/// Element-wise sum (MultiControlNet adds its nets' residuals).
impl std::ops::Add for Residuals {
    type Output = Residuals;

    fn add(self, other: Residuals) -> Residuals {
        Residuals {
            down: self
                .down
                .iter()
                .zip(&other.down)
                .map(|(a, b)| a + b)
                .collect(),
            mid: self.mid + other.mid,
        }
    }
}

impl Unet<'_> {
    /// One forward pass: the noise (or v) prediction, with ControlNet `residuals` when given.
    /// `encoder_hidden_states` is `None` for an `image_proj` UNet (Kandinsky 2.2), which makes its
    /// own from `image_embeds`; `text_embeds` is Kandinsky 2.1's pooled text embedding;
    /// `class_labels` IF stage II's noise level (int64, one per sample).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        sample: Tensor,
        timestep: f64,
        encoder_hidden_states: Option<&Tensor>,
        added: Option<&AddedConditioning>,
        image_embeds: Option<&Tensor>,
        text_embeds: Option<&Tensor>,
        class_labels: Option<&Tensor>,
        residuals: Option<&Residuals>,
    ) -> Result<Tensor> {
        let mut inputs = vec![
            ("sample".into(), sample),
            ("timestep".into(), Tensor::from(timestep as f32)),
        ];
        if let Some(e) = encoder_hidden_states {
            inputs.push(("encoder_hidden_states".into(), e.shallow_clone()));
        }
        if let Some(e) = image_embeds {
            inputs.push(("image_embeds".into(), e.shallow_clone()));
        }
        if let Some(e) = text_embeds {
            inputs.push(("text_embeds".into(), e.shallow_clone()));
        }
        if let Some(c) = class_labels {
            inputs.push(("class_labels".into(), c.shallow_clone()));
        }
        if let Some(added) = added {
            inputs.push(("text_embeds".into(), added.text_embeds.shallow_clone()));
            inputs.push(("time_ids".into(), added.time_ids.shallow_clone()));
        }
        if let Some(residuals) = residuals {
            inputs.extend(residuals.inputs());
        }
        self.components
            .invoke(self.name, "forward", inputs)?
            .take("sample")
    }
}

/// `ControlNetModel`.
pub struct ControlNet<'a> {
    components: &'a Components<'a>,
    name: &'a str,
}

/// The inputs of one ControlNet call besides the control image.
pub struct ControlNetCall<'a> {
    pub sample: Tensor,
    pub timestep: f64,
    pub encoder_hidden_states: &'a Tensor,
    pub added: Option<&'a AddedConditioning>,
    pub conditioning_scale: f64,
    pub guess_mode: bool,
}

impl ControlNet<'_> {
    /// The residuals for `controlnet_cond` (the preprocessed control image, in [0, 1]).
    pub fn forward(&self, call: &ControlNetCall, controlnet_cond: &Tensor) -> Result<Residuals> {
        let mut inputs = vec![
            ("sample".into(), call.sample.shallow_clone()),
            ("timestep".into(), Tensor::from(call.timestep as f32)),
            (
                "encoder_hidden_states".into(),
                call.encoder_hidden_states.shallow_clone(),
            ),
            ("controlnet_cond".into(), controlnet_cond.shallow_clone()),
            (
                "conditioning_scale".into(),
                Tensor::from(call.conditioning_scale),
            ),
            (
                "guess_mode".into(),
                Tensor::from(i64::from(call.guess_mode)),
            ),
        ];
        if let Some(added) = call.added {
            inputs.push(("text_embeds".into(), added.text_embeds.shallow_clone()));
            inputs.push(("time_ids".into(), added.time_ids.shallow_clone()));
        }
        let mut out = self.components.invoke(self.name, "forward", inputs)?;
        let mut down = Vec::new();
        while let Ok(t) = out.take(&format!("down_block_res_samples.{}", down.len())) {
            down.push(t);
        }
        Ok(Residuals {
            down,
            mid: out.take("mid_block_res_sample")?,
        })
    }
}

/// The VAE's posterior `DiagonalGaussianDistribution`.
pub struct Posterior {
    pub mean: Tensor,
    pub logvar: Tensor,
}

/// `AutoencoderKL`.
pub struct Vae<'a> {
    components: &'a Components<'a>,
    name: &'a str,
}

impl Vae<'_> {
    /// Encodes images in [-1, 1] to the latent posterior.
    pub fn encode(&self, images: Tensor) -> Result<Posterior> {
        let mut out =
            self.components
                .invoke(self.name, "encode", vec![("sample".into(), images)])?;
        Ok(Posterior {
            mean: out.take("mean")?,
            logvar: out.take("logvar")?,
        })
    }

    /// Decodes latents (already unscaled) to images in about [-1, 1].
    pub fn decode(&self, latents: Tensor) -> Result<Tensor> {
        self.components
            .invoke(self.name, "decode", vec![("latents".into(), latents)])?
            .take("sample")
    }
}

/// `VQModel` (Kandinsky's MoVQ).
pub struct Movq<'a> {
    components: &'a Components<'a>,
    name: &'a str,
}

impl Movq<'_> {
    /// `encode(images)["latents"]`: images in [-1, 1] to latents (not quantized, not scaled).
    pub fn encode(&self, images: Tensor) -> Result<Tensor> {
        self.components
            .invoke(self.name, "encode", vec![("sample".into(), images)])?
            .take("latents")
    }

    /// `decode(latents, force_not_quantize=True)["sample"]`: images in about [-1, 1].
    pub fn decode(&self, latents: Tensor) -> Result<Tensor> {
        self.components
            .invoke(self.name, "decode", vec![("latents".into(), latents)])?
            .take("sample")
    }
}

/// What conditions each `PriorTransformer` call, CFG-batched (`[negative; positive]`) when guiding.
pub struct PriorConditioning {
    /// The CLIP text encoder's `text_embeds` (`proj_embedding`).
    pub proj_embedding: Tensor,
    /// Its `last_hidden_state`.
    pub encoder_hidden_states: Tensor,
    /// The tokenizer's attention mask (uint8, 1 = token).
    pub attention_mask: Tensor,
}

/// `PriorTransformer`.
pub struct Prior<'a> {
    components: &'a Components<'a>,
    name: &'a str,
}

impl Prior<'_> {
    /// `prior(latents, timestep, ...).predicted_image_embedding`.
    pub fn forward(
        &self,
        hidden_states: Tensor,
        timestep: f64,
        cond: &PriorConditioning,
    ) -> Result<Tensor> {
        self.components
            .invoke(
                self.name,
                "forward",
                vec![
                    ("hidden_states".into(), hidden_states),
                    ("timestep".into(), Tensor::from(timestep as i64)),
                    ("proj_embedding".into(), cond.proj_embedding.shallow_clone()),
                    (
                        "encoder_hidden_states".into(),
                        cond.encoder_hidden_states.shallow_clone(),
                    ),
                    ("attention_mask".into(), cond.attention_mask.shallow_clone()),
                ],
            )?
            .take("predicted_image_embedding")
    }

    /// `post_process_latents`: un-normalises with `clip_std` / `clip_mean`.
    pub fn post_process_latents(&self, latents: Tensor) -> Result<Tensor> {
        self.components
            .invoke(
                self.name,
                "post_process_latents",
                vec![("latents".into(), latents)],
            )?
            .take("latents")
    }
}

/// `CLIPVisionModelWithProjection`.
pub struct ImageEncoder<'a> {
    components: &'a Components<'a>,
    name: &'a str,
}

impl ImageEncoder<'_> {
    /// `image_encoder(pixel_values)["image_embeds"]`.
    pub fn image_embeds(&self, pixel_values: Tensor) -> Result<Tensor> {
        self.components
            .invoke(
                self.name,
                "encode",
                vec![("pixel_values".into(), pixel_values)],
            )?
            .take("image_embeds")
    }
}

/// What a safety checker says about each image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetyFlags {
    /// `has_nsfw_concepts` (Stable Diffusion) or `nsfw_detected` (DeepFloyd IF).
    pub nsfw: Vec<bool>,
    /// `watermark_detected`: DeepFloyd IF's checker only.
    pub watermark: Option<Vec<bool>>,
}

/// A uint8 flag tensor as booleans.
fn bools(flags: &Tensor) -> Result<Vec<bool>> {
    let flags = Vec::<u8>::try_from(flags.to_kind(tch::Kind::Uint8).flatten(0, -1))?;
    Ok(flags.into_iter().map(|f| f != 0).collect())
}

/// `StableDiffusionSafetyChecker` or `IFSafetyChecker`.
pub struct SafetyChecker<'a> {
    components: &'a Components<'a>,
    name: &'a str,
}

impl SafetyChecker<'_> {
    /// The flags for each image of `clip_input` (the feature extractor's pixel values).
    pub fn check(&self, clip_input: Tensor) -> Result<SafetyFlags> {
        let mut out =
            self.components
                .invoke(self.name, "check", vec![("clip_input".into(), clip_input)])?;
        if let Ok(flags) = out.take("has_nsfw_concepts") {
            return Ok(SafetyFlags {
                nsfw: bools(&flags)?,
                watermark: None,
            });
        }
        Ok(SafetyFlags {
            nsfw: bools(&out.take("nsfw_detected")?)?,
            watermark: Some(bools(&out.take("watermark_detected")?)?),
        })
    }
}

/// `IFWatermarker`.
pub struct Watermarker<'a> {
    components: &'a Components<'a>,
    name: &'a str,
}

impl Watermarker<'_> {
    /// `watermark_image` as the RGBA image diffusers pastes (`Image.fromarray(…, mode="RGBA")`).
    pub fn watermark_image(&self) -> Result<image::RgbaImage> {
        let t = self
            .components
            .invoke(self.name, "watermark_image", Vec::new())?
            .take("watermark_image")?;
        let size = t.size();
        let [h, w, 4] = size[..] else {
            return Err(PipelineError::Internal(format!(
                "{}: watermark_image has shape {size:?}, not [H, W, 4]",
                self.name
            )));
        };
        let raw = Vec::<u8>::try_from(t.to_kind(tch::Kind::Uint8).flatten(0, -1))?;
        image::RgbaImage::from_raw(w as u32, h as u32, raw)
            .ok_or_else(|| PipelineError::Internal("watermark_image buffer size".into()))
    }
}
