"""Export a trained model for deployment: TorchScript, ONNX or a torch.export program (.pt2).

The exported model includes its input normalization (the mean and std its checkpoint records), so it
takes what the user has: uint8 images (B, C, H, W) at the checkpoint's input size, or float32 feature
vectors (B, D), and returns raw logits (B, classes). The batch size is free. After writing, the file is
loaded back and its outputs compared with PyTorch's (ONNX through onnxruntime where installed).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from kdpipe import KDPipeError
from kdpipe.checkpoint import CHECKPOINT_VERSION, LoadedModel, load_checkpoint_file, load_teacher, sniff
from kdpipe.cache.writer import atomic_path, atomic_write_json
from kdpipe.data import KINDS
from kdpipe.util import ensure_parent, error_line
from kdpipe.views import normalize, policy_from_identity

EXPORT_PIP = "pip install 'kdpipe[export]'"  # onnx, onnxscript (torch's ONNX exporter), onnxruntime
RUN_FILES = ("student.pt", "teacher.pt", "model.pt")  # what a run directory holds, in this order
# Largest |exported - PyTorch| allowed, relative to the largest |logit| (float32 kernels differ slightly).
CHECK_RTOL = 1e-4


class WithNormalization(nn.Module):
    """`model` behind its input normalization: uint8 images (B, C, H, W) in 0..255, or float feature
    vectors (B, D), in; raw logits out. The normalization is views.normalize, the one stage two uses."""

    def __init__(self, model: nn.Module, mean, std, images: bool):
        super().__init__()
        self.model = model
        self.images = images
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(normalize(x.float(), self.mean, self.std))


def input_spec(loaded: LoadedModel) -> tuple[torch.dtype, tuple[int, ...]]:
    """(dtype, per-sample shape) of what the exported model takes."""
    shape = tuple(int(s) for s in loaded.image_shape)
    return (torch.uint8 if len(shape) == 3 else torch.float32), shape


def example_inputs(loaded: LoadedModel, n: int = 8, seed: int = 0) -> torch.Tensor:
    """n random inputs of the right dtype and shape (uint8 pixels, or standard-normal features)."""
    dtype, shape = input_spec(loaded)
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    mean, std = torch.tensor(loaded.mean), torch.tensor(loaded.std)
    return torch.randn((n, *shape), generator=g) * std + mean


def preprocessing(loaded: LoadedModel) -> list[str]:
    """The steps, in words, that make a user's input what the exported model takes: how its training data was
    stored (photos resized and cropped), the clean view of the views it trained on, and the dtype and layout.
    A deployed model given anything else (a photo squashed to size, pixels scaled to 0..1) sees other inputs."""
    dtype, shape = input_spec(loaded)
    data = loaded.info.get("dataset") or {}
    if dtype != torch.uint8:
        names = data.get("columns")
        order = (f"the columns {', '.join(names)}, in this order (as in the training file, {data.get('spec', '?')})"
                 if names and len(names) == shape[0] else
                 f"the columns in the order of the training file ({data.get('spec', '?')})")
        return [f"float32 feature vectors (B, {shape[0]}): {order}, unscaled (the model normalizes them inside)"]
    c = shape[0]
    colour = {1: "grey (1 channel)", 3: "RGB (3 channels, in R, G, B order)"}.get(c, f"{c} channels")
    stored = tuple(data.get("image_shape") or shape)
    steps = []
    kind = KINDS.get(data.get("kind", "dense"))  # the store kind says how it stored its samples (photos: resized)
    stored_as = kind.storage_step(data, colour) if kind is not None else None
    if stored_as:
        steps.append(stored_as)
    elif data:
        steps.append(f"{colour} images of {stored[1]} x {stored[2]}, as in {data.get('spec', '?')}")
    ident = loaded.info.get("view_policy")
    if ident:
        steps += policy_from_identity(ident).clean_steps(stored)
    elif stored != tuple(shape):
        steps.append(f"bring it to {shape[1]} x {shape[2]} as the views' clean view did (this checkpoint does "
                     "not record its views)")
    steps.append(f"pass uint8 pixels 0..255 as (B, {', '.join(map(str, shape))}), channels first (the model "
                 "normalizes them inside)")
    return steps


def write_card(res: dict, loaded: LoadedModel, compressed: dict | None = None) -> Path:
    """FILE.json beside an exported FILE: what a deployment needs besides the model, namely its input, the
    preprocessing, the class of each output and where the model came from. `compressed`: for a model kdpipe
    compress made from the checkpoint (int8, pruned), how, and its own test_top1 and test_top1_on (what it was
    measured on), which replace the checkpoint's."""
    dtype, shape = input_spec(loaded)
    limit = (loaded.info.get("dataset") or {}).get("limit")  # trained and measured under --limit N: N test samples
    on = f"{limit} samples of the test split (--limit {limit}), not all of it" if limit else "the test split"
    test = (loaded.info.get("settings") or {}).get("test")  # a teacher records its test split; its train split's
    if test is not None:  # limit says nothing of it where the test split held fewer than N samples (kept whole)
        on = (f"{test['num_samples']} samples of the test split (--limit {test['limit']}), not all of it"
              if test.get("limit") else "the test split")
    elif limit:  # a student records its cache's train split only
        on = f"{limit} samples of the test split, or all of it where it holds fewer (--limit {limit})"
    card = {"model": Path(res["path"]).name, "format": res["format"], "arch": loaded.arch,
            "input": {"dtype": str(dtype).removeprefix("torch."), "shape": ["B", *shape]},
            "output": f"raw logits (B, {loaded.num_classes}): output i is class_names[i]; softmax gives "
                      "probabilities",
            "class_names": list(loaded.info.get("class_names") or []),
            "preprocessing": preprocessing(loaded),
            "normalization_inside": {"mean": list(loaded.mean), "std": list(loaded.std)},
            "source": {"checkpoint": str(loaded.file), "sha256": loaded.fingerprint,
                       "dataset": (loaded.info.get("dataset") or {}).get("spec"),
                       "test_top1": loaded.info.get("test_top1"), "test_top1_on": on, **(compressed or {})},
            "checked_against_pytorch": {"checked": res["checked"], "max_relative_error": res["max_relative_error"]}}
    path = Path(f"{res['path']}.json")
    atomic_write_json(path, card)
    return path


