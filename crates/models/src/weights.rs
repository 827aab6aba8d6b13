//! A component's safetensors weight files in a diffusers folder and loading them into a
//! [`tch::nn::VarStore`], following diffusers' `models/modeling_utils.py` /
//! `utils/hub_utils.py` file naming (variants, sharded index files).
//!
//! Loading reads every tensor once, straight from the file into the final storage of the variable
//! of the same name, in its final kind, layout and device (see [`load`]): no zero-initialisation,
//! no whole-file or whole-model copy, so a model's peak memory is its weights. The `nn`
//! constructors here declare uninitialised parameters ([`param`]) meant to be filled by [`load`]
//! (no random initialisation, so the global torch generator is never touched).

use std::borrow::Borrow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use tch::nn::{self, VarStore};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::layers::{Conv2d, Linear, Prepacks};
use autopipe_torch_ext::ConvParams;

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

/// How [`load`] lays out 4-D parameters (convolution weights) in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Contiguous, as PyTorch creates them.
    Contiguous,
    /// Channels-last where [`use_channels_last`] says so (CPU), as
    /// `model.to(memory_format=torch.channels_last)` leaves them: oneDNN's convolutions then run
    /// NHWC end to end, with no reorder of activations or weights around each call. Written in
    /// that order as they are read, so no contiguous copy exists first. Values are unchanged.
    ChannelsLast,
}

/// Bytes of file data read at a time for a tensor that must be converted on its way in (dtype,
/// layout or device): the one transient buffer of a load, so peak memory stays at the weights.
const STAGING_BYTES: usize = 4 << 20;

/// The reusable buffer tensors are read into when they cannot be read in place; on CUDA it is
/// pinned host memory, so the copy to the device is a DMA from it.
struct Staging {
    buf: Option<Tensor>,
    device: tch::Device,
    /// The reusable CPU tensor weights that load packed ([`Prepacks`]) are read into first.
    scratch: Option<Tensor>,
}

impl Staging {
    /// A byte tensor of at least `bytes`, reused between chunks and tensors.
    fn take(&mut self, bytes: usize) -> Result<&Tensor> {
        if self.buf.as_ref().is_none_or(|b| (b.numel()) < bytes) {
            self.buf = None;
            let buf = Tensor::f_empty(
                [bytes.max(STAGING_BYTES) as i64],
                (Kind::Uint8, tch::Device::Cpu),
            )?;
            self.buf = Some(if self.device.is_cuda() {
                buf.f_pin_memory(self.device)?
            } else {
                buf
            });
        }
        Ok(self.buf.as_ref().expect("staging buffer was just made"))
    }

    /// A CPU tensor of `shape` and `kind` over a byte buffer reused between weights (grown to the
    /// largest): where a weight that is packed at load is read first. 4-D shapes are laid out
    /// channels-last, the order oneDNN's convolution weight reorder takes them in (it copies any
    /// other order into that one first, into fresh memory).
    fn scratch(&mut self, shape: &[i64], kind: Kind) -> Result<Tensor> {
        let bytes = shape.iter().product::<i64>() as usize * kind.elt_size_in_bytes();
        if self.scratch.as_ref().is_none_or(|b| b.numel() < bytes) {
            self.scratch = None;
            self.scratch = Some(Tensor::f_empty(
                [bytes as i64],
                (Kind::Uint8, tch::Device::Cpu),
            )?);
        }
        let buf = self.scratch.as_ref().expect("scratch buffer was just made");
        let flat = buf.f_narrow(0, 0, bytes as i64)?.f_view_dtype(kind)?;
        Ok(match *shape {
            [n, c, h, w] => flat.f_as_strided([n, c, h, w], [c * h * w, 1, w * c, c], None)?,
            _ => flat.f_view(shape)?,
        })
    }
}

/// `len` bytes of a CPU tensor's storage from its data pointer `ptr`.
///
/// # Safety
/// `ptr` must be the data pointer of a CPU tensor with at least `len` bytes from it, which
/// nothing else accesses while the slice lives.
unsafe fn bytes_mut<'a>(ptr: *mut std::ffi::c_void, len: usize) -> &'a mut [u8] {
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) }
}

