"""End-to-end properties of pretrain.py: DDP equals one process, a killed run resumes exactly."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lillm import checkpoint as ckpt
from lillm.tokenizer import train_bpe

REPO = Path(__file__).resolve().parents[1]
SENTENCES = [
    "Watoto wanacheza mpira uwanjani kila jioni baada ya shule.",
    "Mvua kubwa imenyesha jijini Dar es Salaam usiku wa kuamkia leo.",
    "Gwamnatin jihar Kano ta ƙaddamar da sabon shirin noma a bana.",
    "Ɗaliban jami'a sun koma makaranta bayan hutun watanni uku.",
    "Serikali imetangaza mpango mpya wa afya kwa wananchi wote.",
    "Manoma sun yi farin ciki da ruwan sama da aka samu a wannan shekara.",
]


@pytest.fixture(scope="module")
def bins(tmp_path_factory):
    """A tiny tokenizer and token bins made with data/prepare_pretrain.py."""
    root = tmp_path_factory.mktemp("pretrain_data")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(2, 6))) + f" {i}" for i in range(600)]
    (root / "corpus.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    tokenizer = train_bpe(docs, vocab_size=320, show_progress=False)
    tokenizer.save(root / "tokenizer.json")
    subprocess.run([sys.executable, str(REPO / "data/prepare_pretrain.py"), "--tokenizer", str(root / "tokenizer.json"),
                    "--files", str(root / "corpus.txt"), "--out", str(root / "bins"), "--val-fraction", "0.05"],
                   check=True, capture_output=True, cwd=REPO)
    return root / "bins"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pretrain(bins, out, *extra, nproc=1, wait=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = ["pretrain.py", "--data", str(bins), "--out", str(out), "--preset", "tiny", "--seq-len", "32",
            "--eval-every", "0", "--log-every", "1", "--warmup-steps", "2", "--lr", "3e-3", *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", *args]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    return output


def losses(out):
    return [json.loads(l)["loss"] for l in (Path(out) / "log.jsonl").read_text().splitlines()
            if "loss" in json.loads(l)]


@pytest.mark.parametrize("sharding, optimizer", [([], "adamw"), (["--fsdp"], "adamw"), ([], "muon"), (["--fsdp"], "muon")],
                         ids=["ddp", "fsdp", "ddp-muon", "fsdp-muon"])
def test_two_process_run_equals_one_process_with_the_same_global_batch(bins, tmp_path, sharding, optimizer):
    """Muon: under DDP every rank orthogonalises the same all-reduced gradient; under FSDP every rank
    gathers the whole matrix, orthogonalises it and keeps its shard (lillm/muon.py)."""
    common = ["--max-steps", "5", "--global-batch-tokens", str(8 * 32), "--save-every", "5", "--optimizer", optimizer]
    run_pretrain(bins, tmp_path / "one", *common, "--micro-batch", "2")             # 2 x 4 accumulation
    run_pretrain(bins, tmp_path / "two", *common, *sharding, "--micro-batch", "2", nproc=2)  # 2 x 2 x 2 processes
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 5
    # Same data, same math; only the order of float additions differs (gloo all-reduce vs accumulation).
    assert one == pytest.approx(two, rel=1e-5, abs=1e-5)
    w1 = load_file(tmp_path / "one/step_000005/model.safetensors")
    w2 = load_file(tmp_path / "two/step_000005/model.safetensors")
    for name in w1:
        assert torch.allclose(w1[name], w2[name], atol=1e-5), name
    for run in ("one", "two"):  # each run's state is the optimizer's asked for, saved whole by name
        state = ckpt.load_train_state(tmp_path / run / "step_000005")["optimizer"]["state"]
        matrix = state["model.layers.0.mlp.up_proj.weight"]
        assert ("momentum_buffer" in matrix) == (optimizer == "muon") and "exp_avg" in state["model.norm.weight"]
        assert tuple(matrix["momentum_buffer" if optimizer == "muon" else "exp_avg"].shape) == (176, 64)


def test_two_process_moe_run_equals_one_process_with_the_same_global_batch(bins, tmp_path):
    """A mixture of experts: the load-balancing loss is per micro batch, weighted by its targets
    (lillm/moe.py), so 2 processes x 2 micro batches equal 1 process x 4, as for the dense model."""
    common = ["--preset", "moe-tiny", "--max-steps", "5", "--global-batch-tokens", str(8 * 32), "--save-every", "5",
              "--micro-batch", "2"]
    run_pretrain(bins, tmp_path / "one", *common)
    run_pretrain(bins, tmp_path / "two", *common, nproc=2)
    logs = [[json.loads(l) for l in (tmp_path / run / "log.jsonl").read_text().splitlines()] for run in ("one", "two")]
    assert all("moe_balance" in record for record in logs[0] if "loss" in record)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-5, abs=1e-5)
    w1 = load_file(tmp_path / "one/step_000005/model.safetensors")
    w2 = load_file(tmp_path / "two/step_000005/model.safetensors")
    assert any(".block_sparse_moe.experts.3.w2" in name for name in w1)
    for name in w1:
        assert torch.allclose(w1[name], w2[name], atol=1e-5), name


def test_sigkill_then_resume_equals_an_uninterrupted_run(bins, tmp_path):
    common = ["--max-steps", "20", "--save-every", "10", "--global-batch-tokens", str(64 * 32), "--micro-batch", "16"]
    run_pretrain(bins, tmp_path / "straight", *common)
    killed = tmp_path / "killed"
    proc = run_pretrain(bins, killed, *common, wait=False)
    deadline = time.time() + 240
    while not (killed / "step_000010").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed; make its steps slower"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "step_000020").exists()
    output = run_pretrain(bins, killed, *common, "--resume")
    assert "resumed from" in output
    assert losses(killed) == losses(tmp_path / "straight")
    a = load_file(tmp_path / "straight/step_000020/model.safetensors")
    b = load_file(killed / "step_000020/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_a_different_world_size_keeps_the_global_batch(bins, tmp_path):
    common = ["--max-steps", "4", "--save-every", "2", "--global-batch-tokens", str(8 * 32), "--micro-batch", "2"]
    run_pretrain(bins, tmp_path / "straight", *common)
    run_pretrain(bins, tmp_path / "mixed", "--max-steps", "4", "--save-every", "2", "--global-batch-tokens",
                 str(8 * 32), "--micro-batch", "4", nproc=2)
    # kill nothing: restart the 2-process run's checkpoint at step 2 in one process and compare step 4
    state_dir = tmp_path / "mixed"
    for stale in ["step_000004"]:
        import shutil
        shutil.rmtree(state_dir / stale)
    run_pretrain(bins, state_dir, *common, "--resume")
    a = load_file(tmp_path / "straight/step_000004/model.safetensors")
    b = load_file(state_dir / "step_000004/model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_activation_checkpointing_under_fsdp_changes_nothing(bins, tmp_path):
    common = ["--max-steps", "3", "--global-batch-tokens", str(8 * 32), "--save-every", "3", "--micro-batch", "2",
              "--fsdp"]
    run_pretrain(bins, tmp_path / "plain", *common, nproc=2)
    output = run_pretrain(bins, tmp_path / "ckpt", *common, "--activation-checkpointing", nproc=2)
    assert json.loads((tmp_path / "ckpt/step_000003/lillm.json").read_text())["train_config"]["activation_checkpointing"]
    assert losses(tmp_path / "plain") == losses(tmp_path / "ckpt"), output[-2000:]
    a = load_file(tmp_path / "plain/step_000003/model.safetensors")
    b = load_file(tmp_path / "ckpt/step_000003/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
