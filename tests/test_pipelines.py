"""The reference pipelines (pipelines/*.toml) run end to end on CPU: each one's Make rules, step by step,
on a few hundred generated samples (the TOML's `limit`), through the command line."""

from __future__ import annotations

import functools
import json
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import matplotlib.image
import pytest
from click.testing import CliRunner

from kdpipe import KDPipeError
from kdpipe.cli import main
from kdpipe.pipeline import load_pipeline, make_rules

REPO = Path(__file__).resolve().parent.parent


def _steps(rules: str) -> list[tuple[str, str]]:
    """(target line, command) of each rule, in order."""
    lines = rules.splitlines()
    return [(lines[i - 1], line[1:]) for i, line in enumerate(lines) if line.startswith("\t")]


def run_pipeline(spec: dict, workdir: Path) -> dict:
    """Run every step of the pipeline's rules in `workdir`; returns the report's summary.json."""
    rules = make_rules(spec)
    for target, command in _steps(rules):
        made, prereqs = target.split(":", 1)
        if not prereqs.strip() and (workdir / made).exists():
            continue  # a file the pipeline is given (a teacher): as Make, nothing to do
        if command.startswith("$(KDPIPE) "):
            r = CliRunner().invoke(main, shlex.split(command)[1:], catch_exceptions=False)
            assert r.exit_code == 0, f"{command}\n{r.output}"
        else:  # the data step: a script of this repository
            cmd = shlex.split(command.replace("$(VENV)/bin/python", sys.executable)
                              .replace("bench/", str(REPO / "bench") + "/"))
            subprocess.run(cmd, check=True, cwd=workdir, capture_output=True)
    report = workdir / "runs" / spec["name"] / "report"
    for target, _ in _steps(rules):
        for path in target.split(":")[0].replace(" &", "").split():
            assert (workdir / path).is_file(), f"{path} was not made"
    return json.loads((report / "summary.json").read_text())


def _load(name, monkeypatch, tmp_path) -> dict:
    monkeypatch.chdir(tmp_path)
    spec = load_pipeline(REPO / "pipelines" / f"{name}.toml")
    assert "limit" not in spec["data"]  # the shipped pipeline is the full run
    return spec


def _check_report(summary, spec, students: int):
    assert len(summary["runs"]) == students and len(summary["teachers"]) == 1
    report = Path("runs") / spec["name"] / "report"
    names = {p.name for p in report.glob("*.png")}
    assert {"accuracy.png", "accuracy_vs_parameters.png", "learning_curves.png"} <= names
    for p in report.glob("*.png"):
        assert matplotlib.image.imread(p).std() > 0.01
    return {(r["alpha"], r["seed"]): r for r in summary["runs"]}


def test_mnist_mlp_pipeline(mnist, monkeypatch, tmp_path):
    spec = _load("mnist-mlp", monkeypatch, tmp_path)
    assert spec["teacher"]["arch"] == "mlp:512,256" and spec["teacher"]["optimizer"] == "adam"
    spec["data"].update(spec=mnist.spec, limit=200)
    runs = _check_report(run_pipeline(spec, tmp_path), spec, 2)
    kd, scratch = runs[(1.0, 0)], runs[(0.0, 0)]
    assert kd["arch"] == "mlp:128" and kd["temperature"] == 5 and kd["optimizer"] == "adam"
    assert kd["parameters"] == 784 * 128 + 128 + 128 * 10 + 10
    assert set(kd["train_terms"]) == {"ce", "kd"} and kd["train_terms"]["ce"] == [0.0] * 5  # soft targets only
    assert len(kd["history"]) == 5 and all(r["test_top1"] > 0.2 for r in (kd, scratch))
    manifest = json.loads((tmp_path / "cache" / "mnist-mlp" / "manifest.json").read_text())
    assert manifest["dataset"]["num_samples"] == 200 and manifest["dataset"]["limit"] == 200
    assert manifest["eval"]["dataset"]["num_samples"] == 128  # the test split holds fewer than the limit
    # verify-cache reloads the same 200 samples from the manifest and re-runs the teacher on them
    r = CliRunner().invoke(main, ["verify-cache", "cache/mnist-mlp", "--teacher", "runs/mnist-mlp/teacher.pt",
                                  "--sample", "16"])
    assert r.exit_code == 0 and "OK" in r.output, r.output


def test_hinton_mnist_pipeline(mnist, monkeypatch, tmp_path):
    spec = _load("hinton-mnist", monkeypatch, tmp_path)
    assert spec["teacher"]["arch"] == "mlp_1200" and spec["teacher"]["policy"] == "crop:2"
    spec["data"].update(spec=mnist.spec, limit=128)
    spec["teacher"]["epochs"], spec["dump"]["views"], spec["students"][0]["epochs"] = 2, 3, 3  # the shape, fast
    spec["dump"]["force"] = True  # a 2-epoch teacher on 128 samples is barely above chance: the probe would refuse it
    runs = _check_report(run_pipeline(spec, tmp_path), spec, 2)
    kd = runs[(0.9, 0)]
    assert kd["arch"] == "mlp_800" and kd["temperature"] == 20 and kd["name"] == "mlp_800-T20-a0.9-e3-s0"


def test_tabular_pipeline(monkeypatch, tmp_path):
    spec = _load("tabular", monkeypatch, tmp_path)
    spec["data"]["limit"] = 300
    spec["teacher"]["epochs"] = 10
    spec["students"][0].update(epochs=5, seed=[0, 1])
    summary = run_pipeline(spec, tmp_path)  # the data step writes data/tabular.npz first
    runs = _check_report(summary, spec, 4)
    assert (tmp_path / "data" / "tabular.npz").is_file()
    t = summary["teachers"][0]
    assert t["arch"] == "mlp:128,64" and t["test_top1"] > 0.5  # 3 classes: chance is 1/3
    assert {r["arch"] for r in runs.values()} == {"mlp:32"} and {r["temperature"] for r in runs.values()} == {2}
    assert {g["n"] for g in summary["groups"]} == {2}  # seeds aggregated
    text = (tmp_path / "runs" / "tabular" / "report" / "report.md").read_text()
    assert "![accuracy](accuracy.png)" in text


def test_pipeline_data_keys_are_checked(tmp_path):
    p = tmp_path / "p.toml"
    base = (REPO / "pipelines" / "tabular.toml").read_text()
    p.write_text(base.replace("# limit = 300", "lmit = 300"))
    with pytest.raises(KDPipeError, match=r"unknown key\(s\) in \[data\]: lmit"):
        load_pipeline(p)
    p.write_text(base.replace('spec = "npz:data/tabular.npz"', 'spec = "mnist"'))
    with pytest.raises(KDPipeError, match="prepare makes the file of an npz:PATH spec"):
        load_pipeline(p)
    assert tomllib.loads(base)["data"]["prepare"].startswith("$(VENV)/bin/python bench/make_tabular_npz.py")
    # limit = 0 was dropped from the command lines, whose --limit refuses it: the steps ran on all the data
    for line, what in (("limit = 0", "limit must be 1 or more, got 0 .delete the line for all the data"),
                       ("image_size = 0", "image_size must be 1 or more, got 0")):
        p.write_text(base.replace("# limit = 300", line))
        with pytest.raises(KDPipeError, match=r"\[data\] " + what):
            load_pipeline(p)


@pytest.mark.parametrize("old, new, where", [
    ('images\npolicy = "crop-flip"', 'images\npolicy = "crop:2+flip"', r"\[dump\] padding 2"),
    ('lr = 0.05\npolicy = "crop-flip"', 'lr = 0.05\npolicy = "rotate:10"', r"\[teacher\] padding 2"),
    ("seed = 0\nlogits_dtype", "size = 24\nseed = 0\nlogits_dtype", r"\[dump\] size 24 sets the size of the "
     "resized-crop-flip alias")])
