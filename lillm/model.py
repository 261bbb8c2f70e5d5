"""A Llama-style decoder-only transformer, top to bottom, in one file.

The pieces and the papers behind them:
- RMSNorm (Zhang & Sennrich, 2019): scale by the root mean square, no mean, no bias.
- Rotary position embeddings (Su et al., 2021, "RoFormer"): rotate each query/key
  pair of channels by an angle proportional to the position, so q.k depends only on
  the *relative* position. We use the "rotate-half" layout of Hugging Face Llama
  (channel i is paired with channel i + head_dim/2), so imported weights need no
  permutation.
- Grouped-query attention (Ainslie et al., 2023, "GQA"): n_heads query heads share
  n_kv_heads key/value heads, which shrinks the KV cache by n_heads / n_kv_heads.
- SwiGLU (Shazeer, 2020, "GLU Variants Improve Transformer"): down(silu(gate(x)) * up(x)).
- Pre-norm residual blocks and (optionally) tied input/output embeddings
  (Press & Wolf, 2017).
- A preallocated KV cache written at a position (as in gpt-fast). With a plain int
  position, attention reads only the part written so far (fastest in eager mode).
  With a tensor position every shape is fixed (the whole cache, masked), so the
  one-token step can be captured once as a CUDA graph and replayed (lillm.generate).
  The model never looks at `self.training`.

Parameter names follow the Hugging Face Llama state dict (model.embed_tokens,
model.layers.N.self_attn.q_proj, ...), so import and export are a matter of copying.
InkubaLM's one MLP shared by all layers is the same module placed in every block. With
cfg.n_experts > 0 the MLP is a sparse mixture of experts (lillm/moe.py), under Mixtral's name.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .moe import SparseMoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under bf16 autocast: the mean of squares overflows/loses precision otherwise.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class RotaryEmbedding:
    """Precomputed cos/sin tables, looked up by (per-row) position ids.

    Deliberately not buffers: `model.to(torch.bfloat16)` would round the angles, and
    rotary needs fp32 tables to stay exact at long positions. The model keeps them on its
    device and long enough (`ensure`), so a lookup never reads anything back to the host
    (which a CUDA graph could not do).
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, device=None):
        self.head_dim, self.theta, self.length = head_dim, theta, max_seq_len
        self._build(max_seq_len, device)

    def _build(self, length: int, device):
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim))
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
        cos, sin = angles.cos(), angles.sin()
        # Rotate-half layout: both halves share angles. The first half's sine is stored negated,
        # so that apply_rotary's rotate-half is a single roll (see there).
        self.cos_table, self.sin_table = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)
        self.length = length

    def ensure(self, length: int, device) -> None:
        """Tables on `device` covering positions 0..length-1 (and at least what they covered)."""
        if self.cos_table.device != torch.device(device) or length > self.length:
            self._build(max(length, self.length), device)

    def __call__(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B or 1, T) positions -> cos, sin of shape (B or 1, T, head_dim)."""
        return self.cos_table[position_ids], self.sin_table[position_ids]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); cos/sin: (B, T, hd) from RotaryEmbedding, fp32 for accuracy at long positions.

    Rotate-half pairs channel i with i + hd/2: x * cos + [-x2, x1] * sin. Rolling x by hd/2 gives
    [x2, x1] in one op (instead of chunk, neg and cat), and the table's negated first-half sine
    supplies the minus sign: the same products, so the same bits.
    """
    x32 = x.float()
    rotated = x32 * cos.unsqueeze(1) + x32.roll(x.shape[-1] // 2, dims=-1) * sin.unsqueeze(1)
    return rotated.to(x.dtype)


class KVCache(nn.Module):
    """Keys and values for every position so far, preallocated to max_len and written at `pos`."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, device=None, dtype=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def rows(self, rows: slice, length: int) -> KVCache:
        """The same storage seen as rows[rows] and positions [0, length): writes go to this cache.
        lillm.batching prefills one slot through rows(slice(s, s + 1), n) and decodes the busy slots
        through rows(slice(0, busy), longest) so attention reads no more than is in use."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", self.k[rows, :, :length], persistent=False)
        view.register_buffer("v", self.v[rows, :, :length], persistent=False)
        return view

    def update(self, pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(pos, torch.Tensor) and pos.dim() == 1:
            # One position per row (continuous batching: every row is at its own length): write each
            # row's T new keys at its own place and return the cache's rows for this call (its first
            # B rows: lillm.batching may run fewer than it holds), every position, masked by the caller.
            rows = k.shape[0]
            if k.shape[2] == 1:  # a decoding step: index_put_, which torch.compile writes in place
                index = torch.arange(rows, device=k.device)
                self.k[index, :, pos] = k[:, :, 0]
                self.v[index, :, pos] = v[:, :, 0]
            else:
                where = (pos[:, None] + torch.arange(k.shape[2], device=k.device))[:, None, :, None].expand_as(k)
                self.k[:rows].scatter_(2, where, k)
                self.v[:rows].scatter_(2, where, v)
            return self.k[:rows], self.v[:rows]
        if isinstance(pos, torch.Tensor):
            # Fixed shapes for CUDA graphs (lillm.generate.StaticDecoder): write through an index
            # tensor, return the whole cache (the mask hides what is not written yet). No bounds
            # check: it would need the position on the host; StaticDecoder checks lengths first.
            where = pos + torch.arange(k.shape[2], device=k.device)
            self.k.index_copy_(2, where, k)
            self.v.index_copy_(2, where, v)
            return self.k, self.v
        end = pos + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; writing up to {end}. Call setup_cache with a larger max_len")
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        # Only the written part: attending over the empty tail costs time and is masked anyway.
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.cache: KVCache | None = None
        self.kv_prefix = None  # prefix tuning (lillm.peft.KVPrefix): (k, v, mask) -> longer k, v, mask
        # Decoding only (lillm.quant.fuse_projections): q, k and v as one matrix, one matmul instead of three.
        self.qkv_proj = None

    def project_qkv(self, x):
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        kv = self.n_kv_heads * self.head_dim
        return self.qkv_proj(x).split([self.n_heads * self.head_dim, kv, kv], dim=-1)

    def forward(self, x, cos, sin, mask=None, cache_pos=None):
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache_pos is not None:  # Transformer.forward has checked that the cache exists
            k, v = self.cache.update(cache_pos, k, v)
        if self.kv_prefix is not None:
            k, v, mask = self.kv_prefix(k, v, mask)
        # enable_gqa: each kv head serves n_heads / n_kv_heads query heads inside the kernel,
        # without copying k and v once per query head.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.gate_up_proj = None  # decoding only (lillm.quant.fuse_projections): gate and up as one matmul

    def forward(self, x):
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mlp: MLP | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.n_experts:  # Mixtral's module name, so the state dict is a Mixtral checkpoint as it is
            self.block_sparse_moe = SparseMoE(cfg)
        else:
            self.mlp = mlp if mlp is not None else MLP(cfg)

    @property
    def feed_forward(self) -> nn.Module:
        """The dense MLP, or the mixture of experts that stands in its place."""
        return self.block_sparse_moe if "block_sparse_moe" in self._modules else self.mlp

    def forward(self, x, cos, sin, mask=None, cache_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_pos)
        return x + self.feed_forward(self.post_attention_layernorm(x))


# A dense MLP's projections and the same projection in a Mixtral expert (w1 = gate, w3 = up, w2 = down).
EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def projection_slots(block: Block, name: str) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of the linear layer(s) a projection name means in this block: q/k/v/o_proj in
    the attention; gate/up/down_proj in the MLP or, in a mixture of experts, that projection of every
    expert. Every feature that wraps or replaces projections (LoRA, QLoRA, adapters, int8) goes through
    here, so it works on dense, shared-MLP and mixture-of-experts blocks alike. A mixture's router is no
    projection: it is left as it is (it decides which experts run; its cost is d_model x n_experts)."""
    if name in ATTENTION_PROJECTIONS:
        return [(block.self_attn, name)]
    if name not in EXPERT_NAMES:
        raise KeyError(f"{name} is not a projection; choose from {ATTENTION_PROJECTIONS + tuple(EXPERT_NAMES)}")
    feed_forward = block.feed_forward
    if isinstance(feed_forward, SparseMoE):
        return [(expert, EXPERT_NAMES[name]) for expert in feed_forward.experts]
    return [(feed_forward, name)]


class LlamaModel(nn.Module):
    """The trunk: embeddings, blocks, final norm (named `model.*` in the state dict)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        shared = MLP(cfg) if cfg.shared_mlp else None
        self.layers = nn.ModuleList(Block(cfg, shared) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, self.lm_head.weight.device)

    def _apply(self, fn, *args, **kwargs):
        # The rotary tables are not buffers (a dtype cast must not round them), so .to()/.cuda()
        # does not move them: rebuild them on the weights' device now. Built lazily inside a
        # compiled forward instead, they would change what the compiler saw and cost a second compile.
        super()._apply(fn, *args, **kwargs)
        self.rotary.ensure(self.rotary.length, self.model.embed_tokens.weight.device)
        return self

    # ---- construction ------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self):
        """Normal(0, 0.02) everywhere, and residual output projections scaled by 1/sqrt(2 * n_layers)
        (GPT-2, Radford et al. 2019) so the residual stream's variance does not grow with depth."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual_out = name.endswith(("o_proj", "down_proj", ".w2"))  # w2: an expert's down
                nn.init.normal_(module.weight, 0.0, residual_std if is_residual_out else std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields shared tensors once

    # ---- KV cache ------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_len: int, device=None, dtype=None):
        ref = self.model.embed_tokens.weight  # always float (lillm.quant may make the head int8)
        self.rotary.ensure(max_len, device or ref.device)  # fixed-shape steps look positions up blindly
        for block in self.model.layers:
            block.self_attn.cache = KVCache(batch_size, self.config.n_kv_heads, max_len, self.config.head_dim,
                                            device or ref.device, dtype or ref.dtype)

    def clear_cache(self):
        for block in self.model.layers:
            block.self_attn.cache = None

    # ---- forward -------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache_pos: int | torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab).

        attention_mask: (B, keys) with 1 for real tokens, 0 for padding; keys = T without a cache,
            and the cache length (cache_pos + T, or the whole cache) with one.
        segment_ids: (B, T) document ids for packed sequences: attention stays inside a document.
        cache_pos: where the T new tokens go in the KV cache (None = no cache). An int attends over
            the keys written so far; a 0-d tensor makes every shape fixed for CUDA graphs: keys are
            the whole cache, attention_mask (if given) covers the whole cache, and nothing is read
            back to the host. A (B,) tensor gives every row its own position (lillm.batching's slots):
            keys are the whole cache, each row sees its keys up to its own position, and the
            positions are also the rotary positions unless position_ids says otherwise.
        return_hidden: return the final normed hidden states (B, T, d_model) instead of the logits,
            for callers that need the logits of a few positions only (generate: the last one).
        """
        B, T = input_ids.shape if inputs_embeds is None else inputs_embeds.shape[:2]
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if cache_pos is None:
            n_keys, start = T, 0
        else:
            cache = self.model.layers[0].self_attn.cache
            if cache is None:
                raise RuntimeError("cache_pos given but no KV cache: call model.setup_cache(batch_size, max_len) first")
            if segment_ids is not None:
                raise ValueError("segment_ids (packed documents) are for training; not supported with a KV cache")
            fixed_shapes = isinstance(cache_pos, torch.Tensor)
            n_keys, start = (cache.max_len if fixed_shapes else cache_pos + T), cache_pos
        if not isinstance(start, torch.Tensor):  # positions known on the host: make sure the tables reach them
            self.rotary.ensure(start + T, x.device)
        per_row = isinstance(start, torch.Tensor) and start.dim() == 1
        query_pos = (start[:, None] if per_row else start) + torch.arange(T, device=x.device)  # (B, T) or (T,)
        if position_ids is None:
            position_ids = query_pos[None] if query_pos.dim() == 1 else query_pos
        cos, sin = self.rotary(position_ids)
        if isinstance(start, int) and start == 0 and attention_mask is None and segment_ids is None:
            mask = None  # queries 0..T-1 over keys 0..T-1: SDPA's causal kernel, no mask tensor
        else:
            mask = attention_mask_for(query_pos, n_keys, attention_mask, segment_ids)
        for block in self.model.layers:
            x = block(x, cos, sin, mask, cache_pos)
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)


def attention_mask_for(query_pos: torch.Tensor, n_keys: int, attention_mask: torch.Tensor | None = None,
                       segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """One boolean mask (B or 1, 1, T, keys) built from positions, as gpt-fast does: query i (at
    position query_pos[i]) sees key j when j <= query_pos[i] (causal, and never a cache slot not yet
    written), the key is not padding (attention_mask: (B, keys) with 1 for real tokens; missing
    trailing keys count as real) and, for packed documents, both are in the same segment.
    query_pos is (T,), or (B, T) when every row has positions of its own."""
    key_pos = torch.arange(n_keys, device=query_pos.device)
    mask = key_pos <= query_pos[..., None]  # (T, keys) or (B, T, keys)
    if attention_mask is not None:
        valid = attention_mask.bool()
        if valid.shape[1] < n_keys:  # the new tokens' own keys: real tokens
            valid = F.pad(valid, (0, n_keys - valid.shape[1]), value=True)
        mask = mask & valid[:, None, :n_keys]  # (B, T, keys)
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    # A padding query would attend to nothing (softmax of all -inf = NaN): let it see itself.
    mask = mask | (key_pos == query_pos[..., None])
    return mask[:, None] if mask.dim() == 3 else mask[None, None]
