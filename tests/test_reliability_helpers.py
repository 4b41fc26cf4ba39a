"""Helpers shared by the tests/test_reliability*.py files (cache integrity and crash safety).

No fixture from conftest.py on purpose (module fixtures build what each file needs); the data are
conftest's generated MNIST-like digits, whose pixel statistics (mean 0.12, std 0.30) the NaN/Inf
thresholds in test_reliability_verify.py rely on. Teachers are untrained tiny networks (a cache's
integrity does not depend on the teacher being any good), so everything runs in seconds on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import digit_arrays

DATASETS = ("logits", "view_params", "labels", "sample_index", "view_index")
PROGRESS = re.compile(r"^  .+?: \d+/\d+ \S+ \( *\d+\.\d%\), ")  # a kdpipe.util.Progress line (a spec may hold ':')


def mnist_npz(dst: Path, n_train: int, n_test: int, start: int = 0, edit=None) -> Path:
    """The MNIST-like train samples [start, start + n_train) and the first n_test test samples as an npz
    at dst (generated digits, see conftest.digit_arrays); edit(arrays) may change them."""
    x_train, y_train = digit_arrays("train", start + n_train, start)
    x_test, y_test = digit_arrays("test", n_test)
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    if edit is not None:
        edit(arrays)
    dst.parent.mkdir(parents=True, exist_ok=True)
    np.savez(dst, **arrays)
    return dst


def save_teacher(path: Path, seed: int = 0, arch: str = "cnn_tiny", num_classes: int = 10,
                 image_shape=(1, 28, 28), tamper=None) -> Path:
    """An untrained kdpipe checkpoint; tamper(model) may edit its weights first."""
    from kdpipe.checkpoint import save_checkpoint
    from kdpipe.models import create_model

    torch.manual_seed(seed)
    model = create_model(arch, num_classes, image_shape)
    if tamper is not None:
        with torch.no_grad():
            tamper(model)
    save_checkpoint(path, model, arch=arch, num_classes=num_classes, image_shape=image_shape,
                    mean=[0.13], std=[0.31], class_names=[str(i) for i in range(num_classes)], dataset={},
                    test_top1=None)
    return path


class _Linear(nn.Module):
    """A TorchScript teacher: a linear map whose output is NaN for bright inputs (mean > nan_above) and
    ``big`` for middling ones (inf_between), so chosen samples can be made to misbehave."""

    def __init__(self, in_features: int, out: int, nan_above: float, inf_between: tuple[float, float], big: float):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(in_features, out)
        self.nan_above = nan_above
        self.lo = inf_between[0]
        self.hi = inf_between[1]
        self.big = big

    def forward(self, x):
        y = self.fc(x.flatten(1))
        m = x.flatten(1).mean(1)[:, None]
        y = torch.where(m > self.nan_above, torch.full_like(y, float("nan")), y)
        return torch.where((m > self.lo) & (m <= self.hi), torch.full_like(y, self.big), y)


def torchscript_teacher(path: Path, out: int = 10, nan_above: float = 1e9, inf_between=(1e9, 1e9),
                        big: float = float("inf"), in_features: int = 784) -> Path:
    torch.jit.script(_Linear(in_features, out, nan_above, inf_between, big)).save(str(path))
    return path


# ---------------------------------------------------------------- running kdpipe

def dump_args(teacher: Path, npz: Path, out: Path, views: int = 8, shard_rows: int = 400, seed: int = 3,
              batch_size: int = 200, *extra: str) -> list[str]:
    # The teachers here are untrained (--force passes the probe) and fed save_teacher's normalization (which
    # TorchScript teachers need given; kdpipe checkpoints saved with it accept it).
    return ["dump-logits", "--teacher", str(teacher), "--data", f"npz:{npz}", "--views", str(views),
            "--shard-rows", str(shard_rows), "--seed", str(seed), "--batch-size", str(batch_size),
            "--device", "cpu", "--mean", "0.13", "--std", "0.31", "--force", "--out", str(out), *extra]


def subprocess_env(**changes) -> dict:
    """The environment of kdpipe subprocesses: one thread each, so results are bit-identical across runs."""
    env = dict(os.environ, KDPIPE_THREADS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def kdpipe_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "kdpipe", *args]


def run_kdpipe(args: list[str], timeout: float = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run(kdpipe_cmd(args), capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(**env))


def run_cli(args: list[str], **kwargs):
    """kdpipe in this process through click's CliRunner (stdout and stderr kept apart). The warnings
    Python would print on stderr by default are kept in .shown_warnings (pytest hides them)."""
    from click.testing import CliRunner

    from kdpipe.cli import main
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(main, [str(a) for a in args], **kwargs)
    hidden = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
    result.shown_warnings = [f"{w.category.__name__}: {w.message}" for w in caught
                             if not issubclass(w.category, hidden)]
    return result


def assert_one_line_error(result, *fragments: str, progress: bool = False) -> str:
    """Exit code 2, no traceback, and stderr exactly one line 'Error: ...' holding every fragment.

    progress=True: a failure in the middle of a dump (or after verify-cache's checksum pass) may follow its
    progress lines on stderr.
    """
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"raised {result.exception!r}:\n{result.output}"
    assert result.exit_code == 2, f"exit code {result.exit_code}:\n{result.output}"
    assert "Traceback" not in result.output
    assert not getattr(result, "shown_warnings", []), f"warnings on stderr: {result.shown_warnings}"
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and not (progress and PROGRESS.match(line))]
    assert len(lines) == 1 and lines[0].startswith("Error: "), f"stderr is not one 'Error: ' line:\n{result.stderr}"
    for frag in fragments:
        assert frag in lines[0], f"{frag!r} not in {lines[0]!r}"
    return lines[0]


# ---------------------------------------------------------------- reading and checking caches

def shard_is_complete(path: Path) -> bool:
    """A shard file reads as complete when it opens and every dataset matches its stored sha256."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            for name in DATASETS:
                h = hashlib.sha256(np.ascontiguousarray(f[name][()]).reshape(-1).view(np.uint8).data)
                if h.hexdigest() != f[name].attrs["sha256"]:
                    return False
            return "cache_id" in f.attrs
    except (OSError, KeyError):
        return False


def assert_nothing_partial_reads_as_complete(out: Path, reference: dict | None = None) -> list[Path]:
    """An unfinished cache: no manifest, reading it is refused, every shard file present is complete
    (and, given the reference's arrays by shard, equal to that shard). Returns the shard files."""
    from kdpipe import KDPipeError
    from kdpipe.cache.reader import Cache

    if not out.exists():
        return []
    assert not (out / "manifest.json").exists(), f"{out} has a manifest"
    with pytest.raises(KDPipeError):
        Cache(out)
    shards = sorted(out.glob("shard-*.h5"))
    for p in shards:
        assert shard_is_complete(p), f"{p} is named as a shard but is not complete"
        if reference is not None:
            assert shard_arrays(p) == reference[p.name], f"{p} differs from the uninterrupted dump's"
    return shards


def shard_arrays(path: Path) -> dict:
    with h5py.File(path, "r", locking=False) as f:
        return {name: (f[name].dtype.str, f[name].shape, f[name][()].tobytes()) for name in DATASETS}


def cache_arrays(cache_dir: Path) -> dict:
    """Every dataset of a finished cache over all rows, plus the test logits, as (dtype, shape, bytes)."""
    from kdpipe.cache.reader import Cache

    c = Cache(cache_dir)
    out = {}
    for name in DATASETS:
        a = c.read(name, 0, c.rows)
        out[name] = (a.dtype.str, a.shape, a.tobytes())
    t = c.read_test_logits()
    out["test_logits"] = None if t is None else t.tobytes()
    return out


def shard_digests(cache_dir: Path) -> list:
    m = json.loads((cache_dir / "manifest.json").read_text())
    return [(s["file"], s["row_start"], s["row_stop"], s["sha256"], s.get("file_sha256")) for s in m["shards"]]


def assert_same_cache(a: Path, b: Path) -> None:
    """Bit for bit: logits, view parameters, labels, sample and view indices, test logits, shard files."""
    ca, cb = cache_arrays(a), cache_arrays(b)
    for name in ca:
        assert ca[name] == cb[name], f"{name} differs between {a} and {b}"
    assert shard_digests(a) == shard_digests(b)


def files_digest(folder: Path) -> dict:
    """name -> (sha256, mtime_ns) of every file under folder."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def rewrite_manifest(cache_dir: Path, edit, fix_checksum: bool = True) -> None:
    """Edit manifest.json in place; with fix_checksum, as a (newer) kdpipe would have written it."""
    from kdpipe.cache import format as fmt

    path = cache_dir / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    if fix_checksum:
        m["checksum"] = fmt.manifest_checksum(m)
    path.write_text(json.dumps(m, indent=2, sort_keys=True))


def stat_key(path: Path):
    """(inode, mtime) of a file, None while it does not exist: a rename onto it changes the key."""
    try:
        st = path.stat()
        return st.st_ino, st.st_mtime_ns
    except FileNotFoundError:
        return None