def test_a_pipelines_padding_or_size_that_its_policy_ignores_is_refused_when_it_is_read(tmp_path, old, new, where):
    """padding and size set the aliases' options only: with policy = "crop:2+flip" (or a size with crop-flip)
    they were ignored without a word, after the teacher had trained."""
    p = tmp_path / "p.toml"
    base = (REPO / "pipelines" / "default.toml").read_text()
    assert old in base
    p.write_text(base.replace(old, new))
    with pytest.raises(KDPipeError, match=where + ".*write it in the spec"):
        load_pipeline(p)


PROGRAM_TEACHER = """name = "p"
[data]
spec = "fashion-mnist"
[teacher]
file = "rgb.ts"
arch_args = "in_chans=3"
input_range = "0-1"
[dump]
views = 1
[[students]]
archs = ["nets.py:Net"]
epochs = 1
"""


def test_a_program_teachers_arch_args_reach_dump_logits(tmp_path):
    """[teacher] file = "rgb.ts" with arch_args = "in_chans=3" (an RGB TorchScript teacher on grey data): the
    arch_args went to dump-logits only with an arch, so the dump ran without them."""
    p = tmp_path / "p.toml"
    p.write_text(PROGRAM_TEACHER)
    dump = next(x for x in make_rules(load_pipeline(p)).splitlines() if "$(KDPIPE) dump-logits " in x)
    args = shlex.split(dump.strip())[2:]
    assert args[args.index("--arch-args") + 1] == "in_chans=3" and "--teacher-arch" not in args
    assert main.commands["dump-logits"].make_context("dump-logits", args).params["arch_args"] == "in_chans=3"


@pytest.mark.parametrize("given, words", [
    ('arch_args = {layers = [2, 2]}', "[[students]] #1 arch_args.layers = [2, 2]: --arch-args carries numbers"),
    ('arch_args = {act = "a,b"}', "[[students]] #1 arch_args.act = 'a,b': --arch-args carries numbers"),
    ('arch_args = "width"', "[[students]] #1 arch_args: bad architecture option 'width'"),
])
def test_arch_args_the_command_line_cannot_carry_are_refused_before_any_step(tmp_path, given, words):
    """A list, or a word holding ',' (a TOML table's value), became another --arch-args than written, refused by
    train-student only after the teacher had trained and dumped; a bad string was refused there too."""
    p = tmp_path / "p.toml"
    p.write_text(PROGRAM_TEACHER.replace('epochs = 1\n', f"epochs = 1\n{given}\n"))
    with pytest.raises(KDPipeError, match="^" + words.replace("[", r"\[").replace("]", r"\]")):
        make_rules(load_pipeline(p))


def _photo_pipeline(tmp_path, data_lines: str) -> tuple[Path, str, dict]:
    """The default pipeline on files:/photos with `data_lines` in [data], and a [compress]: its file, its rules,
    and the parsed options of train-teacher, dump-logits and compress."""
    p = tmp_path / "p.toml"
    spec = (REPO / "pipelines" / "default.toml").read_text().replace(
        'spec = "fashion-mnist"', 'spec = "files:/photos"\n' + data_lines)
    p.write_text(spec + '\n[compress]\nquantize = ["dynamic"]\n')
    rules = make_rules(load_pipeline(p))
    params = {}
    for cmd in ("train-teacher", "dump-logits", "compress"):
        line = next(x for x in rules.splitlines() if f"$(KDPIPE) {cmd} " in x)
        params[cmd] = main.commands[cmd].make_context(cmd, shlex.split(line.strip())[2:]).params
    return p, rules, params


def _student_line(rules: str) -> str:
    return next(x for x in rules.splitlines() if "$(KDPIPE) train-student " in x)


def test_a_pipelines_image_size_reaches_every_command_that_reads_the_data(tmp_path):
    """[data] image_size = S passes --image-size S to train-teacher, dump-logits and compress (train-student
    reads the decoded size from the cache), and the command line parses it."""
    _, rules, params = _photo_pipeline(tmp_path, "image_size = 64")
    assert all(params[cmd]["image_size"] == 64 for cmd in params), params
    assert "--image-size" not in _student_line(rules)


def test_a_pipelines_resize_reaches_every_command_that_reads_the_data(tmp_path):
    """[data] resize = "squash" passes --resize squash beside --image-size to train-teacher, dump-logits and compress
    (train-student reads it from the cache), and the command lines parse it; without the key, no --resize."""
    p, rules, params = _photo_pipeline(tmp_path, 'image_size = 64\nresize = "squash"')
    assert all(params[cmd]["resize"] == "squash" for cmd in params), params
    assert "--resize" not in _student_line(rules)
    spec = p.read_text()
    p.write_text(spec.replace('resize = "squash"', "resize = 1"))
    with pytest.raises(KDPipeError, match="resize"):
        load_pipeline(p)
    p.write_text(spec.replace('\nresize = "squash"', ""))
    assert "--resize" not in make_rules(load_pipeline(p))
    p.write_text(spec.replace('resize = "squash"', 'resize = "crop:72:bilinear"'))  # torchvision's Resize + CenterCrop
    assert make_rules(load_pipeline(p)).count("--resize crop:72:bilinear") == 3


def test_food_photos_pipeline(monkeypatch, tmp_path):
    """pipelines/food-photos.toml on a folder in Food-11's layout made here (no Food-11 copy can be had):
    JPEGs of 40 to 90 px named <label>_<n>.jpg in training/, validation/ and evaluation/, a torchvision
    resnet18 state_dict with 11 classes as the teacher, the student from pipelines/food_nets.py;
    validation/ picks each run's best epoch and evaluation/ gives the final number. Smaller photos and
    crops than the shipped pipeline's, so it runs in seconds."""
    import numpy as np
    import torch
    import torchvision
    from PIL import Image

    spec = _load("food-photos", monkeypatch, tmp_path)
    rng = np.random.default_rng(0)
    for split, per_class in (("training", 6), ("validation", 2), ("evaluation", 3)):
        (tmp_path / "food" / split).mkdir(parents=True)
        for label in range(11):
            for i in range(per_class):
                h, w = (int(v) for v in rng.integers(40, 91, 2))
                px = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) // 2 + np.uint8(label * 11)
                Image.fromarray(px).save(tmp_path / "food" / split / f"{label}_{i}.jpg", quality=90)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=11).state_dict(), tmp_path / "food11_resnet18.pth")
    assert spec["teacher"]["file"] == "food11_resnet18.pth" and spec["teacher"]["arch"] == "tv:resnet18"
    spec["data"].update(spec=f"files:{tmp_path / 'food'}", image_size=40)
    spec["dump"].update(views=2, policy="pad-crop:32:symmetric+flip+rotate:15", batch_size=32,
                        force=True)  # an untrained teacher is at chance: the probe would stop the dump
    block = spec["students"][0]
    assert block["archs"] == ["pipelines/food_nets.py:DSNet"] and block["optimizer"] == "adamw"
    block.update(archs=[str(REPO / "pipelines" / "food_nets.py") + ":DSNet"], epochs=2, batch_size=16)
    assert block["val_split"] is True and "val_fraction" not in block
    assert "--val-split" in make_rules(spec)
    summary = run_pipeline(spec, tmp_path)
    runs = _check_report(summary, spec, students=2)
    manifest = json.loads((tmp_path / "cache" / "food-photos" / "manifest.json").read_text())
    from kdpipe.data import load_dataset
    val = load_dataset(spec["data"]["spec"], "val", image_size=40)
    assert val.source == str(tmp_path / "food" / "validation") and len(val) == 22
    assert manifest["dataset"]["num_samples"] == 66 and manifest["input"]["shape"] == [3, 32, 32]
    assert manifest["input"]["normalization"]["value"] == "imagenet"
    for alpha in (0, 0.5):
        r = runs[(alpha, 0)]
        assert r["arch"].endswith("food_nets.py:DSNet") and r["temperature"] == 20 and r["optimizer"] == "adamw"
        # validation/ picks the best epoch; all of training/ is trained on; evaluation/ gives test_top1
        assert r["best"]["epoch"] in (1, 2) and r["best"]["validation"] == "val_split"
        assert r["training"]["val_split"] is True and r["training"]["val_fraction"] == 0
        assert r["training"]["val_samples"] == 22 and r["train_samples"] == 66
        assert r["val_data"]["fingerprint"] == val.fingerprint and len(r["history"]) == 2
        assert all("val_top1" in e and "test_top1" in e for e in r["history"])


