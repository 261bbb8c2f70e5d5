"""Big corpora: lillm's bin writer on parquet, JSON lines and .txt, against nanoGPT's prepare.py.

    python -m bench.data_hf --work /path/outside/the/repo --sizes-gb 0.25 0.5 1 --workers 1 2
    python -m bench.data_hf --work DIR --plan 1:parquet:2:lillm 1:txt:2:lillm 0.25:parquet:2:anchor

A synthetic corpus (the Swahili and Hausa text of the data directory, repeated with a counter so
that no document is an exact copy; a document never holds a line break) is written once under
--work as parquet, JSON lines and .txt shards holding the same documents; the smaller sizes read
the first shards of the largest. On each:

- lillm: lillm.bins.prepare on the files (read a batch at a time by lillm.datafiles, or line by
  line for .txt; NFC, de-duplication in bounded memory, hash split, ordered parallel
  tokenization, atomic output; tokenize workers = --workers);
- anchor: nanoGPT's data/openwebtext/prepare.py approach: `load_dataset` (the whole corpus
  converted to an Arrow cache), `train_test_split`, `Dataset.map(tokenize, num_proc=workers)`,
  then one memmap per split filled in 1024 slices. Same tokenizer, same `</s>` after every
  document. It is stopped after --anchor-timeout seconds (its row then says so).

Each run is a fresh process in its own session. Reported per run: seconds, MB/s of UTF-8 text
and tokens/s per worker (wall clock), MB per CPU-second (user + system time of the process and its
workers: a loaded machine stretches it far less than the wall clock), the main process's ceiling
(MB per CPU-second of the process that reads, de-duplicates and writes: no number of workers goes
faster), peak memory (the largest sum of proportional set size, PSS: RSS with shared pages counted
once, over the process and its workers, sampled every 50 ms on a thread whose CPU time is taken out
of the rates), the first digits of the bins' SHA-256 (equal digits, equal bins: lillm's must agree
across formats and worker counts), and the load average at start and end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
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
    """Samples tree_rss(this process) every `every` seconds on a thread; .peak is the largest seen.

    .cpu_seconds is the sampling thread's own CPU time (reading /proc costs a few percent of a core),
    so that it can be taken out of the process's.
    """

    def __init__(self, every: float = 0.05):
        self.every, self.peak, self.cpu_seconds, self._stop = every, 0, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(os.getpid()))
            self.cpu_seconds = time.thread_time()
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(os.getpid()))


# ---- the corpus ---------------------------------------------------------------------------------------
CORPUS_VERSION = 2     # 2: a .txt copy, and no line break inside a document (a .txt line is a document)
FORMATS = {"parquet": ".parquet", "jsonl": ".jsonl", "txt": ".txt"}


def seed_documents(data_dir) -> list[str]:
    from lillm.sources import resolve_sources

    documents = []
    for source in resolve_sources(corpora=list(SEED_CORPORA), data_dir=data_dir):
        documents += [" ".join(text.splitlines()) for text in source.documents()]
    return documents


def make_corpus(work: Path, total_bytes: int, data_dir=None, shard_bytes: int = SHARD_BYTES) -> dict[str, list[Path]]:
    """Parquet, JSON lines and .txt shards of ~shard_bytes each, the same documents in each (kept between runs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = work / "corpus"
    done = folder / "done.json"
    if done.is_file():
        record = json.loads(done.read_text())
        if (record.get("version") == CORPUS_VERSION and record["bytes"] >= total_bytes
                and record["shard_bytes"] == shard_bytes):
            return {fmt: [folder / name for name in names] for fmt, names in record["files"].items()}
        done.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    seeds = seed_documents(data_dir)
    files: dict[str, list[str]] = {fmt: [] for fmt in FORMATS}
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
        with open(folder / f"{name}.txt", "w", encoding="utf-8") as f:
            f.writelines(text + "\n" for text in texts)
        for fmt, suffix in FORMATS.items():
            files[fmt].append(name + suffix)
        written += size
        shard += 1
        print(f"corpus: {written / 1e9:.2f} GB", flush=True)
    done.write_text(json.dumps({"version": CORPUS_VERSION, "bytes": written, "shard_bytes": shard_bytes,
                                "files": files}))
    return {fmt: [folder / name for name in names] for fmt, names in files.items()}


# ---- the two pipelines (each run in a child process) --------------------------------------------------
def bins_digest(out: Path, names: list[str]) -> str:
    """The first 12 hex digits of the SHA-256 of the bins, in order: equal digests, equal bins."""
    digest = hashlib.sha256()
    for name in names:
        with open(out / name, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()[:12]


def run_lillm(files: list[str], tokenizer: str, out: Path, workers: int) -> dict:
    from lillm.bins import prepare

    meta = prepare(tokenizer, out, files=files, workers=workers, progress=False, val_fraction=0.0005)
    names = [info.get("file") or shard["file"] for info in meta["splits"].values()
             for shard in info.get("shards", [info])]
    return {"bytes": sum(s["bytes"] for s in meta["splits"].values()),
            "tokens": sum(s["tokens"] for s in meta["splits"].values()), "bins": bins_digest(out, names)}


def run_anchor(files: list[str], tokenizer: str, out: Path, workers: int) -> dict:
    """nanoGPT data/openwebtext/prepare.py, with our tokenizer in place of tiktoken's GPT-2."""
    import numpy as np
    from datasets import load_dataset

    from lillm.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tokenizer)
    builder = {".parquet": "parquet", ".jsonl": "json", ".txt": "text"}[Path(files[0]).suffix]
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
    return {"bytes": total_bytes, "tokens": total_tokens, "bins": bins_digest(out, ["train.bin", "val.bin"])}


def child(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = run_lillm if args.child == "lillm" else run_anchor
    with PeakMemory() as memory:
        start, main_cpu = time.perf_counter(), time.process_time()
        result = run(args.files, args.tokenizer, out, args.workers)
        seconds, main_cpu = time.perf_counter() - start, time.process_time() - main_cpu
    print(json.dumps({**result, "seconds": seconds, "main_cpu_seconds": main_cpu, "peak_rss": memory.peak,
                      "sampler_cpu_seconds": memory.cpu_seconds}))


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(pipeline: str, files: list[Path], tokenizer: Path, work: Path, workers: int,
            timeout: float | None = None) -> dict:
    """One run in a fresh process (its own session, so a run past `timeout` is stopped with its workers).

    Adds cpu_seconds: user + system time of the process and every worker, which a loaded machine
    stretches far less than the wall clock.
    """
    out = Path(tempfile.mkdtemp(prefix=f".bench-out-{pipeline}-", dir=work))  # ours alone, removed below
    command = [sys.executable, "-m", "bench.data_hf", "--child", pipeline, "--tokenizer", str(tokenizer),
               "--out", str(out), "--workers", str(workers), "--files", *map(str, files)]
    load = os.getloadavg()[0]
    cpu = children_cpu_seconds()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True,
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1"})
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)   # the session we started: the child and its workers
        process.communicate()
        shutil.rmtree(out, ignore_errors=True)
        return {"timed_out": True, "seconds": timeout, "load": [load, os.getloadavg()[0]]}
    shutil.rmtree(out, ignore_errors=True)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:8])} ... failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {**result, "cpu_seconds": children_cpu_seconds() - cpu, "load": [load, os.getloadavg()[0]]}


