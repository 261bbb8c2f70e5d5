"""Supervised fine-tuning data: conversations -> token ids with a loss mask -> padded or packed batches.

The conversations arrive read and checked (lillm/rows.py); this module tokenizes them.

Instruction tuning (Ouyang et al., 2022; Taori et al., 2023, Alpaca) trains a pretrained model on
conversations, with the loss on the assistant's words only: the model should learn to answer, not to
write the user's questions. The chat template (lillm.tokenizer.apply_chat_template) is built from
token ids, so its mask is exact: 1 on assistant content tokens and the `</s>` closing each assistant
turn (so the model learns to stop), 0 elsewhere. Here the mask becomes labels, shifted once:
labels[t] = ids[t + 1] where the mask of token t + 1 is 1, else -100 (ignored by cross-entropy).
Any number of turns works the same way.

Batches come in two shapes:
- pad: the examples of a micro batch are right-padded to the longest one; attention_mask marks the
  real tokens, padding has label -100. Simple, but short examples waste compute on padding.
- pack: examples are laid end to end in rows of exactly seq_len tokens (Krell et al., 2021,
  "Efficient Sequence Packing without Cross-contamination"). segment_ids make attention stay inside
  each example, position_ids restart at 0 for each one, labels never cross a boundary, and the
  filler at the end of a row has label -100 and a segment of its own. The loss of every example is
  then the same as if it ran alone (tests/test_sft.py checks this), with far less padding.

The batch source draws whole "units" (one example for pad, one packed row for pack) in an order
that is a seeded permutation per epoch, identical on every rank; each rank keeps its slice of the
global batch, so the examples of a step do not depend on the number of processes (as lillm.data's
BinLoader does for pretraining). Its state is (epoch, position): tiny, and exact to resume.

NEFTune (Jain et al., 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning") adds
uniform noise in [-1, 1] scaled by alpha / sqrt(L * d) to the input embeddings while training
(L = sequence length of the batch, d = model width); it is a forward hook on the embedding that
`add_neftune` registers and the caller removes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import FlagError, SFTDataError
from .tokenizer import ROLES, Tokenizer

IGNORE_INDEX = -100
LOSS_ON_CHOICES = ("assistant", "all")
TOO_LONG_CHOICES = ("drop", "truncate")
BATCHING_CHOICES = ("pad", "pack")


# ---- tokenizing -----------------------------------------------------------------------------------
@dataclass
class SFTExample:
    """One conversation, shifted: labels[t] is the target of input position t (-100 = no loss)."""
    input_ids: list[int]
    labels: list[int]
    task: str = ""
    target_bytes: int = 0         # UTF-8 bytes of the assistant text, for bits per byte
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)


def shift_to_labels(ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
    """Template ids and mask -> (inputs, labels) for next-token prediction."""
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids[1:], mask[1:])]
    return ids[:-1], labels


def shorten_prompt(ids: list[int], mask: list[int], max_tokens: int, role_ids: set[int]
                   ) -> tuple[list[int], list[int]]:
    """Cut tokens from the middle of the longest non-assistant contents until len(ids) <= max_tokens.

    The middle of a long text is what a short answer needs least: the instruction sits at its
    start, and a question or a template's closing words ("### Response:") at its end. Role
    tokens, `</s>` and assistant tokens are never cut here, so the result may still be too long.
    """
    ids, mask = list(ids), list(mask)
    while len(ids) > max_tokens:
        starts = [i for i, token in enumerate(ids) if token in role_ids] + [len(ids)]
        spans = [(s + 1, e - 1) for s, e in zip(starts, starts[1:]) if not any(mask[s + 1:e])]  # content only
        spans = [(a, b) for a, b in spans if b > a]
        if not spans:
            break
        start, end = max(spans, key=lambda span: span[1] - span[0])
        cut = min(len(ids) - max_tokens, end - start)
        keep_head = (end - start - cut + 1) // 2
        del ids[start + keep_head:start + keep_head + cut]
        del mask[start + keep_head:start + keep_head + cut]
    return ids, mask


def role_token_ids(tokenizer: Tokenizer) -> set[int]:
    return {tokenizer.token_to_id(f"<|{r}|>") for r in ROLES} - {None}


def fit_prompt(ids: list[int], mask: list[int], max_tokens: int, role_ids: set[int]) -> list[int]:
    """A prompt of at most max_tokens: the middle of long contents first (shorten_prompt), then
    tokens from the left after `<s>`, so the end of the prompt, next to the answer, stays."""
    if len(ids) > max_tokens:
        ids, _ = shorten_prompt(ids, mask, max_tokens, role_ids)
    if len(ids) > max_tokens:
        ids = ids[:1] + ids[len(ids) - max_tokens + 1:]
    return ids


def prompt_ids(tokenizer: Tokenizer, messages: list[dict], max_tokens: int) -> list[int]:
    """Template ids ending in `<|assistant|>`, fitted to max_tokens (fit_prompt): what a model answers."""
    ids, mask = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return fit_prompt(ids, mask, max_tokens, role_token_ids(tokenizer))


def fit_example(ids: list[int], mask: list[int], seq_len: int | None, too_long: str, role_ids: set[int]
                ) -> tuple[list[int], list[int]] | None:
    """Template ids and mask -> (input_ids, labels) of at most seq_len tokens; None when dropped.

    too_long="truncate" first shortens user/system contents (shorten_prompt), then cuts the end;
    an example left without any assistant label is dropped either way.
    """
    if too_long not in TOO_LONG_CHOICES:
        raise ValueError(f"too_long must be one of {TOO_LONG_CHOICES}, got {too_long!r}")
    if seq_len is not None and len(ids) - 1 > seq_len:
        if too_long == "drop":
            return None
        ids, mask = shorten_prompt(ids, mask, seq_len + 1, role_ids)
        ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
    inputs, labels = shift_to_labels(ids, mask)
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return inputs, labels


def tokenize_conversation(tokenizer: Tokenizer, messages: list[dict], seq_len: int | None = None,
                          too_long: str = "drop") -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) of one conversation through the chat template; see fit_example."""
    ids, mask = tokenizer.apply_chat_template(messages)
    return fit_example(ids, mask, seq_len, too_long, role_token_ids(tokenizer))


