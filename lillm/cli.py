"""What the stage scripts share: the entry wrapper, training flags, their checks, device choice
and the closing summary.

`run_main(main)` is how every script starts: bad input (a `LillmError`) is printed as one line,
`error: <what is wrong, where>; <the fix>`, with exit status 2 and no traceback; `--debug` or
LILLM_DEBUG=1 shows the traceback; any other exception is a bug and keeps its traceback.

pretrain.py, sft_train.py and the healing step of scripts/shrink.py differ only in
where batches come from and what the loss is; the flags that steer the loop itself
(steps, learning rate schedule, checkpoints, precision, ...) are defined once here so
the scripts cannot drift apart.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint as ckpt
from .errors import FlagError, InputFileError, LillmError, TokenizerMismatchError
from .folders import check_run_folder

from .peft import METHODS as PEFT_METHODS
from .peft import apply_peft
from .tokenizer import Tokenizer
from .muon import muon_conflict
from .train import Dist, TrainConfig, decay_start


def add_training_args(parser: argparse.ArgumentParser, **defaults) -> None:
    g = parser.add_argument_group("training loop")
    g.add_argument("--out", default=defaults.get("out", "out/run"), help="run folder: checkpoints, log.jsonl, loss.png")
    g.add_argument("--max-steps", type=int, default=defaults.get("max_steps", 1000))
    g.add_argument("--micro-batch", type=int, default=defaults.get("micro_batch", 8),
                   help="sequences per forward pass on each process (lower it if memory runs out)")
    g.add_argument("--lr", type=float, default=defaults.get("lr", 3e-4), help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="the schedule's floor as a fraction of --lr")
    g.add_argument("--warmup-steps", type=int, default=defaults.get("warmup_steps", 100))
    g.add_argument("--schedule", choices=["cosine", "wsd"], default="cosine",
                   help="after warm-up: cosine decay to the floor, or wsd (warmup-stable-decay): the peak lr until "
                        "the last --decay-fraction of the steps, which decay by 1-sqrt; a WSD run keeps its "
                        "stable-phase checkpoint, from which it can be continued for more steps")
    g.add_argument("--decay-fraction", type=float, default=0.2, help="wsd: the fraction of --max-steps that decays")
    g.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                   help="adamw; or muon: Muon for the transformer blocks' matrices, AdamW (--lr) for embeddings, "
                        "head and norms (lillm/muon.py)")
    g.add_argument("--muon-lr", type=float, default=0.02, help="Muon's peak learning rate (same schedule as --lr)")
    g.add_argument("--muon-momentum", type=float, default=0.95, help="Muon's Nesterov momentum")
    g.add_argument("--weight-decay", type=float, default=defaults.get("weight_decay", 0.1))
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--eval-every", type=int, default=defaults.get("eval_every", 200))
    g.add_argument("--save-every", type=int, default=defaults.get("save_every", 200))
    g.add_argument("--keep-last", type=int, default=2, help="step checkpoints to keep")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--max-bad-steps", type=int, default=5, help="non-finite steps in a row before stopping")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32", "bf16-true"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU; bf16: autocast over fp32 weights; bf16-true: "
                        "weights, gradients and AdamW moments in bf16, stochastic rounding (half the memory)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each transformer block in the backward pass: much less activation memory "
                        "for about a third more compute; losses and gradients unchanged")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--fsdp", action="store_true",
                   help="shard the model over torchrun processes (FSDP2) instead of replicating it (DDP)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--resume", action="store_true", help="continue from the latest step_N checkpoint in --out")
    g.add_argument("--overwrite", action="store_true",
                   help="start again in an existing run folder: removes its step_N folders, log.jsonl and "
                        "loss.png (nothing else); without it an existing run is refused")


def add_peft_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parameter-efficient fine-tuning (lillm.peft)")
    g.add_argument("--peft", choices=["none", *PEFT_METHODS], default="none",
                   help="none: train the model as it is; full / lora / qlora / prefix / adapters: lillm.peft")
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", default="q,v", help="comma-separated from q,k,v,o,gate,up,down, or 'all'")
    g.add_argument("--prefix-length", type=int, default=16, help="virtual tokens per layer (prefix tuning)")
    g.add_argument("--adapter-size", type=int, default=64, help="bottleneck width (Houlsby adapters)")
    g.add_argument("--train-embeddings", action="store_true",
                   help="also train embed_tokens / lm_head, e.g. the new rows of an expanded vocabulary")


def apply_peft_from_args(model, args):
    if args.peft == "none":
        return model
    return apply_peft(model, args.peft, targets=args.lora_targets, rank=args.lora_rank, alpha=args.lora_alpha,
                      dropout=args.lora_dropout, prefix_length=args.prefix_length, adapter_size=args.adapter_size,
                      train_embeddings=args.train_embeddings)


def train_config_from_args(args, **extra) -> TrainConfig:
    return TrainConfig(
        out_dir=args.out, max_steps=args.max_steps, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        schedule=args.schedule, decay_fraction=args.decay_fraction, optimizer=args.optimizer,
        muon_lr=args.muon_lr, muon_momentum=args.muon_momentum,
        eval_every=args.eval_every, save_every=args.save_every, keep_last=args.keep_last,
        log_every=args.log_every, max_bad_steps=args.max_bad_steps, compile=args.compile,
        precision=args.precision, seed=args.seed, fsdp=args.fsdp, overwrite=getattr(args, "overwrite", False),
        extra=extra, activation_checkpointing=args.activation_checkpointing,
    )


def accumulation_steps(global_batch: int, micro_batch: int, world: int, unit: str = "sequences") -> int:
    """Micro batches per process per step so that micro * accum * world == global batch, exactly."""
    per_step = micro_batch * world
    if global_batch % per_step:
        raise FlagError(f"the global batch ({global_batch} {unit}) must be a multiple of micro batch x processes "
                         f"({micro_batch} x {world} = {per_step}); change --micro-batch or the global batch")
    return global_batch // per_step


def print_summary(env: Dist, out: str | Path, metrics: dict, extra: dict | None = None) -> None:
    if not env.is_main:
        return
    out = Path(out)
    summary = {k: v for k, v in metrics.items() if k in ("step", "tokens", "loss", "tokens_per_s", "mfu")
               or k.startswith("val")}
    summary.update(extra or {})
    print(json.dumps(summary))
    print(f"checkpoints: {out}/step_*   log: {out / 'log.jsonl'}   loss plot: {out / 'loss.png'}")


def finish(env: Dist) -> None:
    if env.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---- checks before any work ---------------------------------------------------------------------
def need(condition: bool, flag: str, value, rule: str, fix: str = "") -> None:
    """Refuse a flag's value by name: `--seq-len 0: must be at least 1`."""
    if not condition:
        raise FlagError(f"{flag} {value}: {rule}" + (f"; {fix}" if fix else ""))


