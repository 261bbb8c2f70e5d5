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

Tasks, with the answers in the challenge's words (see SOURCES.md, "Buzuzu-Mavi challenge format"):
- translation: English -> Swahili and English -> Hausa, MAFAND-MT (train/dev/test as released).
- sentiment: AfriSenti tweets; Swahili Chanya / Wastani / Hasi, Hausa Kyakkyawa / Tsaka-tsaki / Korau.
- nli: the machine-translated AfriXNLI files; answers 0 / 1 / 2 = entailment / neutral / contradiction.
  The premise and hypothesis files are joined to the English file's gold labels on pairID (Swahili)
  or on promptID + English hypothesis (Hausa, which has no pairID column). The source has only dev
  and test: its dev goes to our train split, its test to our test split, and nli has no dev split.
- news: MasakhaNEWS topics, answered with the dataset's own (English) category names; the
  hau/swa train split is the public 50-articles-per-label few-shot file.

Instructions: each task has several phrasings in the task's language and in English; one is chosen
per row by a seeded hash of the row's identity, so re-runs give the same files and adding a source
does not change other rows. --alpaca renders the user turn with the Alpaca prompt (Taori et al.,
2023) that the public Buzuzu-Mavi solutions used. Files are written to temporary names and renamed
when complete; stats.json, written last, counts rows per split, task, language and label.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
from pathlib import Path
from typing import Iterator


from lillm.folders import write_text_atomic
from lillm.corpora import CORPORA, data_dir as resolve_data_dir
from lillm.cli import run_main
from lillm.errors import InputFileError, LillmError
from lillm.folders import check_output, claim_output
from lillm.sft import row_problem
from lillm.sources import ColumnMap, conversations, file_source, hub_source

TASKS = ("translation", "sentiment", "nli", "news")
LANGS = ("swa", "hau")
SPLITS = ("train", "dev", "test")
LANG_NAMES = {"swa": "Swahili", "hau": "Hausa"}
SENTIMENT_WORDS = {"swa": {"positive": "Chanya", "neutral": "Wastani", "negative": "Hasi"},
                   "hau": {"positive": "Kyakkyawa", "neutral": "Tsaka-tsaki", "negative": "Korau"}}
NLI_LABELS = {"entailment": "0", "neutral": "1", "contradiction": "2"}
NEWS_LABELS = ("business", "entertainment", "health", "politics", "religion", "sports", "technology")
XNLI_DIR = "afrixnli_mt_joynaomi81"
XNLI_SPLIT = {"train": "dev", "test": "test"}  # our split -> the source's file; no dev on purpose
XNLI_FILES = {  # (english, sentence1, sentence2) per source split and language; names contain spaces
    ("dev", "swa"): ("dev/xnli.dev - eng_dataset.csv", "dev/swahili/sentence1_translations.csv",
                     "dev/swahili/sentence2_translations.csv"),
    ("dev", "hau"): ("dev/xnli.dev - eng_dataset.csv", "dev/hausa/sentence1_translated.csv",
                     "dev/hausa/sentence2_translated.csv"),
    ("test", "swa"): ("test/xnli.test - english.csv", "test/swahili/sentence1_translations.csv",
                      "test/swahili/sentence2_translations.csv"),
    ("test", "hau"): ("test/xnli.test - english.csv", "test/hausa/sentence1_translated.csv",
                      "test/hausa/sentence2_translated.csv"),
}
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

