"""The training-step benchmark, and the pieces every lillm-vs-transformers comparison shares.

Fairness first: both sides get the same configuration (transformers' LlamaForCausalLM built from
`ModelConfig.to_hf_dict()`), the same weights (lillm's state dict loaded into it), the same
batch of token ids and targets, the same optimizer (lillm's `make_optimizer`: AdamW with decay
groups, fused on CUDA), the same dtype and thread count. Each side computes its loss its own way:
lillm with `lillm.train.causal_lm_loss` (what its training loop runs), transformers with the
cross-entropy of its logits in fp32 (what its `labels=` loss does). transformers is told
`use_cache=False` while training, as a user training with it would be.

Timing (`time_alternating`): a few warm-up calls per side, then repetitions that alternate the
two sides (lillm, transformers, transformers, lillm, ...) so that noise from other processes on
the machine hits both; we report the median of each side's repetitions. On CUDA every timed call
ends with a synchronize, or we would time only the kernel launches.

Memory: each measurement runs in a fresh subprocess (`step_memory_in_subprocess`), so one side's
allocations, caches and allocator pools never count against the other. The child builds the
model and optimizer, takes a baseline, runs a few training steps and reports the peak above the
baseline: gradients, optimizer state, activations and scratch space (the weights are excluded).
- CUDA: torch.cuda.max_memory_allocated() - memory_allocated() at the baseline.
- CPU (Linux): the process's peak resident set size (VmHWM in /proc/self/status) above the
  resident size (VmRSS) at the baseline; the peak is reset first by writing "5" to
  /proc/self/clear_refs, so building the model does not count. RSS sees everything torch's
  allocator takes from the OS, which tracemalloc (Python objects only) cannot.
"""
from __future__ import annotations

import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS_DIR = Path(__file__).resolve().parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lillm.config import ModelConfig, get_preset  # noqa: E402
from lillm.model import Transformer  # noqa: E402
from lillm.train import TrainConfig, causal_lm_loss, device_peak_flops, make_optimizer  # noqa: E402

SIDES = ("lillm", "transformers")


# ---- the two models ------------------------------------------------------------------------------
def bench_config(preset: str, min_len: int = 0, **changes) -> ModelConfig:
    """The preset, with max_seq_len raised to what the benchmark feeds it (no parameter changes)."""
    cfg = get_preset(preset)
    return cfg.replace(max_seq_len=max(cfg.max_seq_len, min_len), **changes)


def hf_model_like(cfg: ModelConfig, state_dict: dict | None = None):
    """transformers' LlamaForCausalLM with lillm's config, and lillm's weights when given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    theirs = LlamaForCausalLM(LlamaConfig(**cfg.to_hf_dict(), attn_implementation="sdpa"))
    if state_dict is not None:
        result = theirs.load_state_dict(state_dict, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise RuntimeError(f"parameter names differ between lillm and transformers: missing "
                               f"{result.missing_keys}, unexpected {result.unexpected_keys}")
    return theirs


def build_pair(cfg: ModelConfig, device, seed: int = 0):
    """(lillm Transformer, transformers LlamaForCausalLM) with identical fp32 weights on device."""
    torch.manual_seed(seed)
    ours = Transformer(cfg)
    theirs = hf_model_like(cfg, ours.state_dict())
    return ours.to(device), theirs.to(device)


# ---- timing --------------------------------------------------------------------------------------
def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(calls: dict[str, Callable[[], object]], repeats: int, warmup: int,
                     device="cpu") -> dict[str, list[float]]:
    """Seconds per call for each named call: warm-up, then alternating repetitions."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    synchronize(device)
    seconds = {name: [] for name in calls}
    names = list(calls)
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            calls[name]()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


def comparison_row(preset: str, metric: str, unit: str, ours: float, theirs: float,
                   higher_is_better: bool = True, **extra) -> dict:
    """One table row; `speedup` > 1 always means lillm is better (faster, or smaller)."""
    speedup = ours / theirs if higher_is_better else theirs / ours
    return dict(preset=preset, metric=metric, unit=unit, lillm=ours, transformers=theirs,
                speedup=speedup, **extra)


