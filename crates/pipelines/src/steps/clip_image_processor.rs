//! transformers' `CLIPImageProcessor` as transformers 5.24 runs it without torchvision
//! (`CLIPImageProcessorPil`, `models/clip/image_processing_pil_clip.py` over
//! `image_processing_backends.PilBackend` and `image_transforms.py`), from a
//! `preprocessor_config.json`: RGB, resize (shortest edge, or to a size) through Pillow on uint8,
//! center crop (zero-padding an image smaller than the crop), rescale in float64 then float32,
//! normalise in float32. What the Stable Diffusion safety checker's `feature_extractor` and CLIP
//! image encoders take.

use crate::steps::pil::{self, Filter};
use crate::{PipelineError, Result};
use autopipe_repo::Checkpoint;
use image::RgbImage;
use serde::Deserialize;
use serde_json::{Map, Value};
use tch::Tensor;

/// OpenAI CLIP's `image_mean` (transformers' `OPENAI_CLIP_MEAN`).
const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP's `image_std` (transformers' `OPENAI_CLIP_STD`).
const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// A `size` / `crop_size` entry: an int (old configs) or a dict.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SizeEntry {
    Int(u32),
    Dict(Map<String, Value>),
}

fn yes() -> bool {
    true
}

/// `preprocessor_config.json`, with `CLIPImageProcessor`'s class defaults for what it omits.
#[derive(Debug, Clone, Deserialize)]
struct Config {
    #[serde(default = "yes")]
    do_resize: bool,
    size: Option<SizeEntry>,
    resample: Option<i64>,
    #[serde(default = "yes")]
    do_center_crop: bool,
    crop_size: Option<SizeEntry>,
    #[serde(default = "yes")]
    do_rescale: bool,
    rescale_factor: Option<f64>,
    #[serde(default = "yes")]
    do_normalize: bool,
    image_mean: Option<Vec<f64>>,
    image_std: Option<Vec<f64>>,
}

/// How images are resized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resize {
    /// The shorter side becomes this; the longer keeps the aspect ratio (truncated).
    ShortestEdge(u32),
    /// Exactly (height, width).
    To(u32, u32),
}

/// A loaded `CLIPImageProcessor`.
#[derive(Debug, Clone, PartialEq)]
pub struct CLIPImageProcessor {
    resize: Option<(Resize, Filter)>,
    /// (height, width).
    crop: Option<(u32, u32)>,
    rescale_factor: Option<f64>,
    /// Per-channel (mean, std) as float32, as numpy casts them to the image's dtype.
    normalize: Option<([f32; 3], [f32; 3])>,
}

