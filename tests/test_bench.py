"""Tests for the bench package: the benchmark runs end to end on tiny sizes and refuses unfair comparisons.

No timing is asserted (the machine is shared); only that every measurement is made, reported and
recorded, and that the decode comparison stops when the two libraries disagree.
"""
import json
import runpy
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import __main__ as cli
from bench import decode as bench_decode
from bench import harness, mfu
from bench import train as bench_train
from lillm.tokenizer import train_bpe

SWAHILI = ["Habari za asubuhi rafiki yangu", "Watoto wanacheza mpira uwanjani", "Mvua inanyesha sana leo",
           "Tunakwenda sokoni kununua matunda", "Mwalimu anafundisha darasani", "Kahawa ya Kenya ni tamu"]
TINY_RUN = ["--presets", "tiny", "--device", "cpu", "--threads", "1", "--steps", "1", "--warmup", "1",
            "--repeats", "1", "--batch", "2", "--seq-len", "16", "--decode-batches", "1", "2",
            "--prompt-len", "4", "--new-tokens", "3", "--prefill-len", "8", "--prefill-batches", "2"]


@pytest.fixture(scope="module")
def text_and_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-data")
    corpus = folder / "swa.txt"
    corpus.write_text("\n".join(f"{line} {i}" for i in range(40) for line in SWAHILI) + "\n", encoding="utf-8")
    tokenizer = folder / "tokenizer.json"
    train_bpe(SWAHILI * 3, vocab_size=300, min_frequency=1, show_progress=False).save(tokenizer)
    return corpus, tokenizer


