"""The Buzuzu-Mavi challenge's metric, computed by hand; the submission file; safe output writing."""
import pytest

from lillm.challenge import (
    SIZE_ID,
    challenge_from_records,
    challenge_scores,
    class_index,
    parse_loglikelihoods,
    score_submission,
    sentence_chrf,
    submission_csv,
    submission_id,
    submission_rows,
    task_options,
    zindi_score,
)
from lillm.errors import OutputConflict, SubmissionError
from lillm.metrics import macro_f1
from lillm.folders import write_reports


# ---- F1 ----------------------------------------------------------------------------------------------
def test_pooled_macro_f1_with_a_class_never_predicted():
    # Swahili Chanya, Wastani, Hasi and Hausa Kyakkyawa, Korau pool into classes 0, 1, 2, 0, 2.
    truth = [class_index("sentiment", "swa", w) for w in ("Chanya", "Wastani", "Hasi")] + \
            [class_index("sentiment", "hau", w) for w in ("Kyakkyawa", "Korau")]
    assert truth == [0, 1, 2, 0, 2]
    predicted = [0, 0, 2, 0, 0]  # class 1 is never predicted
    # class 0: TP 2, FP 2, FN 0 -> P 1/2, R 1, F1 2/3; class 1: F1 0; class 2: TP 1, FN 1 -> P 1, R 1/2, F1 2/3.
    assert macro_f1(truth, predicted) == pytest.approx((2 / 3 + 0 + 2 / 3) / 3)
    # Pooling is not the mean of the languages' macro F1s: Swahili alone 5/9, Hausa alone 2/9.
    assert macro_f1(truth[:3], predicted[:3]) == pytest.approx(5 / 9)
    assert macro_f1(truth[3:], predicted[3:]) == pytest.approx(2 / 9)
    assert macro_f1(truth, predicted) != pytest.approx((5 / 9 + 2 / 9) / 2)
    # An off-list answer (-1) only costs its true class's recall.
    assert macro_f1([0, 1, 2], [0, 1, -1]) == pytest.approx((1 + 1 + 0) / 3)
    with pytest.raises(ValueError, match="y_pred has 1"):
        macro_f1([0, 1], [0])


def test_nli_labels_are_the_digits_and_sentiment_words_follow_the_data():
    assert [class_index("nli", lang, d) for lang in ("swa", "hau") for d in "012"] == [0, 1, 2] * 2
    assert class_index("sentiment", "hau", "Tsaka-tsaki") == 1 and class_index("sentiment", "swa", None) == -1


def test_sentiment_words_match_the_sft_data_options():
    for lang in ("swa", "hau"):  # options are written positive, neutral, negative: the challenge's order
        assert [class_index("sentiment", lang, w) for w in task_options("sentiment", lang)] == [0, 1, 2]


# ---- chrF --------------------------------------------------------------------------------------------
def test_challenge_chrf_by_hand():
    assert sentence_chrf("ab cdef", "abcdef") == pytest.approx(1.0)  # spaces removed: 6 orders all match
    assert sentence_chrf("", "abc") == 0.0 and sentence_chrf("", "") == 0.0  # empty side counts 1; 0/1 = 0
    # "abc" vs "abcd": orders 1-3 have P 1 and R 3/4, 2/3, 1/2; orders 4-6 count 0 but stay in the average.
    precision, recall = 3 / 6, (3 / 4 + 2 / 3 + 1 / 2) / 6
    assert sentence_chrf("abc", "abcd") == pytest.approx(5 * precision * recall / (4 * precision + recall))
    assert sentence_chrf("abc", "abcd") == pytest.approx(115 / 334)
    assert sentence_chrf("abc", "abc") == pytest.approx(0.5)  # a short exact answer: half the orders are empty
    # Clipping: "aaa" has three 'a' but the reference one, so order 1 has P 1/3, R 1.
    assert sentence_chrf("aaa", "a") == pytest.approx(5 / 42)
    assert sentence_chrf("a\tb", "ab") < 1.0  # only ' ' is removed, as the starter does


def test_mt_score_is_the_mean_of_sentence_scores_not_a_corpus_statistic():
    scores = challenge_scores(None, None, (["abc", "ab cdef"], ["abcd", "abcdef"]), 10)
    assert scores["mt_chrf"] == pytest.approx((115 / 334 + 1.0) / 2)
    assert scores["score"] is None and scores["zindi"] is None  # sentiment and XNLI missing
    assert scores["mean_of_three"] is None


