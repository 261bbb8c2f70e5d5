import pytest
import torch

from lillm import checkpoint as ckpt
from lillm.config import get_preset
from lillm.model import Transformer


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(get_preset("tiny", vocab_size=71, **kw)).eval()


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": False}, {"shared_mlp": True, "n_layers": 3}])
def test_save_then_load_gives_identical_weights(tmp_path, kw):
    m = model(**kw)
    ckpt.save_checkpoint(tmp_path / "c", m, train_state={"step": 3})
    loaded = ckpt.load_model(tmp_path / "c")
    assert same_weights(m, loaded)
    assert loaded.num_params() == m.config.num_params()
    assert ckpt.load_train_state(tmp_path / "c")["step"] == 3


def test_an_interrupted_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    first = model(0)
    ckpt.save_checkpoint(tmp_path / "c", first, train_state={"step": 1})

    def dies_half_way(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path / "c", model(1), train_state={"step": 2}, overwrite=True)
    monkeypatch.undo()
    assert same_weights(first, ckpt.load_model(tmp_path / "c"))
    assert ckpt.load_train_state(tmp_path / "c")["step"] == 1


def test_a_swap_interrupted_between_renames_recovers_the_previous_checkpoint(tmp_path):
    first = model(0)
    ckpt.save_checkpoint(tmp_path / "step_000001", first)
    (tmp_path / "step_000001").rename(tmp_path / "step_000001.old")  # the state between the two renames
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000001"]
    assert same_weights(first, ckpt.load_model(tmp_path / "step_000001"))


def test_unfinished_tmp_folders_are_never_listed_as_checkpoints(tmp_path):
    ckpt.save_checkpoint(tmp_path / "step_000002", model())
    (tmp_path / "step_000004.tmp").mkdir()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000002"]


def test_truncated_weights_give_a_clear_error(tmp_path):
    ckpt.save_checkpoint(tmp_path / "c", model(), train_state={"step": 1})
    weights = tmp_path / "c" / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated.*earlier checkpoint"):
        ckpt.load_model(tmp_path / "c")


def test_truncated_train_state_gives_a_clear_error(tmp_path):
    ckpt.save_checkpoint(tmp_path / "c", model(), train_state={"step": 1, "x": torch.zeros(1000)})
    state = tmp_path / "c" / ckpt.TRAIN_STATE
    state.write_bytes(state.read_bytes()[:300])
    with pytest.raises(ckpt.CheckpointError, match="cannot be read.*earlier checkpoint"):
        ckpt.load_train_state(tmp_path / "c")


def test_a_folder_without_config_is_named(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="config.json is missing"):
        ckpt.load_model(tmp_path)


def test_weights_of_the_wrong_shape_are_refused_by_name(tmp_path):
    ckpt.save_checkpoint(tmp_path / "c", model())
    big = Transformer(get_preset("tiny", vocab_size=80))
    with pytest.raises(ckpt.CheckpointError, match="embed_tokens.weight has shape"):
        ckpt.load_weights(big, ckpt.read_weights(tmp_path / "c" / ckpt.WEIGHTS))


def test_keep_last_prunes_old_step_checkpoints(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path / f"step_{step:06d}", model())
    ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]


@pytest.mark.parametrize("tied", [True, False])
def test_checkpoint_folder_loads_in_transformers_with_the_same_logits(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    m = model(tie_embeddings=tied)
    ckpt.save_checkpoint(tmp_path / "c", m)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
    x = torch.randint(0, 71, (2, 20))
    with torch.no_grad():
        assert (hf(x).logits - m(x)).abs().max() < 1e-4
