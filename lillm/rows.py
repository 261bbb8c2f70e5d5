"""Rows: the records a user's files hold, before any tokenizer sees them.

Every stage after pretraining reads rows: SFT conversations ({"messages": [...], "task", "lang",
...}), preference pairs (a prompt, a chosen and a rejected answer), instruction tables, the
challenge's task files. This module holds what they share: reading JSON-lines and CSV files row by
row, where a byte that is not UTF-8 or a line that is not JSON costs its own row, named by file and
line, never the whole file (json_lines, csv_records); rendering an
instruction and its input as one user turn (plainly, or in the Alpaca prompt of Taori et al.,
2023), splitting a conversation into its prompt and the reference answer, and choosing rows
evenly per (task, language), so a source sorted by label keeps every label when it is cut.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Iterator

from .errors import InputEncodingError, InputFileError, SFTSourceError

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


# ---- reading rows: a bad byte or a bad line costs its row, named -------------------------------------
NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a byte that is not UTF-8


def read_text(path: Path) -> str:
    """A file's text, with every byte that is not UTF-8 kept as a marker (surrogateescape) for
    `undecodable` to name, instead of a UnicodeDecodeError for the whole file."""
    return Path(path).read_bytes().decode("utf-8-sig", errors="surrogateescape")


def undecodable(text: str) -> str | None:
    """What is wrong with text read by read_text, when it held bytes that are not UTF-8; else None."""
    found = NOT_UTF8.search(text)
    if found is None:
        return None
    return f"not UTF-8 (byte {ord(found[0]) - 0xDC00:#04x} at column {found.start() + 1})"


def json_lines(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """(line number, parsed value, problem) for every non-blank line of a JSON-lines file; the problem
    (not UTF-8, not JSON) is None for a good line, and the value None for a bad one."""
    with open(path, "rb") as f:  # decoded line by line: one bad byte costs its row, not the file
        for number, raw in enumerate(f, start=1):
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8", errors="surrogateescape")
            if not line.strip():
                continue
            problem = undecodable(line)
            if problem is not None:
                yield number, None, problem
                continue
            try:
                yield number, json.loads(line), None
            except json.JSONDecodeError as error:
                yield number, None, f"not valid JSON ({error.msg} at column {error.colno})"


def csv_records(path: Path, delimiter: str = ",") -> Iterator[tuple[int, dict, str | None]]:
    """(line number, record, problem) for every row of a CSV (or TSV) file with a header; the problem
    names a field that held bytes that are not UTF-8 (None for a good row)."""
    csv.field_size_limit(2**31 - 1)  # news articles and long tweets exceed csv's default 128 KiB field
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    for record in reader:
        bad = next(((key, problem) for key, value in record.items()
                    if (problem := undecodable(f"{key}{value}")) is not None), None)
        yield reader.line_num, record, None if bad is None else f"column {bad[0]!r}: {bad[1]}"


# ---- tables ---------------------------------------------------------------------------------------
def read_csv_rows(path: Path, delimiter: str = ",", hint: str = "see docs/DATA.md") -> list[dict]:
    """Every row of a CSV (or, with delimiter "\\t", TSV) file with a header, as dicts; a row that is
    not UTF-8 is refused in one line that names it."""
    if not path.is_file():
        raise InputFileError(f"{path} not found; {hint}")
    rows = []
    for number, record, problem in csv_records(path, delimiter):
        if problem is not None:
            raise InputEncodingError(f"{path}, line {number}: {problem}; save the file as UTF-8")
        rows.append(record)
    return rows


def need_columns(rows: list[dict], path: Path, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if rows and c not in rows[0]]
    if missing:
        raise SFTSourceError(f"{path} has no column(s) {missing}; its columns are {list(rows[0])}")


# ---- conversations ----------------------------------------------------------------------------------
def render_user(instruction: str, text: str, alpaca: bool) -> str:
    """One user turn from an instruction and its input (which may be empty)."""
    if alpaca:
        template = ALPACA if text else ALPACA_NO_INPUT
        return template.format(instruction=instruction, input=text)
    return f"{instruction}\n\n{text}" if text else instruction


def prompt_and_answer(row: dict) -> tuple[list[dict], str]:
    """The messages before the last assistant turn, and that turn's text (the reference)."""
    messages = row["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


# ---- choosing rows ----------------------------------------------------------------------------------
def evenly_spaced(rows: list, limit: int | None) -> list:
    """At most limit rows spread over the whole list (sources are often sorted by label)."""
    return rows if limit is None or len(rows) <= limit else [rows[i * len(rows) // limit] for i in range(limit)]


def by_task_and_lang(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows grouped by (task, lang) as strings ("" when absent), in order of first appearance."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((str(row.get("task", "")), str(row.get("lang", ""))), []).append(row)
    return groups
