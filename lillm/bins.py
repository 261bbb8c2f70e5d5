"""Writing token bins: sources in, train/val token files (one file or shards) and meta.json out.

The recipe of nanoGPT's prepare.py (tokenize once, offline, into flat files of token ids that
training memory-maps; lillm/data.py reads them; the format is lillm/bin_format.py), made deterministic, able to mix sources, and
able to run on corpora larger than memory or disk. Every document, in order:
1. comes from a `lillm.sources.Source` (a registered corpus, a local file, a hub dataset, streamed);
2. is normalised to Unicode NFC: a letter typed as base + combining mark (e + U+0301) becomes the
   single precomposed code point (U+00E9), so one word always gives one token sequence;
3. is hashed (16-byte keyed BLAKE2b of its UTF-8 text) and tokenized, with `</s>` after it, in
   worker processes (Pool.imap over chunks: results come back in input order, so the bins do not
   depend on the number of workers);
4. is then, in the main process and in output order, skipped when empty, dropped when its digest
   was seen before (exact de-duplication in bounded memory: lillm.dedup.DigestSet keeps the recent
   digests in memory and spills older ones to sorted files on disk, so memory does not grow with
   the corpus), and sent to val when
   the digest's first 8 bytes fall below --val-fraction: the split depends on the text alone, so
   re-runs, reordered sources and added corpora never move a document between train and val;
5. is appended to the split's file through a temporary name; the files are renamed into place
   only when everything succeeded, and meta.json (tokenizer hash, dtype, shards, counts per source
   and split, bytes per token for bits-per-byte, the mixture achieved) is written last, so an
   interrupted run never looks complete.

Mixtures. With weights (--mix swa=0.7 hau=0.3) the next document always comes from the source
furthest below its share of the train tokens written so far (a deficit rule, as in weighted
round-robin scheduling), so after n tokens every share is within one document of its weight; the
mixture ends when any source runs out (more would skew it). The choice depends only on token
counts, which are deterministic, so a mixture is identical for any number of workers. The reader
that feeds the workers guesses the same order from bytes read (tokens per byte measured so far)
and only ever runs a few chunks ahead per source, so memory stays flat.

Budgets (--max-docs, --max-tokens per source) are applied in the same place: a source stops at
the first document that would exceed its budget. Documents the reader read past that point are
dropped unseen, so they never enter the de-duplication set.

Shards. With shard_tokens set, each split is cut into files of that many tokens
(train-00000.bin, train-00001.bin, ...; a document may continue in the next shard), listed in
meta.json; the loader reads them as one stream. Without it, train.bin and val.bin as before.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import threading
import time
import unicodedata
from collections import deque
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from .bin_format import META_NAME, bin_name, token_dtype
from .dedup import DIGEST_BYTES, RECENT_LIMIT, DigestSet
from .errors import BinFormatError, EmptyCorpusError, SourceError
from .folders import new_file, write_text_atomic
from .sources import DEFAULT_KINDS, Source, parse_mix, resolve_sources
from .tokenizer import Tokenizer

CHUNK_BYTES = 1 << 20   # text per task sent to a worker: big enough to hide pickling, small for memory


# ---- encoding (in worker processes) ---------------------------------------------------------------
def encode_documents(tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of texts joined as `doc </s> doc </s> ...`, and the token count of each document.

    The count includes the document's `</s>`, so the counts sum to the length of the ids.
    """
    eos = tokenizer.eos_id
    if eos is None:
        raise BinFormatError(f"tokenizer {getattr(tokenizer, 'source', '')} has no </s> token to end documents")
    # One document at a time, on purpose: encode_batch would start the tokenizer's own thread pool,
    # and the parallelism is our worker processes, one thread each.
    encoded = [tokenizer.encode(text) for text in texts]
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.empty(int(lengths.sum()), dtype=np.int64)
    position = 0
    for ids in encoded:
        flat[position:position + len(ids)] = ids
        flat[position + len(ids)] = eos
        position += len(ids) + 1
    if flat.size and flat.max() >= (1 << (8 * dtype.itemsize)):
        raise BinFormatError(f"token id {int(flat.max())} does not fit in {dtype.name}")
    return flat.astype(dtype), lengths


