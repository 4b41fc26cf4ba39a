"""Losses: the registry, KD checked by hand, DKD against a float64 reference written from the paper's
formulas, stacked runs equal to single runs, the warm-up, and gradients against finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdpipe import KDPipeError
from kdpipe.losses import DKDLoss, KDLoss, Loss, create_loss, register_loss, warmup_weight
from kdpipe.sweep import KD_AXES


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(axis=-1)


def kd_by_hand(s, t, y, temperature, alpha):
    """In float64 with numpy: (ce, kd) as batch means of -log softmax(s)[y] and T^2 * sum p_t log(p_t / p_s)."""
    ce = -np.log(softmax(s)[np.arange(len(y)), y]).mean()
    k = kl(softmax(t / temperature), softmax(s / temperature)).mean() * temperature ** 2
    return (1 - alpha) * ce, alpha * k


def dkd_by_hand(s, t, y, temperature, alpha, beta, weight):
    """Zhao et al. 2022, eqs. (1)-(7), in float64, sample by sample: b = [p_target, 1 - p_target] and
    p̂ = the softmax restricted to the non-target classes; TCKD = KL(b^T || b^S), NCKD = KL(p̂^T || p̂^S)."""
    tckd, nckd, ce = [], [], []
    for si, ti, yi in zip(s, t, y):
        ps, pt = softmax(si / temperature), softmax(ti / temperature)
        bs, bt = np.array([ps[yi], 1 - ps[yi]]), np.array([pt[yi], 1 - pt[yi]])
        rest = np.arange(len(si)) != yi
        hs, ht = ps[rest] / ps[rest].sum(), pt[rest] / pt[rest].sum()
        tckd.append(kl(bt, bs))
        nckd.append(kl(ht, hs))
        ce.append(-np.log(softmax(si)[yi]))
    t2 = temperature ** 2
    return {"ce": np.mean(ce), "tckd": weight * alpha * t2 * np.mean(tckd), "nckd": weight * beta * t2 * np.mean(nckd)}


@pytest.fixture
def batch():
    g = np.random.default_rng(0)
    s = g.normal(size=(16, 10)) * 3
    t = g.normal(size=(16, 10)) * 5
    y = g.integers(0, 10, size=16)
    return s, t, y


def f32(*arrays):
    return [torch.tensor(a, dtype=torch.float32) if a.dtype.kind == "f" else torch.tensor(a) for a in arrays]


# ---------------------------------------------------------------- registry

def test_the_registry_creates_each_loss_and_refuses_unknown_names_and_options():
    assert type(create_loss("kd")) is KDLoss and type(create_loss("dkd")) is DKDLoss
    loss = create_loss("dkd", beta=2, warmup=5)
    assert loss.name == "dkd" and loss.options == {"temperature": 4.0, "alpha": 1.0, "beta": 2.0, "warmup": 5}
    assert create_loss("kd").options == KD_AXES  # sweep.py names kd runs with these defaults
    with pytest.raises(KDPipeError, match=r"unknown loss 'nope'.*kd \(temperature=4, alpha=0.9\).*dkd \("):
        create_loss("nope")
    with pytest.raises(KDPipeError, match="loss dkd has no option gamma.*beta=8"):
        create_loss("dkd", gamma=1.0)
    with pytest.raises(KDPipeError, match="warmup must be a whole number"):
        create_loss("dkd", warmup=2.5)


def test_the_registry_takes_a_spec_as_loss_takes_it():
    """create_loss("dkd:beta=2"), copied from a command line, was 'unknown loss'."""
    assert create_loss("dkd:beta=2").options == create_loss("dkd", beta=2).options
    assert create_loss("kd:temperature=2", alpha=0.5).options == {"temperature": 2.0, "alpha": 0.5}
    assert create_loss("kd:1,hint:50").options == create_loss("kd+hint", **{"hint.weight": 50}).options
    with pytest.raises(KDPipeError, match="loss dkd has no option gamma"):
        create_loss("dkd:gamma=1")


def test_a_new_loss_is_one_registered_class():
    @register_loss("test-l2")
    class L2(Loss):
        defaults = {"weight": 1.0}

        @property
        def needs_teacher(self):
            return True

        def terms(self, out, teacher, labels, epoch):
            return {"l2": self.per_run(self.weight, 1) * ((out - teacher) ** 2).mean((-2, -1))}

    try:
        out, t = torch.randn(3, 4, 5), torch.randn(4, 5)
        single = [create_loss("test-l2", weight=w) for w in (1.0, 2.0, 0.5)]
        got = L2.stack(single)(out, t, torch.zeros(4, dtype=torch.long), 0)["l2"]
        torch.testing.assert_close(got, torch.stack([x(out[i], t, None, 0)["l2"] for i, x in enumerate(single)]))
    finally:
        from kdpipe import losses
        del losses._LOSSES["test-l2"]


def test_a_composition_records_each_members_own_axis_where_their_defaults_differ():
    """kd+dkd recorded alpha 1 (dkd's default, the last member's) in config.json, metrics.json and the report, while
    kd trained at its own 0.9; a new loss with another alpha default composed with kd did the same."""
    @register_loss("test-mse")
    class MSE(Loss):
        defaults = {"alpha": 0.5}

        @property
        def needs_teacher(self):
            return True

        def terms(self, out, teacher, labels, epoch):
            return {"mse": self.per_run(self.alpha, 1) * ((out - teacher) ** 2).mean((-2, -1))}

    try:
        loss = create_loss("kd+test-mse")
        assert [(n, x.options["alpha"]) for n, _, x in loss.parts] == [("kd", 0.9), ("test-mse", 0.5)]
        assert loss.options == {"temperature": 4.0, "kd.alpha": 0.9, "kd.weight": 1.0, "test-mse.alpha": 0.5,
                                "test-mse.weight": 1.0}
        assert create_loss("kd+test-mse", alpha=0.3).options["alpha"] == 0.3  # given: one value, recorded once
        assert "alpha" not in create_loss("kd+dkd").options and create_loss("kd+dkd").options["temperature"] == 4.0
    finally:
        from kdpipe import losses
        del losses._LOSSES["test-mse"]


@pytest.mark.parametrize("name, options, message", [
    ("kd", dict(temperature=0.0), "temperature must be > 0"), ("kd", dict(temperature=-1.0), "temperature must be > 0"),
    ("kd", dict(alpha=-0.1), r"alpha must lie in \[0, 1\]"), ("kd", dict(alpha=1.1), r"alpha must lie in \[0, 1\]"),
    ("dkd", dict(beta=-1.0), "beta must be >= 0"), ("dkd", dict(warmup=-2), "warmup must be >= 0"),
    ("dkd", dict(temperature=float("nan")), "finite number"),
])
def test_bad_settings_are_refused(name, options, message):
    with pytest.raises(KDPipeError, match=message):
        create_loss(name, **options)


def test_numpy_numbers_are_options_like_python_ones():
    """A sweep in the user's own loop over np.arange or np.float32 values: np.int64(4) and np.float32(0.5) were
    refused as "temperature must be a finite number, got np.int64(4)"; numpy's booleans stay refused."""
    import numpy as np
    loss = create_loss("kd", temperature=np.int64(4), alpha=np.float32(0.5))
    assert loss.options == {"temperature": 4.0, "alpha": 0.5} and type(loss.temperature) is float
    assert create_loss("dkd", warmup=np.int32(5)).options["warmup"] == 5
    with pytest.raises(KDPipeError, match="alpha must be a finite number"):
        create_loss("kd", alpha=np.bool_(True))
    with pytest.raises(KDPipeError, match="temperature must be a finite number"):
        create_loss("kd", temperature=np.float32("nan"))


