"""Writing caches: the writer object of stage one (``CacheWriter``), atomic files (temporary name,
fsync, rename), shard planning, checksums."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from kdpipe import KDPipeError
from kdpipe.cache import format as fmt
from kdpipe.util import Progress, file_sha256, try_flock


def sha256_array(a: np.ndarray) -> str:
    """sha256 of an array's bytes as stored (C order, its own explicit dtype)."""
    h = hashlib.sha256()
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    step = 1 << 24
    for i in range(0, flat.size, step):
        h.update(flat[i:i + step].data)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or folder (best effort: some file systems refuse it on a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def hold_while_written(fd: int) -> None:
    """flock a temporary while it is written (dropped when it is closed, or its process ends), so that a command
    sweeping a folder shared with other machines tells a live write there from one a crash left
    (being_written); best effort: where the file system has no locks, nothing."""
    try_flock(fd)


def being_written(path: Path) -> bool:
    """Whether a live process (of this machine, or of another sharing the folder with locks) holds `path`'s
    hold_while_written lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return try_flock(fd, shared=True) is False  # a shared lock conflicts with the writer's
    finally:
        os.close(fd)


def _io_error(path: Path, e: OSError) -> KDPipeError:
    what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EACCES: "permission denied", errno.EROFS: "read-only file system",
            errno.EPERM: "operation not permitted"}.get(e.errno, e.strerror or str(e))
    return KDPipeError(f"cannot write {path}: {what}; nothing partial was kept, "
                       "run the same command again once the location is writable")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write under a temporary name, fsync, rename: `path` is either absent, its old self, or complete.

    A failed write (ENOSPC, EACCES, ...) or an interruption (KeyboardInterrupt) removes the temporary.
    """
    atomic_write_stream(path, lambda f: f.write(data))


def atomic_write_stream(path: Path, fill) -> None:
    """atomic_write_bytes, where fill(f) writes the content into the open binary file f (no copy in memory)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            hold_while_written(f.fileno())
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as e:
        _unlink_quietly(tmp)
        raise _io_error(path, e) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


@contextmanager
def atomic_path(path: Path):
    """A temporary file name beside `path` (ending as `path` does), for writers that need a name, not an open
    file (exporters): when the block ends without error, the file written there is fsynced and renamed to
    `path`; otherwise (an error, Ctrl-C) it is removed, and `path` stays absent or its old self. An OSError (a
    full disk) is one line naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as e:
        raise _io_error(path, e) from None
    finally:
        _unlink_quietly(tmp)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_h5_atomic(path: Path, datasets: dict[str, tuple[np.ndarray, dict]], attrs: dict) -> dict:
    """Write an HDF5 file of contiguous datasets under a temporary name, fsync, rename.

    ``datasets`` maps HDF5 path (groups are made as needed) -> (array with its explicit dtype, attributes). Returns
    {"file", "bytes", "sha256": {name: digest}, "layout": {name: [offset, nbytes]}, "file_sha256"};
    the dataset digests are also stored as each dataset's ``sha256`` attribute, the file's digest
    covers every byte (metadata included), the layout lets a damaged file be examined without HDF5.

    The file is built in memory (HDF5's core driver) and written with plain file I/O: when the disk is
    full or not writable, HDF5's own writes fail with a RuntimeError in a deallocator, and may crash
    the process; plain writes raise OSError with its errno, which becomes a one-line error.
    """
    path = Path(path)
    digests = {}
    with h5py.File(f"{path.name}-in-memory", "w", driver="core", backing_store=False,
                   libver=("earliest", "v110")) as f:
        for k, v in attrs.items():
            f.attrs[k] = v
        for name, (arr, dattrs) in datasets.items():
            arr = np.ascontiguousarray(arr)
            d = f.create_dataset(name, data=arr, dtype=arr.dtype)  # contiguous, uncompressed
            digests[name] = sha256_array(arr)
            d.attrs["sha256"] = digests[name]
            for k, v in dattrs.items():
                d.attrs[k] = v
        f.flush()
        layout = dataset_layout(f)
        image = f.id.get_file_image()
    atomic_write_bytes(path, image)
    return {"file": path.name, "bytes": len(image), "sha256": digests, "layout": layout,
            "file_sha256": hashlib.sha256(image).hexdigest()}


def dataset_layout(f: h5py.File) -> dict:
    """HDF5 path -> [byte offset, byte count] of each contiguous dataset's values in the file, datasets
    inside groups (``features/<layer>``) included."""
    out = {}

    def visit(path, obj):
        if isinstance(obj, h5py.Dataset):
            n = int(obj.id.get_storage_size())
            off = obj.id.get_offset() if n else None
            out[path] = [int(off) if off is not None else 0, n]
    f.visititems(visit)
    return out


def plan_shards(total_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_rows, total_rows)) for s in range(0, total_rows, shard_rows)]


