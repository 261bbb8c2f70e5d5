"""Pretrain a Llama-style model on token bins: one device with `python`, many with `torchrun`.

    python pretrain.py --data out/data --preset tiny --max-steps 200
    torchrun --nproc_per_node=2 pretrain.py --data out/data --preset tiny --max-steps 200
    python pretrain.py --data out/data --out out/pretrain --resume          # continue a run
    python pretrain.py --data out/zul --init-from out/expanded --lr 1e-4      # continued pretraining
    python pretrain.py --data out/data --task-data out/sft --task-share 0.5 --task-start 0.5   # mid-training

Batches come from lillm.data.BinLoader, the loop is lillm.train.train (shared with SFT). With
--task-data, the tasks' conversations (data/prepare_sft.py) join the stream from --task-start on
(lillm/mixture.py: nanochat's mid-training).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lillm import checkpoint as ckpt
from lillm.cli import (ArgumentParser, accumulation_steps, add_peft_args, add_training_args, apply_peft_from_args,
                       check_tokenizer_change, check_training_args, finish, number, print_summary, run_main,
                       train_config_from_args)
from lillm.config import PRESETS, get_preset, parse_overrides
from lillm.errors import BinFormatError, FlagError, InputFileError, TokenizerMismatchError
from lillm.folders import check_run_folder
from lillm.bin_format import check_bins, load_meta, split_files
from lillm.data import BinLoader, StepBatches
from lillm.mixture import TaskMixture, task_micro_batches
from lillm.model import Transformer
from lillm.peft import describe
from lillm.rows import read_conversations
from lillm.sft import LOSS_ON_CHOICES, SFTBatches, build_examples
from lillm.tokenizer import Tokenizer
from lillm.vocab_expand import train_only_new_rows
from lillm.perplexity import bin_evaluator, unigram_bits_per_byte
from lillm.resume import check_resume
from lillm.train import setup_distributed, train


@dataclass
class PretrainRun:
    """What a pretraining checkpoint records of its stage (TrainConfig.settings)."""
    data: str
    preset: str
    seq_len: int
    global_batch_tokens: int
    model: list = field(default_factory=list)  # --model KEY=VALUE changes to the preset's shape
    task_data: str | None = None                # mid-training (lillm/mixture.py)
    task_share: float | None = None
    task_start: float | None = None
    task_loss: str | None = None
    tasks: list | None = None


def build_model(args, vocab_size: int) -> tuple[Transformer, str]:
    if args.init_from:
        model = ckpt.load_model(ckpt.resolve_checkpoint(args.init_from))
        if model.config.vocab_size != vocab_size:
            raise TokenizerMismatchError(
                f"--init-from {args.init_from} has vocab_size {model.config.vocab_size} but the bins' tokenizer has "
                f"{vocab_size}; prepare the bins with that checkpoint's tokenizer.json")
        if args.seq_len > model.config.max_seq_len:
            raise FlagError(f"--seq-len {args.seq_len} is longer than --init-from {args.init_from}'s "
                            f"max_position_embeddings {model.config.max_seq_len}; use --seq-len "
                            f"{model.config.max_seq_len} or less")
        return model, f"checkpoint {args.init_from}"
    overrides = {**parse_overrides(args.model), "vocab_size": vocab_size}
    if args.seq_len > PRESETS[args.preset].max_seq_len:
        overrides["max_seq_len"] = args.seq_len
    torch.manual_seed(args.seed)
    try:
        config = get_preset(args.preset, **overrides)
    except ValueError as error:  # a shape that does not hold together, e.g. d_model not divisible by n_heads
        raise FlagError(f"--preset {args.preset} --model {' '.join(args.model)}: {error}") from None
    return Transformer(config), f"preset {args.preset}" + (f" with {' '.join(args.model)}" if args.model else "")


def check_args(args) -> None:
    """Every flag checked before anything is read or trained."""
    check_training_args(args)
    if args.init_from and args.model:
        raise FlagError(f"--model {' '.join(args.model)} changes a preset's shape, but --init-from {args.init_from} "
                        "brings its own: leave out --model")
    if args.task_data and not (Path(args.task_data) / "train.jsonl").is_file():
        raise InputFileError(f"--task-data {args.task_data}: no train.jsonl there; make one with data/prepare_sft.py")
    check_run_folder(args.out, resume=args.resume, overwrite=args.overwrite,
                     reads={"--data": args.data, "--init-from": args.init_from, "--tokenizer": args.tokenizer})


def check_splits(data: Path, meta: dict, tokenizer: Tokenizer, args) -> bool:
    """The bins fit the tokenizer and the windows; returns whether there is a val split to evaluate on."""
    if meta["vocab_size"] != tokenizer.vocab_size:
        raise BinFormatError(f"{data / 'meta.json'} says vocab_size {meta['vocab_size']} but tokenizer "
                             f"{tokenizer.source} has {tokenizer.vocab_size} ids; re-run data/prepare_pretrain.py "
                             "with this tokenizer")
    splits = meta["splits"]
    if "train" not in splits:
        raise BinFormatError(f"{data / 'meta.json'} lists no train split; re-run data/prepare_pretrain.py")
    if "val" not in splits and args.eval_every > 0:
        raise BinFormatError(f"{data} has no val split (prepared with --val-fraction 0), but --eval-every is "
                             f"{args.eval_every}; pass --eval-every 0, or re-run data/prepare_pretrain.py with "
                             "--val-fraction above 0")
    for split in ("train", "val") if args.eval_every > 0 else ("train",):
        tokens = splits[split]["tokens"]
        if tokens < args.seq_len + 1:
            files = ", ".join(name for name, _ in split_files(splits[split]))
            raise BinFormatError(f"{data} ({split}: {files}) holds {tokens} tokens, fewer than one window of "
                                 f"--seq-len {args.seq_len} + 1; use a smaller --seq-len or prepare more data")
    return args.eval_every > 0


def task_mixture(args, text: StepBatches, accum: int, tokenizer: Tokenizer, seq_len: int, env) -> TaskMixture:
    """The pretraining stream with --task-data's conversations packed into part of each step."""
    rows, _ = read_conversations(Path(args.task_data) / "train.jsonl", tasks=args.tasks)
    examples, _ = build_examples(tokenizer, rows, seq_len, "truncate", verbose=env.is_main, loss_on=args.task_loss)
    if not examples:
        raise InputFileError(f"--task-data {args.task_data}: no conversation for tasks {args.tasks or 'all'}")
    task_micro = task_micro_batches(accum, args.task_share)
    tasks = SFTBatches(examples, args.micro_batch, task_micro, "pack", seq_len, tokenizer.pad_id, seed=args.seed,
                       rank=env.rank, world=env.world)
    start = int(args.task_start * args.max_steps)
    if env.is_main:
        print(f"mid-training: from step {start + 1}, {task_micro} of {accum} micro batches per step are packed "
              f"conversations ({len(examples):,} from {args.task_data}, loss on {args.task_loss} tokens)")
    return TaskMixture(text, tasks, accum, task_micro, start)


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="out/data", help="folder with train.bin, val.bin, meta.json")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one meta.json names)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--model", nargs="+", default=[], metavar="KEY=VALUE",
                        help="change the preset's shape, e.g. --model n_layers=6 d_ff=704 (lillm.config.ModelConfig)")
    parser.add_argument("--init-from", default=None,
                        help="start from this checkpoint (or run) folder's weights with a fresh optimizer (continued pretraining)")
    parser.add_argument("--seq-len", type=number(1), default=128)
    parser.add_argument("--global-batch-tokens", type=number(1), default=16384,
                        help="tokens per optimizer step over all processes and accumulation steps")
    parser.add_argument("--eval-batches", type=number(1, fix="use --eval-every 0 to train without evaluation"), default=20, help="val batches per evaluation")
    parser.add_argument("--curriculum", action="store_true",
                        help="read train.bin in order (sources in the order given to prepare_pretrain --corpora) "
                             "instead of random windows")
    parser.add_argument("--allow-tokenizer-change", action="store_true",
                        help="train --init-from's model on bins made with another tokenizer (normally refused)")
    parser.add_argument("--train-new-rows-from", type=number(0), default=None, metavar="ID",
                        help="continued pretraining after scripts/expand_vocab.py: train only embedding rows >= ID "
                             "(the base vocab size), everything else frozen; weight decay is set to 0")
    mid = parser.add_argument_group("mid-training: task conversations in the pretraining stream (lillm/mixture.py)")
    mid.add_argument("--task-data", default=None, metavar="FOLDER", help="train.jsonl of data/prepare_sft.py")
    mid.add_argument("--tasks", nargs="+", default=None, help="only these tasks of --task-data (default: all)")
    mid.add_argument("--task-share", type=number(0, 1, float, above=True), default=0.5,
                     help="share of each step's micro batches")
    mid.add_argument("--task-start", type=number(0, 1, float, below=True), default=0.0,
                     help="tasks join at this fraction of --max-steps")
    mid.add_argument("--task-loss", choices=LOSS_ON_CHOICES, default="all",
                     help="all: every token of a conversation (nanochat); assistant: the answers only (SFT)")
    add_training_args(parser, out="out/pretrain", max_steps=200, lr=1e-3, warmup_steps=20, eval_every=50,
                      save_every=100)
    add_peft_args(parser)
    args = parser.parse_args(argv)
    check_args(args)

    env = setup_distributed(args.device)
    data = Path(args.data)
    meta = load_meta(data)
    tokenizer_path = args.tokenizer or meta["tokenizer_path"]
    tokenizer = Tokenizer.from_file(tokenizer_path)
    check_bins(data, tokenizer)
    evaluating = check_splits(data, meta, tokenizer, args)
    if args.init_from:  # the bins' tokenizer must be the one the checkpoint was trained with
        init = ckpt.resolve_checkpoint(args.init_from)
        check_tokenizer_change(init, meta["tokenizer_sha256"], f"the tokenizer of the bins in {args.data} "
                               f"({meta.get('tokenizer_path')})", f"prepare the bins with {init / 'tokenizer.json'}",
                               args.allow_tokenizer_change)
    model, origin = build_model(args, tokenizer.vocab_size)
    model = apply_peft_from_args(model, args)
    if args.train_new_rows_from is not None:
        model = train_only_new_rows(model, args.train_new_rows_from)
        args.weight_decay = 0.0
    seq_len = args.seq_len
    if args.global_batch_tokens % seq_len:
        raise FlagError(f"--global-batch-tokens {args.global_batch_tokens} must be a multiple of --seq-len {seq_len}; "
                        f"use {max(1, args.global_batch_tokens // seq_len) * seq_len}")
    accum = accumulation_steps(args.global_batch_tokens // seq_len, args.micro_batch, env.world)
    mid_training = dict(task_data=args.task_data, task_share=args.task_share, task_start=args.task_start,
                        task_loss=args.task_loss, tasks=args.tasks) if args.task_data else {}
    cfg = train_config_from_args(args, seq_len, PretrainRun(str(data), args.preset, seq_len, args.global_batch_tokens,
                                                            model=list(args.model), **mid_training))
    if args.resume:  # before the baseline scans the data: every difference from the run's settings, named
        check_resume(cfg, model)
    loader = BinLoader(data / "train.bin", seq_len, args.micro_batch * accum, seed=args.seed,
                       rank=env.rank, world_size=env.world, device=env.device, sequential=args.curriculum)
    source = StepBatches(loader, accum)
    if args.task_data:
        source = task_mixture(args, source, accum, tokenizer, seq_len, env)
    evaluate = bin_evaluator(data / "val.bin", seq_len, args.micro_batch, args.eval_batches,
                             meta["splits"]["val"]["bytes_per_token"], env.device) if evaluating else None
    # the baseline is computed now, not after training, so a problem with it costs no training time
    baseline = {"unigram_val_bpb": round(unigram_bits_per_byte(data, meta), 5)} if "val" in meta["splits"] else {}
    if env.is_main:
        active = model.config.active_params() if model.config.n_experts else None  # a mixture of experts
        print(f"model: {origin}, {model.num_params():,} parameters{f' ({active:,} active)' if active else ''}; "
              f"{env.world} process(es), "
              f"micro batch {args.micro_batch} x {accum} accumulation x {env.world} = "
              f"{args.global_batch_tokens:,} tokens per step on {env.device}")
    metrics = train(model, source, cfg, env, evaluate=evaluate, tokenizer_path=tokenizer_path,
                    resume=args.resume, info={"stage": "pretrain", "origin": origin, "peft": describe(model)})
    print_summary(env, args.out, metrics, baseline)
    finish(env)
    return metrics


if __name__ == "__main__":
    run_main(main)
