"""(d) Memory: stage two's resident memory stays flat as the cache grows.

Caches of one dataset with K views each (the largest many times the size of the dataset) are dumped
first; then, for each, a fresh process runs kdpipe.student.train_students (the train-student command's
library call) for the same number of epochs and samples VmRSS from /proc/self/status every 20 ms on a
thread. Stage two reads one view (N rows) per epoch from memory-mapped shards, so its RSS should depend
on N, not on K.

Stage two runs on the CPU (host memory is what is measured): cnn_tiny student on Fashion-MNIST, mlp_100
teacher (the caches are dumped on CUDA when present, to save time; the files are the same).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import (REPO, RssSampler, common_args, dump_cache, emit, figure, header, load_split, ratio,
                    save_random_teacher, subset_npz, vm_rss_mb, workdir)


def child(args) -> None:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from kdpipe.student import train_students
    before = vm_rss_mb()
    with RssSampler(0.02) as s:
        train_students(args.child, ["cnn_tiny"], args.epochs, Path(args.child).parent / (Path(args.child).name + "-runs"),
                       batch_size=256, device=torch.device("cpu"), log=lambda *a: None)
    rss = [r for _, r in s.samples]
    print("RESULT " + json.dumps({"before_mb": before, "max_mb": max(rss), "end_mb": rss[-1], "samples": len(rss),
                                  "series": [round(rss[int(i * (len(rss) - 1) / 9)], 1) for i in range(10)],
                                  "seconds": s.samples[-1][0]}), flush=True)


def main(argv=None):
    p = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--views", default=None, help="K of each cache, comma-separated (default 1,128 quick; 1,64,512).")
    p.add_argument("--samples", type=int, default=None, help="Samples of the dataset (default 1,000 quick; 10,000).")
    p.add_argument("--epochs", type=int, default=None, help="Stage-two epochs per cache (default 2).")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    header("memory: stage-two RSS as the cache grows", argv=None if argv is None else ["bench/memory.py"] + list(argv))
    from kdpipe.views import create_policy

    ks = [int(k) for k in (args.views or ("1,128" if args.quick else "1,64,512")).split(",")]
    n = args.samples or (1000 if args.quick else 10000)
    epochs = args.epochs or 2
    # stage two runs on the CPU (the child process); the dumps use CUDA when present (faster, same files)
    dump_dev = torch.device("cuda" if torch.cuda.is_available() and not args.quick and args.device != "cpu" else "cpu")
    with workdir(args) as work:
        tr, te = load_split(args.fashion, "train"), load_split(args.fashion, "test")
        train, test = subset_npz(tr, te, n, 500, work / f"fashion-mem-{n}.npz")
        data_mb = train.images.nbytes / 1e6
        policy = create_policy("crop-flip", padding=4)
        teacher = save_random_teacher(work / "teacher-mem.pt", "mlp_100", train, policy)
        emit(f"data: Fashion-MNIST, {n} samples ({data_mb:.1f} MB of uint8 pixels); stage two: cnn_tiny, "
             f"batch 256, {epochs} epochs, CPU; RSS sampled every 20 ms")
        rows = []
        for k in ks:
            out = work / f"cache-mem-K{k}"
            res, wall = dump_cache(out, train, test, policy, teacher, k, dump_dev, batch=1024)
            cache_mb = res["bytes"] / 1e6
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(out), "--epochs", str(epochs)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                emit(f"K={k}: the stage-two process failed (exit {proc.returncode}): {proc.stderr[-800:]}")
                continue
            r = json.loads(line[7:])
            rows.append((k, cache_mb, r))
            emit(f"K={k:>5}: cache {cache_mb:8.1f} MB = {cache_mb / data_mb:6.1f}x the dataset (dumped in {wall:.1f}s); "
                 f"RSS before {r['before_mb']:.0f} MB, max {r['max_mb']:.0f} MB, end {r['end_mb']:.0f} MB "
                 f"({r['samples']} samples over {r['seconds']:.1f}s)")
            emit(f"         RSS along the run (MB): {r['series']}")
            figure(f"memory_K{k}_cache_mb", cache_mb, "MB")
            figure(f"memory_K{k}_rss_max_mb", r["max_mb"], "MB")
        if len(rows) >= 2:
            (k0, c0, r0), (k1, c1, r1) = rows[0], rows[-1]
            ratio(f"memory_cache_size_K{k1}_vs_K{k0}", c1 / c0)
            ratio(f"memory_rss_max_K{k1}_vs_K{k0}", r1["max_mb"] / r0["max_mb"])
            ratio(f"memory_rss_growth_during_run_K{k1}", (r1["max_mb"] - r1["before_mb"]) / max(1.0, r0["max_mb"] - r0["before_mb"]))


if __name__ == "__main__":
    main()
