"""Bad input (issue 3): each case is refused with exactly one line on stderr ('Error: ...'), exit
code 2, no traceback and no warning, and leaves nothing that reads as complete (no cache with a
manifest, no finished run). Through click's CliRunner, plus two through a real process.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from test_reliability_helpers import (assert_nothing_partial_reads_as_complete, assert_one_line_error, dump_args,
                                      mnist_npz, rewrite_manifest, run_cli, run_kdpipe, save_teacher,
                                      torchscript_teacher)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    """Good inputs to spoil one at a time: data, a teacher, a finished cache."""
    root = tmp_path_factory.mktemp("bad-input")
    npz = mnist_npz(root / "mnist-300.npz", 300, 50)
    teacher = save_teacher(root / "teacher.pt")
    cache = root / "cache"
    res = run_cli(dump_args(teacher, npz, cache, 2, 300))
    assert res.exit_code == 0, res.output
    return SimpleNamespace(root=root, npz=npz, teacher=teacher, cache=cache)


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _image_folder(root: Path, sizes: dict[str, list[int]], test: bool = True) -> Path:
    """root/{train,test}/<class>/<i>.jpg: sizes maps class -> side of each image (empty: no images)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test") if test else ("train",):
        for cls, sides in sizes.items():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i, side in enumerate(sides):
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=90)
    return root


def _truncated_jpeg(root: Path) -> Path:
    folder = _image_folder(root, {"a": [16, 16, 16], "b": [16, 16, 16]})
    victim = folder / "train" / "b" / "1.jpg"
    victim.write_bytes(victim.read_bytes()[:200])
    return folder


def _dump(e, t, data: str | None = None, teacher=None, out=None, extra=()):
    """dump-logits arguments with one thing spoilt."""
    args = dump_args(teacher or e.teacher, e.npz, out or t / "out", 2, 300)
    if data is not None:
        args[args.index("--data") + 1] = data
    return args + list(extra)


def _train(e, t, *extra, cache=None):
    return ["train-student", "--cache", str(cache or e.cache), "--student", "mlp_100", "--epochs", "1",
            "--device", "cpu", "--out", str(t / "runs"), *extra]


def _cache_copy(e, t, edit) -> Path:
    c = Path(shutil.copytree(e.cache, t / "cache-copy"))
    edit(c)
    return c


def _newer_format(c: Path):
    rewrite_manifest(c, lambda m: m.update(format_version=2))


