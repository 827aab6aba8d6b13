//! A component's safetensors weight files in a diffusers folder and loading them into a
//! [`tch::nn::VarStore`], following diffusers' `models/modeling_utils.py` /
//! `utils/hub_utils.py` file naming (variants, sharded index files).
//!
//! Loading memory-maps each file and copies every tensor straight into the variable of the same
//! name, converting to the variable's kind and device on the way: no whole-file copy is made.
//! The `nn` constructors here declare zero-initialised parameters meant to be filled by [`load`]
//! (no random initialisation, so the global torch generator is never touched).

use std::borrow::Borrow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use tch::nn::{self, VarStore};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// File stems diffusers (`diffusion_pytorch_model`) and transformers (`model`) save weights under.
const STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];

/// How many names an error message lists before summarising the rest.
const LIST_LIMIT: usize = 20;

/// Inserts `variant` before the last extension, as diffusers' `_add_variant` does
/// (`model.safetensors` → `model.fp16.safetensors`, `x.safetensors.index.json` → `x.safetensors.index.fp16.json`).
fn add_variant(file: &str, variant: Option<&str>) -> String {
    match (variant, file.rsplit_once('.')) {
        (Some(v), Some((head, ext))) => format!("{head}.{v}.{ext}"),
        _ => file.to_string(),
    }
}

/// The shard files named by a sharded checkpoint's index (`weight_map` values), in sorted order.
fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index)?;
    let json = autopipe_json::parse(&text)
        .map_err(|e| Error::Weights(format!("{}: {e}", index.display())))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Weights(format!("{}: no `weight_map` object", index.display())))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut names = BTreeSet::new();
    for (key, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::Weights(format!(
                "{}: `weight_map[{key}]` is not a string",
                index.display()
            ))
        })?;
        // A shard is a plain file name beside the index; anything else would escape the folder.
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(Error::Weights(format!(
                "{}: shard name {file:?} is not a file name",
                index.display()
            )));
        }
        names.insert(file.to_string());
    }
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let path = dir.join(&name);
        if !path.is_file() {
            return Err(Error::Weights(format!(
                "{}: shard {} is missing",
                index.display(),
                path.display()
            )));
        }
        out.push(path);
    }
    Ok(out)
}

/// The safetensors files of one variant (`None`: the plain files), or `None` when there are none.
fn find_files(dir: &Path, variant: Option<&str>) -> Result<Option<Vec<PathBuf>>> {
    for stem in STEMS {
        let single = dir.join(add_variant(&format!("{stem}.safetensors"), variant));
        if single.is_file() {
            return Ok(Some(vec![single]));
        }
        let mut indexes = vec![add_variant(
            &format!("{stem}.safetensors.index.json"),
            variant,
        )];
        if let Some(v) = variant {
            // Older diffusers wrote variant indexes as `<stem>.<variant>.safetensors.index.json`.
            indexes.push(format!("{stem}.{v}.safetensors.index.json"));
        }
        for index in indexes {
            let index = dir.join(index);
            if index.is_file() {
                return shards_from_index(&index).map(Some);
            }
        }
    }
    Ok(None)
}

/// The safetensors weight files of the component folder `component_dir` (e.g. `<model>/unet`).
///
/// Looks for `diffusion_pytorch_model[.<variant>].safetensors`, then `model[.<variant>].safetensors`,
/// then their sharded `*.safetensors.index[.<variant>].json` (returning the shards of its
/// `weight_map`). A requested variant that the folder lacks falls back to the plain files, as
/// diffusers' pipeline loading does. Errors when the folder only holds PyTorch `.bin` weights.
pub fn weight_files(component_dir: &Path, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    if !component_dir.is_dir() {
        return Err(Error::Weights(format!(
            "{}: not a directory",
            component_dir.display()
        )));
    }
    if let Some(v) = variant {
        if let Some(files) = find_files(component_dir, Some(v))? {
            return Ok(files);
        }
    }
    if let Some(files) = find_files(component_dir, None)? {
        if let Some(v) = variant {
            tracing::warn!(
                dir = %component_dir.display(),
                variant = v,
                "variant weights not found, loading the non-variant files"
            );
        }
        return Ok(files);
    }
    let mut bins = Vec::new();
    for entry in std::fs::read_dir(component_dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".bin") {
            bins.push(name);
        }
    }
    bins.sort();
    if bins.is_empty() {
        Err(Error::Weights(format!(
            "{}: no safetensors weights (expected diffusion_pytorch_model.safetensors or model.safetensors)",
            component_dir.display()
        )))
    } else {
        Err(Error::Weights(format!(
            "{}: only PyTorch pickle weights ({}); convert them to safetensors",
            component_dir.display(),
            bins.join(", ")
        )))
    }
}

