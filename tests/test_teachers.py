"""Bring your own teacher (issue 9): every kind of teacher either gives a cache whose stored logits are
the teacher's own outputs on the replayed views, or is refused with one line and exit code 2.

All through the CLI (click's CliRunner), on the Fashion-MNIST subset with the session's trained
cnn_small teacher (conftest's teacher_ckpt) wrapped in the shapes users bring: normalizing inside,
ending in a softmax, returning tuples or dicts, saved as TorchScript, torch.export, state dict,
safetensors, a pickled module, a timm model, the user's own file.
"""

from __future__ import annotations

import copy
import signal
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from kdpipe import KDPipeError
from kdpipe.cli import main
from kdpipe.checkpoint import half_dtype

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(autouse=True)
def _no_sigterm_handler(monkeypatch):
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # dump-logits installs one


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result


def refused(result, *fragments):
    """Exit code 2, one line 'Error: ...' on stderr holding every fragment, no traceback."""
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- teachers in users' shapes

class Normalizing(nn.Module):
    """Takes pixels in [0, 1] and normalizes inside (as many exported teachers do)."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


class Softmaxed(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).softmax(1)


class TupleOut(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x), x.flatten(1)[:, :7]


class DictOut(nn.Module):
    def __init__(self, net, key="logits"):
        super().__init__()
        self.net = net
        self.key = key

    def forward(self, x):
        return {"features": x.flatten(1)[:, :5], self.key: self.net(x)}


@pytest.fixture(scope="module")
def ref(teacher_ckpt, fmnist):
    """The trained teacher as a plain module, its normalization and the data spec."""
    from kdpipe.checkpoint import load_teacher
    t = load_teacher(teacher_ckpt)
    return types.SimpleNamespace(net=t.module.eval(), mean=list(t.mean), std=list(t.std), spec=fmnist.spec,
                                 ckpt=teacher_ckpt, norm=["--mean", ",".join(map(str, t.mean)), "--std", ",".join(map(str, t.std))])


def dump(teacher, spec, out, *extra):
    return invoke("dump-logits", "--teacher", teacher, "--data", spec, "--views", 2, "--policy", "crop:2+flip",
                  "--seed", 5, "--logits-dtype", "float32", "--batch-size", 256, "--device", "cpu", *extra,
                  "--out", out)


def assert_cache_holds(cache_dir, fn, atol=1e-4):
    """The stored logits of every row equal fn(x) on that row's view, replayed from the stored view
    parameters with the manifest's normalization (what the teacher saw); returns the manifest."""
    from kdpipe.cache.reader import Cache
    from kdpipe.data import load_dataset
    from kdpipe.views import policy_from_identity

    c = Cache(cache_dir)
    m = c.manifest
    images = torch.from_numpy(np.asarray(load_dataset(m["dataset"]["spec"], m["dataset"]["split"]).images))
    sidx = torch.from_numpy(c.read("sample_index", 0, c.rows).astype(np.int64))
    params = torch.from_numpy(c.read("view_params", 0, c.rows))
    x = policy_from_identity(m["views"]).replay(images[sidx], params, m["input"]["mean"], m["input"]["std"])
    with torch.no_grad():
        want = fn(x).float().numpy()
    np.testing.assert_allclose(c.read("logits", 0, c.rows), want, atol=atol, rtol=1e-4)
    return m


def trace(module, path):
    torch.jit.trace(module.eval(), torch.randn(2, 1, 28, 28), strict=False).save(str(path))
    return path


# ---------------------------------------------------------------- normalization

def test_a_teacher_without_normalization_is_refused_naming_the_options(ref, tmp_path):
    ts = trace(ref.net, tmp_path / "t.ts")
    line = refused(dump(ts, ref.spec, tmp_path / "c"), "does not record the input normalization",
                   "--normalize imagenet", "--input-range 0-1|0-255", "--mean")
    assert not (tmp_path / "c").exists()
    assert "t.ts" in line


def test_a_teacher_that_takes_pixels_in_0_1_dumps_its_own_outputs(ref, tmp_path):
    inner = Normalizing(ref.net, ref.mean, ref.std)
    ts = trace(inner, tmp_path / "unit.ts")
    out = tmp_path / "c"
    r = ok(dump(ts, ref.spec, out, "--input-range", "0-1"))
    assert "probe: teacher top-1" in r.output
    m = assert_cache_holds(out, inner)
    assert m["input"]["mean"] == [0.0] and m["input"]["std"] == [1.0]
    assert m["input"]["normalization"] == {"source": "input-range", "value": "0-1"}
    assert m["teacher"]["kind"] == "torchscript"
    shown = ok(invoke("inspect", out)).output
    assert "normalization --input-range 0-1: mean [0], std [1]" in shown
    ok(invoke("verify-cache", out, "--teacher", ts, "--sample", 64))


def test_a_teacher_given_another_normalization_than_its_own_is_stopped_by_the_probe(ref, tmp_path):
    """A teacher trained on standardized pixels, given --input-range 0-255, is still far above chance, and its cache
    was silently worse (top-1 0.41 on its views against 0.54, measured on a 2-epoch cnn_small). The probe now also
    runs it under the other usual normalizations and stops where one does clearly better; the right one passes."""
    ts = trace(ref.net, tmp_path / "t.ts")
    line = refused(dump(ts, ref.spec, tmp_path / "c", "--input-range", "0-255"), "with --input-range 0-255, and ",
                   "(the data's own statistics): it was likely trained with inputs normalized so", "--force")
    assert not (tmp_path / "c").exists(), line
    r = ok(dump(ts, ref.spec, tmp_path / "c", *ref.norm))
    assert "likely trained" not in r.output
    r = ok(dump(ts, ref.spec, tmp_path / "f", "--input-range", "0-255", "--force"))
    assert "warning (--force): the teacher's top-1 on 256 training samples is" in r.output


def test_normalization_is_part_of_the_cache_identity_and_a_checkpoint_keeps_its_own(ref, teacher_ckpt, tmp_path):
    ts = trace(ref.net, tmp_path / "t.ts")
    out = tmp_path / "c"
    ok(dump(ts, ref.spec, out, *ref.norm))
    assert assert_cache_holds(out, ref.net)["input"]["normalization"]["source"] == "mean-std"
    # Another normalization into the same OUT is another cache: refused unless --overwrite.
    r = dump(ts, ref.spec, out, "--mean", "0.5", "--std", "0.5", "--force")
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    refused(dump(teacher_ckpt, ref.spec, tmp_path / "k", "--input-range", "0-1"),
            "was trained on inputs normalized with mean", "drop --input-range")
    refused(dump(ts, ref.spec, tmp_path / "k", "--normalize", "imagenet"), "--normalize imagenet is for 3-channel")
    refused(dump(ts, ref.spec, tmp_path / "k", "--mean", "0.2"), "--mean and --std go together")
    refused(dump(ts, ref.spec, tmp_path / "k", "--input-range", "0-1", "--normalize", "imagenet"),
            "give one input normalization")
    ckpt = tmp_path / "own"
    ok(dump(teacher_ckpt, ref.spec, ckpt))
    m = assert_cache_holds(ckpt, ref.net)
    assert m["input"]["normalization"]["source"] == "checkpoint" and m["input"]["mean"] == pytest.approx(ref.mean)
    assert "from the teacher checkpoint" in ok(invoke("inspect", ckpt)).output


# ---------------------------------------------------------------- the probe

def test_a_softmax_teacher_is_refused_unless_forced(ref, tmp_path):
    ts = trace(Softmaxed(ref.net), tmp_path / "soft.ts")
    refused(dump(ts, ref.spec, tmp_path / "c", *ref.norm), "look like probabilities", "without its final softmax",
            "--force")
    assert not (tmp_path / "c").exists()
    r = ok(dump(ts, ref.spec, tmp_path / "c", *ref.norm, "--force"))
    assert "warning (--force)" in r.output



