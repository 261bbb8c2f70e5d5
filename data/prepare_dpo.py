"""Build preference pairs (JSON lines of prompt messages, chosen, rejected) for dpo_train.py.

    python data/prepare_dpo.py --sft-data out/sft --model out/sft_all --out out/dpo
    python data/prepare_dpo.py --sft-data out/sft --out out/dpo --tasks sentiment nli      # no model needed
    python data/prepare_dpo.py --files my_pairs.jsonl hf_pairs.parquet --dev-files my_dev.jsonl --out out/dpo

From the challenge data, through the conversations of data/prepare_sft.py (their train split gives
our train pairs, their dev split our held-out pairs):
- classification (sentiment, nli, news): the gold label against a wrong label, one per row drawn by
  a seeded hash (--negatives all: every wrong label);
- translation: the reference against the --model's own sampled translation (the lowest sentence
  chrF of --samples samples), kept when it differs from the reference.
User files: .jsonl or .csv rows {"prompt" or "messages", "chosen", "rejected"}, or .parquet / .json
in the same layout read through the `datasets` library (a Hugging Face preference dataset
downloaded as files). The pairs are lillm.challenge's, the readers lillm.rows'; this script only
chooses and writes.
--out is a lillm DPO data folder (lillm/folders.py): a folder holding other files, or any other
lillm folder (the --sft-data folder included), is refused; an earlier DPO folder is replaced only
with --overwrite. Files are written to temporary names and renamed; stats.json counts pairs per
split and task.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lillm import checkpoint as ckpt
from lillm.challenge import classification_pairs, translation_pairs
from lillm.cli import ArgumentParser, number, run_main
from lillm.errors import DPODataError, FlagError
from lillm.folders import check_output, claim_output, write_text_atomic
from lillm.rows import by_task_and_lang, evenly_spaced, jsonl_text, read_conversations, read_user_pairs
from lillm.tokenizer import Tokenizer

SPLITS = {"train": "train", "dev": "dev"}  # our split -> the SFT split it is built from


def main(argv=None) -> dict:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/dpo", help="folder for train.jsonl, dev.jsonl and stats.json")
    parser.add_argument("--sft-data", default=None, help="folder of data/prepare_sft.py (train.jsonl, dev.jsonl)")
    parser.add_argument("--tasks", nargs="+", default=None, help="tasks of --sft-data to use (default: all)")
    parser.add_argument("--model", default=None, help="SFT checkpoint that samples the rejected translations")
    parser.add_argument("--limit", type=number(1), default=None, help="at most N source rows per task, language and split")
    parser.add_argument("--translation-limit", type=number(1), default=200,
                        help="at most N translations sampled per language and split (sampling is the slow part)")
    parser.add_argument("--negatives", choices=["one", "all"], default="one", help="wrong labels per classification row")
    parser.add_argument("--samples", type=number(1), default=2, help="sampled translations per source sentence")
    parser.add_argument("--temperature", type=number(0, kind=float, rule="must be 0 (greedy) or more"), default=0.8)
    parser.add_argument("--top-k", type=number(0, rule="must be 0 (off) or more"), default=50)
    parser.add_argument("--max-new-tokens", type=number(1), default=96)
    parser.add_argument("--batch-size", type=number(1), default=16)
    parser.add_argument("--files", nargs="*", default=[], help="your own preference files for the train split")
    parser.add_argument("--dev-files", nargs="*", default=[], help="your own preference files for the dev split")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=number(0), default=0)
    parser.add_argument("--strict", action="store_true", help="stop at the first malformed row of --files")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an earlier DPO data folder (replaces only its .jsonl files and stats.json)")
    args = parser.parse_args(argv)
    if not args.sft_data and not args.files:
        raise FlagError("nothing to build from: give --sft-data (challenge conversations) and/or --files")
    reads = {"--sft-data": args.sft_data, "--model": args.model, "--files": args.files, "--dev-files": args.dev_files}
    check_output(args.out, "dpo-data", overwrite=args.overwrite, reads=reads)  # before any reading or sampling

    model = tokenizer = None
    if args.model:
        folder = ckpt.resolve_checkpoint(args.model)
        model, tokenizer = ckpt.load_model(folder, device=args.device).eval(), Tokenizer.from_file(folder / "tokenizer.json")
    splits: dict[str, list[dict]] = {split: [] for split in SPLITS}
    stats: dict = {"splits": {}, "translation": {}, "skipped_rows": []}
    if args.sft_data:
        for split, source in SPLITS.items():
            path = Path(args.sft_data) / f"{source}.jsonl"
            if not path.is_file():
                print(f"{path} not found: no {split} pairs from the challenge data")
                continue
            rows, _ = read_conversations(path, tasks=args.tasks, require_tasks=split == "train")
            for _, group in sorted(by_task_and_lang(rows).items()):
                group = evenly_spaced(group, args.limit)
                task, lang = group[0].get("task"), group[0].get("lang")
                if "options" in group[0]:
                    splits[split] += classification_pairs(group, args.seed, args.negatives)
                elif model is None:
                    print(f"{task}/{lang} ({split}): no --model to sample translations from; skipped")
                else:
                    made, counts = translation_pairs(model, tokenizer, evenly_spaced(group, args.translation_limit),
                                                     args.samples, args.temperature, args.top_k, args.max_new_tokens,
                                                     args.batch_size, args.seed, progress=True)
                    splits[split] += made
                    stats["translation"][f"{split}/{task}/{lang}"] = counts
    for split, files in (("train", args.files), ("dev", args.dev_files)):
        for path in files:
            rows, problems = read_user_pairs(path, strict=args.strict)
            splits[split] += rows
            stats["skipped_rows"] += problems
    if not any(splits.values()):
        raise DPODataError("no preference pairs were made: check --sft-data, --tasks, --model and --files")

    out = claim_output(args.out, "dpo-data", overwrite=args.overwrite, reads=reads)
    for split, rows in splits.items():
        write_text_atomic(out / f"{split}.jsonl", jsonl_text(rows))
        counts: dict[str, int] = {}
        for row in rows:
            key = f"{row.get('task', '')}/{row.get('lang', '')}"
            counts[key] = counts.get(key, 0) + 1
        stats["splits"][split] = {"pairs": len(rows), "by_task": dict(sorted(counts.items()))}
        print(f"{split}: {len(rows):,} pairs -> {out / (split + '.jsonl')}")
    stats.update(sft_data=args.sft_data, model=args.model, seed=args.seed, negatives=args.negatives,
                 samples=args.samples, temperature=args.temperature, files=args.files, dev_files=args.dev_files)
    write_text_atomic(out / "stats.json", json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    return stats


if __name__ == "__main__":
    run_main(main)
