//! The convolution and linear layers of every model: `tch`'s, plus oneDNN weight prepacking on
//! the CPU.
//!
//! libtorch's CPU `conv2d` (oneDNN) and `linear` (MKL's sgemm in fp32, oneDNN in bf16) take plain
//! weights and, for oneDNN, reorder them into its blocked layout on every call: 98 reorders per
//! SD 1.5 UNet forward. Here each weight is reordered once and the plain weight is released: the
//! model keeps one copy of each weight.
//!
//! Most weights are packed while they load: [`weights::load_files`](crate::weights::load_files)
//! builds the model inside [`collect`], which records the layers that can take their weight
//! packed, and then reads each such weight from the file into a reused scratch tensor and packs it
//! from there, so the plain weight never takes memory of its own and a model's first call does no
//! packing. oneDNN picks a layout from an input size; linear layers and convolutions wider than
//! 1×1 get the same layout for every size (checked against packing with each call's real size: same
//! speed, same results bit for bit), so the load packs them for a nominal `[1, C, 64, 64]` input.
//! A 1×1 convolution's layout does depend on the input size (packed for 64×64, a 4×4 call runs 100×
//! slower), so those, and every layer loaded some other way, pack on their first CPU call, for
//! that call's size. Later calls with other sizes (a joined batch, another resolution) still run,
//! on the same packed weight, oneDNN reordering it for that call only if it wants another layout.
//!
//! Prepacked only where it pays and keeps results: CPU, fp32 or bf16, channels-last models for
//! convolutions (a prepacked convolution always answers NHWC, as libtorch's does for a
//! channels-last weight). A prepacked convolution gives libtorch's result bit for bit (same oneDNN
//! kernel); a prepacked fp32 linear runs oneDNN instead of MKL (float rounding apart).
//! `AUTOPIPE_PREPACK` picks the layers: `conv,linear` (default), `conv`, `linear`, or `0` / `none`
//! for libtorch's plain path.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use autopipe_torch_ext::ConvParams;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// Which layers `AUTOPIPE_PREPACK` lets prepack: `(conv, linear)`.
fn enabled() -> (bool, bool) {
    static ENABLED: OnceLock<(bool, bool)> = OnceLock::new();
    *ENABLED.get_or_init(|| match std::env::var("AUTOPIPE_PREPACK") {
        Err(_) => (true, true),
        Ok(v) => {
            let parts: Vec<&str> = v.split(',').map(str::trim).collect();
            (parts.contains(&"conv"), parts.contains(&"linear"))
        }
    })
}

/// Whether a weight of this kind on this device can be prepacked.
fn packable(ws: &Tensor) -> bool {
    ws.device() == Device::Cpu && matches!(ws.kind(), Kind::Float | Kind::BFloat16)
}

/// Bytes of plain weights [`release`] freed that [`take_released_bytes`] has not reported yet.
static RELEASED_BYTES: AtomicU64 = AtomicU64::new(0);

/// The bytes of plain weights that prepacking released since the last call. Each packed copy is
/// allocated before its plain weight is freed, so a process whose allocator keeps freed memory
/// (the store's: see `autopipe_store::allocator`) holds those bytes as free heap: a caller that
/// gets a nonzero answer hands them back (`malloc_trim`).
pub fn take_released_bytes() -> u64 {
    RELEASED_BYTES.swap(0, Ordering::Relaxed)
}

/// Frees a plain weight that a prepacked copy replaced: its storage is shared with the var store
/// (and any other handle), so all of them see an empty tensor of the same kind from now on.
fn release(ws: &Tensor) {
    let bytes = ws.numel() as u64 * ws.kind().elt_size_in_bytes() as u64;
    RELEASED_BYTES.fetch_add(bytes, Ordering::Relaxed);
    let empty = Tensor::empty([0], (ws.kind(), ws.device()));
    ws.shallow_clone().set_data(&empty);
}