# ---------------------------------------------------------------- KD (Hinton)

@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
def test_kd_loss_equals_the_hand_computation(batch, temperature, alpha):
    s, t, y = batch
    terms = create_loss("kd", temperature=temperature, alpha=alpha)(*f32(s, t, y), epoch=0)
    assert set(terms) == {"ce", "kd"}
    assert all(v.dtype == torch.float32 and v.shape == () for v in terms.values())
    ce, k = kd_by_hand(s, t, y, temperature, alpha)
    assert float(terms["ce"]) == pytest.approx(ce, rel=1e-5, abs=1e-6)
    assert float(terms["kd"]) == pytest.approx(k, rel=1e-5, abs=1e-6)


def test_kd_is_todays_formula_in_float32(batch):
    """The values of the first version's KDLoss: F.kl_div(batchmean) * T^2 and F.cross_entropy, mixed by alpha."""
    s, t, y = f32(*batch)
    terms = create_loss("kd", temperature=4.0, alpha=0.9)(s, t, y, 0)
    old_kd = F.kl_div(F.log_softmax(s / 4, 1), F.log_softmax(t / 4, 1), reduction="batchmean", log_target=True) * 16
    old = 0.1 * F.cross_entropy(s, y) + 0.9 * old_kd
    torch.testing.assert_close(sum(terms.values()), old, rtol=1e-6, atol=1e-6)


