//! Pillow's `Image.resize` for 8-bit RGB, gray and RGBA images (Pillow's `libImaging/Resample.c`)
//! and its alpha-masked `paste`, bit for bit. A resize is a horizontal then a vertical pass, each a
//! convolution whose filter support is scaled by the downsampling factor, with coefficients
//! normalised in double precision and applied in 22-bit fixed point. transformers' PIL image
//! processors, diffusers' PIL inputs and DeepFloyd IF's watermark resize through it.

use image::{GrayImage, RgbImage, RgbaImage};

/// Pillow's resampling filters (`PIL.Image.Resampling`), by the numbers configs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl Filter {
    /// The filter for Pillow's number (`resample` in a `preprocessor_config.json`); `None` for
    /// NEAREST (0), which Pillow runs as an affine transform rather than a convolution, and for
    /// numbers Pillow does not have.
    pub fn from_pil(n: i64) -> Option<Self> {
        match n {
            1 => Some(Self::Lanczos),
            2 => Some(Self::Bilinear),
            3 => Some(Self::Bicubic),
            4 => Some(Self::Box),
            5 => Some(Self::Hamming),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Self::Box => 0.5,
            Self::Bilinear | Self::Hamming => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x
            }
        }
        match self {
            Self::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Self::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Self::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    x.sin() / x * (0.54 + 0.46 * x.cos())
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Self::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One output pixel's taps: the first input index and fixed-point weights.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` for resizing `in_size` to `out_size`.
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) cast truncates toward zero; negatives are clamped to 0 either way.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let raw: Vec<f64> = (xmin..xmax.max(xmin))
                .map(|x| filter.weight((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = raw.iter().sum();
            let fixed = 2f64.powi(PRECISION_BITS as i32);
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    if w < 0.0 {
                        (-0.5 + w * fixed) as i32
                    } else {
                        (0.5 + w * fixed) as i32
                    }
                })
                .collect();
            Taps {
                first: xmin,
                weights,
            }
        })
        .collect()
}

