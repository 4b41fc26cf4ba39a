"""The cache format, declared once.

A cache is a directory:

    manifest.json      written last, atomically; its presence is what makes the cache complete
    dump.json          the identity of the dump in progress (what a resumed dump must match)
    shard-00000.h5 ... HDF5 shards, each holding a contiguous range of rows
    eval.h5            the teacher's logits on the clean test split (for agreement)

Row r of the cache is view ``r // N`` of sample ``r % N`` (view-major: a student epoch reads one
view, which is one contiguous range of rows). Every dataset in a shard is contiguous,
uncompressed, fixed-shape and little-endian, so the reader maps it with ``np.memmap`` at
``dset.id.get_offset()``. Each dataset carries a ``description`` attribute saying what it is.

Integrity: the manifest lists every shard with ``bytes``, ``file_sha256`` (every byte of the file,
HDF5 metadata included), ``sha256`` (one digest per dataset, keyed by its HDF5 path, also stored as
the dataset's ``sha256`` attribute) and ``layout`` (each dataset's [byte offset, byte count] in the
file, so a damaged file is examined without HDF5); each shard's attributes name its ``cache_id`` and
row range. The manifest's own ``checksum`` is ``manifest_checksum`` of the rest of it, so an edited
manifest is detected. Every released version (0.1.0 on) wrote all of these.

The columns of a shard are declared once, below, as ``Column`` objects in ``SHARD_COLUMNS`` (the eval
file's in ``EVAL_COLUMNS``); the writer, the reader, verify-cache, ``kdpipe inspect`` and the torch
Dataset iterate those tables. A column lives at an HDF5 path that may be inside a group (extra
teachers under ``teachers/<name>/logits``, cached features under ``features/<layer>``). The manifest's
``columns`` lists the columns a cache holds and which of them a reader must know. A reader refuses a
cache whose logits codec (``logits.codec``, today only "raw") or required columns it does not know,
naming them; it ignores optional columns it does not know. Room to grow: a top-k codec declares
``logits_topk_values``, ``logits_topk_indices`` and ``logits_rest_mass`` with codec "topk"; mixing
policies add ``mix_partner`` (int64) and ``mix_weight`` (float32) per row.

Cached features (``dump-logits --features LAYER``): one optional float16 column per layer, named and
placed at ``features/<layer>`` (``feature_column``), its per-row shape the layer's output shape. The
manifest's ``features`` lists them ([{"layer", "shape", "dtype", "path"}]) and its ``columns`` marks them
optional: a kdpipe that does not know them reads the cache's logits as before (they change nothing of the
other columns), and its checksums still cover them. A dump's identity (cache id) names its features, so a
dump of other features never resumes or reuses a cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DUMP_STATE = "dump.json"
EVAL_FILE = "eval.h5"
SHARD_PATTERN = "shard-{:05d}.h5"

LOGITS_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}

CODECS = ("raw",)  # logits codecs this version reads and writes


@dataclass(frozen=True)
class Column:
    """One dataset of a shard (or of the eval file), declared once.

    ``dtype`` None means the manifest's logits dtype. ``shape(m)`` is the trailing shape (after the
    row axis) that the manifest ``m`` implies. ``path`` is the dataset's HDF5 path (defaults to the
    name; may lie in a group). ``codec`` None: every cache holds it; else only caches of that logits
    codec. ``required``: a reader that does not know this column cannot use the cache. ``recompute(m,
    start, stop)``, where the manifest determines the column, gives its rows [start, stop): the
    writer fills it when not handed, verify-cache compares it row by row. ``item``: part of the rows
    the torch Dataset yields, in table order.
    """
    name: str
    dtype: np.dtype | None
    shape: Callable[[dict], tuple]
    description: str
    path: str = ""
    codec: str | None = None
    required: bool = True
    recompute: Callable[[dict, int, int], np.ndarray] | None = None
    item: bool = False

    def __post_init__(self):
        if not self.path:
            object.__setattr__(self, "path", self.name)

    def np_dtype(self, m: dict) -> np.dtype:
        """The dtype as stored, for a cache whose manifest (or dump identity) is ``m``."""
        if self.dtype is not None:
            return self.dtype
        return LOGITS_DTYPES[m["logits"]["dtype"] if "logits" in m else m["logits_dtype"]]

    def full_shape(self, m: dict, rows: int) -> tuple:
        return (rows, *self.shape(m))


def _classes(m: dict) -> tuple:
    return (int(m["dataset"]["num_classes"]),)


def _params(m: dict) -> tuple:
    return (len(m["views"]["columns"]),)


def _scalar(m: dict) -> tuple:
    return ()


def _rows(start: int, stop: int) -> np.ndarray:
    return np.arange(start, stop, dtype=np.int64)


def _sample_index(m: dict, start: int, stop: int) -> np.ndarray:
    return _rows(start, stop) % int(m["dataset"]["num_samples"])


def _view_index(m: dict, start: int, stop: int) -> np.ndarray:
    return (_rows(start, stop) // int(m["dataset"]["num_samples"])).astype("<i4")


@lru_cache(maxsize=2)
def _one_view(views_json: str, k: int, data_shape: tuple) -> np.ndarray:
    """One view's replay parameters of every sample (kept: consecutive shards share a view)."""
    from kdpipe.views import policy_from_identity
    views = json.loads(views_json)
    return policy_from_identity(views).sample_view(views["seed"], k, data_shape)


