"""Reading caches: the manifest, memory-mapped rows, checks of identity and integrity."""

from __future__ import annotations

import hashlib
import json
import mmap
import operator
import os
from pathlib import Path

import h5py
import numpy as np
import torch

import kdpipe
from kdpipe import KDPipeError
from kdpipe.cache import format as fmt
from kdpipe.util import file_sha256, hdf5_open_error

# Caches are opened read-only and without HDF5 file locks (see kdpipe/__init__.py for the user's
# HDF5_USE_FILE_LOCKING, which can override that).


def open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r", locking=False)
    except FileNotFoundError:
        raise KDPipeError(f"{path} is missing") from None
    except OSError as e:
        raise hdf5_open_error(path, e) from None


def read_manifest(cache_dir: Path, check_checksum: bool = True) -> dict:
    """The manifest of a finished cache; refuses an unfinished, newer, damaged or edited one.

    ``check_checksum=False`` (for verify-cache, which reports it as a fault) accepts an edited one.
    """
    cache_dir = Path(cache_dir)
    if cache_dir.is_file():
        raise KDPipeError(f"{cache_dir} is a file, not a cache directory")
    if not cache_dir.is_dir():
        raise KDPipeError(f"no cache at {cache_dir}: the directory does not exist")
    mpath = cache_dir / fmt.MANIFEST
    if not mpath.is_file():
        if (cache_dir / fmt.DUMP_STATE).is_file():
            raise KDPipeError(f"{cache_dir} is an unfinished cache (no {fmt.MANIFEST}): run the same "
                              "dump-logits command again to finish it")
        raise KDPipeError(f"{cache_dir} is not a kdpipe cache (no {fmt.MANIFEST})")
    try:
        m = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise KDPipeError(f"{mpath} is not valid JSON: {e}") from None
    if not isinstance(m, dict) or "format_version" not in m:
        raise KDPipeError(f"{mpath} is not a kdpipe manifest (no format_version)")
    v = m["format_version"]
    if v != fmt.FORMAT_VERSION:
        newer = isinstance(v, int) and v > fmt.FORMAT_VERSION
        raise KDPipeError(f"{cache_dir} has cache format version {v}; this kdpipe reads version "
                          f"{fmt.FORMAT_VERSION}" + (" (upgrade kdpipe)" if newer else " (dump it again)"))
    edited = manifest_fault(m) if check_checksum else None
    if edited:
        raise KDPipeError(f"{mpath}: {edited}; run kdpipe verify-cache {cache_dir}, or dump again")
    for key in ("cache_id", "rows", "dataset", "views", "logits", "shards", "num_classes", "teacher"):
        if key not in m:
            raise KDPipeError(f"{mpath} lacks {key!r}: the manifest is damaged")
    why = fmt.unreadable(m)
    if why:
        raise KDPipeError(f"{cache_dir} cannot be read by kdpipe {kdpipe.__version__}: {why} (upgrade kdpipe, "
                          "or dump the cache again with this version)")
    return m


def manifest_fault(m: dict) -> str | None:
    """Why the manifest's content does not match its own checksum (every released version wrote one), or None."""
    if m.get("checksum") != fmt.manifest_checksum(m):
        return "the manifest does not match its checksum: it was edited or damaged after the dump"
    return None


def _stat(f: h5py.File, path: Path) -> os.stat_result:
    """The status of the file h5py has open as `f` (of `path` where its driver gives no file descriptor)."""
    try:
        return os.fstat(f.id.get_vfd_handle())
    except (OSError, ValueError, TypeError, RuntimeError):
        return os.stat(path)


KEPT_MAPS = 64  # shards whose maps a row-wise reader keeps open (one file descriptor each)


