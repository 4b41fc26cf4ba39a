"""kdpipe checkpoints (teachers and students alike) and loading teachers of other kinds.

A kdpipe checkpoint is a torch file holding plain data only (loads with weights_only=True):
{"kdpipe_checkpoint": 1, "arch", "model": {"spec", "args", ["file", "sha256"]}, "num_classes",
 "image_shape", "mean", "std", "class_names", "dataset", "test_top1", "state_dict", ...}.

Teachers of other kinds (load_teacher, by what the file holds, not its name):
  torchscript   a TorchScript archive (torch.jit.save);
  export        a torch.export program (.pt2, torch.export.save), loaded with torch.export.load;
  state_dict    a torch.save'd state dict (.pt, .pth, .bin; also {"state_dict": ...}, {"model": ...}, {"net": ...},
                or an average's {"state_dict_ema": ...}: STATE_KEYS, with a note naming the other sets a file
                holds), with --teacher-arch; loaded with weights_only=True; a wrapper's prefix on
                every name ("module.", "_orig_mod.", ...) is removed when the rest fits (_unwrapped);
  safetensors   a .safetensors file, with --teacher-arch (optional extra: pip install 'kdpipe[safetensors]');
  pickle        a whole pickled nn.Module (torch.save(model)): runs code from the file, so only with
                --trust-pickle.
Whatever the teacher returns passes through TeacherOutput: a tensor, the first entry of a tuple or
list, a dict's 'logits' or 'out', or an object's .logits (--teacher-output NAME|INDEX picks another).
"""

from __future__ import annotations

import argparse
import io
import re
import struct
import sys
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from kdpipe import KDPipeError
from kdpipe.cache.writer import atomic_write_bytes
from kdpipe.models import (_RepeatChannels, canonical, check_recipe, count_parameters, create_model, model_recipe,
                           parse_spec, per_channel, recorded_spelling)
from kdpipe.util import file_sha256

CHECKPOINT_VERSION = 1


