"""Vocabulary shrinking: closed under merges (every kept token reachable), exact round trips, same
logits at kept ids, loadable by tokenizers and transformers; on tiny tokenizers trained here and on
the real Buzuzu-Mavi tokenizer (skipped when the data directory is absent)."""
import io
import itertools
import json

import numpy as np
import pytest
import tokenizers
import torch

from lillm.config import get_preset
from lillm.distill import distillation_loss
from lillm.model import Transformer
from lillm.tokenizer import Tokenizer, fertility_report, train_bpe
from lillm.vocab_shrink import (BPETables, OldIdTeacher, VocabShrinkError, bpe_derivation, build_tokenizer,
                                reachability, select_tokens, sentencepiece_reachability, shrink_model_vocab,
                                shrink_tokenizer, shrink_vocabulary, token_counts)

TEXT = """Habari ya asubuhi, rafiki yangu. Leo ni siku nzuri sana ya kufanya kazi shambani.
Watoto wanakwenda shule kila siku asubuhi na kurudi nyumbani jioni.
Serikali imetangaza mpango mpya wa kuboresha huduma za afya vijijini.
Ina kwana lafiya? Yau rana ce mai kyau domin aiki a gona.
Yara suna zuwa makaranta kowace rana da safe, suna dawowa gida da yamma.
Gwamnati ta sanar da sabon shiri don inganta ayyukan kiwon lafiya a ƙauyuka.
Ƙasar Najeriya tana da jihohi talatin da shida; ɗan'uwana yana ƙauye.""".splitlines()
CORPUS = [f"{line} {i}" for i in range(30) for line in TEXT]
UNSEEN = ["  two  spaces, ünïcödé and 🤲 emoji", "ƴan uwa ƙasa ɓarna", "tab\there\nnew line", "x", "<s> typed by a user"]


@pytest.fixture(scope="module")
def byte_level():
    return train_bpe(CORPUS, vocab_size=420, min_frequency=2, show_progress=False)


@pytest.fixture(scope="module")
def sentencepiece_style(tmp_path_factory):
    """A SentencePiece BPE with byte fallback, trained here, rebuilt as tokenizer.json by lillm.spm."""
    spm = pytest.importorskip("sentencepiece")
    from lillm.spm import tokenizer_from_sentencepiece
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buffer, model_type="bpe", vocab_size=420, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, character_coverage=1.0, minloglevel=2)
    path.write_bytes(buffer.getvalue())
    return Tokenizer(tokenizer_from_sentencepiece(path), str(path))


def both(request):
    return request.getfixturevalue(request.param)


def round_trips(tokenizer: Tokenizer, texts) -> list[str]:
    return [t for t, ids in zip(texts, tokenizer.encode_batch(texts)) if tokenizer.decode(ids) != t]


# ---- the BPE replay -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece_style"])
def test_bpe_derivation_segments_every_word_like_the_tokenizers_model(kind, request):
    tok = request.getfixturevalue(kind)
    ranks = BPETables.of(tok).ranks
    pre = tok.backend.pre_tokenizer
    words = set(tok.backend.get_vocab(with_added_tokens=False))
    for text in TEXT:
        normalized = tok.backend.normalizer.normalize_str(text) if tok.backend.normalizer else text
        words |= {w for w, _ in pre.pre_tokenize_str(normalized)} if pre else {normalized}
    for word in words:
        if all(c in tok.backend.get_vocab() for c in word):
            pieces, _ = bpe_derivation(word, ranks)
            assert pieces == [t.value for t in tok.backend.model.tokenize(word)], word


# ---- selection and reachability --------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece_style"])
def test_every_kept_token_is_produced_from_its_own_string_and_all_text_round_trips(kind, request):
    tok = request.getfixturevalue(kind)
    shrink = shrink_vocabulary(tok, CORPUS, vocab_size=330)
    assert shrink.vocab_size == 330 == shrink.tokenizer.get_vocab_size()
    assert shrink.stats["reachability_after"]["reachable_fraction"] == 1.0
    new = Tokenizer(shrink.tokenizer)
    assert round_trips(new, CORPUS + UNSEEN) == []
    assert fertility_report(new, TEXT)["tokens"] >= fertility_report(tok, TEXT)["tokens"]


