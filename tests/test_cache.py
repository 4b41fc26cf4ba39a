"""The cache contract: what stage two reads is what stage one wrote (memory map and h5py fallback),
shards readable with plain h5py and self-describing, a manifest that records the cache's identity,
and clear refusals of what is not a (matching, finished) cache."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil

import h5py
import numpy as np
import pytest
import torch

import kdpipe.cache.reader as reader_mod
from kdpipe import KDPipeError
from kdpipe.cache import format as fmt
from kdpipe.cache.reader import Cache, CachedLogitsDataset, read_manifest
from kdpipe.data import load_dataset
from kdpipe.views import create_policy

from conftest import quiet


def expected_rows(cache_fx):
    """Every dataset of the whole cache as stage one meant it, in row order, from first principles."""
    n, k = len(cache_fx.train), cache_fx.views
    rows = np.arange(n * k)
    params = np.concatenate([cache_fx.policy.sample_view(cache_fx.seed, v, cache_fx.train.images.shape)
                             for v in range(k)])
    return {"logits": cache_fx.captured.outputs.numpy().astype(np.float16),
            "sample_index": rows % n, "view_index": rows // n, "labels": cache_fx.train.labels[rows % n],
            "view_params": params}


def chunked_copy(src, dst):
    """A copy of a cache whose shards hold chunked, gzip-compressed datasets (not memory-mappable)."""
    shutil.copytree(src, dst)
    for shard in sorted(dst.glob("shard-*.h5")):
        tmp = shard.with_name("chunked.tmp")
        with h5py.File(shard, "r") as fi, h5py.File(tmp, "w") as fo:
            for key, val in fi.attrs.items():
                fo.attrs[key] = val
            for name, d in fi.items():
                data = d[()]
                o = fo.create_dataset(name, data=data, chunks=(min(64, len(data)),) + data.shape[1:],
                                      compression="gzip")
                for key, val in d.attrs.items():
                    o.attrs[key] = val
        os.replace(tmp, shard)
    return dst


@pytest.fixture
def memmap_calls(monkeypatch):
    calls = []
    real = np.memmap

    def spy(*a, **kw):
        calls.append(a[0])
        return real(*a, **kw)

    monkeypatch.setattr(reader_mod.np, "memmap", spy)
    return calls


# ---------------------------------------------------------------- round trip

def test_round_trip_through_the_memory_map(cache, memmap_calls):
    c = Cache(cache.path)
    want = expected_rows(cache)
    n = len(cache.train)
    assert len(c.manifest["shards"]) == 4  # 1536 rows in shards of 500: boundaries inside views
    for i in range(len(c.manifest["shards"])):
        for name in (col.name for col in fmt.shard_columns("raw")):
            assert c._dataset_layout(i, name)[0] is not None, f"shard {i} {name} is not mappable"
    for v in range(cache.views):
        for name, full in want.items():
            got = c.read_view(v, name)
            assert got.dtype == fmt.SHARD_COLUMNS[name].np_dtype(c.manifest)
            np.testing.assert_array_equal(got, full[v * n:(v + 1) * n], err_msg=f"{name} view {v}")
    for start, stop in ((0, 1536), (450, 1100), (499, 501), (1500, 1536), (700, 700)):
        for name, full in want.items():
            np.testing.assert_array_equal(c.read(name, start, stop), full[start:stop])
    assert memmap_calls and all(str(getattr(p, "name", p)).endswith(".h5") for p in memmap_calls)  # a path or open file
    with pytest.raises(IndexError):
        c.read("logits", 0, 1537)
    with pytest.raises(IndexError):
        c.read_view(3, "logits")


def test_round_trip_through_the_h5py_fallback(cache, tmp_path, monkeypatch):
    copy = chunked_copy(cache.path, tmp_path / "chunked")

    def no_memmap(*a, **kw):
        raise AssertionError("a chunked, compressed dataset must not be memory-mapped")

    monkeypatch.setattr(reader_mod.np, "memmap", no_memmap)
    c = Cache(copy)
    want = expected_rows(cache)
    n = len(cache.train)
    for i in range(len(c.manifest["shards"])):
        assert c._dataset_layout(i, "logits")[0] is None
    for v in range(cache.views):
        for name, full in want.items():
            np.testing.assert_array_equal(c.read_view(v, name), full[v * n:(v + 1) * n], err_msg=f"{name} view {v}")
    np.testing.assert_array_equal(c.read("logits", 450, 1100), want["logits"][450:1100])


def test_rows_as_a_torch_dataset_in_worker_processes(cache):
    ds = CachedLogitsDataset(cache.path)
    want = expected_rows(cache)
    assert len(ds) == 1536
    for r in (0, 499, 500, 1023, 1535):
        s, v, y, lg, p = ds[r]
        assert (s, v, y) == (want["sample_index"][r], want["view_index"][r], want["labels"][r])
        assert lg.dtype == torch.float32
        assert torch.equal(lg, torch.from_numpy(want["logits"][r].astype(np.float32)))
        assert torch.equal(p, torch.from_numpy(want["view_params"][r]))
    # as a list: ds[-1] is the last row (it was an IndexError), out of range and non-integers refused
    for neg, pos in ((-1, 1535), (-1536, 0)):
        assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(ds[neg], ds[pos]))
    assert ds[np.int64(7)][0] == ds[torch.tensor(7)][0] == want["sample_index"][7]
    for bad, error in ((1536, IndexError), (-1537, IndexError), (1.0, TypeError), (slice(0, 2), TypeError)):
        with pytest.raises(error):
            ds[bad]
    clone = pickle.loads(pickle.dumps(ds))  # no open file travels with it
    assert clone.cache._layout == {} and clone.cache._kept == {} and ds.cache._kept
    rows = [3, 498, 499, 500, 1200, 1535]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, rows), batch_size=3, num_workers=2)
    got = torch.cat([b[3] for b in loader])
    assert torch.equal(got, torch.from_numpy(want["logits"][rows].astype(np.float32)))


def test_float32_cache_holds_the_teachers_logits_exactly(fmnist, teacher_ckpt, capture_dump, tmp_path):
    train = load_dataset(fmnist.spec, "train")
    cap = capture_dump(teacher_ckpt, train, None, tmp_path / "c32", policy=create_policy("crop-flip"), views=1,
                       logits_dtype="float32")
    c = Cache(tmp_path / "c32")
    got = c.read_view(0, "logits")
    assert got.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(got, cap.outputs.numpy())
    assert c.manifest["eval"] is None and c.read_test_logits() is None


# ---------------------------------------------------------------- the files themselves

def test_rows_read_one_by_one_keep_a_bounded_number_of_shard_maps(cache, monkeypatch):
    """A map made and dropped for every column of every row held a DataLoader worker to about 2,000 rows/s (11,000
    with the maps kept, measured). Each shard is mapped once; at most KEPT_MAPS stay open, the least recently read
    closed first; every row reads as Cache.read gives it."""
    monkeypatch.setattr(reader_mod, "KEPT_MAPS", 2)
    ds, plain = CachedLogitsDataset(cache.path), Cache(cache.path)
    order = np.random.default_rng(0).permutation(len(ds))
    for r in order[:300]:
        s, v, y, lg, p = ds[int(r)]
        assert (s, v) == (plain.read("sample_index", r, r + 1)[0], plain.read("view_index", r, r + 1)[0])
        assert torch.equal(lg, torch.from_numpy(plain.read("logits", r, r + 1)[0].astype(np.float32)))
        assert torch.equal(p, torch.from_numpy(plain.read("view_params", r, r + 1)[0]))
        assert 1 <= len(ds.cache._kept) <= 2
    assert plain._kept == {}  # a reader of whole views maps and drops, as before


def test_shards_open_with_plain_h5py_and_describe_every_dataset(cache):
    m = json.loads((cache.path / "manifest.json").read_text())
    for entry in m["shards"]:
        path = cache.path / entry["file"]
        with h5py.File(path, "r") as f:
            assert set(f.keys()) == {col.path for col in fmt.shard_columns("raw")}
            assert f.attrs["cache_id"] == m["cache_id"]
            assert f.attrs["kdpipe_format_version"] == fmt.FORMAT_VERSION
            assert (int(f.attrs["row_start"]), int(f.attrs["row_stop"])) == (entry["row_start"], entry["row_stop"])
            rows = entry["row_stop"] - entry["row_start"]
            for name, d in f.items():
                desc = d.attrs["description"]
                assert isinstance(desc, str) and len(desc) > 20 and desc == fmt.SHARD_COLUMNS[name].description
                assert d.shape[0] == rows
                assert d.chunks is None and d.compression is None, f"{name} must be contiguous and uncompressed"
                assert d.dtype.str[0] in "<|", f"{name} has dtype {d.dtype.str}"
                if d.dtype.itemsize > 1:
                    assert d.id.get_type().get_order() == h5py.h5t.ORDER_LE
                data = d[()]
                # The bytes lie in the file as-is: a plain np.memmap at the dataset's offset reads them.
                mm = np.memmap(path, dtype=d.dtype, mode="r", offset=d.id.get_offset(), shape=d.shape)
                np.testing.assert_array_equal(np.asarray(mm), data)
                digest = hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()
                assert d.attrs["sha256"] == digest == entry["sha256"][name]
            assert json.loads(f["view_params"].attrs["columns"]) == ["dy", "dx", "flip"]
            assert f["logits"].shape[1] == 10 and f["logits"].dtype == np.dtype("<f2")
        assert path.stat().st_size == entry["bytes"]
    with h5py.File(cache.path / fmt.EVAL_FILE, "r") as f:
        for col in fmt.EVAL_COLUMNS.values():
            assert f[col.path].attrs["description"] == col.description
        np.testing.assert_array_equal(f["test_labels"][()], cache.test.labels)
        assert f["test_logits"].shape == (len(cache.test), 10) and f["test_logits"].dtype == np.dtype("<f4")


def test_manifest_records_the_caches_identity(cache, teacher_ckpt):
    m = read_manifest(cache.path)
    assert m["format_version"] == fmt.FORMAT_VERSION
    assert m["teacher"]["fingerprint"] == hashlib.sha256(teacher_ckpt.read_bytes()).hexdigest()
    assert m["teacher"]["arch"] == "cnn_small" and m["teacher"]["kind"] == "kdpipe"
    assert m["teacher"]["num_classes"] == 10 and m["teacher"]["parameters"] > 0
    d = m["dataset"]
    assert (d["spec"], d["split"], d["num_samples"]) == (f"npz:{cache.train.source}", "train", 512)
    assert d["fingerprint"] == cache.train.fingerprint and d["image_shape"] == [1, 28, 28]
    v = m["views"]
    assert (v["spec"], v["seed"], v["K"], v["columns"]) == ("crop:2+flip", 7, 3, ["dy", "dx", "flip"])
    assert [(op["name"], op["options"], op["version"], op["columns"]) for op in v["ops"]] == \
        [("crop", {"padding": 2}, 1, ["dy", "dx"]), ("flip", {}, 1, ["flip"])]
    assert m["num_classes"] == 10 and m["rows"] == 1536 and m["row_order"] == "view-major"
    assert m["logits"] == {"codec": "raw", "dtype": "float16"}
    assert [(s["file"], s["row_start"], s["row_stop"]) for s in m["shards"]] == [
        ("shard-00000.h5", 0, 500), ("shard-00001.h5", 500, 1000), ("shard-00002.h5", 1000, 1500),
        ("shard-00003.h5", 1500, 1536)]
    assert m["torch_version"] == torch.__version__ and m["kdpipe_version"]
    ckpt = torch.load(teacher_ckpt, weights_only=True)
    assert m["input"] == {"mean": ckpt["mean"], "std": ckpt["std"], "shape": [1, 28, 28],
                          "normalization": {"source": "checkpoint", "value": None}}
    assert m["bytes"] == sum(s["bytes"] for s in m["shards"]) + m["eval"]["bytes"]
    # The summary's accuracies are those of the stored logits.
    c = Cache(cache.path)
    lg = c.read("logits", 0, c.rows).astype(np.float32)
    assert m["dump"]["views_top1"] == pytest.approx(float((lg.argmax(1) == c.read("labels", 0, c.rows)).mean()))
    assert m["teacher"]["test_top1"] == pytest.approx(float((c.read_test_logits().argmax(1) == cache.test.labels).mean()))
    assert m["dump"]["views_top1"] > 0.3  # the tiny teacher learned something
    # The manifest came last, and no temporary file is left.
    newest_shard = max((cache.path / s["file"]).stat().st_mtime_ns for s in m["shards"])
    assert (cache.path / "manifest.json").stat().st_mtime_ns >= newest_shard
    assert not list(cache.path.glob(".*tmp*"))


# ---------------------------------------------------------------- refusals

def test_a_directory_that_is_not_a_cache_is_refused(tmp_path, cache):
    with pytest.raises(KDPipeError, match="does not exist"):
        Cache(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KDPipeError, match="not a kdpipe cache"):
        Cache(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(KDPipeError, match="is a file"):
        Cache(tmp_path / "file")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(cache.path / "dump.json", unfinished / "dump.json")
    shutil.copy(cache.path / "shard-00000.h5", unfinished / "shard-00000.h5")
    with pytest.raises(KDPipeError, match="unfinished cache.*run the same dump-logits command again"):
        Cache(unfinished)


def _edited_copy(cache, tmp_path, edit):
    dst = tmp_path / "edited"
    shutil.copytree(cache.path, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    if "checksum" in m and hasattr(fmt, "manifest_checksum"):
        m["checksum"] = fmt.manifest_checksum(m)  # as a (buggy or foreign) writer would have written it
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format_version=2), "format version 2.*upgrade kdpipe"),
    (lambda m: m.update(format_version=0), "format version 0.*dump it again"),
    (lambda m: m.pop("shards"), "lacks 'shards'"),
    (lambda m: m["shards"].pop(), "cover 1500 of 1536 rows"),
    (lambda m: m.update(rows=1000), "expected 512 samples x 3 views"),
    (lambda m: m.pop("checksum"), "the manifest does not match its checksum"),  # every release wrote one
])
def test_a_damaged_or_foreign_manifest_is_refused(cache, tmp_path, edit, message):
    with pytest.raises(KDPipeError, match=message):
        Cache(_edited_copy(cache, tmp_path, edit))


def test_a_dataset_that_is_not_the_caches_is_refused(cache, fmnist, tmp_path):
    c = Cache(cache.path)
    c.check_dataset(cache.train)  # the right one passes
    with pytest.raises(KDPipeError, match="num_samples: cache has 512, given 100.*fingerprint"):
        c.check_dataset(cache.train.subset(100))
    x = fmnist.x_train.copy()
    x[0, 0, 0] ^= 0x80
    p = tmp_path / "other.npz"
    np.savez(p, x_train=x, y_train=fmnist.y_train, x_test=fmnist.x_test, y_test=fmnist.y_test)
    with pytest.raises(KDPipeError, match="fingerprint") as e:
        c.check_dataset(load_dataset(f"npz:{p}", "train"))
    assert "num_samples" not in str(e.value)


def test_a_shard_entry_without_its_file_digest_is_a_fault(cache, tmp_path):
    """Every released kdpipe recorded file_sha256: an entry without one (a foreign writer's) is not trusted."""
    dst = _edited_copy(cache, tmp_path, lambda m: m["shards"][1].pop("file_sha256"))
    assert Cache(dst).verify_checksums() == [
        "shard-00001.h5 (rows 500..999): the manifest records no file_sha256 for it (not written by a released kdpipe)"]


def test_checksums_find_a_flipped_byte(cache, tmp_path):
    assert Cache(cache.path).verify_checksums() == []
    dst = tmp_path / "flipped"
    shutil.copytree(cache.path, dst)
    with h5py.File(dst / "shard-00002.h5", "r") as f:
        off = f["logits"].id.get_offset()
    with open(dst / "shard-00002.h5", "r+b") as fh:
        fh.seek(off + 123)
        b = fh.read(1)
        fh.seek(off + 123)
        fh.write(bytes([b[0] ^ 0x01]))
    faults = Cache(dst).verify_checksums()
    assert len(faults) == 1
    assert "shard-00002.h5" in faults[0] and "logits" in faults[0] and "rows 1000..1499" in faults[0]


def test_dump_refuses_a_teacher_for_other_classes(fmnist, teacher_ckpt, tmp_path):
    from kdpipe.checkpoint import load_teacher
    from kdpipe.teacher import dump_logits
    p = tmp_path / "five.npz"
    np.savez(p, x_train=fmnist.x_train[:64], y_train=fmnist.y_train[:64] % 5, x_test=fmnist.x_test[:32],
             y_test=fmnist.y_test[:32] % 5)
    data = load_dataset(f"npz:{p}", "train")
    with pytest.raises(KDPipeError, match="predicts 10 classes.*has 5"):
        dump_logits(load_teacher(teacher_ckpt), data, None, tmp_path / "c", policy=create_policy("none"),
                    views=1, log=quiet)
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------- columns: groups, codecs, unknown columns

def _probe(m, start, stop):
    """A test-only column that follows from the manifest: (3 * sample, view) of each row."""
    rows = np.arange(start, stop, dtype=np.int64)
    n = int(m["dataset"]["num_samples"])
    return np.stack([3 * (rows % n), rows // n], axis=1)


PROBE = fmt.Column("probe", np.dtype("<i8"), lambda m: (2,), "A test-only column in a group, (3 * sample, view).",
                   path="features/probe", required=False, recompute=_probe)


@pytest.fixture
def probe_column():
    """PROBE declared through the same table as the built-in columns, for this test only."""
    fmt.register(PROBE)
    try:
        yield PROBE
    finally:
        del fmt.SHARD_COLUMNS[PROBE.name]


def test_a_column_in_a_group_is_written_read_checksummed_and_verified(fmnist, teacher_ckpt, capture_dump, tmp_path,
                                                                      probe_column):
    """A declared column under features/<layer>: the writer fills it from its declaration, the layout
    and checksums name it at its full path, the reader and inspect find it, verify-cache compares it
    row by row and locates damage in it; a reader that does not know it (optional) ignores it."""
    from click.testing import CliRunner

    from kdpipe.cli import main
    from kdpipe.verify import verify_cache
    train = load_dataset(fmnist.spec, "train").subset(100)
    out = tmp_path / "grouped"
    capture_dump(teacher_ckpt, train, None, out, policy=create_policy("crop-flip"), views=2, shard_rows=64)
    c = Cache(out)
    m = c.manifest
    assert {"name": "probe", "path": "features/probe", "required": False} in m["columns"]
    for s in m["shards"]:
        assert "features/probe" in s["layout"] and "features/probe" in s["sha256"]
        with h5py.File(out / s["file"], "r") as f:
            d = f["features/probe"]
            assert d.chunks is None and d.attrs["description"] == PROBE.description
            assert d.attrs["sha256"] == s["sha256"]["features/probe"]
            off, nbytes = s["layout"]["features/probe"]
            assert (off, nbytes) == (d.id.get_offset(), d.id.get_storage_size())
    np.testing.assert_array_equal(c.read("probe", 0, c.rows), _probe(m, 0, c.rows))
    np.testing.assert_array_equal(c.read_view(1, "probe")[:, 0], 3 * np.arange(100))
    assert verify_cache(out, log=quiet) == []
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0 and "features/probe <i8[64, 2]" in r.output, r.output

    # Damage to the group's values: the checksum pass names the dataset, the row check the row.
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    s = m["shards"][1]
    off = s["layout"]["features/probe"][0]
    with open(bad / s["file"], "r+b") as fh:
        fh.seek(off + 5 * 16)  # row 5 of the shard, first value
        fh.write(np.int64(-1).tobytes())
    faults = verify_cache(bad, log=quiet)
    assert any(f.startswith("shard-00001.h5 (rows 64..127): dataset features/probe checksum mismatch") for f in faults)
    assert any("dataset features/probe is wrong in 1 row(s): 69" in f for f in faults), faults

    # A version that does not know this optional column reads the cache and verifies it.
    del fmt.SHARD_COLUMNS["probe"]
    try:
        c = Cache(out)
        assert "probe" not in c.shard_columns and verify_cache(out, log=quiet) == []
        assert len(CachedLogitsDataset(out)[3]) == 5
    finally:
        fmt.register(PROBE)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["logits"].update(codec="pq8"), "its logits codec 'pq8' is unknown to this kdpipe, which reads raw, topk"),
    (lambda m: m["columns"].append({"name": "mix_partner", "path": "mix_partner", "required": True}),
     "needs column(s) mix_partner, which this kdpipe does not know"),
    (lambda m: m.update(columns=[c for c in m["columns"] if c["name"] != "logits"]),
     "lacks column(s) logits, which its codec 'raw' needs"),
])
def test_a_cache_of_an_unknown_codec_or_required_column_is_refused_by_name(cache, tmp_path, edit, message):
    from kdpipe.verify import verify_cache
    dst = _edited_copy(cache, tmp_path, edit)
    for read in (Cache, CachedLogitsDataset, lambda p: verify_cache(p, log=quiet)):
        with pytest.raises(KDPipeError, match=f"cannot be read by kdpipe .*{re.escape(message)}.*upgrade kdpipe") as e:
            read(dst)
        assert "\n" not in str(e.value)


