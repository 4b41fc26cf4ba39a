"""Measured quality: does distilling from one cache pay, and how many views does it take?

Trains one teacher, then every student (and seed) under each of these rows, and writes a markdown
table of test top-1, mean ± std over the seeds:

  scratch          alpha = 0 (cross-entropy alone), on the views of the K = E cache
  online KD        the teacher run in every step on fresh views drawn every epoch (none reused)
  cached K=E       KD from a cache of K = E views (epoch e reads view e)
  cached K=E/6     KD from a cache of K = max(1, E // 6) views, each reused about 6 times
  cached K=1       KD from one fixed view per sample
  mixup K=E        KD from a cache of K = E mixed views (the geometric views, then mixup:A): function
                   matching, the teacher's logits of the mixed image; CE (alpha < 1) weighs both labels
  DKD K=E          DKD (kdpipe's dkd loss, its defaults but warmup E // 4) from the K = E cache
  mixup long       mixed views, K = 3E views and 3E epochs (a patient schedule, Beyer et al. 2022)

Every KD row uses the same temperature and alpha. The cached rows go through kdpipe's own stage one
(dump_logits) and stage two (train_students); online KD through the same loop (engine.train_pass) with
a view source that draws new views every epoch, as train-teacher does.

GPU (CUDA present): CIFAR-10, a resnet18_cifar teacher, resnet8x4 and resnet20 students, 30 epochs.
CPU (--quick, or no CUDA): a reduced version on a Fashion-MNIST subset, MLP students.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from common import (DEFAULT_CIFAR, DEFAULT_FASHION, emit, header, load_split, machine, quiet, setup, subset_npz,
                    workdir)


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="The reduced CPU version (also chosen without CUDA).")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    p.add_argument("--cifar", default=str(DEFAULT_CIFAR),
                   help="CIFAR-10 for the GPU run: the ImageFolder .tar.xz, its folder, or npz:PATH.")
    p.add_argument("--fashion", default=None,
                   help=f"Fashion-MNIST for the CPU run: an npz, or 'fashion-mnist' (Debian's package); "
                        f"default {DEFAULT_FASHION} when present, else Debian's.")
    p.add_argument("--n-train", type=int, default=None, help="Train samples (CPU default 3000; GPU: all).")
    p.add_argument("--n-test", type=int, default=None, help="Test samples (CPU default 2000; GPU: all).")
    p.add_argument("--teacher", default=None, help="Teacher architecture (GPU resnet18_cifar, CPU cnn_large).")
    p.add_argument("--teacher-n-train", type=int, default=None,
                   help="CPU: train the teacher on the first M train samples (M >= --n-train; default the "
                        "students' samples): a teacher that has seen more data than its students.")
    p.add_argument("--teacher-file", default=None, help="A trained kdpipe teacher checkpoint to use instead.")
    p.add_argument("--teacher-epochs", type=int, default=None, help="GPU 30, CPU 8.")
    p.add_argument("--students", default=None, help="Comma-separated (GPU resnet8x4,resnet20; CPU mlp_100,mlp_800).")
    p.add_argument("--epochs", type=int, default=None, help="Students' epochs E (GPU 30, CPU 12).")
    p.add_argument("--seeds", type=int, default=2, help="Seeds per row (default 2).")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--mixup", type=float, default=1.0, help="Beta(A, A) of the mixup rows (default 1).")
    p.add_argument("--policy", default=None, help="Geometric views (GPU crop:4+flip, CPU crop:2+flip).")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--rows", default=None, help="Comma-separated subset of the rows (their keys: " +
                   ", ".join(k for k, _ in ROWS) + ").")
    p.add_argument("--table", default=None, help="Also write the markdown table to this file.")
    p.add_argument("--work", default=None, help="Scratch folder (default: a temporary one, removed after).")
    return p.parse_args(argv)


ROWS = [("scratch", "scratch"), ("online", "online KD (fresh views every epoch)"), ("kE", "cached KD, K = E"),
        ("kE6", "cached KD, K = E/6"), ("k1", "cached KD, K = 1 (one fixed view)"),
        ("mixE", "cached mixup, K = E"), ("dkd", "cached DKD, K = E"), ("mixlong", "cached mixup, K = 3E, 3E epochs")]


def main(argv=None):
    args = _args(argv)
    if args.device == "auto" and not torch.cuda.is_available():
        args.quick = True
    dev = setup(args)
    gpu = dev.type == "cuda" and not args.quick
    header("quality: scratch, online KD and cached KD over K, mixed views, DKD",
           argv=None if argv is None else ["bench/quality.py"] + list(argv))
    from kdpipe.checkpoint import load_teacher
    from kdpipe.engine import OptimConfig, build_run, predict, steps_per_epoch, train_pass
    from kdpipe.evaluate import eval_params, top1
    from kdpipe.student import train_students
    from kdpipe.teacher import dump_logits, train_teacher
    from kdpipe.util import images_tensor
    from kdpipe.views import create_policy

    E = args.epochs or (30 if gpu else 12)
    students = (args.students or ("resnet8x4,resnet20" if gpu else "mlp_100,mlp_800")).split(",")
    seeds = tuple(range(args.seeds))
    geo = args.policy or ("crop:4+flip" if gpu else "crop:2+flip")
    policy, mixed = create_policy(geo), create_policy(f"{geo}+mixup:{args.mixup:g}")
    optim = OptimConfig(lr=args.lr)
    rows = [k for k, _ in ROWS] if args.rows is None else args.rows.split(",")
    T, alpha = args.temperature, args.alpha
    t_all = time.perf_counter()
    with workdir(args) as work:
        teacher_train = None
        if gpu:
            train, test = load_split(args.cifar, "train", work), load_split(args.cifar, "test", work)
            what = "CIFAR-10"
        else:
            src = args.fashion or (str(DEFAULT_FASHION) if DEFAULT_FASHION.is_file() else "fashion-mnist")
            full_train, full_test = load_split(src, "train"), load_split(src, "test")
            n, nt = args.n_train or 3000, args.n_test or 2000
            train, test = subset_npz(full_train, full_test, n, nt, work / f"fashion-{n}-{nt}.npz")
            what = f"Fashion-MNIST, the first {len(train)} train / {len(test)} test images of {src}"
            if args.teacher_n_train:
                m = max(args.teacher_n_train, n)
                teacher_train, _ = subset_npz(full_train, full_test, m, nt, work / f"fashion-{m}-{nt}.npz")
                what += f" (the teacher trained on the first {len(teacher_train)})"
        emit(f"data: {what}; students {', '.join(students)}; E = {E} epochs; seeds {list(seeds)}; T = {T:g}, "
             f"alpha = {alpha:g}; views {geo}, mixed {mixed.spec}; batch {args.batch}, lr {args.lr:g}; device {dev}")

        t0 = time.perf_counter()
        if args.teacher_file:
            tpath = Path(args.teacher_file)
        else:
            tpath = work / "teacher.pt"
            if not tpath.is_file():
                tarch = args.teacher or ("resnet18_cifar" if gpu else "cnn_large")
                train_teacher(teacher_train or train, test, tarch, args.teacher_epochs or (30 if gpu else 8), tpath,
                              policy=policy, batch_size=args.batch, optim=optim, seed=0, device=dev, amp=gpu, log=quiet)
        teacher = load_teacher(tpath)
        timg = images_tensor(test.images, dev)
        tp = torch.from_numpy(eval_params(policy, test.image_shape, len(test))).to(dev)
        teacher_top1 = top1(predict(teacher.module.to(dev), timg, policy, tp, teacher.mean, teacher.std, amp=gpu),
                            test.labels)
        emit(f"teacher {teacher.arch}: test top-1 {teacher_top1:.4f} ({time.perf_counter() - t0:.0f}s)")

        caches = {}

        def cache(name, pol, k):
            if name not in caches:
                t = time.perf_counter()
                dump_logits(load_teacher(tpath), train, test, work / f"cache-{name}", policy=pol, views=k, seed=1,
                            batch_size=512, device=dev, amp=gpu, overwrite=True, log=quiet)
                emit(f"  dumped {name}: {pol.spec}, K = {k} ({time.perf_counter() - t:.0f}s)")
                caches[name] = work / f"cache-{name}"
            return caches[name]

        results: dict[tuple[str, str], list[float]] = {}
        diverged: dict[tuple[str, str], int] = {}

        def record(row, metrics):
            for r in metrics:
                results.setdefault((row, r["arch"]), []).append(r["test_top1"])
                if not all(math.isfinite(x) for x in r.get("train_loss", [])):  # kdpipe trains on through NaN
                    diverged[(row, r["arch"])] = diverged.get((row, r["arch"]), 0) + 1

        def cached(row, name, pol, k, epochs=E, alphas=(alpha,), loss="kd"):
            t = time.perf_counter()
            out = train_students(cache(name, pol, k), students, epochs, work / f"runs-{row}", loss=loss,
                                 temperatures=(T,), alphas=alphas, seeds=seeds, batch_size=args.batch, optim=optim,
                                 device=dev, amp=gpu, log=quiet)
            emit(f"  {row}: {time.perf_counter() - t:.0f}s")
            return out

        if "scratch" in rows or "kE" in rows:  # one pass: scratch and KD see the same views
            out = cached("scratch+kE", "kE", policy, E, alphas=(0.0, alpha))
            record("scratch", [r for r in out if r["alpha"] == 0])
            record("kE", [r for r in out if r["alpha"] != 0])
        if "kE6" in rows:
            record("kE6", cached("kE6", "kE6", policy, max(1, E // 6)))
        if "k1" in rows:
            record("k1", cached("k1", "k1", policy, 1))
        if "mixE" in rows:
            record("mixE", cached("mixE", "mixE", mixed, E))
        if "dkd" in rows:
            record("dkd", cached("dkd", "kE", policy, E, alphas=(), loss=f"dkd:warmup={max(1, E // 4)}"))
        if "mixlong" in rows:
            record("mixlong", cached("mixlong", "mixlong", mixed, 3 * E, epochs=3 * E))
        if "online" in rows:
            t = time.perf_counter()
            online = teacher.module.to(dev).eval()
            mean, std = teacher.mean, teacher.std
            shape = policy.output_shape(train.image_shape)
            images, labels = images_tensor(train.images, dev), torch.from_numpy(train.labels).to(dev)
            for seed in seeds:
                total = E * steps_per_epoch(len(train), args.batch)
                runs = [build_run(f"{a}-online", a, "kd", seed, train.num_classes, shape, optim, total, dev,
                                  loss_options={"temperature": T, "alpha": alpha}) for a in students]

                def fresh(epoch, seed=seed):  # new views every epoch, never reused
                    p = policy.sample_view(10_000 + seed, epoch, train.images.shape)
                    return torch.from_numpy(p).to(dev), None

                train_pass(runs, images, labels, policy, mean, std, E, args.batch, seed, fresh,
                           online_teacher=online, amp=gpu, label="online", log=quiet)
                record("online", [{"arch": r.arch, "train_loss": r.history,
                                   "test_top1": top1(predict(r.model, timg, policy, tp, mean, std, amp=gpu),
                                                     test.labels)} for r in runs])
            emit(f"  online: {time.perf_counter() - t:.0f}s")

    table = ["| row | " + " | ".join(f"{s} top-1 (%)" for s in students) + " |",
             "|---|" + "---|" * len(students)]
    for key, label in ROWS:
        if key not in rows:
            continue
        cells = []
        for s in students:
            v = [100 * x for x in results.get((key, s), [])]
            sd = statistics.stdev(v) if len(v) > 1 else float("nan")
            bad = diverged.get((key, s), 0)
            cells.append((f"{statistics.mean(v):.2f} ± {sd:.2f} (n={len(v)})" if v else "-")
                         + (f", {bad} run(s) diverged (NaN loss)" if bad else ""))
        table.append(f"| {label} | " + " | ".join(cells) + " |")
    emit()
    emit(f"teacher {teacher.arch} test top-1 {100 * teacher_top1:.2f}%; machine: {machine()}; "
         f"total {time.perf_counter() - t_all:.0f}s")
    for line in table:
        emit(line)
    if args.table:
        Path(args.table).write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
