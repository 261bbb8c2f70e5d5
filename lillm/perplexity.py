"""How well a model predicts held-out text: loss and bits per byte over fixed windows.

The mean next-token loss (nats per token) depends on the tokenizer: a tokenizer with longer
tokens has fewer, harder predictions. Dividing the total information by the bytes of text it
covers gives bits per byte, which compares models with different tokenizers, and compressors
too (Shannon, 1951; used this way by Gao et al., 2020, "The Pile"): bpb = loss / ln 2 / (bytes per
token). A model must beat the unigram baseline, which predicts every token from its train-set
frequency and ignores all context.

One evaluator serves pretraining, shrinking, pruning experiments and the benchmarks: windows are
fixed (the same text every time), each token is predicted at most once, losses are summed and
counted, then divided once.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .data import iter_eval_batches, open_stream
from .loss import causal_lm_loss


def token_windows(tokens: np.ndarray, seq_len: int, batch: int, n_batches: int | None = None) -> list[dict]:
    """Consecutive non-overlapping windows of a token stream (labels one further), batch by batch."""
    n = (len(tokens) - 1) // seq_len
    rows = [tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)]
    out = []
    for start in range(0, n, batch):
        w = torch.from_numpy(np.stack(rows[start:start + batch]))
        out.append({"input_ids": w[:, :-1], "labels": w[:, 1:]})
    return out[:n_batches]


def summed_loss(model, batches: Iterable[dict], device=None) -> tuple[float, int]:
    """(total nats, target tokens) over batches of {input_ids, labels}; the caller divides once."""
    total, count = 0.0, 0
    for batch in batches:
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        loss, n = causal_lm_loss(model, batch)
        total, count = total + loss.item(), count + int(n)
    return total, count


def loss_and_bpb(total_nats: float, count: int, bytes_per_token: float) -> dict:
    loss = total_nats / count
    return {"val_loss": round(loss, 5), "val_bpb": round(loss / math.log(2) / bytes_per_token, 5)}


@torch.no_grad()
def evaluate_windows(model, batches: Iterable[dict], bytes_per_token: float, device=None) -> dict:
    """val_loss (nats per token) and val_bpb of a model over fixed batches, in eval mode."""
    was_training = model.training
    model.eval()
    metrics = loss_and_bpb(*summed_loss(model, batches, device), bytes_per_token)
    model.train(was_training)
    return metrics


def bin_evaluator(val_bin: Path, seq_len: int, batch_size: int, max_batches: int, bytes_per_token: float,
                  device) -> Callable[[torch.nn.Module], dict]:
    """The training loop's `evaluate` callback for token bins: the first max_batches windows of val_bin."""

    def evaluate(model) -> dict:
        batches = ({"input_ids": x, "labels": y}
                   for x, y in iter_eval_batches(val_bin, seq_len, batch_size, max_batches, device=device))
        return loss_and_bpb(*summed_loss(model, batches), bytes_per_token)

    return evaluate


def unigram_bits_per_byte(data: Path, meta: dict, chunk: int = 1 << 24) -> float:
    """The baseline a model must beat: predict every val token from train-set token frequencies
    (add-one smoothed), ignoring all context. Bits per byte, like val_bpb."""
    data = Path(data)
    counts = np.ones(meta["vocab_size"], dtype=np.float64)
    train = open_stream(data / "train.bin", meta["dtype"])  # one file or its shards, as the loaders read it
    for start in range(0, len(train), chunk):
        counts += np.bincount(train.read(start, chunk), minlength=meta["vocab_size"])
    log_probs = np.log(counts / counts.sum())
    val = open_stream(data / "val.bin", meta["dtype"])
    nats = -sum(log_probs[val.read(start, chunk)].sum() for start in range(0, len(val), chunk)) / len(val)
    return float(nats / math.log(2) / meta["splits"]["val"]["bytes_per_token"])
