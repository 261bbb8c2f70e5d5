import itertools
import json
import random

import pytest
import tokenizers
import torch

from lillm.config import get_preset
from lillm.model import Transformer
from lillm.tokenizer import Tokenizer, train_bpe
from lillm.vocab_expand import (VocabExpansionError, bpe_split, expand_model_vocab, expand_tokenizer, expand_vocabulary,
                         fertility_change, learn_new_merges)

OLD_SYLLABLES = ["ka", "ma", "ta", "li", "no", "wa", "se", "du"]
NEW_SYLLABLES = ["nga", "hla", "zwe", "thi", "bho", "qa", "ku", "ntu"]


def sentences(syllables, n, seed):
    rng = random.Random(seed)
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(60)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) for _ in range(n)]


@pytest.fixture(scope="module")
def base_tokenizer():
    return train_bpe(sentences(OLD_SYLLABLES, 400, seed=0), vocab_size=320, show_progress=False)


@pytest.fixture(scope="module")
def new_language():
    return sentences(NEW_SYLLABLES, 400, seed=1)


def tiny(vocab_size, **overrides):
    torch.manual_seed(0)
    return Transformer(get_preset("tiny", vocab_size=vocab_size, max_seq_len=64, **overrides)).eval()


def expand(base_tokenizer, new_language, n_new=40, pad=64, **overrides):
    model = tiny(base_tokenizer.vocab_size, **overrides)
    reference = tiny(base_tokenizer.vocab_size, **overrides)
    model, expansion = expand_vocabulary(model, base_tokenizer, new_language, n_new, pad_to_multiple=pad,
                                         show_progress=False)
    return reference, model, expansion


def test_old_ids_keep_their_strings_and_new_ids_follow_them(base_tokenizer, new_language):
    _, _, expansion = expand(base_tokenizer, new_language)
    old, new = base_tokenizer, expansion.tokenizer
    assert len(expansion.new_tokens) == 40
    assert all(new.id_to_token(i) == old.id_to_token(i) for i in range(old.vocab_size))
    assert [new.token_to_id(t) for t in expansion.new_tokens] == list(range(old.vocab_size, old.vocab_size + 40))
    assert all(old.token_to_id(t) is None for t in expansion.new_tokens)


def test_new_merges_are_appended_after_every_existing_merge(base_tokenizer, new_language):
    _, _, expansion = expand(base_tokenizer, new_language)
    before = json.loads(base_tokenizer.backend.to_str())["model"]["merges"]
    after = json.loads(expansion.tokenizer.backend.to_str())["model"]["merges"]
    assert after[:len(before)] == before and len(after) == len(before) + 40


@pytest.mark.parametrize("pad", [64, 32])
def test_vocabulary_is_padded_to_the_multiple_with_unused_tokens(base_tokenizer, new_language, pad):
    _, model, expansion = expand(base_tokenizer, new_language, pad=pad)
    size = expansion.tokenizer.vocab_size
    assert size % pad == 0 and size - pad < base_tokenizer.vocab_size + 40 <= size
    assert model.config.vocab_size == size == model.model.embed_tokens.weight.shape[0] == model.lm_head.weight.shape[0]
    assert expansion.filler_tokens[0] == "<|unused_0|>"
    assert expansion.tokenizer.token_to_id("<|unused_0|>") == base_tokenizer.vocab_size + 40
    # a user typing a filler's text gets ordinary text tokens, never the filler id
    assert expansion.tokenizer.encode("<|unused_0|>")[0] < base_tokenizer.vocab_size


@pytest.mark.parametrize("tied", [True, False])
def test_text_of_old_tokens_encodes_and_scores_exactly_as_before(base_tokenizer, new_language, tied):
    reference, model, expansion = expand(base_tokenizer, new_language, tie_embeddings=tied)
    old_text = sentences(OLD_SYLLABLES, 20, seed=5)
    for text in old_text:
        ids = expansion.tokenizer.encode(text)
        assert ids == base_tokenizer.encode(text) and max(ids) < base_tokenizer.vocab_size
    x = torch.tensor([base_tokenizer.encode(old_text[0])[:40]])
    with torch.no_grad():
        assert torch.equal(model(x)[..., :base_tokenizer.vocab_size], reference(x))


def test_new_tokens_are_produced_when_their_text_is_encoded(base_tokenizer, new_language):
    _, _, expansion = expand(base_tokenizer, new_language)
    tokenizer = expansion.tokenizer
    for i, token in enumerate(expansion.new_tokens):
        token_id = expansion.base_vocab_size + i
        assert [t.id for t in tokenizer.backend.model.tokenize(token)] == [token_id]
    ids = tokenizer.encode(" ".join(sentences(NEW_SYLLABLES, 5, seed=9)))
    assert any(i >= expansion.base_vocab_size for i in ids)
    report = fertility_change(base_tokenizer, tokenizer, sentences(NEW_SYLLABLES, 50, seed=11))
    assert report["after"]["tokens_per_word"] < report["before"]["tokens_per_word"]


