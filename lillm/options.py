"""Declare a setting once: a dataclass field carries its command-line flag, help, choices and check.

A training option used to live in four places (the config dataclass, the flag, the copy from the
flags into the dataclass, and the check of the flag's value), which drift apart. Here the field of
the dataclass is the one declaration: `option(default, help=..., check=...)` records what the
flag needs in the field's metadata, `add_flags` builds the argparse flags from the fields,
`check_flags` refuses a bad value naming its flag, and `from_flags` builds the dataclass back from
the parsed flags. litgpt builds its whole CLI from dataclass signatures the same way; this is the
small version of that idea. A field without a flag (no `help`) is set by code, never by a flag.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, Field, field, fields
from typing import Any, Callable

from .errors import FlagError

Check = tuple[Callable[[Any], bool], str]   # (is the value fine?, the rule a refusal states)


class Number:
    """The argparse type of a numeric flag, declaring its range where the flag is declared:
    number(1) is an int of at least 1, number(0, 1, float, below=True) a float in [0, 1). The
    parser checks every parsed value (defaults too) against it: one check for every number of every
    script, with the message `need` gives ("--workers -1: must be at least 1")."""

    def __init__(self, low=None, high=None, kind=int, above: bool = False, below: bool = False,
                 rule: str = "", fix: str = "", check: "Check | None" = None):
        self.low, self.high, self.kind, self.above, self.below, self.fix = low, high, kind, above, below, fix
        self.check = check  # a dataclass field's own (test, rule), from option(): used instead of low/high
        self.__name__ = kind.__name__  # argparse names the type in "invalid int value: 'x'"
        self.rule = rule or (check[1] if check else self.default_rule())

    def default_rule(self) -> str:
        low, high = self.low, self.high
        if low is None and high is None:
            return "any value"
        if high is None:
            return "must be positive" if self.above and low == 0 else \
                f"must be above {low}" if self.above else "must be 0 or more" if low == 0 else f"must be at least {low}"
        if not (self.above or self.below):
            return f"must be between {low} and {high}"
        return f"must be in {'(' if self.above else '['}{low}, {high}{')' if self.below else ']'}"

    def __call__(self, text: str):
        return self.kind(text)

    def allows(self, value) -> bool:
        if self.kind is float and not math.isfinite(value):
            return False
        if self.check is not None:
            return bool(self.check[0](value))
        low_ok = self.low is None or (value > self.low if self.above else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.below else value <= self.high)
        return low_ok and high_ok and (self.kind is not float or math.isfinite(value))


number = Number


def option(default, help: str, flag: str | None = None, choices=None, check: Check | None = None) -> Field:
    """A dataclass field that is also a flag (`--name-with-dashes` unless `flag` names it)."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "check": check})


def at_least(low) -> Check:
    return (lambda value: value >= low), f"must be at least {low}" if low else "must be 0 or more"


def positive() -> Check:
    return (lambda value: value > 0), "must be positive"


def between(low, high) -> Check:
    return (lambda value: low <= value <= high), f"must be between {low} and {high}"


def flag_fields(cls) -> list[Field]:
    return [f for f in fields(cls) if f.metadata.get("help")]


def flag_name(f: Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def dest(f: Field) -> str:
    """The attribute of the parsed arguments that holds the field's value."""
    return flag_name(f).removeprefix("--").replace("-", "_")


def add_flags(group, cls, defaults: dict | None = None, checks: dict[str, Check] | None = None) -> None:
    """One flag per field of `cls` declared with option(); `defaults` (by dest) overrides a default and
    `checks` (by field name) a check. A number's flag takes its field's check as its type (Number), so
    the parser (lillm.cli.ArgumentParser) refuses a bad value with every other script's numbers."""
    defaults, checks = defaults or {}, checks or {}
    for f in flag_fields(cls):
        default = defaults.get(dest(f), f.default if f.default is not MISSING else None)
        if isinstance(f.default, bool):
            group.add_argument(flag_name(f), action="store_true", help=f.metadata["help"])
            continue
        kind = type(f.default) if f.default is not None else None
        if kind in (int, float):
            kind = Number(kind=kind, check=checks.get(f.name, f.metadata["check"]))
        group.add_argument(flag_name(f), type=kind, default=default, choices=f.metadata["choices"],
                           help=f.metadata["help"])


def check_flags(cls, args: argparse.Namespace, checks: dict[str, Check] | None = None) -> None:
    """Refuse the first flag whose value breaks its field's check (`checks` replaces one by field name)."""
    checks = checks or {}
    for f in flag_fields(cls):
        check = checks.get(f.name, f.metadata["check"])
        value = getattr(args, dest(f))
        if check is not None and value is not None and not check[0](value):
            raise FlagError(f"{flag_name(f)} {value}: {check[1]}")


def from_flags(cls, args: argparse.Namespace, **values):
    """The dataclass from the parsed flags; `values` sets the fields that have no flag."""
    given = {f.name: getattr(args, dest(f)) for f in flag_fields(cls) if hasattr(args, dest(f))}
    return cls(**given, **values)
