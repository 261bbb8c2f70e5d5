"""What the stage scripts share: the entry wrapper, training flags, their checks, device choice
and the closing summary.

`run_main(main)` is how every script starts: bad input (a `LillmError`) is printed as one line,
`error: <what is wrong, where>; <the fix>`, with exit status 2 and no traceback; `--debug` or
LILLM_DEBUG=1 shows the traceback; any other exception is a bug and keeps its traceback.

pretrain.py, sft_train.py, dpo_train.py and the healing step of scripts/shrink.py differ
only in where batches come from and what the loss is; the flags that steer the loop itself
(steps, learning rate schedule, checkpoints, precision, ...) are the fields of
lillm.train.TrainConfig, made into flags here (lillm.options), so the scripts cannot drift apart.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint as ckpt
from .challenge import CHALLENGE_SUBSETS, challenge_evaluator
from .errors import FlagError, InputFileError, LillmError, TokenizerMismatchError
from .folders import check_run_folder
from .options import Number, add_flags, at_least, check_flags, from_flags, number

from .peft import METHODS as PEFT_METHODS
from .peft import apply_peft
from .rows import read_conversations
from .tokenizer import Tokenizer
from .muon import muon_conflict
from .train import Dist, TrainConfig, decay_start


# ---- one parser for every script: usage mistakes in one line, every number checked ---------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with lillm's two rules for every script: a usage mistake (an unknown flag, a
    value of the wrong type) is one line, a FlagError that run_main prints with exit status 2; and
    every number is checked against the range its flag declares (Number), before anything is read."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise FlagError(f"{message}; see {self.prog} --help")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        by_dest: dict[str, list] = {}
        for action in self._actions:
            if isinstance(action.type, Number):
                by_dest.setdefault(action.dest, []).append(action)
        for dest, actions in by_dest.items():  # two flags for one value: the later (a script's own) rules
            flags = [a.option_strings[-1] if a.option_strings else dest for a in actions]
            flag = flags[-1] + (f" ({', '.join(flags[:-1])})" if len(flags) > 1 else "")
            rule = actions[-1].type
            value = getattr(parsed, dest, None)
            for item in value if isinstance(value, list) else [value]:
                if item is not None:
                    need(rule.allows(item), flag, item, rule.rule, rule.fix)
        return parsed


def add_training_args(parser: argparse.ArgumentParser, **defaults) -> None:
    """The training loop's flags: one per field of TrainConfig (lillm.options), with the stage's
    defaults by flag name (out=..., max_steps=...), and the flags of how the loop is run."""
    g = parser.add_argument_group("training loop")
    # healing is optional: a stage whose default is 0 steps accepts 0
    add_flags(g, TrainConfig, defaults, {"max_steps": at_least(0)} if defaults.get("max_steps") == 0 else None)
    g.add_argument("--micro-batch", type=number(1), default=defaults.get("micro_batch", 8),
                   help="sequences per forward pass on each process (lower it if memory runs out)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--resume", action="store_true", help="continue from the latest step_N checkpoint in --out")


def add_peft_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parameter-efficient fine-tuning (lillm.peft)")
    g.add_argument("--peft", choices=["none", *PEFT_METHODS], default="none",
                   help="none: train the model as it is; full / lora / qlora / prefix / adapters: lillm.peft")
    g.add_argument("--lora-rank", type=number(1), default=8)
    g.add_argument("--lora-alpha", type=number(0, kind=float, above=True), default=16.0)
    g.add_argument("--lora-dropout", type=number(0, 1, float, below=True), default=0.0)
    g.add_argument("--lora-targets", default="q,v", help="comma-separated from q,k,v,o,gate,up,down, or 'all'")
    g.add_argument("--prefix-length", type=number(1), default=16, help="virtual tokens per layer (prefix tuning)")
    g.add_argument("--adapter-size", type=number(1), default=64, help="bottleneck width (Houlsby adapters)")
    g.add_argument("--train-embeddings", action="store_true",
                   help="also train embed_tokens / lm_head, e.g. the new rows of an expanded vocabulary")


def apply_peft_from_args(model, args):
    if args.peft == "none":
        return model
    return apply_peft(model, args.peft, targets=args.lora_targets, rank=args.lora_rank, alpha=args.lora_alpha,
                      dropout=args.lora_dropout, prefix_length=args.prefix_length, adapter_size=args.adapter_size,
                      train_embeddings=args.train_embeddings)


def train_config_from_args(args, seq_len: int | None = None, settings=None) -> TrainConfig:
    """TrainConfig from add_training_args' flags; seq_len (for MFU) and the stage's own settings
    (a dataclass, recorded in checkpoints) come from the stage script. --keep-best (fine-tuning
    stages) keeps the step with the best dev_score."""
    cfg = from_flags(TrainConfig, args, seq_len=seq_len, settings=settings)
    cfg.keep_best = "dev_score" if getattr(args, "keep_best", False) else None
    return cfg


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
    """Every flag of add_training_args checked before the first step, each refusal naming its flag."""
    check_flags(TrainConfig, args, {"max_steps": at_least(0)} if allow_zero_steps else None)
    need(args.micro_batch >= 1, "--micro-batch", args.micro_batch, "must be at least 1")
    if args.schedule == "wsd":  # a check across two flags
        stable_end = decay_start(args.max_steps, args.decay_fraction)
        need(args.warmup_steps <= stable_end, "--warmup-steps", args.warmup_steps,
             f"must end before the decay begins (step {stable_end} of --max-steps {args.max_steps} with "
             f"--decay-fraction {args.decay_fraction})", "lower --warmup-steps or --decay-fraction")
    if args.optimizer == "muon":
        conflict = muon_conflict(args.precision, getattr(args, "peft", "none"))
        if conflict:
            raise FlagError(conflict)
    check_device(args.device)


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
@dataclass
class FinetuningRun:
    """What a fine-tuning run records of its data beside the loop's settings (TrainConfig.settings)."""
    data: str
    init_from: str
    tasks: list[str] | None
    seq_len: int
    batching: str
    global_batch: int
    too_long: str


