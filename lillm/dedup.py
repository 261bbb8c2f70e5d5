"""Exact de-duplication in bounded memory: the digests of the documents written so far, in RAM and on disk.

lillm/bins.py drops a document whose text was written before (exact de-duplication, the first
step of most pretraining pipelines: Lee et al., 2022, "Deduplicating Training Data Makes Language
Models Better"). Each NFC text is hashed to a 16-byte keyed BLAKE2b digest and the question "seen
before?" is asked for every document, in output order. A Python set of digests answers it at
about 90 bytes per document: 5 GB for Inkuba-Mono's 60M Swahili and Hausa sentences. A DigestSet
gives the same answers, exactly, in memory that does not grow with the corpus, the way a
log-structured merge tree does (O'Neil et al., 1996, "The log-structured merge-tree") with a
Bloom filter in front of its disk (Bloom, 1970, "Space/time trade-offs in hash coding with
allowable errors"):

1. recent: the digests added since the last spill, a Python set of at most `recent_limit`;
2. runs: a full `recent` is sorted and written to a file (a run) of (hi, lo) uint64 pairs sorted
   by hi, the digest's first 8 bytes read big-endian. Two runs of the same size are merged into
   one, streamed a window at a time, like the carries of a binary counter: there are at most
   log2(spilled / recent_limit) + 1 runs and each digest is rewritten that many times. Memory keeps
   only each run's fence: the hi of the first key of every 256-key (4 KiB) block;
3. filter: a Bloom filter over the digests in runs, 10 bits per digest and 7 probes (about 1%
   false positives), doubled (rebuilt from the runs) when full, up to `filter_bytes`; beyond that
   its false-positive rate rises, which costs disk reads, never a wrong answer.

Only a digest the filter cannot rule out is looked for in the runs: one or two 4 KiB blocks per
run, located by the fence and read through a short-lived memory map. A chunk's digests are looked
up together (numpy, vectorised) and the answer is kept until the next spill changes the runs. The
filter only saves disk reads; the runs decide, so every answer is the answer of a Python set of
every digest added, tested against one (tests/test_dedup.py).

Memory: recent (~16 MB at the default limit), the filter (1.25 bytes per spilled digest, at most
`filter_bytes`), the fences (1/32 byte per digest). Disk: 16 bytes per digest (twice that during
the largest merge), in a hidden folder `.dedup-<pid>-*.tmp` beside the output, removed at the end;
one left by a killed run (its pid gone) is removed by the next run in that folder.
"""
from __future__ import annotations

import mmap
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .folders import pid_alive

DIGEST_BYTES = 16
KEY = np.dtype([("hi", "<u8"), ("lo", "<u8")])
BLOCK_KEYS = 256            # keys per block of a run: 4 KiB, the unit read from disk for one lookup
RECENT_LIMIT = 1 << 17      # digests held in the Python set before a spill (about 16 MB)
FILTER_BYTES = 64 << 20     # the Bloom filter's cap: about 1% false positives up to 54M spilled digests
FIRST_FILTER_BITS = 1 << 23  # the filter's first size (1 MiB); it doubles as runs fill it
BITS_PER_KEY = 10
PROBES = 7                  # ~ln 2 * BITS_PER_KEY, the number of probes that minimises false positives
MERGE_KEYS = 1 << 18        # keys per window of a streamed merge or filter rebuild (4 MiB)
SPILL_FOLDER = re.compile(r"\.dedup-(\d+)-.+\.tmp")


def as_keys(digests: bytes) -> np.ndarray:
    """Concatenated 16-byte digests as KEY records: hi = the first 8 bytes big-endian, lo = the last 8."""
    words = np.frombuffer(digests, dtype=">u8").reshape(-1, 2)
    keys = np.empty(len(words), dtype=KEY)
    keys["hi"], keys["lo"] = words[:, 0], words[:, 1]
    return keys


def sorted_by_hi(keys: np.ndarray) -> np.ndarray:
    return keys[np.argsort(keys["hi"], kind="stable")]


