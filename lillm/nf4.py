"""4-bit NormalFloat (NF4) quantisation with double quantisation: the frozen base of QLoRA.

QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") stores the
frozen weights of a model in 4 bits and trains LoRA adapters (lillm.peft) on top. Three ideas:

1. **NF4, a code book shaped like the weights.** Trained weights are close to normally
   distributed, so the 16 code values are quantiles of N(0, 1) (each of the 16 bins holds
   about the same probability mass), rescaled to [-1, 1]. To have an exact 0 (padding and
   pruned weights stay exact) the code book is asymmetric: 8 positive quantiles taken from
   probabilities evenly spaced in [0.5, delta] and 7 negative ones from [0.5, delta] with
   one fewer step, plus 0. delta = 1 - (1/(2*15) + 1/(2*16)) / 2 is the centre of the last
   bin for 15 and 16 equal-mass bins, averaged, so the outermost quantile is finite.
   `nf4_code_book()` derives the values; `NF4_PUBLISHED` is the paper's table for checking.
2. **Blockwise absmax.** Each block of 64 consecutive weights is divided by its largest
   absolute value (its "absmax", a per-block scale) so it lies in [-1, 1], and every
   element becomes the index of the nearest code value: 4 bits, two per uint8.
3. **Double quantisation.** 64 weights share one fp32 scale: 0.5 extra bits per weight.
   The scales are themselves quantised: subtract their mean (one fp32 offset), then
   8-bit codes in blocks of 256 scales, each block with one fp32 absmax. The cost drops
   to 8/64 + 32/(64*256) = 0.127 bits per weight. (The paper uses 8-bit *floats* for this
   second level; we use linear int8 codes, whose error is simply half a step.)

Storage: 4 + 0.127 bits per weight (plus one fp32 offset per tensor) against 16 for bf16,
so about 3.9x smaller.

Error bound. With s the true block absmax, s' the double-quantised one and c the chosen
code value (|c| <= 1), the dequantised weight is s' * c and
    |w - s' c| <= |w - s c| + |s - s'| |c| <= s * g + |s - s'|,
where g = max half-gap between neighbouring code values (0.152, between -1 and -0.696)
and |s - s'| <= (absmax of the scale block) / 254 (half an int8 step), up to fp32 rounding.
`error_bound()` computes this per element; tests check it on random weights.

The weight is never materialised outside the forward and backward passes: `NF4Linear`
dequantises on the fly, and its backward dequantises again instead of keeping the
full-precision weight alive between the two passes (it needs no gradient itself).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCK_SIZE = 64          # weights per absmax scale (the paper's choice)
SCALE_BLOCK_SIZE = 256   # scales per second-level absmax (the paper's choice)
INT8_MAX = 127

# Table from the QLoRA paper (appendix E) / bitsandbytes, to check the derivation against.
NF4_PUBLISHED = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


def nf4_code_book() -> torch.Tensor:
    """The 16 NF4 values, ascending, derived from normal quantiles (float32)."""
    delta = 1 - (1 / (2 * 15) + 1 / (2 * 16)) / 2
    # linspace from delta down to 0.5; the last point (probability 0.5 = quantile 0) is the shared zero.
    positive = torch.special.ndtri(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (values / values.abs().max()).float()


CODE_BOOK = nf4_code_book()
# The two code values of every possible byte: dequantising is then one lookup per byte.
_BYTE_TO_PAIR = torch.stack([CODE_BOOK[torch.arange(256) >> 4], CODE_BOOK[torch.arange(256) & 0x0F]], dim=1)


def max_half_gap(code_book: torch.Tensor = CODE_BOOK) -> float:
    """Largest distance from a point of [-1, 1] to its nearest code value."""
    return float((code_book[1:] - code_book[:-1]).max() / 2)


@dataclass
class NF4Tensor:
    """A quantised tensor: everything needed to rebuild it, nothing else."""
    packed: torch.Tensor        # uint8 (n_padded / 2,): element 2i in the high nibble, 2i+1 in the low one
    scale_codes: torch.Tensor   # int8 (n_blocks,): block absmax - offset, in units of its block's step
    scale_absmax: torch.Tensor  # float32 (n_scale_blocks,): absmax of each block of 256 centred scales
    scale_offset: torch.Tensor  # float32 (): the mean of the block absmaxes
    shape: tuple[int, ...]
    block_size: int = BLOCK_SIZE
    scale_block_size: int = SCALE_BLOCK_SIZE

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.packed, self.scale_codes, self.scale_absmax, self.scale_offset))


def _pad_to_multiple(flat: torch.Tensor, multiple: int, value: float = 0.0) -> torch.Tensor:
    pad = (-flat.numel()) % multiple
    return F.pad(flat, (0, pad), value=value) if pad else flat


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 16), even length -> half as many bytes (first of each pair high)."""
    pairs = codes.to(torch.uint8).view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).flatten()


def quantize_scales(scales: torch.Tensor, block_size: int = SCALE_BLOCK_SIZE):
    """Double quantisation: (int8 codes, fp32 absmax per block, fp32 offset) of fp32 scales."""
    offset = scales.mean()
    centred = _pad_to_multiple(scales - offset, block_size).view(-1, block_size)
    absmax = centred.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round(centred / absmax[:, None] * INT8_MAX).to(torch.int8)
    return codes.flatten()[:scales.numel()], absmax, offset  # padding codes are not stored


