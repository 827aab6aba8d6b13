//! diffusers' `VaeImageProcessor` (diffusers/image_processor.py) for PIL-style inputs: decode,
//! resize to multiples of the VAE scale factor, normalize to [-1, 1]; masks converted to grayscale
//! with PIL's `convert("L")` weights and binarized at 0.5; outputs denormalized and quantized as
//! `numpy_to_pil` does.

use crate::{PipelineError, Result};
use image::{imageops::FilterType, DynamicImage, GrayImage, RgbImage};
use tch::{Device, Kind, Tensor};

/// Decodes PNG/JPEG bytes; `field` names the request field in errors.
pub fn decode(bytes: &[u8], field: &'static str) -> Result<DynamicImage> {
    if bytes.is_empty() {
        return Err(PipelineError::invalid(field, "is required for this task"));
    }
    image::load_from_memory(bytes)
        .map_err(|e| PipelineError::invalid(field, format!("cannot decode image: {e}")))
}

/// `get_default_height_width`: the image's size rounded down to a multiple of `vae_scale_factor`.
pub fn default_size(img: &DynamicImage, vae_scale_factor: u32) -> (u32, u32) {
    let (w, h) = (img.width(), img.height());
    (w - w % vae_scale_factor, h - h % vae_scale_factor)
}

fn resize_rgb(img: &DynamicImage, width: u32, height: u32, filter: FilterType) -> RgbImage {
    let rgb = img.to_rgb8();
    if rgb.width() == width && rgb.height() == height {
        rgb
    } else {
        // PIL's LANCZOS / BICUBIC and image's Lanczos3 / CatmullRom agree closely but not bit
        // for bit.
        image::imageops::resize(&rgb, width, height, filter)
    }
}

/// `VaeImageProcessor.preprocess` for one image: [1, 3, H, W] float32 in [-1, 1].
///
/// Pre- and post-processing run in plain Rust (the same float32 operations in the same order as
/// diffusers' torch/numpy code, so the same values): libtorch would run them as OpenMP parallel
/// regions on the request's thread, leaving a worker team there that slows the store's compute
/// thread (see `autopipe_store`'s executor).
pub fn preprocess(img: &DynamicImage, width: u32, height: u32) -> Tensor {
    preprocess_resampled(img, width, height, FilterType::Lanczos3)
}

/// [`preprocess`] resizing with `filter` (Kandinsky's processors resample bicubic:
/// [`FilterType::CatmullRom`]).
pub fn preprocess_resampled(
    img: &DynamicImage,
    width: u32,
    height: u32,
    filter: FilterType,
) -> Tensor {
    to_tensor(img, width, height, filter, |v| v * 2.0 - 1.0)
}

/// The ControlNet pipelines' `control_image_processor.preprocess` (`do_normalize=False`) for one
/// image: [1, 3, H, W] float32 in [0, 1].
pub fn preprocess_control(img: &DynamicImage, width: u32, height: u32) -> Tensor {
    to_tensor(img, width, height, FilterType::Lanczos3, |v| v)
}

/// Resized (with `filter`) RGB as [1, 3, H, W] float32: `v / 255`, then `normalize`.
fn to_tensor(
    img: &DynamicImage,
    width: u32,
    height: u32,
    filter: FilterType,
    normalize: fn(f32) -> f32,
) -> Tensor {
    let rgb = resize_rgb(img, width, height, filter);
    let (w, h) = (width as usize, height as usize);
    let mut chw = vec![0f32; 3 * h * w];
    for (i, px) in rgb.as_raw().chunks_exact(3).enumerate() {
        for (c, &v) in px.iter().enumerate() {
            chw[c * h * w + i] = normalize(v as f32 / 255.0);
        }
    }
    Tensor::from_slice(&chw).reshape([1, 3, height as i64, width as i64])
}

/// PIL's `convert("L")`: ITU-R 601-2 luma with its fixed-point rounding.
pub fn pil_luma(img: &DynamicImage) -> GrayImage {
    match img {
        DynamicImage::ImageLuma8(g) => g.clone(),
        _ => {
            let rgb = img.to_rgb8();
            GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
                let p = rgb.get_pixel(x, y).0;
                let l =
                    (p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16;
                image::Luma([l as u8])
            })
        }
    }
}

/// The mask processor's `preprocess`: grayscale, resized, in [0, 1], binarized at 0.5: [1, 1, H, W].
pub fn preprocess_mask(img: &DynamicImage, width: u32, height: u32) -> Tensor {
    let mut gray = pil_luma(img);
    if gray.width() != width || gray.height() != height {
        gray = image::imageops::resize(&gray, width, height, FilterType::Lanczos3);
    }
    let binary: Vec<f32> = gray
        .as_raw()
        .iter()
        .map(|&v| if v as f32 / 255.0 >= 0.5 { 1.0 } else { 0.0 })
        .collect();
    Tensor::from_slice(&binary).reshape([1, 1, height as i64, width as i64])
}

