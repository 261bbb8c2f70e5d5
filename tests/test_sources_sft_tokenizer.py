"""Instruction tables and tokenizer training from the sources of lillm/sources.py (local files only)."""
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lillm.cli import run_main

import train_tokenizer
from data import prepare_sft
from lillm.errors import CorpusFormatError
from lillm.rows import ColumnMap, read_table_conversations
from lillm.sources import budgeted, file_source
from lillm.tokenizer import Tokenizer


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def inkuba_style(tmp_path):
    """A parquet table laid out like InkubaLM's instruct data: instruction, inputs, targets, task, langs."""
    rows = {"instruction": ["Tafsiri kwa Kiswahili.", "Fassara zuwa Hausa.", "Tafsiri kwa Kiswahili.", "Sema jibu."],
            "inputs": ["Good morning", "Good night", "Thank you", "2 + 2"],
            "targets": ["Habari za asubuhi", "Sai da safe", "Asante", ""],
            "task": ["mt", "mt", "mt", "qa"], "langs": ["swahili", "hausa", "swahili", "swahili"]}
    path = tmp_path / "instruct.parquet"
    pq.write_table(pa.table(rows), path)
    return path


def test_inkuba_layout_is_recognised_and_filtered_by_language(inkuba_style):
    rows, problems = read_table_conversations(file_source(inkuba_style), ColumnMap(lang="langs", keep_langs=("Swahili",)))
    assert [r["messages"][0]["content"] for r in rows] == ["Tafsiri kwa Kiswahili.\n\nGood morning",
                                                           "Tafsiri kwa Kiswahili.\n\nThank you"]
    assert rows[0]["messages"][1] == {"role": "assistant", "content": "Habari za asubuhi"}
    assert rows[0]["lang"] == "swahili" and rows[0]["task"] == "mt"
    assert len(problems) == 1 and "empty assistant turn" in problems[0]   # the row without a target


def test_prepare_sft_reads_a_parquet_table_and_a_messages_column(inkuba_style, tmp_path):
    chats = tmp_path / "chats.jsonl"
    chat = [{"role": "user", "content": "Habari?"}, {"role": "assistant", "content": "Nzuri sana."}]
    chats.write_text(json.dumps({"dialogue": chat, "id": 1}) + "\n", encoding="utf-8")
    out = tmp_path / "sft"
    stats = prepare_sft.main(["--tasks", "none", "--files", str(inkuba_style), "--out", str(out)])
    assert stats["splits"]["train"]["rows"] == 3 and len(stats["skipped_rows"]) == 1
    prepare_sft.main(["--tasks", "none", "--files", str(chats), "--messages-column", "dialogue",
                      "--out", str(tmp_path / "chat")])
    (row,) = [json.loads(line) for line in (tmp_path / "chat" / "train.jsonl").read_text().splitlines()]
    assert row["messages"] == chat


def test_save_to_disk_folder_with_prompt_and_response_columns(tmp_path):
    folder = tmp_path / "aya"
    datasets.Dataset.from_dict({"inputs": ["Swali?", "Tambaya?"], "targets": ["Jibu.", "Amsa."],
                                "language_code": ["swh", "hau"]}).save_to_disk(str(folder))
    stats = prepare_sft.main(["--tasks", "none", "--files", str(folder), "--prompt-column", "inputs",
                              "--response-column", "targets", "--lang-column", "language_code", "--keep-langs", "hau",
                              "--out", str(tmp_path / "out")])
    assert stats["splits"]["train"]["rows"] == 1


def test_missing_columns_list_the_columns_that_exist(inkuba_style, tmp_path, capsys):
    with pytest.raises(CorpusFormatError, match=r"no column 'question'; its columns are \['instruction', 'inputs', "
                                                r"'targets', 'task', 'langs'\]"):
        read_table_conversations(file_source(inkuba_style), ColumnMap("question", "targets"))
    with pytest.raises(SystemExit) as info:
        run_main(prepare_sft.main, ["--tasks", "none", "--files", str(inkuba_style), "--prompt-column", "question",
                          "--response-column", "answer", "--out", str(tmp_path / "o")])
    assert info.value.code == 2 and "its columns are" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        run_main(prepare_sft.main, ["--tasks", "none", "--hf", "lelapa/Inkuba-instruct:swahili", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "HF_DATASETS_OFFLINE" in err and "--files" in err


def test_budgeted_stops_before_the_budget():
    docs = ["aaaa", "bb", "cccccc", "d"]
    assert list(budgeted(docs, max_bytes=7)) == ["aaaa", "bb"]
    assert list(budgeted(docs, max_docs=3)) == ["aaaa", "bb", "cccccc"]


def test_train_tokenizer_streams_parquet_and_jsonl_under_a_byte_budget(tmp_path):
    words = "habari za asubuhi rafiki yangu watoto wanacheza mpira sannu yara suna wasan".split()
    texts = [" ".join(words[(i + j) % len(words)] for j in range(8)) + f" {i}" for i in range(400)]
    pq.write_table(pa.table({"body": texts}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts[:50]), encoding="utf-8")
    out = tmp_path / "tok" / "tokenizer.json"
    train_tokenizer.main(["--files", str(tmp_path / "a.parquet"), str(tmp_path / "b.jsonl"), "--text-column", "body",
                          "--vocab-size", "300", "--min-frequency", "1", "--max-bytes", "6000",
                          "--holdout-every", "10", "--out", str(out)])
    tokenizer = Tokenizer.from_file(out)
    assert tokenizer.vocab_size == 300
    report = json.loads((out.parent / "tokenizer.report.json").read_text())
    assert set(report["languages"]) == {str(tmp_path / "a.parquet"), str(tmp_path / "b.jsonl")}


def test_train_tokenizer_offline_hub_name_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run_main(train_tokenizer.main, ["--hf", "lelapa/Inkuba-Mono:swa", "--out", str(tmp_path / "t.json")])
    assert info.value.code == 2 and "lelapa/Inkuba-Mono" in capsys.readouterr().err
