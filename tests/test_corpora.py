"""Tests for lillm/corpora.py: each reader on tiny files, the data dir rules, the registry."""

from pathlib import Path

import pytest

from lillm import corpora
from lillm.corpora import CORPORA, CorpusFormatError, data_dir, documents_for, read_documents


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_txt_splits_on_lf_crlf_and_bare_cr_and_skips_blank_lines(tmp_path):
    path = write_bytes(tmp_path / "mixed.txt", "one\ntwo\r\nthree\rfour\n\n  \r\nfive ɗ\r".encode())
    assert list(read_documents(path, "txt")) == ["one", "two", "three", "four", "five ɗ"]


def test_txt_drops_byte_order_mark(tmp_path):
    path = write_bytes(tmp_path / "bom.txt", "\ufeffHabari\n".encode())
    assert list(read_documents(path, "txt")) == ["Habari"]


def test_tsv_keeps_quoted_newlines_inside_a_field(tmp_path):
    text = 'tweet\tlabel\n"line one\nline two"\tpositive\nsecond\tnegative\n'
    path = write_bytes(tmp_path / "t.tsv", text.encode())
    assert list(read_documents(path, "tsv", text_column="tweet")) == ["line one\nline two", "second"]


def test_csv_reads_named_column(tmp_path):
    path = write_bytes(tmp_path / "t.csv", b'Title,Text\nA,"body, with comma"\nB,\n')
    assert list(read_documents(path, "csv", text_column="Text")) == ["body, with comma"]


def test_missing_column_error_names_file_columns_and_flag(tmp_path):
    path = write_bytes(tmp_path / "t.tsv", b"tweet\tlabel\nx\ty\n")
    with pytest.raises(CorpusFormatError) as info:
        list(read_documents(path, "tsv", text_column="text"))
    message = str(info.value)
    assert "t.tsv" in message and "'text'" in message and "['tweet', 'label']" in message
    assert "--text-column" in message


def test_masakhanews_joins_headline_and_text_with_newline(tmp_path):
    text = 'category\theadline\ttext\turl\nsports\tKichwa\t"Aya ya kwanza.\nAya ya pili."\thttp://x\n'
    path = write_bytes(tmp_path / "news.tsv", text.encode())
    assert list(read_documents(path, "masakhanews")) == ["Kichwa\nAya ya kwanza.\nAya ya pili."]


def test_conll_joins_tokens_of_each_sentence_with_spaces(tmp_path):
    text = "Shugaba B-PER\nBuhari I-PER\nya O\n. O\n\n\nSabon O\n O\nlabari O\n"
    path = write_bytes(tmp_path / "ner.txt", text.encode())
    assert list(read_documents(path, "conll")) == ["Shugaba Buhari ya .", "Sabon labari"]


def test_conll_line_without_tag_names_file_and_line(tmp_path):
    path = write_bytes(tmp_path / "bad.txt", b"token O\nlonely\n")
    with pytest.raises(CorpusFormatError, match=r"bad\.txt, line 2"):
        list(read_documents(path, "conll"))


def test_missing_file_error_names_file_and_data_dir_setting(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        list(read_documents(tmp_path / "nope.txt", "txt"))
    assert "nope.txt" in str(info.value) and "LILLM_DATA_DIR" in str(info.value) and "--data-dir" in str(info.value)


def test_unknown_format_is_rejected(tmp_path):
    with pytest.raises(CorpusFormatError, match="unknown format"):
        read_documents(tmp_path / "x", "xml")


def test_data_dir_prefers_argument_then_environment(tmp_path, monkeypatch):
    explicit, from_env = tmp_path / "a", tmp_path / "b"
    explicit.mkdir()
    from_env.mkdir()
    monkeypatch.setenv("LILLM_DATA_DIR", str(from_env))
    assert data_dir(explicit) == explicit
    assert data_dir() == from_env


def test_missing_data_dir_says_how_to_set_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LILLM_DATA_DIR", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="LILLM_DATA_DIR"):
        data_dir()


def test_documents_for_reads_selected_languages_from_data_dir(tmp_path):
    for name, lines in (("lacuna-swa", "Habari\nYako\n"), ("lacuna-hau", "Sannu\n")):
        path = tmp_path / CORPORA[name].relpath
        path.parent.mkdir(parents=True)
        path.write_text(lines, encoding="utf-8")
    with pytest.warns(UserWarning, match="skipping corpora missing"):
        got = list(documents_for(["swa"], data_dir=tmp_path, kinds=["mono"]))
    assert got == [("lacuna-swa", "Habari"), ("lacuna-swa", "Yako")]


def test_documents_for_with_explicit_missing_name_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="hau.txt"):
        list(documents_for([], names=["lacuna-hau"], data_dir=tmp_path))


def test_unknown_corpus_name_lists_known_names():
    with pytest.raises(ValueError, match="lacuna-swa"):
        corpora.select_corpora([], names=["lacuna-klingon"])


def test_registry_names_splits_and_formats_are_consistent():
    assert {c.lang for c in CORPORA.values()} == {"swa", "hau", "zul", "xho", "eng"}  # eng: translation sources
    for name, corpus in CORPORA.items():
        assert corpus.name == name and corpus.lang in name
        assert corpus.split in ("train", "dev", "test") and corpus.fmt in corpora.FORMATS
        assert "@" in corpus.origin and corpus.license
        assert (corpus.text_column is not None) == (corpus.fmt in ("csv", "tsv"))


def test_every_registered_file_exists_in_real_data_dir():
    try:
        root = data_dir()
    except FileNotFoundError:
        pytest.skip("real data directory not present")
    missing = [c.relpath for c in CORPORA.values() if not (root / c.relpath).is_file()]
    assert missing == []
    assert len(corpora.available_corpora(root)) == len(CORPORA)
