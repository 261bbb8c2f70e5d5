"""CPU decoding for deployment, side by side in one run: lillm fp32, lillm int8 (lillm/quant.py),
each eager and compiled, transformers fp32 eager, and llama.cpp running the same weights as a q8_0
GGUF (lillm/gguf.py).

    python -m bench.deploy --threads 1 2                                # lillm-39m, random weights
    python -m bench.deploy --threads 1 --checkpoint CKPT --val-bin DATA/val.bin   # + quality

Compiled ("compiled" rows): the fixed-shape decoding step (lillm.generate.StaticDecoder) through
torch.compile's inductor, which writes C++ kernels for the CPU, so a token no longer walks the
model's Python code: the prefill stays eager, the step is one compiled call. It compiles once per
batch size and thread count, in the warm-up (minutes on 2 cores, not counted); the bench checks
that its greedy tokens equal the eager path's and says so.

Speed: greedy decoding of `--new-tokens` after a `--prompt-len` random prompt at each batch size,
no eos stop, tokens/s = batch * new tokens / seconds of the whole call (prefill included), the
median of alternating repetitions after a warm-up (bench.harness.time_alternating). llama.cpp runs
through llama-cpp-python's C API: one llama_decode per step for all rows of the batch, greedy
argmax over its logits, with the same thread count.

Quality (with --checkpoint, a trained model, and --val-bin): held-out loss over windows of the
token bin for fp32, int8 and llama.cpp q8_0; and for int8 and q8_0 against lillm fp32, the share
of positions whose top-1 token agrees when fed lillm fp32's greedy continuation (teacher-forced),
and the share of free-running greedy tokens equal to fp32's over 256-token continuations.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.harness import hf_model_like, time_alternating
from lillm import checkpoint as ckpt
from lillm.config import get_preset
from lillm.errors import FlagError
from lillm.generate import StaticDecoder, generate
from lillm.gguf import export_gguf
from lillm.model import Transformer
from lillm.quant import Int8Linear, quantize_int8
from lillm.tokenizer import train_bpe

SIDES = ("lillm fp32", "lillm int8", "lillm fp32 compiled", "lillm int8 compiled", "transformers fp32",
         "llama.cpp q8_0")


# ---- the models --------------------------------------------------------------------------------
def load_or_build(args) -> tuple[Transformer, Path]:
    """The fp32 model and a checkpoint folder holding it (with a tokenizer, for the GGUF export)."""
    if args.checkpoint:
        folder = ckpt.resolve_checkpoint(args.checkpoint)
        return ckpt.load_model(folder).eval(), folder
    cfg = get_preset(args.preset)
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, args.prompt_len + args.new_tokens))
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    # Random weights need a tokenizer only to travel in the GGUF: a small one, padded to the vocab.
    tmp = Path(tempfile.mkdtemp(prefix="bench_deploy_"))
    text = ["Habari za asubuhi, rafiki yangu.", "Ina kwana? Lafiya lau."] * 20
    train_bpe(text, vocab_size=300, show_progress=False).save(tmp / "tokenizer.json")
    return model, ckpt.save_checkpoint(tmp / "ckpt", model, tokenizer_path=tmp / "tokenizer.json")


class LlamaCppGreedy:
    """Batched greedy decoding in llama.cpp: every row is a sequence of one context."""

    def __init__(self, path: Path, max_batch: int, max_len: int, threads: int):
        import llama_cpp
        self.lib = llama_cpp
        self._quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)  # kept: C holds the pointer
        llama_cpp.llama_log_set(self._quiet, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = max_batch * max_len
        params.n_batch = params.n_ubatch = max_batch * max_len
        params.n_seq_max = max_batch
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(max_batch * max_len, 0, max_batch)

    def set_threads(self, threads: int) -> None:
        self.lib.llama_set_n_threads(self.ctx, threads, threads)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, sequence, wants logits)."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, index: int) -> int:
        logits = self.lib.llama_get_logits_ith(self.ctx, index)
        return int(np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)),
                                         shape=(self.n_vocab,)).argmax())

    def __call__(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        entries = [(t, pos, row, pos == len(p) - 1) for row, p in enumerate(prompts) for pos, t in enumerate(p)]
        self._decode(entries)
        last = [i for i, e in enumerate(entries) if e[3]]
        tokens = [self._argmax(i) for i in last]
        out = [[t] for t in tokens]
        for step in range(1, new_tokens):
            self._decode([(tokens[row], len(p) + step - 1, row, True) for row, p in enumerate(prompts)])
            tokens = [self._argmax(row) for row in range(len(prompts))]
            for row, t in enumerate(tokens):
                out[row].append(t)
        return out

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits at every position of one sequence (for the loss and teacher-forced agreement)."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        self._decode([(t, pos, 0, True) for pos, t in enumerate(tokens)])
        return np.stack([np.ctypeslib.as_array(ctypes.cast(self.lib.llama_get_logits_ith(self.ctx, i),
                                                           ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))
                         for i in range(len(tokens))]).copy()


# ---- timing ---------------------------------------------------------------------------------------
def speed(model, int8, theirs, llama, args, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    if llama is not None:
        llama.set_threads(threads)
    # One compiled step per model and thread count (inductor's kernels are built for a thread count).
    compiled = {name: StaticDecoder(m, backend="inductor") for name, m in (("fp32", model), ("int8", int8))
                if args.compile and f"lillm {name} compiled" not in args.skip}
    rows = []
    for batch in args.batches:
        generator = torch.Generator().manual_seed(2)
        prompts = torch.randint(3, model.config.vocab_size, (batch, args.prompt_len), generator=generator).tolist()
        ids = torch.tensor(prompts)

        def hf(ids=ids):
            return theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)

        def ours(model, prompts=prompts, decoder=False):
            return generate(model, prompts, args.new_tokens, temperature=0, eos_id=None, compile=decoder)
        calls = {"lillm fp32": lambda: ours(model), "lillm int8": lambda: ours(int8), "transformers fp32": hf}
        same = {}
        for name, decoder in compiled.items():
            eager = model if name == "fp32" else int8
            calls[f"lillm {name} compiled"] = lambda eager=eager, decoder=decoder: ours(eager, decoder=decoder)
            with torch.no_grad():  # compiles now (outside the timing) and compares the tokens with eager's
                got, expected = calls[f"lillm {name} compiled"](), calls[f"lillm {name}"]()
                same.update(agreement(f"lillm {name} compiled", got, expected))
                same[f"lillm {name} compiled fp32 top-2 gap where rows part"] = tie_gaps(model, prompts, got, expected)
        if llama is not None:
            calls["llama.cpp q8_0"] = lambda prompts=prompts: llama(prompts, args.new_tokens)
        calls = {name: call for name, call in calls.items() if name not in args.skip}
        cpu_seconds = {}
        with torch.no_grad():
            seconds = {name: statistics.median(times)
                       for name, times in time_alternating(calls, args.repeats, args.warmup,
                                                           cpu_seconds=cpu_seconds).items()}
        tokens = batch * args.new_tokens
        rows.append({"threads": threads, "batch": batch, **same,
                     **{f"{name} tokens/s": tokens / s for name, s in seconds.items()},
                     **{f"{name} tokens/CPU-s": tokens / statistics.median(s) for name, s in cpu_seconds.items()}})
        print(json.dumps(rows[-1]), flush=True)
    for decoder in compiled.values():
        decoder.model.clear_cache()
    return rows


def agreement(name: str, got: list[list[int]], expected: list[list[int]]) -> dict:
    """Whether the compiled path's greedy tokens equal the eager path's and, where a row differs,
    the step of its first difference. (fbgemm rounds each call's activations to 7 bits, one scale
    for all rows of the call: a last-bit difference in a layer's input can move a rounding and the
    logits by about 2%, so int8 rows may part at a near-tie; docs/DEPLOY.md shows one.)"""
    first = [step for mine, theirs in zip(got, expected) if (step := parting_step(mine, theirs)) is not None]
    return {f"{name} tokens equal eager": not first, f"{name} rows equal eager": len(expected) - len(first),
            f"{name} first difference at step": first}


def parting_step(mine: list[int], theirs: list[int]) -> int | None:
    """The first step where two greedy rows differ, or None."""
    return next((step for step, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)


def tie_gaps(model, prompts: list[list[int]], got: list[list[int]], expected: list[list[int]]) -> list[float]:
    """For each row where two greedy paths part: fp32's gap between its two best logits at that step
    (after the prompt and the tokens both paths share). A gap of a few hundredths is a near-tie, where
    int8's rounding noise may pick either token."""
    gaps = []
    for prompt, mine, theirs in zip(prompts, got, expected):
        step = parting_step(mine, theirs)
        if step is not None:
            logits = model(torch.tensor([prompt + theirs[:step]]))[0, -1].float()
            top = logits.topk(2).values
            gaps.append(round(float(top[0] - top[1]), 4))
    return gaps


