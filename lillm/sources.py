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

Opening what `datasets` reads (the hub, hf:// files, save_to_disk folders), offline-aware and with
one-line errors, is lillm/hub.py's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .corpora import CORPORA, HUB_CORPORA, data_dir as resolve_data_dir, read_documents, select_corpora
from .datafiles import check_text_column, read_texts
from .errors import InputFileError, SourceError
from .hub import dataset_texts, open_dataset, require_columns

TEXT_FORMATS = {".txt": "txt", ".tsv": "tsv", ".csv": "csv", ".conll": "conll"}
DATASET_FORMATS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json",
                   ".parquet": "parquet", ".arrow": "arrow"}
DEFAULT_TEXT_COLUMN = "text"


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


def budgeted(documents, max_docs: int | None = None, max_bytes: int | None = None) -> Iterator[str]:
    """The first documents of a stream, stopping before max_docs documents or max_bytes UTF-8 bytes are passed."""
    taken = size = 0
    for text in documents:
        length = len(text.encode("utf-8"))
        if (max_docs is not None and taken >= max_docs) or (max_bytes is not None and size + length > max_bytes):
            return
        taken, size = taken + 1, size + length
        yield text
