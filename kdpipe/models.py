"""Architectures by name. ``create_model(spec, num_classes, image_shape, args)``.

A spec names where the architecture comes from, and is written into checkpoints as its canonical form:

  kdpipe:NAME          this registry (also bare NAME): Hinton-style MLPs, small CNNs, CIFAR ResNets
                       (resnet8x4, resnet20, resnet32x4, resnet56, resnet110, as in the CRD/RepDistiller
                       papers), WRNs, a CIFAR-adapted ResNet-18;
  mlp:512,256[:dropout=P], dscnn:WIDTH[:dropout=P]
                       parametric families of this registry: an MLP with those hidden layers, a
                       MobileNet-style depthwise-separable CNN of that base width;
  tv:NAME              a torchvision classification model (also bare NAME, when the registry has no
                       such name; registry and torchvision names never overlap), random weights;
  timm:NAME            a timm model (optional extra: pip install kdpipe[timm]), random weights; built for
                       the images' channels, or with --arch-args in_chans=3 for an RGB model's weights on
                       grey images (repeated to 3 channels, as for torchvision models);
  path/to/nets.py:F    the user's own code: F (a class or function) in that file;
  package.module:F     F in an importable module.

``args`` (``--arch-args k=v,...``) go to the factory as keyword arguments. A user factory also gets
``num_classes`` and ``image_shape`` when it takes parameters of those names (or **kwargs).
Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe import KDPipeError
from kdpipe.sweep import parse_arch_args  # noqa: F401  (pure Python, since run names depend on it)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_TAKES_FEATURES: set[str] = set()  # architectures that also take feature vectors (D,), not only images
_FAMILIES: dict[str, tuple[Callable[..., nn.Module], str, bool]] = {}  # name -> (factory, usage, takes features)

SCHEMES = ("kdpipe", "tv", "timm")  # named sources; user code is PATH.py:NAME or package.module:NAME
_SCHEME_ALIASES = {"torchvision": "tv"}
ARCH_HELP = ("registry name (kdpipe:NAME or bare), torchvision (tv:NAME or bare), timm:NAME, or your own code: "
             "path/to/nets.py:Factory or package.module:Factory")
TIMM_PIP = "pip install 'kdpipe[timm]'"


def register(name: str, *, features: bool = False):
    """Register a factory ``fn(num_classes, image_shape, **options)``; ``features=True`` when it also builds
    for inputs of shape (D,) (tabular feature vectors), as the MLPs do."""
    def deco(fn):
        if name in _REGISTRY:  # a second factory silently replaced the first, for every run and checkpoint
            raise ValueError(f"architecture {name!r} is registered twice")
        _REGISTRY[name] = fn
        if features:
            _TAKES_FEATURES.add(name)
        return fn
    return deco


def register_family(name: str, usage: str, *, features: bool = False):
    """Register a parametric family, written NAME:ARGS: ``fn(args, options, num_classes, image_shape)`` gets
    the positional ARGS (strings) and the OPTION=VALUE options (strings); `usage` is its syntax for errors."""
    def deco(fn):
        if name in _FAMILIES:
            raise ValueError(f"architecture family {name!r} is registered twice")
        _FAMILIES[name] = (fn, usage, features)
        return fn
    return deco


def registered() -> list[str]:
    return sorted(_REGISTRY)


def families() -> list[str]:
    """The parametric families' usages, e.g. 'mlp:H[,H...][:dropout=P]'."""
    return [usage for _, usage, _ in _FAMILIES.values()]


def _feature_archs() -> str:
    return ", ".join(sorted(_TAKES_FEATURES) + [u for _, u, f in _FAMILIES.values() if f])


