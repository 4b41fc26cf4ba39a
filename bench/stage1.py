"""(b) Stage one: dump-logits throughput vs the teacher's own batched inference on the same views.

inference: for each of the K views, kdpipe.engine.predict (replay on the device + teacher forward, the
           logits left on the device), same batch size and autocast as the dump.
dump:      kdpipe.teacher.dump_logits over the same K views, writing included (HDF5 shards, checksums,
           fsync); 'compute' is the dump's own row loop with shard writing, 'call' the whole call
           (also the clean test split, the manifest, the teacher's CPU latency).

The two alternate after a warm-up; ratios are of the median rows/s. The teachers are untrained (speed
does not depend on the weights).

GPU: resnet32x4 and resnet18_cifar on CIFAR-10, K = 10, bf16 autocast, batch 1024. CPU: cnn_large on
10,000 Fashion-MNIST samples (--quick: cnn_small on 2,048), K = 2, batch 512.
"""

from __future__ import annotations

import argparse
import shutil

import numpy as np
import torch

from common import (Timer, bench_data, common_args, dump_cache, emit, figure, header, median, ratio,
                    save_random_teacher, setup, workdir)


def main(argv=None):
    p = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--teachers", default=None, help="Comma-separated teacher architectures.")
    p.add_argument("--views", default=None, help="K per teacher, comma-separated (default GPU 10; CPU 2).")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    dev = setup(args)
    header("stage one: dump-logits vs batched inference", argv=None if argv is None else ["bench/stage1.py"] + list(argv))
    from kdpipe.cache.writer import plan_shards
    from kdpipe.checkpoint import load_teacher
    from kdpipe.engine import predict
    from kdpipe.views import create_policy

    gpu = dev.type == "cuda"
    teachers = (args.teachers or ("resnet32x4,resnet18_cifar" if gpu else "cnn_small" if args.quick
                                  else "cnn_large")).split(",")
    views = [int(v) for v in (args.views or ("10" if gpu else "2")).split(",")]
    views = (views * len(teachers))[:len(teachers)] if len(views) < len(teachers) else views
    batch = args.batch or (1024 if gpu else 512)
    repeats = args.repeats or (1 if args.quick else 2)
    amp = gpu
    with workdir(args) as work:
        train, test, what = bench_data(args, dev, work, n_quick=2048, n_cpu=10000)
        policy = create_policy("crop-flip", padding=4)
        images = torch.from_numpy(np.ascontiguousarray(train.images)).to(dev)
        for arch, k in zip(teachers, views):
            path = save_random_teacher(work / f"teacher-{arch}.pt", arch, train, policy)
            t = load_teacher(path)
            mod = t.module.to(dev).eval()
            if gpu:
                mod = mod.to(memory_format=torch.channels_last)
            mean, std = t.mean, t.std
            params = [torch.from_numpy(policy.sample_view(0, v, train.images.shape)).to(dev) for v in range(k)]
            rows = len(train) * k
            emit(f"teacher {arch}: {what}, {len(train)} samples x K={k} views = {rows:,} rows; batch {batch}; "
                 f"device {dev}; amp {amp}")

            def infer():
                with Timer(dev) as tm:
                    for v in range(k):
                        predict(mod, images, policy, params[v], mean, std, batch_size=batch, amp=amp)
                return rows / tm.s

            def dump(i):
                out = work / f"cache-{arch}-{i}"
                res, wall = dump_cache(out, train, test, policy, path, k, dev, batch=batch, amp=amp)
                nbytes = res["bytes"]
                shutil.rmtree(out, ignore_errors=True)
                return res["rows_per_s"], rows / wall, nbytes

            # warm-up (cuDNN autotuning): every batch shape the inference and the dump will use (a shard's
            # last batch can be shorter), so that neither pays for it in the timed runs
            shapes = {batch, len(train) % batch} | {(e - s) % batch for s, e in plan_shards(rows, 65536)}
            with Timer(dev):
                for b in sorted(x for x in shapes if x):
                    predict(mod, images[:b], policy, params[0][:b], mean, std, batch_size=batch, amp=amp)
            inf, comp, call = [], [], []
            for i in range(repeats):
                inf.append(infer())
                c, w, nbytes = dump(i)
                comp.append(c)
                call.append(w)
            emit("  inference: " + ", ".join(f"{v:,.0f}" for v in inf) + " rows/s")
            emit("  dump (compute + writing): " + ", ".join(f"{v:,.0f}" for v in comp) + " rows/s")
            emit("  dump (whole call): " + ", ".join(f"{v:,.0f}" for v in call) + f" rows/s; {nbytes / 1e6:.1f} MB")
            figure(f"stage1_{arch}_inference_rows_per_s_median", median(inf), "rows/s")
            figure(f"stage1_{arch}_dump_rows_per_s_median", median(comp), "rows/s")
            figure(f"stage1_{arch}_dump_call_rows_per_s_median", median(call), "rows/s")
            ratio(f"stage1_{arch}_dump_vs_inference", median(comp) / median(inf))
            ratio(f"stage1_{arch}_dump_call_vs_inference", median(call) / median(inf))


if __name__ == "__main__":
    main()