def save_checkpoint(path, model: nn.Module, *, arch: str, num_classes: int, image_shape, mean, std,
                    class_names, dataset: dict, test_top1: float | None, extra: dict | None = None,
                    arch_args: dict | None = None) -> int:
    """Write atomically; returns the file's size in bytes. ``model`` records how to rebuild the network
    (kdpipe.models.model_recipe: canonical spec, options, user file and its sha256)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    obj = {"kdpipe_checkpoint": CHECKPOINT_VERSION, "arch": arch, "model": model_recipe(arch, arch_args),
           "num_classes": int(num_classes),
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
    kind: str  # "kdpipe", "torchscript", "export", "state_dict", "safetensors" or "pickle"
    fingerprint: str  # sha256 of the file(s)
    num_classes: int | None
    image_shape: tuple | None
    mean: list | None
    std: list | None
    file: str
    info: dict
    output: str | None = None  # --teacher-output: None picks the logits by the rules of TeacherOutput
    model: dict | None = None  # how the architecture is rebuilt (kdpipe.models.model_recipe), if kdpipe builds it
    code: str | None = None  # sha256 of the user's source file the network was built from now (None: not user code)

    @property
    def repeats_grey(self) -> bool:
        """Whether grey images reach the teacher repeated to 3 channels (TeacherOutput.repeats_grey); never for a
        kdpipe checkpoint, which is fed what it was trained on."""
        return isinstance(self.module, TeacherOutput) and self.module.repeats_grey

    def takes_in_chans(self) -> bool:
        """Whether --arch-args in_chans=3 makes this teacher repeat grey images: a program, or a timm architecture."""
        return self.kind in PROGRAM_KINDS or str(self.arch).startswith("timm:")

    def set_grey_to_rgb(self, rgb: dict | None) -> None:
        """Feed the teacher grey images as Grayscale(3) + Normalize(rgb's mean, std) (TeacherOutput.set_grey_to_rgb),
        or (None) as they come: what a normalization's "grey_to_rgb" record (kdpipe.normalization) asks."""
        if isinstance(self.module, TeacherOutput) and (rgb is None or self.repeats_grey):
            self.module.set_grey_to_rgb(rgb)
        elif rgb is not None:  # verify-cache given other --arch-args than the dump's
            fix = "give --arch-args in_chans=3" if self.takes_in_chans() else "give the cache's teacher"
            raise KDPipeError(f"the cache's teacher was fed grey images repeated to 3 channels, each normalized with "
                              f"its own value (Grayscale(3) + Normalize), and the teacher {self.file} ({self.arch}) "
                              f"does not repeat them: {fix}")

    def identity(self) -> dict:
        out = {"arch": self.arch, "kind": self.kind, "fingerprint": self.fingerprint,
               "file": self.file, "num_classes": self.num_classes, "output": self.output or "auto"}
        if self.model is not None:
            out["model"] = self.model
        return out


# Kinds whose module keeps the memory layout it was saved with (not converted to channels_last on CUDA).
FIXED_LAYOUT_KINDS = ("torchscript", "export")
SAFETENSORS_PIP = "pip install 'kdpipe[safetensors]'"
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


PROGRAM_KINDS = ("torchscript", "export", "pickle")  # teachers that hold their own architecture


def _program_args(arch_args, path, kind) -> dict:
    """The --arch-args a teacher that holds its own architecture takes: in_chans=3 alone, which repeats grey
    images to the 3 channels of an RGB teacher (as for a timm architecture); others are refused, not ignored."""
    from kdpipe.models import parse_arch_args
    args = parse_arch_args(arch_args)
    what = {"kdpipe": "a kdpipe checkpoint, which records its architecture and its options",
            "torchscript": "a TorchScript program, which holds its own architecture",
            "export": "a torch.export program, which holds its own architecture",
            "pickle": "a pickled model, which holds its own architecture"}[kind]
    other = [k for k in args if k != "in_chans" or kind == "kdpipe"]
    if other or args.get("in_chans", 3) != 3:
        raise KDPipeError(f"{path} is {what}: --arch-args {','.join(f'{k}={v}' for k, v in args.items())} cannot "
                          "change it" + ("" if kind == "kdpipe" else
                                         " (it takes in_chans=3 alone, to repeat grey images to 3 channels)"))
    return args


class TeacherOutput(nn.Module):
    """The teacher's logits from whatever it returns: a tensor as is; a tuple or list's first entry; a
    dict's 'logits', else 'out'; an object's .logits (HuggingFace-style outputs). `select` (a name or an
    index, --teacher-output) picks another entry. Anything else is a one-line KDPipeError."""

    AUTO_KEYS = ("logits", "out")

    def __init__(self, inner, select: str | None = None, frozen: bool = False, in_chans: int | None = None):
        super().__init__()
        self.inner = inner
        self.select = None if select in (None, "", "auto") else str(select)
        self.frozen = frozen  # torch.export programs refuse .train()/.eval(): they run as exported
        self.input_dtype = half_dtype(inner)
        self.in_chans = in_chans  # 3: grey images (B, 1, H, W) are repeated to RGB (--arch-args in_chans=3)
        self.rgb = None  # set_grey_to_rgb: each channel normalized after the repeat

    @property
    def repeats_grey(self) -> bool:
        """Whether grey images (B, 1, H, W) reach the teacher repeated to 3 channels: a program given in_chans=3,
        or an architecture kdpipe wraps for grey images (torchvision's; timm's with in_chans=3)."""
        return self.in_chans == 3 or _grey_wrapper(self.inner) is not None

    def set_grey_to_rgb(self, rgb: dict | None) -> None:
        """Feed the teacher grey images as torchvision's Grayscale(3) + Normalize(mean, std) does: repeated to 3
        channels, then (x - mean_c) / std_c per channel (`rgb`: {"mean", "std"}, 3 values each, of views replayed
        as pixels in [0, 1]); None: repeated only. Only for a teacher that repeats_grey."""
        if rgb is not None and not self.repeats_grey:
            raise ValueError("set_grey_to_rgb: this teacher does not repeat grey images to 3 channels")
        rgb = None if rgb is None else {"mean": [float(v) for v in rgb["mean"]], "std": [float(v) for v in rgb["std"]]}
        wrapper = _grey_wrapper(self.inner) if self.in_chans != 3 else None
        if wrapper is not None:  # the repeat happens inside the architecture: normalized there, after it
            wrapper.rgb, self.rgb = rgb, None
        else:
            self.rgb = rgb

    def train(self, mode: bool = True):
        self.training = mode
        if not self.frozen:
            self.inner.train(mode)
        return self

    def forward(self, x):
        if self.in_chans is not None and x.dim() == 4 and x.shape[1] == 1:
            x = x.expand(-1, self.in_chans, -1, -1)
            if self.rgb is not None:
                x = per_channel(x, self.rgb)
        if self.input_dtype is not None and x.is_floating_point():
            return pick_logits(self.inner(x.to(self.input_dtype)), self.select).float()
        return pick_logits(self.inner(x), self.select)


def _grey_wrapper(module) -> _RepeatChannels | None:
    """The repeat of grey images to 3 channels that kdpipe puts before a torchvision (or timm, in_chans=3)
    architecture built for grey images (kdpipe.models._grey), or None."""
    if isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[0], _RepeatChannels) \
            and module[0].times == 3:
        return module[0]
    return None


