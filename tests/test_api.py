"""The public Python API (kdpipe/api.py): the README's example runs as written, and its batches are the
cache's rows: the views the teacher saw, bit for bit, its stored logits and the labels."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import kdpipe
from kdpipe import KDPipeError
from kdpipe.cache.reader import Cache
from kdpipe.engine import batches
from kdpipe.util import seeded_generator

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text.split("\n## The Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Python API section should hold one python example"
    return blocks[0]


def test_readme_example_trains_a_student(cache, tmp_path, monkeypatch):
    """The example as written, run where `cache/default` is the conftest's small Fashion-MNIST cache."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "default").symlink_to(cache.path, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(readme_example(), str(README), "exec"), {"__name__": "readme_example"})
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == [f"epoch {e}" for e in range(cache.views)]
    assert all(re.search(r"ce \d\.\d{3}, kd \d\.\d{3}, test top-1 0\.\d{3}$", line) for line in lines), lines
    state = torch.load(tmp_path / "student.pt")
    assert any(v.dtype.is_floating_point for v in state.values())


def test_batches_are_the_cache_rows(cache):
    """Epoch e's batches: the teacher's own inputs for view e mod K (bit for bit), the stored logits and
    the labels of the samples train-student would draw for (seed, e)."""
    data = kdpipe.open_cache(cache.path)
    assert (data.num_classes, data.num_views, data.input_shape) == (10, 3, (1, 28, 28))
    n, bs, stored = data.num_samples, 100, Cache(cache.path)
    for epoch in (0, 4):  # 4 reads view 1
        k = epoch % cache.views
        order = batches(n, bs, seeded_generator(7, epoch), "cpu")
        got = list(data.epoch(epoch, batch_size=bs, seed=7))
        assert len(got) == len(order) == len(data.epoch(epoch, bs, 7)) == n // bs
        for (x, t, y), idx in zip(got, order):
            rows = (k * n + idx).numpy()
            assert torch.equal(x, cache.captured.inputs[rows])
            assert t.dtype == torch.float32
            np.testing.assert_array_equal(t.numpy(), stored.read_view(k, "logits")[idx.numpy()].astype(np.float32))
            np.testing.assert_array_equal(y.numpy(), cache.train.labels[idx.numpy()])


def test_open_cache_refuses_what_train_student_refuses(cache, tmp_path):
    with pytest.raises(KDPipeError, match="not a kdpipe cache"):
        kdpipe.open_cache(tmp_path)
    with pytest.raises(KDPipeError, match="fingerprint"):
        bad = tmp_path / "other.npz"
        np.savez(bad, x_train=cache.train.images[:, 0][::-1].copy(), y_train=cache.train.labels[::-1].copy(),
                 x_test=cache.test.images[:, 0], y_test=cache.test.labels)
        kdpipe.open_cache(cache.path, data=f"npz:{bad}")
    for wrong in (3, None):  # a TypeError from deep inside before
        with pytest.raises(KDPipeError, match="open_cache takes a cache folder"):
            kdpipe.open_cache(wrong)
    with pytest.raises(KDPipeError, match="batch_size must be >= 1, got 0"):  # a ZeroDivisionError before
        kdpipe.open_cache(cache.path).steps_per_epoch(0)


def test_evaluate_leaves_the_models_training_mode_as_it_found_it(cache):
    """A loop that calls model.train() once and evaluates after every epoch must not train on in eval mode
    (dropout off, batch norm on its running statistics): evaluate() evaluates in eval mode and restores each
    module's mode."""
    data = kdpipe.open_cache(cache.path)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.BatchNorm1d(32),
                                torch.nn.Dropout(0.5), torch.nn.Linear(32, 10))
    model.train()
    model[2].eval()  # a frozen norm stays frozen
    first = data.evaluate(model)
    assert model.training and model[3].training and not model[2].training
    assert data.evaluate(model) == first  # in eval mode: no dropout, the running statistics
    model.eval()
    assert data.evaluate(model) == first and not any(m.training for m in model.modules())
    with pytest.raises(KDPipeError, match="batch_size must be >= 1, got 0"):  # one line, as the CLI's errors
        next(iter(data.epoch(0, batch_size=0)))


