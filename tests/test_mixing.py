"""Mixed views (mixup, cutmix): partners and weights drawn from (seed, view), replayed bit for bit in
stage one and stage two, checked by verify-cache; the mixed cross-entropy against a float64 reference;
and a student trained from cached mixed views equal, weight for weight, to one trained online on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdpipe import KDPipeError
from kdpipe.cache.reader import Cache
from kdpipe.checkpoint import load_teacher
from kdpipe.cli import main
from kdpipe.data import load_dataset
from kdpipe.losses import KDLoss, MixedLabels, create_loss, cross_entropy, main_labels
from kdpipe.student import train_students
from kdpipe.teacher import dump_logits
from kdpipe.verify import verify_cache
from kdpipe.views import MIX_SCALE, create_policy, normalize, policy_from_identity

from conftest import quiet, spy_stage_two

GEO = "crop:2+flip"
PAD = 2


def crop_flip_np(img: np.ndarray, dy: int, dx: int, flip: int) -> np.ndarray:
    """The crop:2+flip view of one (C, H, W) image, in numpy: zero pad, crop back, mirror."""
    _, h, w = img.shape
    out = np.pad(img, ((0, 0), (PAD, PAD), (PAD, PAD)))[:, dy:dy + h, dx:dx + w]
    return out[:, :, ::-1] if flip else out


def mixed_reference(spec: str, images: np.ndarray, params: np.ndarray, mean, std) -> torch.Tensor:
    """The mixed views of every sample of one view, from numpy crops: mixup w * own + (1 - w) * partner's
    in float32, cutmix the partner's box pasted; then normalized."""
    out = []
    for i, p in enumerate(params):
        own = crop_flip_np(images[i], *p[:3]).astype(np.float32)
        partner = crop_flip_np(images[p[3]], *params[p[3], :3]).astype(np.float32)
        if spec.startswith("mixup"):
            w = np.float32(p[4] / MIX_SCALE)
            x = w * own + (np.float32(1) - w) * partner
        else:
            x = own.copy()
            x[:, p[4]:p[6], p[5]:p[7]] = partner[:, p[4]:p[6], p[5]:p[7]]
        out.append(x)
    return normalize(torch.from_numpy(np.stack(out)), mean, std)


# ---------------------------------------------------------------- drawing

@pytest.mark.parametrize("mix", ["mixup:0.4", "cutmix:1"])
def test_seed_and_view_decide_partners_and_weights(mix):
    pol, geo = create_policy(f"{GEO}+{mix}"), create_policy(GEO)
    shape = (2000, 1, 28, 28)
    p = pol.sample_view(3, 1, shape)
    assert np.array_equal(p, pol.sample_view(3, 1, shape))  # drawn again anywhere: the same
    assert not np.array_equal(p[:, 3:], pol.sample_view(4, 1, shape)[:, 3:])  # another seed
    assert not np.array_equal(p[:, 3:], pol.sample_view(3, 2, shape)[:, 3:])  # another view
    assert np.array_equal(p[:, :3], geo.sample_view(3, 1, shape))  # mixing draws after the geometric ops
    assert np.array_equal(np.sort(p[:, 3]), np.arange(2000))  # partners: a permutation of the samples
    partner, w = pol.mixing(torch.from_numpy(p), shape[1:])
    assert torch.equal(partner, torch.from_numpy(p[:, 3]).long())
    assert w.min() >= 0 and w.max() <= 1 and 0.3 < float(w.mean()) < 0.7 and float(w.std()) > 0.1
    if mix.startswith("mixup"):
        assert torch.equal(w, torch.from_numpy(p[:, 4] / MIX_SCALE).float())
    else:
        y0, x0, y1, x1 = p[:, 4:].T
        assert (0 <= y0).all() and (y0 <= y1).all() and (y1 <= 28).all() and (0 <= x0).all() and (x1 <= 28).all()
        assert torch.allclose(w, torch.from_numpy(1 - (y1 - y0) * (x1 - x0) / 784).float())


