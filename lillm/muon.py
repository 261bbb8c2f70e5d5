"""Muon: momentum, then the update's matrix orthogonalised (for the hidden matrices), AdamW for the rest.

An optimizer step is a choice of direction. SGD takes the (momentum-averaged) gradient G; Adam
divides each entry by its own running scale. Neither sees that a weight matrix W (out x in) is a
linear map: G's singular values are typically dominated by a few directions (a low "stable rank"),
so a step along G mostly moves W in those few directions and hardly at all in the rest.

**Muon** (Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks";
MomentUm Orthogonalized by Newton-Schulz) keeps SGD's Nesterov momentum M and replaces it with the
nearest semi-orthogonal matrix before stepping: with the SVD M = U S V^T the step is along U V^T,
every singular value set to 1. Each direction the gradient points in gets the same step size. It is
steepest descent under the spectral norm (Bernstein & Newhouse, 2024, "Old Optimizer, New Norm"):
the step that lowers the loss most while moving the layer's output by at most lr per unit input.

**Newton-Schulz instead of an SVD.** An SVD is slow on a GPU; a matrix polynomial is a few matmuls.
X -> a X + b (X X^T) X + c (X X^T)^2 X changes each singular value s into p(s) = a s + b s^3 + c s^5
and leaves the singular vectors alone. Scale G so that s <= 1 (divide by its Frobenius norm, which
is at least the largest singular value), iterate, and every s moves towards 1. The coefficients
(3.4445, -4.7750, 2.0315) of Jordan et al. make the slope at 0 large (3.4445), so five steps lift
even small singular values; the price is that p has no fixed point at 1: singular values end up in
a band around it, not on it. Measured here for the scalar map (and checked in tests/test_muon.py):
after 5 steps every singular value that was at least 0.002 of ||G||_F lies in [0.68, 1.21], and
none exceeds 1.21; smaller ones (rarely more than noise) stay between 0 and 0.68. Jordan et al.
found this does not hurt training, and it costs 5 x 3 matmuls of the small side's size. The
iteration runs in bf16 on a GPU (why a polynomial was chosen: it is stable in low precision) and
in fp32 elsewhere.

**The step size.** An orthogonal update has spectral norm 1 whatever the matrix's shape, so Muon's
lr is "how far, in spectral norm, each matrix moves". Two rules scale it by shape:
- Jordan et al. / nanochat / modded-nanogpt: times max(1, rows/cols)^0.5. The update's RMS is then
  1/sqrt(fan_in) for every shape (the muP width scaling), with lr about 0.02 whatever the width.
- Moonlight (Liu et al., 2025, "Muon is Scalable for LLM Training"): times 0.2 sqrt(max(rows, cols)),
  which makes the update's RMS 0.2, like AdamW's, so Muon can reuse AdamW's lr and weight decay.
lillm uses the first, because its defaults (lr 0.02, momentum 0.95, Nesterov, 5 steps) are the ones
nanochat and the speedrun tuned with that rule, and because it keeps lr independent of d_model.

**What Muon trains.** Only the 2-D weight matrices inside the transformer blocks (attention and
MLP projections, a mixture's experts and router). The token embedding is a lookup table, not a
linear map of its input (one row moves per token), and the output head maps to a probability
simplex: both go to AdamW, as do norms and anything 1-D (the recipe of nanochat and the speedrun;
tied embeddings share one matrix, which therefore goes to AdamW). Muon applies no weight decay here:
nanochat and the speedrun records train their Muon matrices without it, the step's size is fixed
(weights can only grow linearly with the steps taken), and AdamW's --weight-decay value would mean
something else at a Muon lr ten times larger; the AdamW groups keep lillm's decay as before.

`MuonWithAdamW` steps the two optimizers as one, so lillm.train's single loop runs it unchanged.
Its state is saved and restored by parameter name like AdamW's (see the class). Under DDP the
gradients are all-reduced before the step, so every rank computes the same update; under FSDP each
rank gathers a matrix's momentum, orthogonalises the whole matrix (the same on every rank) and keeps
its own shard of the result: simple and exact, at the cost of every rank doing every matrix's
Newton-Schulz (nanochat's DistMuon shares that work out instead).
"""
from __future__ import annotations

import torch

from .errors import FlagError

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan et al.: p(s) = a s + b s^3 + c s^5
NS_STEPS = 5


