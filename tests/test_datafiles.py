"""Tests for lillm/datafiles.py: local parquet, Arrow and JSON files read a batch at a time, with the texts
`datasets` would give, and one clear error for each bad file."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lillm.datafiles import check_text_column, read_texts
from lillm.errors import CorpusFormatError


def test_a_parquet_row_group_is_not_loaded_whole(tmp_path):
    """One 12 MB row group: Arrow never holds more than a small part of it while the texts are read."""
    rng = np.random.default_rng(0)
    texts = [rng.bytes(150).hex() for _ in range(40000)]     # incompressible: the file is as big as the text
    pq.write_table(pa.table({"text": texts}), tmp_path / "one_group.parquet", row_group_size=len(texts))
    assert pq.ParquetFile(tmp_path / "one_group.parquet").metadata.num_row_groups == 1
    before, largest, count = pa.total_allocated_bytes(), 0, 0
    for count, text in enumerate(read_texts(tmp_path / "one_group.parquet", "parquet", "text"), start=1):
        if count % 500 == 1:
            largest = max(largest, pa.total_allocated_bytes() - before)
            assert text == texts[count - 1]
    assert count == len(texts)
    assert largest < sum(map(len, texts)) / 3, largest


def test_texts_are_stripped_and_none_and_empty_ones_skipped(tmp_path):
    values = ["  a  ", None, "", "   ", "b\n"]
    pq.write_table(pa.table({"text": values}), tmp_path / "t.parquet")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": v}) + "\n" for v in values) + "\n\n")
    for name, fmt in (("t.parquet", "parquet"), ("t.jsonl", "json")):
        assert list(read_texts(tmp_path / name, fmt, "text")) == ["a", "b"], name


def test_a_json_document_of_rows_or_of_columns_is_read_whole(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=2))
    (tmp_path / "columns.json").write_text(json.dumps({"text": ["a", "b"], "n": [1, 2]}, indent=2))
    for name in ("rows.json", "columns.json"):
        assert list(read_texts(tmp_path / name, "json", "text")) == ["a", "b"], name


def test_bad_files_get_one_line_naming_the_file_and_the_fix(tmp_path):
    pq.write_table(pa.table({"n": [1, 2], "text": ["a", "b"]}), tmp_path / "numbers.parquet")
    with pytest.raises(CorpusFormatError, match=r"numbers\.parquet: column 'n' holds int64 values, not text"):
        check_text_column(tmp_path / "numbers.parquet", "parquet", "n")
    with pytest.raises(CorpusFormatError, match=r"has no column 'body'; its columns are \['n', 'text'\]"):
        check_text_column(tmp_path / "numbers.parquet", "parquet", "body")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(CorpusFormatError, match=r"broken\.parquet: cannot be read as parquet"):
        check_text_column(tmp_path / "broken.parquet", "parquet", "text")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(CorpusFormatError, match=r"bad\.jsonl, line 2: not JSON"):
        list(read_texts(tmp_path / "bad.jsonl", "json", "text"))
    (tmp_path / "numbers.jsonl").write_text('{"text": "a"}\n{"text": 5}\n')
    with pytest.raises(CorpusFormatError, match=r"column 'text' holds int values, not text"):
        list(read_texts(tmp_path / "numbers.jsonl", "json", "text"))
    (tmp_path / "list.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(CorpusFormatError, match=r"list\.jsonl, line 2: a JSON list, not an object"):
        list(read_texts(tmp_path / "list.jsonl", "json", "text"))
    (tmp_path / "not.arrow").write_bytes(b"nothing")
    with pytest.raises(CorpusFormatError, match=r"not\.arrow: cannot be read as Arrow IPC"):
        check_text_column(tmp_path / "not.arrow", "arrow", "text")
