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

The challenge's own scoring (the Buzuzu-Mavi starter's utils/eval.py, reimplemented and tested by
hand in tests/test_challenge_metric.py), which is what the leaderboard numbers mean:
- sentiment: macro F1 over classes 0, 1, 2 with Swahili and Hausa rows pooled; each language's
  words map to a class by position (Chanya / Kyakkyawa = 0, Wastani / Tsaka-tsaki = 1,
  Hasi / Korau = 2); the prediction is the option with the highest log-likelihood.
- XNLI: macro F1 over labels 0, 1, 2, both languages pooled.
- MT: a chrF per sentence, averaged over sentences, on 0..1: spaces (only ' ') removed, character
  n-grams n = 1..6, clipped matches; precision = matches / hypothesis n-grams and recall =
  matches / reference n-grams, where a side with no n-gram of that order counts as 1 (so an order
  a short string cannot fill scores 0 and still counts in the average over the six orders);
  F-beta with beta 2 on the averaged precision and recall, 0 when both are 0. Unlike sacrebleu's
  corpus chrF, a 3-character exact answer scores 0.5, not 1.
- task score: the mean of those three; zindi = (task + (1 - params / 421,939,200) * task) / 2.
  (The starter code itself appends the two F1s to the list of per-sentence chrFs and averages
  that list, which weighs MT by its number of sentences; that variant is reported beside, as
  `starter_average`, because the issue and the public write-ups describe the mean of three.)
The challenge's submission file (`ID`, `Response`, `Targets`) is written and read back here too:
classification rows carry the three log-likelihoods, MT rows the translation, and one `size` row
the parameter count; `score_submission` scores such a file exactly as the starter does.
"""
from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from typing import Sequence

import torch
import torch.nn.functional as F

from .config import INKUBA_PARAMS
from .errors import SubmissionError
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
    per_row: list[dict] = [{} for _ in rows]  # predictions of each row, for the prediction files
    result["rows"] = per_row
    if "options" in rows[0]:
        result["metric"] = "weighted F1"
        gold = [row["label"] for row in rows]
        scores = option_scores(model, tokenizer, rows, batch_size)
        chosen = [row["options"][max(range(len(s)), key=s.__getitem__)] for row, s in zip(rows, scores)]
        result["likelihood"] = weighted_f1(gold, chosen)
        for record, label, row_scores in zip(per_row, chosen, scores):
            record.update(likelihood=label, loglikelihoods=row_scores)
        if greedy:
            option_budget = max(len(tokenizer.encode(o)) for o in rows[0]["options"]) + 2
            answers = generate_answers(model, tokenizer, rows, option_budget, batch_size)
            predicted = [match_option(a, row["options"]) for a, row in zip(answers, rows)]
            result["greedy"] = weighted_f1(gold, [p if p is not None else "<invalid>" for p in predicted])
            result["greedy_invalid"] = sum(p is None for p in predicted)
            for record, answer, label in zip(per_row, answers, predicted):
                record.update(greedy=answer, greedy_label=label)
        labels = [row["label"] for row in (train_rows or rows)]
        majority = Counter(labels).most_common(1)[0][0]
        result["majority"] = majority
        result["baseline"] = weighted_f1(gold, [majority] * len(gold))
        result["baseline_name"] = f"majority ({majority}, from {'train' if train_rows else 'test'})"
    else:
        result["metric"] = "chrF"
        if greedy:
            hypotheses = generate_answers(model, tokenizer, rows, max_new_tokens, batch_size)
            for record, hypothesis in zip(per_row, hypotheses):
                record["greedy"] = hypothesis
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


# ---- the challenge's own metric -----------------------------------------------------------------------
# Class words by position, per (task, language): position i is class i in the challenge's F1.
CHALLENGE_LABELS = {("sentiment", "swa"): ("Chanya", "Wastani", "Hasi"),
                    ("sentiment", "hau"): ("Kyakkyawa", "Tsaka-tsaki", "Korau"),
                    ("nli", "swa"): ("0", "1", "2"), ("nli", "hau"): ("0", "1", "2")}
# The starter tells tasks and languages apart by words inside the ID; ours follow its names.
_ID_PREFIX = {("sentiment", "swa"): "sent_swahili", ("sentiment", "hau"): "sent_hausa",
              ("nli", "swa"): "xnli_swa", ("nli", "hau"): "xnli_hau",
              ("translation", "swa"): "mt_eng-swa", ("translation", "hau"): "mt_eng-hau"}
SIZE_ID = "model_size"


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


def sentence_chrf(hypothesis: str, reference: str, max_order: int = 6, beta: float = 2.0) -> float:
    """The challenge's chrF of one sentence on 0..1 (see the module docstring for how it differs)."""
    hypothesis, reference = hypothesis.replace(" ", ""), reference.replace(" ", "")
    precision = recall = 0.0
    for n in range(1, max_order + 1):
        hyp = Counter(hypothesis[i:i + n] for i in range(len(hypothesis) - n + 1))
        ref = Counter(reference[i:i + n] for i in range(len(reference) - n + 1))
        matched = sum((hyp & ref).values())
        precision += matched / max(sum(hyp.values()), 1)
        recall += matched / max(sum(ref.values()), 1)
    precision, recall = precision / max_order, recall / max_order
    if precision + recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (beta**2 * precision + recall)