def add_finetuning_data_args(parser: argparse.ArgumentParser, maker: str, unit: str) -> None:
    """The flags SFT and DPO share: where the rows are, which of them, how long, how many per step."""
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")
    parser.add_argument("--tasks", nargs="+", default=None, help="train on these tasks only (default: all)")
    parser.add_argument("--max-per-task", type=number(1), default=None, help=f"at most N train {unit} per task and language")
    parser.add_argument("--seq-len", type=number(2, rule="must be at least 2 (a prompt token and a target)"), default=None, help="longest sequence (default: the model's max_seq_len)")
    parser.add_argument("--global-batch", type=number(1), default=16,
                        help=f"{unit} (pad) or packed rows (pack) per optimizer step, over all processes")
    parser.add_argument("--eval-limit", type=number(1), default=200, help=f"dev {unit} per task")
    parser.add_argument("--strict", action="store_true", help="stop at the first malformed row instead of skipping")
    parser.add_argument("--allow-tokenizer-change", action="store_true",
                        help="train with a --tokenizer other than the checkpoint's own (normally refused)")
    g = parser.add_argument_group("the challenge's score during training (lillm/challenge.py)")
    g.add_argument("--eval-tasks", nargs="?", const="", default=None, metavar="FOLDER",
                   help="at each evaluation also score dev.jsonl of FOLDER (data/prepare_sft.py; default: --data) "
                        "with the organisers' score: logged as dev_score, dev_zindi, ... and drawn in loss.png")
    g.add_argument("--eval-tasks-limit", type=number(1), default=50, help="dev rows per task and language for --eval-tasks")
    g.add_argument("--keep-best", action="store_true",
                   help="keep the checkpoint with the best dev_score in --out/best (best.json names its step)")
    parser.set_defaults(data_maker=maker)


