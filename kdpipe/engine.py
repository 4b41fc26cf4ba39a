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

from kdpipe import KDPipeError
from kdpipe.fused import FusedRuns, plan_units, random_modules
from kdpipe.losses import Loss, MixedLabels, create_loss, logits_of, main_labels
from kdpipe.models import create_model
from kdpipe.util import Progress, channels_last, human_duration, rng_states, seeded_generator, set_rng_states
from kdpipe.views import ViewPolicy


@dataclass
class OptimConfig:
    """Optimizer and schedule of a run. None: the optimizer's usual value (kdpipe.sweep.OPTIMIZERS: SGD lr
    0.05 and weight decay 5e-4, Adam 1e-3 and 0, AdamW 1e-3 and 0.01). Weight decay never applies to
    biases and norms; Adam's is L2 added to the gradient, AdamW's is decoupled."""
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    schedule: str = "cosine"  # cosine | step | constant | onecycle
    nesterov: bool = False
    optimizer: str = "sgd"  # sgd | adam | adamw
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    warmup_epochs: float = 0.0  # linear warm-up from ~0 to lr, then the schedule over the remaining steps

    def __post_init__(self):
        from kdpipe.sweep import resolve_training
        r = resolve_training(self.optimizer, self.lr, self.weight_decay, schedule=self.schedule,
                             warmup_epochs=float(self.warmup_epochs), betas=tuple(self.betas), eps=self.eps,
                             momentum=self.momentum)
        self.lr, self.weight_decay, self.betas = r["lr"], r["weight_decay"], r["betas"]
        self.warmup_epochs = float(self.warmup_epochs)

    @classmethod
    def from_settings(cls, s: dict) -> "OptimConfig":
        """From kdpipe.sweep.resolve_training's settings."""
        return cls(s["lr"], s["momentum"], s["weight_decay"], s["schedule"], s["nesterov"], s["optimizer"],
                   tuple(s["betas"]), s["eps"], s["warmup_epochs"])

    def settings(self) -> dict:
        """As kdpipe.sweep.resolve_training's arguments (what names runs and is written to metrics.json)."""
        return {"optimizer": self.optimizer, "lr": self.lr, "weight_decay": self.weight_decay,
                "momentum": self.momentum, "nesterov": self.nesterov, "betas": list(self.betas), "eps": self.eps,
                "schedule": self.schedule, "warmup_epochs": self.warmup_epochs}

    def lr_factor(self, step: int, total: int, warmup: int = 0) -> float:
        """The learning rate of step `step` (from 0) of `total` as a fraction of lr; `warmup` steps of
        linear warm-up come first (factor (step + 1) / warmup), the schedule runs over the rest.
        onecycle (as torch's OneCycleLR with its defaults, lr only, momentum not cycled): cosine from
        lr/25 up to lr over the first 30% of the steps, then cosine down to lr/25e4."""
        if step < warmup:
            return (step + 1) / warmup
        step, total = step - warmup, max(1, total - warmup)
        frac = min(step, total) / total
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        if self.schedule == "step":
            return 0.1 ** sum(step >= int(total * f) for f in (0.5, 0.75))
        if self.schedule == "onecycle":
            up, last = 0.3 * total - 1, total - 1  # the phases' last steps, as OneCycleLR counts them
            start, end = 1 / 25, 1 / 25e4
            if step <= up:
                return start + (1 - start) * 0.5 * (1 - math.cos(math.pi * step / max(1e-9, up)))
            pct = min(1.0, (step - up) / max(1e-9, last - up))
            return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * pct))
        return 1.0

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer over the model's parameters: weight decay on weights, none on biases and norms."""
        decay, no_decay = [], []
        for p in model.parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if self.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov)
        cls = torch.optim.Adam if self.optimizer == "adam" else torch.optim.AdamW
        return cls(groups, lr=self.lr, betas=tuple(self.betas), eps=self.eps)


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
    warmup_steps: int = 0
    train_top1: list = field(default_factory=list)  # per epoch: top-1 on the training views it stepped on
    own_s: float = 0.0  # seconds of its own steps (a fused group's time shared evenly among its runs)
    train_s: float = 0.0  # own_s plus an even share of its passes' common work
    arch_args: dict | None = None  # options of the architecture (--arch-args), recorded in its checkpoint
    # Its own random stream (kdpipe.util.rng_states: the CPU generator's state, and the CUDA device's): what its
    # steps draw from (dropout masks), whichever runs share its pass; None: the global generators' when a pass starts
    rng: list | None = None


