"""(f) Storage: bytes per view row of a cache, for each logits dtype.

Dumps the same small cache (a prefix of the dataset, K views) with float16 and float32 logits and
divides the shards' bytes on disk by the rows; also shows what each row holds (logits, sample index,
view index, label, view parameters, per cache/format.py) and the HDF5 overhead. A second set with
100 classes (random pixels, an mlp_100 teacher) shows how the logits come to dominate.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from common import (common_args, dump_cache, emit, figure, header, load_split, random_images, ratio,
                    save_random_teacher, subset_npz, workdir)


def main(argv=None):
    p = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--samples", type=int, default=None, help="Samples (default 2,000; quick 1,000).")
    p.add_argument("--views", type=int, default=4)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    header("storage: bytes per view row", argv=None if argv is None else ["bench/storage.py"] + list(argv))
    from kdpipe.cache.reader import Cache
    from kdpipe.views import create_policy

    n = args.samples or (1000 if args.quick else 2000)
    dev = torch.device("cpu")
    policy = create_policy("crop-flip", padding=4)
    with workdir(args) as work:
        tr, te = load_split(args.fashion, "train"), load_split(args.fashion, "test")
        fashion, _ = subset_npz(tr, te, n, 100, work / f"fashion-st-{n}.npz")
        sets = [("fashion-mnist-10-classes", fashion), ("random-100-classes", random_images(n, (1, 28, 28), 100))]
        for name, data in sets:
            teacher = save_random_teacher(work / f"teacher-st-{name}.pt", "mlp_100", data, policy)
            per = {}
            for dtype in ("float16", "float32"):
                out = work / f"cache-st-{name}-{dtype}"
                res, _ = dump_cache(out, data, None, policy, teacher, args.views, dev, dtype=dtype)
                c = Cache(out)
                shard_bytes = sum((out / s["file"]).stat().st_size for s in c.manifest["shards"])
                payload = {col.name: col.np_dtype(c.manifest).itemsize * int(np.prod(col.shape(c.manifest)))
                           for col in c.shard_columns.values()}
                rows = c.rows
                per[dtype] = shard_bytes / rows
                emit(f"{name}, {dtype}: {rows:,} rows in {len(c.manifest['shards'])} shard(s), {shard_bytes:,} bytes "
                     f"-> {shard_bytes / rows:.2f} bytes per row (payload {sum(payload.values())}: "
                     + ", ".join(f"{k} {v}" for k, v in payload.items())
                     + f"; HDF5 overhead {shard_bytes - rows * sum(payload.values()):,} bytes in all)")
                figure(f"storage_{name}_{dtype}_bytes_per_row", shard_bytes / rows, "bytes")
            ratio(f"storage_{name}_float32_vs_float16", per["float32"] / per["float16"])


if __name__ == "__main__":
    main()