# name -> (arguments, given the module's good inputs and a fresh folder, and the words the error must hold)
CASES = {
    "data file missing": (
        lambda e, t: _dump(e, t, f"npz:{t / 'nowhere.npz'}"), ["no such file", "nowhere.npz"]),
    "data file corrupt": (
        lambda e, t: _dump(e, t, f"npz:{(t / 'junk.npz').write_bytes(b'PK' + bytes(500)) and t / 'junk.npz'}"),
        ["cannot read", "junk.npz", "as .npz"]),
    "npz with wrong keys": (
        lambda e, t: _dump(e, t, "npz:" + str(_npz(t / "keys.npz", images=np.zeros((4, 8, 8), np.uint8),
                                                    labels=np.zeros(4)))),
        ["must hold arrays x_train, y_train, x_test, y_test", "it holds images, labels"]),
    "npz labels out of range": (
        lambda e, t: _dump(e, t, "npz:" + str(_npz(
            t / "labels.npz", x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.array([0, 1, 2, 7]),
            x_test=np.zeros((2, 8, 8), np.uint8), y_test=np.array([0, 1]), class_names=np.array(["a", "b", "c"])))),
        ["y_train holds labels outside [0, 2]"]),
    "npz pixels not uint8": (
        lambda e, t: _dump(e, t, "npz:" + str(_npz(
            t / "float.npz", x_train=np.zeros((4, 8, 8), np.float32), y_train=np.array([0, 1, 0, 1]),
            x_test=np.zeros((2, 8, 8), np.float32), y_test=np.array([0, 1])))),
        ["x_train is float32 (4, 8, 8)", "float arrays must be (N, D) feature vectors", "images must be uint8 pixels"]),
    "IDX file truncated": (
        lambda e, t: _dump(e, t, "mnist", extra=["--data-root", str(_truncated_idx(t / "idx"))]),
        ["train-images-idx3-ubyte.gz", "corrupt or truncated"]),
    "unknown dataset": (lambda e, t: _dump(e, t, "imagenet-22k"), ["unknown dataset 'imagenet-22k'"]),
    "truncated JPEG in an ImageFolder": (
        lambda e, t: _dump(e, t, f"imagefolder:{_truncated_jpeg(t / 'if')}"), ["cannot decode", "1.jpg"]),
    "mixed image sizes": (
        lambda e, t: _dump(e, t, f"imagefolder:{_image_folder(t / 'if', {'a': [16, 16], 'b': [16, 20]})}"),
        ["the train images differ in size", "20x20", "pass --image-size S"]),
    "empty class folder": (
        lambda e, t: _dump(e, t, f"imagefolder:{_image_folder(t / 'if', {'a': [16, 16], 'b': []})}"),
        ["class folder", "holds no images (.jpg/.jpeg/.png/.bmp", "remove the folder, or put its class's images in it"]),
    "macOS metadata folder as a class": (  # an archive unpacked with its __MACOSX folder of ._* files
        lambda e, t: _dump(e, t, f"imagefolder:{_image_folder(t / 'if', {'a': [16, 16], '__MACOSX': []})}"),
        ["class folder", "__MACOSX holds no images", "macOS's archive metadata, not a class: delete it"]),
    "teacher file missing": (
        lambda e, t: _dump(e, t, teacher=t / "no-teacher.pt"), ["teacher file", "no-teacher.pt does not exist"]),
    "teacher file does not load": (
        lambda e, t: _dump(e, t, teacher=(t / "junk.pt").write_bytes(b"not a model\n" * 10) and t / "junk.pt"),
        ["cannot load", "junk.pt"]),
    "teacher architecture given for a kdpipe checkpoint": (
        lambda e, t: ["dump-logits", "--teacher-arch", "cnn_small", "--teacher-weights", str(e.teacher),
                      "--data", f"npz:{e.npz}", "--views", "2", "--device", "cpu", "--out", str(t / "out")],
        ["is a kdpipe checkpoint, which records its architecture (cnn_tiny): drop --teacher-arch"]),
    "teacher with 7 outputs for 10 classes": (
        lambda e, t: _dump(e, t, teacher=torchscript_teacher(t / "seven.pt", out=7)),
        ["the teacher outputs shape (7,) per image", "has 10 classes: give a teacher with one output per class"]),
    "teacher checkpoint for other classes": (
        lambda e, t: _dump(e, t, teacher=save_teacher(t / "five.pt", num_classes=5)),
        ["the teacher predicts 5 classes", "has 10: dump the data it was trained on, or give a teacher trained on "
         "this data"]),
    "views 0": (lambda e, t: _dump(e, t) + ["--views", "0"], ["--views must be >= 1, got 0"]),
    "views negative": (lambda e, t: _dump(e, t) + ["--views", "-3"], ["--views must be >= 1, got -3"]),
    "dump batch size 0": (lambda e, t: _dump(e, t) + ["--batch-size", "0"], ["--batch-size must be >= 1, got 0"]),
    "shard rows 0": (lambda e, t: _dump(e, t) + ["--shard-rows", "0"], ["--shard-rows must be >= 1, got 0"]),
    "dump output is a file": (
        lambda e, t: _dump(e, t, out=(t / "afile").write_text("x") and t / "afile"), ["is a file, not a directory"]),
    "dump output holds other files": (
        lambda e, t: _dump(e, t, out=(t / "busy").mkdir() or (t / "busy" / "notes.txt").write_text("x") and t / "busy"),
        ["is not empty and holds no kdpipe cache"]),
    "student batch size 0": (lambda e, t: _train(e, t, "--batch-size", "0"), ["--batch-size must be >= 1, got 0"]),
    "student epochs 0": (lambda e, t: _train(e, t, "--epochs", "0"), ["--epochs must be >= 1, got 0"]),
    "temperature 0": (lambda e, t: _train(e, t, "--temperature", "4,0"), ["--temperature must be > 0, got 0"]),
    "temperature negative": (lambda e, t: _train(e, t, "--temperature", "-1"), ["--temperature must be > 0, got -1"]),
    "alpha above 1": (lambda e, t: _train(e, t, "--alpha", "1.5"), ["--alpha must lie in [0, 1], got 1.5"]),
    "alpha below 0": (lambda e, t: _train(e, t, "--alpha", "-0.1"), ["--alpha must lie in [0, 1], got -0.1"]),
    "student architecture unknown": (
        lambda e, t: _train(e, t, "--student", "resnet9000"), ["unknown architecture 'resnet9000'"]),
    "student output is a file": (
        lambda e, t: _train(e, t)[:-1] + [str((t / "runs-file").write_text("x") and t / "runs-file")],
        ["runs directory", "is a file, not a directory"]),
    "cache of a newer format version (train-student)": (
        lambda e, t: _train(e, t, cache=_cache_copy(e, t, _newer_format)),
        ["has cache format version 2; this kdpipe reads version 1 (upgrade kdpipe)"]),
    "cache of a newer format version (verify-cache)": (
        lambda e, t: ["verify-cache", str(_cache_copy(e, t, _newer_format))],
        ["has cache format version 2; this kdpipe reads version 1 (upgrade kdpipe)"]),
    "cache of a newer format version (inspect)": (
        lambda e, t: ["inspect", str(_cache_copy(e, t, _newer_format))], ["has cache format version 2"]),
    "cache directory missing": (
        lambda e, t: _train(e, t, cache=t / "no-cache"), ["no cache at", "the directory does not exist"]),
    "cache unfinished": (
        lambda e, t: _train(e, t, cache=_cache_copy(e, t, lambda c: (c / "manifest.json").unlink())),
        ["is an unfinished cache (no manifest.json)", "run the same dump-logits command again"]),
    "cache is a file": (
        lambda e, t: ["verify-cache", str((t / "c.txt").write_text("x") and t / "c.txt")], ["is a file, not a cache"]),
}


