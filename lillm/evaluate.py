"""Scoring a model on conversation tasks: classification by likelihood or by greedy answers, translation.

Classification is scored two ways. By likelihood (the lm-evaluation-harness way, Gao et al., 2021):
each label option is appended to the prompt as an assistant answer, and the option whose tokens
plus the closing `</s>` get the highest summed log-probability wins; the model cannot answer off
the list, so this measures what it knows. By greedy generation: the model writes an answer, which
counts only if it names an option; this is what the challenge ran. Translation is scored by greedy
generation with corpus chrF and BLEU (lillm/metrics.py). Each subset is compared with a baseline
that needs no model: the majority class of the train split, or copying the English source.

The rows are conversations (lillm/rows.py): the last assistant turn is the reference, the turns
before it the prompt, fitted to the model's context by lillm.sft.prompt_ids. The Buzuzu-Mavi
challenge's own numbers are computed from these results in lillm/challenge.py; bits per byte on
the reference answers come from lillm.sft.assistant_loss.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
import torch.nn.functional as F

from .generate import generate
from .metrics import bleu, chrf, weighted_f1
from .rows import prompt_and_answer
from .sft import prompt_ids
from .tokenizer import Tokenizer


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
