"""kdpipe export: TorchScript, pt2 and ONNX files that take uint8 images (or float features) and give the
same logits as the checkpoint behind its normalization, on real Fashion-MNIST images."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdpipe import KDPipeError
from kdpipe.checkpoint import save_checkpoint
from kdpipe.cli import main
from kdpipe.export import EXPORT_PIP, export_model, load_model, preprocessing, run_exported
from kdpipe.models import create_model


def _reference(ckpt, x_uint8: np.ndarray) -> np.ndarray:
    """The checkpoint's logits, normalized here by hand (not through the exported wrapper)."""
    t = load_model(ckpt)
    x = torch.from_numpy(x_uint8).float()[:, None] / 255.0
    x = (x - torch.tensor(t.mean).view(1, -1, 1, 1)) / torch.tensor(t.std).view(1, -1, 1, 1)
    with torch.no_grad():
        return t.module(x).numpy()


def test_the_card_of_a_model_trained_under_limit_says_its_top1_is_of_those_samples(teacher_ckpt, tmp_path):
    """The card gave a checkpoint's test top-1 without a word that --limit N made it the top-1 of N test samples."""
    obj = torch.load(teacher_ckpt, weights_only=False)
    obj["dataset"] = {**obj["dataset"], "limit": 300, "limit_sampled": True}
    test = obj["settings"]["test"]  # the test split a teacher was measured on, as train-teacher records it
    obj["settings"]["test"] = {**test, "num_samples": 300, "limit": 300, "limit_sampled": True}
    torch.save(obj, tmp_path / "limited.pt")
    out = tmp_path / "m.pt"

    def card_source(ckpt) -> dict:
        r = CliRunner().invoke(main, ["export", str(ckpt), "--format", "torchscript", "--out", str(out), "--overwrite"])
        assert r.exit_code == 0, r.output
        return json.loads((tmp_path / "m.pt.json").read_text())["source"]
    source = card_source(tmp_path / "limited.pt")
    assert source["test_top1"] == obj["test_top1"]
    assert source["test_top1_on"] == "300 samples of the test split (--limit 300), not all of it"
    # --limit N above the test split's size keeps all of it (a train split of 60,000 and a test split of 10,000
    # under --limit 20000): the card said "20000 samples of the test split, not all of it"
    obj["settings"]["test"] = test
    torch.save(obj, tmp_path / "limited.pt")
    assert card_source(tmp_path / "limited.pt")["test_top1_on"] == "the test split"
    # a student's checkpoint records its cache's train split only: the test split was limited alike where it held more
    del obj["settings"]
    torch.save(obj, tmp_path / "limited.pt")
    assert card_source(tmp_path / "limited.pt")["test_top1_on"] == ("300 samples of the test split, or all of it where "
                                                                    "it holds fewer (--limit 300)")


