"""Ensembles of teachers: several caches of the same views, one mixed target (MEAL-style).

Several caches form an ensemble when row r of each is the same input: the same dataset (fingerprint, split,
samples, classes and their names), the same views (view ops and their versions, seed, K) and the same test
split in eval.h5. The teachers, their input normalization and their logits dtype may differ. Stage two
(`train-student --cache A --cache B [--teacher-weights 0.7,0.3]`) trains against the weighted mean of the
teachers' probabilities at the run's temperature T,

    p_ens(T) = sum_m w_m softmax(t_m / T),

not against the mean of their raw logits. `mixture_log_probs` computes log p_ens(T): a tensor whose softmax
is p_ens(T), so it stands for the scaled teacher logits t / T in every loss (kdpipe.losses.teacher_at), and
T * log p_ens(T) are logits whose softmax at T is the mixture. Fused runs of different T get one mixture
each: T is a per-run (S, 1, 1) tensor there.

The first cache is the primary: the student's inputs are replayed from its view parameters (the others'
are checked equal every epoch) with its input normalization, and metrics.json's "teacher" is its teacher.
Weights must be positive, one per cache, and sum to 1 (within kdpipe.sweep.WEIGHT_SUM_TOLERANCE, then
divided by their sum); without them the weights are equal.

`dump-logits --like CACHE` (like_cache) dumps a second teacher over exactly the views of CACHE.

The Python API opens an ensemble with kdpipe.open_cache([A, B], weights=...), and a pipeline holds one as
[[teacher]] entries (kdpipe.pipeline).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe import KDPipeError
from kdpipe.cache.reader import Cache
from kdpipe.evaluate import agreement, top1
from kdpipe.sweep import ensemble_tag, parse_weights  # pure Python: Make targets (run names) need them


def mixture_log_probs(logits: torch.Tensor, log_weights: torch.Tensor, t) -> torch.Tensor:
    """log sum_m w_m softmax(logits_m / t) over the teachers m, the first dimension of `logits` (M, ..., C).

    t: a number, a 0-dim tensor, or per-run temperatures shaped (S, 1, 1) against (B, C) rows (Loss.per_run):
    the result is then (S, B, C), one mixture per run. Computed with log-sum-exps (no probabilities underflow
    to log 0)."""
    if torch.is_tensor(t) and t.ndim:
        t = t.unsqueeze(-3)  # (S, 1, 1, 1): broadcast over the teachers' axis
    lw = log_weights.view(-1, *([1] * (logits.ndim - 1)))
    return (F.log_softmax(logits.float() / t, dim=-1) + lw).logsumexp(dim=-(logits.ndim))


class EnsembleTargets(NamedTuple):
    """A batch's teacher targets for an ensemble: every teacher's logits (M, B, C) and log w (M,). The losses
    take them where they take dense logits (kdpipe.losses.teacher_at calls at_temperature)."""
    logits: torch.Tensor
    log_weights: torch.Tensor

    def at_temperature(self, t) -> torch.Tensor:
        """log p_ens(T), standing for the scaled teacher logits t / T: (B, C), or (S, B, C) for per-run T."""
        return mixture_log_probs(self.logits, self.log_weights, t)


class EnsembleEpoch:
    """An epoch's teacher targets on the device (engine.teacher_rows calls rows(idx))."""

    def __init__(self, logits: torch.Tensor, log_weights: torch.Tensor):
        self.logits, self.log_weights = logits, log_weights  # (M, N, C) as stored, (M,)

    def rows(self, idx) -> EnsembleTargets:
        return EnsembleTargets(self.logits[:, idx].float(), self.log_weights)


def cache_dirs_list(cache_dir) -> list:
    """--cache given once (a path) or several times (a list)."""
    return [cache_dir] if isinstance(cache_dir, (str, Path)) else list(cache_dir)


def views_identity(m: dict) -> dict:
    """A manifest's views as this kdpipe replays them (so a version 1 named policy and its composition
    compare equal), with the seed and K."""
    from kdpipe.views import policy_from_identity
    return json.loads(json.dumps({**policy_from_identity(m["views"]).identity(), "seed": m["views"]["seed"],
                                  "K": m["views"]["K"]}))


