"""KD losses that work from logits alone.

Vanilla KD (Hinton et al. 2015):
    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)
alpha = 0 is plain cross-entropy (the from-scratch baseline) through the same loop.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def kd_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch, computed in float32."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


class KDLoss(nn.Module):
    """alpha * T^2 * KL + (1 - alpha) * CE; one module per (T, alpha)."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0

    def forward(self, student_logits, teacher_logits, labels):
        loss = student_logits.new_zeros((), dtype=torch.float32)
        if self.alpha < 1.0:
            loss = loss + (1.0 - self.alpha) * F.cross_entropy(student_logits.float(), labels)
        if self.alpha > 0.0:
            loss = loss + self.alpha * kd_div(student_logits, teacher_logits, self.temperature)
        return loss
