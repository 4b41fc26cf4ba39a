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
def cpu_latency_ms(model: nn.Module, image_shape, repeats: int = 30, warmup: int = 5, batch: int = 1,
                   dtype: torch.dtype = torch.float32) -> float:
    """Median wall time of one forward pass of a batch of `batch` inputs on the CPU, per input, in
    milliseconds (batch 1: the latency of one image). `dtype` uint8 feeds pixels 0..255 (an exported
    model that normalizes its own input)."""
    import copy
    m = copy.deepcopy(model).to("cpu").to(memory_format=torch.contiguous_format).eval()
    if dtype == torch.uint8:
        x = torch.randint(0, 256, (batch, *image_shape), dtype=torch.uint8)
    else:
        x = torch.randn(batch, *image_shape)
    for _ in range(warmup):
        m(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        m(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000.0 / batch)


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), its logical cores, torch's threads."""
    import os
    import platform
    name = platform.processor() or platform.machine() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"
