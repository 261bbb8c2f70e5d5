"""Structured pruning: fewer channels, heads and layers, with every matrix kept consistent.

A transformer's matrices share dimensions. Hidden channel c of the residual stream is
written by embed_tokens (column c), every o_proj and down_proj (row c), and read by every
norm (weight c), every q/k/v/gate/up projection (column c) and lm_head (column c). Removing
channel c means removing it from ALL of them with ONE index set, or the layers stop
talking about the same channel. (The public Buzuzu-Mavi solution drew random rows and
columns for each matrix independently; `buzuzu_random_prune` reproduces that bug, labelled
as such, as the baseline of the experiment.) The same holds for FFN channels (gate/up rows,
down columns), query heads (q rows, o columns) and channels inside a head.

What is exact. `prune_width` on a model whose dropped channels and heads were zeroed gives
the same logits. For FFN channels and heads this is plain algebra. For hidden channels,
RMSNorm divides by the root mean square over d channels: over d' < d channels the same
non-zero values have a mean square d/d' times larger, so every norm weight is multiplied by
sqrt(d/d') and eps by d/d' (all norms read the hidden stream, so the config's one eps
suffices). For head channels, attention divides scores by sqrt(head_dim): q is multiplied by
sqrt(hd'/hd) so the softmax temperature is unchanged.

Heads and grouped-query attention. Query heads are kept whole. A kv head is kept when any
query head of its group is; every kept group must keep the same number of query heads
(the model maps query head j to kv head j // group). `choose_heads` builds valid sets two
ways: drop whole kv groups (rule "groups": the ratio n_heads/n_kv_heads stays) or keep every
group and drop query heads inside each (rule "within": n_kv_heads stays).

Head dim and RoPE. Rotate-half pairs channel i with i + hd/2, rotated at frequency
theta^(-2i/hd). Kept channels must be whole pairs (`rope_channels` mirrors the first half).
The model does not store frequencies: a head of dim hd' uses theta^(-2m/hd') for its pair m.
So the kept pair p_m changes frequency unless p_m = m * hd/hd'. Keeping every (hd/hd')-th
pair ("strided", the default) is therefore EXACT; keeping the lowest or highest pairs (as a
naive slice would) changes frequencies and needs healing. Pruning whole heads (32 -> 16
heads of dim 64) keeps RoPE exact too and is the default of `prune_to_shape`; head-dim pruning
(32 heads of dim 32) reproduces the challenge's published shape.

Importance (Minitron; Muralidharan et al., 2024, "Compact Language Models via Pruning and
Knowledge Distillation"): mean |activation| per hidden channel at the norms' outputs, per
FFN channel at down_proj's input, and the mean norm of each head's output, collected with
forward hooks over calibration batches; `weight_importance` (magnitudes) and
`random_importance` are the baselines. Depth (ShortGPT; Men et al., 2024): a block whose
output points where its input did (cosine similarity near 1) does little; `block_influence`
is 1 - cos, averaged over tokens.

The Buzuzu-Mavi shape (vocab 8,064, d 1,024, FFN 2,816, tied, shared MLP, 32 heads of dim 32):
    cfg = model.config                       # InkubaLM, after vocab_shrink.py cut it to 8,064 ids
    target = buzuzu_shape(cfg, n_layers=8, whole_heads=False)   # 50,480,128 parameters (6 layers: 42,087,424)
    layers = top_layers(block_influence(model, batches), 8)   # lillm.importance; or first_n(8)
    small = prune_to_shape(model, target, activation_importance(model, batches), layers)
16 heads of dim 64 (whole_heads=True, the default) has the same count: attention is 4 * d * n_heads * hd.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .config import ModelConfig
from .errors import PruneError
from .importance import choose, choose_heads, weight_importance
from .model import Transformer


# ----------------------------------------------------------------------------- building models

def assemble(cfg: ModelConfig, tensors: dict[str, torch.Tensor], like: Transformer) -> Transformer:
    """A Transformer of `cfg` holding `tensors` (no initialisation: built on meta, then assigned)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(tensors, strict=True, assign=True)
    if cfg.tie_embeddings:  # assign gives each name its own Parameter: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.train(like.training)


def map_parameters(model: Transformer, fn) -> dict[str, torch.Tensor]:
    """{name: fn(name, tensor)} over every parameter name; a shared tensor (tied head, shared
    MLP) is transformed once, under its first name, and that result is used for all its names."""
    done: dict[int, torch.Tensor] = {}
    out = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in done:
            done[id(param)] = fn(name, param.detach())
        out[name] = done[id(param)]
    return out


