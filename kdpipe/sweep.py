"""Naming and planning of student runs (no torch import: Make rules are generated from this).

A sweep is the cartesian product of students, temperatures, alphas and seeds, for one loss. The
loss is a spec, NAME or NAME:OPTION=VALUE,...: `kd` (the default), `dkd:beta=8,warmup=20`. Its
temperature and alpha are not in the spec: they are the sweep's axes (--temperature, --alpha).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re

from kdpipe import KDPipeError

# kd's defaults for the axes; kd run names always show both (kdpipe.losses.KDLoss.defaults agrees,
# which tests/test_losses.py checks). Other losses take their own defaults for an axis not given.
KD_AXES = {"temperature": 4.0, "alpha": 0.9}
AXES = tuple(KD_AXES)


# Training settings (train-teacher and train-student). Declared here, without torch, because run names
# (and so Make targets) depend on them; kdpipe.engine.OptimConfig resolves its defaults from these.
OPTIMIZERS = {  # name -> its usual defaults where they differ between optimizers
    "sgd": {"lr": 0.05, "weight_decay": 5e-4},
    "adam": {"lr": 1e-3, "weight_decay": 0.0},  # L2 added to the gradient (coupled), as torch.optim.Adam
    "adamw": {"lr": 1e-3, "weight_decay": 0.01},  # decoupled (Loshchilov & Hutter), as torch.optim.AdamW
}
SCHEDULES = ("cosine", "step", "constant", "onecycle")
FLOAT32_MAX = 3.4028234663852886e38  # the largest float32, the dtype of the weights an optimizer steps
STUDENT_BATCH_SIZE = 128  # train-student's default --batch-size (a pipeline block without batch_size gets it)
TRAIN_DEFAULTS = {"optimizer": "sgd", "momentum": 0.9, "nesterov": False, "betas": (0.9, 0.999), "eps": 1e-8,
                  "schedule": "cosine", "warmup_epochs": 0.0, "val_fraction": 0.0, "train_samples": None,
                  "val_split": False}
# What each optimizer uses (a setting it ignores does not change a run's name).
OPTIMIZER_USES = {"sgd": ("momentum", "nesterov"), "adam": ("betas", "eps"), "adamw": ("betas", "eps")}


def resolve_training(optimizer: str | None = None, lr: float | None = None, weight_decay: float | None = None,
                     **given) -> dict:
    """The full training settings: given values, else the optimizer's usual ones, else TRAIN_DEFAULTS.
    A setting given as None counts as not given."""
    name = optimizer or TRAIN_DEFAULTS["optimizer"]
    if name not in OPTIMIZERS:
        raise KDPipeError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")
    unknown = set(given) - set(TRAIN_DEFAULTS)
    if unknown:
        raise KDPipeError(f"unknown training setting(s) {', '.join(sorted(unknown))}")
    out = {**TRAIN_DEFAULTS, **{k: v for k, v in given.items() if v is not None}, "optimizer": name,
           "lr": float(lr if lr is not None else OPTIMIZERS[name]["lr"]),
           "weight_decay": float(weight_decay if weight_decay is not None else OPTIMIZERS[name]["weight_decay"])}
    try:
        out["betas"] = tuple(float(b) for b in out["betas"])
    except (TypeError, ValueError):  # a pipeline's betas = 0.9, or ["a", "b"]
        raise KDPipeError(f"--betas must be two numbers in [0, 1), got {out['betas']!r}") from None
    for key in ("lr", "weight_decay", "momentum", "eps", "warmup_epochs"):  # NaN passes every range check
        if not math.isfinite(float(out[key])):
            raise KDPipeError(f"--{key.replace('_', '-')} must be a finite number, got {out[key]}")
        if abs(float(out[key])) > FLOAT32_MAX:  # torch's optimizers step float32 weights: a traceback mid-run
            raise KDPipeError(f"--{key.replace('_', '-')} must lie within float32's range (below {FLOAT32_MAX:.1e}), "
                              f"got {out[key]:g}")
    if out["schedule"] not in SCHEDULES:
        raise KDPipeError(f"unknown schedule {out['schedule']!r}: use one of {', '.join(SCHEDULES)}")
    if out["schedule"] == "onecycle" and out["warmup_epochs"]:
        raise KDPipeError("the onecycle schedule has its own warm-up: leave --warmup-epochs at 0")
    if out["train_samples"] is not None and int(out["train_samples"]) < 1:
        raise KDPipeError(f"--train-samples must be >= 1, got {out['train_samples']}")
    if not 0 <= out["val_fraction"] < 1:
        raise KDPipeError(f"--val-fraction must lie in [0, 1), got {out['val_fraction']}")
    out["val_split"] = bool(out["val_split"])
    if out["val_split"] and out["val_fraction"]:
        raise KDPipeError("--val-split and --val-fraction both choose what picks the best epoch: give one of them "
                          "(the data's own validation split, or a share of the train split)")
    if out["warmup_epochs"] < 0:
        raise KDPipeError(f"--warmup-epochs must be >= 0, got {out['warmup_epochs']}")
    if len(out["betas"]) != 2 or not all(0 <= b < 1 for b in out["betas"]):
        raise KDPipeError(f"--betas must be two numbers in [0, 1), got {','.join(map(str, out['betas']))}")
    if out["lr"] <= 0:
        raise KDPipeError(f"--lr must be > 0, got {out['lr']:g}")
    return out


def check_optimizer_uses(optimizer: str | None, given, where: str = "", flag: str = "--") -> None:
    """Refuse the optimizer settings in `given` (names: momentum, nesterov, betas, eps) that `optimizer` does not use
    (OPTIMIZER_USES): --momentum with adam or adamw, --betas or --eps with sgd were accepted and ignored without a
    word. `where` (a pipeline's "FILE: [[students]] #1 ") starts the message; `flag` + name is what the user wrote."""
    name = optimizer or TRAIN_DEFAULTS["optimizer"]
    if name not in OPTIMIZER_USES:  # resolve_training refuses it
        return
    unused = [k for k in ("momentum", "nesterov", "betas", "eps") if k in given and k not in OPTIMIZER_USES[name]]
    if not unused:
        return
    key = lambda k: f"{flag}{k.replace('_', '-') if flag == '--' else k}"  # noqa: E731
    many = len(unused) > 1
    raise KDPipeError(f"{where}{' and '.join(map(key, unused))} {'are settings' if many else 'is a setting'} of "
                      f"{'Adam and AdamW' if name == 'sgd' else 'SGD'}, which --optimizer {name} does not use (it "
                      f"takes {' and '.join(key(k) for k in OPTIMIZER_USES[name] if k != 'nesterov')}): leave "
                      f"{'them' if many else 'it'} out, or pick the optimizer that uses {'them' if many else 'it'}")


def check_warmup(warmup_epochs: float, epochs: int) -> None:
    """Refuse a warm-up longer than the run: its learning rate would never reach the peak its name and
    metrics.json record, and the schedule would never start."""
    if warmup_epochs > epochs:
        raise KDPipeError(f"--warmup-epochs {warmup_epochs:g} is longer than the run's {epochs} epoch(s): its learning "
                          "rate would never reach its peak; give a warm-up of at most --epochs")


def training_tag(settings: dict, epochs: int, batch_size: int) -> str:
    """The part of a run's name that its training settings add: the optimizer (when not SGD), lr<LR> (when not
    the optimizer's default), e<EPOCHS> and, when anything else differs from the defaults, h<6 hex> hashing it.
    Plain SGD at its defaults is e<EPOCHS> alone (before 2026-12-07 it added nothing, so that runs of other
    epoch counts had one name: names_before). `settings` is resolve_training's result."""
    name = settings["optimizer"]
    base = resolve_training(name)
    used = ("weight_decay", "schedule", "warmup_epochs", "val_fraction", "train_samples", "val_split") + \
        OPTIMIZER_USES[name]
    rest = {k: settings[k] for k in used if settings[k] != base[k]}
    parts = [] if name == "sgd" else [name]
    if settings["lr"] != base["lr"]:
        parts.append(f"lr{settings['lr']:g}")
    parts.append(f"e{int(epochs)}")
    if rest:
        rest["batch_size"] = int(batch_size)
        digest = hashlib.sha256(json.dumps(rest, sort_keys=True, default=list).encode()).hexdigest()
        parts.append("h" + digest[:6])
    return "-".join(parts)


def parse_loss(spec: str, allow_axes: bool = False) -> tuple[str, dict[str, float]]:
    """'dkd:beta=8,warmup=20' -> ('dkd', {'beta': 8.0, 'warmup': 20.0}). Option names and ranges are
    checked by kdpipe.losses.create_loss; here only the syntax.

    A composition (kdpipe.losses.ComposedLoss) joins members with '+' (``kd+hint``: every weight 1) or
    lists them with weights, ``kd:1,hint:50``: an item NAME:... starts a member, a bare number first in it
    is the member's weight, OPTION=VALUE its options. It parses to ('kd+hint', {'hint.weight': 50.0}):
    weights of 1 are left out (so ``kd:1,hint:1`` is ``kd+hint``), member options are MEMBER.OPTION.
    The sweep axes (temperature, alpha) are refused as options, since the CLI and pipelines take them apart,
    unless `allow_axes` (kdpipe.create_loss, whose caller gives one loss).
    """
    usage = ("write --loss NAME or NAME:OPTION=VALUE,... (e.g. dkd:beta=8,warmup=20), or a composition "
             "NAME+NAME or NAME:WEIGHT,NAME:WEIGHT (e.g. kd+hint, kd:1,hint:50)")
    members: list[tuple[str, list[str]]] = []
    for chunk in str(spec).strip().split("+"):
        items = [p.strip() for p in chunk.split(",")]
        for i, item in enumerate(items):
            head, colon, rest = item.partition(":")
            if i == 0 or (colon and "=" not in head and head.strip() and not _is_number(head)):
                if not head.strip():
                    raise KDPipeError(f"empty loss name in {spec!r}: {usage}")
                members.append((head.strip(), [rest.strip()] if colon else []))
            else:
                members[-1][1].append(item)
    composed = len(members) > 1
    options: dict[str, float] = {}
    for name, items in members:
        for j, item in enumerate(filter(None, items)):
            key, eq, value = (s.strip() for s in item.partition("="))
            if composed and not eq and j == 0 and _is_number(key):
                key, value, eq = "weight", key, "="
            number = float(value) if _is_number(value) else None
            if not key or not eq or number is None:
                raise KDPipeError(f"bad loss option {item!r} in {spec!r}: {usage}, with numbers as values")
            if key in AXES and not allow_axes:
                raise KDPipeError(f"the loss's {key} is a sweep axis: give it as --{key} (or {key} = [...] in a "
                                  f"pipeline), not in --loss {spec}")
            full = f"{name}.{key}" if composed else key
            if full in options:
                raise KDPipeError(f"loss option {key} is given twice in {spec!r}")
            if composed and key == "weight" and number == 1.0:
                continue
            options[full] = number
    names = [n for n, _ in members]
    if len(set(names)) != len(names):
        raise KDPipeError(f"loss {spec!r} names a loss twice: {usage}")
    return "+".join(names), options


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def parse_arch_args(text: str | dict | None) -> dict:
    """'width=16,depth=4,act=relu,bias=false' -> {'width': 16, 'depth': 4, 'act': 'relu', 'bias': False}:
    integers, floats, true/false/none, else strings."""
    if not text:
        return {}
    if isinstance(text, dict):
        return dict(text)
    out = {}
    for item in filter(None, (p.strip() for p in str(text).split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not key or not eq or not key.isidentifier():
            raise KDPipeError(f"bad architecture option {item!r} in {text!r}: write --arch-args KEY=VALUE,... "
                              "(e.g. width=16,depth=4)")
        if key in out:
            raise KDPipeError(f"architecture option {key} is given twice in {text!r}")
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        elif low == "none":
            out[key] = None
        else:
            for conv in (int, float):
                try:
                    out[key] = conv(value)
                    break
                except ValueError:
                    continue
            else:
                out[key] = value
    return out


def arch_label(arch: str) -> str:
    """An architecture spec as a file-name part. A parametric one (NAME:<digits>..., kdpipe.models families)
    keeps its numbers readable: mlp:512,256 -> mlp512x256, dscnn:16:dropout=0.2 -> dscnn16_dropout0.2;
    others: tv:resnet18 -> tv_resnet18, nets/a.py:Net -> a.py_Net."""
    arch = str(arch).strip()  # as the model is built: ' tv:resnet18' was named _tv_resnet18
    family, colon, rest = arch.partition(":")
    if colon and family.isidentifier() and rest[:1].isdigit():
        return family + rest.replace(",", "x").replace(":", "_").replace("=", "")
    base = arch.replace("\\", "/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.+]", "_", base)


def arch_args_label(args) -> str:
    """--arch-args (text or dict) as a run-name part, "" for none: width=32,dropout=0.2 -> dropout0.2_width32
    (sorted keys); a<6 hex> hashing them where that would be over 40 characters or hold characters a run name
    cannot (a '-' separates its parts; Make and file names take few others)."""
    args = parse_arch_args(args)
    if not args:
        return ""
    shown = {k: str(v).lower() if isinstance(v, bool) or v is None else f"{v:g}" if isinstance(v, float) else str(v)
             for k, v in args.items()}
    label = "_".join(f"{k}{shown[k]}" for k in sorted(shown))
    if len(label) <= 40 and re.fullmatch(r"[A-Za-z0-9_.+]+", label):
        return label
    return "a" + hashlib.sha256(json.dumps(shown, sort_keys=True).encode()).hexdigest()[:6]


def name_before_arch_args(name: str, arch_args) -> str | None:
    """The name kdpipe gave run `name` before run names held --arch-args (b2b8922: ARCH-T4-a0.9-s0 for
    ARCH-width32-T4-a0.9-s0), or None when `arch_args` add nothing to the name."""
    label = arch_args_label(arch_args)
    if not label or f"-{label}-" not in name:
        return None
    return name.replace(f"-{label}-", "-", 1)


def names_before(name: str, settings: dict, epochs: int, batch_size: int, arch_args=None) -> list[str]:
    """The names older kdpipes gave run `name` (trained with resolve_training's `settings`), newest first: for
    plain SGD at its defaults, the name without its epochs (ARCH-T4-a0.9-s0 for today's ARCH-T4-a0.9-e5-s0,
    before 2026-12-07); and that name without the --arch-args (name_before_arch_args, before b2b8922)."""
    base, out = name, []
    if training_tag(settings, epochs, batch_size) == f"e{int(epochs)}":  # the tag was empty: the last -eN- is it
        head, sep, tail = name.rpartition(f"-e{int(epochs)}-")
        if sep:
            base = f"{head}-{tail}"
            out.append(base)
    older = name_before_arch_args(base, arch_args)
    return out + ([older] if older else [])


def run_name(arch: str, temperature: float | None, alpha: float | None, seed: int, loss: str = "kd",
             loss_options: dict | None = None, tag: str = "", arch_args=None) -> str:
    """kd runs: ARCH-T4-a0.9-s0, or ARCH-scratch-s0 for alpha = 0 (T unused). Other losses name the loss,
    the options given in its spec (sorted), and the axes given (None: the loss's default, left out):
    ARCH-dkd-s0, ARCH-dkd_beta2_warmup5-T2-a0.5-s1. `tag` (training_tag: optimizer, lr, epochs, hash of
    the other settings) goes before the seed: ARCH-T4-a0.9-e5-s0, ARCH-T4-a0.9-adam-lr0.003-e5-s0. No
    characters that Make treats specially (an architecture spec passes through arch_label). `arch_args`
    (--arch-args, given to every student of a sweep) follow the architecture, arch_args_label:
    ARCH-width32-T4-a0.9-e5-s0."""
    arch = "-".join(filter(None, (arch_label(arch), arch_args_label(arch_args))))
    tail = ([tag] if tag else []) + [f"s{seed}"]
    if loss == "kd" and not loss_options:
        if alpha == 0:
            return "-".join([arch, "scratch"] + tail)
        return "-".join([arch, f"T{temperature:g}", f"a{alpha:g}"] + tail)
    parts = [arch, loss + "".join(f"_{k}{v:g}" for k, v in sorted((loss_options or {}).items()))]
    if temperature is not None:
        parts.append(f"T{temperature:g}")
    if alpha is not None:
        parts.append(f"a{alpha:g}")
    return "-".join(parts + tail)


def plan_runs(students, temperatures, alphas, seeds, loss: str = "kd",
              loss_options: dict | None = None, arch_args=None) -> list[tuple[str, float | None, float | None, int]]:
    """The cartesian product as (arch, T, alpha, seed); run_name(*p, loss, loss_options) names each.

    An empty temperatures or alphas list means "not given": kd's default for kd, None (the loss's own
    default) for other losses. Runs with equal names appear once: kd's alpha = 0 ignores T, so it
    appears once per (student, seed), with the sweep's first T (its T is no setting: kdpipe.resume.settings)."""
    kd = loss == "kd"
    labels: dict[str, str] = {}
    for arch in students:  # two specs written alike in run names would train one run and drop the other
        other = labels.setdefault(arch_label(arch), str(arch))
        if other != str(arch):
            raise KDPipeError(f"--student {other} and --student {arch} would both be named {arch_label(arch)} in "
                              "run names: rename one file or class, or train them into separate --out directories")
    temperatures = list(temperatures) or [KD_AXES["temperature"] if kd else None]
    alphas = list(alphas) or [KD_AXES["alpha"] if kd else None]
    out, seen = [], {}
    for arch, t, a, s in itertools.product(students, temperatures, alphas, seeds):
        p = (arch, None if t is None else float(t), None if a is None else float(a), int(s))
        key = run_name(*p, loss, loss_options, arch_args=arch_args)
        scratch = kd and not loss_options and a == 0  # T unused: the sweep's Ts are one scratch run
        if key in seen and (seen[key][:1] + seen[key][2:] if scratch else seen[key]) != (p[:1] + p[2:] if scratch
                                                                                        else p):
            # T or alpha equal to 6 digits: one run would have been dropped
            raise KDPipeError(f"two runs of the sweep would both be named {key}: give each temperature and alpha "
                              "once, differing within 6 significant digits")
        if key not in seen:
            seen[key] = p
            out.append(p)
    return out


def plan_sweep(students, temperatures, alphas, seeds, loss: str, loss_options: dict | None, lrs, epochs: int,
               batch_size: int, extra_tag: str = "", arch_args=None, **training) -> list[tuple[str, tuple, dict]]:
    """plan_runs crossed with the learning rates `lrs` (empty: the optimizer's default), as
    (run name, (arch, T, alpha, seed), resolved training settings) per run. `training`: resolve_training's
    arguments other than lr; `extra_tag` (an ensemble's, ensemble_tag) follows the training tag; `arch_args`
    go to every student (run_name).
    Two runs with one name are refused."""
    out, seen = [], {}
    for lr in list(lrs) or [None]:
        settings = resolve_training(lr=lr, **training)
        tag = "-".join(filter(None, (training_tag(settings, epochs, batch_size), extra_tag)))
        for p in plan_runs(students, temperatures, alphas, seeds, loss, loss_options, arch_args):
            name = run_name(*p, loss, loss_options, tag=tag, arch_args=arch_args)
            if name in seen:
                if seen[name] == (p, settings):
                    continue
                raise KDPipeError(f"two runs of the sweep would both be named {name}: give each lr once")
            seen[name] = (p, settings)
            out.append((name, p, settings))
    return out


# Ensembles' weights (kdpipe.ensemble), here because run names, and so Make targets, depend on them.
WEIGHT_SUM_TOLERANCE = 1e-3  # 0.333,0.333,0.333 is accepted (and divided by its sum); 0.7,0.2 is refused


def parse_weights(weights, n: int) -> list[float]:
    """The teachers' weights: equal without `weights`; else n positive numbers summing to 1 (within
    WEIGHT_SUM_TOLERANCE), divided by their sum."""
    if not weights:
        return [1.0 / n] * n
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError):
        raise KDPipeError(f"--teacher-weights must be numbers, one per --cache, got {weights!r}") from None
    given = ",".join(f"{x:g}" for x in w)
    if len(w) != n:
        raise KDPipeError(f"--teacher-weights gives {len(w)} weight(s) ({given}) for {n} cache(s): give one per "
                          "--cache, in the same order")
    if not all(math.isfinite(x) and x > 0 for x in w):
        raise KDPipeError(f"--teacher-weights must be positive numbers, got {given}")
    if abs(sum(w) - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise KDPipeError(f"--teacher-weights {given} sum to {sum(w):g}, not 1: give weights that sum to 1 (e.g. "
                          + ",".join(f"{x / sum(w):.3g}" for x in w) + ")")
    return [x / sum(w) for x in w]


def ensemble_tag(n: int, weights=None) -> str:
    """The part of the run names an ensemble of n caches adds (checking the weights): ens<n> for equal weights,
    else ens<w1>_<w2>... (as given, 3 significant digits); "" for one cache."""
    if n < 2:
        return ""
    w = parse_weights(weights, n)
    if max(w) - min(w) <= 1e-9:
        return f"ens{n}"
    return "ens" + "_".join(f"{x:.3g}" for x in weights)


# The options of the view aliases (kdpipe.views.create_policy), checked here without torch: Make rules are
# generated from the pipeline spec by a Python that may lack it.
ALIAS_OPTIONS = {"padding": ("crop-flip", "crop:{}+flip"), "size": ("resized-crop-flip", "resized-crop:{}+flip")}


def check_alias_options(spec: str, given: dict, where: str = "--") -> None:
    """Refuse the options ``given`` ({name: value} of padding, size; ``where`` + name is what the user wrote) that
    ``spec`` would ignore: each sets the option of one alias only (create_policy), any other spec carries its
    own (crop:2+flip with padding 4 crops by 2, resized-crop+flip with size 224 keeps the input height)."""
    for name, value in given.items():
        alias, example = ALIAS_OPTIONS[name]
        if spec.strip() != alias:
            raise KDPipeError(f"{where}{name} {value} sets the {name} of the {alias} alias, and the policy {spec!r} "
                              f"is another spec, which would ignore it: write it in the spec (e.g. "
                              f"{example.format(value)}) and leave {where}{name} out")