def test_the_kl_runs_from_teacher_to_student(batch):
    """KL(p_t || p_s) and KL(p_s || p_t) differ on this batch; the loss is the former."""
    s, t, y = batch
    forward, reverse = kd_by_hand(s, t, y, 4.0, 1.0)[1], kd_by_hand(t, s, y, 4.0, 1.0)[1]
    assert abs(forward - reverse) > 0.1
    assert float(create_loss("kd", alpha=1.0)(*f32(s, t, y), 0)["kd"]) == pytest.approx(forward, rel=1e-5)


def test_alpha_zero_is_cross_entropy_and_ignores_the_teacher(batch):
    s, _, y = f32(*batch)
    loss = create_loss("kd", alpha=0.0)
    assert not loss.needs_teacher and create_loss("kd", alpha=0.1).needs_teacher
    terms = loss(s, None, y, 0)
    assert float(terms["kd"]) == 0.0
    torch.testing.assert_close(terms["ce"], F.cross_entropy(s, y), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="needs teacher logits"):
        create_loss("kd", alpha=0.5)(s, None, y, 0)


def test_identical_logits_give_zero_divergence(batch):
    s, _, y = f32(*batch)
    assert float(create_loss("kd", alpha=1.0)(s, s.clone(), y, 0)["kd"]) == pytest.approx(0.0, abs=1e-6)
    terms = create_loss("dkd", warmup=0)(s, s.clone(), y, 0)
    assert float(terms["tckd"]) == pytest.approx(0.0, abs=1e-5) and float(terms["nckd"]) == pytest.approx(0.0, abs=1e-5)


def test_float16_teacher_logits_are_computed_in_float32(batch):
    s, t, y = batch
    t16 = torch.tensor(t, dtype=torch.float16)
    for name in ("kd", "dkd"):
        terms = create_loss(name)(torch.tensor(s, dtype=torch.float32), t16, torch.tensor(y), 30)
        assert all(v.dtype == torch.float32 for v in terms.values())
    got = create_loss("kd")(torch.tensor(s, dtype=torch.float32), t16, torch.tensor(y), 0)
    ref = sum(kd_by_hand(s, t16.float().numpy().astype(np.float64), y, 4.0, 0.9))
    assert float(sum(got.values())) == pytest.approx(ref, rel=1e-5)


# ---------------------------------------------------------------- DKD

@pytest.mark.parametrize("temperature, alpha, beta",
                         [(4.0, 1.0, 8.0), (1.0, 0.5, 2.0), (2.5, 0.0, 1.0), (8.0, 2.0, 0.0)])
def test_dkd_equals_the_paper_formula_in_float64(batch, temperature, alpha, beta):
    s, t, y = batch
    loss = create_loss("dkd", temperature=temperature, alpha=alpha, beta=beta, warmup=0)
    terms = loss(*f32(s, t, y), 0)
    assert set(terms) == {"ce", "tckd", "nckd"} and all(v.shape == () for v in terms.values())
    want = dkd_by_hand(s, t, y, temperature, alpha, beta, 1.0)
    for k in want:
        assert float(terms[k]) == pytest.approx(want[k], rel=2e-5, abs=1e-6), k
    assert float(terms["nckd"]) > 0 if beta else float(terms["nckd"]) == 0