def half_dtype(module: nn.Module) -> torch.dtype | None:
    """float16 or bfloat16 where every floating weight of `module` is of that one dtype (a teacher saved with
    .half(), e.g. a TorchScript export for a GPU), else None. Such a teacher is run as saved: its inputs in that
    dtype (float32 inputs were refused by its first layer), its logits returned as float32."""
    try:
        dtypes = {t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()}
        if not dtypes and isinstance(module, torch.jit.ScriptModule):  # frozen (torch.jit.freeze): its weights
            dtypes = {o.toIValue().dtype for n in module.graph.findAllNodes("prim::Constant")  # are graph constants
                      for o in n.outputs() if isinstance(o.type(), torch._C.TensorType)
                      and o.toIValue().is_floating_point()}
    except Exception:  # a module whose parameters cannot be listed: run as it is
        return None
    return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in (torch.float16, torch.bfloat16) else None


def _describe(out) -> str:
    if isinstance(out, Mapping):
        return f"a dict with keys {', '.join(map(repr, list(out)[:8]))}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} ({', '.join(type(o).__name__ for o in out[:6])})"
    return f"a {type(out).__name__}"


def pick_logits(out, select: str | None = None) -> torch.Tensor:
    hint = "pick the logits with --teacher-output NAME|INDEX"
    if select is not None:
        if re.fullmatch(r"-?[0-9]+", select) and isinstance(out, (tuple, list)):  # not "--1" or "²": int() refuses
            i = int(select)
            if not -len(out) <= i < len(out):
                raise KDPipeError(f"--teacher-output {select}: the teacher returns {_describe(out)}")
            got = out[i]
        elif isinstance(out, Mapping) and select in out:
            got = out[select]
        elif not isinstance(out, (Mapping, tuple, list, torch.Tensor)) and hasattr(out, select):
            got = getattr(out, select)
        else:
            raise KDPipeError(f"--teacher-output {select}: the teacher returns {_describe(out)}, which has no "
                              f"entry {select!r}")
        what = f"entry {select!r}"
    elif isinstance(out, torch.Tensor):
        return out
    elif isinstance(out, (tuple, list)) and out:
        got, what = out[0], "first entry"
    elif isinstance(out, Mapping):
        key = next((k for k in TeacherOutput.AUTO_KEYS if k in out), None)
        if key is None:
            raise KDPipeError(f"the teacher returns {_describe(out)}, none of them 'logits' or 'out': {hint}")
        got, what = out[key], f"entry {key!r}"
    elif isinstance(getattr(out, "logits", None), torch.Tensor):
        got, what = out.logits, ".logits"
    else:
        raise KDPipeError(f"the teacher returns {_describe(out)}, not logits: {hint}")
    if not isinstance(got, torch.Tensor):
        raise KDPipeError(f"the {what} of the teacher's output is {_describe(got)}, not a tensor: {hint}")
    return got


