"""The image store: one split's samples, their labels, class names and each sample's size.

Kinds (classes registered in KINDS): ``dense`` uint8 images (N, C, H, W) of one size; ``photos``,
images of any size decoded once to S x S (``--image-size S``) into a memory-mapped copy; ``features``,
float32 vectors (N, D) for tabular data.

Specs (the ``--data`` option):

- ``fashion-mnist`` (default): IDX files (gz or not) in ``--data-root``, else in the Debian
  package ``dataset-fashion-mnist``'s folder /usr/share/datasets/fashion-mnist.
- ``mnist``: IDX files (gz or not) in ``--data-root``, or torchvision's ``MNIST/raw`` folder under it.
- ``cifar10`` / ``cifar100``: torchvision's extracted python folders (``cifar-10-batches-py``,
  ``cifar-100-python``) in ``--data-root`` (or ``--data-root`` is that folder).
- ``imagefolder:PATH``: PATH/train and PATH/test (or PATH/val), one folder per class, JPEG or PNG;
  PATH/val is the validation split where PATH/test exists too.
  Decoded once into a memory-mapped ``.npy`` under KDPIPE_DATA_CACHE, which later runs map again.
  Images of one size are stored as they are (dense); images of varying size need ``--image-size S``
  (photos). A folder mixing grey and colour images is stored in RGB.
- ``npz:PATH``: arrays x_train, y_train, x_test, y_test (optional class_names, and x_val, y_val: the
  validation split); uint8 x arrays are images, float x arrays (N, D) are features. Images (N, C, H, W) or
  (N, H, W, C) are told apart by their shape, or by an optional array layout ("NCHW" or "NHWC").
- ``files:PATH``: PATH/training (or train) and PATH/evaluation (or test; else validation or val), flat
  folders of images named ``<label>_<n>.jpg`` (Food-11's layout); decoded like imagefolder. With an
  evaluation (or test) folder, PATH/validation (or val) is the validation split.
- ``csv:FILE``: one row per sample with columns label and split, and either path (images, relative to
  the file's folder; decoded like imagefolder) or numeric feature columns (features). See _load_csv.

The validation split (split "val", for picking the best epoch: train-student --val-split) is a
source's own held-out data besides its test split; only sources with ``val=True`` have one, and a
source whose only held-out data is its test split refuses it rather than select on the test set.

Labels that are whole numbers are the class indices; the train split must hold every class 0..N-1
(check_labels), and the test split no other class nor another sample shape (check_splits).
A source's data may move: moved_spec points a cache's spec at the new place (--data-root).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import gzip
import hashlib
import inspect
import json
import operator
import os
import pickle
import re
import struct
import sys
import unicodedata
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple

import numpy as np

from kdpipe import KDPipeError
from kdpipe.cache.writer import fsync_path

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]
SPLITS = ("train", "test", "val")  # val: a source's own validation split (Source.val)
# The image files a folder source reads (torchvision's ImageFolder's list, plus .gif, first frame): any
# other file in a class or split folder is skipped, and the skip is said (_skipped_note).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
STATS_SAMPLES = 10_000  # rows channel_stats() reads, evenly spaced over the split
# Identity keys that name the data's parts without changing what it holds (a CSV's feature column names): recorded
# in manifests and checkpoints, for the export card, but left out of what makes two dumps or two teachers the same,
# so that data named otherwise, or a cache or teacher made before they were recorded, is still the same.
RECORD_ONLY = ("columns",)
# How photos are brought to S x S (recorded in the identity, part of the decoded copy's key): Pillow's
# BICUBIC resize of the shorter side to S, which filters over the whole footprint when it reduces (an
# antialiased resize, the same pixels as torchvision's Resize(S, BICUBIC) on a PIL image), output size and crop
# offsets rounded as torchvision does, then the centre crop.
RESIZE = "pil-bicubic-shorter-side+center-crop/1"
# --resize squash: the whole photo resized to S x S by the same BICUBIC (aspect ratio not kept, nothing cropped), as a
# teacher trained with torchvision's Resize((S, S), BICUBIC) saw its photos (ResizeMode: other shorter sides and
# filters, e.g. squash:bilinear, torchvision's default). An identity without "resize" is crop.
SQUASH = "pil-bicubic-squash/1"
RESIZE_MODES = ("crop", "squash")  # --resize MODE[:R][:FILTER]; resize_method(MODE): the method the identity records
# The filters a resize may name (PIL's, antialiased as PIL always is): bicubic is kdpipe's default; bilinear is
# torchvision's Resize default, so crop:256:bilinear with --image-size 224 stores exactly the pixels of
# torchvision's ImageNet evaluation transform, Resize(256) then CenterCrop(224), and squash:bilinear those of
# Resize((S, S)).
RESIZE_FILTERS = ("bicubic", "bilinear")
RESIZE_USAGE = ("crop, squash, crop:R (the shorter side resized to R >= S, then the centre S x S), and either with "
                ":bilinear (torchvision's default filter; bicubic otherwise), e.g. crop:256:bilinear")


@dataclass(frozen=True)
class ResizeMode:
    """A --resize mode, parsed: how ("crop" or "squash"), the shorter side before the centre crop (crop only;
    None: S itself) and the filter."""

    how: str
    shorter: int | None = None
    filter: str = "bicubic"

    @classmethod
    def parse(cls, text) -> ResizeMode:
        """'crop', 'squash', 'crop:256', 'crop:256:bilinear', 'squash:bilinear' (None: crop); any other is refused."""
        if text is None:
            return cls("crop")
        parts = [p.strip().lower() for p in str(text).split(":")]
        how, shorter, filt = parts[0], None, None
        for p in parts[1:]:
            if p in RESIZE_FILTERS and filt is None:
                filt = p
            elif p.isdecimal() and how == "crop" and shorter is None and int(p) >= 1:  # isdigit: "²", which int refuses
                shorter = int(p)
            else:
                how = ""  # refused below
        if how not in RESIZE_MODES:
            raise KDPipeError(f"--resize must be one of {RESIZE_USAGE}; got {text!r}")
        return cls(how, shorter, filt or "bicubic")

    def at(self, image_size: int) -> ResizeMode:
        """This mode for photos stored at S x S: crop:S is crop; a shorter side below S is refused."""
        if self.shorter is None:
            return self
        if self.shorter < image_size:
            raise KDPipeError(f"--resize {self}: the shorter side {self.shorter} is below --image-size {image_size}, "
                              f"so no {image_size} x {image_size} centre can be cropped: give R >= {image_size}")
        return ResizeMode(self.how, None if self.shorter == image_size else self.shorter, self.filter)

    def __str__(self) -> str:
        return ":".join([self.how] + ([str(self.shorter)] if self.shorter else [])
                        + ([self.filter] if self.filter != "bicubic" else []))

    def method(self) -> str:
        """What the dataset's identity records (crop and squash as before these options: RESIZE, SQUASH)."""
        if self.shorter is None and self.filter == "bicubic":
            return RESIZE if self.how == "crop" else SQUASH
        if self.how == "squash":
            return f"pil-{self.filter}-squash/1"
        return f"pil-{self.filter}-shorter-side{f'-{self.shorter}' if self.shorter else ''}+center-crop/1"

    @classmethod
    def from_method(cls, method: str) -> ResizeMode | None:
        if method in (RESIZE, SQUASH):
            return cls("crop" if method == RESIZE else "squash")
        m = re.fullmatch(r"pil-(\w+)-(?:squash|shorter-side(?:-(\d+))?\+center-crop)/1", method)
        if not m or m.group(1) not in RESIZE_FILTERS:
            return None
        return cls("squash" if "squash" in method else "crop", int(m.group(2)) if m.group(2) else None, m.group(1))


def resize_method(mode) -> str:
    return ResizeMode.parse(mode).method()


