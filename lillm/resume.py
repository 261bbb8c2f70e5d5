"""Resuming a run: the settings it was started with against the ones given now, every difference named.

A run continues exactly (lillm/train.py) only when it goes on with the same model, the same data
and the same batch: the loader's position, the optimizer's moments and the step count mean nothing
otherwise. Every checkpoint records how its run was started: `lillm.json` holds `train_config` (the
TrainConfig, with the stage's own settings, such as the preset, the data, --seq-len and the global
batch, in `settings`), `config.json` the model and `peft.json` a PEFT method. So `--resume` compares,
before any step and before anything heavy is read, what was recorded with what is given now, and
refuses in one line that names each difference ("global_batch_tokens 64 -> 128; preset tiny ->
small"), instead of failing later on a missing weight or an optimizer key.

What may change on resume is what steers the rest of the run and not what it has done: the schedule
(learning rate, warm-up, weight decay, clipping, --max-steps, which must be above the step reached),
the intervals (eval, save, log), how the loop runs (compile, FSDP, activation checkpointing) and the
precision: fp32 and bf16 autocast keep fp32 weights and moments, and bf16-true keeps them in bf16, so
a change between them casts the weights and the moments (adapt_optimizer_state). Each such change is
printed; the rest must be the same.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .errors import FlagError

# TrainConfig fields a resumed run may change (printed when they do); every other recorded setting,
# the stage's `settings` included, must be the same.
MAY_CHANGE = {"out_dir", "overwrite", "max_steps", "lr", "min_lr_ratio", "warmup_steps", "schedule", "decay_fraction",
              "muon_lr", "muon_momentum", "weight_decay", "betas", "grad_clip", "eval_every", "save_every", "keep_last",
              "log_every", "max_bad_steps", "compile", "fsdp", "activation_checkpointing", "precision",
              "flops_per_token", "seq_len"}  # seq_len: only for MFU (a stage's own seq_len is in its settings)
CHECKED_BY_THE_LOOP = {"optimizer"}  # lillm/train.py refuses another optimizer with its own message
SHOWN = 8  # differences named in one message


def _flat(settings: dict, prefix: str = "") -> dict:
    """{"settings.seq_len": 16, ...}: nested settings as dotted names, lists as tuples (JSON gives lists)."""
    out = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def _plain(value):
    """A setting as JSON would give it back (tuples become lists), for comparing."""
    return json.loads(json.dumps(value, default=str))


def differences(old: dict, new: dict) -> list[str]:
    """'name old -> new' for every setting that differs (missing on one side: 'none')."""
    old, new = _flat(_plain(old)), _flat(_plain(new))
    names = sorted(set(old) | set(new), key=lambda n: (n.count("."), n))
    return [f"{name.removeprefix('settings.')} {old.get(name, 'none')} -> {new.get(name, 'none')}"
            for name in names if old.get(name) != new.get(name)]


def _model_differences(folder: Path, model) -> list[str]:
    """The model recorded in a checkpoint (config.json, peft.json) against the one built now."""
    saved = ckpt.read_config(folder).to_dict()
    found = [f"model {d}" for d in differences(saved, model.config.to_dict())]
    peft_path = folder / ckpt.PEFT_RECORD
    saved_peft = json.loads(peft_path.read_text()) if peft_path.is_file() else None
    peft = getattr(model, "peft_config", None)
    peft = peft.to_dict() if peft is not None else None
    if (saved_peft or {}).get("method") != (peft or {}).get("method"):
        found.append(f"peft {(saved_peft or {}).get('method', 'none')} -> {(peft or {}).get('method', 'none')}")
    elif saved_peft and peft:
        found += [f"peft {d}" for d in differences(saved_peft, peft)]
    return found


def check_resume(cfg, model=None) -> tuple[Path, int]:
    """Refuse, naming every difference, a resume whose settings (or model) are not the run's; print the
    settings that may change and did. Returns (the latest checkpoint, its step)."""
    out = Path(cfg.out_dir)
    checkpoints = ckpt.list_checkpoints(out)
    if not checkpoints:
        raise ckpt.CheckpointError(f"--resume: no complete checkpoint (step_N folder) in {out}; "
                                   "start without --resume, or point --out at the run to continue")
    latest = checkpoints[-1]
    try:
        info = json.loads((latest / "lillm.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = {}
    step = int(info.get("step", latest.name.split("_")[-1]))
    recorded = info.get("train_config")
    now = asdict(cfg)
    fixed = lambda settings: {k: v for k, v in settings.items() if k not in MAY_CHANGE | CHECKED_BY_THE_LOOP}  # noqa: E731
    refused = [] if recorded is None else differences(fixed(recorded), fixed(now))
    if model is not None:
        refused += _model_differences(latest, model)
    if refused:
        shown = "; ".join(refused[:SHOWN]) + (f"; and {len(refused) - SHOWN} more" if len(refused) > SHOWN else "")
        raise FlagError(f"--resume: the run in {out} was started with other settings ({shown}); give the run's own "
                        f"settings to continue it, or start a new run in another --out (--init-from {latest} "
                        "starts one from its weights)")
    if cfg.max_steps <= step:
        raise FlagError(f"--max-steps {cfg.max_steps}: the run in {out} is at step {step} already; pass a --max-steps "
                        f"above {step} to continue it")
    changed = [] if recorded is None else differences(
        {k: recorded[k] for k in MAY_CHANGE if k in recorded and k not in ("out_dir", "overwrite", "max_steps")},
        {k: now[k] for k in MAY_CHANGE if k in recorded and k not in ("out_dir", "overwrite", "max_steps")})
    if changed:
        print(f"resuming {out} with changed settings: {'; '.join(changed)}")
    return latest, step


def adapt_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A saved (full, name-keyed) optimizer state made loadable into `optimizer` when the precision
    changed: each parameter group keeps the settings this optimizer has (AdamW's amsgrad, foreach, ...
    are not BF16AdamW's, and the other way round) and takes its own for the rest. The moments are cast
    to each parameter's dtype by torch's own load_state_dict."""
    current = optimizer.param_groups
    groups = []
    for index, saved in enumerate(state["param_groups"]):
        own = {k: v for k, v in current[min(index, len(current) - 1)].items() if k != "params"}
        groups.append({**own, **{k: v for k, v in saved.items() if k in own or k == "params"}})
    return {**state, "param_groups": groups}
