"""Knowledge distillation: heal a pruned student by matching its teacher's distribution.

A pruned model has lost capacity, not knowledge of what text looks like: its unpruned
parent still knows. Hinton et al. (2015, "Distilling the Knowledge in a Neural Network")
train the student on the teacher's softened distribution, softmax(logits / T), which
carries far more signal per token than the one-hot label ("dark knowledge": which wrong
tokens are nearly right). Minitron (Muralidharan et al., 2024) found that healing a pruned
model with logit distillation beats healing with the plain language-model loss.

The loss per target token (labels != -100) is

    alpha * T^2 * KL(p_teacher^T || p_student^T)  +  (1 - alpha) * cross_entropy(student, label)

where p^T = softmax(logits / T). The T^2 keeps the KL gradient's scale independent of T
(the gradients of softened logits shrink as 1/T^2). Like lillm.train's causal_lm_loss,
`distillation_loss(...)` returns a loss_fn giving the SUM over target tokens and their
count, so gradient accumulation and data parallelism stay exact.

Vocabularies. The two models must agree on what logit column k means. A student whose
vocabulary was shrunk keeps a subset of the teacher's ids: pass `teacher_token_ids`
(the teacher id of each student id, in student order) and the teacher's logits are
gathered at those columns. Its softmax is then taken over the kept ids only: the teacher's
mass on dropped tokens is redistributed proportionally, which is the best target a student
unable to produce those tokens can match. The teacher must also READ the student's
inputs in its own ids: wrap it in `lillm.vocab_shrink.OldIdTeacher(teacher, kept_old_ids)`,
which maps new id k to `kept_old_ids[k]`.

The teacher is frozen: put in eval mode, its parameters set to requires_grad=False, and run
under torch.no_grad(); it is moved to the batch's device on first use.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import DistillationError


def kl_divergence_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Sum over rows of KL(softmax(teacher / T) || softmax(student / T)); logits are (N, vocab)."""
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum")


def _forward(model, batch: dict) -> torch.Tensor:
    return model(batch["input_ids"], position_ids=batch.get("position_ids"),
                 attention_mask=batch.get("attention_mask"), segment_ids=batch.get("segment_ids"))


def distillation_loss(teacher: nn.Module, temperature: float = 2.0, alpha: float = 0.5,
                      teacher_token_ids: torch.Tensor | None = None):
    """A loss_fn(model, batch) -> (summed loss, target count) for lillm.train.train (see the module docstring)."""
    if temperature <= 0:
        raise DistillationError(f"temperature={temperature} must be positive (1 = the plain distributions, 2 is usual)")
    if not 0.0 <= alpha <= 1.0:
        raise DistillationError(f"alpha={alpha} weighs the KL term against cross-entropy and must lie in [0, 1]")
    if teacher_token_ids is not None:
        teacher_token_ids = torch.as_tensor(teacher_token_ids, dtype=torch.long)
        if teacher_token_ids.dim() != 1:
            raise DistillationError("teacher_token_ids must be 1-D: the teacher id of each student id, in order")
        teacher_vocab = getattr(getattr(teacher, "config", None), "vocab_size", None)
        if teacher_vocab is not None and len(teacher_token_ids) and not (
                0 <= teacher_token_ids.min() and teacher_token_ids.max() < teacher_vocab):
            raise DistillationError(f"teacher_token_ids must lie in [0, {teacher_vocab}) (the teacher's vocabulary), "
                                    f"got {teacher_token_ids.min().item()}..{teacher_token_ids.max().item()}")
    teacher.eval()
    teacher.requires_grad_(False)

    def loss_fn(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        targets = labels != -100
        student = _forward(model, batch)[targets].float()  # (N, vocab): only the positions that count
        count = targets.sum()
        ce = F.cross_entropy(student, labels[targets], reduction="sum")
        if alpha == 0.0:
            return ce, count
        with torch.no_grad():
            device = batch["input_ids"].device
            if next(teacher.parameters()).device != device:
                teacher.to(device)
            teacher_logits = _forward(teacher, batch)[targets].float()
            if teacher_token_ids is not None:
                teacher_logits = teacher_logits[:, teacher_token_ids.to(device)]
        if teacher_logits.shape[-1] != student.shape[-1]:
            raise DistillationError(
                f"the teacher gives {teacher_logits.shape[-1]} logits per token, the student {student.shape[-1]}: "
                "for a student with a shrunk vocabulary pass teacher_token_ids (the teacher id of each student id)")
        kl = kl_divergence_sum(student, teacher_logits, temperature)
        return alpha * temperature ** 2 * kl + (1 - alpha) * ce, count

    return loss_fn
