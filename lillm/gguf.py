"""GGUF export: one file that llama.cpp (and ollama, LM Studio, ...) loads and runs as it is.

GGUF (github.com/ggml-org/ggml, docs/gguf.md) is llama.cpp's single-file format: a header of
typed key/value metadata (architecture, sizes, the whole tokenizer, the chat template), then
tensors, each either plain (f32, f16) or in a block-quantized type. Q8_0 stores every 32
consecutive weights of a row as 32 int8 values and one f16 scale (8.5 bits per weight, a
scale per block, so an outlier only costs precision in its own block); Q4_0 does the same with
4-bit values. The file is written with the `gguf` package, published by the llama.cpp project.

A lillm model is a Llama, so it is exported as llama.cpp's `llama` architecture. What needs care:

1. Rotary layout. lillm (like Hugging Face) rotates channel i of a head together with channel
   i + head_dim/2 ("rotate-half"). llama.cpp's `llama` architecture rotates adjacent channels
   (2i, 2i+1), the layout of Meta's original checkpoints. Attention scores only depend on
   q . k, so reordering the rows of q_proj and k_proj within each head the same way
   (`rotate_half_to_interleaved`) turns one layout into the other and changes no score;
   llama.cpp's own convert_hf_to_gguf.py does the same for Hugging Face Llama folders.
2. Tied embeddings: no `output.weight` tensor; llama.cpp then uses `token_embd.weight` as the head.
3. InkubaLM's shared MLP: GGUF's llama has one MLP per block, so the shared one is written into
   every block (state_dict() already lists it under every layer's names). A mixture of experts
   (lillm.moe, Mixtral's layout) is what llama.cpp's llama architecture runs for Mixtral: the router
   as ffn_gate_inp (kept f32, as llama.cpp's quantizer keeps it), each expert's w1/w3/w2 stacked
   into ffn_gate_exps/ffn_up_exps/ffn_down_exps, and expert_count / expert_used_count; llama.cpp
   routes as lillm does (softmax over the experts, the top k, their weights renormalised).
4. The tokenizer travels inside the file. lillm's byte-level BPE is GPT-2's scheme: vocab,
   merges and the pre-tokenizer "gpt-2" (the same regular expression as ByteLevel(use_regex=True)).
   An imported model's SentencePiece BPE (tokenizer.model) goes in as llama.cpp's "llama"
   tokenizer: pieces, scores and piece types, which llama.cpp segments as SentencePiece does.
5. The chat template (Jinja, as Hugging Face writes it) reproduces lillm's token-level template,
   so llama-cli / llama-server chat with an SFT model the way inference.py --chat does.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from . import checkpoint as ckpt
from .errors import GGUFExportError, read_json_file
from .folders import check_output_file, write_file_atomic
from .model import Transformer
from .tokenizer import Tokenizer
from .spm import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, SentencePieceModel

ARCH = "llama"
TYPES = {  # --type -> (GGML type of 2-D weights, GGUF general.file_type)
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
# lillm's parameter names (Hugging Face's) -> llama.cpp's, per block and for the trunk.
BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
BLOCK_NAMES["block_sparse_moe.gate.weight"] = "ffn_gate_inp.weight"  # a mixture's router
EXPERT_TENSOR = re.compile(r"block_sparse_moe\.experts\.(?P<e>\d+)\.(?P<w>w[123])\.weight")
EXPERT_STACKS = {"w1": "ffn_gate_exps.weight", "w3": "ffn_up_exps.weight", "w2": "ffn_down_exps.weight"}
TRUNK_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
# lillm's chat template (Tokenizer.apply_chat_template): <s>, then <|role|> content </s> per message.
# llama.cpp drops a leading bos_token from the rendered text when it adds BOS itself.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
                 "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
CHAT_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")


# ---- the rotary layout --------------------------------------------------------------------------
def rotate_half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection reordered per head so that output channel 2i holds rotate-half's
    channel i and 2i+1 holds channel i + head_dim/2: the pairs llama.cpp's rope rotates together."""
    out_features = weight.shape[0]
    head_dim = out_features // n_heads
    return (weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def interleaved_to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of rotate_half_to_interleaved (for reading a GGUF back)."""
    head_dim = weight.shape[0] // n_heads
    return (weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def check_exportable(model: Transformer, source: str) -> None:
    """Refuse, before any writing, a model whose tensors have no llama.cpp counterpart."""
    peft = getattr(model, "peft_config", None)
    if peft is not None:
        raise GGUFExportError(f"{source} holds a {peft.method} model (peft.json): its adapter tensors have no "
                              "llama.cpp counterpart; merge LoRA/QLoRA into the weights first "
                              "(lillm.peft.merge_and_unload, then save_checkpoint) and export that checkpoint")


def gguf_tensors(model: Transformer) -> list[tuple[str, torch.Tensor]]:
    """(llama.cpp name, fp32 tensor) for every tensor of the file: q/k rows permuted, a shared MLP
    once per block, a tied head omitted, a mixture's experts stacked (Mixtral's layout in llama.cpp:
    ffn_gate_inp is the router, ffn_{gate,up,down}_exps hold every expert's w1, w3, w2 along a first
    axis of n_experts)."""
    cfg = model.config
    out, experts = [], {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        tensor = tensor.detach().float().cpu()
        if name in TRUNK_NAMES:
            out.append((TRUNK_NAMES[name], tensor))
            continue
        _, _, layer, suffix = name.split(".", 3)  # model.layers.N.<suffix>
        if suffix == "self_attn.q_proj.weight":
            tensor = rotate_half_to_interleaved(tensor, cfg.n_heads)
        elif suffix == "self_attn.k_proj.weight":
            tensor = rotate_half_to_interleaved(tensor, cfg.n_kv_heads)
        expert = EXPERT_TENSOR.fullmatch(suffix)
        if expert:  # block_sparse_moe.experts.E.wN.weight: stacked once all experts of the layer are read
            stacked = experts.setdefault((layer, expert["w"]), [None] * cfg.n_experts)
            stacked[int(expert["e"])] = tensor
            if all(t is not None for t in stacked):
                out.append((f"blk.{layer}.{EXPERT_STACKS[expert['w']]}", torch.stack(stacked)))
            continue
        if suffix not in BLOCK_NAMES:
            raise GGUFExportError(f"{name} has no llama.cpp counterpart; lillm exports Llama and Mixtral-style "
                                  "models (see lillm/gguf.py)")
        out.append((f"blk.{layer}.{BLOCK_NAMES[suffix]}", tensor))
    return out


def encode_tensor(name: str, tensor: torch.Tensor, kind: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The bytes (or plain array) to store and their GGML type. Norms and a mixture's router stay f32
    (they are tiny and precision-critical); a quantized type needs rows that are whole blocks, else falls back to f16.
    In q4_0 files the embedding (also the head when tied) is stored as q8_0, as llama.cpp's own
    quantizer keeps the output layer at higher precision."""
    target = TYPES[kind][0]
    array = tensor.numpy()
    if tensor.dim() == 1 or target == gguf.GGMLQuantizationType.F32 or name.endswith("ffn_gate_inp.weight"):
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32  # norms and a mixture's router
    if target == gguf.GGMLQuantizationType.Q4_0 and name in ("token_embd.weight", "output.weight"):
        target = gguf.GGMLQuantizationType.Q8_0
    if target in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        block = gguf.GGML_QUANT_SIZES[target][0]
        if array.shape[-1] % block:
            target = gguf.GGMLQuantizationType.F16
        else:
            return gguf.quants.quantize(array.astype(np.float32), target), target
    return array.astype(np.float16), gguf.GGMLQuantizationType.F16


