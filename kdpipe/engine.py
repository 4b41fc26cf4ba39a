"""The training loop shared by teacher training and stage two (cached or online KD).

One pass over the data trains any number of runs: each batch is replayed once on the device, the
teacher logits for it are fetched once (a slice of the cached view, or the online teacher's
forward pass), and every run steps on it. Readable in one sitting, on purpose.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from kdpipe.losses import KDLoss
from kdpipe.models import create_model
from kdpipe.util import Progress, seeded_generator
from kdpipe.views import ViewPolicy


@dataclass
class OptimConfig:
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step | constant
    nesterov: bool = False

    def lr_factor(self, step: int, total: int) -> float:
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))
        if self.schedule == "step":
            return 0.1 ** sum(step >= int(total * f) for f in (0.5, 0.75))
        return 1.0


@dataclass
class Run:
    name: str
    arch: str
    temperature: float
    alpha: float
    seed: int
    model: nn.Module = None
    loss: KDLoss = None
    optimizer: torch.optim.Optimizer = None
    scheduler: torch.optim.lr_scheduler.LRScheduler = None
    history: list = field(default_factory=list)


def build_run(name, arch, temperature, alpha, seed, num_classes, image_shape, optim: OptimConfig,
              total_steps: int, device) -> Run:
    torch.manual_seed(seed)
    model = create_model(arch, num_classes, image_shape).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": optim.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: optim.lr_factor(s, total_steps))
    return Run(name, arch, temperature, alpha, seed, model, KDLoss(temperature, alpha), opt, sched)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size if n >= batch_size else 1


def batches(n: int, batch_size: int, generator: torch.Generator, device) -> list[torch.Tensor]:
    """A shuffled epoch; the last partial batch is dropped (BatchNorm needs > 1 sample)."""
    perm = torch.randperm(n, generator=generator).to(device)
    k = steps_per_epoch(n, batch_size)
    return [perm[i * batch_size:(i + 1) * batch_size] for i in range(k)]


# epoch -> (view params (N, P) on device, teacher logits (N, C) float on device, or None)
ViewSource = Callable[[int], tuple[torch.Tensor, torch.Tensor | None]]


def train_pass(runs: list[Run], images: torch.Tensor, labels: torch.Tensor, policy: ViewPolicy,
               mean, std, epochs: int, batch_size: int, data_seed: int, view_source: ViewSource,
               online_teacher: nn.Module | None = None, online_dtype: torch.dtype = torch.float32,
               amp: bool = False, label: str = "train", log=print) -> dict:
    """Train every run for `epochs` over (images, labels) on their device; returns timing figures."""
    device = images.device
    n = len(images)
    need_teacher = any(r.loss.needs_teacher for r in runs)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    for r in runs:
        r.model.train()
    start = time.perf_counter()
    seen = 0
    for epoch in range(epochs):
        params, cached = view_source(epoch)
        prog = Progress(f"{label} epoch {epoch + 1}/{epochs}", steps_per_epoch(n, batch_size) * batch_size)
        sums = [torch.zeros((), device=device) for _ in runs]
        order = batches(n, batch_size, seeded_generator(data_seed, epoch), device)
        for idx in order:
            x = policy.replay(images[idx], params[idx], mean, std)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            y = labels[idx]
            t = None
            if need_teacher:
                if cached is not None:
                    t = cached[idx].float()
                else:
                    with torch.no_grad(), autocast:
                        t = online_teacher(x).to(online_dtype).float()
            for i, r in enumerate(runs):
                with autocast:
                    out = r.model(x)
                loss = r.loss(out, t, y)
                r.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                r.optimizer.step()
                r.scheduler.step()
                sums[i] += loss.detach()
            seen += len(idx)
            prog.update(len(idx))
        for i, r in enumerate(runs):
            r.history.append(float(sums[i]) / max(1, len(order)))
        if len(runs) <= 4:
            log(f"  {label} epoch {epoch + 1}/{epochs}: " +
                ", ".join(f"{r.name} loss {r.history[-1]:.4f}" for r in runs))
        else:
            log(f"  {label} epoch {epoch + 1}/{epochs}: mean loss "
                f"{sum(r.history[-1] for r in runs) / len(runs):.4f} over {len(runs)} runs")
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {"wall_s": wall, "images": seen, "images_per_s": seen / wall if wall > 0 else 0.0,
            "student_images_per_s": seen * len(runs) / wall if wall > 0 else 0.0}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, policy: ViewPolicy, params: torch.Tensor, mean, std,
            batch_size: int = 1024, amp: bool = False) -> torch.Tensor:
    """Logits (float32, on the images' device) of a model on views given by params, in order."""
    model.eval()
    autocast = torch.autocast(images.device.type, dtype=torch.bfloat16) if amp else nullcontext()
    outs = []
    for i in range(0, len(images), batch_size):
        x = policy.replay(images[i:i + batch_size], params[i:i + batch_size], mean, std)
        if images.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            outs.append(model(x).float())
    return torch.cat(outs)