def test_evaluate_takes_a_hint_students_logits(cache):
    """The README's hint loss of your own trains a model that returns its logits with its features: evaluate()
    on a kdpipe.features.HintStudent (which returns kdpipe.losses.Outputs) raised AttributeError: 'Outputs'
    object has no attribute 'float'; it scores the logits, as for the student alone. A model returning a
    tuple is one line saying what to pass."""
    from kdpipe.features import HintStudent, make_projector
    data = kdpipe.open_cache(cache.path)
    torch.manual_seed(0)
    student = kdpipe.create_model("cnn_tiny", data.num_classes, data.input_shape)
    hinted = HintStudent(student, "features.3", make_projector((8, 14, 14), (16, 7, 7)))
    assert data.evaluate(hinted) == data.evaluate(student)

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = student

        def forward(self, x):
            return self.net(x), x.flatten(1)

    with pytest.raises(KDPipeError, match=r"the model returns a tuple, not a logits tensor"):
        data.evaluate(Pair())


def test_a_student_of_other_classes_or_batch_is_one_line_in_the_loss(cache):
    """A loop whose student was built for another number of classes than the cache's (or that pairs another
    batch's teacher targets) got torch's IndexError ('Target 7 is out of bounds') or a size mismatch from inside
    the loss; now a KDPipeError that names both sizes."""
    data = kdpipe.open_cache(cache.path)
    x, t, y = next(iter(data.epoch(0, batch_size=16)))
    for name in ("kd", "dkd"):
        loss = kdpipe.create_loss(name)
        for classes in (5, 100):
            with pytest.raises(KDPipeError, match=f"loss {name}: the student gives {classes} logits per sample and "
                                                  "the teacher 10: build the student for the cache's 10 classes"):
                loss(torch.zeros(16, classes), t, y, 0)
        with pytest.raises(KDPipeError, match=f"loss {name}: the student's logits hold 8 samples and the teacher's 16"):
            loss(torch.zeros(8, 10), t, y[:8], 0)
        assert set(loss(torch.zeros(16, 10), t, y, 0)) >= {"ce"}  # the right sizes still train


def test_a_cuda_device_this_machine_lacks_is_one_line(cache, monkeypatch):
    """open_cache(device=torch.device("cuda")) on a machine without CUDA went unchecked and failed deep in torch
    ('Found no NVIDIA driver'); cuda:N past the machine's devices failed at the first copy ('invalid device
    ordinal'). Both are now refused in one line, as the string "cuda" always was."""
    from kdpipe.util import pick_device

    if not torch.cuda.is_available():
        for device in ("cuda", torch.device("cuda"), torch.device("cuda:0")):
            with pytest.raises(KDPipeError, match="CUDA is not available here"):
                kdpipe.open_cache(cache.path, device=device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(KDPipeError, match=r"device cuda:2 asked for, but this machine has 2 CUDA device\(s\) "
                                          r"\(cuda:0 to cuda:1\)"):
        pick_device("cuda:2")
    assert pick_device("cuda:1") == torch.device("cuda:1") and pick_device("cuda") == torch.device("cuda")


def test_labels_a_loss_cannot_take_are_one_line(cache):
    """Labels from a user's own pipeline: floats (indices as floats, one-hot), (B, 1) or another batch's failed
    inside torch's cross_entropy ('expected target dtype to be Long', an expand error); now one KDPipeError
    line naming what was given. Integer labels of another dtype (int32, uint8) are class indices: cast."""
    data = kdpipe.open_cache(cache.path)
    x, t, y = next(iter(data.epoch(0, batch_size=16)))
    out = torch.randn(16, 10)
    for name in ("kd", "dkd"):
        loss = kdpipe.create_loss(name)
        want = loss(out, t, y, 0)
        for bad, what in ((y.float(), r"torch.float32 of shape \(16,\)"),
                          (torch.nn.functional.one_hot(y, 10).float(), r"torch.float32 of shape \(16, 10\)"),
                          (y.view(16, 1), r"torch.int64 of shape \(16, 1\)"), (y.numpy(), "ndarray")):
            with pytest.raises(KDPipeError, match=f"loss {name}: labels must be the batch's class indices, a "
                                                  rf"\(B,\) integer tensor, got {what}"):
                loss(out, t, bad, 0)
        with pytest.raises(KDPipeError, match=f"loss {name}: the student's logits hold 16 samples and the labels 8"):
            loss(out, t, y[:8], 0)
        for other in (y.int(), y.to(torch.uint8)):
            got = loss(out, t, other, 0)
            assert all(torch.equal(got[k], want[k]) for k in want)


def test_dir_of_the_package_lists_the_api_loaded_on_first_use():
    """dir(kdpipe) (and so a notebook's tab completion) did not list open_cache and the rest of the API, which
    the package loads on first use."""
    import kdpipe
    names = dir(kdpipe)
    assert {"open_cache", "CacheData", "create_loss", "create_model", "known_losses", "KDPipeError"} <= set(names)
    assert names == sorted(names) and all(callable(getattr(kdpipe, n)) for n in kdpipe._API)
