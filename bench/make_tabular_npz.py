"""Write a synthetic tabular dataset (float features, a few classes) as an npz that kdpipe reads.

    python bench/make_tabular_npz.py --out data/tabular.npz [--samples 1000] [--features 20] [--classes 3]

Like scikit-learn's make_classification, with numpy alone: each class is two Gaussian clusters around
vertices of a hypercube in `informative` dimensions (class separation `sep`); `redundant` features are
random linear mixtures of those; the rest are noise. Rows are shuffled by the seed; the first 80% are
x_train/y_train, the rest x_test/y_test. Every value follows from the arguments (the seed included).
pipelines/tabular.toml runs this as its data step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def make(samples=1000, features=20, classes=3, informative=5, redundant=5, sep=1.0, seed=0, test_fraction=0.2):
    if informative + redundant > features:
        raise SystemExit("informative + redundant must be at most features")
    rng = np.random.default_rng(seed)
    clusters = 2 * classes
    vertices = rng.choice([-sep, sep], size=(clusters, informative))
    cluster = rng.integers(0, clusters, samples)
    y = cluster % classes
    x_inf = vertices[cluster] + rng.normal(size=(samples, informative))
    x_red = x_inf @ rng.uniform(-1, 1, size=(informative, redundant))
    x_noise = rng.normal(size=(samples, features - informative - redundant))
    x = np.concatenate([x_inf, x_red, x_noise], axis=1).astype(np.float32)
    x = x[:, rng.permutation(features)]
    order = rng.permutation(samples)
    x, y = x[order], y[order].astype(np.int64)
    cut = int(round(samples * (1 - test_fraction)))
    return {"x_train": x[:cut], "y_train": y[:cut], "x_test": x[cut:], "y_test": y[cut:],
            "class_names": np.array([f"class{c}" for c in range(classes)])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="The .npz to write.")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--features", type=int, default=20)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    arrays = make(args.samples, args.features, args.classes, seed=args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(out)
    print(f"wrote {out}: {len(arrays['x_train'])} train and {len(arrays['x_test'])} test rows of "
          f"{args.features} features, {args.classes} classes")


if __name__ == "__main__":
    main()
