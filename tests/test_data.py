"""Dataset sources: npz, IDX (gz or not), CIFAR python folders, ImageFolder with its decoded copy."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
import shutil
import struct
import warnings

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


@pytest.mark.parametrize("channels", [2, 4, 13])
def test_npz_nhwc_of_any_channel_count_is_transposed(tmp_path, channels):
    """RGBA, grey+alpha or 13 bands last: the channel axis is the one smaller than height and width (it was
    taken for a 1- or 3-channel axis only, so (N, 16, 12, 4) loaded as 16 channels of 12x4 pixels)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 32, 24, channels), dtype=np.uint8)
    y = np.arange(8) % 2
    p = tmp_path / "nhwc.npz"
    np.savez(p, x_train=x, y_train=y, x_test=x, y_test=y)
    d = load_dataset(f"npz:{p}", "train")
    assert d.image_shape == (channels, 32, 24)
    np.testing.assert_array_equal(d.images, x.transpose(0, 3, 1, 2))
    np.savez(p, x_train=x.transpose(0, 3, 1, 2), y_train=y, x_test=x.transpose(0, 3, 1, 2), y_test=y)
    np.testing.assert_array_equal(load_dataset(f"npz:{p}", "train").images, d.images)  # NCHW kept as it is


def test_npz_images_whose_shape_cannot_tell_their_layout_need_a_layout_array(tmp_path):
    """13 bands of 8x8 stored NHWC, (N, 8, 8, 13): no axis is smaller than the other two, and they were read as
    NCHW, 8 channels of 8x13, without a word. Refused, naming the array that says which; with it they load."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 8, 8, 13), dtype=np.uint8)
    y = np.arange(6) % 2
    p = tmp_path / "bands.npz"
    np.savez(p, x_train=x, y_train=y, x_test=x, y_test=y)
    with pytest.raises(KDPipeError, match=r"x_train \(6, 8, 8, 13\) may be NHWC \(13 channels of 8x8\) or NCHW "
                                          r"\(8 channels of 8x13\): say which, with an array layout=\"NHWC\""):
        load_dataset(f"npz:{p}", "train")
    np.savez(p, x_train=x, y_train=y, x_test=x, y_test=y, layout="nhwc")
    d = load_dataset(f"npz:{p}", "train")
    assert d.image_shape == (13, 8, 8)
    np.testing.assert_array_equal(d.images, x.transpose(0, 3, 1, 2))
    np.savez(p, x_train=x, y_train=y, x_test=x, y_test=y, layout="NCHW")
    assert load_dataset(f"npz:{p}", "train").image_shape == (8, 8, 13)
    # a layout array overrides the shape's reading too: 32 channels of 32x3, not 3 channels of 32x32
    x = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.savez(p, x_train=x, y_train=y, x_test=x, y_test=y, layout="NCHW")
    assert load_dataset(f"npz:{p}", "train").image_shape == (32, 32, 3)
    np.savez(p, x_train=x, y_train=y, x_test=x, y_test=y, layout=np.array(["NCHW", "NHWC"]))
    with pytest.raises(KDPipeError, match=r"layout must be the string \"NCHW\" or \"NHWC\""):
        load_dataset(f"npz:{p}", "train")
    np.savez(p, x_train=x, y_train=y, x_test=x, y_test=y, layout="CHW")
    with pytest.raises(KDPipeError, match=r"layout must be .*, got 'CHW'"):
        load_dataset(f"npz:{p}", "train")


def test_npz_class_names_as_bytes_or_objects(tmp_path):
    """Bytes names (numpy's 'S' dtype, as h5py gives) are the names, not "b'cat'"; an object array (which
    np.load refuses without pickles) or a 2-D one is one line, not a ValueError traceback or "['cat']"."""
    x, y = np.zeros((4, 8, 8), np.uint8), np.array([0, 1, 0, 1])
    p = tmp_path / "n.npz"
    np.savez(p, x_train=x, y_train=y, x_test=x, y_test=y, class_names=np.array([b"cat", b"dog"]))
    assert load_dataset(f"npz:{p}", "train").class_names == ["cat", "dog"]
    np.savez(p, x_train=x, y_train=y, x_test=x, y_test=y, class_names=np.array(["cat", None], dtype=object))
    with pytest.raises(KDPipeError, match="cannot read class_names .*: store them as strings"):
        load_dataset(f"npz:{p}", "train")
    np.savez(p, x_train=x, y_train=y, x_test=x, y_test=y, class_names=np.array([["cat"], ["dog"]]))
    with pytest.raises(KDPipeError, match=r"class_names must be a 1-D array of names, got shape \(2, 1\)"):
        load_dataset(f"npz:{p}", "train")
    np.savez(p, x_train=x, y_train=y, x_test=x, y_test=y, class_names=np.array(["cat", "cat"]))
    with pytest.raises(KDPipeError, match=r"class_names names 'cat' 2 times \(classes 0, 1\): give each class"):
        load_dataset(f"npz:{p}", "train")


@pytest.mark.parametrize("arrays, message", [
    ({"x_train": np.zeros((4, 8, 8), np.uint8)}, "must hold arrays x_train"),
    ({"x_train": np.zeros((4, 8, 8), np.float32), "y_train": np.zeros(4, np.int64),
      "x_test": np.zeros((4, 8, 8), np.float32), "y_test": np.zeros(4, np.int64)}, "must be .N, D. feature"),
    ({"x_train": np.zeros((4, 8), np.int16), "y_train": np.zeros(4, np.int64),
      "x_test": np.zeros((4, 8), np.int16), "y_test": np.zeros(4, np.int64)}, "uint8 pixels or float"),
    ({"x_train": np.array([[0.0, np.nan]]), "y_train": np.zeros(1, np.int64),
      "x_test": np.zeros((1, 2)), "y_test": np.zeros(1, np.int64)}, "NaN or infinite values.* .row 0."),
    ({"x_train": np.array([[0.0, 1.0], [1e39, 0.0]]), "y_train": np.zeros(2, np.int64),
      "x_test": np.zeros((1, 2)), "y_test": np.zeros(1, np.int64)}, "past float32's range .row 1."),
    ({"x_train": np.zeros((4, 8, 8), np.uint8), "y_train": np.zeros(3, np.int64),
      "x_test": np.zeros((4, 8, 8), np.uint8), "y_test": np.zeros(4, np.int64)}, "labels"),
    ({"x_train": np.zeros((4, 8, 8), np.uint8), "y_train": np.eye(3)[[0, 1, 2, 0]],
      "x_test": np.zeros((4, 8, 8), np.uint8), "y_test": np.eye(3)[[0, 1, 2, 0]]},
     r"y_train is one-hot, float64 \(4, 3\): store the class indices, y_train.argmax\(1\)"),
    # each said what the array was, not what to store in its place
    ({"x_train": np.full((4, 8, 8), 0.5, np.float32), "y_train": np.zeros(4, np.int64),
      "x_test": np.zeros((4, 8, 8), np.float32), "y_test": np.zeros(4, np.int64)},
     r"images scaled to 0..1 go back to pixels with np.round\(x_train \* 255\).astype\(np.uint8\)"),
    ({"x_train": np.full((4, 8, 8, 1), 200.0), "y_train": np.zeros(4, np.int64),
      "x_test": np.zeros((4, 8, 8, 1)), "y_test": np.zeros(4, np.int64)},
     r"they lie in 0..255, so store x_train.round\(\).astype\(np.uint8\)"),
    ({"x_train": np.full((4, 8, 8), 7, np.int64), "y_train": np.zeros(4, np.int64),
      "x_test": np.zeros((4, 8, 8), np.int64), "y_test": np.zeros(4, np.int64)},
     r"got int64 \(4, 8, 8\): they lie in 0..255, so store x_train.astype\(np.uint8\)"),
    ({"x_train": np.zeros((4, 8), np.int16), "y_train": np.zeros(4, np.int64),
      "x_test": np.zeros((4, 8), np.int16), "y_test": np.zeros(4, np.int64)},
     r"store feature vectors as float, x_train.astype\(np.float32\)"),
    ({"x_train": np.zeros((4, 8, 8), np.uint8), "y_train": np.array([0.0, 1.0, 2.0, 0.0], np.float32),
      "x_test": np.zeros((4, 8, 8), np.uint8), "y_test": np.zeros(4, np.int64)},
     r"these are whole numbers, store them as integers, y_train.astype\(np.int64\)"),
    ({"x_train": np.zeros((4, 8, 8), np.uint8), "y_train": np.array(["cat", "dog", "cat", "dog"]),
      "x_test": np.zeros((4, 8, 8), np.uint8), "y_test": np.zeros(4, np.int64)},
     r"class_names = np.unique\(y_train\), then each split's np.searchsorted\(class_names, y\)"),
])
def test_npz_bad_contents_are_refused_with_a_reason(tmp_path, arrays, message):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reason alone: no RuntimeWarning of numpy's before it
        with pytest.raises(KDPipeError, match=message):
            load_dataset(f"npz:{p}", "train")


def test_npz_labels_of_shape_n_by_1_are_the_labels(tmp_path):
    """Keras' load_data() gives labels (N, 1): saved as they are, they were refused as 'a 1-D integer array'
    with no word of what to do; they are the labels (N,)."""
    x = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    y = np.array([[0], [1], [2], [0], [1], [2]], np.uint8)
    np.savez(tmp_path / "k.npz", x_train=x, y_train=y, x_test=x[:3], y_test=y[:3])
    d = load_dataset(f"npz:{tmp_path / 'k.npz'}", "train")
    assert d.labels.tolist() == [0, 1, 2, 0, 1, 2] and d.image_shape == (3, 32, 32) and d.num_classes == 3
    assert load_dataset(f"npz:{tmp_path / 'k.npz'}", "test").labels.tolist() == [0, 1, 2]


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


def test_idx_files_are_read_by_their_contents_not_their_gz_suffix(tmp_path, mnist):
    """A browser may save a gzip download decompressed under its .gz name, and a .gz file may lose its
    suffix: both were refused as corrupt or 'not an IDX file'. Labels of another shape are named."""
    write_idx_folder(tmp_path, mnist, compress=False)
    (tmp_path / "train-images-idx3-ubyte").rename(tmp_path / "train-images-idx3-ubyte.gz")  # plain, named .gz
    write_idx(tmp_path / "train-labels-idx1-ubyte", mnist.y_train, compress=True)  # gzip, named plain
    d = load_dataset("mnist", "train", data_root=tmp_path)
    np.testing.assert_array_equal(d.images[:, 0], mnist.x_train)
    np.testing.assert_array_equal(d.labels, mnist.y_train)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.stack([mnist.y_train] * 2, 1), compress=False)
    with pytest.raises(KDPipeError, match=r"train-labels-idx1-ubyte: expected \(N,\) labels, got shape \(256, 2\)"):
        load_dataset("mnist", "train", data_root=tmp_path)


def test_mnist_from_torchvisions_folder_layout(tmp_path, mnist):
    write_idx_folder(tmp_path / "MNIST" / "raw", mnist, compress=True)
    d = load_dataset("mnist", "test", data_root=tmp_path)
    np.testing.assert_array_equal(d.images[:, 0], mnist.x_test)


def test_mnist_and_fashion_mnist_side_by_side_in_one_torchvision_root(tmp_path, mnist):
    """torchvision keeps MNIST/raw and FashionMNIST/raw under one root, with the same file names: each
    source reads its own folder, and one missing is refused rather than the other read in its place."""
    write_idx_folder(tmp_path / "MNIST" / "raw", mnist, compress=True)
    fashion = mnist.x_train[:, ::-1].copy()
    (tmp_path / "FashionMNIST" / "raw").mkdir(parents=True)
    write_idx(tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz", fashion, True)
    write_idx(tmp_path / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte.gz", mnist.y_train, True)
    np.testing.assert_array_equal(load_dataset("fashion-mnist", "train", data_root=tmp_path).images[:, 0], fashion)
    np.testing.assert_array_equal(load_dataset("mnist", "train", data_root=tmp_path).images[:, 0], mnist.x_train)
    np.testing.assert_array_equal(load_dataset("fashion-mnist", "train", data_root=tmp_path / "FashionMNIST")
                                  .images[:, 0], fashion)
    with pytest.raises(KDPipeError, match="FashionMNIST"):
        load_dataset("fashion-mnist", "test", data_root=tmp_path)  # its test files are missing: not MNIST's
    shutil.rmtree(tmp_path / "MNIST")
    with pytest.raises(KDPipeError, match="MNIST IDX files"):
        load_dataset("mnist", "train", data_root=tmp_path)


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
    npys = sorted(p for p in cache_dir.glob("*.npy") if not p.name.endswith(".sizes.npy"))
    metas = sorted(cache_dir.glob("*.json"))
    assert len(npys) == 1 and len(metas) == 1
    assert json.loads(metas[0].read_text())["fingerprint"] == first.fingerprint
    np.testing.assert_array_equal(np.load(npys[0]), first.images)

    # Second load: memory-maps the decoded copy rather than decoding again.
    import kdpipe.data as data_mod

    def no_decode(*a, **k):
        raise AssertionError("decoded again although a decoded copy exists")

    monkeypatch.setattr(data_mod, "_decode_into", no_decode)
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
    assert len(list(cache_dir.glob("*.json"))) == 2
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
    for c in ("a", "b"):
        (tmp_path / "x" / "train" / c).mkdir()
        (tmp_path / "x" / "train" / c / "0.png").write_bytes(b"not a png")
    with pytest.raises(KDPipeError, match="cannot decode"):
        load_dataset(f"imagefolder:{tmp_path / 'x'}", "train")


def test_imagefolder_hidden_folders_are_not_classes(tmp_path):
    """Jupyter leaves .ipynb_checkpoints in every folder it opens: no class in the train folder, and not a
    class 'not in the train folder' in either split (that refused the dataset)."""
    for split in ("train", "test"):
        for c in ("a", "b", ".ipynb_checkpoints"):
            (tmp_path / split / c).mkdir(parents=True)
        for c in ("a", "b"):
            Image.fromarray(np.full((8, 8), 40 if c == "a" else 200, np.uint8)).save(tmp_path / split / c / "0.png")
    for split in ("train", "test"):
        d = load_dataset(f"imagefolder:{tmp_path}", split)
        assert d.class_names == ["a", "b"] and d.labels.tolist() == [0, 1]


def test_imagefolder_images_outside_class_folders_are_said(tmp_path, capsys):
    """An image beside the class folders has no class: it was dropped without a word, and a test folder of
    loose images was said to hold no images."""
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / split / c / "0.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "train" / "stray.png")
    assert len(load_dataset(f"imagefolder:{tmp_path}", "train")) == 2
    err = capsys.readouterr().err
    assert "skipped 1 image(s) directly in" in err and "(e.g. stray.png): their class is unknown" in err
    shutil.rmtree(tmp_path / "test")
    (tmp_path / "test").mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "test" / f"{i}.png")
    with pytest.raises(KDPipeError, match=r"the 3 images of .*test \(e.g. 0.png\) lie outside class folders: put each"):
        load_dataset(f"imagefolder:{tmp_path}", "test")


def test_links_whose_target_is_missing_are_said_not_dropped(tmp_path, capsys):
    """A class folder of links into a photo store that is not mounted (or whose files were deleted): the links
    were neither images nor "other files", so they were dropped without a word, in imagefolder: and files:."""
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "if" / split / c).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "if" / split / c / "0.png")
            (tmp_path / "fl" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "fl" / split / f"{c}_0.png")
    for i in range(2):
        (tmp_path / "if" / "train" / "a" / f"gone{i}.jpg").symlink_to(tmp_path / "unmounted" / f"{i}.jpg")
    (tmp_path / "fl" / "train" / "b_7.jpg").symlink_to(tmp_path / "unmounted" / "7.jpg")
    assert len(load_dataset(f"imagefolder:{tmp_path / 'if'}", "train")) == 2
    err = capsys.readouterr().err
    assert (f"skipped 2 link(s) under {tmp_path / 'if' / 'train'} whose target is missing (e.g. gone0.jpg -> "
            f"{tmp_path / 'unmounted' / '0.jpg'}): restore the targets") in err
    assert "not images kdpipe reads" not in err
    assert len(load_dataset(f"files:{tmp_path / 'fl'}", "train")) == 2
    assert "skipped 1 link(s)" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["..", "."])
def test_a_link_to_a_folder_holding_it_is_refused(tmp_path, target):
    """Class folders are read with their subfolders, following links: a link back up (to the split folder, or
    to the class folder itself) made class a's images be read again at every level, with class b's among them,
    until the path grew too long (4 train images became 164)."""
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / split / c / "0.png")
    (tmp_path / "train" / "a" / "more").symlink_to(target, target_is_directory=True)
    with pytest.raises(KDPipeError, match=rf"train/a/more links to {re.escape(target)}, a folder that holds it: .* "
                                          "remove the link"):
        load_dataset(f"imagefolder:{tmp_path}", "train")
    (tmp_path / "train" / "a" / "more").unlink()
    (tmp_path / "elsewhere").mkdir()  # a link to a folder elsewhere is read, as before
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "elsewhere" / "1.png")
    (tmp_path / "train" / "a" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert load_dataset(f"imagefolder:{tmp_path}", "train").labels.tolist() == [0, 0, 1]


def test_an_imagefolder_one_level_too_high_is_named(tmp_path):
    """train/images/<class>/ (a zip unpacked into a folder of its own) read as the one class 'images', its
    subfolders' photos all of it: the teacher trained to 100% and learnt nothing."""
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / "if" / split / "images" / c).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "if" / split / "images" / c / "0.png")
    with pytest.raises(KDPipeError, match=r"train has one folder, images, and its subfolders \(cat, dog\) look like "
                                          r"the classes: move them up into"):
        load_dataset(f"imagefolder:{tmp_path / 'if'}", "train")


