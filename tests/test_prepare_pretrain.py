"""Tests for data/prepare_pretrain.py: token bins round-trip, are deterministic, and fail clearly."""
import json
import unicodedata
from collections import Counter

import numpy as np
import pytest

from lillm import bins
from lillm.bin_format import check_bins
from lillm.data import BinLoader
from lillm.errors import EmptyCorpusError
from lillm.tokenizer import Tokenizer, train_bpe

from data import prepare_pretrain

prepare = prepare_pretrain.prepare

SWAHILI = ["Habari za asubuhi rafiki yangu", "Watoto wanacheza mpira uwanjani", "Mvua inanyesha sana leo",
           "Tunakwenda sokoni kununua matunda", "Mwalimu anafundisha darasani", "Kahawa ya Kenya ni tamu",
           "Ndege wanaimba mitini alfajiri", "Kesho tutasafiri kwenda Mombasa"]
HAUSA = ["Ina kwana abokina", "Yara suna wasan ƙwallo", "Ruwan sama yana sauka sosai yau",
         "Za mu je kasuwa mu sayi 'ya'yan itace", "Malami yana koyarwa a aji", "Ɗan'uwana ya tafi Kano"]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    texts = (SWAHILI + HAUSA) * 3 + ["café naïve ƙ ɗ ɓ ƴ é"]
    tokenizer = train_bpe(texts, vocab_size=300, min_frequency=1, show_progress=False)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(path)
    return path


@pytest.fixture
def corpus(tmp_path):
    """A txt and a tsv file; with one exact duplicate, one NFD document and one empty row."""
    txt = tmp_path / "swa.txt"
    txt.write_text("\n".join(SWAHILI + [SWAHILI[0], "Cafe\u0301 ya ze\u0301"]) + "\n", encoding="utf-8")
    tsv = tmp_path / "hau.tsv"
    rows = ["tweet\tlabel"] + [f"{text}\tneutral" for text in HAUSA] + ["\tneutral", "Café ya zé\tpositive"]
    tsv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return [txt, tsv]


def run(tokenizer_path, corpus, out, **settings):
    defaults = dict(files=corpus, text_column="tweet", val_fraction=0.3, progress=False)
    return prepare(tokenizer_path, out, **{**defaults, **settings})


def decode_documents(tokenizer_path, bin_path) -> list[str]:
    tokenizer = Tokenizer.from_file(tokenizer_path)
    tokens = np.fromfile(bin_path, dtype=np.uint16).tolist()
    assert tokens[-1] == tokenizer.eos_id, "every document, the last too, ends with </s>"
    documents, current = [], []
    for token in tokens:
        if token == tokenizer.eos_id:
            documents.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    return documents


def expected_documents() -> Counter:
    nfc = unicodedata.normalize("NFC", "Cafe\u0301 ya ze\u0301")
    return Counter(SWAHILI + HAUSA + [nfc])   # the repeat and the NFC twin are gone, the empty row too


def test_prepare_round_trips_the_normalised_deduplicated_documents(tokenizer_path, corpus, tmp_path):
    meta = run(tokenizer_path, corpus, tmp_path / "out")
    train = decode_documents(tokenizer_path, tmp_path / "out" / "train.bin")
    val = decode_documents(tokenizer_path, tmp_path / "out" / "val.bin")
    assert train and val
    assert Counter(train + val) == expected_documents()
    assert meta["splits"]["train"]["documents"] == len(train)
    assert meta["splits"]["val"]["documents"] == len(val)


def test_nfc_normalisation_is_applied_before_deduplication(tokenizer_path, corpus, tmp_path):
    run(tokenizer_path, corpus, tmp_path / "out")
    documents = decode_documents(tokenizer_path, tmp_path / "out" / "train.bin") + \
        decode_documents(tokenizer_path, tmp_path / "out" / "val.bin")
    assert "Café ya zé" in documents and "Cafe\u0301 ya ze\u0301" not in documents
    assert all(unicodedata.is_normalized("NFC", d) for d in documents)


def test_exact_duplicates_are_dropped_and_counted_per_source(tokenizer_path, corpus, tmp_path):
    meta = run(tokenizer_path, corpus, tmp_path / "out")
    sources = meta["sources"]
    assert sources[str(corpus[0])]["duplicates_dropped"] == 1        # SWAHILI[0] again
    assert sources[str(corpus[1])]["duplicates_dropped"] == 1        # the NFC twin of the txt's last line


