"""Bad input, table-driven: every stage script refuses it with one line, exit status 2, no traceback.

Each case is (script, arguments, exit status, words the message must hold: the path, flag or key,
and the fix). Cases run in-process through the script's main(argv) and lillm.cli.run_main, the
wrapper every script starts with, so the table stays fast; tests/test_safety.py runs a few as real
subprocesses and holds the fault tests (kills, concurrent writers, a user's file).
"""
from __future__ import annotations

import importlib
import json
import random
import shutil

import pytest
import torch

from lillm import checkpoint as ckpt
from lillm.cli import run_main
from lillm.config import get_preset
from lillm.model import Transformer
from lillm.tokenizer import train_bpe

WORDS = ["Watoto", "wanacheza", "mpira", "uwanjani", "kila", "jioni", "Gwamnatin", "jihar", "Kano", "sabon",
         "shirin", "noma", "Mvua", "kubwa", "imenyesha", "jijini", "usiku", "Serikali", "mpango", "afya"]
CUDA = torch.cuda.is_available()


def documents(seed: int, count: int = 300) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + f" {i}" for i in range(count)]


def save_model(folder, tokenizer_path, vocab=320, max_seq_len=64, **config):
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=vocab, max_seq_len=max_seq_len))
    ckpt.save_checkpoint(folder, model, tokenizer_path)
    if config:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every input the table refers to, built once: tokenizers, bins, checkpoints, folders of a user's files."""
    from data import prepare_pretrain

    root = tmp_path_factory.mktemp("bad_input")
    docs = documents(0)
    (root / "corpus.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    train_bpe(docs, vocab_size=320, show_progress=False).save(root / "tokA.json")
    train_bpe(documents(1, 200) + ["Sawubona unjani namhlanje " * 3] * 50, vocab_size=320,
              show_progress=False).save(root / "tokB.json")
    train_bpe(docs, vocab_size=400, min_frequency=1, show_progress=False).save(root / "tokC.json")
    prepare_pretrain.prepare(root / "tokA.json", root / "bins", files=[root / "corpus.txt"], val_fraction=0.05,
                             progress=False)
    prepare_pretrain.prepare(root / "tokA.json", root / "bins_noval", files=[root / "corpus.txt"], val_fraction=0,
                             progress=False)
    shutil.copytree(root / "bins", root / "bins_badvocab")
    meta = json.loads((root / "bins" / "meta.json").read_text())
    (root / "bins_badvocab" / "meta.json").write_text(json.dumps({**meta, "vocab_size": 300}))

    models = root / "models"
    save_model(models / "ckpt", root / "tokA.json")
    save_model(models / "ckpt_tokB", root / "tokB.json")
    save_model(models / "ckpt_bigtok", root / "tokC.json")
    save_model(models / "ckpt_rope", root / "tokA.json", rope_scaling={"rope_type": "linear", "factor": 2.0})
    save_model(models / "ckpt_bias", root / "tokA.json", attention_bias=True)
    save_model(models / "ckpt_gelu", root / "tokA.json", hidden_act="gelu")
    save_model(models / "ckpt_badjson", root / "tokA.json")
    (models / "ckpt_badjson" / "config.json").write_text('{"vocab_size": 320,')
    save_model(models / "ckpt_notok", None)
    save_model(models / "ckpt_cut", root / "tokA.json")
    weights = models / "ckpt_cut" / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])

    save_model(models / "ckpt_swapped", root / "tokA.json")  # then its tokenizer.json replaced, same size
    shutil.copyfile(root / "tokB.json", models / "ckpt_swapped" / "tokenizer.json")
    save_model(models / "ckpt_10m", root / "tokA.json", num_hidden_layers=10_000_000)
    hf_10m = root / "hf_10m"
    shutil.copytree(models / "ckpt_10m", hf_10m)

    rows = root / "rows"  # files whose bytes or structure a reader cannot take
    rows.mkdir()
    chat = {"messages": [{"role": "user", "content": "Watoto?"}, {"role": "assistant", "content": "mpira"}]}
    (rows / "allbad.jsonl").write_bytes(b'{"messages": "\xff"}\n' + b"not json\n")
    (rows / "notobj.jsonl").write_text('{"text": "a"}\n[1, 2]\n"text"\n')
    (rows / "zero.parquet").write_bytes(b"")
    (rows / "disk").mkdir()
    (rows / "disk" / "dataset_info.json").write_text("{")
    (rows / "disk" / "state.json").write_text("{")
    (rows / "sub_byte.csv").write_bytes(b"ID,Response,Targets\nID_size,1000,\xff\n")
    (rows / "sub_twice.csv").write_text("ID,Response,Targets\nID_mt_1,a,b\nID_mt_1,a,b\nID_size,1000,\n")
    (rows / "chat.jsonl").write_text(json.dumps(chat) + "\n")

    hf = root / "hf_randombin"
    hf.mkdir()
    shutil.copyfile(models / "ckpt" / "config.json", hf / "config.json")
    (hf / "pytorch_model.bin").write_bytes(random.Random(0).randbytes(4096))

    sft = root / "sft"
    sft.mkdir()
    row = {"messages": [{"role": "user", "content": "Watoto wanacheza?"},
                        {"role": "assistant", "content": "mpira uwanjani"}], "task": "chat"}
    (sft / "train.jsonl").write_text((json.dumps(row) + "\n") * 8)
    (sft / "stats.json").write_text("{}\n")
    shutil.copytree(sft, root / "sft_copy")

    user = root / "user"
    user.mkdir()
    (user / "thesis.txt").write_text("years of work\n")
    (root / "afile.txt").write_text("not a folder\n")
    (root / "empty").mkdir()
    run = root / "run"
    (run / "step_000002").mkdir(parents=True)
    shutil.copytree(models / "ckpt", run / "step_000002", dirs_exist_ok=True)
    (run / "log.jsonl").write_text('{"step": 1, "tokens": 10, "loss": 5.0}\n')
    paths = {name: str(root / name) for name in ("corpus.txt", "tokA.json", "tokB.json", "bins", "bins_noval",
                                                   "bins_badvocab", "hf_randombin", "sft", "sft_copy", "user", "afile.txt",
                                                   "empty", "run")}
    paths.update({name: str(models / name) for name in ("ckpt", "ckpt_tokB", "ckpt_bigtok", "ckpt_rope",
                                                          "ckpt_bias", "ckpt_gelu", "ckpt_badjson", "ckpt_notok",
                                                          "ckpt_cut", "ckpt_swapped", "ckpt_10m")})
    paths.update(rows=str(rows), hf_10m=str(hf_10m))
    paths.update(tokA=paths["tokA.json"], tokB=paths["tokB.json"], corpus=paths["corpus.txt"], afile=paths["afile.txt"])
    paths.update(models=str(models), missing=str(root / "no_such_thing"), new=str(root / "fresh" / "out"),
                 val_tokens=str(meta["splits"]["val"]["tokens"]), long_prompt=" ".join(WORDS * 20))
    return paths