def challenge_scores(sentiment: tuple[Sequence[int], Sequence[int]] | None,
                     nli: tuple[Sequence[int], Sequence[int]] | None,
                     translations: tuple[Sequence[str], Sequence[str]] | None, params: int) -> dict:
    """The challenge's numbers from pooled (true, predicted) class indices and (hypotheses, references).
    A missing task leaves its number, the task score and zindi as None."""
    sentiment_f1 = macro_f1(*sentiment) if sentiment and sentiment[0] else None
    nli_f1 = macro_f1(*nli) if nli and nli[0] else None
    row_chrf = [sentence_chrf(h, r) for h, r in zip(*translations)] if translations else []
    mt_chrf = sum(row_chrf) / len(row_chrf) if row_chrf else None
    parts = (sentiment_f1, nli_f1, mt_chrf)
    task = None if None in parts else sum(parts) / 3
    starter = None if None in parts else (sum(row_chrf) + sentiment_f1 + nli_f1) / (len(row_chrf) + 2)
    return {"sentiment_f1": sentiment_f1, "nli_f1": nli_f1, "mt_chrf": mt_chrf, "task_score": task,
            "params": params, "zindi": None if task is None else zindi_score(task, params),
            "starter_average": starter, "starter_zindi": None if starter is None else zindi_score(starter, params)}


def class_index(task: str, lang: str, label: str | None) -> int:
    """The challenge's class of a label word (-1 for None: an answer off the list)."""
    return -1 if label is None else CHALLENGE_LABELS[(task, lang)].index(label)


# ---- the submission file (ID, Response, Targets) --------------------------------------------------------
def submission_id(task: str, lang: str, index: int) -> str:
    return f"ID_{_ID_PREFIX[(task, lang)]}_{index:05d}"


def format_loglikelihoods(scores: Sequence[float]) -> str:
    """The Response of a classification row: what the starter's parser reads (full float precision)."""
    return "[[" + ", ".join(repr(float(s)) for s in scores) + "]]"


def parse_loglikelihoods(text: str) -> list[float]:
    """Read a classification Response: '[[a, b, c]]', 'tensor([[a, b, c]], ...)' or 'a, b, c'."""
    cleaned = re.sub(r"tensor\(|\)|\[|\]|device='[^']*'|dtype=[\w.]+", "", text)
    return [float(x) for x in cleaned.split(",") if x.strip()]


def submission_rows(predictions: list[dict], params: int) -> list[dict]:
    """Challenge rows from prediction records (see scripts/evaluate.py), then the model-size row."""
    rows = []
    for p in predictions:
        if p["task"] in ("sentiment", "nli"):
            rows.append({"ID": p["id"], "Response": format_loglikelihoods(p["loglikelihoods"]), "Targets": p["target"]})
        elif p["task"] == "translation" and p.get("greedy") is not None:
            rows.append({"ID": p["id"], "Response": p["greedy"], "Targets": p["target"]})
    rows.append({"ID": SIZE_ID, "Response": str(params), "Targets": ""})
    return rows


