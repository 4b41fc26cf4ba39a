"""kdpipe checkpoints (teachers and students alike) and loading teachers of other kinds.

A kdpipe checkpoint is a torch file holding plain data only (loads with weights_only=True):
{"kdpipe_checkpoint": 1, "arch", "num_classes", "image_shape", "mean", "std", "class_names",
 "dataset", "test_top1", "state_dict", ...}.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from kdpipe import KDPipeError
from kdpipe.cache.writer import atomic_write_bytes
from kdpipe.models import count_parameters, create_model
from kdpipe.util import file_sha256

CHECKPOINT_VERSION = 1


def save_checkpoint(path, model: nn.Module, *, arch: str, num_classes: int, image_shape, mean, std,
                    class_names, dataset: dict, test_top1: float | None, extra: dict | None = None) -> int:
    """Write atomically; returns the file's size in bytes."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    obj = {"kdpipe_checkpoint": CHECKPOINT_VERSION, "arch": arch, "num_classes": int(num_classes),
           "image_shape": [int(s) for s in image_shape], "mean": [float(m) for m in mean],
           "std": [float(s) for s in std], "class_names": list(class_names), "dataset": dataset,
           "test_top1": test_top1, "parameters": count_parameters(model), "state_dict": state}
    obj.update(extra or {})
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path).stat().st_size


@dataclass
class LoadedModel:
    module: nn.Module
    arch: str
    kind: str  # "kdpipe", "torchscript" or "state_dict"
    fingerprint: str  # sha256 of the file(s)
    num_classes: int | None
    image_shape: tuple | None
    mean: list | None
    std: list | None
    file: str
    info: dict

    def identity(self) -> dict:
        return {"arch": self.arch, "kind": self.kind, "fingerprint": self.fingerprint,
                "file": self.file, "num_classes": self.num_classes}


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_checkpoint_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise KDPipeError(f"no such file {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise KDPipeError(f"cannot load {path}: {str(e).splitlines()[0][:200]}") from None
    return obj


def load_teacher(path=None, *, arch=None, weights=None, image_shape=None, num_classes=None) -> LoadedModel:
    """A kdpipe checkpoint or TorchScript file (`path`), or an architecture with a state dict."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise KDPipeError(f"teacher file {path} does not exist")
        fp = file_sha256(path)
        if _is_torchscript(path):
            try:
                with warnings.catch_warnings():  # torch's deprecation notice would break the one-line errors
                    warnings.simplefilter("ignore", FutureWarning)
                    mod = torch.jit.load(str(path), map_location="cpu")
            except Exception as e:
                raise KDPipeError(f"cannot load TorchScript teacher {path}: {str(e).splitlines()[0][:200]}") from None
            return LoadedModel(mod.eval(), "torchscript", "torchscript", fp, None, None, None, None, str(path), {})
        obj = load_checkpoint_file(path)
        if not isinstance(obj, dict) or obj.get("kdpipe_checkpoint") != CHECKPOINT_VERSION:
            raise KDPipeError(f"{path} is neither a kdpipe checkpoint nor a TorchScript file; for a bare "
                              "state dict use --teacher-arch NAME --teacher-weights FILE")
        model = create_model(obj["arch"], obj["num_classes"], tuple(obj["image_shape"]))
        _load_state(model, obj["state_dict"], path)
        info = {k: v for k, v in obj.items() if k != "state_dict"}
        return LoadedModel(model.eval(), obj["arch"], "kdpipe", fp, obj["num_classes"],
                           tuple(obj["image_shape"]), obj["mean"], obj["std"], str(path), info)
    if arch is None or weights is None:
        raise KDPipeError("give a teacher: --teacher FILE, or --teacher-arch NAME with --teacher-weights FILE")
    weights = Path(weights)
    obj = load_checkpoint_file(weights)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise KDPipeError(f"{weights} does not hold a state dict")
    model = create_model(arch, num_classes, tuple(image_shape))
    _load_state(model, obj, weights)
    return LoadedModel(model.eval(), arch, "state_dict", file_sha256(weights), num_classes,
                       tuple(image_shape), None, None, str(weights), {})


def _load_state(model: nn.Module, state: dict, path) -> None:
    target = model
    if isinstance(model, nn.Sequential) and len(model) == 2 and not any(k.startswith("1.") for k in state):
        target = model[1]  # a torchvision model wrapped for grey images; weights are for the bare model
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()
        raise KDPipeError(f"the weights in {path} do not fit the architecture: "
                          f"{' '.join(s.strip() for s in first[:3])[:300]}") from None
