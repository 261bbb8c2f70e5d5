"""Tests for lillm/tokenizer.py: exact round trips, vocabulary layout, chat template, loading."""

import json

import pytest

from lillm.corpora import data_dir
from lillm.tokenizer import (SPECIAL_TOKENS, ChatTemplateError, Tokenizer, TokenizerFileError, fertility_report,
                             load_lenient, train_bpe)

CORPUS = [
    "Habari za asubuhi, rafiki yangu? Nzuri sana, asante.",
    "Watoto wanacheza mpira uwanjani pamoja na walimu wao.",
    "Ina kwana? Lafiya lau. Ƙasar Najeriya tana da ɗimbin al'umma, ‘yan ƙasa da ɓangarori.",
    "Sannu da zuwa, ƴan uwa. Mun gode ƙwarai da gaske.",
    "Sawubona, ngiyabonga kakhulu. Ngiyakuthanda, mngane wami.",
    "Molo, enkosi kakhulu. Ndiyavuya ukukubona namhlanje eXhosa.",
] * 40
ROUND_TRIP = [
    "Habari za asubuhi? Tutaonana kesho saa 3:45.",
    "Ƙasar ɗan ɓarawo ƴaƴa ‘Yan sanda’ sun kama shi.",
    "Ngiyabonga kakhulu, sawubona mngane wami!",
    "Ndiyavuya ukukubona — uxolo, ndicela amanzi.",
    "café ŋoma façade naïve ÉCOLE",
    "emoji 😀👍🏽🇰🇪 and digits 0123456789 1,000,000.50",
    "  leading spaces\ttab\t\tdouble tab\n\nnewlines\r\nCRLF   trailing  ",
    "literal specials stay text: <s> </s> <pad> <|user|> <|assistant|>",
    "",
]
BUZUZU_RELPATH = "buzuzu_mavi_stefan027/tokenizer/tokenizer.json"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(CORPUS, vocab_size=400, min_frequency=2, show_progress=False)


def test_trained_vocab_has_exactly_vocab_size_ids(tok):
    assert tok.vocab_size == 400
    assert len(tok.backend.get_vocab(with_added_tokens=True)) == 400


def test_special_tokens_sit_at_ids_0_to_6(tok):
    assert [tok.id_to_token(i) for i in range(7)] == SPECIAL_TOKENS
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_decode_of_encode_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_text_resembling_special_tokens_is_not_encoded_as_specials(tok):
    ids = tok.encode("<s><|assistant|>")
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))


def test_bos_and_eos_are_added_only_when_asked(tok):
    plain = tok.encode("Habari")
    assert tok.encode("Habari", add_bos=True, add_eos=True) == [1] + plain + [2]
    assert tok.encode_batch(["Habari", "Sannu"]) == [plain, tok.encode("Sannu")]


def test_vocab_smaller_than_specials_and_bytes_is_rejected():
    with pytest.raises(ValueError, match="too small"):
        train_bpe(CORPUS, vocab_size=200, show_progress=False)


def test_corpus_too_small_for_vocab_size_is_reported():
    with pytest.raises(ValueError, match="produced"):
        train_bpe(["ab ab"], vocab_size=5000, show_progress=False)


def test_chat_template_ids_and_mask_token_by_token(tok):
    messages = [{"role": "system", "content": "Jibu kwa Kiswahili."},
                {"role": "user", "content": "Habari?"},
                {"role": "assistant", "content": "Nzuri sana."},
                {"role": "user", "content": "Asante"},
                {"role": "assistant", "content": "Karibu!"}]
    ids, mask = tok.apply_chat_template(messages)
    sys_ids, u1, a1, u2, a2 = (tok.encode(m["content"]) for m in messages)
    system, user, assistant = 4, 5, 6
    expected = ([1] + [system] + sys_ids + [2] + [user] + u1 + [2] + [assistant] + a1 + [2]
                + [user] + u2 + [2] + [assistant] + a2 + [2])
    expected_mask = ([0] + [0] * (len(sys_ids) + 2) + [0] * (len(u1) + 2) + [0] + [1] * (len(a1) + 1)
                     + [0] * (len(u2) + 2) + [0] + [1] * (len(a2) + 1))
    assert ids == expected
    assert mask == expected_mask
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special=True) == "Nzuri sana.Karibu!"


