"""Text generation: a prefill pass, then one token at a time through the KV cache.

Decoding an autoregressive model costs one forward pass per new token. Recomputing
the whole prefix each time is quadratic; caching every layer's keys and values
(Pope et al., 2022, "Efficiently Scaling Transformer Inference") makes each step
process a single token. A batch of prompts of different lengths is left-padded, so
every row's next token sits in the same column of the cache; padding is masked out
and positions are counted per row (cumulative sum of the mask), so a padded prompt
decodes exactly as it would alone.

Fixed shapes and CUDA graphs (`compile=True`, the idea of gpt-fast): a small model's
one-token step is a few hundred tiny kernels, and on a GPU launching them costs more
than running them. `StaticDecoder` writes the cache through a position *tensor* and
attends over the whole (masked) cache, so every step has the same shapes and buffers;
`torch.compile(mode="reduce-overhead")` then records the step once as a CUDA graph
and each new token replays it with one launch.

Sampling: temperature scales the logits; top-k keeps the k most likely tokens;
top-p (Holtzman et al., 2019, "The Curious Case of Neural Text Degeneration") keeps
the smallest set whose probability reaches p. Temperature 0 is greedy. A small model's
greedy output falls into loops ("na pia ni, na pia ni, ..."); `no_repeat_ngram=n` forbids a
row to repeat any n-gram of its own output (Paulus et al., 2018; fairseq's and transformers'
no_repeat_ngram_size), so a loop must move on. The prompt is not counted: a translation may copy
names and numbers from its source as often as it likes. `logit_bias` adds a number to chosen
tokens' logits per row (OpenAI's logit_bias, one dict per row): the evaluation uses it to favour
the tokens of a translation's source (names, numbers and loanwords pass over unchanged).

Streaming: `TextStream` turns the tokens of a row into text as they arrive (inference.py prints
them, lillm/batching.py streams them to the server), never splitting a character.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .model import Transformer


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,)."""
    if temperature <= 0:
        # The first maximum, as argmax gives it; max's CPU kernel is faster over a batch of rows.
        return logits.max(-1).indices
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the first token always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class LogitBias:
    """A sampler wrapper adding biases[row][token] to the logits before each choice."""

    def __init__(self, sample: Callable[[torch.Tensor], torch.Tensor], biases: list[dict[int, float]]):
        self.sample, self.biases = sample, biases
        self.table: torch.Tensor | None = None  # (rows, vocab), built on the first call

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            if len(self.biases) != logits.shape[0]:
                raise ValueError(f"logit_bias has {len(self.biases)} rows for a batch of {logits.shape[0]}")
            self.table = torch.zeros_like(logits)
            for row, bias in enumerate(self.biases):
                if bias:
                    self.table[row, list(bias)] = torch.tensor(list(bias.values()), dtype=logits.dtype,
                                                               device=logits.device)
        return self.sample(logits + self.table)


class NoRepeatNgram:
    """A sampler wrapper: before each choice, the tokens that would complete an n-gram the row has
    already written get -inf; it remembers what it sampled, so it needs no other state."""

    def __init__(self, sample: Callable[[torch.Tensor], torch.Tensor], n: int):
        if n < 1:
            raise ValueError(f"no_repeat_ngram must be at least 1, got {n}")
        self.sample, self.n = sample, n
        self.history: list[list[int]] = []
        self.followers: list[dict[tuple, set[int]]] = []  # per row: (n-1)-gram -> tokens written after it

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.history:
            self.history = [[] for _ in range(logits.shape[0])]
            self.followers = [{} for _ in range(logits.shape[0])]
        logits = logits.clone()
        for row, written in enumerate(self.history):
            if len(written) >= self.n - 1:
                banned = self.followers[row].get(tuple(written[len(written) - self.n + 1:]), ())
                if banned:
                    logits[row, list(banned)] = float("-inf")
        tokens = self.sample(logits)
        for row, token in enumerate(tokens.tolist()):
            written = self.history[row]
            if len(written) >= self.n - 1:
                self.followers[row].setdefault(tuple(written[len(written) - self.n + 1:]), set()).add(token)
            written.append(token)
        return tokens


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (encode with add_bos=True for an empty text)")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


# Inductor on a CPU writes C++ kernels; with cpp_wrapper the code that calls them (and the int8
# operator, lillm/fbgemm_int8.cpp) is C++ too, without its per-call size checks, so a step is one
# call from Python (13% faster than inductor's Python wrapper with lillm-39m: docs/DEPLOY.md).
CPU_INDUCTOR_OPTIONS = {"cpp_wrapper": True, "size_asserts": False, "alignment_asserts": False}