def check_device(device: str) -> None:
    """Refuse a device this torch cannot use, before anything is loaded onto it."""
    if device == "auto":
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise FlagError(f"--device {device}: not a device name; use auto, cpu or cuda (cuda:N for one GPU)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise FlagError(f"--device {device}: this torch cannot use CUDA (no GPU, or a CPU-only build of torch); "
                        "use --device cpu, or install a CUDA build of torch")
    if kind not in ("cpu", "cuda", "mps"):
        raise FlagError(f"--device {device}: lillm runs on cpu or cuda; use one of those")


def check_training_args(args, allow_zero_steps: bool = False) -> None:
    """Every number of add_training_args checked before the first step, each refusal naming its flag."""
    low = 0 if allow_zero_steps else 1
    need(args.max_steps >= low, "--max-steps", args.max_steps, f"must be at least {low}")
    need(args.micro_batch >= 1, "--micro-batch", args.micro_batch, "must be at least 1")
    need(args.lr > 0, "--lr", args.lr, "must be positive")
    need(0 <= args.min_lr_ratio <= 1, "--min-lr-ratio", args.min_lr_ratio, "must be between 0 and 1")
    need(args.warmup_steps >= 0, "--warmup-steps", args.warmup_steps, "must be 0 or more")
    need(0 < args.decay_fraction <= 1, "--decay-fraction", args.decay_fraction, "must be in (0, 1]")
    if args.schedule == "wsd":
        stable_end = decay_start(args.max_steps, args.decay_fraction)
        need(args.warmup_steps <= stable_end, "--warmup-steps", args.warmup_steps,
             f"must end before the decay begins (step {stable_end} of --max-steps {args.max_steps} with "
             f"--decay-fraction {args.decay_fraction})", "lower --warmup-steps or --decay-fraction")
    need(args.muon_lr > 0, "--muon-lr", args.muon_lr, "must be positive")
    need(0 <= args.muon_momentum < 1, "--muon-momentum", args.muon_momentum, "must be in [0, 1)")
    if args.optimizer == "muon":
        conflict = muon_conflict(args.precision, getattr(args, "peft", "none"))
        if conflict:
            raise FlagError(conflict)
    need(args.weight_decay >= 0, "--weight-decay", args.weight_decay, "must be 0 or more")
    need(args.grad_clip > 0, "--grad-clip", args.grad_clip, "must be positive")
    need(args.eval_every >= 0, "--eval-every", args.eval_every, "must be 0 (never) or more")
    need(args.save_every >= 0, "--save-every", args.save_every, "must be 0 (only at the end) or more")
    need(args.keep_last >= 0, "--keep-last", args.keep_last, "must be 0 (keep all) or more")
    need(args.log_every >= 1, "--log-every", args.log_every, "must be at least 1")
    need(args.max_bad_steps >= 1, "--max-bad-steps", args.max_bad_steps, "must be at least 1")
    check_device(args.device)
    if getattr(args, "peft", "none") != "none":
        need(args.lora_rank >= 1, "--lora-rank", args.lora_rank, "must be at least 1")
        need(0 <= args.lora_dropout < 1, "--lora-dropout", args.lora_dropout, "must be in [0, 1)")
        need(args.prefix_length >= 1, "--prefix-length", args.prefix_length, "must be at least 1")
        need(args.adapter_size >= 1, "--adapter-size", args.adapter_size, "must be at least 1")


