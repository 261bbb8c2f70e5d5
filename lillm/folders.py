"""Outputs that never lose a user's file: folder kinds, refusals, single files, reports, a run lock.

lillm writes folders of a few kinds (a checkpoint, a training run, token bins, a Hugging Face
export, the SFT and DPO data folders, a pruning experiment) and a few single files (a tokenizer,
its report, a GGUF file). Every script that writes goes through this module; the rule it follows:

1. A folder that does not exist, or is empty, is simply used.
2. A folder that exists and holds files is refused, by name, unless it is a lillm folder of the
   same kind (marked by `lillm-folder.json`, or recognised by the files lillm writes there) AND
   the user said `--overwrite` (or `--resume` for a run). A folder of someone else's files is
   never written into. An output that is, contains or lies inside anything the command reads
   (`reads`: the model, the data, the tokenizer) is refused, whatever its kind.
3. Even then only lillm's own files are touched: a run's `step_N/`, `log.jsonl` and `loss.png`;
   a checkpoint folder is swapped whole only when it holds nothing but lillm's files.
4. Deleting goes through a rename to a hidden name first (`.step_000200.trash-<pid>`), then the
   removal, so a kill half-way leaves a hidden leftover (swept later), never a half-deleted
   folder under a name that readers list. Writing is the mirror image: a hidden tmp, then a rename.
5. A single file (check_output_file) is written only where no file is, or over a file of the
   same kind (a GGUF file over a GGUF file, a tokenizer over a tokenizer) with `--overwrite`; never
   into a lillm folder, never over a file the command reads. Files are created with the mode the
   user's umask gives (new_file), as `open` would, not the 0600 of `tempfile.mkstemp`.
6. A refused or failed write undoes its own claim (claimed_output): a folder it created is
   removed again when it holds nothing but lillm's marker, so the corrected command is not refused.
7. A run folder holds a lock file created with O_CREAT | O_EXCL (atomic on POSIX), holding the
   pid and host of the writer. A second writer is refused with the holder named; a lock left by a
   process that is gone (same host, pid not running) is taken over with a message.
8. Reports written into a folder the user shares (scripts/evaluate.py's eval_<split>.md, its
   predictions and submission file, in a checkpoint or any --out folder, where the user may keep
   their own `submission_test.csv`) are recorded in a small manifest, `.lillm-written.json` (file
   name -> SHA-256 of the bytes written); a report replaces a file only when it is absent or still
   exactly what lillm wrote last time (write_reports). All of them are checked before any is written.

This is the "write to a temporary name, then rename" discipline of databases and package
managers, applied to whole folders; see also the minimind checkpoint pattern in checkpoint.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .errors import OutputConflict, OutputFolderError, RunLockedError

MARKER = "lillm-folder.json"
LOCK = "lillm.lock"
STEP = re.compile(r"step_\d+")
HIDDEN_LEFTOVER = re.compile(r"\..+\.(tmp|trash-\d+|replaced-\d+)(\.png)?")

# The files lillm itself writes in each kind of folder (besides the marker and the lock).
OWN_FILES = {
    "checkpoint": {"config.json", "model.safetensors", "tokenizer.json", "train_state.pt", "lillm.json", "peft.json",
                   "shrink_report.json", "shrink_report.md"},
    "export": {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json"},
    "run": {"log.jsonl", "loss.png", "loss.tmp.png", "train.bin", "tokenizer.json", "best", "best.json"},
    "bins": {"train.bin", "val.bin", "meta.json"},
    "sft-data": {"train.jsonl", "dev.jsonl", "test.jsonl", "stats.json"},
    "dpo-data": {"train.jsonl", "dev.jsonl", "stats.json"},
    "experiment": {"results.json", "results.md"},  # scripts/prune_experiment.py; its arms are run folders
}
SHARD = re.compile(r"(train|val)-\d{5}\.bin")
# With the step_N folders, what --overwrite removes from a run (best/: the checkpoint kept by --keep-best).
RUN_OUTPUTS = ("log.jsonl", "loss.png", "best", "best.json")


def is_own(name: str, kind: str) -> bool:
    if name in (MARKER, LOCK) or HIDDEN_LEFTOVER.fullmatch(name):
        return True
    if kind == "checkpoint" and re.fullmatch(r"eval_\w+\.(json|md)", name):  # scripts/evaluate.py's reports
        return True
    if kind == "bins" and SHARD.fullmatch(name):   # lillm/bins.py's shards: train-00000.bin, ...
        return True
    if kind == "experiment" and re.fullmatch(r"\w+_(ce|kd)|teacher", name):  # the experiment's run folders
        return True
    return name in OWN_FILES[kind] or (kind == "run" and bool(STEP.fullmatch(name)))


def folder_kind(folder: str | Path) -> str | None:
    """The kind of lillm folder this is ('checkpoint', 'run', 'bins', 'export', 'sft-data', ...), or None.

    The marker says it; folders written before markers existed are recognised by their files."""
    folder = Path(folder)
    try:
        return json.loads((folder / MARKER).read_text())["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if {"config.json", "model.safetensors", "lillm.json"} <= names:
        return "checkpoint"
    if {"config.json", "model.safetensors", "generation_config.json"} <= names:
        return "export"
    if "log.jsonl" in names or any(STEP.fullmatch(n) and (folder / n).is_dir() for n in names):
        return "run"
    if "meta.json" in names and ("train.bin" in names or "train-00000.bin" in names):
        return "bins"
    if {"train.jsonl", "stats.json"} <= names:
        return "sft-data"
    return None


def listing(folder: Path, names: list[str] | None = None, limit: int = 5) -> str:
    names = sorted(names if names is not None else (p.name for p in folder.iterdir()))
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def is_empty(folder: Path) -> bool:
    """Missing, or holding nothing but lillm's lock and hidden leftovers."""
    if not folder.exists():
        return True
    return folder.is_dir() and all(p.name == LOCK or HIDDEN_LEFTOVER.fullmatch(p.name) for p in folder.iterdir())


