import pytest

from lillm.config import INKUBA_PARAMS, ModelConfig, PRESETS, get_preset
from lillm.model import Transformer


def buzuzu(vocab, layers):
    return get_preset("inkuba-0.4b", vocab_size=vocab, d_model=1024, d_ff=2816, n_layers=layers, tie_embeddings=True)


def test_inkuba_preset_has_exactly_421_939_200_parameters():
    assert get_preset("inkuba-0.4b").num_params() == INKUBA_PARAMS == 421_939_200


@pytest.mark.parametrize("vocab,layers,expected", [(8064, 8, 50_480_128), (8064, 6, 42_087_424), (61788, 8, 105_493_504)])
def test_buzuzu_mavi_shapes_have_the_published_parameter_counts(vocab, layers, expected):
    cfg = buzuzu(vocab, layers)
    assert cfg.head_dim == 32 and cfg.n_heads == 32
    assert cfg.num_params() == expected


@pytest.mark.parametrize("name", ["tiny", "small", "lillm-39m"])
def test_counted_parameters_equal_the_built_model(name):
    cfg = PRESETS[name]
    assert Transformer(cfg).num_params() == cfg.num_params()


def test_shared_mlp_and_tied_counts_equal_the_built_model():
    cfg = get_preset("tiny", shared_mlp=True, tie_embeddings=False, n_layers=3)
    assert Transformer(cfg).num_params() == cfg.num_params()


def test_lillm_39m_is_about_39_million():
    assert 38e6 < PRESETS["lillm-39m"].num_params() < 41e6


def test_hf_dict_round_trip_keeps_every_field():
    cfg = get_preset("inkuba-0.4b")
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_bad_shapes_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="not a multiple of n_kv_heads"):
        ModelConfig(n_heads=6, n_kv_heads=4, d_model=384)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nope")


def test_flops_count_attention_by_query_heads_not_kv_heads():
    mha = get_preset("tiny", n_kv_heads=4)
    gqa = get_preset("tiny", n_kv_heads=1)
    T = 64
    # GQA only removes k/v projection weights: 2 FLOPs x 3 (fwd+bwd) per removed weight.
    removed = 2 * mha.d_model * (4 - 1) * mha.head_dim * mha.n_layers
    assert mha.flops_per_token(T) - gqa.flops_per_token(T) == 6 * removed
    attention = 3 * 2 * 2 * T * mha.n_heads * mha.head_dim * mha.n_layers
    assert mha.flops_per_token(T) - mha.flops_per_token(0 or 1) == pytest.approx(attention * (T - 1) / T)


def test_model_overrides_are_typed_and_unknown_keys_are_refused():
    from lillm.config import parse_overrides
    from lillm.errors import FlagError

    assert parse_overrides(["n_layers=6", "d_ff=704", "rope_theta=5e5", "tie_embeddings=false", "head_dim=none"]) == {
        "n_layers": 6, "d_ff": 704, "rope_theta": 5e5, "tie_embeddings": False, "head_dim": None}
    for bad in (["layers=6"], ["n_layers"], ["n_layers=six"], ["tie_embeddings=maybe"]):
        with pytest.raises(FlagError, match="--model"):
            parse_overrides(bad)
