"""Data pipeline benchmarks: tokenizing corpora into bins, and sampling batches from them.

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

import importlib.util
import itertools
import sys
import tempfile
import time
from pathlib import Path

from bench_train import REPO_ROOT, median
from lillm.data import BinLoader

DEFAULT_CORPORA = ("lacuna-swa", "voa-swa")


def load_prepare_pretrain():
    """data/prepare_pretrain.py is a script, not a package module: load it from its file."""
    if "prepare_pretrain" in sys.modules:
        return sys.modules["prepare_pretrain"]
    spec = importlib.util.spec_from_file_location("prepare_pretrain", REPO_ROOT / "data" / "prepare_pretrain.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["prepare_pretrain"] = module  # its dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


def train_quick_tokenizer(sources: dict, out_path: Path, vocab_size: int, max_chars: int = 2_000_000) -> Path:
    """A byte-level BPE tokenizer from the first max_chars of the corpora, for timing only."""
    from lillm.tokenizer import train_bpe

    prepare_pretrain = load_prepare_pretrain()
    resolved = prepare_pretrain.resolve_sources(**sources)
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
    prepare_pretrain = load_prepare_pretrain()
    start = time.perf_counter()
    meta = prepare_pretrain.prepare(tokenizer_path, out_dir, workers=workers, progress=False, **sources)
    seconds = time.perf_counter() - start
    megabytes = sum(split["bytes"] for split in meta["splits"].values()) / 1e6
    tokens = sum(split["tokens"] for split in meta["splits"].values())
    return dict(metric=f"prepare_pretrain, {workers} worker{'s' if workers > 1 else ''}", value=megabytes / seconds,
                unit="MB/s", note=f"{megabytes:.2f} MB -> {tokens:,} tokens in {seconds:.2f} s")


def bench_loader(bin_path: Path, batch: int, seq_len: int, batches: int = 200, repeats: int = 3) -> float:
    """Median batches per second of BinLoader.next_batch over `repeats` runs of `batches` calls."""
    loader = BinLoader(bin_path, seq_len, batch, seed=0)
    loader.next_batch()  # first touch of the memmap
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            loader.next_batch()
        rates.append(batches / (time.perf_counter() - start))
    return median(rates)


def bench_data(sources: dict, tokenizer_path, vocab_size: int, batch: int, seq_len: int,
               train_steps_per_s: dict[str, float], workers=(1, 2)) -> list[dict]:
    """Rows of (metric, value, unit, note); train_steps_per_s maps preset -> lillm steps/s."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="lillm-bench-data-") as tmp:
        tmp = Path(tmp)
        if tokenizer_path is None:
            start = time.perf_counter()
            tokenizer_path = train_quick_tokenizer(sources, tmp / "tokenizer.json", vocab_size)
            print(f"trained a {vocab_size}-token tokenizer for the data benchmark in "
                  f"{time.perf_counter() - start:.1f} s")
        for count in workers:
            rows.append(bench_prepare(tokenizer_path, sources, tmp / f"bins-{count}", count))
        bin_path = tmp / f"bins-{workers[0]}" / "train.bin"
        rate = bench_loader(bin_path, batch, seq_len)
        rows.append(dict(metric=f"BinLoader.next_batch B={batch} T={seq_len}", value=rate, unit="batches/s",
                         note="median of 3 x 200 batches"))
        for preset, steps_per_s in train_steps_per_s.items():
            rows.append(dict(metric=f"loader headroom over {preset} training", value=rate / steps_per_s,
                             unit="x", note=f"lillm trains {steps_per_s:.3g} steps/s at the same B and T"))
    return rows