def check_output(folder: str | Path, kind: str, overwrite: bool = False, resume: bool = False,
                 flag: str = "--out", reads: dict | None = None) -> bool:
    """Refuse to write a `kind` folder at `folder` unless rule 2 of the module docstring allows it.

    `reads` maps the flags of what the command reads to their paths ({"--data": ..., "--init-from":
    ...}; None values are skipped): an output that is, holds or sits inside one of them is refused.
    Returns True when the folder already holds a lillm folder of this kind (to be continued or
    overwritten), False when it is new or empty."""
    folder = Path(folder)
    check_apart(folder, reads, flag)
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"{flag} {folder} is a file, not a folder; choose a folder path for {flag}")
    if is_empty(folder):
        return False
    found = folder_kind(folder)
    if found != kind:
        what = f"a lillm {found} folder" if found else f"files lillm did not write ({listing(folder)})"
        raise OutputFolderError(f"{flag} {folder} already exists and holds {what}; lillm writes its {kind} "
                                f"folder only into a new or empty folder or an earlier {kind} folder of its own: "
                                f"choose another {flag}")
    if not (overwrite or resume):
        again = "--resume to continue it or --overwrite" if kind == "run" else "--overwrite"
        raise OutputFolderError(f"{flag} {folder} already holds a lillm {kind} folder; pass {again} to replace "
                                f"lillm's files in it (other files are kept), or choose another {flag}")
    return True


def check_not_inside(out: str | Path, source: str | Path, out_flag: str = "--out", source_flag: str = "the source"):
    """Refuse an output that is the source, one of its ancestors (replacing it would delete the source)
    or a path inside it (writing there would change what is being read)."""
    out, source = Path(out).resolve(), Path(source).resolve()
    if out == source or out in source.parents:
        raise OutputFolderError(f"{out_flag} {out} contains {source_flag} {source}: writing there would replace "
                                f"what is being read; choose an {out_flag} outside it")
    if source in out.parents:
        raise OutputFolderError(f"{out_flag} {out} is inside {source_flag} {source}: writing there would change "
                                f"what is being read; choose an {out_flag} outside it")


