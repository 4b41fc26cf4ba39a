"""Naming and planning of student runs (no torch import: Make rules are generated from this).

A sweep is the cartesian product of students, temperatures, alphas and seeds, for one loss. The
loss is a spec, NAME or NAME:OPTION=VALUE,...: `kd` (the default), `dkd:beta=8,warmup=20`. Its
temperature and alpha are not in the spec: they are the sweep's axes (--temperature, --alpha).
"""

from __future__ import annotations

import itertools
import re

from kdpipe import KDPipeError

# kd's defaults for the axes; kd run names always show both (kdpipe.losses.KDLoss.defaults agrees,
# which tests/test_losses.py checks). Other losses take their own defaults for an axis not given.
KD_AXES = {"temperature": 4.0, "alpha": 0.9}
AXES = tuple(KD_AXES)


def parse_loss(spec: str) -> tuple[str, dict[str, float]]:
    """'dkd:beta=8,warmup=20' -> ('dkd', {'beta': 8.0, 'warmup': 20.0}). Option names and ranges are
    checked by kdpipe.losses.create_loss; here only the syntax."""
    name, _, rest = str(spec).strip().partition(":")
    usage = "write --loss NAME or NAME:OPTION=VALUE,... (e.g. dkd:beta=8,warmup=20)"
    if not name:
        raise KDPipeError(f"empty loss name in {spec!r}: {usage}")
    options: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        try:
            number = float(value)
        except ValueError:
            number = None
        if not key or not eq or number is None:
            raise KDPipeError(f"bad loss option {item!r} in {spec!r}: {usage}, with numbers as values")
        if key in AXES:
            raise KDPipeError(f"the loss's {key} is a sweep axis: give it as --{key} (or {key} = [...] in a "
                              f"pipeline), not in --loss {spec}")
        if key in options:
            raise KDPipeError(f"loss option {key} is given twice in {spec!r}")
        options[key] = number
    return name, options


def arch_label(arch: str) -> str:
    """An architecture spec as a file-name part: tv:resnet18 -> tv_resnet18, nets/a.py:Net -> a.py_Net."""
    base = str(arch).replace("\\", "/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.+]", "_", base)


def run_name(arch: str, temperature: float | None, alpha: float | None, seed: int, loss: str = "kd",
             loss_options: dict | None = None) -> str:
    """kd runs: ARCH-T4-a0.9-s0, or ARCH-scratch-s0 for alpha = 0 (T unused). Other losses name the loss,
    the options given in its spec (sorted), and the axes given (None: the loss's default, left out):
    ARCH-dkd-s0, ARCH-dkd_beta2_warmup5-T2-a0.5-s1. No characters that Make treats specially (an
    architecture spec passes through arch_label)."""
    arch = arch_label(arch)
    if loss == "kd" and not loss_options:
        if alpha == 0:
            return f"{arch}-scratch-s{seed}"
        return f"{arch}-T{temperature:g}-a{alpha:g}-s{seed}"
    parts = [arch, loss + "".join(f"_{k}{v:g}" for k, v in sorted((loss_options or {}).items()))]
    if temperature is not None:
        parts.append(f"T{temperature:g}")
    if alpha is not None:
        parts.append(f"a{alpha:g}")
    return "-".join(parts + [f"s{seed}"])


def plan_runs(students, temperatures, alphas, seeds, loss: str = "kd",
              loss_options: dict | None = None) -> list[tuple[str, float | None, float | None, int]]:
    """The cartesian product as (arch, T, alpha, seed); run_name(*p, loss, loss_options) names each.

    An empty temperatures or alphas list means "not given": kd's default for kd, None (the loss's own
    default) for other losses. Runs with equal names appear once: kd's alpha = 0 ignores T, so it
    appears once per (student, seed)."""
    kd = loss == "kd"
    temperatures = list(temperatures) or [KD_AXES["temperature"] if kd else None]
    alphas = list(alphas) or [KD_AXES["alpha"] if kd else None]
    out, seen = [], set()
    for arch, t, a, s in itertools.product(students, temperatures, alphas, seeds):
        p = (arch, None if t is None else float(t), None if a is None else float(a), int(s))
        key = run_name(*p, loss, loss_options)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out
