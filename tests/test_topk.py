"""The top-k codec (issue 12): dump-logits --codec topk:K --temperatures ..., the (k + 1)-bin KL of stage two,
its refusals, verify-cache of the top-k columns, fused runs, bytes per row."""

from __future__ import annotations

import json
import pickle
import shutil
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import quiet
from kdpipe import KDPipeError
from kdpipe.cache import format as fmt
from kdpipe.cache.reader import Cache, CachedLogitsDataset
from kdpipe.cli import main
from kdpipe.losses import TopKTargets, create_loss, topk_kl
from test_reliability_helpers import assert_one_line_error, rewrite_manifest

TEMPS = (1.0, 4.0)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def targets(logits: np.ndarray, k: int, temps=TEMPS) -> TopKTargets:
    """TopKTargets of float32 logits (rows, C), encoded as the writer encodes them (values kept float32)."""
    cols = fmt.encode_topk(logits, k, temps)
    return TopKTargets(torch.from_numpy(cols["logits_topk_values"]), torch.from_numpy(cols["logits_topk_indices"]),
                       torch.from_numpy(cols["logits_topk_rest"]), torch.tensor(temps, dtype=torch.float32))


@pytest.fixture(scope="module")
def topk(cache, fmnist, teacher_ckpt, tmp_path_factory) -> SimpleNamespace:
    """The conftest `cache` dumped again through the CLI with --codec topk:3 --temperatures 1,4 (same teacher,
    data, views, seed, batches and shards), so its rows can be compared with the raw cache's."""
    out = tmp_path_factory.mktemp("topk") / "k3"
    r = invoke("dump-logits", "--teacher", teacher_ckpt, "--data", fmnist.spec, "--views", 3, "--seed", 7,
               "--padding", 2, "--shard-rows", 500, "--batch-size", 200, "--codec", "topk:3",
               "--temperatures", "4,1", "--out", out)
    assert r.exit_code == 0, r.output
    return SimpleNamespace(path=out, output=r.output)


def test_dump_stores_the_top_k_logits_their_classes_and_the_rest_at_each_temperature(cache, topk):
    c, raw = Cache(topk.path), Cache(cache.path)
    m = c.manifest
    assert m["logits"] == {"codec": "topk", "dtype": "float16", "k": 3, "temperatures": [1.0, 4.0]}
    assert m["identity"]["logits_codec"] == {"codec": "topk", "k": 3, "temperatures": [1.0, 4.0]}
    assert "logits_codec" not in raw.manifest["identity"]  # raw caches keep the identity (and ids) they had
    assert [col["name"] for col in m["columns"] if col["name"].startswith("logits")] == list(fmt.TOPK_COLUMNS)
    # The planned size printed before the dump is the codec's, and what the shards hold.
    per_row = fmt.row_bytes(m)
    assert f"x {per_row} bytes" in topk.output
    stored = sum(nbytes for s in m["shards"] for _, nbytes in s["layout"].values())
    assert stored == per_row * m["rows"]
    assert per_row - fmt.row_bytes(raw.manifest) == (2 * 3 + 2 * 3 + 4 * 2) - 2 * 10

    dense = cache.captured.outputs.numpy()  # the teacher's float32 logits of every row
    values = c.read("logits_topk_values", 0, c.rows)
    indices = c.read("logits_topk_indices", 0, c.rows)
    assert values.dtype == np.float16 and indices.dtype == np.uint16
    np.testing.assert_array_equal(indices, np.argsort(-dense, axis=1, kind="stable")[:, :3])
    np.testing.assert_array_equal(values, np.take_along_axis(raw.read("logits", 0, c.rows), indices.astype(int), 1))
    rest = c.read("logits_topk_rest", 0, c.rows)
    others = np.ones_like(dense, dtype=bool)
    np.put_along_axis(others, indices.astype(int), False, 1)
    for j, t in enumerate(TEMPS):
        z = np.where(others, dense.astype(np.float64) / t, -np.inf)
        np.testing.assert_allclose(rest[:, j], np.log(np.exp(z).sum(1)), rtol=1e-5, atol=1e-5)
    # The eval file keeps the dense test logits: agreement works as for raw caches.
    np.testing.assert_array_equal(c.read_test_logits(), raw.read_test_logits())

    r = invoke("inspect", topk.path)
    assert r.exit_code == 0 and "codec topk:3 (temperatures 1, 4), float16" in r.output, r.output
    assert "logits_topk_indices <u2[500, 3]" in r.output and "logits_topk_rest <f4[500, 2]" in r.output
    item = CachedLogitsDataset(topk.path)[5]
    assert len(item) == 7 and item[3].dtype == torch.float32 and item[4].dtype == torch.int64
    assert item[4].tolist() == indices[5].astype(int).tolist() and item[5].shape == (2,)
    # A DataLoader's spawned workers get the dataset pickled: the codec's columns (their dtype is a function of
    # the manifest) must not stop it.
    clone = pickle.loads(pickle.dumps(CachedLogitsDataset(topk.path)))
    assert clone[5][4].tolist() == item[4].tolist()