def dequantize_scales(codes: torch.Tensor, absmax: torch.Tensor, offset: torch.Tensor, n_scales: int,
                      block_size: int = SCALE_BLOCK_SIZE) -> torch.Tensor:
    centred = _pad_to_multiple(codes.float(), block_size).view(-1, block_size) * (absmax[:, None] / INT8_MAX)
    return centred.flatten()[:n_scales] + offset


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor, block_size: int = BLOCK_SIZE,
                 scale_block_size: int = SCALE_BLOCK_SIZE) -> NF4Tensor:
    """Quantise any float tensor to NF4 with blockwise absmax and double-quantised scales."""
    if block_size % 2:
        raise ValueError(f"block_size={block_size} must be even: two 4-bit codes share one byte")
    if not weight.is_floating_point():
        raise ValueError(f"quantize_nf4 needs a floating-point tensor, got {weight.dtype}")
    flat = _pad_to_multiple(weight.detach().float().flatten(), block_size)
    blocks = flat.view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    normalised = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    code_book = CODE_BOOK.to(weight.device)
    # Nearest code value = the number of bin edges (midpoints between codes) below the value.
    codes = torch.bucketize(normalised, (code_book[1:] + code_book[:-1]) / 2)
    scale_codes, scale_absmax, scale_offset = quantize_scales(absmax, scale_block_size)
    return NF4Tensor(pack_nibbles(codes.flatten()), scale_codes, scale_absmax, scale_offset, tuple(weight.shape),
                     block_size, scale_block_size)


def block_scales(q: NF4Tensor) -> torch.Tensor:
    """The double-quantised absmax of each 64-weight block, as fp32."""
    n_blocks = q.packed.numel() * 2 // q.block_size
    return dequantize_scales(q.scale_codes, q.scale_absmax, q.scale_offset, n_blocks, q.scale_block_size)


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    values = _BYTE_TO_PAIR.to(q.packed.device)[q.packed.long()].view(-1, q.block_size) * block_scales(q)[:, None]
    return values.flatten()[:q.numel].view(q.shape).to(dtype)


def error_bound(weight: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """Per-element bound on |w - dequantize(q)|: s * g + |s - s'| (see the module docstring)."""
    flat = _pad_to_multiple(weight.detach().float().flatten(), q.block_size).view(-1, q.block_size)
    true_scale = flat.abs().amax(dim=1)
    per_block = true_scale * max_half_gap() + (true_scale - block_scales(q)).abs()
    # fp32 rounding of the products adds a few ulps of the scale
    per_block = per_block + 4 * torch.finfo(torch.float32).eps * true_scale
    return per_block[:, None].expand_as(flat).flatten()[:q.numel].view(q.shape)


# ----------------------------------------------------------------------------- the layer

class _NF4Matmul(torch.autograd.Function):
    """y = x W^T with W dequantised in forward and again in backward, never stored between them."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        weight = ctx.layer.dequantized_weight(grad_out.dtype)
        return grad_out @ weight, None


class NF4Linear(nn.Module):
    """A frozen bias-free linear layer stored in NF4 and dequantised on the fly.

    The quantised pieces are buffers (they travel with .to() and state_dict, and no optimizer
    ever sees them). The weight is rebuilt in the input's dtype, so bf16 autocast gives bf16 matmuls.
    """

    def __init__(self, q: NF4Tensor):
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight (out, in), got shape {q.shape}")
        self.out_features, self.in_features = q.shape
        self.block_size, self.scale_block_size = q.block_size, q.scale_block_size
        self.register_buffer("weight_packed", q.packed)
        self.register_buffer("weight_scale_codes", q.scale_codes)
        self.register_buffer("weight_scale_absmax", q.scale_absmax)
        self.register_buffer("weight_scale_offset", q.scale_offset)

    def _apply(self, fn, recurse=True):
        # .to(torch.bfloat16) would round the fp32 scale constants and break the error bound: keep them fp32.
        absmax, offset = self.weight_scale_absmax, self.weight_scale_offset
        super()._apply(fn, recurse)  # may move and cast: take the new device, keep the old values
        self.weight_scale_absmax = absmax.to(self.weight_scale_absmax.device)
        self.weight_scale_offset = offset.to(self.weight_scale_offset.device)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = BLOCK_SIZE,
                    scale_block_size: int = SCALE_BLOCK_SIZE) -> "NF4Linear":
        if linear.bias is not None:
            raise ValueError("NF4Linear quantises bias-free projections (lillm's linears have no bias)")
        return cls(quantize_nf4(linear.weight, block_size, scale_block_size))

    @property
    def quantized(self) -> NF4Tensor:
        return NF4Tensor(self.weight_packed, self.weight_scale_codes, self.weight_scale_absmax,
                         self.weight_scale_offset, (self.out_features, self.in_features),
                         self.block_size, self.scale_block_size)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf4(self.quantized, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return _NF4Matmul.apply(x, self)

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain nn.Linear holding the dequantised weight (for merging LoRA or export)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device=self.weight_packed.device,
                           dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantized_weight(dtype))
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 block={self.block_size}"
