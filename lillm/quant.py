"""Int8 weights for decoding on a CPU: a quarter of the bytes to read per token.

Decoding one token multiplies a single activation row by every weight matrix, so a small model's
CPU decoding is bound by how fast the weights stream from memory: lillm-39m reads 156 MB of fp32
per token. Storing each weight as int8 with one fp32 scale per output channel (row) cuts that to
39 MB. The scale of a row is max|w| / 127, so the largest weight of each row is exact and the
rounding error of any weight is at most half a step (max|w| / 254); per-channel scales keep one
large row from costing every other row its precision (Jacob et al., 2018, "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"; weight-only int8
as in LLM.int8(), Dettmers et al., 2022, without its outlier columns).

Which kernel multiplies by the int8 matrix (`kernel`):
- "fbgemm": torch's fbgemm dynamic-quantized linear. It also rounds each call's activations to
  8 bits (one scale per call, 7 bits of range so AVX2's 16-bit pair sums cannot saturate), then
  runs an integer GEMM. The fastest on x86 CPUs without AVX-512, and the default there.
- "weight-only": torch._weight_int8pack_mm, activations stay fp32: strictly weight-only, fast
  where torch vectorizes it (AVX-512, ARM), scalar and slow on AVX2-only CPUs.
- "dequant": converts the int8 rows back to float for each call; runs anywhere (GPU too),
  saves memory but not time.
The same int8 weights and scales serve every kernel. The embedding stays fp32 (a token reads one
row of it), and so do the norms; the fp32 model stays the reference (tests bound the difference).

Why fbgemm stays although torch 2.13 deprecates quantized tensors: building its packed weight goes
through `torch._make_per_channel_quantized_tensor`, whose warning says such tensors "will be removed
in a future PyTorch release". The kernels torch keeps were measured on this project's 2-core AVX2
machine (docs/DEPLOY.md): `torch._weight_int8pack_mm` is 14-60x slower than fbgemm there (scalar
code without AVX-512), oneDNN's `torch.ops.onednn.qlinear_pointwise` (the PT2E/inductor int8
kernel) gives fbgemm's exact numbers but 2.6-9x slower at decoding's few rows, `torch._int_mm` is a
reference loop on the CPU, and torchao's int8 configs call these same kernels. So fbgemm stays
the default where torch still has it; tests/test_quant.py fails loudly the day it disappears, and
"auto" then falls back to the weight-only kernel (same weights and scales). The warning is
silenced where lillm builds the packed weight, since it would repeat on every load.

Compiled decoding (lillm.generate.StaticDecoder on the CPU): torch.compile cannot trace fbgemm's
packed weight (a TorchScript object), so inside a compiled graph the layer calls fbgemm through a
custom operator that the graph keeps as one opaque call, naming the weight by an index. With
inductor that operator is lillm/fbgemm_int8.cpp, built once per machine by torch's C++ extension
loader (inductor needs the same C++ compiler): calling fbgemm from Python costs more than the
int8 matmul of one row does. Where it cannot be built, or for other backends (tests trace with
"eager"), `lillm::fbgemm_int8_linear` does the same call from Python.
"""
from __future__ import annotations

import copy
import subprocess
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import Transformer, projection_slots

KERNELS = ("auto", "fbgemm", "weight-only", "dequant")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Projections that read the same input, stacked into one matrix for decoding (lillm/model.py's fused paths).
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale per row) with weight ~= int8 * scale[:, None]."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


# fbgemm's packed weights of the Int8Linear layers that ran inside torch.compile, by their index: the
# compiled graph names a layer's weight by this number (a TorchScript object cannot be a graph input).
FBGEMM_PACKED: list = []
_LINEAR_DYNAMIC = torch.ops.quantized.linear_dynamic.default

# The operator the compiled graph calls, defined through torch.library.Library rather than the
# torch.library.custom_op decorator: custom_op wraps every call in Python layers of its own (autograd,
# checks) that cost as much as the int8 matmul itself at one row (measured: docs/DEPLOY.md); a plain
# CPU kernel costs one Python call. The fake kernel gives the output's shape to the compiler.
_LIBRARY = torch.library.Library("lillm", "FRAGMENT")
_LIBRARY.define("fbgemm_int8_linear(Tensor rows, int packed_index, int out_features) -> Tensor")


def fbgemm_int8_linear(rows: torch.Tensor, packed_index: int, out_features: int) -> torch.Tensor:
    """(N, in) fp32 rows times the int8 weight FBGEMM_PACKED[packed_index] -> (N, out) fp32."""
    return _LINEAR_DYNAMIC(rows, FBGEMM_PACKED[packed_index], True)


_LIBRARY.impl("fbgemm_int8_linear", fbgemm_int8_linear, "CPU")


@torch.library.register_fake("lillm::fbgemm_int8_linear", lib=_LIBRARY)
def _fbgemm_int8_linear_shape(rows, packed_index, out_features):
    return rows.new_empty(rows.shape[0], out_features)


NATIVE_SOURCE = Path(__file__).with_name("fbgemm_int8.cpp")
_native_loaded: bool | None = None  # None: not tried yet in this process