PRE = "--data {bins} --out {new} --preset tiny --seq-len 16 --global-batch-tokens 64 --micro-batch 4 --eval-every 0 " \
      "--max-steps 2"
SFT = "--init-from {ckpt} --data {sft} --out {new} --max-steps 2 --global-batch 4 --micro-batch 2 --eval-every 0"
INF = "{ckpt} --prompt Watoto --device cpu"

# (script, arguments, exit status, words the one-line message must contain)
CASES = [
    # ---- pretrain.py: numbers
    ("pretrain", PRE + " --seq-len 0", 2, ["--seq-len 0", "at least 1"]),
    ("pretrain", PRE + " --micro-batch 0", 2, ["--micro-batch 0", "at least 1"]),
    ("pretrain", PRE + " --max-steps 0", 2, ["--max-steps 0", "at least 1"]),
    ("pretrain", PRE + " --max-steps -5", 2, ["--max-steps -5"]),
    ("pretrain", PRE + " --eval-every -1", 2, ["--eval-every -1", "0 (never)"]),
    ("pretrain", PRE + " --eval-every 5 --eval-batches 0", 2, ["--eval-batches 0", "--eval-every 0"]),
    ("pretrain", PRE + " --global-batch-tokens 0", 2, ["--global-batch-tokens 0"]),
    ("pretrain", PRE + " --global-batch-tokens 100", 2, ["--global-batch-tokens 100", "multiple of --seq-len", "use 96"]),
    ("pretrain", PRE + " --lr 0", 2, ["--lr 0", "positive"]),
    ("pretrain", PRE + " --warmup-steps -1", 2, ["--warmup-steps -1"]),
    ("pretrain", PRE + " --keep-last -1", 2, ["--keep-last -1"]),
    ("pretrain", PRE + " --log-every 0", 2, ["--log-every 0"]),
    ("pretrain", PRE + " --min-lr-ratio 2", 2, ["--min-lr-ratio 2", "between 0 and 1"]),
    ("pretrain", PRE + " --grad-clip 0", 2, ["--grad-clip 0"]),
    ("pretrain", PRE + " --device banana", 2, ["--device banana", "cpu or cuda"]),
    ("pretrain", PRE + " --micro-batch 3", 2, ["multiple of micro batch", "--micro-batch"]),
    # ---- pretrain.py and sft_train.py: optimizer and schedule (lillm/muon.py, lillm.train.lr_at)
    ("pretrain", PRE + " --optimizer muon --precision bf16-true", 2,
     ["--optimizer muon with --precision bf16-true", "use --precision auto or bf16"]),
    ("sft_train", SFT + " --optimizer muon --peft lora", 2, ["--optimizer muon with --peft lora", "--optimizer adamw"]),
    ("pretrain", PRE + " --muon-lr 0", 2, ["--muon-lr 0", "positive"]),
    ("pretrain", PRE + " --muon-momentum 1", 2, ["--muon-momentum 1", "[0, 1)"]),
    ("pretrain", PRE + " --decay-fraction 0", 2, ["--decay-fraction 0", "(0, 1]"]),
    ("pretrain", PRE + " --schedule wsd --max-steps 10 --warmup-steps 9", 2,
     ["--warmup-steps 9", "before the decay begins (step 8", "lower --warmup-steps or --decay-fraction"]),
    # ---- pretrain.py: files and tokenizers
    ("pretrain", PRE.replace("{bins}", "{missing}"), 2, ["meta.json not found", "prepare_pretrain.py"]),
    ("pretrain", PRE.replace("{bins}", "{bins_noval}") + " --eval-every 5", 2, ["no val split", "--eval-every 0"]),
    ("pretrain", PRE + " --eval-every 5 --seq-len {val_tokens} --global-batch-tokens {val_tokens} --micro-batch 1",
     2, ["val.bin", "fewer than one window", "--seq-len"]),
    ("pretrain", PRE.replace("{bins}", "{bins_badvocab}"), 2, ["meta.json", "vocab_size 300", "prepare_pretrain.py"]),
    ("pretrain", PRE + " --tokenizer {tokB}", 2, ["sha256", "prepare_pretrain.py"]),
    ("pretrain", PRE + " --tokenizer {models}", 2, ["is a folder", "tokenizer.json"]),
    ("pretrain", PRE + " --tokenizer {missing}", 2, ["does not exist", "no_such_thing"]),
    ("pretrain", PRE + " --init-from {ckpt_tokB}", 2, ["--init-from", "sha256", "--allow-tokenizer-change"]),
    ("pretrain", PRE + " --init-from {ckpt} --seq-len 128 --global-batch-tokens 512", 2,
     ["--seq-len 128", "max_position_embeddings 64", "--seq-len 64 or less"]),
    ("pretrain", PRE + " --init-from {missing}", 2, ["no_such_thing", "does not exist"]),
    ("pretrain", PRE + " --init-from {afile}", 2, ["afile.txt", "is a file"]),
    ("pretrain", PRE + " --init-from {empty}", 2, ["empty", "neither a checkpoint folder", "pretrain.py"]),
    ("pretrain", PRE + " --init-from {ckpt_rope}", 2, ["rope_scaling", "plain RoPE"]),
    # ---- pretrain.py: the output folder
    ("pretrain", PRE.replace("{new}", "{user}"), 2, ["--out", "user", "thesis.txt", "choose another --out"]),
    ("pretrain", PRE.replace("{new}", "{run}"), 2, ["--out", "run", "step_000002", "--resume", "--overwrite"]),
    ("pretrain", PRE + " --resume --overwrite", 2, ["--resume", "--overwrite", "pass one"]),
    ("pretrain", PRE.replace("{new}", "{bins_noval}"), 2, ["lillm bins folder", "choose another --out"]),
    ("pretrain", PRE.replace("{new}", "{bins}"), 2, ["--out", "contains --data", "outside it"]),
    ("pretrain", PRE.replace("{new}", "{afile}"), 2, ["afile.txt", "is a file, not a folder"]),
    # ---- sft_train.py
    ("sft_train", SFT + " --global-batch 0", 2, ["--global-batch 0", "at least 1"]),
    ("sft_train", SFT + " --seq-len -5", 2, ["--seq-len -5", "at least 2"]),
    ("sft_train", SFT + " --seq-len 1000", 2, ["--seq-len 1000", "max_seq_len 64", "--seq-len 64 or less"]),
    ("sft_train", SFT + " --tokenizer {tokB}", 2, ["--tokenizer", "tokB.json", "--allow-tokenizer-change"]),
    ("sft_train", SFT.replace("{ckpt}", "{ckpt_bigtok}"), 2, ["400 ids", "vocab_size 320", "tokenizer"]),
    ("sft_train", SFT.replace("{sft}", "{missing}"), 2, ["--data", "train.jsonl not found", "prepare_sft.py"]),
    ("sft_train", SFT + " --global-batch 3", 2, ["global batch (3", "--micro-batch"]),
    ("sft_train", SFT + " --max-steps 0", 2, ["--max-steps 0"]),
    ("sft_train", SFT + " --neftune-alpha -1", 2, ["--neftune-alpha -1"]),
    ("sft_train", SFT.replace("{ckpt}", "{ckpt_gelu}"), 2, ["hidden_act='gelu'", "silu"]),
    ("sft_train", SFT + " --peft lora --lora-rank 0", 2, ["--lora-rank 0"]),
    ("sft_train", SFT + " --max-per-task 0", 2, ["--max-per-task 0"]),
    ("sft_train", SFT.replace("{new}", "{user}"), 2, ["thesis.txt", "choose another --out"]),
    # ---- inference.py
    ("inference", INF + " --max-new-tokens -5", 2, ["--max-new-tokens -5", "at least 1"]),
    ("inference", INF + " --top-p 0", 2, ["--top-p 0", "(0, 1]"]),
    ("inference", INF + " --top-p 1.5", 2, ["--top-p 1.5", "1 turns it off"]),
    ("inference", INF + " --top-k -3", 2, ["--top-k -3", "0 (off)"]),
    ("inference", INF + " --temperature -1", 2, ["--temperature -1", "0 (greedy)"]),
    ("inference", INF + " --max-new-tokens 200", 2, ["context of 64", "lower --max-new-tokens"]),
    ("inference", "{ckpt} --device cpu --prompt {long_prompt}", 2, ["context of 64", "shorten the prompt"]),
    ("inference", "{missing} --prompt x --device cpu", 2, ["no_such_thing", "does not exist"]),
    ("inference", "{afile} --prompt x --device cpu", 2, ["afile.txt", "is a file"]),
    ("inference", INF.replace("{ckpt}", "{ckpt_bias}"), 2, ["config.json", "attention_bias=true", "no bias"]),
    ("inference", INF.replace("{ckpt}", "{ckpt_rope}"), 2, ["rope_scaling", "plain RoPE"]),
    ("inference", INF.replace("{ckpt}", "{ckpt_bigtok}"), 2, ["400 ids", "vocab_size 320"]),
    ("inference", INF.replace("{ckpt}", "{ckpt_badjson}"), 2, ["config.json", "not valid JSON", "earlier one"]),
    ("inference", INF.replace("{ckpt}", "{ckpt_notok}"), 2, ["tokenizer.json is missing", "copy the tokenizer.json"]),
    ("inference", INF.replace("{ckpt}", "{ckpt_cut}"), 2, ["model.safetensors", "corrupt or truncated", "earlier"]),
    ("inference", INF.replace("{ckpt}", "{empty}"), 2, ["neither a checkpoint folder", "import_hf.py"]),
    ("inference", "{ckpt} --prompt x --device banana", 2, ["--device banana"]),
    # ---- train_tokenizer.py
    ("train_tokenizer", "--files {corpus} --vocab-size 10 --out {new}", 2, ["--vocab-size 10"]),
    ("train_tokenizer", "--files {corpus} --holdout-every 0 --out {new}", 2, ["--holdout-every 0", "at least 2"]),
    ("train_tokenizer", "--files {missing} --out {new}", 2, ["--files", "no_such_thing", "does not exist"]),
    ("train_tokenizer", "--files {user} --out {new}", 2, ["--files", "is a folder"]),
    ("train_tokenizer", "--files {corpus} --out {tokA}", 2, ["--out", "tokA.json", "--overwrite"]),
    ("train_tokenizer", "--files {corpus} --out {user}", 2, ["--out", "is a folder", "tokenizer.json"]),
    # ---- data/prepare_pretrain.py and data/prepare_sft.py: the output folder
    ("data.prepare_pretrain", "--tokenizer {tokA} --files {corpus} --out {user}", 2,
     ["--out", "thesis.txt", "choose another --out"]),
    ("data.prepare_pretrain", "--tokenizer {tokA} --files {corpus} --out {bins}", 2,
     ["--out", "bins", "--overwrite"]),
    ("data.prepare_pretrain", "--tokenizer {tokA} --files {corpus} --out {run}", 2, ["lillm run folder"]),
    ("data.prepare_sft", "--tasks none --files {sft}/train.jsonl --out {user}", 2, ["thesis.txt", "another --out"]),
    ("data.prepare_sft", "--tasks none --files {sft}/train.jsonl --out {sft_copy}", 2, ["--out", "sft", "--overwrite"]),
    ("data.prepare_sft", "--tasks none --files {sft}/train.jsonl --out {sft} --overwrite", 2, ["contains --files"]),
    # ---- scripts/export_hf.py and scripts/import_hf.py
    ("scripts.export_hf", "{ckpt} {user}", 2, ["user", "thesis.txt", "choose another out"]),
    ("scripts.export_hf", "{ckpt} {user} --overwrite", 2, ["user", "thesis.txt"]),
    ("scripts.export_hf", "{ckpt} {models}", 2, ["models", "contains the checkpoint", "outside it"]),
    ("scripts.export_hf", "{ckpt} {ckpt}", 2, ["contains the checkpoint"]),
    ("scripts.export_hf", "{missing} {new}", 2, ["no_such_thing", "does not exist"]),
    ("scripts.export_hf", "{ckpt_badjson} {new}", 2, ["config.json", "not valid JSON"]),
    ("scripts.export_hf", "{ckpt_rope} {new}", 2, ["rope_scaling"]),
    ("scripts.import_hf", "{hf_randombin} {new}", 2, ["pytorch_model.bin", "not a PyTorch weights file",
                                                      "safetensors"]),
    ("scripts.import_hf", "{missing} {new}", 2, ["no_such_thing", "does not exist"]),
    ("scripts.import_hf", "{afile} {new}", 2, ["afile.txt", "is a file"]),
    ("scripts.import_hf", "{hf_randombin} {user}", 2, ["thesis.txt", "choose another out"]),
    # ---- scripts/expand_vocab.py, scripts/shrink.py, scripts/evaluate.py
    ("scripts.expand_vocab", "--base {ckpt} --out {user}", 2, ["thesis.txt", "choose another --out"]),
    ("scripts.expand_vocab", "--base {ckpt} --out {models}", 2, ["contains --base", "outside it"]),
    ("scripts.expand_vocab", "--base {ckpt} --out {new} --new-tokens 0", 2, ["--new-tokens 0"]),
    ("scripts.expand_vocab", "--base {ckpt} --out {new} --holdout-every 1", 2, ["--holdout-every 1", "at least 2"]),
    ("scripts.shrink", "--source {missing} --out {new}", 2, ["--source", "no_such_thing", "does not exist"]),
    ("scripts.shrink", "--source {ckpt} --out {user}", 2, ["thesis.txt", "choose another --out"]),
    ("scripts.shrink", "--source {ckpt} --out {models}", 2, ["contains --source"]),
    ("scripts.shrink", "--source {ckpt} --out {new} --seq-len 0", 2, ["--seq-len 0"]),
    ("scripts.shrink", "--source {ckpt} --out {new} --heal-steps -1", 2, ["--heal-steps (--max-steps) -1", "0 (no healing)"]),
    ("scripts.evaluate", "--checkpoint {ckpt} --data {sft} --batch-size 0 --device cpu", 2, ["--batch-size 0"]),
    ("scripts.evaluate", "--checkpoint {ckpt} --data {sft} --device cpu --out {corpus}", 2, ["corpus.txt", "is a file"]),
    # ---- every writer through lillm/folders.py: what it reads is never its output
    ("sft_train", SFT.replace("{ckpt}", "{run}/step_000002").replace("{new}", "{run}") + " --overwrite", 2,
     ["contains --init-from", "outside it"]),
    ("train_tokenizer", "--files {corpus} --out {corpus} --overwrite", 2, ["--out", "contains --files"]),
    ("train_tokenizer", "--files {corpus} --out {ckpt}/tokenizer.json --overwrite", 2,
     ["inside a lillm checkpoint folder", "outside it"]),
    ("data.prepare_dpo", "--files {sft}/train.jsonl --out {user}", 2, ["thesis.txt", "choose another --out"]),
    ("data.prepare_dpo", "--sft-data {sft} --out {sft} --overwrite", 2, ["contains --sft-data"]),
    ("data.prepare_dpo", "--files {sft}/train.jsonl --out {bins} --overwrite", 2, ["lillm bins folder"]),
    ("data.prepare_dpo", "--out {new}", 2, ["nothing to build from", "--sft-data", "--files"]),
    ("data.prepare_dpo", "--files {missing}.jsonl --out {new}", 2, ["no_such_thing", "does not exist"]),
    ("scripts.export_gguf", "{ckpt} {ckpt}/model.safetensors --overwrite", 2, ["inside the checkpoint", "outside it"]),
    ("scripts.export_gguf", "{ckpt} {user}/thesis.txt --overwrite", 2, ["thesis.txt", "not a GGUF file"]),
    ("scripts.export_gguf", "{ckpt} {user}", 2, ["is a folder", "GGUF file"]),
    ("scripts.export_gguf", "{missing} {new}.gguf", 2, ["no_such_thing"]),
    ("scripts.prune_experiment", "--teacher {ckpt} --data {bins} --out {user}", 2, ["thesis.txt", "another --out"]),
    # ---- numbers that make no sense, and usage mistakes: one line (lillm.cli.ArgumentParser)
    ("data.prepare_pretrain", "--tokenizer {tokA} --files {corpus} --out {new} --workers -2", 2,
     ["--workers -2", "at least 1"]),
    ("data.prepare_pretrain", "--tokenizer {tokA} --files {corpus} --out {new} --val-fraction 1", 2,
     ["--val-fraction 1.0", "[0, 1)"]),
    ("data.prepare_pretrain", "--tokenizer {tokA} --files {corpus} --out {new} --workers two", 2,
     ["--workers", "invalid int value", "--help"]),
    ("dpo_train", "--init-from {ckpt} --data {sft} --out {new} --loss simpo --gamma -1", 2, ["--gamma -1.0", "0 or more"]),
    ("dpo_train", "--init-from {ckpt} --data {sft} --out {new} --beta 0", 2, ["--beta 0.0", "positive"]),
    ("inference", INF + " --port 70000", 2, ["--port 70000", "65535"]),
    ("inference", INF + " --temperature nan", 2, ["--temperature nan"]),
    ("scripts.evaluate", "--checkpoint {ckpt} --split banana", 2, ["--split", "invalid choice", "--help"]),
    ("scripts.import_hf", "", 2, ["required", "src"]),
    ("scripts.prune_experiment", "--teacher {ckpt} --data {bins} --out {bins} --overwrite", 2, ["contains --data"]),
    ("scripts.evaluate", "--checkpoint {missing} --data {sft} --device cpu", 2, ["no_such_thing", "does not exist"]),
]
CASES += [
    # ---- a checkpoint's tokenizer.json replaced by another of the same size: its recorded hash, on every load
    *[(script, template, 2, ["ckpt_swapped/tokenizer.json", "is not the tokenizer", "was saved with", "back"])
      for script, template in (("inference", INF.replace("{ckpt}", "{ckpt_swapped}")),
                               ("sft_train", SFT.replace("{ckpt}", "{ckpt_swapped}")),
                               ("scripts.evaluate", "--checkpoint {ckpt_swapped} --data {sft} --device cpu"),
                               ("scripts.export_gguf", "{ckpt_swapped} {new}.gguf"),
                               ("scripts.export_hf", "{ckpt_swapped} {new}"),
                               ("scripts.expand_vocab", "--base {ckpt_swapped} --out {new}"))],
    # ---- sizes a config.json asks for, against the weights, before anything is built
    ("scripts.import_hf", "{hf_10m} {new}", 2, ["num_hidden_layers=10000000", "hold 2 layers"]),
    ("inference", INF.replace("{ckpt}", "{ckpt_10m}"), 2, ["num_hidden_layers=10000000", "hold 2 layers"]),
    # ---- readers: a bad byte, a line that is not an object, an empty or damaged file
    ("data.prepare_sft", "--tasks none --files {rows}/allbad.jsonl --out {new}", 2,
     ["every row of --files", "skipped", "fix those rows"]),
    ("data.prepare_sft", "--tasks none --files {rows}/notobj.jsonl --prompt-column text --response-column text "
     "--out {new}", 2, ["notobj.jsonl, row", "cannot be read as json"]),
    ("data.prepare_pretrain", "--tokenizer {tokA} --files {rows}/notobj.jsonl --out {new} --workers 1", 2,
     ["notobj.jsonl, line 2", "not an object with named columns"]),
    ("data.prepare_pretrain", "--tokenizer {tokA} --files {rows}/zero.parquet --out {new} --workers 1", 2,
     ["zero.parquet", "cannot be read as parquet"]),
    ("data.prepare_pretrain", "--tokenizer {tokA} --files {rows}/disk --out {new} --workers 1", 2,
     ["disk", "cannot be read"]),
    ("data.prepare_dpo", "--files {rows}/zero.parquet --out {new}", 2, ["zero.parquet", "cannot be read as parquet"]),
    ("scripts.evaluate", "--score-submission {rows}/sub_byte.csv", 2, ["sub_byte.csv, line 2", "not UTF-8"]),
    ("scripts.evaluate", "--score-submission {rows}/sub_twice.csv", 2, ["line 3", "ID_mt_1 repeats line 2"]),
    # ---- --tasks that no row has is unknown, not "no usable row"
    ("sft_train", SFT + " --tasks chatt", 2, ["unknown task(s) ['chatt']", "'chat'", "spelling"]),
    ("scripts.evaluate", "--checkpoint {ckpt} --data {sft} --split train --tasks chatt --device cpu", 2,
     ["unknown task(s) ['chatt']"]),
]
if not CUDA:  # on a machine with a GPU these are not bad input
    CASES += [("pretrain", PRE + " --device cuda", 2, ["--device cuda", "--device cpu"]),
              ("inference", "{ckpt} --prompt x --device cuda", 2, ["--device cuda", "CUDA", "--device cpu"])]