def test_one_class_is_refused(tmp_path):
    """Labels that are all 0 (a label column misread, a folder of one class): a model that always answers 0
    reaches 100% and learns nothing, so the data is refused before anything trains on it."""
    np.savez(tmp_path / "one.npz", x_train=np.zeros((6, 4, 4), np.uint8), y_train=np.zeros(6, np.int64),
             x_test=np.zeros((2, 4, 4), np.uint8), y_test=np.zeros(2, np.int64))
    with pytest.raises(KDPipeError, match="every sample has label 0, so there is one class"):
        load_dataset(f"npz:{tmp_path / 'one.npz'}", "train")
    for i in range(2):
        (tmp_path / "f" / "train" / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "f" / "train" / "c" / f"{i}.png")
    with pytest.raises(KDPipeError, match="one class: a classifier needs two or more"):
        load_dataset(f"imagefolder:{tmp_path / 'f'}", "train")


def test_imagefolder_of_mixed_sizes_is_refused(tmp_path):
    for i, size in enumerate((8, 9)):
        d = tmp_path / "train" / "c"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(d / f"{i}.png")
    (tmp_path / "train" / "d").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / "d" / "2.png")
    with pytest.raises(KDPipeError, match=r"differ in size \(0.png is 8x8, 1.png is 9x9\): pass --image-size S"):
        load_dataset(f"imagefolder:{tmp_path}", "train")


