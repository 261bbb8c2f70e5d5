"""Tokenize text corpora into pretraining token bins: train.bin, val.bin and meta.json.

    python data/prepare_pretrain.py --tokenizer out/tokenizer/tokenizer.json --langs swa hau --out out/data

The recipe of nanoGPT's prepare.py, made deterministic and able to run on corpora larger than
memory. Every document, in order:
1. is read from a registered corpus (lillm.corpora) or from a file given with --files;
2. is normalised to Unicode NFC: a letter typed as base + combining mark (e + U+0301) becomes the
   single precomposed code point (U+00E9), so one word always gives one token sequence;
3. is skipped when empty, or dropped when it repeats an earlier document exactly (the set of
   seen documents holds 16-byte BLAKE2b digests, not texts, so memory stays small);
4. goes to val when a seeded hash of its text falls below --val-fraction: the split depends on
   the text alone, so re-runs, reordered sources and added corpora never move a document
   between train and val (a position-based split would);
5. is tokenized in worker processes (Pool.imap over chunks: ordered, so the bins do not depend
   on the number of workers) with `</s>` after it;
6. is appended to train.bin / val.bin through temporary files, renamed only when everything
   succeeded; meta.json (tokenizer hash, dtype, counts per source and split, bytes per token
   for bits-per-byte) is written last, so an interrupted run never looks complete.
The format of the bins and the loader that reads them are in lillm/data.py.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import tempfile
import threading
import time
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


import numpy as np
from tqdm import tqdm

from lillm.cli import run_main
from lillm.corpora import data_dir as resolve_data_dir, read_documents, select_corpora
from lillm.data import (META_NAME, encode_chunk_in_worker, encode_documents, init_encode_worker,
                        token_dtype)
from lillm.folders import claim_output, discard
from lillm.tokenizer import Tokenizer

FORMAT_BY_SUFFIX = {".txt": "txt", ".tsv": "tsv", ".csv": "csv", ".conll": "conll"}
CHUNK_BYTES = 1 << 20   # text per task sent to a worker: big enough to hide pickling, small for memory
# A language-wide selection leaves out 'ner': MasakhaNER sentences are whitespace-tokenized copies
# of the Lacuna sentences already read as 'mono', so they would add near-duplicates.
DEFAULT_KINDS = ("mono", "news", "sentiment", "mt")


class EmptyCorpusError(ValueError):
    """A source that gives no document once empty and duplicate ones are dropped."""


@dataclass(frozen=True)
class Source:
    """One file of documents, named as meta.json will report it."""
    name: str
    path: Path
    fmt: str
    text_column: str | None = None

    def documents(self) -> Iterator[str]:
        return read_documents(self.path, self.fmt, self.text_column)


# ---- which files --------------------------------------------------------------------------------
def file_source(path, text_column: str | None = None) -> Source:
    """A --files entry, its format inferred from the extension."""
    path = Path(path)
    fmt = FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: cannot tell the format from the extension {path.suffix!r}; "
                         f"use one of {', '.join(FORMAT_BY_SUFFIX)} (rename the file)")
    if fmt in ("csv", "tsv") and not text_column:
        raise ValueError(f"{path} is a {fmt} table: pass --text-column NAME to say which column holds the text")
    return Source(str(path), path, fmt, text_column if fmt in ("csv", "tsv") else None)


def resolve_sources(langs=(), corpora=None, files=None, text_column=None, data_dir=None,
                    kinds=DEFAULT_KINDS) -> list[Source]:
    """Registered corpora (by name, else the train splits of langs of these kinds), then --files."""
    langs, corpora, files = list(langs or ()), list(corpora or ()), list(files or ())
    if not (langs or corpora or files):
        raise ValueError("nothing to read: give --langs, --corpora or --files")
    sources = []
    if langs or corpora:
        root = resolve_data_dir(data_dir)
        for corpus in select_corpora(langs, ("train",), corpora or None, kinds):
            path = root / corpus.relpath
            if not corpora and not path.is_file():  # a language-wide selection skips absent files
                warnings.warn(f"skipping corpus {corpus.name}: {path} not found", stacklevel=2)
                continue
            if corpus.split != "train":
                warnings.warn(f"corpus {corpus.name} is a {corpus.split} split: pretraining on it leaks "
                              f"evaluation data into the model", stacklevel=2)
            sources.append(Source(corpus.name, path, corpus.fmt, corpus.text_column))
    sources += [file_source(path, text_column) for path in files]
    for source in sources:
        if source.path.is_file():
            continue
        if source.name == str(source.path):
            raise FileNotFoundError(f"{source.path} not found (given with --files); check the path")
        raise FileNotFoundError(f"corpus {source.name}: {source.path} not found; check --data-dir / "
                                f"$LILLM_DATA_DIR (the data folder, see SOURCES.md there)")
    names = [source.name for source in sources]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"source(s) {repeated} given twice; name each corpus or file once")
    if not sources:
        raise FileNotFoundError(f"no corpus file found for langs={langs}; check --data-dir / $LILLM_DATA_DIR")
    return sources


# ---- documents: normalise, de-duplicate, split --------------------------------------------------
def new_stats(sources: list[Source], splits: list[str]) -> dict:
    counts = {split: [{"documents": 0, "tokens": 0, "bytes": 0} for _ in sources] for split in splits}
    dropped = [{"duplicates": 0, "empty": 0} for _ in sources]
    return {"splits": counts, "dropped": dropped}


def split_key(seed: int) -> bytes:
    return int(seed).to_bytes(16, "little", signed=True)


def document_chunks(sources: list[Source], seed: int, val_fraction: float, stats: dict,
                    chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[tuple, list[str]]]:
    """Chunks ((split, source ids, bytes), texts), each split's chunks in document order.

    Fills stats["dropped"] and the document/byte counts as it goes.
    """
    seen: set[bytes] = set()
    val_below = int(val_fraction * 2**64)   # a document is val when its hash's first 8 bytes are below
    key = split_key(seed)
    pending = {split: ([], [], 0) for split in stats["splits"]}
    for index, source in enumerate(sources):
        for document in source.documents():
            text = unicodedata.normalize("NFC", document)
            if not text.strip():
                stats["dropped"][index]["empty"] += 1
                continue
            data = text.encode("utf-8")
            digest = hashlib.blake2b(data, digest_size=16, key=key).digest()
            if digest in seen:
                stats["dropped"][index]["duplicates"] += 1
                continue
            seen.add(digest)
            split = "val" if int.from_bytes(digest[:8], "big") < val_below else "train"
            counts = stats["splits"][split][index]
            counts["documents"] += 1
            counts["bytes"] += len(data)
            ids, texts, size = pending[split]
            ids.append(index)
            texts.append(text)
            pending[split] = (ids, texts, size + len(data))
            if size + len(data) >= chunk_bytes:
                yield (split, ids, size + len(data)), texts
                pending[split] = ([], [], 0)
    for split, (ids, texts, size) in pending.items():
        if texts:
            yield (split, ids, size), texts


# ---- tokenizing ---------------------------------------------------------------------------------
def encode_chunks(tokenizer: Tokenizer, chunks, workers: int) -> Iterator[tuple]:
    """(tag, token ids, per-document counts) for each chunk, in input order."""
    if workers <= 1:
        dtype = token_dtype(tokenizer.vocab_size)
        for tag, texts in chunks:
            yield (tag, *encode_documents(tokenizer, texts, dtype))
        return
    # Pool.imap pulls its input as fast as it can; a semaphore holds the reader back so that
    # at most a few chunks are in flight and memory stays flat whatever the corpus size.
    in_flight, stop = threading.Semaphore(4 * workers), threading.Event()

    def throttled():
        for chunk in chunks:
            while not in_flight.acquire(timeout=0.1):
                if stop.is_set():
                    return
            yield chunk

    with multiprocessing.Pool(workers, initializer=init_encode_worker, initargs=(tokenizer.source,)) as pool:
        try:
            for result in pool.imap(encode_chunk_in_worker, throttled()):
                in_flight.release()
                yield result
        finally:
            stop.set()


class BinWriter:
    """Appends token ids to a temporary file beside `final`; commit() renames it into place."""

    def __init__(self, final: Path):
        self.final = final
        handle, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        self.temporary = Path(name)
        self.file = os.fdopen(handle, "wb")

    def write(self, tokens: np.ndarray) -> None:
        self.file.write(tokens.tobytes())

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()

    def commit(self) -> None:
        self.close()
        os.chmod(self.temporary, 0o644)
        os.replace(self.temporary, self.final)

    def discard(self) -> None:
        self.file.close()
        self.temporary.unlink(missing_ok=True)


# ---- meta.json ----------------------------------------------------------------------------------
def check_counts(sources: list[Source], stats: dict, val_fraction: float) -> None:
    for index, source in enumerate(sources):
        if sum(split[index]["documents"] for split in stats["splits"].values()) == 0:
            dropped = stats["dropped"][index]
            raise EmptyCorpusError(
                f"corpus {source.name} ({source.path}) gave no documents: {dropped['empty']} empty and "
                f"{dropped['duplicates']} duplicate ones were dropped; check the file"
                + (f" and --text-column {source.text_column!r}" if source.text_column else ""))
    for split, counts in stats["splits"].items():
        if sum(c["documents"] for c in counts) == 0:
            raise EmptyCorpusError(f"no document fell into the {split} split (val_fraction={val_fraction}); "
                                   f"{'raise' if split == 'val' else 'lower'} --val-fraction or add data")


def build_meta(tokenizer: Tokenizer, sources: list[Source], stats: dict, settings: dict) -> dict:
    splits = {}
    for split, counts in stats["splits"].items():
        total = {key: sum(c[key] for c in counts) for key in ("documents", "tokens", "bytes")}
        splits[split] = {"file": f"{split}.bin", **total,
                         "bytes_per_token": total["bytes"] / total["tokens"],
                         "sources": {s.name: c for s, c in zip(sources, counts)}}
    return {
        "format": "lillm token bin: raw little-endian token ids, </s> after every document",
        "tokenizer_path": str(Path(tokenizer.source).resolve()),
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "eos_id": tokenizer.eos_id,
        "splits": splits,
        "sources": {s.name: {"path": str(s.path), "format": s.fmt, "text_column": s.text_column,
                             "duplicates_dropped": d["duplicates"], "empty_dropped": d["empty"]}
                    for s, d in zip(sources, stats["dropped"])},
        "notes": "tokens include one </s> per document; bytes are UTF-8 bytes of the NFC text; "
                 "bits per byte = loss_in_nats / ln(2) / bytes_per_token",
        "settings": settings,
    }


def write_outputs(out_dir: Path, writers: dict, meta: dict) -> None:
    """Bins then meta.json; the old meta.json goes first, so a crash in between leaves none."""
    for writer in writers.values():
        writer.close()
    (out_dir / META_NAME).unlink(missing_ok=True)
    for writer in writers.values():
        writer.commit()
    handle, name = tempfile.mkstemp(dir=out_dir, prefix=f".{META_NAME}.", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as f:
        f.write(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    os.chmod(name, 0o644)
    os.replace(name, out_dir / META_NAME)


# ---- the whole run ------------------------------------------------------------------------------
def prepare(tokenizer_path, out_dir, langs=(), corpora=None, files=None, text_column=None, data_dir=None,
            val_fraction: float = 0.005, workers: int = 1, seed: int = 0, chunk_bytes: int = CHUNK_BYTES,
            progress: bool = True, kinds=DEFAULT_KINDS) -> dict:
    """Write train.bin, val.bin (unless val_fraction is 0) and meta.json into out_dir; return meta.

    The output depends on the sources, tokenizer, val_fraction and seed, not on workers or
    chunk_bytes.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tokenizer = Tokenizer.from_file(tokenizer_path)
    if tokenizer.eos_id is None:
        raise ValueError(f"tokenizer {tokenizer_path} has no </s> token to end documents with")
    sources = resolve_sources(langs, corpora, files, text_column, data_dir, kinds)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = ["train", "val"] if val_fraction > 0 else ["train"]
    stats = new_stats(sources, splits)
    writers = {split: BinWriter(out_dir / f"{split}.bin") for split in splits}
    settings = {"langs": list(langs or ()), "corpora": list(corpora or ()), "files": [str(f) for f in files or ()],
                "text_column": text_column,
                "data_dir": str(resolve_data_dir(data_dir)) if (langs or corpora) else None,
                "kinds": list(kinds) if kinds and not corpora else None,
                "val_fraction": val_fraction, "seed": seed}
    try:
        chunks = document_chunks(sources, seed, val_fraction, stats, chunk_bytes)
        with tqdm(desc="tokenizing", unit="B", unit_scale=True, disable=not progress) as bar:
            for (split, source_ids, size), tokens, lengths in encode_chunks(tokenizer, chunks, workers):
                writers[split].write(tokens)
                counts = stats["splits"][split]
                for source_id, length in zip(source_ids, lengths.tolist()):
                    counts[source_id]["tokens"] += length
                bar.update(size)
        check_counts(sources, stats, val_fraction)
        meta = build_meta(tokenizer, sources, stats, settings)
        write_outputs(out_dir, writers, meta)
    finally:
        for writer in writers.values():
            if writer.temporary.exists():
                writer.discard()
    return meta


