"""Crash safety and resume of stage one (issue 3): real processes killed at random moments, Ctrl-C
and SIGTERM, reruns with other arguments, unwritable and full output locations.

Every interrupted dump is resumed with the same command and compared bit for bit (logits, view
parameters, labels, sample and view indices, test logits, shard files) with an uninterrupted one.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_reliability_helpers import (assert_nothing_partial_reads_as_complete, assert_one_line_error,
                                      assert_same_cache, cache_arrays, dump_args, files_digest, kdpipe_cmd,
                                      mnist_npz, run_cli, run_kdpipe, save_teacher, shard_arrays,
                                      stat_key, subprocess_env)

N_TRAIN, N_TEST, VIEWS, SHARD_ROWS = 2000, 200, 8, 400  # 16,000 rows in 40 shards


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> SimpleNamespace:
    """Data, teacher and one uninterrupted dump (a real process), with how long its parts took."""
    root = tmp_path_factory.mktemp("reliability")
    npz = mnist_npz(root / "mnist-2000.npz", N_TRAIN, N_TEST)
    teacher = save_teacher(root / "teacher.pt", seed=0)
    out = root / "reference"
    args = dump_args(teacher, npz, out, VIEWS, SHARD_ROWS)
    t0 = time.perf_counter()
    p = subprocess.Popen(kdpipe_cmd(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=subprocess_env())
    started = _wait_for_new_file(out / "dump.json", None, p)  # the dump itself begins
    t_start = time.perf_counter() - t0
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    t_total = time.perf_counter() - t0
    assert started
    shards = {s.name: shard_arrays(s) for s in sorted(out.glob("shard-*.h5"))}
    assert len(shards) == N_TRAIN * VIEWS // SHARD_ROWS
    return SimpleNamespace(root=root, npz=npz, teacher=teacher, out=out, shards=shards,
                           t_dump=max(0.2, t_total - t_start), t_total=t_total)


def _wait_for_new_file(path: Path, old_key, proc, timeout: float = 60) -> bool:
    """Until `path` is (re)written or proc exits; True if it was written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        key = stat_key(path)
        if key is not None and key != old_key:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError(f"{path} was not written within {timeout}s")