def test_a_kdpipe_that_knows_only_raw_refuses_a_topk_cache_by_its_codec(topk, monkeypatch):
    monkeypatch.setattr(fmt, "CODECS", ("raw",))
    with pytest.raises(KDPipeError, match="its logits codec 'topk' is unknown to this kdpipe, which reads raw"):
        Cache(topk.path)


@pytest.mark.parametrize("args, message", [
    (["--codec", "topk:3"], "--codec topk:3 needs --temperatures T[,T...]"),
    (["--temperatures", "4"], "--temperatures is for --codec topk:K"),
    (["--codec", "topk:11", "--temperatures", "4"], "keeps more logits than the dataset's 10 classes"),
    (["--codec", "topk:x", "--temperatures", "4"], "--codec topk:K needs a whole number K >= 1"),
    (["--codec", "top3"], "unknown --codec 'top3': use raw, or topk:K"),
    (["--codec", "topk:2", "--temperatures", "0"], "--temperatures must be > 0"),
])
def test_bad_codec_options_are_refused_in_one_line(fmnist, teacher_ckpt, tmp_path, args, message):
    r = invoke("dump-logits", "--teacher", teacher_ckpt, "--data", fmnist.spec, "--views", 1, *args,
               "--out", tmp_path / "c")
    assert_one_line_error(r, message)
    assert not (tmp_path / "c").exists()


def test_stage_two_trains_from_topk_targets_and_refuses_what_they_cannot_serve(topk, tmp_path):
    out = tmp_path / "runs"
    r = invoke("train-student", "--cache", topk.path, "--student", "mlp_100", "--epochs", 1, "--temperature", "4,1",
               "--batch-size", 64, "--out", out)
    assert r.exit_code == 0, r.output
    for t in ("4", "1"):
        metrics = json.loads(next(out.glob(f"*T{t}*/metrics.json")).read_text())
        assert metrics["cache"]["logits_codec"] == "topk:3 (temperatures 1, 4)"
        assert metrics["train_terms"]["kd"][0] > 0 and np.isfinite(metrics["train_loss"][0])
        assert 0 <= metrics["teacher_agreement"] <= 1

    r = invoke("train-student", "--cache", topk.path, "--student", "mlp_100", "--epochs", 1, "--temperature", "4,2",
               "--out", tmp_path / "r2")
    assert_one_line_error(r, "temperature 2 was not declared when cache", "train at one of 1, 4")
    r = invoke("train-student", "--cache", topk.path, "--student", "mlp_100", "--epochs", 1, "--loss", "dkd",
               "--out", tmp_path / "r3")
    assert_one_line_error(r, "loss dkd needs every teacher logit", "top 3", "takes top-k targets (kd)")
    # A run without the teacher (alpha 0) needs no declared temperature.
    r = invoke("train-student", "--cache", topk.path, "--student", "mlp_100", "--epochs", 1, "--alpha", 0,
               "--temperature", 2, "--batch-size", 64, "--out", tmp_path / "r4")
    assert r.exit_code == 0, r.output


