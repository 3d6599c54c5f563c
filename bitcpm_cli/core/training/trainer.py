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
    """Trainer with a finite-loss check on every micro-batch and optional knowledge distillation (`kd_loss`: kl or
    mse); the KD term, averaged over the micro-batches since the last log, is logged as `kd_loss`."""

    def __init__(self, *args: Any, teacher: Any = None, kd_temperature: float = 2.0, kd_weight: float = 0.5,
                 kd_loss: str = "kl", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.teacher, self.kd_temperature, self.kd_weight, self.kd_loss = teacher, kd_temperature, kd_weight, kd_loss
        self._kd_sum, self._kd_count = 0.0, 0

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """Trainer.train; the teacher is let go once training has ended, before the final save (at the 1B shape its
        bf16 weights are 3 GiB of the save's peak)."""
        try:
            return super().train(*args, **kwargs)
        finally:
            self.teacher = None

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        enable_fsdp_on_cpu(self)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.teacher is not None:
            if self.kd_loss == "mse":
                kd = mse_distillation_loss(outputs.logits, self.teacher, inputs)
            else:
                kd = distillation_loss(outputs.logits, self.teacher, inputs, self.kd_temperature)
            if model.training:
                self._kd_sum += float(kd.detach())
                self._kd_count += 1
            loss = (1 - self.kd_weight) * loss + self.kd_weight * kd
        if not torch.isfinite(loss.detach()).all():
            raise TrainingDiverged(f"the loss became {loss.detach().float().item()} at step {self.state.global_step + 1}",
                                   hint="lower --lr, check the data near this step, then continue with --resume")
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds `kd_loss` (the unweighted KD term, mean over the micro-batches since the last log and the ranks)."""
        if self.teacher is not None and "loss" in logs and self._kd_count:
            mean = torch.tensor(self._kd_sum / self._kd_count, device=self.args.device)
            if self.args.world_size > 1:
                mean = self.accelerator.reduce(mean, reduction="mean")
            logs["kd_loss"] = round(float(mean), 8)
            self._kd_sum, self._kd_count = 0.0, 0
        super().log(logs, *args, **kwargs)


def _teacher_logits(teacher: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """The teacher's logits for the student's batch, without autograd (the teacher is frozen, in eval mode)."""
    with torch.no_grad():
        return teacher(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                       position_ids=inputs.get("position_ids")).logits  # packed: per-example positions


def _masked_mean(per_token: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(per_token) if mask is None else mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def distillation_loss(student_logits: torch.Tensor, teacher: Any, inputs: dict[str, Any],
                      temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened logits, times T^2, averaged over the real tokens."""
    teacher_logits = _teacher_logits(teacher, inputs)
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    target = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = torch.nn.functional.kl_div(student, target, log_target=True, reduction="none").sum(-1)
    return _masked_mean(per_token, inputs) * temperature**2


def mse_distillation_loss(student_logits: torch.Tensor, teacher: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """The CANN Kit's KD loss: (student - teacher logits)^2 in float32, mean over the vocabulary and the real tokens
    (the attention mask, as KL's), no temperature."""
    teacher_logits = _teacher_logits(teacher, inputs)
    per_token = (student_logits.float() - teacher_logits.float()).square().mean(-1)
    return _masked_mean(per_token, inputs)
