"""A data source's own validation split picks the best epoch (train-student --val-split, a pipeline's
val_split): files: validation/ beside evaluation/, imagefolder val/ beside test/, csv val rows beside test
rows, npz x_val. Checked: the epoch it picks and the weights kept, that its images are never trained on,
the refusals (with --val-fraction, a source without one, a validation split that is the test split), other
validation data on a rerun, and resuming a crashed pass.

Kept cheap: 48 training photos of 8 to 11 px in 4 classes stored at 8 x 8, an untrained teacher, mlp:16
students for 4 epochs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from kdpipe import KDPipeError
from kdpipe.data import load_dataset
from kdpipe.evaluate import eval_params
from kdpipe.pipeline import make_rules
from test_reliability_helpers import run_cli, save_teacher

CLASSES, PER_CLASS = 4, {"training": 12, "validation": 4, "evaluation": 4}
SIZE = 8


def _photo(rng, label: int, size: int) -> np.ndarray:
    """A grey square photo whose bright band (rows 2c and 2c + 1 of 8, wherever a flip puts the columns) says
    its class c, with noise of its own (no two photos alike)."""
    a = rng.normal(30, 12, (SIZE, SIZE))
    a[2 * label:2 * label + 2] += 180
    return np.asarray(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).resize((size, size), Image.NEAREST))


def write_food(root: Path, splits=("training", "validation", "evaluation"), seed: int = 0) -> Path:
    """Food-11's layout: flat folders of <label>_<n>.png of varying sizes. Half the validation photos are named
    with the next class's label, so validation top-1 is not test top-1, and a student that learns the training
    data well gets half of them wrong: the epoch the validation split picks is its own."""
    for k, split in enumerate(splits):
        rng = np.random.default_rng([seed, k])
        (root / split).mkdir(parents=True)
        for label in range(CLASSES):
            for i in range(PER_CLASS[split]):
                name = (label + 1) % CLASSES if split == "validation" and i % 2 else label
                px = _photo(rng, label, int(rng.integers(SIZE, SIZE + 4)))
                Image.fromarray(px).save(root / split / f"{name}_{label}{i}.png")
    return root


def student_args(work, out: Path, *extra) -> list[str]:
    return ["train-student", "--cache", work.cache, "--student", "mlp:16", "--alpha", "0,0.5", "--epochs", "4",
            "--batch-size", "16", "--optimizer", "adam", "--lr", "0.003", "--device", "cpu", "--fuse", "off",
            "--val-split", "--checkpoint-every", "0", "--out", out, *extra]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("valsplit")
    data = write_food(root / "food")
    teacher = save_teacher(root / "teacher.pt", arch="mlp_100", num_classes=CLASSES, image_shape=(1, SIZE, SIZE))
    cache = root / "cache"
    res = run_cli(["dump-logits", "--teacher", teacher, "--data", f"files:{data}", "--image-size", SIZE,
                   "--views", 4, "--policy", "flip", "--device", "cpu", "--mean", "0.13", "--std", "0.31", "--force",
                   "--out", cache])
    assert res.exit_code == 0, res.output
    work = SimpleNamespace(root=root, data=data, cache=cache, ref=root / "ref")
    res = run_cli(student_args(work, work.ref))
    assert res.exit_code == 0, res.output
    assert "validation: the data's own validation split, 16 samples" in res.output
    return work


def _runs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if (p / "metrics.json").is_file())


def _val_top1(model_file: Path, val) -> float:
    """A saved student's top-1 on the validation folder, computed here from the checkpoint."""
    from kdpipe.checkpoint import load_teacher
    from kdpipe.engine import predict
    from kdpipe.views import create_policy

    t = load_teacher(model_file)
    pol = create_policy("flip")
    p = torch.from_numpy(eval_params(pol, val.image_shape, len(val)))
    logits = predict(t.module, torch.from_numpy(np.array(val.images)), pol, p, t.info["mean"], t.info["std"])
    return float((logits.argmax(1).numpy() == val.labels).mean())