def test_a_missing_teacher_file_is_named_in_one_line_when_make_runs(tmp_path):
    """A [teacher] file that is not there: Make alone said "No rule to make target"; now the pipeline's
    rules say which file of which pipeline, and what to do."""
    spec = load_pipeline(REPO / "pipelines" / "food-photos.toml")
    (tmp_path / "rules.mk").write_text(make_rules(spec))
    cmd = ["make", "-s", "-f", "rules.mk", "PIPELINE=pipelines/food-photos.toml", "KDPIPE=true", "SETUP=",
           "cache/food-photos/manifest.json"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and "No rule" not in r.stderr
    assert r.stderr.splitlines()[0] == ("Error: pipelines/food-photos.toml: the [teacher] file food11_resnet18.pth "
                                        "does not exist (a path from the folder make runs in): put it there, or set "
                                        "file = \"...\" to where it is")
    (tmp_path / "food11_resnet18.pth").write_bytes(b"weights")  # there: the dump's rule runs (KDPIPE=true)
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _made_in_order(paths: list[str]) -> float:
    """Each file written ("x"), each one second newer than the one before, from 100 s ago; returns that start."""
    import os
    import time
    t0 = time.time() - 100
    for i, f in enumerate(paths):
        Path(f).parent.mkdir(parents=True, exist_ok=True)
        Path(f).write_text("x")
        os.utime(f, (t0 + i, t0 + i))
    return t0


def _make_rules_mk(pipeline: str, target: str, *flags):
    """make TARGET from rules.mk in the current folder, with a stand-in kdpipe command and no set-up."""
    return subprocess.run(["make", *flags, "-f", "rules.mk", f"PIPELINE={pipeline}", "KDPIPE=kd", "SETUP=", target],
                          capture_output=True, text=True)


def test_a_users_data_file_is_a_prerequisite_of_the_teacher_and_the_dump(monkeypatch, tmp_path):
    """[data] spec = "npz:FILE" (or csv:FILE): the file was no prerequisite, so a file edited in place reran
    nothing (stage two then refused the cache by fingerprint); now its change reruns the teacher and the dump,
    and a missing one is named in one line."""
    import os
    monkeypatch.chdir(tmp_path)
    text = (REPO / "pipelines" / "default.toml").read_text()
    (tmp_path / "default.toml").write_text(text.replace('spec = "fashion-mnist"', 'spec = "npz:data/d.npz"'))
    spec = load_pipeline(tmp_path / "default.toml")
    assert spec["data"]["spec"] == "npz:data/d.npz"
    (tmp_path / "rules.mk").write_text(make_rules(spec))

    make = functools.partial(_make_rules_mk, "default.toml", "cache/default/manifest.json")
    r = make("-s")
    assert r.returncode != 0 and r.stderr.splitlines()[0] == (
        "Error: default.toml: the [data] file data/d.npz does not exist (a path from the folder make runs in): put it "
        "there, or set spec = \"...\" to where it is")
    t0 = _made_in_order(["data/d.npz", "runs/default/teacher.pt", "cache/default/manifest.json"])
    assert "kd " not in make("-n").stdout  # up to date
    os.utime("data/d.npz", (t0 + 9, t0 + 9))  # edited in place
    steps = make("-n").stdout
    assert "kd train-teacher" in steps and "kd dump-logits" in steps
    (tmp_path / "default.toml").write_text(text.replace('spec = "fashion-mnist"', 'spec = "npz:my data/d.npz"'))
    rules = make_rules(load_pipeline(tmp_path / "default.toml"))  # a path Make cannot name: no prerequisite
    assert not any("my data" in line or " my " in line for line in rules.splitlines() if line[:1] not in ("\t", "#"))


def test_cifar10_resnet_pipeline(cifar_folder, monkeypatch, tmp_path):
    """pipelines/cifar10-resnet.toml with its own teacher training (tv:resnet50), on the generated
    CIFAR-like ImageFolder (CIFAR-10's classes, 32 x 32 RGB): resnet18 students with crop:4+flip, Adam."""
    spec = _load("cifar10-resnet", monkeypatch, tmp_path)
    assert spec["teacher"]["arch"] == "tv:resnet50" and spec["students"][0]["archs"] == ["tv:resnet18"]
    assert spec["dump"]["policy"] == "crop:4+flip" and spec["students"][0]["temperature"] == [4]
    spec["data"].update(spec=f"imagefolder:{cifar_folder}")  # 120 train images: no limit (class-sorted)
    assert spec["teacher"]["optimizer"] == "adam" and spec["teacher"]["lr"] == 1e-3
    assert spec["teacher"]["arch_args"] == "zero_init_residual=true"
    spec["teacher"].update(epochs=1, batch_size=32)
    spec["dump"].update(views=2, force=True)  # one epoch on 60 images leaves the teacher near chance
    spec["students"][0].update(epochs=2, batch_size=16)
    summary = run_pipeline(spec, tmp_path)
    runs = _check_report(summary, spec, students=2)
    assert summary["teachers"][0]["arch"] == "tv:resnet50"
    for alpha in (0, 0.8):
        r = runs[(alpha, 0)]
        assert r["arch"] == "tv:resnet18" and r["optimizer"] == "adam" and r["lr"] == 1e-4


ENSEMBLE_PIPELINE = """
name = "ens"
[data]
spec = "{spec}"
[[teacher]]
name = "cnn"
arch = "cnn_small"
epochs = 3
batch_size = 32
optimizer = "adam"
[[teacher]]
name = "mlp"
arch = "mlp_100"
epochs = 3
batch_size = 32
optimizer = "adam"
seed = 1
[dump]
views = 2
[[students]]                # both teachers, equal weights, and a scratch twin
archs = ["mlp_100"]
epochs = 2
alpha = [0, 0.9]
[[students]]                # weighted, the MLP teacher first (the primary)
archs = ["mlp_100"]
epochs = 2
teachers = ["mlp", "cnn"]
teacher_weights = [0.7, 0.3]
[[students]]                # one teacher of the two
archs = ["mlp_100"]
epochs = 2
teachers = ["cnn"]
"""


def test_an_ensemble_pipeline_runs_each_teacher_over_the_same_views(fmnist, monkeypatch, tmp_path):
    """[[teacher]] entries: each teacher trained and dumped (the second --like the first), blocks that learn
    from both (weighted or not) or from one, each teacher set in its own runs folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ens.toml").write_text(ENSEMBLE_PIPELINE.format(spec=fmnist.spec))
    spec = load_pipeline(tmp_path / "ens.toml")
    summary = run_pipeline(spec, tmp_path)
    caches = {n: json.loads((tmp_path / "cache" / "ens" / n / "manifest.json").read_text()) for n in ("cnn", "mlp")}
    assert caches["cnn"]["views"] == caches["mlp"]["views"] and caches["cnn"]["dataset"] == caches["mlp"]["dataset"]
    assert caches["cnn"]["teacher"]["fingerprint"] != caches["mlp"]["teacher"]["fingerprint"]
    students = tmp_path / "runs" / "ens" / "students"
    runs = {p.parent.relative_to(students).as_posix(): json.loads(p.read_text())
            for p in students.glob("*/*/metrics.json")}
    assert set(runs) == {"cnn+mlp/mlp_100-scratch-e2-ens2-s0", "cnn+mlp/mlp_100-T4-a0.9-e2-ens2-s0",
                         "mlp+cnn/mlp_100-T4-a0.9-e2-ens0.7_0.3-s0", "cnn/mlp_100-T4-a0.9-e2-s0"}
    weighted = runs["mlp+cnn/mlp_100-T4-a0.9-e2-ens0.7_0.3-s0"]["ensemble"]
    assert [t["weight"] for t in weighted["teachers"]] == pytest.approx([0.7, 0.3])
    assert [Path(t["cache"]).name for t in weighted["teachers"]] == ["mlp", "cnn"]
    assert "ensemble" not in runs["cnn/mlp_100-T4-a0.9-e2-s0"]
    assert len(summary["runs"]) == 4 and len(summary["teachers"]) == 2
    # the rules' second dump is --like the first's cache, made after it
    rules = make_rules(spec)
    assert (f"cache/ens/mlp/manifest.json: runs/ens/teacher-mlp.pt {fmnist.path} | $(SETUP) "
            "cache/ens/cnn/manifest.json") in rules
    assert "--like cache/ens/cnn" in rules


def test_a_new_first_teacher_of_an_ensemble_pipeline_does_not_redump_the_others(monkeypatch, tmp_path):
    """The second teacher's cache is dumped over the first's views, which the [dump] options and the data
    make: a retrained first teacher re-dumps its own cache, not the second's (a teacher pass saved); a new
    [dump] option re-dumps both, the first before the second."""
    import os
    import time
    monkeypatch.chdir(tmp_path)  # the stamps' folder

    def make_n(toml_text):
        (tmp_path / "ens.toml").write_text(toml_text)
        (tmp_path / "rules.mk").write_text(make_rules(load_pipeline(tmp_path / "ens.toml"), "stamps"))
        r = subprocess.run(["make", "-n", "-f", "rules.mk", "KDPIPE=kd", "SETUP=", "cache/ens/mlp/manifest.json"],
                           cwd=tmp_path, capture_output=True, text=True, check=True)
        return [line.split(" --out ")[1].split()[0] for line in r.stdout.splitlines() if " --out " in line]

    text = ENSEMBLE_PIPELINE.format(spec="npz:d.npz")
    assert make_n(text) == ["runs/ens/teacher-mlp.pt", "runs/ens/teacher-cnn.pt", "cache/ens/cnn", "cache/ens/mlp"]
    t0 = time.time() - 100
    for p in (tmp_path / "stamps").iterdir():
        os.utime(p, (t0, t0))
    for i, f in enumerate(["d.npz", "runs/ens/teacher-cnn.pt", "runs/ens/teacher-mlp.pt",
                           "cache/ens/cnn/manifest.json", "cache/ens/mlp/manifest.json"], 1):  # all made, in order
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
        os.utime(tmp_path / f, (t0 + i, t0 + i))
    assert make_n(text) == []
    os.utime(tmp_path / "runs/ens/teacher-cnn.pt", (t0 + 9, t0 + 9))  # the first teacher retrained
    assert make_n(text) == ["cache/ens/cnn"]
    assert make_n(text.replace("views = 2", "views = 3")) == ["cache/ens/cnn", "cache/ens/mlp"]


@pytest.mark.parametrize("change, message", [
    (lambda s: s.replace('name = "mlp"\n', ""), r"\[\[teacher\]\] #2 needs name = "),
    (lambda s: s.replace('name = "mlp"', 'name = "cnn"'), "two \\[\\[teacher\\]\\] entries are named 'cnn'"),
    (lambda s: s.replace('name = "mlp"', 'name = "a b"'), "needs name = .*got 'a b'"),
    (lambda s: s.replace('teachers = ["cnn"]', 'teachers = ["vgg"]'),
     r"\[\[students\]\] #3: teachers = \['vgg'\] must name \[\[teacher\]\] entries, each once \(the pipeline's: "
     r"cnn, mlp\)"),
    (lambda s: s.replace("[0.7, 0.3]", "[0.7, 0.2]"), r"#2: teacher_weights: .*sum to 0.9, not 1"),
    (lambda s: s.replace("[0.7, 0.3]", "[0.5, 0.3, 0.2]"), r"#2: teacher_weights: .*3 weight\(s\)"),
    (lambda s: s.replace('teachers = ["cnn"]', 'teachers = ["cnn"]\nteacher_weights = [1]'),
     "#3: teacher_weights weighs the teachers of an ensemble, and the block has one teacher"),
    (lambda s: s.replace("views = 2", "views = 2\ncodec = \"topk:3\""), "#1: an ensemble of teachers mixes dense"),
    (lambda s: s + "[compress]\nquantize = \"dynamic\"\n", r"\[compress\] compares students with one teacher"),
    (lambda s: s.replace('seed = 1', 'sed = 1'), r"unknown key\(s\) in \[\[teacher\]\] #2: sed"),
])
def test_an_ensemble_pipelines_mistakes_are_refused_when_it_is_read(tmp_path, change, message):
    p = tmp_path / "ens.toml"
    p.write_text(change(ENSEMBLE_PIPELINE.format(spec="fashion-mnist")))
    with pytest.raises(KDPipeError, match=message):
        make_rules(load_pipeline(p))


@pytest.mark.parametrize("keys", ['input_range = "0-1"', 'trust_pickle = true'])
def test_compress_of_a_teacher_file_that_is_no_kdpipe_checkpoint_is_refused_when_read(tmp_path, keys):
    """[teacher] file of a TorchScript program or pickle (a normalization, no arch) beside [compress]: make trained
    every student, then compress refused the file, which it cannot prune or quantize."""
    p = tmp_path / "mine.toml"
    p.write_text(f'name = "mine"\n[data]\nspec = "npz:d.npz"\n[teacher]\nfile = "t.pt"\n{keys}\n[dump]\nviews = 1\n'
                 'policy = "none"\n[[students]]\narchs = ["mlp:8"]\nepochs = 1\n[compress]\nquantize = "dynamic"\n')
    with pytest.raises(KDPipeError, match=r"\[compress\] takes a kdpipe checkpoint teacher, or a state dict with arch .* "
                                          r"drop \[compress\]"):
        make_rules(load_pipeline(p))
    p.write_text(p.read_text().replace("[compress]\nquantize = \"dynamic\"\n", ""))
    make_rules(load_pipeline(p))


def test_compress_of_a_state_dict_teacher_gets_its_arch_and_normalization(tmp_path):
    """A state dict teacher (file with arch) is compressed as dump-logits reads it: its arch, arch_args and
    normalization go to compress, which refused such a teacher before it took them."""
    p = tmp_path / "mine.toml"
    p.write_text('name = "mine"\n[data]\nspec = "npz:d.npz"\n[teacher]\nfile = "t.pt"\narch = "tv:resnet18"\n'
                 'arch_args = "cifar_stem=true"\nnormalize = "imagenet"\n[dump]\nviews = 1\npolicy = "none"\n'
                 '[[students]]\narchs = ["mlp:8"]\nepochs = 1\n[compress]\nquantize = "dynamic"\n')
    line = next(x for x in make_rules(load_pipeline(p)).splitlines() if "compress --teacher" in x)
    assert "--teacher-arch tv:resnet18 --arch-args cifar_stem=true --normalize imagenet" in line, line
    dump = next(x for x in make_rules(load_pipeline(p)).splitlines() if "dump-logits" in x)
    assert "--teacher-arch tv:resnet18 --arch-args cifar_stem=true --normalize imagenet" in dump, dump


def test_a_one_teacher_pipeline_refuses_teacher_picks_and_two_blocks_training_one_run(tmp_path):
    p = tmp_path / "one.toml"
    base = (REPO / "pipelines" / "mnist-mlp.toml").read_text()
    p.write_text(base + '\n[[students]]\narchs = ["mlp:128"]\nepochs = 5\nteachers = ["a"]\n')
    with pytest.raises(KDPipeError, match=r"#2: teachers picks among \[\[teacher\]\] entries; this pipeline has one"):
        load_pipeline(p)
    block = base[base.index("[[students]]"):]
    p.write_text(base + "\n" + block)  # the same block twice
    with pytest.raises(KDPipeError, match=r"\[\[students\]\] #2 would train runs/mnist-mlp/students/.* again"):
        make_rules(load_pipeline(p))


# Copies of default.toml with a fault, and what refuses each (a regular expression).
BAD_COPIES = [
    # A quoted number named other Make targets than the runs train-student wrote (train_samples = "200": the
    # students trained, then the report found no metrics.json, and every make retrained them).
    (lambda s: s.replace("train_samples = 2000", 'train_samples = "2000"'),
     r"\[\[students\]\] #1 train_samples must be a whole number, got '2000': write it without quotes"),
    (lambda s: s.replace("epochs = 30", "epochs = 2.5"), r"#1 epochs must be a whole number, got 2.5$"),
    (lambda s: s.replace("epochs = 30", "epochs = [30]"), r"#1 epochs must be a whole number, got \[30\]"),
    (lambda s: s.replace("temperature = [2]", 'temperature = "2,4"'),
     r"#1 temperature must be a number or a list of them, got '2,4': write it without quotes"),
    (lambda s: s.replace("seed = [0, 1, 2]", 'seed = ["0"]'), r"#1 seed must be a list of whole numbers"),
    (lambda s: s.replace("epochs = 10 ", 'epochs = "10" '), r"\[teacher\] epochs must be a whole number, got '10'"),
    (lambda s: s.replace("lr = 0.05", "lr = [0.05, 0.1]", 1), r"\[teacher\] lr must be a number, got \[0.05, 0.1\]"),
    (lambda s: s.replace("views = 10 ", "views = [10] "), r"\[dump\] views must be a whole number"),
    (lambda s: s.replace("# yes = true", 'yes = "no"'), r"\[dump\] yes must be true or false, got 'no'"),
    (lambda s: s.replace('spec = "fashion-mnist"', "spec = 5"), r"\[data\] spec must be a string in quotes, got 5"),
    (lambda s: s.replace('# root = "/path/to/idx/files"', "limit = 300.5"), r"\[data\] limit must be a whole"),
    # Sections and keys of the pipeline itself: a typo was ignored ([compres] ran no compress step; nmae named the
    # pipeline after its file), a table for an array of tables read its keys' letters as blocks.
    (lambda s: s.replace("# [compress]", "[compres]"), r"unknown key\(s\) or section\(s\): compres \(a pipeline has"),
    (lambda s: s.replace('name = "default"', 'nmae = "default"'), r"unknown key\(s\) or section\(s\): nmae"),
    (lambda s: s.replace("[[students]]", "[[student]]"), r"unknown key\(s\) or section\(s\): student"),
    (lambda s: s.replace("[[students]]", "[students]"), r"students are \[\[students\]\] blocks \(two brackets\)"),
    (lambda s: s.replace("[dump]", "[[dump]]"), r"\[dump\] must be one table, written \[dump\]"),
    (lambda s: s.replace("[teacher]", "teacher = 1\n[teacherx]"), r"unknown key\(s\) or section\(s\): teacherx"),
    # The name is part of every path and Make target.
    (lambda s: s.replace('name = "default"', 'name = "my run"'), r"name must be letters, .* got 'my run'"),
    (lambda s: s.replace('name = "default"', 'name = "../x"'), r"name must be letters, .* got '../x'"),
    # A block's name was taken and used nowhere: its runs are named by their settings.
    (lambda s: s.replace("[[students]]", "[[students]]\nname = \"mlps\"", 1),
     r"\[\[students\]\] #1 name = 'mlps' would name nothing: a block's runs are named by their settings \(e\.g\. "
     r"mlp_100-T2-a0\.9-e30-s0, see Run names in README\.md\): delete the line"),
    # A value of the wrong shape gave a TypeError traceback (from resolve_training, or shlex writing the rules).
    (lambda s: s.replace("lr = 0.05\n#", "lr = 0.05\noptimizer = \"adam\"\nbetas = 0.9\n#"),
     r"--betas must be two numbers in \[0, 1\), got 0.9"),
    (lambda s: s.replace("lr = 0.05\n#", "lr = 0.05\noptimizer = \"adam\"\nbetas = [[0.9]]\n#"),
     r"--betas must be two numbers"),
    # A setting of the other optimizer was dropped by the optimizer without a word.
    (lambda s: s.replace("lr = 0.05\n#", "lr = 0.05\nbetas = [0.8, 0.99]\n#"),
     r"\[\[students\]\] #1 betas is a setting of Adam and AdamW, which --optimizer sgd does not use"),
    (lambda s: s.replace("lr = 0.05\npolicy", "lr = 0.05\noptimizer = \"adamw\"\nmomentum = 0.8\npolicy"),
     r"\[teacher\] momentum is a setting of SGD, which --optimizer adamw does not use \(it takes betas and eps\)"),
    (lambda s: s.replace("# [compress]\n# quantize", "[compress]\nquantize = 3\n# quantize"),
     r"\[compress\] quantize must be a string in quotes or a list of them, got 3"),
    (lambda s: s.replace("# [compress]\n# quantize", "[compress]\nprune = [['channels']]\n# quantize"),
     r"\[compress\] prune must be a list of strings in quotes"),
    (lambda s: s.replace("# [compress]\n# quantize", "[compress]\nsparsity = {a = 0.5}\n# quantize"),
     r"\[compress\] sparsity must be a number or a list of them"),
]


@pytest.mark.parametrize("change, message", BAD_COPIES)
def test_a_copied_pipelines_wrong_types_and_misspelt_sections_are_refused_when_it_is_read(tmp_path, change, message):
    p = tmp_path / "mine.toml"
    p.write_text(change((REPO / "pipelines" / "default.toml").read_text()))
    with pytest.raises(KDPipeError, match=message):
        make_rules(load_pipeline(p))


def test_every_shipped_pipeline_passes_the_type_checks():
    from kdpipe.pipeline import check_file_name
    for path in sorted((REPO / "pipelines").glob("*.toml")):
        spec = load_pipeline(path)
        check_file_name(spec, path)
        assert make_rules(spec)


def _rules_for_make(toml: Path) -> subprocess.CompletedProcess:
    """What the Makefile runs to make a pipeline's rules: `python -m kdpipe.pipeline FILE STAMPS`."""
    import os
    return subprocess.run([sys.executable, "-m", "kdpipe.pipeline", toml.name, "stamps"], cwd=toml.parent,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "pipelines").glob("*.toml")))
