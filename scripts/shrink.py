"""Shrink a model for target languages: vocabulary, width, depth, tying, healing, with a report.

    python scripts/shrink.py --source path/to/InkubaLM-0.4B --out out/shrunk --langs swa hau \\
        --vocab 8064 --d-model 1024 --d-ff 2816 --layers 8 --layer-choice influence \\
        --importance activation --tie mean --heal-steps 2000 --distill

The Buzuzu-Mavi road (InkubaLM-0.4B, 421,939,200 parameters, to about 50M), done right:
1. vocabulary: keep the tokens the languages use, closed under merges (lillm.vocab_shrink);
2. width: one index set per dimension, chosen by importance (lillm.prune, lillm.importance);
3. depth: the first N layers or the N most influential (ShortGPT block influence);
4. tying: one matrix for input and output embeddings (input rows, output rows or their mean);
5. healing: the shared training loop, optionally distilling from the unshrunk model.
--source is a Llama-format folder (InkubaLM: shared MLP detected) or a lillm checkpoint or run
folder. Text for counting, calibration and healing is the languages' train split; the report's
val loss and bits per byte are on their dev split, measured after every step. The output folder
is a checkpoint (config.json, model.safetensors, tokenizer.json) with shrink_report.md/.json.
"""
from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np


from lillm import checkpoint as ckpt
from lillm.cli import (ArgumentParser, accumulation_steps, add_training_args, check_training_args, number,
                       run_main, train_config_from_args)
from lillm.config import INKUBA_PARAMS
from lillm.corpora import documents_for
from lillm.bin_format import token_dtype
from lillm.data import BinLoader, StepBatches
from lillm.distill import distillation_loss
from lillm.errors import InputFileError
from lillm.folders import check_output, check_run_folder, mark, write_file_atomic, write_text_atomic
from lillm.hf import import_llama
from lillm.importance import (activation_importance, block_influence, random_importance, top_layers,
                              weight_importance)
from lillm.prune import drop_layers, first_n, prune_to_shape, tie_embeddings
from lillm.spm import load_tokenizer, save_tokenizer
from lillm.tokenizer import Tokenizer, fertility_report
from lillm.loss import causal_lm_loss
from lillm.perplexity import evaluate_windows, token_windows
from lillm.train import setup_distributed, train
from lillm.vocab_shrink import OldIdTeacher, shrink_model_vocab, shrink_tokenizer, token_counts

KINDS = ("mono", "news", "sentiment", "mt")  # not 'ner': MasakhaNER sentences repeat Lacuna text


@dataclass
class HealRun:
    """What a healing checkpoint records of its stage (TrainConfig.settings)."""
    distill: bool
    source: str  # the model that was shrunk


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="out/pretrain", help="Llama-format folder, lillm checkpoint or run folder")
    p.add_argument("--langs", nargs="+", default=["swa", "hau"], help="target languages (lillm.corpora)")
    p.add_argument("--data-dir", default=None, help="data directory (default: $LILLM_DATA_DIR or ../shared/data)")
    p.add_argument("--max-docs", type=number(1), default=None, help="train documents per language (default: all)")
    p.add_argument("--vocab", type=number(1), default=None, help="target vocabulary size (default: keep)")
    p.add_argument("--min-count", type=number(1), default=1, help="keep only tokens seen this often in the train text")
    p.add_argument("--d-model", type=number(1), default=None, help="hidden size (default: keep)")
    p.add_argument("--d-ff", type=number(1), default=None, help="FFN size (default: keep)")
    heads = p.add_mutually_exclusive_group()
    heads.add_argument("--n-heads", type=number(1), default=None, help="query heads to keep (whole kv groups)")
    heads.add_argument("--head-dim", type=number(1), default=None, help="channels per head to keep (RoPE pairs strided)")
    heads.add_argument("--whole-heads", action=argparse.BooleanOptionalAction, default=True,
                       help="when only --d-model shrinks: drop heads in proportion (default) or shrink head_dim")
    p.add_argument("--layers", type=number(1), default=None, help="layers to keep (default: all)")
    p.add_argument("--layer-choice", choices=["first", "influence"], default="influence")
    p.add_argument("--importance", choices=["activation", "weight", "random"], default="activation")
    p.add_argument("--tie", choices=["input", "output", "mean", "none"], default="mean",
                   help="tie untied embeddings from the input rows, the output rows or their mean")
    p.add_argument("--distill", action="store_true", help="heal by distilling from the unshrunk model")
    p.add_argument("--temperature", type=number(0, kind=float, above=True), default=2.0)
    p.add_argument("--alpha", type=number(0, 1, float), default=0.5, help="weight of the KL term in distillation")
    p.add_argument("--seq-len", type=number(1), default=256)
    p.add_argument("--batch", type=number(1), default=16, help="sequences per healing step (all processes)")
    p.add_argument("--calib-batches", type=number(1), default=8, help="calibration batches of --micro-batch sequences")
    p.add_argument("--eval-tokens", type=number(1), default=16384, help="dev tokens per evaluation")
    p.add_argument("--heal-dir", default=None, help="healing run folder (default: <out>.heal)")
    add_training_args(p, out="out/shrunk", max_steps=0, lr=3e-4, warmup_steps=20, eval_every=0, save_every=0)
    p.add_argument("--heal-steps", dest="max_steps", type=number(0, rule="must be 0 (no healing) or more"),
                   help="healing steps (same as --max-steps; 0: no healing)")
    return p.parse_args(argv)


