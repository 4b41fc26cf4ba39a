"""Interruptions and full disks outside stage one and two's own protocols: what export, compress and the other
commands leave behind when they are stopped half-way or the disk fills, and what a rerun then does."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from click.testing import CliRunner

from kdpipe.checkpoint import save_checkpoint
from kdpipe.cli import main
from kdpipe.models import create_model


@pytest.fixture
def features_ckpt(tmp_path):
    """A small kdpipe checkpoint (an MLP on 6 features) that exports in a second."""
    model = create_model("mlp_100", 3, (6,)).eval()
    ckpt = tmp_path / "f.pt"
    save_checkpoint(ckpt, model, arch="mlp_100", num_classes=3, image_shape=(6,), mean=[0.0] * 6, std=[1.0] * 6,
                    class_names=["a", "b", "c"], dataset={"spec": "npz:x"}, test_top1=None)
    return ckpt


def _export(ckpt, out, *extra):
    return CliRunner().invoke(main, ["export", str(ckpt), "--format", "torchscript", "--out", str(out), *extra])


def test_an_export_interrupted_while_writing_leaves_no_file_and_keeps_the_one_it_replaces(features_ckpt, tmp_path,
                                                                                       monkeypatch):
    """Ctrl-C (or a kill) while torch wrote the file left a truncated FILE, which the rerun refused as 'already
    exists' and which does not load; with --overwrite the interrupted export had already destroyed the good file.
    The file is now written and checked under a temporary name, then renamed."""
    out = tmp_path / "m.pt"

    def interrupted(obj, f, *a, **kw):  # half a zip archive, then Ctrl-C
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04" + b"\0" * 100)
        else:
            f.write(b"PK\x03\x04" + b"\0" * 100)
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(torch.jit, "save", interrupted)
        assert _export(features_ckpt, out).exit_code != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.pt"], "a partial export was left"
    assert _export(features_ckpt, out).exit_code == 0  # the rerun just does it
    good = out.read_bytes()
    with monkeypatch.context() as mp:
        mp.setattr(torch.jit, "save", interrupted)
        assert _export(features_ckpt, out, "--overwrite").exit_code != 0
    assert out.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["f.pt", "m.pt", "m.pt.json"]


@pytest.mark.parametrize("fmt,name", [("torchscript", "m.pt"), ("pt2", "m.pt2"), ("onnx", "m.onnx")])
def test_an_export_to_a_full_disk_is_one_line_and_leaves_nothing(features_ckpt, tmp_path, monkeypatch, fmt, name):
    """A full disk (here at the fsync, where a buffered write's ENOSPC shows): torch's zip writer aborted the whole
    process with a C++ stack (TorchScript, pt2) or the export said 'cannot export' and left a truncated file (ONNX);
    now one line names the file and the disk, and nothing is left."""
    out = tmp_path / name
    real = os.fsync

    def full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path / f".{name}.tmp-")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)
    monkeypatch.setattr(os, "fsync", full)
    r = CliRunner().invoke(main, ["export", str(features_ckpt), "--format", fmt, "--out", str(out)])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert r.output.strip() == (f"Error: cannot write {out}: no space left on the device; nothing partial was kept, "
                                "run the same command again once the location is writable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.pt"]