def build_run(name, arch, loss: Loss | str, seed, num_classes, image_shape, optim: OptimConfig,
              total_steps: int, device, loss_options: dict | None = None, arch_args: dict | None = None,
              epoch_steps: int | None = None) -> Run:
    """A run: model (arch: a kdpipe.models spec, with arch_args), optimizer and schedule, and its loss (a
    Loss, or a registered name with loss_options). epoch_steps: steps per epoch, needed for a warm-up
    given in epochs."""
    if isinstance(loss, str):
        loss = create_loss(loss, **(loss_options or {}))
    elif loss_options:
        raise ValueError("loss_options go with a loss name, not with a loss object")
    torch.manual_seed(seed)
    model = create_model(arch, num_classes, image_shape, arch_args).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt, sched, warmup = make_optimizer(model, optim, total_steps, epoch_steps)
    # its random stream goes on from where its init left the generators: as it would alone, whatever is built after it
    return Run(name, arch, loss, seed, model, opt, sched, optim=optim, total_steps=total_steps, warmup_steps=warmup,
               arch_args=arch_args, rng=rng_states(device))


def make_optimizer(model: nn.Module, optim: OptimConfig, total_steps: int, epoch_steps: int | None = None):
    """The optimizer optim describes over the model's parameters, its per-step schedule over total_steps,
    and the warm-up in steps (epoch_steps: steps per epoch, needed for a warm-up given in epochs)."""
    opt = optim.build(model)
    if optim.warmup_epochs and not epoch_steps:
        raise ValueError("a warm-up in epochs needs epoch_steps")
    warmup = warmup_steps(optim, epoch_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: optim.lr_factor(s, total_steps, warmup))
    return opt, sched, warmup


def warmup_steps(optim: OptimConfig, epoch_steps: int | None) -> int:
    """The warm-up of optim in steps: round(warmup_epochs x epoch_steps)."""
    return round(optim.warmup_epochs * epoch_steps) if optim.warmup_epochs else 0


def warmup_note(optim: OptimConfig, epoch_steps: int, total_steps: int | None = None) -> str | None:
    """A note where a warm-up given rounds to fewer than 2 steps: with 0 or 1 the first step is at the peak lr, as
    without one, while the run's settings record it (a note, not a refusal: a quick check on a few hundred samples
    of a pipeline with a 1-epoch warm-up has 1 or 2 steps an epoch). Also where the onecycle schedule (which takes
    no warm-up) has a single step in all (total_steps): that step is its last, at lr / 250,000 (as torch's
    OneCycleLR), so the run trains almost nothing."""
    warmup = warmup_steps(optim, epoch_steps)
    if optim.warmup_epochs and warmup < 2:
        return (f"note: --warmup-epochs {optim.warmup_epochs:g} is {warmup} step(s) of the {epoch_steps} per epoch, "
                f"which warms nothing up (the first step is at the peak lr); {2 / epoch_steps:.3g} or more would")
    if optim.schedule == "onecycle" and total_steps == 1:
        return ("note: --schedule onecycle over 1 step takes that step at its final lr, lr / 250,000 (as torch's "
                "OneCycleLR), so it trains almost nothing; give 2 or more steps (more --epochs, or a smaller "
                "--batch-size) or another --schedule")
    return None


