"""Opening data through Hugging Face `datasets`: hub datasets, hf:// files, save_to_disk folders.

`datasets` (Lhoest et al., 2021, "Datasets: A Community Library for NLP") streams a hub dataset's
rows over HTTP as they are read (`streaming=True`), so nothing is downloaded whole, and reads a
save_to_disk folder as memory-mapped Arrow. lillm.sources names a source; this module opens the
ones `datasets` reads, and makes its failures one line each.

The hub is reached only when a source needs it, and never waited on: with HF_DATASETS_OFFLINE /
HF_HUB_OFFLINE set, or when the endpoint does not answer within a few seconds, the source fails at
once with one line saying how to use a local copy instead (datasets itself would retry for half a
minute). A gated dataset without a token, a missing config or split, or a missing column, each
gets its own one-line error naming the fix. Errors raised while rows are read (datasets and pyarrow parse lazily) are caught too (`Guarded`).
"""
from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator
from urllib.parse import urlparse

from .datafiles import BATCH_ROWS, clean_texts, missing_column
from .errors import CorpusFormatError, HubUnavailableError, LillmError, SourceError

if TYPE_CHECKING:   # a Source is only passed through here; lillm.sources imports this module
    from .sources import Source

OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
HUB_TIMEOUT_S = 3.0
DOWNLOAD_HINT = ("to use a local copy, download it where there is network (`hf download NAME --repo-type dataset "
                 "--local-dir DIR`) and pass its files with --files DIR/... (parquet, jsonl, arrow, or a "
                 "save_to_disk folder)")
LOCAL_COPY_HINT = DOWNLOAD_HINT + ", or set HF_DATASETS_OFFLINE=1 to use a copy in the datasets cache"


def hub_offline() -> str | None:
    """The name of the offline variable that is set, or None."""
    for variable in OFFLINE_VARIABLES:
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return variable
    return None


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def check_hub_reachable(what: str, timeout: float = HUB_TIMEOUT_S) -> None:
    """Fail in seconds, not after datasets' half minute of retries, when the hub cannot be reached."""
    endpoint = hub_endpoint()
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise HubUnavailableError(f"{what}: cannot reach {endpoint} ({reason}): no network? "
                                  f"{LOCAL_COPY_HINT}") from None


def hub_error(what: str, name: str, error: Exception) -> HubUnavailableError | SourceError:
    """datasets' exception as one line that names the fix."""
    kinds = {cls.__name__ for e in (error, error.__cause__, error.__context__) if e is not None
             for cls in type(e).__mro__}
    message = " ".join(str(error).split())
    if "GatedRepoError" in kinds or "gated" in message.lower():
        return HubUnavailableError(
            f"{what}: {name} is gated: accept its conditions at {hub_endpoint()}/datasets/{name}, then log in with "
            f"`hf auth login` (or set HF_TOKEN=hf_...); {LOCAL_COPY_HINT}")
    if "DatasetNotFoundError" in kinds or "RepositoryNotFoundError" in kinds:
        return HubUnavailableError(f"{what}: {message}; check the name on {hub_endpoint()}/datasets, or log in "
                                   f"with `hf auth login` if it is private")
    if "OfflineModeIsEnabled" in kinds or "LocalEntryNotFoundError" in kinds or isinstance(error, ConnectionError):
        return HubUnavailableError(f"{what}: {message}; {LOCAL_COPY_HINT}")
    if "config" in message.lower():
        return SourceError(f"{what}: {message}; give the config as --hf NAME:CONFIG")
    if "split" in message.lower():
        return SourceError(f"{what}: {message}; choose one with --hf-split")
    return SourceError(f"{what}: {type(error).__name__}: {message}")


def datasets_cache() -> Path:
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "datasets"


def cached_copy_exists(name: str) -> bool:
    """Whether the datasets cache holds a folder for this hub dataset (datasets names it owner___name)."""
    prefix = name.replace("/", "___").lower()
    cache = datasets_cache()
    return cache.is_dir() and any(entry.name.lower().startswith(prefix) for entry in cache.iterdir())


def open_hub_dataset(name: str, config: str | None, split: str, what: str | None = None):
    """A hub dataset split, streamed; offline mode loads a cached, non-streamed copy if there is one."""
    what = what or f"--hf {name}{':' + config if config else ''}"
    offline = hub_offline()
    if not offline:
        check_hub_reachable(what)   # before importing datasets, which alone takes seconds
    elif not cached_copy_exists(name):
        raise HubUnavailableError(f"{what}: {offline} is set and the datasets cache ({datasets_cache()}) has no "
                                  f"copy of {name}; {DOWNLOAD_HINT}")
    import datasets

    try:
        if offline:
            # Only a copy in the local cache can be read offline (streaming always needs the network),
            # and only when datasets saw the variable at import; otherwise it would retry the network.
            try:
                if not datasets.config.HF_HUB_OFFLINE:
                    raise ConnectionError(f"{offline} was set after datasets was imported")
                return datasets.load_dataset(name, config, split=split)
            except Exception as error:  # any failure offline means: no usable local copy
                raise HubUnavailableError(
                    f"{what}: {offline} is set and the datasets cache has no copy of {name} "
                    f"({type(error).__name__}); {DOWNLOAD_HINT}") from None
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except (HubUnavailableError, SourceError):
        raise
    except Exception as error:  # every datasets/hub failure becomes one clear line
        raise hub_error(what, name, error) from None


