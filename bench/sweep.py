"""(c) Sweeps: S students of one small architecture (different T, alpha and init seeds) trained in one
pass over a cache vs S separate runs, all through kdpipe.engine.train_pass.

separate:        S passes of one student each (what S separate train-student commands do).
one pass:        one pass, the students stepped one after another on each replayed batch (--no-fuse).
fused:           one pass, the students stepped as one vmapped network (fuse=True).
fused+compile:   the same under torch.compile (fuse="compile"; the default for long passes on CUDA).
dense ceiling:   one student at batch S x B: what the device does with the same arithmetic in one
                 ordinary network (an upper bound for any fusion, measured for scale).

Every mode runs E >= 2 epochs; steady-state images/s are read from the epochs after the first (the
first holds cuDNN autotuning and compilation), and the first-epoch time is printed. Ratios are of
total student-images/s against the separate runs.

GPU: 8 x resnet8x4 on CIFAR-10 (25,600 images per epoch), batch 256, bf16. CPU: 8 x cnn_tiny on
Fashion-MNIST, batch 256 (fusion is not used by default on CPU: it is slower there, see the figures).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from common import (EpochClock, bench_data, common_args, dump_cache, emit, figure, header, ratio,
                    save_random_teacher, setup, workdir)


def main(argv=None):
    p = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--students", type=int, default=8)
    p.add_argument("--arch", default=None)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--images", type=int, default=None, help="Images per epoch (a prefix of the train split).")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--modes", default=None,
                   help="Comma-separated: separate,onepass,fused,compiled,ceiling (default on GPU: all but "
                        "fused, to fit the time of one device call; on CPU: separate,onepass,fused).")
    args = p.parse_args(argv)
    dev = setup(args)
    header("sweeps: S students in one pass vs S separate runs", argv=None if argv is None else ["bench/sweep.py"] + list(argv))
    from kdpipe.cache.reader import Cache
    from kdpipe.losses import create_loss
    from kdpipe.engine import OptimConfig, build_run, steps_per_epoch, train_pass
    from kdpipe.views import create_policy

    gpu = dev.type == "cuda"
    arch = args.arch or ("resnet8x4" if gpu else "cnn_tiny")
    s_count = args.students
    epochs = max(2, args.epochs)
    modes = (args.modes or ("separate,onepass,compiled,ceiling" if gpu else "separate,onepass,fused")).split(",")
    amp = gpu
    with workdir(args) as work:
        train, _, what = bench_data(args, dev, work, n_quick=1024, n_cpu=10240)
        n = min(args.images or (25600 if gpu else len(train)), len(train))
        policy = create_policy("crop-flip", padding=4)
        mean, std = train.channel_stats()
        shape = policy.output_shape(train.image_shape)
        teacher = save_random_teacher(work / "teacher-sweep.pt", arch, train, policy)
        dump_cache(work / "cache-sweep", train, None, policy, teacher, epochs, dev, batch=1024 if gpu else 512, amp=amp)
        cache = Cache(work / "cache-sweep")
        images = torch.from_numpy(np.ascontiguousarray(train.images[:n])).to(dev)
        labels = torch.from_numpy(train.labels[:n]).to(dev)
        total = epochs * steps_per_epoch(n, args.batch)
        temps, alphas = [1.0, 2.0, 4.0, 8.0], [0.5, 0.9]
        specs = [(temps[i % 4], alphas[(i // 4) % 2], i) for i in range(s_count)]
        emit(f"data: {what}, {n} images per epoch; {s_count} x {arch}; batch {args.batch}; {epochs} epochs per mode; "
             f"device {dev}; amp {amp}; (T, alpha, seed) = {specs}")

        def views(e):
            v = e % cache.num_views
            return (torch.from_numpy(cache.read_view(v, "view_params")[:n]).to(dev),
                    torch.from_numpy(cache.read_view(v, "logits")[:n]).to(dev))

        def one_pass(specs_, fuse, batch=args.batch):
            runs = [build_run(f"T{t}-a{a}-s{sd}", arch, create_loss("kd", temperature=t, alpha=a), sd, train.num_classes,
                              shape, OptimConfig(), total, dev)
                    for t, a, sd in specs_]
            clock = EpochClock()
            st = train_pass(runs, images, labels, policy, mean, std, epochs, batch, 0, views, amp=amp,
                            log=clock, fuse=fuse)
            ep = clock.epoch_seconds()
            per_epoch = steps_per_epoch(n, batch) * batch
            steady = per_epoch * (len(ep) - 1) / sum(ep[1:])
            return steady * len(runs), ep[0], st

        results = {}
        for mode in modes:
            if mode == "separate":
                rates, firsts = [], []
                for sp in specs:
                    r, first, _ = one_pass([sp], False)
                    rates.append(r)
                    firsts.append(first)
                # S separate runs one after another: total student-images / total steady time
                results[mode] = s_count / sum(1.0 / r for r in rates)
                emit("separate: per run " + ", ".join(f"{r:,.0f}" for r in rates) + " images/s (steady); first "
                     f"epochs {', '.join(f'{f:.2f}' for f in firsts)} s")
            elif mode in ("onepass", "fused", "compiled"):
                fuse = {"onepass": False, "fused": True, "compiled": "compile"}[mode]
                r, first, st = one_pass(specs, fuse)
                results[mode] = r
                emit(f"{mode}: {r:,.0f} student-images/s (steady); first epoch {first:.2f} s; fused groups "
                     f"{len(st['fused_groups'])}")
            elif mode == "ceiling":
                big = args.batch * s_count
                if big > n:
                    emit("ceiling: skipped (fewer images than S x B)")
                    continue
                r, first, _ = one_pass(specs[:1], False, batch=big)
                results[mode] = r
                emit(f"ceiling: one {arch} at batch {big}: {r:,.0f} images/s (steady)")
            else:
                emit(f"unknown mode {mode}")
                continue
            figure(f"sweep_{mode}_student_images_per_s", results[mode], "student-images/s")
        if "separate" in results:
            for mode, v in results.items():
                if mode != "separate":
                    ratio(f"sweep_{mode}_vs_separate_S{s_count}", v / results["separate"])


if __name__ == "__main__":
    main()
