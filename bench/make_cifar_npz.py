"""Write CIFAR-10 (decoded uint8 arrays) as a compressed npz and print its size.

    python bench/make_cifar_npz.py --cifar ../shared/data/cifar10-imagefolder.tar.xz --out build/cifar10.npz

The npz holds x_train, y_train, x_test, y_test and class_names (what kdpipe's npz:PATH source reads).
A device call carries at most 64 MiB; if the file is larger than 60 MB, carry the .tar.xz instead
(the benchmarks take either: --cifar PATH.tar.xz extracts and decodes it once, --cifar npz:PATH reads this).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_CIFAR, load_split  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cifar", default=str(DEFAULT_CIFAR), help="The ImageFolder .tar.xz or its extracted folder.")
    p.add_argument("--out", required=True, help="The .npz to write.")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kdpipe-cifar-") as work:
        t0 = time.perf_counter()
        train = load_split(args.cifar, "train", Path(work))
        test = load_split(args.cifar, "test", Path(work))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out, x_train=np.asarray(train.images), y_train=train.labels,
                            x_test=np.asarray(test.images), y_test=test.labels, class_names=np.array(train.class_names))
    size = out.stat().st_size
    raw = train.images.nbytes + test.images.nbytes
    print(f"wrote {out}: {size / 1e6:.1f} MB ({size / 2**20:.1f} MiB) from {raw / 1e6:.1f} MB of pixels "
          f"in {time.perf_counter() - t0:.1f}s")
    if size > 60e6:
        print("larger than 60 MB: too big to carry to a device machine with the rest (64 MiB in all); "
              "carry the .tar.xz and pass --cifar PATH.tar.xz instead")


if __name__ == "__main__":
    main()