/// A layer's prepacked weight, shared with the load that may set it: set once, by the load
/// ([`Prepacks`]) or by the layer's first call; `None` inside when the layer runs its plain path.
type Packed = Arc<PackedSlot>;

/// The cell behind [`Packed`].
#[derive(Debug, Default)]
struct PackedSlot(OnceLock<Option<Tensor>>);

// SAFETY: the tensor is set once and only read after that; libtorch tensors may be read from
// several threads at once (what every model type's own `unsafe impl Sync` relies on too).
unsafe impl Sync for PackedSlot {}

impl std::ops::Deref for PackedSlot {
    type Target = OnceLock<Option<Tensor>>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// How a weight recorded by [`collect`] is packed.
#[derive(Debug, Clone, Copy)]
enum Packing {
    /// A convolution wider than 1×1 of this geometry.
    Conv(ConvParams),
    Linear,
}

impl Packing {
    /// `plain` (the weight's values, contiguous) packed, or the reason oneDNN refused.
    fn pack(self, plain: &Tensor) -> Result<Tensor, tch::TchError> {
        match self {
            Packing::Conv(params) => {
                let channels = plain.size()[1] * params.groups;
                autopipe_torch_ext::reorder_conv_weight(
                    plain,
                    &params,
                    Some([1, channels, LOAD_HINT_SIDE, LOAD_HINT_SIDE]),
                )
            }
            Packing::Linear => autopipe_torch_ext::reorder_linear_weight(plain, None),
        }
    }
}

/// Height and width of the nominal input a convolution's weight is packed for at load.
const LOAD_HINT_SIDE: i64 = 64;

thread_local! {
    /// The layers [`collect`] is recording on this thread, by the address of their weight.
    static COLLECTING: RefCell<Option<HashMap<usize, (Packing, Packed)>>> =
        const { RefCell::new(None) };
}

/// Records `ws` as a weight a load may pack into `slot`, when a [`collect`] runs on this thread.
fn offer(ws: &Tensor, packing: Packing, slot: &Packed) {
    if ws.numel() == 0 || !packable(ws) {
        return;
    }
    COLLECTING.with_borrow_mut(|c| {
        if let Some(layers) = c {
            layers.insert(ws.data_ptr() as usize, (packing, slot.clone()));
        }
    });
}

/// The layers built inside [`collect`] whose weights a load may pack (see the module docs).
#[derive(Debug, Default)]
pub struct Prepacks(HashMap<usize, (Packing, Packed)>);

impl Prepacks {
    /// Whether the load should read `var` into a scratch tensor and hand it to [`Self::pack`]:
    /// it is a weight offered by a layer, of a kind and device that pack, and (a convolution's)
    /// `channels_last` is on.
    pub(crate) fn takes(&self, var: &Tensor, channels_last: bool) -> bool {
        match self.0.get(&(var.data_ptr() as usize)) {
            None => false,
            Some((Packing::Conv(_), _)) => enabled().0 && channels_last && packable(var),
            Some((Packing::Linear, _)) => enabled().1 && packable(var),
        }
    }

    /// Packs `plain` (the values read for `var`, contiguous, `var`'s kind) into the layer that
    /// offered `var`, then releases `var`'s own storage, which was never written. `false` when
    /// oneDNN refused: the caller then reads `var` as any other variable.
    pub(crate) fn pack(&mut self, var: &Tensor, plain: &Tensor) -> bool {
        let key = var.data_ptr() as usize;
        let Some((packing, slot)) = self.0.remove(&key) else {
            return false;
        };
        match packing.pack(plain) {
            // A layer called before its load (none is) keeps what that call set.
            Ok(packed) => {
                let set = slot.set(Some(packed)).is_ok();
                if set {
                    // Counted although never written: the load's scratch and staging memory
                    // is then handed back with it (see `take_released_bytes`).
                    release(var);
                }
                set
            }
            Err(e) => {
                tracing::debug!(error = %e, "weight not prepacked at load");
                false
            }
        }
    }
}

/// Runs `build` (which makes a model's layers), recording the layers whose weights a load may pack
/// (see [`Prepacks::pack`]). Nested calls record into their own set.
pub fn collect<T>(build: impl FnOnce() -> T) -> (T, Prepacks) {
    /// Puts back the outer recording, also when `build` unwinds.
    struct Restore(Option<HashMap<usize, (Packing, Packed)>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let outer = self.0.take();
            COLLECTING.with_borrow_mut(|c| *c = outer);
        }
    }
    let outer = COLLECTING.with_borrow_mut(|c| c.replace(HashMap::new()));
    let restore = Restore(outer);
    let out = build();
    let mine = COLLECTING.with_borrow_mut(|c| c.take()).unwrap_or_default();
    drop(restore);
    (out, Prepacks(mine))
}