def _create_family(name: str, num_classes: int, image_shape) -> nn.Module:
    family, _, rest = name.partition(":")
    fn, usage, features = _FAMILIES[family]
    if len(image_shape) == 1 and not features:
        raise KDPipeError(f"{name} takes images (C, H, W), not feature vectors {tuple(image_shape)}: "
                          f"use one of {_feature_archs()}")
    parts = rest.split(":")
    args = [a.strip() for a in parts[0].split(",")] if parts[0].strip() else []
    if "" in args:  # mlp:512,,256 or mlp:512,256, -- a size left out, or a stray comma: not for kdpipe to guess
        raise KDPipeError(f"architecture {name!r} has an empty size (a doubled or trailing comma): write {usage}")
    words = [a for a in args if not re.fullmatch(r"[0-9]+", a)]  # int() takes +512, 1_000 and non-ASCII digits
    if words:
        raise KDPipeError(f"bad architecture {name!r} ({words[0]!r} is not a size written in the digits 0-9): "
                          f"write {usage}")
    options = {}
    for item in parts[1:]:
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or key.strip() in options:
            raise KDPipeError(f"bad option {item!r} in architecture {name!r}: write {usage}")
        options[key.strip()] = value.strip()
    # one spelling per model: the spec names its runs and is its checkpoints' record, so 'mlp:512, 256' (a
    # run name with a space) or 'mlp:0512' would train the model of mlp:512,256 or mlp:512 again, named apart
    spelled = ":".join([f"{family}:{','.join(str(int(a)) for a in args)}"] + [f"{k}={v}" for k, v in options.items()])
    if spelled != name:
        raise KDPipeError(f"write architecture {name!r} as {spelled!r}: without spaces or leading zeros, as run "
                          "names and checkpoints record it")
    try:
        return fn(args, options, num_classes, tuple(image_shape))
    except (ValueError, TypeError) as e:
        raise KDPipeError(f"bad architecture {name!r} ({e}): write {usage}") from None


def recorded_spelling(spec: str) -> str:
    """The one spelling of a parametric spec that a checkpoint of an older kdpipe records as the user wrote it
    ('mlp:32, 16', 'mlp:032', 'mlp:512,,256'), which that kdpipe built as it builds mlp:32,16, mlp:32 and mlp:512,256
    (empty sizes dropped, sizes read by int()); any other spec as it is. The checkpoint cannot be written otherwise:
    refused in create_model, it could no longer be loaded (dump-logits, export, compress, evaluate)."""
    spec = str(spec).strip()
    family, colon, rest = spec.partition(":")
    if not colon or family not in _FAMILIES:
        return spec
    parts = rest.split(":")
    try:
        sizes = [str(int(a)) for a in parts[0].split(",") if a.strip()]
    except ValueError:
        return spec  # not what an older kdpipe built either: create_model says what is wrong
    options = [f"{k.strip()}={v.strip()}" for k, eq, v in (item.partition("=") for item in parts[1:])]
    return ":".join([f"{family}:{','.join(sizes)}"] + options)


def torchvision_models() -> list[str]:
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def parse_spec(spec: str) -> tuple[str, str]:
    """(scheme, name): scheme is kdpipe, tv, timm, file (name 'PATH.py:ATTR') or module ('pkg.mod:ATTR')."""
    spec = str(spec).strip()
    if spec.partition(":")[0] in _FAMILIES and spec.partition(":")[1]:
        return "family", spec
    after = spec.partition(":")[2]
    if spec.startswith(("kdpipe:", "tv:", "torchvision:")) and after.partition(":")[0] in _FAMILIES and ":" in after:
        # else 'after ':' comes the name of a class or function in your code', which kdpipe:mlp:512 is not
        raise KDPipeError(f"architecture {spec!r}: write {after} (a parametric family of kdpipe's registry takes "
                          "no prefix)")
    head, colon, rest = spec.rpartition(":")
    if colon:
        scheme = _SCHEME_ALIASES.get(head, head)
        if scheme in SCHEMES:
            if not rest:
                raise KDPipeError(f"architecture {spec!r} names no model after '{head}:'")
            return scheme, rest
        if not rest.isidentifier():
            raise KDPipeError(f"architecture {spec!r}: after ':' comes the name of a class or function in your "
                              f"code; use {ARCH_HELP}")
        if head.endswith(".py"):
            return "file", spec
        if re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", head):
            return "module", spec
        raise KDPipeError(f"architecture {spec!r}: unknown scheme {head!r}; use {ARCH_HELP}")
    if spec in _REGISTRY:
        return "kdpipe", spec
    if spec in torchvision_models():
        return "tv", spec
    raise KDPipeError(f"unknown architecture {spec!r}: use one of {', '.join(registered() + families())} "
                      f"or a torchvision classification model name ({ARCH_HELP})")