def orthogonalise(matrix: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype | None = None) -> torch.Tensor:
    """About U V^T for matrix = U S V^T, by the quintic Newton-Schulz iteration (see the module docstring).

    Computed in `dtype` (default: the matrix's), returned in the matrix's dtype."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(dtype or matrix.dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide side: X X^T is then the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # ||X||_2 <= ||X||_F = 1: singular values in [0, 1]
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(matrix.dtype)


def shape_scale(param: torch.Tensor) -> float:
    """Jordan et al.'s max(1, rows/cols)^0.5: the update's RMS becomes 1/sqrt(fan_in) for every shape."""
    return max(1.0, param.size(-2) / param.size(-1)) ** 0.5


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full matrix of an FSDP (DTensor) shard, gathered from every rank; a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _shard_like(update: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a full `update`, laid out like the FSDP parameter (no communication:
    every rank holds the same full update and cuts out its own part)."""
    if not hasattr(param, "device_mesh"):
        return update
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(update, param.device_mesh, param.placements, src_data_rank=None)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalised by Newton-Schulz, for 2-D parameters (module docstring).

    Per parameter and step: M = momentum * M + (1 - momentum) * G; the direction is
    (1 - momentum) * G + momentum * M (Nesterov) or M; W -= lr * shape_scale(W) * orthogonalise(direction).
    State: "momentum_buffer" per parameter, in the parameter's dtype.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = NS_STEPS):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
        for group in self.param_groups:
            for param in group["params"]:
                if param.dim() != 2:
                    raise ValueError(f"Muon orthogonalises matrices; got a parameter of shape {tuple(param.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                momentum = state["momentum_buffer"]
                momentum.lerp_(param.grad, 1 - group["momentum"])
                direction = param.grad.lerp(momentum, group["momentum"]) if group["nesterov"] else momentum
                ns_dtype = torch.bfloat16 if param.device.type == "cuda" else torch.float32
                update = orthogonalise(_whole(direction), group["ns_steps"], ns_dtype) * shape_scale(param)
                param.add_(_shard_like(update, param), alpha=-group["lr"])
        return loss


def muon_conflict(precision: str, peft_method: str = "none") -> str | None:
    """Why --optimizer muon cannot run with these settings, as one line with the fix; None when it can.

    bf16-true: Muon's momentum and step would need lillm.memory's stochastic rounding, which is
    written (and tested) for AdamW only. PEFT: LoRA's factors are thin (rank x in, out x rank), and
    orthogonalising each factor on its own neither orthogonalises their product nor has a tested
    step size (the shape rule gives B = out x 8 a step sqrt(out / 8) times larger); prefixes and
    adapters are not the blocks' matrices Muon was made for. Fine-tuning keeps AdamW; `full`
    trains the model's own matrices, so Muon runs."""
    if precision == "bf16-true":
        return ("--optimizer muon with --precision bf16-true: Muon has no bf16 momentum with stochastic "
                "rounding (lillm.memory does it for AdamW only); use --precision auto or bf16 with Muon, "
                "or --optimizer adamw with bf16-true")
    if peft_method not in ("none", "full"):
        return (f"--optimizer muon with --peft {peft_method}: Muon orthogonalises the blocks' full weight "
                "matrices and has no tested recipe for LoRA factors, prefixes or adapters; use --optimizer "
                "adamw (the default) with --peft, or --peft full with Muon")
    return None


def is_muon_matrix(name: str, param: torch.Tensor) -> bool:
    """Whether lillm's recipe trains this parameter with Muon: a 2-D matrix inside a transformer block.

    Embeddings, the output head (tied or not), norms and anything 1-D are AdamW's."""
    return param.dim() == 2 and name.startswith("model.layers.")


def muon_matrices(model: torch.nn.Module, precision: str) -> list[torch.nn.Parameter]:
    """The trainable parameters Muon takes (is_muon_matrix), once the settings are known to suit it."""
    conflict = muon_conflict(precision, getattr(getattr(model, "peft_config", None), "method", "none"))
    if conflict:
        raise FlagError(conflict)
    return [p for name, p in model.named_parameters() if p.requires_grad and is_muon_matrix(name, p)]


class MuonWithAdamW:
    """Muon for the hidden matrices and AdamW for everything else, stepped as one optimizer.

    What the training loop uses of an optimizer: `param_groups` (the loop sets each group's lr from
    the schedule; a Muon group carries `lr_ratio` = muon lr / AdamW lr, so one schedule drives
    both), `step()` and `zero_grad()`. It is also an iterable of its two torch optimizers, which is
    what torch.distributed.checkpoint's get/set_optimizer_state_dict accept: the state of both is
    then saved in one dict keyed by parameter name, and a resumed run continues exactly.
    """

    def __init__(self, muon: Muon, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    def __iter__(self):
        return iter((self.muon, self.adamw))

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)