/// A 2-D convolution (zero padding), prepacked at load or on its first channels-last CPU call.
#[derive(Debug)]
pub struct Conv2d {
    conv: nn::Conv2D,
    params: ConvParams,
    /// Set at load or on the first call: the prepacked weight, or `None` to run `conv` as it is.
    packed: Packed,
}

impl Conv2d {
    /// Wraps `conv`, whose geometry is `params`; inside [`collect`], a convolution wider than 1×1
    /// is offered to the load for packing.
    pub fn new(conv: nn::Conv2D, params: ConvParams) -> Self {
        let packed = Packed::default();
        let size = conv.ws.size();
        if size.len() == 4 && size[2] * size[3] > 1 {
            offer(&conv.ws, Packing::Conv(params), &packed);
        }
        Self {
            conv,
            params,
            packed,
        }
    }

    /// The prepacked weight, packing it on the first call that qualifies.
    fn packed(&self, xs: &Tensor) -> Option<&Tensor> {
        self.packed
            .get_or_init(|| {
                let ws = &self.conv.ws;
                let size = xs.size();
                // NHWC input: stride 1 along the channels.
                let nhwc = size.len() == 4 && size[1] > 1 && xs.stride()[1] == 1;
                if !(enabled().0 && packable(ws) && nhwc && ws.dim() == 4) {
                    return None;
                }
                let hint = [size[0], size[1], size[2], size[3]];
                match autopipe_torch_ext::reorder_conv_weight(ws, &self.params, Some(hint)) {
                    Ok(packed) => {
                        release(ws);
                        Some(packed)
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "convolution not prepacked");
                        None
                    }
                }
            })
            .as_ref()
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Tensor {
        match self.packed(xs) {
            Some(ws) => {
                autopipe_torch_ext::conv_pointwise(xs, ws, self.conv.bs.as_ref(), &self.params)
                    // As `Tensor::conv2d` does on a failing call: the plain weight is gone.
                    .unwrap_or_else(|e| panic!("prepacked conv2d: {e}"))
            }
            None => self.conv.forward(xs),
        }
    }
}

/// A linear layer, prepacked at load or on its first CPU call.
#[derive(Debug)]
pub struct Linear {
    linear: nn::Linear,
    /// Set at load or on the first call: the prepacked weight, or `None` to run `linear` as it is.
    packed: Packed,
}

impl Linear {
    /// Wraps `linear`; inside [`collect`], its weight is offered to the load for packing.
    pub fn new(linear: nn::Linear) -> Self {
        let packed = Packed::default();
        offer(&linear.ws, Packing::Linear, &packed);
        Self { linear, packed }
    }

    /// The dtype of the parameters.
    pub fn kind(&self) -> Kind {
        self.linear.ws.kind()
    }

