"""Expand a checkpoint's vocabulary with tokens learned on a new language (lillm.vocab_expand).

    python scripts/expand_vocab.py --base out/pretrain --langs zul --new-tokens 2000 --out out/expanded
    python pretrain.py --data out/zul_data --init-from out/expanded --lr 1e-4   # then continue pretraining

Every old id keeps its string and its embedding; the new rows start as the mean of the base
pieces they replace; the vocabulary is padded to a multiple of --pad-multiple. Every
--holdout-every-th document of the new language is held out from learning the tokens and
used to report tokens per word before and after. The report is printed and stored in the
output folder's lillm.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from lillm import checkpoint as ckpt
from lillm.cli import ArgumentParser, number, run_main
from lillm.corpora import documents_for
from lillm.folders import check_output
from lillm.tokenizer import Tokenizer
from lillm.vocab_expand import expand_vocabulary, fertility_change


def split_documents(langs: list[str], kinds: list[str], data_dir, holdout_every: int) -> tuple[list[str], list[str]]:
    learn, held_out = [], []
    for index, (_, text) in enumerate(documents_for(langs, kinds=kinds, data_dir=data_dir)):
        (held_out if index % holdout_every == 0 else learn).append(text)
    return learn, held_out


def main(argv=None) -> dict:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="out/pretrain", help="checkpoint folder, or a run folder (latest step)")
    parser.add_argument("--tokenizer", default=None, help="the base tokenizer.json (default: the one in --base)")
    parser.add_argument("--langs", default="zul", help="comma-separated languages to learn tokens from")
    parser.add_argument("--kinds", default="mono,news,mt", help="corpus kinds to read (lillm.corpora)")
    parser.add_argument("--data-dir", default=None, help="data directory (default: $LILLM_DATA_DIR or ../shared/data)")
    parser.add_argument("--new-tokens", type=number(1), default=2000)
    parser.add_argument("--pad-multiple", type=number(1), default=64, help="pad the vocabulary to a multiple of this")
    parser.add_argument("--init", choices=["pieces", "mean"], default="pieces",
                        help="new rows: mean of the base pieces' rows, or of all rows")
    parser.add_argument("--min-frequency", type=number(1), default=2)
    parser.add_argument("--holdout-every", type=number(2, fix="every n-th document is held out, so 1 would hold out all of them"), default=50, help="hold out every n-th document for the report")
    parser.add_argument("--out", default="out/expanded")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier expansion in --out (only a lillm checkpoint holding only its files)")
    args = parser.parse_args(argv)
    base_folder = ckpt.resolve_checkpoint(args.base)
    check_output(args.out, "checkpoint", overwrite=args.overwrite,
                 reads={"--base": base_folder, "--base (run folder)": args.base, "--tokenizer": args.tokenizer})
    tokenizer_path = Path(args.tokenizer) if args.tokenizer else base_folder / "tokenizer.json"
    base_tokenizer = Tokenizer.from_file(tokenizer_path)
    model = ckpt.load_model(base_folder)
    langs = [lang.strip() for lang in args.langs.split(",") if lang.strip()]
    learn, held_out = split_documents(langs, args.kinds.split(","), args.data_dir, args.holdout_every)
    print(f"learning up to {args.new_tokens} tokens from {len(learn):,} {'+'.join(langs)} documents "
          f"({len(held_out):,} held out)")
    model, expansion = expand_vocabulary(model, base_tokenizer, learn, args.new_tokens, args.pad_multiple,
                                         args.init, args.min_frequency)
    report = {"base": str(base_folder), "base_tokenizer": str(tokenizer_path), "langs": langs,
              **expansion.summary(), "init": args.init,
              "held_out_fertility": fertility_change(base_tokenizer, expansion.tokenizer, held_out)}
    with tempfile.TemporaryDirectory() as tmp:
        expanded_path = Path(tmp) / "tokenizer.json"
        expansion.tokenizer.save(expanded_path)
        ckpt.save_checkpoint(args.out, model, expanded_path, info={"stage": "expand_vocab", "expansion": report},
                             overwrite=args.overwrite)
    before, after = report["held_out_fertility"]["before"], report["held_out_fertility"]["after"]
    print(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"{len(expansion.new_tokens)} new tokens, vocabulary {expansion.base_vocab_size} -> {expansion.vocab_size}; "
          f"held-out tokens per word {before['tokens_per_word']:.3f} -> {after['tokens_per_word']:.3f}; "
          f"wrote {args.out}")
    return report


if __name__ == "__main__":
    run_main(main)