def _wait_for_shards(out: Path, count: int, proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(list(out.glob("shard-*.h5"))) < count:
        assert proc.poll() is None, f"the dump ended before {count} shards: {proc.communicate()}"
        assert time.monotonic() < deadline, f"fewer than {count} shards after {timeout}s"
        time.sleep(0.005)


def _start(args) -> subprocess.Popen:
    # SIGINT back to its default in the child: a shell running the tests in the background ignores it,
    # and Python only turns SIGINT into KeyboardInterrupt when it is not ignored.
    return subprocess.Popen(kdpipe_cmd(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_sigkill_at_random_moments_then_resume_is_bit_identical(ref, tmp_path):
    """>= 5 SIGKILLs of a real `kdpipe dump-logits` process at random moments (a random number of
    further shards, then a random fraction of a shard's time, so kills land anywhere: while checking
    kept shards, computing, writing a shard, renaming it, writing the test logits or the manifest);
    after each, nothing partial reads as complete and every shard on disk equals the uninterrupted
    dump's; the same command then finishes a cache bit-identical to the uninterrupted one."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    out = tmp_path / "killed"
    args = dump_args(ref.teacher, ref.npz, out, VIEWS, SHARD_ROWS)
    total = len(ref.shards)
    per_shard = ref.t_dump / total
    kills, moments = 0, []
    while kills < 6:
        before = stat_key(out / "dump.json")
        p = _start(args)
        assert _wait_for_new_file(out / "dump.json", before, p), p.communicate()
        done = len(list(out.glob("shard-*.h5")))
        # The last kill is aimed at the end: after the last shard, while test logits and manifest are made.
        target = total if kills == 5 else done + rng.randint(0, (total - done) // 3)
        _wait_for_shards(out, target, p)
        delay = rng.uniform(0, 2 * per_shard)
        time.sleep(delay)
        alive = p.poll() is None
        p.kill()
        _, stderr = p.communicate(timeout=60)
        assert alive or p.returncode == 0, f"(seed {seed}) {stderr}"
        if not alive:
            break  # the dump finished first (only possible for the last, aimed kill)
        assert p.returncode == -signal.SIGKILL
        kills += 1
        moments.append((target, round(delay, 3), len(list(out.glob("shard-*.h5")))))
        if (out / "manifest.json").exists():
            break  # killed after the manifest was written: the cache is complete
        shards = assert_nothing_partial_reads_as_complete(out, ref.shards)
        assert len(shards) >= done, f"(seed {seed}) complete shards were lost: {moments}"
    assert kills >= 5, f"(seed {seed}) only {kills} kills landed while the dump ran: {moments}"
    res = run_kdpipe(args)
    assert res.returncode == 0, res.stderr
    assert "resuming:" in res.stdout or "already complete" in res.stdout
    assert not list(out.glob(".*tmp*")), "temporary files were left behind"
    assert_same_cache(ref.out, out)


def test_ctrl_c_and_sigterm_exit_cleanly_with_resume_message(ref, tmp_path):
    """Ctrl-C (SIGINT), then SIGTERM on the resumed run, mid-dump: each exits with code 130, no
    traceback and a message saying how to resume; the same command resumes from the complete shards
    and ends bit-identical to an uninterrupted dump."""
    out = tmp_path / "interrupted"
    args = dump_args(ref.teacher, ref.npz, out, VIEWS, SHARD_ROWS)
    kept = []
    for sig, at in ((signal.SIGINT, random.randint(1, 12)), (signal.SIGTERM, random.randint(16, 28))):
        p = _start(args)
        _wait_for_shards(out, at, p)
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 130, f"{signal.Signals(sig).name}: exit code {p.returncode}\n{stderr}"
        assert "Traceback" not in stderr + stdout
        assert f"interrupted: complete shards are kept in {out}; run the same command again to resume" in stderr
        if kept:
            assert f"resuming: {len(kept)} complete shard(s) kept" in stdout
        kept = assert_nothing_partial_reads_as_complete(out, ref.shards)
    res = run_kdpipe(args)
    assert res.returncode == 0, res.stderr
    assert f"resuming: {len(kept)} complete shard(s) kept" in res.stdout
    assert_same_cache(ref.out, out)


# ---------------------------------------------------------------- reruns with other arguments

@pytest.fixture(scope="module")
def other_inputs(ref) -> SimpleNamespace:
    """A second teacher, and a second copy of the data differing in one pixel."""
    teacher2 = save_teacher(ref.root / "teacher2.pt", seed=1)

    def one_pixel(a):
        a["x_train"][5, 10, 10] ^= 1
    npz2 = mnist_npz(ref.root / "mnist-2000-edited.npz", N_TRAIN, N_TEST, edit=one_pixel)
    return SimpleNamespace(teacher=teacher2, npz=npz2)


CHANGES = {  # what is changed -> (how the command differs, what the refusal must name)
    "teacher": (lambda o: {"teacher": o.teacher}, ["teacher.fingerprint was "]),
    "data": (lambda o: {"npz": o.npz}, ["dataset.fingerprint was ", "dataset.spec was "]),
    "K": (lambda o: {"views": 4}, ["views.K was 8, now 4"]),
    "policy": (lambda o: {"extra": ["--policy", "none"]}, ["views.spec was crop:4+flip, now none"]),
    "seed": (lambda o: {"seed": 4}, ["views.seed was 3, now 4"]),
    "dtype": (lambda o: {"extra": ["--logits-dtype", "float32"]}, ["logits_dtype was float16, now float32"]),
    # bf16 autocast: resumed, a cache would hold shards of both precisions and record only the last run's
    "amp": (lambda o: {"extra": ["--amp"]}, ["autocast was None, now bfloat16"]),
}


def _changed_args(ref, other, out, changes: list[str]) -> list[str]:
    kw = {"teacher": ref.teacher, "npz": ref.npz, "views": VIEWS, "seed": 3, "extra": []}
    for c in changes:
        for k, v in CHANGES[c][0](other).items():
            kw[k] = kw[k] + v if k == "extra" else v
    return dump_args(kw["teacher"], kw["npz"], out, kw["views"], SHARD_ROWS, kw["seed"], 200, *kw["extra"])


@pytest.mark.parametrize("changes", [[c] for c in CHANGES] + [list(CHANGES)], ids=list(CHANGES) + ["all"])
def test_rerun_with_other_arguments_is_refused_naming_each_difference(ref, other_inputs, tmp_path, changes):
    """The same --out with another teacher, data, K, policy, seed or dtype (alone or all at once):
    refused in one line naming every difference; the cache is left as it was."""
    out = tmp_path / "cache"
    shutil.copytree(ref.out, out)
    before = files_digest(out)
    res = run_cli(_changed_args(ref, other_inputs, out, changes))
    line = assert_one_line_error(res, "holds a cache made with other arguments", "--overwrite")
    for c in changes:
        for frag in CHANGES[c][1]:
            assert frag in line, f"{frag!r} not named in {line!r}"
    assert not re.search(r"[0-9a-f]{13}", line), line  # digests are shown by their first 12 digits
    assert files_digest(out) == before



def test_a_rerun_with_another_view_option_names_that_option_alone(ref, tmp_path):
    """Another option of one view op is named by its place in the policy, not by printing both policies'
    whole op lists."""
    out = tmp_path / "cache"
    shutil.copytree(ref.out, out)
    res = run_cli(dump_args(ref.teacher, ref.npz, out, VIEWS, SHARD_ROWS, 3, 200, "--policy", "crop:2+flip"))
    line = assert_one_line_error(res, "views.ops[0].options.padding was 4, now 2",
                                 "views.spec was crop:4+flip, now crop:2+flip")
    assert "'columns'" not in line and "'version'" not in line, line

def test_overwrite_starts_over(ref, other_inputs, tmp_path):
    """--overwrite with other arguments discards the old cache (no stale shard stays) and writes one
    identical to a fresh dump with the new arguments."""
    out, fresh = tmp_path / "cache", tmp_path / "fresh"
    shutil.copytree(ref.out, out)
    new_args = _changed_args(ref, other_inputs, out, ["K", "seed"])  # 4 views: 20 shards instead of 40
    res = run_cli(new_args + ["--overwrite"])
    assert res.exit_code == 0, res.output
    assert "resuming" not in res.output
    assert len(list(out.glob("shard-*.h5"))) == N_TRAIN * 4 // SHARD_ROWS  # none of the old 40 is left
    res = run_cli(_changed_args(ref, other_inputs, fresh, ["K", "seed"]))
    assert res.exit_code == 0, res.output
    assert_same_cache(fresh, out)


# ---------------------------------------------------------------- unwritable or full output

@pytest.fixture(scope="module")
def small(tmp_path_factory) -> SimpleNamespace:
    """A smaller dump, in this process (600 samples x 4 views, 12 shards), for the monkeypatched cases."""
    root = tmp_path_factory.mktemp("small")
    npz = mnist_npz(root / "mnist-600.npz", 600, 100)
    teacher = save_teacher(root / "teacher.pt", seed=0)
    out = root / "reference"
    args = dump_args(teacher, npz, out, 4, 200)
    res = run_cli(args)
    assert res.exit_code == 0, res.output
    return SimpleNamespace(root=root, npz=npz, teacher=teacher, out=out,
                           args=lambda o: dump_args(teacher, npz, o, 4, 200),
                           shards={s.name: shard_arrays(s) for s in sorted(out.glob("shard-*.h5"))})


@pytest.mark.parametrize("killed_at", [1, 3, 8])
def test_a_kill_while_overwrite_discards_the_old_cache_leaves_nothing_that_reads_complete(small, tmp_path,
                                                                                         killed_at):
    """--overwrite removed the old shards first and the manifest after them: killed in between, the folder held
    a manifest that read as complete over shards already gone (the old command's rerun said "already
    complete"), or, killed after dump.json went, old files and no record (a rerun refused the folder)."""
    out = tmp_path / "cache"
    shutil.copytree(small.out, out)
    real, calls = Path.unlink, []

    def unlink(self, missing_ok=False):
        calls.append(self.name)
        if len(calls) == killed_at:
            raise KeyboardInterrupt  # the kill, between two of the discard's removals
        return real(self, missing_ok=missing_ok)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "unlink", unlink)
        res = run_cli(small.args(out) + ["--seed", "1", "--overwrite"])
    assert res.exit_code == 130, res.output
    manifest = out / "manifest.json"
    assert not manifest.exists() or all((out / s["file"]).is_file() for s in json.loads(manifest.read_text())["shards"])
    res = run_cli(small.args(out))  # the old command: its cache again, never "already complete" over missing shards
    assert res.exit_code == 0, res.output
    assert_same_cache(small.out, out)


def _fail_after(monkeypatch, name: str, n_ok: int, err: int, match: str = "shard-"):
    """Make os.<name>(fd or path) raise OSError(err) once n_ok calls on files matching `match` passed."""
    real = getattr(os, name)
    calls = {"n": 0}

    def fake(target, *a, **kw):
        path = os.readlink(f"/proc/self/fd/{target}") if isinstance(target, int) else str(target)
        if match in path:
            calls["n"] += 1
            if calls["n"] > n_ok:
                raise OSError(err, os.strerror(err), path)
        return real(target, *a, **kw)
    monkeypatch.setattr(os, name, fake)


@pytest.mark.parametrize("err,words", [(errno.ENOSPC, "no space left on the device"),
                                        (errno.EDQUOT, "disk quota exceeded"),
                                        (errno.EACCES, "permission denied"),
                                        (errno.EROFS, "read-only file system")],
                         ids=["ENOSPC", "EDQUOT", "EACCES", "EROFS"])
def test_failing_shard_write_is_clear_leaves_nothing_partial_and_resumes(small, tmp_path, monkeypatch, err, words):
    """The 4th shard's fsync fails (a full disk or quota shows at fsync, after the write was buffered;
    EACCES stands for a permission taken away mid-dump): one clear error line, exit 2, no file of
    that shard (not even the temporary), earlier shards complete; once writable, the same command
    resumes and ends bit-identical to an uninterrupted dump."""
    out = tmp_path / "cache"
    with monkeypatch.context() as mp:
        _fail_after(mp, "fsync", 3, err, match=".shard-")
        res = run_cli(small.args(out))
    assert_one_line_error(res, f"cannot write {out / 'shard-00003.h5'}: {words}", "run the same command again",
                          progress=True)
    assert sorted(p.name for p in out.iterdir()) == ["dump.json"] + [f"shard-0000{i}.h5" for i in range(3)]
    assert_nothing_partial_reads_as_complete(out, small.shards)
    res = run_cli(small.args(out))
    assert res.exit_code == 0, res.output
    assert "resuming: 3 complete shard(s) kept" in res.output
    assert_same_cache(small.out, out)


def test_full_disk_while_writing_the_manifest(small, tmp_path, monkeypatch):
    """The disk fills just as the manifest is written: the cache stays unfinished (no manifest, every
    shard kept), and the rerun only writes the manifest."""
    out = tmp_path / "cache"
    with monkeypatch.context() as mp:
        _fail_after(mp, "fsync", 0, errno.ENOSPC, match=".manifest.json")
        res = run_cli(small.args(out))
    assert_one_line_error(res, f"cannot write {out / 'manifest.json'}: no space left on the device", progress=True)
    assert len(assert_nothing_partial_reads_as_complete(out, small.shards)) == len(small.shards)
    assert not list(out.glob(".*tmp*"))
    res = run_cli(small.args(out))
    assert res.exit_code == 0 and f"resuming: {len(small.shards)} complete shard(s) kept" in res.output
    assert_same_cache(small.out, out)


@pytest.mark.parametrize("where", ["parent", "directory"])
def test_unwritable_output_location_is_a_clear_error(small, tmp_path, monkeypatch, where):
    """EACCES (simulated: tests run as root, whom file modes do not stop) on creating the cache
    directory, or on the first file in an existing one: one clear line, exit 2, nothing written."""
    out = tmp_path / "cache"
    with monkeypatch.context() as mp:
        if where == "parent":
            def mkdir(self, *a, **kw):
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            mp.setattr(Path, "mkdir", mkdir)
            res = run_cli(small.args(out))
            assert_one_line_error(res, f"cannot create cache directory {out}: Permission denied")
            assert not out.exists()
        else:
            out.mkdir()
            real_open = builtins.open

            def deny(file, mode="r", *a, **kw):
                if str(file).startswith(str(out)) and set(mode) & set("wax+"):
                    raise PermissionError(errno.EACCES, "Permission denied", str(file))
                return real_open(file, mode, *a, **kw)
            mp.setattr(builtins, "open", deny)
            res = run_cli(small.args(out))
            assert_one_line_error(res, f"cannot write {out / 'dump.json'}: permission denied")
            assert list(out.iterdir()) == []
    res = run_cli(small.args(out))
    assert res.exit_code == 0, res.output
    assert_same_cache(small.out, out)


def _can_mount(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_real_full_disk_then_space_back(small, tmp_path):
    """A real full file system (a 64 KiB tmpfs; skipped where mounting is not allowed). HDF5 writing
    straight to a full disk fails in a deallocator and crashed the process, so shards are built in
    memory and written with plain I/O: the dump stops with one clear error line, leaves no partial
    shard or temporary, and resumes once the file system is grown, bit-identical to a dump that
    never failed."""
    mnt = tmp_path / "small-fs"
    if not _can_mount(mnt, "64k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        out = mnt / "cache"
        # The planned size is checked first; with --yes the dump goes on and meets the full disk.
        assert_one_line_error(run_cli(small.args(out)), "the cache would take", "free on", "--yes")
        res = run_cli(small.args(out) + ["--yes"])
        assert_one_line_error(res, "cannot write", "no space left on the device", progress=True)
        assert not list(out.glob(".*tmp*")), "a temporary file was left on the full disk"
        kept = assert_nothing_partial_reads_as_complete(out, small.shards)
        assert 0 < len(kept) < len(small.shards)
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
        res = run_cli(small.args(out))
        assert res.exit_code == 0, res.output
        assert f"resuming: {len(kept)} complete shard(s) kept" in res.output
        assert_same_cache(small.out, out)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_resume_after_crash_replaces_a_damaged_shard(small, tmp_path):
    """A shard that is damaged on disk (here: truncated, as by a crash of the machine) is not kept by
    the resumed dump: it is computed again."""
    out = tmp_path / "cache"
    shutil.copytree(small.out, out)
    (out / "manifest.json").unlink()  # as if the crash came before the manifest
    victim = out / "shard-00005.h5"
    victim.write_bytes(victim.read_bytes()[:-100])
    res = run_cli(small.args(out))
    assert res.exit_code == 0, res.output
    assert f"resuming: {len(small.shards) - 1} complete shard(s) kept, 1 to compute" in res.output
    assert cache_arrays(out) == cache_arrays(small.out)


def test_a_resumed_dump_reports_its_check_of_the_earlier_shards(small, tmp_path):
    """A resumed dump reads every shard of the earlier run whole (checksums, teacher top-1) before it says
    "resuming: ..."; for a large cache that was minutes without a word. The check now reports its progress; a
    fresh dump, which has no shards to check, says nothing of it."""
    out = tmp_path / "cache"
    shutil.copytree(small.out, out)
    (out / "manifest.json").unlink()  # as if the crash came before the manifest
    res = run_cli(small.args(out))
    assert res.exit_code == 0, res.output
    n = len(small.shards)
    assert f"checking the shards of the earlier run: {n}/{n} shards (100.0%)" in res.stderr
    fresh = run_cli(small.args(tmp_path / "fresh"))
    assert fresh.exit_code == 0 and "checking the shards" not in fresh.output


@pytest.mark.parametrize("damage", ["truncated", "edited"])
def test_a_damaged_manifest_is_written_again_by_the_same_dump(small, tmp_path, damage):
    """A manifest that does not read (cut short, as by a copy that stopped) or no longer matches its checksum
    (edited): stage two refuses the cache and says to dump again, and the same dump-logits command now
    rebuilds the manifest from the shards that check out. Before, it called such a cache complete ("nothing
    to do"), or stopped with a JSONDecodeError traceback on one that is not JSON."""
    out = tmp_path / "cache"
    shutil.copytree(small.out, out)
    mpath = out / "manifest.json"
    if damage == "truncated":
        mpath.write_text(mpath.read_text()[:100])
    else:
        mpath.write_text(mpath.read_text().replace('"views_top1": ', '"views_top1": 1'))
    from kdpipe import KDPipeError
    from kdpipe.cache.reader import Cache
    with pytest.raises(KDPipeError, match="dump again" if damage == "edited" else "not valid JSON"):
        Cache(out)
    res = run_cli(small.args(out))
    assert res.exit_code == 0, res.output
    assert f"{mpath} " in res.output and "writing it again from the shards that check out" in res.output
    assert f"resuming: {len(small.shards)} complete shard(s) kept, 0 to compute" in res.output
    assert cache_arrays(out) == cache_arrays(small.out)
    assert Cache(out).manifest["dump"]["views_top1"] == Cache(small.out).manifest["dump"]["views_top1"]


def test_a_resumed_dump_needs_free_space_only_for_what_it_still_writes(small, tmp_path, monkeypatch):
    """After a dump stopped on a full disk and some space was freed, the same command resumes when the space
    left holds the shards still to compute. Before, the size check counted the whole cache against the free
    space, kept shards included: it refused, saying to pass --yes or dump fewer --views (which would have
    thrown the kept shards away); a finished cache on a nearly full disk was refused the same way."""
    import collections
    import kdpipe.teacher as teacher_mod
    out = tmp_path / "cache"
    shutil.copytree(small.out, out)
    (out / "manifest.json").unlink()  # as if the disk had filled before the last 4 shards
    gone = sorted(out.glob("shard-*.h5"))[-4:]
    missing = sum(p.stat().st_size for p in gone)
    for p in gone:
        p.unlink()
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(teacher_mod.shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, missing + 20_000))
    res = run_cli(small.args(out))
    assert res.exit_code == 0, res.output
    assert f"resuming: {len(small.shards) - 4} complete shard(s) kept, 4 to compute" in res.output
    assert_same_cache(small.out, out)
    res = run_cli(small.args(out))  # finished: nothing to write
    assert res.exit_code == 0 and "already complete" in res.output, res.output
    monkeypatch.setattr(teacher_mod.shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 1000))
    fresh = tmp_path / "fresh"  # a new dump is still measured whole
    assert_one_line_error(run_cli(small.args(fresh)), "the cache would take", "more than the 1.0 KB free on", "--yes")


def test_a_finished_cache_rerun_with_overwrite_says_what_overwrite_does(small, tmp_path):
    """The same dump on a finished cache does nothing, --overwrite or not (--overwrite starts over a cache of
    other arguments only). It said 'nothing to do (--overwrite starts over)', so a user who wanted the cache
    dumped again passed --overwrite and was told the same thing."""
    out = tmp_path / "cache"
    shutil.copytree(small.out, out)
    before = {name: digest for name, (digest, _) in files_digest(out).items()}  # (the manifest is touched for make)
    res = run_cli(small.args(out) + ["--overwrite"])
    assert res.exit_code == 0, res.output
    assert "nothing to do (to dump it again, remove it or choose another --out: --overwrite starts over only a " \
           "cache of other arguments)" in res.output
    assert {name: digest for name, (digest, _) in files_digest(out).items()} == before
