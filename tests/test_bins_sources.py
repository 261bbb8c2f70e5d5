"""Tests for lillm/sources.py, lillm/datafiles.py and lillm/bins.py: local data files (read by pyarrow and
json) and corpora read through `datasets` give the bins of the same text as .txt, de-duplication on disk
drops exactly what a set in memory drops, mixtures, budgets, shards read by the loader as one stream, and
every offline / bad-column error."""
import gzip
import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lillm.cli import run_main
import torch

from data import prepare_pretrain
from lillm import hub
from lillm.bins import prepare, write_bins
from lillm.combine import combine_bins
from lillm.corpora import CORPORA, HUB_CORPORA
from lillm.bin_format import check_bins
from lillm.data import BinLoader, iter_eval_batches
from lillm.errors import CorpusFormatError, FlagError, HubUnavailableError, SourceError
from lillm.sources import dataset_source, parse_mix, resolve_sources
from lillm.tokenizer import Tokenizer, train_bpe

WORDS = ("habari za asubuhi rafiki yangu watoto wanacheza mpira uwanjani mvua inanyesha sana leo ina kwana "
         "abokina yara suna wasan ƙwallo ruwan sama yana sauka sosai yau café naïve").split()


def sentences(count: int, seed: int, prefix: str = "") -> list[str]:
    rng = np.random.default_rng(seed)
    return [prefix + " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) + f" {seed}-{i}" for i in range(count)]


SWAHILI = sentences(300, 1)
HAUSA = sentences(300, 2, prefix="Hausa: ")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    tokenizer = train_bpe(SWAHILI + HAUSA, vocab_size=300, min_frequency=1, show_progress=False)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same Swahili documents as .txt, parquet (row groups of 64), JSON lines (plain, gzipped, one JSON
    array), Arrow IPC (stream and file format, batches of 50) and a save_to_disk folder."""
    root = tmp_path_factory.mktemp("files")
    (root / "swa.txt").write_text("\n".join(SWAHILI) + "\n", encoding="utf-8")
    table = pa.table({"id": list(range(len(SWAHILI))), "text": SWAHILI})
    pq.write_table(table, root / "swa.parquet", row_group_size=64)
    rows = [{"content": text, "n": i} for i, text in enumerate(SWAHILI)]
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    (root / "swa.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(root / "swa.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    (root / "swa.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False), encoding="utf-8")
    for name, new in (("swa.arrow", pa.ipc.new_stream), ("swa_file.arrow", pa.ipc.new_file)):
        with pa.OSFile(str(root / name), "wb") as sink, new(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=50):
                writer.write_batch(batch)
    datasets.Dataset.from_dict({"text": SWAHILI}).save_to_disk(str(root / "swa_disk"))
    (root / "hau.txt").write_text("\n".join(HAUSA) + "\n", encoding="utf-8")
    return root


def bin_bytes(folder) -> dict:
    return {name: (folder / name).read_bytes() for name in ("train.bin", "val.bin")}


def run(tokenizer_path, out, **settings):
    return prepare(tokenizer_path, out, **{"val_fraction": 0.1, "progress": False, **settings})


# ---- every way of giving the same text gives the same bins --------------------------------------------
def test_parquet_jsonl_disk_and_streamed_dataset_give_the_bins_of_the_txt_file(tokenizer_path, files, tmp_path):
    run(tokenizer_path, tmp_path / "txt", files=[files / "swa.txt"])
    expected = bin_bytes(tmp_path / "txt")
    run(tokenizer_path, tmp_path / "parquet", files=[files / "swa.parquet"])
    run(tokenizer_path, tmp_path / "jsonl", files=[files / "swa.jsonl"], text_column="content")
    run(tokenizer_path, tmp_path / "disk", files=[files / "swa_disk"])
    for name in ("swa.jsonl.gz", "swa.json"):
        run(tokenizer_path, tmp_path / name, files=[files / name], text_column="content")
    for name in ("swa.arrow", "swa_file.arrow"):
        run(tokenizer_path, tmp_path / name, files=[files / name])
    streamed = datasets.load_dataset("parquet", data_files=str(files / "swa.parquet"), split="train", streaming=True)
    assert isinstance(streamed, datasets.IterableDataset)
    run(tokenizer_path, tmp_path / "stream", sources=[dataset_source("stream", streamed)])
    for name in ("parquet", "jsonl", "disk", "stream", "swa.jsonl.gz", "swa.json", "swa.arrow", "swa_file.arrow"):
        assert bin_bytes(tmp_path / name) == expected, name


def test_local_data_files_are_read_without_importing_datasets(tokenizer_path, files, tmp_path):
    """`datasets` costs hundreds of MB in the reading process (and its workers): local files do not need it."""
    script = "\n".join([
        "import sys",
        "from lillm.bins import prepare",
        "from lillm.sources import file_source",
        f"prepare({str(tokenizer_path)!r}, {str(tmp_path / 'out')!r}, files=[{str(files / 'swa.parquet')!r}], "
        f"progress=False, val_fraction=0.1, workers=2)",
        f"list(file_source({str(files / 'swa.jsonl.gz')!r}, 'content').documents())",
        f"list(file_source({str(files / 'swa.arrow')!r}).documents())",
        "print('datasets' in sys.modules)"])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.strip() == "False"


def test_registered_corpus_txt_and_parquet_give_byte_identical_bins(tokenizer_path, files, tmp_path):
    data_dir = tmp_path / "data"
    registered = data_dir / CORPORA["lacuna-swa"].relpath
    registered.parent.mkdir(parents=True)
    registered.write_text("\n".join(SWAHILI) + "\n", encoding="utf-8")
    run(tokenizer_path, tmp_path / "registry", corpora=["lacuna-swa"], data_dir=data_dir, workers=2, chunk_bytes=500)
    run(tokenizer_path, tmp_path / "txt", files=[files / "swa.txt"])
    run(tokenizer_path, tmp_path / "parquet", files=[files / "swa.parquet"], workers=2, chunk_bytes=300)
    assert bin_bytes(tmp_path / "registry") == bin_bytes(tmp_path / "txt") == bin_bytes(tmp_path / "parquet")


# ---- de-duplication on disk ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def duplicated(tmp_path_factory):
    """Two sources with known duplicates: repeats within each, across the two, and NFD twins of NFC texts."""
    root = tmp_path_factory.mktemp("duplicated")
    rng = np.random.default_rng(5)
    pool = sentences(150, 9)
    swahili = [pool[i] for i in rng.integers(0, 100, size=400)]
    hausa = [pool[i] for i in rng.integers(50, 150, size=300)]
    hausa = [unicodedata.normalize("NFD", text) if i % 3 == 0 else text for i, text in enumerate(hausa)]
    (root / "swa.txt").write_text("\n".join(swahili) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": hausa}), root / "hau.parquet", row_group_size=50)
    return root, swahili, hausa


def decoded_documents(tokenizer_path, folder) -> list[str]:
    tokenizer = Tokenizer.from_file(tokenizer_path)
    documents = []
    for name in ("train.bin", "val.bin"):
        ids = np.fromfile(folder / name, dtype=np.uint16)
        ends = np.flatnonzero(ids == tokenizer.eos_id)
        documents += [tokenizer.decode(ids[start + 1:end].tolist())
                      for start, end in zip(np.concatenate([[-1], ends[:-1]]), ends)]
    return documents


def test_deduplication_on_disk_drops_exactly_the_documents_a_set_in_memory_drops(tokenizer_path, duplicated,
                                                                                  tmp_path):
    root, swahili, hausa = duplicated
    sources = resolve_sources(files=[root / "swa.txt", root / "hau.parquet"])
    weights = parse_mix([f"{root / 'swa.txt'}=0.6", f"{root / 'hau.parquet'}=0.4"], [s.name for s in sources])

    def bins(name, **settings):
        meta = write_bins(tokenizer_path, tmp_path / name, sources, val_fraction=0.1, progress=False, **settings)
        return meta, bin_bytes(tmp_path / name)

    for mix in (None, weights):
        in_memory = bins("memory", mix=mix, recent_digests=10**9)   # never spills: the Python set of before
        on_disk = bins("disk", mix=mix, recent_digests=3, workers=2, chunk_bytes=400)   # spills every 3 digests
        assert on_disk == in_memory
        assert not list((tmp_path / "disk").glob(".dedup-*"))       # the spill folder is gone
    # What the set drops, one source after the other: every NFC text after its first occurrence.
    meta, _ = bins("sequential", recent_digests=3)
    texts = [unicodedata.normalize("NFC", text) for text in swahili + hausa]
    first = list(dict.fromkeys(texts))
    dropped = {name: info["duplicates_dropped"] for name, info in meta["sources"].items()}
    assert dropped == {str(root / "swa.txt"): len(swahili) - len(set(swahili)),
                       str(root / "hau.parquet"): len(hausa) - (len(first) - len(set(swahili)))}
    assert sorted(decoded_documents(tokenizer_path, tmp_path / "sequential")) == sorted(first)


# ---- mixtures and budgets --------------------------------------------------------------------------
def test_two_source_mixture_reaches_its_weights_within_one_percent(tokenizer_path, files, tmp_path):
    mix = [f"{files / 'swa.txt'}=0.25", f"{files / 'hau.txt'}=0.75"]
    meta = run(tokenizer_path, tmp_path / "mix", files=[files / "swa.txt", files / "hau.txt"], mix=mix)
    train = meta["splits"]["train"]["sources"]
    total = sum(counts["tokens"] for counts in train.values())
    swahili_share = train[str(files / "swa.txt")]["tokens"] / total
    assert swahili_share == pytest.approx(0.25, abs=0.01)
    assert meta["mixture"]["achieved"][str(files / "swa.txt")] == pytest.approx(swahili_share)
    assert meta["mixture"]["ended_by"].startswith(str(files / "hau.txt"))   # the 0.75 source runs out first
    # interleaved, not one after the other: Hausa documents appear early in train.bin
    tokens = np.fromfile(tmp_path / "mix" / "train.bin", dtype=np.uint16)
    run(tokenizer_path, tmp_path / "mix2", files=[files / "swa.txt", files / "hau.txt"], mix=mix, workers=2,
        chunk_bytes=200)
    assert bin_bytes(tmp_path / "mix") == bin_bytes(tmp_path / "mix2"), "a mixture does not depend on workers"
    assert len(tokens) == meta["splits"]["train"]["tokens"]


def test_max_docs_and_max_tokens_stop_a_source(tokenizer_path, files, tmp_path):
    meta = run(tokenizer_path, tmp_path / "docs", files=[files / "swa.txt", files / "hau.txt"],
               max_docs=[f"{files / 'hau.txt'}=50"], val_fraction=0.0)
    counts = meta["splits"]["train"]["sources"]
    assert counts[str(files / "hau.txt")]["documents"] == 50
    assert counts[str(files / "swa.txt")]["documents"] == len(SWAHILI)
    meta = run(tokenizer_path, tmp_path / "tokens", files=[files / "swa.parquet"], max_tokens=["1000"],
               val_fraction=0.0, workers=2, chunk_bytes=100)
    tokens = meta["splits"]["train"]["tokens"]
    assert 950 < tokens <= 1000    # stops at the first document that would exceed the budget


def test_mix_errors_name_the_sources(tokenizer_path, files, tmp_path):
    both = [files / "swa.txt", files / "hau.txt"]
    with pytest.raises(SourceError, match=r"no source named 'swahili'.*the sources are"):
        run(tokenizer_path, tmp_path / "x", files=both, mix=["swahili=1"])
    with pytest.raises(SourceError, match=r"--mix gives no weight to .*hau\.txt"):
        run(tokenizer_path, tmp_path / "x", files=both, mix=[f"{files / 'swa.txt'}=1"])


# ---- shards -------------------------------------------------------------------------------------------
@pytest.fixture
def single_and_sharded(tokenizer_path, files, tmp_path):
    run(tokenizer_path, tmp_path / "single", files=[files / "swa.txt", files / "hau.txt"])
    meta = run(tokenizer_path, tmp_path / "sharded", files=[files / "swa.txt", files / "hau.txt"], shard_tokens=700)
    return tmp_path / "single", tmp_path / "sharded", meta


def test_shards_hold_the_single_file_cut_into_pieces_listed_in_meta(single_and_sharded):
    single, sharded, meta = single_and_sharded
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) > 3 and [s["file"] for s in shards[:2]] == ["train-00000.bin", "train-00001.bin"]
    assert all(s["tokens"] == 700 for s in shards[:-1]) and sum(s["tokens"] for s in shards) == \
        meta["splits"]["train"]["tokens"]
    joined = b"".join((sharded / s["file"]).read_bytes() for s in shards)
    assert joined == (single / "train.bin").read_bytes()
    assert not (sharded / "train.bin").exists()
    check_bins(sharded)


def test_sharded_and_single_file_bins_give_the_loader_the_same_windows(single_and_sharded):
    single, sharded, _ = single_and_sharded
    one = BinLoader(single / "train.bin", seq_len=64, batch_size=8, seed=3)
    many = BinLoader(sharded / "train.bin", seq_len=64, batch_size=8, seed=3)
    assert one.num_tokens == many.num_tokens
    for _ in range(20):   # 160 windows of 65 over ~6 shards of 700: many cross a shard boundary
        x1, y1 = one.next_batch()
        x2, y2 = many.next_batch()
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    evals = [list(iter_eval_batches(folder / "val.bin", 16, 4)) for folder in (single, sharded)]
    assert len(evals[0]) == len(evals[1]) > 0
    assert all(torch.equal(a[0], b[0]) for a, b in zip(*evals))
    sequential = [BinLoader(f / "train.bin", 64, 8, sequential=True).next_batch()[0] for f in (single, sharded)]
    assert torch.equal(*sequential)


def test_resume_across_shards_continues_the_same_stream(single_and_sharded, tmp_path):
    _, sharded, _ = single_and_sharded
    loader = BinLoader(sharded / "train.bin", seq_len=300, batch_size=4, seed=11)
    for _ in range(5):
        loader.next_batch()
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    expected = [loader.next_batch() for _ in range(5)]
    resumed = BinLoader(sharded / "train.bin", seq_len=300, batch_size=2, seed=0, rank=1, world_size=2)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for x, _ in expected:
        assert torch.equal(resumed.next_batch()[0], x[2:])


def test_parts_prepared_apart_combine_into_the_stream_of_one_run(tokenizer_path, files, tmp_path):
    """One machine per slice of the sources, then --combine: the loader reads the stream one machine writes."""
    both = [files / "swa.txt", files / "hau.txt"]
    one = run(tokenizer_path, tmp_path / "one", files=both, shard_tokens=700)
    run(tokenizer_path, tmp_path / "part-0", files=both[:1], shard_tokens=700)
    run(tokenizer_path, tmp_path / "part-1", files=both[1:])              # one file per split: combined too
    prepare_pretrain.main(["--combine", str(tmp_path / "part-0"), str(tmp_path / "part-1"),
                           "--out", str(tmp_path / "all")])
    combined = json.loads((tmp_path / "all" / "meta.json").read_text())
    for split in ("train", "val"):
        assert combined["splits"][split]["sources"] == one["splits"][split]["sources"]
        streams = [b"".join((folder / shard["file"]).read_bytes() for shard in meta["splits"][split]["shards"])
                   for folder, meta in ((tmp_path / "one", one), (tmp_path / "all", combined))]
        assert streams[0] == streams[1]
    check_bins(tmp_path / "all")
    single = BinLoader(tmp_path / "one" / "train.bin", seq_len=64, batch_size=8, seed=3)
    parts = BinLoader(tmp_path / "all" / "train.bin", seq_len=64, batch_size=8, seed=3)
    for _ in range(10):
        assert torch.equal(single.next_batch()[0], parts.next_batch()[0])
    linked = (tmp_path / "all" / "train-00000.bin").stat()
    assert linked.st_ino == (tmp_path / "part-0" / "train-00000.bin").stat().st_ino   # a hard link, not a copy
    run(tokenizer_path, tmp_path / "seed-1", files=both[1:], seed=1)
    with pytest.raises(SourceError, match=r"--seed 1 .* with 0"):
        combine_bins([tmp_path / "part-0", tmp_path / "seed-1"], tmp_path / "x")
    with pytest.raises(SourceError, match=r"more than one part"):
        combine_bins([tmp_path / "part-1", tmp_path / "part-1"], tmp_path / "x")
    with pytest.raises(FlagError, match="--combine joins folders already prepared"):
        prepare_pretrain.parse_args(["--combine", str(tmp_path / "part-0"), "--files", str(both[0])])


def test_a_missing_shard_is_named(single_and_sharded):
    _, sharded, _ = single_and_sharded
    (sharded / "train-00001.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"train-00001\.bin"):
        BinLoader(sharded / "train.bin", seq_len=8, batch_size=1)


# ---- errors: columns, offline, gated ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["swa.parquet", "swa.jsonl", "swa_disk"])
def test_missing_column_lists_the_columns_that_exist(tokenizer_path, files, tmp_path, name):
    with pytest.raises(CorpusFormatError) as info:
        run(tokenizer_path, tmp_path / "out", files=[files / name], text_column="body")
    message = str(info.value)
    assert "has no column 'body'" in message and "--text-column" in message
    assert "'text'" in message or "'content'" in message
    assert not (tmp_path / "out" / "meta.json").exists()


def test_missing_column_in_a_streamed_dataset_lists_its_columns(tokenizer_path, files, tmp_path):
    streamed = datasets.load_dataset("json", data_files=str(files / "swa.jsonl"), split="train", streaming=True)
    with pytest.raises(CorpusFormatError, match=r"no column 'text'; its columns are \['content', 'n'\]"):
        run(tokenizer_path, tmp_path / "out", sources=[dataset_source("stream", streamed)])


def test_hub_name_offline_fails_at_once_saying_how_to_use_a_local_copy(tokenizer_path, tmp_path):
    with pytest.raises(HubUnavailableError) as info:  # how fast: 2.2 s measured by hand (closing note)
        run(tokenizer_path, tmp_path / "out", hf=["lelapa/Inkuba-Mono:swa"])
    message = str(info.value)
    assert "lelapa/Inkuba-Mono" in message and "HF_DATASETS_OFFLINE" in message and "--files" in message
    assert "\n" not in message


def test_hub_name_without_network_fails_with_one_line_saying_how_to_use_a_local_copy(tokenizer_path, tmp_path,
                                                                                     monkeypatch):
    # How fast it fails (2.2 s against datasets' own 24-26 s of retries) is a measurement for the
    # closing note, not an assertion: a timed test fails on a loaded machine.
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")   # .invalid never resolves, with or without network
    with pytest.raises(HubUnavailableError, match=r"cannot reach https://hub\.invalid .*no network\? .*--files"):
        run(tokenizer_path, tmp_path / "out", corpora=["inkuba-mono-swa"])


def fake_hub(monkeypatch, error):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "check_hub_reachable", lambda what: None)

    def load_dataset(*args, **kwargs):
        raise error
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_gated_dataset_without_token_says_how_to_log_in(tokenizer_path, tmp_path, monkeypatch):
    from datasets.exceptions import DatasetNotFoundError
    fake_hub(monkeypatch, DatasetNotFoundError("Dataset 'lelapa/Inkuba-Mono' is a gated dataset on the Hub. "
                                               "You must be authenticated to access it."))
    with pytest.raises(HubUnavailableError, match=r"is gated: accept its conditions at .*lelapa/Inkuba-Mono.*"
                                                  r"hf auth login.*HF_TOKEN"):
        run(tokenizer_path, tmp_path / "out", hf=["lelapa/Inkuba-Mono:swa"])


def test_missing_config_and_unknown_dataset_get_one_line_each(tokenizer_path, tmp_path, monkeypatch):
    fake_hub(monkeypatch, ValueError("Config name is missing.\nPlease pick one among the available configs: "
                                     "['hau', 'swa']\nExample of usage:\n\t`load_dataset('lelapa/Inkuba-Mono', 'hau')`"))
    with pytest.raises(SourceError, match=r"available configs: \['hau', 'swa'\].*--hf NAME:CONFIG") as info:
        run(tokenizer_path, tmp_path / "out", hf=["lelapa/Inkuba-Mono"])
    assert "\n" not in str(info.value)
    from datasets.exceptions import DatasetNotFoundError
    fake_hub(monkeypatch, DatasetNotFoundError("Dataset 'nobody/nothing' doesn't exist on the Hub"))
    with pytest.raises(HubUnavailableError, match=r"doesn't exist on the Hub; check the name"):
        run(tokenizer_path, tmp_path / "out", hf=["nobody/nothing"])


def test_missing_column_in_a_hub_dataset_lists_its_columns(tokenizer_path, files, tmp_path, monkeypatch):
    streamed = datasets.load_dataset("json", data_files=str(files / "swa.jsonl"), split="train", streaming=True)
    monkeypatch.setattr(hub, "open_hub_dataset", lambda *args: streamed)
    with pytest.raises(CorpusFormatError, match=r"--hf owner/name|owner/name.*no column 'text'; its columns are "
                                                r"\['content', 'n'\]"):
        run(tokenizer_path, tmp_path / "out", hf=["owner/name"])


def test_cli_prints_one_line_and_exits_2_on_bad_input(tokenizer_path, files, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run_main(prepare_pretrain.main, ["--tokenizer", str(tokenizer_path), "--out", str(tmp_path / "o"),
                               "--hf", "lelapa/Inkuba-Mono:swa", "--workers", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --hf lelapa/Inkuba-Mono:swa") and "\n" not in err
    with pytest.raises(SystemExit) as info:
        run_main(prepare_pretrain.main, ["--tokenizer", str(tokenizer_path), "--out", str(tmp_path / "o2"),
                               "--files", str(files / "swa.parquet"), "--text-column", "body"])
    assert info.value.code == 2 and "its columns are ['id', 'text']" in capsys.readouterr().err


def test_hub_corpora_are_registered_by_short_name_and_never_chosen_by_language():
    for name in ("inkuba-mono-swa", "inkuba-mono-hau", "fineweb2-zul", "madlad-xho", "ciral-hau", "afriberta-swa"):
        assert name in HUB_CORPORA and HUB_CORPORA[name].needs_network
    assert HUB_CORPORA["inkuba-mono-swa"].gated
    (source,) = resolve_sources(corpora=["inkuba-mono-swa"])
    assert (source.location, source.config, source.fmt) == ("lelapa/Inkuba-Mono", "swa", "hub")
    (madlad,) = resolve_sources(corpora=["madlad-swa"])
    assert madlad.fmt == "json" and madlad.needs_network
    assert not set(HUB_CORPORA) & set(CORPORA)


def test_unknown_file_type_and_bad_hub_spec_are_refused(tmp_path):
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(SourceError, match=r"cannot tell the format"):
        resolve_sources(files=[tmp_path / "x.xml"])
    with pytest.raises(SourceError, match=r"expected OWNER/NAME\[:CONFIG\]"):
        resolve_sources(hf=["Inkuba-Mono"])