# Phrasings per (task, language); {lang}, {a} {b} {c} (sentiment words) and {options} are filled in.
INSTRUCTIONS = {
    ("translation", "swa"): ["Tafsiri sentensi ifuatayo kutoka Kiingereza kwenda Kiswahili.",
                             "Tafsiri maandishi haya ya Kiingereza kwa Kiswahili.",
                             "Andika tafsiri ya Kiswahili ya sentensi hii ya Kiingereza."],
    ("translation", "hau"): ["Fassara wannan jumla daga Turanci zuwa Hausa.",
                             "Fassara rubutun Turanci mai zuwa zuwa harshen Hausa.",
                             "Rubuta fassarar Hausa ta wannan jumlar Turanci."],
    ("translation", "en"): ["Translate the following sentence from English to {lang}.",
                            "Translate this English text into {lang}.",
                            "Give the {lang} translation of this English sentence."],
    ("sentiment", "swa"): ["Tambua hisia ya tweet hii. Jibu kwa neno moja: {a}, {b} au {c}.",
                           "Je, ujumbe huu una hisia gani? Chagua {a}, {b} au {c}.",
                           "Ainisha hisia ya maandishi yafuatayo kama {a}, {b} au {c}."],
    ("sentiment", "hau"): ["Gano ra'ayin wannan tweet. Amsa da kalma ɗaya: {a}, {b} ko {c}.",
                           "Wane irin ra'ayi ne wannan sakon yake nunawa? Zaɓi {a}, {b} ko {c}.",
                           "Rarraba ra'ayin rubutun da ke ƙasa a matsayin {a}, {b} ko {c}."],
    ("sentiment", "en"): ["What is the sentiment of this tweet? Answer with one word: {a} (positive), "
                          "{b} (neutral) or {c} (negative).",
                          "Classify the sentiment of the following text as {a}, {b} or {c}.",
                          "Is this message positive ({a}), neutral ({b}) or negative ({c})?"],
    ("nli", "swa"): ["Soma msingi na dhana. Jibu 0 ikiwa msingi unathibitisha dhana, 1 ikiwa haijulikani, "
                     "au 2 ikiwa unaipinga.",
                     "Je, dhana inafuata kutoka kwa msingi? Jibu kwa 0 (ndiyo), 1 (haijulikani) au 2 (inapingana)."],
    ("nli", "hau"): ["Karanta jumla ta farko da ta biyu. Amsa 0 idan ta farko ta tabbatar da ta biyu, "
                     "1 idan ba a sani ba, ko 2 idan sun saɓa.",
                     "Shin jumla ta biyu gaskiya ce bisa ga jumla ta farko? Amsa da 0 (eh), 1 (ba a sani ba) "
                     "ko 2 (sun saɓa)."],
    ("nli", "en"): ["Does the premise entail the hypothesis? Answer 0 for entailment, 1 for neutral or "
                    "2 for contradiction.",
                    "Read the premise and the hypothesis. Reply 0 if the premise implies the hypothesis, "
                    "1 if it neither implies nor contradicts it, 2 if it contradicts it."],
    ("news", "swa"): ["Makala hii ya habari inahusu mada gani? Chagua moja: {options}.",
                      "Ainisha habari ifuatayo katika mojawapo ya mada hizi: {options}."],
    ("news", "hau"): ["Wane fanni ne wannan labari ya shafa? Zaɓi ɗaya: {options}.",
                      "Rarraba labarin da ke ƙasa zuwa ɗaya daga cikin waɗannan fannoni: {options}."],
    ("news", "en"): ["What is the topic of this news article? Choose one of: {options}.",
                     "Classify the following news article into one of these categories: {options}."],
}
NLI_FIELDS = {"swa": ("Msingi", "Dhana"), "hau": ("Jumla ta farko", "Jumla ta biyu"),
              "en": ("Premise", "Hypothesis")}


class SFTSourceError(LillmError):
    """A source file that does not have the columns or alignment this script expects."""


# ---- reading the sources: each yields (row id, input, answer, label or None) ---------------------
def _table(path: Path, delimiter: str = ",") -> list[dict]:
    if not path.is_file():
        raise InputFileError(f"{path} not found; see docs/DATA.md, or leave its task out with --tasks")
    csv.field_size_limit(2**31 - 1)
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def _need(rows: list[dict], path: Path, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if rows and c not in rows[0]]
    if missing:
        raise SFTSourceError(f"{path} has no column(s) {missing}; its columns are {list(rows[0])}")


def read_translation(root: Path, lang: str, split: str) -> Iterator[tuple]:
    target = root / CORPORA[f"mafand-{lang}-{split}"].relpath
    source = target.with_suffix(".en")
    for path in (source, target):
        if not path.is_file():
            raise InputFileError(f"{path} not found; see docs/DATA.md, or leave translation out with --tasks")
    english = source.read_text(encoding="utf-8-sig").splitlines()
    translated = target.read_text(encoding="utf-8-sig").splitlines()
    if len(english) != len(translated):
        raise SFTSourceError(f"{source} has {len(english)} lines but {target} has {len(translated)}: not aligned")
    for number, (en, tr) in enumerate(zip(english, translated), start=1):
        if en.strip() and tr.strip():
            yield f"{target.name}:{number}", en.strip(), tr.strip(), None


def read_sentiment(root: Path, lang: str, split: str) -> Iterator[tuple]:
    path = root / CORPORA[f"afrisenti-{lang}-{split}"].relpath
    rows = _table(path, "\t")
    _need(rows, path, ("tweet", "label"))
    for number, row in enumerate(rows, start=2):
        word = SENTIMENT_WORDS[lang].get((row["label"] or "").strip())
        if word is None:
            raise SFTSourceError(f"{path}, line {number}: label {row['label']!r} is not one of "
                                 f"{list(SENTIMENT_WORDS[lang])}")
        if row["tweet"].strip():
            yield f"{path.name}:{number}", row["tweet"].strip(), word, word


def read_news(root: Path, lang: str, split: str, max_chars: int) -> Iterator[tuple]:
    path = root / CORPORA[f"masakhanews-{lang}-{split}"].relpath
    rows = _table(path, "\t")
    _need(rows, path, ("category", "headline", "text"))
    for number, row in enumerate(rows, start=2):
        label = row["category"].strip()
        if label not in NEWS_LABELS:
            raise SFTSourceError(f"{path}, row {number}: category {label!r} is not one of {NEWS_LABELS}")
        text = f"{row['headline'].strip()}\n{row['text'].strip()}".strip()
        if len(text) > max_chars:  # long articles: keep the start, cut at a word boundary
            text = text[:max_chars].rsplit(" ", 1)[0] + " ..."
        yield f"{path.name}:{number}", text, label, label


