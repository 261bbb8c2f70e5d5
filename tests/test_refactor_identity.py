"""The layout refactor (issue 12) moved code, not behaviour: logits, greedy tokens and the losses of
two training steps on a fixed seed are bit-identical to a reference stored before the change
(tests/reference/refactor_identity.json, made by `python tests/test_refactor_identity.py --write`)."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from lillm.config import get_preset
from lillm.generate import generate
from lillm.model import Transformer
from lillm.train import TrainConfig, train

REFERENCE = Path(__file__).parent / "reference" / "refactor_identity.json"


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().float().numpy().tobytes()).hexdigest()


class FixedBatches:
    """Two optimizer steps of two micro batches each, drawn from a seeded generator."""

    def __init__(self):
        self.step = 0

    def next_step(self):
        g = torch.Generator().manual_seed(100 + self.step)
        self.step += 1
        ids = torch.randint(3, 8192, (2, 2, 33), generator=g)
        return [{"input_ids": ids[i, :, :-1], "labels": ids[i, :, 1:]} for i in range(2)]

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def measure(tmp: Path) -> dict:
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny"))
    ids = torch.randint(3, 8192, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    tokens = generate(model, prompts, max_new_tokens=12, temperature=0.0)
    sampled = generate(model, prompts, max_new_tokens=12, temperature=1.0, top_k=50, seed=0)
    cfg = TrainConfig(out_dir=str(tmp / "run"), max_steps=2, lr=1e-3, warmup_steps=1, eval_every=0,
                      save_every=0, log_every=1)
    metrics = train(model, FixedBatches(), cfg)
    return {"logits_sha256": digest(logits), "logits_first": logits[0, 0, :4].tolist(),
            "greedy_tokens": tokens, "sampled_tokens": sampled, "loss_step2": metrics["loss"],
            "weights_sha256": digest(torch.cat([p.flatten() for p in model.parameters()]))}


def test_logits_tokens_and_training_loss_unchanged_by_the_refactor(tmp_path):
    expected = json.loads(REFERENCE.read_text())
    assert measure(tmp_path) == expected


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        REFERENCE.write_text(json.dumps(measure(Path(tmp)), indent=1) + "\n")
    print(REFERENCE.read_text())
