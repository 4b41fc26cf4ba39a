"""Distillation beside quantization and pruning: every way of making the teacher small, measured alike.

From one teacher (a kdpipe checkpoint) `compress` builds
- int8 post-training quantization with torch.ao: dynamic (nn.Linear weights int8, activations quantized
  on the fly) and static (FX graph mode, observers calibrated on a few hundred training images, real
  int8 conv/linear kernels) on a chosen backend (x86, fbgemm, onednn or qnnpack);
- magnitude pruning at given sparsities, unstructured (the smallest |w| of all conv/linear weights
  but the classifier's, global) and structured (the output channels of smallest L2 norm in each layer
  whose channels feed one conv or linear only: the layers are rebuilt smaller, so CPU latency changes),
  each fine-tuned briefly, by default with KD from the teacher;
- the distilled students of a runs directory, each also int8-quantized.
Each model is one row: test top-1, agreement with the teacher, (non-zero) parameters, size on disk (a
TorchScript file with the input normalization, as `kdpipe export` writes), and CPU latency per image
(per row of a feature table) at batch 1 and 64. Written to DIR/compress.md, DIR/compress.json and DIR/compress.png.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe import KDPipeError
from kdpipe.cache.writer import atomic_write_bytes, atomic_write_json, atomic_write_stream
from kdpipe.checkpoint import LoadedModel
from kdpipe.data import ImageData, limited
from kdpipe.engine import OptimConfig, Run, make_optimizer, predict, sample_unit, steps_per_epoch, train_pass
from kdpipe.evaluate import agreement, cpu_latency_ms, cpu_name, eval_params, top1
from kdpipe.export import finite, load_model
from kdpipe.losses import create_loss
from kdpipe.util import ensure_out_dir, error_line, images_tensor
from kdpipe.views import ViewPolicy, create_policy, policy_from_identity
from kdpipe.teacher import check_resize

BACKENDS = ("x86", "fbgemm", "onednn", "qnnpack")
QUANT_KINDS = ("dynamic", "static")
PRUNE_KINDS = ("unstructured", "channels")
FINETUNE_LOSSES = ("kd", "ce")
LATENCY_BATCHES = (1, 64)


class NoKernel(Exception):
    """The quantized backend cannot run this model here (the table says so instead of failing)."""


@dataclass
class Row:
    name: str
    method: str  # fp32, int8 dynamic, int8 static, prune unstructured, prune channels
    source: str  # teacher, or the student run's name
    module: nn.Module | None
    loaded: LoadedModel
    parameters: int = 0
    nonzero: int = 0
    finetune: str = ""  # e.g. "1 epoch, KD from the teacher"
    note: str = ""
    metrics: dict = field(default_factory=dict)


# ---------------------------------------------------------------- quantization (torch.ao)

def supported_engines() -> list[str]:
    return list(torch.backends.quantized.supported_engines)


def _backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise KDPipeError(f"unknown quantization backend {backend!r}: use one of {', '.join(BACKENDS)}")
    built = supported_engines()
    if backend not in built:
        raise NoKernel(f"backend {backend} is not built into this torch (it has "
                       f"{', '.join(e for e in built if e != 'none')})")
    torch.backends.quantized.engine = backend


EVAL_BATCH = 256  # the test split is measured in batches of this many images (dynamic int8 depends on it)


def _trial(q: nn.Module, example: torch.Tensor, backend: str) -> None:
    """Run the int8 model once on `example`, as the measurements will (no grad): a model it cannot run is
    NoKernel here, a note in its row, not a traceback after every other row was built."""
    try:
        with torch.no_grad():
            q(example)
    except (RuntimeError, NotImplementedError) as e:  # e.g. "Could not run 'quantized::conv2d' ..."
        raise NoKernel(f"{backend} has no kernel for it: {str(e).strip().splitlines()[0][:120]}") from None
    except Exception as e:  # torch code that does not expect an int8 layer (TransformerEncoderLayer's fast path)
        raise NoKernel(f"the int8 model does not run ({type(e).__name__}: {error_line(e)[:120]})") from None


def quantize_dynamic(model: nn.Module, backend: str = "x86", example: torch.Tensor | None = None) -> nn.Module:
    """int8 weights for every nn.Linear, activations quantized per batch at run time; run once on `example`
    (normalized inputs), where given, to check that the int8 model runs."""
    _backend(backend)
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise KDPipeError("dynamic int8 quantization applies to nn.Linear layers, and the model has none: "
                          "use static quantization")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)
    if example is not None:
        _trial(q, example, backend)
    return q


def quantize_static(model: nn.Module, calibration: torch.Tensor, backend: str = "x86") -> nn.Module:
    """FX graph mode post-training quantization: observers calibrated on `calibration` (normalized inputs),
    then converted to int8 kernels of `backend`. Raises KDPipeError for a model FX cannot trace."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    _backend(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(backend),
                                  (calibration[:1],))
        except Exception as e:  # torch.fx raises many types for code it cannot trace
            raise KDPipeError(f"cannot quantize {type(model).__name__} statically: torch.fx cannot trace it "
                              f"({str(e).strip().splitlines()[0][:150]}); use --quantize dynamic") from None
        with torch.no_grad():
            for i in range(0, len(calibration), 64):
                prepared(calibration[i:i + 64])
        q = convert_fx(prepared)
    _trial(q, calibration[:2], backend)
    return q


# ---------------------------------------------------------------- pruning

def _prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _classifier(model: nn.Module, example: torch.Tensor | None) -> nn.Module | None:
    """The conv or linear layer that runs last on `example` (the one giving the logits), else the last one
    registered. A network of the user's may register its head first (self.head before self.body): the
    last registered layer was then a convolution, and the classifier was pruned while the table said it
    was kept dense."""
    layers = [m for m, _ in _prunable_weights(model)]
    if example is None:
        return layers[-1] if layers else None
    ran = []
    handles = [m.register_forward_hook(lambda mod, args, out: ran.append(mod)) for m in layers]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return ran[-1] if ran else (layers[-1] if layers else None)


