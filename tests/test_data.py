"""Tests for lillm/data.py and lillm/bin_format.py: bin checks, the random-window loader, eval batches."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lillm import bin_format
from lillm.bins import encode_documents
from lillm.bin_format import check_bins, load_meta, max_token_id, token_dtype
from lillm.data import BinLoader, iter_eval_batches
from lillm.errors import BinFormatError, MissingMetaError

SHA = "a" * 64


def write_bins(folder, splits: dict, vocab_size=1000, sha=SHA):
    """Bins holding the given token arrays, with a meta.json as prepare_pretrain writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    meta = {"tokenizer_path": "tok.json", "tokenizer_sha256": sha, "vocab_size": vocab_size,
            "dtype": dtype.name, "eos_id": 2, "splits": {}}
    for split, tokens in splits.items():
        np.asarray(tokens, dtype=dtype).tofile(folder / f"{split}.bin")
        meta["splits"][split] = {"file": f"{split}.bin", "tokens": len(tokens)}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def fake_tokenizer(vocab_size=1000, sha=SHA):
    return SimpleNamespace(sha256=sha, vocab_size=vocab_size, source="/tmp/tok.json")


@pytest.fixture
def positions_bin(tmp_path):
    """A bin whose token at position i is i: a window's values tell where it was cut."""
    write_bins(tmp_path, {"train": np.arange(60), "val": np.arange(45)}, vocab_size=1000)
    return tmp_path / "train.bin"


# ---- the format -----------------------------------------------------------------------------------
def test_token_dtype_is_uint16_up_to_65536_ids_then_uint32():
    assert token_dtype(300) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_encode_documents_appends_eos_after_every_document_and_counts_it():
    tokenizer = SimpleNamespace(eos_id=2, source="fake", encode=lambda text: [ord(c) - 90 for c in text])
    tokens, lengths = encode_documents(tokenizer, ["ab", "c", ""], np.dtype("<u2"))
    assert tokens.tolist() == [7, 8, 2, 9, 2, 2]
    assert lengths.tolist() == [3, 2, 1]
    assert tokens.dtype == np.uint16


# ---- checks ---------------------------------------------------------------------------------------
def test_check_bins_accepts_consistent_bins_and_returns_meta(tmp_path):
    write_bins(tmp_path, {"train": [5, 6, 999], "val": [1, 2]})
    meta = check_bins(tmp_path, tokenizer=fake_tokenizer())
    assert meta["splits"]["train"]["tokens"] == 3
    assert check_bins(tmp_path / "train.bin", vocab_size=1000)["dtype"] == "uint16"


def test_check_bins_refuses_missing_meta_naming_file_and_fix(tmp_path):
    write_bins(tmp_path, {"train": [1, 2, 3]})
    (tmp_path / "meta.json").unlink()
    with pytest.raises(MissingMetaError, match=r"meta\.json not found.*prepare_pretrain\.py") as info:
        check_bins(tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(MissingMetaError, match=str(tmp_path)):
        load_meta(tmp_path / "train.bin")


def test_check_bins_refuses_mismatched_tokenizer_naming_hashes_and_fix(tmp_path):
    write_bins(tmp_path, {"train": [1, 2, 3]}, sha="b" * 64)
    with pytest.raises(BinFormatError, match=r"sha256 bbbbbbbb.*sha256 aaaaaaaa.*prepare_pretrain\.py "
                                             r"--tokenizer /tmp/tok\.json"):
        check_bins(tmp_path, tokenizer=fake_tokenizer())


def test_check_bins_refuses_id_beyond_vocab_naming_file_and_id(tmp_path):
    write_bins(tmp_path, {"train": [1, 2, 3], "val": [4, 60000, 5]}, vocab_size=65536)
    with pytest.raises(BinFormatError, match=r"val\.bin holds token id 60000 but the vocabulary has only "
                                             r"32000 ids.*prepare_pretrain"):
        check_bins(tmp_path, vocab_size=32000)


def test_check_bins_refuses_file_size_not_matching_meta(tmp_path):
    write_bins(tmp_path, {"train": [1, 2, 3, 4]})
    with open(tmp_path / "train.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(BinFormatError, match=r"train\.bin holds 9 bytes but meta\.json says 4 tokens"):
        check_bins(tmp_path)


def test_check_bins_refuses_dtype_inconsistent_with_vocab(tmp_path):
    write_bins(tmp_path, {"train": [1, 2]}, vocab_size=1000)
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["vocab_size"] = 100_000
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BinFormatError, match=r"dtype 'uint16' does not match vocab_size 100000"):
        check_bins(tmp_path)


def test_max_token_id_finds_the_maximum_in_the_last_slice(tmp_path, monkeypatch):
    monkeypatch.setattr(bin_format, "MAX_ID_CHUNK", 4)
    tokens = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 58], dtype=np.uint16)
    tokens.tofile(tmp_path / "x.bin")
    assert max_token_id(tmp_path / "x.bin", np.uint16) == 58


