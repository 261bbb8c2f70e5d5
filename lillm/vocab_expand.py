"""Grow a model's vocabulary: new tokens appended to the tokenizer and embedding rows made for them.

A vocabulary is two things that must agree: the tokenizer (which string is which id) and
the model's embedding and output rows (what each id means). This module grows both;
shrinking (keep only the tokens a language uses) is lillm/vocab_shrink.py.

Expansion (the bafoGPT road; Cui et al., 2023, "Efficient and Effective Text Encoding for
Chinese LLaMA"): a model pretrained on Swahili and Hausa splits isiZulu into many short
pieces. We learn the tokens it lacks and append them, without moving any existing id.

1. `learn_new_merges`: train a BPE (the base's own pre-tokenizer, so words split the same
   way) on the new language and walk its merges in order. A merge (a, b) is kept when its
   result is new, a and b already exist (in the base or among kept tokens), and BPE with the
   merges kept so far splits a+b into exactly a, b (otherwise the merge could never fire).
2. `expand_tokenizer`: append the new tokens to the vocab (ids from the old size on) and
   their merges AFTER all existing merges, then pad with unused special tokens
   `<|unused_N|>` to a multiple of 64 (tensor-core friendly shapes).
3. `expand_model_vocab`: grow the embedding and the head (tied or not); a new row is the
   mean of the rows of the base tokens its text splits into (for an untied head, the mean of
   the head rows too), so the model starts by reading "ukuthi" roughly as it read
   "uku"+"thi" (Hewitt, 2021; the global mean is the option `init="mean"`). Filler rows get
   the global mean: never produced as inputs, and as outputs they start as unremarkable logits.

What changes and what does not. BPE applies the lowest-ranked applicable merge first, so
with every new merge ranked after every old one, a word is first split exactly as before,
then new merges may join adjacent pieces: the new tokenization is the old one, coarsened.
- Unchanged: every old id and its string; the tokenization of any word in which no new
  merge applies (so text that encodes to old ids only encodes exactly as before); the
  model's logits for old ids on such text (bitwise: old rows are copied, not recomputed).
- Changed: words containing new tokens get fewer, longer tokens (that is the point); the
  softmax now also spreads mass over new and filler ids, so probabilities (not logits) of
  old ids move until training adapts; decoding is unaffected (new tokens are byte strings).
Supported bases: BPE tokenizer.json files without continuing_subword_prefix /
end_of_word_suffix (lillm's byte-level BPE, Llama-style BPE); ids must be contiguous.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable

import tokenizers
import torch
import torch.nn as nn
from tokenizers import models, pre_tokenizers, trainers

from .errors import VocabExpansionError
from .model import Transformer
from .tokenizer import Tokenizer, bpe_json, fertility_report, merge_parts

FILLER = "<|unused_{}|>"


# ----------------------------------------------------------------------------- expansion: tokenizer

def _bpe_json(tokenizer: Tokenizer) -> dict:
    data, problem = bpe_json(tokenizer.backend)
    if problem is not None:  # new ids follow the old ones, new merges follow the old merges
        raise VocabExpansionError(f"{tokenizer.source}: vocabulary expansion appends BPE merges and ids: {problem}")
    return data


def bpe_split(text: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE on one pre-tokenized word: from characters, repeatedly apply the lowest-ranked merge."""
    pieces = list(text)
    while len(pieces) > 1:
        ranked = [(ranks.get((a, b), -1), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        ranked = [(r, i) for r, i in ranked if r >= 0]
        if not ranked:
            break
        _, i = min(ranked)
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def _train_new_language_bpe(base: Tokenizer, texts: list[str], vocab_size: int, min_frequency: int,
                            show_progress: bool) -> tuple[list[tuple[str, str]], int]:
    """The merges of a BPE trained on `texts`, in the order learned, and its vocabulary size."""
    backend = tokenizers.Tokenizer(models.BPE())
    # The base's normalizer and pre-tokenizer, so the new merges live inside the same words.
    if base.backend.normalizer is not None:
        backend.normalizer = base.backend.normalizer
    backend.pre_tokenizer = base.backend.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    return [merge_parts(m) for m in model["merges"]], len(model["vocab"])


def _select_merges(base_data: dict, candidates: list[tuple[str, str]], n_new: int) -> list[tuple[str, str]]:
    vocab = base_data["model"]["vocab"]
    known = set(vocab) | {t["content"] for t in base_data.get("added_tokens", [])}
    ranks = {merge_parts(m): r for r, m in enumerate(base_data["model"]["merges"])}
    kept = []
    for a, b in candidates:
        if len(kept) == n_new:
            break
        if a + b in known or a not in known or b not in known:
            continue
        if bpe_split(a + b, ranks) != [a, b]:
            continue  # earlier merges split a+b differently: this merge would never fire on it
        ranks[(a, b)] = len(ranks)
        known.add(a + b)
        kept.append((a, b))
    return kept


def learn_new_merges(base: Tokenizer, texts: Iterable[str], n_new: int, min_frequency: int = 2,
                     show_progress: bool = True) -> list[tuple[str, str]]:
    """Up to `n_new` merges (a, b) building tokens the base lacks, in the order BPE learned them."""
    if n_new <= 0:
        raise VocabExpansionError(f"n_new={n_new}: ask for at least one new token")
    base_data, texts = _bpe_json(base), list(texts)
    if not texts:
        raise VocabExpansionError("no text to learn new tokens from; check the languages and the data directory")
    # Most merges of a new-language BPE are already in the base: grow the trained vocabulary until enough are new.
    size = 256 + 4 * n_new
    while True:
        candidates, trained_size = _train_new_language_bpe(base, texts, size, min_frequency, show_progress)
        kept = _select_merges(base_data, candidates, n_new)
        exhausted = trained_size < size  # the corpus ran out of pairs seen min_frequency times
        if len(kept) == n_new or exhausted or size > 64 * (256 + n_new):
            return kept
        size *= 2


@dataclass
class VocabExpansion:
    tokenizer: Tokenizer                 # the expanded tokenizer
    base_vocab_size: int
    new_tokens: list[str]                # at ids base_vocab_size, base_vocab_size + 1, ...
    new_token_pieces: list[list[int]]    # the base ids each new token's text splits into
    filler_tokens: list[str] = field(default_factory=list)

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + len(self.new_tokens) + len(self.filler_tokens)

    def summary(self) -> dict:
        return {"base_vocab_size": self.base_vocab_size, "new_tokens": len(self.new_tokens),
                "filler_tokens": len(self.filler_tokens), "vocab_size": self.vocab_size,
                "examples": [self.tokenizer.decode([self.base_vocab_size + i]) for i in range(min(20, len(self.new_tokens)))]}


def expand_tokenizer(base: Tokenizer, merges: list[tuple[str, str]], pad_to_multiple: int = 64) -> VocabExpansion:
    """The base tokenizer with `merges`' results appended (ids unchanged) and filler tokens up to a multiple."""
    if pad_to_multiple <= 0:
        raise VocabExpansionError(f"pad_to_multiple={pad_to_multiple} must be positive (1 means no padding)")
    data = _bpe_json(base)
    vocab, old_size = data["model"]["vocab"], base.vocab_size
    as_strings = bool(data["model"]["merges"]) and isinstance(data["model"]["merges"][0], str)
    new_tokens = []
    for a, b in merges:
        if a not in vocab or b not in vocab or a + b in vocab:
            raise VocabExpansionError(f"merge ({a!r}, {b!r}) does not build a new token from existing ones; "
                                      "take merges from learn_new_merges")
        vocab[a + b] = old_size + len(new_tokens)
        new_tokens.append(a + b)
        data["model"]["merges"].append(f"{a} {b}" if as_strings else [a, b])
    n_fill = -(old_size + len(new_tokens)) % pad_to_multiple
    fillers, taken, k = [], set(vocab) | {t["content"] for t in data.get("added_tokens", [])}, 0
    while len(fillers) < n_fill:
        if FILLER.format(k) not in taken:
            fillers.append(FILLER.format(k))
        k += 1
    for i, content in enumerate(fillers):
        data.setdefault("added_tokens", []).append(
            {"id": old_size + len(new_tokens) + i, "content": content, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True})
    expanded = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(data)), source=f"{base.source} (expanded)")
    pieces = [[t.id for t in base.backend.model.tokenize(token)] for token in new_tokens]
    expansion = VocabExpansion(expanded, old_size, new_tokens, pieces, fillers)
    if expanded.vocab_size != expansion.vocab_size:
        raise VocabExpansionError(f"the expanded tokenizer has {expanded.vocab_size} ids, expected "
                                  f"{expansion.vocab_size}; the base tokenizer.json has inconsistent ids")
    return expansion


