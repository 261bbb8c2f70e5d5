"""THE training loop: pretraining, SFT and healing all run through `train()`.

The loop knows nothing of what it trains on. It takes
- a batch source: `next_step()` returns this rank's micro batches for one optimizer
  step (a list of dicts of tensors), with `state_dict()` / `load_state_dict()`;
- a loss function: `loss_fn(model, batch) -> (summed loss, number of target tokens)`; a batch
  whose loss is not a sum over tokens (DPO: over preference pairs) carries that count as `loss_count`.

Returning a *sum* and a count is what makes gradient accumulation and data parallelism
exact: the step's loss is sum / (tokens in the whole global batch), so one process
with 8 micro batches, two with 4 each, or a resumed run all compute the same gradient,
whatever the number of target tokens in each micro batch (which varies in SFT).

The rest is the standard recipe (nanoGPT, "Language Models are Few-Shot Learners"
appendix B): AdamW (Loshchilov & Hutter, 2019) without weight decay on norms and
biases (or Muon for the blocks' matrices, lillm/muon.py), linear warm-up then cosine
decay to a floor (or warmup-stable-decay, see `lr_at`), gradient clipping, bf16 autocast
on GPU, DDP (Li et al., 2020) with `no_sync` while accumulating, a guard that skips
steps whose loss or gradient is not finite, periodic evaluation, atomic checkpoints
that resume exactly, JSON-lines logs, a loss plot, and MFU (Chowdhery et al., 2022,
PaLM appendix B) against the peak of the device actually in use.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from . import checkpoint as ckpt
from .errors import FlagError, TrainingDiverged
from .folders import open_run_folder, write_file_atomic, write_text_atomic
from .loss import causal_lm_loss  # the default loss_fn; SFT and distillation pass their own
from .memory import PRECISION_HELP, PRECISIONS, BF16AdamW, autocast_for, checkpoint_blocks
from .model import Transformer
from .moe import router_metrics
from .muon import Muon, MuonWithAdamW, muon_matrices
from .options import at_least, between, option, positive
from .resume import adapt_optimizer_state, check_resume


@dataclass
class TrainConfig:
    """The loop's settings. Each field with a help text is also a flag of every stage script
    (lillm.options builds the flags, their checks and this config from the fields)."""
    out_dir: str = option("out/run", "run folder: checkpoints, log.jsonl, loss.png", flag="--out")
    max_steps: int = option(1000, "optimizer steps", check=at_least(1))
    lr: float = option(3e-4, "peak learning rate", check=positive())
    min_lr_ratio: float = option(0.1, "the schedule's floor as a fraction of --lr", check=between(0, 1))
    warmup_steps: int = option(100, "steps of linear warm-up from 0 to --lr", check=at_least(0))
    schedule: str = option("cosine", "after warm-up: cosine decay to the floor, or wsd (warmup-stable-decay): the "
                                     "peak lr until the last --decay-fraction of the steps, which decay by 1-sqrt; a "
                                     "WSD run keeps its stable-phase checkpoint, from which it can be continued for "
                                     "more steps", choices=("cosine", "wsd"))
    decay_fraction: float = option(0.2, "wsd: the fraction of --max-steps that decays",
                                   check=(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    optimizer: str = option("adamw", "adamw; or muon: Muon for the transformer blocks' matrices, AdamW (--lr) for "
                                     "embeddings, head and norms (lillm/muon.py)", choices=("adamw", "muon"))
    muon_lr: float = option(0.02, "Muon's peak learning rate (same schedule as --lr)", check=positive())
    muon_momentum: float = option(0.95, "Muon's Nesterov momentum", check=(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    weight_decay: float = option(0.1, "AdamW's decay of matrices and embeddings (never norms)", check=at_least(0))
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = option(1.0, "largest gradient norm (clipped above)", check=positive())
    eval_every: int = option(200, "steps between evaluations", check=(lambda v: v >= 0, "must be 0 (never) or more"))
    save_every: int = option(200, "steps between checkpoints",
                             check=(lambda v: v >= 0, "must be 0 (only at the end) or more"))
    keep_last: int = option(2, "step checkpoints to keep", check=(lambda v: v >= 0, "must be 0 (keep all) or more"))
    log_every: int = option(10, "steps between log lines", check=at_least(1))
    max_bad_steps: int = option(5, "non-finite steps in a row before stopping", check=at_least(1))
    compile: bool = option(False, "torch.compile the model")
    fsdp: bool = option(False, "shard the model over torchrun processes (FSDP2) instead of replicating it (DDP)")
    precision: str = option("auto", PRECISION_HELP, choices=PRECISIONS)
    activation_checkpointing: bool = option(
        False, "recompute each transformer block in the backward pass: much less activation memory for about a "
               "third more compute; losses and gradients unchanged")
    seed: int = option(1337, "seed of the initial weights, the data order and sampling")
    overwrite: bool = option(False, "start again in an existing run folder: removes its step_N folders, log.jsonl "
                                    "and loss.png (nothing else); without it an existing run is refused")
    seq_len: int | None = None          # the longest sequence of a step: MFU counts its FLOPs per token
    settings: object = None             # the stage's own settings (a dataclass), recorded in checkpoints
    keep_best: str | None = None        # an evaluation metric to maximise: its best step is kept in out_dir/best


@dataclass
class Progress:
    """Where a run is: saved in every checkpoint, restored on --resume."""
    step: int = 0
    tokens: int = 0
    bad_in_row: int = 0     # non-finite steps in a row (the run stops at cfg.max_bad_steps)
    bad_total: int = 0
    best_value: float | None = None   # the best value of cfg.keep_best so far, and its step
    best_step: int = 0


class BatchSource(Protocol):
    def next_step(self) -> list[dict[str, torch.Tensor]]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]


# ---- the pieces ---------------------------------------------------------------------
def decay_start(max_steps: int, decay_fraction: float) -> int:
    """WSD: the first step of the decay; steps before it run at the peak lr (after warm-up)."""
    return max_steps - round(decay_fraction * max_steps)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over warmup_steps, then the schedule down to the floor lr * min_lr_ratio.

    cosine: from lr down to the floor at max_steps (Loshchilov & Hutter, 2017).
    wsd, warmup-stable-decay (Hu et al., 2024, MiniCPM; Hagele et al., 2024, "Scaling Laws and
    Compute-Optimal Training Beyond Fixed Training Durations"): lr stays at its peak until the
    last decay_fraction of the steps, which fall to the floor by 1 - sqrt(progress), the cool-down
    shape Hagele et al. found better than linear (matching cosine at equal steps). Before the decay
    the lr does not depend on max_steps, so a checkpoint from the stable phase can be continued
    for more steps as if the longer run had been planned from the start (lillm keeps that
    checkpoint: see train()).
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        start = decay_start(cfg.max_steps, cfg.decay_fraction)
        if step < start:
            return cfg.lr
        progress = (step - start + 1) / (cfg.max_steps - start)  # the last step runs at the floor
        return floor + (cfg.lr - floor) * (1 - math.sqrt(min(1.0, progress)))
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW: decay matrices (and embeddings); never norms or biases, whose scale is their job.
    With cfg.optimizer == "muon", the blocks' matrices go to Muon instead (lillm/muon.py)."""
    matrices = muon_matrices(model, cfg.precision) if cfg.optimizer == "muon" else []
    to_muon = {id(p) for p in matrices}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in to_muon]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.precision == "bf16-true":  # bf16 moments, stochastic rounding (lillm.memory explains why)
        return BF16AdamW(groups, lr=cfg.lr, betas=cfg.betas, seed=cfg.seed)
    fused = device.type == "cuda"
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)
    if not matrices:
        return adamw
    muon = Muon([{"params": matrices, "lr_ratio": cfg.muon_lr / cfg.lr}], lr=cfg.muon_lr, momentum=cfg.muon_momentum)
    return MuonWithAdamW(muon, adamw)