def _same_input_identity(m: dict) -> dict:
    """What makes row r of a cache one input image, and its labels and classes, as nested values to compare."""
    d = m["dataset"]
    ev = m.get("eval") or {}
    return {"dataset": {k: d.get(k) for k in ("fingerprint", "split", "num_samples", "image_shape", "kind",
                                              "limit", "limit_sampled")},
            "num_classes": m["num_classes"], "class_names": d.get("class_names"),
            "views": views_identity(m), "row_order": m.get("row_order"), "input shape": m["input"]["shape"],
            "test split": (ev.get("dataset") or {}).get("fingerprint")}


def mismatch(a: Cache, b: Cache) -> str | None:
    """The first difference that keeps caches a and b from forming an ensemble, in one phrase, or None."""
    from kdpipe.cache.writer import differences
    ia, ib = _same_input_identity(a.manifest), _same_input_identity(b.manifest)
    diffs = [d for k in ia for d in differences({k: ia[k]}, {k: ib[k]})]  # in the order of importance
    if not diffs:
        return None
    first = diffs[0].replace(" was ", f": {a.path} has ", 1).replace(", now ", f", {b.path} has ", 1)
    return first + (f" (and {len(diffs) - 1} more difference(s))" if len(diffs) > 1 else "")


def _label(c: Cache) -> str:
    return f"{c.path.name} ({c.manifest['teacher'].get('arch')})"


class Ensemble:
    """Caches that form an ensemble (checked), their weights, and what stage two needs of them."""

    def __init__(self, caches: list[Cache], weights=None):
        if len(caches) < 2:
            raise ValueError("an ensemble takes at least two caches")
        ids = {}
        for c in caches:
            if c.manifest["cache_id"] in ids:
                raise KDPipeError(f"{c.path} is the same cache as {ids[c.manifest['cache_id']]} (cache id "
                                  f"{c.manifest['cache_id'][:12]}): give each teacher's cache once")
            ids[c.manifest["cache_id"]] = c.path
        for c in caches[1:]:
            why = mismatch(caches[0], c)
            if why:
                raise KDPipeError(f"caches {caches[0].path} and {c.path} cannot form an ensemble, their views or data "
                                  f"differ: {why}; dump the second teacher with dump-logits --like {caches[0].path}")
        self.caches = caches
        if isinstance(weights, str):  # "0.7,0.3", as --teacher-weights takes them (open_cache(weights=...))
            weights = weights.split(",")
        self.weights = parse_weights(weights, len(caches))
        self.given = [float(x) for x in weights] if weights else None

    def tag(self) -> str:
        return ensemble_tag(len(self.caches), self.given)

    def identity(self) -> str:
        """One string the ranks of a distributed run compare: the caches' ids and the weights."""
        return "+".join(f"{c.manifest['cache_id']}*{w!r}" for c, w in zip(self.caches, self.weights))

    def config(self) -> dict:
        """What a run's config.json adds (kdpipe.resume compares "ensemble"; "ensemble_paths" may move)."""
        return {"ensemble": {"cache_ids": [c.manifest["cache_id"] for c in self.caches], "weights": self.weights,
                             "teachers": [c.manifest["teacher"].get("fingerprint") for c in self.caches]},
                "ensemble_paths": [str(c.path.resolve()) for c in self.caches]}

    def describe(self) -> str:
        return " + ".join(f"{w:.3g} x {_label(c)}" for c, w in zip(self.caches, self.weights))

    def view_source(self, device, policy):
        return EnsembleViews(self, device, policy)

    def test(self) -> "EnsembleTest | None":
        """The teachers' logits on the clean test split (eval.h5 of each cache), or None (caches of a test split)."""
        from kdpipe.cache import format as fmt
        from kdpipe.cache.reader import open_h5
        tl = [c.read_test_logits() for c in self.caches]
        if any(x is None for x in tl):
            return None
        with open_h5(self.caches[0].path / self.caches[0].manifest["eval"]["file"]) as f:
            labels = f[fmt.EVAL_COLUMNS["test_labels"].path][()]
        return EnsembleTest(torch.from_numpy(np.stack(tl)).float(), self.weights, torch.from_numpy(labels))

    def run_metrics(self, loss, last: dict, test: "EnsembleTest | None") -> dict:
        """What metrics.json adds for a run trained from the ensemble: "ensemble" (each teacher with its weight,
        cache and the run's agreement with it; the mixture's temperature and test top-1) and the per-teacher
        agreements of the last epoch."""
        t = run_temperature(loss)
        teachers = []
        for i, (c, w) in enumerate(zip(self.caches, self.weights), 1):
            teachers.append({"name": f"teacher_{i}", "label": _label(c), "weight": w,
                             "cache": str(c.path.resolve()), "cache_id": c.manifest["cache_id"],
                             "agreement": last.get(f"teacher_agreement_{i}"), **c.manifest["teacher"]})
        out = {"ensemble": {"teachers": teachers, "weights": self.weights, "temperature": t, "tag": self.tag(),
                            "label": self.describe(), "agreement": last.get("teacher_agreement")}}
        if test is not None:
            out["ensemble"]["test_top1"] = test.top1(t)
        for i in range(1, len(self.caches) + 1):
            if f"teacher_agreement_{i}" in last:
                out[f"teacher_agreement_{i}"] = last[f"teacher_agreement_{i}"]
        return out


