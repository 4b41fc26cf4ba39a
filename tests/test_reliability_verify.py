"""verify-cache catches every kind of damage, naming the shard and rows (issue 3); a teacher that
outputs NaN or Inf stops the dump, naming the samples.

Caches are made in this process (small: 600 samples x 4 views in 12 shards of 200 rows).
"""

from __future__ import annotations

import json
import random
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from test_reliability_helpers import (assert_nothing_partial_reads_as_complete, assert_one_line_error,
                                      assert_same_cache, dump_args, mnist_npz, rewrite_manifest, run_cli,
                                      save_teacher, torchscript_teacher)

N, VIEWS, SHARD_ROWS = 600, 4, 200


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> SimpleNamespace:
    """A sound cache, and a second one of the same data with another seed (shards of the same size)."""
    root = tmp_path_factory.mktemp("verify")
    npz = mnist_npz(root / "mnist-600.npz", N, 100)
    teacher = save_teacher(root / "teacher.pt", seed=0)
    caches = {}
    for name, seed in (("cache", 3), ("other", 4)):
        res = run_cli(dump_args(teacher, npz, root / name, VIEWS, SHARD_ROWS, seed))
        assert res.exit_code == 0, res.output
        caches[name] = root / name
    return SimpleNamespace(root=root, npz=npz, teacher=teacher, **caches)


