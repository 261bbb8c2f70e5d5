"""Fixtures shared by several test modules."""
import pytest


@pytest.fixture
def buzuzu():
    """(data dir, folder of the real Buzuzu-Mavi tokenizer); skips the test when they are absent."""
    from lillm.corpora import data_dir
    try:
        root = data_dir()
    except FileNotFoundError:
        pytest.skip("data directory absent")
    folder = root / "buzuzu_mavi_stefan027" / "tokenizer"
    if not (folder / "tokenizer.model").exists():
        pytest.skip("Buzuzu-Mavi tokenizer absent from the data directory")
    return root, folder