fn size_field(entry: &Map<String, Value>, key: &str) -> Option<u32> {
    entry
        .get(key)
        .and_then(Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
}

fn channels(
    v: Option<Vec<f64>>,
    default: [f64; 3],
    name: &str,
) -> std::result::Result<[f32; 3], String> {
    let v = v.unwrap_or_else(|| default.to_vec());
    match v[..] {
        [x] => Ok([x as f32; 3]),
        [r, g, b] => Ok([r as f32, g as f32, b as f32]),
        _ => Err(format!("{name} must have 1 or 3 values, got {}", v.len())),
    }
}

impl CLIPImageProcessor {
    /// Parses a `preprocessor_config.json`.
    pub fn from_json(json: &Value) -> std::result::Result<Self, String> {
        let cfg: Config = serde_json::from_value(json.clone()).map_err(|e| e.to_string())?;
        let resize = if cfg.do_resize {
            let size = match cfg.size {
                None => Resize::ShortestEdge(224),
                Some(SizeEntry::Int(n)) => Resize::ShortestEdge(n),
                Some(SizeEntry::Dict(d)) => match (
                    size_field(&d, "shortest_edge"),
                    size_field(&d, "height"),
                    size_field(&d, "width"),
                ) {
                    (Some(n), None, None) if d.get("longest_edge").is_none_or(|v| v.is_null()) => {
                        Resize::ShortestEdge(n)
                    }
                    (None, Some(h), Some(w)) => Resize::To(h, w),
                    _ => {
                        return Err(format!(
                            "size {} is not supported (shortest_edge, or height and width)",
                            Value::Object(d)
                        ))
                    }
                },
            };
            let number = cfg.resample.unwrap_or(3);
            let filter = Filter::from_pil(number).ok_or_else(|| {
                format!("resample {number} is not supported (1 LANCZOS, 2 BILINEAR, 3 BICUBIC, 4 BOX, 5 HAMMING)")
            })?;
            Some((size, filter))
        } else {
            None
        };
        let crop = if cfg.do_center_crop {
            Some(match cfg.crop_size {
                None => (224, 224),
                Some(SizeEntry::Int(n)) => (n, n),
                Some(SizeEntry::Dict(d)) => {
                    match (size_field(&d, "height"), size_field(&d, "width")) {
                        (Some(h), Some(w)) => (h, w),
                        _ => {
                            return Err(format!(
                                "crop_size {} needs height and width",
                                Value::Object(d)
                            ))
                        }
                    }
                }
            })
        } else {
            None
        };
        if [resize.map(|(r, _)| r), crop.map(|(h, w)| Resize::To(h, w))]
            .iter()
            .flatten()
            .any(|r| {
                matches!(
                    r,
                    Resize::ShortestEdge(0) | Resize::To(0, _) | Resize::To(_, 0)
                )
            })
        {
            return Err("sizes must be positive".into());
        }
        let normalize = if cfg.do_normalize {
            Some((
                channels(cfg.image_mean, CLIP_MEAN, "image_mean")?,
                channels(cfg.image_std, CLIP_STD, "image_std")?,
            ))
        } else {
            None
        };
        Ok(Self {
            resize,
            crop,
            rescale_factor: cfg
                .do_rescale
                .then(|| cfg.rescale_factor.unwrap_or(1.0 / 255.0)),
            normalize,
        })
    }

    /// The checkpoint's `<component>/preprocessor_config.json`.
    pub fn from_checkpoint(checkpoint: &Checkpoint, component: &str) -> Result<Self> {
        let json = checkpoint.read_json(component, "preprocessor_config.json")?;
        Self::from_json(&json).map_err(|e| {
            PipelineError::invalid(
                "model",
                format!("{component}/preprocessor_config.json: {e}"),
            )
        })
    }

    /// `get_resize_output_image_size(..., default_to_square=False)`: (height, width).
    fn resized(&self, height: u32, width: u32) -> Option<(u32, u32, Filter)> {
        let (resize, filter) = self.resize?;
        Some(match resize {
            Resize::To(h, w) => (h, w, filter),
            Resize::ShortestEdge(size) => {
                let (short, long) = (width.min(height), width.max(height));
                // Python: int(size * long / short), a float division truncated.
                let new_long = ((size as u64 * long as u64) as f64 / short as f64) as u32;
                if width <= height {
                    (new_long, size, filter)
                } else {
                    (size, new_long, filter)
                }
            }
        })
    }

    /// `pixel_values` for `images`: [N, 3, H, W] float32. Every image must come out the same
    /// size (as a center crop makes them).
    pub fn preprocess(&self, images: &[RgbImage]) -> Result<Tensor> {
        let mut out = Vec::new();
        let mut shape = None;
        for img in images {
            let img = match self.resized(img.height(), img.width()) {
                Some((h, w, filter)) => pil::resize(img, w, h, filter),
                None => img.clone(),
            };
            let (h, w, hwc) = match self.crop {
                Some((ch, cw)) => (ch, cw, center_crop(&img, ch, cw)),
                None => (img.height(), img.width(), img.into_raw()),
            };
            if shape.replace((h, w)).is_some_and(|s| s != (h, w)) {
                return Err(PipelineError::Internal(
                    "CLIPImageProcessor: images of different sizes after preprocessing".into(),
                ));
            }
            let plane = (h * w) as usize;
            let mut chw = vec![0f32; 3 * plane];
            for (i, px) in hwc.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    let mut v = px[c] as f32;
                    if let Some(factor) = self.rescale_factor {
                        v = (px[c] as f64 * factor) as f32;
                    }
                    if let Some((mean, std)) = &self.normalize {
                        v = (v - mean[c]) / std[c];
                    }
                    chw[c * plane + i] = v;
                }
            }
            out.extend(chw);
        }
        let (h, w) = shape.unwrap_or((0, 0));
        Ok(Tensor::from_slice(&out).reshape([images.len() as i64, 3, h as i64, w as i64]))
    }
}