/// The tch kind of a safetensors dtype, for the dtypes diffusion checkpoints hold.
fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

/// `names` as a short comma-separated list.
fn summarize(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(LIST_LIMIT)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > LIST_LIMIT {
        s.push_str(&format!(", … ({} more)", names.len() - LIST_LIMIT));
    }
    s
}

/// Loads safetensors `files` into the variables of `vs`, strictly.
///
/// Each tensor name goes through `rename` first (a name renamed to `""` is skipped, for buffers a
/// checkpoint may carry such as CLIP's `position_ids`), then is copied into the variable of that
/// name, converting dtype (f16/bf16/f32 files into any float kind) and device. Errors list the
/// variables no file provided, the file tensors no variable wants, and shape mismatches.
pub fn load(vs: &mut VarStore, files: &[PathBuf], rename: &dyn Fn(&str) -> String) -> Result<()> {
    let vars = vs.variables();
    let mut found: HashSet<String> = HashSet::with_capacity(vars.len());
    let mut unexpected = Vec::new();
    let mut mismatched = Vec::new();
    tch::no_grad(|| -> Result<()> {
        for path in files {
            load_file(
                path,
                &vars,
                rename,
                &mut found,
                &mut unexpected,
                &mut mismatched,
            )?;
        }
        Ok(())
    })?;
    let mut missing: Vec<String> = vars
        .keys()
        .filter(|k| !found.contains(*k))
        .cloned()
        .collect();
    missing.sort();
    unexpected.sort();
    mismatched.sort();
    if missing.is_empty() && unexpected.is_empty() && mismatched.is_empty() {
        return Ok(());
    }
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!(
            "{} missing keys: {}",
            missing.len(),
            summarize(&missing)
        ));
    }
    if !unexpected.is_empty() {
        parts.push(format!(
            "{} unexpected keys: {}",
            unexpected.len(),
            summarize(&unexpected)
        ));
    }
    if !mismatched.is_empty() {
        parts.push(format!(
            "{} shape mismatches: {}",
            mismatched.len(),
            summarize(&mismatched)
        ));
    }
    let where_ = files
        .first()
        .and_then(|f| f.parent())
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    Err(Error::Weights(format!("{where_}: {}", parts.join("; "))))
}

/// Copies the tensors of one safetensors file into `vars`, recording what did not fit.
fn load_file(
    path: &Path,
    vars: &HashMap<String, Tensor>,
    rename: &dyn Fn(&str) -> String,
    found: &mut HashSet<String>,
    unexpected: &mut Vec<String>,
    mismatched: &mut Vec<String>,
) -> Result<()> {
    let werr = |e: String| Error::Weights(format!("{}: {e}", path.display()));
    let file = File::open(path).map_err(|e| werr(e.to_string()))?;
    // SAFETY: the map is read-only and lives until every tensor viewing it has been copied out
    // and dropped below; a concurrent truncation of the file is outside what we can guard against.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| werr(e.to_string()))?;
    let st = SafeTensors::deserialize(&mmap).map_err(|e| werr(e.to_string()))?;
    for (name, view) in st.iter() {
        let target = rename(name);
        if target.is_empty() {
            continue;
        }
        let Some(var) = vars.get(&target) else {
            unexpected.push(target);
            continue;
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        if shape != var.size() {
            mismatched.push(format!("{target} (file {shape:?}, model {:?})", var.size()));
            // Reported as a mismatch, not also as missing.
            found.insert(target);
            continue;
        }
        let kind = kind_of(view.dtype())
            .ok_or_else(|| werr(format!("{name}: unsupported dtype {:?}", view.dtype())))?;
        let data = view.data();
        let numel: i64 = shape.iter().product();
        if numel > 0 {
            let src = if (data.as_ptr() as usize) & (kind.elt_size_in_bytes() - 1) == 0 {
                let mut strides = vec![1i64; shape.len()];
                for i in (0..shape.len().saturating_sub(1)).rev() {
                    strides[i] = strides[i + 1] * shape[i + 1];
                }
                // SAFETY: `data` is `numel * elt_size` bytes of the live, suitably aligned map;
                // the tensor only views it and is dropped before the map.
                unsafe {
                    Tensor::f_from_blob(data.as_ptr(), &shape, &strides, kind, tch::Device::Cpu)
                }?
            } else {
                // Misaligned data (possible in hand-written files): copy this one tensor.
                Tensor::f_from_data_size(data, &shape, kind)?
            };
            var.shallow_clone().f_copy_(&src)?;
        }
        found.insert(target);
    }
    Ok(())
}

/// A linear layer (`weight` `[out, in]`, optional `bias`) to be filled by [`load`].
pub fn linear<'a>(
    vs: impl Borrow<nn::Path<'a>>,
    in_dim: i64,
    out_dim: i64,
    bias: bool,
) -> nn::Linear {
    let cfg = nn::LinearConfig {
        ws_init: nn::Init::Const(0.),
        bs_init: Some(nn::Init::Const(0.)),
        bias,
    };
    nn::linear(vs, in_dim, out_dim, cfg)
}

