import json
from collections import Counter
from pathlib import Path

import pytest

from data import prepare_sft
from lillm import challenge
from lillm.corpora import data_dir
from lillm.rows import read_conversations



def real_data_dir():
    try:
        return data_dir()
    except FileNotFoundError:
        pytest.skip("real data directory absent")


def load(folder: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = real_data_dir()
    for rel in ("afrisenti/swa/train.tsv", "mafand_mt/en-hau/dev.en", "masakhanews/data/swa/dev.tsv",
                "afrixnli_mt_joynaomi81/dev/xnli.dev - eng_dataset.csv"):
        if not (root / rel).is_file():
            pytest.skip(f"{rel} absent from the data directory")
    out = tmp_path_factory.mktemp("sft")
    stats = prepare_sft.main(["--out", str(out), "--limit", "30", "--data-dir", str(root)])
    return out, stats


def test_labels_are_in_the_challenges_words(built):
    out, _ = built
    rows = load(out, "train") + load(out, "test")
    labels = {}
    for row in rows:
        if "label" in row:
            labels.setdefault((row["task"], row["lang"]), set()).add(row["label"])
            assert row["messages"][-1]["content"] == row["label"] and row["label"] in row["options"]
    assert labels[("sentiment", "swa")] == {"Chanya", "Wastani", "Hasi"}
    assert labels[("sentiment", "hau")] == {"Kyakkyawa", "Tsaka-tsaki", "Korau"}
    assert labels[("nli", "swa")] == labels[("nli", "hau")] == {"0", "1", "2"}
    assert labels[("news", "swa")] <= set(challenge.NEWS_TOPICS)


def test_splits_follow_the_sources(built):
    out, stats = built
    by_split = {split: Counter((r["task"], r["lang"]) for r in load(out, split)) for split in ("train", "dev", "test")}
    for task in challenge.TASKS:
        for lang in ("swa", "hau"):
            assert by_split["train"][(task, lang)] == 30 and by_split["test"][(task, lang)] == 30
    assert by_split["dev"][("sentiment", "swa")] == 30
    assert by_split["dev"][("nli", "swa")] == 0  # AfriXNLI has dev and test only
    sources = {split: {r["source"] for r in load(out, split) if r["task"] == "nli"} for split in ("train", "test")}
    assert all(s.startswith("nli-") and "/dev/" in s for s in sources["train"])
    assert all("/test/" in s for s in sources["test"])
    translation = [r for r in load(out, "dev") if r["task"] == "translation" and r["lang"] == "hau"]
    assert all("dev.hau" in r["source"] for r in translation)
    assert "nli" in " ".join(stats["notes"])


def test_nli_premise_and_hypothesis_are_joined_to_the_english_gold_label(tmp_path):
    root = real_data_dir()
    if not (root / challenge.XNLI_DIR).is_dir():
        pytest.skip("AfriXNLI files absent")
    swa = list(challenge.read_nli(root, "swa", "train"))
    hau = list(challenge.read_nli(root, "hau", "train"))
    # XNLI dev, promptID 1: "He called his mom ..." is neutral, "He didn't say a word." a contradiction.
    assert swa[0][1] == ("Na akasema, Mama, niko nyumbani.",
                         "Alimpigia simu mama yake mara tu basi la shule lilipomshusha.") and swa[0][2] == "1"
    assert hau[1][1][1] == "Bai ce wata kalma ba." and hau[1][2] == "2"
    assert len(swa) == len(hau) == 2490
    assert list(challenge.read_nli(root, "swa", "dev")) == []


def test_instructions_vary_deterministically_in_both_languages(built, tmp_path):
    out, _ = built
    rows = load(out, "train")
    for task in challenge.TASKS:
        langs = {r["instruction_lang"] for r in rows if r["task"] == task and r["lang"] == "swa"}
        assert langs == {"swa", "en"}, task
    again = tmp_path / "again"
    prepare_sft.main(["--out", str(again), "--limit", "30", "--tasks", "sentiment"])
    expected = [r for r in rows if r["task"] == "sentiment"]
    assert load(again, "train") == expected


def test_the_output_reads_back_without_problems(built):
    out, _ = built
    rows, problems = read_conversations(out / "train.jsonl", strict=True)
    assert rows and not problems
    assert not list(out.glob("*.tmp"))


# ---- the user's own files (no real data needed) --------------------------------------------------------
def test_user_csv_and_jsonl_files_with_alpaca_prompt_and_bad_rows_reported(tmp_path, capsys):
    csv_path = tmp_path / "mine.csv"
    csv_path.write_text("instruction,input,target\nTranslate to Swahili.,Good morning,Habari za asubuhi\n"
                        "Say hi.,,Jambo\nNo target here.,x,\n", encoding="utf-8")
    jsonl_path = tmp_path / "mine.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Jambo"}], "task": "chat"}
    jsonl_path.write_text(json.dumps(good) + "\n{broken\n" + json.dumps({"instruction": "Sema", "output": "Sawa"})
                          + "\n", encoding="utf-8")
    out = tmp_path / "out"
    stats = prepare_sft.main(["--tasks", "none", "--files", str(csv_path), str(jsonl_path),
                              "--test-files", str(csv_path), "--alpaca", "--out", str(out)])
    train = load(out, "train")
    assert len(train) == 2 + 2 and len(load(out, "test")) == 2 and load(out, "dev") == []
    first = train[0]["messages"][0]["content"]
    assert first.startswith("Below is an instruction") and "### Input:\nGood morning\n\n### Response:\n" in first
    assert "### Input" not in train[1]["messages"][0]["content"]  # no input: the Alpaca variant without it
    assert train[1]["messages"][1]["content"] == "Jambo"
    skipped = stats["skipped_rows"]
    assert any(f"{csv_path}:4" in s for s in skipped) and any(f"{jsonl_path}, line 2" in s for s in skipped)
    assert f"{jsonl_path}, line 2" in capsys.readouterr().out
    with pytest.raises(ValueError, match="mine.csv:4: needs 'instruction' and a non-empty 'target'"):
        prepare_sft.main(["--tasks", "none", "--files", str(csv_path), "--strict", "--out", str(tmp_path / "out2")])


def test_unknown_file_type_and_empty_selection_are_refused(tmp_path):
    (tmp_path / "x.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="unknown file type '.txt'"):
        prepare_sft.main(["--tasks", "none", "--files", str(tmp_path / "x.txt"), "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="no rows"):
        prepare_sft.main(["--tasks", "none", "--out", str(tmp_path / "o")])