# ----------------------------------------------------------------------------- expansion: model

def _grown_rows(old: torch.Tensor, expansion: VocabExpansion, init: str) -> torch.Tensor:
    work = old.detach().float()
    global_mean = work.mean(dim=0)
    rows = global_mean.expand(expansion.vocab_size - old.shape[0], -1).clone()
    if init == "pieces":
        for i, pieces in enumerate(expansion.new_token_pieces):
            rows[i] = work[pieces].mean(dim=0)
    return torch.cat([old.detach(), rows.to(old.dtype)])


@torch.no_grad()
def expand_model_vocab(model: nn.Module, expansion: VocabExpansion, init: str = "pieces") -> nn.Module:
    """Grow embed_tokens and lm_head (in place) to the expanded vocabulary; old rows are copied exactly."""
    if init not in ("pieces", "mean"):
        raise VocabExpansionError(f"init={init!r}: choose 'pieces' (mean of the base pieces' rows) or 'mean' "
                                  "(mean of all base rows)")
    cfg = model.config
    if cfg.vocab_size != expansion.base_vocab_size:
        raise VocabExpansionError(f"the model has vocab_size {cfg.vocab_size} but the base tokenizer has "
                                  f"{expansion.base_vocab_size} ids; expand the tokenizer the model was trained with")
    old_embed, old_head = model.model.embed_tokens.weight, model.lm_head.weight
    embed = nn.Embedding(expansion.vocab_size, cfg.d_model, device=old_embed.device, dtype=old_embed.dtype)
    embed.weight.copy_(_grown_rows(old_embed, expansion, init))
    head = nn.Linear(cfg.d_model, expansion.vocab_size, bias=False, device=old_head.device, dtype=old_head.dtype)
    if cfg.tie_embeddings:
        head.weight = embed.weight
    else:
        head.weight.copy_(_grown_rows(old_head, expansion, init))
    model.model.embed_tokens, model.lm_head = embed, head
    model.config = cfg.replace(vocab_size=expansion.vocab_size)
    return model