def canonical(spec: str) -> str:
    """The unambiguous form written into checkpoints: kdpipe:cnn_small, tv:resnet18, timm:..., or the
    user spec as given."""
    scheme, name = parse_spec(spec)
    return name if scheme in ("file", "module", "family") else f"{scheme}:{name}"


def create_model(name: str, num_classes: int, image_shape: tuple[int, ...], args: dict | None = None) -> nn.Module:
    """Build an architecture (see the module's doc for specs) for (C, H, W) images or (D,) features."""
    scheme, base = parse_spec(name)
    args = parse_arch_args(args)
    features = len(image_shape) == 1
    if features and scheme in ("kdpipe", "tv", "timm") and base not in _TAKES_FEATURES:
        raise KDPipeError(f"{name} takes images (C, H, W), not feature vectors {tuple(image_shape)}: "
                          f"use one of {_feature_archs()}")
    if len(image_shape) not in (1, 3):
        raise KDPipeError(f"inputs must be images (C, H, W) or feature vectors (D,), got shape {tuple(image_shape)}")
    if scheme == "family":
        if args:
            raise KDPipeError(f"{name} takes its options in the spec (e.g. mlp:512,256:dropout=0.2), not "
                              "in --arch-args")
        return _create_family(base, num_classes, image_shape)  # base: the spec without surrounding spaces
    if scheme == "kdpipe":
        if base not in _REGISTRY:
            raise KDPipeError(f"unknown architecture {name!r}: the registry has {', '.join(registered())}")
        _no_num_classes(name, args, num_classes)
        return _call(_REGISTRY[base], name, args, num_classes=num_classes, image_shape=tuple(image_shape))
    if scheme == "tv":
        if base not in torchvision_models():
            raise KDPipeError(f"{name!r}: torchvision has no classification model {base!r}")
        import torchvision
        args = dict(args)
        _no_num_classes(name, args, num_classes)
        if "in_chans" in args:  # timm's option, copied over: torchvision's builders fail on it with a TypeError line
            raise KDPipeError(f"{name} takes no in_chans: a torchvision architecture repeats grey images to its 3 "
                              "channels by itself (in_chans=3 is for timm and program teachers): drop it from "
                              "--arch-args")
        cifar_stem = args.pop("cifar_stem", False)
        if not isinstance(cifar_stem, bool):  # cifar_stem=no reached here as the string 'no', which is true
            raise KDPipeError(f"{name}: --arch-args cifar_stem={cifar_stem} is not true or false, which cifar_stem "
                              "takes: write cifar_stem=true or cifar_stem=false")
        try:
            net = torchvision.models.get_model(base, weights=None, num_classes=num_classes, **args)
        except Exception as e:  # torchvision raises various types for bad settings
            raise KDPipeError(f"cannot build torchvision model {base}: {_first_line(e)}") from None
        check_option_types(type(net).__init__, name, args)  # the builder passes them on to the class in **kwargs
        if cifar_stem:
            _cifar_stem(net, name)
        return _grey(net, image_shape)
    if scheme == "timm":
        timm = import_timm()
        args = dict(args)
        _no_num_classes(name, args, num_classes)
        chans = args.pop("in_chans", image_shape[0])  # in_chans=3: an RGB model's weights, grey images repeated
        if len(image_shape) == 3 and chans != image_shape[0] and chans != 3:
            raise KDPipeError(f"{name} with in_chans={chans} cannot take {image_shape[0]}-channel images: kdpipe "
                              "repeats grey images to in_chans=3 only")
        try:
            net = timm.create_model(base, pretrained=False, num_classes=num_classes, in_chans=chans, **args)
        except Exception as e:  # timm raises RuntimeError for unknown names, TypeError for bad options
            raise KDPipeError(f"cannot build timm model {base}: {_first_line(e)}") from None
        check_option_types(type(net).__init__, name, args)
        return net if chans == image_shape[0] else _grey(net, image_shape)
    factory = user_factory(name)
    given = {"num_classes": num_classes, "image_shape": tuple(image_shape)}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    extra = {k: v for k, v in given.items() if (k in params or var_kw) and k not in args}
    net = _call(factory, name, args, **extra)
    if not isinstance(net, nn.Module):
        raise KDPipeError(f"{name} returned a {type(net).__name__}, not a torch.nn.Module")
    return net


