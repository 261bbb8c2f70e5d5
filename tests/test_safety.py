"""Nothing a user has is ever lost: kills during saves, pruning and tokenizing, two writers on one run,
a user's file in an output folder, and how a refusal looks from a real shell (lillm/folders.py, run_main)."""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lillm import checkpoint as ckpt
from lillm import folders
from lillm.cli import run_main
from lillm.config import get_preset
from lillm.bin_format import check_bins, load_meta
from lillm.errors import MissingMetaError, OutputFolderError, RunLockedError
from lillm.model import Transformer
from lillm.tokenizer import train_bpe
from lillm.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def tiny(vocab=53, seed=0):
    torch.manual_seed(seed)
    return Transformer(get_preset("tiny", vocab_size=vocab, max_seq_len=32))


class RandomTokens:
    def __init__(self, seed=0):
        self.gen = torch.Generator().manual_seed(seed)

    def next_step(self):
        x = torch.randint(0, 53, (2, 17), generator=self.gen)
        return [{"input_ids": x[:, :-1], "labels": x[:, 1:]}]

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])


def config(out, **kw):
    return TrainConfig(out_dir=str(out), **{"max_steps": 4, "save_every": 2, "eval_every": 0, "log_every": 1,
                                            "warmup_steps": 1, **kw})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_every_listed_checkpoint_is_complete(run: Path, with_train_state: bool = True) -> None:
    for step in ckpt.list_checkpoints(run):
        ckpt.load_model(step)
        if with_train_state:
            ckpt.load_train_state(step)
        json.loads((step / "lillm.json").read_text())


# ---- a user's files --------------------------------------------------------------------------------
def test_out_at_a_folder_with_a_users_file_leaves_it_byte_for_byte(tmp_path, capsys):
    from scripts import export_hf

    ckpt.save_checkpoint(tmp_path / "ckpt", tiny())
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.md").write_bytes(b"\x00\xffyears of work\n")
    (user / "sub").mkdir()
    (user / "sub" / "data.csv").write_text("a,b\n1,2\n")
    before = snapshot(user)
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as exit_info:
            run_main(export_hf.main, [str(tmp_path / "ckpt"), str(user), *extra])
        assert exit_info.value.code == 2
        assert "notes.md" in capsys.readouterr().err
        assert snapshot(user) == before and sorted(p.name for p in user.iterdir()) == ["notes.md", "sub"]


def test_exporting_into_an_ancestor_of_the_source_is_refused_and_the_source_is_kept(tmp_path):
    from scripts import export_hf

    ckpt.save_checkpoint(tmp_path / "runs" / "ckpt", tiny())
    before = snapshot(tmp_path / "runs")
    with pytest.raises(SystemExit):
        run_main(export_hf.main, [str(tmp_path / "runs" / "ckpt"), str(tmp_path / "runs"), "--overwrite"])
    assert snapshot(tmp_path / "runs") == before


