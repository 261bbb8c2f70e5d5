"""Hugging Face interop: import any Llama folder (InkubaLM-0.4B included), export back.

Mixtral folders (a mixture of experts, lillm/moe.py) go through the same code: lillm names its
modules as Mixtral's checkpoints do (block_sparse_moe.gate, block_sparse_moe.experts.N.w1/w2/w3,
which transformers 5 still writes, fusing the experts into 3-d tensors only in memory).

A Llama checkpoint on the Hub is a folder: config.json, weights (model.safetensors,
sharded safetensors with an index, or the older pytorch_model.bin) and a tokenizer.
lillm's parameter names and rotary layout are Hugging Face's, so importing is
*validation plus copying*, never a permutation. The care goes into three places:

1. Refusing what lillm would silently get wrong: scaled RoPE, biases, sliding windows,
   other activations or architectures. A model that loads but computes something else
   is worse than an error.
2. Memory. The model is built on the meta device (no storage), materialised once in
   the target dtype, and filled one tensor at a time, so peak memory is the model plus
   one tensor, not two models. Pickles (.bin) are read only with
   torch.load(weights_only=True), which refuses any object that could run code.
3. InkubaLM's shared MLP (one MLP for all 8 layers): transformers writes a shared
   tensor once, so the file has MLP weights under one layer's names; other tools write
   identical copies under every layer. Both are detected and loaded as ONE module.
   Export unrolls it (plain LlamaForCausalLM has no sharing) and import folds it back.

Tokenizers (SentencePiece models, and repairing a broken tokenizer.json) are in lillm/spm.py.
"""
from __future__ import annotations

import json
import pickle
import re
import shutil
import struct
from pathlib import Path

import tokenizers
import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from .checkpoint import check_config_fits, fsync_tree, load_weights, replace_folder, unique_state_dict
from .config import ModelConfig, unsupported_hf_fields
from .errors import CheckpointError, HFError, HFFileNotFoundError, read_json_file
from .folders import check_replaceable, hidden_tmp, mark
from .model import Transformer

MLP_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.(.+)")
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


