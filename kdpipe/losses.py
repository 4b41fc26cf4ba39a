"""Distillation losses: a registry of classes, each written once for one run or S stacked runs.

The training loop calls `loss(out, teacher, labels, epoch)` and nothing else:
- out: student logits (B, C) for one run, or (S, B, C) for S runs stacked by kdpipe.fused;
- teacher: teacher logits (B, C) shared by the stacked runs, or None when no run needs them, or targets
  with `at_temperature(t)` (an ensemble's, kdpipe.ensemble): losses read them through teacher_at; or, from
  a cache of the top-k codec, TopKTargets (losses with `topk = True` take them: kd);
- labels: (B,) int64, or MixedLabels for mixed views (cross_entropy weighs both labels);
- epoch: the epoch index, counting from 0 (the index kdpipe uses everywhere:
  epoch e reads view e mod K), an int or, in fused runs, a 0-dim tensor (so torch.compile does
  not recompile every epoch).
It returns a dict of named terms, each already weighted, of shape () or (S,); their sum is the
loss. Every term is present in every step (a term whose weights are all zero is zeros), so the loop
can log each one per epoch. Everything is computed in float32, whatever the logits' dtype.

A loss's hyperparameters are Python floats for one run; `Loss.stack(losses)` makes one loss of
the same class whose hyperparameters are (S,) tensors, and the same formula serves both, because
`self.per_run(h, ndim)` broadcasts a hyperparameter over the leading run dimension.

To add a loss: one class with @register_loss("name"), `defaults` (every option, with its default),
`check()` (refuse bad options with a KDPipeError), `needs_teacher` and `terms()`; see
docs/extending.md. Its test goes in tests/test_losses.py.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kdpipe import KDPipeError

_LOSSES: dict[str, type[Loss]] = {}


def register_loss(name: str):
    """Class decorator: make the loss class available as `create_loss(name, ...)` and --loss NAME."""
    def add(cls):
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        cls.name = name
        _LOSSES[name] = cls
        return cls
    return add


def known_losses() -> str:
    """One line: each loss with its options and defaults, for error messages and --help."""
    return "; ".join(f"{n} ({', '.join(f'{k}={v:g}' for k, v in c.defaults.items()) or 'no options'})"
                     for n, c in _LOSSES.items())


def topk_losses() -> list[str]:
    """The losses that train from a top-k cache's targets (those with `topk`)."""
    return [n for n, c in _LOSSES.items() if c.topk]


def create_loss(name: str, **options) -> Loss:
    """The loss `name` with `options` (the rest at their defaults); a KDPipeError names what is wrong.
    A name of members joined by "+" (``kd+hint``) is a ComposedLoss. `name` may also be a spec as --loss
    takes it (``dkd:beta=8``, ``kd:1,hint:50``): its options, then `options` over them."""
    if ":" in str(name) or "," in str(name):
        from kdpipe.sweep import parse_loss
        name, given = parse_loss(name, allow_axes=True)
        options = {**given, **options}
    if "+" in name:
        return ComposedLoss(name, **options)
    cls = _LOSSES.get(name)
    if cls is None:
        raise KDPipeError(f"unknown loss {name!r}; known losses (options=defaults): {known_losses()}")
    return cls(**options)