# ---- task score and zindi ----------------------------------------------------------------------------
def test_zindi_reproduces_the_public_anchors():
    assert zindi_score(0.4965, 50_480_128) == pytest.approx(0.4668, abs=5e-5)
    assert zindi_score(0.496534562, 50_480_128) == pytest.approx(0.4668, abs=1e-4)
    # (0.5326 + (1 - 42,087,424 / 421,939,200) * 0.5326) / 2, by hand
    assert zindi_score(0.5326, 42_087_424) == pytest.approx((0.5326 + (1 - 0.099748) * 0.5326) / 2, abs=1e-6)


def test_the_score_is_the_organisers_one_list_and_the_mean_of_three_is_beside_it():
    scores = challenge_scores(([0, 1, 2], [0, 1, 2]), ([0, 1], [1, 0]), (["abc", "abcdef"], ["abc", "abcdef"]), 0)
    assert scores["sentiment_f1"] == 1.0 and scores["nli_f1"] == 0.0 and scores["mt_chrf"] == pytest.approx(0.75)
    assert scores["score"] == pytest.approx((0.5 + 1.0 + 1.0 + 0.0) / 4)  # chrFs and F1s in one list
    assert scores["zindi"] == scores["score"]  # 0 parameters: the size factor is 1
    assert scores["mean_of_three"] == pytest.approx((1 + 0 + 0.75) / 3) and scores["mt_rows"] == 2


ORGANISERS_FILE = """,ID,Response,targets
0,Model size,42087424,
1,1_sentiment_test_private_hausa,"tensor([[-15.1172,  -8.3047, -15.1172]], device='cuda:0', dtype=torch.float16)",Tsaka-tsaki
2,2_sentiment_test_private_hausa,"tensor([[-1.0,  -8.3594, -14.8750]], device='cuda:0', dtype=torch.float16)",Korau
3,1_sentiment_test_private_swahili,"tensor([[-12.9844,  -7.7344, -12.9766]], device='cuda:0', dtype=torch.float16)",Wastani
4,2_sentiment_test_private_swahili,"tensor([[-2.0,  -7.7578, -1.5]], device='cuda:0', dtype=torch.float16)",Hasi
5,1_test_private_afrixnli_hau,"tensor([[-3.0,  -8.3281, -13.7891]], device='cuda:0', dtype=torch.float16)",1
6,1_test_private_afrixnli_swa,"tensor([[-13.2031,  -8.0234, -1.0]], device='cuda:0', dtype=torch.float16)",2
7,1_test_private_mt_eng-hau,abc,abcd
8,2_test_private_mt_eng-hau,abc,abc
9,1_test_private_mt_eng-swa,ab cdef,abcdef
10,2_test_private_mt_eng-swa,,shein leo ikulu.
11,3_test_private_mt_eng-swa,xyz,abcdef
"""


def test_a_file_in_the_organisers_layout_scores_as_their_scorer_by_hand():
    scores = score_submission(ORGANISERS_FILE, "organisers.csv")
    # sentiment, pooled: true [1, 2, 1, 2], predicted (argmax) [1, 0, 1, 2]: class 0 F1 0, class 1 F1 1,
    # class 2 P 1 R 1/2 -> F1 2/3; macro (0 + 1 + 2/3) / 3.
    sentiment = (0 + 1 + 2 / 3) / 3
    # XNLI, pooled: true [1, 2], predicted [0, 2]: class 0 F1 0 (predicted, never true), class 1 F1 0, class 2 F1 1.
    nli = (0 + 0 + 1) / 3
    chrfs = [115 / 334, 0.5, 1.0, 0.0, 0.0]  # by hand above; "xyz" shares nothing with "abcdef"
    assert scores["sentiment_f1"] == pytest.approx(sentiment) and scores["nli_f1"] == pytest.approx(nli)
    assert scores["mt_chrf"] == pytest.approx(sum(chrfs) / 5) and scores["params"] == 42_087_424
    organisers = (sum(chrfs) + sentiment + nli) / (5 + 2)
    assert scores["score"] == pytest.approx(organisers)
    assert scores["zindi"] == pytest.approx((organisers + (1 - 42_087_424 / 421_939_200) * organisers) / 2)
    assert scores["mean_of_three"] == pytest.approx((sentiment + nli + sum(chrfs) / 5) / 3)


def test_the_evaluate_script_prints_both_numbers_for_the_organisers_file(tmp_path, capsys):
    from scripts import evaluate
    (tmp_path / "organisers.csv").write_text(ORGANISERS_FILE, encoding="utf-8")
    evaluate.main(["--score-submission", str(tmp_path / "organisers.csv")])
    printed = capsys.readouterr().out
    assert "**score**" in printed and "mean of three" in printed and "42,087,424" in printed