# ---- the tokenizer --------------------------------------------------------------------------------
@dataclass
class GGUFVocab:
    """What tokenizer.ggml.* holds: the model, the tokens and their types, merges or scores."""
    model: str                       # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list[str]
    types: list[int]                 # gguf.TokenType
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    pre: str | None = None           # the pre-tokenizer of a gpt2 model
    add_space_prefix: bool | None = None
    specials: dict[str, int] = field(default_factory=dict)  # token text -> id, for the chat template


def byte_level_vocab(tokenizer_json: dict, source: str) -> GGUFVocab:
    """lillm's byte-level BPE (tokenizer.json) as llama.cpp's gpt2 tokenizer."""
    model = tokenizer_json.get("model") or {}
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel":
        raise GGUFExportError(f"{source} is not a byte-level BPE tokenizer (model {model.get('type')!r}, "
                              f"pre-tokenizer {pre.get('type')!r}); for a SentencePiece model pass its "
                              "tokenizer.model with --sentencepiece")
    if not pre.get("use_regex", True) or pre.get("add_prefix_space", False):
        raise GGUFExportError(f"{source}: ByteLevel with use_regex={pre.get('use_regex')} add_prefix_space="
                              f"{pre.get('add_prefix_space')} has no llama.cpp pre-tokenizer; lillm's is "
                              "use_regex=true, add_prefix_space=false (GPT-2's)")
    if tokenizer_json.get("normalizer"):
        raise GGUFExportError(f"{source} has a normalizer, which llama.cpp's gpt2 tokenizer would not apply")
    vocab = model["vocab"]
    added = {t["id"]: t for t in tokenizer_json.get("added_tokens", [])}
    size = max([*vocab.values(), *added]) + 1
    tokens: list[str | None] = [None] * size
    for text, token_id in vocab.items():
        tokens[token_id] = text
    types = [int(gguf.TokenType.NORMAL)] * size
    for token_id, token in added.items():
        tokens[token_id] = token["content"]
        types[token_id] = int(gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED)
    for token_id, text in enumerate(tokens):
        if text is None:  # a hole in the ids: never produced, but llama.cpp needs a token per row
            tokens[token_id], types[token_id] = f"[PAD{token_id}]", int(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    specials = {tokens[i]: i for i, t in added.items() if t.get("special")}
    return GGUFVocab("gpt2", tokens, types, merges=merges, pre="gpt-2", specials=specials)


SPM_TYPES = {NORMAL: gguf.TokenType.NORMAL, UNKNOWN: gguf.TokenType.UNKNOWN, CONTROL: gguf.TokenType.CONTROL,
             USER_DEFINED: gguf.TokenType.USER_DEFINED, BYTE: gguf.TokenType.BYTE}


def sentencepiece_vocab(path: Path, tokenizer_json: Path | None = None) -> GGUFVocab:
    """A SentencePiece BPE model (tokenizer.model) as llama.cpp's llama tokenizer.

    Whether a space is put before the text: Hugging Face's Llama tokenizer.json does it with a
    Prepend("▁") normalizer even when the model's own spec says add_dummy_prefix=false (InkubaLM's
    does: transformers' legacy Llama tokenizer adds it), and the model was trained on what
    transformers produced, so the tokenizer.json beside it decides when there is one."""
    try:
        sp = SentencePieceModel.read(path)
    except ValueError as e:
        raise GGUFExportError(str(e)) from None
    types = [int(SPM_TYPES[t]) for t in sp.types]
    specials = {p: i for i, (p, t) in enumerate(zip(sp.pieces, sp.types)) if t in (CONTROL, UNKNOWN)}
    space_prefix = sp.add_dummy_prefix
    if tokenizer_json is not None and tokenizer_json.is_file():
        normalizer = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("normalizer") or {}
        steps = normalizer.get("normalizers", [normalizer])
        space_prefix = any(step.get("type") == "Prepend" and step.get("prepend") == "\u2581" for step in steps)
    return GGUFVocab("llama", list(sp.pieces), types, scores=list(sp.scores),
                     add_space_prefix=space_prefix, specials=specials)


def checkpoint_vocab(folder: Path, sentencepiece: Path | None = None) -> GGUFVocab:
    """The tokenizer to embed: an explicit or beside-the-weights tokenizer.model, else tokenizer.json."""
    sentencepiece = sentencepiece or (folder / "tokenizer.model" if (folder / "tokenizer.model").exists() else None)
    if sentencepiece is not None:
        if not Path(sentencepiece).is_file():
            raise GGUFExportError(f"--sentencepiece {sentencepiece} does not exist; pass the tokenizer.model of "
                                  "the model the checkpoint was imported from")
        beside = [folder / "tokenizer.json", Path(sentencepiece).parent / "tokenizer.json"]
        return sentencepiece_vocab(Path(sentencepiece), next((p for p in beside if p.is_file()), None))
    path = folder / "tokenizer.json"
    if not path.exists():
        raise GGUFExportError(f"{path} is missing: a GGUF file carries its tokenizer; copy the tokenizer.json "
                              "the model was trained with into the folder (or pass --sentencepiece tokenizer.model)")
    data = read_json_file(path, GGUFExportError)
    Tokenizer.from_file(path)  # loads, and is the tokenizer the checkpoint was saved with (its recorded hash)
    return byte_level_vocab(data, str(path))


def pad_vocab(vocab: GGUFVocab, vocab_size: int, source: str) -> None:
    """One token per embedding row: rows past the tokenizer (a vocabulary padded to a multiple of
    64) get never-produced [PADn] tokens; a tokenizer larger than the model is an error."""
    if len(vocab.tokens) > vocab_size:
        raise GGUFExportError(f"{source}: the tokenizer has {len(vocab.tokens)} tokens but the model's vocab_size is "
                              f"{vocab_size}; export with the tokenizer the model was trained with")
    for token_id in range(len(vocab.tokens), vocab_size):
        vocab.tokens.append(f"[PAD{token_id}]")
        vocab.types.append(int(gguf.TokenType.UNUSED))
        if vocab.scores is not None:
            vocab.scores.append(-1e9)


# ---- writing --------------------------------------------------------------------------------------
def write_metadata(writer: gguf.GGUFWriter, model: Transformer, vocab: GGUFVocab, kind: str, name: str) -> None:
    cfg = model.config
    writer.add_name(name)
    writer.add_file_type(TYPES[kind][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.d_ff)
    if cfg.n_experts:  # llama.cpp's llama graph runs these as Mixtral does: softmax, top k, renormalised
        writer.add_expert_count(cfg.n_experts)
        writer.add_expert_used_count(cfg.experts_per_token)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim * cfg.n_heads != cfg.d_model:  # llama.cpp assumes d_model / n_heads otherwise
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)

    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    for add, token_id in ((writer.add_bos_token_id, cfg.bos_id), (writer.add_eos_token_id, cfg.eos_id),
                          (writer.add_pad_token_id, cfg.pad_id)):
        if token_id is not None:
            add(token_id)
    unk = next((i for i, t in enumerate(vocab.types) if t == gguf.TokenType.UNKNOWN), None)
    if unk is None and "<unk>" in vocab.specials:
        unk = vocab.specials["<unk>"]
    if unk is not None:
        writer.add_unk_token_id(unk)
    # inference.py encodes prompts with <s> first and nothing after; llama.cpp does the same with these.
    writer.add_add_bos_token(cfg.bos_id is not None)
    writer.add_add_eos_token(False)
    if all(token in vocab.specials for token in CHAT_ROLE_TOKENS):
        writer.add_chat_template(CHAT_TEMPLATE)


def export_gguf(checkpoint: str | Path, out: str | Path, kind: str = "f16", overwrite: bool = False,
                sentencepiece: str | Path | None = None, progress: bool = False) -> Path:
    """Write a checkpoint folder (or a run folder's latest step) as a GGUF file for llama.cpp.

    kind: f32, f16, q8_0 or q4_0 (see encode_tensor for which tensors stay at higher precision).
    `out` goes through lillm.folders.check_output_file: never a folder, never inside a lillm folder
    (the checkpoint's own included), and an existing file is replaced only when it is a GGUF file and
    overwrite=True. It is written under a hidden temporary name beside `out` and renamed when complete.
    """
    if kind not in TYPES:
        raise GGUFExportError(f"unknown type {kind!r}; choose one of {', '.join(TYPES)}")
    out = Path(out)
    reads = {"the checkpoint": checkpoint, "--sentencepiece": sentencepiece}
    check_output_file(out, "gguf", overwrite=overwrite, flag="out", reads=reads)
    try:
        folder = ckpt.resolve_checkpoint(checkpoint)
        model = ckpt.load_model(folder)
    except ckpt.CheckpointError as e:
        raise GGUFExportError(str(e)) from None
    check_exportable(model, str(folder))
    vocab = checkpoint_vocab(folder, Path(sentencepiece) if sentencepiece else None)
    pad_vocab(vocab, model.config.vocab_size, str(folder))

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, ARCH)
        write_metadata(writer, model, vocab, kind, Path(folder).name)
        for name, tensor in gguf_tensors(model):
            data, ggml_type = encode_tensor(name, tensor, kind)
            writer.add_tensor(name, data, raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()

    out.parent.mkdir(parents=True, exist_ok=True)
    return write_file_atomic(out, write)
