"""Muon (lillm/muon.py): the Newton-Schulz orthogonalisation against an SVD, which parameters it
trains, one step by hand, exact resume, and the settings it refuses. The 2-process DDP and FSDP
runs are in tests/test_pretrain.py; the lr schedules in tests/test_train.py."""
import json

import pytest
import torch

from lillm import checkpoint as ckpt
from lillm.config import get_preset
from lillm.errors import FlagError
from lillm.model import Transformer
from lillm.muon import NS_COEFFICIENTS, Muon, MuonWithAdamW, is_muon_matrix, orthogonalise, shape_scale
from lillm.peft import apply_peft
from lillm.train import TrainConfig, make_optimizer, train
from tests.test_train import CrashingSource, Crash, RandomTokens, tiny_model

SHAPES = {"tall": (176, 64), "wide": (64, 176), "square": (64, 64)}
# The scalar map of 5 quintic steps, measured on a grid of 200,001 points in [1e-6, 1] (module docstring):
# every s >= 0.002 lands in [0.6818, 1.2024], no s lands above 1.2024.
BAND, FLOOR, PEAK = (0.68, 1.21), 0.002, 1.21


def five_steps(s: torch.Tensor) -> torch.Tensor:
    a, b, c = NS_COEFFICIENTS
    for _ in range(5):
        s = a * s + b * s**3 + c * s**5
    return s


def svd(matrix):
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u, s, vh