def _view_params(m: dict, start: int, stop: int) -> np.ndarray:
    n = int(m["dataset"]["num_samples"])
    rows = _rows(start, stop)
    out = np.empty((stop - start, len(m["views"]["columns"])), dtype="<i4")
    shape = (n, *m["dataset"]["image_shape"])
    for k in np.unique(rows // n):
        sel = rows // n == k
        out[sel] = _one_view(json.dumps(m["views"], sort_keys=True), int(k), shape)[rows[sel] % n]
    return out


SHARD_COLUMNS: dict[str, Column] = {}
EVAL_COLUMNS: dict[str, Column] = {}


def register(column: Column, table: dict | None = None) -> Column:
    """Add a column to the shard table (or to ``table``); its name and path must be new."""
    table = SHARD_COLUMNS if table is None else table
    if column.name in table or any(c.path == column.path for c in table.values()):
        raise ValueError(f"cache column {column.name!r} ({column.path}) is declared twice")
    table[column.name] = column
    return column


for _c in (
    Column("sample_index", np.dtype("<i8"), _scalar,
           "Index of the sample in the dataset split (the manifest's dataset).", recompute=_sample_index, item=True),
    Column("view_index", np.dtype("<i4"), _scalar,
           "Index of the view (0..K-1) that this row was computed on.", recompute=_view_index, item=True),
    Column("labels", np.dtype("<i8"), _scalar, "Ground-truth class of the sample.", item=True),
    Column("logits", None, _classes,
           "Raw (pre-softmax) teacher logits, one row per (view, sample), in the manifest's logits dtype. "
           "Row r is view r // N of sample r % N, N = number of samples.", codec="raw", item=True),
    Column("view_params", np.dtype("<i4"), _params,
           "Replay parameters of this (view, sample), columns named in the attribute 'columns' "
           "and in the manifest's views.columns; kdpipe.views replays them bit for bit.",
           recompute=_view_params, item=True),
):
    register(_c)
for _c in (
    Column("test_logits", np.dtype("<f4"), _classes, "Raw teacher logits on the clean (unaugmented) test split."),
    Column("test_labels", np.dtype("<i8"), _scalar, "Ground-truth class of each test sample."),
):
    register(_c, EVAL_COLUMNS)


FEATURES_GROUP = "features"
FEATURES_DTYPE = np.dtype("<f2")


def feature_column(layer: str, shape) -> Column:
    """The optional column of a cached feature: the teacher's output at module path `layer`, float16, at
    ``features/<layer>``, of per-row shape `shape` (as the manifest's ``features`` records it)."""
    shape = tuple(int(v) for v in shape)
    return Column(f"{FEATURES_GROUP}/{layer}", FEATURES_DTYPE, lambda m, s=shape: s,
                  f"The teacher's output at module {layer!r} (a forward hook), float16, one row per (view, sample) "
                  "in the order of logits.", required=False)


def feature_columns(m: dict | None) -> list[Column]:
    """The feature columns a manifest (or dump identity) declares, in its order."""
    return [feature_column(f["layer"], f["shape"]) for f in (m or {}).get("features", [])]


def shard_columns(codec: str, m: dict | None = None) -> list[Column]:
    """The declared columns a cache of this codec holds, in table order; with the manifest (or dump
    identity) `m`, its feature columns after them."""
    return [c for c in SHARD_COLUMNS.values() if c.codec in (None, codec)] + feature_columns(m)


def row_bytes(m: dict, codec: str = "raw") -> int:
    """Bytes one (view, sample) row takes in the shards of a cache whose manifest (or dump identity) is m."""
    return sum(c.np_dtype(m).itemsize * int(np.prod(c.shape(m), dtype=np.int64)) for c in shard_columns(codec, m))


def eval_row_bytes(m: dict) -> int:
    """Bytes one test sample takes in the eval file."""
    return sum(c.np_dtype(m).itemsize * int(np.prod(c.shape(m), dtype=np.int64)) for c in EVAL_COLUMNS.values())


def columns_record(codec: str, m: dict | None = None) -> list[dict]:
    """What the manifest says of its columns (``columns``): enough for a reader to refuse or ignore them."""
    return [{"name": c.name, "path": c.path, "required": c.required} for c in shard_columns(codec, m)]


def unreadable(m: dict) -> str | None:
    """Why this version cannot read a cache with manifest ``m`` (its codec, or required columns it does
    not know, or lacks), or None."""
    codec = m.get("logits", {}).get("codec")
    if codec not in CODECS:
        return f"its logits codec {codec!r} is unknown to this kdpipe, which reads {', '.join(CODECS)}"
    listed = m.get("columns")
    if listed is None:  # 0.1.0 wrote no list: its shards hold exactly the declared columns of its codec
        listed = [{"name": c.name, "path": c.path, "required": True} for c in shard_columns(codec)]
    unknown = [c["name"] for c in listed if c.get("required", True) and c["name"] not in SHARD_COLUMNS]
    if unknown:
        return f"it needs column(s) {', '.join(unknown)}, which this kdpipe does not know"
    have = {c["name"] for c in listed}
    lacking = [c.name for c in shard_columns(codec) if c.required and c.name not in have]
    if lacking:
        return f"it lacks column(s) {', '.join(lacking)}, which its codec {codec!r} needs"
    return None


def cache_columns(m: dict) -> list[Column]:
    """The declared columns that the cache with manifest ``m`` holds (unknown optional ones left out)."""
    listed = m.get("columns")
    if listed is None:
        return shard_columns(m["logits"]["codec"])
    names = {c["name"] for c in listed}
    return [c for c in shard_columns(m["logits"]["codec"], m) if c.name in names]


def shard_name(i: int) -> str:
    return SHARD_PATTERN.format(i)


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces), without its "checksum" key."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