# ---- the entry wrapper --------------------------------------------------------------------------
def debugging(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("LILLM_DEBUG", "") not in ("", "0")


def run_main(main: Callable, argv: list[str] | None = None) -> None:
    """Run a script's main(argv) and exit: 0 when it returns, 2 with one line on stderr for bad input.

    `--debug` (removed before main sees argv) or LILLM_DEBUG=1 re-raises bad input with its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debugging(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        main(argv)
    except LillmError as error:
        if debug:
            raise
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(0)


# ---- fine-tuning stages (SFT, DPO) --------------------------------------------------------------
def add_finetuning_data_args(parser: argparse.ArgumentParser, maker: str, unit: str) -> None:
    """The flags SFT and DPO share: where the rows are, which of them, how long, how many per step."""
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")
    parser.add_argument("--tasks", nargs="+", default=None, help="train on these tasks only (default: all)")
    parser.add_argument("--max-per-task", type=int, default=None, help=f"at most N train {unit} per task and language")
    parser.add_argument("--seq-len", type=int, default=None, help="longest sequence (default: the model's max_seq_len)")
    parser.add_argument("--global-batch", type=int, default=16,
                        help=f"{unit} (pad) or packed rows (pack) per optimizer step, over all processes")
    parser.add_argument("--eval-limit", type=int, default=200, help=f"dev {unit} per task")
    parser.add_argument("--strict", action="store_true", help="stop at the first malformed row instead of skipping")
    parser.add_argument("--allow-tokenizer-change", action="store_true",
                        help="train with a --tokenizer other than the checkpoint's own (normally refused)")
    parser.set_defaults(data_maker=maker)


def check_finetuning_args(args) -> None:
    """Everything about a fine-tuning command that can be checked before loading a model."""
    check_training_args(args)
    need(args.global_batch >= 1, "--global-batch", args.global_batch, "must be at least 1")
    if args.seq_len is not None:
        need(args.seq_len >= 2, "--seq-len", args.seq_len, "must be at least 2 (a prompt token and a target)")
    if args.max_per_task is not None:
        need(args.max_per_task >= 1, "--max-per-task", args.max_per_task, "must be at least 1")
    need(args.eval_limit >= 1, "--eval-limit", args.eval_limit, "must be at least 1")
    data = Path(args.data)
    if not (data / "train.jsonl").is_file():
        raise InputFileError(f"--data {data}: {data / 'train.jsonl'} not found; make the folder with "
                             f"{args.data_maker} --out {data}")
    check_run_folder(args.out, resume=args.resume, overwrite=args.overwrite)


def load_finetuning_start(args):
    """(checkpoint folder, model, tokenizer path, tokenizer, seq_len) for --init-from, with the
    tokenizer and sequence length checked against the checkpoint before any work."""
    init = ckpt.resolve_checkpoint(args.init_from)
    model = ckpt.load_model(init)
    tokenizer_path = args.tokenizer or init / "tokenizer.json"
    tokenizer = Tokenizer.from_file(tokenizer_path)
    if args.tokenizer:
        check_same_tokenizer(tokenizer, init, args.allow_tokenizer_change)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise TokenizerMismatchError(
            f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} ids but {init} has vocab_size "
            f"{model.config.vocab_size}; use the tokenizer the checkpoint was trained with")
    seq_len = args.seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise FlagError(f"--seq-len {seq_len} exceeds the model's max_seq_len {model.config.max_seq_len} ({init}); "
                        f"use --seq-len {model.config.max_seq_len} or less")
    return init, model, tokenizer_path, tokenizer, seq_len


def check_same_tokenizer(tokenizer: Tokenizer, init: Path, allow: bool) -> None:
    """--tokenizer must be the checkpoint's own tokenizer (same hash), unless the change is asked for."""
    own = init / "tokenizer.json"
    theirs = ckpt.tokenizer_sha256(own) if own.is_file() else None
    if theirs is None or theirs == tokenizer.sha256:
        return
    message = (f"--tokenizer {tokenizer.source} (sha256 {tokenizer.sha256[:16]}...) is not the tokenizer {init} "
               f"was trained with ({own}, sha256 {theirs[:16]}...)")
    if not allow:
        raise TokenizerMismatchError(f"{message}; leave --tokenizer out to use the checkpoint's, or pass "
                                     "--allow-tokenizer-change if the change is deliberate")
    print(f"warning: {message}; continuing because --allow-tokenizer-change was given", file=sys.stderr)