def sniff(path: Path) -> str:
    """What a model file holds by its bytes: torchscript, export, torch (a torch.save zip or legacy
    pickle: kdpipe checkpoint, state dict or pickled module), safetensors, or unknown."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        inner = [n.split("/", 1)[-1] for n in names]
        if any(n.startswith("code/") for n in inner):
            return "torchscript"
        if any(n in ("archive_format", "models/model.json") or n.startswith("serialized_exported_program")
               for n in inner):
            return "export"
        if any(n == "data.pkl" for n in inner):
            return "torch"
        return "unknown"
    except (zipfile.BadZipFile, OSError):
        pass
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        n = struct.unpack("<Q", head[:8])[0]
        if 0 < n < 100_000_000 and n + 8 <= path.stat().st_size:
            return "safetensors"
    if head[:1] == b"\x80":  # a pickle protocol opcode: torch.save's legacy format
        return "torch"
    return "unknown"


def _is_torchscript(path: Path) -> bool:
    return sniff(path) == "torchscript"


# Plain-data classes that training scripts put beside the weights (timm's train.py: its argparse options, "args"),
# read with weights_only=True: they hold values only and run no code when unpickled.
SAFE_GLOBALS = [argparse.Namespace]


def load_checkpoint_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise KDPipeError(f"no such file {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
            what = f" ({found.group(1)})" if found else ""
            raise KDPipeError(f"{path} is a pickled Python object{what} (a whole model saved with torch.save(model)) "
                              "or holds one beside its weights: loading it runs code from the file, so kdpipe does so "
                              "only with --trust-pickle; or save its state_dict and give --teacher-arch") from None
        raise KDPipeError(_cannot_load(path, e)) from None
    return obj


def _pickle_hint(e: Exception) -> str:
    """What to do when a pickle names code that cannot be imported here: a class of the script that saved it
    (__main__), or a module of its project."""
    save = "or save its state_dict (torch.save(model.state_dict(), FILE)) and give --teacher-arch PATH.py:CLASS"
    if isinstance(e, AttributeError) and "__main__" in str(e):
        return (": the pickle names a class of the script that saved it (its __main__), which kdpipe cannot "
                f"import; {save}")
    if isinstance(e, ModuleNotFoundError):
        return (f": the pickle names code of the module {e.name!r}, not importable here: add the folder that "
                f"holds it to PYTHONPATH, {save}")
    return ""


def _cannot_load(path, e: Exception) -> str:
    """The one line for a torch file torch.load cannot read."""
    if "Invalid magic number" in str(e):  # what torch.load says of a pickle that torch.save did not write
        return (f"cannot load {path}: it is a plain pickle (as pickle.dump writes), not a file torch.save wrote: save "
                "the model's weights with torch.save(model.state_dict(), FILE) and give --teacher-arch PATH.py:CLASS")
    return f"cannot load {path}: {_first_line(e)}{_pickle_hint(e)}"


def _first_line(msg) -> str:
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    return (lines[0] if lines else "unknown error")[:200]


# Keys under which training scripts keep the weights, in the order kdpipe looks: the weights themselves, then
# a moving average of them where that is all the file holds (timm's train.py saves both, the average as
# "state_dict_ema").
STATE_KEYS = ("state_dict", "model", "model_state_dict", "net", "state_dict_ema", "model_ema", "ema")


def _is_weights(d) -> bool:
    return isinstance(d, Mapping) and bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in d.items())


def _state_dict_of(obj) -> tuple[dict | None, str | None]:
    """A state dict (name -> tensor), also inside a dict under one of STATE_KEYS (the first that holds weights:
    {"model": config, "model_state_dict": ...}), and that key (None: the object itself); else (None, None)."""
    if _is_weights(obj):
        return dict(obj), None
    if isinstance(obj, Mapping):
        key = next((k for k in STATE_KEYS if _is_weights(obj.get(k))), None)
        if key is not None:
            return dict(obj[key]), key
    return None, None


def _weight_keys(obj) -> list[str]:
    """The keys of a dict whose values are sets of weights."""
    return [str(k) for k, v in obj.items() if _is_weights(v)] if isinstance(obj, Mapping) else []


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def load_teacher(path=None, *, arch=None, weights=None, image_shape=None, num_classes=None, arch_args=None,
                 trust_pickle: bool = False, output: str | None = None, warn=_warn) -> LoadedModel:
    """A teacher from a file (see the module's doc for the kinds); `arch` (with `arch_args`) builds the
    network a state dict or safetensors file fills. `weights` is the older spelling of such a file.
    `output` picks the logits from what the teacher returns (TeacherOutput)."""
    if path is None and weights is not None:
        path = weights
    if path is None:
        raise KDPipeError("give a teacher: --teacher FILE (with --teacher-arch NAME for a state dict or "
                          "safetensors file)")
    if arch is not None:
        parse_spec(arch)  # an unknown name is refused first, whatever the file
    path = Path(path)
    if not path.is_file():
        raise KDPipeError(f"teacher file {path} does not exist")
    kind = sniff(path)
    fp = file_sha256(path)

    def done(module, arch_name, kind, num_classes=None, image_shape=None, mean=None, std=None, info=None,
             model=None, frozen=False, code=None):
        # kdpipe's own networks return logits (their training needs it): they stay bare, so their
        # state_dict keeps its keys; every other kind passes through TeacherOutput.
        if kind in PROGRAM_KINDS or kind == "kdpipe":  # --arch-args build nothing here: they were ignored
            given = _program_args(arch_args, path, kind)
            if given:
                model = {"spec": kind, "args": given}
        in_chans = (model or {}).get("args", {}).get("in_chans") if kind in PROGRAM_KINDS else None
        module = module.eval() if kind == "kdpipe" else TeacherOutput(module, output, frozen=frozen,
                                                                      in_chans=in_chans).eval()
        return LoadedModel(module, arch_name, kind, fp, num_classes, image_shape, mean, std, str(path), info or {},
                           output, model, code)

    if kind in ("torchscript", "export") and arch is not None:
        raise KDPipeError(f"{path} is a {'TorchScript' if kind == 'torchscript' else 'torch.export'} program, "
                          "which holds its own architecture: drop --teacher-arch")
    if kind == "torchscript":
        try:
            with warnings.catch_warnings():  # torch's deprecation notice would break the one-line errors
                warnings.simplefilter("ignore", FutureWarning)
                mod = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise KDPipeError(f"cannot load TorchScript teacher {path}: {_first_line(e)}") from None
        return done(mod, "torchscript", "torchscript")
    if kind == "export":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = torch.export.load(str(path)).module()
        except Exception as e:
            raise KDPipeError(f"{path} is a torch.export program (.pt2) that torch {torch.__version__} cannot "
                              f"load: {_first_line(e)}") from None
        return done(mod, "export", "export", frozen=True)
    if kind == "safetensors" or path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise KDPipeError(f"{path} is a safetensors file: reading it needs the optional package "
                              f"safetensors: {SAFETENSORS_PIP}") from None
        try:
            state = load_file(str(path), device="cpu")
        except Exception as e:
            raise KDPipeError(f"{path} is not a readable safetensors file: {_first_line(e)}") from None
        return _from_state(state, path, "safetensors", arch, arch_args, image_shape, num_classes, done)
    if kind == "unknown":
        raise KDPipeError(f"cannot load {path}: it is none of the model files kdpipe reads (a kdpipe checkpoint, "
                          "TorchScript, torch.export .pt2, a torch.save state dict or safetensors)")
    if trust_pickle:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise KDPipeError(_cannot_load(path, e)) from None
        if isinstance(obj, nn.Module):
            if arch is not None:
                raise KDPipeError(f"{path} holds a whole pickled model, which brings its own architecture: "
                                  "drop --teacher-arch")
            return done(obj, type(obj).__name__, "pickle")
    else:
        obj = load_checkpoint_file(path)
    if isinstance(obj, dict) and obj.get("kdpipe_checkpoint") == CHECKPOINT_VERSION:
        if output not in (None, "", "auto"):
            raise KDPipeError(f"{path} is a kdpipe checkpoint, whose network returns its logits: drop --teacher-output")
        if arch is not None:
            raise KDPipeError(f"{path} is a kdpipe checkpoint, which records its architecture "
                              f"({obj['arch']}): drop --teacher-arch")
        model, recipe, code = _rebuild(obj, path, warn)
        info = {k: v for k, v in obj.items() if k != "state_dict"}
        return done(model, obj["arch"], "kdpipe", obj["num_classes"], tuple(obj["image_shape"]), obj["mean"],
                    obj["std"], info, recipe, code=code)
    return _from_state(obj, path, "state_dict", arch, arch_args, image_shape, num_classes, done)


def _from_state(obj, path, kind, arch, arch_args, image_shape, num_classes, done) -> LoadedModel:
    state, key = _state_dict_of(obj)
    held = _weight_keys(obj) if key is not None or state is None else []
    save_alone = "save the set to dump alone (torch.save(checkpoint[KEY], FILE)) and give that file"
    if state is None:
        if held:
            raise KDPipeError(f"{path} holds weights under {', '.join(map(repr, held))}, none of the keys kdpipe "
                              f"reads ({', '.join(STATE_KEYS)}): {save_alone}")
        raise KDPipeError(f"{path} holds {type(obj).__name__} data that is neither a kdpipe checkpoint nor a "
                          "state dict of tensors")
    if arch is None:
        raise KDPipeError(f"{path} is a {'safetensors file' if kind == 'safetensors' else 'state dict'} of "
                          f"{len(state)} tensors with no architecture: give --teacher-arch NAME (and --arch-args)")
    if len(held) > 1:
        print(f"note: {path} holds weights under {', '.join(map(repr, held))}: kdpipe reads {key!r}; to dump "
              f"another, {save_alone}", file=sys.stderr)
    model = create_model(arch, num_classes, tuple(image_shape), arch_args)
    _load_state(model, state, path, arch)
    if any(getattr(m, "transform_input", None) is False for m in model.modules()) and parse_spec(arch)[0] == "tv":
        # no weight records it: torchvision's own weights for GoogLeNet and Inception v3 turn it on
        print(f"note: {arch} is built with transform_input=false; torchvision's pretrained weights for it run with "
              "transform_input=true (inputs normalized for ImageNet, renormalized inside): for those, give --arch-args "
              "transform_input=true", file=sys.stderr)
    recipe = model_recipe(arch, arch_args)
    return done(model, arch, kind, num_classes, tuple(image_shape), model=recipe, code=recipe.get("sha256"))


def _rebuild(obj: dict, path, warn) -> tuple[nn.Module, dict, str | None]:
    """The network of a kdpipe checkpoint, built from its recorded recipe (older checkpoints: its arch), and
    the sha256 of the user's source file it was built from now (None: not user code)."""
    recipe = obj.get("model") or {"spec": canonical(obj["arch"]), "args": {}}
    spec = recipe["spec"]
    if "file" in recipe:  # the user's file: as written, else at its recorded absolute place
        if parse_spec(spec)[0] == "file" and not Path(spec.rpartition(":")[0]).is_file():
            spec = f"{recipe['file']}:{spec.rpartition(':')[2]}"
            if not Path(recipe["file"]).is_file():
                raise KDPipeError(f"{path} was built by {recipe['spec']}, which is not found (nor at "
                                  f"{recipe['file']}): run from the folder it was trained in")
        for w in check_recipe({**recipe, "spec": spec}):
            warn(w)
    # a parametric spec an older kdpipe recorded as the user spelled it ('mlp:32, 16'): built as it was then
    model = create_model(recorded_spelling(spec), obj["num_classes"], tuple(obj["image_shape"]), recipe.get("args"))
    _load_state(model, obj["state_dict"], path, recipe["spec"])
    return model, recipe, model_recipe(spec).get("sha256")


# Prefixes that wrappers put before every weight's name: DataParallel/DDP ("module."), torch.compile
# ("_orig_mod."), Lightning modules holding the net as .model or .net.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "net.")
# torch.optim.swa_utils.AveragedModel (SWA; torchvision's reference script's --model-ema) keeps the number of
# models averaged beside the averaged weights (which then start with "module.").
AVERAGED_COUNT = "n_averaged"


def _unwrapped(state: dict, wanted: set[str]) -> tuple[dict, str]:
    """`state` with the wrapper prefixes every one of its names shares removed, when that makes its names
    exactly the network's (`wanted`); else `state` as it is. Also the prefix removed ("" for none)."""
    keys, removed = list(state), ""
    while set(keys) != wanted:
        p = next((p for p in WRAPPER_PREFIXES if keys and all(k.startswith(p) for k in keys)), None)
        if p is None:
            return state, ""
        keys, removed = [k[len(p):] for k in keys], removed + p
    return dict(zip(keys, state.values())), removed


def _misfit(state: dict, own: dict, arch: str = "") -> str:
    """How the names and shapes of `state` differ from the network's (`own`), in one short line ("" where
    they fit): the first mismatched shapes, then the missing and unexpected names. An output layer of
    another width is said to be one, since that (weights for another number of classes) is the usual case."""
    def few(names):
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    shapes = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
              if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape)]
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    parts = []
    if shapes:
        k, theirs, ours = shapes[0]
        last = [n for n in own if n.endswith(".weight")][-1:]
        if [k] == last and theirs[1:] == ours[1:]:
            parts.append(f"its output layer {k} has {theirs[0]} outputs, the architecture {ours[0]} (the data's "
                         "classes): these weights are for another number of classes")
        else:
            parts.append(f"{k} is {theirs} in the file, {ours} in the network"
                         + (f" (and {len(shapes) - 1} more shapes differ)" if len(shapes) > 1 else ""))
            if arch.startswith("timm:") and len(ours) == 4 and theirs[1] == 3 and ours[1] == 1:
                parts[-1] += (" (weights for RGB images: give --arch-args in_chans=3 to repeat grey images to 3 "
                              "channels)")
    if missing:
        parts.append(f"missing {few(missing)}")
    if unexpected:
        parts.append(f"unexpected {few(unexpected)}")
    return "; ".join(parts)


def _load_state(model: nn.Module, state: dict, path, arch: str = "given") -> None:
    if AVERAGED_COUNT in state and AVERAGED_COUNT not in model.state_dict():
        state = {k: v for k, v in state.items() if k != AVERAGED_COUNT}
    state, removed = _unwrapped(state, set(model.state_dict()))
    if not removed and isinstance(model, nn.Sequential) and len(model) == 2:
        state, removed = _unwrapped(state, set(model[1].state_dict()))  # a grey-wrapped torchvision model's
    target = model
    if isinstance(model, nn.Sequential) and len(model) == 2 and not any(k.startswith("1.") for k in state):
        target = model[1]  # a torchvision model wrapped for grey images; weights are for the bare model
    misfit = _misfit(state, target.state_dict(), arch)
    if misfit:
        raise KDPipeError(f"the weights in {path} do not fit the architecture {arch}: {misfit}")
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()
        raise KDPipeError(f"the weights in {path} do not fit the architecture {arch}: "
                          f"{' '.join(s.strip() for s in first[:3])[:300]}") from None
    if removed:
        print(f"note: every weight's name in {path} starts with {removed!r} (saved from a wrapper such as "
              "DataParallel or torch.compile): loaded without it", file=sys.stderr)