def test_overwrite_replaces_a_lillm_checkpoint_but_never_one_holding_a_users_file(tmp_path):
    ckpt.save_checkpoint(tmp_path / "c", tiny(seed=0))
    with pytest.raises(OutputFolderError, match="--overwrite"):
        ckpt.save_checkpoint(tmp_path / "c", tiny(seed=1))
    ckpt.save_checkpoint(tmp_path / "c", tiny(seed=1), overwrite=True)
    assert torch.equal(ckpt.load_model(tmp_path / "c").model.embed_tokens.weight, tiny(seed=1).model.embed_tokens.weight)
    (tmp_path / "c" / "my_notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="my_notes.txt"):
        ckpt.save_checkpoint(tmp_path / "c", tiny(seed=2), overwrite=True)
    assert (tmp_path / "c" / "my_notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden leftovers


# ---- runs: a new run never mixes with an old one ---------------------------------------------------
def test_a_new_run_into_an_old_one_is_refused_and_overwrite_removes_only_the_runs_own_files(tmp_path):
    run = tmp_path / "run"
    train(tiny(), RandomTokens(), config(run))
    (run / "notes.txt").write_text("my notes")
    with pytest.raises(OutputFolderError, match=r"step_000004.*--resume.*--overwrite"):
        train(tiny(), RandomTokens(seed=1), config(run))
    train(tiny(seed=3), RandomTokens(seed=1), config(run, max_steps=2, overwrite=True))
    assert (run / "notes.txt").read_text() == "my notes"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_000002"]
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert not (run / folders.LOCK).exists()  # released at the end


def test_a_run_folder_of_someone_elses_files_is_refused(tmp_path):
    (tmp_path / "paper.tex").write_text("x")
    with pytest.raises(OutputFolderError, match="paper.tex"):
        train(tiny(), RandomTokens(), config(tmp_path, overwrite=True))
    assert [p.name for p in tmp_path.iterdir()] == ["paper.tex"]


def test_a_truncated_last_log_line_does_not_stop_resume(tmp_path, capsys):
    train(tiny(), RandomTokens(), config(tmp_path / "run", max_steps=4, save_every=2))
    with open(tmp_path / "run" / "log.jsonl", "a") as f:
        f.write('{"step": 5, "tok')  # what a kill in the middle of a write leaves
    train(tiny(), RandomTokens(), config(tmp_path / "run", max_steps=6, save_every=2), resume=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert "line 5" in capsys.readouterr().out


# ---- two writers -----------------------------------------------------------------------------------
HOLD_LOCK = "import sys, time\nfrom lillm.folders import RunLock\nRunLock(sys.argv[1]).acquire()\n" \
            "print('held', flush=True)\ntime.sleep(60)\n"


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            train(tiny(), RandomTokens(), config(run))
        assert not ckpt.list_checkpoints(run)
    finally:
        holder.kill()
        holder.wait()
    train(tiny(), RandomTokens(), config(run))  # the holder is gone: its lock is stale
    assert "taking over the lock" in capsys.readouterr().err
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_000002", "step_000004"]


def test_two_pretrain_processes_on_one_out_the_second_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        opened = subprocess.run([sys.executable, "-c", "import sys\nfrom lillm.folders import open_run_folder\n"
                                 "open_run_folder(sys.argv[1])", str(run)], env=ENV, capture_output=True, text=True)
        assert opened.returncode != 0 and f"pid {holder.pid}" in opened.stderr
    finally:
        holder.kill()
        holder.wait()


# ---- kills ------------------------------------------------------------------------------------------
SAVE_FOREVER = """
import sys, torch
from lillm import checkpoint as ckpt
from lillm.config import get_preset
from lillm.model import Transformer
run = sys.argv[1]
model = Transformer(get_preset("tiny", vocab_size=53, max_seq_len=32))
print("ready", flush=True)
step = len(ckpt.list_checkpoints(run)) * 1000
while True:
    step += 1
    ckpt.save_checkpoint(f"{run}/step_{step:06d}", model, train_state={"step": step, "x": torch.randn(20000)},
                         info={"step": step}, overwrite=True)
    ckpt.prune_checkpoints(run, keep_last=1)
"""


def test_kill_9_during_saves_and_pruning_never_leaves_an_incomplete_checkpoint_listed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rng = random.Random(0)
    for _ in range(2):
        child = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(run)], env=ENV, stdout=subprocess.PIPE,
                                 text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.2, 0.8))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert ckpt.list_checkpoints(run), "no checkpoint was saved before the kill; make the delay longer"
        assert_every_listed_checkpoint_is_complete(run)


def test_a_deletion_cut_short_is_never_listed(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path / f"step_{step:06d}", tiny())

    def dies_half_way(path):
        next(p for p in Path(path).iterdir()).unlink()  # one file gone, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(folders, "remove_hidden", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune_checkpoints(tmp_path, keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    assert_every_listed_checkpoint_is_complete(tmp_path, with_train_state=False)
    monkeypatch.undo()
    (tmp_path / "step_000009").mkdir()  # an older lillm's half-deleted folder: only config.json left
    (tmp_path / "step_000009" / "config.json").write_text("{}")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    folders.sweep_leftovers(tmp_path)
    assert not [p for p in tmp_path.iterdir() if ".trash-" in p.name]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare_kill")
    rng = random.Random(0)
    words = ["watoto", "wanacheza", "mpira", "gwamnati", "jihar", "kano", "mvua", "kubwa", "serikali", "afya"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + f" {i}" for i in range(40000)]
    (root / "big.txt").write_text("\n".join(docs) + "\n")
    train_bpe(docs[:500], vocab_size=300, show_progress=False).save(root / "tok.json")
    return root


