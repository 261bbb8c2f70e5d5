import json

import pytest
import torch

from lillm.config import get_preset
from lillm.model import Transformer
from lillm.nf4 import NF4Linear
from lillm.peft import (AdaptedLinear, KVPrefix, LoRALinear, PeftError, QLoRALinear, apply_peft, describe, load_peft,
                        merge_and_unload, peft_state_dict, prefix_from_tokens, save_peft, set_lora_merged)
from lillm.train import TrainConfig, make_optimizer

VOCAB = 61
ALL = ("q", "k", "v", "o", "gate", "up", "down")
HAS_PREFIX_HOOK = hasattr(Transformer(get_preset("tiny", vocab_size=8, n_layers=1)).model.layers[0].self_attn,
                          "kv_prefix")
needs_hook = pytest.mark.skipif(not HAS_PREFIX_HOOK, reason="lillm/model.py has no Attention.kv_prefix hook yet")


def base_model(seed=0, **overrides):
    torch.manual_seed(seed)
    # tiny: GQA (4 query heads, 2 kv heads), so k/v (64 -> 32) and gate/up/down (64 <-> 176) are not square
    return Transformer(get_preset("tiny", vocab_size=VOCAB, max_seq_len=32, **overrides)).eval()


def tokens(seed=0, batch=2, length=12):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomise_lora_B(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (LoRALinear, QLoRALinear)):
                module.lora_B.normal_(0, 0.05)


def train_steps(model, steps=3, lr=1e-2):
    opt = make_optimizer(model, TrainConfig(lr=lr, weight_decay=0.1), torch.device("cpu"))
    for step in range(steps):
        x = tokens(seed=10 + step, length=13)
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()


def frozen_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


# ----------------------------------------------------------------------------- LoRA

def test_lora_with_zero_B_leaves_outputs_unchanged():
    base, x = base_model(), tokens()
    expected = base(x)
    model = apply_peft(base_model(), "lora", targets="all", rank=4)
    assert torch.equal(model(x), expected)


def test_lora_wraps_every_kind_of_projection_including_non_square_ones():
    model = apply_peft(base_model(), "lora", targets=ALL, rank=4)
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attention.k_proj.lora_A.shape == (4, 64) and attention.k_proj.lora_B.shape == (32, 4)
    assert mlp.gate_proj.lora_B.shape == (176, 4) and mlp.down_proj.lora_A.shape == (4, 176)
    assert all(isinstance(getattr(attention, f"{k}_proj"), LoRALinear) for k in "qkvo")
    # the frozen weight keeps its name, so the base state dict is a subset of the PEFT one
    assert set(base_model().state_dict()) <= set(model.state_dict())


def test_only_lora_parameters_receive_gradients():
    model = apply_peft(base_model(), "lora", targets="q,v,gate", rank=4)
    randomise_lora_B(model)
    x = tokens(length=13)
    torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable and with_grad
    assert all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == describe(model)["trainable_params"]


def test_describe_counts_the_lora_parameters_exactly():
    model = apply_peft(base_model(), "lora", targets="q,v", rank=4)
    cfg = model.config
    per_layer = 4 * (64 + cfg.n_heads * cfg.head_dim) + 4 * (64 + cfg.n_kv_heads * cfg.head_dim)
    info = describe(model)
    assert info["trainable_params"] == per_layer * cfg.n_layers
    assert info["total_params"] == base_model().num_params() + info["trainable_params"]
    assert info["method"] == "lora" and info["config"]["targets"] == ["q", "v"]


def test_merged_and_unmerged_lora_outputs_agree_and_unmerge_restores_the_weights():
    model = apply_peft(base_model(), "lora", targets=ALL, rank=4)
    randomise_lora_B(model)
    x = tokens()
    before = model(x)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    set_lora_merged(model, True)
    assert torch.allclose(model(x), before, atol=1e-5)
    set_lora_merged(model, False)
    assert torch.allclose(model(x), before, atol=1e-5)
    for name, weight in model.named_parameters():
        if name in weights:
            assert torch.allclose(weight, weights[name], atol=1e-6)


def test_merge_and_unload_gives_a_plain_model_with_the_base_names_and_the_same_outputs():
    model = apply_peft(base_model(), "lora", targets="q,k,down", rank=4)
    randomise_lora_B(model)
    x = tokens()
    before = model(x)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert set(plain.state_dict()) == set(base_model().state_dict())
    assert torch.allclose(plain(x), before, atol=1e-5)