# ---- inputs -------------------------------------------------------------------------------------
def load_source(path: str) -> tuple:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        steps = ckpt.list_checkpoints(folder)
        if not steps:
            raise InputFileError(f"--source {folder} is neither a model folder (config.json) nor a run folder "
                                    "with step_N checkpoints; pass an InkubaLM folder or a lillm checkpoint")
        folder = steps[-1]
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise InputFileError(f"{folder} has neither tokenizer.json nor tokenizer.model; the vocabulary cannot "
                                "be shrunk or measured without the model's tokenizer")
    return folder, import_llama(folder), Tokenizer(tokenizer, str(folder))


def language_texts(langs, split: str, data_dir, max_docs: int | None) -> dict[str, list[str]]:
    return {lang: [doc for _, doc in islice(documents_for([lang], (split,), data_dir=data_dir, kinds=KINDS), max_docs)]
            for lang in langs}


def encode_stream(tokenizer: Tokenizer, texts: list[str]) -> tuple[np.ndarray, float]:
    """Token ids of texts joined as `doc </s> doc </s> ...`, and the stream's UTF-8 bytes per token."""
    eos = tokenizer._require(tokenizer.eos_id, "</s>")
    ids = [np.asarray(encoded + [eos], dtype=np.int64) for encoded in tokenizer.encode_batch(texts)]
    tokens = np.concatenate(ids)
    return tokens, sum(len(t.encode("utf-8")) for t in texts) / len(tokens)


def eval_documents(tokenizer: Tokenizer, dev_text: dict[str, list[str]], max_tokens: int) -> list[str]:
    """The first dev documents of each language worth about max_tokens / languages tokens: fixed
    once, so every step is measured on the same text whatever its tokenizer."""
    chosen = []
    for texts in dev_text.values():
        budget = max_tokens // len(dev_text)
        for text in texts:
            if budget <= 0:
                break
            chosen.append(text)
            budget -= len(tokenizer.encode(text)) + 1
    return chosen