class Cache:
    """A finished cache, opened read-only. Picklable: maps are made lazily in each process."""

    def __init__(self, path, check_checksum: bool = True):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, check_checksum)
        m = self.manifest
        self.num_samples = int(m["dataset"]["num_samples"])
        self.num_views = int(m["views"]["K"])
        self.num_classes = int(m["num_classes"])
        self.rows = int(m["rows"])
        self.logits_dtype = m["logits"]["dtype"]
        self.columns = list(m["views"]["columns"])
        self.shard_columns = {c.name: c for c in fmt.cache_columns(m)}  # those this version knows
        self._starts = np.array([s["row_start"] for s in m["shards"]], dtype=np.int64)
        self._layout: dict[tuple[int, str], tuple] = {}
        self._sound: set[int] = set()  # shards whose attributes name this cache and their rows (_open_shard)
        self._files: dict[int, tuple] = {}  # shard -> (inode, size, mtime) of the file whose attributes were checked
        self.keep_maps = False  # keep shards' maps open between reads (_map)
        self._kept: dict[int, mmap.mmap] = {}
        if self.rows != self.num_samples * self.num_views:
            raise KDPipeError(f"{self.path}: manifest says {self.rows} rows, expected "
                              f"{self.num_samples} samples x {self.num_views} views")
        expect = 0
        for s in m["shards"]:
            if s["row_start"] != expect:
                raise KDPipeError(f"{self.path}: shards do not cover rows contiguously at row {expect}")
            expect = s["row_stop"]
        if expect != self.rows:
            raise KDPipeError(f"{self.path}: shards cover {expect} of {self.rows} rows")

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_layout"], d["_kept"] = {}, {}
        # Columns hold functions of the manifest (some are lambdas), which do not pickle: a DataLoader's spawned
        # workers rebuild them from the manifest.
        del d["shard_columns"]
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self.shard_columns = {c.name: c for c in fmt.cache_columns(self.manifest)}

    # ---------------------------------------------------------------- layout and raw reads

    def shard_path(self, i: int) -> Path:
        return self.path / self.manifest["shards"][i]["file"]

    def _path(self, name: str) -> str:
        """The HDF5 path of a column of this cache."""
        if name not in self.shard_columns:
            raise KDPipeError(f"cache {self.path} has no column {name!r} (it has: {', '.join(self.shard_columns)})")
        return self.shard_columns[name].path

    def _dataset_layout(self, i: int, name: str) -> tuple:
        """(offset or None, dtype, shape) of one column of shard i; offset None means read via h5py."""
        key = (i, name)
        if key not in self._layout:
            path = self._path(name)
            with self._open_shard(i) as f:
                if path not in f:
                    raise KDPipeError(f"{self.shard_path(i)} has no dataset {path!r}")
                d = f[path]
                off = d.id.get_offset() if (d.chunks is None and d.compression is None) else None
                self._layout[key] = (off, d.dtype, d.shape)
        return self._layout[key]

    def _open_shard(self, i: int) -> h5py.File:
        """Shard i, open; refused when it is not the file the dump wrote there (missing, not HDF5 any more, or
        its attributes naming another cache id or rows), before any of its rows is read. The attributes are
        checked once per shard; the bytes are verify-cache's to check. A shard copied in from another cache
        (another teacher, seed or shard size) was otherwise read as this cache's rows, or failed with a
        traceback."""
        s = self.manifest["shards"][i]
        path = self.shard_path(i)

        def refuse(why: str):
            return KDPipeError(f"{path} (rows {s['row_start']}..{s['row_stop'] - 1} of cache {self.path}) {why}: "
                               f"run kdpipe verify-cache {self.path}, which says how to repair it")
        if not path.is_file():
            self._same_file(i, None)
            raise refuse("is missing")
        try:
            f = open_h5(path)
        except KDPipeError as e:  # damaged; not when HDF5_USE_FILE_LOCKING made HDF5 lock it (its own advice)
            damaged = f"cannot open {path} as HDF5: "
            if not str(e).startswith(damaged):
                raise
            raise refuse(f"does not open as HDF5 ({str(e).removeprefix(damaged)})") from None
        try:
            self._same_file(i, _stat(f, path))
        except KDPipeError:
            f.close()
            raise
        if i not in self._sound:
            a, why = f.attrs, None
            if a.get("cache_id") != self.manifest["cache_id"]:
                why = "is a shard of another cache"
            elif (a.get("row_start"), a.get("row_stop")) != (s["row_start"], s["row_stop"]):
                why = f"holds rows {a.get('row_start')}..{a.get('row_stop', 0) - 1}, not those the manifest says"
            if why:
                f.close()
                raise refuse(why)
            self._sound.add(i)
            st = _stat(f, path)
            self._files[i] = (st.st_ino, st.st_size, st.st_mtime_ns)
        return f

    def _same_file(self, i: int, st: os.stat_result | None) -> None:
        """Refuse shard i where the file at its path (`st`; None: there is none) is no longer the one whose
        attributes were checked: a dump into this directory (dump-logits --overwrite) removed or replaced it
        while this cache was read, and rows read from it now would be another cache's, without a word. Another file
        has another size or time; its inode number is no sign either way (some FUSE file systems number inodes anew,
        and ext4 gives a removed file's number to the next file made, as a dump's next shard)."""
        old = self._files.get(i)
        if old and (st is None or (st.st_size, st.st_mtime_ns) != old[1:]):
            s = self.manifest["shards"][i]
            raise KDPipeError(f"{self.shard_path(i)} (rows {s['row_start']}..{s['row_stop'] - 1} of cache {self.path}) "
                              "was removed or replaced while the cache was being read (another dump-logits into "
                              "it, with --overwrite?): its rows are not this cache's; run again once that dump is done")

    def _map(self, i: int, off: int, dtype, shape) -> np.ndarray:
        """A read-only map of one column of shard i, of the very file whose attributes were checked. With
        keep_maps (row-wise readers), the shard's map stays open for the next row (at most KEPT_MAPS shards,
        the least recently read closed first): a map made and dropped for each column of each row held a
        DataLoader worker to about 2,000 rows/s."""
        kept = self._kept.get(i) if self.keep_maps else None
        if kept is None:
            try:
                fh = open(self.shard_path(i), "rb")
            except FileNotFoundError:
                self._same_file(i, None)
                raise KDPipeError(f"{self.shard_path(i)} is missing: run kdpipe verify-cache {self.path}") from None
            with fh:
                self._same_file(i, os.fstat(fh.fileno()))
                if not self.keep_maps:
                    return np.memmap(fh, dtype=dtype, mode="r", offset=off, shape=shape)
                kept = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            while len(self._kept) >= KEPT_MAPS:
                self._kept.pop(next(iter(self._kept)))  # a map still referenced by an array closes with it
            self._kept[i] = kept
        else:
            self._kept[i] = self._kept.pop(i)  # the most recently read, last
        return np.frombuffer(kept, dtype=dtype, count=int(np.prod(shape)), offset=off).reshape(shape)

    def _read_shard(self, i: int, name: str, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) relative to shard i, copied out."""
        off, dtype, shape = self._dataset_layout(i, name)
        if off is not None:
            mm = self._map(i, off, dtype, shape)
            out = np.array(mm[lo:hi])
            del mm
            return out
        with self._open_shard(i) as f:
            return f[self._path(name)][lo:hi]

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a dataset across shards."""
        if not 0 <= start <= stop <= self.rows:
            raise IndexError(f"rows [{start}, {stop}) outside [0, {self.rows})")
        parts = []
        i = int(np.searchsorted(self._starts, start, side="right") - 1)
        pos = start
        while pos < stop:
            sh = self.manifest["shards"][i]
            hi = min(stop, sh["row_stop"])
            parts.append(self._read_shard(i, name, pos - sh["row_start"], hi - sh["row_start"]))
            pos = hi
            i += 1
        if not parts:
            _, dtype, shape = self._dataset_layout(0, name)
            return np.empty((0,) + tuple(shape[1:]), dtype=dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def read_rows(self, name: str, rows) -> np.ndarray:
        """Rows `rows` (strictly increasing global row indices) of a dataset, copied out shard by shard: a
        distributed rank reads only its share of a view this way."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows[0] < 0 or rows[-1] >= self.rows or (np.diff(rows) <= 0).any()):
            raise IndexError(f"rows must strictly increase within [0, {self.rows})")
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        parts = []
        for i in np.unique(shard):
            i = int(i)
            rel = rows[shard == i] - self._starts[i]
            off, dtype, shape = self._dataset_layout(i, name)
            if off is not None:
                mm = self._map(i, off, dtype, shape)
                parts.append(np.asarray(mm[rel]))  # fancy indexing copies the rows out of the map
                del mm
            else:
                with self._open_shard(i) as f:
                    parts.append(f[self._path(name)][rel])
        if not parts:
            _, dtype, shape = self._dataset_layout(0, name)
            return np.empty((0,) + tuple(shape[1:]), dtype=dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def read_view(self, k: int, name: str) -> np.ndarray:
        """One view's rows of a column, in sample order: (N, ...)."""
        if not 0 <= k < self.num_views:
            raise IndexError(f"view {k} outside [0, {self.num_views})")
        n = self.num_samples
        if name == "view_params" and not self.columns:
            return np.zeros((n, 0), dtype=np.int32)
        return self.read(name, k * n, (k + 1) * n)

    def read_test_logits(self) -> np.ndarray | None:
        e = self.manifest.get("eval")
        if not e:
            return None
        with open_h5(self.path / e["file"]) as f:
            # as a shard's (_open_shard): another cache's eval file gave another teacher's test logits, silently
            if f.attrs.get("cache_id") != self.manifest["cache_id"]:
                raise KDPipeError(f"{self.path / e['file']} (the test logits of cache {self.path}) is the eval file "
                                  f"of another cache: run kdpipe verify-cache {self.path}, which says how to repair it")
            return f[fmt.EVAL_COLUMNS["test_logits"].path][()]

    # ---------------------------------------------------------------- integrity

    def verify_checksums(self, progress=None) -> list[str]:
        """Every shard (and the eval file) against the manifest; returns the faults found, each naming
        the file and its rows."""
        return [f for fs in self.file_faults(progress).values() for f in fs]

    def file_faults(self, progress=None, deep: bool = False) -> dict[str, list[str]]:
        """file name -> its faults (only files with faults are listed).

        A file is checked byte for byte without HDF5: HDF5 can raise odd errors or hang on damaged
        metadata, so a damaged file is never opened with it; the datasets at fault are found from the
        recorded byte layout instead. `deep` (for a manifest that fails its own checksum) also checks
        the manifest's dataset digests of files that match their file digest.
        """
        faults: dict[str, list[str]] = {}
        entries = list(self.manifest["shards"])
        if self.manifest.get("eval"):
            entries.append(dict(self.manifest["eval"], row_start=None, row_stop=None))
        for i, entry in enumerate(entries):
            path = self.path / entry["file"]
            rows = "" if entry["row_start"] is None else f" (rows {entry['row_start']}..{entry['row_stop'] - 1})"
            found = [f"{entry['file']}{rows}: {f}" for f in self._entry_faults(path, entry, deep)]
            if found:
                faults[entry["file"]] = found
            if progress:
                progress(i + 1, len(entries))
        return faults

    def _entry_faults(self, path: Path, entry: dict, deep: bool = False) -> list[str]:
        if not path.is_file():
            return ["missing"]
        size = path.stat().st_size
        if size != entry["bytes"]:
            return [f"{size} bytes, manifest says {entry['bytes']} (truncated, extended or replaced)"]
        if not entry.get("file_sha256"):  # every released kdpipe recorded it
            return ["the manifest records no file_sha256 for it (not written by a released kdpipe)"]
        if file_sha256(path) != entry["file_sha256"]:
            return _locate_damage(path, entry, self.manifest["cache_id"])
        if deep:  # the file is as written; is the manifest's account of it?
            return [f"the manifest's digest of dataset {name} does not match the file (manifest edited?)"
                    for name, (offset, nbytes) in sorted(entry.get("layout", {}).items())
                    if hashlib.sha256(read_raw(path, offset, nbytes)).hexdigest() != entry["sha256"].get(name)]
        return []  # every byte as written

    # ---------------------------------------------------------------- identity

    def check_dataset(self, data) -> None:
        """Refuse a dataset that is not the one the cache was dumped from, naming the difference."""
        want = self.manifest["dataset"]
        got = data.identity()
        diffs = []
        for key in ("num_samples", "num_classes", "image_shape", "fingerprint"):
            if want.get(key) != got.get(key):
                diffs.append(f"{key}: cache has {want.get(key)}, given {got.get(key)}")
        if diffs:
            raise KDPipeError(f"the dataset does not match cache {self.path} "
                              f"({want['spec']} {want['split']}): " + "; ".join(diffs))


def read_raw(path: Path, offset: int, nbytes: int) -> bytes:
    """Bytes [offset, offset + nbytes) of a file, read without HDF5."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(nbytes)


def _locate_damage(path: Path, entry: dict, cache_id: str) -> list[str]:
    """Which parts of a file that differs from its digest changed, from its raw bytes alone."""
    out = []
    if entry["row_start"] is not None and cache_id.encode() not in path.read_bytes():
        out.append("does not carry this cache's id (a shard of another cache?)")
    for name, (offset, nbytes) in sorted(entry.get("layout", {}).items()):
        if nbytes and hashlib.sha256(read_raw(path, offset, nbytes)).hexdigest() != entry["sha256"].get(name):
            out.append(f"dataset {name} checksum mismatch")
    if not out:
        out.append("file checksum mismatch outside the datasets' values (HDF5 metadata or attributes changed)")
    return out


def sha256_dataset(d) -> str:
    """sha256 of an h5py dataset's values, read in slices of about 16 MiB."""
    h = hashlib.sha256()
    n = d.shape[0] if d.shape else 0
    step = max(1, (1 << 24) // max(1, d.dtype.itemsize * int(np.prod(d.shape[1:], dtype=np.int64))))
    for i in range(0, n, step):
        h.update(np.ascontiguousarray(d[i:i + step]).reshape(-1).view(np.uint8).data)
    return h.hexdigest()


class CachedLogitsDataset(torch.utils.data.Dataset):
    """Row-wise access to a cache for torch DataLoaders: item r is a tuple of the cache's item columns
    (cache/format.py, in table order): (sample_index, view_index, label, logits as float32,
    view_params); for a cache of the top-k codec the logits' place holds three items, the top-k values
    (k,) float32, their classes (k,) int64 and the rest terms (one per declared temperature) float32
    (Cache.manifest["logits"] names k and the temperatures). With features=True, each cached feature
    (dump-logits --features; the manifest's "features", in that order) follows, float32 of its layer's
    shape. Shards are opened lazily in each worker process (the object pickles without any open file)."""

    def __init__(self, cache_dir, features: bool = False):
        if isinstance(cache_dir, (list, tuple)):
            raise KDPipeError("CachedLogitsDataset reads one cache's rows; for an ensemble of caches use "
                              "kdpipe.open_cache([...], weights=...)")
        self.cache = Cache(cache_dir)
        self.cache.keep_maps = True  # row by row: each shard is mapped once per process, not once per row
        self.items = [c.name for c in self.cache.shard_columns.values() if c.item]
        if features:
            feats = self.cache.manifest.get("features", [])
            if not feats:
                raise KDPipeError(f"cache {self.cache.path} holds no features: dump it with --features LAYER")
            self.items += [f["path"] for f in feats]

    def __len__(self):
        return self.cache.rows

    def __getitem__(self, r):
        r = operator.index(r)  # a float, a tensor of several, a slice: a TypeError, not a silently odd row
        if not -len(self) <= r < len(self):
            raise IndexError(f"row {r} of a cache of {len(self)} rows")
        r %= len(self)  # ds[-1] is the last row, as for a list
        return tuple(self._value(name, r) for name in self.items)

    def _value(self, name: str, r: int):
        c = self.cache
        if name == "view_params" and not c.columns:
            return torch.zeros(0, dtype=torch.int32)
        v = c.read(name, r, r + 1)[0]
        if v.dtype.kind == "u":  # a top-k cache's uint16 classes: int64, as torch indexes with
            v = v.astype(np.int64)
        if v.ndim == 0:
            return int(v) if v.dtype.kind in "iu" else float(v)
        return torch.from_numpy(v.astype(np.float32) if v.dtype.kind == "f" else v)