def test_a_shared_mlp_is_wrapped_once_and_its_lora_is_shared():
    model = apply_peft(base_model(shared_mlp=True, n_layers=3), "lora", targets="q,gate,down", rank=2)
    gates = {id(block.mlp.gate_proj) for block in model.model.layers}
    assert len(gates) == 1 and isinstance(model.model.layers[2].mlp.gate_proj, LoRALinear)
    d, dff, q_out = 64, 176, 64
    assert describe(model)["trainable_params"] == 3 * 2 * (d + q_out) + 2 * (d + dff) + 2 * (dff + d)


def test_a_saved_adapter_reloads_to_identical_outputs(tmp_path):
    model = apply_peft(base_model(), "lora", targets="q,v,up", rank=4, alpha=8)
    train_steps(model)
    x = tokens(seed=5)
    expected = model(x)
    save_peft(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft"]["method"] == "lora" and saved["peft"]["rank"] == 4
    restored = load_peft(base_model(), tmp_path / "adapter")
    assert torch.equal(restored(x), expected)
    assert set(peft_state_dict(restored)) == {n for n, _ in restored.named_parameters() if "lora_" in n}


def test_loading_an_adapter_into_another_base_model_is_refused(tmp_path):
    save_peft(apply_peft(base_model(), "lora"), tmp_path / "adapter")
    with pytest.raises(PeftError, match="another base model"):
        load_peft(base_model(n_layers=3), tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft(base_model(), tmp_path / "nothing")


def test_unknown_methods_targets_and_options_are_refused_with_the_choices():
    with pytest.raises(PeftError, match="full, lora, qlora, prefix, adapters"):
        apply_peft(base_model(), "dora")
    with pytest.raises(PeftError, match="q, k, v, o, gate, up, down"):
        apply_peft(base_model(), "lora", targets="q,lm_head")
    with pytest.raises(PeftError, match="lora_rank"):
        apply_peft(base_model(), "lora", lora_rank=4)
    model = apply_peft(base_model(), "lora")
    with pytest.raises(PeftError, match="already has PEFT"):
        apply_peft(model, "adapters")


def test_full_fine_tuning_trains_everything_and_train_embeddings_adds_the_vocabulary_rows():
    full = apply_peft(base_model(), "full")
    assert all(p.requires_grad for p in full.parameters())
    assert set(peft_state_dict(full)) == {n for n, _ in full.named_parameters()}
    lora = apply_peft(base_model(), "lora", train_embeddings=True)
    assert lora.model.embed_tokens.weight.requires_grad
    assert "model.embed_tokens.weight" in peft_state_dict(lora)


# ----------------------------------------------------------------------------- QLoRA

def test_qlora_quantises_every_projection_and_trains_only_lora_on_cpu():
    model = apply_peft(base_model(), "qlora", targets="q,v", rank=4)
    block = model.model.layers[0]
    assert isinstance(block.self_attn.q_proj, QLoRALinear) and isinstance(block.mlp.up_proj, NF4Linear)
    assert all(n.endswith(("lora_A", "lora_B")) for n, p in model.named_parameters() if p.requires_grad)
    frozen = frozen_snapshot(model)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_steps(model)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if n in lora_before)
    assert torch.isfinite(model(tokens())).all()
    assert describe(model)["nf4_params"] == sum(p.numel() for n, p in base_model().named_parameters() if "proj" in n)


def test_qlora_with_zero_B_is_the_dequantised_base_and_merges_into_a_dense_model():
    model = apply_peft(base_model(), "qlora", targets=ALL, rank=4)
    x = tokens()
    with torch.no_grad():
        quantised_base = model(x)
        randomise_lora_B(model)
        with_update = model(x)
    assert not torch.allclose(quantised_base, with_update)
    dense = merge_and_unload(model)
    assert not any(isinstance(m, NF4Linear) for m in dense.modules())
    assert torch.allclose(dense(x), with_update, atol=1e-4)
    # quantisation moves the logits a little, not a lot
    assert (quantised_base - base_model()(x)).abs().max() < 0.1


def test_qlora_adapter_round_trips_through_save_and_load(tmp_path):
    model = apply_peft(base_model(), "qlora", targets="q,v", rank=4)
    randomise_lora_B(model)
    save_peft(model, tmp_path)
    x = tokens()
    assert torch.equal(load_peft(base_model(), tmp_path)(x), model(x))


# ----------------------------------------------------------------------------- adapters and prefixes

def test_adapters_start_as_the_identity_and_sit_after_attention_and_mlp():
    x = tokens()
    model = apply_peft(base_model(), "adapters", adapter_size=8)
    assert torch.equal(model(x), base_model()(x))
    block = model.model.layers[1]
    assert isinstance(block.self_attn.o_proj, AdaptedLinear) and isinstance(block.mlp.down_proj, AdaptedLinear)
    assert not isinstance(block.self_attn.q_proj, AdaptedLinear)


@pytest.mark.parametrize("method", ["adapters", pytest.param("prefix", marks=needs_hook)])
def test_prefix_and_adapters_train_their_own_parameters_and_leave_the_base_bitwise_untouched(method):
    model = apply_peft(base_model(), method, adapter_size=8, prefix_length=4)
    x = tokens()
    start = model(x).detach()
    frozen = frozen_snapshot(model)
    assert set(frozen) == set(base_model().state_dict()) - {"lm_head.weight"}  # tied: one tensor
    train_steps(model, steps=4)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert not torch.allclose(model(x), start)  # the method's own parameters did learn


@needs_hook
def test_prefix_is_initialised_from_the_base_models_own_keys_and_values():
    ids = torch.tensor([3, 1, 4, 1, 5])
    model = apply_peft(base_model(), "prefix", prefix_length=5, prefix_init_ids=ids)
    expected = prefix_from_tokens(base_model(), ids)
    for block, (keys, _values) in zip(model.model.layers, expected):
        assert isinstance(block.self_attn.kv_prefix, KVPrefix)
        assert torch.equal(block.self_attn.kv_prefix.keys, keys) and block.self_attn.kv_prefix.keys.shape == (2, 5, 16)
    assert not torch.allclose(model(tokens()), base_model()(tokens()))  # every query attends to the prefix


@needs_hook
def test_prefix_decoding_with_the_kv_cache_matches_the_full_forward():
    model = apply_peft(base_model(), "prefix", prefix_length=3)
    x = tokens(length=10)
    full = model(x)
    model.setup_cache(2, 16)
    first = model(x[:, :6], cache_pos=0)
    steps = [model(x[:, i:i + 1], cache_pos=i) for i in range(6, 10)]
    model.clear_cache()
    assert torch.allclose(torch.cat([first] + steps, dim=1), full, atol=1e-5)
    padded = torch.ones_like(x)
    assert torch.allclose(model(x, attention_mask=padded), full, atol=1e-6)


@needs_hook
def test_a_saved_prefix_reloads_to_identical_outputs(tmp_path):
    model = apply_peft(base_model(), "prefix", prefix_length=4)
    train_steps(model, steps=2)
    save_peft(model, tmp_path)
    x = tokens()
    assert torch.equal(load_peft(base_model(), tmp_path)(x), model(x))


def test_adapters_and_prefixes_cannot_be_merged():
    with pytest.raises(PeftError, match="cannot be merged"):
        merge_and_unload(apply_peft(base_model(), "adapters"))


# ----------------------------------------------------------------------------- the training loop and checkpoints

class RandomWindows:
    def __init__(self, seed=0):
        self.gen = torch.Generator().manual_seed(seed)

    def next_step(self):
        x = torch.randint(0, VOCAB, (2, 13), generator=self.gen)
        return [{"input_ids": x[:, :-1], "labels": x[:, 1:]}]

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])


@pytest.mark.parametrize("method", ["lora", "qlora", "adapters", pytest.param("prefix", marks=needs_hook)])
def test_the_training_loop_trains_a_peft_model_and_its_checkpoint_loads_back(tmp_path, method):
    from lillm.checkpoint import load_model
    from lillm.train import train
    model = apply_peft(base_model(), method, targets="q,v", rank=4, adapter_size=8, prefix_length=4)
    frozen = frozen_snapshot(model)
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=2, lr=1e-2, warmup_steps=1, eval_every=0, save_every=0)
    train(model, RandomWindows(), cfg, info={"peft": describe(model)})
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    restored = load_model(tmp_path / "step_000002").eval()
    assert restored.peft_config.method == method
    x = tokens()
    assert torch.equal(restored(x), model.eval()(x))