def check_apart(out: str | Path, reads: dict | None, out_flag: str = "--out") -> None:
    """check_not_inside for every path the command reads ({flag: path or list of paths}; None values and
    remote hf:// patterns skipped)."""
    for source_flag, sources in (reads or {}).items():
        for source in sources if isinstance(sources, (list, tuple)) else [sources]:
            if source is not None and str(source) and not str(source).startswith("hf:/"):
                check_not_inside(out, source, out_flag, source_flag)


def mark(folder: str | Path, kind: str) -> None:
    """Write the marker that says what kind of lillm folder this is (kept when already there)."""
    path = Path(folder) / MARKER
    if folder_kind(folder) == kind and path.exists():
        return
    write_text_atomic(path, json.dumps({"kind": kind, "written_by": "lillm"}) + "\n")


# ---- single files: written through a hidden temporary name, with the user's umask -----------------
def new_file(final: str | Path) -> Path:
    """A new, empty hidden file beside `final` (`.<name>.<random>.tmp`) to write and then rename.

    Created with mode 0666 minus the umask, as open() would: tempfile.mkstemp's 0600 would make every
    file lillm writes unreadable to the user's group, against what their umask asks for."""
    final = Path(final)
    while True:
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


def write_file_atomic(final: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a new_file beside `final`, fsync it, rename it to `final`: readers see the old
    file or the new one, never half; a failure removes the temporary file."""
    final = Path(final)
    tmp = new_file(final)
    mode = tmp.stat().st_mode & 0o777  # what the umask gives; kept even if `write` replaces the file
    try:
        write(tmp)
        os.chmod(tmp, mode)  # safetensors, for one, writes a new file of mode 0600 over the one given
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def write_text_atomic(path: str | Path, text: str) -> Path:
    """A text file (UTF-8) through write_file_atomic."""
    return write_file_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _json_keys(path: Path, keys: set[str]) -> bool:
    try:
        data = json.loads(path.read_bytes()[:50_000_000])
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and keys <= set(data)


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


# The single files lillm writes, each recognised by its content, so that --overwrite replaces a file of
# the same kind only (a GGUF file by a GGUF file), never a user's file that happens to have the name.
FILE_KINDS: dict[str, tuple[str, Callable[[Path], bool]]] = {
    "gguf": ("GGUF file", lambda path: _starts_with(path, b"GGUF")),
    "tokenizer": ("tokenizer.json", lambda path: _json_keys(path, {"model", "added_tokens"})),
    "tokenizer-report": ("tokenizer report", lambda path: _json_keys(path, {"sha256", "languages"})),
}


def check_output_file(path: str | Path, kind: str, overwrite: bool = False, flag: str = "--out",
                      reads: dict | None = None, fix: str = "") -> bool:
    """Refuse to write a `kind` file at `path` unless rule 5 of the module docstring allows it; True when
    a file of that kind is there to be replaced."""
    path, (what, recognise) = Path(path), FILE_KINDS[kind]
    check_apart(path, reads, flag)
    if path.is_dir():
        raise OutputFolderError(f"{flag} {path} is a folder; give the path of the {what} to write"
                                + (f", e.g. {path / fix}" if fix else ""))
    holder = folder_kind(path.parent) if path.parent.is_dir() else None
    if holder is not None:
        raise OutputFolderError(f"{flag} {path} is inside a lillm {holder} folder ({path.parent}), which holds only "
                                f"lillm's own files of that kind; choose a {flag} outside it")
    if not path.exists():
        return False
    if not recognise(path):
        raise OutputFolderError(f"{flag} {path} already exists and is not a {what}; lillm replaces only a file of "
                                f"its own kind: choose another {flag}")
    if not overwrite:
        raise OutputFolderError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose another "
                                f"{flag}")
    return True


# ---- reports beside a user's own files -----------------------------------------------------------
MANIFEST = ".lillm-written.json"  # report file name -> SHA-256 of the bytes lillm wrote


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


def write_reports(files: dict[Path, str]) -> list[Path]:
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


# ---- deleting and replacing, through hidden names ------------------------------------------------
def discard(path: str | Path) -> None:
    """Delete a file or folder lillm wrote: rename it to a hidden name first, so that a kill during the
    removal leaves a hidden leftover, never a half-deleted folder under its listed name."""
    path = Path(path)
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}")
    os.replace(path, trash)
    remove_hidden(trash)


def remove_hidden(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def sweep_leftovers(folder: str | Path) -> None:
    """Remove the hidden trash a killed deletion left behind (never a visible name)."""
    folder = Path(folder)
    if folder.is_dir():
        for path in folder.iterdir():
            if re.fullmatch(r"\..+\.trash-\d+", path.name):
                remove_hidden(path)


def check_replaceable(final: str | Path, kind: str, overwrite: bool = False) -> bool:
    """check_output for a folder written whole (a checkpoint, an export), plus: an existing one must hold
    only lillm's files, since replacing the folder replaces everything in it. True when it exists."""
    final = Path(final)
    if not check_output(final, kind, overwrite=overwrite):
        return False
    foreign = [p.name for p in final.iterdir() if not is_own(p.name, kind)]
    if foreign:
        raise OutputFolderError(f"--out {final} holds files lillm did not write ({listing(final, foreign)}); "
                                "they would be lost when the folder is replaced: move them out, or choose "
                                "another --out")
    return True


def publish_folder(tmp: Path, final: Path, kind: str, overwrite: bool = False) -> None:
    """Move a finished hidden tmp folder to `final`. An existing `final` must pass check_replaceable; it is
    swapped out through a hidden name, so a kill between the renames leaves it recoverable
    (checkpoint._recover puts it back)."""
    try:
        exists = check_replaceable(final, kind, overwrite)
    except OutputFolderError:
        remove_hidden(tmp)
        raise
    if exists:
        old = final.with_name(f".{final.name}.replaced-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        remove_hidden(old)
    else:
        if final.is_dir():  # new and empty: rmdir only succeeds on an empty folder, so nothing is lost
            for leftover in final.iterdir():  # only lillm's lock or hidden leftovers (is_empty)
                remove_hidden(leftover)
            final.rmdir()
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)


def hidden_tmp(final: Path) -> Path:
    """The hidden folder a `final` folder is written in before its rename; a leftover is lillm's own."""
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        remove_hidden(tmp)  # an interrupted write of ours: never complete, safe to drop
    tmp.mkdir(parents=True)
    return tmp


# ---- the run lock --------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock file in a run folder: {"pid", "host", "since"} of the one process writing it."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK
        self.held = False

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict | None) -> bool:
        if holder is None:  # a writer killed between creating and filling the file, or one filling it now
            try:
                return time.time() - self.path.stat().st_mtime > 10
            except FileNotFoundError:
                return True
        return holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", -1)))

    def acquire(self) -> "RunLock":
        for _ in range(3):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if not self._stale(holder):
                    who = f"pid {holder['pid']} on host {holder['host']}" if holder else "a process starting now"
                    raise RunLockedError(
                        f"run folder {self.path.parent} is being written by {who} (lock file {self.path}); "
                        "wait for that run to finish or stop it, or choose another --out; if that process is "
                        "gone for good (e.g. on another machine), delete the lock file") from None
                who = f"pid {holder['pid']} on {holder['host']}" if holder else "an unfinished lock"
                print(f"taking over the lock {self.path}: {who} is no longer running", file=sys.stderr)
                stale = self.path.with_name(f".{LOCK}.trash-{os.getpid()}")
                try:
                    os.replace(self.path, stale)
                except FileNotFoundError:
                    continue  # someone else took it over first: try again
                remove_hidden(stale)
                continue
            with os.fdopen(handle, "w") as f:
                f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise RunLockedError(f"could not take the lock {self.path}: other processes keep taking it; "
                             "run one writer per --out")

    def release(self) -> None:
        if self.held:
            holder = self.holder()
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def has_run(folder: Path) -> bool:
    """Whether a run folder holds the outputs of a run (checkpoints or a log), not just its marker."""
    return folder.is_dir() and any(STEP.fullmatch(p.name) or p.name == "log.jsonl" for p in folder.iterdir())