class Dropped(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        return self.net(self.drop(x))


def test_a_teacher_left_in_training_mode_is_refused_unless_forced(ref, tmp_path):
    """Traced in training mode, dropout stays random and batch norm keeps using the batch's statistics,
    whatever .eval() says later: the cache would hold logits the teacher never gives again (verify-cache
    then reports every row). The probe runs the teacher twice, in batches of two sizes, and stops."""
    import copy

    for name, net in (("dropout", Dropped(copy.deepcopy(ref.net))), ("batchnorm", copy.deepcopy(ref.net))):
        path = tmp_path / f"{name}.ts"
        torch.jit.trace(net.train(), torch.randn(4, 1, 28, 28), check_trace=False).save(str(path))
        refused(dump(path, ref.spec, tmp_path / "c", *ref.norm), "the teacher's outputs change when it runs again",
                "model.eval()", "--force")
        assert not (tmp_path / "c").exists()
    r = ok(dump(path, ref.spec, tmp_path / "c", *ref.norm, "--force"))
    assert "warning (--force): the teacher's outputs change" in r.output
    # Scripted in training mode, the dropout obeys .eval(): its outputs are stable and it dumps.
    torch.jit.script(Dropped(copy.deepcopy(ref.net)).train()).save(str(tmp_path / "scripted.ts"))
    ok(dump(tmp_path / "scripted.ts", ref.spec, tmp_path / "s", *ref.norm))
    assert_cache_holds(tmp_path / "s", ref.net)

def test_a_teacher_in_training_mode_is_refused_with_batches_of_one_too(ref, tmp_path):
    """The probe ran again in batches of half the size, at least 1: with --batch-size 1 both runs had batches of
    one, batch norm in training mode gave the same outputs twice, and the cache held logits of per-sample
    statistics."""
    import copy

    path = tmp_path / "bn.ts"
    torch.jit.trace(copy.deepcopy(ref.net).train(), torch.randn(4, 1, 28, 28), check_trace=False).save(str(path))
    refused(dump(path, ref.spec, tmp_path / "c", *ref.norm, "--batch-size", 1),
            "the teacher's outputs change when it runs again")
    assert not (tmp_path / "c").exists()


def test_a_checkpoint_whose_classes_are_in_another_order_is_refused(teacher_ckpt, fmnist, tmp_path):
    """The teacher (trained on classes named 0..9) on the same images with classes 3 and 5 swapped: the probe
    still passed (about 80% of its top-1 is left), and the cache held class 3's logits as class 5's. A
    checkpoint names its classes: one that names a data class at another index is refused; other names
    get a note."""
    swap = np.arange(10)
    swap[[3, 5]] = [5, 3]
    names = np.array([str(i) for i in swap])
    np.savez(tmp_path / "swapped.npz", x_train=fmnist.x_train, y_train=swap[fmnist.y_train], x_test=fmnist.x_test,
             y_test=swap[fmnist.y_test], class_names=names)
    refused(dump(teacher_ckpt, f"npz:{tmp_path / 'swapped.npz'}", tmp_path / "c"),
            "the teacher's classes are in another order than the data's: its output 3 is '3', which is class 5",
            "(2 of 10 classes moved)")
    assert not (tmp_path / "c").exists()
    np.savez(tmp_path / "named.npz", **{k: getattr(fmnist, k) for k in ("x_train", "y_train", "x_test", "y_test")},
             class_names=np.array([f"c{i}" for i in range(10)]))
    r = ok(dump(teacher_ckpt, f"npz:{tmp_path / 'named.npz'}", tmp_path / "n"))
    assert "note: the teacher was trained on classes 0, 1, 2, 3, ...;" in r.output
    assert "has c0, c1, c2, c3, ...: output i is taken as class i" in r.output


def test_an_untrained_teacher_is_at_chance(tmp_path, fmnist):
    from kdpipe.checkpoint import save_checkpoint
    from kdpipe.models import create_model
    torch.manual_seed(0)
    path = tmp_path / "untrained.pt"
    save_checkpoint(path, create_model("cnn_tiny", 10, (1, 28, 28)), arch="cnn_tiny", num_classes=10,
                    image_shape=(1, 28, 28), mean=[0.3], std=[0.35], class_names=list("abcdefghij"), dataset={},
                    test_top1=None)
    line = refused(dump(path, fmnist.spec, tmp_path / "c"), "on 256 training samples is", "no better than chance (")
    share = np.bincount(fmnist.y_train).max() / len(fmnist.y_train)  # chance: the most common class's share
    assert f"chance ({max(0.1, share):.3f}; binomial p = " in line


def test_binomial_tail_and_the_probe_rules():
    from math import comb

    from kdpipe.teacher import binomial_tail, chance_level, check_teacher_outputs
    for k, n, p in ((0, 10, 0.1), (3, 10, 0.1), (40, 256, 0.1), (256, 256, 0.5), (5, 8, 0.5)):
        exact = sum(comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))
        assert binomial_tail(k, n, p) == pytest.approx(exact, rel=1e-9, abs=1e-300)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 256)
    good = rng.normal(size=(256, 10))
    good[np.arange(256), labels] += 3
    assert check_teacher_outputs(good, labels, 10)[0] is None
    assert "no better than chance" in check_teacher_outputs(rng.normal(size=(256, 10)), labels, 10)[0]
    probs = np.exp(good) / np.exp(good).sum(1, keepdims=True)
    assert "probabilities" in check_teacher_outputs(probs, labels, 10)[0]
    # A teacher saved in bfloat16 (run as saved) gives probabilities whose rows sum to 1 within its rounding only.
    soft = torch.from_numpy(good).to(torch.bfloat16).softmax(1).float().numpy()
    assert np.abs(soft.sum(1) - 1).max() > 1e-3
    assert "probabilities" in check_teacher_outputs(soft, labels, 10)[0]
    # Log-probabilities are fine as logits (their softmax is the distribution).
    assert check_teacher_outputs(np.log(probs), labels, 10)[0] is None
    # On imbalanced labels, always answering the common class is chance too.
    skewed = np.where(rng.random(256) < 0.9, 0, 1)
    constant = np.tile(np.array([[2.0, 0.0]]), (256, 1))
    assert check_teacher_outputs(constant, skewed, 2)[0] is None  # against 1/2 it would pass...
    assert "no better than chance" in check_teacher_outputs(constant, skewed, 2, chance_level(skewed, 2))[0]
    assert chance_level(np.repeat(np.arange(10), 3), 10) == pytest.approx(0.1)
    # 8 samples of 2 classes cannot show anything: the chance test is skipped and says so.
    stop, summary = check_teacher_outputs(rng.normal(size=(8, 2)), rng.integers(0, 2, 8), 2)
    assert stop is None and "too few samples" in summary


# ---------------------------------------------------------------- outputs

def test_a_tuple_teacher_gives_its_first_entry(ref, tmp_path):
    ts = trace(TupleOut(ref.net), tmp_path / "tuple.ts")
    ok(dump(ts, ref.spec, tmp_path / "c", *ref.norm))
    assert_cache_holds(tmp_path / "c", ref.net)
    refused(dump(ts, ref.spec, tmp_path / "d", *ref.norm, "--teacher-output", 1),
            "the teacher outputs shape (7,) per image")
    refused(dump(ts, ref.spec, tmp_path / "d", *ref.norm, "--teacher-output", 5),
            "--teacher-output 5: the teacher returns a tuple of 2")


def test_a_dict_teacher_gives_logits_or_the_entry_named(ref, tmp_path):
    ts = trace(DictOut(ref.net), tmp_path / "dict.ts")
    ok(dump(ts, ref.spec, tmp_path / "c", *ref.norm))
    assert_cache_holds(tmp_path / "c", ref.net)
    other = trace(DictOut(ref.net, key="scores"), tmp_path / "scores.ts")
    refused(dump(other, ref.spec, tmp_path / "d", *ref.norm), "a dict with keys 'features', 'scores'",
            "--teacher-output NAME|INDEX")
    out = tmp_path / "e"
    ok(dump(other, ref.spec, out, *ref.norm, "--teacher-output", "scores"))
    m = assert_cache_holds(out, ref.net)
    assert m["teacher"]["output"] == "scores"
    assert "teacher output scores" in ok(invoke("inspect", out)).output
    # verify-cache picks the same entry from the manifest, and re-runs with the same normalization.
    ok(invoke("verify-cache", out, "--teacher", other, "--sample", 64))


def test_output_adapters_for_lists_and_objects_with_logits():
    from kdpipe.checkpoint import pick_logits
    t = torch.randn(3, 4)
    assert pick_logits([t, 1]) is t and pick_logits({"out": t}) is t
    assert pick_logits(types.SimpleNamespace(logits=t, hidden=None)) is t
    assert pick_logits({"a": 1, "b": t}, "b") is t and pick_logits((1, t), "1") is t
    assert pick_logits(types.SimpleNamespace(scores=t), "scores") is t
    with pytest.raises(KDPipeError, match="^the teacher returns a str, not logits: pick the logits with"):
        pick_logits("nope")
    with pytest.raises(KDPipeError, match="first entry of the teacher's output is a str, not a tensor"):
        pick_logits(("x", t))
    assert pick_logits((1, t), "-1") is t
    for bad in ("--1", "²", "1.0"):  # "--1" passed as an index, then int() raised a ValueError traceback
        with pytest.raises(KDPipeError, match=f"--teacher-output {bad}: the teacher returns a tuple of 2"):
            pick_logits((1, t), bad)


# ---------------------------------------------------------------- formats