@pytest.fixture
def cache(made, tmp_path) -> Path:
    """A fresh copy of the sound cache, for a test to damage."""
    return Path(shutil.copytree(made.cache, tmp_path / "cache"))


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (HDF5 can loop forever on damaged metadata: verify must never open it)."""
    def alarm(signum, frame):
        raise TimeoutError(f"no answer within {seconds}s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def verify(cache_dir: Path, **kw) -> list[str]:
    from kdpipe.verify import verify_cache
    with deadline(60):
        return verify_cache(cache_dir, log=quiet, **kw)


def verify_cli(cache_dir: Path, *extra: str):
    res = run_cli(["verify-cache", str(cache_dir), *extra])
    assert "Traceback" not in res.output
    return res


def shard_entry(cache_dir: Path, i: int) -> dict:
    return json.loads((cache_dir / "manifest.json").read_text())["shards"][i]


def rows_of(cache_dir: Path, i: int) -> str:
    e = shard_entry(cache_dir, i)
    return f"shard-{i:05d}.h5 (rows {e['row_start']}..{e['row_stop'] - 1})"


def test_sound_cache_passes_with_the_teacher_recomputing_rows(made):
    res = verify_cli(made.cache, "--teacher", str(made.teacher), "--sample", "64")
    assert res.exit_code == 0, res.output
    assert "64 rows agree" in res.output and res.output.rstrip().endswith(": OK")


def test_a_flipped_byte_anywhere_in_a_shard_is_caught(cache):
    """Every byte of a shard is covered: the first and last byte of the file, the first, middle and
    last byte of every dataset's values, and 40 random bytes of metadata and values alike. Each flip
    is reported naming the shard and its rows; flips in datasets that follow from the manifest name
    the exact row."""
    victim = cache / "shard-00005.h5"
    entry = shard_entry(cache, 5)
    original = victim.read_bytes()
    offsets = {0: None, len(original) - 1: None}
    for name, (off, nbytes) in entry["layout"].items():
        for o in (off, off + nbytes // 2, off + nbytes - 1):
            offsets[o] = name
    rng = random.Random(0)
    offsets.update({o: None for o in rng.sample(range(len(original)), 40)})
    assert len(offsets) >= 50
    for offset, dataset in offsets.items():
        damaged = bytearray(original)
        damaged[offset] ^= 0x5A
        victim.write_bytes(bytes(damaged))
        faults = verify(cache)
        assert faults and all(f.startswith(rows_of(cache, 5)) for f in faults), (offset, faults)
        if dataset is not None:
            assert f"{rows_of(cache, 5)}: dataset {dataset} checksum mismatch" in faults, (offset, faults)
        if dataset in ("sample_index", "view_index", "view_params"):
            width = {"sample_index": 8, "view_index": 4, "view_params": 12}[dataset]
            row = entry["row_start"] + (offset - entry["layout"][dataset][0]) // width
            assert any(f"dataset {dataset} is wrong in 1 row(s): {row}" in f for f in faults), (offset, faults)
    victim.write_bytes(original)
    assert verify(cache) == []
    # Through the command line: exit code 1, the fault on stderr.
    damaged = bytearray(original)
    damaged[entry["layout"]["logits"][0] + 7] ^= 1
    victim.write_bytes(bytes(damaged))
    res = verify_cli(cache)
    assert res.exit_code == 1
    assert f"FAULT {rows_of(cache, 5)}: dataset logits checksum mismatch" in res.stderr


def test_a_truncated_shard_is_caught(cache):
    victim = cache / "shard-00002.h5"
    size = victim.stat().st_size
    victim.write_bytes(victim.read_bytes()[:size // 2])
    res = verify_cli(cache)
    assert res.exit_code == 1
    assert f"FAULT {rows_of(cache, 2)}: {size // 2} bytes, manifest says {size}" in res.stderr


def test_a_missing_shard_is_caught(cache):
    (cache / "shard-00007.h5").unlink()
    res = verify_cli(cache)
    assert res.exit_code == 1
    assert f"FAULT {rows_of(cache, 7)}: missing" in res.stderr


def test_a_shard_from_another_cache_swapped_in_is_caught(made, cache):
    """A shard of another cache (same size: same data and shape, other seed), and a shard of this
    cache moved to another position."""
    shutil.copy(made.other / "shard-00004.h5", cache / "shard-00004.h5")
    shutil.copy(made.cache / "shard-00001.h5", cache / "shard-00009.h5")
    res = verify_cli(cache)
    assert res.exit_code == 1
    assert f"FAULT {rows_of(cache, 4)}: does not carry this cache's id (a shard of another cache?)" in res.stderr
    assert f"FAULT {rows_of(cache, 9)}: dataset sample_index is wrong in 200 row(s): 1800, 1801" in res.stderr
    assert f"FAULT {rows_of(cache, 9)}: dataset logits checksum mismatch" in res.stderr


def test_the_repair_verify_cache_advises_recomputes_only_the_damaged_shard(made, cache):
    """Following verify-cache's advice (delete the manifest and the damaged shard, run the same dump
    command again) recomputes that one shard and gives back the original cache bit for bit."""
    victim = cache / "shard-00008.h5"
    damaged = bytearray(victim.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    victim.write_bytes(bytes(damaged))
    res = verify_cli(cache)
    assert res.exit_code == 1
    assert f"to repair, delete {cache / 'manifest.json'} and the shard files named above" in res.stderr
    (cache / "manifest.json").unlink()
    victim.unlink()
    res = run_cli(dump_args(made.teacher, made.npz, cache, VIEWS, SHARD_ROWS, 3))
    assert res.exit_code == 0, res.output
    assert "resuming: 11 complete shard(s) kept, 1 to compute" in res.output
    assert verify(cache) == []
    assert_same_cache(made.cache, cache)


EDITS = {  # an edit of manifest.json -> what verify-cache must name besides the manifest itself
    "shard digest": (lambda m: m["shards"][3]["sha256"].update(logits="0" * 64),
                     "shard-00003.h5 (rows 600..799): the manifest's digest of dataset logits does not match"),
    "seed": (lambda m: m["views"].update(seed=99), "dataset view_params is wrong in "),
    "file digest": (lambda m: m["shards"][6].update(file_sha256="f" * 64),
                    "shard-00006.h5 (rows 1200..1399): file checksum mismatch outside the datasets' values"),
    "teacher": (lambda m: m["teacher"].update(test_top1=0.99), None),
}


@pytest.mark.parametrize("what", list(EDITS))
def test_an_edited_manifest_is_caught(made, cache, what):
    """An edit anywhere in the manifest breaks its checksum: verify-cache reports it (and the shards
    the edit misdescribes), and stage two refuses the cache."""
    edit, named = EDITS[what]
    rewrite_manifest(cache, edit, fix_checksum=False)
    res = verify_cli(cache)
    assert res.exit_code == 1
    assert "FAULT manifest.json: the manifest does not match its checksum: it was edited or damaged" in res.stderr
    if named:
        assert named in res.stderr
    res = run_cli(["train-student", "--cache", cache, "--student", "mlp_100", "--epochs", "1",
                   "--device", "cpu", "--out", cache.parent / "runs"])
    assert_one_line_error(res, "manifest.json: the manifest does not match its checksum", "verify-cache")
    assert not (cache.parent / "runs").exists()


def test_a_manifest_that_is_not_json_is_refused(cache):
    (cache / "manifest.json").write_text('{"format_version": 1, "shards": [')
    assert_one_line_error(verify_cli(cache), "manifest.json is not valid JSON")


def test_the_teacher_recheck_names_rows_whose_logits_are_wrong(made, cache):
    """A cache consistent with its checksums but holding wrong logits for 3 rows (as a faulty dump
    would write): only re-running the teacher can tell, and it names those rows and their shard."""
    import h5py

    from kdpipe.cache.writer import shard_datasets, write_h5_atomic

    path = cache / "shard-00006.h5"
    m = json.loads((cache / "manifest.json").read_text())
    with h5py.File(path, "r") as f:
        arrays = {k: f[k][()] for k in f}
        attrs = dict(f.attrs)
    arrays["logits"][3:6] += np.float16(1.0)
    ent = write_h5_atomic(path, shard_datasets(arrays, m, int(attrs["row_start"]), int(attrs["row_stop"])), attrs)
    rewrite_manifest(cache, lambda m: m["shards"][6].update(ent))
    assert verify(cache) == []  # checksums alone cannot see it
    res = verify_cli(cache, "--teacher", str(made.teacher), "--sample", str(N * VIEWS))
    assert res.exit_code == 1
    assert f"3 of {N * VIEWS} re-computed rows differ from the stored logits" in res.stderr
    assert "rows 1203, 1204, 1205 in shard-00006.h5" in res.stderr


# ---------------------------------------------------------------- NaN and Inf from the teacher

@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> SimpleNamespace:
    """300 MNIST samples of which 17 and 42 are all white and 77 all light grey (200)."""
    root = tmp_path_factory.mktemp("nan")

    def mark(a):
        a["x_train"][[17, 42]] = 255
        a["x_train"][77] = 200
    npz = mnist_npz(root / "marked.npz", 300, 50, edit=mark)
    return SimpleNamespace(root=root, npz=npz)


def _dump_odd(odd, teacher: Path, out: Path, *extra: str):
    return run_cli(dump_args(teacher, odd.npz, out, 2, 300, 0, 100, "--policy", "none", *extra))


def test_nan_and_inf_teacher_outputs_stop_the_dump_naming_the_samples(odd, tmp_path):
    """A TorchScript teacher gives NaN on white images and Inf on light grey ones: the dump stops
    before writing the shard, one error line naming the three samples; nothing reads as complete."""
    teacher = torchscript_teacher(tmp_path / "nan.pt", nan_above=2.4, inf_between=(1.0, 2.4))
    out = tmp_path / "cache"
    res = _dump_odd(odd, teacher, out)
    assert_one_line_error(res, "the teacher produced NaN or Inf logits for 3 input(s) among rows 0..299: "
                               "sample 17 view 0, sample 42 view 0, sample 77 view 0", progress=True)
    assert assert_nothing_partial_reads_as_complete(out) == []


def test_nan_teacher_outputs_on_the_test_split_stop_the_dump_naming_the_samples(tmp_path):
    """The teacher's NaN on a white test image (no train image is white): eval.h5 stored it and the cache read as
    complete (the shards refuse NaN), so agreement and the teacher's test top-1 were computed from a NaN row."""
    def mark(a):
        a["x_test"][[5, 9]] = 255
    npz = mnist_npz(tmp_path / "white-test.npz", 300, 50, edit=mark)
    teacher = torchscript_teacher(tmp_path / "nan.pt", nan_above=2.4)
    out = tmp_path / "cache"
    res = run_cli(dump_args(teacher, npz, out, 2, 300, 0, 100, "--policy", "none"))
    assert_one_line_error(res, "NaN or Inf logits for 2 input(s) of the clean test split: test sample 5, test sample 9",
                          progress=True)
    assert len(assert_nothing_partial_reads_as_complete(out)) == 2  # the shards are sound: kept for a rerun
    assert not (out / "eval.h5").exists()


