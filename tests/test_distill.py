import copy
import math

import pytest
import torch
import torch.nn as nn

from lillm.config import get_preset
from lillm.distill import DistillationError, distillation_loss, kl_divergence_sum
from lillm.model import Transformer
from lillm.prune import prune_width
from lillm.loss import causal_lm_loss
from lillm.train import TrainConfig, train

VOCAB = 53


def tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(get_preset("tiny", vocab_size=VOCAB, max_seq_len=32))


def batch(seed=0, ignore_first=3):
    x = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(seed))
    labels = x[:, 1:].clone()
    labels[:, :ignore_first] = -100  # e.g. a prompt
    return {"input_ids": x[:, :-1], "labels": labels}


class FixedLogits(nn.Module):
    """A 'model' whose logits are a parameter (1, T, V), whatever the input."""

    def __init__(self, rows):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([rows], dtype=torch.float32))

    def forward(self, input_ids, **_):
        return self.logits.expand(input_ids.shape[0], -1, -1)


def softmax(row, t):
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def test_kl_part_is_zero_when_the_student_is_a_copy_of_the_teacher():
    student = tiny()
    teacher = copy.deepcopy(student)
    b = batch()
    pure_kl, count = distillation_loss(teacher, temperature=2.0, alpha=1.0)(student, b)
    assert pure_kl.item() == pytest.approx(0.0, abs=1e-5)
    assert count.item() == 2 * 9
    mixed, _ = distillation_loss(teacher, temperature=2.0, alpha=0.5)(student, b)
    ce, _ = causal_lm_loss(student, b)
    assert mixed.item() == pytest.approx(0.5 * ce.item(), rel=1e-5)


def test_loss_equals_a_hand_computation():
    student_rows = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [0.0, 0.0, 3.0]]
    teacher_rows = [[2.0, 0.0, 0.0], [0.0, 1.0, 1.0], [9.0, 9.0, 9.0]]
    b = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "labels": torch.tensor([[0, 1, -100]])}
    T, alpha = 2.0, 0.3
    loss, count = distillation_loss(FixedLogits(teacher_rows), T, alpha)(FixedLogits(student_rows), b)
    kl = ce = 0.0
    for s, t, label in zip(student_rows[:2], teacher_rows[:2], [0, 1]):  # the third position is ignored
        ps, pt = softmax(s, T), softmax(t, T)
        kl += sum(q * math.log(q / p) for q, p in zip(pt, ps))
        ce -= math.log(softmax(s, 1.0)[label])
    assert count.item() == 2
    assert loss.item() == pytest.approx(alpha * T * T * kl + (1 - alpha) * ce, rel=1e-6)


def test_teacher_gets_no_gradient_and_the_student_does():
    student, teacher = tiny(seed=0), tiny(seed=1)
    loss, _ = distillation_loss(teacher)(student, batch())
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    assert all(p.grad is not None for p in student.parameters())


def test_teacher_token_ids_gather_the_teacher_columns_of_a_shrunk_vocabulary():
    teacher_rows = [[0.0, 5.0, 1.0, 2.0, -1.0]]
    student_rows = [[0.3, -0.2, 1.0]]
    ids = torch.tensor([4, 1, 3])  # student id j is teacher id ids[j]
    b = {"input_ids": torch.zeros(1, 1, dtype=torch.long), "labels": torch.tensor([[2]])}
    loss_fn = distillation_loss(FixedLogits(teacher_rows), 1.0, 1.0, teacher_token_ids=ids)
    loss, _ = loss_fn(FixedLogits(student_rows), b)
    expected = kl_divergence_sum(torch.tensor(student_rows), torch.tensor([[-1.0, 5.0, 2.0]]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(DistillationError, match="pass teacher_token_ids"):
        distillation_loss(FixedLogits(teacher_rows))(FixedLogits(student_rows), b)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), "temperature=0.0 must be positive"),
    (dict(alpha=1.5), r"must lie in \[0, 1\]"),
    (dict(teacher_token_ids=torch.tensor([0, VOCAB])), r"must lie in \[0, 53\)"),
])
def test_bad_settings_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(DistillationError, match=message):
        distillation_loss(tiny(), **kwargs)


class SameBatch:
    def next_step(self):
        return [batch(seed=5, ignore_first=0)]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_a_pruned_student_heals_with_the_training_loop_and_the_teacher_is_unchanged(tmp_path):
    teacher = tiny()
    student = prune_width(teacher, hidden_keep=torch.arange(48), ffn_keep=torch.arange(128))
    before = {n: p.clone() for n, p in teacher.state_dict().items()}
    loss_fn = distillation_loss(teacher, temperature=2.0, alpha=1.0)
    first, _ = loss_fn(student, SameBatch().next_step()[0])
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=8, lr=3e-3, warmup_steps=1, eval_every=0, save_every=0)
    train(student, SameBatch(), cfg, loss_fn=loss_fn)
    after, _ = loss_fn(student, SameBatch().next_step()[0])
    assert after < first
    assert all(torch.equal(before[n], p) for n, p in teacher.state_dict().items())
