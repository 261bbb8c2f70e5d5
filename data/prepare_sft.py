"""Build instruction-tuning conversations (JSON lines) for the Buzuzu-Mavi tasks, and more.

    python data/prepare_sft.py --out out/sft                       # all tasks, Swahili and Hausa
    python data/prepare_sft.py --tasks translation sentiment --limit 200 --alpaca
    python data/prepare_sft.py --tasks none --files my.jsonl my.csv --test-files my_test.csv
    python data/prepare_sft.py --tasks none --hf lelapa/Inkuba-instruct:swahili --max-rows 50000
    python data/prepare_sft.py --tasks none --hf CohereForAI/aya_dataset --lang-column language_code \
        --keep-langs swh hau --prompt-column inputs --response-column targets
    python data/prepare_sft.py --tasks none --files instruct.parquet --messages-column messages

Tables (--hf datasets, and --files that are .parquet, .arrow, save_to_disk folders, or any file when
a column flag is given) are read through `datasets` (lillm.rows.read_table_conversations): each row becomes
a conversation from a messages column, or from prompt and response columns (an instruction column
goes before the prompt); without flags the layout is recognised (messages; instruction + inputs +
targets as in InkubaLM's instruct data; inputs + targets as in Aya; prompt + response).

Every row is one conversation, the format lillm.rows.read_conversations reads:
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}],
     "task": ..., "lang": ..., "label": ..., "options": [...], "input": ..., "source": "file:row"}
"label" and "options" are set for classification tasks, where the answer is one of the options.

Tasks (lillm/challenge.py has their sources, answer words and prompts): translation (English ->
Swahili / Hausa, MAFAND-MT), sentiment (AfriSenti), nli (AfriXNLI, machine-translated; its dev
split is one premise in ten of the source's dev, the rest is train), news (MasakhaNEWS topics). Each row's instruction is one of several phrasings in the task's
language or in English, chosen by a seeded hash of the row, so re-runs give the same files.
--alpaca renders the user turn with the Alpaca prompt (Taori et al., 2023) that the public
Buzuzu-Mavi solutions used. Files are written to temporary names and renamed when complete;
stats.json, written last, counts rows per split, task, language and label.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lillm.challenge import LANGS, SPLITS, TASKS, task_rows
from lillm.cli import ArgumentParser, number, run_main
from lillm.corpora import data_dir as resolve_data_dir
from lillm.errors import SFTSourceError
from lillm.folders import check_output, claim_output, write_text_atomic
from lillm.rows import ColumnMap, jsonl_text, read_table_conversations, read_user_conversations
from lillm.sources import file_source, hub_source


def column_map(args) -> ColumnMap:
    return ColumnMap(args.prompt_column, args.response_column, args.instruction_column, args.messages_column,
                     args.lang_column, tuple(args.keep_langs or ()))


# ---- writing ----------------------------------------------------------------------------------------
def split_stats(rows: list[dict]) -> dict:
    stats: dict = {}
    for row in rows:
        entry = stats.setdefault(f"{row.get('task')}/{row.get('lang')}", {"rows": 0, "labels": {}})
        entry["rows"] += 1
        if "label" in row:
            entry["labels"][row["label"]] = entry["labels"].get(row["label"], 0) + 1
    return dict(sorted(stats.items()))


def main(argv=None) -> dict:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/sft", help="folder for train.jsonl, dev.jsonl, test.jsonl, stats.json")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), help=f"of {', '.join(TASKS)}, or 'none'")
    parser.add_argument("--langs", nargs="+", default=list(LANGS), choices=LANGS)
    parser.add_argument("--data-dir", default=None, help="data directory (default: $LILLM_DATA_DIR or ../shared/data)")
    parser.add_argument("--files", nargs="*", default=[], help="your own .jsonl/.csv files for the train split")
    parser.add_argument("--dev-files", nargs="*", default=[], help="your own files for the dev split")
    parser.add_argument("--test-files", nargs="*", default=[], help="your own files for the test split")
    parser.add_argument("--alpaca", action="store_true", help="render user turns with the Alpaca prompt")
    parser.add_argument("--limit", type=number(1), default=None, help="at most N rows per task, language and split")
    parser.add_argument("--max-chars", type=number(1), default=2000, help="cut news articles to about this many characters")
    parser.add_argument("--seed", type=number(0), default=0, help="seed of the instruction choice")
    parser.add_argument("--strict", action="store_true", help="stop at the first malformed row of --files")
    parser.add_argument("--hf", nargs="+", default=[], metavar="NAME[:CONFIG]",
                        help="Hugging Face datasets of instructions (streamed) for the train split")
    parser.add_argument("--hf-split", default="train", help="split of the --hf datasets")
    parser.add_argument("--prompt-column", help="column with the user's prompt (tables)")
    parser.add_argument("--response-column", help="column with the answer (tables)")
    parser.add_argument("--instruction-column", help="column with an instruction put before the prompt")
    parser.add_argument("--messages-column", help="column with the whole conversation in the chat format")
    parser.add_argument("--lang-column", help="column with each row's language (copied into 'lang')")
    parser.add_argument("--keep-langs", nargs="+", help="keep only rows whose --lang-column is one of these")
    parser.add_argument("--max-rows", type=number(1), default=None, help="at most N conversations per table")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an existing SFT data folder (replaces only its .jsonl files and stats.json)")
    args = parser.parse_args(argv)
    reads = {"--files": args.files, "--dev-files": args.dev_files, "--test-files": args.test_files}
    check_output(args.out, "sft-data", overwrite=args.overwrite, reads=reads)  # refused before any reading, by name

    tasks = [] if args.tasks == ["none"] else args.tasks
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)} or 'none'")
    root = resolve_data_dir(args.data_dir) if tasks else None
    splits: dict[str, list[dict]] = {split: [] for split in SPLITS}
    problems: list[str] = []
    for split in SPLITS:
        for task in tasks:
            for lang in args.langs:
                splits[split] += task_rows(root, task, lang, split, args.seed, args.alpaca, args.limit, args.max_chars)
    columns = column_map(args)
    by_columns = any((args.prompt_column, args.response_column, args.messages_column, args.instruction_column))
    for split, files in (("train", args.files), ("dev", args.dev_files), ("test", args.test_files)):
        for path in map(Path, files):
            if path.suffix in (".jsonl", ".json", ".csv") and not by_columns:
                rows, bad = read_user_conversations(path, args.alpaca, args.strict)
            else:
                rows, bad = read_table_conversations(file_source(path), columns, args.max_rows, args.strict)
            splits[split] += rows
            problems += bad
    for spec in args.hf:
        rows, bad = read_table_conversations(hub_source(spec, args.hf_split), columns, args.max_rows, args.strict)
        splits["train"] += rows
        problems += bad
    if not any(splits.values()):
        given = args.files or args.dev_files or args.test_files or args.hf
        raise SFTSourceError(f"no rows: every row of --files / --hf was skipped ({len(problems)} listed above as "
                             "skipped); fix those rows" if given and problems else
                             "no rows: the --files / --hf given hold none" if given else
                             "no rows: choose --tasks, or give --files or --hf")

    out = claim_output(args.out, "sft-data", overwrite=args.overwrite, reads=reads)  # checked again: time passed
    for split, rows in splits.items():
        write_text_atomic(out / f"{split}.jsonl", jsonl_text(rows))
    stats = {"tasks": tasks, "langs": args.langs, "alpaca": args.alpaca, "limit": args.limit, "seed": args.seed,
             "splits": {split: {"rows": len(rows), "by_task": split_stats(rows)} for split, rows in splits.items()},
             "skipped_rows": problems,
             "notes": ["nli: AfriXNLI (machine-translated) has only dev and test: its test is our test; its dev is "
                       "cut by premise, one in ten to our dev split, the rest to our train split",
                       "news: hau/swa train is MasakhaNEWS's 50-per-label few-shot file; answers are the "
                       "dataset's English category names"]}
    write_text_atomic(out / "stats.json", json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    for split, rows in splits.items():
        print(f"{split}: {len(rows):,} conversations -> {out / (split + '.jsonl')}")
    return stats


if __name__ == "__main__":
    run_main(main)