def test_mixing_ops_come_last_and_alone_and_never_replay_unmixed():
    for spec, fragment in (("mixup:0.2+flip", "comes last"), ("crop:2+cutmix:1+flip", "comes last"),
                           ("mixup:0.2+cutmix:1", "mixes once"), ("mixup:-1", "bad alpha"), ("mixup", "needs alpha")):
        with pytest.raises(KDPipeError, match=fragment) as e:
            create_policy(spec)
        assert "\n" not in str(e.value)
    pol = create_policy(f"{GEO}+mixup:0.2")
    x = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    p = torch.from_numpy(pol.sample_view(0, 0, (8, 1, 28, 28)))
    with pytest.raises(ValueError, match="partners"):
        pol.replay(x, p, [0.5], [0.25])  # a mixed view without its partner would be a silent wrong input
    with pytest.raises(ValueError, match="partners"):
        pol.replay_rows(x, torch.arange(8), p, [0.5], [0.25])
    clean = torch.from_numpy(pol.eval_params((1, 28, 28), 8))  # the clean view mixes nothing in
    assert torch.equal(pol.replay(x, clean, [0.5], [0.25]), normalize(x.float(), [0.5], [0.25]))
    assert torch.equal(pol.replay_rows(x, torch.arange(8), clean, [0.5], [0.25], pol.partner_params(clean, clean)),
                       normalize(x.float(), [0.5], [0.25]))


@pytest.mark.parametrize("spec, shape", [("crop:2+flip+mixup:0.4", (1, 12, 10)), ("rotate:15+cutmix:1", (3, 9, 13)),
                                         ("gauss:0.5+mixup:0.4", (7,)), ("resized-crop:8+flip+cutmix:1", (3, 5, 3))])
def test_mixed_views_are_bit_identical_between_batch_splits(spec, shape):
    """test_views' batch-split test for the mixing ops, whose rows fetch their partners (replay_rows), on images
    and feature vectors: a row's view is the same in any batch, alone, or among other neighbours."""
    pol, n = create_policy(spec), 23
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=gen) if len(shape) == 3 else \
        torch.randn((n, *shape), generator=gen)
    vp = torch.from_numpy(pol.sample_view(2, 1, x.shape))
    mean, std = [0.3] * shape[0], [0.2] * shape[0]

    def rows(idx):
        idx = torch.as_tensor(idx)
        return pol.replay_rows(x, idx, vp[idx], mean, std, pol.partner_params(vp, vp[idx]))
    full = rows(torch.arange(n))
    assert full.isfinite().all()
    assert torch.equal(torch.cat([rows(torch.arange(i, min(i + 4, n))) for i in range(0, n, 4)]), full)
    perm = torch.randperm(n, generator=gen)
    assert torch.equal(rows(perm), full[perm]) and torch.equal(rows([5]), full[5:6])


# ---------------------------------------------------------------- replay: stage one = stage two

class SpyLoss:
    """A loss that records the labels it is given."""

    def __init__(self, loss, into: list):
        self.loss, self.into = loss, into

    def __getattr__(self, name):
        return getattr(self.loss, name)

    def __call__(self, out, teacher, labels, epoch):
        self.into.append(labels)
        return self.loss(out, teacher, labels, epoch)


