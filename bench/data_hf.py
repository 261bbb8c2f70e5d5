"""Big corpora through `datasets`: lillm's bin writer against nanoGPT's prepare.py, side by side.

    python -m bench.data_hf --work /path/outside/the/repo --sizes-gb 0.25 0.5 1 --workers 1 2

A synthetic corpus (the Swahili and Hausa text of the data directory, repeated with a counter so
that no document is an exact copy) is written once under --work as parquet shards and as JSON
lines shards; the 0.25 / 0.5 GB measurements read the first shards of the 1 GB one. On each:

- lillm: lillm.bins.prepare on the files, streamed through `datasets` (NFC, de-duplication, hash
  split, ordered parallel tokenization, atomic output; tokenize workers = --workers);
- anchor: nanoGPT's data/openwebtext/prepare.py approach: `load_dataset` (the whole corpus
  converted to an Arrow cache), `train_test_split`, `Dataset.map(tokenize, num_proc=workers)`,
  then one memmap per split filled in 1024 slices. Same tokenizer, same `</s>` after every document.

Each run is a fresh process; its peak resident memory is the largest sum of proportional set size
(PSS: RSS with shared pages counted once) over it and its worker processes, sampled every 50 ms. Reported: MB/s of UTF-8 text, tokens/s, peak RSS, and
lillm / anchor ratios (speed: > 1 is lillm faster; memory: > 1 is lillm smaller). The machine's
load average is recorded before and after: on a shared machine both sides slow down.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import sys
import threading
import time
from pathlib import Path

SHARD_BYTES = 1 << 26          # 64 MiB of text per corpus shard
SEED_CORPORA = ("lacuna-swa", "lacuna-hau", "voa-swa")


# ---- memory of a process tree ---------------------------------------------------------------------
def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Linux /proc), shared pages counted once."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            # Pss: shared pages (a forked worker shares its parent's) count once, split among sharers.
            with open(f"/proc/{current}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    stack += [int(child) for child in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


class PeakMemory:
    """Samples tree_rss(this process) every `every` seconds on a thread; .peak is the largest seen."""

    def __init__(self, every: float = 0.05):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(os.getpid()))
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(os.getpid()))


# ---- the corpus ---------------------------------------------------------------------------------------
def seed_documents(data_dir) -> list[str]:
    from lillm.sources import resolve_sources

    documents = []
    for source in resolve_sources(corpora=list(SEED_CORPORA), data_dir=data_dir):
        documents += list(source.documents())
    return documents


def make_corpus(work: Path, total_bytes: int, data_dir=None, shard_bytes: int = SHARD_BYTES) -> dict[str, list[Path]]:
    """Parquet and JSON lines shards of ~SHARD_BYTES each, written once (kept between runs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = work / "corpus"
    done = folder / "done.json"
    if done.is_file() and json.loads(done.read_text())["bytes"] >= total_bytes:
        record = json.loads(done.read_text())
        return {fmt: [folder / name for name in names] for fmt, names in record["files"].items()}
    folder.mkdir(parents=True, exist_ok=True)
    seeds = seed_documents(data_dir)
    files: dict[str, list[str]] = {"parquet": [], "jsonl": []}
    written, repeat, shard = 0, 0, 0
    while written < total_bytes:
        texts, size = [], 0
        while size < shard_bytes:
            for text in seeds:
                texts.append(f"{text} ({repeat})")   # unique: repeats would be dropped as duplicates
                size += len(texts[-1].encode("utf-8"))
                if size >= shard_bytes:
                    break
            repeat += 1
        name = f"shard-{shard:05d}"
        pq.write_table(pa.table({"text": texts}), folder / f"{name}.parquet", row_group_size=8192)
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts)
        files["parquet"].append(f"{name}.parquet")
        files["jsonl"].append(f"{name}.jsonl")
        written += size
        shard += 1
        print(f"corpus: {written / 1e9:.2f} GB", flush=True)
    done.write_text(json.dumps({"bytes": written, "shard_bytes": shard_bytes, "files": files}))
    return {fmt: [folder / name for name in names] for fmt, names in files.items()}


# ---- the two pipelines (each run in a child process) --------------------------------------------------
def run_lillm(files: list[str], tokenizer: str, out: Path, workers: int) -> dict:
    from lillm.bins import prepare

    meta = prepare(tokenizer, out, files=files, workers=workers, progress=False, val_fraction=0.0005)
    return {"bytes": sum(s["bytes"] for s in meta["splits"].values()),
            "tokens": sum(s["tokens"] for s in meta["splits"].values())}


def run_anchor(files: list[str], tokenizer: str, out: Path, workers: int) -> dict:
    """nanoGPT data/openwebtext/prepare.py, with our tokenizer in place of tiktoken's GPT-2."""
    import numpy as np
    from datasets import load_dataset

    from lillm.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tokenizer)
    builder = "parquet" if files[0].endswith(".parquet") else "json"
    dataset = load_dataset(builder, data_files=files, split="train", cache_dir=str(out / "hf-cache"),
                           num_proc=workers if workers > 1 else None)
    split_dataset = dataset.train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    split_dataset["val"] = split_dataset.pop("test")

    def process(example):
        ids = tok.encode(example["text"])
        ids.append(tok.eos_id)
        return {"ids": ids, "len": len(ids), "bytes": len(example["text"].encode("utf-8"))}

    tokenized = split_dataset.map(process, remove_columns=["text"], num_proc=workers if workers > 1 else None,
                                  desc="tokenizing")
    total_bytes = total_tokens = 0
    for split, dset in tokenized.items():
        arr_len = np.sum(dset["len"], dtype=np.uint64)
        total_tokens += int(arr_len)
        total_bytes += int(np.sum(dset["bytes"], dtype=np.uint64))
        arr = np.memmap(out / f"{split}.bin", dtype=np.uint16, mode="w+", shape=(int(arr_len),))
        total_batches, idx = min(1024, len(dset)), 0
        for batch_idx in range(total_batches):
            batch = dset.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format("numpy")
            arr_batch = np.concatenate(batch["ids"])
            arr[idx:idx + len(arr_batch)] = arr_batch
            idx += len(arr_batch)
        arr.flush()
    return {"bytes": total_bytes, "tokens": total_tokens}


