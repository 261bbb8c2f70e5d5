"""Shrink a vocabulary to the tokens a target language uses, keeping every kept token producible.

InkubaLM-0.4B has 61,788 tokens; Swahili and Hausa text uses a fraction of them, and with a
2,048-wide model each unused row costs 4,096 parameters (input and output). Shrinking the
vocabulary is the cheapest cut of the Buzuzu-Mavi road: it changes no computation on the
tokens that remain. It has three parts, done here in order:

1. Count (`token_counts`): tokenize the user's corpus with the ORIGINAL tokenizer and count
   how often each id is produced.
2. Select (`select_tokens`): keep the special tokens, the byte tokens (the 256 `<0xXX>`
   byte-fallback pieces of a SentencePiece-style BPE, or the 256-symbol byte alphabet of a
   byte-level BPE, so that ANY text still encodes and decodes exactly) and then the most
   frequent tokens until the target size (or every token seen `min_count` times).
   The catch is that a BPE token is not a free-standing entry: BPE builds it from characters
   by a chain of merges, and every intermediate token on that chain must exist. Keep
   "▁kwamba" without "▁kwa" or "mba" and BPE can never produce it: the row is dead weight,
   and the words that used it fall apart into smaller pieces. The public Buzuzu-Mavi
   tokenizer kept 8,064 frequent InkubaLM pieces without their intermediates and 15% of them
   became unreachable (`sentencepiece_reachability` measures it). So we CLOSE THE SET UNDER
   MERGES: for each candidate, `bpe_derivation` replays BPE on the token's own string (as
   `tokenizers` runs it: lowest-ranked merge first, leftmost on ties) and records every
   token created on the way; the candidate is kept together with the missing ones (which
   spend budget) or, when they do not fit, dropped. A subset of merges that still contains a
   token's whole derivation derives it the same way (each merge it used is still the best
   applicable one), so every kept token stays producible: `reachability` checks it.
3. Rebuild (`shrink_tokenizer`): the same tokenizer.json with the kept tokens renumbered
   0..n-1 in their old order (specials and bytes keep their relative places), the merges
   among kept tokens in their original relative order, and special-token ids updated in
   the post-processor. `shrink_model_vocab` gathers the matching rows of the input
   embedding and the output head (one gather when tied), so on text that uses only kept
   tokens the model computes exactly what it did, with logits at the kept ids.

Healing after a shrink can distil from the unshrunk model: `OldIdTeacher` lets it read the
student's (new) ids, and lillm.distill's teacher_token_ids gathers its logits at the kept ids.
Supports BPE tokenizer.json files without continuing_subword_prefix / end_of_word_suffix:
lillm's byte-level BPE and SentencePiece-style BPE with byte fallback (lillm.spm rebuilds
InkubaLM's and repairs the Buzuzu-Mavi one). Expansion (new tokens) is lillm/vocab_expand.py.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import tokenizers
import torch
import torch.nn as nn
from tokenizers import pre_tokenizers

from .errors import VocabShrinkError
from .model import Transformer
from .prune import assemble, map_parameters
from .tokenizer import bpe_json

BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def _backend(tokenizer) -> tokenizers.Tokenizer:
    return getattr(tokenizer, "backend", tokenizer)  # a lillm Tokenizer or a tokenizers.Tokenizer


# ----------------------------------------------------------------------------- the BPE tables

@dataclass
class BPETables:
    """What selection needs from a BPE tokenizer.json: its JSON, vocab, merges and protected tokens."""
    data: dict
    vocab: dict[str, int]     # the BPE model's vocabulary
    added: dict[str, int]     # added (special) tokens, inside the model's vocabulary or beyond it
    merges: list[tuple[str, str]]
    protected: set[str]       # always kept: added/special tokens and the 256 byte tokens
    byte_kind: str            # "byte_fallback" (<0xXX> pieces) or "byte_level" (byte alphabet)
    ranks: dict[tuple[str, str], int] = field(default_factory=dict)

    @classmethod
    def of(cls, tokenizer) -> "BPETables":
        data, problem = bpe_json(_backend(tokenizer))
        if problem is not None:
            raise VocabShrinkError(f"vocabulary shrinking closes a BPE vocabulary under its merges: {problem}")
        model = data["model"]
        vocab = model["vocab"]
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
        if model.get("byte_fallback"):
            kind, byte_tokens = "byte_fallback", {f"<0x{b:02X}>" for b in range(256)}
        elif "ByteLevel" in json.dumps(data.get("pre_tokenizer")):
            kind, byte_tokens = "byte_level", set(pre_tokenizers.ByteLevel.alphabet())
        else:
            raise VocabShrinkError("the tokenizer has neither byte_fallback nor a ByteLevel pre-tokenizer, so text "
                                   "using a dropped character would become <unk>; shrink byte-level BPE or "
                                   "SentencePiece-style BPE with byte fallback")
        missing = sorted(byte_tokens - set(vocab))
        if missing:
            raise VocabShrinkError(f"the {kind} tokenizer lacks {len(missing)} of its 256 byte tokens "
                                   f"(e.g. {missing[:3]}), so not every text can be encoded; use a complete tokenizer")
        ranks = {pair: rank for rank, pair in enumerate(merges)}  # a repeated pair keeps its last rank, as in tokenizers
        return cls(data, vocab, added, merges, set(added) | byte_tokens, kind, ranks)

    @property
    def size(self) -> int:
        return len(set(self.vocab.values()) | set(self.added.values()))

    def token_of(self) -> dict[int, str]:
        return {i: t for t, i in {**self.vocab, **self.added}.items()}


def bpe_derivation(word: str, ranks: dict[tuple[str, str], int]) -> tuple[list[str], set[str]]:
    """BPE on one pre-tokenized word as `tokenizers` runs it (the lowest-ranked adjacent merge
    first, the leftmost on ties): the final pieces, and every symbol that existed on the way
    (the initial characters and each merge's result)."""
    pieces = list(word)
    made = set(pieces)
    while len(pieces) > 1:
        best_rank, best_at = None, -1
        for i in range(len(pieces) - 1):
            rank = ranks.get((pieces[i], pieces[i + 1]))
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_at = rank, i
        if best_rank is None:
            break
        pieces[best_at:best_at + 2] = [pieces[best_at] + pieces[best_at + 1]]
        made.add(pieces[best_at])
    return pieces, made


# ----------------------------------------------------------------------------- counting and selection

def token_counts(tokenizer, texts: Iterable[str], batch_size: int = 1024) -> np.ndarray:
    """How often each id is produced when `texts` are encoded (no special tokens added)."""
    backend = _backend(tokenizer)
    counts = np.zeros(backend.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    batch: list[str] = []

    def flush() -> None:
        ids = [np.asarray(e.ids, dtype=np.int64) for e in backend.encode_batch(batch, add_special_tokens=False)]
        counts[:] += np.bincount(np.concatenate(ids + [np.zeros(0, np.int64)]), minlength=len(counts))
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return counts


@dataclass
class Selection:
    kept: set[str]
    stats: dict


def select_tokens(tables: BPETables, counts: np.ndarray, vocab_size: int | None = None,
                  min_count: int = 1) -> Selection:
    """The protected tokens, then candidates by count (ties: lower old id first), each with the
    intermediate tokens its derivation needs, until `vocab_size` (None: no limit). Candidates
    seen fewer than `min_count` times are not considered."""
    if min_count < 1:
        raise VocabShrinkError(f"min_count={min_count}: a token must be seen at least once to be worth keeping")
    if vocab_size is not None and vocab_size <= len(tables.protected):
        raise VocabShrinkError(f"vocab_size={vocab_size} leaves no room: the special and byte tokens alone take "
                               f"{len(tables.protected)} ids; ask for more")
    if len(counts) != tables.size:
        raise VocabShrinkError(f"counts has {len(counts)} entries but the tokenizer {tables.size} ids; "
                               "count with the same tokenizer (token_counts)")
    token_of = tables.token_of()
    kept = set(tables.protected)
    limit = vocab_size or tables.size
    candidates = sorted((i for i in np.flatnonzero(counts >= min_count).tolist() if token_of[i] not in kept),
                        key=lambda i: (-counts[i], i))
    in_vocab = set(tables.vocab)
    stats = {"frequent": 0, "intermediates": 0, "dropped_over_budget": 0, "dropped_unreachable_in_source": 0}
    for i in candidates:
        if len(kept) >= limit:
            break
        token = token_of[i]
        if token in kept:
            continue  # already kept as another token's intermediate
        pieces, made = bpe_derivation(token, tables.ranks)
        if pieces != [token] or not made <= in_vocab:
            stats["dropped_unreachable_in_source"] += 1  # the source cannot produce it either
            continue
        need = made - kept
        if len(kept) + len(need) > limit:
            stats["dropped_over_budget"] += 1
            continue
        kept |= need
        stats["frequent"] += 1
        stats["intermediates"] += len(need) - 1
    used = int((counts > 0).sum())
    kept_ids = [i for i, t in token_of.items() if t in kept]
    stats.update(source_vocab=tables.size, vocab_size=len(kept), protected=len(tables.protected),
                 used_in_corpus=used, candidates=len(candidates),
                 corpus_tokens=int(counts.sum()), corpus_tokens_kept=int(counts[kept_ids].sum()))
    return Selection(kept, stats)


# ----------------------------------------------------------------------------- rebuilding the tokenizer

@dataclass
class VocabShrink:
    tokenizer: tokenizers.Tokenizer   # the shrunk tokenizer, ids 0..n-1
    kept_old_ids: list[int]           # the old id of new id 0, 1, ...: gather embedding rows with it
    stats: dict

    @property
    def vocab_size(self) -> int:
        return len(self.kept_old_ids)


def _remap_post_processor(node, new_id: dict[int, int]):
    """Special-token ids inside a post-processor (TemplateProcessing, Bert/Roberta, Sequence)."""
    if isinstance(node, list):
        return [_remap_post_processor(n, new_id) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "special_tokens" and isinstance(value, dict):
            value = {name: {**spec, "ids": [new_id[i] for i in spec["ids"]]} for name, spec in value.items()}
        elif key in ("sep", "cls") and isinstance(value, list) and len(value) == 2:
            value = [value[0], new_id[value[1]]]
        else:
            value = _remap_post_processor(value, new_id)
        out[key] = value
    return out


def build_tokenizer(tables: BPETables, kept: set[str]) -> tuple[tokenizers.Tokenizer, list[int]]:
    """The tokenizer.json restricted to `kept` (new ids in old-id order) and the kept old ids."""
    kept_old_ids = sorted(i for i, t in tables.token_of().items() if t in kept)
    new_id = {old: new for new, old in enumerate(kept_old_ids)}
    data = json.loads(json.dumps(tables.data))  # a deep copy
    model = data["model"]
    as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
    model["vocab"] = {t: new_id[old] for t, old in tables.vocab.items() if t in kept}
    model["merges"] = [f"{a} {b}" if as_strings else [a, b] for a, b in tables.merges
                       if a in kept and b in kept and a + b in kept]
    data["added_tokens"] = [{**t, "id": new_id[t["id"]]} for t in data.get("added_tokens", [])]
    data["post_processor"] = _remap_post_processor(data.get("post_processor"), new_id)
    if data.get("padding") and data["padding"].get("pad_id") is not None:
        data["padding"]["pad_id"] = new_id.get(data["padding"]["pad_id"], 0)
    try:
        tok = tokenizers.Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    except Exception as e:  # tokenizers raises a bare Exception
        raise VocabShrinkError(f"the shrunk tokenizer.json does not load ({e}); please report this") from None
    return tok, kept_old_ids


def reachability(tokenizer, skip: set[str] | None = None) -> dict:
    """Which vocabulary tokens BPE produces when their own string is tokenized (the model step,
    after normalization and pre-tokenization: a piece "kwa" is tested as the word "kwa"). Added
    tokens, byte tokens and single characters are produced by construction and not counted."""
    backend = _backend(tokenizer)
    vocab = backend.get_vocab(with_added_tokens=False)
    added = {a.content for a in backend.get_added_tokens_decoder().values()} | (skip or set())
    tested = [(t, i) for t, i in sorted(vocab.items(), key=lambda ti: ti[1])
              if len(t) > 1 and t not in added and not BYTE_PIECE.fullmatch(t)]
    unreachable = [t for t, i in tested if [piece.id for piece in backend.model.tokenize(t)] != [i]]
    n = len(tested)
    return {"tested": n, "unreachable": len(unreachable),
            "reachable_fraction": (n - len(unreachable)) / n if n else 1.0, "examples": unreachable[:20]}


def shrink_tokenizer(tokenizer, counts: np.ndarray, vocab_size: int | None = None,
                     min_count: int = 1) -> VocabShrink:
    """select_tokens + build_tokenizer, with the selection and reachability statistics."""
    tables = BPETables.of(tokenizer)
    selection = select_tokens(tables, counts, vocab_size, min_count)
    new, kept_old_ids = build_tokenizer(tables, selection.kept)
    stats = dict(selection.stats, byte_kind=tables.byte_kind, merges_before=len(tables.merges),
                 merges_after=len(json.loads(new.to_str())["model"]["merges"]),
                 reachability_before=reachability(tokenizer), reachability_after=reachability(new))
    return VocabShrink(new, kept_old_ids, stats)


def shrink_vocabulary(tokenizer, texts: Iterable[str], vocab_size: int | None = None,
                      min_count: int = 1) -> VocabShrink:
    """token_counts over `texts`, then shrink_tokenizer."""
    return shrink_tokenizer(tokenizer, token_counts(tokenizer, texts), vocab_size, min_count)


def sentencepiece_reachability(model_path: str | Path) -> dict:
    """Reachability of a SentencePiece BPE model's pieces under SentencePiece's own algorithm
    (lillm.spm.SentencePieceBPE): a piece is reachable when its string segments to itself."""
    from .spm import SentencePieceBPE, SentencePieceModel
    sp = SentencePieceModel.read(model_path)
    segmenter = SentencePieceBPE(sp)
    tested = [p for p in sp.mergeable() if len(p) > 1]
    unreachable = [p for p in tested if segmenter.segment(p) != [p]]
    return {"tested": len(tested), "unreachable": len(unreachable),
            "reachable_fraction": 1 - len(unreachable) / len(tested) if tested else 1.0, "examples": unreachable[:20]}


# ----------------------------------------------------------------------------- the model

@torch.no_grad()
def shrink_model_vocab(model: Transformer, kept_old_ids) -> Transformer:
    """A new model whose embedding and head hold only the rows `kept_old_ids` (in that order);
    a tied head stays tied. bos/eos/pad ids in the config follow their tokens (None if dropped)."""
    cfg = model.config
    ids = torch.as_tensor(list(kept_old_ids), dtype=torch.long)
    if ids.dim() != 1 or not len(ids) or ids.min() < 0 or ids.max() >= cfg.vocab_size or len(ids.unique()) != len(ids):
        raise VocabShrinkError(f"kept_old_ids must be distinct ids in [0, {cfg.vocab_size}) (the model's vocabulary); "
                               "pass VocabShrink.kept_old_ids")
    new_id = {old: new for new, old in enumerate(ids.tolist())}
    tensors = map_parameters(model, lambda name, t: t.index_select(0, ids.to(t.device))
                              if name in ("model.embed_tokens.weight", "lm_head.weight") else t.clone())
    remap = {key: None if old is None else new_id.get(old) for key, old in
             (("bos_id", cfg.bos_id), ("eos_id", cfg.eos_id), ("pad_id", cfg.pad_id))}
    return assemble(cfg.replace(vocab_size=len(ids), **remap), tensors, model)


class OldIdTeacher(nn.Module):
    """The unshrunk teacher reading a shrunk student's ids: new id k is fed as kept_old_ids[k].
    Use with lillm.distill.distillation_loss(OldIdTeacher(t, ids), teacher_token_ids=ids)."""

    def __init__(self, teacher: nn.Module, kept_old_ids):
        super().__init__()
        self.teacher = teacher
        self.config = teacher.config
        self.register_buffer("old_ids", torch.as_tensor(list(kept_old_ids), dtype=torch.long), persistent=False)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.teacher(self.old_ids[input_ids], **kwargs)