def check_card_path(out) -> None:
    """FILE.json, where write_card puts the card of FILE, must be free or a card: a JSON file of the user's own of
    that name (a model's config saved as model.onnx.json) was replaced without a word."""
    card = Path(f"{out}.json")
    if not card.exists():
        return
    try:
        doc = json.loads(card.read_text())
        ours = isinstance(doc, dict) and "checked_against_pytorch" in doc
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise KDPipeError(f"{card} exists and is not a kdpipe export card, which would be written there beside "
                          f"{out}: move it, or give another --out")


def wrap(loaded: LoadedModel, module: nn.Module | None = None) -> WithNormalization:
    """The loaded model (or `module`, e.g. a compressed copy of it) with its normalization, in eval mode."""
    return WithNormalization(module if module is not None else loaded.module, loaded.mean, loaded.std,
                             images=len(loaded.image_shape) == 3).eval()


def finite(module: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer is finite (a diverged run's are not)."""
    return all(bool(torch.isfinite(t).all()) for t in list(module.parameters()) + list(module.buffers())
               if t.is_floating_point())


def resolve_model(path) -> Path:
    """A checkpoint file, or a run directory holding one (student.pt, teacher.pt or model.pt)."""
    p = Path(path)
    if p.is_dir():
        if (p / "config.json").is_file() and not (p / "metrics.json").is_file():  # train-student writes it last
            raise KDPipeError(f"{p} is an unfinished run (no metrics.json): run its train-student command again to "
                              "finish it, then export it")
        for name in RUN_FILES:
            if (p / name).is_file():
                return p / name
        runs = sorted(d.name for d in p.iterdir() if d.is_dir() and any((d / n).is_file() for n in RUN_FILES))
        if runs:  # the RUNS_DIR of a sweep
            raise KDPipeError(f"{p} holds {len(runs)} runs ({', '.join(runs[:3])}{', ...' if len(runs) > 3 else ''}): "
                              f"export one of them, e.g. {p / runs[0]}")
        raise KDPipeError(f"{p} holds no model: expected one of {', '.join(RUN_FILES)} (a kdpipe run directory)")
    if not p.is_file():
        raise KDPipeError(f"no such run directory or model file {p}")
    return p


# What a model file is, by checkpoint.sniff, where it is not a kdpipe checkpoint.
OTHER_FILES = {"torchscript": "a TorchScript program", "export": "a torch.export program (.pt2)",
               "safetensors": "a safetensors file of weights", "unknown": "not a model file kdpipe reads",
               "torch": "a state dict or pickled model, not a kdpipe checkpoint"}


def _is_checkpoint(f: Path) -> bool:
    try:
        obj = load_checkpoint_file(f)
    except KDPipeError:  # a pickled whole model, or no torch file at all
        return False
    return isinstance(obj, dict) and obj.get("kdpipe_checkpoint") == CHECKPOINT_VERSION


def load_model(path) -> LoadedModel:
    """A kdpipe checkpoint (from a file or run directory): it records the architecture and normalization.
    Other model files are refused here, before load_teacher's advice (--teacher-arch, --trust-pickle), which
    is for dump-logits: export and compress have no such options."""
    return load_teacher(require_checkpoint(path))


def require_checkpoint(path) -> Path:
    """The kdpipe checkpoint file `path` names (a file or run directory), or a one-line refusal of any other model
    file; compress checks its --teacher so before decoding the data (minutes for a large photo folder)."""
    f = resolve_model(path)
    kind = sniff(f)
    if kind != "torch" or not _is_checkpoint(f):
        raise KDPipeError(f"{f} is {OTHER_FILES.get(kind, kind)}: export and compress need a kdpipe checkpoint "
                          "(train-teacher's file or a run's student.pt), which records the architecture and the "
                          "input normalization")
    return f


def require(*modules: str, what: str) -> None:
    """Refuse, in one line with the pip line, when an optional package is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise KDPipeError(f"{what} needs the package(s) {', '.join(missing)}: {EXPORT_PIP}")


def _quiet():
    """Silence exporters' progress prints and deprecation notices (the CLI prints one line of its own)."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


class _Checked(nn.Module):
    """A traced model behind a check of its input's dtype and per-sample shape. A trace records no checks:
    a CNN with global pooling ran on images of another size, and on float images, giving other logits
    without a word (ONNX and pt2 refuse them)."""

    def __init__(self, traced, shape: list[int], images: bool):
        super().__init__()
        self.traced = traced
        self.shape = shape
        self.images = images

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        want = "uint8 images (B, " if self.images else "float feature vectors (B, "
        want = want + ", ".join([str(s) for s in self.shape]) + ")"
        if x.dim() != len(self.shape) + 1 or x.shape[1:] != self.shape:
            raise ValueError("this model takes " + want + ", got shape " + str(list(x.shape))
                             + ": resize (and convert grey/RGB) as its test images were")
        if self.images and x.dtype != torch.uint8:
            raise ValueError("this model takes " + want + " in 0..255, got a tensor of another dtype: pass the "
                             "uint8 pixels, not scaled floats")
        if not self.images and not x.is_floating_point():
            raise ValueError("this model takes " + want + ", got a tensor of integers")
        return self.traced(x)


def _via_memory(save, out: Path) -> None:
    """save(buffer), then its bytes to `out` with plain file I/O: torch's zip writer, writing to a full disk
    itself, aborted the whole process (a C++ terminate and its stack, not an error)."""
    buf = io.BytesIO()
    save(buf)
    with open(out, "wb") as f:
        f.write(buf.getbuffer())


def _torchscript(model: nn.Module, x: torch.Tensor, out: Path) -> None:
    with _quiet():
        ts = torch.jit.trace(model, x, check_trace=False)
        ts = torch.jit.script(_Checked(ts, [int(s) for s in x.shape[1:]], x.dtype == torch.uint8))
        _via_memory(lambda f: torch.jit.save(ts, f), out)


def _batch_dim(x: torch.Tensor) -> dict:
    return {"x": {0: torch.export.Dim("batch", min=1, max=1 << 20)}}


def _pt2(model: nn.Module, x: torch.Tensor, out: Path) -> None:
    with _quiet():
        ep = torch.export.export(model, (x,), dynamic_shapes=_batch_dim(x))
        _via_memory(lambda f: torch.export.save(ep, f), out)


def _onnx(model: nn.Module, x: torch.Tensor, out: Path) -> None:
    # torch's dynamo-based exporter (the default in torch 2.9+) needs onnx and onnxscript; the older
    # TorchScript-based one cannot export adaptive pooling to sizes that do not divide the input.
    require("onnx", "onnxscript", what="ONNX export")
    with _quiet():
        torch.onnx.export(model, (x,), str(out), input_names=["x"], output_names=["logits"], dynamo=True,
                          dynamic_shapes=_batch_dim(x), verbose=False, external_data=False)  # one file
    import onnx
    onnx.checker.check_model(str(out))


FORMATS = {"torchscript": _torchscript, "onnx": _onnx, "pt2": _pt2}
SUFFIXES = {"torchscript": ".pt", "onnx": ".onnx", "pt2": ".pt2"}  # what export suggests naming a file


def run_exported(path, fmt: str, x: torch.Tensor) -> np.ndarray | None:
    """Outputs of an exported file on x; None for ONNX when onnxruntime is not installed."""
    path = str(path)
    with _quiet():
        if fmt == "torchscript":
            with torch.no_grad():
                return torch.jit.load(path, map_location="cpu")(x).numpy()
        if fmt == "pt2":
            with torch.no_grad():
                return torch.export.load(path).module()(x).numpy()
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime as ort
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


BATCH_HINT = ("the model's code turns the batch size into a number, e.g. x.reshape(int(x.shape[0]), -1) "
              "(x.flatten(1) keeps it free)")


def _run_back(tmp: Path, fmt: str, xs: torch.Tensor, traced: torch.Tensor, out: Path) -> np.ndarray | None:
    """run_exported on xs (`tmp`: the file not yet renamed to `out`); an exported file that fails there is refused
    in one line (a traceback before): one that runs at the batch size it was traced at only has that size built in."""
    try:
        return run_exported(tmp, fmt, xs)
    except Exception as e:  # torch.jit, torch.export and onnxruntime raise many types
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        try:
            run_exported(tmp, fmt, traced)
            why = (f"it runs on a batch of {len(traced)}, the size it was traced at, not on one of {len(xs)}: "
                   f"{BATCH_HINT}")
        except Exception:
            why = f"{lines[-1][:200]}; report this with the model's architecture"
        raise KDPipeError(f"the exported {fmt} model fails when run, so nothing was written to {out}: {why}") from None


def max_relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(1e-12, float(np.abs(want).max())))


def export_model(src, fmt: str, out, *, module: nn.Module | None = None, check: torch.Tensor | None = None,
                 overwrite: bool = True) -> dict:
    """Write the model of checkpoint or run directory `src` (or `module`, a compressed copy of it) with its
    normalization to `out` in `fmt`; reload it and compare its outputs on `check` (default: random inputs).
    An existing `out` is replaced only with `overwrite`; the checkpoint itself never."""
    if fmt not in FORMATS:
        raise KDPipeError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    suffix = Path(out).suffix.lower()
    named = {".onnx": "onnx", ".pt2": "pt2"}.get(suffix)
    if (named and named != fmt) or (fmt == "pt2" and suffix != ".pt2"):
        article = "an" if fmt[0] in "aeiou" else "a"
        raise KDPipeError(f"--out {out} is not a name for {article} {fmt} file: name it {SUFFIXES[fmt]} (or give the "
                          "--format its name says)" + (": torch.export.load reads .pt2 files" if fmt == "pt2" else ""))
    loaded = src if isinstance(src, LoadedModel) else load_model(src)
    if Path(out).resolve() == Path(loaded.file).resolve():  # the trained model would be lost
        raise KDPipeError(f"--out {out} is the checkpoint being exported: give another file name")
    if Path(out).is_file() and not overwrite:
        raise KDPipeError(f"{out} already exists: give another --out, or --overwrite to replace it")
    check_card_path(out)
    if not finite(module if module is not None else loaded.module):
        raise KDPipeError(f"the weights of {loaded.file} are not finite (NaN or infinite): its training diverged; "
                          "export another run, or train it again with a lower --lr")
    out = ensure_parent(out, "export output")
    model = wrap(loaded, module)
    x = example_inputs(loaded, 2)
    # Written and checked under a temporary name, then renamed: a Ctrl-C, a kill or a full disk left a truncated
    # file at `out` that a rerun refused as existing, and a failed --overwrite had removed the file it replaced.
    with atomic_path(out) as tmp:
        try:
            FORMATS[fmt](model, x, tmp)
        except (KDPipeError, OSError):  # OSError: a full disk, said in one line by atomic_path
            raise
        except Exception as e:  # exporters raise many types; the first line says which operator failed
            why = (f"its batch dimension cannot stay free: {BATCH_HINT}" if "Constraints violated (batch)" in str(e)
                   else error_line(e))
            raise KDPipeError(f"cannot export {loaded.arch} to {fmt}: {why}") from None
        xs = example_inputs(loaded, 5, seed=1) if check is None else check
        with torch.no_grad():
            want = model(xs).numpy()
        got = _run_back(tmp, fmt, xs, x, out)
        err = None if got is None else max_relative_error(got, want)
        if err is not None and not err <= CHECK_RTOL:
            raise KDPipeError(f"the exported {fmt} model differed from PyTorch by {err:.2g} (relative), more than "
                              f"{CHECK_RTOL:g}, so nothing was written to {out}; report this with the model's "
                              "architecture")
    dtype, shape = input_spec(loaded)
    return {"path": str(out), "format": fmt, "arch": loaded.arch, "bytes": out.stat().st_size,
            "input": f"{str(dtype).removeprefix('torch.')} (B, {', '.join(map(str, shape))})",
            "checked": err is not None, "max_relative_error": err, "num_classes": loaded.num_classes}