def open_dataset(source: Source):
    """The source as a `datasets.Dataset` (memory-mapped) or `IterableDataset` (streamed)."""
    if source.fmt == "memory":
        return source.dataset
    if not source.reads_with_datasets:
        raise SourceError(f"{source.location}: a .{source.fmt} file is not read through datasets")
    if source.fmt == "hub":
        return open_hub_dataset(source.location, source.config, source.split, f"--hf {source.name}")
    if source.needs_network:
        if hub_offline():
            raise HubUnavailableError(f"{source.location}: {hub_offline()} is set, and hf:// files are read from "
                                      f"the network; {DOWNLOAD_HINT}")
        check_hub_reachable(source.location)
    import datasets

    if source.fmt == "disk":
        try:
            with datasets_quiet():
                loaded = datasets.load_from_disk(source.location)
        except Exception as error:  # a damaged save_to_disk folder: its JSON or arrow files
            raise unreadable(source, error) from None
        if isinstance(loaded, datasets.DatasetDict):
            if source.split not in loaded:
                raise SourceError(f"{source.location} holds splits {list(loaded)}, not {source.split!r}; "
                                  f"choose one with --hf-split")
            loaded = loaded[source.split]
        return Guarded(loaded, source)
    try:
        with datasets_quiet():
            return Guarded(datasets.load_dataset(source.fmt, data_files=source.location, split="train",
                                                 streaming=True), source)
    except Exception as error:  # a broken file gets one line, not a traceback
        if source.needs_network:
            raise hub_error(source.location, source.location, error) from None
        raise unreadable(source, error) from None


@contextmanager
def datasets_quiet():
    """`datasets` logs a reading error before raising it; lillm reports it itself, in one line."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def unreadable(source: Source, error: Exception, row: int | None = None) -> CorpusFormatError:
    """A data file that pyarrow or datasets cannot read (a line that is not a JSON object, an empty or
    damaged parquet file, a damaged save_to_disk folder), as one line that names it."""
    where = source.location if row is None else f"{source.location}, row {row}"
    return CorpusFormatError(f"{where}: cannot be read as {source.fmt} ({type(error).__name__}: "
                             f"{' '.join(str(error).split())[:300]}); fix or re-export the file")


class Guarded:
    """A dataset whose rows are read through `datasets` and pyarrow, which parse lazily: an error they
    raise while rows are read (not only when the file is opened) becomes `unreadable`'s one line.
    Everything else is the dataset's own."""

    def __init__(self, dataset, source: Source):
        self.dataset, self.source = dataset, source

    def _guard(self, rows):
        count = 0
        while True:
            try:
                with datasets_quiet():
                    row = next(rows)
            except StopIteration:
                return
            except (LillmError, KeyboardInterrupt):
                raise
            except Exception as error:  # pyarrow.ArrowInvalid, json errors, OSError ... from the reader
                raise unreadable(self.source, error, count + 1) from None
            count += 1
            yield row

    def __iter__(self):
        return self._guard(iter(self.dataset))

    def iter(self, *args, **kwargs):  # batches (dataset_texts reads Arrow batches)
        return self._guard(iter(self.dataset.iter(*args, **kwargs)))

    def take(self, n: int) -> "Guarded":
        return Guarded(self.dataset.take(n), self.source)

    def select_columns(self, *args, **kwargs) -> "Guarded":
        return Guarded(self.dataset.select_columns(*args, **kwargs), self.source)

    def __getattr__(self, name: str):
        return getattr(self.dataset, name)


def column_names(dataset) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is None:   # a streamed dataset whose features are only known once a row is read
        first = next(iter(dataset.take(1)), None)
        names = list(first) if first else []
    return list(names)


def require_columns(dataset, columns: list[str], source: Source, flag: str = "--text-column") -> None:
    have = column_names(dataset)
    missing = [column for column in columns if column not in have]
    if missing:
        raise missing_column(source.where(), missing[0], have, flag)


def dataset_texts(dataset, column: str, source: Source) -> Iterator[str]:
    """The stripped, non-empty strings of one column, read in Arrow batches."""
    require_columns(dataset, [column], source)
    for batch in dataset.select_columns([column]).iter(batch_size=BATCH_ROWS):
        yield from clean_texts(batch[column], column, source.where())
