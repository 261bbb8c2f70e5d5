import json
import math

import pytest
import torch
import torch.nn.functional as F

from lillm import checkpoint as ckpt
from lillm.config import INKUBA_PARAMS, get_preset
from lillm.challenge import challenge_average, zindi_score
from lillm.evaluate import (SCORINGS, classify_by_likelihood, content_free, evaluate_subset, generate_answers,
                            match_option, names_and_numbers, option_logprobs, option_scores, scored_options)
from lillm.generate import generate
from lillm.metrics import bleu, chrf, tokenize_13a, weighted_f1
from lillm.model import Transformer
from lillm.sft import prompt_ids
from lillm.tokenizer import train_bpe

HYPOTHESES = ["Watoto wanacheza mpira uwanjani kila jioni.", "Gwamnati ta ƙaddamar da sabon shiri.",
              "", "Mvua kubwa imenyesha jijini Dar es Salaam, 12,000 watu.", "abc"]
REFERENCES = ["Watoto wanacheza mpira uwanjani jioni.", "Gwamnatin jihar ta ƙaddamar da sabon shirin noma.",
              "Habari za asubuhi.", "Mvua kubwa ilinyesha Dar es Salaam usiku; watu 12,000.", "abc"]


# ---- metrics --------------------------------------------------------------------------------------
def test_weighted_f1_matches_hand_computation():
    y_true = ["a", "a", "a", "b", "b", "c"]
    y_pred = ["a", "a", "b", "b", "c", "c"]
    # a: P 2/2, R 2/3, F1 0.8; b: P 1/2, R 1/2, F1 0.5; c: P 1/2, R 1/1, F1 2/3; weights 3, 2, 1.
    assert weighted_f1(y_true, y_pred) == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert weighted_f1(y_true, y_true) == 1.0
    # Never predicting b gives b an F1 of 0; a predicted label absent from the truth only costs precision.
    assert weighted_f1(["a", "b"], ["a", "x"]) == pytest.approx(0.5)
    assert weighted_f1(["a", "a", "b"], ["a", "a", "a"]) == pytest.approx(2 / 3 * 0.8)
    with pytest.raises(ValueError, match="y_pred has 1"):
        weighted_f1(["a", "b"], ["a"])


def test_zindi_score_matches_hand_computation():
    assert zindi_score(0.5, INKUBA_PARAMS // 4) == pytest.approx((0.5 + 0.75 * 0.5) / 2)
    assert zindi_score(0.5, INKUBA_PARAMS) == pytest.approx(0.25)
    assert zindi_score(0.8, 0) == pytest.approx(0.8)
    scores = {(t, l): 0.6 for t in ("sentiment", "nli", "translation") for l in ("hau", "swa")}
    assert challenge_average(scores) == pytest.approx(0.6)
    assert challenge_average({("sentiment", "hau"): 1.0}) is None


def test_chrf_matches_hand_computation_on_a_tiny_case():
    # order 1: {a, b} vs {a, c}: P = R = 1/2; order 2: ab vs ac: P = R = 0; orders 3..6 have no n-grams.
    assert chrf(["ab"], ["ac"]) == pytest.approx(25.0)
    assert chrf(["a b c"], ["abc"]) == pytest.approx(100.0)  # whitespace is ignored
    assert chrf([""], ["abc"]) == 0.0


def test_chrf_and_bleu_agree_with_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    for n in (1, 2, len(HYPOTHESES)):
        hyps, refs = HYPOTHESES[:n], REFERENCES[:n]
        assert chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)
        assert bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
    for hyp, ref in zip(HYPOTHESES, REFERENCES):
        assert chrf([hyp], [ref]) == pytest.approx(sacrebleu.sentence_chrf(hyp, [ref]).score, abs=1e-9)


def test_13a_tokenization_splits_punctuation_but_not_numbers():
    assert tokenize_13a("Hello, world! 12,000 people; 3.5-4") == \
        ["Hello", ",", "world", "!", "12,000", "people", ";", "3.5", "-", "4"]


def test_match_option_accepts_exact_or_leading_answers_only():
    options = ["Chanya", "Wastani", "Hasi"]
    assert match_option(" chanya. ", options) == "Chanya"
    assert match_option("Hasi kabisa", options) == "Hasi"
    assert match_option("sijui", options) is None


# ---- likelihood scoring ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    texts = ["Habari za asubuhi Chanya Wastani Hasi.", "Watoto wanacheza mpira uwanjani jioni 0 1 2."] * 30
    return train_bpe(texts, vocab_size=280, min_frequency=1, show_progress=False)