@pytest.mark.parametrize("mix", ["mixup:0.4", "cutmix:1"])
def test_stage_two_replays_the_teachers_mixed_views_bit_for_bit(mix, fmnist, teacher_ckpt, capture_dump, tmp_path,
                                                                monkeypatch):
    policy = create_policy(f"{GEO}+{mix}")
    train, test = load_dataset(fmnist.spec, "train"), load_dataset(fmnist.spec, "test")
    n, k = len(train), 2
    cap = capture_dump(teacher_ckpt, train, test, tmp_path / "cache", policy=policy, views=k, seed=5,
                       shard_rows=n // 2 + 7, batch_size=50, logits_dtype="float32")
    cache = Cache(tmp_path / "cache")
    m = cache.manifest
    mean, std = m["input"]["mean"], m["input"]["std"]
    replay_policy = policy_from_identity(m["views"])
    assert replay_policy == policy
    images = torch.from_numpy(np.array(train.images))
    for v in range(k):
        params = cache.read_view(v, "view_params")
        # The teacher saw the mixed images (a reference from numpy crops), and its logits are theirs.
        ref = mixed_reference(mix, np.array(train.images), params, mean, std)
        assert torch.allclose(cap.inputs[v * n:(v + 1) * n], ref, atol=1e-5)
        assert np.array_equal(cache.read_view(v, "logits"), cap.outputs[v * n:(v + 1) * n].numpy())
        # Stage two's replay of the stored rows, in shuffled batches, gives the teacher's inputs bit for bit.
        pt = torch.from_numpy(params)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(v))
        for idx in perm.split(37):
            x = replay_policy.replay_rows(images, idx, pt[idx], mean, std, replay_policy.partner_params(pt, pt[idx]))
            assert torch.equal(x, cap.inputs[v * n + idx]), f"view {v} differs from the teacher's"
    assert not torch.equal(cap.inputs[:n], cap.inputs[n:])

    # What the students receive in train_students (epoch e uses view e mod K), and the labels their CE gets.
    labels_seen = []
    spy = spy_stage_two(monkeypatch, lambda loss: SpyLoss(loss, labels_seen))
    orders, seen = spy.orders, spy.inputs
    train_students(tmp_path / "cache", ["mlp_100"], 3, tmp_path / "runs", alphas=(0.5,), batch_size=64, log=quiet)
    steps = [(e, idx) for e, order in enumerate(orders) for idx in order]
    assert len(seen) == len(steps) == len(labels_seen) > 0
    for (e, idx), x, y in zip(steps, seen, labels_seen):
        assert torch.equal(x, cap.inputs[(e % k) * n + idx]), f"epoch {e}: not the teacher's mixed view {e % k}"
        params = torch.from_numpy(cache.read_view(e % k, "view_params"))[idx]
        partner, w = policy.mixing(params, (1, 28, 28))
        assert isinstance(y, MixedLabels) and torch.equal(y.labels, torch.from_numpy(train.labels)[idx])
        assert torch.equal(y.partner_labels, torch.from_numpy(train.labels)[partner]) and torch.equal(y.weight, w)


# ---------------------------------------------------------------- verify-cache

def _mixup_cache(fmnist, teacher_ckpt, tmp_path):
    """A cache of 2 crop-flip+mixup views of 96 Fashion-MNIST images (64-row shards)."""
    p = tmp_path / "d.npz"
    np.savez(p, x_train=fmnist.x_train[:96], y_train=fmnist.y_train[:96], x_test=fmnist.x_test[:32],
             y_test=fmnist.y_test[:32])
    out = tmp_path / "cache"
    dump_logits(load_teacher(teacher_ckpt), load_dataset(f"npz:{p}", "train"), None, out,
                policy=create_policy(f"{GEO}+mixup:0.4"), views=2, seed=3, shard_rows=64, batch_size=40, log=quiet)
    return out


def test_verify_cache_recomputes_partners_and_weights(fmnist, teacher_ckpt, tmp_path):
    out = _mixup_cache(fmnist, teacher_ckpt, tmp_path)
    # Sound: the derived columns match, and the teacher re-run on the mixed views (partners from the
    # manifest) agrees with every stored row.
    assert verify_cache(out, teacher_file=teacher_ckpt, sample=192, data_root=None, log=quiet) == []
    cache = Cache(out)
    shard = cache.manifest["shards"][1]
    off, _ = shard["layout"]["view_params"]
    cols = list(cache.columns)
    for col, delta in (("mix_weight", 1), ("partner", 1)):
        r = 5  # row 5 of shard 1
        at = off + (r * len(cols) + cols.index(col)) * 4
        f = out / shard["file"]
        original = f.read_bytes()
        damaged = bytearray(original)
        value = int(np.frombuffer(original[at:at + 4], "<i4")[0])
        damaged[at:at + 4] = np.array([value + delta if col == "mix_weight" else (value + delta) % 96],
                                      "<i4").tobytes()
        f.write_bytes(bytes(damaged))
        faults = verify_cache(out, log=quiet)
        row = shard["row_start"] + r
        assert any(f"dataset view_params is wrong in 1 row(s): {row}" in x for x in faults), (col, faults)
        f.write_bytes(original)
    assert verify_cache(out, log=quiet) == []