/// `numpy_to_pil` for one float HWC image in [0, 1]: `(x * 255).round().astype("uint8")`.
fn quantize(hwc: &[f32], width: u32, height: u32) -> Result<RgbImage> {
    let raw: Vec<u8> = hwc
        .iter()
        .map(|&v| (v * 255.0).round_ties_even() as u8)
        .collect();
    RgbImage::from_raw(width, height, raw)
        .ok_or_else(|| PipelineError::Internal("image buffer size".into()))
}

/// `numpy_to_pil` for float NHWC images in [0, 1] (what [`postprocess`] returns beside the PNGs).
pub fn to_pil(nhwc: &Tensor) -> Result<Vec<RgbImage>> {
    let size = nhwc.size();
    let [_, h, w, 3] = size[..] else {
        return Err(PipelineError::Internal(format!(
            "images have shape {size:?}, not [N, H, W, 3]"
        )));
    };
    let flat = Vec::<f32>::try_from(nhwc.to_kind(Kind::Float).flatten(0, -1))?;
    flat.chunks_exact((h * w * 3) as usize)
        .map(|one| quantize(one, w as u32, h as u32))
        .collect()
}

/// A PNG-encoded output image.
pub fn png(img: &RgbImage) -> Result<crate::GeneratedImage> {
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| PipelineError::Internal(format!("png encode: {e}")))?;
    Ok(crate::GeneratedImage {
        png,
        width: img.width(),
        height: img.height(),
    })
}

/// `postprocess(output_type="np")` then `numpy_to_pil`: float NHWC in [0, 1] and PNG bytes per image.
pub fn postprocess(decoded: &Tensor) -> Result<(Tensor, Vec<crate::GeneratedImage>)> {
    let decoded = decoded
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let size = decoded.size();
    let [n, c, h, w] = size[..] else {
        return Err(PipelineError::Internal(format!(
            "decoded images have shape {size:?}, not [N, 3, H, W]"
        )));
    };
    if c != 3 {
        return Err(PipelineError::Internal(format!(
            "decoded images have {c} channels, not 3"
        )));
    }
    let (n, h, w) = (n as usize, h as usize, w as usize);
    let mut nchw = vec![0f32; n * 3 * h * w];
    let len = nchw.len();
    decoded.f_copy_data(&mut nchw, len)?;
    // images / 2 + 0.5, clamped to [0, 1], as NHWC; then numpy's (x * 255).round().astype(uint8).
    let mut nhwc = vec![0f32; nchw.len()];
    for i in 0..n {
        for ch in 0..3 {
            for p in 0..h * w {
                let v = (nchw[(i * 3 + ch) * h * w + p] / 2.0 + 0.5).clamp(0.0, 1.0);
                nhwc[(i * h * w + p) * 3 + ch] = v;
            }
        }
    }
    let out = nhwc
        .chunks_exact(h * w * 3)
        .map(|one| png(&quantize(one, w as u32, h as u32)?))
        .collect::<Result<Vec<_>>>()?;
    let nhwc = Tensor::from_slice(&nhwc).reshape([n as i64, h as i64, w as i64, 3]);
    Ok((nhwc, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pil_luma_matches_pil_fixed_point() {
        // PIL: Image.new("RGB", (1, 1), (200, 100, 50)).convert("L").getpixel((0, 0)) == 124
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(1, 1, image::Rgb([200, 100, 50])));
        assert_eq!(pil_luma(&img).get_pixel(0, 0).0[0], 124);
    }

    #[test]
    fn mask_binarizes_at_half() {
        let img = DynamicImage::ImageLuma8(GrayImage::from_fn(4, 1, |x, _| {
            image::Luma([[0, 127, 128, 255][x as usize]])
        }));
        let m = preprocess_mask(&img, 4, 1);
        let v: Vec<f32> = m.flatten(0, -1).try_into().unwrap();
        assert_eq!(v, vec![0.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn preprocess_normalizes_and_postprocess_inverts() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_fn(8, 8, |x, y| {
            image::Rgb([(x * 30) as u8, (y * 30) as u8, 255])
        }));
        let t = preprocess(&img, 8, 8);
        assert_eq!(t.size(), vec![1, 3, 8, 8]);
        assert!(
            (t.max().double_value(&[]) - 1.0).abs() < 1e-6
                && (t.min().double_value(&[]) + 1.0).abs() < 1e-6
        );
        let (_, pngs) = postprocess(&t).unwrap();
        let back = image::load_from_memory(&pngs[0].png).unwrap().to_rgb8();
        assert_eq!(back.as_raw(), img.to_rgb8().as_raw());
    }

    #[test]
    fn undecodable_bytes_name_the_field() {
        let err = decode(b"not an image", "mask_image").unwrap_err();
        assert!(err.to_string().starts_with("mask_image:"), "{err}");
    }
}
