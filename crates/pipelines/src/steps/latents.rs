//! The latents a denoising loop starts from, per task (diffusers' `prepare_latents` and
//! `prepare_mask_latents` of the latent-diffusion pipelines), and the decode at the end.

use crate::steps::components::Vae;
use crate::steps::image;
use crate::{GeneratedImage, InitImage, PipelineError, Result};
use autopipe_repo::Checkpoint;
use autopipe_rng::Generator;
use autopipe_schedulers::Scheduler;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// The VAE's latent space, from its `config.json`.
#[derive(Debug, Clone, Copy)]
pub struct LatentSpace {
    /// Pixels per latent (2 ** (len(block_out_channels) - 1)).
    pub scale_factor: u32,
    /// `scaling_factor`: latents are `sample * scaling_factor`.
    pub scaling_factor: f64,
    pub channels: i64,
}

impl LatentSpace {
    /// Reads the VAE folder `vae` of `checkpoint`.
    pub fn read(checkpoint: &Checkpoint, vae: &str) -> Result<Self> {
        let config = checkpoint.read_json(vae, "config.json")?;
        let blocks = config
            .get("block_out_channels")
            .and_then(Value::as_array)
            .map(Vec::len)
            .unwrap_or(4);
        Ok(Self {
            scale_factor: 1 << (blocks.max(1) - 1),
            scaling_factor: config
                .get("scaling_factor")
                .and_then(Value::as_f64)
                .unwrap_or(0.18215),
            channels: config
                .get("latent_channels")
                .and_then(Value::as_i64)
                .unwrap_or(4),
        })
    }

    /// The latent shape of `n` images of `width` × `height` pixels.
    pub fn shape(&self, n: i64, width: u32, height: u32) -> [i64; 4] {
        [
            n,
            self.channels,
            (height / self.scale_factor) as i64,
            (width / self.scale_factor) as i64,
        ]
    }
}

/// What the denoising loop starts from.
pub struct Prepared {
    pub latents: Tensor,
    /// Inpainting without mask input channels: what to blend with after each step.
    pub blend: Option<Blend>,
    /// 9-channel inpainting: mask and masked-image latents concatenated to the UNet input
    /// (CFG-doubled).
    pub unet_extra: Option<Tensor>,
}

/// The inpainting blend after each step; `mask` is 1 where the model repaints.
pub enum Blend {
    /// The latent-diffusion pipelines' (4-channel UNets): `(1 - mask) * noised(image_latents) +
    /// mask * latents`, the image latents noised to the next timestep.
    Renoised {
        image_latents: Tensor,
        noise: Tensor,
        mask: Tensor,
    },
    /// DeepFloyd IF's: `(1 - mask) * previous + mask * latents`, the kept pixels stay at their
    /// value before the step.
    KeepPrevious { mask: Tensor },
}

impl Prepared {
    /// Latents with nothing else to add or blend.
    pub fn plain(latents: Tensor) -> Self {
        Self {
            latents,
            blend: None,
            unet_extra: None,
        }
    }
}

/// `retrieve_latents(vae.encode(image), generator)` (a posterior sample), times `scaling_factor`.
pub fn encode(
    vae: &Vae,
    space: &LatentSpace,
    image: &Tensor,
    generator: &mut Generator,
) -> Result<Tensor> {
    let posterior = vae.encode(image.shallow_clone())?;
    let noise = generator.randn(
        &posterior.mean.size(),
        posterior.mean.kind(),
        posterior.mean.device(),
    );
    let sample = &posterior.mean + (&posterior.logvar * 0.5).exp() * noise;
    Ok(sample * space.scaling_factor)
}

/// Text-to-image: `randn * init_noise_sigma`.
pub fn text2img(
    space: &LatentSpace,
    num_images: i64,
    (width, height): (u32, u32),
    scheduler: &dyn Scheduler,
    generator: &mut Generator,
    (kind, device): (Kind, Device),
) -> Prepared {
    let shape = space.shape(num_images, width, height);
    Prepared::plain(generator.randn(&shape, kind, device) * scheduler.init_noise_sigma())
}

/// Image-to-image: the encoded image (or latents given as the image), repeated per image, noised
/// to the first timestep unless `add_noise` is off (`denoising_start`).
#[allow(clippy::too_many_arguments)]
pub fn img2img(
    vae: &Vae,
    space: &LatentSpace,
    image: &InitImage,
    (width, height): (u32, u32),
    num_images: i64,
    first_timestep: f64,
    add_noise: bool,
    scheduler: &dyn Scheduler,
    generator: &mut Generator,
    (kind, device): (Kind, Device),
) -> Result<Prepared> {
    let init = match image {
        InitImage::Latents(latents) => latents.to_device(device).to_kind(kind),
        InitImage::Pixels(img) => {
            let pixels = image::preprocess(img, width, height)
                .to_device(device)
                .to_kind(kind);
            encode(vae, space, &pixels, generator)?.to_kind(kind)
        }
    };
    let init = repeat_to(&init, num_images, "image")?;
    if !add_noise {
        return Ok(Prepared::plain(init));
    }
    let noise = generator.randn(&init.size(), kind, device);
    Ok(Prepared::plain(scheduler.add_noise(
        &init,
        &noise,
        first_timestep,
    )))
}

