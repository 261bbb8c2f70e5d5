"""Fitting a bigger model on a small GPU: activation checkpointing and pure-bf16 training.

A training step holds four things: the weights, their gradients, the optimizer state (AdamW:
two moments per weight) and the activations the backward pass needs. With bf16 autocast over
fp32 weights (lillm's default on a GPU) the first three cost 4 + 4 + 8 = 16 bytes per trained
parameter, and the activations grow with batch x sequence x layers. Two levers here:

**Activation checkpointing** (Chen et al., 2016, "Training Deep Nets with Sublinear Memory
Cost"; Griewank & Walther's "checkpointing" from automatic differentiation). Each transformer
block keeps only its input for the backward pass; when the backward pass reaches the block, it
runs the block's forward again to rebuild what it needs. Activation memory drops from about
(tensors per block) x layers to (one block's input) x layers + one block's tensors, for one
extra forward pass (about a third more compute). It is exact: the recomputation runs the same
operations on the same inputs (and `torch.utils.checkpoint` restores the RNG state, so dropout
masks repeat), so losses and gradients equal those of the plain run. `checkpoint_blocks` turns
it on per block without renaming a single parameter (checkpoints, LoRA and FSDP see the same
model); under FSDP the block's all-gather hooks stay outside the checkpointed function, so the
recomputation finds the block's parameters already gathered by FSDP's pre-backward hook.

**Pure bf16** (`--precision bf16-true`): weights, gradients and both AdamW moments in bf16,
2 + 2 + 4 = 8 bytes per trained parameter instead of 16. The price is precision: bf16 keeps 8
significant bits, so a weight w can only move in steps of about |w| / 256. An AdamW update of
lr = 3e-4 on a weight of 0.02 is 1.5% of its value, visible; at lr = 1e-5 (a late cosine phase,
or fine-tuning) it is 0.05%, far below half a step, and round-to-nearest would throw every such
update away: training silently stops. The usual cures:
- an fp32 "master" copy of the weights that the optimizer updates (what autocast training
  has anyway): exact, but 4 more bytes per parameter, which is what we set out to save;
- Kahan-compensated summation (a bf16 buffer holding what each rounding lost): 2 more bytes;
- stochastic rounding (Gupta et al., 2015, "Deep Learning with Limited Numerical Precision";
  Zamirai et al., 2020, "Revisiting BFloat16 Training"): round up with probability equal to
  the fraction of the step the value has passed, so the rounding is unbiased and small updates
  survive on average. No extra memory.
`BF16AdamW` does the AdamW arithmetic in fp32 (each tensor is upcast for its update only) and
writes the new weights and both moments back with stochastic rounding. The random bits come
from a generator seeded by (seed, step, parameter index), not from the global RNG: replicas
under DDP round identically, and a resumed run rounds exactly as an uninterrupted one.

What stays fp32 under bf16-true (the model and loss already do this, whatever the weights'
dtype): RMSNorm's mean of squares and rsqrt (lillm.model.RMSNorm upcasts), the rotary tables
and rotation (apply_rotary), the softmax statistics inside SDPA (its kernels accumulate in
fp32), and the loss (LinearCrossEntropy takes the logsumexp in fp32, and builds lm_head's
gradient in an fp32 buffer before rounding it once). What is not: gradients are accumulated in
bf16 across micro batches (one rounding per micro batch), and the gradient-norm for clipping is
taken over bf16 gradients.

**What fits** (`estimate_training_memory`): the bytes of one training step by part and its peak,
counted tensor by tensor for lillm's block and checked against measurements (bench/memory.py),
so the largest model, batch and precision a GPU holds can be chosen before a run.
"""
from __future__ import annotations

import types
from contextlib import nullcontext

import torch
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig

# The one vocabulary of precision (--precision, TrainConfig.precision, the memory estimate).
PRECISIONS = ("auto", "bf16", "fp32", "bf16-true")
PRECISION_HELP = ("auto: bf16 autocast on CUDA, fp32 on CPU; bf16: autocast over fp32 weights; bf16-true: weights, "
                  "gradients and AdamW moments in bf16, stochastic rounding (half the memory)")


