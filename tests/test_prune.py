"""Tests for lillm/prune.py: structured pruning keeps exactly what it keeps (importance scores
have their own tests in tests/test_importance.py)."""
import pytest
import torch
import torch.nn as nn

from lillm.config import get_preset
from lillm.importance import activation_importance, block_influence, random_importance, top_layers
from lillm.model import Transformer
from lillm.prune import (PruneError, buzuzu_random_prune, buzuzu_shape, drop_layers, first_n, head_dim_channels,
                         prune_to_shape, prune_width, rope_channels, rope_is_exact, tie_embeddings)
from pruning_helpers import VARIANTS, VOCAB, batches, logits, make_identity, tiny


def dropped(n, keep):
    mask = torch.ones(n, dtype=torch.bool)
    mask[torch.as_tensor(keep)] = False
    return mask


@torch.no_grad()
def zero_dropped(model, hidden=None, ffn=None, heads=None, qk=None, v=None):
    """Zero, in every matrix that reads or writes them, the channels and heads a pruning will drop."""
    cfg = model.config
    H, KV, hd, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        if hidden is not None:
            h = dropped(d, hidden)
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                lin.weight[:, h] = 0
            attn.o_proj.weight[h] = 0
            mlp.down_proj.weight[h] = 0
        if ffn is not None:
            f = dropped(cfg.d_ff, ffn)
            mlp.gate_proj.weight[f] = 0
            mlp.up_proj.weight[f] = 0
            mlp.down_proj.weight[:, f] = 0
        if heads is not None:
            gone = dropped(H, heads)
            attn.q_proj.weight.view(H, hd, d)[gone] = 0
            attn.o_proj.weight.view(d, H, hd)[:, gone] = 0
        if qk is not None:
            c = dropped(hd, qk)
            attn.q_proj.weight.view(H, hd, d)[:, c] = 0
            attn.k_proj.weight.view(KV, hd, d)[:, c] = 0
        if v is not None:
            c = dropped(hd, v)
            attn.v_proj.weight.view(KV, hd, d)[:, c] = 0
            attn.o_proj.weight.view(d, H, hd)[:, :, c] = 0
    if hidden is not None:
        model.model.embed_tokens.weight[:, dropped(d, hidden)] = 0
        model.lm_head.weight[:, dropped(d, hidden)] = 0