def tiny_model(vocab=280):
    torch.manual_seed(0)
    return Transformer(get_preset("tiny", vocab_size=vocab, max_seq_len=64))


def sentiment_row(text, label):
    return {"messages": [{"role": "user", "content": f"Hisia? {text}"}, {"role": "assistant", "content": label}],
            "task": "sentiment", "lang": "swa", "label": label, "options": ["Chanya", "Wastani", "Hasi"],
            "input": text}


def test_content_free_replaces_the_input_in_the_user_turn_and_keeps_the_instruction():
    row = sentiment_row("Watoto wanacheza", "Hasi")
    free = content_free(row)
    assert free["messages"][0]["content"] == "Hisia? N/A" and free["messages"][-1] == row["messages"][-1]
    nli = {"messages": [{"role": "user", "content": "Jibu 0, 1 au 2.\n\nMsingi: Mvua ilinyesha.\nDhana: Jua kali."},
                        {"role": "assistant", "content": "2"}], "input": "Mvua ilinyesha.\nJua kali.",
           "options": ["0", "1", "2"]}
    assert content_free(nli)["messages"][0]["content"] == "Jibu 0, 1 au 2.\n\nMsingi: N/A\nDhana: N/A"


def test_every_scoring_is_its_formula_on_the_option_log_probabilities(tokenizer):
    model = tiny_model()
    rows = [sentiment_row(text, "Hasi") for text in ("Watoto wanacheza", "Habari za asubuhi", "mpira uwanjani")]
    raw = option_logprobs(model, tokenizer, rows)
    free = option_logprobs(model, tokenizer, [content_free(rows[0])])[0]  # one template for all three rows
    scored = scored_options(model, tokenizer, rows)
    assert set(scored) == set(SCORINGS)
    normalised = torch.log_softmax(torch.tensor([[t for t, _ in r] for r in raw], dtype=torch.float64), dim=1)
    prior = torch.log(normalised.exp().mean(dim=0))
    for index, row in enumerate(raw):
        assert scored["sum"][index] == pytest.approx([t for t, _ in row])
        assert scored["mean"][index] == pytest.approx([t / n for t, n in row])
        assert scored["calibrated"][index] == pytest.approx([t - p for (t, _), (p, _) in zip(row, free)])
        assert scored["calibrated-mean"][index] == pytest.approx([(t - p) / n for (t, n), (p, _) in zip(row, free)])
        assert scored["batch"][index] == pytest.approx((normalised[index] - prior).tolist())
        uniform = math.log(1 / 3)  # no train rows: equal shares, the same choice as batch
        assert scored["batch-prior"][index] == pytest.approx((normalised[index] - prior + uniform).tolist())
    train = [sentiment_row("a", "Wastani")] * 6 + [sentiment_row("b", "Hasi")]  # shares 1/10, 7/10, 2/10
    with_prior = scored_options(model, tokenizer, rows, train_rows=train)["batch-prior"]
    shares = torch.tensor([1 / 10, 7 / 10, 2 / 10], dtype=torch.float64).log()
    assert with_prior[0] == pytest.approx((normalised[0] - prior + shares).tolist())
    assert [n for _, n in raw[0]] == [len(tokenizer.encode(o)) + 1 for o in rows[0]["options"]]


def test_option_scores_are_summed_log_probs_of_option_tokens_and_eos(tokenizer):
    model, row = tiny_model(), sentiment_row("Watoto wanacheza", "Hasi")
    scores = option_scores(model, tokenizer, [row], batch_size=2)[0]  # batch of 2 mixes padded rows
    prompt = prompt_ids(tokenizer, row["messages"][:1], 64)
    assert prompt[-1] == tokenizer.role_id("assistant")
    for option, score in zip(row["options"], scores):
        answer = tokenizer.encode(option) + [tokenizer.eos_id]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logprobs = F.log_softmax(model(ids).float(), -1)[0]
        by_hand = sum(logprobs[len(prompt) - 1 + j, token].item() for j, token in enumerate(answer))
        assert score == pytest.approx(by_hand, abs=1e-4)
    assert classify_by_likelihood(model, tokenizer, [row]) == [row["options"][scores.index(max(scores))]]


def test_long_prompts_are_shortened_to_fit_the_context(tokenizer):
    row = sentiment_row("Watoto wanacheza mpira uwanjani jioni. " * 40, "Chanya")
    ids = prompt_ids(tokenizer, row["messages"][:1], 50)
    assert len(ids) <= 50 and ids[-1] == tokenizer.role_id("assistant") and ids[0] == tokenizer.bos_id


