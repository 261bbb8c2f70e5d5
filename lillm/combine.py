"""Token bins prepared apart, combined into one folder the loader reads as one stream.

Beyond one machine, a corpus is prepared in parts: each machine runs data/prepare_pretrain.py
on its slice of the sources (some files, some hub configs), with the same tokenizer, seed and
--val-fraction, into its own folder. `combine_bins` then makes one bin folder whose train split
is the parts' train splits one after the other (and the same for val): shards `train-00000.bin`,
`train-00001.bin`, ... numbered across the parts in the order given, listed in one meta.json
whose counts are the parts' sums. lillm/data.py reads a split's shards as their concatenation,
so training sees one stream, window for window the one a single machine would have written
(tests/test_bins_sources.py checks it).

The shards are hard links to the parts' files when they share a filesystem (no copy, no extra
disk; the part folders stay complete), copies otherwise. Each part keeps its own de-duplication:
a document in two slices survives twice (the hash split still sends both copies to the same
split, as it depends on the text alone). Mixture weights are not combined: mix within each part,
or give each machine a slice of every source.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from .bin_format import META_NAME
from .bins import PendingShards, publish_bins
from .errors import BinFormatError, SourceError, read_json_file

MUST_AGREE = ("tokenizer_sha256", "vocab_size", "dtype", "eos_id")
SETTINGS_MUST_AGREE = ("seed", "val_fraction")


def read_part(folder: Path) -> dict:
    path = folder / META_NAME
    if not path.is_file():
        raise BinFormatError(f"{path} not found: {folder} is not a folder of token bins written by "
                             f"data/prepare_pretrain.py (or its run did not finish)")
    return read_json_file(path, BinFormatError, "prepare that part again")


def split_files(meta: dict, split: str) -> list[dict]:
    info = meta["splits"][split]
    return info["shards"] if "shards" in info else [{"file": info["file"], "tokens": info["tokens"]}]


def check_parts(parts: list[Path], metas: list[dict]) -> None:
    first, where = metas[0], parts[0]
    for part, meta in zip(parts[1:], metas[1:]):
        for key in MUST_AGREE:
            if meta.get(key) != first.get(key):
                raise SourceError(f"{part} has {key} {meta.get(key)!r} but {where} has {first.get(key)!r}: the parts "
                                  f"must be prepared with the same tokenizer")
        for key in SETTINGS_MUST_AGREE:
            if meta["settings"].get(key) != first["settings"].get(key):
                raise SourceError(f"{part} was prepared with --{key.replace('_', '-')} {meta['settings'].get(key)} but "
                                  f"{where} with {first['settings'].get(key)}: prepare every part with the same one, "
                                  f"or the train/val split differs between parts")
        if list(meta["splits"]) != list(first["splits"]):
            raise SourceError(f"{part} has the splits {list(meta['splits'])} but {where} has {list(first['splits'])}")
    names = [name for meta in metas for name in meta["sources"]]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SourceError(f"source(s) {repeated} appear in more than one part: give each machine its own slice of "
                          f"the sources (different files), or the same text is counted twice")


class LinkedSplit(PendingShards):
    """One split of the combined folder: the parts' files linked (or copied) under temporary names."""

    def add(self, source: Path, tokens: int, itemsize: int) -> None:
        if not source.is_file():
            raise BinFormatError(f"{source} (listed in {source.parent / META_NAME}) not found; prepare that part "
                                 f"again")
        if source.stat().st_size != tokens * itemsize:
            raise BinFormatError(f"{source} holds {source.stat().st_size} bytes but its meta.json says {tokens} "
                                 f"tokens of {itemsize} bytes; prepare that part again")
        name = f"{self.split}-{len(self.shards):05d}.bin"
        temporary = self.out_dir / f".{name}.tmp"
        temporary.unlink(missing_ok=True)
        try:
            os.link(source, temporary)
        except OSError:   # another filesystem (or no hard links): a copy
            shutil.copyfile(source, temporary)
        self.shards.append({"file": name, "tokens": tokens, "temporary": temporary})


def all_sources(per_part: list[dict]) -> dict:
    return {name: counts for sources in per_part for name, counts in sources.items()}   # names differ (checked)


def combined_meta(parts: list[Path], metas: list[dict], shards: dict) -> dict:
    first = metas[0]
    splits = {}
    for split, files in shards.items():
        infos = [meta["splits"][split] for meta in metas]
        total = {key: sum(info[key] for info in infos) for key in ("documents", "tokens", "bytes")}
        splits[split] = {"shards": files, **total, "bytes_per_token": total["bytes"] / max(total["tokens"], 1),
                         "sources": all_sources([info["sources"] for info in infos])}
    settings = {key: first["settings"].get(key) for key in SETTINGS_MUST_AGREE}
    return {**{key: first[key] for key in ("format", "tokenizer_path", *MUST_AGREE)},
            "splits": splits, "sources": all_sources([meta["sources"] for meta in metas]),
            "notes": first["notes"] + "; combined from parts prepared apart: each part was de-duplicated on its own",
            "settings": {**settings, "combined_from": [str(part.resolve()) for part in parts],
                         "parts": [meta["settings"] for meta in metas]}}


def combine_bins(parts, out_dir) -> dict:
    """Write out_dir's shards (links to the parts' bins, in order) and meta.json; return the meta."""
    parts, out_dir = [Path(part) for part in parts], Path(out_dir)
    if not parts:
        raise SourceError("nothing to combine: give the folders of the parts")
    if out_dir.resolve() in [part.resolve() for part in parts]:
        raise SourceError(f"--out {out_dir} is one of the parts: combine into a new folder")
    metas = [read_part(part) for part in parts]
    check_parts(parts, metas)
    out_dir.mkdir(parents=True, exist_ok=True)
    itemsize = np.dtype(metas[0]["dtype"]).itemsize
    splits = {split: LinkedSplit(out_dir, split) for split in metas[0]["splits"]}
    try:
        for split, linked in splits.items():
            for part, meta in zip(parts, metas):
                for shard in split_files(meta, split):
                    linked.add(part / shard["file"], shard["tokens"], itemsize)
        return publish_bins(out_dir, splits, lambda shards: combined_meta(parts, metas, shards))
    finally:
        for linked in splits.values():
            linked.discard()