@pytest.mark.parametrize("kind", SHAPES)
def test_newton_schulz_is_the_scalar_map_applied_to_the_singular_values(kind):
    """Exact property: the iteration keeps G's singular vectors and maps each singular value s
    (after scaling by ||G||_F) through the 5-step polynomial. In float64 it equals U p(S) V^T."""
    g = torch.randn(*SHAPES[kind], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u, s, vh = svd(g)
    expected = u @ torch.diag(five_steps(s / (g.norm() + 1e-7))) @ vh
    assert torch.allclose(orthogonalise(g, dtype=torch.float64), expected, atol=1e-10)


@pytest.mark.parametrize("dtype, slack", [(torch.float32, 1e-3), (torch.bfloat16, 0.01)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", SHAPES)
def test_newton_schulz_lands_in_the_stated_band_near_u_v_transpose(kind, dtype, slack):
    """Against the SVD reference U V^T: along every singular direction with s >= 0.002 ||G||_F the
    result's singular value lies in [0.68, 1.21], none exceeds 1.21, and on those directions the
    distance to U V^T (spectral norm) is at most max |p(s) - 1| = 0.32 (measured: 0.318 in fp32,
    0.326 in bf16). bf16 (the GPU's precision) gets 0.01 of slack, fp32 0.001."""
    for seed in range(3):
        g = torch.randn(*SHAPES[kind], generator=torch.Generator().manual_seed(seed))
        out = orthogonalise(g, dtype=dtype).double()
        u, s, vh = svd(g)
        kept = s >= FLOOR * g.double().norm()
        assert kept.float().mean() > 0.9  # the test looks at (almost) the whole spectrum
        assert torch.linalg.svdvals(out).max() <= PEAK + slack
        along = torch.diagonal(u.T @ out @ vh.T)[kept]  # the result's singular values, in G's basis
        assert along.min() >= BAND[0] - slack and along.max() <= BAND[1] + slack
        off = (out - u @ vh) @ vh[kept].T
        assert torch.linalg.matrix_norm(off, ord=2) <= 0.32 + slack


def test_orthogonalise_returns_the_input_dtype_and_handles_zero():
    assert orthogonalise(torch.zeros(4, 6)).abs().max() == 0
    assert orthogonalise(torch.randn(6, 4), dtype=torch.bfloat16).dtype == torch.float32


def test_one_muon_step_by_hand():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(12, 5))
    before = weight.detach().clone()
    grads = [torch.randn(12, 5) for _ in range(2)]
    opt = Muon([weight], lr=0.1, momentum=0.9)
    momentum = torch.zeros(12, 5)
    for grad in grads:
        weight.grad = grad.clone()
        opt.step()
        momentum = 0.9 * momentum + 0.1 * grad
        nesterov = 0.1 * grad + 0.9 * momentum
        before -= 0.1 * (12 / 5) ** 0.5 * orthogonalise(nesterov)
    assert torch.allclose(weight.detach(), before, atol=1e-6)
    assert shape_scale(weight) == pytest.approx((12 / 5) ** 0.5) and shape_scale(torch.zeros(5, 12)) == 1.0
    with pytest.raises(ValueError, match="matrices"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def muon_names(model, cfg=None) -> set[str]:
    optimizer = make_optimizer(model, cfg or TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert isinstance(optimizer, MuonWithAdamW)
    ids = {id(p) for group in optimizer.muon.param_groups for p in group["params"]}
    adamw = {id(p) for group in optimizer.adamw.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert not ids & adamw and ids | adamw == {id(p) for p in named.values()}  # each parameter exactly once
    return {name for name, p in named.items() if id(p) in ids}


@pytest.mark.parametrize("preset, changes", [("tiny", {}), ("tiny", {"tie_embeddings": False}),
                                             ("tiny", {"shared_mlp": True}), ("moe-tiny", {})],
                         ids=["tied", "untied", "shared-mlp", "moe"])
def test_the_blocks_matrices_go_to_muon_everything_else_to_adamw(preset, changes):
    torch.manual_seed(0)
    model = Transformer(get_preset(preset, vocab_size=53, max_seq_len=32, **changes))
    names = muon_names(model)
    expected = {n for n, p in model.named_parameters() if n.startswith("model.layers.") and p.dim() == 2}
    assert names == expected and names
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    assert all(any(f"layers.0.self_attn.{p}.weight" == n.split("model.")[-1] for n in names) for p in projections)
    for adamw_name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert adamw_name not in names
    assert "lm_head.weight" not in names  # tied: the embedding's matrix; untied: the head
    if preset == "moe-tiny":
        assert "model.layers.0.block_sparse_moe.gate.weight" in names
        assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names


def test_adamw_keeps_its_decay_rule_beside_muon_and_muon_runs_at_its_own_lr():
    model = tiny_model()
    cfg = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.05, weight_decay=0.1)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    (muon_group,) = optimizer.muon.param_groups
    decayed, plain = optimizer.adamw.param_groups
    assert muon_group["lr_ratio"] == pytest.approx(50) and muon_group["momentum"] == 0.95
    assert [id(p) for p in decayed["params"]] == [id(model.model.embed_tokens.weight)]
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in plain["params"])
    assert is_muon_matrix("model.layers.3.mlp.up_proj.weight", torch.zeros(2, 2))
    assert not is_muon_matrix("lm_head.weight", torch.zeros(2, 2))


def test_default_adamw_is_unchanged():
    optimizer = make_optimizer(tiny_model(), TrainConfig(), torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW and len(optimizer.param_groups) == 2


def config(out, **changes):
    settings = dict(out_dir=str(out), max_steps=12, save_every=6, eval_every=0, log_every=1, warmup_steps=2,
                    lr=3e-3, optimizer="muon")
    return TrainConfig(**{**settings, **changes})


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_a_resumed_muon_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path, schedule):
    straight = tiny_model()
    train(straight, RandomTokens(), config(tmp_path / "a", schedule=schedule))
    with pytest.raises(Crash):
        train(tiny_model(), CrashingSource(crash_at_step=9), config(tmp_path / "b", schedule=schedule))
    state = ckpt.load_train_state(ckpt.list_checkpoints(tmp_path / "b")[-1])
    momentum = state["optimizer"]["state"]["model.layers.0.mlp.down_proj.weight"]["momentum_buffer"]
    assert momentum.abs().sum() > 0  # Muon's state is saved, by parameter name
    assert "exp_avg" in state["optimizer"]["state"]["model.embed_tokens.weight"]
    resumed = tiny_model(seed=1)  # another init: everything must come from the checkpoint
    train(resumed, RandomTokens(seed=5), config(tmp_path / "b", schedule=schedule), resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()] for run in "ab"]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]


def test_muon_lowers_the_loss(tmp_path):
    model = tiny_model()
    cfg = config(tmp_path, max_steps=30, save_every=0)
    train(model, RandomTokens(vocab=8, seq=16), cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.5


def test_resuming_with_the_other_optimizer_is_refused(tmp_path):
    train(tiny_model(), RandomTokens(), config(tmp_path, max_steps=2, save_every=2))
    with pytest.raises(FlagError, match="trained with --optimizer muon, not adamw"):
        train(tiny_model(), RandomTokens(), config(tmp_path, max_steps=4, optimizer="adamw"), resume=True)


@pytest.mark.parametrize("setting", ["bf16-true", "lora", "adapters"])
def test_muon_refuses_bf16_true_and_peft_in_the_library_too(setting):
    model = tiny_model()
    precision = "bf16-true" if setting == "bf16-true" else "auto"
    if setting != "bf16-true":
        apply_peft(model, setting)
    with pytest.raises(FlagError, match=f"--optimizer muon with --(precision|peft) {setting}"):
        make_optimizer(model, TrainConfig(optimizer="muon", precision=precision), torch.device("cpu"))


def test_full_fine_tuning_and_frozen_matrices_work_with_muon():
    model = apply_peft(tiny_model(), "full")
    assert muon_names(model)
    model = tiny_model()
    for p in model.model.layers.parameters():
        p.requires_grad_(False)
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW  # nothing for Muon to train: AdamW alone