def test_the_python_api_yields_topk_targets_that_the_kd_loss_takes(topk):
    import kdpipe
    data = kdpipe.open_cache(topk.path)
    x, t, y = next(iter(data.epoch(1, batch_size=32)))
    assert isinstance(t, TopKTargets) and t.values.shape == (32, 3) and t.rest.shape == (32, 2)
    terms = kdpipe.create_loss("kd", temperature=4)(torch.zeros(32, 10, requires_grad=True), t, y, 1)
    assert terms["kd"] > 0
    with pytest.raises(KDPipeError, match="temperature 2 was not declared when this top-k cache was dumped: use one "
                                          "of 1, 4"):
        kdpipe.create_loss("kd", temperature=2)(torch.zeros(32, 10), t, y, 1)
    # A loss that needs every logit (dkd) is refused in one line, not an AttributeError from deep in its terms;
    # one that needs no teacher (alpha = 0) still trains.
    with pytest.raises(KDPipeError, match="loss dkd needs every teacher logit, and these targets are a top-k "
                                          "cache's .*: use a loss that takes them \\(kd\\)"):
        kdpipe.create_loss("dkd", temperature=4)(torch.zeros(32, 10), t, y, 1)
    assert kdpipe.create_loss("dkd", alpha=0, beta=0)(torch.zeros(32, 10), t, y, 1)["tckd"] == 0


def test_k_equal_to_the_classes_is_the_dense_loss():
    g = np.random.default_rng(0)
    s = torch.from_numpy(g.normal(size=(16, 10)).astype(np.float32) * 3)
    t = g.normal(size=(16, 10)).astype(np.float32) * 3
    y = torch.from_numpy(g.integers(0, 10, 16))
    full = targets(t, 10, (1.0, 2.5, 4.0))
    assert torch.isinf(full.rest).all()
    for temp in (1.0, 2.5, 4.0):
        loss = create_loss("kd", temperature=temp, alpha=0.9)
        a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
        dense, coded = loss(a, torch.from_numpy(t), y, 0), loss(b, full, y, 0)
        for k in dense:
            torch.testing.assert_close(coded[k], dense[k], rtol=1e-5, atol=1e-6)
        sum(dense.values()).backward()
        sum(coded.values()).backward()
        assert torch.isfinite(b.grad).all()
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)
    # Stacked runs, each at its own temperature, equal each run alone (and the dense loss).
    options = [dict(temperature=4.0, alpha=0.9), dict(temperature=1.0, alpha=0.5), dict(temperature=2.5, alpha=1.0)]
    singles = [create_loss("kd", **o) for o in options]
    stacked = type(singles[0]).stack(singles)
    out = torch.stack([s, s * 0.5, s + 1])
    got = stacked(out, full, y, 0)
    for i, o in enumerate(options):
        want = create_loss("kd", **o)(out[i], torch.from_numpy(t), y, 0)
        for k in want:
            torch.testing.assert_close(got[k][i], want[k], rtol=1e-5, atol=1e-6)


def _merged_kl(teacher: np.ndarray, student: np.ndarray, k: int, temp: float) -> np.ndarray:
    """Float64 reference: KL between the teacher's and the student's distributions at temp with every class
    outside the teacher's top k merged into one bin (and the naive alternatives' references)."""
    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    p, q = softmax(teacher.astype(np.float64) / temp), softmax(student.astype(np.float64) / temp)
    top = np.argsort(-teacher, axis=1, kind="stable")[:, :k]
    pk, qk = np.take_along_axis(p, top, 1), np.take_along_axis(q, top, 1)
    pb = np.concatenate([pk, 1 - pk.sum(1, keepdims=True)], 1)
    qb = np.concatenate([qk, 1 - qk.sum(1, keepdims=True)], 1)
    keep = (pb * (np.log(pb) - np.log(qb))).sum(1)
    drop = (pk * (np.log(pk) - np.log(qk))).sum(1)
    pr = pk / pk.sum(1, keepdims=True)
    zero = (pr * (np.log(pr) - np.log(qk))).sum(1)
    renorm = (pr * (np.log(pr) - np.log(qk / qk.sum(1, keepdims=True)))).sum(1)
    return {"keep": keep, "drop": drop, "zero": zero, "renormalize": renorm}


