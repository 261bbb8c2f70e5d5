"""Train lillm's byte-level BPE tokenizer and report its fertility against other tokenizers.

    python train_tokenizer.py --langs swa hau --vocab-size 8192 --out out/tokenizer/tokenizer.json \\
        --compare /path/to/other/tokenizer.json
    python train_tokenizer.py --langs swa hau --hf lelapa/Inkuba-Mono:swa lelapa/Inkuba-Mono:hau --max-bytes 200000000

Besides the registered corpora (--langs, --corpora) it reads the sources of data/prepare_pretrain.py
(lillm.sources): --files of any supported kind (.txt .tsv .csv .conll, and through `datasets` .jsonl
.json .parquet .arrow, save_to_disk folders, hf:// patterns) and --hf datasets, streamed, each cut
to --max-bytes / --max-docs: those are never held in memory, only their held-out documents are.

Every document of the chosen training corpora is read; every ``--holdout-every``-th one
(per language) is held out from training and used for the report: tokens per whitespace
word (fertility) and UTF-8 bytes per token, per language, for the new tokenizer and each
``--compare`` tokenizer. The report is printed and written as JSON beside the tokenizer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections import defaultdict
from pathlib import Path

from lillm.folders import check_output_file, write_text_atomic
from lillm.corpora import CORPORA, FORMATS, HUB_CORPORA, LANGS, data_dir, documents_for, read_documents
from lillm.cli import ArgumentParser, number, run_main
from lillm.errors import InputFileError
from lillm.sources import DEFAULT_KINDS, TEXT_FORMATS, budgeted, file_source, hub_source, registered_source
from lillm.tokenizer import Tokenizer, fertility_report, load_lenient, train_bpe



def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--langs", nargs="+", default=None, choices=LANGS,
                   help="languages to train on (default: swa hau, unless only --hf / hub corpora / data files are given)")
    p.add_argument("--vocab-size", type=number(300, fix="a byte-level BPE needs 256 byte tokens and the special tokens before any merge"), default=8192, help="total ids, special tokens included")
    p.add_argument("--min-frequency", type=number(1), default=2, help="a pair must occur this often to be merged")
    p.add_argument("--out", default="out/tokenizer/tokenizer.json", help="where to write tokenizer.json")
    p.add_argument("--data-dir", default=None, help="data directory (default: $LILLM_DATA_DIR or ../shared/data)")
    p.add_argument("--corpora", nargs="+", default=None, metavar="NAME",
                   help=f"exact corpus names instead of all train corpora of --langs; known: {', '.join(CORPORA)}")
    p.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS),
                   help="corpus kinds used when --corpora is not given (ner is left out: copies of lacuna sentences)")
    p.add_argument("--files", nargs="+", default=[], metavar="PATH", help="extra text files to train on")
    p.add_argument("--file-format", default="txt", choices=FORMATS, help="format of --files")
    p.add_argument("--text-column", default=None, help="text column of --files in csv/tsv format")
    p.add_argument("--compare", nargs="+", default=[], metavar="TOKENIZER_JSON", help="tokenizers to compare with")
    p.add_argument("--max-docs", type=number(0, rule="must be 0 (all) or more"), default=0, help="at most this many documents per language (0 = all)")
    p.add_argument("--holdout-every", type=number(2, fix="every Nth document is held out, so 1 would leave nothing to train on"), default=50, help="hold out every Nth document of each language")
    p.add_argument("--hf", nargs="+", default=[], metavar="NAME[:CONFIG]", help="Hugging Face datasets, streamed")
    p.add_argument("--hf-split", default="train", help="split of the --hf datasets")
    p.add_argument("--max-bytes", type=number(0, above=True), default=None,
                   help="streamed sources (--hf, hub corpora, data files): at most this many UTF-8 bytes each")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = p.parse_args(argv)
    streams_only = (args.hf or args.corpora or args.files) and not args.langs
    if args.langs is None:
        args.langs = [] if streams_only else ["swa", "hau"]
    return args


def collect_documents(args: argparse.Namespace) -> dict[str, list[str]]:
    """Documents grouped by language (extra --files under 'files'), in a fixed order."""
    by_lang: dict[str, list[str]] = defaultdict(list)
    names = [name for name in args.corpora if name in CORPORA] if args.corpora else None
    if names or (not args.corpora and args.langs):
        for name, doc in documents_for(args.langs, ("train",), names=names, data_dir=args.data_dir, kinds=args.kinds):
            by_lang[CORPORA[name].lang].append(doc)
    for path in args.files:
        if Path(path).suffix.lower() in TEXT_FORMATS or Path(path).suffix == "":
            by_lang["files"].extend(read_documents(path, args.file_format, args.text_column))
    return dict(by_lang)


def streamed_sources(args: argparse.Namespace) -> list:
    """Sources read as a stream under a budget: hub corpora, --hf datasets, data files (parquet, jsonl, ...)."""
    chosen = [registered_source(name, None) for name in (args.corpora or []) if name in HUB_CORPORA]
    chosen += [file_source(path, args.text_column) for path in args.files
               if not (Path(path).suffix.lower() in TEXT_FORMATS or Path(path).suffix == "")]
    chosen += [hub_source(spec, args.hf_split, args.text_column) for spec in args.hf]
    return chosen


def stream_with_holdout(sources, args, held_out: dict[str, list[str]], counts: dict[str, list[int]]):
    """Every document of the streamed sources (within budget) but each holdout_every-th, which is kept aside."""
    for source in sources:
        held, count = held_out.setdefault(source.name, []), counts.setdefault(source.name, [0, 0])
        for index, doc in enumerate(budgeted(source.documents(), args.max_docs or None, args.max_bytes)):
            if index % args.holdout_every == args.holdout_every - 1:
                held.append(doc)
                continue
            count[0] += 1
            count[1] += len(doc.encode("utf-8"))
            yield doc


def spread_sample(docs: list[str], limit: int) -> list[str]:
    """Every k-th document so that at most ``limit`` remain, drawn from all corpora alike."""
    if limit <= 0 or len(docs) <= limit:
        return docs
    return docs[:: math.ceil(len(docs) / limit)]


def split_holdout(docs: list[str], every: int) -> tuple[list[str], list[str]]:
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    held_out = [d for i, d in enumerate(docs) if i % every == every - 1]
    return train, held_out


def load_comparisons(paths: list[str]) -> tuple[dict[str, Tokenizer], dict[str, str]]:
    loaded, notes = {}, {}
    for path in paths:
        try:
            loaded[path], notes[path] = load_lenient(path)
        except (OSError, ValueError) as error:
            notes[path] = f"NOT LOADED: {error}"
        print(f"compare {path}: {notes[path]}")
    return loaded, notes


def print_table(lang: str, rows: dict[str, dict], vocab: dict[str, int]) -> None:
    first = next(iter(rows.values()))
    print(f"\n[{lang}] held out: {first['documents']:,} documents, {first['words']:,} words, {first['bytes']:,} bytes")
    width = max(len(name) for name in rows)
    print(f"  {'tokenizer':<{width}} {'vocab':>7} {'tokens/word':>12} {'bytes/token':>12}")
    for name, r in rows.items():
        print(f"  {name:<{width}} {vocab[name]:>7,} {r['tokens_per_word']:>12.3f} {r['bytes_per_token']:>12.3f}")


def check_args(args: argparse.Namespace) -> None:
    """Numbers, input files and the output path, checked before any text is read."""
    for path in map(Path, args.files):
        if str(path).startswith("hf:/"):
            continue   # a remote file pattern, streamed
        if path.is_dir() and not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
            raise InputFileError(f"--files {path} is a folder, not a text file or a save_to_disk folder; "
                                 f"list the files in it instead")
        if not path.exists():
            raise InputFileError(f"--files {path} does not exist; check the path")
    out, reads = Path(args.out), {"--files": args.files, "--compare": args.compare}
    check_output_file(out, "tokenizer", overwrite=args.overwrite, reads=reads, fix="tokenizer.json")
    check_output_file(report_path(out), "tokenizer-report", overwrite=args.overwrite, flag="--out's report",
                      reads=reads)


def report_path(out: Path) -> Path:
    return out.with_name(out.stem + ".report.json")


def main(argv=None) -> None:
    args = parse_args(argv)
    check_args(args)
    started = time.time()
    streamed = streamed_sources(args)
    local = bool(args.langs or any(name in CORPORA for name in args.corpora or []) or
                 any(Path(f).suffix.lower() in TEXT_FORMATS for f in args.files))
    root = data_dir(args.data_dir) if local else None
    by_lang = {lang: spread_sample(docs, args.max_docs) for lang, docs in collect_documents(args).items()} \
        if local else {}
    train, held_out = {}, {}
    for lang, docs in by_lang.items():
        train[lang], held_out[lang] = split_holdout(docs, args.holdout_every)
        n_bytes = sum(len(d.encode("utf-8")) for d in train[lang])
        print(f"{lang}: {len(train[lang]):,} training documents ({n_bytes / 1e6:.1f} MB), "
              f"{len(held_out[lang]):,} held out")

    streamed_held: dict[str, list[str]] = {}
    streamed_counts: dict[str, list[int]] = {}
    documents = itertools.chain((d for docs in train.values() for d in docs),
                                stream_with_holdout(streamed, args, streamed_held, streamed_counts))
    tokenizer = train_bpe(documents, args.vocab_size, args.min_frequency)
    for name, (count, n_bytes) in streamed_counts.items():
        print(f"{name}: {count:,} training documents ({n_bytes / 1e6:.1f} MB, streamed), "
              f"{len(streamed_held[name]):,} held out")
    held_out.update(streamed_held)
    out = Path(args.out)
    tokenizer.save(out)
    print(f"saved {out} ({tokenizer.vocab_size:,} ids, sha256 {tokenizer.sha256[:16]}...) "
          f"in {time.time() - started:.1f}s")

    others, notes = load_comparisons(args.compare)
    candidates = {f"new: {out}": tokenizer, **others}
    vocab = {name: t.vocab_size for name, t in candidates.items()}
    report = {"data_dir": str(root) if root else None, "hf": args.hf, "max_bytes": args.max_bytes, "corpora": args.corpora, "kinds": args.kinds, "langs": args.langs,
              "vocab_size": tokenizer.vocab_size, "sha256": tokenizer.sha256, "holdout_every": args.holdout_every,
              "compare_notes": notes, "languages": {}}
    for lang, docs in held_out.items():
        rows = {name: fertility_report(t, docs) for name, t in candidates.items()}
        print_table(lang, rows, vocab)
        report["languages"][lang] = rows
    write_text_atomic(report_path(out), json.dumps(report, indent=2, ensure_ascii=False))
    print(f"\nreport written to {report_path(out)}; total time {time.time() - started:.1f}s")


if __name__ == "__main__":
    run_main(main)