def test_naive_top_k_loses_tokens_that_closing_under_merges_keeps(byte_level):
    tables, counts = BPETables.of(byte_level), token_counts(byte_level, CORPUS)
    token_of = tables.token_of()
    frequent = [token_of[i] for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    naive = set(tables.protected) | set([t for t in frequent if t not in tables.protected][:60])
    naive_tok, _ = build_tokenizer(tables, naive)
    assert reachability(naive_tok)["reachable_fraction"] < 1.0  # the public solution's mistake
    closed = select_tokens(tables, counts, vocab_size=len(naive))
    assert closed.stats["intermediates"] > 0
    assert reachability(build_tokenizer(tables, closed.kept)[0])["reachable_fraction"] == 1.0


def test_kept_ids_keep_their_old_order_and_merges_their_relative_order(sentencepiece_style):
    shrink = shrink_vocabulary(sentencepiece_style, CORPUS, vocab_size=300)
    assert shrink.kept_old_ids == sorted(shrink.kept_old_ids)
    assert shrink.kept_old_ids[:3 + 256] == list(range(3 + 256))  # <unk> <s> </s> and the 256 byte pieces
    old = [tuple(m) for m in json.loads(sentencepiece_style.backend.to_str())["model"]["merges"]]
    new = [tuple(m) for m in json.loads(shrink.tokenizer.to_str())["model"]["merges"]]
    position = {m: i for i, m in enumerate(old)}
    assert [position[m] for m in new] == sorted(position[m] for m in new)


def test_min_count_keeps_only_tokens_seen_that_often_plus_their_intermediates(byte_level):
    counts = token_counts(byte_level, CORPUS)
    shrink = shrink_tokenizer(byte_level, counts, vocab_size=None, min_count=100)
    kept = set(shrink.kept_old_ids)
    assert all(i in kept for i in np.flatnonzero(counts >= 100))
    assert shrink.stats["reachability_after"]["reachable_fraction"] == 1.0


# ---- the model ----------------------------------------------------------------------------------------
def tiny_model(vocab: int, tie: bool) -> Transformer:
    torch.manual_seed(0)
    return Transformer(get_preset("tiny", vocab_size=vocab, tie_embeddings=tie)).eval()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("vocab_size", [None, 330])
def test_shrunk_model_gives_the_same_logits_at_kept_ids_on_text_of_kept_tokens(byte_level, tie, vocab_size):
    shrink = shrink_vocabulary(byte_level, CORPUS, vocab_size=vocab_size)  # None: all used tokens
    new_id = {old: new for new, old in enumerate(shrink.kept_old_ids)}
    new_tok = Tokenizer(shrink.tokenizer)
    lines = TEXT
    if vocab_size is not None:  # a text of the words whose tokens were all kept
        words = sorted({" " + w for w in " ".join(TEXT).split() if all(i in new_id for i in byte_level.encode(" " + w))})
        assert len(words) > 20
        lines = ["".join(words[:40]), "".join(words[-40:])]
    assert all(i in new_id for line in lines for i in byte_level.encode(line))
    model = tiny_model(byte_level.vocab_size, tie)
    small = shrink_model_vocab(model, shrink.kept_old_ids).eval()
    assert small.config.vocab_size == shrink.vocab_size and small.config.tie_embeddings == tie
    assert (small.lm_head.weight is small.model.embed_tokens.weight) == tie
    for line in lines:
        old_ids = byte_level.encode(line)
        assert new_tok.encode(line) == [new_id[i] for i in old_ids]
        with torch.no_grad():
            expected = model(torch.tensor([old_ids]))[..., shrink.kept_old_ids]
            got = small(torch.tensor([[new_id[i] for i in old_ids]]))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_config_special_ids_follow_their_tokens(sentencepiece_style):
    shrink = shrink_vocabulary(sentencepiece_style, CORPUS, vocab_size=300)
    model = Transformer(get_preset("tiny", vocab_size=sentencepiece_style.vocab_size, bos_id=1, eos_id=2, pad_id=None))
    small = shrink_model_vocab(model, shrink.kept_old_ids)
    assert (small.config.bos_id, small.config.eos_id, small.config.pad_id) == (1, 2, None)
    assert shrink.tokenizer.encode("Habari").ids[0] == shrink.tokenizer.token_to_id("<s>")  # post-processor remapped


def test_old_id_teacher_reads_new_ids_and_distilling_its_own_shrunk_copy_has_zero_kl(byte_level):
    shrink = shrink_vocabulary(byte_level, CORPUS, vocab_size=330)
    teacher = tiny_model(byte_level.vocab_size, tie=False)
    student = shrink_model_vocab(teacher, shrink.kept_old_ids)
    ids = torch.tensor([Tokenizer(shrink.tokenizer).encode(TEXT[0])])
    wrapped = OldIdTeacher(teacher, shrink.kept_old_ids)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(ids), teacher(torch.tensor(shrink.kept_old_ids)[ids]))
    loss_fn = distillation_loss(wrapped, temperature=1.0, alpha=1.0, teacher_token_ids=shrink.kept_old_ids)
    loss, count = loss_fn(student, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    assert count == ids.shape[1] - 1 and abs(loss.item()) < 1e-4


# ---- files and errors ----------------------------------------------------------------------------------
def test_shrunk_tokenizer_json_loads_in_tokenizers_and_transformers(tmp_path, sentencepiece_style):
    transformers = pytest.importorskip("transformers")
    shrink = shrink_vocabulary(sentencepiece_style, CORPUS, vocab_size=300)
    path = tmp_path / "tokenizer.json"
    shrink.tokenizer.save(str(path))
    reloaded = tokenizers.Tokenizer.from_file(str(path))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in TEXT + UNSEEN[:3]:
        ids = shrink.tokenizer.encode(text).ids
        assert reloaded.encode(text).ids == ids == fast(text)["input_ids"]
        assert fast.decode(ids, skip_special_tokens=True) == text


def test_too_small_a_target_is_refused_naming_the_special_and_byte_tokens(byte_level):
    with pytest.raises(VocabShrinkError, match="special and byte tokens alone take 263"):
        shrink_vocabulary(byte_level, CORPUS, vocab_size=263)


def test_a_tokenizer_without_byte_fallback_or_byte_level_is_refused():
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    with pytest.raises(VocabShrinkError, match="neither byte_fallback nor a ByteLevel"):
        BPETables.of(tok)
    with pytest.raises(VocabShrinkError, match="model is 'WordLevel'"):
        BPETables.of(tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))