class Loss:
    """Base class: option handling, stacking and the call; subclasses declare `defaults` and `terms`."""

    name: str = ""
    defaults: dict[str, float] = {}
    integer_options: tuple[str, ...] = ()
    topk: bool = False  # whether terms() takes TopKTargets (a top-k cache's targets) as `teacher`
    uses: str = "logits"  # what of Outputs it compares: "logits", or "features" (the hint's projected features)
    fusable: bool = True  # False: its runs step unfused (kdpipe.student falls back, saying so)

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise KDPipeError(f"loss {self.name} has no option {', '.join(unknown)}; its options (with defaults): "
                              + ", ".join(f"{k}={v:g}" for k, v in self.defaults.items()))
        self.options = {}
        for k, default in self.defaults.items():
            v = options.get(k, default)
            # numbers.Real: numpy's too (a sweep over np.arange gave np.int64, refused as "not a finite number")
            if isinstance(v, bool) or type(v).__name__ == "bool_" or not isinstance(v, numbers.Real) \
                    or not math.isfinite(v):
                raise KDPipeError(f"loss {self.name}: {k} must be a finite number, got {v!r}")
            if k in self.integer_options:
                if v != int(v):
                    raise KDPipeError(f"loss {self.name}: {k} must be a whole number, got {v:g}")
                v = int(v)
            else:
                v = float(v)
            self.options[k] = v
            setattr(self, k, v)
        self.members = [self.options]  # the options of each stacked run; one here
        self.check()

    def check(self) -> None:
        """Raise a KDPipeError for options outside their range."""

    @property
    def needs_teacher(self) -> bool:
        raise NotImplementedError

    def terms(self, out: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor, epoch) -> dict:
        raise NotImplementedError

    @property
    def needs_features(self) -> bool:
        """Whether it compares features (a student with a hint projector, a cache with features)."""
        return self.uses == "features"

    @property
    def trains_logits(self) -> bool:
        """Whether some term reaches the student's logits (a feature loss alone leaves its classifier untrained)."""
        return self.uses != "features"

    def __call__(self, out, teacher, labels, epoch) -> dict[str, torch.Tensor]:
        if teacher is None and self.needs_teacher:
            raise ValueError(f"loss {self.name} with {self.options} needs teacher logits")
        pick = features_of if self.uses == "features" else logits_of
        out, teacher = pick(out), pick(teacher)
        if self.uses == "logits" and teacher is not None:
            _check_sizes(self.name, out, teacher)
        if self.uses == "features" and teacher is not None:
            _check_feature_shapes(self.name, out, teacher)
        if self.uses == "logits":
            labels = _check_labels(self.name, out, labels)
        if isinstance(teacher, TopKTargets) and not self.topk and self.needs_teacher:  # a top-k cache's, in a user's loop
            raise KDPipeError(f"loss {self.name} needs every teacher logit, and these targets are a top-k cache's "
                              f"(its k largest logits): use a loss that takes them ({', '.join(topk_losses())}), or a "
                              "cache dumped with --codec raw")
        if torch.is_tensor(teacher):
            teacher = teacher.float()
        return self.terms(out.float(), teacher, labels, epoch)

    def any_member(self, predicate) -> bool:
        """Whether predicate(options) holds for some stacked run: decided once, never on the device."""
        return any(predicate(m) for m in self.members)

    @classmethod
    def stack(cls, losses: list[Loss], device=None) -> Loss:
        """One loss for S stacked runs: hyperparameters become (S,) float32 tensors on `device`."""
        if not losses or any(type(x) is not cls for x in losses):
            raise ValueError(f"{cls.__name__}.stack takes losses of that class only")
        stacked = cls.__new__(cls)
        stacked.members = [x.options for x in losses]
        stacked.options = None  # no single setting: see .members
        for k in cls.defaults:
            setattr(stacked, k, torch.tensor([float(m[k]) for m in stacked.members], dtype=torch.float32,
                                             device=device))
        return stacked

    @staticmethod
    def per_run(h, ndim: int):
        """Hyperparameter h (a float or 0-dim tensor: one run; an (S,) tensor: stacked runs) broadcast
        against a tensor of `ndim` dimensions whose first is the run's (S, ...) when stacked."""
        return h.view(-1, *([1] * (ndim - 1))) if torch.is_tensor(h) and h.ndim else h

    def __repr__(self):
        return f"{type(self).__name__}({self.members if self.options is None else self.options})"


def _check_sizes(name: str, out, teacher) -> None:
    """Refuse, in one line, student logits whose batch or number of classes is not the teacher targets' (a user's
    loop, kdpipe.api, with a student built for other classes): torch's IndexError or size mismatch otherwise."""
    t = teacher.values if isinstance(teacher, TopKTargets) else getattr(teacher, "logits", teacher)
    if not (torch.is_tensor(out) and torch.is_tensor(t)) or out.ndim < 2 or t.ndim < 2:
        return
    if out.shape[-2] != t.shape[-2]:
        raise KDPipeError(f"loss {name}: the student's logits hold {out.shape[-2]} samples and the teacher's "
                          f"{t.shape[-2]}: give the loss the teacher targets of the same batch")
    # a top-k cache's k values per row are not its classes: its targets carry C (a student of more classes
    # trained silently on them, their mass lumped into the rest bin; one of fewer failed in torch's gather)
    classes = teacher.num_classes if isinstance(teacher, TopKTargets) else t.shape[-1]
    if classes and out.shape[-1] != classes:
        raise KDPipeError(f"loss {name}: the student gives {out.shape[-1]} logits per sample and the teacher "
                          f"{classes}: build the student for the cache's {classes} classes "
                          "(kdpipe.create_model(arch, data.num_classes, data.input_shape))")


