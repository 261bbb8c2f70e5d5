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


def pytest_collection_modifyitems(config, items):
    """The default run skips tests marked slow; `-m slow` (or any -m naming slow) runs them."""
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
