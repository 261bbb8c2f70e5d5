"""The token-bin format: what lillm/bins.py writes, lillm/data.py reads, and the checks between them.

Token bins (the nanoGPT / lilLM recipe): every document's token ids back to back, with the
end-of-text id `</s>` after each document, in flat files of little-endian uint16 (uint32 when the
vocabulary has more than 65,536 ids). A split is one file, `train.bin` / `val.bin`, or shards
`train-00000.bin`, `train-00001.bin`, ... that are read as one stream, their concatenation.
`meta.json`, written last, says which: per split its file or shards with their token counts, and
the tokenizer's hash, the vocabulary size, the dtype and `</s>`'s id, so a bin is never read with
the wrong tokenizer. This module is that contract and nothing else: the writer (lillm/bins.py,
with the whole ingestion stack) and the loader (lillm/data.py) both stand on it, and neither on
the other. It imports no torch, so preparing data starts fast.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import BinFormatError, InputFileError, MissingMetaError, read_json_file

META_NAME = "meta.json"
UINT16_VOCAB_LIMIT = 1 << 16      # uint16 holds ids 0..65535
MAX_ID_CHUNK = 1 << 24            # tokens per slice when scanning a bin for its largest id


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest little-endian unsigned dtype that holds every id below vocab_size."""
    if vocab_size <= UINT16_VOCAB_LIMIT:
        return np.dtype("<u2")
    return np.dtype("<u4")


def bin_name(split: str, shard: int | None = None) -> str:
    """A split's file: `train.bin`, or its shard `train-00000.bin`."""
    return f"{split}.bin" if shard is None else f"{split}-{shard:05d}.bin"


def bin_folder(bin_dir_or_file) -> Path:
    path = Path(bin_dir_or_file)
    return path.parent if path.suffix == ".bin" or path.is_file() else path


def remake_hint(directory: Path, tokenizer_path=None) -> str:
    tokenizer_arg = tokenizer_path or "<the tokenizer.json you train with>"
    return f"re-run `python data/prepare_pretrain.py --tokenizer {tokenizer_arg} --out {directory}`"


def load_meta(bin_dir) -> dict:
    """meta.json of a bin folder (or of the folder holding a .bin file), with its keys checked."""
    directory = bin_folder(bin_dir)
    meta_path = directory / META_NAME
    if not meta_path.is_file():
        raise MissingMetaError(
            f"{meta_path} not found: the token bins in {directory} have no meta.json, so their "
            f"tokenizer, dtype and sizes are unknown; {remake_hint(directory)}")
    meta = read_json_file(meta_path, BinFormatError, remake_hint(directory))
    for key in ("tokenizer_sha256", "vocab_size", "dtype", "eos_id", "splits"):
        if key not in meta:
            raise BinFormatError(f"{meta_path} has no key {key!r}; {remake_hint(directory)}")
    return meta


def split_files(info: dict) -> list[tuple[str, int]]:
    """(file name, tokens) of a split in meta.json: its shards, or its one file."""
    if "shards" in info:
        return [(shard["file"], shard["tokens"]) for shard in info["shards"]]
    return [(info["file"], info["tokens"])]


def max_token_id(path, dtype) -> int:
    """Largest id in a bin (-1 when empty), scanned in slices so memory stays flat."""
    dtype = np.dtype(dtype)
    count = Path(path).stat().st_size // dtype.itemsize
    if count == 0:
        return -1
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(count,))
    return max(int(tokens[start:start + MAX_ID_CHUNK].max()) for start in range(0, count, MAX_ID_CHUNK))


def check_bins(bin_dir, tokenizer=None, vocab_size: int | None = None) -> dict:
    """Refuse bins that the given tokenizer/model cannot train on; return their meta.

    Checks, for every split listed in meta.json: the tokenizer hash (when a tokenizer is given),
    the dtype against the vocabulary size, the file size against the token count, and the
    largest id against the vocabulary (vocab_size, else the tokenizer's, else meta's).
    """
    directory = bin_folder(bin_dir)
    meta = load_meta(directory)
    tokenizer_path = getattr(tokenizer, "source", "<memory>")
    tokenizer_path = meta.get("tokenizer_path") if tokenizer_path.startswith("<") else tokenizer_path
    redo = remake_hint(directory, tokenizer_path)
    if tokenizer is not None and tokenizer.sha256 != meta["tokenizer_sha256"]:
        raise BinFormatError(
            f"{directory / META_NAME}: the bins were made with tokenizer sha256 "
            f"{meta['tokenizer_sha256'][:16]}... ({meta.get('tokenizer_path', '?')}), but the "
            f"tokenizer given has sha256 {tokenizer.sha256[:16]}...; {redo}")
    limit = vocab_size or (tokenizer.vocab_size if tokenizer is not None else meta["vocab_size"])
    dtype = token_dtype(meta["vocab_size"])
    if meta["dtype"] != dtype.name:
        raise BinFormatError(
            f"{directory / META_NAME}: dtype {meta['dtype']!r} does not match vocab_size "
            f"{meta['vocab_size']} (expected {dtype.name!r}); {redo}")
    for split, info in meta["splits"].items():
        shards = split_files(info)
        if sum(tokens for _, tokens in shards) != info["tokens"]:
            raise BinFormatError(f"{directory / META_NAME}: the {split} shards hold "
                                 f"{sum(tokens for _, tokens in shards)} tokens but the split says {info['tokens']}; {redo}")
        for name, tokens in shards:
            path = directory / name
            if not path.is_file():
                raise InputFileError(f"{path} ({split} split listed in meta.json) not found; {redo}")
            size, expected = path.stat().st_size, tokens * dtype.itemsize
            if size != expected:
                raise BinFormatError(
                    f"{path} holds {size} bytes but meta.json says {tokens} tokens of "
                    f"{dtype.name} = {expected} bytes: truncated, or from another run; {redo}")
            largest = max_token_id(path, dtype)
            if largest >= limit:
                raise BinFormatError(
                    f"{path} holds token id {largest} but the vocabulary has only {limit} ids "
                    f"(0..{limit - 1}): the bins were made with another tokenizer; {redo}")
    return meta
