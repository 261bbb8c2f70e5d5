"""SentencePiece models in Hugging Face tokenizers: read tokenizer.model, rebuild tokenizer.json.

Tokenizers: InkubaLM ships a SentencePiece BPE model (tokenizer.model) and its Hugging
Face conversion (tokenizer.json). SentencePiece BPE (Kudo & Richardson, 2018) encodes
by repeatedly merging the adjacent pair of symbols whose concatenation is a piece with
the highest score; ties go to the LEFTMOST pair. A Hugging Face BPE has a fixed rank per
merge instead, so the equivalent merge list is every pair (a, b) with a+b a piece,
ranked by the score of a+b (transformers' SentencePieceExtractor idea). That is exact
when scores are distinct (as in a freshly trained model). InkubaLM extended Llama-2's
vocabulary with 3,886 pieces that all have score 0, and characters that are not pieces
themselves (Hausa "ƴ") occur inside pieces; no fixed merge list can reproduce the
leftmost-tie rule or merge a character that is not in the vocabulary. So we offer both:
a portable tokenizer.json (ranks approximate ties; measured agreement in tests) and an
`exact=True` tokenizer that runs SentencePiece's own algorithm (`SentencePieceBPE`) in
a custom pre-tokenizer (identical ids, not serialisable). The protobuf of
tokenizer.model is read by a 30-line wire-format parser, so lillm needs no
`sentencepiece` or `protobuf` package (tests use sentencepiece as the reference).
"""
from __future__ import annotations

import functools
import heapq
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import tokenizers

from .errors import HFError, TokenizerMismatchError
from .folders import write_file_atomic
from .tokenizer import backend_sha256, check_recorded_hash

SPACE = "\u2581"  # "▁", SentencePiece's visible space


