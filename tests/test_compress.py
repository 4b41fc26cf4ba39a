"""kdpipe compress: int8 quantization (dynamic, static), magnitude pruning (unstructured, channels) with
fine-tuning, and the table that measures them beside the distilled students."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from kdpipe import KDPipeError
from kdpipe.cli import main
from kdpipe.compress import (NoKernel, count_nonzero, finalize, finetune, prune_channels, prune_unstructured,
                             quantize_dynamic, quantize_static)
from kdpipe.export import load_model
from kdpipe.models import create_model
from kdpipe.views import create_policy, normalize


def _real_inputs(fmnist, loaded, split="test", n=128):
    x = torch.from_numpy(fmnist.x_test[:n] if split == "test" else fmnist.x_train[:n])[:, None]
    return normalize(x.float(), loaded.mean, loaded.std)


def _agree(a, b) -> float:
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def test_dynamic_quantization_makes_linear_layers_int8_and_keeps_predictions(fmnist, teacher_ckpt):
    t = load_model(teacher_ckpt)
    q = quantize_dynamic(t.module)
    kinds = {type(m).__name__ for m in q.modules()}
    assert "Linear" in kinds and not any(type(m) is nn.Linear for m in q.modules())
    assert not any(type(m) is nn.Linear for m in q.modules())
    x = _real_inputs(fmnist, t)
    with torch.no_grad():
        ref, got = t.module(x), q(x)
    assert _agree(ref, got) >= 0.95
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()


def test_static_quantization_runs_int8_convolutions_calibrated_on_training_images(fmnist, teacher_ckpt):
    t = load_model(teacher_ckpt)
    q = quantize_static(t.module, _real_inputs(fmnist, t, "train", 128))
    quantized = [m for m in q.modules() if type(m).__module__.startswith("torch.ao.nn.") and ".quantized." in type(m).__module__]
    assert any("Conv" in type(m).__name__ for m in quantized), "no int8 convolution in the converted model"
    assert any("Linear" in type(m).__name__ for m in quantized)
    x = _real_inputs(fmnist, t)
    with torch.no_grad():
        ref, got = t.module(x), q(x)
    assert _agree(ref, got) >= 0.95


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # control flow on values: torch.fx cannot trace it
            y = y * 2
        return self.fc(y.mean((2, 3)))


def test_a_model_the_chosen_path_cannot_quantize_is_refused_in_one_line():
    with pytest.raises(KDPipeError, match="torch.fx cannot trace it.*--quantize dynamic"):
        quantize_static(_DataDependent(), torch.randn(4, 1, 8, 8))
    with pytest.raises(KDPipeError, match="no conv or linear|has none"):
        quantize_dynamic(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_a_backend_missing_from_this_torch_is_no_kernel(monkeypatch, teacher_ckpt):
    monkeypatch.setattr("kdpipe.compress.supported_engines", lambda: ["none", "x86"])
    with pytest.raises(NoKernel, match="qnnpack is not built"):
        quantize_dynamic(load_model(teacher_ckpt).module, backend="qnnpack")


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_unstructured_pruning_zeroes_the_smallest_weights_of_the_whole_model(sparsity):
    torch.manual_seed(0)
    model = create_model("cnn_small", 10, (1, 28, 28))
    pruned = finalize(prune_unstructured(model, sparsity))
    ws = [m.weight.detach() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    ps = [m.weight.detach() for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert torch.equal(ps[-1], ws[-1])  # the classifier stays dense
    ws, ps = ws[:-1], ps[:-1]
    allw = torch.cat([w.flatten().abs() for w in ws])
    k = int(round(sparsity * allw.numel()))
    threshold = allw.sort().values[k - 1]
    for w, p in zip(ws, ps):
        assert torch.equal(p == 0, w.abs() <= threshold)  # ties aside (random floats have none)
        assert torch.equal(p[p != 0], w[p != 0])
    assert sum(int((p == 0).sum()) for p in ps) == k
    assert count_nonzero(pruned) == count_nonzero(model) - k
    assert not any(n.endswith("_orig") for n, _ in pruned.named_parameters())


class _HeadFirst(nn.Module):
    """A user's network that registers its classifier before its body."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8 * 7 * 7, 10)
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())

    def forward(self, x):
        return self.head(self.body(x))


def test_unstructured_pruning_keeps_the_layer_that_runs_last_dense_whatever_order_it_was_registered_in():
    """The classifier was taken as the last conv/linear registered: a network registering its head first had
    its classifier pruned (80% zeroed) and its last convolution kept dense, under a note saying the classifier
    was kept dense. With an example input it is the layer that runs last."""
    torch.manual_seed(0)
    model = _HeadFirst().eval()
    pruned = finalize(prune_unstructured(model, 0.8, torch.randn(2, 1, 28, 28)))
    assert torch.equal(pruned.head.weight, model.head.weight)
    assert (pruned.body[3].weight == 0).float().mean() > 0.5


def _zero_removed_inputs(model, chains_kept):
    """Hooks on the original model's readers that zero the inputs the pruned model no longer has."""
    handles = []
    for name, (kept, per_channel) in chains_kept.items():
        mod = model.get_submodule(name)

        def hook(m, args, kept=kept, per_channel=per_channel):
            x = args[0].clone()
            mask = torch.zeros(x.shape[1], dtype=torch.bool)
            cols = (torch.as_tensor(kept)[:, None] * per_channel + torch.arange(per_channel)[None]).flatten()
            mask[cols] = True
            x[:, ~mask] = 0
            return (x,)
        handles.append(mod.register_forward_pre_hook(hook))
    return handles


def _kept(w: torch.Tensor, sparsity: float) -> list[int]:
    """Reference: the output channels of largest L2 norm, numpy."""
    norms = np.linalg.norm(w.detach().numpy().reshape(len(w), -1), axis=1)
    k = max(1, int(round(len(w) * (1 - sparsity))))
    return sorted(np.argsort(-norms, kind="stable")[:k].tolist())