def test_a_partner_or_a_partners_view_out_of_range_stops_stage_two_in_one_line(fmnist, teacher_ckpt, tmp_path):
    """A damaged partner index (beyond the 96 samples) crashed the replay in an IndexError; a damaged partner's
    own parameters, read for a rank only as some row's partner, too. Both are refused, naming the row."""
    from kdpipe.student import CachedViews
    out = _mixup_cache(fmnist, teacher_ckpt, tmp_path)
    cache = Cache(out)
    shard, cols = cache.manifest["shards"][0], list(cache.columns)
    params = cache.read_view(0, "view_params")
    partner = params[:, cols.index("partner")]
    q = int(np.flatnonzero((partner < shard["row_stop"]) & (partner != np.arange(96)))[0])
    r = int(partner[q])  # row q's partner in view 0, another row of shard 0
    f = out / shard["file"]
    original = f.read_bytes()
    for row, col, value in ((q, "partner", 96 + 5), (r, "dy", 1000)):
        at = shard["layout"]["view_params"][0] + (row * len(cols) + cols.index(col)) * 4
        f.write_bytes(original[:at] + np.array([value], "<i4").tobytes() + original[at + 4:])
        views = CachedViews(Cache(out), torch.device("cpu"), policy=create_policy(f"{GEO}+mixup:0.4"))
        with pytest.raises(KDPipeError, match=rf"never draw in 1 row\(s\) of view 0 \(rows {row} in shard-00000"):
            views(0, torch.tensor([q]))  # a rank's row, whose partner's parameters are read too
        r2 = CliRunner().invoke(main, ["train-student", "--cache", str(out), "--student", "mlp_100", "--epochs", "1",
                                       "--batch-size", "16", "--out", str(tmp_path / "runs" / col)])
        assert r2.exit_code == 2 and "Traceback" not in r2.output and f"run kdpipe verify-cache {out}" in r2.output
    f.write_bytes(original)


@pytest.mark.parametrize("mix", ["mixup:0.4", "cutmix:1"])
def test_partner_minus_one_is_refused_beside_anything_but_the_clean_views_columns(mix):
    """Partner -1 is the clean view's (replay_rows then mixes sample 0 in by the row's weight or box): a row
    with -1 beside another weight or box is none that draw or clean gives, so ViewPolicy.outside flags it."""
    pol, shape = create_policy(f"{GEO}+{mix}"), (40, 1, 8, 8)
    p = pol.sample_view(0, 0, shape)
    clean = pol.eval_params(shape[1:], 40)
    assert not pol.outside(p, shape).any() and not pol.outside(clean, shape).any()
    damaged = p.copy()
    damaged[5, 3] = -1  # the partner, beside the drawn weight or box
    damaged[9, 3:] = clean[9, 3:]  # the clean view's own columns: fine
    damaged[11, 3:] = clean[11, 3:]
    damaged[11, 4] += 1 if mix.startswith("cutmix") else -1
    assert pol.outside(damaged, shape).nonzero()[0].tolist() == [5, 11]