# ---- SentencePiece models ------------------------------------------------------------------------
def _proto_fields(buf: bytes):
    """(field number, value) pairs of a protobuf message (protobuf.dev/programming-guides/encoding):
    varints as int, length-delimited as bytes, fixed 32/64-bit as raw bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[i]
        result, shift, i = result | (byte & 0x7F) << shift, shift + 7, i + 1
        if byte < 0x80:
            return result, i


NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece.Type


@dataclass
class SentencePieceModel:
    """The parts of sentencepiece_model.proto that encoding needs (field numbers in comments)."""
    pieces: list[str]            # ModelProto.pieces(1).piece(1)
    scores: list[float]          # .score(2)
    types: list[int]             # .type(3), NORMAL by default
    model_type: int = 1          # TrainerSpec(2).model_type(3): 1 unigram, 2 BPE
    byte_fallback: bool = False  # TrainerSpec.byte_fallback(35)
    normalizer: str = ""         # NormalizerSpec(3).name(1)
    add_dummy_prefix: bool = True          # NormalizerSpec.add_dummy_prefix(3)
    remove_extra_whitespaces: bool = True  # NormalizerSpec.remove_extra_whitespaces(4)
    escape_whitespaces: bool = True        # NormalizerSpec.escape_whitespaces(5)

    @classmethod
    def read(cls, path: str | Path) -> "SentencePieceModel":
        model = cls([], [], [])
        try:
            for field, value in _proto_fields(Path(path).read_bytes()):
                if field == 1:
                    piece = dict(_proto_fields(value))
                    model.pieces.append(piece[1].decode())
                    model.scores.append(struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0)
                    model.types.append(piece.get(3, NORMAL))
                elif field == 2:
                    spec = dict(_proto_fields(value))
                    model.model_type, model.byte_fallback = spec.get(3, 1), bool(spec.get(35, 0))
                elif field == 3:
                    spec = dict(_proto_fields(value))
                    model.normalizer = spec.get(1, b"").decode()
                    model.add_dummy_prefix, model.remove_extra_whitespaces, model.escape_whitespaces = (
                        bool(spec.get(k, 1)) for k in (3, 4, 5))
        except (ValueError, IndexError, KeyError, UnicodeDecodeError, struct.error) as e:
            raise HFError(f"{path} is not a SentencePiece model ({type(e).__name__}: {e})") from None
        if model.model_type != 2:
            raise HFError(f"{path} is a SentencePiece {'unigram' if model.model_type == 1 else 'word/char'} model; "
                          "lillm converts BPE models only")
        if model.remove_extra_whitespaces or model.normalizer not in ("", "identity") or UNUSED in model.types:
            raise HFError(f"{path}: normalizer {model.normalizer!r} (remove_extra_whitespaces="
                          f"{model.remove_extra_whitespaces}) or UNUSED pieces are not supported; lillm converts "
                          "Llama-style models (identity normalizer, whitespace kept)")
        return model

    def mergeable(self) -> dict[str, float]:
        """Pieces BPE can produce by merging, with their scores (SentencePiece's `pieces_`)."""
        return {p: s for p, s, t in zip(self.pieces, self.scores, self.types) if t == NORMAL}


def bpe_merges(sp: SentencePieceModel) -> list[tuple[str, str]]:
    """Every pair (a, b) of pieces whose concatenation is a piece, best score first. Equal scores
    (SentencePiece breaks them by position, leftmost first) are approximated: pairs whose left part
    starts a word come first (they are leftmost in their word), then longer left parts."""
    score, ids = sp.mergeable(), {p: i for i, p in enumerate(sp.pieces)}
    pairs = [(piece[:k], piece[k:]) for piece in score for k in range(1, len(piece))
             if piece[:k] in score and piece[k:] in score]
    return sorted(pairs, key=lambda ab: (-score[ab[0] + ab[1]], not ab[0].startswith(SPACE), -len(ab[0]), ids[ab[0] + ab[1]]))


class SentencePieceBPE:
    """SentencePiece's BPE segmentation, exactly: merge the adjacent pair whose concatenation is
    the best-scoring piece, ties to the leftmost pair; symbols start as characters (even ones that
    are not pieces). Text is cut before every word-initial "▁" (no piece spans such a cut; checked)
    so each chunk's segmentation is computed once and cached."""

    def __init__(self, sp: SentencePieceModel, cache_size: int = 1 << 16):
        self.score = sp.mergeable()
        self.chunked = not any(re.search(f"[^{SPACE}]{SPACE}", p) for p in self.score)
        self.segment_chunk = functools.lru_cache(maxsize=cache_size)(self._segment)

    def segment(self, normalized: str) -> list[str]:
        if not self.chunked:
            return self._segment(normalized)
        chunks = re.split(f"(?<=[^{SPACE}])(?={SPACE})", normalized)
        return [piece for chunk in chunks if chunk for piece in self.segment_chunk(chunk)]

    def _segment(self, text: str) -> list[str]:
        symbols: list[str | None] = list(text)
        right = list(range(1, len(text))) + [-1]
        left = list(range(-1, len(text) - 1))
        agenda: list[tuple[float, int, str]] = []

        def consider(i: int) -> None:
            if i >= 0 and right[i] >= 0 and (merged := symbols[i] + symbols[right[i]]) in self.score:
                heapq.heappush(agenda, (-self.score[merged], i, merged))

        for i in range(len(text) - 1):
            consider(i)
        while agenda:
            _, i, merged = heapq.heappop(agenda)
            j = right[i]
            if symbols[i] is None or j < 0 or symbols[i] + symbols[j] != merged:
                continue  # stale: one side was merged into something else since
            symbols[i], symbols[j] = merged, None
            right[i] = right[j]
            if right[j] >= 0:
                left[right[j]] = i
            consider(left[i])
            consider(i)
        return [s for s in symbols if s is not None]

    def pre_tokenize(self, pretok: tokenizers.PreTokenizedString) -> None:
        """tokenizers custom pre-tokenizer hook: split the normalized text into final pieces."""
        def split(_, normalized):
            out, start = [], 0
            for piece in self.segment(str(normalized)):
                out.append(normalized[start:start + len(piece)])
                start += len(piece)
            return out
        pretok.split(split)


def _tokenizer_json(sp: SentencePieceModel, merges: list[tuple[str, str]], template: dict | None) -> dict:
    unk = next((p for p, t in zip(sp.pieces, sp.types) if t == UNKNOWN), None)
    model = {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": sp.byte_fallback, "ignore_merges": False,
             "vocab": {p: i for i, p in enumerate(sp.pieces)}, "merges": [list(m) for m in merges]}
    if template is not None:  # keep normalizer, decoder, post-processor and special tokens as they were
        return {**template, "model": model}
    bos = next((p for p, t in zip(sp.pieces, sp.types) if p == "<s>" and t == CONTROL), None)
    normalizers = ([{"type": "Prepend", "prepend": SPACE}] if sp.add_dummy_prefix else []) + (
        [{"type": "Replace", "pattern": {"String": " "}, "content": SPACE}] if sp.escape_whitespaces else [])
    decoders = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if sp.add_dummy_prefix else [])
    special = [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                "special": t != USER_DEFINED} for i, (p, t) in enumerate(zip(sp.pieces, sp.types))
               if t in (UNKNOWN, CONTROL, USER_DEFINED)]
    post = None if bos is None else {
        "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [sp.pieces.index(bos)], "tokens": [bos]}}}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
            "normalizer": {"type": "Sequence", "normalizers": normalizers}, "pre_tokenizer": None,
            "post_processor": post, "decoder": {"type": "Sequence", "decoders": decoders}, "model": model}