@pytest.mark.parametrize("arch,shape,chains", [
    # (reader, producer, features per channel) for every chain the pruner must find
    ("cnn_small", (1, 28, 28), [("features.4", "features.0", 1), ("head.1", "features.4", 4), ("head.4", "head.1", 1)]),
    ("mlp_100", (1, 28, 28), [("net.3", "net.1", 1)]),
    ("resnet20", (3, 32, 32), [(f"layers.{i}.conv2", f"layers.{i}.conv1", 1) for i in range(9)]),
])
def test_channel_pruning_removes_channels_and_equals_zeroing_them(arch, shape, chains):
    torch.manual_seed(0)
    model = create_model(arch, 10, shape).eval()
    for m in model.modules():  # non-trivial batch-norm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(6, *shape)
    pruned, layers = prune_channels(model, 0.5, x)
    assert layers == len(chains)
    kept = {reader: (_kept(model.get_submodule(prod).weight, 0.5), per) for reader, prod, per in chains}
    for reader, prod, per in chains:
        p = pruned.get_submodule(prod)
        n = model.get_submodule(prod).weight.shape[0]
        assert p.weight.shape[0] == round(n * 0.5)
        assert pruned.get_submodule(reader).weight.shape[1] == round(n * 0.5) * per
    handles = _zero_removed_inputs(model, kept)
    with torch.no_grad():
        want = model(x)
    for h in handles:
        h.remove()
    with torch.no_grad():
        got = pruned(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_channel_pruning_keeps_the_channels_of_residual_sums():
    model = create_model("resnet20", 10, (3, 32, 32)).eval()
    pruned, _ = prune_channels(model, 0.8, torch.randn(2, 3, 32, 32))
    assert pruned.get_submodule("conv1").out_channels == 16
    assert pruned.get_submodule("layers.0.conv2").out_channels == 16
    assert pruned.get_submodule("layers.0.conv1").out_channels == 3  # round(16 * 0.2)


def test_channel_pruning_keeps_the_channels_of_a_conv_whose_flattened_output_is_batch_normalized():
    """conv -> flatten -> BatchNorm1d(C*H*W) -> linear: the batch norm was cut to the kept channels' count (its
    features are C*H*W), and the pruned model failed in fine-tuning with a traceback, after the other rows' work."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.flat = nn.Conv2d(1, 4, 3, padding=1), nn.Flatten()
            self.bn, self.fc = nn.BatchNorm1d(4 * 4 * 4), nn.Linear(64, 3)

        def forward(self, x):
            return self.fc(self.bn(self.flat(torch.relu(self.conv(x)))))

    model, x = Net().eval(), torch.randn(4, 1, 4, 4)
    pruned, layers = prune_channels(model, 0.5, x)
    assert layers == 0 and pruned.get_submodule("conv").out_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x))


def test_fine_tuning_keeps_the_pruned_weights_zero_and_learns(fmnist, teacher_ckpt):
    from kdpipe.data import load_dataset

    t = load_model(teacher_ckpt)
    train = load_dataset(fmnist.spec, "train").subset(128)
    model = prune_unstructured(t.module, 0.8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask_zeros = sum(int((b.weight_mask == 0).sum()) for b in model.modules() if hasattr(b, "weight_mask"))
    finetune(model, train, create_policy("crop-flip", padding=2), t.mean, t.std, epochs=1, teacher=t.module,
             batch_size=32, log=lambda *a: None)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    model = finalize(model)
    zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert zeros >= mask_zeros


def test_fine_tuning_on_n_samples_steps_on_all_n_each_epoch(fmnist, teacher_ckpt):
    """--finetune-samples 200 with batches of 128 fine-tuned on 128 images (the last partial batch was dropped):
    every epoch now steps on all 200, in two batches of 100."""
    from kdpipe.data import load_dataset

    t = load_model(teacher_ckpt)
    train = load_dataset(fmnist.spec, "train").subset(200)
    sizes = []
    model = prune_unstructured(t.module, 0.5)
    model.register_forward_pre_hook(lambda mod, args: sizes.append(len(args[0])) if mod.training else None)
    finetune(model, train, create_policy("crop-flip", padding=2), t.mean, t.std, epochs=2, teacher=t.module,
             batch_size=128, log=lambda *a: None)
    assert sizes == [100, 100, 100, 100]


def test_compress_writes_one_row_per_model_with_its_measures(fmnist, teacher_ckpt, student_runs, tmp_path):
    out = tmp_path / "cmp"
    r = CliRunner().invoke(main, ["compress", "--teacher", str(teacher_ckpt), "--data", fmnist.spec, "--students",
                                  str(student_runs.out), "--sparsity", "0.5", "--finetune-epochs", "1",
                                  "--finetune-samples", "64", "--calibration", "64", "--repeats", "2",
                                  "--device", "auto" if not torch.cuda.is_available() else "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "compress.json").read_text())
    rows = {row["name"]: row for row in doc["rows"]}
    students = sorted(p.name for p in student_runs.out.iterdir() if (p / "metrics.json").is_file())
    assert set(rows) == {"teacher", "teacher-int8-dynamic", "teacher-int8-static", "teacher-prune-unstructured-50",
                         "teacher-prune-channels-50"} | set(students) | {f"{s}-int8-dynamic" for s in students}
    teacher = rows["teacher"]
    assert teacher["teacher_agreement"] == 1.0
    assert teacher["test_top1"] == pytest.approx(load_model(teacher_ckpt).info["test_top1"], abs=1e-6)
    for row in rows.values():
        assert row["available"], row
        assert 0 <= row["test_top1"] <= 1 and 0 <= row["teacher_agreement"] <= 1
        assert row["latency_ms_b1"] > 0 and row["latency_ms_b64"] > 0
        assert (out / "models" / row["file"]).stat().st_size == row["size_bytes"]
    un = rows["teacher-prune-unstructured-50"]
    assert un["parameters"] == teacher["parameters"]
    assert un["nonzero_parameters"] < 0.6 * teacher["parameters"]
    ch = rows["teacher-prune-channels-50"]
    assert ch["parameters"] < 0.75 * teacher["parameters"] and ch["size_bytes"] < teacher["size_bytes"]
    assert "KD from the teacher" in ch["finetune"] and doc["finetune_device"] == "cpu"
    # what else decides the fine-tuned rows (they were in no file, so a rerun could not be told apart)
    assert doc["finetune_settings"] == {"loss": "kd", "lr": 0.01, "batch_size": 128, "samples": 64,
                                        "batches_per_epoch": 1, "optimizer": "sgd", "schedule": "cosine"} and doc[
        "seed"] == 0
    assert "1 epoch(s) on 64 images, each in 1 batch(es) of 64," in ch["finetune"]
    assert rows["teacher-int8-static"]["size_bytes"] < 0.7 * teacher["size_bytes"]
    # dynamic int8 quantizes activations per batch: its accuracy depends on the batch it is measured in, said
    assert "its predictions depend on the batch: accuracy measured in batches of 256" in rows["teacher-int8-dynamic"][
        "note"]
    for s in students:  # the students' own test accuracy, as train-student measured it
        m = json.loads((student_runs.out / s / "metrics.json").read_text())
        assert rows[s]["test_top1"] == pytest.approx(m["test_top1"], abs=1e-6)
        assert rows[s]["teacher_agreement"] == pytest.approx(m["teacher_agreement"], abs=1e-6)
    md = (out / "compress.md").read_text()
    assert md.count("\n| ") == len(rows) + 1 and "ms/image at batch 64" in md and "threads" in md
    assert "| 0.000 |" not in md  # a latency under 0.1 ms keeps 3 significant digits, not 3 decimals

    assert (out / "compress.png").read_bytes()[:4] == b"\x89PNG"


def test_finetune_samples_of_a_folder_sorted_by_class_keep_every_class(fmnist, teacher_ckpt, tmp_path, monkeypatch):
    """--finetune-samples N on data sorted by class (as an ImageFolder is read) fine-tunes on a draw that
    holds every class, as --limit draws, not on the first N images, which held one class."""
    from kdpipe.compress import compress
    from kdpipe.data import load_dataset
    order = np.argsort(fmnist.y_train, kind="stable")
    path = tmp_path / "sorted.npz"
    np.savez(path, x_train=fmnist.x_train[order], y_train=fmnist.y_train[order], x_test=fmnist.x_test,
             y_test=fmnist.y_test)
    seen = []

    def spy(model, train, *args, **kwargs):
        seen.append(np.unique(train.labels))
        return model
    monkeypatch.setattr("kdpipe.compress.finetune", spy)
    train, test = load_dataset(f"npz:{path}", "train"), load_dataset(f"npz:{path}", "test")
    compress(teacher_ckpt, train, test, tmp_path / "cmp", quantize=(), prune=("unstructured",), sparsities=(0.5,),
             finetune_samples=40, repeats=1, log=lambda *a, **k: None)
    assert len(seen) == 1 and list(seen[0]) == list(range(10))


def test_a_backend_without_a_kernel_is_a_note_in_the_table(fmnist, teacher_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr("kdpipe.compress.supported_engines", lambda: ["none", "x86"])
    out = tmp_path / "cmp"
    r = CliRunner().invoke(main, ["compress", "--teacher", str(teacher_ckpt), "--data", fmnist.spec, "--prune", "none",
                                  "--backend", "qnnpack", "--repeats", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads((out / "compress.json").read_text())["rows"]}
    for name in ("teacher-int8-dynamic", "teacher-int8-static"):
        assert not rows[name]["available"] and "qnnpack is not built" in rows[name]["note"]
    assert "qnnpack is not built" in (out / "compress.md").read_text()


@pytest.mark.parametrize("args,message", [
    (["--backend", "tpu"], "Invalid value for '--backend'"),
    (["--sparsity", "1.5"], "strictly between 0 and 1"),
    (["--students", "{tmp}"], "holds no student runs"),
    (["--device", "cuda"], "CUDA is not available here"),
])
def test_bad_compress_inputs_are_one_line_errors(fmnist, teacher_ckpt, tmp_path, args, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = CliRunner().invoke(main, ["compress", "--teacher", str(teacher_ckpt), "--data", fmnist.spec,
                                  "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1


def test_compress_refuses_a_torchscript_teacher(fmnist, teacher_ckpt, tmp_path):
    t = load_model(teacher_ckpt)
    ts = tmp_path / "t.ts"
    with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript; kdpipe still reads it
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.trace(t.module, torch.randn(1, 1, 28, 28)), str(ts))
    r = CliRunner().invoke(main, ["compress", "--teacher", str(ts), "--data", fmnist.spec, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "is a TorchScript program: compress takes a kdpipe checkpoint" in r.output
    assert "cannot be quantized or pruned" in r.output and len(r.output.strip().splitlines()) == 1


def test_a_pipeline_with_a_compress_section_gets_a_compress_step(tmp_path):
    import shlex
    from pathlib import Path

    from kdpipe.pipeline import load_pipeline, make_rules

    spec = (Path(__file__).resolve().parent.parent / "pipelines" / "default.toml").read_text()
    spec += '\n[compress]\nquantize = ["static"]\nprune = ["channels", "unstructured"]\nsparsity = [0.5, 0.8]\n' \
            'finetune_epochs = 2\nfinetune_loss = "ce"\n'
    (tmp_path / "p.toml").write_text(spec)
    rules = make_rules(load_pipeline(tmp_path / "p.toml"))
    head, command = next((a, b) for a, b in zip(rules.splitlines(), rules.splitlines()[1:])
                         if a.startswith("runs/default/compress/compress.md:"))
    assert "runs/default/teacher.pt" in head and "runs/default/students/mlp_800-T2-a0.9-e30-h95f4e3-s0/metrics.json" in head
    args = shlex.split(command.strip())[1:]
    assert args[0] == "compress"
    ctx = main.commands["compress"].make_context("compress", args[1:])  # the command line parses
    assert ctx.params["quantize"] == ("static",) and ctx.params["prune"] == ("channels", "unstructured")
    assert ctx.params["sparsities"] == ([0.5, 0.8],) and ctx.params["finetune_epochs"] == 2
    runs = ctx.params["students_dir"]  # the pipeline's own runs, one by one (not the folder, which may hold others)
    assert len(runs) == 12 and all(r.startswith("runs/default/students/mlp_") for r in runs)
    assert ctx.params["out"] == "runs/default/compress"
    assert "PIPELINE_TARGET := runs/default/report/report.md runs/default/compress/compress.md" in rules
    (tmp_path / "p.toml").write_text(spec + "speed = 3\n")
    with pytest.raises(KDPipeError, match=r"unknown key\(s\) in \[compress\]: speed"):
        load_pipeline(tmp_path / "p.toml")


def test_a_converted_model_the_backend_cannot_run_is_no_kernel(monkeypatch, teacher_ckpt):
    import torch.ao.quantization.quantize_fx as qfx

    class NoConv(nn.Module):
        def forward(self, x):
            raise NotImplementedError("Could not run 'quantized::conv2d.new' with arguments from the "
                                      "'QuantizedCPU' backend.\nmore lines")
    monkeypatch.setattr(qfx, "convert_fx", lambda prepared: NoConv())
    with pytest.raises(NoKernel, match=r"^onednn has no kernel for it: Could not run 'quantized::conv2d.new'"):
        quantize_static(load_model(teacher_ckpt).module, torch.randn(4, 1, 28, 28), backend="onednn")


def test_a_teacher_static_quantization_cannot_trace_is_refused_by_the_command(fmnist, tmp_path, monkeypatch):
    from kdpipe import models
    from kdpipe.checkpoint import save_checkpoint

    monkeypatch.setitem(models._REGISTRY, "data_dependent", lambda num_classes, image_shape: _DataDependent())
    ckpt = tmp_path / "t.pt"
    save_checkpoint(ckpt, _DataDependent(), arch="data_dependent", num_classes=10, image_shape=(1, 28, 28),
                    mean=[0.3], std=[0.35], class_names=[str(i) for i in range(10)],
                    dataset={"spec": fmnist.spec, "image_shape": [1, 28, 28]}, test_top1=None)
    r = CliRunner().invoke(main, ["compress", "--teacher", str(ckpt), "--data", fmnist.spec, "--quantize", "static",
                                  "--prune", "none", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: ") and "Traceback" not in r.output
    assert "torch.fx cannot trace it" in err[0] and "--quantize dynamic" in err[0]


def _student_run(runs, name, model, arch, *, image_shape, dataset, view_policy=None, num_classes=10):
    """A run directory as train-student writes it (student.pt and metrics.json), for a model built here."""
    from kdpipe.checkpoint import save_checkpoint

    d = runs / name
    d.mkdir(parents=True)
    save_checkpoint(d / "student.pt", model, arch=arch, num_classes=num_classes, image_shape=image_shape,
                    mean=[0.3], std=[0.35], class_names=[str(i) for i in range(num_classes)], dataset=dataset,
                    test_top1=None, extra={"role": "student", **({"view_policy": view_policy} if view_policy else {})})
    (d / "metrics.json").write_text(json.dumps({"name": name, "uses_teacher": True}))
    return d


def test_a_student_is_measured_on_its_own_clean_view_and_other_data_is_said(fmnist, mnist, teacher_ckpt, tmp_path):
    """A student's row is measured as train-student measured it: on the clean view of its cache's views (here
    pad-crop:24, a centre crop), not the teacher's (resized-crop:24, a resize); one trained on other data (the
    digits) gets a note in its row instead of a number read as comparable; one of other classes is refused."""
    from kdpipe.checkpoint import save_checkpoint
    from kdpipe.compress import compress
    from kdpipe.data import load_dataset
    from kdpipe.engine import predict
    from kdpipe.evaluate import eval_params, top1

    train, test = load_dataset(fmnist.spec, "train"), load_dataset(fmnist.spec, "test")
    torch.manual_seed(0)
    teacher = tmp_path / "t.pt"
    save_checkpoint(teacher, create_model("cnn_tiny", 10, (1, 24, 24)), arch="cnn_tiny", num_classes=10,
                    image_shape=(1, 24, 24), mean=[0.3], std=[0.35], class_names=list(train.class_names),
                    dataset=train.identity(), test_top1=None,
                    extra={"view_policy": create_policy("resized-crop:24").identity()})
    crop = create_policy("pad-crop:24")
    student = create_model("mlp:32", 10, (1, 24, 24)).eval()
    runs = tmp_path / "runs"
    _student_run(runs, "mine", student, "mlp:32", image_shape=(1, 24, 24), dataset=train.identity(),
                 view_policy=crop.identity())
    digits = load_dataset(mnist.spec, "train")
    _student_run(runs, "digits", create_model("mlp:32", 10, (1, 24, 24)), "mlp:32", image_shape=(1, 24, 24),
                 dataset=digits.identity(), view_policy=crop.identity())
    compress(teacher, train, test, tmp_path / "o", students_dir=runs, quantize=(), prune=(), repeats=1,
             log=lambda *a: None)
    rows = {r["name"]: r for r in json.loads((tmp_path / "o" / "compress.json").read_text())["rows"]}
    params = torch.from_numpy(eval_params(crop, test.image_shape, len(test)))
    want = top1(predict(student, torch.from_numpy(test.images), crop, params, [0.3], [0.35]), test.labels)
    assert rows["mine"]["test_top1"] == pytest.approx(want, abs=1e-9) and not rows["mine"]["note"]
    assert "trained on other data" in rows["digits"]["note"] and "measured on data it was not trained for" in \
        (tmp_path / "o" / "compress.md").read_text()
    _student_run(runs, "three", create_model("mlp:32", 3, (1, 24, 24)), "mlp:32", image_shape=(1, 24, 24),
                 dataset=train.identity(), view_policy=crop.identity(), num_classes=3)
    with pytest.raises(KDPipeError, match="student three has 3 classes"):
        compress(teacher, train, test, tmp_path / "o2", students_dir=runs, quantize=(), prune=(), repeats=1,
                 log=lambda *a: None)


def test_a_student_distilled_from_another_teacher_says_so_in_its_row(fmnist, teacher_ckpt, tmp_path):
    """Runs distilled from another teacher (another file, or the same path retrained since) were rows reading
    'distilled' beside this teacher's compressed versions, without a word; their runs record the teacher's
    sha256, and such a row now says which teacher it learnt from. A scratch run's teacher does not matter."""
    from kdpipe.compress import compress
    from kdpipe.data import load_dataset

    train, test = load_dataset(fmnist.spec, "train"), load_dataset(fmnist.spec, "test")
    runs = tmp_path / "runs"
    other = {"fingerprint": "ab" * 32, "arch": "cnn_small", "file": "/elsewhere/old-teacher.pt"}
    own = {**other, "fingerprint": load_model(teacher_ckpt).fingerprint, "file": str(teacher_ckpt)}
    for name, teacher, uses in (("mine", own, True), ("theirs", other, True), ("scratch", other, False)):
        d = _student_run(runs, name, create_model("mlp:16", 10, (1, 28, 28)), "mlp:16", image_shape=(1, 28, 28),
                         dataset=train.identity())
        (d / "metrics.json").write_text(json.dumps({"name": name, "uses_teacher": uses, "teacher": teacher}))
    log = []
    compress(teacher_ckpt, train, test, tmp_path / "o", students_dir=runs, quantize=(), prune=(), repeats=1,
             log=log.append)
    rows = {r["name"]: r for r in json.loads((tmp_path / "o" / "compress.json").read_text())["rows"]}
    assert not rows["mine"]["note"] and not rows["scratch"]["note"]
    assert "distilled from another teacher (cnn_small, old-teacher.pt, sha256 abababababab)" in rows["theirs"]["note"]
    assert any("note: student theirs was distilled from another teacher" in line for line in log)


