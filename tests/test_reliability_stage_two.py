"""Stage two checks the cache's identity before training, opens it read-only, and several
train-student processes share one cache (issue 3)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

from test_reliability_helpers import (assert_one_line_error, dump_args, files_digest, kdpipe_cmd, mnist_npz,
                                      rewrite_manifest, run_cli, run_kdpipe, save_teacher, subprocess_env)

N, N_TEST = 300, 60


def _dumped(root: Path, seed: int = 0) -> SimpleNamespace:
    """Its own npz (so a test may change it) and a finished cache of it: 300 samples x 2 views."""
    npz = mnist_npz(root / "data.npz", N, N_TEST)
    teacher = save_teacher(root / "teacher.pt", seed=seed)
    cache = root / "cache"
    res = run_cli(dump_args(teacher, npz, cache, 2, 200, seed))
    assert res.exit_code == 0, res.output
    return SimpleNamespace(root=root, npz=npz, teacher=teacher, cache=cache)


def _train_args(cache: Path, runs: Path, *extra) -> list[str]:
    return ["train-student", "--cache", str(cache), "--student", "mlp_100", "--epochs", "2", "--batch-size", "64",
            "--device", "cpu", "--out", str(runs), *extra]


def _rewrite_npz(path: Path, edit) -> None:
    with np.load(path) as z:
        arrays = {k: z[k].copy() for k in z.files}
    edit(arrays)
    np.savez(path, **arrays)


def _subset(a):
    for k in ("x_train", "y_train"):
        a[k] = a[k][:250]


def _one_pixel(a):
    a["x_train"][123, 5, 5] ^= 1


def _eleven_classes(a):
    a["class_names"] = np.array([str(i) for i in range(11)])


def _test_split(a):
    a["x_test"][0, 0, 0] ^= 1


DATA_CHANGES = {  # how the data at the cache's path changed -> what the refusal names
    "a different copy": (_one_pixel, ["the dataset does not match cache", "fingerprint: cache has "]),
    "a subset": (_subset, ["num_samples: cache has 300, given 250", "fingerprint"]),
    # (class 10 has no train sample: refused by the label check before the fingerprint is compared)
    "other number of classes": (_eleven_classes, ["no train sample has class(es) 10 of 0..10"]),
    "another test split": (_test_split, ["the test split of",
                                         "differs from the one the cache's teacher was evaluated on"]),
}


@pytest.mark.parametrize("change", list(DATA_CHANGES))
def test_stage_two_refuses_data_that_is_not_the_caches(tmp_path, change):
    d = _dumped(tmp_path)
    edit, fragments = DATA_CHANGES[change]
    _rewrite_npz(d.npz, edit)
    res = run_cli(_train_args(d.cache, tmp_path / "runs"))
    assert_one_line_error(res, *fragments)
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "a refused run wrote under --out"


MANIFEST_CHANGES = {  # a cache written by a newer kdpipe (manifest consistent with its checksum)
    "view op version": (lambda m: m["views"]["ops"][0].update(version=2),
                        ["the cache's view op crop is version 2, this kdpipe replays version 1"]),
    "unknown view op": (lambda m: m["views"]["ops"][0].update(name="mixup-v9"), ["unknown view op 'mixup-v9'"]),
    "format version": (lambda m: m.update(format_version=3),
                       ["has cache format version 3; this kdpipe reads version 1 (upgrade kdpipe)"]),
    "number of classes": (lambda m: m["dataset"].update(num_classes=100),
                          ["num_classes: cache has 100, given 10"]),
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> SimpleNamespace:
    return _dumped(tmp_path_factory.mktemp("stage-two"))


@pytest.mark.parametrize("change", list(MANIFEST_CHANGES))
def test_stage_two_refuses_a_cache_it_cannot_read_right(shared, tmp_path, change):
    cache = Path(shutil.copytree(shared.cache, tmp_path / "cache"))
    edit, fragments = MANIFEST_CHANGES[change]
    rewrite_manifest(cache, edit)
    res = run_cli(_train_args(cache, tmp_path / "runs"))
    assert_one_line_error(res, *fragments)
    assert not (tmp_path / "runs").exists()



def test_logits_that_turned_nan_or_inf_on_disk_stop_training_naming_the_shard(shared, tmp_path):
    """Stage two does not re-hash the shards, so damage after the dump can reach it; a dump never writes NaN
    or Inf logits, though, so those are damage for sure. Training on them diverged and blamed the learning
    rate; it stops at the epoch that reads them, naming the rows and shards and verify-cache."""
    cache = Path(shutil.copytree(shared.cache, tmp_path / "cache"))
    for name, rel, value in (("shard-00001.h5", 50, b"\x00\x7c"), ("shard-00002.h5", 60, b"\x00\x7e")):  # Inf, NaN
        path = cache / name
        with h5py.File(path, "r") as f:
            at = f["logits"].id.get_offset() + rel * f["logits"].shape[1] * 2
        raw = bytearray(path.read_bytes())
        raw[at:at + 2] = value
        path.write_bytes(bytes(raw))
    res = run_cli(_train_args(cache, tmp_path / "runs"))
    assert_one_line_error(res, "holds NaN or Inf teacher logits in 1 row(s) of view 0 (rows 250 in shard-00001.h5)",
                          f"run kdpipe verify-cache {cache}")
    assert not list((tmp_path / "runs").glob("*/metrics.json"))
    shutil.copy(shared.cache / "shard-00001.h5", cache / "shard-00001.h5")  # the second epoch reads view 1
    res = run_cli(_train_args(cache, tmp_path / "runs2"))  # after the first epoch's progress lines
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "of view 1 (rows 460 in shard-00002.h5)" in res.stderr.strip().splitlines()[-1]
    assert not list((tmp_path / "runs2").glob("*/metrics.json"))


def test_view_parameters_that_no_view_draws_stop_training_naming_the_rows(shared, tmp_path):
    """A flipped byte in a shard's view_params made a crop shift beyond its padding: train-student died in an
    IndexError traceback inside the replay (and a rotation beyond the spec's would have trained silently).
    Every epoch's parameters are checked against the ranges the cache's view ops draw, in one line."""
    from kdpipe import KDPipeError
    from kdpipe.cache.reader import Cache
    from kdpipe.student import CachedViews
    cache = Path(shutil.copytree(shared.cache, tmp_path / "cache"))
    path = cache / "shard-00001.h5"
    with h5py.File(path, "r") as f:
        at = f["view_params"].id.get_offset() + 50 * f["view_params"].shape[1] * 4 + 3  # row 250's dy, high byte
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))
    res = run_cli(_train_args(cache, tmp_path / "runs"))
    assert_one_line_error(res, "holds view parameters that its views (crop:4+flip) never draw in 1 row(s) of view 0 "
                          "(rows 250 in shard-00001.h5)", f"run kdpipe verify-cache {cache}")
    assert not list((tmp_path / "runs").glob("*/metrics.json"))
    views = CachedViews(Cache(cache), torch.device("cpu"))  # a rank's rows are checked as well
    views(0, torch.arange(0, 100))
    with pytest.raises(KDPipeError, match="rows 250 in shard-00001.h5"):
        views(0, torch.arange(240, 260))


def _other_dumps(root: Path, shared) -> dict:
    """Two other caches of the shared cache's data: another view seed (same shard sizes), other shard rows."""
    out = {}
    for name, seed, rows in (("seed1", 1, 200), ("rows150", 0, 150)):
        res = run_cli(dump_args(shared.teacher, shared.npz, root / name, 2, rows, seed))
        assert res.exit_code == 0, res.output
        out[name] = root / name
    return out


SHARD_DAMAGE = {  # what happened to shard-00001.h5 (rows 200..399) after the dump -> what the refusal names
    "from another cache": (lambda c, o: shutil.copy(o["seed1"] / "shard-00001.h5", c / "shard-00001.h5"),
                           "is a shard of another cache"),
    "from a cache of other shard rows": (
        lambda c, o: shutil.copy(o["rows150"] / "shard-00001.h5", c / "shard-00001.h5"), "is a shard of another cache"),
    "truncated": (lambda c, o: os.truncate(c / "shard-00001.h5", 3000), "does not open as HDF5 (Unable to"),
    "deleted": (lambda c, o: (c / "shard-00001.h5").unlink(), "is missing"),
}


def test_a_shard_that_is_not_the_dumps_is_refused_naming_it_and_verify_cache(shared, tmp_path):
    """Stage two does not re-hash the shards, but it checks that each one is a shard of this cache (it opens,
    its attributes name the cache id and rows) before reading it. A shard of another cache with the same shape
    was trained on silently (its rows taken for this cache's), one of another shard size ended in an IndexError
    traceback, a truncated or missing one in a line that did not say what to do."""
    others = _other_dumps(tmp_path / "others", shared)
    for i, (change, (damage, words)) in enumerate(SHARD_DAMAGE.items()):
        cache = Path(shutil.copytree(shared.cache, tmp_path / f"cache{i}"))
        damage(cache, others)
        res = run_cli(_train_args(cache, tmp_path / f"runs{i}"))
        assert_one_line_error(res, f"shard-00001.h5 (rows 200..399 of cache {cache}) {words}",
                              f"run kdpipe verify-cache {cache}")
        assert not list((tmp_path / f"runs{i}").glob("*/metrics.json")), change


def test_an_eval_file_of_another_cache_is_refused_naming_it_and_verify_cache(shared, tmp_path):
    """eval.h5 (the teacher's test logits, which agreement is measured against) is checked as a shard is: one
    copied in from a cache of another teacher was read as this teacher's test logits without a word."""
    from kdpipe import KDPipeError
    from kdpipe.cache.reader import Cache
    other = tmp_path / "other"
    res = run_cli(dump_args(save_teacher(tmp_path / "t1.pt", seed=1), shared.npz, other, 2, 200, 0))
    assert res.exit_code == 0, res.output
    cache = Path(shutil.copytree(shared.cache, tmp_path / "cache"))
    shutil.copy(other / "eval.h5", cache / "eval.h5")
    with pytest.raises(KDPipeError, match="is the eval file of another cache"):
        Cache(cache).read_test_logits()
    res = run_cli(_train_args(cache, tmp_path / "runs"))
    assert_one_line_error(res, f"eval.h5 (the test logits of cache {cache}) is the eval file of another cache",
                          f"run kdpipe verify-cache {cache}")
    assert not list((tmp_path / "runs").glob("*/metrics.json"))


def test_stage_two_opens_the_cache_read_only(shared, tmp_path, monkeypatch):
    """Every HDF5 open during training is read-only without file locking, and no file of the cache
    changes (contents or modification times)."""
    before = files_digest(shared.cache)
    modes = []
    real = h5py.File

    def spy(name, mode="r", *a, **kw):
        if str(name).startswith(str(shared.cache)):
            modes.append((mode, kw.get("locking")))
        return real(name, mode, *a, **kw)
    monkeypatch.setattr(h5py, "File", spy)
    res = run_cli(_train_args(shared.cache, tmp_path / "runs"))
    assert res.exit_code == 0, res.output
    assert modes and set(modes) == {("r", False)}
    assert files_digest(shared.cache) == before


def _read_only_bind(src: Path, dst: Path) -> bool:
    """A read-only bind mount of src at dst (a file system that refuses every write); False if not allowed."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    dst.mkdir()
    if subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True).returncode:
        return False
    if subprocess.run(["mount", "-o", "remount,bind,ro", str(dst)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(dst)], capture_output=True)
        return False
    return True


def test_the_same_dump_on_a_finished_read_only_cache_says_it_is_complete(shared, tmp_path):
    """A finished cache on a read-only file system (skipped where mounting is not allowed): running its dump
    again (a pipeline rerun) needs nothing written, and says the cache is complete. Before, it stopped on the
    lock file it could not create ('cannot create the lock file ...: Read-only file system'), as if the cache
    were unusable. A dump with other arguments is still refused."""
    ro = tmp_path / "ro-cache"
    if not _read_only_bind(shared.cache, ro):
        pytest.skip("cannot mount read-only here (needs root and mount permission)")
    try:
        before = files_digest(shared.cache)
        res = run_cli(dump_args(shared.teacher, shared.npz, ro, 2, 200, 0))
        assert res.exit_code == 0, res.output
        assert f"{ro} is already complete (600 rows) and read-only: nothing to do" in res.output
        assert_one_line_error(run_cli(dump_args(shared.teacher, shared.npz, ro, 2, 200, 5)), "Read-only file system")
        assert files_digest(shared.cache) == before
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_four_concurrent_students_on_one_cache_with_locks_held(shared, tmp_path):
    """4 train-student processes at once on one cache, two with HDF5_USE_FILE_LOCKING unset and two
    with it FALSE, while another process holds an exclusive lock on every file of the cache (as on a
    file system where HDF5's locking fails) and, where mounting is allowed, through a read-only
    mount: all succeed, with identical losses, accuracies and weights; the cache is unchanged. A fifth
    with HDF5_USE_FILE_LOCKING=TRUE (which overrides kdpipe's locking=False, and which kdpipe leaves
    alone) is refused with one line that says to unset it."""
    before = files_digest(shared.cache)
    ro = tmp_path / "ro-cache"
    cache = ro if _read_only_bind(shared.cache, ro) else shared.cache
    locks = []
    try:
        for p in sorted(shared.cache.glob("*.h5")):
            fh = open(p, "rb")
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locks.append(fh)
        # The locks are real: a reader that locks is refused.
        with pytest.raises(OSError):
            h5py.File(cache / "shard-00000.h5", "r", locking=True).close()
        procs = []
        for i, locking in enumerate([None, None, "FALSE", "FALSE"]):
            procs.append(subprocess.Popen(kdpipe_cmd(_train_args(cache, tmp_path / f"runs{i}")), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True,
                                          env=subprocess_env(HDF5_USE_FILE_LOCKING=locking)))
        outs = [p.communicate(timeout=300) for p in procs]
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err
        refused = run_kdpipe(_train_args(cache, tmp_path / "runs-locking"), HDF5_USE_FILE_LOCKING="TRUE")
        assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr
        assert "HDF5_USE_FILE_LOCKING=TRUE" in refused.stderr and "unset HDF5_USE_FILE_LOCKING" in refused.stderr
    finally:
        for fh in locks:
            fh.close()
        if cache == ro:
            subprocess.run(["umount", "-l", str(ro)], capture_output=True)
    assert not list((tmp_path / "runs-locking").rglob("metrics.json"))
    runs = [next((tmp_path / f"runs{i}").iterdir()) for i in range(4)]
    metrics = [json.loads((r / "metrics.json").read_text()) for r in runs]
    for m in metrics[1:]:
        for key in ("train_loss", "test_top1", "teacher_agreement"):
            assert m[key] == metrics[0][key], key
    weights = [torch.load(r / "student.pt", weights_only=True)["state_dict"] for r in runs]
    for w in weights[1:]:
        assert all(torch.equal(w[k], weights[0][k]) for k in weights[0])
    assert files_digest(shared.cache) == before
