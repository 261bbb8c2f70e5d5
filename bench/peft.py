"""Benchmark full fine-tuning, LoRA, QLoRA, prefix tuning and adapters on one language-modelling task.

    python -m bench.peft --base /tmp/peft_base --data /tmp/lead_data --steps 40

Each method starts from the same base checkpoint, sees the same batches for the same number
of steps through lillm.train.train, and is scored by the mean next-token loss on the same dev
windows. Each method runs in its own process (bench.harness.run_child) so that memory figures
do not mix (bench.harness.read_memory):
- peak RSS: the process's resident-set high-water mark (VmHWM, reset through
  /proc/self/clear_refs just before training) minus its RSS at that moment, i.e. what
  training added (gradients, AdamW moments, activations, allocator slack);
- state: exact bytes of weights (+ NF4 buffers) and of gradients + AdamW moments of the
  trainable parameters (4 bytes each in fp32, times 3).
steps/s is the median over steps (the first step, which warms up allocations, excluded).
Also printed: the QLoRA memory saving and quantisation error on the base's projections, and
the tokenizer's fertility before and after expanding it with isiZulu tokens (lillm.vocab_expand).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench import harness
from lillm import checkpoint as ckpt
from lillm.folders import write_text_atomic
from lillm.corpora import documents_for
from lillm.bin_format import load_meta
from lillm.data import BinLoader, iter_eval_batches
from lillm.loss import causal_lm_loss
from lillm.nf4 import NF4Linear, dequantize_nf4, error_bound, quantize_nf4
from lillm.peft import METHODS, apply_peft, describe
from lillm.tokenizer import Tokenizer
from lillm.train import TrainConfig, train
from lillm.vocab_expand import expand_tokenizer, fertility_change, learn_new_merges

DEFAULT_LR = {"full": 3e-4, "lora": 2e-3, "qlora": 2e-3, "prefix": 5e-3, "adapters": 1e-3}
MIB = 2 ** 20


class Windows:
    """One micro batch of random training windows per optimizer step (seeded: same for every method)."""

    def __init__(self, loader: BinLoader):
        self.loader = loader

    def next_step(self):
        x, y = self.loader.next_batch()
        return [{"input_ids": x, "labels": y}]

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


@torch.no_grad()
def dev_loss(model, val_bin: Path, seq_len: int, batch: int, max_batches: int) -> float:
    total, count = 0.0, 0
    for x, y in iter_eval_batches(val_bin, seq_len, batch, max_batches):
        loss, n = causal_lm_loss(model, {"input_ids": x, "labels": y})
        total, count = total + loss.item(), count + int(n)
    return total / count


def state_bytes(model) -> dict[str, int]:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"weights": weights, "grads_and_adam": 3 * trainable}


# ----------------------------------------------------------------------------- one method, in its own process

def run_method(args, method: str) -> dict:
    torch.manual_seed(args.seed)
    data, base = Path(args.data), ckpt.resolve_checkpoint(Path(args.base))
    model = ckpt.load_model(base)
    prefix_ids = np.fromfile(data / "train.bin", dtype=load_meta(data)["dtype"], count=args.prefix_length)
    apply_peft(model, method, targets=args.lora_targets, rank=args.lora_rank, alpha=args.lora_alpha,
               prefix_length=args.prefix_length, adapter_size=args.adapter_size,
               **({"prefix_init_ids": prefix_ids.astype(np.int64)} if method == "prefix" else {}))
    eval_args = (data / "val.bin", args.seq_len, args.micro_batch, args.eval_batches)
    start_loss = dev_loss(model, *eval_args)
    lr = args.lr.get(method, DEFAULT_LR[method])
    loader = BinLoader(data / "train.bin", args.seq_len, args.micro_batch, seed=args.seed)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out_dir=out, max_steps=args.steps, lr=lr, warmup_steps=max(1, args.steps // 10),
                          weight_decay=0.0, eval_every=0, save_every=0, keep_last=1, log_every=1, precision="fp32",
                          seed=args.seed)
        rss_start = harness.reset_peak_memory().now  # VmHWM lowered to the current RSS
        with harness.Stopwatch() as watch:
            train(model, Windows(loader), cfg, info={"stage": "bench_peft", "peft": describe(model)})
        peak = harness.read_memory().peak
        records = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    step_seconds = [args.seq_len * args.micro_batch / r["tokens_per_s"] for r in records
                    if "tokens_per_s" in r and r["step"] > 1]
    counts = describe(model)
    return {"method": method, "lr": lr, "trainable_params": counts["trainable_params"],
            "trainable_percent": counts["trainable_percent"], "peak_rss_added_mib": (peak - rss_start) / MIB,
            "peak_rss_mib": peak / MIB, **{f"{k}_mib": v / MIB for k, v in state_bytes(model).items()},
            "steps_per_s": 1 / harness.median(step_seconds), "wall_s": watch.seconds,
            "dev_loss_start": start_loss, "dev_loss_end": dev_loss(model, *eval_args)}


def run_in_subprocess(args, method: str) -> dict:
    return harness.run_child("bench.peft", "--one", method, *args.passthrough)


# ----------------------------------------------------------------------------- QLoRA and vocabulary reports

@torch.no_grad()
def qlora_report(base: Path) -> dict:
    model = ckpt.load_model(base)
    nf4_bytes = bf16_bytes = within = elements = 0
    max_error = max_bound = squared_error = squared_norm = 0.0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not name.endswith("proj"):
            continue
        w = module.weight.float()
        q = quantize_nf4(w)
        error, bound = (w - dequantize_nf4(q)).abs(), error_bound(w, q)
        nf4_bytes, bf16_bytes = nf4_bytes + q.nbytes(), bf16_bytes + w.numel() * 2
        within, elements = within + int((error <= bound).sum()), elements + w.numel()
        max_error, max_bound = max(max_error, error.max().item()), max(max_bound, bound.max().item())
        squared_error, squared_norm = squared_error + error.square().sum().item(), squared_norm + w.square().sum().item()
    whole_bf16 = sum(p.numel() * 2 for p in model.parameters())
    quantised = apply_peft(ckpt.load_model(base), "qlora", targets="q,v")
    whole_qlora = sum(p.numel() * 2 for p in quantised.parameters() if not p.requires_grad)
    whole_qlora += sum(m.quantized.nbytes() for m in quantised.modules() if isinstance(m, NF4Linear))
    return {"projection_params": elements, "projections_bf16_mib": bf16_bytes / MIB, "projections_nf4_mib": nf4_bytes / MIB,
            "projection_saving": 1 - nf4_bytes / bf16_bytes, "bits_per_weight": 8 * nf4_bytes / elements,
            "whole_model_bf16_mib": whole_bf16 / MIB, "whole_frozen_base_qlora_mib": whole_qlora / MIB,
            "max_abs_error": max_error, "max_bound": max_bound, "relative_rms_error": (squared_error / squared_norm) ** 0.5,
            "fraction_within_bound": within / elements}


def fertility_section(tokenizer_path: Path, langs: list[str], n_new: int, data_dir) -> dict:
    base = Tokenizer.from_file(tokenizer_path)
    learn, held_out = [], []
    for index, (_, text) in enumerate(documents_for(langs, kinds=["mono", "news", "mt"], data_dir=data_dir)):
        (held_out if index % 50 == 0 else learn).append(text)
    expansion = expand_tokenizer(base, learn_new_merges(base, learn, n_new, show_progress=False))
    old_langs = [(name, text) for name, text in documents_for(["swa", "hau"], kinds=["mono"], data_dir=data_dir)][::50]
    return {"langs": langs, "new_tokens": len(expansion.new_tokens), "vocab": f"{base.vocab_size} -> {expansion.vocab_size}",
            "held_out": fertility_change(base, expansion.tokenizer, held_out),
            "swa_hau_held_out": fertility_change(base, expansion.tokenizer, [t for _, t in old_langs])}


# ----------------------------------------------------------------------------- the command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="out/pretrain", help="base checkpoint folder or run folder (latest step)")
    parser.add_argument("--data", default="out/data", help="token bins (train.bin, val.bin, meta.json) of the task")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-batches", type=int, default=10)
    parser.add_argument("--lr", default="", help="per-method learning rates, e.g. full=3e-4,lora=2e-3 "
                        f"(defaults {DEFAULT_LR})")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lora-targets", default="q,k,v,o,gate,up,down")
    parser.add_argument("--prefix-length", type=int, default=16)
    parser.add_argument("--adapter-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--expand-langs", default="zul", help="languages for the fertility report ('' to skip)")
    parser.add_argument("--expand-tokens", type=int, default=2000)
    parser.add_argument("--tokenizer", default=None, help="tokenizer to expand (default: the base's tokenizer.json)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--report", default=None, help="also write the results as JSON here")
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)  # internal: run one method, print JSON
    args = parser.parse_args(argv)
    args.passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    try:
        args.lr = {k: float(v) for k, v in (item.split("=") for item in args.lr.split(",") if item)}
    except ValueError:
        parser.error(f"--lr {args.lr!r}: expected method=rate pairs separated by commas, e.g. lora=2e-3")
    unknown = [m for m in [*args.methods.split(","), *args.lr] if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return args


def print_table(results: list[dict]) -> None:
    print("| method | trainable params | % | lr | peak RSS added (MiB) | weights (MiB) | grads+AdamW (MiB) "
          "| steps/s | dev loss start | dev loss end |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['method']} | {r['trainable_params']:,} | {r['trainable_percent']:.2f} | {r['lr']:g} "
              f"| {r['peak_rss_added_mib']:.1f} | {r['weights_mib']:.2f} | {r['grads_and_adam_mib']:.2f} "
              f"| {r['steps_per_s']:.2f} | {r['dev_loss_start']:.4f} | {r['dev_loss_end']:.4f} |")


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        print(json.dumps(run_method(args, args.one)))
        return
    base = ckpt.resolve_checkpoint(Path(args.base))
    print(f"base {base}, task {args.data}: {args.steps} steps of {args.micro_batch} x {args.seq_len} tokens, "
          f"torch threads {torch.get_num_threads()}, CPU count {os.cpu_count()}")
    results = []
    for method in args.methods.split(","):
        print(f"running {method} ...", flush=True)
        results.append(run_in_subprocess(args, method))
    print_table(results)
    report = {"results": results, "qlora": qlora_report(base)}
    print("QLoRA base:", json.dumps(report["qlora"], indent=1))
    if args.expand_langs:
        langs = args.expand_langs.split(",")
        report["fertility"] = fertility_section(Path(args.tokenizer or base / "tokenizer.json"), langs,
                                                args.expand_tokens, args.data_dir)
        fert = report["fertility"]
        print(f"fertility, {'+'.join(langs)} held out (tokens/word): {fert['held_out']['before']['tokens_per_word']:.3f}"
              f" -> {fert['held_out']['after']['tokens_per_word']:.3f}; swa+hau held out: "
              f"{fert['swa_hau_held_out']['before']['tokens_per_word']:.3f} -> "
              f"{fert['swa_hau_held_out']['after']['tokens_per_word']:.3f} ({fert['vocab']})")
    if args.report:
        write_text_atomic(args.report, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    from lillm.cli import run_main  # one line for bad input, status 2 (lillm/cli.py)

    run_main(main)
