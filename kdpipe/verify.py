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
# A dump under autocast: bfloat16 keeps 8 bits, and a re-run on another device or in other batches may
# round otherwise in every layer; a wrong teacher or wrong rows are off by whole units.
AUTOCAST_TOLERANCE = {"bfloat16": (1e-1, 3e-2), "float16": (5e-2, 1e-2)}


def check_shapes(cache: Cache, skip=()) -> list[str]:
    """Shapes and dtypes of every shard's columns (files in `skip`, found damaged, are not opened)."""
    faults = []
    for s in cache.manifest["shards"]:
        path = cache.path / s["file"]
        if s["file"] in skip or not path.is_file():
            continue  # reported by the checksum pass
        want = _expected(cache, s["row_stop"] - s["row_start"], cache.shard_columns.values())
        try:
            with open_h5(path) as f:
                for dpath, (shape, dtype) in want.items():
                    if dpath not in f:
                        faults.append(f"{s['file']} (rows {s['row_start']}..{s['row_stop'] - 1}): dataset {dpath} "
                                      "is missing")
                    elif f[dpath].shape != shape or f[dpath].dtype != dtype:
                        faults.append(f"{s['file']} (rows {s['row_start']}..{s['row_stop'] - 1}): dataset {dpath} is "
                                      f"{f[dpath].dtype.str}{list(f[dpath].shape)}, expected {dtype.str}{list(shape)}")
        except KDPipeError as e:
            faults.append(f"{s['file']}: {e}")
    return faults


def _expected(cache: Cache, rows: int, columns) -> dict:
    """HDF5 path -> (shape, dtype) of a shard's columns of `rows` rows, from the format's declaration."""
    return {c.path: (c.full_shape(cache.manifest, rows), c.np_dtype(cache.manifest)) for c in columns}


def _derivable(cache: Cache, s: dict) -> dict:
    """The columns of one shard that the manifest determines, read from the raw bytes at the recorded
    layout (no HDF5, so a damaged file is safe to read). Columns that cannot be read are left out (the
    checksum pass reports them)."""
    path, rows = cache.path / s["file"], s["row_stop"] - s["row_start"]
    if not path.is_file():
        return {}
    got = {}
    for col in cache.shard_columns.values():
        if col.recompute is None:
            continue
        shape, dtype = col.full_shape(cache.manifest, rows), col.np_dtype(cache.manifest)
        offset, nbytes = s.get("layout", {}).get(col.path, (0, -1))
        raw = read_raw(path, offset, nbytes) if nbytes > 0 else b""
        if len(raw) == nbytes == int(np.prod(shape)) * dtype.itemsize:
            got[col.name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return got


def _differing_rows(rows: np.ndarray, got: np.ndarray, want: np.ndarray, name: str, policy) -> np.ndarray:
    """The rows whose stored values differ from those recomputed from the manifest; of view_params only
    the columns the view ops derive from the seed are compared."""
    diff = (got != want).reshape(len(rows), -1)
    if name == "view_params":
        diff = diff[:, policy.derived]
    return rows[diff.any(axis=1)]


def check_derived(cache: Cache, skip=()) -> list[str]:
    """Columns that follow from the manifest alone (row order, view parameters of the seed, any column
    declared with ``recompute``), compared row by row, so a fault names the exact rows, not only the
    shard. (`skip` is kept for callers: the raw bytes are read without HDF5, damaged or not.)"""
    from kdpipe.views import policy_from_identity

    m = cache.manifest
    try:
        policy = policy_from_identity(m["views"])
    except KDPipeError as e:
        return [f"{fmt.MANIFEST}: {e}"]
    faults = []
    for s in m["shards"]:
        lo, hi = s["row_start"], s["row_stop"]
        rows = np.arange(lo, hi, dtype=np.int64)
        for name, arr in _derivable(cache, s).items():
            col = cache.shard_columns[name]
            want = col.recompute(m, lo, hi)
            if arr.shape != want.shape:
                continue  # reported by the shape check
            bad = _differing_rows(rows, arr, want, name, policy)
            if len(bad):
                faults.append(f"{s['file']} (rows {lo}..{hi - 1}): dataset {col.path} is wrong in {len(bad)} row(s): "
                              + ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else ""))
    return faults