def expand_vocabulary(model: nn.Module, base: Tokenizer, texts: Iterable[str], n_new: int,
                      pad_to_multiple: int = 64, init: str = "pieces", min_frequency: int = 2,
                      show_progress: bool = True) -> tuple[nn.Module, VocabExpansion]:
    """learn_new_merges + expand_tokenizer + expand_model_vocab."""
    merges = learn_new_merges(base, texts, n_new, min_frequency, show_progress)
    expansion = expand_tokenizer(base, merges, pad_to_multiple)
    return expand_model_vocab(model, expansion, init), expansion


def fertility_change(base: Tokenizer, expanded: Tokenizer, texts: Iterable[str]) -> dict:
    """fertility_report (tokens per word, bytes per token) of both tokenizers on the same texts."""
    texts = list(texts)
    before, after = fertility_report(base, texts), fertility_report(expanded, texts)
    return {"before": before, "after": after,
            "tokens_per_word_change": after["tokens_per_word"] / before["tokens_per_word"] - 1}


def train_only_new_rows(model: Transformer, first_new_id: int) -> Transformer:
    """Freeze everything but the embedding rows (and untied head rows) from `first_new_id` on.

    The bafoGPT warm-up: new tokens start as averages of their pieces, and a few hundred steps
    that move only them let the rest of the model stay as it was while they find their place.
    Old rows get a zero gradient through a hook; train with weight_decay=0, because AdamW's
    decoupled decay would still shrink rows whose gradient is zero.
    """
    if not 0 < first_new_id < model.config.vocab_size:
        raise VocabExpansionError(f"first_new_id={first_new_id} must lie inside the vocabulary "
                                  f"(1..{model.config.vocab_size - 1}); use the base vocab size of the expansion")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    tables = {id(t): t for t in (model.model.embed_tokens.weight, model.lm_head.weight)}.values()
    for table in tables:
        table.requires_grad_(True)
        table.register_hook(lambda grad: torch.cat([torch.zeros_like(grad[:first_new_id]), grad[first_new_id:]]))
    return model