def prepare_command(corpus, out, *extra):
    return [sys.executable, str(REPO / "data" / "prepare_pretrain.py"), "--tokenizer", str(corpus / "tok.json"),
            "--files", str(corpus / "big.txt"), "--out", str(out), "--workers", "1", *extra]


def kill_when_writing(command, out: Path) -> None:
    child = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and child.poll() is None:
        if any(p.name.endswith(".tmp") for p in out.glob(".*")):
            break
        time.sleep(0.02)
    assert child.poll() is None, "prepare_pretrain finished before it could be killed; make the corpus bigger"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()


def test_kill_9_during_prepare_pretrain_leaves_nothing_that_looks_complete(corpus, tmp_path):
    out = tmp_path / "bins"
    kill_when_writing(prepare_command(corpus, out), out)
    with pytest.raises(MissingMetaError):
        load_meta(out)
    # a complete folder, then a killed --overwrite run over it: the old bins still check, or none do
    from data import prepare_pretrain
    prepare_pretrain.main(prepare_command(corpus, out, "--overwrite")[2:])
    check_bins(out)
    kill_when_writing(prepare_command(corpus, out, "--overwrite"), out)
    try:
        check_bins(out)
    except MissingMetaError:
        pass


# ---- how a refusal looks from a shell ------------------------------------------------------------
def test_a_refusal_is_one_line_with_status_2_and_debug_shows_the_traceback(tmp_path):
    command = [sys.executable, "pretrain.py", "--data", str(tmp_path), "--seq-len", "0", "--out", str(tmp_path / "o")]
    plain = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines() == ["error: --seq-len 0: must be at least 1"]
    debug = subprocess.run(command, cwd=REPO, env=dict(ENV, LILLM_DEBUG="1"), capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FlagError" in debug.stderr


def test_debug_flag_reraises_bad_input_with_its_traceback(tmp_path):
    import pretrain
    from lillm.errors import FlagError

    with pytest.raises(FlagError, match="--seq-len 0"):
        run_main(pretrain.main, ["--data", str(tmp_path), "--seq-len", "0", "--debug"])


def test_a_bug_keeps_its_traceback():
    def buggy(argv):
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError):
        run_main(buggy, [])


# ---- the output mechanism, as a property: every script that writes, every kind of dangerous --out -------
WORDS = ["watoto", "wanacheza", "mpira", "gwamnati", "jihar", "kano", "mvua", "kubwa", "serikali", "afya"]