# Dense bf16 tensor-core peaks from the vendors' datasheets; MFU is undefined elsewhere.
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
    "GH200": 989e12, "A100": 312e12, "A10G": 70e12, "A10": 125e12, "L40S": 362e12, "L4": 121e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # most specific name first
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


# ---- distributed --------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Plain `python` gives one process; `torchrun` sets RANK/WORLD_SIZE and we join its group."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ:
        return Dist(device=torch.device(device))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Dist(rank, world, local, torch.device(device, local) if device == "cuda" else torch.device(device))


def all_reduce_sum(value: torch.Tensor, env: Dist) -> torch.Tensor:
    if env.world > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


# ---- RNG and state -------------------------------------------------------------------
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2],
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
             "numpy_pos": int(np.random.get_state()[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- logging ---------------------------------------------------------------------------
class RunLog:
    """JSON lines in out_dir/log.jsonl, and a loss plot redrawn at every evaluation."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.path, self.enabled = out_dir / "log.jsonl", enabled
        self.train_points, self.val_points, self.score_points = [], [], []
        if enabled and self.path.exists():  # a resumed run keeps its history in the plot
            for record in self.records():
                self._remember(record)

    def records(self) -> list[dict]:
        """The log's records; a line cut short by a kill (or otherwise unreadable) is skipped, with a note."""
        records = []
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            elif line.strip():
                print(f"{self.path}, line {number}: not a JSON record (cut short by a kill?); dropped")
        return records

    def _remember(self, record: dict):
        if "loss" in record:
            self.train_points.append((record["tokens"], record["loss"]))
        if "val_loss" in record:
            self.val_points.append((record["tokens"], record["val_loss"]))
        if record.get("dev_score") is not None:  # --eval-tasks: the challenge's score on the dev split
            self.score_points.append((record["tokens"], record["dev_score"]))

    def truncate_after(self, step: int):
        """A killed run may have logged steps past its last checkpoint; they are redone, so drop them."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.train_points, self.val_points, self.score_points = [], [], []
        for record in kept:
            self._remember(record)

    def write(self, record: dict):
        if not self.enabled:
            return
        self._remember(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self):
        if not self.enabled or not self.train_points:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(*zip(*self.train_points), label="train", alpha=0.7)
        if self.val_points:
            ax.plot(*zip(*self.val_points), "o-", label="val")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
        if self.score_points:
            score_axis = ax.twinx()
            score_axis.plot(*zip(*self.score_points), "s-", color="tab:green", label="dev score (challenge)")
            score_axis.set_ylabel("the challenge's score on dev")
            score_axis.legend(loc="upper right")
        fig.tight_layout()
        write_file_atomic(self.path.with_name("loss.png"), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)


# ---- the loop --------------------------------------------------------------------------
def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def count_targets(batch: dict) -> torch.Tensor:
    """What a micro batch's summed loss is divided by: its labels != -100, unless the batch says
    otherwise in `loss_count` (DPO's loss is a sum over preference pairs, not over tokens)."""
    if "loss_count" in batch:
        return batch["loss_count"].sum()
    return (batch["labels"] != -100).sum()


def _wrap(model: torch.nn.Module, env: Dist, cfg: TrainConfig) -> torch.nn.Module:
    """DDP keeps a full replica per process; FSDP (Zhao et al., 2023) shards each block's
    parameters and optimizer state across processes, for models that do not fit one device."""
    wrapped = model
    if cfg.activation_checkpointing:  # before fully_shard: FSDP's gather hooks then wrap the recomputed forward
        checkpoint_blocks(model)
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard
        if env.world == 1:
            raise FlagError("--fsdp shards a model across processes: launch with torchrun --nproc_per_node=N (N > 1)")
        if not model.config.shared_mlp:  # a module shared by every block can only be sharded once, at the root
            for block in model.model.layers:
                fully_shard(block)
        fully_shard(model)
    elif env.world > 1:
        ids = [env.device.index] if env.device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def _full_states(model, optimizer, cfg: TrainConfig) -> tuple[dict | None, dict]:
    """Model and optimizer states as full tensors keyed by parameter name, whatever the sharding
    (a collective under FSDP: every rank must call it). Keyed by name, not position, so a run saved
    with FSDP resumes without it and the other way round."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=cfg.fsdp)
    model_state = get_model_state_dict(model, options=options) if cfg.fsdp else None
    return model_state, get_optimizer_state_dict(model, optimizer, options=options)


def _load_optimizer(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    state = adapt_optimizer_state(state, optimizer)  # a run resumed in another precision (lillm.resume)
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _load_latest(cfg: TrainConfig, model: Transformer) -> tuple[Path, dict]:
    latest, _ = check_resume(cfg, model)  # every difference from the run's recorded settings, named
    state = ckpt.load_train_state(latest)
    ckpt.load_weights(model, ckpt.read_weights(latest / ckpt.WEIGHTS), source=str(latest))
    return latest, state


def train(model: Transformer, source: BatchSource, cfg: TrainConfig, env: Dist | None = None,
          loss_fn: LossFn = causal_lm_loss, evaluate: Callable[[torch.nn.Module], dict] | None = None,
          tokenizer_path: str | Path | None = None, resume: bool = False, info: dict | None = None) -> dict:
    """Train until cfg.max_steps; returns the last metrics. See the module docstring."""
    env = env or Dist()
    out = Path(cfg.out_dir)
    # One writer per run folder (a lock file); a new run never mixes with an old one (lillm/folders.py).
    lock = open_run_folder(out, resume=resume, overwrite=cfg.overwrite) if env.is_main else None
    try:
        return _train(model, source, cfg, env, loss_fn, evaluate, tokenizer_path, resume, info, out)
    finally:
        if lock is not None:
            lock.release()


def _train(model, source, cfg, env, loss_fn, evaluate, tokenizer_path, resume, info, out) -> dict:
    model.to(env.device, dtype=torch.bfloat16 if cfg.precision == "bf16-true" else None)
    progress = Progress()
    if resume:  # weights go in before sharding; optimizer state once the optimizer exists
        latest, state = _load_latest(cfg, model)
        saved = state["config"].get("optimizer", "adamw")
        if saved != cfg.optimizer:  # the other optimizer's state cannot continue this one's
            raise FlagError(f"--resume: {latest} was trained with --optimizer {saved}, not {cfg.optimizer}; resume "
                            f"with --optimizer {saved}, or start a new run from its weights with --init-from")
    wrapped = _wrap(model, env, cfg)
    optimizer = make_optimizer(model, cfg, env.device)
    if resume:
        _load_optimizer(model, optimizer, state["optimizer"])
        source.load_state_dict(state["source"])
        set_rng_state(state["rng"])
        progress = Progress(**{k: state.get(k, v) for k, v in asdict(progress).items()})
        if env.is_main:
            print(f"resumed from {latest} at step {progress.step}")
    autocast = autocast_for(cfg.precision, env.device)
    peak = device_peak_flops(env.device)
    flops_per_token = model.config.flops_per_token(cfg.seq_len) if peak is not None and cfg.seq_len else None
    log = RunLog(out, env.is_main)
    if resume:
        log.truncate_after(progress.step)
    info = dict(info or {}, train_config=asdict(cfg))
    # WSD: the checkpoint at the end of the stable phase is kept whatever keep_last says, so the
    # run can be continued for more steps from it (lr_at; docs/ explains how).
    stable_end = decay_start(cfg.max_steps, cfg.decay_fraction) if cfg.schedule == "wsd" else None
    kept = {f"step_{stable_end:06d}"} if stable_end else set()

    def save(tag_step: int):
        model_state, optimizer_state = _full_states(model, optimizer, cfg)
        if env.is_main:
            state = {**asdict(progress), "optimizer": optimizer_state, "source": source.state_dict(),
                     "rng": rng_state(), "config": asdict(cfg)}
            ckpt.save_checkpoint(out / f"step_{tag_step:06d}", model, tokenizer_path, state,
                                 dict(info, step=tag_step, tokens=progress.tokens), state_dict=model_state,
                                 overwrite=True)  # a step folder of this locked run: lillm's own
            ckpt.prune_checkpoints(out, cfg.keep_last, keep=kept)
        if env.world > 1:
            dist.barrier()

    def keep_if_best(metrics: dict) -> None:
        """With cfg.keep_best, the checkpoint of the best evaluation so far in out/best (and out/best.json)."""
        value = metrics.get(cfg.keep_best) if cfg.keep_best else None
        if value is None or (progress.best_value is not None and value <= progress.best_value):
            return
        progress.best_value, progress.best_step = float(value), progress.step
        model_state, _ = _full_states(model, optimizer, cfg)
        if env.is_main:
            ckpt.save_checkpoint(out / "best", model, tokenizer_path, None, dict(info, step=progress.step,
                                 tokens=progress.tokens, best={cfg.keep_best: value}), state_dict=model_state,
                                 overwrite=True)
            write_text_atomic(out / "best.json", json.dumps({"step": progress.step, "metric": cfg.keep_best,
                                                                  "value": value, "folder": "best"}) + "\n")
            log.write({"step": progress.step, "tokens": progress.tokens, "best": {cfg.keep_best: value}})
        if env.world > 1:
            dist.barrier()

    def run_eval() -> dict:
        metrics = {}
        if evaluate is not None:  # every rank evaluates (FSDP forwards are collective); rank 0 logs
            with torch.no_grad(), autocast:
                metrics = evaluate(model)
            if env.is_main:
                log.write({"step": progress.step, "tokens": progress.tokens, **metrics})
                log.plot()
        if env.world > 1:
            dist.barrier()
        return metrics

    bar = tqdm(total=cfg.max_steps, initial=progress.step, disable=not env.is_main, dynamic_ncols=True)
    if env.is_main and peak is None:
        bar.write(f"MFU is not defined on {env.device} (no known peak FLOP/s); printing tokens/s only")
    metrics: dict = {}
    while progress.step < cfg.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(progress.step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)  # Muon's group: --muon-lr / --lr
        micro = [_to_device(b, env.device) for b in source.next_step()]
        targets = all_reduce_sum(sum(count_targets(b) for b in micro).float(), env)
        step_tokens = sum(b["input_ids"].numel() for b in micro) * env.world
        loss_total = torch.zeros((), device=env.device)
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            if cfg.fsdp:
                model.set_requires_gradient_sync(last)
            sync = nullcontext() if (env.world == 1 or last or cfg.fsdp) else wrapped.no_sync()
            with sync:
                with autocast:
                    loss_sum, _ = loss_fn(wrapped, batch)
                # DDP averages gradients over ranks; multiply by world so the result is sum / global targets.
                (loss_sum * env.world / targets.clamp(min=1)).backward()
            loss_total += loss_sum.detach().float()
        step_loss = all_reduce_sum(loss_total, env) / targets.clamp(min=1)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        progress.step += 1
        progress.tokens += step_tokens
        if not (torch.isfinite(step_loss) and torch.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            progress.bad_in_row += 1
            progress.bad_total += 1
            log.write({"step": progress.step, "tokens": progress.tokens, "skipped": "non-finite loss or gradient",
                       "bad_in_row": progress.bad_in_row})
            bar.write(f"step {progress.step}: non-finite loss/gradient, step skipped "
                      f"({progress.bad_in_row} in a row, {progress.bad_total} in all)")
            if progress.bad_in_row >= cfg.max_bad_steps:
                bar.close()
                last_good = ckpt.list_checkpoints(out)
                raise TrainingDiverged(
                    f"{progress.bad_in_row} non-finite steps in a row at step {progress.step}: stopping. "
                    f"Last good checkpoint: {last_good[-1] if last_good else 'none'}. Lower the learning rate "
                    "or check the data, then --resume.")
            bar.update(1)
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.bad_in_row = 0
        dt = time.perf_counter() - t0
        tokens_per_s = step_tokens / dt
        record = {"step": progress.step, "tokens": progress.tokens, "loss": round(step_loss.item(), 5),
                  "lr": lr, "grad_norm": round(grad_norm.item(), 4), "tokens_per_s": round(tokens_per_s, 1)}
        if flops_per_token is not None:
            record["mfu"] = round(flops_per_token * tokens_per_s / (peak * env.world), 4)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                        **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}))
        if progress.step % cfg.log_every == 0 or progress.step == 1:
            record.update(router_metrics(model))  # a mixture of experts' auxiliary losses; {} when dense
            log.write(record)
        metrics = record
        done = progress.step == cfg.max_steps
        if cfg.eval_every and (progress.step % cfg.eval_every == 0 or done):
            metrics = {**record, **run_eval()}
            keep_if_best(metrics)
            if env.is_main and "val_loss" in metrics:
                bar.write(json.dumps({k: metrics[k] for k in metrics if k.startswith("val") or k == "step"}))
        if (cfg.save_every and progress.step % cfg.save_every == 0) or done or progress.step == stable_end:
            save(progress.step)
    bar.close()
    return metrics
