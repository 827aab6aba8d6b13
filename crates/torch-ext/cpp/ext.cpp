// libtorch operators that tch does not bind, called through the dispatcher: oneDNN's weight
// prepacking for convolutions and linear layers (registered in libtorch_cpu under `mkldnn::`).
// Tensors cross the boundary as tch passes them (`at::Tensor*`); a C++ exception never does:
// every entry point catches it and returns its message (malloc'ed, freed by the caller), or null.

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/Scalar.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

using at::Tensor;
using c10::IntArrayRef;

namespace {

char *message(const char *what) { return strdup(what); }

template <typename F> char *protect(F &&body) {
  try {
    body();
    return nullptr;
  } catch (const std::exception &e) {
    return message(e.what());
  } catch (...) {
    return message("unknown C++ exception");
  }
}

using ReorderConvSig = Tensor(const Tensor &, IntArrayRef, IntArrayRef, IntArrayRef, int64_t,
                              at::OptionalIntArrayRef);
using ConvSig = Tensor(const Tensor &, const Tensor &, const std::optional<Tensor> &, IntArrayRef,
                       IntArrayRef, IntArrayRef, int64_t, std::string_view,
                       c10::List<std::optional<c10::Scalar>>, std::optional<std::string_view>);
using ReorderLinearSig = Tensor(const Tensor &, std::optional<int64_t>);
using LinearSig = Tensor(const Tensor &, const Tensor &, const std::optional<Tensor> &,
                         std::string_view, c10::List<std::optional<c10::Scalar>>,
                         std::optional<std::string_view>);

// Looked up once; `findSchemaOrThrow` throws when this libtorch lacks the operator.

const c10::TypedOperatorHandle<ReorderConvSig> &reorder_conv() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("mkldnn::_reorder_convolution_weight", "")
                                 .typed<ReorderConvSig>();
  return handle;
}
const c10::TypedOperatorHandle<ConvSig> &conv() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("mkldnn::_convolution_pointwise", "")
                                 .typed<ConvSig>();
  return handle;
}
const c10::TypedOperatorHandle<ReorderLinearSig> &reorder_linear() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("mkldnn::_reorder_linear_weight", "")
                                 .typed<ReorderLinearSig>();
  return handle;
}
const c10::TypedOperatorHandle<LinearSig> &linear() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                                 .typed<LinearSig>();
  return handle;
}

std::optional<Tensor> maybe(const Tensor *t) {
  return t == nullptr ? std::nullopt : std::optional<Tensor>(*t);
}

} // namespace

extern "C" {

// `weight` ([O, I/groups, kH, kW]) in the blocked layout oneDNN's convolution wants for inputs of
// `input_size` (4 values; null: no hint), as an opaque oneDNN tensor in `*out`.
char *autopipe_reorder_conv_weight(const Tensor *weight, const int64_t *padding,
                                   const int64_t *stride, const int64_t *dilation, int64_t groups,
                                   const int64_t *input_size, Tensor **out) {
  return protect([&] {
    at::OptionalIntArrayRef hint = std::nullopt;
    if (input_size != nullptr) {
      hint = IntArrayRef(input_size, 4);
    }
    *out = new Tensor(reorder_conv().call(*weight, IntArrayRef(padding, 2), IntArrayRef(stride, 2),
                                          IntArrayRef(dilation, 2), groups, hint));
  });
}

// oneDNN's convolution of `input` with `weight` (plain or prepacked) and `bias` (may be null),
// no fused activation; the output is channels-last.
char *autopipe_conv_pointwise(const Tensor *input, const Tensor *weight, const Tensor *bias,
                              const int64_t *padding, const int64_t *stride,
                              const int64_t *dilation, int64_t groups, Tensor **out) {
  return protect([&] {
    *out = new Tensor(conv().call(*input, *weight, maybe(bias), IntArrayRef(padding, 2),
                                  IntArrayRef(stride, 2), IntArrayRef(dilation, 2), groups, "none",
                                  c10::List<std::optional<c10::Scalar>>(), std::nullopt));
  });
}

// `weight` ([out, in]) in the blocked layout oneDNN's inner product wants for `batch_size` rows
// (< 0: no hint), as an opaque oneDNN tensor in `*out`.
char *autopipe_reorder_linear_weight(const Tensor *weight, int64_t batch_size, Tensor **out) {
  return protect([&] {
    std::optional<int64_t> hint =
        batch_size < 0 ? std::nullopt : std::optional<int64_t>(batch_size);
    *out = new Tensor(reorder_linear().call(*weight, hint));
  });
}

// oneDNN's inner product of `input` ([..., in]) with `weight` (plain or prepacked) and `bias`
// (may be null), no fused activation.
char *autopipe_linear_pointwise(const Tensor *input, const Tensor *weight, const Tensor *bias,
                                Tensor **out) {
  return protect([&] {
    *out = new Tensor(linear().call(*input, *weight, maybe(bias), "none",
                                    c10::List<std::optional<c10::Scalar>>(), std::nullopt));
  });
}

} // extern "C"
