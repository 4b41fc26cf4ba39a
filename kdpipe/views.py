"""View policies: the augmentation-fixed dataset.

A policy draws explicit integer replay parameters for every (view, sample) from a seed, and
replays them in batches on any device. Stage one and stage two call the same ``replay`` on the
stored parameters, so the student sees bit for bit the input the teacher saw.

The parameters of view k depend only on (seed, k) (``numpy.random.default_rng([seed, k])``), so
any subset of views can be drawn again anywhere: by a resumed dump, by another rank, or by an
online-KD run that wants the very same views as a cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe import KDPipeError


@dataclass(frozen=True)
class ViewPolicy:
    name: str
    version: int
    columns: tuple[str, ...]  # names of the int32 replay parameters of one view of one sample
    options: dict = field(default_factory=dict)

    def identity(self) -> dict:
        return {"policy": self.name, "policy_version": self.version, "columns": list(self.columns),
                "options": dict(self.options)}

    def output_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        c, h, w = image_shape
        if self.name == "resized-crop-flip":
            s = self.options.get("size") or h
            return (c, s, s)
        return (c, h, w)

    # ------------------------------------------------------------------ sampling

    def sample_view(self, seed: int, view: int, image_shape) -> np.ndarray:
        """Replay parameters (N, P) int32 of one view for the N samples; N from image_shape[0]."""
        n, _, h, w = image_shape
        rng = np.random.default_rng([int(seed), int(view)])
        if self.name == "none":
            return np.zeros((n, 0), dtype=np.int32)
        if self.name == "crop-flip":
            p = int(self.options["padding"])
            dy = rng.integers(0, 2 * p + 1, size=n)
            dx = rng.integers(0, 2 * p + 1, size=n)
            flip = rng.integers(0, 2, size=n)
            return np.stack([dy, dx, flip], axis=1).astype(np.int32)
        if self.name == "resized-crop-flip":
            return _sample_resized_crops(rng, n, h, w, self.options["scale"], self.options["ratio"])
        raise AssertionError(self.name)

    def sample(self, seed: int, views, image_shape) -> np.ndarray:
        """Parameters (len(views), N, P) for the given view indices."""
        return np.stack([self.sample_view(seed, k, image_shape) for k in views])

    # ------------------------------------------------------------------ replay

    def replay(self, images: torch.Tensor, params: torch.Tensor, mean, std) -> torch.Tensor:
        """Views of a batch: uint8 (B, C, H, W) and int (B, P) on one device -> normalized float32."""
        if images.dtype != torch.uint8:
            raise TypeError("replay expects uint8 images")
        if self.name == "none":
            x = images.float()
        elif self.name == "crop-flip":
            x = _replay_crop_flip(images, params.long(), int(self.options["padding"])).float()
        elif self.name == "resized-crop-flip":
            x = _replay_resized_crop(images.float(), params, self.output_shape(images.shape[1:])[1])
        else:
            raise AssertionError(self.name)
        return normalize(x, mean, std)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x / 255 - mean) / std per channel, in float32."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x / 255.0 - m) / s


def _replay_crop_flip(images: torch.Tensor, params: torch.Tensor, padding: int) -> torch.Tensor:
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    dy, dx, flip = params[:, 0], params[:, 1], params[:, 2]
    ar_h = torch.arange(h, device=images.device)
    ar_w = torch.arange(w, device=images.device)
    rows = dy[:, None] + ar_h[None, :]  # (B, H)
    cols_fwd = dx[:, None] + ar_w[None, :]
    cols_rev = dx[:, None] + (w - 1 - ar_w)[None, :]
    cols = torch.where(flip[:, None].bool(), cols_rev, cols_fwd)  # (B, W)
    bi = torch.arange(b, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _sample_resized_crops(rng, n, h, w, scale, ratio, tries: int = 10) -> np.ndarray:
    """Boxes (y0, x0, bh, bw, flip) drawn like torchvision's RandomResizedCrop, vectorized."""
    area = h * w
    target = area * rng.uniform(scale[0], scale[1], size=(n, tries))
    logr = rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, tries))
    ar = np.exp(logr)
    bw = np.rint(np.sqrt(target * ar)).astype(np.int64)
    bh = np.rint(np.sqrt(target / ar)).astype(np.int64)
    ok = (bw > 0) & (bw <= w) & (bh > 0) & (bh <= h)
    first = np.argmax(ok, axis=1)
    any_ok = ok[np.arange(n), first]
    bw = bw[np.arange(n), first]
    bh = bh[np.arange(n), first]
    # Fallback: a central crop at the nearest allowed ratio, as torchvision does.
    in_ratio = w / h
    if in_ratio < ratio[0]:
        fw, fh = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        fh, fw = h, int(round(h * ratio[1]))
    else:
        fw, fh = w, h
    bw = np.where(any_ok, bw, fw)
    bh = np.where(any_ok, bh, fh)
    uy = rng.random(n)
    ux = rng.random(n)
    y0 = np.where(any_ok, np.floor(uy * (h - bh + 1)).astype(np.int64), (h - fh) // 2)
    x0 = np.where(any_ok, np.floor(ux * (w - bw + 1)).astype(np.int64), (w - fw) // 2)
    flip = rng.integers(0, 2, size=n)
    return np.stack([y0, x0, bh, bw, flip], axis=1).astype(np.int32)


def _replay_resized_crop(x: torch.Tensor, params: torch.Tensor, size: int) -> torch.Tensor:
    b, c, h, w = x.shape
    p = params.to(torch.float32)
    y0, x0, bh, bw, flip = p[:, 0], p[:, 1], p[:, 2], p[:, 3], p[:, 4]
    sx = bw / w * (1.0 - 2.0 * flip)
    sy = bh / h
    tx = (2.0 * x0 + bw) / w - 1.0
    ty = (2.0 * y0 + bh) / h - 1.0
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


POLICIES = ("none", "crop-flip", "resized-crop-flip")


def create_policy(name: str, padding: int = 4, size: int | None = None,
                  scale: tuple[float, float] = (0.08, 1.0),
                  ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> ViewPolicy:
    """A view policy by name, with its options (those that do not apply are left out)."""
    if name == "none":
        return ViewPolicy("none", 1, ())
    if name == "crop-flip":
        if padding < 0:
            raise KDPipeError(f"padding must be >= 0, got {padding}")
        return ViewPolicy("crop-flip", 1, ("dy", "dx", "flip"), {"padding": int(padding)})
    if name == "resized-crop-flip":
        if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
            raise KDPipeError(f"bad scale {scale} or ratio {ratio} for resized-crop-flip")
        return ViewPolicy("resized-crop-flip", 1, ("y0", "x0", "h", "w", "flip"),
                          {"size": int(size) if size else None, "scale": [float(s) for s in scale],
                           "ratio": [float(r) for r in ratio]})
    raise KDPipeError(f"unknown view policy {name!r}: use one of {', '.join(POLICIES)}")


def policy_from_identity(ident: dict) -> ViewPolicy:
    """The policy recorded in a cache manifest; refuses a policy version this kdpipe does not know."""
    name, opts = ident["policy"], ident.get("options", {})
    pol = create_policy(name, padding=opts.get("padding", 4), size=opts.get("size"),
                        scale=tuple(opts.get("scale", (0.08, 1.0))), ratio=tuple(opts.get("ratio", (3 / 4, 4 / 3))))
    if ident.get("policy_version") != pol.version:
        raise KDPipeError(f"the cache's view policy {name} is version {ident.get('policy_version')}, "
                          f"this kdpipe replays version {pol.version}")
    return pol
