"""Checkpoint folders: written atomically, read safely, readable by Hugging Face as they are.

A checkpoint is a folder:
    config.json        the Llama schema (ModelConfig.to_hf_dict)
    model.safetensors  the weights, each shared tensor stored once
    tokenizer.json     the tokenizer the model was trained with (when known)
    train_state.pt     optimizer, schedule, step, RNG and loader states (only to resume)
    lillm.json         what produced it (stage, step, tokens, the tokenizer's sha256, ...)
    lillm-folder.json  the marker that says this folder is lillm's own checkpoint (lillm/folders.py)
    peft.json          only for a model wrapped by lillm.peft: the method whose tensors sit beside the base weights

Two rules make it safe. Writing: everything goes into a hidden `.<name>.tmp` first and is
renamed into place only when complete (a rename is atomic on POSIX), so a kill at any
instant leaves the previous checkpoint intact (the minimind pattern); an existing folder is
replaced only under the rules of lillm/folders.py (lillm's own checkpoint holding only lillm's
files, with overwrite asked for). Reading: weights
come from safetensors (no code runs while loading) and train_state.pt is read with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import tokenizers
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig, unsupported_hf_fields
from .errors import CheckpointError, InputFileError, read_json_file
from .folders import check_replaceable, discard, hidden_tmp, mark, publish_folder, write_file_atomic
from .model import Transformer
from .tokenizer import backend_sha256, recorded_sha256

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


# ---- atomic folders ---------------------------------------------------------------
def replace_folder(tmp: Path, final: Path, kind: str = "checkpoint", overwrite: bool = False) -> None:
    """Move a finished tmp folder into place. An existing `final` is replaced only when it is lillm's
    own `kind` folder, holding only lillm's files, and `overwrite` is set (lillm.folders.publish_folder)."""
    mark(tmp, kind)
    publish_folder(tmp, final, kind, overwrite)


def fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def save_checkpoint(folder: str | Path, model: Transformer, tokenizer_path: str | Path | None = None,
                    train_state: dict | None = None, info: dict | None = None,
                    state_dict: dict[str, torch.Tensor] | None = None, overwrite: bool = False) -> Path:
    """Write a checkpoint folder atomically (hidden tmp folder, then a rename). An existing folder is
    replaced only if it is a lillm checkpoint holding only lillm's files and `overwrite` is set."""
    folder = Path(folder)
    check_replaceable(folder, "checkpoint", overwrite=overwrite)  # before any work: refuse a user's folder
    tmp = hidden_tmp(folder)
    config = model.config.to_hf_dict()
    weights = {k: v.detach().contiguous().cpu() for k, v in unique_state_dict(model, state_dict).items()}
    config["torch_dtype"] = str(next(iter(weights.values())).dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # through write_file_atomic: safetensors' own writer would create the file with mode 0600
    write_file_atomic(tmp / WEIGHTS, lambda path: save_file(weights, str(path), metadata={"format": "pt"}))
    info = dict(info or {})
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        info["tokenizer_sha256"] = tokenizer_sha256(tmp / "tokenizer.json")
    if train_state is not None:
        torch.save(train_state, tmp / TRAIN_STATE)
    (tmp / "lillm.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    peft_config = getattr(model, "peft_config", None)  # set by lillm.peft.apply_peft
    if peft_config is not None:
        (tmp / PEFT_RECORD).write_text(json.dumps(peft_config.to_dict(), indent=2) + "\n")
    mark(tmp, "checkpoint")
    fsync_tree(tmp)
    replace_folder(tmp, folder, "checkpoint", overwrite)
    return folder


# ---- reading ----------------------------------------------------------------------
def _recover(folder: Path) -> Path:
    """If a swap was interrupted between its two renames, the previous folder is at a hidden
    `.<name>.replaced-<pid>` (or `<name>.old`, as older lillm versions named it): put it back."""
    if not folder.exists() and folder.parent.is_dir():
        for old in [*folder.parent.glob(f".{folder.name}.replaced-*"), folder.with_name(folder.name + ".old")]:
            if (old / "config.json").is_file():
                os.replace(old, folder)
                break
    return folder


def tokenizer_sha256(path: str | Path) -> str | None:
    """The hash lillm.tokenizer.Tokenizer.sha256 gives this tokenizer.json (None if it does not load)."""
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception:  # the Rust side raises a bare Exception; the loaders report it
        return None
    return backend_sha256(backend)


def own_tokenizer_sha256(folder: str | Path) -> str | None:
    """The hash of the tokenizer a checkpoint was saved with: recorded in lillm.json, else its tokenizer.json's."""
    folder = Path(folder)
    recorded = recorded_sha256(folder)
    if recorded:
        return recorded
    return tokenizer_sha256(folder / "tokenizer.json") if (folder / "tokenizer.json").is_file() else None


def need_folder(folder: Path, what: str = "checkpoint folder") -> None:
    """A missing path and a file where a folder is expected are different mistakes: say which."""
    if not folder.exists():
        raise InputFileError(f"{folder} does not exist; pass the path of a {what}")
    if not folder.is_dir():
        raise InputFileError(f"{folder} is a file, not a {what}; pass the folder that holds config.json "
                             "and model.safetensors")


def read_config(folder: str | Path) -> ModelConfig:
    folder = _recover(Path(folder))
    need_folder(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a checkpoint folder: {path.name} is missing "
                              "(a checkpoint holds config.json and model.safetensors)")
    hf = read_json_file(path, CheckpointError, "the checkpoint is corrupt, use an earlier one")
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path} is not a JSON object; the checkpoint is corrupt, use an earlier one")
    problems = unsupported_hf_fields(hf)
    if problems:
        raise CheckpointError(f"{path}: lillm cannot compute this model: " + "; ".join(problems))
    try:
        return ModelConfig.from_hf_dict(hf)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}; fix config.json or use another checkpoint") from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a weights file; the checkpoint is damaged, use an earlier one")
    if not path.exists():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, use an earlier one")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e}); use an earlier checkpoint") from None


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, from its header alone (nothing is loaded)."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a weights file; the checkpoint is damaged, use an earlier one")
    if not path.exists():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, use an earlier one")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e}); use an earlier checkpoint") from None


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (MemAvailable on Linux), or None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_config_fits(config: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str,
                      element_bytes: int = 4) -> None:
    """Before any module is built, the layers a config.json asks for must be the ones its weights hold,
    and the parameters must fit this machine's memory: a config asking for 10 million layers, or for
    widths whose tensors would not fit, is refused in a moment, not after building layers until memory
    runs out. (Each tensor's name and shape is checked next, by load_weights, before any is read.)"""
    layers = {int(m[1]) for name in shapes if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    held = max(layers) + 1 if layers else 0
    if config.n_layers != held:
        raise CheckpointError(f"{source}: config.json asks for num_hidden_layers={config.n_layers} but the weights "
                              f"hold {held} layers; config.json does not belong to these weights")
    wanted, free = config.num_params(), available_memory()
    if free is not None and wanted * element_bytes > free:
        raise CheckpointError(f"{source}: config.json asks for {wanted:,} parameters, "
                              f"{wanted * element_bytes / 2**30:,.1f} GiB in {element_bytes}-byte numbers, but this "
                              f"machine has {free / 2**30:,.1f} GiB available; check config.json, or use a machine "
                              "with more memory")


def load_model(folder: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> Transformer:
    folder = _recover(Path(folder))
    config = read_config(folder)
    peft = json.loads((folder / PEFT_RECORD).read_text()) if (folder / PEFT_RECORD).is_file() else None
    check_config_fits(config, weight_shapes(folder / WEIGHTS), str(folder / WEIGHTS))
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device="cpu")
    if config.tie_embeddings:  # to_empty allocates fresh storage: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    if peft is not None:  # LoRA/QLoRA/prefix/adapter tensors are in the weights too
        from .peft import rebuild_peft  # only checkpoints with adapters need LoRA and NF4
        rebuild_peft(model, peft)
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
    for old in run_dir.glob(".step_*.replaced-*"):
        _recover(old.with_name(old.name[1:].split(".replaced-")[0]))
    steps = [p for p in run_dir.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name) and is_complete(p)]
    return sorted(steps, key=lambda p: int(p.name.split("_")[1]))


def is_complete(folder: Path) -> bool:
    """A checkpoint holds at least its config and weights (a folder missing either was never finished)."""
    return (folder / "config.json").is_file() and (folder / WEIGHTS).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or the latest complete step_N inside a run folder."""
    folder = _recover(Path(path))
    need_folder(folder, "checkpoint folder or run folder")
    if (folder / "config.json").is_file():
        return folder
    steps = list_checkpoints(folder)
    if not steps:
        raise CheckpointError(f"{folder} is neither a checkpoint folder (config.json) nor a run folder with step_N "
                              "checkpoints; train one with pretrain.py, or import one with scripts/import_hf.py")
    return steps[-1]


def prune_checkpoints(run_dir: str | Path, keep_last: int, keep: set[str] = frozenset()) -> None:
    """Remove all but the last keep_last step folders (0: keep all), never those named in `keep`."""
    for stale in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        if stale.name in keep:
            continue
        discard(stale)  # renamed to a hidden name first: never listed half-deleted
