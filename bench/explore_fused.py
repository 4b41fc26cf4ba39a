"""Exploration behind the fused sweep path (kdpipe.fused): step throughput of S students of one
architecture, stepped one after another vs fused (vmap over stacked weights) in a few variants,
on random CIFAR-shaped batches already on the device. Prints figures and ratios; asserts nothing.

    python bench/explore_fused.py --device cuda --students 8 --arch resnet8x4 --batch 256 --steps 60
"""

from __future__ import annotations

import argparse
import time

import torch

from common import emit, figure, header, ratio, sync


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--students", type=int, default=8)
    p.add_argument("--arch", default="resnet8x4")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--variants", default="single,single_big,unfused,fused,fused_nopool,fused_compile,fused_compile_nopool")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    header("explore fused sweep steps", argv=None if argv is None else ["bench/explore_fused.py"] + list(argv))
    from kdpipe.losses import create_loss
    from kdpipe.engine import OptimConfig, build_run
    from kdpipe.fused import FusedRuns

    dev = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    amp = dev.type == "cuda"
    shape = (3, 32, 32)
    s, b = args.students, args.batch
    g = torch.Generator(device="cpu").manual_seed(0)
    xs = [torch.randn(b, *shape, generator=g).to(dev) for _ in range(4)]
    ts = [torch.randn(b, 10, generator=g).to(dev) for _ in range(4)]
    ys = [torch.randint(0, 10, (b,), generator=g).to(dev) for _ in range(4)]
    if dev.type == "cuda":
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if amp else torch.autocast(dev.type, enabled=False)

    def runs_(n):
        return [build_run(f"r{i}", args.arch, create_loss("kd", temperature=4.0, alpha=0.9), i, 10, shape,
                          OptimConfig(), 10_000, dev) for i in range(n)]

    def timed(step, steps):
        for i in range(20):
            step(i)
        sync(dev)
        t0 = time.perf_counter()
        for i in range(steps):
            step(i)
        sync(dev)
        return time.perf_counter() - t0

    results = {}

    def plain_step(runs, x, t, y):
        for r in runs:
            with autocast:
                out = r.model(x)
            loss = r.loss(out, t, y)
            r.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            r.optimizer.step()
            r.scheduler.step()

    for v in args.variants.split(","):
        try:
            if v == "single":
                runs = runs_(1)
                sec = timed(lambda i: plain_step(runs, xs[i % 4], ts[i % 4], ys[i % 4]), args.steps)
                results[v] = b * args.steps / sec
            elif v == "single_big":
                runs = runs_(1)
                xb = torch.cat(xs * (s // 4 or 1))[: b * s]
                xb = xb.contiguous(memory_format=torch.channels_last) if dev.type == "cuda" else xb
                tb, yb = torch.cat(ts * (s // 4 or 1))[: b * s], torch.cat(ys * (s // 4 or 1))[: b * s]
                sec = timed(lambda i: plain_step(runs, xb, tb, yb), max(1, args.steps // s))
                results[v] = len(xb) * max(1, args.steps // s) / sec
            elif v == "unfused":
                runs = runs_(s)
                sec = timed(lambda i: plain_step(runs, xs[i % 4], ts[i % 4], ys[i % 4]), args.steps)
                results[v] = s * b * args.steps / sec
            elif v.startswith("fused"):
                runs = runs_(s)
                comp = "reduce-overhead" if "_ro" in v else ("max-autotune-no-cudagraphs" if "_ma" in v
                                                             else "compile" in v)
                t0 = time.perf_counter()
                f = FusedRuns(runs, amp=amp, compile=comp, pool_as_mean="nopool" not in v)
                inputs = xs if "nchw" not in v else [x.contiguous() for x in xs]
                if comp:
                    f.step(inputs[0], ts[0], ys[0])
                    sync(dev)
                    figure(f"{v}_first_step_s", time.perf_counter() - t0, "s")
                sec = timed(lambda i: f.step(inputs[i % 4], ts[i % 4], ys[i % 4]), args.steps)
                results[v] = s * b * args.steps / sec
            else:
                emit(f"unknown variant {v}")
                continue
            figure(f"{v}_student_images_per_s", results[v], "student-images/s")
        except Exception as e:  # an exploration: report and go on
            emit(f"variant {v} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    if "single" in results:
        for v, val in results.items():
            if v != "single":
                ratio(f"explore_{v}_vs_separate_S{s}", val / results["single"])


if __name__ == "__main__":
    main()
