"""Generic scores of predictions against references: weighted and macro F1, chrF, BLEU.

Written here and tested against hand computation and sacrebleu (tests/test_evaluate.py,
tests/test_challenge_metric.py); they take labels and strings, never a model:
- weighted F1: the F1 of each class weighted by its number of true examples (scikit-learn's
  average="weighted"; a class never predicted has F1 0).
- macro F1: the plain mean of the F1 of classes 0..n-1 (scikit-learn's average="macro" over a
  fixed set of classes); a prediction outside them, such as an answer off the list, is a miss.
- chrF (Popovic, 2015): character n-grams of orders 1..6 with whitespace removed, matches counted
  over the whole corpus, precision and recall averaged over the orders, then F-beta with beta 2
  (recall weighs more). sacrebleu's defaults, on a 0..100 scale.
- BLEU (Papineni et al., 2002): corpus BLEU over 13a-tokenized words, n-grams 1..4, brevity
  penalty, and sacrebleu's default 'exp' smoothing of orders with no match.
The Buzuzu-Mavi challenge scores translations with its own per-sentence chrF on 0..1; that one is
the challenge's, in lillm/challenge.py.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence


def weighted_f1(y_true: Sequence, y_pred: Sequence) -> float:
    """F1 per class, averaged with weights = support (true count); 0..1."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    if not y_true:
        return 0.0
    support = Counter(y_true)
    score = 0.0
    for label, count in support.items():
        true_pos = sum(1 for t, p in zip(y_true, y_pred) if t == label and p == label)
        predicted = sum(1 for p in y_pred if p == label)
        precision = true_pos / predicted if predicted else 0.0
        recall = true_pos / count
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        score += f1 * count
    return score / len(y_true)


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int = 3) -> float:
    """Mean over classes 0..n_classes-1 of each class's F1 (0 for a class never predicted or never
    true); a prediction outside the classes (an off-list answer) is a miss for its true class only."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    scores = []
    for label in range(n_classes):
        true_pos = sum(1 for t, p in zip(y_true, y_pred) if t == label and p == label)
        false_pos = sum(1 for t, p in zip(y_true, y_pred) if t != label and p == label)
        false_neg = sum(1 for t, p in zip(y_true, y_pred) if t == label and p != label)
        precision = true_pos / (true_pos + false_pos) if true_pos + false_pos else 0.0
        recall = true_pos / (true_pos + false_neg) if true_pos + false_neg else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(scores) / n_classes


def _char_ngrams(text: str, n: int) -> Counter:
    text = "".join(text.split())
    return Counter(text[i:i + n] for i in range(len(text) - n + 1))


def chrf(hypotheses: Sequence[str], references: Sequence[str], char_order: int = 6, beta: float = 2.0) -> float:
    """Corpus chrF on 0..100 (sacrebleu's CHRF() defaults: one reference per hypothesis)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    hyp_total, ref_total, matched = [0] * char_order, [0] * char_order, [0] * char_order
    for hypothesis, reference in zip(hypotheses, references):
        for n in range(1, char_order + 1):
            hyp, ref = _char_ngrams(hypothesis, n), _char_ngrams(reference, n)
            hyp_total[n - 1] += sum(hyp.values())
            ref_total[n - 1] += sum(ref.values())
            matched[n - 1] += sum((hyp & ref).values())
    orders = [n for n in range(char_order) if hyp_total[n] and ref_total[n]]
    if not orders:
        return 0.0
    precision = sum(matched[n] / hyp_total[n] for n in orders) / len(orders)
    recall = sum(matched[n] / ref_total[n] for n in orders) / len(orders)
    if precision + recall == 0:
        return 0.0
    return 100 * (1 + beta**2) * precision * recall / (beta**2 * precision + recall)


_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation and symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),              # . and , unless after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),              # . and , unless before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),                   # - after a digit
]


def tokenize_13a(line: str) -> list[str]:
    """The mteval-v13a word split that WMT and sacrebleu use for BLEU."""
    line = line.rstrip().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        line = line.replace(entity, char)
    line = f" {line} "
    for pattern, replacement in _13A_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def bleu(hypotheses: Sequence[str], references: Sequence[str], max_order: int = 4) -> float:
    """Corpus BLEU on 0..100 (sacrebleu's BLEU() defaults: 13a, exp smoothing, one reference)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    correct, total, hyp_len, ref_len = [0] * max_order, [0] * max_order, 0, 0
    for hypothesis, reference in zip(hypotheses, references):
        hyp, ref = tokenize_13a(hypothesis), tokenize_13a(reference)
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, max_order + 1):
            hyp_grams = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
            ref_grams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
            total[n - 1] += sum(hyp_grams.values())
            correct[n - 1] += sum((hyp_grams & ref_grams).values())
    if not any(correct):
        return 0.0
    log_precisions, smooth = [], 1.0
    for n in range(max_order):
        if total[n] == 0:
            return 0.0  # no n-gram of this order at all: BLEU is 0 (sacrebleu's log of 0)
        if correct[n] == 0:  # NIST 'exp' smoothing: 1 / (2^k * total) for the k-th order without a match
            smooth *= 2
            log_precisions.append(math.log(1 / (smooth * total[n])))
        else:
            log_precisions.append(math.log(correct[n] / total[n]))
    brevity = 1.0 if hyp_len >= ref_len else (math.exp(1 - ref_len / hyp_len) if hyp_len else 0.0)
    return 100 * brevity * math.exp(sum(log_precisions) / max_order)
