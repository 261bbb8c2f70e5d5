"""The mixture-of-experts layer (lillm/moe.py): exact dispatch, routing, the auxiliary losses,
parameter and FLOP counts, KV-cache decoding, and parity with transformers' MixtralForCausalLM."""
import math

import pytest
import torch

from lillm.checkpoint import save_checkpoint
from lillm.config import ModelConfig, get_preset
from lillm.generate import StaticDecoder, generate
from lillm.hf import export_llama, import_llama
from lillm.loss import causal_lm_loss
from lillm.model import Transformer
from lillm.moe import SparseMoE, auxiliary_loss, load_balancing_loss, route, router_metrics, router_z_loss


def make(**kw):
    torch.manual_seed(0)
    return Transformer(get_preset("moe-tiny", vocab_size=97, **kw)).eval()


def moe_layer(n_experts=4, k=2, d=16, d_ff=24, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=10, d_model=d, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=d_ff,
                      n_experts=n_experts, experts_per_token=k)
    layer = SparseMoE(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.5)
    return layer


# ---- the layer ---------------------------------------------------------------------------------
def test_top1_with_one_expert_equals_the_dense_swiglu_model_exactly():
    torch.manual_seed(0)
    dense = Transformer(get_preset("tiny", vocab_size=97)).eval()
    sparse = Transformer(get_preset("tiny", vocab_size=97, n_experts=1, experts_per_token=1)).eval()
    weights = {}
    for name, tensor in dense.state_dict().items():
        for mlp, expert in (("mlp.gate_proj", "block_sparse_moe.experts.0.w1"),
                            ("mlp.up_proj", "block_sparse_moe.experts.0.w3"),
                            ("mlp.down_proj", "block_sparse_moe.experts.0.w2")):
            name = name.replace(mlp, expert)
        weights[name] = tensor
    missing, unexpected = sparse.load_state_dict(weights, strict=False)
    assert unexpected == [] and all(".gate." in m for m in missing)  # only the routers are new
    x = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        assert torch.equal(sparse(x), dense(x))
    # and the gradients of a training step (the auxiliary loss has no gradient with one expert)
    batch = {"input_ids": x, "labels": x}
    causal_lm_loss(dense, batch)[0].backward()
    causal_lm_loss(sparse, batch)[0].backward()
    assert torch.equal(sparse.model.layers[1].block_sparse_moe.experts[0].w2.weight.grad,
                       dense.model.layers[1].mlp.down_proj.weight.grad)


def test_router_weights_are_the_top_k_probabilities_renormalised_to_sum_to_one():
    torch.manual_seed(0)
    logits = torch.randn(50, 6) * 3
    probs, weights, chosen = route(logits, 2)
    assert torch.allclose(probs, logits.softmax(-1))
    assert torch.allclose(weights.sum(-1), torch.ones(50))
    assert (chosen[:, 0] != chosen[:, 1]).all()
    top = probs.sort(-1, descending=True)
    assert torch.equal(chosen, top.indices[:, :2])
    assert torch.allclose(weights, top.values[:, :2] / top.values[:, :2].sum(-1, keepdim=True))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_every_token_is_processed_by_exactly_its_k_chosen_experts(k):
    layer = moe_layer(n_experts=5, k=k)
    x = torch.randn(2, 9, 16)
    rows_seen = []
    hooks = [expert.register_forward_hook(lambda mod, inp, out, e=e: rows_seen.append((e, inp[0].clone())))
             for e, expert in enumerate(layer.experts)]
    with torch.no_grad():
        out = layer(x)
    for h in hooks:
        h.remove()
    flat = x.reshape(-1, 16)
    _, weights, chosen = route(layer.gate(flat), k)
    # Which tokens each expert saw: each token exactly once in each of its k experts, nowhere else.
    for e, rows in rows_seen:
        seen = sorted(int((flat == row).all(-1).nonzero()) for row in rows)
        assert seen == (chosen == e).any(-1).nonzero().flatten().tolist()
    assert sum(len(rows) for _, rows in rows_seen) == flat.shape[0] * k
    # and the output is the weighted sum of those k experts, token by token
    with torch.no_grad():
        expected = torch.stack([sum(weights[t, j] * layer.experts[int(chosen[t, j])](flat[t]) for j in range(k))
                                for t in range(flat.shape[0])])
    assert torch.allclose(out.reshape(-1, 16), expected, atol=1e-5)


def test_an_expert_no_token_chose_still_gets_a_zero_gradient():
    """DDP needs every parameter in the graph of every step."""
    layer = moe_layer(n_experts=4, k=1)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[0] = 10.0  # every token (positive inputs) picks expert 0
    layer(torch.rand(1, 6, 16)).sum().backward()
    assert torch.equal(layer.experts[3].w1.weight.grad, torch.zeros_like(layer.experts[3].w1.weight))


