"""lillm/beam.py: beam 1 is greedy decoding; a beam wide enough to keep everything finds the best
length-normalised output by brute force; banned n-grams are never repeated."""
import itertools

import torch
import torch.nn.functional as F

from lillm.beam import beam_search
from lillm.config import get_preset
from lillm.generate import generate
from lillm.model import Transformer

EOS = 2


def make(vocab=61):
    torch.manual_seed(0)
    return Transformer(get_preset("tiny", vocab_size=vocab)).eval()


def test_beam_one_is_greedy_decoding_with_the_eos_left_out():
    model = make()
    prompts = [[5, 9, 11, 3, 7], [8, 2, 4]]
    for n in (0, 2):
        greedy = generate(model, prompts, 20, temperature=0.0, eos_id=EOS, no_repeat_ngram=n)
        beamed = beam_search(model, prompts, 20, beam=1, eos_id=EOS, no_repeat_ngram=n)
        assert beamed == [g[:-1] if g and g[-1] == EOS else g for g in greedy]


def sequence_logprob(model, prompt, tokens):
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([prompt + tokens]))[0].float(), dim=-1)
    return sum(logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens))


def test_a_beam_that_keeps_everything_finds_the_best_normalised_output_by_brute_force():
    vocab, steps, alpha = 6, 3, 1.0
    model, prompt = make(vocab), [1, 4, 3]
    candidates = []
    for length in range(1, steps + 1):
        for body in itertools.product([t for t in range(vocab) if t != EOS], repeat=length - 1):
            for last in range(vocab):
                if last != EOS and length < steps:
                    continue  # only the last step may end without </s>
                tokens = list(body) + [last]
                candidates.append((sequence_logprob(model, prompt, tokens) / length ** alpha,
                                   list(body) + ([] if last == EOS else [last])))
    best = max(candidates)[1]
    assert beam_search(model, [prompt], steps, beam=vocab ** steps, eos_id=EOS, length_penalty=alpha) == [best]


def test_no_repeat_ngram_holds_in_every_returned_output():
    model = make()
    outputs = beam_search(model, [[5, 9, 11], [7]], 40, beam=3, eos_id=None, no_repeat_ngram=2)
    for out in outputs:
        grams = list(zip(out, out[1:]))
        assert len(grams) == len(set(grams)) and len(out) == 40