def check_topk(cache: Cache, skip=()) -> list[str]:
    """A top-k cache's columns, every row, without the teacher: classes within [0, C) and distinct, values in
    decreasing order, and each rest term no larger than the other C - k classes could make it (each at
    most the k-th value: rest_T <= v_k / T + log(C - k), within the storage rounding), finite unless
    k = C. Shards with damaged files (`skip`) are left to the checksum pass."""
    m = cache.manifest
    if m["logits"]["codec"] != "topk":
        return []
    k, temps, c = int(m["logits"]["k"]), np.asarray(m["logits"]["temperatures"]), cache.num_classes
    atol, rtol = tolerance(m)
    faults = []
    for s in m["shards"]:
        lo, hi = s["row_start"], s["row_stop"]
        if s["file"] in skip:
            continue
        try:
            values = cache.read("logits_topk_values", lo, hi).astype(np.float64)
            indices = cache.read("logits_topk_indices", lo, hi).astype(np.int64)
            rest = cache.read("logits_topk_rest", lo, hi).astype(np.float64)
        except (KDPipeError, OSError, ValueError):
            continue  # reported by the shape check
        rows = np.arange(lo, hi)
        srt = np.sort(indices, axis=1)
        wrong = {"logits_topk_indices": ((indices < 0) | (indices >= c)).any(1) | (srt[:, 1:] == srt[:, :-1]).any(1),
                 "logits_topk_values": (np.diff(values, axis=1) > 0).any(1)}
        if k < c:
            vk = values[:, -1:] + atol + rtol * np.abs(values[:, -1:])
            bound = vk / temps[None, :] + np.log(c - k) + 1e-5
            wrong["logits_topk_rest"] = ~np.isfinite(rest).all(1) | (rest > bound).any(1)
        else:
            wrong["logits_topk_rest"] = ~np.isneginf(rest).all(1)
        what = {"logits_topk_indices": "classes outside [0, C) or repeated", "logits_topk_values": "not in decreasing "
                "order", "logits_topk_rest": "more rest mass than the other classes can hold"}
        for name, bad in wrong.items():
            if bad.any():
                path = cache.shard_columns[name].path
                faults.append(f"{s['file']} (rows {lo}..{hi - 1}): dataset {path} is wrong in "
                              f"{int(bad.sum())} row(s) ({what[name]}): " + ", ".join(map(str, rows[bad][:10]))
                              + (" ..." if bad.sum() > 10 else ""))
    return faults


def repair_hint(cache_dir) -> str:
    return (f"to repair, delete {Path(cache_dir) / fmt.MANIFEST} and the shard files named above, then run the same "
            "dump-logits command again: it computes only what is missing")


