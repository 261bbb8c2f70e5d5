"""Where documents come from: registered corpora, local files and Hugging Face datasets, streamed.

Every stage that reads text (the token-bin writer, tokenizer training, SFT data) names its input
the same way and gets the same `Source` back:

- a registered corpus by short name (`lacuna-swa`, or `inkuba-mono-swa`, which lives on the hub);
- a local file: .txt/.tsv/.csv/.conll through lillm.corpora's readers, and .jsonl/.json/.parquet/
  .arrow (also .jsonl.gz) or a folder written by `Dataset.save_to_disk`, through `datasets`;
- a remote file pattern `hf://datasets/OWNER/NAME/path/*.jsonl.gz`, streamed by `datasets`;
- a hub dataset by name, config and split (`--hf NAME[:CONFIG] --hf-split train`).

Nothing is downloaded whole: hub datasets and hf:// files are opened with `streaming=True`
(the rows arrive over HTTP as they are read, as in Lhoest et al., 2021, "Datasets: A Community
Library for NLP"), local parquet, Arrow and JSON lines files are read a record batch at a time by
lillm.datafiles (pyarrow and json, without importing `datasets`), and a save_to_disk folder is
memory-mapped Arrow. So a corpus bigger than memory, or than the disk, can be tokenized.

The hub is reached only when a source needs it, and never waited on: with HF_DATASETS_OFFLINE /
HF_HUB_OFFLINE set, or when the endpoint does not answer within a few seconds, the source fails at
once with one line saying how to use a local copy instead (datasets itself would retry for half a
minute). A gated dataset without a token, a missing config or split, or a missing column, each
gets its own one-line error naming the fix.
"""
from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from .corpora import CORPORA, HUB_CORPORA, data_dir as resolve_data_dir, read_documents, select_corpora
from .datafiles import BATCH_ROWS, check_text_column, clean_texts, missing_column, read_texts
from .errors import CorpusFormatError, HubUnavailableError, InputFileError, LillmError, SourceError

TEXT_FORMATS = {".txt": "txt", ".tsv": "tsv", ".csv": "csv", ".conll": "conll"}
DATASET_FORMATS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json",
                   ".parquet": "parquet", ".arrow": "arrow"}
DEFAULT_TEXT_COLUMN = "text"
OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
HUB_TIMEOUT_S = 3.0
DOWNLOAD_HINT = ("to use a local copy, download it where there is network (`hf download NAME --repo-type dataset "
                 "--local-dir DIR`) and pass its files with --files DIR/... (parquet, jsonl, arrow, or a "
                 "save_to_disk folder)")
LOCAL_COPY_HINT = DOWNLOAD_HINT + ", or set HF_DATASETS_OFFLINE=1 to use a copy in the datasets cache"


@dataclass(frozen=True)
class Source:
    """One stream of documents, named as meta.json and --mix will call it.

    fmt says how to read `location`: a lillm.corpora format (txt, csv, tsv, conll, masakhanews) for a
    text file; json, parquet or arrow for a data file (local or hf://); disk for a save_to_disk
    folder; hub for a hub dataset; memory for a `datasets` object handed over in Python.
    """
    name: str
    location: str
    fmt: str
    text_column: str | None = None
    config: str | None = None
    split: str = "train"
    max_docs: int | None = None
    max_tokens: int | None = None
    dataset: object = field(default=None, compare=False, repr=False)

    @property
    def path(self) -> Path:
        return Path(self.location)

    @property
    def needs_network(self) -> bool:
        return self.fmt == "hub" or self.location.startswith("hf://")

    @property
    def reads_with_datasets(self) -> bool:
        """Read through `datasets` (rows as dicts); a local data file's texts are read by lillm.datafiles."""
        return self.fmt in ("json", "parquet", "arrow", "disk", "hub", "memory")

    @property
    def is_local_data_file(self) -> bool:
        return self.fmt in ("json", "parquet", "arrow") and not self.needs_network

    def documents(self) -> Iterator[str]:
        """The non-empty documents, stripped, in the source's order."""
        if self.is_local_data_file:
            return read_texts(self.path, self.fmt, self.text_column or DEFAULT_TEXT_COLUMN, self.where())
        if not self.reads_with_datasets:
            return read_documents(self.path, self.fmt, self.text_column)
        return dataset_texts(open_dataset(self), self.text_column or DEFAULT_TEXT_COLUMN, self)

    def check_text_column(self) -> None:
        """Open the source and check its text column, so a bad name or no network fails before any work."""
        if self.is_local_data_file:
            check_text_column(self.path, self.fmt, self.text_column or DEFAULT_TEXT_COLUMN, self.where())
        elif self.reads_with_datasets:
            require_columns(open_dataset(self), [self.text_column or DEFAULT_TEXT_COLUMN], self)

    def records(self) -> Iterator[dict]:
        """Rows as dicts (for instruction data); only for sources read through `datasets`."""
        if not self.reads_with_datasets:
            raise SourceError(f"{self.name}: rows can be read from parquet, jsonl, arrow, save_to_disk "
                              f"folders or --hf datasets, not from a .{self.fmt} file")
        return iter(open_dataset(self))

    def describe(self) -> dict:
        """What meta.json records about the source."""
        info = {"path": self.location, "format": self.fmt, "text_column": self.text_column}
        if self.fmt == "hub":
            info.update(config=self.config, split=self.split)
        if self.max_docs or self.max_tokens:
            info.update(max_docs=self.max_docs, max_tokens=self.max_tokens)
        return info

    def where(self) -> str:
        return self.name if self.name == self.location else f"{self.name} ({self.location})"