# ---------------------------------------------------------------- photos of any size (--image-size)

def _photo(rng, mode: str, w: int, h: int) -> Image.Image:
    """A random image of the given mode and size (noise over a gradient, so a resize has work to do)."""
    base = (np.add.outer(np.linspace(0, 200, h), np.linspace(0, 55, w))[:, :, None]
            + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)
    rgb = Image.fromarray(base, "RGB")
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    if mode == "RGBA":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(128)
        return rgba
    return rgb.convert(mode)


def make_photo_folder(root, per_class=3, classes=("a", "b"), modes=("L", "RGB", "RGBA", "P"), seed=0) -> dict:
    """train/ and test/ folders of JPEG and PNG images of random sizes (24-600 px) in mixed modes;
    returns {path: (mode, (height, width))}."""
    rng = np.random.default_rng(seed)
    made = {}
    for split, n in (("train", per_class), ("test", max(1, per_class // 2))):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                mode = modes[(i + len(made)) % len(modes)]
                w, h = (int(v) for v in rng.integers(24, 601, 2))
                ext = ".jpg" if mode in ("L", "RGB") and i % 2 == 0 else ".png"  # JPEG holds neither alpha nor palette
                p = root / split / c / f"{i:03d}{ext}"
                _photo(rng, mode, w, h).save(p)
                made[p] = (mode, (h, w))
    return made


def test_a_slow_pass_over_the_photos_headers_reports_its_progress(tmp_path, capsys, monkeypatch):
    """The pass over every file's header before decoding said nothing: minutes on a cold disk of 100,000 photos.
    It reports its progress as decoding does, from its first line due (here every block: `every` 0)."""
    import functools

    from kdpipe import data, util
    make_photo_folder(tmp_path / "photos", per_class=4)
    monkeypatch.setattr(data, "DECODE_BLOCK", 2)
    monkeypatch.setattr(util, "Progress", functools.partial(util.Progress, every=0))
    load_dataset(f"imagefolder:{tmp_path / 'photos'}", "train", image_size=32)
    err = capsys.readouterr().err
    for done in (2, 4, 6, 8):
        assert f"reading the headers of imagefolder:{tmp_path / 'photos'} train: {done}/8 images" in err, err


def test_photos_of_any_size_and_mode_load_at_image_size(tmp_path, capsys):
    made = make_photo_folder(tmp_path / "photos", per_class=4)
    d = load_dataset(f"imagefolder:{tmp_path / 'photos'}", "train", image_size=32)
    files = sorted(p for p in made if p.parts[-3] == "train")
    assert d.kind == "photos" and d.image_shape == (3, 32, 32) and len(d) == len(files) == 8
    assert isinstance(d.images, np.memmap) and d.images.dtype == np.uint8
    # Every original size is recorded, in sample order.
    np.testing.assert_array_equal(d.sizes, [made[p][1] for p in files])
    grey = sum(made[p][0] == "L" for p in files)
    err = capsys.readouterr().err
    assert grey and f"its {grey} grey images (of {len(files)}) converted to RGB" in err
    assert "decoding" in err and "8/8 images (100.0%)" in err  # progress shown
    assert "reading the headers" not in err  # a pass over before a progress line was due says nothing
    # Values: torchvision's Resize(32, bicubic) + CenterCrop(32) of the same PIL image, for every mode.
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    for i, p in enumerate(files):
        im = Image.open(p)
        im = (im.convert("RGBA") if im.mode == "P" else im).convert("RGB")
        ref = TF.center_crop(TF.resize(im, 32, interpolation=InterpolationMode.BICUBIC), 32)
        np.testing.assert_array_equal(d.images[i], np.asarray(ref).transpose(2, 0, 1), err_msg=str(p))
    assert d.identity()["image_size"] == 32 and d.identity()["kind"] == "photos"


def test_photos_are_stored_upright_by_their_exif_orientation(tmp_path):
    """A phone's portrait photo is its sensor's landscape pixels with an EXIF orientation (6: turn 90 degrees
    clockwise to view). It is stored as viewers show it, beside an upright portrait photo of the same scene:
    it was stored on its side (and, as landscape, passed the same-size check of a folder of portraits)."""
    rng = np.random.default_rng(0)
    upright = rng.integers(0, 256, (20, 12, 3), dtype=np.uint8)  # 12 wide, 20 high
    sensor = np.ascontiguousarray(np.rot90(upright, k=1))  # 20 wide, 12 high; clockwise 90 shows `upright`
    exif = Image.Exif()
    exif[0x0112] = 6
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(upright).save(tmp_path / split / c / "0.png")
            Image.fromarray(sensor).save(tmp_path / split / c / "1.png", exif=exif.tobytes())
    d = load_dataset(f"imagefolder:{tmp_path}", "train")
    assert d.image_shape == (3, 20, 12)
    np.testing.assert_array_equal(d.images[1], upright.transpose(2, 0, 1))
    np.testing.assert_array_equal(d.images[0], d.images[1])
    p = load_dataset(f"imagefolder:{tmp_path}", "train", image_size=12)
    np.testing.assert_array_equal(p.sizes, [[20, 12]] * 4)
    np.testing.assert_array_equal(p.images[1], p.images[0])


@pytest.mark.parametrize("mode", ["RGB", "L", "I;16"])
def test_tiffs_turned_by_their_orientation_are_stored_upright(tmp_path, mode):
    """Pillow turns a TIFF by its orientation tag itself (on load), and since Pillow 11 its size is the upright one
    before loading: kdpipe turned the size again, so a folder of such TIFFs was refused as differing in size (or
    its sizes recorded sideways), and an uncompressed grey or 16-bit TIFF, opened by its path (Pillow maps its
    pixels at the upright size), was stored scrambled."""
    rng = np.random.default_rng(0)
    upright = rng.integers(0, 256, (20, 12, 3), dtype=np.uint8)
    if mode != "RGB":
        upright = upright[..., 0]

    def image(a):
        return Image.fromarray(a.astype(np.uint16) * 257) if mode == "I;16" else Image.fromarray(a)

    exif = Image.Exif()
    exif[0x0112] = 6
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            image(upright).save(tmp_path / split / c / "0.tif")
            image(np.ascontiguousarray(np.rot90(upright, k=1))).save(tmp_path / split / c / "1.tif",
                                                                      exif=exif.tobytes())
    want = upright.transpose(2, 0, 1) if mode == "RGB" else upright[None]
    d = load_dataset(f"imagefolder:{tmp_path}", "train")
    assert d.image_shape == want.shape
    np.testing.assert_array_equal(d.images[1], want)
    p = load_dataset(f"imagefolder:{tmp_path}", "train", image_size=12)
    np.testing.assert_array_equal(p.sizes, [[20, 12]] * 4)
    np.testing.assert_array_equal(p.images[1], p.images[0])


def test_photo_resize_is_antialiased_and_centred(tmp_path):
    """A 600x200 image whose middle half is red and the rest vertical 1-px stripes: the centre crop of
    the 96x32 resize keeps red only (32 of 48 red columns, clear of the filter's reach); and a 64x64 of
    stripes reduced to 32 averages to about 128 (an aliased resize would keep 0s and 255s)."""
    img = np.zeros((200, 600, 3), np.uint8)
    img[:, ::2] = 255
    img[:, 150:450] = (200, 0, 0)
    (tmp_path / "f" / "train" / "c").mkdir(parents=True)
    (tmp_path / "f" / "train" / "d").mkdir()  # a second class: one class is refused
    Image.fromarray(img).save(tmp_path / "f" / "train" / "c" / "x.png")
    Image.fromarray(img).save(tmp_path / "f" / "train" / "d" / "y.png")
    d = load_dataset(f"imagefolder:{tmp_path / 'f'}", "train", image_size=32)
    assert d.sizes.tolist() == [[200, 600], [200, 600]]
    x = np.asarray(d.images[0]).astype(int)
    np.testing.assert_array_equal(x[0], 200)  # red spans columns 24..71 of 96; the crop keeps 32..63
    np.testing.assert_array_equal(x[1:], 0)
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255
    Image.fromarray(stripes).save(tmp_path / "f" / "train" / "c" / "x.png")
    flat = np.asarray(load_dataset(f"imagefolder:{tmp_path / 'f'}", "train", image_size=32).images[0])
    assert np.abs(flat[:, :, 2:-2].astype(int) - 128).max() <= 4  # the edge columns see the border


def test_photos_decoded_copy_is_memory_mapped_reused_and_keyed_by_image_size(tmp_path, monkeypatch):
    cache_dir = tmp_path / "decoded"
    monkeypatch.setenv("KDPIPE_DATA_CACHE", str(cache_dir))
    make_photo_folder(tmp_path / "p")
    spec = f"imagefolder:{tmp_path / 'p'}"
    first = load_dataset(spec, "train", image_size=24)
    assert not list(cache_dir.glob("*.tmp*"))  # written under a temporary name, renamed when complete
    import kdpipe.data as data_mod

    def no_decode(*a, **k):
        raise AssertionError("decoded again although a decoded copy exists")

    with monkeypatch.context() as mp:
        mp.setattr(data_mod, "_decode_into", no_decode)
        again = load_dataset(spec, "train", image_size=24)
    assert isinstance(again.images, np.memmap) and again.kind == "photos"
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.sizes, first.sizes)
    assert again.fingerprint == first.fingerprint
    other = load_dataset(spec, "train", image_size=28)
    assert other.image_shape == (3, 28, 28) and other.fingerprint != first.fingerprint
    assert len(list(cache_dir.glob("*.json"))) == 2
    # The fingerprint covers the resize itself, not only the pixels it made.
    same_pixels = data_mod.Photos(np.asarray(first.images), first.labels, first.class_names, first.spec, "train",
                                  first.source, None, first.sizes, image_size=24)
    assert same_pixels.fingerprint == first.fingerprint
    monkeypatch.setattr(data_mod, "RESIZE", "another-method/1")
    assert data_mod.Photos(np.asarray(first.images), first.labels, first.class_names, first.spec, "train",
                           first.source, None, first.sizes, image_size=24).fingerprint != first.fingerprint
    sub = first.subset(3)
    assert sub.kind == "photos" and sub.sizes.shape == (3, 2) and sub.fingerprint != first.fingerprint


def _aspect_folder(root, sizes, seed=0) -> list:
    """train/ and test/ of classes a and b: one PNG per (w, h) in `sizes` (RGB and grey), plus a phone's portrait
    photo (landscape pixels with EXIF orientation 6); returns the train files in load order."""
    rng = np.random.default_rng(seed)
    exif = Image.Exif()
    exif[0x0112] = 6
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                (im.convert("L") if i % 3 == 2 else im).save(root / split / c / f"{i}.png")
            Image.fromarray(rng.integers(0, 256, (30, 70, 3), dtype=np.uint8)).save(
                root / split / c / "phone.png", exif=exif.tobytes())
    return sorted((root / "train").glob("*/*.png"))


def test_squash_resizes_the_whole_photo_to_s_x_s_as_pil_does(tmp_path):
    """--resize squash: a teacher trained on photos squashed to S x S (torchvision's Resize((S, S)), the Food-11
    homework's) was fed centre crops: worse logits, above chance, cached without a word. Squashed, each stored
    photo is PIL's img.resize((S, S), BICUBIC) of the upright photo in the folder's colour mode, whatever its
    aspect ratio; crop mode still gives the centre crop."""
    from PIL import ImageOps
    S = 16
    files = _aspect_folder(tmp_path / "p", [(80, 20), (20, 80), (33, 33), (57, 41), (16, 16), (9, 40)])
    spec = f"imagefolder:{tmp_path / 'p'}"
    d = load_dataset(spec, "train", image_size=S, resize="squash")
    assert d.kind == "photos" and d.image_shape == (3, S, S) and len(d) == len(files)
    for i, p in enumerate(files):
        ref = ImageOps.exif_transpose(Image.open(p)).convert("RGB").resize((S, S), Image.BICUBIC)
        np.testing.assert_array_equal(d.images[i], np.asarray(ref).transpose(2, 0, 1), err_msg=str(p))
    assert d.identity()["resize"] == "pil-bicubic-squash/1" and d.identity()["image_size"] == S
    crop = load_dataset(spec, "train", image_size=S)
    assert crop.identity()["resize"] == "pil-bicubic-shorter-side+center-crop/1"
    assert crop.fingerprint != d.fingerprint and not np.array_equal(crop.images[0], d.images[0])
    assert load_dataset(spec, "test", image_size=S, resize="squash").identity()["resize"] == "pil-bicubic-squash/1"
    assert d.subset(3).identity()["resize"] == "pil-bicubic-squash/1"


@pytest.mark.parametrize("resize, S, transforms", [
    ("crop:40:bilinear", 32, lambda T, I: [T.Resize(40, I.BILINEAR), T.CenterCrop(32)]),  # ImageNet eval's shape
    ("crop:bilinear", 16, lambda T, I: [T.Resize(16, I.BILINEAR), T.CenterCrop(16)]),
    ("crop:23", 16, lambda T, I: [T.Resize(23, I.BICUBIC), T.CenterCrop(16)]),
    ("squash:bilinear", 16, lambda T, I: [T.Resize((16, 16), I.BILINEAR)]),  # transforms.Resize((S, S)): Food-11's
])
def test_resize_modes_store_exactly_torchvisions_evaluation_pixels(tmp_path, resize, S, transforms):
    """A torchvision teacher is evaluated on Resize(256) + CenterCrop(224) (bilinear, torchvision's default) or,
    in course exercises, Resize((S, S)); kdpipe stored a bicubic resize of the shorter side to S: close, not the
    same pixels, so the cache held the teacher's logits on inputs it was never evaluated on. --resize crop:R,
    squash and :bilinear store, pixel for pixel, what torchvision's transforms give the upright photo."""
    from PIL import ImageOps
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    from kdpipe.data import ResizeMode
    files = _aspect_folder(tmp_path / "p", [(80, 20), (20, 80), (33, 33), (57, 41), (40, 40), (9, 47), (41, 300)])
    spec = f"imagefolder:{tmp_path / 'p'}"
    d = load_dataset(spec, "train", image_size=S, resize=resize)
    tv = T.Compose(transforms(T, InterpolationMode))
    for i, p in enumerate(files):
        ref = tv(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))
        np.testing.assert_array_equal(d.images[i], np.asarray(ref).transpose(2, 0, 1), err_msg=str(p))
    mode = ResizeMode.parse(resize)
    assert d.resize == resize and d.identity()["resize"] == mode.method() and "/1" in mode.method()
    assert d.fingerprint != load_dataset(spec, "train", image_size=S).fingerprint  # another dataset than crop's
    assert load_dataset(spec, "test", image_size=S, resize=resize).identity()["resize"] == mode.method()


@pytest.mark.parametrize("crop_pct, interpolation", [(0.875, "bilinear"), (0.8, "bicubic"), (1.0, "bicubic")])
def test_a_timm_models_evaluation_transform_is_crop_of_s_over_crop_pct(tmp_path, crop_pct, interpolation):
    """A timm model is evaluated on Resize(floor(S / crop_pct), its interpolation) + CenterCrop(S), from its
    pretrained_cfg: --resize crop:floor(S / crop_pct):interpolation stores exactly those pixels."""
    import math

    from PIL import ImageOps
    from timm.data import create_transform
    S = 32
    tf = create_transform(input_size=(3, S, S), is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                          use_prefetcher=True)  # uint8 (C, H, W), before normalization
    files = _aspect_folder(tmp_path / "p", [(80, 20), (20, 80), (33, 33), (57, 41), (9, 47)])
    d = load_dataset(f"imagefolder:{tmp_path / 'p'}", "train", image_size=S,
                     resize=f"crop:{math.floor(S / crop_pct)}:{interpolation}")
    for i, p in enumerate(files):
        ref = tf(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))
        np.testing.assert_array_equal(d.images[i], np.asarray(ref), err_msg=str(p))


