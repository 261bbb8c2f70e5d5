"""The training-step benchmark: forward + backward + AdamW step, lillm against transformers.

    python -m bench.train --presets tiny --steps 10     # python -m bench --what train, the same flags

Both sides get the same optimizer (lillm's `make_optimizer`: AdamW with decay groups, fused on
CUDA) besides the same config, weights, batch, dtype and threads (bench.harness). Each side
computes its loss its own way: lillm with `lillm.loss.causal_lm_loss` (what its training loop
runs), transformers with the cross-entropy of its logits in fp32 (what its `labels=` loss does).
transformers is told `use_cache=False` while training, as a user training with it would be.

Memory: each measurement runs in a fresh process (`python -m bench.train --step-memory ...`). The
child builds the model and optimizer, resets the peak, runs a few training steps and reports the
peak above what it held at the reset: gradients, optimizer state, activations and scratch space
(the weights are excluded). CUDA: max_memory_allocated; CPU: peak RSS (VmHWM); see bench.harness.
"""
from __future__ import annotations

import gc
import json
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench import harness
from lillm.config import ModelConfig
from lillm.loss import causal_lm_loss
from lillm.memory import autocast_for
from lillm.model import Transformer
from lillm.train import TrainConfig, device_peak_flops, make_optimizer


def add_arguments(parser) -> None:
    train = parser.add_argument_group("training step")
    train.add_argument("--steps", type=int, default=5, help="timed training steps per side")
    train.add_argument("--no-memory", dest="memory", action="store_false",
                       help="skip the step-memory measurement (two fresh subprocesses per preset)")


# ---- one training step ---------------------------------------------------------------------------
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
        with autocast_for("bf16" if dtype == torch.bfloat16 else "fp32", device):  # as lillm.train does
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
    cfg = harness.bench_config(preset, seq_len)
    ours, theirs = harness.build_pair(cfg, device)
    x, y = random_batch(cfg, batch, seq_len, device)
    calls = {"lillm": make_train_step("lillm", ours, device, dtype, x, y, compile_model),
             "transformers": make_train_step("transformers", theirs, device, dtype, x, y, compile_model)}
    seconds = harness.time_alternating(calls, steps, warmup, device)
    tokens = batch * seq_len
    ours_tps = tokens / harness.median(seconds["lillm"])
    theirs_tps = tokens / harness.median(seconds["transformers"])
    extra = {"batch": batch, "seq_len": seq_len, "steps_per_s_lillm": ours_tps / tokens}
    peak = device_peak_flops(torch.device(device))
    if peak:
        flops = cfg.flops_per_token(seq_len)
        extra.update(mfu_lillm=ours_tps * flops / peak, mfu_transformers=theirs_tps * flops / peak)
    rows = [harness.comparison_row(preset, f"train step B={batch} T={seq_len}", "tokens/s", ours_tps, theirs_tps,
                                   **extra)]
    del ours, theirs, calls
    gc.collect()
    if memory:
        used = {side: step_memory_in_subprocess(side, preset, batch, seq_len, device, dtype, threads)
                for side in harness.SIDES}
        rows.append(harness.comparison_row(preset, f"train step memory B={batch} T={seq_len}", "MB",
                                           used["lillm"] / 1e6, used["transformers"] / 1e6, higher_is_better=False,
                                           method=memory_method(device)))
    return rows


def compare(preset: str, args, dtype: torch.dtype) -> list[dict]:
    return bench_train(preset, args.device, dtype, args.batch, args.seq_len, args.steps, args.warmup,
                       args.compile, args.memory, args.threads)


COMPARISONS = {"train": compare}


# ---- step memory, in a fresh process ---------------------------------------------------------------
def memory_method(device) -> str:
    if torch.device(device).type == "cuda":
        return "CUDA max_memory_allocated above the weights, fresh process per side"
    return "peak RSS (VmHWM) above the weights' RSS, fresh process per side"


def step_memory(side: str, preset: str, batch: int, seq_len: int, device="cpu",
                dtype: torch.dtype = torch.float32, steps: int = 2) -> int:
    """Bytes a training step needs above the weights (run it in a fresh process for a fair number)."""
    cfg = harness.bench_config(preset, seq_len)
    torch.manual_seed(0)
    model = Transformer(cfg)
    if side == "transformers":
        model = harness.hf_model_like(cfg, model.state_dict())
    model.to(device)
    gc.collect()
    x, y = random_batch(cfg, batch, seq_len, device)
    step = make_train_step(side, model, device, dtype, x, y)
    baseline = harness.reset_peak_memory(device).now
    for _ in range(steps):
        step()
    return harness.read_memory(device).peak - baseline


def step_memory_in_subprocess(side: str, preset: str, batch: int, seq_len: int, device="cpu",
                              dtype: torch.dtype = torch.float32, threads: int = 1) -> int:
    settings = {"side": side, "preset": preset, "batch": batch, "seq_len": seq_len, "device": str(device),
                "dtype": str(dtype).removeprefix("torch."), "threads": threads}
    return int(harness.run_child("bench.train", "--step-memory", json.dumps(settings)))


def step_memory_child(settings: dict) -> int:
    """What `python -m bench.train --step-memory '{...}'` runs: one side's step memory."""
    settings = dict(settings)
    torch.set_num_threads(settings.pop("threads"))
    dtype = getattr(torch, settings.pop("dtype"))
    return step_memory(**settings, dtype=dtype)


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--step-memory"]:  # a measurement child: print one JSON line
        print(json.dumps(step_memory_child(json.loads(argv[1]))))
        return None
    parser = harness.argument_parser(__doc__, what=tuple(COMPARISONS))
    add_arguments(parser)
    return harness.run(harness.parse_args(parser, argv), argv, COMPARISONS)


if __name__ == "__main__":
    from lillm.cli import run_main  # one line for bad input, status 2 (lillm/cli.py)

    run_main(main)