# ---- the filter ------------------------------------------------------------------------------------
class BloomFilter:
    """A bit array; a key sets PROBES bits, found at (lo + i * (hi | 1)) mod size.

    The digests are already uniform (keyed BLAKE2b), so the probe positions come from the key by
    double hashing (Kirsch and Mitzenmacher, 2006, "Less hashing, same performance"); `| 1` makes
    the step odd, so the probes of a key never repeat within a power-of-two table.
    """

    def __init__(self, bits: int):
        if bits < 64 or bits & (bits - 1):
            raise ValueError(f"a Bloom filter's size must be a power of two of at least 64 bits, got {bits}")
        self.bits = bits
        self.words = np.zeros(bits // 64, dtype=np.uint64)
        self.count = 0

    @property
    def capacity(self) -> int:
        """Keys it holds at about 1% false positives."""
        return self.bits // BITS_PER_KEY

    def positions(self, keys: np.ndarray) -> list[np.ndarray]:
        mask = np.uint64(self.bits - 1)
        step = keys["hi"] | np.uint64(1)
        return [(keys["lo"] + np.uint64(probe) * step) & mask for probe in range(PROBES)]

    def add(self, keys: np.ndarray) -> None:
        for position in self.positions(keys):
            # ufunc.at, not words[i] |= ...: two keys setting bits of the same word must both land
            np.bitwise_or.at(self.words, position >> np.uint64(6), np.uint64(1) << (position & np.uint64(63)))
        self.count += len(keys)

    def may_contain(self, keys: np.ndarray) -> np.ndarray:
        """False: certainly never added. True: added, or a false positive."""
        found = np.ones(len(keys), dtype=bool)
        for position in self.positions(keys):
            found &= ((self.words[position >> np.uint64(6)] >> (position & np.uint64(63))) & np.uint64(1)).astype(bool)
        return found


# ---- runs: sorted files of keys -----------------------------------------------------------------------
class Run:
    """A file of `count` KEY records sorted by hi, and its fence (the hi of each block's first key)."""

    def __init__(self, path: Path, count: int, fence: np.ndarray):
        self.path, self.count, self.fence = path, count, fence

    def windows(self, size: int = MERGE_KEYS):
        """The keys in order, `size` at a time, read from the file (not mapped: the pages stay in the OS cache)."""
        with open(self.path, "rb") as f:
            while len(window := np.fromfile(f, dtype=KEY, count=size)):
                yield window

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """For each key, whether this run holds it (exact)."""
        if not self.count or not len(keys):
            return np.zeros(len(keys), dtype=bool)
        # A map for this lookup only: the pages it touches leave the process with it.
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return self._search(np.frombuffer(mapped, dtype=KEY, count=self.count), keys)

    def _search(self, stored: np.ndarray, keys: np.ndarray) -> np.ndarray:
        found = np.zeros(len(keys), dtype=bool)
        hi, lo = keys["hi"], keys["lo"]
        # The keys whose hi equals h lie in blocks first .. last: the block before the first block
        # that starts at h or later (or that block itself), through the last block starting at <= h.
        first = np.maximum(np.searchsorted(self.fence, hi, "left") - 1, 0)
        last = np.searchsorted(self.fence, hi, "right") - 1
        usual = (last >= 0) & (last - first <= 1)
        rows = np.minimum(first[usual, None] * BLOCK_KEYS + np.arange(2 * BLOCK_KEYS), self.count - 1)
        window = stored[rows]                     # two blocks per key: the pages read from disk
        found[usual] = ((window["hi"] == hi[usual, None]) & (window["lo"] == lo[usual, None])).any(axis=1)
        # More than a block of keys sharing their first 8 bytes: never seen with real digests, exact anyway.
        for index in np.flatnonzero((last - first > 1) & (last >= 0)):
            span = stored[first[index] * BLOCK_KEYS:(last[index] + 1) * BLOCK_KEYS]
            found[index] = bool(np.any((span["hi"] == hi[index]) & (span["lo"] == lo[index])))
        return found


class RunWriter:
    """Appends sorted windows of keys to a new run file, collecting its fence."""

    def __init__(self, path: Path):
        self.path, self.count, self.fence = path, 0, []
        self.file = open(path, "wb")

    def write(self, keys: np.ndarray) -> None:
        self.fence.append(keys["hi"][(-self.count) % BLOCK_KEYS::BLOCK_KEYS].copy())
        self.file.write(keys.tobytes())
        self.count += len(keys)

    def close(self) -> Run:
        self.file.close()
        fence = np.concatenate(self.fence) if self.fence else np.zeros(0, dtype=np.uint64)
        return Run(self.path, self.count, fence)


def merge_runs(older: Run, newer: Run, path: Path) -> Run:
    """One run holding the keys of both, sorted by hi; memory: a few windows, not the runs."""
    out = RunWriter(path)
    a, b = older.windows(), newer.windows()
    window_a, window_b = next(a, None), next(b, None)
    while window_a is not None and window_b is not None:
        # Everything up to the smaller of the two last his can be written: nothing later in either run is below it.
        cut = min(window_a["hi"][-1], window_b["hi"][-1])
        take_a = np.searchsorted(window_a["hi"], cut, "right")
        take_b = np.searchsorted(window_b["hi"], cut, "right")
        out.write(sorted_by_hi(np.concatenate([window_a[:take_a], window_b[:take_b]])))
        # At least one window is used up (the one whose last hi is the cut); read its next.
        window_a = window_a[take_a:] if take_a < len(window_a) else next(a, None)
        window_b = window_b[take_b:] if take_b < len(window_b) else next(b, None)
    for window, rest in ((window_a, a), (window_b, b)):
        while window is not None:
            out.write(window)
            window = next(rest, None)
    return out.close()


# ---- the set -------------------------------------------------------------------------------------------
class DigestSet:
    """A set of 16-byte digests (bytes) in bounded memory: `add`, `in`, `lookup` for a chunk at once.

    Spill files go to a hidden folder `.dedup-<pid>-*.tmp` made in `folder` and removed by close().
    """

    def __init__(self, folder, recent_limit: int = RECENT_LIMIT, filter_bytes: int = FILTER_BYTES,
                 first_filter_bits: int = FIRST_FILTER_BITS):
        if recent_limit < 1:
            raise ValueError(f"recent_limit must be at least 1, got {recent_limit}")
        remove_stale_spills(Path(folder))
        self.folder = Path(tempfile.mkdtemp(dir=folder, prefix=f".dedup-{os.getpid()}-", suffix=".tmp"))
        self.recent_limit, self.max_filter_bits = recent_limit, 8 * filter_bytes
        self.recent: set[bytes] = set()
        self.runs: list[Run] = []
        self.filter = BloomFilter(min(first_filter_bits, self.max_filter_bits))
        self.generation = 0           # counts spills: a chunk's answers from the runs hold within one
        self.spilled = 0
        self.files_made = 0

    def __len__(self) -> int:
        return self.spilled + len(self.recent)

    def __contains__(self, digest: bytes) -> bool:
        return ChunkLookup(self, digest).seen(0)

    def lookup(self, digests: bytes) -> "ChunkLookup":
        """Answers 'seen?' for each digest of a chunk (concatenated), asked in order as the chunk is written."""
        return ChunkLookup(self, digests)

    def add(self, digest: bytes) -> None:
        """Add a digest not in the set (the caller asked first)."""
        self.recent.add(digest)
        if len(self.recent) >= self.recent_limit:
            self.spill()

    def in_runs(self, keys: np.ndarray) -> np.ndarray:
        """For each key, whether a run holds it; the filter spares the runs most lookups."""
        found = np.zeros(len(keys), dtype=bool)
        if not self.runs:
            return found
        maybe = np.flatnonzero(self.filter.may_contain(keys))
        for run in self.runs:
            if len(maybe):
                hits = run.contains(keys[maybe])
                found[maybe[hits]] = True
                maybe = maybe[~hits]
        return found

    def _new_path(self) -> Path:
        self.files_made += 1
        return self.folder / f"run-{self.files_made:06d}.keys"

    def spill(self) -> None:
        """recent -> a new run (merged with equal-sized ones), into the filter; recent starts empty."""
        if not self.recent:
            return
        keys = sorted_by_hi(as_keys(b"".join(self.recent)))
        writer = RunWriter(self._new_path())
        writer.write(keys)
        self.runs.append(writer.close())
        self.spilled += len(keys)
        self.recent.clear()
        self.generation += 1
        while len(self.runs) >= 2 and self.runs[-2].count <= self.runs[-1].count:
            newer, older = self.runs.pop(), self.runs.pop()
            self.runs.append(merge_runs(older, newer, self._new_path()))
            older.path.unlink()
            newer.path.unlink()
        if self.spilled > self.filter.capacity and self.filter.bits < self.max_filter_bits:
            self._grow_filter()
        else:
            self.filter.add(keys)

    def _grow_filter(self) -> None:
        """A filter big enough for the spilled keys (at most the cap), filled again from the runs."""
        bits = self.filter.bits
        while bits * 2 <= self.max_filter_bits and self.spilled > bits // BITS_PER_KEY:
            bits *= 2
        self.filter = BloomFilter(bits)
        for run in self.runs:
            for window in run.windows():
                self.filter.add(window)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "DigestSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def remove_stale_spills(folder: Path) -> None:
    """Spill folders of runs that were killed (their process is gone); a live run's folder stays."""
    for path in folder.glob(".dedup-*.tmp"):
        match = SPILL_FOLDER.fullmatch(path.name)
        if match and path.is_dir() and not pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


class ChunkLookup:
    """The digests of one chunk, asked about in order; the runs are searched for all of them at once."""

    def __init__(self, owner: DigestSet, digests: bytes):
        self.owner, self.digests = owner, digests
        self.generation: int | None = None
        self.found_in_runs: np.ndarray | None = None

    def digest(self, index: int) -> bytes:
        return self.digests[DIGEST_BYTES * index:DIGEST_BYTES * (index + 1)]

    def seen(self, index: int, digest: bytes | None = None) -> bool:
        """Whether document `index` of the chunk was added; `digest`, when given, is its digest (saves a slice)."""
        if (self.digest(index) if digest is None else digest) in self.owner.recent:
            return True
        if not self.owner.runs:
            return False
        if self.generation != self.owner.generation:   # first question, or a spill since the last answer
            found = np.zeros(len(self.digests) // DIGEST_BYTES, dtype=bool)
            found[index:] = self.owner.in_runs(as_keys(self.digests[DIGEST_BYTES * index:]))
            self.found_in_runs, self.generation = found, self.owner.generation
        return bool(self.found_in_runs[index])