def test_logits_beyond_float16_stop_the_dump_and_float32_stores_them(odd, tmp_path):
    """Finite logits that float16 cannot hold (1e5) would be stored as Inf: refused, naming the sample
    and the remedy; with --logits-dtype float32 the dump succeeds and verifies."""
    teacher = torchscript_teacher(tmp_path / "big.pt", inf_between=(1.0, 2.4), big=1e5)
    out = tmp_path / "cache"
    res = _dump_odd(odd, teacher, out)
    assert_one_line_error(res, "overflow float16 for 1 input(s) among rows 0..299: sample 77 view 0",
                          "--logits-dtype float32", progress=True)
    assert assert_nothing_partial_reads_as_complete(out) == []
    res = _dump_odd(odd, teacher, out, "--logits-dtype", "float32", "--overwrite")
    assert res.exit_code == 0, res.output
    assert verify(out) == []


def test_a_checkpoint_teacher_with_nan_weights_is_refused(odd, tmp_path):
    """A kdpipe checkpoint whose weights hold a NaN: every output is NaN; the message names the first
    ten samples and counts the rest."""
    def poison(model):
        next(model.parameters()).view(-1)[0] = float("nan")
    teacher = save_teacher(tmp_path / "poisoned.pt", tamper=poison)
    res = _dump_odd(odd, teacher, tmp_path / "cache")
    assert_one_line_error(res, "NaN or Inf logits for 300 input(s)", "sample 0 view 0, sample 1 view 0",
                          "and 290 more", progress=True)