@pytest.mark.parametrize("tied", [True, False])
def test_new_rows_are_the_mean_of_their_base_pieces_and_fillers_the_global_mean(base_tokenizer, new_language, tied):
    reference, model, expansion = expand(base_tokenizer, new_language, tie_embeddings=tied)
    old_embed, old_head = reference.model.embed_tokens.weight, reference.lm_head.weight
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    for i, pieces in enumerate(expansion.new_token_pieces):
        row = expansion.base_vocab_size + i
        assert len(pieces) >= 2
        assert base_tokenizer.decode(pieces) == expansion.tokenizer.decode([row])
        assert torch.allclose(embed[row], old_embed[pieces].mean(0), atol=1e-7)
        assert torch.allclose(head[row], old_head[pieces].mean(0), atol=1e-7)
    assert torch.allclose(embed[-1], old_embed.mean(0), atol=1e-7)
    assert (head is embed) == tied


def test_the_global_mean_is_an_option(base_tokenizer, new_language):
    model = tiny(base_tokenizer.vocab_size)
    merges = learn_new_merges(base_tokenizer, new_language, 10, show_progress=False)
    expansion = expand_tokenizer(base_tokenizer, merges)
    mean = model.model.embed_tokens.weight.detach().mean(0)
    expand_model_vocab(model, expansion, init="mean")
    assert torch.allclose(model.model.embed_tokens.weight[expansion.base_vocab_size], mean, atol=1e-7)
    with pytest.raises(VocabExpansionError, match="'pieces'"):
        expand_model_vocab(tiny(base_tokenizer.vocab_size), expansion, init="zeros")


def test_bpe_split_follows_merge_ranks():
    ranks = {("b", "c"): 0, ("a", "b"): 1, ("a", "bc"): 2}
    assert bpe_split("abc", ranks) == ["abc"]
    assert bpe_split("abc", {("b", "c"): 0, ("a", "b"): 1}) == ["a", "bc"]


def test_bad_inputs_are_refused_with_the_fix(base_tokenizer, new_language):
    merges = learn_new_merges(base_tokenizer, new_language, 5, show_progress=False)
    expansion = expand_tokenizer(base_tokenizer, merges)
    with pytest.raises(VocabExpansionError, match="expand the tokenizer the model was trained with"):
        expand_model_vocab(tiny(base_tokenizer.vocab_size + 1), expansion)
    with pytest.raises(VocabExpansionError, match="at least one new token"):
        learn_new_merges(base_tokenizer, new_language, 0)
    with pytest.raises(VocabExpansionError, match="does not build a new token"):
        expand_tokenizer(base_tokenizer, [("k", "a")] if base_tokenizer.token_to_id("ka") else [("zz", "q")])
    word_level = Tokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    with pytest.raises(VocabExpansionError, match="use a BPE tokenizer.json"):
        learn_new_merges(word_level, new_language, 5)


def test_expanding_a_swahili_tokenizer_with_isizulu_lowers_isizulu_fertility():
    corpora = pytest.importorskip("lillm.corpora")
    try:
        swahili = [d for _, d in itertools.islice(corpora.documents_for(["swa"], names=["lacuna-swa"]), 1500)]
        zulu = [d for _, d in itertools.islice(corpora.documents_for(["zul"], names=["lacuna-zul"]), 1500)]
    except FileNotFoundError:
        pytest.skip("the shared data directory is absent")
    base = train_bpe(swahili, vocab_size=1000, show_progress=False)
    merges = learn_new_merges(base, zulu[100:], 200, show_progress=False)
    expansion = expand_tokenizer(base, merges)
    report = fertility_change(base, expansion.tokenizer, zulu[:100])
    assert len(merges) == 200 and report["tokens_per_word_change"] < -0.05
    assert fertility_change(base, expansion.tokenizer, swahili[:100])["tokens_per_word_change"] <= 0


def test_training_only_new_rows_leaves_old_rows_and_other_weights_untouched():
    from lillm.config import get_preset
    from lillm.model import Transformer
    from lillm.vocab_expand import train_only_new_rows
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_only_new_rows(model, 48)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        x = torch.randint(0, 64, (2, 12))
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    embed = "model.embed_tokens.weight"
    assert torch.equal(after[embed][:48], before[embed][:48])
    assert not torch.equal(after[embed][48:], before[embed][48:])
    assert all(torch.equal(after[k], before[k]) for k in before if k not in (embed, "lm_head.weight"))
