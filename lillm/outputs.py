"""Writing result files next to a user's own files without ever clobbering them.

A report folder (a checkpoint, a run folder) is shared with the user, who may keep a file of the
same name there: their own `submission_test.csv`, say. So lillm records what it writes in a small
manifest, `.lillm-written.json` (file name -> SHA-256 of the bytes written), and replaces a file
only when it is absent or still exactly what lillm wrote last time. A file lillm did not write, or
one edited since, is refused with a message that names it and the way out. Every write goes to a
temporary name first and is renamed into place (lillm.folders.write_text_atomic), so a reader
sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .folders import write_text_atomic
from .errors import OutputConflict

__all__ = ["MANIFEST", "OutputConflict", "check_writable", "write_outputs"]

MANIFEST = ".lillm-written.json"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest(folder: Path) -> dict[str, str]:
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # an unreadable manifest vouches for nothing: every existing file is then protected
    return manifest if isinstance(manifest, dict) else {}


def check_writable(paths: list[Path]) -> None:
    """Raise OutputConflict naming the first path that exists and is not lillm's unchanged output."""
    for path in map(Path, paths):
        if path.parent.exists() and not path.parent.is_dir():
            raise OutputConflict(f"--out {path.parent} is a file, not a folder; choose a folder for the results")
        if not path.exists():
            continue
        recorded = _manifest(path.parent).get(path.name)
        if path.is_dir() or recorded is None or recorded != _digest(path.read_bytes()):
            raise OutputConflict(f"{path} exists and was not written by lillm (or was changed since); "
                                 "move it away or choose another --out folder")


def write_outputs(files: dict[Path, str]) -> list[Path]:
    """Write text files atomically, after checking all of them (so a conflict writes nothing)."""
    files = {Path(p): text for p, text in files.items()}
    check_writable(list(files))
    written = []
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        data = text.encode("utf-8")
        manifest = _manifest(path.parent)
        write_text_atomic(path, text)
        manifest[path.name] = _digest(data)
        write_text_atomic(path.parent / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        written.append(path)
    return written
