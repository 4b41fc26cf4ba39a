"""Two commands never train one run at once (RUN/.lock, kdpipe.resume.RunLocks): a run another live
process is training is refused in one line before anything in the runs directory changes; a lock left
by a process that is gone is taken over; other runs of the same directory train beside it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from kdpipe import KDPipeError
from kdpipe.resume import LOCK_FILE, RunLocks
from test_reliability_helpers import assert_one_line_error, dump_args, mnist_npz, run_cli, save_teacher

RUN_A, RUN_B = "mlp_100-T2-a0.9-e1-s0", "mlp_100-T4-a0.9-e1-s0"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("locks")
    npz = mnist_npz(root / "digits.npz", 96, 32)
    teacher = save_teacher(root / "teacher.pt")
    res = run_cli(dump_args(teacher, npz, root / "cache", 2, 1000))
    assert res.exit_code == 0, res.output
    return SimpleNamespace(root=root, cache=root / "cache")


def train(work, out: Path, temperatures: str = "2,4"):
    return run_cli(["train-student", "--cache", str(work.cache), "--student", "mlp_100", "--temperature", temperatures,
                    "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--out", str(out)])


def hold(out: Path, run: str, pid: int, host: str | None = None, flock: bool = False) -> Path:
    """A lock file naming `pid` that no process holds (a lock left by a process that is gone, whose pid may run
    another process now); with `flock`, one a kdpipe that held its flock wrote (else an older kdpipe's)."""
    lock = out / run / LOCK_FILE
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "2026-11-28 09:00:00",
                                **({"flock": True} if flock else {})}))
    return lock