def _no_num_classes(name: str, args: dict, num_classes: int) -> None:
    """Refuse num_classes in the --arch-args of an architecture kdpipe builds with the data's classes itself: the
    builder failed on it with "got multiple values for keyword argument 'num_classes'" (torchvision, timm), or the
    registry's with "does not take the options num_classes", neither saying what to do."""
    if "num_classes" in args:
        raise KDPipeError(f"{name}: --arch-args num_classes={args['num_classes']}: kdpipe builds it with one output per "
                          f"class of the data ({num_classes}) itself: drop num_classes from --arch-args"
                          + ("" if args["num_classes"] == num_classes else
                             " (a teacher of another number of classes cannot be cached for this data)"))


def check_model(name: str, num_classes: int, image_shape, args: dict | None = None) -> None:
    """Build the architecture and run it on two blank inputs: it must return logits (2, num_classes).
    A one-line KDPipeError otherwise, before any training starts (user code and timm can return anything)."""
    import torch
    net = create_model(name, num_classes, image_shape, args).eval()
    if not any(p.requires_grad for p in net.parameters()):  # else a traceback from backward() in the first step
        raise KDPipeError(f"{name} has no trainable parameters (none, or all with requires_grad=False): kdpipe "
                          "trains it, so leave some of its parameters trainable")
    for mode in ("eval", "train"):  # it trains in training mode: GoogLeNet and Inception add aux logits only there
        try:
            with torch.no_grad():
                out = net.train(mode == "train")(torch.zeros((2, *image_shape)))
        except Exception as e:
            from kdpipe.util import error_line
            raise KDPipeError(f"{name} fails on inputs of shape {(2, *tuple(image_shape))}"
                              f"{' in training mode' if mode == 'train' else ''}: {error_line(e)}") from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
            aux = " (give --arch-args aux_logits=false)" if hasattr(net, "aux_logits") or (
                isinstance(net, nn.Sequential) and hasattr(net[-1], "aux_logits")) else ""
            raise KDPipeError(f"{name} returns {got} for a batch of 2{' in training mode' if mode == 'train' else ''}, "
                              f"not logits (2, {num_classes}): kdpipe trains models that return one logits "
                              f"tensor{aux}")


def _takes_bool(param: inspect.Parameter) -> bool:
    """Whether a parameter's default (or, without one, its annotation) says it takes true/false."""
    if param.default is not inspect.Parameter.empty and param.default is not None:
        return isinstance(param.default, bool)
    return param.annotation in (bool, "bool")


def check_option_types(fn, name: str, args: dict) -> None:
    """Refuse a word given for an option that takes true/false, by `fn`'s signature: --arch-args parses what is
    not true/false/none or a number as a string, and zero_init_residual=maybe (or =yes) reached the model, where
    any non-empty string is true. (A word for a number fails in the model's own code: _call says so.)"""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    for key, value in args.items():
        if key in params and _takes_bool(params[key]) and isinstance(value, str):
            raise KDPipeError(f"{name}: --arch-args {key}={value} is not true or false, which {key} takes (its "
                              f"default is {params[key].default!r}): write {key}=true or {key}=false")


