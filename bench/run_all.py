"""Run every kdpipe benchmark in one process and print a summary of the ratios.

    python bench/run_all.py --quick                     # CPU, under a minute in all
    python bench/run_all.py --cifar build/data/cifar10-imagefolder.tar.xz \\
        --fashion build/data/fashion_mnist.npz --out $OUT/bench.txt   # GPU figures when CUDA is present

(a) stage2.py    cached KD vs plain training, same loop          ratio stage2_cached_vs_plain (target >= 0.95)
(b) stage1.py    dump-logits vs the teacher's batched inference   ratio stage1_<teacher>_dump_vs_inference (>= 0.90)
(c) sweep.py     S students in one pass vs S separate runs        ratio sweep_<mode>_vs_separate_S8 (GPU >= 3)
(d) memory.py    stage-two RSS as the cache grows (CPU)           ratio memory_rss_max_K<big>_vs_K1 (~1)
(e) end_to_end.py  one dump + S students vs online KD, S=1,4,8    ratio e2e_S<S>_online_*_vs_cached_time
(f) storage.py   bytes per view row, float16 and float32          ratio storage_*_float32_vs_float16

Benchmarks print figures and ratios and assert nothing. --out also writes everything printed to a file
(as it goes, so a run stopped by a time limit keeps what it measured).
"""

from __future__ import annotations

import argparse
import importlib
import io
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_CIFAR, DEFAULT_FASHION, emit, header  # noqa: E402

BENCHES = ["stage2", "stage1", "sweep", "memory", "end_to_end", "storage"]
QUICK_ARGS = {"sweep": ["--images", "768"], "memory": [], "end_to_end": ["--students", "1,4"]}


class Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
            st.flush()
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU versions with small sizes (under a minute in all).")
    p.add_argument("--only", default=None, help=f"Comma-separated subset of {','.join(BENCHES)}.")
    p.add_argument("--skip", default="", help="Comma-separated benchmarks to leave out.")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 with --quick, else torch's).")
    p.add_argument("--cifar", default=str(DEFAULT_CIFAR), help="CIFAR-10: ImageFolder .tar.xz, folder, or npz:PATH.")
    p.add_argument("--fashion", default=str(DEFAULT_FASHION), help="Fashion-MNIST npz.")
    p.add_argument("--out", default=None, help="Also write the output to this file.")
    args = p.parse_args(argv)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        log = open(args.out, "w")
        sys.stdout = Tee(sys.__stdout__, log)
    threads = args.threads or (1 if args.quick else None)
    if threads:
        import torch
        torch.set_num_threads(threads)
    names = args.only.split(",") if args.only else BENCHES
    names = [n for n in names if n not in args.skip.split(",")]
    header("kdpipe benchmarks" + (" (quick)" if args.quick else ""),
           argv=None if argv is None else ["bench/run_all.py"] + list(argv))
    ratios: list[str] = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-all-") as work:
        for name in names:
            bargv = ["--device", args.device, "--cifar", args.cifar, "--fashion", args.fashion, "--work", work]
            if args.quick:
                bargv.append("--quick")
                bargv += QUICK_ARGS.get(name, [])
            if threads:
                bargv += ["--threads", str(threads)]
            emit("")
            t0 = time.perf_counter()
            buf = io.StringIO()
            old = sys.stdout
            sys.stdout = Tee(old, buf)
            try:
                importlib.import_module(name).main(bargv)
            except SystemExit as e:
                emit(f"{name}: exited ({e})")
            except Exception:  # report and go on with the others
                emit(f"{name}: FAILED\n{traceback.format_exc()}")
            finally:
                sys.stdout = old
            ratios += [ln for ln in buf.getvalue().splitlines() if ln.startswith("ratio ")]
            emit(f"[{name}: {time.perf_counter() - t0:.1f}s]")
    emit("")
    emit(f"== summary ({time.perf_counter() - t_all:.1f}s in all)")
    for ln in ratios:
        emit(ln)


if __name__ == "__main__":
    main()