def test_chat_generation_prompt_appends_unmasked_assistant_token(tok):
    ids, mask = tok.apply_chat_template([{"role": "user", "content": "Habari?"}], add_generation_prompt=True)
    assert ids[-1] == tok.token_to_id("<|assistant|>") and mask[-1] == 0
    assert len(ids) == len(mask) and sum(mask) == 0


def test_chat_bad_role_names_message_index(tok):
    with pytest.raises(ChatTemplateError, match=r"message 1 has unknown role 'bot'"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}])


def test_chat_non_string_content_names_message_index(tok):
    with pytest.raises(ChatTemplateError, match=r"message 0 \(user\).*not a string"):
        tok.apply_chat_template([{"role": "user", "content": ["a"]}])


def test_save_and_load_keep_sha256_and_ids(tok, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    again = Tokenizer.from_file(path)
    assert again.sha256 == tok.sha256
    assert again.encode(ROUND_TRIP[1]) == tok.encode(ROUND_TRIP[1])
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temporary file left


def test_sha256_differs_between_different_tokenizers(tok):
    other = train_bpe(CORPUS, vocab_size=390, show_progress=False)
    assert other.sha256 != tok.sha256


def test_missing_tokenizer_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.json"):
        Tokenizer.from_file(tmp_path / "absent.json")


def test_broken_tokenizer_file_names_it(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="broken.json"):
        Tokenizer.from_file(path)
    with pytest.raises(TokenizerFileError, match="broken.json"):
        load_lenient(path)


def _llama_style_json(tok: Tokenizer, drop_merge_parts: bool) -> dict:
    """A tokenizer.json with only <unk>, <s>, </s> specials, optionally with merges naming pruned tokens."""
    data = json.loads(tok.backend.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in ("<unk>", "<s>", "</s>")]
    vocab = data["model"]["vocab"]
    for token in ("<pad>", "<|system|>", "<|user|>", "<|assistant|>"):
        del vocab[token]
    if drop_merge_parts:
        data["model"]["merges"].append(["zzqq", "xxyy"])
    return data


def test_foreign_tokenizer_without_pad_or_roles_falls_back_to_eos_and_refuses_chat(tok, tmp_path):
    path = tmp_path / "llama.json"
    path.write_text(json.dumps(_llama_style_json(tok, drop_merge_parts=False)), encoding="utf-8")
    foreign = Tokenizer.from_file(path)
    assert foreign.pad_id == foreign.eos_id == 2
    with pytest.raises(ChatTemplateError, match="no <\\|user\\|> token"):
        foreign.apply_chat_template([{"role": "user", "content": "Habari"}])


def test_load_lenient_drops_merges_outside_vocab(tok, tmp_path):
    path = tmp_path / "pruned.json"
    path.write_text(json.dumps(_llama_style_json(tok, drop_merge_parts=True)), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="load_lenient"):
        Tokenizer.from_file(path)
    loaded, explanation = load_lenient(path)
    assert "dropped 1 of" in explanation
    assert loaded.decode(loaded.encode(ROUND_TRIP[0])) == ROUND_TRIP[0]


def test_load_lenient_on_real_buzuzu_mavi_tokenizer():
    try:
        path = data_dir() / BUZUZU_RELPATH
    except FileNotFoundError:
        pytest.skip("real data directory not present")
    if not path.is_file():
        pytest.skip(f"{path} not present")
    with pytest.raises(TokenizerFileError, match="out of vocabulary"):
        Tokenizer.from_file(path)
    loaded, explanation = load_lenient(path)
    assert loaded.vocab_size == 8064 and (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (1, 2, 2)
    assert "dropped" in explanation and "136,619 merges" in explanation and "can no longer be produced" in explanation
    text = "Habari za asubuhi? Ƙasar ɗan uwa."
    assert loaded.decode(loaded.encode(text)) == text


def test_fertility_report_counts_words_bytes_and_tokens(tok):
    texts = ["Habari za asubuhi", "Sannu ɗan uwa"]
    report = fertility_report(tok, texts, batch_size=1)
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    assert (report["documents"], report["words"], report["tokens"]) == (2, 6, n_tokens)
    assert report["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert report["tokens_per_word"] == pytest.approx(n_tokens / 6)
    assert report["bytes_per_token"] == pytest.approx(report["bytes"] / n_tokens)