def split_key(seed: int) -> bytes:
    return int(seed).to_bytes(16, "little", signed=True)


def encode_chunk(tokenizer, texts: list[str], key: bytes, dtype: np.dtype) -> tuple:
    """NFC, digest and tokenize one chunk: (digests, per-document tokens (0 = empty), UTF-8 bytes, ids)."""
    digests = bytearray(DIGEST_BYTES * len(texts))
    sizes = np.zeros(len(texts), dtype=np.int64)
    kept, kept_at = [], []
    for index, document in enumerate(texts):
        text = unicodedata.normalize("NFC", document)
        if not text.strip():
            continue
        data = text.encode("utf-8")
        sizes[index] = len(data)
        digests[DIGEST_BYTES * index:DIGEST_BYTES * (index + 1)] = hashlib.blake2b(
            data, digest_size=DIGEST_BYTES, key=key).digest()
        kept.append(text)
        kept_at.append(index)
    tokens, kept_lengths = encode_documents(tokenizer, kept, dtype)
    lengths = np.zeros(len(texts), dtype=np.int64)
    lengths[kept_at] = kept_lengths
    return bytes(digests), lengths, sizes, tokens


# Worker-process side: each pool worker loads the tokenizer once (initializer), then encodes
# chunks. They live in this importable module, so the pool can pickle them by name under any
# start method (fork, spawn, forkserver).
_WORKER = {}


def init_encode_worker(tokenizer_path: str, key: bytes = b"") -> None:
    _WORKER["tokenizer"] = Tokenizer.from_file(tokenizer_path)
    _WORKER["key"] = key


def encode_chunk_in_worker(chunk: tuple) -> tuple:
    """(tag, texts) -> (tag, *encode_chunk(...)); the tag passes through."""
    tag, texts = chunk
    tokenizer = _WORKER["tokenizer"]
    return (tag, *encode_chunk(tokenizer, texts, _WORKER["key"], token_dtype(tokenizer.vocab_size)))


# ---- reading: chunks of documents, one source per chunk -------------------------------------------
class Schedule:
    """What the reader and the writer share: which sources are finished, and how far each one got.

    The writer decides (its choices make the output); the reader only follows, reading ahead a
    few chunks of the sources the writer will want next.
    """

    def __init__(self, sources: list[Source], weights: list[float] | None, ahead: int):
        count = len(sources)
        self.weights = weights
        self.ahead = ahead                   # chunks read but not yet written, per source
        self.finished = [False] * count      # set by the writer: read no more of this source
        self.produced = [0] * count          # chunks handed to the workers (reader's counter)
        self.consumed = [0] * count          # chunks the writer is done with (writer's counter)
        self.chars_read = [0] * count
        self.chars_per_token = [4.0] * count  # refined by the writer as tokens come back
        self.stop = threading.Event()

    def reader_pick(self, active: list[int]) -> int | None:
        room = [i for i in active if self.produced[i] - self.consumed[i] < self.ahead]
        if not room:
            return None
        if self.weights is None:   # one source after the other: read ahead only in the current one
            return active[0] if active[0] in room else None
        return min(room, key=lambda i: self.chars_read[i] / self.chars_per_token[i] / self.weights[i])


def read_chunks(sources: list[Source], schedule: Schedule, chunk_bytes: int) -> Iterator[tuple]:
    """((source index, is_last), texts) chunks; the last chunk of each source is an empty marker."""
    readers = [None] * len(sources)
    exhausted = [False] * len(sources)
    while not schedule.stop.is_set():
        active = [i for i in range(len(sources)) if not exhausted[i] and not schedule.finished[i]]
        if not active:
            return
        index = schedule.reader_pick(active)
        if index is None:           # every source is far enough ahead: wait for the writer
            time.sleep(0.005)
            continue
        if readers[index] is None:
            readers[index] = iter(sources[index].documents())
        texts, size = [], 0
        for text in readers[index]:
            texts.append(text)
            size += len(text)
            if size >= chunk_bytes:
                break
        else:
            exhausted[index] = True
        schedule.chars_read[index] += size
        if texts:
            schedule.produced[index] += 1
            yield (index, False), texts
        if exhausted[index]:
            schedule.produced[index] += 1
            yield (index, True), []