def summary(meta: dict, seconds: float) -> str:
    lines = []
    for split, info in meta["splits"].items():
        lines.append(f"{split}.bin: {info['tokens']:,} tokens, {info['documents']:,} documents, "
                     f"{info['bytes'] / 1e6:.2f} MB, {info['bytes_per_token']:.3f} bytes/token")
        for name, counts in info["sources"].items():
            lines.append(f"  {name:<28} {counts['tokens']:>12,} tokens {counts['documents']:>9,} documents")
    dropped = sum(s["duplicates_dropped"] for s in meta["sources"].values())
    total_bytes = sum(info["bytes"] for info in meta["splits"].values())
    total_tokens = sum(info["tokens"] for info in meta["splits"].values())
    lines.append(f"dropped {dropped:,} duplicate documents; dtype {meta['dtype']}")
    lines.append(f"{total_bytes / 1e6:.2f} MB -> {total_tokens:,} tokens in {seconds:.1f} s: "
                 f"{total_bytes / 1e6 / seconds:.2f} MB/s, {total_tokens / seconds:,.0f} tokens/s")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default="out/tokenizer/tokenizer.json", help="tokenizer.json to encode with")
    parser.add_argument("--langs", nargs="+", default=None,
                        help="read every train-split corpus of these languages (default: swa hau when "
                             "neither --corpora nor --files is given)")
    parser.add_argument("--out", default="out/data", help="folder for train.bin, val.bin, meta.json")
    parser.add_argument("--corpora", nargs="+", help="registered corpus names (lillm.corpora.CORPORA)")
    parser.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS),
                        help="corpus kinds read with --langs (ner is left out: copies of lacuna sentences)")
    parser.add_argument("--files", nargs="+", help="extra files: .txt (a document per line), .tsv/.csv "
                                                   "(with --text-column), .conll")
    parser.add_argument("--text-column", help="column holding the text in --files tables")
    parser.add_argument("--data-dir", help="data directory (default: $LILLM_DATA_DIR, else ../shared/data)")
    parser.add_argument("--val-fraction", type=float, default=0.005, help="share of documents held out")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an existing token-bin folder (replaces only its bins and meta.json)")
    args = parser.parse_args(argv)
    if not (args.langs or args.corpora or args.files):
        args.langs = ["swa", "hau"]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    claim_output(args.out, "bins", overwrite=args.overwrite)  # a folder of other files is refused by name
    start = time.perf_counter()
    meta = prepare(args.tokenizer, args.out, args.langs, args.corpora, args.files, args.text_column,
                   args.data_dir, args.val_fraction, args.workers, args.seed, kinds=args.kinds)
    print(summary(meta, time.perf_counter() - start))
    if "val" not in meta["splits"]:
        discard(Path(args.out) / "val.bin")  # an older run's val.bin would no longer match meta.json
    print(f"wrote {', '.join(str(Path(args.out) / info['file']) for info in meta['splits'].values())} "
          f"and {META_NAME}")


if __name__ == "__main__":
    run_main(main)