# ---------------------------------------------------------------- a dump under autocast (--amp)

def test_an_amp_cache_verifies_with_its_teacher_and_not_with_another(made, tmp_path):
    """A teacher whose logits reach about 10 (weights doubled), dumped under bf16 autocast on CPU: the
    manifest records the autocast, verify-cache re-runs the teacher under it and finds the cache sound.
    Re-run in float32 (the same cache described as a float32 dump) the bf16 rounding shows as faults,
    as it did before the dump's autocast was recorded. Another teacher, or wrong logits, are reported."""
    def double(model):
        for p in model.parameters():
            p.mul_(2.0)
    teacher = save_teacher(tmp_path / "loud.pt", seed=0, tamper=double)
    out = tmp_path / "amp"
    res = run_cli(dump_args(teacher, made.npz, out, 2, SHARD_ROWS, 3, 100, "--amp"))
    assert res.exit_code == 0, res.output
    dump = json.loads((out / "manifest.json").read_text())["dump"]
    assert (dump["amp"], dump["autocast_dtype"], dump["channels_last"], dump["device_type"]) == \
        (True, "bfloat16", False, "cpu")
    res = verify_cli(out, "--teacher", str(teacher), "--sample", "300", "--device", "cpu")
    assert res.exit_code == 0 and res.output.strip().endswith("OK"), res.output

    as_float32 = Path(shutil.copytree(out, tmp_path / "as-float32"))
    rewrite_manifest(as_float32, lambda m: m["dump"].update(amp=False, autocast_dtype=None))
    res = verify_cli(as_float32, "--teacher", str(teacher), "--sample", "300", "--device", "cpu")
    assert res.exit_code == 1 and "re-computed rows differ from the stored logits" in res.stderr

    res = verify_cli(out, "--teacher", str(made.teacher), "--sample", "300", "--device", "cpu")
    assert res.exit_code == 1 and "is not the cache's" in res.stderr

    import h5py

    from kdpipe.cache.writer import shard_datasets, write_h5_atomic
    path = out / "shard-00001.h5"
    m = json.loads((out / "manifest.json").read_text())
    with h5py.File(path, "r") as f:
        arrays = {k: f[k][()] for k in f}
        attrs = dict(f.attrs)
    arrays["logits"][7] += np.float16(1.0)
    ent = write_h5_atomic(path, shard_datasets(arrays, m, int(attrs["row_start"]), int(attrs["row_stop"])), attrs)
    rewrite_manifest(out, lambda m: m["shards"][1].update(ent))
    res = verify_cli(out, "--teacher", str(teacher), "--sample", str(2 * N), "--device", "cpu")
    assert res.exit_code == 1
    assert f"1 of {2 * N} re-computed rows differ from the stored logits" in res.stderr
    assert "rows 207 in shard-00001.h5" in res.stderr