def remove_temporaries(cache_dir: Path) -> None:
    """Temporary files are never complete: a dump removes those a crash left behind."""
    for p in Path(cache_dir).glob(".*.tmp-*"):
        p.unlink(missing_ok=True)


def shard_datasets(values: dict[str, np.ndarray], m: dict, start: int, stop: int) -> dict:
    """HDF5 path -> (array as declared, attributes) of the shard of rows [start, stop), for every column the
    cache holds (``m``: the manifest, or the writer's ``spec``: what the columns' declarations read).

    A column not in ``values`` is recomputed from its declaration; a column that is neither handed nor
    recomputable, or handed with the wrong shape, is a bug in the caller, not a user error.
    """
    out = {}
    for col in fmt.shard_columns(m["logits"]["codec"], m):
        if col.name in values:
            arr = values[col.name]
        elif col.recompute is not None:
            arr = col.recompute(m, start, stop)
        else:
            raise ValueError(f"no values for cache column {col.name!r}")
        arr = np.asarray(arr).astype(col.np_dtype(m), copy=False)
        want = col.full_shape(m, stop - start)
        if arr.shape != want:
            raise ValueError(f"cache column {col.name!r} has shape {arr.shape}, declared {want}")
        attrs = {"description": col.description}
        if col.name == "view_params":
            attrs["columns"] = json.dumps(list(m["views"]["columns"]))
        out[col.path] = (arr, attrs)
    return out


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key was A, now B' for every (nested) key whose value differs; sha256 digests shortened to 12 digits
    (as inspect shows them), so a refusal naming several differences stays readable."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif isinstance(a, list) and isinstance(b, list) and a != b and any(isinstance(x, dict) for x in a + b):
            # lists of records (a view policy's ops): name the entries that differ, not both whole lists
            if len(a) != len(b):
                out.append(f"{prefix}{k} had {len(a)} entries, now {len(b)}")
                continue
            for i, (x, y) in enumerate(zip(a, b)):
                if isinstance(x, dict) and isinstance(y, dict):
                    out += differences(x, y, f"{prefix}{k}[{i}].")
                elif x != y:
                    out.append(f"{prefix}{k}[{i}] was {_short_digest(x)}, now {_short_digest(y)}")
        elif a != b:
            out.append(f"{prefix}{k} was {_short_digest(a)}, now {_short_digest(b)}")
    return out


def _short_digest(v):
    """A hex digest (32 hex digits or more) as its first 12, else v."""
    if isinstance(v, str) and len(v) >= 32 and all(c in "0123456789abcdef" for c in v):
        return v[:12]
    return v


def unstorable_logits(nonfinite: list, overflow: list, start: int, sidx, vidx, logits_dtype: str) -> KDPipeError:
    def where(rel):
        named = ", ".join(f"sample {int(sidx[j])} view {int(vidx[j])}" for j in rel[:10])
        return named + (f" and {len(rel) - 10} more" if len(rel) > 10 else "")
    if nonfinite:
        return KDPipeError(f"the teacher produced NaN or Inf logits for {len(nonfinite)} input(s) among rows "
                           f"{start}..{start + len(sidx) - 1}: {where(nonfinite)}; nothing of this shard was "
                           "written (check the teacher and its input normalization)")
    return KDPipeError(f"the teacher's logits overflow {logits_dtype} for {len(overflow)} input(s) among rows "
                       f"{start}..{start + len(sidx) - 1}: {where(overflow)}; dump with --logits-dtype float32")