def test_the_validation_folder_picks_the_best_epoch_and_its_weights_are_kept(work):
    val = load_dataset(f"files:{work.data}", "val", image_size=SIZE)
    assert val.kind == "photos" and val.image_shape == (1, SIZE, SIZE) and len(val) == 16  # decoded as the cache's
    assert val.source == str(work.data / "validation")
    runs = _runs(work.ref)
    assert len(runs) == 2
    varied = 0
    for d in runs:
        m = json.loads((d / "metrics.json").read_text())
        h = m["history"]
        assert [e["epoch"] for e in h] == [1, 2, 3, 4] and all("val_top1" in e and "test_top1" in e for e in h)
        best = max(h, key=lambda e: (e["val_top1"], -e["epoch"]))  # ties: the earlier epoch
        assert m["best"]["epoch"] == best["epoch"] and m["best"]["val_top1"] == best["val_top1"]
        assert m["best"]["validation"] == "val_split" and m["best"]["selected_by"] == "val_top1"
        assert m["best"]["test_top1"] == best["test_top1"] and m["test_top1"] == h[-1]["test_top1"]
        varied += len({e["val_top1"] for e in h}) > 1
        # The validation figures are the validation folder's (its labels are shifted: not the test split's).
        assert _val_top1(d / "student-best.pt", val) == pytest.approx(best["val_top1"])
        assert _val_top1(d / "student.pt", val) == pytest.approx(h[-1]["val_top1"])
        assert any(e["val_top1"] != e["test_top1"] for e in h)
        assert m["training"]["val_split"] is True and m["training"]["val_fraction"] == 0
        assert m["training"]["val_samples"] == 16 and m["train_samples"] == 48  # every training photo trained on
        assert m["val_data"]["fingerprint"] == val.fingerprint and m["val_data"]["num_samples"] == 16
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["val_split"] == {"split": "val", "num_samples": 16, "fingerprint": val.fingerprint}
        header = (d / "history.csv").read_text().splitlines()[0].split(",")
        assert "val_top1" in header
        from kdpipe.checkpoint import load_teacher
        info = load_teacher(d / "student-best.pt").info
        assert info["epoch"] == best["epoch"] and info["validation"] == "val_split"
    assert varied  # the students learn during these epochs: the epoch picked is not a tie of untrained ones


def test_the_validation_images_are_never_trained_on(work, tmp_path, monkeypatch):
    """The images the pass steps on are the cache's training photos, all of them, and none of the validation
    folder's; the validation photos are only evaluated."""
    import kdpipe.student as student

    seen = {}
    real = student.train_pass

    def spy(runs, images, labels, *a, **k):
        seen.update(images=images.clone(), rows=k.get("train_rows"))
        return real(runs, images, labels, *a, **k)

    monkeypatch.setattr(student, "train_pass", spy)
    student.train_students(work.cache, ["mlp:16"], 1, tmp_path / "runs", alphas=(0.5,), batch_size=16,
                           val_split=True, log=lambda *a: None)
    train = load_dataset(f"files:{work.data}", "train", image_size=SIZE)
    val = load_dataset(f"files:{work.data}", "val", image_size=SIZE)
    assert seen["rows"] is None  # no rows held out: all of training/ is trained on
    assert torch.equal(seen["images"], torch.from_numpy(np.array(train.images)))
    trained = {bytes(x) for x in seen["images"].numpy().reshape(len(train), -1)}
    assert not trained & {bytes(x) for x in np.array(val.images).reshape(len(val), -1)}


def one_line_error(res, *fragments: str) -> None:
    """Exit code 2 and one 'Error: ' line holding the fragments. A moved copy of the data is decoded first (and
    checked by fingerprint), so its progress lines ("  decoding ...") may come before it on stderr."""
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip() and not line.startswith("  decoding ")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def _moved(work, tmp_path, splits: dict[str, str]) -> Path:
    """A copy of the data whose folders are copies of the original's (new name -> original name)."""
    root = tmp_path / "moved"
    root.mkdir()
    for new, old in splits.items():
        shutil.copytree(work.data / old, root / new)
    return root


