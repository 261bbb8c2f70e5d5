"""Benchmark lillm against Hugging Face transformers, side by side, as ratios.

    python scripts/bench.py                                   # tiny and lillm-39m on the CPU, everything
    python scripts/bench.py --presets tiny --what train decode --steps 10 --threads 2 --json out/b.json
    python scripts/bench.py --device cuda                     # adds lillm-300m; bf16, torch.compile, MFU

What is compared (same config, weights, batch, dtype, device and thread count on both sides):
- train:   forward + backward + AdamW step, tokens/s, and the step's peak memory (scripts/bench_train.py)
- decode:  greedy generate, 256 new tokens after a 32-token prompt at batch 1 and 8, tokens/s; the
           greedy tokens must be equal before anything is timed (scripts/bench_decode.py)
- prefill: the prompt pass of generation for a 512-token prompt, tokens/s (scripts/bench_decode.py)
- data:    prepare_pretrain MB/s with 1 and 2 workers, loader batches/s against the training step
           rate (scripts/bench_data.py; lillm only, there is no transformers counterpart)

Each comparison warms both sides up, then alternates them over several repetitions and reports the
medians; "lillm advantage" > 1 means lillm is faster (or, for memory, smaller). The machine's load
average is recorded before and after: other processes on a shared machine slow both sides, and a
ratio is only trustworthy when the load stayed low. On a shared machine prefer --threads 1: with
every core's thread in use, an OpenMP thread that loses its core to another process stalls each
small op (tiny's decoding ran 40x slower at 2 threads on 2 busy cores). The run prints markdown tables and writes a
JSON file with the date, device, library versions, thread count and the command line.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

SCRIPTS_DIR = Path(__file__).resolve().parent
if str(SCRIPTS_DIR) not in sys.path:  # the bench_* modules beside this file
    sys.path.insert(0, str(SCRIPTS_DIR))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench_train import bench_train  # noqa: E402  (also puts the repo root on sys.path)
from bench_decode import bench_decode, bench_prefill  # noqa: E402
from bench_data import DEFAULT_CORPORA, bench_data, load_prepare_pretrain  # noqa: E402

WHAT = ("train", "decode", "prefill", "data")
CPU_PRESETS = ["tiny", "lillm-39m"]
GPU_PRESETS = ["tiny", "lillm-39m", "lillm-300m"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", help=f"lillm.config presets (default: {' '.join(CPU_PRESETS)} "
                                                     f"on CPU, {' '.join(GPU_PRESETS)} on CUDA)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    parser.add_argument("--what", nargs="+", default=list(WHAT), choices=WHAT, help="which comparisons to run")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto: bfloat16 (autocast for training) on CUDA, float32 on CPU")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile both sides (default: on for CUDA, off on CPU)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch.set_num_threads for both sides (default: every CPU this process may use)")
    train = parser.add_argument_group("training step")
    train.add_argument("--steps", type=int, default=5, help="timed training steps per side")
    train.add_argument("--warmup", type=int, default=2, help="untimed calls per side before timing (every benchmark)")
    train.add_argument("--batch", type=int, help="training batch size, also the loader's (default: 8 on CPU, "
                                                 "32 on CUDA, where a small batch cannot fill the GPU)")
    train.add_argument("--seq-len", type=int, help="training sequence length, also the loader's (default: 128 "
                                                   "on CPU, 512 on CUDA: the presets' context)")
    train.add_argument("--no-memory", dest="memory", action="store_false",
                       help="skip the step-memory measurement (two fresh subprocesses per preset)")
    decode = parser.add_argument_group("decoding and prefill")
    decode.add_argument("--repeats", type=int, default=3, help="timed repetitions per side")
    decode.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    decode.add_argument("--prompt-len", type=int, default=32)
    decode.add_argument("--new-tokens", type=int, default=256)
    decode.add_argument("--prefill-len", type=int, default=512)
    decode.add_argument("--prefill-batches", type=int, nargs="+", default=[1, 8])
    decode.add_argument("--hf-compiled-decode", action="store_true",
                        help="also time transformers' static-cache generate (compiled by transformers on GPUs)")
    data = parser.add_argument_group("data pipeline")
    data.add_argument("--tokenizer", help="tokenizer.json for prepare_pretrain (default: train one on the corpora)")
    data.add_argument("--data-corpora", nargs="+", help=f"registered corpora (default: {' '.join(DEFAULT_CORPORA)})")
    data.add_argument("--data-files", nargs="+", help="text files instead of registered corpora")
    data.add_argument("--text-column", help="text column of --data-files tables")
    data.add_argument("--data-dir", help="data directory (default: $LILLM_DATA_DIR, else ../shared/data)")
    data.add_argument("--data-vocab", type=int, default=8192, help="vocabulary of the tokenizer trained when "
                                                                   "--tokenizer is not given")
    parser.add_argument("--json", default="out/bench.json", help="where to write the results")
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
    if args.tokenizer and not Path(args.tokenizer).is_file():
        parser.error(f"--tokenizer {args.tokenizer} not found; give a tokenizer.json, or leave it out to train one")
    for name in ("threads", "steps", "batch", "seq_len", "repeats", "prompt_len", "new_tokens", "prefill_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} CPUs)"


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


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as f:
        f.write(json.dumps(record, indent=2) + "\n")
    os.replace(temporary, path)


def run_comparison(what: str, preset: str, args, dtype: torch.dtype) -> list[dict]:
    if what == "train":
        return bench_train(preset, args.device, dtype, args.batch, args.seq_len, args.steps, args.warmup,
                           args.compile, args.memory, args.threads)
    if what == "decode":
        return bench_decode(preset, args.device, dtype, args.decode_batches, args.prompt_len, args.new_tokens,
                            args.repeats, args.warmup, args.compile, args.hf_compiled_decode)
    return bench_prefill(preset, args.device, dtype, args.prefill_batches, args.prefill_len, args.repeats,
                         args.warmup)


def run_comparisons(args, bar, save=lambda rows: None) -> list[dict]:
    """Every comparison asked for; save(rows) after each, so a run cut short keeps what it measured."""
    dtype = getattr(torch, args.dtype)
    rows = []
    for preset in args.presets:
        for what in (w for w in WHAT if w in args.what and w != "data"):
            rows += run_comparison(what, preset, args, dtype)
            bar.update()
            save(rows)
    return rows


def data_sources(args) -> dict:
    """prepare_pretrain's source arguments, checked now: a missing corpus should fail in a second,
    not after minutes of model benchmarks."""
    sources = {"corpora": args.data_corpora, "files": args.data_files, "text_column": args.text_column,
               "data_dir": args.data_dir}
    if not (args.data_corpora or args.data_files):
        sources["corpora"] = list(DEFAULT_CORPORA)
    load_prepare_pretrain().resolve_sources(**sources)  # raises FileNotFoundError / ValueError naming the fix
    return sources


def make_record(args, argv, load_before, comparisons: list[dict], data: list[dict]) -> dict:
    command = shlex.join([sys.executable, sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv)))
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(args.device), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "threads": args.threads,
        "dtype": args.dtype, "compile": args.compile, "command": command,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "comparisons": comparisons, "data": data,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    sources = data_sources(args) if "data" in args.what else None
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    jobs = len(args.presets) * len([w for w in args.what if w != "data"])
    with tqdm(total=jobs, desc="benchmarks", unit="job") as bar:
        comparisons = run_comparisons(
            args, bar, lambda rows: write_json(Path(args.json), make_record(args, argv, load_before, rows, [])))
    data = []
    if sources is not None:
        steps_per_s = {row["preset"]: row["steps_per_s_lillm"] for row in comparisons if "steps_per_s_lillm" in row}
        data = bench_data(sources, args.tokenizer, args.data_vocab, args.batch, args.seq_len, steps_per_s)
    record = make_record(args, argv, load_before, comparisons, data)
    print(f"\n{record['device']}, torch {record['torch']}, transformers {record['transformers']}, "
          f"{args.threads} threads, {args.dtype}{', compiled' if args.compile else ''}; "
          f"load average {load_before[0]:.2f} before, {record['load_average_after'][0]:.2f} after")
    if comparisons:
        print("\n" + comparison_table(comparisons))
    if data:
        print("\n" + data_table(data))
    write_json(Path(args.json), record)
    print(f"\nwrote {args.json}")
    return record


if __name__ == "__main__":
    main()