# ---- steps -----------------------------------------------------------------------------------------
def target_shape(cfg, args):
    changes = {k: v for k, v in (("d_model", args.d_model), ("d_ff", args.d_ff)) if v is not None}
    n_heads = args.n_heads
    if args.head_dim is not None:
        changes["head_dim"] = args.head_dim
    elif n_heads is None and args.d_model is not None and args.d_model != cfg.d_model:
        ratio = cfg.d_model / args.d_model
        if args.whole_heads:
            n_heads = int(cfg.n_heads / ratio)
        else:
            changes["head_dim"] = int(cfg.head_dim / ratio)
    if n_heads is not None and n_heads != cfg.n_heads:
        group = cfg.n_heads // cfg.n_kv_heads
        changes.update(n_heads=n_heads, n_kv_heads=max(1, n_heads // group))
    changes.setdefault("head_dim", cfg.head_dim)  # replace() would otherwise recompute it from d_model / n_heads
    return cfg.replace(**changes)


def importance_scores(model, kind: str, calib: list[dict], seed: int) -> dict:
    if kind == "activation":
        return activation_importance(model, calib)
    return weight_importance(model) if kind == "weight" else random_importance(model, seed)


def param_row(model) -> dict:
    counts = model.config.param_counts()
    return {**counts, "zindi_size_factor": round(1 - counts["total"] / INKUBA_PARAMS, 4)}


def render_report(report: dict) -> str:
    lines = [f"# Shrink report: {report['source']} -> {report['out']}", "",
             "| step | vocab | d_model | d_ff | layers | heads x dim | tied | parameters | zindi size factor | "
             "val loss | val bpb |", "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|"]
    for s in report["steps"]:
        c, p = s["config"], s["params"]
        lines.append(f"| {s['step']} | {c['vocab_size']:,} | {c['d_model']} | {c['d_ff']} | {c['n_layers']} | "
                     f"{c['n_heads']}x{c['head_dim']} (kv {c['n_kv_heads']}) | {c['tie_embeddings']} | "
                     f"{p['total']:,} | {p['zindi_size_factor']:.4f} | {s['val_loss']:.4f} | {s['val_bpb']:.4f} |")
    parts = [k for k in report["steps"][0]["params"] if k not in ("total", "zindi_size_factor")]
    lines += ["", "| parameters | " + " | ".join(parts) + " | total |", "|---|" + "---:|" * (len(parts) + 1)]
    for s in (report["steps"][0], report["steps"][-1]):
        cells = " | ".join(f"{s['params'][k]:,}" for k in parts)
        lines.append(f"| {s['step']} | {cells} | {s['params']['total']:,} |")
    lines += ["", "| language | tokens per word before | after | bytes per token before | after |",
              "|---|---:|---:|---:|---:|"]
    for lang, f in report["fertility"].items():
        lines.append(f"| {lang} | {f['before']['tokens_per_word']:.3f} | {f['after']['tokens_per_word']:.3f} | "
                     f"{f['before']['bytes_per_token']:.3f} | {f['after']['bytes_per_token']:.3f} |")
    if report["vocab"]:
        v = report["vocab"]
        lines += ["", f"Vocabulary: {v['source_vocab']:,} -> {v['vocab_size']:,} ids ({v['frequent']:,} frequent tokens, "
                  f"{v['intermediates']:,} intermediates kept for reachability); reachable kept tokens "
                  f"{v['reachability_after']['reachable_fraction']:.2%}; train tokens covered "
                  f"{v['corpus_tokens_kept'] / max(1, v['corpus_tokens']):.2%}."]
    if report["layers_kept"] is not None:
        lines.append(f"Layers kept: {report['layers_kept']}.")
    return "\n".join(lines) + "\n"


class Shrinker:
    """The model and tokenizer as they go through the steps, and the report that follows them."""

    def __init__(self, args, folder, model, tokenizer, train_text: list[str], dev_text: dict[str, list[str]], env):
        self.args, self.env, self.model, self.tokenizer = args, env, model.to(env.device), tokenizer
        self.teacher, self.kept_old_ids = model, None
        self.train_text, self.dev_text = train_text, dev_text
        self.eval_docs = eval_documents(tokenizer, dev_text, args.eval_tokens)
        self.report = {"source": str(folder), "out": args.out, "langs": list(dev_text), "steps": [], "vocab": None,
                       "layers_kept": None, "fertility": {lang: {"before": fertility_report(tokenizer, texts)}
                                                          for lang, texts in dev_text.items()}}

    def measure(self, step: str) -> None:
        tokens, bytes_per_token = encode_stream(self.tokenizer, self.eval_docs)
        result = evaluate_windows(self.model, token_windows(tokens, self.args.seq_len, self.args.micro_batch), bytes_per_token,
                          self.env.device)
        self.report["steps"].append({"step": step, "config": self.model.config.to_dict(),
                                     "params": param_row(self.model), **result})
        print(f"{step}: {self.model.config.num_params():,} parameters, {result}", flush=True)

    def shrink_vocab(self) -> None:
        args = self.args
        if args.vocab is not None or args.min_count > 1:
            counts = token_counts(self.tokenizer, self.train_text)
            shrink = shrink_tokenizer(self.tokenizer, counts, args.vocab, args.min_count)
            self.tokenizer, self.kept_old_ids = Tokenizer(shrink.tokenizer, "<shrunk>"), shrink.kept_old_ids
            self.model = shrink_model_vocab(self.model, self.kept_old_ids)
            self.report["vocab"] = shrink.stats
            self.measure("vocab")
        for lang, texts in self.dev_text.items():
            self.report["fertility"][lang]["after"] = fertility_report(self.tokenizer, texts)
        self.train_tokens, _ = encode_stream(self.tokenizer, self.train_text)

    def prune(self) -> None:
        """Width, then depth, then tying; importance and block influence from the model entering the step."""
        args, cfg = self.args, self.model.config
        calib = token_windows(self.train_tokens, args.seq_len, args.micro_batch, args.calib_batches)
        layers = None
        if args.layers and args.layers != cfg.n_layers:
            layers = (top_layers(block_influence(self.model, calib), args.layers) if args.layer_choice == "influence"
                      else first_n(args.layers))
        target = target_shape(cfg, args)
        if target != cfg:
            scores = importance_scores(self.model, args.importance, calib, args.seed)
            self.model = prune_to_shape(self.model, target, scores)
            self.measure("width")
        if layers is not None:
            self.model = drop_layers(self.model, layers)
            self.report["layers_kept"] = layers
            self.measure("depth")
        if args.tie != "none" and not self.model.config.tie_embeddings:
            self.model = tie_embeddings(self.model, args.tie)
            self.measure("tie")

    def heal(self, heal_dir: Path, tokenizer_path: Path) -> None:
        args = self.args
        dtype = token_dtype(self.model.config.vocab_size)
        bin_path = heal_dir / "train.bin"
        write_file_atomic(bin_path, lambda tmp: self.train_tokens.astype(dtype).tofile(str(tmp)))
        accum = accumulation_steps(args.batch, args.micro_batch, self.env.world)
        loader = BinLoader(bin_path, args.seq_len, args.micro_batch * accum, seed=args.seed, rank=self.env.rank,
                           world_size=self.env.world, device=self.env.device, dtype=dtype)
        loss_fn = causal_lm_loss
        if args.distill:
            teacher = copy.deepcopy(self.teacher) if self.teacher is self.model else self.teacher
            if self.kept_old_ids is not None:  # the teacher reads old ids and is read at the kept ids
                teacher = OldIdTeacher(teacher, self.kept_old_ids)
            loss_fn = distillation_loss(teacher, args.temperature, args.alpha, teacher_token_ids=self.kept_old_ids)
        cfg = train_config_from_args(args, args.seq_len, HealRun(args.distill, self.report["source"]))
        cfg.out_dir = str(heal_dir)
        train(self.model.train(), StepBatches(loader, accum), cfg, self.env, loss_fn=loss_fn,
              tokenizer_path=tokenizer_path, resume=args.resume, info={"stage": "shrink-heal"})
        self.measure("heal (distilled)" if args.distill else "heal")


def check_args(args) -> None:
    """Every flag and both output folders checked before the source is read."""
    check_training_args(args, allow_zero_steps=True)
    source = Path(args.source)
    if not source.exists():
        raise InputFileError(f"--source {source} does not exist, so it is neither a model folder (config.json) nor a "
                             "run folder; pass an InkubaLM folder or a lillm checkpoint")
    check_output(args.out, "checkpoint", overwrite=args.overwrite, reads={"--source": source})
    check_run_folder(heal_folder(args), resume=args.resume, overwrite=args.overwrite, flag="--heal-dir",
                     reads={"--source": source, "--out": args.out})


def heal_folder(args) -> Path:
    return Path(args.heal_dir or f"{args.out}.heal")


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_args(args)
    env = setup_distributed(args.device)
    folder, model, tokenizer = load_source(args.source)
    train_text = language_texts(args.langs, "train", args.data_dir, args.max_docs)
    dev_text = language_texts(args.langs, "dev", args.data_dir, None)
    missing = [f"{lang} {split}" for split, texts in (("train", train_text), ("dev", dev_text))
               for lang in args.langs if not texts[lang]]
    if missing:
        raise InputFileError(f"no text for {missing} in the data directory; check --langs and --data-dir "
                             "(see docs/DATA.md)")
    shrinker = Shrinker(args, folder, model, tokenizer, [t for texts in train_text.values() for t in texts],
                        dev_text, env)
    shrinker.measure("source")
    shrinker.shrink_vocab()
    shrinker.prune()
    out = Path(args.out)
    heal_dir = heal_folder(args)
    check_run_folder(heal_dir, resume=args.resume, overwrite=args.overwrite)
    heal_dir.mkdir(parents=True, exist_ok=True)
    mark(heal_dir, "run")  # lillm's run folder from now on: its tokenizer.json and train.bin are lillm's own
    tokenizer_path = save_tokenizer(shrinker.tokenizer.backend, heal_dir / "tokenizer.json")
    if args.max_steps > 0:
        shrinker.heal(heal_dir, tokenizer_path)
    report = shrinker.report
    ckpt.save_checkpoint(out, shrinker.model.cpu(), tokenizer_path, info={"stage": "shrink", "report": report},
                         overwrite=args.overwrite)
    write_text_atomic(out / "shrink_report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(out / "shrink_report.md", render_report(report))
    print(render_report(report))
    return report


if __name__ == "__main__":
    run_main(main)
