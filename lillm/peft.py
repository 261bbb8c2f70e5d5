"""Parameter-efficient fine-tuning: train a few new parameters, freeze the model.

Fine-tuning every weight needs gradients and two AdamW moments for all of them (about 16
bytes per parameter in fp32). The methods here keep the base model frozen and train a
small number of added parameters instead:

- **LoRA** (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a
  frozen projection W (out x in) gets a low-rank update, y = W x + (alpha / r) B A x, with
  A (r x in) random and B (out x r) zero, so training starts from the base model exactly.
  After training B A can be added into W ("merged"): zero extra inference cost.
- **QLoRA** (Dettmers et al., 2023): the same, with every frozen projection of the blocks
  stored in 4-bit NF4 (lillm.nf4) and dequantised on the fly.
- **Prefix tuning** (Li & Liang, 2021, "Prefix-Tuning"): P learned key/value vectors per
  layer that every query can attend to, as if a prompt of P virtual tokens had been run
  before the input. They enter through `Attention.kv_prefix`, a hook that prepends them to
  the keys and values (and widens the mask); with no prefix the model runs as before.
- **Adapters** (Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP"): a
  bottleneck h + up(gelu(down(h))) on the output of the attention (after o_proj) and of the
  MLP (after down_proj), before the residual add; `up` starts at zero, so it starts as identity.

A mixture of experts (lillm.moe) is adapted expert by expert: "gate", "up" and "down" mean that
projection in every expert (w1, w3, w2), adapters sit after every expert's down projection, and
QLoRA stores every expert in NF4; the router stays as it is, trainable only with "full".

Wrapped projections keep their names (`...q_proj.weight` is still the frozen base weight)
and add their own (`q_proj.lora_A`, `o_proj.adapter_up.weight`, `self_attn.kv_prefix.keys`),
so a checkpoint of a PEFT model is the base state dict plus the new tensors. A shared MLP
(InkubaLM) is one module in every block, so it is wrapped once and its LoRA (or adapter) is
shared too. `apply_peft` is the single entry point; `save_peft` / `load_peft` move only the
trained tensors with a small JSON config; `describe` counts what trains.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .errors import InputFileError, PeftError
from .folders import write_file_atomic, write_text_atomic
from .model import projection_slots
from .nf4 import NF4Linear

METHODS = ("full", "lora", "qlora", "prefix", "adapters")
# Short target names -> (submodule of a block, projection attribute).
PROJECTIONS = {"q": ("self_attn", "q_proj"), "k": ("self_attn", "k_proj"), "v": ("self_attn", "v_proj"),
               "o": ("self_attn", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
               "down": ("mlp", "down_proj")}
ADAPTER_SITES = ("o", "down")  # Houlsby: after the attention output and after the feed-forward output
PEFT_MARKERS = ("lora_A", "lora_B", "kv_prefix.", "adapter_down.", "adapter_up.")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class PeftConfig:
    method: str = "lora"
    targets: tuple[str, ...] = ("q", "v")   # LoRA / QLoRA projections, by short name
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    prefix_length: int = 16
    adapter_size: int = 64
    nf4_block_size: int = 64
    nf4_scale_block_size: int = 256
    train_embeddings: bool = False          # also train embed_tokens / lm_head (new vocabulary rows)

    def __post_init__(self):
        if self.method not in METHODS:
            raise PeftError(f"unknown PEFT method {self.method!r}; choose one of {', '.join(METHODS)}")
        targets = self.targets.split(",") if isinstance(self.targets, str) else list(self.targets)
        targets = list(PROJECTIONS) if targets == ["all"] else [t.strip() for t in targets if t.strip()]
        unknown = [t for t in targets if t not in PROJECTIONS]
        if unknown or not targets:
            raise PeftError(f"LoRA targets {unknown or targets} are not projections; use short names from "
                            f"{', '.join(PROJECTIONS)} (comma separated) or 'all'")
        self.targets = tuple(dict.fromkeys(targets))
        for name in ("rank", "prefix_length", "adapter_size", "nf4_block_size", "nf4_scale_block_size"):
            if int(getattr(self, name)) <= 0:
                raise PeftError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise PeftError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_options(cls, method: str, options: dict) -> "PeftConfig":
        known = {f.name for f in fields(cls)} - {"method"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise PeftError(f"unknown PEFT option(s) {unknown}; known options are {sorted(known)}")
        return cls(method=method, **options)


# ----------------------------------------------------------------------------- LoRA

def _adopt_linear(module: nn.Module, base: nn.Linear) -> None:
    """Make `module` hold `base`'s own weight and bias Parameters (no copy, same names)."""
    nn.Module.__init__(module)
    module.in_features, module.out_features = base.in_features, base.out_features
    module.weight = base.weight
    module.register_parameter("bias", base.bias)


