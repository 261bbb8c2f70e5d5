import pytest
import torch

from lillm.config import get_preset
from lillm.model import Transformer, apply_rotary, RotaryEmbedding


def make(**kw):
    torch.manual_seed(0)
    return Transformer(get_preset("tiny", vocab_size=97, **kw)).eval()


def test_changing_a_later_token_never_changes_an_earlier_logit():
    model = make()
    x = torch.randint(0, 97, (2, 24))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_tied_embeddings_share_one_tensor():
    model = make()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = make(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_shared_mlp_is_one_module_in_every_layer():
    model = make(shared_mlp=True, n_layers=3)
    mlps = {id(block.mlp) for block in model.model.layers}
    assert len(mlps) == 1


def test_rotary_q_dot_k_depends_only_on_relative_position():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=16, max_seq_len=64, theta=10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([[pq]]))
        ck, sk = rope(torch.tensor([[pk]]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    assert torch.allclose(score(5, 2), score(40, 37), atol=1e-5)
    assert torch.allclose(score(9, 9), score(0, 0), atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)


@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["int-position", "tensor-position"])
def test_kv_cache_decoding_of_two_prompts_of_different_lengths_equals_full_forward(fixed_shapes):
    """An int cache_pos attends over the written keys; a tensor one over the whole (longer) cache,
    masked, as the CUDA-graph decoder runs it: both must equal the full forward pass."""
    model = make()  # tiny has GQA: 4 query heads, 2 kv heads
    assert model.config.n_kv_heads < model.config.n_heads
    torch.manual_seed(1)
    seqs = [torch.randint(0, 97, (15,)), torch.randint(0, 97, (9,))]
    prompt_lens = [7, 3]
    width = max(prompt_lens)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, (seq, n) in enumerate(zip(seqs, prompt_lens)):
        ids[row, width - n:] = seq[:n]
        mask[row, width - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    steps = 6
    cache_len = width + steps + (5 if fixed_shapes else 0)  # fixed shapes: unwritten tail stays masked
    model.setup_cache(2, cache_len)
    step_mask = torch.nn.functional.pad(mask, (0, cache_len - width), value=1) if fixed_shapes else mask
    with torch.no_grad():
        logits = model(ids, position_ids=positions, attention_mask=mask, cache_pos=0)
        cached = [[logits[r, -1]] for r in range(2)]
        for step in range(steps - 1):
            token = torch.stack([seqs[r][prompt_lens[r] + step] for r in range(2)])[:, None]
            pos = positions[:, -1:] + 1 + step
            cache_pos = torch.tensor(width + step) if fixed_shapes else width + step
            out = model(token, position_ids=pos, attention_mask=step_mask, cache_pos=cache_pos)
            for r in range(2):
                cached[r].append(out[r, -1])
        model.clear_cache()
        for r in range(2):
            full = model(seqs[r][None, : prompt_lens[r] + steps - 1])[0, prompt_lens[r] - 1:]
            diff = (torch.stack(cached[r]) - full).abs().max()
            assert diff < 1e-5, f"row {r}: max abs diff {diff}"


def test_padding_mask_makes_a_padded_row_equal_its_unpadded_self():
    model = make()
    seq = torch.randint(0, 97, (1, 10))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), seq], dim=1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 10)], dim=1).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(seq)
        inside = model(padded, position_ids=positions, attention_mask=mask)[:, 4:]
    assert (alone - inside).abs().max() < 1e-5


def test_segment_ids_keep_attention_inside_each_packed_document():
    model = make()
    a, b = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 5))
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 6 + [1] * 5])
    positions = torch.tensor([list(range(6)) + list(range(5))])
    with torch.no_grad():
        out = model(packed, position_ids=positions, segment_ids=segments)
        assert (out[:, :6] - model(a)).abs().max() < 1e-5
        assert (out[:, 6:] - model(b)).abs().max() < 1e-5


def test_cache_pos_without_a_cache_is_a_clear_error():
    with pytest.raises(RuntimeError, match="setup_cache"):
        make()(torch.zeros(1, 3, dtype=torch.long), cache_pos=0)


def test_forward_does_not_depend_on_train_or_eval_mode():
    model = make()
    x = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        a = model.train()(x)
        b = model.eval()(x)
    assert torch.equal(a, b)


def test_residual_projections_start_smaller_than_the_others():
    model = Transformer(get_preset("tiny", n_layers=8))
    block = model.model.layers[0]
    assert block.self_attn.o_proj.weight.std() < 0.5 * block.self_attn.q_proj.weight.std()
