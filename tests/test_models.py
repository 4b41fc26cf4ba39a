"""The model registry, torchvision names, checkpoints and the kinds of teacher stage one accepts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from kdpipe import KDPipeError
from kdpipe.cache.reader import Cache
from kdpipe.checkpoint import load_teacher, save_checkpoint
from kdpipe.data import load_dataset
from kdpipe.engine import predict
from kdpipe.evaluate import eval_params
from kdpipe.models import count_parameters, create_model, registered
from kdpipe.views import create_policy

from conftest import quiet

REQUIRED = {"mlp_1200", "mlp_800", "resnet8x4", "resnet20", "resnet32x4", "resnet56", "resnet110", "wrn_16_2",
            "wrn_40_2", "resnet18_cifar"}
BIG = {"resnet110", "wrn_40_2", "resnet18_cifar", "resnet32x4"}
# Parameter counts of the CIFAR-100 models as published (CRD / RepDistiller tables), in millions.
PUBLISHED_M = {"resnet20": 0.28, "resnet56": 0.86, "resnet110": 1.74, "resnet8x4": 1.23, "resnet32x4": 7.43,
               "wrn_16_2": 0.70, "wrn_40_2": 2.26, "resnet18_cifar": 11.22}


def natural_shape(name):
    return (1, 28, 28) if name.startswith(("mlp", "cnn")) else (3, 32, 32)


def linear_sizes(model):
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def test_the_registry_holds_the_required_architectures():
    assert REQUIRED <= set(registered())
    assert any(n.startswith("cnn") for n in registered())


@pytest.mark.parametrize("name", registered())
def test_every_registered_model_builds_and_runs_at_its_natural_shape(name):
    shape = natural_shape(name)
    classes = 10 if shape[0] == 1 else 100
    torch.manual_seed(0)
    model = create_model(name, classes, shape).eval()
    batch = 2 if name in BIG else 4
    with torch.no_grad():
        out = model(torch.randn(batch, *shape))
    assert out.shape == (batch, classes) and torch.isfinite(out).all()
    if name in PUBLISHED_M:
        assert count_parameters(model) / 1e6 == pytest.approx(PUBLISHED_M[name], rel=0.01)


def test_hinton_mlps_have_the_published_layers():
    big = create_model("mlp_1200", 10, (1, 28, 28))
    assert linear_sizes(big) == [(784, 1200), (1200, 1200), (1200, 10)]
    assert any(isinstance(m, nn.Dropout) and m.p > 0 for m in big.modules())
    small = create_model("mlp_800", 10, (1, 28, 28))
    assert linear_sizes(small) == [(784, 800), (800, 800), (800, 10)]
    assert not any(isinstance(m, nn.Dropout) for m in small.modules())
    assert count_parameters(small) == 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10


def test_small_models_train_one_step():
    for name in ("cnn_tiny", "mlp_100", "resnet20"):
        shape = natural_shape(name)
        model = create_model(name, 10, shape).train()
        out = model(torch.randn(4, *shape))
        nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
        assert all(p.grad is not None for p in model.parameters())


def test_models_are_seeded_by_torch_manual_seed():
    torch.manual_seed(3)
    a = create_model("cnn_tiny", 10, (1, 28, 28)).state_dict()
    torch.manual_seed(3)
    b = create_model("cnn_tiny", 10, (1, 28, 28)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchvision_models_by_name_for_colour_and_grey_images():
    rgb = create_model("resnet18", 10, (3, 32, 32)).eval()
    with torch.no_grad():
        assert rgb(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    grey = create_model("resnet18", 7, (1, 32, 32)).eval()
    with torch.no_grad():
        assert grey(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert count_parameters(grey) == count_parameters(create_model("resnet18", 7, (3, 32, 32)))


def test_unknown_architecture_names_the_choices():
    with pytest.raises(KDPipeError, match="unknown architecture 'resnet21'.*resnet20"):
        create_model("resnet21", 10, (3, 32, 32))


# ---------------------------------------------------------------- checkpoints and teachers

def test_teacher_checkpoint_records_what_stage_one_needs(teacher_ckpt, fmnist):
    train, test = load_dataset(fmnist.spec, "train"), load_dataset(fmnist.spec, "test")
    obj = torch.load(teacher_ckpt, weights_only=True)  # plain data only
    assert obj["arch"] == "cnn_small" and obj["num_classes"] == 10 and obj["image_shape"] == [1, 28, 28]
    mean, std = train.channel_stats()
    assert obj["mean"] == pytest.approx(mean) and obj["std"] == pytest.approx(std)
    assert obj["dataset"]["fingerprint"] == train.fingerprint and obj["dataset"]["num_samples"] == 512
    assert obj["class_names"] == train.class_names
    t = load_teacher(teacher_ckpt)
    assert (t.kind, t.arch, t.num_classes, t.image_shape) == ("kdpipe", "cnn_small", 10, (1, 28, 28))
    assert not t.module.training
    pol = create_policy("crop-flip", padding=2)
    logits = predict(t.module, torch.from_numpy(np.array(test.images)), pol,
                     torch.from_numpy(eval_params(pol, test.image_shape, len(test))), t.mean, t.std)
    assert obj["test_top1"] == pytest.approx(float((logits.argmax(1).numpy() == test.labels).mean()))
    assert obj["test_top1"] > 0.4


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet20", 10, (3, 32, 32)).eval()
    size = save_checkpoint(tmp_path / "m.pt", model, arch="resnet20", num_classes=10, image_shape=(3, 32, 32),
                           mean=[0.5] * 3, std=[0.25] * 3, class_names=list("abcdefghij"), dataset={},
                           test_top1=0.5)
    assert size == (tmp_path / "m.pt").stat().st_size
    back = load_teacher(tmp_path / "m.pt")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.module(x), model(x))
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning")
def test_teacher_kinds_torchscript_and_state_dict(teacher_ckpt, tmp_path):
    t = load_teacher(teacher_ckpt)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        ref = t.module(x)
    torch.jit.trace(t.module, x).save(str(tmp_path / "t.ts"))
    ts = load_teacher(tmp_path / "t.ts")
    assert ts.kind == "torchscript" and ts.num_classes is None
    with torch.no_grad():
        torch.testing.assert_close(ts.module(x), ref, rtol=1e-5, atol=1e-5)
    torch.save(t.module.state_dict(), tmp_path / "sd.pt")
    sd = load_teacher(arch="cnn_small", weights=tmp_path / "sd.pt", image_shape=(1, 28, 28), num_classes=10)
    assert sd.kind == "state_dict"
    with torch.no_grad():
        assert torch.equal(sd.module(x), ref)
    with pytest.raises(KDPipeError, match="do not fit"):
        load_teacher(arch="cnn_tiny", weights=tmp_path / "sd.pt", image_shape=(1, 28, 28), num_classes=10)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(KDPipeError, match="cannot load"):
        load_teacher(tmp_path / "junk.pt")
    with pytest.raises(KDPipeError, match="does not exist"):
        load_teacher(tmp_path / "absent.pt")


def test_torchvision_teacher_weights_for_grey_images(tmp_path):
    import torchvision
    torch.manual_seed(0)
    bare = torchvision.models.get_model("resnet18", weights=None, num_classes=10).eval()
    torch.save(bare.state_dict(), tmp_path / "r18.pt")
    t = load_teacher(arch="resnet18", weights=tmp_path / "r18.pt", image_shape=(1, 32, 32), num_classes=10)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(t.module(x), bare(x.repeat(1, 3, 1, 1)))


def test_torchvision_googlenet_weights_are_said_to_need_transform_input(tmp_path, capsys):
    """torchvision's pretrained GoogLeNet and Inception v3 run with transform_input=True, which no weight records:
    their state dict loaded exactly into tv:googlenet (built with False) and ran on other inputs, without a word."""
    import torchvision
    torch.manual_seed(0)
    net = torchvision.models.googlenet(weights=None, transform_input=True, aux_logits=False, init_weights=True,
                                       num_classes=10)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # running statistics of a batch: a net whose outputs depend on its inputs
    with torch.no_grad():
        net.train()(torch.randn(16, 3, 32, 32))
    torch.save(net.eval().state_dict(), tmp_path / "g.pth")
    load_teacher(tmp_path / "g.pth", arch="tv:googlenet", arch_args="aux_logits=false", image_shape=(3, 32, 32),
                 num_classes=10)
    assert "tv:googlenet is built with transform_input=false" in capsys.readouterr().err
    t = load_teacher(tmp_path / "g.pth", arch="tv:googlenet", arch_args="aux_logits=false,transform_input=true",
                     image_shape=(3, 32, 32), num_classes=10)
    assert "transform_input" not in capsys.readouterr().err
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(t.module(x), net(x))
    torch.save(torchvision.models.get_model("resnet18", weights=None, num_classes=10).state_dict(), tmp_path / "r.pt")
    load_teacher(tmp_path / "r.pt", arch="tv:resnet18", image_shape=(3, 32, 32), num_classes=10)
    assert "transform_input" not in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning")
def test_a_torchscript_teacher_dumps_the_same_logits(teacher_ckpt, fmnist, tmp_path):
    from kdpipe.teacher import dump_logits
    train = load_dataset(fmnist.spec, "train").subset(128)
    t = load_teacher(teacher_ckpt)
    torch.jit.trace(t.module, torch.randn(2, 1, 28, 28)).save(str(tmp_path / "t.ts"))
    pol = create_policy("crop-flip", padding=2)
    # The checkpoint's normalization is that of the full 512-sample train split; pass it to both.
    kw = dict(policy=pol, views=2, seed=4, logits_dtype="float32", mean=t.mean, std=t.std, log=quiet)
    dump_logits(t, train, None, tmp_path / "a", **kw)
    dump_logits(load_teacher(tmp_path / "t.ts"), train, None, tmp_path / "b", **kw)
    a, b = Cache(tmp_path / "a"), Cache(tmp_path / "b")
    assert b.manifest["teacher"]["kind"] == "torchscript"
    np.testing.assert_allclose(b.read("logits", 0, b.rows), a.read("logits", 0, a.rows), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- feature vectors (D,)

@pytest.mark.parametrize("name, hidden", [("mlp_100", 100), ("mlp_800", 800), ("mlp_1200", 1200)])
def test_mlps_take_feature_vectors(name, hidden):
    from kdpipe.evaluate import cpu_latency_ms
    m = create_model(name, 3, (12,))
    assert m.net[1].in_features == 12 and m.net[1].out_features == hidden
    assert m(torch.randn(5, 12)).shape == (5, 3)
    assert cpu_latency_ms(m, (12,), repeats=2, warmup=1) > 0


@pytest.mark.parametrize("name", ["cnn_tiny", "resnet20", "wrn_16_2", "resnet18"])
def test_conv_nets_refuse_feature_vectors_in_one_line(name):
    with pytest.raises(KDPipeError, match=rf"^{name} takes images \(C, H, W\), not feature vectors \(12,\): "
                                          "use one of mlp_100, mlp_1200, mlp_800, mlp:H\\[,H\\.\\.\\.\\]\\[:dropout=P\\]$"):
        create_model(name, 3, (12,))
    with pytest.raises(KDPipeError, match="images .C, H, W. or feature vectors .D,., got shape .4, 4."):
        create_model("mlp_100", 3, (4, 4))


def test_channels_last_and_images_tensor_leave_feature_batches_alone(monkeypatch):
    from kdpipe.util import HostImages, channels_last, images_tensor
    x = torch.randn(4, 12)
    assert channels_last(x) is x
    img = torch.randn(2, 3, 4, 4)
    assert channels_last(img) is img  # CPU batches stay as they are, too
    feats = np.random.default_rng(0).normal(size=(6, 12)).astype(np.float32)
    t = images_tensor(feats, "cpu")
    assert t.dtype == torch.float32 and t.shape == (6, 12) and torch.equal(t, torch.from_numpy(feats))
    monkeypatch.setenv("KDPIPE_IMAGES_ON_HOST", "1")
    host = images_tensor(feats, "cpu")
    assert isinstance(host, HostImages) and len(host) == 6
    np.testing.assert_array_equal(host[torch.tensor([4, 1])].numpy(), feats[[4, 1]])
    np.testing.assert_array_equal(host[2:4].numpy(), feats[2:4])


def test_a_memory_map_larger_than_half_the_available_memory_is_not_copied_on_the_cpu(tmp_path, monkeypatch, capsys):
    """Decoded photos are a read-only memory map; on the CPU it was copied whole into RAM whatever its size (a
    decoded copy larger than the machine's memory was killed by the OOM killer, without a word). A map that
    fits in half the available memory is still copied; a larger one stays mapped and is served batch by batch."""
    from kdpipe import util
    from kdpipe.util import HostImages, images_tensor
    arr = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8, shape=(8, 1, 4, 4))
    arr[:] = np.arange(8, dtype=np.uint8)[:, None, None, None]
    arr.flush()
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    monkeypatch.setattr(util, "host_available_bytes", lambda: 10 * mapped.nbytes, raising=False)
    assert isinstance(images_tensor(mapped, "cpu"), torch.Tensor)
    monkeypatch.setattr(util, "host_available_bytes", lambda: mapped.nbytes, raising=False)
    host = images_tensor(mapped, "cpu")
    assert isinstance(host, HostImages) and np.shares_memory(host.array, mapped)  # the map, not a copy
    np.testing.assert_array_equal(host[torch.tensor([5, 2])].numpy()[:, 0, 0, 0], [5, 2])
    assert "stay memory-mapped" in capsys.readouterr().err
    monkeypatch.setattr(util, "host_available_bytes", lambda: None)  # unknown (not Linux): copied, as before
    assert isinstance(images_tensor(mapped, "cpu"), torch.Tensor)


# ---------------------------------------------------------------- parametric families

def test_parametric_mlp_has_the_layers_asked_for():
    m = create_model("mlp:512,256", 10, (1, 28, 28))
    assert linear_sizes(m) == [(784, 512), (512, 256), (256, 10)]
    assert not any(isinstance(x, nn.Dropout) for x in m.modules())
    d = create_model("mlp:32:dropout=0.25", 3, (20,))  # feature vectors too
    assert linear_sizes(d) == [(20, 32), (32, 3)]
    assert [x.p for x in d.modules() if isinstance(x, nn.Dropout)] == [0.25]
    assert d(torch.randn(4, 20)).shape == (4, 3)


def test_dscnn_is_depthwise_separable_and_scales_with_width():
    small, wide = create_model("dscnn:8", 10, (1, 28, 28)), create_model("dscnn:16:dropout=0.2", 11, (3, 64, 64))
    depthwise = [c for c in small.modules() if isinstance(c, nn.Conv2d) and c.groups > 1]
    assert len(depthwise) == 5 and all(c.groups == c.in_channels == c.out_channels for c in depthwise)
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert wide.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 11)
    assert wide.features[0].stride == (2, 2) and small.features[0].stride == (1, 1)
    assert 3 < count_parameters(create_model("dscnn:16", 10, (1, 28, 28))) / count_parameters(small) < 4.5


@pytest.mark.parametrize("name, message", [
    ("mlp:", "give one or more hidden sizes"), ("mlp:a,b", "mlp:H"), ("mlp:8:dropout=1", "dropout must lie"),
    ("mlp:8:depth=3", "unknown option"), ("dscnn:", "one base width"), ("dscnn:8:dropout", "bad option"),
    ("dscnn:8,4", "one base width"), ("kdpipe:mlp:512,256", "write mlp:512,256 \\(a parametric family"),
    ("kdpipe:dscnn:16", "write dscnn:16 ")])
def test_bad_parametric_architectures_are_one_line_errors(name, message):
    with pytest.raises(KDPipeError, match=message):
        create_model(name, 10, (1, 28, 28))
    with pytest.raises(KDPipeError, match=r"dscnn:16 takes images"):
        create_model("dscnn:16", 3, (12,))


@pytest.mark.parametrize("name, message", [
    ("mlp:512, 256", "write architecture 'mlp:512, 256' as 'mlp:512,256'"),
    ("dscnn: 16", "as 'dscnn:16'"), ("mlp:0512", "as 'mlp:512'"),
    ("mlp:512 :dropout=0.2", "as 'mlp:512:dropout=0.2'"), ("mlp:512:dropout= 0.2", "as 'mlp:512:dropout=0.2'"),
    ("mlp:512,,256", "empty size"), ("mlp:512,256,", "empty size"),
    ("mlp:+512", "'\\+512' is not a size written in the digits 0-9"), ("mlp:1_000", "not a size"),
    ("dscnn:\u0661\u0666", "not a size")])
def test_a_parametric_architecture_has_one_spelling(name, message):
    """mlp:512, 256 built the model of mlp:512,256 under the run name 'mlp512x 256-...' (a space, which Make
    splits on), and mlp:0512, mlp:+512 or mlp:512,,256 trained a model already trained under another name;
    each is refused, naming the spelling to write. Spaces around the whole spec are dropped, as for every spec
    (it raised KeyError: ' mlp')."""
    with pytest.raises(KDPipeError, match=message):
        create_model(name, 10, (1, 28, 28))
    assert linear_sizes(create_model(" mlp:512,256 ", 10, (1, 28, 28))) == [(784, 512), (512, 256), (256, 10)]


@pytest.mark.parametrize("recorded, built", [("mlp:32, 16", "mlp:32,16"), ("mlp:032", "mlp:32"),
                                             ("mlp:32,,16", "mlp:32,16"), ("mlp:32 :dropout= 0.2", "mlp:32:dropout=0.2")])
def test_a_checkpoint_recording_an_older_spelling_still_loads(recorded, built, tmp_path):
    """Older kdpipes built 'mlp:32, 16' as mlp:32,16 and recorded the spec as written in their checkpoints (teachers
    and students), which the one-spelling refusal made unloadable (dump-logits, export, compress): the user cannot
    write a checkpoint's record otherwise."""
    torch.manual_seed(0)
    model = create_model(built, 3, (1, 8, 8))
    path = tmp_path / "old.pt"
    save_checkpoint(path, model, arch=built, num_classes=3, image_shape=(1, 8, 8), mean=[0.5], std=[0.25],
                    class_names=["a", "b", "c"], dataset={}, test_top1=None)
    obj = torch.load(path, weights_only=False)
    obj["arch"], obj["model"]["spec"] = recorded, recorded  # as the older kdpipe wrote it
    torch.save(obj, path)
    loaded = load_teacher(path)
    x = torch.rand(2, 1, 8, 8)
    assert linear_sizes(loaded.module) == linear_sizes(model)
    assert torch.equal(loaded.module.eval()(x), model.eval()(x))


def test_parametric_architectures_name_runs_without_make_specials():
    from kdpipe.sweep import run_name
    assert run_name("mlp:512,256", 4.0, 0.9, 0) == "mlp512x256-T4-a0.9-s0"
    assert run_name("dscnn:16:dropout=0.2", 4.0, 0.0, 1) == "dscnn16_dropout0.2-scratch-s1"
    assert run_name("mlp:800", 4.0, 0.0, 0) != run_name("mlp_800", 4.0, 0.0, 0)


def test_a_name_registered_twice_is_refused_not_silently_replaced():
    """A second @register("mlp_100") (a user's plugin, or a copy-pasted factory) replaced the first for every
    run and checkpoint that named it; the other registries (losses, view ops, sources, columns) refused it."""
    from kdpipe import data, models

    before = dict(models._REGISTRY), dict(models._FAMILIES), dict(data.KINDS)
    with pytest.raises(ValueError, match="architecture 'mlp_100' is registered twice"):
        models.register("mlp_100")(lambda num_classes, image_shape: nn.Linear(1, num_classes))
    with pytest.raises(ValueError, match="architecture family 'mlp' is registered twice"):
        models.register_family("mlp", "mlp:H")(lambda args, options, num_classes, image_shape: None)

    class Other(data.ImageData):
        kind = "photos"

    with pytest.raises(ValueError, match="image-store kind 'photos' is registered twice"):
        data.register_kind(Other)
    assert (models._REGISTRY, models._FAMILIES, data.KINDS) == before


@pytest.mark.parametrize("value", ["no", "off", "0.5"])
def test_a_word_for_cifar_stem_is_refused_not_taken_as_true(value):
    """--arch-args cifar_stem=no reached the torchvision branch as the string 'no', which is true: the model
    was built with the CIFAR stem the user had turned off, without a word (kdpipe's own option, which
    check_option_types, reading torchvision's signature, never saw)."""
    from kdpipe.sweep import parse_arch_args
    with pytest.raises(KDPipeError, match=f"cifar_stem={value} is not true or false"):
        create_model("tv:resnet18", 10, (3, 32, 32), parse_arch_args(f"cifar_stem={value}"))
    off = create_model("tv:resnet18", 10, (3, 32, 32), parse_arch_args("cifar_stem=false"))
    on = create_model("tv:resnet18", 10, (3, 32, 32), parse_arch_args("cifar_stem=true"))
    assert off.conv1.kernel_size == (7, 7) and isinstance(off.maxpool, nn.MaxPool2d)
    assert on.conv1.kernel_size == (3, 3) and isinstance(on.maxpool, nn.Identity)


@pytest.mark.parametrize("spec", ["resnet18", "user"])
def test_a_word_for_an_option_of_true_or_false_is_refused_not_taken_as_true(tmp_path, spec):
    """--arch-args zero_init_residual=maybe reached torchvision as the string 'maybe', which is true: the teacher
    trained with an option the user had not meant to set, without a word."""
    from kdpipe import KDPipeError
    from kdpipe.models import create_model
    if spec == "user":
        (tmp_path / "nets.py").write_text("import torch.nn as nn\n\n\ndef Net(num_classes, image_shape, act='relu', "
                                          "bias: bool = True, width=8):\n"
                                          "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes, bias=bias))\n")
        spec, option = f"{tmp_path / 'nets.py'}:Net", "bias"
    else:
        option = "zero_init_residual"
    with pytest.raises(KDPipeError, match=rf"--arch-args {option}=yes is not true or false, which {option} takes "
                                          rf"\(its default is (False|True)\): write {option}=true or {option}=false"):
        create_model(spec, 10, (3, 32, 32), f"{option}=yes")
    create_model(spec, 10, (3, 32, 32), f"{option}=false")
    if "nets.py" in spec:  # a word for a word-taking option stays a word
        create_model(spec, 10, (3, 32, 32), "act=gelu")


def test_a_model_that_returns_aux_logits_in_training_mode_is_refused_before_training(tmp_path):
    """check_model ran the architecture in eval mode only: tv:googlenet (and tv:inception_v3, a user's net with
    an auxiliary head) returns logits there but a tuple of logits and aux logits in training mode, and
    train-teacher passed the check and then died in its first step with a traceback."""
    from kdpipe.models import check_model
    with pytest.raises(KDPipeError, match=r"tv:googlenet returns a GoogLeNetOutputs for a batch of 2 in training "
                                          r"mode, not logits \(2, 4\): .* \(give --arch-args aux_logits=false\)"):
        check_model("tv:googlenet", 4, (3, 32, 32))
    check_model("tv:googlenet", 4, (3, 32, 32), "aux_logits=false")
    (tmp_path / "nets.py").write_text("import torch.nn as nn\n\n\nclass Net(nn.Module):\n"
                                      "    def __init__(self, num_classes, image_shape):\n        super().__init__()\n"
                                      "        self.fc = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))\n\n"
                                      "    def forward(self, x):\n        out = self.fc(x)\n"
                                      "        return (out, out) if self.training else out\n")
    with pytest.raises(KDPipeError, match="returns a tuple for a batch of 2 in training mode"):
        check_model(f"{tmp_path / 'nets.py'}:Net", 4, (3, 8, 8))


def test_an_architecture_written_with_spaces_around_it_is_named_as_without():
    """Models are built from the spec without surrounding spaces; the run name kept them (' tv:resnet18' ->
    '_tv_resnet18'), so a TOML entry written so trained the model again under another name."""
    from kdpipe.sweep import arch_label
    for spec in ("tv:resnet18", "mlp:512,256", "pipelines/food_nets.py:DSNet", "mlp_100"):
        assert arch_label(f" {spec} ") == arch_label(spec)


def test_in_chans_given_to_a_torchvision_architecture_says_it_repeats_grey_images_itself():
    """--arch-args in_chans=3, copied from timm's or a program teacher's instructions, failed as "ResNet.__init__() got
    an unexpected keyword argument 'in_chans'", which does not say that torchvision's repeat grey images already."""
    with pytest.raises(KDPipeError, match=r"tv:resnet18 takes no in_chans: a torchvision architecture repeats grey "
                                          r"images to its 3 channels by itself .*: drop it from --arch-args"):
        create_model("tv:resnet18", 10, (1, 28, 28), {"in_chans": 3})


@pytest.mark.parametrize("spec", ["tv:resnet18", "timm:resnet10t", "cnn_tiny"])
def test_num_classes_in_arch_args_says_kdpipe_gives_the_datas_classes(spec):
    """--arch-args num_classes=5 (a teacher trained on 5 classes, or the builder's own option copied over) failed as
    "get_model() got multiple values for keyword argument 'num_classes'" (torchvision, timm) or "cnn_tiny does not
    take the options num_classes" (the registry), which say neither that kdpipe gives the data's number of classes
    nor what to do."""
    if spec.startswith("timm:"):
        pytest.importorskip("timm")
    for given in (5, 3):
        with pytest.raises(KDPipeError, match=rf"{spec}: --arch-args num_classes={given}: kdpipe builds it with one "
                                              r"output per class of the data \(3\) itself: drop num_classes"):
            create_model(spec, 3, (3, 32, 32), {"num_classes": given})