# ---- config.json --------------------------------------------------------------------
def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from a Llama config.json, refusing every field lillm does not implement."""
    problems = unsupported_hf_fields(hf)
    if hf.get("model_type") is None:
        problems.insert(0, "model_type is missing; lillm imports Llama and Mixtral models (model_type 'llama' or "
                           "'mixtral') only")
    rope = dict(hf.get("rope_parameters") or {})
    if problems:
        raise HFError(f"{source}: cannot import this model: " + "; ".join(problems))
    flat = dict(hf)
    if "rope_theta" in rope:
        flat["rope_theta"] = rope["rope_theta"]
    try:
        return ModelConfig.from_hf_dict(flat)
    except ValueError as e:
        raise HFError(f"{source}: {e}") from None


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise HFFileNotFoundError(f"{path} is missing: a Hugging Face model folder needs config.json "
                                  "(download it with the weights, e.g. huggingface-cli download <repo>)")
    return read_json_file(path, HFError)


# ---- weight files: which file holds which tensor, read one tensor at a time ----------------
class WeightFiles:
    """The tensors of a folder (single or sharded, safetensors or .bin), read one at a time."""

    FORMATS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        found = next((name for name in self.FORMATS if (folder / name).exists()), None)
        if found is None:
            raise HFFileNotFoundError(f"{folder} holds no weights: looked for {', '.join(self.FORMATS)}")
        self.description = found
        files = [folder / found]
        if found.endswith(".index.json"):
            files = self._shards(folder / found)
        self.safetensors = ".safetensors" in found
        self.file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._bin: dict[str, torch.Tensor] = {}
        for path in files:
            for name, shape in (self._scan_safetensors(path) if self.safetensors else self._scan_bin(path)):
                self.file_of[name], self.shapes[name] = path, shape

    @staticmethod
    def _shards(index: Path) -> list[Path]:
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise HFError(f"{index} has no 'weight_map' object; the index is corrupt")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (index.parent / shard).exists():
                raise HFFileNotFoundError(f"shard {shard} named in {index.name} is missing from {index.parent}; "
                                          "download every shard the index lists")
        return [index.parent / shard for shard in shards]

    @staticmethod
    def _scan_safetensors(path: Path):
        try:
            with safe_open(str(path), framework="pt") as f:
                return [(name, tuple(f.get_slice(name).get_shape())) for name in f.keys()]
        except (SafetensorError, OSError) as e:
            raise HFError(f"{path} is not a readable safetensors file ({e})") from None

    def _scan_bin(self, path: Path):
        with open(path, "rb") as f:
            head = f.read(4)
        # torch.save writes a zip archive (PK..), older versions a pickle (protocol byte 0x80 first)
        if not (head.startswith(b"PK") or head.startswith(b"\x80")):
            raise HFError(f"{path} is not a PyTorch weights file (neither a zip archive nor a pickle: corrupt, "
                          "truncated or another format); download it again, or use the model's safetensors files")
        try:
            tensors = _load_pickle_safely(path)
        except pickle.UnpicklingError as e:
            raise HFError(f"{path} was refused: it holds Python objects other than tensors, and unpickling them "
                          f"could run code ({str(e).splitlines()[0][:160]}). Use the model's safetensors files, "
                          "or convert this file with a tool you trust") from None
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise HFError(f"{path} is not a state dict (a mapping of names to tensors)")
        self._bin.update(tensors)
        return [(name, tuple(t.shape)) for name, t in tensors.items()]

    def read(self, name: str, rows: slice = slice(None)) -> torch.Tensor:
        if name not in self.file_of:
            raise HFError(f"{name} is not in the weight files of {self.description}")
        if not self.safetensors:
            return self._bin[name][rows]
        # Reopened per read on purpose: pages of a mapped file count as resident memory until
        # it is unmapped, so one long-lived mapping would add the whole file to peak memory.
        with safe_open(str(self.file_of[name]), framework="pt") as f:
            return f.get_slice(name)[rows] if rows != slice(None) else f.get_tensor(name)

    def copy_into(self, name: str, target: torch.Tensor, block_bytes: int = 64 << 20) -> None:
        """target.copy_(tensor `name`), converting dtype, reading blocks of rows of at most
        ~block_bytes, so a 0.5 GB embedding never sits in memory twice."""
        step = max(1, block_bytes // max(1, target[0].numel() * 4)) if target.dim() else None
        if step is None or step >= len(target):
            target.copy_(self.read(name))
            return
        for start in range(0, len(target), step):
            target[start:start + step].copy_(self.read(name, slice(start, start + step)))


def _load_pickle_safely(path: Path):
    """torch.load with weights_only=True (tensors and plain containers, never code); memory-mapped
    so tensors stay on disk until read, except for old non-zip files, which cannot be mapped."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=True)


# ---- import ---------------------------------------------------------------------------------
def _mlp_layout(weights: WeightFiles, n_layers: int) -> tuple[str, int]:
    """How the MLP is stored: 'once' (one layer's names), 'identical' (every layer, equal
    values) or 'per-layer'; and the layer that holds the shared copy."""
    layers: dict[int, set[str]] = {}
    for name in weights.shapes:
        if m := MLP_KEY.fullmatch(name):
            layers.setdefault(int(m[1]), set()).add(m[2])
    if len(layers) == 1 and n_layers > 1:
        return "once", next(iter(layers))
    if len(layers) != n_layers or n_layers == 1 or len({frozenset(s) for s in layers.values()}) != 1:
        return "per-layer", 0  # anything irregular is reported as missing keys by the loader
    for suffix in sorted(layers[0]):
        reference = weights.read(f"model.layers.0.mlp.{suffix}")
        for layer in range(1, n_layers):
            if not torch.equal(weights.read(f"model.layers.{layer}.mlp.{suffix}"), reference):
                return "per-layer", 0
    return "identical", 0