def test_the_fixed_shape_every_expert_path_equals_the_dispatch():
    layer = moe_layer(n_experts=6, k=2)
    x = torch.randn(11, 16)
    with torch.no_grad():
        _, weights, chosen = route(layer.gate(x), 2)
        assert torch.allclose(layer._every_expert(x, weights, chosen), layer._dispatch(x, weights, chosen), atol=1e-6)


# ---- the auxiliary losses -------------------------------------------------------------------------
def test_load_balancing_loss_equals_a_hand_computation():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    chosen = torch.tensor([[0, 1], [3, 2], [0, 3]])
    # f = (2, 1, 1, 2) / 3 tokens; P = column means = (0.4, 0.2, 0.2, 0.2); E * sum f*P = 4 * 1.6/3
    assert load_balancing_loss(probs, chosen).item() == pytest.approx(6.4 / 3, rel=1e-6)


def test_load_balancing_loss_equals_transformers_for_one_layer():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    torch.manual_seed(0)
    logits = torch.randn(40, 8) * 2
    probs, _, chosen = route(logits, 2)
    expected = load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    assert load_balancing_loss(probs, chosen).item() == pytest.approx(expected.item(), rel=1e-5)


def test_load_balancing_loss_is_smallest_for_a_uniform_router():
    torch.manual_seed(0)
    k, n_experts = 2, 8
    uniform = torch.zeros(64, n_experts)
    probs, _, chosen = route(uniform, k)
    assert load_balancing_loss(probs, chosen).item() == pytest.approx(k)
    collapsed = torch.zeros(64, n_experts)
    collapsed[:, :2] = 5.0
    routers = [torch.randn(64, n_experts) * scale for scale in (0.3, 1, 3, 10)] + [collapsed]
    for logits in routers:
        probs, _, chosen = route(logits, k)
        assert load_balancing_loss(probs, chosen).item() > k
    probs, _, chosen = route(collapsed, k)
    top = math.exp(5) / (2 * math.exp(5) + 6)  # both tokens' choices: f = 1 for two experts, P = top
    assert load_balancing_loss(probs, chosen).item() == pytest.approx(n_experts * 2 * top, rel=1e-5)


def test_router_z_loss_equals_a_hand_computation():
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    assert router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2, rel=1e-6)


def test_auxiliary_loss_adds_gradient_but_not_value_and_is_scaled_by_the_targets():
    x = torch.randint(0, 97, (2, 12))
    labels = x.clone()
    labels[0, :5] = -100
    batch = {"input_ids": x, "labels": labels}
    grads, values = {}, {}
    for coef in (0.0, 0.5):
        model = make(router_aux_coef=coef, router_z_coef=0.01 if coef else 0.0).train()
        loss, n = causal_lm_loss(model, batch)
        loss.backward()
        values[coef] = loss.item()
        grads[coef] = model.model.layers[0].block_sparse_moe.gate.weight.grad.clone()
    assert values[0.5] == values[0.0]  # the logged loss is the LM loss: comparable with val and dense models
    # the extra gradient is exactly that of aux * n_targets
    model = make(router_aux_coef=0.5, router_z_coef=0.01).train()
    model(x)
    (auxiliary_loss(model) * (labels != -100).sum()).backward()
    extra = model.model.layers[0].block_sparse_moe.gate.weight.grad
    assert torch.allclose(grads[0.5] - grads[0.0], extra, atol=1e-6)
    assert set(router_metrics(model)) == {"moe_balance", "moe_z"}
    with torch.no_grad():
        model(x)
    assert auxiliary_loss(model) is None and router_metrics(model) == {}  # evaluation adds nothing


# ---- counts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["moe-tiny", "lillm-39m-moe"])
def test_parameter_counts_are_exact_and_active_params_match_the_dense_preset(preset):
    cfg = get_preset(preset)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() == cfg.num_params()
    per_expert = 3 * cfg.d_model * cfg.d_ff
    idle = (cfg.n_experts - cfg.experts_per_token) * per_expert * cfg.n_layers
    assert cfg.active_params() == cfg.num_params() - idle
    dense = get_preset({"moe-tiny": "tiny", "lillm-39m-moe": "lillm-39m"}[preset])
    router = cfg.d_model * cfg.n_experts * cfg.n_layers
    assert cfg.active_params() == dense.num_params() + router  # k experts of half the width
    # active FLOPs: the dense model's plus the router's matmul
    assert cfg.flops_per_token(128) == dense.flops_per_token(128) + 3 * 2 * router


