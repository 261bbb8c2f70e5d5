"""Scoring a model on conversation tasks: classification by likelihood or by greedy answers, translation.

Classification is scored two ways. By likelihood (the lm-evaluation-harness way, Gao et al., 2021):
each label option is appended to the prompt as an assistant answer, and the option whose tokens
plus the closing `</s>` get the highest summed log-probability wins; the model cannot answer off
the list, so this measures what it knows. By greedy generation: the model writes an answer, which
counts only if it names an option; this is what the challenge ran. Translation is scored by greedy
generation with corpus chrF and BLEU (lillm/metrics.py). Each subset is compared with a baseline
that needs no model: the majority class of the train split, or copying the English source.

A small model's raw option likelihoods are biased: it prefers whichever label word it saw most, or
has the fewest tokens, whatever the input (Zhao et al., 2021, "Calibrate before use"). So the
option scores can be turned into a choice six ways (SCORINGS), all computed from one pass:
- sum: the summed log-probability of the option's tokens and `</s>` (the challenge's starter);
- mean: the same divided by the number of tokens (length-normalised, as lm-evaluation-harness's
  acc_norm does with bytes): a long label word is not punished for its length;
- calibrated: contextual calibration (Zhao et al., 2021): the same prompt with its input replaced
  by the content-free "N/A" gives the model's prior for each label; each option's log-probability
  minus its prior's (the argmax of p(y|x) / p(y|N/A)), one prior per distinct prompt template, so
  per task, language and instruction;
- calibrated-mean: the calibrated score divided by the option's token count;
- batch: batch calibration (Zhou et al., 2024): the prior is instead the mean, over the rows being
  scored, of each label's probability normalised over the options; it uses the inputs of the
  batch but never their labels. It pushes the predictions toward equal shares of the labels;
- batch-prior: batch calibration that pushes toward the train split's label shares instead
  (log p(y|x) - log mean p(y) + log train share of y), for tasks whose labels are not balanced.
The submission file carries the scores its argmax is taken from.

The rows are conversations (lillm/rows.py): the last assistant turn is the reference, the turns
before it the prompt, fitted to the model's context by lillm.sft.prompt_ids. The Buzuzu-Mavi
challenge's own numbers are computed from these results in lillm/challenge.py; bits per byte on
the reference answers come from lillm.sft.assistant_loss.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import torch
import torch.nn.functional as F

from .beam import beam_search
from .generate import generate
from .metrics import bleu, chrf, weighted_f1
from .rows import prompt_and_answer
from .sft import prompt_ids
from .tokenizer import Tokenizer


SCORINGS = ("sum", "mean", "calibrated", "calibrated-mean", "batch", "batch-prior")
CONTENT_FREE = "N/A"


@torch.no_grad()
def option_logprobs(model, tokenizer: Tokenizer, rows: list[dict], batch_size: int = 16) -> list[list[tuple]]:
    """Per row and option, (summed log-probability of the option's tokens and `</s>` after the prompt,
    number of those tokens)."""
    device, max_len = next(model.parameters()).device, model.config.max_seq_len
    pairs = []  # (row index, prompt + answer ids, number of answer tokens)
    for index, row in enumerate(rows):
        answers = [tokenizer.encode(option) + [tokenizer.eos_id] for option in row["options"]]
        prompt = prompt_ids(tokenizer, prompt_and_answer(row)[0], max_len - max(map(len, answers)))
        pairs += [(index, prompt + answer, len(answer)) for answer in answers]
    scores: list[list[tuple]] = [[] for _ in rows]
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
            scores[index].append((logprobs[r, positions, targets].sum().item(), n_answer))
    return scores


def option_scores(model, tokenizer: Tokenizer, rows: list[dict], batch_size: int = 16) -> list[list[float]]:
    """Per row, the summed log-probability of each option's tokens and `</s>` after the prompt."""
    return [[total for total, _ in row] for row in option_logprobs(model, tokenizer, rows, batch_size)]


def content_free(row: dict, placeholder: str = CONTENT_FREE) -> dict:
    """The row with every line of its input replaced by `placeholder` in its user turns: the same
    prompt template with nothing to classify (for NLI, premise and hypothesis both)."""
    prompt, answer = prompt_and_answer(row)
    pieces = sorted({line.strip() for line in str(row.get("input", "")).split("\n") if line.strip()}, key=len,
                    reverse=True)
    messages = []
    for message in prompt:
        content = message["content"]
        if message["role"] == "user":
            for piece in pieces:
                content = content.replace(piece, placeholder)
        messages.append({**message, "content": content})
    return {**row, "messages": messages + [{"role": "assistant", "content": answer}]}