def _take(w: torch.Tensor, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.Tensor:
    if rows is None and cols is None:
        return w.clone()
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    return w if cols is None else w.index_select(1, cols.to(w.device))


# ----------------------------------------------------------------------------- index sets

def _index_set(indices, size: int, what: str) -> torch.Tensor:
    idx = torch.as_tensor(indices, dtype=torch.long).cpu()
    if idx.dim() != 1 or idx.numel() == 0:
        raise PruneError(f"{what}: expected a non-empty 1-D set of indices, got shape {tuple(idx.shape)}")
    if idx.min() < 0 or idx.max() >= size:
        raise PruneError(f"{what}: indices must lie in [0, {size}), got {idx.min().item()}..{idx.max().item()}")
    if (idx[1:] <= idx[:-1]).any():
        raise PruneError(f"{what}: indices must be sorted and unique, so kept channels keep their order "
                         "(choose() returns them so)")
    return idx


def _is_per_layer(indices) -> bool:
    """A 2-D tensor or a list of sets (one per layer), as opposed to one set (1-D tensor or list of ints)."""
    if torch.is_tensor(indices):
        return indices.dim() == 2
    return isinstance(indices, (list, tuple)) and len(indices) > 0 and not isinstance(indices[0], int)


def _per_layer(indices, n_layers: int, size: int, what: str) -> list[torch.Tensor]:
    """One set for every layer (1-D), or one per layer (2-D tensor or a list of sets), all of one size."""
    if indices is None:
        return [torch.arange(size)] * n_layers
    if not _is_per_layer(indices):
        return [_index_set(indices, size, what)] * n_layers
    if len(indices) != n_layers:
        raise PruneError(f"{what}: got {len(indices)} per-layer sets for a model with {n_layers} layers")
    sets = [_index_set(s, size, f"{what} (layer {i})") for i, s in enumerate(indices)]
    if len({len(s) for s in sets}) > 1:
        raise PruneError(f"{what}: the config holds one size for every layer, but the sets have sizes "
                         f"{[len(s) for s in sets]}; keep the same number in each layer")
    return sets


def _per_expert(indices, cfg: ModelConfig) -> list[list[torch.Tensor]]:
    """ffn_keep of a mixture of experts, as [layer][expert] sets: None (keep all), one set for every
    expert of every layer (1-D), one per layer (2-D, L x k) or one per layer and expert (3-D, L x E x k).
    Each expert's FFN channels are its own, so importance gives the 3-D form (lillm.importance)."""
    L, E = cfg.n_layers, cfg.n_experts
    if not (torch.is_tensor(indices) and indices.dim() == 3 or _is_per_layer(indices) and _is_per_layer(indices[0])):
        return [[s] * E for s in _per_layer(indices, L, cfg.d_ff, "ffn_keep")]
    if len(indices) != L:
        raise PruneError(f"ffn_keep: got {len(indices)} per-layer sets for a model with {L} layers")
    sets = [_per_layer(list(layer), E, cfg.d_ff, f"ffn_keep (layer {i})") for i, layer in enumerate(indices)]
    if len({len(s[0]) for s in sets}) > 1:
        raise PruneError(f"ffn_keep: the config holds one d_ff, but the layers keep {[len(s[0]) for s in sets]}")
    return sets


def _kv_heads(q_heads: torch.Tensor, cfg: ModelConfig, layer: int) -> torch.Tensor:
    group = cfg.n_heads // cfg.n_kv_heads
    kv, counts = torch.unique(q_heads // group, return_counts=True)
    if (counts != counts[0]).any():
        raise PruneError(f"heads_keep (layer {layer}): the kept query heads {q_heads.tolist()} leave "
                         f"{counts.tolist()} heads in kv groups {kv.tolist()}; grouped-query attention needs the "
                         "same number in every kept group: keep whole groups or as many per group (choose_heads)")
    return kv


def rope_channels(pairs, head_dim: int) -> torch.Tensor:
    """Channels of a head that keep RoPE's rotate-half pairs whole: pairs p (< hd/2) and p + hd/2."""
    pairs = _index_set(pairs, head_dim // 2, "rope pairs")
    return torch.cat([pairs, pairs + head_dim // 2])


def head_dim_channels(head_dim: int, new_head_dim: int, how: str = "strided") -> torch.Tensor:
    """Channels to keep inside every head. "strided": every (hd/hd')-th pair, whose RoPE frequencies
    are exactly those of a head of dim hd'; "lowest"/"highest": the first/last pairs (frequencies change)."""
    half, new_half = head_dim // 2, new_head_dim // 2
    if new_head_dim % 2 or not 0 < new_half <= half:
        raise PruneError(f"new head dim {new_head_dim} must be even and at most {head_dim}")
    if how == "strided":
        if half % new_half:
            raise PruneError(f"'strided' needs {new_half} to divide {half} (pairs per head); use 'lowest' or 'highest'")
        return rope_channels(torch.arange(0, half, half // new_half), head_dim)
    if how in ("lowest", "highest"):
        start = 0 if how == "lowest" else half - new_half
        return rope_channels(torch.arange(start, start + new_half), head_dim)
    raise PruneError(f"how={how!r}: choose 'strided', 'lowest' or 'highest'")


def rope_is_exact(channels: torch.Tensor, head_dim: int) -> bool:
    """Whether a head of dim len(channels) rotates each kept pair at its original frequency."""
    pairs = channels[: len(channels) // 2]
    return bool((pairs * len(channels) == torch.arange(len(pairs)) * head_dim).all())


def _head_dim_set(indices, head_dim: int) -> torch.Tensor:
    idx = _index_set(indices, head_dim, "head_dim_keep")
    n = len(idx)
    if n % 2 or not torch.equal(idx[n // 2:], idx[: n // 2] + head_dim // 2) or idx[n // 2 - 1] >= head_dim // 2:
        raise PruneError(f"head_dim_keep {idx.tolist()} splits RoPE pairs: channel i < {head_dim // 2} must be kept "
                         f"exactly when i + {head_dim // 2} is; build it with rope_channels() or head_dim_channels()")
    return idx


def _head_rows(heads: torch.Tensor, channels: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + channels[None, :]).flatten()


# ----------------------------------------------------------------------------- width

@torch.no_grad()
def prune_width(model: Transformer, hidden_keep=None, ffn_keep=None, heads_keep=None, head_dim_keep=None,
                value_dim_keep=None, rescale_norms: bool = True) -> Transformer:
    """A new, narrower model. Each argument is a sorted index set of what to KEEP (None keeps all):
    hidden_keep (d channels), ffn_keep (one set, or one per layer unless the MLP is shared; in a mixture of
    experts also one per layer and expert, and the router loses the dropped hidden columns only),
    heads_keep (query heads: one set or one per layer, all of one size), head_dim_keep (channels in
    every head of q and k, RoPE pairs whole), value_dim_keep (in every head of v and o; default
    head_dim_keep). rescale_norms multiplies norm weights by sqrt(d/d') and eps by d/d'; q is always
    multiplied by sqrt(hd'/hd). Works on meta tensors (pure indexing). The module docstring says what is exact."""
    cfg, L, hd = model.config, model.config.n_layers, model.config.head_dim
    hidden = torch.arange(cfg.d_model) if hidden_keep is None else _index_set(hidden_keep, cfg.d_model, "hidden_keep")
    if cfg.shared_mlp and ffn_keep is not None and _is_per_layer(ffn_keep):
        raise PruneError("ffn_keep: this model's MLP is shared by every layer; pass one index set, not one per layer")
    ffn = _per_expert(ffn_keep, cfg) if cfg.n_experts else _per_layer(ffn_keep, L, cfg.d_ff, "ffn_keep")
    heads = _per_layer(heads_keep, L, cfg.n_heads, "heads_keep")
    kv = [_kv_heads(h, cfg, i) for i, h in enumerate(heads)]
    if len({len(k) for k in kv}) > 1:
        raise PruneError(f"heads_keep keeps {[len(k) for k in kv]} kv heads per layer; the config needs one number")
    qk = torch.arange(hd) if head_dim_keep is None else _head_dim_set(head_dim_keep, hd)
    v = qk if value_dim_keep is None else _index_set(value_dim_keep, hd, "value_dim_keep")
    if len(v) != len(qk):
        raise PruneError(f"value_dim_keep keeps {len(v)} channels, head_dim_keep {len(qk)}; one head_dim serves both")
    q_rows = [_head_rows(h, qk, hd) for h in heads]
    k_rows = [_head_rows(k, qk, hd) for k in kv]
    v_rows = [_head_rows(k, v, hd) for k in kv]
    o_cols = [_head_rows(h, v, hd) for h in heads]
    norm_scale = math.sqrt(cfg.d_model / len(hidden)) if rescale_norms else 1.0
    q_scale = math.sqrt(len(qk) / hd)  # keeps q.k / sqrt(head_dim) unchanged

    def scaled(w: torch.Tensor, factor: float) -> torch.Tensor:
        return w if factor == 1.0 else w * factor

    def prune(name: str, w: torch.Tensor) -> torch.Tensor:
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return _take(w, cols=hidden)
        if name.endswith("norm.weight"):
            return scaled(_take(w, rows=hidden), norm_scale)
        layer, kind = int(name.split(".")[2]), name.split(".")[-2]
        if kind in ("w1", "w2", "w3"):  # block_sparse_moe.experts.E.wN: that expert's own FFN channels
            channels = ffn[layer][int(name.split(".")[-3])]
            return _take(w, hidden, channels) if kind == "w2" else _take(w, channels, hidden)
        rows_cols = {"q_proj": (q_rows[layer], hidden), "k_proj": (k_rows[layer], hidden),
                     "v_proj": (v_rows[layer], hidden), "o_proj": (hidden, o_cols[layer]),
                     "gate_proj": (ffn[layer], hidden), "up_proj": (ffn[layer], hidden),
                     "down_proj": (hidden, ffn[layer]), "gate": (None, hidden)}  # gate: a mixture's router
        pruned = _take(w, *rows_cols[kind])
        return scaled(pruned, q_scale) if kind == "q_proj" else pruned

    new_cfg = cfg.replace(d_model=len(hidden), d_ff=len(ffn[0][0] if cfg.n_experts else ffn[0]), n_heads=len(heads[0]), n_kv_heads=len(kv[0]),
                          head_dim=len(qk), norm_eps=cfg.norm_eps * (cfg.d_model / len(hidden) if rescale_norms else 1))
    return assemble(new_cfg, map_parameters(model, prune), model)


# ----------------------------------------------------------------------------- depth and tying

@torch.no_grad()
def drop_layers(model: Transformer, keep: Sequence[int]) -> Transformer:
    """A new model with only the layers `keep` (sorted, unique), their weights copied unchanged."""
    keep = list(keep)
    _index_set(keep, model.config.n_layers, "layers to keep")
    new_index = {old: new for new, old in enumerate(keep)}
    tensors = {}
    for name, tensor in map_parameters(model, lambda name, t: t.clone()).items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            if int(parts[2]) not in new_index:
                continue
            parts[2] = str(new_index[int(parts[2])])
        tensors[".".join(parts)] = tensor
    return assemble(model.config.replace(n_layers=len(keep)), tensors, model)


def first_n(n: int) -> list[int]:
    """The Buzuzu-Mavi choice of layers: the first n."""
    return list(range(n))


@torch.no_grad()
def tie_embeddings(model: Transformer, source: str = "mean") -> Transformer:
    """A new model whose lm_head IS embed_tokens: the input rows, the output rows, or their mean."""
    if model.config.tie_embeddings:
        raise PruneError("the model's embeddings are already tied; nothing to do")
    embed, head = model.model.embed_tokens.weight.detach(), model.lm_head.weight.detach()
    choices = {"input": lambda: embed.clone(), "output": lambda: head.clone(), "mean": lambda: (embed + head) / 2}
    if source not in choices:
        raise PruneError(f"source={source!r}: choose 'input', 'output' or 'mean'")
    tied = choices[source]()
    tensors = map_parameters(model, lambda name, t: tied if name in ("model.embed_tokens.weight", "lm_head.weight")
                              else t.clone())
    return assemble(model.config.replace(tie_embeddings=True), tensors, model)


# ----------------------------------------------------------------------------- shapes

def buzuzu_shape(cfg: ModelConfig, n_layers: int = 8, vocab_size: int = 8064, whole_heads: bool = True) -> ModelConfig:
    """The Buzuzu-Mavi challenge's shape: d 1,024, FFN 2,816, tied. Halving InkubaLM's d either drops
    half the heads (whole_heads, the default: 16 heads of dim 64, RoPE exact) or halves head_dim
    (whole_heads=False: 32 heads of dim 32, the published shape). Same parameter count either way."""
    if cfg.d_model % 1024 or cfg.n_heads % (cfg.d_model // 1024):
        raise PruneError(f"buzuzu_shape halves widths from InkubaLM (d 2048); d_model={cfg.d_model} does not divide")
    ratio = cfg.d_model // 1024
    if whole_heads:
        heads = dict(n_heads=cfg.n_heads // ratio, n_kv_heads=max(1, cfg.n_kv_heads // ratio), head_dim=cfg.head_dim)
    else:
        heads = dict(n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim // ratio)
    return cfg.replace(vocab_size=vocab_size, d_model=1024, d_ff=2816, n_layers=n_layers, tie_embeddings=True, **heads)


def prune_to_shape(model: Transformer, target: ModelConfig, importance: dict | None = None,
                   layers: Sequence[int] | None = None, head_dims: str = "strided", gqa: str = "groups",
                   tie_source: str = "mean") -> Transformer:
    """Width (by importance; default weight magnitudes), then depth (`layers`, from the original
    model's numbering), then tying, to reach `target`'s shape. The vocabulary must already match
    (shrink it with lillm.vocab_shrink first). Head dims are cut with head_dim_channels(how=head_dims)."""
    cfg = model.config
    if target.vocab_size != cfg.vocab_size or target.shared_mlp != cfg.shared_mlp:
        raise PruneError(f"target vocab_size/shared_mlp {target.vocab_size}/{target.shared_mlp} differ from the "
                         f"model's {cfg.vocab_size}/{cfg.shared_mlp}: pruning keeps both; shrink the vocabulary first "
                         "(lillm.vocab_shrink)")
    if target.tie_embeddings is False and cfg.tie_embeddings:
        raise PruneError("the target is untied but the model is tied; pruning cannot untie embeddings")
    importance = importance if importance is not None else weight_importance(model)
    ffn = importance["ffn"].sum(0) if cfg.shared_mlp else importance["ffn"]
    heads = channels = None
    if target.head_dim != cfg.head_dim:
        if target.n_heads != cfg.n_heads:
            raise PruneError("change either the number of heads or the head dim, not both")
        channels = head_dim_channels(cfg.head_dim, target.head_dim, head_dims)
    elif target.n_heads != cfg.n_heads:
        heads = choose_heads(importance["heads"], target.n_heads, cfg.n_kv_heads, gqa)
    pruned = prune_width(model, choose(importance["hidden"], target.d_model), choose(ffn, target.d_ff),
                         heads, head_dim_keep=channels)
    if layers is not None:
        pruned = drop_layers(pruned, layers)
    if target.tie_embeddings and not cfg.tie_embeddings:
        pruned = tie_embeddings(pruned, tie_source)
    got, want = pruned.config, target
    fields = ("d_model", "d_ff", "n_layers", "n_heads", "n_kv_heads", "head_dim", "tie_embeddings")
    wrong = {f: (getattr(got, f), getattr(want, f)) for f in fields if getattr(got, f) != getattr(want, f)}
    if wrong:
        raise PruneError(f"the pruned model does not have the target shape (got, wanted): {wrong}; "
                         "pass layers= to change n_layers, and use gqa='within' to keep n_kv_heads")
    return pruned


# ----------------------------------------------------------------------------- the buggy baseline

@torch.no_grad()
def buzuzu_random_prune(model: Transformer, target: ModelConfig, seed: int = 0) -> Transformer:
    """THE BUGGY BASELINE, for the pruning experiment only: never use it to make a model.
    Like the public Buzuzu-Mavi solution, it keeps the first target.n_layers layers and slices every
    matrix with random rows and random columns drawn independently per matrix, so heads, RoPE pairs
    and the residual stream's channels no longer line up between matrices. Vocabulary and tying
    are left as they are (tie afterwards with tie_embeddings)."""
    cfg, g = model.config, torch.Generator().manual_seed(seed)
    if target.vocab_size != cfg.vocab_size or target.n_layers > cfg.n_layers:
        raise PruneError("buzuzu_random_prune keeps the vocabulary and takes the first layers: the target needs "
                         f"vocab_size {cfg.vocab_size} and at most {cfg.n_layers} layers")
    shape_cfg = target.replace(tie_embeddings=cfg.tie_embeddings, shared_mlp=cfg.shared_mlp)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Transformer(shape_cfg).named_parameters(remove_duplicate=False)}
    random_subset = lambda n, k: torch.randperm(n, generator=g)[:k].sort().values  # noqa: E731

    def prune(name: str, w: torch.Tensor) -> torch.Tensor:
        if name not in shapes:
            return w  # a layer past target.n_layers: dropped below
        rows = None if name.endswith("embed_tokens.weight") or name == "lm_head.weight" else \
            random_subset(w.shape[0], shapes[name][0])
        return _take(w, rows, random_subset(w.shape[1], shapes[name][1]) if w.dim() == 2 else None)

    tensors = {n: t for n, t in map_parameters(model, prune).items() if n in shapes}
    return assemble(shape_cfg, tensors, model)