def test_dkd_decouples_classical_kd():
    """The paper's eq. (7): KD = TCKD + (1 - p_t^T) NCKD per sample; with a batch of one sample the
    weighted sum must equal kd's KL term exactly (a check that does not repeat the reference's algebra)."""
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        s, t = torch.randn(1, 7, generator=g) * 3, torch.randn(1, 7, generator=g) * 3
        y = torch.randint(0, 7, (1,), generator=g)
        p_t = torch.softmax(t / 2, 1)[0, y].item()
        dkd = create_loss("dkd", temperature=2.0, alpha=1.0, beta=1 - p_t, warmup=0)(s, t, y, 0)
        kd = create_loss("kd", temperature=2.0, alpha=1.0)(s, t, y, 0)
        torch.testing.assert_close(dkd["tckd"] + dkd["nckd"], kd["kd"], rtol=1e-5, atol=1e-6)


def test_dkd_stays_finite_when_the_teacher_is_certain():
    s = torch.randn(4, 10)
    t = torch.full((4, 10), -60.0)
    y = torch.tensor([0, 3, 5, 9])
    t[torch.arange(4), y] = 60.0  # p_target = 1 in float32 at T = 1
    s.requires_grad_(True)
    terms = create_loss("dkd", temperature=1.0, warmup=0)(s, t, y, 0)
    sum(terms.values()).backward()
    assert all(torch.isfinite(v) for v in terms.values()) and torch.isfinite(s.grad).all()


def test_the_warmup_ramps_the_kd_terms_from_the_first_epoch(batch):
    """epoch counts from 0; weight min((epoch + 1) / warmup, 1): 1/20 in the first epoch, 1 from epoch 19 on."""
    s, t, y = f32(*batch)
    loss = create_loss("dkd", warmup=20)
    full = create_loss("dkd", warmup=0)(s, t, y, 0)
    for epoch, w in ((0, 1 / 20), (4, 5 / 20), (18, 19 / 20), (19, 1.0), (50, 1.0)):
        assert warmup_weight(epoch, 20) == pytest.approx(w)
        got = loss(s, t, y, epoch)
        torch.testing.assert_close(got["ce"], full["ce"])  # CE is never ramped
        for k in ("tckd", "nckd"):
            torch.testing.assert_close(got[k], w * full[k], rtol=1e-6, atol=1e-7)
    # a 0-dim tensor epoch (what fused runs pass) gives the same
    torch.testing.assert_close(loss(s, t, y, torch.tensor(4.0))["nckd"], loss(s, t, y, 4)["nckd"])


def test_dkd_without_teacher_terms_is_cross_entropy(batch):
    s, _, y = f32(*batch)
    loss = create_loss("dkd", alpha=0.0, beta=0.0)
    assert not loss.needs_teacher and create_loss("dkd", alpha=0.0).needs_teacher
    terms = loss(s, None, y, 3)
    torch.testing.assert_close(terms["ce"], F.cross_entropy(s, y), rtol=0, atol=1e-6)
    assert float(terms["tckd"]) == float(terms["nckd"]) == 0.0


# ---------------------------------------------------------------- stacked runs

STACKS = {"kd": [dict(temperature=4.0, alpha=0.9), dict(temperature=1.0, alpha=0.0), dict(temperature=2.5, alpha=1.0)],
          "dkd": [dict(temperature=4.0, alpha=1.0, beta=8.0, warmup=20), dict(temperature=1.0, alpha=0.0, beta=2.0,
                                                                                warmup=0),
                  dict(temperature=2.0, alpha=0.5, beta=0.0, warmup=3)]}