def build_examples(tokenizer: Tokenizer, rows: list[dict], seq_len: int, too_long: str = "drop",
                   verbose: bool = True, loss_on: str = "assistant") -> tuple[list[SFTExample], dict]:
    """Tokenize rows into examples that fit seq_len; the stats count what was dropped or truncated.

    loss_on="all" trains on every token after `<s>` (instructions and sources too: mid-training,
    lillm/mixture.py); the example is fitted to seq_len by the assistant mask all the same."""
    if loss_on not in LOSS_ON_CHOICES:
        raise ValueError(f"loss_on must be one of {LOSS_ON_CHOICES}, got {loss_on!r}")
    role_ids = role_token_ids(tokenizer)
    examples, stats = [], {"rows": len(rows), "kept": 0, "too_long": 0, "dropped": 0, "truncated": 0}
    for row in rows:
        ids, mask = tokenizer.apply_chat_template(row["messages"])
        result = fit_example(ids, mask, seq_len, too_long, role_ids)
        if len(ids) - 1 > seq_len:
            stats["too_long"] += 1
            stats["truncated" if result is not None else "dropped"] += 1
        if result is None:
            continue
        if loss_on == "all":  # the target of position t is simply the next token
            result = (result[0], result[0][1:] + result[1][-1:])
        answer = "".join(m["content"] for m in row["messages"] if m["role"] == "assistant")
        examples.append(SFTExample(*result, task=str(row.get("task", "")),
                                   target_bytes=len(answer.encode("utf-8")),
                                   meta={k: row[k] for k in ("lang", "label") if k in row}))
    stats["kept"] = len(examples)
    if verbose and stats["too_long"]:
        print(f"{stats['too_long']} of {len(rows)} conversations are longer than seq_len {seq_len}: "
              f"{stats['dropped']} dropped, {stats['truncated']} truncated (--too-long {too_long})")
    return examples, stats