def test_resize_modes_are_written_one_way_and_checked(tmp_path):
    """Spellings of one mode are one dataset (crop:S is crop: the same identity, decoded copy and cache); a shorter
    side below S, a size for squash and unknown words are refused in one line; an identity names its mode back."""
    from kdpipe.data import ResizeMode, resize_mode
    _aspect_folder(tmp_path / "p", [(40, 30), (30, 40)])
    spec = f"imagefolder:{tmp_path / 'p'}"
    crop = load_dataset(spec, "train", image_size=16)
    for same in ("crop", "crop:16", "CROP:bicubic", "crop:16:bicubic"):
        d = load_dataset(spec, "train", image_size=16, resize=same)
        assert d.resize == "crop" and d.fingerprint == crop.fingerprint, same
    assert load_dataset(spec, "train", image_size=16, resize="crop:bilinear:20").resize == "crop:20:bilinear"
    with pytest.raises(KDPipeError, match=r"^--resize crop:12: the shorter side 12 is below --image-size 16, so no "
                                          r"16 x 16 centre can be cropped: give R >= 16$"):
        load_dataset(spec, "train", image_size=16, resize="crop:12")
    # "crop:\u00b2" (a superscript two, a digit to str.isdigit that int() does not read) was a ValueError traceback
    for bad in ("squash:20", "crop:20:30", "crop:bilinear:bicubic", "crop:lanczos", "crop:0", "crop:", "crop:\u00b2"):
        with pytest.raises(KDPipeError, match=r"^--resize must be one of crop, squash, crop:R"):
            load_dataset(spec, "train", image_size=16, resize=bad)
    for mode in ("crop", "squash", "crop:256", "crop:256:bilinear", "squash:bilinear", "crop:bilinear"):
        assert resize_mode({"image_size": 224, "resize": ResizeMode.parse(mode).method()}) == mode
    with pytest.raises(KDPipeError, match="which this version of kdpipe does not know: upgrade kdpipe"):
        resize_mode({"image_size": 224, "resize": "pil-lanczos-squash/1"})