/// `image_transforms.center_crop` on an RGB image: the centered (height, width) window, with
/// zeros where the image is smaller than the crop. Returns HWC bytes.
fn center_crop(img: &RgbImage, height: u32, width: u32) -> Vec<u8> {
    let (h, w) = (img.height() as i64, img.width() as i64);
    let (ch, cw) = (height as i64, width as i64);
    // Python's // floors; the pad is ceil((new - old) / 2).
    let top = (h - ch).div_euclid(2);
    let left = (w - cw).div_euclid(2);
    let (top_pad, left_pad) = if top >= 0 && top + ch <= h && left >= 0 && left + cw <= w {
        (0, 0)
    } else {
        ((ch.max(h) - h + 1) / 2, (cw.max(w) - w + 1) / 2)
    };
    let (top, left) = ((top + top_pad).max(0), (left + left_pad).max(0));
    let raw = img.as_raw();
    let mut out = vec![0u8; (ch * cw * 3) as usize];
    for y in 0..ch {
        for x in 0..cw {
            let (sy, sx) = (top + y - top_pad, left + x - left_pad);
            if (0..h).contains(&sy) && (0..w).contains(&sx) {
                let s = ((sy * w + sx) * 3) as usize;
                let d = ((y * cw + x) * 3) as usize;
                out[d..d + 3].copy_from_slice(&raw[s..s + 3]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_int_sizes_mean_shortest_edge_and_a_square_crop() {
        let p = CLIPImageProcessor::from_json(&serde_json::json!({"size": 224, "crop_size": 224}))
            .unwrap();
        assert_eq!(p.resize, Some((Resize::ShortestEdge(224), Filter::Bicubic)));
        assert_eq!(p.crop, Some((224, 224)));
        assert_eq!(p.resized(100, 150), Some((224, 336, Filter::Bicubic)));
        assert_eq!(p.resized(53, 37), Some((320, 224, Filter::Bicubic)));
    }

    #[test]
    fn unsupported_configs_name_the_field() {
        for (json, field) in [
            (serde_json::json!({"resample": 0}), "resample 0"),
            (serde_json::json!({"size": {"longest_edge": 5}}), "size"),
            (serde_json::json!({"crop_size": {"height": 5}}), "crop_size"),
            (serde_json::json!({"image_mean": [0.5, 0.5]}), "image_mean"),
        ] {
            let err = CLIPImageProcessor::from_json(&json).unwrap_err();
            assert!(err.starts_with(field), "{err}");
        }
    }

    #[test]
    fn a_small_image_is_padded_with_zeros_around_its_center() {
        let img = RgbImage::from_pixel(2, 1, image::Rgb([9, 9, 9]));
        let out = center_crop(&img, 3, 4);
        // new (3, 4): top pad ceil(2 / 2) = 1, left pad ceil(2 / 2) = 1.
        let row = |y: usize| out[y * 12..(y + 1) * 12].to_vec();
        assert_eq!(row(0), vec![0; 12]);
        assert_eq!(row(1), vec![0, 0, 0, 9, 9, 9, 9, 9, 9, 0, 0, 0]);
        assert_eq!(row(2), vec![0; 12]);
    }
}