def quick_tokenizer(work: Path, data_dir=None, vocab_size: int = 8192) -> Path:
    from lillm.tokenizer import train_bpe

    path = work / "tokenizer.json"
    if not path.is_file():
        train_bpe(seed_documents(data_dir), vocab_size=vocab_size, min_frequency=2, show_progress=False).save(path)
    return path


def row(size_gb: float, fmt: str, workers: int, pipeline: str, result: dict) -> dict:
    """One measurement as a table row: rates from the wall clock and from CPU time, peak memory, bins digest."""
    if result.get("timed_out"):
        return {"size_gb": size_gb, "format": fmt, "workers": workers, "pipeline": pipeline, "timed_out": True,
                "seconds": result["seconds"], "load": result["load"]}
    megabytes = result["bytes"] / 1e6
    sampler = result.get("sampler_cpu_seconds", 0.0)    # the memory sampler's CPU is not the pipeline's
    main_cpu = result["main_cpu_seconds"] - sampler if result.get("main_cpu_seconds") else None
    return {"size_gb": size_gb, "format": fmt, "workers": workers, "pipeline": pipeline,
            "mb_s": megabytes / result["seconds"], "tokens_s_per_worker": result["tokens"] / result["seconds"] / workers,
            "mb_per_cpu_s": megabytes / (result["cpu_seconds"] - sampler), "peak_mib": result["peak_rss"] / 2**20,
            "main_ceiling_mb_s": megabytes / main_cpu if main_cpu else None, "sampler_cpu_seconds": sampler,
            "bins": result["bins"], "seconds": result["seconds"], "cpu_seconds": result["cpu_seconds"],
            "bytes": result["bytes"], "tokens": result["tokens"], "load": result["load"]}