class LoRAMixin:
    """lora_A (r x in, Kaiming-uniform as in nn.Linear), lora_B (out x r, zeros), scale alpha / r."""

    def _init_lora(self, rank: int, alpha: float, dropout: float, device, dtype) -> None:
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank
        self.merged = False

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling


class LoRALinear(LoRAMixin, nn.Linear):
    """nn.Linear plus a low-rank update; still an nn.Linear with the same `weight`."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        _adopt_linear(self, base)
        self._init_lora(rank, alpha, dropout, base.weight.device, base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out if self.merged else out + self.lora_delta(x)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear with the update merged in (sharing this module's weight tensor)."""
        self.merge()
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain


class QLoRALinear(LoRAMixin, NF4Linear):
    """A frozen NF4 projection plus a LoRA update kept in full precision."""

    def __init__(self, base: NF4Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        NF4Linear.__init__(self, base.quantized)
        self._init_lora(rank, alpha, dropout, base.weight_packed.device, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NF4Linear.forward(self, x) + self.lora_delta(x)

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """Dequantise and add B A: merging cannot stay in NF4 without quantising the update away."""
        linear = NF4Linear.to_linear(self, dtype)
        with torch.no_grad():
            linear.weight += self.delta_weight().to(dtype)
        return linear


# ----------------------------------------------------------------------------- adapters and prefixes

class AdaptedLinear(nn.Linear):
    """A projection followed by a Houlsby bottleneck adapter: h + up(gelu(down(h))), h = W x."""

    def __init__(self, base: nn.Linear, size: int = 64):
        _adopt_linear(self, base)
        device, dtype = base.weight.device, base.weight.dtype
        self.adapter_down = nn.Linear(self.out_features, size, device=device, dtype=dtype)
        self.adapter_up = nn.Linear(size, self.out_features, device=device, dtype=dtype)
        nn.init.normal_(self.adapter_down.weight, std=0.02)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)  # zero up-projection: the block starts as the identity
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.weight, self.bias)
        return h + self.adapter_up(F.gelu(self.adapter_down(h)))


class KVPrefix(nn.Module):
    """Learned keys and values (n_kv_heads, P, head_dim) prepended to one layer's attention.

    Called by Attention as `k, v, mask = kv_prefix(k, v, mask)` after the KV cache: the prefix
    keys live in the rotated (post-RoPE) space, so they have no position of their own, and
    the input keeps positions 0..T-1 as without a prefix. Every query may attend to them.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = nn.Parameter(keys), nn.Parameter(values)

    def forward(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
        B, P = k.shape[0], self.keys.shape[1]
        k = torch.cat([self.keys.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([self.values.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
        if mask is None:  # plain causal self-attention over T queries and T keys
            T = k.shape[2] - P
            mask = torch.ones(T, T, dtype=torch.bool, device=k.device).tril().expand(B, 1, T, T)
        visible = torch.ones(*mask.shape[:3], P, dtype=torch.bool, device=mask.device)
        return k, v, torch.cat([visible, mask], dim=-1)


@torch.no_grad()
def prefix_from_tokens(model: nn.Module, token_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the base model's own keys and values for `token_ids` (Li & Liang's
    initialisation from real activations, far more stable than random vectors)."""
    model.setup_cache(1, token_ids.numel())
    try:
        model(token_ids.view(1, -1), cache_pos=0)
        return [(b.self_attn.cache.k[0].float().clone(), b.self_attn.cache.v[0].float().clone())
                for b in model.model.layers]
    finally:
        model.clear_cache()


# ----------------------------------------------------------------------------- applying

