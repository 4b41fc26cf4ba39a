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


def hold(out: Path, run: str, pid: int, host: str | None = None) -> Path:
    lock = out / run / LOCK_FILE
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "2026-11-28 09:00:00"}))
    return lock


@pytest.fixture
def live_pid():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p.pid
    p.kill()
    p.wait()


def test_a_run_another_live_process_trains_is_refused_and_nothing_changes(work, tmp_path, live_pid):
    out = tmp_path / "runs"
    lock = hold(out, RUN_B, live_pid)
    res = train(work, out)
    assert_one_line_error(res, f"run {RUN_B} is being trained by another kdpipe (pid {live_pid}")
    assert f"remove {lock}" in res.output
    assert lock.is_file() and json.loads(lock.read_text())["pid"] == live_pid  # its lock is left alone
    assert not (out / RUN_A / LOCK_FILE).exists()  # the lock this command took on the other run is released
    assert not any((out / r / f).exists() for r in (RUN_A, RUN_B) for f in ("config.json", "metrics.json"))


def test_other_runs_of_the_same_directory_train_beside_it(work, tmp_path, live_pid):
    out = tmp_path / "runs"
    hold(out, RUN_B, live_pid)
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


def test_a_cache_another_live_dump_writes_is_refused_and_a_dead_ones_lock_taken_over(work, tmp_path, live_pid):
    """dump-logits locks OUT (OUT/.lock) from its check to the manifest: a second dump into a cache a live
    process is writing is refused in one line, before it touches OUT; the lock of a process that is gone is
    taken over, saying so, and the dump ends with no lock left. A fresh OUT holding only a dead lock is
    not "a directory that holds no cache"."""
    npz = mnist_npz(tmp_path / "digits.npz", 96, 32)
    teacher = save_teacher(tmp_path / "teacher.pt")
    out = tmp_path / "cache"
    out.mkdir()
    lock = out / LOCK_FILE
    lock.write_text(json.dumps({"pid": live_pid, "host": socket.gethostname(), "started": "2026-11-28 09:00:00"}))
    res = run_cli(dump_args(teacher, npz, out, 2, 1000))
    assert_one_line_error(res, f"the cache {out} is being written by another kdpipe (pid {live_pid}",
                          f"remove {lock}")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
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


def test_a_teacher_another_live_process_trains_is_refused(tmp_path, live_pid):
    """train-teacher locks OUT.lock while it trains: a second training of the same OUT is refused in one
    line, and its checkpoint and the teacher are left alone."""
    npz = mnist_npz(tmp_path / "digits.npz", 96, 32)
    out = tmp_path / "teacher.pt"
    lock = tmp_path / "teacher.pt.lock"
    lock.write_text(json.dumps({"pid": live_pid, "host": socket.gethostname(), "started": "2026-11-28 09:00:00"}))
    args = ["train-teacher", "--data", f"npz:{npz}", "--arch", "mlp_100", "--epochs", "1", "--device", "cpu",
            "--out", str(out)]
    assert_one_line_error(run_cli(args), f"the teacher {out} is being trained by another kdpipe (pid {live_pid}")
    assert not out.exists() and not (tmp_path / "teacher.pt.checkpoint").exists()
    lock.unlink()
    res = run_cli(args)
    assert res.exit_code == 0, res.output
    assert out.is_file() and not lock.exists()