def wait_visible(out_dir: Path, writers: dict[str, int], patience_s: float = 60.0) -> None:
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


class CacheWriter:
    """The cache-writing protocol of stage one, for one dump (one rank of it under torchrun).

    The caller (``teacher.dump_logits``) runs the teacher and hands the writer each shard's values;
    the writer owns the rest, in this order:

    1. ``open()``: every rank was given the same identity; rank 0 prepares OUT (refuses a foreign
       directory or a cache of other arguments without ``overwrite``, discards it with, resumes one of
       the same arguments, reports a complete one) while the other ranks wait;
    2. ``resume()``: the ranks check the existing shards between them (rank r those with index r mod
       world), share what is complete and split the shards still to write round-robin;
    3. ``writing()`` / ``put(i, values)``: refuses logits the dtype cannot hold, then writes the shard
       on a background thread while the teacher computes the next (at most one write in flight);
    4. ``collect()``: rank 0 gathers every rank's shard entries (in memory: no per-rank files);
    5. ``write_eval()``, then ``write_manifest()``: written last, atomically, with its checksum.

    ``identity`` is what makes two dumps the same (``dataset`` with num_samples, num_classes and
    image_shape; ``views`` with seed, K and columns; ``logits_dtype``; ``shard_rows``); the cache id
    follows from it.
    """

    def __init__(self, out_dir, identity: dict, *, overwrite: bool = False, dist=None, log=print, label_of=None):
        from kdpipe.distributed import SINGLE
        self.out_dir = Path(out_dir)
        self.ident = identity
        # label_of(sample_index, view_params): the class each row's view shows most, which the teacher's top-1 on
        # its views is scored against (a mixed view's partner may outweigh its sample); None: the rows' labels
        self.label_of = label_of
        self.cache_id = uuid.uuid5(uuid.NAMESPACE_URL, json.dumps(identity, sort_keys=True)).hex
        self.overwrite, self.ctx, self.log = overwrite, dist or SINGLE, log
        self.n = int(identity["dataset"]["num_samples"])
        self.views = int(identity["views"]["K"])
        self.rows = self.n * self.views
        self.logits_dtype = identity["logits_dtype"]
        # What the columns' declarations read: the identity in the manifest's terms.
        self.spec = {**identity, "logits": fmt.logits_record(identity)}
        self.plan = plan_shards(self.rows, int(identity["shard_rows"]))
        self.entries: dict[int, dict] = {}
        self.correct: dict[int, int] = {}  # shard -> rows whose teacher argmax is the label
        self.kept: list[int] = []
        self._pending = None
        self._executor = None
        self._locks = None  # rank 0's lock on OUT (kdpipe.resume.RunLocks), from _prepare_out_dir to release()

    @property
    def state_path(self) -> Path:
        return self.out_dir / fmt.DUMP_STATE

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / fmt.MANIFEST

    # ---------------------------------------------------------------- 1. OUT

    def open(self) -> dict | None:
        """Check that the ranks agree and prepare OUT. Returns None to go on, or (the cache being
        complete already) the summary to return: rank 0's from the manifest, a short one elsewhere."""
        idents = self.ctx.all_gather(self.ident)
        for r, other in enumerate(idents):
            if other != idents[0]:  # every rank sees the same list, so every rank raises
                diffs = [d.replace(" was ", ": rank 0 has ", 1).replace(", now ", f", rank {r} has ", 1)
                         for d in differences(idents[0], other)]
                raise KDPipeError(f"rank {r} was given other arguments or data than rank 0 (" + "; ".join(diffs)
                                  + "): every rank must run the same command on the same data")
        finished = None
        with self.ctx.together("checking the cache directory"):
            if self.ctx.rank == 0:
                finished = self._prepare_out_dir()
        if self.ctx.broadcast(finished is not None):
            return finished if self.ctx.rank == 0 else {"rank": self.ctx.rank, "already_complete": True}
        return None

    def _prepare_out_dir(self) -> dict | None:  # rank 0, while the other ranks wait
        from kdpipe.util import ensure_out_dir
        from kdpipe.resume import LOCK_FILE, RunLocks
        out_dir, state_path, manifest_path = self.out_dir, self.state_path, self.manifest_path
        ensure_out_dir(out_dir, "cache directory")
        # Two dumps into one OUT would remove each other's temporaries and interleave shards: the second waits
        # for nothing, it is refused (a lock whose process is gone is taken over).
        self._locks = RunLocks(self.log)
        try:
            self._locks.acquire_path(out_dir / LOCK_FILE, f"the cache {out_dir}", "written")
        except KDPipeError:
            finished = self._finished_read_only()
            if finished is None:
                raise
            return finished
        if state_path.is_file() or manifest_path.is_file():
            record = state_path if state_path.is_file() else manifest_path
            try:
                old = json.loads(record.read_text())
                old = old.get("identity", old)
            except (OSError, ValueError, AttributeError):
                old = {}
            diffs = differences(old, self.ident) if old else [f"its {record.name} does not read"]
            if diffs and not self.overwrite:
                raise KDPipeError(f"{out_dir} holds a cache made with other arguments (" + "; ".join(diffs) +
                                  "): pass --overwrite to start over, or choose another --out")
            if diffs:  # --overwrite: start over; with the same arguments it resumes instead
                self.log(f"--overwrite: discarding the cache in {out_dir} (" + "; ".join(diffs) + ")")
                # the manifest first and dump.json last: a kill in between left a manifest that read as complete
                # over the shards already gone (the old command's rerun said "already complete"), or no dump.json
                # beside the old files (a rerun refused the folder as "not empty and holds no kdpipe cache")
                for p in [manifest_path, out_dir / fmt.EVAL_FILE] + sorted(out_dir.glob("shard-*.h5")):
                    p.unlink(missing_ok=True)
                remove_temporaries(out_dir)
                state_path.unlink(missing_ok=True)
        elif any(p.name != LOCK_FILE for p in out_dir.iterdir()):
            raise KDPipeError(f"{out_dir} is not empty and holds no kdpipe cache: choose an empty or new directory")
        remove_temporaries(out_dir)
        damage = _manifest_damage(manifest_path)
        if damage:  # a cache is complete by a sound manifest only: this one is written again from the shards
            self.log(f"{manifest_path} {damage}: writing it again from the shards that check out")
            manifest_path.unlink()
        if manifest_path.is_file():
            m = json.loads(manifest_path.read_text())
            os.utime(manifest_path)  # up to date for make, whose prerequisite may merely have been touched
            self.log(f"{out_dir} is already complete ({m['rows']} rows): nothing to do (to dump it again, remove "
                     "it or choose another --out: --overwrite starts over only a cache of other arguments)")
            return self._complete(m)
        atomic_write_json(state_path, {"identity": self.ident, "cache_id": self.cache_id, "started": time.time()})
        return None

    def _complete(self, m: dict) -> dict:
        """What open() returns for a cache that is complete already (manifest m)."""
        return dict(m["dump"], rows=m["rows"], bytes=m["bytes"], out=str(self.out_dir),
                    resumed_shards=len(m["shards"]), already_complete=True)

    def _finished_read_only(self) -> dict | None:
        """Where OUT cannot be written (a read-only mount, as a shared cache often is), so not locked either: a
        complete cache of these arguments there needs nothing written, and is reported as complete (else None)."""
        if os.access(self.out_dir, os.W_OK) or _manifest_damage(self.manifest_path) or not self.manifest_path.is_file():
            return None
        m = json.loads(self.manifest_path.read_text())
        if differences(m.get("identity", {}), self.ident):
            return None
        self.log(f"{self.out_dir} is already complete ({m['rows']} rows) and read-only: nothing to do")
        return self._complete(m)

    def release(self) -> None:
        """Release the lock on OUT (when this rank holds it): at the end of a dump, also a failed one."""
        if self._locks is not None:
            self._locks.release()
            self._locks = None

    # ---------------------------------------------------------------- 2. resume

    def resume(self) -> list[int]:
        """The shards this rank computes: those no earlier run completed, balanced over the ranks."""
        ctx = self.ctx
        mine = [i for i in range(ctx.rank, len(self.plan), ctx.world) if (self.out_dir / fmt.shard_name(i)).is_file()]
        # each earlier shard is read whole (its checksums, its teacher top-1): minutes for a large cache, said
        prog = Progress("checking the shards of the earlier run" + (f" (rank {ctx.rank})" if ctx.world > 1 else ""),
                        len(mine), "shards", stream=ctx.progress_stream) if mine else None
        with ctx.together("checking existing shards"):
            for i in mine:
                ent = self._existing_shard(i)
                prog.update(1)
                if ent:
                    self.entries[i] = ent
                    self.correct[i] = self._shard_correct(self.out_dir / fmt.shard_name(i), self.label_of)
        self.kept = sorted(i for part in ctx.all_gather(sorted(self.entries)) for i in part)
        todo_all = sorted(set(range(len(self.plan))) - set(self.kept))
        if self.kept:
            self.log(f"resuming: {len(self.kept)} complete shard(s) kept, {len(todo_all)} to compute"
                     + (f" on {ctx.world} ranks" if ctx.world > 1 else ""))
        return todo_all[ctx.rank::ctx.world]

    def _existing_shard(self, i: int) -> dict | None:
        """The manifest entry of a complete shard from an earlier run of this dump, else None."""
        from kdpipe.cache.reader import open_h5, sha256_dataset
        path = self.out_dir / fmt.shard_name(i)
        start, stop = self.plan[i]
        if not path.is_file():
            return None
        try:
            with open_h5(path) as f:
                a = f.attrs
                if a.get("cache_id") != self.cache_id or int(a["row_start"]) != start or int(a["row_stop"]) != stop:
                    return None
                digests = {}
                for col in fmt.shard_columns(self.spec["logits"]["codec"], self.spec):
                    if col.path not in f or "sha256" not in f[col.path].attrs:
                        return None
                    digests[col.path] = sha256_dataset(f[col.path])
                    if digests[col.path] != f[col.path].attrs["sha256"]:
                        return None
                layout = dataset_layout(f)
        except (KDPipeError, OSError, RuntimeError, ValueError, KeyError):  # damaged: compute it again
            return None
        return {"file": path.name, "bytes": path.stat().st_size, "sha256": digests, "layout": layout,
                "file_sha256": file_sha256(path), "row_start": start, "row_stop": stop}

    @staticmethod
    def _shard_correct(path: Path, label_of=None) -> int:
        """Rows of a shard whose teacher argmax equals the label (label_of's, when given)."""
        from kdpipe.cache.reader import open_h5
        with open_h5(path) as f:
            if "logits" in f:
                top = f["logits"][()].astype(np.float32).argmax(1)
            else:  # codec topk: the first of the top k is the argmax
                top = f[fmt.SHARD_COLUMNS["logits_topk_indices"].path][:, 0]
            if label_of is None:
                truth = f["labels"][()]
            else:
                truth = label_of(f[fmt.SHARD_COLUMNS["sample_index"].path][()],
                                 f[fmt.SHARD_COLUMNS["view_params"].path][()])
            return int((top == truth).sum())

    # ---------------------------------------------------------------- 3. shards

    @contextmanager
    def writing(self):
        """The span in which shards are put. On the way out (also after an error or Ctrl-C), a shard
        being written finishes: it is complete or it is not there, never half-written."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdpipe-shard-writer")
        try:
            with self.ctx.together("computing logits"):
                try:
                    yield self
                    if self._pending is not None:
                        self._pending.result()
                finally:
                    self._executor.shutdown(wait=True)
        finally:
            self._executor, self._pending = None, None

    def put(self, i: int, values: dict[str, np.ndarray]) -> None:
        """Write shard i. ``values``: column name -> rows, at least ``logits`` (float32, as the teacher
        gave them), ``sample_index``, ``view_index``, ``labels``; columns the manifest determines
        (``view_params``) are recomputed when not handed. Logits the logits dtype cannot hold stop the
        dump before anything of the shard is written, naming the inputs."""
        s, e = self.plan[i]
        lg = np.asarray(values["logits"], dtype=np.float32)
        sidx, vidx = values["sample_index"], values["view_index"]
        codec = self.spec["logits"]
        if codec["codec"] == "topk":  # the codec's columns replace the logits; only their values need the dtype
            coded = fmt.encode_topk(lg, codec["k"], codec["temperatures"])
            kept = coded.pop("logits_topk_values")
        else:
            coded, kept = {}, lg
        with np.errstate(over="ignore"):  # logits the dtype cannot hold are reported just below
            out = kept.astype(fmt.LOGITS_DTYPES[self.logits_dtype])
        bad = ~np.isfinite(lg).all(axis=1)
        nonfinite = np.flatnonzero(bad).tolist()  # rows of this shard (relative) that cannot be stored
        overflow = np.flatnonzero(~bad & ~np.isfinite(out).all(axis=1)).tolist()
        if nonfinite or overflow:
            raise unstorable_logits(nonfinite, overflow, s, sidx, vidx, self.logits_dtype)
        stored = {**values, **coded, "logits_topk_values" if coded else "logits": out}
        if coded:
            del stored["logits"]
        for col in fmt.feature_columns(self.spec):  # float16 features: refuse what it cannot hold, naming rows
            with np.errstate(over="ignore"):
                f16 = np.asarray(values[col.name], dtype=np.float32).astype(col.dtype)
            bad = np.flatnonzero(~np.isfinite(f16.reshape(len(f16), -1)).all(axis=1))
            if len(bad):
                raise KDPipeError(f"the teacher's features at {col.name.partition('/')[2]!r} are NaN, Inf or past "
                                  f"float16 for {len(bad)} input(s) among rows {s}..{e - 1} (first: sample "
                                  f"{int(sidx[bad[0]])} view {int(vidx[bad[0]])}): cache another layer, e.g. one "
                                  "after a normalization")
            stored[col.name] = f16
        datasets = shard_datasets(stored, self.spec, s, e)
        attrs = {"kdpipe_format_version": fmt.FORMAT_VERSION, "cache_id": self.cache_id, "row_start": s,
                 "row_stop": e, "num_samples": self.n, "num_views": self.views,
                 "kdpipe_version": _kdpipe_version()}
        top = out.astype(np.float32).argmax(1) if not coded else coded["logits_topk_indices"][:, 0]
        truth = values["labels"] if self.label_of is None else self.label_of(sidx, values["view_params"])
        self.correct[i] = int((top == np.asarray(truth)).sum())
        if self._pending is not None:
            self._pending.result()  # the previous shard is on disk (or its error is raised here)
        self._pending = self._executor.submit(self._write_shard, i, s, e, datasets, attrs)

    def _write_shard(self, i, s, e, datasets, attrs):
        ent = write_h5_atomic(self.out_dir / fmt.shard_name(i), datasets, attrs)
        self.entries[i] = dict(ent, row_start=s, row_stop=e)

    # ---------------------------------------------------------------- 4. collect

    def collect(self, rows_computed: int, compute_s: float) -> dict | None:
        """Gather the shard entries on rank 0. Returns {"rows_computed", "compute_wall_s", "views_top1"}
        there (every shard is now on disk and visible), None on the other ranks (they are done)."""
        ctx = self.ctx
        parts = ctx.gather((self.entries, self.correct, rows_computed, compute_s))
        if ctx.rank != 0:
            return None
        for ents, corr, _, _ in parts:
            self.entries.update(ents)
            self.correct.update(corr)
        missing = [i for i in range(len(self.plan)) if i not in self.entries]
        if missing:
            raise KDPipeError(f"shard(s) {missing[:10]} of {self.out_dir} were computed by no rank: "
                              "run the same command again")
        if ctx.world > 1:
            wait_visible(self.out_dir, {ent["file"]: r for r, part in enumerate(parts) for ent in part[0].values()})
        return {"views_top1": sum(self.correct.values()) / self.rows,
                "rows_computed": sum(p[2] for p in parts), "compute_wall_s": max(p[3] for p in parts)}

    # ---------------------------------------------------------------- 5. eval file and manifest

    def write_eval(self, values: dict[str, np.ndarray], dataset: dict) -> dict:
        """The eval file (the teacher on the clean test split); returns its manifest entry. NaN or Inf test logits
        stop the dump before it is written, naming the samples, as the shards' do (put)."""
        bad = np.flatnonzero(~np.isfinite(np.asarray(values["test_logits"], dtype=np.float32)).all(axis=1))
        if len(bad):
            named = ", ".join(f"test sample {int(j)}" for j in bad[:10]) + \
                (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
            raise KDPipeError(f"the teacher produced NaN or Inf logits for {len(bad)} input(s) of the clean test split: "
                              f"{named}; the cache was not finished (check the teacher and its input normalization)")
        datasets = {}
        for col in fmt.EVAL_COLUMNS.values():
            arr = np.asarray(values[col.name]).astype(col.np_dtype(self.spec), copy=False)
            datasets[col.path] = (arr, {"description": col.description})
        ent = write_h5_atomic(self.out_dir / fmt.EVAL_FILE, datasets,
                              {"kdpipe_format_version": fmt.FORMAT_VERSION, "cache_id": self.cache_id})
        return dict(ent, dataset=dataset)

    def write_manifest(self, record: dict, eval_entry: dict | None) -> dict:
        """Write the manifest, last and atomically. ``record`` holds what the writer cannot know (teacher,
        teachers, dataset, views, num_classes, input, dump); the rest (identity, shards, columns, codec,
        bytes, checksum) comes from the writer."""
        import torch
        shards = [self.entries[i] for i in range(len(self.plan))]
        total_bytes = sum(e["bytes"] for e in shards) + (eval_entry["bytes"] if eval_entry else 0)
        manifest = {
            "format_version": fmt.FORMAT_VERSION, "cache_id": self.cache_id, "identity": self.ident,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kdpipe_version": _kdpipe_version(), "torch_version": torch.__version__,
            **record,
            "logits": self.spec["logits"], "columns": fmt.columns_record(self.spec["logits"]["codec"], self.spec),
            **({"features": [{**f, "dtype": fmt.FEATURES_DTYPE.name,
                              "path": fmt.feature_column(f["layer"], f["shape"]).path}
                             for f in self.ident["features"]]} if self.ident.get("features") else {}),
            "rows": self.rows, "row_order": "view-major", "shards": shards, "eval": eval_entry,
            "bytes": total_bytes,
        }
        manifest["checksum"] = fmt.manifest_checksum(manifest)
        atomic_write_json(self.manifest_path, manifest)
        return manifest


def _manifest_damage(path: Path) -> str | None:
    """Why the manifest at `path` cannot say the cache is complete (not JSON, or not matching its own checksum:
    damaged or edited since the dump), or None (also when there is none). Stage two refuses such a cache and
    says to dump again; the dump then rebuilds the manifest instead of calling the cache complete."""
    from kdpipe.cache.reader import manifest_fault
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"is not valid JSON ({e})"
    if not isinstance(m, dict):
        return "is not a kdpipe manifest"
    fault = manifest_fault(m)
    return f"does not read: {fault}" if fault else None


def _kdpipe_version() -> str:
    import kdpipe
    return kdpipe.__version__