class ImageData:
    """One split of a dataset: the store that holds its samples (in memory or memory-mapped) and
    knows each one's size. This base class is the dense kind: uint8 images (N, C, H, W) of one size.

    A kind is one subclass registered in KINDS (``@register_kind``): what its samples look like
    (dtype, per-sample rank), how statistics are taken over them, and what besides the samples
    makes a copy what it is (``storage_identity``: e.g. the resize that decoded photos).
    """

    kind: ClassVar[str] = "dense"
    dtype: ClassVar[type] = np.uint8
    sample_ndim: ClassVar[int] = 3  # (C, H, W)
    scale: ClassVar[float] = 255.0  # stored value / scale = the value models see before normalizing
    describe: ClassVar[str] = "uint8 (N, C, H, W) images"

    def __init__(self, images, labels, class_names, spec, split, source, _fingerprint=None, sizes=None):
        self.images, self.labels, self.class_names = images, labels, list(class_names)
        self.spec, self.split, self.source = spec, split, source
        self._fingerprint, self._sizes = _fingerprint, sizes
        self._check()

    def _check(self) -> None:
        if self.images.ndim != 1 + self.sample_ndim or self.images.dtype != self.dtype:
            raise KDPipeError(f"{self.spec}: samples must be {self.describe}, got "
                              f"{self.images.dtype} {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise KDPipeError(f"{self.spec} {self.split}: {len(self.images)} images but "
                              f"{self.labels.shape[0]} labels")
        if len(self.images) == 0:
            raise KDPipeError(f"{self.spec} {self.split}: the split holds no images")
        if self._sizes is not None and self._sizes.shape != (len(self.images), 2):
            raise KDPipeError(f"{self.spec} {self.split}: sizes must be ({len(self.images)}, 2), "
                              f"got {self._sizes.shape}")
        n = self.num_classes
        if self.labels.min() < 0 or self.labels.max() >= n:
            raise KDPipeError(f"{self.spec} {self.split}: labels must lie in [0, {n - 1}] "
                              f"({n} classes), found {int(self.labels.min())}..{int(self.labels.max())}")

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, {self.split!r}, {len(self)} x {self.image_shape})"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The per-sample shape: (C, H, W) for images, (D,) for feature vectors."""
        return tuple(int(s) for s in self.images.shape[1:])

    @property
    def sizes(self) -> np.ndarray:
        """(N, 2) int64 (height, width) of each sample as it was before storage (all alike when dense)."""
        if self._sizes is not None:
            return self._sizes
        return np.broadcast_to(np.asarray(self.image_shape[-2:], dtype=np.int64), (len(self), 2))

    def storage_identity(self) -> dict:
        """What besides the stored samples makes this copy (empty for dense data)."""
        return {}

    @classmethod
    def storage_step(cls, identity: dict, colour: str) -> str | None:
        """How a user's input becomes a stored sample of this kind, in words, for the card `kdpipe export` writes
        (``identity``: the dataset's, as the checkpoint records it; ``colour``: its channels in words). None: the
        samples are stored as they are, and the card names their size. Image files stored at their own size
        (no --image-size) say how they were decoded (EXIF orientation, colour, 16 bits)."""
        src = SOURCES.get(str(identity.get("spec", "")).partition(":")[0].strip().lower())
        if cls.kind != "dense" or src is None or not src.image_files:
            return None
        _, h, w = identity.get("image_shape") or (0, "?", "?")
        return (f"decode the image file, turn it upright by its EXIF orientation and convert it to {colour}: "
                f"{h} x {w}, as in {identity.get('spec')} (stored at their own size, not resized). "
                f"{SIXTEEN_BIT_STEP}")

    @property
    def fingerprint(self) -> str:
        """sha256 over shape, samples, labels and the storage identity: a different copy, subset or
        resize is a different dataset. Read in chunks, so a memory-mapped store is never loaded whole."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            head = [list(self.images.shape), self.num_classes]
            extra = self.storage_identity()
            h.update(json.dumps(head + [extra] if extra else head, sort_keys=True).encode())
            step = 4096
            for i in range(0, len(self.images), step):
                h.update(np.ascontiguousarray(self.images[i:i + step]).tobytes())
            h.update(self.labels.astype("<i8").tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def identity(self) -> dict:
        """What the manifest and checkpoints record; stage two reloads the data from it (kind, resize)."""
        return {"spec": self.spec, "split": self.split, "kind": self.kind, "num_samples": len(self),
                "image_shape": list(self.image_shape), "num_classes": self.num_classes,
                "class_names": list(self.class_names), "fingerprint": self.fingerprint,
                **({"limit": self.limit} if getattr(self, "limit", None) else {}),
                **({"limit_sampled": True} if getattr(self, "limit_sampled", False) else {}),
                **self.storage_identity()}

    def stats_rows(self) -> np.ndarray:
        """Sorted indices of a uniform sample of the split (every row when it holds at most
        STATS_SAMPLES): evenly spaced, so a class-sorted folder contributes every class, and sorted,
        so a memory map is read in file order."""
        n = len(self)
        m = min(n, STATS_SAMPLES)
        return (np.arange(m, dtype=np.int64) * n) // m

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Mean and std per channel (per feature for (N, D) data) of the values models see (pixels in
        [0, 1]), over stats_rows(); two passes in float64 over chunks, so large photos never make one
        big float copy."""
        rows = self.stats_rows()
        chunks = [rows[i:i + 512] for i in range(0, len(rows), 512)]
        c = self.image_shape[0]

        def values(idx):  # (B, C, rest) float64
            return np.asarray(self.images[idx], dtype=np.float64).reshape(len(idx), c, -1) / self.scale

        count = len(rows) * int(np.prod(self.image_shape[1:], dtype=np.int64))
        mean = sum(values(idx).sum(axis=(0, 2)) for idx in chunks) / count
        var = sum(((values(idx) - mean[None, :, None]) ** 2).sum(axis=(0, 2)) for idx in chunks) / count
        return mean.tolist(), self._std(np.sqrt(var)).tolist()

    def _std(self, std: np.ndarray) -> np.ndarray:
        # A constant channel or feature (std 0: an RGBA array's opaque alpha) would normalize to NaN, and training
        # then "diverged" at any --lr; with std 1 it normalizes to a constant.
        return np.where(std > 0, std, 1.0)

    def subset(self, n: int, sampled: bool = False) -> "ImageData":
        """n samples (a different dataset, with its own fingerprint), of the same kind: the first n (a view, so
        a memory-mapped store stays mapped), or with `sampled` limit_rows' n, in the split's order. Its identity
        records `limit` = n (and `limit_sampled`), so stage two takes the same subset of the split (--limit)."""
        out = copy.copy(self)
        rows = limit_rows(len(self), n) if sampled else slice(0, n)
        out.images, out.labels, out._fingerprint = self.images[rows], self.labels[rows], None
        out.limit, out.limit_sampled = int(n), bool(sampled)
        out._sizes = None if self._sizes is None else self._sizes[rows]
        out._check()
        return out


LIMIT_SEED = 0


def limit_rows(total: int, n: int) -> np.ndarray:
    """The rows --limit n keeps of a split of `total`: n drawn without replacement from a fixed seed, sorted.
    Any order of the split gives a fair share of every class (the first n of a folder sorted by class hold one
    class; every k-th of labels that repeat with a period sharing a factor with k, too)."""
    return np.sort(np.random.default_rng(LIMIT_SEED).choice(total, size=n, replace=False))


def limited(data: ImageData, limit: int | None, sampled: bool = True) -> ImageData:
    """`limit` samples of a split (--limit, or a manifest's dataset "limit"), or all of it: limit_rows' sample.
    A manifest records "limit_sampled"; one written before kdpipe sampled them has none, and stage two passes
    sampled=False for it (its first `limit` samples)."""
    if not limit or limit >= len(data):
        return data
    return data.subset(limit, sampled)


KINDS: dict[str, type[ImageData]] = {}


def register_kind(cls: type[ImageData]) -> type[ImageData]:
    """Make a store kind known by its name (manifests record it; stage two checks it)."""
    if cls.kind in KINDS:
        raise ValueError(f"image-store kind {cls.kind!r} is registered twice")
    KINDS[cls.kind] = cls
    return cls


register_kind(ImageData)


@register_kind
class Photos(ImageData):
    """Photos of varying size, decoded once to image_size x image_size (shorter side resized with
    RESIZE, then centre-cropped) into a memory-mapped copy; ``sizes`` holds each original (H, W)."""

    kind = "photos"
    describe = "uint8 (N, C, S, S) decoded photos"

    def __init__(self, *args, image_size: int, resize: str = "crop", **kwargs):
        self.image_size = int(image_size)
        self.resize = str(ResizeMode.parse(resize).at(self.image_size))  # canonical, whoever built it
        super().__init__(*args, **kwargs)

    def storage_identity(self) -> dict:
        return {"image_size": self.image_size, "resize": resize_method(self.resize)}

    @classmethod
    def storage_step(cls, identity, colour):
        s = identity.get("image_size")
        mode = ResizeMode.parse(resize_mode(identity))
        pil, tv = f"Image.{mode.filter.upper()}", mode.filter.upper()
        if mode.how == "squash":
            return (f"decode the photo, turn it upright by its EXIF orientation and convert it to {colour}; resize the "
                    f"whole photo to {s} x {s} (PIL {mode.filter}, antialiased; the aspect ratio is not kept, nothing "
                    f"is cropped): img.resize(({s}, {s}), {pil}) on the PIL image, as torchvision's "
                    f"Resize(({s}, {s}), {tv}) does. {SIXTEEN_BIT_STEP}")
        # to_storage's rounding, said exactly: rounding the longer side or the offset otherwise (round for int,
        # floor for round) moved the crop by a pixel in most non-square photos
        r = mode.shorter or s
        return (f"decode the photo, turn it upright by its EXIF orientation and convert it to {colour}; resize its "
                f"shorter side to {r} and its longer side to int({r} * longer / shorter), rounded down (PIL "
                f"{mode.filter}, antialiased; no resize where the photo has that size already), and take the centre "
                f"{s} x {s} from round((side - {s}) / 2) on each axis (torchvision's Resize({r}, {tv}) then "
                f"CenterCrop({s}) on the PIL image do exactly this). {SIXTEEN_BIT_STEP}")


@register_kind
class Features(ImageData):
    """Float feature vectors (N, D) for tabular data; statistics per feature, no pixel scale."""

    kind = "features"
    dtype = np.float32
    sample_ndim = 1
    scale = 1.0
    describe = "float32 (N, D) feature vectors"

    def __init__(self, *args, columns=None, **kwargs):
        self.columns = [str(c) for c in columns] if columns is not None else None
        super().__init__(*args, **kwargs)
        if self.columns is not None and len(self.columns) != self.image_shape[0]:
            raise KDPipeError(f"{self.spec}: {len(self.columns)} column names for {self.image_shape[0]} features")

    def storage_identity(self) -> dict:
        return {}

    def identity(self) -> dict:
        """With the feature columns' names where the file names them (a CSV's header): the card a deployed model
        gets lists them in order. They are RECORD_ONLY: not what makes two dumps or two teachers the same."""
        ident = super().identity()
        return {**ident, "columns": list(self.columns)} if self.columns else ident

    @property
    def sizes(self) -> np.ndarray:
        """(N, 1): D for every row."""
        return np.full((len(self), 1), self.image_shape[0], dtype=np.int64)


def load_dataset(spec: str, split: str = "train", data_root: str | os.PathLike | None = None,
                 image_size: int | None = None, resize: str | None = None) -> ImageData:
    """Load one split of the dataset named by ``spec``; raise KDPipeError with what to do if it can't.

    The spec names a registered Source (SOURCES). ``image_size`` S (``--image-size``): decode image
    files (imagefolder:, files:, csv: image lists) to S x S (shorter side resized to S with
    antialiasing, then centre-cropped; ``resize`` "squash": the whole image resized to S x S, see
    RESIZE_MODES; None is crop); the resize is part of the dataset's identity. A train split
    whose labels do not cover 0..N-1 is refused (check_labels).
    """
    if split not in SPLITS:
        raise KDPipeError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    spec = spec.strip()
    kind, _, arg = spec.partition(":")
    kind = kind.lower()
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
            raise KDPipeError(f"--image-size must be a whole number of pixels >= 1, got {image_size!r}")
        if kind not in SOURCES or not SOURCES[kind].image_files:
            files = ", ".join(f"{n}:" for n, src in SOURCES.items() if src.image_files)
            raise KDPipeError(f"--image-size applies to image files ({files}) only; {spec} "
                              "stores images of one size already: leave it out")
    resize = _check_resize(spec, kind, image_size, resize)
    src = SOURCES.get(kind)
    if src is None or bool(arg) != src.path:
        raise KDPipeError(f"unknown dataset {spec!r}: use {sources_usage()}")
    if split == "val" and not src.val:
        having = ", ".join(s.usage for s in SOURCES.values() if s.val)
        raise KDPipeError(f"{spec} has no validation split of its own (sources that can have one: {having}): "
                          "hold out part of the train split with --val-fraction F instead")
    # a source is given the resize only where it is not crop (one registered with load(..., image_size) still works)
    more = (resize,) if resize not in (None, "crop") else ()
    if more and not _takes_args(src.load, 6):
        raise KDPipeError(f"--resize {resize}: the data source {kind!r} does not take a resize mode (its load has no "
                          "sixth argument, docs/extending.md): leave --resize out, or add it to the source")
    data = src.load(spec, Path(arg).expanduser() if src.path else None, split, data_root, image_size, *more)
    if split == "train":
        check_labels(data)
    return data


