"""Interruptions and full disks outside stage one and two's own protocols: what export, compress and the other
commands leave behind when they are stopped half-way or the disk fills, and what a rerun then does."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def _can_mount(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _photo_folder(root, n=20, size=32):
    """imagefolder train/ and test/ with two classes of n random RGB PNGs each."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_decoding_photos_to_a_full_disk_is_one_line_not_a_bus_error(tmp_path, monkeypatch):
    """The decoded copy is written through a memory map of a sparse file: on a full disk the process died of
    SIGBUS ('Bus error', exit 135, no message, a temporary left). Its space is reserved first now. Here a real full
    tmpfs, in a child process (a bus error would kill pytest)."""
    folder = _photo_folder(tmp_path / "photos")
    mnt = tmp_path / "small-fs"
    if not _can_mount(mnt, "64k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        env = {**os.environ, "KDPIPE_DATA_CACHE": str(mnt / "decoded")}
        code = ("from kdpipe.data import load_dataset; from kdpipe import KDPipeError\n"
                f"try:\n    load_dataset('imagefolder:{folder}', 'train')\n"
                "except KDPipeError as e:\n    print('Error:', e)\n")
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-500:]}"
        assert r.stdout.startswith(f"Error: cannot write the decoded copy of imagefolder:{folder} under "
                                   f"{mnt / 'decoded'}: No space left on device; free space or set KDPIPE_DATA_CACHE")
        assert list((mnt / "decoded").iterdir()) == [], "a temporary was left on the full disk"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_decode_whose_space_cannot_be_reserved_stops_before_decoding(tmp_path, monkeypatch):
    """The same, where mounting is not allowed: the reservation meets ENOSPC; one line, nothing kept."""
    from kdpipe import KDPipeError
    from kdpipe.data import load_dataset
    folder = _photo_folder(tmp_path / "photos", n=3, size=8)
    monkeypatch.setenv("KDPIPE_DATA_CACHE", str(tmp_path / "decoded"))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(KDPipeError, match="cannot write the decoded copy .*: No space left on device; free space"):
        load_dataset(f"imagefolder:{folder}", "train")
    assert list((tmp_path / "decoded").iterdir()) == []


def test_a_decoded_copys_record_the_disk_filled_up_in_is_decoded_again_not_a_traceback(tmp_path, monkeypatch):
    """The disk filled just as the decoded copy's .json was written: the run stopped in one line, but left the
    .json empty beside a complete .npy, and every later run failed with a JSONDecodeError traceback until the
    user found and deleted it. The record is written by rename now, and one that does not read is decoded again."""
    from kdpipe import KDPipeError
    from kdpipe.data import load_dataset
    folder = _photo_folder(tmp_path / "photos", n=3, size=8)
    decoded = tmp_path / "decoded"
    monkeypatch.setenv("KDPIPE_DATA_CACHE", str(decoded))
    real = Path.write_text

    def full(self, *a, **kw):  # the file is created (truncated), then its write fails
        if self.suffix == ".json" and self.parent == decoded:
            real(self, "")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *a, **kw)
    with monkeypatch.context() as mp:
        mp.setattr(Path, "write_text", full)
        with pytest.raises(KDPipeError, match="No space left on device; free space"):
            load_dataset(f"imagefolder:{folder}", "train")
    assert not list(decoded.glob("*.json")), "a decoded copy's record was left that does not read"
    want = load_dataset(f"imagefolder:{folder}", "train")
    (meta,) = decoded.glob("*.json")
    meta.write_text("")  # as an older kdpipe left it
    again = load_dataset(f"imagefolder:{folder}", "train")
    assert np.array_equal(again.images, want.images) and again.fingerprint == want.fingerprint
    assert json.loads(meta.read_text())["fingerprint"] == want.fingerprint


