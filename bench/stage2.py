"""(a) Stage two: training a student from a cache vs plain training of the same student, with the same loop
(kdpipe.engine.train_pass) and the same replayed augmentation (uint8 data on the device).

plain:  alpha = 0 (cross-entropy only); crop-flip parameters drawn in memory every epoch, as ordinary
        online augmentation does (what train-teacher does).
cached: alpha = 0.9 KD from a cache written by dump-logits; every epoch reads one view's parameters and
        logits from the cache (memory-mapped, one slice per view), exactly as train-student does.

The two alternate (plain, cached, plain, cached, ...) after a warm-up of each, so drifts of a shared
machine hit both; the ratio is of the median images/s.

GPU: resnet8x4 on CIFAR-10, batch 256, bf16 autocast. CPU: cnn_small on Fashion-MNIST (20,000 samples),
batch 256; --quick: cnn_tiny on 2,048 samples.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from common import (bench_data, common_args, dump_cache, emit, figure, header, median, quiet, ratio,
                    save_random_teacher, setup, workdir)


def main(argv=None):
    p = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--student", default=None, help="Student architecture (default resnet8x4 on GPU, cnn_small on CPU).")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--epochs", type=int, default=None, help="Epochs per measurement (default 1).")
    p.add_argument("--repeats", type=int, default=None, help="Measurements of each (default 3, quick 2).")
    args = p.parse_args(argv)
    dev = setup(args)
    header("stage two: cached KD vs plain training, same loop", argv=None if argv is None else ["bench/stage2.py"] + list(argv))
    from kdpipe.cache.reader import Cache
    from kdpipe.losses import create_loss
    from kdpipe.engine import OptimConfig, build_run, steps_per_epoch, train_pass
    from kdpipe.views import create_policy

    gpu = dev.type == "cuda"
    student = args.student or ("resnet8x4" if gpu else "cnn_tiny" if args.quick else "cnn_small")
    epochs = args.epochs or 1
    repeats = args.repeats or (2 if args.quick else 3)
    amp = gpu
    with workdir(args) as work:
        train, test, what = bench_data(args, dev, work, n_quick=2048, n_cpu=20000)
        policy = create_policy("crop-flip", padding=4)
        mean, std = train.channel_stats()
        shape = policy.output_shape(train.image_shape)
        teacher = save_random_teacher(work / "teacher-s2.pt", student, train, policy)
        views = max(2, epochs)
        res, _ = dump_cache(work / "cache-s2", train, None, policy, teacher, views, dev, batch=1024 if gpu else 512,
                            amp=amp)
        cache = Cache(work / "cache-s2")
        emit(f"data: {what}, {len(train)} samples; student {student}; batch {args.batch}; {epochs} epoch(s) per "
             f"measurement; device {dev}; amp {amp}; cache K={views} ({res['bytes'] / 1e6:.1f} MB)")
        images = torch.from_numpy(np.ascontiguousarray(train.images)).to(dev)
        labels = torch.from_numpy(train.labels).to(dev)
        total = epochs * steps_per_epoch(len(train), args.batch)

        def plain_views(e):
            return torch.from_numpy(policy.sample_view(12345, e, train.images.shape)).to(dev), None

        def cached_views(e):
            v = e % cache.num_views
            return (torch.from_numpy(cache.read_view(v, "view_params")).to(dev),
                    torch.from_numpy(cache.read_view(v, "logits")).to(dev))

        def measure(kind, ep=epochs):
            alpha = 0.0 if kind == "plain" else 0.9
            run = build_run(kind, student, create_loss("kd", temperature=4.0, alpha=alpha), 0, train.num_classes, shape,
                            OptimConfig(), total, dev)
            st = train_pass([run], images, labels, policy, mean, std, ep, args.batch, 0,
                            plain_views if kind == "plain" else cached_views, amp=amp, log=quiet)
            return st["images_per_s"]

        measure("plain", 1)  # warm-up (cuDNN autotuning, allocator, first reads)
        measure("cached", 1)
        got = {"plain": [], "cached": []}
        for _ in range(repeats):
            for kind in ("plain", "cached"):
                got[kind].append(measure(kind))
        for kind in ("plain", "cached"):
            emit(f"{kind}: " + ", ".join(f"{v:,.0f}" for v in got[kind]) + " images/s")
            figure(f"stage2_{kind}_images_per_s_median", median(got[kind]), "images/s")
        ratio("stage2_cached_vs_plain", median(got["cached"]) / median(got["plain"]))
        ratio("stage2_cached_vs_plain_best", max(got["cached"]) / max(got["plain"]))


if __name__ == "__main__":
    main()