def test_every_shipped_pipelines_rules_are_made_by_a_python_without_torch(tmp_path, name):
    """The Makefile makes the rules with the system's python3 (standard library only), before `make all` has set
    up the venv: a check that imported kdpipe.views (torch) broke `make all` on every fresh machine with
    "ModuleNotFoundError: No module named 'torch'"."""
    import os
    blocked = ("torch", "torchvision", "numpy", "h5py", "click", "PIL", "matplotlib")
    code = (f"import runpy, sys\nsys.modules.update(dict.fromkeys({blocked!r}))\n"
            f"sys.argv = ['kdpipe.pipeline', {str(REPO / 'pipelines' / f'{name}.toml')!r}, {str(tmp_path)!r}]\n"
            "runpy.run_module('kdpipe.pipeline', run_name='__main__', alter_sys=True)\n")
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})  # -S: no site-packages, no third-party package
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert f"runs/{name}/report/report.md" in r.stdout


def test_a_faulty_pipeline_is_refused_in_one_line_by_a_python_without_packages(tmp_path):
    """What make runs with the system's python3 before the venv exists reaches kdpipe.sweep's checks too (losses,
    training settings, view aliases): an import of torch, numpy or click on any refusal's path would turn its one
    line into a traceback on a fresh machine. Every BAD_COPIES fault, through `python -S -m kdpipe.pipeline`."""
    import os
    import re
    for i, (change, message) in enumerate(BAD_COPIES):
        folder = tmp_path / str(i)
        folder.mkdir()
        (folder / "default.toml").write_text(change((REPO / "pipelines" / "default.toml").read_text()))
        r = subprocess.run([sys.executable, "-S", "-m", "kdpipe.pipeline", "default.toml", "stamps"], cwd=folder,
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        line = r.stderr.strip()
        assert r.returncode == 1 and r.stdout == "" and line.startswith("Error: "), r.stderr
        assert "\n" not in line and re.search(message, line), (message, line)


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "pipelines").glob("*.toml")))
def test_make_n_all_reads_every_shipped_pipeline_with_a_python_without_packages(tmp_path, name):
    """`make -n all PIPELINE=...` as on a fresh machine: the rules made by a python3 without any third-party package
    (-S), read by make, with every step of the pipeline in them."""
    r = _make_in_copy(tmp_path, "-n", "all", f"PIPELINE=pipelines/{name}.toml", python=f"{sys.executable} -S")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "kdpipe dump-logits" in r.stdout and f"--out runs/{name}/report" in r.stdout, r.stdout