def test_crops_identity_and_decoded_copy_are_unchanged_by_resize_modes(tmp_path, monkeypatch):
    """Crop (the default, and --resize crop) keeps the identity, fingerprint and decoded copy of before --resize
    existed (pinned: caches and decoded copies made earlier stay valid); squash is a copy and a dataset of its
    own."""
    from kdpipe.data import Photos
    imgs = (np.arange(4 * 3 * 8 * 8) % 251).astype(np.uint8).reshape(4, 3, 8, 8)
    sizes = np.array([[10, 20], [30, 8], [8, 8], [50, 40]])
    args = (imgs, np.array([0, 1, 0, 1]), ["a", "b"], "imagefolder:/x", "train", "/x", None, sizes)
    for p in (Photos(*args, image_size=8), Photos(*args, image_size=8, resize="crop")):
        assert p.storage_identity() == {"image_size": 8, "resize": "pil-bicubic-shorter-side+center-crop/1"}
        assert p.fingerprint == "67154fc348c2a0aa5415b31a2ffc0dbf31b0e0be16e0b894b18eb17b9c83f16f"  # as before
    assert Photos(*args, image_size=8, resize="squash").fingerprint != Photos(*args, image_size=8).fingerprint
    cache_dir = tmp_path / "decoded"
    monkeypatch.setenv("KDPIPE_DATA_CACHE", str(cache_dir))
    _aspect_folder(tmp_path / "p", [(40, 20), (20, 40)])
    spec = f"imagefolder:{tmp_path / 'p'}"
    first = load_dataset(spec, "train", image_size=12)
    assert load_dataset(spec, "train", image_size=12, resize="crop").fingerprint == first.fingerprint
    assert len(list(cache_dir.glob("*.json"))) == 1  # --resize crop maps the same decoded copy
    squash = load_dataset(spec, "train", image_size=12, resize="squash")
    assert len(list(cache_dir.glob("*.json"))) == 2 and squash.fingerprint != first.fingerprint
    metas = [json.loads(p.read_text()) for p in cache_dir.glob("*.json")]
    assert sorted(m["resize"] for m in metas) == ["pil-bicubic-shorter-side+center-crop/1", "pil-bicubic-squash/1"]


