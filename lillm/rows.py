"""Rows: the records a user's files hold, read and checked before any tokenizer sees them.

Every stage after pretraining reads rows: SFT conversations ({"messages": [...], "task", "lang",
...}), preference pairs (a prompt, a chosen and a rejected answer), instruction tables, the
challenge's task files. This module is the one place that reads them, so every stage accepts the
same files and reports a bad row the same way:

- one message validator (`messages_problem`): a non-empty list of messages, each checked by the
  chat template's own rule (lillm.tokenizer.message_problem); a conversation to learn from needs a
  non-empty assistant turn, a prompt to be answered must not end with one;
- one record reader per container (`jsonl_records`, `csv_records`, `dataset_records`): JSON lines
  decoded line by line and CSV decoded with every byte that is not UTF-8 kept as a marker
  (`read_text`), so one bad byte or line costs its row, named, not the file; parquet, JSON, arrow,
  save_to_disk folders and hub datasets through `datasets` (lillm.sources, streamed), whose own
  errors, when a file is opened or while its rows are read, become one line that names it;
- one collector (`collect_rows`) that turns records into rows, keeps the good ones, and names the
  file and line (or row) of every problem: skipped and counted, or with strict=True the first one
  stops the read with the fix in the message.
Tables become conversations from a messages column, or from prompt and response columns with an
optional instruction before the prompt (ColumnMap); without flags the layout is recognised
(messages; instruction + inputs + targets as in InkubaLM's instruct data; inputs + targets as in
Aya; input + output + instruction as in Alpaca; prompt + response). Instruction records become a
user turn, plainly or in the Alpaca prompt (Taori et al., 2023).

Rows are chosen evenly per (task, language) (`evenly_spaced`, `cap_per_task`): sources are often
sorted by label, so the first N rows of one would hold a single label.
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import (CorpusFormatError, DPODataError, InputEncodingError, InputFileError, SFTDataError,
                     SFTSourceError, SourceError)
from .hub import column_names, open_dataset
from .sources import Source
from .tokenizer import message_problem

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
STRICT_HINT = "; fix or delete the row, or run without --strict to skip it"

Record = tuple[str, object, "str | None"]         # (where, the record, why it could not be read)
RowMaker = Callable[[object, str], "tuple[dict | None, str | None]"]  # (row, problem); (None, None) skips


# ---- one message validator --------------------------------------------------------------------------
def messages_problem(messages, answered: bool = True) -> str | None:
    """Why a list of messages is not usable, or None. answered=True: a conversation to learn from
    (it needs a non-empty assistant turn); False: a prompt (it must not end with the assistant)."""
    if not isinstance(messages, list) or not messages:
        return "'messages' is missing or not a non-empty list of {\"role\": ..., \"content\": ...}"
    for index, message in enumerate(messages):
        problem = message_problem(index, message)
        if problem is not None:
            return problem
        if answered and message["role"] == "assistant" and not message["content"].strip():
            return f"message {index} is an empty assistant turn (nothing to learn)"
    if answered and not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn (nothing to learn)"
    if not answered and messages[-1]["role"] == "assistant":
        return "'messages' ends with an assistant turn; it must end with the turn being answered"
    return None


def conversation_problem(row) -> str | None:
    """Why a parsed row is not a usable conversation, or None when it is."""
    if not isinstance(row, dict):
        return f"expected a JSON object with 'messages', got {type(row).__name__}"
    return messages_problem(row.get("messages"), answered=True)


def _response_text(value, name: str) -> str:
    """A response as a string, or as [{"role": "assistant", "content": ...}] (the TRL layout)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        if value[0].get("role") != "assistant":
            raise DPODataError(f"'{name}' as a message list must be one assistant message")
        value = value[0].get("content")
    if not isinstance(value, str):
        raise DPODataError(f"'{name}' must be a string (or one assistant message), got {type(value).__name__}")
    if not value.strip():
        raise DPODataError(f"'{name}' is empty")
    return value