def test_a_decoded_copy_a_kill_or_power_cut_left_short_is_decoded_again_not_a_traceback(tmp_path, monkeypatch):
    """A decoded copy whose sizes.npy was cut short (written in place, a kill midway beside the copy of another
    process that finished) or whose .npy is short (a power cut before it reached the disk): every later run
    failed with a numpy ValueError traceback. A copy that does not read whole is decoded again, with a note; and
    sizes.npy is written by rename, so a write stopped midway leaves none."""
    from kdpipe.data import load_dataset
    folder = _photo_folder(tmp_path / "photos", n=3, size=8)
    decoded = tmp_path / "decoded"
    monkeypatch.setenv("KDPIPE_DATA_CACHE", str(decoded))
    want = load_dataset(f"imagefolder:{folder}", "train")
    (sizes,) = decoded.glob("*.sizes.npy")
    (npy,) = set(decoded.glob("*.npy")) - {sizes}
    for short in (sizes, npy):
        whole = short.read_bytes()
        short.write_bytes(whole[:len(whole) - 7])
        again = load_dataset(f"imagefolder:{folder}", "train")
        assert np.array_equal(again.images, want.images) and again.fingerprint == want.fingerprint
        assert short.read_bytes() == whole
    for p in decoded.iterdir():
        p.unlink()
    real = np.save

    def killed(file, arr, *a, **kw):  # a kill while sizes.npy is written: part of it on disk, then stopped
        real(file, arr, *a, **kw)
        f = open(file, "r+b") if isinstance(file, (str, Path)) else file
        f.truncate(20)
        raise KeyboardInterrupt
    with monkeypatch.context() as mp:
        mp.setattr(np, "save", killed)
        with pytest.raises(KeyboardInterrupt):
            load_dataset(f"imagefolder:{folder}", "train")
    assert list(decoded.iterdir()) == [], "a part of a decoded copy was left"


def test_a_killed_decodes_temporary_is_removed_by_the_next_decode(tmp_path, monkeypatch):
    """A decode killed midway (SIGKILL, the OOM killer) left its reserved temporary, as large as the whole copy,
    in KDPIPE_DATA_CACHE for good. The next decode there removes those whose process is gone, and keeps those of
    a live process and of other machines (a folder shared over NFS)."""
    import signal
    import socket
    from kdpipe.data import load_dataset
    folder = _photo_folder(tmp_path / "photos", n=3, size=8)
    decoded = tmp_path / "decoded"
    env = {**os.environ, "KDPIPE_DATA_CACHE": str(decoded), "PYTHONPATH": os.pathsep.join(sys.path)}
    code = ("import time, kdpipe.data as d\n"
            "def stuck(*a, **k):\n    print('decoding', flush=True)\n    time.sleep(60)\n"
            "d._decode_into = stuck\n"
            f"d.load_dataset('imagefolder:{folder}', 'train')\n")
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "decoding"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    left = list(decoded.glob(f"*.tmp{child.pid}*"))
    assert left, "the killed decode left no temporary: the test does not test anything"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        others = [decoded / f"{'0' * 24}.tmp{live.pid}@{socket.gethostname()}.npy",
                  decoded / f"{'1' * 24}.tmp{child.pid}@another-node.npy"]
        for p in others:
            p.write_bytes(b"")
        monkeypatch.setenv("KDPIPE_DATA_CACHE", str(decoded))
        load_dataset(f"imagefolder:{folder}", "test")
        assert not any(p.exists() for p in left), "a killed decode's temporary was kept"
        assert all(p.exists() for p in others)
    finally:
        live.kill()
        live.wait()


