"""A mixture of experts beside the dense model with the same active parameters: pretrain both with
pretrain.py on the same bins, batches and schedule, then compare training tokens/s, peak memory and
val bits per byte after the same number of steps.

    python -m bench.moe --data out/data --out out/bench_moe                    # CPU: small vs small-moe
    python -m bench.moe --data out/data --dense lillm-39m --moe lillm-39m-moe --seq-len 512 \\
        --global-batch-tokens 65536 --micro-batch 32 --steps 500                        # on a GPU

Each run is its own process; its peak resident memory (RSS) is read from the OS when it ends (on a
GPU, pretrain's peak allocated CUDA memory matters more; this script reports RSS only).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from lillm.config import get_preset

REPO = Path(__file__).resolve().parents[1]
# Runs a command and prints the peak RSS (KiB on Linux) of its process tree's largest process.
PEAK_RSS = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
            "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def run(preset: str, args) -> dict:
    out = Path(args.out) / preset
    cmd = [sys.executable, "pretrain.py", "--data", args.data, "--out", str(out), "--preset", preset,
           "--max-steps", str(args.steps), "--seq-len", str(args.seq_len),
           "--global-batch-tokens", str(args.global_batch_tokens), "--micro-batch", str(args.micro_batch),
           "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps), "--eval-every", str(args.steps),
           "--eval-batches", str(args.eval_batches), "--save-every", str(args.steps), "--log-every", "1",
           "--seed", str(args.seed)]
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, *cmd], cwd=REPO, check=True, capture_output=True, text=True)
    peak_kib = int(done.stdout.split("peak_rss_kib")[-1])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > 1]  # step 1 warms up
    final = next(r for r in reversed(records) if "val_bpb" in r)
    cfg = get_preset(preset)
    return {"preset": preset, "params": cfg.num_params(), "active_params": cfg.active_params(),
            "train_tokens_per_s": round(statistics.median(speeds)), "peak_rss_mib": round(peak_kib / 1024),
            "val_bpb": final["val_bpb"], "val_loss": final["val_loss"], "steps": args.steps}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="token bins from data/prepare_pretrain.py")
    parser.add_argument("--out", default="out/bench_moe")
    parser.add_argument("--dense", default="small")
    parser.add_argument("--moe", default="small-moe")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--global-batch-tokens", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--eval-batches", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args(argv)
    rows = [run(preset, args) for preset in (args.dense, args.moe)]
    print("| preset | params | active | train tokens/s | peak RSS MiB | val bpb |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['params']:,} | {r['active_params']:,} | {r['train_tokens_per_s']:,} | "
              f"{r['peak_rss_mib']:,} | {r['val_bpb']:.4f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    from lillm.cli import run_main  # one line for bad input, status 2 (lillm/cli.py)

    run_main(main)