@pytest.mark.parametrize("case, message", [
    ("both", "--val-split and --val-fraction both choose what picks the best epoch: give one of them"),
    ("no-folder", "has no validation or val folder besides its test folder evaluation: add one to pick the best "
                  "epoch on it, or hold out part of the train split with --val-fraction F"),
    ("only-validation", "validation folder is its test split (it has no test or evaluation or eval folder): a "
                        "validation split needs a test folder besides it"),
    ("is-the-test-split", "the validation split holds the same data as the test split"),
    ("other-class", "the train split has fewer classes (4) than the validation split (5)"),
])
def test_refusals_are_one_line(work, tmp_path, case, message):
    extra = []
    if case == "both":
        extra = ["--val-fraction", "0.1"]
    elif case == "no-folder":
        extra = ["--data", f"files:{_moved(work, tmp_path, {'training': 'training', 'evaluation': 'evaluation'})}"]
    elif case == "only-validation":  # the cache's evaluation photos, now in validation/: the test split
        extra = ["--data", f"files:{_moved(work, tmp_path, {'training': 'training', 'validation': 'evaluation'})}"]
    elif case == "is-the-test-split":
        extra = ["--data", f"files:{_moved(work, tmp_path, {'training': 'training', 'evaluation': 'evaluation', 'validation': 'evaluation'})}"]
    else:
        root = _moved(work, tmp_path, {"training": "training", "evaluation": "evaluation", "validation": "validation"})
        shutil.copy(root / "validation" / "1_10.png", root / "validation" / "4_10.png")
        extra = ["--data", f"files:{root}"]
    out = tmp_path / "runs"
    one_line_error(run_cli(student_args(work, out, *extra)), message)
    assert not out.exists() or not _runs(out)


@pytest.mark.parametrize("spec, message", [
    ("fashion-mnist", "fashion-mnist has no validation split of its own (sources that can have one: "
                      "imagefolder:PATH, files:PATH, csv:FILE, npz:PATH): hold out part of the train split with "
                      "--val-fraction F instead"),
    ("cifar10", "cifar10 has no validation split of its own"),
])
def test_sources_without_a_validation_split_refuse_it(spec, message):
    with pytest.raises(KDPipeError) as e:
        load_dataset(spec, "val")
    assert str(e.value).startswith(message)


def test_imagefolder_csv_and_npz_have_a_validation_split_beside_their_test_split(tmp_path):
    rng = np.random.default_rng(1)
    # imagefolder: val/ is the validation split only beside test/
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        for c in ("cat", "dog"):
            (tmp_path / "if" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_photo(rng, 1, 6)).save(tmp_path / "if" / split / c / f"{i}.png")
    val = load_dataset(f"imagefolder:{tmp_path / 'if'}", "val")
    test = load_dataset(f"imagefolder:{tmp_path / 'if'}", "test")
    assert len(val) == 4 and len(test) == 2 and val.source.endswith("val") and val.labels.tolist() == [0, 0, 1, 1]
    shutil.rmtree(tmp_path / "if" / "test")
    with pytest.raises(KDPipeError, match=r"val folder is its test split \(it has no test folder\)"):
        load_dataset(f"imagefolder:{tmp_path / 'if'}", "val")
    # csv: val rows beside test rows
    lines = ["label,split,f1,f2"] + [f"{i % 2},{s},{i},{i * 2}" for s, n in (("train", 4), ("val", 2), ("test", 2))
                                     for i in range(n)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    val = load_dataset(f"csv:{tmp_path / 't.csv'}", "val")
    assert val.kind == "features" and np.array(val.images).tolist() == [[0, 0], [1, 2]]
    (tmp_path / "t.csv").write_text("\n".join(x for x in lines if ",test," not in x) + "\n")
    assert len(load_dataset(f"csv:{tmp_path / 't.csv'}", "test")) == 2  # the val rows are then the test split
    with pytest.raises(KDPipeError, match="has no val rows besides test rows"):
        load_dataset(f"csv:{tmp_path / 't.csv'}", "val")
    # npz: x_val, y_val
    x = rng.integers(0, 256, (6, 1, 4, 4), dtype=np.uint8)
    y = np.array([0, 1, 0, 1, 0, 1])
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:2], y_test=y[:2], x_val=x[2:5], y_val=y[2:5])
    val = load_dataset(f"npz:{tmp_path / 'd.npz'}", "val")
    assert np.array_equal(val.images, x[2:5]) and val.labels.tolist() == [0, 1, 0]
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:2], y_test=y[:2])
    with pytest.raises(KDPipeError, match="holds no x_val and y_val arrays"):
        load_dataset(f"npz:{tmp_path / 'd.npz'}", "val")