def _takes_args(fn, n: int) -> bool:
    """Whether fn can be called with n positional arguments (True where its signature cannot be read)."""
    try:
        inspect.signature(fn).bind(*range(n))
    except TypeError:
        return False
    except ValueError:
        return True
    return True


def _check_resize(spec, kind, image_size, resize) -> str | None:
    """The --resize mode in its canonical form (ResizeMode; crop:S is crop); refused where it is not a mode, or
    given without --image-size or for data not decoded from image files (as --image-size is refused there)."""
    if resize is None:
        return None
    mode = ResizeMode.parse(resize)
    resize = str(mode)
    if kind not in SOURCES or not SOURCES[kind].image_files:
        files = ", ".join(f"{n}:" for n, src in SOURCES.items() if src.image_files)
        raise KDPipeError(f"--resize applies to image files ({files}) decoded with --image-size S only; {spec} "
                          "stores images of one size already: leave it out")
    if image_size is None:
        raise KDPipeError(f"--resize {resize} says how photos are brought to --image-size S: give --image-size S "
                          "too, or leave --resize out")
    return str(mode.at(image_size))


def resize_mode(identity: dict) -> str | None:
    """The --resize a dataset identity (a manifest's or checkpoint's) records: None where it has no image_size,
    crop where it names no resize (written before --resize existed)."""
    if not identity.get("image_size"):
        return None
    method = identity.get("resize") or RESIZE
    mode = ResizeMode.from_method(method)
    if mode is not None:
        return str(mode)
    raise KDPipeError(f"the data was decoded with the resize {method!r}, which this version of kdpipe does not "
                      "know: upgrade kdpipe")


# ---------------------------------------------------------------- the registry of sources

@dataclass(frozen=True)
class Source:
    """A kind of --data spec. ``load(spec, path, split, data_root, image_size)`` returns one split as an
    ImageData of some kind (KINDS). ``path``: the spec is ``name:PATH`` (and --data-root moves PATH when the
    data moves); otherwise it is the bare name and finds its files in --data-root. ``image_files``: it
    decodes image files (through _decode_files) and takes --image-size. ``val``: it may have a validation
    split of its own (``load(..., "val", ...)``; the loader refuses, in one line, data that lacks one)."""

    name: str
    usage: str
    load: Callable
    path: bool = False
    image_files: bool = False
    val: bool = False
    file: bool = False  # PATH is one file, not a folder


SOURCES: dict[str, Source] = {}


def register_source(src: Source) -> Source:
    if src.name in SOURCES:
        raise ValueError(f"data source {src.name!r} is registered twice")
    SOURCES[src.name] = src
    return src


def sources_usage() -> str:
    """The specs --data takes, for help and errors."""
    return ", ".join(src.usage for src in SOURCES.values())


def check_labels(train: ImageData) -> None:
    """Refuse a train split whose labels do not run 0..N-1 with every class present: labels 1..10 would
    otherwise train an 11-class model whose class 0 never occurs."""
    limit = getattr(train, "limit", None)
    if limit:  # a --limit subset of a split whose labels load_dataset checked whole: too few samples, not bad labels
        absent = np.flatnonzero(np.bincount(train.labels, minlength=train.num_classes) == 0)
        if len(absent):
            raise KDPipeError(f"{train.spec} {train.split}: --limit {limit} keeps no sample of class(es) "
                              f"{', '.join(map(str, absent[:5].tolist()))} of the {train.num_classes}: give a "
                              "larger --limit")
    check_label_coverage(train.labels, train.num_classes, f"{train.spec} {train.split}")


def check_label_coverage(labels: np.ndarray, num_classes: int, where: str) -> None:
    counts = np.bincount(labels, minlength=num_classes)
    if len(counts) < 2:  # every label 0: a model that always answers 0 is "100%" and learns nothing
        raise KDPipeError(f"{where}: every sample has label 0, so there is one class: a classifier needs "
                          "two or more (check the label column or array)")
    if counts[0] == 0:
        first = int(np.flatnonzero(counts)[0])
        raise KDPipeError(f"{where}: the labels start at {first}, not 0: number the classes from 0 "
                          f"(subtract {first})")
    absent = np.flatnonzero(counts == 0)
    if len(absent):
        raise KDPipeError(f"{where}: no train sample has class(es) {', '.join(map(str, absent[:5].tolist()))} "
                          f"of 0..{num_classes - 1} (the labels skip them, or the train split has fewer "
                          "classes than the test split): number the classes 0..N-1 without gaps")


def check_splits(train: ImageData, test: ImageData | None) -> None:
    """Refuse a test (or validation) split that the train split cannot stand for: other classes, or another
    sample shape."""
    if test is None:
        return
    check_labels(train)
    name = {"val": "validation"}.get(test.split, test.split)
    extra = sorted(set(np.unique(test.labels).tolist()) - set(np.unique(train.labels).tolist()))
    if test.num_classes > train.num_classes or extra:
        n_train, n_test = len(np.unique(train.labels)), len(np.unique(test.labels))
        raise KDPipeError(f"{train.spec}: the train split has fewer classes ({n_train}) than the {name} split "
                          f"({n_test}): no train sample of class(es) {', '.join(map(str, extra[:5]))}")
    if test.num_classes != train.num_classes:
        raise KDPipeError(f"{train.spec}: the train split has {train.num_classes} classes, the {name} split "
                          f"{test.num_classes}")
    if test.image_shape != train.image_shape or test.kind != train.kind:
        raise KDPipeError(f"{train.spec}: the {name} samples are {test.kind} {test.image_shape}, the train samples "
                          f"{train.kind} {train.image_shape}: both splits must have one shape")


def moved_spec(spec: str, data_root) -> str:
    """The spec of a path source that now lies under (or at) `data_root`: DIR/<its old name> when that
    exists, else DIR itself. Other sources keep their spec (they take
    --data-root as their folder). The caller checks the fingerprint, so a wrong guess is refused."""
    kind, _, arg = spec.partition(":")
    src = SOURCES.get(kind.lower())
    if data_root is None or src is None or not src.path or not arg:
        return spec
    root = Path(data_root).expanduser()
    inside = root / Path(arg).name
    if src.file and root.is_dir() and not inside.exists():  # the file was renamed as it moved
        raise KDPipeError(f"--data-root {root} holds no {inside.name} (the cache's {kind} file): give the file "
                          f"itself, --data {kind}:FILE")
    return f"{kind}:{inside if inside.exists() else root}"


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
    """An IDX file, gzip-compressed or not whatever its name says (a browser may save the decompressed
    download under its .gz name, or a .gz file lose its suffix)."""
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        with (gzip.open if gz else open)(path, "rb") as f:
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


def _load_idx_dataset(spec, split, data_root, class_names, default_root, how_to_get, tv_folder) -> ImageData:
    """The IDX files in --data-root, its raw/ (it is torchvision's dataset folder), or torchvision's folder
    of this dataset under it (`tv_folder`/raw): torchvision keeps MNIST and FashionMNIST side by side under
    one root, whose files have the same names, so each source looks in its own folder only."""
    candidates = []
    if data_root is not None:
        root = Path(data_root).expanduser()
        candidates += [root, root / "raw", root / tv_folder / "raw"]
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
            if labels.ndim != 1:
                raise KDPipeError(f"{lbl}: expected (N,) labels, got shape {labels.shape}")
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
    if split == "val" and not {xk, yk} <= keys:
        raise KDPipeError(f"{path} holds no x_val and y_val arrays (the validation split): add them to pick the best "
                          "epoch on them, or hold out part of the train split with --val-fraction F")
    if xk not in keys or yk not in keys:
        raise KDPipeError(f"{path} must hold arrays x_train, y_train, x_test, y_test; "
                          f"it holds {', '.join(sorted(keys)) or 'nothing'}")
    try:
        x, y = z[xk], z[yk]
    except Exception as e:
        raise KDPipeError(f"cannot read {xk}/{yk} from {path}: {e}") from None
    y = _npz_label_vector(path, y, yk)
    if np.issubdtype(x.dtype, np.floating):
        return _npz_features(spec, path, split, z, keys, x, y)
    if x.dtype != np.uint8:
        raise KDPipeError(f"{path}: {xk} must be uint8 pixels or float (N, D) features, got {x.dtype} {x.shape}"
                          + _npz_convert_hint(x, xk))
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and _npz_layout(path, z, keys, x, xk) == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise KDPipeError(f"{path}: {xk} must be (N, H, W), (N, H, W, C) or (N, C, H, W), got {x.shape}")
    class_names = _npz_labels(path, z, keys, y, yk)
    return ImageData(np.ascontiguousarray(x), y.astype(np.int64), class_names, spec, split, str(path))


def _npz_layout(path, z, keys, x: np.ndarray, xk: str) -> str:
    """NCHW or NHWC: an npz's `layout` array ("NCHW" or "NHWC") where it holds one, else the shape's. The channels
    are the axis smaller than height and width, whatever their number (grey, RGB, RGBA, 2 bands); not only 1 or 3,
    which read (N, 32, 32, 4) as 32 channels of 32x4. Where neither end axis is (13 bands of 8x8, (N, 8, 8, 13)),
    the shape cannot tell: read as NCHW, such images were cut into other images without a word; refused."""
    if "layout" in keys:
        try:
            layout = str(z["layout"].item()).upper()
        except ValueError:  # more than one value, or an object array that allow_pickle=False refuses
            layout = None
        if layout not in ("NCHW", "NHWC"):
            raise KDPipeError(f"{path}: layout must be the string \"NCHW\" or \"NHWC\" (np.savez(..., "
                              f"layout=\"NHWC\")), got {z['layout'] if layout is None else layout!r}")
        return layout
    n, a, b, c = x.shape
    if c < min(a, b):
        return "NHWC"
    if a < min(b, c):
        return "NCHW"
    raise KDPipeError(f"{path}: {xk} {x.shape} may be NHWC ({c} channels of {a}x{b}) or NCHW ({a} channels of "
                      f"{b}x{c}): say which, with an array layout=\"NHWC\" or layout=\"NCHW\" in the npz")


