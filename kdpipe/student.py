"""Stage two: train students from a cache (and, for comparison, with the teacher online)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import kdpipe
from kdpipe import KDPipeError
from kdpipe.cache.reader import Cache
from kdpipe.cache.writer import atomic_write_json
from kdpipe.checkpoint import save_checkpoint
from kdpipe.data import KINDS, ImageData, load_dataset
from kdpipe.distributed import SINGLE
from kdpipe.engine import OptimConfig, Run, build_run, predict, steps_per_epoch, train_pass
from kdpipe.evaluate import agreement, cpu_latency_ms, eval_params, top1
from kdpipe.losses import create_loss
from kdpipe.models import count_parameters, create_model
from kdpipe.sweep import parse_loss, plan_runs, run_name
from kdpipe.util import ensure_out_dir, images_tensor
from kdpipe.views import policy_from_identity


def load_cache_data(cache: Cache, data_root=None) -> tuple[ImageData, ImageData | None]:
    """The train split the cache was dumped from (checked) and its test split (for evaluation)."""
    d = cache.manifest["dataset"]
    root = data_root
    if root is None and d["spec"].split(":")[0] in ("fashion-mnist", "mnist", "cifar10", "cifar100"):
        root = d.get("source")
    kind = d.get("kind", "dense")
    if kind not in KINDS:
        raise KDPipeError(f"the cache's data is of kind {kind!r}, which this version cannot load "
                          f"(it knows {', '.join(KINDS)}): upgrade kdpipe")
    size = d.get("image_size")  # photos: decoded the same way as in stage one, without asking again
    train = load_dataset(d["spec"], d["split"], root, size)
    cache.check_dataset(train)
    if train.kind != kind:
        raise KDPipeError(f"the cache was dumped from {kind} data, {d['spec']} now loads as {train.kind}")
    test = None
    ev = cache.manifest.get("eval")
    if ev:
        test = load_dataset(d["spec"], "test", root, size)
        if test.fingerprint != ev["dataset"]["fingerprint"]:
            raise KDPipeError(f"the test split of {d['spec']} differs from the one the cache's teacher "
                              "was evaluated on (fingerprint mismatch)")
    return train, test


TRAINING_SUBSET_SEED = 20150309  # --train-samples' subset: fixed, so every run and seed sees the same samples


def training_subset(n: int, size: int) -> np.ndarray:
    """The sample indices --train-samples trains on: the first `size` of a permutation of range(n) drawn from
    a fixed seed (a larger size keeps the smaller one's samples)."""
    return np.random.default_rng(TRAINING_SUBSET_SEED).permutation(n)[:size]


def train_students(cache_dir, students: list[str], epochs: int, out, *, loss: str = "kd", temperatures=(),
                   alphas=(), seeds=(0,), batch_size: int = 128, optim: OptimConfig | None = None,
                   device=torch.device("cpu"), data_root=None, amp: bool = False,
                   online_teacher=None, dist=None, log=print, fuse: bool | str | None = None,
                   train_samples: int | None = None) -> list[dict]:
    """Train every (student, T, alpha, seed) from the cache; write RUNS/<name>/{student.pt, metrics.json,
    config.json}. Runs with the same seed share one pass over the data (one read and replay per batch).

    `loss` is a spec, NAME[:OPTION=VALUE,...] (kdpipe.sweep.parse_loss, kdpipe.losses); T and alpha are
    its temperature and alpha, swept; empty `temperatures` or `alphas`: the loss's default (kd: 4, 0.9).

    With `online_teacher` (a module), the teacher runs in every step on the same replayed views
    instead of the cached logits (for comparisons; the cache still supplies the view parameters).

    `train_samples` N: every run trains on the same N samples (the first N of a permutation drawn from a fixed
    seed, whatever the runs' seeds), each with its cached views: scratch runs see N labels, KD runs N labels
    and the teacher's logits of the same views (Hinton et al. 2015, section 5: soft targets as a regularizer
    when labelled data is scarce).

    `fuse` (see engine.train_pass): runs of one architecture in a pass step as one vmapped network
    (True, or "compile" under torch.compile), or one by one (False); None picks what was measured fastest.

    With `dist` (kdpipe.distributed.Dist from torchrun, world > 1) every run is DistributedDataParallel:
    `batch_size` is per rank (the effective batch is batch_size x world; the learning rate is used as
    given), each rank reads only its share of every epoch's rows, and rank 0 alone writes the runs'
    files and returns their metrics (the other ranks return []).
    """
    ctx = dist or SINGLE
    world = ctx.world
    optim = optim or OptimConfig()
    if epochs <= 0:
        raise KDPipeError(f"--epochs must be >= 1, got {epochs}")
    if batch_size <= 0:
        raise KDPipeError(f"--batch-size must be >= 1, got {batch_size}")
    if not students:
        raise KDPipeError("give at least one --student")
    loss_name, loss_options = parse_loss(loss)
    planned = plan_runs(students, temperatures, alphas, seeds, loss_name, loss_options)
    losses = {p: create_loss(loss_name, **loss_options, **{k: v for k, v in zip(("temperature", "alpha"), p[1:3])
                                                            if v is not None})
              for p in planned}  # bad options fail here, before any training
    with ctx.together("opening the cache"):
        cache = Cache(cache_dir)
        m = cache.manifest
        policy = policy_from_identity(m["views"])
        train, test = load_cache_data(cache, data_root)
        in_shape = tuple(m["input"]["shape"])
        for arch in students:  # fail on a bad name before any training
            create_model(arch, cache.num_classes, in_shape)
        out = ensure_out_dir(out, "runs directory") if ctx.is_main else Path(out)
    ids = ctx.all_gather(m["cache_id"])  # per-node copies of a cache are fine; different caches are not
    if len(set(ids)) > 1:
        raise KDPipeError("the ranks opened different caches (" + ", ".join(f"rank {r}: id {i[:12]}" for r, i in
                          enumerate(ids)) + "): every rank must read the same cache")
    k = cache.num_views
    if epochs > k and policy.is_random:  # deterministic views (--policy none) are all the same view
        log(f"warning: {epochs} epochs over K = {k} views: each view is seen {epochs / k:.1f} times; "
            f"too few views overfit (dump with --views {epochs} to match the epochs)")
    mean, std = m["input"]["mean"], m["input"]["std"]
    images = images_tensor(train.images, device)
    labels = torch.from_numpy(train.labels).to(device)
    n = len(train)
    subset = None
    if train_samples is not None:
        if not 1 <= train_samples <= n:
            raise KDPipeError(f"--train-samples must be between 1 and the cache's {n} samples, got {train_samples}")
        if world > 1:
            raise KDPipeError("--train-samples runs in one process: launch it without torchrun")
        subset = torch.from_numpy(np.sort(training_subset(n, train_samples))).to(device)
        images, labels, n = images[subset], labels[subset], train_samples
        log(f"training on {n} of the cache's {len(train)} samples (a fixed subset, the same for every run)")
    if world > 1 and n < batch_size * world:
        raise KDPipeError(f"{n} samples are fewer than one global batch ({batch_size} per rank x {world} "
                          "ranks): lower --batch-size")
    total_steps = epochs * steps_per_epoch(n, batch_size * world)
    log(f"batch {batch_size}" + (f" per rank x {world} ranks = effective batch {batch_size * world} "
                                 f"(DistributedDataParallel, {ctx.backend})" if world > 1 else "")
        + f", peak lr {optim.lr:g}" + (" (as given: not scaled with the world size)" if world > 1 else "")
        + f", {total_steps // epochs} steps per epoch")

    def view_source(epoch, rows=None):
        v = epoch % k
        if rows is None:
            params = torch.from_numpy(cache.read_view(v, "view_params")).to(device)
            logits = None if online_teacher is not None else torch.from_numpy(cache.read_view(v, "logits")).to(device)
            if subset is not None:
                params, logits = params[subset], None if logits is None else logits[subset]
            return params, logits
        # A rank's share (sample indices `rows`): only those rows are read, placed at their index.
        share = torch.unique(rows)
        at = (v * n + share.cpu().numpy()).astype(np.int64)
        params = torch.zeros((n, len(cache.columns)), dtype=torch.int32, device=device)
        if cache.columns:
            params[share] = torch.from_numpy(cache.read_rows("view_params", at)).to(device)
        logits = None
        if online_teacher is None:
            part = torch.from_numpy(cache.read_rows("logits", at)).to(device)
            logits = torch.zeros((n, part.shape[1]), dtype=part.dtype, device=device)
            logits[share] = part
        return params, logits

    teacher_test = cache.read_test_logits()
    results = []
    for seed in sorted({p[3] for p in planned}):
        group = [p for p in planned if p[3] == seed]
        runs: list[Run] = [build_run(run_name(*p, loss_name, loss_options), p[0], losses[p], p[3],
                                     cache.num_classes, in_shape, optim, total_steps, device) for p in group]
        log(f"training {len(runs)} student run(s) in one pass (seed {seed}) from {cache.path} on {device}"
            + (f" x {world} ranks" if world > 1 else "") + ": " + ", ".join(r.name for r in runs))
        t0 = time.perf_counter()
        for r in runs:
            r.model = ctx.wrap(r.model)  # DistributedDataParallel when world > 1
        stats = train_pass(runs, images, labels, policy, mean, std, epochs, batch_size, seed, view_source,
                           online_teacher=online_teacher, amp=amp, label=f"students s{seed}", log=log,
                           dist=ctx, fuse=fuse)
        for r in runs:
            r.model = ctx.unwrap(r.model)
        if not ctx.is_main:
            continue
        for r in runs:
            results.append(_finish_run(r, cache, test, teacher_test, policy, mean, std, in_shape, out, stats,
                                       epochs, batch_size, optim, amp, device, len(runs), log, world=world,
                                       train_samples=n))
        log(f"pass of seed {seed}: {time.perf_counter() - t0:.1f}s, {stats['images_per_s']:,.0f} images/s "
            f"per student, {stats['student_images_per_s']:,.0f} student-images/s in all")
    return results


def _finish_run(r: Run, cache: Cache, test, teacher_test, policy, mean, std, in_shape, out: Path, stats,
                epochs, batch_size, optim, amp, device, runs_in_pass, log, world: int = 1,
                train_samples: int | None = None) -> dict:
    rdir = ensure_out_dir(out / r.name, "run directory")
    opts = r.loss.options
    metrics = {"name": r.name, "arch": r.arch, "loss": {"name": r.loss.name, "options": opts},
               "temperature": opts.get("temperature"), "alpha": opts.get("alpha"),
               "uses_teacher": r.loss.needs_teacher, "seed": r.seed,
               "parameters": count_parameters(r.model), "epochs": epochs, "train_samples": train_samples,
               "train_loss": r.history,
               "train_terms": r.terms,
               "train_wall_s": stats["wall_s"], "images_per_s": stats["images_per_s"],
               "runs_in_pass": runs_in_pass, "world_size": world, "batch_size": batch_size,
               "effective_batch_size": batch_size * world, "lr": optim.lr,
               "cache": {"path": str(cache.path.resolve()), "cache_id": cache.manifest["cache_id"],
                         "views": cache.num_views, "logits_dtype": cache.logits_dtype},
               "teacher": cache.manifest["teacher"], "dataset": cache.manifest["dataset"]["spec"]}
    if test is not None:
        timg = images_tensor(test.images, device)
        tp = torch.from_numpy(eval_params(policy, test.image_shape, len(test))).to(device)
        logits = predict(r.model, timg, policy, tp, mean, std, amp=amp).cpu()
        metrics["test_top1"] = top1(logits, test.labels)
        if teacher_test is not None:
            metrics["teacher_agreement"] = agreement(logits, teacher_test)
    metrics["cpu_latency_ms"] = cpu_latency_ms(r.model, in_shape)
    ckpt = rdir / "student.pt"
    metrics["size_bytes"] = save_checkpoint(
        ckpt, r.model, arch=r.arch, num_classes=cache.num_classes, image_shape=in_shape, mean=mean, std=std,
        class_names=cache.manifest["dataset"]["class_names"], dataset={k: v for k, v in cache.manifest["dataset"].items()},
        test_top1=metrics.get("test_top1"), extra={"role": "student", "run": r.name})
    config = {"run": r.name, "student": r.arch, "loss": {"name": r.loss.name, "options": opts},
              "temperature": opts.get("temperature"), "alpha": opts.get("alpha"), "seed": r.seed,
              "epochs": epochs, "train_samples": train_samples, "batch_size": batch_size, "world_size": world,
              "effective_batch_size": batch_size * world, "lr": optim.lr, "optim": asdict(optim), "amp": amp,
              "device": str(device),
              "cache": str(cache.path.resolve()), "cache_id": cache.manifest["cache_id"],
              "view_schedule": "epoch e uses view e mod K", "kdpipe_version": kdpipe.__version__,
              "torch_version": torch.__version__}
    atomic_write_json(rdir / "config.json", config)
    atomic_write_json(rdir / "metrics.json", metrics)  # last: its presence marks a finished run
    log(f"  {r.name}: test top-1 {metrics.get('test_top1', float('nan')):.4f}, agreement "
        f"{metrics.get('teacher_agreement', float('nan')):.4f} -> {rdir}")
    return metrics