def some(n, k, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


# ----------------------------------------------------------------------------- width: exactness

@pytest.mark.parametrize("variant", VARIANTS)
def test_pruning_that_keeps_everything_gives_bit_identical_logits(variant):
    model = tiny(**variant)
    cfg = model.config
    same = prune_width(model, torch.arange(cfg.d_model), torch.arange(cfg.d_ff), torch.arange(cfg.n_heads),
                       head_dim_keep=torch.arange(cfg.head_dim))
    assert same.config == cfg
    assert torch.equal(logits(model), logits(same))


@pytest.mark.parametrize("variant", VARIANTS)
def test_zeroed_hidden_channels_prune_to_the_same_logits_with_norms_and_eps_rescaled(variant):
    model = tiny(**variant)  # norm_eps 1e-5: the pruner scales eps by d/d' as well as the norm weights
    keep = some(64, 40, seed=3)
    zero_dropped(model, hidden=keep)
    pruned = prune_width(model, hidden_keep=keep)
    assert pruned.config.d_model == 40 and pruned.config.head_dim == 16
    assert pruned.config.norm_eps == pytest.approx(1e-5 * 64 / 40)
    torch.testing.assert_close(logits(pruned), logits(model), rtol=1e-5, atol=1e-5)


def test_without_norm_rescaling_pruning_hidden_channels_changes_the_logits():
    model = tiny()
    keep = some(64, 40, seed=3)
    zero_dropped(model, hidden=keep)
    pruned = prune_width(model, hidden_keep=keep, rescale_norms=False)
    assert not torch.allclose(logits(pruned), logits(model), atol=1e-3)


@pytest.mark.parametrize("shared", [False, True])
def test_zeroed_ffn_channels_prune_exactly(shared):
    model = tiny(shared_mlp=shared)
    keep = some(176, 100, seed=4)
    zero_dropped(model, ffn=keep)
    pruned = prune_width(model, ffn_keep=keep)
    assert pruned.config.d_ff == 100
    torch.testing.assert_close(logits(pruned), logits(model), rtol=1e-5, atol=1e-5)


def test_per_layer_ffn_sets_prune_each_layer_with_its_own_channels():
    model = tiny()
    keep = [some(176, 90, seed=s) for s in range(3)]
    for block, k in zip(model.model.layers, keep):
        f = dropped(176, k)
        with torch.no_grad():
            block.mlp.gate_proj.weight[f] = 0
            block.mlp.down_proj.weight[:, f] = 0
    pruned = prune_width(model, ffn_keep=keep)
    assert torch.equal(pruned.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight[keep[1]])
    torch.testing.assert_close(logits(pruned), logits(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads, n_kv", [([2, 3], 1), ([0, 3], 2)])  # a whole kv group; one head in each group
def test_zeroed_query_heads_prune_exactly_with_their_kv_heads(heads, n_kv):
    model = tiny()  # 4 query heads, 2 kv heads: groups {0, 1} and {2, 3}
    zero_dropped(model, heads=heads)
    pruned = prune_width(model, heads_keep=torch.tensor(heads))
    assert (pruned.config.n_heads, pruned.config.n_kv_heads, pruned.config.head_dim) == (2, n_kv, 16)
    assert pruned.model.layers[0].self_attn.q_proj.weight.shape == (32, 64)
    torch.testing.assert_close(logits(pruned), logits(model), rtol=1e-5, atol=1e-5)


def test_per_layer_heads_keep_each_layers_whole_heads():
    model = tiny(n_kv_heads=4)
    heads = [[0, 1], [1, 3], [0, 2]]
    for block, h in zip(model.model.layers, heads):
        gone = dropped(4, h)
        with torch.no_grad():
            block.self_attn.o_proj.weight.view(64, 4, 16)[:, gone] = 0
    pruned = prune_width(model, heads_keep=[torch.tensor(h) for h in heads])
    q_old = model.model.layers[1].self_attn.q_proj.weight.view(4, 16, 64)
    assert torch.equal(pruned.model.layers[1].self_attn.k_proj.weight.view(2, 16, 64),
                       model.model.layers[1].self_attn.k_proj.weight.view(4, 16, 64)[[1, 3]])
    assert torch.equal(pruned.model.layers[1].self_attn.q_proj.weight.view(2, 16, 64), q_old[[1, 3]])
    torch.testing.assert_close(logits(pruned), logits(model), rtol=1e-5, atol=1e-5)


def test_head_dim_channels_keep_rope_pairs_together():
    for how in ("strided", "lowest", "highest"):
        channels = head_dim_channels(64, 32, how)
        kept = set(channels.tolist())
        assert len(kept) == 32 and all((i in kept) == (i + 32 in kept) for i in range(32))
    assert head_dim_channels(64, 32, "strided")[:4].tolist() == [0, 2, 4, 6]
    assert rope_is_exact(head_dim_channels(64, 32, "strided"), 64)
    assert not rope_is_exact(head_dim_channels(64, 32, "lowest"), 64)
    assert rope_channels([1, 5], 16).tolist() == [1, 5, 9, 13]


def test_zeroed_head_channels_prune_exactly_when_rope_pairs_are_strided():
    model = tiny()
    qk = head_dim_channels(16, 8, "strided")
    v = some(16, 8, seed=5)  # values are not rotated: any channels, the same in every head
    zero_dropped(model, qk=qk, v=v)
    pruned = prune_width(model, head_dim_keep=qk, value_dim_keep=v)
    assert (pruned.config.n_heads, pruned.config.head_dim) == (4, 8)
    torch.testing.assert_close(logits(pruned), logits(model), rtol=1e-5, atol=1e-5)


def test_lowest_rope_pairs_change_frequency_so_logits_change():
    model = tiny()
    qk = head_dim_channels(16, 8, "lowest")
    zero_dropped(model, qk=qk, v=qk)
    pruned = prune_width(model, head_dim_keep=qk)
    assert not torch.allclose(logits(pruned), logits(model), atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_everything_pruned_at_once_matches_the_zeroed_model(variant):
    model = tiny(**variant)
    cfg = model.config
    hidden, ffn = some(64, 48, seed=6), some(176, 120, seed=7)
    group = cfg.n_heads // cfg.n_kv_heads
    heads = torch.arange(group, 2 * group) if group > 1 else torch.tensor([1, 2])
    qk = head_dim_channels(16, 8)
    zero_dropped(model, hidden=hidden, ffn=ffn, heads=heads, qk=qk, v=qk)
    pruned = prune_width(model, hidden, ffn, heads, head_dim_keep=qk)
    assert pruned.num_params() == pruned.config.num_params()
    assert (pruned.lm_head.weight is pruned.model.embed_tokens.weight) == cfg.tie_embeddings
    assert len({id(b.mlp) for b in pruned.model.layers}) == (1 if cfg.shared_mlp else 3)
    assert all(p.requires_grad for p in pruned.parameters())
    torch.testing.assert_close(logits(pruned), logits(model), rtol=1e-5, atol=1e-5)


def test_pruning_returns_a_new_model_and_leaves_the_original_untouched():
    model = tiny()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    pruned = prune_width(model, hidden_keep=torch.arange(32))
    with torch.no_grad():
        pruned.model.layers[0].self_attn.q_proj.weight.zero_()
    assert model.config.d_model == 64
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


# ----------------------------------------------------------------------------- width: refused input

@pytest.mark.parametrize("kwargs, message", [
    (dict(head_dim_keep=[0, 1, 2, 8]), "splits RoPE pairs"),
    (dict(heads_keep=[0, 1, 2]), "same number in every kept group"),
    (dict(heads_keep=[[0, 1], [2, 3], [0]]), "one size for every layer"),
    (dict(hidden_keep=[3, 1, 2]), "sorted and unique"),
    (dict(hidden_keep=[0, 64]), "must lie in [0, 64)"),
    (dict(ffn_keep=[[0, 1]] * 3), "MLP is shared"),
    (dict(head_dim_keep=[0, 8], value_dim_keep=[0, 1, 2, 3]), "one head_dim serves both"),
])
def test_inconsistent_index_sets_are_refused_with_the_fix(kwargs, message):
    model = tiny(shared_mlp="ffn_keep" in kwargs)
    with pytest.raises(PruneError, match=message.replace("[", r"\[").replace(")", r"\)")):
        prune_width(model, **kwargs)


def test_gqa_heads_in_groups_of_different_sizes_across_layers_are_refused():
    model = tiny()  # layer 0 keeps one whole group (1 kv head), layer 1 one head of each group (2 kv heads)
    with pytest.raises(PruneError, match="kv heads per layer"):
        prune_width(model, heads_keep=[[0, 1], [0, 2], [0, 1]])


# ----------------------------------------------------------------------------- depth

def test_drop_layers_keeps_the_chosen_layers_weights():
    model = tiny(n_layers=4)
    small = drop_layers(model, [0, 2, 3])
    assert small.config.n_layers == 3
    old, new = model.state_dict(), small.state_dict()
    for new_i, old_i in enumerate([0, 2, 3]):
        for key in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"):
            assert torch.equal(new[f"model.layers.{new_i}.{key}"], old[f"model.layers.{old_i}.{key}"])
    assert torch.equal(new["model.norm.weight"], old["model.norm.weight"])
    with pytest.raises(PruneError, match="sorted and unique"):
        drop_layers(model, [2, 0])


def test_dropping_an_identity_block_leaves_the_logits_unchanged():
    model = tiny()
    make_identity(model, 1)
    assert torch.equal(logits(drop_layers(model, [0, 2])), logits(model))


def test_drop_layers_keeps_a_shared_mlp_shared():
    small = drop_layers(tiny(shared_mlp=True), [1, 2])
    assert small.model.layers[0].mlp is small.model.layers[1].mlp
    assert small.num_params() == small.config.num_params()


# ----------------------------------------------------------------------------- tying

@pytest.mark.parametrize("source", ["input", "output", "mean"])
def test_tie_embeddings_uses_the_chosen_rows_in_one_tensor(source):
    model = tiny(tie_embeddings=False)
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    tied = tie_embeddings(model, source)
    expected = {"input": embed, "output": head, "mean": (embed + head) / 2}[source]
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert torch.equal(tied.lm_head.weight, expected)
    assert tied.config.tie_embeddings and tied.num_params() == model.num_params() - VOCAB * 64


def test_tie_embeddings_refuses_a_tied_model_and_unknown_sources():
    with pytest.raises(PruneError, match="already tied"):
        tie_embeddings(tiny())
    with pytest.raises(PruneError, match="choose 'input', 'output' or 'mean'"):
        tie_embeddings(tiny(tie_embeddings=False), "sum")


# ----------------------------------------------------------------------------- the Buzuzu-Mavi shape

def keep_token_rows(model, ids):
    """What vocab.py's shrinking will do: keep some token rows (indexing works on meta tensors too)."""
    model.model.embed_tokens = nn.Embedding.from_pretrained(model.model.embed_tokens.weight[ids], freeze=False)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight[ids])
    model.config = model.config.replace(vocab_size=len(ids))
    return model


@pytest.mark.parametrize("n_layers, expected", [(8, 50_480_128), (6, 42_087_424)])
@pytest.mark.parametrize("whole_heads", [False, True])
def test_inkubalm_pruned_the_buzuzu_mavi_way_has_the_published_parameter_count(n_layers, expected, whole_heads):
    with torch.device("meta"):  # shapes only: pruning is indexing, so 0.4B parameters cost no memory
        inkuba = Transformer(get_preset("inkuba-0.4b"))
    model = keep_token_rows(inkuba, torch.arange(8064))
    target = buzuzu_shape(model.config, n_layers=n_layers, whole_heads=whole_heads)
    small = prune_to_shape(model, target, random_importance(model), layers=first_n(n_layers))
    cfg = small.config
    assert (cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.n_layers) == (8064, 1024, 2816, n_layers)
    assert cfg.tie_embeddings and cfg.shared_mlp
    assert (cfg.n_heads, cfg.head_dim) == ((16, 64) if whole_heads else (32, 32))
    assert small.num_params() == cfg.num_params() == expected


def test_prune_to_shape_reaches_a_target_by_activation_importance():
    model = tiny(tie_embeddings=False, n_kv_heads=4)
    target = model.config.replace(d_model=32, d_ff=96, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16,
                                  tie_embeddings=True)
    scores = activation_importance(model, batches(), show_progress=False)
    small = prune_to_shape(model, target, scores, layers=top_layers(block_influence(model, batches(),
                                                                                    show_progress=False), 2))
    assert small.num_params() == target.num_params()
    assert torch.isfinite(logits(small)).all()
    with pytest.raises(PruneError, match="shrink the vocabulary first"):
        prune_to_shape(model, target.replace(vocab_size=32))


def test_buzuzu_random_prune_has_the_shape_but_breaks_what_structured_pruning_keeps():
    model = tiny()
    keep, qk = torch.arange(32), head_dim_channels(16, 8)
    zero_dropped(model, hidden=keep, qk=qk, v=qk)
    target = model.config.replace(d_model=32, head_dim=8)
    structured = prune_width(model, hidden_keep=keep, head_dim_keep=qk)
    buggy = buzuzu_random_prune(model, target, seed=0)
    assert buggy.config == target
    assert buggy.num_params() == structured.num_params() == target.num_params()
    reference = logits(model)
    assert (logits(buggy) - reference).abs().max() > 10 * (logits(structured) - reference).abs().max()