/// Reads the tensor at `offset` of `file` (`shape`, stored as `file_kind`, row-major) into
/// `dest`, which has the same shape and any kind, strides and device.
///
/// Same kind, contiguous, on the CPU: one `pread` straight into `dest`'s storage (the kernel
/// copies from the page cache, nothing is mapped). Otherwise the tensor goes through `staging`
/// in slices along its first dimension, each converted by one `copy_` into its slice of `dest`.
fn read_tensor(
    file: &File,
    offset: u64,
    shape: &[i64],
    file_kind: Kind,
    dest: &Tensor,
    staging: &mut Staging,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let numel: i64 = shape.iter().product();
    if numel == 0 {
        return Ok(());
    }
    let elt = file_kind.elt_size_in_bytes();
    let nbytes = numel as usize * elt;
    if dest.device() == tch::Device::Cpu && dest.kind() == file_kind && dest.is_contiguous() {
        // SAFETY: `dest` is a contiguous CPU tensor of `numel` elements of `elt` bytes that only
        // this load holds.
        file.read_exact_at(unsafe { bytes_mut(dest.data_ptr(), nbytes) }, offset)?;
        return Ok(());
    }
    let rows = shape.first().copied().unwrap_or(1) as usize;
    let row_bytes = nbytes / rows;
    let per_chunk = (STAGING_BYTES / row_bytes).max(1);
    let mut row = 0;
    while row < rows {
        let n = per_chunk.min(rows - row);
        let bytes = n * row_bytes;
        let buf = staging.take(bytes)?;
        // SAFETY: the staging buffer is a CPU tensor of at least `bytes` bytes owned by `staging`.
        file.read_exact_at(
            unsafe { bytes_mut(buf.data_ptr(), bytes) },
            offset + (row * row_bytes) as u64,
        )?;
        let mut chunk_shape = shape.to_vec();
        if let Some(first) = chunk_shape.first_mut() {
            *first = n as i64;
        }
        let src = buf
            .f_narrow(0, 0, bytes as i64)?
            .f_view_dtype(file_kind)?
            .f_view(chunk_shape.as_slice())?;
        let mut dst = if shape.is_empty() {
            dest.shallow_clone()
        } else {
            dest.f_narrow(0, row as i64, n as i64)?
        };
        dst.f_copy_(&src)?;
        row += n;
    }
    Ok(())
}

/// Loads safetensors `files` into the variables of `vs`, strictly.
///
/// Each tensor name goes through `rename` first (a name renamed to `""` is skipped, for buffers a
/// checkpoint may carry such as CLIP's `position_ids`), then is read into the variable of that
/// name, converting dtype (f16/bf16/f32 files into any float kind), device and, per `layout`,
/// memory order on the way. Every byte is written once, into the variable's final storage (see
/// [`read_tensor`]); the variables' own storage is used as is when it already has the final kind,
/// layout and device, which is what [`param`] allocates (untouched until read into). Errors list
/// the variables no file provided, the file tensors no variable wants, and shape mismatches.
pub fn load(
    vs: &mut VarStore,
    files: &[PathBuf],
    rename: &dyn Fn(&str) -> String,
    layout: Layout,
) -> Result<()> {
    load_packing(vs, files, rename, layout, &mut Prepacks::default())
}