ROWS_TRANSFORMER = '''
import torch.nn as nn

class RowsTransformer(nn.Module):
    """Each image row a token: nn.Linear layers only (dynamic int8), and torch's TransformerEncoderLayer."""

    def __init__(self, num_classes=10, image_shape=(1, 28, 28)):
        super().__init__()
        self.embed = nn.Linear(image_shape[-1], 16)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.enc(self.embed(x.flatten(1, 2))).mean(1))
'''


def test_an_int8_model_that_does_not_run_is_a_note_not_a_traceback(fmnist, tmp_path):
    """Dynamic int8 of a model built on nn.TransformerEncoderLayer converts, but the layer's fast path then
    fails on the int8 linears (AttributeError: 'function' object has no attribute 'device'): compress ended
    in that traceback at the measurements, after every model was built. The int8 model is now run once when
    it is made, and a model it does not run is a note in its row."""
    from kdpipe.compress import compress
    from kdpipe.data import load_dataset

    (tmp_path / "nets.py").write_text(ROWS_TRANSFORMER)
    arch = f"{tmp_path / 'nets.py'}:RowsTransformer"
    train, test = load_dataset(fmnist.spec, "train"), load_dataset(fmnist.spec, "test")
    torch.manual_seed(0)
    model = create_model(arch, 10, (1, 28, 28)).eval()
    with pytest.raises(NoKernel, match="int8 model does not run .AttributeError"):
        quantize_dynamic(model, "x86", torch.randn(2, 1, 28, 28))
    _student_run(tmp_path / "runs", "rows", model, arch, image_shape=(1, 28, 28), dataset=train.identity())
    compress(tmp_path / "runs" / "rows" / "student.pt", train, test, tmp_path / "o", students_dir=tmp_path / "runs",
             quantize=("dynamic",), prune=(), repeats=1, log=lambda *a: None)
    rows = {r["name"]: r for r in json.loads((tmp_path / "o" / "compress.json").read_text())["rows"]}
    assert rows["rows"]["test_top1"] is not None
    assert not rows["teacher-int8-dynamic"]["available"] and not rows["rows-int8-dynamic"]["available"]
    assert "int8 model does not run" in rows["rows-int8-dynamic"]["note"]