def encode_chunks(tokenizer: Tokenizer, chunks, workers: int, key: bytes, stop: threading.Event) -> Iterator[tuple]:
    """(tag, digests, lengths, sizes, tokens) for each chunk, in input order."""
    if workers <= 1:
        dtype = token_dtype(tokenizer.vocab_size)
        for tag, texts in chunks:
            yield (tag, *encode_chunk(tokenizer, texts, key, dtype))
        return
    with multiprocessing.Pool(workers, initializer=init_encode_worker, initargs=(tokenizer.source, key)) as pool:
        try:
            yield from pool.imap(encode_chunk_in_worker, chunks)
        finally:
            stop.set()


# ---- writing ----------------------------------------------------------------------------------------
class PendingShards:
    """One split's shard files, made under hidden temporary names beside their final ones: commit()
    renames them into place, discard() removes them (so a failed run leaves no half-written bin)."""

    def __init__(self, out_dir: Path, split: str):
        self.out_dir, self.split = out_dir, split
        self.shards: list[dict] = []     # {"file", "tokens", "temporary"}

    def close(self) -> None:
        pass

    def commit(self) -> list[dict]:
        self.close()
        for shard in self.shards:
            os.replace(shard["temporary"], self.out_dir / shard["file"])
        return [{"file": shard["file"], "tokens": shard["tokens"]} for shard in self.shards]

    def discard(self) -> None:
        for shard in self.shards:
            shard["temporary"].unlink(missing_ok=True)