# ---- the loader -----------------------------------------------------------------------------------
def test_loader_windows_stay_inside_the_bin_and_y_is_x_shifted_by_one(positions_bin):
    seq_len, tokens = 16, np.fromfile(positions_bin, dtype=np.uint16)
    loader = BinLoader(positions_bin, seq_len=seq_len, batch_size=8, seed=3)
    starts = set()
    for _ in range(50):
        x, y = loader.next_batch()
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (8, seq_len)
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            start = row_x[0]
            assert 0 <= start and start + seq_len + 1 <= len(tokens)
            assert row_x == tokens[start:start + seq_len].tolist()
            assert row_y == tokens[start + 1:start + seq_len + 1].tolist()
            starts.add(start)
    assert min(starts) == 0 and max(starts) == len(tokens) - seq_len - 1  # both ends are reachable


def test_two_ranks_together_give_exactly_the_one_process_batch(positions_bin):
    single = BinLoader(positions_bin, seq_len=8, batch_size=6, seed=7)
    ranks = [BinLoader(positions_bin, seq_len=8, batch_size=3, seed=7, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(5):
        x, y = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_batches_reproducible_after_saving_and_restoring_state(positions_bin, tmp_path):
    loader = BinLoader(positions_bin, seq_len=8, batch_size=4, seed=1)
    for _ in range(3):
        loader.next_batch()
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    expected = [loader.next_batch() for _ in range(3)]
    restored = BinLoader(positions_bin, seq_len=8, batch_size=4, seed=99)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert restored.step == 3
    for x, y in expected:
        x2, y2 = restored.next_batch()
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_resume_on_two_ranks_continues_the_one_process_stream(positions_bin):
    single = BinLoader(positions_bin, seq_len=8, batch_size=4, seed=5)
    single.next_batch()
    state = single.state_dict()
    ranks = [BinLoader(positions_bin, seq_len=8, batch_size=2, rank=r, world_size=2) for r in (0, 1)]
    for loader in ranks:
        loader.load_state_dict(state)
    x, _ = single.next_batch()
    assert torch.equal(torch.cat([loader.next_batch()[0] for loader in ranks]), x)


def test_load_state_refuses_a_different_global_batch(positions_bin):
    state = BinLoader(positions_bin, seq_len=8, batch_size=4).state_dict()
    other = BinLoader(positions_bin, seq_len=8, batch_size=3)
    with pytest.raises(ValueError, match=r"global_batch_size=4 but this loader has 3"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)  # a deliberate change of batch size is allowed


def test_same_seed_same_batches_other_seed_other_batches(positions_bin):
    first, again, other = (BinLoader(positions_bin, seq_len=8, batch_size=4, seed=s) for s in (0, 0, 1))
    x = first.next_batch()[0]
    assert torch.equal(x, again.next_batch()[0])
    assert not torch.equal(x, other.next_batch()[0])


def test_loader_refuses_bin_shorter_than_a_window(positions_bin):
    with pytest.raises(ValueError, match=r"holds 60 tokens, fewer than seq_len \+ 1 = 61"):
        BinLoader(positions_bin, seq_len=60, batch_size=1)


def test_loader_without_meta_names_the_missing_file(tmp_path):
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "train.bin")
    with pytest.raises(MissingMetaError, match=r"meta\.json not found"):
        BinLoader(tmp_path / "train.bin", seq_len=4, batch_size=1)
    assert BinLoader(tmp_path / "train.bin", seq_len=4, batch_size=1, dtype="uint16").num_tokens == 10


# ---- evaluation batches ---------------------------------------------------------------------------
def test_eval_batches_are_sequential_non_overlapping_and_deterministic(positions_bin):
    val = positions_bin.parent / "val.bin"   # 45 tokens: 4 windows of 10 (+1 target)
    batches = list(iter_eval_batches(val, seq_len=10, batch_size=3))
    assert [x.shape[0] for x, _ in batches] == [3, 1]
    starts = [row[0] for x, _ in batches for row in x.tolist()]
    assert starts == [0, 10, 20, 30]
    for x, y in batches:
        assert torch.equal(y, x + 1)   # positions bin: the next token is position + 1
    again = list(iter_eval_batches(val, seq_len=10, batch_size=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    assert len(list(iter_eval_batches(val, seq_len=10, batch_size=1, max_batches=2))) == 2


def test_eval_batches_split_across_ranks_cover_each_batch_once(positions_bin):
    val = positions_bin.parent / "val.bin"
    whole = [x for x, _ in iter_eval_batches(val, seq_len=5, batch_size=2)]
    shards = [[x for x, _ in iter_eval_batches(val, seq_len=5, batch_size=2, rank=r, world_size=2)] for r in (0, 1)]
    assert sorted(map(tuple, torch.cat(shards[0] + shards[1]).tolist())) == \
        sorted(map(tuple, torch.cat(whole).tolist()))


def test_sequential_loader_walks_the_bin_in_order_for_a_curriculum(tmp_path):
    ids = np.arange(1000, dtype=np.uint16)
    path = tmp_path / "train.bin"
    ids.tofile(path)
    loader = BinLoader(path, seq_len=10, batch_size=3, sequential=True, dtype=np.uint16)
    x, y = loader.next_batch()
    assert x[:, 0].tolist() == [0, 10, 20] and torch.equal(y, x + 1)
    x, _ = loader.next_batch()
    assert x[:, 0].tolist() == [30, 40, 50]
    ranks = [BinLoader(path, 10, 2, rank=r, world_size=2, sequential=True, dtype=np.uint16).next_batch()[0]
             for r in range(2)]
    assert torch.cat(ranks)[:, 0].tolist() == [0, 10, 20, 30]
