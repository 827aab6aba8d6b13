//! libtorch operators `tch` has no bindings for, through a small C++ shim that calls them by name
//! via libtorch's dispatcher: oneDNN's weight prepacking for convolutions
//! (`mkldnn::_reorder_convolution_weight` + `mkldnn::_convolution_pointwise`) and linear layers
//! (`mkldnn::_reorder_linear_weight` + `mkldnn::_linear_pointwise`).
//!
//! libtorch's own `conv2d` / `linear` on the CPU reorder a plain weight into oneDNN's blocked
//! layout on every call; a weight reordered once at load is used as it is. Prepacked weights are
//! opaque oneDNN tensors: only the `*_pointwise` functions here accept them.

use std::ffi::{c_char, CStr};

use tch::{TchError, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn autopipe_reorder_conv_weight(
        weight: *const C_tensor,
        padding: *const i64,
        stride: *const i64,
        dilation: *const i64,
        groups: i64,
        input_size: *const i64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn autopipe_conv_pointwise(
        input: *const C_tensor,
        weight: *const C_tensor,
        bias: *const C_tensor,
        padding: *const i64,
        stride: *const i64,
        dilation: *const i64,
        groups: i64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn autopipe_reorder_linear_weight(
        weight: *const C_tensor,
        batch_size: i64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn autopipe_linear_pointwise(
        input: *const C_tensor,
        weight: *const C_tensor,
        bias: *const C_tensor,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
}

/// Turns the shim's answer into a tensor or the C++ exception's message.
///
/// # Safety
/// `err` is null or a `malloc`ed C string the shim handed over; when it is null, `out` is a
/// tensor the shim allocated with `new`.
unsafe fn answer(err: *mut c_char, out: *mut C_tensor) -> Result<Tensor, TchError> {
    if err.is_null() {
        // SAFETY: the shim allocated `out` for us (see above).
        return Ok(unsafe { Tensor::from_ptr(out) });
    }
    // SAFETY: a NUL-terminated string from `strdup`, freed once here.
    let msg = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { libc_free(err.cast()) };
    Err(TchError::Torch(msg))
}

extern "C" {
    #[link_name = "free"]
    fn libc_free(ptr: *mut std::ffi::c_void);
}

fn ptr(t: Option<&Tensor>) -> *const C_tensor {
    t.map_or(std::ptr::null(), |t| t.as_ptr())
}

/// Convolution geometry: `[height, width]` pairs and the group count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvParams {
    /// Zero padding per side.
    pub padding: [i64; 2],
    /// Stride.
    pub stride: [i64; 2],
    /// Dilation.
    pub dilation: [i64; 2],
    /// Groups.
    pub groups: i64,
}

/// `weight` (`[out, in / groups, kh, kw]`, fp32 or bf16 on the CPU) reordered into the blocked
/// layout oneDNN's convolution picks for inputs of `input_size` (`[n, c, h, w]`; a hint only:
/// other sizes still run, reordering again if oneDNN wants another layout for them).
pub fn reorder_conv_weight(
    weight: &Tensor,
    params: &ConvParams,
    input_size: Option<[i64; 4]>,
) -> Result<Tensor, TchError> {
    let mut out = std::ptr::null_mut();
    // SAFETY: every pointer is to a live tensor or array of the length the shim reads.
    unsafe {
        let err = autopipe_reorder_conv_weight(
            weight.as_ptr(),
            params.padding.as_ptr(),
            params.stride.as_ptr(),
            params.dilation.as_ptr(),
            params.groups,
            input_size.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            &mut out,
        );
        answer(err, out)
    }
}

/// oneDNN's convolution of `input` (`[n, c, h, w]`) with `weight` (plain or from
/// [`reorder_conv_weight`]) plus `bias`; the output is channels-last.
pub fn conv_pointwise(
    input: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    params: &ConvParams,
) -> Result<Tensor, TchError> {
    let mut out = std::ptr::null_mut();
    // SAFETY: as in `reorder_conv_weight`.
    unsafe {
        let err = autopipe_conv_pointwise(
            input.as_ptr(),
            weight.as_ptr(),
            ptr(bias),
            params.padding.as_ptr(),
            params.stride.as_ptr(),
            params.dilation.as_ptr(),
            params.groups,
            &mut out,
        );
        answer(err, out)
    }
}

/// `weight` (`[out, in]`, fp32 or bf16 on the CPU) reordered into the blocked layout oneDNN's
/// inner product picks for `batch_size` rows (a hint only: any row count runs).
pub fn reorder_linear_weight(weight: &Tensor, batch_size: Option<i64>) -> Result<Tensor, TchError> {
    let mut out = std::ptr::null_mut();
    // SAFETY: as in `reorder_conv_weight`.
    unsafe {
        let err =
            autopipe_reorder_linear_weight(weight.as_ptr(), batch_size.unwrap_or(-1), &mut out);
        answer(err, out)
    }
}

/// oneDNN's inner product of `input` (`[..., in]`) with `weight` (plain or from
/// [`reorder_linear_weight`]) plus `bias`: `input @ weight.T + bias`.
pub fn linear_pointwise(
    input: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor, TchError> {
    let mut out = std::ptr::null_mut();
    // SAFETY: as in `reorder_conv_weight`.
    unsafe {
        let err = autopipe_linear_pointwise(input.as_ptr(), weight.as_ptr(), ptr(bias), &mut out);
        answer(err, out)
    }
}
