"""Dataset sources: every source gives uint8 images (N, C, H, W), int64 labels and class names.

Specs (the ``--data`` option):

- ``fashion-mnist`` (default): IDX files (gz or not) in ``--data-root``, else in the Debian
  package ``dataset-fashion-mnist``'s folder /usr/share/datasets/fashion-mnist.
- ``mnist``: IDX files (gz or not) in ``--data-root``, or torchvision's ``MNIST/raw`` folder under it.
- ``cifar10`` / ``cifar100``: torchvision's extracted python folders (``cifar-10-batches-py``,
  ``cifar-100-python``) in ``--data-root`` (or ``--data-root`` is that folder).
- ``imagefolder:PATH``: PATH/train and PATH/test (or PATH/val), one folder per class, JPEG or PNG.
  Images of one size are decoded once into a ``.npy`` beside a small index, which later runs
  memory-map.
- ``npz:PATH``: arrays x_train, y_train, x_test, y_test (optional class_names).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdpipe import KDPipeError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass
class ImageData:
    """One split of a dataset, in memory (or memory-mapped)."""

    images: np.ndarray  # (N, C, H, W) uint8
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    spec: str
    split: str
    source: str  # where the files came from, for messages and the manifest
    _fingerprint: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise KDPipeError(f"{self.spec}: images must be uint8 (N, C, H, W), got "
                              f"{self.images.dtype} {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise KDPipeError(f"{self.spec} {self.split}: {len(self.images)} images but "
                              f"{self.labels.shape[0]} labels")
        if len(self.images) == 0:
            raise KDPipeError(f"{self.spec} {self.split}: the split holds no images")
        n = self.num_classes
        if self.labels.min() < 0 or self.labels.max() >= n:
            raise KDPipeError(f"{self.spec} {self.split}: labels must lie in [0, {n - 1}] "
                              f"({n} classes), found {int(self.labels.min())}..{int(self.labels.max())}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])

    @property
    def fingerprint(self) -> str:
        """sha256 over shape, pixels and labels: a different copy or subset is a different dataset."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps([list(self.images.shape), self.num_classes]).encode())
            step = 4096
            for i in range(0, len(self.images), step):
                h.update(np.ascontiguousarray(self.images[i:i + step]).tobytes())
            h.update(self.labels.astype("<i8").tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def identity(self) -> dict:
        return {"spec": self.spec, "split": self.split, "num_samples": len(self),
                "image_shape": list(self.image_shape), "num_classes": self.num_classes,
                "class_names": list(self.class_names), "fingerprint": self.fingerprint}

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the pixels in [0, 1] (from at most 10,000 images)."""
        sub = self.images[: min(len(self), 10000)].astype(np.float64) / 255.0
        return sub.mean(axis=(0, 2, 3)).tolist(), sub.std(axis=(0, 2, 3)).tolist()

    def subset(self, n: int) -> "ImageData":
        """The first n samples (a different dataset, with its own fingerprint)."""
        return ImageData(self.images[:n], self.labels[:n], self.class_names, self.spec,
                         self.split, self.source)


def load_dataset(spec: str, split: str = "train", data_root: str | os.PathLike | None = None) -> ImageData:
    """Load one split of the dataset named by ``spec``; raise KDPipeError with what to do if it can't."""
    if split not in SPLITS:
        raise KDPipeError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    spec = spec.strip()
    kind, _, arg = spec.partition(":")
    kind = kind.lower()
    if kind == "fashion-mnist" and not arg:
        return _load_idx_dataset(spec, split, data_root, FASHION_MNIST_CLASSES,
                                 default_root=DEBIAN_FASHION_MNIST,
                                 how_to_get="install Debian's package: apt-get install dataset-fashion-mnist, "
                                            "or pass --data-root DIR holding the four IDX files")
    if kind == "mnist" and not arg:
        return _load_idx_dataset(spec, split, data_root, MNIST_CLASSES, default_root=None,
                                 how_to_get="pass --data-root DIR holding the four MNIST IDX files "
                                            "(or torchvision's MNIST folder)")
    if kind in ("cifar10", "cifar100") and not arg:
        return _load_cifar(spec, kind, split, data_root)
    if kind == "imagefolder" and arg:
        return _load_imagefolder(spec, Path(arg).expanduser(), split)
    if kind == "npz" and arg:
        return _load_npz(spec, Path(arg).expanduser(), split)
    raise KDPipeError(f"unknown dataset {spec!r}: use fashion-mnist, mnist, cifar10, cifar100, "
                      "imagefolder:PATH or npz:PATH")


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        p = folder / name
        if p.is_file():
            return p
    return None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise KDPipeError(f"cannot read {path}: {e} (the file is corrupt or truncated)") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise KDPipeError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise KDPipeError(f"{path} is truncated (header)")
    shape = struct.unpack(">" + "I" * ndim, raw[4:header])
    count = int(np.prod(shape))
    if len(raw) - header != count:
        raise KDPipeError(f"{path} is truncated or padded: header says {count} bytes of data, "
                          f"file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _load_idx_dataset(spec, split, data_root, class_names, default_root, how_to_get) -> ImageData:
    candidates = []
    if data_root is not None:
        root = Path(data_root).expanduser()
        candidates += [root, root / "raw", root / "MNIST" / "raw", root / "FashionMNIST" / "raw"]
    elif default_root is not None:
        candidates.append(Path(default_root))
    img_stem, lbl_stem = _IDX_FILES[split]
    for folder in candidates:
        img, lbl = _find_file(folder, img_stem), _find_file(folder, lbl_stem)
        if img and lbl:
            images = _read_idx(img)
            labels = _read_idx(lbl).astype(np.int64)
            if images.ndim != 3:
                raise KDPipeError(f"{img}: expected (N, H, W) images, got shape {images.shape}")
            return ImageData(images[:, None, :, :], labels, list(class_names), spec, split, str(folder))
    where = ", ".join(str(c) for c in candidates) or "(no folder)"
    raise KDPipeError(f"{spec}: no {img_stem}[.gz] and {lbl_stem}[.gz] in {where}; {how_to_get}")


# ---------------------------------------------------------------- CIFAR (torchvision's python folders)

def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise KDPipeError(f"cannot read {path}: {e} (the file is corrupt or truncated)") from None


def _load_cifar(spec, kind, split, data_root) -> ImageData:
    folder_name = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    if data_root is None:
        raise KDPipeError(f"{spec}: pass --data-root DIR holding torchvision's extracted {folder_name} folder")
    root = Path(data_root).expanduser()
    folder = root if root.name == folder_name else root / folder_name
    if not folder.is_dir():
        raise KDPipeError(f"{spec}: no folder {folder}; extract torchvision's {folder_name} there")
    if kind == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta, names_key, label_key = "batches.meta", "label_names", "labels"
    else:
        files = ["train"] if split == "train" else ["test"]
        meta, names_key, label_key = "meta", "fine_label_names", "fine_labels"
    xs, ys = [], []
    for name in files:
        if not (folder / name).is_file():
            raise KDPipeError(f"{spec}: {folder / name} is missing")
        d = _unpickle(folder / name)
        if "data" not in d or label_key not in d:
            raise KDPipeError(f"{folder / name} does not hold 'data' and {label_key!r}")
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    class_names = list(_unpickle(folder / meta)[names_key]) if (folder / meta).is_file() else \
        [str(i) for i in range(10 if kind == "cifar10" else 100)]
    return ImageData(np.concatenate(xs), np.concatenate(ys), class_names, spec, split, str(folder))


# ---------------------------------------------------------------- npz

def _load_npz(spec, path: Path, split) -> ImageData:
    if not path.is_file():
        raise KDPipeError(f"{spec}: no such file {path}")
    try:
        z = np.load(path, allow_pickle=False)
        keys = set(z.files)
    except Exception as e:  # numpy raises several types for a corrupt archive
        raise KDPipeError(f"cannot read {path} as .npz: {e}") from None
    xk, yk = f"x_{split}", f"y_{split}"
    if xk not in keys or yk not in keys:
        raise KDPipeError(f"{path} must hold arrays x_train, y_train, x_test, y_test; "
                          f"it holds {', '.join(sorted(keys)) or 'nothing'}")
    try:
        x, y = z[xk], z[yk]
    except Exception as e:
        raise KDPipeError(f"cannot read {xk}/{yk} from {path}: {e}") from None
    if x.dtype != np.uint8:
        raise KDPipeError(f"{path}: {xk} must be uint8 pixels, got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    elif x.ndim != 4:
        raise KDPipeError(f"{path}: {xk} must be (N, H, W), (N, H, W, C) or (N, C, H, W), got {x.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise KDPipeError(f"{path}: {yk} must be a 1-D integer array, got {y.dtype} {y.shape}")
    if "class_names" in keys:
        class_names = [str(c) for c in z["class_names"]]
    else:
        ytr = z["y_train"] if "y_train" in keys else y
        n = int(max(ytr.max(initial=0), y.max(initial=0))) + 1
        class_names = [str(i) for i in range(n)]
    if y.size and (y.min() < 0 or y.max() >= len(class_names)):
        raise KDPipeError(f"{path}: {yk} holds labels outside [0, {len(class_names) - 1}]")
    return ImageData(np.ascontiguousarray(x), y.astype(np.int64), class_names, spec, split, str(path))


# ---------------------------------------------------------------- ImageFolder

def _decoded_cache_dir() -> Path:
    from kdpipe.util import env  # KDPIPE_* variables are parsed in one place
    return env("KDPIPE_DATA_CACHE")


def _load_imagefolder(spec, root: Path, split) -> ImageData:
    if not root.is_dir():
        raise KDPipeError(f"{spec}: no such folder {root}")
    names = ["train"] if split == "train" else ["test", "val"]
    folder = next((root / n for n in names if (root / n).is_dir()), None)
    if folder is None:
        raise KDPipeError(f"{spec}: {root} has no {' or '.join(names)} folder")
    # Class names come from the train folder so that both splits number classes alike.
    class_root = root / "train" if (root / "train").is_dir() else folder
    classes = sorted(d.name for d in class_root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise KDPipeError(f"{spec}: {class_root} has no class folders")
    files, labels = [], []
    for ci, c in enumerate(classes):
        cdir = folder / c
        found = sorted(p for p in cdir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if cdir.is_dir() else []
        if not found and split == "train":
            raise KDPipeError(f"{spec}: class folder {cdir} holds no .jpg/.jpeg/.png images")
        files += found
        labels += [ci] * len(found)
    if not files:
        raise KDPipeError(f"{spec}: {folder} holds no images")
    extra = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in classes)
    if extra:
        raise KDPipeError(f"{spec}: {folder} has class folders not in {class_root}: {', '.join(extra[:5])}")

    # The decoded copy is keyed by the file list with sizes and mtimes, so a changed file re-decodes.
    h = hashlib.sha256(str(folder.resolve()).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    key = h.hexdigest()[:24]
    cache_dir = _decoded_cache_dir()
    npy, meta = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    y = np.asarray(labels, dtype=np.int64)
    if npy.is_file() and meta.is_file():
        images = np.load(npy, mmap_mode="r")
        return ImageData(images, y, classes, spec, split, str(folder),
                         _fingerprint=json.loads(meta.read_text()).get("fingerprint"))
    images = _decode_all(spec, files)
    data = ImageData(images, y, classes, spec, split, str(folder))
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = npy.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, images)
        os.replace(tmp, npy)
        meta.write_text(json.dumps({"folder": str(folder), "fingerprint": data.fingerprint,
                                    "num_images": len(files)}))
    except OSError:
        pass  # no writable cache folder: decode again next time
    return data


def _decode_all(spec, files: list[Path]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    from kdpipe.util import Progress

    first = None
    out = None
    prog = Progress(f"decoding {spec}", len(files), "images")
    for i, p in enumerate(files):
        if i % 1000 == 999:
            prog.update(1000)
        try:
            with Image.open(p) as im:
                im.load()
                mode = "L" if im.mode in ("L", "1", "I;16", "I") else "RGB"
                arr = np.asarray(im.convert(mode))
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            raise KDPipeError(f"{spec}: cannot decode {p}: {e}") from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if first is None:
            first = arr.shape
            out = np.empty((len(files), arr.shape[2], arr.shape[0], arr.shape[1]), dtype=np.uint8)
        elif arr.shape != first:
            raise KDPipeError(f"{spec}: images must all have one size; {p} is {arr.shape[1]}x{arr.shape[0]}"
                              f"x{arr.shape[2]}, {files[0]} is {first[1]}x{first[0]}x{first[2]} "
                              "(resize them first)")
        out[i] = arr.transpose(2, 0, 1)
    if len(files) % 1000:
        prog.update(len(files) % 1000)
    return out
