"""scripts/recipe.sh: the plan of both roads (--dry-run), its refusals, and a tiny end-to-end run."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lillm.challenge import score_submission

REPO = Path(__file__).resolve().parents[1]
STAGES = {"scratch": ["tokenizer", "bins", "pretrain", "sft-data", "sft-translation", "sft-all", "evaluate"],
          "shrink": ["tokenizer", "bins", "teacher", "shrink", "sft-data", "sft-translation", "sft-all", "evaluate"]}


def recipe(*args, env=None, check=True):
    return subprocess.run(["bash", str(REPO / "scripts" / "recipe.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **(env or {})},
                          check=check, timeout=600)


@pytest.mark.parametrize("road", ["scratch", "shrink"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_dry_run_prints_every_stage_in_order_and_runs_nothing(tmp_path, road, device):
    out = tmp_path / "run"
    result = recipe("--road", road, "--out", str(out), "--device", device, "--dry-run")
    stages = [line[3:] for line in result.stdout.splitlines() if line.startswith("== ")]
    assert stages == STAGES[road]
    commands = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert len(commands) == len(stages) and not out.exists()
    text = result.stdout
    assert "--tasks translation --out" in text and f"--init-from {out}/sft_mt" in text  # two SFT stages
    assert f"--checkpoint {out}/sft_all" in text
    preset = {"cpu": ("small", "small-teacher"), "cuda": ("lillm-39m", "lillm-300m")}[device][road == "shrink"]
    assert f"--preset {preset} " in text
    if road == "shrink":
        assert "--distill" in text and "--importance activation" in text and "--layer-choice influence" in text
        assert ("--d-model 512 --d-ff 1408 --layers 12" if device == "cuda" else "--d-model 192") in text
    assert ("--compile" in text) == (device == "cuda")


def test_bad_flags_and_a_used_folder_are_refused_with_status_2(tmp_path):
    result = recipe("--road", "sideways", "--out", str(tmp_path / "r"), check=False)
    assert result.returncode == 2 and "--road must be scratch or shrink" in result.stderr
    result = recipe("--road", "scratch", check=False)
    assert result.returncode == 2 and "--out" in result.stderr
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    result = recipe("--road", "scratch", "--out", str(used), "--device", "cpu", check=False)
    assert result.returncode == 2 and "not empty" in result.stderr and (used / "notes.txt").read_text() == "mine"


def data_dir() -> Path:
    from lillm.corpora import data_dir as resolve
    try:
        return resolve()
    except FileNotFoundError:
        pytest.skip("real data directory absent (set LILLM_DATA_DIR)")


@pytest.mark.slow  # about 40 s on a quiet 2-core CPU: every stage starts Python and torch
def test_tiny_scratch_road_runs_end_to_end_and_its_submission_scores_back(tmp_path):
    out = tmp_path / "run"
    recipe("--road", "scratch", "--out", str(out), "--tiny", "--device", "cpu", "--data-dir", str(data_dir()))
    stages = [json.loads(line)["stage"] for line in (out / "recipe.log").read_text().splitlines()]
    assert stages == STAGES["scratch"]
    results = json.loads((out / "eval" / "eval_test.json").read_text())
    model = results["challenge"]["model, by likelihood"]
    assert model["task_score"] is not None and model["params"] == results["summary"]["params"]
    rescored = score_submission((out / "eval" / "submission_test.csv").read_text(encoding="utf-8"))
    assert rescored == pytest.approx(model)
    with open(out / "eval" / "predictions_test.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["task"] for r in rows} == {"translation", "sentiment", "nli"}