# ---- int8 kernels ---------------------------------------------------------------------------------
def onednn_int8_linear(weight_int8: torch.Tensor, scales: torch.Tensor, rows: int):
    """oneDNN's int8 linear (the kernel inductor's PT2E quantization lowers to) on plain int8 tensors,
    activations rounded per call to 7-bit unsigned (as fbgemm does on AVX2, whose 16-bit pair sums
    would saturate at 8 bits): the same arithmetic as lillm's fbgemm layer."""
    packed = torch.ops.onednn.qlinear_prepack(weight_int8, [rows, weight_int8.shape[1]])
    zeros = torch.zeros(len(scales), dtype=torch.int32)

    def linear(x):
        low, high = x.amin().clamp(max=0), x.amax().clamp(min=0)
        step = ((high - low) / 127).clamp(min=1e-12)
        zero = torch.round(-low / step).to(torch.int32)
        quantized = torch.clamp(torch.round(x / step) + zero, 0, 127).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise.tensor(quantized, step, zero, packed, scales, zeros, None, 1.0, 0,
                                                         torch.float32, "none", [], "")
    return linear


def kernel_calls(weight: torch.Tensor, x: torch.Tensor) -> dict:
    fbgemm, weight_only = Int8Linear(weight, "fbgemm"), Int8Linear(weight, "weight-only")
    onednn = onednn_int8_linear(fbgemm.weight_int8, fbgemm.scales, x.shape[0])
    assert torch.allclose(onednn(x), fbgemm(x), atol=1e-5), "oneDNN and fbgemm should agree"
    return {"fp32": lambda: F.linear(x, weight), "fbgemm": lambda: fbgemm(x),
            "weight-only (_weight_int8pack_mm)": lambda: weight_only(x), "onednn qlinear": lambda: onednn(x)}