def test_a_json_file_of_the_users_own_where_the_card_goes_is_not_replaced(teacher_ckpt, tmp_path):
    """The card of FILE is FILE.json: a JSON file of the user's own of that name was replaced without a word."""
    out, card = tmp_path / "m.pt", tmp_path / "m.pt.json"
    card.write_text('{"labels": ["mine"]}')
    args = ["export", str(teacher_ckpt), "--format", "torchscript", "--out", str(out), "--overwrite"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and not out.exists() and card.read_text() == '{"labels": ["mine"]}', r.output
    assert f"Error: {card} exists and is not a kdpipe export card, which would be written there beside {out}: " \
           "move it, or give another --out" in r.output
    card.unlink()
    assert CliRunner().invoke(main, args).exit_code == 0 and "checked_against_pytorch" in json.loads(card.read_text())
    r = CliRunner().invoke(main, args)  # kdpipe's own card is replaced with its model, as before
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("fmt,suffix", [("torchscript", ".pt"), ("pt2", ".pt2"), ("onnx", ".onnx")])
def test_an_exported_model_takes_uint8_images_and_gives_the_checkpoints_logits(fmt, suffix, fmnist, teacher_ckpt,
                                                                               tmp_path):
    out = tmp_path / f"model{suffix}"
    r = CliRunner().invoke(main, ["export", str(teacher_ckpt), "--format", fmt, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "matches PyTorch" in r.output and "uint8 (B, 1, 28, 28)" in r.output
    # the model in one file (ONNX weights are not in a side file) and its card, FILE.json
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, f"{out.name}.json"]
    card = json.loads((tmp_path / f"{out.name}.json").read_text())
    assert card["class_names"] == load_model(teacher_ckpt).info["class_names"] and len(card["class_names"]) == 10
    assert card["input"] == {"dtype": "uint8", "shape": ["B", 1, 28, 28]} and card["checked_against_pytorch"]["checked"]
    assert card["source"]["test_top1_on"] == "the test split"
    assert card["preprocessing"][-1].startswith("pass uint8 pixels 0..255 as (B, 1, 28, 28)")
    assert "its input, made as in training: grey (1 channel) images of 28 x 28" in r.output
    x = fmnist.x_test[:37][:, None]  # an odd batch size: the batch dimension is free
    got = run_exported(out, fmt, torch.from_numpy(np.ascontiguousarray(x)))
    want = _reference(teacher_ckpt, fmnist.x_test[:37])
    assert got.shape == (37, 10)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert (got.argmax(1) == want.argmax(1)).all()


def test_a_run_directory_exports_its_student(student_runs, fmnist, tmp_path):
    run = next(p for p in sorted(student_runs.out.iterdir()) if (p / "student.pt").is_file())
    out = tmp_path / "s.pt2"
    res = export_model(run, "pt2", out)
    assert res["checked"] and res["arch"] == "mlp_100"
    got = run_exported(out, "pt2", torch.from_numpy(np.ascontiguousarray(fmnist.x_test[:16][:, None])))
    np.testing.assert_allclose(got, _reference(run / "student.pt", fmnist.x_test[:16]), rtol=1e-4, atol=1e-5)


def test_preprocessing_names_the_photo_resize_and_the_clean_view(tmp_path):
    """A deployed model must get what training gave it: a photo student says how its photos were stored
    (shorter side resized, centre crop) and what its views' clean view does to them (here pad-crop's
    centre 32 x 32 of the 40 x 40 stored image; resized-crop's whole image resized)."""
    from kdpipe.views import create_policy
    model = create_model("cnn_tiny", 3, (3, 32, 32)).eval()
    photos = {"spec": "files:food", "kind": "photos", "image_size": 40, "image_shape": [3, 40, 40]}
    for policy, step in (("pad-crop:32+flip", "take the centre 32 x 32 of the 40 x 40 image"),
                         ("resized-crop:32+flip", "resize the whole 40 x 40 image to 32 x 32 (bilinear")):
        ckpt = tmp_path / "p.pt"
        save_checkpoint(ckpt, model, arch="cnn_tiny", num_classes=3, image_shape=(3, 32, 32), mean=[0.5] * 3,
                        std=[0.25] * 3, class_names=["a", "b", "c"], dataset=photos, test_top1=0.5,
                        extra={"view_policy": create_policy(policy).identity()})
        steps = preprocessing(load_model(ckpt))
        assert steps[0].startswith("decode the photo, turn it upright by its EXIF orientation and convert it to "
                                   "RGB (3 channels, in R, G, B order); resize its shorter side to 40"), steps
        assert steps[1].startswith(step) and len(steps) == 3, steps
        assert steps[2].startswith("pass uint8 pixels 0..255 as (B, 3, 32, 32)")
    # the same without a recorded policy (an older checkpoint): the step is named as unknown, not left out
    save_checkpoint(ckpt, model, arch="cnn_tiny", num_classes=3, image_shape=(3, 32, 32), mean=[0.5] * 3,
                    std=[0.25] * 3, class_names=["a", "b", "c"], dataset=photos, test_top1=0.5)
    assert "does not record its views" in preprocessing(load_model(ckpt))[1]


def test_a_new_store_kind_says_on_the_card_how_it_stored_its_samples(tmp_path, monkeypatch):
    """The card's first step comes from the data's store kind (ImageData.storage_step): a kind registered beside
    photos (here letterboxed photos) says its own, not "images of 40 x 40", which a deployment would feed as is."""
    from kdpipe.data import KINDS, ImageData

    class Letterboxed(ImageData):
        kind = "letterboxed"

        @classmethod
        def storage_step(cls, identity, colour):
            return f"convert to {colour}, resize the longer side to {identity['image_size']} and pad the rest with 0"

    monkeypatch.setitem(KINDS, Letterboxed.kind, Letterboxed)
    ckpt = tmp_path / "l.pt"
    data = {"spec": "files:food", "kind": "letterboxed", "image_size": 40, "image_shape": [3, 40, 40]}
    save_checkpoint(ckpt, create_model("cnn_tiny", 3, (3, 40, 40)).eval(), arch="cnn_tiny", num_classes=3,
                    image_shape=(3, 40, 40), mean=[0.5] * 3, std=[0.25] * 3, class_names=["a", "b", "c"], dataset=data,
                    test_top1=0.5)
    steps = preprocessing(load_model(ckpt))
    assert steps[0] == ("convert to RGB (3 channels, in R, G, B order), resize the longer side to 40 and pad the rest "
                        "with 0"), steps


def test_a_features_model_takes_float_vectors(tmp_path):
    torch.manual_seed(0)
    model = create_model("mlp_100", 3, (6,)).eval()
    mean, std = [float(i) for i in range(6)], [0.5 + i for i in range(6)]
    ckpt = tmp_path / "f.pt"
    save_checkpoint(ckpt, model, arch="mlp_100", num_classes=3, image_shape=(6,), mean=mean, std=std,
                    class_names=["a", "b", "c"], dataset={"spec": "npz:x"}, test_top1=None)
    out = tmp_path / "f.onnx"
    res = export_model(ckpt, "onnx", out)
    assert res["input"] == "float32 (B, 6)"
    x = torch.randn(9, 6) * 3 + 1
    with torch.no_grad():
        want = model((x - torch.tensor(mean)) / torch.tensor(std)).numpy()
    np.testing.assert_allclose(run_exported(out, "onnx", x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("args,message", [
    (["--format", "tflite"], "unknown export format 'tflite': use one of torchscript, onnx, pt2"),
    (["--format", "onnx", "--model", "{tmp}/nothing"], "no such run directory or model file"),
    (["--format", "onnx", "--model", "{tmp}"], "holds no model"),
])
def test_bad_export_inputs_are_one_line_errors(args, message, teacher_ckpt, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    model = str(teacher_ckpt)
    if "--model" in args:
        i = args.index("--model")
        model = args[i + 1]
        del args[i:i + 2]
    r = CliRunner().invoke(main, ["export", model, *args, "--out", str(tmp_path / "x.bin")])
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1


def test_a_missing_optional_package_says_the_pip_line(teacher_ckpt, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    r = CliRunner().invoke(main, ["export", str(teacher_ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 2
    assert r.output.strip() == f"Error: ONNX export needs the package(s) onnxscript: {EXPORT_PIP}"


def test_without_onnxruntime_the_onnx_file_is_written_and_said_unchecked(teacher_ckpt, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    r = CliRunner().invoke(main, ["export", str(teacher_ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 0, r.output
    assert "not checked: onnxruntime is not installed" in r.output and EXPORT_PIP in r.output


def test_an_export_that_differs_from_pytorch_is_refused(teacher_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr("kdpipe.export.run_exported", lambda path, fmt, x: np.zeros((len(x), 10), np.float32))
    with pytest.raises(KDPipeError, match="differed from PyTorch.*nothing was written"):
        export_model(teacher_ckpt, "torchscript", tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_a_torchscript_file_refuses_images_of_another_size_or_dtype(teacher_ckpt, fmnist, tmp_path):
    """A trace records no checks: the cnn_small file ran on 32 x 32 images and on images scaled to floats in
    0..1, giving other logits without a word (pt2 and ONNX refuse them). It says what it takes now."""
    out = tmp_path / "m.pt"
    export_model(teacher_ckpt, "torchscript", out)
    x = torch.from_numpy(np.ascontiguousarray(fmnist.x_test[:3][:, None]))
    ts = torch.jit.load(str(out))
    assert ts(x).shape == (3, 10) and ts(x[:1]).shape == (1, 10)
    bigger = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for bad, message in ((bigger, r"takes uint8 images \(B, 1, 28, 28\), got shape \[3, 1, 32, 32\]"),
                         (x.float() / 255, "another dtype: pass the uint8 pixels"),
                         (x.expand(3, 3, 28, 28), r"got shape \[3, 3, 28, 28\]"),
                         (x[:, 0], r"got shape \[3, 28, 28\]")):
        with pytest.raises(Exception, match=message):
            ts(bad)


def test_a_torchscript_features_model_refuses_vectors_of_another_length(tmp_path):
    model = create_model("mlp_100", 3, (6,)).eval()
    ckpt = tmp_path / "f.pt"
    save_checkpoint(ckpt, model, arch="mlp_100", num_classes=3, image_shape=(6,), mean=[0.0] * 6, std=[1.0] * 6,
                    class_names=["a", "b", "c"], dataset={"spec": "npz:x"}, test_top1=None)
    export_model(ckpt, "torchscript", tmp_path / "f.ts")
    ts = torch.jit.load(str(tmp_path / "f.ts"))
    assert ts(torch.randn(1, 6)).shape == (1, 3) and ts(torch.randn(4, 6, dtype=torch.float64)).shape == (4, 3)
    with pytest.raises(Exception, match=r"float feature vectors \(B, 6\), got shape \[2, 7\]"):
        ts(torch.randn(2, 7))


def test_exporting_a_run_with_a_best_epoch_says_which_epoch_it_wrote(student_runs, tmp_path):
    """A run whose validation picked an epoch holds student-best.pt beside the last epoch's student.pt: the run
    directory exports student.pt, and says so, with the file of the picked epoch."""
    import json
    import shutil
    run = tmp_path / "run"
    shutil.copytree(student_runs.out / "mlp_100-T4-a0.9-e2-s0", run)
    shutil.copy(run / "student.pt", run / "student-best.pt")
    m = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**m, "best": {"epoch": 1, "checkpoint": "student-best.pt"}}))
    r = CliRunner().invoke(main, ["export", str(run), "--format", "pt2", "--out", str(tmp_path / "m.pt2")])
    assert r.exit_code == 0, r.output
    assert (f"this is student.pt, the last epoch (2); the validation picked epoch 1 (student-best.pt): export "
            f"{run / 'student-best.pt'} for that one") in r.output
    (run / "metrics.json").write_text(json.dumps({**m, "best": {"epoch": 2, "checkpoint": "student-best.pt"}}))
    r = CliRunner().invoke(main, ["export", str(run), "--format", "pt2", "--out", str(tmp_path / "l.pt2")])
    assert r.exit_code == 0 and "note" not in r.output, r.output  # the picked epoch is the last: nothing to say
    r = CliRunner().invoke(main, ["export", str(student_runs.out / "mlp_100-T4-a0.9-e2-s0"), "--format", "pt2",
                                  "--out", str(tmp_path / "n.pt2")])
    assert r.exit_code == 0 and "note" not in r.output


def test_a_diverged_model_is_refused_saying_so(tmp_path):
    """NaN weights exported, then failed the comparison with PyTorch as an exporter fault ('report this')."""
    model = create_model("mlp_100", 3, (6,)).eval()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    ckpt = tmp_path / "f.pt"
    save_checkpoint(ckpt, model, arch="mlp_100", num_classes=3, image_shape=(6,), mean=[0.0] * 6, std=[1.0] * 6,
                    class_names=["a", "b", "c"], dataset={"spec": "npz:x"}, test_top1=None)
    r = CliRunner().invoke(main, ["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 2 and "are not finite (NaN or infinite): its training diverged" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("fmt,name", [("pt2", "m.onnx"), ("onnx", "m.pt2"), ("pt2", "m.pt")])
def test_a_file_name_of_another_format_is_refused(fmt, name, teacher_ckpt, tmp_path):
    """--format pt2 --out m.onnx wrote a torch.export program named .onnx (onnxruntime then fails on it), and
    torch.export.load wants .pt2."""
    r = CliRunner().invoke(main, ["export", str(teacher_ckpt), "--format", fmt, "--out", str(tmp_path / name)])
    assert r.exit_code == 2 and f"is not a name for {'an' if fmt == 'onnx' else 'a'} {fmt} file" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / name).exists()


def test_export_never_writes_over_its_own_checkpoint_and_replaces_a_file_only_when_asked(student_runs, tmp_path):
    """`export RUN --out RUN/student.pt` replaced the trained student with a TorchScript file without a word (the
    run then held no checkpoint), and a second export to the same FILE silently replaced the first."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(student_runs.out / "mlp_100-T4-a0.9-e2-s0", run)
    before = (run / "student.pt").read_bytes()
    for extra in ([], ["--overwrite"]):
        r = CliRunner().invoke(main, ["export", str(run), "--format", "torchscript", "--out", str(run / "student.pt"),
                                      *extra])
        assert r.exit_code == 2 and "is the checkpoint being exported: give another file name" in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
    assert (run / "student.pt").read_bytes() == before and not (run / "student.pt.json").exists()
    out = tmp_path / "m.pt2"
    assert CliRunner().invoke(main, ["export", str(run), "--format", "pt2", "--out", str(out)]).exit_code == 0
    first = out.read_bytes()
    r = CliRunner().invoke(main, ["export", str(run), "--format", "pt2", "--out", str(out)])
    assert r.exit_code == 2 and r.output.strip() == f"Error: {out} already exists: give another --out, or --overwrite " \
                                                    "to replace it"
    assert out.read_bytes() == first
    r = CliRunner().invoke(main, ["export", str(run), "--format", "pt2", "--out", str(out), "--overwrite"])
    assert r.exit_code == 0, r.output


def test_a_model_file_that_is_not_a_kdpipe_checkpoint_is_named_and_refused(teacher_ckpt, fmnist, tmp_path):
    """A .pt2 program was called 'a TorchScript file', and a state dict (or a pickled model) got dump-logits'
    advice, '--teacher-arch NAME' (or '--trust-pickle'), options that export and compress do not have."""
    loaded = load_model(teacher_ckpt)
    export_model(teacher_ckpt, "pt2", tmp_path / "m.pt2")
    export_model(teacher_ckpt, "torchscript", tmp_path / "m.ts")
    torch.save(loaded.module.state_dict(), tmp_path / "sd.pt")
    torch.save(loaded.module, tmp_path / "whole.pt")
    for name, what in (("m.pt2", "a torch.export program (.pt2)"), ("m.ts", "a TorchScript program"),
                       ("sd.pt", "a state dict or pickled model"), ("whole.pt", "a state dict or pickled model")):
        r = CliRunner().invoke(main, ["export", str(tmp_path / name), "--format", "onnx", "--out",
                                      str(tmp_path / "x.onnx")])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
        assert f"{name} is {what}" in r.output and "need a kdpipe checkpoint" in r.output, r.output
        assert "--teacher-arch" not in r.output and "--trust-pickle" not in r.output
    # compress also takes weights alone with --teacher-arch (as dump-logits): each file is named for what it is,
    # with that way on; it said 'export and compress need a kdpipe checkpoint', and a pickle was 'weights alone'
    for name, said in (("m.pt2", "m.pt2 is a torch.export program (.pt2): compress takes a kdpipe checkpoint"),
                       ("m.ts", "m.ts is a TorchScript program: compress takes a kdpipe checkpoint"),
                       ("sd.pt", "sd.pt holds weights alone (a state dict): give --teacher-arch"),
                       ("whole.pt", "whole.pt is a whole pickled model (torch.save(model)): compress takes")):
        r = CliRunner().invoke(main, ["compress", "--teacher", str(tmp_path / name), "--data", fmnist.spec, "--out",
                                      str(tmp_path / "c")])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
        assert said in r.output and "need a kdpipe checkpoint" not in r.output, r.output
        assert "--trust-pickle" not in r.output and "--teacher-arch" in r.output, r.output


def test_a_sweeps_runs_dir_and_an_unfinished_run_are_refused_saying_what_to_export(student_runs, tmp_path):
    """The RUNS_DIR of a sweep was refused as holding 'no model' (it holds four); a run directory that train-student
    had not finished (config.json and a student.pt, no metrics.json) was exported as if it were a trained run."""
    import shutil
    r = CliRunner().invoke(main, ["export", str(student_runs.out), "--format", "pt2", "--out", str(tmp_path / "m.pt2")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert f"{student_runs.out} holds 4 runs (mlp_100-T4-a0.9-e2-s0, " in r.output
    assert f"export one of them, e.g. {student_runs.out / 'mlp_100-T4-a0.9-e2-s0'}" in r.output
    run = tmp_path / "run"
    shutil.copytree(student_runs.out / "mlp_100-T4-a0.9-e2-s0", run)
    (run / "metrics.json").unlink()
    r = CliRunner().invoke(main, ["export", str(run), "--format", "pt2", "--out", str(tmp_path / "m.pt2")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "is an unfinished run (no metrics.json): run its train-student command again" in r.output
    assert not (tmp_path / "m.pt2").exists()


def test_the_cards_photo_steps_followed_by_hand_give_kdpipes_own_test_input(tmp_path):
    """The card said 'resize its shorter side to S ... and take the centre S x S', and 'take the centre T x T':
    followed by hand (the longer side rounded, the offsets floored or rounded), most non-square photos came out a
    pixel off the images kdpipe evaluated on. The card now says the rounding; followed literally here with PIL and
    numpy on the photo files, it gives exactly the clean views kdpipe's evaluation feeds the model."""
    from PIL import Image, ImageOps
    from kdpipe.data import load_dataset
    from kdpipe.evaluate import eval_params
    from kdpipe.views import create_policy
    rng = np.random.default_rng(0)
    root = tmp_path / "food"
    sizes = [(37, 50), (61, 44), (45, 45), (44, 71), (38, 59), (53, 38), (70, 47), (29, 40)]  # (w, h)
    for split in ("training", "evaluation"):
        (root / split).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / f"{i % 2}_{i}.png")
    S, T = 23, 16  # 23 - 16 is odd: the centre crop's offset is 3 (floor), not torchvision's round(3.5) = 4
    test = load_dataset(f"files:{root}", "test", None, S)
    policy = create_policy(f"pad-crop:{T}+flip")
    ckpt = tmp_path / "s.pt"
    save_checkpoint(ckpt, create_model("cnn_tiny", 2, (3, T, T)), arch="cnn_tiny", num_classes=2,
                    image_shape=(3, T, T), mean=[0.5] * 3, std=[0.25] * 3, class_names=test.class_names,
                    dataset=test.identity(), test_top1=None, extra={"view_policy": policy.identity()})
    steps = preprocessing(load_model(ckpt))
    assert f"longer side to int({S} * longer / shorter), rounded down" in steps[0], steps
    assert f"take the centre {S} x {S} from round((side - {S}) / 2) on each axis" in steps[0], steps
    assert steps[1] == f"take the centre {T} x {T} of the {S} x {S} image (rows 3 to 18 of 0 to 22; columns 3 to 18 " \
                       "of 0 to 22)", steps

    def by_hand(path):  # the card's words, one by one
        im = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        w, h = im.size
        nw, nh = (S, int(S * h / w)) if w <= h else (int(S * w / h), S)
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = round((nw - S) / 2), round((nh - S) / 2)
        stored = np.asarray(im.crop((left, top, left + S, top + S)))
        return stored[3:19, 3:19].transpose(2, 0, 1)  # rows and columns 3 to 18, channels first

    hand = np.stack([by_hand(p) for p in sorted((root / "evaluation").iterdir())])
    params = torch.from_numpy(eval_params(policy, test.image_shape, len(test)))
    seen = policy.replay(torch.from_numpy(np.array(test.images)), params, [0.0] * 3, [1 / 255] * 3)
    seen = seen.round().to(torch.uint8).numpy()  # the clean views, unnormalized
    assert seen.shape == hand.shape == (len(sizes), 3, T, T)
    assert sorted(a.tobytes() for a in seen) == sorted(a.tobytes() for a in hand)



def test_the_cards_squash_step_followed_by_hand_gives_kdpipes_stored_photos(tmp_path):
    """Photos stored with --resize squash: the card says so in words (the whole photo resized to S x S, no crop) and
    names PIL's call; followed by hand on the photo files (several aspect ratios), it gives kdpipe's stored pixels."""
    from PIL import Image, ImageOps
    from kdpipe.data import load_dataset
    rng = np.random.default_rng(0)
    root = tmp_path / "food"
    sizes = [(37, 50), (61, 44), (45, 45), (90, 20), (20, 90), (53, 38)]  # (w, h)
    for split in ("training", "evaluation"):
        (root / split).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / f"{i % 2}_{i}.png")
    S = 23
    test = load_dataset(f"files:{root}", "test", None, S, "squash")
    ckpt = tmp_path / "s.pt"
    save_checkpoint(ckpt, create_model("cnn_tiny", 2, (3, S, S)), arch="cnn_tiny", num_classes=2,
                    image_shape=(3, S, S), mean=[0.5] * 3, std=[0.25] * 3, class_names=test.class_names,
                    dataset=test.identity(), test_top1=None)
    step = preprocessing(load_model(ckpt))[0]
    assert step.startswith("decode the photo, turn it upright by its EXIF orientation and convert it to RGB (3 "
                           f"channels, in R, G, B order); resize the whole photo to {S} x {S} (PIL bicubic, "
                           "antialiased; the aspect ratio is not kept, nothing is cropped): "
                           f"img.resize(({S}, {S}), Image.BICUBIC) on the PIL image"), step
    assert "shorter side" not in step and "centre" not in step

    def by_hand(path):  # the card's words
        img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        return np.asarray(img.resize((S, S), Image.BICUBIC)).transpose(2, 0, 1)

    hand = np.stack([by_hand(p) for p in sorted((root / "evaluation").iterdir())])
    assert sorted(a.tobytes() for a in hand) == sorted(a.tobytes() for a in np.asarray(test.images))


def _photos_of_every_mode(folder, rng, sizes):
    """A photo of each kind users bring, one per (w, h) in `sizes`: RGB, grey, RGBA, palette (with a
    transparent index), EXIF-rotated JPEG and 16-bit grey PNG; named <label>_<n> for files:."""
    from PIL import Image
    folder.mkdir(parents=True)
    for i, (w, h) in enumerate(sizes):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        im, name, kind = Image.fromarray(a), folder / f"{i % 2}_{i}", i % 6
        if kind == 0:
            im.save(f"{name}.png")
        elif kind == 1:
            im.convert("L").save(f"{name}.png")
        elif kind == 2:
            Image.fromarray(np.dstack([a, rng.integers(0, 256, (h, w), dtype=np.uint8)])).save(f"{name}.png")
        elif kind == 3:
            im.quantize(32).save(f"{name}.png", transparency=3)
        elif kind == 4:
            exif = Image.Exif()
            exif[0x0112] = 6  # turned 90 degrees: stored landscape, shown portrait
            im.save(f"{name}.jpg", exif=exif)
        else:  # 16-bit grey, the full range used (a scanner's or a microscope's)
            Image.fromarray((rng.integers(0, 65536, (h, w))).astype(np.uint16)).save(f"{name}.png")


def test_the_cards_photo_steps_say_how_a_16_bit_photo_becomes_8_bits(tmp_path):
    """The card said 'convert it to RGB', and nothing of 16-bit photos: Pillow's own convert clips a 16-bit grey
    image at 255, so a deployment that followed the card fed the model a white image where kdpipe had trained and
    measured on the photo scaled to 8 bits. The card now says the rule; followed by hand with PIL and numpy on
    photos of every mode (grey among colour, RGBA, palette, EXIF-rotated, 16-bit), it gives kdpipe's pixels."""
    from PIL import Image, ImageOps
    from kdpipe.data import load_dataset
    root = tmp_path / "scans"
    sizes = [(37, 50), (61, 44), (45, 45), (44, 71), (38, 59), (53, 38), (70, 47), (29, 40), (50, 33), (40, 52),
             (33, 33), (48, 60)]
    for split in ("training", "evaluation"):
        _photos_of_every_mode(root / split, np.random.default_rng(len(split)), sizes)
    S = 24
    test = load_dataset(f"files:{root}", "test", None, S)
    ckpt = tmp_path / "s.pt"
    save_checkpoint(ckpt, create_model("cnn_tiny", 2, (3, S, S)), arch="cnn_tiny", num_classes=2,
                    image_shape=(3, S, S), mean=[0.5] * 3, std=[0.25] * 3, class_names=test.class_names,
                    dataset=test.identity(), test_top1=None)
    step = preprocessing(load_model(ckpt))[0]
    assert "16-bit grey image (PNG or TIFF, Pillow mode I;16) is brought to 8 bits before it is converted, each " \
           "value v to round(v / 257)" in step, step

    def by_hand(path):  # the card's words, one by one
        im = ImageOps.exif_transpose(Image.open(path))
        if im.mode == "I;16":
            im = Image.fromarray(np.round(np.asarray(im) / 257).astype(np.uint8))
        im = im.convert("RGB")
        w, h = im.size
        nw, nh = (S, int(S * h / w)) if w <= h else (int(S * w / h), S)
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = round((nw - S) / 2), round((nh - S) / 2)
        return np.asarray(im.crop((left, top, left + S, top + S))).transpose(2, 0, 1)

    hand = np.stack([by_hand(p) for p in sorted((root / "evaluation").iterdir())])
    assert sorted(a.tobytes() for a in np.asarray(test.images)) == sorted(a.tobytes() for a in hand)


def test_the_card_of_image_files_stored_at_their_own_size_says_how_they_were_decoded(tmp_path):
    """A folder of 20 x 20 images, loaded without --image-size (a dense copy): the card said only 'RGB images of
    20 x 20, as in files:...'. kdpipe had turned an EXIF-rotated JPEG upright and scaled a 16-bit PNG to 8 bits,
    so a deployment reading the files as they are fed the model a turned image and a white one. The card now says
    the decoding, as for photos resized with --image-size; followed by hand, it gives kdpipe's pixels."""
    from PIL import Image, ImageOps
    from kdpipe.data import load_dataset
    root = tmp_path / "tiles"
    for split in ("training", "evaluation"):
        _photos_of_every_mode(root / split, np.random.default_rng(len(split)), [(20, 20)] * 12)
    test = load_dataset(f"files:{root}", "test")
    assert test.kind == "dense"
    ckpt = tmp_path / "s.pt"
    save_checkpoint(ckpt, create_model("cnn_tiny", 2, (3, 20, 20)), arch="cnn_tiny", num_classes=2,
                    image_shape=(3, 20, 20), mean=[0.5] * 3, std=[0.25] * 3, class_names=test.class_names,
                    dataset=test.identity(), test_top1=None)
    steps = preprocessing(load_model(ckpt))
    assert steps[0].startswith("decode the image file, turn it upright by its EXIF orientation and convert it to RGB "
                               "(3 channels, in R, G, B order): 20 x 20"), steps
    assert "each value v to round(v / 257)" in steps[0] and len(steps) == 2, steps

    def by_hand(path):  # the card's words
        im = ImageOps.exif_transpose(Image.open(path))
        if im.mode == "I;16":
            im = Image.fromarray(np.round(np.asarray(im) / 257).astype(np.uint8))
        return np.asarray(im.convert("RGB")).transpose(2, 0, 1)

    hand = np.stack([by_hand(p) for p in sorted((root / "evaluation").iterdir())])
    assert sorted(a.tobytes() for a in np.asarray(test.images)) == sorted(a.tobytes() for a in hand)
    # data that is no image files keeps its one step: the images as the source holds them
    d = {**test.identity(), "spec": "npz:x.npz"}
    save_checkpoint(ckpt, create_model("cnn_tiny", 2, (3, 20, 20)), arch="cnn_tiny", num_classes=2,
                    image_shape=(3, 20, 20), mean=[0.5] * 3, std=[0.25] * 3, class_names=test.class_names,
                    dataset=d, test_top1=None)
    assert preprocessing(load_model(ckpt))[0] == "RGB (3 channels, in R, G, B order) images of 20 x 20, as in npz:x.npz"


def test_the_cards_resized_crop_step_names_a_resize_that_gives_kdpipes_pixels():
    """resized-crop's clean view resizes the whole stored image without antialiasing; the card said '(bilinear,
    without antialiasing)' only, and the bilinear resize of PIL (or of torchvision on a PIL image) antialiases
    when it shrinks: other pixels, logits some percent off. The card now names the call whose pixels are kdpipe's
    clean view (to float noise), which a deployment rounds to the uint8 the model takes."""
    import torch.nn.functional as F
    from PIL import Image
    from kdpipe.evaluate import eval_params
    from kdpipe.views import create_policy
    S, T = 40, 28
    policy = create_policy(f"resized-crop:{T}+flip")
    step = policy.clean_steps((3, S, S))[0]
    call = f"torch.nn.functional.interpolate(x.float(), size=({T}, {T}), mode='bilinear', align_corners=False)"
    assert step.startswith(f"resize the whole {S} x {S} image to {T} x {T} (bilinear, without antialiasing, as {call} "
                           "gives, then rounded to uint8"), step
    stored = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (6, 3, S, S), dtype=np.uint8))
    params = torch.from_numpy(eval_params(policy, (3, S, S), len(stored)))
    seen = policy.replay(stored, params, [0.0] * 3, [1 / 255] * 3)  # the clean view kdpipe measures, unnormalized
    hand = F.interpolate(stored.float(), size=(T, T), mode="bilinear", align_corners=False)
    assert float((hand - seen).abs().max()) < 0.01  # float noise, which rounds a value of v.5 either way
    hand = hand.round().to(torch.uint8)
    pil = np.stack([np.asarray(Image.fromarray(a.transpose(1, 2, 0)).resize((T, T), Image.Resampling.BILINEAR))
                    for a in stored.numpy()]).transpose(0, 3, 1, 2)
    assert np.abs(pil.astype(int) - hand.numpy()).max() > 8  # what the card warns of

BATCH_FIXED_NET = '''
import torch.nn as nn

class Net(nn.Module):
    def __init__(self, num_classes, image_shape=(1, 28, 28)):
        super().__init__()
        self.fc = nn.Linear(image_shape[0] * image_shape[1] * image_shape[2], num_classes)

    def forward(self, x):
        return self.fc(x.reshape(int(x.shape[0]), -1))  # a trace records the batch size as a number
'''


@pytest.mark.parametrize("fmt,suffix", [("torchscript", ".pt"), ("onnx", ".onnx"), ("pt2", ".pt2")])
def test_a_model_whose_code_fixes_the_batch_size_is_refused_in_one_line(fmt, suffix, tmp_path):
    """User code with x.reshape(int(x.shape[0]), -1) traced at batch 2: the TorchScript and ONNX files failed when
    loaded back on 5 inputs, with a traceback (and were left on disk); pt2 said 'Constraints violated (batch)!'."""
    (tmp_path / "nets.py").write_text(BATCH_FIXED_NET)
    arch = f"{tmp_path / 'nets.py'}:Net"
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, create_model(arch, 3, (1, 28, 28)), arch=arch, num_classes=3, image_shape=(1, 28, 28),
                    mean=[0.5], std=[0.25], class_names=["a", "b", "c"], dataset={"spec": "npz:x"}, test_top1=None)
    out = tmp_path / f"x{suffix}"
    r = CliRunner().invoke(main, ["export", str(ckpt), "--format", fmt, "--out", str(out)])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "the model's code turns the batch size into a number, e.g. x.reshape(int(x.shape[0]), -1)" in r.output
    if fmt != "pt2":
        assert "it runs on a batch of 2, the size it was traced at, not on one of 5" in r.output
    assert not out.exists() and not (tmp_path / f"x{suffix}.json").exists()