    /// The prepacked weight, packing it on the first call that qualifies.
    fn packed(&self, xs: &Tensor) -> Option<&Tensor> {
        self.packed
            .get_or_init(|| {
                let ws = &self.linear.ws;
                if !(enabled().1 && packable(ws) && xs.dim() >= 2 && ws.dim() == 2) {
                    return None;
                }
                let rows = xs.numel() as i64 / ws.size()[1].max(1);
                match autopipe_torch_ext::reorder_linear_weight(ws, Some(rows)) {
                    Ok(packed) => {
                        release(ws);
                        Some(packed)
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "linear layer not prepacked");
                        None
                    }
                }
            })
            .as_ref()
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Tensor {
        match self.packed(xs) {
            Some(ws) => autopipe_torch_ext::linear_pointwise(xs, ws, self.linear.bs.as_ref())
                // As `Tensor::linear` does on a failing call: the plain weight is gone.
                .unwrap_or_else(|e| panic!("prepacked linear: {e}")),
            None => self.linear.forward(xs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights;

    fn channels_last(x: &Tensor) -> Tensor {
        weights::channels_last(x)
    }

    /// Fills every variable of `vs` with random values (what `weights::load` would write).
    fn randomize(vs: &nn::VarStore) {
        tch::no_grad(|| {
            for (_, mut v) in vs.variables() {
                let r = Tensor::randn(v.size(), (v.kind(), v.device()));
                v.copy_(&r);
            }
        });
    }

    #[test]
    fn prepacked_layers_match_plain_and_release_the_plain_weight() {
        if enabled() != (true, true) {
            return; // AUTOPIPE_PREPACK set for this run: nothing to compare.
        }
        tch::manual_seed(0);
        for kind in [Kind::Float, Kind::BFloat16] {
            let vs = weights::var_store(kind, Device::Cpu);
            let conv = weights::conv2d(vs.root() / "conv", 8, 16, 3, 1, 1);
            let lin = weights::linear(vs.root() / "lin", 16, 24, true);
            randomize(&vs);
            let (cw, cb) = (conv.conv.ws.copy(), conv.conv.bs.as_ref().map(Tensor::copy));
            let (lw, lb) = (
                lin.linear.ws.copy(),
                lin.linear.bs.as_ref().map(Tensor::copy),
            );
            let x = channels_last(&Tensor::randn([2, 8, 6, 6], (kind, Device::Cpu)));
            let want = x.conv2d(&cw, cb.as_ref(), [1], [1], [1], 1);
            let got = conv.forward(&x);
            assert!(conv.packed.get().is_some_and(Option::is_some));
            assert!(got.equal(&want), "{kind:?} conv differs from conv2d");
            // A later call of another batch size runs on the same packed weight.
            let x3 = channels_last(&Tensor::randn([3, 8, 6, 6], (kind, Device::Cpu)));
            assert!(conv
                .forward(&x3)
                .equal(&x3.conv2d(&cw, cb.as_ref(), [1], [1], [1], 1)));
            let h = Tensor::randn([2, 5, 16], (kind, Device::Cpu));
            let want = h.linear(&lw, lb.as_ref()).to_kind(Kind::Float);
            let got = lin.forward(&h).to_kind(Kind::Float);
            let scale = f64::try_from(want.abs().max()).unwrap();
            let diff = f64::try_from((&got - &want).abs().max()).unwrap();
            assert!(diff <= 1e-5 * scale, "{kind:?} linear: max |diff| {diff}");
            // One copy of each weight: the var store's plain ones are gone.
            for (name, v) in vs.variables() {
                if name.ends_with("weight") {
                    assert_eq!(v.numel(), 0, "{name} still holds its plain weight");
                    assert_eq!(v.kind(), kind);
                }
            }
        }
    }

    #[test]
    fn loading_packs_wide_convolutions_and_linears_and_the_results_stay() {
        if enabled() != (true, true) {
            return; // AUTOPIPE_PREPACK set for this run: nothing to compare.
        }
        let dir = std::env::temp_dir().join(format!("autopipe-layers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("model.safetensors");
        tch::manual_seed(1);
        let r = |dims: &[i64]| Tensor::randn(dims, (Kind::Float, Device::Cpu));
        let tensors = [
            ("wide.weight", r(&[16, 8, 3, 3])),
            ("wide.bias", r(&[16])),
            ("point.weight", r(&[16, 8, 1, 1])),
            ("point.bias", r(&[16])),
            ("lin.weight", r(&[24, 16])),
            ("lin.bias", r(&[24])),
        ];
        Tensor::write_safetensors(&tensors, &file).unwrap();
        let file_value = |name: &str, kind: Kind| {
            let t = &tensors.iter().find(|(n, _)| *n == name).unwrap().1;
            t.to_kind(kind)
        };
        for kind in [Kind::Float, Kind::BFloat16] {
            for layout in [weights::Layout::ChannelsLast, weights::Layout::Contiguous] {
                let case = format!("{kind:?} {layout:?}");
                let ((wide, point, lin), vs) = weights::load_files(
                    std::slice::from_ref(&file),
                    kind,
                    Device::Cpu,
                    &|k| k.to_string(),
                    layout,
                    |p| {
                        Ok((
                            weights::conv2d(p / "wide", 8, 16, 3, 1, 1),
                            weights::conv2d(p / "point", 8, 16, 1, 1, 0),
                            weights::linear(p / "lin", 16, 24, true),
                        ))
                    },
                )
                .unwrap();
                let vars = vs.variables();
                let channels_last = layout == weights::Layout::ChannelsLast;
                // Packed by the load, before any call, with the plain copy never kept...
                assert_eq!(
                    wide.packed.get().is_some_and(Option::is_some),
                    channels_last,
                    "{case}: wide conv packed at load"
                );
                assert_eq!(vars["wide.weight"].numel() == 0, channels_last, "{case}");
                assert!(lin.packed.get().is_some_and(Option::is_some), "{case}");
                assert_eq!(vars["lin.weight"].numel(), 0, "{case}");
                // ...except a 1×1 convolution, whose layout depends on its first call's size.
                assert!(
                    point.packed.get().is_none(),
                    "{case}: 1×1 conv packed at load"
                );
                assert_eq!(vars["point.weight"].numel(), 16 * 8, "{case}");
                // Results as libtorch's on the file's values.
                let x = channels_last_input(kind);
                for (conv, name, pad) in [(&wide, "wide", 1), (&point, "point", 0)] {
                    let want = x.conv2d(
                        &file_value(&format!("{name}.weight"), kind),
                        Some(&file_value(&format!("{name}.bias"), kind)),
                        [1],
                        [pad],
                        [1],
                        1,
                    );
                    assert!(conv.forward(&x).equal(&want), "{case}: {name} differs");
                }
                let h = Tensor::randn([2, 5, 16], (kind, Device::Cpu));
                let want = h
                    .linear(
                        &file_value("lin.weight", kind),
                        Some(&file_value("lin.bias", kind)),
                    )
                    .to_kind(Kind::Float);
                let got = lin.forward(&h).to_kind(Kind::Float);
                let scale = f64::try_from(want.abs().max()).unwrap();
                let diff = f64::try_from((&got - &want).abs().max()).unwrap();
                let tol = if kind == Kind::Float { 1e-5 } else { 1e-2 };
                assert!(diff <= tol * scale, "{case}: linear max |diff| {diff}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn channels_last_input(kind: Kind) -> Tensor {
        channels_last(&Tensor::randn([2, 8, 6, 6], (kind, Device::Cpu)))
    }

    #[test]
    fn contiguous_inputs_keep_the_plain_convolution() {
        let vs = weights::var_store(Kind::Float, Device::Cpu);
        let conv = weights::conv2d(vs.root() / "conv", 8, 16, 3, 1, 1);
        randomize(&vs);
        let x = Tensor::randn([1, 8, 6, 6], (Kind::Float, Device::Cpu));
        let want = x.conv2d(&conv.conv.ws, conv.conv.bs.as_ref(), [1], [1], [1], 1);
        assert!(conv.forward(&x).equal(&want));
        assert!(conv.packed.get().is_some_and(Option::is_none));
        assert_eq!(conv.conv.ws.numel(), 16 * 8 * 9);
    }
}
