"""Train a teacher; dump its logits over the augmentation-fixed dataset (stage one)."""

from __future__ import annotations

import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import kdpipe
from kdpipe import KDPipeError
from kdpipe.cache import format as fmt
from kdpipe.cache.reader import open_h5, sha256_dataset
from kdpipe.cache.writer import (atomic_write_json, dataset_layout, plan_shards, remove_temporaries,
                                 shard_datasets, write_h5_atomic)
from kdpipe.checkpoint import LoadedModel, save_checkpoint
from kdpipe.data import ImageData
from kdpipe.distributed import SINGLE, Dist
from kdpipe.engine import OptimConfig, build_run, predict, steps_per_epoch, train_pass
from kdpipe.evaluate import cpu_latency_ms, eval_params, top1
from kdpipe.models import count_parameters
from kdpipe.util import Progress, channels_last, ensure_out_dir, ensure_parent, images_tensor, file_sha256
from kdpipe.views import ViewPolicy


def train_teacher(train: ImageData, test: ImageData, arch: str, epochs: int, out, *, policy: ViewPolicy,
                  batch_size: int = 128, optim: OptimConfig | None = None, seed: int = 0,
                  device=torch.device("cpu"), amp: bool = False, log=print) -> dict:
    """Train `arch` with fresh random views every epoch; save a kdpipe checkpoint at `out`."""
    out = ensure_parent(out, "teacher output")
    optim = optim or OptimConfig()
    mean, std = train.channel_stats()
    in_shape = policy.output_shape(train.image_shape)
    run = build_run("teacher", arch, 1.0, 0.0, seed, train.num_classes, in_shape, optim,
                     epochs * steps_per_epoch(len(train), batch_size), device)
    images = images_tensor(train.images, device)
    labels = torch.from_numpy(train.labels).to(device)

    def fresh_views(epoch):  # a new draw every epoch: ordinary online augmentation
        return torch.from_numpy(policy.sample_view(seed + 1_000_003, epoch, train.images.shape)).to(device), None

    log(f"training teacher {arch} ({count_parameters(run.model):,} parameters) on {train.spec} "
        f"({len(train)} images) for {epochs} epochs on {device}")
    stats = train_pass([run], images, labels, policy, mean, std, epochs, batch_size, seed, fresh_views,
                       amp=amp, label="teacher", log=log)
    test_images = images_tensor(test.images, device)
    params = torch.from_numpy(eval_params(policy, test.image_shape, len(test))).to(device)
    logits = predict(run.model, test_images, policy, params, mean, std, amp=amp)
    acc = top1(logits, torch.from_numpy(test.labels).to(device))
    latency = cpu_latency_ms(run.model, in_shape)
    size = save_checkpoint(out, run.model, arch=arch, num_classes=train.num_classes, image_shape=in_shape,
                           mean=mean, std=std, class_names=train.class_names, dataset=train.identity(),
                           test_top1=acc, extra={"view_policy": policy.identity(), "epochs": epochs,
                                                 "cpu_latency_ms": latency, "train_wall_s": stats["wall_s"],
                                                 "role": "teacher"})
    log(f"teacher {arch}: test top-1 {acc:.4f}, {stats['wall_s']:.1f}s; saved {out} ({size / 1e6:.2f} MB)")
    return {"test_top1": acc, "path": str(out), "bytes": size, **stats}


# ---------------------------------------------------------------- stage one

def _dump_identity(teacher: LoadedModel, data: ImageData, policy: ViewPolicy, views: int, seed: int,
                   logits_dtype: str, shard_rows: int, batch_size: int, mean, std) -> dict:
    return {"format_version": fmt.FORMAT_VERSION,
            "teacher": {"fingerprint": teacher.fingerprint, "arch": teacher.arch, "kind": teacher.kind},
            "dataset": {k: v for k, v in data.identity().items() if k != "class_names"},
            "views": {**policy.identity(), "seed": int(seed), "K": int(views)},
            "logits_dtype": logits_dtype, "shard_rows": int(shard_rows), "batch_size": int(batch_size),
            "input": {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} was {a}, now {b}")
    return out


def _existing_shard(path: Path, cache_id: str, start: int, stop: int) -> dict | None:
    """The manifest entry of a complete shard from an earlier run of this dump, else None."""
    if not path.is_file():
        return None
    try:
        with open_h5(path) as f:
            a = f.attrs
            if a.get("cache_id") != cache_id or int(a["row_start"]) != start or int(a["row_stop"]) != stop:
                return None
            digests = {}
            for name in fmt.SHARD_DATASETS:
                if name not in f or "sha256" not in f[name].attrs:
                    return None
                digests[name] = sha256_dataset(f[name])
                if digests[name] != f[name].attrs["sha256"]:
                    return None
            layout = dataset_layout(f)
    except (KDPipeError, OSError, RuntimeError, ValueError, KeyError):  # damaged: compute it again
        return None
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": digests, "layout": layout,
            "file_sha256": file_sha256(path), "row_start": start, "row_stop": stop}