def prune_unstructured(model: nn.Module, sparsity: float, example: torch.Tensor | None = None) -> nn.Module:
    """A copy with the fraction `sparsity` of the conv and linear weights (smallest |w| over the whole
    model) masked to zero; the masks stay during fine-tuning. `finalize` makes them permanent. The
    classifier (the last conv or linear layer to run on `example`, or the last registered without one)
    stays dense, as is usual: global magnitude pruning takes a wide network's small-weighted classifier
    nearly whole (99.98% of a ResNet-50's fc at 80%, measured), and the model then predicts one class."""
    import torch.nn.utils.prune as prune
    m = copy.deepcopy(model)
    head = _classifier(m, example)
    params = [(mod, name) for mod, name in _prunable_weights(m) if mod is not head]
    if not params:
        raise KDPipeError(f"{type(model).__name__} has no conv or linear weights to prune")
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=float(sparsity))
    return m


def finalize(model: nn.Module) -> nn.Module:
    """Fold pruning masks into the weights (a plain module again)."""
    import torch.nn.utils.prune as prune
    for mod in model.modules():
        for name in [k for k, v in getattr(mod, "_forward_pre_hooks", {}).items()
                     if isinstance(v, prune.BasePruningMethod)]:
            prune.remove(mod, mod._forward_pre_hooks[name]._tensor_name)
    return model


# Modules and functions that keep channel c in channel c (and so may sit between a layer whose output
# channels are removed and the one layer that reads them).
_CHANNELWISE_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU,
                        nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout,
                        nn.Identity)
_CHANNELWISE_FUNCTIONS = (F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.max_pool2d, F.avg_pool2d,
                          F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout)
_CHANNELWISE_METHODS = ("relu", "relu_")


def _channel_chains(gm, example: torch.Tensor) -> list[tuple[str, list[str], str, int]]:
    """(producer, [batch norms], consumer, features per channel) for each conv/linear whose output reaches
    exactly one conv (groups 1) or linear through channel-wise ops only (and at most one flatten)."""
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(example)
    mods = dict(gm.named_modules())
    chains = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods[node.target], (nn.Conv2d, nn.Linear)):
            continue
        prod = mods[node.target]
        if isinstance(prod, nn.Conv2d) and prod.groups != 1:
            continue
        cur, norms, per_channel = node, [], 1
        while True:
            users = list(cur.users)
            if len(users) != 1 or users[0].args[:1] != (cur,):
                break
            u = users[0]
            tensors = [a for a in list(u.args[1:]) + list(u.kwargs.values()) if isinstance(a, torch.fx.Node)]
            if tensors:
                break
            if u.op == "call_module" and isinstance(mods[u.target], (nn.Conv2d, nn.Linear)):
                c = mods[u.target]
                if (isinstance(c, nn.Conv2d) and (c.groups != 1 or per_channel != 1)) or (
                        isinstance(c, nn.Linear) and c.in_features != prod_out(prod) * per_channel):
                    break
                chains.append((node.target, norms, u.target, per_channel))
                break
            if u.op == "call_module" and isinstance(mods[u.target], nn.Flatten) or (
                    u.op == "call_function" and u.target is torch.flatten) or (
                    u.op == "call_method" and u.target == "flatten"):
                shape = cur.meta.get("tensor_meta").shape
                if per_channel != 1 or len(shape) != 4:
                    break
                per_channel = int(shape[2] * shape[3])
            elif u.op == "call_module" and isinstance(mods[u.target], _CHANNELWISE_MODULES):
                if isinstance(mods[u.target], (nn.BatchNorm1d, nn.BatchNorm2d)):
                    if per_channel != 1:  # after a flatten it normalizes each of C*H*W features, not C channels
                        break
                    norms.append(u.target)
            elif not ((u.op == "call_function" and u.target in _CHANNELWISE_FUNCTIONS) or
                      (u.op == "call_method" and u.target in _CHANNELWISE_METHODS)):
                break
            cur = u
    return chains