/// `clip8`: a fixed-point sum back to a byte.
fn clip8(v: i64) -> u8 {
    if v >= 1i64 << (PRECISION_BITS + 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// One fixed-point convolution: `sample(i)` is the input at index `i` along the resampled axis.
fn convolve(taps: &Taps, sample: impl Fn(usize) -> u8) -> u8 {
    let sum = taps
        .weights
        .iter()
        .enumerate()
        .fold(1i64 << (PRECISION_BITS - 1), |ss, (k, &w)| {
            ss + sample(taps.first + k) as i64 * w as i64
        });
    clip8(sum)
}

/// `img.resize((width, height), resample=filter)` as Pillow computes it for mode "RGB".
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    let buf = resample(
        img.as_raw(),
        (w0, h0),
        (width as usize, height as usize),
        3,
        filter,
    );
    RgbImage::from_raw(width, height, buf).expect("a buffer of width x height RGB pixels")
}

/// `img.resize((width, height), resample=filter)` as Pillow computes it for mode "L".
pub fn resize_gray(img: &GrayImage, width: u32, height: u32, filter: Filter) -> GrayImage {
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    let buf = resample(
        img.as_raw(),
        (w0, h0),
        (width as usize, height as usize),
        1,
        filter,
    );
    GrayImage::from_raw(width, height, buf).expect("a buffer of width x height gray pixels")
}

/// `img.resize((width, height), resample=filter)` as Pillow computes it for mode "RGBA": an image of
/// that size is copied as is; otherwise Pillow converts to premultiplied alpha ("RGBa"), resamples
/// the four bands, and converts back, with `Convert.c`'s integer rounding both ways.
pub fn resize_rgba(img: &RgbaImage, width: u32, height: u32, filter: Filter) -> RgbaImage {
    if img.dimensions() == (width, height) {
        return img.clone();
    }
    let premultiplied: Vec<u8> = img
        .as_raw()
        .chunks_exact(4)
        .flat_map(|p| {
            let alpha = p[3] as u32;
            [
                muldiv255(p[0], alpha),
                muldiv255(p[1], alpha),
                muldiv255(p[2], alpha),
                p[3],
            ]
        })
        .collect();
    let mut buf = resample(
        &premultiplied,
        (img.width() as usize, img.height() as usize),
        (width as usize, height as usize),
        4,
        filter,
    );
    for p in buf.chunks_exact_mut(4) {
        // `rgba2rgbA`: fully transparent and opaque pixels keep their bytes; the rest divide,
        // truncating, and clip.
        let alpha = p[3] as u32;
        if alpha != 0 && alpha != 255 {
            for v in &mut p[..3] {
                *v = (255 * *v as u32 / alpha).min(255) as u8;
            }
        }
    }
    RgbaImage::from_raw(width, height, buf).expect("a buffer of width x height RGBA pixels")
}

/// `dst.paste(src, box=(left, top, left + w, top + h), mask=src.split()[-1])` for an "RGB" `dst`
/// and an "RGBA" `src` (Pillow's `paste_mask_L`): each colour byte becomes
/// `(dst * (255 - alpha) + src * alpha) / 255`, rounded in integers; the box is clipped to `dst`.
pub fn paste_with_alpha(dst: &mut RgbImage, src: &RgbaImage, left: i64, top: i64) {
    let (dw, dh) = (dst.width() as i64, dst.height() as i64);
    let x0 = left.max(0);
    let y0 = top.max(0);
    let x1 = (left + src.width() as i64).min(dw);
    let y1 = (top + src.height() as i64).min(dh);
    for y in y0..y1 {
        for x in x0..x1 {
            let s = src.get_pixel((x - left) as u32, (y - top) as u32).0;
            let alpha = s[3] as u32;
            let d = dst.get_pixel_mut(x as u32, y as u32);
            for (out, &v) in d.0.iter_mut().zip(&s[..3]) {
                *out = div255(*out as u32 * (255 - alpha) + v as u32 * alpha);
            }
        }
    }
}

/// Pillow's `DIV255`: `v / 255` rounded, in integers.
fn div255(v: u32) -> u8 {
    let t = v + 128;
    (((t >> 8) + t) >> 8) as u8
}

/// Pillow's `MULDIV255`: `a * b / 255` rounded, in integers.
fn muldiv255(a: u8, b: u32) -> u8 {
    let t = a as u32 * b + 128;
    (((t >> 8) + t) >> 8) as u8
}

/// Pillow's two passes over interleaved 8-bit pixels of `channels` bands.
fn resample(
    raw: &[u8],
    (w0, h0): (usize, usize),
    (w1, h1): (usize, usize),
    channels: usize,
    filter: Filter,
) -> Vec<u8> {
    let mut buf = raw.to_vec();
    if w1 != w0 {
        let taps = coefficients(w0, w1, filter);
        let mut out = vec![0u8; w1 * h0 * channels];
        for y in 0..h0 {
            let row = &buf[y * w0 * channels..(y + 1) * w0 * channels];
            for (x, t) in taps.iter().enumerate() {
                for c in 0..channels {
                    out[(y * w1 + x) * channels + c] = convolve(t, |i| row[i * channels + c]);
                }
            }
        }
        buf = out;
    }
    if h1 != h0 {
        let taps = coefficients(h0, h1, filter);
        let line = w1 * channels;
        let mut out = vec![0u8; line * h1];
        for (y, t) in taps.iter().enumerate() {
            for i in 0..line {
                out[y * line + i] = convolve(t, |j| buf[j * line + i]);
            }
        }
        buf = out;
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for (a, b) in [(64, 36), (36, 64), (7, 3), (3, 7)] {
            for t in coefficients(a, b, Filter::Bicubic) {
                let sum: i64 = t.weights.iter().map(|&w| w as i64).sum();
                assert!((sum - (1 << PRECISION_BITS)).abs() <= t.weights.len() as i64);
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat() {
        let img = RgbImage::from_pixel(13, 9, image::Rgb([10, 128, 250]));
        for filter in [Filter::Bicubic, Filter::Lanczos, Filter::Bilinear] {
            let out = resize(&img, 5, 17, filter);
            assert!(out.pixels().all(|p| p.0 == [10, 128, 250]), "{filter:?}");
        }
    }
}
