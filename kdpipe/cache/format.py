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
cache whose logits codec (``logits.codec``: "raw" or "topk") or required columns it does not know,
naming them; it ignores optional columns it does not know. Room to grow: mixing policies add
``mix_partner`` (int64) and ``mix_weight`` (float32) per row.

Logits codecs (the manifest's ``logits``: ``codec``, ``dtype`` and the codec's own fields):

- "raw" (the default): ``logits`` (rows, C), the teacher's raw logits in the logits dtype.
- "topk" (``dump-logits --codec topk:K --temperatures T1,T2``; ``logits`` also records ``k`` and
  ``temperatures``, and the dump identity, hence the cache id, holds both): ``logits_topk_values``
  (rows, k), the k largest raw logits of the row in decreasing order, in the logits dtype;
  ``logits_topk_indices`` (rows, k), their classes as uint16 (int32 past 65,536 classes; ties go to
  the lower class index, as argmax breaks them); ``logits_topk_rest`` (rows, len(temperatures))
  float32, for each declared temperature T, ``log sum_{c not in top k} exp(z_c / T)`` of the float32
  logits z: the log-mass of the remaining classes, on the scale of ``values / T``, so that
  ``softmax([values / T, rest_T])`` is exactly the teacher's distribution at T over k + 1 bins (its
  top k classes and one bin for the rest). -inf when k = C (no class remains). The rest is needed
  per T because log-sum-exp does not commute with scaling; stage two refuses a temperature the dump
  did not declare. A row costs 2k (float16) or 4k (float32) bytes of values, 2k of indices (4k past
  65,536 classes) and 4 per declared temperature, against 2C or 4C for raw logits: it saves space
  for many classes, not for 10. The eval file keeps the dense test logits whatever the codec (one
  row per test sample: small next to K views of the train split), so agreement with the teacher
  works unchanged.

