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
from kdpipe.losses import Loss, MixedLabels, create_loss
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
    loss: Loss
    seed: int
    model: nn.Module = None
    optimizer: torch.optim.Optimizer = None
    scheduler: torch.optim.lr_scheduler.LRScheduler = None
    history: list = field(default_factory=list)  # per epoch: the mean loss (the sum of the terms)
    terms: dict = field(default_factory=dict)  # term name -> per-epoch means, e.g. {"ce": [...], "kd": [...]}
    optim: OptimConfig | None = None  # how the optimizer and schedule were built (runs that share them can fuse)
    total_steps: int | None = None
    arch_args: dict | None = None  # options of the architecture (--arch-args), recorded in its checkpoint


def build_run(name, arch, loss: Loss | str, seed, num_classes, image_shape, optim: OptimConfig,
              total_steps: int, device, loss_options: dict | None = None, arch_args: dict | None = None) -> Run:
    """A run: model (arch: a kdpipe.models spec, with arch_args), optimizer and schedule, and its loss (a
    Loss, or a registered name with loss_options)."""
    if isinstance(loss, str):
        loss = create_loss(loss, **(loss_options or {}))
    elif loss_options:
        raise ValueError("loss_options go with a loss name, not with a loss object")
    torch.manual_seed(seed)
    model = create_model(arch, num_classes, image_shape, arch_args).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt, sched = make_optimizer(model, optim, total_steps)
    return Run(name, arch, loss, seed, model, opt, sched, optim=optim, total_steps=total_steps, arch_args=arch_args)


def make_optimizer(model: nn.Module, optim: OptimConfig, total_steps: int):
    """SGD (no weight decay on biases and norms) and its per-step schedule over total_steps."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": optim.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: optim.lr_factor(s, total_steps))
    return opt, sched


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
               online_teacher: nn.Module | None = None, amp: bool = False, label: str = "train", log=print,
               fuse: bool | None = None, dist=None, checkpoint=None) -> dict:
    """Train every run for `epochs` over (images, labels) on their device; returns timing figures.

    fuse: step runs of one architecture and optimizer setting as one vmapped network (kdpipe.fused):
    True fuses them, "compile" fuses them under torch.compile, False steps every run on its own, None
    (the default) picks what was measured fastest: "compile" on CUDA for passes of at least
    AUTO_COMPILE_MIN_STEPS steps (compiling costs tens of seconds once), and then only groups of at least
    AUTO_FUSE_MIN_RUNS runs; else False.
    dist (kdpipe.distributed.Dist, world > 1): the runs' models are DistributedDataParallel; this rank
    trains on its slice of every global batch (see `batches`), view_source(epoch, rows) is given the
    sample indices this rank will use, and epoch losses are averaged over the ranks. No fusion then.

    Every run's loss is called as `r.loss(out, teacher, labels, epoch)` (epoch counting from 0); the
    run steps on the sum of the terms it returns, and each term's per-epoch mean is appended to
    `r.terms[name]`, their sum to `r.history`. The terms are summed on the device: one sync per epoch.

    checkpoint (kdpipe.resume.PassCheckpoint): the pass starts at its position (the runs' states were
    restored from it) and saves one at the end of every epoch and after any step where checkpoint.due().
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
    start_epoch, start_step = checkpoint.position if checkpoint is not None else (0, 0)
    seen, before = (checkpoint.seen, checkpoint.wall_s) if checkpoint is not None else (0, 0.0)
    for epoch in range(start_epoch, epochs):
        order = batches(n, batch_size, seeded_generator(data_seed, epoch), device, rank, world)
        params, cached = view_source(epoch) if world == 1 else view_source(epoch, torch.cat(order))
        first = start_step if epoch == start_epoch else 0  # a checkpoint taken within the epoch resumes there
        prog = Progress(f"{label} epoch {epoch + 1}/{epochs}", (len(order) - first) * batch_size * world,
                        stream=dist.progress_stream if dist is not None else None)
        # per unit: term name -> (runs in the unit,) sum over steps
        sums: list[dict] = checkpoint.sums(units, runs, device) if first else [{} for _ in units]
        for step in range(first, len(order)):
            idx = order[step]
            x, t, y = replay_batch(images, labels, policy, params, cached if need_teacher else None, idx, mean, std)
            if need_teacher and cached is None:
                with torch.no_grad(), autocast:
                    t = online_teacher(x).float()
            for k, u in enumerate(units):
                if k in fused:
                    _accumulate(sums[k], fused[k].step(x, t, y, epoch), len(u), device)
                    continue
                r = runs[u[0]]
                with autocast:
                    out = r.model(x)
                terms = r.loss(out, t, y, epoch)
                r.optimizer.zero_grad(set_to_none=True)
                sum(terms.values()).backward()
                r.optimizer.step()
                r.scheduler.step()
                _accumulate(sums[k], {n: v.detach() for n, v in terms.items()}, 1, device)
            seen += len(idx) * world
            prog.update(len(idx) * world)
            if checkpoint is not None and step + 1 < len(order) and checkpoint.due():
                for f in fused.values():
                    f.sync_to_runs()
                checkpoint.save(runs, units, epoch, step + 1, sums, seen, before + time.perf_counter() - start)
        for f in fused.values():
            f.sync_to_runs()
        flat = torch.cat([v for d in sums for v in d.values()]) if any(sums) else torch.zeros(0, device=device)
        if world > 1:
            flat = dist.all_mean(flat)
        flat, at = (flat / max(1, len(order))).tolist(), 0  # the epoch's one sync
        for k, u in enumerate(units):
            for name in sums[k]:
                for i in u:
                    runs[i].terms.setdefault(name, []).append(flat[at])
                    at += 1
            for i in u:
                runs[i].history.append(sum(v[-1] for v in runs[i].terms.values()))
        if len(runs) <= 4:
            log(f"  {label} epoch {epoch + 1}/{epochs}: " + ", ".join(
                f"{r.name} loss {r.history[-1]:.4f} (" + ", ".join(f"{n} {v[-1]:.4f}" for n, v in r.terms.items())
                + ")" for r in runs))
        else:
            log(f"  {label} epoch {epoch + 1}/{epochs}: mean loss "
                f"{sum(r.history[-1] for r in runs) / len(runs):.4f} over {len(runs)} runs")
        if checkpoint is not None:
            checkpoint.save(runs, units, epoch + 1, 0, None, seen, before + time.perf_counter() - start)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = before + time.perf_counter() - start
    return {"wall_s": wall, "images": seen, "images_per_s": seen / wall if wall > 0 else 0.0,
            "student_images_per_s": seen * len(runs) / wall if wall > 0 else 0.0,
            "fused_groups": [[runs[i].name for i in u] for u in units if len(u) > 1]}