def test_a_torch_export_program_dumps_its_own_outputs(ref, tmp_path):
    batch = torch.export.Dim("batch", min=1)
    prog = torch.export.export(DictOut(ref.net).eval(), (torch.randn(4, 1, 28, 28),), dynamic_shapes=({0: batch},))
    torch.export.save(prog, str(tmp_path / "t.pt2"))
    out = tmp_path / "c"
    ok(dump(tmp_path / "t.pt2", ref.spec, out, *ref.norm))
    m = assert_cache_holds(out, ref.net)
    assert m["teacher"]["kind"] == "export"
    ok(invoke("verify-cache", out, "--teacher", tmp_path / "t.pt2", "--sample", 64))
    # Exported for one batch size only: one line that says where it failed.
    fixed = torch.export.export(ref.net, (torch.randn(4, 1, 28, 28),))
    torch.export.save(fixed, str(tmp_path / "fixed.pt2"))
    refused(dump(tmp_path / "fixed.pt2", ref.spec, tmp_path / "d", *ref.norm), "the teacher fails on inputs of shape")
    refused(dump(tmp_path / "t.pt2", ref.spec, tmp_path / "d", *ref.norm, "--teacher-arch", "cnn_small"),
            "is a torch.export program", "drop --teacher-arch")



def test_an_rgb_program_teacher_runs_on_grey_images_with_in_chans_3(ref, tmp_path):
    """A TorchScript teacher of RGB images could not dump grey data (no option repeated the channel, as
    --arch-args in_chans=3 does for a timm architecture), and --arch-args given with a program was ignored. Now
    in_chans=3 repeats grey views to 3 channels, the cache records it (its id differs) and verify-cache re-runs
    the teacher so; any other option is refused, for a program or a kdpipe checkpoint."""
    torch.manual_seed(0)
    rgb = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    with torch.no_grad():  # channels weighed differently: a repeat, not a single channel, gives these logits
        rgb[0].weight.mul_(torch.tensor([1.0, -2.0, 3.0]).view(1, 3, 1, 1))
    ts = tmp_path / "rgb.ts"
    torch.jit.trace(rgb, torch.randn(2, 3, 28, 28)).save(str(ts))
    out = tmp_path / "c"
    ok(dump(ts, ref.spec, out, *ref.norm, "--arch-args", "in_chans=3", "--force"))
    m = assert_cache_holds(out, lambda x: rgb(x.expand(-1, 3, -1, -1)))
    assert m["teacher"]["model"] == {"spec": "torchscript", "args": {"in_chans": 3}}
    ok(invoke("verify-cache", out, "--teacher", ts, "--sample", 64))  # the recorded in_chans, not given again
    for teacher, kind, norm in ((ts, "a TorchScript program", ref.norm), (ref.ckpt, "a kdpipe checkpoint", [])):
        refused(dump(teacher, ref.spec, tmp_path / "x", *norm, "--arch-args", "in_chans=3,width=4"),
                f"is {kind}", "--arch-args in_chans=3,width=4 cannot change it")
    refused(dump(ts, ref.spec, tmp_path / "x", *ref.norm, "--arch-args", "in_chans=4"), "in_chans=3 alone")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_teacher_saved_in_half_precision_runs_as_saved(ref, tmp_path, dtype):
    """A TorchScript teacher saved with .half() (an export for a GPU) failed its first batch with "Input type
    (torch.FloatTensor) and weight type (torch.HalfTensor) should be the same". Its inputs now go in its dtype and
    its logits come back as float32: the cache holds what the saved program computes, and verify-cache agrees."""
    ts = tmp_path / "half.ts"
    trace(ref.net, ts)
    prog = torch.jit.load(str(ts)).to(dtype)
    prog.save(str(ts))
    out = tmp_path / "c"
    ok(dump(ts, ref.spec, out, *ref.norm))
    assert_cache_holds(out, lambda x: prog(x.to(dtype)), atol=0)
    ok(invoke("verify-cache", out, "--teacher", ts, "--sample", 64))
    mixed = nn.Sequential(nn.Flatten(), nn.Linear(784, 10).half(), nn.Linear(10, 10))  # not one dtype: left alone
    assert half_dtype(mixed) is None and half_dtype(ref.net) is None and half_dtype(prog) is dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_frozen_torchscript_teacher_in_half_precision_runs_as_saved(ref, tmp_path, dtype):
    """torch.jit.freeze (and optimize_for_inference, the usual TorchScript export for deployment) makes the weights
    constants of the graph: the program lists no parameters, so its dtype was not seen and its first batch failed
    with 'Input type (float) and bias type (c10::Half) should be the same'. The graph's constants say it."""
    ts = tmp_path / "frozen.ts"
    prog = torch.jit.freeze(torch.jit.script(copy.deepcopy(ref.net).eval().to(dtype)))
    prog.save(str(ts))
    prog = torch.jit.load(str(ts))
    assert not list(prog.parameters()) and half_dtype(prog) is dtype
    out = tmp_path / "c"
    ok(dump(ts, ref.spec, out, *ref.norm))
    assert_cache_holds(out, lambda x: prog(x.to(dtype)), atol=0)
    frozen32 = torch.jit.freeze(torch.jit.script(copy.deepcopy(ref.net).eval()))
    assert half_dtype(frozen32) is None


def test_a_torchscript_teacher_that_fails_says_why_not_where(ref, tmp_path):
    """TorchScript's errors open with 'The following operation failed in the TorchScript interpreter.' and
    its traceback: the one line must carry the error at its end (here: 3 channels expected, 1 given)."""
    rgb = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    for name, prog in (("traced", torch.jit.trace(rgb, torch.randn(2, 3, 28, 28))), ("scripted", torch.jit.script(rgb))):
        prog.save(str(tmp_path / f"{name}.ts"))
        line = refused(dump(tmp_path / f"{name}.ts", ref.spec, tmp_path / "x", *ref.norm),
                       "the teacher fails on inputs of shape (256, 1, 28, 28)", "to have 3 channels, but got 1",
                       "give --arch-args in_chans=3 to repeat them to 3 channels")
        assert "TorchScript interpreter" not in line
    # With --features the teacher first runs on two blank inputs to size them: as one line too.
    torch.save(rgb.state_dict(), tmp_path / "rgb.pth")
    (tmp_path / "nets.py").write_text("import torch.nn as nn\n\ndef rgb(num_classes):\n    return nn.Sequential("
                                      "nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))\n")
    refused(dump(tmp_path / "rgb.pth", ref.spec, tmp_path / "x", "--teacher-arch", f"{tmp_path / 'nets.py'}:rgb",
                 "--features", "1", *ref.norm), "the teacher fails on inputs of shape (3, 1, 28, 28)", "3 channels")