def _check_rotary_buffers(weights: WeightFiles, cfg: ModelConfig, names: list[str]) -> None:
    """Old transformers versions saved rotary_emb.inv_freq; it is derived, but must agree."""
    expected = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    for name in names:
        if not torch.allclose(weights.read(name).float(), expected, rtol=1e-4):
            raise HFError(f"{name} differs from plain RoPE with rope_theta={cfg.rope_theta}; "
                          "the model was saved with a different rotary embedding, lillm cannot reproduce it")


def import_llama(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 shared_mlp: bool | None = None, notes: list[str] | None = None, progress: bool = False) -> Transformer:
    """Load a Hugging Face Llama folder into a lillm Transformer, one tensor at a time.

    shared_mlp: None detects it (MLP stored once, or identical in every layer, or
    `lillm_shared_mlp` in config.json); False unrolls a shared MLP into per-layer copies.
    notes: if a list is given, lines saying what was found are appended to it.
    progress: show a tqdm bar while tensors are copied.
    Use `lillm.spm.load_tokenizer(folder)` for the tokenizer.
    """
    folder = Path(folder)
    hf = read_hf_config(folder)
    config_from_hf(hf, str(folder / "config.json"))  # refuse unsupported fields before reading weights
    weights = WeightFiles(folder)
    n_layers = hf["num_hidden_layers"]
    layout, owner = _mlp_layout(weights, n_layers)
    flagged = bool(hf.get("lillm_shared_mlp"))
    shared = (layout != "per-layer" or (flagged and n_layers == 1)) if shared_mlp is None else shared_mlp
    if (shared or flagged) and layout == "per-layer" and n_layers > 1:
        why = "shared_mlp=True was asked for" if shared_mlp else "config.json says lillm_shared_mlp"
        raise HFError(f"{folder}: {why}, but the weights hold a different MLP in each layer")
    cfg = config_from_hf({**hf, "lillm_shared_mlp": shared}, str(folder / "config.json"))
    try:  # the sizes config.json asks for against the weights' headers and this machine, before building
        check_config_fits(cfg, weights.shapes, f"{folder} ({weights.description})",
                          torch.empty((), dtype=dtype).element_size())
    except CheckpointError as e:
        raise HFError(str(e)) from None
    rotary = [n for n in weights.shapes if n.endswith("rotary_emb.inv_freq")]
    _check_rotary_buffers(weights, cfg, rotary)

    with torch.device("meta"):
        model = Transformer(cfg)
    plan = _plan(model, weights, layout, owner, set(weights.shapes) - set(rotary))
    # The key rules (missing, unexpected, misshapen: named in the error) are checkpoint.load_weights',
    # applied here to shape-only meta tensors so nothing is read before the plan is known to fit.
    meta = {target: torch.empty(weights.shapes[src], device="meta") for target, src in plan.items()}
    try:
        load_weights(model, meta, source=f"{folder} ({weights.description})")
    except CheckpointError as e:
        raise HFError(str(e)) from None

    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty gives every parameter fresh storage: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        targets = unique_state_dict(model).items()
        for target, tensor in tqdm(targets, desc="import", unit="tensor", disable=not progress):
            weights.copy_into(plan[target], tensor)
    if notes is not None:
        notes.append(f"weights: {weights.description}, {len(weights.shapes)} tensors")
        notes.append({"once": f"shared MLP: stored once (layer {owner}'s names)", "identical":
                      "shared MLP: identical copies in every layer", "per-layer": "MLP: one per layer"}[layout]
                     + ("; loaded as one module" if shared else "; loaded as separate copies"))
        if rotary:
            notes.append(f"ignored {len(rotary)} rotary_emb.inv_freq buffers (checked: plain RoPE)")
    return model