def run_temperature(loss) -> float:
    """The temperature at which a run mixes the teachers (its loss's; 1 for a loss without one)."""
    return float((loss.options or {}).get("temperature", 1.0))


class EnsembleTest:
    """The teachers' logits on the clean test split (M, N, C) and the weights: the agreement figures."""

    def __init__(self, logits: torch.Tensor, weights: list[float], labels=None):
        self.logits = logits
        self.log_weights = torch.tensor(weights, dtype=torch.float32).log()
        self.labels = labels

    def mixture(self, t: float) -> torch.Tensor:
        return mixture_log_probs(self.logits, self.log_weights, t)

    def top1(self, t: float) -> float | None:
        return None if self.labels is None else top1(self.mixture(t), self.labels)

    def agreements(self, student_logits: torch.Tensor, loss) -> dict:
        """teacher_agreement: with the ensemble at the run's T (what it was trained to match);
        teacher_agreement_<i>: with teacher i (1-based, in --cache order) alone."""
        out = {"teacher_agreement": agreement(student_logits, self.mixture(run_temperature(loss)))}
        for i, tl in enumerate(self.logits, 1):
            out[f"teacher_agreement_{i}"] = agreement(student_logits, tl)
        return out


class EnsembleViews:
    """The engine's view source for an ensemble (engine.ViewSource): the primary cache's view parameters
    and every cache's logits of the epoch's view, stacked (M, N, C) on the device."""

    def __init__(self, ensemble: Ensemble, device, policy=None):
        from kdpipe.student import CachedViews
        self.ensemble = ensemble
        self.views = [CachedViews(c, device, policy=policy) for c in ensemble.caches]
        self.log_weights = torch.tensor(ensemble.weights, dtype=torch.float32, device=device).log()

    def __call__(self, epoch: int, rows: torch.Tensor | None = None):
        params, logits = None, []
        for c, v in zip(self.ensemble.caches, self.views):
            p, lg = v(epoch) if rows is None else v(epoch, rows)
            if params is None:
                params = p
            elif not torch.equal(p, params):  # the manifests agreed; the stored rows must too
                raise KDPipeError(f"the view parameters of view {epoch % c.num_views} in {c.path} differ from "
                                  f"those in {self.ensemble.caches[0].path}: run verify-cache on both")
            logits.append(lg)
        dtype = torch.float32 if len({lg.dtype for lg in logits}) > 1 else logits[0].dtype
        return params, EnsembleEpoch(torch.stack([lg.to(dtype) for lg in logits]), self.log_weights)