def test_resize_is_refused_without_image_size_or_image_files(tmp_path, fmnist_like):
    """--resize says how photos reach --image-size: without it, or for data not decoded from image files, it is
    refused in one line, as --image-size is there."""
    _aspect_folder(tmp_path / "p", [(40, 20), (20, 40)])
    with pytest.raises(KDPipeError, match=r"^--resize squash says how photos are brought to --image-size S: give "
                                          r"--image-size S too, or leave --resize out$"):
        load_dataset(f"imagefolder:{tmp_path / 'p'}", "train", resize="squash")
    with pytest.raises(KDPipeError, match=r"^--resize applies to image files \(imagefolder:, files:, csv:\) decoded "
                                          r"with --image-size S only; npz:.* leave it out$"):
        load_dataset(fmnist_like, "train", resize="squash")
    with pytest.raises(KDPipeError, match=r"^--resize must be one of crop, squash, crop:R .* e.g. crop:256:bilinear; got 'stretch'$"):
        load_dataset(f"imagefolder:{tmp_path / 'p'}", "train", image_size=8, resize="stretch")
    table = tmp_path / "t.csv"
    table.write_text("label,split,f1\n0,train,1.0\n1,train,2.0\n0,test,1.5\n1,test,2.5\n")
    with pytest.raises(KDPipeError, match="--image-size applies to images; csv:.* is a table of features"):
        load_dataset(f"csv:{table}", "train", image_size=8, resize="squash")


def test_a_users_source_without_a_resize_argument_refuses_squash_in_one_line(tmp_path, monkeypatch):
    """A source registered with load(spec, path, split, data_root, image_size), as docs/extending.md described before
    --resize, gave a TypeError traceback under --resize squash; crop still reaches it with five arguments."""
    from kdpipe import data
    calls = []

    def load(spec, path, split, data_root, image_size):
        calls.append(image_size)
        return data.load_dataset(f"imagefolder:{path}", split, data_root, image_size)

    _aspect_folder(tmp_path / "p", [(40, 20), (20, 40)])
    monkeypatch.setitem(data.SOURCES, "mine", data.Source("mine", "mine:PATH", load, path=True, image_files=True))
    with pytest.raises(KDPipeError, match=r"^--resize squash: the data source 'mine' does not take a resize mode"):
        load_dataset(f"mine:{tmp_path / 'p'}", "train", image_size=8, resize="squash")
    assert load_dataset(f"mine:{tmp_path / 'p'}", "train", image_size=8, resize="crop").image_size == 8
    assert calls == [8]


