"""Loading a large CSV feature table (csv:FILE): wall time (kdpipe.data's import included) and peak memory of
load_dataset, each in a fresh process.

Writes a table of N rows x D float features (label 0..9, 90% train) to a temporary folder once, then loads its
train split `--repeats` times, each in its own process (so the peak RSS is that load's), with the kdpipe found
on PYTHONPATH, or, with --compare DIR, alternately with the kdpipe in DIR (e.g. a worktree of an older commit)
and this one. Prints each load and the medians.
Usage: python bench/csv_load.py [--rows 1000000] [--features 28] [--repeats 3] [--compare /path/to/old/checkout]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import numpy as np

from common import checkout_sides, run_in_checkout

ONE_LOAD = """
import json, resource, sys, time
t = time.perf_counter()
import kdpipe
from kdpipe.data import load_dataset
d = load_dataset("csv:" + sys.argv[1], "train")
print(json.dumps({"kdpipe": kdpipe.__file__, "seconds": time.perf_counter() - t, "rows": len(d),
                  "checksum": float(d.images.sum(dtype="float64")),
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def write_table(path: Path, rows: int, features: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        f.write("label,split," + ",".join(f"f{i}" for i in range(features)) + "\n")
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            x = rng.standard_normal((n, features)).astype(np.float32)
            y = rng.integers(0, 10, n)
            split = np.where(rng.random(n) < 0.9, "train", "test")
            f.writelines(f"{y[i]},{split[i]}," + ",".join(f"{v:.6g}" for v in x[i]) + "\n" for i in range(n))


def load(code_dir: Path, csv: Path) -> dict:
    return json.loads(run_in_checkout(code_dir, ONE_LOAD, csv).splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--features", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare", type=Path, default=None, help="another checkout's root, loaded alternately")
    a = ap.parse_args()
    sides = checkout_sides(a.compare)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "table.csv"
        write_table(csv, a.rows, a.features)
        print(f"table: {a.rows:,} rows x {a.features} features, {csv.stat().st_size / 1e6:.0f} MB")
        got = {k: [] for k in sides}
        for rep in range(a.repeats):
            for name, code in sides.items():
                r = load(code, csv)
                got[name].append(r)
                print(f"  {name} ({r['kdpipe']}) load {rep + 1}: {r['seconds']:.1f} s, "
                      f"peak RSS {r['peak_rss_gb']:.2f} GiB, "
                      f"{r['rows']:,} train rows, checksum {r['checksum']:.6g}")
        for name, rs in got.items():
            print(f"{name}: median {statistics.median(r['seconds'] for r in rs):.1f} s, peak RSS "
                  f"{statistics.median(r['peak_rss_gb'] for r in rs):.2f} GiB")
        if len({json.dumps([r["rows"], r["checksum"]]) for rs in got.values() for r in rs}) > 1:
            print("WARNING: the sides loaded different data")


if __name__ == "__main__":
    main()
