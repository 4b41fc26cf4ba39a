"""Stage two survives crashes (issue 13): per-pass checkpoints, resume equal to an uninterrupted run
weight for weight, finished runs skipped, Ctrl-C and SIGTERM, reruns with other settings, the report
of a directory with unfinished runs, checkpoints removed at the end.

Kept cheap: 192 generated digits, mlp_100 students, an untrained teacher; the processes' cost is
mostly starting Python and torch, so the kill tests start few of them and rerun in this process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from test_reliability_helpers import (assert_one_line_error, dump_args, files_digest, kdpipe_cmd, mnist_npz,
                                      run_cli, save_teacher, stat_key, subprocess_env)

N, N_TEST, VIEWS = 192, 48, 4


def runs(epochs: int = 8) -> tuple[str, str]:
    """The run names of student_args: its epochs are in them."""
    return tuple(f"mlp_100-T{t}-a0.9-e{epochs}-s0" for t in (2, 4))


RUNS = runs(8)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("resume")
    npz = mnist_npz(root / "digits.npz", N, N_TEST)
    teacher = save_teacher(root / "teacher.pt")
    cache = root / "cache"
    res = run_cli(dump_args(teacher, npz, cache, VIEWS, 1000))
    assert res.exit_code == 0, res.output
    return SimpleNamespace(root=root, cache=cache, refs={})


def student_args(work, out: Path, fuse: str = "on", epochs: int = 8, batch_size: int = 16, *extra) -> list[str]:
    return ["train-student", "--cache", str(work.cache), "--student", "mlp_100", "--temperature", "2,4",
            "--epochs", str(epochs), "--batch-size", str(batch_size), "--device", "cpu", "--fuse", fuse,
            "--out", str(out), *extra]


def reference(work, fuse: str) -> Path:
    """An uninterrupted run (in this process, one thread like the subprocesses), made once per fuse mode."""
    if fuse not in work.refs:
        out = work.root / f"ref-{fuse}"
        res = run_cli(student_args(work, out, fuse))
        assert res.exit_code == 0, res.output
        work.refs[fuse] = out
    return work.refs[fuse]


def train_wall_s(out: Path, epochs: int = 8) -> float:
    """How long the training of a finished pass took (metrics.json), to scale the moments of kills."""
    return max(0.05, json.loads((out / runs(epochs)[0] / "metrics.json").read_text())["train_wall_s"])


def every(wall: float, checkpoints: int = 25) -> list[str]:
    """--checkpoint-every for about `checkpoints` checkpoints in a pass that trains for `wall` seconds."""
    return ["--checkpoint-every", f"{max(0.003, wall / checkpoints) / 60:.6f}"]


def assert_same_runs(ref: Path, out: Path, names=RUNS) -> None:
    """Weight for weight (and buffer for buffer), the best epoch's weights too, and the same per-epoch
    history (losses, train top-1, validation and test figures) and best epoch."""
    for name in names:
        for file in ("student.pt", "student-best.pt")[:1 + (ref / name / "student-best.pt").exists()]:
            a = torch.load(ref / name / file, weights_only=True)["state_dict"]
            b = torch.load(out / name / file, weights_only=True)["state_dict"]
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]), f"{name}/{file}: {k} differs from the uninterrupted run's"
        ma, mb = (json.loads((d / name / "metrics.json").read_text()) for d in (ref, out))
        for k in ("train_loss", "train_terms", "train_top1", "history", "best", "test_top1", "teacher_agreement",
                  "epochs"):
            assert ma.get(k) == mb.get(k), f"{name}: {k} differs: {ma.get(k)} vs {mb.get(k)}"
        assert (ref / name / "history.csv").read_bytes() == (out / name / "history.csv").read_bytes()


def _wait(cond, proc, timeout: float = 60) -> bool:
    """Until cond() or proc exits; True if cond() came true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.003)
    raise AssertionError(f"nothing happened within {timeout}s")


