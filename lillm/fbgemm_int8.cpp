// The int8 matmul of a compiled decoding step, called from C++ (lillm/quant.py builds and loads this
// file with torch.utils.cpp_extension the first time a CPU step is compiled with inductor).
//
// Why C++: fbgemm's packed weight is a TorchScript object, which torch.compile cannot hold, so the
// compiled graph names each weight by an index and calls an operator with (rows, index). Written in
// Python, that operator costs three Python crossings per matmul (the graph's call into the
// dispatcher, the dispatcher's call back into Python, and Python's call of quantized::linear_dynamic
// with a TorchScript argument, whose conversion alone costs about twice the int8 matmul of one
// row). Here the weights live in a C++ vector and the call goes straight through the dispatcher:
// the same kernel, the same numbers, without Python in between (measured: docs/DEPLOY.md).

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

namespace {

std::mutex weights_mutex;

// Every packed weight handed over by fbgemm_keep_native, for the life of the process: a compiled
// graph holds their indices.
std::vector<c10::IValue>& packed_weights() {
  static std::vector<c10::IValue> weights;
  return weights;
}

int64_t fbgemm_keep_native(const c10::IValue& packed) {
  std::lock_guard<std::mutex> guard(weights_mutex);
  packed_weights().push_back(packed);
  return static_cast<int64_t>(packed_weights().size()) - 1;
}

// (N, in) fp32 rows times the packed int8 weight number packed_index -> (N, out) fp32: fbgemm's
// dynamic-quantized linear, exactly what lillm.quant.Int8Linear computes eagerly.
at::Tensor fbgemm_int8_linear_native(const at::Tensor& rows, int64_t packed_index, int64_t out_features) {
  static const auto linear_dynamic =
      c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_dynamic", "");
  c10::IValue packed;
  {
    std::lock_guard<std::mutex> guard(weights_mutex);
    packed = packed_weights().at(packed_index);
  }
  torch::jit::Stack stack{rows, packed, /*reduce_range=*/true};
  linear_dynamic.callBoxed(&stack);
  return stack[0].toTensor();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lillm, m) {
  m.def("fbgemm_keep_native(Any packed) -> int", &fbgemm_keep_native);
  m.def("fbgemm_int8_linear_native(Tensor rows, int packed_index, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(lillm, CPU, m) {
  m.impl("fbgemm_int8_linear_native", &fbgemm_int8_linear_native);
}