@pytest.fixture(scope="module")
def writers_world(tmp_path_factory):
    """What the writers read, each in a folder of its own (so that its parent is an ancestor holding it),
    a user's folder and file, and lillm folders of every kind."""
    from data import prepare_dpo, prepare_pretrain

    root = tmp_path_factory.mktemp("writers")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + f" {i}" for i in range(300)]
    for name in ("text", "tok", "data", "models", "hf", "rows", "pairs", "user", "dpo_data"):
        (root / name).mkdir()
    (root / "text" / "corpus.txt").write_text("\n".join(docs) + "\n")
    train_bpe(docs, vocab_size=320, show_progress=False).save(root / "tok" / "tok.json")
    prepare_pretrain.prepare(root / "tok" / "tok.json", root / "data" / "bins", files=[root / "text" / "corpus.txt"],
                             val_fraction=0.05, progress=False)
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=320, max_seq_len=64))
    ckpt.save_checkpoint(root / "models" / "ckpt", model, root / "tok" / "tok.json")
    for name in ("config.json", "model.safetensors"):
        (root / "hf" / name).write_bytes((root / "models" / "ckpt" / name).read_bytes())
    chat = {"messages": [{"role": "user", "content": "watoto wanacheza?"},
                         {"role": "assistant", "content": "mpira"}], "task": "chat"}
    (root / "rows" / "rows.jsonl").write_text((json.dumps(chat) + "\n") * 4)
    (root / "data" / "sft").mkdir()
    (root / "data" / "sft" / "train.jsonl").write_text((json.dumps(chat) + "\n") * 4)
    (root / "data" / "sft" / "test.jsonl").write_text((json.dumps(chat) + "\n") * 2)
    folders.mark(root / "data" / "sft", "sft-data")
    pair = {"prompt": "watoto wanacheza?", "chosen": "mpira", "rejected": "mvua", "task": "chat"}
    (root / "pairs" / "pairs.jsonl").write_text((json.dumps(pair) + "\n") * 4)
    prepare_dpo.main(["--files", str(root / "pairs" / "pairs.jsonl"), "--out", str(root / "dpo_data" / "dpo")])
    (root / "user" / "thesis.txt").write_bytes(b"\x00\xffyears of work\n")
    return root


# (script, arguments with {out}, the path it reads that --out must keep away from, a lillm folder of another
# kind, whether --out is a file). Paths are relative to the world; --overwrite is given wherever it exists.
TINY_RUN = "--max-steps 1 --micro-batch 2 --eval-every 0"
WRITERS = [
    ("train_tokenizer", "--files {text/corpus.txt} --vocab-size 300 --out {out} --overwrite", "text/corpus.txt",
     "models/ckpt", True),
    ("pretrain", "--data {data/bins} --preset tiny --seq-len 16 --global-batch-tokens 32 " + TINY_RUN +
     " --out {out} --overwrite", "data/bins", "models/ckpt", False),
    ("sft_train", "--init-from {models/ckpt} --data {data/sft} --global-batch 2 " + TINY_RUN + " --out {out} --overwrite",
     "data/sft", "data/bins", False),
    ("dpo_train", "--init-from {models/ckpt} --data {dpo_data/dpo} --global-batch 2 " + TINY_RUN +
     " --out {out} --overwrite", "dpo_data/dpo", "data/bins", False),
    ("data.prepare_pretrain", "--tokenizer {tok/tok.json} --files {text/corpus.txt} --workers 1 --out {out} --overwrite",
     "text/corpus.txt", "models/ckpt", False),
    ("data.prepare_sft", "--tasks none --files {rows/rows.jsonl} --out {out} --overwrite", "rows/rows.jsonl",
     "models/ckpt", False),
    ("data.prepare_dpo", "--files {pairs/pairs.jsonl} --out {out} --overwrite", "pairs/pairs.jsonl", "data/sft", False),
    ("data.prepare_dpo", "--sft-data {data/sft} --out {out} --overwrite", "data/sft", "models/ckpt", False),
    ("scripts.export_hf", "{models/ckpt} {out} --overwrite", "models/ckpt", "data/bins", False),
    ("scripts.import_hf", "{hf} {out} --overwrite", "hf", "data/bins", False),
    ("scripts.expand_vocab", "--base {models/ckpt} --out {out} --overwrite", "models/ckpt", "data/bins", False),
    ("scripts.shrink", "--source {models/ckpt} --out {out} --overwrite", "models/ckpt", "data/bins", False),
    ("scripts.export_gguf", "{models/ckpt} {out} --overwrite", "models/ckpt/model.safetensors", "data/bins", True),
    ("scripts.evaluate", "--checkpoint {models/ckpt} --data {data/sft} --limit 1 --no-greedy --device cpu --out {out}",
     "data/sft", "data/bins", False),
    ("scripts.prune_experiment", "--teacher {models/ckpt} --data {data/bins} --out {out} --overwrite", "data/bins",
     "models/ckpt", False),
]
PLACES = ("a user's folder", "a user's file", "what it reads", "an ancestor of what it reads",
          "lillm's folder of another kind")


