"""(e) End to end: total time for S students x E epochs with the cached pipeline (one dump of K = E views,
then the S students in one train-student pass) vs online KD (the teacher run in every step), for
S = 1, 4, 8. Everything goes through the library calls behind the commands (dump_logits,
train_students), so the times include what the commands do besides training (loading, test-split
evaluation, checkpoints).

cached:           dump (whole call) + train_students(S runs, one pass, --fuse auto).
online, one pass: train_students(S runs, online_teacher=teacher): kdpipe shares one teacher forward
                  per batch among the S students of the pass.
online, separate: S train_students calls of one run each, the usual way to run S online-KD
                  experiments; the time for S is the sum of the first S of 8 such runs.

GPU: resnet32x4 teacher (untrained: speed does not depend on the weights), resnet8x4 students,
CIFAR-10, batch 256, bf16, E = 2. CPU: cnn_large teacher, cnn_tiny students, 4,096 Fashion-MNIST samples
(--quick: cnn_small teacher, 1,024 samples, S = 1, 4).
"""

from __future__ import annotations

import argparse

import torch

from common import (Timer, bench_data, common_args, dump_cache, emit, figure, header, quiet, ratio,
                    save_random_teacher, setup, workdir)


def main(argv=None):
    p = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--teacher", default=None)
    p.add_argument("--student", default=None)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--students", default=None, help="Values of S, comma-separated (default 1,4,8).")
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args(argv)
    dev = setup(args)
    header("end to end: cached pipeline vs online KD", argv=None if argv is None else ["bench/end_to_end.py"] + list(argv))
    from kdpipe.checkpoint import load_teacher
    from kdpipe.engine import OptimConfig
    from kdpipe.student import train_students
    from kdpipe.views import create_policy

    gpu = dev.type == "cuda"
    teacher_arch = args.teacher or ("resnet32x4" if gpu else "cnn_small" if args.quick else "cnn_large")
    student = args.student or ("resnet8x4" if gpu else "cnn_tiny")
    s_values = [int(s) for s in (args.students or ("1,4" if args.quick else "1,4,8")).split(",")]
    e = args.epochs
    amp = gpu
    temps, alphas = [1.0, 2.0, 4.0, 8.0], [0.5, 0.9]
    with workdir(args) as work:
        train, test, what = bench_data(args, dev, work, n_quick=1024, n_cpu=4096)
        policy = create_policy("crop-flip", padding=4)
        tpath = save_random_teacher(work / f"teacher-e2e-{teacher_arch}.pt", teacher_arch, train, policy)
        emit(f"data: {what}, {len(train)} samples, test {len(test)}; teacher {teacher_arch}; students {student}; "
             f"E = {e} epochs; batch {args.batch}; device {dev}; amp {amp}")
        cache = work / "cache-e2e"
        res, dump_s = dump_cache(cache, train, test, policy, tpath, e, dev, batch=1024 if gpu else 512, amp=amp)
        emit(f"dump: K = {e} views, {res['rows']:,} rows in {dump_s:.1f}s (whole call)")
        figure("e2e_dump_s", dump_s, "s")

        teacher = load_teacher(tpath).module.to(dev).eval()
        if gpu:
            teacher = teacher.to(memory_format=torch.channels_last)

        def sweep(s, out, online):
            t = temps[: min(4, s)]
            a = alphas[: max(1, s // 4)]
            if len(t) * len(a) != s:
                raise SystemExit(f"--students: S must be 1, 2, 3, 4 or 8, got {s}")
            with Timer(dev) as tm:
                r = train_students(cache, [student], e, out, temperatures=t, alphas=a, batch_size=args.batch,
                                   optim=OptimConfig(), device=dev, amp=amp,
                                   online_teacher=teacher if online else None, log=quiet)
            return tm.s, r

        # warm-up (cuDNN autotuning for both the student and the teacher): one short online run
        sweep(1, work / "runs-warm", True)
        separate = []
        for i in range(max(s_values)):
            sec, _ = sweep(1, work / f"runs-sep-{i}", True)
            separate.append(sec)
        emit("online separate runs (s each): " + ", ".join(f"{x:.1f}" for x in separate))
        for s in s_values:
            cached_s, _ = sweep(s, work / f"runs-cached-{s}", False)
            online_s = sweep(s, work / f"runs-online-{s}", True)[0] if s > 1 else separate[0]
            sep_s = sum(separate[:s])
            total_cached = dump_s + cached_s
            emit(f"S={s}: cached {total_cached:.1f}s (dump {dump_s:.1f} + train {cached_s:.1f}); online one pass "
                 f"{online_s:.1f}s; online separate {sep_s:.1f}s")
            figure(f"e2e_S{s}_cached_total_s", total_cached, "s")
            figure(f"e2e_S{s}_online_onepass_s", online_s, "s")
            figure(f"e2e_S{s}_online_separate_s", sep_s, "s")
            ratio(f"e2e_S{s}_online_separate_vs_cached_time", sep_s / total_cached)
            ratio(f"e2e_S{s}_online_onepass_vs_cached_time", online_s / total_cached)


if __name__ == "__main__":
    main()
