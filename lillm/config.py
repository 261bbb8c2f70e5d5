"""Model configuration: one dataclass, a few named presets, and exact parameter counts.

A Llama-style decoder (Touvron et al., 2023, "LLaMA: Open and Efficient Foundation
Language Models") is fully described by a handful of integers. Keeping them in one
dataclass lets every other module (the model, pruning, import/export, benchmarks)
agree on shapes, and lets us count parameters exactly *before* building anything:
the Buzuzu-Mavi score rewards small models, so the count is part of the objective.

The dataclass maps one-to-one onto Hugging Face's Llama `config.json`
(`to_hf_dict` / `from_hf_dict`), so a lillm checkpoint folder is readable by
transformers as it is. The one extension is `shared_mlp` (InkubaLM-0.4B uses a
single MLP for all of its layers), stored as `lillm_shared_mlp`. With `n_experts > 0` the MLP
of every layer is a mixture of experts (lillm/moe.py) and the config is Mixtral's
(`MixtralForCausalLM`); `d_ff` is then each expert's inner size.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from .errors import FlagError


def unsupported_hf_fields(hf: dict) -> list[str]:
    """What a Llama config.json asks for that lillm does not compute, each with its key named.

    Every load path (import from Hugging Face, reading a checkpoint) refuses these: a model that
    loads but computes something else (scaled RoPE, biases, another activation) is worse than an error."""
    problems = []
    if hf.get("model_type", "llama") not in ("llama", "mixtral"):
        problems.append(f"model_type is {hf.get('model_type')!r}; lillm imports Llama and Mixtral models "
                        "(model_type 'llama' or 'mixtral') only")
    rope = dict(hf.get("rope_parameters") or {})  # transformers >= 5 keeps rope_theta in here
    if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        problems.append(f"rope_scaling={hf.get('rope_scaling') or rope!r}: lillm implements plain RoPE only, "
                        "so positions would be encoded differently; use a model without RoPE scaling")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            problems.append(f"{key}=true: lillm's linear layers have no bias")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r}: lillm's MLP is SwiGLU (silu)")
    if hf.get("sliding_window") is not None:
        problems.append(f"sliding_window={hf['sliding_window']}: lillm attends to every earlier position")
    if hf.get("attention_dropout"):
        problems.append(f"attention_dropout={hf['attention_dropout']}: lillm has no dropout; set it to 0.0")
    if hf.get("quantization_config"):
        problems.append("quantization_config is set: the weights are quantized; use the full-precision model")
    return problems


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 512            # hidden size
    n_layers: int = 12
    n_heads: int = 16             # query heads
    n_kv_heads: int = 8           # key/value heads (grouped-query attention when < n_heads)
    d_ff: int = 1408              # SwiGLU inner size
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    shared_mlp: bool = False      # one MLP module used by every layer (InkubaLM)
    head_dim: int | None = None   # defaults to d_model // n_heads
    init_std: float = 0.02
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int | None = None
    n_experts: int = 0            # > 0: a mixture of this many SwiGLU experts in every layer (Mixtral)
    experts_per_token: int = 2    # k: experts each token is routed to
    router_aux_coef: float = 0.01  # weight of the load-balancing loss (Switch Transformer's alpha)
    router_z_coef: float = 0.0    # weight of the router z-loss (ST-MoE uses 0.001)

    def __post_init__(self):
        problems = []
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                problems.append(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
            else:
                object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim is not None and self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_experts < 0:
            problems.append(f"n_experts must be >= 0 (0 = a dense MLP), got {self.n_experts}")
        if self.n_experts and not 1 <= self.experts_per_token <= self.n_experts:
            problems.append(f"experts_per_token={self.experts_per_token} must be between 1 and n_experts={self.n_experts}")
        if self.n_experts and self.shared_mlp:
            problems.append("shared_mlp and n_experts > 0 cannot be combined: one MLP shared by every layer is dense")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    # ---- parameter counting -------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Exact parameter count per part; `total` counts shared tensors once."""
        d, hd = self.d_model, self.head_dim
        embed = self.vocab_size * d
        attention = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2  # q, o and k, v
        mlp = 3 * d * self.d_ff * max(1, self.n_experts)
        norms = 2 * d * self.n_layers + d
        counts = {
            "embed_tokens": embed,
            "lm_head": 0 if self.tie_embeddings else embed,
            "attention": attention * self.n_layers,
            "mlp": mlp * (1 if self.shared_mlp else self.n_layers),
            "norms": norms,
        }
        if self.n_experts:
            counts["router"] = d * self.n_experts * self.n_layers
        counts["total"] = sum(counts.values())
        return counts

    def num_params(self) -> int:
        return self.param_counts()["total"]

    def active_params(self) -> int:
        """Parameters used for one token: all of them, less the experts a token is not routed to."""
        idle_experts = max(0, self.n_experts - self.experts_per_token)
        return self.num_params() - idle_experts * 3 * self.d_model * self.d_ff * self.n_layers

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token (Kaplan et al. 2020, "Scaling Laws"; PaLM appendix B).

        Every weight used in a matmul costs 2 FLOPs per token forward (a shared MLP
        is *run* once per layer, so it counts n_layers times even though it is stored
        once). Attention scores and the weighted sum cost 2 * 2 * T * n_heads * head_dim
        per layer: they depend on the number of *query* heads, GQA only shrinks k/v
        projections. We count the full T x T product, as nanoGPT and PaLM do (the
        causal mask halves useful work, but kernels rarely skip it). Backward is twice
        the forward, so training is 3x. A mixture of experts counts the router and the k experts a
        token runs (active FLOPs, which is what MFU should measure), not all E.
        """
        T = seq_len or self.max_seq_len
        d, hd = self.d_model, self.head_dim
        mlp = 3 * d * self.d_ff * (self.experts_per_token if self.n_experts else 1) + d * self.n_experts
        per_layer_weights = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2 + mlp
        matmul_weights = per_layer_weights * self.n_layers + self.vocab_size * d  # lm_head
        attention = 2 * 2 * T * self.n_heads * hd * self.n_layers
        forward = 2 * matmul_weights + attention
        return 3 * forward if training else forward

    # ---- Hugging Face config.json ------------------------------------------
    def to_hf_dict(self) -> dict:
        out = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "intermediate_size": self.d_ff,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "initializer_range": self.init_std,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "pad_token_id": self.pad_id,
            "torch_dtype": "float32",
        }
        if self.shared_mlp:
            out["lillm_shared_mlp"] = True
        if self.n_experts:  # transformers' Mixtral: the same fields, plus the mixture's
            del out["mlp_bias"]
            out.update({
                "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                "num_local_experts": self.n_experts, "num_experts_per_tok": self.experts_per_token,
                "router_aux_loss_coef": self.router_aux_coef, "output_router_logits": False,
                "router_jitter_noise": 0.0, "sliding_window": None, "attention_dropout": 0.0,
                # transformers 5 reads rope_theta from here (its Mixtral default is 1e6, not 1e4)
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            })
            if self.router_z_coef:
                out["lillm_router_z_coef"] = self.router_z_coef
        return out

    @classmethod
    def from_hf_dict(cls, hf: dict) -> "ModelConfig":
        """Read the fields lillm models; hf.py validates unsupported ones before calling this."""
        try:
            n_heads = hf["num_attention_heads"]
            kwargs = dict(
                vocab_size=hf["vocab_size"],
                d_model=hf["hidden_size"],
                d_ff=hf["intermediate_size"],
                n_layers=hf["num_hidden_layers"],
                n_heads=n_heads,
                n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                max_seq_len=hf.get("max_position_embeddings", 2048),
                # transformers 5 moved rope_theta into rope_parameters
                rope_theta=float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                shared_mlp=bool(hf.get("lillm_shared_mlp", False)),
                head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
                init_std=float(hf.get("initializer_range", 0.02)),
            )
            if hf.get("num_local_experts"):  # Mixtral
                kwargs.update(n_experts=hf["num_local_experts"], experts_per_token=hf.get("num_experts_per_tok", 2),
                              router_aux_coef=float(hf.get("router_aux_loss_coef", 0.01)),
                              router_z_coef=float(hf.get("lillm_router_z_coef", 0.0)))
        except KeyError as e:
            raise ValueError(f"config.json is missing the key {e.args[0]!r}, which every Llama config has") from None
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = hf.get(key)
            if isinstance(value, list):  # some configs list several eos ids; the first is the canonical one
                value = value[0] if value else None
            if value is not None or key == "pad_token_id":
                kwargs[key.replace("_token", "")] = value
        return cls(**kwargs)

    def replace(self, **changes) -> "ModelConfig":
        if "d_model" in changes or "n_heads" in changes:
            changes.setdefault("head_dim", None)
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}; known fields: {sorted(known)}")
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # For tests and CPU smoke runs: every feature on (GQA, tied), tiny sizes.
    "tiny": ModelConfig(vocab_size=8192, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=176, max_seq_len=128),
    # A model that learns something in minutes on a laptop CPU.
    "small": ModelConfig(vocab_size=8192, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, d_ff=512, max_seq_len=256),
    # The CPU shrink road's teacher (8.0M): shrunk to about the small shape (scripts/recipe.sh --road shrink).
    "small-teacher": ModelConfig(vocab_size=8192, d_model=256, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=704,
                                 max_seq_len=256),
    # The lilLM recipe (about 39M parameters with tied embeddings).
    "lillm-39m": ModelConfig(vocab_size=8192, d_model=512, n_layers=12, n_heads=16, n_kv_heads=8, d_ff=1408, max_seq_len=512),
    "lillm-300m": ModelConfig(vocab_size=8192, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=8, d_ff=2816, max_seq_len=512),
    # Mixtures of experts (lillm/moe.py), each with the active size of the dense preset above it:
    # k=2 of E experts of half tiny's / lillm-39m's d_ff run per token.
    # moe-tiny: 684,864 parameters, 617,280 active per token (tiny: 616,768, plus the router's 512).
    "moe-tiny": ModelConfig(vocab_size=8192, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=88, max_seq_len=128,
                            n_experts=4, experts_per_token=2),
    # small-moe: the CPU benchmark's mixture (README), 8 experts of half small's d_ff, top 2.
    "small-moe": ModelConfig(vocab_size=8192, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, d_ff=256,
                             max_seq_len=256, n_experts=8, experts_per_token=2),
    # lillm-39m-moe: 117,502,464 parameters, 39,645,696 active per token (lillm-39m: 39,596,544).
    "lillm-39m-moe": ModelConfig(vocab_size=8192, d_model=512, n_layers=12, n_heads=16, n_kv_heads=8, d_ff=704,
                                 max_seq_len=512, n_experts=8, experts_per_token=2),
    # lelapa/InkubaLM-0.4B: 421,939,200 parameters because one MLP serves all 8 layers.
    "inkuba-0.4b": ModelConfig(
        vocab_size=61788, d_model=2048, n_layers=8, n_heads=32, n_kv_heads=32, d_ff=5632, max_seq_len=2048,
        rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, shared_mlp=True,
    ),
}

INKUBA_PARAMS = 421_939_200


def parse_overrides(items: list[str], flag: str = "--model") -> dict:
    """KEY=VALUE strings -> ModelConfig field values of the field's type ("n_layers=6 d_ff=704")."""
    types = {f.name: f.type for f in fields(ModelConfig)}
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in types:
            raise FlagError(f"{flag} {item!r}: give KEY=VALUE with KEY one of {', '.join(types)}")
        kind = str(types[key])
        try:
            if "bool" in kind:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                value = text.lower() in ("true", "1")
            elif "int" in kind and "None" not in kind:
                value = int(text)
            elif "float" in kind:
                value = float(text)
            else:
                value = None if text.lower() == "none" else int(text)
        except ValueError:
            raise FlagError(f"{flag} {item!r}: {text!r} is not a {kind} for {key}") from None
        overrides[key] = value
    return overrides


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
