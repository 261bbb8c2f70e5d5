"""Peak memory of one training step, per setting, measured and estimated; and what fits a 16 or 24 GB GPU.

    python -m bench.memory                                   # CPU: small batch, the default presets
    python -m bench.memory --presets lillm-39m --settings autocast checkpointing --batch 2 --seq-len 64
    python -m bench.memory --device cuda --batch 8 --seq-len 512   # GPU rows (torch.cuda.max_memory_allocated)
    python -m bench.memory --fit-only                        # only the estimate's table of what fits

Settings (lillm.train's own switches):
- autocast:      full fine-tuning, bf16 autocast over fp32 weights on CUDA (fp32 on the CPU, which has no
                 bf16 autocast in lillm.train)
- bf16-true:     full fine-tuning, weights, gradients and AdamW moments in bf16 (lillm.memory.BF16AdamW)
- checkpointing: autocast plus activation checkpointing of every block (lillm.memory.checkpoint_blocks)
- lora, qlora:   LoRA / QLoRA (rank 16 on every projection) with autocast
- bf16-true+checkpointing, qlora+bf16-true+checkpointing: the combinations a small GPU needs

Each (model, setting) runs in a fresh process (bench.harness.run_child), so that peaks never mix.
The child builds the model, applies the setting, lowers the peak to what it holds now, runs a few
training steps exactly as lillm.train does (forward under the loop's autocast, backward, gradient
clipping, the optimizer lillm.train makes, zero_grad) and reports its peak minus what the process
held before the model was built: weights + gradients + optimizer state + activations + scratch.
On the CPU that is the resident set's high-water mark (VmHWM), with glibc told to give every
allocation of 64 kB or more its own mapping (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the
resident set at once instead of lingering in malloc's heap; on CUDA torch.cuda.max_memory_allocated.
Beside each measurement: lillm.memory.estimate_training_memory for the same model, batch and
setting. The step time (median of the steps after the first) shows what checkpointing costs.

Models: lillm's presets and Llama shapes built from a config alone (no weights are read; a random
initialisation has the same memory): llama-1.1b is TinyLlama-1.1B's shape, llama-3.2-1b and
llama-3.2-3b Meta's, llama-2-7b the 7B.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

from bench import harness
from lillm.config import ModelConfig, get_preset, PRESETS
from lillm.memory import estimate_training_memory

LLAMA_SHAPES = {
    "llama-1.1b": ModelConfig(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632,
                              max_seq_len=2048, tie_embeddings=False),
    "llama-3.2-1b": ModelConfig(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
                                max_seq_len=2048, tie_embeddings=True),
    "llama-3.2-3b": ModelConfig(vocab_size=128256, d_model=3072, n_layers=28, n_heads=24, n_kv_heads=8, d_ff=8192,
                                max_seq_len=2048, tie_embeddings=True),
    "llama-2-7b": ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008,
                              max_seq_len=2048, tie_embeddings=False),
}
SETTINGS = {  # name: (--precision, activation checkpointing, peft); auto is bf16 autocast on CUDA, fp32 on CPU
    "autocast": ("auto", False, "none"),
    "bf16-true": ("bf16-true", False, "none"),
    "checkpointing": ("auto", True, "none"),
    "lora": ("auto", False, "lora"),
    "qlora": ("auto", False, "qlora"),
    "bf16-true+checkpointing": ("bf16-true", True, "none"),
    "qlora+bf16-true+checkpointing": ("bf16-true", True, "qlora"),
}
LORA = {"rank": 16, "targets": "all"}
GIB = 2 ** 30
FIT_MODELS = ["lillm-39m", "lillm-300m", "inkuba-0.4b", "llama-1.1b", "llama-3.2-1b", "llama-3.2-3b", "llama-2-7b"]


def model_config(name: str, seq_len: int) -> ModelConfig:
    cfg = LLAMA_SHAPES[name] if name in LLAMA_SHAPES else get_preset(name)
    return cfg.replace(max_seq_len=max(cfg.max_seq_len, seq_len))


def estimate(name: str, setting: str, batch: int, seq_len: int, device: str) -> dict:
    precision, checkpointing, peft = SETTINGS[setting]
    return estimate_training_memory(model_config(name, seq_len), batch, seq_len, precision,
                                    checkpointing, peft, LORA["rank"], LORA["targets"], device)


# ---- one measurement, in a fresh process ------------------------------------------------------------
def measure(name: str, setting: str, batch: int, seq_len: int, device: str, steps: int, threads: int) -> dict:
    import torch

    from lillm.loss import causal_lm_loss
    from lillm.memory import autocast_for, checkpoint_blocks
    from lillm.model import Transformer
    from lillm.peft import apply_peft
    from lillm.train import TrainConfig, make_optimizer

    torch.set_num_threads(threads)
    precision, checkpointing, peft = SETTINGS[setting]

    def run(cfg: ModelConfig, steps: int) -> tuple[list[float], float]:
        torch.manual_seed(0)
        with torch.device(device):
            model = Transformer(cfg)
        if peft != "none":
            apply_peft(model, peft, rank=LORA["rank"], targets=LORA["targets"])
        if precision == "bf16-true":
            model.to(torch.bfloat16)
        if checkpointing:
            checkpoint_blocks(model)
        optimizer = make_optimizer(model, TrainConfig(precision=precision), torch.device(device))
        autocast = autocast_for(precision, device)
        ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(1))
        data = {"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device)}
        harness.reset_peak_memory(device)  # building (and casting) the model may pass through more than it keeps
        seconds = []
        for _ in range(steps):
            with harness.Stopwatch(device) as watch:
                with autocast:
                    loss_sum, count = causal_lm_loss(model, data)
                (loss_sum / count).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            seconds.append(watch.seconds)
        return seconds, loss_sum.item() / count.item()

    cfg = model_config(name, seq_len)
    # A first step on a toy model of the same kind loads what every step needs once (kernel code pages,
    # thread pools, allocator pools), so that the measurement counts only what this model's step adds.
    run(get_preset("tiny").replace(max_seq_len=max(128, seq_len)), 2)
    before = harness.reset_peak_memory(device).now  # torch and lillm warmed up, no model
    seconds, loss = run(cfg, steps)
    peak = harness.read_memory(device).peak - before
    return {"model": name, "setting": setting, "batch": batch, "seq_len": seq_len, "device": device,
            "params": cfg.num_params(), "measured_peak": peak, "step_s": harness.median(seconds[1:] or seconds),
            "loss": round(loss, 4)}


def measure_in_subprocess(name, setting, batch, seq_len, device, steps, threads) -> dict:
    settings = dict(name=name, setting=setting, batch=batch, seq_len=seq_len, device=device, steps=steps,
                    threads=threads)
    if device == "cpu":  # freed tensors leave the resident set at once (see the module docstring)
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    return harness.run_child("bench.memory", "--one", json.dumps(settings))


# ---- what checkpointing costs in time ------------------------------------------------------------------
def checkpointing_cost(name: str, batch: int, seq_len: int, device: str, repeats: int, threads: int) -> dict:
    """Seconds of forward + backward, plain against checkpointed, alternating (bench.harness.time_alternating)
    on one process so that a busy machine slows both alike; medians."""
    import copy

    import torch

    from lillm.loss import causal_lm_loss
    from lillm.memory import autocast_for, checkpoint_blocks
    from lillm.model import Transformer

    torch.set_num_threads(threads)
    cfg = model_config(name, seq_len)
    torch.manual_seed(0)
    plain = Transformer(cfg).to(device)
    recomputed = checkpoint_blocks(copy.deepcopy(plain))
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(1))
    data = {"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device)}
    autocast = autocast_for("auto", device)

    def step(model):
        def run():
            with autocast:
                loss, count = causal_lm_loss(model, data)
            (loss / count).backward()
            model.zero_grad(set_to_none=True)
        return run
    seconds = harness.time_alternating({"plain": step(plain), "checkpointed": step(recomputed)}, repeats, 1, device)
    plain_s, ckpt_s = harness.median(seconds["plain"]), harness.median(seconds["checkpointed"])
    return {"model": name, "batch": batch, "seq_len": seq_len, "plain_s": plain_s, "checkpointed_s": ckpt_s,
            "slowdown": ckpt_s / plain_s}


# ---- what fits -------------------------------------------------------------------------------------
def largest_fitting(budget_gib: float, setting: str, batch: int, seq_len: int) -> str:
    """The largest model of FIT_MODELS whose estimated CUDA peak fits the budget (with 10% left for the
    CUDA context, allocator slack and fragmentation)."""
    fitting = [m for m in FIT_MODELS if estimate(m, setting, batch, seq_len, "cuda")["peak"] <= 0.9 * budget_gib * GIB]
    return fitting[-1] if fitting else "none"


def fit_table(batch: int, seq_len: int) -> str:
    lines = [f"| setting | largest on 16 GB | largest on 24 GB | estimated peak, GiB: {', '.join(FIT_MODELS)} |",
             "| --- | --- | --- | --- |"]
    for setting in SETTINGS:
        peaks = [estimate(m, setting, batch, seq_len, "cuda")["peak"] / GIB for m in FIT_MODELS]
        lines.append(f"| {setting} | {largest_fitting(16, setting, batch, seq_len)} | "
                     f"{largest_fitting(24, setting, batch, seq_len)} | {', '.join(f'{p:.1f}' for p in peaks)} |")
    return "\n".join(lines)


def measured_table(rows: list[dict]) -> str:
    lines = ["| model | setting | B x T | measured peak MiB | estimate MiB | estimate / measured | step s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['setting']} | {r['batch']} x {r['seq_len']} | {r['measured_peak'] / 2**20:,.0f} | "
                     f"{r['estimate']['peak'] / 2**20:,.0f} | {r['estimate']['peak'] / r['measured_peak']:.2f} | "
                     f"{r['step_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--one"]:  # a measurement child: print one JSON line
        print(json.dumps(measure(**json.loads(argv[1]))))
        return None
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=None, choices=sorted(PRESETS) + sorted(LLAMA_SHAPES),
                        help="models to measure (default: lillm-39m lillm-300m on the CPU; on CUDA also "
                             "inkuba-0.4b and llama-1.1b)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS)[:5], choices=list(SETTINGS))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=None, help="micro batch (default: 2 on CPU, 8 on CUDA)")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 64 on CPU, 512 on CUDA")
    parser.add_argument("--steps", type=int, default=3, help="training steps per measurement (the peak is over all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fit-batch", type=int, default=8, help="micro batch of the what-fits table")
    parser.add_argument("--fit-seq-len", type=int, default=512, help="sequence length of the what-fits table")
    parser.add_argument("--fit-only", action="store_true", help="print the estimate's what-fits table and stop")
    parser.add_argument("--time-checkpointing", type=int, default=0, metavar="REPEATS",
                        help="instead of memory: time forward + backward with and without checkpointing")
    parser.add_argument("--json", default="out/bench_memory.json")
    args = parser.parse_args(argv)
    print(f"Estimated peak of one training step on one GPU, B={args.fit_batch} T={args.fit_seq_len} "
          "(lillm.memory.estimate_training_memory; 'largest' leaves 10% for the CUDA context and slack):\n")
    print(fit_table(args.fit_batch, args.fit_seq_len))
    if args.fit_only:
        return None
    import torch
    from tqdm import tqdm

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cuda = device == "cuda"
    presets = args.presets or (["lillm-39m", "lillm-300m", "inkuba-0.4b", "llama-1.1b"] if cuda
                               else ["lillm-39m", "lillm-300m"])
    batch, seq_len = args.batch or (8 if cuda else 2), args.seq_len or (512 if cuda else 64)
    if args.time_checkpointing:
        for name in presets:
            cost = checkpointing_cost(name, batch, seq_len, device, args.time_checkpointing, args.threads)
            print(json.dumps(cost))
        return None
    rows = []
    record = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "device": harness.device_name(device), "torch": torch.__version__,
              "command": " ".join(harness.command_line() + argv), "rows": rows}
    for name, setting in tqdm([(p, s) for p in presets for s in args.settings], desc="memory", unit="run"):
        row = measure_in_subprocess(name, setting, batch, seq_len, device, args.steps, args.threads)
        row["estimate"] = estimate(name, setting, batch, seq_len, device)
        rows.append(row)
        harness.write_json(Path(args.json), record)
    print(f"\n{record['device']}, torch {record['torch']}, {record['date']}; measured peak = "
          f"{'max_memory_allocated' if cuda else 'VmHWM'} minus the process before the model:\n")
    print(measured_table(rows))
    harness.write_json(Path(args.json), record)
    print(f"\nwrote {args.json}")
    return record


if __name__ == "__main__":
    main()
