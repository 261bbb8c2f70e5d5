import pytest
import torch

from lillm.config import get_preset
from lillm.loss import causal_lm_loss
from lillm.model import Transformer


@pytest.mark.parametrize("tied", [True, False])
def test_fused_head_and_loss_give_the_plain_loss_and_gradients(tied):
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=53, max_seq_len=32, tie_embeddings=tied))
    x = torch.randint(0, 53, (3, 17))
    labels = torch.randint(0, 53, (3, 17))
    labels[0, :5] = -100
    batch = {"input_ids": x, "labels": labels}

    def grads(fused_chunk):
        model.zero_grad()
        if fused_chunk:
            loss, n = causal_lm_loss(model, batch, chunk=fused_chunk)
        else:
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                     reduction="sum")
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    plain_loss, plain = grads(None)
    fused_loss, fused = grads(7)  # a chunk that does not divide the 51 rows
    assert fused_loss.item() == pytest.approx(plain_loss.item(), rel=1e-6)
    for name in plain:
        assert torch.allclose(fused[name], plain[name], rtol=1e-4, atol=1e-6), name


def test_fused_loss_under_bf16_autocast_matches_the_plain_loss_in_bf16():
    """The GPU training path: autocast makes every matmul bf16, the fused one's weight gradient too.
    Here CPU autocast stands in for CUDA's; bf16 products agree to about 1e-2."""
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=53, max_seq_len=32))
    x, labels = torch.randint(0, 53, (2, 16)), torch.randint(0, 53, (2, 16))

    def loss_and_grads(fused):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                loss, _ = causal_lm_loss(model, {"input_ids": x, "labels": labels}, chunk=8)
            else:
                loss = torch.nn.functional.cross_entropy(model(x).float().flatten(0, 1), labels.flatten(),
                                                         reduction="sum")
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    plain_loss, plain = loss_and_grads(False)
    fused_loss, fused = loss_and_grads(True)
    assert fused_loss == pytest.approx(plain_loss, rel=1e-2)
    assert ((fused - plain).norm() / plain.norm()).item() < 2e-2
