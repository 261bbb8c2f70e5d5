"""Local data files (parquet, Arrow, JSON lines) read a record batch at a time, without `datasets`.

`datasets` streams a local parquet or JSON lines file well, but the import alone and its
streaming machinery cost a few hundred MB in the process that reads (and in every worker forked
from it), and it reads slower than pyarrow does. So a local file is read here directly, holding
one batch of rows at a time:

- parquet: `pyarrow.parquet.ParquetFile.iter_batches` over the one text column, BATCH_ROWS rows per
  batch, through a buffered stream (a row group is not loaded whole);
- Arrow IPC (`.arrow`, as `Dataset.save_to_disk` and `datasets`' cache write them): the stream
  format, or the file format, one record batch at a time, read from the file (not mapped);
- JSON lines (`.jsonl`, `.json`, optionally gzipped): one row per line, parsed with `json`; a
  `.json` file holding one array of rows is read whole (it cannot be streamed).

Every reader gives what `lillm.hub.dataset_texts` gives for the same file read through
`datasets`: each value of the column, stripped, without None and empty strings, in file order;
a missing column or a non-text value is one CorpusFormatError naming the columns or the row.
Hub datasets, hf:// files and save_to_disk folders are still read through `datasets`.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterable, Iterator

from .errors import CorpusFormatError

BATCH_ROWS = 1024   # rows per batch: big enough to amortise, small for memory
READ_BUFFER = 1 << 20


def missing_column(where: str, column: str, have: list[str], flag: str = "--text-column") -> CorpusFormatError:
    return CorpusFormatError(f"{where} has no column {column!r}; its columns are {have}; "
                             f"pass {flag} NAME naming one of them")


def clean_texts(values: Iterable, column: str, where: str) -> Iterator[str]:
    """The stripped, non-empty strings of a column's values; None is skipped, any other type refused."""
    for value in values:
        if value is None:
            continue
        if not isinstance(value, str):
            raise CorpusFormatError(f"{where}: column {column!r} holds {type(value).__name__} values, not text; "
                                    f"pass --text-column NAME naming a text column")
        value = value.strip()
        if value:
            yield value


# ---- parquet and Arrow ---------------------------------------------------------------------------------
def check_arrow_column(schema, column: str, where: str) -> None:
    import pyarrow as pa

    if column not in schema.names:
        raise missing_column(where, column, list(schema.names))
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise CorpusFormatError(f"{where}: column {column!r} holds {kind} values, not text; "
                                f"pass --text-column NAME naming a text column")


def open_parquet(path: Path, where: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path, buffer_size=READ_BUFFER, pre_buffer=False)
    except Exception as error:   # pyarrow's message, on one line
        raise CorpusFormatError(f"{where}: cannot be read as parquet ({type(error).__name__}: "
                                f"{' '.join(str(error).split())[:300]})") from None


def parquet_texts(path: Path, column: str, where: str) -> Iterator[str]:
    file = open_parquet(path, where)
    check_arrow_column(file.schema_arrow, column, where)
    for batch in file.iter_batches(batch_size=BATCH_ROWS, columns=[column], use_threads=False):
        yield from clean_texts(batch.column(0).to_pylist(), column, where)


def arrow_batches(path: Path, where: str):
    """(schema, iterator of record batches) of an Arrow IPC file, stream or file format."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(pa.OSFile(str(path)))
        return reader.schema, iter(reader)
    except pa.ArrowInvalid:
        pass
    try:
        reader = pa.ipc.open_file(pa.OSFile(str(path)))
    except Exception as error:
        raise CorpusFormatError(f"{where}: cannot be read as Arrow IPC, stream or file ({type(error).__name__}: "
                                f"{' '.join(str(error).split())[:300]})") from None
    return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))


def arrow_texts(path: Path, column: str, where: str) -> Iterator[str]:
    schema, batches = arrow_batches(path, where)
    check_arrow_column(schema, column, where)
    index = schema.get_field_index(column)
    for batch in batches:
        for start in range(0, batch.num_rows, BATCH_ROWS):
            yield from clean_texts(batch.column(index).slice(start, BATCH_ROWS).to_pylist(), column, where)


# ---- JSON lines -----------------------------------------------------------------------------------------
def open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def json_rows(path: Path, where: str) -> Iterator[dict]:
    """The rows of a JSON lines file; a file whose first line is not a JSON object is read as one document."""
    with open_text(path) as f:
        started = False
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                if started:
                    raise CorpusFormatError(f"{where}, line {number}: not JSON ({error.msg}); a .jsonl file holds "
                                            f"one JSON object per line") from None
                row = None
            if not started and not isinstance(row, dict):   # not JSON lines: a pretty-printed document?
                yield from whole_json_rows(path, where)
                return
            if not isinstance(row, dict):
                raise CorpusFormatError(f"{where}, line {number}: a JSON {type(row).__name__}, not an object "
                                        f"with named columns")
            started = True
            yield row


def whole_json_rows(path: Path, where: str) -> Iterator[dict]:
    """A .json file that is one document: a list of rows, or {column: [values]}."""
    with open_text(path) as f:
        try:
            document = json.load(f)
        except json.JSONDecodeError as error:
            raise CorpusFormatError(f"{where}: not JSON lines nor one JSON document ({error.msg} at line "
                                    f"{error.lineno})") from None
    if isinstance(document, dict) and document and all(isinstance(v, list) for v in document.values()):
        names = list(document)
        yield from (dict(zip(names, values)) for values in zip(*document.values()))
    elif isinstance(document, list) and all(isinstance(row, dict) for row in document):
        yield from document
    else:
        raise CorpusFormatError(f"{where}: a JSON document must be a list of rows or a mapping of columns")


def json_texts(path: Path, column: str, where: str) -> Iterator[str]:
    rows = json_rows(path, where)
    first = next(rows, None)
    if first is None:
        return
    if column not in first:
        raise missing_column(where, column, list(first))
    yield from clean_texts((first.get(column),), column, where)
    for batch in batched(rows, BATCH_ROWS):
        yield from clean_texts((row.get(column) for row in batch), column, where)


def batched(rows: Iterator, size: int) -> Iterator[list]:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---- the entry points -------------------------------------------------------------------------------------
READERS = {"parquet": parquet_texts, "arrow": arrow_texts, "json": json_texts}


def read_texts(path, fmt: str, column: str, where: str | None = None) -> Iterator[str]:
    """The texts of one column of a local data file of format fmt (parquet, arrow, json)."""
    path = Path(path)
    return READERS[fmt](path, column, where or str(path))


def check_text_column(path, fmt: str, column: str, where: str | None = None) -> None:
    """Fail now, before any work, when the file cannot be opened or has no such text column."""
    path, where = Path(path), where or str(path)
    if fmt == "parquet":
        check_arrow_column(open_parquet(path, where).schema_arrow, column, where)
    elif fmt == "arrow":
        check_arrow_column(arrow_batches(path, where)[0], column, where)
    else:
        next(iter(json_texts(path, column, where)), None)