Older readers: a kdpipe that knows only "raw" refuses a top-k cache by its codec (``unreadable``).
Builds from before that check stop on the missing ``logits`` dataset ("shard-00000.h5 has no dataset
'logits'", tried with one of them); those older still cannot parse a current cache's views at all. None
reads top-k values as logits, so the format version stays 1, and raw caches stay readable by every
version that reads them today.

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

CODECS = ("raw", "topk")  # logits codecs this version reads and writes


@dataclass(frozen=True)
class Column:
    """One dataset of a shard (or of the eval file), declared once.

    ``dtype`` None means the manifest's logits dtype; a callable gives it from the manifest.
    ``shape(m)`` is the trailing shape (after the row axis) that the manifest ``m`` implies. ``path`` is
    the dataset's HDF5 path (defaults to the name; may lie in a group). ``codec`` None: every cache
    holds it; else only caches of that logits codec. ``required``: a reader that does not know this
    column cannot use the cache. ``recompute(m, start, stop)``, where the manifest determines the
    column, gives its rows [start, stop): the writer fills it when not handed, verify-cache compares it
    row by row. ``item``: part of the rows the torch Dataset yields, in table order.
    """
    name: str
    dtype: np.dtype | Callable[[dict], np.dtype] | None
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
        if callable(self.dtype):
            return self.dtype(m)
        if self.dtype is not None:
            return self.dtype
        return LOGITS_DTYPES[m["logits"]["dtype"] if "logits" in m else m["logits_dtype"]]

    def full_shape(self, m: dict, rows: int) -> tuple:
        return (rows, *self.shape(m))


def _classes(m: dict) -> tuple:
    return (int(m["dataset"]["num_classes"]),)


def _topk(m: dict) -> tuple:
    return (int(_logits_record(m)["k"]),)


def _temperatures(m: dict) -> tuple:
    return (len(_logits_record(m)["temperatures"]),)


def index_dtype(num_classes: int) -> np.dtype:
    """How a top-k cache stores class indices: uint16 up to 65536 classes, else int32."""
    return np.dtype("<u2") if num_classes <= 1 << 16 else np.dtype("<i4")


def _logits_record(m: dict) -> dict:
    """The manifest's ``logits`` (or, for a dump identity, the record it implies)."""
    return m["logits"] if "logits" in m else logits_record(m)


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
    Column("logits_topk_values", None, _topk,
           "The k largest raw teacher logits of each row, in decreasing order, in the manifest's logits dtype "
           "(codec topk; k in the manifest's logits.k).", codec="topk", item=True),
    Column("logits_topk_indices", lambda m: index_dtype(_classes(m)[0]), _topk,
           "The classes of logits_topk_values, in the same order (ties: the lower class first); uint16 up to "
           "65536 classes, else int32.",
           codec="topk", item=True),
    Column("logits_topk_rest", np.dtype("<f4"), _temperatures,
           "Per temperature T of the manifest's logits.temperatures (in that order): log sum exp(z_c / T) over "
           "the classes c not in the row's top k (z: the float32 logits); -inf when none remains.",
           codec="topk", item=True),
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


TOPK_COLUMNS = ("logits_topk_values", "logits_topk_indices", "logits_topk_rest")


def parse_codec(spec: str) -> dict:
    """``--codec``: "raw" -> {"codec": "raw"}; "topk:K" -> {"codec": "topk", "k": K}. ValueError says why not."""
    name, _, arg = str(spec).strip().partition(":")
    if name == "raw" and not arg:
        return {"codec": "raw"}
    if name == "topk":
        try:
            k = int(arg)
        except ValueError:
            k = 0
        if k >= 1 and str(k) == arg.strip():
            return {"codec": "topk", "k": k}
        raise ValueError(f"--codec topk:K needs a whole number K >= 1 (the logits kept per row), got {spec!r}")
    raise ValueError(f"unknown --codec {spec!r}: use raw, or topk:K (the K largest logits per row)")


def codec_identity(codec: dict, temperatures, num_classes: int) -> dict | None:
    """What a dump identity records of its logits codec (None for raw, so raw caches keep their ids):
    for topk, k and the declared temperatures (sorted, as floats). ValueError says what is wrong."""
    temps = [float(t) for t in temperatures or ()]
    if codec["codec"] == "raw":
        if temps:
            raise ValueError("--temperatures is for --codec topk:K (the temperatures whose rest mass is stored); "
                             "a raw cache serves every temperature")
        return None
    k = int(codec["k"])
    if not temps:
        raise ValueError(f"--codec topk:{k} needs --temperatures T[,T...]: the temperatures stage two will train "
                         "at (the rest mass is stored for each, and stage two refuses others)")
    if any(not (t > 0 and np.isfinite(t)) for t in temps):
        raise ValueError(f"--temperatures must be > 0, got {','.join(f'{t:g}' for t in temps)}")
    if k > num_classes:
        raise ValueError(f"--codec topk:{k} keeps more logits than the dataset's {num_classes} classes: "
                         f"use K <= {num_classes}, or --codec raw")
    return {"codec": "topk", "k": k, "temperatures": sorted(set(temps))}


def logits_record(ident: dict) -> dict:
    """The manifest's ``logits`` for a dump identity: codec, dtype and the codec's fields."""
    return {"codec": "raw", "dtype": ident["logits_dtype"], **(ident.get("logits_codec") or {})}


def describe_codec(logits: dict) -> str:
    """One phrase for ``inspect`` and messages: "raw" or "topk:3 (temperatures 1, 4)"."""
    if logits.get("codec") == "topk":
        return f"topk:{logits['k']} (temperatures {', '.join(f'{t:g}' for t in logits['temperatures'])})"
    return str(logits.get("codec"))


def declared_temperature(logits: dict, t: float) -> int | None:
    """Index of temperature t among a top-k cache's declared ones (to float rounding), or None."""
    for j, d in enumerate(logits["temperatures"]):
        if abs(float(t) - d) <= 1e-6 * max(1.0, abs(d)):
            return j
    return None


def encode_topk(logits: np.ndarray, k: int, temperatures) -> dict[str, np.ndarray]:
    """The topk columns of float32 logits (rows, C): the k largest per row in decreasing order (a stable
    sort: ties keep the lower class first, as argmax), their classes, and per temperature T the log-sum-exp
    of the other logits divided by T (float64 inside; -inf when k = C)."""
    lg = np.asarray(logits, dtype=np.float32)
    order = np.argsort(-lg, axis=1, kind="stable")
    idx = order[:, :k]
    rest = np.take_along_axis(lg, order[:, k:], 1).astype(np.float64)
    lse = np.full((len(lg), len(temperatures)), -np.inf, dtype=np.float64)
    if rest.shape[1]:
        for j, t in enumerate(temperatures):
            z = rest / float(t)
            top = z.max(axis=1, keepdims=True)
            lse[:, j] = (top + np.log(np.exp(z - top).sum(axis=1, keepdims=True)))[:, 0]
    return {"logits_topk_values": np.take_along_axis(lg, idx, 1), "logits_topk_indices": idx.astype(np.int64),
            "logits_topk_rest": lse.astype("<f4")}


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


def row_bytes(m: dict, codec: str | None = None) -> int:
    """Bytes one (view, sample) row takes in the shards of a cache whose manifest (or dump identity) is m
    (codec: the manifest's unless given), its cached features included."""
    codec = codec or _logits_record(m)["codec"]
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