def test_a_students_checkpoint_records_its_views(student_runs, cache):
    """compress measures a student on the clean view of the views it trained on: its checkpoint says which."""
    from kdpipe.cache.reader import Cache
    from kdpipe.views import policy_from_identity
    want = policy_from_identity(Cache(cache.path).manifest["views"]).identity()
    files = list(student_runs.out.glob("*/student.pt"))
    assert files and all(load_model(f).info["view_policy"] == want for f in files)


def test_a_diverged_student_is_a_row_that_says_so(fmnist, teacher_ckpt, tmp_path):
    """A run whose loss became NaN has NaN weights: static quantization's observers failed on them with a
    traceback, and the whole table was lost. Its row now says it diverged; the others are measured."""
    from kdpipe.data import load_dataset

    train = load_dataset(fmnist.spec, "train")
    runs = tmp_path / "runs"
    nan = create_model("cnn_tiny", 10, (1, 28, 28))
    with torch.no_grad():
        for p in nan.parameters():
            p.fill_(float("nan"))
    d = _student_run(runs, "nan", nan, "cnn_tiny", image_shape=(1, 28, 28), dataset=train.identity())
    (d / "metrics.json").write_text(json.dumps({"name": "nan", "uses_teacher": True, "diverged_epoch": 2}))
    _student_run(runs, "ok", create_model("mlp:32", 10, (1, 28, 28)), "mlp:32", image_shape=(1, 28, 28),
                 dataset=train.identity())
    r = CliRunner().invoke(main, ["compress", "--teacher", str(teacher_ckpt), "--data", fmnist.spec, "--students",
                                  str(runs), "--quantize", "none", "--prune", "none", "--repeats", "1",
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads((tmp_path / "o" / "compress.json").read_text())["rows"]}
    assert not rows["nan"]["available"] and "diverged in epoch 2: not measured" in rows["nan"]["note"]
    assert "nan-int8-static" not in rows and rows["ok"]["test_top1"] is not None and rows["ok-int8-dynamic"]["available"]
    # an unfinished run (config.json, no metrics.json yet) is named, not left out without a word
    (runs / "later").mkdir()
    (runs / "later" / "config.json").write_text("{}")
    r = CliRunner().invoke(main, ["compress", "--teacher", str(teacher_ckpt), "--data", fmnist.spec, "--students",
                                  str(runs), "--quantize", "none", "--prune", "none", "--repeats", "1",
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 0 and "note: 1 unfinished run(s) under" in r.output and ": later" in r.output


def test_students_given_run_by_run_are_the_ones_measured(fmnist, teacher_ckpt, tmp_path):
    """A pipeline's [compress] passed its whole runs folder, so runs of settings since removed from the pipeline
    were measured beside its own; --students now takes runs one by one (repeated), and the pipeline gives its own
    (test_a_pipeline_with_a_compress_section_gets_a_compress_step)."""
    from kdpipe.data import load_dataset

    train = load_dataset(fmnist.spec, "train")
    runs = tmp_path / "runs"
    for name in ("a", "b", "old"):
        d = _student_run(runs, name, create_model("mlp:16", 10, (1, 28, 28)), "mlp:16", image_shape=(1, 28, 28),
                         dataset=train.identity())
        (d / "metrics.json").write_text(json.dumps({"name": name, "uses_teacher": True}))
    r = CliRunner().invoke(main, ["compress", "--teacher", str(teacher_ckpt), "--data", fmnist.spec, "--students",
                                  str(runs / "a"), "--students", str(runs / "b"), "--quantize", "none", "--prune",
                                  "none", "--repeats", "1", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    names = {row["name"] for row in json.loads((tmp_path / "o" / "compress.json").read_text())["rows"]}
    assert {"a", "b"} <= names and not any(n.startswith("old") for n in names)
    r = CliRunner().invoke(main, ["compress", "--teacher", str(teacher_ckpt), "--data", fmnist.spec, "--students",
                                  str(runs / "a"), "--students", str(runs / "a"), "--quantize", "none", "--prune",
                                  "none", "--repeats", "1", "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "two runs named a among" in r.output


def test_latencies_keep_three_significant_digits():
    from kdpipe.compress import _ms
    assert [_ms(x) for x in (0.00043217, 0.012345, 0.09876, 0.5, 12.3456, float("nan"), None)] == [
        "0.000432", "0.0123", "0.0988", "0.500", "12.346", "–", "–"]


def test_a_teacher_torch_fx_cannot_trace_is_refused_before_any_work_naming_every_option_to_change(fmnist, tmp_path,
                                                                                                 monkeypatch):
    """With --quantize dynamic, channel pruning failed only after the quantization and the unstructured pruning and
    its fine-tuning had run, saying no option to change; with the defaults, the user met one refusal per option."""
    from kdpipe import models
    from kdpipe.checkpoint import save_checkpoint

    monkeypatch.setitem(models._REGISTRY, "data_dependent", lambda num_classes, image_shape: _DataDependent())
    ckpt = tmp_path / "t.pt"
    save_checkpoint(ckpt, _DataDependent(), arch="data_dependent", num_classes=10, image_shape=(1, 28, 28),
                    mean=[0.3], std=[0.35], class_names=[str(i) for i in range(10)],
                    dataset={"spec": fmnist.spec, "image_shape": [1, 28, 28]}, test_top1=None)
    base = ["compress", "--teacher", str(ckpt), "--data", fmnist.spec, "--sparsity", "0.5", "--limit", "64",
            "--repeats", "1", "--out", str(tmp_path / "o")]
    for args, say in (([], "give --quantize dynamic --prune unstructured"),
                      (["--quantize", "dynamic"], "give --prune unstructured")):
        r = CliRunner().invoke(main, base + args)
        assert r.exit_code == 2, r.output
        assert r.output.strip().splitlines() == [r.stderr.strip()] and "torch.fx cannot trace it" in r.output
        assert r.output.strip().endswith(say), r.output
        assert not (tmp_path / "o").exists()
    r = CliRunner().invoke(main, base + ["--quantize", "dynamic", "--prune", "unstructured"])
    assert r.exit_code == 0, r.output


def test_a_teacher_trained_on_other_data_is_said_in_the_table(fmnist, teacher_ckpt, tmp_path):
    """compress on data the teacher was not trained on said so only in its log: compress.md, which is what is
    read and shared, compared the teacher with its compressions on that data without a word."""
    from kdpipe.compress import compress
    from kdpipe.data import load_dataset

    arrays = dict(np.load(fmnist.path))
    arrays["x_train"] = arrays["x_train"].copy()
    arrays["x_train"][0, 0, 0] ^= 1  # one pixel: another copy of the data, by its fingerprint
    np.savez(tmp_path / "other.npz", **arrays)
    said = []
    for name, spec in (("same", fmnist.spec), ("other", f"npz:{tmp_path / 'other.npz'}")):
        train, test = load_dataset(spec, "train"), load_dataset(spec, "test")
        compress(teacher_ckpt, train, test, tmp_path / name, quantize=(), prune=(), repeats=1, log=said.append)
    assert "not the data the teacher was trained on" not in (tmp_path / "same" / "compress.md").read_text()
    md = (tmp_path / "other" / "compress.md").read_text()
    assert "images): not the data the teacher was trained on (its fingerprint differs). CPU latency" in md
    assert json.loads((tmp_path / "other" / "compress.json").read_text())["teacher_trained_on_other_data"] is True


def test_data_the_teacher_was_not_trained_on_is_refused_naming_its_data(fmnist, teacher_ckpt, tmp_path):
    """compress --data of other classes than the teacher's said what was wrong only."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    y = np.arange(30) % 3
    np.savez(tmp_path / "three.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    r = CliRunner().invoke(main, ["compress", "--teacher", str(teacher_ckpt), "--data", f"npz:{tmp_path / 'three.npz'}",
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert f"(10 classes), not on npz:{tmp_path / 'three.npz'}: give --data {fmnist.spec}, the data it was trained " \
           "on" in r.output


def test_a_rerun_into_the_same_out_removes_the_models_it_did_not_write(fmnist, teacher_ckpt, tmp_path, monkeypatch):
    """A second compress into one --out left the first one's models/ files of rows it no longer made (or could no
    longer export) beside the new table, which named none of them."""
    from kdpipe.compress import compress
    from kdpipe.data import load_dataset

    train, test = load_dataset(fmnist.spec, "train").subset(64), load_dataset(fmnist.spec, "test").subset(64)
    out, said = tmp_path / "o", []
    compress(teacher_ckpt, train, test, out, quantize=("dynamic",), prune=(), repeats=1, log=said.append)
    assert sorted(p.name for p in (out / "models").iterdir()) == [  # each with its card
        "teacher-int8-dynamic.pt", "teacher-int8-dynamic.pt.json", "teacher.pt", "teacher.pt.json"]
    (out / "models" / "notes.txt").write_text("mine")  # not a model: kept
    compress(teacher_ckpt, train, test, out, quantize=(), prune=("channels",), sparsities=(0.5,), finetune_epochs=0,
             repeats=1, log=said.append)
    assert sorted(p.name for p in (out / "models").iterdir()) == ["notes.txt", "teacher-prune-channels-50.pt",
                                                                   "teacher-prune-channels-50.pt.json", "teacher.pt",
                                                                   "teacher.pt.json"]
    assert "pruning (channels, 50%): teacher-prune-channels-50" in said  # not "and fine-tuning" with 0 epochs
    assert [row["name"] for row in json.loads((out / "compress.json").read_text())["rows"]] == [
        "teacher", "teacher-prune-channels-50"]
    assert f"removed {out / 'models' / 'teacher-int8-dynamic.pt'}: a model of an earlier compress" in "\n".join(said)
    # a row this run cannot export: its earlier file goes too, and the log says so rather than "0.00 MB"
    from kdpipe import export
    real = export.export_model

    def refuse_pruned(lo, fmt, path, **kw):
        if "prune" in path.name:
            raise KDPipeError("the trace failed")
        return real(lo, fmt, path, **kw)

    monkeypatch.setattr(export, "export_model", refuse_pruned)
    said.clear()
    compress(teacher_ckpt, train, test, out, quantize=(), prune=("channels",), sparsities=(0.5,), finetune_epochs=0,
             repeats=1, log=said.append)
    assert sorted(p.name for p in (out / "models").iterdir()) == ["notes.txt", "teacher.pt", "teacher.pt.json"]
    assert any(line.startswith("  teacher-prune-channels-50: top-1 ") and ", not exported, batch 1 " in line
               for line in said), said


def test_each_compressed_model_has_a_card_and_following_it_gives_its_top1(fmnist, teacher_ckpt, tmp_path):
    """DIR/models/<row>.pt had no card: an int8 or pruned model, which has no checkpoint to export, came with no
    word of its classes' order or its input steps (a student's clean view is not the teacher's). Each file now
    has FILE.json as kdpipe export writes it, with the row's own test top-1; a deployment that loads the file
    without kdpipe and feeds the card's input gets that top-1."""
    from kdpipe.compress import compress
    from kdpipe.data import load_dataset
    from kdpipe.export import preprocessing

    train, test = load_dataset(fmnist.spec, "train").subset(64), load_dataset(fmnist.spec, "test").subset(64)
    out = tmp_path / "o"
    compress(teacher_ckpt, train, test, out, quantize=("dynamic",), prune=("unstructured",), sparsities=(0.5,),
             finetune_epochs=0, repeats=1, log=lambda *a: None)
    rows = json.loads((out / "compress.json").read_text())["rows"]
    teacher = load_model(teacher_ckpt)
    assert {r["name"] for r in rows} == {"teacher", "teacher-int8-dynamic", "teacher-prune-unstructured-50"}
    for row in rows:
        card = json.loads((out / "models" / f"{row['file']}.json").read_text())
        assert card["model"] == row["file"] and card["class_names"] == teacher.info["class_names"]
        assert card["preprocessing"] == preprocessing(teacher)
        assert card["source"]["test_top1"] == row["test_top1"]
        assert card["source"]["compressed"] == row["method"]
        assert card["source"]["test_top1_on"] == "64 samples of the test split (--limit 64), not all of it"
        assert card["input"] == {"dtype": "uint8", "shape": ["B", 1, 28, 28]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.jit.load(str(out / "models" / row["file"]))
        with torch.no_grad():  # the card's input: the uint8 images, channels first, in batches of 256 or fewer
            pred = model(torch.from_numpy(np.ascontiguousarray(test.images))).argmax(1).numpy()
        assert float((pred == test.labels).mean()) == pytest.approx(row["test_top1"], abs=1e-6), row["name"]
    # a rerun that no longer makes a row removes its model and its card
    compress(teacher_ckpt, train, test, out, quantize=(), prune=(), repeats=1, log=lambda *a: None)
    assert sorted(p.name for p in (out / "models").iterdir()) == ["teacher.pt", "teacher.pt.json"]


def test_compress_refuses_photos_resized_otherwise_than_the_teacher_saw(tmp_path):
    """A teacher trained on squashed photos, measured by compress on centre crops of the same size: every row's
    accuracy was of other inputs than the teacher's, with only a note that the data's fingerprint differs."""
    from test_data import _aspect_folder

    from kdpipe.checkpoint import save_checkpoint
    from kdpipe.compress import compress
    from kdpipe.data import load_dataset

    _aspect_folder(tmp_path / "p", [(40, 20), (20, 40), (30, 30)])
    spec = f"imagefolder:{tmp_path / 'p'}"
    squashed = load_dataset(spec, "train", image_size=8, resize="squash")
    teacher = tmp_path / "t.pt"
    save_checkpoint(teacher, create_model("cnn_tiny", 2, (3, 8, 8)), arch="cnn_tiny", num_classes=2,
                    image_shape=(3, 8, 8), mean=[0.5] * 3, std=[0.25] * 3, class_names=["a", "b"],
                    dataset=squashed.identity(), test_top1=None)
    train, test = load_dataset(spec, "train", image_size=8), load_dataset(spec, "test", image_size=8)
    with pytest.raises(KDPipeError, match=r"trained on photos resized by squash \(--resize squash\), the data given "
                                          r"is resized by crop: give compress --resize squash$"):
        compress(teacher, train, test, tmp_path / "o", quantize=(), prune=(), repeats=1, log=lambda *a: None)
    assert not (tmp_path / "o").exists()


def test_a_feature_table_is_counted_in_rows_not_images(tmp_path):
    """compress on a feature table called its test rows "images" and its latencies "ms/image", in its log,
    compress.md and the plot; stage two's lines already counted rows."""
    from test_data import make_features_npz

    from kdpipe.compress import compress
    from kdpipe.data import load_dataset
    from kdpipe.teacher import train_teacher

    make_features_npz(tmp_path / "tab.npz")
    spec = f"npz:{tmp_path / 'tab.npz'}"
    train, test = load_dataset(spec, "train"), load_dataset(spec, "test")
    train_teacher(train, test, "mlp_100", 1, tmp_path / "t.pt", policy=create_policy("none"), batch_size=32,
                  log=lambda *a: None)
    said = []
    compress(tmp_path / "t.pt", train, test, tmp_path / "c", quantize=("dynamic",), prune=("unstructured",),
             sparsities=(0.5,), finetune_epochs=1, repeats=1, log=said.append)
    md = (tmp_path / "c" / "compress.md").read_text()
    assert f"test split ({len(test):,} rows)" in md and "milliseconds per row" in md and "ms/row at batch 1" in md
    assert f"1 epoch(s) on {len(train):,} rows" in md
    assert "image" not in md.replace("image_shape", ""), md
    assert f"({len(test):,} rows)" in "\n".join(said) and "ms/row" in "\n".join(said)
    assert json.loads((tmp_path / "c" / "compress.json").read_text())["unit"] == "row"


def test_compress_into_a_folder_whose_models_it_did_not_write_touches_none_of_them(fmnist, teacher_ckpt, tmp_path):
    """`compress --teacher models/teacher.pt --out .` in a project whose models/ held the user's checkpoints removed
    every one of them as "a model of an earlier compress" (the teacher itself too, which it could not export over),
    and a user's models/teacher.pt elsewhere was overwritten by the exported teacher."""
    import shutil
    models = tmp_path / "models"
    models.mkdir()
    teacher = models / "teacher.pt"
    shutil.copy(teacher_ckpt, teacher)
    (models / "mine.pt").write_bytes(b"the user's own model")
    before = {p.name: p.read_bytes() for p in models.iterdir()}
    r = CliRunner().invoke(main, ["compress", "--teacher", str(teacher), "--data", fmnist.spec, "--quantize", "none",
                                  "--prune", "none", "--repeats", "1", "--out", str(tmp_path)])
    assert r.exit_code == 2, r.output
    assert f"{models} holds mine.pt, teacher.pt, which kdpipe compress did not write" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in models.iterdir()} == before
    # a folder of an earlier compress is rerun into as before (its models have their cards)
    out = tmp_path / "cmp"
    args = ["compress", "--teacher", str(teacher_ckpt), "--data", fmnist.spec, "--quantize", "none", "--prune", "none",
            "--repeats", "1", "--out", str(out)]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert CliRunner().invoke(main, args).exit_code == 0, "rerun"


@pytest.mark.parametrize("args", [["--sparsity", "0.3"], ["--finetune-epochs", "3"], ["--finetune-loss", "ce"],
                                  ["--finetune-samples", "64"], ["--lr", "0.1"]])
def test_options_of_pruning_with_prune_none_are_refused(fmnist, teacher_ckpt, tmp_path, args):
    """compress --prune none --sparsity 0.3 (or --finetune-epochs 3, --lr 0.1, ...) measured the teacher unpruned
    and exited 0, the option ignored without a word."""
    r = CliRunner().invoke(main, ["compress", "--teacher", str(teacher_ckpt), "--data", fmnist.spec, "--prune", "none",
                                  *args, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert r.output.strip() == (f"Error: {args[0]} is an option of pruning, and --prune none prunes nothing: leave "
                                f"{args[0]} out, or give --prune unstructured or channels")
    assert not (tmp_path / "o").exists()


def test_a_teacher_that_is_not_a_kdpipe_checkpoint_is_refused_before_the_data_is_read(tmp_path):
    """compress --teacher w.pth (a state dict) decoded the whole --data first (minutes for a large photo folder),
    then refused the teacher; its data is not read now: a missing folder would have been the error."""
    from test_reliability_helpers import assert_one_line_error, run_cli
    torch.save(create_model("mlp_100", 10, (1, 28, 28)).state_dict(), tmp_path / "w.pth")
    res = run_cli(["compress", "--teacher", tmp_path / "w.pth", "--data", f"imagefolder:{tmp_path / 'absent'}",
                   "--image-size", 32, "--out", tmp_path / "c"])
    assert_one_line_error(res, "w.pth holds weights alone (a state dict): give --teacher-arch SPEC",
                          "and its input normalization (--mean/--std, --input-range or --normalize)")


def test_a_state_dict_teacher_with_its_arch_and_normalization_is_compressed_as_its_checkpoint(fmnist, teacher_ckpt,
                                                                                              tmp_path):
    """A teacher saved as a state dict (torchvision-style training scripts), dumped with --teacher-arch and --mean/--std,
    could not be compressed: compress took kdpipe checkpoints only, and said so without a way to go on. With
    --teacher-arch and the normalization, as dump-logits takes them, its rows equal those of the same weights in a
    kdpipe checkpoint; a checkpoint given them is refused (it records its own)."""
    from test_reliability_helpers import assert_one_line_error, run_cli
    t = load_model(teacher_ckpt)
    torch.save(t.module.state_dict(), tmp_path / "w.pth")
    common = ["--data", fmnist.spec, "--quantize", "static", "--prune", "channels", "--sparsity", "0.5",
              "--finetune-epochs", "0", "--calibration", "32", "--repeats", "1"]
    ok = CliRunner().invoke(main, ["compress", "--teacher", str(teacher_ckpt), *common, "--out", str(tmp_path / "a")])
    assert ok.exit_code == 0, ok.output
    norm = ["--mean", ",".join(map(str, t.mean)), "--std", ",".join(map(str, t.std))]
    r = CliRunner().invoke(main, ["compress", "--teacher", str(tmp_path / "w.pth"), "--teacher-arch", t.arch, *norm,
                                  *common, "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    rows = [{x["name"]: x for x in json.loads((tmp_path / d / "compress.json").read_text())["rows"]} for d in "ab"]
    assert set(rows[0]) == set(rows[1]) == {"teacher", "teacher-int8-static", "teacher-prune-channels-50"}
    for name in rows[0]:
        assert rows[1][name]["test_top1"] == rows[0][name]["test_top1"], name
        assert rows[1][name]["available"], rows[1][name]["note"]
    card = json.loads((tmp_path / "b" / "models" / "teacher.pt.json").read_text())
    assert card["class_names"] == load_model(teacher_ckpt).info["class_names"]
    assert card["normalization_inside"] == {"mean": t.mean, "std": t.std}
    # without the normalization: dump-logits' one line naming the options
    res = run_cli(["compress", "--teacher", tmp_path / "w.pth", "--teacher-arch", t.arch, *common, "--out",
                   tmp_path / "c"])
    assert_one_line_error(res, "does not record the input normalization")
    res = run_cli(["compress", "--teacher", teacher_ckpt, "--teacher-arch", t.arch, *common, "--out", tmp_path / "d"])
    assert_one_line_error(res, "is a kdpipe checkpoint", "drop --teacher-arch")
    res = run_cli(["compress", "--teacher", teacher_ckpt, *norm, *common, "--out", tmp_path / "e"])
    assert_one_line_error(res, "is a kdpipe checkpoint, which records its architecture and input normalization")


def test_a_grey_state_dict_teacher_fed_as_grayscale3_normalize_is_compressed_as_it_is_dumped(tmp_path):
    """Grey images and an RGB state-dict teacher with --normalize imagenet: the teacher is fed Grayscale(3) +
    Normalize, each channel normalized after the repeat. compress dropped that per-channel step (its views are
    pixels in [0, 1]): its teacher rows, and the models it wrote, were of a teacher fed other inputs."""
    import torchvision
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (90, 28, 28), dtype=np.uint8), np.arange(90) % 3
    np.savez(tmp_path / "g.npz", x_train=x[:60], y_train=y[:60], x_test=x[60:], y_test=y[60:])
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3).eval()
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    r = CliRunner().invoke(main, ["compress", "--teacher", str(tmp_path / "r18.pth"), "--teacher-arch", "tv:resnet18",
                                  "--normalize", "imagenet", "--data", f"npz:{tmp_path / 'g.npz'}", "--quantize",
                                  "dynamic", "--prune", "none", "--repeats", "1", "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    grey = torch.from_numpy(x[60:]).float()[:, None] / 255.0
    rgb = torchvision.transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(grey.expand(-1, 3, -1, -1))
    with torch.no_grad():
        want = net(rgb)
    from kdpipe.export import run_exported
    got = run_exported(tmp_path / "c" / "models" / "teacher.pt", "torchscript", torch.from_numpy(x[60:])[:, None])
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
    row = {x["name"]: x for x in json.loads((tmp_path / "c" / "compress.json").read_text())["rows"]}["teacher"]
    assert row["test_top1"] == pytest.approx(float((want.argmax(1).numpy() == y[60:]).mean()), abs=1e-6)


def test_a_weights_teacher_given_another_normalization_than_its_students_cache_is_refused(fmnist, teacher_ckpt,
                                                                                         tmp_path):
    """A state-dict teacher given compress another normalization than its cache was dumped with (--mean 0.5 --std 0.5
    for a cache of --normalize imagenet) was measured fed other inputs than its students learnt from: its rows (and
    every student's agreement with it) were a few points off, nothing said. The students' checkpoints record the
    cache's normalization and their runs the teacher file's sha256: a mismatch is refused, naming both."""
    import hashlib

    from kdpipe.compress import compress
    from kdpipe.data import load_dataset

    train, test = load_dataset(fmnist.spec, "train"), load_dataset(fmnist.spec, "test")
    t = load_model(teacher_ckpt)
    w = tmp_path / "w.pth"
    torch.save(t.module.state_dict(), w)
    recorded = {"fingerprint": hashlib.sha256(w.read_bytes()).hexdigest(), "arch": t.arch, "file": str(w)}
    runs = tmp_path / "runs"
    for name, uses in (("kd", True), ("scratch", False)):  # both normalized as the cache: mean 0.3, std 0.35
        d = _student_run(runs, name, create_model("mlp:16", 10, (1, 28, 28)), "mlp:16", image_shape=(1, 28, 28),
                         dataset=train.identity())
        (d / "metrics.json").write_text(json.dumps({"name": name, "uses_teacher": uses, "teacher": recorded}))
    kw = dict(students_dir=runs, quantize=(), prune=(), repeats=1, log=lambda *a: None, teacher_arch=t.arch)
    with pytest.raises(KDPipeError, match=r"student kd learnt from a cache of w\.pth whose teacher was fed inputs "
                                          r"normalized with mean \[0\.3\], std \[0\.35\]; compress is given mean "
                                          r"\[0\.5\], std \[0\.5\]: give the normalization the cache was dumped with"):
        compress(w, train, test, tmp_path / "o", mean=[0.5], std=[0.5], **kw)
    assert not (tmp_path / "o").exists()
    compress(w, train, test, tmp_path / "o", mean=[0.3], std=[0.35], **kw)  # as dumped: measured
    rows = {r["name"]: r for r in json.loads((tmp_path / "o" / "compress.json").read_text())["rows"]}
    assert set(rows) >= {"teacher", "kd", "scratch"} and not rows["kd"]["note"]


def test_compress_takes_a_normalization_copied_as_kdpipe_prints_it():
    """compress compares the normalization it is given with the one the students' cache records as kdpipe's other
    checks do (kdpipe.normalization: equal to the 4 significant digits that `kdpipe inspect` and the messages print),
    so values copied from that output are not refused; one value stands for every channel; other values differ."""
    from kdpipe.normalization import format_values, same_normalization

    recorded = ([0.49139968, 0.48215841, 0.44653091], [0.24703223, 0.24348513, 0.26158784])
    printed = format_values(recorded[0]), format_values(recorded[1])
    assert printed == ("[0.4914, 0.4822, 0.4465]", "[0.247, 0.2435, 0.2616]")
    copied = [[float(x) for x in p.strip("[]").split(",")] for p in printed]
    assert same_normalization(*recorded, *copied)
    assert same_normalization([0.5], [0.25], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert not same_normalization(*recorded, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert not same_normalization([0.3], [0.35], [0.5], [0.5])
    assert not same_normalization([0.5, 0.5], [0.2, 0.2], [0.5, 0.5, 0.5], [0.2, 0.2, 0.2])
