"""Tests for lillm/importance.py: which channels, heads and layers matter, and choosing among them."""
import pytest
import torch

from lillm.importance import (activation_importance, block_influence, choose, choose_heads, random_importance,
                              top_layers, weight_importance)
from lillm.prune import PruneError, first_n
from pruning_helpers import batches, make_identity, tiny


def test_choose_returns_the_top_k_indices_sorted():
    scores = torch.tensor([0.1, 5.0, 0.3, 4.0, 2.0])
    assert choose(scores, 3).tolist() == [1, 3, 4]
    assert choose(torch.stack([scores, -scores]), 2).tolist() == [[1, 3], [0, 2]]
    with pytest.raises(PruneError, match="keep=6"):
        choose(scores, 6)


def test_choose_heads_follows_the_gqa_rules():
    scores = torch.tensor([[1.0, 2.0, 9.0, 0.0, 3.0, 3.0]])  # 6 heads, 3 kv groups of 2: sums 3, 9, 6
    assert choose_heads(scores, 4, n_kv_heads=3, rule="groups").tolist() == [[2, 3, 4, 5]]
    assert choose_heads(scores, 3, n_kv_heads=3, rule="within").tolist() == [[1, 2, 4]]
    with pytest.raises(PruneError, match="multiple"):
        choose_heads(scores, 3, n_kv_heads=3, rule="groups")


def test_activation_importance_is_zero_for_what_carries_nothing():
    model = tiny(n_kv_heads=4)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] = 0
        for block in model.model.layers:
            block.self_attn.o_proj.weight[5] = 0
            block.mlp.down_proj.weight[5] = 0
            block.mlp.gate_proj.weight[7] = 0  # silu(0) * up = 0
            block.self_attn.v_proj.weight.view(4, 16, 64)[2] = 0
    scores = activation_importance(model, batches(), show_progress=False)
    assert scores["hidden"].shape == (64,) and scores["ffn"].shape == (3, 176) and scores["heads"].shape == (3, 4)
    assert scores["hidden"][5] == 0 and (scores["hidden"] > 0).sum() == 63
    assert (scores["ffn"][:, 7] == 0).all() and (scores["ffn"] > 0).sum() == 3 * 175
    assert (scores["heads"][:, 2] == 0).all() and (scores["heads"] > 0).sum() == 9


def test_activation_importance_ignores_padding_tokens():
    model = tiny(shared_mlp=True)
    padded = activation_importance(model, batches(mask_tail=4), show_progress=False)
    cut = [{"input_ids": b["input_ids"][:, :-4]} for b in batches()]
    plain = activation_importance(model, cut, show_progress=False)
    for key in plain:
        torch.testing.assert_close(padded[key], plain[key], rtol=1e-5, atol=1e-6)


def test_weight_importance_is_zero_only_for_a_channel_no_matrix_touches():
    model = tiny(tie_embeddings=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                (p[9] if name.endswith(("o_proj.weight", "down_proj.weight")) else p[:, 9]).zero_()
    scores = weight_importance(model)
    assert scores["hidden"][9] == 0 and (scores["hidden"] > 0).sum() == 63
    assert scores["ffn"].shape == (3, 176) and scores["heads"].shape == (3, 4)


def test_random_importance_is_reproducible_from_its_seed():
    model = tiny()
    a, b, c = random_importance(model, 1), random_importance(model, 1), random_importance(model, 2)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["hidden"], c["hidden"])


def test_block_influence_of_an_identity_block_is_zero_and_top_layers_skip_it():
    model = tiny()
    make_identity(model, 1)
    influence = block_influence(model, batches(), show_progress=False)
    assert influence[1] == pytest.approx(0.0, abs=1e-6)
    assert influence[0] > 1e-4 and influence[2] > 1e-4
    assert top_layers(influence, 2) == [0, 2]
    assert first_n(2) == [0, 1]
