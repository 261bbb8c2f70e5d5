"""Where text comes from: a registry of named corpora and readers for their formats.

A language model is only as good as the text it reads, so lillm names every corpus it
knows, says where it came from (the public repository and commit it was copied from)
and under what license, and reads each one with a small reader for its format:

- ``txt``: one document per line (any of ``\\n``, ``\\r\\n`` or a bare ``\\r`` ends a line),
- ``csv`` / ``tsv``: one document per row, taken from a named text column; quoted
  fields may hold newlines, so rows are parsed with :mod:`csv`, never line by line,
- ``conll``: "token TAG" per line, a blank line between sentences (MasakhaNER); each
  sentence is joined back with single spaces,
- ``masakhanews``: a tsv whose document is ``headline + "\\n" + text``.

The data itself never lives in the repository. It sits in a data directory resolved by
:func:`data_dir`: an explicit argument, else the environment variable ``LILLM_DATA_DIR``,
else ``<repo root>/../shared/data``. docs/DATA.md lists every corpus and how to get it.
"""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .errors import CorpusFormatError, InputFileError, SourceError

ENV_VAR = "LILLM_DATA_DIR"
DATA_DIR_HINT = f"pass --data-dir DIR (data_dir=...) or set the environment variable {ENV_VAR}"
FORMATS = ("txt", "csv", "tsv", "conll", "masakhanews")


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The data directory: ``path`` if given, else $LILLM_DATA_DIR, else <repo>/../shared/data."""
    if path is not None:
        where, why = Path(path), "the data_dir argument / --data-dir"
    elif os.environ.get(ENV_VAR):
        where, why = Path(os.environ[ENV_VAR]), f"the environment variable {ENV_VAR}"
    else:
        repo_root = Path(__file__).resolve().parent.parent
        where, why = repo_root.parent / "shared" / "data", "the default <repo root>/../shared/data"
    if not where.is_dir():
        raise InputFileError(f"data directory {where} (from {why}) does not exist; {DATA_DIR_HINT}")
    return where


@dataclass(frozen=True)
class Corpus:
    """One file of text in one language: where it lives in the data dir and where it came from.

    ``kind`` says what the text is: 'mono' (raw monolingual text), 'news' (MasakhaNEWS
    articles), 'sentiment' (AfriSenti tweets), 'mt' (target side of a translation corpus),
    'mt-source' (its English source side) or 'ner' (MasakhaNER sentences, whitespace-tokenized
    copies of Lacuna sentences).
    """

    name: str
    lang: str
    relpath: str
    fmt: str
    split: str
    origin: str
    license: str
    text_column: str | None = None
    kind: str = "mono"


# Sources, as SOURCES.md in the data directory records them (public repository @ commit).
_LACUNA = ("github.com/masakhane-io/lacuna_pos_ner @ b210032b53fde2504a4aa0b6a3a9a1e209098712",
           "CC-BY-NC-4.0 (repo LICENSE; hau/zul READMEs say CC-BY-4.0)")
_NER = ("github.com/masakhane-io/masakhane-ner @ ba5843cd08aa491d5f96a5e809e71eb9ec461391", "CC-BY-NC-4.0")
_NEWS = ("github.com/masakhane-io/masakhane-news @ 819be052e79e0a600e0ed4a7356594681cb5c4f3",
         "AFL-3.0 (HF dataset card; no LICENSE file in the repo)")
_MAFAND = ("github.com/masakhane-io/lafand-mt @ d441f8b063d63e95eafb72e84317359e27abf95e",
           "CC-BY-NC-4.0 (dataset; repo code is GPL-3.0)")
_SENTI = ("github.com/afrisenti-semeval/afrisent-semeval-2023 @ 5aec3cfcf87b59f885e98641f72e52182776429d",
          "CC-BY-4.0")
_UKUX = "github.com/LauraMartinus/ukuxhumana @ 211265e37dc2545caf8fba32e6e5f6e5318a9993"
_NCHLT = (_UKUX, "CC-BY-2.5-ZA (NCHLT, SADiLaR/CTexT; no LICENSE file in the repo)")
_AUTSHUMATO = (_UKUX, "CC-BY-2.5-ZA (Autshumato, SADiLaR/CTexT; no LICENSE file in the repo)")
_WIKI = (_UKUX, "CC-BY-SA (Wikipedia text)")

_SPLITS = ("train", "dev", "test")


def _registry() -> dict[str, Corpus]:
    entries: list[Corpus] = []
    add = entries.append
    for lang in ("hau", "swa", "xho", "zul"):
        add(Corpus(f"lacuna-{lang}", lang, f"lacuna_language_corpus/{lang}/{lang}.txt", "txt", "train", *_LACUNA))
    add(Corpus("voa-swa", "swa", "lacuna_language_corpus/swa/voa_swahili.csv", "csv", "train", *_LACUNA,
               text_column="Text"))
    add(Corpus("nchlt-xho", "xho", "ukuxhumana/mono/nchlt/xho/improved_xho.txt", "txt", "train", *_NCHLT))
    add(Corpus("nchlt-zul", "zul", "ukuxhumana/mono/zu/nchlt/improved_zul.txt", "txt", "train", *_NCHLT))
    add(Corpus("wiki-zul", "zul", "ukuxhumana/mono/zu/wiki/wiki.zu", "txt", "train", *_WIKI))
    for lang in ("hau", "swa", "xho"):
        for split in _SPLITS:
            # hau/swa train: only the 50-per-label few-shot subset of train is public.
            few_shot = split == "train" and lang != "xho"
            rel = f"few_shot_data/50_samples/{lang}/train.tsv" if few_shot else f"data/{lang}/{split}.tsv"
            add(Corpus(f"masakhanews-{lang}-{split}", lang, f"masakhanews/{rel}", "masakhanews", split, *_NEWS,
                       kind="news"))
    for lang in ("hau", "swa"):
        for split in _SPLITS:
            add(Corpus(f"afrisenti-{lang}-{split}", lang, f"afrisenti/{lang}/{split}.tsv", "tsv", split, *_SENTI,
                       text_column="tweet", kind="sentiment"))
    for lang in ("hau", "swa", "xho", "zul"):
        for split in _SPLITS if lang != "xho" else ("dev", "test"):
            add(Corpus(f"mafand-{lang}-{split}", lang, f"mafand_mt/en-{lang}/{split}.{lang}", "txt", split, *_MAFAND,
                       kind="mt"))
    # The English side of the translation pairs: the source language the model reads when it
    # translates, so a tokenizer (and a model) can see English too (--langs ... eng).
    for lang in ("hau", "swa", "zul"):
        for split in _SPLITS:
            add(Corpus(f"mafand-eng-{lang}-{split}", "eng", f"mafand_mt/en-{lang}/{split}.en", "txt", split,
                       *_MAFAND, kind="mt-source"))
    for split, ext in (("train", "train"), ("dev", "dev")):
        add(Corpus(f"autshumato-zul-{split}", "zul", f"ukuxhumana/clean/en_zu/enzu_parallel.{ext}.zu", "txt", split,
                   *_AUTSHUMATO, kind="mt"))
    add(Corpus("autshumato-eval-zul", "zul", "ukuxhumana/data/autshumato_eval_set/isiZulu.txt", "txt", "test",
               *_AUTSHUMATO, kind="mt"))
    add(Corpus("autshumato-eval-xho", "xho", "ukuxhumana/data/autshumato_eval_set/isiXhosa.txt", "txt", "test",
               *_AUTSHUMATO, kind="mt"))
    for lang in ("hau", "swa", "xho", "zul"):
        for split in _SPLITS:
            add(Corpus(f"masakhaner-{lang}-{split}", lang, f"masakhaner2/{lang}/{split}.txt", "conll", split, *_NER,
                       kind="ner"))
    return {c.name: c for c in entries}


CORPORA: dict[str, Corpus] = _registry()


@dataclass(frozen=True)
class HubCorpus:
    """A public corpus on the Hugging Face hub, known by a short name; reading it needs the network.

    ``location`` is a hub dataset name (read with ``config`` and ``split``) or an ``hf://`` file
    pattern (read as JSON lines/parquet by its suffix). docs/DATA.md gives sizes and commands.
    """

    name: str
    lang: str
    location: str
    config: str | None
    split: str
    license: str
    text_column: str = "text"
    gated: bool = False
    needs_network: bool = True


def _hub_registry() -> dict[str, HubCorpus]:
    entries = []
    inkuba = "CC-BY-NC-4.0 (gated: accept the conditions on the hub)"
    for lang in ("swa", "hau", "zul", "xho"):
        entries.append(HubCorpus(f"inkuba-mono-{lang}", lang, "lelapa/Inkuba-Mono", lang, "train", inkuba, gated=True))
    for lang, config in (("swa", "swh_Latn"), ("hau", "hau_Latn"), ("zul", "zul_Latn"), ("xho", "xho_Latn")):
        entries.append(HubCorpus(f"fineweb2-{lang}", lang, "HuggingFaceFW/fineweb-2", config, "train", "ODC-BY"))
    for lang, config in (("swa", "swahili"), ("hau", "hausa")):
        entries.append(HubCorpus(f"afriberta-{lang}", lang, "castorini/afriberta-corpus", config, "train",
                                 "Apache-2.0"))
    for lang, stem in (("swa", "swahili"), ("hau", "hausa")):
        entries.append(HubCorpus(f"ciral-{lang}", lang, f"hf://datasets/CIRAL/ciral-corpus/passages-v1.0/"
                                 f"{stem}_passages.jsonl", None, "train", "Apache-2.0"))
    for lang, code in (("swa", "sw"), ("hau", "ha"), ("zul", "zu"), ("xho", "xh")):
        entries.append(HubCorpus(f"madlad-{lang}", lang, f"hf://datasets/allenai/MADLAD-400/data/{code}/"
                                 f"{code}_clean_*.jsonl.gz", None, "train", "ODC-BY"))
    return {entry.name: entry for entry in entries}


# Hub corpora: chosen only by name (--corpora inkuba-mono-swa), never by a language-wide selection,
# which must work offline.
HUB_CORPORA: dict[str, HubCorpus] = _hub_registry()
LANGS = ("hau", "swa", "xho", "zul", "eng")


# ----------------------------------------------------------------------------- readers

def _open_text(path: Path, newline: str | None = None):
    if not path.is_file():
        raise InputFileError(f"corpus file {path} does not exist; check the data directory ({DATA_DIR_HINT})")
    # utf-8-sig drops a byte-order mark, which would otherwise glue itself to the first word.
    return open(path, encoding="utf-8-sig", newline=newline)


def _read_txt(path: Path) -> Iterator[str]:
    # newline=None is Python's universal-newline mode: \n, \r\n and a bare \r all end a line.
    with _open_text(path) as f:
        for line in f:
            line = line.strip()
            if line:
                yield line


def _check_columns(path: Path, header: list[str] | None, needed: list[str], fmt: str) -> None:
    have = list(header or [])
    for column in needed:
        if column in have:
            continue
        if fmt == "masakhanews":
            fix = "a MasakhaNEWS tsv has 'headline' and 'text' columns; for another table use fmt 'tsv' with --text-column"
        else:
            fix = "pass text_column=NAME (--text-column NAME on the command line) naming one of them"
        raise CorpusFormatError(f"{path} ({fmt}) has no column {column!r}; its columns are {have}; {fix}")


def _read_table(path: Path, fmt: str, text_column: str | None) -> Iterator[str]:
    if text_column is None:
        raise CorpusFormatError(f"{path}: format {fmt!r} needs a text column; pass text_column=NAME "
                         f"(--text-column NAME on the command line)")
    delimiter = "\t" if fmt == "tsv" else ","
    # Newspaper articles can exceed csv's default 128 KiB field limit.
    csv.field_size_limit(2**31 - 1)
    with _open_text(path, newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        _check_columns(path, reader.fieldnames, [text_column], fmt)
        for row in reader:
            text = (row.get(text_column) or "").strip()
            if text:
                yield text


def _read_masakhanews(path: Path) -> Iterator[str]:
    csv.field_size_limit(2**31 - 1)
    with _open_text(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        _check_columns(path, reader.fieldnames, ["headline", "text"], "masakhanews")
        for row in reader:
            parts = [(row.get(k) or "").strip() for k in ("headline", "text")]
            text = "\n".join(p for p in parts if p)
            if text:
                yield text


def _read_conll(path: Path) -> Iterator[str]:
    tokens: list[str] = []
    with _open_text(path) as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                if tokens:
                    yield " ".join(tokens)
                tokens = []
                continue
            if line.startswith("-DOCSTART-"):
                continue
            head, sep, _tag = line.rpartition(" ")
            if not sep:
                raise CorpusFormatError(f"{path}, line {number}: expected 'token TAG' (conll), got {line!r}")
            # MasakhaNER has a few lines with an empty token (" O"): nothing to keep.
            if head.strip():
                tokens.append(head.strip())
    if tokens:
        yield " ".join(tokens)


def read_documents(path: str | os.PathLike, fmt: str, text_column: str | None = None) -> Iterator[str]:
    """Yield the non-empty documents of one file, stripped of surrounding whitespace."""
    path = Path(path)
    if fmt == "txt":
        return _read_txt(path)
    if fmt in ("csv", "tsv"):
        return _read_table(path, fmt, text_column)
    if fmt == "conll":
        return _read_conll(path)
    if fmt == "masakhanews":
        return _read_masakhanews(path)
    raise CorpusFormatError(f"{path}: unknown format {fmt!r}; known formats are {', '.join(FORMATS)}")


# ----------------------------------------------------------------------------- selection

# documents_for and available_corpora take a ``data_dir`` argument, which hides the function.
_resolve_data_dir = data_dir


def available_corpora(data_dir: str | os.PathLike | None = None) -> list[Corpus]:
    """The registered corpora whose file exists in the data directory."""
    root = _resolve_data_dir(data_dir)
    return [c for c in CORPORA.values() if (root / c.relpath).is_file()]


def select_corpora(langs: Iterable[str], splits: Iterable[str] = ("train",), names: Iterable[str] | None = None,
                   kinds: Iterable[str] | None = None) -> list[Corpus]:
    """The registered corpora matching languages, splits and kinds, or exactly ``names``."""
    if names is not None:
        unknown = [n for n in names if n not in CORPORA]
        if unknown:
            raise SourceError(f"unknown corpus name(s) {unknown}; known names are {sorted(CORPORA)}")
        return [CORPORA[n] for n in names]
    langs, splits = list(langs), list(splits)
    bad = [lang for lang in langs if lang not in LANGS]
    if bad:
        raise SourceError(f"unknown language(s) {bad}; registered languages are {list(LANGS)}")
    kinds = None if kinds is None else set(kinds)
    return [c for c in CORPORA.values()
            if c.lang in langs and c.split in splits and (kinds is None or c.kind in kinds)]


def documents_for(langs: Iterable[str], splits: Iterable[str] = ("train",), names: Iterable[str] | None = None,
                  data_dir: str | os.PathLike | None = None,
                  kinds: Iterable[str] | None = None) -> Iterator[tuple[str, str]]:
    """Yield (corpus_name, document) for every selected corpus, in registry order.

    With explicit ``names`` every file must exist. Otherwise corpora whose file is absent
    are skipped with a warning (a user may have fetched only some of them), and an
    error is raised only when none is left.
    """
    root = _resolve_data_dir(data_dir)
    chosen = select_corpora(langs, splits, names, kinds)
    if names is None:
        missing = [c.name for c in chosen if not (root / c.relpath).is_file()]
        if missing:
            warnings.warn(f"skipping corpora missing from {root}: {missing} (see docs/DATA.md)", stacklevel=2)
        chosen = [c for c in chosen if c.name not in missing]
        if not chosen:
            raise InputFileError(f"no corpus for langs={list(langs)} splits={list(splits)} in {root}; "
                                    f"{DATA_DIR_HINT}; docs/DATA.md says where to get the files")
    for corpus in chosen:
        for doc in read_documents(root / corpus.relpath, corpus.fmt, corpus.text_column):
            yield corpus.name, doc