# ---- one training step ---------------------------------------------------------------------------
def autocast_for(device, dtype: torch.dtype):
    """bf16 autocast over fp32 weights (as lillm.train does on CUDA); nothing for fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def summed_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")


def make_train_step(side: str, model, device, dtype: torch.dtype, x: torch.Tensor, y: torch.Tensor,
                    compile_model: bool = False) -> Callable[[], float]:
    """A closure running forward, backward and an AdamW step of one side; returns nothing useful."""
    model.train()
    optimizer = make_optimizer(model, TrainConfig(), torch.device(device))
    forward = torch.compile(model) if compile_model else model
    if side == "lillm":
        batch = {"input_ids": x, "labels": y}

        def loss_of():  # what lillm.train.train runs
            loss_sum, count = causal_lm_loss(forward, batch)
            return loss_sum / count
    else:
        def loss_of():  # what transformers' own `labels=` loss computes, with lillm's targets
            return summed_loss(forward(input_ids=x, use_cache=False).logits, y) / y.numel()

    def step():
        with autocast_for(device, dtype):
            loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def random_batch(cfg: ModelConfig, batch: int, seq_len: int, device, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=generator)
    return ids[:, :-1].to(device), ids[:, 1:].to(device)


def bench_train(preset: str, device, dtype: torch.dtype, batch: int, seq_len: int, steps: int,
                warmup: int, compile_model: bool = False, memory: bool = True, threads: int = 1) -> list[dict]:
    """Tokens/s of a training step on both sides (and MFU on GPUs), plus step memory."""
    cfg = bench_config(preset, seq_len)
    ours, theirs = build_pair(cfg, device)
    x, y = random_batch(cfg, batch, seq_len, device)
    calls = {"lillm": make_train_step("lillm", ours, device, dtype, x, y, compile_model),
             "transformers": make_train_step("transformers", theirs, device, dtype, x, y, compile_model)}
    seconds = time_alternating(calls, steps, warmup, device)
    tokens = batch * seq_len
    ours_tps, theirs_tps = tokens / median(seconds["lillm"]), tokens / median(seconds["transformers"])
    extra = {"batch": batch, "seq_len": seq_len, "steps_per_s_lillm": ours_tps / tokens}
    peak = device_peak_flops(torch.device(device))
    if peak:
        flops = cfg.flops_per_token(seq_len)
        extra.update(mfu_lillm=ours_tps * flops / peak, mfu_transformers=theirs_tps * flops / peak)
    rows = [comparison_row(preset, f"train step B={batch} T={seq_len}", "tokens/s", ours_tps, theirs_tps, **extra)]
    del ours, theirs, calls
    gc.collect()
    if memory:
        used = {side: step_memory_in_subprocess(side, preset, batch, seq_len, device, dtype, threads)
                for side in SIDES}
        rows.append(comparison_row(preset, f"train step memory B={batch} T={seq_len}", "MB",
                                   used["lillm"] / 1e6, used["transformers"] / 1e6, higher_is_better=False,
                                   method=memory_method(device)))
    return rows


# ---- step memory, in a fresh process ---------------------------------------------------------------
def memory_method(device) -> str:
    if torch.device(device).type == "cuda":
        return "CUDA max_memory_allocated above the weights, fresh process per side"
    return "peak RSS (VmHWM) above the weights' RSS, fresh process per side"


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def step_memory(side: str, preset: str, batch: int, seq_len: int, device="cpu",
                dtype: torch.dtype = torch.float32, steps: int = 2) -> int:
    """Bytes a training step needs above the weights (run it in a fresh process for a fair number)."""
    cfg = bench_config(preset, seq_len)
    torch.manual_seed(0)
    model = Transformer(cfg)
    if side == "transformers":
        model = hf_model_like(cfg, model.state_dict())
    model.to(device)
    gc.collect()
    x, y = random_batch(cfg, batch, seq_len, device)
    step = make_train_step(side, model, device, dtype, x, y)
    if torch.device(device).type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        for _ in range(steps):
            step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark to the current RSS
    baseline = _proc_status_kb("VmRSS")
    for _ in range(steps):
        step()
    return (_proc_status_kb("VmHWM") - baseline) * 1024


CHILD = """
import json, sys, torch
sys.path[:0] = [{scripts!r}, {root!r}]
torch.set_num_threads({threads})
from bench_train import step_memory
print(json.dumps(step_memory({side!r}, {preset!r}, {batch}, {seq_len}, {device!r}, torch.{dtype})))
"""


def step_memory_in_subprocess(side: str, preset: str, batch: int, seq_len: int, device="cpu",
                              dtype: torch.dtype = torch.float32, threads: int = 1) -> int:
    code = CHILD.format(scripts=str(SCRIPTS_DIR), root=str(REPO_ROOT), threads=threads, side=side,
                        preset=preset, batch=batch, seq_len=seq_len, device=str(device),
                        dtype=str(dtype).removeprefix("torch."))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {side} on {preset} failed:\n{done.stderr[-2000:]}")
    return int(json.loads(done.stdout.strip().splitlines()[-1]))
