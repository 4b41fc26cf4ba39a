"""Views: the augmentation-fixed dataset, as a composition of registered view ops.

A view is written as a spec: ops joined by ``+``, each op's options after ``:``, e.g. ``crop:4+flip``,
``rotate:15``, ``pad-crop:256:symmetric``, ``resized-crop:224+flip``. Each op is one class below,
registered by name with ``@view_op``. It declares its int32 parameter columns, how it draws them from
the view's random stream, how a batch replays them on any device, its output shape, its clean
(evaluation) parameters, and whether it is random at all.

A policy draws explicit integer replay parameters for every (view, sample) from a seed, and replays
them in batches. Stage one and stage two call the same ``replay`` on the stored parameters, so the
student sees bit for bit the input the teacher saw. The parameters of view k depend only on
(seed, k): one stream ``numpy.random.default_rng([seed, k])`` that the ops draw from in order, so any
subset of views can be drawn again anywhere (a resumed dump, another rank, verify-cache). Replay is
per sample: a sample's view never depends on which other samples share its batch.

Mixing ops (``mixup:A``, ``cutmix:A``; last in a composition) also draw a partner sample per (view,
sample); ``ViewPolicy.replay_rows`` replays the partner's own view from its row of the same view and
mixes it in. Stage one, stage two, verify-cache and every rank build their inputs with it.

To add an op: one ``@view_op`` class here, and its test in tests/test_views.py.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe import KDPipeError

_KIND_NAMES = {"image": "images", "features": "feature vectors"}
IDENTITY_LAYOUT = "ops"  # a views identity with "ops" is a composition; one without is a named v1 policy

_OPS: dict[str, type[ViewOp]] = {}


def view_op(cls):
    """Register a view op class under its ``name``."""
    if cls.name in _OPS:
        raise AssertionError(f"view op {cls.name} registered twice")
    _OPS[cls.name] = cls
    return cls


class _Required:
    def __repr__(self):
        return "required"


REQUIRED = _Required()


class ViewOp:
    """One step of a view. Subclasses set the class attributes and override the methods that apply.

    ``params`` lists the options in the order the spec gives them positionally: (name, parse, default);
    ``REQUIRED`` as default makes an option mandatory. ``exact`` ops move integers (uint8 stays uint8);
    the others work in float32. ``derived``: verify-cache can recompute the columns from (seed, view).
    ``repeatable``: the op may come more than once in a composition (one flip, crop, rotate or gauss says
    what two would).
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    columns: ClassVar[tuple[str, ...]] = ()
    params: ClassVar[tuple] = ()
    random: ClassVar[bool] = True
    exact: ClassVar[bool] = True
    derived: ClassVar[bool] = True
    kinds: ClassVar[tuple[str, ...]] = ("image",)  # "image" (C, H, W) and/or "features" (D,)
    repeatable: ClassVar[bool] = False
    usage: ClassVar[str] = ""

    def __init__(self, **options):
        names = [p[0] for p in self.params]
        unknown = set(options) - set(names)
        if unknown:
            raise KDPipeError(f"view op {self.name} has no option {sorted(unknown)[0]!r} (options: "
                              f"{', '.join(names) or 'none'})")
        opts = {}
        for pname, parse, default in self.params:
            value = options.get(pname, default)
            if value is REQUIRED:
                raise KDPipeError(f"view op {self.name} needs {pname}: write {self.usage}")
            try:
                opts[pname] = value if value is None else parse(value)
            except (TypeError, ValueError):
                raise KDPipeError(f"view op {self.name}: bad {pname} {value!r}: write {self.usage}") from None
        self.options = opts
        self.check()

    def check(self) -> None:
        """Refuse options out of range (KDPipeError); called once the options are parsed."""

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Refuse (KDPipeError) a per-sample input shape of the op's kind that the op makes no sense on."""

    # -------------------------------------------------------------- spec and identity

    @classmethod
    def from_args(cls, args: list[str]) -> ViewOp:
        """The op a spec names: its options positionally; an empty one keeps its default."""
        if len(args) > len(cls.params):
            raise KDPipeError(f"view op {cls.name} takes at most {len(cls.params)} option(s): write {cls.usage}")
        return cls(**{p[0]: a for p, a in zip(cls.params, args) if a != ""})

    def spec(self) -> str:
        """Canonical spec of the op: options positionally, trailing defaults left out."""
        args = [_fmt(self.options[p]) if self.options[p] != d else "" for p, _, d in self.params]
        while args and args[-1] == "":
            args.pop()
        return ":".join([self.name, *args])

    def identity(self) -> dict:
        return {"name": self.name, "options": dict(self.options), "version": self.version,
                "columns": list(self.columns)}

    # -------------------------------------------------------------- shapes, drawing, replay

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)

    def draw(self, rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> list[np.ndarray]:
        """The op's columns for n samples of per-sample ``shape``, drawn from ``rng`` in column order."""
        return []

    def clean(self, shape: tuple[int, ...], n: int) -> list[np.ndarray]:
        """The columns of the evaluation view (no augmentation), for n samples."""
        return []

    def varies(self) -> bool:
        """Whether, with its options, two views can differ (crop:0 and rotate:0 cannot): a policy of such
        ops alone is no more random than none, whatever `random` says of the op."""
        return True

    def bounds(self, n: int, shape: tuple[int, ...]) -> list[tuple[int, int]]:
        """The least and the greatest value (both included) that ``draw`` or ``clean`` gives each column, for
        n samples of per-sample ``shape``. Stage two refuses a cache whose parameters lie outside (``outside``):
        a damaged shard, which would otherwise crash the replay or replay a view no dump drew."""
        if self.columns:
            raise NotImplementedError(f"view op {self.name} declares no bounds for its columns {self.columns}")
        return []

    def outside(self, p: np.ndarray, n: int, shape: tuple[int, ...]) -> np.ndarray:
        """(B,) True where a row of ``p`` (B, len(columns)) is none that draw or clean gives: by default, where
        a column lies outside its ``bounds``. Override to add constraints between columns."""
        bad = np.zeros(len(p), dtype=bool)
        for j, (lo, hi) in enumerate(self.bounds(n, shape)):  # column by column: 20x faster than (B, P) at once
            bad |= (p[:, j] < lo) | (p[:, j] > hi)
        return bad

    def replay(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Apply the op to batch x with its int64 columns p (B, len(columns)), on x's device."""
        return x

    def clean_step(self, shape: tuple[int, ...]) -> str | None:
        """What the clean view does to a sample of ``shape``, in words for whoever deploys the model and must
        give it the same input (None: nothing; the clean view of most ops is the sample as it is)."""
        return None

    def folds(self, nxt: ViewOp) -> bool:
        """True if this op replays the next op too (its replay then gets both ops' columns)."""
        return False


def _fmt(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _pair(v) -> list[float]:
    a, b = v
    return [float(a), float(b)]


def _positive_int(v) -> int:
    v = int(v)
    if v < 1:
        raise ValueError(v)
    return v


# ---------------------------------------------------------------------- the ops

@view_op
class NoneOp(ViewOp):
    """The sample as it is."""
    name = "none"
    random = False
    kinds = ("image", "features")
    usage = "none"


@view_op
class Crop(ViewOp):
    """Zero pad P pixels on every side, then crop back to the input size: translate-only jitter."""
    name = "crop"
    columns = ("dy", "dx")
    params = (("padding", int, REQUIRED),)
    usage = "crop:P (P pixels of zero padding, e.g. crop:4; crop:2 for digits)"

    def check(self):
        if self.options["padding"] < 0:
            raise KDPipeError(f"crop padding must be >= 0, got {self.options['padding']}")

    def check_shape(self, shape):
        p, side = self.options["padding"], min(shape[1:])
        if p >= side:  # a shift by the padding or more leaves no pixel of the image in the view
            raise KDPipeError(f"crop:{p} shifts {shape[1]}x{shape[2]} images by up to {p} pixels, so some views "
                              "would show none of the image: "
                              + (f"give a padding below {side}" if side > 1 else "leave crop out"))

    def draw(self, rng, n, shape):
        p = self.options["padding"]
        return [rng.integers(0, 2 * p + 1, size=n), rng.integers(0, 2 * p + 1, size=n)]

    def clean(self, shape, n):
        p = self.options["padding"]
        return [np.full(n, p), np.full(n, p)]

    def varies(self):
        return self.options["padding"] > 0

    def bounds(self, n, shape):
        p = self.options["padding"]
        return [(0, 2 * p), (0, 2 * p)]

    def folds(self, nxt):
        return isinstance(nxt, Flip)

    def replay(self, x, p):
        pad = self.options["padding"]
        h, w = x.shape[-2:]
        rows = p[:, 0:1] - pad + torch.arange(h, device=x.device)  # source rows, (B, H)
        cols = p[:, 1:2] - pad + torch.arange(w, device=x.device)
        return _gather(x, rows, _flipped(cols, p, 2), "constant", pad, pad)


@view_op
class Flip(ViewOp):
    """Mirror left-right with probability 1/2."""
    name = "flip"
    columns = ("flip",)
    usage = "flip"

    def draw(self, rng, n, shape):
        return [rng.integers(0, 2, size=n)]

    def clean(self, shape, n):
        return [np.zeros(n)]

    def bounds(self, n, shape):
        return [(0, 1)]

    def replay(self, x, p):
        return torch.where(p[:, 0].bool().view(-1, 1, 1, 1), x.flip(-1), x)


PAD_MODES = ("constant", "edge", "reflect", "symmetric")


@view_op
class PadCrop(ViewOp):
    """An S x S crop at a uniform position, the input first padded (by MODE) to at least S x S on each
    side that is short: torchvision's RandomCrop(S, pad_if_needed=True, padding_mode=MODE)."""
    name = "pad-crop"
    columns = ("y0", "x0")  # top-left corner of the crop in the padded image
    repeatable = True  # pad-crop:40:reflect+pad-crop:32 on 32 x 32: two random crops, shifts up to 8 (not 4)
    params = (("size", _positive_int, REQUIRED), ("mode", str, "constant"))
    usage = f"pad-crop:S[:MODE] (MODE one of {', '.join(PAD_MODES)})"

    def check(self):
        if self.options["mode"] not in PAD_MODES:
            raise KDPipeError(f"pad-crop mode {self.options['mode']!r} is not one of {', '.join(PAD_MODES)}")

    def _padded(self, shape):
        s = self.options["size"]
        _, h, w = shape
        return h + 2 * max(s - h, 0), w + 2 * max(s - w, 0)

    def output_shape(self, shape):
        return (shape[0], self.options["size"], self.options["size"])

    def draw(self, rng, n, shape):
        s = self.options["size"]
        ph, pw = self._padded(shape)
        return [rng.integers(0, ph - s + 1, size=n), rng.integers(0, pw - s + 1, size=n)]

    def clean(self, shape, n):
        s = self.options["size"]
        ph, pw = self._padded(shape)
        return [np.full(n, (ph - s) // 2), np.full(n, (pw - s) // 2)]

    def bounds(self, n, shape):
        s = self.options["size"]
        ph, pw = self._padded(shape)
        return [(0, ph - s), (0, pw - s)]

    def clean_step(self, shape):
        s, (_, h, w) = self.options["size"], shape
        if (h, w) == (s, s):
            return None
        pad = f", padding ({self.options['mode']}) each side shorter than {s}" if min(h, w) < s else ""
        return (f"take the centre {s} x {s} of the {h} x {w} image{pad} ({self._span(h, 'rows')}; "
                f"{self._span(w, 'columns')})")

    def _span(self, n: int, axis: str) -> str:
        """Where the clean crop lies along an axis of n pixels, exactly (clean()'s floor, which torchvision's
        CenterCrop rounds the other way when n - S is odd; and its padding, the odd pixel before)."""
        s = self.options["size"]
        if n >= s:
            return f"{axis} {(n - s) // 2} to {(n - s) // 2 + s - 1} of 0 to {n - 1}"
        return f"{axis} padded by {s - n - (s - n) // 2} before and {(s - n) // 2} after"

    def folds(self, nxt):
        return isinstance(nxt, Flip)

    def replay(self, x, p):
        s = self.options["size"]
        h, w = x.shape[-2:]
        ph, pw = max(s - h, 0), max(s - w, 0)
        ar = torch.arange(s, device=x.device)
        rows, cols = p[:, 0:1] - ph + ar, p[:, 1:2] - pw + ar
        return _gather(x, rows, _flipped(cols, p, 2), self.options["mode"], ph, pw)


def _flipped(cols: torch.Tensor, p: torch.Tensor, at: int) -> torch.Tensor:
    """Source columns (B, W), mirrored in the rows where a folded flip (column ``at`` of p) is set."""
    if p.shape[1] <= at:
        return cols
    return torch.where(p[:, at:at + 1].bool(), cols.flip(1), cols)


def _source_index(u: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Map coordinates u of the padded image to the source's [0, n) (any amount of padding)."""
    if mode in ("constant", "edge"):
        return u.clamp(0, n - 1)
    if mode == "reflect":  # ... 2 1 | 0 1 2 ... n-1 | n-2 ...
        if n == 1:
            return torch.zeros_like(u)
        m = u.remainder(2 * (n - 1))
        return torch.where(m >= n, 2 * (n - 1) - m, m)
    m = u.remainder(2 * n)  # symmetric: ... 1 0 | 0 1 ... n-1 | n-1 n-2 ...
    return torch.where(m >= n, 2 * n - 1 - m, m)


def _gather(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, mode: str, ph: int, pw: int) -> torch.Tensor:
    """out[b, :, i, j] = x[b, :, rows[b, i], cols[b, j]] for source coordinates that reach at most ph rows
    and pw columns outside the image, padded there by ``mode``; any dtype, integers stay exact."""
    b, _, h, w = x.shape
    if mode == "constant":  # zero padding, then plain indexing
        x = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
        r, c = rows + ph, cols + pw
    else:
        r, c = _source_index(rows, h, mode), _source_index(cols, w, mode)
    bi = torch.arange(b, device=x.device)[:, None, None]
    out = x.permute(0, 2, 3, 1)[bi, r[:, :, None], c[:, None, :]]  # (B, H', W', C)
    return out.permute(0, 3, 1, 2).contiguous()


@view_op
class Rotate(ViewOp):
    """Rotate by a uniform angle in [-DEG, DEG] degrees (counter-clockwise positive) about the centre,
    bilinear, zero fill; the angle is stored in thousandths of a degree."""
    name = "rotate"
    columns = ("angle_mdeg",)
    params = (("degrees", float, REQUIRED),)
    exact = False
    usage = "rotate:DEG (uniform angle in +-DEG degrees, e.g. rotate:15)"

    def check(self):
        if not 0 <= self.options["degrees"] <= 180:
            raise KDPipeError(f"rotate degrees must lie in [0, 180], got {self.options['degrees']}")

    def check_shape(self, shape):
        if min(shape[1:]) < 2:
            raise KDPipeError(f"rotate turns images about their centre, and {shape[1]}x{shape[2]} images are one "
                              "pixel thin, so a rotated view would be mostly zero fill: leave rotate out")

    def draw(self, rng, n, shape):
        m = int(round(self.options["degrees"] * 1000))
        return [rng.integers(-m, m + 1, size=n)]

    def clean(self, shape, n):
        return [np.zeros(n)]

    def varies(self):
        return round(self.options["degrees"] * 1000) > 0  # the angles drawn, in thousandths: rotate:0.0004 draws 0

    def bounds(self, n, shape):
        m = int(round(self.options["degrees"] * 1000))
        return [(-m, m)]

    def replay(self, x, p):
        b, c, h, w = x.shape
        a = p[:, 0].to(torch.float32) * (math.pi / 180_000.0)
        cos, sin = torch.cos(a), torch.sin(a)
        # Output pixel (normalized xn, yn) samples the input at R(-a) applied in pixel units about the
        # centre; normalized coordinates scale x by w/2 and y by h/2, hence the aspect factors.
        zero = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, -sin * (h / w), zero], 1),
                             torch.stack([sin * (w / h), cos, zero], 1)], 1)
        grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@view_op
class ResizedCrop(ViewOp):
    """A box of random area (scale) and aspect ratio, resized bilinearly to S x S: torchvision's
    RandomResizedCrop(S) without antialiasing. S defaults to the input height. A following ``flip``
    is folded into the sampling grid (so ``resized-crop+flip`` replays as version 1 caches did)."""
    name = "resized-crop"
    columns = ("y0", "x0", "h", "w")
    repeatable = True
    SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # torchvision's defaults; the spec sets only S
    params = (("size", _positive_int, None), ("scale", _pair, SCALE), ("ratio", _pair, RATIO))
    exact = False
    usage = "resized-crop[:S] (output S x S, default the input height)"

    @classmethod
    def from_args(cls, args):
        if len(args) > 1:  # scale and ratio are torchvision's defaults; the Python API may set them
            raise KDPipeError(f"view op resized-crop takes one option: write {cls.usage}")
        return super().from_args(args)

    def spec(self):
        s = self.options["size"]
        return self.name if s is None else f"{self.name}:{s}"

    def check(self):
        (s0, s1), (r0, r1) = self.options["scale"], self.options["ratio"]
        if not (0 < s0 <= s1 <= 1) or not (0 < r0 <= r1):
            raise KDPipeError(f"bad scale {[s0, s1]} or ratio {[r0, r1]} for resized-crop")

    def check_shape(self, shape):
        if min(shape[1:]) < 2:
            raise KDPipeError(f"resized-crop's boxes (aspect ratio near 1) in {shape[1]}x{shape[2]} images are "
                              "single pixels, so every view would be one pixel's colour: leave resized-crop out")

    def output_shape(self, shape):
        s = self.options["size"] or shape[1]
        return (shape[0], s, s)

    def draw(self, rng, n, shape, tries: int = 10):
        """Boxes drawn like torchvision's RandomResizedCrop, vectorized."""
        _, h, w = shape
        scale, ratio = self.options["scale"], self.options["ratio"]
        target = h * w * rng.uniform(scale[0], scale[1], size=(n, tries))
        ar = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, tries)))
        bw = np.rint(np.sqrt(target * ar)).astype(np.int64)
        bh = np.rint(np.sqrt(target / ar)).astype(np.int64)
        ok = (bw > 0) & (bw <= w) & (bh > 0) & (bh <= h)
        first = np.argmax(ok, axis=1)
        any_ok = ok[np.arange(n), first]
        bw, bh = bw[np.arange(n), first], bh[np.arange(n), first]
        # Fallback: a central crop at the nearest allowed ratio, as torchvision does.
        in_ratio = w / h
        if in_ratio < ratio[0]:
            fw, fh = w, int(round(w / ratio[0]))
        elif in_ratio > ratio[1]:
            fh, fw = h, int(round(h * ratio[1]))
        else:
            fw, fh = w, h
        bw, bh = np.where(any_ok, bw, fw), np.where(any_ok, bh, fh)
        uy, ux = rng.random(n), rng.random(n)
        y0 = np.where(any_ok, np.floor(uy * (h - bh + 1)).astype(np.int64), (h - fh) // 2)
        x0 = np.where(any_ok, np.floor(ux * (w - bw + 1)).astype(np.int64), (w - fw) // 2)
        return [y0, x0, bh, bw]

    def clean(self, shape, n):
        _, h, w = shape
        return [np.zeros(n), np.zeros(n), np.full(n, h), np.full(n, w)]

    def bounds(self, n, shape):
        _, h, w = shape
        return [(0, h - 1), (0, w - 1), (1, h), (1, w)]

    def outside(self, p, n, shape):
        _, h, w = shape  # and the box inside the image
        return super().outside(p, n, shape) | (p[:, 0] + p[:, 2] > h) | (p[:, 1] + p[:, 3] > w)

    def clean_step(self, shape):
        _, h, w = shape
        s = self.output_shape(shape)[1]
        if (h, w) == (s, s):
            return None
        # replay's grid is interpolate's, exactly; PIL's (and torchvision's on PIL images) bilinear antialiases when
        # it shrinks, so a deployment that resized so fed other pixels (logits some percent off)
        return (f"resize the whole {h} x {w} image to {s} x {s} (bilinear, without antialiasing, as "
                f"torch.nn.functional.interpolate(x.float(), size=({s}, {s}), mode='bilinear', align_corners=False) "
                "gives, then rounded to uint8; PIL's bilinear resize antialiases, which gives other pixels)")

    def folds(self, nxt):
        return isinstance(nxt, Flip)

    def replay(self, x, p):
        b, c, h, w = x.shape
        size = self.output_shape(x.shape[1:])[1]
        q = p.to(torch.float32)
        y0, x0, bh, bw = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
        flip = q[:, 4] if q.shape[1] > 4 else torch.zeros_like(y0)  # a folded flip mirrors the grid
        sx = bw / w * (1.0 - 2.0 * flip)
        sy = bh / h
        tx = (2.0 * x0 + bw) / w - 1.0
        ty = (2.0 * y0 + bh) / h - 1.0
        zero = torch.zeros_like(sx)
        theta = torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)
        grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), without int64 overflow."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply), exact on every device."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_normal(seeds: torch.Tensor, m: int) -> torch.Tensor:
    """Standard normal noise (B, m) from int seeds (B,): counter-based (row seed, element index) hashing
    and Box-Muller, so it depends on no RNG state and a row's noise on nothing but its seed."""
    key = _mix32((seeds.to(torch.int64) & _M32) ^ 0x9E3779B9)[:, None]
    j = torch.arange(m, device=seeds.device, dtype=torch.int64)[None, :]
    h1 = _mix32(key ^ _mix32(2 * j))
    h2 = _mix32(_mix32(key ^ _mix32(2 * j + 1)) ^ 0x85EBCA6B)
    u1 = ((h1 >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1): log is finite
    u2 = (h2 >> 8).to(torch.float32) * (1.0 / (1 << 24))
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


@view_op
class Gauss(ViewOp):
    """Add N(0, SIGMA^2) noise to every element (feature vectors or images, in their raw units: pixel levels
    for images, whose views are then clipped to 0..255 as a noisy 8-bit image saturates), replayed exactly
    from a stored per-row seed; seed -1 is the clean view. Version 2: version 1 did not clip images."""
    name = "gauss"
    version = 2
    columns = ("noise_seed",)
    params = (("sigma", float, REQUIRED),)
    exact = False
    kinds = ("features", "image")
    usage = "gauss:SIGMA (noise std in the data's units, e.g. gauss:0.1 on features, gauss:8 on 0..255 pixels)"

    def check(self):
        if not 0 <= self.options["sigma"] <= float(np.finfo(np.float32).max):  # inf noise makes NaN views
            raise KDPipeError(f"gauss sigma must be >= 0 and finite, got {self.options['sigma']}")

    def draw(self, rng, n, shape):
        return [rng.integers(0, 2**31 - 1, size=n)]

    def clean(self, shape, n):
        return [np.full(n, -1)]

    def varies(self):
        return self.options["sigma"] > 0  # gauss:0 adds no noise, whatever the seeds

    def bounds(self, n, shape):
        return [(-1, 2**31 - 2)]

    def replay(self, x, p):
        z = hash_normal(p[:, 0], math.prod(x.shape[1:])).view(x.shape)
        on = (p[:, 0] >= 0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        x = x + (self.options["sigma"] * on) * z
        return x.clamp(0.0, 255.0) if x.dim() == 4 else x  # images stay pixel values


# ---------------------------------------------------------------------- mixing ops

MIX_SCALE = 1 << 16  # a mixup weight is stored as round(lambda * MIX_SCALE): exact in float32


def _beta_shape(v) -> float:
    v = float(v)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(v)
    return v


class MixOp(ViewOp):
    """An op that mixes each sample's view with a partner sample's view of the same view index: the
    function-matching inputs of Beyer et al. 2022. Its first column is the partner's sample index, drawn
    per (view, sample) like every other column; the partner's own view (the geometric ops before this
    one, replayed from the partner's row of the same view) is what is mixed in. A mixing op comes last
    in a composition and there is at most one. ``ViewPolicy.replay_rows`` fetches the partners.

    ``mix(x, xp, p)`` combines the views (B, ...) with the partner views; ``weight(p, shape)`` is the
    share (B,) float32 of each sample's own view in the mix, which the loss gives its label (the
    partner's label gets 1 - weight). The clean view has partner -1 and mixes nothing in.
    """
    def draw_partners(self, rng, n):
        return rng.permutation(n)  # every sample is some sample's partner exactly once per view

    def outside(self, p, n, shape):
        # partner -1 is the clean view's alone, with the clean view's other columns: replay_rows would mix
        # sample 0 in by a weight or box that a damaged row holds beside it
        clean = self.clean(shape, 1)
        unclean = np.zeros(len(p), dtype=bool)
        for j, c in enumerate(clean[1:], 1):
            unclean |= p[:, j] != c[0]
        return super().outside(p, n, shape) | ((p[:, 0] == -1) & unclean)

    def weight(self, p: torch.Tensor, shape) -> torch.Tensor:
        raise NotImplementedError

    def mix(self, x: torch.Tensor, xp: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@view_op
class Mixup(MixOp):
    """Mixup (Zhang et al. 2018): lambda * view + (1 - lambda) * partner's view, lambda ~ Beta(A, A),
    stored as round(lambda * 65536)."""
    name = "mixup"
    columns = ("partner", "mix_weight")
    params = (("alpha", _beta_shape, REQUIRED),)
    exact = False
    kinds = ("image", "features")
    usage = "mixup:A (mix with a partner sample, weight ~ Beta(A, A), e.g. mixup:0.2; must come last)"

    def draw(self, rng, n, shape):
        partner = self.draw_partners(rng, n)
        lam = rng.beta(self.options["alpha"], self.options["alpha"], size=n)
        return [partner, np.rint(lam * MIX_SCALE).astype(np.int64)]

    def clean(self, shape, n):
        return [np.full(n, -1), np.full(n, MIX_SCALE)]

    def bounds(self, n, shape):
        return [(-1, n - 1), (0, MIX_SCALE)]

    def weight(self, p, shape):
        return p[:, 1].to(torch.float32) * (1.0 / MIX_SCALE)

    def mix(self, x, xp, p):
        w = self.weight(p, x.shape[1:]).view(-1, *([1] * (x.dim() - 1)))
        return w * x + (1.0 - w) * xp


@view_op
class CutMix(MixOp):
    """CutMix (Yun et al. 2019): a box of the partner's view pasted into the view. The box's area is
    1 - lambda of the image, lambda ~ Beta(A, A), centred uniformly and clipped at the borders; the stored
    box [y0, y1) x [x0, x1) decides the weight, 1 - box area / image area. Integer-exact (uint8 stays)."""
    name = "cutmix"
    columns = ("partner", "cut_y0", "cut_x0", "cut_y1", "cut_x1")
    params = (("alpha", _beta_shape, REQUIRED),)
    usage = "cutmix:A (paste a box of a partner sample, area ~ 1 - Beta(A, A), e.g. cutmix:1; must come last)"

    def draw(self, rng, n, shape):
        _, h, w = shape
        partner = self.draw_partners(rng, n)
        lam = rng.beta(self.options["alpha"], self.options["alpha"], size=n)
        r = np.sqrt(1.0 - lam)
        ch, cw = np.floor(h * r).astype(np.int64), np.floor(w * r).astype(np.int64)
        cy, cx = rng.integers(0, h, size=n), rng.integers(0, w, size=n)
        y0, y1 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch - ch // 2, 0, h)
        x0, x1 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw - cw // 2, 0, w)
        return [partner, y0, x0, y1, x1]

    def clean(self, shape, n):
        return [np.full(n, -1), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)]

    def bounds(self, n, shape):
        _, h, w = shape
        return [(-1, n - 1), (0, h), (0, w), (0, h), (0, w)]

    def outside(self, p, n, shape):
        return super().outside(p, n, shape) | (p[:, 1] > p[:, 3]) | (p[:, 2] > p[:, 4])  # y0 <= y1, x0 <= x1

    def weight(self, p, shape):
        area = (p[:, 3] - p[:, 1]) * (p[:, 4] - p[:, 2])
        return 1.0 - area.to(torch.float32) / float(shape[-2] * shape[-1])

    def mix(self, x, xp, p):
        h, w = x.shape[-2:]
        ys = torch.arange(h, device=x.device)
        xs = torch.arange(w, device=x.device)
        in_y = (ys >= p[:, 1:2]) & (ys < p[:, 3:4])  # (B, H)
        in_x = (xs >= p[:, 2:3]) & (xs < p[:, 4:5])  # (B, W)
        box = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (B, 1, H, W)
        return torch.where(box, xp, x)


# ---------------------------------------------------------------------- the composition

class ViewPolicy:
    """A composition of view ops: what stage one draws and replays, and stage two replays again."""

    def __init__(self, ops: list[ViewOp]):
        self.ops = [op for op in ops if not isinstance(op, NoneOp)] or [NoneOp()]  # none+flip is flip
        self.spec = "+".join(op.spec() for op in self.ops)
        mixing = [op for op in self.ops if isinstance(op, MixOp)]
        if len(mixing) > 1:
            raise KDPipeError(f"view {self.spec!r} has {len(mixing)} mixing ops ({', '.join(op.name for op in mixing)})"
                              f": a view mixes once; keep one, last")
        if mixing and self.ops[-1] is not mixing[0]:
            rest = "+".join(op.spec() for op in self.ops if op is not mixing[0])
            raise KDPipeError(f"view op {mixing[0].name} mixes views, so it comes last (after the geometric ops):"
                              f" write {rest}+{mixing[0].spec()}")
        self.mixer: MixOp | None = mixing[0] if mixing else None
        for op in self.ops:
            times = sum(type(o) is type(op) for o in self.ops)
            if times > 1 and not op.repeatable:
                raise KDPipeError(f"view op {op.name} is given {times} times in {self.spec!r}: give it once")
        cols, seen = [], set()
        for i, op in enumerate(self.ops):
            for c in op.columns:
                name = c if c not in seen else f"{c}@{i}"  # the i-th op's column, when an earlier op has c
                seen.add(name)
                cols.append(name)
        self.columns = tuple(cols)
        self.is_random = any(op.random and op.varies() for op in self.ops)
        self.derived = np.concatenate([np.full(len(op.columns), op.derived, bool) for op in self.ops])
        # Replay plan: (op, first column, last column); an op that folds its successor replays both.
        # The mixing op is not in it: replay_rows applies it to the view and its partner's view.
        self._plan, i, at = [], 0, 0
        geometric = len(self.ops) - (self.mixer is not None)
        while i < geometric:
            op, width, step = self.ops[i], len(self.ops[i].columns), 1
            if i + 1 < len(self.ops) and op.folds(self.ops[i + 1]):
                width, step = width + len(self.ops[i + 1].columns), 2
            self._plan.append((op, at, at + width))
            at, i = at + width, i + step
        self._mix_cols = (at, len(self.columns))  # the mixing op's columns (partner first); empty without one

    def __eq__(self, other):
        return isinstance(other, ViewPolicy) and self.identity() == other.identity()

    def __repr__(self):
        return f"ViewPolicy({self.spec!r})"

    def identity(self) -> dict:
        return {"spec": self.spec, IDENTITY_LAYOUT: [op.identity() for op in self.ops],
                "columns": list(self.columns)}

    def _shapes(self, sample_shape) -> list[tuple[int, ...]]:
        """The per-sample input shape of every op, then the output shape."""
        shapes = [tuple(int(s) for s in sample_shape)]
        for op in self.ops:
            kind = "image" if len(shapes[-1]) == 3 else "features" if len(shapes[-1]) == 1 else None
            if kind not in op.kinds:
                fits = [n for n in known_ops() if kind in _OPS[n].kinds]
                raise KDPipeError(f"view op {op.name} does not apply to samples of shape {shapes[-1]} "
                                  f"(it takes {' or '.join(_KIND_NAMES[k] for k in op.kinds)})"
                                  + (f": for {_KIND_NAMES[kind]} give --policy with {', '.join(fits)} (e.g. "
                                     f"--policy none, their default)" if kind == "features" else ""))
            op.check_shape(shapes[-1])
            shapes.append(tuple(op.output_shape(shapes[-1])))
        return shapes

    def output_shape(self, sample_shape) -> tuple[int, ...]:
        return self._shapes(sample_shape)[-1]

    def _columns(self, per_op: list[list[np.ndarray]], n: int) -> np.ndarray:
        cols = [np.asarray(c).reshape(n) for cs in per_op for c in cs]
        return np.stack(cols, axis=1).astype(np.int32) if cols else np.zeros((n, 0), dtype=np.int32)

    def sample_view(self, seed: int, view: int, data_shape) -> np.ndarray:
        """Replay parameters (N, P) int32 of one view for N samples; data_shape = (N, *sample_shape)."""
        n = int(data_shape[0])
        shapes = self._shapes(data_shape[1:])
        if int(seed) < 0:
            raise KDPipeError(f"the view seed must be >= 0, got {seed}")
        rng = np.random.default_rng([int(seed), int(view)])
        return self._columns([op.draw(rng, n, s) for op, s in zip(self.ops, shapes)], n)

    def sample(self, seed: int, views, data_shape) -> np.ndarray:
        """Parameters (len(views), N, P) for the given view indices."""
        return np.stack([self.sample_view(seed, k, data_shape) for k in views])

    def outside(self, params: np.ndarray, data_shape) -> np.ndarray:
        """(B,) True for the rows of ``params`` (B, P) that no view of data of ``data_shape`` = (N,
        *sample_shape) has (ViewOp.outside): a damaged cache's, found without drawing the views again."""
        n, bad, at = int(data_shape[0]), np.zeros(len(params), dtype=bool), 0
        for op, shape in zip(self.ops, self._shapes(data_shape[1:])):
            if op.columns:
                bad |= op.outside(params[:, at:at + len(op.columns)], n, shape)
            at += len(op.columns)
        return bad

    def clean_steps(self, sample_shape) -> list[str]:
        """What the clean view does to a sample, step by step in words (empty: nothing)."""
        shapes = self._shapes(sample_shape)
        return [step for op, s in zip(self.ops, shapes) if (step := op.clean_step(s)) is not None]

    def eval_params(self, sample_shape, n: int) -> np.ndarray:
        """Replay parameters (n, P) of the clean view: no jitter, no flip, centred, at the output size."""
        shapes = self._shapes(sample_shape)
        return self._columns([op.clean(s, n) for op, s in zip(self.ops, shapes)], n)

    def replay(self, batch: torch.Tensor, params: torch.Tensor, mean, std) -> torch.Tensor:
        """Views of a batch: uint8 (B, C, H, W) images or float (B, D) features with int (B, P) parameters
        on one device -> normalized float32. Integer-exact ops keep uint8; the first float op converts.
        A mixing policy's views need their partners' images (replay_rows); here only its clean view."""
        if self.mixer is not None and bool((params[:, self._mix_cols[0]] >= 0).any()):
            raise ValueError(f"{self.spec}: mixed views need their partners' images: use replay_rows")
        return normalize(self._geometric(batch, params.long()).float(), mean, std)

    def _geometric(self, batch: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The ops before the mixing op (all of them without one), unnormalized."""
        if batch.dim() == 4 and batch.dtype != torch.uint8:
            raise TypeError("replay expects uint8 images")
        if batch.dim() == 2 and not batch.dtype.is_floating_point:
            raise TypeError("replay expects float feature vectors")
        self._shapes(batch.shape[1:])
        x = batch
        for op, a, b in self._plan:
            if not op.exact and x.dtype == torch.uint8:
                x = x.float()
            x = op.replay(x, p[:, a:b])
        return x

    def replay_rows(self, images, samples, params: torch.Tensor, mean, std,
                    partner_params: torch.Tensor | None = None) -> torch.Tensor:
        """The views of cache rows, the one replay that stage one, stage two, verify-cache and every rank
        run: ``images`` the image store (N, ...) (a tensor, or a numpy array indexed on the host),
        ``samples`` (B,) the rows' sample indices, ``params`` (B, P) their parameters, on the device
        the views go to. A mixing policy also needs ``partner_params`` (B, P): the parameters of each
        row's partner sample in the same view (see ``partner_params``); the partner's image is
        fetched from ``images`` and its view replayed with the geometric ops, then mixed in."""
        p = params.long()
        x = self._geometric(_take(images, samples, p.device), p)
        if self.mixer is None:
            return normalize(x.float(), mean, std)
        if partner_params is None:
            raise ValueError(f"{self.spec}: replay_rows needs the partners' parameters")
        a, b = self._mix_cols
        partner = p[:, a].clamp(min=0)  # -1 (the clean view) mixes nothing in: any image will do
        xp = self._geometric(_take(images, partner, p.device), partner_params.to(p.device).long())
        if not self.mixer.exact:
            x, xp = x.float(), xp.float()
        return normalize(self.mixer.mix(x, xp, p[:, a:b]).float(), mean, std)

    def partners(self, params):
        """Each row's partner sample index (B,) (-1: none), or None for a policy that does not mix."""
        return None if self.mixer is None else params[:, self._mix_cols[0]]

    def partner_params(self, view_params, params):
        """The partner rows' parameters for rows ``params`` (B, P) of one view whose parameters of every
        sample are ``view_params`` (N, P), numpy or torch; None for a policy that does not mix."""
        j = self.partners(params)
        if j is None:
            return None
        return view_params[j.clip(0, None) if isinstance(j, np.ndarray) else j.clamp(min=0)]

    def mixing(self, params: torch.Tensor, sample_shape):
        """(partner indices (B,), share (B,) float32 of each row's own view in the mix), or None for a
        policy that does not mix: what the loss needs to weigh the two labels."""
        j = self.partners(params)
        if j is None:
            return None
        a, b = self._mix_cols
        return j.long().clamp(min=0), self.mixer.weight(params[:, a:b].long(), self.output_shape(sample_shape))


def _take(images, idx, device) -> torch.Tensor:
    """images[idx] on `device`: from a tensor on any device, or from a numpy array on the host."""
    if isinstance(images, np.ndarray):
        idx = idx.cpu().numpy() if torch.is_tensor(idx) else np.asarray(idx)
        return torch.from_numpy(np.ascontiguousarray(images[idx])).to(device)
    return images[torch.as_tensor(idx, device=images.device)].to(device)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Images (B, C, H, W) in 0..255: (x / 255 - mean) / std per channel; features (B, D):
    (x - mean) / std per feature. In float32."""
    shape = (1, -1, 1, 1) if x.dim() == 4 else (1, -1)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(shape)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(shape)
    return (x / 255.0 - m) / s if x.dim() == 4 else (x - m) / s


# ---------------------------------------------------------------------- specs, aliases, identities

def known_ops() -> list[str]:
    return sorted(_OPS)


def spec_help() -> str:
    """One line: the spec syntax, the ops and the aliases."""
    return ("ops joined by '+', options after ':'; ops: " + "; ".join(_OPS[n].usage for n in known_ops())
            + "; aliases: crop-flip (= crop:PADDING+flip), resized-crop-flip (= resized-crop:SIZE+flip)")


def parse_spec(spec: str) -> list[ViewOp]:
    ops = []
    for part in spec.strip().split("+"):
        name, *args = part.strip().split(":")
        if name not in _OPS:
            raise KDPipeError(f"unknown view op {name!r} in --policy {spec!r}: write {spec_help()}")
        ops.append(_OPS[name].from_args(args))
    return ops


def create_policy(spec: str, padding: int = 4, size: int | None = None,
                  scale: tuple[float, float] = ResizedCrop.SCALE,
                  ratio: tuple[float, float] = ResizedCrop.RATIO) -> ViewPolicy:
    """The composition a spec names. The aliases take their options from ``padding`` and ``size``
    (and, for resized-crop-flip, ``scale`` and ``ratio``), which other specs ignore."""
    if spec == "crop-flip":
        if padding < 0:
            raise KDPipeError(f"padding must be >= 0, got {padding}")
        return ViewPolicy([Crop(padding=int(padding)), Flip()])
    if spec == "resized-crop-flip":
        return ViewPolicy([ResizedCrop(size=size, scale=scale, ratio=ratio), Flip()])
    return ViewPolicy(parse_spec(spec))


V1_POLICIES = ("none", "crop-flip", "resized-crop-flip")
def policy_from_identity(ident: dict) -> ViewPolicy:
    """The composition a cache manifest records; refuses an op, or op version, this kdpipe does not know.
    Reads the named policies of version 1 caches too (their replay and parameters are unchanged)."""
    if IDENTITY_LAYOUT not in ident:
        return _from_v1_identity(ident)
    ops = []
    for rec in ident[IDENTITY_LAYOUT]:
        cls = _OPS.get(rec.get("name"))
        if cls is None:
            raise KDPipeError(f"the cache's views use unknown view op {rec.get('name')!r} (this kdpipe knows "
                              f"{', '.join(known_ops())}): upgrade kdpipe")
        if rec.get("version") != cls.version:
            older = isinstance(rec.get("version"), int) and rec["version"] < cls.version
            raise KDPipeError(f"the cache's view op {cls.name} is version {rec.get('version')}, this kdpipe "
                              f"replays version {cls.version}: "
                              + ("dump the cache again with this kdpipe, or read it with the kdpipe that wrote it"
                                 if older else "upgrade kdpipe"))
        op = cls(**rec.get("options", {}))
        if list(op.columns) != list(rec.get("columns", op.columns)):
            raise KDPipeError(f"the cache's view op {cls.name} has columns {rec.get('columns')}, this kdpipe "
                              f"replays {list(op.columns)}")
        ops.append(op)
    pol = ViewPolicy(ops)
    if list(ident.get("columns", pol.columns)) != list(pol.columns):
        raise KDPipeError(f"the cache's view columns {ident.get('columns')} are not those of {pol.spec} "
                          f"({list(pol.columns)})")
    return pol


def _from_v1_identity(ident: dict) -> ViewPolicy:
    name, opts = ident.get("policy"), ident.get("options", {})
    if name not in V1_POLICIES:
        raise KDPipeError(f"unknown view policy {name!r}: this kdpipe knows {', '.join(V1_POLICIES)}")
    if ident.get("policy_version") != 1:
        raise KDPipeError(f"the cache's view policy {name} is version {ident.get('policy_version')}, "
                          "this kdpipe replays version 1")
    pol = create_policy(name, padding=opts.get("padding", 4), size=opts.get("size"),
                        scale=tuple(opts.get("scale", ResizedCrop.SCALE)),
                        ratio=tuple(opts.get("ratio", ResizedCrop.RATIO)))
    if list(ident.get("columns", pol.columns)) != list(pol.columns):
        raise KDPipeError(f"the cache's view policy {name} has columns {ident.get('columns')}, "
                          f"this kdpipe replays {list(pol.columns)}")
    return pol
