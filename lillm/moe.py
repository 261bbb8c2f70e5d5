"""Mixture of experts: a sparse SwiGLU layer that buys parameters without buying FLOPs.

A dense MLP runs every weight for every token. A mixture-of-experts layer (Shazeer et al., 2017,
"Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer") holds E
expert MLPs and a small linear *router* that picks, for each token, the k experts that process
it. Parameters (knowledge) grow with E, FLOPs per token only with k: the trade a small team
with one GPU wants. The pieces, as Mixtral has them (Jiang et al., 2024, "Mixtral of Experts"):

- router: logits = x @ gate.T (E per token), probabilities = softmax(logits), keep the top k,
  and renormalise those k weights to sum to 1 (Mixtral's order: softmax, then top-k);
- experts: E SwiGLU MLPs, w2(silu(w1(x)) * w3(x)), named w1/w2/w3 as Mixtral's checkpoints are;
- output: the weighted sum of the k chosen experts' outputs.

Dispatch is capacity-free and exact: the Switch Transformer (Fedus et al., 2021) gives each
expert a fixed capacity and drops the tokens that overflow it, which makes shapes static but
makes a token's output depend on the rest of the batch. Here every (token, choice) pair is
sorted by expert, each expert runs one matmul on exactly its rows, and the results are
scatter-added back (the "dropless" MoE of MegaBlocks, Gale et al., 2022). A token's output
depends on that token only, so KV-cache decoding equals the full forward pass.

A router left alone collapses onto a few experts (the rich get richer). The auxiliary
load-balancing loss (Switch Transformer, eq. 4-6; Mixtral uses the same) pushes back:

    balance = E * sum_e f_e * P_e

with f_e the fraction of tokens that chose expert e (among their k choices, so sum_e f_e = k)
and P_e the mean router probability of e. f_e is a count (no gradient); P_e carries the gradient,
and the product is smallest when routing is uniform: then f_e = k/E, P_e = 1/E and balance = k.
The router z-loss (Zoph et al., 2022, "ST-MoE") is the mean squared logsumexp of the router
logits: it keeps the logits small, which keeps the softmax stable in bf16.

Both are computed per layer on the tokens of one forward pass (one micro batch), averaged over
layers and added to the training loss with the coefficients router_aux_coef and router_z_coef
(see `add_auxiliary_loss` for how that keeps gradient accumulation and DDP exact).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class Expert(nn.Module):
    """One SwiGLU MLP with Mixtral's names: w1 = gate, w3 = up, w2 = down."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def route(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probabilities over all experts, weights of the k chosen renormalised to sum to 1, their ids).

    The softmax runs in fp32 (the router's small differences decide which experts run)."""
    probs = router_logits.float().softmax(dim=-1)
    top_probs, chosen = probs.topk(k, dim=-1)
    return probs, top_probs / top_probs.sum(dim=-1, keepdim=True), chosen


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e * P_e over the tokens given: probs (N, E), chosen (N, k). Equals k when uniform."""
    n_tokens, n_experts = probs.shape
    picks = torch.bincount(chosen.flatten(), minlength=n_experts).to(probs.dtype)
    return n_experts * ((picks / n_tokens) * probs.mean(dim=0)).sum()


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of logsumexp(logits)^2 (ST-MoE)."""
    return torch.logsumexp(router_logits.float(), dim=-1).square().mean()


class SparseMoE(nn.Module):
    """Router + E experts; stands where the MLP stands in a block (Mixtral's `block_sparse_moe`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.experts_per_token
        self.gate = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)  # the router
        self.experts = nn.ModuleList(Expert(cfg.d_model, cfg.d_ff) for _ in range(cfg.n_experts))
        # The auxiliary losses of the last forward pass that built a graph (None after a no-grad one).
        self.balance_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        """A copy (copy.deepcopy, pickle) leaves out the last forward's auxiliary losses: they belong to
        that forward's autograd graph, which torch cannot copy (quantize_int8 copies a model)."""
        return {**super().__getstate__(), "balance_loss": None, "z_loss": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        probs, weights, chosen = route(logits, self.top_k)
        training = torch.is_grad_enabled()
        self.balance_loss = load_balancing_loss(probs, chosen) if training else None
        self.z_loss = router_z_loss(logits) if training else None
        if torch.compiler.is_compiling() and not training:
            out = self._every_expert(x, weights, chosen)
        else:
            out = self._dispatch(x, weights, chosen)
        return out.view(shape)

    def _dispatch(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Sort the N*k (token, choice) pairs by expert, one matmul chain per expert on its rows,
        scale each row by its routing weight and add it back to its token."""
        flat = chosen.flatten()
        order = flat.argsort(stable=True)           # pairs grouped by expert, tokens in order within one
        token = order // self.top_k                 # the token of each sorted pair
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()  # one host read per layer
        # An expert with no rows still runs (on 0 rows): every parameter stays in the graph, as DDP needs.
        outputs = [expert(rows) for expert, rows in zip(self.experts, x[token].split(counts))]
        weighted = torch.cat(outputs) * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, token, weighted.to(x.dtype))

    def _every_expert(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, weighted 0 where not chosen: fixed shapes and no host read, for
        compiled decoding (CUDA graphs), where the few tokens of a step reach most experts anyway."""
        combine = torch.zeros(x.shape[0], self.n_experts, dtype=weights.dtype, device=x.device)
        combine.scatter_(1, chosen, weights)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + (expert(x) * combine[:, e:e + 1]).to(x.dtype)
        return out


# ---- the auxiliary losses in the training objective ----------------------------------------
def moe_layers(model: nn.Module) -> list[SparseMoE]:
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """router_aux_coef * mean balance loss + router_z_coef * mean z-loss over the MoE layers, from
    the last forward pass; None for a dense model or after a no-grad forward."""
    layers = [m for m in moe_layers(model) if m.balance_loss is not None]
    if not layers:
        return None
    cfg = model.config
    balance = torch.stack([m.balance_loss for m in layers]).mean()
    total = cfg.router_aux_coef * balance
    if cfg.router_z_coef:
        total = total + cfg.router_z_coef * torch.stack([m.z_loss for m in layers]).mean()
    return total


def add_auxiliary_loss(model: nn.Module, loss_sum: torch.Tensor, n_targets: torch.Tensor) -> torch.Tensor:
    """The summed LM loss of one micro batch, with the gradient of aux * n_targets added and its value unchanged.

    The loop divides every micro batch's summed loss by the global number of targets N, so adding
    aux_m * n_m (n_m: this micro batch's targets) makes the step's objective

        sum_m (CE_m + aux_m * n_m) / N  =  mean CE  +  sum_m (n_m / N) * aux_m,

    the target-weighted mean of the micro batches' auxiliary losses: the same gradient however the
    micro batches are spread over accumulation steps and DDP processes, as for the cross-entropy.
    (x - x.detach()) is 0 in value and x in gradient, so the returned loss still *reads* as the LM
    cross-entropy: logged train loss stays comparable with val loss and with a dense model, and
    the auxiliary losses are logged on their own (`router_metrics`).
    """
    aux = auxiliary_loss(model)
    if aux is None:
        return loss_sum
    scaled = aux * n_targets
    return loss_sum + (scaled - scaled.detach())


def router_metrics(model: nn.Module) -> dict:
    """The last forward's balance and z losses (means over layers) for the training log; {} if dense."""
    layers = [m for m in moe_layers(model) if m.balance_loss is not None]
    if not layers:
        return {}
    return {"moe_balance": round(sum(m.balance_loss.item() for m in layers) / len(layers), 5),
            "moe_z": round(sum(m.z_loss.item() for m in layers) / len(layers), 5)}
