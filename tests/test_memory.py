"""Activation checkpointing is exact, bf16-true trains and resumes exactly, stochastic rounding is unbiased."""
import copy
import json

import pytest
import torch

from lillm import checkpoint as ckpt
from lillm.config import get_preset
from lillm.loss import causal_lm_loss
from lillm.memory import BF16AdamW, blocks_checkpointed, checkpoint_blocks, stochastic_round_
from lillm.model import Transformer
from lillm.peft import apply_peft
from lillm.train import TrainConfig, train
from tests.test_train import CrashingSource, Crash, RandomTokens


def tiny(seed=0, **changes):
    torch.manual_seed(seed)
    return Transformer(get_preset("tiny", vocab_size=53, max_seq_len=32, **changes))


def batch(seed=0, vocab=53, rows=3, length=16):
    ids = torch.randint(0, vocab, (rows, length + 1), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def loss_and_grads(model, data, seed=0):
    torch.manual_seed(seed)  # LoRA dropout draws from the global generator
    loss, _ = causal_lm_loss(model, data)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def saved_bytes(model, data) -> int:
    """Bytes autograd keeps for the backward pass (each storage once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(model, data)
    return sum(storages.values())


@pytest.mark.parametrize("shared_mlp", [False, True], ids=["dense", "shared-mlp"])
def test_checkpointed_blocks_give_equal_losses_and_gradients_and_save_less(shared_mlp):
    plain = tiny(shared_mlp=shared_mlp)
    recomputed = checkpoint_blocks(copy.deepcopy(plain))
    assert blocks_checkpointed(recomputed) and not blocks_checkpointed(plain)
    data = batch()
    loss_a, grads_a = loss_and_grads(plain, data)
    loss_b, grads_b = loss_and_grads(recomputed, data)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    assert saved_bytes(recomputed, data) < 0.7 * saved_bytes(plain, data)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in recomputed.named_parameters()]


def test_checkpointing_with_lora_and_dropout_is_exact():
    plain = apply_peft(tiny(), "lora", targets="all", rank=4, dropout=0.2)
    recomputed = checkpoint_blocks(copy.deepcopy(plain))
    data = batch(1)
    loss_a, grads_a = loss_and_grads(plain, data, seed=7)
    loss_b, grads_b = loss_and_grads(recomputed, data, seed=7)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and all("lora_" in n for n in grads_a)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_no_recomputation_without_grad():
    model = checkpoint_blocks(tiny())
    with torch.no_grad():
        out = model(batch()["input_ids"])
    assert torch.equal(out, tiny()(batch()["input_ids"]).detach())


def config(out, **changes):
    return TrainConfig(out_dir=str(out), max_steps=8, lr=3e-3, warmup_steps=2, save_every=4, eval_every=0,
                       log_every=1, **changes)


def logged_losses(out):
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_the_training_loop_with_checkpointing_equals_the_plain_loop(tmp_path):
    plain, recomputed = tiny(), tiny()
    train(plain, RandomTokens(), config(tmp_path / "plain"))
    train(recomputed, RandomTokens(), config(tmp_path / "ckpt", activation_checkpointing=True))
    assert blocks_checkpointed(recomputed)
    assert logged_losses(tmp_path / "plain") == logged_losses(tmp_path / "ckpt")
    for (name, a), b in zip(plain.state_dict().items(), recomputed.state_dict().values()):
        assert torch.equal(a, b), name


# ---- bf16-true --------------------------------------------------------------------------------
def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
    value = torch.full((200_000,), 1.0 + 2 ** -10, dtype=torch.float32)  # a quarter of the way to the next bf16
    out = torch.empty(value.shape, dtype=torch.bfloat16)
    stochastic_round_(out, value, torch.Generator().manual_seed(0))
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert out.float().mean().item() == pytest.approx(1.0 + 2 ** -10, abs=2e-5)
    negative = -value
    stochastic_round_(out, negative, torch.Generator().manual_seed(0))
    assert out.float().mean().item() == pytest.approx(-(1.0 + 2 ** -10), abs=2e-5)


def test_bf16_adamw_keeps_updates_that_round_to_nearest_would_lose():
    torch.manual_seed(0)
    start = torch.ones(4096, dtype=torch.bfloat16)
    moved = {}
    for name, make in {"nearest": lambda p: torch.optim.AdamW([p], lr=1e-4, weight_decay=0.0),
                       "stochastic": lambda p: BF16AdamW([p], lr=1e-4, weight_decay=0.0)}.items():
        param = torch.nn.Parameter(start.clone())
        optimizer = make(param)
        for _ in range(50):  # each update is 1e-4, a fortieth of bf16's step at 1.0 (2**-7)
            param.grad = torch.ones_like(param)
            optimizer.step()
        moved[name] = (1.0 - param.float().mean()).item()
    assert moved["nearest"] == 0.0
    assert moved["stochastic"] == pytest.approx(50 * 1e-4, rel=0.1)


def test_bf16_adamw_on_fp32_weights_equals_torch_adamw():
    a = torch.nn.Parameter(torch.randn(300))
    b = torch.nn.Parameter(a.detach().clone())
    ours, theirs = BF16AdamW([a], lr=1e-2, betas=(0.9, 0.95)), torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95))
    for step in range(5):
        grad = torch.randn(300, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_bf16_true_trains_saves_and_reloads(tmp_path):
    model = tiny()
    source = RandomTokens(vocab=8, seq=16)
    train(model, source, TrainConfig(out_dir=str(tmp_path), max_steps=30, lr=3e-3, warmup_steps=3, eval_every=0,
                                     save_every=30, log_every=1, precision="bf16-true"))
    losses = logged_losses(tmp_path)
    assert losses[-1] < losses[0] - 1.0  # from about ln(53) towards ln(8)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    folder = ckpt.list_checkpoints(tmp_path)[-1]
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    state = ckpt.load_train_state(folder)
    assert all(t.dtype == torch.bfloat16 for s in state["optimizer"]["state"].values()
               for k, t in s.items() if k != "step")
    reloaded = ckpt.load_model(folder, dtype=torch.bfloat16)
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_and_qlora_train_under_bf16_true(tmp_path, method):
    model = apply_peft(tiny(), method, targets="all", rank=4)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train(model, RandomTokens(vocab=8, seq=16), TrainConfig(out_dir=str(tmp_path), max_steps=20, lr=1e-2,
                                                          warmup_steps=2, eval_every=0, save_every=20, log_every=1,
                                                          precision="bf16-true", activation_checkpointing=True))
    losses = logged_losses(tmp_path)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.2  # the frozen head limits what LoRA learns in 20 steps
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name].to(torch.bfloat16)), name
    reloaded = ckpt.load_model(ckpt.list_checkpoints(tmp_path)[-1], dtype=torch.bfloat16)
    data = batch(2, vocab=8)
    with torch.no_grad():
        assert torch.equal(model(data["input_ids"]), reloaded(data["input_ids"]))


@pytest.mark.parametrize("changes", [dict(activation_checkpointing=True), dict(precision="bf16-true"),
                                     dict(activation_checkpointing=True, precision="bf16-true")],
                         ids=["checkpointing", "bf16-true", "both"])
def test_resume_is_exact_with_checkpointing_and_bf16_true(tmp_path, changes):
    straight = tiny()
    train(straight, RandomTokens(), config(tmp_path / "a", **changes))
    with pytest.raises(Crash):
        train(tiny(), CrashingSource(crash_at_step=7), config(tmp_path / "b", **changes))
    resumed = tiny(seed=1)
    train(resumed, RandomTokens(seed=5), config(tmp_path / "b", **changes), resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert logged_losses(tmp_path / "a") == logged_losses(tmp_path / "b")


# ---- the memory estimate ------------------------------------------------------------------------
def test_estimate_counts_what_each_setting_saves():
    from lillm.memory import estimate_training_memory
    cfg = get_preset("lillm-300m")
    full = estimate_training_memory(cfg, 8, 512, "bf16")
    assert full["weights"] == full["gradients"] == 4 * cfg.num_params() and full["optimizer"] == 8 * cfg.num_params()
    pure = estimate_training_memory(cfg, 8, 512, "bf16-true")
    assert pure["weights"] * 2 == full["weights"] and pure["optimizer"] * 2 == full["optimizer"]
    recomputed = estimate_training_memory(cfg, 8, 512, "bf16", activation_checkpointing=True)
    assert recomputed["activations"] < full["activations"] / 3
    qlora = estimate_training_memory(cfg, 8, 512, "bf16", peft="qlora")
    assert qlora["weights"] < full["weights"] / 3 and qlora["gradients"] < full["gradients"] / 100


def test_estimate_is_within_15_percent_of_a_measured_cpu_peak():
    from bench.memory import estimate, measure_in_subprocess
    measured = measure_in_subprocess("small", "autocast", 8, 256, "cpu", steps=2, threads=1)  # fp32 on the CPU
    predicted = estimate("small", "autocast", 8, 256, "cpu")["peak"]
    assert abs(predicted / measured["measured_peak"] - 1) < 0.15, (predicted, measured)