def verify_cache(cache_dir, teacher_file=None, teacher_arch=None, teacher_weights=None, sample=256,
                 data_root=None, seed=0, device=torch.device("cpu"), log=print, data_spec=None, arch_args=None,
                 trust_pickle: bool = False, teacher_output: str | None = None) -> list[str]:
    """The list of faults found (empty when the cache is sound). The teacher is loaded as the dump loaded
    it: the architecture, its options and the output entry default to what the manifest records, and
    it is fed the manifest's input normalization. `data_root`/`data_spec`: where the cache's data lies
    now (kdpipe.student.load_cache_data)."""
    cache = Cache(cache_dir, check_checksum=False)  # an edited manifest is reported below, not refused
    log(f"checking checksums of {len(cache.manifest['shards'])} shard(s) in {cache.path}")
    edited = manifest_fault(cache.manifest)
    faults = [f"{fmt.MANIFEST}: {edited}"] if edited else []
    from kdpipe.util import Progress
    prog = Progress("checksums", len(cache.manifest["shards"]) + bool(cache.manifest.get("eval")), "files")
    damaged = cache.file_faults(lambda done, total: prog.update(1), deep=bool(faults))  # first, and without HDF5
    faults += check_shapes(cache, skip=damaged) + [f for fs in damaged.values() for f in fs]
    faults += check_derived(cache, skip=damaged)
    faults += check_topk(cache, skip=damaged)
    if teacher_file is None and teacher_weights is None and teacher_arch is None:
        return faults
    if faults:
        log("skipping the teacher check: the shards are damaged")
        return faults
    from kdpipe.checkpoint import load_teacher
    from kdpipe.student import load_cache_data
    from kdpipe.views import policy_from_identity

    m = cache.manifest
    train, _ = load_cache_data(cache, data_root, data_spec)
    policy = policy_from_identity(m["views"])
    recorded = m["teacher"]
    if teacher_arch is None and recorded.get("kind") in ("state_dict", "safetensors") and "model" in recorded:
        teacher_arch = recorded["model"]["spec"]
        arch_args = recorded["model"].get("args") if arch_args is None else arch_args
    elif arch_args is None and recorded.get("kind") in ("torchscript", "export", "pickle") and "model" in recorded:
        arch_args = recorded["model"].get("args")  # in_chans=3: the grey views were repeated to RGB
    output = teacher_output if teacher_output is not None else recorded.get("output")
    teacher = load_teacher(teacher_file, arch=teacher_arch, weights=teacher_weights, arch_args=arch_args,
                           image_shape=tuple(m["input"]["shape"]), num_classes=cache.num_classes,
                           trust_pickle=trust_pickle, output=None if output == "auto" else output)
    if teacher.fingerprint != m["teacher"]["fingerprint"]:
        faults.append(f"the teacher given (sha256 {teacher.fingerprint[:12]}) is not the cache's "
                      f"(sha256 {m['teacher']['fingerprint'][:12]})")
        return faults
    rows = sample_rows(m["shards"], cache.rows, sample, seed)
    log(f"re-running the teacher on {len(rows)} random (view, sample) rows"
        + (", at least one in each shard" if len(rows) >= len(m["shards"]) > 1 else ""))
    params = cache.read_rows("view_params", rows) if cache.columns else np.zeros((len(rows), 0), np.int32)
    # The rows' sample indices and view parameters must be those the manifest gives (a cache can't be
    # re-seeded silently): the teacher is re-run on what the manifest says, not on what the shard says.
    for name in ("sample_index", "view_params"):
        col = cache.shard_columns[name]
        want = np.concatenate([col.recompute(m, int(r), int(r) + 1) for r in rows])
        got = cache.read_rows(name, rows) if name != "view_params" else params
        bad = _differing_rows(rows, got, want, name, policy)
        if len(bad):
            faults.append(f"rows {', '.join(map(str, bad[:10]))}: {name} differs from what the manifest gives "
                          f"(seed {m['views']['seed']})")
        if name == "view_params":
            params = want
    sidx = rows % cache.num_samples
    partners = policy.partners(params)  # mixed views: the partners' rows in the same view, as the manifest gives
    if partners is not None:
        at = (rows // cache.num_samples) * cache.num_samples + np.maximum(partners, 0)
        recompute = cache.shard_columns["view_params"].recompute
        partners = np.concatenate([recompute(m, int(r), int(r) + 1) for r in at])
    layers = [f["layer"] for f in m.get("features", []) if fmt.feature_column(f["layer"], f["shape"]).name
              in cache.shard_columns]
    taken: dict = {}
    fresh = _rerun(teacher, m["dump"], np.asarray(train.images), sidx, params, partners, policy, m["input"], device,
                   layers=layers, features=taken)
    for layer in layers:  # cached features: stored float16, compared as float16 logits are
        name = fmt.feature_column(layer, taken[layer].shape[1:]).name
        got = cache.read_rows(name, rows).astype(np.float32)
        want = taken[layer].reshape(len(rows), -1)
        got = got.reshape(len(rows), -1)
        atol, rtol = tolerance({**m, "logits": {**m["logits"], "dtype": "float16"}})
        off = ~np.all(np.abs(got - want) <= atol + rtol * np.abs(want), axis=1) if got.shape == want.shape else \
            np.ones(len(rows), dtype=bool)
        if off.any():
            worst = float(np.abs(got - want).max()) if got.shape == want.shape else float("nan")
            faults.append(f"{int(off.sum())} of {len(rows)} re-computed rows differ from the stored features "
                          f"{name} (max |diff| {worst:.4g}): rows {', '.join(map(str, rows[off][:10]))}"
                          f" in {', '.join(sorted({_shard_of(cache, int(r)) for r in rows[off]}))}")
        else:
            log(f"feature check: {name} agrees on {len(rows)} rows within atol {atol}, rtol {rtol}")
    atol, rtol = tolerance(m)
    if m["logits"]["codec"] == "topk":
        return faults + _compare_topk(cache, rows, fresh, atol, rtol, log)
    stored = cache.read_rows("logits", rows).astype(np.float32)
    bad = ~np.all(np.abs(stored - fresh) <= atol + rtol * np.abs(fresh), axis=1)
    if bad.any():
        worst = float(np.abs(stored - fresh).max())
        faults.append(f"{int(bad.sum())} of {len(rows)} re-computed rows differ from the stored logits "
                      f"(max |diff| {worst:.4g}): rows {', '.join(map(str, rows[bad][:10]))}"
                      f" in {', '.join(sorted({_shard_of(cache, int(r)) for r in rows[bad]}))}")
    else:
        log(f"teacher check: {len(rows)} rows agree within atol {atol}, rtol {rtol}")
    return faults


def _compare_topk(cache: Cache, rows: np.ndarray, fresh: np.ndarray, atol: float, rtol: float, log) -> list[str]:
    """A top-k cache's sampled rows against the teacher's fresh float32 logits, within (atol, rtol):
    - values: each stored value against the fresh logit of its stored class;
    - indices: the fresh logits of the stored classes against the fresh top k, rank by rank, so classes
      tied within the tolerance may come in either order (or either side of the k-th place), while a
      class that is not among the top k is found;
    - rest: each declared temperature's stored log-sum-exp against that of the fresh logits of the
      classes not stored (-inf when none remain), within atol + rtol |rest|: a log-sum-exp moves by at
      most the largest change of its terms, here logits / T with T >= the declared minimum."""
    lg = cache.manifest["logits"]
    k, temps = int(lg["k"]), lg["temperatures"]
    values = cache.read_rows("logits_topk_values", rows).astype(np.float32)
    indices = cache.read_rows("logits_topk_indices", rows).astype(np.int64)
    rest = cache.read_rows("logits_topk_rest", rows).astype(np.float64)
    c = fresh.shape[1]
    close = lambda got, want: np.isclose(got, want, rtol=rtol, atol=atol)  # noqa: E731 (equal infs are close)
    in_range = ((indices >= 0) & (indices < c)).all(axis=1)
    safe = np.where(in_range[:, None], indices, 0)
    at = np.take_along_axis(fresh, safe, 1)
    top = -np.sort(-fresh, axis=1)[:, :k]
    distinct = np.array([len(set(r)) == k for r in indices])
    wrong = {"values": ~close(values, at).all(axis=1),
             "indices": ~in_range | ~distinct | ~close(at, top).all(axis=1)}
    scale = 1.0 / min(temps)
    want = np.empty_like(rest)
    for i in range(len(rows)):
        keep = np.ones(c, dtype=bool)
        keep[safe[i]] = False
        for j, t in enumerate(temps):
            z = fresh[i, keep].astype(np.float64) / t
            want[i, j] = (z.max() + np.log(np.exp(z - z.max()).sum())) if z.size else -np.inf
    wrong["rest"] = ~np.isclose(rest, want, rtol=rtol, atol=atol * scale).all(axis=1)
    faults = []
    for what, bad in wrong.items():
        if bad.any():
            worst = ""
            if what == "values":
                worst = f" (max |diff| {float(np.abs(values - at)[bad].max()):.4g})"
            faults.append(f"{int(bad.sum())} of {len(rows)} re-computed rows differ from the stored top-k {what}"
                          f"{worst}: "
                          f"rows {', '.join(map(str, rows[bad][:10]))}"
                          f" in {', '.join(sorted({_shard_of(cache, int(r)) for r in rows[bad]}))}")
    if not faults:
        log(f"teacher check: {len(rows)} rows agree (top-{k} values, classes and rest at T "
            f"{', '.join(f'{t:g}' for t in temps)}) within atol {atol}, rtol {rtol}")
    return faults


def tolerance(m: dict) -> tuple[float, float]:
    """(atol, rtol) between stored and re-computed logits: the storage dtype's rounding, or the dump's
    autocast rounding where it ran under one (whichever is wider)."""
    atol, rtol = TOLERANCE[m["logits"]["dtype"]]
    ac = m.get("dump", {}).get("autocast_dtype")
    if m.get("dump", {}).get("amp") and ac is None:
        ac = "bfloat16"  # 0.1.0 recorded only amp: true, whose autocast dtype was bfloat16
    if ac:
        a2, r2 = AUTOCAST_TOLERANCE[ac]
        atol, rtol = max(atol, a2), max(rtol, r2)
    return atol, rtol


def _rerun(teacher, dump: dict, images: np.ndarray, samples: np.ndarray, params: np.ndarray, partner_params,
           policy, inp: dict, device, layers=(), features: dict | None = None) -> np.ndarray:
    """The teacher's float32 logits on the views of these rows (sample indices into the store ``images``,
    view parameters, and for mixed views the partners' parameters), replayed as stage one replayed them
    and run the way the dump ran it (manifest's ``dump``): the same autocast and dtype, channels_last
    where the dump used it, grey views repeated and normalized per channel where ``inp`` records it
    (``grey_to_rgb``). `layers`: cached feature layers, whose outputs go into `features` (layer ->
    float32 array) as float16 values, as the dump stored them."""
    ac = dump.get("autocast_dtype") or ("bfloat16" if dump.get("amp") else None)
    autocast = torch.autocast(device.type, dtype=getattr(torch, ac)) if ac else \
        torch.autocast(device.type, enabled=False)
    from kdpipe.checkpoint import FIXED_LAYOUT_KINDS
    channels_last = bool(dump.get("channels_last")) and len(images.shape) == 4
    pp = None if partner_params is None else torch.from_numpy(partner_params).to(device)
    teacher.set_grey_to_rgb(inp.get("grey_to_rgb"))  # grey images fed to an RGB teacher as Grayscale(3) + Normalize
    mod = teacher.module.to(device).eval()
    if channels_last and teacher.kind not in FIXED_LAYOUT_KINDS:
        mod = mod.to(memory_format=torch.channels_last)
    batch = int(dump.get("batch_size") or 256)
    out = []
    from contextlib import nullcontext

    from kdpipe.features import FeatureTap, hook_root
    tap = FeatureTap(hook_root(mod, teacher.kind), layers) if layers else nullcontext()
    feats: dict = {layer: [] for layer in layers}
    with torch.no_grad(), tap:
        x = policy.replay_rows(images, samples, torch.from_numpy(params).to(device), inp["mean"], inp["std"], pp)
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast:
                out.append(mod(xb).float())
            if layers:
                for layer, v in tap.take(len(xb)).items():
                    feats[layer].append(v.to(torch.float16).float().cpu())
    if features is not None:
        features.update({layer: torch.cat(v).numpy() for layer, v in feats.items()})
    return torch.cat(out).cpu().numpy()


def sample_rows(shards: list[dict], rows: int, sample: int, seed: int) -> np.ndarray:
    """`sample` distinct rows (all of them when fewer), sorted: one in each shard first (in as many shards as
    `sample` allows), the rest uniformly. Drawn uniformly alone, a shard of few rows (the last one, or a resumed
    dump's) often got none re-run, and a shard computed wrong (another teacher's, a faulty rank's) went unseen."""
    rng = np.random.default_rng(seed)
    n = min(sample, rows)
    spans = [(s["row_start"], s["row_stop"]) for s in shards if s["row_stop"] > s["row_start"]]
    picked = rng.choice(len(spans), size=min(n, len(spans)), replace=False) if spans else []
    first = np.array([rng.integers(*spans[i]) for i in picked], dtype=np.int64)
    # the rest from n + len(first) distinct rows (all rows, where fewer): at most len(first) of them are picked
    # already; memory of the sample, not of every row index (20 million rows: a gigabyte, drawing from their array)
    drawn = rng.choice(rows, size=min(rows, n + len(first)), replace=False).astype(np.int64)
    more = drawn[~np.isin(drawn, first)][:n - len(first)]
    return np.sort(np.concatenate([first, more]))


def _shard_of(cache: Cache, row: int) -> str:
    for s in cache.manifest["shards"]:
        if s["row_start"] <= row < s["row_stop"]:
            return s["file"]
    return "?"