class StaticDecoder:
    """The one-token step with fixed shapes, compiled once per (batch, cache length).

    A step takes each row's token, its rotary position and the cache position, and returns the
    logits, the greedy next token (the first maximum, chosen inside the compiled graph) and the
    next step's positions, so a greedy token costs one call of the compiled step and no other
    tensor operation. Sampled decoding draws from the returned logits outside the step, with the
    caller's generator (a seed gives the tokens eager decoding gives).

    The model's KV cache is allocated once at `max_len` positions and kept between calls (so the
    recorded graphs keep pointing at the same buffers); `model.clear_cache()` frees it.
    backend / mode are torch.compile's; mode=None with backend="eager" traces the step without
    compiling it (tests use that to prove it runs without graph breaks or host reads), and
    compile=False runs the same fixed-shape step eagerly.
    """

    def __init__(self, model: Transformer, compile: bool = True, backend: str = "inductor",
                 mode: str | None = "reduce-overhead"):
        self.model, self.compiled = model, compile
        self.step = self._step
        on_cpu = model.model.embed_tokens.weight.device.type == "cpu"
        self.graphs = compile and not on_cpu and mode == "reduce-overhead"  # no CUDA graphs on a CPU
        if compile:
            for module in model.modules():  # layers that must prepare (lillm.quant.Int8Linear's fbgemm weight)
                if hasattr(module, "before_compile"):
                    module.before_compile(backend)
            if on_cpu and backend == "inductor":
                settings = {"options": CPU_INDUCTOR_OPTIONS}
            else:
                settings = {"mode": mode} if mode is not None and not on_cpu else {}
            self.step = torch.compile(self._step, backend=backend, fullgraph=True, dynamic=False, **settings)
            self.make_room(8)
        self.warm: set[tuple[int, int]] = set()  # (batch, cache length) that have run once since the cache was made

    def make_room(self, shapes: int) -> None:
        """Let this decoder compile `shapes` more fixed shapes. Dynamo keeps a bounded number of compiled
        entries per code object (8 by default) and every decoder compiles this same method, so each
        decoder raises the bound by the shapes it brings (8 on creation; lillm.batching asks for its own)."""
        if self.compiled:
            torch._dynamo.config.recompile_limit += shapes

    def _step(self, token: torch.Tensor, position: torch.Tensor, cache_pos: torch.Tensor,
              key_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """token (B,), position (B, 1), cache_pos () -> logits (B, V), greedy token (B,), position + 1, cache_pos + 1.
        cache_pos may also be (B,), a position per row (lillm.batching), with key_valid None."""
        logits = self.model(token[:, None], position_ids=position, attention_mask=key_valid, cache_pos=cache_pos)[:, -1]
        return logits, logits.max(-1).indices, position + 1, cache_pos + 1

    def ensure_cache(self, batch: int, max_len: int) -> None:
        cache = self.model.model.layers[0].self_attn.cache
        if cache is None or cache.k.shape[0] != batch or cache.k.shape[2] != max_len \
                or cache.k.dtype != self.model.model.embed_tokens.weight.dtype:
            self.model.setup_cache(batch, max_len)
            self.warm.clear()  # the rotary tables may have grown: let the guards see them again

    def __call__(self, token, position, cache_pos, key_valid):
        if self.graphs:  # a CUDA graph's outputs are overwritten by its next replay: keep copies
            torch.compiler.cudagraph_mark_step_begin()
            return tuple(out.clone() for out in self.step(token, position, cache_pos, key_valid))
        # (batch, keys): generate passes a key mask; lillm.batching's per-row positions attend over the cache.
        keys = key_valid.shape[1] if key_valid is not None else self.model.model.layers[0].self_attn.cache.k.shape[2]
        shape = (token.shape[0], keys)
        if not self.compiled or shape not in self.warm:
            self.warm.add(shape)
            return self.step(token, position, cache_pos, key_valid)
        # torch.compile checks its guards (every parameter and buffer the step reads) before each
        # call: on a CPU that is a large part of a small model's step. Once a shape has run, nothing
        # they check changes between tokens (weights change in place, the cache is this one), so the
        # compiled code runs without them; a new shape or a new cache goes through them again.
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            return self.step(token, position, cache_pos, key_valid)


def static_decoder(model: Transformer) -> StaticDecoder:
    """The model's StaticDecoder, made on first use: compiled graphs are kept with the model."""
    decoder = getattr(model, "_static_decoder", None)
    if decoder is None:
        decoder = model._static_decoder = StaticDecoder(model)
    return decoder


def cache_length(model: Transformer, needed: int) -> int:
    """The fixed cache length of a compiled step for a request of `needed` positions: the next power
    of two (at least 64), at most the model's context when the request fits, else the request.
    Every step attends over the whole fixed cache, so a cache far longer than the request costs time
    on every token; powers of two bound both that waste (under 2x) and the number of graphs to
    compile (one per length used)."""
    if needed > model.config.max_seq_len:
        return needed
    return min(max(64, 1 << (needed - 1).bit_length()), model.config.max_seq_len)


@torch.no_grad()
def generate_stream(model: Transformer, prompts: list[list[int]], max_new_tokens: int = 128,
                    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                    eos_id: int | None = None, pad_id: int = 0, seed: int | None = None,
                    compile: bool | StaticDecoder = False, no_repeat_ngram: int = 0,
                    logit_bias: list[dict[int, float]] | None = None) -> Iterator[torch.Tensor]:
    """Yield a (B,) tensor of new token ids per step; rows that have emitted eos yield pad_id after.
    no_repeat_ngram > 0: no row repeats an n-gram of its own output (NoRepeatNgram); logit_bias:
    per row, {token id: number added to its logit} (LogitBias).

    compile: True decodes through the model's StaticDecoder (CUDA graphs on a GPU; the first call
    per batch size compiles for a minute), or pass a StaticDecoder of your own.
    """
    device = model.model.embed_tokens.weight.device
    ids, mask = left_pad(prompts, pad_id, device)
    batch, prompt_len = ids.shape
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    sample = partial(sample_next, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    if no_repeat_ngram:
        sample = NoRepeatNgram(sample, no_repeat_ngram)
    if logit_bias is not None:
        sample = LogitBias(sample, logit_bias)
    if compile:
        decoder = compile if isinstance(compile, StaticDecoder) else static_decoder(model)
        # the n-gram ban and the biases must see each step's logits
        greedy = temperature <= 0 and not no_repeat_ngram and logit_bias is None
        yield from _static_stream(decoder, ids, mask, positions, max_new_tokens, sample, greedy, eos_id, pad_id)
        return
    if len({len(prompt) for prompt in prompts}) == 1:
        # No padding: no mask (the prompt pass runs the plain causal kernel, each new token
        # attends to every key written so far) and no position ids (every row is at cache_pos).
        mask = positions = None
    model.setup_cache(batch, prompt_len + max_new_tokens)
    try:
        # Only the prompt's last position needs logits: lm_head skips the others.
        hidden = model(ids, position_ids=positions, attention_mask=mask, cache_pos=0, return_hidden=True)

        def next_token(token, step):
            position = None if positions is None else positions[:, -1:] + 1 + step
            return sample(model(token[:, None], position_ids=position, attention_mask=mask,
                                cache_pos=prompt_len + step)[:, -1])
        yield from _token_loop(sample(model.lm_head(hidden[:, -1])), next_token, max_new_tokens, eos_id, pad_id)
    finally:
        model.clear_cache()


def _static_stream(decoder: StaticDecoder, ids, mask, positions, max_new_tokens: int, sample, greedy: bool,
                   eos_id, pad_id):
    """generate_stream with fixed shapes: the cache stays allocated for the next call."""
    model = decoder.model
    batch, prompt_len = ids.shape
    cache_len = cache_length(model, prompt_len + max_new_tokens)
    decoder.ensure_cache(batch, cache_len)
    key_valid = F.pad(mask.bool(), (0, cache_len - prompt_len), value=True)  # new tokens are real
    # The prompt pass is eager (its length varies); it fills cache positions 0..prompt_len-1.
    hidden = model(ids, position_ids=positions, attention_mask=mask, cache_pos=0, return_hidden=True)
    position, cache_pos = positions[:, -1:] + 1, torch.tensor(prompt_len, device=ids.device)  # the next token's

    def next_token(token, step):
        nonlocal position, cache_pos
        logits, best, position, cache_pos = decoder(token, position, cache_pos, key_valid)
        return best if greedy else sample(logits)
    yield from _token_loop(sample(model.lm_head(hidden[:, -1])), next_token, max_new_tokens, eos_id, pad_id)


def _token_loop(token, next_token, max_new_tokens: int, eos_id, pad_id):
    """Yield each step's token per row and make the next (next_token(token, step)) until
    max_new_tokens or until every row has emitted eos; finished rows yield pad_id."""
    finished = torch.zeros(token.shape[0], dtype=torch.bool, device=token.device)
    for step in range(max_new_tokens):
        if eos_id is not None:
            token = token.masked_fill(finished, pad_id)
        yield token
        if eos_id is not None:
            finished |= token == eos_id
            if bool(finished.all()):
                return
        if step + 1 < max_new_tokens:
            token = next_token(token, step)


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int = 128,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, pad_id: int = 0, seed: int | None = None,
             on_token: Callable[[int, int], None] | None = None,
             compile: bool | StaticDecoder = False, no_repeat_ngram: int = 0,
             logit_bias: list[dict[int, float]] | None = None) -> list[list[int]]:
    """New tokens for each prompt (without the prompt), cut after the first eos (kept).

    on_token(row, token_id) is called as tokens arrive, for streaming to a terminal.
    compile: decode with fixed shapes and CUDA graphs (see StaticDecoder and generate_stream).
    """
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step_tokens in generate_stream(model, prompts, max_new_tokens, temperature, top_k, top_p,
                                       eos_id, pad_id, seed, compile, no_repeat_ngram, logit_bias):
        for row, token in enumerate(step_tokens.tolist()):
            if done[row]:
                continue
            outputs[row].append(token)
            if on_token is not None:
                on_token(row, token)
            done[row] = eos_id is not None and token == eos_id
    return outputs


class TextStream:
    """Turns one row's token ids into text pieces, for a terminal or a server's stream. Decoding the
    whole row and handing out the new suffix keeps multi-byte characters whole (a byte-level token
    may hold half of one): text ending in a half character waits for the next token."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def piece(self, token: int | None = None, final: bool = False) -> str:
        if token is not None:
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") and not final:  # wait for the rest of a split character
            return ""
        new, self.shown = text[len(self.shown):], text
        return new