def steps_per_epoch(n: int, batch_size: int, every_sample: bool = False) -> int:
    if every_sample:
        return max(1, -(-n // batch_size))
    return n // batch_size if n >= batch_size else 1


def batches(n: int, batch_size: int, generator: torch.Generator, device, rank: int = 0,
            world: int = 1, every_sample: bool = False) -> list[torch.Tensor]:
    """A shuffled epoch; the last partial batch is dropped (BatchNorm needs > 1 sample).

    every_sample (one process only): no sample is dropped; the epoch is cut into ceil(n / batch_size)
    batches whose sizes differ by at most one (200 samples in batches of at most 128: two of 100), for a
    training told to use exactly these n samples (compress --finetune-samples).

    With world > 1 (DistributedDataParallel) every rank draws the same permutation, cuts it into
    global batches of batch_size * world, and takes slice `rank` of each: the ranks' shares are
    disjoint and together they are the single-process epoch of batch size batch_size * world.
    """
    perm = torch.randperm(n, generator=generator).to(device)
    if every_sample:
        if world != 1:
            raise ValueError("every_sample batches are for one process")
        return list(torch.tensor_split(perm, steps_per_epoch(n, batch_size, True)))
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

# epoch -> (view params (N, P) on device, the epoch's teacher targets on device, or None): the targets
# are the cached logits (N, C), or any object with `rows(idx)` giving a batch's targets (see teacher_rows)
ViewSource = Callable[[int], tuple[torch.Tensor, object | None]]


def sample_unit(images) -> str:
    """What progress lines count: "images", or "rows" for feature vectors (N, D) of a table. `images`: a tensor, or
    kdpipe.util.HostImages (photos left mapped in host memory)."""
    return "rows" if len(images.shape) == 2 else "images"


def train_pass(runs: list[Run], images: torch.Tensor, labels: torch.Tensor, policy: ViewPolicy,
               mean, std, epochs: int, batch_size: int, data_seed: int, view_source: ViewSource,
               online_teacher: nn.Module | None = None, amp: bool = False, label: str = "train", log=print,
               fuse: bool | None = None, dist=None, train_rows: torch.Tensor | None = None,
               on_epoch_end: Callable[[int], None] | None = None, checkpoint=None,
               every_sample: bool = False) -> dict:
    """Train every run for `epochs` over (images, labels) on their device; returns timing figures.

    fuse: step runs of one architecture and optimizer setting as one vmapped network (kdpipe.fused):
    True fuses them, "compile" fuses them under torch.compile, False steps every run on its own, None
    (the default) picks what was measured fastest: "compile" on CUDA for passes of at least
    AUTO_COMPILE_MIN_STEPS steps (compiling costs tens of seconds once), and then only groups of at least
    AUTO_FUSE_MIN_RUNS runs; else False. A group whose first fused step fails (vmap refuses some networks' ops:
    data-dependent control flow, in-place randomness on a tensor of its own) steps its runs one by one, saying so;
    so does a group whose network draws random numbers (dropout: fused, the runs could not draw what each draws
    unfused), known from its modules or from its first fused step.
    Each run draws its random numbers (dropout masks) from its own stream, Run.rng, swapped into the global
    generators around its steps and restored after: it trains to the same weights alone as beside any other runs.
    Runs whose network holds no module that draws (kdpipe.fused.random_modules) are swapped on their first step only,
    which tells whether they draw (F.dropout in a forward); those that do not then step with no swapping.
    dist (kdpipe.distributed.Dist, world > 1): the runs' models are DistributedDataParallel; this rank
    trains on its slice of every global batch (see `batches`), view_source(epoch, rows) is given the
    sample indices this rank will use, and epoch losses are averaged over the ranks. No fusion then.

    every_sample: each epoch steps on all n samples, in near-equal batches of at most batch_size (see
    `batches`), instead of dropping the last partial batch.

    train_rows: the sample indices to train on (default: all); the rest (a validation split) is never
    stepped on. on_epoch_end(epoch): called after each epoch, with every run's own module up to date
    (e.g. to evaluate); the runs are put back in training mode after it.

    Each run's `train_top1` gets the epoch's top-1 on the views it stepped on, and `own_s` the seconds
    of its own steps (CUDA events on the GPU; a fused group's time, or that of a group that fell back to
    stepping its runs one by one, is shared evenly among its runs).

    Every run's loss is called as `r.loss(out, teacher, labels, epoch)` (epoch counting from 0); the
    run steps on the sum of the terms it returns, and each term's per-epoch mean is appended to
    `r.terms[name]`, their sum to `r.history`. The terms are summed on the device: one sync per epoch.

    checkpoint (kdpipe.resume.PassCheckpoint): the pass starts at its position (the runs' states were
    restored from it) and saves one at the end of every epoch and after any step where checkpoint.due(), or
    where a Ctrl-C or SIGTERM was held (PassCheckpoint.holding_interrupts): then it stops (KeyboardInterrupt).

    A pass in which every run's epoch loss became NaN or infinite (diverged: its weights stay so) stops after that
    epoch, saying so; the runs' histories then end there.
    """
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    device = images.device
    if train_rows is not None:
        train_rows = torch.as_tensor(train_rows, dtype=torch.long).to(device)
    n = len(images) if train_rows is None else len(train_rows)
    need_teacher = any(r.loss.needs_teacher for r in runs)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    for r in runs:
        r.model.train()
    if online_teacher is not None:
        online_teacher.eval()  # as in stage one: running BatchNorm statistics, no dropout
    auto = fuse is None
    if auto:
        long_pass = epochs * steps_per_epoch(n, batch_size * world, every_sample) >= AUTO_COMPILE_MIN_STEPS
        fuse = "compile" if device.type == "cuda" and long_pass else False
    if world > 1:
        fuse = False  # DDP synchronises each wrapped model's own gradients
    refused: list = []  # groups of alike runs that cannot step as one: (indices, why)
    units = plan_units(runs, bool(fuse), refused)  # lists of run indices; a list of >= 2 is stepped as one network
    if auto:  # narrow groups do not repay compiling: step their runs one by one
        units = [g for u in units for g in ([u] if len(u) >= AUTO_FUSE_MIN_RUNS else [[i] for i in u])]
    for u, why in refused:  # said where they would have been fused
        if not auto or len(u) >= AUTO_FUSE_MIN_RUNS:
            log(f"note: {label}: the {len(u)} {runs[u[0]].arch} runs step one by one, not as one fused network: {why}")
    fused = {k: FusedRuns([runs[i] for i in u], amp=amp, compile=fuse == "compile", log=log)
             for k, u in enumerate(units) if len(u) > 1}
    for k in fused:
        log(f"  {label}: {len(units[k])} {runs[units[k][0]].arch} runs step as one fused network"
            + (" (torch.compile; the first step compiles)" if fuse == "compile" else ""))
    shared = rng_states(device)  # the generators outside the runs' own streams
    for r in runs:
        if r.rng is None or len(r.rng) < len(shared):  # a run not of build_run (or without the device's): from here
            r.rng = (r.rng or []) + shared[len(r.rng or []):]
    # per run: whether its steps draw random numbers: True (swapped in its stream), False, None (its first step tells)
    draws = [True if random_modules(r.model) else None for r in runs]
    older = getattr(checkpoint, "shared_rng", False)  # resumed from a checkpoint of one stream for all runs
    drew_outside = False
    start = time.perf_counter()
    start_epoch, start_step = checkpoint.position if checkpoint is not None else (0, 0)
    seen, before = (checkpoint.seen, checkpoint.wall_s) if checkpoint is not None else (0, 0.0)
    hook_s = 0.0
    # own_s restored from a checkpoint already holds the earlier sessions' steps, as `before` their wall time
    own_before = {id(r): 0.0 if checkpoint is not None and checkpoint.state else r.own_s for r in runs}
    for epoch in range(start_epoch, epochs):
        order = batches(n, batch_size, seeded_generator(data_seed, epoch), device, rank, world, every_sample)
        if train_rows is not None:
            order = [train_rows[b] for b in order]
        params, cached = view_source(epoch) if world == 1 else view_source(epoch, torch.cat(order))
        shared = rng_states(device)
        first = start_step if epoch == start_epoch else 0  # a checkpoint taken within the epoch resumes there
        prog = Progress(f"{label} epoch {epoch + 1}/{epochs}", sum(len(b) for b in order[first:]) * world,
                        sample_unit(images), stream=dist.progress_stream if dist is not None else None)
        # per unit: term name -> (runs in the unit,) sum over steps; and (runs,) counts of right answers
        sums: list[dict] = checkpoint.sums(units, runs, device) if first else [{} for _ in units]
        correct = checkpoint.correct(units, runs, device) if first else [torch.zeros(len(u), device=device)
                                                                          for u in units]
        clock = _Clock(device, len(units))
        for step in range(first, len(order)):
            idx = order[step]
            x, t, y = replay_batch(images, labels, policy, params, cached if need_teacher else None, idx, mean, std)
            if need_teacher and cached is None:
                with torch.no_grad(), autocast:
                    t = online_teacher(x).float()
            for k, u in enumerate(units):
                clock.start()
                if k in fused:
                    try:
                        terms, right = fused[k].step(x, t, y, epoch)
                    except Exception as e:  # noqa: BLE001 (vmap refuses some networks' ops: their runs step alone)
                        if fused[k].stepped or isinstance(e, KDPipeError):  # the user's input: as unfused
                            raise
                        from kdpipe.util import error_line
                        log(f"note: {label}: the {len(u)} {runs[u[0]].arch} runs cannot step as one fused network "
                            f"({type(e).__name__}: {error_line(e)}); they step one by one")
                        del fused[k]
                    else:
                        _accumulate(sums[k], terms, len(u), device)
                        correct[k] += right
                        clock.stop(k)
                        continue
                stepped = []  # per run of the unit: its detached terms and right answers
                for i in u:  # one run, or a group whose fused step failed in its first step
                    r = runs[i]
                    if draws[i] is False:  # draws nothing: no swapping
                        stepped.append(_step(r, x, t, y, epoch, autocast))
                        continue
                    outside = rng_states(device)
                    set_rng_states(device, r.rng)
                    try:
                        stepped.append(_step(r, x, t, y, epoch, autocast))
                        own = rng_states(device)
                    finally:
                        set_rng_states(device, outside)
                    if draws[i] is None:
                        draws[i] = any(not torch.equal(a, b) for a, b in zip(r.rng, own))
                    r.rng = own
                if len(u) == 1:  # a run of its own: no stacking (each step's small ops cost ~5% of a small net's pass)
                    _accumulate(sums[k], stepped[0][0], 1, device)
                    correct[k] += stepped[0][1]
                else:
                    _accumulate(sums[k], {n: torch.stack([own[n] for own, _ in stepped]) for n in stepped[0][0]},
                                len(u), device)
                    correct[k] += torch.stack([right for _, right in stepped])
                clock.stop(k)
            if older:  # said once, after the first step tells which runs draw
                older = False
                if sum(d is True for d in draws) > 1:
                    log(f"note: {label}: the checkpoint resumed was written by an older kdpipe, whose runs drew their "
                        "random numbers (dropout) from one stream shared by the pass; each draws from its own now, "
                        f"all starting where that one was, so the {sum(d is True for d in draws)} runs that draw "
                        "end unlike an uninterrupted run of that kdpipe")
            seen += len(idx) * world
            prog.update(len(idx) * world)
            if checkpoint is not None and step + 1 < len(order) and (checkpoint.interrupted or checkpoint.due()):
                for f in fused.values():
                    f.sync_to_runs()
                checkpoint.save(runs, units, epoch, step + 1, sums, seen,
                                before + time.perf_counter() - start - hook_s, correct=correct)
                checkpoint.stop_if_interrupted()
        if not drew_outside and any(not torch.equal(a, b) for a, b in zip(shared, rng_states(device))):
            drew_outside = True  # said once; the runs that seemed not to draw get their own streams from now on
            draws = [True if d is False else d for d in draws]
            log(f"note: {label}: random numbers were drawn in epoch {epoch + 1} outside the runs' own streams (by a "
                "network that drew none in its first step" + (", or by the teacher's forward" if online_teacher
                                                              is not None else "")
                + "): a run that drew them trains to weights that depend on the runs beside it in the pass")
        for f in fused.values():
            f.sync_to_runs()
        flat = torch.cat([v for d in sums for v in d.values()]) if any(sums) else torch.zeros(0, device=device)
        # per sample stepped on: the one batch of a split smaller than --batch-size holds fewer than batch_size
        right = torch.cat(correct) / max(1, sum(len(b) for b in order))
        if world > 1:
            flat, right = dist.all_mean(flat), dist.all_mean(right)
        flat, at = (flat / max(1, len(order))).tolist(), 0  # the epoch's one sync
        right, at_right = right.tolist(), 0
        unit_s = clock.seconds()
        for k, u in enumerate(units):
            for name in sums[k]:
                for i in u:
                    runs[i].terms.setdefault(name, []).append(flat[at])
                    at += 1
            for i in u:
                runs[i].history.append(sum(v[-1] for v in runs[i].terms.values()))
                runs[i].train_top1.append(right[at_right])
                runs[i].own_s += unit_s[k] / len(u)
                at_right += 1
        for r in runs:  # said once, when it happens; metrics.json and the report mark the run (diverged_epoch)
            if not math.isfinite(r.history[-1]) and (len(r.history) == 1 or math.isfinite(r.history[-2])):
                log(f"warning: {r.name}: the loss became {r.history[-1]} in epoch {epoch + 1}: the run diverged "
                    "and its weights are not usable; lower --lr, or change the loss's options")
        # How long the pass has taken and will take: the epochs this process ran, evaluations between them included
        spent = time.perf_counter() - start
        left = spent / (epoch + 1 - start_epoch) * (epochs - epoch - 1)
        when = f"; {human_duration(spent)} elapsed" + (f", ~{human_duration(left)} left" if epoch + 1 < epochs else "")
        if len(runs) <= 4:
            log(f"  {label} epoch {epoch + 1}/{epochs}: " + ", ".join(
                f"{r.name} loss {r.history[-1]:.4f} (" + ", ".join(f"{n} {v[-1]:.4f}" for n, v in r.terms.items())
                + ")" for r in runs) + when)
        else:
            log(f"  {label} epoch {epoch + 1}/{epochs}: mean loss "
                f"{sum(r.history[-1] for r in runs) / len(runs):.4f} over {len(runs)} runs" + when)
        if on_epoch_end is not None:  # before the epoch's checkpoint, so that it holds what the hook recorded
            t_hook = time.perf_counter()
            on_epoch_end(epoch)
            for r in runs:
                r.model.train()
            hook_s += time.perf_counter() - t_hook
        if checkpoint is not None:
            checkpoint.save(runs, units, epoch + 1, 0, None, seen, before + time.perf_counter() - start - hook_s)
            checkpoint.stop_if_interrupted()
        if epoch + 1 < epochs and not any(math.isfinite(r.history[-1]) for r in runs):
            # NaN or infinite weights stay so: the epochs left would train nothing (the runs are marked diverged)
            log(f"  {label}: every run of the pass diverged: it stops after epoch {epoch + 1}/{epochs}")
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = before + time.perf_counter() - start - hook_s  # training only, not on_epoch_end's evaluations
    own = sum(r.own_s - own_before[id(r)] for r in runs)
    for r in runs:  # its own steps, plus an even share of the pass's common work (reading, replay, teacher)
        r.train_s += r.own_s - own_before[id(r)] + max(0.0, wall - own) / len(runs)
    return {"wall_s": wall, "images": seen, "images_per_s": seen / wall if wall > 0 else 0.0,
            "student_images_per_s": seen * len(runs) / wall if wall > 0 else 0.0,
            "fused_groups": [[runs[i].name for i in units[k]] for k in fused]}


def _step(r: Run, x, t, y, epoch: int, autocast) -> tuple[dict, torch.Tensor]:
    """One training step of run r on a batch: its detached loss terms, and how many samples it classified right."""
    with autocast:
        out = r.model(x)  # logits or Outputs
    terms = r.loss(out, t, y, epoch)
    r.optimizer.zero_grad(set_to_none=True)
    sum(terms.values()).backward()
    r.optimizer.step()
    r.scheduler.step()
    return {n: v.detach() for n, v in terms.items()}, (logits_of(out).detach().argmax(-1) == main_labels(y)).sum()


class _Clock:
    """Seconds each unit of a pass spends in its own steps: wall time on the CPU; CUDA events on the GPU
    (no synchronization in the loop; read once per epoch, after the epoch's sync)."""

    def __init__(self, device, units: int):
        self.cuda = device.type == "cuda"
        self.total = [0.0] * units
        self.events: list = []
        self.t0 = 0.0

    def start(self):
        if self.cuda:
            self.t0 = torch.cuda.Event(enable_timing=True)
            self.t0.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self, k: int):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((k, self.t0, end))
        else:
            self.total[k] += time.perf_counter() - self.t0

    def seconds(self) -> list[float]:
        if self.cuda and self.events:
            self.events[-1][2].synchronize()
            for k, a, b in self.events:
                self.total[k] += a.elapsed_time(b) / 1000.0
            self.events = []
        out, self.total = self.total, [0.0] * len(self.total)
        return out


def replay_batch(images, labels, policy: ViewPolicy, params, cached, idx, mean, std):
    """One batch of an epoch: the replayed views of samples `idx` (normalized, channels-last on CUDA),
    their teacher targets (teacher_rows: cached logits as float32; None without `cached`) and their labels;
    for mixed views (mixup, cutmix) the labels are MixedLabels, both labels with the stored share of each."""
    p = params[idx]
    x = channels_last(policy.replay_rows(images, idx, p, mean, std, policy.partner_params(params, p)))
    y = labels[idx]
    mix = policy.mixing(p, images.shape[1:])
    if mix is not None:  # the CE term weighs both labels by the stored share
        y = MixedLabels(y, labels[mix[0]], mix[1])
    return x, teacher_rows(cached, idx), y


def teacher_rows(cached, idx):
    """The teacher targets of the samples `idx` that the runs' losses are called with: rows of an epoch's
    cached logits (N, C) as float32, or, for targets that are not one dense logits tensor (an object with
    a `rows(idx)` method), what that returns; None without targets."""
    if cached is None:
        return None
    if isinstance(cached, torch.Tensor):
        return cached[idx].float()
    return cached.rows(idx)


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
            out = logits_of(model(x))  # a student with a hint projector returns Outputs(logits, features)
        if not isinstance(out, torch.Tensor):
            raise KDPipeError(f"the model returns a {type(out).__name__}, not a logits tensor (batch, classes): "
                              "evaluate a model that returns its logits alone (or kdpipe.losses.Outputs)")
        outs.append(out.float())
    return torch.cat(outs)