@pytest.mark.parametrize("k", [1, 3, 9])
def test_topk_kl_is_the_kl_over_k_plus_one_bins(k):
    g = np.random.default_rng(k)
    t = g.normal(size=(32, 10)).astype(np.float32) * 2
    s = g.normal(size=(32, 10)).astype(np.float32) * 2
    tt = targets(t, k)
    for temp in TEMPS:
        ref = _merged_kl(t, s, k, temp)
        for rest in ("keep", "drop", "zero", "renormalize"):
            got = topk_kl(torch.from_numpy(s), tt, temp, rest)
            np.testing.assert_allclose(got.numpy(), ref[rest], rtol=1e-4, atol=1e-6, err_msg=f"{rest} T={temp}")


def _tampered(src, dst, edit):
    """A copy of the top-k cache whose shard 1 (rows 500..999) was rewritten after edit(arrays), with its
    checksums and the manifest's to match (as a faulty dump would write it)."""
    from kdpipe.cache.writer import shard_datasets, write_h5_atomic

    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    path = dst / m["shards"][1]["file"]
    with h5py.File(path, "r") as f:
        arrays = {name: f[col.path][()] for name, col in fmt.SHARD_COLUMNS.items() if col.path in f}
        attrs = dict(f.attrs)
    edit(arrays)
    ent = write_h5_atomic(path, shard_datasets(arrays, m, int(attrs["row_start"]), int(attrs["row_stop"])), attrs)
    rewrite_manifest(dst, lambda m: m["shards"][1].update(ent))
    return dst


def test_verify_cache_checks_every_topk_row_for_order_classes_and_rest_mass(topk, tmp_path):
    from kdpipe.verify import verify_cache

    def edit(a):
        v, i, rest = a["logits_topk_values"], a["logits_topk_indices"], a["logits_topk_rest"]
        v[10, [0, 1]], i[10, [0, 1]] = v[10, [1, 0]], i[10, [1, 0]]  # row 510: out of order
        i[20, 1] = i[20, 0]  # row 520: a class twice
        rest[25, 0] = float(v[25, 2]) / 1.0 + np.log(10 - 3) + 0.5  # row 525: more mass than 7 classes <= v_k hold

    assert verify_cache(topk.path, log=quiet) == []
    faults = verify_cache(_tampered(topk.path, tmp_path / "bad", edit), log=quiet)
    assert faults == [
        "shard-00001.h5 (rows 500..999): dataset logits_topk_indices is wrong in 1 row(s) (classes outside [0, C) or "
        "repeated): 520",
        "shard-00001.h5 (rows 500..999): dataset logits_topk_values is wrong in 1 row(s) (not in decreasing order): "
        "510",
        "shard-00001.h5 (rows 500..999): dataset logits_topk_rest is wrong in 1 row(s) (more rest mass than the other "
        "classes can hold): 525"], faults