def test_running_twice_or_with_two_workers_gives_byte_identical_files(tokenizer_path, corpus, tmp_path):
    many = tmp_path / "many.txt"   # enough small chunks for two workers to finish out of order
    words = " ".join(SWAHILI).split()
    many.write_text("\n".join(" ".join(words[i % 30:i % 30 + 1 + i % 7]) + f" {i}" for i in range(400)),
                    encoding="utf-8")
    corpus = corpus + [many]
    run(tokenizer_path, corpus, tmp_path / "a", workers=1, chunk_bytes=40)
    run(tokenizer_path, corpus, tmp_path / "b", workers=1)
    run(tokenizer_path, corpus, tmp_path / "c", workers=2, chunk_bytes=40)
    for name in ("train.bin", "val.bin", "meta.json"):
        first = (tmp_path / "a" / name).read_bytes()
        assert first == (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name


def test_split_depends_on_document_text_not_position(tokenizer_path, corpus, tmp_path):
    run(tokenizer_path, corpus, tmp_path / "forward")
    lines = corpus[0].read_text(encoding="utf-8").splitlines()
    corpus[0].write_text("\n".join(reversed(lines)) + "\n", encoding="utf-8")
    run(tokenizer_path, list(reversed(corpus)), tmp_path / "backward")
    for split in ("train", "val"):
        forward = decode_documents(tokenizer_path, tmp_path / "forward" / f"{split}.bin")
        backward = decode_documents(tokenizer_path, tmp_path / "backward" / f"{split}.bin")
        assert Counter(forward) == Counter(backward), split


def test_meta_counts_agree_with_the_bins_and_uint16_is_chosen(tokenizer_path, corpus, tmp_path):
    meta = run(tokenizer_path, corpus, tmp_path / "out")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 300
    assert meta["tokenizer_sha256"] == Tokenizer.from_file(tokenizer_path).sha256
    assert json.loads((tmp_path / "out" / "meta.json").read_text(encoding="utf-8")) == meta
    for split, info in meta["splits"].items():
        tokens = np.fromfile(tmp_path / "out" / f"{split}.bin", dtype=np.uint16)
        assert (tmp_path / "out" / f"{split}.bin").stat().st_size == 2 * info["tokens"] == 2 * len(tokens)
        assert int((tokens == meta["eos_id"]).sum()) == info["documents"]
        assert sum(s["tokens"] for s in info["sources"].values()) == info["tokens"]
        assert info["bytes_per_token"] == pytest.approx(info["bytes"] / info["tokens"])
    all_text = "".join(expected_documents().elements())
    assert sum(i["bytes"] for i in meta["splits"].values()) == len(all_text.encode("utf-8"))
    check_bins(tmp_path / "out", tokenizer=Tokenizer.from_file(tokenizer_path))


def test_prepared_bins_feed_the_loader(tokenizer_path, corpus, tmp_path):
    run(tokenizer_path, corpus, tmp_path / "out")
    x, y = BinLoader(tmp_path / "out" / "train.bin", seq_len=8, batch_size=2).next_batch()
    assert x.shape == (2, 8) and int(x.max()) < 300


def test_missing_file_is_named_and_nothing_is_written(tokenizer_path, corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.txt not found"):
        run(tokenizer_path, corpus + [tmp_path / "nope.txt"], tmp_path / "out")
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_missing_registered_corpus_names_corpus_and_data_dir(tokenizer_path, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"corpus lacuna-swa: .*lacuna_language_corpus/swa/swa\.txt not "
                                                r"found; check --data-dir"):
        prepare(tokenizer_path, tmp_path / "out", corpora=["lacuna-swa"], data_dir=tmp_path, progress=False)


def test_empty_corpus_is_named(tokenizer_path, corpus, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n", encoding="utf-8")
    with pytest.raises(EmptyCorpusError, match=r"corpus .*blank\.txt .*gave no documents"):
        run(tokenizer_path, corpus + [blank], tmp_path / "out")
    copy = tmp_path / "copy.txt"
    copy.write_text(HAUSA[0] + "\n", encoding="utf-8")
    with pytest.raises(EmptyCorpusError, match=r"copy\.txt.*1 duplicate"):
        run(tokenizer_path, corpus + [copy], tmp_path / "out")
    assert not (tmp_path / "out" / "meta.json").exists()
    assert not list((tmp_path / "out").glob(".*.tmp")), "temporary files are cleaned up"


def test_table_without_text_column_is_refused_with_the_fix(tokenizer_path, corpus, tmp_path):
    with pytest.raises(ValueError, match=r"hau\.tsv is a tsv table: pass --text-column"):
        run(tokenizer_path, corpus, tmp_path / "out", text_column=None)


def test_interrupted_run_leaves_no_complete_looking_output(tokenizer_path, corpus, tmp_path, monkeypatch):
    run(tokenizer_path, corpus, tmp_path / "out")
    calls = []

    def failing_encode(tokenizer, texts, dtype):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real_encode(tokenizer, texts, dtype)

    real_encode = bins.encode_documents
    monkeypatch.setattr(bins, "encode_documents", failing_encode)
    old_train = (tmp_path / "out" / "train.bin").read_bytes()
    with pytest.raises(KeyboardInterrupt):
        run(tokenizer_path, corpus, tmp_path / "out", chunk_bytes=16)
    assert (tmp_path / "out" / "train.bin").read_bytes() == old_train   # the old, complete run stays
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_cli_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare_pretrain.main(["--help"])
    assert exit_info.value.code == 0
    assert "--val-fraction" in capsys.readouterr().out


def test_real_corpus_prepares_when_data_is_present(tokenizer_path, tmp_path):
    from lillm.corpora import data_dir
    try:
        data_dir()
    except FileNotFoundError:
        pytest.skip("real data directory not present")
    meta = prepare(tokenizer_path, tmp_path / "out", corpora=["afrisenti-swa-train"], val_fraction=0.05,
                   progress=False)
    assert meta["splits"]["train"]["documents"] > 1000
    check_bins(tmp_path / "out", tokenizer=Tokenizer.from_file(tokenizer_path))
    with pytest.warns(UserWarning, match=r"afrisenti-swa-dev is a dev split: pretraining on it leaks"):
        prepare(tokenizer_path, tmp_path / "dev", corpora=["afrisenti-swa-dev"], val_fraction=0.1, progress=False)