def test_other_validation_data_on_a_rerun_is_refused(work, tmp_path):
    """The finished runs recorded the validation split's fingerprint: a rerun whose validation photos changed
    is refused, naming it, not skipped as finished."""
    out = tmp_path / "runs"
    shutil.copytree(work.ref, out)
    root = _moved(work, tmp_path, {"training": "training", "evaluation": "evaluation", "validation": "validation"})
    res = run_cli(student_args(work, out, "--data", f"files:{root}"))
    assert res.exit_code == 0 and "already finished" in res.output  # the same photos elsewhere: skipped
    Image.fromarray(np.full((9, 9), 7, np.uint8)).save(root / "validation" / "2_20.png")
    res = run_cli(student_args(work, out, "--data", f"files:{root}"))
    one_line_error(res, "holds 2 run(s) with other settings", "val_split.fingerprint was", "pass --overwrite")


def test_a_crashed_pass_resumes_with_the_same_history_and_best_epoch(work, tmp_path, monkeypatch):
    from kdpipe import resume

    real_save, saves = resume.PassCheckpoint.save, []

    def crash_after_two_epochs(self, *a, **k):
        real_save(self, *a, **k)
        saves.append(a[2])
        if len(saves) == 2:
            raise RuntimeError("simulated crash after a checkpoint")

    monkeypatch.setattr(resume.PassCheckpoint, "save", crash_after_two_epochs)
    out = tmp_path / "runs"
    res = run_cli(student_args(work, out))
    assert res.exit_code != 0 and len(saves) == 2
    monkeypatch.undo()
    res = run_cli(student_args(work, out))
    assert res.exit_code == 0, res.output
    assert "resuming from" in res.output and "2/4 epochs done" in res.output
    for ref in _runs(work.ref):
        d = out / ref.name
        a, b = (json.loads((x / "metrics.json").read_text()) for x in (ref, d))
        for k in ("history", "best", "val_data", "training", "test_top1"):
            assert a[k] == b[k], k
        for f in ("student.pt", "student-best.pt"):
            sa = torch.load(ref / f, weights_only=True)["state_dict"]
            sb = torch.load(d / f, weights_only=True)["state_dict"]
            assert all(torch.equal(sa[k], sb[k]) for k in sa), f


def test_a_pipeline_passes_val_split_and_refuses_it_with_val_fraction():
    spec = {"name": "x", "data": {"spec": "files:/nowhere"}, "teacher": {"file": "t.pt"}, "dump": {"views": 3},
            "students": [{"archs": ["mlp:16"], "epochs": 2, "alpha": 0.5, "val_split": True}]}
    rules = make_rules(spec)
    assert "--val-split" in rules
    plain = make_rules({**spec, "students": [{"archs": ["mlp:16"], "epochs": 2, "alpha": 0.5}]})
    assert "--val-split" not in plain
    target = next(line for line in rules.splitlines() if line.endswith("metrics.json &: cache/x/manifest.json | $(SETUP)")
                  or "metrics.json &:" in line)
    assert target.split("/")[3] != next(line for line in plain.splitlines() if "metrics.json &:" in line).split("/")[3]
    spec["students"][0]["val_fraction"] = 0.1
    with pytest.raises(KDPipeError, match="--val-split and --val-fraction"):
        make_rules(spec)


def test_the_validation_split_takes_the_colour_mode_of_the_cache_splits(tmp_path):
    """Grey training/ and validation/ photos, colour evaluation/ ones: the train and test splits are stored in
    RGB (one mode over the dataset), and so is the validation split, which then has the train split's shape."""
    rng = np.random.default_rng(2)
    for split in ("training", "validation", "evaluation"):
        (tmp_path / split).mkdir()
        for label in range(2):
            px = _photo(rng, label, SIZE)
            Image.fromarray(np.stack([px] * 3, -1) if split == "evaluation" else px).save(
                tmp_path / split / f"{label}_0.png")
    train, val = (load_dataset(f"files:{tmp_path}", s) for s in ("train", "val"))
    assert train.image_shape == val.image_shape == (3, SIZE, SIZE)
    assert np.array_equal(np.array(val.images)[:, 0], np.array(val.images)[:, 2])