def test_state_dicts_safetensors_and_pickles(ref, tmp_path, monkeypatch):
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in ref.net.state_dict().items()}
    save_file(state, str(tmp_path / "t.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "t.pth")
    out = tmp_path / "st"
    ok(dump(tmp_path / "t.safetensors", ref.spec, out, "--teacher-arch", "cnn_small", *ref.norm))
    m = assert_cache_holds(out, ref.net)
    assert m["teacher"]["kind"] == "safetensors" and m["teacher"]["model"]["spec"] == "kdpipe:cnn_small"
    # verify-cache rebuilds the architecture the manifest records.
    ok(invoke("verify-cache", out, "--teacher", tmp_path / "t.safetensors", "--sample", 32))
    ok(dump(tmp_path / "t.pth", ref.spec, tmp_path / "pth", "--teacher-arch", "kdpipe:cnn_small", *ref.norm))
    assert_cache_holds(tmp_path / "pth", ref.net)
    refused(dump(tmp_path / "t.safetensors", ref.spec, tmp_path / "x", *ref.norm),
            "t.safetensors is a safetensors file of", "tensors with no architecture: give --teacher-arch")
    refused(dump(tmp_path / "t.pth", ref.spec, tmp_path / "x", *ref.norm), "is a state dict of")
    refused(dump(tmp_path / "t.pth", ref.spec, tmp_path / "x", "--teacher-arch", "cnn_tiny", *ref.norm),
            "do not fit the architecture cnn_tiny", "is (16, 1, 3, 3) in the file, (8, 1, 3, 3) in the network")
    # Weights for another number of classes are said to be that, not cut from torch's long message.
    from kdpipe.models import create_model
    torch.save(create_model("cnn_small", 11, (1, 28, 28)).state_dict(), tmp_path / "eleven.pth")
    refused(dump(tmp_path / "eleven.pth", ref.spec, tmp_path / "x", "--teacher-arch", "cnn_small", *ref.norm),
            "has 11 outputs, the architecture 10", "weights are for another number of classes")
    # A whole pickled model runs code from the file: only with --trust-pickle.
    torch.save(ref.net, tmp_path / "whole.pt")
    refused(dump(tmp_path / "whole.pt", ref.spec, tmp_path / "x", *ref.norm),
            "is a pickled Python object", "--trust-pickle")
    ok(dump(tmp_path / "whole.pt", ref.spec, tmp_path / "pk", "--trust-pickle", *ref.norm))
    assert_cache_holds(tmp_path / "pk", ref.net)
    (tmp_path / "junk.bin").write_bytes(b"\x00garbage" * 20)
    refused(dump(tmp_path / "junk.bin", ref.spec, tmp_path / "x", *ref.norm), "none of the model files kdpipe reads")
    # Without the optional package: one line with the pip command.
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    refused(dump(tmp_path / "t.safetensors", ref.spec, tmp_path / "x", "--teacher-arch", "cnn_small", *ref.norm),
            "pip install 'kdpipe[safetensors]'")


def test_state_dicts_saved_from_wrappers_load_without_their_prefix(ref, tmp_path):
    """Weights saved from DataParallel/DDP ("module."), torch.compile ("_orig_mod.") or a Lightning module
    ("model."), the common CIFAR checkpoint {"net": ..., "acc": ...}: the prefix every name shares is
    removed when that makes the names exactly the architecture's, with a note; the cache holds the
    teacher's own outputs. A prefix on some names only, or names that still do not fit, are refused."""
    state = ref.net.state_dict()
    for name, obj, prefix in (
            ("dp", {f"module.{k}": v for k, v in state.items()}, "'module.'"),
            ("compiled_ddp", {f"module._orig_mod.{k}": v for k, v in state.items()}, "'module._orig_mod.'"),
            ("lightning", {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}, "'model.'"),
            ("kuangliu", {"net": {f"module.{k}": v for k, v in state.items()}, "acc": 91.2, "epoch": 180},
             "'module.'")):
        torch.save(obj, tmp_path / f"{name}.pth")
        res = ok(dump(tmp_path / f"{name}.pth", ref.spec, tmp_path / name, "--teacher-arch", "cnn_small", *ref.norm))
        assert f"starts with {prefix}" in res.stderr, name
        assert_cache_holds(tmp_path / name, ref.net)
    torch.save(state, tmp_path / "plain.pth")
    assert "starts with" not in ok(dump(tmp_path / "plain.pth", ref.spec, tmp_path / "plain", "--teacher-arch",
                                        "cnn_small", *ref.norm)).stderr
    # the weights under a later key than one holding something else ({"model": its config}): read, not refused
    torch.save({"model": {"arch": "cnn_small", "width": 2}, "model_state_dict": state, "epoch": 3},
               tmp_path / "config.pth")
    ok(dump(tmp_path / "config.pth", ref.spec, tmp_path / "config", "--teacher-arch", "cnn_small", *ref.norm))
    assert_cache_holds(tmp_path / "config", ref.net)
    some = {(f"module.{k}" if i % 2 else k): v for i, (k, v) in enumerate(state.items())}
    torch.save(some, tmp_path / "some.pth")
    refused(dump(tmp_path / "some.pth", ref.spec, tmp_path / "x", "--teacher-arch", "cnn_small", *ref.norm),
            "do not fit the architecture cnn_small")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "other.pth")
    refused(dump(tmp_path / "other.pth", ref.spec, tmp_path / "x", "--teacher-arch", "cnn_tiny", *ref.norm),
            "do not fit the architecture cnn_tiny")


class RunConfig:
    """A training script's own config object saved beside the weights."""

    def __init__(self):
        self.lr = 0.1


def test_a_timm_training_checkpoint_and_moving_average_weights(ref, tmp_path):
    """timm's train.py saves {"state_dict", "state_dict_ema", "args": argparse.Namespace, ...}: the Namespace made
    it 'a whole model saved with torch.save(model)' that needed --trust-pickle; it loads (plain data), and a note
    says which of its two sets of weights is read. A file holding only an average's weights ({"ema": ...})
    or sets under other names was 'neither a kdpipe checkpoint nor a state dict of tensors'."""
    import argparse
    state = ref.net.state_dict()
    other = {k: torch.zeros_like(v) for k, v in state.items()}
    torch.save({"epoch": 30, "arch": "cnn_small", "state_dict": state, "optimizer": {"state": {}, "param_groups": []},
                "version": 2, "args": argparse.Namespace(lr=0.1, model="cnn_small"), "metric": 61.2,
                "state_dict_ema": other}, tmp_path / "model_best.pth.tar")
    res = ok(dump(tmp_path / "model_best.pth.tar", ref.spec, tmp_path / "timm", "--teacher-arch", "cnn_small",
                  *ref.norm))
    assert "holds weights under 'state_dict', 'state_dict_ema': kdpipe reads 'state_dict'" in res.stderr
    assert_cache_holds(tmp_path / "timm", ref.net)
    torch.save({"ema": state, "epoch": 3}, tmp_path / "ema.pth")
    ok(dump(tmp_path / "ema.pth", ref.spec, tmp_path / "ema", "--teacher-arch", "cnn_small", *ref.norm))
    assert_cache_holds(tmp_path / "ema", ref.net)
    # torchvision's reference script: --model-ema keeps an AveragedModel, whose weights start with "module." and
    # come with its count "n_averaged" (they were refused: "unexpected n_averaged, module.features.0.weight ...")
    from torch.optim.swa_utils import AveragedModel
    torch.save(AveragedModel(ref.net).state_dict(), tmp_path / "model_ema.pth")
    res = ok(dump(tmp_path / "model_ema.pth", ref.spec, tmp_path / "swa", "--teacher-arch", "cnn_small", *ref.norm))
    assert "starts with 'module.'" in res.stderr
    assert_cache_holds(tmp_path / "swa", ref.net)
    torch.save({"teacher": state, "student": other}, tmp_path / "two.pth")
    refused(dump(tmp_path / "two.pth", ref.spec, tmp_path / "x", "--teacher-arch", "cnn_small", *ref.norm),
            "two.pth holds weights under 'teacher', 'student', none of the keys kdpipe reads",
            "torch.save(checkpoint[KEY], FILE)")
    torch.save({"state_dict": state, "config": RunConfig()}, tmp_path / "config.pth")
    refused(dump(tmp_path / "config.pth", ref.spec, tmp_path / "x", "--teacher-arch", "cnn_small", *ref.norm),
            "is a pickled Python object (", "RunConfig) (a whole model", "or holds one beside its weights",
            "--trust-pickle")


def test_a_pickled_model_whose_code_is_not_importable_says_what_to_do(ref, tmp_path, monkeypatch):
    """torch.save(model) in a training script whose class lives in the script (its __main__), or in the
    project's own module: with --trust-pickle the line was pickle's "Can't get attribute 'Net' on <module
    'kdpipe.__main__'>" or "No module named 'nets_of_the_project'", with nothing to do about it."""
    import importlib
    main = sys.modules["__main__"]
    scripted = type("ScriptNet", (nn.Sequential,), {"__module__": "__main__"})
    monkeypatch.setattr(main, "ScriptNet", scripted, raising=False)
    torch.save(scripted(nn.Flatten(), nn.Linear(784, 10)), tmp_path / "script.pt")
    monkeypatch.delattr(main, "ScriptNet")
    refused(dump(tmp_path / "script.pt", ref.spec, tmp_path / "x", "--trust-pickle", *ref.norm),
            "Can't get attribute 'ScriptNet'", "a class of the script that saved it",
            "save its state_dict (torch.save(model.state_dict(), FILE)) and give --teacher-arch PATH.py:CLASS")
    (tmp_path / "nets_of_the_project.py").write_text("import torch.nn as nn\n\n\nclass Net(nn.Sequential):\n"
                                                     "    pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        mod = importlib.import_module("nets_of_the_project")
        torch.save(mod.Net(nn.Flatten(), nn.Linear(784, 10)), tmp_path / "project.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("nets_of_the_project", None)
    refused(dump(tmp_path / "project.pt", ref.spec, tmp_path / "x", "--trust-pickle", *ref.norm),
            "the pickle names code of the module 'nets_of_the_project', not importable here: add the folder",
            "to PYTHONPATH")


def test_a_torchvision_resnet_with_the_cifar_stem_from_a_state_dict(ref, tmp_path):
    """The CIFAR adaptation of a torchvision ResNet (conv1 3x3 stride 1, no max-pool), saved as a state
    dict, is read with --arch-args cifar_stem=true: the cache holds its own outputs (grey images repeated
    to 3 channels, as for any torchvision model). Without the option the weights do not fit, in one line."""
    import torchvision
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    net.eval()
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    out = tmp_path / "cache"
    ok(dump(tmp_path / "r18.pth", ref.spec, out, "--teacher-arch", "tv:resnet18", "--arch-args", "cifar_stem=true",
            "--force", *ref.norm))
    m = assert_cache_holds(out, lambda x: net(x.repeat(1, 3, 1, 1)), atol=1e-3)
    assert m["teacher"]["model"]["args"] == {"cifar_stem": True}
    # saved from DataParallel: the prefix goes, and the weights fill the torchvision model inside the grey wrapper
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "dp.pth")
    res = ok(dump(tmp_path / "dp.pth", ref.spec, tmp_path / "dp", "--teacher-arch", "tv:resnet18", "--arch-args",
                  "cifar_stem=true", "--force", *ref.norm))
    assert "starts with 'module.'" in res.stderr
    assert_cache_holds(tmp_path / "dp", lambda x: net(x.repeat(1, 3, 1, 1)), atol=1e-3)
    refused(dump(tmp_path / "r18.pth", ref.spec, tmp_path / "x", "--teacher-arch", "tv:resnet18", "--force",
                 *ref.norm), "do not fit the architecture tv:resnet18", "conv1.weight")
    refused(dump(tmp_path / "r18.pth", ref.spec, tmp_path / "x", "--teacher-arch", "tv:vgg11", "--arch-args",
                 "cifar_stem=true", "--force", *ref.norm), "cifar_stem applies to torchvision ResNets")


def _fake_timm(created: list):
    """A stand-in for the timm package: create_model(name, pretrained, num_classes, in_chans, **kw)."""
    from kdpipe.models import SmallCNN
    mod = types.ModuleType("timm")

    def create_model(name, pretrained=False, num_classes=1000, in_chans=3, **kw):
        created.append((name, pretrained, num_classes, in_chans, kw))
        if name != "fake_cnn_small":
            raise RuntimeError(f"Unknown model ({name})")
        return SmallCNN(in_chans, num_classes, widths=(16, 32), hidden=kw.get("hidden", 64))

    mod.create_model = create_model
    return mod


def test_timm_models_by_name_and_a_one_line_refusal_without_timm(ref, tmp_path, monkeypatch):
    torch.save(ref.net.state_dict(), tmp_path / "w.pt")
    monkeypatch.setitem(sys.modules, "timm", None)  # not installed
    refused(dump(tmp_path / "w.pt", ref.spec, tmp_path / "x", "--teacher-arch", "timm:fake_cnn_small", *ref.norm),
            "timm: architectures need the optional package timm: pip install 'kdpipe[timm]'")
    created = []
    monkeypatch.setitem(sys.modules, "timm", _fake_timm(created))
    out = tmp_path / "c"
    ok(dump(tmp_path / "w.pt", ref.spec, out, "--teacher-arch", "timm:fake_cnn_small", "--arch-args", "hidden=64",
            *ref.norm))
    assert created[-1] == ("fake_cnn_small", False, 10, 1, {"hidden": 64})  # never pretrained (no download)
    m = assert_cache_holds(out, ref.net)
    assert m["teacher"]["model"] == {"spec": "timm:fake_cnn_small", "args": {"hidden": 64}}
    refused(dump(tmp_path / "w.pt", ref.spec, tmp_path / "x", "--teacher-arch", "timm:nope", *ref.norm),
            "cannot build timm model nope: Unknown model (nope)")


def test_a_real_timm_model_fills_from_a_state_dict(fmnist, tmp_path):
    """timm itself (the test extra installs it): its tiny test_resnet, untrained (so --force), built for
    grey 28x28 inputs and 10 classes, pretrained=False."""
    from kdpipe.models import create_model
    torch.manual_seed(0)
    net = create_model("timm:test_resnet", 10, (1, 28, 28), {"drop_rate": 0.0}).eval()
    torch.save(net.state_dict(), tmp_path / "w.pth")
    out = tmp_path / "c"
    r = ok(dump(tmp_path / "w.pth", fmnist.spec, out, "--teacher-arch", "timm:test_resnet", "--arch-args",
                "drop_rate=0.0", "--input-range", "0-1", "--force"))
    assert "warning (--force)" in r.output
    m = assert_cache_holds(out, net)
    assert m["teacher"]["model"] == {"spec": "timm:test_resnet", "args": {"drop_rate": 0.0}}


def test_a_timm_teachers_evaluation_resize_is_named_where_the_photos_are_stored_otherwise(tmp_path):
    """A timm teacher given as weights, dumped over photos: its pretrained_cfg says how timm evaluates it
    (test_resnet: crop_pct 0.95, bilinear), which --resize crop:R:bilinear stores exactly; where the photos are
    stored otherwise a note names that --resize (the dump goes on: the user's own evaluation may differ)."""
    from kdpipe.models import create_model
    from test_data import _aspect_folder
    _aspect_folder(tmp_path / "p", [(60, 20), (20, 60), (33, 33), (45, 30)])
    spec = f"imagefolder:{tmp_path / 'p'}"
    torch.manual_seed(0)
    torch.save(create_model("timm:test_resnet", 2, (3, 20, 20)).eval().state_dict(), tmp_path / "w.pth")
    args = ("--teacher-arch", "timm:test_resnet", "--input-range", "0-1", "--force", "--image-size", 20)
    note = ("note: timm evaluates timm:test_resnet on Resize(21, bilinear) + CenterCrop(20) (its pretrained_cfg: "
            "crop_pct 0.95), which --resize crop:21:bilinear stores exactly; these photos are stored by --resize crop: "
            "give --resize crop:21:bilinear if your teacher was evaluated so")
    assert note in ok(dump(tmp_path / "w.pth", spec, tmp_path / "a", *args)).output
    r = ok(dump(tmp_path / "w.pth", spec, tmp_path / "b", *args, "--resize", "crop:21:bilinear"))
    assert "timm evaluates" not in r.output


def test_an_rgb_timm_model_on_grey_images_with_in_chans_3(fmnist, tmp_path):
    """An RGB timm teacher's state dict on grey data: kdpipe builds timm models for the images' channels, so
    the stem did not fit, and --arch-args in_chans=3 was 'got multiple values for keyword argument'. It
    now builds the RGB model and repeats grey images to 3 channels (as for torchvision models); the
    refusal without it says so."""
    from kdpipe.models import create_model
    torch.manual_seed(0)
    net = create_model("timm:test_resnet", 10, (3, 28, 28), {"drop_rate": 0.0}).eval()
    torch.save(net.state_dict(), tmp_path / "rgb.pth")
    args = ("--teacher-arch", "timm:test_resnet", "--input-range", "0-1", "--force")
    refused(dump(tmp_path / "rgb.pth", fmnist.spec, tmp_path / "x", *args),
            "is (", "3, 3) in the file", "give --arch-args in_chans=3 to repeat grey images")
    out = tmp_path / "c"
    ok(dump(tmp_path / "rgb.pth", fmnist.spec, out, *args, "--arch-args", "in_chans=3,drop_rate=0.0"))
    m = assert_cache_holds(out, lambda x: net(x.repeat(1, 3, 1, 1)))
    assert m["teacher"]["model"]["args"] == {"in_chans": 3, "drop_rate": 0.0}
    ok(invoke("verify-cache", out, "--teacher", tmp_path / "rgb.pth", "--sample", 32))
    refused(dump(tmp_path / "rgb.pth", fmnist.spec, tmp_path / "x", *args, "--arch-args", "in_chans=2"),
            "timm:test_resnet with in_chans=2 cannot take 1-channel images")


NETS = '''
import torch.nn as nn


class StudentNet(nn.Module):
    def __init__(self, num_classes, width=8):
        super().__init__()
        self.width = width
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.body(x)


class TwoHeads(StudentNet):
    def forward(self, x):
        return self.body(x), x
'''


def test_the_users_own_file_for_teacher_and_students(fmnist, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "nets.py").write_text(NETS)
    teacher, cache, runs = tmp_path / "t.pt", tmp_path / "cache", tmp_path / "runs"
    ok(invoke("train-teacher", "--data", fmnist.spec, "--arch", "models/nets.py:StudentNet", "--arch-args",
              "width=32", "--epochs", 2, "--batch-size", 64, "--policy", "none", "--device", "cpu", "--out", teacher))
    ck = torch.load(teacher, weights_only=True)
    assert ck["arch"] == "models/nets.py:StudentNet"
    assert ck["model"]["args"] == {"width": 32} and ck["model"]["spec"] == "models/nets.py:StudentNet"
    assert len(ck["model"]["sha256"]) == 64 and ck["model"]["file"] == str(tmp_path / "models" / "nets.py")
    ok(invoke("dump-logits", "--teacher", teacher, "--data", fmnist.spec, "--views", 1, "--policy", "none",
              "--logits-dtype", "float32", "--device", "cpu", "--out", cache))
    from kdpipe.checkpoint import load_teacher
    net = load_teacher(teacher).module
    assert net.width == 32
    assert_cache_holds(cache, net)
    # A package module as student, with its own options; run names stay file-name safe.
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "zoo.py").write_text(NETS.replace("StudentNet", "Tiny"))
    monkeypatch.syspath_prepend(str(tmp_path))
    ok(invoke("train-student", "--cache", cache, "--student", "mypkg.zoo:Tiny", "--student",
              "models/nets.py:StudentNet", "--arch-args", "width=4", "--epochs", 1, "--batch-size", 128,
              "--device", "cpu", "--out", runs))
    names = sorted(p.name for p in runs.iterdir())
    assert names == ["mypkg.zoo_Tiny-width4-T4-a0.9-e1-s0", "nets.py_StudentNet-width4-T4-a0.9-e1-s0"]
    st = torch.load(runs / names[0] / "student.pt", weights_only=True)
    assert st["model"]["spec"] == "mypkg.zoo:Tiny" and st["model"]["args"] == {"width": 4}
    assert load_teacher(runs / names[1] / "student.pt").module.width == 4
    # The file changes: loading warns (on stderr), naming it and both hashes.
    (tmp_path / "models" / "nets.py").write_text(NETS + "\n# edited\n")
    r = ok(invoke("verify-cache", cache, "--teacher", teacher, "--sample", 16))
    assert "warning: " in r.stderr and "nets.py has changed since the checkpoint was written" in r.stderr
    refused(invoke("train-student", "--cache", cache, "--student", "models/nets.py:Missing", "--epochs", 1,
                   "--device", "cpu", "--out", runs), "models/nets.py has no Missing (it defines StudentNet")
    refused(invoke("train-student", "--cache", cache, "--student", "models/nets.py:StudentNet", "--arch-args",
                   "depth=3", "--epochs", 1, "--device", "cpu", "--out", runs),
            "does not take the options depth")
    refused(invoke("train-student", "--cache", cache, "--student", "models/nets.py:TwoHeads", "--epochs", 1,
                   "--device", "cpu", "--out", runs), "models/nets.py:TwoHeads returns a tuple for a batch of 2")
    refused(invoke("train-teacher", "--data", fmnist.spec, "--arch", "tv:vit_b_16", "--device", "cpu", "--out",
                   tmp_path / "vit.pt"), "tv:vit_b_16 fails on inputs of shape (2, 1, 28, 28)",
            "Wrong image height! Expected 224 but got 28! (the model takes 224 x 224 inputs only: store photos at "
            "that size, --image-size 224, or make views of it, --policy resized-crop:224")
    refused(invoke("train-student", "--cache", cache, "--student", "nowhere/x.py:Net", "--epochs", 1,
                   "--device", "cpu", "--out", runs), "no such file nowhere/x.py")



FACTORIES = '''
import torch.nn as nn


class Wide(nn.Module):
    def __init__(self, num_classes, width):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.body(x)


def broken(num_classes):
    raise ValueError("no such checkpoint layout")
'''


def test_a_user_factory_that_needs_arguments_or_raises_is_one_line(fmnist, tmp_path, monkeypatch):
    """The user's factory is called with num_classes and image_shape, and --arch-args: one it needs besides,
    or an error it raises while building, was a traceback; it is one line saying what to give."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nets.py").write_text(FACTORIES)
    torch.save({"model": {"x": torch.zeros(1)}}, tmp_path / "w.pth")
    mean_std = ("--mean", 0.3, "--std", 0.35)
    refused(dump(tmp_path / "w.pth", fmnist.spec, tmp_path / "c", "--teacher-arch", "nets.py:Wide", *mean_std),
            "nets.py:Wide cannot be built: missing a required argument: 'width'", "--arch-args")
    refused(dump(tmp_path / "w.pth", fmnist.spec, tmp_path / "c", "--teacher-arch", "nets.py:broken", *mean_std),
            "nets.py:broken raised ValueError while building the model: no such checkpoint layout")
    refused(dump(tmp_path / "w.pth", fmnist.spec, tmp_path / "c", "--teacher-arch", "nets.py:Wide", "--arch-args",
                 "width=8,depth=2", *mean_std), "nets.py:Wide does not take the options depth:")
    refused(invoke("train-teacher", "--data", fmnist.spec, "--arch", "nets.py:Wide", "--epochs", 1, "--device", "cpu",
                   "--out", tmp_path / "t.pt"), "nets.py:Wide cannot be built", "--arch-args")
    assert not (tmp_path / "c").exists() and not (tmp_path / "t.pt").exists()


SCALED = '''
import torch.nn as nn

from kdpipe.models import create_model


class Scaled(nn.Module):
    def __init__(self, num_classes, image_shape, scale=1.0):
        super().__init__()
        self.net = create_model("cnn_small", num_classes, image_shape)
        self.scale = scale

    def forward(self, x):
        return self.net(x) * self.scale
'''


def test_a_resumed_dump_refuses_other_architecture_options_or_code(ref, tmp_path, monkeypatch):
    """A state dict's sha256 covers its weights only: the same file with other --arch-args, or built from
    the user's code after it was edited, is another teacher. Resuming with either used to keep the shards
    of the first and add those of the second, one cache of two teachers (and a finished cache was
    'already complete'); the dump is refused, naming the difference."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nets.py").write_text(SCALED)
    torch.save({"net." + k: v for k, v in ref.net.state_dict().items()}, tmp_path / "w.pth")
    out = tmp_path / "c"
    args = ("--teacher-arch", "nets.py:Scaled", *ref.norm, "--shard-rows", 256)
    ok(dump(tmp_path / "w.pth", ref.spec, out, *args))
    (out / "manifest.json").unlink()
    (out / "shard-00003.h5").unlink()  # as if the dump had been killed before its last shard
    refused(dump(tmp_path / "w.pth", ref.spec, out, *args, "--arch-args", "scale=3"),
            "holds a cache made with other arguments (teacher.arch_args was None, now {'scale': 3})")
    (tmp_path / "nets.py").write_text(SCALED.replace("* self.scale", "* self.scale * 2"))
    refused(dump(tmp_path / "w.pth", ref.spec, out, *args), "teacher.code_sha256 was")
    (tmp_path / "nets.py").write_text(SCALED)
    r = ok(dump(tmp_path / "w.pth", ref.spec, out, *args))
    assert "resuming: 3 complete shard(s) kept, 1 to compute" in r.output
    assert_cache_holds(out, ref.net)
    ok(dump(tmp_path / "w.pth", ref.spec, out, *args, "--arch-args", "scale=3", "--overwrite"))
    assert_cache_holds(out, lambda x: ref.net(x) * 3)

