"""View ops and their compositions: parameters drawn from (seed, view), replay against torchvision and
naive references, the aliases against frozen copies of the version 1 code, and replay exactness:
stage two replays from the cache, bit for bit, the inputs the teacher saw in stage one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from kdpipe import KDPipeError
from kdpipe.cache.reader import Cache
from kdpipe.checkpoint import save_checkpoint
from kdpipe.cli import main as cli_main
from kdpipe.data import load_dataset
from kdpipe.evaluate import eval_params
from kdpipe.models import create_model
from kdpipe.student import train_students
from kdpipe.views import V1_POLICIES, create_policy, hash_normal, known_ops, normalize, policy_from_identity

from conftest import quiet, spy_stage_two

ZERO, ONE = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
BILINEAR = TF.InterpolationMode.BILINEAR
COMPOSITION = "pad-crop:20:reflect+rotate:15+crop:2+flip+resized-crop:16"
IMAGE_SPECS = ["none", "crop:2", "crop:0", "flip", "rotate:15", "pad-crop:20", "pad-crop:12:edge",
               "pad-crop:24:reflect", "pad-crop:8:symmetric", "resized-crop", "resized-crop:12", "resized-crop:16+flip",
               "pad-crop:20:symmetric+flip", "gauss:3", COMPOSITION]


def images(n=24, c=3, h=16, w=18, seed=0) -> torch.Tensor:
    """Random uint8 images, made here (no files)."""
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, size=(n, c, h, w), dtype=np.uint8))


def replay01(pol, x, params) -> torch.Tensor:
    """Replay with mean 0, std 1: the view in 0..1 (x / 255)."""
    c = x.shape[1]
    return pol.replay(x, torch.as_tensor(params), ZERO[:c], ONE[:c])


# ---------------------------------------------------------------- frozen copies of the version 1 code
# Caches written before view ops existed name a policy ("crop-flip", "resized-crop-flip"); these are the
# functions that drew and replayed their parameters, kept here unchanged so the ops are held to them.

def v1_sample_view(name, options, seed, view, image_shape):
    n, _, h, w = image_shape
    rng = np.random.default_rng([int(seed), int(view)])
    if name == "none":
        return np.zeros((n, 0), dtype=np.int32)
    if name == "crop-flip":
        p = int(options["padding"])
        dy = rng.integers(0, 2 * p + 1, size=n)
        dx = rng.integers(0, 2 * p + 1, size=n)
        flip = rng.integers(0, 2, size=n)
        return np.stack([dy, dx, flip], axis=1).astype(np.int32)
    return v1_sample_resized_crops(rng, n, h, w, options["scale"], options["ratio"])


def v1_sample_resized_crops(rng, n, h, w, scale, ratio, tries: int = 10) -> np.ndarray:
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


def v1_replay(name, options, images, params, mean, std):
    if name == "none":
        x = images.float()
    elif name == "crop-flip":
        x = v1_replay_crop_flip(images, params.long(), int(options["padding"])).float()
    else:
        x = v1_replay_resized_crop(images.float(), params, options.get("size") or images.shape[2])
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x / 255.0 - m) / s


def v1_replay_crop_flip(images, params, padding):
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    dy, dx, flip = params[:, 0], params[:, 1], params[:, 2]
    ar_h = torch.arange(h, device=images.device)
    ar_w = torch.arange(w, device=images.device)
    rows = dy[:, None] + ar_h[None, :]
    cols_fwd = dx[:, None] + ar_w[None, :]
    cols_rev = dx[:, None] + (w - 1 - ar_w)[None, :]
    cols = torch.where(flip[:, None].bool(), cols_rev, cols_fwd)
    bi = torch.arange(b, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def v1_replay_resized_crop(x, params, size):
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


V1_IDENTITIES = [  # manifest["views"] as version 1 wrote it (less seed and K)
    {"policy": "none", "policy_version": 1, "columns": [], "options": {}},
    {"policy": "crop-flip", "policy_version": 1, "columns": ["dy", "dx", "flip"], "options": {"padding": 4}},
    {"policy": "crop-flip", "policy_version": 1, "columns": ["dy", "dx", "flip"], "options": {"padding": 2}},
    {"policy": "resized-crop-flip", "policy_version": 1, "columns": ["y0", "x0", "h", "w", "flip"],
     "options": {"size": None, "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3]}},
    {"policy": "resized-crop-flip", "policy_version": 1, "columns": ["y0", "x0", "h", "w", "flip"],
     "options": {"size": 24, "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3]}},
]


@pytest.mark.parametrize("ident", V1_IDENTITIES, ids=lambda i: f"{i['policy']}-{i['options']}")
def test_version_1_caches_load_draw_and_replay_bit_for_bit_as_before(ident):
    name, opts = ident["policy"], ident["options"]
    pol = policy_from_identity({**ident, "seed": 3, "K": 2})
    alias = create_policy(name, padding=opts.get("padding", 4), size=opts.get("size"))
    assert pol == alias and list(pol.columns) == ident["columns"]
    for shape in [(40, 3, 32, 32), (40, 1, 28, 28), (40, 3, 20, 30)]:
        x = images(*shape, seed=shape[2])
        mean, std = [0.3, 0.4, 0.5][:shape[1]], [0.2, 0.25, 0.3][:shape[1]]
        for view in range(3):
            want = v1_sample_view(name, opts, 3, view, shape)
            got = pol.sample_view(3, view, shape)
            assert got.dtype == np.int32 and np.array_equal(got, want)
            ref = v1_replay(name, opts, x, torch.from_numpy(want), mean, std)
            assert torch.equal(pol.replay(x, torch.from_numpy(got), mean, std), ref)
            assert torch.equal(alias.replay(x, torch.from_numpy(got), mean, std), ref)


# ---------------------------------------------------------------- specs and identities

def test_specs_aliases_and_identity_round_trip():
    assert create_policy("crop-flip") == create_policy("crop:4+flip")
    assert create_policy("crop-flip").spec == "crop:4+flip"
    assert create_policy("crop-flip", padding=2).spec == "crop:2+flip"
    assert create_policy("resized-crop-flip").spec == "resized-crop+flip"
    assert create_policy("resized-crop-flip", size=24) == create_policy("resized-crop:24+flip")
    assert create_policy("none+flip").spec == "flip" and create_policy("none").spec == "none"
    assert create_policy("pad-crop:20:constant").spec == "pad-crop:20"
    assert create_policy(" rotate:7.5 + crop:3 ").spec == "rotate:7.5+crop:3"
    assert create_policy("crop-flip").columns == ("dy", "dx", "flip")
    assert create_policy("resized-crop-flip").columns == ("y0", "x0", "h", "w", "flip")
    assert create_policy("none").columns == ()
    assert create_policy(COMPOSITION).columns == ("y0", "x0", "angle_mdeg", "dy", "dx", "flip", "y0@4", "x0@4",
                                                  "h", "w")
    assert not create_policy("none").is_random and create_policy("crop:2").is_random
    assert not create_policy("crop:0").is_random and not create_policy("rotate:0").is_random  # every view alike
    assert not create_policy("gauss:0").is_random and not create_policy("rotate:0.0004").is_random  # nor these
    assert create_policy("gauss:0.1").is_random and create_policy("rotate:0.0006").is_random
    for spec in [*IMAGE_SPECS, *V1_POLICIES, "gauss:0.25"]:
        pol = create_policy(spec, padding=3, size=24)
        ident = pol.identity()
        assert ident["spec"] == pol.spec and ident["columns"] == list(pol.columns)
        assert [op["name"] for op in ident["ops"]] == [op.name for op in pol.ops]
        assert all(op["version"] == (2 if op["name"] == "gauss" else 1) and isinstance(op["options"], dict)
                   for op in ident["ops"])
        back = policy_from_identity({**ident, "seed": 0, "K": 1})
        assert back == pol and back.spec == pol.spec and create_policy(pol.spec) == pol
    ident = create_policy(COMPOSITION).identity()
    assert ident["ops"][0] == {"name": "pad-crop", "options": {"size": 20, "mode": "reflect"}, "version": 1,
                               "columns": ["y0", "x0"]}


@pytest.mark.parametrize("spec, fragment", [
    ("blur:3", "unknown view op 'blur'"), ("crop", "crop needs padding"), ("crop:x", "bad padding 'x'"),
    ("crop:-1", "padding must be >= 0"), ("crop:1:2", "at most 1 option"), ("pad-crop:20:wrap", "not one of"),
    ("pad-crop:0", "bad size"), ("rotate:500", "[0, 180]"), ("resized-crop:16:0.5", "one option"),
    ("gauss:-1", "sigma must be >= 0"), ("gauss:inf", "sigma must be >= 0 and finite"),
    ("gauss:1e39", "finite"), ("gauss:nan", "finite"), ("crop:4+", "unknown view op ''")])
@pytest.mark.filterwarnings("error::RuntimeWarning")  # the line alone: gauss:1e39 gave numpy's overflow warning first
def test_a_bad_spec_is_one_line_naming_the_syntax(spec, fragment):
    with pytest.raises(KDPipeError) as e:
        create_policy(spec)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg
    if "unknown" in fragment:  # lists every op and the syntax
        assert "joined by '+'" in msg and all(name in msg for name in known_ops())


def test_the_cli_help_names_every_op():
    from click.testing import CliRunner
    out = CliRunner().invoke(cli_main, ["dump-logits", "--help"], terminal_width=10_000).output
    for name in known_ops():
        assert f"{name}" in out
    assert "crop-flip" in out and "resized-crop-flip" in out


def test_an_unknown_op_or_version_is_refused_by_name():
    ident = create_policy("crop:2+rotate:5").identity()
    ident["ops"][1]["version"] = 2
    with pytest.raises(KDPipeError, match="view op rotate is version 2, this kdpipe replays version 1"):
        policy_from_identity(ident)
    ident = create_policy("crop:2+rotate:5").identity()
    ident["ops"][0]["name"] = "mosaic"
    with pytest.raises(KDPipeError, match="unknown view op 'mosaic'"):
        policy_from_identity(ident)
    ident = create_policy("crop:2+rotate:5").identity()
    ident["ops"][0]["columns"] = ["dx", "dy"]
    with pytest.raises(KDPipeError, match="columns"):
        policy_from_identity(ident)
    with pytest.raises(KDPipeError, match="version 99"):
        policy_from_identity({**V1_IDENTITIES[1], "policy_version": 99})
    with pytest.raises(KDPipeError, match="unknown view policy 'mixup'"):
        policy_from_identity({**V1_IDENTITIES[1], "policy": "mixup"})


def test_output_shape():
    assert create_policy("crop-flip").output_shape((1, 28, 28)) == (1, 28, 28)
    assert create_policy("resized-crop-flip").output_shape((3, 32, 32)) == (3, 32, 32)
    assert create_policy("resized-crop-flip", size=24).output_shape((3, 32, 32)) == (3, 24, 24)
    assert create_policy("pad-crop:40").output_shape((3, 32, 20)) == (3, 40, 40)
    assert create_policy(COMPOSITION).output_shape((1, 28, 30)) == (1, 16, 16)
    assert create_policy("pad-crop:20+resized-crop").output_shape((3, 32, 32)) == (3, 20, 20)
    assert create_policy("gauss:0.1").output_shape((7,)) == (7,)
    with pytest.raises(KDPipeError, match="flip does not apply to samples of shape \\(7,\\)"):
        create_policy("gauss:1+flip").output_shape((7,))


# ---------------------------------------------------------------- drawing parameters

@pytest.mark.parametrize("spec", IMAGE_SPECS + list(V1_POLICIES))
def test_view_parameters_depend_only_on_seed_and_view(spec):
    pol = create_policy(spec, padding=2)
    shape = (300, 3, 16, 18)
    a = pol.sample_view(5, 1, shape)
    assert a.dtype == np.int32 and a.shape == (300, len(pol.columns))
    np.testing.assert_array_equal(a, pol.sample_view(5, 1, shape))
    np.testing.assert_array_equal(pol.sample(5, [3, 1], shape)[1], a)  # view 1, whatever else is drawn
    if pol.is_random:  # views that can differ (crop:0's cannot: not random)
        assert not np.array_equal(a, pol.sample_view(5, 2, shape))
        assert not np.array_equal(a, pol.sample_view(6, 1, shape))
    # One stream per (seed, view), drawn op by op: a composition's columns are its ops' own draws in turn.
    rng = np.random.default_rng([5, 1])
    shapes, cols = [shape[1:]], []
    for op in pol.ops:
        cols += op.draw(rng, 300, shapes[-1])
        shapes.append(op.output_shape(shapes[-1]))
    if cols:
        np.testing.assert_array_equal(np.stack(cols, 1), a)


def test_crop_flip_parameters_cover_their_range():
    p = create_policy("crop-flip", padding=3).sample_view(0, 0, (4000, 1, 28, 28))
    for col in (0, 1):
        assert set(np.unique(p[:, col])) == set(range(7))
    assert set(np.unique(p[:, 2])) == {0, 1}
    assert 0.45 < p[:, 2].mean() < 0.55


def test_rotate_and_pad_crop_parameters_cover_their_range():
    a = create_policy("rotate:15").sample_view(0, 0, (4000, 1, 28, 28))[:, 0]
    assert a.min() >= -15000 and a.max() <= 15000 and a.min() < -14000 and a.max() > 14000
    assert abs(a.mean()) < 400 and len(np.unique(a)) > 3000  # uniform, at 1/1000 degree
    p = create_policy("pad-crop:20").sample_view(0, 0, (4000, 3, 16, 30))  # pads the height, crops the width
    assert set(np.unique(p[:, 0])) == set(range(5)) and set(np.unique(p[:, 1])) == set(range(11))


def test_resized_crop_boxes_lie_inside_the_image_with_scale_and_ratio():
    h, w = 32, 32
    p = create_policy("resized-crop-flip").sample_view(0, 0, (4000, 3, h, w)).astype(np.int64)
    y0, x0, bh, bw, flip = p.T
    assert (y0 >= 0).all() and (x0 >= 0).all() and (bh >= 1).all() and (bw >= 1).all()
    assert (y0 + bh <= h).all() and (x0 + bw <= w).all()
    frac = bh * bw / (h * w)
    assert frac.min() >= 0.05 and frac.max() <= 1.0  # scale (0.08, 1), up to rounding of the sides
    ratio = bw / bh
    assert ratio.min() >= 0.6 and ratio.max() <= 1.6  # ratio (3/4, 4/3), up to rounding
    assert len(np.unique(bh)) > 10 and len(np.unique(y0)) > 10
    assert 0.45 < flip.mean() < 0.55


# ---------------------------------------------------------------- replay: exact and batch-independent

@pytest.mark.parametrize("spec", IMAGE_SPECS)
def test_replay_is_bit_identical_between_calls_and_batch_splits(spec):
    pol = create_policy(spec)
    x = images(24, 3, 16, 18)
    p = torch.from_numpy(pol.sample_view(9, 0, x.shape))
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]
    full = pol.replay(x, p, mean, std)
    assert full.dtype == torch.float32 and tuple(full.shape[1:]) == pol.output_shape((3, 16, 18))
    assert torch.equal(full, pol.replay(x, p, mean, std))
    parts = torch.cat([pol.replay(x[i:i + 5], p[i:i + 5], mean, std) for i in range(0, 24, 5)])
    assert torch.equal(parts, full)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pol.replay(x[perm], p[perm], mean, std), full[perm])  # other batch neighbours
    assert torch.equal(pol.replay(x[7:8], p[7:8], mean, std), full[7:8])  # batch of one


def clean_reference(spec: str, img: torch.Tensor) -> torch.Tensor:
    """The clean view of an image (float (C, H, W)) op by op, with torchvision: pad-crop takes the centred
    crop, resized-crop resizes the whole image (antialias off), every other op is the identity."""
    for part in spec.split("+"):
        name, *args = part.split(":")
        if name == "pad-crop":
            s, mode = int(args[0]), (args[1] if len(args) > 1 else "constant")
            h, w = img.shape[1:]
            ph, pw = max(s - h, 0), max(s - w, 0)
            img = TF.crop(TF.pad(img, [pw, ph], padding_mode=mode), (h + 2 * ph - s) // 2, (w + 2 * pw - s) // 2, s, s)
        elif name in ("resized-crop", "resized-crop-flip"):
            s = int(args[0]) if args else img.shape[1]
            img = TF.resize(img, [s, s], interpolation=BILINEAR, antialias=False)
    return img


@pytest.mark.parametrize("spec", IMAGE_SPECS + list(V1_POLICIES))
def test_eval_params_give_the_clean_view(spec):
    """The clean view of every op: no shift, flip, rotation or noise; the centred crop; the whole box."""
    x = images(10, 3, 16, 16)
    pol = create_policy(spec)
    p = eval_params(pol, (3, 16, 16), 10)
    assert p.dtype == np.int32 and p.shape == (10, len(pol.columns))
    got = replay01(pol, x, p) * 255.0
    want = torch.stack([clean_reference(spec, img.float()) for img in x])
    assert got.shape == want.shape
    if all(op.exact for op in pol.ops):
        assert torch.equal(got, want / 255.0 * 255.0)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)


@pytest.mark.parametrize("spec", ["crop:2+flip", "pad-crop:20:symmetric+flip", "resized-crop:12+flip"])
def test_a_folded_flip_equals_the_flip_op_after_the_crop(spec):
    """crop, pad-crop and resized-crop replay a following flip in their own gather or grid (one pass, and the
    version 1 grid of resized-crop-flip); the result is that of the two ops one after the other."""
    pol = create_policy(spec)
    x = images(30, 3, 16, 18)
    p = torch.from_numpy(pol.sample_view(0, 0, x.shape)).long()
    crop, flip = pol.ops
    assert crop.folds(flip) and len(pol._plan) == 1
    two_steps = flip.replay(crop.replay(x if crop.exact else x.float(), p[:, :-1]), p[:, -1:])
    got = crop.replay(x if crop.exact else x.float(), p)
    if crop.exact:
        assert got.dtype == torch.uint8 and torch.equal(got, two_steps)
    else:
        torch.testing.assert_close(got, two_steps, atol=2e-3, rtol=0)


def test_columns_verify_cache_recomputes():
    """Every op of this version draws its columns from (seed, view) alone, so verify-cache recomputes all of
    them; an op whose column it cannot recompute (derived = False) is left out of that comparison."""
    from kdpipe.views import Crop, Flip, ViewOp, ViewPolicy

    class Partner(ViewOp):  # e.g. a mixing op's partner, chosen from data verify-cache does not see
        name, columns, derived = "partner", ("partner",), False

    assert create_policy(COMPOSITION).derived.all() and create_policy("gauss:1").derived.tolist() == [True]
    pol = ViewPolicy([Crop(padding=2), Partner(), Flip()])
    assert pol.columns == ("dy", "dx", "partner", "flip") and pol.derived.tolist() == [True, True, False, True]


BOUNDED = {"crop": "crop:3", "flip": "flip", "pad-crop": "pad-crop:20", "rotate": "rotate:15",
           "resized-crop": "resized-crop:12", "gauss": "gauss:4", "mixup": "mixup:0.4", "cutmix": "cutmix:1"}


def test_every_op_with_columns_declares_its_bounds():
    """Stage two checks each epoch's parameters against the ops' bounds: a new op names an example here."""
    from kdpipe.views import _OPS
    assert sorted(BOUNDED) == [n for n in known_ops() if _OPS[n].columns]


@pytest.mark.parametrize("name", sorted(BOUNDED))
def test_drawn_and_clean_parameters_lie_in_the_bounds_and_one_step_beyond_does_not(name):
    """ViewPolicy.outside finds the rows that no draw or clean view gives (a damaged cache's), per column, on
    square, non-square and tiny images and on feature vectors; nothing a dump writes is flagged."""
    pol = create_policy(BOUNDED[name])
    op = pol.ops[0]
    for sample in ((3, 16, 18), (1, 5, 3), (1, 2, 2), (40,)):
        try:
            pol.output_shape(sample)
        except KDPipeError:
            continue
        shape = (60, *sample)
        drawn = [pol.sample_view(1, k, shape) for k in range(3)] + [pol.eval_params(sample, 60)]
        for p in drawn:
            assert not pol.outside(p, shape).any(), (sample, p[pol.outside(p, shape)])
        for j, (lo, hi) in enumerate(op.bounds(60, sample)):
            for value in (lo - 1, hi + 1):
                p = drawn[0].copy()
                p[7, j] = value
                assert pol.outside(p, shape).tolist() == [i == 7 for i in range(60)], (sample, j, value)
    if name in ("resized-crop", "cutmix"):  # and what ties the columns together: the box in the image, y0 <= y1
        p = pol.sample_view(1, 0, (60, 3, 16, 18))
        if name == "resized-crop":
            p[3, 0] = 16 - p[3, 2] + 1  # y0 + h > H
        else:
            p[3, 1] = p[3, 3] + 1  # cut_y0 > cut_y1
        assert pol.outside(p, (60, 3, 16, 18)).nonzero()[0].tolist() == [3]


# ---------------------------------------------------------------- semantics against torchvision

def test_crop_and_flip_equal_torchvision_exactly():
    x = images(30, 3, 16, 18)
    pol = create_policy("crop:3+flip")
    p = pol.sample_view(1, 0, x.shape)
    got = replay01(pol, x, p)
    assert p[:, :2].max() == 6 and p[:, 2].min() == 0 and p[:, 2].max() == 1  # real shifts and both flips
    for img, (dy, dx, flip), g in zip(x, p, got):
        ref = TF.crop(TF.pad(img, [3]), int(dy), int(dx), 16, 18)
        ref = TF.horizontal_flip(ref) if flip else ref
        assert torch.equal(g, ref.float() / 255.0)


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect", "symmetric"])
@pytest.mark.parametrize("hw, size", [((12, 10), 16), ((20, 24), 16), ((12, 20), 16), ((16, 16), 16)])
def test_pad_crop_equals_torchvision_random_crop_exactly(mode, hw, size):
    h, w = hw
    x = images(40, 3, h, w, seed=h * w)
    pol = create_policy(f"pad-crop:{size}:{mode}")
    p = pol.sample_view(2, 0, x.shape)
    got = replay01(pol, x, p)
    assert got.shape == (40, 3, size, size)
    ph, pw = max(size - h, 0), max(size - w, 0)  # what RandomCrop(pad_if_needed=True) pads each side by
    assert p[:, 0].max() == 2 * ph + h - size and p[:, 1].max() == 2 * pw + w - size
    for img, (y0, x0), g in zip(x, p, got):
        ref = TF.pad(img.float(), [pw, ph], padding_mode=mode)
        ref = TF.crop(ref, int(y0), int(x0), size, size)
        assert torch.equal(g, ref / 255.0)


def test_pad_crop_twice_is_two_random_crops_as_the_readme_says():
    """pad-crop:40:reflect+pad-crop:32 on 32 x 32 images pads each side by 8 (pad_if_needed's 40 - 32) and crops
    twice at random: shifts of up to 8 pixels either way, not the 4 of padding to 40 and one random crop."""
    img = np.stack([np.repeat(np.arange(32)[:, None], 32, 1), np.repeat(np.arange(32)[None, :], 32, 0)]) + 100
    x = torch.from_numpy(np.repeat(img[None].astype(np.uint8), 2000, 0))
    pol = create_policy("pad-crop:40:reflect+pad-crop:32")
    v = (replay01(pol, x, pol.sample_view(0, 0, x.shape)) * 255).round().long()
    dy, dx = v[:, 0, 16, 16] - 116, v[:, 1, 16, 16] - 116  # the source row and column shown at the centre
    assert dy.min() == dx.min() == -8 and dy.max() == dx.max() == 8
    assert torch.equal(replay01(pol, x[:1], eval_params(pol, (2, 32, 32), 1)) * 255, x[:1].float())  # clean: as is


def test_pad_crop_keeps_uint8_and_pads_beyond_the_image():
    x = images(6, 1, 5, 4)
    for mode in ("constant", "edge", "reflect", "symmetric"):
        pol = create_policy(f"pad-crop:17:{mode}")
        op = pol.ops[0]
        p = torch.from_numpy(pol.sample_view(0, 0, x.shape)).long()
        out = op.replay(x, p)
        assert out.dtype == torch.uint8 and out.shape == (6, 1, 17, 17)
        npmode = {"constant": "constant", "edge": "edge", "reflect": "reflect", "symmetric": "symmetric"}[mode]
        for img, (y0, x0), o in zip(x.numpy(), p.numpy(), out.numpy()):
            ref = np.pad(img, ((0, 0), (12, 12), (13, 13)), mode=npmode)[:, y0:y0 + 17, x0:x0 + 17]
            np.testing.assert_array_equal(o, ref)


def test_rotate_equals_torchvision_bilinear_rotation():
    x = images(20, 3, 14, 22)
    pol = create_policy("rotate:40")
    p = pol.sample_view(4, 0, x.shape)
    got = replay01(pol, x, p) * 255.0
    assert np.abs(p[:, 0]).max() > 20000  # real angles
    for img, (a,), g in zip(x, p, got):
        ref = TF.rotate(img.float(), a / 1000.0, interpolation=BILINEAR)
        torch.testing.assert_close(g, ref, atol=3e-3, rtol=0)
    assert create_policy("rotate:0").sample_view(0, 0, x.shape).max() == 0


def test_resized_crop_equals_torchvision_when_it_shrinks():
    """grid_sample over the box equals crop-then-resize (antialias off) when the box is at least S x S."""
    x = images(30, 3, 32, 32)
    pol = create_policy("resized-crop:12+flip")
    p = pol.sample_view(0, 0, x.shape)
    big = (p[:, 2] >= 12) & (p[:, 3] >= 12)
    assert big.sum() > 10 and p[big, 4].min() == 0 and p[big, 4].max() == 1
    got = replay01(pol, x, p)[torch.from_numpy(big)] * 255.0
    for img, (y0, x0, bh, bw, flip), g in zip(x[torch.from_numpy(big)], p[big], got):
        ref = TF.resized_crop(img.float(), int(y0), int(x0), int(bh), int(bw), [12, 12], interpolation=BILINEAR,
                              antialias=False)
        ref = TF.horizontal_flip(ref) if flip else ref
        torch.testing.assert_close(g, ref, atol=3e-3, rtol=0)


def ref_resized_crop(img: np.ndarray, y0, x0, bh, bw, flip, size) -> np.ndarray:
    """Bilinear resize of box (y0, x0, bh, bw) to size x size (pixel centres, edge pixels repeated)."""
    c, h, w = img.shape
    i = np.arange(size)
    ys = np.clip(y0 + (i + 0.5) * bh / size - 0.5, 0, h - 1)
    xs = np.clip(x0 + (i + 0.5) * bw / size - 0.5, 0, w - 1)
    y_lo, x_lo = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y_hi, x_hi = np.minimum(y_lo + 1, h - 1), np.minimum(x_lo + 1, w - 1)
    wy, wx = (ys - y_lo)[:, None], (xs - x_lo)[None, :]
    f = img.astype(np.float64)
    out = ((1 - wy) * (1 - wx) * f[:, y_lo][:, :, x_lo] + (1 - wy) * wx * f[:, y_lo][:, :, x_hi]
           + wy * (1 - wx) * f[:, y_hi][:, :, x_lo] + wy * wx * f[:, y_hi][:, :, x_hi])
    return out[:, :, ::-1] if flip else out


def test_resized_crop_replay_equals_a_bilinear_reference():
    x = images(60, 3, 32, 32)
    for size in (32, 20, 40):
        pol = create_policy("resized-crop-flip", size=size)
        params = pol.sample_view(3, 0, x.shape)
        got = replay01(pol, x, params).numpy() * 255.0
        ref = np.stack([ref_resized_crop(img, *prm, size) for img, prm in zip(x.numpy(), params)])
        assert got.shape == (len(x), 3, size, size)
        np.testing.assert_allclose(got, ref, atol=2e-3)
        unflipped = create_policy(f"resized-crop:{size}")  # the same boxes, the flip not folded in
        np.testing.assert_allclose(replay01(unflipped, x, params[:, :4]).numpy() * 255.0,
                                   np.stack([ref_resized_crop(img, *prm[:4], 0, size)
                                             for img, prm in zip(x.numpy(), params)]), atol=2e-3)


def test_the_composition_of_all_image_ops_equals_torchvision_op_by_op():
    x = images(16, 3, 14, 26)
    pol = create_policy(COMPOSITION)
    p = pol.sample_view(8, 2, x.shape)
    got = replay01(pol, x, p).numpy() * 255.0
    assert got.shape == (16, 3, 16, 16)
    for img, (y0, x0, a, dy, dx, flip, ry, rx, rh, rw), g in zip(x, p, got):
        t = TF.crop(TF.pad(img.float(), [0, 6], padding_mode="reflect"), int(y0), int(x0), 20, 20)
        t = TF.rotate(t, a / 1000.0, interpolation=BILINEAR)
        t = TF.crop(TF.pad(t, [2]), int(dy), int(dx), 20, 20)
        t = TF.horizontal_flip(t) if flip else t
        ref = ref_resized_crop(t.numpy(), ry, rx, rh, rw, 0, 16)
        np.testing.assert_allclose(g, ref, atol=5e-3)


def test_none_policy_and_normalization():
    x = images(20, 3, 8, 8)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    pol = create_policy("none")
    got = pol.replay(x, torch.zeros(len(x), 0, dtype=torch.int32), mean, std)
    ref = (x.numpy().astype(np.float64) / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, normalize(x.float(), mean, std))
    with pytest.raises(TypeError):
        pol.replay(x.float(), torch.zeros(len(x), 0), mean, std)


# ---------------------------------------------------------------- gauss, for feature vectors

def features(n=64, d=40, seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(3.0, 2.0, size=(n, d)).astype(np.float32))


def test_gauss_replays_exactly_with_the_requested_std():
    x = features(400, 50)
    mean, std = x.mean(0).tolist(), x.std(0).tolist()
    pol = create_policy("gauss:0.5")
    assert pol.columns == ("noise_seed",) and pol.output_shape((50,)) == (50,)
    p = torch.from_numpy(pol.sample_view(1, 0, x.shape))
    assert (p >= 0).all() and len(torch.unique(p)) == 400
    got = pol.replay(x, p, mean, std)
    assert torch.equal(got, pol.replay(x, p, mean, std))
    assert torch.equal(torch.cat([pol.replay(x[i:i + 7], p[i:i + 7], mean, std) for i in range(0, 400, 7)]), got)
    noise = got * torch.tensor(std) + torch.tensor(mean) - x  # undo the per-feature normalization
    assert abs(float(noise.std()) - 0.5) < 0.01 and abs(float(noise.mean())) < 0.01
    assert abs(float(noise[:, 0].std()) - 0.5) < 0.06 and abs(float(noise[0].std()) - 0.5) < 0.15
    corr = np.corrcoef(noise[:, :10].T.numpy())  # features and rows draw independent noise
    assert np.abs(corr - np.eye(10)).max() < 0.2
    assert not torch.equal(pol.replay(x, p + 1, mean, std), got)
    clean = torch.from_numpy(pol.eval_params((50,), 400))
    assert torch.equal(pol.replay(x, clean, mean, std), normalize(x, mean, std))


def test_gauss_noise_is_counter_based_integer_hashing():
    """The same seed gives the same noise whatever torch's RNG state; the normal is a fair one."""
    seeds = torch.arange(2000, dtype=torch.int32) * 7919
    torch.manual_seed(0)
    a = hash_normal(seeds, 64)
    torch.manual_seed(1)
    torch.rand(100)
    assert torch.equal(hash_normal(seeds, 64), a) and torch.equal(hash_normal(seeds[5:6], 64), a[5:6])
    assert torch.equal(hash_normal(seeds, 80)[:, :64], a)  # element j's noise does not depend on the width
    z = a.flatten().double().numpy()
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
    assert abs(np.mean(z ** 3)) < 0.05 and abs(np.mean(z ** 4) - 3) < 0.1  # symmetric, normal tails
    assert abs((np.abs(z) < 1).mean() - 0.6827) < 0.01


def test_feature_normalization_is_per_feature():
    x = features(10, 4)
    mean, std = [1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 2.0, 4.0]
    got = create_policy("none").replay(x, torch.zeros(10, 0, dtype=torch.int32), mean, std)
    np.testing.assert_allclose(got.numpy(), (x.numpy() - np.array(mean)) / np.array(std), rtol=1e-6)
    with pytest.raises(KDPipeError, match="flip does not apply"):
        create_policy("flip").sample_view(0, 0, x.shape)


# ---------------------------------------------------------------- the too-few-views warning

@pytest.mark.parametrize("spec, warns", [("none", False), ("crop:2", True), ("crop:0", False),
                                         ("rotate:0", False), ("crop:0+rotate:5", True)])
def test_too_few_views_warns_only_for_random_views(spec, warns, fmnist, teacher_ckpt, tmp_path):
    from kdpipe.checkpoint import load_teacher
    from kdpipe.teacher import dump_logits
    p = tmp_path / "d.npz"
    np.savez(p, x_train=fmnist.x_train[:64], y_train=fmnist.y_train[:64], x_test=fmnist.x_test[:32],
             y_test=fmnist.y_test[:32])
    dump_logits(load_teacher(teacher_ckpt), load_dataset(f"npz:{p}", "train"), load_dataset(f"npz:{p}", "test"),
                tmp_path / "c", policy=create_policy(spec), views=1, log=quiet)
    log = []
    train_students(tmp_path / "c", ["mlp_100"], 2, tmp_path / "runs", batch_size=32, log=log.append)
    warned = [line for line in log if "too few views" in line]
    assert bool(warned) == warns, log


# ---------------------------------------------------------------- replay exactness, stage one -> stage two

@pytest.fixture(scope="module")
def cifar_teacher(cifar_folder, tmp_path_factory):
    """An untrained cnn_tiny for 24x24 resized-crop-flip views of the CIFAR ImageFolder (exactness needs no
    accuracy)."""
    train = load_dataset(f"imagefolder:{cifar_folder}", "train")
    torch.manual_seed(0)
    model = create_model("cnn_tiny", 10, (3, 24, 24)).eval()
    path = tmp_path_factory.mktemp("cifar-teacher") / "t.pt"
    mean, std = train.channel_stats()
    save_checkpoint(path, model, arch="cnn_tiny", num_classes=10, image_shape=(3, 24, 24), mean=mean, std=std,
                    class_names=train.class_names, dataset=train.identity(), test_top1=None)
    return path


@pytest.mark.parametrize("name", [*V1_POLICIES, "rotate:10+crop:2"])
def test_stage_two_replays_the_teachers_views_bit_for_bit(name, fmnist, cifar_folder, teacher_ckpt, cifar_teacher,
                                                          capture_dump, tmp_path, monkeypatch):
    if name == "resized-crop-flip":
        spec, teacher, policy = f"imagefolder:{cifar_folder}", cifar_teacher, create_policy(name, size=24)
    else:
        spec, teacher, policy = fmnist.spec, teacher_ckpt, create_policy(name, padding=3)
    train, test = load_dataset(spec, "train"), load_dataset(spec, "test")
    n, k = len(train), 2
    cap = capture_dump(teacher, train, test, tmp_path / "cache", policy=policy, views=k, seed=5,
                       shard_rows=n // 2 + 7, batch_size=50, force=True)  # cifar_teacher is untrained
    if name != "none":  # the views differ, so equality below is not vacuous
        assert not torch.equal(cap.inputs[:n], cap.inputs[n:])

    # What stage two reads from the cache, replayed by the policy the manifest names.
    cache = Cache(tmp_path / "cache")
    m = cache.manifest
    replay_policy = policy_from_identity(m["views"])
    images = torch.from_numpy(np.array(train.images))
    for v in range(k):
        params = torch.from_numpy(cache.read_view(v, "view_params"))
        x = replay_policy.replay(images, params, m["input"]["mean"], m["input"]["std"])
        assert torch.equal(x, cap.inputs[v * n:(v + 1) * n]), f"view {v} differs from the teacher's"

    # What the students actually receive in train_students (epochs > K: epoch e uses view e mod K).
    spy = spy_stage_two(monkeypatch)
    orders, seen = spy.orders, spy.inputs
    epochs = 3
    train_students(tmp_path / "cache", ["mlp_100"], epochs, tmp_path / "runs", batch_size=32, log=quiet)
    assert len(orders) == epochs
    steps = [(e, idx) for e, order in enumerate(orders) for idx in order]
    assert len(seen) == len(steps) > 0
    for (e, idx), x in zip(steps, seen):
        want = cap.inputs[(e % k) * n + idx]
        assert torch.equal(x, want), f"epoch {e}: the student's input is not the teacher's view {e % k}"


def test_a_negative_view_seed_is_one_line_and_claims_nothing(fmnist, tmp_path):
    """numpy's seed sequences take no negative integers: a traceback after dump.json was written, before."""
    with pytest.raises(KDPipeError, match="seed must be >= 0"):
        create_policy("crop:2").sample_view(-1, 0, (4, 1, 28, 28))
    from click.testing import CliRunner
    for cmd in (["dump-logits", "--teacher", str(tmp_path / "t.pt"), "--views", "2"],
                ["train-teacher", "--arch", "mlp_100", "--epochs", "1"]):
        res = CliRunner().invoke(cli_main, [*cmd, "--data", fmnist.spec, "--seed", "-1", "--out", str(tmp_path / "o")])
        assert res.exit_code == 2 and "--seed" in res.output and "Traceback" not in res.output
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("cmd", ["train-teacher", "dump-logits"])
@pytest.mark.parametrize("given, fragment", [
    (["--policy", "crop:2+flip", "--padding", "4"], "--padding 4 sets the padding of the crop-flip alias, and the "
     "policy 'crop:2+flip' is another spec, which would ignore it: write it in the spec (e.g. crop:4+flip)"),
    (["--policy", "resized-crop+flip", "--size", "24"], "(e.g. resized-crop:24+flip) and leave --size out"),
    (["--size", "24"], "--size 24 sets the size of the resized-crop-flip alias, which the default views (crop-flip "
     "for images, none for feature vectors) do not use: give --policy resized-crop-flip, or write it in the spec "
     "(--policy resized-crop:24+flip)"),
    (["--policy", "crop-flip", "--size", "24"], "--size 24 sets the size of the resized-crop-flip alias, and the "
     "policy 'crop-flip'")])
def test_padding_or_size_that_the_policy_ignores_is_refused_in_one_line(cmd, given, fragment, fmnist, tmp_path):
    """--padding and --size set the aliases' options; with another spec they were ignored without a word (a crop
    by 2 where 4 was asked for, views at the input height where 24 was)."""
    from click.testing import CliRunner
    args = ["--arch", "mlp_100", "--epochs", "1"] if cmd == "train-teacher" else ["--teacher", "t.pt", "--views", "2"]
    res = CliRunner().invoke(cli_main, [cmd, *args, "--data", fmnist.spec, *given, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert fragment in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("spec, shape, fragment", [
    ("flip+flip", (3, 16, 16), "view op flip is given 2 times in 'flip+flip': give it once"),
    ("crop:2+flip+crop:2", (3, 16, 16), "view op crop is given 2 times"),
    ("rotate:10+crop:2+rotate:10", (3, 16, 16), "view op rotate is given 2 times"),
    ("gauss:1+gauss:2", (12,), "view op gauss is given 2 times"),
    ("crop:16", (3, 16, 20), "give a padding below 16"),  # a shift of 16 leaves no pixel of a 16-high image
    ("crop:40", (1, 28, 28), "give a padding below 28"),
    ("crop:2", (1, 1, 40), "leave crop out"),  # 1 x N rows: 4 views in 5 would be all zero padding
    ("rotate:15", (1, 1, 40), "leave rotate out"),
    ("rotate:15", (1, 40, 1), "leave rotate out"),
    ("resized-crop", (1, 1, 40), "leave resized-crop out"),  # every box is one pixel
    ("crop-flip", (12,), "for feature vectors give --policy with gauss, mixup, none"),  # the default on a table
    ("flip", (12,), "--policy none")])
def test_policies_that_make_no_sense_for_the_data_are_refused_in_one_line(spec, shape, fragment):
    with pytest.raises(KDPipeError) as e:
        create_policy(spec, padding=4).output_shape(shape)
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("spec, shape", [
    ("pad-crop:40:reflect+pad-crop:32", (3, 32, 32)),  # reflect padding, then a random crop: both kept
    ("resized-crop:24+resized-crop:16", (3, 32, 32)), ("crop:15", (3, 16, 20)), ("crop:0", (1, 1, 40)),
    ("flip", (1, 1, 40)), ("pad-crop:8", (1, 1, 40)), ("rotate:15", (1, 2, 40))])
def test_compositions_that_make_sense_still_pass(spec, shape):
    pol = create_policy(spec)
    x = torch.zeros((3, *shape), dtype=torch.uint8)
    assert pol.replay(x, torch.from_numpy(pol.sample_view(0, 0, x.shape)), [0.0] * shape[0], [1.0] * shape[0]).isfinite().all()


def test_gauss_on_images_stays_in_pixel_range_and_old_unclipped_caches_are_refused():
    """Noise on 0..255 pixels made values no 8-bit image holds (-40, 300): the views are clipped now, and
    version 1 caches, whose views were not, are refused (their stored logits are of unclipped views)."""
    x = torch.cat([torch.zeros((20, 3, 8, 8), dtype=torch.uint8), torch.full((20, 3, 8, 8), 255, dtype=torch.uint8)])
    pol = create_policy("gauss:30")
    p = torch.from_numpy(pol.sample_view(0, 0, x.shape))
    got = replay01(pol, x, p) * 255.0
    assert got.min() >= 0 and got.max() <= 255.0
    assert (got[:20] > 1).float().mean() > 0.4 and (got[20:] < 254).float().mean() > 0.4  # noise is there
    ref = x.float() + 30 * hash_normal(p[:, 0], 3 * 8 * 8).view(x.shape)
    torch.testing.assert_close(got, ref.clamp(0, 255), atol=1e-3, rtol=0)
    f = features(10, 5) * 1000  # feature vectors keep their range
    pf = torch.from_numpy(pol.sample_view(0, 0, f.shape))
    assert (pol.replay(f, pf, [0.0] * 5, [1.0] * 5) - f).abs().max() < 300
    ident = create_policy("crop:2+gauss:3").identity()
    ident["ops"][1]["version"] = 1
    with pytest.raises(KDPipeError, match="view op gauss is version 1, this kdpipe replays version 2: dump the cache "
                                          "again"):
        policy_from_identity(ident)
