"""Data pipeline benchmarks: tokenizing corpora into bins, and sampling batches from them.

    python -m bench.data --data-files my.txt --tokenizer out/tokenizer/tokenizer.json

1. `data/prepare_pretrain.py`'s `prepare` on the same corpora with 1 and with 2 worker processes:
   MB of UTF-8 text per second (the bins are identical for any worker count, so only time differs).
2. `BinLoader.next_batch` batches per second at the training batch size and sequence length,
   against the optimizer steps per second the training benchmark measured: the loader is a
   bottleneck if it cannot produce a batch in a small part of a step (headroom = loader batches/s
   / training steps/s; it should be far above 1).

No tokenizer given? One is trained on the benchmark corpora first (a few seconds), so the
benchmark runs from a fresh checkout with nothing but the data directory.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

from bench import harness
from lillm.bins import prepare
from lillm.sources import resolve_sources
from lillm.data import BinLoader

DEFAULT_CORPORA = ("lacuna-swa", "voa-swa")


def tokenizer_file(path: str) -> str:
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{path} not found; give a tokenizer.json, or leave it out to train one")
    return path


def add_arguments(parser) -> None:
    data = parser.add_argument_group("data pipeline")
    data.add_argument("--tokenizer", type=tokenizer_file,
                      help="tokenizer.json for prepare_pretrain (default: train one on the corpora)")
    data.add_argument("--data-corpora", nargs="+", help=f"registered corpora (default: {' '.join(DEFAULT_CORPORA)})")
    data.add_argument("--data-files", nargs="+", help="text files instead of registered corpora")
    data.add_argument("--text-column", help="text column of --data-files tables")
    data.add_argument("--data-dir", help="data directory (default: $LILLM_DATA_DIR, else ../shared/data)")
    data.add_argument("--data-vocab", type=int, default=8192, help="vocabulary of the tokenizer trained when "
                                                                   "--tokenizer is not given")


def data_sources(args) -> dict:
    """prepare_pretrain's source arguments, checked now: a missing corpus should fail in a second,
    not after minutes of model benchmarks."""
    sources = {"corpora": args.data_corpora, "files": args.data_files, "text_column": args.text_column,
               "data_dir": args.data_dir}
    if not (args.data_corpora or args.data_files):
        sources["corpora"] = list(DEFAULT_CORPORA)
    resolve_sources(**sources)  # raises FileNotFoundError / ValueError naming the fix
    return sources


def train_quick_tokenizer(sources: dict, out_path: Path, vocab_size: int, max_chars: int = 2_000_000) -> Path:
    """A byte-level BPE tokenizer from the first max_chars of the corpora, for timing only."""
    from lillm.tokenizer import train_bpe

    resolved = resolve_sources(**sources)
    documents = itertools.chain.from_iterable(source.documents() for source in resolved)
    taken, texts = 0, []
    for text in documents:
        texts.append(text)
        taken += len(text)
        if taken >= max_chars:
            break
    train_bpe(texts, vocab_size=vocab_size, min_frequency=2, show_progress=False).save(out_path)
    return out_path


def bench_prepare(tokenizer_path, sources: dict, out_dir: Path, workers: int) -> dict:
    with harness.Stopwatch() as watch:
        meta = prepare(tokenizer_path, out_dir, workers=workers, progress=False, **sources)
    seconds = watch.seconds
    megabytes = sum(split["bytes"] for split in meta["splits"].values()) / 1e6
    tokens = sum(split["tokens"] for split in meta["splits"].values())
    return {"metric": f"prepare_pretrain, {workers} worker{'s' if workers > 1 else ''}", "value": megabytes / seconds,
            "unit": "MB/s", "note": f"{megabytes:.2f} MB -> {tokens:,} tokens in {seconds:.2f} s"}


def bench_loader(bin_path: Path, batch: int, seq_len: int, batches: int = 200, repeats: int = 3) -> float:
    """Median batches per second of BinLoader.next_batch over `repeats` runs of `batches` calls."""
    loader = BinLoader(bin_path, seq_len, batch, seed=0)
    loader.next_batch()  # first touch of the memmap
    rates = []
    for _ in range(repeats):
        with harness.Stopwatch() as watch:
            for _ in range(batches):
                loader.next_batch()
        rates.append(batches / watch.seconds)
    return harness.median(rates)


def bench_data(sources: dict, tokenizer_path, vocab_size: int, batch: int, seq_len: int,
               train_steps_per_s: dict[str, float], workers=(1, 2)) -> list[dict]:
    """Rows of (metric, value, unit, note); train_steps_per_s maps preset -> lillm steps/s."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="lillm-bench-data-") as tmp:
        tmp = Path(tmp)
        if tokenizer_path is None:
            with harness.Stopwatch() as watch:
                tokenizer_path = train_quick_tokenizer(sources, tmp / "tokenizer.json", vocab_size)
            print(f"trained a {vocab_size}-token tokenizer for the data benchmark in {watch.seconds:.1f} s")
        for count in workers:
            rows.append(bench_prepare(tokenizer_path, sources, tmp / f"bins-{count}", count))
        bin_path = tmp / f"bins-{workers[0]}" / "train.bin"
        rate = bench_loader(bin_path, batch, seq_len)
        rows.append({"metric": f"BinLoader.next_batch B={batch} T={seq_len}", "value": rate, "unit": "batches/s",
                     "note": "median of 3 x 200 batches"})
        for preset, steps_per_s in train_steps_per_s.items():
            rows.append({"metric": f"loader headroom over {preset} training", "value": rate / steps_per_s,
                         "unit": "x", "note": f"lillm trains {steps_per_s:.3g} steps/s at the same B and T"})
    return rows


def bench_data_after(args, sources: dict, comparisons: list[dict]) -> list[dict]:
    """The data rows, with the loader set against the training steps/s the comparisons measured."""
    steps_per_s = {row["preset"]: row["steps_per_s_lillm"] for row in comparisons if "steps_per_s_lillm" in row}
    return bench_data(sources, args.tokenizer, args.data_vocab, args.batch, args.seq_len, steps_per_s)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = harness.argument_parser(__doc__, what=("data",))
    add_arguments(parser)
    args = harness.parse_args(parser, argv)
    sources = data_sources(args)
    return harness.run(args, argv, {}, lambda comparisons: bench_data_after(args, sources, comparisons))


if __name__ == "__main__":
    from lillm.cli import run_main  # one line for bad input, status 2 (lillm/cli.py)

    run_main(main)