def dangerous_out(world: Path, place: str, reads: str, other: str, is_file: bool) -> Path:
    return {"a user's folder": world / "user",
            "a user's file": world / "user" / "thesis.txt",
            "what it reads": world / reads,
            "an ancestor of what it reads": (world / reads).parent,
            "lillm's folder of another kind": world / other / "out.file" if is_file else world / other}[place]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("script, template, reads, other, is_file", WRITERS, ids=[f"{w[0]}-{w[2]}" for w in WRITERS])
def test_no_out_of_any_script_changes_anything_a_user_had(writers_world, capsys, script, template, reads, other,
                                                          is_file, place):
    import importlib
    import re as regex

    out = dangerous_out(writers_world, place, reads, other, is_file)
    argv = [str(out) if word == "{out}" else regex.sub(r"\{(.+?)\}", lambda m: str(writers_world / m[1]), word)
            for word in template.split()]
    before = files_of(writers_world)
    with pytest.raises(SystemExit) as exit_info:
        run_main(importlib.import_module(script).main, argv)
    err = capsys.readouterr().err
    after = files_of(writers_world)
    changed = [name for name, data in before.items() if after.get(name) != data]
    assert not changed, f"{script} with --out at {place} ({out}) changed {changed}: {err}"
    if script == "scripts.evaluate" and exit_info.value.code == 0:
        return  # evaluate writes its reports beside a user's files (lillm/folders.py) and replaces none of them
    assert exit_info.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err


def test_a_run_whose_out_holds_the_checkpoint_it_starts_from_is_refused_and_the_checkpoint_kept(writers_world,
                                                                                                  tmp_path, capsys):
    import sft_train

    run = tmp_path / "run"
    shutil.copytree(writers_world / "models" / "ckpt", run / "step_000002")
    folders.mark(run, "run")
    before = files_of(run)
    argv = ["--init-from", str(run / "step_000002"), "--data", str(writers_world / "data" / "sft"), "--out", str(run),
            "--overwrite", *TINY_RUN.split()]
    with pytest.raises(SystemExit) as exit_info:
        run_main(sft_train.main, argv)
    assert exit_info.value.code == 2 and "contains --init-from" in capsys.readouterr().err
    assert files_of(run) == before


def test_a_refused_prepare_pretrain_leaves_no_marked_folder_and_the_corrected_command_runs(writers_world, tmp_path,
                                                                                          capsys):
    from data import prepare_pretrain

    out = tmp_path / "new" / "bins"
    command = ["--tokenizer", str(writers_world / "tok" / "tok.json"), "--out", str(out), "--workers", "1"]
    for bad in (["--files", str(tmp_path / "missing.txt")], ["--files", str(writers_world / "text" / "corpus.txt"),
                                                            "--shard-tokens", "-5"]):
        with pytest.raises(SystemExit) as exit_info:
            run_main(prepare_pretrain.main, command + bad)
        assert exit_info.value.code == 2, capsys.readouterr().err
        assert not (tmp_path / "new").exists()  # neither the folder nor the parent the claim created
    (tmp_path / "empty").mkdir()  # a folder that was there and empty stays, empty (no marker left)
    with pytest.raises(SystemExit):
        run_main(prepare_pretrain.main, command[:3] + [str(tmp_path / "empty"), "--files", str(tmp_path / "missing")])
    assert list((tmp_path / "empty").iterdir()) == []
    prepare_pretrain.main(command + ["--files", str(writers_world / "text" / "corpus.txt")])  # no --overwrite needed
    check_bins(out)


def test_files_written_through_a_temporary_name_get_the_mode_the_umask_asks_for(writers_world, tmp_path):
    from data import prepare_pretrain
    from lillm.gguf import export_gguf
    from lillm.peft import apply_peft, save_peft
    from lillm.tokenizer import Tokenizer

    old = os.umask(0o022)
    try:
        export_gguf(writers_world / "models" / "ckpt", tmp_path / "model.gguf", "f32")
        Tokenizer.from_file(writers_world / "tok" / "tok.json").save(tmp_path / "tok" / "tokenizer.json")
        prepare_pretrain.main(["--tokenizer", str(writers_world / "tok" / "tok.json"), "--workers", "1", "--files",
                               str(writers_world / "text" / "corpus.txt"), "--out", str(tmp_path / "bins"),
                               "--shard-tokens", "1000"])
        save_peft(apply_peft(tiny(), "lora"), tmp_path / "adapter")
        folders.write_text_atomic(tmp_path / "report.json", "{}")
        ckpt.save_checkpoint(tmp_path / "ckpt", tiny())
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert len(modes) > 10 and set(modes.values()) == {0o644}, modes


