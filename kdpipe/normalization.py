"""The input normalization a teacher needs, made explicit (never guessed).

Views are replayed as (x / 255 - mean) / std per channel for images (kdpipe.views.normalize), and as
(x - mean) / std per feature for feature vectors. A kdpipe checkpoint carries the mean and std it was
trained with. Any other teacher needs one of:

  --mean M[,M...] --std S[,S...]   the statistics it was trained with (pixels in [0, 1]);
  --input-range 0-1 | 0-255        for teachers that normalize inside: pixels scaled to [0, 1], or raw;
  --normalize PRESET               a named preset (PRESETS), e.g. imagenet for torchvision/timm weights.

resolve_input() returns {"mean", "std", "source", "value"}; the manifest records it (part of the cache's
identity), `kdpipe inspect` shows it and verify-cache replays with it.

Grey images and an RGB teacher that repeats them to 3 channels (a torchvision architecture; a timm one or a
program given --arch-args in_chans=3) also take 3 values (--normalize imagenet, --mean/--std of 3): the teacher is
then fed what torchvision's Grayscale(3) + Normalize(mean, std) gives, the grey view's pixels in [0, 1] repeated to
3 channels, then (x - mean_c) / std_c per channel. The views are replayed with mean 0 and std 1 (pixels in [0, 1],
what stage two's students of the grey images take), and the per-channel values go in "grey_to_rgb": {"mean", "std"},
applied by the teacher's wrapper after the repeat (kdpipe.checkpoint.TeacherOutput.set_grey_to_rgb). Caches made
without it have no such record, and their identity is what it always was.
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


def _per_channel(values, c: int, what: str, also: str = "") -> list[float]:
    vals = [float(v) for v in values]
    if len(vals) == 1:
        vals = vals * c
    if len(vals) != c:
        raise KDPipeError(f"{what} has {len(vals)} values; the inputs have {c} channel{'s' if c > 1 else ''}: give "
                          f"{'1' if c == 1 else f'1 or {c}'}{also}")
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
    own = getattr(teacher, "mean", None), getattr(teacher, "std", None)
    if given and own[0] is not None and own[1] is not None and not input_range:
        # a kdpipe checkpoint given values for other channels (3 for its grey images, imagenet's): it carries its
        # own normalization, so the way on is to drop them ('give 1 or 1', or 'give --mean/--std', misled)
        n = len(PRESETS[preset][0]) if preset in PRESETS else max(len(mean or []), len(std or []))
        if n not in (1, c):
            raise KDPipeError(f"the teacher {teacher.file} records its input normalization, mean "
                              f"{_fmt(own[0])}, std {_fmt(own[1])} ({c} channel{'s' if c > 1 else ''}); {given[0]} "
                              f"gives {n} values: drop {given[0]}")
    asked = None
    # grey images, 3 values, and a teacher that is no kdpipe checkpoint (which carries its own): Grayscale(3) + Normalize
    rgb = (not features and c == 1 and getattr(teacher, "kind", None) != "kdpipe"
           and (3 in (len(mean or []), len(std or [])) or (preset in PRESETS and len(PRESETS[preset][0]) == 3)))
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise KDPipeError("--mean and --std go together: give both, one value per channel (or one for all)")
        # a teacher that repeats grey images to RGB takes 1 value or 3 (one per RGB channel)
        n = 3 if rgb else c
        also = " (or 3, one per RGB channel the teacher repeats them to)" if c == 1 and not features and not rgb and \
            getattr(teacher, "repeats_grey", False) else ""
        m, s = _per_channel(mean, n, "--mean", also), _per_channel(std, n, "--std", also)
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
            if len(m) != c and not rgb:
                raise KDPipeError(f"--normalize {preset} is for {len(m)}-channel images; these have {c}: "
                                  "give --mean/--std")
            asked = {"mean": list(m), "std": list(s), "source": "preset", "value": preset}
    if rgb and not getattr(teacher, "repeats_grey", False):
        raise KDPipeError(_not_repeated(teacher, preset))
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
    if rgb:  # views replayed as pixels in [0, 1]; the teacher's wrapper normalizes each channel after the repeat
        asked = {**asked, "mean": [0.0], "std": [1.0], "grey_to_rgb": {"mean": asked["mean"], "std": asked["std"]}}
    return asked


def _not_repeated(teacher, preset: str | None) -> str:
    """The refusal of 3 values per channel for grey images fed to a teacher as they are (one channel)."""
    what = f"--normalize {preset} is for 3-channel images" if preset else "--mean/--std give 3 values (RGB channels)"
    store = "store the images as 3 channels (np.repeat(x, 3, axis=1) in an npz)"
    if getattr(teacher, "takes_in_chans", lambda: False)():
        return (f"{what}; these have 1, which the teacher is fed as they are: for an RGB teacher give --arch-args "
                "in_chans=3, which repeats them to 3 channels, each then normalized with its own value (as "
                f"Grayscale(3) + Normalize); or {store}")
    return (f"{what}; these have 1, which the teacher {getattr(teacher, 'file', '')} takes as they are (the repeat "
            "to RGB, --arch-args in_chans=3, is for a timm architecture or a TorchScript, torch.export or pickled "
            f"teacher; a torchvision architecture repeats by itself): give --mean/--std of 1 value, or {store}")


def taught(norm: dict) -> tuple[list, list]:
    """The (mean, std) per channel of what the teacher is fed: its 3 channels' where grey images are repeated to
    RGB (norm's "grey_to_rgb"), else the views' own."""
    rgb = norm.get("grey_to_rgb")
    return (list(rgb["mean"]), list(rgb["std"])) if rgb else (list(norm["mean"]), list(norm["std"]))


def asked_as(norm: dict) -> str:
    """How a normalization (resolve_input's) is asked for on the command line."""
    if norm.get("source") == "preset":
        return f"--normalize {norm['value']}"
    if norm.get("source") == "input-range":
        return f"--input-range {norm['value']}"
    m, s = taught(norm)
    return f"--mean {_csv(m)} --std {_csv(s)}"


def alternatives(norm: dict, channels: int, data_mean, data_std, rgb: bool = False) -> list[tuple[str, list, list]]:
    """The other normalizations image teachers are commonly trained with, as (how to ask for it, mean, std): the
    presets for `channels` channels (and for 3, where `rgb`: grey images repeated to an RGB teacher's channels, whose
    mean and std then have 3 values), both input ranges, and the data's own statistics (`data_mean`, `data_std`
    of pixels in [0, 1]); those equal to `norm` are left out."""
    out = [(f"--normalize {name}", list(m), list(s)) for name, (m, s) in PRESETS.items()
           if len(m) == channels or (rgb and channels == 1 and len(m) == 3)]
    out += [(f"--input-range {r}", [0.0] * channels, [v] * channels) for r, v in RANGES.items()]
    out.append((f"--mean {_csv(data_mean)} --std {_csv(data_std)} (the data's own statistics)", list(data_mean),
                list(data_std)))
    m, s = taught(norm)
    return [c for c in out if not (_close(c[1], m) and _close(c[2], s))]


def _csv(v) -> str:
    return ",".join(f"{float(x):.4g}" for x in v)


def describe(inp: dict) -> str:
    """One phrase for `kdpipe inspect` and logs: where the normalization came from, and its numbers."""
    norm = inp.get("normalization") or {"source": "dataset statistics (before explicit normalization)"}
    src = norm.get("source")
    label = {"checkpoint": "from the teacher checkpoint", "mean-std": "--mean/--std",
             "input-range": f"--input-range {norm.get('value')}",
             "preset": f"--normalize {norm.get('value')}"}.get(src, src)
    rgb = inp.get("grey_to_rgb")
    if rgb:
        return (f"{label}: grey images repeated to 3 channels, then mean {_fmt(rgb['mean'])}, std {_fmt(rgb['std'])} "
                f"per channel (Grayscale(3) + Normalize); students' views: mean {_fmt(inp['mean'])}, std "
                f"{_fmt(inp['std'])}")
    return f"{label}: mean {_fmt(inp['mean'])}, std {_fmt(inp['std'])}"


def _close(a, b) -> bool:
    """Equal as far as kdpipe prints them (`kdpipe inspect`: 4 decimals; the messages: 4 significant digits),
    so statistics copied from its output are the checkpoint's own, not other values."""
    return len(a) == len(b) and all(abs(x - y) <= max(5e-5, 5e-4 * abs(y)) for x, y in zip(a, b))


def _fmt(v) -> str:
    return "[" + ", ".join(f"{float(x):.4g}" for x in v) + "]"


def same_normalization(mean_a, std_a, mean_b, std_b) -> bool:
    """Whether two normalizations are the same as far as kdpipe prints them (_close), one value standing for every
    channel (grey data's single mean against the same value repeated)."""
    def spread(a, b):
        a, b = [float(x) for x in a], [float(x) for x in b]
        n = max(len(a), len(b))
        return (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)
    return _close(*spread(mean_a, mean_b)) and _close(*spread(std_a, std_b))


def format_values(v) -> str:
    """A mean or std as kdpipe's messages print it: [0.4914, 0.4822, 0.4465]."""
    return _fmt(v)