/// Repeats a batch of one (or of a divisor of `n`) up to `n`, as diffusers does per image.
fn repeat_to(t: &Tensor, n: i64, field: &'static str) -> Result<Tensor> {
    let b = t.size()[0];
    if b == n {
        return Ok(t.shallow_clone());
    }
    if b == 0 || n % b != 0 {
        return Err(PipelineError::invalid(
            field,
            format!("a batch of {b} cannot be repeated to {n} images"),
        ));
    }
    Ok(t.repeat([n / b, 1, 1, 1]))
}

/// The inputs of an inpainting run.
pub struct InpaintInputs<'a> {
    pub image: &'a InitImage,
    pub mask: &'a ::image::DynamicImage,
    pub size: (u32, u32),
    pub num_images: i64,
    pub strength: f64,
    /// `denoising_start` given: the latents start from the image latents, un-noised.
    pub add_noise: bool,
    /// The UNet's input channels: 4 (blend after each step) or 9 (mask and masked image as input).
    pub unet_in_channels: i64,
    pub guide: bool,
}

/// Inpainting: `prepare_latents(return_noise=True, return_image_latents=4-channel)` then
/// `prepare_mask_latents`, with diffusers' order of random draws.
pub fn inpaint(
    vae: &Vae,
    space: &LatentSpace,
    inputs: &InpaintInputs,
    first_timestep: f64,
    scheduler: &dyn Scheduler,
    generator: &mut Generator,
    (kind, device): (Kind, Device),
) -> Result<Prepared> {
    let (width, height) = inputs.size;
    let num_images = inputs.num_images;
    let is_strength_max = inputs.strength == 1.0;
    let four_channel = inputs.unet_in_channels == 4;
    let shape = space.shape(num_images, width, height);
    let InitImage::Pixels(img) = inputs.image else {
        return Err(PipelineError::invalid(
            "image_latents",
            "inpainting takes an image, not latents",
        ));
    };
    let init_image = image::preprocess(img, width, height);

    let image_latents = if four_channel || !is_strength_max || !inputs.add_noise {
        let l = encode(
            vae,
            space,
            &init_image.to_device(device).to_kind(kind),
            generator,
        )?
        .to_kind(kind);
        Some(repeat_to(&l, num_images, "image")?)
    } else {
        None
    };
    let noise = generator.randn(&shape, kind, device);
    let latents = if !inputs.add_noise {
        image_latents
            .as_ref()
            .expect("encoded without add_noise")
            .shallow_clone()
    } else if is_strength_max {
        &noise * scheduler.init_noise_sigma()
    } else {
        scheduler.add_noise(
            image_latents.as_ref().expect("encoded when strength < 1"),
            &noise,
            first_timestep,
        )
    };

    let mask_condition = image::preprocess_mask(inputs.mask, width, height);
    let masked_image = &init_image * mask_condition.lt(0.5).to_kind(Kind::Float);
    let mask = mask_condition
        .upsample_nearest2d([shape[2], shape[3]], None, None)
        .to_device(device)
        .to_kind(kind);
    let masked_latents = encode(
        vae,
        space,
        &masked_image.to_device(device).to_kind(kind),
        generator,
    )?
    .to_kind(kind);
    let mask = repeat_to(&mask, num_images, "mask_image")?;
    let masked_latents = repeat_to(&masked_latents, num_images, "image")?;

    if four_channel {
        Ok(Prepared {
            latents,
            blend: Some(Blend::Renoised {
                image_latents: image_latents.expect("encoded for 4-channel unets"),
                noise,
                mask,
            }),
            unet_extra: None,
        })
    } else {
        let extra = Tensor::cat(&[mask, masked_latents], 1);
        let extra = if inputs.guide {
            Tensor::cat(&[&extra, &extra], 0)
        } else {
            extra
        };
        Ok(Prepared {
            latents,
            blend: None,
            unet_extra: Some(extra),
        })
    }
}

/// Decoded images: float NHWC in [0, 1] and PNGs.
pub struct Decoded {
    pub images_f32: Tensor,
    pub images: Vec<GeneratedImage>,
}

/// `vae.decode(latents / scaling_factor)` and the image processor's `postprocess`.
pub fn decode(vae: &Vae, space: &LatentSpace, latents: &Tensor) -> Result<Decoded> {
    let decoded = vae.decode(latents / space.scaling_factor)?;
    let (images_f32, images) = image::postprocess(&decoded)?;
    Ok(Decoded { images_f32, images })
}
