"""Small shared helpers: devices, seeding, hashing files, progress lines."""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
    if dev.type not in ("cpu", "cuda"):  # mps, xla, meta...: torch names them, kdpipe runs on none of them
        raise KDPipeError(f"device {name!r} is not one kdpipe runs on: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KDPipeError(f"device {name} asked for, but CUDA is not available here: use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise KDPipeError(f"device {name} asked for, but this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1}): "
                          "name one of them")
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


def rng_states(device: torch.device) -> list[torch.Tensor]:
    """The states of the global generators a step on `device` draws from: the CPU's, and on CUDA the device's own
    (its seed and offset, kept on the host: reading it does not wait for the device)."""
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def set_rng_states(device: torch.device, states: list[torch.Tensor]) -> None:
    """Set the global generators to `states` (rng_states'; a CPU state alone leaves the device's as it is)."""
    torch.set_rng_state(states[0])
    if device.type == "cuda" and len(states) > 1:
        torch.cuda.set_rng_state(states[1], device)


def human_duration(seconds: float) -> str:
    """'42s', '4m 30s', '2h 05m'."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units)."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


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


def try_flock(fd: int, shared: bool = False) -> bool | None:
    """Take `fd`'s flock (exclusive, or shared) without waiting: True, taken; False, another open file holds a
    conflicting one (a live process); None, this file system (or platform) has no locks (ENOLCK on an NFS mount
    without its lock service, EOPNOTSUPP, no fcntl)."""
    import errno
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        return False if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
    return True


def pid_runs(pid: int) -> bool:
    """Whether process `pid` of this host is running (a zombie, killed but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: a killed process that its parent has not reaped yet (a zombie) trains nothing
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Progress:
    """Progress lines on stderr, at most one every `every` seconds, plus the last one (with `if_slow`, only where
    an earlier one was printed: a pass that is over before `every` seconds says nothing)."""

    def __init__(self, what: str, total: int, unit: str = "images", every: float | None = None, stream=None,
                 if_slow: bool = False):
        self.what, self.total, self.unit, self.if_slow, self.printed = what, total, unit, if_slow, False
        self.stream = stream or sys.stderr
        if every is None:  # a terminal gets frequent lines; a log (make, CI) fewer
            every = 2.0 if getattr(self.stream, "isatty", lambda: False)() else 10.0
        self.every = every
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, n: int, extra: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every or (self.done >= self.total and (self.printed or not self.if_slow)):
            self.last, self.printed = now, True
            el = now - self.start
            rate = self.done / el if el > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            pct = 100.0 * self.done / self.total if self.total else 100.0
            print(f"  {self.what}: {self.done}/{self.total} {self.unit} ({pct:5.1f}%), "
                  f"{rate:,.0f} {self.unit}/s, {el:.0f}s elapsed, ~{eta:.0f}s left{extra}",
                  file=self.stream, flush=True)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """A CUDA image batch (B, C, H, W) in channels-last layout (faster convolutions); anything else,
    e.g. a batch of feature vectors (B, D), or any CPU batch, as it is."""
    if x.dim() == 4 and x.device.type == "cuda":
        return x.contiguous(memory_format=torch.channels_last)
    return x


# HDF5_USE_FILE_LOCKING values with which HDF5 locks a file even when h5py passes locking=False.
HDF5_LOCKING_VALUES = ("TRUE", "BEST_EFFORT", "1")


def hdf5_open_error(path, e: OSError) -> KDPipeError:
    """The one-line error for an HDF5 file that would not open. Where the user's HDF5_USE_FILE_LOCKING
    made HDF5 lock the file and the lock failed (another process holds one, or the file system has no
    locks), it says to unset the variable, instead of calling a sound file damaged."""
    locking = os.environ.get("HDF5_USE_FILE_LOCKING", "").strip().upper()
    if locking in HDF5_LOCKING_VALUES and "lock" in str(e).lower():
        return KDPipeError(f"cannot open {path}: HDF5_USE_FILE_LOCKING={locking} makes HDF5 lock it, and the lock "
                           "failed (another process holds one, or the file system has none); unset "
                           "HDF5_USE_FILE_LOCKING (kdpipe opens caches read-only and needs no locks)")
    return KDPipeError(f"cannot open {path} as HDF5: {e} (truncated or not a kdpipe shard)")


TORCHSCRIPT_FAILED = "The following operation failed in the TorchScript interpreter"


def error_line(e: BaseException) -> str:
    """One line for an error raised inside the user's model: its message's first line; for an error raised
    inside TorchScript, whose message opens with the interpreter's traceback, the error at its end (e.g.
    "RuntimeError: ... expected input[2, 1, 28, 28] to have 3 channels, but got 1 channels instead")."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    line = (lines[-1] if lines[0].startswith(TORCHSCRIPT_FAILED) else lines[0])[:200]
    return line + _fixed_size_hint(line)


# What models of one input size say to inputs of another (timm's, torchvision's vision transformers).
FIXED_SIZE = re.compile(r"doesn't match model \((\d+)\)|Wrong image (?:height|width)! Expected (\d+)")


def _fixed_size_hint(line: str) -> str:
    """What to do when a model takes inputs of one size only, from its error line ("" if it is not that)."""
    found = FIXED_SIZE.search(line)
    if not found:
        return ""
    s = found.group(1) or found.group(2)
    return (f" (the model takes {s} x {s} inputs only: store photos at that size, --image-size {s}, or make views "
            f"of it, --policy resized-crop:{s}; students then train on {s} x {s} views too)")

# ---------------------------------------------------------------- environment variables

MAX_THREADS = 1024  # more than any one machine's CPU threads


def _positive_int(raw: str) -> int:
    try:
        v = int(raw)
    except ValueError:
        raise ValueError("is not a whole number") from None
    if v < 1:
        raise ValueError("must be at least 1")
    if v > MAX_THREADS:  # torch took 99999 and OpenMP then crashed the process (a segfault, not an error)
        raise ValueError(f"must be at most {MAX_THREADS}")
    return v


def _flag(raw: str) -> bool:
    if raw not in ("0", "1"):
        raise ValueError("must be 0 or 1")
    return raw == "1"


def _seconds(raw: str) -> float:
    try:
        v = float(raw)
    except ValueError:
        raise ValueError("is not a number of seconds") from None
    if not 0 < v < float("inf"):
        raise ValueError("must be a number of seconds > 0")
    return v


def _folder(raw: str) -> Path:
    try:
        p = Path(raw).expanduser()
    except RuntimeError:  # ~name of a user this machine does not know
        raise ValueError("names the home folder of an unknown user") from None
    if p.exists() and not p.is_dir():
        raise ValueError("is a file, not a folder")
    return p


@dataclass(frozen=True)
class EnvVar:
    """One KDPIPE_* environment variable: what it means (for errors and the README) and how its text
    is parsed (a parser raises ValueError saying what is wrong). Unset or empty means `default`."""

    name: str
    meaning: str
    parse: Callable[[str], object]
    default: str | None


# Every KDPIPE_* variable that kdpipe, its tests or its benchmarks read, and nowhere else: read them
# with env(name). The CLI checks them all before any command runs (env_threads), so a bad value is a
# one-line error at once, not a traceback in the middle of a run.
ENV_VARS = {v.name: v for v in (
    EnvVar("KDPIPE_THREADS", "torch's CPU threads (default: torch's own choice)", _positive_int, None),
    EnvVar("KDPIPE_IMAGES_ON_HOST", "1 keeps images in host memory and copies each batch to the GPU "
           "(default 0: on the GPU when they take at most half its free memory)", _flag, "0"),
    EnvVar("KDPIPE_DIST_TIMEOUT", "seconds that any torchrun collective may wait (default 1800)", _seconds, "1800"),
    EnvVar("KDPIPE_DATA_CACHE", "folder of decoded ImageFolder copies (default ~/.cache/kdpipe/decoded)", _folder,
           "~/.cache/kdpipe/decoded"),
    EnvVar("KDPIPE_TEST_THREADS", "torch's CPU threads in the tests (default 1)", _positive_int, "1"),
    EnvVar("KDPIPE_BENCH_COMMIT", "the commit bench/ records where the copy has no git history", str, None),
)}


def env(name: str):
    """The parsed value of the KDPIPE_* variable `name` (see ENV_VARS); a bad value is a KDPipeError."""
    var = ENV_VARS[name]
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None if var.default is None else var.parse(var.default)
    try:
        return var.parse(raw)
    except ValueError as e:
        raise KDPipeError(f"{name}={raw!r} {e} ({var.meaning}): fix it or unset it") from None


def env_threads() -> None:
    """Check every KDPIPE_* variable (the CLI calls this before any command), then respect
    KDPIPE_THREADS for CPU runs."""
    for name in ENV_VARS:
        env(name)
    n = env("KDPIPE_THREADS")
    if n is not None:
        torch.set_num_threads(n)


# Uint8 images go to the GPU when they take at most this share of its free memory; else they stay in
# host memory (a memory map for decoded ImageFolders) and each batch is gathered there and copied over.
# On the CPU, a memory map is copied into RAM only when it takes at most this share of the available memory.
DEVICE_IMAGES_MAX_FRACTION = 0.5
HOST_IMAGES_ENV = "KDPIPE_IMAGES_ON_HOST"  # "1": always keep images in host memory


class HostImages:
    """A split's samples (uint8 images, or float32 feature vectors) left in host memory (possibly
    memory-mapped), served in batches on `device`.

    Indexing mirrors a tensor's: ``store[idx]`` (a tensor of sample indices, on any device) or
    ``store[i:j]`` gives a tensor of the array's dtype on `device`; ``len(store)`` and ``store.device`` (the training
    device) work as for the tensor that would otherwise hold them.
    """

    def __init__(self, images, device):
        import numpy as np
        self.array = np.asarray(images)
        self.device = torch.device(device)
        self.shape = tuple(self.array.shape)

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, idx) -> torch.Tensor:
        import numpy as np
        if isinstance(idx, slice):
            batch = np.array(self.array[idx])
        else:
            rows = torch.as_tensor(idx).cpu().numpy()
            order = np.argsort(rows, kind="stable")  # read the map in file order, then put rows back
            batch = np.empty((len(rows),) + self.shape[1:], dtype=self.array.dtype)
            batch[order] = self.array[rows[order]]
        return torch.from_numpy(batch).to(self.device)


def images_tensor(images, device):
    """A dataset's samples (uint8 images or float32 features, any rank) for batched replay on `device`:
    a tensor there when they fit (read-only arrays are copied, not aliased), else a HostImages that
    copies each batch over. On the CPU, a read-only array (the memory map of decoded photos) larger than
    DEVICE_IMAGES_MAX_FRACTION of the available memory stays mapped: its copy would not fit beside it."""
    import numpy as np
    device = torch.device(device)
    arr = np.asarray(images)
    on_host = env(HOST_IMAGES_ENV)
    if device.type == "cuda" and not on_host:
        free, _ = torch.cuda.mem_get_info(device)
        on_host = arr.nbytes > DEVICE_IMAGES_MAX_FRACTION * free
        if on_host:
            print(f"note: the samples ({arr.nbytes / 2**30:.1f} GiB) take more than "
                  f"{DEVICE_IMAGES_MAX_FRACTION:.0%} of {device}'s free memory ({free / 2**30:.1f} GiB): they stay in "
                  "host memory and each batch is copied over", file=sys.stderr, flush=True)
    if device.type == "cpu" and not on_host and not arr.flags.writeable:
        # a memory map (decoded photos): copying it would hold every sample in RAM at once
        avail = host_available_bytes()
        on_host = avail is not None and arr.nbytes > DEVICE_IMAGES_MAX_FRACTION * avail
        if on_host:
            print(f"note: the samples ({arr.nbytes / 2**30:.1f} GiB) take more than "
                  f"{DEVICE_IMAGES_MAX_FRACTION:.0%} of the available memory ({avail / 2**30:.1f} GiB): they stay "
                  "memory-mapped and each batch is read from the map", file=sys.stderr, flush=True)
    if on_host:
        return HostImages(arr, device)
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, order="C")
    return torch.from_numpy(arr).to(device)


def host_available_bytes() -> int | None:
    """Memory the system can still give this process (Linux's MemAvailable: free memory and reclaimable
    caches), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
