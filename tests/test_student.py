"""Stage two: sweep planning, equivalence of cached and online KD, what each run writes, refusals."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from kdpipe import KDPipeError
from kdpipe.cache.reader import Cache
from kdpipe.checkpoint import load_teacher
from kdpipe.data import load_dataset
from kdpipe.engine import predict
from kdpipe.evaluate import eval_params
from kdpipe.models import count_parameters, create_model
from kdpipe.student import train_students
from kdpipe.sweep import arch_args_label, parse_loss, plan_runs, plan_sweep, run_name
from kdpipe.teacher import dump_logits
from kdpipe.views import create_policy

from conftest import quiet


# ---------------------------------------------------------------- sweep planning

def test_run_names():
    assert run_name("cnn_tiny", 4.0, 0.9, 0) == "cnn_tiny-T4-a0.9-s0"
    assert run_name("resnet20", 1.5, 0.25, 3) == "resnet20-T1.5-a0.25-s3"
    assert run_name("mlp_100", 4.0, 0.0, 2) == run_name("mlp_100", 8.0, 0.0, 2) == "mlp_100-scratch-s2"
    # another loss: its name, the options its spec gives (sorted), and the axes given
    assert run_name("cnn_tiny", None, None, 0, "dkd") == "cnn_tiny-dkd-s0"
    assert run_name("cnn_tiny", 2.0, 0.0, 1, "dkd", {"warmup": 5.0, "beta": 2.0}) == \
        "cnn_tiny-dkd_beta2_warmup5-T2-a0-s1"


def test_arch_args_are_in_run_names_readably_or_as_a_hash():
    # Before, runs differing only in --arch-args had one name: a second sweep into the same --out was refused.
    assert run_name("nets.py:Net", 4.0, 0.9, 0, arch_args="width=32,dropout=0.2") == \
        "nets.py_Net-dropout0.2_width32-T4-a0.9-s0"
    assert run_name("nets.py:Net", 4.0, 0.9, 0, arch_args={"dropout": 0.2, "width": 32}) == \
        run_name("nets.py:Net", 4.0, 0.9, 0, arch_args="dropout=0.20, width=32")  # a TOML table, or text
    assert run_name("mlp_100", 4.0, 0.0, 1, arch_args="bias=true") == "mlp_100-biastrue-scratch-s1"
    assert run_name("mlp_100", 4.0, 0.9, 0, arch_args="") == run_name("mlp_100", 4.0, 0.9, 0)  # none: as before
    for odd in ("act=leaky-relu", "path=a/b", "w=-1", "name=" + "x" * 40):  # a '-', '/', or too long: hashed
        label = arch_args_label(odd)
        assert re.fullmatch(r"a[0-9a-f]{6}", label), (odd, label)
        assert run_name("m", 4.0, 0.9, 0, arch_args=odd) == f"m-{label}-T4-a0.9-s0"
    assert arch_args_label("act=leaky-relu") != arch_args_label("act=leaky-elu")
    names = {n for a in ("width=4", "width=8", None)
             for n, _, _ in plan_sweep(["m"], [4], [0.9], [0], "kd", {}, [], 1, 32, arch_args=a)}
    assert names == {"m-width4-T4-a0.9-e1-s0", "m-width8-T4-a0.9-e1-s0", "m-T4-a0.9-e1-s0"}
    with pytest.raises(KDPipeError, match="bad architecture option"):
        arch_args_label("width")


def test_loss_specs_parse_and_bad_ones_are_refused():
    assert parse_loss("kd") == ("kd", {})
    assert parse_loss("dkd:beta=8, warmup=20") == ("dkd", {"beta": 8.0, "warmup": 20.0})
    for spec, message in (("dkd:beta", "bad loss option"), ("dkd:beta=x", "bad loss option"), (":beta=1", "empty"),
                          ("dkd:alpha=1", "give it as --alpha"), ("dkd:beta=1,beta=2", "given twice")):
        with pytest.raises(KDPipeError, match=message):
            parse_loss(spec)


def test_a_sweep_of_another_loss_takes_its_defaults_for_axes_not_given():
    assert plan_runs(["a"], [], [], [0], "dkd") == [("a", None, None, 0)]
    assert plan_runs(["a"], [], [], [0]) == [("a", 4.0, 0.9, 0)]  # kd: today's defaults and names
    plan = plan_runs(["a"], [2, 4], [0, 1], [0], "dkd", {"beta": 2.0})
    assert len(plan) == 4  # alpha = 0 is not "scratch" for DKD: NCKD still distills
    assert len({run_name(*p, "dkd", {"beta": 2.0}) for p in plan}) == 4


def test_sweep_is_the_cartesian_product_with_scratch_once_per_student_and_seed():
    plan = plan_runs(["a", "b"], [1, 4], [0, 0.5, 0.9], [0, 1])
    assert all(isinstance(t, float) and isinstance(al, float) and isinstance(s, int) for _, t, al, s in plan)
    kd = {(arch, t, al, s) for arch, t, al, s in plan if al > 0}
    assert kd == {(arch, float(t), al, s) for arch in "ab" for t in (1, 4) for al in (0.5, 0.9) for s in (0, 1)}
    scratch = sorted((arch, s) for arch, _, al, s in plan if al == 0)
    assert scratch == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert len(plan) == 2 * 2 * (1 + 2 * 2)
    names = [run_name(*p) for p in plan]
    assert len(set(names)) == len(names)
    assert plan_runs(["a"], [4], [0.9], [0]) == [("a", 4.0, 0.9, 0)]


def test_a_scratch_run_is_one_run_whichever_temperatures_the_sweep_gives():
    # T is unused at alpha = 0: one run per (student, seed), recording the sweep's first T, which is no setting
    # (kdpipe.resume.settings: a rerun with --temperature 4 skips it, test_reliability_resume)
    assert plan_runs(["a"], [2, 4], [0], [0]) == [("a", 2.0, 0.0, 0)]
    assert plan_runs(["a"], [2, 2.0000001], [0.0], [0]) == [("a", 2.0, 0.0, 0)]  # Ts alike matter where T is used:
    with pytest.raises(KDPipeError, match="both be named a-T2-a0.5-s0"):
        plan_runs(["a"], [2, 2.0000001], [0.0, 0.5], [0])


def test_temperatures_or_alphas_named_alike_are_refused_not_dropped():
    # 4 and 4.0000001 are both T4 in run names: the second run was dropped without a word
    for temps, alphas in (([4, 4.0000001], [0.9]), ([4], [0.9, 0.90000001])):
        with pytest.raises(KDPipeError, match="both be named a-T4-a0.9-s0"):
            plan_runs(["a"], temps, alphas, [0])
    assert plan_runs(["a"], [4, 4.0], [0.9, 0.9], [0]) == [("a", 4.0, 0.9, 0)]  # the same value twice is one run


def test_two_students_whose_run_names_would_be_equal_are_refused():
    # two users' files of one name: both were run names net.py_Net-..., and the second was dropped silently
    with pytest.raises(KDPipeError, match=r"a/net.py:Net and --student b/net.py:Net would both be named net.py_Net"):
        plan_runs(["a/net.py:Net", "b/net.py:Net"], [4], [0.9], [0])
    assert len(plan_runs(["a/net.py:Net", "a/net.py:Net", "b/net.py:Other"], [4], [0.9], [0])) == 2


# ---------------------------------------------------------------- equivalence with online KD

@pytest.fixture(scope="module")
def eq_cache(fmnist, teacher_ckpt, tmp_path_factory):
    """K = 2 crop-flip views in float32, for students trained 2 epochs."""
    train, test = load_dataset(fmnist.spec, "train"), load_dataset(fmnist.spec, "test")
    out = tmp_path_factory.mktemp("eq") / "cache"
    dump_logits(load_teacher(teacher_ckpt), train, test, out, policy=create_policy("crop-flip", padding=2),
                views=2, seed=1, logits_dtype="float32", shard_rows=300, batch_size=100, log=quiet)
    return out


def _weights(run_dir):
    return torch.load(run_dir / "student.pt", weights_only=True)["state_dict"]


def test_cached_kd_equals_online_kd_weight_for_weight(eq_cache, teacher_ckpt, tmp_path):
    sweep = dict(temperatures=(2.0, 4.0), alphas=(0.0, 0.7), seeds=(0,), batch_size=64, log=quiet)
    cached = train_students(eq_cache, ["cnn_tiny", "mlp_100"], 2, tmp_path / "cached", **sweep)
    teacher = load_teacher(teacher_ckpt).module
    teacher.train()  # handed over as it may come: stage two must run it as the cache's teacher ran
    online = train_students(eq_cache, ["cnn_tiny", "mlp_100"], 2, tmp_path / "online", online_teacher=teacher,
                            **sweep)
    names = sorted(r["name"] for r in cached)
    assert names == sorted(r["name"] for r in online) and len(names) == 6
    for name in names:
        a, b = _weights(tmp_path / "cached" / name), _weights(tmp_path / "online" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs between cached and online KD"
    by_name = {r["name"]: r for r in cached}
    assert {r["name"]: r["test_top1"] for r in online} == {n: r["test_top1"] for n, r in by_name.items()}
    # Not vacuous: the teacher's logits changed the students (KD runs differ from scratch and each other).
    for arch in ("cnn_tiny", "mlp_100"):
        w = [_weights(tmp_path / "cached" / f"{arch}-{tag}-e2-s0") for tag in ("scratch", "T2-a0.7", "T4-a0.7")]
        last = list(w[0])[-1]
        assert not torch.equal(w[0][last], w[1][last]) and not torch.equal(w[1][last], w[2][last])


def test_a_run_trains_the_same_alone_or_in_a_shared_pass(eq_cache, tmp_path):
    alone = train_students(eq_cache, ["mlp_100"], 2, tmp_path / "alone", temperatures=(4.0,), alphas=(0.7,),
                           batch_size=64, log=quiet)
    shared = train_students(eq_cache, ["cnn_tiny", "mlp_100"], 2, tmp_path / "shared", temperatures=(2.0, 4.0),
                            alphas=(0.7,), batch_size=64, log=quiet)
    assert len(alone) == 1 and len(shared) == 4
    a, b = _weights(tmp_path / "alone" / "mlp_100-T4-a0.7-e2-s0"), _weights(tmp_path / "shared" / "mlp_100-T4-a0.7-e2-s0")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_images_kept_in_host_memory_train_the_same_weights(eq_cache, tmp_path, monkeypatch):
    """Images too large for the GPU stay in host memory (KDPIPE_IMAGES_ON_HOST=1 forces it here): the
    batches gathered there are the same, so the run is the same weight for weight."""
    on_device = train_students(eq_cache, ["cnn_tiny"], 2, tmp_path / "dev", alphas=(0.7,), batch_size=64, log=quiet)
    monkeypatch.setenv("KDPIPE_IMAGES_ON_HOST", "1")
    on_host = train_students(eq_cache, ["cnn_tiny"], 2, tmp_path / "host", alphas=(0.7,), batch_size=64, log=quiet)
    a, b = _weights(tmp_path / "dev" / "cnn_tiny-T4-a0.7-e2-s0"), _weights(tmp_path / "host" / "cnn_tiny-T4-a0.7-e2-s0")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert on_device[0]["test_top1"] == on_host[0]["test_top1"]


def test_a_dump_with_images_in_host_memory_writes_the_same_logits(fmnist, teacher_ckpt, tmp_path, monkeypatch):
    train = load_dataset(fmnist.spec, "train")
    kw = dict(policy=create_policy("crop-flip", padding=2), views=2, seed=3, logits_dtype="float32",
              shard_rows=400, batch_size=128, log=quiet)
    dump_logits(load_teacher(teacher_ckpt), train, None, tmp_path / "dev", **kw)
    monkeypatch.setenv("KDPIPE_IMAGES_ON_HOST", "1")
    dump_logits(load_teacher(teacher_ckpt), train, None, tmp_path / "host", **kw)
    a, b = Cache(tmp_path / "dev"), Cache(tmp_path / "host")
    assert np.array_equal(a.read("logits", 0, a.rows), b.read("logits", 0, b.rows))


def test_host_images_index_like_a_tensor():
    from kdpipe.util import HostImages
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(50, 1, 4, 4), dtype=np.uint8)
    store, t = HostImages(arr, "cpu"), torch.from_numpy(arr)
    idx = torch.tensor([7, 3, 3, 49, 0, 12])  # unsorted, with a repeat
    assert torch.equal(store[idx], t[idx]) and torch.equal(store[5:17], t[5:17])
    assert len(store) == 50 and store.device == torch.device("cpu")


# ---------------------------------------------------------------- what a run writes

def test_each_run_writes_checkpoint_metrics_and_config(student_runs, cache):
    names = {"mlp_100-scratch-e2-s0", "mlp_100-scratch-e2-s1", "mlp_100-T4-a0.9-e2-s0", "mlp_100-T4-a0.9-e2-s1"}
    assert {r["name"] for r in student_runs.results} == names
    assert {p.name for p in student_runs.out.iterdir()} == names
    manifest = Cache(cache.path).manifest
    teacher_test = Cache(cache.path).read_test_logits()
    test = cache.test
    for name in names:
        d = student_runs.out / name
        assert {p.name for p in d.iterdir()} == {"student.pt", "metrics.json", "config.json", "history.csv"}
        m = json.loads((d / "metrics.json").read_text())
        c = json.loads((d / "config.json").read_text())
        assert m == next(r for r in student_runs.results if r["name"] == name)
        alpha = 0.0 if "scratch" in name else 0.9
        seed = int(name[-1])
        assert (m["arch"], m["alpha"], m["seed"], m["epochs"]) == ("mlp_100", alpha, seed, 2)
        assert (c["student"], c["alpha"], c["seed"], c["epochs"], c["batch_size"]) == ("mlp_100", alpha, seed, 2, 64)
        assert c["temperature"] == m["temperature"] == 4.0
        assert c["optim"]["lr"] > 0 and c["optim"]["schedule"] in ("cosine", "step", "constant")
        assert c["cache_id"] == m["cache"]["cache_id"] == manifest["cache_id"]
        assert m["cache"]["path"] == str(cache.path.resolve()) == c["cache"]
        assert (m["cache"]["views"], m["cache"]["logits_dtype"]) == (3, "float16")
        assert m["teacher"] == manifest["teacher"] and m["dataset"] == manifest["dataset"]["spec"]
        assert m["parameters"] == count_parameters(create_model("mlp_100", 10, (1, 28, 28))) == 79510
        assert m["size_bytes"] == (d / "student.pt").stat().st_size
        assert m["cpu_latency_ms"] > 0 and m["train_wall_s"] > 0 and m["images_per_s"] > 0
        assert len(m["train_loss"]) == 2 and all(np.isfinite(m["train_loss"]))
        assert m["loss"] == c["loss"] == {"name": "kd", "options": {"temperature": 4.0, "alpha": alpha}}
        assert set(m["train_terms"]) == {"ce", "kd"} and m["uses_teacher"] == (alpha > 0)
        np.testing.assert_allclose(m["train_loss"], np.add(m["train_terms"]["ce"], m["train_terms"]["kd"]), rtol=1e-6)
        assert (m["train_terms"]["kd"] == [0.0, 0.0]) == (alpha == 0)
        # Accuracy and agreement are those of the saved student, recomputed here.
        student = load_teacher(d / "student.pt")
        assert student.info["role"] == "student" and student.arch == "mlp_100" and student.num_classes == 10
        pol = cache.policy
        logits = predict(student.module, torch.from_numpy(np.array(test.images)), pol,
                         torch.from_numpy(eval_params(pol, test.image_shape, len(test))), manifest["input"]["mean"],
                         manifest["input"]["std"])
        assert m["test_top1"] == pytest.approx(float((logits.argmax(1).numpy() == test.labels).mean()))
        assert m["teacher_agreement"] == pytest.approx(float((logits.argmax(1).numpy() ==
                                                              teacher_test.argmax(1)).mean()))
        assert m["test_top1"] > 0.3  # well above chance (0.1)
        # The history's last epoch is the saved student; no validation split: no best epoch.
        assert [h["epoch"] for h in m["history"]] == [1, 2] and "best" not in m
        assert m["history"][-1]["test_top1"] == m["test_top1"]
        assert m["history"][-1]["teacher_agreement"] == m["teacher_agreement"]
        assert [h["loss"] for h in m["history"]] == m["train_loss"]
        # metrics.json marks a finished run: it is written last.
        assert (d / "metrics.json").stat().st_mtime_ns >= (d / "student.pt").stat().st_mtime_ns


def test_a_dkd_sweep_writes_its_terms_and_options(cache, tmp_path):
    log = []
    res = train_students(cache.path, ["mlp_100"], 3, tmp_path / "runs", loss="dkd:beta=2,warmup=2", alphas=(0.5, 1),
                         batch_size=128, log=log.append)
    names = {"mlp_100-dkd_beta2_warmup2-a0.5-e3-s0", "mlp_100-dkd_beta2_warmup2-a1-e3-s0"}
    assert {r["name"] for r in res} == names == {p.name for p in (tmp_path / "runs").iterdir()}
    for name in names:
        m = json.loads((tmp_path / "runs" / name / "metrics.json").read_text())
        c = json.loads((tmp_path / "runs" / name / "config.json").read_text())
        alpha = 0.5 if "a0.5" in name else 1.0
        assert m["loss"] == c["loss"] == {"name": "dkd", "options": {"temperature": 4.0, "alpha": alpha, "beta": 2.0,
                                                                      "warmup": 2}}
        assert (m["alpha"], m["temperature"], m["uses_teacher"]) == (alpha, 4.0, True)
        terms = m["train_terms"]
        assert set(terms) == {"ce", "tckd", "nckd"} and all(len(v) == 3 for v in terms.values())
        np.testing.assert_allclose(m["train_loss"], np.sum([terms[k] for k in terms], axis=0), rtol=1e-6)
        assert all(v > 0 for k in ("tckd", "nckd") for v in terms[k])
        assert m["test_top1"] > 0.3
    assert any("tckd" in line and "nckd" in line for line in log)  # the terms are logged per epoch


def test_many_epochs_per_view_warn_with_what_was_measured(cache, tmp_path):
    log = []
    train_students(cache.path, ["mlp_100"], 6, tmp_path / "runs", alphas=(0.5,), batch_size=256, log=log.append)
    warnings = [line for line in log if line.startswith("warning")]
    assert len(warnings) == 1 and "6 epochs over K = 3 views" in warnings[0] and "--views 6" in warnings[0]
    assert "seen 2.0 times" in warnings[0]
    # It says what was measured: a fixed view is worse than no teacher, K near the epochs matches online KD.
    assert "worse than no teacher" in warnings[0] and "matched online KD" in warnings[0]
    log = []  # a few epochs past K (each view seen < 2 times) cost nothing measurable: no warning
    train_students(cache.path, ["mlp_100"], 4, tmp_path / "runs4", alphas=(0.5,), batch_size=256, log=log.append)
    assert not [line for line in log if line.startswith("warning")]


def test_a_cache_whose_data_changed_is_refused(fmnist, teacher_ckpt, tmp_path):
    p = tmp_path / "d.npz"
    arrays = dict(x_train=fmnist.x_train[:64], y_train=fmnist.y_train[:64], x_test=fmnist.x_test[:32],
                  y_test=fmnist.y_test[:32])
    np.savez(p, **arrays)
    dump_logits(load_teacher(teacher_ckpt), load_dataset(f"npz:{p}", "train"), load_dataset(f"npz:{p}", "test"),
                tmp_path / "c", policy=create_policy("none"), views=1, log=quiet)
    arrays["x_train"] = arrays["x_train"].copy()
    arrays["x_train"][5, 10, 10] ^= 0x10
    np.savez(p, **arrays)
    with pytest.raises(KDPipeError, match="does not match cache.*fingerprint"):
        train_students(tmp_path / "c", ["mlp_100"], 1, tmp_path / "runs", log=quiet)
    assert not (tmp_path / "runs").exists()


def test_train_samples_trains_every_run_on_one_fixed_subset_with_its_cached_views(eq_cache, teacher_ckpt, tmp_path):
    """--train-samples N: the logits of each sample of the subset stay its own (cached equals online KD weight
    for weight on the subset), every run and seed uses the same samples, and N = all changes nothing."""
    from kdpipe.student import training_subset
    n = len(load_dataset(Cache(eq_cache).manifest["dataset"]["spec"], "train"))
    sub = training_subset(np.arange(n), 200)
    assert len(set(sub)) == 200 and sub.max() < n and set(training_subset(np.arange(n), 100)) <= set(sub)
    sweep = dict(temperatures=(2.0,), alphas=(0.0, 0.7), seeds=(0, 1), batch_size=64, log=quiet, train_samples=200)
    cached = train_students(eq_cache, ["mlp_100"], 2, tmp_path / "cached", **sweep)
    train_students(eq_cache, ["mlp_100"], 2, tmp_path / "online", online_teacher=load_teacher(teacher_ckpt).module,
                   **sweep)
    assert {r["train_samples"] for r in cached} == {200} and len(cached) == 4
    for r in cached:
        a, b = _weights(tmp_path / "cached" / r["name"]), _weights(tmp_path / "online" / r["name"])
        assert all(torch.equal(a[k], b[k]) for k in a), r["name"]
    # Not vacuous: fewer samples train other weights; all of them train what no option trains.
    full = train_students(eq_cache, ["mlp_100"], 2, tmp_path / "full", temperatures=(2.0,), alphas=(0.7,),
                          batch_size=64, log=quiet)
    every = train_students(eq_cache, ["mlp_100"], 2, tmp_path / "every", temperatures=(2.0,), alphas=(0.7,),
                           batch_size=64, log=quiet, train_samples=n)
    w_full, w_every = _weights(tmp_path / "full" / full[0]["name"]), _weights(tmp_path / "every" / every[0]["name"])
    w_sub = _weights(tmp_path / "cached" / next(r["name"] for r in cached if r["alpha"] == 0.7 and r["seed"] == 0))
    assert all(torch.equal(w_full[k], w_every[k]) for k in w_full)
    assert not all(torch.equal(w_full[k], w_sub[k]) for k in w_full)
    assert full[0]["train_samples"] == n and every[0]["train_samples"] == n
    with pytest.raises(KDPipeError, match="--train-samples must be between 1 and the .* samples the cache has for training"):
        train_students(eq_cache, ["mlp_100"], 1, tmp_path / "bad", log=quiet, train_samples=n + 1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(students=["mlp_100"], epochs=0), "--epochs must be >= 1"),
    (dict(students=["mlp_100"], epochs=1, alphas=(1.5,)), "kd: --alpha must lie in"),
    (dict(students=["mlp_100"], epochs=1, temperatures=(0.0,)), "temperature must be > 0"),
    (dict(students=["mlp_100"], epochs=1, loss="nope"), "unknown loss 'nope'.*dkd"),
    (dict(students=["mlp_100"], epochs=1, loss="dkd:gamma=2"), "dkd has no option gamma"),
    (dict(students=["mlp_100"], epochs=1, loss="dkd", alphas=(-1.0,)), "dkd: alpha must be >= 0"),
    (dict(students=[], epochs=1), "at least one --student"),
    (dict(students=["mlp_100"], epochs=1, loss="hint", hint_layer="net.2"), "--loss hint trains only the student's "
     "features, never its logits: the student would not learn to classify; compose it .* e.g. --loss kd\\+hint"),
    (dict(students=["mlp_100"], epochs=1, loss="kd:0,hint:1", hint_layer="net.2"), "--loss kd:0,hint:1 trains only"),
    (dict(students=["mlp_100", "no_such_net"], epochs=1), "unknown architecture 'no_such_net'"),
])
def test_bad_arguments_are_refused_before_training(cache, tmp_path, kwargs, message):
    with pytest.raises(KDPipeError, match=message):
        train_students(cache.path, out=tmp_path / "runs", log=quiet, **kwargs)
    assert not (tmp_path / "runs").exists()


def test_a_diverging_run_is_said_marked_in_the_report_and_fails_the_call(cache, tmp_path):
    """A loss that becomes NaN or infinite is never silent: a warning in the epoch it happens, metrics.json's
    diverged_epoch, a mark in the report, and train-student exits 1 naming the run (the others are written)."""
    from click.testing import CliRunner

    from kdpipe.cli import main
    from kdpipe.report import build_report
    out = tmp_path / "runs"
    res = CliRunner().invoke(main, ["train-student", "--cache", str(cache.path), "--student", "mlp_100",
                                    "--temperature", "4", "--alpha", "0.9", "--lr", "1e30,0.05", "--epochs", "2",
                                    "--batch-size", "64", "--device", "cpu", "--fuse", "off", "--out", str(out)])
    assert res.exit_code == 1, res.output
    bad = next(p for p in out.iterdir() if "lr1e+30" in p.name)
    good = next(p for p in out.iterdir() if p.is_dir() and p != bad and (p / "metrics.json").exists())
    assert f"warning: {bad.name}: the loss became" in res.output
    assert res.output.strip().splitlines()[-1] == (f"Error: 1 run(s) diverged (their loss became NaN or infinite): "
                                                   f"{bad.name}; lower --lr, or change the loss's options")
    assert json.loads((bad / "metrics.json").read_text())["diverged_epoch"] == 1
    assert "diverged_epoch" not in json.loads((good / "metrics.json").read_text())
    build_report([out], tmp_path / "rep")
    rows = [line for line in (tmp_path / "rep" / "report.md").read_text().splitlines() if "| KD |" in line]
    assert [("| 1e+30 |" in r, "(diverged in epoch 1)" in r) for r in sorted(rows)] in (
        [(True, True), (False, False)], [(False, False), (True, True)])


def test_a_pass_whose_every_run_diverged_stops_there(cache, tmp_path):
    """--lr 1e30 alone: the loss became NaN in the first epoch and the pass trained every remaining epoch on NaN
    weights; now it stops after the epoch it diverged in, and the run is written and marked as before."""
    log: list[str] = []
    (m,) = train_students(cache.path, ["mlp_100"], 4, tmp_path / "runs", temperatures=(4.0,), alphas=(0.9,),
                          lrs=(1e30,), batch_size=64, fuse=False, log=log.append)
    assert m["diverged_epoch"] == 1 and len(m["train_loss"]) == len(m["history"]) == 1
    assert "  students s0: every run of the pass diverged: it stops after epoch 1/4" in log
    assert not any("epoch 2/4" in line for line in log)
    assert (tmp_path / "runs" / m["name"] / "metrics.json").is_file()
    from kdpipe.report import build_report
    build_report([tmp_path / "runs"], tmp_path / "rep")  # a history shorter than the epochs asked for reports
    assert "(diverged in epoch 1)" in (tmp_path / "rep" / "report.md").read_text()


def test_fuse_asked_for_under_torchrun_is_said_to_step_unfused(tmp_path):
    """Under torchrun (world > 1) every run is its own DistributedDataParallel model and train_pass steps them one by
    one: --fuse on or compile was dropped without a word."""
    from kdpipe.distributed import Dist
    for fuse in (True, "compile", None, False):
        logged = []
        with pytest.raises(KDPipeError, match="--epochs must be >= 1"):  # stops before any collective
            train_students(tmp_path / "no-cache", ["mlp_100"], 0, tmp_path / "runs", dist=Dist(rank=0, world=2),
                           fuse=fuse, log=logged.append)
        said = [m for m in logged if "under torchrun" in m]
        assert len(said) == (1 if fuse else 0)
        assert not said or f"--fuse {'compile' if fuse == 'compile' else 'on'}" in said[0]