def test_tiny_run_measures_every_comparison_and_writes_the_record(tmp_path, text_and_tokenizer, capsys):
    corpus, tokenizer = text_and_tokenizer
    out = tmp_path / "bench.json"
    record = cli.main(TINY_RUN + ["--no-memory", "--tokenizer", str(tokenizer), "--data-files", str(corpus),
                                    "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    for key in ("date", "device", "torch", "transformers", "threads", "command"):
        assert record[key], key
    assert record["threads"] == 1 and "--presets tiny" in record["command"]
    metrics = [row["metric"] for row in record["comparisons"]]
    assert metrics == ["train step B=2 T=16", "decode B=1 prompt=4 new=3", "decode B=2 prompt=4 new=3",
                       "prefill B=2 prompt=8"]
    for row in record["comparisons"]:
        assert row["lillm"] > 0 and row["transformers"] > 0
        assert row["speedup"] == pytest.approx(row["lillm"] / row["transformers"])
    data = {row["metric"]: row for row in record["data"]}
    assert {"prepare_pretrain, 1 worker", "prepare_pretrain, 2 workers", "BinLoader.next_batch B=2 T=16",
            "loader headroom over tiny training"} == set(data)
    assert all(row["value"] > 0 for row in data.values())
    printed = capsys.readouterr().out
    assert "| tiny | decode B=2 prompt=4 new=3 | tokens/s |" in printed
    assert "| prepare_pretrain, 2 workers |" in printed


def test_greedy_check_accepts_the_same_weights_and_fires_on_different_ones():
    cfg = bench_decode.decode_config("tiny")
    ours, theirs = harness.build_pair(cfg, "cpu", seed=0)
    prompts = bench_decode.random_prompts(cfg.vocab_size, batch=2, length=5)
    bench_decode.assert_same_greedy(ours.eval(), theirs.eval(), prompts, new_tokens=4)
    torch.manual_seed(123)
    stranger = harness.hf_model_like(cfg).eval()  # same shapes, other random weights
    with pytest.raises(bench_decode.GreedyMismatchError, match="prompt 0, new token 0: lillm chose"):
        bench_decode.assert_same_greedy(ours, stranger, prompts, new_tokens=4)


class FixedLogits:
    """Stands in for a transformers model whose logits over a sequence are given."""
    device = torch.device("cpu")

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, input_ids):
        return SimpleNamespace(logits=self.logits[None, : input_ids.shape[1]])


def test_greedy_check_accepts_a_rounding_tie_and_nothing_more():
    prompt, vocab = [1, 1], 5
    logits = torch.zeros(4, vocab)
    logits[1, 2], logits[1, 3] = 10.0, 10.0 - 1e-6  # step 0: 2 is best, 3 ties with it at rounding level
    logits[2, 4] = 7.0                              # step 1: 4 is best by 7
    reference = FixedLogits(logits)
    assert bench_decode.count_ties(reference, prompt, [3, 4], [2, 0], row=0) == 1
    with pytest.raises(bench_decode.GreedyMismatchError, match="new token 1: lillm chose 0, transformers 4"):
        bench_decode.count_ties(reference, prompt, [3, 0], [2, 4], row=0)


def test_step_memory_is_measured_in_a_fresh_process_and_is_positive():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("the CPU memory measurement reads Linux's /proc/self/status")
    used = bench_train.step_memory_in_subprocess("lillm", "tiny", batch=2, seq_len=16, threads=1)
    # At least the gradients and both AdamW moments of the fp32 weights (3 copies), minus rounding to pages.
    weights = harness.bench_config("tiny").num_params() * 4
    assert used > 2 * weights


def test_help_lists_presets_devices_and_comparisons(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--presets", "--device", "--what", "--steps", "--batch", "--seq-len", "--threads", "--json"):
        assert option in text


def test_bad_settings_are_refused_with_the_option_named(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--steps", "0"])
    assert "--steps must be at least 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            cli.parse_args(["--device", "cuda"])
        assert "torch sees no CUDA device" in capsys.readouterr().err


def test_a_missing_data_file_fails_before_any_model_is_benchmarked(tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("model benchmarks ran before the data sources were checked")

    monkeypatch.setattr(harness, "run_comparisons", must_not_run)
    missing = tmp_path / "absent.txt"
    with pytest.raises(FileNotFoundError, match="absent.txt not found"):
        cli.main(["--presets", "tiny", "--data-files", str(missing), "--json", str(tmp_path / "b.json")])


def test_mfu_script_runs_every_variant_on_the_cpu(monkeypatch, tmp_path):
    """bench.mfu is for GPUs; on the CPU it must still run each variant's step (compiling
    is replaced by the identity here: real compilation takes minutes on this machine)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)
    out = tmp_path / "mfu.json"
    rows = mfu.main(["--preset", "tiny", "--device", "cpu", "--batch", "2", "--seq-len", "16",
                           "--steps", "1", "--warmup", "1", "--json", str(out)])
    assert [row["variant"] for row in rows] == list(mfu.VARIANTS)
    assert all(row["tokens_per_s"] > 0 and row["mfu"] is None for row in rows)  # no MFU without a GPU peak
    assert json.loads(out.read_text()) == rows


@pytest.mark.parametrize("module", ["bench", "bench.train", "bench.decode", "bench.data", "bench.mfu",
                                    "bench.import_hf", "bench.peft", "bench.moe", "bench.deploy", "bench.serve", "bench.memory",
                                    "bench.data_hf", "bench.optim"])
def test_every_benchmark_runs_as_a_module_and_explains_itself(module, monkeypatch, capsys):
    """`python -m module --help`, run the way -m runs it (runpy) in this process: a fresh interpreter
    per module would spend a minute importing torch (test_step_memory... runs a real `python -m`)."""
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_info:
        warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules": this test imported it
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 0
    assert f"python -m {module}" in capsys.readouterr().out  # the usage line of its docstring


def test_the_memory_reader_sees_an_allocation_and_the_stopwatch_its_time():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("the CPU memory reader reads Linux's /proc/self/status")
    before = harness.reset_peak_memory()
    with harness.Stopwatch() as watch:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    after = harness.read_memory()
    assert after.peak - before.now >= 60 * 2**20 and after.lifetime_peak >= before.now
    assert watch.seconds > 0 and watch.cpu_seconds > 0 and block.sum() > 0


def test_the_deploy_bench_says_where_compiled_tokens_part_from_eager():
    from bench.deploy import agreement
    assert agreement("x", [[1, 2], [3, 4]], [[1, 2], [3, 4]]) == \
        {"x tokens equal eager": True, "x rows equal eager": 2, "x first difference at step": []}
    assert agreement("x", [[1, 2], [3, 5]], [[1, 2], [3, 4]])["x first difference at step"] == [1]


def test_where_rows_part_the_deploy_bench_gives_fp32_s_top_two_gap_there():
    from bench.deploy import tie_gaps
    from lillm.config import get_preset
    from lillm.model import Transformer
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny")).eval()
    prompts, expected = [[5, 6, 7], [8, 9]], [[10, 11, 12], [13, 14, 15]]
    got = [[10, 11, 12], [13, 99, 15]]   # the second row parts at step 1
    with torch.no_grad():
        gaps = tie_gaps(model, prompts, got, expected)
        top = model(torch.tensor([[8, 9, 13]]))[0, -1].topk(2).values
    assert gaps == [round(float(top[0] - top[1]), 4)] and gaps[0] >= 0
    assert tie_gaps(model, prompts, expected, expected) == []


def test_the_optimizer_benchmark_times_adamw_and_muon_side_by_side(tmp_path, capsys):
    from bench import optim
    record = optim.main(["--presets", "tiny", "--batch", "2", "--seq-len", "8", "--repeats", "1", "--warmup", "1",
                         "--json", str(tmp_path / "optim.json")])
    assert [row["what"] for row in record["rows"]] == ["step", "optimizer"]
    assert all(row["adamw_s"] > 0 and row["muon_s"] > 0 for row in record["rows"])
    assert json.loads((tmp_path / "optim.json").read_text())["rows"] == json.loads(json.dumps(record["rows"]))
    assert "| tiny | step |" in capsys.readouterr().out