# ---- precision ---------------------------------------------------------------------------------
def resolve_precision(precision: str, device) -> str:
    """What a precision means on a device: auto is bf16 autocast on CUDA and fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast_for(precision: str, device):
    """The context the forward passes of a run in this precision go under: bf16 autocast over fp32
    weights for bf16, nothing for fp32 or bf16-true (whose weights are bf16 themselves)."""
    if resolve_precision(precision, device) != "bf16":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


# ---- activation checkpointing ------------------------------------------------------------
def _checkpointed_forward(block: torch.nn.Module, *args, **kwargs):
    """The block's own forward, under torch.utils.checkpoint when a backward pass may follow."""
    plain = type(block).forward.__get__(block)  # the class's forward (FSDP's subclass inherits it)
    if not torch.is_grad_enabled():  # evaluation and generation: nothing to save, nothing to recompute
        return plain(*args, **kwargs)
    return checkpoint(plain, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """Recompute every transformer block in the backward pass instead of storing its activations.

    Sets each block's `forward` (on the instance, as a bound method so deepcopy follows it) to
    one that runs the class's forward under `torch.utils.checkpoint` (non-reentrant: it works
    with inputs that need no gradient and with FSDP). Parameter names do not change. Call it
    before FSDP's fully_shard, so its hooks wrap the checkpointed forward. Returns the model.
    """
    for block in model.model.layers:
        block.forward = types.MethodType(_checkpointed_forward, block)
    return model


def blocks_checkpointed(model: torch.nn.Module) -> bool:
    return all(getattr(b.forward, "__func__", None) is _checkpointed_forward for b in model.model.layers)


# ---- stochastic rounding and bf16 AdamW ------------------------------------------------------
def stochastic_round_(target: torch.Tensor, value: torch.Tensor, generator: torch.Generator) -> None:
    """Write fp32 `value` into bf16 `target`, rounding up or down at random, unbiased.

    A bf16 number is an fp32 number with the low 16 bits of its pattern zero. Adding a uniform
    random integer in [0, 2^16) to the fp32 bit pattern and clearing the low 16 bits rounds the
    magnitude up with probability (dropped bits) / 2^16, down otherwise: E[result] = value.
    (Sign and magnitude are separate in IEEE floats, so this works for negative values too.)
    """
    bits = value.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    rounded = ((bits + noise) & -65536).view(torch.float32)  # -65536 = 0xFFFF0000
    target.copy_(rounded)  # exact: the low bits are zero


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP (DTensor) parameter, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter, 2019) for bf16 weights with bf16 moments and stochastic rounding.

    Each step, per parameter: upcast the weight, gradient and moments to fp32, do the usual
    AdamW update (decoupled weight decay, bias-corrected moments), then round the weight and
    moments back to bf16 stochastically (see the module docstring for why). fp32 weights are
    updated in fp32 and stored as they are, so the optimizer also works (and equals AdamW up to
    rounding) on an fp32 model. The state per parameter is "step" (a float tensor, as torch's
    AdamW keeps it), "exp_avg" and "exp_avg_sq" in the weight's dtype.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed

    def _generator(self, device: torch.device, step: int, index: int) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed((self.seed * 1_000_003 + step) * 1_000_003 + index)
        return generator

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        index = -1
        for group in self.param_groups:
            for param in group["params"]:
                index += 1  # counts every parameter, so a parameter's seed does not depend on which have grads
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                step = int(state["step"].item())
                weight, grad = _local(param), _local(param.grad)
                exp_avg, exp_avg_sq = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
                generator = self._generator(weight.device, step, index) if weight.dtype == torch.bfloat16 else None
                # In slices, so the fp32 copies of an embedding matrix never exist whole at once.
                for piece in _slices(weight, grad, exp_avg, exp_avg_sq):
                    self._update(*piece, group, step, generator)
        return loss

    @staticmethod
    def _update(weight, grad, exp_avg, exp_avg_sq, group: dict, step: int, generator) -> None:
        beta1, beta2 = group["betas"]
        grad = grad.float()
        m = exp_avg.float().lerp_(grad, 1 - beta1)
        v = exp_avg_sq.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        w = weight.float().mul_(1 - group["lr"] * group["weight_decay"])
        denominator = (v / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
        w.addcdiv_(m, denominator, value=-group["lr"] / (1 - beta1 ** step))
        for target, value in ((weight, w), (exp_avg, m), (exp_avg_sq, v)):
            if target.dtype == torch.bfloat16:
                stochastic_round_(target, value, generator)
            else:
                target.copy_(value)


SLICE = 1 << 22  # elements updated at once: 16 MB per fp32 temporary


def _slices(*tensors: torch.Tensor):
    """Matching flat slices of equally shaped contiguous tensors (views: writes reach the tensors)."""
    flat = [t.view(-1) for t in tensors]
    for start in range(0, flat[0].numel(), SLICE):
        yield [t[start:start + SLICE] for t in flat]


# ---- what a training step holds: the estimate -----------------------------------------------------
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, int8 block scales, fp32 scale absmax (lillm.nf4)


def _lora_shapes(cfg: ModelConfig, targets) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection kind, by lillm.peft's short names."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"q": (cfg.d_model, q), "k": (cfg.d_model, kv), "v": (cfg.d_model, kv), "o": (q, cfg.d_model),
              "gate": (cfg.d_model, cfg.d_ff), "up": (cfg.d_model, cfg.d_ff), "down": (cfg.d_ff, cfg.d_model)}
    return {t: shapes[t] for t in targets}


