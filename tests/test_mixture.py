"""Mid-training (lillm/mixture.py): task conversations join the pretraining stream at a chosen step,
in a fixed share of each step's micro batches, without changing the text windows or the step size,
and a resumed mixture continues the same stream; pretrain.py --task-data runs it end to end."""
import json

import numpy as np
import pytest
import torch

import pretrain
from lillm.data import BinLoader, StepBatches
from lillm.mixture import TaskMixture, task_micro_batches
from lillm.sft import IGNORE_INDEX, SFTBatches, build_examples
from lillm.tokenizer import train_bpe

TEXTS = ["Watoto wanacheza mpira uwanjani kila jioni.", "Gwamnatin jihar Kano ta ƙaddamar da shirin noma.",
         "Translate to Swahili: the children play football.", "Chanya Wastani Hasi Kyakkyawa Korau 0 1 2"] * 30
SEQ, MICRO, ACCUM = 32, 2, 4


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(TEXTS, vocab_size=300, min_frequency=1, show_progress=False)


def rows(n=9):
    return [{"messages": [{"role": "user", "content": f"Translate to Swahili: the children play {i}."},
                          {"role": "assistant", "content": f"Watoto wanacheza {i}."}], "task": "translation"}
            for i in range(n)]


@pytest.fixture()
def bin_path(tmp_path):
    """A bin of 5,000 tokens with a meta.json as data/prepare_pretrain.py writes it."""
    tokens = (np.arange(5000) % 300).astype(np.uint16)
    tokens.tofile(tmp_path / "train.bin")
    meta = {"tokenizer_path": "tok.json", "tokenizer_sha256": "a" * 64, "vocab_size": 300, "dtype": "uint16",
            "eos_id": 2, "splits": {"train": {"file": "train.bin", "tokens": len(tokens)}}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path / "train.bin"


def mixture(tokenizer, bin_path, start=2, task_micro=1, loss_on="assistant"):
    text = StepBatches(BinLoader(bin_path, SEQ, MICRO * ACCUM, seed=7), ACCUM)
    examples, _ = build_examples(tokenizer, rows(), SEQ, "truncate", verbose=False, loss_on=loss_on)
    tasks = SFTBatches(examples, MICRO, task_micro, "pack", SEQ, tokenizer.pad_id, seed=7)
    return TaskMixture(text, tasks, ACCUM, task_micro, start)


def test_before_the_start_step_the_stream_is_plain_pretraining(tokenizer, bin_path):
    plain = StepBatches(BinLoader(bin_path, SEQ, MICRO * ACCUM, seed=7), ACCUM)
    mixed = mixture(tokenizer, bin_path, start=2)
    for _ in range(2):
        a, b = plain.next_step(), mixed.next_step()
        assert len(a) == len(b) == ACCUM
        assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))


def test_after_the_start_step_the_share_is_conversations_and_the_text_windows_are_unchanged(tokenizer, bin_path):
    plain = StepBatches(BinLoader(bin_path, SEQ, MICRO * ACCUM, seed=7), ACCUM)
    mixed = mixture(tokenizer, bin_path, start=1, task_micro=2)
    plain.next_step(), mixed.next_step()
    a, b = plain.next_step(), mixed.next_step()
    assert len(b) == ACCUM
    for x, y in zip(a[:2], b[:2]):  # the text micro batches a plain run would have seen
        assert torch.equal(x["input_ids"], y["input_ids"])
    for batch in b[2:]:  # packed conversation rows of the same shape, trained on the answers only
        assert batch["input_ids"].shape == (MICRO, SEQ) and "segment_ids" in batch
        assert (batch["labels"] == IGNORE_INDEX).any() and (batch["labels"] != IGNORE_INDEX).any()


def test_loss_on_all_trains_every_token_after_bos(tokenizer):
    assistant, _ = build_examples(tokenizer, rows(1), 128, verbose=False)
    everything, _ = build_examples(tokenizer, rows(1), 128, verbose=False, loss_on="all")
    assert assistant[0].input_ids == everything[0].input_ids
    assert everything[0].labels == everything[0].input_ids[1:] + [tokenizer.eos_id]
    trained = [label for label in assistant[0].labels if label != IGNORE_INDEX]
    assert everything[0].labels[-len(trained):] == trained


def test_a_resumed_mixture_continues_the_same_stream(tokenizer, bin_path):
    straight = mixture(tokenizer, bin_path, start=1)
    for _ in range(3):
        straight.next_step()
    torch.save(straight.state_dict(), bin_path.parent / "state.pt")  # as train_state.pt keeps it
    resumed = mixture(tokenizer, bin_path, start=1)
    resumed.load_state_dict(torch.load(bin_path.parent / "state.pt", weights_only=True))
    for _ in range(3):
        for x, y in zip(straight.next_step(), resumed.next_step()):
            assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])


def test_a_resume_with_another_share_is_refused(tokenizer, bin_path):
    state = mixture(tokenizer, bin_path, task_micro=1).state_dict()
    with pytest.raises(ValueError, match="--task-share"):
        mixture(tokenizer, bin_path, task_micro=2).load_state_dict(state)


def test_task_micro_batches_rounds_the_share_and_keeps_at_least_one():
    assert task_micro_batches(4, 0.5) == 2
    assert task_micro_batches(4, 0.01) == 1
    assert task_micro_batches(4, 1.0) == 4
    assert task_micro_batches(3, 0.5) == 2


def make_bins(tmp_path, tokenizer) -> None:
    """tmp_path/bins: token bins of a small corpus, through data/prepare_pretrain.py."""
    tokenizer.save(tmp_path / "tokenizer.json")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"{t} {i}" for i, t in enumerate(TEXTS * 3)) + "\n", encoding="utf-8")
    from data import prepare_pretrain
    prepare_pretrain.main(["--tokenizer", str(tmp_path / "tokenizer.json"), "--files", str(corpus),
                           "--out", str(tmp_path / "bins"), "--val-fraction", "0.1"])


def test_pretrain_with_task_data_runs_end_to_end(tmp_path, tokenizer):
    make_bins(tmp_path, tokenizer)
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows()), encoding="utf-8")
    metrics = pretrain.main(["--data", str(tmp_path / "bins"), "--out", str(tmp_path / "run"), "--preset", "tiny",
                             "--seq-len", str(SEQ), "--global-batch-tokens", str(SEQ * MICRO * ACCUM),
                             "--micro-batch", str(MICRO), "--max-steps", "4", "--eval-every", "4",
                             "--eval-batches", "1", "--save-every", "4", "--warmup-steps", "1",
                             "--task-data", str(tmp_path / "sft"), "--task-start", "0.5", "--task-share", "0.5"])
    assert metrics is not None
    record = json.loads((tmp_path / "run" / "step_000004" / "lillm.json").read_text())
    assert record["train_config"]["settings"]["task_share"] == 0.5


def test_pretrain_model_overrides_change_the_presets_shape(tmp_path, tokenizer):
    make_bins(tmp_path, tokenizer)
    pretrain.main(["--data", str(tmp_path / "bins"), "--out", str(tmp_path / "run"), "--preset", "tiny", "--model",
                   "n_layers=3", "d_ff=96", "--seq-len", str(SEQ), "--global-batch-tokens", str(SEQ * MICRO),
                   "--micro-batch", str(MICRO), "--max-steps", "1", "--eval-every", "0", "--save-every", "1"])
    config = json.loads((tmp_path / "run" / "step_000001" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["intermediate_size"] == 96