def _npz_convert_hint(x: np.ndarray, xk: str) -> str:
    """What to store in place of an x array of another dtype: int (N, D) columns as float features; images as uint8
    0..255, scaled from 0..1 where they hold that range (a float image array was refused saying only 'uint8')."""
    if x.ndim == 2 and x.dtype.kind in "biu":
        return f": store feature vectors as float, {xk}.astype(np.float32)"
    if x.ndim not in (3, 4) or x.dtype.kind not in "biuf" or not x.size:
        return ""
    with np.errstate(invalid="ignore"):
        lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 255:
        return f" (they run {lo:g}..{hi:g}): store images as uint8 pixels 0..255"
    if x.dtype.kind == "f" and hi <= 1:
        return f": images scaled to 0..1 go back to pixels with np.round({xk} * 255).astype(np.uint8)"
    return f": they lie in 0..255, so store {xk}" + (".round()" if x.dtype.kind == "f" else "") + ".astype(np.uint8)"


def _npz_label_vector(path, y: np.ndarray, yk: str) -> np.ndarray:
    """Labels (N, 1), as Keras' datasets give them, are the labels (N,); one-hot labels (N, C) are refused saying
    how to store them (they were refused as 'a 1-D integer array' with no word of what to do)."""
    if y.ndim == 2 and y.shape[1] == 1:
        return y.reshape(-1)
    if y.ndim == 2 and y.shape[1] > 1 and y.dtype.kind in "biuf" and np.isin(y, (0, 1)).all() and (y.sum(1) == 1).all():
        raise KDPipeError(f"{path}: {yk} is one-hot, {y.dtype} {y.shape}: store the class indices, "
                          f"{yk}.argmax(1), a 1-D integer array")
    return y


def _npz_labels(path, z, keys, y, yk) -> list[str]:
    """Check the labels; the class names (stored, or numbers up to the largest label of both splits)."""
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        hint = ""
        if y.ndim == 1 and y.dtype.kind == "f" and y.size and np.isfinite(y).all() and (y == np.round(y)).all():
            hint = f": these are whole numbers, store them as integers, {yk}.astype(np.int64)"
        elif y.ndim == 1 and y.dtype.kind in "USO":  # class names: numbered in sorted order, as csv: and files: do
            hint = (": store class indices and the names apart, class_names = np.unique(y_train), then each split's "
                    "np.searchsorted(class_names, y) as its labels")
        raise KDPipeError(f"{path}: {yk} must be a 1-D integer array, got {y.dtype} {y.shape}{hint}")
    if "class_names" in keys:
        try:
            names = z["class_names"]
        except ValueError as e:  # an object array (e.g. holding None), which allow_pickle=False refuses
            raise KDPipeError(f"cannot read class_names from {path}: {e}: store them as strings") from None
        if names.ndim != 1:
            raise KDPipeError(f"{path}: class_names must be a 1-D array of names, got shape {names.shape}")
        # bytes (numpy's 'S' dtype, as h5py and Python 2 pickles give) are names, not "b'cat'"
        class_names = [c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c) for c in names]
        twice = sorted({c for c in class_names if class_names.count(c) > 1})
        if twice:  # the report, the exported model's card and a teacher's class check would confuse the two
            at = [i for i, c in enumerate(class_names) if c == twice[0]]
            raise KDPipeError(f"{path}: class_names names {twice[0]!r} {len(at)} times (classes "
                              f"{', '.join(map(str, at))}): give each class its own name")
    else:
        ytr = z["y_train"] if "y_train" in keys else y
        n = int(max(ytr.max(initial=0), y.max(initial=0))) + 1
        class_names = [str(i) for i in range(n)]
    if y.size and (y.min() < 0 or y.max() >= len(class_names)):
        raise KDPipeError(f"{path}: {yk} holds labels outside [0, {len(class_names) - 1}]")
    return class_names


def _npz_features(spec, path, split, z, keys, x, y) -> "Features":
    """Float x arrays are tabular features (N, D), kept as float32 (float64 is rounded once, here)."""
    xk, yk = f"x_{split}", f"y_{split}"
    if x.ndim != 2:
        raise KDPipeError(f"{path}: {xk} is {x.dtype} {x.shape}: float arrays must be (N, D) feature "
                          "vectors; images must be uint8 pixels" + _npz_convert_hint(x, xk))
    with np.errstate(over="ignore"):  # a value past float32's range becomes inf, refused below
        x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise KDPipeError(f"{path}: {xk} holds NaN or infinite values, or values past float32's range (row "
                          f"{int(np.argmin(np.isfinite(x).all(1)))}): fill or drop them first")
    class_names = _npz_labels(path, z, keys, y, yk)
    return Features(x, y.astype(np.int64), class_names, spec, split, str(path))


# ---------------------------------------------------------------- ImageFolder

GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B")  # 16-bit grey (PNG, TIFF): full scale 65535, stored as v / 257
UNREADABLE_MODES = {"I": "32-bit integer", "F": "32-bit float"}  # no range kdpipe can be sure of
# to_storage's 16-bit rule, for the card `kdpipe export` writes: a deployment that converts as the card's colour step
# says, with Pillow's convert alone, fed the model white images where the photo was 16-bit
SIXTEEN_BIT_STEP = ("A 16-bit grey image (PNG or TIFF, Pillow mode I;16) is brought to 8 bits before it is converted, "
                    "each value v to round(v / 257): Pillow's own convert clips it at 255, a white image")
# Part of a decoded copy's key: a copy decoded by an older rule is decoded again, not reused. 2: 16-bit
# grey images scaled (v / 257), where Pillow's conversion had clipped them at 255. 3: EXIF orientation applied.
# 4: an uncompressed grey TIFF turned by its orientation (5-8) decoded unscrambled (_open_image).
DECODE_VERSION = 4
DECODE_THREADS = 8  # at most this many decoding threads (fewer on fewer cores)
DECODE_BLOCK = 256  # files decoded per block (the progress line's step)


def _decoded_cache_dir() -> Path:
    from kdpipe.util import env  # KDPIPE_* variables are parsed in one place
    return env("KDPIPE_DATA_CACHE")


# Split folder names, in order of preference. A validation folder is the test split where there is no
# test (or evaluation) folder; beside one, it is the validation split ("val").
SPLIT_FOLDERS = {"train": ("train", "training"), "test": ("test", "evaluation", "eval", "val", "validation"),
                 "val": ("validation", "val")}
IMAGEFOLDER_SPLITS = {"train": ("train",), "test": ("test", "val"), "val": ("val",)}


def _split_folder(root: Path, split: str, names: dict | None = None) -> Path | None:
    names = names or IMAGEFOLDER_SPLITS
    found = [root / n for n in names[split] if (root / n).is_dir()]
    # two folders that each name this split (train/ and training/, test/ and evaluation/): which one the user
    # means cannot be told, and taking the first would drop the other without a word
    own = [f for f in found if split != "test" or f.name not in names["val"]]
    if len(own) > 1:
        raise KDPipeError(f"{root} has folders {' and '.join(f.name for f in own)}, which both name its {split} "
                          "split: keep one of them there (merge or move the other)")
    folder = found[0] if found else None
    if split == "val" and folder is not None and folder == _split_folder(root, "test", names):
        return None  # the only held-out folder is the test split: selecting on it would select on the test set
    return folder


def _no_val_folder(spec, root: Path, names: dict) -> KDPipeError:
    test = _split_folder(root, "test", names)
    how = "or hold out part of the train split with --val-fraction F"
    if test is not None and test.name in names["val"]:
        others = " or ".join(n for n in names["test"] if n not in names["val"])
        return KDPipeError(f"{spec}: {root}'s {test.name} folder is its test split (it has no {others} folder): "
                           f"a validation split needs a test folder besides it; {how}")
    return KDPipeError(f"{spec}: {root} has no {' or '.join(names['val'])} folder besides its test folder"
                       + (f" {test.name}" if test is not None else "") + f": add one to pick the best epoch on it, {how}")


def _images_in(folder: Path, recursive: bool = False) -> tuple[list[Path], list[Path]]:
    """The image files of `folder` (sorted; with `recursive`, in its subfolders too, as torchvision's
    ImageFolder reads a class folder), and the other entries there that are not hidden (files, subfolders
    when not recursive, and links whose target is missing)."""
    images, other = [], []
    for p in folder.iterdir():
        if p.name.startswith("."):
            continue
        if p.is_dir():
            if recursive:
                if p.is_symlink() and folder.resolve().is_relative_to(p.resolve()):
                    raise KDPipeError(f"{p} links to {os.readlink(p)}, a folder that holds it: its images (and other "
                                      "classes' with them) would be read again and again: remove the link")
                sub_images, sub_other = _images_in(p, True)
                images += sub_images
                other += sub_other
            else:
                other.append(p)
        elif p.is_file():
            (images if p.suffix.lower() in IMAGE_EXTENSIONS else other).append(p)
        else:  # a link to nothing (its target deleted or not mounted), said like any other skip
            other.append(p)
    return sorted(images), other


def _skipped_note(spec, folder: Path, skipped: list[Path]) -> None:
    """Say which files a folder source did not read, so that a folder of .heic photos or a class of
    .jp2 files is not dropped without a word."""
    broken = sorted(p for p in skipped if p.is_symlink() and not p.exists())  # links whose target is missing
    if broken:
        print(f"note: {spec}: skipped {len(broken)} link(s) under {folder} whose target is missing (e.g. "
              f"{broken[0].name} -> {os.readlink(broken[0])}): restore the targets (mount their disk) to read "
              "them, or remove the links", file=sys.stderr, flush=True)
    skipped = [p for p in skipped if p not in broken]
    if not skipped:
        return
    kinds = sorted({"folders" if p.is_dir() else p.suffix.lower() or "(no extension)" for p in skipped})
    print(f"note: {spec}: skipped {len(skipped)} item(s) under {folder} that are not images kdpipe reads "
          f"({', '.join(kinds[:6])}; e.g. {sorted(skipped)[0].name}); it reads {'/'.join(IMAGE_EXTENSIONS)}",
          file=sys.stderr, flush=True)


def _list_files(spec, folder: Path, classes: list[str], split: str, note: bool = True) -> tuple[list[Path], list[int]]:
    files, labels, skipped = [], [], []
    for ci, c in enumerate(classes):
        cdir = folder / c
        found, other = _images_in(cdir, recursive=True) if cdir.is_dir() else ([], [])
        skipped += other
        if not found and split == "train":
            what = ("macOS's archive metadata, not a class: delete it" if c == "__MACOSX" else
                    "remove the folder, or put its class's images in it")
            raise KDPipeError(f"{spec}: class folder {cdir} holds no images ({'/'.join(IMAGE_EXTENSIONS)}): {what}")
        files += found
        labels += [ci] * len(found)
    # images beside the class folders have no class: said, not dropped without a word
    loose = sorted(p for p in folder.iterdir() if p.name[:1] != "." and p.is_file()
                   and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        if loose:
            raise KDPipeError(f"{spec}: the {len(loose)} images of {folder} (e.g. {loose[0].name}) lie outside class "
                              f"folders: put each in {folder}/<class>/, as the train folder has them")
        raise KDPipeError(f"{spec}: {folder} holds no images")
    if note:
        _skipped_note(spec, folder, skipped)
        if loose:
            print(f"note: {spec}: skipped {len(loose)} image(s) directly in {folder}, outside its class folders "
                  f"(e.g. {loose[0].name}): their class is unknown", file=sys.stderr, flush=True)
    # hidden folders (.ipynb_checkpoints, .git) are no classes, as in the train folder
    extra = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in classes and d.name[:1] != ".")
    if extra:
        raise KDPipeError(f"{spec}: {folder} has class folders not in the train folder: {', '.join(extra[:5])}")
    return files, labels


