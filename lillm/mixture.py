"""Mid-training: the tasks' own rows mixed into the last part of pretraining.

A small model that first sees translation pairs and labelled tweets only in a short SFT stage at
the end has little time to learn what the tasks ask. nanochat's mid-training (Karpathy, 2025)
puts conversations into the pretraining stream before SFT; curriculum papers on "annealing"
(MiniCPM, Hu et al., 2024; Llama 3, 2024) do the same in the decay phase: the highest-value data
goes where the learning rate comes down. Here, from a chosen step on, a fixed share of every
optimizer step's micro batches are packed task conversations (lillm/sft.py's batches) instead of
windows of pretraining text. The step's token count does not change, so the learning-rate
schedule, the throughput and the loss contract of lillm/train.py stay as they are: each micro
batch brings its own (summed loss, target count) and the step divides by the total.

The conversations are trained either on their assistant tokens only (what SFT does) or on every
token (what nanochat's mid-training does: the model also learns to read the instructions and the
English sources); `loss_on` chooses.
"""
from __future__ import annotations

from .data import StepBatches
from .errors import FlagError
from .sft import SFTBatches


class TaskMixture:
    """A batch source for lillm.train.train: pretraining micro batches, and from `start_step` on,
    `task_micro` of each step's `accum` micro batches replaced by packed task conversations."""

    def __init__(self, text: StepBatches, tasks: SFTBatches, accum: int, task_micro: int, start_step: int):
        if not 1 <= task_micro <= accum:
            raise ValueError(f"task_micro must be within 1..accum ({accum}), got {task_micro}")
        if tasks.accum != task_micro:
            raise ValueError(f"the task batches give {tasks.accum} micro batches per step, not {task_micro}")
        self.text, self.tasks, self.accum, self.task_micro = text, tasks, accum, task_micro
        self.start_step, self.step = start_step, 0

    def next_step(self) -> list[dict]:
        # The text stream is drawn in full every step, so its windows after start_step are the ones
        # a run without tasks would see (the replaced micro batches are simply not used).
        text = self.text.next_step()
        step, self.step = self.step, self.step + 1
        if step < self.start_step:
            return text
        return text[:self.accum - self.task_micro] + self.tasks.next_step()

    def state_dict(self) -> dict:
        return {"step": self.step, "start_step": self.start_step, "task_micro": self.task_micro,
                "text": self.text.state_dict(), "tasks": self.tasks.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("start_step", "task_micro"):
            if state.get(key) != getattr(self, key):
                raise FlagError(f"--resume: the run mixed tasks with {key}={state.get(key)!r} but this run asks for "
                                 f"{getattr(self, key)!r}: resume with the same --task-share and --task-start")
        self.text.load_state_dict(state["text"])
        self.tasks.load_state_dict(state["tasks"])
        self.step = int(state["step"])


def task_micro_batches(accum: int, share: float) -> int:
    """How many of a step's `accum` micro batches carry tasks for a share in (0, 1]: at least one."""
    return min(accum, max(1, round(share * accum)))