/// [`load`], reading the weights `prepacks` takes into their layers' prepacked form instead of
/// into their variables (see [`crate::layers`]).
fn load_packing(
    vs: &mut VarStore,
    files: &[PathBuf],
    rename: &dyn Fn(&str) -> String,
    layout: Layout,
    prepacks: &mut Prepacks,
) -> Result<()> {
    let vars = vs.variables();
    let channels_last = layout == Layout::ChannelsLast && use_channels_last(vs.device());
    let mut found: HashSet<String> = HashSet::with_capacity(vars.len());
    let mut unexpected = Vec::new();
    let mut mismatched = Vec::new();
    let mut staging = Staging {
        buf: None,
        device: vs.device(),
        scratch: None,
    };
    tch::no_grad(|| -> Result<()> {
        for path in files {
            load_file(
                path,
                &vars,
                rename,
                channels_last,
                prepacks,
                &mut staging,
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

/// Reads the tensors of one safetensors file into `vars`, recording what did not fit.
#[allow(clippy::too_many_arguments)]
fn load_file(
    path: &Path,
    vars: &HashMap<String, Tensor>,
    rename: &dyn Fn(&str) -> String,
    channels_last: bool,
    prepacks: &mut Prepacks,
    staging: &mut Staging,
    found: &mut HashSet<String>,
    unexpected: &mut Vec<String>,
    mismatched: &mut Vec<String>,
) -> Result<()> {
    let werr = |e: String| Error::Weights(format!("{}: {e}", path.display()));
    let file = File::open(path).map_err(|e| werr(e.to_string()))?;
    // The map is only for safetensors' header parsing and offset checks: tensor bytes are read
    // with `pread` (see `read_tensor`), so no data page is ever mapped into this process.
    // SAFETY: read-only map, dropped at the end of this function; nothing reads tensor data
    // through it; a concurrent truncation of the file is outside what we can guard against.
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
        let offset = (view.data().as_ptr() as usize - mmap.as_ptr() as usize) as u64;
        let read = |dest: &Tensor, staging: &mut Staging| {
            read_tensor(&file, offset, &shape, kind, dest, staging)
                .map_err(|e| werr(format!("{name}: {e}")))
        };
        if prepacks.takes(var, channels_last) {
            // Read where it is packed from, into its layer's final (prepacked) storage.
            let plain = staging.scratch(&shape, var.kind())?;
            read(&plain, staging)?;
            if prepacks.pack(var, &plain) {
                found.insert(target);
                continue;
            }
        }
        if channels_last && var.dim() == 4 {
            // The final storage is allocated in its final order here; the variable's own
            // (untouched) storage is then released.
            let cl = channels_last_empty(&shape, var.kind(), var.device())?;
            read(&cl, staging)?;
            var.shallow_clone().set_data(&cl);
        } else {
            read(var, staging)?;
        }
        found.insert(target);
    }
    Ok(())
}

/// An uninitialised `[N, C, H, W]` tensor with channels-last strides.
fn channels_last_empty(shape: &[i64], kind: Kind, device: tch::Device) -> Result<Tensor> {
    let (c, h, w) = (shape[1], shape[2], shape[3]);
    Ok(Tensor::f_empty_strided(
        shape,
        [c * h * w, 1, w * c, c],
        (kind, device),
    )?)
}

/// A parameter of shape `dims` (the path's kind and device) for [`load`] to fill: allocated but
/// not initialised, so none of its pages is touched before the weights are read into it and
/// loading writes each byte once (a zero-initialised variable would be written twice and, when
/// replaced, held twice).
pub fn param<'a>(vs: impl Borrow<nn::Path<'a>>, name: &str, dims: &[i64]) -> Tensor {
    let vs = vs.borrow();
    vs.add(name, Tensor::empty(dims, (vs.kind(), vs.device())), false)
}

/// A throwaway var store for the `nn` constructors below: they build a module's shape-free
/// parts (configuration, padding) there with empty parameters, which [`param`]s then replace,
/// since `tch` only makes modules with initialised (written) parameters.
fn scaffold() -> VarStore {
    VarStore::new(tch::Device::Cpu)
}

/// A linear layer (`weight` `[out, in]`, optional `bias`) to be filled by [`load`].
pub fn linear<'a>(vs: impl Borrow<nn::Path<'a>>, in_dim: i64, out_dim: i64, bias: bool) -> Linear {
    let vs = vs.borrow();
    Linear::new(nn::Linear {
        ws: param(vs, "weight", &[out_dim, in_dim]),
        bs: bias.then(|| param(vs, "bias", &[out_dim])),
    })
}

/// A 2D convolution with bias (`weight` `[out, in, k, k]`) to be filled by [`load`].
pub fn conv2d<'a>(
    vs: impl Borrow<nn::Path<'a>>,
    in_channels: i64,
    out_channels: i64,
    kernel_size: i64,
    stride: i64,
    padding: i64,
) -> Conv2d {
    let vs = vs.borrow();
    // Constant init: the default's random one would draw from torch's global generator.
    let cfg = nn::ConvConfig {
        stride,
        padding,
        ws_init: nn::Init::Const(0.),
        bs_init: nn::Init::Const(0.),
        ..Default::default()
    };
    let mut conv = nn::conv2d(scaffold().root(), 0, 0, kernel_size, cfg);
    conv.ws = param(
        vs,
        "weight",
        &[out_channels, in_channels, kernel_size, kernel_size],
    );
    conv.bs = Some(param(vs, "bias", &[out_channels]));
    let params = ConvParams {
        padding: [padding; 2],
        stride: [stride; 2],
        dilation: [1; 2],
        groups: 1,
    };
    Conv2d::new(conv, params)
}

/// An affine group norm (`weight`, `bias` `[channels]`) to be filled by [`load`].
pub fn group_norm<'a>(
    vs: impl Borrow<nn::Path<'a>>,
    groups: i64,
    channels: i64,
    eps: f64,
) -> nn::GroupNorm {
    let vs = vs.borrow();
    let cfg = nn::GroupNormConfig {
        eps,
        ..Default::default()
    };
    let mut norm = nn::group_norm(scaffold().root(), groups, 0, cfg);
    norm.num_channels = channels;
    norm.ws = Some(param(vs, "weight", &[channels]));
    norm.bs = Some(param(vs, "bias", &[channels]));
    norm
}