def _unstorable_logits(nonfinite: list, overflow: list, start: int, sidx, vidx, logits_dtype: str) -> KDPipeError:
    def where(rel):
        named = ", ".join(f"sample {int(sidx[j])} view {int(vidx[j])}" for j in rel[:10])
        return named + (f" and {len(rel) - 10} more" if len(rel) > 10 else "")
    if nonfinite:
        return KDPipeError(f"the teacher produced NaN or Inf logits for {len(nonfinite)} input(s) among rows "
                           f"{start}..{start + len(sidx) - 1}: {where(nonfinite)}; nothing of this shard was "
                           "written (check the teacher and its input normalization)")
    return KDPipeError(f"the teacher's logits overflow {logits_dtype} for {len(overflow)} input(s) among rows "
                       f"{start}..{start + len(sidx) - 1}: {where(overflow)}; dump with --logits-dtype float32")


def _wait_visible(out_dir: Path, writers: dict[str, int], patience_s: float = 60.0) -> None:
    """Rank 0 must see every shard the other ranks wrote: the cache lies on a filesystem all ranks
    share. A network filesystem may show new files late, so listings are retried for a while."""
    deadline = time.monotonic() + patience_s
    while True:
        unseen = sorted(set(writers) - set(os.listdir(out_dir)))
        if not unseen or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    if unseen:
        who = ", ".join(f"{f} (rank {writers[f]})" for f in unseen[:5]) + (" ..." if len(unseen) > 5 else "")
        raise KDPipeError(f"rank 0 does not see shards written by other ranks in {out_dir}: {who}; the cache "
                          "directory must be on a filesystem shared by every node (see docs/distributed.md)")


def _shard_correct(path: Path) -> int:
    """Rows of a shard whose teacher argmax equals the label."""
    with open_h5(path) as f:
        return int((f["logits"][()].astype(np.float32).argmax(1) == f["labels"][()]).sum())


@contextmanager
def _finally_wait(executor: ThreadPoolExecutor):
    """On the way out (also after an error or Ctrl-C), let a shard being written finish: it is complete
    or it is not there, never half-written."""
    try:
        yield
    finally:
        executor.shutdown(wait=True)


