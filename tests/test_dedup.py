"""Tests for lillm/dedup.py: a DigestSet answers exactly as a Python set of every digest added, through
spills, merges, filter growth, false positives and keys sharing their first 8 bytes."""
import hashlib
import os

import numpy as np
import pytest

from lillm.dedup import BITS_PER_KEY, BLOCK_KEYS, BloomFilter, DigestSet, as_keys


def digest(number: int) -> bytes:
    return hashlib.blake2b(str(number).encode(), digest_size=16).digest()


def answers_of_a_set(stream: list[bytes]) -> list[bool]:
    seen, answers = set(), []
    for key in stream:
        answers.append(key in seen)
        seen.add(key)
    return answers


def answers_of(digests: DigestSet, stream: list[bytes], chunk: int) -> list[bool]:
    """Asked as lillm/bins.py asks: a chunk's digests looked up together, then seen/add one by one."""
    answers = []
    for start in range(0, len(stream), chunk):
        part = stream[start:start + chunk]
        lookup = digests.lookup(b"".join(part))
        for index, key in enumerate(part):
            answers.append(lookup.seen(index))
            if not answers[-1]:
                digests.add(key)
    return answers


@pytest.mark.parametrize("recent_limit, filter_bytes, chunk", [(7, 8, 5), (50, 64, 37), (300, 1 << 20, 300)])
def test_answers_equal_a_python_set_through_spills_and_merges(tmp_path, recent_limit, filter_bytes, chunk):
    rng = np.random.default_rng(recent_limit)
    stream = [digest(int(n)) for n in rng.integers(0, 1000, size=2000)]   # about half are repeats
    with DigestSet(tmp_path, recent_limit=recent_limit, filter_bytes=filter_bytes) as digests:
        assert answers_of(digests, stream, chunk) == answers_of_a_set(stream)
        assert len(digests) == len(set(stream))
        assert len(digests.recent) < recent_limit
        assert digests.spilled and len(digests.runs) <= np.log2(digests.spilled / recent_limit) + 1
        assert digests.filter.bits <= 8 * filter_bytes
        assert sum(run.count for run in digests.runs) == digests.spilled
        folder = digests.folder
        assert folder.name.startswith(".dedup-") and len(list(folder.iterdir())) == len(digests.runs)
    assert not folder.exists()


def test_a_spill_between_lookup_and_question_is_seen(tmp_path):
    """A chunk looked up before a spill must still see the digests that spill moved to disk."""
    with DigestSet(tmp_path, recent_limit=3) as digests:
        waiting = digests.lookup(digest(1) + digest(2) + digest(50))
        assert not waiting.seen(0)
        for number in (1, 10, 11, 12, 13):   # 1 goes to disk with the spills of 3 and of 3
            digests.add(digest(number))
        assert digests.runs and digest(1) not in digests.recent
        assert waiting.seen(0) and not waiting.seen(1) and not waiting.seen(2)
        assert digest(13) in digests and digest(12) in digests and digest(99) not in digests


def test_keys_sharing_their_first_eight_bytes_are_told_apart(tmp_path):
    """More than a block of keys with one hi (only a constructed case): the exact slow path."""
    same_hi = [bytes(8) + number.to_bytes(8, "big") for number in range(3 * BLOCK_KEYS)]
    others = [digest(n) for n in range(400)]
    stream = same_hi + others + same_hi[::3] + others[:50] + same_hi[::-5] + [bytes(8) + bytes([9]) * 8]
    with DigestSet(tmp_path, recent_limit=1000) as digests:   # the first run holds all 768 keys with hi 0
        assert answers_of(digests, stream, 64) == answers_of_a_set(stream)
        run = digests.runs[0]
        assert np.count_nonzero(run.fence == 0) >= 2       # they span three blocks


def test_bloom_filter_at_capacity_has_about_one_percent_false_positives():
    bloom = BloomFilter(1 << 16)
    added = as_keys(b"".join(digest(n) for n in range(bloom.capacity)))
    bloom.add(added)
    assert bloom.may_contain(added).all()          # no false negatives
    others = as_keys(b"".join(digest(-n - 1) for n in range(20000)))
    rate = bloom.may_contain(others).mean()
    assert 0.003 < rate < 0.015                     # (1 - e^(-7/10))^7 = 0.8%
    assert bloom.capacity == (1 << 16) // BITS_PER_KEY


def test_the_filter_grows_with_the_spilled_digests_up_to_its_cap(tmp_path):
    with DigestSet(tmp_path, recent_limit=100, filter_bytes=1024, first_filter_bits=1024) as digests:
        for number in range(900):
            digests.add(digest(number))
        assert digests.filter.bits == 8 * 1024      # grew from 1024 bits to its cap (9,000 wanted)
        keys = b"".join(digest(n) for n in range(1000))
        lookup = digests.lookup(keys)
        assert [lookup.seen(n) for n in range(1000)] == [True] * 900 + [False] * 100


def test_a_killed_runs_spill_folder_is_removed_and_a_live_ones_kept(tmp_path):
    dead, live = tmp_path / ".dedup-999999999-x.tmp", tmp_path / f".dedup-{os.getppid()}-y.tmp"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "run-000001.keys").write_bytes(bytes(16))
    (tmp_path / "user.txt").write_text("not ours")
    with DigestSet(tmp_path) as digests:
        assert digests.folder.name.startswith(f".dedup-{os.getpid()}-")
        assert not dead.exists() and live.exists() and (tmp_path / "user.txt").exists()