# ---------------------------------------------------------------- names

def test_architecture_names_are_unambiguous():
    from kdpipe.models import canonical, create_model, parse_arch_args, registered, torchvision_models
    assert not set(registered()) & set(torchvision_models())
    assert canonical("cnn_small") == "kdpipe:cnn_small" and canonical("resnet18") == "tv:resnet18"
    assert canonical("torchvision:resnet18") == "tv:resnet18" and canonical("timm:convnext_tiny") == "timm:convnext_tiny"
    assert canonical("a/b.py:Net") == "a/b.py:Net" and canonical("pkg.mod:make") == "pkg.mod:make"
    assert parse_arch_args("width=16,drop=0.5,act=relu,bias=false") == {"width": 16, "drop": 0.5, "act": "relu",
                                                                         "bias": False}
    net = create_model("tv:resnet18", 10, (3, 32, 32), {"zero_init_residual": True})
    assert net.fc.out_features == 10
    with pytest.raises(KDPipeError, match="registry has"):
        create_model("kdpipe:resnet18", 10, (3, 32, 32))
    with pytest.raises(KDPipeError, match="does not take the options width"):
        create_model("cnn_small", 10, (1, 28, 28), {"width": 3})
    with pytest.raises(KDPipeError, match="bad architecture option"):
        parse_arch_args("width")


