"""The tokenizer: byte-level BPE with lillm's special tokens, and a token-exact chat template.

Byte-pair encoding (Sennrich et al., 2016, "Neural Machine Translation of Rare Words with
Subword Units") starts from an alphabet and repeatedly merges the most frequent adjacent
pair into a new token until the vocabulary is full. Byte-level BPE (Radford et al., 2019,
GPT-2) makes the alphabet the 256 possible bytes, so every string, whatever its script or
diacritics (Hausa ɓ ɗ ƙ ƴ, isiXhosa clicks written with c q x, emoji), encodes with no
unknown token and decodes back EXACTLY. Text is first split by the GPT-2 regular
expression (words, numbers, punctuation, runs of spaces) so merges never cross words.

The heavy lifting is done by Hugging Face ``tokenizers`` (Rust); this module fixes the
choices (special tokens at ids 0..6, no lossy normalizer, vocabulary size counted with the
specials) and adds what a small-model workflow needs: a content hash (``sha256``) to tie
token files to the tokenizer that made them, a chat template built from token ids rather
than from a string (so the loss mask is exact), fertility statistics, and a lenient loader
for tokenizer.json files whose merges refer to tokens pruned from the vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from .errors import (ChatTemplateError, InputFileError, TokenizerFileError, TokenizerMismatchError,
                     TokenizerTrainingError)
from .folders import write_text_atomic

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
ROLES = ("system", "user", "assistant")
N_BYTES = 256
CHECKPOINT_RECORD = "lillm.json"  # what a lillm checkpoint folder records about itself (lillm.checkpoint)


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with lillm's conventions.

    ``encode`` never adds special tokens by itself and never turns text such as "<s>"
    typed by a user into a special token: specials enter only through ``add_bos``,
    ``add_eos`` and the chat template. Any tokenizer.json can be wrapped (a Llama /
    SentencePiece one too); missing special tokens show up as ``None`` ids.
    """

    def __init__(self, backend: tokenizers.Tokenizer, source: str = "<memory>"):
        self.backend = backend
        self.source = source
        # User text containing "<|assistant|>" must stay text, or a prompt could forge a turn.
        self.backend.encode_special_tokens = True

    # -- files
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            raise InputFileError(f"tokenizer {path} is a folder, not a tokenizer.json file; pass the path of "
                                 f"the file (e.g. {path / 'tokenizer.json'})")
        if not path.is_file():
            raise InputFileError(f"tokenizer file {path} does not exist; train one with train_tokenizer.py "
                                 f"or pass the path of an existing tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust side raises a bare Exception
            raise TokenizerFileError(f"cannot load tokenizer {path}: {error}; if its merges name tokens that are "
                                     f"not in its vocab, lillm.tokenizer.load_lenient(path) can load it") from error
        tokenizer = cls(backend, str(path))
        check_recorded_hash(path, tokenizer.sha256)
        return tokenizer

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically (a hidden temporary file, then a rename: lillm.folders)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, self.backend.to_str(pretty=True))

    @property
    def sha256(self) -> str:
        """Hash of the canonical (compact) tokenizer.json text: same tokenizer, same hash."""
        return backend_sha256(self.backend)

    # -- encoding
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encodings]

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids = [self._require(self.bos_id, "<s>")] + ids
        if add_eos:
            ids = ids + [self._require(self.eos_id, "</s>")]
        return ids

    def _require(self, token_id: int | None, token: str) -> int:
        if token_id is None:
            raise ValueError(f"tokenizer {self.source} has no {token} token")
        return token_id

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    # -- vocabulary
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def unk_id(self) -> int | None:
        return self.token_to_id("<unk>")

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id("<s>")

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id("</s>")

    @property
    def pad_id(self) -> int | None:
        """<pad> if the vocabulary has one, else </s> (Llama-style tokenizers have no pad)."""
        pad = self.token_to_id("<pad>")
        return pad if pad is not None else self.eos_id

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self.source!r})"

    # -- chat
    def role_id(self, role: str) -> int:
        token_id = self.token_to_id(f"<|{role}|>")
        if token_id is None:
            raise ChatTemplateError(f"tokenizer {self.source} has no <|{role}|> token, so it cannot apply the chat "
                                    f"template; use a tokenizer trained by train_tokenizer.py (it has "
                                    f"{', '.join(SPECIAL_TOKENS)})")
        return token_id

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = False
                            ) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and its assistant mask (1 = train on this token).

        Layout: ``<s>`` then, per message, ``<|role|> content </s>``. The mask is 1 on the
        content of assistant turns and on the ``</s>`` closing them (so the model learns to
        stop), 0 everywhere else. With ``add_generation_prompt`` an ``<|assistant|>`` is
        appended for the model to continue from.
        """
        bos = self._require(self.bos_id, "<s>")
        eos = self._require(self.eos_id, "</s>")
        ids, mask = [bos], [0]
        for index, message in enumerate(messages):
            problem = message_problem(index, message)
            if problem is not None:
                raise ChatTemplateError(problem)
            role, content = message["role"], message["content"]
            content_ids = self.encode(content)
            trained = 1 if role == "assistant" else 0
            ids += [self.role_id(role)] + content_ids + [eos]
            mask += [0] + [trained] * (len(content_ids) + 1)
        if add_generation_prompt:
            ids.append(self.role_id("assistant"))
            mask.append(0)
        return ids, mask


def message_problem(index: int, message) -> str | None:
    """What is wrong with one chat message, {"role": one of ROLES, "content": a string}, or None.
    The one check of a message: the chat template, every reader of rows and the server use it."""
    if not isinstance(message, Mapping):
        return f"message {index} is not an object with 'role' and 'content'"
    if "role" not in message:
        return f"message {index} has no 'role' (one of {', '.join(ROLES)})"
    if message["role"] not in ROLES:
        return f"message {index} has unknown role {message['role']!r} (roles: {', '.join(ROLES)})"
    if not isinstance(message.get("content"), str):
        kind = type(message.get("content")).__name__
        return f"message {index} ({message['role']}) has content of type {kind}, not a string"
    return None


def bpe_json(backend: tokenizers.Tokenizer) -> tuple[dict, str | None]:
    """A tokenizer's JSON, and why lillm cannot change its vocabulary (None when it can): growing and
    shrinking work on a plain BPE model (words start from plain characters) with ids 0..n-1."""
    data = json.loads(backend.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        return data, f"this tokenizer's model is {model.get('type')!r}; use a BPE tokenizer.json"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return data, ("BPE with continuing_subword_prefix / end_of_word_suffix is not supported (its words do not "
                      "start from plain characters)")
    ids = sorted(set(model["vocab"].values()) | {t["id"] for t in data.get("added_tokens", [])})
    if ids != list(range(len(ids))):
        return data, f"token ids are not contiguous 0..{len(ids) - 1}; renumber the tokenizer first"
    return data, None


# ----------------------------------------------------------------------------- training

def _empty_byte_level_bpe() -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(models.BPE())
    # No normalizer: any normalization (NFKC, lower-casing) would make decode(encode(x)) != x.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2,
              show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE tokenizer with exactly ``vocab_size`` ids, specials at 0..6."""
    smallest = len(SPECIAL_TOKENS) + N_BYTES + 1
    if vocab_size < smallest:
        raise TokenizerTrainingError(f"vocab_size={vocab_size} is too small: the {len(SPECIAL_TOKENS)} special tokens "
                                     f"and {N_BYTES} bytes alone take {smallest - 1} ids; use at least {smallest}")
    backend = _empty_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,  # counts the special tokens and the byte alphabet
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = Tokenizer(backend)
    if tokenizer.vocab_size != vocab_size:
        raise TokenizerTrainingError(f"training produced {tokenizer.vocab_size} ids, not vocab_size={vocab_size}: "
                                     f"the corpus has too few pairs seen at least min_frequency={min_frequency} "
                                     "times; give more text, a smaller vocab_size or a smaller min_frequency")
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id, f"{token} landed at {tokenizer.token_to_id(token)}"
    return tokenizer