def test_subset_results_carry_model_and_baseline_scores(tokenizer):
    model = tiny_model()
    rows = [sentiment_row("a", "Chanya"), sentiment_row("b", "Hasi"), sentiment_row("c", "Hasi")]
    train = [sentiment_row("d", "Wastani")] * 3
    result = evaluate_subset(model, tokenizer, rows, train, greedy=True, batch_size=4)
    assert result["metric"] == "weighted F1" and result["n"] == 3
    assert result["baseline"] == 0.0 and "Wastani" in result["baseline_name"]  # train majority is never right
    assert 0.0 <= result["likelihood"] <= 1.0 and 0.0 <= result["greedy"] <= 1.0
    translation = [{"messages": [{"role": "user", "content": "Translate: good morning"},
                                 {"role": "assistant", "content": "habari za asubuhi"}],
                    "task": "translation", "lang": "swa", "input": "good morning"}]
    result = evaluate_subset(model, tokenizer, translation, greedy=True, max_new_tokens=4)
    assert result["metric"] == "chrF" and result["baseline"] == pytest.approx(chrf(["good morning"],
                                                                                   ["habari za asubuhi"]))


def test_evaluate_script_writes_table_and_json(tmp_path, tokenizer):
    tokenizer.save(tmp_path / "tokenizer.json")
    ckpt.save_checkpoint(tmp_path / "model", tiny_model(), tmp_path / "tokenizer.json")
    data = tmp_path / "sft"
    data.mkdir()
    rows = [sentiment_row(t, l) for t, l in (("a", "Chanya"), ("b", "Hasi"), ("c", "Wastani"))]
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from scripts import evaluate as script

    results = script.main(["--checkpoint", str(tmp_path / "model"), "--data", str(data), "--limit", "2",
                           "--out", str(tmp_path / "eval")])
    assert results["subsets"]["sentiment/swa"]["n"] == 2
    assert results["summary"]["params"] == tiny_model().num_params()
    table = (tmp_path / "eval" / "eval_test.md").read_text()
    assert "| sentiment | swa | 2 | weighted F1 |" in table and "majority" in table
    assert json.loads((tmp_path / "eval" / "eval_test.json").read_text())["split"] == "test"
    assert not list((tmp_path / "eval").glob("*.tmp"))
    # The headline is the challenge's; the submission file scores back to the same numbers.
    assert "| model, by likelihood |" in table and "zindi" in table
    submission = tmp_path / "eval" / "submission_test.csv"
    assert submission.read_text().splitlines()[0] == "ID,Response,Targets"
    rescored = script.main(["--score-submission", str(submission)])
    assert rescored == pytest.approx(results["challenge"]["model, by likelihood"])
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions_test.jsonl").read_text().splitlines()]
    assert len(predictions) == 2 and {"id", "task", "lang", "input", "target", "likelihood", "greedy",
                                      "chrf"} <= set(predictions[0])
    assert (tmp_path / "eval" / "predictions_test.csv").read_text().startswith("id,task,lang,input,target,")
    # A second run replaces lillm's own files; a user's file of the same name is kept and refused.
    script.main(["--checkpoint", str(tmp_path / "model"), "--data", str(data), "--limit", "2", "--no-greedy",
                 "--out", str(tmp_path / "eval")])
    (tmp_path / "eval" / "predictions_test.csv").write_text("mine\n")
    with pytest.raises(SystemExit) as exit_info:
        script.run_main(script.main, ["--checkpoint", str(tmp_path / "model"), "--data", str(data), "--limit", "2",
                    "--out", str(tmp_path / "eval")])
    assert exit_info.value.code == 2 and (tmp_path / "eval" / "predictions_test.csv").read_text() == "mine\n"


def test_copy_bias_makes_a_translation_carry_the_sources_names_and_numbers(tokenizer):
    model = tiny_model()
    row = {"messages": [{"role": "user", "content": "Translate: watoto Chanya 2"},
                        {"role": "assistant", "content": "x"}], "task": "translation", "lang": "swa",
           "input": "watoto Chanya 2"}
    favoured = names_and_numbers(tokenizer, "watoto Chanya 2")
    words = (" Chanya", "Chanya", " 2", "2")   # "watoto" is neither a name nor a number
    assert favoured == {token for word in words for token in tokenizer.encode(word)}
    biased = generate(model, [tokenizer.encode("watoto Chanya 2")], 6, temperature=0.0,
                      logit_bias=[dict.fromkeys(favoured, 1e4)])[0]
    assert set(biased) <= favoured
    plain = generate_answers(model, tokenizer, [row], max_new_tokens=6)[0]
    assert plain == generate_answers(model, tokenizer, [row], max_new_tokens=6, copy_bias=0.0)[0]