# ---- naming sources -------------------------------------------------------------------------------
def data_file_format(location: str) -> str | None:
    """json / parquet / arrow from a data file's name, or None."""
    name = location.lower()
    for suffix in sorted(DATASET_FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return DATASET_FORMATS[suffix]
    return None


def file_source(location, text_column: str | None = None, name: str | None = None, **budget) -> Source:
    """A --files entry: its format from the extension (or a save_to_disk folder)."""
    location = str(location)
    name = name or location
    data_format = data_file_format(location)
    if location.startswith("hf://"):
        if data_format is None:
            raise SourceError(f"{location}: an hf:// file must end in one of {', '.join(DATASET_FORMATS)}")
        return Source(name, location, data_format, text_column or DEFAULT_TEXT_COLUMN, **budget)
    path = Path(location)
    if path.is_dir():
        if not any((path / marker).is_file() for marker in ("dataset_info.json", "dataset_dict.json", "state.json")):
            raise SourceError(f"{path} is a folder but not one written by Dataset.save_to_disk (no dataset_info.json "
                              f"or dataset_dict.json); pass its files instead")
        return Source(name, location, "disk", text_column or DEFAULT_TEXT_COLUMN, **budget)
    if data_format is not None:
        return Source(name, location, data_format, text_column or DEFAULT_TEXT_COLUMN, **budget)
    fmt = TEXT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SourceError(f"{path}: cannot tell the format from the extension {path.suffix!r}; use one of "
                          f"{', '.join([*TEXT_FORMATS, *DATASET_FORMATS])} or a save_to_disk folder (rename the file)")
    if fmt in ("csv", "tsv") and not text_column:
        raise SourceError(f"{path} is a {fmt} table: pass --text-column NAME to say which column holds the text")
    return Source(name, location, fmt, text_column if fmt in ("csv", "tsv") else None, **budget)


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """'NAME[:CONFIG]' -> (NAME, CONFIG or None)."""
    name, _, config = spec.partition(":")
    if name.count("/") != 1 or not all(name.split("/")):
        raise SourceError(f"--hf {spec!r}: expected OWNER/NAME[:CONFIG], e.g. lelapa/Inkuba-Mono:swa")
    return name, config or None


def hub_source(spec: str, split: str = "train", text_column: str | None = None, **budget) -> Source:
    name, config = parse_hub_spec(spec)
    return Source(spec, name, "hub", text_column or DEFAULT_TEXT_COLUMN, config=config, split=split, **budget)


def dataset_source(name: str, dataset, text_column: str = DEFAULT_TEXT_COLUMN, **budget) -> Source:
    """A `datasets.Dataset` or `IterableDataset` built in Python, as a source."""
    return Source(name, f"<{type(dataset).__name__}>", "memory", text_column, dataset=dataset, **budget)


def registered_source(name: str, root: Path | None, **budget) -> Source:
    """A corpus of the registry by short name: a file in the data dir, or a hub dataset."""
    if name in HUB_CORPORA:
        corpus = HUB_CORPORA[name]
        if corpus.location.startswith("hf://"):
            return file_source(corpus.location, corpus.text_column, name=name, **budget)
        return Source(name, corpus.location, "hub", corpus.text_column, config=corpus.config, split=corpus.split,
                      **budget)
    corpus = CORPORA[name]
    return Source(name, str(root / corpus.relpath), corpus.fmt, corpus.text_column, **budget)


def parse_budgets(values, flag: str, names: list[str]) -> dict[str, int]:
    """--max-tokens 1000000 (every source) or --max-tokens NAME=1000000 (one source) -> {name: limit}."""
    limits: dict[str, int] = {}
    for value in values or ():
        key, sep, number = str(value).rpartition("=")
        try:
            limit = int(float(number))
        except ValueError:
            raise SourceError(f"{flag} {value!r}: expected a number, or NAME=NUMBER") from None
        if limit <= 0:
            raise SourceError(f"{flag} {value!r}: the limit must be positive")
        if not sep:
            limits.update({name: limit for name in names if name not in limits})
        elif key not in names:
            raise SourceError(f"{flag} {value!r}: no source named {key!r}; the sources are {names}")
        else:
            limits[key] = limit
    return limits


def parse_mix(values, names: list[str]) -> dict[str, float] | None:
    """--mix NAME=WEIGHT ... -> weights summing to 1, one per source, or None when not mixing."""
    if not values:
        return None
    weights: dict[str, float] = {}
    for value in values:
        key, sep, number = str(value).rpartition("=")
        if not sep:
            raise SourceError(f"--mix {value!r}: expected NAME=WEIGHT, e.g. --mix lacuna-swa=0.7 lacuna-hau=0.3")
        if key not in names:
            raise SourceError(f"--mix {value!r}: no source named {key!r}; the sources are {names}")
        try:
            weights[key] = float(number)
        except ValueError:
            raise SourceError(f"--mix {value!r}: the weight must be a number") from None
        if not weights[key] > 0:
            raise SourceError(f"--mix {value!r}: the weight must be positive")
    missing = [name for name in names if name not in weights]
    if missing:
        raise SourceError(f"--mix gives no weight to {missing}: give every source a weight (or leave it out)")
    total = sum(weights.values())
    return {name: weights[name] / total for name in names}


DEFAULT_KINDS = ("mono", "news", "sentiment", "mt", "mt-source")  # mt-source: English, read only with --langs eng


def resolve_sources(langs=(), corpora=None, files=None, text_column=None, data_dir=None, kinds=DEFAULT_KINDS,
                    hf=None, hf_split: str = "train", max_docs=None, max_tokens=None,
                    sources: list[Source] | None = None, splits=("train",)) -> list[Source]:
    """Registered corpora (by name, else those of langs and kinds), then --files, then --hf, then `sources`.

    A language-wide selection skips files absent from the data dir (with a warning) and never
    reaches for the network; named corpora and files must exist.
    """
    import warnings

    langs, corpora, files, hf = list(langs or ()), list(corpora or ()), list(files or ()), list(hf or ())
    if not (langs or corpora or files or hf or sources):
        raise SourceError("nothing to read: give --langs, --corpora, --files or --hf")
    unknown = [name for name in corpora if name not in CORPORA and name not in HUB_CORPORA]
    if unknown:
        raise SourceError(f"unknown corpus name(s) {unknown}; known names are {sorted(CORPORA) + sorted(HUB_CORPORA)}")
    chosen: list[Source] = []
    local_names = [name for name in corpora if name in CORPORA]
    root = resolve_data_dir(data_dir) if (langs or local_names) else None
    if langs or corpora:
        selected = select_corpora(langs, splits, None, kinds) if not corpora else []
        for corpus in selected:
            if not (root / corpus.relpath).is_file():
                warnings.warn(f"skipping corpus {corpus.name}: {root / corpus.relpath} not found", stacklevel=2)
                continue
            chosen.append(registered_source(corpus.name, root))
        for name in corpora:
            if name in CORPORA and CORPORA[name].split != "train":
                warnings.warn(f"corpus {name} is a {CORPORA[name].split} split: pretraining on it leaks "
                              f"evaluation data into the model", stacklevel=2)
            chosen.append(registered_source(name, root))
    chosen += [file_source(path, text_column) for path in files]
    chosen += [hub_source(spec, hf_split, text_column) for spec in hf]
    chosen += list(sources or ())
    for source in chosen:
        if source.reads_with_datasets or source.path.exists():
            continue
        if source.name in CORPORA:
            raise InputFileError(f"corpus {source.name}: {source.path} not found; check --data-dir / "
                                    f"$LILLM_DATA_DIR (the data folder, see SOURCES.md there)")
        raise InputFileError(f"{source.path} not found (given with --files); check the path")
    for source in chosen:
        if source.fmt in ("json", "parquet", "arrow", "disk") and not source.needs_network and not source.path.exists():
            raise InputFileError(f"{source.path} not found (given with --files); check the path")
    names = [source.name for source in chosen]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SourceError(f"source(s) {repeated} given twice; name each corpus or file once")
    if not chosen:
        raise InputFileError(f"no corpus file found for langs={langs}; check --data-dir / $LILLM_DATA_DIR")
    doc_limits = parse_budgets(max_docs, "--max-docs", names)
    token_limits = parse_budgets(max_tokens, "--max-tokens", names)
    return [Source(**{**source.__dict__, "max_docs": doc_limits.get(source.name, source.max_docs),
                      "max_tokens": token_limits.get(source.name, source.max_tokens)}) for source in chosen]


# ---- opening through `datasets` -----------------------------------------------------------------
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


def budgeted(documents, max_docs: int | None = None, max_bytes: int | None = None) -> Iterator[str]:
    """The first documents of a stream, stopping before max_docs documents or max_bytes UTF-8 bytes are passed."""
    taken = size = 0
    for text in documents:
        length = len(text.encode("utf-8"))
        if (max_docs is not None and taken >= max_docs) or (max_bytes is not None and size + length > max_bytes):
            return
        taken, size = taken + 1, size + length
        yield text