def prod_out(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def _take(p: torch.Tensor, idx: torch.Tensor, dim: int = 0) -> nn.Parameter:
    return nn.Parameter(p.detach().index_select(dim, idx).clone(), requires_grad=p.requires_grad)


def prune_channels(model: nn.Module, sparsity: float, example: torch.Tensor) -> tuple[nn.Module, int]:
    """A copy (a torch.fx GraphModule) in which each layer whose output channels feed one conv or linear
    only keeps the round((1 - sparsity) * n) channels of largest L2 weight norm (at least one): the
    layer, its batch norms and the reader are rebuilt smaller. Returns the model and how many layers
    shrank. Layers feeding a residual sum or the output keep their channels."""
    try:
        gm = torch.fx.symbolic_trace(copy.deepcopy(model).eval())
    except Exception as e:  # torch.fx raises many types for code it cannot trace
        raise KDPipeError(f"cannot prune the channels of {type(model).__name__}: torch.fx cannot trace it "
                          f"({str(e).strip().splitlines()[0][:150]})") from None
    chains = _channel_chains(gm, example[:2])
    keep = {}  # chosen on the weights before any layer shrinks, so the order of the chains does not matter
    for prod_name, *_ in chains:
        w = gm.get_submodule(prod_name).weight.detach()
        keep_n = max(1, int(round(len(w) * (1.0 - sparsity))))
        keep[prod_name] = torch.sort(torch.topk(w.flatten(1).norm(dim=1), keep_n).indices).values
    for prod_name, norms, cons_name, per_channel in chains:
        prod, cons = gm.get_submodule(prod_name), gm.get_submodule(cons_name)
        idx = keep[prod_name]
        keep_n = len(idx)
        prod.weight = _take(prod.weight, idx)
        if prod.bias is not None:
            prod.bias = _take(prod.bias, idx)
        if isinstance(prod, nn.Conv2d):
            prod.out_channels = keep_n
        else:
            prod.out_features = keep_n
        for bn_name in norms:
            bn = gm.get_submodule(bn_name)
            bn.num_features = keep_n
            if bn.affine:
                bn.weight, bn.bias = _take(bn.weight, idx), _take(bn.bias, idx)
            if bn.track_running_stats:
                bn.running_mean = bn.running_mean.index_select(0, idx).clone()
                bn.running_var = bn.running_var.index_select(0, idx).clone()
        cols = (idx[:, None] * per_channel + torch.arange(per_channel)[None, :]).flatten()
        cons.weight = _take(cons.weight, cols, dim=1)
        if isinstance(cons, nn.Conv2d):
            cons.in_channels = keep_n
        else:
            cons.in_features = keep_n * per_channel
    gm.recompile()
    return gm, len(chains)


def count_nonzero(model: nn.Module) -> int:
    """Non-zero entries of the parameters (after pruning masks, where there are any)."""
    total = 0
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            base = name.removesuffix("_orig")
            w = getattr(mod, base) if name.endswith("_orig") else p
            total += int((w != 0).sum())
    return total


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- fine-tuning

def finetune(model: nn.Module, train: ImageData, policy: ViewPolicy, mean, std, *, epochs: int,
             teacher: nn.Module | None, batch_size: int = 128, lr: float = 0.01, seed: int = 0,
             device="cpu", log=print) -> nn.Module:
    """A few epochs of SGD on fresh views (cosine schedule from `lr`): KD from `teacher` (T 4, alpha
    0.9) when given, plain cross-entropy otherwise, on `device`. Every epoch steps on every sample of `train`,
    in near-equal batches of at most `batch_size` (--finetune-samples 200 fine-tuned on 128: the last partial
    batch was dropped). Trains `model` in place and returns it on the CPU (where it is measured); the teacher is
    left where it was."""
    if epochs <= 0:
        return model
    device = torch.device(device)
    model.to(device)
    if teacher is not None and device.type != "cpu":
        teacher = copy.deepcopy(teacher).to(device)
    loss = create_loss("kd", temperature=4.0, alpha=0.9) if teacher is not None else create_loss("kd", alpha=0.0)
    steps = epochs * steps_per_epoch(len(train), batch_size, every_sample=True)
    optim = OptimConfig(lr=lr)
    opt, sched, _ = make_optimizer(model, optim, steps)
    run = Run("finetune", "pruned", loss, seed, model, opt, sched, optim=optim, total_steps=steps)
    images = images_tensor(train.images, device)
    labels = torch.from_numpy(train.labels).to(device)

    def fresh_views(epoch):
        return torch.from_numpy(policy.sample_view(seed + 2_000_003, epoch, train.images.shape)).to(device), None

    train_pass([run], images, labels, policy, mean, std, epochs, batch_size, seed, fresh_views,
               online_teacher=teacher, label="fine-tune", log=log, fuse=False, every_sample=True)
    return model.cpu().eval()


# ---------------------------------------------------------------- measuring

def _policy_of(model: LoadedModel, default: ViewPolicy | None = None) -> ViewPolicy:
    """The view policy a model trained on (its clean view is what it sees at test time): the one its
    checkpoint records (a teacher's, or a student's cache's), else `default` (the teacher's)."""
    ident = model.info.get("view_policy")
    if ident:
        return policy_from_identity(ident)
    return default if default is not None else create_policy("crop-flip", padding=0)


def _inputs(policy: ViewPolicy, data: ImageData, rows, mean, std) -> torch.Tensor:
    imgs = torch.from_numpy(np.ascontiguousarray(data.images[rows]))
    params = torch.from_numpy(eval_params(policy, data.image_shape, len(rows)))
    return policy.replay(imgs, params, mean, std)


def unit_of(data: ImageData) -> str:
    """What a sample of `data` is called: "image", or "row" for the feature vectors of a table (sample_unit's)."""
    return sample_unit(data.images).removesuffix("s")


def _written_by_compress(path: Path) -> bool:
    """Whether a file of OUT/models is a model an earlier compress wrote: its card beside it says so."""
    try:
        card = json.loads(Path(f"{path}.json").read_text())
        return card.get("model") == path.name and "compressed" in card.get("source", {})
    except (OSError, ValueError, AttributeError):
        return False


def measure(row: Row, test: ImageData, policy: ViewPolicy, teacher_pred: torch.Tensor | None, models_dir: Path,
            repeats: int, log=print) -> dict:
    """Test top-1, agreement, size of the exported TorchScript file, CPU latency at batch 1 and 64."""
    from kdpipe.export import export_model, write_card

    lo = row.loaded
    policy = _policy_of(lo, policy)  # a student's own clean view, as train-student measured it
    images = images_tensor(test.images, "cpu")
    params = torch.from_numpy(eval_params(policy, test.image_shape, len(test)))
    logits = predict(row.module, images, policy, params, lo.mean, lo.std, batch_size=EVAL_BATCH)
    m = {"test_top1": top1(logits, test.labels),
         "teacher_agreement": agreement(logits, teacher_pred) if teacher_pred is not None else 1.0}
    path = models_dir / f"{row.name}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res = export_model(lo, "torchscript", path, module=row.module)
            # the card beside it: its own input steps (a student's clean view is not the teacher's) and classes
            on = f"{len(test):,} samples of the test split" + (f" (--limit {test.limit}), not all of it"
                                                                if getattr(test, "limit", None) else "")
            write_card(res, lo, {"compressed": row.method, "test_top1": m["test_top1"], "test_top1_on": on})
            m["size_bytes"] = res["bytes"]
            m["file"] = path.name
        except KDPipeError as e:
            m["size_bytes"] = None
            row.note = (row.note + "; " if row.note else "") + f"not exported: {e}"
    for b in LATENCY_BATCHES:
        m[f"latency_ms_b{b}"] = cpu_latency_ms(row.module, lo.image_shape, repeats=repeats, warmup=3, batch=b)
    m["_logits"] = logits
    log(f"  {row.name}: top-1 {m['test_top1']:.4f}, agreement {m['teacher_agreement']:.4f}, "
        + (f"{m['size_bytes'] / 1e6:.2f} MB, " if m["size_bytes"] is not None else "not exported, ") +
        ", ".join(f"batch {b} {_ms(m[f'latency_ms_b{b}'])} ms/{unit_of(test)}" for b in LATENCY_BATCHES))
    return m


# ---------------------------------------------------------------- the whole comparison

def _fmt_sparsity(s: float) -> str:
    return f"{s * 100:g}"


def compress(teacher_path, train: ImageData, test: ImageData, out, *, students_dir=None,
             quantize=QUANT_KINDS, prune=PRUNE_KINDS, sparsities=(0.5, 0.8), backend: str = "x86",
             calibration: int = 256, finetune_epochs: int = 1, finetune_loss: str = "kd",
             finetune_samples: int | None = None, batch_size: int = 128, lr: float = 0.01, repeats: int = 20,
             seed: int = 0, device="cpu", full_train: ImageData | None = None, teacher_arch: str | None = None,
             arch_args=None, mean=None, std=None, input_range: str | None = None, normalize: str | None = None,
             log=print) -> dict:
    """Build, measure and tabulate every compressed model; write compress.md/.json/.png under `out`.
    `full_train`: the whole train split that `train` was limited from (default `train`), against which each
    student's recorded training data is checked (with the student's own limit). `teacher_arch` (with
    `arch_args`) and the normalization (`mean`/`std`, `input_range` or `normalize`, as dump-logits takes them):
    for a teacher given as a state dict or safetensors file (load_weights_teacher)."""
    for q in quantize:
        if q not in QUANT_KINDS:
            raise KDPipeError(f"unknown quantization {q!r}: use {', '.join(QUANT_KINDS)}")
    for p in prune:
        if p not in PRUNE_KINDS:
            raise KDPipeError(f"unknown pruning {p!r}: use {', '.join(PRUNE_KINDS)}")
    if backend not in BACKENDS:
        raise KDPipeError(f"unknown quantization backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if finetune_loss not in FINETUNE_LOSSES:
        raise KDPipeError(f"unknown fine-tuning loss {finetune_loss!r}: use kd or ce")
    for s in sparsities:
        if not 0 < s < 1:
            raise KDPipeError(f"sparsities must lie strictly between 0 and 1, got {s:g}")
    if finetune_epochs > 0 and prune:
        OptimConfig(lr=lr)  # a bad --lr is refused now, not after the teacher's measurements
    if teacher_arch is None and (mean, std, input_range, normalize) == (None, None, None, None) and arch_args is None:
        teacher = load_model(teacher_path)
    else:
        teacher = load_weights_teacher(teacher_path, teacher_arch, arch_args, full_train if full_train is not None
                                       else train, test, mean=mean, std=std, input_range=input_range,
                                       normalize=normalize)
    check_resize(teacher, test, "compress")  # its rows measured on photos brought to size otherwise than it saw
    dirs = [students_dir] if isinstance(students_dir, (str, os.PathLike)) else list(students_dir or [])
    students = [s for d in dirs for s in _students(d)]  # each a RUNS_DIR, or one run (a pipeline's runs, named)
    twice = sorted({name for name, _ in students if [n for n, _ in students].count(name) > 1})
    if twice:
        raise KDPipeError(f"two runs named {twice[0]} among {', '.join(map(str, dirs))}: give each run once")
    for d in dirs:
        unfinished = sorted(c.parent.name for c in Path(d).glob("*/config.json")
                            if not (c.parent / "metrics.json").is_file())
        if unfinished:
            log(f"note: {len(unfinished)} unfinished run(s) under {d} not measured (run their train-student "
                f"command again to finish them): {', '.join(unfinished)}")
    if teacher.num_classes != test.num_classes or tuple(teacher.info.get("dataset", {}).get("image_shape", [])) not in (
            (), tuple(test.image_shape)):
        spec = teacher.info.get("dataset", {}).get("spec")
        raise KDPipeError(f"the teacher was trained on {spec} ({teacher.num_classes} classes), not on {test.spec}: "
                          + (f"give --data {spec}, the data it was trained on" if spec else
                             "give --data of the data it was trained on"))
    other_teacher_data = _trained_on(teacher.info.get("dataset") or {},
                                     full_train if full_train is not None else train, {}) is False
    if other_teacher_data:
        log(f"note: {test.spec} is not the data the teacher was trained on (its fingerprint differs)")
    _check_fx(teacher.module, quantize, prune)
    policy = _policy_of(teacher)
    other_data = _check_students(students, teacher, policy, test, full_train if full_train is not None else train,
                                 log)
    foreign = sorted(p.name for p in Path(out, "models").glob("*.pt") if not _written_by_compress(p))
    if foreign:  # each would be overwritten by a row's model, or removed as an earlier compress's
        raise KDPipeError(f"{Path(out, 'models')} holds {', '.join(foreign)}, which kdpipe compress did not write: "
                          "choose another --out (compress writes its models to OUT/models and removes the ones it "
                          "wrote before)")
    out = ensure_out_dir(out, "compress output")
    models_dir = ensure_out_dir(out / "models", "models folder")
    mean, std = teacher.mean, teacher.std
    rng = np.random.default_rng(seed)
    calib_rows = np.sort(rng.choice(len(train), size=min(calibration, len(train)), replace=False))
    calib = _inputs(policy, train, calib_rows, mean, std)
    ft_train = limited(train, finetune_samples)  # drawn as --limit draws: a folder sorted by class keeps every class
    ft_teacher = teacher.module if finetune_loss == "kd" else None
    ft_batches = steps_per_epoch(len(ft_train), batch_size, every_sample=True)  # every sample, every epoch
    small, large = len(ft_train) // ft_batches, -(-len(ft_train) // ft_batches)
    ft_desc = (f"{finetune_epochs} epoch(s) on {len(ft_train):,} {unit_of(train)}s, each in {ft_batches:,} batch(es) "
               f"of {small}" + (f"-{large}" if large != small else "") + ", "
               + ("KD from the teacher (T 4, alpha 0.9)" if ft_teacher is not None else "cross-entropy"))
    threads = torch.get_num_threads()
    log(f"compress: teacher {teacher.arch} ({teacher.file}), {len(students)} student(s), backend {backend}, "
        f"{threads} thread(s)" + (f"; fine-tuning on {device}" if str(device) != "cpu" else ""))

    results: list[Row] = []

    def add(row: Row):
        row.parameters = row.parameters or count_params(row.module)
        row.nonzero = row.nonzero or count_nonzero(row.module)
        results.append(row)

    base = Row("teacher", "fp32", "teacher", teacher.module.eval(), teacher)
    add(base)
    for q in quantize:
        _quantized_row(add, results, base, q, calib, backend, log)
    example = calib[:2]
    for kind in prune:
        for s in sparsities:
            name = f"teacher-prune-{kind}-{_fmt_sparsity(s)}"
            log(f"pruning ({kind}, {s:.0%})" + (" and fine-tuning" if finetune_epochs > 0 else "") + f": {name}")
            t0 = time.perf_counter()
            if kind == "unstructured":
                m = prune_unstructured(teacher.module, s, example)
                note = f"{s:.0%} of conv/linear weights zeroed (global magnitude, the classifier kept dense)"
            else:
                m, layers = prune_channels(teacher.module, s, example)
                if layers == 0:
                    results.append(Row(name, f"prune {kind} {s:.0%}", "teacher", None, teacher,
                                       note="no layer's channels feed a single conv/linear: nothing removed"))
                    continue
                note = f"{s:.0%} of the channels of {layers} layer(s) removed (L2 magnitude)"
            m = finetune(m, ft_train, policy, mean, std, epochs=finetune_epochs, teacher=ft_teacher,
                         batch_size=batch_size, lr=lr, seed=seed, device=device, log=log)
            if finetune_epochs:
                note += f"; pruned and fine-tuned in {time.perf_counter() - t0:.0f}s"
            add(Row(name, f"prune {kind} {s:.0%}", "teacher", finalize(m).eval(), teacher,
                    finetune=ft_desc if finetune_epochs else "none", note=note))
    for run_name, loaded in students:
        method = "distilled" if loaded.info.get("_uses_teacher", True) else "scratch (no teacher)"
        if loaded.info.get("_diverged") or not finite(loaded.module):  # NaN weights: nothing to measure or quantize
            when = loaded.info.get("_diverged")
            results.append(Row(run_name, method, run_name, None, loaded,
                               note=(f"diverged in epoch {when}" if when else "weights not finite")
                               + ": not measured (its loss became NaN or infinite)"))
            log(f"  {run_name}: diverged, not measured")
            continue
        srow = Row(run_name, method, run_name, loaded.module.eval(), loaded, note=other_data.get(run_name, ""))
        add(srow)
        q = "static" if any(isinstance(x, nn.Conv2d) for x in loaded.module.modules()) else "dynamic"
        _quantized_row(add, results, srow, q, _inputs(_policy_of(loaded, policy), train, calib_rows, loaded.mean,
                                                      loaded.std), backend, log)

    log(f"measuring {len(results)} model(s) on {test.spec} test ({len(test):,} {unit_of(test)}s)")
    teacher_pred = None
    for row in results:
        if row.module is None:
            continue
        row.metrics = measure(row, test, policy, teacher_pred, models_dir, repeats, log)
        if row is base:
            teacher_pred = row.metrics["_logits"]
    for row in results:
        row.metrics.pop("_logits", None)
    written = {row.metrics.get("file") for row in results}
    for stale in sorted(models_dir.glob("*.pt")):  # an earlier run's model of a row no longer made, or not exported
        if stale.name not in written:
            stale.unlink()
            Path(f"{stale}.json").unlink(missing_ok=True)  # its card
            log(f"removed {stale}: a model of an earlier compress into {out} that this one did not write")
    machine = cpu_name()
    doc = {"teacher": teacher.file, "teacher_arch": teacher.arch, "data": test.spec, "test_images": len(test),
           "unit": unit_of(test),  # what test_images and the latencies count: image, or row of a feature table
           "backend": backend, "calibration_images": len(calib_rows), "finetune": ft_desc if finetune_epochs else "none",
           "finetune_epochs": finetune_epochs, "finetune_device": str(device),
           "finetune_settings": {"loss": finetune_loss, "lr": lr, "batch_size": batch_size, "samples": len(ft_train),
                                 "batches_per_epoch": ft_batches,
                                 "optimizer": "sgd", "schedule": "cosine"} if finetune_epochs else None,
           "seed": seed, "machine": machine,
           "threads": threads, "repeats": repeats, "teacher_trained_on_other_data": other_teacher_data,
           "latency_batches": list(LATENCY_BATCHES), "torch": torch.__version__,
           "rows": [_row_json(r) for r in results]}
    atomic_write_json(out / "compress.json", doc)
    plot = _plot(doc, out / "compress.png")
    atomic_write_bytes(out / "compress.md", _markdown(doc, plot).encode())
    return {"table": str(out / "compress.md"), "json": str(out / "compress.json"), "plot": str(plot),
            "rows": len(results)}


def check_teacher_file(path, arch: str | None, own: bool = False) -> None:
    """Refuse, in one line and before the data is decoded, a --teacher compress cannot read as given: weights alone
    (a state dict, safetensors) without --teacher-arch, or a kdpipe checkpoint given options (`own`: --teacher-arch,
    --arch-args or a normalization) that it records itself. TorchScript and torch.export programs are refused: their
    networks cannot be pruned or quantized by module."""
    from kdpipe.checkpoint import sniff
    from kdpipe.export import OTHER_FILES, resolve_model
    f = resolve_model(path)
    kind = sniff(f)
    takes = ("compress takes a kdpipe checkpoint (train-teacher's file or a run's student.pt), or weights alone (a "
             "state dict or safetensors file) with --teacher-arch and its normalization")
    if kind == "torch" and f.suffix != ".safetensors":
        what = _torch_file(f)
        if what == "pickle":  # export's 'need a kdpipe checkpoint' was false here, and a pickle is no state dict
            raise KDPipeError(f"{f} is a whole pickled model (torch.save(model)): {takes}; save its state_dict "
                              "(torch.save(model.state_dict(), FILE)) and give that file with --teacher-arch")
        weights = what == "weights"
    elif kind in ("torchscript", "export", "unknown"):  # export's 'need a kdpipe checkpoint' was false for compress
        raise KDPipeError(f"{f} is {OTHER_FILES.get(kind, kind)}: {takes}"
                          + ("" if kind == "unknown" else "; a program's layers cannot be quantized or pruned one by one"))
    else:
        weights = True  # safetensors
    if weights:
        if arch is None:
            raise KDPipeError(f"{f} holds weights alone ({'safetensors' if kind == 'safetensors' else 'a state dict'}): "
                              "give --teacher-arch SPEC (with --arch-args) and its input normalization (--mean/--std, "
                              "--input-range or --normalize), as to dump-logits")
        return
    if own:
        raise KDPipeError(f"{f} is a kdpipe checkpoint, which records its architecture and input normalization: drop "
                          "--teacher-arch, --arch-args and --mean/--std, --input-range or --normalize")


def _torch_file(f: Path) -> str:
    """What a file torch.save wrote holds, read without running its code: "checkpoint" (kdpipe's), "weights" (a
    state dict, or a dict holding one) or "pickle" (a whole pickled model). A file that does not load is refused."""
    from kdpipe.checkpoint import CHECKPOINT_VERSION, load_checkpoint_file
    try:
        obj = load_checkpoint_file(f)
    except KDPipeError as e:
        if "is a pickled Python object" in str(e):
            return "pickle"
        raise
    if isinstance(obj, dict) and obj.get("kdpipe_checkpoint") == CHECKPOINT_VERSION:
        return "checkpoint"
    return "weights"


def load_weights_teacher(path, arch, arch_args, train: ImageData, test: ImageData, *, mean=None, std=None,
                         input_range=None, normalize=None) -> LoadedModel:
    """A teacher of weights alone (a state dict or safetensors file, as dump-logits takes it with --teacher-arch)
    made into what compress measures: its network bare (the logits it returns are the teacher's: torch.fx traces
    it for static quantization and channel pruning), the normalization given, and the data's classes and storage
    (for its card). Any other file is refused: a kdpipe checkpoint records its own architecture and normalization."""
    from kdpipe.checkpoint import load_teacher
    from kdpipe.normalization import resolve_input
    check_teacher_file(path, arch, own=True)
    teacher = load_teacher(path, arch=arch, arch_args=arch_args, image_shape=tuple(test.image_shape),
                           num_classes=test.num_classes)
    if teacher.kind not in ("state_dict", "safetensors"):
        raise KDPipeError(f"{path} is a {teacher.kind} file: compress takes a kdpipe checkpoint, or a state dict or "
                          "safetensors file with --teacher-arch")
    norm = resolve_input(teacher, tuple(test.image_shape), mean=mean, std=std, input_range=input_range,
                         preset=normalize)
    # grey images fed to an RGB teacher as Grayscale(3) + Normalize: the per-channel step after the repeat lives in
    # the architecture's grey wrapper (kept below with the network); without it the rows measured another teacher
    teacher.set_grey_to_rgb(norm.get("grey_to_rgb"))
    module = teacher.module
    inner = getattr(module, "inner", None)
    if isinstance(inner, nn.Module):
        with torch.no_grad():  # a network that returns a tensor is measured, quantized and pruned as itself
            probe = inner.eval()(torch.zeros((2, *test.image_shape)))
        if isinstance(probe, torch.Tensor) and probe.shape == (2, test.num_classes):
            module = inner
    teacher.module = module.eval()
    teacher.mean, teacher.std = list(norm["mean"]), list(norm["std"])
    teacher.info = {"class_names": list(test.class_names), "dataset": train.identity(),
                    "normalization": norm, "kind": teacher.kind}
    return teacher


def _check_fx(model: nn.Module, quantize, prune) -> None:
    """Refuse, before any work, a teacher torch.fx cannot trace when static quantization or channel pruning
    (which trace it) are asked for: channel pruning failed only after the quantization and the unstructured
    pruning had run, and each fix of the command line met the next refusal."""
    instead = [alt for kind, alt in (("static" in quantize, "--quantize dynamic"),
                                     ("channels" in prune, "--prune unstructured")) if kind]
    if not instead:
        return
    try:
        torch.fx.symbolic_trace(copy.deepcopy(model).eval())
    except Exception as e:  # torch.fx raises many types for code it cannot trace
        raise KDPipeError(f"the teacher {type(model).__name__}: torch.fx cannot trace it "
                          f"({error_line(e)[:150]}), and static quantization and channel pruning "
                          f"need it: give {' '.join(instead)}") from None


def _quantized_row(add, results, src: Row, kind: str, calib, backend, log) -> None:
    name = f"{src.name}-int8-{kind}"
    method = f"int8 {kind} ({backend})"
    try:
        t0 = time.perf_counter()
        q = (quantize_dynamic(src.module, backend, calib[:2]) if kind == "dynamic" else
             quantize_static(src.module, calib, backend))
        note = (f"nn.Linear weights int8, activations quantized per batch (so its predictions depend on the batch: "
                f"accuracy measured in batches of {EVAL_BATCH})" if kind == "dynamic" else
                f"FX graph mode, calibrated on {len(calib)} training {sample_unit(calib)}")
        add(Row(name, method, src.source, q, src.loaded, parameters=count_params(src.module),
                nonzero=count_nonzero(src.module), note=f"{note}; {time.perf_counter() - t0:.1f}s"))
    except NoKernel as e:
        log(f"  {name}: {e}")
        results.append(Row(name, method, src.source, None, src.loaded, note=str(e)))
    except KDPipeError as e:
        if src.name == "teacher" and kind != "dynamic":
            raise  # asked for by name: the teacher cannot be quantized this way
        log(f"  {name}: {e}")
        results.append(Row(name, method, src.source, None, src.loaded, note=str(e)))


def _trained_on(d: dict, full_train: ImageData, seen: dict) -> bool | None:
    """Whether the dataset record `d` of a checkpoint is `full_train` limited as it was (--limit); None where it
    records no fingerprint. `seen` keeps the fingerprints of the limits already drawn."""
    from kdpipe.data import limited
    if not d.get("fingerprint") or d.get("split", full_train.split) != full_train.split:
        return None
    key = (d.get("limit"), d.get("limit_sampled", False))
    if key not in seen:
        seen[key] = limited(full_train, *key).fingerprint
    return seen[key] == d["fingerprint"]


def _other_teacher(lo: LoadedModel, teacher: LoadedModel) -> str:
    """A note for a distilled student whose run records other teacher(s) than `teacher` (by the sha256 of the
    file), else "": its row would read as distilled from the teacher it is compared with."""
    recorded = [t for t in lo.info.get("_teachers", []) if t.get("fingerprint")]
    if not lo.info.get("_uses_teacher", True) or not recorded:
        return ""
    if len(recorded) > 1:
        among = any(t["fingerprint"] == teacher.fingerprint for t in recorded)
        return (f"distilled from an ensemble of {len(recorded)} teachers"
                + (", this one among them" if among else ", this one not among them"))
    t = recorded[0]
    if t["fingerprint"] == teacher.fingerprint:
        return ""
    return (f"distilled from another teacher ({t.get('arch')}, {Path(str(t.get('file'))).name}, sha256 "
            f"{t['fingerprint'][:12]}) than {Path(teacher.file).name} (sha256 {teacher.fingerprint[:12]})")


def _check_cache_normalization(name: str, lo: LoadedModel, teacher: LoadedModel) -> None:
    """Refuse a teacher of weights alone given another normalization than the cache its student `lo` learnt from was
    dumped with (the student's checkpoint records the cache's, its run the teacher file's sha256): measured so, the
    teacher's rows and every agreement with it were of a teacher fed other inputs, a few points off, nothing said."""
    recorded = [t for t in lo.info.get("_teachers", []) if t.get("fingerprint")]
    if teacher.kind not in ("state_dict", "safetensors"):  # a kdpipe checkpoint's own normalization is not given here
        return
    if (len(recorded) != 1 or recorded[0]["fingerprint"] != teacher.fingerprint or None in (lo.mean, lo.std)
            or None in (teacher.mean, teacher.std)):
        return
    from kdpipe.normalization import format_values as fmt, same_normalization
    if same_normalization(lo.mean, lo.std, teacher.mean, teacher.std):
        return
    raise KDPipeError(f"student {name} learnt from a cache of {Path(teacher.file).name} whose teacher was fed inputs "
                      f"normalized with mean {fmt(lo.mean)}, std {fmt(lo.std)}; compress is given mean "
                      f"{fmt(teacher.mean)}, std {fmt(teacher.std)}: give the normalization the cache was dumped with "
                      "(--mean/--std, --input-range or --normalize), or the teacher's rows measure it fed other inputs")


def _check_students(students, teacher: LoadedModel, teacher_policy: ViewPolicy, test: ImageData,
                    full_train: ImageData, log) -> dict:
    """Refuse a student that cannot be measured on `test` (other classes, or inputs its clean view does not
    give); return run name -> a note for those trained on other data than `full_train` (with their own
    --limit), whose rows are measured on data they were not trained for, and for those distilled from
    another teacher than `teacher`."""
    notes, seen = {}, {}
    for name, lo in students:
        _check_cache_normalization(name, lo, teacher)
        other = _other_teacher(lo, teacher)
        if other:
            notes[name] = other
            log(f"note: student {name} was {other}")
        if lo.num_classes != test.num_classes:
            raise KDPipeError(f"student {name} has {lo.num_classes} classes, {test.spec} has {test.num_classes}: "
                              "give --students runs trained on this data")
        shape = tuple(_policy_of(lo, teacher_policy).output_shape(tuple(test.image_shape)))
        if shape != tuple(lo.image_shape):
            raise KDPipeError(f"student {name} takes inputs {tuple(lo.image_shape)}, the test images' clean views are "
                              f"{shape}: give --students runs trained on this data and views")
        d = lo.info.get("dataset") or {}
        if _trained_on(d, full_train, seen) is False:
            data_note = (f"trained on other data ({d.get('spec')}, {d.get('num_samples', '?')} samples, sha256 "
                         f"{d['fingerprint'][:12]}) than {full_train.spec}: measured on data it was not trained for")
            notes[name] = "; ".join(x for x in (notes.get(name), data_note) if x)
            log(f"note: student {name} was {data_note}")
    return notes


def _students(runs_dir) -> list[tuple[str, LoadedModel]]:
    """Every run under RUNS_DIR (or RUNS_DIR itself) with a student.pt and metrics.json, by name."""
    import json
    p = Path(runs_dir)
    dirs = [p] if (p / "metrics.json").is_file() else sorted(d.parent for d in p.glob("*/metrics.json"))
    if not dirs:
        raise KDPipeError(f"{p} holds no student runs (no */metrics.json): give the RUNS_DIR train-student wrote")
    out = []
    for d in dirs:
        loaded = load_model(d)
        metrics = json.loads((d / "metrics.json").read_text())
        loaded.info["_uses_teacher"] = metrics.get("uses_teacher", metrics.get("alpha", 1) != 0)
        loaded.info["_diverged"] = metrics.get("diverged_epoch")
        loaded.info["_teachers"] = list((metrics.get("ensemble") or {}).get("teachers", [])) or (
            [metrics["teacher"]] if isinstance(metrics.get("teacher"), dict) else [])
        out.append((d.name, loaded))
    return out


def _row_json(r: Row) -> dict:
    from kdpipe.export import input_spec
    dtype, shape = input_spec(r.loaded)
    return {"name": r.name, "method": r.method, "source": r.source, "arch": r.loaded.arch,
            "input_dtype": str(dtype).removeprefix("torch."), "input_shape": list(shape),
            "parameters": r.parameters or None, "nonzero_parameters": r.nonzero or None,
            "finetune": r.finetune or None, "note": r.note or None, "available": r.module is not None,
            **r.metrics}


def _f(x, spec):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _ms(x) -> str:
    """A latency in ms with 3 significant digits below 0.1 ms (a tiny model at batch 64 took 0.0004 ms per
    image, which 3 decimals showed as 0.000), 3 decimals above."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{3 if x >= 0.1 or x <= 0 else min(8, 2 - math.floor(math.log10(x)))}f}"


def _markdown(doc: dict, plot: Path) -> str:
    unit = doc.get("unit", "image")
    lines = ["# kdpipe compress", "",
             f"Teacher {doc['teacher_arch']} ({doc['teacher']}), {doc['data']} test split ({doc['test_images']:,} "
             f"{unit}s)" + (": not the data the teacher was trained on (its fingerprint differs)"
                           if doc.get("teacher_trained_on_other_data") else "") +
             f". CPU latency: median of {doc['repeats']} forward passes per batch size, milliseconds per "
             f"{unit}, on {doc['machine']}; torch {doc['torch']}, quantized backend {doc['backend']}. Size: the "
             "TorchScript file with its input normalization (what `kdpipe export` writes); pruned weights are "
             "stored dense, so unstructured pruning does not shrink it. Fine-tuning of pruned models: "
             f"{doc['finetune']}.", "",
             "| model | method | test top-1 | agreement with teacher | parameters (non-zero) | MB on disk | "
             f"ms/{unit} at batch 1 | ms/{unit} at batch 64 | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        params = "–" if not r["parameters"] else (
            f"{r['parameters']:,}" + ("" if r["nonzero_parameters"] == r["parameters"] else
                                      f" ({r['nonzero_parameters']:,})"))
        note = "; ".join(x for x in (("fine-tuned: " + r["finetune"]) if r["finetune"] else "", r["note"] or "") if x)
        lines.append(f"| {r['name']} | {r['method']} | {_f(r.get('test_top1'), '.4f')} | "
                     f"{_f(r.get('teacher_agreement'), '.4f')} | {params} | "
                     f"{_f(None if r.get('size_bytes') is None else r['size_bytes'] / 1e6, '.3f')} | "
                     f"{_ms(r.get('latency_ms_b1'))} | {_ms(r.get('latency_ms_b64'))} | "
                     f"{(note or '').replace('|', '/')} |")
    lines += ["", f"![accuracy against CPU latency and size]({plot.name})", ""]
    return "\n".join(lines)


def _plot(doc: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in doc["rows"] if r.get("test_top1") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    markers = {"fp32": "*", "int8": "o", "prune": "s", "distilled": "D", "scratch": "^"}
    # Seeds of one student setting share a colour and one label (a sweep of 3 seeds would pile 6 labels up)
    setting = {r["name"]: re.sub(r"-h[0-9a-f]{6}", "", re.sub(r"-s\d+(?=(-int8-\w+)?$)", "", r["name"]))
               for r in rows}
    bases = sorted({re.sub(r"-int8-\w+$", "", setting[r["name"]]) for r in rows if r["source"] != "teacher"})
    colour = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(bases)}
    for ax, key, label in ((axes[0], "latency_ms_b1", f"CPU latency at batch 1 (ms/{doc.get('unit', 'image')})"),
                           (axes[1], "size_bytes", "size on disk (MB)")):
        labelled = set()
        for r in rows:
            x = r.get(key)
            if x is None:
                continue
            x = x / 1e6 if key == "size_bytes" else x
            kind = r["method"].split()[0]
            name = setting[r["name"]]
            ax.scatter([x], [r["test_top1"]], marker=markers.get(kind, "o"), s=80 if kind == "fp32" else 36,
                       color="k" if r["source"] == "teacher" else colour[re.sub(r"-int8-\w+$", "", name)])
            if name not in labelled:
                labelled.add(name)
                ax.annotate(name, (x, r["test_top1"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(  # 2 and 5 times a power of ten
            lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("test top-1")
        ax.grid(alpha=0.3)
    axes[0].set_title("accuracy against CPU latency")
    axes[1].set_title("accuracy against size")
    fig.suptitle(f"{doc['teacher_arch']} on {doc['data']}: black from the teacher, a colour per student setting "
                 f"(its seeds labelled once; * fp32, o int8, s pruned, D distilled, ^ scratch)", fontsize=9)
    fig.tight_layout()
    atomic_write_stream(path, lambda f: fig.savefig(f, dpi=120, format="png"))  # a full disk: one line
    plt.close(fig)
    return path
