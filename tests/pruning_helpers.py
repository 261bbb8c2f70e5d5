"""Small models and batches shared by the pruning and importance tests (tests/test_prune.py,
tests/test_importance.py)."""
import torch

from lillm.config import get_preset
from lillm.model import Transformer

VOCAB = 61
# tiny: d 64, 4 query heads and 2 kv heads of dim 16, FFN 176.
VARIANTS = [dict(), dict(tie_embeddings=False), dict(shared_mlp=True), dict(n_kv_heads=4)]


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    overrides = {"n_layers": 3, **overrides}
    model = Transformer(get_preset("tiny", vocab_size=VOCAB, max_seq_len=32, **overrides)).eval()
    with torch.no_grad():  # norms start at 1: make them differ so rescaling them is tested
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def tokens(seed=1, batch=2, length=12):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x=None):
    with torch.no_grad():
        return model(tokens() if x is None else x)


def batches(n=2, mask_tail=0):
    out = []
    for s in range(n):
        x = tokens(seed=10 + s)
        batch = {"input_ids": x, "labels": x}
        if mask_tail:
            batch["attention_mask"] = torch.ones_like(x)
            batch["attention_mask"][:, -mask_tail:] = 0
        out.append(batch)
    return out


def make_identity(model, layer):
    with torch.no_grad():
        model.model.layers[layer].self_attn.o_proj.weight.zero_()
        model.model.layers[layer].mlp.down_proj.weight.zero_()