def _listing_hash(h, folder: Path, files: list[Path]) -> None:
    h.update(str(folder.resolve()).encode())
    for p in files:
        st = p.stat()
        h.update(f"{os.path.relpath(p, folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())


def _load_imagefolder(spec, root: Path, split, image_size: int | None, resize: str = "crop") -> ImageData:
    """PATH/train and PATH/test (or val), one folder per class; decoded by _decode_files."""
    if not root.is_dir():
        raise KDPipeError(f"{spec}: no such folder {root}")
    folder = _split_folder(root, split)
    if folder is None and split == "val":
        raise _no_val_folder(spec, root, IMAGEFOLDER_SPLITS)
    if folder is None:
        known = {n for names in IMAGEFOLDER_SPLITS.values() for n in names}
        have = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name[:1] != "." and d.name not in known)
        raise KDPipeError(f"{spec}: {root} has no {'train' if split == 'train' else 'test or val'} folder"
                          + (f" (its folders: {', '.join(have[:5])}): imagefolder: reads PATH/train and PATH/test "
                             "(or val), one folder per class in each: rename them" if have else ""))
    # Class names come from the train folder so that both splits number classes alike.
    class_root = root / "train" if (root / "train").is_dir() else folder
    classes = sorted(d.name for d in class_root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise KDPipeError(f"{spec}: {class_root} has no class folders")
    if len(classes) == 1:  # train/images/<class>/ (a zip unpacked into a folder of its own): not one class
        inner = sorted(d.name for d in (class_root / classes[0]).iterdir() if d.is_dir() and d.name[:1] != ".")
        if inner:
            raise KDPipeError(f"{spec}: {class_root} has one folder, {classes[0]}, and its subfolders "
                              f"({', '.join(inner[:3])}{', ...' if len(inner) > 3 else ''}) look like the classes: "
                              f"move them up into {class_root} (and likewise in the other splits)")
    files, labels = _list_files(spec, folder, classes, split)
    other = _split_folder(root, "test" if split == "train" else "train")
    other_files = (_list_files(spec, other, classes, "test", note=False)[0]
                   if other is not None and other != folder else [])
    if split == "val":  # its colour mode is the other splits' too (the cache's train and test splits)
        other_files += _list_files(spec, _split_folder(root, "test"), classes, "test", note=False)[0]
    return _decode_files(spec, split, folder, files, labels, classes, (other, other_files), image_size, resize)


# ---------------------------------------------------------------- files: flat folders, label in the name

def _label_of(spec, p: Path) -> str:
    label, sep, rest = p.stem.rpartition("_")
    if not sep or not label or not rest:
        raise KDPipeError(f"{spec}: {p.name} is not named <label>_<n>{p.suffix} (the label, an underscore, "
                          "then anything): rename it or move it out of the folder")
    return label


def _flat_listing(spec, folder: Path, note: bool = True) -> tuple[list[Path], list[str]]:
    files, skipped = _images_in(folder)
    if not files:
        sub = sorted(p.name for p in skipped if p.is_dir())
        if sub:  # a folder per class (Food-11 as Kaggle has it): imagefolder's layout
            raise KDPipeError(f"{spec}: {folder} holds folders ({', '.join(sub[:3])}{', ...' if len(sub) > 3 else ''})"
                              f", not images: files: reads flat folders of <label>_<n>.jpg; for one folder per class "
                              "use imagefolder:PATH, whose split folders are named train and test (or val)")
        raise KDPipeError(f"{spec}: {folder} holds no images ({'/'.join(IMAGE_EXTENSIONS)})")
    if note:
        _skipped_note(spec, folder, skipped)
    return files, [_label_of(spec, p) for p in files]


def _whole_number(label: str) -> int | None:
    """The class index a label writes (``7``, ``007``, ``7.0``), or None for a name (``-1`` and ``7.5`` are
    names too: sorted as text, numbered from 0). ASCII digits only (str.isdigit() takes "²", int() not)."""
    whole, dot, frac = label.partition(".")
    if whole.isascii() and whole.isdigit() and set(frac) <= {"0"}:
        return int(whole)
    return None


def _case_note(spec, train_labels: list[str]) -> None:
    """Say which class names differ only in case (``Cat`` beside ``cat``): two classes, as letters' classes
    ``a`` and ``A`` are, but more often one class written two ways, which would split its samples."""
    counts: dict[str, int] = {}
    for s in train_labels:
        counts[s] = counts.get(s, 0) + 1
    groups: dict[str, list[str]] = {}
    for s in sorted(counts):
        groups.setdefault(s.casefold(), []).append(s)
    alike = [g for g in groups.values() if len(g) > 1]
    if alike:
        shown = "; ".join(" and ".join(f"{s!r} ({counts[s]})" for s in g) for g in alike[:3])
        print(f"note: {spec}: class names that differ only in case are classes of their own: {shown}"
              f"{'; ...' if len(alike) > 3 else ''} (train samples); write them alike where they are one class",
              file=sys.stderr, flush=True)


def class_numbering(spec, train_labels: list[str], other_labels: list[str],
                    note: bool = True) -> tuple[list[str], dict[str, int]]:
    """Class names and each label's index. Labels that are all whole numbers (``3``, or ``3.0`` as pandas
    writes an integer column that had missing values) are the class indices themselves (classes 0..the
    largest label of either split; check_labels refuses gaps); otherwise the classes are the train split's
    labels, sorted (with `note`, names that differ only in case are said: _case_note). A mix of numbers
    and names is refused."""
    every = set(train_labels) | set(other_labels)
    numeric = {s: _whole_number(s) for s in every}
    numeric = {s: v for s, v in numeric.items() if v is not None}
    if numeric and len(numeric) != len(every):
        names = sorted(every - set(numeric))[:3]
        if all(n.startswith("-") and _whole_number(n[1:]) is not None for n in every - set(numeric)):
            raise KDPipeError(f"{spec}: the labels are whole numbers, some negative ({', '.join(names)}, ...), and "
                              "whole-number labels are the class indices 0..N-1: renumber them from 0 (a -1/1 "
                              "coding as 0/1)")
        raise KDPipeError(f"{spec}: the labels mix numbers ({min(numeric, key=numeric.get)}, ...) and names "
                          f"({', '.join(names)}, ...): use one or the other")
    if numeric:
        n = max(numeric.values()) + 1
        values = sorted(set(numeric.values()))
        if n > 10 * len(values) + 1000:  # mostly gaps (labels like 20240101), which check_labels refuses, but
            # only after a list of n names (20 million here; a Unix time would exhaust memory) is built
            raise KDPipeError(f"{spec}: whole-number labels are the class indices, but these run {values[0]}.."
                              f"{values[-1]} with {len(values)} distinct values: number the classes 0..N-1 "
                              "without gaps, or write them as names")
        return [str(i) for i in range(n)], numeric
    forms: dict[str, set[str]] = {}
    for s in every:  # one name in two Unicode forms (NFC, NFD: a file from macOS) looks one but is two classes
        forms.setdefault(unicodedata.normalize("NFC", s), set()).add(s)
    twice = sorted(sorted(f) for f in forms.values() if len(f) > 1)
    if twice:
        raise KDPipeError(f"{spec}: the labels write the class {twice[0][0]!r} in {len(twice[0])} Unicode forms "
                          f"({', '.join(map(ascii, twice[0]))}), which look alike but would be classes of their own: "
                          "write each class alike (normalize the names to NFC)")
    classes = sorted(set(train_labels))
    unknown = sorted(set(other_labels) - set(classes))
    if unknown:
        raise KDPipeError(f"{spec}: the train split has fewer classes ({len(classes)}) than the test split: "
                          f"no train sample of {', '.join(unknown[:5])}")
    if note:
        _case_note(spec, train_labels)
    return classes, {c: i for i, c in enumerate(classes)}


def _load_files(spec, root: Path, split, image_size: int | None, resize: str = "crop") -> ImageData:
    """files:PATH: PATH/training (or train) and PATH/evaluation (or test; else validation or val), each a
    flat folder of images named <label>_<n>.jpg (the layout of Food-11); beside an evaluation (or test)
    folder, PATH/validation (or val) is the validation split."""
    if not root.is_dir():
        raise KDPipeError(f"{spec}: no such folder {root}")
    folder = _split_folder(root, split, SPLIT_FOLDERS)
    if folder is None and split == "val":
        raise _no_val_folder(spec, root, SPLIT_FOLDERS)
    if folder is None:
        raise KDPipeError(f"{spec}: {root} has no {' or '.join(SPLIT_FOLDERS[split])} folder")
    other = _split_folder(root, "test" if split == "train" else "train", SPLIT_FOLDERS)
    files, names = _flat_listing(spec, folder)
    other_files, other_names = _flat_listing(spec, other, note=False) if other is not None else ([], [])
    train_names, test_names = (names, other_names) if split == "train" else (other_names, names)
    classes, index = class_numbering(spec, train_names, test_names, note=split == "train")
    labels = [index[c] for c in names]
    if split == "val":  # its colour mode is the other splits' too (the cache's train and test splits)
        other_files = other_files + _flat_listing(spec, _split_folder(root, "test", SPLIT_FOLDERS), note=False)[0]
    return _decode_files(spec, split, folder, files, labels, classes, (other, other_files), image_size, resize)


# ---------------------------------------------------------------- csv: image lists and feature tables

CSV_SPLITS = {"train": "train", "training": "train", "test": "test", "evaluation": "test", "eval": "test",
              "val": "val", "validation": "val"}


CSV_PROGRESS_BYTES = 32 << 20  # a CSV this large reports how its reading goes (measured: ~20 MB/s on one core)


def _lines_with_progress(f, what: str, size: int):
    """The lines of the text file f, reporting their progress in MB of `size` (characters read: a little short
    of the bytes for non-ASCII text, so the last line is given when the file is done)."""
    from kdpipe.util import Progress
    prog = Progress(what, max(1, round(size / 1e6)), "MB")
    chars = 0
    for line in f:
        chars += len(line)
        if chars >= 1_000_000:
            prog.update(chars // 1_000_000)
            chars %= 1_000_000
        yield line
    prog.update(max(0, prog.total - prog.done))


class CsvTable(NamedTuple):
    """A CSV file as read (_read_csv). header: the column names; rows: each row's cells, stripped (blank rows
    dropped), of every column, or of a feature table's label and split only (cols: a name's index in a row);
    lines: each row's line in the file, which errors name. A feature table's (numeric=True, no path column)
    feature columns are parsed as they are read: x, (rows, features) float64, in header order (`features`: their
    names), and bad: the first cell that is not a number, (row, feature, cell), else None (NaN stands there)."""
    header: list[str]
    rows: list[list[str]]
    lines: list[int]
    cols: dict[str, int]
    features: list[str] | None = None
    x: np.ndarray | None = None
    bad: tuple[int, int, str] | None = None


CSV_BLOCK_ROWS = 65536  # a feature table's cells are parsed this many rows at a time (as text: ~2 KB a row)


def _read_csv(spec, path: Path, numeric: bool = False) -> CsvTable:
    """The file's CsvTable. With `numeric`, a feature table (label and split columns and no path column) keeps its
    feature cells as numbers, parsed CSV_BLOCK_ROWS rows at a time, not as text: a million rows of 28 features held
    3.6 GB as Python strings. A file of CSV_PROGRESS_BYTES or more reports its progress."""
    import csv
    if not path.is_file():
        raise KDPipeError(f"{spec}: no such file {path}")
    header, rows, lines, parser = None, [], [], None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            size = path.stat().st_size
            reader = csv.reader(_lines_with_progress(f, f"reading {path.name}", size)
                                if size >= CSV_PROGRESS_BYTES else f)
            for r in reader:
                if not "".join(r).strip():  # a blank row (every cell empty or spaces)
                    continue
                if header is None:
                    header = _csv_header(spec, path, [c.strip() for c in r])
                    if numeric and "path" not in header and {"label", "split"} < set(header):  # and a feature
                        parser = _FeatureCells(header)
                    continue
                if len(r) != len(header):
                    raise KDPipeError(f"{spec}: {path} line {reader.line_num} has {len(r)} fields, the header "
                                      f"{len(header)}")
                rows.append(parser.add(r) if parser else [c.strip() for c in r])
                lines.append(reader.line_num)  # the last line of a row whose quoted cell spans lines
    except UnicodeDecodeError as e:
        raise KDPipeError(f"cannot read {path} as CSV: it is not UTF-8 text ({e}): save it as UTF-8") from None
    except (OSError, csv.Error) as e:
        raise KDPipeError(f"cannot read {path} as CSV: {e}") from None
    if header is None:
        raise KDPipeError(f"{spec}: {path} is empty")
    if parser is None:
        return CsvTable(header, rows, lines, {c: i for i, c in enumerate(header)})
    x, bad = parser.done()
    return CsvTable(header, rows, lines, {"label": 0, "split": 1}, parser.names, x, bad)


class _FeatureCells:
    """A feature table's cells as read: label and split kept as text (one string object per distinct value), the
    feature cells parsed by float() CSV_BLOCK_ROWS rows at a time into float64 blocks."""

    def __init__(self, header: list[str]):
        self.label, self.split = header.index("label"), header.index("split")
        self.at = [i for i, c in enumerate(header) if c not in ("label", "split")]
        self.names = [header[i] for i in self.at]
        pick = operator.itemgetter(*self.at)  # a tuple of the cells (one cell, for one feature column)
        self.pick = pick if len(self.at) > 1 else (lambda r: (r[self.at[0]],))
        self.text: dict[str, str] = {}
        self.cells: list[str] = []
        self.blocks: list[np.ndarray] = []
        self.rows, self.bad = 0, None

    def add(self, r: list[str]) -> list[str]:
        self.cells.extend(self.pick(r))  # as they are: float() ignores the whitespace around a number
        self.rows += 1
        if self.rows % CSV_BLOCK_ROWS == 0:
            self._parse()
        keep = self.text.setdefault
        label, split = r[self.label].strip(), r[self.split].strip()
        return [keep(label, label), keep(split, split)]

    def _parse(self) -> None:
        first = self.rows - len(self.cells) // max(1, len(self.at))  # the block's first row
        try:
            block = np.fromiter(map(float, self.cells), dtype=np.float64, count=len(self.cells))
        except ValueError:  # a cell that is no number: NaN there, and the first such cell kept for the error
            block = np.empty(len(self.cells), dtype=np.float64)
            for k, c in enumerate(self.cells):
                try:
                    block[k] = float(c)
                except ValueError:
                    block[k] = np.nan
                    if self.bad is None:
                        self.bad = (first + k // len(self.at), k % len(self.at), c.strip())
        self.blocks.append(block)
        self.cells = []

    def done(self) -> tuple[np.ndarray, tuple | None]:
        self._parse()
        x = np.concatenate(self.blocks) if self.blocks else np.empty(0)
        self.blocks = []
        return x.reshape(self.rows, len(self.at)), self.bad


def _csv_header(spec, path: Path, header: list[str]) -> list[str]:
    """The header row, refused where it is no header or names no columns kdpipe can tell apart."""
    # before the names' checks: a first row of data repeats values (0, train, 0); a row naming label and split is
    # the header, whatever its other names (pandas names a DataFrame(array)'s columns 0, 1, 2, ...)
    for name in header if not {"label", "split"} <= set(header) else ():
        try:
            float(name)
        except ValueError:
            continue
        raise KDPipeError(f"{spec}: {path} has no header row (its first row holds the number {name}): add one "
                          "with columns label, split and path (an image list) or numeric feature columns")
    sep = next((c for c in ";\t|" if len(header) == 1 and c in header[0]), None)
    if sep:
        raise KDPipeError(f"{spec}: {path}'s columns are separated by {sep!r}, not commas: save it as comma-separated "
                          "values (with '.' as the decimal point)")
    if header[0] == "" and len(header) > 1 and all(header[1:]):
        raise KDPipeError(f"{spec}: {path}'s first column has no name: the row index pandas writes unless "
                          "to_csv(..., index=False); write the file without it")
    if len(set(header)) != len(header) or not all(header):
        twice = sorted({c for c in header if c and header.count(c) > 1})
        empty = [str(j + 1) for j, c in enumerate(header) if not c]
        what = "; ".join(filter(None, (twice and f"{_few(twice)} repeated",
                                        empty and f"column(s) {_few(empty)} unnamed")))
        raise KDPipeError(f"{spec}: {path}'s header row has empty or repeated column names ({what}): give each "
                          "column a name of its own")
    return header


def _few(names: list[str], n: int = 5) -> str:
    """The first n names, and how many more (a feature table's header has hundreds: Kaggle's MNIST CSV 785)."""
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


MISSING_VALUES = ("", "na", "n/a", "nan", "null", "none", "?", "-", "#n/a")  # as spreadsheets and pandas write them
ID_NAMES = ("id", "idx", "index", "row", "rowid", "row_id", "unnamed: 0")  # and names ending in _id, Id, ID


def _comma_number(cell: str) -> bool:
    """A number written with a decimal comma (2,5) or thousands separators (1,000 or 1.000,5), as a spreadsheet
    set to a European locale exports it, quoted."""
    try:
        float(cell.replace(",", "").replace(".", "").replace(" ", ""))
    except ValueError:
        return False
    return "," in cell and cell[:1] not in ".,"


def _id_like(name: str) -> bool:
    low = name.lower()
    return low in ID_NAMES or low.endswith(("_id", " id", "-id")) or (len(name) > 2 and name.endswith(("Id", "ID")))


def _refuse_leaking_columns(spec, path: Path, x: np.ndarray, names: list[str], labels: list[str]) -> None:
    """Refuse a feature column that a model would read the answer off, over every row of the file: an id or row
    number (distinct whole numbers, one apart in the file's order or under an id's name: Kaggle's Iris has an Id
    column, and its rows are sorted by class), or a copy or code of the label (one value per class on every row,
    in a file of 3 or more rows per class: a target column left beside the label copied from it)."""
    keys = [str(w) if (w := _whole_number(t)) is not None else t for t in labels]  # 3 and 3.0 are one class
    codes = np.unique(keys, return_inverse=True)[1].reshape(-1)
    n_classes = int(codes.max()) + 1
    for j, name in enumerate(names):
        v = x[:, j]
        values, inverse = np.unique(v, return_inverse=True)
        if len(values) == len(v) > 2 and np.array_equal(v, np.round(v)) and (
                _id_like(name) or bool(np.all(np.diff(v) == 1))):
            raise KDPipeError(f"{spec}: {path}: column {name!r} numbers the rows ({v[0]:.0f}, {v[1]:.0f}, ..., "
                              "distinct whole numbers): an id or row number is no feature (a model would learn the "
                              "rows' order): drop the column")
        if (len(values) == n_classes and len(v) >= 3 * n_classes  # not in a few rows typed to try kdpipe out
                and len(np.unique(inverse.reshape(-1) * n_classes + codes)) == n_classes):
            raise KDPipeError(f"{spec}: {path}: column {name!r} takes one value per class on every row ({n_classes} "
                              "values for its classes): a copy or code of the label, which a model would read the "
                              "answer off: drop the column")


def _load_csv(spec, path: Path, split, image_size: int | None, resize: str = "crop") -> ImageData:
    """csv:FILE, one row per sample. Columns (the header row names them):
    - ``label``: the class, whole numbers from 0 or names;
    - ``split``: train (or training), test (or evaluation); val/validation rows are the test split
      where the file has no test rows, else the validation split;
    - then either ``path`` (an image list: the image's path, relative to the CSV's folder) and nothing
      else, or only numeric feature columns (a feature table, stored as float32).
    Anything else is refused as ambiguous."""
    table = _read_csv(spec, path, numeric=True)
    header, rows, lines, cols = table.header, table.rows, table.lines, table.cols
    missing = [c for c in ("label", "split") if c not in header]
    if missing:
        alike = [f"{h} to {c}" for c in missing for h in header if h.strip().lower() == c and h != c]
        raise KDPipeError(f"{spec}: {path} has no {' or '.join(missing)} column (it has {_few(header)}): "
                          + (f"rename {' and '.join(alike)} (kdpipe's column names are lowercase)" if alike else
                             "a CSV needs columns label, split, and path or numeric features"))
    if not rows:
        raise KDPipeError(f"{spec}: {path} has a header but no rows")
    splits = []
    for i, r in zip(lines, rows):
        v = CSV_SPLITS.get(r[cols["split"]].lower())
        if v is None:
            raise KDPipeError(f"{spec}: {path} line {i}: split {r[cols['split']]!r} is not train, test or val")
        splits.append(v)
    has = set(splits)
    if split == "val" and not {"val", "test"} <= has:
        raise KDPipeError(f"{spec}: {path} has no val rows besides test rows (split column): add some to pick the "
                          "best epoch on them, or hold out part of the train split with --val-fraction F")
    want = "val" if split == "test" and "test" not in has else split
    other = ("test" if "test" in has else "val") if split == "train" else "train"
    mine = [r for r, s in zip(rows, splits) if s == want]
    theirs = [r for r, s in zip(rows, splits) if s == other]
    if not mine:
        raise KDPipeError(f"{spec}: {path} has no {split} rows (split column)")
    lab = cols["label"]
    train_names = [r[lab] for r in (mine if split == "train" else theirs)]
    test_names = [r[lab] for r in (theirs if split == "train" else mine)]
    for i, r in zip(lines, rows):
        if not r[lab]:
            raise KDPipeError(f"{spec}: {path} line {i} has an empty label: fill it or drop the row")
    classes, index = class_numbering(spec, train_names, test_names, note=split == "train")
    labels = [index[r[lab]] for r in mine]
    rest = [c for c in header if c not in ("label", "split")]
    if "path" in header:
        if rest != ["path"]:
            extra = [c for c in rest if c != "path"]
            raise KDPipeError(f"{spec}: {path} has a path column and also {', '.join(extra[:5])}: an image list has "
                              "only the columns path, label and split; a feature table has no path column")
        seen = {}  # an image in two splits is a test measured on training images; with two labels, a typo
        for i, r, s in zip(lines, rows, splits):
            first = seen.setdefault(os.path.normpath(r[cols["path"]]), (i, s, r[lab]))
            if first[1:] != (s, r[lab]):
                raise KDPipeError(f"{spec}: {path} lists {r[cols['path']]} on line {first[0]} ({first[1]}, label "
                                  f"{first[2]}) and line {i} ({s}, label {r[lab]}): list each image once, in one split")
        base = path.parent
        files = [base / r[cols["path"]] for r in mine]
        other_files = [base / r[cols["path"]] for r in theirs]
        if split == "val":  # its colour mode is the other splits' too (the cache's train and test splits)
            other_files += [base / r[cols["path"]] for r, s in zip(rows, splits) if s == "test"]
        for p in files + other_files:
            if not p.is_file():
                hint = (": write its path with / (a Windows path's \\ is part of the name here)"
                        if "\\" in str(p) else "")
                raise KDPipeError(f"{spec}: {p} (listed in {path.name}, relative to its folder) is missing{hint}")
        return _decode_files(spec, split, base, files, labels, classes, (base, other_files), image_size, resize)
    if image_size is not None:
        raise KDPipeError(f"--image-size applies to images; {spec} is a table of features: leave it out")
    if not rest:
        raise KDPipeError(f"{spec}: {path} has neither a path column nor feature columns")
    x_all = table.x  # every split's rows, parsed as read: the checks below see the file
    if table.bad is not None:
        i, j, cell = table.bad
        if cell.lower() in MISSING_VALUES:
            raise KDPipeError(f"{spec}: {path} line {lines[i]}: column {rest[j]!r} holds {cell!r}, a missing value: "
                              "fill it or drop the row")
        if _comma_number(cell):
            raise KDPipeError(f"{spec}: {path} line {lines[i]}: column {rest[j]!r} holds {cell!r}, a number written "
                              "with a comma: write numbers with '.' as the decimal point and no thousands separators")
        raise KDPipeError(f"{spec}: {path} line {lines[i]}: column {rest[j]!r} holds {cell!r}, not a number: a feature "
                          "table has only numeric columns besides label and split (an image list has a path column)")
    with np.errstate(over="ignore"):  # checked as stored: a value past float32's range (1e39) becomes inf
        at = [i for i, s in enumerate(splits) if s == want]
        x = x_all[at].astype(np.float32)
    if not np.isfinite(x).all():
        bad = int(np.argmin(np.isfinite(x).all(1)))
        raise KDPipeError(f"{spec}: {path} line {lines[at[bad]]}: {split} row {bad} holds NaN or infinite values, or "
                          "values past float32's range: fill or drop them first")
    _refuse_leaking_columns(spec, path, x_all, rest, [r[lab] for r in rows])
    return Features(x, np.asarray(labels, dtype=np.int64), classes, spec, split, str(path), columns=rest)


# ---------------------------------------------------------------- decoding image files once

def _decode_files(spec, split, folder: Path, files: list[Path], labels: list[int], classes: list[str],
                  other: tuple[Path | None, list[Path]], image_size: int | None, resize: str = "crop") -> ImageData:
    """Decode `files` once into a memory-mapped .npy under KDPIPE_DATA_CACHE (keyed by both splits'
    file listings, since the colour mode is chosen over the whole dataset, by the labels and classes,
    and by the resize: `resize` is one of RESIZE_MODES), then map it. `folder` is where the split's files
    are (the source), `other` the other split's folder and files."""
    other_folder, other_files = other
    h = hashlib.sha256(f"{resize_method(resize) if image_size else 'as-is'}\0{image_size}\0{DECODE_VERSION}\n".encode())
    _listing_hash(h, folder, files)
    if other_files:
        _listing_hash(h, other_folder, other_files)
    h.update(json.dumps(classes).encode())
    y = np.asarray(labels, dtype=np.int64)
    h.update(y.tobytes())
    key = h.hexdigest()[:24]
    if split == "train":  # before any decoding
        check_label_coverage(y, len(classes), f"{spec} {split}")
    cache_dir = _decoded_cache_dir()
    npy, sizes_npy, meta = cache_dir / f"{key}.npy", cache_dir / f"{key}.sizes.npy", cache_dir / f"{key}.json"

    def store(images, sizes, fingerprint=None):
        if image_size:
            return Photos(images, y, classes, spec, split, str(folder), fingerprint, sizes, image_size=image_size,
                          resize=resize)
        return ImageData(images, y, classes, spec, split, str(folder), fingerprint)

    recorded = _decoded_meta(meta) if npy.is_file() and sizes_npy.is_file() else None  # the .json is written last
    if recorded is not None:
        found = _open_decoded(npy, sizes_npy, len(files))
        if found is not None:
            return store(*found, recorded.get("fingerprint"))
        print(f"note: {spec} {split}: its decoded copy under {cache_dir} does not read whole (a write a crash cut "
              "short): decoded again", file=sys.stderr, flush=True)
    _remove_dead_decodes(cache_dir)

    sizes, modes, several = _scan_headers(spec, split, files)
    if several:
        print(f"note: {spec} {split}: {len(several)} image(s) hold several frames or pages (an animated GIF, PNG or "
              f"WebP, a multi-page TIFF; e.g. {several[0].name}): only the first of each is read", file=sys.stderr,
              flush=True)
    if image_size is None and len(set(map(tuple, sizes.tolist()))) > 1:
        a = int(np.flatnonzero((sizes != sizes[0]).any(axis=1))[0])
        raise KDPipeError(f"{spec}: the {split} images differ in size ({files[0].name} is {sizes[0][1]}x{sizes[0][0]}, "
                          f"{files[a].name} is {sizes[a][1]}x{sizes[a][0]}): pass --image-size S to store them "
                          "at S x S (shorter side resized to S, centre crop)")
    mode = _common_mode(spec, modes, other_files)
    grey = sum(m in GREY_MODES for m in modes)
    if mode == "RGB" and grey:
        print(f"note: {spec} {split}: the folder mixes grey and colour images; its {grey} grey images "
              f"(of {len(files)}) converted to RGB", file=sys.stderr, flush=True)
    channels = 3 if mode == "RGB" else 1
    h_out, w_out = (image_size, image_size) if image_size else (int(sizes[0][0]), int(sizes[0][1]))
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tag = _decode_tmp_tag()
        tmp, sizes_tmp, meta_tmp = (cache_dir / f"{key}{tag}{end}" for end in (".npy", ".sizes.npy", ".json"))
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), channels, h_out, w_out))
    except OSError as e:
        raise KDPipeError(f"cannot write the decoded copy of {spec} under {cache_dir}: {e.strerror}; "
                          "set KDPIPE_DATA_CACHE to a writable folder") from None
    try:
        _reserve(tmp)
        _decode_into(out, spec, split, files, mode, image_size, resize)
        out.flush()
        del out
        # each file by rename once on disk (fsync), complete or absent: a sizes.npy a kill cut short beside the
        # copy of a process that finished was read by every later run (a ValueError traceback), as was a .npy a
        # power cut left short or unwritten; the .json, written last, says the copy is whole
        fsync_path(tmp)
        _write_synced(sizes_tmp, lambda f: np.save(f, sizes))
        os.replace(sizes_tmp, sizes_npy)
        os.replace(tmp, npy)
        data = store(np.load(npy, mmap_mode="r"), sizes)
        _low_range_note(spec, split, data.images, [i for i, m in enumerate(modes) if m in SIXTEEN_BIT_MODES])
        # by rename, complete or absent: a .json the disk filled up in was left empty, and every later run failed
        # on it with a JSONDecodeError traceback
        meta_tmp.write_text(json.dumps({"folder": str(folder), "fingerprint": data.fingerprint,
                                        "num_images": len(files), "mode": mode, "image_size": image_size,
                                        "resize": resize_method(resize) if image_size else None}))
        fsync_path(meta_tmp)
        os.replace(meta_tmp, meta)
        fsync_path(cache_dir)
    except OSError as e:  # e.g. the disk filled up while decoding
        raise KDPipeError(f"cannot write the decoded copy of {spec} under {cache_dir}: {e.strerror or e}; "
                          "free space or set KDPIPE_DATA_CACHE to another folder") from None
    finally:
        for p in (tmp, sizes_tmp, meta_tmp):
            p.unlink(missing_ok=True)
    return data