def estimate_training_memory(cfg: ModelConfig, batch: int, seq_len: int, precision: str = "fp32",
                             activation_checkpointing: bool = False, peft: str = "none", lora_rank: int = 8,
                             lora_targets=("q", "v"), device: str = "cuda") -> dict[str, int]:
    """Bytes of one training step of lillm.train on one device (no sharding), by part, and the peak.

    weights: parameters (+ NF4 buffers for QLoRA); gradients: one per trained parameter;
    optimizer: AdamW's two moments (fp32, or bf16 under bf16-true); activations: what autograd
    keeps for the backward pass, counted tensor by tensor for lillm's block (measured with
    saved-tensor hooks: 3 d-wide tensors per RMSNorm, q, k, v and the attention output, 4 d_ff-wide
    tensors in the SwiGLU MLP; under LoRA the frozen projections keep less), plus the fused loss's
    head-gradient buffer and, under autocast, the bf16 copies of the weights it makes. `precision`
    is --precision's (PRECISIONS): auto is bf16 autocast on cuda and fp32 on a CPU, as in training.
    peak = weights + optimizer + the largest of (activations + the loss's scratch at the end of the
    forward pass), (activations + the head's gradient as backward starts) and (all gradients +
    the optimizer's scratch): memory falls from the first to the last as backward frees
    activations and makes gradients. Allocator slack and fragmentation are not modelled.
    """
    precision = resolve_precision(precision, device)
    if peft not in ("none", "full", "lora", "qlora"):
        raise ValueError(f"peft {peft!r}: the estimate knows none (= full), lora and qlora")
    targets = list(_lora_shapes(cfg, ["q", "k", "v", "o", "gate", "up", "down"])) if lora_targets == "all" \
        else list(lora_targets)
    lora = peft in ("lora", "qlora")
    d, hd, L, V, N = cfg.d_model, cfg.head_dim, cfg.n_layers, cfg.vocab_size, batch * seq_len
    q_width, kv_width = cfg.n_heads * hd, cfg.n_kv_heads * hd
    counts = cfg.param_counts()
    projections = counts["attention"] + counts["mlp"]
    mlp_copies = 1 if cfg.shared_mlp else L  # a shared MLP has one LoRA per target
    lora_params = sum(rank_in + rank_out for kind, (rank_in, rank_out) in _lora_shapes(cfg, targets).items()
                      for _ in range(mlp_copies if kind in ("gate", "up", "down") else L)) * lora_rank
    wb = 2 if precision == "bf16-true" else 4        # bytes per weight, gradient and optimizer moment
    ab = 4 if precision == "fp32" else 2             # bytes per element of a matmul's activations

    # -- weights, gradients, optimizer
    if peft == "qlora":
        weights = (counts["total"] - projections) * wb + projections * NF4_BYTES_PER_WEIGHT + lora_params * wb
    else:
        weights = (counts["total"] + (lora_params if lora else 0)) * wb
    trained = lora_params if lora else counts["total"]
    gradients, optimizer = trained * wb, 2 * trained * wb
    largest = max(V * d, d * cfg.d_ff) if not lora else max(lora_rank * max(d, cfg.d_ff), 1)
    if precision == "bf16-true":  # BF16AdamW: fp32 copies of one slice (lillm.memory.SLICE) at a time
        optimizer_scratch = 8 * 4 * min(largest, 1 << 22)
    elif device == "cuda":        # fused AdamW works in place
        optimizer_scratch = 0
    else:                         # single-tensor AdamW: sqrt(v) and its quotient, for one tensor at a time
        optimizer_scratch = 2 * 4 * largest

    # -- activations per block, per token (bytes); each term was checked with saved-tensor hooks
    trains = {kind: (not lora) or kind in targets for kind in ("q", "k", "v", "o", "gate", "up", "down")}
    residual = 2 if precision == "bf16-true" else 4   # the residual stream's dtype (fp32 under autocast)
    block = 0
    for fed in (("q", "k", "v"), ("gate", "up")):     # the two RMSNorms and the projections they feed
        block += 4 * d                                # the norm's input, upcast to fp32 for its statistics
        block += 0 if lora else residual * d          # its pre-weight value, kept when the norm's weight trains
        if precision == "bf16":                       # every trained projection keeps its own bf16 cast
            block += sum(2 * d for kind in fed if trains[kind])
        elif any(trains[kind] for kind in fed):
            block += ab * d                           # the norm's output, for the projections' weight gradients
    block += ab * (2 * q_width + 2 * kv_width) + 4 * cfg.n_heads + 8   # q, k, v, attention output; logsumexp; rsqrt
    block += ab * cfg.d_ff * (4 if trains["down"] else 3)               # gate, silu(gate), up (and their product)
    block += ab * lora_rank * len(targets) if lora else 0                # A x of each LoRA
    # Checkpointing: each block keeps only its input; one block's tensors come back at a time in backward.
    blocks = L * N * residual * d if activation_checkpointing else L * N * block
    recomputed = N * block if activation_checkpointing else 0

    # -- the head, the fused loss (lillm.loss.LinearCrossEntropy), autocast's weight copies
    head_trains = not lora
    hidden = 4 if precision == "bf16" else wb         # the final hidden states' dtype
    rows = min(N, 8192 if device == "cuda" else 256)  # lillm.loss.default_chunk
    tail = N * d * (4 + (residual if head_trains else 0)) + N * d * hidden  # final norm; gradient of the hidden states
    head_gradient = V * d * wb if head_trains else 0  # made in the forward pass, kept for backward
    weight_copies = 2 * (projections + V * d) if precision == "bf16" else 0
    saved = blocks + tail + head_gradient + weight_copies  # what the forward pass leaves for backward
    loss_scratch = rows * V * 4 * 2                   # one chunk's logits and their softmax
    if precision == "bf16-true":                      # fp32 copies of the head: its weight, its gradient buffer
        loss_scratch += V * d * 4 * (2 if head_trains else 1)
    nf4_scratch = 10 * max(d * cfg.d_ff, d * q_width) if peft == "qlora" else 0  # one projection dequantised
    end_of_backward = gradients + (V * d * wb if head_trains and cfg.tie_embeddings else 0)  # the embedding's own
    peak = weights + optimizer + max(saved + max(loss_scratch, nf4_scratch),
                                     saved + head_gradient + N * d * hidden,  # backward starts
                                     saved + recomputed,                      # a checkpointed block rebuilt
                                     end_of_backward, gradients + optimizer_scratch)
    return {"weights": int(weights), "gradients": int(gradients), "optimizer": int(optimizer),
            "activations": int(saved + recomputed), "peak": int(peak), "trained_params": int(trained)}