def test_held_out_rows_of_a_mixed_cache_are_said_to_reach_training(fmnist, teacher_ckpt, tmp_path):
    """The dump drew each view's partner from every sample, so the rows --val-fraction (or --train-samples)
    keeps out of training come back in as partners: said, since validation then scores images trained on."""
    out = _mixup_cache(fmnist, teacher_ckpt, tmp_path)
    for extra, says in ((["--val-fraction", "0.25"], "validation top-1 reads high"),
                        (["--train-samples", "40"], "the student sees more than the subset's images")):
        r = CliRunner().invoke(main, ["train-student", "--cache", str(out), "--student", "mlp_100", "--epochs", "1",
                                      "--batch-size", "16", *extra, "--out", str(tmp_path / "runs" / extra[0])])
        assert r.exit_code == 0, r.output
        assert "warning: the cache's views mix each sample with a partner drawn from all 96 samples" in r.output
        assert says in r.output


@pytest.mark.parametrize("mix", ["mixup:0.4", "cutmix:1"])
def test_teacher_top1_on_mixed_views_is_scored_against_the_larger_share(fmnist, teacher_ckpt, tmp_path, mix):
    """The dump's "teacher top-1 on its views" scores a mixed view against the class it shows most: its
    sample's label, or its partner's where the partner's share is larger (it was scored against the
    sample's label alone, which a teacher that sees the partner's class is marked wrong for). Shards kept
    by a resumed dump are scored alike."""
    import h5py

    from kdpipe.cache import format as fmt
    n = 192
    p = tmp_path / "d.npz"
    np.savez(p, x_train=fmnist.x_train[:n], y_train=fmnist.y_train[:n], x_test=fmnist.x_test[:32],
             y_test=fmnist.y_test[:32])
    out = tmp_path / "cache"
    data = load_dataset(f"npz:{p}", "train")
    policy = create_policy(f"{GEO}+{mix}")

    def dump():
        return dump_logits(load_teacher(teacher_ckpt), data, None, out, policy=policy, views=2, seed=3,
                           shard_rows=128, batch_size=64, log=quiet)

    res = dump()
    cache = Cache(out)
    cols = list(cache.columns)
    top, own, larger = [], [], []
    for shard in cache.manifest["shards"]:
        with h5py.File(out / shard["file"]) as f:
            logits = f[fmt.SHARD_COLUMNS["logits"].path][()].astype(np.float32)
            sidx = f[fmt.SHARD_COLUMNS["sample_index"].path][()]
            vp = f[fmt.SHARD_COLUMNS["view_params"].path][()].astype(np.int64)
        partner = vp[:, cols.index("partner")]
        if mix.startswith("mixup"):
            share = vp[:, cols.index("mix_weight")] / MIX_SCALE
        else:  # the pasted box is the partner's share of the 28 x 28 image
            box = ((vp[:, cols.index("cut_y1")] - vp[:, cols.index("cut_y0")])
                   * (vp[:, cols.index("cut_x1")] - vp[:, cols.index("cut_x0")]))
            share = 1.0 - box / (28 * 28)
        top.append(logits.argmax(1))
        own.append(data.labels[sidx])
        larger.append(np.where(share >= 0.5, data.labels[sidx], data.labels[partner]))
    top, own, larger = (np.concatenate(a) for a in (top, own, larger))
    assert (partner >= 0).all() and (own != larger).mean() > 0.1  # many views show their partner's class most
    assert res["views_top1"] == pytest.approx((top == larger).mean(), abs=1e-12)
    # the teacher sees the larger share's class (measured: 0.54 against 0.31 for mixup, 0.47 against 0.41 for
    # cutmix, whose boxes clipped at the borders leave fewer views to their partner)
    assert (top == larger).mean() > (top == own).mean() + 0.02
    # a resumed dump keeps the complete shards and scores them the same way
    (out / "manifest.json").unlink()
    (out / cache.manifest["shards"][1]["file"]).unlink()
    again = dump()
    assert again["resumed_shards"] == 2 and again["views_top1"] == pytest.approx(res["views_top1"], abs=1e-12)

# ---------------------------------------------------------------- the loss

