import json
import math
import shutil

import pytest
import torch

from lillm import checkpoint as ckpt
from lillm.config import get_preset
from lillm.model import Transformer
from lillm.loss import causal_lm_loss
from lillm.train import TrainConfig, TrainingDiverged, decay_start, lr_at, make_optimizer, train


class RandomTokens:
    """A seeded synthetic batch source: one optimizer step = `accum` micro batches."""

    def __init__(self, vocab=53, seq=16, micro=2, accum=2, seed=0):
        self.vocab, self.seq, self.micro, self.accum = vocab, seq, micro, accum
        self.gen = torch.Generator().manual_seed(seed)

    def next_step(self):
        out = []
        for _ in range(self.accum):
            x = torch.randint(0, self.vocab, (self.micro, self.seq + 1), generator=self.gen)
            out.append({"input_ids": x[:, :-1], "labels": x[:, 1:]})
        return out

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(get_preset("tiny", vocab_size=53, max_seq_len=32))


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_weight_decay_skips_norms():
    model = tiny_model()
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    norm_ids = {id(m.weight) for n, m in model.named_modules() if n.endswith("norm")}
    assert norm_ids == {id(p) for p in plain["params"]}


def test_training_lowers_the_loss_and_writes_log_plot_and_checkpoint(tmp_path):
    model = tiny_model()
    source = RandomTokens(vocab=8, seq=16)  # 8 symbols: learnable unigram floor is ln(8)
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=30, lr=3e-3, warmup_steps=3, eval_every=15,
                      save_every=15, log_every=1)
    metrics = train(model, source, cfg, evaluate=lambda m: {"val_loss": 1.0})
    records = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    assert metrics["step"] == 30
    assert (tmp_path / "loss.png").exists()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000015", "step_000030"]


def test_a_nan_loss_is_skipped_and_counted_and_n_in_a_row_stop_with_last_good_checkpoint(tmp_path):
    calls = {"n": 0}
    poisoned = set(range(4 * 2, 5 * 2)) | set(range(8 * 2, 100))  # step 5 is bad once; from step 9 always

    def loss_fn(model, batch):
        loss, n = causal_lm_loss(model, batch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] - 1 in poisoned else loss), n

    model = tiny_model()
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=20, save_every=6, max_bad_steps=3, eval_every=0, log_every=1)
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row.*step_000006"):
        train(model, RandomTokens(), cfg, loss_fn=loss_fn)
    records = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if "skipped" in r]
    assert skipped == [5, 9, 10, 11]
    state = ckpt.load_train_state(ckpt.list_checkpoints(tmp_path)[-1])
    assert state["step"] == 6 and state["bad_total"] == 1


class Crash(Exception):
    pass


class CrashingSource(RandomTokens):
    def __init__(self, crash_at_step):
        super().__init__()
        self.calls, self.crash_at_step = 0, crash_at_step

    def next_step(self):
        self.calls += 1
        if self.calls == self.crash_at_step:
            raise Crash()
        return super().next_step()


def test_resume_in_process_continues_exactly(tmp_path):
    def config(out):
        return TrainConfig(out_dir=str(out), max_steps=12, save_every=6, eval_every=0, log_every=1, warmup_steps=2)

    straight = tiny_model()
    train(straight, RandomTokens(), config(tmp_path / "a"))
    with pytest.raises(Crash):
        train(tiny_model(), CrashingSource(crash_at_step=9), config(tmp_path / "b"))
    resumed = tiny_model(seed=1)  # different init: everything must come from the checkpoint
    train(resumed, RandomTokens(seed=5), config(tmp_path / "b"), resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    log_a = [json.loads(l)["loss"] for l in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(l)["loss"] for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert log_a == log_b


def test_resume_without_a_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        train(tiny_model(), RandomTokens(), TrainConfig(out_dir=str(tmp_path), max_steps=2), resume=True)


def test_wsd_warms_up_holds_the_peak_then_decays_by_one_minus_sqrt_to_the_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2)
    assert decay_start(110, 0.2) == 88  # the last round(0.2 x 110) = 22 steps decay
    assert [lr_at(s, cfg) for s in (0, 9)] == [pytest.approx(0.1), pytest.approx(1.0)]  # warm-up as cosine's
    assert all(lr_at(s, cfg) == 1.0 for s in range(10, 88))
    assert lr_at(88, cfg) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(1 / 22)))
    assert lr_at(98, cfg) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(11 / 22)))
    assert lr_at(109, cfg) == pytest.approx(0.1)  # the last step runs at the floor
    decay = [lr_at(s, cfg) for s in range(87, 110)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    # before the decay the lr does not depend on max_steps: what lets a stable-phase checkpoint run on
    longer = TrainConfig(**{**cfg.__dict__, "max_steps": 220})
    assert all(lr_at(s, cfg) == lr_at(s, longer) for s in range(88))


def wsd_config(out, max_steps, **changes):
    return TrainConfig(out_dir=str(out), max_steps=max_steps, save_every=4, keep_last=1, eval_every=0, log_every=1,
                       warmup_steps=2, schedule="wsd", decay_fraction=0.25, **changes)


def test_a_wsd_run_keeps_its_stable_checkpoint_and_can_be_continued_from_it_exactly(tmp_path):
    """The docs' recipe: copy the stable-phase step folder into a new run folder, then --resume with a
    larger max_steps: the result equals a run planned that long from the start, bit for bit."""
    short = tmp_path / "short"
    train(tiny_model(), RandomTokens(), wsd_config(short, 10))  # decay: steps 8 and 9 (round(2.5) = 2)
    assert [p.name for p in ckpt.list_checkpoints(short)] == ["step_000008", "step_000010"]  # keep_last=1, plus 8
    longer = tmp_path / "longer"
    longer.mkdir()
    shutil.copytree(short / "step_000008", longer / "step_000008")
    continued = tiny_model(seed=1)
    train(continued, RandomTokens(seed=5), wsd_config(longer, 16), resume=True)  # decay: steps 12 to 15
    planned = tiny_model()
    train(planned, RandomTokens(), wsd_config(tmp_path / "planned", 16))
    for (name, a), b in zip(planned.state_dict().items(), continued.state_dict().values()):
        assert torch.equal(a, b), name
