"""Decoding and prefill benchmarks: lillm's generate against transformers' generate.

Decoding is measured the way a user meets it: the public `generate` of each library, greedy, a
batch of same-length random prompts, a fixed number of new tokens and no end-of-sequence stop
(lillm: eos_id=None; transformers: eos_token_id=None), so both produce exactly the same number of
tokens. tokens/s = batch * new tokens / seconds of the whole call (its short prefill included).

Before anything is timed, both sides decode the same prompts in fp32 and must produce the same
greedy tokens (`assert_same_greedy`): a faster library that computes something else would make
the comparison meaningless. On CUDA the models are then cast to bf16 for timing; transformers
uses its static cache (which its generate compiles by itself on GPUs), and with --compile lillm's
one-token step is compiled with CUDA graphs ("reduce-overhead").

The weights are random, drawn with a standard deviation of 0.2 instead of the presets' 0.02: at
0.02 a model with tied embeddings only echoes its last input token (the residual stream is still
mostly that token's embedding), so every comparison of greedy tokens would pass trivially. With
0.2 the two libraries must agree on 256 varied tokens per row. The size of the weights changes
no amount of work, so the timings are those of any model of the preset's shape.

Prefill is the prompt pass of generation as each library's generate runs it: both generate one
token after a long prompt, so what is timed is the pass that fills the KV cache (with whatever
each library saves there, e.g. transformers computes the logits of the last position only), plus
one argmax.
"""
from __future__ import annotations

import torch

from bench_train import bench_config, build_pair, comparison_row, median, time_alternating
from lillm.generate import generate, left_pad


DECODE_INIT_STD = 0.2


def decode_config(preset: str, min_len: int = 0):
    return bench_config(preset, min_len, init_std=DECODE_INIT_STD)


class GreedyMismatchError(AssertionError):
    """lillm and transformers chose different greedy tokens for the same prompts and weights."""


def random_prompts(vocab_size: int, batch: int, length: int, seed: int = 2) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    # Ids from 3 up: the special tokens (unk, bos, eos) would make an odd prompt.
    return torch.randint(3, vocab_size, (batch, length), generator=generator).tolist()


def hf_generate(model, prompts: list[list[int]], new_tokens: int, static_cache: bool = False) -> list[list[int]]:
    """transformers' greedy generate with its KV cache and no eos stop; new tokens per prompt."""
    ids = torch.tensor(prompts, device=model.device)
    extra = {"cache_implementation": "static"} if static_cache else {}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0, **extra)
    return out[:, ids.shape[1]:].tolist()


def lillm_generate(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    return generate(model, prompts, max_new_tokens=new_tokens, temperature=0, eos_id=None)


def assert_same_greedy(ours, theirs, prompts: list[list[int]], new_tokens: int) -> None:
    """Raise GreedyMismatchError unless both models decode every prompt to the same tokens."""
    with torch.no_grad():
        mine, reference = lillm_generate(ours, prompts, new_tokens), hf_generate(theirs, prompts, new_tokens)
    for row, (a, b) in enumerate(zip(mine, reference)):
        if len(a) != new_tokens or len(b) != new_tokens:
            raise GreedyMismatchError(f"prompt {row}: lillm gave {len(a)} tokens, transformers {len(b)}; "
                                      f"both should give {new_tokens} (no eos stop)")
        if a != b:
            where = next(i for i, (s, t) in enumerate(zip(a, b)) if s != t)
            raise GreedyMismatchError(
                f"prompt {row}, new token {where}: lillm chose {a[where]}, transformers {b[where]}; "
                f"the two implementations differ, so their speeds are not comparable (same weights? same config?)")


class CompiledGreedyDecoder:
    """lillm greedy decoding with the one-token step compiled with CUDA graphs (GPU only).

    The cache is set up once per batch size and reused, so the compiled graph keeps seeing the
    same cache buffers; every later call replays recorded graphs.
    """

    def __init__(self, model, batch: int, max_len: int):
        self.model, self.max_len = model, max_len
        model.setup_cache(batch, max_len)
        self.step = torch.compile(model, mode="reduce-overhead")

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        ids, mask = left_pad(prompts, 0, self.model.lm_head.weight.device)
        full_mask = torch.nn.functional.pad(mask, (0, self.max_len - mask.shape[1]), value=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(ids, position_ids=positions, attention_mask=full_mask, cache_pos=0)[:, -1]
        tokens, next_pos = [], positions[:, -1:] + 1
        for step in range(new_tokens):
            token = logits.argmax(-1)
            tokens.append(token)
            if step + 1 < new_tokens:
                logits = self.step(token[:, None].clone(), position_ids=next_pos, attention_mask=full_mask,
                                   cache_pos=ids.shape[1] + step)[:, -1].clone()
                next_pos = next_pos + 1
        return torch.stack(tokens, 1).tolist()


def bench_decode(preset: str, device, dtype: torch.dtype, batches: list[int], prompt_len: int, new_tokens: int,
                 repeats: int, warmup: int, compile_model: bool = False) -> list[dict]:
    cfg = decode_config(preset, prompt_len + new_tokens)
    ours, theirs = build_pair(cfg, device)
    ours.eval(), theirs.eval()
    cuda = torch.device(device).type == "cuda"
    rows = []
    for batch in batches:
        prompts = random_prompts(cfg.vocab_size, batch, prompt_len)
        assert_same_greedy(ours.float(), theirs.float(), prompts, new_tokens)  # fp32, before any timing
        ours.to(dtype), theirs.to(dtype)
        calls = {"lillm": lambda: lillm_generate(ours, prompts, new_tokens),
                 "transformers": lambda: hf_generate(theirs, prompts, new_tokens, static_cache=cuda)}
        if cuda and compile_model:
            compiled = CompiledGreedyDecoder(ours, batch, prompt_len + new_tokens)
            calls["lillm"] = lambda: compiled(prompts, new_tokens)
        with torch.no_grad():  # the greedy check above already ran both sides once: one warm-up less
            seconds = time_alternating(calls, repeats, max(0, warmup - 1), device)
        if cuda and compile_model:
            ours.clear_cache()
        tokens = batch * new_tokens
        rows.append(comparison_row(preset, f"decode B={batch} prompt={prompt_len} new={new_tokens}", "tokens/s",
                                   tokens / median(seconds["lillm"]), tokens / median(seconds["transformers"]),
                                   greedy_tokens_equal=True))
    return rows


def bench_prefill(preset: str, device, dtype: torch.dtype, batches: list[int], prompt_len: int, repeats: int,
                  warmup: int) -> list[dict]:
    """The prompt pass as each generate runs it: generate one token after a prompt_len prompt."""
    cfg = decode_config(preset, prompt_len + 1)
    ours, theirs = build_pair(cfg, device)
    ours.eval().to(dtype), theirs.eval().to(dtype)
    rows = []
    for batch in batches:
        prompts = random_prompts(cfg.vocab_size, batch, prompt_len)
        calls = {"lillm": lambda: lillm_generate(ours, prompts, 1),
                 "transformers": lambda: hf_generate(theirs, prompts, 1)}
        with torch.no_grad():
            seconds = time_alternating(calls, repeats, warmup, device)
        tokens = batch * prompt_len
        rows.append(comparison_row(preset, f"prefill B={batch} prompt={prompt_len}", "tokens/s",
                                   tokens / median(seconds["lillm"]), tokens / median(seconds["transformers"])))
    return rows
