"""Pretraining data: memory-mapped token bins, checked, and sampled in seeded, rank-aware windows.

Token bins (the nanoGPT / lilLM recipe). `data/prepare_pretrain.py` (lillm/bins.py) tokenizes the
corpus once, offline, into flat files of token ids, `</s>` after each document (the format, its
meta.json and the checks that a bin fits a tokenizer are lillm/bin_format.py). The shards of a
split are one stream, their concatenation: a window may start in one shard and end in the next,
and every offset means the same token whether the split was written as one file or as shards.
Training never touches text again: `np.memmap` maps the files, the operating system pages in only the
windows we read, so a corpus of any size costs no RAM and a run starts instantly.

A training example is a window of seq_len + 1 consecutive tokens starting at a random offset:
x = window[:-1], y = window[1:] (each position predicts the next token). Windows cross document
boundaries, as in GPT-2 pretraining; `</s>` tells the model where a document ends.

The global batch, and why it makes DDP and resume exact. The obvious way to give each DDP rank
different data is a different seed per rank; then the data a run sees depends on how many
processes it had, so a 2-process run cannot be compared with a 1-process run, and resuming on a
different number of GPUs continues a different stream. Here every rank holds the same generator,
draws the offsets of the whole global batch (batch_size * world_size windows) at every step, and
keeps its own slice [rank * batch_size, (rank + 1) * batch_size). The windows of step t are a
function of (seed, t, global batch size) only; the world size decides just who computes which
window. DDP averages gradients over ranks, and the mean over ranks of per-rank means over equal
slices is the mean over the global batch: the same update as one process (up to float rounding).
The state to resume is the generator state and the step counter, both tiny and independent of
the world size.

References: Karpathy, nanoGPT (data/*/prepare.py, train.py get_batch); Radford et al. 2019
(GPT-2, documents joined with an end-of-text token); PyTorch DistributedDataParallel docs.

An SFT half (examples with loss masks) belongs below the pretraining half and shares nothing
with it but the imports.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .bin_format import META_NAME, load_meta, remake_hint, split_files
from .errors import BinFormatError, FlagError, InputFileError


# ---- sampling -----------------------------------------------------------------------------------
def _open_tokens(path: Path, dtype: np.dtype) -> np.memmap:
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise BinFormatError(f"{path} is {size} bytes, not a whole number of {dtype.name} tokens; "
                             f"{remake_hint(path.parent)}")
    if size == 0:
        raise BinFormatError(f"{path} is empty; {remake_hint(path.parent)}")
    return np.memmap(path, dtype=dtype, mode="r", shape=(size // dtype.itemsize,))


class TokenStream:
    """The token files of one split (one file, or its shards in order) read as one array.

    Files are memory-mapped anew at every read (a few microseconds each), as nanoGPT does: a
    long-lived map of a big bin keeps every page it ever touched in the process's resident memory,
    which looks like a leak to memory monitors and container limits.
    """

    def __init__(self, paths: list[Path], dtype: np.dtype):
        self.paths, self.dtype = paths, dtype
        sizes = []
        for path in paths:
            size = path.stat().st_size
            if size % dtype.itemsize:
                raise BinFormatError(f"{path} is {size} bytes, not a whole number of {dtype.name} tokens; "
                                     f"{remake_hint(path.parent)}")
            sizes.append(size // dtype.itemsize)
        self.ends = np.cumsum(sizes)                  # token offset where each file ends
        self.starts = self.ends - np.asarray(sizes)
        self.num_tokens = int(self.ends[-1]) if len(paths) else 0
        if self.num_tokens == 0:
            raise BinFormatError(f"{paths[0] if paths else 'the split'} is empty; {remake_hint(paths[0].parent)}")

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """tokens[start:start + length] of the concatenated files."""
        if len(self.paths) == 1:
            return _open_tokens(self.paths[0], self.dtype)[start:start + length]
        parts, end = [], min(start + length, self.num_tokens)
        shard = int(np.searchsorted(self.ends, start, side="right"))
        while start < end:
            stop = min(end, int(self.ends[shard]))
            tokens = _open_tokens(self.paths[shard], self.dtype)
            parts.append(tokens[start - int(self.starts[shard]):stop - int(self.starts[shard])])
            start, shard = stop, shard + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def open_stream(path, dtype=None) -> TokenStream:
    """The stream a bin path names: `dir/train.bin` is the train split, one file or its shards.

    meta.json decides: when it lists shards for the split (by file name or split name), those are
    read; a bin without meta.json is read alone with the dtype given.
    """
    path = Path(path)
    meta_path = path.parent / META_NAME
    if meta_path.is_file():
        meta = load_meta(path.parent)
        for split, info in meta["splits"].items():
            if info.get("file") == path.name or (path.stem == split and "shards" in info):
                names = [name for name, _ in split_files(info)]
                paths = [path.parent / name for name in names]
                for shard in paths:
                    if not shard.is_file():
                        raise InputFileError(f"token bin {shard} ({split} split in {meta_path}) not found; "
                                                f"{remake_hint(path.parent)}")
                return TokenStream(paths, np.dtype(dtype or meta["dtype"]).newbyteorder("<"))
    if not path.is_file():
        raise InputFileError(f"token bin {path} not found; {remake_hint(path.parent)}")
    if dtype is None:
        dtype = load_meta(path)["dtype"]
    return TokenStream([path], np.dtype(dtype).newbyteorder("<"))


def _windows_to_device(windows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, seq_len + 1) ids -> x, y int64 tensors; pinned + non-blocking copies on CUDA."""
    x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1], dtype=np.int64))
    y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:], dtype=np.int64))
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class BinLoader:
    """Random windows (x, y) from a token bin; seeded, resumable, identical for any world size.

    batch_size is per rank; the global batch is batch_size * world_size (see the module docstring).
    """

    def __init__(self, path, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device="cpu", dtype=None, sequential: bool = False):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.path = Path(path)
        self.stream = open_stream(self.path, dtype)
        self.dtype = self.stream.dtype
        self.num_tokens = self.stream.num_tokens
        if self.num_tokens < seq_len + 1:
            raise BinFormatError(f"{self.path} holds {self.num_tokens} tokens, fewer than seq_len + 1 = "
                             f"{seq_len + 1}; use a shorter seq_len or more data")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch_size = batch_size * world_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.sequential = sequential  # a curriculum: windows in file order (sources as prepared), not at random
        self.step = 0

    def next_offsets(self) -> np.ndarray:
        """Start offsets of this rank's windows for the next step (advances the stream)."""
        # Largest start is num_tokens - seq_len - 1: its window of seq_len + 1 ends at the last token.
        if self.sequential:
            # Consecutive windows from the start of the file, wrapping after a full pass: the bin's
            # document order (the order the sources were listed in prepare_pretrain) is the curriculum.
            first = self.step * self.global_batch_size
            windows = (self.num_tokens - 1) // self.seq_len
            offsets = ((first + torch.arange(self.global_batch_size)) % windows) * self.seq_len
        else:
            offsets = torch.randint(0, self.num_tokens - self.seq_len, (self.global_batch_size,),
                                    generator=self.generator)
        self.step += 1
        return offsets[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].numpy()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.seq_len + 1
        windows = np.stack([self.stream.read(int(start), span) for start in self.next_offsets()])
        return _windows_to_device(windows, self.device)

    def state_dict(self) -> dict:
        """Enough to continue the same stream, on any world size with the same global batch."""
        return {"step": self.step, "generator_state": self.generator.get_state(), "seed": self.seed,
                "global_batch_size": self.global_batch_size, "seq_len": self.seq_len,
                "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore a stream; strict refuses a different global batch, seq_len or bin."""
        if strict:
            for key in ("global_batch_size", "seq_len", "num_tokens"):
                if state[key] != getattr(self, key):
                    raise FlagError(
                        f"--resume: the run's loader state has {key}={state[key]} but this loader has "
                        f"{getattr(self, key)} ({self.path}): the stream would not continue; "
                        f"keep the run's batch size, processes and --seq-len when resuming (or start a new run)")
        self.generator.set_state(state["generator_state"].to(torch.uint8).cpu())
        self.step = int(state["step"])


class StepBatches:
    """One optimizer step = one draw of the global batch, cut into `accum` micro batches.

    The loader draws (micro * accum) windows for this rank out of a global draw of
    (micro * accum * world), so the windows of a step do not depend on how they are split.
    """

    def __init__(self, loader: BinLoader, accum: int):
        self.loader, self.accum = loader, accum

    def next_step(self) -> list[dict]:
        x, y = self.loader.next_batch()
        return [{"input_ids": xs, "labels": ys} for xs, ys in zip(x.chunk(self.accum), y.chunk(self.accum))]

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def iter_eval_batches(path, seq_len: int, batch_size: int, max_batches: int | None = None,
                      device="cpu", rank: int = 0, world_size: int = 1,
                      dtype=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential, non-overlapping windows from the start of a bin, for evaluation.

    Window i covers x = tokens[i * seq_len:(i + 1) * seq_len] (y one further), so every token is
    predicted at most once; the same bin always gives the same batches. The last batch may be
    smaller. With world_size > 1, rank r takes batches r, r + world_size, ...; ranks may then get
    one batch fewer than others, so sum losses and token counts per rank and reduce them once at
    the end (a collective call per batch would hang the rank that has none left).
    """
    path = Path(path)
    tokens = open_stream(path, dtype)
    num_windows = (len(tokens) - 1) // seq_len
    if num_windows == 0:
        raise BinFormatError(f"{path} holds {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                             "use a shorter seq_len or more data")
    num_batches = -(-num_windows // batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    device = torch.device(device)
    for batch in range(rank, num_batches, world_size):
        starts = range(batch * batch_size, min((batch + 1) * batch_size, num_windows))
        windows = np.stack([tokens.read(i * seq_len, seq_len + 1) for i in starts])
        yield _windows_to_device(windows, device)