def _decode_tmp_tag() -> str:
    """What names this process's temporaries in the decoded copies' folder (".tmp<pid>@<host>"), which a folder
    shared by several machines tells apart."""
    import socket
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"
    return f".tmp{os.getpid()}@{host}"


def _remove_dead_decodes(cache_dir: Path) -> None:
    """Remove the temporaries of decodes that were killed (a full-size .npy each, its space reserved), where
    their process no longer runs on this host (those of other hosts, and of older kdpipes, named .tmp<pid>,
    only where that pid does not run here either)."""
    from kdpipe.util import pid_runs
    here = _decode_tmp_tag().partition("@")[2]
    try:
        found = list(cache_dir.glob("*.tmp*"))
    except OSError:
        return
    for p in found:
        tag = re.fullmatch(r"[0-9a-f]+\.tmp(\d+)(?:@([^/]*?))?(?:\.sizes)?\.(?:npy|json)", p.name)
        if tag is None:
            continue
        pid, host = int(tag.group(1)), tag.group(2)
        if host not in (None, here) or (pid != os.getpid() and pid_runs(pid)):
            continue
        with contextlib.suppress(OSError):
            p.unlink()


def _write_synced(path: Path, fill) -> None:
    with open(path, "wb") as f:
        fill(f)
        f.flush()
        os.fsync(f.fileno())


