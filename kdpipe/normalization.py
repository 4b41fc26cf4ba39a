"""The input normalization a teacher needs, made explicit (never guessed).

Views are replayed as (x / 255 - mean) / std per channel for images (kdpipe.views.normalize), and as
(x - mean) / std per feature for feature vectors. A kdpipe checkpoint carries the mean and std it was
trained with. Any other teacher needs one of:

  --mean M[,M...] --std S[,S...]   the statistics it was trained with (pixels in [0, 1]);
  --input-range 0-1 | 0-255        for teachers that normalize inside: pixels scaled to [0, 1], or raw;
  --normalize PRESET               a named preset (PRESETS), e.g. imagenet for torchvision/timm weights.

resolve_input() returns {"mean", "std", "source", "value"}; the manifest records it (part of the cache's
identity), `kdpipe inspect` shows it and verify-cache replays with it.
"""

from __future__ import annotations

import math

from kdpipe import KDPipeError

# name -> (mean, std) of pixels in [0, 1]; a new preset is one line here.
PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# --input-range: mean 0 and this std make the replay's (x / 255 - 0) / std the range asked for.
RANGES = {"0-1": 1.0, "0-255": 1.0 / 255.0}
OPTIONS_HELP = ("--normalize " + "|".join(PRESETS) + ", --input-range 0-1|0-255 (for a teacher that normalizes "
                "inside), or --mean M,... --std S,...")


def _per_channel(values, c: int, what: str) -> list[float]:
    vals = [float(v) for v in values]
    if len(vals) == 1:
        vals = vals * c
    if len(vals) != c:
        raise KDPipeError(f"{what} has {len(vals)} values; the inputs have {c} channels: give 1 or {c}")
    if not all(math.isfinite(v) for v in vals):
        raise KDPipeError(f"{what} must be finite numbers, got {values}")
    return vals


def resolve_input(teacher, input_shape, *, mean=None, std=None, input_range: str | None = None,
                  preset: str | None = None) -> dict:
    """The normalization to feed `teacher` (a kdpipe.checkpoint.LoadedModel) inputs of `input_shape`
    ((C, H, W) images or (D,) features). Refuses, in one line, what is missing, contradictory, or
    different from what a kdpipe checkpoint was trained with."""
    mean = list(mean) if mean is not None and len(mean) else None
    std = list(std) if std is not None and len(std) else None
    given = [n for n, v in (("--mean/--std", mean is not None or std is not None), ("--input-range", input_range),
                            ("--normalize", preset)) if v]
    if len(given) > 1:
        raise KDPipeError(f"give one input normalization, not {' and '.join(given)}")
    features = len(input_shape) == 1
    c = int(input_shape[0])
    asked = None
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise KDPipeError("--mean and --std go together: give both, one value per channel (or one for all)")
        m, s = _per_channel(mean, c, "--mean"), _per_channel(std, c, "--std")
        if any(v <= 0 for v in s):
            raise KDPipeError(f"--std must be > 0, got {std}")
        asked = {"mean": m, "std": s, "source": "mean-std", "value": None}
    elif input_range or preset:
        if features:
            raise KDPipeError(f"{given[0]} is for images; feature vectors {tuple(input_shape)} take --mean/--std "
                              "(one value per feature, or one for all)")
        if input_range:
            if input_range not in RANGES:
                raise KDPipeError(f"unknown --input-range {input_range!r}: use {' or '.join(RANGES)}")
            asked = {"mean": [0.0] * c, "std": [RANGES[input_range]] * c, "source": "input-range",
                     "value": input_range}
        else:
            if preset not in PRESETS:
                raise KDPipeError(f"unknown --normalize preset {preset!r}: use {', '.join(PRESETS)}")
            m, s = PRESETS[preset]
            if len(m) != c:
                raise KDPipeError(f"--normalize {preset} is for {len(m)}-channel images; these have {c}: "
                                  "give --mean/--std")
            asked = {"mean": list(m), "std": list(s), "source": "preset", "value": preset}
    own = getattr(teacher, "mean", None), getattr(teacher, "std", None)
    if own[0] is not None and own[1] is not None:
        recorded = {"mean": [float(v) for v in own[0]], "std": [float(v) for v in own[1]], "source": "checkpoint",
                    "value": None}
        if asked is not None and not (_close(asked["mean"], recorded["mean"]) and _close(asked["std"], recorded["std"])):
            raise KDPipeError(f"the teacher {teacher.file} was trained on inputs normalized with mean "
                              f"{_fmt(recorded['mean'])}, std {_fmt(recorded['std'])}; {given[0]} asks for mean "
                              f"{_fmt(asked['mean'])}, std {_fmt(asked['std'])}: drop {given[0]}")
        return recorded
    if asked is None:
        raise KDPipeError(f"the teacher {teacher.file} ({teacher.kind}) does not record the input normalization "
                          f"it expects; give {OPTIONS_HELP}")
    return asked


def asked_as(norm: dict) -> str:
    """How a normalization (resolve_input's) is asked for on the command line."""
    if norm.get("source") == "preset":
        return f"--normalize {norm['value']}"
    if norm.get("source") == "input-range":
        return f"--input-range {norm['value']}"
    return f"--mean {_csv(norm['mean'])} --std {_csv(norm['std'])}"


def alternatives(norm: dict, channels: int, data_mean, data_std) -> list[tuple[str, list, list]]:
    """The other normalizations image teachers are commonly trained with, as (how to ask for it, mean, std): the
    presets for `channels` channels, both input ranges, and the data's own statistics (`data_mean`, `data_std`
    of pixels in [0, 1]); those equal to `norm` are left out."""
    out = [(f"--normalize {name}", list(m), list(s)) for name, (m, s) in PRESETS.items() if len(m) == channels]
    out += [(f"--input-range {r}", [0.0] * channels, [v] * channels) for r, v in RANGES.items()]
    out.append((f"--mean {_csv(data_mean)} --std {_csv(data_std)} (the data's own statistics)", list(data_mean),
                list(data_std)))
    return [c for c in out if not (_close(c[1], norm["mean"]) and _close(c[2], norm["std"]))]


def _csv(v) -> str:
    return ",".join(f"{float(x):.4g}" for x in v)


def describe(inp: dict) -> str:
    """One phrase for `kdpipe inspect` and logs: where the normalization came from, and its numbers."""
    norm = inp.get("normalization") or {"source": "dataset statistics (before explicit normalization)"}
    src = norm.get("source")
    label = {"checkpoint": "from the teacher checkpoint", "mean-std": "--mean/--std",
             "input-range": f"--input-range {norm.get('value')}",
             "preset": f"--normalize {norm.get('value')}"}.get(src, src)
    return f"{label}: mean {_fmt(inp['mean'])}, std {_fmt(inp['std'])}"


def _close(a, b) -> bool:
    """Equal as far as kdpipe prints them (`kdpipe inspect`: 4 decimals; the messages: 4 significant digits),
    so statistics copied from its output are the checkpoint's own, not other values."""
    return len(a) == len(b) and all(abs(x - y) <= max(5e-5, 5e-4 * abs(y)) for x, y in zip(a, b))


def _fmt(v) -> str:
    return "[" + ", ".join(f"{float(x):.4g}" for x in v) + "]"
