"""The Trainer bitcpm trains with: transformers' Trainer plus a finite-loss check on every micro-batch (a NaN / inf
loss stops the run, the last good checkpoint kept), optional knowledge distillation from a teacher, and FSDP2 on CPU
processes.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from bitcpm_cli.core.errors import CheckFailed
from bitcpm_cli.core.training.distributed import enable_fsdp_on_cpu


class TrainingDiverged(CheckFailed):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint is kept."""


class QATTrainer(Trainer):
    """Trainer with a finite-loss check on every micro-batch and optional knowledge distillation."""

    def __init__(self, *args: Any, teacher: Any = None, kd_temperature: float = 2.0, kd_weight: float = 0.5,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.teacher, self.kd_temperature, self.kd_weight = teacher, kd_temperature, kd_weight

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        enable_fsdp_on_cpu(self)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.teacher is not None:
            kd = distillation_loss(outputs.logits, self.teacher, inputs, self.kd_temperature)
            loss = (1 - self.kd_weight) * loss + self.kd_weight * kd
        if not torch.isfinite(loss.detach()).all():
            raise TrainingDiverged(f"the loss became {loss.detach().float().item()} at step {self.state.global_step + 1}",
                                   hint="lower --lr, check the data near this step, then continue with --resume")
        return (loss, outputs) if return_outputs else loss


def distillation_loss(student_logits: torch.Tensor, teacher: Any, inputs: dict[str, Any],
                      temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened logits, times T^2, averaged over the real tokens."""
    with torch.no_grad():
        teacher_logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                 position_ids=inputs.get("position_ids")).logits  # packed: per-example positions
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    target = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = torch.nn.functional.kl_div(student, target, log_target=True, reduction="none").sum(-1)
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(per_token) if mask is None else mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1) * temperature**2