def submission_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["ID", "Response", "Targets"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def score_submission(text: str, where: str = "submission") -> dict:
    """Score a submission file's text as the starter does: by words in the ID ('sent' + 'swahili' /
    'hausa', 'xnli', 'mt', 'size'), argmax of the log-likelihoods, labels by position."""
    sentiment, nli, translations, params = ([], []), ([], []), ([], []), None
    reader = csv.DictReader(io.StringIO(text))
    missing = {"ID", "Response", "Targets"} - set(reader.fieldnames or [])
    if missing:
        raise SubmissionError(f"{where}: columns {sorted(missing)} are missing; the header must be ID,Response,Targets")
    for number, row in enumerate(reader, start=2):
        row_id = row["ID"]
        try:
            if "sent" in row_id or "xnli" in row_id:
                task = "sentiment" if "sent" in row_id else "nli"
                if task == "sentiment" and "swahili" not in row_id and "hausa" not in row_id:
                    raise SubmissionError("a sentiment ID must name its language ('swahili' or 'hausa')")
                labels = CHALLENGE_LABELS[(task, "hau" if "hausa" in row_id else "swa")]
                scores = parse_loglikelihoods(row["Response"])
                if len(scores) != len(labels):
                    raise SubmissionError(f"{len(scores)} log-likelihoods for {len(labels)} labels")
                pooled = sentiment if task == "sentiment" else nli
                pooled[0].append(labels.index(row["Targets"]))
                pooled[1].append(max(range(len(scores)), key=scores.__getitem__))  # first maximum, as numpy's argmax
            elif "mt" in row_id:
                translations[0].append(row["Response"] or "")
                translations[1].append(row["Targets"] or "")
            elif "size" in row_id:
                params = int(row["Response"])
        except (ValueError, SubmissionError) as error:
            raise SubmissionError(f"{where}, line {number} (ID {row_id}): {error}; fix the row") from None
    if params is None:
        raise SubmissionError(f"{where}: no '{SIZE_ID}' row with the parameter count in Response")
    return challenge_scores(sentiment, nli, translations if translations[0] else None, params)


def prediction_records(task: str, lang: str, rows: list[dict], result: dict) -> list[dict]:
    """One record per row: id, task, language, input, target, predictions and (MT) the row's chrF."""
    records = []
    for index, row in enumerate(rows):
        target = prompt_and_answer(row)[1]
        record = {"id": submission_id(task, lang, index) if (task, lang) in _ID_PREFIX else f"ID_{task}_{lang}_{index:05d}",
                  "task": task, "lang": lang, "input": str(row.get("input", "")), "target": target,
                  "likelihood": None, "greedy": None, "chrf": None, "source": row.get("source")}
        per_row = result.get("rows", [{}] * len(rows))[index]
        record.update({k: v for k, v in per_row.items() if k in ("likelihood", "greedy", "greedy_label", "loglikelihoods")})
        if task == "translation" and record["greedy"] is not None:
            record["chrf"] = sentence_chrf(record["greedy"], target)
        records.append(record)
    return records


def challenge_from_records(records: list[dict], params: int, method: str = "likelihood") -> dict:
    """The challenge's numbers from prediction records, classifying by `method` (likelihood, or
    greedy where an off-list answer is a miss); MT always by its greedy translation."""
    pooled: dict[str, tuple[list[int], list[int]]] = {"sentiment": ([], []), "nli": ([], [])}
    translations: tuple[list[str], list[str]] = ([], [])
    for r in records:
        if r["task"] in pooled and (r["task"], r["lang"]) in CHALLENGE_LABELS:
            label = r.get("likelihood") if method == "likelihood" else r.get("greedy_label")
            if method == "likelihood" and label is None:
                continue  # not scored (no likelihoods for this row)
            pooled[r["task"]][0].append(class_index(r["task"], r["lang"], r["target"]))
            pooled[r["task"]][1].append(class_index(r["task"], r["lang"], label))
        elif r["task"] == "translation" and r.get("greedy") is not None:
            translations[0].append(r["greedy"])
            translations[1].append(r["target"])
    if method == "greedy" and not any(r.get("greedy") is not None for r in records if r["task"] in pooled):
        pooled = {"sentiment": ([], []), "nli": ([], [])}  # no generation was run
    return challenge_scores(pooled["sentiment"], pooled["nli"], translations if translations[0] else None, params)