def tokenizer_from_sentencepiece(model_path: str | Path, template: str | Path | None = None,
                                 exact: bool = False) -> tokenizers.Tokenizer:
    """A Hugging Face tokenizer rebuilt from a SentencePiece BPE model.

    template: a tokenizer.json whose normalizer, decoder, post-processor and special tokens are
    kept (its vocabulary must equal the model's; its merges are replaced). Without one they are
    built from the model's normalizer spec. exact=True segments with `SentencePieceBPE` (ids equal
    SentencePiece's; the tokenizer then cannot be saved, as its pre-tokenizer is Python).
    """
    sp = SentencePieceModel.read(model_path)
    base = None
    if template is not None:
        base = json.loads(Path(template).read_text(encoding="utf-8"))
        vocab = base.get("model", {}).get("vocab", {})
        if vocab != {p: i for i, p in enumerate(sp.pieces)}:
            raise HFError(f"{template} and {model_path} disagree on the vocabulary ({len(vocab)} vs "
                          f"{len(sp.pieces)} tokens); use the tokenizer.model that belongs to this tokenizer.json")
    spec = _tokenizer_json(sp, bpe_merges(sp), base)
    if exact:
        spec["model"]["ignore_merges"] = True  # each pre-token is already a final piece (or one unknown char)
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    if exact:
        tok.pre_tokenizer = tokenizers.pre_tokenizers.PreTokenizer.custom(SentencePieceBPE(sp))
    return tok


def load_tokenizer(folder: str | Path, exact: bool = False) -> tokenizers.Tokenizer | None:
    """The folder's tokenizer: tokenizer.json as it is when it loads, else rebuilt from tokenizer.model
    (keeping tokenizer.json's pipeline when there is one); None when the folder has neither."""
    folder = Path(folder)
    json_path, spm_path = folder / "tokenizer.json", folder / "tokenizer.model"
    if spm_path.exists() and exact:
        return tokenizer_from_sentencepiece(spm_path, json_path if json_path.exists() else None, exact=True)
    if json_path.exists():
        try:
            backend = tokenizers.Tokenizer.from_file(str(json_path))
            check_recorded_hash(json_path, backend_sha256(backend))  # a lillm checkpoint's own, not a swapped one
            return backend
        except TokenizerMismatchError:
            raise
        except Exception as e:  # tokenizers raises a bare Exception, e.g. for merges of pruned tokens
            if not spm_path.exists():
                raise HFError(f"{json_path} cannot be loaded ({e}) and there is no tokenizer.model beside it to "
                              "rebuild it from; lillm.tokenizer.load_lenient drops invalid merges") from None
            return tokenizer_from_sentencepiece(spm_path, json_path)
    return tokenizer_from_sentencepiece(spm_path) if spm_path.exists() else None


def save_tokenizer(tok: tokenizers.Tokenizer, path: str | Path) -> Path:
    return write_file_atomic(path, lambda tmp: tok.save(str(tmp)))