def _slots(model: nn.Module, kinds) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every projection of these kinds, each shared module once; in a
    mixture of experts, that projection of every expert (lillm.model.projection_slots)."""
    seen, slots = set(), []
    for block in model.model.layers:
        for kind in kinds:
            for parent, name in projection_slots(block, PROJECTIONS[kind][1]):
                if (id(parent), name) not in seen:
                    seen.add((id(parent), name))
                    slots.append((parent, name))
    return slots


def _wrap(model: nn.Module, kinds, make) -> None:
    for parent, name in _slots(model, kinds):
        setattr(parent, name, make(getattr(parent, name)))


def _add_prefixes(model: nn.Module, cfg: PeftConfig, init_ids, from_model: bool) -> None:
    attention = model.model.layers[0].self_attn
    if not hasattr(attention, "kv_prefix"):
        raise PeftError("prefix tuning needs the Attention.kv_prefix hook in lillm/model.py "
                        "(k, v, mask = self.kv_prefix(k, v, mask) after the KV cache update); update model.py")
    if not from_model:  # about to be overwritten by saved tensors: skip the forward pass
        shape = (model.config.n_kv_heads, cfg.prefix_length, model.config.head_dim)
        device = model.lm_head.weight.device
        for block in model.model.layers:
            block.self_attn.kv_prefix = KVPrefix(torch.zeros(shape, device=device), torch.zeros(shape, device=device))
        return
    if init_ids is None:  # random vocabulary items, seeded: the same base gives the same start
        generator = torch.Generator().manual_seed(0)
        init_ids = torch.randint(0, model.config.vocab_size, (cfg.prefix_length,), generator=generator)
    init_ids = torch.as_tensor(init_ids, dtype=torch.long, device=model.lm_head.weight.device)
    if init_ids.numel() != cfg.prefix_length:
        raise PeftError(f"prefix_init_ids has {init_ids.numel()} ids but prefix_length is {cfg.prefix_length}")
    for block, (keys, values) in zip(model.model.layers, prefix_from_tokens(model, init_ids)):
        block.self_attn.kv_prefix = KVPrefix(keys, values)


def apply_peft(model: nn.Module, method: str = "lora", prefix_init_ids=None, init_prefix_from_model: bool = True,
               **options) -> nn.Module:
    """Prepare `model` (in place) for `method`; only that method's parameters keep requires_grad.

    options: PeftConfig fields (targets, rank, alpha, dropout, prefix_length, adapter_size,
    nf4_block_size, nf4_scale_block_size, train_embeddings). Prefixes start as the base
    model's keys/values for `prefix_init_ids` (default: seeded random ids); pass
    init_prefix_from_model=False when saved tensors will be loaded next. Returns the model.
    """
    if getattr(model, "peft_config", None) is not None:
        raise PeftError(f"the model already has PEFT method {model.peft_config.method!r}; "
                        "apply_peft once per model (load a fresh base model to change methods)")
    cfg = PeftConfig.from_options(method, options)
    for p in model.parameters():
        p.requires_grad_(cfg.method == "full")
    if cfg.method == "lora":
        _wrap(model, cfg.targets, lambda lin: LoRALinear(lin, cfg.rank, cfg.alpha, cfg.dropout))
    elif cfg.method == "qlora":
        quantize = lambda lin: NF4Linear.from_linear(lin, cfg.nf4_block_size, cfg.nf4_scale_block_size)
        _wrap(model, PROJECTIONS, quantize)
        _wrap(model, cfg.targets, lambda q: QLoRALinear(q, cfg.rank, cfg.alpha, cfg.dropout))
    elif cfg.method == "adapters":
        _wrap(model, ADAPTER_SITES, lambda lin: AdaptedLinear(lin, cfg.adapter_size))
    elif cfg.method == "prefix":
        _add_prefixes(model, cfg, prefix_init_ids, init_prefix_from_model)
    if cfg.train_embeddings:
        model.model.embed_tokens.weight.requires_grad_(True)
        model.lm_head.weight.requires_grad_(True)
    model.peft_config = cfg
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold LoRA / QLoRA updates into plain nn.Linear weights (QLoRA: dequantised); in place."""
    cfg = getattr(model, "peft_config", None)
    if cfg is not None and cfg.method in ("prefix", "adapters"):
        raise PeftError(f"{cfg.method} are not a linear update of existing weights, so they cannot be merged; "
                        "keep them and load them with load_peft at inference")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (LoRALinear, NF4Linear)):  # NF4Linear includes QLoRALinear
                setattr(module, name, child.to_linear())
    model.peft_config = None
    return model