# ----------------------------------------------------------------------------- lenient loading

def merge_parts(merge) -> tuple[str, str]:
    # tokenizer.json stores merges as "a b" (older files) or ["a", "b"] (newer files).
    if isinstance(merge, str):
        left, _, right = merge.partition(" ")
        return left, right
    return merge[0], merge[1]


def _reachable_tokens(vocab: Mapping[str, int], merges: list[tuple[str, str]], added: set[str]) -> set[str]:
    """Tokens BPE can still produce: single characters, byte tokens, added tokens and merge results."""
    reachable = {t for t in vocab if len(t) == 1 or t in added or (t.startswith("<0x") and len(t) == 6)}
    # Fixed point: merges are not guaranteed to be listed after the merges building their parts.
    changed = True
    while changed:
        changed = False
        for left, right in merges:
            result = left + right
            if result not in reachable and left in reachable and right in reachable:
                reachable.add(result)
                changed = True
    return reachable


def backend_sha256(backend: tokenizers.Tokenizer) -> str:
    """Tokenizer.sha256 of a bare `tokenizers` object: the hash checkpoints and token bins record."""
    return hashlib.sha256(backend.to_str(pretty=False).encode("utf-8")).hexdigest()


def recorded_sha256(folder: str | os.PathLike) -> str | None:
    """The tokenizer hash a lillm checkpoint folder records (lillm.json, written by save_checkpoint), or None."""
    try:
        record = json.loads((Path(folder) / CHECKPOINT_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record.get("tokenizer_sha256") if isinstance(record, dict) else None


def check_recorded_hash(path: Path, sha256: str) -> None:
    """A checkpoint's tokenizer.json must be the one it was saved with, on every load: a tokenizer of the
    same size swapped in would decode the model's ids into other text without any other error."""
    recorded = recorded_sha256(path.parent) if path.name == "tokenizer.json" else None
    if recorded and recorded != sha256:
        raise TokenizerMismatchError(
            f"{path} (sha256 {sha256[:16]}...) is not the tokenizer {path.parent} was saved with (sha256 "
            f"{recorded[:16]}..., recorded in its {CHECKPOINT_RECORD}): it was replaced, and the model's ids would "
            "decode into other text; put the checkpoint's own tokenizer.json back")


def load_lenient(path: str | os.PathLike) -> tuple[Tokenizer, str]:
    """Load a tokenizer.json, dropping BPE merges that mention tokens missing from its vocab.

    Pruning a vocabulary without pruning its merges (as the Buzuzu-Mavi InkubaLM tokenizer
    did) leaves a file that ``tokenizers`` refuses. Dropping the broken merges makes it
    load, but a vocab token whose building merges are gone can no longer be produced; the
    returned explanation counts both.
    """
    path = Path(path)
    try:
        return Tokenizer.from_file(path), f"{path}: loaded as is"
    except TokenizerFileError:
        pass
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TokenizerFileError(f"{path} is not valid UTF-8 JSON: {error}") from error
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or "merges" not in model:
        raise TokenizerFileError(f"{path} does not load and is not a BPE tokenizer.json with merges, so dropping "
                                 f"merges cannot repair it")
    vocab = model["vocab"]
    merges = [merge_parts(m) for m in model["merges"]]
    kept = [(a, b) for a, b in merges if a in vocab and b in vocab and a + b in vocab]
    model["merges"] = [[a, b] for a, b in kept]
    try:
        backend = tokenizers.Tokenizer.from_str(json.dumps(data))
    except Exception as error:
        raise TokenizerFileError(f"{path} still does not load after dropping {len(merges) - len(kept)} "
                                 f"merges: {error}") from error
    added = {t["content"] for t in data.get("added_tokens", [])}
    unreachable = len(vocab) - len(_reachable_tokens(vocab, kept, added) & set(vocab))
    explanation = (
        f"{path}: dropped {len(merges) - len(kept):,} of {len(merges):,} merges whose parts or result are not "
        f"in the {len(vocab):,}-token vocab (the vocab was pruned, the merges were not); {len(kept):,} merges "
        f"remain. {unreachable:,} vocab tokens can no longer be produced because merges building them are "
        f"gone, so this tokenizer splits some words into more pieces than the original did.")
    return Tokenizer(backend, str(path)), explanation


# ----------------------------------------------------------------------------- statistics

def fertility_report(tokenizer: Tokenizer, texts: Iterable[str], batch_size: int = 1024) -> dict:
    """Tokens per whitespace-separated word and UTF-8 bytes per token over ``texts``.

    Fewer tokens per word means longer effective context and cheaper training; bytes per
    token is the compression rate (GPT-2 on English reaches about 4).
    """
    documents = words = n_bytes = n_tokens = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_tokens
        n_tokens += sum(len(ids) for ids in tokenizer.encode_batch(batch))
        batch.clear()

    for text in texts:
        documents += 1
        words += len(text.split())
        n_bytes += len(text.encode("utf-8"))
        batch.append(text)
        if len(batch) >= batch_size:
            flush()
    flush()
    return {
        "documents": documents,
        "words": words,
        "bytes": n_bytes,
        "tokens": n_tokens,
        "tokens_per_word": n_tokens / words if words else float("nan"),
        "bytes_per_token": n_bytes / n_tokens if n_tokens else float("nan"),
    }