# ---- batches ------------------------------------------------------------------------------------------
def pad_batch(examples: list[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; attention_mask 1 on real tokens, labels -100 on padding."""
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pack_rows(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Group example indices, in the given order, into rows of at most seq_len tokens (next fit)."""
    rows, current, used = [], [], 0
    for index, length in enumerate(lengths):
        if length > seq_len:
            raise SFTDataError(f"example {index} has {length} tokens, more than seq_len {seq_len}; "
                               "build examples with the same seq_len")
        if used + length > seq_len and current:
            rows.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        rows.append(current)
    return rows


def packed_batch(rows: list[list[SFTExample]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of examples laid end to end: segment ids 1, 2, ... (0 = filler), positions restart per example."""
    shape = (len(rows), seq_len)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    for r, examples in enumerate(rows):
        at = 0
        for segment, example in enumerate(examples, start=1):
            n = len(example)
            input_ids[r, at:at + n] = torch.tensor(example.input_ids)
            labels[r, at:at + n] = torch.tensor(example.labels)  # each example's last label is its own </s>
            position_ids[r, at:at + n] = torch.arange(n)
            segment_ids[r, at:at + n] = segment
            at += n
        position_ids[r, at:] = torch.arange(seq_len - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "segment_ids": segment_ids}


class SFTBatches:
    """The batch source for lillm.train.train: micro_batch units x accum per rank per step.

    A unit is an example (pad) or a packed row of seq_len tokens (pack). The global batch is
    micro_batch * accum * world units; each epoch is a seeded permutation of the examples (packed
    in that order), the same on every rank, and a step may run across an epoch boundary.
    """

    def __init__(self, examples: list[SFTExample], micro_batch: int, accum: int = 1, batching: str = "pad",
                 seq_len: int | None = None, pad_id: int = 0, seed: int = 0, rank: int = 0, world: int = 1):
        if batching not in BATCHING_CHOICES:
            raise ValueError(f"batching must be one of {BATCHING_CHOICES}, got {batching!r}")
        if not examples:
            raise SFTDataError("no SFT examples to train on: check the data folder, --tasks and --seq-len")
        if batching == "pack" and seq_len is None:
            raise ValueError("batching='pack' needs seq_len (the length of a packed row)")
        self.examples, self.batching, self.seq_len, self.pad_id = examples, batching, seq_len, pad_id
        self.micro_batch, self.accum, self.seed, self.rank, self.world = micro_batch, accum, seed, rank, world
        self.global_batch = micro_batch * accum * world
        self.epoch, self.position = 0, 0
        self._units: tuple[int, list[list[int]]] | None = None

    def units(self, epoch: int) -> list[list[int]]:
        """The epoch's units as lists of example indices (cached for the current epoch)."""
        if self._units is None or self._units[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.examples), generator=generator).tolist()
            if self.batching == "pad":
                units = [[i] for i in order]
            else:
                packed = pack_rows([len(self.examples[i]) for i in order], self.seq_len)
                units = [[order[j] for j in row] for row in packed]
            self._units = (epoch, units)
        return self._units[1]

    def _next_global_units(self) -> list[list[int]]:
        taken = []
        while len(taken) < self.global_batch:
            units = self.units(self.epoch)
            need = self.global_batch - len(taken)
            taken += units[self.position:self.position + need]
            self.position += need
            if self.position >= len(units):
                self.epoch, self.position = self.epoch + 1, 0
        return taken

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        per_rank = self.micro_batch * self.accum
        mine = self._next_global_units()[self.rank * per_rank:(self.rank + 1) * per_rank]
        micro = [mine[i:i + self.micro_batch] for i in range(0, per_rank, self.micro_batch)]
        if self.batching == "pad":
            return [self.padded([self.examples[u[0]] for u in chunk]) for chunk in micro]
        return [self.packed([[self.examples[i] for i in u] for u in chunk]) for chunk in micro]

    def padded(self, examples: list) -> dict[str, torch.Tensor]:
        """The tensors of a micro batch of units (pad); a subclass batching other units changes these two."""
        return pad_batch(examples, self.pad_id)

    def packed(self, rows: list[list]) -> dict[str, torch.Tensor]:
        return packed_batch(rows, self.seq_len, self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "global_batch": self.global_batch,
                "num_examples": len(self.examples), "batching": self.batching, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "global_batch", "num_examples", "batching", "seq_len"):
            if state[key] != mine[key]:
                raise FlagError(f"--resume: the run's data state has {key}={state[key]!r} but this run has "
                                f"{mine[key]!r}: the stream would not continue; resume with the same data, flags and "
                                "global batch (or start a new run)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ---- loss on assistant tokens, NEFTune ------------------------------------------------------------
@torch.no_grad()
def assistant_loss(model, examples: list[SFTExample], batch_size: int = 8, pad_id: int = 0) -> dict:
    """Summed loss, label count and target bytes on assistant tokens, per task and in all ("")."""
    device = next(model.parameters()).device
    totals: dict[str, list[float]] = {}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = {k: v.to(device) for k, v in pad_batch(chunk, pad_id).items()}
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).float()
        losses = F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=IGNORE_INDEX,
                                 reduction="none").sum(1)
        counts = (batch["labels"] != IGNORE_INDEX).sum(1)
        for example, loss, count in zip(chunk, losses.tolist(), counts.tolist()):
            for key in ("", example.task):
                total = totals.setdefault(key, [0.0, 0, 0])
                total[0], total[1], total[2] = total[0] + loss, total[1] + count, total[2] + example.target_bytes
    return {key: {"loss_sum": s, "tokens": n, "bytes": b} for key, (s, n, b) in totals.items()}


def sft_evaluator(examples: list[SFTExample], batch_size: int = 8, pad_id: int = 0):
    """evaluate(model) for the training loop: dev loss per assistant token, in all and per task."""

    def evaluate(model) -> dict:
        was_training = model.training
        model.eval()
        try:
            totals = assistant_loss(model, examples, batch_size, pad_id)
        finally:
            model.train(was_training)
        metrics = {}
        for key, total in sorted(totals.items()):
            name = "val_loss" if key == "" else f"val_loss_{key}"
            metrics[name] = round(total["loss_sum"] / max(1, total["tokens"]), 5)
        return metrics

    return evaluate


def add_neftune(model, alpha: float):
    """Register NEFTune noise on model.model.embed_tokens; returns the handle (call .remove()).

    Noise is added only while the module is in training mode and gradients are on, so
    evaluation inside the loop (under torch.no_grad) and generation stay exact.
    """
    if alpha <= 0:
        raise ValueError(f"NEFTune alpha must be positive, got {alpha}")

    def hook(module, args, output):
        if not (module.training and torch.is_grad_enabled()):
            return output
        length, width = output.shape[-2], output.shape[-1]
        scale = alpha / math.sqrt(length * width)
        return output + torch.empty_like(output).uniform_(-scale, scale)

    return model.model.embed_tokens.register_forward_hook(hook)