def open_caches(cache_dirs, weights=None) -> tuple[Cache, Ensemble | None]:
    """The primary cache and, for two or more caches, their (checked) ensemble. Weights need two caches."""
    dirs = cache_dirs_list(cache_dirs)
    if not dirs:
        raise KDPipeError("give a cache: --cache DIR")
    caches = [Cache(d) for d in dirs]
    if len(caches) == 1:
        if weights and [float(x) for x in weights] != [1.0]:
            raise KDPipeError("--teacher-weights weighs the teachers of an ensemble: give two or more --cache")
        return caches[0], None
    for c in caches:  # the mixture needs every teacher's full distribution at T
        if c.manifest["logits"]["codec"] != "raw":
            raise KDPipeError(f"{c.path} holds top-k logits (codec {c.manifest['logits']['codec']}): an ensemble "
                              "mixes full distributions, so give caches dumped with --codec raw")
    return caches[0], Ensemble(caches, weights)


# ---------------------------------------------------------------- dump-logits --like

LIKE_OPTIONS = ("split", "views", "seed", "limit", "image_size", "resize", "policy", "padding", "size")


def like_cache(like_dir, given: dict, data_root=None, data_spec: str | None = None):
    """What `dump-logits --like CACHE` dumps over: CACHE's dataset (reloaded and checked by fingerprint; --data
    and --data-root only say where it lies now) and views (ops, seed, K). `given`: the options the user set
    explicitly among LIKE_OPTIONS; one that differs from CACHE's is refused, naming it.
    Returns (data, test, policy, views, seed, split)."""
    from kdpipe.data import ResizeMode, resize_mode
    from kdpipe.student import load_cache_data
    from kdpipe.views import create_policy, policy_from_identity
    like = Cache(like_dir)
    m = like.manifest
    d, v = m["dataset"], m["views"]
    have = {"split": d["split"], "views": int(v["K"]), "seed": int(v["seed"]), "limit": d.get("limit"),
            "image_size": d.get("image_size"), "resize": resize_mode(d)}
    if given.get("resize") is not None and have["image_size"]:  # as the cache records it: crop:256:bilinear
        given = {**given, "resize": str(ResizeMode.parse(given["resize"]).at(given.get("image_size") or
                                                                             have["image_size"]))}
    for k in ("split", "views", "seed", "limit", "image_size", "resize"):
        if k in given and given[k] != have[k]:
            raise KDPipeError(f"--{k.replace('_', '-')} {given[k]} conflicts with --like {like.path}, whose "
                              f"{k.replace('_', ' ')} is {have[k]}: leave --{k.replace('_', '-')} out")
    policy = policy_from_identity(v)
    if {"policy", "padding", "size"} & set(given):
        asked = create_policy(given.get("policy", "crop-flip"), padding=given.get("padding", 4),
                              size=given.get("size"))
        ops = lambda p: {k: v for k, v in p.identity().items() if k != "spec"}  # noqa: E731 (aliases: same ops)
        if ops(asked) != ops(policy):
            what = (f"--policy {asked.spec}" if "policy" in given else  # options of the images' default alias
                    " and ".join(f"--{k} {given[k]}" for k in ("padding", "size") if k in given) +
                    f" (views {asked.spec})")
            raise KDPipeError(f"{what} conflicts with --like {like.path}, whose views are "
                              f"{policy.spec}: leave --policy, --padding and --size out")
    data, test = load_cache_data(like, data_root, data_spec)
    if data_root is None and data_spec is None:
        # the data where CACHE says it is: recorded as CACHE records it (a relative path with the folder it is read
        # from), not as found from this folder (made absolute), so that students of both caches are of one dataset
        # (the report took the two spellings for two datasets, refused unless --mix-datasets)
        for split_data, rec in ((data, d), (test, m.get("eval", {}).get("dataset"))):
            if split_data is not None and rec and rec.get("spec"):
                split_data.spec = rec["spec"]
        data.workdir = d.get("workdir")  # kdpipe.teacher.dump_logits records it for the relative path
    if d["split"] != "train":
        test = None  # as dump-logits --split test: no eval file
    return data, test, policy, have["views"], have["seed"], have["split"]
