"""Preference tuning (DPO, or reference-free SimPO) of an SFT checkpoint on chosen/rejected pairs.

    python data/prepare_dpo.py --sft-data out/sft --model out/sft_all --out out/dpo
    python dpo_train.py --init-from out/sft_all --data out/dpo --out out/dpo_run
    python dpo_train.py --init-from out/sft_all --data out/dpo --peft lora --lora-targets all --out out/dpo_lora
    python dpo_train.py --init-from out/sft_all --data out/dpo --loss simpo --beta 2.0 --gamma 0.5

The loss, the reference log-probabilities and the batches are lillm.dpo's; the loop is
lillm.train.train, shared with pretraining and SFT (same flags, checkpoints, --resume). Before
training, the reference log-probabilities of every train and dev pair are computed once with the
--init-from model (PEFT adapters switched off), so no second copy of the model is held. At each
evaluation the log gets the held-out pairs' loss, implicit rewards, margin and preference accuracy.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from lillm.cli import (
    ArgumentParser,
    accumulation_steps,
    add_finetuning_data_args,
    add_peft_args,
    add_training_args,
    apply_peft_from_args,
    both_evaluators,
    check_finetuning_args,
    finish,
    load_finetuning_start,
    number,
    print_summary,
    run_main,
    task_score_evaluator,
    train_config_from_args,
    FinetuningRun,
)
from lillm.dpo import (
    LOSS_TYPES,
    TOO_LONG_CHOICES,
    DPOConfig,
    DPOLoss,
    PreferenceBatches,
    add_reference_logps,
    build_pairs,
    dpo_evaluator,
)
from lillm.errors import DPODataError, FlagError
from lillm.memory import autocast_for
from lillm.resume import check_resume
from lillm.peft import describe
from lillm.rows import cap_per_task, read_pairs
from lillm.sft import BATCHING_CHOICES
from lillm.train import setup_distributed, train


@dataclass
class DPORun(FinetuningRun):
    """What a DPO checkpoint records of its stage (TrainConfig.settings)."""
    objective: DPOConfig
    pairs: dict  # rows read, kept and dropped (lillm.dpo.build_pairs)


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init-from", default="out/sft_run", help="SFT checkpoint folder, or run folder (latest step)")
    parser.add_argument("--data", default="out/dpo", help="folder with train.jsonl and dev.jsonl (data/prepare_dpo.py)")
    add_finetuning_data_args(parser, "data/prepare_dpo.py", "pairs")
    parser.add_argument("--loss", choices=LOSS_TYPES, default="dpo", help="dpo (with a reference) or simpo (without)")
    parser.add_argument("--beta", type=number(0, kind=float, above=True), default=None, help="reward scale (default 0.1 for dpo, 2.0 for simpo)")
    parser.add_argument("--label-smoothing", type=number(0, 0.5, float, below=True), default=0.0,
                        help="conservative DPO: assumed probability that a pair's preference is flipped")
    parser.add_argument("--gamma", type=number(0, kind=float, rule="must be 0 or more (the margin SimPO asks of the chosen answer)"), default=0.5, help="SimPO's target margin")
    parser.add_argument("--too-long", choices=TOO_LONG_CHOICES, default="truncate",
                        help="pairs that do not fit: drop them, or shorten the prompt's middle")
    parser.add_argument("--batching", choices=BATCHING_CHOICES, default="pad",
                        help="pad: one sequence per row; pack: whole pairs per row of seq_len, masked apart")
    add_training_args(parser, out="out/dpo_run", max_steps=200, lr=5e-6, warmup_steps=10, eval_every=50,
                      save_every=100, micro_batch=4, weight_decay=0.0)
    add_peft_args(parser)
    args = parser.parse_args(argv)
    beta = args.beta if args.beta is not None else (0.1 if args.loss == "dpo" else 2.0)
    check_finetuning_args(args)
    try:
        dpo = DPOConfig(args.loss, beta, args.label_smoothing, args.gamma)
    except ValueError as error:
        raise FlagError(f"{error}; see --beta, --label-smoothing and --gamma in --help") from None

    env = setup_distributed(args.device)
    init, model, tokenizer_path, tokenizer, seq_len = load_finetuning_start(args)
    model = apply_peft_from_args(model, args).to(env.device)

    data = Path(args.data)
    rows, _ = read_pairs(data / "train.jsonl", strict=args.strict, tasks=args.tasks, require_tasks=True)
    pairs, stats = build_pairs(tokenizer, cap_per_task(rows, args.max_per_task), seq_len, args.too_long,
                               verbose=env.is_main)
    if not pairs:
        raise DPODataError(f"{data / 'train.jsonl'}: no usable pair for tasks {args.tasks or 'all'} at seq_len {seq_len}")
    dev_pairs = []
    if (data / "dev.jsonl").is_file():
        dev_rows, _ = read_pairs(data / "dev.jsonl", strict=args.strict, tasks=args.tasks)
        dev_pairs, _ = build_pairs(tokenizer, cap_per_task(dev_rows, args.eval_limit), seq_len, "truncate", verbose=False)
    settings = DPORun(str(data), str(init), args.tasks, seq_len, args.batching, args.global_batch, args.too_long,
                      dpo, stats)
    cfg = train_config_from_args(args, seq_len, settings)
    if args.resume:  # before the reference pass over every pair: every difference from the run's settings
        check_resume(cfg, model)
    if dpo.needs_reference:  # the --init-from model (adapters off) IS the reference, before any step
        # In the precision the loop will run the policy in, so that policy = reference gives h = 0 exactly.
        with autocast_for(args.precision, env.device):
            add_reference_logps(model, pairs + dev_pairs, args.micro_batch, tokenizer.pad_id, progress=env.is_main)
    evaluate = dpo_evaluator(dev_pairs, dpo, args.micro_batch, tokenizer.pad_id) if dev_pairs else None
    evaluate = both_evaluators(evaluate, task_score_evaluator(args, tokenizer))

    accum = accumulation_steps(args.global_batch, args.micro_batch, env.world,
                               unit="packed rows" if args.batching == "pack" else "pairs")
    source = PreferenceBatches(pairs, args.micro_batch, accum, args.batching, seq_len, tokenizer.pad_id,
                               seed=args.seed, rank=env.rank, world=env.world)
    if env.is_main:
        print(f"model: {init}, {model.num_params():,} parameters; {len(pairs):,} pairs ({args.batching}, seq_len "
              f"{seq_len}), {len(dev_pairs):,} dev pairs; {dpo.loss_type} beta {dpo.beta}; micro batch "
              f"{args.micro_batch} x {accum} accumulation x {env.world} = {args.global_batch} per step on {env.device}")
    metrics = train(model, source, cfg, env, loss_fn=DPOLoss(dpo), evaluate=evaluate, tokenizer_path=tokenizer_path,
                    resume=args.resume, info={"stage": "dpo", "origin": str(init), "peft": describe(model)})
    print_summary(env, args.out, metrics, {"pairs": len(pairs)})
    finish(env)
    return metrics


if __name__ == "__main__":
    run_main(main)
