"""View policies: parameter sampling, replay against naive references, and replay exactness:
stage two replays from the cache, bit for bit, the inputs the teacher saw in stage one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kdpipe.engine as engine
import kdpipe.student as student_mod
from kdpipe import KDPipeError
from kdpipe.cache.reader import Cache
from kdpipe.checkpoint import save_checkpoint
from kdpipe.data import load_dataset
from kdpipe.evaluate import eval_params
from kdpipe.models import create_model
from kdpipe.student import train_students
from kdpipe.views import POLICIES, create_policy, normalize, policy_from_identity

from conftest import quiet

ZERO, ONE = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]


def ref_crop_flip(img: np.ndarray, dy: int, dx: int, flip: int, padding: int) -> np.ndarray:
    """Pad with zeros, crop back to the original size at (dy, dx), mirror left-right if flip."""
    c, h, w = img.shape
    padded = np.pad(img, ((0, 0), (padding, padding), (padding, padding)))
    out = padded[:, dy:dy + h, dx:dx + w]
    return out[:, :, ::-1] if flip else out


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


@pytest.fixture(scope="module")
def fm_images(fmnist):
    return load_dataset(fmnist.spec, "train").images[:200]


@pytest.fixture(scope="module")
def cifar_images(cifar_folder):
    return np.array(load_dataset(f"imagefolder:{cifar_folder}", "train").images)


# ---------------------------------------------------------------- policies and sampling

def test_create_policy_and_identity_round_trip():
    for name in POLICIES:
        pol = create_policy(name, padding=3, size=24)
        back = policy_from_identity({**pol.identity(), "seed": 0, "K": 1})
        assert back == pol
    assert create_policy("crop-flip").options == {"padding": 4}
    assert create_policy("crop-flip").columns == ("dy", "dx", "flip")
    assert create_policy("resized-crop-flip").columns == ("y0", "x0", "h", "w", "flip")
    assert create_policy("none").columns == ()
    with pytest.raises(KDPipeError, match="unknown view policy"):
        create_policy("mixup")
    with pytest.raises(KDPipeError, match="padding"):
        create_policy("crop-flip", padding=-1)
    with pytest.raises(KDPipeError, match="version"):
        policy_from_identity({**create_policy("crop-flip").identity(), "policy_version": 99})


def test_output_shape():
    assert create_policy("crop-flip").output_shape((1, 28, 28)) == (1, 28, 28)
    assert create_policy("resized-crop-flip").output_shape((3, 32, 32)) == (3, 32, 32)
    assert create_policy("resized-crop-flip", size=24).output_shape((3, 32, 32)) == (3, 24, 24)


@pytest.mark.parametrize("name", POLICIES)
def test_view_parameters_depend_only_on_seed_and_view(name):
    pol = create_policy(name, padding=2)
    shape = (300, 3, 32, 32)
    a = pol.sample_view(5, 1, shape)
    assert a.dtype == np.int32 and a.shape == (300, len(pol.columns))
    np.testing.assert_array_equal(a, pol.sample_view(5, 1, shape))
    np.testing.assert_array_equal(pol.sample(5, [3, 1], shape)[1], a)  # view 1, whatever else is drawn
    if name != "none":
        assert not np.array_equal(a, pol.sample_view(5, 2, shape))
        assert not np.array_equal(a, pol.sample_view(6, 1, shape))


def test_crop_flip_parameters_cover_their_range():
    p = create_policy("crop-flip", padding=3).sample_view(0, 0, (4000, 1, 28, 28))
    for col in (0, 1):
        assert set(np.unique(p[:, col])) == set(range(7))
    assert set(np.unique(p[:, 2])) == {0, 1}
    assert 0.45 < p[:, 2].mean() < 0.55


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


# ---------------------------------------------------------------- replay against references

@pytest.mark.parametrize("padding", [0, 2, 4])
def test_crop_flip_replay_equals_a_naive_numpy_reference(fm_images, cifar_images, padding):
    pol = create_policy("crop-flip", padding=padding)
    for images in (np.asarray(fm_images), cifar_images[:100]):
        for view in range(3):
            params = pol.sample_view(11, view, images.shape)
            got = pol.replay(torch.from_numpy(images), torch.from_numpy(params), ZERO[:images.shape[1]],
                             ONE[:images.shape[1]])
            ref = np.stack([ref_crop_flip(img, *prm, padding) for img, prm in zip(images, params)])
            ref = torch.from_numpy(ref.astype(np.float32)) / 255.0
            assert got.dtype == torch.float32 and got.shape == ref.shape
            assert torch.equal(got, ref)
    assert padding == 0 or params[:, :2].max() == 2 * padding  # the sample exercised real shifts


def test_resized_crop_replay_equals_a_bilinear_reference(cifar_images):
    images = cifar_images[:60]
    for size in (32, 20, 40):
        pol = create_policy("resized-crop-flip", size=size)
        params = pol.sample_view(3, 0, images.shape)
        got = pol.replay(torch.from_numpy(images), torch.from_numpy(params), ZERO, ONE).numpy() * 255.0
        ref = np.stack([ref_resized_crop(img, *prm, size) for img, prm in zip(images, params)])
        assert got.shape == (len(images), 3, size, size)
        np.testing.assert_allclose(got, ref, atol=2e-3)


def test_resized_crop_of_an_unscaled_box_is_a_plain_crop(cifar_images):
    images = cifar_images[:8]
    pol = create_policy("resized-crop-flip", size=16)
    params = np.array([[3, 5, 16, 16, 0], [0, 0, 16, 16, 1], [16, 16, 16, 16, 0]] * 2 + [[7, 2, 16, 16, 1]] * 2,
                      dtype=np.int32)
    got = pol.replay(torch.from_numpy(images), torch.from_numpy(params), ZERO, ONE).numpy() * 255.0
    for img, (y0, x0, bh, bw, flip), g in zip(images, params, got):
        ref = img[:, y0:y0 + bh, x0:x0 + bw].astype(np.float64)
        np.testing.assert_allclose(g, ref[:, :, ::-1] if flip else ref, atol=1e-3)


def test_none_policy_and_normalization(cifar_images):
    images = cifar_images[:20]
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    pol = create_policy("none")
    got = pol.replay(torch.from_numpy(images), torch.zeros(len(images), 0, dtype=torch.int32), mean, std)
    ref = (images.astype(np.float64) / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, normalize(torch.from_numpy(images).float(), mean, std))
    with pytest.raises(TypeError):
        pol.replay(torch.from_numpy(images).float(), torch.zeros(len(images), 0), mean, std)


@pytest.mark.parametrize("name", POLICIES)
def test_eval_params_give_the_clean_image(cifar_images, name):
    images = cifar_images[:10]
    pol = create_policy(name)
    p = eval_params(pol, images.shape[1:], len(images))
    assert p.shape == (len(images), len(pol.columns))
    got = pol.replay(torch.from_numpy(images), torch.from_numpy(p), ZERO, ONE)
    np.testing.assert_allclose(got.numpy() * 255.0, images.astype(np.float64), atol=1e-3)


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


@pytest.mark.parametrize("name", POLICIES)
def test_stage_two_replays_the_teachers_views_bit_for_bit(name, fmnist, cifar_folder, teacher_ckpt, cifar_teacher,
                                                          capture_dump, tmp_path, monkeypatch):
    if name == "resized-crop-flip":
        spec, teacher, policy = f"imagefolder:{cifar_folder}", cifar_teacher, create_policy(name, size=24)
    else:
        spec, teacher, policy = fmnist.spec, teacher_ckpt, create_policy(name, padding=3)
    train, test = load_dataset(spec, "train"), load_dataset(spec, "test")
    n, k = len(train), 2
    cap = capture_dump(teacher, train, test, tmp_path / "cache", policy=policy, views=k, seed=5,
                       shard_rows=n // 2 + 7, batch_size=50)
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
    orders, seen = [], []
    real_batches, real_build = engine.batches, student_mod.build_run

    def spy_batches(*a, **kw):
        out = real_batches(*a, **kw)
        orders.append(out)
        return out

    def spy_build(*a, **kw):
        run = real_build(*a, **kw)
        run.model.register_forward_pre_hook(
            lambda mod, args: seen.append(args[0].detach().clone()) if mod.training else None)
        return run

    monkeypatch.setattr(engine, "batches", spy_batches)
    monkeypatch.setattr(student_mod, "build_run", spy_build)
    epochs = 3
    train_students(tmp_path / "cache", ["mlp_100"], epochs, tmp_path / "runs", batch_size=32, log=quiet)
    assert len(orders) == epochs
    steps = [(e, idx) for e, order in enumerate(orders) for idx in order]
    assert len(seen) == len(steps) > 0
    for (e, idx), x in zip(steps, seen):
        want = cap.inputs[(e % k) * n + idx]
        assert torch.equal(x, want), f"epoch {e}: the student's input is not the teacher's view {e % k}"
