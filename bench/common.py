"""What every benchmark shares: the header (command, machine, torch, date, commit), figures and ratios,
data, throwaway teachers, timing on the device, RSS sampling.

Benchmarks print what they measured and lines ``ratio <name> <value>``; they assert nothing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
DEFAULT_FASHION = SHARED_DATA / "fashion_mnist.npz"
DEFAULT_CIFAR = SHARED_DATA / "cifar10-imagefolder.tar.xz"


# ---------------------------------------------------------------- output

def emit(line: str = "") -> None:
    print(line, flush=True)


def figure(name: str, value, unit: str = "") -> None:
    v = f"{value:,.1f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)
    emit(f"figure {name} {v}{' ' + unit if unit else ''}")


def ratio(name: str, value: float) -> None:
    emit(f"ratio {name} {value:.3f}")


def machine() -> str:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"GPU {p.name} ({p.total_memory / 2**30:.0f} GiB), {os.cpu_count()} CPU cores"
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def git_commit() -> str:
    """HEAD (and whether the tree differs from it); KDPIPE_BENCH_COMMIT where the copy has no git history
    (a device machine gets the working tree without .git)."""
    from kdpipe.util import env
    given = env("KDPIPE_BENCH_COMMIT")
    try:
        head = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
        sha = head.stdout.strip()
        if head.returncode != 0 or len(sha) != 40:
            return f"{given} (given by KDPIPE_BENCH_COMMIT)" if given else "unknown (no git history here; set KDPIPE_BENCH_COMMIT)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"{given} (given by KDPIPE_BENCH_COMMIT)" if given else "unknown (not a git checkout)"


def header(title: str, argv=None) -> None:
    argv = sys.argv if argv is None else argv
    emit(f"== {title}")
    emit(f"command: cd {REPO} && {shlex.join([Path(sys.executable).name] + list(argv))}")
    emit(f"machine: {machine()}")
    emit(f"torch {torch.__version__}, python {platform.python_version()}, "
         f"date {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, "
         f"commit {git_commit()}")


def common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--quick", action="store_true", help="CPU version with small sizes (seconds).")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda.")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is steadier on a shared machine).")
    p.add_argument("--cifar", default=str(DEFAULT_CIFAR),
                   help="CIFAR-10 for GPU figures: the ImageFolder .tar.xz, its extracted folder, or npz:PATH.")
    p.add_argument("--fashion", default=str(DEFAULT_FASHION), help="Fashion-MNIST npz for CPU figures.")
    p.add_argument("--work", default=None, help="Scratch folder (default: a temporary one, removed after).")
    return p


def setup(args) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    else:
        dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return dev


def workdir(args):
    """A context manager giving a scratch Path."""
    if args.work:
        p = Path(args.work)
        p.mkdir(parents=True, exist_ok=True)

        class _Keep:
            def __enter__(self):
                return p

            def __exit__(self, *a):
                return False
        return _Keep()

    class _Tmp:
        def __enter__(self):
            self.t = tempfile.TemporaryDirectory(prefix="kdpipe-bench-")
            return Path(self.t.name)

        def __exit__(self, *a):
            self.t.cleanup()
            return False
    return _Tmp()


# ---------------------------------------------------------------- data

def load_split(spec_or_path: str, split: str = "train", cache_root: Path | None = None):
    """An ImageData from an npz, an ImageFolder (folder or .tar.xz, extracted once under cache_root)."""
    from kdpipe.data import load_dataset
    s = str(spec_or_path)
    if s.startswith(("npz:", "imagefolder:")) or s in ("fashion-mnist", "mnist"):
        return load_dataset(s, split)
    p = Path(s)
    if p.suffix == ".npz":
        return load_dataset(f"npz:{p}", split)
    if p.is_file() and (p.name.endswith(".tar.xz") or p.name.endswith(".tar") or p.name.endswith(".tar.gz")):
        root = Path(cache_root or tempfile.gettempdir()) / ("extracted-" + p.name.split(".")[0])
        if not (root / ".done").is_file():
            root.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            with tarfile.open(p) as tf:
                tf.extractall(root, filter="data") if hasattr(tarfile, "data_filter") else tf.extractall(root)
            (root / ".done").write_text("ok")
            emit(f"extracted {p} in {time.perf_counter() - t0:.1f}s")
        p = root
    if p.is_dir():
        sub = [d for d in p.iterdir() if d.is_dir() and (d / "train").is_dir()]
        if not (p / "train").is_dir() and len(sub) == 1:
            p = sub[0]
        return load_dataset(f"imagefolder:{p}", split)
    raise SystemExit(f"cannot find data at {s}")


def random_images(n: int, shape=(3, 32, 32), classes: int = 10, seed: int = 0):
    """An ImageData of random uint8 pixels (for throughput only)."""
    from kdpipe.data import ImageData
    g = np.random.default_rng(seed)
    return ImageData(g.integers(0, 256, size=(n, *shape), dtype=np.uint8),
                     g.integers(0, classes, size=n).astype(np.int64), [str(i) for i in range(classes)],
                     "random", "train", "random")


def save_random_teacher(path: Path, arch: str, data, policy, seed: int = 0) -> Path:
    """A kdpipe checkpoint of an untrained teacher (speed does not depend on the weights)."""
    from kdpipe.checkpoint import save_checkpoint
    from kdpipe.models import create_model
    torch.manual_seed(seed)
    shape = policy.output_shape(data.image_shape)
    model = create_model(arch, data.num_classes, shape)
    mean, std = data.channel_stats()
    save_checkpoint(path, model, arch=arch, num_classes=data.num_classes, image_shape=shape, mean=mean, std=std,
                    class_names=data.class_names, dataset=data.identity(), test_top1=None,
                    extra={"role": "teacher", "note": "untrained (benchmark)"})
    return path


def quiet(*_a, **_k) -> None:
    pass


def checkout_sides(compare: Path | None) -> dict[str, Path]:
    """The checkouts whose kdpipe a before/after benchmark runs: this one, and with --compare DIR (an older
    checkout) {"other": DIR} first, so that the sides alternate."""
    return {"this": REPO} if compare is None else {"other": Path(compare).resolve(), "this": REPO}


def run_in_checkout(code_dir: Path, code: str, *args) -> str:
    """`python -c CODE ARGS` with the kdpipe of `code_dir` on one thread; its stdout (its stderr, and exit, if it
    fails). It runs from the temporary folder: `-c` puts the working folder first on sys.path, so run from a
    checkout it would import that checkout's kdpipe, whatever PYTHONPATH says."""
    env = {**os.environ, "PYTHONPATH": str(code_dir), "KDPIPE_THREADS": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                       cwd=tempfile.gettempdir())
    if r.returncode:
        sys.exit(r.stderr)
    return r.stdout.strip()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