def _truncated_idx(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 8, 3]) + (100).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    full = gzip.compress(header + bytes(100 * 28 * 28))
    (folder / "train-images-idx3-ubyte.gz").write_bytes(full[:len(full) // 2])
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + bytes(100)))
    return folder


def test_every_case_is_its_own_and_every_command_is_covered(env, tmp_path):
    """No two cases are the same refusal (same command, same words), and each command that reads user
    input has cases: a copied case or a lost command shows here."""
    seen = {}
    for i, (name, (build, fragments)) in enumerate(CASES.items()):
        (tmp_path / str(i)).mkdir()
        key = (build(env, tmp_path / str(i))[0], tuple(fragments))
        assert fragments and key not in seen, f"{name!r} repeats {seen.get(key)!r}"
        seen[key] = name
    assert {command for command, _ in seen} == {"dump-logits", "train-student", "verify-cache", "inspect"}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_partial(env, tmp_path, monkeypatch, case):
    monkeypatch.setenv("KDPIPE_DATA_CACHE", str(tmp_path / "decoded"))  # ImageFolder decodes stay here
    build, fragments = CASES[case]
    before = {p: p.stat().st_mtime_ns for p in env.cache.rglob("*")}
    args = build(env, tmp_path)
    res = run_cli(args)
    assert_one_line_error(res, *fragments, progress=True)  # after the progress of what was read before the fault
    if args[0] == "dump-logits":
        out = Path(args[args.index("--out") + 1])
        if out.is_dir():
            assert_nothing_partial_reads_as_complete(out)
            assert not (out / "dump.json").exists(), "a refused dump claimed the output directory"
    if args[0] == "train-student":
        runs = Path(args[args.index("--out") + 1])
        assert runs.is_file() or not runs.exists() or not any(runs.iterdir()), "a refused run wrote under --out"
    assert {p: p.stat().st_mtime_ns for p in env.cache.rglob("*")} == before, "the good cache was touched"


@pytest.mark.parametrize("case", ["teacher with 7 outputs for 10 classes", "temperature 0"])
def test_bad_input_in_a_real_process_prints_one_line(env, tmp_path, case):
    """The same through a real process: what a user sees on stderr (with warnings and all) is one line."""
    build, fragments = CASES[case]
    res = run_kdpipe(build(env, tmp_path))
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and all(f in lines[0] for f in fragments), res.stderr


def test_refused_rerun_and_then_right_arguments(env, tmp_path):
    """A teacher with the wrong output size is refused before OUT is touched, so the command with the
    right teacher then runs without --overwrite."""
    out = tmp_path / "out"
    res = run_cli(_dump(env, tmp_path, teacher=torchscript_teacher(tmp_path / "seven.pt", out=7), out=out))
    assert_one_line_error(res, "the teacher outputs shape (7,)")
    assert not out.exists()
    res = run_cli(_dump(env, tmp_path, out=out))
    assert res.exit_code == 0, res.output
    assert json.loads((out / "manifest.json").read_text())["rows"] == 600
