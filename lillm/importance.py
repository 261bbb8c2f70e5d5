"""Which channels, heads and layers matter: the scores that structured pruning keeps by.

- Activation importance (Muralidharan et al., 2024, "Compact Language Models via Pruning and
  Knowledge Distillation", the Minitron recipe): run calibration batches through the model and
  average the magnitude of what each hidden channel, FFN channel and attention head outputs.
  Channels that are rarely active contribute little and can go.
- Weight importance: the magnitude of the weights that read or write a channel (no data needed).
- Random importance: the baseline every other score must beat.
- Block influence (Men et al., 2024, "ShortGPT"): 1 - cosine similarity between a block's input
  and output hidden states; a block that barely changes its input can be dropped.

`choose` turns a score into a sorted index set for lillm.prune.prune_width; sorted, so kept
channels keep their order (and RoPE pairs their frequencies).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import PruneError
from .model import Transformer, projection_slots


def ffn_shape(cfg) -> tuple[int, ...]:
    """The FFN channels of one layer: (d_ff,), or (n_experts, d_ff) in a mixture of experts."""
    return (cfg.n_experts, cfg.d_ff) if cfg.n_experts else (cfg.d_ff,)


def choose(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` largest scores, sorted so kept channels keep their order (per row if 2-D)."""
    n = importance.shape[-1]
    if not 0 < keep <= n:
        raise PruneError(f"keep={keep}: choose between 1 and {n} of {n}")
    return torch.topk(importance.float(), keep, dim=-1).indices.sort(dim=-1).values


