"""Small shared helpers: devices, seeding, hashing files, progress lines."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import torch

from kdpipe import KDPipeError


def pick_device(name: str | None) -> torch.device:
    """'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise KDPipeError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KDPipeError(f"device {name} asked for, but CUDA is not available here: use --device cpu")
    return dev


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def seeded_generator(*seed_parts: int) -> torch.Generator:
    """A CPU generator whose stream depends only on the given integers."""
    g = torch.Generator()
    s = 0
    for p in seed_parts:
        s = (s * 1_000_003 + int(p) + 1) % (2 ** 63 - 1)
    g.manual_seed(s)
    return g


def ensure_out_dir(path, what: str) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise KDPipeError(f"{what} {p} is a file, not a directory: choose another path")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KDPipeError(f"cannot create {what} {p}: {e.strerror}") from None
    return p


def ensure_parent(path, what: str) -> Path:
    p = Path(path)
    if p.is_dir():
        raise KDPipeError(f"{what} {p} is a directory: give a file name")
    ensure_out_dir(p.parent if str(p.parent) else Path("."), f"folder of {what}")
    return p


class Progress:
    """Progress lines on stderr, at most one every `every` seconds, plus the last one."""

    def __init__(self, what: str, total: int, unit: str = "images", every: float | None = None, stream=None):
        self.what, self.total, self.unit = what, total, unit
        self.stream = stream or sys.stderr
        if every is None:  # a terminal gets frequent lines; a log (make, CI) fewer
            every = 2.0 if getattr(self.stream, "isatty", lambda: False)() else 10.0
        self.every = every
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, n: int, extra: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            el = now - self.start
            rate = self.done / el if el > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            pct = 100.0 * self.done / self.total if self.total else 100.0
            print(f"  {self.what}: {self.done}/{self.total} {self.unit} ({pct:5.1f}%), "
                  f"{rate:,.0f} {self.unit}/s, {el:.0f}s elapsed, ~{eta:.0f}s left{extra}",
                  file=self.stream, flush=True)


def env_threads() -> None:
    """Respect KDPIPE_THREADS for CPU runs (defaults to torch's own choice)."""
    n = os.environ.get("KDPIPE_THREADS")
    if n:
        torch.set_num_threads(int(n))


def images_tensor(images, device) -> torch.Tensor:
    """A dataset's uint8 images as a tensor on `device` (read-only arrays are copied, not aliased)."""
    import numpy as np
    arr = np.asarray(images)
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, order="C")
    return torch.from_numpy(arr).to(device)
