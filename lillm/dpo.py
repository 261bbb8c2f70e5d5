"""Preference tuning: Direct Preference Optimization, from pairs of a better and a worse answer.

RLHF (Ouyang et al., 2022) fits a reward model to human preferences, then maximises that reward with
PPO under a KL penalty that keeps the policy near a reference model (the SFT model). Rafailov et al.
(2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model") showed that
the optimum of that KL-regularised objective has a closed form, pi*(y|x) proportional to
pi_ref(y|x) exp(r(x, y) / beta), so the reward can be written through the policy itself:

    r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))          (+ a term that depends on x only)

Put into the Bradley-Terry preference model, p(chosen > rejected) = sigmoid(r_c - r_r), the x-only
terms cancel and the reward model disappears: the policy is trained directly by

    h    = beta * [(log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))]
    loss = -log sigmoid(h)

where log pi(y|x) is the *sum* of the log-probabilities of the response tokens (the same assistant
mask as SFT: the answer and its closing `</s>`, never the prompt). beta is the strength of the KL
leash (0.1 in the paper): small beta lets the policy move far from the reference. The reference is
frozen, so its log-probabilities are constants: this module computes them once per pair before
training (`add_reference_logps`, under no_grad) and the batches carry them, so no second model is
held in memory. With a PEFT model the reference is the same model with its adapters switched off
(`adapters_disabled`): one copy of the base weights, whatever the method.

Options:
- label smoothing eps (conservative DPO, Mitchell 2023, "A note on DPO with noisy preferences"):
  the labels are assumed flipped with probability eps, loss = -(1-eps) log s(h) - eps log s(-h).
  It stops the loss from driving h to infinity on pairs that are noisy, such as ours: a "wrong"
  label drawn at random, or a sampled translation that may be as good as the reference.
- one reference-free variant, SimPO (Meng et al., 2024, "SimPO: Simple Preference Optimization
  with a Reference-Free Reward"): the reward is the *average* log-probability per response token,
  r = beta * log pi(y|x) / |y|, and a target margin gamma: h = r_c - r_r - gamma. We pick SimPO
  over ORPO (Hong et al., 2024) because SimPO is a drop-in change of the objective on the same
  pairs and the same stage after SFT, while ORPO adds an SFT term and is meant to replace the SFT
  stage; and because the length normalisation matters for our translation pairs, whose chosen and
  rejected answers differ in length (a summed log-probability favours the shorter one). It needs no
  reference pass at all.

What is logged at each evaluation, on held-out pairs (the implicit rewards of the DPO paper):
chosen reward beta (log pi - log pi_ref)(y_c), rejected reward, their margin, and the preference
accuracy: the fraction of pairs whose chosen reward is higher (a tie counts one half, so the
policy at initialisation, equal to the reference, scores exactly 0.5 and the loss is log 2).
The mean log-probability of the chosen answers is logged too: DPO can lower both answers'
likelihood while widening the margin, which a rising accuracy alone would hide.

Batches: the chosen and rejected sequences of n pairs are rows [c_1..c_n, r_1..r_n] of one padded
batch (one forward pass for both), or are packed end to end into rows of seq_len with attention
kept inside each sequence (lillm.sft's packing); `sequence_ids` tells which of the 2n sequences each
token belongs to, so the summed log-probabilities are the same either way. A pair is never split
between micro batches. The loop divides the summed loss by `loss_count`, the number of pairs.

Preference rows are read and checked by lillm/rows.py (`pair_parts`); pairs made from the
challenge's tasks come from lillm/challenge.py.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .rows import pair_parts
from .sft import (
    IGNORE_INDEX,
    SFTBatches,
    SFTExample,
    fit_prompt,
    role_token_ids,
)
from .tokenizer import Tokenizer

LOSS_TYPES = ("dpo", "simpo")
TOO_LONG_CHOICES = ("drop", "truncate")


@dataclass
class DPOConfig:
    loss_type: str = "dpo"
    beta: float = 0.1               # DPO: 0.1 in Rafailov et al.; SimPO: 2.0-2.5 in Meng et al.
    label_smoothing: float = 0.0    # conservative DPO: the probability that a label is flipped
    gamma: float = 0.5              # SimPO's target reward margin

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")

    @property
    def needs_reference(self) -> bool:
        return self.loss_type == "dpo"


# ---- tokenizing --------------------------------------------------------------------------------------
@dataclass
class PreferencePair:
    """A prompt with two answers, tokenized with the same prompt tokens; ref_logps = (chosen, rejected)."""
    chosen: SFTExample
    rejected: SFTExample
    task: str = ""
    ref_logps: tuple[float, float] | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:  # what packing needs: both sequences go into the same row
        return len(self.chosen) + len(self.rejected)


def tokenize_pair(tokenizer: Tokenizer, row: dict, seq_len: int | None = None, too_long: str = "drop",
                  role_ids: set[int] | None = None) -> PreferencePair | None:
    """Both answers after ONE prompt (ids ending in <|assistant|>); labels on the answer and its </s>.

    The prompt is shortened once for the longer answer, so both sequences condition on the same
    tokens. None when the pair does not fit seq_len (drop, or an answer that fills the window).
    """
    if too_long not in TOO_LONG_CHOICES:
        raise ValueError(f"too_long must be one of {TOO_LONG_CHOICES}, got {too_long!r}")
    messages, chosen, rejected = pair_parts(row)
    prompt, prompt_mask = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    answers = [tokenizer.encode(text) + [tokenizer.eos_id] for text in (chosen, rejected)]
    longest = max(map(len, answers))
    if seq_len is not None and len(prompt) + longest - 1 > seq_len:
        room = seq_len + 1 - longest
        if too_long == "drop" or room < 2:
            return None
        prompt = fit_prompt(prompt, prompt_mask, room, role_ids if role_ids is not None else role_token_ids(tokenizer))
    examples = []
    for answer in answers:
        ids = prompt + answer
        labels = [IGNORE_INDEX] * (len(prompt) - 1) + answer  # shifted: position t predicts ids[t + 1]
        examples.append(SFTExample(ids[:-1], labels, task=str(row.get("task", ""))))
    meta = {k: row[k] for k in ("lang", "source") if k in row}
    return PreferencePair(examples[0], examples[1], task=str(row.get("task", "")), meta=meta)


def build_pairs(tokenizer: Tokenizer, rows: list[dict], seq_len: int, too_long: str = "drop",
                verbose: bool = True) -> tuple[list[PreferencePair], dict]:
    role_ids = role_token_ids(tokenizer)
    pairs = [tokenize_pair(tokenizer, row, seq_len, too_long, role_ids) for row in rows]
    kept = [p for p in pairs if p is not None]
    stats = {"rows": len(rows), "kept": len(kept), "dropped": len(rows) - len(kept)}
    if verbose and stats["dropped"]:
        print(f"{stats['dropped']} of {len(rows)} preference pairs do not fit seq_len {seq_len} and were dropped")
    return kept, stats


# ---- batches -------------------------------------------------------------------------------------------
def _sequences(pairs: list[PreferencePair]) -> list[SFTExample]:
    return [p.chosen for p in pairs] + [p.rejected for p in pairs]


def _reference_tensor(pairs: list[PreferencePair]) -> torch.Tensor | None:
    if any(p.ref_logps is None for p in pairs):
        return None
    return torch.tensor([p.ref_logps[0] for p in pairs] + [p.ref_logps[1] for p in pairs], dtype=torch.float32)


def pair_batch(pairs: list[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows [chosen_1..chosen_n, rejected_1..rejected_n], right-padded; sequence i is row i."""
    sequences = _sequences(pairs)
    width = max(len(s) for s in sequences)
    shape = (len(sequences), width)
    batch = {"input_ids": torch.full(shape, pad_id, dtype=torch.long),
             "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
             "attention_mask": torch.zeros(shape, dtype=torch.long),
             "sequence_ids": torch.arange(len(sequences))[:, None].expand(shape).clone(),
             "loss_count": torch.tensor(len(pairs))}
    for row, sequence in enumerate(sequences):
        n = len(sequence)
        batch["input_ids"][row, :n] = torch.tensor(sequence.input_ids)
        batch["labels"][row, :n] = torch.tensor(sequence.labels)
        batch["attention_mask"][row, :n] = 1
    reference = _reference_tensor(pairs)
    if reference is not None:
        batch["ref_logps"] = reference
    return batch


