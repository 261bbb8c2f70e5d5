"""Nothing a user has is ever lost: kills during saves, pruning and tokenizing, two writers on one run,
a user's file in an output folder, and how a refusal looks from a real shell (lillm/folders.py, run_main)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

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