def test_verify_cache_recomputes_topk_rows_and_names_wrong_values_classes_and_rest(topk, teacher_ckpt, tmp_path):
    from kdpipe.verify import verify_cache

    rows = Cache(topk.path).rows
    assert verify_cache(topk.path, teacher_file=str(teacher_ckpt), sample=rows, log=quiet) == []
    picked = {}

    def edit(a):
        v, i = a["logits_topk_values"], a["logits_topk_indices"]
        j = picked["j"] = next(r for r in range(50, 500) if v[r, 0] - v[r, 1] > 0.5)
        i[j, [0, 1]] = i[j, [1, 0]]  # classes swapped under their values
        v[30, 0] += np.float16(1.0)  # row 530, still in order
        a["logits_topk_rest"][40, 1] -= 0.5  # row 540, still possible

    bad = _tampered(topk.path, tmp_path / "bad", edit)
    j = 500 + picked["j"]
    assert verify_cache(bad, log=quiet) == []  # consistent with itself: only the teacher can tell
    faults = verify_cache(bad, teacher_file=str(teacher_ckpt), sample=rows, log=quiet)
    assert len(faults) == 3, faults
    assert faults[0].startswith(f"2 of {rows} re-computed rows differ from the stored top-k values")
    assert f"rows 530, {j} in shard-00001.h5" in faults[0]
    assert faults[1] == f"1 of {rows} re-computed rows differ from the stored top-k indices: rows {j} in shard-00001.h5"
    assert faults[2] == f"1 of {rows} re-computed rows differ from the stored top-k rest: rows 540 in shard-00001.h5"


def test_a_student_of_other_classes_than_a_topk_cache_is_one_line_in_the_loss(topk):
    """A top-k cache's targets hold k values per row, not C: a student of 100 classes trained silently on a
    10-class cache (its 90 extra classes lumped into the rest bin), one of 7 failed in torch ('Target 9 is out of
    bounds'). The targets carry the cache's classes, and the loss names both, as it does for raw logits."""
    import kdpipe
    data = kdpipe.open_cache(topk.path)
    x, t, y = next(iter(data.epoch(0, batch_size=16)))
    for classes in (7, 100):
        with pytest.raises(KDPipeError, match=f"loss kd: the student gives {classes} logits per sample and the "
                                              "teacher 10: build the student for the cache's 10 classes"):
            kdpipe.create_loss("kd", temperature=4)(torch.zeros(16, classes), t, y, 0)
    assert t.num_classes == 10 and t.rows(torch.arange(4)).num_classes == 10
    assert kdpipe.create_loss("kd", temperature=4)(torch.zeros(16, 10), t, y, 0)["kd"] > 0