def kernels(model, args, threads: int) -> list[dict]:
    """Microseconds per call of each int8 kernel torch offers, at the model's projection shapes."""
    torch.set_num_threads(threads)
    cfg = model.config
    shapes = {"q/o": (cfg.d_model, cfg.n_heads * cfg.head_dim), "gate/up": (cfg.d_model, cfg.d_ff),
              "down": (cfg.d_ff, cfg.d_model), "head": (cfg.d_model, cfg.vocab_size)}
    rows = []
    for batch in args.batches:
        for name, (inputs, outputs) in shapes.items():
            seconds = time_alternating(kernel_calls(torch.randn(outputs, inputs) * 0.02, torch.randn(batch, inputs)),
                                       repeats=50, warmup=5)
            rows.append({"threads": threads, "batch": batch, "shape": name,
                         **{kernel: 1e6 * statistics.median(times) for kernel, times in seconds.items()}})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# ---- quality --------------------------------------------------------------------------------------
def mean_loss(logits_of, windows: list[list[int]]) -> float:
    losses = [F.cross_entropy(torch.as_tensor(logits_of(w))[:-1].double(), torch.tensor(w[1:])).item() for w in windows]
    return float(np.mean(losses))


def lillm_logits(model):
    def logits(tokens):
        with torch.no_grad():
            return model(torch.tensor([tokens]))[0].float().numpy()
    return logits


def quality(model, int8, llama, args) -> dict:
    tokens = np.memmap(args.val_bin, dtype=np.uint16, mode="r")
    length = min(model.config.max_seq_len, 256)
    windows = [tokens[i:i + length].astype(np.int64).tolist() for i in range(0, args.windows * length, length)]
    sides = {"lillm fp32": lillm_logits(model), "lillm int8": lillm_logits(int8)}
    if llama is not None:
        sides["llama.cpp q8_0"] = llama.logits
    out = {f"held-out loss {name}": mean_loss(fn, windows) for name, fn in sides.items()}
    reference = out["held-out loss lillm fp32"]
    for name in sides:
        out[f"held-out loss change {name}"] = out[f"held-out loss {name}"] / reference - 1
    # 256-token greedy continuations of held-out prompts (the first 32 tokens of windows)
    new = min(256, model.config.max_seq_len - 32)
    prompts = [w[:32] for w in windows[:args.continuations]]
    fp32 = generate(model, prompts, new, temperature=0, eos_id=None)
    for name in sides:
        if name == "lillm fp32":
            continue
        free = (generate(int8, prompts, new, temperature=0, eos_id=None) if name == "lillm int8"
                else llama(prompts, new))
        same = sum(a == b for x, y in zip(free, fp32) for a, b in zip(x, y))
        forced = sum(int((sides[name](p + c)[len(p) - 1:-1].argmax(-1) == np.array(c)).sum())
                     for p, c in zip(prompts, fp32))
        total = sum(len(c) for c in fp32)
        out[f"free-running greedy tokens equal to fp32, {name}"] = same / total
        out[f"teacher-forced top-1 agreement with fp32, {name}"] = forced / total
    out["continuation tokens"] = new
    return out