def test_pipelines_carry_architecture_options_and_teacher_files(tmp_path):
    from kdpipe.pipeline import load_pipeline, make_rules
    spec = tmp_path / "p.toml"
    spec.write_text('''
[data]
spec = "fashion-mnist"
[teacher]
file = "weights/t.safetensors"
arch = "timm:resnet18"
arch_args = {drop_rate = 0.1}
normalize = "imagenet"
output = "logits"
[dump]
views = 2
force = true
[[students]]
archs = ["nets.py:StudentNet"]
arch_args = "width=8"
epochs = 2
''')
    rules = make_rules(load_pipeline(spec))
    assert ("dump-logits --teacher weights/t.safetensors --data fashion-mnist --teacher-arch timm:resnet18 "
            "--arch-args drop_rate=0.1 --teacher-output logits --normalize imagenet --views 2 --force") in rules
    assert "--student nets.py:StudentNet --arch-args width=8" in rules
    assert "runs/p/students/nets.py_StudentNet-width8-T4-a0.9-e2-s0/metrics.json" in rules


def test_normalization_rules_for_images_and_feature_vectors():
    from kdpipe.normalization import describe, resolve_input
    other = types.SimpleNamespace(file="t.ts", kind="torchscript", mean=None, std=None)
    got = resolve_input(other, (3, 8, 8), preset="imagenet")
    assert got == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "source": "preset", "value": "imagenet"}
    assert resolve_input(other, (3, 8, 8), mean=[0.5], std=[0.25])["mean"] == [0.5] * 3  # one value for all
    assert resolve_input(other, (3, 8, 8), input_range="0-255")["std"] == [1 / 255] * 3
    assert resolve_input(other, (4,), mean=[0, 1, 2, 3], std=[1, 1, 1, 2])["std"] == [1, 1, 1, 2]
    with pytest.raises(KDPipeError, match=r"--input-range is for images; feature vectors \(4,\) take --mean/--std"):
        resolve_input(other, (4,), input_range="0-1")
    with pytest.raises(KDPipeError, match="--mean has 2 values; the inputs have 3 channels"):
        resolve_input(other, (3, 8, 8), mean=[0.1, 0.2], std=[1])
    with pytest.raises(KDPipeError, match="--std must be > 0"):
        resolve_input(other, (3, 8, 8), mean=[0.1], std=[0])
    own = types.SimpleNamespace(file="t.pt", kind="kdpipe", mean=[0.3], std=[0.4])
    assert resolve_input(own, (1, 8, 8), mean=[0.3], std=[0.4])["source"] == "checkpoint"  # the same: accepted
    own = types.SimpleNamespace(file="t.pt", kind="kdpipe", mean=[0.2869704], std=[0.3532836])
    got = resolve_input(own, (1, 8, 8), mean=[0.287], std=[0.3533])  # as `kdpipe inspect` prints them
    assert got["source"] == "checkpoint" and got["mean"] == [0.2869704] and got["std"] == [0.3532836]
    with pytest.raises(KDPipeError, match=r"mean \[0.287\], std \[0.3533\]; --mean/--std asks for mean \[0.286\]"):
        resolve_input(own, (1, 8, 8), mean=[0.286], std=[0.3533])
    assert describe({"mean": [0.3], "std": [0.4], "normalization": {"source": "checkpoint", "value": None}}) == \
        "from the teacher checkpoint: mean [0.3], std [0.4]"
    assert describe({"mean": [0.3], "std": [0.4]}).startswith("dataset statistics")  # caches made before


