"""Tokenize text corpora into pretraining token bins: train.bin, val.bin (or shards) and meta.json.

    python data/prepare_pretrain.py --tokenizer out/tokenizer/tokenizer.json --langs swa hau --out out/data
    python data/prepare_pretrain.py --tokenizer out/tokenizer/tokenizer.json --out out/data-inkuba \\
        --hf lelapa/Inkuba-Mono:swa lelapa/Inkuba-Mono:hau --mix lelapa/Inkuba-Mono:swa=0.7 \\
        lelapa/Inkuba-Mono:hau=0.3 --max-tokens 500000000 --shard-tokens 250000000
    python data/prepare_pretrain.py --combine out/part-0 out/part-1 --out out/data   # parts prepared apart

Sources: registered corpora (--langs, or --corpora by short name, e.g. lacuna-swa or the hub's
inkuba-mono-swa), local files (--files: .txt .tsv .csv .conll; .jsonl .json .parquet .arrow read a
batch at a time by lillm/datafiles.py; save_to_disk folders and hf:// file patterns through
`datasets`), and hub datasets (--hf NAME[:CONFIG]), streamed. The pipeline (NFC, de-duplication, hash split, ordered parallel tokenization, mixtures,
budgets, shards, atomic output) is lillm/bins.py, with de-duplication in bounded memory in
lillm/dedup.py; the sources are lillm/sources.py; the loader that reads the bins is lillm/data.py.
--combine joins folders prepared apart (one machine per slice of the sources) into one stream
(lillm/combine.py).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from lillm.bin_format import META_NAME
from lillm.bins import prepare, summary
from lillm.cli import ArgumentParser, number, run_main
from lillm.combine import combine_bins
from lillm.folders import SHARD, claimed_output, discard
from lillm.sources import DEFAULT_KINDS, resolve_sources

__all__ = ["prepare", "resolve_sources", "main"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default="out/tokenizer/tokenizer.json", help="tokenizer.json to encode with")
    parser.add_argument("--langs", nargs="+", default=None,
                        help="read every train-split corpus of these languages in the data dir (default: swa hau "
                             "when no other source is given)")
    parser.add_argument("--out", default="out/data", help="folder for the bins and meta.json")
    parser.add_argument("--corpora", nargs="+", help="registered corpus names (lillm.corpora: CORPORA, HUB_CORPORA)")
    parser.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS),
                        help="corpus kinds read with --langs (ner is left out: copies of lacuna sentences)")
    parser.add_argument("--files", nargs="+", help="files: .txt (a document per line), .tsv/.csv (with "
                                                   "--text-column), .conll, .jsonl/.json/.parquet/.arrow, "
                                                   "save_to_disk folders, hf://datasets/... patterns")
    parser.add_argument("--text-column", help="column holding the text (tables, data files, --hf; default 'text' "
                                              "for data files and --hf)")
    parser.add_argument("--hf", nargs="+", metavar="NAME[:CONFIG]", help="Hugging Face datasets, streamed")
    parser.add_argument("--hf-split", default="train", help="split of the --hf datasets")
    parser.add_argument("--max-docs", nargs="+", metavar="[NAME=]N", help="at most N documents per source")
    parser.add_argument("--max-tokens", nargs="+", metavar="[NAME=]N", help="at most N tokens per source")
    parser.add_argument("--mix", nargs="+", metavar="NAME=WEIGHT",
                        help="interleave the sources by train tokens in these proportions (ends when one runs out)")
    parser.add_argument("--shard-tokens", type=number(0, rule="must be 0 (one file per split) or more"), default=0,
                        help="cut each split into files of this many tokens (train-00000.bin, ...); 0 = one file")
    parser.add_argument("--data-dir", help="data directory (default: $LILLM_DATA_DIR, else ../shared/data)")
    parser.add_argument("--val-fraction", type=number(0, 1, float, below=True), default=0.005, help="share of documents held out")
    parser.add_argument("--workers", type=number(1), default=os.cpu_count() or 1, help="tokenizing processes")
    parser.add_argument("--seed", type=number(0), default=0, help="seed of the train/val split")
    parser.add_argument("--combine", nargs="+", metavar="DIR",
                        help="instead of tokenizing: join these bin folders, prepared apart with the same tokenizer, "
                             "seed and --val-fraction, into --out as one stream (hard links to their shards)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an existing token-bin folder (replaces only its bins and meta.json)")
    args = parser.parse_args(argv)
    if args.combine and (args.langs or args.corpora or args.files or args.hf):
        parser.error("--combine joins folders already prepared: give it no sources (--langs, --corpora, --files, --hf)")
    if not (args.langs or args.corpora or args.files or args.hf or args.combine):
        args.langs = ["swa", "hau"]
    return args


def discard_stale_bins(out: Path, meta: dict) -> None:
    """An earlier run's bins that meta.json no longer lists (a val.bin, single files or shards) go."""
    listed = {info["file"] for info in meta["splits"].values() if "file" in info}
    listed |= {shard["file"] for info in meta["splits"].values() for shard in info.get("shards", [])}
    for path in out.iterdir():
        if (path.name in ("train.bin", "val.bin") or SHARD.fullmatch(path.name)) and path.name not in listed:
            discard(path)


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    # a folder of other files is refused by name; a refused input leaves no marked folder behind
    with claimed_output(args.out, "bins", overwrite=args.overwrite,
                        reads={"--tokenizer": args.tokenizer, "--files": args.files, "--combine": args.combine}):
        if args.combine:
            meta = combine_bins(args.combine, args.out)
        else:
            meta = prepare(args.tokenizer, args.out, args.langs, args.corpora, args.files, args.text_column,
                           args.data_dir, args.val_fraction, args.workers, args.seed, kinds=args.kinds, hf=args.hf,
                           hf_split=args.hf_split, max_docs=args.max_docs, max_tokens=args.max_tokens, mix=args.mix,
                           shard_tokens=args.shard_tokens)
    print(summary(meta, time.perf_counter() - start))
    discard_stale_bins(Path(args.out), meta)
    print(f"wrote the bins listed in {Path(args.out) / META_NAME}")


if __name__ == "__main__":
    run_main(main)
