"""Evaluate a checkpoint on the SFT tasks: the challenge's score, a detail table, every prediction.

    python scripts/evaluate.py --checkpoint out/sft_run --data out/sft --limit 100
    python scripts/evaluate.py --checkpoint out/sft_run --tasks sentiment nli --no-greedy
    python scripts/evaluate.py --score-submission out/sft_run/submission_test.csv

The headline is the Buzuzu-Mavi challenge's own score, as the organisers' scorer computes it
(lillm/challenge.py): every per-sentence chrF of the MT rows and the two pooled macro F1s
(sentiment, XNLI) averaged as one list, so MT weighs by its sentence count, and its zindi for the
model's size; the mean of the three components is printed beside it under that name, and the
same numbers for the baselines. Classification is by option likelihood, turned into a choice by
--scoring (lillm/evaluate.py: calibrated by default; every scoring's numbers are in the detail).
Into --out (default: the checkpoint) go eval_<split>.md/.json, predictions_<split>.csv/.jsonl (id,
task, language, input, target, prediction by likelihood, by greedy generation, the row's chrF) and
submission_<split>.csv in the challenge's layout (ID, Response, Targets), which
--score-submission (or the organisers' scorer) turns back into the same numbers;
--score-submission also reads the organisers' own layout. A file of the same name that lillm did
not write is never replaced (lillm/folders.py).

For each (task, language) of the split (test by default): classification by option likelihood and
by greedy generation (weighted F1), translation by greedy generation (chrF, BLEU), the loss and bits
per byte on the reference answers, and baselines: the majority class of the train split, and copying
the English source for translation. Then the challenge average and the zindi score for the model's
parameter count (see lillm/challenge.py). --limit N keeps N evenly spaced rows per task and language
(sources are often sorted by label), so a CPU run stays short.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import time
from pathlib import Path

import torch

from lillm import checkpoint as ckpt
from lillm.challenge import (challenge_average, challenge_summary, evaluate_on_tasks, score_submission, submission_csv,
                             submission_rows, subset_score)
from lillm.cli import ArgumentParser, check_device, number, run_main
from lillm.errors import FlagError, InputFileError, SFTDataError
from lillm.evaluate import SCORINGS
from lillm.folders import check_writable, write_reports
from lillm.rows import by_task_and_lang, evenly_spaced, jsonl_text, read_conversations, read_text
from lillm.sft import assistant_loss, build_examples
from lillm.tokenizer import Tokenizer


def group_rows(rows: list[dict], limit: int | None) -> dict[tuple[str, str], list[dict]]:
    """Rows per (task, lang), sorted, at most limit of each, evenly spaced."""
    return {key: evenly_spaced(group, limit) for key, group in sorted(by_task_and_lang(rows).items())}


def loss_and_bpb(model, tokenizer, rows, seq_len: int, batch_size: int) -> dict:
    examples, _ = build_examples(tokenizer, rows, seq_len, "truncate", verbose=False)
    total = assistant_loss(model, examples, batch_size, tokenizer.pad_id).get("")
    if not total or not total["tokens"]:
        return {}
    return {"val_loss": total["loss_sum"] / total["tokens"],
            "val_bpb": total["loss_sum"] / math.log(2) / max(1, total["bytes"])}


def fmt(value, scale: float = 1.0, digits: int = 3) -> str:
    return "" if value is None else f"{value * scale:.{digits}f}"


OUTPUT_FILES = [("eval", "json"), ("eval", "md"), ("predictions", "csv"), ("predictions", "jsonl"),
                ("submission", "csv")]
PREDICTION_FIELDS = ["id", "task", "lang", "input", "target", "likelihood", "greedy", "greedy_label", "chrf",
                     "loglikelihoods", "source"]


def challenge_table(challenge: dict) -> str:
    """The headline: the organisers' score and zindi, the components, and the mean of three beside."""
    lines = ["| system | sentiment F1 | XNLI F1 | MT chrF (MT rows) | **score** | **zindi** | mean of three "
             "(zindi) | parameters |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in challenge.items():
        lines.append(f"| {name} | {fmt(c['sentiment_f1'], digits=4)} | {fmt(c['nli_f1'], digits=4)} | "
                     f"{fmt(c['mt_chrf'], digits=4)} ({c['mt_rows']}) | **{fmt(c['score'], digits=4)}** | "
                     f"**{fmt(c['zindi'], digits=4)}** | {fmt(c['mean_of_three'], digits=4)} "
                     f"({fmt(c['mean_of_three_zindi'], digits=4)}) | {c['params']:,} |")
    lines += ["", ("score: the organisers' scorer, every per-sentence chrF (0-1) and the sentiment and XNLI macro "
                   "F1s (Swahili and Hausa pooled) averaged as one list; zindi = (score + (1 - params/421,939,200) x "
                   "score) / 2. mean of three: (sentiment F1 + XNLI F1 + mean chrF) / 3, as the public write-ups "
                   "describe it. Baselines are scored at the model's parameter count.")]
    return "\n".join(lines) + "\n"


def predictions_csv(records: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PREDICTION_FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for r in records:
        writer.writerow({**r, "loglikelihoods": json.dumps(r.get("loglikelihoods")) if r.get("loglikelihoods") else ""})
    return buffer.getvalue()


def markdown(results: dict) -> str:
    lines = ["| task | lang | n | metric | model: likelihood | model: greedy | baseline | baseline is | "
             "val loss | bits/byte |", "|" + "---|" * 10]
    for key, r in results["subsets"].items():
        task, lang = key.split("/")
        if r["metric"] == "chrF":
            greedy = f"{fmt(r.get('greedy'), digits=1)} (BLEU {fmt(r.get('bleu'), digits=1)})" if "greedy" in r else ""
            base = f"{r['baseline']:.1f} (BLEU {r['baseline_bleu']:.1f})"
        else:
            greedy = fmt(r.get("greedy")) + (f" ({r['greedy_invalid']} off-list)" if "greedy" in r else "")
            base = fmt(r["baseline"])
        lines.append(f"| {task} | {lang} | {r['n']} | {r['metric']} | {fmt(r.get('likelihood'))} | {greedy} | {base} | "
                     f"{r['baseline_name']} | {fmt(r.get('val_loss'))} | {fmt(r.get('val_bpb'))} |")
    scored = [(k, r) for k, r in results["subsets"].items() if "likelihood_by_scoring" in r]
    if scored:
        lines += ["", "Weighted F1 by likelihood, per way of turning option scores into a choice (lillm/evaluate.py):",
                  "", "| task | lang | " + " | ".join(SCORINGS) + " |", "|---|---|" + "---:|" * len(SCORINGS)]
        for key, r in scored:
            lines.append(f"| {' | '.join(key.split('/'))} | "
                         + " | ".join(fmt(r["likelihood_by_scoring"][m]) for m in SCORINGS) + " |")
    s = results["summary"]
    lines += ["", f"parameters: {s['params']:,}; lillm's own summary, the mean over the six subsets of weighted F1 "
              f"and corpus chrF / 100: model {fmt(s['model_average'], digits=4)}, baseline "
              f"{fmt(s['baseline_average'], digits=4)}; {s['seconds']} s"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--score-submission", default=None, metavar="CSV",
                        help="only score a submission file (ID, Response, Targets) with the challenge's metric")
    parser.add_argument("--checkpoint", default="out/sft_run", help="checkpoint folder, or run folder (latest step)")
    parser.add_argument("--data", default="out/sft", help="folder with <split>.jsonl (and train.jsonl for baselines)")
    parser.add_argument("--split", default="test", choices=["train", "dev", "test"])
    parser.add_argument("--tasks", nargs="+", default=None, help="only these tasks (default: all in the split)")
    parser.add_argument("--limit", type=number(0, rule="must be 0 (all) or more"), default=100, help="rows per task and language (0 = all)")
    parser.add_argument("--no-greedy", action="store_true", help="skip generation (likelihood scoring only)")
    parser.add_argument("--scoring", choices=SCORINGS, default="batch-prior",
                        help="how option log-likelihoods become a class (lillm/evaluate.py); all are reported")
    parser.add_argument("--no-repeat-ngram", type=number(0, rule="must be 0 (off) or more"), default=0,
                        help="translations never repeat an n-gram of their own (0 = off; lillm/generate.py)")
    parser.add_argument("--beam", type=number(1, rule="must be at least 1 (1 = greedy)"), default=1, help="beam search width for translations (1 = greedy)")
    parser.add_argument("--copy-bias", type=number(0, kind=float), default=0.0,
                        help="added to the logits of a translation's source tokens, so names and numbers pass over "
                             "(0 = off; greedy decoding only)")
    parser.add_argument("--length-ratio", type=number(0, kind=float, above=True), default=None,
                        help="a translation stops after this many times its source's tokens, + 4 (default: off)")
    parser.add_argument("--max-new-tokens", type=number(1), default=128, help="longest generated translation")
    parser.add_argument("--batch-size", type=number(1), default=16)
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="folder for eval_<split>.json/.md (default: the checkpoint)")
    args = parser.parse_args(argv)
    if args.copy_bias and args.beam > 1:
        raise FlagError(f"--copy-bias {args.copy_bias} works with greedy decoding, not --beam {args.beam}: "
                        "leave out one of them")
    if args.score_submission:
        path = Path(args.score_submission)
        if not path.is_file():
            raise InputFileError(f"--score-submission {path}: no such file; give the submission CSV")
        scores = score_submission(read_text(path), str(path))
        print(challenge_table({f"{path.name}": scores}))
        return scores
    check_device(args.device)

    folder = ckpt.resolve_checkpoint(args.checkpoint)
    out, split = Path(args.out) if args.out else folder, args.split
    outputs = [out / f"{name}_{split}.{ext}" for name, ext in OUTPUT_FILES]
    check_writable(outputs)  # before the (long) evaluation, so a refusal costs nothing
    model = ckpt.load_model(folder, device=args.device).eval()
    tokenizer = Tokenizer.from_file(args.tokenizer or folder / "tokenizer.json")
    data = Path(args.data)
    rows, _ = read_conversations(data / f"{args.split}.jsonl", tasks=args.tasks, require_tasks=True)
    train_rows = []
    if args.split != "train" and (data / "train.jsonl").is_file():
        train_rows, _ = read_conversations(data / "train.jsonl", tasks=args.tasks)
    train_groups = group_rows(train_rows, None)
    groups = group_rows(rows, args.limit or None)
    if not groups:
        raise SFTDataError(f"{data / (args.split + '.jsonl')} has no rows for tasks {args.tasks or 'all'}; "
                           "check --tasks and --split")

    start, params = time.perf_counter(), model.num_params()
    subsets, records = evaluate_on_tasks(model, tokenizer, groups, train_groups, not args.no_greedy, args.scoring,
                                         args.batch_size, args.max_new_tokens, progress=True,
                                         no_repeat_ngram=args.no_repeat_ngram, length_ratio=args.length_ratio,
                                         beam=args.beam, copy_bias=args.copy_bias)
    for (task, lang), group in groups.items():
        subsets[f"{task}/{lang}"].update(loss_and_bpb(model, tokenizer, group, model.config.max_seq_len,
                                                      args.batch_size))
        subsets[f"{task}/{lang}"].pop("rows")
    results = {"checkpoint": str(folder), "split": args.split, "limit": args.limit, "scoring": args.scoring,
               "no_repeat_ngram": args.no_repeat_ngram, "length_ratio": args.length_ratio, "beam": args.beam, "copy_bias": args.copy_bias,
               "subsets": subsets,
               "challenge": challenge_summary(records, subsets, params, args.scoring, not args.no_greedy)}
    scores = {tuple(k.split("/")): subset_score(r) for k, r in subsets.items()}
    base = {tuple(k.split("/")): r["baseline"] / (100 if r["metric"] == "chrF" else 1) for k, r in subsets.items()}
    results["summary"] = {"params": params, "model_average": challenge_average({k: v for k, v in scores.items()
                                                                                if v is not None}),
                          "baseline_average": challenge_average(base), "seconds": round(time.perf_counter() - start, 1)}
    table = (f"## The challenge's score ({args.split}, {args.limit or 'all'} rows per task and language; "
             f"classification by likelihood, {args.scoring} scoring)\n\n"
             + challenge_table(results["challenge"]) + "\n## Detail\n\n" + markdown(results))
    texts = [json.dumps(results, indent=2, ensure_ascii=False) + "\n", table, predictions_csv(records),
             jsonl_text(records),
             submission_csv(submission_rows(records, params))]
    written = write_reports(dict(zip(outputs, texts)))
    print(table)
    print("written: " + ", ".join(str(p) for p in written))
    return results


if __name__ == "__main__":
    run_main(main)