@pytest.mark.parametrize("name", sorted(STACKS))
@pytest.mark.parametrize("epoch", [0, 2, 30])
def test_stacked_loss_equals_each_run_alone(name, epoch):
    g = torch.Generator().manual_seed(1)
    out = torch.randn(3, 8, 6, generator=g) * 3
    t = torch.randn(8, 6, generator=g) * 3
    y = torch.randint(0, 6, (8,), generator=g)
    single = [create_loss(name, **o) for o in STACKS[name]]
    stacked = type(single[0]).stack(single)
    assert stacked.needs_teacher
    got = stacked(out, t, y, torch.tensor(float(epoch)))
    for k, v in got.items():
        assert v.shape == (3,)
        want = torch.stack([loss(out[i], t, y, epoch)[k] for i, loss in enumerate(single)])
        torch.testing.assert_close(v, want, atol=1e-5, rtol=1e-5, msg=k)
    if name == "dkd":  # and the float64 reference, run by run
        for i, o in enumerate(STACKS[name]):
            ref = dkd_by_hand(out[i].double().numpy(), t.double().numpy(), y.numpy(), o["temperature"], o["alpha"],
                              o["beta"], warmup_weight(epoch, o["warmup"]))
            for k in ref:
                assert float(got[k][i]) == pytest.approx(ref[k], rel=2e-5, abs=1e-6), (i, k)


def test_stack_refuses_mixed_classes():
    with pytest.raises(ValueError):
        KDLoss.stack([create_loss("kd"), create_loss("dkd")])


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("name, options", [("kd", dict(temperature=3.0, alpha=0.7)),
                                           ("dkd", dict(temperature=2.0, alpha=1.5, beta=4.0, warmup=4))])
def test_gradient_matches_finite_differences(name, options):
    """d(loss)/d(student logits) by autograd against central differences, in float64 (the loss computes in
    float32 whatever it is given, so the logits are scaled to keep the differences above float32 noise)."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 5, generator=g, dtype=torch.float64)
    t = torch.randn(4, 5, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 5, (4,), generator=g)
    loss = create_loss(name, **options)

    def total(x):
        return float(sum(loss(x, t, y, 1).values()))

    x = s.float().requires_grad_(True)
    sum(loss(x, t, y, 1).values()).backward()
    h = 1e-2
    numeric = torch.zeros_like(s)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            e = torch.zeros_like(s)
            e[i, j] = h
            numeric[i, j] = (total(s + e) - total(s - e)) / (2 * h)
    torch.testing.assert_close(x.grad.double(), numeric, rtol=2e-3, atol=2e-4)
    assert x.grad.abs().max() > 1e-3  # the gradient is not trivially zero


def test_kd_gradient_is_the_closed_form(batch):
    """d/ds of T^2 * KL at temperature T is T * (p_s - p_t) / B; of CE, (softmax(s) - onehot(y)) / B."""
    s, t, y = batch
    x = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    teacher = torch.tensor(t, dtype=torch.float32, requires_grad=True)
    terms = create_loss("kd", temperature=4.0, alpha=0.5)(x, teacher.detach(), torch.tensor(y), 0)
    sum(terms.values()).backward()
    assert teacher.grad is None
    onehot = np.eye(10)[y]
    want = 0.5 * 4.0 * (softmax(s / 4) - softmax(t / 4)) / len(s) + 0.5 * (softmax(s) - onehot) / len(s)
    np.testing.assert_allclose(x.grad.numpy(), want, rtol=1e-4, atol=1e-6)


def _targets_of_every_kind(t: torch.Tensor, t2: torch.Tensor) -> dict:
    """The teacher targets a loss is called with: a float16 cache's logits, an ensemble's, a top-k cache's."""
    from kdpipe.cache.format import encode_topk
    from kdpipe.ensemble import EnsembleTargets
    from kdpipe.losses import TopKTargets
    enc = encode_topk(t.numpy(), 3, [1.0, 2.5, 4.0])
    topk = TopKTargets(torch.from_numpy(enc["logits_topk_values"]), torch.from_numpy(enc["logits_topk_indices"]),
                       torch.from_numpy(enc["logits_topk_rest"]), torch.tensor([1.0, 2.5, 4.0]), (1.0, 2.5, 4.0))
    return {"float16": t.half(), "ensemble": EnsembleTargets(torch.stack([t, t2]), torch.tensor([0.7, 0.3]).log()),
            "topk": topk}


