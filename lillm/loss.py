"""The language-modelling loss, fused with the output head.

Next-token cross-entropy summed over the target positions (labels != -100), with the number of
targets: the training loop divides by the global count, which keeps gradient accumulation and
data parallelism exact (lillm/train.py).

For a small model the (tokens x vocab) logits are the largest tensor of a training step: with a
vocabulary of 8,192 and d_model 64 the head and its loss are most of the work. The plain path
writes the logits, their log-softmax and both gradients; `LinearCrossEntropy` instead takes
chunks of rows, computes their logits once, turns them in place into their gradient
(softmax - one-hot) and uses it at once for both matmul gradients, so the logits are never
stored whole (the fused linear cross-entropy of Liger Kernel, Hsu et al., 2024). It is exact:
tests compare loss and gradients with the plain path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule

from .moe import add_auxiliary_loss


class LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, labels)), ignoring labels of -100, `chunk` rows at a time.

    The (tokens x vocab) logits are the largest tensor of a small model's step, and the plain path
    writes and re-reads them several times (logits, log-softmax, their gradients). Per chunk of
    rows we compute the logits once, turn them in place into their gradient (softmax - one-hot)
    and use it at once for both matmul gradients, the idea of Liger Kernel's fused linear
    cross-entropy (Hsu et al., 2024). The gradients are made during the forward pass and only
    scaled in backward, which is exact because the loss is a plain sum.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # Under autocast the matmuls below run in bf16 like the rest of the model.
        low_precision = torch.is_autocast_enabled(hidden.device.type)
        for start in range(0, hidden.shape[0], chunk):
            rows, targets = hidden[start:start + chunk], labels[start:start + chunk]
            logits = (rows @ weight.t()).float()
            keep = targets != -100
            safe, picked = targets.clamp(min=0), torch.arange(len(targets), device=targets.device)
            log_norm = logits.logsumexp(-1)
            total += ((log_norm - logits[picked, safe]) * keep).sum()
            grad_logits = logits.sub_(log_norm[:, None]).exp_()  # softmax, in place
            grad_logits[picked, safe] -= 1
            grad_logits.mul_(keep[:, None])
            if want_hidden:
                grad_hidden[start:start + chunk] = (grad_logits @ weight.float()).to(hidden.dtype)
            if want_weight:
                if low_precision:  # a bf16 product (an in-place addmm_ would run in slow fp32)
                    grad_weight += grad_logits.t() @ rows
                else:
                    grad_weight.addmm_(grad_logits.t(), rows.float())
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_total,
                None if grad_weight is None else grad_weight * grad_total, None, None)


def default_chunk(device: torch.device) -> int:
    """Rows per chunk: small on CPUs, where a chunk's logits should stay in cache; large on GPUs,
    where each chunk is a few kernel launches and a matmul needs thousands of rows to fill the chip."""
    return 8192 if device.type == "cuda" else 256


def causal_lm_loss(model, batch: dict, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over labels != -100, and the number of such labels.

    When training a model whose lm_head weight is a plain tensor (one process or DDP; not FSDP,
    whose sharded lm_head only its own forward may gather), the loss is fused with lm_head.
    """
    base = getattr(model, "_orig_mod", model)  # torch.compile
    base = getattr(base, "module", base)  # DDP
    fused = torch.is_grad_enabled() and not isinstance(base, FSDPModule)
    out = model(batch["input_ids"], position_ids=batch.get("position_ids"),
                attention_mask=batch.get("attention_mask"), segment_ids=batch.get("segment_ids"),
                return_hidden=fused)
    labels = batch["labels"]
    if fused:
        loss = LinearCrossEntropy.apply(out.flatten(0, 1), base.lm_head.weight, labels.flatten(),
                                        chunk or default_chunk(out.device))
    else:
        loss = F.cross_entropy(out.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    n_targets = (labels != -100).sum()
    # A mixture of experts adds its load-balancing loss to the gradient (lillm/moe.py explains the scaling).
    return add_auxiliary_loss(base, loss, n_targets), n_targets