class ShardedWriter(PendingShards):
    """Appends token ids to temporary files beside their final names; commit() renames them into place.

    shard_tokens=0 writes one file, `{split}.bin`; otherwise `{split}-00000.bin`, ... of shard_tokens each.
    """

    def __init__(self, out_dir: Path, split: str, shard_tokens: int = 0):
        super().__init__(out_dir, split)
        self.shard_tokens = shard_tokens
        self.file = None

    def _final_name(self, index: int) -> str:
        return bin_name(self.split, index if self.shard_tokens else None)

    def _open_next(self) -> None:
        self.close()
        name = self._final_name(len(self.shards))
        temporary = new_file(self.out_dir / name)  # hidden, with the user's umask mode (lillm.folders)
        self.file = open(temporary, "wb")
        self.shards.append({"file": name, "tokens": 0, "temporary": temporary})

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self.file is None or (self.shard_tokens and self.shards[-1]["tokens"] >= self.shard_tokens):
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"] if self.shard_tokens else len(tokens)
            part, tokens = tokens[:room], tokens[room:]
            self.file.write(part.tobytes())
            self.shards[-1]["tokens"] += len(part)

    def close(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()

    def commit(self) -> list[dict]:
        if not self.shards:
            self._open_next()      # an empty split still gets its (empty) file
        return super().commit()

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
        super().discard()


# ---- the writer's side: documents in output order ---------------------------------------------------
class DocumentWriter:
    """Takes tokenized chunks in reader order and writes documents in output order (see the docstring)."""

    def __init__(self, sources, schedule: Schedule, writers: dict, val_fraction: float, stats: dict,
                 seen: DigestSet):
        self.sources, self.schedule, self.writers, self.stats = sources, schedule, writers, stats
        self.val_below = int(val_fraction * 2**64)  # val when the digest's first 8 bytes are below
        self.seen = seen                             # the digests of the documents written so far
        self.buffers = [deque() for _ in sources]   # per source: [result, next document index]
        self.reading_done = [False] * len(sources)
        self.kept = [{"documents": 0, "tokens": 0, "bytes": 0} for _ in sources]   # for budgets
        self.train_tokens = [0] * len(sources)
        self.ended_by: str | None = None

    def pick(self) -> int | None:
        open_sources = [i for i, done in enumerate(self.schedule.finished) if not done]
        if not open_sources:
            return None
        if self.schedule.weights is None:
            return open_sources[0]
        if len(open_sources) < len(self.sources):
            return None   # a mixture ends when its first source runs out
        return min(open_sources, key=lambda i: self.train_tokens[i] / self.schedule.weights[i])

    def finish(self, index: int, why: str) -> None:
        self.schedule.finished[index] = True
        if self.schedule.weights is not None and self.ended_by is None:
            self.ended_by = f"{self.sources[index].name} ({why})"
        self.schedule.consumed[index] += len(self.buffers[index])
        self.buffers[index].clear()

    def run(self, results: Iterator[tuple], bar) -> None:
        while (index := self.pick()) is not None:
            buffer = self.buffers[index]
            while not buffer and not self.reading_done[index]:
                (source, last), digests, lengths, sizes, tokens = next(results)
                bar.update(int(sizes.sum()))
                if last:
                    self.reading_done[source] = True
                    self.schedule.consumed[source] += 1
                elif self.schedule.finished[source]:
                    self.schedule.consumed[source] += 1     # read past a budget: dropped unseen
                else:
                    offsets = np.concatenate([[0], np.cumsum(lengths)])
                    lookup = self.seen.lookup(digests)
                    self.buffers[source].append([(lookup, lengths, sizes, tokens, offsets), 0])
            if not buffer:
                self.finish(index, "exhausted")
                continue
            self.take_one(index)

    def take_one(self, index: int) -> None:
        """Write (or drop) the next document of source `index`."""
        buffer = self.buffers[index]
        (lookup, lengths, sizes, tokens, offsets), position = buffer[0]
        if position + 1 >= len(lengths):
            buffer.popleft()
            self.schedule.consumed[index] += 1
        else:
            buffer[0][1] = position + 1
        length = int(lengths[position])
        if length == 0:
            self.stats["dropped"][index]["empty"] += 1
            return
        digest = lookup.digest(position)
        if lookup.seen(position, digest):
            self.stats["dropped"][index]["duplicates"] += 1
            return
        source, kept = self.sources[index], self.kept[index]
        if source.max_tokens is not None and kept["tokens"] + length > source.max_tokens:
            self.finish(index, "max_tokens")
            return
        self.seen.add(digest)
        split = "val" if int.from_bytes(digest[:8], "big") < self.val_below else "train"
        start = int(offsets[position])
        self.writers[split].write(tokens[start:start + length])
        size = int(sizes[position])
        counts = self.stats["splits"][split][index]
        counts["documents"] += 1
        counts["tokens"] += length
        counts["bytes"] += size
        kept["documents"] += 1
        kept["tokens"] += length
        kept["bytes"] += size
        if split == "train":
            self.train_tokens[index] += length
        self.schedule.chars_per_token[index] = max(kept["bytes"] / kept["tokens"], 0.5)
        if source.max_docs is not None and kept["documents"] >= source.max_docs:
            self.finish(index, "max_docs")
        elif source.max_tokens is not None and kept["tokens"] >= source.max_tokens:
            self.finish(index, "max_tokens")


# ---- meta.json -------------------------------------------------------------------------------------
def new_stats(sources: list[Source], splits: list[str]) -> dict:
    counts = {split: [{"documents": 0, "tokens": 0, "bytes": 0} for _ in sources] for split in splits}
    dropped = [{"duplicates": 0, "empty": 0} for _ in sources]
    return {"splits": counts, "dropped": dropped}


def check_counts(sources: list[Source], stats: dict, val_fraction: float) -> None:
    for index, source in enumerate(sources):
        if sum(split[index]["documents"] for split in stats["splits"].values()) == 0:
            dropped = stats["dropped"][index]
            raise EmptyCorpusError(
                f"corpus {source.where()} gave no documents: {dropped['empty']} empty and "
                f"{dropped['duplicates']} duplicate ones were dropped; check the file"
                + (f" and --text-column {source.text_column!r}" if source.text_column else ""))
    for split, counts in stats["splits"].items():
        if sum(c["documents"] for c in counts) == 0:
            raise EmptyCorpusError(f"no document fell into the {split} split (val_fraction={val_fraction}); "
                                   f"{'raise' if split == 'val' else 'lower'} --val-fraction or add data")


def build_meta(tokenizer: Tokenizer, sources: list[Source], stats: dict, settings: dict, shards: dict,
               mixture: dict | None) -> dict:
    splits = {}
    for split, counts in stats["splits"].items():
        total = {key: sum(c[key] for c in counts) for key in ("documents", "tokens", "bytes")}
        files = {"file": shards[split][0]["file"]} if len(shards[split]) == 1 and not settings.get("shard_tokens") \
            else {"shards": shards[split]}
        splits[split] = {**files, **total, "bytes_per_token": total["bytes"] / total["tokens"],
                         "sources": {s.name: c for s, c in zip(sources, counts)}}
    meta = {
        "format": "lillm token bin: raw little-endian token ids, </s> after every document",
        "tokenizer_path": str(Path(tokenizer.source).resolve()),
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "eos_id": tokenizer.eos_id,
        "splits": splits,
        "sources": {s.name: {**s.describe(), "duplicates_dropped": d["duplicates"], "empty_dropped": d["empty"]}
                    for s, d in zip(sources, stats["dropped"])},
        "notes": "tokens include one </s> per document; bytes are UTF-8 bytes of the NFC text; "
                 "bits per byte = loss_in_nats / ln(2) / bytes_per_token",
        "settings": settings,
    }
    if mixture is not None:
        meta["mixture"] = mixture
    return meta


def publish_bins(out_dir: Path, writers: dict, meta_for) -> dict:
    """Bins then meta.json; the old meta.json goes first, so a crash in between leaves none."""
    for writer in writers.values():
        writer.close()
    (out_dir / META_NAME).unlink(missing_ok=True)
    shards = {split: writer.commit() for split, writer in writers.items()}
    meta = meta_for(shards)
    write_text_atomic(out_dir / META_NAME, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return meta


def achieved_mixture(sources: list[Source], weights: dict, stats: dict, ended_by: str | None) -> dict:
    train = [c["tokens"] for c in stats["splits"]["train"]]
    total = sum(train) or 1
    return {"by": "train tokens", "weights": weights,
            "achieved": {s.name: tokens / total for s, tokens in zip(sources, train)},
            "ended_by": ended_by}


# ---- the whole run -----------------------------------------------------------------------------------
def write_bins(tokenizer_path, out_dir, sources: list[Source], val_fraction: float = 0.005, workers: int = 1,
               seed: int = 0, chunk_bytes: int = CHUNK_BYTES, progress: bool = True, mix: dict | None = None,
               shard_tokens: int = 0, settings: dict | None = None, recent_digests: int = RECENT_LIMIT) -> dict:
    """Write the train (and val, unless val_fraction is 0) bins and meta.json into out_dir; return meta.

    The output depends on the sources, tokenizer, val_fraction, seed, mix and shard_tokens, not
    on workers, chunk_bytes or recent_digests (the digests de-duplication holds in memory before
    it spills to disk).
    """
    if not 0 <= val_fraction < 1:
        raise SourceError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 0:
        raise SourceError(f"--shard-tokens must be positive (or 0 for one file per split), got {shard_tokens}")
    tokenizer = Tokenizer.from_file(tokenizer_path)
    if tokenizer.eos_id is None:
        raise BinFormatError(f"tokenizer {tokenizer_path} has no </s> token to end documents with")
    preflight(sources)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = ["train", "val"] if val_fraction > 0 else ["train"]
    stats = new_stats(sources, splits)
    weights = None if mix is None else [mix[s.name] for s in sources]
    schedule = Schedule(sources, weights, ahead=2 * max(workers, 1) + 2)
    writers = {split: ShardedWriter(out_dir, split, shard_tokens) for split in splits}
    settings = {**(settings or {}), "val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens,
                "mix": mix}
    seen = DigestSet(out_dir, recent_limit=recent_digests)
    writer = DocumentWriter(sources, schedule, writers, val_fraction, stats, seen)
    try:
        chunks = read_chunks(sources, schedule, chunk_bytes)
        results = encode_chunks(tokenizer, chunks, workers, split_key(seed), schedule.stop)
        try:
            # delay: a bad row found in the first second is refused in one line, with no bar before it
            with tqdm(desc="tokenizing", unit="B", unit_scale=True, disable=not progress, delay=1) as bar:
                writer.run(results, bar)
        finally:
            schedule.stop.set()
            results.close()
        check_counts(sources, stats, val_fraction)
        mixture = None if mix is None else achieved_mixture(sources, mix, stats, writer.ended_by)
        return publish_bins(out_dir, writers,
                            lambda shards: build_meta(tokenizer, sources, stats, settings, shards, mixture))
    finally:
        seen.close()
        for split_writer in writers.values():
            split_writer.discard()


def preflight(sources: list[Source]) -> None:
    """Open every dataset source once and check its column, so a bad name or no network fails before any work."""
    for source in sources:
        source.check_text_column()


def prepare(tokenizer_path, out_dir, langs=(), corpora=None, files=None, text_column=None, data_dir=None,
            val_fraction: float = 0.005, workers: int = 1, seed: int = 0, chunk_bytes: int = CHUNK_BYTES,
            progress: bool = True, kinds=DEFAULT_KINDS, hf=None, hf_split: str = "train", max_docs=None,
            max_tokens=None, mix=None, shard_tokens: int = 0, sources: list[Source] | None = None) -> dict:
    """Resolve the sources (lillm.sources.resolve_sources), then write_bins; mix is ['name=weight', ...]."""
    resolved = resolve_sources(langs, corpora, files, text_column, data_dir, kinds, hf, hf_split, max_docs,
                               max_tokens, sources)
    weights = parse_mix(mix, [source.name for source in resolved])
    settings = {"langs": list(langs or ()), "corpora": list(corpora or ()), "files": [str(f) for f in files or ()],
                "hf": list(hf or ()), "hf_split": hf_split if hf else None, "text_column": text_column,
                "data_dir": str(data_dir) if data_dir else None,
                "kinds": list(kinds) if kinds and langs and not corpora else None}
    return write_bins(tokenizer_path, out_dir, resolved, val_fraction, workers, seed, chunk_bytes, progress,
                      weights, shard_tokens, settings)


def summary(meta: dict, seconds: float) -> str:
    lines = []
    for split, info in meta["splits"].items():
        files = info.get("file") or f"{len(info['shards'])} shards"
        lines.append(f"{split} ({files}): {info['tokens']:,} tokens, {info['documents']:,} documents, "
                     f"{info['bytes'] / 1e6:.2f} MB, {info['bytes_per_token']:.3f} bytes/token")
        for name, counts in info["sources"].items():
            lines.append(f"  {name:<28} {counts['tokens']:>12,} tokens {counts['documents']:>9,} documents")
    if "mixture" in meta:
        achieved = ", ".join(f"{k}={v:.3f}" for k, v in meta["mixture"]["achieved"].items())
        lines.append(f"mixture achieved (train tokens): {achieved}; ended by {meta['mixture']['ended_by']}")
    dropped = sum(s["duplicates_dropped"] for s in meta["sources"].values())
    total_bytes = sum(info["bytes"] for info in meta["splits"].values())
    total_tokens = sum(info["tokens"] for info in meta["splits"].values())
    lines.append(f"dropped {dropped:,} duplicate documents; dtype {meta['dtype']}")
    lines.append(f"{total_bytes / 1e6:.2f} MB -> {total_tokens:,} tokens in {seconds:.1f} s: "
                 f"{total_bytes / 1e6 / seconds:.2f} MB/s, {total_tokens / seconds:,.0f} tokens/s")
    return "\n".join(lines)