def run(capsys, script: str, argv: list[str]) -> tuple[int, str]:
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info:
        run_main(module.main, argv)
    return exit_info.value.code, capsys.readouterr().err


def expand(template: str, world: dict) -> list[str]:
    # the long prompt is one argument; every other placeholder is a single word
    argv = []
    for word in template.split():
        argv.append(word.format(**world))
    return argv


@pytest.mark.parametrize("script, template, status, words", CASES,
                         ids=[f"{c[0]}:{c[1].split(' ', 8)[-1][-40:]}:{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_refused_with_one_line(world, capsys, script, template, status, words):
    code, err = run(capsys, script, expand(template, world))
    assert code == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word.format(**world) in lines[0], f"{word!r} not in {lines[0]!r}"
    assert "Traceback" not in err


def test_there_are_at_least_sixty_cases():
    assert len(CASES) >= 60


# ---- one numbers check: every numeric flag of every script declares its range (lillm.cli.number) ---------
SCRIPTS = ["pretrain", "sft_train", "dpo_train", "inference", "train_tokenizer", "data.prepare_pretrain",
           "data.prepare_sft", "data.prepare_dpo", "scripts.evaluate", "scripts.expand_vocab", "scripts.export_gguf",
           "scripts.export_hf", "scripts.import_hf", "scripts.prune_experiment", "scripts.shrink"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_number_flag_declares_its_range_and_usage_mistakes_are_one_line(script, monkeypatch, capsys):
    from lillm import cli

    parsers = []

    def capture(self, args=None, namespace=None):
        parsers.append(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.ArgumentParser, "parse_args", capture)
    with pytest.raises(KeyboardInterrupt):
        importlib.import_module(script).main([])
    parser = parsers[0]
    plain = [a.option_strings[-1] for a in parser._actions if a.type in (int, float)]
    assert not plain, f"{script}: numeric flags without a declared range (lillm.cli.number): {plain}"
    monkeypatch.undo()
    code, err = run(capsys, script, ["a", "b", "--no-such-flag"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--no-such-flag" in err and "--help" in err, err


def test_the_servers_own_flags_are_refused_in_one_line_before_the_model_loads(world, capsys):
    import socket

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    try:
        port = str(held.getsockname()[1])
        for extra, words in ((["--port", port], [f"--port {port}", "already in use", "--port 0"]),
                             (["--host", "no-such-host.invalid"], ["--host no-such-host.invalid", "cannot be resolved"]),
                             (["--port", "-1"], ["--port -1", "65535"])):
            code, err = run(capsys, "inference", [world["ckpt"], "--serve", "--device", "cpu", *extra])
            assert code == 2 and len(err.strip().splitlines()) == 1, err
            assert all(word in err for word in words), err
    finally:
        held.close()