def dump_logits(teacher: LoadedModel, data: ImageData, test: ImageData | None, out_dir, *, policy: ViewPolicy,
                views: int, seed: int = 0, logits_dtype: str = "float16", batch_size: int = 512,
                shard_rows: int = 65536, device=torch.device("cpu"), amp: bool = False,
                overwrite: bool = False, mean=None, std=None, dist: Dist | None = None, log=print) -> dict:
    """Stage one: run the teacher once over K views of every sample; write shards, then the manifest.

    Resumable: complete shards of an earlier run with the same identity are kept. Under torchrun
    (`dist`, see kdpipe.distributed): rank 0 checks OUT (identity, --overwrite) before the other ranks
    start; the ranks check the existing shards between them (rank r those with index r mod world),
    share what is complete, and split the shards still to compute round-robin, so a cache begun with
    any world size is finished correctly with any other. Rank 0 gathers the shard entries and writes
    the manifest. A failure on any rank stops every rank with a message naming it.
    """
    ctx = dist or SINGLE
    rank, world = ctx.rank, ctx.world
    if views <= 0:
        raise KDPipeError(f"--views must be >= 1, got {views}")
    if batch_size <= 0 or shard_rows <= 0:
        raise KDPipeError("batch size and shard rows must be >= 1")
    if logits_dtype not in fmt.LOGITS_DTYPES:
        raise KDPipeError(f"unknown logits dtype {logits_dtype!r}: use {', '.join(fmt.LOGITS_DTYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise KDPipeError(f"output {out_dir} is a file, not a directory: choose another path")
    in_shape = policy.output_shape(data.image_shape)
    if teacher.num_classes is not None and teacher.num_classes != data.num_classes:
        raise KDPipeError(f"the teacher predicts {teacher.num_classes} classes, the dataset {data.spec} "
                          f"has {data.num_classes}")
    if teacher.image_shape is not None and tuple(teacher.image_shape) != tuple(in_shape):
        raise KDPipeError(f"the teacher takes inputs {tuple(teacher.image_shape)}, the views are {tuple(in_shape)}")
    if mean is None or std is None:
        mean, std = (teacher.mean, teacher.std) if teacher.mean is not None else data.channel_stats()
    n = len(data)
    total = n * views
    shard_rows = min(shard_rows, total)
    ident = _dump_identity(teacher, data, policy, views, seed, logits_dtype, shard_rows, batch_size, mean, std)
    cache_id = uuid.uuid5(uuid.NAMESPACE_URL, json.dumps(ident, sort_keys=True)).hex

    teacher_mod = teacher.module.to(device).eval()
    if device.type == "cuda" and teacher.kind != "torchscript":
        teacher_mod = teacher_mod.to(memory_format=torch.channels_last)
    images = images_tensor(data.images, device)
    labels = data.labels
    plan = plan_shards(total, shard_rows)
    param_cache: dict[int, np.ndarray] = {}

    def view_params(k: int) -> np.ndarray:
        if k not in param_cache:
            param_cache.clear()
            param_cache[k] = policy.sample_view(seed, k, data.images.shape)
        return param_cache[k]

    # Check the teacher's output size on one batch before spending time or touching OUT.
    with torch.no_grad():
        x = policy.replay(images[:2], torch.from_numpy(view_params(0)[:2]).to(device), mean, std)
        try:
            probe = teacher_mod(x)
        except Exception as e:
            raise KDPipeError(f"the teacher fails on inputs of shape {tuple(x.shape)}: "
                              f"{str(e).splitlines()[0][:200]}") from None
    if probe.ndim != 2 or probe.shape[1] != data.num_classes:
        raise KDPipeError(f"the teacher outputs shape {tuple(probe.shape[1:])} per image, the dataset "
                          f"{data.spec} has {data.num_classes} classes")

    state_path, manifest_path = out_dir / fmt.DUMP_STATE, out_dir / fmt.MANIFEST
    idents = ctx.all_gather(ident)
    for r, other in enumerate(idents):
        if other != idents[0]:  # every rank sees the same list, so every rank raises
            diffs = [d.replace(" was ", ": rank 0 has ", 1).replace(", now ", f", rank {r} has ", 1)
                     for d in _differences(idents[0], other)]
            raise KDPipeError(f"rank {r} was given other arguments or data than rank 0 (" + "; ".join(diffs)
                              + "): every rank must run the same command on the same data")

    def prepare_out_dir() -> dict | None:  # rank 0, while the other ranks wait
        ensure_out_dir(out_dir, "cache directory")
        if state_path.is_file() or manifest_path.is_file():
            try:
                old = json.loads((state_path if state_path.is_file() else manifest_path).read_text())
                old = old.get("identity", old)
            except (OSError, ValueError):
                old = {}
            diffs = _differences(old, ident)
            if diffs and not overwrite:
                raise KDPipeError(f"{out_dir} holds a cache made with other arguments (" + "; ".join(diffs) +
                                  "): pass --overwrite to start over, or choose another --out")
            if diffs:  # --overwrite: start over; with the same arguments it resumes instead
                log(f"--overwrite: discarding the cache in {out_dir} (" + "; ".join(diffs) + ")")
                for p in list(out_dir.glob("shard-*.h5")) + [state_path, manifest_path, out_dir / fmt.EVAL_FILE]:
                    p.unlink(missing_ok=True)
        elif any(out_dir.iterdir()):
            raise KDPipeError(f"{out_dir} is not empty and holds no kdpipe cache: choose an empty or new directory")
        remove_temporaries(out_dir)
        for p in out_dir.glob(".rank-*.json"):  # per-rank files of older kdpipe versions
            p.unlink(missing_ok=True)
        if manifest_path.is_file():
            m = json.loads(manifest_path.read_text())
            os.utime(manifest_path)  # up to date for make, whose prerequisite may merely have been touched
            log(f"{out_dir} is already complete ({m['rows']} rows): nothing to do (--overwrite starts over)")
            return dict(m["dump"], rows=m["rows"], bytes=m["bytes"], out=str(out_dir), resumed_shards=len(m["shards"]),
                        already_complete=True)
        atomic_write_json(state_path, {"identity": ident, "cache_id": cache_id, "started": time.time()})
        return None

    finished = None
    with ctx.together("checking the cache directory"):
        if rank == 0:
            finished = prepare_out_dir()
    if ctx.broadcast(finished is not None):
        return finished if rank == 0 else {"rank": rank, "already_complete": True}

    # Which shards are complete: each rank checks every world-th one, then all share the answer.
    entries: dict[int, dict] = {}
    correct: dict[int, int] = {}  # shard -> rows whose teacher argmax is the label
    with ctx.together("checking existing shards"):
        for i in range(rank, len(plan), world):
            ent = _existing_shard(out_dir / fmt.shard_name(i), cache_id, *plan[i])
            if ent:
                entries[i] = ent
                correct[i] = _shard_correct(out_dir / fmt.shard_name(i))
    kept = sorted(i for part in ctx.all_gather(sorted(entries)) for i in part)
    todo_all = sorted(set(range(len(plan))) - set(kept))
    todo = todo_all[rank::world]  # the remaining work, balanced over the ranks whatever earlier runs did
    if kept:
        log(f"resuming: {len(kept)} complete shard(s) kept, {len(todo_all)} to compute"
            + (f" on {world} ranks" if world > 1 else ""))
    todo_rows = sum(plan[i][1] - plan[i][0] for i in todo)
    prog = Progress("dump-logits" + (f" (rank 0 of {world})" if world > 1 else ""), todo_rows, "rows",
                    stream=ctx.progress_stream)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else torch.autocast(device.type, enabled=False)
    np_dtype = fmt.LOGITS_DTYPES[logits_dtype]
    t_start = time.perf_counter()
    # A shard is written on a thread while the teacher computes the next one (at most one write in flight).
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdpipe-shard-writer")
    pending = None

    def write_shard(i, s, e, datasets, attrs):
        ent = write_h5_atomic(out_dir / fmt.shard_name(i), datasets, attrs)
        entries[i] = dict(ent, row_start=s, row_stop=e)

    with ctx.together("computing logits"), _finally_wait(writer):
        for i in todo:
            s, e = plan[i]
            rows = np.arange(s, e, dtype=np.int64)
            vidx = (rows // n).astype(np.int32)
            sidx = rows % n
            vparams = np.empty((e - s, len(policy.columns)), dtype=np.int32)
            for k in np.unique(vidx):
                sel = vidx == k
                vparams[sel] = view_params(int(k))[sidx[sel]]
            # The shard's logits stay on the device until the shard is done: one copy and one wait per
            # shard, not per batch (indices and view parameters go up once per shard too).
            with torch.no_grad():
                dev_sidx = torch.from_numpy(sidx).to(device)
                dev_params = torch.from_numpy(vparams).to(device)
                lg_dev = torch.empty((e - s, data.num_classes), dtype=torch.float32, device=device)
                for b in range(0, e - s, batch_size):
                    bi = dev_sidx[b:b + batch_size]
                    x = policy.replay(images[bi], dev_params[b:b + batch_size], mean, std)
                    x = channels_last(x)
                    with autocast:
                        lg_dev[b:b + len(bi)] = teacher_mod(x).float()
                    prog.update(len(bi))
                lg = lg_dev.cpu().numpy()
            with np.errstate(over="ignore"):  # logits float16 cannot hold are reported just below
                out = lg.astype(np_dtype)
            bad = ~np.isfinite(lg).all(axis=1)
            nonfinite = np.flatnonzero(bad).tolist()  # rows of this shard (relative) that cannot be stored
            overflow = np.flatnonzero(~bad & ~np.isfinite(out).all(axis=1)).tolist()
            if nonfinite or overflow:  # stop before the shard is written, naming the inputs
                raise _unstorable_logits(nonfinite, overflow, s, sidx, vidx, logits_dtype)
            datasets = shard_datasets(out, sidx.astype("<i8"), vidx.astype("<i4"), labels[sidx].astype("<i8"),
                                      vparams.astype("<i4"), policy.columns)
            attrs = {"kdpipe_format_version": fmt.FORMAT_VERSION, "cache_id": cache_id, "row_start": s,
                     "row_stop": e, "num_samples": n, "num_views": views, "kdpipe_version": kdpipe.__version__}
            correct[i] = int((out.astype(np.float32).argmax(1) == labels[sidx]).sum())
            if pending is not None:
                pending.result()  # the previous shard is on disk (or its error is raised here)
            pending = writer.submit(write_shard, i, s, e, datasets, attrs)
        if pending is not None:
            pending.result()
    compute_s = time.perf_counter() - t_start
    if device.type == "cuda":
        torch.cuda.synchronize()

    # Rank 0 gathers every rank's shard entries (in memory: no per-rank files to go stale) and
    # writes the manifest; the other ranks are done.
    parts = ctx.gather((entries, correct, todo_rows, compute_s))
    if rank != 0:
        return {"rank": rank, "rows": todo_rows, "wall_s": compute_s}
    for ents, corr, _, _ in parts:
        entries.update(ents)
        correct.update(corr)
    missing = [i for i in range(len(plan)) if i not in entries]
    if missing:
        raise KDPipeError(f"shard(s) {missing[:10]} of {out_dir} were computed by no rank: run the same command again")
    if world > 1:
        _wait_visible(out_dir, {ent["file"]: r for r, part in enumerate(parts) for ent in part[0].values()})
    rows_computed = sum(p[2] for p in parts)
    compute_s = max(p[3] for p in parts)

    # Teacher top-1 on its views (counted shard by shard) and on the clean test split (kept for agreement).
    cache_shards = [entries[i] for i in range(len(plan))]
    summary = {"rows": total, "views_top1": sum(correct.values()) / total, "batch_size": batch_size,
               "device": str(device), "amp": amp, "rows_computed": rows_computed, "compute_wall_s": compute_s,
               "rows_per_s": rows_computed / compute_s if compute_s > 0 else None, "world_size": world}
    eval_entry = None
    if test is not None:
        if test.num_classes != data.num_classes or test.image_shape != data.image_shape:
            raise KDPipeError("the test split's classes or image shape differ from the dumped split's")
        tp = torch.from_numpy(eval_params(policy, test.image_shape, len(test))).to(device)
        timg = images_tensor(test.images, device)
        tl = predict(teacher_mod, timg, policy, tp, mean, std, batch_size=batch_size, amp=amp).cpu().numpy()
        summary["test_top1"] = top1(tl, test.labels)
        ent = write_h5_atomic(out_dir / fmt.EVAL_FILE, {
            "test_logits": (tl.astype("<f4"), {"description": fmt.EVAL_DATASETS["test_logits"][2]}),
            "test_labels": (test.labels.astype("<i8"), {"description": fmt.EVAL_DATASETS["test_labels"][2]})},
            {"kdpipe_format_version": fmt.FORMAT_VERSION, "cache_id": cache_id})
        eval_entry = dict(ent, dataset=test.identity())
    teacher_cpu = teacher.module.to("cpu")
    teacher_info = {**teacher.identity(), "image_shape": list(in_shape),
                    "parameters": count_parameters(teacher_cpu),
                    "file_bytes": Path(teacher.file).stat().st_size,
                    "test_top1": summary.get("test_top1"), "cpu_latency_ms": cpu_latency_ms(teacher_cpu, in_shape)}
    total_bytes = sum(e["bytes"] for e in cache_shards) + (eval_entry["bytes"] if eval_entry else 0)
    manifest = {
        "format_version": fmt.FORMAT_VERSION, "cache_id": cache_id, "identity": ident,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kdpipe_version": kdpipe.__version__, "torch_version": torch.__version__,
        "teacher": teacher_info, "teachers": [{"name": "teacher", "logits_dataset": "logits", **teacher_info}],
        "dataset": {**data.identity(), "source": data.source},
        "views": {**policy.identity(), "seed": int(seed), "K": int(views)},
        "num_classes": data.num_classes, "input": {"mean": list(map(float, mean)), "std": list(map(float, std)),
                                                   "shape": list(in_shape)},
        "logits": {"codec": "raw", "dtype": logits_dtype}, "rows": total, "row_order": "view-major",
        "shards": cache_shards, "eval": eval_entry, "bytes": total_bytes, "dump": summary,
    }
    manifest["checksum"] = fmt.manifest_checksum(manifest)
    atomic_write_json(manifest_path, manifest)
    return {**summary, "bytes": total_bytes, "out": str(out_dir), "resumed_shards": len(kept)}
