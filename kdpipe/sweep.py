"""Naming and planning of student runs (no torch import: Make rules are generated from this)."""

from __future__ import annotations

import itertools


def run_name(arch: str, temperature: float, alpha: float, seed: int) -> str:
    if alpha == 0:
        return f"{arch}-scratch-s{seed}"
    return f"{arch}-T{temperature:g}-a{alpha:g}-s{seed}"


def plan_runs(students, temperatures, alphas, seeds) -> list[tuple[str, float, float, int]]:
    """The cartesian product; alpha = 0 ignores T, so it appears once per (student, seed)."""
    out, seen = [], set()
    for arch, t, a, s in itertools.product(students, temperatures, alphas, seeds):
        key = run_name(arch, t, a, s)
        if key not in seen:
            seen.add(key)
            out.append((arch, float(t), float(a), int(s)))
    return out
