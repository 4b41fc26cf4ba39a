"""report: a markdown table of the teacher and every student, seeds aggregated, and PNG plots."""

from __future__ import annotations

import json
import re
import shutil
import statistics

import matplotlib.image
import pytest

from kdpipe import KDPipeError
from kdpipe.report import build_report, find_runs


def table_rows(text):
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| model")]


def versus_rows(text):
    """The rows of the KD-against-scratch table."""
    return table_rows(text[text.index("KD against its scratch twin"):].split("![")[0])


def test_report_of_real_runs(student_runs, cache, tmp_path):
    res = build_report([student_runs.out], tmp_path / "rep")
    assert res["runs"] == 4 and res["report"] == str(tmp_path / "rep" / "report.md")
    text = (tmp_path / "rep" / "report.md").read_text()
    assert f"4 student run(s), trained on {len(cache.train):,} samples." in text
    header = next(line for line in text.splitlines() if line.startswith("| model"))
    assert "CPU latency (ms/image)" in header
    for col in ("test top-1", "agreement", "parameters", "MB", "latency", "training time", "dataset", "optimizer",
                "lr", "epochs", "best epoch"):
        assert col in header
    rows = table_rows(text)
    teacher = [r for r in rows if r[1] == "teacher"]
    manifest = json.loads((cache.path / "manifest.json").read_text())
    assert len(teacher) == 1 and teacher[0][0] == "cnn_small" and teacher[0][9] == manifest["dataset"]["spec"]
    # test errors beside test top-1, out of the test split the runs were tested on (papers count errors)
    assert "test top-1 (errors)" in header
    n_test = student_runs.results[0]["test_samples"]
    assert n_test == len(cache.test) and all(m["test_samples"] == n_test for m in student_runs.results)
    t1 = manifest['teacher']['test_top1']
    assert teacher[0][10] == f"{t1:.4f} ({round((1 - t1) * n_test):,})"
    assert teacher[0][13] == f"{manifest['teacher']['parameters']:,}"
    students = [r for r in rows if r[1] in ("KD", "scratch") and len(r) == 18]
    assert len(students) == 4
    metrics = {(m["alpha"], m["seed"]): m for m in student_runs.results}
    for r in students:
        m = metrics[(float(r[4]), int(r[8]))]
        # a scratch run (kd with alpha 0) trained on cross-entropy alone: its loss column said "kd"
        assert r[1] == ("scratch" if m["alpha"] == 0 else "KD") and r[2] == ("ce" if m["alpha"] == 0 else "kd")
        assert r[5:8] == ["sgd", "0.05", "2"] and r[9] == manifest["dataset"]["spec"]
        errors = round((1 - m["test_top1"]) * n_test)
        assert r[10] == f"{m['test_top1']:.4f} ({errors:,})" and r[11] == f"{m['teacher_agreement']:.4f}" and r[12] == ""
        assert abs(errors - (1 - m["test_top1"]) * n_test) < 1e-6  # a whole number of errors
        assert r[13] == f"{m['parameters']:,}" and r[14] == f"{m['size_bytes'] / 1e6:.2f}"
        # each run's own time, not the whole pass's (two runs share each pass)
        assert r[16] == f"{m['train_s']:.1f}" and 0 < m["train_s"] < m["train_wall_s"]
    # Two seeds per setting: a mean ± std table, with the sample standard deviation and n.
    assert "mean ± sample std" in text
    for alpha, role, loss in ((0.0, "scratch", "ce"), (0.9, "KD", "kd")):
        accs = [metrics[(alpha, s)]["test_top1"] for s in (0, 1)]
        cell = f"{statistics.fmean(accs):.4f} ± {statistics.stdev(accs):.4f}"
        assert any(r[1] == role and r[2] == loss and r[9] == "2" and r[10] == cell for r in rows if len(r) == 14), cell
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert len(summary["groups"]) == 2 and len(summary["runs"]) == 4
    # Plots: real PNG images, linked from the report.
    assert len(res["plots"]) == 3
    names = {p.split("/")[-1] for p in res["plots"]}
    assert names == {"accuracy_vs_parameters.png", "accuracy.png", "learning_curves.png"}
    for p in res["plots"]:
        img = matplotlib.image.imread(p)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
        assert img.std() > 0.01  # not a blank canvas
        assert f"]({p.split('/')[-1]})" in text


def test_mean_and_std_over_seeds_by_hand(student_runs, tmp_path):
    src = student_runs.out / "mlp_100-T4-a0.9-e2-s0"
    for seed, acc, agr in ((0, 0.5, 0.8), (1, 0.6, 0.9), (2, 0.7, 1.0)):
        d = tmp_path / "runs" / f"mlp_100-T4-a0.9-e2-s{seed}"
        shutil.copytree(src, d)
        m = json.loads((d / "metrics.json").read_text())
        m.update(seed=seed, test_top1=acc, teacher_agreement=agr, name=d.name)
        (d / "metrics.json").write_text(json.dumps(m))
    build_report([tmp_path / "runs"], tmp_path / "rep")
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| 3 | 0.6000 ± 0.1000 | 0.9000 ± 0.1000 |" in text
    g = json.loads((tmp_path / "rep" / "summary.json").read_text())["groups"]
    assert len(g) == 1 and g[0]["seeds"] == [0, 1, 2]
    assert g[0]["test_top1_mean"] == pytest.approx(0.6) and g[0]["test_top1_std"] == pytest.approx(0.1)


def test_runs_are_found_by_run_directory_or_by_parent(student_runs, tmp_path):
    one = student_runs.out / "mlp_100-scratch-e2-s1"
    assert [m["name"] for m in find_runs([one])] == ["mlp_100-scratch-e2-s1"]
    assert len(find_runs([student_runs.out])) == 4
    both = find_runs([one, student_runs.out / "mlp_100-T4-a0.9-e2-s0"])
    assert [m["_dir"] for m in both] == [str(one), str(student_runs.out / "mlp_100-T4-a0.9-e2-s0")]
    with pytest.raises(KDPipeError, match="not a run directory"):
        find_runs([tmp_path / "absent"])
    with pytest.raises(KDPipeError, match="holds no runs"):
        find_runs([tmp_path])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    with pytest.raises(KDPipeError, match="cannot read"):
        find_runs([tmp_path / "broken"])