def test_documented_preset_sizes():
    assert (get_preset("moe-tiny").num_params(), get_preset("moe-tiny").active_params()) == (684_864, 617_280)
    big = get_preset("lillm-39m-moe")
    assert (big.num_params(), big.active_params()) == (117_502_464, 39_645_696)


def test_invalid_moe_configs_are_refused():
    with pytest.raises(ValueError, match="experts_per_token=3"):
        get_preset("moe-tiny", experts_per_token=3, n_experts=2)
    with pytest.raises(ValueError, match="shared_mlp"):
        get_preset("moe-tiny", shared_mlp=True)


# ---- decoding -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["int-position", "tensor-position"])
def test_kv_cache_decoding_of_a_left_padded_batch_equals_the_full_forward(fixed_shapes):
    model = make()
    torch.manual_seed(1)
    seqs = [torch.randint(0, 97, (15,)), torch.randint(0, 97, (9,))]
    prompt_lens, steps = [7, 3], 6
    width = max(prompt_lens)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, (seq, n) in enumerate(zip(seqs, prompt_lens)):
        ids[row, width - n:] = seq[:n]
        mask[row, width - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_len = width + steps + (5 if fixed_shapes else 0)
    model.setup_cache(2, cache_len)
    step_mask = torch.nn.functional.pad(mask, (0, cache_len - width), value=1) if fixed_shapes else mask
    with torch.no_grad():
        logits = model(ids, position_ids=positions, attention_mask=mask, cache_pos=0)
        cached = [[logits[r, -1]] for r in range(2)]
        for step in range(steps - 1):
            token = torch.stack([seqs[r][prompt_lens[r] + step] for r in range(2)])[:, None]
            cache_pos = torch.tensor(width + step) if fixed_shapes else width + step
            out = model(token, position_ids=positions[:, -1:] + 1 + step, attention_mask=step_mask, cache_pos=cache_pos)
            for r in range(2):
                cached[r].append(out[r, -1])
        model.clear_cache()
        for r in range(2):
            full = model(seqs[r][None, : prompt_lens[r] + steps - 1])[0, prompt_lens[r] - 1:]
            assert (torch.stack(cached[r]) - full).abs().max() < 1e-5


def test_fixed_shape_decoding_traces_as_one_graph_without_host_reads():
    """The dispatch reads expert sizes back to the host; a compiled no-grad step runs every expert instead."""
    model = make()
    decoder = StaticDecoder(model, backend="eager", mode=None)
    prompts = [[5, 9, 11, 3, 7], [8, 2]]
    assert generate(model, prompts, max_new_tokens=5, temperature=0, compile=decoder) == \
        generate(model, prompts, max_new_tokens=5, temperature=0)


# ---- transformers' Mixtral ----------------------------------------------------------------------
def hf_mixtral(tie: bool):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=tie,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # larger router weights than the init, so routing differs between tokens
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    return model


def max_diff_on_real_tokens(hf_model, lillm_model) -> float:
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = lillm_model(ids, position_ids=positions, attention_mask=mask)
    return (expected[mask.bool()] - got[mask.bool()]).abs().max().item()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_mixtral_imports_exports_and_checkpoints_with_transformers_logits(tmp_path, tie):
    transformers = pytest.importorskip("transformers")
    reference = hf_mixtral(tie)
    reference.save_pretrained(tmp_path / "hf")  # per-expert w1/w2/w3 under block_sparse_moe
    model = import_llama(tmp_path / "hf").eval()
    cfg = model.config
    assert (cfg.n_experts, cfg.experts_per_token, cfg.tie_embeddings) == (4, 2, tie)
    assert model.num_params() == cfg.num_params() == sum(p.numel() for p in reference.parameters())
    assert max_diff_on_real_tokens(reference, model) < 1e-4

    export_llama(model, tmp_path / "exported")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert type(reloaded).__name__ == "MixtralForCausalLM"
    assert max_diff_on_real_tokens(reloaded, model) < 1e-4

    save_checkpoint(tmp_path / "ckpt", model)  # a training checkpoint is a Mixtral folder as it is
    from_checkpoint = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert max_diff_on_real_tokens(from_checkpoint, model) < 1e-4
    assert import_llama(tmp_path / "exported").config == cfg


def test_a_lillm_moe_model_exports_to_transformers_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = make(router_z_coef=0.001)
    with torch.no_grad():
        for block in model.model.layers:
            block.block_sparse_moe.gate.weight.normal_(0.0, 0.5)
    export_llama(model, tmp_path / "out")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert max_diff_on_real_tokens(reference, model) < 1e-4
    assert import_llama(tmp_path / "out").config == model.config  # coefficients included