# ---- the submission file --------------------------------------------------------------------------------
def records():
    return [
        {"id": submission_id("sentiment", "swa", 0), "task": "sentiment", "lang": "swa", "target": "Chanya",
         "likelihood": "Chanya", "loglikelihoods": [-0.1, -2.0, -3.0], "greedy_label": "Chanya"},
        {"id": submission_id("sentiment", "hau", 0), "task": "sentiment", "lang": "hau", "target": "Korau",
         "likelihood": "Kyakkyawa", "loglikelihoods": [-1.0, -1.5, -1.0000000001], "greedy_label": None},
        {"id": submission_id("nli", "swa", 0), "task": "nli", "lang": "swa", "target": "2",
         "likelihood": "2", "loglikelihoods": [-5.0, -4.0, -1 / 3], "greedy_label": "2"},
        {"id": submission_id("nli", "hau", 0), "task": "nli", "lang": "hau", "target": "0",
         "likelihood": "0", "loglikelihoods": [-0.2, -4.0, -1.0], "greedy_label": "1"},
        {"id": submission_id("translation", "swa", 0), "task": "translation", "lang": "swa",
         "target": "Habari za asubuhi, \"rafiki\".", "greedy": "Habari, za\nasubuhi"},
        {"id": submission_id("translation", "hau", 0), "task": "translation", "lang": "hau",
         "target": "Ina kwana", "greedy": ""},
    ]


def test_submission_round_trips_through_the_metric():
    rows = submission_rows(records(), 3_100_000)
    assert [r["ID"] for r in rows][-1] == "model_size" and rows[0]["Response"] == "[[-0.1, -2.0, -3.0]]"
    text = submission_csv(rows)
    assert text.splitlines()[0] == "ID,Response,Targets"
    from_file = score_submission(text)
    direct = challenge_from_records(records(), 3_100_000)
    assert from_file == pytest.approx(direct)
    assert from_file["params"] == 3_100_000 and from_file["score"] is not None


def test_submission_ids_carry_the_words_the_starter_looks_for():
    assert "sent" in submission_id("sentiment", "swa", 3) and "swahili" in submission_id("sentiment", "swa", 3)
    assert "hausa" in submission_id("sentiment", "hau", 3) and "xnli" in submission_id("nli", "hau", 3)
    mt = submission_id("translation", "hau", 3)
    assert "mt" in mt and "sent" not in mt and "xnli" not in mt
    assert not any(word in SIZE_ID for word in ("mt", "sent", "xnli")) and "size" in SIZE_ID


def test_loglikelihoods_parse_in_the_starters_formats():
    assert parse_loglikelihoods("tensor([[-1.5, -2.0, -0.25]], device='cuda:0', dtype=torch.float16)") == \
        [-1.5, -2.0, -0.25]
    assert parse_loglikelihoods("[[-1.0, -2.0, -3.0]]") == [-1.0, -2.0, -3.0]
    assert parse_loglikelihoods("-1, -2, -3") == [-1.0, -2.0, -3.0]


def test_bad_submissions_name_the_row():
    with pytest.raises(SubmissionError, match="header must be ID,Response,Targets"):
        score_submission("id,response\n")
    with pytest.raises(SubmissionError, match="line 2 .*ID_xnli_swa_00000"):
        score_submission('ID,Response,Targets\nID_xnli_swa_00000,"[[-1.0, -2.0]]",0\nmodel_size,5,\n')
    with pytest.raises(SubmissionError, match="model_size"):
        score_submission('ID,Response,Targets\nID_xnli_swa_00000,"[[-1.0, -2.0, -3.0]]",0\n')


# ---- output files --------------------------------------------------------------------------------------
def test_outputs_never_replace_a_users_file_but_replace_their_own(tmp_path):
    mine = tmp_path / "submission_test.csv"
    write_reports({mine: "ID,Response,Targets\n"})
    write_reports({mine: "ID,Response,Targets\nmodel_size,1,\n"})  # lillm's own, unchanged: replaced
    assert mine.read_text().endswith("model_size,1,\n")
    users = tmp_path / "predictions_test.csv"
    users.write_text("the user's own work\n")
    with pytest.raises(OutputConflict, match="predictions_test.csv exists and was not written by lillm"):
        write_reports({tmp_path / "eval_test.md": "table", users: "ours"})
    assert users.read_text() == "the user's own work\n" and not (tmp_path / "eval_test.md").exists()
    mine.write_text("edited by hand\n")
    with pytest.raises(OutputConflict):
        write_reports({mine: "ours again"})
    assert mine.read_text() == "edited by hand\n" and not list(tmp_path.glob("*.tmp"))
