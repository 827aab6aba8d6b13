//! The convolution and linear layers of every model: `tch`'s, plus oneDNN weight prepacking on
//! the CPU.
//!
//! libtorch's CPU `conv2d` (oneDNN) and `linear` (MKL's sgemm in fp32, oneDNN in bf16) take plain
//! weights and, for oneDNN, reorder them into its blocked layout on every call: 98 reorders per
//! SD 1.5 UNet forward. Here a layer's weight is reordered once, on the layer's first CPU call
//! (that call's input size is oneDNN's layout hint: the layout it picks depends on it), and the
//! plain weight is released: the model keeps one copy of each weight. Later calls with other
//! sizes (a joined batch, another resolution) still run, on the same packed weight, oneDNN
//! reordering it for that call only if it wants another layout for them.
//!
//! Prepacked only where it pays and keeps results: CPU, fp32 or bf16, channels-last inputs for
//! convolutions (the models that run NHWC; a prepacked convolution always answers NHWC). A
//! prepacked convolution gives libtorch's result bit for bit (same oneDNN kernel); a prepacked
//! fp32 linear runs oneDNN instead of MKL (float rounding apart). `AUTOPIPE_PREPACK` picks the
//! layers: `conv,linear` (default), `conv`, `linear`, or `0` / `none` for libtorch's plain path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

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

/// A 2-D convolution (zero padding), prepacked on its first channels-last CPU call.
#[derive(Debug)]
pub struct Conv2d {
    conv: nn::Conv2D,
    params: ConvParams,
    /// Set on the first call: the prepacked weight, or `None` to run `conv` as it is.
    packed: OnceLock<Option<Tensor>>,
}

impl Conv2d {
    /// Wraps `conv`, whose geometry is `params`.
    pub fn new(conv: nn::Conv2D, params: ConvParams) -> Self {
        Self {
            conv,
            params,
            packed: OnceLock::new(),
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

/// A linear layer, prepacked on its first CPU call.
#[derive(Debug)]
pub struct Linear {
    linear: nn::Linear,
    /// Set on the first call: the prepacked weight, or `None` to run `linear` as it is.
    packed: OnceLock<Option<Tensor>>,
}

impl Linear {
    /// Wraps `linear`.
    pub fn new(linear: nn::Linear) -> Self {
        Self {
            linear,
            packed: OnceLock::new(),
        }
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
