"""Writing caches: atomic files (temporary name, fsync, rename), shard planning, checksums."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np

from kdpipe import KDPipeError
from kdpipe.cache import format as fmt


def sha256_array(a: np.ndarray) -> str:
    """sha256 of an array's bytes as stored (C order, its own explicit dtype)."""
    h = hashlib.sha256()
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    step = 1 << 24
    for i in range(0, flat.size, step):
        h.update(flat[i:i + step].data)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
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
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        _unlink_quietly(tmp)
        raise _io_error(path, e) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_h5_atomic(path: Path, datasets: dict[str, tuple[np.ndarray, dict]], attrs: dict) -> dict:
    """Write an HDF5 file of contiguous datasets under a temporary name, fsync, rename.

    ``datasets`` maps name -> (array with its explicit dtype, attributes). Returns
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
    """name -> [byte offset, byte count] of each contiguous dataset's values in the file."""
    out = {}
    for name, d in f.items():
        n = int(d.id.get_storage_size())
        off = d.id.get_offset() if n else None
        out[name] = [int(off) if off is not None else 0, n]
    return out


def plan_shards(total_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_rows, total_rows)) for s in range(0, total_rows, shard_rows)]


def remove_temporaries(cache_dir: Path) -> None:
    """Temporary files are never complete: a dump removes those a crash left behind."""
    for p in Path(cache_dir).glob(".*.tmp-*"):
        p.unlink(missing_ok=True)


def shard_datasets(logits, sample_index, view_index, labels, view_params, columns) -> dict:
    out = {}
    for name, arr in (("logits", logits), ("sample_index", sample_index), ("view_index", view_index),
                      ("labels", labels), ("view_params", view_params)):
        attrs = {"description": fmt.SHARD_DATASETS[name][2]}
        if name == "view_params":
            attrs["columns"] = json.dumps(list(columns))
        out[name] = (arr, attrs)
    return out