def _open_decoded(npy: Path, sizes_npy: Path, n: int) -> tuple | None:
    """A finished decoded copy of `n` images, mapped, with each image's original size; None where it does not
    read whole (a file short or unwritten: a kill or a power cut while an older kdpipe wrote it)."""
    try:
        images, sizes = np.load(npy, mmap_mode="r"), np.load(sizes_npy)
    except (OSError, ValueError, EOFError):
        return None
    if images.ndim != 4 or len(images) != n or sizes.shape != (n, 2):
        return None
    return images, sizes


def _decoded_meta(path: Path) -> dict | None:
    """The record of a finished decoded copy, or None where there is none or it does not read (one an older
    kdpipe left half-written): the copy is then decoded again."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _reserve(path: Path) -> None:
    """Reserve the disk space of the file open_memmap made (sparse): writing through the map to a full disk
    killed the process with SIGBUS ("Bus error", no message, a temporary left behind); reserved first, a full
    disk is an OSError here, said in one line. Where the file system cannot reserve, the map is written as before."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
    finally:
        os.close(fd)


def _low_range_note(spec, split, images: np.ndarray, wide: list[int]) -> None:
    """Say when 16-bit images hold values of a narrower range (12-bit sensor data, as medical and microscope
    images often are): stored at 8 bits by v / 257, as any 16-bit image, they keep only a few grey levels."""
    if not wide:
        return
    top = max(int(images[wide[b:b + DECODE_BLOCK]].max()) for b in range(0, len(wide), DECODE_BLOCK))
    if top < 64:
        print(f"note: {spec} {split}: the {len(wide)} 16-bit image(s) use values up to about {top * 257} of 65535 "
              f"(data of fewer bits, as a 12-bit sensor's?): stored at 8 bits (v / 257) they keep {top + 1} grey "
              "levels; scale them to the full 16-bit range first to keep more", file=sys.stderr, flush=True)