def _plan(model: Transformer, weights: WeightFiles, layout: str, owner: int, available: set[str]) -> dict[str, str]:
    """target parameter name -> file tensor name; redundant copies are value-checked and dropped."""
    cfg = model.config
    plan = {name: name for name in available}
    if cfg.tie_embeddings and "lm_head.weight" in plan:
        del plan["lm_head.weight"]
        if "model.embed_tokens.weight" in available and not torch.equal(
                weights.read("lm_head.weight"), weights.read("model.embed_tokens.weight")):
            raise HFError("config ties embeddings but lm_head.weight differs from model.embed_tokens.weight; "
                          "set tie_word_embeddings to false in config.json")
    if layout in ("once", "identical"):  # every target MLP tensor is read from the owner layer's copy
        stored = [m for n in available if (m := MLP_KEY.fullmatch(n)) and int(m[1]) == owner]
        plan = {k: v for k, v in plan.items() if not MLP_KEY.fullmatch(k)}
        for m in stored:
            plan.update({f"model.layers.{i}.mlp.{m[2]}": m[0] for i in ([0] if cfg.shared_mlp else range(cfg.n_layers))})
    return plan


# ---- export -----------------------------------------------------------------------------------
def write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]], metadata: dict | None = None) -> None:
    """Write tensors in the safetensors format (8-byte header length, JSON header, raw bytes),
    streaming each tensor; the same tensor may appear under several names without copies."""
    header, offset = {}, 0
    for name, t in tensors:
        if t.dtype not in ST_DTYPES:
            raise HFError(f"{name} has dtype {t.dtype}; export writes float32, bfloat16, float16 or float64")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, t in tensors:
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def export_llama(model: Transformer, folder: str | Path, tokenizer_path: str | Path | None = None,
                 overwrite: bool = False) -> Path:
    """Write a folder transformers loads with no custom code: shared MLP unrolled into every
    layer, tied embeddings written as tied (lm_head omitted). Atomic: tmp folder, then rename;
    an existing folder is replaced only if it is a lillm export and overwrite is set (lillm/folders.py)."""
    folder, cfg = Path(folder), model.config
    check_replaceable(folder, "export", overwrite=overwrite)
    tmp = hidden_tmp(folder)
    tensors = [(n, t) for n, t in model.state_dict().items() if not (cfg.tie_embeddings and n == "lm_head.weight")]
    dtype = str(tensors[0][1].dtype).removeprefix("torch.")
    # state_dict() lists a shared module under every path, so the MLP is unrolled here for free.
    write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"})
    hf = cfg.to_hf_dict()
    hf.pop("lillm_shared_mlp", None)
    hf["dtype"] = hf["torch_dtype"] = dtype  # "dtype" for transformers >= 5, "torch_dtype" before
    (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    generation = {"bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer_path is not None:
        _write_tokenizer_files(Path(tokenizer_path), tmp, cfg)
    mark(tmp, "export")
    fsync_tree(tmp)
    replace_folder(tmp, folder, "export", overwrite)
    return folder


def _write_tokenizer_files(tokenizer_path: Path, out: Path, cfg: ModelConfig) -> None:
    try:
        tok = tokenizers.Tokenizer.from_file(str(tokenizer_path))
    except Exception as e:  # tokenizers raises a bare Exception for invalid files
        raise HFError(f"{tokenizer_path} cannot be loaded ({e}); repair it with lillm.spm.load_tokenizer first") from None
    shutil.copyfile(tokenizer_path, out / "tokenizer.json")
    unk = json.loads(tok.to_str())["model"].get("unk_token")
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
                "clean_up_tokenization_spaces": False, "unk_token": unk}
    for key, token_id in (("bos_token", cfg.bos_id), ("eos_token", cfg.eos_id), ("pad_token", cfg.pad_id)):
        settings[key] = tok.id_to_token(token_id) if token_id is not None else None
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