def pair_parts(row) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen text, rejected text) of a preference row; DPODataError says what is wrong.

    A row is {"prompt": "...", "chosen": ..., "rejected": ...} or {"messages": [... ending with the
    user's turn], "chosen": ..., "rejected": ...}.
    """
    if not isinstance(row, dict):
        raise DPODataError(f"expected a JSON object with prompt/messages, chosen and rejected, got {type(row).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise DPODataError(f"no {' or '.join(repr(m) for m in missing)} (a row needs prompt or messages, "
                           f"chosen and rejected; it has {sorted(row)})")
    if isinstance(row.get("messages"), list) and row["messages"]:
        messages = row["messages"]
        problem = messages_problem(messages, answered=False)
        if problem is not None:
            raise DPODataError(problem)
    elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
        messages = [{"role": "user", "content": row["prompt"]}]
    else:
        raise DPODataError("no 'prompt' string or non-empty 'messages' list")
    chosen, rejected = _response_text(row["chosen"], "chosen"), _response_text(row["rejected"], "rejected")
    if chosen == rejected:
        raise DPODataError("'chosen' and 'rejected' are the same text (nothing to prefer)")
    return messages, chosen, rejected


def as_conversation(record, where: str) -> tuple[dict | None, str | None]:
    """A RowMaker: the record itself when it is a usable conversation."""
    problem = conversation_problem(record)
    return (record, None) if problem is None else (None, problem)


def as_pair(record, where: str) -> tuple[dict | None, str | None]:
    """A RowMaker: the record itself when it is a usable preference pair."""
    try:
        pair_parts(record)
    except DPODataError as error:
        return None, str(error)
    return dict(record), None


# ---- reading records ----------------------------------------------------------------------------------
def jsonl_records(path: Path, kind: str = "file", maker: str = "check the path") -> Iterator[Record]:
    """(where, record, None) per non-blank line of a JSON-lines file, or (where, None, problem) for
    a line that is not UTF-8 or not JSON. `kind` and `maker` word the error for a missing file."""
    if path.is_dir():
        raise InputFileError(f"{kind} {path} is a folder; pass the .jsonl file in it")
    if not path.is_file():
        raise InputFileError(f"{kind} {path} does not exist; {maker}")
    with open(path, "rb") as f:  # decoded line by line: one bad byte costs its row, not the file
        for number, raw in enumerate(f, start=1):
            where = f"{path}, line {number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                yield where, None, f"not UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1})"
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line), None
            except json.JSONDecodeError as error:
                yield where, None, f"not valid JSON ({error.msg} at column {error.colno})"


NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a byte that is not UTF-8


def read_text(path: Path) -> str:
    """A file's text, every byte that is not UTF-8 kept as a marker (surrogateescape) for `undecodable`
    to name, instead of a UnicodeDecodeError for the whole file."""
    return Path(path).read_bytes().decode("utf-8-sig", errors="surrogateescape")


def undecodable(text: str) -> str | None:
    """What is wrong with text read by read_text, when it held bytes that are not UTF-8; else None."""
    found = NOT_UTF8.search(text)
    if found is None:
        return None
    return f"not UTF-8 (byte {ord(found[0]) - 0xDC00:#04x} at column {found.start() + 1})"


def table_records(path: Path, delimiter: str = ",") -> Iterator[tuple[int, dict, str | None]]:
    """(line, record, problem) per row of a CSV (or TSV) file with a header; the problem names a field
    that held bytes that are not UTF-8, else it is None."""
    csv.field_size_limit(2**31 - 1)  # news articles and long tweets exceed csv's default 128 KiB field
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    start = 2
    for record in reader:
        bad = next(((key, problem) for key, value in record.items()
                    if (problem := undecodable(f"{key}{value}")) is not None), None)
        yield start, record, None if bad is None else f"column {bad[0]!r}: {bad[1]}"
        start = reader.line_num + 1


def read_csv_rows(path: Path, delimiter: str = ",", hint: str = "see docs/DATA.md") -> list[dict]:
    """Every row of a CSV (or, with delimiter "\\t", TSV) file with a header, as dicts; a row holding
    bytes that are not UTF-8 is refused in one line that names it."""
    if not path.is_file():
        raise InputFileError(f"{path} not found; {hint}")
    rows = []
    for line, record, problem in table_records(path, delimiter):
        if problem is not None:
            raise InputEncodingError(f"{path}, line {line}: {problem}; save the file as UTF-8")
        rows.append(record)
    return rows


def csv_records(path: Path) -> Iterator[Record]:
    """(where, record, problem) per row of a user's CSV file; where is file:line; a row holding bytes
    that are not UTF-8 is a problem of its own row."""
    if not path.is_file():
        raise InputFileError(f"{path} not found; check the path given to --files")
    for line, record, problem in table_records(path):
        yield f"{path}:{line}", (None if problem else record), problem


def dataset_records(source: Source, dataset=None) -> Iterator[Record]:
    """(where, record, None) per row of a table read through `datasets`; where is name:row (from 0)."""
    dataset = open_dataset(source) if dataset is None else dataset
    for number, record in enumerate(dataset):
        yield f"{source.name}:{number}", record, None


def need_columns(rows: list[dict], path: Path, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if rows and c not in rows[0]]
    if missing:
        raise SFTSourceError(f"{path} has no column(s) {missing}; its columns are {list(rows[0])}")


# ---- records into rows -----------------------------------------------------------------------------------
def collect_rows(records: Iterable[Record], make_row: RowMaker, error: type[Exception], strict: bool = False,
                 tasks: Iterable[str] | None = None, limit: int | None = None,
                 max_reported: int = 10, require_tasks: bool = False) -> tuple[list[dict], list[str]]:
    """The rows make_row accepts (those of `tasks` only, at most `limit`), and the problems of the
    records skipped, each naming its file and line; strict=True raises `error` at the first problem.
    require_tasks: a task of `tasks` that no row has is refused as unknown (a typo), naming those there."""
    wanted = None if tasks is None else set(tasks)
    rows, problems, seen = [], [], set()
    for where, record, problem in records:
        row = None
        if problem is None:
            row, problem = make_row(record, where)
        if problem is not None:
            if strict:
                raise error(f"{where}: {problem}{STRICT_HINT}")
            problems.append(f"{where}: {problem}")
        elif row is not None:
            seen.add(row.get("task"))
            if wanted is None or row.get("task") in wanted:
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    break
    unknown = sorted(wanted - seen) if require_tasks and wanted is not None else []
    if unknown:
        raise error(f"--tasks: unknown task(s) {unknown}: no row has them (the tasks there: "
                    f"{sorted(map(str, seen))}); check the spelling")
    for message in problems[:max_reported]:
        print(f"skipped: {message}")
    if len(problems) > max_reported:
        print(f"skipped {len(problems) - max_reported} more malformed rows")
    return rows, problems


def read_conversations(paths: str | Path | Iterable[str | Path], strict: bool = False,
                       tasks: Iterable[str] | None = None, max_reported: int = 10,
                       require_tasks: bool = False) -> tuple[list[dict], list[str]]:
    """Rows of JSON-lines conversation files (data/prepare_sft.py writes them), and the problems of
    the rows skipped. tasks keeps only rows whose "task" is listed (require_tasks: a task no row has is
    refused as unknown). Blank lines are skipped silently."""
    return collect_rows(_jsonl_files(paths, "conversation file", "make it with data/prepare_sft.py"),
                        as_conversation, SFTDataError, strict, tasks, max_reported=max_reported,
                        require_tasks=require_tasks)


def read_pairs(paths: str | Path | Iterable[str | Path], strict: bool = False, tasks: Iterable[str] | None = None,
               max_reported: int = 10, require_tasks: bool = False) -> tuple[list[dict], list[str]]:
    """Rows of preference JSON-lines files (see pair_parts), and the problems of the rows skipped."""
    return collect_rows(_jsonl_files(paths, "preference file", "make it with data/prepare_dpo.py"),
                        as_pair, DPODataError, strict, tasks, max_reported=max_reported,
                        require_tasks=require_tasks)


def _jsonl_files(paths, kind: str, maker: str) -> Iterator[Record]:
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    for path in map(Path, paths):
        yield from jsonl_records(path, kind, maker)


# ---- a user's own files -----------------------------------------------------------------------------------
def _first(record: dict, names: tuple[str, ...]) -> str | None:
    for name in names:
        if record.get(name) is not None:
            return str(record[name])
    return None


def render_user(instruction: str, text: str, alpaca: bool) -> str:
    """One user turn from an instruction and its input (which may be empty)."""
    if alpaca:
        template = ALPACA if text else ALPACA_NO_INPUT
        return template.format(instruction=instruction, input=text)
    return f"{instruction}\n\n{text}" if text else instruction


def instruction_row(record: dict, where: str, alpaca: bool) -> tuple[dict | None, str | None]:
    """An instruction/input/target record (CSV row or JSON object) as a conversation, or its problem."""
    instruction = _first(record, ("instruction",))
    target = _first(record, ("target", "targets", "output"))
    if instruction is None or target is None or not target.strip():
        return None, f"needs 'instruction' and a non-empty 'target' (or 'targets'/'output'); has {sorted(record)}"
    text = (_first(record, ("input", "inputs")) or "").strip()
    row = {"messages": [{"role": "user", "content": render_user(instruction.strip(), text, alpaca)},
                        {"role": "assistant", "content": target.strip()}],
           "task": _first(record, ("task",)) or "custom", "lang": _first(record, ("lang", "langs")) or "",
           "input": text, "source": where}
    if record.get("label") is not None:
        row["label"] = record["label"]
    return row, None


def read_user_conversations(path: Path, alpaca: bool, strict: bool) -> tuple[list[dict], list[str]]:
    """Rows of a user's .jsonl / .json (JSON lines: conversations, or instruction/input/target
    objects) or .csv (instruction, input, target columns) file, and problems."""
    def make_row(record, where):
        if isinstance(record, dict) and "messages" not in record and "instruction" in record:
            record, problem = instruction_row(record, where, alpaca)
            if problem is not None:
                return None, problem
        return as_conversation(record, where)

    if path.suffix == ".csv":
        return collect_rows(csv_records(path), lambda record, where: instruction_row(record, where, alpaca),
                            SFTSourceError, strict)
    if path.suffix in (".jsonl", ".json"):
        return collect_rows(jsonl_records(path, "file", "check the path given to --files"), make_row,
                            SFTSourceError, strict)
    raise SFTSourceError(f"{path}: unknown file type {path.suffix!r}; give .jsonl or .csv "
                         "(columns instruction, input, target)")


def read_user_pairs(path: str | Path, strict: bool = False) -> tuple[list[dict], list[str]]:
    """Preference rows from a user file: .jsonl, .csv, or .parquet / .json through `datasets` (how
    Hugging Face stores datasets). Same layout: prompt (or messages), chosen, rejected."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return read_pairs(path, strict=strict)
    if path.suffix not in (".parquet", ".json", ".csv"):
        raise DPODataError(f"{path}: unknown file type {path.suffix!r}; give .jsonl, .parquet, .json or .csv "
                           "with prompt (or messages), chosen and rejected")
    if not path.is_file():
        raise InputFileError(f"preference file {path} does not exist; check the path given to --files")
    if path.suffix == ".csv":
        return collect_rows(csv_records(path), as_pair, DPODataError, strict)
    source = Source(str(path), str(path), path.suffix[1:])
    return collect_rows(dataset_records(source), as_pair, DPODataError, strict)


# ---- tables through `datasets`: columns into conversations -----------------------------------------------
@dataclass(frozen=True)
class ColumnMap:
    """Which columns of a table make a conversation (the format read_conversations reads).

    Either `messages` (a column holding [{"role": ..., "content": ...}, ...]) or `prompt` and
    `response`, with an optional `instruction` put before the prompt. `lang` names a column to filter
    on (`keep_langs`) and to copy into the row's "lang".
    """
    prompt: str | None = None
    response: str | None = None
    instruction: str | None = None
    messages: str | None = None
    lang: str | None = None
    keep_langs: tuple[str, ...] = ()


# Layouts recognised when no column is named: chat rows, InkubaLM's instruct data, Aya, Alpaca.
KNOWN_LAYOUTS = (ColumnMap(messages="messages"), ColumnMap("inputs", "targets", "instruction"),
                 ColumnMap("inputs", "targets"), ColumnMap("input", "output", "instruction"),
                 ColumnMap("prompt", "response"))


def choose_columns(have: list[str], given: ColumnMap, source: Source) -> ColumnMap:
    """The given mapping, checked against the columns, or the first known layout the table fits."""
    named = [c for c in (given.prompt, given.response, given.instruction, given.messages, given.lang) if c]
    flags = "--prompt-column/--response-column (and --instruction-column), or --messages-column"
    if given.messages or given.prompt or given.response:
        if not given.messages and not (given.prompt and given.response):
            raise SourceError(f"{source.where()}: give both --prompt-column and --response-column "
                              f"(its columns are {have})")
        chosen = given
    else:
        fits = [layout for layout in KNOWN_LAYOUTS
                if all(c in have for c in (layout.prompt, layout.response, layout.instruction, layout.messages) if c)]
        if not fits:
            raise CorpusFormatError(f"{source.where()} has columns {have}, none of the known layouts "
                                    f"(messages; instruction+inputs+targets; inputs+targets; prompt+response); "
                                    f"name them with {flags}")
        chosen = ColumnMap(fits[0].prompt, fits[0].response, fits[0].instruction, fits[0].messages,
                           given.lang, given.keep_langs)
    for column in named + [c for c in (chosen.prompt, chosen.response, chosen.instruction, chosen.messages) if c]:
        if column not in have:
            raise CorpusFormatError(f"{source.where()} has no column {column!r}; its columns are {have}; "
                                    f"pass {flags} naming them")
    if chosen.keep_langs and not chosen.lang:
        raise SourceError("--keep-langs needs --lang-column NAME: the column that holds each row's language")
    return chosen


def record_to_conversation(record: dict, columns: ColumnMap, where: str) -> dict:
    """One table row as {"messages": [...], "task", "lang", "source"} (not yet checked)."""
    if columns.messages:
        messages = record[columns.messages]
        if isinstance(messages, str):
            messages = json.loads(messages)
    else:
        prompt = str(record.get(columns.prompt) or "").strip()
        instruction = str(record.get(columns.instruction) or "").strip() if columns.instruction else ""
        user = f"{instruction}\n\n{prompt}" if instruction and prompt else (instruction or prompt)
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": str(record.get(columns.response) or "").strip()}]
    return {"messages": messages, "task": str(record.get("task") or "custom"), "source": where,
            "lang": str(record.get(columns.lang) or "") if columns.lang else str(record.get("lang") or "")}


def read_table_conversations(source: Source, columns: ColumnMap = ColumnMap(), limit: int | None = None,
                             strict: bool = False) -> tuple[list[dict], list[str]]:
    """The conversations of a table (a data file or a hub dataset), at most limit, and the problems.

    Rows whose language is not in columns.keep_langs are skipped silently (a filter, not a problem).
    """
    if not source.reads_with_datasets:
        raise SourceError(f"{source.location}: unknown file type {source.path.suffix!r} for instruction data; give "
                          f".jsonl or .csv (columns instruction, input, target), .parquet, .arrow, a save_to_disk "
                          f"folder or --hf")
    dataset = open_dataset(source)
    columns = choose_columns(column_names(dataset), columns, source)
    keep = {lang.lower() for lang in columns.keep_langs}

    def make_row(record, where):
        if keep and str(record.get(columns.lang) or "").lower() not in keep:
            return None, None
        try:
            row = record_to_conversation(record, columns, where)
        except (ValueError, TypeError) as error:  # a messages column holding text that is not JSON
            return None, f"cannot read the messages ({error})"
        return as_conversation(row, where)

    return collect_rows(dataset_records(source, dataset), make_row, SFTSourceError, strict, limit=limit)


# ---- conversations and choosing rows ------------------------------------------------------------------------
def prompt_and_answer(row: dict) -> tuple[list[dict], str]:
    """The messages before the last assistant turn, and that turn's text (the reference)."""
    messages = row["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def jsonl_text(rows: Iterable[dict]) -> str:
    """Rows as JSON lines, the format every reader here reads (UTF-8 kept as it is)."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def evenly_spaced(rows: list, limit: int | None) -> list:
    """At most limit rows spread over the whole list (sources are often sorted by label)."""
    return rows if limit is None or len(rows) <= limit else [rows[i * len(rows) // limit] for i in range(limit)]


def by_task_and_lang(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows grouped by (task, lang) as strings ("" when absent), in order of first appearance."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((str(row.get("task", "")), str(row.get("lang", ""))), []).append(row)
    return groups


def cap_per_task(rows: list[dict], cap: int | None) -> list[dict]:
    """At most cap rows per (task, lang), evenly spaced, so large sources do not drown small ones."""
    if cap is None:
        return rows
    return [row for group in by_task_and_lang(rows).values() for row in evenly_spaced(group, cap)]
