"""What stage two's crash safety costs: the time and size of one pass checkpoint (kdpipe.resume), against
the time of a training step of the same runs.

S runs of one architecture (different seeds) take a few SGD steps on random inputs, so the optimizer holds
its momentum, then PassCheckpoint.save writes the pass R times (temporary file, fsync, rename): the
median write time, the size and the write rate are printed, with the median time of one unfused step of
all S runs at batch B, and their ratio: how many steps one checkpoint costs. A checkpoint is written at
the end of every epoch and every --checkpoint-every minutes (default 10), so its share of the training
time is (checkpoint time) / (epoch time), printed for an epoch of --epoch-images images.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import common_args, emit, figure, header, ratio, setup, workdir


def main(argv=None):
    p = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--arch", default=None, help="Default: resnet8x4 on CUDA (CIFAR's shape), cnn_small on the CPU "
                                                "(Fashion-MNIST's).")
    p.add_argument("--shape", default=None, help="Input shape C,H,W (default: the arch's data's).")
    p.add_argument("--runs", type=int, default=4, help="Runs in the pass (S).")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--epoch-images", type=int, default=None, help="Images per epoch, for the share (default: the "
                                                                    "data's train split, 50,000 or 60,000).")
    args = p.parse_args(argv)
    dev = setup(args)
    header("the cost of a pass checkpoint (stage two crash safety)",
           argv=None if argv is None else ["bench/checkpoint_cost.py"] + list(argv))
    from kdpipe.engine import OptimConfig, build_run
    from kdpipe.losses import create_loss
    from kdpipe.resume import PassCheckpoint

    gpu = dev.type == "cuda"
    args.arch = args.arch or ("resnet8x4" if gpu else "cnn_small")
    shape = tuple(int(s) for s in (args.shape or ("3,32,32" if gpu else "1,28,28")).split(","))
    args.epoch_images = args.epoch_images or (50000 if shape[0] == 3 else 60000)
    runs = [build_run(f"{args.arch}-s{s}", args.arch, create_loss("kd"), s, 10, shape, OptimConfig(), 1000, dev)
            for s in range(args.runs)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *shape, generator=g).to(dev)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(dev)
    t = torch.randn(args.batch, 10, generator=g).to(dev)

    def step():
        for r in runs:
            terms = r.loss(r.model(x), t, y, 0)
            r.optimizer.zero_grad(set_to_none=True)
            sum(terms.values()).backward()
            r.optimizer.step()
            r.scheduler.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up, and momentum buffers exist from here on
    steps = []
    for _ in range(max(3, args.repeats)):
        t0 = time.perf_counter()
        step()
        steps.append(time.perf_counter() - t0)
    step_s = statistics.median(steps)
    units = [[i] for i in range(len(runs))]
    with workdir(args) as work:
        ck = PassCheckpoint(work, 0, {r.name: {"run": r.name} for r in runs}, 1, 0, log=lambda *a: None)
        writes = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ck.save(runs, units, 0, 1, None, 0, 0.0)
            writes.append(time.perf_counter() - t0)
        size = ck.path.stat().st_size
    write_s = statistics.median(writes)
    params = sum(p.numel() for p in runs[0].model.parameters())
    emit(f"{args.runs} x {args.arch} ({params:,} parameters each) on {dev}, batch {args.batch}, "
         f"{args.repeats} writes: " + ", ".join(f"{w:.3f}s" for w in writes))
    figure("checkpoint_mb", size / 1e6, "MB")
    figure("checkpoint_write_ms", write_s * 1e3, "ms (median)")
    figure("checkpoint_write_mb_per_s", size / 1e6 / write_s, "MB/s")
    figure("step_of_all_runs_ms", step_s * 1e3, "ms (median, unfused)")
    ratio("checkpoint_in_steps", write_s / step_s)
    epoch_s = step_s * args.epoch_images / args.batch
    emit(f"an epoch of {args.epoch_images:,} images: about {epoch_s:.1f}s of steps here")
    emit(f"checkpoint share of such an epoch: {write_s / epoch_s:.2e} (one checkpoint per epoch)")


if __name__ == "__main__":
    main()
