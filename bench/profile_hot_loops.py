"""Profile the two hot loops: kdpipe.engine.train_pass (stage two, one cached-KD student) and
kdpipe.teacher.dump_logits (stage one). cProfile on the CPU (where the time goes by Python function:
is any of it per-sample Python, or kdpipe's own code rather than torch's kernels?); with CUDA, also
torch.profiler's top operators by device time.

    python bench/profile_hot_loops.py --threads 1              # CPU: cnn_small on 20,000 Fashion-MNIST samples
    python bench/profile_hot_loops.py --device cuda            # GPU: resnet8x4 student, resnet32x4 teacher, CIFAR-10
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil

import numpy as np
import torch

from common import (bench_data, common_args, emit, figure, header, quiet, save_random_teacher, setup, sync,
                    workdir)


def top(pr: cProfile.Profile, n: int = 12) -> str:
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(n)
    return s.getvalue()


def kdpipe_share(pr: cProfile.Profile) -> float:
    """Share of the profiled time spent in kdpipe's own Python lines (not in what they call)."""
    st = pstats.Stats(pr)
    total = st.total_tt
    own = sum(v[2] for k, v in st.stats.items() if "/kdpipe/" in k[0])
    return own / total if total else 0.0


def main(argv=None):
    p = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = p.parse_args(argv)
    dev = setup(args)
    header("profile of the hot loops", argv=None if argv is None else ["bench/profile_hot_loops.py"] + list(argv))
    from kdpipe.cache.reader import Cache
    from kdpipe.checkpoint import load_teacher
    from kdpipe.losses import create_loss
    from kdpipe.engine import OptimConfig, build_run, train_pass
    from kdpipe.teacher import dump_logits
    from kdpipe.views import create_policy

    gpu = dev.type == "cuda"
    student, teacher_arch = ("resnet8x4", "resnet32x4") if gpu else ("cnn_small", "cnn_small")
    with workdir(args) as work:
        train, test, what = bench_data(args, dev, work, n_quick=2048, n_cpu=20000)
        policy = create_policy("crop-flip", padding=4)
        tpath = save_random_teacher(work / "teacher-prof.pt", teacher_arch, train, policy)
        teacher = load_teacher(tpath)
        emit(f"data: {what}; student {student}; teacher {teacher_arch}; device {dev}")

        # stage one
        out = work / "cache-prof"
        pr = cProfile.Profile()
        pr.enable()
        dump_logits(teacher, train, None, out, policy=policy, views=2, device=dev, amp=gpu,
                    batch_size=1024 if gpu else 512, log=quiet, force=True)  # an untrained teacher
        sync(dev)
        pr.disable()
        emit("\n-- dump_logits, cProfile by own time")
        emit(top(pr))
        figure("profile_dump_kdpipe_own_python_share", 100 * kdpipe_share(pr), "% of wall")

        # stage two
        cache = Cache(out)
        images = torch.from_numpy(np.ascontiguousarray(train.images)).to(dev)
        labels = torch.from_numpy(train.labels).to(dev)
        mean, std = cache.manifest["input"]["mean"], cache.manifest["input"]["std"]

        def views(e):
            return (torch.from_numpy(cache.read_view(e % 2, "view_params")).to(dev),
                    torch.from_numpy(cache.read_view(e % 2, "logits")).to(dev))

        run = build_run("s", student, create_loss("kd", temperature=4.0, alpha=0.9), 0, train.num_classes,
                        policy.output_shape(train.image_shape), OptimConfig(), 1000, dev)
        train_pass([run], images, labels, policy, mean, std, 1, 256, 0, views, amp=gpu, log=quiet)  # warm-up
        pr = cProfile.Profile()
        pr.enable()
        train_pass([run], images, labels, policy, mean, std, 1, 256, 0, views, amp=gpu, log=quiet)
        sync(dev)
        pr.disable()
        emit("\n-- train_pass (one cached-KD student, one epoch), cProfile by own time")
        emit(top(pr))
        figure("profile_train_pass_kdpipe_own_python_share", 100 * kdpipe_share(pr), "% of wall")
        if gpu:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                train_pass([run], images[:256 * 40], labels[:256 * 40], policy, mean, std, 1, 256, 0, views,
                           amp=gpu, log=quiet)
                sync(dev)
            emit("\n-- train_pass, torch.profiler, top operators by device time")
            emit(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
