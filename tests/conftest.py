"""Shared fixtures: small data under tmp_path, a tiny trained teacher, a small cache.

Nothing here reads outside the repository but Debian's Fashion-MNIST package (installed by `make test`
and `make data`); every other sample is generated from its index. A missing package fails the tests
that need it ("run make data"): a test never skips for want of data. Everything runs on the CPU.
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# Sizes of the small subsets (kept small: the whole suite must run in minutes on 2 cores).
FMNIST_TRAIN, FMNIST_TEST = 512, 256
MNIST_TRAIN, MNIST_TEST = 256, 128
CIFAR_TRAIN_PER_CLASS, CIFAR_TEST_PER_CLASS = 12, 6


def quiet(*args, **kwargs):
    """A `log` for library calls whose messages a test does not read."""


# ---------------------------------------------------------------- skips in CI

# The only skips CI accepts: the machine forbids something a test needs (reason fragments).
ENVIRONMENT_SKIPS = ("cannot mount a tmpfs", "cannot mount read-only here",
                     "needs another user than the lock file's owner")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Where CI is set (.ci/run sets it), a skip is a failure unless the machine forbids the test
    (ENVIRONMENT_SKIPS): a test that skips for missing data would otherwise pass CI without running."""
    outcome = yield
    report = outcome.get_result()
    if not os.environ.get("CI") or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not any(fragment in reason for fragment in ENVIRONMENT_SKIPS):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI: {reason} (a test must not skip for missing data: run `make data`)"


# ---------------------------------------------------------------- data

def _read_idx_prefix(path: Path, header: bytes, count: int, item: int) -> np.ndarray:
    """The first `count` items of `item` bytes from a gzipped IDX file whose header must be `header`
    (streamed: a test reads a few hundred images, never the whole 26 MB file). Written apart from
    kdpipe.data's reader on purpose, so that the tests compare two readers."""
    with gzip.open(path, "rb") as f:
        got = f.read(4)
        assert got == header, f"{path} is not the IDX file it should be"
        f.read(4 * got[3])  # the dimensions, big-endian uint32 each
        raw = f.read(count * item)
    assert len(raw) == count * item, f"{path} holds fewer than {count} items"
    return np.frombuffer(raw, np.uint8).reshape(count, item)


def fashion_mnist_arrays(split: str, stop: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 28, 28) uint8 and labels (n,) int64 of Fashion-MNIST's split rows [start, stop), read
    from Debian's dataset-fashion-mnist. Fails (never skips) when the package is absent."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = DEBIAN_FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz"
    labels = DEBIAN_FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz"
    if not (images.is_file() and labels.is_file()):
        pytest.fail(f"Debian's Fashion-MNIST is not in {DEBIAN_FASHION_MNIST}: run `make data` "
                    "(apt-get install dataset-fashion-mnist)", pytrace=False)
    x = _read_idx_prefix(images, bytes([0, 0, 8, 3]), stop, 28 * 28).reshape(stop, 28, 28)
    y = _read_idx_prefix(labels, bytes([0, 0, 8, 1]), stop, 1).reshape(stop)
    return x[start:].copy(), y[start:].astype(np.int64)


# Seven-segment layout: which of the segments (top, top-right, bottom-right, bottom, bottom-left,
# top-left, middle) each digit lights.
_SEGMENTS = {0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd", 6: "afgedc", 7: "abc",
             8: "abcdefg", 9: "abcdfg"}


def _draw_digit(digit: int, x0: int, y0: int, w: int, h: int, t: int, ink: int) -> np.ndarray:
    img = np.zeros((28, 28), np.uint8)
    mid = y0 + h // 2 - t // 2
    boxes = {"a": (y0, y0 + t, x0, x0 + w), "d": (y0 + h - t, y0 + h, x0, x0 + w), "g": (mid, mid + t, x0, x0 + w),
             "f": (y0, mid + t, x0, x0 + t), "b": (y0, mid + t, x0 + w - t, x0 + w),
             "e": (mid, y0 + h, x0, x0 + t), "c": (mid, y0 + h, x0 + w - t, x0 + w)}
    for s in _SEGMENTS[digit]:
        r0, r1, c0, c1 = boxes[s]
        img[r0:r1, c0:c1] = ink
    return img