class Timer:
    def __init__(self, dev):
        self.dev = dev

    def __enter__(self):
        sync(self.dev)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *a):
        sync(self.dev)
        self.s = time.perf_counter() - self.t0
        return False


def median(xs):
    return float(np.median(np.asarray(xs, dtype=np.float64)))


# ---------------------------------------------------------------- memory

def vm_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


class RssSampler:
    """Samples VmRSS (MB) every `every` seconds on a thread while active."""

    def __init__(self, every: float = 0.05):
        self.every = every
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()

    def __enter__(self):
        self.t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self.t0, vm_rss_mb()))
            self._stop.wait(self.every)

    def __exit__(self, *a):
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter() - self.t0, vm_rss_mb()))
        return False


# ---------------------------------------------------------------- data and caches for the benchmarks

def subset_npz(train, test, n: int, n_test: int, path: Path):
    """Write the first n train and n_test test samples to an npz; return (train, test) loaded from it, so that
    the library can load the same data again by its spec (npz:PATH)."""
    from kdpipe.data import load_dataset
    path = Path(path)
    if not path.is_file():
        np.savez(path, x_train=np.asarray(train.images[:n]), y_train=train.labels[:n],
                 x_test=np.asarray(test.images[:n_test]), y_test=test.labels[:n_test],
                 class_names=np.array(train.class_names))
    return load_dataset(f"npz:{path}", "train"), load_dataset(f"npz:{path}", "test")


def bench_data(args, dev, work: Path, n_quick: int = 4096, n_cpu: int = 60000, n_test: int = 1000):
    """(train, test, kind): CIFAR-10 on CUDA (from --cifar), Fashion-MNIST on CPU (a subset in --quick)."""
    if dev.type == "cuda":
        train = load_split(args.cifar, "train", work)
        test = load_split(args.cifar, "test", work)
        return train, test, "CIFAR-10"
    train = load_split(args.fashion, "train")
    test = load_split(args.fashion, "test")
    n = n_quick if args.quick else min(n_cpu, len(train))
    tr, te = subset_npz(train, test, n, min(n_test, len(test)), work / f"fashion-{n}.npz")
    return tr, te, f"Fashion-MNIST ({n} train samples)"


def dump_cache(out: Path, data, test, policy, teacher_path: Path, views: int, dev, *, batch: int = 512,
               dtype: str = "float16", amp: bool = False, shard_rows: int = 65536):
    """Run stage one through the library; returns (result dict, wall seconds of the whole call)."""
    from kdpipe.checkpoint import load_teacher
    from kdpipe.teacher import dump_logits
    teacher = load_teacher(teacher_path)
    with Timer(dev) as tm:
        res = dump_logits(teacher, data, test, out, policy=policy, views=views, logits_dtype=dtype,
                          batch_size=batch, shard_rows=shard_rows, device=dev, amp=amp, log=quiet,
                          force=True)  # benchmarks time untrained teachers too (the probe would stop them)
    return res, tm.s


class EpochClock:
    """A log callback for train_pass that timestamps the end of every epoch (train_pass logs once per
    epoch, after a device sync), so steady-state throughput can be read from the later epochs."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.marks: list[float] = []

    def __call__(self, line="", *_a, **_k):
        if " epoch " in str(line):
            self.marks.append(time.perf_counter())

    def epoch_seconds(self) -> list[float]:
        out, prev = [], self.t0
        for m in self.marks:
            out.append(m - prev)
            prev = m
        return out