def _check_feature_shapes(name: str, out, teacher) -> None:
    """Refuse, in one line, projected student features (..., B, *F) whose (B, *F) is not the teacher's features'
    (a user's loop, kdpipe.api: a Linear projector's (B, C) against (B, C, 1, 1) pooled features broadcast in the
    squared error, comparing every student row with every teacher row)."""
    if not (torch.is_tensor(out) and torch.is_tensor(teacher)):
        return
    if out.ndim < teacher.ndim or out.shape[out.ndim - teacher.ndim:] != teacher.shape:
        raise KDPipeError(f"loss {name}: the student's projected features of shape {tuple(out.shape)} do not match "
                          f"the teacher's features of shape {tuple(teacher.shape)}: project the student's layer onto "
                          "the teacher's feature shape (kdpipe.features.make_projector) for the same batch")


def _check_labels(name: str, out, labels):
    """The labels as the losses take them: MixedLabels, or the batch's class indices (B,) as int64 (another integer
    dtype is cast). Float labels (one-hot, soft, or indices as floats), (B, 1) labels or another batch's are refused
    in one line: torch's 'expected target dtype to be Long' or an expand error from inside cross_entropy otherwise."""
    if labels is None or isinstance(labels, MixedLabels) or not torch.is_tensor(out):
        return labels
    if (not torch.is_tensor(labels) or labels.ndim != 1 or labels.dtype == torch.bool
            or labels.dtype.is_floating_point or labels.dtype.is_complex):
        what = f"{labels.dtype} of shape {tuple(labels.shape)}" if torch.is_tensor(labels) else type(labels).__name__
        raise KDPipeError(f"loss {name}: labels must be the batch's class indices, a (B,) integer tensor, got {what}: "
                          "pass e.g. labels.long(), labels.view(-1), or labels.argmax(-1) of one-hot labels")
    if out.ndim >= 2 and labels.shape[0] != out.shape[-2]:
        raise KDPipeError(f"loss {name}: the student's logits hold {out.shape[-2]} samples and the labels "
                          f"{labels.shape[0]}: give the loss the labels of the same batch")
    return labels if labels.dtype == torch.int64 else labels.long()


class Outputs(NamedTuple):
    """Logits with features: a student with a hint projector returns its logits and its projected
    features (kdpipe.features.HintStudent); the teacher targets of a cache with features are its logits
    and the cached features. A loss takes what its `uses` says (logits_of / features_of)."""
    logits: torch.Tensor
    features: torch.Tensor | None = None


def logits_of(x):
    """The logits of Outputs, or x itself (a logits tensor, or None)."""
    return x.logits if isinstance(x, Outputs) else x


def features_of(x):
    """The features of Outputs (None stays None); logits alone are a caller's bug, not a user error."""
    if x is None:
        return None
    if not isinstance(x, Outputs) or x.features is None:
        raise ValueError("a feature loss was given no features: the student needs a hint projector and the "
                         "cache features (kdpipe.student does both for losses with needs_features)")
    return x.features


class MixedLabels(NamedTuple):
    """The labels of mixed views (kdpipe.views' mixup and cutmix): each row's own label, its partner's,
    and the share (B,) float32 of the row's own view in the mix. Losses take them where they take labels."""
    labels: torch.Tensor
    partner_labels: torch.Tensor
    weight: torch.Tensor


def main_labels(labels) -> torch.Tensor:
    """One class per row: the label itself, or for mixed views the label of the larger share (a tie
    goes to the row's own), for losses that split the classes at a target (dkd)."""
    if isinstance(labels, MixedLabels):
        return torch.where(labels.weight >= 0.5, labels.labels, labels.partner_labels)
    return labels