HOLDER = """
import sys, time
from pathlib import Path
from kdpipe.resume import RunLocks
RunLocks().acquire_path(Path(sys.argv[1]), "x", "held")
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def live_holder():
    """hold_live(lock): another process takes the lock file `lock` as kdpipe does and keeps it (killed at the
    test's end); that process (a Popen)."""
    procs = []

    def hold_live(lock: Path) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p
    yield hold_live
    for p in procs:
        p.kill()
        p.wait()


def test_a_run_another_live_process_trains_is_refused_and_nothing_changes(work, tmp_path, live_holder):
    out = tmp_path / "runs"
    lock = out / RUN_B / LOCK_FILE
    live_pid = live_holder(lock).pid
    res = train(work, out)
    assert_one_line_error(res, f"run {RUN_B} is being trained by another kdpipe (pid {live_pid}")
    assert f"remove {lock}" in res.output
    assert lock.is_file() and json.loads(lock.read_text())["pid"] == live_pid  # its lock is left alone
    assert not (out / RUN_A / LOCK_FILE).exists()  # the lock this command took on the other run is released
    assert not any((out / r / f).exists() for r in (RUN_A, RUN_B) for f in ("config.json", "metrics.json"))


def test_other_runs_of_the_same_directory_train_beside_it(work, tmp_path, live_holder):
    out = tmp_path / "runs"
    live_holder(out / RUN_B / LOCK_FILE)
    res = train(work, out, temperatures="2")
    assert res.exit_code == 0, res.output
    assert (out / RUN_A / "metrics.json").is_file() and not (out / RUN_A / LOCK_FILE).exists()


def test_a_lock_whose_process_is_gone_is_taken_over(work, tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    out = tmp_path / "runs"
    hold(out, RUN_A, p.pid)
    res = train(work, out, temperatures="2")
    assert res.exit_code == 0, res.output
    assert f"(pid {p.pid}) is gone" in res.output
    assert (out / RUN_A / "metrics.json").is_file() and not (out / RUN_A / LOCK_FILE).exists()


def test_a_lock_of_another_host_is_refused(work, tmp_path):
    out = tmp_path / "runs"
    hold(out, RUN_A, 1, host="another-node")
    assert_one_line_error(train(work, out, temperatures="2"), "(pid 1 on another-node")


def test_this_process_takes_its_own_locks_back_and_releases_them_when_a_call_raises(tmp_path):
    locks = RunLocks(log=lambda *a: None)
    locks.acquire(tmp_path, ["a", "b"])
    again = RunLocks(log=lambda *a: None)
    again.acquire(tmp_path, ["a"])  # a lock of this very process: a call that raised before releasing it
    assert json.loads((tmp_path / "a" / LOCK_FILE).read_text())["pid"] == os.getpid()
    locks.release()
    again.release()
    assert not any(tmp_path.glob(f"*/{LOCK_FILE}"))


@pytest.fixture
def live_pid():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p.pid
    p.kill()
    p.wait()


def test_a_lock_naming_a_live_pid_that_no_process_holds_is_taken_over(tmp_path, live_pid):
    """A lock whose process is gone while its pid now runs another process (pids are reused, a container
    restarted gives the same ones): nothing holds it, so it is taken over, not refused until removed by hand."""
    lock = hold(tmp_path, "a", live_pid, flock=True)
    said = []
    locks = RunLocks(log=said.append)
    locks.acquire_path(lock, "run a", "trained")
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert said == [f"run a: the process that held it (pid {live_pid}) is gone"]
    locks.release()
    assert not lock.exists()


def test_a_lock_an_older_kdpipe_holds_is_refused(tmp_path, live_pid):
    """An older kdpipe (before the flock locks) still training when kdpipe is upgraded: its lock file names its live
    pid and it holds no flock, which older kdpipes never took. It was taken over as a lock whose process is gone, and
    both trained the run; a lock without the record of a flock is judged by its pid, as the older kdpipe judges."""
    lock = hold(tmp_path, "a", live_pid)
    with pytest.raises(KDPipeError, match=f"run a is being trained by another kdpipe \\(pid {live_pid} on "):
        RunLocks(log=lambda *a: None).acquire_path(lock, "run a", "trained")
    assert json.loads(lock.read_text())["pid"] == live_pid
    locks = RunLocks(log=lambda *a: None)  # what this kdpipe writes records its flock, for the next one to judge by
    locks.acquire(tmp_path, ["b"])
    assert json.loads((tmp_path / "b" / LOCK_FILE).read_text())["flock"] is True
    locks.release()


# Takes the lock file argv[1] as kdpipe does, pausing 3 s where another process could slip in ("paused" then):
# slow-write, after the file is there and before its pid is written; slow-judge, while it judges a dead holder.
RACER = """
import json, sys, time
from pathlib import Path
import kdpipe.resume as R
real_dump, real_dumps = json.dump, json.dumps
def pause():
    print("paused", flush=True)
    time.sleep(3)
if sys.argv[2] == "slow-write":
    json.dump = lambda *a, **k: (pause(), real_dump(*a, **k))[1]
    json.dumps = lambda *a, **k: (pause(), real_dumps(*a, **k))[1]
else:
    R._pid_runs = lambda pid: (pause(), False)[1]
try:
    R.RunLocks(log=lambda *a: None).acquire_path(Path(sys.argv[1]), "x", "held")
    print("held", flush=True)
except R.KDPipeError:
    print("refused", flush=True)
time.sleep(10)
"""


@pytest.mark.parametrize("moment", ["slow-write", "slow-judge"])
def test_two_processes_never_both_take_one_lock(tmp_path, moment):
    """Two commands met at one lock: one takes it, the other is refused, however their steps interleave. A
    lock file is not judged by its content while its process is between creating it and writing its pid (an
    empty file was taken over then, and two dumps or trainings into one directory both went on), nor removed
    as dead by one process just after another took it over (both then held it)."""
    lock = tmp_path / LOCK_FILE
    if moment == "slow-judge":  # a lock left by a process that is gone: both would take it over
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        hold(tmp_path, "", gone.pid)
    racer = subprocess.Popen([sys.executable, "-c", RACER, str(lock), moment], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        first = racer.stdout.readline().strip()
        locks = RunLocks(log=lambda *a: None)
        try:
            locks.acquire_path(lock, "run x", "trained")
            took = True
        except KDPipeError as e:
            took = False
            assert "is being trained by another kdpipe" in str(e)
        racer_took = (racer.stdout.readline().strip() if first == "paused" else first) == "held"
        assert (took, racer_took) == (False, True)
        locks.release()
    finally:
        racer.kill()
        racer.wait()


def test_a_cache_another_live_dump_writes_is_refused_and_a_dead_ones_lock_taken_over(work, tmp_path, live_holder):
    """dump-logits locks OUT (OUT/.lock) from its check to the manifest: a second dump into a cache a live
    process is writing is refused in one line, before it touches OUT; the lock of a process that is gone is
    taken over, saying so, and the dump ends with no lock left. A fresh OUT holding only a dead lock is
    not "a directory that holds no cache"."""
    npz = mnist_npz(tmp_path / "digits.npz", 96, 32)
    teacher = save_teacher(tmp_path / "teacher.pt")
    out = tmp_path / "cache"
    out.mkdir()
    lock = out / LOCK_FILE
    holder = live_holder(lock)
    live_pid = holder.pid
    res = run_cli(dump_args(teacher, npz, out, 2, 1000))
    assert_one_line_error(res, f"the cache {out} is being written by another kdpipe (pid {live_pid}",
                          f"remove {lock}")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    holder.kill()
    holder.wait()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": "2026-11-28 09:00:00"}))
    res = run_cli(dump_args(teacher, npz, out, 2, 1000))
    assert res.exit_code == 0, res.output
    assert f"the cache {out}: the process that held it (pid {gone.pid}) is gone" in res.output
    assert (out / "manifest.json").is_file() and not lock.exists()


def test_a_dump_that_fails_releases_its_lock(work, tmp_path):
    """A dump refused after OUT was locked (other arguments, no --overwrite) leaves no lock behind."""
    npz = mnist_npz(tmp_path / "digits.npz", 96, 32)
    teacher = save_teacher(tmp_path / "teacher.pt")
    out = tmp_path / "cache"
    assert run_cli(dump_args(teacher, npz, out, 2, 1000)).exit_code == 0
    assert_one_line_error(run_cli(dump_args(teacher, npz, out, 3, 1000)), "holds a cache made with other arguments")
    assert not (out / LOCK_FILE).exists()


def test_a_teacher_another_live_process_trains_is_refused(tmp_path, live_holder):
    """train-teacher locks OUT.lock while it trains: a second training of the same OUT is refused in one
    line, and its checkpoint and the teacher are left alone."""
    npz = mnist_npz(tmp_path / "digits.npz", 96, 32)
    out = tmp_path / "teacher.pt"
    lock = tmp_path / "teacher.pt.lock"
    live_pid = live_holder(lock).pid
    args = ["train-teacher", "--data", f"npz:{npz}", "--arch", "mlp_100", "--epochs", "1", "--device", "cpu",
            "--out", str(out)]
    assert_one_line_error(run_cli(args), f"the teacher {out} is being trained by another kdpipe (pid {live_pid}")
    assert not out.exists() and not (tmp_path / "teacher.pt.checkpoint").exists()
    lock.unlink()  # as the refusal says to do once that process is gone
    res = run_cli(args)
    assert res.exit_code == 0, res.output
    assert out.is_file() and not lock.exists()


@pytest.mark.parametrize("step", ["plan", "cleanup"])
def test_a_checkpoint_another_command_removes_meanwhile_is_no_error(tmp_path, monkeypatch, step):
    """Two commands train other runs of one runs directory (make -j): one lists checkpoints/ (planning, or
    removing finished checkpoints at its end) just as the other's pass ends and removes its checkpoint. The
    vanished file was "cannot read the checkpoint ...: delete it", failing a command with nothing wrong."""
    import torch
    import kdpipe.resume as R
    out = tmp_path / "runs"
    (out / R.CHECKPOINT_DIR).mkdir(parents=True)
    other = out / R.CHECKPOINT_DIR / "pass-s0-0123456789ab.pt"
    torch.save({"kdpipe_pass_checkpoint": R.CHECKPOINT_VERSION, "runs": {RUN_B: {}}, "position": [0, 1], "seed": 0,
                "epochs": 1}, other)
    real = R.load_checkpoint

    def finished_meanwhile(path, *a, **kw):  # the other command's pass ends between the listing and the load
        Path(path).unlink(missing_ok=True)
        return real(path, *a, **kw)
    monkeypatch.setattr(R, "load_checkpoint", finished_meanwhile)
    if step == "plan":
        plan = R.plan_runs_dir(out, {}, log=lambda *a: None)
        assert plan.checkpoints == {}
    else:
        R.remove_finished_checkpoints(out, log=lambda *a: None)
        assert not (out / R.CHECKPOINT_DIR).exists()


# Writes argv[1] as kdpipe writes a checkpoint, as a process of another machine sharing the folder would: its pid
# (argv[2]) runs nothing here. It stops in the middle of the write.
REMOTE_WRITER = """
import os, sys, time
from pathlib import Path
from kdpipe.cache import writer
os.getpid = lambda: int(sys.argv[2])
def fill(f):
    f.write(b"half")
    print("writing", flush=True)
    time.sleep(60)
writer.atomic_write_stream(Path(sys.argv[1]), fill)
"""


def test_a_checkpoint_write_of_another_machine_sharing_the_runs_directory_is_left_alone(tmp_path):
    """Two machines train other runs of one runs directory on a shared file system: the one that finishes removes
    the temporaries of checkpoint writes a crash left, judged by their pid, which on this machine ran nothing; it
    removed the other machine's write in progress, whose rename then failed and stopped its training. A write in
    progress holds a lock on its temporary, which the sweep respects."""
    import kdpipe.resume as R
    out = tmp_path / "runs"
    ckdir = out / R.CHECKPOINT_DIR
    ckdir.mkdir(parents=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    remote = subprocess.Popen([sys.executable, "-c", REMOTE_WRITER, str(ckdir / "pass-s0-0123456789ab.pt"),
                               str(gone.pid)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert remote.stdout.readline().strip() == "writing"
        (tmp,) = ckdir.glob(".*.tmp-*")
        crashed = ckdir / f".pass-s0-ba9876543210.pt.tmp-{gone.pid}"
        crashed.write_bytes(b"half")
        R.remove_finished_checkpoints(out, log=lambda *a: None)
        assert tmp.exists(), "another machine's checkpoint write in progress was removed"
        assert not crashed.exists(), "a write a crash left was kept"
    finally:
        remote.kill()
        remote.wait()
    R.remove_finished_checkpoints(out, log=lambda *a: None)
    assert not ckdir.exists()


def test_another_users_lock_is_refused_naming_its_holder(live_holder):
    """A lock file this user may not write (another user's, of a runs directory they share): a live holder is
    still the one-line refusal naming it, not "cannot create the lock file: Permission denied"."""
    import shutil
    import tempfile
    root = Path(tempfile.mkdtemp(prefix="kdpipe-locks-"))  # a folder every user reaches (not pytest's, 0700)
    try:
        root.chmod(0o777)
        lock = root / LOCK_FILE
        holder = live_holder(lock)
        lock.chmod(0o444)
        code = ("import os, sys\nfrom pathlib import Path\n"
                "from kdpipe import KDPipeError\nfrom kdpipe.resume import RunLocks\n"
                "if os.geteuid() == 0:  # imported first: the venv may be root's alone\n"
                "    os.setgid(65534); os.setuid(65534)\n"
                "try:\n    RunLocks().acquire_path(Path(sys.argv[1]), 'run x', 'trained')\n    print('took it')\n"
                "except KDPipeError as e:\n    print(e)\n")
        r = subprocess.run([sys.executable, "-c", code, str(lock)], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert r.stdout.startswith(f"run x is being trained by another kdpipe (pid {holder.pid}"), r.stdout + r.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_another_users_lock_whose_process_is_gone_is_taken_over_in_a_shared_folder():
    """A lock file another user's crashed command left in a runs directory both may write: older kdpipes removed it
    and took the run; the flock locks, which open the file for writing, failed 'cannot create the lock file:
    Permission denied', leaving the user to find and remove it. It is removed and taken over; where the folder does
    not let this user remove it (a sticky /tmp-like folder), the line says to remove it."""
    import shutil
    import tempfile
    root = Path(tempfile.mkdtemp(prefix="kdpipe-locks-"))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    code = ("import os, sys\nfrom pathlib import Path\n"
            "from kdpipe import KDPipeError\nfrom kdpipe.resume import RunLocks\n"
            "if os.geteuid() == 0:\n    os.setgid(65534); os.setuid(65534)\n"
            "if os.geteuid() == int(sys.argv[2]):\n    print('same user'); sys.exit()\n"
            "try:\n    RunLocks(log=print).acquire_path(Path(sys.argv[1]), 'run x', 'trained')\n"
            "    print('took it')\nexcept KDPipeError as e:\n    print(e)\n")
    try:
        for mode, said in ((0o777, "took it"), (0o1777, "remove it")):
            root.chmod(mode)
            lock = hold(root, "", gone.pid, flock=True)
            lock.chmod(0o644)
            r = subprocess.run([sys.executable, "-c", code, str(lock), str(lock.stat().st_uid)], capture_output=True,
                               text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
            if r.stdout.strip() == "same user":
                pytest.skip("needs another user than the lock file's owner")
            assert said in r.stdout.strip().splitlines()[-1], r.stdout + r.stderr
            if said == "took it":
                assert f"(pid {gone.pid}) is gone" in r.stdout and json.loads(lock.read_text())["pid"] != gone.pid
            else:
                assert f"{lock}" in r.stdout and lock.exists() and "Permission denied" not in r.stdout
            lock.unlink(missing_ok=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_runs_temporaries_a_kill_left_go_and_a_live_writers_stay(tmp_path, live_pid):
    """A run's files (config.json, student.pt, ...) are written by rename; a torchrun job killed as it wrote one
    left .config.json.tmp-PID (for student.pt, a whole model's size) in the run's directory for good, beside
    the run its rerun finished."""
    from kdpipe.resume import plan_runs_dir
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    dead, live = run / f".student.pt.tmp-{gone}", run / f".config.json.tmp-{live_pid}"
    dead.write_bytes(b"x" * 100)
    live.write_bytes(b"y")
    plan_runs_dir(tmp_path / "runs", {"r": {"epochs": 1}}, log=lambda *a: None)
    assert not dead.exists() and live.exists()
