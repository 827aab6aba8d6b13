//! diffusers' `IFWatermarker.apply_watermark` (diffusers 0.42.1 `pipelines/deepfloyd_if/
//! watermark.py`, itself DeepFloyd's `deepfloyd_if/modules/base.py`), pixel for pixel: the
//! checkpoint's 62x62 RGBA mark resized with Pillow's bicubic filter to a side that grows with the
//! image area, then pasted through its own alpha at the bottom right of every PIL image. DeepFloyd IF
//! pipelines run it after the safety check, on every image, black ones included.

use ::image::{RgbImage, RgbaImage};
use tch::Tensor;

use crate::steps::components::Components;
use crate::steps::image;
use crate::steps::pil::{self, Filter};
use crate::{Context, GeneratedImage, PipelineError, Result};

/// The `model_index.json` slot of the watermarker.
pub const WATERMARKER: &str = "watermarker";

/// Where `apply_watermark` puts the mark on an image: its side and its bottom-right corner, in
/// image pixels (the corner may lie outside a small image, which then receives part of the mark or
/// none of it, as Pillow clips the paste).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// `wm_size`: the resized mark's side.
    pub size: i64,
    /// `wm_x`: the paste box's right edge.
    pub right: i64,
    /// `wm_y`: the paste box's bottom edge.
    pub bottom: i64,
}

impl Placement {
    /// The placement diffusers computes for a `width` x `height` image and the UNet's
    /// `sample_size`: an image smaller than `sample_size` is measured as if scaled up to it, and the
    /// mark's side is `int(62 * sqrt(area / 1024²))`, 14 of those units from the corner.
    pub fn new(width: u32, height: u32, sample_size: u32) -> Self {
        let (h, w, s) = (height as f64, width as f64, sample_size as f64);
        let coef = (h / s).min(w / s);
        let (img_h, img_w) = if coef < 1.0 {
            ((h / coef) as i64, (w / coef) as i64)
        } else {
            (height as i64, width as i64)
        };
        // Python's `(S2 / S1) ** 0.5` is `pow`, and `int()` truncates.
        let k = ((img_w * img_h) as f64 / (1024 * 1024) as f64).powf(0.5);
        Self {
            size: (k * 62.0) as i64,
            right: img_w - (14.0 * k) as i64,
            bottom: img_h - (14.0 * k) as i64,
        }
    }
}

/// `apply_watermark(images, sample_size)`: pastes `mark` (RGBA) into every image in place, placed
/// by the first image's size.
pub fn apply_watermark(images: &mut [RgbImage], mark: &RgbaImage, sample_size: u32) -> Result<()> {
    let Some(first) = images.first() else {
        return Ok(());
    };
    let (width, height) = first.dimensions();
    let at = Placement::new(width, height, sample_size);
    if at.size <= 0 {
        // Pillow refuses to resize to an empty image, so diffusers fails here too.
        return Err(PipelineError::invalid(
            "width",
            format!(
                "a {width}x{height} image leaves no room for DeepFloyd IF's watermark (UNet sample_size {sample_size}: a 0-pixel mark, which diffusers' IFWatermarker cannot resize to)"
            ),
        ));
    }
    let side = at.size as u32;
    let resized = pil::resize_rgba(mark, side, side, Filter::Bicubic);
    for img in images {
        pil::paste_with_alpha(img, &resized, at.right - at.size, at.bottom - at.size);
    }
    Ok(())
}

/// The watermark step of one request.
#[derive(Debug)]
pub struct Watermark {
    sample_size: u32,
}

impl Watermark {
    /// The watermark a request applies: `None` when the checkpoint names no `watermarker` (diffusers
    /// then skips it). `sample_size` is the pipeline UNet's (`unet.config.sample_size`).
    pub fn configure(ctx: &Context, sample_size: u32) -> Option<Self> {
        ctx.checkpoint
            .index()
            .component_class(WATERMARKER)
            .map(|_| Self { sample_size })
    }