def _undecodable(spec, p: Path, e: Exception) -> KDPipeError:
    return KDPipeError(f"{spec}: cannot decode {p}: {e}: the file is damaged, truncated or not an image; "
                       "replace it or move it out of the folder")


@contextlib.contextmanager
def _open_image(spec, p: Path):
    """The image `p` opened (with: closed after) from a file object, not from its path: by path, Pillow maps an
    uncompressed grey or 16-bit image's pixels (mmap) at the size it reports, which for a TIFF turned by its
    orientation (5-8) is the upright one, and the pixels came out scrambled."""
    from PIL import Image, UnidentifiedImageError
    try:
        f = open(p, "rb")
    except OSError as e:
        raise _undecodable(spec, p, e) from None
    with f:
        try:
            im = Image.open(f)
        except Image.DecompressionBombError:
            raise KDPipeError(f"{spec}: {p} has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, the most Pillow "
                              "decodes (its guard against decompression bombs): shrink it (kdpipe stores it at "
                              "--image-size anyway), e.g. to 8000 pixels a side, or move it out of the folder") from None
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            raise _undecodable(spec, p, e) from None
        with im:
            yield im


EXIF_ORIENTATION = 0x0112  # 1: upright; 2-4 mirrored or turned 180 degrees; 5-8 also transposed (90 degrees)


def _orientation(im) -> int:
    """The EXIF orientation a camera wrote (1 where there is none, or it cannot be read)."""
    try:
        o = int(im.getexif().get(EXIF_ORIENTATION, 1))
    except (OSError, SyntaxError, ValueError, TypeError):
        return 1
    return o if 1 <= o <= 8 else 1


def _scan_headers(spec, split, files: list[Path]) -> tuple[np.ndarray, list[str], list[Path]]:
    """Each file's (height, width) as viewers show it (EXIF orientation applied) and mode, from its header
    alone (no pixels decoded); and the files of several frames or pages, of which the first is read. A pass
    over every file before decoding (one seek each on a cold disk): its progress is reported like decoding's."""
    from kdpipe.util import Progress

    prog = Progress(f"reading the headers of {spec} {split}", len(files), "images", if_slow=True)
    sizes = np.empty((len(files), 2), dtype=np.int64)
    modes, several = [], []
    for i, p in enumerate(files):
        if i and i % DECODE_BLOCK == 0:
            prog.update(DECODE_BLOCK)
        with _open_image(spec, p) as im:
            w, h = im.size
            # Pillow turns a TIFF by its orientation itself, and (Pillow 11 on) gives its upright size before loading
            stored = (im.tag_v2.get(256), im.tag_v2.get(257)) if im.format == "TIFF" else (w, h)
            sizes[i] = (w, h) if _orientation(im) >= 5 and stored == (w, h) else (h, w)
            modes.append(im.mode)
            # a camera's JPEG (MPO) holds the photo first, then previews or a depth map: not worth a note
            if getattr(im, "is_animated", False) and im.format != "MPO":
                several.append(p)
        if im.mode in UNREADABLE_MODES:
            raise KDPipeError(f"{spec}: {p} has {UNREADABLE_MODES[im.mode]} pixels (mode {im.mode}), whose range "
                              "kdpipe cannot know: convert the images to 8 or 16 bits per channel")
    prog.update(len(files) - prog.done)
    return sizes, modes, several


def _common_mode(spec, modes: list[str], other_files: list[Path]) -> str:
    """RGB when any image of the folder (either split) is colour, so both splits get one shape; else L."""
    if any(m not in GREY_MODES for m in modes):
        return "RGB"
    for p in other_files:
        with _open_image(spec, p) as im:
            if im.mode not in GREY_MODES:
                return "RGB"
    return "L"


def to_storage(im, mode: str, image_size: int | None, resize: str = "crop") -> np.ndarray:
    """One PIL image as stored: (C, H, W) uint8 in `mode`, upright as viewers show it (a phone's portrait
    photo is stored in landscape with an EXIF orientation), resized and centre-cropped per RESIZE (`resize`
    "crop"; "crop:R" resizes the shorter side to R first), or resized whole to S x S per SQUASH ("squash"); with
    ":bilinear", PIL's bilinear filter instead of bicubic (ResizeMode)."""
    from PIL import Image, ImageOps

    if _orientation(im) != 1:
        im = ImageOps.exif_transpose(im)
    if im.mode == "P":
        im = im.convert("RGBA")  # a palette with transparency converts cleanly only through RGBA
    elif im.mode in SIXTEEN_BIT_MODES:  # Pillow's own conversion clips at 255: a 16-bit image turned white
        wide = np.asarray(im).astype(np.uint32)
        im = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    im = im.convert(mode)
    how = ResizeMode.parse(resize).at(image_size) if image_size else None
    filt = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[how.filter] if how else None
    if how and how.how == "squash":
        im = im.resize((image_size, image_size), filt)
    elif how:
        w, h = im.size
        s, r = image_size, how.shorter or image_size
        nw, nh = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), filt)
        top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
        im = im.crop((left, top, left + s, top + s))
    arr = np.asarray(im)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _decode_one(spec, p: Path, mode: str, image_size: int | None, shape, resize: str = "crop") -> np.ndarray:
    with _open_image(spec, p) as im:
        try:
            arr = to_storage(im, mode, image_size, resize)
        except (OSError, SyntaxError) as e:
            raise _undecodable(spec, p, e) from None
    if arr.shape != shape:
        raise KDPipeError(f"{spec}: {p} is {arr.shape[2]}x{arr.shape[1]}, the others {shape[2]}x{shape[1]}: "
                          "pass --image-size S")
    return arr


def _decode_into(out: np.ndarray, spec, split, files: list[Path], mode: str, image_size: int | None,
                 resize: str = "crop") -> None:
    """Decode every file into its row of `out` (a memory map), a block at a time: Pillow releases the
    GIL while it decodes and resizes, so a few threads keep several cores busy; rows stay in order."""
    from concurrent.futures import ThreadPoolExecutor

    from kdpipe.util import Progress

    prog = Progress(f"decoding {spec} {split}", len(files), "images")
    shape = out.shape[1:]
    workers = max(1, min(DECODE_THREADS, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        for lo in range(0, len(files), DECODE_BLOCK):
            block = files[lo:lo + DECODE_BLOCK]
            for j, arr in enumerate(pool.map(lambda p: _decode_one(spec, p, mode, image_size, shape, resize), block)):
                out[lo + j] = arr
            prog.update(len(block))


# ---------------------------------------------------------------- the sources --data takes (in --help order)

register_source(Source("fashion-mnist", "fashion-mnist", lambda spec, path, split, root, size: _load_idx_dataset(
    spec, split, root, FASHION_MNIST_CLASSES, default_root=DEBIAN_FASHION_MNIST,
    how_to_get="install Debian's package: apt-get install dataset-fashion-mnist, or pass --data-root DIR "
               "holding the four IDX files (or torchvision's FashionMNIST folder)", tv_folder="FashionMNIST")))
register_source(Source("mnist", "mnist", lambda spec, path, split, root, size: _load_idx_dataset(
    spec, split, root, MNIST_CLASSES, default_root=None,
    how_to_get="pass --data-root DIR holding the four MNIST IDX files (or torchvision's MNIST folder)",
    tv_folder="MNIST")))
for _name in ("cifar10", "cifar100"):
    register_source(Source(_name, _name, lambda spec, path, split, root, size, _k=_name: _load_cifar(
        spec, _k, split, root)))
register_source(Source("imagefolder", "imagefolder:PATH",
                       lambda spec, path, split, root, size, resize="crop": _load_imagefolder(
                           spec, path, split, size, resize), path=True, image_files=True, val=True))
register_source(Source("files", "files:PATH", lambda spec, path, split, root, size, resize="crop": _load_files(
    spec, path, split, size, resize), path=True, image_files=True, val=True))
register_source(Source("csv", "csv:FILE", lambda spec, path, split, root, size, resize="crop": _load_csv(
    spec, path, split, size, resize), path=True, image_files=True, val=True, file=True))
register_source(Source("npz", "npz:PATH", lambda spec, path, split, root, size: _load_npz(spec, path, split),
                       path=True, val=True, file=True))
