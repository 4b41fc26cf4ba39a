"""Ensembles of teachers (kdpipe.ensemble): several caches of the same views, trained against the weighted mean
of the teachers' probabilities at T; dump-logits --like; the refusals; metrics and report."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kdpipe.ensemble import EnsembleTargets, mixture_log_probs
from kdpipe.losses import create_loss
from test_reliability_helpers import assert_one_line_error, run_cli


def invoke(*args):
    return run_cli(list(args))


def ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _hand_mixture(logits: list[np.ndarray], weights, t: float) -> np.ndarray:
    """sum_m w_m softmax(t_m / T) in float64."""
    return sum(w * _softmax(np.asarray(l, np.float64) / t) for l, w in zip(logits, weights))


# ---------------------------------------------------------------- the targets and the losses

def test_the_target_is_the_weighted_mean_of_probabilities_at_t_not_of_logits():
    g = torch.Generator().manual_seed(0)
    t1, t2 = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3
    for weights in ([0.5, 0.5], [0.7, 0.3]):
        targets = EnsembleTargets(torch.stack([t1, t2]), torch.tensor(weights).log())
        for t in (1.0, 4.0):
            got = targets.at_temperature(t).exp().double().numpy()
            want = _hand_mixture([t1.numpy(), t2.numpy()], weights, t)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
            mean_logits = _softmax((weights[0] * t1.numpy() + weights[1] * t2.numpy()) / t)
            assert np.abs(got - mean_logits).max() > 1e-3  # not the mean of raw logits
    equal = EnsembleTargets(torch.stack([t1, t2]), torch.tensor([0.5, 0.5]).log()).at_temperature(4.0)
    weighted = EnsembleTargets(torch.stack([t1, t2]), torch.tensor([0.7, 0.3]).log()).at_temperature(4.0)
    assert (equal - weighted).abs().max() > 1e-3


def test_kd_on_an_ensemble_is_the_kl_to_the_mixture_and_stacked_runs_get_their_own_t():
    g = torch.Generator().manual_seed(1)
    teachers = torch.randn(2, 8, 5, generator=g) * 2
    student = torch.randn(8, 5, generator=g)
    labels = torch.randint(0, 5, (8,), generator=g)
    w = [0.7, 0.3]
    targets = EnsembleTargets(teachers, torch.tensor(w).log())
    for t in (2.0, 4.0):
        loss = create_loss("kd", temperature=t, alpha=0.9)
        got = float(loss(student, targets, labels, 0)["kd"])
        p = _hand_mixture(list(teachers.numpy()), w, t)
        q = _softmax(student.numpy().astype(np.float64) / t)
        want = 0.9 * t * t * np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))
        assert got == pytest.approx(want, rel=1e-5)
    # fused sweeps: S runs of different T, each against the mixture at its own T
    for name, opts in (("kd", {"alpha": 0.9}), ("dkd", {"warmup": 1})):
        losses = [create_loss(name, temperature=t, **opts) for t in (1.0, 4.0)]
        stacked = type(losses[0]).stack(losses)
        out = torch.stack([student, student * 0.5])
        terms = stacked(out, targets, labels, 0)
        for s, single in enumerate(losses):
            for k, v in single(out[s], targets, labels, 0).items():
                assert float(terms[k][s]) == pytest.approx(float(v), rel=1e-5, abs=1e-7), (name, k, s)


def test_weights_default_to_equal_and_are_checked():
    from kdpipe import KDPipeError
    from kdpipe.ensemble import ensemble_tag, parse_weights
    assert parse_weights(None, 3) == [1 / 3] * 3
    assert sum(parse_weights([0.333, 0.333, 0.333], 3)) == pytest.approx(1.0, abs=1e-12)
    assert ensemble_tag(2) == ensemble_tag(2, [0.5, 0.5]) == "ens2" and ensemble_tag(1) == ""
    assert ensemble_tag(2, [0.7, 0.3]) == "ens0.7_0.3"
    for bad in ([0.7, 0.2], [1.0, 0.0], [0.5, 0.5, 0.0], [float("nan"), 1.0]):
        with pytest.raises(KDPipeError):
            parse_weights(bad, 2)


def test_mixture_log_probs_of_one_teacher_is_its_log_softmax():
    z = torch.randn(4, 7)
    np.testing.assert_allclose(mixture_log_probs(z[None], torch.zeros(1), 3.0), torch.log_softmax(z / 3, -1),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- caches

@pytest.fixture(scope="module")
def ens(cache, fmnist, teacher_ckpt, tmp_path_factory) -> SimpleNamespace:
    """The conftest cache (A: cnn_small teacher), a second teacher (an mlp_100 trained one epoch) dumped with
    --like A (B), the first teacher again in float32 with --like A (A32), and a cache of seed 8 (C)."""
    from kdpipe.data import load_dataset
    from kdpipe.engine import OptimConfig
    from kdpipe.teacher import train_teacher
    from kdpipe.views import create_policy

    root = tmp_path_factory.mktemp("ensemble")
    second = root / "mlp-teacher.pt"
    train_teacher(load_dataset(fmnist.spec, "train"), load_dataset(fmnist.spec, "test"), "mlp_100", 1, second,
                  policy=create_policy("crop-flip", padding=2), batch_size=64, optim=OptimConfig(lr=0.05), seed=1,
                  log=lambda *a, **k: None)
    b, a32, c = root / "B", root / "A32", root / "C"
    ok(invoke("dump-logits", "--teacher", second, "--like", cache.path, "--out", b, "--batch-size", 256))
    ok(invoke("dump-logits", "--teacher", teacher_ckpt, "--like", cache.path, "--logits-dtype", "float32",
              "--out", a32, "--batch-size", 256))
    ok(invoke("dump-logits", "--teacher", teacher_ckpt, "--data", fmnist.spec, "--views", 3, "--policy", "crop-flip",
              "--padding", 2, "--seed", 8, "--out", c, "--batch-size", 256))
    return SimpleNamespace(a=cache.path, b=b, a32=a32, c=c, root=root)


def test_like_dumps_exactly_the_views_of_the_other_cache(ens):
    from kdpipe.cache.reader import Cache
    a, b = Cache(ens.a), Cache(ens.b)
    assert b.manifest["views"] == a.manifest["views"]
    for k in ("fingerprint", "spec", "split", "num_samples"):
        assert b.manifest["dataset"][k] == a.manifest["dataset"][k]
    assert b.manifest["teacher"]["fingerprint"] != a.manifest["teacher"]["fingerprint"]
    np.testing.assert_array_equal(b.read("view_params", 0, b.rows), a.read("view_params", 0, a.rows))
    np.testing.assert_array_equal(b.read("labels", 0, b.rows), a.read("labels", 0, a.rows))


@pytest.mark.parametrize("args, fragment", [
    (("--seed", 8), "--seed 8 conflicts with --like"),
    (("--views", 5), "--views 5 conflicts with --like"),
    (("--policy", "crop:4+flip"), "--policy crop:4+flip conflicts with --like"),
    # --padding alone sets crop-flip's: said as given, not as a --policy the user did not write
    (("--padding", 3), "--padding 3 (views crop:3+flip) conflicts with --like"),
    (("--split", "test"), "--split test conflicts with --like"),
    (("--limit", 100), "--limit 100 conflicts with --like"),
])
def test_like_refuses_an_explicit_option_that_differs(ens, teacher_ckpt, tmp_path, args, fragment):
    assert_one_line_error(invoke("dump-logits", "--teacher", teacher_ckpt, "--like", ens.a, *args,
                                 "--out", tmp_path / "x"), fragment)
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_like_accepts_explicit_options_equal_to_the_caches(ens, teacher_ckpt, tmp_path):
    ok(invoke("dump-logits", "--teacher", teacher_ckpt, "--like", ens.a, "--seed", 7, "--views", 3, "--padding", 2,
              "--out", tmp_path / "x", "--batch-size", 256))


def test_like_from_another_folder_records_the_data_as_the_cache_does(fmnist, teacher_ckpt, tmp_path, monkeypatch):
    """A cache of a relative --data path, and one dumped --like it from another folder: the second recorded the path
    made absolute, so the report took students of the two caches for two datasets (refused without --mix-datasets).
    It records the first's spec and the folder it is read from, and stage two finds the data from anywhere."""
    import shutil
    from kdpipe.cache.reader import Cache
    from kdpipe.student import load_cache_data
    proj, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    (proj / "data").mkdir(parents=True)
    elsewhere.mkdir()
    shutil.copy(fmnist.path, proj / "data" / "fm.npz")
    monkeypatch.chdir(proj)
    ok(invoke("dump-logits", "--teacher", teacher_ckpt, "--data", "npz:data/fm.npz", "--views", 1, "--policy",
              "crop:2", "--out", proj / "a", "--batch-size", 256))
    monkeypatch.chdir(elsewhere)
    ok(invoke("dump-logits", "--teacher", teacher_ckpt, "--like", proj / "a", "--logits-dtype", "float32",
              "--out", proj / "b", "--batch-size", 256))
    a, b = Cache(proj / "a").manifest, Cache(proj / "b").manifest
    for key in ("spec", "workdir"):
        assert b["dataset"][key] == a["dataset"][key], key
    assert b["eval"]["dataset"]["spec"] == a["eval"]["dataset"]["spec"]
    monkeypatch.chdir(tmp_path)
    train, _ = load_cache_data(Cache(proj / "b"))
    assert train.fingerprint == a["dataset"]["fingerprint"]