def check_run_folder(folder: str | Path, resume: bool = False, overwrite: bool = False,
                     reads: dict | None = None, flag: str = "--out") -> None:
    """Early refusal (before any work) of a --out that training may not write: see open_run_folder.
    `reads`: what the command reads (check_output), e.g. {"--init-from": ..., "--data": ...}."""
    folder = Path(folder)
    if resume and overwrite:
        raise OutputFolderError("--resume continues the run in --out and --overwrite starts it again: pass one")
    if check_output(folder, "run", overwrite=True, resume=True, reads=reads, flag=flag) and has_run(folder) and not (resume or overwrite):
        steps = sorted(p.name for p in folder.iterdir() if STEP.fullmatch(p.name))
        held = f"checkpoints up to {steps[-1]}" if steps else "a log.jsonl"
        raise OutputFolderError(f"--out {folder} already holds a run ({held}); pass --resume to continue it, "
                                "--overwrite to start again (removes its step_N folders, log.jsonl and loss.png, "
                                "nothing else), or choose another --out")


def open_run_folder(folder: str | Path, resume: bool = False, overwrite: bool = False) -> RunLock:
    """Check, create, lock and mark a run folder; with overwrite (and no resume) remove the old run's
    own outputs. Returns the held lock: release it when the run ends."""
    folder = Path(folder)
    check_run_folder(folder, resume, overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    lock = RunLock(folder).acquire()
    try:
        check_run_folder(folder, resume, overwrite)  # again under the lock: another run may have just finished
        sweep_leftovers(folder)
        if overwrite and not resume:
            for path in sorted(folder.iterdir()):
                if STEP.fullmatch(path.name) or path.name in RUN_OUTPUTS:
                    discard(path)
        mark(folder, "run")
    except BaseException:
        lock.release()
        raise
    return lock


def claim_output(folder: str | Path, kind: str, overwrite: bool = False, flag: str = "--out",
                 reads: dict | None = None) -> Path:
    """For writers that put their files into the folder one by one (token bins, SFT data): check the
    folder, create it and mark it. Their files replace only lillm's own files of the same names."""
    folder = Path(folder)
    check_output(folder, kind, overwrite=overwrite, flag=flag, reads=reads)
    folder.mkdir(parents=True, exist_ok=True)
    mark(folder, kind)
    return folder


@contextmanager
def claimed_output(folder: str | Path, kind: str, overwrite: bool = False, flag: str = "--out",
                   reads: dict | None = None):
    """claim_output for the length of a `with` block; when the block fails, a folder the claim created
    (or found empty) is removed again if it holds nothing but lillm's marker and hidden leftovers, so a
    refused input leaves no marked folder that would refuse the corrected command."""
    folder = Path(folder)
    fresh = is_empty(folder)
    existing = folder  # the nearest folder that is there before the claim: nothing above it is removed
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    claim_output(folder, kind, overwrite=overwrite, flag=flag, reads=reads)
    try:
        yield folder
    except BaseException:
        if fresh and folder.is_dir() and all(p.name == MARKER or HIDDEN_LEFTOVER.fullmatch(p.name)
                                             for p in folder.iterdir()):
            (folder / MARKER).unlink(missing_ok=True)
            if folder != existing:
                for leftover in folder.iterdir():
                    remove_hidden(leftover)
                for created in (folder, *folder.parents):
                    if created == existing or any(created.iterdir()):
                        break
                    created.rmdir()
        raise