def read_nli(root: Path, lang: str, split: str) -> Iterator[tuple]:
    """Join translated premises and hypotheses to the English gold labels (see the module docstring)."""
    if split not in XNLI_SPLIT:
        return
    names = XNLI_FILES[(XNLI_SPLIT[split], lang)]
    english_path, premise_path, hypothesis_path = (root / XNLI_DIR / n for n in names)
    english, premises, hypotheses = _table(english_path), _table(premise_path), _table(hypothesis_path)
    _need(english, english_path, ("gold_label", "promptID", "pairID", "sentence2"))
    _need(premises, premise_path, ("promptID", "sentence1_translated"))
    _need(hypotheses, hypothesis_path, ("promptID", "sentence2", "sentence2_translated"))
    by_pair = {r["pairID"]: r["gold_label"] for r in english}
    by_text: dict[tuple, set] = {}
    for r in english:
        by_text.setdefault((r["promptID"], r["sentence2"]), set()).add(r["gold_label"])
    premise_of = {}
    for r in premises:
        premise_of.setdefault(r["promptID"], r["sentence1_translated"].strip())
    for number, r in enumerate(hypotheses, start=2):
        if "pairID" in r:
            labels = {by_pair.get(r["pairID"])} - {None}
        else:
            labels = by_text.get((r["promptID"], r["sentence2"]), set())
        premise, hypothesis = premise_of.get(r["promptID"], ""), r["sentence2_translated"].strip()
        if len(labels) != 1 or not premise or not hypothesis or next(iter(labels)) not in NLI_LABELS:
            continue  # unmatched or ambiguous join: skipped (stats.json shows how many rows joined)
        answer = NLI_LABELS[next(iter(labels))]
        row_id = f"{XNLI_SPLIT[split]}/{hypothesis_path.parent.name}/{hypothesis_path.name}:{number}"
        yield row_id, (premise, hypothesis), answer, answer


def task_options(task: str, lang: str) -> list[str] | None:
    if task == "sentiment":
        return list(SENTIMENT_WORDS[lang].values())
    if task == "nli":
        return list(NLI_LABELS.values())
    if task == "news":
        return list(NEWS_LABELS)
    return None


# ---- rendering ----------------------------------------------------------------------------------
def choose(seed: int, key: str, count: int) -> int:
    """A deterministic index in [0, count) from the seed and a row's identity."""
    digest = hashlib.blake2b(f"{seed}|{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count


def render_user(instruction: str, text: str, alpaca: bool) -> str:
    if alpaca:
        template = ALPACA if text else ALPACA_NO_INPUT
        return template.format(instruction=instruction, input=text)
    return f"{instruction}\n\n{text}" if text else instruction


def make_row(task: str, lang: str, row_id: str, source_input, answer: str, label: str | None,
             seed: int, alpaca: bool) -> dict:
    phrasings = [(lang, p) for p in INSTRUCTIONS[(task, lang)]] + [("en", p) for p in INSTRUCTIONS[(task, "en")]]
    instruction_lang, phrasing = phrasings[choose(seed, f"{task}|{lang}|{row_id}", len(phrasings))]
    options = task_options(task, lang)
    words = dict(zip("abc", options or []))
    instruction = phrasing.format(lang=LANG_NAMES[lang], options=", ".join(options or []), **words)
    if task == "nli":
        first, second = NLI_FIELDS[instruction_lang]
        text = f"{first}: {source_input[0]}\n{second}: {source_input[1]}"
        source_input = f"{source_input[0]}\n{source_input[1]}"
    else:
        text = source_input
    row = {"messages": [{"role": "user", "content": render_user(instruction, text, alpaca)},
                        {"role": "assistant", "content": answer}],
           "task": task, "lang": lang, "input": source_input, "source": row_id, "instruction_lang": instruction_lang}
    if label is not None:
        row["label"], row["options"] = label, options
    return row


def task_rows(root: Path, task: str, lang: str, split: str, seed: int, alpaca: bool, limit: int | None,
              max_chars: int) -> list[dict]:
    readers = {"translation": read_translation, "sentiment": read_sentiment, "nli": read_nli,
               "news": lambda *where: read_news(*where, max_chars)}
    items = list(readers[task](root, lang, split))
    if limit is not None and len(items) > limit:  # evenly spaced: sources are often sorted by label
        items = [items[i * len(items) // limit] for i in range(limit)]
    return [make_row(task, lang, f"{task}-{lang}-{split}/{row_id}", source_input, answer, label, seed, alpaca)
            for row_id, source_input, answer, label in items]


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
        for number, record in enumerate(_table(path), start=2):
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

    out = claim_output(args.out, "sft-data", overwrite=args.overwrite, reads=reads)  # checked again: time passed
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