def _log_normalised(scores: list[float]) -> list[float]:
    """Log-probabilities of the options renormalised over the options (log-softmax)."""
    return torch.log_softmax(torch.tensor(scores, dtype=torch.float64), dim=0).tolist()


def label_shares(rows: list[dict], options: list[str]) -> list[float]:
    """Each option's share of the rows' labels, add-one smoothed (never 0)."""
    counts = Counter(row.get("label") for row in rows)
    return [(counts[o] + 1) / (len(rows) + len(options)) for o in options]


def scored_options(model, tokenizer: Tokenizer, rows: list[dict], batch_size: int = 16,
                   train_rows: list[dict] | None = None) -> dict[str, list[list[float]]]:
    """Each scoring method's per-row option scores (higher wins), from one pass over the rows and one
    over their distinct content-free prompts; batch-prior takes the label shares of `train_rows`
    (uniform without them)."""
    raw = option_logprobs(model, tokenizer, rows, batch_size)
    templates: dict[str, int] = {}
    free_rows, template_of = [], []
    for row in rows:
        free = content_free(row)
        key = repr(free["messages"][:-1])
        if key not in templates:
            templates[key] = len(free_rows)
            free_rows.append(free)
        template_of.append(templates[key])
    free = option_logprobs(model, tokenizer, free_rows, batch_size)
    normalised = torch.tensor([_log_normalised([t for t, _ in row]) for row in raw], dtype=torch.float64)
    batch_prior = torch.logsumexp(normalised, dim=0) - math.log(len(rows))  # log of the mean probability
    shares = torch.tensor(label_shares(train_rows, rows[0]["options"]) if train_rows else
                          [1 / len(rows[0]["options"])] * len(rows[0]["options"]), dtype=torch.float64).log()
    result: dict[str, list[list[float]]] = {m: [] for m in SCORINGS}
    for index, row in enumerate(raw):
        prior = free[template_of[index]]
        result["sum"].append([t for t, _ in row])
        result["mean"].append([t / n for t, n in row])
        result["calibrated"].append([t - p for (t, _), (p, _) in zip(row, prior)])
        result["calibrated-mean"].append([(t - p) / n for (t, n), (p, _) in zip(row, prior)])
        result["batch"].append((normalised[index] - batch_prior).tolist())
        result["batch-prior"].append((normalised[index] - batch_prior + shares).tolist())
    return result


def argmax_option(row: dict, scores: list[float]) -> str:
    """The option with the highest score; the first of equals, as numpy's argmax (the starter's)."""
    return row["options"][max(range(len(scores)), key=scores.__getitem__)]


def classify_by_likelihood(model, tokenizer: Tokenizer, rows: list[dict], batch_size: int = 16,
                           scoring: str = "sum") -> list[str]:
    scores = scored_options(model, tokenizer, rows, batch_size)[scoring]
    return [argmax_option(row, s) for row, s in zip(rows, scores)]


def match_option(text: str, options: Sequence[str]) -> str | None:
    """The option a generated answer names: exact (case-insensitive) first, then the first named at the start."""
    cleaned = text.strip().strip(".").strip().lower()
    for option in options:
        if cleaned == option.lower():
            return option
    starts = [o for o in options if cleaned.startswith(o.lower())]
    return max(starts, key=len) if starts else None


# A name or a number: a capitalised word after the first (the first is capitalised anyway), or digits.
NAME_OR_NUMBER = re.compile(r"(?<=\s)[A-Z][\w'-]*|\d[\d.,:%]*")


def names_and_numbers(tokenizer: Tokenizer, source: str) -> set[int]:
    """Token ids of the names and numbers of a source sentence, as they would appear mid-sentence
    (after a space) or glued to punctuation: the tokens a translation should carry over unchanged.
    Biasing every source token instead pulls English function words into the output (docs/QUALITY.md)."""
    ids: set[int] = set()
    for word in NAME_OR_NUMBER.findall(source):
        ids.update(tokenizer.encode(" " + word))
        ids.update(tokenizer.encode(word))
    return ids


