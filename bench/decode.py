"""Decoding and prefill benchmarks: lillm's generate against transformers' generate.

    python -m bench.decode --presets tiny --what decode     # python -m bench --what decode prefill

Decoding is measured the way a user meets it: the public `generate` of each library, greedy, a
batch of same-length random prompts, a fixed number of new tokens and no end-of-sequence stop
(lillm: eos_id=None; transformers: eos_token_id=None), so both produce exactly the same number of
tokens. tokens/s = batch * new tokens / seconds of the whole call (its short prefill included).

Before anything is timed, both sides decode the same prompts in fp32 and must produce the same
greedy tokens (`assert_same_greedy`): a faster library that computes something else would make
the comparison meaningless. The check runs attention with SDPA's plain math kernel on both sides.
The one exception is a
rounding tie (two logits within 1e-4 relative, which fp32 kernels summing in different orders may
rank either way): transformers, fed lillm's tokens, must rank each of them as its best up to such
a tie, and the number of tied steps is recorded.

On a GPU the check runs on CPU copies of the two models (same seed, same weights), where fp32 is
exact enough to agree on every token. On an H100 in fp32 the two libraries twice diverged at token
43 of 256 (batch 1, tiny), where transformers ranked lillm's choice 0.064 below its best, also
with the math attention kernel; a third run agreed on all 256 tokens at batch 1 and on 25 at
batch 8. A gap that size is far beyond fp32 rounding, and its cause was not found in the GPU time
we had: each row records how many leading tokens the fp32 models shared on the device.

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

import sys
from functools import partial

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import harness
from lillm.generate import StaticDecoder, generate

DECODE_INIT_STD = 0.2


def add_arguments(parser) -> None:
    decode = parser.add_argument_group("decoding and prefill")
    decode.add_argument("--repeats", type=int, default=3, help="timed repetitions per side")
    decode.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    decode.add_argument("--prompt-len", type=int, default=32)
    decode.add_argument("--new-tokens", type=int, default=256)
    decode.add_argument("--prefill-len", type=int, default=512)
    decode.add_argument("--prefill-batches", type=int, nargs="+", default=[1, 8])
    decode.add_argument("--hf-compiled-decode", action="store_true",
                        help="also time transformers' static-cache generate (compiled by transformers on GPUs)")


def decode_config(preset: str, min_len: int = 0):
    return harness.bench_config(preset, min_len, init_std=DECODE_INIT_STD)


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


def lillm_generate(model, prompts: list[list[int]], new_tokens: int, decoder: StaticDecoder | None = None
                   ) -> list[list[int]]:
    return generate(model, prompts, max_new_tokens=new_tokens, temperature=0, eos_id=None,
                    compile=decoder if decoder is not None else False)


# Two fp32 implementations sum in different orders, so their logits differ by rounding (about 1e-6
# relative). When a row's two best logits are that close, each library may pick a different one
# and the rows diverge from there. Such a tie is accepted when transformers itself, fed lillm's
# tokens, ranks lillm's choice within this relative distance of its best; a real difference
# between the models misses by whole units.
TIE_TOLERANCE = 1e-4


def exact_attention():
    """The check runs attention with SDPA's math kernel on both sides: the same plain fp32
    computation, whichever fused kernels the device and the input shapes would otherwise select."""
    return sdpa_kernel(SDPBackend.MATH)


def assert_same_greedy(ours, theirs, prompts: list[list[int]], new_tokens: int,
                       decoder: StaticDecoder | None = None) -> int:
    """Raise GreedyMismatchError unless lillm's greedy tokens are transformers' greedy tokens.

    Equal token lists pass at once. A row that differs is checked token by token, teacher-forced:
    transformers runs over the prompt and lillm's tokens, and every lillm token must be its argmax
    up to a rounding tie (TIE_TOLERANCE). Returns the number of tied steps (0 when all rows equal).
    """
    with torch.no_grad(), exact_attention():
        mine = lillm_generate(ours, prompts, new_tokens, decoder)
        reference = hf_generate(theirs, prompts, new_tokens)
    ties = 0
    for row, (a, b) in enumerate(zip(mine, reference)):
        if len(a) != new_tokens or len(b) != new_tokens:
            raise GreedyMismatchError(f"prompt {row}: lillm gave {len(a)} tokens, transformers {len(b)}; "
                                      f"both should give {new_tokens} (no eos stop)")
        if a != b:
            ties += count_ties(theirs, prompts[row], a, b, row)
    return ties


def count_ties(theirs, prompt: list[int], mine: list[int], reference: list[int], row: int) -> int:
    """Steps where lillm's token is not transformers' argmax but ties with it; raise on a real miss."""
    with torch.no_grad(), exact_attention():
        ids = torch.tensor([prompt + mine], device=theirs.device)
        logits = theirs(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    best = logits.max(-1).values
    chosen = logits.gather(-1, torch.tensor(mine, device=logits.device)[:, None])[:, 0]
    gap = best - chosen
    allowed = TIE_TOLERANCE * best.abs().clamp(min=1.0)
    if bool((gap > allowed).any()):
        where = int((gap > allowed).nonzero()[0])
        raise GreedyMismatchError(
            f"prompt {row}, new token {where}: lillm chose {mine[where]}, transformers "
            f"{int(logits[where].argmax())} (free-running: {reference[where]}), {float(gap[where]):.4g} below its best "
            f"logit; the two implementations differ, so their speeds are not comparable (same weights? same config?)")
    return int((gap > 0).sum())


def equal_prefix(ours, theirs, prompts: list[list[int]], new_tokens: int) -> int:
    """How many leading greedy tokens the two models share, in the worst row."""
    with torch.no_grad():
        mine, reference = lillm_generate(ours, prompts, new_tokens), hf_generate(theirs, prompts, new_tokens)
    return min(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), new_tokens) for x, y in zip(mine, reference))


def bench_decode(preset: str, device, dtype: torch.dtype, batches: list[int], prompt_len: int, new_tokens: int,
                 repeats: int, warmup: int, compile_model: bool = False, hf_compiled: bool = False) -> list[dict]:
    """lillm's generate (with compile_model: its CUDA-graph StaticDecoder) against transformers'
    eager generate; with hf_compiled also against transformers' static cache, which its generate
    compiles by itself on a GPU."""
    cfg = decode_config(preset, prompt_len + new_tokens)
    ours, theirs = harness.build_pair(cfg, device)
    ours.eval(), theirs.eval()
    on_gpu = torch.device(device).type != "cpu"
    # The check runs on the CPU in fp32, where both libraries agree on every token; on an H100 the
    # fp32 models sometimes diverged after 43 tokens (see the module docstring). Same seed, same weights.
    checked = tuple(model.eval() for model in harness.build_pair(cfg, "cpu")) if on_gpu else (ours, theirs)
    rows = []
    for batch in batches:
        prompts = random_prompts(cfg.vocab_size, batch, prompt_len)
        # fp32, before any timing: the plain path, then the fixed-shape step that the graphs record.
        ties = assert_same_greedy(checked[0].float(), checked[1].float(), prompts, new_tokens)
        if compile_model:
            ties += assert_same_greedy(*checked, prompts, new_tokens, StaticDecoder(checked[0], compile=False))
        extra = {"greedy_check_device": "cpu"}
        if on_gpu:  # for the record: how far the fp32 models agree on this device
            extra["fp32_equal_tokens_on_device"] = equal_prefix(ours.float(), theirs.float(), prompts, new_tokens)
        ours.to(dtype), theirs.to(dtype)
        decoder = StaticDecoder(ours) if compile_model else None
        calls = {"lillm": partial(lillm_generate, ours, prompts, new_tokens, decoder),
                 "transformers": partial(hf_generate, theirs, prompts, new_tokens)}
        if hf_compiled:
            calls["transformers static"] = partial(hf_generate, theirs, prompts, new_tokens, static_cache=True)
        # On the CPU the greedy check already ran both timed models once: one warm-up less. Compiled
        # decoding needs one call to compile and record its graphs.
        warmup_calls = max(1 if compile_model else 0, warmup - (0 if on_gpu else 1))
        with torch.no_grad():
            seconds = harness.time_alternating(calls, repeats, warmup_calls, device)
        ours.clear_cache()
        tokens = batch * new_tokens
        ours_tps = tokens / harness.median(seconds["lillm"])
        how = ", lillm compiled" if compile_model else ""
        metric = f"decode B={batch} prompt={prompt_len} new={new_tokens}{how}"
        rows.append(harness.comparison_row(preset, metric, "tokens/s", ours_tps,
                                           tokens / harness.median(seconds["transformers"]),
                                           greedy_tokens_equal=True, greedy_rounding_ties=ties, **extra))
        if hf_compiled:
            metric = f"decode B={batch}{how} vs transformers static cache, compiled"
            rows.append(harness.comparison_row(preset, metric, "tokens/s", ours_tps,
                                               tokens / harness.median(seconds["transformers static"])))
    return rows


def bench_prefill(preset: str, device, dtype: torch.dtype, batches: list[int], prompt_len: int, repeats: int,
                  warmup: int) -> list[dict]:
    """The prompt pass as each generate runs it: generate one token after a prompt_len prompt."""
    cfg = decode_config(preset, prompt_len + 1)
    ours, theirs = harness.build_pair(cfg, device)
    ours.eval().to(dtype), theirs.eval().to(dtype)
    rows = []
    for batch in batches:
        prompts = random_prompts(cfg.vocab_size, batch, prompt_len)
        calls = {"lillm": partial(lillm_generate, ours, prompts, 1),
                 "transformers": partial(hf_generate, theirs, prompts, 1)}
        with torch.no_grad():
            seconds = harness.time_alternating(calls, repeats, warmup, device)
        tokens = batch * prompt_len
        rows.append(harness.comparison_row(preset, f"prefill B={batch} prompt={prompt_len}", "tokens/s",
                                           tokens / harness.median(seconds["lillm"]),
                                           tokens / harness.median(seconds["transformers"])))
    return rows


def compare_decode(preset: str, args, dtype: torch.dtype) -> list[dict]:
    return bench_decode(preset, args.device, dtype, args.decode_batches, args.prompt_len, args.new_tokens,
                        args.repeats, args.warmup, args.compile, args.hf_compiled_decode)


def compare_prefill(preset: str, args, dtype: torch.dtype) -> list[dict]:
    return bench_prefill(preset, args.device, dtype, args.prefill_batches, args.prefill_len, args.repeats,
                         args.warmup)


COMPARISONS = {"decode": compare_decode, "prefill": compare_prefill}


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = harness.argument_parser(__doc__, what=tuple(COMPARISONS))
    add_arguments(parser)
    return harness.run(harness.parse_args(parser, argv), argv, COMPARISONS)


if __name__ == "__main__":
    from lillm.cli import run_main  # one line for bad input, status 2 (lillm/cli.py)

    run_main(main)