def _ce(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    c = out.shape[-1]
    y = labels.expand(out.shape[:-1]).reshape(-1)
    return F.cross_entropy(out.reshape(-1, c), y, reduction="none").view(out.shape[:-1])


def cross_entropy(out: torch.Tensor, labels) -> torch.Tensor:
    """Mean cross-entropy over the batch: out (..., B, C) -> (...). For mixed views (MixedLabels), the
    mixed CE: w * CE(out, own label) + (1 - w) * CE(out, partner's label) per row, w the stored share."""
    if isinstance(labels, MixedLabels):
        w = labels.weight.to(out.device, torch.float32)
        return (w * _ce(out, labels.labels) + (1.0 - w) * _ce(out, labels.partner_labels)).mean(-1)
    return _ce(out, labels).mean(-1)


def kl_sum(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p || q) = sum_c p (log p - log q) over the last dimension, from log-probabilities."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def teacher_at(teacher, t) -> torch.Tensor:
    """The teacher's logits scaled by the temperature, teacher / t, for the softmax at T. Targets that are not
    one dense logits tensor give them through `at_temperature(t)`: an ensemble (kdpipe.ensemble) gives the
    log of its teachers' weighted mean probability at T, whose softmax is that mixture. t is per_run's."""
    return teacher / t if torch.is_tensor(teacher) else teacher.at_temperature(t)


def _zeros(out: torch.Tensor) -> torch.Tensor:
    return out.new_zeros(out.shape[:-2])


@register_loss("kd")
class KDLoss(Loss):
    """Hinton et al. 2015: alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y).

    alpha = 0 is plain cross-entropy (the from-scratch baseline, and the teacher's own training) and
    needs no teacher. Terms: ce, kd.
    """

    defaults = {"temperature": 4.0, "alpha": 0.9}
    topk = True  # from a top-k cache, the KL is topk_kl's (k + 1)-bin one

    def check(self):
        if not self.temperature > 0:
            raise KDPipeError(f"loss kd: --temperature must be > 0, got {self.temperature:g}")
        if not 0.0 <= self.alpha <= 1.0:
            raise KDPipeError(f"loss kd: --alpha must lie in [0, 1], got {self.alpha:g}")

    @property
    def needs_teacher(self) -> bool:
        return self.any_member(lambda m: m["alpha"] > 0)

    def terms(self, out, teacher, labels, epoch):
        w = lambda h: self.per_run(h, 1)  # noqa: E731 (against per-run terms: (S,) or ())
        ce = kd = _zeros(out)
        if self.any_member(lambda m: m["alpha"] < 1):  # alpha = 1 leaves CE out, as it always did
            ce = (1.0 - w(self.alpha)) * cross_entropy(out, labels)
        if isinstance(teacher, TopKTargets) and self.needs_teacher:
            kd = w(self.alpha) * w(self.temperature) ** 2 * self.topk_kl(out, teacher).mean(-1)
        elif teacher is not None and self.needs_teacher:
            t = self.per_run(self.temperature, out.ndim)
            kl = kl_sum(F.log_softmax(teacher_at(teacher, t), dim=-1), F.log_softmax(out / t, dim=-1)).mean(-1)
            kd = w(self.alpha) * w(self.temperature) ** 2 * kl
        return {"ce": ce, "kd": kd}

    def topk_kl(self, out, teacher: TopKTargets) -> torch.Tensor:
        """Per-sample KL against top-k targets at the runs' temperatures (the bench's naive variants
        override this with topk_kl's other `rest` modes)."""
        return topk_kl(out, teacher, self.temperature)


def warmup_weight(epoch, warmup):
    """min((epoch + 1) / warmup, 1), epoch counting from 0: the first epoch has weight 1 / warmup, as
    in the DKD authors' code whose epochs count from 1; warmup = 0 is no warm-up. Tensors stay
    tensors (no sync, and torch.compile sees no changing Python number)."""
    if torch.is_tensor(epoch) or torch.is_tensor(warmup):
        return torch.clamp((epoch + 1) / warmup, max=1.0)  # x / 0 = inf -> 1
    return 1.0 if warmup == 0 else min((epoch + 1) / warmup, 1.0)


@register_loss("dkd")
class DKDLoss(Loss):
    """Decoupled KD (Zhao et al., CVPR 2022): CE + w(epoch) * T^2 * (alpha * TCKD + beta * NCKD).

    TCKD = KL(b^T || b^S), b = (p_target, 1 - p_target), the binary target / non-target split;
    NCKD = KL(p̂^T || p̂^S), p̂ the distribution over the non-target classes alone; all at
    temperature T. w(epoch) = min((epoch + 1) / warmup, 1) (see warmup_weight). Terms: ce, tckd, nckd.

    Computed from log-sum-exps of the scaled logits, never from 1 - p, so a teacher that is sure of
    the target (p -> 1 in float32) gives finite terms.
    """

    defaults = {"temperature": 4.0, "alpha": 1.0, "beta": 8.0, "warmup": 20}
    integer_options = ("warmup",)

    def check(self):
        if not self.temperature > 0:
            raise KDPipeError(f"loss dkd: --temperature must be > 0, got {self.temperature:g}")
        for k in ("alpha", "beta", "warmup"):
            if getattr(self, k) < 0:
                raise KDPipeError(f"loss dkd: {k} must be >= 0, got {getattr(self, k):g}")

    @property
    def needs_teacher(self) -> bool:
        return self.any_member(lambda m: m["alpha"] > 0 or m["beta"] > 0)

    def terms(self, out, teacher, labels, epoch):
        w = lambda h: self.per_run(h, 1)  # noqa: E731 (against per-run terms: (S,) or ())
        ce = cross_entropy(out, labels)
        tckd = nckd = _zeros(out)
        if teacher is not None and self.needs_teacher:
            t = self.per_run(self.temperature, out.ndim)
            target = F.one_hot(main_labels(labels), out.shape[-1]).bool()  # (B, C), broadcast over the runs
            split_s, rest_s = _target_split(out / t, target)
            split_t, rest_t = _target_split(teacher_at(teacher, t), target)
            scale = w(warmup_weight(epoch, self.warmup)) * w(self.temperature) ** 2
            tckd = w(self.alpha) * scale * kl_sum(split_t, split_s).mean(-1)
            nckd = w(self.beta) * scale * kl_sum(rest_t, rest_s).mean(-1)
        return {"ce": ce, "tckd": tckd, "nckd": nckd}


def _target_split(z: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From scaled logits z (..., B, C): log b = (log p_target, log (1 - p_target)) as (..., B, 2), and
    log p̂ (..., B, C), the log-distribution over the non-target classes, with 0 at the target: there
    teacher and student both hold "p = 1", whose KL contribution 1 * (0 - 0) is exactly 0 with a zero
    gradient (masking the term afterwards would leave inf * 0 = nan in the backward pass when
    exp(z_target - lse_rest) overflows)."""
    lse_all = z.logsumexp(-1, keepdim=True)
    lse_rest = z.masked_fill(target, float("-inf")).logsumexp(-1, keepdim=True)
    z_target = (z * target).sum(-1, keepdim=True)
    log_b = torch.cat([z_target - lse_all, lse_rest - lse_all], dim=-1)
    return log_b, (z - lse_rest).masked_fill(target, 0.0)


class TopKTargets(NamedTuple):
    """A top-k cache's teacher targets (kdpipe/cache/format.py, codec "topk") for N rows, on one device:
    values (N, k) float32, the k largest raw logits in decreasing order; indices (N, k) int64, their
    classes; rest (N, D) float32, per declared temperature, log sum exp(z_c / T) over the other classes
    (-inf when k = C); temperatures (D,) float32, the declared temperatures (and `declared`, the same as
    Python floats); num_classes, the cache's C (0: not known), which a student's logits must match.
    `rows(idx)` gives a batch's."""
    values: torch.Tensor
    indices: torch.Tensor
    rest: torch.Tensor
    temperatures: torch.Tensor
    declared: tuple = ()
    num_classes: int = 0

    def rows(self, idx) -> TopKTargets:
        return TopKTargets(self.values[idx].float(), self.indices[idx], self.rest[idx], self.temperatures,
                           self.declared, self.num_classes)

    def rest_at(self, temperature) -> torch.Tensor:
        """The rest term at each run's temperature: (B,) for a float T, which must be a declared one (else
        a KDPipeError names them); (S, B) for the (S,) temperatures of stacked runs, where the nearest
        declared one is taken without a device sync (stage two refuses undeclared ones beforehand)."""
        if not torch.is_tensor(temperature):
            from kdpipe.cache.format import declared_temperature
            declared = self.declared or tuple(self.temperatures.tolist())
            j = declared_temperature({"temperatures": declared}, temperature)
            if j is not None:
                return self.rest[:, j]
            raise KDPipeError(f"temperature {temperature:g} was not declared when this top-k cache was dumped: "
                              f"use one of {', '.join(f'{d:g}' for d in declared)}, or dump again with it in "
                              "--temperatures")
        t = torch.as_tensor(temperature, dtype=torch.float32, device=self.temperatures.device)
        j = (t.reshape(-1, 1) - self.temperatures.reshape(1, -1)).abs().argmin(-1)  # (S,) or (1,)
        r = self.rest[:, j].transpose(0, 1)  # (S, B)
        return r if t.ndim else r[0]


REST_MODES = ("keep", "drop", "zero", "renormalize")


def topk_kl(out: torch.Tensor, teacher: TopKTargets, temperature, rest: str = "keep") -> torch.Tensor:
    """Per-sample KL (..., B) between the teacher's and the student's distributions at temperature T
    (a float, or (S,) for stacked runs), from top-k targets.

    rest "keep" (what kd uses): a (k + 1)-bin KL over the teacher's top k classes and one bin for every
    other class: the teacher's bins are softmax([values / T, rest_T]); the student's are its own
    probabilities of those k classes and the sum of its probabilities of the others (the log-sum-exp of
    its remaining logits / T minus that of all). With k = C it is the dense KL; else it is the dense KL
    with the remaining classes merged into one (a lower bound of it, exact in their total mass).

    The naive alternatives, kept for bench/topk.py to measure (no CLI loss uses them):
    "drop": the same sum without the rest bin: the teacher's true top-k probabilities p_i (as a tool that
    stores top-k log-probabilities has them) against the student's, sum_i p_i (log p_i - log q_i); its
    minimum puts all of the student's mass on the top k (q_i = p_i / sum p).
    "zero": the rest taken as zero mass: the teacher's top-k probabilities renormalized to sum to 1 (all
    one knows from top-k logits alone) against the student's full distribution.
    "renormalize": teacher and student both renormalized over the teacher's top k: the student's mass
    outside them is ignored (at k = 1 the term is 0).
    """
    t = Loss.per_run(temperature, out.ndim)
    z = out / t  # (..., B, C)
    k = teacher.indices.shape[-1]
    idx = teacher.indices.expand(*z.shape[:-1], k)
    zk = z.gather(-1, idx)
    vk = teacher.values / t  # (..., B, k)
    if rest not in REST_MODES:
        raise ValueError(f"rest must be one of {REST_MODES}, got {rest!r}")
    if rest == "renormalize":
        return kl_sum(F.log_softmax(vk, -1), F.log_softmax(zk, -1))
    lse_all = z.logsumexp(-1, keepdim=True)
    if rest == "zero":
        return kl_sum(F.log_softmax(vk, -1), zk - lse_all)
    rest_t = teacher.rest_at(temperature).unsqueeze(-1)  # (..., B, 1)
    log_p = F.log_softmax(torch.cat([vk, rest_t.expand(*vk.shape[:-1], 1)], -1), -1)
    if rest == "drop":
        return kl_sum(log_p[..., :k], zk - lse_all)
    mask = torch.zeros_like(z, dtype=torch.bool).scatter(-1, idx, True)
    log_q = torch.cat([zk, z.masked_fill(mask, float("-inf")).logsumexp(-1, keepdim=True)], -1) - lse_all
    # An empty bin (k = C: no class remains, rest -inf for both) adds 0, not 0 * (-inf - -inf).
    return torch.where(log_p > float("-inf"), log_p.exp() * (log_p - log_q), 0.0).sum(-1)


@register_loss("hint")
class HintLoss(Loss):
    """Hint (FitNets, Romero et al. 2015): the mean squared error between the student's features at a named
    layer, mapped by a learned projector (kdpipe.features), and the teacher's cached features: the mean
    over the feature's elements, then over the batch (so its scale does not grow with the width). It has
    no weight of its own: compose it, ``kd+hint`` or ``kd:1,hint:50`` (ComposedLoss). Term: hint."""

    defaults = {}
    uses = "features"
    fusable = False  # the projector and the hook are per run: its runs step unfused

    @property
    def needs_teacher(self) -> bool:
        return True

    def terms(self, out, teacher, labels, epoch):
        err = (out - teacher).pow(2)  # (..., B, *F) against (B, *F)
        lead = err.ndim - teacher.ndim + 1  # the run dimensions and the batch's
        return {"hint": err.reshape(*err.shape[:lead], -1).mean(-1).mean(-1)}


class ComposedLoss(Loss):
    """A weighted sum of registered losses, written ``kd+hint`` (every weight 1) or ``kd:1,hint:50``
    (kdpipe.sweep.parse_loss). Its options: the sweep axes temperature and alpha (given to the members that
    have them), ``MEMBER.weight`` and any member's own option as ``MEMBER.OPTION``. Its terms are the members'
    terms times their weights (a name two members share gets the second's prefixed, ``MEMBER.TERM``). Its
    runs step unfused."""

    fusable = False
    AXES = ("temperature", "alpha")

    def __init__(self, name: str, **options):  # noqa: super().__init__ is not called: the options are the members'
        names = name.split("+")
        if any(not n for n in names) or len(set(names)) != len(names):
            raise KDPipeError(f"loss {name!r}: a composition names each loss once, joined by '+' (e.g. kd+hint)")
        given: dict[str, dict] = {n: {} for n in names}
        weights = {n: 1.0 for n in names}
        for key, v in options.items():
            member, dot, opt = key.partition(".")
            if key in self.AXES:
                takers = [n for n in names if n in _LOSSES and key in _LOSSES[n].defaults]
                if not takers:
                    raise KDPipeError(f"loss {name}: no member takes {key}")
                for n in takers:
                    given[n][key] = v
            elif dot and member in given:
                if opt == "weight":
                    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                        raise KDPipeError(f"loss {name}: the weight of {member} must be a number >= 0, got {v!r}")
                    weights[member] = float(v)
                else:
                    given[member][opt] = v
            else:
                raise KDPipeError(f"loss {name} has no option {key}; its options: temperature, alpha (to members "
                                  "that take them), MEMBER.weight and MEMBER.OPTION for its members "
                                  + ", ".join(names))
        self.name = name
        self.parts = [(n, weights[n], create_loss(n, **given[n])) for n in names]
        # An axis is recorded once where every member that takes it has one value (given, or alike by default);
        # else per member (kd+dkd: kd.alpha 0.9, dkd.alpha 1), so config.json and the report say what each used.
        shared = {k for k in self.AXES if len({loss.options[k] for _, _, loss in self.parts if k in loss.options}) == 1}
        self.options = {}
        for n, w, loss in self.parts:
            for k, v in loss.options.items():
                self.options[k if k in shared else f"{n}.{k}"] = v
            self.options[f"{n}.weight"] = w
        self.members = [self.options]

    @property
    def needs_teacher(self) -> bool:
        return any(w > 0 and loss.needs_teacher for _, w, loss in self.parts)

    @property
    def needs_features(self) -> bool:
        return any(loss.needs_features for _, _, loss in self.parts)

    @property
    def trains_logits(self) -> bool:
        return any(w > 0 and loss.trains_logits for _, w, loss in self.parts)

    @property
    def topk(self) -> bool:
        """Whether it trains from a top-k cache: every member that reads teacher logits takes top-k targets."""
        return all(loss.topk or loss.uses == "features" for _, _, loss in self.parts)

    def __call__(self, out, teacher, labels, epoch):
        if teacher is None and self.needs_teacher:
            raise ValueError(f"loss {self.name} with {self.options} needs teacher logits")
        terms = {}
        for n, w, loss in self.parts:
            for k, v in loss(out, teacher, labels, epoch).items():
                terms[f"{n}.{k}" if k in terms else k] = w * v
        return terms

    @classmethod
    def stack(cls, losses, device=None):
        raise ValueError("a composed loss steps unfused")
