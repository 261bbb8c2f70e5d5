import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lillm.nf4 import (CODE_BOOK, NF4_PUBLISHED, NF4Linear, block_scales, dequantize_nf4, error_bound, max_half_gap,
                       nf4_code_book, pack_nibbles, quantize_nf4, unpack_nibbles)


def test_code_book_derived_from_normal_quantiles_matches_the_published_table():
    derived = nf4_code_book()
    assert derived.shape == (16,)
    assert torch.allclose(derived, torch.tensor(NF4_PUBLISHED), atol=1e-6)
    assert derived[0] == -1.0 and derived[-1] == 1.0 and (derived == 0).sum() == 1  # exact zero, 8 up, 7 down
    assert (derived[1:] > derived[:-1]).all()


def test_max_half_gap_is_the_widest_bin_of_the_code_book():
    assert max_half_gap() == pytest.approx((1 - 0.6961928009986877) / 2, abs=1e-6)


def test_two_codes_pack_into_one_byte_first_in_the_high_nibble():
    codes = torch.tensor([1, 2, 15, 0, 7, 9], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0x12, 0xF0, 0x79]
    assert torch.equal(unpack_nibbles(packed), codes)


def test_every_code_is_the_nearest_code_book_value_of_its_block_normalised_weight():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    q = quantize_nf4(w)
    codes = unpack_nibbles(q.packed).long().view(-1, 64)
    normalised = w.view(-1, 64) / w.view(-1, 64).abs().amax(dim=1, keepdim=True)
    nearest = (normalised[..., None] - CODE_BOOK).abs().argmin(dim=-1)
    assert torch.equal(codes, nearest)
    # each block's largest magnitude lands exactly on -1 or +1
    assert set(codes.gather(1, normalised.abs().argmax(1, keepdim=True)).flatten().tolist()) <= {0, 15}


def test_block_scales_are_the_block_absmax_double_quantised_int8_in_blocks_of_256():
    torch.manual_seed(0)
    w = torch.randn(600, 64) * 0.02  # 600 blocks of 64 -> 3 scale blocks of 256 (last one padded)
    q = quantize_nf4(w)
    assert q.packed.numel() == w.numel() // 2
    assert q.scale_codes.dtype == torch.int8 and q.scale_codes.numel() == 600
    assert q.scale_absmax.dtype == torch.float32 and q.scale_absmax.shape == (3,)
    assert q.scale_offset.dtype == torch.float32 and q.scale_offset.dim() == 0
    true_absmax = w.view(-1, 64).abs().amax(dim=1)
    assert q.scale_offset == pytest.approx(true_absmax.mean().item())
    step = q.scale_absmax.repeat_interleave(256)[:600] / 127
    assert ((block_scales(q) - true_absmax).abs() <= step / 2 + 1e-9).all()
    bits_per_weight = q.nbytes() * 8 / w.numel()
    assert bits_per_weight < 4 + 8 / 64 + 3 * 32 / w.numel() + 32 / w.numel()  # codes, int8 scales, 3 absmax, offset


@pytest.mark.parametrize("kind", ["normal", "heavy_tailed", "tiny_blocks"])
def test_dequantisation_error_stays_within_the_documented_bound(kind):
    torch.manual_seed(1)
    w = torch.randn(96, 200)
    if kind == "heavy_tailed":
        w = torch.distributions.StudentT(2.0).sample((96, 200))
    if kind == "tiny_blocks":
        w[:10] *= 1e-6  # blocks with very different scales in the same scale block
    q = quantize_nf4(w)
    error = (w - dequantize_nf4(q)).abs()
    assert (error <= error_bound(w, q)).all()
    assert error.max() > 0


def test_shapes_that_are_not_a_multiple_of_the_block_round_trip():
    w = torch.randn(3, 10)
    assert dequantize_nf4(quantize_nf4(w)).shape == (3, 10)
    assert torch.equal(dequantize_nf4(quantize_nf4(torch.zeros(5, 7))), torch.zeros(5, 7))


def test_bad_inputs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="must be even"):
        quantize_nf4(torch.randn(4, 4), block_size=63)
    with pytest.raises(ValueError, match="floating-point"):
        quantize_nf4(torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="bias-free"):
        NF4Linear.from_linear(nn.Linear(4, 4, bias=True))


def test_nf4_linear_matches_its_dequantised_weight_and_passes_input_gradients():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=False)  # non-square
    layer = NF4Linear.from_linear(linear)
    dense = layer.dequantized_weight()
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = layer(x)
    assert torch.allclose(y, F.linear(x, dense), atol=1e-6)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, dense).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert list(layer.parameters()) == []  # nothing to train
    assert layer.to_linear().weight.shape == (48, 64)


def test_nf4_linear_state_dict_round_trips():
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(64, 32, bias=False))
    other = NF4Linear.from_linear(nn.Linear(64, 32, bias=False))
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.dequantized_weight(), layer.dequantized_weight())


def test_dequantised_values_are_code_book_entries_times_their_block_scale():
    torch.manual_seed(0)
    w = torch.randn(4, 128)
    q = quantize_nf4(w)
    codes = unpack_nibbles(q.packed).long().view(-1, 64)
    expected = CODE_BOOK[codes] * block_scales(q)[:, None]
    assert torch.equal(dequantize_nf4(q), expected.view(4, 128))


def test_casting_the_layer_to_bf16_keeps_the_scale_constants_in_fp32():
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(64, 32, bias=False))
    expected = layer.dequantized_weight()
    layer.to(torch.bfloat16)
    assert layer.weight_scale_absmax.dtype == torch.float32 and layer.weight_scale_offset.dtype == torch.float32
    assert torch.equal(layer.dequantized_weight(), expected)
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