@torch.no_grad()
def generate_answers(model, tokenizer: Tokenizer, rows: list[dict], max_new_tokens: int = 128,
                     batch_size: int = 16, no_repeat_ngram: int = 0, length_ratio: float | None = None,
                     beam: int = 1, copy_bias: float = 0.0) -> list[str]:
    """Greedy answers (or beam > 1: lillm.beam.beam_search's best), decoded without special tokens.
    no_repeat_ngram: lillm.generate.NoRepeatNgram; length_ratio: an answer stops after length_ratio x
    its row's input tokens (+ 4), so a loop cannot run on to max_new_tokens (a translation is rarely
    twice its source's length); copy_bias: added to the logits of the tokens of the names and numbers
    in a row's input (its source sentence), so they pass over unchanged (lillm.generate.LogitBias;
    greedy only)."""
    max_len = model.config.max_seq_len
    budget = max(1, min(max_new_tokens, max_len // 2))
    prompts = [prompt_ids(tokenizer, prompt_and_answer(row)[0], max_len - budget) for row in rows]
    caps = [budget if length_ratio is None else min(budget, math.ceil(length_ratio * len(tokenizer.encode(
        str(row.get("input", ""))))) + 4) for row in rows]
    answers = []
    if beam > 1:  # beams multiply the batch: keep the rows per forward pass about the same
        batch_size = max(1, batch_size // beam)
    for start in range(0, len(prompts), batch_size):
        chunk, longest = prompts[start:start + batch_size], max(caps[start:start + batch_size])
        if beam > 1:
            outputs = beam_search(model, chunk, longest, beam, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                  no_repeat_ngram=no_repeat_ngram)
        else:
            bias = [dict.fromkeys(names_and_numbers(tokenizer, str(row.get("input", ""))), copy_bias)
                    for row in rows[start:start + batch_size]] if copy_bias else None
            outputs = generate(model, chunk, longest, temperature=0.0, eos_id=tokenizer.eos_id,
                               pad_id=tokenizer.pad_id, no_repeat_ngram=no_repeat_ngram, logit_bias=bias)
        # Greedy decoding is causal per row: stopping a row at its cap is cutting its output there
        # (for a beam's best output the cut is an approximation: a shorter hypothesis might have won).
        answers += [tokenizer.decode(ids[:cap]).strip() for ids, cap in zip(outputs, caps[start:start + batch_size])]
    return answers


def evaluate_subset(model, tokenizer: Tokenizer, rows: list[dict], train_rows: list[dict] | None = None,
                    greedy: bool = True, batch_size: int = 16, max_new_tokens: int = 128,
                    scoring: str = "sum", translate: bool | None = None, no_repeat_ngram: int = 0,
                    length_ratio: float | None = None, beam: int = 1, copy_bias: float = 0.0) -> dict:
    """Scores of one (task, lang) subset: classification if rows have options, else translation.
    Classification by likelihood uses `scoring` (SCORINGS); every scoring's F1 is reported beside.
    `greedy` adds classification by generated answers; translations are generated when `translate`
    (default: greedy), with `no_repeat_ngram` and `length_ratio` (generate_answers)."""
    references = [prompt_and_answer(row)[1] for row in rows]
    result: dict = {"n": len(rows)}
    per_row: list[dict] = [{} for _ in rows]  # predictions of each row, for the prediction files
    result["rows"] = per_row
    if "options" in rows[0]:
        result["metric"] = "weighted F1"
        gold = [row["label"] for row in rows]
        by_scoring = scored_options(model, tokenizer, rows, batch_size, train_rows)
        labels_by = {m: [argmax_option(row, s) for row, s in zip(rows, by_scoring[m])] for m in SCORINGS}
        result["scoring"] = scoring
        result["likelihood"] = weighted_f1(gold, labels_by[scoring])
        result["likelihood_by_scoring"] = {m: weighted_f1(gold, labels_by[m]) for m in SCORINGS}
        for index, record in enumerate(per_row):
            record.update(likelihood=labels_by[scoring][index], loglikelihoods=by_scoring[scoring][index],
                          labels_by_scoring={m: labels_by[m][index] for m in SCORINGS})
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
        if greedy if translate is None else translate:
            hypotheses = generate_answers(model, tokenizer, rows, max_new_tokens, batch_size, no_repeat_ngram,
                                          length_ratio, beam, copy_bias)
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