def test_resize_mode_reads_an_identity(tmp_path):
    """Stage two reloads photos by the resize their identity records; one recorded before --resize is crop."""
    from kdpipe.data import resize_mode
    assert resize_mode({"image_size": 8}) == "crop"
    assert resize_mode({"image_size": 8, "resize": "pil-bicubic-shorter-side+center-crop/1"}) == "crop"
    assert resize_mode({"image_size": 8, "resize": "pil-bicubic-squash/1"}) == "squash"
    assert resize_mode({"spec": "fashion-mnist"}) is None
    with pytest.raises(KDPipeError, match="resize 'lanczos/9', which this version of kdpipe does not know"):
        resize_mode({"image_size": 8, "resize": "lanczos/9"})


def test_varying_sizes_without_image_size_are_refused_before_decoding(tmp_path, monkeypatch):
    cache_dir = tmp_path / "decoded"
    monkeypatch.setenv("KDPIPE_DATA_CACHE", str(cache_dir))
    make_photo_folder(tmp_path / "p", modes=("RGB",))
    with pytest.raises(KDPipeError, match=r"the train images differ in size .*: pass --image-size S"):
        load_dataset(f"imagefolder:{tmp_path / 'p'}", "train")
    assert not cache_dir.exists() or not list(cache_dir.iterdir())


def test_image_size_applies_to_image_folders_only(fmnist_like):
    with pytest.raises(KDPipeError, match="--image-size applies to image files"):
        load_dataset(fmnist_like, "train", image_size=32)
    with pytest.raises(KDPipeError, match="whole number of pixels"):
        load_dataset("imagefolder:/nowhere", "train", image_size=0)


def test_same_size_folder_mixing_grey_and_colour_is_stored_in_rgb_with_a_note(tmp_path, capsys):
    rng = np.random.default_rng(1)
    grey_test = tmp_path / "f" / "test" / "a" / "g.png"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "f" / split / c).mkdir(parents=True)
    pix = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(pix, "L").save(tmp_path / "f" / "train" / "a" / "0.png")
    Image.fromarray(pix, "L").save(tmp_path / "f" / "train" / "a" / "1.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "f" / "train" / "b" / "0.png")
    Image.fromarray(pix, "L").save(grey_test)
    d = load_dataset(f"imagefolder:{tmp_path / 'f'}", "train")
    assert d.kind == "dense" and d.image_shape == (3, 16, 16)
    assert "its 2 grey images (of 3) converted to RGB" in capsys.readouterr().err
    np.testing.assert_array_equal(d.images[0], np.stack([pix] * 3))
    # The test split is all grey, but its folder holds colour: it is stored in RGB too (one shape).
    t = load_dataset(f"imagefolder:{tmp_path / 'f'}", "test")
    assert t.image_shape == (3, 16, 16)
    np.testing.assert_array_equal(t.images[0], np.stack([pix] * 3))


def test_images_of_several_frames_or_pages_are_said_to_be_read_from_their_first(tmp_path, capsys):
    """A multi-page TIFF (a scanned document, a microscope's stack of channels) and an animated GIF are read
    from their first page or frame, as before, but no longer without a word."""
    red, blue, grey = (Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (90, 90, 90)))
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            grey.save(tmp_path / split / c / "0.png")
    red.save(tmp_path / "train" / "a" / "pages.tif", save_all=True, append_images=[blue])
    red.save(tmp_path / "train" / "b" / "anim.gif", save_all=True, append_images=[blue])
    # a camera's JPEG holding a preview after the photo (MPO) is not worth the note
    red.save(tmp_path / "test" / "a" / "camera.jpg", format="MPO", save_all=True, append_images=[blue.resize((4, 4))])
    d = load_dataset(f"imagefolder:{tmp_path}", "train")
    assert "2 image(s) hold several frames or pages" in capsys.readouterr().err
    for row in (1, 3):  # a/pages.tif, b/anim.gif
        np.testing.assert_array_equal(np.asarray(d.images[row])[:, 0, 0], (255, 0, 0))
    load_dataset(f"imagefolder:{tmp_path}", "test")
    assert "several frames" not in capsys.readouterr().err


# ---------------------------------------------------------------- statistics

def test_channel_stats_use_a_uniform_sample_of_a_class_sorted_split():
    """30,000 samples sorted by class (10 classes of 3,000; class k's pixels all equal 20k): the first
    10,000 rows would hold classes 0..3 only; the uniform sample holds them all, equally."""
    n, k = 30_000, 10
    labels = np.repeat(np.arange(k), n // k)
    images = np.broadcast_to((labels * 20).astype(np.uint8)[:, None, None, None], (n, 2, 2, 2)).copy()
    images[:, 1] = 255 - images[:, 1]
    d = ImageData(images, labels, [str(i) for i in range(k)], "sorted", "train", "-")
    rows = d.stats_rows()
    assert len(rows) == 10_000 and np.array_equal(np.bincount(labels[rows]), [1000] * k)
    mean, std = d.channel_stats()
    values = np.arange(k) * 20 / 255
    np.testing.assert_allclose(mean, [values.mean(), 1 - values.mean()], rtol=1e-12)
    np.testing.assert_allclose(std, [values.std(), values.std()], rtol=1e-12)
    small = d.subset(500)  # at most 10,000 rows: every row
    assert np.array_equal(small.stats_rows(), np.arange(500))
    np.testing.assert_allclose(small.channel_stats()[0][0], 0.0)


def test_a_constant_image_channel_gets_std_1_not_0():
    """RGBA images whose alpha is 255 everywhere: std 0 made every input NaN, and train-teacher said the
    training diverged and to lower --lr."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 4, 5, 5), dtype=np.uint8)
    images[:, 3] = 255
    d = ImageData(images, np.arange(20) % 2, ["a", "b"], "rgba", "train", "-")
    mean, std = d.channel_stats()
    assert mean[3] == 1.0 and std[3] == 1.0 and all(0.2 < s < 0.4 for s in std[:3])


# ---------------------------------------------------------------- float features (tabular data)

@pytest.fixture
def fmnist_like(tmp_path):
    """A tiny uint8 npz (for checks that need image data but not real pixels)."""
    rng = np.random.default_rng(0)
    p = tmp_path / "tiny.npz"
    np.savez(p, x_train=rng.integers(0, 256, (8, 6, 6), dtype=np.uint8), y_train=np.arange(8) % 2,
             x_test=rng.integers(0, 256, (4, 6, 6), dtype=np.uint8), y_test=np.arange(4) % 2)
    return f"npz:{p}"


def make_features_npz(path, n_train=600, n_test=200, d=12, classes=3, seed=0) -> dict:
    """Gaussian blobs: class c's features are centred on c * 2 in the first three dims (learnable),
    float64 with one constant feature; returns the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = rng.integers(0, classes, n)
        x = rng.normal(0, 1, (n, d)) * np.linspace(0.5, 50, d) + 100.0
        x[:, :3] += (y * 2.0)[:, None] * 3
        x[:, -1] = 7.0
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    np.savez(path, **arrays, class_names=np.array(["u", "v", "w"][:classes]))
    return arrays


def test_float_npz_loads_as_features(tmp_path):
    arrays = make_features_npz(tmp_path / "tab.npz")
    d = load_dataset(f"npz:{tmp_path / 'tab.npz'}", "train")
    assert d.kind == "features" and d.image_shape == (12,) and d.images.dtype == np.float32
    np.testing.assert_array_equal(d.images, arrays["x_train"].astype(np.float32))
    assert d.class_names == ["u", "v", "w"] and d.sizes.tolist()[:2] == [[12], [12]]
    ident = d.identity()
    assert ident["kind"] == "features" and ident["image_shape"] == [12] and "image_size" not in ident
    mean, std = d.channel_stats()  # per feature, on the float32 values as stored
    x = arrays["x_train"].astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std[:-1], x.std(0)[:-1], rtol=1e-9)
    assert std[-1] == 1.0  # a constant feature normalizes to 0, not NaN
    assert d.subset(10).kind == "features" and len(d.subset(10)) == 10
    assert load_dataset(f"npz:{tmp_path / 'tab.npz'}", "test").image_shape == (12,)


