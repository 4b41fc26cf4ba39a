"""Shared fixtures: small real data under tmp_path, a tiny trained teacher, a small cache.

Real data comes from ../shared/data (never from the repository); tests that need it skip when it
is absent. Everything runs on the CPU.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# Sizes of the small subsets (kept small: the whole suite must run in about a minute on 2 cores).
FMNIST_TRAIN, FMNIST_TEST = 512, 256
MNIST_TRAIN, MNIST_TEST = 256, 128
CIFAR_TRAIN_PER_CLASS, CIFAR_TEST_PER_CLASS = 12, 6


def quiet(*args, **kwargs):
    """A `log` for library calls whose messages a test does not read."""


@pytest.fixture(scope="session", autouse=True)
def _one_cpu_thread():
    """Small models on a shared 2-core machine run several times faster on one thread (OpenMP threads
    spin against other processes); KDPIPE_TEST_THREADS overrides."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("KDPIPE_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _decoded_copies_under_tmp(tmp_path_factory):
    """ImageFolder decodes go to a temporary folder, never to the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDPIPE_DATA_CACHE", str(tmp_path_factory.mktemp("decoded")))
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no shared data at {SHARED_DATA}")
    return SHARED_DATA


def _subset_npz(src: Path, dst: Path, n_train: int, n_test: int) -> dict:
    if not src.is_file():
        pytest.skip(f"{src} is absent")
    with np.load(src) as z:
        arrays = {"x_train": z["x_train"][:n_train], "y_train": z["y_train"][:n_train],
                  "x_test": z["x_test"][:n_test], "y_test": z["y_test"][:n_test]}
    np.savez(dst, **arrays)
    return arrays


@pytest.fixture(scope="session")
def fmnist(shared_data, tmp_path_factory) -> SimpleNamespace:
    """The first 512 train / 256 test Fashion-MNIST images as an npz: .path, .spec and the arrays."""
    path = tmp_path_factory.mktemp("fmnist") / "fmnist-small.npz"
    arrays = _subset_npz(shared_data / "fashion_mnist.npz", path, FMNIST_TRAIN, FMNIST_TEST)
    return SimpleNamespace(path=path, spec=f"npz:{path}", **arrays)


@pytest.fixture(scope="session")
def mnist(shared_data, tmp_path_factory) -> SimpleNamespace:
    """The first 256 train / 128 test MNIST images as an npz: .path, .spec and the arrays."""
    path = tmp_path_factory.mktemp("mnist") / "mnist-small.npz"
    arrays = _subset_npz(shared_data / "mnist.npz", path, MNIST_TRAIN, MNIST_TEST)
    return SimpleNamespace(path=path, spec=f"npz:{path}", **arrays)


@pytest.fixture(scope="session")
def cifar_folder(shared_data, tmp_path_factory) -> Path:
    """A small ImageFolder (train/<class>/*.jpg, test/<class>/*.jpg) of real CIFAR-10 JPEGs.

    Streams once through the .tar.xz and extracts only the first few files of every class.
    """
    tar_path = shared_data / "cifar10-imagefolder.tar.xz"
    if not tar_path.is_file():
        pytest.skip(f"{tar_path} is absent")
    root = tmp_path_factory.mktemp("cifar-if")
    want = {"train": CIFAR_TRAIN_PER_CLASS, "test": CIFAR_TEST_PER_CLASS}
    taken: dict[tuple[str, str], int] = {}
    needed = sum(want.values()) * len(CIFAR_CLASSES)
    with tarfile.open(tar_path, "r:xz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 4 or parts[1] not in want:
                continue
            key = (parts[1], parts[2])
            if taken.get(key, 0) >= want[parts[1]]:
                continue
            taken[key] = taken.get(key, 0) + 1
            dst = root / parts[1] / parts[2] / parts[3]
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(tar.extractfile(member).read())
            needed -= 1
            if needed == 0:
                break
    if needed:
        pytest.skip("the CIFAR-10 tarball does not hold the expected ImageFolder tree")
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
    # Call 0 is dump_logits' two-row probe; then come the cache's rows in order; then the test split.
    assert calls and len(calls[0][0]) == 2, "expected dump_logits to probe the teacher on two rows first"
    total = len(data) * views
    xs, ys, got = [], [], 0
    for x, y in calls[1:]:
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