def child(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = run_lillm if args.child == "lillm" else run_anchor
    with PeakMemory() as memory:
        start = time.perf_counter()
        result = run(args.files, args.tokenizer, out, args.workers)
        seconds = time.perf_counter() - start
    print(json.dumps({**result, "seconds": seconds, "peak_rss": memory.peak}))


def measure(pipeline: str, files: list[Path], tokenizer: Path, work: Path, workers: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f".bench-out-{pipeline}-", dir=work))  # ours alone, removed below
    command = [sys.executable, "-m", "bench.data_hf", "--child", pipeline, "--tokenizer", str(tokenizer),
               "--out", str(out), "--workers", str(workers), "--files", *map(str, files)]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1"})
    shutil.rmtree(out, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:8])} ... failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def quick_tokenizer(work: Path, data_dir=None, vocab_size: int = 8192) -> Path:
    from lillm.tokenizer import train_bpe

    path = work / "tokenizer.json"
    if not path.is_file():
        train_bpe(seed_documents(data_dir), vocab_size=vocab_size, min_frequency=2, show_progress=False).save(path)
    return path


def row(size_gb, fmt, workers, ours, theirs) -> dict:
    def rates(r):
        if r is None:   # the anchor was left out of this run
            return float("nan"), float("nan"), float("nan")
        return r["bytes"] / 1e6 / r["seconds"], r["tokens"] / r["seconds"], r["peak_rss"] / 2**20
    (mb, tps, rss), (amb, atps, arss) = rates(ours), rates(theirs)
    return {"size_gb": size_gb, "format": fmt, "workers": workers, "lillm_mb_s": mb, "anchor_mb_s": amb,
            "speed_ratio": mb / amb, "lillm_tokens_s": tps, "anchor_tokens_s": atps,
            "lillm_peak_rss_mib": rss, "anchor_peak_rss_mib": arss, "memory_ratio": arss / rss,
            "lillm": ours, "anchor": theirs}


def table(rows: list[dict]) -> str:
    lines = ["| corpus | workers | lillm MB/s | anchor MB/s | speed ratio | lillm tokens/s | anchor tokens/s "
             "| lillm peak RSS | anchor peak RSS | memory ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size_gb']:g} GB {r['format']} | {r['workers']} | {r['lillm_mb_s']:.2f} | "
                     f"{r['anchor_mb_s']:.2f} | {r['speed_ratio']:.2f}x | {r['lillm_tokens_s']:,.0f} | "
                     f"{r['anchor_tokens_s']:,.0f} | {r['lillm_peak_rss_mib']:,.0f} MiB | "
                     f"{r['anchor_peak_rss_mib']:,.0f} MiB | {r['memory_ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=False, help="folder for the corpus and outputs (outside the repository)")
    parser.add_argument("--sizes-gb", nargs="+", type=float, default=[0.25, 0.5, 1.0])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--formats", nargs="+", default=["parquet", "jsonl"], choices=["parquet", "jsonl"])
    parser.add_argument("--plan", nargs="+", metavar="SIZE:FORMAT:WORKERS",
                        help="measure only these cases (e.g. 1:parquet:2), instead of every combination")
    parser.add_argument("--pipelines", nargs="+", default=["lillm", "anchor"], choices=["lillm", "anchor"],
                        help="leave the (slow) anchor out of extra memory points")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: an 8192-id BPE trained on the seed text)")
    parser.add_argument("--data-dir", help="data directory holding the seed corpora")
    parser.add_argument("--shard-mb", type=float, default=SHARD_BYTES / 2**20, help="text per corpus shard")
    parser.add_argument("--json", help="write the rows here")
    # the child side
    parser.add_argument("--child", choices=["lillm", "anchor"], help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.workers = args.workers[0]
        return child(args)
    if not args.work:
        parser.error("--work DIR is required: the corpus is gigabytes, keep it outside the repository")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shard_bytes = int(args.shard_mb * 2**20)
    largest = max([float(p.split(":")[0]) for p in args.plan] if args.plan else args.sizes_gb)
    corpus = make_corpus(work, int(largest * 1e9), args.data_dir, shard_bytes)
    tokenizer = Path(args.tokenizer) if args.tokenizer else quick_tokenizer(work, args.data_dir)
    plan = [tuple(p.split(":")) for p in args.plan] if args.plan else \
        [(str(s), f, str(w)) for s in args.sizes_gb for f in args.formats for w in args.workers]
    rows, started = [], time.time()
    load_before = os.getloadavg()
    for size, fmt, workers in plan:
        shards = max(1, round(float(size) * 1e9 / shard_bytes))
        files = corpus[fmt][:shards]
        ours = measure("lillm", files, tokenizer, work, int(workers))
        theirs = measure("anchor", files, tokenizer, work, int(workers)) if "anchor" in args.pipelines else None
        rows.append(row(float(size), fmt, int(workers), ours, theirs))
        print(table(rows[-1:]).splitlines()[-1], f"load {os.getloadavg()[0]:.1f}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, "load_before": load_before,
                                                   "load_after": os.getloadavg(), "cpus": os.cpu_count(),
                                                   "command": sys.argv, "seconds": time.time() - started},
                                                  indent=2))
    print(table(rows))
    print(f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return rows


if __name__ == "__main__":
    main()