def native_int8_op() -> bool:
    """Build (once per machine: torch caches it under ~/.cache/torch_extensions) and load
    lillm/fbgemm_int8.cpp, the C++ form of the compiled graph's int8 call. False, with a warning
    saying why, where it cannot be built (no C++ compiler or ninja): then Python makes the call."""
    global _native_loaded
    if _native_loaded is None:
        from torch.utils.cpp_extension import load
        try:
            load(name="lillm_fbgemm_int8", sources=[str(NATIVE_SOURCE)], is_python_module=False,
                 extra_cflags=["-O2"])
            torch.library.register_fake("lillm::fbgemm_int8_linear_native")(_fbgemm_int8_linear_shape)
            _native_loaded = True
        except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
            warnings.warn(f"lillm could not build {NATIVE_SOURCE.name} ({str(error).splitlines()[0][:200]}); "
                          "compiled int8 decoding calls fbgemm through Python instead, which is slower", stacklevel=2)
            _native_loaded = False
    return _native_loaded


def default_kernel(device: torch.device) -> str:
    if device.type != "cpu":
        return "dequant"
    return "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "weight-only"


class Int8Linear(nn.Module):
    """A bias-free linear layer y = x W^T with W as int8 rows times a per-row fp32 scale."""

    def __init__(self, weight: torch.Tensor, kernel: str = "auto"):
        super().__init__()
        self.kernel = default_kernel(weight.device) if kernel == "auto" else kernel
        if self.kernel not in KERNELS[1:]:
            raise ValueError(f"unknown int8 kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        self.out_features, self.in_features = weight.shape
        int8, scales = quantize_rows(weight)
        self.register_buffer("weight_int8", int8)
        self.register_buffer("scales", scales)
        self.packed = None
        self.compiled_call = None  # (operator, index of the packed weight) inside a compiled graph
        if self.kernel == "fbgemm":
            # fbgemm's prepacked layout, built from exactly these integers and scales. The module
            # docstring says why this deprecated constructor stays; its warning would repeat per load.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
                quantized = torch._make_per_channel_quantized_tensor(
                    int8.cpu(), scales.double().cpu(), torch.zeros(len(scales), dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(quantized, None)

    def before_compile(self, backend: str) -> None:
        """Give the packed weight an index a compiled graph can name (kept while the process lives),
        in the C++ operator's keeping when inductor compiles and it can be built, else in FBGEMM_PACKED."""
        if self.kernel != "fbgemm":
            return
        if backend == "inductor" and native_int8_op():
            if self.compiled_call is None or self.compiled_call[0] != "native":
                self.compiled_call = ("native", torch.ops.lillm.fbgemm_keep_native(self.packed))
        elif self.compiled_call is None:
            self.compiled_call = ("python", len(FBGEMM_PACKED))
            FBGEMM_PACKED.append(self.packed)

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.kernel == "fbgemm" and torch.compiler.is_compiling():
            if self.compiled_call is None:
                raise RuntimeError("Int8Linear.before_compile() must run before torch.compile traces it "
                                   "(lillm.generate.StaticDecoder does)")
            where, index = self.compiled_call
            op = torch.ops.lillm.fbgemm_int8_linear_native if where == "native" else torch.ops.lillm.fbgemm_int8_linear
            out = op(rows.float(), index, self.out_features).to(x.dtype)
        elif self.kernel == "fbgemm":
            out = _LINEAR_DYNAMIC(rows.float(), self.packed, True).to(x.dtype)
        elif self.kernel == "weight-only":
            out = torch._weight_int8pack_mm(rows.contiguous(), self.weight_int8, self.scales.to(x.dtype))
        else:
            out = F.linear(rows, self.weight_int8.to(x.dtype)) * self.scales.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


@torch.no_grad()
def quantize_int8(model: Transformer, kernel: str = "auto", head: bool = True, inplace: bool = False,
                  fuse: bool = True) -> Transformer:
    """The model with its attention/MLP projections (and, with head=True, the output head) as
    Int8Linear; for decoding, not training. A tied head gets its own int8 copy of the embedding
    (the embedding itself stays fp32). A shared MLP (InkubaLM) stays one shared module.
    fuse=True stacks q/k/v into one matrix (Attention.qkv_proj) and gate/up into another
    (MLP.gate_up_proj): one int8 matmul each instead of three and two. Every row keeps its own
    scale and fbgemm rounds a call's activations once for all its rows, so the outputs are the
    unfused layers' to the bit (tests/test_quant.py); what is saved is the per-call cost, which
    is most of an int8 matmul at decoding's one row.
    inplace=False leaves `model` as it was and returns a quantized copy."""
    if not inplace:
        original, decoder = model, model.__dict__.pop("_static_decoder", None)  # compiled graphs are not copied
        try:
            model = copy.deepcopy(original)
        finally:
            if decoder is not None:
                original._static_decoder = decoder
    model.clear_cache()
    made: dict[tuple[int, ...], Int8Linear] = {}  # a module shared by several blocks is quantized once

    def int8_of(*linears: nn.Linear) -> Int8Linear:
        key = tuple(id(linear) for linear in linears)
        if key not in made:
            made[key] = Int8Linear(torch.cat([linear.weight for linear in linears]), kernel)
        return made[key]

    for block in model.model.layers:
        for parent in (block.self_attn, block.feed_forward) if fuse else ():  # a mixture's experts stay apart
            for fused, names in FUSED.items():
                parts = [getattr(parent, name, None) for name in names]
                if all(isinstance(part, nn.Linear) for part in parts):  # not a LoRA-wrapped one
                    setattr(parent, fused, int8_of(*parts))
                    for name in names:
                        delattr(parent, name)
        for projection in PROJECTIONS:  # in a mixture of experts: every expert's (the router stays fp32)
            for parent, name in projection_slots(block, projection):
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, int8_of(getattr(parent, name)))
    if head:
        model.lm_head = int8_of(model.lm_head)
    model._static_decoder = None  # a compiled step of the fp32 model must not be reused
    return model.eval()
