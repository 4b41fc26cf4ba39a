"""Cached features (dump-logits --features) and hint losses (--loss kd+hint, --hint-layer): the feature
columns, their refusals and verify-cache coverage, the projector's training, saving, resume and export,
and pipelines/cifar10-features.toml end to end on generated data."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdpipe import KDPipeError
from kdpipe.cache import format as fmt
from kdpipe.cache.reader import Cache
from kdpipe.cli import main
from kdpipe.losses import Outputs, create_loss
from kdpipe.sweep import parse_loss

REPO = Path(__file__).resolve().parent.parent


def invoke(args, code=0):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r.output


def one_line_error(output: str) -> str:
    lines = [x for x in output.strip().splitlines() if x.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


@pytest.fixture(scope="module")
def feat_cache(fmnist, teacher_ckpt, tmp_path_factory):
    """The conftest teacher (cnn_small) on 128 Fashion-MNIST samples, 2 views, with features at `pool`
    (32, 2, 2) and `head.2` (64,), in shards of 100 rows."""
    out = tmp_path_factory.mktemp("features") / "cache"
    output = invoke(["dump-logits", "--teacher", teacher_ckpt, "--data", fmnist.spec, "--limit", 128, "--views", 2,
                     "--policy", "crop:2+flip", "--features", "pool,head.2", "--shard-rows", 100, "--out", out])
    return SimpleNamespace(path=out, output=output, teacher=teacher_ckpt, spec=fmnist.spec)


def cache_images(cache: Cache) -> np.ndarray:
    """The uint8 images the cache was dumped from (its --limit's samples), as stage two loads them."""
    from kdpipe.student import load_cache_data
    return np.asarray(load_cache_data(cache)[0].images)


def teacher_features(teacher, module_of, cache: Cache, rows, images):
    """The teacher's output at a module on the cache's rows, recomputed here with a plain forward hook."""
    from kdpipe.views import policy_from_identity
    m = cache.manifest
    policy = policy_from_identity(m["views"])
    params = torch.from_numpy(cache.read_rows("view_params", rows))
    x = policy.replay_rows(torch.from_numpy(images), torch.from_numpy(rows % cache.num_samples), params,
                           m["input"]["mean"], m["input"]["std"], None)
    got = []
    h = module_of(teacher.module).register_forward_hook(lambda mod, a, o: got.append(o.clone()))
    with torch.no_grad():
        teacher.module.eval()(x)
    h.remove()
    return got[0].numpy()


def test_dump_stores_features_of_a_kdpipe_teacher(feat_cache, fmnist):
    from kdpipe.checkpoint import load_teacher
    # planned size: logits 10 x 2 bytes + 44 bytes of indices, labels and view parameters, + 2 x (128 + 64)
    assert "planned cache size" in feat_cache.output and "of which 384 of features" in feat_cache.output
    c = Cache(feat_cache.path)
    m = c.manifest
    assert m["features"] == [{"layer": "pool", "shape": [32, 2, 2], "dtype": "float16", "path": "features/pool"},
                             {"layer": "head.2", "shape": [64], "dtype": "float16", "path": "features/head.2"}]
    assert m["identity"]["features"] == [{"layer": "pool", "shape": [32, 2, 2]}, {"layer": "head.2", "shape": [64]}]
    listed = {x["name"]: x for x in m["columns"]}
    assert listed["features/pool"] == {"name": "features/pool", "path": "features/pool", "required": False}
    assert fmt.row_bytes(m) - fmt.row_bytes({**m, "features": []}) == 2 * (32 * 4 + 64)
    for s in m["shards"]:
        assert {"features/pool", "features/head.2"} <= set(s["sha256"]) and "features/pool" in s["layout"]
    with h5py.File(c.shard_path(0), "r") as f:
        d = f["features/pool"]
        assert d.dtype == np.dtype("<f2") and d.shape == (100, 32, 2, 2) and "pool" in d.attrs["description"]
    rows = np.array([0, 5, 99, 100, 127, 128, 255])
    images = cache_images(c)
    teacher = load_teacher(feat_cache.teacher)
    for name, module_of in (("features/pool", lambda t: t.pool), ("features/head.2", lambda t: t.head[2])):
        stored = c.read_rows(name, rows).astype(np.float32)
        want = teacher_features(teacher, module_of, c, rows, images)
        assert stored.shape == want.shape
        np.testing.assert_allclose(stored, want.astype(np.float16).astype(np.float32), rtol=2e-3, atol=2e-3)
    assert c.read_view(1, "features/head.2").shape == (128, 64)
    out = invoke(["inspect", feat_cache.path])
    assert "features  pool (32, 2, 2) float16 at features/pool, 256 bytes per row" in out
    assert "features/head.2 <f2[100, 64]" in out


def test_an_older_reader_ignores_the_feature_columns_and_reads_the_logits(feat_cache, monkeypatch):
    m = json.loads((feat_cache.path / fmt.MANIFEST).read_text())
    assert fmt.unreadable(m) is None and m["format_version"] == fmt.FORMAT_VERSION
    monkeypatch.setattr(fmt, "feature_columns", lambda m: [])  # a kdpipe without the declaration
    c = Cache(feat_cache.path)
    assert not any(n.startswith("features/") for n in c.shard_columns)
    assert c.read("logits", 0, 256).shape == (256, 10)
    with pytest.raises(KDPipeError, match="has no column 'features/pool'"):
        c.read("features/pool", 0, 1)


def test_a_dump_too_large_for_its_features_says_to_cache_a_smaller_layer(fmnist, teacher_ckpt, tmp_path):
    """A feature map ((16, 28, 28) per view: 25 KB against a 784-byte image) makes the cache refused for its size;
    the line says what made it large: fewer --views would cut the views a student needs, a pooled layer not."""
    err = one_line_error(invoke(["dump-logits", "--teacher", teacher_ckpt, "--data", fmnist.spec, "--limit", 64,
                                 "--views", 2, "--features", "features.0", "--out", tmp_path / "c"], code=2))
    assert "of which 25088 of features" in err and "more than 10x the decoded dataset" in err
    assert err.endswith("pass --yes to dump it anyway, or cache a smaller --features layer (a pooled one: most of "
                        "each row is features), or dump fewer --views")
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_a_dump_with_other_features_does_not_resume_the_cache(feat_cache, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(feat_cache.path, out)
    args = ["dump-logits", "--teacher", feat_cache.teacher, "--data", feat_cache.spec, "--limit", 128, "--views", 2,
            "--policy", "crop:2+flip", "--shard-rows", 100, "--out", out]
    err = one_line_error(invoke(args + ["--features", "pool"], code=2))
    assert "other arguments" in err and "features" in err
    assert "already complete" in invoke(args + ["--features", "pool", "--features", "head.2"])


@pytest.mark.parametrize("arch,layers,shapes", [
    ("tv:resnet18", "avgpool,layer3", [[512, 1, 1], [256, 2, 2]]),
    ("timm:resnet10t", "global_pool", [[512]]),
])
def test_torchvision_and_timm_teachers_give_features(fmnist, tmp_path, arch, layers, shapes):
    from kdpipe.checkpoint import load_teacher
    from kdpipe.models import create_model
    torch.manual_seed(0)
    model = create_model(arch, 10, (1, 28, 28))
    torch.save(model.state_dict(), tmp_path / "t.pth")
    out = tmp_path / "c"
    output = invoke(["dump-logits", "--teacher", tmp_path / "t.pth", "--teacher-arch", arch, "--mean", 0.3,
                     "--std", 0.35, "--data", fmnist.spec, "--limit", 64, "--views", 1, "--force",
                     "--features", layers, "--out", out])
    per_row = sum(2 * int(np.prod(s)) for s in shapes)
    assert f"of which {per_row} of features" in output
    c = Cache(out)
    assert [f["shape"] for f in c.manifest["features"]] == shapes
    teacher = load_teacher(tmp_path / "t.pth", arch=arch, image_shape=(1, 28, 28), num_classes=10)
    first = layers.split(",")[0]
    inner = dict(teacher.module.inner.named_modules() if hasattr(teacher.module, "inner")
                 else teacher.module.named_modules())[first if arch.startswith("timm") else "1." + first]
    rows = np.arange(64)
    want = teacher_features(teacher, lambda t: inner, c, rows, cache_images(c))
    np.testing.assert_allclose(c.read_rows(f"features/{first}", rows).astype(np.float32),
                               want.astype(np.float16).astype(np.float32), rtol=2e-3, atol=2e-3)


def test_torchscript_teachers_and_unknown_layers_are_refused_in_one_line(fmnist, teacher_ckpt, tmp_path):
    from kdpipe.checkpoint import load_teacher
    teacher = load_teacher(teacher_ckpt)
    ts = torch.jit.trace(teacher.module.eval(), torch.zeros(2, 1, 28, 28))
    ts.save(str(tmp_path / "t.ts"))
    base = ["dump-logits", "--data", fmnist.spec, "--limit", 64, "--views", 1]
    err = one_line_error(invoke(base + ["--teacher", tmp_path / "t.ts", "--mean", 0.3, "--std", 0.35,
                                        "--features", "pool", "--out", tmp_path / "a"], code=2))
    assert "TorchScript module" in err and "forward hook" in err
    batch = torch.export.Dim("batch", min=1)
    prog = torch.export.export(teacher.module.eval(), (torch.zeros(4, 1, 28, 28),), dynamic_shapes=({0: batch},))
    torch.export.save(prog, str(tmp_path / "t.pt2"))
    err = one_line_error(invoke(base + ["--teacher", tmp_path / "t.pt2", "--mean", 0.3, "--std", 0.35,
                                        "--features", "pool", "--out", tmp_path / "a"], code=2))
    assert "torch.export program" in err and "forward hook" in err
    err = one_line_error(invoke(base + ["--teacher", teacher_ckpt, "--features", "poool", "--out", tmp_path / "b"],
                                code=2))
    assert "no module 'poool'" in err and "close names: pool" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _tamper(path: Path, shard: dict, column: str, row: int, value: float) -> None:
    """Overwrite one row of a float16 column of a shard file in place, at its recorded layout."""
    offset, nbytes = shard["layout"][column]
    rows = shard["row_stop"] - shard["row_start"]
    per = nbytes // rows
    with open(path, "r+b") as f:
        f.seek(offset + row * per)
        f.write(np.full(per // 2, value, dtype="<f2").tobytes())


def test_verify_cache_detects_a_tampered_feature_column(feat_cache, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(feat_cache.path, out)
    m = json.loads((out / fmt.MANIFEST).read_text())
    shard = m["shards"][0]
    _tamper(out / shard["file"], shard, "features/pool", 7, 3.0)
    r = CliRunner().invoke(main, ["verify-cache", str(out)])
    assert r.exit_code == 1 and "dataset features/pool checksum mismatch" in r.output
    # A writer that stored wrong features with right digests: only re-running the teacher tells
    data = (out / shard["file"]).read_bytes()
    off, n = shard["layout"]["features/pool"]
    shard["sha256"]["features/pool"] = hashlib.sha256(data[off:off + n]).hexdigest()
    shard["file_sha256"] = hashlib.sha256(data).hexdigest()
    m["checksum"] = fmt.manifest_checksum(m)
    (out / fmt.MANIFEST).write_text(json.dumps(m))
    assert CliRunner().invoke(main, ["verify-cache", str(out)]).exit_code == 0
    r = CliRunner().invoke(main, ["verify-cache", str(out), "--teacher", str(feat_cache.teacher), "--sample", "256"])
    assert r.exit_code == 1, r.output
    assert "1 of 256 re-computed rows differ from the stored features features/pool" in r.output
    assert "rows 7 in shard-00000.h5" in r.output and "features/head.2 agrees" in r.output


def test_loss_compositions_parse_and_sum_their_weighted_terms():
    assert parse_loss("kd+hint") == ("kd+hint", {})
    assert parse_loss("kd:1,hint:50") == ("kd+hint", {"hint.weight": 50.0})
    assert parse_loss("kd:0.5,hint:2") == ("kd+hint", {"kd.weight": 0.5, "hint.weight": 2.0})
    assert parse_loss("dkd:1,beta=2,hint:3") == ("dkd+hint", {"dkd.beta": 2.0, "hint.weight": 3.0})
    assert parse_loss("dkd:beta=8,warmup=20") == ("dkd", {"beta": 8.0, "warmup": 20.0})  # unchanged
    for bad, words in (("kd:1,hint:x", "bad loss option"), ("kd+kd", "twice"), ("kd+", "empty loss name"),
                       ("kd:temperature=2,hint:1", "sweep axis")):
        with pytest.raises(KDPipeError, match=words):
            parse_loss(bad)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    fs, ft = torch.randn(8, 6, 2, 2, generator=g), torch.randn(8, 6, 2, 2, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    loss = create_loss("kd+hint", temperature=2.0, alpha=0.7, **{"kd.weight": 0.5, "hint.weight": 50.0})
    assert loss.needs_teacher and loss.needs_features and not loss.fusable
    assert loss.options == {"temperature": 2.0, "alpha": 0.7, "kd.weight": 0.5, "hint.weight": 50.0}
    terms = loss(Outputs(s, fs), Outputs(t, ft), y, 0)
    kd = create_loss("kd", temperature=2.0, alpha=0.7)(s, t, y, 0)
    assert set(terms) == {"ce", "kd", "hint"}
    torch.testing.assert_close(terms["kd"], 0.5 * kd["kd"])
    torch.testing.assert_close(terms["ce"], 0.5 * kd["ce"])
    ref = 50.0 * ((fs.double() - ft.double()) ** 2).reshape(8, -1).mean(1).mean()
    torch.testing.assert_close(terms["hint"].double(), ref)
    plain = create_loss("kd", temperature=2.0, alpha=0.7)(Outputs(s, fs), Outputs(t, ft), y, 0)  # takes the logits
    torch.testing.assert_close(plain["kd"], kd["kd"])
    with pytest.raises(KDPipeError, match="no option"):
        create_loss("kd+hint", **{"hint.beta": 1.0})


def test_a_hint_of_other_shapes_than_the_teachers_features_is_one_line_not_broadcast():
    """In a user's loop (kdpipe.api, features=...), projected features whose shape is not the cached ones'
    (a Linear projector's (B, C) against torchvision's avgpool (B, C, 1, 1), or other channels) broadcast in the
    squared error: every student row was compared with every teacher row, silently."""
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g), torch.zeros(4, dtype=torch.long)
    hint = create_loss("hint")
    for fs, ft in ((torch.randn(4, 8, generator=g), torch.randn(4, 8, 1, 1, generator=g)),
                   (torch.randn(4, 1, generator=g), torch.randn(4, 8, generator=g)),
                   (torch.randn(2, 8, generator=g), torch.randn(4, 8, generator=g))):
        with pytest.raises(KDPipeError, match="projected features of shape"):
            hint(Outputs(s, fs), Outputs(t, ft), y, 0)
    ft = torch.randn(4, 8, 1, 1, generator=g)
    torch.testing.assert_close(hint(Outputs(s, ft + 1), Outputs(t, ft), y, 0)["hint"], torch.tensor(1.0))


def test_projector_shapes():
    from kdpipe.features import make_projector
    x = torch.randn(2, 16, 8, 8)
    assert make_projector((16, 8, 8), (32, 4, 4))(x).shape == (2, 32, 4, 4)
    assert make_projector((16, 8, 8), (32,))(x).shape == (2, 32)
    assert make_projector((16,), (32,))(torch.randn(2, 16)).shape == (2, 32)
    assert make_projector((16,), (32, 1, 1))(torch.randn(2, 16)).shape == (2, 32, 1, 1)
    for s, t, words in (((16, 2, 2), (32, 4, 4), "smaller than the teacher's"),
                        ((16,), (32, 2, 2), "hint from a student layer that gives a map"),
                        ((16,), (32, 1, 2), "of at least 1 x 2, or cache a pooled teacher layer"),
                        ((4, 16), (32,), "name a student layer")):
        with pytest.raises(KDPipeError, match=words):
            make_projector(s, t)


def test_hint_settings_are_refused_in_one_line(feat_cache, tmp_path):
    from kdpipe.student import hint_feature
    base = ["train-student", "--cache", feat_cache.path, "--student", "cnn_tiny", "--epochs", 1, "--out", tmp_path]
    for extra, words in ((["--loss", "kd+hint"], "needs --hint-layer"),
                         (["--loss", "kd+hint", "--hint-layer", "pool"], "several features (pool, head.2)"),
                         (["--loss", "kd+hint", "--hint-layer", "pool", "--hint-feature", "x"], "no feature 'x'"),
                         (["--loss", "kd+hint", "--hint-layer", "poo", "--hint-feature", "pool"],
                          "student has no module 'poo'"),
                         (["--loss", "kd+hint", "--hint-layer", "head.1", "--hint-feature", "pool"], "vectors"),
                         (["--hint-layer", "pool"], "go with a loss that has a hint term")):
        assert words in one_line_error(invoke(base + extra, code=2))
    with pytest.raises(KDPipeError, match="holds no features"):
        hint_feature(SimpleNamespace(manifest={}, path="c"), None)


# A network of the user's own: `act` is one ReLU its forward calls twice (as torchvision's BasicBlock.relu), `seq`
# returns a sequence-first (2, batch, 16) tensor.
AWKWARD_NETS = """
import torch.nn as nn

class SeqFirst(nn.Module):
    def forward(self, x):
        return x.unsqueeze(0).expand(2, -1, -1)

class Net(nn.Module):
    def __init__(self, num_classes, image_shape):
        super().__init__()
        self.flat, self.fc1, self.fc2 = nn.Flatten(), nn.Linear(28 * 28, 16), nn.Linear(16, 16)
        self.act, self.seq, self.head = nn.ReLU(), SeqFirst(), nn.Linear(16, num_classes)

    def forward(self, x):
        h = self.act(self.fc2(self.act(self.fc1(self.flat(x)))))
        return self.head(self.seq(h)[0])

def Factory(num_classes=10, image_shape=(1, 28, 28)):
    return Net(num_classes, image_shape)
"""


@pytest.fixture
def awkward_net(tmp_path) -> SimpleNamespace:
    (tmp_path / "awkward.py").write_text(AWKWARD_NETS)
    torch.manual_seed(0)
    from kdpipe.models import create_model
    spec = f"{tmp_path / 'awkward.py'}:Factory"
    torch.save(create_model(spec, 10, (1, 28, 28)).state_dict(), tmp_path / "awkward.pth")
    return SimpleNamespace(spec=spec, weights=tmp_path / "awkward.pth")


@pytest.mark.parametrize("layer, words", [("act", "runs more than once in one forward pass"),
                                          ("seq", "gives (2, 3, 16) for a batch of 3 inputs: its first dimension "
                                                  "is not the batch")])
def test_a_layer_that_is_not_one_row_per_image_is_refused_on_both_sides(feat_cache, awkward_net, tmp_path,
                                                                        layer, words):
    """A shared module's features would be whichever call came last, and a sequence-first output's rows are not
    the images': both are refused in one line, for the teacher's --features and the student's --hint-layer."""
    err = one_line_error(invoke(["dump-logits", "--teacher", awkward_net.weights, "--teacher-arch", awkward_net.spec,
                                 "--input-range", "0-1", "--data", feat_cache.spec, "--limit", 64, "--views", 1,
                                 "--features", layer, "--force", "--out", tmp_path / "c"], code=2))
    assert f"the teacher's module {layer!r} {words}" in err
    assert not (tmp_path / "c").exists()
    err = one_line_error(invoke(["train-student", "--cache", feat_cache.path, "--student", awkward_net.spec,
                                 "--loss", "kd+hint", "--hint-layer", layer, "--hint-feature", "head.2",
                                 "--epochs", 1, "--out", tmp_path / "runs"], code=2))
    assert f"the student's module {layer!r} {words}" in err
    assert not list((tmp_path / "runs").glob("*/metrics.json"))


def test_kd_hint_trains_the_projector_saves_it_in_the_run_and_export_drops_it(feat_cache, tmp_path):
    from kdpipe.export import load_model
    from kdpipe.models import create_model
    out = invoke(["train-student", "--cache", feat_cache.path, "--student", "cnn_tiny", "--epochs", 2,
                  "--batch-size", 32, "--loss", "kd:1,hint:50", "--hint-layer", "features.7", "--hint-feature", "pool",
                  "--fuse", "on", "--out", tmp_path / "runs"])
    assert "its runs step unfused" in out
    run = tmp_path / "runs" / "cnn_tiny-kd+hint_hint.weight50-e2-s0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["train_terms"]) == {"ce", "kd", "hint"} and all(v > 0 for v in metrics["train_terms"]["hint"])
    assert metrics["loss"] == {"name": "kd+hint", "options": {"temperature": 4.0, "alpha": 0.9, "kd.weight": 1.0,
                                                              "hint.weight": 50.0}}
    hint = metrics["hint"]
    assert hint["student_layer"] == "features.7" and hint["student_shape"] == [16, 7, 7]
    assert hint["teacher_feature"] == "pool" and hint["teacher_shape"] == [32, 2, 2]
    assert hint["projector_parameters"] == 16 * 32 + 32 and hint["file"] == "projector.pt"
    proj = torch.load(run / "projector.pt", weights_only=True)
    assert set(proj["state_dict"]) == {"1.weight", "1.bias"} and proj["student_layer"] == "features.7"
    plain = create_model("cnn_tiny", 10, (1, 28, 28))
    loaded = load_model(run)
    assert set(loaded.module.state_dict()) == set(plain.state_dict())  # the student alone
    assert metrics["parameters"] == sum(p.numel() for p in plain.parameters())
    assert "matches PyTorch" in invoke(["export", run, "--format", "torchscript", "--out", tmp_path / "s.ts"])
    config = json.loads((run / "config.json").read_text())
    assert config["hint"]["student_layer"] == "features.7"


def test_resume_restores_the_projector_from_the_pass_checkpoint(feat_cache, tmp_path):
    from kdpipe.student import train_students
    kwargs = dict(loss="kd+hint", batch_size=32, hint_layer="head.2", hint_feature_name="head.2", keep_checkpoints=True)
    log: list[str] = []
    train_students(feat_cache.path, ["cnn_tiny"], 2, tmp_path, log=log.append, **kwargs)
    run = tmp_path / "cnn_tiny-kd+hint-e2-s0"
    ckpts = list((tmp_path / "checkpoints").glob("pass-*.pt"))
    assert len(ckpts) == 1
    state = torch.load(ckpts[0], weights_only=True)["state"]["cnn_tiny-kd+hint-e2-s0"]
    assert {"projector.weight", "projector.bias"} <= set(state["model"])
    n_params = len(list(create_model_params()))
    assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == n_params + 2  # the projector's too
    saved = torch.load(run / "projector.pt", weights_only=True)["state_dict"]
    torch.testing.assert_close(saved["weight"], state["model"]["projector.weight"])
    # An unfinished run (no metrics.json) resumes from the checkpoint, projector included
    (run / "metrics.json").unlink()
    (run / "projector.pt").unlink()
    log = []
    train_students(feat_cache.path, ["cnn_tiny"], 2, tmp_path, log=log.append, **kwargs)
    assert any("resuming from" in x for x in log), log
    torch.testing.assert_close(torch.load(run / "projector.pt", weights_only=True)["state_dict"]["weight"],
                               saved["weight"])


def create_model_params():
    from kdpipe.models import create_model
    return create_model("cnn_tiny", 10, (1, 28, 28)).parameters()


def test_cifar10_features_pipeline(cifar_folder, monkeypatch, tmp_path):
    """pipelines/cifar10-features.toml (teacher training, a dump with features, scratch, KD and KD plus
    a hint) end to end on the generated CIFAR-like ImageFolder, with a `limit` (60 of its 120 images)."""
    from kdpipe.pipeline import load_pipeline, make_rules
    from test_pipelines import run_pipeline
    monkeypatch.chdir(tmp_path)
    spec = load_pipeline(REPO / "pipelines" / "cifar10-features.toml")
    assert "limit" not in spec["data"] and spec["dump"]["features"] == ["avgpool"]
    assert spec["students"][1]["loss"] == "kd:1,hint:50" and spec["students"][1]["hint_layer"] == "avgpool"
    rules = make_rules(spec)
    assert "--features avgpool" in rules and "--hint-layer avgpool --hint-feature avgpool" in rules
    spec["data"].update(spec=f"imagefolder:{cifar_folder}", limit=60)
    spec["teacher"].update(arch="tv:resnet18", epochs=1, batch_size=20, lr=0.01)  # resnet50 is slow on CPU
    spec["dump"].update(views=1, force=True)
    for block in spec["students"]:
        block.update(epochs=1, batch_size=20)
    summary = run_pipeline(spec, tmp_path)
    runs = {r["name"]: r for r in summary["runs"]}
    assert len(runs) == 3
    hinted = [r for r in runs.values() if r["loss"]["name"] == "kd+hint"]
    assert len(hinted) == 1 and "hint" in hinted[0]["train_terms"]
    m = json.loads((tmp_path / "cache" / "cifar10-features" / "manifest.json").read_text())
    assert m["features"][0]["layer"] == "avgpool" and m["features"][0]["shape"] == [512, 1, 1]


def test_cifar10_features_trains_the_cifar10_resnet_teacher():
    """The README says cifar10-features caches the features of the cifar10-resnet teacher: it is trained
    alike (Adam with a warm-up and zero-init residuals; SGD at lr 0.1 did not learn there), and the
    first step's command line is the same."""
    from kdpipe.pipeline import load_pipeline, make_rules
    feat = load_pipeline(REPO / "pipelines" / "cifar10-features.toml")
    resnet = load_pipeline(REPO / "pipelines" / "cifar10-resnet.toml")
    assert feat["teacher"] == resnet["teacher"]
    teacher_cmd = [line.replace("cifar10-features", "P") for line in make_rules(feat).splitlines()
                   if "train-teacher" in line]
    assert teacher_cmd == [line.replace("cifar10-resnet", "P") for line in make_rules(resnet).splitlines()
                           if "train-teacher" in line]


def test_features_beside_the_top_k_codec_train_kd_plus_hint(feat_cache, tmp_path):
    """A top-k cache with features: verify-cache checks both, and kd+hint trains from its (k + 1)-bin KL and
    the features; dkd+hint, whose dkd needs every logit, is refused in one line."""
    out = tmp_path / "c"
    output = invoke(["dump-logits", "--teacher", feat_cache.teacher, "--data", feat_cache.spec, "--limit", 128,
                     "--views", 2, "--policy", "crop:2+flip", "--codec", "topk:3", "--temperatures", 4,
                     "--features", "head.2", "--out", out])
    assert "of which 128 of features" in output
    c = Cache(out)
    assert c.manifest["logits"]["codec"] == "topk" and c.manifest["features"][0]["layer"] == "head.2"
    np.testing.assert_array_equal(c.read("features/head.2", 0, 256),
                                  Cache(feat_cache.path).read("features/head.2", 0, 256))
    r = CliRunner().invoke(main, ["verify-cache", str(out), "--teacher", str(feat_cache.teacher), "--sample", "32"])
    assert r.exit_code == 0 and "features/head.2 agrees" in r.output, r.output
    invoke(["train-student", "--cache", out, "--student", "cnn_tiny", "--epochs", 1, "--batch-size", 32,
            "--loss", "kd+hint", "--hint-layer", "head.2", "--out", tmp_path / "runs"])
    metrics = json.loads((tmp_path / "runs" / "cnn_tiny-kd+hint-e1-s0" / "metrics.json").read_text())
    assert set(metrics["train_terms"]) == {"ce", "kd", "hint"} and metrics["train_terms"]["kd"][0] > 0
    err = one_line_error(invoke(["train-student", "--cache", out, "--student", "cnn_tiny", "--epochs", 1,
                                 "--loss", "dkd+hint", "--hint-layer", "head.2", "--out", tmp_path / "r2"], code=2))
    assert "needs every teacher logit" in err


def test_the_python_api_gives_cached_features(feat_cache):
    """open_cache(features=LAYER): each batch's teacher targets are Outputs(logits, features), the rows
    of the cache's columns for that batch's samples; CachedLogitsDataset(features=True) adds each
    feature to a row's items. Several features and none given, or a layer not cached, are refused."""
    import kdpipe
    from kdpipe.cache.reader import CachedLogitsDataset
    from kdpipe.engine import batches
    from kdpipe.util import seeded_generator

    c = Cache(feat_cache.path)
    data = kdpipe.open_cache(feat_cache.path, features="head.2")
    assert data.feature["layer"] == "head.2"
    idx = next(iter(batches(data.num_samples, 32, seeded_generator(3, 1), data.device)))
    x, t, y = next(iter(data.epoch(1, batch_size=32, seed=3)))
    assert isinstance(t, Outputs) and t.logits.shape == (32, 10) and t.features.shape == (32, 64)
    view1 = {name: c.read_view(1, name).astype(np.float32) for name in ("features/head.2", "logits")}
    np.testing.assert_array_equal(t.features.numpy(), view1["features/head.2"][idx.numpy()])
    np.testing.assert_array_equal(t.logits.numpy(), view1["logits"][idx.numpy()])
    plain = next(iter(kdpipe.open_cache(feat_cache.path).epoch(1, batch_size=32, seed=3)))
    torch.testing.assert_close(plain[1], t.logits)
    torch.testing.assert_close(plain[0], x)
    with pytest.raises(KDPipeError, match="holds several features .pool, head.2.: .* features='LAYER'"):
        kdpipe.open_cache(feat_cache.path, features=True)
    with pytest.raises(KDPipeError, match="has no feature 'fc'"):
        kdpipe.open_cache(feat_cache.path, features="fc")

    ds = CachedLogitsDataset(feat_cache.path, features=True)
    item = ds[130]
    assert len(item) == len(CachedLogitsDataset(feat_cache.path)[130]) + 2
    np.testing.assert_array_equal(item[-2].numpy(), c.read_rows("features/pool", np.array([130]))[0].astype(np.float32))
    assert item[-2].shape == (32, 2, 2) and item[-1].shape == (64,) and item[-1].dtype == torch.float32


def test_a_feature_caches_rows_reach_spawned_dataloader_workers(feat_cache):
    """A DataLoader whose workers are spawned (the default start method on macOS, and forkserver from Python
    3.14 on Linux) pickles the dataset: the feature columns' shapes must survive it, not fail to pickle."""
    import pickle

    from kdpipe.cache.reader import CachedLogitsDataset

    ds = CachedLogitsDataset(feat_cache.path, features=True)
    clone = pickle.loads(pickle.dumps(ds))
    for a, b in zip(clone[130], ds[130]):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    rows = [0, 99, 100, 255]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, rows), batch_size=2, num_workers=2,
                                         multiprocessing_context="spawn")
    got = torch.cat([b[-2] for b in loader])
    c = Cache(feat_cache.path)
    np.testing.assert_array_equal(got.numpy(), c.read_rows("features/pool", np.array(rows)).astype(np.float32))


def test_a_hint_run_trains_the_same_alone_or_in_a_shared_pass(feat_cache, tmp_path):
    """A run's projector was drawn from the global RNG after every run of its pass was built (and the projectors of
    the runs before it), so the same run (name, settings) began from another projector, and ended on other weights,
    when a sweep gave it company (--temperature 2,4 against --temperature 4). Each projector now draws from its
    run's seed alone."""
    base = ["train-student", "--cache", feat_cache.path, "--student", "cnn_tiny", "--epochs", 1, "--batch-size", 32,
            "--loss", "kd:1,hint:50", "--hint-layer", "features.7", "--hint-feature", "pool", "--alpha", 0.9]
    invoke(base + ["--temperature", 4, "--out", tmp_path / "alone"])
    invoke(base + ["--temperature", "2,4", "--out", tmp_path / "shared"])
    name = "cnn_tiny-kd+hint_hint.weight50-T4-a0.9-e1-s0"
    for what in ("projector.pt", "student.pt"):
        a, b = (torch.load(tmp_path / d / name / what, weights_only=False) for d in ("alone", "shared"))
        a, b = a.get("state_dict", a.get("model", a)), b.get("state_dict", b.get("model", b))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), what


def test_a_torchvision_model_on_grey_images_names_its_layers_as_torchvision_does(fmnist, tmp_path):
    """kdpipe puts a repeat to 3 channels before a torchvision model built for grey images: its layers were named
    '1.avgpool', '1.layer3', names no torchvision user writes ('avgpool' was refused). They are named as the
    model names them; the '1.' names that earlier caches recorded still resolve. torchvision's avgpool gives
    (512, 1, 1), which a student's vector layer (an MLP's) now hints onto: it was refused as a map."""
    from kdpipe.features import find_module
    from kdpipe.models import create_model
    torch.manual_seed(0)
    model = create_model("tv:resnet18", 10, (1, 28, 28))
    assert find_module(model, "avgpool") is find_module(model, "1.avgpool") is model[1].avgpool
    with pytest.raises(KDPipeError, match="close names: avgpool"):
        find_module(model, "avgpol")
    torch.save(model.state_dict(), tmp_path / "t.pth")
    out = tmp_path / "c"
    invoke(["dump-logits", "--teacher", tmp_path / "t.pth", "--teacher-arch", "tv:resnet18", "--mean", 0.3,
            "--std", 0.35, "--data", fmnist.spec, "--limit", 64, "--views", 1, "--force", "--features", "avgpool",
            "--out", out])
    assert [f["layer"] for f in Cache(out).manifest["features"]] == ["avgpool"]
    r = CliRunner().invoke(main, ["verify-cache", str(out), "--teacher", str(tmp_path / "t.pth"), "--teacher-arch",
                                  "tv:resnet18", "--sample", "16"])
    assert r.exit_code == 0 and "features/avgpool agrees" in r.output, r.output
    run = tmp_path / "r"
    invoke(["train-student", "--cache", out, "--student", "mlp:32", "--epochs", 1, "--batch-size", 32,
            "--loss", "kd+hint", "--hint-layer", "net.1", "--hint-feature", "avgpool", "--out", run])
    assert (run / "mlp32-kd+hint-e1-s0" / "projector.pt").exists()
