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
HDF5 metadata included), ``sha256`` (one digest per dataset, also stored as the dataset's ``sha256``
attribute) and ``layout`` (each dataset's [byte offset, byte count] in the file, so a damaged file
is examined without HDF5); each shard's attributes name its ``cache_id`` and row range. The
manifest's own ``checksum`` is ``manifest_checksum`` of the rest of it, so an edited manifest is
detected. Caches written before these keys existed lack them and are checked without them.

Room to grow without breaking readers of version 1: extra teachers go under
``teachers/<name>/logits`` and are listed in the manifest's ``teachers``; a top-k codec adds
``logits_topk_values``, ``logits_topk_indices`` and ``logits_rest_mass`` (codec "topk");
mixing policies add ``mix_partner`` (int64) and ``mix_weight`` (float32) per row; cached teacher
features go under ``features/<layer>``. Readers ignore datasets they do not know.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DUMP_STATE = "dump.json"
EVAL_FILE = "eval.h5"
SHARD_PATTERN = "shard-{:05d}.h5"

LOGITS_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}

# name -> (dtype, trailing shape key, description). Trailing shape: "classes" = (C,), "params" = (P,), None = ().
SHARD_DATASETS = {
    "logits": (None, "classes",
               "Raw (pre-softmax) teacher logits, one row per (view, sample), in the manifest's logits dtype. "
               "Row r is view r // N of sample r % N, N = number of samples."),
    "sample_index": (np.dtype("<i8"), None, "Index of the sample in the dataset split (the manifest's dataset)."),
    "view_index": (np.dtype("<i4"), None, "Index of the view (0..K-1) that this row was computed on."),
    "labels": (np.dtype("<i8"), None, "Ground-truth class of the sample."),
    "view_params": (np.dtype("<i4"), "params",
                    "Replay parameters of this (view, sample), columns named in the attribute 'columns' "
                    "and in the manifest's views.columns; kdpipe.views replays them bit for bit."),
}

EVAL_DATASETS = {
    "test_logits": (np.dtype("<f4"), "classes", "Raw teacher logits on the clean (unaugmented) test split."),
    "test_labels": (np.dtype("<i8"), None, "Ground-truth class of each test sample."),
}


def dataset_dtype(name: str, logits_dtype: str) -> np.dtype:
    dt = SHARD_DATASETS[name][0]
    return LOGITS_DTYPES[logits_dtype] if dt is None else dt


def shard_name(i: int) -> str:
    return SHARD_PATTERN.format(i)


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces), without its "checksum" key."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