def test_the_loss_column_names_the_loss_and_reads_older_metrics(student_runs, tmp_path):
    """A run of an earlier version (no "loss" in metrics.json) is kd; a DKD run shows its options, and alpha = 0
    is "scratch" only where the loss uses no teacher."""
    src = student_runs.out / "mlp_100-T4-a0.9-e2-s0"
    for name, loss, uses in (("old", None, None), ("old-scratch", None, None), ("dkd-a0", {"name": "dkd", "options": {
            "temperature": 4.0, "alpha": 0.0, "beta": 8.0, "warmup": 20}}, True)):
        d = tmp_path / "runs" / name
        shutil.copytree(src, d)
        m = json.loads((d / "metrics.json").read_text())
        for k in ("loss", "uses_teacher", "train_terms"):
            m.pop(k)
        if loss:
            m.update(loss=loss, uses_teacher=uses, alpha=0.0, name=name)
        elif name == "old-scratch":
            m.update(alpha=0.0, name="mlp_100-scratch-e2-s0")
        (d / "metrics.json").write_text(json.dumps(m))
    build_report([tmp_path / "runs"], tmp_path / "rep")
    rows = table_rows((tmp_path / "rep" / "report.md").read_text())
    students = {r[2]: r for r in rows if r[1] != "teacher" and len(r) == 18}
    assert students["kd"][1:5] == ["KD", "kd", "4", "0.9"]
    assert students["dkd (beta 8, warmup 20)"][1:5] == ["KD", "dkd (beta 8, warmup 20)", "4", "0"]
    # an earlier version's scratch run (alpha 0, no "loss"): cross-entropy, in the table and in summary.json
    assert students["ce"][1:5] == ["scratch", "ce", "", "0"]
    groups = json.loads((tmp_path / "rep" / "summary.json").read_text())["groups"]
    assert sorted(g["loss"] for g in groups) == ["ce", "dkd (beta 8, warmup 20)", "kd"]


def test_a_scratch_run_of_a_loss_other_than_kd_keeps_its_name(student_runs, tmp_path):
    """A scratch run's loss column says ce, the cross-entropy kd (alpha 0) and dkd (alpha 0, beta 0) train on without
    a teacher; a registered loss of the user's that needs no teacher (here label smoothing) was said to be ce too,
    though it trained on something else: it keeps its own name, in the table and in summary.json."""
    runs = _copies(student_runs, tmp_path, [
        {"loss": {"name": "ls", "options": {"smoothing": 0.1}}, "uses_teacher": False, "alpha": None,
         "temperature": None, "name": "mlp_100-ls-e2-s0"},
        {"loss": {"name": "dkd", "options": {"temperature": 4.0, "alpha": 0.0, "beta": 0.0, "warmup": 20}},
         "uses_teacher": False, "alpha": 0.0, "name": "mlp_100-dkd-a0-e2-s0"}])
    build_report([runs], tmp_path / "rep")
    rows = table_rows((tmp_path / "rep" / "report.md").read_text())
    assert sorted(r[1:3] for r in rows if r[1] != "teacher" and len(r) == 18) == [["scratch", "ce"],
                                                                                  ["scratch", "ls (smoothing 0.1)"]]
    groups = json.loads((tmp_path / "rep" / "summary.json").read_text())["groups"]
    assert sorted(g["loss"] for g in groups) == ["ce", "ls (smoothing 0.1)"]


def test_a_new_loss_without_alpha_is_reported(cache, tmp_path):
    """A loss is one registered class, and the report picks it up: one without an alpha (here an L2 on the logits,
    weighted by its own option) stopped `kdpipe report` with a TypeError on formatting alpha None."""
    from kdpipe import losses
    from kdpipe.student import train_students

    @losses.register_loss("test-l2")
    class L2(losses.Loss):
        defaults = {"weight": 1.0}

        @property
        def needs_teacher(self):
            return True

        def terms(self, out, teacher, labels, epoch):
            return {"ce": losses.cross_entropy(out, labels),
                    "l2": self.per_run(self.weight, 1) * ((out - teacher) ** 2).mean((-2, -1))}

    try:
        train_students(cache.path, ["mlp_100"], 1, tmp_path / "runs", loss="test-l2:weight=0.5", seeds=(0, 1),
                       batch_size=64, log=lambda *a: None)
    finally:
        del losses._LOSSES["test-l2"]
    build_report([tmp_path / "runs"], tmp_path / "rep")
    text = (tmp_path / "rep" / "report.md").read_text()
    students = [r for r in table_rows(text) if r[1] != "teacher" and len(r) == 18]
    assert [r[1:5] for r in students] == [["KD", "test-l2 (weight 0.5)", "", ""]] * 2
    settings = [r for r in table_rows(text) if len(r) == 14]  # each setting over its seeds
    assert [r[1:5] + r[9:10] for r in settings] == [["KD", "test-l2 (weight 0.5)", "", "", "2"]], text


def _copies(student_runs, tmp_path, changes):
    """Run directories copied from a real run, each with its metrics changed by one dict of `changes`."""
    src = student_runs.out / "mlp_100-T4-a0.9-e2-s0"
    for i, ch in enumerate(changes):
        d = tmp_path / "runs" / ch.get("name", f"r{i}")
        shutil.copytree(src, d)
        m = json.loads((d / "metrics.json").read_text())
        m.update({"name": d.name, **ch})
        (d / "metrics.json").write_text(json.dumps(m))
    return tmp_path / "runs"