def test_a_photo_truncated_after_its_header_is_named(tmp_path):
    make_photo_folder(tmp_path / "p", modes=("RGB",))
    victim = sorted((tmp_path / "p" / "train" / "b").iterdir())[1]
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) // 2])  # the header still reads; the pixels do not
    with pytest.raises(KDPipeError, match=rf"cannot decode {victim}"):
        load_dataset(f"imagefolder:{tmp_path / 'p'}", "train", image_size=16)


def _truncated_jpeg(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path, "JPEG")
    path.write_bytes(path.read_bytes()[:-20])  # the end of its scan is missing


@pytest.mark.parametrize("make, says", [
    (lambda p: p.write_bytes(b""), "cannot identify image file"),  # a failed download
    (lambda p: p.write_text("<html>404 Not Found</html>"), "cannot identify image file"),  # an error page
    (_truncated_jpeg, "runcated"),
])
def test_a_file_that_does_not_decode_is_named_with_what_to_do(tmp_path, make, says):
    make_photo_folder(tmp_path / "p", modes=("RGB",))
    make(tmp_path / "p" / "train" / "b" / "bad.jpg")
    with pytest.raises(KDPipeError, match=rf"cannot decode {tmp_path / 'p' / 'train' / 'b' / 'bad.jpg'}: .*{says}.*: "
                                          r"the file is damaged, truncated or not an image; replace it or move it out"):
        load_dataset(f"imagefolder:{tmp_path / 'p'}", "train", image_size=16)


def test_a_file_of_the_other_split_that_does_not_decode_is_named_with_the_spec(tmp_path):
    """Loading the train split of a grey folder opens the test split's files too (a colour one there makes both
    splits RGB): a damaged one was refused with a line that began ": cannot decode", the spec left out."""
    make_photo_folder(tmp_path / "p", modes=("L",))
    (tmp_path / "p" / "test" / "b" / "bad.jpg").write_bytes(b"")
    spec = f"imagefolder:{tmp_path / 'p'}"
    with pytest.raises(KDPipeError, match=rf"^{re.escape(spec)}: cannot decode .*test/b/bad.jpg"):
        load_dataset(spec, "train", image_size=16)


def test_an_image_past_pillows_pixel_limit_is_refused_with_what_to_do(tmp_path, monkeypatch):
    """Past 2 x Image.MAX_IMAGE_PIXELS (179 million pixels: a gigapixel panorama, a slide scan) Pillow refuses to
    open an image; the refusal said "could be decompression bomb DOS attack" and nothing the user could do."""
    make_photo_folder(tmp_path / "p", modes=("RGB",))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # the folder's photos are 24..600 px a side
    with pytest.raises(KDPipeError, match=r"/train/a/000.jpg has more than 600 pixels, the most Pillow decodes \(its "
                                          r"guard against decompression bombs\): shrink it .* or move it out"):
        load_dataset(f"imagefolder:{tmp_path / 'p'}", "train", image_size=16)


def test_limit_samples_every_class_of_any_order_and_stage_two_takes_the_same_rows(fmnist):
    """--limit draws its samples from a fixed seed, so a folder sorted by class, or labels that cycle, keep
    every class; a manifest without limit_sampled (written before) still means the first N."""
    from kdpipe.data import limited
    order = np.argsort(fmnist.y_train, kind="stable")
    cyclic = np.concatenate([np.flatnonzero(fmnist.y_train == c)[:40] for c in range(10)]).reshape(10, 40).T.ravel()
    for rows in (order, cyclic):  # sorted by class; labels 0..9 0..9 ... (every 10th sample is one class)
        split = ImageData(fmnist.x_train[rows][:, None], fmnist.y_train[rows], FASHION_MNIST_CLASSES, "s", "train", "m")
        sub = limited(split, 50)
        assert len(sub) == 50 and set(sub.labels.tolist()) == set(range(10))
        ident = sub.identity()
        assert ident["limit"] == 50 and ident["limit_sampled"] is True
        assert limited(split, ident["limit"], ident["limit_sampled"]).fingerprint == sub.fingerprint
        first = limited(split, 50, False)
        assert (first.labels == split.labels[:50]).all() and "limit_sampled" not in first.identity()
        assert first.fingerprint != sub.fingerprint


def test_a_limited_dump_of_a_class_sorted_folder_trains_and_verifies(cifar_folder, tmp_path):
    """The cifar10-resnet pipeline's quick check on an ImageFolder copy: --limit keeps every class, and
    train-student and verify-cache reload the same spread-out samples from the manifest."""
    from click.testing import CliRunner

    from kdpipe.cli import main
    run = lambda *a: CliRunner().invoke(main, [str(x) for x in a])  # noqa: E731
    data = ["--data", f"imagefolder:{cifar_folder}", "--limit", 30]
    r = run("train-teacher", *data, "--arch", "cnn_tiny", "--epochs", 1, "--device", "cpu", "--out", tmp_path / "t.pt")
    assert r.exit_code == 0, r.output
    r = run("dump-logits", "--teacher", tmp_path / "t.pt", *data, "--views", 1, "--device", "cpu", "--force",
            "--out", tmp_path / "c")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())["dataset"]
    assert m["limit"] == 30 and m["limit_sampled"] is True
    r = run("train-student", "--cache", tmp_path / "c", "--student", "cnn_tiny", "--epochs", 1, "--device", "cpu",
            "--out", tmp_path / "r")
    assert r.exit_code == 0, r.output
    r = run("verify-cache", tmp_path / "c", "--teacher", tmp_path / "t.pt", "--device", "cpu")
    assert r.exit_code == 0, r.output