def check_finetuning_args(args) -> None:
    """Everything about a fine-tuning command that can be checked before loading a model."""
    check_training_args(args)
    if args.keep_best and args.eval_tasks is None:
        raise FlagError("--keep-best keeps the checkpoint with the best dev_score, which --eval-tasks computes: "
                        "pass --eval-tasks too")
    if args.eval_tasks is not None and args.fsdp:
        raise FlagError("--eval-tasks generates translations, which needs whole weights on every process: "
                        "leave out --fsdp or --eval-tasks")
    tasks_dev = Path(args.eval_tasks or args.data) / "dev.jsonl"
    if args.eval_tasks is not None and not tasks_dev.is_file():
        raise InputFileError(f"--eval-tasks: {tasks_dev} not found; give the folder data/prepare_sft.py wrote")
    data = Path(args.data)
    if not (data / "train.jsonl").is_file():
        raise InputFileError(f"--data {data}: {data / 'train.jsonl'} not found; make the folder with "
                             f"{args.data_maker} --out {data}")
    check_run_folder(args.out, resume=args.resume, overwrite=args.overwrite,
                     reads={"--data": args.data, "--init-from": args.init_from, "--tokenizer": args.tokenizer})


def load_finetuning_start(args):
    """(checkpoint folder, model, tokenizer path, tokenizer, seq_len) for --init-from, with the
    tokenizer and sequence length checked against the checkpoint before any work."""
    init = ckpt.resolve_checkpoint(args.init_from)
    model = ckpt.load_model(init)
    tokenizer_path = args.tokenizer or init / "tokenizer.json"
    tokenizer = Tokenizer.from_file(tokenizer_path)
    if args.tokenizer:
        check_tokenizer_change(init, tokenizer.sha256, f"--tokenizer {tokenizer.source}",
                               "leave --tokenizer out to use the checkpoint's", args.allow_tokenizer_change)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise TokenizerMismatchError(
            f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} ids but {init} has vocab_size "
            f"{model.config.vocab_size}; use the tokenizer the checkpoint was trained with")
    seq_len = args.seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise FlagError(f"--seq-len {seq_len} exceeds the model's max_seq_len {model.config.max_seq_len} ({init}); "
                        f"use --seq-len {model.config.max_seq_len} or less")
    return init, model, tokenizer_path, tokenizer, seq_len


def task_score_evaluator(args, tokenizer: Tokenizer):
    """--eval-tasks: the organisers' score on the dev split at each evaluation (None without the flag)."""
    if args.eval_tasks is None:
        return None
    folder = Path(args.eval_tasks or args.data)
    rows, _ = read_conversations(folder / "dev.jsonl")
    rows = [r for r in rows if (str(r.get("task")), str(r.get("lang"))) in CHALLENGE_SUBSETS]
    if not rows:
        raise InputFileError(f"--eval-tasks: {folder / 'dev.jsonl'} has no sentiment, nli or translation rows in "
                             "Swahili or Hausa; give the folder data/prepare_sft.py wrote")
    train = folder / "train.jsonl"
    train_rows = read_conversations(train)[0] if train.is_file() else None
    return challenge_evaluator(tokenizer, rows, train_rows, args.eval_tasks_limit)


def both_evaluators(first, second):
    """One evaluate(model) that returns the metrics of both (either may be None)."""
    if first is None or second is None:
        return first or second
    return lambda model: {**first(model), **second(model)}


def check_tokenizer_change(init: Path, sha256: str, given: str, fix: str, allow: bool) -> None:
    """A run from --init-from must use the tokenizer the checkpoint was trained with (same hash), unless
    the change is asked for (--allow-tokenizer-change): `given` names the other tokenizer, `fix` the way back."""
    own = init / "tokenizer.json"
    theirs = ckpt.own_tokenizer_sha256(init)
    if theirs is None or theirs == sha256:
        return
    message = (f"{given} (sha256 {sha256[:16]}...) is not the tokenizer --init-from {init} was trained with "
               f"({own}, sha256 {theirs[:16]}...)")
    if not allow:
        raise TokenizerMismatchError(f"{message}; {fix}, or pass --allow-tokenizer-change if the change is deliberate")
    print(f"warning: {message}; continuing because --allow-tokenizer-change was given", file=sys.stderr)