def test_cached_views_of_a_rank_read_its_rows_of_topk_targets(topk):
    from kdpipe.student import CachedViews
    views = CachedViews(Cache(topk.path), torch.device("cpu"))
    _, full = views(1)
    share = torch.tensor([3, 9, 400])
    _, part = views(1, share)
    assert isinstance(part, TopKTargets) and part.declared == (1.0, 4.0)
    for a, b in zip(part.rows(share)[:3], full.rows(share)[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ties_may_come_in_either_order():
    """Classes whose logits tie keep the lower class first; verify-cache accepts either order of classes
    tied within its tolerance (its index check compares logits rank by rank, not classes)."""
    lg = np.array([[1.0, 3.0, 3.0, 0.0, 3.0]], dtype=np.float32)
    cols = fmt.encode_topk(lg, 2, (1.0,))
    assert cols["logits_topk_indices"].tolist() == [[1, 2]]
    np.testing.assert_allclose(cols["logits_topk_rest"][0, 0], np.log(np.exp([1.0, 3.0, 0.0]).sum()), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_bytes_per_row_follow_from_the_declarations(k):
    for classes in (10, 1000, 100_000):
        m = {"dataset": {"num_classes": classes, "num_samples": 1}, "views": {"columns": ["a", "b"]}}
        for dtype, size in (("float16", 2), ("float32", 4)):
            raw = fmt.row_bytes({**m, "logits_dtype": dtype})
            coded = fmt.row_bytes({**m, "logits_dtype": dtype,
                                   "logits_codec": {"codec": "topk", "k": k, "temperatures": [1.0, 4.0]}})
            index = 2 if classes <= 65536 else 4
            assert coded - raw == k * (size + index) + 4 * 2 - classes * size


def _fused_runs(fuse: bool):
    from kdpipe.engine import OptimConfig, build_run, train_pass
    from kdpipe.views import create_policy

    n, classes = 96, 5
    g = np.random.default_rng(0)
    images = torch.from_numpy(g.integers(0, 256, size=(n, 1, 12, 12), dtype=np.uint8))
    labels = torch.from_numpy(g.integers(0, classes, size=n).astype(np.int64))
    epochs = {e: targets(g.normal(size=(n, classes)).astype(np.float32) * 2, 2, (1.0, 2.0, 4.0)) for e in range(2)}
    optim = OptimConfig(lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine")
    runs = [build_run(f"r{i}", "cnn_tiny", create_loss("kd", temperature=t, alpha=a), i, classes, (1, 12, 12), optim,
                      2 * (n // 32), torch.device("cpu"), epoch_steps=n // 32)
            for i, (t, a) in enumerate([(4.0, 0.9), (2.0, 0.5), (1.0, 1.0)])]
    pol = create_policy("crop-flip", padding=2)
    stats = train_pass(runs, images, labels, pol, [0.5], [0.25], 2, 32, 3,
                       lambda e: (torch.from_numpy(pol.sample_view(7, e, images.shape)), epochs[e]),
                       log=quiet, fuse=fuse)
    return runs, stats


def test_fused_topk_runs_train_as_unfused():
    plain, s_plain = _fused_runs(False)
    fused, s_fused = _fused_runs(True)
    assert s_plain["fused_groups"] == [] and s_fused["fused_groups"] == [["r0", "r1", "r2"]]
    for ra, rb in zip(plain, fused):  # the tolerances of tests/test_fused.py
        for k, v in ra.model.state_dict().items():
            torch.testing.assert_close(v.float(), rb.model.state_dict()[k].float(), atol=2e-4, rtol=1e-3)
        np.testing.assert_allclose(ra.history, rb.history, rtol=1e-4, atol=1e-5)
        for k in ra.terms:
            np.testing.assert_allclose(ra.terms[k], rb.terms[k], rtol=1e-4, atol=1e-5)
        assert ra.terms["kd"][0] > 0


def test_a_pipeline_dump_passes_the_codec_and_its_temperatures(tmp_path):
    from pathlib import Path

    from kdpipe.pipeline import load_pipeline, make_rules
    text = (Path(__file__).resolve().parents[1] / "pipelines" / "default.toml").read_text()
    assert "\n[dump]\n" in text
    (tmp_path / "p.toml").write_text(text.replace("\n[dump]\n", '\n[dump]\ncodec = "topk:3"\ntemperatures = [1, 4]\n'))
    dump = [line for line in make_rules(load_pipeline(tmp_path / "p.toml")).splitlines() if "dump-logits" in line]
    assert len(dump) == 1 and " --codec topk:3 --temperatures 1,4 " in dump[0], dump


def test_the_codec_is_part_of_the_cache_identity(topk, fmnist, teacher_ckpt, tmp_path):
    """A rerun with another k or other temperatures is refused by name (the same arguments resume); with
    --overwrite it starts over."""
    dst = tmp_path / "c"
    shutil.copytree(topk.path, dst)
    base = ["dump-logits", "--teacher", teacher_ckpt, "--data", fmnist.spec, "--views", 3, "--seed", 7, "--padding", 2,
            "--shard-rows", 500, "--batch-size", 200, "--out", dst]
    r = invoke(*base, "--codec", "topk:3", "--temperatures", "1,4")
    assert r.exit_code == 0 and "already complete" in r.output, r.output
    r = invoke(*base, "--codec", "topk:5", "--temperatures", "1,4")
    assert_one_line_error(r, "holds a cache made with other arguments", "logits_codec.k was 3, now 5")
    r = invoke(*base, "--codec", "topk:3", "--temperatures", "4")
    assert_one_line_error(r, "logits_codec.temperatures was [1.0, 4.0], now [4.0]")
    r = invoke(*base)
    assert_one_line_error(r, "logits_codec was {'codec': 'topk', 'k': 3, 'temperatures': [1.0, 4.0]}, now None")