def test_a_model_saved_with_pickle_dump_is_refused_saying_how_to_save_it(tmp_path):
    """pickle.dump(model, f), not torch.save: kdpipe asks for --trust-pickle to load a pickled model, and with it
    torch.load said 'Invalid magic number; corrupt file?', which says neither what the file is nor what to do."""
    import pickle
    with open(tmp_path / "model.pkl", "wb") as f:
        pickle.dump(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), f)
    r = invoke("dump-logits", "--teacher", tmp_path / "model.pkl", "--trust-pickle", "--views", 2, "--limit", 50,
               "--device", "cpu", "--out", tmp_path / "c")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "model.pkl: it is a plain pickle (as pickle.dump writes), not a file torch.save wrote: save the model's " \
           "weights with torch.save(model.state_dict(), FILE) and give --teacher-arch PATH.py:CLASS" in r.stderr


def test_views_that_add_an_op_the_kdpipe_teacher_never_saw_are_noted(fmnist, tmp_path):
    """The default crop-flip over digits, whose teacher trained on crop:2: flipped digits were cached without a word,
    the teacher's top-1 on them far below its clean top-1. A note names the op and the teacher's own views; the
    teacher's views, or a mixing op added to them (function matching), are not noted."""
    from test_reliability_helpers import run_cli
    teacher = tmp_path / "t.pt"
    res = run_cli(["train-teacher", "--data", fmnist.spec, "--arch", "mlp_100", "--epochs", 1, "--policy", "crop:2",
                   "--limit", 128, "--out", teacher])
    assert res.exit_code == 0, res.output
    dump = ["dump-logits", "--teacher", teacher, "--data", fmnist.spec, "--limit", 128, "--views", 2, "--force"]
    res = run_cli(dump + ["--out", tmp_path / "c1"])
    assert res.exit_code == 0, res.output
    assert ("note: the teacher was trained on views crop:2, and these views (crop:4+flip) add flip, which it never "
            "saw") in res.output and "give --policy crop:2 for the views it was trained on" in res.output
    for i, policy in enumerate(("crop:2", "crop:4", "crop:2+mixup:1")):
        res = run_cli(dump + ["--policy", policy, "--out", tmp_path / f"c{i + 2}"])
        assert res.exit_code == 0 and "never saw" not in res.output + res.stderr, res.output


# ---------------------------------------------------------------- grey images, RGB teachers: Grayscale(3) + Normalize

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def tutorial_inputs(images: np.ndarray) -> torch.Tensor:
    """What the usual tutorial feeds an RGB network on grey digits: torchvision's Grayscale(3), ToTensor and
    Normalize with ImageNet's mean and std, image by image from PIL."""
    from PIL import Image
    from torchvision import transforms
    tf = transforms.Compose([transforms.Grayscale(3), transforms.ToTensor(), transforms.Normalize(*IMAGENET)])
    return torch.stack([tf(Image.fromarray(np.ascontiguousarray(img[0]))) for img in images])


@pytest.fixture(scope="module")
def rgb_r18(tmp_path_factory):
    """A torchvision resnet18 for 10 classes, random weights, in eval mode, and its state dict's file."""
    import torchvision
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path_factory.mktemp("r18") / "r18.pth"
    torch.save(net.state_dict(), path)
    return types.SimpleNamespace(net=net, path=path)


def test_grey_images_reach_an_rgb_teacher_as_grayscale3_and_imagenet_normalize(rgb_r18, fmnist, tmp_path):
    """The tutorial workflow for an RGB network on grey digits, Grayscale(3) + Normalize(ImageNet's mean and std),
    had no exact equivalent: kdpipe normalized before repeating grey images to RGB, one value per data channel,
    so --normalize imagenet was refused ('is for 3-channel images; these have 1'). Now the cache holds the logits
    of the teacher on exactly those inputs (the same bits), the manifest records it, inspect shows it, and
    verify-cache re-runs the teacher so."""
    from kdpipe.cache.reader import Cache
    from kdpipe.checkpoint import load_teacher
    from kdpipe.views import create_policy
    out = tmp_path / "c"
    ok(dump(rgb_r18.path, fmnist.spec, out, "--teacher-arch", "tv:resnet18", "--normalize", "imagenet", "--force",
            "--policy", "none", "--views", 1, "--limit", 96))
    c = Cache(out)
    m = c.manifest
    assert m["input"] == {"mean": [0.0], "std": [1.0], "normalization": {"source": "preset", "value": "imagenet"},
                          "grey_to_rgb": {"mean": list(IMAGENET[0]), "std": list(IMAGENET[1])},
                          "shape": [1, 28, 28]}
    from kdpipe.data import limited, load_dataset
    images = np.asarray(limited(load_dataset(fmnist.spec, "train"), 96).images)
    sidx = c.read("sample_index", 0, c.rows).astype(np.int64)
    with torch.no_grad():
        want = torch.cat([rgb_r18.net(tutorial_inputs(images[sidx[b:b + 48]])) for b in range(0, len(sidx), 48)])
    np.testing.assert_allclose(c.read("logits", 0, c.rows), want.numpy(), atol=1e-5, rtol=1e-5)
    # the teacher's first layer gets the very tensor torchvision's transforms give
    teacher = load_teacher(rgb_r18.path, arch="tv:resnet18", image_shape=(1, 28, 28), num_classes=10)
    teacher.set_grey_to_rgb(m["input"]["grey_to_rgb"])
    seen = []
    teacher.module.inner[1].conv1.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    policy = create_policy("none")
    x = policy.replay(torch.from_numpy(images[:8]), torch.zeros((8, 0), dtype=torch.int32), [0.0], [1.0])
    with torch.no_grad():
        teacher.module(x)
    assert torch.equal(seen[0], tutorial_inputs(images[:8]))
    shown = ok(invoke("inspect", out)).output
    assert ("normalization --normalize imagenet: grey images repeated to 3 channels, then mean [0.485, 0.456, 0.406], "
            "std [0.229, 0.224, 0.225] per channel (Grayscale(3) + Normalize); students' views: mean [0], std [1]"
            ) in shown
    ok(invoke("verify-cache", out, "--teacher", rgb_r18.path, "--sample", 32))
    # 3 values by hand are the same normalization (another source, so another cache)
    ok(dump(rgb_r18.path, fmnist.spec, tmp_path / "ms", "--teacher-arch", "tv:resnet18", "--force", "--policy",
            "none", "--views", 1, "--limit", 96, "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"))
    np.testing.assert_array_equal(Cache(tmp_path / "ms").read("logits", 0, c.rows), c.read("logits", 0, c.rows))


