"""The pruning experiment: prune a pretrained model to about a quarter of its parameters three ways,
heal each with and without distillation, and compare with the same shape trained from scratch.

    python scripts/prune_experiment.py --teacher out/pretrain --data out/data --out out/prune_experiment

Arms (all reach the same shape; docs/SHRINK.md has the table and what it means):
  (a) buzuzu    the public Buzuzu-Mavi way: first N layers, random rows and columns drawn
                independently for every matrix (lillm.prune.buzuzu_random_prune, a labelled bug)
  (b) random    structured: ONE random index set per dimension (channels, FFN channels, heads),
                first N layers
  (c) importance structured by activation importance (Minitron) with the N most influential
                layers (ShortGPT block influence), on calibration batches from the train bin
  scratch       the same shape, randomly initialised
Each pruned arm is healed for --heal-steps with plain cross-entropy ("ce") and with logit
distillation from the unpruned teacher ("kd"); scratch trains for the same steps. All runs see the
same batches (same loader seed) and report val bits per byte before and after. Without --teacher,
a `--teacher-preset` model is first pretrained for --teacher-steps on the same bins.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch


from lillm import checkpoint as ckpt
from lillm.config import get_preset
from lillm.bin_format import load_meta
from lillm.data import BinLoader, StepBatches
from lillm.distill import distillation_loss
from lillm.importance import activation_importance, block_influence, random_importance, top_layers
from lillm.model import Transformer
from lillm.prune import buzuzu_random_prune, first_n, prune_to_shape
from lillm.loss import causal_lm_loss
from lillm.perplexity import bin_evaluator
from lillm.train import Dist, TrainConfig, train
from lillm.cli import ArgumentParser, need, number, run_main
from lillm.errors import TokenizerMismatchError
from lillm.folders import claim_output, write_text_atomic

ARMS = ("buzuzu", "random", "importance", "scratch")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None, help="pretrained checkpoint folder or run folder (latest step)")
    p.add_argument("--teacher-preset", default="small", help="preset to pretrain when --teacher is not given")
    p.add_argument("--teacher-steps", type=number(1), default=300)
    p.add_argument("--data", default="out/data", help="token bins (train.bin, val.bin, meta.json)")
    p.add_argument("--out", default="out/prune_experiment")
    p.add_argument("--d-model", type=number(1), default=80)
    p.add_argument("--d-ff", type=number(1), default=256)
    p.add_argument("--n-heads", type=number(1), default=3, help="query heads kept (whole kv groups)")
    p.add_argument("--layers", type=number(1), default=2)
    p.add_argument("--heal-steps", type=number(0), default=100)
    p.add_argument("--seq-len", type=number(1), default=128)
    p.add_argument("--batch", type=number(1), default=16, help="sequences per step")
    p.add_argument("--micro-batch", type=number(1), default=16)
    p.add_argument("--lr", type=number(0, kind=float, above=True), default=2e-3)
    p.add_argument("--warmup-steps", type=number(0), default=15)
    p.add_argument("--temperature", type=number(0, kind=float, above=True), default=2.0)
    p.add_argument("--alpha", type=number(0, 1, float), default=0.5, help="weight of the KL term in distillation")
    p.add_argument("--calib-batches", type=number(1), default=8, help="calibration batches (of --batch sequences)")
    p.add_argument("--eval-batches", type=number(1), default=40, help="val batches of --micro-batch sequences")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--no-kd", action="store_true", help="heal with cross-entropy only")
    p.add_argument("--seed", type=number(0), default=1337)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=number(1), default=None,
                   help="CPU threads for torch (1 is often fastest on a CPU shared with other jobs)")
    p.add_argument("--overwrite", action="store_true",
                   help="run again in an earlier experiment folder (replaces its runs and results, nothing else)")
    return p.parse_args(argv)


def train_config(args, out: Path, steps: int) -> TrainConfig:
    return TrainConfig(out_dir=str(out), max_steps=steps, lr=args.lr, warmup_steps=args.warmup_steps,
                       eval_every=steps, save_every=0, keep_last=1, log_every=10, seed=args.seed,
                       overwrite=args.overwrite)


def batches(args, meta: dict, data: Path, device) -> StepBatches:
    """The same stream for every run: one loader seed, --batch sequences per step."""
    loader = BinLoader(data / "train.bin", args.seq_len, args.batch, seed=args.seed, device=device,
                       dtype=meta["dtype"])
    return StepBatches(loader, args.batch // args.micro_batch)


def load_or_pretrain_teacher(args, meta: dict, data: Path, env: Dist, evaluate) -> Transformer:
    if args.teacher:
        folder = ckpt.resolve_checkpoint(args.teacher)
        teacher = ckpt.load_model(folder)
        if teacher.config.vocab_size != meta["vocab_size"]:
            raise TokenizerMismatchError(f"--teacher {folder} has vocab_size {teacher.config.vocab_size} but the bins in {data} "
                             f"have {meta['vocab_size']}; use bins made with the teacher's tokenizer.json")
        return teacher
    torch.manual_seed(args.seed)
    teacher = Transformer(get_preset(args.teacher_preset, vocab_size=meta["vocab_size"],
                                     max_seq_len=max(args.seq_len, get_preset(args.teacher_preset).max_seq_len)))
    cfg = train_config(args, Path(args.out) / "teacher", args.teacher_steps)
    train(teacher, batches(args, meta, data, env.device), cfg, env, evaluate=evaluate,
          tokenizer_path=meta["tokenizer_path"], info={"stage": "pretrain teacher"})
    return teacher


def calibration(args, meta: dict, data: Path) -> list[dict]:
    loader = BinLoader(data / "train.bin", args.seq_len, args.batch, seed=args.seed + 1, dtype=meta["dtype"])
    return [{"input_ids": loader.next_batch()[0]} for _ in range(args.calib_batches)]


def pruned_students(teacher: Transformer, target, args, calib: list[dict]) -> dict[str, Transformer]:
    students = {}
    if "buzuzu" in args.arms:
        students["buzuzu"] = buzuzu_random_prune(teacher, target, seed=args.seed)
    if "random" in args.arms:
        students["random"] = prune_to_shape(teacher, target, random_importance(teacher, args.seed),
                                            layers=first_n(target.n_layers))
    if "importance" in args.arms:
        layers = top_layers(block_influence(teacher, calib), target.n_layers)
        students["importance"] = prune_to_shape(teacher, target, activation_importance(teacher, calib), layers=layers)
        print(f"importance arm keeps layers {layers}")
    if "scratch" in args.arms:
        torch.manual_seed(args.seed)
        students["scratch"] = Transformer(target)
    return students


def markdown_table(results: dict, teacher_row: dict) -> str:
    lines = ["| arm | healing | parameters | val bpb before | val bpb after | minutes |", "|---|---|---:|---:|---:|---:|",
             f"| teacher (unpruned) | - | {teacher_row['params']:,} | {teacher_row['val_bpb']:.4f} | - | - |"]
    for name, row in results.items():
        arm, heal = name.rsplit("/", 1)
        lines.append(f"| {arm} | {heal} | {row['params']:,} | {row['val_bpb_before']:.4f} | "
                     f"{row['val_bpb_after']:.4f} | {row['minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    need(args.batch % args.micro_batch == 0, "--batch", args.batch, f"must be a multiple of --micro-batch "
         f"{args.micro_batch}")
    if args.threads:
        torch.set_num_threads(args.threads)
    data, env = Path(args.data), Dist(device=torch.device(args.device))
    out = claim_output(args.out, "experiment", overwrite=args.overwrite, reads={"--data": data, "--teacher": args.teacher})
    meta = load_meta(data)
    evaluate = bin_evaluator(data / "val.bin", args.seq_len, args.micro_batch, args.eval_batches,
                             meta["splits"]["val"]["bytes_per_token"], env.device)
    teacher = load_or_pretrain_teacher(args, meta, data, env, evaluate).to(env.device).eval()
    cfg = teacher.config
    group = cfg.n_heads // cfg.n_kv_heads
    target = cfg.replace(d_model=args.d_model, d_ff=args.d_ff, n_layers=args.layers, n_heads=args.n_heads,
                         n_kv_heads=max(1, args.n_heads // group), head_dim=cfg.head_dim)
    with torch.no_grad():
        teacher_row = {"params": teacher.num_params(), **evaluate(teacher)}
    print(f"teacher: {teacher_row}; target {target.num_params():,} parameters "
          f"({target.num_params() / teacher_row['params']:.1%} of the teacher)")
    students = pruned_students(teacher, target, args, calibration(args, meta, data))
    results, path = {}, out / "results.json"
    for arm, student in students.items():
        with torch.no_grad():
            before = evaluate(student.eval())
        for heal in ["ce"] + ([] if args.no_kd or arm == "scratch" else ["kd"]):
            model = copy.deepcopy(student).train()
            loss_fn = distillation_loss(teacher, args.temperature, args.alpha) if heal == "kd" else causal_lm_loss
            start = time.perf_counter()
            metrics = train(model, batches(args, meta, data, env.device),
                            train_config(args, out / f"{arm}_{heal}", args.heal_steps), env, loss_fn=loss_fn,
                            evaluate=evaluate, tokenizer_path=meta["tokenizer_path"], info={"stage": f"{arm}/{heal}"})
            results[f"{arm}/{heal}"] = {"params": model.num_params(), "val_bpb_before": before["val_bpb"],
                                        "val_loss_before": before["val_loss"], "val_bpb_after": metrics["val_bpb"],
                                        "val_loss_after": metrics["val_loss"],
                                        "minutes": (time.perf_counter() - start) / 60}
            print(json.dumps({f"{arm}/{heal}": results[f"{arm}/{heal}"]}))
            write_text_atomic(path, json.dumps({"args": vars(args), "teacher": teacher_row, "target": target.to_dict(),
                                           "results": results}, indent=2) + "\n")
    table = markdown_table(results, teacher_row)
    write_text_atomic(out / "results.md", table)
    print(table)
    return results


if __name__ == "__main__":
    run_main(main)