def packed_pair_batch(rows: list[list[PreferencePair]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pairs laid end to end in rows of seq_len, each sequence its own segment (lillm.sft's packing).

    The micro batch's pairs, in row order, are numbered 0..n-1; chosen of pair i is sequence i and
    its rejected answer is sequence n + i, as in pair_batch.
    """
    pairs = [p for row in rows for p in row]
    n, shape = len(pairs), (len(rows), seq_len)
    batch = {"input_ids": torch.full(shape, pad_id, dtype=torch.long),
             "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
             "position_ids": torch.zeros(shape, dtype=torch.long),
             "segment_ids": torch.zeros(shape, dtype=torch.long),
             "sequence_ids": torch.zeros(shape, dtype=torch.long),
             "loss_count": torch.tensor(n)}
    index = 0
    for r, row in enumerate(rows):
        at, segment = 0, 0
        for pair in row:
            for sequence, number in ((pair.chosen, index), (pair.rejected, n + index)):
                length, segment = len(sequence), segment + 1
                batch["input_ids"][r, at:at + length] = torch.tensor(sequence.input_ids)
                batch["labels"][r, at:at + length] = torch.tensor(sequence.labels)
                batch["position_ids"][r, at:at + length] = torch.arange(length)
                batch["segment_ids"][r, at:at + length] = segment
                batch["sequence_ids"][r, at:at + length] = number
                at += length
            index += 1
        batch["position_ids"][r, at:] = torch.arange(seq_len - at)
    reference = _reference_tensor(pairs)
    if reference is not None:
        batch["ref_logps"] = reference
    return batch


class PreferenceBatches(SFTBatches):
    """lillm.sft.SFTBatches over pairs: a unit is a pair (pad) or a packed row of whole pairs (pack).

    Sampling, epochs, ranks and the exact resume state are SFTBatches' own; only the tensors differ.
    """

    def padded(self, pairs: list[PreferencePair]) -> dict[str, torch.Tensor]:
        return pair_batch(pairs, self.pad_id)

    def packed(self, rows: list[list[PreferencePair]]) -> dict[str, torch.Tensor]:
        return packed_pair_batch(rows, self.seq_len, self.pad_id)


# ---- log-probabilities and the loss ------------------------------------------------------------------
def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of the labelled tokens of each sequence, and their number: (2n,), (2n,)."""
    logits = model(batch["input_ids"], position_ids=batch.get("position_ids"),
                   attention_mask=batch.get("attention_mask"), segment_ids=batch.get("segment_ids"))
    labels = batch["labels"]
    token_logps = -F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="none")  # 0 where the label is ignored
    n_sequences = 2 * int(batch["loss_count"])
    sequence = batch["sequence_ids"].flatten()
    logps = torch.zeros(n_sequences, device=logits.device).index_add(0, sequence, token_logps)
    counts = torch.zeros(n_sequences, device=logits.device).index_add(0, sequence, (labels.flatten() != IGNORE_INDEX).float())
    return logps, counts


def preference_loss(logps: torch.Tensor, counts: torch.Tensor, ref_logps: torch.Tensor | None, cfg: DPOConfig
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses, chosen rewards and rejected rewards from the (2n,) sequence log-probabilities."""
    n = logps.shape[0] // 2
    if cfg.loss_type == "dpo":
        if ref_logps is None:
            raise ValueError("DPO needs the reference log-probabilities (batch['ref_logps']); compute them with "
                             "add_reference_logps before training")
        rewards = cfg.beta * (logps - ref_logps.to(logps))
        margin_target = 0.0
    else:  # SimPO: the average log-probability per answer token, no reference
        rewards = cfg.beta * logps / counts.clamp(min=1)
        margin_target = cfg.gamma
    chosen, rejected = rewards[:n], rewards[n:]
    h = chosen - rejected - margin_target
    eps = cfg.label_smoothing
    losses = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
    return losses, chosen, rejected


class DPOLoss:
    """loss_fn for lillm.train.train: (summed pair losses, number of pairs)."""

    def __init__(self, cfg: DPOConfig):
        self.cfg = cfg

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logps, counts = sequence_logps(model, batch)
        losses, _, _ = preference_loss(logps, counts, batch.get("ref_logps"), self.cfg)
        return losses.sum(), batch["loss_count"]


# ---- the reference -------------------------------------------------------------------------------------
@contextmanager
def adapters_disabled(model):
    """Run a lillm.peft model as its base model: LoRA/QLoRA updates scaled by 0, adapters and prefixes
    bypassed. Nothing is copied; a plain model is left as it is."""
    from .peft import AdaptedLinear, LoRAMixin

    restore = []
    for module in model.modules():
        if isinstance(module, LoRAMixin):
            if getattr(module, "merged", False):
                raise ValueError("LoRA weights are merged into the base weights; unmerge them before using the "
                                 "model as its own reference")
            restore.append((module, "scaling", module.scaling))
            module.scaling = 0.0
        elif isinstance(module, AdaptedLinear):  # h + up(...) -> h
            restore.append((module, "forward", None))
            module.forward = lambda x, m=module: F.linear(x, m.weight, m.bias)
        if getattr(module, "kv_prefix", None) is not None:
            restore.append((module, "kv_prefix", module.kv_prefix))
            module.kv_prefix = None
    try:
        yield model
    finally:
        for module, name, value in restore:
            if name == "forward":
                del module.forward
            else:
                setattr(module, name, value)


@torch.no_grad()
def add_reference_logps(model, pairs: list[PreferencePair], batch_size: int = 8, pad_id: int = 0,
                        progress: bool = False) -> list[PreferencePair]:
    """Fill each pair's ref_logps with the model's own (eval mode, PEFT adapters disabled), in place.

    Called before training, when the model still is the reference: the frozen SFT model, or the
    base model under a fresh PEFT method. On --resume it is called on the --init-from model again,
    before the trained weights are loaded, so the reference never moves.
    """
    from tqdm import tqdm

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with adapters_disabled(model):
            starts = range(0, len(pairs), batch_size)
            for start in tqdm(starts, desc="reference log-probs", disable=not progress, dynamic_ncols=True):
                chunk = pairs[start:start + batch_size]
                batch = {k: v.to(device) for k, v in pair_batch(chunk, pad_id).items()}
                logps, _ = sequence_logps(model, batch)
                values = logps.double().tolist()
                for i, pair in enumerate(chunk):
                    pair.ref_logps = (values[i], values[len(chunk) + i])
    finally:
        model.train(was_training)
    return pairs


# ---- evaluation ------------------------------------------------------------------------------------------
@torch.no_grad()
def preference_metrics(model, pairs: list[PreferencePair], cfg: DPOConfig, batch_size: int = 8,
                       pad_id: int = 0) -> dict:
    """Loss, implicit rewards, margin and preference accuracy (a tie counts 1/2), in all and per task."""
    device = next(model.parameters()).device
    totals: dict[str, dict[str, float]] = {}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = {k: v.to(device) for k, v in pair_batch(chunk, pad_id).items()}
        logps, counts = sequence_logps(model, batch)
        losses, chosen, rejected = preference_loss(logps, counts, batch.get("ref_logps"), cfg)
        correct = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
        for i, pair in enumerate(chunk):
            for key in ("", pair.task):
                total = totals.setdefault(key, {"pairs": 0, "loss": 0.0, "accuracy": 0.0, "margin": 0.0,
                                                "chosen_reward": 0.0, "rejected_reward": 0.0, "chosen_logp": 0.0})
                total["pairs"] += 1
                total["loss"] += losses[i].item()
                total["accuracy"] += correct[i].item()
                total["margin"] += (chosen[i] - rejected[i]).item()
                total["chosen_reward"] += chosen[i].item()
                total["rejected_reward"] += rejected[i].item()
                total["chosen_logp"] += (logps[i] / counts[i].clamp(min=1)).item()
    metrics = {}
    for key, total in sorted(totals.items()):
        suffix = f"_{key}" if key else ""
        count = max(1, total.pop("pairs"))
        if key:  # per task: accuracy and margin only, to keep the log readable
            metrics[f"val_reward_accuracy{suffix}"] = round(total["accuracy"] / count, 5)
            metrics[f"val_reward_margin{suffix}"] = round(total["margin"] / count, 5)
            continue
        metrics["val_loss"] = round(total["loss"] / count, 5)
        for name, key_name in (("accuracy", "val_reward_accuracy"), ("margin", "val_reward_margin"),
                               ("chosen_reward", "val_chosen_reward"), ("rejected_reward", "val_rejected_reward")):
            metrics[key_name] = round(total[name] / count, 5)
        metrics["val_chosen_logp_per_token"] = round(total["chosen_logp"] / count, 5)
    return metrics


def dpo_evaluator(pairs: list[PreferencePair], cfg: DPOConfig, batch_size: int = 8, pad_id: int = 0):
    """evaluate(model) for the training loop: preference_metrics on held-out pairs, in eval mode."""

    def evaluate(model) -> dict:
        was_training = model.training
        model.eval()
        try:
            return preference_metrics(model, pairs, cfg, batch_size, pad_id)
        finally:
            model.train(was_training)

    return evaluate
