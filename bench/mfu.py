"""Where does a GPU training step lose MFU? lillm alone, one preset, several ways to run the step.

    python -m bench.mfu --preset lillm-300m --batch 32                    # every variant
    python -m bench.mfu --variants model fused-compiled --attention cudnn flash --profile

python -m bench compares lillm with transformers the way lillm.train runs (the model compiled,
the fused head + loss of lillm/loss.py outside the compiled graph). This script times variants
of that step, to see what the compiler and the attention kernel are worth:
- model:          torch.compile(model); the fused loss runs eagerly (what lillm.train does)
- fused-compiled: the model and the fused loss compiled together, as one function
- plain-compiled: the model and a plain cross-entropy over full logits compiled together
- eager:          nothing compiled
each with SDPA's cuDNN or flash attention kernel (--attention; CUDA only). MFU is model FLOPs
(lillm.config.flops_per_token) per second over the device's bf16 peak (lillm.train); --profile
prints torch.profiler's top kernels of the first variant. A step's time is the median over
--steps of bench.harness's stopwatch (the host clock, waiting for the GPU at both ends). Each
variant compiles from scratch (torch._dynamo.reset), so its first steps take a minute on a GPU;
they are not timed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import harness
from lillm.config import get_preset
from lillm.loss import causal_lm_loss
from lillm.model import Transformer
from lillm.train import TrainConfig, device_peak_flops, make_optimizer

VARIANTS = ("model", "fused-compiled", "plain-compiled", "eager")


def mean_loss(model, batch: dict) -> torch.Tensor:
    total, count = causal_lm_loss(model, batch)
    return total / count


def plain_loss(model, batch: dict) -> torch.Tensor:
    logits = model(batch["input_ids"])
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())


def loss_function(variant: str, model, batch: dict):
    """A no-argument callable computing the mean loss the way the variant says."""
    if variant == "model":
        compiled = torch.compile(model)
        return lambda: mean_loss(compiled, batch)
    if variant == "fused-compiled":
        compiled = torch.compile(mean_loss)
        return lambda: compiled(model, batch)
    if variant == "plain-compiled":
        compiled = torch.compile(plain_loss)
        return lambda: compiled(model, batch)
    return lambda: mean_loss(model, batch)


def run_variant(args, variant: str, attention: str, device: torch.device) -> dict:
    cfg = get_preset(args.preset).replace(max_seq_len=args.seq_len)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    optimizer = make_optimizer(model, TrainConfig(), device)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(attention == "cudnn")
        torch.backends.cuda.enable_flash_sdp(attention == "flash")
    loss_of = loss_function(variant, model, batch)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with harness.Stopwatch(device) as warmup:
        for _ in range(args.warmup):
            step()
    if device.type == "cuda":
        harness.reset_peak_memory(device)  # the peak of the timed steps, not of compiling
    seconds = harness.median(harness.time_alternating({variant: step}, args.steps, 0, device)[variant])
    tokens_per_s = args.batch * args.seq_len / seconds
    peak = device_peak_flops(device)
    row = {"preset": args.preset, "variant": variant,
           "attention": attention if device.type == "cuda" else "default", "batch": args.batch,
           "seq_len": args.seq_len, "step_ms": round(seconds * 1000, 2), "tokens_per_s": round(tokens_per_s),
           "warmup_s": round(warmup.seconds, 1),
           "mfu": None if peak is None else round(tokens_per_s * cfg.flops_per_token(args.seq_len) / peak, 4)}
    if device.type == "cuda":
        row["peak_memory_gb"] = round(harness.read_memory(device).peak / 1e9, 2)
    if args.profile:
        print_profile(step, device)
        args.profile = False  # the first variant only
    return row


def print_profile(step, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=18, max_name_column_width=60), flush=True)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="lillm-300m")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--attention", nargs="+", choices=["cudnn", "flash"], default=["cudnn"],
                        help="SDPA kernels to try on CUDA (ignored on CPU)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compilation)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of the first variant")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for attention in args.attention if device.type == "cuda" else ["default"]:
        for variant in args.variants:
            rows.append(run_variant(args, variant, attention, device))
            print(json.dumps(rows[-1]), flush=True)
            torch._dynamo.reset()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    from lillm.cli import run_main  # one line for bad input, status 2 (lillm/cli.py)

    run_main(main)
