import torch

from lillm.config import get_preset
from lillm.generate import StaticDecoder, cache_length, generate, sample_next
from lillm.model import Transformer


def make():
    torch.manual_seed(0)
    return Transformer(get_preset("tiny", vocab_size=61)).eval()


def greedy_by_full_forward(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_batched_greedy_generation_equals_one_prompt_at_a_time_full_forward():
    model = make()
    prompts = [[5, 9, 11, 3, 7], [8, 2]]
    out = generate(model, prompts, max_new_tokens=8, temperature=0)
    for prompt, new in zip(prompts, out):
        assert new == greedy_by_full_forward(model, prompt, 8)


def test_generation_stops_after_eos_and_keeps_it():
    model = make()
    first = generate(model, [[1, 2, 3]], max_new_tokens=5, temperature=0)[0]
    eos = first[2]
    out = generate(model, [[1, 2, 3]], max_new_tokens=5, temperature=0, eos_id=eos)[0]
    assert out == first[: first.index(eos) + 1]


def test_same_seed_same_samples():
    model = make()
    a = generate(model, [[4, 5]], max_new_tokens=10, temperature=1.0, top_k=20, seed=7)
    b = generate(model, [[4, 5]], max_new_tokens=10, temperature=1.0, top_k=20, seed=7)
    assert a == b


def test_top_k_and_top_p_only_sample_allowed_tokens():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert picks <= {0, 1}
    # p(token 0) = 0.71 < 0.8, so token 1 is needed; token 2 is not.
    picks = {int(sample_next(logits, 1.0, top_p=0.8, generator=g)) for _ in range(200)}
    assert picks == {0, 1}


def test_streaming_callback_sees_every_token_in_order():
    model = make()
    seen = []
    out = generate(model, [[3, 4], [5]], max_new_tokens=4, temperature=0, on_token=lambda r, t: seen.append((r, t)))
    assert [t for r, t in seen if r == 0] == out[0]
    assert [t for r, t in seen if r == 1] == out[1]


def test_fixed_shape_decoding_equals_generate_and_keeps_its_cache_between_calls():
    """StaticDecoder's step (the one CUDA graphs replay), run eagerly: same greedy tokens as the
    plain path, for a padded batch; the cache is allocated once and reused by the next call."""
    model = make()
    prompts = [[5, 9, 11, 3, 7], [8, 2], [4]]
    decoder = StaticDecoder(model, compile=False)
    expected = generate(model, prompts, max_new_tokens=10, temperature=0)
    assert generate(model, prompts, max_new_tokens=10, temperature=0, compile=decoder) == expected
    cache = model.model.layers[0].self_attn.cache
    assert cache.k.shape[2] == 64  # 15 positions needed: the shortest cache length, also the next call's
    assert generate(model, prompts, max_new_tokens=4, temperature=0, compile=decoder) == [e[:4] for e in expected]
    assert model.model.layers[0].self_attn.cache is cache
    assert generate(model, prompts[:1], max_new_tokens=6, temperature=0, compile=decoder) == [expected[0][:6]]


def test_a_compiled_cache_is_a_power_of_two_long_within_the_context():
    """One graph per cache length: powers of two (at least 64) up to the context, and a request
    beyond the context gets its own length."""
    model = make()  # context 128
    assert [cache_length(model, n) for n in (1, 64, 65, 100, 128, 129)] == [64, 64, 128, 128, 128, 129]


def test_sampled_decoding_through_the_fixed_shape_step_draws_what_generate_draws():
    """The step returns the logits; a sampled row draws from them with the caller's seeded
    generator, as the plain path does, so a seed gives the same tokens either way."""
    model = make()
    prompts = [[5, 9, 11, 3, 7], [8, 2]]
    settings = dict(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=3)
    assert generate(model, prompts, compile=StaticDecoder(model, compile=False), **settings) == \
        generate(model, prompts, **settings)


def test_fixed_shape_step_traces_as_one_graph_without_host_reads():
    """fullgraph=True fails on any graph break, such as reading a position back to the host,
    which CUDA graphs cannot replay. The eager backend traces without compiling (no GPU here)."""
    model = make()
    decoder = StaticDecoder(model, backend="eager", mode=None)
    prompts = [[5, 9, 11, 3, 7], [8, 2]]
    assert generate(model, prompts, max_new_tokens=5, temperature=0, compile=decoder) == \
        generate(model, prompts, max_new_tokens=5, temperature=0)


def test_no_repeat_ngram_never_repeats_an_ngram_of_the_rows_own_output():
    model = make()
    prompts = [[1, 5, 9, 2], [7, 7, 7]]
    plain = generate(model, prompts, 60, temperature=0.0)
    for n in (1, 2, 3):
        outputs = generate(model, prompts, 60, temperature=0.0, no_repeat_ngram=n)
        for row, out in enumerate(outputs):
            grams = [tuple(out[i:i + n]) for i in range(len(out) - n + 1)]
            assert len(grams) == len(set(grams)), (n, row)
            # Until the plain output first repeats an n-gram, the two outputs are the same tokens.
            seen, same = set(), 0
            for i in range(len(plain[row])):
                gram = tuple(plain[row][max(0, i - n + 1):i + 1])
                if len(gram) == n and gram in seen:
                    break
                seen.add(gram)
                same = i + 1
            assert out[:same] == plain[row][:same]


def test_logit_bias_moves_greedy_choices_only_in_its_own_row():
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=64)).eval()
    prompts = [[1, 5, 9], [1, 7, 3, 2]]
    plain = generate(model, prompts, 6, temperature=0.0)
    favoured = plain[0][0] + 1
    biased = generate(model, prompts, 6, temperature=0.0, logit_bias=[{favoured: 1e4}, {}])
    assert biased[0] == [favoured] * 6          # a huge bias wins every step of its row
    assert biased[1] == plain[1]                # the other row decodes as before
    assert generate(model, prompts, 6, temperature=0.0, logit_bias=[{}, {}]) == plain