    /// `numpy_to_pil` of `images_f32` (NHWC in [0, 1], after the safety check), watermarked, as PNGs.
    pub fn run(&self, components: &Components, images_f32: &Tensor) -> Result<Vec<GeneratedImage>> {
        let mark = components.watermarker(WATERMARKER).watermark_image()?;
        let mut images = image::to_pil(images_f32)?;
        apply_watermark(&mut images, &mark, self.sample_size)?;
        images.iter().map(image::png).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_follows_diffusers_arithmetic() {
        // 1024x1024: the mark keeps its 62 px, 14 px from the corner.
        assert_eq!(
            Placement::new(1024, 1024, 64),
            Placement {
                size: 62,
                right: 1010,
                bottom: 1010
            }
        );
        // Smaller than sample_size: measured as 64x128, the box lands outside the 32x64 image.
        assert_eq!(
            Placement::new(64, 32, 64),
            Placement {
                size: 5,
                right: 127,
                bottom: 63
            }
        );
    }

    /// One `apply_watermark` call of `scripts/fixtures/if_safety.py`.
    #[derive(serde::Deserialize)]
    struct Golden {
        name: String,
        width: u32,
        height: u32,
        sample_size: u32,
        black: bool,
        /// The paste box clipped to the image: left, top, right, bottom.
        #[serde(rename = "box")]
        region: [u32; 4],
        changed_pixels: usize,
    }

    /// The input both sides draw: `(7x + 13y + 50c) % 256`, or black.
    fn pattern(width: u32, height: u32, black: bool) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| {
            ::image::Rgb(std::array::from_fn(|c| {
                if black {
                    0
                } else {
                    ((7 * x + 13 * y + 50 * c as u32) % 256) as u8
                }
            }))
        })
    }

    /// Pillow's output for every golden size: the pasted region equals Pillow's byte for byte and
    /// nothing outside it changes.
    #[test]
    fn matches_pillow_for_many_image_sizes() {
        let fixtures =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        let weights = fixtures
            .join("checkpoints/if-safety-tiny/watermarker/diffusion_pytorch_model.safetensors");
        let named = |file: &std::path::Path| -> std::collections::HashMap<String, Tensor> {
            Tensor::read_safetensors(file)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
                .into_iter()
                .collect()
        };
        let buffer = named(&weights)
            .remove("watermark_image")
            .expect("watermark_image");
        let raw = Vec::<u8>::try_from(buffer.to_kind(tch::Kind::Uint8).flatten(0, -1)).unwrap();
        let mark = RgbaImage::from_raw(62, 62, raw).expect("62x62 RGBA");
        let reference = fixtures.join("reference");
        let crops = named(&reference.join("if_watermark.safetensors"));
        let goldens: Vec<Golden> = serde_json::from_str(
            &std::fs::read_to_string(reference.join("if_watermark.json")).unwrap(),
        )
        .unwrap();
        assert!(goldens.len() >= 10);
        for g in &goldens {
            let input = pattern(g.width, g.height, g.black);
            let mut images = vec![input.clone(), input.clone()];
            apply_watermark(&mut images, &mark, g.sample_size).unwrap();
            assert_eq!(
                images[0], images[1],
                "{}: every image gets the same mark",
                g.name
            );
            let [x0, y0, x1, y1] = g.region;
            let crop = &crops[&g.name];
            let want = Vec::<u8>::try_from(crop.flatten(0, -1)).unwrap();
            let mut got = Vec::new();
            let mut changed = 0;
            for (x, y, p) in images[0].enumerate_pixels() {
                if (x0..x1).contains(&x) && (y0..y1).contains(&y) {
                    got.extend_from_slice(&p.0);
                } else {
                    assert_eq!(
                        p,
                        input.get_pixel(x, y),
                        "{}: ({x}, {y}) is outside the box",
                        g.name
                    );
                }
                changed += usize::from(p != input.get_pixel(x, y));
            }
            assert_eq!(
                got, want,
                "{}: the pasted region differs from Pillow's",
                g.name
            );
            assert_eq!(changed, g.changed_pixels, "{}", g.name);
        }
    }

    #[test]
    fn an_empty_mark_fails_as_in_diffusers() {
        let mut images = vec![RgbImage::new(8, 8)];
        let mark = RgbaImage::new(62, 62);
        let err = apply_watermark(&mut images, &mark, 8).unwrap_err();
        assert!(err.to_string().starts_with("width: a 8x8 image"), "{err}");
        assert!(apply_watermark(&mut [], &mark, 8).is_ok());
    }
}
