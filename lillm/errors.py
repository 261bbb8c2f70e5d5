"""lillm's own errors: bad input that a user can fix, as opposed to bugs.

Every error a user can cause (a wrong flag, a file in the wrong format, a checkpoint that does not
fit) is raised as a subclass of `LillmError`, with a message that names what is wrong, where (the
file, line, key or flag) and the fix. The scripts print such an error as one line and exit with
status 2; any other exception is a bug and keeps its traceback. This module imports nothing from
lillm, so every module can raise these errors without bending the import graph.
"""
from __future__ import annotations

import json
from pathlib import Path


class LillmError(ValueError):
    """Bad input: the message says what is wrong, where, and how to fix it."""


def read_json_file(path: str | Path, error: type[LillmError], fix: str = ""):
    """The JSON value a file holds; a file that is not JSON (or not UTF-8) is one line of `error`,
    ending in the fix. Whether the file exists is the caller's check (its message knows the file's role)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise error(f"{path} is not valid JSON ({problem})" + (f"; {fix}" if fix else "")) from None


# ---- data ----------------------------------------------------------------------------------------
class CorpusFormatError(LillmError):
    """A corpus file does not look like its declared format."""


class BinFormatError(LillmError):
    """A token bin that does not agree with its meta.json, the tokenizer or the model."""


class MissingMetaError(LillmError, FileNotFoundError):
    """A token bin folder without meta.json: its tokenizer, dtype and sizes are unknown."""


class SFTDataError(LillmError):
    """A conversation file, or a row in it, that cannot be trained on."""


class EmptyCorpusError(LillmError):
    """A source that gives no document once empty and duplicate ones are dropped."""


class SFTSourceError(LillmError):
    """A source of conversations (a challenge task file, a user's table or row) without the columns,
    alignment or values it needs."""


class DPODataError(LillmError):
    """A preference-pair file, or a row in it, that cannot be trained on."""


# ---- tokenizers ----------------------------------------------------------------------------------
class TokenizerFileError(LillmError):
    """A tokenizer.json that cannot be read or parsed."""


class TokenizerTrainingError(LillmError):
    """A corpus or a vocabulary size a tokenizer cannot be trained with."""


class ChatTemplateError(LillmError):
    """Messages that do not fit the chat template, or a tokenizer without role tokens."""


# ---- checkpoints and interop ---------------------------------------------------------------------
class CheckpointError(LillmError):
    """A checkpoint folder that cannot be used, with the reason and the fix in the message."""


class HFError(CheckpointError):
    """A Hugging Face folder lillm cannot import or export, with the reason and the fix."""


class HFFileNotFoundError(HFError, FileNotFoundError):
    """A file the folder needs (config.json, a weight shard) is missing."""


# ---- changing models -----------------------------------------------------------------------------
class PruneError(LillmError):
    """Index sets or shapes that cannot make a consistent model, with the reason and the fix."""


class VocabShrinkError(LillmError):
    """A tokenizer, target size or model that cannot be shrunk, with the reason and the fix."""


class VocabExpansionError(LillmError):
    """A base tokenizer or model that cannot be expanded, with the reason and the fix."""


class PeftError(LillmError):
    """A PEFT option, adapter folder or model that does not fit, with the fix in the message."""


class DistillationError(LillmError):
    """Settings or models that cannot be distilled, with the reason and the fix."""


class GGUFExportError(LillmError):
    """A checkpoint or option that cannot be exported to GGUF, with the reason and the fix."""


# ---- training ------------------------------------------------------------------------------------
class TrainingDiverged(LillmError, RuntimeError):
    """Too many non-finite steps in a row: the run stopped at its last good checkpoint."""


# ---- flags, files and output folders -------------------------------------------------------------
class FlagError(LillmError):
    """A command-line value that cannot work (a zero batch, a negative step count, an unknown device)."""


class InputFileError(LillmError, FileNotFoundError):
    """A path the user gave that is missing, or a folder where a file is expected (or the reverse)."""


class InputEncodingError(LillmError):
    """A file lillm reads whole (a challenge table) with bytes that are not UTF-8; the message names the line."""


class OutputFolderError(LillmError):
    """An output folder lillm may not write: it holds a user's files, or a run that was not meant to be replaced."""


class RunLockedError(OutputFolderError):
    """A run folder another process is writing (its lock file names the holder)."""


class TokenizerMismatchError(LillmError):
    """A tokenizer that is not the one the model or the token bins were made with."""


# ---- corpus sources --------------------------------------------------------------------------------
class SourceError(LillmError):
    """A corpus source (a file, a folder, a Hugging Face dataset, a --mix weight) that cannot be read as given."""


class HubUnavailableError(SourceError, ConnectionError):
    """A Hugging Face hub dataset that cannot be reached: offline, gated without a token, or not found."""


# ---- evaluation and outputs ----------------------------------------------------------------------
class RequestError(LillmError):
    """A request the chat server refuses, with the HTTP status and the OpenAI error fields."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.kind, self.code = param, status, kind, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


class SubmissionError(LillmError):
    """A challenge submission file (ID, Response, Targets) that cannot be scored; the message names the row."""


class OutputConflict(OutputFolderError):
    """An output path holds a file lillm did not write (or one changed since); nothing was written."""
