"""verify-cache: checksums, shapes and dtypes of every shard; optionally re-run the teacher on a sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kdpipe import KDPipeError
from kdpipe.cache import format as fmt
from kdpipe.cache.reader import Cache, manifest_fault, open_h5, read_raw

# |stored - recomputed| <= atol + rtol * |recomputed|, by logits dtype (float16 keeps 11 bits).
TOLERANCE = {"float16": (2e-2, 2e-3), "float32": (1e-3, 1e-4)}


def check_shapes(cache: Cache, skip=()) -> list[str]:
    """Shapes and dtypes of every shard's datasets (files in `skip`, found damaged, are not opened)."""
    faults = []
    for s in cache.manifest["shards"]:
        path = cache.path / s["file"]
        if s["file"] in skip or not path.is_file():
            continue  # reported by the checksum pass
        want = _expected(cache, s["row_stop"] - s["row_start"], fmt.SHARD_DATASETS)
        try:
            with open_h5(path) as f:
                for name, (shape, dtype) in want.items():
                    if name in f and (f[name].shape != shape or f[name].dtype != dtype):
                        faults.append(f"{s['file']} (rows {s['row_start']}..{s['row_stop'] - 1}): dataset {name} is "
                                      f"{f[name].dtype.str}{list(f[name].shape)}, expected {dtype.str}{list(shape)}")
        except KDPipeError as e:
            faults.append(f"{s['file']}: {e}")
    return faults


def _expected(cache: Cache, rows: int, names) -> dict:
    """name -> (shape, dtype) of a shard's datasets of `rows` rows, from the format's declaration."""
    trailing = {"classes": (cache.num_classes,), "params": (len(cache.columns),), None: ()}
    return {name: ((rows, *trailing[fmt.SHARD_DATASETS[name][1]]), fmt.dataset_dtype(name, cache.logits_dtype))
            for name in names}


