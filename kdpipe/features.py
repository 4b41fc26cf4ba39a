"""Intermediate features: taking a named module's output with a forward hook (stage one caches the
teacher's, verify-cache recomputes them), and the hint projector that maps a student's layer onto the
teacher's cached features in stage two (FitNets, Romero et al. 2015).

A layer is named by its module path, as ``model.named_modules()`` gives it (``layer4``, ``features.3``,
``avgpool``); a teacher loaded from a file other than a kdpipe checkpoint is named inside the user's
own module (the wrapper that picks its logits is left out). Features are what that module returns:
one tensor of a fixed shape per image, e.g. ``(C,)`` for pooled features or ``(C, H, W)`` for a
spatial map.

The projector (``make_projector``), from the student's shape to the teacher's:
- teacher vector (C_t,), student vector (C_s,): a linear layer C_s -> C_t;
- teacher vector, student map (C_s, H, W): global average pooling, then the linear layer;
- teacher pooled map (C_t, 1, 1), such as torchvision's ``avgpool``, student vector (C_s,): the linear layer,
  its output shaped (C_t, 1, 1);
- teacher map (C_t, H_t, W_t), student map (C_s, H_s, W_s): adaptive average pooling to (H_t, W_t) when
  the student's map is larger (none when equal), then a 1x1 convolution C_s -> C_t. A student map
  smaller than the teacher's, a student vector against a teacher map larger than 1 x 1, or any other rank is refused:
  upsampling would invent detail the student does not have.
It is trained with the student (``HintStudent`` holds both, so the run's optimizer, checkpoints and
DistributedDataParallel see its parameters), saved as the run's ``projector.pt`` and never part of the
exported student (``student.pt`` holds the plain student).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
import torch.nn as nn

from kdpipe import KDPipeError
from kdpipe.losses import Outputs

PROJECTOR_FILE = "projector.pt"
# Blank inputs in the forward pass that finds a layer's shape per image: not 2, which a sequence-first or
# two-state output (a bidirectional RNN's (2, batch, D)) also has first, so take() could not tell the batch.
PROBE_BATCH = 3
UNHOOKABLE = {"torchscript": "a TorchScript module", "export": "a torch.export program"}


def hook_root(module: nn.Module, kind: str | None = None, what: str = "teacher") -> nn.Module:
    """The module whose named_modules() name the layers: the user's module inside kdpipe's TeacherOutput
    wrapper. TorchScript modules and torch.export programs run compiled code that calls no Python hooks:
    refused, naming the problem."""
    from kdpipe.checkpoint import TeacherOutput
    inner = module.inner if isinstance(module, TeacherOutput) else module
    if kind in UNHOOKABLE or isinstance(inner, torch.jit.ScriptModule):
        name = UNHOOKABLE.get(kind, "a TorchScript module")
        raise KDPipeError(f"--features needs a forward hook on the {what}'s layers, which {name} does not run: "
                          "give the teacher as a kdpipe checkpoint, a state dict or safetensors file with "
                          "--teacher-arch, or a pickled nn.Module")
    return inner


def find_module(root: nn.Module, name: str, what: str = "teacher") -> nn.Module:
    """The submodule at module path `name`; an unknown name is one line listing close names. A torchvision or
    timm model that kdpipe built for grey images sits behind its repeat to 3 channels (kdpipe.models._grey,
    ``Sequential(repeat, net)``): its layers are named as the user's model names them (``avgpool``, not
    ``1.avgpool``); the ``1.`` names that caches and runs of earlier versions recorded still resolve."""
    from kdpipe.models import _RepeatChannels
    wrapped = isinstance(root, nn.Sequential) and len(root) == 2 and isinstance(root[0], _RepeatChannels)
    mods = {n: m for n, m in (root[1] if wrapped else root).named_modules() if n}
    if name in mods:
        return mods[name]
    if wrapped and name.startswith("1.") and name[2:] in mods:
        return mods[name[2:]]
    close = difflib.get_close_matches(name, list(mods), n=6, cutoff=0.5)
    if not close and len(mods) <= 24:
        where = f"its modules: {', '.join(mods)}"
    elif not close:
        where = f"its top-level modules: {', '.join([n for n in mods if '.' not in n][:12])}"
    else:
        where = f"close names: {', '.join(close)}"
    raise KDPipeError(f"the {what} has no module {name!r} ({where}); name a layer by its path in "
                      "named_modules()")


class FeatureTap:
    """Within `with tap:`, every forward pass of the root keeps the outputs of the named modules in
    ``tap.out`` (layer -> tensor, as returned); ``take()`` hands them over after each pass. A module that
    returns anything but a tensor is refused, and so is one that runs more than once in a pass (a shared
    activation, such as torchvision's BasicBlock.relu): which of its outputs is the feature would be a guess."""

    def __init__(self, root: nn.Module, layers, what: str = "teacher"):
        self.modules = {layer: find_module(root, layer, what) for layer in layers}
        self.what = what
        self.out: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self):
        for layer, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(self._keep(layer)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _keep(self, layer):
        def hook(module, args, output):
            if not torch.is_tensor(output):
                raise KDPipeError(f"the {self.what}'s module {layer!r} returns {type(output).__name__}, not a "
                                  "tensor: name a module that returns one tensor")
            if layer in self.out:
                raise KDPipeError(f"the {self.what}'s module {layer!r} runs more than once in one forward pass (a "
                                  "module its forward calls several times): name a module that runs once, such "
                                  "as the block that contains it")
            self.out[layer] = output.clone()  # a later in-place op (ReLU(inplace=True)) must not change it
        return hook

    def take(self, batch: int | None = None) -> dict[str, torch.Tensor]:
        """The outputs of the last pass; with `batch` (the pass's number of inputs), each must hold one row
        per input: an output whose first dimension is not the batch (a sequence-first layout, a statistic
        over the batch) is refused, naming its shape."""
        out, self.out = self.out, {}
        missing = [layer for layer in self.modules if layer not in out]
        if missing:
            raise KDPipeError(f"the {self.what}'s module(s) {', '.join(map(repr, missing))} did not run in its "
                              "forward pass: name a layer its forward calls")
        for layer, v in out.items():
            if batch is not None and (v.ndim == 0 or v.shape[0] != batch):
                raise KDPipeError(f"the {self.what}'s module {layer!r} gives {tuple(v.shape)} for a batch of {batch} "
                                  "inputs: its first dimension is not the batch, so its rows are not one per image; "
                                  "name a module whose output is (batch, ...)")
        return out


def make_projector(student_shape, teacher_shape, student_layer: str = "", teacher_layer: str = "") -> nn.Module:
    """The learned map from the student's features (shape per image) to the teacher's (see the module
    docstring for the cases); other shapes are one line naming both."""
    s, t = tuple(int(v) for v in student_shape), tuple(int(v) for v in teacher_shape)
    what = (f"the student's layer {student_layer!r} gives {s}, the teacher's feature {teacher_layer!r} is {t}")
    if len(t) == 1 and len(s) == 1:
        return nn.Linear(s[0], t[0])
    if len(t) == 1 and len(s) == 3:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(s[0], t[0]))
    if len(t) == 3 and t[1:] == (1, 1) and len(s) == 1:  # a pooled map (torchvision's avgpool gives (C, 1, 1))
        return nn.Sequential(nn.Linear(s[0], t[0]), nn.Unflatten(1, t))
    if len(t) == 3 and len(s) == 3:
        if s[1] < t[1] or s[2] < t[2]:
            raise KDPipeError(f"{what}: the student's map is smaller than the teacher's; hint from an earlier "
                              "student layer or cache a later teacher layer")
        layers = [] if s[1:] == t[1:] else [nn.AdaptiveAvgPool2d(t[1:])]
        return nn.Sequential(*layers, nn.Conv2d(s[0], t[0], kernel_size=1))
    if len(t) == 3 and len(s) == 1:  # a vector cannot be spread over a map without inventing where
        raise KDPipeError(f"{what}: hints map vectors (C,) onto vectors or pooled maps (C, 1, 1), not onto a "
                          f"{t[1]} x {t[2]} map; hint from a student layer that gives a map (C, H, W) of at least "
                          f"{t[1]} x {t[2]}, or cache a pooled teacher layer (e.g. avgpool)")
    raise KDPipeError(f"{what}: hints map vectors (C,) or maps (C, H, W) onto vectors, or maps onto maps; name a "
                      "student layer (--hint-layer) and a cached feature whose outputs are of those shapes")