def test_a_copied_pipeline_that_keeps_the_originals_name_is_refused_under_make(tmp_path):
    """pipelines/mine.toml copied from default.toml with name = "default" kept: `make all PIPELINE=...mine.toml`
    retrained runs/default/teacher.pt, re-dumped cache/default and overwrote runs/default/students (every step
    --overwrite, its stamps new), then printed runs/mine/report/report.md, which does not exist."""
    text = (REPO / "pipelines" / "default.toml").read_text().replace("alpha = [0, 0.9]", "alpha = [0, 0.5]")
    (tmp_path / "mine.toml").write_text(text)
    r = _rules_for_make(tmp_path / "mine.toml")
    assert r.returncode != 0 and r.stdout == "" and not (tmp_path / "stamps").exists()
    assert r.stderr.splitlines() == ["Error: mine.toml: name = 'default' is not the file's name ('mine'): make would "
                                     "write runs/default/ and cache/default/, another pipeline's; set name = \"mine\" "
                                     "or delete the name line (or name the file default.toml)"]
    (tmp_path / "mine.toml").write_text(text.replace('name = "default"\n', ""))  # the file's name, by default
    r = _rules_for_make(tmp_path / "mine.toml")
    assert r.returncode == 0 and "--out runs/mine/students" in r.stdout, r.stderr


