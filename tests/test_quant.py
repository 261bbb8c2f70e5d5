"""Int8 decoding (lillm/quant.py) against the fp32 model, which stays the reference."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import inference
from lillm import checkpoint as ckpt
from lillm.config import get_preset
from lillm.generate import StaticDecoder, generate
from lillm.model import Transformer
from lillm.quant import Int8Linear, native_int8_op, quantize_int8, quantize_rows
from lillm.tokenizer import train_bpe

KERNELS = ["fbgemm", "weight-only", "dequant"]
# Documented bound for the tiny preset at its own initialisation: the largest logit difference
# from fp32, relative to the largest fp32 logit (measured 0.4% for weight rounding alone, 1.0% when
# fbgemm also rounds activations). Each layer's error is bounded exactly (see the Int8Linear test);
# through a whole model it is measured, and on trained models reported as the held-out loss change
# (README, Deploy). A wrong scale (per column, or none) misses these by orders of magnitude.
LOGIT_BOUND = {"fbgemm": 0.02, "weight-only": 0.008, "dequant": 0.008}


def tiny_model(**changes) -> Transformer:
    torch.manual_seed(0)
    return Transformer(get_preset("tiny", vocab_size=512, d_ff=192, **changes)).eval()


def test_rows_round_to_half_a_step_of_their_own_scale():
    w = torch.tensor([[0.5, -1.0, 0.25], [100.0, 3.0, -50.0]])
    int8, scales = quantize_rows(w)
    assert torch.allclose(scales, torch.tensor([1.0, 100.0]) / 127)
    assert int8.tolist() == [[64, -127, 32], [127, 4, -64]]  # 63.5 rounds to even: 64
    back = int8.float() * scales[:, None]
    assert bool(((back - w).abs() <= scales[:, None] / 2 + 1e-6).all())


@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_linear_multiplies_by_the_dequantized_matrix(kernel):
    torch.manual_seed(0)
    w, x = torch.randn(96, 64), torch.randn(2, 3, 64)
    layer = Int8Linear(w, kernel)
    reference = F.linear(x, layer.dequantized())
    out = layer(x)
    assert out.shape == (2, 3, 96)
    # against the fp32 weights: each weight is off by at most half its row's step, so an output
    # is off by at most sum_k |x_k| * step / 2 (plus fbgemm's activation rounding)
    exact = F.linear(x, w)
    weight_bound = x.abs().sum(-1, keepdim=True) * layer.scales / 2
    if kernel != "fbgemm":
        assert bool(((out - exact).abs() <= weight_bound + 1e-4).all())
    # fbgemm rounds the activations to 7 bits: half a step of max|x| / 127 per element
    tolerance = 2e-2 * reference.abs().max() if kernel == "fbgemm" else 1e-4
    assert float((out - reference).abs().max()) <= tolerance


@pytest.mark.parametrize("kernel", KERNELS)
def test_quantized_logits_stay_within_the_documented_bound(kernel):
    model = tiny_model()
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids)
        quantized = quantize_int8(model, kernel)(ids)
    relative = float((quantized - reference).abs().max() / reference.abs().max())
    assert relative <= LOGIT_BOUND[kernel]
    assert float((quantized.argmax(-1) == reference.argmax(-1)).float().mean()) >= 0.9


def test_original_model_is_untouched_and_shared_mlp_stays_shared():
    model = tiny_model(shared_mlp=True, n_layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = quantize_int8(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.lm_head, torch.nn.Linear)
    mlps = {id(block.mlp.gate_up_proj) for block in quantized.model.layers}
    assert len(mlps) == 1 and isinstance(quantized.model.layers[2].mlp.gate_up_proj, Int8Linear)
    assert isinstance(quantized.model.layers[2].mlp.down_proj, Int8Linear)
    assert isinstance(quantized.lm_head, Int8Linear)
    # the tied embedding itself stays fp32: a token reads one row of it
    assert quantized.model.embed_tokens.weight.dtype == torch.float32


@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_projections_give_the_unfused_layers_outputs(kernel):
    """q/k/v and gate/up stacked into one int8 matrix each: every row keeps its scale and fbgemm
    rounds a call's activations once for all rows, so the logits are the unfused model's (to the
    bit for the int8 kernels; dequant's fp32 matmul may sum in another order) and one matmul runs
    where three and two did."""
    model = tiny_model(shared_mlp=True, n_layers=3)
    fused, separate = quantize_int8(model, kernel), quantize_int8(model, kernel, fuse=False)
    attention, mlp = fused.model.layers[1].self_attn, fused.model.layers[1].mlp
    assert attention.qkv_proj.out_features == (4 + 2 + 2) * 16 and not hasattr(attention, "q_proj")
    assert mlp.gate_up_proj.out_features == 2 * 192 and not hasattr(mlp, "up_proj")
    assert separate.model.layers[1].self_attn.qkv_proj is None
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, expected = fused(ids), separate(ids)
    if kernel == "dequant":
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(got, expected)
    assert generate(fused, [[5, 9, 33]], 8, temperature=0) == generate(separate, [[5, 9, 33]], 8, temperature=0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_kv_cache_decoding_equals_the_full_forward_of_the_quantized_model(kernel):
    model = quantize_int8(tiny_model(), kernel)
    prompts = [[5, 9, 33, 100, 7], [200, 11, 3]]  # different lengths: left padding and per-row positions
    new = generate(model, prompts, max_new_tokens=12, temperature=0)
    for prompt, tokens in zip(prompts, new):
        with torch.no_grad():
            full = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1]
        chosen = full.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        gap = full.max(-1).values - chosen
        if kernel == "fbgemm":
            # one activation scale per call: a cached step (one row) and the full forward (all rows)
            # round activations differently, so a token may lose to a near-tie by that rounding
            assert float(gap.max()) <= LOGIT_BOUND[kernel] * float(full.abs().max())
        else:
            assert float(gap.max()) <= 1e-4 * float(full.abs().max())


def test_inference_quantize_flag_decodes(tmp_path, capsys):
    text = ["Habari za asubuhi, rafiki yangu.", "Ina kwana? Lafiya lau."] * 20
    tokenizer = train_bpe(text, vocab_size=300, show_progress=False)
    tokenizer.save(tmp_path / "tok.json")
    torch.manual_seed(0)
    ckpt.save_checkpoint(tmp_path / "ckpt", Transformer(get_preset("tiny", vocab_size=300)),
                         tokenizer_path=tmp_path / "tok.json")
    inference.main([str(tmp_path / "ckpt"), "--prompt", "Habari", "--quantize", "int8", "--device", "cpu",
                    "--temperature", "0", "--max-new-tokens", "5"])
    assert capsys.readouterr().out.startswith("Habari")


def test_the_int8_kernels_lillm_uses_are_still_in_torch():
    """Fails loudly the day torch drops a kernel lillm/quant.py builds on (its docstring says why
    fbgemm stays although torch deprecates quantized tensors): then "auto" must move to another."""
    assert "fbgemm" in torch.backends.quantized.supported_engines, "torch lost fbgemm: the int8 default is gone"
    for name in ("_make_per_channel_quantized_tensor", "_weight_int8pack_mm"):
        assert hasattr(torch, name), f"torch.{name} is gone: lillm/quant.py's int8 kernels need another home"
    for op in (torch.ops.quantized.linear_prepack, torch.ops.quantized.linear_dynamic):
        assert op.default is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lillm silences the deprecation it documents, nothing else
        Int8Linear(torch.randn(8, 16), "fbgemm")


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_compiled_step_of_an_int8_model_traces_whole_and_decodes_as_eager(kernel):
    """torch.compile traces the fixed-shape step of an int8 model as one graph (fbgemm's packed
    weight goes through lillm's custom operator); the eager backend traces without compiling, so
    the default run stays fast. Inductor itself: the slow test below and bench.deploy."""
    model = quantize_int8(tiny_model(), kernel=kernel)
    prompts = [[5, 9, 11, 3, 7], [8, 2]]
    expected = generate(model, prompts, max_new_tokens=6, temperature=0)
    decoder = StaticDecoder(model, backend="eager", mode=None)
    assert generate(model, prompts, max_new_tokens=6, temperature=0, compile=decoder) == expected


@pytest.mark.slow
def test_the_cpp_int8_operator_builds_and_gives_fbgemms_numbers():
    """lillm/fbgemm_int8.cpp (built by torch's extension loader, as inductor builds its kernels)
    calls the same fbgemm kernel as the eager layer: the same bits."""
    assert native_int8_op(), "the C++ operator did not build: see the warning"
    layer = Int8Linear(torch.randn(96, 64), "fbgemm")
    layer.before_compile("inductor")
    assert layer.compiled_call[0] == "native"
    x = torch.randn(3, 64)
    assert torch.equal(torch.ops.lillm.fbgemm_int8_linear_native(x, layer.compiled_call[1], 96), layer(x))


@pytest.mark.slow
def test_inductor_compiled_decoding_on_the_cpu_equals_eager_for_fp32_and_int8():
    """The real compile (C++ kernels and wrapper; minutes on a 2-core machine): same greedy tokens
    as eager, for one prompt and a padded batch."""
    fp32 = tiny_model()
    for model in (fp32, quantize_int8(fp32)):
        for prompts in ([[5, 9, 11, 3, 7]], [[5, 9, 11, 3, 7], [8, 2]]):
            expected = generate(model, prompts, max_new_tokens=12, temperature=0)
            decoder = StaticDecoder(model, backend="inductor")
            assert generate(model, prompts, max_new_tokens=12, temperature=0, compile=decoder) == expected