/// An affine layer norm over the last dimension (`weight`, `bias` `[dim]`) to be filled by [`load`].
pub fn layer_norm<'a>(vs: impl Borrow<nn::Path<'a>>, dim: i64, eps: f64) -> nn::LayerNorm {
    let vs = vs.borrow();
    let cfg = nn::LayerNormConfig {
        eps,
        ..Default::default()
    };
    let mut norm = nn::layer_norm(scaffold().root(), vec![0], cfg);
    norm.normalized_shape = vec![dim];
    norm.ws = Some(param(vs, "weight", &[dim]));
    norm.bs = Some(param(vs, "bias", &[dim]));
    norm
}

/// An embedding table (`weight` `[num, dim]`) to be filled by [`load`].
pub fn embedding<'a>(vs: impl Borrow<nn::Path<'a>>, num: i64, dim: i64) -> nn::Embedding {
    let cfg = nn::EmbeddingConfig {
        ws_init: nn::Init::Const(0.),
        ..Default::default()
    };
    let mut emb = nn::embedding(scaffold().root(), 0, 0, cfg);
    emb.ws = param(vs, "weight", &[num, dim]);
    emb
}

/// A fresh var store on `device` whose new variables are created with `kind`.
pub fn var_store(kind: Kind, device: tch::Device) -> VarStore {
    let mut vs = VarStore::new(device);
    vs.set_kind(kind);
    vs
}

/// Builds a model with `build` on a fresh var store of `kind` on `device`, loads `files` into it
/// (see [`load`]) and freezes it: the one way every model's weights come in.
pub fn load_files<M>(
    files: &[PathBuf],
    kind: Kind,
    device: tch::Device,
    rename: &dyn Fn(&str) -> String,
    layout: Layout,
    build: impl FnOnce(&nn::Path) -> Result<M>,
) -> Result<(M, VarStore)> {
    let mut vs = var_store(kind, device);
    let (model, mut prepacks) = crate::layers::collect(|| build(&vs.root()));
    let model = model?;
    load_packing(&mut vs, files, rename, layout, &mut prepacks)?;
    vs.freeze();
    Ok((model, vs))
}

/// [`load_files`] for the component folder `component_dir`: its `config.json` (parsed as `C`,
/// handed to `build`) and its (optionally `variant`) safetensors weights ([`weight_files`]).
pub fn load_model<C: serde::de::DeserializeOwned, M>(
    component_dir: &Path,
    variant: Option<&str>,
    kind: Kind,
    device: tch::Device,
    rename: &dyn Fn(&str) -> String,
    layout: Layout,
    build: impl FnOnce(&nn::Path, C) -> Result<M>,
) -> Result<(M, VarStore)> {
    let config: C = read_config(component_dir)?;
    let files = weight_files(component_dir, variant)?;
    load_files(&files, kind, device, rename, layout, |p| build(p, config))
}

/// Reads and parses a component's `config.json` into `T`, as Python's `json` wrote it (`NaN`,
/// `Infinity` and `-Infinity` included).
pub fn read_config<T: serde::de::DeserializeOwned>(component_dir: &Path) -> Result<T> {
    let path = component_dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    autopipe_json::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
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
