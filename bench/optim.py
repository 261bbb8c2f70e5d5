"""The cost of Muon against AdamW: a training step and the optimizer step alone, side by side.

    python -m bench.optim --presets small --batch 16 --seq-len 128 --threads 1 --repeats 10

Both optimizers get the same model (same init), the same batch and lillm.train's own
`make_optimizer` (AdamW with decay groups; with --optimizer muon, Muon for the blocks' matrices and
AdamW for the rest). Timed, alternating between the two (bench.harness.time_alternating), medians:
- step: forward + backward + optimizer step, as tokens/s;
- optimizer: `optimizer.step()` alone on the gradients of one backward pass (Muon's five
  Newton-Schulz iterations per matrix against AdamW's elementwise update).
The ratio muon / adamw of the step time is what Muon costs per step; whether it pays is the val
bits per byte at equal steps and equal minutes (docs/OPTIMIZERS.md). The load average is recorded
before and after: a ratio is only trustworthy when it stayed low.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from bench import harness
from lillm.config import PRESETS, get_preset
from lillm.loss import causal_lm_loss
from lillm.model import Transformer
from lillm.train import TrainConfig, make_optimizer

OPTIMIZERS = ("adamw", "muon")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small"], choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1 on a shared machine)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per optimizer, alternating")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default="out/bench_optim.json")
    args = parser.parse_args(argv)
    for name in ("batch", "seq_len", "threads", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def calls_for(preset: str, optimizer_name: str, batch: dict) -> dict:
    torch.manual_seed(0)
    model = Transformer(get_preset(preset))
    optimizer = make_optimizer(model, TrainConfig(optimizer=optimizer_name, lr=2e-3), torch.device("cpu"))

    def backward():
        loss, count = causal_lm_loss(model, batch)
        (loss / count).backward()

    def step():
        backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def optimizer_only():  # the gradients stay from the last backward: the step alone is timed
        optimizer.step()

    backward()
    return {"step": step, "optimizer": optimizer_only}


def measure(preset: str, args) -> list[dict]:
    ids = torch.randint(3, get_preset(preset).vocab_size, (args.batch, args.seq_len + 1),
                        generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    rows = []
    for what in ("step", "optimizer"):
        calls = {name: calls_for(preset, name, batch)[what] for name in OPTIMIZERS}
        seconds = {name: harness.median(s) for name, s in
                   harness.time_alternating(calls, args.repeats, args.warmup).items()}
        rows.append({"preset": preset, "what": what, **{f"{name}_s": seconds[name] for name in OPTIMIZERS},
                     "muon_over_adamw": seconds["muon"] / seconds["adamw"],
                     **({f"{name}_tokens_per_s": args.batch * args.seq_len / seconds[name] for name in OPTIMIZERS}
                        if what == "step" else {})})
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = [row for preset in args.presets for row in measure(preset, args)]
    record = {"command": " ".join([sys.executable, "-m", "bench.optim", *(sys.argv[1:] if argv is None else argv)]),
              "device": harness.device_name("cpu"), "torch": torch.__version__, "threads": args.threads,
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "rows": rows}
    print("| preset | timed | AdamW s | Muon s | Muon / AdamW | tokens/s AdamW | tokens/s Muon |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        tokens = (f"{r['adamw_tokens_per_s']:,.0f} | {r['muon_tokens_per_s']:,.0f}" if r["what"] == "step"
                  else "- | -")
        print(f"| {r['preset']} | {r['what']} | {r['adamw_s']:.4f} | {r['muon_s']:.4f} | "
              f"{r['muon_over_adamw']:.2f}x | {tokens} |")
    print(f"load average before {load_before}, after {record['load_average_after']}")
    harness.write_json(Path(args.json), record)
    print(json.dumps({"json": args.json}))
    return record


if __name__ == "__main__":
    main()