/// A 2D convolution with bias (`weight` `[out, in, k, k]`) to be filled by [`load`].
pub fn conv2d<'a>(
    vs: impl Borrow<nn::Path<'a>>,
    in_channels: i64,
    out_channels: i64,
    kernel_size: i64,
    stride: i64,
    padding: i64,
) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride,
        padding,
        ws_init: nn::Init::Const(0.),
        bs_init: nn::Init::Const(0.),
        ..Default::default()
    };
    nn::conv2d(vs, in_channels, out_channels, kernel_size, cfg)
}

/// An affine group norm (`weight`, `bias` `[channels]`) to be filled by [`load`].
pub fn group_norm<'a>(
    vs: impl Borrow<nn::Path<'a>>,
    groups: i64,
    channels: i64,
    eps: f64,
) -> nn::GroupNorm {
    let cfg = nn::GroupNormConfig {
        eps,
        ws_init: nn::Init::Const(0.),
        bs_init: nn::Init::Const(0.),
        ..Default::default()
    };
    nn::group_norm(vs, groups, channels, cfg)
}

/// An affine layer norm over the last dimension (`weight`, `bias` `[dim]`) to be filled by [`load`].
pub fn layer_norm<'a>(vs: impl Borrow<nn::Path<'a>>, dim: i64, eps: f64) -> nn::LayerNorm {
    let cfg = nn::LayerNormConfig {
        eps,
        ws_init: nn::Init::Const(0.),
        bs_init: nn::Init::Const(0.),
        ..Default::default()
    };
    nn::layer_norm(vs, vec![dim], cfg)
}

/// An embedding table (`weight` `[num, dim]`) to be filled by [`load`].
pub fn embedding<'a>(vs: impl Borrow<nn::Path<'a>>, num: i64, dim: i64) -> nn::Embedding {
    let cfg = nn::EmbeddingConfig {
        ws_init: nn::Init::Const(0.),
        ..Default::default()
    };
    nn::embedding(vs, num, dim, cfg)
}

/// A fresh var store on `device` whose new variables are created with `kind`.
pub fn var_store(kind: Kind, device: tch::Device) -> VarStore {
    let mut vs = VarStore::new(device);
    vs.set_kind(kind);
    vs
}

/// Reads and parses a component's `config.json` into `T`, as Python's `json` wrote it (`NaN`,
/// `Infinity` and `-Infinity` included).
pub fn read_config<T: serde::de::DeserializeOwned>(component_dir: &Path) -> Result<T> {
    let path = component_dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    autopipe_json::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_names_follow_diffusers() {
        assert_eq!(
            add_variant("diffusion_pytorch_model.safetensors", Some("fp16")),
            "diffusion_pytorch_model.fp16.safetensors"
        );
        assert_eq!(
            add_variant("model.safetensors.index.json", Some("fp16")),
            "model.safetensors.index.fp16.json"
        );
        assert_eq!(add_variant("model.safetensors", None), "model.safetensors");
    }
}

/// Whether convolution models on `device` run channels-last: on CPU, unless
/// `AUTOPIPE_CHANNELS_LAST=0`.
pub fn use_channels_last(device: tch::Device) -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    device == tch::Device::Cpu
        && *ENABLED.get_or_init(|| {
            std::env::var("AUTOPIPE_CHANNELS_LAST")
                .map(|v| v != "0")
                .unwrap_or(true)
        })
}

/// `xs` (`[N, C, H, W]`) in channels-last (NHWC) memory order, same shape: PyTorch's
/// `x.to(memory_format=torch.channels_last)`, which `tch` does not expose.
pub fn channels_last(xs: &Tensor) -> Tensor {
    if xs.dim() != 4 {
        return xs.shallow_clone();
    }
    xs.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// Rewrites every 4-D parameter (convolution weights) of `vs` in channels-last memory order on
/// CPU, as `model.to(memory_format=torch.channels_last)` does: oneDNN's convolutions then run
/// NHWC end to end, with no reorder of activations or weights around each call, and channels-last
/// activations propagate through GroupNorm, SiLU, upsampling and residual adds. Values are unchanged.
/// Set `AUTOPIPE_CHANNELS_LAST=0` to keep NCHW (for A/B measurements).
pub fn to_channels_last(vs: &VarStore) {
    if !use_channels_last(vs.device()) {
        return;
    }
    tch::no_grad(|| {
        for (_, mut var) in vs.variables() {
            if var.dim() == 4 {
                let cl = channels_last(&var);
                var.set_data(&cl);
            }
        }
    });
}
