"""Accuracy, agreement with the teacher, size and latency."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn

from kdpipe.views import ViewPolicy


def eval_params(policy: ViewPolicy, sample_shape, n: int) -> np.ndarray:
    """Replay parameters of the clean view (each op says what its clean parameters are)."""
    return policy.eval_params(sample_shape, n)


def top1(logits: torch.Tensor | np.ndarray, labels) -> float:
    lg = torch.as_tensor(logits)
    lb = torch.as_tensor(labels, device=lg.device)
    return float((lg.argmax(1) == lb).float().mean()) if len(lb) else float("nan")


def agreement(student_logits, teacher_logits) -> float:
    s = torch.as_tensor(student_logits)
    t = torch.as_tensor(teacher_logits, device=s.device)
    return float((s.argmax(1) == t.argmax(1)).float().mean())


@torch.no_grad()
def cpu_latency_ms(model: nn.Module, image_shape, repeats: int = 30, warmup: int = 5) -> float:
    """Median wall time of one forward pass of a single image on the CPU, in milliseconds."""
    import copy
    m = copy.deepcopy(model).to("cpu").to(memory_format=torch.contiguous_format).eval()
    x = torch.randn(1, *image_shape)
    for _ in range(warmup):
        m(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        m(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000.0)
