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
custom operator (`lillm::fbgemm_int8_linear`) that the graph keeps as one opaque call.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import Transformer, projection_slots

KERNELS = ("auto", "fbgemm", "weight-only", "dequant")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale per row) with weight ~= int8 * scale[:, None]."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


# fbgemm's packed weights of the Int8Linear layers that ran inside torch.compile, by their index: the
# compiled graph names a layer's weight by this number (a TorchScript object cannot be a graph input).
FBGEMM_PACKED: list = []


@torch.library.custom_op("lillm::fbgemm_int8_linear", mutates_args=())
def fbgemm_int8_linear(rows: torch.Tensor, packed_index: int, out_features: int) -> torch.Tensor:
    """(N, in) fp32 rows times the int8 weight FBGEMM_PACKED[packed_index] -> (N, out) fp32."""
    return torch.ops.quantized.linear_dynamic(rows, FBGEMM_PACKED[packed_index], True)


@fbgemm_int8_linear.register_fake
def _fbgemm_int8_linear_shape(rows, packed_index, out_features):
    return rows.new_empty(rows.shape[0], out_features)


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
        self.packed, self.packed_index = None, None
        if self.kernel == "fbgemm":
            # fbgemm's prepacked layout, built from exactly these integers and scales. The module
            # docstring says why this deprecated constructor stays; its warning would repeat per load.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
                quantized = torch._make_per_channel_quantized_tensor(
                    int8.cpu(), scales.double().cpu(), torch.zeros(len(scales), dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(quantized, None)

    def before_compile(self) -> None:
        """Give the packed weight an index a compiled graph can name (once; kept while the process lives)."""
        if self.kernel == "fbgemm" and self.packed_index is None:
            self.packed_index = len(FBGEMM_PACKED)
            FBGEMM_PACKED.append(self.packed)

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.kernel == "fbgemm" and torch.compiler.is_compiling():
            if self.packed_index is None:
                raise RuntimeError("Int8Linear.before_compile() must run before torch.compile traces it "
                                   "(lillm.generate.StaticDecoder does)")
            out = fbgemm_int8_linear(rows.float(), self.packed_index, self.out_features).to(x.dtype)
        elif self.kernel == "fbgemm":
            out = torch.ops.quantized.linear_dynamic(rows.float(), self.packed, True).to(x.dtype)
        elif self.kernel == "weight-only":
            out = torch._weight_int8pack_mm(rows.contiguous(), self.weight_int8, self.scales.to(x.dtype))
        else:
            out = F.linear(rows, self.weight_int8.to(x.dtype)) * self.scales.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


@torch.no_grad()
def quantize_int8(model: Transformer, kernel: str = "auto", head: bool = True, inplace: bool = False) -> Transformer:
    """The model with its attention/MLP projections (and, with head=True, the output head) as
    Int8Linear; for decoding, not training. A tied head gets its own int8 copy of the embedding
    (the embedding itself stays fp32). A shared MLP (InkubaLM) stays one shared module.
    inplace=False leaves `model` as it was and returns a quantized copy."""
    if not inplace:
        original, decoder = model, model.__dict__.pop("_static_decoder", None)  # compiled graphs are not copied
        try:
            model = copy.deepcopy(original)
        finally:
            if decoder is not None:
                original._static_decoder = decoder
    model.clear_cache()
    made: dict[int, Int8Linear] = {}  # a module shared by several blocks is quantized once

    def int8_of(linear: nn.Linear) -> Int8Linear:
        if id(linear) not in made:
            made[id(linear)] = Int8Linear(linear.weight, kernel)
        return made[id(linear)]

    for block in model.model.layers:
        for projection in PROJECTIONS:  # in a mixture of experts: every expert's (the router stays fp32)
            for parent, name in projection_slots(block, projection):
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, int8_of(getattr(parent, name)))
    if head:
        model.lm_head = int8_of(model.lm_head)
    model._static_decoder = None  # a compiled step of the fp32 model must not be reused
    return model.eval()