def test_the_checksum_pass_reports_its_progress(made, capsys):
    """Hashing every byte of a large cache takes minutes; verify-cache said one line before it and nothing until it
    was done, as if it hung. The pass now reports its progress (the last line at least), counting files."""
    assert verify(made.cache) == []
    files = len(json.loads((made.cache / "manifest.json").read_text())["shards"]) + 1  # and the eval file
    assert f"checksums: {files}/{files} files (100.0%)" in capsys.readouterr().err


def test_the_teacher_is_re_run_on_rows_of_every_shard_a_short_last_one_included():
    """Rows drawn uniformly missed a short shard most of the time (the last one, or one a resumed dump wrote):
    a shard of 10 rows after 10,000 got none of 64 rows in 94% of draws, so a shard computed wrong went unseen."""
    from kdpipe.verify import sample_rows
    shards = [{"row_start": i * 1000, "row_stop": (i + 1) * 1000} for i in range(10)]
    shards.append({"row_start": 10000, "row_stop": 10010})
    for seed in range(50):
        rows = sample_rows(shards, 10010, 64, seed)
        assert len(rows) == 64 == len(set(rows.tolist())) and rows.min() >= 0 and rows.max() < 10010
        assert all(((rows >= s["row_start"]) & (rows < s["row_stop"])).any() for s in shards), seed
    assert np.array_equal(sample_rows(shards, 10010, 64, 3), sample_rows(shards, 10010, 64, 3))
    assert len(set(sample_rows(shards, 10010, 5, 0) // 1000)) == 5  # fewer rows than shards: in 5 shards
    assert sample_rows(shards[:1], 1000, 5000, 0).tolist() == list(range(1000))  # more than it holds: all rows


def test_drawing_the_rows_of_a_large_cache_takes_memory_of_the_sample_not_of_the_cache():
    """The rows were drawn from an array of every row index less those picked per shard: 20 million rows (an
    ImageNet-sized dump of many views) took a gigabyte and seconds to pick 256 rows, where uniform draws took none."""
    import tracemalloc
    from kdpipe.verify import sample_rows
    rows = 20_000_000
    shards = [{"row_start": i, "row_stop": min(rows, i + 100_000)} for i in range(0, rows, 100_000)]
    tracemalloc.start()
    try:
        picked = sample_rows(shards, rows, 256, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(picked) == 256 == len(set(picked.tolist())) and picked.max() < rows
    assert all(((picked >= s["row_start"]) & (picked < s["row_stop"])).any() for s in shards)
    assert peak < 20e6, f"{peak / 1e6:.0f} MB"


def test_a_verify_of_a_cache_of_many_shards_says_it_re_ran_rows_of_each(made):
    res = verify_cli(made.cache, "--teacher", str(made.teacher), "--sample", "12")
    assert res.exit_code == 0 and "on 12 random (view, sample) rows, at least one in each shard" in res.output, \
        res.output
