"""Environment variables: every KDPIPE_* one is declared in kdpipe.util.ENV_VARS, a bad value is a
one-line error (exit code 2) before any command runs, and `import kdpipe` leaves the user's
HDF5_USE_FILE_LOCKING alone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kdpipe.cli import main
from kdpipe.util import ENV_VARS, env

REPO = Path(__file__).resolve().parents[1]

BAD = {  # name -> (a bad value, words the error must hold)
    "KDPIPE_THREADS": ("four", "is not a whole number"),
    "KDPIPE_IMAGES_ON_HOST": ("yes", "must be 0 or 1"),
    "KDPIPE_DIST_TIMEOUT": ("-5", "must be a number of seconds > 0"),
    "KDPIPE_DATA_CACHE": (str(Path(__file__)), "is a file, not a folder"),
    "KDPIPE_TEST_THREADS": ("0", "must be at least 1"),
}
GOOD = {"KDPIPE_THREADS": "1", "KDPIPE_IMAGES_ON_HOST": "1", "KDPIPE_DIST_TIMEOUT": "2.5",
        "KDPIPE_DATA_CACHE": "~/somewhere", "KDPIPE_TEST_THREADS": "3", "KDPIPE_BENCH_COMMIT": "abc123"}


def invoke(env: dict, *args):
    threads = torch.get_num_threads()  # KDPIPE_THREADS sets this process's threads
    try:
        return CliRunner().invoke(main, [str(a) for a in args], env=env)
    finally:
        torch.set_num_threads(threads)


def test_every_kdpipe_variable_in_the_sources_is_declared_and_tested():
    used = set()
    for folder in ("kdpipe", "bench", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            used |= set(re.findall(r"KDPIPE_[A-Z_]+[A-Z]", path.read_text()))
    assert used == set(ENV_VARS), "declare every KDPIPE_* variable in kdpipe.util.ENV_VARS (and only those)"
    assert set(GOOD) == set(ENV_VARS) and set(BAD) == {n for n, v in ENV_VARS.items() if v.parse is not str}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_value_is_one_line_and_exit_2_before_any_command(name, tmp_path):
    value, words = BAD[name]
    res = invoke({name: value}, "inspect", tmp_path / "no-cache")
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {name}={value!r} {words}"), res.stderr
    assert "unset it" in lines[0]


@pytest.mark.parametrize("name", sorted(GOOD))
def test_a_good_value_passes_and_the_command_runs(name, tmp_path):
    res = invoke({name: GOOD[name]}, "inspect", tmp_path / "no-cache")
    assert res.exit_code == 2 and "no cache at" in res.stderr, res.stderr  # inspect's own error: it ran


def test_values_are_parsed(monkeypatch):
    for name, default in (("KDPIPE_THREADS", None), ("KDPIPE_IMAGES_ON_HOST", False),
                          ("KDPIPE_DIST_TIMEOUT", 1800.0), ("KDPIPE_TEST_THREADS", 1)):
        monkeypatch.delenv(name, raising=False)
        assert env(name) == default
    monkeypatch.setenv("KDPIPE_DATA_CACHE", " ")  # empty is unset
    assert env("KDPIPE_DATA_CACHE") == Path.home() / ".cache" / "kdpipe" / "decoded"
    monkeypatch.setenv("KDPIPE_DATA_CACHE", "~/decoded")
    assert env("KDPIPE_DATA_CACHE") == Path.home() / "decoded"
    monkeypatch.setenv("KDPIPE_DIST_TIMEOUT", "2.5")
    assert env("KDPIPE_DIST_TIMEOUT") == 2.5
    monkeypatch.setenv("KDPIPE_IMAGES_ON_HOST", "1")
    assert env("KDPIPE_IMAGES_ON_HOST") is True


def test_kdpipe_threads_sets_torchs_threads(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    invoke({"KDPIPE_THREADS": "3"}, "inspect", tmp_path / "no-cache")
    assert seen[0] == 3


def test_import_kdpipe_leaves_hdf5_use_file_locking_alone():
    """It used to force FALSE; now the user's value stays (kdpipe passes locking=False itself)."""
    code = "import os, kdpipe, kdpipe.cli, kdpipe.cache.reader; print(os.environ['HDF5_USE_FILE_LOCKING'])"
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, HDF5_USE_FILE_LOCKING="TRUE"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "TRUE"


@pytest.mark.parametrize("name, value, words", [
    ("KDPIPE_THREADS", "99999", "must be at most 1024"),  # torch took it; OpenMP then segfaulted the process
    ("KDPIPE_THREADS", "99999999999", "must be at most 1024"),  # an OverflowError traceback from torch
    ("KDPIPE_DATA_CACHE", "~no_such_user_kdpipe/decoded", "names the home folder of an unknown user"),
])
def test_an_odd_value_is_one_line_not_a_crash(tmp_path, name, value, words):
    res = invoke({name: value}, "inspect", tmp_path / "no-cache")
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {name}={value!r} {words}"), res.stderr