@lru_cache(maxsize=8)
def _digits(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    seed = {"train": 1, "test": 2}[split]
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    w, h = rng.integers(9, 14, n), rng.integers(16, 22, n)
    x0, y0 = rng.integers(4, 28 - 4 - 13, n), rng.integers(3, 28 - 3 - 21, n)
    t, ink = rng.integers(2, 4, n), rng.integers(200, 256, n)
    x = np.stack([_draw_digit(int(labels[i]), int(x0[i]), int(y0[i]), int(w[i]), int(h[i]), int(t[i]), int(ink[i]))
                  for i in range(n)])
    x.setflags(write=False)
    return x, labels.astype(np.int64)


def digit_arrays(split: str, stop: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-like samples [start, stop) of a split: generated, not MNIST. Sample i of a split is a
    seven-segment digit (its label) drawn on a black 28x28 canvas with a size, position, stroke width
    and ink drawn from the split's seeded generator, so every pixel follows from the index alone, and
    the pixel statistics resemble MNIST's (mean about 0.13, std about 0.3: thin bright strokes)."""
    x, y = _digits(split, stop)
    return x[start:].copy(), y[start:].copy()


def _write_npz(dst: Path, x_train, y_train, x_test, y_test) -> dict:
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    np.savez(dst, **arrays)
    return arrays


def _cifar_like_image(label: int, split: str, i: int) -> np.ndarray:
    """A 32x32 RGB image of class `label`: the class's colour and stripe direction plus noise drawn
    from (split, class, i), so a small network can learn the class and each pixel follows from the index."""
    rng = np.random.default_rng([{"train": 1, "test": 2}[split], label, i])
    yy, xx = np.mgrid[0:32, 0:32]
    angle = np.pi * label / 10
    stripes = np.cos((xx * np.cos(angle) + yy * np.sin(angle)) * (0.5 + 0.1 * label) + rng.uniform(0, 2 * np.pi))
    colour = np.array([np.cos(2 * np.pi * (label / 10 + k / 3)) for k in range(3)]) * 70 + 128
    img = colour[None, None, :] + 50 * stripes[:, :, None] + rng.normal(0, 12, (32, 32, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@pytest.fixture(autouse=True)
def _keep_signal_handlers():
    """dump-logits and train-student turn SIGTERM into an interrupt (and a student pass holds Ctrl-C until
    its step ends); give every test the process's own handlers back."""
    import signal
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in before.items():
        signal.signal(s, h)


@pytest.fixture(scope="session", autouse=True)
def _one_cpu_thread():
    """Small models on a shared 2-core machine run several times faster on one thread (OpenMP threads
    spin against other processes); KDPIPE_TEST_THREADS overrides."""
    before = torch.get_num_threads()
    from kdpipe.util import env

    torch.set_num_threads(env("KDPIPE_TEST_THREADS"))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _decoded_copies_under_tmp(tmp_path_factory):
    """ImageFolder decodes go to a temporary folder, never to the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDPIPE_DATA_CACHE", str(tmp_path_factory.mktemp("decoded")))
        yield


@pytest.fixture(scope="session")
def fmnist(tmp_path_factory) -> SimpleNamespace:
    """The first 512 train / 256 test Fashion-MNIST images (Debian's package) as an npz: .path, .spec
    and the arrays."""
    path = tmp_path_factory.mktemp("fmnist") / "fmnist-small.npz"
    arrays = _write_npz(path, *fashion_mnist_arrays("train", FMNIST_TRAIN), *fashion_mnist_arrays("test", FMNIST_TEST))
    return SimpleNamespace(path=path, spec=f"npz:{path}", **arrays)


@pytest.fixture(scope="session")
def mnist(tmp_path_factory) -> SimpleNamespace:
    """256 train / 128 test MNIST-like images as an npz: .path, .spec and the arrays. Generated seven-segment
    digits (see digit_arrays), not MNIST: the tests using it need 28x28 grey digits, not MNIST itself."""
    path = tmp_path_factory.mktemp("mnist") / "mnist-small.npz"
    arrays = _write_npz(path, *digit_arrays("train", MNIST_TRAIN), *digit_arrays("test", MNIST_TEST))
    return SimpleNamespace(path=path, spec=f"npz:{path}", **arrays)


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory) -> Path:
    """A small CIFAR-like ImageFolder (train/<class>/<i>.jpg, test/<class>/<i>.jpg) of generated 32x32
    RGB JPEGs, CIFAR-10's class names, 12 train and 6 test images per class (see _cifar_like_image)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cifar-if")
    for split, per_class in (("train", CIFAR_TRAIN_PER_CLASS), ("test", CIFAR_TEST_PER_CLASS)):
        for label, name in enumerate(CIFAR_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(_cifar_like_image(label, split, i)).save(folder / f"{i:04d}.jpg", quality=95)
    return root


@pytest.fixture(scope="session")
def teacher_ckpt(fmnist, tmp_path_factory) -> Path:
    """A cnn_small teacher trained for 3 epochs on the Fashion-MNIST subset (crop-flip, padding 2);
    about 60% test top-1."""
    from kdpipe.data import load_dataset
    from kdpipe.engine import OptimConfig
    from kdpipe.teacher import train_teacher
    from kdpipe.views import create_policy

    train = load_dataset(fmnist.spec, "train")
    test = load_dataset(fmnist.spec, "test")
    out = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    train_teacher(train, test, "cnn_small", 3, out, policy=create_policy("crop-flip", padding=2),
                  batch_size=32, optim=OptimConfig(lr=0.1), seed=0, log=quiet)
    return out


def dump_and_capture(teacher_path, data, test, out, *, policy, views, **kwargs) -> SimpleNamespace:
    """Run stage one with forward hooks on the teacher; return what it saw and said, in row order.

    .inputs (N*K, C, H, W) float32 and .outputs (N*K, classes) float32 are the teacher's inputs and
    raw logits for the rows of the cache (row r = view r // N of sample r % N), .result is
    dump_logits' summary and .teacher the loaded teacher.
    """
    from kdpipe.checkpoint import load_teacher
    from kdpipe.teacher import dump_logits

    teacher = load_teacher(teacher_path)
    calls = []

    def hook(module, args, output):
        calls.append((args[0].detach().clone(), output.detach().float().clone()))

    handle = teacher.module.register_forward_hook(hook)
    try:
        result = dump_logits(teacher, data, test, out, policy=policy, views=views, log=quiet, **kwargs)
    finally:
        handle.remove()
    # First come dump_logits' probe calls (its clean views of probe_rows, twice: in batches of two sizes);
    # then the cache's rows in order; then the test split.
    from kdpipe.teacher import probe_rows
    probe, first = 2 * len(probe_rows(len(data))), 0
    while probe > 0 and first < len(calls):
        probe -= len(calls[first][0])
        first += 1
    assert probe == 0, "expected dump_logits to probe the teacher on probe_rows first"
    total = len(data) * views
    xs, ys, got = [], [], 0
    for x, y in calls[first:]:
        if got >= total:
            break
        xs.append(x)
        ys.append(y)
        got += len(x)
    assert got == total, f"captured {got} rows, the cache holds {total}"
    return SimpleNamespace(inputs=torch.cat(xs), outputs=torch.cat(ys), result=result, teacher=teacher)


@pytest.fixture(scope="session")
def capture_dump():
    """The function dump_and_capture (fixtures cannot be imported by test modules)."""
    return dump_and_capture


@pytest.fixture(scope="session")
def cache(fmnist, teacher_ckpt, tmp_path_factory) -> SimpleNamespace:
    """A finished cache of the teacher on the Fashion-MNIST subset: K = 3 crop-flip views, float16,
    shards of 500 rows (so shards cross view boundaries). Tests must not modify it.

    .path, .seed, .views, .policy, .train / .test (ImageData), .captured (see dump_and_capture).
    """
    from kdpipe.data import load_dataset
    from kdpipe.views import create_policy

    train = load_dataset(fmnist.spec, "train")
    test = load_dataset(fmnist.spec, "test")
    policy = create_policy("crop-flip", padding=2)
    path = tmp_path_factory.mktemp("cache") / "fmnist-k3"
    captured = dump_and_capture(teacher_ckpt, train, test, path, policy=policy, views=3, seed=7,
                                shard_rows=500, batch_size=200)
    return SimpleNamespace(path=path, seed=7, views=3, policy=policy, train=train, test=test, captured=captured)


@pytest.fixture(scope="session")
def student_runs(cache, tmp_path_factory) -> SimpleNamespace:
    """Four mlp_100 students trained for 2 epochs from `cache`: scratch and KD (T 4, alpha 0.9), seeds 0
    and 1. .out (the runs directory), .results (train_students' metrics), .log (its messages)."""
    from kdpipe.student import train_students

    out = tmp_path_factory.mktemp("runs") / "runs"
    log: list[str] = []
    results = train_students(cache.path, ["mlp_100"], 2, out, temperatures=(4.0,), alphas=(0.0, 0.9),
                             seeds=(0, 1), batch_size=64, log=log.append)
    return SimpleNamespace(out=out, results=results, log=log)


def spy_stage_two(monkeypatch, wrap_loss=None) -> SimpleNamespace:
    """Record what train_students' loop hands its students: each epoch's batch order (.orders) and each
    training forward pass's input (.inputs). `wrap_loss(loss)`, when given, replaces every run's loss
    (e.g. with one that records its labels)."""
    from kdpipe import engine, student
    spy = SimpleNamespace(orders=[], inputs=[])
    real_batches, real_build = engine.batches, student.build_run

    def batches(*a, **kw):
        out = real_batches(*a, **kw)
        spy.orders.append(out)
        return out

    def build_run(*a, **kw):
        run = real_build(*a, **kw)
        run.model.register_forward_pre_hook(
            lambda mod, args: spy.inputs.append(args[0].detach().clone()) if mod.training else None)
        if wrap_loss is not None:
            run.loss = wrap_loss(run.loss)
        return run

    monkeypatch.setattr(engine, "batches", batches)
    monkeypatch.setattr(student, "build_run", build_run)
    return spy