# ---- features that work together: each pair works (tested here) or is refused in one line -----------
def moe(vocab=53, seed=0):
    torch.manual_seed(seed)
    return Transformer(get_preset("moe-tiny", vocab_size=vocab, max_seq_len=32))


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out if torch.is_tensor(out) else out[0]


@pytest.mark.parametrize("method", ["lora", "qlora", "adapters"])
def test_moe_with_lora_qlora_and_adapters_trains_saves_and_reloads(tmp_path, method):
    from lillm.peft import apply_peft

    model = apply_peft(moe(), method, targets="all")
    wrapped = sum(1 for name, _ in model.named_parameters() if "experts" in name and ("lora" in name or "adapter" in name))
    assert wrapped > 0  # the experts' projections are adapted, not skipped
    train(model, RandomTokens(), config(tmp_path / "run", max_steps=2, save_every=2))
    reloaded = ckpt.load_model(tmp_path / "run" / "step_000002")
    ids = torch.randint(0, 53, (2, 9))
    assert torch.equal(logits(model.eval(), ids), logits(reloaded.eval(), ids))


def test_moe_int8_decodes_close_to_fp32_and_serves(writers_world):
    from lillm.generate import generate
    from lillm.quant import quantize_int8
    from lillm.serve import ChatServer, Defaults

    model = moe(vocab=320).eval()
    ids = torch.randint(0, 320, (2, 12))
    model(ids)  # a forward with gradients leaves the mixture's auxiliary losses on the model: copying must work
    reference = logits(model, ids)
    for kernel in ("dequant", "weight-only", "fbgemm"):
        quantized = quantize_int8(model, kernel=kernel)
        assert (logits(quantized, ids) - reference).abs().max() < 0.05 * reference.abs().max(), kernel
    from lillm.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_file(writers_world / "tok" / "tok.json")
    quantized = quantize_int8(model, kernel="dequant")
    expected = generate(quantized, [[1, 5, 9]], 6, temperature=0.0)[0]
    with ChatServer(quantize_int8(model, kernel="dequant"), tokenizer, port=0, log=lambda record: None,
                    defaults=Defaults(max_tokens=6, temperature=0.0)) as server:
        import urllib.request
        request = urllib.request.Request(server.url + "/v1/completions", method="POST",
                                         data=json.dumps({"prompt": tokenizer.decode([5, 9]), "max_tokens": 6,
                                                          "temperature": 0}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            body = json.loads(reply.read())
    assert body["choices"][0]["text"] and len(expected) == 6


def test_moe_exports_to_gguf_in_mixtrals_layout_and_reads_back_to_equal_logits(writers_world, tmp_path):
    import gguf

    from lillm.gguf import EXPERT_STACKS, export_gguf, interleaved_to_rotate_half

    model = moe(vocab=320)
    ckpt.save_checkpoint(tmp_path / "moe", model, writers_world / "tok" / "tok.json")
    reader = gguf.GGUFReader(export_gguf(tmp_path / "moe", tmp_path / "moe.gguf", "f32"))
    cfg = model.config
    assert reader.fields["llama.expert_count"].parts[-1][0] == cfg.n_experts
    assert reader.fields["llama.expert_used_count"].parts[-1][0] == cfg.experts_per_token
    tensors = {t.name: torch.from_numpy(np.array(t.data)).reshape(tuple(reversed(t.shape.tolist())))
               for t in reader.tensors}
    state = {"model.embed_tokens.weight": tensors["token_embd.weight"], "model.norm.weight": tensors["output_norm.weight"]}
    for layer in range(cfg.n_layers):
        block, prefix = f"blk.{layer}.", f"model.layers.{layer}."
        state[prefix + "self_attn.q_proj.weight"] = interleaved_to_rotate_half(tensors[block + "attn_q.weight"], cfg.n_heads)
        state[prefix + "self_attn.k_proj.weight"] = interleaved_to_rotate_half(tensors[block + "attn_k.weight"],
                                                                               cfg.n_kv_heads)
        for ours, theirs in (("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                             ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
                             ("block_sparse_moe.gate", "ffn_gate_inp")):
            state[f"{prefix}{ours}.weight"] = tensors[f"{block}{theirs}.weight"]
        for w, name in EXPERT_STACKS.items():
            stacked = tensors[block + name]
            assert stacked.shape[0] == cfg.n_experts
            for e in range(cfg.n_experts):
                state[f"{prefix}block_sparse_moe.experts.{e}.{w}.weight"] = stacked[e]
    rebuilt = moe(vocab=320, seed=1)
    ckpt.load_weights(rebuilt, state)
    ids = torch.randint(0, 320, (2, 9))
    assert torch.equal(logits(model, ids), logits(rebuilt, ids))
    export_gguf(tmp_path / "moe", tmp_path / "moe-q8.gguf", "q8_0")  # quantized experts too


def test_moe_shrinks_experts_by_their_own_channels_exactly_and_through_the_script(writers_world, tmp_path, capsys):
    from lillm.importance import activation_importance, choose
    from lillm.prune import prune_width
    from scripts import shrink

    model = moe().eval()
    ids = torch.randint(0, 53, (2, 16))
    keep = choose(activation_importance(model, [{"input_ids": ids}], show_progress=False)["ffn"], 40)
    assert keep.shape == (2, 4, 40)  # layer x expert x kept channels
    zeroed = copy_of(model)
    with torch.no_grad():
        for layer, block in enumerate(zeroed.model.layers):
            for e, expert in enumerate(block.block_sparse_moe.experts):
                dropped = torch.ones(model.config.d_ff, dtype=torch.bool)
                dropped[keep[layer, e]] = False
                expert.w2.weight[:, dropped] = 0
    pruned = prune_width(model, ffn_keep=keep)
    assert pruned.config.d_ff == 40 and torch.equal(logits(zeroed, ids), logits(pruned, ids))

    # and through scripts/shrink.py: vocabulary, per-expert FFN, width, depth and healing on a mixture
    data_dir = tmp_path / "data"
    lines = (writers_world / "text" / "corpus.txt").read_text().splitlines()
    for path, text in ((data_dir / "lacuna_language_corpus" / "swa" / "swa.txt", lines),
                       (data_dir / "mafand_mt" / "en-swa" / "dev.swa", lines[:40])):
        path.parent.mkdir(parents=True)
        path.write_text("\n".join(text) + "\n")
    torch.manual_seed(0)
    ckpt.save_checkpoint(tmp_path / "moe", Transformer(get_preset("moe-tiny", vocab_size=320, max_seq_len=64)),
                         writers_world / "tok" / "tok.json")
    shrink.main(["--source", str(tmp_path / "moe"), "--out", str(tmp_path / "small"), "--langs", "swa", "--data-dir",
                 str(data_dir), "--vocab", "300", "--d-model", "32", "--d-ff", "32", "--layers", "1", "--seq-len", "16",
                 "--batch", "4", "--micro-batch", "2", "--calib-batches", "2", "--eval-tokens", "200", "--device", "cpu",
                 "--heal-steps", "2"])
    small = ckpt.load_model(tmp_path / "small")
    cfg = small.config
    assert (cfg.n_experts, cfg.d_ff, cfg.d_model, cfg.n_layers) == (4, 32, 32, 1) and cfg.vocab_size <= 320
    assert small.num_params() == cfg.num_params()


def copy_of(model):
    import copy
    return copy.deepcopy(model)


def test_sharded_bins_pretrain_resume_and_evaluate_as_one_file_does(writers_world, tmp_path):
    import pretrain
    from data import prepare_pretrain

    text, tok = writers_world / "text" / "corpus.txt", writers_world / "tok" / "tok.json"
    for name, shards in (("one", 0), ("shards", 700)):
        prepare_pretrain.main(["--tokenizer", str(tok), "--files", str(text), "--out", str(tmp_path / name),
                               "--workers", "1", "--val-fraction", "0.1", "--shard-tokens", str(shards)])
    assert (tmp_path / "shards" / "train-00001.bin").is_file() and not (tmp_path / "shards" / "train.bin").exists()

    def run(data, out, steps, *extra):
        return pretrain.main(["--data", str(tmp_path / data), "--out", str(tmp_path / out), "--preset", "tiny",
                              "--seq-len", "16", "--global-batch-tokens", "64", "--micro-batch", "4",
                              "--max-steps", str(steps), "--eval-every", "2", "--eval-batches", "2",
                              "--save-every", "2", "--log-every", "1", *extra])

    def log(out):
        return [json.loads(line) for line in (tmp_path / out / "log.jsonl").read_text().splitlines()]

    one, sharded = run("one", "run_one", 4), run("shards", "run_shards", 4)
    assert [r.get("loss") for r in log("run_one")] == [r.get("loss") for r in log("run_shards")]
    assert one["val_loss"] == sharded["val_loss"]
    run("shards", "run_resumed", 2)
    resumed = run("shards", "run_resumed", 4, "--resume")
    assert resumed["loss"] == sharded["loss"] and resumed["val_loss"] == sharded["val_loss"]


@pytest.mark.parametrize("first, then", [("fp32", "bf16-true"), ("bf16-true", "fp32")])
def test_a_run_resumes_in_the_other_precision(tmp_path, capsys, first, then):
    run = tmp_path / "run"
    train(tiny(), RandomTokens(), config(run, max_steps=2, precision=first))
    metrics = train(tiny(), RandomTokens(), config(run, max_steps=4, precision=then), resume=True)
    assert metrics["step"] == 4 and math.isfinite(metrics["loss"])
    assert f"precision {first} -> {then}" in capsys.readouterr().out
    state = ckpt.load_train_state(run / "step_000004")["optimizer"]["state"]
    moment = next(iter(state.values()))["exp_avg"]
    assert moment.dtype == (torch.bfloat16 if then == "bf16-true" else torch.float32)


def test_resume_names_every_setting_that_differs_and_refuses_max_steps_already_reached(tmp_path):
    from lillm.errors import FlagError
    from pretrain import PretrainRun

    run = tmp_path / "run"
    train(tiny(), RandomTokens(), config(run, max_steps=2, settings=PretrainRun("data", "tiny", 16, 64)))
    with pytest.raises(FlagError, match=r"preset tiny -> small; seq_len 16 -> 32"):
        train(tiny(), RandomTokens(), config(run, max_steps=4, settings=PretrainRun("data", "small", 32, 64)), resume=True)
    with pytest.raises(FlagError, match=r"model d_model 64 -> 32"):
        train(Transformer(get_preset("tiny", vocab_size=53, max_seq_len=32, d_model=32, n_heads=2, n_kv_heads=1)),
              RandomTokens(), config(run, max_steps=4, settings=PretrainRun("data", "tiny", 16, 64)), resume=True)
    with pytest.raises(FlagError, match=r"--max-steps 2: the run .* is at step 2 already"):
        train(tiny(), RandomTokens(), config(run, max_steps=2, settings=PretrainRun("data", "tiny", 16, 64)), resume=True)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_000002"]  # nothing was written


def test_a_config_asking_for_more_memory_than_the_machine_has_is_refused_before_building(tmp_path, monkeypatch):
    from lillm.errors import CheckpointError

    ckpt.save_checkpoint(tmp_path / "c", tiny())
    monkeypatch.setattr(ckpt, "available_memory", lambda: 1000)
    with pytest.raises(CheckpointError, match=r"asks for 95,872 parameters.*GiB available"):
        ckpt.load_model(tmp_path / "c")