def layer_shape(model: nn.Module, layer: str, in_shape, device, what: str = "student") -> tuple:
    """The per-image shape of a named layer's output, from one forward pass of PROBE_BATCH blank images."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FeatureTap(model, [layer], what) as tap:
            model(torch.zeros((PROBE_BATCH, *in_shape), device=device))
            return tuple(tap.take(PROBE_BATCH)[layer].shape[1:])
    finally:
        model.train(was)


class HintStudent(nn.Module):
    """A student and its hint projector, trained as one module: the forward pass returns
    ``Outputs(logits, projected features of the student's layer)``. ``student`` is the plain student
    (evaluated, saved and exported on its own); ``projector`` is saved beside it in the run."""

    def __init__(self, student: nn.Module, layer: str, projector: nn.Module):
        super().__init__()
        self.student, self.projector, self.layer = student, projector, layer
        find_module(student, layer, "student")

    def forward(self, x):
        with FeatureTap(self.student, [self.layer], "student") as tap:
            logits = self.student(x)
            feats = tap.take(len(x))[self.layer]
        return Outputs(logits, self.projector(feats))


def plain(model: nn.Module) -> nn.Module:
    """The student itself: a HintStudent's student, any other model as it is."""
    return model.student if isinstance(model, HintStudent) else model


def save_projector(path, model: HintStudent, hint: dict) -> int:
    """The run's projector.pt: its weights and what it maps (student layer and shape, teacher feature and
    shape). Returns its size in bytes."""
    from kdpipe.cache.writer import atomic_write_stream
    state = {k: v.detach().cpu() for k, v in model.projector.state_dict().items()}
    obj = {"kdpipe_hint_projector": 1, "state_dict": state, **hint,
           "parameters": sum(p.numel() for p in model.projector.parameters())}
    atomic_write_stream(path, lambda f: torch.save(obj, f))
    return Path(path).stat().st_size