def test_an_unknown_optional_column_is_ignored(cache, tmp_path):
    dst = _edited_copy(cache, tmp_path, lambda m: m["columns"].append(
        {"name": "features_penultimate", "path": "features/penultimate", "required": False}))
    c = Cache(dst)
    assert list(c.shard_columns) == [col.name for col in fmt.shard_columns("raw")]
    np.testing.assert_array_equal(c.read_view(0, "logits"), Cache(cache.path).read_view(0, "logits"))


def test_shards_of_large_rows_are_held_to_shard_bytes(fmnist, teacher_ckpt, tmp_path, monkeypatch):
    """--shard-rows 65536 of rows of many classes or of large cached features made shards of gigabytes, each built
    in memory before it is written (about five times its size: 10 GB of RAM for 32 KB rows). Such shards now hold
    SHARD_BYTES at most, with a note; the cache reads as any other."""
    import kdpipe.teacher as teacher_mod
    from kdpipe.checkpoint import load_teacher
    from kdpipe.verify import verify_cache

    data = load_dataset(fmnist.spec, "train")
    policy = create_policy("crop-flip", padding=2)
    row = teacher_mod.planned_size(data, None, policy, 2, "float16")["row_bytes"]
    monkeypatch.setattr(teacher_mod, "SHARD_BYTES", 300 * row + 1)
    said = []
    teacher_mod.dump_logits(load_teacher(teacher_ckpt), data, None, tmp_path / "c", policy=policy, views=2,
                            log=said.append)
    c = Cache(tmp_path / "c")
    assert [sh["row_stop"] - sh["row_start"] for sh in c.manifest["shards"]] == [300] * 3 + [124]
    assert any(f"note: shards of 1,024 rows of {row} bytes would take" in s and "shards of 300 rows instead" in s
               for s in said), said
    assert verify_cache(tmp_path / "c", log=quiet) == []