def replay_batch(images, labels, policy: ViewPolicy, params, cached, idx, mean, std):
    """One batch of an epoch: the replayed views of samples `idx` (normalized, channels-last on CUDA),
    their cached teacher logits as float32 (None without `cached`) and their labels; for mixed views
    (mixup, cutmix) the labels are MixedLabels, both labels with the stored share of each."""
    p = params[idx]
    x = channels_last(policy.replay_rows(images, idx, p, mean, std, policy.partner_params(params, p)))
    y = labels[idx]
    mix = policy.mixing(p, images.shape[1:])
    if mix is not None:  # the CE term weighs both labels by the stored share
        y = MixedLabels(y, labels[mix[0]], mix[1])
    return x, (cached[idx].float() if cached is not None else None), y


def _accumulate(into: dict, terms: dict, runs: int, device) -> None:
    """Add one step's terms ((runs,) or () each) to the epoch's sums, on the device."""
    for name, v in terms.items():
        if name not in into:
            into[name] = torch.zeros(runs, device=device)
        into[name] += v


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, policy: ViewPolicy, params: torch.Tensor, mean, std,
            batch_size: int = 1024, amp: bool = False) -> torch.Tensor:
    """Logits (float32, on the images' device) of a model on views given by params, in order."""
    model.eval()
    autocast = torch.autocast(images.device.type, dtype=torch.bfloat16) if amp else nullcontext()
    outs = []
    for i in range(0, len(images), batch_size):
        x = channels_last(policy.replay(images[i:i + batch_size], params[i:i + batch_size], mean, std))
        with autocast:
            outs.append(model(x).float())
    return torch.cat(outs)