def _start(args, **popen) -> subprocess.Popen:
    # SIGINT back to its default in the child (a shell running the tests in the background ignores it).
    return subprocess.Popen(kdpipe_cmd(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            **popen)


def _checkpoint(out: Path, epochs: int = 8) -> Path:
    from kdpipe.resume import checkpoint_path
    return checkpoint_path(out, 0, runs(epochs))


def signal_at(monkeypatch, epoch: int, step: int, sig=signal.SIGINT) -> None:
    """Send this process `sig` when the progress of epoch `epoch` (counting from 1) reports its `step`-th
    step: an interruption in the middle of an epoch, at a known place."""
    from kdpipe import util
    steps = []
    update = util.Progress.update

    def interrupting_update(self, n, extra=""):
        update(self, n, extra)
        if f"epoch {epoch}/" in self.what:
            steps.append(n)
            if len(steps) == step:
                os.kill(os.getpid(), sig)

    monkeypatch.setattr(util.Progress, "update", interrupting_update)


def _assert_consistent(out: Path, seed, epochs: int = 8) -> None:
    """What a kill leaves: a checkpoint that loads whole (or none), no finished run without its weights."""
    from kdpipe.resume import load_checkpoint
    ck = _checkpoint(out, epochs)
    if ck.exists():
        c = load_checkpoint(ck)
        assert sorted(c["state"]) == list(runs(epochs)), f"(seed {seed})"
    for name in runs(epochs):
        if (out / name / "metrics.json").exists():
            assert (out / name / "student.pt").is_file(), f"(seed {seed}) {name} finished without student.pt"


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(work, tmp_path):
    """6 SIGKILLs of real `kdpipe train-student` processes at random moments, 3 of a fused pass and 3 of
    an unfused one, with about 25 checkpoints in the pass (so kills land within epochs, while a checkpoint
    is written, and, aimed, while finished runs are written): after each, any checkpoint loads whole; the
    same command then finishes runs equal to an uninterrupted run's weight for weight, with the same
    per-epoch losses, skipping the runs that had finished, and removes the checkpoints."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    kills, moments = 0, []
    for fuse in ("on", "off"):
        ref = reference(work, fuse)
        out = tmp_path / f"killed-{fuse}"
        wall = train_wall_s(ref)  # each life trains at most about wall / 25 + wall / 8
        args = student_args(work, out, fuse, 8, 16, *every(wall))
        ck = _checkpoint(out)
        for life in range(3):
            before = stat_key(ck)
            p = _start(args)
            if life == 2 and fuse == "off":  # aimed: while the finished runs are being written
                hit = _wait(lambda: any((out / n / "metrics.json").exists() for n in RUNS), p)
                time.sleep(rng.uniform(0, 0.05))
            else:  # after some progress (a new checkpoint), at a random moment
                hit = _wait(lambda: stat_key(ck) not in (None, before), p)
                time.sleep(rng.uniform(0, wall / 8))
            alive = p.poll() is None
            p.kill()
            _, stderr = p.communicate(timeout=60)
            assert hit or p.returncode == 0, f"(seed {seed}) {stderr}"
            if not alive:
                assert p.returncode == 0, f"(seed {seed}) {stderr}"
                break  # the run finished before the kill
            kills += 1
            moments.append((fuse, life, sorted(p.name for p in out.glob("*/metrics.json"))))
            _assert_consistent(out, seed)
        finished = [n for n in RUNS if (out / n / "metrics.json").exists()]
        res = run_cli(args)
        assert res.exit_code == 0, res.output
        for n in finished:
            assert f"{n}: already finished" in res.output and "skipped" in res.output
        if len(finished) < len(RUNS) and ck.exists():
            assert "resuming from" in res.output
        assert_same_runs(ref, out)
        assert not (out / "checkpoints").exists(), "checkpoints were left after the pass"
    assert kills >= 5, f"(seed {seed}) only {kills} kills landed while training: {moments}"


def test_ctrl_c_and_sigterm_exit_130_and_say_how_to_resume(work, tmp_path):
    """Ctrl-C (SIGINT), then SIGTERM on the resumed run, mid-training: exit code 130, no traceback, one
    message saying how to resume; the same command then ends equal to an uninterrupted run."""
    out = tmp_path / "interrupted"
    args = student_args(work, out, "off", 8, 16, *every(train_wall_s(reference(work, "off"))))
    ck = _checkpoint(out)
    for sig in (signal.SIGINT, signal.SIGTERM):
        before = stat_key(ck)
        p = _start(args)
        assert _wait(lambda: stat_key(ck) not in (None, before), p), p.communicate()
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 130, f"{signal.Signals(sig).name}: exit code {p.returncode}\n{stderr}"
        assert "Traceback" not in stdout + stderr and "Aborted" not in stderr
        assert (f"interrupted: finished runs and the last checkpoint of each pass are kept in {out}; run the same "
                "command again to resume") in stderr
        if sig == signal.SIGTERM:
            assert "resuming from" in stdout
    res = run_cli(args)
    assert res.exit_code == 0, res.output
    assert "resuming from" in res.output
    assert_same_runs(reference(work, "off"), out)


def test_ctrl_c_mid_epoch_is_checkpointed_where_it_stopped(work, tmp_path, monkeypatch):
    """With checkpoints at epoch ends only, a Ctrl-C in the middle of epoch 3 is held until its step ends:
    the pass is checkpointed there (epoch 3, that step), the command exits 130, and the same command resumes
    from that step, ending equal to an uninterrupted run. No work since the last checkpoint is lost."""
    from kdpipe.resume import load_checkpoint

    out = tmp_path / "ctrl-c"
    args = student_args(work, out, "off", 8, 16, "--checkpoint-every", "0")
    signal_at(monkeypatch, epoch=3, step=5)
    res = run_cli(args)
    assert res.exit_code == 130, res.output
    assert "SIGINT: writing a checkpoint after this step" in res.output
    assert list(load_checkpoint(_checkpoint(out))["position"]) == [2, 5]
    monkeypatch.undo()
    shown = run_cli(["inspect", str(_checkpoint(out))])
    assert shown.exit_code == 0, shown.output
    assert "in epoch 3/8, after step 5" in shown.output
    for name in RUNS:
        assert f"{name}  (mlp_100, 2 epochs done)" in shown.output
    assert shown.output.count("test top-1 by epoch: ") == 2
    res = run_cli(args)
    assert res.exit_code == 0, res.output
    assert "resuming from" in res.output and "epoch 3/8, step 5" in res.output
    assert_same_runs(reference(work, "off"), out)


def test_dropout_runs_resumed_mid_epoch_equal_an_uninterrupted_sweep_and_each_run_alone(work, tmp_path, monkeypatch):
    """Runs with dropout drew their masks in turn from one generator shared by the pass, so a run's weights depended
    on the runs beside it (the T4 run of `--temperature 2,4` ended unlike `--temperature 4` alone). Each draws from
    its own stream now, which the pass checkpoint holds per run: a sweep interrupted mid-epoch resumes to the weights
    of the uninterrupted sweep, and each run equals itself trained alone. A checkpoint of an older kdpipe (no streams)
    still resumes, the runs' streams starting from its one, saying so once where two or more runs draw."""
    from kdpipe.resume import checkpoint_path

    def args(out, temps="2,4"):
        return ["train-student", "--cache", str(work.cache), "--student", "mlp:32:dropout=0.5", "--temperature",
                temps, "--epochs", "3", "--batch-size", "16", "--device", "cpu", "--fuse", "on", "--out", str(out),
                "--checkpoint-every", "0"]
    ref = tmp_path / "ref"
    res = run_cli(args(ref))
    assert res.exit_code == 0, res.output
    names = sorted(p.parent.name for p in ref.glob("*/metrics.json"))
    assert len(names) == 2 and all("-T2-" in n or "-T4-" in n for n in names), names
    for t in ("2", "4"):  # each run alone
        alone = tmp_path / f"alone-T{t}"
        assert run_cli(args(alone, t)).exit_code == 0
        assert_same_runs(ref, alone, [n for n in names if f"-T{t}-" in n])
    out = tmp_path / "interrupted"
    signal_at(monkeypatch, epoch=2, step=5)
    assert run_cli(args(out)).exit_code == 130
    monkeypatch.undo()
    older = tmp_path / "older"
    shutil.copytree(out, older)
    res = run_cli(args(out))
    assert res.exit_code == 0, res.output
    assert "resuming from" in res.output and "epoch 2/3, step 5" in res.output
    assert "older kdpipe" not in res.output
    assert_same_runs(ref, out, names)
    ck = checkpoint_path(older, 0, names)
    obj = torch.load(ck, weights_only=True)
    for part in obj["ranks"]:
        del part["streams"]
    torch.save(obj, ck)
    res = run_cli(args(older))
    assert res.exit_code == 0, res.output
    assert res.output.count("the checkpoint resumed was written by an older kdpipe") == 1, res.output


def test_a_pass_an_older_kdpipe_began_under_names_without_the_epochs_resumes_under_todays(work, tmp_path,
                                                                                         monkeypatch):
    """A pass interrupted in epoch 3 by a kdpipe of before 2026-12-07, whose names left out the epochs
    (mlp_100-T2-a0.9-s0): the same command of today, which names the runs mlp_100-T2-a0.9-e8-s0, started them
    over (hours lost on a long pass). Now it moves their directories, renames them in the pass checkpoint and
    resumes from it, ending equal to an uninterrupted run; the old checkpoint goes when the runs finish."""
    from kdpipe.resume import checkpoint_path

    out = tmp_path / "runs"
    args = student_args(work, out, "off", 8, 16, "--checkpoint-every", "0")
    signal_at(monkeypatch, epoch=3, step=5)
    assert run_cli(args).exit_code == 130
    monkeypatch.undo()
    old = {n: n.replace("-e8-", "-") for n in RUNS}  # as the older kdpipe named the runs and their checkpoint

    def by_old_names(d: dict) -> dict:
        return {old.get(k, k): v for k, v in d.items()}
    obj = torch.load(_checkpoint(out), weights_only=True)
    obj["runs"], obj["state"] = by_old_names(obj["runs"]), by_old_names(obj["state"])
    for part in obj["ranks"]:
        part["sums"], part["correct"] = by_old_names(part["sums"]), by_old_names(part["correct"])
    torch.save(obj, checkpoint_path(out, 0, old.values()))
    _checkpoint(out).unlink()
    for new, was in old.items():
        (out / new).rename(out / was)
        cfg = out / was / "config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "run": was}))
    res = run_cli(args)
    assert res.exit_code == 0, res.output
    assert "resuming from" in res.output and "epoch 3/8, step 5" in res.output
    for new, was in old.items():
        assert f"{out / was}, begun by an older kdpipe (run names hold the epochs" in res.output
        assert not (out / was).exists()
    assert_same_runs(reference(work, "off"), out)
    assert not (out / "checkpoints").exists()


def test_torchrun_two_processes_killed_then_resumed_equals_uninterrupted(work, tmp_path):
    """Under torchrun (2 processes, gloo): an uninterrupted run, and one whose whole process group (the
    launcher and both workers) is SIGKILLed at a random moment, then resumed by the same command: equal
    weight for weight, with the same losses (each rank's share of the epoch's sums is in the checkpoint)."""
    from test_distributed import torchrun

    ref, out = tmp_path / "ref", tmp_path / "killed"
    r = torchrun(student_args(work, ref, "off", 6, 8))
    assert r.returncode == 0, r.stdout + r.stderr
    wall = train_wall_s(ref, 6)
    args = lambda o: student_args(work, o, "off", 6, 8, *every(wall))  # noqa: E731
    env = dict(subprocess_env(), KDPIPE_DIST_TIMEOUT="60")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "kdpipe", *args(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, start_new_session=True)
    ck = _checkpoint(out, 6)
    hit = _wait(lambda: ck.exists(), p, timeout=120)
    time.sleep(random.uniform(0, wall / 3))
    alive = p.poll() is None
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    stdout, stderr = p.communicate(timeout=60)
    assert hit and alive, f"the run ended before the kill: {stdout}{stderr}"
    _assert_consistent(out, "torchrun", 6)
    r = torchrun(args(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from" in r.stdout or "already finished" in r.stdout
    assert_same_runs(ref, out, runs(6))


# ---------------------------------------------------------------- in this process

def test_rerun_skips_finished_runs_and_refuses_other_settings_unless_overwrite(work, tmp_path):
    """The same command again trains nothing and changes no file; other settings are refused in one line
    naming every difference (nothing changes); --overwrite starts those runs over."""
    out = tmp_path / "runs"
    args, names = student_args(work, out, "off", 1, 32), runs(1)
    res = run_cli(args)
    assert res.exit_code == 0, res.output
    before = files_digest(out)
    res = run_cli(args)
    assert res.exit_code == 0, res.output
    for name in names:  # skipped, and metrics.json touched: up to date for make again
        assert (out / name / "metrics.json").stat().st_mtime_ns > before[f"{name}/metrics.json"][1]
        assert f"{name}: already finished ({out / name / 'metrics.json'}), skipped" in res.output
    assert "training" not in res.output and _contents(out) == _contents(before)
    # it said "2 run(s) written" when it had written none
    assert f"0 run(s) written under {out}, {len(names)} skipped (finished before)\n" in res.output
    # Settings the run names leave out (SGD's defaults: kdpipe.sweep.training_tag) but a run depends on.
    other = student_args(work, out, "off", 1, 16)
    line = assert_one_line_error(run_cli(other), f"{out} holds 2 run(s) with other settings",
                                 "batch_size was 32, now 16", "--overwrite")
    assert all(name in line for name in names)
    assert _contents(out) == _contents(before)
    res = run_cli(other + ["--overwrite"])
    assert res.exit_code == 0, res.output
    assert f"--overwrite: starting {names[0]} over (batch_size was 32, now 16" in res.output
    for name in names:
        assert json.loads((out / name / "config.json").read_text())["batch_size"] == 16
    # Other epochs are another run, named apart (they were one name before 2026-12-07, and refused): trained beside
    res = run_cli(student_args(work, out, "off", 2, 16))
    assert res.exit_code == 0 and "already finished" not in res.output, res.output
    assert all(json.loads((out / n / "metrics.json").read_text())["epochs"] == 2 for n in runs(2))
    assert all((out / n / "metrics.json").is_file() for n in names)
    (out / names[0] / "config.json").unlink()  # a run whose settings cannot be known is not taken as finished
    assert_one_line_error(run_cli(other), f"{names[0]} (a metrics.json without the config.json that says its settings)")


def width_net(folder: Path) -> Path:
    """A user's file nets.py whose Net takes a width (--arch-args width=N)."""
    net = folder / "nets.py"
    net.write_text("import torch.nn as nn\n\n\ndef Net(num_classes, image_shape, width=8):\n"
                   "    c, h, w = image_shape\n"
                   "    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, width), nn.ReLU(), "
                   "nn.Linear(width, num_classes))\n")
    return net


def test_sweeps_differing_only_in_arch_args_are_runs_of_their_own_names_in_one_out(work, tmp_path):
    """Before, both sweeps named their run nets.py_Net-T4-a0.9-s0: the second was refused as other settings."""
    net = width_net(tmp_path)
    out = tmp_path / "runs"

    def args(width):
        return ["train-student", "--cache", str(work.cache), "--student", f"{net}:Net", "--arch-args",
                f"width={width}", "--epochs", "1", "--device", "cpu", "--out", str(out)]

    for width in (4, 8):
        res = run_cli(args(width))
        assert res.exit_code == 0, res.output
    runs = {p.name: json.loads((p / "config.json").read_text())["arch_args"]
            for p in out.iterdir() if (p / "metrics.json").exists()}
    assert runs == {"nets.py_Net-width4-T4-a0.9-e1-s0": {"width": 4}, "nets.py_Net-width8-T4-a0.9-e1-s0": {"width": 8}}
    res = run_cli(args(4))
    assert res.exit_code == 0 and "nets.py_Net-width4-T4-a0.9-e1-s0: already finished" in res.output, res.output


def test_a_run_an_older_kdpipe_named_without_its_arch_args_is_moved_to_its_name_not_trained_again(work, tmp_path):
    """Before b2b8922 the run was nets.py_Net-T4-a0.9-s0; the same command of b2b8922 trained it again as
    nets.py_Net-width4-T4-a0.9-s0 beside the old directory, without a word, and a report showed it twice. (Today's
    name also holds the epochs: nets.py_Net-width4-T4-a0.9-e1-s0.)"""
    net = width_net(tmp_path)
    out = tmp_path / "runs"
    args = ["train-student", "--cache", str(work.cache), "--student", f"{net}:Net", "--arch-args", "width=4",
            "--epochs", "1", "--device", "cpu", "--out", str(out)]
    assert run_cli(args).exit_code == 0
    new, old = out / "nets.py_Net-width4-T4-a0.9-e1-s0", out / "nets.py_Net-T4-a0.9-s0"
    new.rename(old)  # as an older kdpipe named it
    for f in ("config.json", "metrics.json"):
        (old / f).write_text(json.dumps({**json.loads((old / f).read_text()), "run": old.name}))
    res = run_cli(args)
    assert res.exit_code == 0, res.output
    assert f"{old}: finished by an older kdpipe" in res.output and "already finished" in res.output, res.output
    assert "training 1 student" not in res.output
    assert not old.exists() and json.loads((new / "metrics.json").read_text())["run"] == new.name
    # one of other settings (an older kdpipe recorded no digest of the student's file) stays, and it is said
    new.rename(old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["student_file_sha256"]
    (old / "config.json").write_text(json.dumps(cfg))
    res = run_cli(args)
    assert res.exit_code == 0, res.output
    assert f"{old}, named by an older kdpipe" in res.output and "student_file_sha256 was None" in res.output
    assert (old / "metrics.json").is_file() and (new / "metrics.json").is_file()
    # an older kdpipe's run without --arch-args had that name too: it is another run, and nothing is said of it
    shutil.rmtree(old)
    shutil.rmtree(new)
    plain = out / "nets.py_Net-T4-a0.9-e1-s0"
    assert run_cli(args[:5] + args[7:]).exit_code == 0 and (plain / "metrics.json").is_file()
    plain.rename(old)
    for f in ("config.json", "metrics.json"):
        (old / f).write_text(json.dumps({**json.loads((old / f).read_text()), "run": old.name}))
    res = run_cli(args)
    assert res.exit_code == 0 and "older kdpipe" not in res.output, res.output
    assert (old / "metrics.json").is_file() and (new / "metrics.json").is_file()
    res = run_cli(args[:5] + args[7:])  # its own command moves it to today's name, with the epochs
    assert res.exit_code == 0 and f"{old}: finished by an older kdpipe" in res.output, res.output
    assert not old.exists() and (plain / "metrics.json").is_file()


def test_runs_an_older_kdpipe_named_without_their_epochs_are_moved_when_of_the_same_settings(work, tmp_path):
    """Plain SGD runs were named without their epochs (mlp_100-T4-a0.9-s0), so a sweep of 1 and 2 epochs into one
    --out was refused as other settings. Today's names hold them; a finished run of the older name is moved to
    its new one when its settings match (skipped, not trained again beside it), and is left, with a line saying
    so, when they do not (a run of other epochs, which the new name now trains apart)."""
    out = tmp_path / "runs"
    assert run_cli(student_args(work, out, "off", 1, 32)).exit_code == 0
    for new in runs(1):  # as the kdpipe of before 2026-12-07 named them
        old = out / new.replace("-e1-", "-")
        (out / new).rename(old)
        for f in ("config.json", "metrics.json"):
            (old / f).write_text(json.dumps({**json.loads((old / f).read_text()), "run": old.name}))
    res = run_cli(student_args(work, out, "off", 2, 32))
    assert res.exit_code == 0, res.output
    for new in runs(2):
        old = out / new.replace("-e2-", "-")
        assert f"{old}, named by an older kdpipe" in res.output and "epochs was 1, now 2): left as it is" in res.output
        assert old.is_dir() and json.loads((out / new / "metrics.json").read_text())["epochs"] == 2
    res = run_cli(student_args(work, out, "off", 1, 32))
    assert res.exit_code == 0 and "training" not in res.output, res.output
    for new in runs(1):
        old = out / new.replace("-e1-", "-")
        assert f"{old}: finished by an older kdpipe (run names hold the epochs" in res.output
        assert f"{new}: already finished" in res.output and not old.exists()
        assert json.loads((out / new / "metrics.json").read_text())["run"] == new
    assert sorted(p.name for p in out.iterdir()) == sorted(runs(1) + runs(2))


def test_a_run_renamed_in_its_checkpoint_whose_directory_a_crash_left_at_its_old_name_is_moved(tmp_path):
    """The pass checkpoint is renamed first, then the run directory moved: a command stopped between the two left
    the directory at its older name for good (today's name, held by the checkpoint, was no longer looked for under
    an older one), an unfinished run that report and compress listed and no command ever finished."""
    from kdpipe.resume import checkpoint_path, plan_runs_dir, settings
    out = tmp_path / "runs"
    old, new = "mlp_100-T4-a0.9-s0", "mlp_100-T4-a0.9-e8-s0"
    cfg = {"run": new, "student": "mlp:100", "epochs": 8, "seed": 0}
    (out / old).mkdir(parents=True)
    (out / old / "config.json").write_text(json.dumps({**cfg, "run": old}))
    ck = checkpoint_path(out, 0, [old])  # already renamed in it
    ck.parent.mkdir()
    torch.save({"kdpipe_pass_checkpoint": 1, "seed": 0, "epochs": 8, "runs": {new: settings(cfg)}, "position": [3, 5],
                "seen": 0, "wall_s": 0.0, "state": {new: {}}, "ranks": [{"sums": {}, "correct": {}}]}, ck)
    lines = []
    plan = plan_runs_dir(out, {new: cfg}, log=lines.append, older={new: [old]})
    assert plan.resume == {new: str(ck)} and not plan.finished
    assert not (out / old).exists(), lines
    assert json.loads((out / new / "config.json").read_text())["run"] == new
    assert any(f"{out / old}, begun by an older kdpipe" in x for x in lines), lines


def test_a_run_begun_with_another_world_size_is_refused_saying_how_to_resume_it(work, tmp_path):
    """A run begun under torchrun and rerun as one process (or the reverse) is refused, as its world size is one
    of its settings; the line says to rerun with the processes it was begun with (which resumes it), not only to
    start it over with --overwrite."""
    from kdpipe import KDPipeError
    from kdpipe.resume import plan_runs_dir
    out = tmp_path / "runs"
    args = student_args(work, out, "off", 1, 32)
    res = run_cli(args)
    assert res.exit_code == 0, res.output
    configs = {name: json.loads((out / name / "config.json").read_text()) for name in runs(1)}
    with pytest.raises(KDPipeError, match=r"world_size was 1, now 2\): they were begun with 1 process\(es\): run "
                                          r"the same command as one process \(without torchrun\) to resume them"):
        plan_runs_dir(out, {n: {**c, "world_size": 2, "effective_batch_size": 64} for n, c in configs.items()})
    for name, c in configs.items():  # as if begun by torchrun --nproc-per-node 2 with --batch-size 32
        (out / name / "config.json").write_text(json.dumps({**c, "world_size": 2, "effective_batch_size": 64}))
    assert_one_line_error(run_cli(args), "world_size was 2, now 1", "they were begun with 2 process(es): run the "
                          "same command under torchrun --nproc-per-node 2 to resume them, or pass --overwrite")
    (out / runs(1)[0] / "config.json").write_text(json.dumps({**configs[runs(1)[0]], "world_size": 2, "epochs": 3}))
    line = assert_one_line_error(run_cli(args), "epochs was 3, now 1", "--overwrite")
    assert "begun with" not in line  # another setting differs too: resuming with 2 processes would not do


def _contents(d) -> dict:
    """files_digest without the times (a skipped run's metrics.json is touched)."""
    return {k: v[0] for k, v in (d if isinstance(d, dict) else files_digest(d)).items()}


def test_pipelines_forward_the_checkpoint_options_and_keep_finished_runs(tmp_path):
    """A [[students]] block's checkpoint_every and keep_checkpoints reach train-student; Make reruns it with
    --overwrite (its settings changed) and never deletes a finished run's metrics.json (.PRECIOUS)."""
    from kdpipe.pipeline import load_pipeline, make_rules

    spec = (Path(__file__).parents[1] / "pipelines" / "default.toml").read_text()
    (tmp_path / "p.toml").write_text(spec + "checkpoint_every = 2.5\nkeep_checkpoints = true\n")
    rules = make_rules(load_pipeline(tmp_path / "p.toml"))
    command = next(line for line in rules.splitlines() if "train-student" in line)
    assert "--checkpoint-every 2.5 --keep-checkpoints --overwrite --out" in command
    precious = next(line for line in rules.splitlines() if line.startswith(".PRECIOUS:"))
    assert "students/mlp_100-scratch-e30-h95f4e3-s0/metrics.json" in precious and precious.count("metrics.json") == 12



def test_a_pipelines_teacher_checkpoint_every_is_forwarded_but_not_stamped(tmp_path):
    """[teacher] checkpoint_every reaches train-teacher, but not the step's stamp: changing how often a
    teacher checkpoints must not make Make retrain it."""
    from kdpipe.pipeline import load_pipeline, make_rules

    spec = (Path(__file__).parents[1] / "pipelines" / "default.toml").read_text()
    stamps = {}
    for every in ("", "2.5"):
        text = spec.replace("[teacher]\n", f"[teacher]\ncheckpoint_every = {every}\n" if every else "[teacher]\n")
        (tmp_path / "p.toml").write_text(text)
        rules = make_rules(load_pipeline(tmp_path / "p.toml"), str(tmp_path / f"stamps{every}"))
        command = next(line for line in rules.splitlines() if "train-teacher" in line)
        assert command.endswith(("--checkpoint-every 2.5 --overwrite" if every else "--overwrite"))
        stamps[every] = (tmp_path / f"stamps{every}" / "teacher.cmd").read_text()
    assert stamps[""] == stamps["2.5"] and "checkpoint" not in stamps[""] and "overwrite" not in stamps[""]

def test_checkpoint_size_is_printed_once_and_checkpoints_go_when_the_pass_ends(work, tmp_path):
    """One line gives the checkpoint's path and size when it is first written; the pass ends without
    RUNS/checkpoints, unless --keep-checkpoints."""
    out = tmp_path / "runs"
    res = run_cli(student_args(work, out, "on", 3, 32))
    assert res.exit_code == 0, res.output
    assert res.output.count("checkpoint of the pass: ") == 1
    assert f"checkpoint of the pass: {_checkpoint(out, 3)} (" in res.output and " MB, written in " in res.output
    assert not (out / "checkpoints").exists()
    kept = tmp_path / "kept"
    res = run_cli(student_args(work, kept, "on", 3, 32, "--keep-checkpoints"))
    assert res.exit_code == 0, res.output
    assert [p.name for p in (kept / "checkpoints").iterdir()] == [_checkpoint(kept, 3).name]


def test_report_lists_unfinished_runs_and_a_rerun_finishes_them(work, tmp_path):
    """A runs directory with a finished run and an unfinished one (killed while finishing: config.json
    and the pass's last checkpoint, no metrics.json): the report shows the finished run and lists the
    other as unfinished; the same train-student command finishes it from the checkpoint, equal to the
    uninterrupted run."""
    from kdpipe.report import build_report

    out = tmp_path / "runs"
    args = student_args(work, out, "on", 8, 16, "--keep-checkpoints")
    res = run_cli(args)
    assert res.exit_code == 0, res.output
    done = tmp_path / "done"
    shutil.copytree(out, done)
    for f in ("metrics.json", "student.pt"):
        (out / RUNS[1] / f).unlink()
    res = run_cli(["report", str(out), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert f"unfinished: 1 run(s) not reported (run their train-student command again): {RUNS[1]}" in res.output
    text = (tmp_path / "rep" / "report.md").read_text()
    assert RUNS[1] in text.split("Unfinished")[1] and "1 student run(s)" in text
    assert json.loads((tmp_path / "rep" / "summary.json").read_text())["unfinished"] == [str(out / RUNS[1])]
    (out / RUNS[0] / "metrics.json").unlink()
    with pytest.raises(Exception, match="no finished runs yet"):
        build_report([out], tmp_path / "rep2")
    res = run_cli(args)
    assert res.exit_code == 0, res.output
    assert "resuming from" in res.output and "8/8 epochs done" in res.output
    assert_same_runs(done, out)


def test_a_full_disk_while_checkpointing_is_one_line_and_the_rerun_resumes(work, tmp_path, monkeypatch):
    """The disk fills as the second checkpoint is written: one clear line (exit 2), no temporary left,
    the first checkpoint intact; the same command then resumes from it, equal to an uninterrupted run."""
    import errno

    out = tmp_path / "runs"
    args = student_args(work, out, "on", 8, 16)
    real, calls = os.fsync, {"n": 0}

    def fsync(fd):
        if ".pass-s0-" in os.readlink(f"/proc/self/fd/{fd}"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)
    with monkeypatch.context() as mp:
        mp.setattr(os, "fsync", fsync)
        res = run_cli(args)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    errors = [line for line in res.stderr.splitlines() if not line.startswith("  students s0 epoch ")]
    assert errors == [f"Error: cannot write {_checkpoint(out)}: no space left on the device; nothing partial was kept, "
                      "run the same command again once the location is writable"], res.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == [_checkpoint(out).name]
    res = run_cli(args)
    assert res.exit_code == 0, res.output
    assert "resuming from" in res.output and "1/8 epochs done" in res.output
    assert_same_runs(reference(work, "on"), out)


@pytest.mark.parametrize("mid_epoch", [False, True], ids=["at-epoch-ends", "within-epochs"])
def test_a_resumed_pass_keeps_history_best_epoch_and_train_top1(work, tmp_path, monkeypatch, mid_epoch):
    """With a validation split, a pass that crashes after a checkpoint and is resumed ends with the same
    history (losses, train top-1, validation and test figures per epoch), best epoch and best weights as an
    uninterrupted one: the checkpoint keeps what each epoch's evaluation recorded."""
    from kdpipe import resume

    def args(out):
        return student_args(work, out, "on", 5, 16, "--val-fraction", "0.25", "--checkpoint-every",
                            "1" if mid_epoch else "0")

    ref = tmp_path / "ref"
    res = run_cli(args(ref))
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in ref.iterdir() if (p / "metrics.json").exists())
    assert len(names) == 2 and all((ref / n / "student-best.pt").exists() for n in names)
    real_save, saves, steps = resume.PassCheckpoint.save, [], []

    def crash_after_a_save(self, *a, **k):
        real_save(self, *a, **k)
        saves.append(a[2:4])  # (epoch, step)
        if len(saves) == 4:
            raise RuntimeError("simulated crash after a checkpoint")

    def every_fourth_step(self):
        steps.append(1)
        return len(steps) % 4 == 0

    monkeypatch.setattr(resume.PassCheckpoint, "save", crash_after_a_save)
    if mid_epoch:
        monkeypatch.setattr(resume.PassCheckpoint, "due", every_fourth_step)
    out = tmp_path / "out"
    res = run_cli(args(out))
    assert res.exit_code != 0 and len(saves) == 4
    assert any(step for _, step in saves) == mid_epoch  # the crash came after checkpoints within epochs, or not
    monkeypatch.undo()
    res = run_cli(args(out))
    assert res.exit_code == 0, res.output
    assert "resuming from" in res.output
    assert_same_runs(ref, out, names)


# ---------------------------------------------------------------- train-teacher

def teacher_args(work, out: Path, *extra) -> list[str]:
    """A teacher with dropout (its RNG must resume too) on the module's 192 digits: 4 epochs of 12 steps."""
    return ["train-teacher", "--data", f"npz:{work.root / 'digits.npz'}", "--arch", "mlp:64:dropout=0.3",
            "--epochs", "4", "--batch-size", "16", "--optimizer", "adam", "--lr", "0.003", "--warmup-epochs", "1",
            "--device", "cpu", "--out", str(out), *extra]


def _teacher_record(path: Path) -> tuple[dict, list]:
    obj = torch.load(path, map_location="cpu", weights_only=False)
    return obj["state_dict"], obj["history"]


def test_a_teacher_interrupted_mid_epoch_resumes_to_the_same_teacher(work, tmp_path, monkeypatch):
    """A Ctrl-C in the middle of epoch 2 of train-teacher is held until its step ends: OUT.checkpoint holds
    the training there, the command exits 130 saying how to resume, and the same command resumes from that
    step and saves the teacher an uninterrupted training saves, weight for weight, with the same per-epoch
    history; the checkpoint is then removed."""
    from kdpipe.resume import load_checkpoint
    from kdpipe.teacher import teacher_checkpoint_path

    ref = tmp_path / "ref.pt"
    res = run_cli(teacher_args(work, ref))
    assert res.exit_code == 0, res.output
    assert not teacher_checkpoint_path(ref).exists(), "the checkpoint was left after the teacher was saved"

    out = tmp_path / "teacher.pt"
    ck = teacher_checkpoint_path(out)
    signal_at(monkeypatch, epoch=2, step=5)
    res = run_cli(teacher_args(work, out, "--checkpoint-every", "0"))
    assert res.exit_code == 130, res.output
    assert "SIGINT: writing a checkpoint after this step" in res.output
    assert f"the training's last checkpoint is kept in {ck}; run the same command again to resume" in res.stderr
    assert not out.exists() and list(load_checkpoint(ck)["position"]) == [1, 5]
    monkeypatch.undo()
    # inspect tells where a training in progress stands, with the epochs it has recorded
    shown = run_cli(["inspect", str(ck)])
    assert shown.exit_code == 0, shown.output
    first = load_checkpoint(ck)["state"]["teacher"]["track"][0]
    assert f"training in progress {ck}" in shown.output and "in epoch 2/4, after step 5" in shown.output
    assert "teacher  (mlp:64:dropout=0.3, 1 epochs done)" in shown.output
    assert f"test top-1 by epoch: {first['test_top1']:.4f}\n" in shown.output
    record = json.loads(run_cli(["inspect", str(ck), "--json"]).output)
    assert record["position"] == {"epoch": 1, "step": 5} and record["runs"]["teacher"]["history"] == [first]
    res = run_cli(teacher_args(work, out, "--checkpoint-every", "0"))
    assert res.exit_code == 0, res.output
    assert f"resuming from {ck}: epoch 2/4, step 5" in res.output
    assert f"checkpoint of the teacher's training: {ck} (" in res.output
    assert not ck.exists()
    (want, want_history), (got, got_history) = _teacher_record(ref), _teacher_record(out)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert [h["epoch"] for h in got_history] == [1, 2, 3, 4]
    assert got_history == want_history


def test_a_teacher_checkpoint_with_other_settings_is_refused_unless_overwrite(work, tmp_path, monkeypatch):
    """A SIGTERM at the first step of epoch 3: exit 130, no traceback, the checkpoint kept. The same command
    with another --lr is refused in one line naming the difference, the checkpoint untouched; with
    --overwrite that training starts over, and ends equal to an uninterrupted one at that lr."""
    from kdpipe.teacher import teacher_checkpoint_path

    out = tmp_path / "teacher.pt"
    ck = teacher_checkpoint_path(out)
    signal_at(monkeypatch, epoch=3, step=1, sig=signal.SIGTERM)
    res = run_cli(teacher_args(work, out))
    monkeypatch.undo()
    assert res.exit_code == 130, res.output
    assert "Traceback" not in res.output and "run the same command again to resume" in res.stderr
    assert ck.is_file() and not out.exists()
    key = stat_key(ck)
    other = [a if a != "0.003" else "0.001" for a in teacher_args(work, out)]
    assert_one_line_error(run_cli(other), f"{ck} is the checkpoint of a teacher training with other settings",
                          "optim.lr was 0.003, now 0.001", "--overwrite")
    assert stat_key(ck) == key
    res = run_cli(other + ["--overwrite"])
    assert res.exit_code == 0, res.output
    assert "had other settings" in res.output and "resuming" not in res.output and not ck.exists()
    ref = tmp_path / "ref.pt"
    assert run_cli([a if a != str(out) else str(ref) for a in other]).exit_code == 0
    (want, _), (got, _) = _teacher_record(ref), _teacher_record(out)
    assert all(torch.equal(want[k], got[k]) for k in want)


NETS = """import torch.nn as nn
def Net(num_classes, image_shape, width=WIDTH):
    return nn.Sequential(nn.Flatten(), nn.Linear(image_shape[-1] * image_shape[-2], width), nn.ACT(),
                         nn.Linear(width, num_classes))
"""


def test_a_teacher_of_the_users_code_edited_since_its_checkpoint_is_not_resumed(work, tmp_path, monkeypatch):
    """A teacher built from the user's own file, interrupted, then the file edited (another activation: the
    weights still fit): the same command was resuming the saved weights into the other network, mixing two
    models in one teacher, silently. Now it is refused in one line naming the file's change, and with
    --overwrite it starts over. A checkpoint whose weights no longer fit the network its spec builds (the width
    changed, checked past the file's digest) is one line, not a load_state_dict traceback."""
    from kdpipe import KDPipeError
    from kdpipe.engine import OptimConfig, build_run
    from kdpipe.resume import PassCheckpoint
    from kdpipe.teacher import teacher_checkpoint_path

    nets = tmp_path / "nets.py"
    nets.write_text(NETS.replace("WIDTH", "16").replace("ACT", "ReLU"))
    out = tmp_path / "teacher.pt"
    ck = teacher_checkpoint_path(out)
    args = [a if a != "mlp:64:dropout=0.3" else f"{nets}:Net" for a in teacher_args(work, out, "--checkpoint-every",
                                                                                     "0")]
    signal_at(monkeypatch, epoch=2, step=3)
    assert run_cli(args).exit_code == 130
    monkeypatch.undo()
    assert ck.is_file()
    key = stat_key(ck)
    nets.write_text(NETS.replace("WIDTH", "16").replace("ACT", "Tanh"))
    assert_one_line_error(run_cli(args), f"{ck} is the checkpoint of a teacher training with other settings",
                          "arch_file_sha256 was", "--overwrite")
    assert stat_key(ck) == key and not out.exists()

    nets.write_text(NETS.replace("WIDTH", "24").replace("ACT", "ReLU"))  # past the digest: the weights do not fit
    run = build_run("teacher", f"{nets}:Net", "kd", 0, 10, (1, 28, 28), OptimConfig(), 10, torch.device("cpu"))
    ckpt = PassCheckpoint(tmp_path, 0, {}, 4, 0, resume_from=str(ck), path=ck)
    with pytest.raises(KDPipeError, match="do not fit the model .* builds now .*delete the checkpoint") as e:
        ckpt.restore([run])
    assert "\n" not in str(e.value)

    nets.write_text(NETS.replace("WIDTH", "16").replace("ACT", "Tanh"))
    res = run_cli(args + ["--overwrite"])
    assert res.exit_code == 0, res.output
    assert "had other settings (arch_file_sha256 was" in res.output and "resuming" not in res.output


def test_a_student_of_the_users_code_edited_since_its_run_is_not_taken_for_it(work, tmp_path, monkeypatch):
    """A student of the user's own file, trained, then the file edited (another activation: the weights still fit):
    the same train-student command said the run was finished and skipped it, so the runs folder held the old
    network's run as the new one's; an interrupted pass resumed its weights into the other network. Now both are
    refused in one line naming the file's change."""
    nets = tmp_path / "nets.py"
    nets.write_text(NETS.replace("WIDTH", "16").replace("ACT", "ReLU"))
    out = tmp_path / "runs"
    args = [a if a != "mlp_100" else f"{nets}:Net" for a in student_args(work, out, "off", 2)]
    assert run_cli(args).exit_code == 0
    assert run_cli(args).exit_code == 0  # the same code: the finished runs are kept
    nets.write_text(NETS.replace("WIDTH", "16").replace("ACT", "Tanh"))
    assert_one_line_error(run_cli(args), "with other settings", "student_file_sha256 was", "--overwrite")
    nets.write_text(NETS.replace("WIDTH", "16").replace("ACT", "ReLU"))
    signal_at(monkeypatch, epoch=1, step=3)  # an interrupted pass of the first code
    assert run_cli(args[:-1] + [str(tmp_path / "again")]).exit_code == 130
    monkeypatch.undo()
    nets.write_text(NETS.replace("WIDTH", "16").replace("ACT", "Tanh"))
    assert_one_line_error(run_cli(args[:-1] + [str(tmp_path / "again")]), "student_file_sha256 was", "--overwrite")


def test_make_rerunning_a_finished_teacher_of_the_same_settings_keeps_it(work, tmp_path):
    """A pipeline's teacher rule passes --overwrite; Make reruns it when the npz or CSV file was merely touched or
    copied again. train-teacher retrained the teacher from scratch (hours, and a new file whose digest then
    re-dumped the cache and retrained every student). Now a teacher that its file says was trained with the same
    settings on the same data is kept, byte for byte, with a line saying so (its mtime made current, for Make);
    one of other settings is still replaced."""
    import hashlib

    from kdpipe.teacher import teacher_checkpoint_path

    out = tmp_path / "teacher.pt"
    args = [a if a != "4" else "1" for a in teacher_args(work, out)]  # one epoch
    assert run_cli(args).exit_code == 0
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    os.utime(out, (time.time() - 100, time.time() - 100))
    teacher_checkpoint_path(out).write_bytes(b"left by a crash after the teacher was saved")
    res = run_cli(args + ["--overwrite"])
    assert res.exit_code == 0, res.output
    assert f"{out} already holds a teacher trained with these settings on this data" in res.output
    assert "training teacher" not in res.output and f"teacher kept in {out}" in res.output
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before and out.stat().st_mtime > time.time() - 50
    assert not teacher_checkpoint_path(out).exists()
    res = run_cli([a if a != "0.003" else "0.001" for a in args] + ["--overwrite"])  # other settings: replaced
    assert res.exit_code == 0, res.output
    assert "training teacher" in res.output and hashlib.sha256(out.read_bytes()).hexdigest() != before


def test_make_rerunning_a_teacher_it_cannot_keep_says_why_it_trains_it_again(work, tmp_path):
    """A teacher.pt of a kdpipe before f25bff6 records no settings: after an upgrade, Make's teacher rule (with
    --overwrite) trained it again from scratch without a word about the file it replaced, nor why."""
    import torch

    out = tmp_path / "teacher.pt"
    args = [a if a != "4" else "1" for a in teacher_args(work, out)]  # one epoch
    assert run_cli(args).exit_code == 0
    ck = torch.load(out, map_location="cpu", weights_only=True)
    torch.save({k: v for k, v in ck.items() if k != "settings"}, out)  # as an older kdpipe saved it
    res = run_cli(args + ["--overwrite"])
    assert res.exit_code == 0, res.output
    assert f"{out} was saved by an older kdpipe, which did not record the settings" in res.output, res.output
    res = run_cli([a if a != "0.003" else "0.001" for a in args] + ["--overwrite"])
    assert res.exit_code == 0, res.output
    assert f"{out} holds a teacher of other settings (optim.lr was 0.003, now 0.001)" in res.output, res.output


def test_a_run_overwritten_out_of_a_shared_pass_checkpoint_resumes_after_another_interruption(work, tmp_path,
                                                                                               monkeypatch):
    """--overwrite starting one run of a pass over (its other run not in the command) takes it out of that pass's
    checkpoint file, not only out of the plan: else the same command, interrupted and run again, found the old
    settings there once more and started the run over again, throwing away its new checkpoint every time."""
    from kdpipe.resume import load_checkpoint

    out = tmp_path / "runs"
    names = runs(2)
    signal_at(monkeypatch, epoch=1, step=2)
    res = run_cli(student_args(work, out, "off", 2, 32, "--checkpoint-every", "0"))
    assert res.exit_code == 130, res.output
    old = _checkpoint(out, 2)
    assert sorted(load_checkpoint(old)["runs"]) == sorted(names)
    monkeypatch.undo()
    # one of the two runs, with another batch size (not in its name), started over
    args = student_args(work, out, "off", 2, 16, "--checkpoint-every", "0", "--overwrite")
    args[args.index("2,4")] = "2"
    signal_at(monkeypatch, epoch=1, step=3)
    res = run_cli(args)
    assert res.exit_code == 130, res.output
    assert f"--overwrite: starting {names[0]} over (batch_size was 32, now 16" in res.output
    assert sorted(load_checkpoint(old)["runs"]) == [names[1]]
    monkeypatch.undo()
    res = run_cli(args)  # the same command again resumes the run where it stopped
    assert res.exit_code == 0, res.output
    assert "starting" not in res.output and "resuming from" in res.output and "epoch 1/2, step 3" in res.output
    # the other run, still in the first checkpoint with its own settings, resumes from it
    args = student_args(work, out, "off", 2, 32, "--checkpoint-every", "0")
    args[args.index("2,4")] = "4"
    res = run_cli(args)
    assert res.exit_code == 0 and "resuming from" in res.output and "epoch 1/2, step 2" in res.output, res.output


def test_overwrite_removes_every_file_of_the_run_it_starts_over(tmp_path):
    """--overwrite removed metrics.json, config.json and student.pt only: the older run's student-best.pt, history.csv
    and projector.pt stayed beside the new run's files, read as its own until it finished (or for good where it
    keeps no best epoch)."""
    from kdpipe.features import PROJECTOR_FILE
    from kdpipe.resume import RUN_FILES, plan_runs_dir
    assert PROJECTOR_FILE in RUN_FILES
    out, name = tmp_path / "runs", "m-T4-a0.9-e2-s0"
    (out / name).mkdir(parents=True)
    for f in RUN_FILES:
        (out / name / f).write_text(json.dumps({"run": name, "batch_size": 32}) if f.endswith(".json") else "old")
    (out / name / "notes.txt").write_text("the user's")  # not the run's: kept
    lines = []
    plan_runs_dir(out, {name: {"run": name, "batch_size": 16}}, overwrite=True, log=lines.append)
    assert any("--overwrite: starting m-T4-a0.9-e2-s0 over (batch_size was 32, now 16" in x for x in lines), lines
    assert sorted(p.name for p in (out / name).iterdir()) == ["notes.txt"]


def test_a_scratch_run_recorded_with_another_temperature_is_the_same_run(tmp_path):
    """A kd run at alpha 0 uses no T, and its config.json holds the sweep's first T: a sweep of another T (a
    pipeline's temperature edited) has the same scratch run, skipped on a rerun, where it was refused as other
    settings (or retrained by a pipeline's --overwrite)."""
    from kdpipe.resume import plan_runs_dir, settings
    name = "m-scratch-e2-s0"

    def config(t):
        return {"run": name, "loss": {"name": "kd", "options": {"temperature": t, "alpha": 0.0}},
                "temperature": t, "alpha": 0.0, "batch_size": 16}
    assert settings(config(2.0)) == settings(config(4.0))
    kd = {**config(2.0), "alpha": 0.5, "loss": {"name": "kd", "options": {"temperature": 2.0, "alpha": 0.5}}}
    assert settings(kd) != settings({**kd, "temperature": 4.0, "loss": {"name": "kd", "options": {
        "temperature": 4.0, "alpha": 0.5}}})  # where T is used, it is a setting
    out = tmp_path / "runs"
    (out / name).mkdir(parents=True)
    (out / name / "config.json").write_text(json.dumps(config(2.0)))
    (out / name / "metrics.json").write_text(json.dumps({"name": name}))
    plan = plan_runs_dir(out, {name: config(4.0)}, overwrite=True, log=lambda *a: None)
    assert name in plan.finished and (out / name / "metrics.json").is_file()