# ---- main -----------------------------------------------------------------------------------------
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="lillm-39m", help="random weights of this preset (without --checkpoint)")
    parser.add_argument("--checkpoint", help="a trained checkpoint instead of random weights")
    parser.add_argument("--val-bin", help="held-out token bin (val.bin) for the quality numbers")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts, one after another")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled rows")
    parser.add_argument("--skip", nargs="+", default=[], choices=SIDES, metavar="SIDE",
                        help=f"sides to leave out of the timing, of: {', '.join(SIDES)}")
    parser.add_argument("--kernels", action="store_true",
                        help="also time each int8 kernel torch offers at the model's shapes (microseconds per call)")
    parser.add_argument("--windows", type=int, default=20, help="held-out windows for the loss")
    parser.add_argument("--continuations", type=int, default=8, help="greedy continuations compared")
    parser.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads[0])
    load_before = os.getloadavg()

    model, folder = load_or_build(args)
    int8 = quantize_int8(model)
    theirs = hf_model_like(model.config, model.state_dict()).eval()
    llama = None
    if args.llama_cpp and importlib.util.find_spec("llama_cpp") is None:
        raise FlagError("llama.cpp's side needs llama-cpp-python: pip install -e '.[llama]', or its bindings on "
                        "PYTHONPATH with LLAMA_CPP_LIB_PATH naming a built libllama (docs/DEPLOY.md), or pass "
                        "--no-llama-cpp")
    if args.llama_cpp:
        gguf_dir = Path(tempfile.mkdtemp(prefix="bench_deploy_gguf_"))
        path = export_gguf(folder, gguf_dir / "model-q8_0.gguf", "q8_0")
        llama = LlamaCppGreedy(path, max(args.batches + [args.continuations]),
                               max(args.prompt_len + args.new_tokens, model.config.max_seq_len) + 1,
                               args.threads[0])
    result = {"model": str(args.checkpoint or args.preset), "params": model.num_params(), "threads": args.threads,
              "int8 kernel": int8.lm_head.kernel, "torch": torch.__version__, "machine": platform.processor(),
              "load average before": load_before,
              "speed": [row for threads in args.threads for row in speed(model, int8, theirs, llama, args, threads)]}
    if args.kernels:
        result["kernels"] = [row for threads in args.threads for row in kernels(model, args, threads)]
    if args.val_bin:
        result["quality"] = quality(model, int8, llama, args)
        print(json.dumps(result["quality"], indent=1))
    result["load average after"] = os.getloadavg()
    print(markdown(result))
    if args.kernels:
        print(kernel_markdown(result["kernels"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


def markdown(result: dict) -> str:
    """Two tables: tokens per second of wall time, and per CPU second of this process (what a call
    cost whatever share of the cores other jobs left it; with several threads it counts them all)."""
    tables = []
    for unit in ("tokens/s", "tokens/CPU-s"):
        lines = [f"{unit}:", "", "| threads | batch | " + " | ".join(SIDES) + " | int8 / transformers | int8 compiled / "
                 "int8 | int8 compiled / llama.cpp |", "| --- | --- |" + " ---: |" * (len(SIDES) + 3)]
        for row in result["speed"]:
            value = {name: row.get(f"{name} {unit}", float("nan")) for name in SIDES}
            ratios = (value["lillm int8"] / value["transformers fp32"], value["lillm int8 compiled"] / value["lillm int8"],
                      value["lillm int8 compiled"] / value["llama.cpp q8_0"])
            lines.append(f"| {row['threads']} | {row['batch']} | " + " | ".join(f"{value[name]:,.1f}" for name in SIDES)
                         + " | " + " | ".join(f"{ratio:.2f}x" for ratio in ratios) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def kernel_markdown(rows: list[dict]) -> str:
    names = [key for key in rows[0] if key not in ("threads", "batch", "shape")]
    lines = ["| threads | batch | shape | " + " | ".join(f"{name} (us)" for name in names) + " |",
             "| --- | --- | --- |" + " ---: |" * len(names)]
    for row in rows:
        lines.append(f"| {row['threads']} | {row['batch']} | {row['shape']} | "
                     + " | ".join(f"{row[name]:,.0f}" for name in names) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    from lillm.cli import run_main  # one line for bad input, status 2 (lillm/cli.py)

    run_main(main)
