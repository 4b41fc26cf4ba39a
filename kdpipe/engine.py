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

from kdpipe.fused import FusedRuns, plan_units
from kdpipe.losses import KDLoss
from kdpipe.models import create_model
from kdpipe.util import Progress, channels_last, seeded_generator
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
    optim: OptimConfig | None = None  # how the optimizer and schedule were built (runs that share them can fuse)
    total_steps: int | None = None


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
    return Run(name, arch, temperature, alpha, seed, model, KDLoss(temperature, alpha), opt, sched,
               optim=optim, total_steps=total_steps)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size if n >= batch_size else 1


def batches(n: int, batch_size: int, generator: torch.Generator, device, rank: int = 0,
            world: int = 1) -> list[torch.Tensor]:
    """A shuffled epoch; the last partial batch is dropped (BatchNorm needs > 1 sample).

    With world > 1 (DistributedDataParallel) every rank draws the same permutation, cuts it into
    global batches of batch_size * world, and takes slice `rank` of each: the ranks' shares are
    disjoint and together they are the single-process epoch of batch size batch_size * world.
    """
    perm = torch.randperm(n, generator=generator).to(device)
    g = batch_size * world
    k = steps_per_epoch(n, g)
    return [perm[i * g + rank * batch_size:i * g + (rank + 1) * batch_size] for i in range(k)]


# Below this many steps a pass is not worth compiling (measured on an H100: compiling the fused step of
# 8 resnet8x4 students took 26 s and saved about 22 ms per step, see BENCHMARKS).
AUTO_COMPILE_MIN_STEPS = 1500
# ... and only for groups of at least this many runs: on an H100, 8 fused resnet8x4 runs compiled trained
# 3.0x faster than 8 separate runs, while the default pipeline's groups of 2 small runs took 61 s
# compiled against 40 s for a 6-run pass stepped one by one (BENCHMARKS.md).
AUTO_FUSE_MIN_RUNS = 4

# epoch -> (view params (N, P) on device, teacher logits (N, C) float on device, or None)
ViewSource = Callable[[int], tuple[torch.Tensor, torch.Tensor | None]]


def train_pass(runs: list[Run], images: torch.Tensor, labels: torch.Tensor, policy: ViewPolicy,
               mean, std, epochs: int, batch_size: int, data_seed: int, view_source: ViewSource,
               online_teacher: nn.Module | None = None, online_dtype: torch.dtype = torch.float32,
               amp: bool = False, label: str = "train", log=print, fuse: bool | None = None,
               dist=None) -> dict:
    """Train every run for `epochs` over (images, labels) on their device; returns timing figures.

    fuse: step runs of one architecture and optimizer setting as one vmapped network (kdpipe.fused):
    True fuses them, "compile" fuses them under torch.compile, False steps every run on its own, None
    (the default) picks what was measured fastest: "compile" on CUDA for passes of at least
    AUTO_COMPILE_MIN_STEPS steps (compiling costs tens of seconds once), and then only groups of at least
    AUTO_FUSE_MIN_RUNS runs; else False.
    dist (kdpipe.distributed.Dist, world > 1): the runs' models are DistributedDataParallel; this rank
    trains on its slice of every global batch (see `batches`), view_source(epoch, rows) is given the
    sample indices this rank will use, and epoch losses are averaged over the ranks. No fusion then.
    """
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    device = images.device
    n = len(images)
    need_teacher = any(r.loss.needs_teacher for r in runs)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    for r in runs:
        r.model.train()
    if online_teacher is not None:
        online_teacher.eval()  # as in stage one: running BatchNorm statistics, no dropout
    auto = fuse is None
    if auto:
        long_pass = epochs * steps_per_epoch(n, batch_size * world) >= AUTO_COMPILE_MIN_STEPS
        fuse = "compile" if device.type == "cuda" and long_pass else False
    if world > 1:
        fuse = False  # DDP synchronises each wrapped model's own gradients
    units = plan_units(runs, bool(fuse))  # lists of run indices; a list of >= 2 is stepped as one network
    if auto:  # narrow groups do not repay compiling: step their runs one by one
        units = [g for u in units for g in ([u] if len(u) >= AUTO_FUSE_MIN_RUNS else [[i] for i in u])]
    fused = {k: FusedRuns([runs[i] for i in u], amp=amp, compile=fuse == "compile", log=log)
             for k, u in enumerate(units) if len(u) > 1}
    for k in fused:
        log(f"  {label}: {len(units[k])} {runs[units[k][0]].arch} runs step as one fused network"
            + (" (torch.compile; the first step compiles)" if fuse == "compile" else ""))
    start = time.perf_counter()
    seen = 0
    for epoch in range(epochs):
        order = batches(n, batch_size, seeded_generator(data_seed, epoch), device, rank, world)
        params, cached = view_source(epoch) if world == 1 else view_source(epoch, torch.cat(order))
        prog = Progress(f"{label} epoch {epoch + 1}/{epochs}", len(order) * batch_size * world,
                        stream=dist.progress_stream if dist is not None else None)
        sums = [torch.zeros(len(u), device=device) for u in units]
        for idx in order:
            x = policy.replay(images[idx], params[idx], mean, std)
            x = channels_last(x)
            y = labels[idx]
            t = None
            if need_teacher:
                if cached is not None:
                    t = cached[idx].float()
                else:
                    with torch.no_grad(), autocast:
                        t = online_teacher(x).to(online_dtype).float()
            for k, u in enumerate(units):
                if k in fused:
                    sums[k] += fused[k].step(x, t, y)
                    continue
                r = runs[u[0]]
                with autocast:
                    out = r.model(x)
                loss = r.loss(out, t, y)
                r.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                r.optimizer.step()
                r.scheduler.step()
                sums[k] += loss.detach()
            seen += len(idx) * world
            prog.update(len(idx) * world)
        for f in fused.values():
            f.sync_to_runs()
        if world > 1:
            sums = list(dist.all_mean(torch.cat(sums)).split([len(u) for u in units]))
        for k, u in enumerate(units):
            for j, v in enumerate(sums[k].tolist()):
                runs[u[j]].history.append(v / max(1, len(order)))
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
            "student_images_per_s": seen * len(runs) / wall if wall > 0 else 0.0,
            "fused_groups": [[runs[i].name for i in u] for u in units if len(u) > 1]}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, policy: ViewPolicy, params: torch.Tensor, mean, std,
            batch_size: int = 1024, amp: bool = False) -> torch.Tensor:
    """Logits (float32, on the images' device) of a model on views given by params, in order."""
    model.eval()
    autocast = torch.autocast(images.device.type, dtype=torch.bfloat16) if amp else nullcontext()
    outs = []
    for i in range(0, len(images), batch_size):
        x = policy.replay(images[i:i + batch_size], params[i:i + batch_size], mean, std)
        x = channels_last(x)
        with autocast:
            outs.append(model(x).float())
    return torch.cat(outs)
