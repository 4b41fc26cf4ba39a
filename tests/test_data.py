"""Dataset sources: npz, IDX (gz or not), CIFAR python folders, ImageFolder with its decoded copy."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from kdpipe import KDPipeError
from kdpipe.data import FASHION_MNIST_CLASSES, MNIST_CLASSES, ImageData, load_dataset

from conftest import CIFAR_CLASSES, CIFAR_TEST_PER_CLASS, CIFAR_TRAIN_PER_CLASS, DEBIAN_FASHION_MNIST


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    """An IDX file of unsigned bytes: magic 0x0000 08 ndim, big-endian dims, then the data."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, a.ndim]) + struct.pack(">" + "I" * a.ndim, *a.shape) + a.tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def write_idx_folder(folder, mnist, compress=True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if compress else ""
    write_idx(folder / f"train-images-idx3-ubyte{sfx}", mnist.x_train, compress)
    write_idx(folder / f"train-labels-idx1-ubyte{sfx}", mnist.y_train.astype(np.uint8), compress)
    write_idx(folder / f"t10k-images-idx3-ubyte{sfx}", mnist.x_test, compress)
    write_idx(folder / f"t10k-labels-idx1-ubyte{sfx}", mnist.y_test.astype(np.uint8), compress)


# ---------------------------------------------------------------- npz

def test_npz_gives_uint8_nchw_images_labels_and_class_names(fmnist):
    for split, x, y in (("train", fmnist.x_train, fmnist.y_train), ("test", fmnist.x_test, fmnist.y_test)):
        d = load_dataset(fmnist.spec, split)
        assert d.images.dtype == np.uint8 and d.images.shape == (len(x), 1, 28, 28)
        assert d.labels.dtype == np.int64
        np.testing.assert_array_equal(d.images[:, 0], x)
        np.testing.assert_array_equal(d.labels, y)
        assert d.class_names == [str(i) for i in range(10)]
        assert d.num_classes == 10 and d.image_shape == (1, 28, 28) and len(d) == len(x)


def test_npz_nhwc_colour_images_are_transposed_and_class_names_kept(tmp_path, cifar_folder):
    train = load_dataset(f"imagefolder:{cifar_folder}", "train")
    test = load_dataset(f"imagefolder:{cifar_folder}", "test")
    nhwc = np.ascontiguousarray(np.asarray(train.images).transpose(0, 2, 3, 1))
    p = tmp_path / "c.npz"
    np.savez(p, x_train=nhwc, y_train=train.labels, x_test=np.asarray(test.images), y_test=test.labels,
             class_names=np.array(CIFAR_CLASSES))
    d = load_dataset(f"npz:{p}", "train")
    np.testing.assert_array_equal(d.images, train.images)
    assert d.class_names == CIFAR_CLASSES
    assert load_dataset(f"npz:{p}", "test").image_shape == (3, 32, 32)


@pytest.mark.parametrize("arrays, message", [
    ({"x_train": np.zeros((4, 8, 8), np.uint8)}, "must hold arrays x_train"),
    ({"x_train": np.zeros((4, 8, 8), np.float32), "y_train": np.zeros(4, np.int64),
      "x_test": np.zeros((4, 8, 8), np.float32), "y_test": np.zeros(4, np.int64)}, "uint8"),
    ({"x_train": np.zeros((4, 8, 8), np.uint8), "y_train": np.zeros(3, np.int64),
      "x_test": np.zeros((4, 8, 8), np.uint8), "y_test": np.zeros(4, np.int64)}, "labels"),
])
def test_npz_bad_contents_are_refused_with_a_reason(tmp_path, arrays, message):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(KDPipeError, match=message):
        load_dataset(f"npz:{p}", "train")


def test_npz_missing_or_corrupt_file(tmp_path):
    with pytest.raises(KDPipeError, match="no such file"):
        load_dataset(f"npz:{tmp_path / 'absent.npz'}", "train")
    p = tmp_path / "junk.npz"
    p.write_bytes(b"this is not a zip archive")
    with pytest.raises(KDPipeError, match="cannot read"):
        load_dataset(f"npz:{p}", "train")


def test_unknown_dataset_and_split():
    with pytest.raises(KDPipeError, match="unknown dataset 'svhn'"):
        load_dataset("svhn", "train")
    with pytest.raises(KDPipeError, match="unknown split"):
        load_dataset("fashion-mnist", "validation")


# ---------------------------------------------------------------- fingerprints

