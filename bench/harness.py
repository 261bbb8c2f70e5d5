"""What every benchmark shares: one timer, one memory reader, one way to run a measurement in a
fresh process, the transformers twin of a lillm model, and the comparison row, table and record.

Fairness first: both sides of a comparison get the same configuration (transformers'
LlamaForCausalLM built from `ModelConfig.to_hf_dict()`), the same weights (lillm's state dict
loaded into it), the same inputs, dtype and thread count.

Timing (`Stopwatch`, `time_alternating`): a few warm-up calls per side, then repetitions that
alternate the sides (lillm, transformers, transformers, lillm, ...) so that noise from other
processes on the machine hits both; we report the median of each side's repetitions. On CUDA the
stopwatch waits for the device at both ends, or it would time only the kernel launches.

Memory (`read_memory`, `reset_peak_memory`): on CUDA what torch's allocator holds
(memory_allocated, max_memory_allocated); on the CPU (Linux) the process's resident set: VmRSS
now, VmHWM its peak, which writing "5" to /proc/self/clear_refs resets to the current size, and
ru_maxrss, the peak that nothing resets. RSS sees everything torch's allocator takes from the OS,
which tracemalloc (Python objects only) cannot. A fair memory figure needs a fresh process per
side (`run_child`), so that one side's allocations, caches and allocator pools never count
against the other.

torch is imported inside the functions that use it: bench.import_hf's parent process must stay
small, because Linux counts the peak RSS of the process that spawns a child in the child's ru_maxrss.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from lillm.config import ModelConfig, get_preset
from lillm.folders import write_text_atomic

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
    import torch

    from lillm.model import Transformer

    torch.manual_seed(seed)
    ours = Transformer(cfg)
    theirs = hf_model_like(cfg, ours.state_dict())
    return ours.to(device), theirs.to(device)


# ---- timing --------------------------------------------------------------------------------------
def synchronize(device) -> None:
    """Wait for the device's queued kernels (a no-op on the CPU)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall-clock seconds of a with-block: `with Stopwatch(device) as watch: ...; watch.seconds`.
    watch.cpu_seconds: the CPU time this process used meanwhile (all its threads); on a shared
    machine it is what the block cost, whatever share of the cores the other jobs left it."""

    def __init__(self, device="cpu"):
        self.device = device
        self.seconds = self.cpu_seconds = 0.0

    def __enter__(self) -> Self:
        synchronize(self.device)
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exception) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start


def time_alternating(calls: dict[str, Callable[[], object]], repeats: int, warmup: int,
                     device="cpu", cpu_seconds: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds per call for each named call: warm-up, then alternating repetitions.
    cpu_seconds, when given, is filled with each call's CPU seconds (Stopwatch.cpu_seconds)."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    seconds = {name: [] for name in calls}
    names = list(calls)
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            with Stopwatch(device) as watch:
                calls[name]()
            seconds[name].append(watch.seconds)
            if cpu_seconds is not None:
                cpu_seconds.setdefault(name, []).append(watch.cpu_seconds)
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---- memory --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Memory:
    """Bytes this process holds on a device, read at one moment."""
    now: int            # CUDA: allocated by torch; CPU: resident set (VmRSS)
    peak: int           # the most `now` has been since the last reset_peak_memory (CUDA: max allocated; CPU: VmHWM)
    lifetime_peak: int  # CUDA: as peak; CPU: ru_maxrss, which no reset clears


def _proc_status_bytes() -> dict[str, int]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    return {name: int(value.split()[0]) * 1024 for name, value in fields.items()}  # the file counts kB


def read_memory(device="cpu") -> Memory:
    if str(device).startswith("cuda"):
        import torch

        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return Memory(now=torch.cuda.memory_allocated(device), peak=peak, lifetime_peak=peak)
    status = _proc_status_bytes()
    return Memory(now=status["VmRSS"], peak=status["VmHWM"],
                  lifetime_peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def reset_peak_memory(device="cpu") -> Memory:
    """Lower the peak to what is held now (so that what came before does not count), then read."""
    if str(device).startswith("cuda"):
        import torch

        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset VmHWM to the current RSS
    return read_memory(device)


# ---- a measurement in a fresh process ---------------------------------------------------------------
def run_child(module: str, *args: str):
    """Run `python -m module args` in a fresh process (from this working directory, like the command
    that started us) and return the JSON its last line of output printed."""
    done = subprocess.run([sys.executable, "-m", module, *args], check=False, capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise RuntimeError(f"python -m {module} {shlex.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- rows, tables and the record ----------------------------------------------------------------------
def comparison_row(preset: str, metric: str, unit: str, ours: float, theirs: float,
                   higher_is_better: bool = True, **extra) -> dict:
    """One table row; `speedup` > 1 always means lillm is better (faster, or smaller)."""
    speedup = ours / theirs if higher_is_better else theirs / ours
    return dict(preset=preset, metric=metric, unit=unit, lillm=ours, transformers=theirs,
                speedup=speedup, **extra)


def comparison_table(rows: list[dict]) -> str:
    lines = ["| preset | measurement | unit | lillm | transformers | lillm advantage |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['preset']} | {row['metric']} | {row['unit']} | {row['lillm']:,.1f} | "
                     f"{row['transformers']:,.1f} | {row['speedup']:.2f}x |")
    mfu = [f"{row['preset']}: lillm {row['mfu_lillm']:.1%}, transformers {row['mfu_transformers']:.1%}"
           for row in rows if "mfu_lillm" in row]
    if mfu:
        lines.append("\nMFU of the training step (against the device's bf16 peak): " + "; ".join(mfu))
    return "\n".join(lines)


def data_table(rows: list[dict]) -> str:
    lines = ["| measurement | value | unit | note |", "| --- | ---: | --- | --- |"]
    lines += [f"| {row['metric']} | {row['value']:,.2f} | {row['unit']} | {row['note']} |" for row in rows]
    return "\n".join(lines)


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} CPUs)"


def write_json(path: Path, record: dict) -> None:
    """Written to a temporary name and renamed: a run cut short never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def command_line() -> list[str]:
    """How this program was started: `python -m bench.x` when run as a module, else the script's path."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is None:
        return [sys.executable, sys.argv[0]]
    return [sys.executable, "-m", spec.name.removesuffix(".__main__")]


def make_record(args, argv, load_before, comparisons: list[dict], data: list[dict]) -> dict:
    """The JSON record of a run: what was measured, on what, with which versions and settings."""
    import torch
    import transformers

    command = shlex.join(command_line() + (sys.argv[1:] if argv is None else list(argv)))
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(args.device), "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": args.threads,
        "dtype": args.dtype, "compile": args.compile, "command": command,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "comparisons": comparisons, "data": data,
    }


# ---- the command line and the run of the comparisons -------------------------------------------------
CPU_PRESETS = ["tiny", "lillm-39m"]
GPU_PRESETS = ["tiny", "lillm-39m", "lillm-300m"]
AT_LEAST_ONE = ("threads", "steps", "batch", "seq_len", "repeats", "prompt_len", "new_tokens", "prefill_len")


def argument_parser(description: str, what: tuple[str, ...]) -> argparse.ArgumentParser:
    """The flags every comparison shares; each benchmark module adds its own group (add_arguments)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", help=f"lillm.config presets (default: {' '.join(CPU_PRESETS)} "
                                                     f"on CPU, {' '.join(GPU_PRESETS)} on CUDA)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    parser.add_argument("--what", nargs="+", default=list(what), choices=what, help="which comparisons to run")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto: bfloat16 (autocast for training) on CUDA, float32 on CPU")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile both sides (default: on for CUDA, off on CPU)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch.set_num_threads for both sides (default: every CPU this process may use)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per side before timing (every benchmark)")
    parser.add_argument("--batch", type=int, help="training batch size, also the loader's (default: 8 on CPU, "
                                                  "32 on CUDA, where a small batch cannot fill the GPU)")
    parser.add_argument("--seq-len", type=int, help="training sequence length, also the loader's (default: 128 "
                                                    "on CPU, 512 on CUDA: the presets' context)")
    parser.add_argument("--json", default="out/bench.json", help="where to write the results")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, then fill the defaults that depend on the device and refuse settings below 1."""
    import torch

    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device; use --device cpu")
    cuda = args.device == "cuda"
    args.presets = args.presets or (GPU_PRESETS if cuda else CPU_PRESETS)
    args.compile = cuda if args.compile is None else args.compile
    args.batch = (32 if cuda else 8) if args.batch is None else args.batch
    args.seq_len = (512 if cuda else 128) if args.seq_len is None else args.seq_len
    if args.dtype == "auto":
        args.dtype = "bfloat16" if cuda else "float32"
    for name in (name for name in AT_LEAST_ONE if hasattr(args, name)):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


Comparison = Callable[[str, argparse.Namespace, object], list[dict]]  # (preset, args, torch dtype) -> rows


def run_comparisons(args, comparisons: dict[str, Comparison], bar, save=lambda rows: None) -> list[dict]:
    """Every comparison asked for; save(rows) after each, so a run cut short keeps what it measured."""
    import torch

    dtype = getattr(torch, args.dtype)
    rows = []
    for preset in args.presets:
        for what in (w for w in comparisons if w in args.what):
            rows += comparisons[what](preset, args, dtype)
            bar.update()
            save(rows)
    return rows


def run(args, argv, comparisons: dict[str, Comparison],
        data: Callable[[list[dict]], list[dict]] | None = None) -> dict:
    """Run the comparisons (then data(comparison rows), when given), print the tables and write the record."""
    import torch
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    jobs = len(args.presets) * len([w for w in comparisons if w in args.what])
    with tqdm(total=jobs, desc="benchmarks", unit="job") as bar:
        rows = run_comparisons(
            args, comparisons, bar, lambda rows: write_json(Path(args.json), make_record(args, argv, load_before, rows, [])))
    data_rows = data(rows) if data is not None else []
    record = make_record(args, argv, load_before, rows, data_rows)
    print(f"\n{record['device']}, torch {record['torch']}, transformers {record['transformers']}, "
          f"{args.threads} threads, {args.dtype}{', compiled' if args.compile else ''}; "
          f"load average {load_before[0]:.2f} before, {record['load_average_after'][0]:.2f} after")
    if rows:
        print("\n" + comparison_table(rows))
    if data_rows:
        print("\n" + data_table(data_rows))
    write_json(Path(args.json), record)
    print(f"\nwrote {args.json}")
    return record
