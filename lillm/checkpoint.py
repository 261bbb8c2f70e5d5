"""Checkpoint folders: written atomically, read safely, readable by Hugging Face as they are.

A checkpoint is a folder:
    config.json        the Llama schema (ModelConfig.to_hf_dict)
    model.safetensors  the weights, each shared tensor stored once
    tokenizer.json     the tokenizer the model was trained with (when known)
    train_state.pt     optimizer, schedule, step, RNG and loader states (only to resume)
    lillm.json         what produced it (stage, step, tokens, trained parameters, ...)
    peft.json          only for a model wrapped by lillm.peft: the method whose tensors sit beside the base weights

Two rules make it safe. Writing: everything goes into `<name>.tmp` first and is
renamed into place only when complete (a rename is atomic on POSIX), so a kill at any
instant leaves the previous checkpoint intact (the minimind pattern). Reading: weights
come from safetensors (no code runs while loading) and train_state.pt is read with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .errors import CheckpointError
from .model import Transformer

WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"
PEFT_RECORD = "peft.json"  # only beside adapted weights: the lillm.peft method whose tensors they hold


# ---- state dicts with shared tensors ---------------------------------------------
def unique_state_dict(model: Transformer, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state dict with every shared tensor once: a tied lm_head is dropped (config says
    tie_word_embeddings) and a shared MLP is kept under layer 0's names only (as transformers
    itself saves InkubaLM). `state_dict` replaces model.state_dict() (e.g. one gathered from FSDP shards)."""
    cfg = model.config
    out = {}
    for name, tensor in (state_dict if state_dict is not None else model.state_dict()).items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        if cfg.shared_mlp and re.match(r"model\.layers\.[1-9]\d*\.mlp\.", name):
            continue
        out[name] = tensor
    return out


def load_weights(model: Transformer, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy `tensors` into `model`, refusing missing, unexpected or misshapen keys by name.

    Accepts what unique_state_dict writes and also the redundant forms other tools write:
    lm_head present although tied (must then equal the embedding or it is an error), and a
    shared MLP stored under every layer (all copies must be identical).
    """
    cfg = model.config
    expected = unique_state_dict(model)
    tensors = dict(tensors)
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        head = tensors.pop("lm_head.weight")
        embed = tensors.get("model.embed_tokens.weight")
        if embed is not None and not torch.equal(head, embed):
            raise CheckpointError(f"{source}: config ties embeddings but lm_head.weight differs from "
                                  "model.embed_tokens.weight; set tie_word_embeddings to false in config.json")
    if cfg.shared_mlp:
        for name in [n for n in tensors if re.match(r"model\.layers\.[1-9]\d*\.mlp\.", n)]:
            reference = tensors.get(re.sub(r"layers\.\d+\.", "layers.0.", name))
            copy = tensors.pop(name)
            if reference is not None and not torch.equal(copy, reference):
                raise CheckpointError(f"{source}: config says the MLP is shared but {name} differs from layer 0's copy")
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the config. Missing: {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}; unexpected: {unexpected[:8]}"
                              f"{' ...' if len(unexpected) > 8 else ''}")
    for name, target in expected.items():
        if tuple(tensors[name].shape) != tuple(target.shape):
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, "
                                  f"the config needs {tuple(target.shape)}")
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name])


# ---- atomic files and folders -----------------------------------------------------------
def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file (a report, a JSON file) so that readers see the old or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


# ---- atomic folders ---------------------------------------------------------------
def replace_folder(tmp: Path, final: Path) -> None:
    """Move a finished tmp folder into place; an existing `final` is swapped out, then removed."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def save_checkpoint(folder: str | Path, model: Transformer, tokenizer_path: str | Path | None = None,
                    train_state: dict | None = None, info: dict | None = None,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # a leftover from an interrupted save: never complete, safe to drop
    tmp.mkdir(parents=True)
    config = model.config.to_hf_dict()
    weights = {k: v.detach().contiguous().cpu() for k, v in unique_state_dict(model, state_dict).items()}
    config["torch_dtype"] = str(next(iter(weights.values())).dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
    if train_state is not None:
        torch.save(train_state, tmp / TRAIN_STATE)
    (tmp / "lillm.json").write_text(json.dumps(info or {}, indent=2, default=str) + "\n")
    peft_config = getattr(model, "peft_config", None)  # set by lillm.peft.apply_peft
    if peft_config is not None:
        (tmp / PEFT_RECORD).write_text(json.dumps(peft_config.to_dict(), indent=2) + "\n")
    fsync_tree(tmp)
    replace_folder(tmp, folder)
    return folder


# ---- reading ----------------------------------------------------------------------
def _recover(folder: Path) -> Path:
    """If a swap was interrupted between its two renames, the previous checkpoint is at .old."""
    old = folder.with_name(folder.name + ".old")
    if not folder.exists() and old.exists():
        os.replace(old, folder)
    return folder


def read_config(folder: str | Path) -> ModelConfig:
    folder = _recover(Path(folder))
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder} is not a checkpoint folder: {path.name} is missing "
                              "(a checkpoint holds config.json and model.safetensors)")
    try:
        return ModelConfig.from_hf_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt, use an earlier one") from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, use an earlier one")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e}); use an earlier checkpoint") from None


def load_model(folder: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> Transformer:
    folder = _recover(Path(folder))
    config = read_config(folder)
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device="cpu")
    if config.tie_embeddings:  # to_empty allocates fresh storage: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    if (folder / PEFT_RECORD).is_file():  # LoRA/QLoRA/prefix/adapter tensors are in the weights too
        from .peft import rebuild_peft  # only checkpoints with adapters need LoRA and NF4
        rebuild_peft(model, json.loads((folder / PEFT_RECORD).read_text()))
    load_weights(model, read_weights(folder / WEIGHTS), source=str(folder / WEIGHTS))
    return model.to(device=device, dtype=dtype)


def load_train_state(folder: str | Path) -> dict:
    path = _recover(Path(folder)) / TRAIN_STATE
    if not path.exists():
        raise CheckpointError(f"{path} is missing: this folder holds weights only and cannot resume training "
                              "(start a new run from it with --init-from instead)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for truncated zips and refused pickles
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                              "it is corrupt or not a lillm train state; resume from an earlier checkpoint") from None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step checkpoints in a run folder, oldest first (`.tmp` folders are never complete)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return []
    for old in run_dir.glob("step_*.old"):
        _recover(old.with_name(old.name.removesuffix(".old")))
    steps = [p for p in run_dir.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    return sorted(steps, key=lambda p: int(p.name.split("_")[1]))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or the latest complete step_N inside a run folder."""
    folder = _recover(Path(path))
    if (folder / "config.json").is_file():
        return folder
    steps = list_checkpoints(folder)
    if not steps:
        raise CheckpointError(f"{folder} is neither a checkpoint folder (config.json) nor a run folder with step_N "
                              "checkpoints; train one with pretrain.py, or import one with scripts/import_hf.py")
    return steps[-1]


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    for stale in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(stale)