def test_fingerprint_depends_on_pixels_labels_and_subset(fmnist, tmp_path):
    a = load_dataset(fmnist.spec, "train")
    b = load_dataset(fmnist.spec, "train")
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    assert a.subset(100).fingerprint != a.fingerprint
    x = fmnist.x_train.copy()
    x[3, 5, 5] ^= 1  # one pixel's lowest bit
    p = tmp_path / "one-pixel.npz"
    np.savez(p, x_train=x, y_train=fmnist.y_train, x_test=fmnist.x_test, y_test=fmnist.y_test)
    assert load_dataset(f"npz:{p}", "train").fingerprint != a.fingerprint
    y = fmnist.y_train.copy()
    y[0] = (y[0] + 1) % 10
    np.savez(p, x_train=fmnist.x_train, y_train=y, x_test=fmnist.x_test, y_test=fmnist.y_test)
    assert load_dataset(f"npz:{p}", "train").fingerprint != a.fingerprint


def test_image_data_checks_its_invariants():
    imgs = np.zeros((3, 1, 4, 4), np.uint8)
    with pytest.raises(KDPipeError, match="uint8"):
        ImageData(imgs.astype(np.float32), np.zeros(3, np.int64), ["a", "b"], "x", "train", "-")
    with pytest.raises(KDPipeError, match="labels must lie"):
        ImageData(imgs, np.array([0, 1, 2]), ["a", "b"], "x", "train", "-")
    with pytest.raises(KDPipeError, match="no images"):
        ImageData(imgs[:0], np.zeros(0, np.int64), ["a"], "x", "train", "-")


# ---------------------------------------------------------------- IDX files

def test_fashion_mnist_from_the_debian_package(fmnist):
    """No --data-root: Debian's location. kdpipe's IDX reader agrees with the tests' own (fmnist holds
    the first rows, read by conftest), and the split is Fashion-MNIST's whole test split."""
    d = load_dataset("fashion-mnist", "test")
    assert d.source == str(DEBIAN_FASHION_MNIST)
    assert d.class_names == FASHION_MNIST_CLASSES
    assert d.images.shape == (10_000, 1, 28, 28)
    np.testing.assert_array_equal(np.bincount(d.labels), [1000] * 10)  # the test split is balanced
    np.testing.assert_array_equal(d.images[:len(fmnist.x_test), 0], fmnist.x_test)
    np.testing.assert_array_equal(d.labels[:len(fmnist.y_test)], fmnist.y_test)
    same = load_dataset("fashion-mnist", "test", data_root=DEBIAN_FASHION_MNIST)
    assert same.fingerprint == d.fingerprint


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_from_a_folder_of_idx_files(tmp_path, mnist, compress):
    write_idx_folder(tmp_path / "idx", mnist, compress)
    tr = load_dataset("mnist", "train", data_root=tmp_path / "idx")
    te = load_dataset("mnist", "test", data_root=tmp_path / "idx")
    np.testing.assert_array_equal(tr.images[:, 0], mnist.x_train)
    np.testing.assert_array_equal(tr.labels, mnist.y_train)
    np.testing.assert_array_equal(te.images[:, 0], mnist.x_test)
    assert tr.class_names == MNIST_CLASSES and tr.images.shape == (len(mnist.x_train), 1, 28, 28)


def test_mnist_from_torchvisions_folder_layout(tmp_path, mnist):
    write_idx_folder(tmp_path / "MNIST" / "raw", mnist, compress=True)
    d = load_dataset("mnist", "test", data_root=tmp_path)
    np.testing.assert_array_equal(d.images[:, 0], mnist.x_test)


def test_idx_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(KDPipeError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "train", data_root=tmp_path)
    with pytest.raises(KDPipeError, match="--data-root"):
        load_dataset("mnist", "train")


def test_idx_truncated_file_is_refused(tmp_path, mnist):
    write_idx_folder(tmp_path, mnist, compress=False)
    p = tmp_path / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(KDPipeError, match="truncated"):
        load_dataset("mnist", "test", data_root=tmp_path)


# ---------------------------------------------------------------- CIFAR python folders

