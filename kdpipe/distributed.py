"""torch.distributed for kdpipe: one small context object, set up from torchrun's environment.

kdpipe runs on several processes only when launched by torchrun (``torchrun --nproc_per_node N -m
kdpipe ...``), which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. There is no
process orchestration here: this module only joins the group torchrun made and offers the few
operations the two stages need.

- ``Dist``: rank, world size, device; object collectives (all_gather, gather, broadcast) on a gloo
  group (CPU, whatever the main backend), ``all_mean`` for tensors on the training device, ``wrap``
  (DistributedDataParallel) and ``close``.
- ``Dist.together(what)``: a with-block that every rank enters; on leaving it the ranks exchange
  whether their part succeeded, and if any rank failed every other rank raises a KDPipeError naming
  it, instead of waiting forever at the next collective. Do not run collectives inside the block.
- ``SINGLE``: the one-process context (every operation is a no-op), so library code has one path.

A rank that dies outright (killed, out of memory) is handled by torchrun, which stops the other
workers; a peer blocked in a gloo collective also fails when the dead rank's connection closes.
``KDPIPE_DIST_TIMEOUT`` (seconds, default 1800) bounds every collective in any case.
"""

from __future__ import annotations

import datetime
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from kdpipe import KDPipeError
from kdpipe.util import env, error_line

TIMEOUT_ENV = "KDPIPE_DIST_TIMEOUT"


class _NullStream:
    """Where progress lines of ranks other than 0 go."""

    def write(self, s):
        return len(s)

    def flush(self):
        pass


@dataclass
class Dist:
    """Where this process stands in a torchrun job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    backend: str | None = None
    _coord: object = field(default=None, repr=False)  # gloo group for objects and statuses
    _owns_group: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def progress_stream(self):
        """None (stderr) on rank 0; a sink on the other ranks, so progress is printed once."""
        return None if self.is_main else _NullStream()

    def log(self, log):
        """`log` on rank 0, a no-op elsewhere."""
        return log if self.is_main else (lambda *args, **kwargs: None)

    # ---------------------------------------------------------------- object collectives

    def all_gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as td
        out = [None] * self.world
        td.all_gather_object(out, obj, group=self._coord)
        return out

    def gather(self, obj) -> list | None:
        """Every rank's `obj` in rank order on rank 0; None on the other ranks."""
        if self.world == 1:
            return [obj]
        import torch.distributed as td
        out = [None] * self.world if self.is_main else None
        td.gather_object(obj, out, dst=0, group=self._coord)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as td
        box = [obj if self.is_main else None]
        td.broadcast_object_list(box, src=0, group=self._coord)
        return box[0]

    @contextmanager
    def together(self, what: str):
        """A step every rank takes; if it fails on any rank, it fails on all (see the module doc)."""
        if self.world == 1:
            yield
            return
        try:
            yield
        except Exception as e:  # KeyboardInterrupt and SystemExit pass: torchrun stops the others
            self._agree(what, e)
            raise
        self._agree(what, None)

    def _agree(self, what: str, error: BaseException | None) -> None:
        msg = None
        if error is not None:
            # one line each: another exception's message may span lines (TorchScript's holds its traceback) and
            # run long (CUDA's out-of-memory advice), and every healthy rank joins them into one KDPipeError
            msg = str(error) if isinstance(error, KDPipeError) else f"{type(error).__name__}: {error_line(error)}"
            msg = msg or type(error).__name__
        failed = [(r, m) for r, m in enumerate(self.all_gather(msg)) if m is not None]
        if failed and error is None:
            raise KDPipeError(f"{what} failed on " + "; ".join(f"rank {r}: {m}" for r, m in failed))

    # ---------------------------------------------------------------- training

    def all_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Average a tensor over ranks, in place (on the default group, the tensor's device)."""
        if self.world > 1:
            import torch.distributed as td
            td.all_reduce(t, op=td.ReduceOp.SUM)
            t /= self.world
        return t

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel around `model` (already on this rank's device); `model` itself if single."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel
        # A convolution over one input channel gets its weight gradient with strides that differ from
        # the weight's only along that size-1 dimension (the same memory layout); DDP warns about it.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel
        return model.module if isinstance(model, DistributedDataParallel) else model

    def close(self) -> None:
        """Leave the process group (if this object made it)."""
        if self._owns_group:
            import torch.distributed as td
            if td.is_initialized():
                td.destroy_process_group()
            self._owns_group = False


SINGLE = Dist()


def timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=env(TIMEOUT_ENV))


def _torchrun_int(name: str, default: str) -> int:
    """An integer torchrun sets (WORLD_SIZE, LOCAL_RANK); a bad value is one line, not a traceback."""
    raw = os.environ.get(name, default)
    try:
        return int(raw)
    except ValueError:
        raise KDPipeError(f"{name}={raw!r} is not an integer (torchrun sets it; unset it outside torchrun)") from None


def world_size_from_env() -> int:
    return _torchrun_int("WORLD_SIZE", "1")


def from_env(device: torch.device) -> Dist:
    """Join torchrun's process group if WORLD_SIZE > 1, else the single-process context.

    `device` is what --device resolved to: with CUDA each rank takes cuda:LOCAL_RANK (or cuda:0 where
    each process sees one GPU) and the NCCL backend; on the CPU, gloo.
    """
    world = world_size_from_env()
    if world <= 1:
        return Dist(device=device)
    import torch.distributed as td
    local = _torchrun_int("LOCAL_RANK", "0")
    if device.type == "cuda":
        if device.index is not None:
            raise KDPipeError(f"--device {device} under torchrun: each rank uses cuda:LOCAL_RANK; "
                              "pass --device cuda (or auto)")
        count = torch.cuda.device_count()
        if local < count:
            device = torch.device("cuda", local)
        elif count == 1:
            device = torch.device("cuda", 0)
        else:
            raise KDPipeError(f"LOCAL_RANK {local} but this process sees {count} GPU(s): run at most "
                              f"{count} processes per node (--nproc_per_node)")
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise KDPipeError(f"distributed runs support CUDA (NCCL) and CPU (gloo), not {device.type}")
    owns = False
    if not td.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        td.init_process_group(backend, timeout=timeout(), **kwargs)
        owns = True
    backend = td.get_backend()
    coord = None if backend == "gloo" else td.new_group(backend="gloo", timeout=timeout())
    return Dist(rank=td.get_rank(), world=td.get_world_size(), local_rank=local, device=device,
                backend=backend, _coord=coord, _owns_group=owns)
