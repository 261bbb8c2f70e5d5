"""Task evaluation: weighted F1, chrF, BLEU, loss and bits per byte, and the Buzuzu-Mavi (zindi) score.

Classification is scored two ways. By likelihood (the lm-evaluation-harness way, Gao et al., 2021):
each label option is appended to the prompt as an assistant answer, and the option whose tokens
plus the closing `</s>` get the highest summed log-probability wins; the model cannot answer off
the list, so this measures what it knows. By greedy generation: the model writes an answer, which
counts only if it names an option; this is what the challenge ran.

Metrics, written here and tested against hand computation and sacrebleu (tests/test_evaluate.py):
- weighted F1: the F1 of each class weighted by its number of true examples (scikit-learn's
  average="weighted"; a class never predicted has F1 0).
- chrF (Popovic, 2015): character n-grams of orders 1..6 with whitespace removed, matches counted
  over the whole corpus, precision and recall averaged over the orders, then F-beta with beta 2
  (recall weighs more). sacrebleu's defaults, on a 0..100 scale.
- BLEU (Papineni et al., 2002): corpus BLEU over 13a-tokenized words, n-grams 1..4, brevity
  penalty, and sacrebleu's default 'exp' smoothing of orders with no match.
- bits per byte: the summed loss in nats on assistant tokens / ln 2 / UTF-8 bytes of the answers,
  comparable across tokenizers (the `</s>` closing each answer is scored but has no bytes).
- zindi score: the challenge averages weighted F1 on sentiment and NLI (hau, swa) and chrF / 100
  on translation (eng->hau, eng->swa), then rewards small models:
  (avg + (1 - params / 421,939,200) * avg) / 2, where 421,939,200 is InkubaLM-0.4B's size.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import torch
import torch.nn.functional as F

from .config import INKUBA_PARAMS
from .generate import generate
from .sft import role_token_ids, shorten_prompt
from .tokenizer import Tokenizer

CHALLENGE_SUBSETS = (("sentiment", "hau"), ("sentiment", "swa"), ("nli", "hau"), ("nli", "swa"),
                     ("translation", "hau"), ("translation", "swa"))


# ---- metrics ------------------------------------------------------------------------------------
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


def zindi_score(mean_score: float, n_params: int, reference_params: int = INKUBA_PARAMS) -> float:
    """(score + (1 - params / InkubaLM's params) * score) / 2: half the score rewards being small."""
    return (mean_score + (1 - n_params / reference_params) * mean_score) / 2


def challenge_average(scores: dict[tuple[str, str], float]) -> float | None:
    """Mean over the challenge's six subsets (F1 on 0..1, chrF / 100); None if one is missing."""
    if not all(subset in scores for subset in CHALLENGE_SUBSETS):
        return None
    return sum(scores[s] for s in CHALLENGE_SUBSETS) / len(CHALLENGE_SUBSETS)


# ---- prompts --------------------------------------------------------------------------------------------
def prompt_and_answer(row: dict) -> tuple[list[dict], str]:
    """The messages before the last assistant turn, and that turn's text (the reference)."""
    messages = row["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def prompt_ids(tokenizer: Tokenizer, messages: list[dict], max_tokens: int) -> list[int]:
    """Template ids ending in `<|assistant|>`, shortened (middle of long contents, then the left) to fit."""
    ids, mask = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if len(ids) > max_tokens:
        ids, _ = shorten_prompt(ids, mask, max_tokens, role_token_ids(tokenizer))
    if len(ids) > max_tokens:
        ids = ids[:1] + ids[len(ids) - max_tokens + 1:]
    return ids


@torch.no_grad()
def option_scores(model, tokenizer: Tokenizer, rows: list[dict], batch_size: int = 16) -> list[list[float]]:
    """Per row, the summed log-probability of each option's tokens and `</s>` after the prompt."""
    device, max_len = next(model.parameters()).device, model.config.max_seq_len
    pairs = []  # (row index, prompt + answer ids, number of answer tokens)
    for index, row in enumerate(rows):
        answers = [tokenizer.encode(option) + [tokenizer.eos_id] for option in row["options"]]
        prompt = prompt_ids(tokenizer, prompt_and_answer(row)[0], max_len - max(map(len, answers)))
        pairs += [(index, prompt + answer, len(answer)) for answer in answers]
    scores: list[list[float]] = [[] for _ in rows]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        width = max(len(ids) for _, ids, _ in chunk)
        # Right padding: a causal model's outputs at real positions never see the padding after them.
        batch = torch.full((len(chunk), width), tokenizer.pad_id, dtype=torch.long)
        for r, (_, ids, _) in enumerate(chunk):
            batch[r, :len(ids)] = torch.tensor(ids)
        logprobs = F.log_softmax(model(batch.to(device)).float(), dim=-1)
        for r, (index, ids, n_answer) in enumerate(chunk):
            positions = torch.arange(len(ids) - n_answer - 1, len(ids) - 1, device=device)
            targets = torch.tensor(ids[len(ids) - n_answer:], device=device)
            scores[index].append(logprobs[r, positions, targets].sum().item())
    return scores


def classify_by_likelihood(model, tokenizer: Tokenizer, rows: list[dict], batch_size: int = 16) -> list[str]:
    return [row["options"][max(range(len(s)), key=s.__getitem__)]
            for row, s in zip(rows, option_scores(model, tokenizer, rows, batch_size))]


def match_option(text: str, options: Sequence[str]) -> str | None:
    """The option a generated answer names: exact (case-insensitive) first, then the first named at the start."""
    cleaned = text.strip().strip(".").strip().lower()
    for option in options:
        if cleaned == option.lower():
            return option
    starts = [o for o in options if cleaned.startswith(o.lower())]
    return max(starts, key=len) if starts else None


@torch.no_grad()
def generate_answers(model, tokenizer: Tokenizer, rows: list[dict], max_new_tokens: int = 128,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers, decoded without special tokens."""
    max_len = model.config.max_seq_len
    budget = max(1, min(max_new_tokens, max_len // 2))
    prompts = [prompt_ids(tokenizer, prompt_and_answer(row)[0], max_len - budget) for row in rows]
    answers = []
    for start in range(0, len(prompts), batch_size):
        outputs = generate(model, prompts[start:start + batch_size], budget, temperature=0.0,
                           eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        answers += [tokenizer.decode(ids).strip() for ids in outputs]
    return answers


# ---- one task subset ------------------------------------------------------------------------------------
def evaluate_subset(model, tokenizer: Tokenizer, rows: list[dict], train_rows: list[dict] | None = None,
                    greedy: bool = True, batch_size: int = 16, max_new_tokens: int = 128) -> dict:
    """Scores of one (task, lang) subset: classification if rows have options, else translation."""
    references = [prompt_and_answer(row)[1] for row in rows]
    result: dict = {"n": len(rows)}
    if "options" in rows[0]:
        result["metric"] = "weighted F1"
        gold = [row["label"] for row in rows]
        result["likelihood"] = weighted_f1(gold, classify_by_likelihood(model, tokenizer, rows, batch_size))
        if greedy:
            option_budget = max(len(tokenizer.encode(o)) for o in rows[0]["options"]) + 2
            answers = generate_answers(model, tokenizer, rows, option_budget, batch_size)
            predicted = [match_option(a, row["options"]) for a, row in zip(answers, rows)]
            result["greedy"] = weighted_f1(gold, [p if p is not None else "<invalid>" for p in predicted])
            result["greedy_invalid"] = sum(p is None for p in predicted)
        labels = [row["label"] for row in (train_rows or rows)]
        majority = Counter(labels).most_common(1)[0][0]
        result["baseline"] = weighted_f1(gold, [majority] * len(gold))
        result["baseline_name"] = f"majority ({majority}, from {'train' if train_rows else 'test'})"
    else:
        result["metric"] = "chrF"
        if greedy:
            hypotheses = generate_answers(model, tokenizer, rows, max_new_tokens, batch_size)
            result["greedy"] = chrf(hypotheses, references)
            result["bleu"] = bleu(hypotheses, references)
            result["examples"] = [{"hypothesis": h, "reference": r} for h, r in zip(hypotheses[:3], references[:3])]
        sources = [str(row.get("input", "")) for row in rows]
        result["baseline"] = chrf(sources, references)
        result["baseline_bleu"] = bleu(sources, references)
        result["baseline_name"] = "copy the source"
    return result


def subset_score(result: dict, method: str = "likelihood") -> float | None:
    """The challenge's number for a subset: F1 by `method` (else the other) on 0..1, or chrF / 100."""
    if result["metric"] == "chrF":
        return result["greedy"] / 100 if "greedy" in result else None
    other = "greedy" if method == "likelihood" else "likelihood"
    return result.get(method, result.get(other))