def _capture_figures(monkeypatch):
    import matplotlib.figure
    figs = {}
    real = matplotlib.figure.Figure.savefig

    def save(fig, path, *a, **k):
        name = str(getattr(path, "name", path)).split("/")[-1]  # a file: the temporary .NAME.tmp-PID it goes to
        figs[re.sub(r"^\.(.+)\.tmp-\d+$", r"\1", name)] = fig
        return real(fig, path, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", save)
    return figs


def test_mixed_datasets_are_refused_unless_asked(student_runs, tmp_path):
    from click.testing import CliRunner
    from kdpipe.cli import main
    runs = _copies(student_runs, tmp_path, [{"name": "a-s0"}, {"name": "b-s0", "dataset": "npz:/other.npz"}])
    r = CliRunner().invoke(main, ["report", str(runs), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 2 and "2 datasets" in r.output and "--mix-datasets" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "rep").exists()
    r = CliRunner().invoke(main, ["report", str(runs), "--out", str(tmp_path / "rep"), "--mix-datasets"])
    assert r.exit_code == 0, r.output
    rows = [x for x in table_rows((tmp_path / "rep" / "report.md").read_text()) if len(x) == 18]
    assert "npz:/other.npz" in {x[9] for x in rows} and len({x[9] for x in rows if x[1] != "teacher"}) == 2


def test_runs_of_one_spec_stored_otherwise_are_other_datasets(student_runs, cache, tmp_path):
    """One photo folder dumped at --image-size 32 and 64 (one teacher file): the report took the runs for one
    dataset, with one teacher row and one test top-1, though each was measured on other test images. Now they are
    two datasets, named by what differs, refused unless --mix-datasets, and the teacher has a row on each."""
    m = json.loads((student_runs.out / "mlp_100-T4-a0.9-e2-s0" / "metrics.json").read_text())
    assert m["data"] == {"fingerprint": json.loads((cache.path / "manifest.json").read_text())["dataset"]["fingerprint"]}
    spec = "imagefolder:/photos"
    changes = [{"name": f"s{px}", "dataset": spec, "teacher": {**m["teacher"], "test_top1": top1},
                "data": {"fingerprint": f"{px:064x}", "image_size": px, "resize": "crop"}}
               for px, top1 in ((32, 0.5), (64, 0.7))]
    changes.append({**changes[1], "name": "same64"})  # the 64 px data again: one row of the teacher on it
    runs = _copies(student_runs, tmp_path, changes)
    with pytest.raises(KDPipeError, match=re.escape(f"2 datasets ({spec} (32 px), {spec} (64 px))")):
        build_report([runs], tmp_path / "rep")
    build_report([runs], tmp_path / "rep", mix_datasets=True)
    rows = [r for r in table_rows((tmp_path / "rep" / "report.md").read_text()) if len(r) == 18]
    assert sorted((r[9], r[10].split(" (")[0]) for r in rows if r[1] == "teacher") == [(f"{spec} (32 px)", "0.5000"),
                                                                                      (f"{spec} (64 px)", "0.7000")]
    # stored alike, other contents (the folder changed since): told apart by their data
    changes = [{"name": f"v{i}", "dataset": spec, "data": {"fingerprint": f"{i}" * 64}} for i in (1, 2)]
    runs = _copies(student_runs, tmp_path / "b", changes)
    with pytest.raises(KDPipeError, match=re.escape(f"({spec} (data 11111111), {spec} (data 22222222))")):
        build_report([runs], tmp_path / "rep-b")
    build_report([runs], tmp_path / "rep-c", mix_datasets=True)


def test_thirty_runs_stay_readable(student_runs, tmp_path, monkeypatch):
    """30 runs: 10 settings (lr x arch label) x 3 seeds. The plots show settings (mean ± std, n), not 30
    labels; learning curves have one line per run in panels by architecture, and the teacher's line; the
    bar axis starts at 0."""
    base = json.loads((student_runs.out / "mlp_100-T4-a0.9-e2-s0" / "metrics.json").read_text())
    changes = []
    for k in range(10):
        arch = "mlp_100" if k < 5 else "mlp:64"
        lr = 0.01 * (k % 5 + 1)
        for seed in range(3):
            acc = 0.5 + 0.02 * k + 0.01 * seed
            hist = [dict(h, test_top1=acc - 0.1 * (len(base["history"]) - 1 - i)) for i, h in enumerate(base["history"])]
            changes.append({"name": f"{arch.replace(':', '')}-T4-a0.9-lr{lr:g}-e2-s{seed}", "arch": arch, "lr": lr,
                            "seed": seed, "test_top1": acc, "history": hist, "train_s": 1.0 + k})
    runs = _copies(student_runs, tmp_path, changes)
    figs = _capture_figures(monkeypatch)
    res = build_report([runs], tmp_path / "rep")
    assert res["runs"] == 30
    text = (tmp_path / "rep" / "report.md").read_text()
    agg = [r for r in table_rows(text) if len(r) == 14]
    assert len(agg) == 10 and all(r[9] == "3" for r in agg)
    assert any(r[10] == "0.5100 ± 0.0100" for r in agg)
    # the bar chart: one bar per setting plus the teacher, axis from 0, every value written
    ax = figs["accuracy.png"].axes[0]
    assert ax.get_xlim()[0] == 0 and len(ax.patches) == 11 and len(ax.texts) == 11
    # scatter: no per-point labels at 10 settings
    assert len(figs["accuracy_vs_parameters.png"].axes[0].texts) == 0
    # learning curves: a panel per architecture, a line per run (+ the teacher), a legend entry per setting
    axes = [a for a in figs["learning_curves.png"].axes if a.lines]
    assert sorted(a.get_title() for a in axes) == ["mlp:64", "mlp_100"]
    for a in axes:
        assert len(a.lines) == 15 + 1
        teacher = [ln for ln in a.lines if ln.get_linestyle() == ":"]
        assert len(teacher) == 1 and teacher[0].get_ydata()[0] == pytest.approx(base["teacher"]["test_top1"])
        assert len(a.get_legend().get_texts()) == 5 + 1
    for p in res["plots"]:
        img = matplotlib.image.imread(p)
        assert img.shape[0] > 200 and img.std() > 0.01
def test_kd_against_its_scratch_twin(student_runs, tmp_path):
    """Each KD setting is compared with the scratch runs of its architecture over their common seeds: the mean
    gain, twice the larger std, per-seed wins, and whether the gain is clear (>= 2 x the larger std)."""
    src = student_runs.out / "mlp_100-T4-a0.9-e2-s0"
    settings = {(0.0, 4.0): (0.80, 0.81, 0.82), (0.9, 4.0): (0.85, 0.84, 0.86), (0.5, 2.0): (0.81, 0.80, 0.83)}
    for (alpha, temp), accs in settings.items():
        for seed, acc in enumerate(accs):
            d = tmp_path / "runs" / f"mlp_100-{alpha}-{temp}-s{seed}"
            shutil.copytree(src, d)
            m = json.loads((d / "metrics.json").read_text())
            m.update(seed=seed, test_top1=acc, alpha=alpha, temperature=temp, name=d.name)
            m.pop("uses_teacher")
            (d / "metrics.json").write_text(json.dumps(m))
    # A KD run with a seed the scratch runs lack is left out of the comparison.
    shutil.copytree(tmp_path / "runs" / "mlp_100-0.9-4.0-s0", tmp_path / "runs" / "extra")
    m = json.loads((tmp_path / "runs" / "extra" / "metrics.json").read_text())
    (tmp_path / "runs" / "extra" / "metrics.json").write_text(json.dumps({**m, "seed": 7, "test_top1": 0.1}))
    build_report([tmp_path / "runs"], tmp_path / "rep")
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "KD against its scratch twin" in text
    rows = versus_rows(text)
    assert rows == [["mlp_100", "kd", "2", "0.5", "sgd", "0.05", "2", "3", "+0.0033", "0.0306", "2/3", "no",
                     "`mlp_100-0.5-2.0-e2` vs `mlp_100-0.0-4.0-e2`"],
                    ["mlp_100", "kd", "4", "0.9", "sgd", "0.05", "2", "3", "+0.0400", "0.0200", "3/3", "yes",
                     "`mlp_100-0.9-4.0-e2` vs `mlp_100-0.0-4.0-e2`"]]
    v = json.loads((tmp_path / "rep" / "summary.json").read_text())["versus_scratch"]
    assert [x["seeds"] for x in v] == [[0, 1, 2], [0, 1, 2]]
    assert v[1]["gain"] == pytest.approx(0.04) and v[1]["larger_std"] == pytest.approx(0.01) and v[1]["clear"]
    # One seed: no comparison (no std).
    one = tmp_path / "one"
    for name in ("mlp_100-0.0-4.0-s0", "mlp_100-0.9-4.0-s0"):
        shutil.copytree(tmp_path / "runs" / name, one / name)
    build_report([one], tmp_path / "rep1")
    assert "scratch twin" not in (tmp_path / "rep1" / "report.md").read_text()


def test_kd_rows_of_an_lr_sweep_say_which_lr_and_twin_they_compare(student_runs, tmp_path):
    """--lr 0.05,0.1 gives two KD settings, each compared with the scratch twin of its own lr. The table's rows
    showed model, loss, T and alpha only: two rows alike but for their gains, which could not be told apart."""
    for lr, base in ((0.05, 0.80), (0.1, 0.70)):
        for alpha, gain in ((0.0, 0.0), (0.9, 0.05 if lr == 0.05 else -0.02)):
            for seed in (0, 1):
                src = student_runs.out / f"mlp_100-{'scratch' if alpha == 0 else 'T4-a0.9'}-e2-s{seed}"
                tag = "" if lr == 0.05 else "-lr0.1"
                name = f"mlp_100-{'scratch' if alpha == 0 else 'T4-a0.9'}{tag}-e2-s{seed}"
                d = tmp_path / "runs" / name
                shutil.copytree(src, d)
                m = json.loads((d / "metrics.json").read_text())
                (d / "metrics.json").write_text(json.dumps({**m, "name": name, "lr": lr,
                                                            "test_top1": base + gain + 0.01 * seed}))
                cfg = json.loads((d / "config.json").read_text())
                (d / "config.json").write_text(json.dumps({**cfg, "run": name, "lr": lr,
                                                           "optim": {**cfg["optim"], "lr": lr}}))
    build_report([tmp_path / "runs"], tmp_path / "rep")
    text = (tmp_path / "rep" / "report.md").read_text()
    rows = versus_rows(text)
    assert len(rows) == 2 and len({tuple(r) for r in rows}) == 2
    by_lr = {r[5]: r for r in rows}
    assert by_lr["0.05"][8] == "+0.0500" and by_lr["0.05"][-1] == "`mlp_100-T4-a0.9-e2` vs `mlp_100-scratch-e2`"
    assert by_lr["0.1"][8] == "-0.0200" and by_lr["0.1"][-1] == "`mlp_100-T4-a0.9-lr0.1-e2` vs `mlp_100-scratch-lr0.1-e2`"
    v = json.loads((tmp_path / "rep" / "summary.json").read_text())["versus_scratch"]
    assert {(x["lr"], x["setting"], x["scratch_setting"]) for x in v} == {
        (0.05, "mlp_100-T4-a0.9-e2", "mlp_100-scratch-e2"), (0.1, "mlp_100-T4-a0.9-lr0.1-e2", "mlp_100-scratch-lr0.1-e2")}


def test_settings_that_differ_only_in_a_hashed_setting_have_rows_told_apart(student_runs, tmp_path):
    """Two train-student calls into one --out with another --weight-decay: the run names differ by their hash
    (mlp_100-T4-a0.9-e2-h...-s0) and nothing else in the table does. Every row of the per-run and per-setting
    tables was the same as another but for its numbers; each now ends with its run's or setting's name."""
    for tag, base in (("", 0.80), ("-habc123", 0.70)):
        for kind in ("scratch", "T4-a0.9"):
            for seed in (0, 1):
                src = student_runs.out / f"mlp_100-{kind}-e2-s{seed}"
                name = f"mlp_100-{kind}-e2{tag}-s{seed}"
                d = tmp_path / "runs" / name
                shutil.copytree(src, d)
                m = json.loads((d / "metrics.json").read_text())
                (d / "metrics.json").write_text(json.dumps({**m, "name": name, "test_top1": base + 0.01 * seed}))
                cfg = json.loads((d / "config.json").read_text())
                wd = 1e-3 if tag else cfg["optim"]["weight_decay"]
                (d / "config.json").write_text(json.dumps({**cfg, "run": name,
                                                           "optim": {**cfg["optim"], "weight_decay": wd}}))
    build_report([tmp_path / "runs"], tmp_path / "rep")
    text = (tmp_path / "rep" / "report.md").read_text()
    runs = [r for r in table_rows(text) if len(r) == 18 and r[1] != "teacher"]
    settings = [r for r in table_rows(text.split("KD against")[0]) if len(r) == 14]
    assert len(runs) == 8 and len({tuple(r[:10]) for r in runs}) == 4  # alike in every setting shown before
    assert {r[-1] for r in runs} == {f"`mlp_100-{k}-e2{t}-s{s}`" for k in ("scratch", "T4-a0.9")
                                    for t in ("", "-habc123") for s in (0, 1)}
    assert {r[-1]: r[10] for r in settings} == {"`mlp_100-scratch-e2`": "0.8050 ± 0.0071",
                                                "`mlp_100-T4-a0.9-e2`": "0.8050 ± 0.0071",
                                                "`mlp_100-scratch-e2-habc123`": "0.7050 ± 0.0071",
                                                "`mlp_100-T4-a0.9-e2-habc123`": "0.7050 ± 0.0071"}


def test_runs_of_one_name_from_two_caches_are_not_seeds_of_one_setting(student_runs, tmp_path):
    """The same student from two teachers' caches (or two caches of one teacher): two settings, each named by its
    cache's folder, each compared with the scratch twin of its own cache; one cache: no label, as before. Seed 0 is
    named as before 2026-12-07, without its epochs, seed 1 as today: they are seeds of one setting all the same."""
    src = student_runs.out / "mlp_100-T4-a0.9-e2-s0"
    cache = json.loads((src / "metrics.json").read_text())["cache"]
    for folder, cache_id, base in (("teacher-a", "a" * 32, 0.80), ("teacher-b", "b" * 32, 0.70)):
        for alpha, gain in ((0.0, 0.0), (0.9, 0.05)):
            for seed in (0, 1):
                d = tmp_path / folder / f"mlp_100-{alpha}-s{seed}"
                shutil.copytree(src, d)
                m = json.loads((d / "metrics.json").read_text())
                m.update(seed=seed, alpha=alpha, name=f"mlp_100-{'scratch' if alpha == 0 else 'T4-a0.9'}{'-e2' * seed}-s{seed}",
                         test_top1=base + gain + 0.01 * seed, uses_teacher=alpha > 0,
                         cache={**cache, "cache_id": cache_id, "path": f"/somewhere/{folder}"})
                (d / "metrics.json").write_text(json.dumps(m))
    build_report([tmp_path / "teacher-a", tmp_path / "teacher-b"], tmp_path / "rep")
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    groups = {g["setting"]: g for g in summary["groups"]}
    assert set(groups) == {"mlp_100-scratch-e2 [teacher-a]", "mlp_100-T4-a0.9-e2 [teacher-a]",
                           "mlp_100-scratch-e2 [teacher-b]", "mlp_100-T4-a0.9-e2 [teacher-b]"}
    assert all(g["n"] == 2 and g["seeds"] == [0, 1] for g in groups.values())
    assert groups["mlp_100-T4-a0.9-e2 [teacher-b]"]["test_top1_mean"] == pytest.approx(0.755)
    assert [v["gain"] for v in summary["versus_scratch"]] == pytest.approx([0.05, 0.05])
    roles = {r[1] for r in table_rows((tmp_path / "rep" / "report.md").read_text()) if len(r) == 18}
    assert {"KD from teacher-a (cnn_small)", "scratch, views of teacher-b"} <= roles
    build_report([tmp_path / "teacher-a"], tmp_path / "rep-a")
    assert {g["setting"] for g in json.loads((tmp_path / "rep-a" / "summary.json").read_text())["groups"]} == {
        "mlp_100-scratch-e2", "mlp_100-T4-a0.9-e2"}


def test_runs_of_one_name_with_other_settings_are_not_seeds_of_one_setting(student_runs, tmp_path):
    """One student and cache with other --arch-args (or a batch size its name leaves out), trained into two runs
    directories: two settings, each labelled with what differs, not one setting of n = 4. The same run given
    twice is counted once; a copy of a run (one setting, one seed, two places) is refused."""
    for folder, width, base in (("w4", 4, 0.8), ("w16", 16, 0.6)):
        for seed in (0, 1):
            src = student_runs.out / f"mlp_100-T4-a0.9-e2-s{seed}"
            d = tmp_path / folder / src.name
            shutil.copytree(src, d)
            m = json.loads((d / "metrics.json").read_text())
            (d / "metrics.json").write_text(json.dumps({**m, "test_top1": base + 0.01 * seed}))
            cfg = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps({**cfg, "arch_args": {"width": width}}))
    build_report([tmp_path / "w4", tmp_path / "w16"], tmp_path / "rep")
    groups = {g["setting"]: g for g in json.loads((tmp_path / "rep" / "summary.json").read_text())["groups"]}
    assert set(groups) == {"mlp_100-T4-a0.9-e2 {arch_args.width=4}", "mlp_100-T4-a0.9-e2 {arch_args.width=16}"}
    assert groups["mlp_100-T4-a0.9-e2 {arch_args.width=4}"]["test_top1_mean"] == pytest.approx(0.805)
    assert all(g["n"] == 2 for g in groups.values())
    models = {r[0] for r in table_rows((tmp_path / "rep" / "report.md").read_text()) if r[1] == "KD"}
    assert models == {"mlp_100 {arch_args.width=4}", "mlp_100 {arch_args.width=16}"}
    # one run given twice (itself and its parent): once
    res = build_report([tmp_path / "w4", tmp_path / "w4" / "mlp_100-T4-a0.9-e2-s0"], tmp_path / "rep2")
    assert res["runs"] == 2
    shutil.copytree(tmp_path / "w4", tmp_path / "w4-copy")
    with pytest.raises(KDPipeError, match=r"are one setting with one seed \(0\), the same run twice"):
        build_report([tmp_path / "w4", tmp_path / "w4-copy"], tmp_path / "rep3")


@pytest.mark.parametrize("key, value", [("batch_size", 128), ("optim", {"schedule": "step"}),
                                        ("arch_args", {"width": 4})])
def test_a_scratch_run_trained_otherwise_is_not_the_twin_of_a_kd_run(student_runs, tmp_path, key, value):
    """A KD block at batch 64 and a scratch block at batch 128 (or another schedule, other --arch-args) have the
    names of twins (the names leave these out, or only hash them): they were compared as twins, a gain that
    mixed two trainings. Now they are not twins; the same settings still are."""
    for name in ("mlp_100-scratch-e2-s0", "mlp_100-scratch-e2-s1", "mlp_100-T4-a0.9-e2-s0", "mlp_100-T4-a0.9-e2-s1"):
        shutil.copytree(student_runs.out / name, tmp_path / "runs" / name)
    build_report([tmp_path / "runs"], tmp_path / "rep")
    assert "scratch twin" in (tmp_path / "rep" / "report.md").read_text()
    for name in ("mlp_100-scratch-e2-s0", "mlp_100-scratch-e2-s1"):
        f = tmp_path / "runs" / name / "config.json"
        cfg = json.loads(f.read_text())
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
        f.write_text(json.dumps(cfg))
    build_report([tmp_path / "runs"], tmp_path / "rep2")
    text = (tmp_path / "rep2" / "report.md").read_text()
    assert "scratch twin" not in text
    assert json.loads((tmp_path / "rep2" / "summary.json").read_text())["versus_scratch"] == []


def test_a_setting_of_one_run_has_no_std_not_a_std_of_zero(student_runs, tmp_path):
    """Two seeds of KD beside one scratch run: the scratch setting's cell said '± 0.0000', as if its runs agreed
    exactly; one run has no sample std, and the table and summary.json say so."""
    for name in ("mlp_100-scratch-e2-s0", "mlp_100-T4-a0.9-e2-s0", "mlp_100-T4-a0.9-e2-s1"):
        shutil.copytree(student_runs.out / name, tmp_path / "runs" / name)
    res = build_report([tmp_path / "runs"], tmp_path / "rep")
    rows = {r[1]: r for r in table_rows((tmp_path / "rep" / "report.md").read_text()) if len(r) == 14}
    m = json.loads((tmp_path / "runs" / "mlp_100-scratch-e2-s0" / "metrics.json").read_text())
    assert rows["scratch"][9:12] == ["1", f"{m['test_top1']:.4f} (one value: no std)",
                                     f"{m['teacher_agreement']:.4f} (one value: no std)"]
    assert " ± " in rows["KD"][10] and "no std" not in rows["KD"][10]
    groups = {g["scratch"]: g for g in json.loads((tmp_path / "rep" / "summary.json").read_text())["groups"]}
    assert groups[True]["test_top1_std"] is None and groups[False]["test_top1_std"] > 0
    assert all(matplotlib.image.imread(p).std() > 0.01 for p in res["plots"])


def test_a_diverged_seed_is_marked_in_the_kd_against_scratch_table(student_runs, tmp_path):
    """One KD seed of three diverged (NaN weights, test top-1 at chance): the per-setting table said so, but the
    KD-vs-scratch table showed its gain, with that run in it, unmarked. Now the gain says how many diverged."""
    changes = [{"name": f"mlp_100-scratch-e2-s{s}", "seed": s, "alpha": 0.0, "uses_teacher": False,
                "test_top1": 0.80 + 0.01 * s} for s in range(3)]
    changes += [{"name": f"mlp_100-T4-a0.9-e2-s{s}", "seed": s, "test_top1": 0.85 + 0.01 * s} for s in range(3)]
    changes[4].update(diverged_epoch=2, test_top1=0.1)
    build_report([_copies(student_runs, tmp_path, changes)], tmp_path / "rep")
    text = (tmp_path / "rep" / "report.md").read_text()
    kd = next(r for r in table_rows(text) if len(r) == 14 and r[1] == "KD")
    assert kd[10].endswith("(1 diverged)")
    assert [r[8] for r in versus_rows(text)] == ["-0.2033 (1 diverged)"]
    assert json.loads((tmp_path / "rep" / "summary.json").read_text())["versus_scratch"][0]["diverged"] == 1


def test_a_folder_of_runs_folders_names_them(student_runs, tmp_path):
    """An ensemble pipeline's runs are in runs/NAME/students/<teachers>/<run>/: `kdpipe report runs/NAME/students`
    said it held no runs (no metrics.json in it or its sub-directories), which the user could see was untrue.
    Now it names the folders of runs to give."""
    for group in ("cnn+mlp", "cnn"):
        shutil.copytree(student_runs.out / "mlp_100-T4-a0.9-e2-s0", tmp_path / "students" / group / "mlp_100-T4-a0.9-e2-s0")
    import re
    d = tmp_path / "students"
    want = f"holds no runs itself, but folders of runs: give those ({d / 'cnn'} {d / 'cnn+mlp'})"
    with pytest.raises(KDPipeError, match=re.escape(want) + "$"):
        find_runs([tmp_path / "students"])
    assert len(find_runs([tmp_path / "students" / "cnn", tmp_path / "students" / "cnn+mlp"])) == 2


@pytest.mark.parametrize("text", ["[]", "null", "{}", '{"epoch": 3, "val_loss": 0.2}'])
def test_another_tools_metrics_json_is_refused_in_one_line(student_runs, tmp_path, text):
    """A metrics.json that is not a kdpipe run's (another tool's, in a folder of runs) gave a TypeError or
    KeyError traceback."""
    runs = tmp_path / "runs"
    shutil.copytree(student_runs.out / "mlp_100-scratch-e2-s1", runs / "mlp_100-scratch-e2-s1")
    (runs / "other").mkdir()
    (runs / "other" / "metrics.json").write_text(text)
    with pytest.raises(KDPipeError, match=r"other/metrics.json is not the metrics.json of a kdpipe run \(it has "
                                          r"no name, arch, .*\): give the run directories"):
        build_report([runs], tmp_path / "rep")


def test_no_gain_is_not_a_clear_gain_when_every_seed_scores_alike(student_runs, tmp_path):
    """An easy dataset: KD and scratch students both get every test sample right on every seed. The gain is 0 and
    both stds are 0; 0 >= 2 x 0 made the table say "clear gain: yes" for a gain of +0.0000."""
    changes = [{"name": f"mlp_100-scratch-e2-s{s}", "seed": s, "alpha": 0.0, "uses_teacher": False, "test_top1": 1.0}
               for s in range(3)]
    changes += [{"name": f"mlp_100-T4-a0.9-e2-s{s}", "seed": s, "test_top1": 1.0} for s in range(3)]
    build_report([_copies(student_runs, tmp_path, changes)], tmp_path / "rep")
    text = (tmp_path / "rep" / "report.md").read_text()
    assert [r[8:12] for r in versus_rows(text)] == [["+0.0000", "0.0000", "0/3", "no"]]
    v = json.loads((tmp_path / "rep" / "summary.json").read_text())["versus_scratch"]
    assert v[0]["gain"] == 0 and v[0]["larger_std"] == 0 and not v[0]["clear"]


def test_a_sweep_with_no_finished_run_is_refused_in_a_short_line(tmp_path):
    """`kdpipe report` of a sweep's RUNS_DIR while its first pass trains: every run has its config.json and no
    metrics.json yet. The refusal listed the full path of every run (40 here), not one short line."""
    runs = tmp_path / "runs"
    for i in range(40):
        (runs / f"mlp_100-T4-a0.9-lr0.{i:02d}-s0").mkdir(parents=True)
        (runs / f"mlp_100-T4-a0.9-lr0.{i:02d}-s0" / "config.json").write_text("{}")
    with pytest.raises(KDPipeError, match=r"^no finished runs yet \(unfinished: .*lr0.00-s0, .*lr0.01-s0, .*lr0.02-s0, "
                                          r"\.\.\. \(40 in all\)\): run their train-student command again") as e:
        find_runs([runs])
    assert len(str(e.value)) < 400


def test_a_report_of_runs_without_history_removes_an_earlier_reports_curves(student_runs, tmp_path):
    """A report written over an older one, of runs of a version that kept no history, left the old
    learning_curves.png (of other runs) beside a report.md that did not link it."""
    build_report([student_runs.out], tmp_path / "rep")
    assert (tmp_path / "rep" / "learning_curves.png").is_file()
    runs = _copies(student_runs, tmp_path, [{"history": []}])
    res = build_report([runs], tmp_path / "rep")
    assert not (tmp_path / "rep" / "learning_curves.png").exists()
    assert {p.split("/")[-1] for p in res["plots"]} == {"accuracy_vs_parameters.png", "accuracy.png"}


@pytest.mark.parametrize("shapes, unit", [([[4], [4]], "row"), ([[1, 28, 28], [4]], "sample")])
def test_latency_is_per_row_for_a_feature_table(student_runs, tmp_path, shapes, unit):
    """The latency column said ms/image of a CSV's rows; runs of images and of rows (--mix-datasets) share
    "sample"."""
    changes = []
    for i, shape in enumerate(shapes):
        m = json.loads((student_runs.out / "mlp_100-T4-a0.9-e2-s0" / "metrics.json").read_text())
        changes.append({"teacher": {**m["teacher"], "image_shape": shape}, "dataset": f"d{i}"})
    build_report([_copies(student_runs, tmp_path, changes)], tmp_path / "rep", mix_datasets=True)
    header = next(line for line in (tmp_path / "rep" / "report.md").read_text().splitlines()
                  if line.startswith("| model"))
    assert f"CPU latency (ms/{unit})" in header


def test_the_latency_column_says_which_command_measured_each_row_and_where(student_runs, cache, tmp_path):
    """The column set a teacher's latency (dump-logits measured it) beside students' (train-student measured them),
    with nothing to say that they were two commands' measurements, maybe on two machines or thread counts. Each
    command records where it measured (cpu_name()); the report says which command measured what, and where the
    places differ, tags each cell with its place."""
    from kdpipe.evaluate import cpu_name
    manifest = json.loads((cache.path / "manifest.json").read_text())
    assert manifest["teacher"]["cpu_latency_on"] == cpu_name()
    m = json.loads((student_runs.out / "mlp_100-T4-a0.9-e2-s0" / "metrics.json").read_text())
    assert m["cpu_latency_on"] == cpu_name() and m["teacher"]["cpu_latency_on"] == cpu_name()
    build_report([student_runs.out], tmp_path / "rep")
    text = (tmp_path / "rep" / "report.md").read_text()
    assert ("CPU latency: the median of repeated forward passes at batch 1, measured by the command that wrote each "
            "row's record: a teacher's by dump-logits (when it cached the teacher's logits), a student's by "
            f"train-student (at the end of its run), on {cpu_name()}.") in text
    # the teacher's latency taken on a GPU machine's CPU, a student's on a laptop, another's by an earlier kdpipe
    gpu, laptop = "Xeon, 64 logical cores, torch threads 32", "Laptop CPU, 8 logical cores, torch threads 4"
    runs = _copies(student_runs, tmp_path, [
        {"teacher": {**m["teacher"], "cpu_latency_on": gpu}, "cpu_latency_on": laptop, "cpu_latency_ms": 0.5},
        {"teacher": {**m["teacher"], "cpu_latency_on": gpu}, "cpu_latency_on": None, "cpu_latency_ms": 0.25,
         "seed": 1, "name": "mlp_100-T4-a0.9-e2-s1"}])
    build_report([runs], tmp_path / "rep2")
    text = (tmp_path / "rep2" / "report.md").read_text()
    assert (f"at the end of its run), on more than one machine or thread count, so compare them only among rows of one "
            f"tag: [m1] {gpu}; [m2] not recorded (written by an earlier kdpipe); [m3] {laptop}.") in text  # teachers, runs
    rows = table_rows(text)
    teacher = next(r for r in rows if r[1] == "teacher")
    assert teacher[15] == f"{m['teacher']['cpu_latency_ms']:.3f} [m1]"
    assert sorted(r[15] for r in rows if r[1] == "KD" and len(r) == 18) == ["0.250 [m2]", "0.500 [m3]"]


def test_a_kd_setting_of_one_variant_meets_its_scratch_twin_of_no_variant(student_runs, tmp_path):
    """KD runs at --arch-args width=4 and width=16 (two settings, labelled {arch_args.width=...}) beside scratch runs
    at width=4 only (one setting, no label): the width=4 KD setting matches every setting of the scratch runs, but
    was compared with nothing, since its label was part of what twins must share."""
    for folder, width, names in (("w4", 4, ("scratch", "T4-a0.9")), ("w16", 16, ("T4-a0.9",))):
        for kind in names:
            for seed in (0, 1):
                src = student_runs.out / f"mlp_100-{kind}-e2-s{seed}"
                d = tmp_path / folder / src.name
                shutil.copytree(src, d)
                cfg = json.loads((d / "config.json").read_text())
                (d / "config.json").write_text(json.dumps({**cfg, "arch_args": {"width": width}}))
    build_report([tmp_path / "w4", tmp_path / "w16"], tmp_path / "rep")
    v = json.loads((tmp_path / "rep" / "summary.json").read_text())["versus_scratch"]
    assert len(v) == 1 and v[0]["seeds"] == [0, 1]
    kd = [json.loads((tmp_path / "w4" / f"mlp_100-{k}-e2-s{s}" / "metrics.json").read_text())["test_top1"]
          for k in ("T4-a0.9", "scratch") for s in (0, 1)]
    assert v[0]["gain"] == pytest.approx((kd[0] + kd[1] - kd[2] - kd[3]) / 2)


def test_the_plots_of_mixed_datasets_tell_a_settings_datasets_apart(student_runs, tmp_path, monkeypatch):
    """--mix-datasets, one setting on two datasets: its learning curves shared one colour and one legend entry, as
    seeds of one setting are drawn, and its two bars had one label; the tables name the dataset of each."""
    changes = [{"name": f"mlp_100-T4-a0.9-e2-s{s}", "seed": s} for s in (0, 1)]
    changes += [{"name": f"o-{s}", "seed": s, "dataset": "npz:/other.npz"} for s in (0, 1)]
    runs = _copies(student_runs, tmp_path, changes)
    for s in (0, 1):  # the other dataset's runs keep the setting's name
        m = json.loads((runs / f"o-{s}" / "metrics.json").read_text())
        (runs / f"o-{s}" / "metrics.json").write_text(json.dumps({**m, "name": f"mlp_100-T4-a0.9-e2-s{s}"}))
    figs = _capture_figures(monkeypatch)
    build_report([runs], tmp_path / "rep", mix_datasets=True)
    bars = [t.get_text() for t in figs["accuracy.png"].axes[0].get_yticklabels() if "teacher" not in t.get_text()]
    assert len(bars) == 2 and len(set(bars)) == 2
    ax = next(a for a in figs["learning_curves.png"].axes if a.lines)
    curves = [ln for ln in ax.lines if ln.get_linestyle() != ":"]
    assert len(curves) == 4 and len({ln.get_color() for ln in curves}) == 2
    assert len([t for t in ax.get_legend().get_texts() if "teacher" not in t.get_text()]) == 2
    points = [t.get_text() for t in figs["accuracy_vs_parameters.png"].axes[0].texts]
    assert len(points) == 2 and len(set(points)) == 2


def test_a_folder_with_files_of_a_reports_names_that_report_did_not_write_is_refused(student_runs, tmp_path):
    """report --out . in a project folder replaced its own report.md (and a plot named accuracy.png) without a word;
    a folder of kdpipe's own report is written again."""
    user = tmp_path / "project"
    user.mkdir()
    (user / "report.md").write_text("my notes")
    with pytest.raises(KDPipeError, match=rf"{user} holds report.md, which kdpipe report did not write"):
        build_report([student_runs.out], user)
    assert (user / "report.md").read_text() == "my notes" and not (user / "summary.json").exists()
    build_report([student_runs.out], tmp_path / "rep")
    build_report([student_runs.out], tmp_path / "rep")  # its own: written again
    assert (tmp_path / "rep" / "summary.json").is_file()


def test_the_best_epochs_test_top1_is_in_the_table(student_runs, tmp_path):
    """A validation split picks the best epoch, and that epoch's test top-1 is the workflow's final number (Food-11's
    evaluation/): the table showed the epoch and its validation top-1 only, beside the last epoch's test top-1."""
    runs = _copies(student_runs, tmp_path, [{"best": {"epoch": 2, "checkpoint": "student-best.pt", "val_top1": 0.5,
                                                      "test_top1": 0.625}}])
    build_report([runs], tmp_path / "rep")
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "best epoch (val top-1; its test top-1)" in text and "| 2 (0.5000; 0.6250) |" in text


def test_teacher_errors_out_of_its_own_datasets_test_split(student_runs, tmp_path):
    """One teacher file dumped over one spec with --limit 100 and in full: its test top-1 on each dataset is over
    that dataset's test split, so its errors are too; they were counted out of the first dataset's test size
    found (0.5 of 100 samples shown as 500 errors)."""
    m = json.loads((student_runs.out / "mlp_100-T4-a0.9-e2-s0" / "metrics.json").read_text())
    spec = "npz:/digits.npz"
    changes = [{"name": "small", "dataset": spec, "teacher": {**m["teacher"], "test_top1": 0.5}, "test_samples": 100,
                "data": {"fingerprint": "a" * 64, "limit": 100}},
               {"name": "full", "dataset": spec, "teacher": {**m["teacher"], "test_top1": 0.75}, "test_samples": 1000,
                "data": {"fingerprint": "b" * 64}}]
    for order in (changes, changes[::-1]):
        runs = _copies(student_runs, tmp_path / order[0]["name"], order)
        build_report([runs], tmp_path / order[0]["name"] / "rep", mix_datasets=True)
        rows = table_rows((tmp_path / order[0]["name"] / "rep" / "report.md").read_text())
        assert sorted((r[9], r[10]) for r in rows if r[1] == "teacher") == [
            (f"{spec} (--limit 100)", "0.5000 (50)"), (f"{spec} (no --limit)", "0.7500 (250)")]