@pytest.mark.parametrize("name", sorted(STACKS))
def test_stacked_runs_get_each_runs_loss_and_gradient_for_every_kind_of_target_and_mixed_labels(name):
    """What a fused step backpropagates: the stacked loss's gradient w.r.t. run s's logits is run s's own, for
    float16 cache logits, an ensemble's targets and a top-k cache's, with mixed-view labels."""
    from kdpipe.losses import MixedLabels
    g = torch.Generator().manual_seed(2)
    out = torch.randn(3, 8, 6, generator=g) * 3
    t, t2 = torch.randn(8, 6, generator=g) * 3, torch.randn(8, 6, generator=g) * 3
    y = MixedLabels(torch.randint(0, 6, (8,), generator=g), torch.randint(0, 6, (8,), generator=g),
                    torch.rand(8, generator=g))
    # a loss without a temperature (docs/extending.md: "add the loss to STACKS") runs with its own options
    options = [dict(o, temperature=T) if "temperature" in o else o for o, T in zip(STACKS[name], (4.0, 1.0, 2.5))]
    single = [create_loss(name, **o) for o in options]
    for kind, teacher in _targets_of_every_kind(t, t2).items():
        if kind == "topk" and not single[0].topk:
            continue
        x = out.clone().requires_grad_(True)
        got = type(single[0]).stack(single)(x, teacher, y, torch.tensor(2.0))
        sum(got.values()).sum().backward()
        for i, loss in enumerate(single):
            xi = out[i].clone().requires_grad_(True)
            want = loss(xi, teacher, y, 2)
            sum(want.values()).backward()
            for k in want:
                torch.testing.assert_close(got[k][i], want[k], atol=1e-5, rtol=1e-5, msg=f"{kind} {k} run {i}")
            torch.testing.assert_close(x.grad[i], xi.grad, atol=1e-6, rtol=1e-5, msg=f"{kind} gradient run {i}")
            assert xi.grad.abs().max() > 1e-3


@pytest.mark.parametrize("temperature", [1.0, 2.0, 7.5])
@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_kd_value_and_gradient_with_float16_logits_and_mixed_labels_match_float64(temperature, alpha):
    """From first principles in float64: (1 - a) * mean_i [w_i CE(s_i, y_i) + (1 - w_i) CE(s_i, y'_i)]
    + a * T^2 * mean_i KL(softmax(t_i / T) || softmax(s_i / T)), t the float16 cache logits; its gradient w.r.t.
    s is ((1 - a) (softmax(s) - target) + a T (softmax(s / T) - softmax(t / T))) / B, target the mixed one-hots."""
    from kdpipe.losses import MixedLabels
    g = np.random.default_rng(3)
    s, t = g.normal(size=(7, 10)) * 3, (g.normal(size=(7, 10)) * 6).astype(np.float16)
    ya, yb, w = g.integers(0, 10, 7), g.integers(0, 10, 7), g.random(7).astype(np.float32)
    x = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    labels = MixedLabels(torch.from_numpy(ya), torch.from_numpy(yb), torch.from_numpy(w))
    total = sum(create_loss("kd", temperature=temperature, alpha=alpha)(x, torch.from_numpy(t), labels, 0).values())
    total.backward()
    rows, wd = np.arange(7), w.astype(np.float64)
    p, ps, pt = softmax(s), softmax(s / temperature), softmax(t.astype(np.float64) / temperature)
    ce = np.mean(-wd * np.log(p[rows, ya]) - (1 - wd) * np.log(p[rows, yb]))
    ref = (1 - alpha) * ce + alpha * temperature ** 2 * kl(pt, ps).mean()
    assert float(total.detach()) == pytest.approx(ref, rel=1e-5, abs=1e-6)
    target = np.zeros((7, 10))
    np.add.at(target, (rows, ya), wd)
    np.add.at(target, (rows, yb), 1 - wd)
    grad = ((1 - alpha) * (p - target) + alpha * temperature * (ps - pt)) / 7
    np.testing.assert_allclose(x.grad.numpy(), grad, rtol=1e-4, atol=2e-6)