def set_lora_merged(model: nn.Module, merged: bool) -> None:
    """Merge (True) or unmerge (False) every LoRALinear in place; outputs stay the same (to rounding)."""
    for module in model.modules():
        if isinstance(module, QLoRALinear):
            raise PeftError("QLoRA updates cannot be merged into NF4 weights in place; use merge_and_unload")
        if isinstance(module, LoRALinear):
            module.merge() if merged else module.unmerge()


# ----------------------------------------------------------------------------- saving and describing

def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors the PEFT method trains (every parameter for 'full'), shared tensors once."""
    cfg = getattr(model, "peft_config", None)
    if cfg is None:
        raise PeftError("the model has no PEFT method; call apply_peft(model, method, ...) first")
    out = {}
    for name, param in model.named_parameters():  # yields tied / shared parameters once
        if cfg.method == "full" or any(marker in name for marker in PEFT_MARKERS) or (
                cfg.train_embeddings and name in ("model.embed_tokens.weight", "lm_head.weight")):
            out[name] = param.detach()
    return out


def describe(model: nn.Module) -> dict:
    """Trainable and frozen parameter counts (NF4 weights counted apart) and the PEFT config."""
    cfg = getattr(model, "peft_config", None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    nf4 = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    total = trainable + frozen + nf4
    return {"method": cfg.method if cfg else "none", "trainable_params": trainable, "frozen_params": frozen,
            "nf4_params": nf4, "total_params": total, "trainable_percent": round(100 * trainable / total, 4),
            "config": cfg.to_dict() if cfg else None}


def save_peft(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write adapter_model.safetensors (the trained tensors) and adapter_config.json (how to rebuild)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in peft_state_dict(model).items()}
    record = {"peft": model.peft_config.to_dict(), "base_config": model.config.to_dict(), "counts": describe(model)}
    write_file_atomic(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_text_atomic(folder / CONFIG_FILE, json.dumps(record, indent=2) + "\n")
    return folder


def read_peft_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise InputFileError(f"{path} does not exist: {folder} is not an adapter folder (save_peft writes "
                                f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        record = json.loads(path.read_text())
        return record["peft"] | {"base_config": record.get("base_config")}
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise PeftError(f"{path} is not a lillm adapter config ({error!r}); save it again with save_peft") from None


def load_peft(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Apply the folder's PEFT method to a base model (unless already applied) and load its tensors."""
    folder = Path(folder)
    options = read_peft_config(folder)
    base_config = options.pop("base_config")
    mismatched = {k: (v, getattr(model.config, k)) for k, v in (base_config or {}).items()
                  if k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")
                  and getattr(model.config, k) != v}
    if mismatched:
        raise PeftError(f"{folder} was trained on another base model: (adapter, model) values {mismatched}")
    method = options.pop("method")
    if getattr(model, "peft_config", None) is None:
        apply_peft(model, method, init_prefix_from_model=False, **options)
    elif model.peft_config.method != method:
        raise PeftError(f"{folder} holds a {method!r} adapter but the model already has {model.peft_config.method!r}")
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise InputFileError(f"{path} is missing; the adapter folder is incomplete, save it again")
    tensors, expected = load_file(str(path)), peft_state_dict(model)
    if set(tensors) != set(expected):
        raise PeftError(f"{path}: tensors do not match the model. Missing: {sorted(set(expected) - set(tensors))[:5]}; "
                        f"unexpected: {sorted(set(tensors) - set(expected))[:5]}")
    with torch.no_grad():
        for name, target in expected.items():
            if tensors[name].shape != target.shape:
                raise PeftError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, the model needs "
                                f"{tuple(target.shape)}")
            target.copy_(tensors[name])
    return model


def rebuild_peft(model: nn.Module, record: dict) -> nn.Module:
    """Wrap a freshly built base model as peft.json says, so the checkpoint's tensors fit it."""
    options = dict(record)
    return apply_peft(model, options.pop("method"), init_prefix_from_model=False, **options)