def test_mixed_cross_entropy_matches_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 7, generator=g) * 3, torch.randn(16, 7, generator=g) * 3
    a, b = torch.randint(0, 7, (16,), generator=g), torch.randint(0, 7, (16,), generator=g)
    w = torch.rand(16, generator=g)
    y = MixedLabels(a, b, w)
    s64 = s.double().numpy()
    logp = s64 - np.log(np.exp(s64 - s64.max(1, keepdims=True)).sum(1, keepdims=True)) - s64.max(1, keepdims=True)
    ref = -(w.double().numpy() * logp[np.arange(16), a.numpy()]
            + (1 - w.double().numpy()) * logp[np.arange(16), b.numpy()]).mean()
    assert abs(float(cross_entropy(s, y)) - ref) < 1e-5
    # w = 1 is the plain CE of the own label
    assert torch.allclose(cross_entropy(s, MixedLabels(a, b, torch.ones(16))), cross_entropy(s, a))
    # kd: the CE term is (1 - alpha) times it; the KD term does not use labels; alpha = 1 uses no labels
    kd = create_loss("kd", temperature=4.0, alpha=0.3)(s, t, y, 0)
    assert abs(float(kd["ce"]) - 0.7 * ref) < 1e-5
    assert torch.equal(kd["kd"], create_loss("kd", temperature=4.0, alpha=0.3)(s, t, a, 0)["kd"])
    pure = create_loss("kd", temperature=4.0, alpha=1.0)
    assert torch.equal(pure(s, t, y, 0)["kd"], pure(s, t, MixedLabels(b, a, 1 - w), 0)["kd"])
    assert float(pure(s, t, y, 0)["ce"]) == 0.0
    # dkd: the same mixed CE; its target split takes the label of the larger share
    dkd = create_loss("dkd", temperature=4.0, warmup=0)
    got = dkd(s, t, y, 3)
    assert abs(float(got["ce"]) - ref) < 1e-5
    plain = dkd(s, t, main_labels(y), 3)
    assert torch.equal(got["tckd"], plain["tckd"]) and torch.equal(got["nckd"], plain["nckd"])
    assert torch.equal(main_labels(y), torch.where(w >= 0.5, a, b))
    # stacked runs (S, B, C): each run's CE term is (1 - alpha_s) times its own mixed CE
    stacked = KDLoss.stack([create_loss("kd", alpha=0.3), create_loss("kd", alpha=0.8)])
    out = torch.stack([s, t])
    ce = stacked(out, t, y, 0)["ce"]
    assert torch.allclose(ce, torch.stack([0.7 * cross_entropy(s, y), 0.2 * cross_entropy(t, y)]), atol=1e-6)


# ---------------------------------------------------------------- cached = online, weight for weight

def test_cached_mixed_views_student_equals_online_weight_for_weight(fmnist, teacher_ckpt, tmp_path):
    train, test = load_dataset(fmnist.spec, "train"), load_dataset(fmnist.spec, "test")
    cache = tmp_path / "cache"
    dump_logits(load_teacher(teacher_ckpt), train, test, cache, policy=create_policy(f"{GEO}+mixup:0.4"), views=2,
                seed=1, logits_dtype="float32", shard_rows=300, batch_size=100, log=quiet)
    sweep = dict(temperatures=(4.0,), alphas=(0.0, 0.5, 1.0), seeds=(0,), batch_size=64, log=quiet)
    cached = train_students(cache, ["mlp_100"], 2, tmp_path / "cached", **sweep)
    teacher = load_teacher(teacher_ckpt).module
    train_students(cache, ["mlp_100"], 2, tmp_path / "online", online_teacher=teacher, **sweep)
    weights = {}
    for r in cached:
        a = torch.load(tmp_path / "cached" / r["name"] / "student.pt", weights_only=True)["state_dict"]
        b = torch.load(tmp_path / "online" / r["name"] / "student.pt", weights_only=True)["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), r["name"]
        weights[r["alpha"]] = a
    # Not vacuous: the teacher's logits of the mixed views changed the students.
    assert len(weights) == 3
    key = next(iter(weights[0.0]))
    assert not torch.equal(weights[0.0][key], weights[0.5][key])
    assert not torch.equal(weights[0.5][key], weights[1.0][key])