def test_two_pipeline_files_of_one_name_in_two_folders_do_not_overwrite_each_others_runs(tmp_path):
    """pipelines/mine.toml and exp/mine.toml are both the pipeline 'mine' under make (build/mine/, runs/mine/,
    cache/mine/): making the second retrained and overwrote the first's teacher, cache and students (every step
    --overwrite), without a word. The second is refused while the first exists; a file moved takes the name over."""
    import os
    text = (REPO / "pipelines" / "default.toml").read_text().replace('name = "default"\n', "")
    for folder in ("pipelines", "exp"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "mine.toml").write_text(text)

    def rules(toml):
        return subprocess.run([sys.executable, "-m", "kdpipe.pipeline", toml, "build/mine"], cwd=tmp_path,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert rules("pipelines/mine.toml").returncode == 0
    assert rules("./pipelines/mine.toml").returncode == 0  # the same file, however it is written
    r = rules("exp/mine.toml")
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr.splitlines() == [
        f"Error: exp/mine.toml: runs/mine/, cache/mine/ and build/mine/ are the pipeline "
        f"{os.path.realpath(tmp_path / 'pipelines' / 'mine.toml')}'s, whose teacher, cache and students make would "
        f"overwrite: name this file otherwise (e.g. mine-2.toml), or delete build/mine/source to hand them over"]
    (tmp_path / "pipelines" / "mine.toml").unlink()  # moved: exp/mine.toml is now the pipeline 'mine'
    assert rules("exp/mine.toml").returncode == 0
    (tmp_path / "pipelines" / "mine.toml").write_text(text)
    assert rules("pipelines/mine.toml").returncode == 1


def test_two_pipelines_that_prepare_one_npz_are_refused_when_the_second_is_read(tmp_path):
    """Two pipelines whose [data] prepare wrote one npz: making the second rewrote the file under the first, whose
    next make retrained its teacher on the second's data (its own prepare's stamp was older than the file). The
    second is refused when make reads it; another file, or reading the first's file without a prepare, is fine."""
    import os
    text = (REPO / "pipelines" / "tabular.toml").read_text().replace('name = "tabular"\n', "")
    assert "--out data/tabular.npz --samples 1000" in text
    (tmp_path / "pipelines").mkdir()

    def rules(name, new_text):
        (tmp_path / "pipelines" / f"{name}.toml").write_text(new_text)
        return subprocess.run([sys.executable, "-m", "kdpipe.pipeline", f"pipelines/{name}.toml", f"build/{name}"],
                              cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert rules("a", text).returncode == 0
    r = rules("b", text.replace("--samples 1000", "--samples 2000"))
    assert r.returncode == 1 and r.stdout == "" and not (tmp_path / "build" / "b").exists(), r.stderr
    assert r.stderr.splitlines() == [
        "Error: pipelines/b.toml: [data] prepare writes data/tabular.npz, which the pipeline pipelines/a.toml "
        "prepares too: each make of one would rewrite it under the other, whose teacher would then train on data its "
        "pipeline does not describe; give this spec another file and have the prepare command write that one "
        "(changed in the spec alone, the command still writes data/tabular.npz), or delete this prepare line and "
        "read the file pipelines/a.toml writes"]
    # a copy with the same command (the workflow of copying a pipeline to try other students): one data, but its
    # first make ran the command again (its stamp was new), and the first pipeline's next make redid its dump and
    # students on the rewritten file; the refusal said it would train on data its pipeline does not describe
    r = rules("b", text)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "Error: pipelines/b.toml: [data] prepare writes data/tabular.npz, which the pipeline pipelines/a.toml prepares "
        "too, with the same command: making this one would run it again (its step is new here) and rewrite the file, "
        "and the next make of pipelines/a.toml would then redo its dump and students; delete this prepare line, and "
        "this pipeline reads the file pipelines/a.toml writes"]
    assert rules("a", text).returncode == 0  # the first is still made
    assert rules("b", text.replace("data/tabular.npz", "data/b.npz")).returncode == 0
    reads = "\n".join(line for line in text.splitlines() if not line.startswith("prepare"))
    assert rules("c", reads).returncode == 0


def test_a_copied_project_is_the_owner_of_its_own_pipeline_names(tmp_path):
    """cp -r proj proj2 (build/ with it): build/mine/source named proj's pipelines/mine.toml, which exists, so
    making pipelines/mine.toml in proj2 (its own runs/, cache/) was refused as another pipeline's outputs. The file is
    recorded relative to the project, as runs/ and cache/ are; another file of the name in the copy is refused."""
    import os
    import shutil
    text = (REPO / "pipelines" / "default.toml").read_text().replace('name = "default"\n', "")
    proj = tmp_path / "proj"
    (proj / "pipelines").mkdir(parents=True)
    (proj / "pipelines" / "mine.toml").write_text(text)

    def rules(where, toml):
        return subprocess.run([sys.executable, "-m", "kdpipe.pipeline", toml, "build/mine"], cwd=where,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert rules(proj, "pipelines/mine.toml").returncode == 0
    shutil.copytree(proj, tmp_path / "proj2")
    r = rules(tmp_path / "proj2", "pipelines/mine.toml")
    assert r.returncode == 0, r.stderr
    (tmp_path / "proj2" / "exp").mkdir()
    (tmp_path / "proj2" / "exp" / "mine.toml").write_text(text)
    r = rules(tmp_path / "proj2", "exp/mine.toml")
    assert r.returncode == 1 and os.path.realpath(tmp_path / "proj2" / "pipelines" / "mine.toml") in r.stderr
    assert rules(proj, "pipelines/mine.toml").returncode == 0


@pytest.mark.parametrize("path", ["pipelines/my exp.toml", "pipelines/mnist(2).toml", "pipelines/absent.toml"])
def test_a_pipeline_path_make_cannot_use_is_refused_in_one_line(tmp_path, path):
    """A space in PIPELINE gave "No rule to make target 'pipelines/my'", a parenthesis a shell syntax error, a
    missing file "No rule to make target": now one line that says what is wrong, before any step runs."""
    import shutil
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pipelines").mkdir()
    if "absent" not in path:
        shutil.copy(REPO / "pipelines" / "mnist-mlp.toml", tmp_path / path)
    r = subprocess.run(["make", "-n", "all", f"PIPELINE={path}", f"PYTHON={sys.executable}"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode != 0 and not (tmp_path / "build").exists()
    why = "no such file" if "absent" in path else \
        "a pipeline file's path may hold only letters, digits, '_', '.', '-' and '/'"
    assert len(r.stderr.splitlines()) == 1 and f"*** PIPELINE={path}: {why}" in r.stderr, r.stderr


def _copy_repo(tmp_path: Path) -> None:
    """The repository's Makefile, pyproject.toml and pipelines in tmp_path, kdpipe/ linked."""
    import shutil
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "pipelines", tmp_path / "pipelines")
    (tmp_path / "kdpipe").symlink_to(REPO / "kdpipe")


def _make_in_copy(tmp_path: Path, *args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    """`make ARGS` in a copy of the repository (_copy_repo), with PYTHON=python."""
    _copy_repo(tmp_path)
    return subprocess.run(["make", *args, f"PYTHON={python}"], cwd=tmp_path, capture_output=True, text=True)


def test_a_pipeline_path_given_to_make_c_from_another_folder_names_where_make_looked(tmp_path):
    """`make -C ~/kdpipe all PIPELINE=mine.toml` run in the folder of mine.toml said "no such file" of a file that
    was right there: make reads PIPELINE from the folder it runs in, which the message now names."""
    repo, mine = tmp_path / "repo", tmp_path / "experiment"
    repo.mkdir(), mine.mkdir()
    _copy_repo(repo)
    (mine / "mine.toml").write_text((REPO / "pipelines" / "mnist-mlp.toml").read_text().replace("mnist-mlp", "mine"))
    r = subprocess.run(["make", "-C", str(repo), "-n", "all", "PIPELINE=mine.toml", f"PYTHON={sys.executable}"],
                       cwd=mine, capture_output=True, text=True)
    assert r.returncode != 0 and not (repo / "build").exists(), r.stderr
    assert f"*** PIPELINE=mine.toml: no such file in {repo} (a path from the folder make runs in;" in r.stderr


@pytest.mark.parametrize("goals", [["setup", "all"], ["data", "all"], ["test", "pipeline"]])
def test_a_set_up_goal_given_with_all_still_runs_the_pipeline(tmp_path, goals):
    """`make setup all` (or data, test) left the pipeline's rules out: all ran no step and printed "report:
    runs/mnist-mlp/report/report.md", a report that was not there."""
    r = _make_in_copy(tmp_path, "-n", *goals, "PIPELINE=pipelines/mnist-mlp.toml")
    assert r.returncode == 0, r.stderr
    assert "kdpipe train-teacher" in r.stdout and "kdpipe report" in r.stdout, r.stdout


@pytest.mark.parametrize("goal, after_data", [("all", True), ("pipeline", False), ("setup", False)])
def test_make_j_all_makes_the_set_up_and_so_every_step_after_the_default_data(tmp_path, goal, after_data):
    """`make -j all` ran data beside the pipeline, whose steps wait only for the venv ($(SETUP)): the teacher could
    start before the default data was installed. With all a goal, the venv's stamp is made after data (make's
    database says so); `make pipeline` and `make setup` still do not install data."""
    r = _make_in_copy(tmp_path, "-p", "-n", goal, "PIPELINE=pipelines/mnist-mlp.toml")
    assert r.returncode == 0, r.stderr
    rule = next(line for line in r.stdout.splitlines() if line.startswith(".venv/.kdpipe-setup:"))
    assert rule.endswith("| data") == after_data, rule


def test_make_clean_works_where_the_cache_folder_was_deleted(tmp_path):
    """`find cache` failed (make: *** [clean] Error 1) once a user had removed cache/ by hand."""
    _copy_repo(tmp_path)
    (tmp_path / "runs").mkdir()
    r = subprocess.run(["make", "clean"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and not (tmp_path / "runs").exists(), r.stderr
    (tmp_path / "cache" / "x").mkdir(parents=True)
    (tmp_path / "cache" / ".gitkeep").touch()
    r = subprocess.run(["make", "clean"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and [p.name for p in (tmp_path / "cache").iterdir()] == [".gitkeep"], r.stderr


@pytest.mark.parametrize("goals", [["clean", "all"], ["distclean", "pipeline"]])
def test_clean_given_with_all_is_refused_in_one_line(tmp_path, goals):
    """`make clean all` did nothing but clean, then printed a report path: clean removes the stamps (build/) that
    the rules read before it ran need. Now one line: run the two one after the other."""
    r = _make_in_copy(tmp_path, "-n", *goals, "PIPELINE=pipelines/mnist-mlp.toml")
    assert r.returncode != 0 and len(r.stderr.splitlines()) == 1, r.stderr
    assert f"run `make {goals[0]}` first, then `make {goals[1]}`" in r.stderr, r.stderr


@pytest.mark.parametrize("goal", ["all", "setup"])
def test_a_python_older_than_3_11_is_named_in_one_line_before_anything_runs(tmp_path, goal):
    """Ubuntu 22.04's python3 is 3.10: make all gave a traceback (No module named 'tomllib') and make test installed
    torch into a 3.10 venv before pip refused kdpipe. Now one line that names the version and what to do."""
    fake = tmp_path / "python3.10"
    fake.write_text(f"#!{sys.executable}\n"
                    "import runpy, sys\n"
                    "sys.version_info = (3, 10, 12, 'final', 0)\n"
                    "sys.modules['tomllib'] = None  # as on Python 3.10\n"
                    "flag, what, *rest = sys.argv[1:]\n"
                    "if flag == '-c':\n"
                    "    sys.argv = ['-c', *rest]\n"
                    "    exec(what)\n"
                    "elif what == 'kdpipe.pipeline':\n"
                    "    sys.argv = [what, *rest]\n"
                    "    runpy.run_module(what, run_name='__main__', alter_sys=True)\n"
                    "else:\n"
                    "    sys.exit(f'this test runs no python -m {what}')\n")
    fake.chmod(0o755)
    r = _make_in_copy(tmp_path, goal, "PIPELINE=pipelines/mnist-mlp.toml", python=str(fake))
    assert r.returncode != 0 and "Traceback" not in r.stderr and not (tmp_path / ".venv").exists(), r.stderr
    assert r.stderr.splitlines()[0] == (f"Error: PYTHON={fake} is Python 3.10, and kdpipe needs 3.11 or later: "
                                        "install one and give it, e.g. make PYTHON=python3.11"), r.stderr


@pytest.mark.parametrize("name, old, new, message", [
    ("food-photos", "food11_resnet18.pth", "resnet18 (1).pth",
     r"\[teacher\] file 'resnet18 \(1\).pth' is a Make target"),
    ("food-photos", "food11_resnet18.pth", "my teacher.pth", r"\[teacher\] file 'my teacher.pth' is a Make target"),
    ("tabular", "data/tabular.npz", "data/tab$1.npz", r"\[data\] prepare's file 'data/tab\$1.npz' is a Make target")])
def test_a_given_file_make_cannot_name_is_refused_when_the_pipeline_is_read(tmp_path, name, old, new, message):
    """A teacher file named like a browser download, 'resnet18 (1).pth', that was there: make read the rule's
    target as two files and said "the [teacher] file resnet18 (1).pth does not exist" (and the dump's command
    line, unquoted, was a shell syntax error). Now one line when the pipeline is read: rename or link it."""
    p = tmp_path / f"{name}.toml"
    p.write_text((REPO / "pipelines" / f"{name}.toml").read_text().replace(old, new))
    (tmp_path / new).parent.mkdir(exist_ok=True)
    (tmp_path / new).write_bytes(b"x")
    with pytest.raises(KDPipeError, match=message + ".*rename the file, or link it under a plain name"):
        load_pipeline(p)


@pytest.mark.parametrize("what", ["folder", "binary"])
def test_a_pipeline_path_that_is_no_text_file_is_one_line(tmp_path, monkeypatch, what):
    """make-rules '' (the current folder) gave IsADirectoryError, a teacher.pt given by mistake a UnicodeDecodeError."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher.pt").write_bytes(b"PK\x03\x04\x80\xff\xfe")
    r = CliRunner().invoke(main, ["make-rules", "" if what == "folder" else "teacher.pt"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    words = "cannot read the pipeline file ." if what == "folder" else "teacher.pt is not a text file"
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and words in r.stderr, r.stderr


@pytest.mark.parametrize("old, new, message", [
    # A typo is named with the key it is likely a typo of; a key written in another section, with its section.
    ("train_samples = 2000", "train_sample = 2000", r"#1: train_sample \(did you mean train_samples\?\)$"),
    ('archs = ["mlp_100", "mlp_800"]', 'arch = "mlp_100"\narchs = ["mlp_800"]', r"#1: arch \(did you mean archs\?\)$"),
    ("train_samples = 2000", "train_samples = 2000\nviews = 10", r"#1: views \(a key of \[dump\]\)$"),
    ("views = 10 ", "views = 10\nlr = 0.1 ", r"\[dump\]: lr \(a key of \[teacher\] or \[\[students\]\] or "
     r"\[compress\]\)$"),
    # Neither: the keys the section takes (before, only the unknown key was named, with nothing to write instead).
    ("lr = 0.05\npolicy", "lr = 0.05\nweights = 1\npolicy", r"\[teacher\]: weights \(\[teacher\] takes arch, "
     r"arch_args, .*, file, .*, warmup_epochs, weight_decay\)$"),
])
def test_an_unknown_pipeline_key_says_what_to_write_instead(tmp_path, old, new, message):
    p = tmp_path / "p.toml"
    base = (REPO / "pipelines" / "default.toml").read_text()
    assert old in base
    p.write_text(base.replace(old, new, 1))
    with pytest.raises(KDPipeError, match=r"unknown key\(s\) in .*" + message) as e:
        load_pipeline(p)
    assert "\n" not in str(e.value)


def test_make_reads_the_pipeline_it_is_given_whatever_its_files_time(tmp_path):
    """The rules were made again only when the TOML was newer than build/<name>.mk: exp/mnist-mlp.toml (the name of
    its file) ran the rules last made from pipelines/mnist-mlp.toml ("Nothing to be done" and the other pipeline's
    report), as did a TOML copied with its old time (cp -p). Now the rules follow what the file says (and a file of
    another's name, in another folder, is refused while that one exists: it would overwrite its outputs)."""
    import os
    _copy_repo(tmp_path)

    def make_n(pipeline, ok=True):
        r = subprocess.run(["make", "-n", "pipeline", f"PIPELINE={pipeline}", f"PYTHON={sys.executable}", "SETUP="],
                           cwd=tmp_path, capture_output=True, text=True)
        assert (r.returncode == 0) == ok, r.stderr
        return r.stdout + r.stderr

    assert "--epochs 5 " in make_n("pipelines/mnist-mlp.toml")
    (tmp_path / "exp").mkdir()
    mine = tmp_path / "exp" / "mnist-mlp.toml"
    mine.write_text((tmp_path / "pipelines" / "mnist-mlp.toml").read_text().replace("epochs = 5", "epochs = 7"))
    os.utime(mine, (1e9, 1e9))  # older than the rules
    assert "build/mnist-mlp/source to hand them over" in make_n("exp/mnist-mlp.toml", ok=False)
    (tmp_path / "pipelines" / "mnist-mlp.toml").unlink()  # moved to exp/: its pipeline now
    steps = make_n("exp/mnist-mlp.toml")
    assert "train-teacher" in steps and "--epochs 7 " in steps and "--epochs 5 " not in steps, steps
    assert "rules of" not in make_n("exp/mnist-mlp.toml")  # unchanged: not written again
    os.replace(mine, tmp_path / "pipelines" / "mnist-mlp.toml")  # moved back, with its old time (cp -p, mv)
    assert "--epochs 7 " in make_n("pipelines/mnist-mlp.toml")


def test_an_architecture_files_edit_reruns_the_steps_that_build_it(monkeypatch, tmp_path):
    """archs = ["pipelines/food_nets.py:DSNet"]: the file was no prerequisite, so after an edit to the student's code
    make said "Nothing to be done" and the report showed the students of the code as it was. Now its change reruns
    the students (train-student, which records the file's sha256, starts them over; a mere touch skips them), a
    teacher's file its training, and a missing one is named in one line."""
    import os
    monkeypatch.chdir(tmp_path)
    text = (REPO / "pipelines" / "mnist-mlp.toml").read_text().replace('arch = "mlp:512,256"', 'arch = "t.py:T"')
    (tmp_path / "mnist-mlp.toml").write_text(text.replace('archs = ["mlp:128"]', 'archs = ["nets/s.py:S"]'))
    (tmp_path / "rules.mk").write_text(make_rules(load_pipeline(tmp_path / "mnist-mlp.toml")))

    make = functools.partial(_make_rules_mk, "mnist-mlp.toml", "runs/mnist-mlp/report/report.md")
    r = make("-s")
    assert r.returncode != 0 and r.stderr.splitlines()[0] == (
        "Error: mnist-mlp.toml: the architecture file t.py does not exist (a path from the folder make runs in): put "
        "it there, or set arch or archs to where it is")
    runs = next(line.split(" &:")[0].split() for line in (tmp_path / "rules.mk").read_text().splitlines()
                if " &:" in line)
    made = ["t.py", "nets/s.py", "runs/mnist-mlp/teacher.pt", "cache/mnist-mlp/manifest.json", *runs,
            "runs/mnist-mlp/report/report.md"]
    t0 = _made_in_order(made)
    assert "kd " not in make("-n").stdout  # up to date
    os.utime("nets/s.py", (t0 + 20, t0 + 20))  # the student's code edited
    steps = make("-n").stdout
    assert "kd train-student" in steps and "kd train-teacher" not in steps and "kd dump-logits" not in steps, steps
    os.utime("t.py", (t0 + 30, t0 + 30))  # the teacher's
    steps = make("-n").stdout
    assert "kd train-teacher" in steps and "kd dump-logits" in steps, steps


@pytest.mark.parametrize("name, old, new, message", [
    ("cifar10-resnet", '# file = "resnet50_cifar10.pth"', 'file = "resnet50_cifar10.pth"',
     r"\[teacher\] file is a given teacher, not trained here, so batch_size, epochs, lr, optimizer, padding, policy, "
     r"schedule, seed, warmup_epochs would be ignored: delete them$"),
    ("mnist-mlp", 'policy = "none"\nseed = 0', 'policy = "none"\nseed = 0\nnormalize = "imagenet"',
     r"\[teacher\] trains a teacher \(mlp:512,256\), so normalize \(keys of a given teacher file, .*\) would be "
     r"ignored: delete them$")])
def test_a_teacher_key_that_its_rules_would_drop_is_refused_when_the_pipeline_is_read(tmp_path, name, old, new,
                                                                                    message):
    """A [teacher] file with the training keys kept (cifar10-resnet.toml's own comment says to drop them), or a trained
    teacher given normalize: the rules left them out of every command line without a word."""
    p = tmp_path / f"{name}.toml"
    base = (REPO / "pipelines" / f"{name}.toml").read_text()
    assert old in base
    p.write_text(base.replace(old, new, 1))
    with pytest.raises(KDPipeError, match=message):
        load_pipeline(p)