def test_the_epochs_targets_are_the_caches_rows_mixed(ens):
    """What the loss sees in an epoch: for the rows of a batch, the weighted mean of both caches' stored rows."""
    from kdpipe.cache.reader import Cache
    from kdpipe.engine import teacher_rows
    from kdpipe.ensemble import open_caches
    from kdpipe.views import policy_from_identity
    primary, e = open_caches([ens.a, ens.b], [0.7, 0.3])
    source = e.view_source(torch.device("cpu"), policy_from_identity(primary.manifest["views"]))
    idx = torch.tensor([5, 0, 17, 400])
    for epoch in (0, 4):
        params, targets = source(epoch)
        v = epoch % 3
        np.testing.assert_array_equal(params.numpy(), Cache(ens.a).read_view(v, "view_params"))
        got = teacher_rows(targets, idx).at_temperature(4.0).exp().double().numpy()
        want = _hand_mixture([Cache(p).read_view(v, "logits")[idx.numpy()].astype(np.float32) for p in (ens.a, ens.b)],
                             [0.7, 0.3], 4.0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # caches of other logits dtypes (float16, float32) mix in float32
    _, e = open_caches([ens.a, ens.a32])
    _, targets = e.view_source(torch.device("cpu"), None)(1)
    assert targets.logits.dtype == torch.float32
    got = teacher_rows(targets, idx).at_temperature(1.0).exp().double().numpy()
    want = _hand_mixture([Cache(p).read_view(1, "logits")[idx.numpy()].astype(np.float32) for p in (ens.a, ens.a32)],
                         [0.5, 0.5], 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("caches, weights, fragments", [
    (("a", "c"), None, ("cannot form an ensemble", "views.seed", "has 7", "has 8", "--like")),
    (("a", "a"), None, ("is the same cache as",)),
    (("a", "b"), "0.7,0.2", ("sum to 0.9, not 1",)),
    (("a", "b"), "0.5,0.3,0.2", ("3 weight(s)", "for 2 cache(s)")),
    (("a", "b"), "1.5,-0.5", ("positive",)),
    (("a",), "0.5", ("give two or more --cache",)),
    # the option's meaning in dump-logits, a teacher file: stage two takes none
    (("a",), "teacher.pth", ("'teacher.pth' is not a comma-separated list", "an ensemble's weights",
                             "the teacher file is dump-logits' --teacher-weights")),
])
def test_bad_ensembles_are_refused_in_one_line(ens, tmp_path, caches, weights, fragments):
    args = [x for n in caches for x in ("--cache", getattr(ens, n))]
    args += ["--teacher-weights", weights] if weights else []
    assert_one_line_error(invoke("train-student", *args, "--student", "mlp_100", "--epochs", 1, "--out",
                                 tmp_path / "runs"), *fragments)
    assert not any((tmp_path / "runs").glob("*/metrics.json"))


def test_a_top_k_cache_in_an_ensemble_is_refused(ens, teacher_ckpt, tmp_path):
    """The mixture needs each teacher's whole distribution at T: a top-k cache of the same views is refused."""
    topk = tmp_path / "topk"
    ok(invoke("dump-logits", "--teacher", teacher_ckpt, "--like", ens.a, "--codec", "topk:2", "--temperatures", 4,
              "--out", topk, "--batch-size", 256))
    assert_one_line_error(invoke("train-student", "--cache", ens.a, "--cache", topk, "--student", "mlp_100",
                                 "--epochs", 1, "--out", tmp_path / "runs"), "holds top-k logits", "--codec raw")


def test_caches_of_other_data_or_classes_are_refused(ens):
    from kdpipe.cache.reader import Cache
    from kdpipe.ensemble import mismatch
    a = Cache(ens.a)
    assert mismatch(a, Cache(ens.b)) is None
    for edit, fragment in ((lambda m: m["dataset"].update(class_names=m["dataset"]["class_names"][::-1]), "class_names"),
                           (lambda m: m["dataset"].update(fingerprint="0" * 64), "dataset.fingerprint"),
                           (lambda m: m.update(num_classes=11), "num_classes"),
                           (lambda m: m["eval"]["dataset"].update(fingerprint="0" * 64), "test split")):
        other = Cache(ens.b)
        edit(other.manifest)
        assert mismatch(a, other).startswith(fragment)


# ---------------------------------------------------------------- stage two end to end

@pytest.fixture(scope="module")
def ens_runs(ens):
    """One pass of two fused kd runs (T 2 and 4) with a validation split, from A and B weighted 0.7, 0.3."""
    out = ens.root / "runs"
    r = ok(invoke("train-student", "--cache", ens.a, "--cache", ens.b, "--teacher-weights", "0.7,0.3",
                  "--student", "mlp_100", "--temperature", "2,4", "--epochs", 2, "--batch-size", 64,
                  "--val-fraction", 0.1, "--fuse", "on", "--out", out))
    return SimpleNamespace(out=out, output=r.output)


def test_an_ensemble_run_is_named_and_records_teachers_weights_and_agreements(ens, ens_runs):
    from kdpipe.cache.reader import Cache
    from kdpipe.checkpoint import load_teacher
    from kdpipe.data import load_dataset
    from kdpipe.evaluate import agreement
    from kdpipe.student import clean_test_logits
    from kdpipe.views import policy_from_identity

    assert "fused network" in ens_runs.output and "ensemble of 2 teachers" in ens_runs.output
    names = sorted(p.parent.name for p in ens_runs.out.glob("*/metrics.json"))
    assert len(names) == 2 and all(n.endswith("-ens0.7_0.3-s0") for n in names)  # after the training tag (e2-h...)
    assert names[0].startswith("mlp_100-T2-a0.9-") and names[1].startswith("mlp_100-T4-a0.9-")
    a, b = Cache(ens.a), Cache(ens.b)
    test = load_dataset(a.manifest["dataset"]["spec"], "test")
    policy = policy_from_identity(a.manifest["views"])
    for name in names:
        m = json.loads((ens_runs.out / name / "metrics.json").read_text())
        cfg = json.loads((ens_runs.out / name / "config.json").read_text())
        e = m["ensemble"]
        assert e["weights"] == pytest.approx([0.7, 0.3]) and cfg["ensemble"]["weights"] == pytest.approx([0.7, 0.3])
        assert cfg["ensemble"]["cache_ids"] == [a.manifest["cache_id"], b.manifest["cache_id"]]
        assert [t["fingerprint"] for t in e["teachers"]] == [a.manifest["teacher"]["fingerprint"],
                                                            b.manifest["teacher"]["fingerprint"]]
        assert e["temperature"] == m["temperature"]
        # the agreements, recomputed from the saved student and the caches' eval.h5
        student = load_teacher(ens_runs.out / name / "student.pt")
        s = clean_test_logits(student.module, test, policy, a.manifest["input"]["mean"], a.manifest["input"]["std"],
                              torch.device("cpu"))
        tl = [torch.from_numpy(c.read_test_logits()) for c in (a, b)]
        mix = torch.from_numpy(_hand_mixture([x.numpy() for x in tl], [0.7, 0.3], m["temperature"]))
        assert m["teacher_agreement"] == pytest.approx(agreement(s, mix))
        assert e["agreement"] == m["teacher_agreement"]
        for i, x in enumerate(tl, 1):
            assert m[f"teacher_agreement_{i}"] == pytest.approx(agreement(s, x))
            assert e["teachers"][i - 1]["agreement"] == m[f"teacher_agreement_{i}"]
        assert e["test_top1"] == pytest.approx(float((mix.argmax(1).numpy() == test.labels).mean()))
        assert {"teacher_agreement", "teacher_agreement_1", "teacher_agreement_2", "val_top1"} <= set(m["history"][-1])
        assert "teacher_agreement_2" in (ens_runs.out / name / "history.csv").read_text().splitlines()[0]


def test_the_training_loop_hands_the_loss_both_teachers_rows_and_the_weights(ens, tmp_path, monkeypatch):
    """Through train-student, the loss gets EnsembleTargets: M = 2 teachers' rows of the batch and log w."""
    from kdpipe.cache.reader import Cache
    from kdpipe.losses import KDLoss
    seen = []
    terms = KDLoss.terms

    def spy(self, out, teacher, labels, epoch):
        seen.append((teacher.logits.detach().clone(), teacher.log_weights.exp().tolist()))
        return terms(self, out, teacher, labels, epoch)

    monkeypatch.setattr(KDLoss, "terms", spy)
    ok(invoke("train-student", "--cache", ens.a, "--cache", ens.b, "--teacher-weights", "0.25,0.75", "--student",
              "mlp_100", "--epochs", 1, "--batch-size", 128, "--out", tmp_path / "runs"))
    assert len(seen) == 512 // 128
    a, b = (Cache(p).read_view(0, "logits").astype(np.float32) for p in (ens.a, ens.b))
    for logits, w in seen:
        assert logits.shape == (2, 128, 10) and w == pytest.approx([0.25, 0.75])
        # each batch row is one sample's row of both caches, view 0 (epoch 0)
        rows = [int(np.flatnonzero((a == r.numpy()).all(1))[0]) for r in logits[0]]
        np.testing.assert_array_equal(logits[1].numpy(), b[rows])


def test_equal_weights_are_the_default_and_named_apart(ens, ens_runs, tmp_path):
    out = tmp_path / "runs"
    ok(invoke("train-student", "--cache", ens.a, "--cache", ens.b, "--student", "mlp_100", "--epochs", 1,
              "--batch-size", 64, "--out", out))
    m = json.loads((out / "mlp_100-T4-a0.9-e1-ens2-s0" / "metrics.json").read_text())
    assert m["ensemble"]["weights"] == [0.5, 0.5] and m["ensemble"]["tag"] == "ens2"


def test_a_rerun_skips_finished_runs_and_refuses_other_caches(ens, ens_runs):
    args = ["--student", "mlp_100", "--temperature", "2,4", "--epochs", 2, "--batch-size", 64, "--val-fraction", 0.1,
            "--fuse", "on", "--teacher-weights", "0.7,0.3", "--out", ens_runs.out]
    r = ok(invoke("train-student", "--cache", ens.a, "--cache", ens.b, *args))
    assert r.output.count("already finished") == 2
    line = assert_one_line_error(invoke("train-student", "--cache", ens.a, "--cache", ens.a32, *args),
                                 "with other settings", "ensemble.cache_ids")
    assert "--overwrite" in line


def test_the_report_names_the_ensemble_and_its_teachers(ens, ens_runs, tmp_path):
    ok(invoke("report", ens_runs.out, "--out", tmp_path / "report"))
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Ensembles of teachers" in text
    assert "KD from ensemble ens0.7_0.3: 0.7 x fmnist-k3 (cnn_small) + 0.3 x B (mlp_100)" in text
    assert "| ens0.7_0.3 | 4 | B (mlp_100) | 0.3 |" in text
    assert text.count("| teacher | |") == 2  # both teachers have a row of their own


def test_two_ensembles_of_one_label_are_reported_apart(ens, ens_runs, tmp_path):
    """Two ensembles whose caches share folder names and teacher architectures (two pipelines' [[teacher]] "a"
    and "b") have one label: the report took the first one's test top-1 for both and averaged the agreements."""
    import shutil
    run = next(ens_runs.out.glob("*T4*/metrics.json")).parent
    for folder, top1, agr in (("one", 0.9, 0.8), ("two", 0.5, 0.4)):
        d = tmp_path / folder / run.name
        shutil.copytree(run, d)
        m = json.loads((d / "metrics.json").read_text())
        e = m["ensemble"]
        e["test_top1"], e["agreement"] = top1, agr
        for t in e["teachers"]:
            t["cache_id"], t["agreement"] = f"{folder}-{t['cache_id']}", agr
        (d / "metrics.json").write_text(json.dumps(m))
    ok(invoke("report", tmp_path / "one", tmp_path / "two", "--out", tmp_path / "report"))
    rows = [r for r in (tmp_path / "report" / "report.md").read_text().splitlines() if "| the ensemble |" in r]
    assert len(rows) == 2, rows
    assert {r.split("|")[5].strip() for r in rows} == {"0.9000", "0.5000"}
    assert {r.split("|")[6].strip() for r in rows} == {"0.8000", "0.4000"}


def test_the_ensembles_table_leaves_out_the_scratch_twin(ens, ens_runs, tmp_path):
    """A scratch run of an ensemble's sweep (alpha 0) records the ensemble (its views are the caches'), but learned
    nothing from it: it was counted in the table's runs and agreements of the first T's row."""
    import shutil
    run = next(ens_runs.out.glob("*T2*/metrics.json")).parent
    kd, scratch = tmp_path / "runs" / run.name, tmp_path / "runs" / run.name.replace("-T2-a0.9-", "-scratch-")
    shutil.copytree(run, kd)
    shutil.copytree(run, scratch)
    m = json.loads((scratch / "metrics.json").read_text())
    m.update(name=scratch.name, alpha=0.0, uses_teacher=False, teacher_agreement=0.01)
    m["loss"]["options"]["alpha"] = 0.0
    m["ensemble"]["agreement"] = 0.01
    for t in m["ensemble"]["teachers"]:
        t["agreement"] = 0.01
    (scratch / "metrics.json").write_text(json.dumps(m))
    want = json.loads((kd / "metrics.json").read_text())["ensemble"]["agreement"]
    ok(invoke("report", tmp_path / "runs", "--out", tmp_path / "report"))
    rows = [r for r in (tmp_path / "report" / "report.md").read_text().splitlines() if "| the ensemble |" in r]
    assert len(rows) == 1, rows
    cells = [c.strip() for c in rows[0].split("|")]
    assert cells[6] == f"{want:.4f}" and cells[7] == "1", rows


# ---------------------------------------------------------------- DistributedDataParallel

def test_ddp_students_of_an_ensemble_match_the_single_process_run(tmp_path):
    """Under torchrun each rank reads its share of every cache's rows: the 2-rank MLP follows the single-process
    run of twice the batch (as tests/test_distributed.py checks for one cache)."""
    from test_distributed import N_TEST, N_TRAIN, single, torchrun
    from test_distributed import ok as ran

    from conftest import fashion_mnist_arrays
    from kdpipe.checkpoint import save_checkpoint
    from kdpipe.models import create_model

    (x, y), (xt, yt) = fashion_mnist_arrays("train", N_TRAIN), fashion_mnist_arrays("test", N_TEST)
    np.savez(tmp_path / "tiny.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_checkpoint(tmp_path / f"t{seed}.pt", create_model("cnn_tiny", 10, (1, 28, 28)), arch="cnn_tiny",
                        num_classes=10, image_shape=(1, 28, 28), mean=[0.286], std=[0.353],
                        class_names=[str(i) for i in range(10)], dataset={}, test_top1=None)
    common = ["--batch-size", "16", "--device", "cpu", "--force"]  # --force: the teachers are untrained
    single(["dump-logits", "--teacher", str(tmp_path / "t0.pt"), "--data", f"npz:{tmp_path / 'tiny.npz'}",
            "--views", "2", *common, "--out", str(tmp_path / "a")])
    single(["dump-logits", "--teacher", str(tmp_path / "t1.pt"), "--like", str(tmp_path / "a"), *common,
            "--out", str(tmp_path / "b")])

    def args(out, b):
        return ["train-student", "--cache", str(tmp_path / "a"), "--cache", str(tmp_path / "b"), "--teacher-weights",
                "0.6,0.4", "--student", "mlp_100", "--epochs", "2", "--batch-size", str(b), "--device", "cpu",
                "--out", str(out)]
    single(args(tmp_path / "one", 32))
    ran(torchrun(args(tmp_path / "two", 16)))
    (name,) = [p.name for p in (tmp_path / "one").iterdir()]
    m1, m2 = (json.loads((tmp_path / d / name / "metrics.json").read_text()) for d in ("one", "two"))
    assert m2["world_size"] == 2 and m2["ensemble"]["weights"] == pytest.approx([0.6, 0.4])
    np.testing.assert_allclose(m2["train_loss"], m1["train_loss"], rtol=1e-4)
    assert abs(m2["teacher_agreement_2"] - m1["teacher_agreement_2"]) <= 1 / N_TEST


def test_the_python_api_opens_an_ensemble(ens):
    """kdpipe.open_cache([A, B], weights=...): the primary's replayed inputs, both caches' rows of the batch with
    the weights (what train-student's loss gets), and the ensemble's clean test logits at a temperature."""
    import kdpipe
    from kdpipe import KDPipeError
    from kdpipe.cache.reader import Cache
    one, both = kdpipe.open_cache(ens.a), kdpipe.open_cache([ens.a, ens.b], weights=[0.7, 0.3])
    assert both.ensemble is not None and one.ensemble is None and "ensemble" in repr(both)
    b_rows = Cache(ens.b).read_view(1, "logits").astype(np.float32)
    a_rows = Cache(ens.a).read_view(1, "logits").astype(np.float32)
    for (x1, t1, y1), (x2, t2, y2) in zip(one.epoch(4, 100, seed=3), both.epoch(4, 100, seed=3)):  # view 1
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert t2.logits.shape == (2, 100, 10) and t2.log_weights.exp().tolist() == pytest.approx([0.7, 0.3])
        assert torch.equal(t2.logits[0], t1)
        rows = [int(np.flatnonzero((a_rows == r.numpy()).all(1))[0]) for r in t1]
        np.testing.assert_array_equal(t2.logits[1].numpy(), b_rows[rows])
    loss = kdpipe.create_loss("kd", temperature=4, alpha=1.0)
    assert set(loss(torch.zeros(100, 10), t2, y2, 0)) == {"ce", "kd"}
    test = [Cache(p).read_test_logits() for p in (ens.a, ens.b)]
    got = torch.softmax(both.teacher_test_logits(temperature=4) / 4, dim=1).double().numpy()
    np.testing.assert_allclose(got, _hand_mixture(test, [0.7, 0.3], 4.0), rtol=1e-5, atol=1e-7)
    with pytest.raises(KDPipeError, match="temperature=T"):
        both.teacher_test_logits()
    with pytest.raises(KDPipeError, match="cannot form an ensemble"):
        kdpipe.open_cache([ens.a, ens.c])
    with pytest.raises(KDPipeError, match="open one cache, not an ensemble"):
        kdpipe.open_cache([ens.a, ens.b], features=True)
    # The weights as --teacher-weights writes them, or not numbers; a row dataset over two caches: one line each.
    assert kdpipe.open_cache([ens.a, ens.b], weights="0.7,0.3").ensemble.weights == pytest.approx([0.7, 0.3])
    with pytest.raises(KDPipeError, match="--teacher-weights must be numbers, one per --cache, got .*'a'"):
        kdpipe.open_cache([ens.a, ens.b], weights=["a", 0.3])
    with pytest.raises(KDPipeError, match="CachedLogitsDataset reads one cache's rows; .* kdpipe.open_cache"):
        kdpipe.api.CachedLogitsDataset([ens.a, ens.b])
