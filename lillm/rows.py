"""Rows: the records a user's files hold, before any tokenizer sees them.

Every stage after pretraining reads rows: SFT conversations ({"messages": [...], "task", "lang",
...}), preference pairs (a prompt, a chosen and a rejected answer), instruction tables, the
challenge's task files. This module holds what they share: reading CSV tables, rendering an
instruction and its input as one user turn (plainly, or in the Alpaca prompt of Taori et al.,
2023), splitting a conversation into its prompt and the reference answer, and choosing rows
evenly per (task, language), so a source sorted by label keeps every label when it is cut.
"""
from __future__ import annotations

import csv
from pathlib import Path

from .errors import InputFileError, SFTSourceError

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


# ---- tables ---------------------------------------------------------------------------------------
def read_csv_rows(path: Path, delimiter: str = ",", hint: str = "see docs/DATA.md") -> list[dict]:
    """Every row of a CSV (or, with delimiter "\\t", TSV) file with a header, as dicts."""
    if not path.is_file():
        raise InputFileError(f"{path} not found; {hint}")
    csv.field_size_limit(2**31 - 1)  # news articles and long tweets exceed csv's default 128 KiB field
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


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
