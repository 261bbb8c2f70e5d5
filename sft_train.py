"""Supervised fine-tuning of a checkpoint on conversations, with the loss on assistant tokens only.

    python data/prepare_sft.py --out out/sft
    python sft_train.py --init-from out/pretrain --data out/sft --out out/sft_run
    python sft_train.py --init-from out/pretrain --batching pack --neftune-alpha 5 --tasks sentiment nli
    python sft_train.py --init-from out/pretrain --eval-tasks --keep-best   # the challenge's score on dev
    torchrun --nproc_per_node=2 sft_train.py --init-from out/pretrain --data out/sft

Conversations come from lillm.sft (chat template, loss mask, padded or packed batches), the loop is
lillm.train.train, shared with pretraining; evaluation during training is the dev loss per
assistant token, in all and per task, and with --eval-tasks the challenge's own score on the dev
split (--keep-best keeps its best checkpoint in --out/best). --init-from takes a checkpoint folder or a run folder (its
latest step_N is used); training starts with a fresh optimizer.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from lillm.cli import (ArgumentParser, FinetuningRun, accumulation_steps, add_finetuning_data_args, add_peft_args,
                       add_training_args, apply_peft_from_args, both_evaluators, check_finetuning_args, finish,
                       load_finetuning_start, number, print_summary, run_main, task_score_evaluator,
                       train_config_from_args)
from lillm.errors import SFTDataError
from lillm.peft import describe
from lillm.rows import cap_per_task, read_conversations
from lillm.sft import BATCHING_CHOICES, TOO_LONG_CHOICES, SFTBatches, add_neftune, build_examples, sft_evaluator
from lillm.train import setup_distributed, train

@dataclass
class SFTRun(FinetuningRun):
    """What an SFT checkpoint records of its stage (TrainConfig.settings)."""
    neftune_alpha: float
    examples: dict  # rows read, kept, dropped and truncated (lillm.sft.build_examples)


EPILOG = """two-stage schedule (the public 40M Buzuzu-Mavi model: translation first, then every task):
  python sft_train.py --init-from out/pretrain --tasks translation --out out/sft_mt --max-steps 300
  python sft_train.py --init-from out/sft_mt --out out/sft_all --max-steps 300
The second run starts from the first one's latest checkpoint with a fresh optimizer and schedule."""


def check_args(args) -> None:
    check_finetuning_args(args)


def main(argv=None):
    parser = ArgumentParser(description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init-from", default="out/pretrain", help="checkpoint folder, or run folder (latest step)")
    parser.add_argument("--data", default="out/sft", help="folder with train.jsonl and dev.jsonl (data/prepare_sft.py)")
    add_finetuning_data_args(parser, "data/prepare_sft.py", "conversations")
    parser.add_argument("--too-long", choices=TOO_LONG_CHOICES, default="truncate",
                        help="longer examples: drop them, or shorten the prompt's middle then cut the end")
    parser.add_argument("--batching", choices=BATCHING_CHOICES, default="pad",
                        help="pad: one conversation per row; pack: several per row of seq_len, masked apart")
    parser.add_argument("--neftune-alpha", type=number(0, kind=float, rule="must be 0 (off) or more"), default=0.0, help="NEFTune noise (5 in the paper; 0 = off)")
    add_training_args(parser, out="out/sft_run", max_steps=200, lr=1e-4, warmup_steps=10, eval_every=50,
                      save_every=100, micro_batch=8, weight_decay=0.0)
    add_peft_args(parser)
    args = parser.parse_args(argv)
    check_args(args)

    env = setup_distributed(args.device)
    init, model, tokenizer_path, tokenizer, seq_len = load_finetuning_start(args)
    model = apply_peft_from_args(model, args)

    data = Path(args.data)
    rows, _ = read_conversations(data / "train.jsonl", strict=args.strict, tasks=args.tasks, require_tasks=True)
    rows = cap_per_task(rows, args.max_per_task)
    examples, stats = build_examples(tokenizer, rows, seq_len, args.too_long, verbose=env.is_main)
    if not examples:
        raise SFTDataError(f"{data / 'train.jsonl'}: no usable conversation for tasks {args.tasks or 'all'} "
                           f"at seq_len {seq_len}")
    evaluate = None
    if (data / "dev.jsonl").is_file():
        dev_rows, _ = read_conversations(data / "dev.jsonl", strict=args.strict, tasks=args.tasks)
        dev_examples, _ = build_examples(tokenizer, cap_per_task(dev_rows, args.eval_limit), seq_len, "truncate",
                                         verbose=False)
        evaluate = sft_evaluator(dev_examples, args.micro_batch, tokenizer.pad_id) if dev_examples else None
    evaluate = both_evaluators(evaluate, task_score_evaluator(args, tokenizer))

    accum = accumulation_steps(args.global_batch, args.micro_batch, env.world,
                               unit="packed rows" if args.batching == "pack" else "conversations")
    source = SFTBatches(examples, args.micro_batch, accum, args.batching, seq_len, tokenizer.pad_id,
                        seed=args.seed, rank=env.rank, world=env.world)
    settings = SFTRun(str(data), str(init), args.tasks, seq_len, args.batching, args.global_batch, args.too_long,
                      args.neftune_alpha, stats)
    cfg = train_config_from_args(args, seq_len, settings)
    if env.is_main:
        print(f"model: {init}, {model.num_params():,} parameters; {len(examples):,} conversations "
              f"({args.batching}, seq_len {seq_len}); micro batch {args.micro_batch} x {accum} accumulation x "
              f"{env.world} = {args.global_batch} per step on {env.device}")
    hook = add_neftune(model, args.neftune_alpha) if args.neftune_alpha > 0 else None
    try:
        metrics = train(model, source, cfg, env, evaluate=evaluate, tokenizer_path=tokenizer_path,
                        resume=args.resume, info={"stage": "sft", "origin": str(init), "peft": describe(model)})
    finally:
        if hook is not None:
            hook.remove()
    print_summary(env, args.out, metrics, {"conversations": len(examples)})
    finish(env)
    return metrics


if __name__ == "__main__":
    run_main(main)