def test_shrink_model_vocab_refuses_ids_outside_the_vocabulary():
    with pytest.raises(VocabShrinkError, match=r"distinct ids in \[0, 64\)"):
        shrink_model_vocab(tiny_model(64, tie=True), [0, 1, 64])


# ---- the real Buzuzu-Mavi tokenizer ----------------------------------------------------------------------
def texts(root, langs, split, per_lang=None):
    from lillm.corpora import documents_for
    kinds = ("mono", "news", "sentiment", "mt")
    return {lang: [d for _, d in itertools.islice(documents_for([lang], (split,), data_dir=root, kinds=kinds), per_lang)]
            for lang in langs}


def test_public_buzuzu_8064_set_loses_about_15_percent_and_shrinking_it_to_itself_reaches_all(capsys, buzuzu):
    from lillm.spm import load_tokenizer
    root, folder = buzuzu
    public = sentencepiece_reachability(folder / "tokenizer.model")
    assert 0.12 < public["unreachable"] / public["tested"] < 0.18
    repaired = load_tokenizer(folder)
    train = [t for v in texts(root, ["swa", "hau"], "train", 4000).values() for t in v]
    shrink = shrink_vocabulary(repaired, train, vocab_size=8064)
    assert shrink.stats["reachability_after"]["reachable_fraction"] == 1.0
    with capsys.disabled():
        print(f"\npublic Buzuzu-Mavi 8,064: {public['unreachable']:,} of {public['tested']:,} multi-character pieces "
              f"unreachable under SentencePiece ({public['unreachable'] / public['tested']:.1%}); repaired "
              f"tokenizer.json {shrink.stats['reachability_before']['unreachable']:,} of "
              f"{shrink.stats['reachability_before']['tested']:,}; shrunk to itself: {shrink.vocab_size:,} ids, "
              f"100% reachable")


def test_buzuzu_shrunk_to_4096_on_swahili_hausa_reaches_every_token_and_round_trips_all_dev_text(capsys, buzuzu):
    from lillm.spm import load_tokenizer
    root, folder = buzuzu
    before = Tokenizer(load_tokenizer(folder))
    train = [t for v in texts(root, ["swa", "hau"], "train", 4000).values() for t in v]
    shrink = shrink_vocabulary(before, train, vocab_size=4096)
    after = Tokenizer(shrink.tokenizer)
    assert shrink.vocab_size == 4096
    assert shrink.stats["reachability_after"]["reachable_fraction"] == 1.0
    dev = texts(root, ["swa", "hau", "xho", "zul"], "dev")
    for lang, docs in dev.items():
        assert docs and round_trips(after, docs) == [], lang
    lines = []
    for lang in ("swa", "hau"):
        b, a = fertility_report(before, dev[lang]), fertility_report(after, dev[lang])
        lines.append(f"{lang}: tokens/word {b['tokens_per_word']:.3f} -> {a['tokens_per_word']:.3f}")
    with capsys.disabled():
        print(f"\nBuzuzu-Mavi -> 4,096: reachable {shrink.stats['reachability_before']['reachable_fraction']:.1%} -> "
              f"100%; {shrink.stats['intermediates']} intermediates kept; " + "; ".join(lines))