def test_cifar10_python_folder(tmp_path, cifar_folder):
    train = load_dataset(f"imagefolder:{cifar_folder}", "train")
    test = load_dataset(f"imagefolder:{cifar_folder}", "test")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    x = np.asarray(train.images).reshape(len(train), -1)
    parts = np.array_split(np.arange(len(train)), 5)
    for i, idx in enumerate(parts, 1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": x[idx], "labels": train.labels[idx].tolist()}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.asarray(test.images).reshape(len(test), -1), "labels": test.labels.tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES}, f)
    d = load_dataset("cifar10", "train", data_root=tmp_path)
    np.testing.assert_array_equal(d.images, train.images)
    np.testing.assert_array_equal(d.labels, train.labels)
    assert d.class_names == CIFAR_CLASSES
    assert load_dataset("cifar10", "test", data_root=folder).fingerprint == test.fingerprint
    with pytest.raises(KDPipeError, match="cifar-100-python"):
        load_dataset("cifar100", "train", data_root=tmp_path)


# ---------------------------------------------------------------- ImageFolder

def test_imagefolder_decodes_jpegs_in_class_order(cifar_folder, monkeypatch, tmp_path):
    monkeypatch.setenv("KDPIPE_DATA_CACHE", str(tmp_path / "decoded"))
    d = load_dataset(f"imagefolder:{cifar_folder}", "train")
    assert d.class_names == CIFAR_CLASSES  # sorted folder names
    assert d.images.shape == (10 * CIFAR_TRAIN_PER_CLASS, 3, 32, 32) and d.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(d.labels), [CIFAR_TRAIN_PER_CLASS] * 10)
    # Sample i is the i-th file in (class, name) order, decoded by Pillow to RGB, stored CHW.
    files = sorted((cifar_folder / "train" / "bird").iterdir())
    i = 2 * CIFAR_TRAIN_PER_CLASS + 3
    assert d.labels[i] == CIFAR_CLASSES.index("bird")
    ref = np.asarray(Image.open(files[3]).convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(d.images[i], ref)
    t = load_dataset(f"imagefolder:{cifar_folder}", "test")
    assert len(t) == 10 * CIFAR_TEST_PER_CLASS and t.class_names == CIFAR_CLASSES


def test_imagefolder_decoded_copy_is_reused_and_invalidated(cifar_folder, monkeypatch, tmp_path):
    cache_dir = tmp_path / "decoded"
    monkeypatch.setenv("KDPIPE_DATA_CACHE", str(cache_dir))
    root = tmp_path / "if"
    import shutil
    shutil.copytree(cifar_folder, root)
    first = load_dataset(f"imagefolder:{root}", "test")
    npys = sorted(cache_dir.glob("*.npy"))
    metas = sorted(cache_dir.glob("*.json"))
    assert len(npys) == 1 and len(metas) == 1
    assert json.loads(metas[0].read_text())["fingerprint"] == first.fingerprint
    np.testing.assert_array_equal(np.load(npys[0]), first.images)

    # Second load: memory-maps the decoded copy rather than decoding again.
    import kdpipe.data as data_mod

    def no_decode(*a, **k):
        raise AssertionError("decoded again although a decoded copy exists")

    monkeypatch.setattr(data_mod, "_decode_all", no_decode)
    second = load_dataset(f"imagefolder:{root}", "test")
    assert isinstance(second.images, np.memmap)
    np.testing.assert_array_equal(second.images, first.images)
    assert second.fingerprint == first.fingerprint
    monkeypatch.undo()
    monkeypatch.setenv("KDPIPE_DATA_CACHE", str(cache_dir))

    # A changed file gives another key: decoded again, with the new pixels.
    victim = sorted((root / "test" / "cat").iterdir())[0]
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(victim, format="JPEG")
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10 ** 9))
    third = load_dataset(f"imagefolder:{root}", "test")
    assert len(list(cache_dir.glob("*.npy"))) == 2
    assert third.fingerprint != first.fingerprint
    i = CIFAR_CLASSES.index("cat") * CIFAR_TEST_PER_CLASS
    assert int(np.abs(third.images[i].astype(int)).max()) <= 8  # a black JPEG decodes to (near) zero


def test_imagefolder_errors(tmp_path):
    with pytest.raises(KDPipeError, match="no such folder"):
        load_dataset(f"imagefolder:{tmp_path / 'absent'}", "train")
    (tmp_path / "x" / "train").mkdir(parents=True)
    with pytest.raises(KDPipeError, match="no class folders"):
        load_dataset(f"imagefolder:{tmp_path / 'x'}", "train")
    with pytest.raises(KDPipeError, match="no test or val folder"):
        load_dataset(f"imagefolder:{tmp_path / 'x'}", "test")
    (tmp_path / "x" / "train" / "a").mkdir()
    (tmp_path / "x" / "train" / "a" / "0.png").write_bytes(b"not a png")
    with pytest.raises(KDPipeError, match="cannot decode"):
        load_dataset(f"imagefolder:{tmp_path / 'x'}", "train")


def test_imagefolder_of_mixed_sizes_is_refused(tmp_path):
    for i, size in enumerate((8, 9)):
        d = tmp_path / "train" / "c"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(d / f"{i}.png")
    with pytest.raises(KDPipeError, match="one size"):
        load_dataset(f"imagefolder:{tmp_path}", "train")