def test_a_shard_replaced_while_a_student_reads_the_cache_is_refused_not_read(tmp_path):
    """A dump-logits --overwrite (another teacher, seed...) into the cache a sweep is training from: the reader
    opened shards by name at every read, so after their attributes were checked once it read the new cache's rows
    as this cache's without a word (the run's metrics.json naming the old cache id), or failed with a
    FileNotFoundError traceback while the shard was gone. Both are one line now, naming the shard."""
    from kdpipe import KDPipeError
    from kdpipe.cache.reader import Cache
    from test_reliability_helpers import dump_args, mnist_npz, run_cli, save_teacher
    npz = mnist_npz(tmp_path / "digits.npz", 64, 16)
    teacher = save_teacher(tmp_path / "teacher.pt")
    for seed, name in ((3, "a"), (4, "b")):
        assert run_cli(dump_args(teacher, npz, tmp_path / name, 2, 64, seed)).exit_code == 0
    cache = Cache(tmp_path / "a")
    first = cache.read_view(0, "logits")
    shard = tmp_path / "a" / "shard-00000.h5"
    os.replace(shutil.copy(tmp_path / "b" / "shard-00000.h5", tmp_path / "a" / ".new"), shard)  # as a dump writes
    with pytest.raises(KDPipeError, match=r"shard-00000.h5 \(rows 0..63 of cache .*\) was removed or replaced while "
                                          r"the cache was being read .*dump-logits.*--overwrite"):
        cache.read_view(0, "logits")
    with pytest.raises(KDPipeError, match="was removed or replaced"):
        cache.read_rows("logits", [1, 2])
    shard.unlink()
    with pytest.raises(KDPipeError, match="was removed or replaced"):
        cache.read_view(0, "logits")
    assert Cache(tmp_path / "a").read_view(1, "logits").shape == first.shape  # the shards untouched still read


def test_a_shard_replaced_by_a_file_of_the_same_inode_number_is_refused_not_read(tmp_path):
    """ext4 gives the inode number of a removed file to the next file made: a dump-logits --overwrite of another
    teacher into the cache a student reads wrote a shard that got its old shard's number (seen with caches of five
    shards), and the reader, which took a file for another only when its inode number changed too, read the other
    teacher's rows as this cache's. Here the new bytes go into the very inode, as that reuse amounts to."""
    from kdpipe import KDPipeError
    from kdpipe.cache.reader import Cache
    from test_reliability_helpers import dump_args, mnist_npz, run_cli, save_teacher
    npz = mnist_npz(tmp_path / "digits.npz", 64, 16)
    for seed, name in ((0, "a"), (1, "b")):
        assert run_cli(dump_args(save_teacher(tmp_path / f"t{seed}.pt", seed=seed), npz, tmp_path / name, 2, 64, 3)
                       ).exit_code == 0
    cache = Cache(tmp_path / "a")
    cache.read_view(0, "logits")
    shard = tmp_path / "a" / "shard-00000.h5"
    before = os.stat(shard)
    shutil.copyfile(tmp_path / "b" / "shard-00000.h5", shard)  # written into the same inode
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # written later, on any clock
    assert os.stat(shard).st_ino == before.st_ino and os.stat(shard).st_size == before.st_size
    with pytest.raises(KDPipeError, match="was removed or replaced while the cache was being read"):
        cache.read_view(0, "logits")

def test_a_full_disk_while_report_draws_its_plots_is_one_line_and_leaves_no_partial_png(student_runs, tmp_path,
                                                                                      monkeypatch):
    """The disk filled while matplotlib wrote a plot: report failed with PIL's OSError traceback (compress's plot
    the same), after a half-written PNG. Plots are written as every other output is now: a temporary, renamed."""
    import matplotlib.figure
    out = tmp_path / "rep"
    real = matplotlib.figure.Figure.savefig

    def full(self, fname, *a, **kw):  # some bytes reach the file, then the disk is full
        if isinstance(fname, (str, os.PathLike)):
            with open(fname, "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n")
        else:
            fname.write(b"\x89PNG\r\n\x1a\n")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    r = CliRunner().invoke(main, ["report", str(student_runs.out), "--out", str(out)])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert r.output.startswith(f"Error: cannot write {out}/") and "no space left on the device" in r.output
    assert list(out.iterdir()) == [], "a partial plot was left"
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", real)
    assert CliRunner().invoke(main, ["report", str(student_runs.out), "--out", str(out)]).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "accuracy_vs_parameters.png",
                                                     "learning_curves.png", "report.md", "summary.json"]
