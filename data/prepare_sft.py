"""Build instruction-tuning conversations (JSON lines) for the Buzuzu-Mavi tasks, and more.

    python data/prepare_sft.py --out out/sft                       # all tasks, Swahili and Hausa
    python data/prepare_sft.py --tasks translation sentiment --limit 200 --alpaca
    python data/prepare_sft.py --tasks none --files my.jsonl my.csv --test-files my_test.csv
    python data/prepare_sft.py --tasks none --hf lelapa/Inkuba-instruct:swahili --max-rows 50000
    python data/prepare_sft.py --tasks none --hf CohereForAI/aya_dataset --lang-column language_code \
        --keep-langs swh hau --prompt-column inputs --response-column targets
    python data/prepare_sft.py --tasks none --files instruct.parquet --messages-column messages

Tables (--hf datasets, and --files that are .parquet, .arrow, save_to_disk folders, or any file when
a column flag is given) are read through `datasets` (lillm.sources.conversations): each row becomes
a conversation from a messages column, or from prompt and response columns (an instruction column
goes before the prompt); without flags the layout is recognised (messages; instruction + inputs +
targets as in InkubaLM's instruct data; inputs + targets as in Aya; prompt + response).

Every row is one conversation, the format lillm/sft.py reads:
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}],
     "task": ..., "lang": ..., "label": ..., "options": [...], "input": ..., "source": "file:row"}
"label" and "options" are set for classification tasks, where the answer is one of the options.

Tasks (lillm/challenge.py has their sources, answer words and prompts): translation (English ->
Swahili / Hausa, MAFAND-MT), sentiment (AfriSenti), nli (AfriXNLI, machine-translated; no dev
split), news (MasakhaNEWS topics). Each row's instruction is one of several phrasings in the task's
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
from lillm.checkpoint import write_text_atomic
from lillm.cli import run_main
from lillm.corpora import data_dir as resolve_data_dir
from lillm.errors import SFTSourceError
from lillm.folders import check_output, claim_output
from lillm.rows import read_csv_rows, render_user
from lillm.sft import row_problem
from lillm.sources import ColumnMap, conversations, file_source, hub_source


# ---- the user's own files ---------------------------------------------------------------------------
def _first(row: dict, names: tuple[str, ...]) -> str | None:
    for name in names:
        if row.get(name) is not None:
            return str(row[name])
    return None


def instruction_row(record: dict, where: str, alpaca: bool) -> dict:
    """An instruction/input/target record (CSV row or JSON object) as a conversation."""
    instruction = _first(record, ("instruction",))
    target = _first(record, ("target", "targets", "output"))
    if instruction is None or target is None or not target.strip():
        raise SFTSourceError(f"{where}: needs 'instruction' and a non-empty 'target' (or 'targets'/'output'); "
                             f"has {sorted(record)}")
    text = (_first(record, ("input", "inputs")) or "").strip()
    row = {"messages": [{"role": "user", "content": render_user(instruction.strip(), text, alpaca)},
                        {"role": "assistant", "content": target.strip()}],
           "task": _first(record, ("task",)) or "custom", "lang": _first(record, ("lang", "langs")) or "",
           "input": text, "source": where}
    if record.get("label") is not None:
        row["label"] = record["label"]
    return row


def read_table_rows(source, columns: ColumnMap, limit, strict: bool) -> tuple[list[dict], list[str]]:
    """Conversations of a table read through `datasets` (lillm.sources.conversations), and problems."""
    rows, problems = [], []
    for row, problem in conversations(source, columns, limit):
        if problem is None:
            rows.append(row)
        elif strict:
            raise SFTSourceError(problem + "; fix the row or run without --strict to skip it")
        else:
            problems.append(problem)
    return rows, problems


def column_map(args) -> ColumnMap:
    return ColumnMap(args.prompt_column, args.response_column, args.instruction_column, args.messages_column,
                     args.lang_column, tuple(args.keep_langs or ()))


def read_user_file(path: Path, alpaca: bool, strict: bool) -> tuple[list[dict], list[str]]:
    """Rows of a .jsonl (conversations, or instruction/input/target objects) or .csv file, and problems."""
    rows, problems = [], []
    if path.suffix == ".csv":
        for number, record in enumerate(read_csv_rows(path, ",", "check the path given to --files"), start=2):
            try:
                rows.append(instruction_row(record, f"{path}:{number}", alpaca))
            except SFTSourceError as error:
                problems.append(str(error))
    elif path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}, line {number}"
                try:
                    record = json.loads(line)
                    if isinstance(record, dict) and "messages" not in record and "instruction" in record:
                        record = instruction_row(record, where, alpaca)
                    problem = row_problem(record)
                except json.JSONDecodeError as error:
                    problem = f"not valid JSON ({error.msg})"
                except SFTSourceError as error:
                    problem = str(error).removeprefix(f"{where}: ")
                if problem is None:
                    rows.append(record)
                else:
                    problems.append(f"{where}: {problem}")
    else:
        raise SFTSourceError(f"{path}: unknown file type {path.suffix!r}; give .jsonl or .csv "
                             "(columns instruction, input, target)")
    if problems and strict:
        raise SFTSourceError(problems[0] + "; fix the row or run without --strict to skip it")
    return rows, problems


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/sft", help="folder for train.jsonl, dev.jsonl, test.jsonl, stats.json")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), help=f"of {', '.join(TASKS)}, or 'none'")
    parser.add_argument("--langs", nargs="+", default=list(LANGS), choices=LANGS)
    parser.add_argument("--data-dir", default=None, help="data directory (default: $LILLM_DATA_DIR or ../shared/data)")
    parser.add_argument("--files", nargs="*", default=[], help="your own .jsonl/.csv files for the train split")
    parser.add_argument("--dev-files", nargs="*", default=[], help="your own files for the dev split")
    parser.add_argument("--test-files", nargs="*", default=[], help="your own files for the test split")
    parser.add_argument("--alpaca", action="store_true", help="render user turns with the Alpaca prompt")
    parser.add_argument("--limit", type=int, default=None, help="at most N rows per task, language and split")
    parser.add_argument("--max-chars", type=int, default=2000, help="cut news articles to about this many characters")
    parser.add_argument("--seed", type=int, default=0, help="seed of the instruction choice")
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
    parser.add_argument("--max-rows", type=int, default=None, help="at most N conversations per table")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an existing SFT data folder (replaces only its .jsonl files and stats.json)")
    args = parser.parse_args(argv)
    check_output(args.out, "sft-data", overwrite=args.overwrite)  # refused before any reading, by name

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
                rows, bad = read_user_file(path, args.alpaca, args.strict)
            else:
                rows, bad = read_table_rows(file_source(path), columns, args.max_rows, args.strict)
            splits[split] += rows
            problems += bad
    for spec in args.hf:
        rows, bad = read_table_rows(hub_source(spec, args.hf_split), columns, args.max_rows, args.strict)
        splits["train"] += rows
        problems += bad
    for message in problems:
        print(f"skipped: {message}")
    if not any(splits.values()):
        raise SFTSourceError("no rows: choose --tasks, or give --files or --hf")

    out = claim_output(args.out, "sft-data", overwrite=args.overwrite)  # a folder of other files is refused
    for split, rows in splits.items():
        write_text_atomic(out / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    stats = {"tasks": tasks, "langs": args.langs, "alpaca": args.alpaca, "limit": args.limit, "seed": args.seed,
             "splits": {split: {"rows": len(rows), "by_task": split_stats(rows)} for split, rows in splits.items()},
             "skipped_rows": problems,
             "notes": ["nli: AfriXNLI (machine-translated) has only dev and test: its dev is our train, "
                       "its test our test; there is no nli dev split",
                       "news: hau/swa train is MasakhaNEWS's 50-per-label few-shot file; answers are the "
                       "dataset's English category names"]}
    write_text_atomic(out / "stats.json", json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    for split, rows in splits.items():
        print(f"{split}: {len(rows):,} conversations -> {out / (split + '.jsonl')}")
    return stats


if __name__ == "__main__":
    run_main(main)
