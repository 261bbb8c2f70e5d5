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
"""
from __future__ import annotations

import copy

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
        if self.kernel == "fbgemm":
            # fbgemm's prepacked layout, built from exactly these integers and scales.
            quantized = torch._make_per_channel_quantized_tensor(
                int8.cpu(), scales.double().cpu(), torch.zeros(len(scales), dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(quantized, None)

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.kernel == "fbgemm":
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