def _derivable(cache: Cache, s: dict, skip) -> dict:
    """sample_index, view_index and view_params of one shard: from the raw bytes at the recorded layout
    (no HDF5, so a damaged file is safe to read), else through HDF5 for an intact file of an older
    cache. Datasets that cannot be read are left out (the checksum pass reports them)."""
    path, rows = cache.path / s["file"], s["row_stop"] - s["row_start"]
    if not path.is_file():
        return {}
    want = _expected(cache, rows, ("sample_index", "view_index", "view_params"))
    if "layout" in s:
        got = {}
        for name, (shape, dtype) in want.items():
            offset, nbytes = s["layout"].get(name, (0, -1))
            raw = read_raw(path, offset, nbytes) if nbytes > 0 else b""
            if len(raw) == nbytes == int(np.prod(shape)) * dtype.itemsize:
                got[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
        return got
    if s["file"] in skip:
        return {}
    try:
        with open_h5(path) as f:
            return {name: f[name][()] for name in want if name in f}
    except KDPipeError:
        return {}


def check_derived(cache: Cache, skip=()) -> list[str]:
    """Datasets that follow from the manifest alone (row order, view parameters of the seed), compared
    row by row, so a fault names the exact rows, not only the shard."""
    from kdpipe.views import policy_from_identity

    m, n = cache.manifest, cache.num_samples
    try:
        policy = policy_from_identity(m["views"])
    except KDPipeError as e:
        return [f"{fmt.MANIFEST}: {e}"]
    shape = (n, *m["dataset"]["image_shape"])
    faults, params = [], {}
    for s in m["shards"]:
        lo, hi = s["row_start"], s["row_stop"]
        rows = np.arange(lo, hi, dtype=np.int64)
        got = _derivable(cache, s, skip)
        want = {"sample_index": rows % n, "view_index": rows // n}
        if "view_params" in got:
            vp = np.empty((hi - lo, len(policy.columns)), dtype=np.int32)
            for k in np.unique(rows // n):
                if k not in params:
                    params = {k: policy.sample_view(m["views"]["seed"], int(k), shape)}
                sel = rows // n == k
                vp[sel] = params[k][rows[sel] % n]
            want["view_params"] = vp
        for name, arr in got.items():
            if arr.shape != want[name].shape:
                continue  # reported by the shape check
            diff = (arr != want[name]).reshape(len(rows), -1)
            if name == "view_params":
                diff = diff[:, policy.derived]  # only the columns the view ops recompute from the seed
            bad = rows[diff.any(axis=1)]
            if len(bad):
                faults.append(f"{s['file']} (rows {lo}..{hi - 1}): dataset {name} is wrong in {len(bad)} row(s): "
                              + ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else ""))
    return faults


def repair_hint(cache_dir) -> str:
    return (f"to repair, delete {Path(cache_dir) / fmt.MANIFEST} and the shard files named above, then run the same "
            "dump-logits command again: it computes only what is missing")


def verify_cache(cache_dir, teacher_file=None, teacher_arch=None, teacher_weights=None, sample=256,
                 data_root=None, seed=0, device=torch.device("cpu"), log=print) -> list[str]:
    """The list of faults found (empty when the cache is sound)."""
    cache = Cache(cache_dir, check_checksum=False)  # an edited manifest is reported below, not refused
    log(f"checking checksums of {len(cache.manifest['shards'])} shard(s) in {cache.path}")
    edited = manifest_fault(cache.manifest)
    faults = [f"{fmt.MANIFEST}: {edited}"] if edited else []
    damaged = cache.file_faults(deep=bool(faults))  # first, and without HDF5 where the manifest has file digests
    faults += check_shapes(cache, skip=damaged) + [f for fs in damaged.values() for f in fs]
    faults += check_derived(cache, skip=damaged)
    if teacher_file is None and teacher_arch is None:
        return faults
    if faults:
        log("skipping the teacher check: the shards are damaged")
        return faults
    from kdpipe.checkpoint import load_teacher
    from kdpipe.student import load_cache_data
    from kdpipe.views import policy_from_identity

    m = cache.manifest
    train, _ = load_cache_data(cache, data_root)
    policy = policy_from_identity(m["views"])
    teacher = load_teacher(teacher_file, arch=teacher_arch, weights=teacher_weights,
                           image_shape=tuple(m["input"]["shape"]), num_classes=cache.num_classes)
    if teacher.fingerprint != m["teacher"]["fingerprint"]:
        faults.append(f"the teacher given (sha256 {teacher.fingerprint[:12]}) is not the cache's "
                      f"(sha256 {m['teacher']['fingerprint'][:12]})")
        return faults
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(cache.rows, size=min(sample, cache.rows), replace=False))
    log(f"re-running the teacher on {len(rows)} random (view, sample) rows")
    stored = np.stack([cache.read("logits", int(r), int(r) + 1)[0] for r in rows]).astype(np.float32)
    params = np.stack([cache.read("view_params", int(r), int(r) + 1)[0] for r in rows]) if cache.columns else \
        np.zeros((len(rows), 0), np.int32)
    n = cache.num_samples
    sidx = rows % n
    stored_sidx = np.stack([cache.read("sample_index", int(r), int(r) + 1)[0] for r in rows])
    bad_index = rows[stored_sidx != sidx]
    if len(bad_index):
        faults.append(f"rows {', '.join(map(str, bad_index[:10]))}: sample_index does not match the row order")
    # The stored view parameters must be the ones the seed gives: a cache can't be re-seeded silently.
    for k in np.unique(rows // n):
        sel = (rows // n) == k
        want = policy.sample_view(m["views"]["seed"], int(k), train.images.shape)[sidx[sel]]
        if not np.array_equal(want[:, policy.derived], params[sel][:, policy.derived]):
            faults.append(f"view {int(k)}: stored view parameters differ from those of seed {m['views']['seed']}")
    mod = teacher.module.to(device).eval()
    imgs = torch.from_numpy(np.asarray(train.images)[sidx]).to(device)
    with torch.no_grad():
        x = policy.replay(imgs, torch.from_numpy(params).to(device), m["input"]["mean"], m["input"]["std"])
        fresh = torch.cat([mod(x[i:i + 256]).float() for i in range(0, len(x), 256)]).cpu().numpy()
    atol, rtol = TOLERANCE[cache.logits_dtype]
    bad = ~np.all(np.abs(stored - fresh) <= atol + rtol * np.abs(fresh), axis=1)
    if bad.any():
        worst = float(np.abs(stored - fresh).max())
        faults.append(f"{int(bad.sum())} of {len(rows)} re-computed rows differ from the stored logits "
                      f"(max |diff| {worst:.4g}): rows {', '.join(map(str, rows[bad][:10]))}"
                      f" in {', '.join(sorted({_shard_of(cache, int(r)) for r in rows[bad]}))}")
    else:
        log(f"teacher check: {len(rows)} rows agree within atol {atol}, rtol {rtol}")
    return faults


def _shard_of(cache: Cache, row: int) -> str:
    for s in cache.manifest["shards"]:
        if s["row_start"] <= row < s["row_stop"]:
            return s["file"]
    return "?"