def table(rows: list[dict]) -> str:
    lines = ["| corpus | pipeline | workers | s | MB/s | tokens/s per worker | MB per CPU-s | main ceiling MB/s "
             "| peak memory | bins | load |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        load = f"{r['load'][0]:.1f}-{r['load'][1]:.1f}"
        corpus = f"{r['size_gb']:g} GB {r['format']}"
        if r.get("timed_out"):
            lines.append(f"| {corpus} | {r['pipeline']} | {r['workers']} | > {r['seconds']:.0f} (stopped) | "
                         f"< {r['size_gb'] * 1e3 / r['seconds']:.2f} | - | - | - | - | - | {load} |")
            continue
        ceiling = f"{r['main_ceiling_mb_s']:.1f}" if r.get("main_ceiling_mb_s") else "-"
        lines.append(f"| {corpus} | {r['pipeline']} | {r['workers']} | {r['seconds']:.0f} | {r['mb_s']:.2f} | "
                     f"{r['tokens_s_per_worker']:,.0f} | {r['mb_per_cpu_s']:.2f} | {ceiling} | "
                     f"{r['peak_mib']:,.0f} MiB | `{r['bins']}` | {load} |")
    return "\n".join(lines)


def parse_plan(entries: list[str], pipelines: list[str]) -> list[tuple[float, str, int, str]]:
    """SIZE:FORMAT:WORKERS[:PIPELINE] entries; without a pipeline, each of --pipelines."""
    plan = []
    for entry in entries:
        parts = entry.split(":")
        if len(parts) not in (3, 4) or parts[1] not in FORMATS or (len(parts) == 4 and parts[3] not in ("lillm", "anchor")):
            raise SystemExit(f"--plan {entry!r}: expected SIZE_GB:FORMAT:WORKERS[:PIPELINE], FORMAT one of "
                             f"{list(FORMATS)}, PIPELINE lillm or anchor (e.g. 0.25:parquet:2:lillm)")
        for pipeline in parts[3:] or pipelines:
            plan.append((float(parts[0]), parts[1], int(parts[2]), pipeline))
    return plan


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=False, help="folder for the corpus and outputs (outside the repository)")
    parser.add_argument("--sizes-gb", nargs="+", type=float, default=[0.25, 0.5, 1.0])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--plan", nargs="+", metavar="SIZE:FORMAT:WORKERS[:PIPELINE]",
                        help="measure only these cases, in this order (e.g. 1:parquet:2:lillm 1:txt:2:lillm), "
                             "instead of every combination")
    parser.add_argument("--pipelines", nargs="+", default=["lillm", "anchor"], choices=["lillm", "anchor"],
                        help="leave the (slow) anchor out of extra memory points")
    parser.add_argument("--anchor-timeout", type=float, default=1800,
                        help="seconds an anchor run may take before it is stopped (its row says so)")
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
    plan = parse_plan(args.plan, args.pipelines) if args.plan else \
        [(size, fmt, workers, pipeline) for size in args.sizes_gb for fmt in args.formats for workers in args.workers
         for pipeline in args.pipelines]
    corpus = make_corpus(work, int(max(size for size, *_ in plan) * 1e9), args.data_dir, shard_bytes)
    tokenizer = Path(args.tokenizer) if args.tokenizer else quick_tokenizer(work, args.data_dir)
    rows, started, load_before = [], time.time(), os.getloadavg()
    for size, fmt, workers, pipeline in plan:
        files = corpus[fmt][:max(1, round(size * 1e9 / shard_bytes))]
        timeout = args.anchor_timeout if pipeline == "anchor" else None
        rows.append(row(size, fmt, workers, pipeline, measure(pipeline, files, tokenizer, work, workers, timeout)))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
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