def choose_heads(importance: torch.Tensor, keep: int, n_kv_heads: int, rule: str = "groups") -> torch.Tensor:
    """(n_layers, keep) query heads valid under GQA; importance is (n_layers, n_heads).
    rule "groups": keep whole kv groups (summed importance); "within": keep every kv group and
    the best keep/n_kv_heads query heads of each."""
    L, H = importance.shape
    group = H // n_kv_heads
    if rule == "groups":
        if keep % group:
            raise PruneError(f"rule 'groups' keeps whole groups of {group} query heads; {keep} is not a multiple")
        groups = choose(importance.view(L, n_kv_heads, group).sum(-1), keep // group)
        return (groups[:, :, None] * group + torch.arange(group)).flatten(1)
    if rule == "within":
        if keep % n_kv_heads:
            raise PruneError(f"rule 'within' keeps as many heads in each of {n_kv_heads} groups; "
                             f"{keep} is not a multiple")
        inside = choose(importance.view(L, n_kv_heads, group), keep // n_kv_heads)
        return (inside + torch.arange(n_kv_heads)[:, None] * group).flatten(1)
    raise PruneError(f"rule={rule!r}: choose 'groups' or 'within'")


def _mask(batch: dict, device) -> torch.Tensor:
    """(B, T) float weights: 1 for real tokens, 0 for padding."""
    if batch.get("attention_mask") is not None:
        return batch["attention_mask"].to(device).float()
    return torch.ones(batch["input_ids"].shape, device=device)


def _calibrate(model: Transformer, batches: Iterable[dict], state: dict, show_progress: bool, desc: str) -> float:
    """Run the batches through the model (hooks read state["mask"]); returns the number of tokens."""
    device = next(model.parameters()).device
    tokens = 0.0
    for batch in tqdm(batches, desc=desc, disable=not show_progress, leave=False):
        state["mask"] = _mask(batch, device)
        tokens += state["mask"].sum().item()
        get = lambda key, batch=batch: batch[key].to(device) if batch.get(key) is not None else None
        model(get("input_ids"), position_ids=get("position_ids"), attention_mask=get("attention_mask"),
              segment_ids=get("segment_ids"))
    if tokens == 0:
        raise PruneError("no calibration tokens: pass at least one batch with real (unmasked) tokens")
    return tokens


@torch.no_grad()
def activation_importance(model: Transformer, batches: Iterable[dict], show_progress: bool = True) -> dict:
    """Minitron scores over calibration batches (dicts with input_ids, optional attention_mask...):
    hidden (d,): mean |x| at the output of every norm, summed over norms; ffn (n_layers, d_ff): mean
    |silu(gate) * up| at down_proj's input; heads (n_layers, n_heads): mean L2 norm of each head's output.
    In a mixture of experts ffn is (n_layers, n_experts, d_ff): each expert's channels are its own, scored
    on the tokens routed to it (every routed row counts: lillm's calibration windows have no padding)."""
    cfg = model.config
    device = next(model.parameters()).device
    sums = {"hidden": torch.zeros(cfg.d_model, device=device),
            "ffn": torch.zeros(cfg.n_layers, *ffn_shape(cfg), device=device),
            "heads": torch.zeros(cfg.n_layers, cfg.n_heads, device=device)}
    state: dict = {"layer": 0}

    def weighted(x: torch.Tensor) -> torch.Tensor:  # sum over tokens of x (B, T, ...) weighted by the mask
        return torch.einsum("bt,bt...->...", state["mask"], x.float())

    # A hook that returns something replaces the module's input or output: these return None.
    def on_block(i):
        def hook(module, args):
            state["layer"] = i  # a shared MLP learns which layer calls it
        return hook

    def on_norm(module, args, out):
        sums["hidden"] += weighted(out.abs())

    def on_down(module, args):
        sums["ffn"][state["layer"]] += weighted(args[0].abs())

    def on_expert_down(i, e):
        def hook(module, args):  # the expert's rows: the (token, choice) pairs routed to it, no (B, T) shape
            sums["ffn"][i, e] += args[0].abs().float().sum(0)
        return hook

    def on_heads(i):
        def hook(module, args):
            B, T, _ = args[0].shape
            sums["heads"][i] += weighted(args[0].float().view(B, T, cfg.n_heads, cfg.head_dim).norm(dim=-1))
        return hook

    hooks = [model.model.norm.register_forward_hook(on_norm)]
    downs = {}
    for i, block in enumerate(model.model.layers):
        hooks.append(block.register_forward_pre_hook(on_block(i)))
        hooks.append(block.self_attn.o_proj.register_forward_pre_hook(on_heads(i)))
        hooks += [block.input_layernorm.register_forward_hook(on_norm),
                  block.post_attention_layernorm.register_forward_hook(on_norm)]
        if cfg.n_experts:
            hooks += [expert.w2.register_forward_pre_hook(on_expert_down(i, e))
                      for e, expert in enumerate(block.feed_forward.experts)]
        else:
            downs[id(block.mlp.down_proj)] = block.mlp.down_proj  # a shared MLP is hooked once
    hooks += [down.register_forward_pre_hook(on_down) for down in downs.values()]
    try:
        tokens = _calibrate(model, batches, state, show_progress, "activation importance")
    finally:
        for hook in hooks:
            hook.remove()
    return {key: (value / tokens).cpu() for key, value in sums.items()}


@torch.no_grad()
def weight_importance(model: Transformer) -> dict:
    """Magnitude baseline, same keys and shapes as activation_importance: for each channel, the sum
    of the L2 norms of its slices (rows or columns) in every matrix that reads or writes it."""
    cfg, hd = model.config, model.config.head_dim
    hidden = torch.zeros(cfg.d_model, device=model.lm_head.weight.device)
    ffn, heads = [], []
    for name, param in model.named_parameters():  # each shared tensor once
        w = param.detach().float()
        if name.endswith("norm.weight"):
            continue  # a norm scales channels; it neither reads nor writes one
        writes_hidden = name.endswith(("o_proj.weight", "down_proj.weight", ".w2.weight"))  # w2: an expert's down
        hidden += w.norm(dim=1) if writes_hidden else w.norm(dim=0)
    for block in model.model.layers:
        attn = block.self_attn
        (gate, up, down) = ([p.weight.float() for p in (getattr(m, n) for m, n in projection_slots(block, name))]
                            for name in ("gate_proj", "up_proj", "down_proj"))
        scores = [g.norm(dim=1) + u.norm(dim=1) + d.norm(dim=0) for g, u, d in zip(gate, up, down)]
        ffn.append(torch.stack(scores) if cfg.n_experts else scores[0])  # (n_experts, d_ff) in a mixture
        q = attn.q_proj.weight.float().view(cfg.n_heads, -1).norm(dim=1)
        o = attn.o_proj.weight.float().view(cfg.d_model, cfg.n_heads, hd).transpose(0, 1).flatten(1).norm(dim=1)
        heads.append(q + o)
    return {"hidden": hidden.cpu(), "ffn": torch.stack(ffn).detach().cpu(), "heads": torch.stack(heads).detach().cpu()}


def random_importance(model: Transformer, seed: int = 0) -> dict:
    """Uniform random scores (same keys and shapes), reproducible from the seed: structured random pruning."""
    cfg, g = model.config, torch.Generator().manual_seed(seed)
    shapes = {"hidden": (cfg.d_model,), "ffn": (cfg.n_layers, *ffn_shape(cfg)), "heads": (cfg.n_layers, cfg.n_heads)}
    return {key: torch.rand(shape, generator=g) for key, shape in shapes.items()}


# ----------------------------------------------------------------------------- depth

@torch.no_grad()
def block_influence(model: Transformer, batches: Iterable[dict], show_progress: bool = True) -> list[float]:
    """ShortGPT's Block Influence per layer: 1 - cos(block input, block output), averaged over tokens."""
    sums = [0.0] * model.config.n_layers
    state: dict = {}

    def on_block(i):
        def hook(module, args, out):
            cos = F.cosine_similarity(args[0].float(), out.float(), dim=-1)
            sums[i] += ((1 - cos) * state["mask"]).sum().item()
        return hook

    hooks = [block.register_forward_hook(on_block(i)) for i, block in enumerate(model.model.layers)]
    try:
        tokens = _calibrate(model, batches, state, show_progress, "block influence")
    finally:
        for hook in hooks:
            hook.remove()
    return [s / tokens for s in sums]


def top_layers(influence: Sequence[float], n: int) -> list[int]:
    """The n most influential layers, in their original order."""
    return choose(torch.tensor(influence), n).tolist()

