"""Evaluate a checkpoint on the SFT tasks: the challenge's score, a detail table, every prediction.

    python scripts/evaluate.py --checkpoint out/sft_run --data out/sft --limit 100
    python scripts/evaluate.py --checkpoint out/sft_run --tasks sentiment nli --no-greedy
    python scripts/evaluate.py --score-submission out/sft_run/submission_test.csv

The headline is the Buzuzu-Mavi challenge's own metric (lillm/challenge.py): pooled macro F1 for
sentiment and XNLI by option likelihood, the mean per-sentence chrF for MT, their mean (the task
score) and the zindi score for the model's size, beside the same numbers for the baselines. Into
--out (default: the checkpoint) go eval_<split>.md/.json, predictions_<split>.csv/.jsonl (id, task,
language, input, target, prediction by likelihood, by greedy generation, the row's chrF) and
submission_<split>.csv in the challenge's layout (ID, Response, Targets), which
--score-submission (or any other scorer) turns back into the same numbers. A file of the same name
that lillm did not write is never replaced (lillm/outputs.py).

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
from tqdm import tqdm

from lillm import checkpoint as ckpt
from lillm.challenge import (CHALLENGE_SUBSETS, challenge_average, challenge_from_records, prediction_records,
                             score_submission, submission_csv, submission_rows, subset_score, zindi_score)
from lillm.cli import ArgumentParser, check_device, number, run_main
from lillm.errors import InputFileError, SFTDataError
from lillm.evaluate import evaluate_subset
from lillm.outputs import check_writable, write_outputs
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
    """The headline: the challenge's numbers for the model and the baselines."""
    lines = ["| system | sentiment F1 | XNLI F1 | MT chrF | task score | parameters | zindi |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, c in challenge.items():
        lines.append(f"| {name} | {fmt(c['sentiment_f1'], digits=4)} | {fmt(c['nli_f1'], digits=4)} | "
                     f"{fmt(c['mt_chrf'], digits=4)} | {fmt(c['task_score'], digits=4)} | {c['params']:,} | "
                     f"{fmt(c['zindi'], digits=4)} |")
    model = next(iter(challenge.values()))
    lines += ["", ("The challenge's metric: sentiment and XNLI macro F1 (Swahili and Hausa pooled), MT mean "
                   "per-sentence chrF (0-1), task score = their mean, zindi = (task + (1 - params/421,939,200) x "
                   "task) / 2; baselines are scored at the model's parameter count.")]
    if model["starter_average"] is not None:
        lines.append(f"The starter script's own averaging (per-sentence chrFs and the two F1s in one list): "
                     f"{model['starter_average']:.4f}, zindi {model['starter_zindi']:.4f}.")
    return "\n".join(lines) + "\n"


def baseline_records(records: list[dict], results: dict) -> list[dict]:
    """The records as the baselines would answer: the train majority class, or the English source copied."""
    baseline = []
    for r in records:
        subset = results["subsets"][f"{r['task']}/{r['lang']}"]
        answer = {"likelihood": subset.get("majority"), "greedy_label": subset.get("majority"),
                  "greedy": subset.get("majority")}
        if subset["metric"] == "chrF":
            answer = {"likelihood": None, "greedy_label": None, "greedy": r["input"]}
        baseline.append({**r, **answer})
    return baseline


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
    s = results["summary"]
    lines += ["", f"parameters: {s['params']:,}"]
    needed = ", ".join("/".join(k) for k in CHALLENGE_SUBSETS)
    lines.append(f"challenge average (6 subsets, F1 and chrF/100): baseline {fmt(s['baseline_average'], digits=4)}")
    for method in ("likelihood", "greedy"):
        if s[f"model_average_{method}"] is None:
            lines.append(f"model, classification by {method}: no average (needs {needed}, and generation)")
            continue
        lines.append(f"model, classification by {method}: average {s[f'model_average_{method}']:.4f}, "
                     f"zindi score {s[f'zindi_score_{method}']:.4f}")
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
    parser.add_argument("--max-new-tokens", type=number(1), default=128, help="longest generated translation")
    parser.add_argument("--batch-size", type=number(1), default=16)
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="folder for eval_<split>.json/.md (default: the checkpoint)")
    args = parser.parse_args(argv)
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

    start, results = time.perf_counter(), {"checkpoint": str(folder), "split": args.split, "limit": args.limit,
                                           "subsets": {}}
    records: list[dict] = []
    for (task, lang), group in tqdm(groups.items(), desc="subsets"):
        result = evaluate_subset(model, tokenizer, group, train_groups.get((task, lang)), not args.no_greedy,
                                 args.batch_size, args.max_new_tokens)
        result.update(loss_and_bpb(model, tokenizer, group, model.config.max_seq_len, args.batch_size))
        records += prediction_records(task, lang, group, result)
        result.pop("rows")
        results["subsets"][f"{task}/{lang}"] = result
    params, summary = model.num_params(), {}
    results["challenge"] = {"model, by likelihood": challenge_from_records(records, params, "likelihood")}
    if not args.no_greedy:
        results["challenge"]["model, by greedy answers"] = challenge_from_records(records, params, "greedy")
    results["challenge"]["baseline: train majority, copy the source"] = challenge_from_records(
        baseline_records(records, results), params, "likelihood")
    for method in ("likelihood", "greedy"):
        scores = {tuple(k.split("/")): subset_score(r, method) for k, r in results["subsets"].items()}
        average = challenge_average({k: v for k, v in scores.items() if v is not None})
        summary[f"model_average_{method}"] = average
        summary[f"zindi_score_{method}"] = None if average is None else zindi_score(average, params)
    base = {tuple(k.split("/")): r["baseline"] / (100 if r["metric"] == "chrF" else 1)
            for k, r in results["subsets"].items()}
    results["summary"] = {"params": params, **summary, "baseline_average": challenge_average(base),
                          "seconds": round(time.perf_counter() - start, 1)}
    table = (f"## The challenge's score ({args.split}, {args.limit or 'all'} rows per task and language)\n\n"
             + challenge_table(results["challenge"]) + "\n## Detail\n\n" + markdown(results))
    texts = [json.dumps(results, indent=2, ensure_ascii=False) + "\n", table, predictions_csv(records),
             jsonl_text(records),
             submission_csv(submission_rows(records, params))]
    written = write_outputs(dict(zip(outputs, texts)))
    print(table)
    print("written: " + ", ".join(str(p) for p in written))
    return results


if __name__ == "__main__":
    run_main(main)
