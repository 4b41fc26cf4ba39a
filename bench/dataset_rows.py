"""Row-by-row reads of kdpipe.cache.reader.CachedLogitsDataset (what a torch DataLoader worker does), rows/s.

Dumps a cache of the first N Fashion-MNIST train images (Debian's package) with K views from an untrained
cnn_tiny teacher into a temporary folder, then reads every row once in a shuffled order, `--repeats` times, each
in a fresh process with the kdpipe on PYTHONPATH, or, with --compare DIR, alternately with the kdpipe in DIR (an
older checkout) and this one. Prints each pass and the medians.
Usage: python bench/dataset_rows.py [--samples 4000] [--views 4] [--repeats 3] [--compare /path/to/old/checkout]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from pathlib import Path

from common import REPO, checkout_sides, run_in_checkout

ONE_PASS = """
import sys, time
import numpy as np
import kdpipe
from kdpipe.cache.reader import CachedLogitsDataset
print(kdpipe.__file__)
d = CachedLogitsDataset(sys.argv[1])
order = np.random.default_rng(0).permutation(len(d))
t = time.perf_counter()
for r in order:
    d[int(r)]
print(len(d) / (time.perf_counter() - t))
"""

MAKE_CACHE = """
import sys
import numpy as np
import torch
from kdpipe.checkpoint import load_teacher, save_checkpoint
from kdpipe.data import load_dataset
from kdpipe.models import create_model
from kdpipe.teacher import dump_logits
from kdpipe.views import create_policy
out, n, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
full = load_dataset("fashion-mnist", "train")
np.savez(out + "/fm.npz", x_train=np.asarray(full.images[:n])[:, 0], y_train=full.labels[:n],
         x_test=np.asarray(full.images[:100])[:, 0], y_test=full.labels[:100])
train = load_dataset("npz:" + out + "/fm.npz", "train")
torch.manual_seed(0)
mean, std = train.channel_stats()
save_checkpoint(out + "/t.pt", create_model("cnn_tiny", 10, (1, 28, 28)), arch="cnn_tiny", num_classes=10,
                image_shape=(1, 28, 28), mean=mean, std=std, class_names=train.class_names,
                dataset=train.identity(), test_top1=None)
dump_logits(load_teacher(out + "/t.pt"), train, None, out + "/c", policy=create_policy("crop-flip"), views=k,
            force=True, log=lambda *a: None)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare", type=Path, default=None, help="another checkout's root, read alternately")
    a = ap.parse_args()
    sides = checkout_sides(a.compare)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        run_in_checkout(REPO, MAKE_CACHE, tmp, a.samples, a.views)
        print(f"cache: {a.samples:,} samples x {a.views} views")
        got = {k: [] for k in sides}
        for rep in range(a.repeats):
            for name, code in sides.items():
                where, rate = run_in_checkout(code, ONE_PASS, Path(tmp) / "c").splitlines()[-2:]
                got[name].append(float(rate))
                print(f"  {name} ({where}) pass {rep + 1}: {float(rate):,.0f} rows/s")
        for name, rates in got.items():
            print(f"{name}: median {statistics.median(rates):,.0f} rows/s")


if __name__ == "__main__":
    main()