def _call(factory, name, args, **fixed):
    """factory(**fixed, **args); arguments that do not fit its signature, or of the wrong kind
    (check_option_types), and any error the factory (the user's code) raises while it builds, are one-line
    KDPipeErrors."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have none: let the call say
        sig = None
    check_option_types(factory, name, args)
    try:
        if sig is not None:
            sig.bind(**fixed, **args)
        else:
            return factory(**fixed, **args)
    except TypeError as e:
        if args and "argument" in str(e):
            takes = sig.parameters if sig is not None and not any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()) else {}
            unknown = [k for k in args if k not in takes] or list(args)
            raise KDPipeError(f"{name} does not take the options {', '.join(unknown)}: {_first_line(e)}") from None
        if "argument" not in str(e):
            raise
        raise KDPipeError(f"{name} cannot be built: {_first_line(e)}; kdpipe gives num_classes and image_shape, "
                          "give the others with --arch-args KEY=VALUE,...") from None
    try:
        return factory(**fixed, **args)
    except KDPipeError:
        raise
    except Exception as e:
        from kdpipe.util import error_line
        raise KDPipeError(f"{name} raised {type(e).__name__} while building the model: {error_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _grey(net: nn.Module, image_shape) -> nn.Module:
    c = image_shape[0]
    return net if c == 3 else nn.Sequential(_RepeatChannels(3 // c if 3 % c == 0 else 1, c), net)


def import_timm():
    try:
        import timm
    except ImportError:
        raise KDPipeError(f"timm: architectures need the optional package timm: {TIMM_PIP}") from None
    return timm


_USER_MODULES: dict[tuple[str, str], object] = {}


def user_file(spec: str) -> Path | None:
    """The source file of a user spec (PATH.py:NAME, or the module's file for package.module:NAME)."""
    scheme, _ = parse_spec(spec)
    if scheme == "file":
        return Path(spec.rpartition(":")[0])
    if scheme == "module":
        mod = _import_module(spec.rpartition(":")[0], spec)
        f = getattr(mod, "__file__", None)
        return Path(f) if f else None
    return None


def _import_module(modname: str, spec: str):
    try:
        return importlib.import_module(modname)
    except Exception as e:  # ImportError, or the user's module raising while it loads
        raise KDPipeError(f"cannot import {modname} for architecture {spec}: {_first_line(e)}") from None


def user_factory(spec: str):
    """The class or function a user spec names, loaded from its file or module."""
    scheme, _ = parse_spec(spec)
    where, _, attr = spec.rpartition(":")
    if scheme == "file":
        path = Path(where)
        if not path.is_file():
            raise KDPipeError(f"architecture {spec}: no such file {path}")
        from kdpipe.util import file_sha256
        key = (str(path.resolve()), file_sha256(path))
        if key not in _USER_MODULES:
            modname = f"kdpipe_user_{key[1][:16]}"
            loader_spec = importlib.util.spec_from_file_location(modname, path)
            mod = importlib.util.module_from_spec(loader_spec)
            sys.modules[modname] = mod  # dataclasses and pickling look modules up by name
            try:
                loader_spec.loader.exec_module(mod)
            except Exception as e:
                sys.modules.pop(modname, None)
                raise KDPipeError(f"cannot load {path} for architecture {spec}: {type(e).__name__}: "
                                  f"{_first_line(e)}") from None
            _USER_MODULES[key] = mod
        mod = _USER_MODULES[key]
    else:
        mod = _import_module(where, spec)
    if not hasattr(mod, attr):
        names = sorted(n for n, v in vars(mod).items() if callable(v) and not n.startswith("_"))
        raise KDPipeError(f"{where} has no {attr} (it defines {', '.join(names[:12]) or 'nothing callable'})")
    factory = getattr(mod, attr)
    if not callable(factory):
        raise KDPipeError(f"architecture {spec}: {attr} is a {type(factory).__name__}, not a class or function that "
                          "builds the model")
    return factory


def model_recipe(spec: str, args: dict | None = None) -> dict:
    """How to rebuild a model, for checkpoints: canonical spec, options and, for user code, its file and
    sha256 (checked when the checkpoint is loaded)."""
    from kdpipe.util import file_sha256
    out = {"spec": canonical(spec), "args": parse_arch_args(args)}
    f = user_file(spec)
    if f is not None:
        out.update(file=str(f.resolve()), sha256=file_sha256(f))
    return out


def check_recipe(recipe: dict) -> list[str]:
    """Warnings about a recorded recipe: the user file changed since the checkpoint was written."""
    if "sha256" not in recipe:
        return []
    from kdpipe.util import file_sha256
    f = user_file(recipe["spec"])
    if f is None or not f.is_file():
        return []
    now = file_sha256(f)
    if now != recipe["sha256"]:
        return [f"{f} has changed since the checkpoint was written (sha256 {recipe['sha256'][:12]} then, "
                f"{now[:12]} now): the model is built from the file as it is now"]
    return []


def _cifar_stem(net: nn.Module, name: str) -> None:
    """arch_args cifar_stem=true for a torchvision ResNet (resnet*, resnext*, wide_resnet*): the 7x7
    stride-2 stem convolution becomes a 3x3 stride-1 one and the max-pool goes, as CIFAR training
    scripts adapt these models to 32 x 32 images (the ImageNet stem leaves layer4 a 1 x 1 map there).
    The weights keep their names: state dicts of models adapted this way load."""
    conv = getattr(net, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not isinstance(getattr(net, "maxpool", None), nn.MaxPool2d):
        raise KDPipeError(f"{name}: cifar_stem applies to torchvision ResNets (conv1 and maxpool), "
                          "not to this model")
    net.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's ResNet
    net.maxpool = nn.Identity()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _RepeatChannels(nn.Module):
    """Lets a 3-channel torchvision model take grey images. A teacher fed as torchvision's Grayscale(3) +
    Normalize(mean, std) also normalizes each channel after the repeat (`rgb`: {"mean", "std"} of 3 values,
    set by kdpipe.checkpoint.TeacherOutput.set_grey_to_rgb; not a weight: None for every kdpipe model)."""

    def __init__(self, times: int, c: int):
        super().__init__()
        if c * times != 3:
            raise KDPipeError(f"torchvision models take 3 channels; cannot adapt {c}-channel images")
        self.times = times
        self.rgb = None

    def forward(self, x):
        x = x.repeat(1, self.times, 1, 1)
        return x if getattr(self, "rgb", None) is None else per_channel(x, self.rgb)


def per_channel(x: torch.Tensor, rgb: dict) -> torch.Tensor:
    """(x - mean_c) / std_c per channel of images (B, C, H, W), in float32, as torchvision's Normalize computes it
    (the same bits for the same inputs)."""
    shape = (1, -1, 1, 1)
    m = torch.as_tensor(rgb["mean"], dtype=torch.float32, device=x.device).view(shape)
    s = torch.as_tensor(rgb["std"], dtype=torch.float32, device=x.device).view(shape)
    return (x.float() - m) / s


# ---------------------------------------------------------------- MLPs and small CNNs

class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: list[int], num_classes: int, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            prev = h
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def _numel(shape) -> int:
    """Inputs per sample: C*H*W for images, D for feature vectors."""
    n = 1
    for s in shape:
        n *= int(s)
    return n


@register("mlp_1200", features=True)
def mlp_1200(num_classes, image_shape):
    """Hinton et al.'s big net: 784-1200-1200-10 with dropout."""
    return MLP(_numel(image_shape), [1200, 1200], num_classes, dropout=0.5)


@register("mlp_800", features=True)
def mlp_800(num_classes, image_shape):
    """Hinton et al.'s small net: 784-800-800-10."""
    return MLP(_numel(image_shape), [800, 800], num_classes)


@register("mlp_100", features=True)
def mlp_100(num_classes, image_shape):
    """A tiny MLP: 784-100-10."""
    return MLP(_numel(image_shape), [100], num_classes)


def _dropout(options: dict) -> float:
    p = float(options.pop("dropout", 0.0))
    if not 0 <= p < 1:
        raise ValueError(f"dropout must lie in [0, 1), got {p:g}")
    if options:
        raise ValueError(f"unknown option(s) {', '.join(sorted(options))}")
    return p


@register_family("mlp", "mlp:H[,H...][:dropout=P]", features=True)
def mlp_family(args, options, num_classes, image_shape):
    """mlp:512,256 is input-512-256-classes with ReLUs; :dropout=P after each hidden layer."""
    hidden = [int(a) for a in args]
    if not hidden or min(hidden) < 1:
        raise ValueError("give one or more hidden sizes >= 1")
    return MLP(_numel(image_shape), hidden, num_classes, dropout=_dropout(dict(options)))


class SmallCNN(nn.Module):
    def __init__(self, in_ch: int, num_classes: int, widths=(32, 64), hidden: int = 128, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_ch
        for wdt in widths:
            layers += [nn.Conv2d(prev, wdt, 3, padding=1, bias=False), nn.BatchNorm2d(wdt),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            prev = wdt
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(prev * 4, hidden), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout) if dropout else nn.Identity(),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.head(self.pool(self.features(x)))


@register("cnn_tiny")
def cnn_tiny(num_classes, image_shape):
    """Two 3x3 conv layers (8, 16 channels), a 32-unit hidden layer."""
    return SmallCNN(image_shape[0], num_classes, widths=(8, 16), hidden=32)


@register("cnn_small")
def cnn_small(num_classes, image_shape):
    """Two 3x3 conv layers (16, 32 channels), a 64-unit hidden layer."""
    return SmallCNN(image_shape[0], num_classes, widths=(16, 32), hidden=64)


@register("cnn_large")
def cnn_large(num_classes, image_shape):
    """Three 3x3 conv layers (32, 64, 128 channels), a 256-unit hidden layer with dropout."""
    return SmallCNN(image_shape[0], num_classes, widths=(32, 64, 128), hidden=256, dropout=0.3)


# ---------------------------------------------------------------- CIFAR ResNets

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or inplanes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: depth = 6n + 2 with basic blocks, three stages."""

    def __init__(self, depth: int, filters: list[int], num_classes: int, in_ch: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("depth must be 6n+2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_ch, filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        layers, prev = [], filters[0]
        for i, f in enumerate(filters[1:]):
            for j in range(n):
                layers.append(BasicBlock(prev, f, stride=2 if (i > 0 and j == 0) else 1))
                prev = f
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def _cifar_resnet(depth, filters):
    def build(num_classes, image_shape):
        return CifarResNet(depth, filters, num_classes, image_shape[0])
    return build


for _d in (20, 56, 110):
    register(f"resnet{_d}")(_cifar_resnet(_d, [16, 16, 32, 64]))
for _d in (8, 32):
    register(f"resnet{_d}x4")(_cifar_resnet(_d, [32, 64, 128, 256]))


# ---------------------------------------------------------------- Wide ResNets

class WideBlock(nn.Module):
    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None if (inplanes == planes and stride == 1) else \
            nn.Conv2d(inplanes, planes, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    def __init__(self, depth, widen, num_classes, in_ch=3):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False)
        blocks, prev = [], widths[0]
        for i, wd in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(WideBlock(prev, wd, 2 if (i > 0 and j == 0) else 1))
                prev = wd
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(prev)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x):
        x = self.blocks(self.conv1(x))
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


register("wrn_16_2")(lambda num_classes, image_shape: WideResNet(16, 2, num_classes, image_shape[0]))
register("wrn_40_2")(lambda num_classes, image_shape: WideResNet(40, 2, num_classes, image_shape[0]))


# ---------------------------------------------------------------- ResNet-18 for 32x32 inputs

class ResNet18Cifar(nn.Module):
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool (the usual CIFAR adaptation)."""

    def __init__(self, num_classes, in_ch=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, prev = [], 64
        for i, planes in enumerate((64, 128, 256, 512)):
            for j in range(2):
                layers.append(BasicBlock(prev, planes, 2 if (i > 0 and j == 0) else 1))
                prev = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


register("resnet18_cifar")(lambda num_classes, image_shape: ResNet18Cifar(num_classes, image_shape[0]))


# ---------------------------------------------------------------- depthwise-separable CNN

def _conv_bn(cin, cout, k, stride, groups=1):
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class DepthwiseSeparableCNN(nn.Module):
    """MobileNet-style (Howard et al. 2017): a 3x3 stem of `width` channels (stride 2 for inputs of 64
    pixels or more), then depthwise 3x3 + pointwise 1x1 blocks widening to 2, 4 and 8 times `width` with
    stride 2 at each widening, global average pooling, optional dropout and a linear classifier."""

    PLAN = ((2, 2), (4, 2), (4, 1), (8, 2), (8, 1))  # (channels as a multiple of width, stride)

    def __init__(self, in_ch, num_classes, width=16, dropout=0.0, stem_stride=1):
        super().__init__()
        layers = _conv_bn(in_ch, width, 3, stem_stride)
        prev = width
        for mult, stride in self.PLAN:
            layers += _conv_bn(prev, prev, 3, stride, groups=prev) + _conv_bn(prev, width * mult, 1, 1)
            prev = width * mult
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout) if dropout else nn.Identity(),
                                  nn.Linear(prev, num_classes))

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.features(x), 1))


@register_family("dscnn", "dscnn:WIDTH[:dropout=P]")
def dscnn_family(args, options, num_classes, image_shape):
    """dscnn:16 is the depthwise-separable CNN with base width 16."""
    if len(args) != 1 or int(args[0]) < 1:
        raise ValueError("give one base width >= 1")
    return DepthwiseSeparableCNN(image_shape[0], num_classes, int(args[0]), _dropout(dict(options)),
                                 stem_stride=2 if min(image_shape[1:]) >= 64 else 1)