def test_a_program_teacher_with_in_chans_3_takes_three_values_and_without_it_is_refused(ref, tmp_path):
    """A TorchScript RGB teacher of grey images: --mean/--std of 3 values with --arch-args in_chans=3 feed it
    Grayscale(3) + Normalize over every view (crop and flip too), and verify-cache agrees; without in_chans=3 (the
    teacher fed the grey images as they are) it is one line naming in_chans=3 and the 3-channel workaround."""
    from torchvision import transforms
    torch.manual_seed(0)
    rgb = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    with torch.no_grad():  # channels weighed differently: each channel's own normalization shows in the logits
        rgb[0].weight.mul_(torch.tensor([1.0, -2.0, 3.0]).view(1, 3, 1, 1))
    ts = tmp_path / "rgb.ts"
    torch.jit.trace(rgb, torch.randn(2, 3, 28, 28)).save(str(ts))
    norm = ("--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225")
    out = tmp_path / "c"
    ok(dump(ts, ref.spec, out, *norm, "--arch-args", "in_chans=3", "--force"))
    normalize = transforms.Normalize(*IMAGENET)
    m = assert_cache_holds(out, lambda x: rgb(normalize(x.expand(-1, 3, -1, -1))))
    assert m["input"]["grey_to_rgb"] == {"mean": list(IMAGENET[0]), "std": list(IMAGENET[1])}
    assert m["input"]["normalization"] == {"source": "mean-std", "value": None}
    ok(invoke("verify-cache", out, "--teacher", ts, "--sample", 64))  # in_chans and the normalization: recorded
    for args, frag in ((norm, "--mean/--std give 3 values (RGB channels)"),
                       (("--normalize", "imagenet"), "--normalize imagenet is for 3-channel images")):
        line = refused(dump(ts, ref.spec, tmp_path / "x", *args, "--force"), frag, "give --arch-args in_chans=3",
                       "np.repeat(x, 3, axis=1)")
        assert "Grayscale(3) + Normalize" in line
    refused(dump(ts, ref.spec, tmp_path / "x", "--arch-args", "in_chans=3", "--mean", "0.4,0.5", "--std", "0.2",
                 "--force"), "--mean has 2 values; the inputs have 1 channel: give 1 (or 3, one per RGB channel")
    assert not (tmp_path / "x").exists()


def test_three_values_for_grey_images_of_a_teacher_that_takes_them_as_they_are_are_refused(ref, tmp_path):
    """A grey teacher (a kdpipe architecture's state dict) cannot take RGB channels' values: one line saying what to
    give instead. A kdpipe checkpoint records its own normalization: values for 3 channels are refused saying to drop
    them (it said 'give --mean/--std', or 'give 1 or 1', for a teacher that then refuses any --mean/--std)."""
    torch.save(ref.net.state_dict(), tmp_path / "w.pt")
    line = refused(dump(tmp_path / "w.pt", ref.spec, tmp_path / "x", "--teacher-arch", "cnn_small", "--normalize",
                        "imagenet"), "--normalize imagenet is for 3-channel images; these have 1",
                   "give --mean/--std of 1 value", "np.repeat(x, 3, axis=1)")
    assert "a torchvision architecture repeats by itself" in line
    from kdpipe.checkpoint import load_teacher  # verify-cache of such a cache, given a teacher that does not repeat
    grey = load_teacher(tmp_path / "w.pt", arch="cnn_small", image_shape=(1, 28, 28), num_classes=10)
    with pytest.raises(KDPipeError, match=r"fed grey images repeated to 3 channels.*does not repeat them: give the "):
        grey.set_grey_to_rgb({"mean": IMAGENET[0], "std": IMAGENET[1]})
    grey.set_grey_to_rgb(None)  # an older cache's record: nothing to do
    for args, given in ((("--normalize", "imagenet"), "--normalize"), (("--mean", "0.4,0.5,0.6", "--std", "0.2"),
                                                                       "--mean/--std")):
        refused(dump(ref.ckpt, ref.spec, tmp_path / "x", *args), f"the teacher {ref.ckpt} records its input "
                "normalization, mean [", f"(1 channel); {given} gives 3 values: drop {given}")
    assert not (tmp_path / "x").exists()


def test_an_rgb_timm_teacher_of_grey_images_takes_imagenet_with_in_chans_3(fmnist, tmp_path):
    """timm's RGB weights with --arch-args in_chans=3: the grey images are repeated inside the architecture's grey
    wrapper, then normalized per channel there; verify-cache re-runs it so."""
    from torchvision import transforms
    from kdpipe.models import create_model
    torch.manual_seed(0)
    net = create_model("timm:test_resnet", 10, (3, 28, 28), {"drop_rate": 0.0}).eval()
    torch.save(net.state_dict(), tmp_path / "rgb.pth")
    out = tmp_path / "c"
    ok(dump(tmp_path / "rgb.pth", fmnist.spec, out, "--teacher-arch", "timm:test_resnet", "--arch-args",
            "in_chans=3,drop_rate=0.0", "--normalize", "imagenet", "--force"))
    normalize = transforms.Normalize(*IMAGENET)
    m = assert_cache_holds(out, lambda x: net(normalize(x.repeat(1, 3, 1, 1))))
    assert m["input"]["grey_to_rgb"] == {"mean": list(IMAGENET[0]), "std": list(IMAGENET[1])}
    ok(invoke("verify-cache", out, "--teacher", tmp_path / "rgb.pth", "--sample", 32))
    refused(dump(tmp_path / "rgb.pth", fmnist.spec, tmp_path / "x", "--teacher-arch", "timm:test_resnet",
                 "--normalize", "imagenet", "--force"), "give --arch-args in_chans=3")


class _ImagenetGrey(nn.Module):
    """An RGB teacher trained on Grayscale(3) + Normalize(ImageNet): it reads the grey pixel back from its first
    channel and runs the trained grey teacher on it as that was trained."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.net = net
        self.mean, self.std = float(mean[0]), float(std[0])

    def forward(self, x):
        grey = x[:, :1] * IMAGENET[1][0] + IMAGENET[0][0]
        return self.net((grey - self.mean) / self.std)


def test_the_probe_tries_imagenet_for_an_rgb_teacher_of_grey_images(ref, tmp_path):
    """The probe's other usual normalizations include the 3-channel presets where grey images reach the teacher
    repeated to RGB: a teacher trained on Grayscale(3) + Normalize(ImageNet), given a normalization of one value
    that leaves it well above chance (top-1 0.45 against 0.67 on the probe), is stopped naming --normalize imagenet;
    given it, the dump goes on."""
    ts = tmp_path / "t.ts"
    torch.jit.trace(_ImagenetGrey(ref.net, ref.mean, ref.std).eval(), torch.randn(2, 3, 28, 28)).save(str(ts))
    refused(dump(ts, ref.spec, tmp_path / "c", "--arch-args", "in_chans=3", "--mean", "0.45", "--std", "0.25"),
            "with --mean 0.45 --std 0.25, and ", "with --normalize imagenet: it was likely trained")
    r = ok(dump(ts, ref.spec, tmp_path / "c", "--arch-args", "in_chans=3", "--normalize", "imagenet"))
    assert "likely trained" not in r.output
    assert_cache_holds(tmp_path / "c", lambda x: ref.net((x - ref.mean[0]) / ref.std[0]), atol=1e-3)


def test_an_rgb_teachers_grey_cache_forms_an_ensemble_and_older_caches_keep_their_identity(rgb_r18, ref, tmp_path):
    """dump-logits --like a kdpipe teacher's cache with the RGB teacher's Grayscale(3) + Normalize: the two form an
    ensemble, whose students (primary: the RGB teacher's cache) take the grey pixels in [0, 1]. A normalization
    of one value per channel records no grey_to_rgb: the identity of such caches is what it always was."""
    from kdpipe.ensemble import open_caches
    from kdpipe.normalization import resolve_input
    from kdpipe.teacher import _dump_identity
    a, b = tmp_path / "a", tmp_path / "b"
    ok(dump(ref.ckpt, ref.spec, a, "--limit", 128))
    ok(dump(rgb_r18.path, ref.spec, b, "--like", a, "--teacher-arch", "tv:resnet18", "--normalize", "imagenet",
            "--force"))
    primary, ens = open_caches([b, a])
    assert ens is not None and primary.manifest["input"]["mean"] == [0.0]
    r = ok(invoke("train-student", "--cache", b, "--cache", a, "--student", "mlp_100", "--epochs", 1, "--device",
                  "cpu", "--out", tmp_path / "runs"))
    assert "Error" not in r.output
    st = torch.load(next((tmp_path / "runs").rglob("student.pt")), weights_only=True)
    assert st["mean"] == [0.0] and st["std"] == [1.0]
    other = types.SimpleNamespace(file="t.ts", kind="torchscript", mean=None, std=None, repeats_grey=True,
                                  model=None, code=None, fingerprint="f", arch="torchscript", output=None)
    same = types.SimpleNamespace(identity=lambda: {})
    for kw in ({"mean": [0.5], "std": [0.25]}, {"input_range": "0-1"}, {"preset": "imagenet"}):
        norm = resolve_input(other, (1, 8, 8) if "preset" not in kw else (3, 8, 8), **kw)
        assert "grey_to_rgb" not in norm
        ident = _dump_identity(other, same, same, 1, 0, "float16", 8, 8, norm)
        assert set(ident["input"]) == {"mean", "std", "normalization"}


def test_pipelines_pass_three_values_for_an_rgb_teachers_grey_images(tmp_path):
    from kdpipe.pipeline import load_pipeline, make_rules
    spec = tmp_path / "p.toml"
    spec.write_text('''
[data]
spec = "fashion-mnist"
[teacher]
file = "weights/r18.pth"
arch = "tv:resnet18"
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
[dump]
views = 2
[[students]]
archs = ["mlp_100"]
epochs = 2
''')
    rules = make_rules(load_pipeline(spec))
    assert ("dump-logits --teacher weights/r18.pth --data fashion-mnist --teacher-arch tv:resnet18 "
            "--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --views 2") in rules
