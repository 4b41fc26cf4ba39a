"""Every command through click's CliRunner: --help, the whole pipeline on small real data, and bad
input answered with a one-line error and exit code 2, never a traceback."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdpipe.cli import main

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"train-teacher", "dump-logits", "train-student", "report", "inspect", "verify-cache", "make-rules"}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result


def assert_one_line_error(result, message):
    """Exit code 2, exactly one line on stderr ("Error: ..." naming the problem), no traceback."""
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0], lines[0]


# ---------------------------------------------------------------- the options that messages name

FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*[a-z0-9](?![\w-])")
TORCHRUN_FLAGS = {"--nproc_per_node", "--nproc-per-node"}  # torchrun's, which messages about launching it name


def _options(command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)}


def _source_strings(node):
    """The string constants under an AST node (an f-string's literal parts too)."""
    import ast
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_every_option_that_kdpipes_messages_and_help_name_exists():
    """Error messages (and help texts, docstrings, hints) say what to do by naming options; an option renamed or
    never added (a message advising --flag that no command takes) sends the user to a second error. Every
    --option written in kdpipe's source must be one of some command's, or torchrun's."""
    import ast
    known = {o for c in main.commands.values() for o in _options(c)} | {"--help", "--version"} | TORCHRUN_FLAGS
    wrong = []
    for path in sorted((REPO / "kdpipe").rglob("*.py")):
        for text in _source_strings(ast.parse(path.read_text())):
            wrong += [f"{path.relative_to(REPO)}: {flag} in {text[:60]!r}" for flag in FLAG.findall(text)
                      if flag not in known]
    assert not wrong, wrong


def test_the_errors_a_command_raises_itself_name_its_own_options():
    """A message raised in a command's own function (kdpipe/cli.py) names options of that command, not another's."""
    import ast
    tree = ast.parse((REPO / "kdpipe" / "cli.py").read_text())
    checked = 0
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        names = [d.args[0].value for d in fn.decorator_list if isinstance(d, ast.Call) and d.args
                 and isinstance(d.func, ast.Attribute) and d.func.attr == "command"]
        if not names:
            continue
        own = _options(main.commands[names[0]]) | {"--help"}
        for r in (n for n in ast.walk(fn) if isinstance(n, ast.Raise) and n.exc is not None):
            for text in _source_strings(r.exc):
                checked += 1
                assert set(FLAG.findall(text)) <= own, (names[0], text)
    assert checked > 10


# ---------------------------------------------------------------- help and entry points

def test_main_help_lists_every_command():
    r = ok(invoke("--help"))
    for name in COMMANDS - {"make-rules"}:
        assert name in r.output
    assert COMMANDS - {"make-rules"} <= set(main.commands)


@pytest.mark.parametrize("name", sorted(set(main.commands) | COMMANDS))
def test_every_command_has_help(name):
    assert name in main.commands, f"the command {name} is missing"
    r = ok(invoke(name, "--help"))
    assert r.output.startswith(f"Usage: main {name}") or f"{name}" in r.output.splitlines()[0]
    assert "--help" in r.output
    cmd = main.commands[name]
    for p in cmd.params:  # every option has a help text
        if p.param_type_name == "option" and p.name != "help":
            assert p.help, f"{name} {p.opts[0]} has no help"


def test_python_dash_m_and_version():
    r = subprocess.run([sys.executable, "-m", "kdpipe", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "dump-logits" in r.stdout
    assert ok(invoke("--version")).output.startswith("kdpipe, version ")


@pytest.mark.parametrize("cmd, args", [
    ("train-teacher", ["--arch", "cnn_tiny", "--out", "t.pt"]), ("verify-cache", ["c"]), ("inspect", ["c"]),
    ("report", ["r", "--out", "rep"]), ("compress", ["--teacher", "t.pt", "--out", "comp"]),
    ("export", ["r", "--format", "torchscript", "--out", "m.ts"]), ("make-rules", ["p.toml"]),
])
def test_a_command_of_one_process_is_refused_under_torchrun(tmp_path, monkeypatch, cmd, args):
    """docs/distributed.md: only dump-logits and train-student run under torchrun. Every rank ran the others
    again: two trainings of one teacher met at its lock, which said to wait for "another kdpipe"."""
    monkeypatch.chdir(tmp_path)
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    assert_one_line_error(invoke(cmd, *args), f"{cmd} runs as one process, and this is one of 2 that torchrun "
                                              "started (WORLD_SIZE=2): start it with plain kdpipe")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process (torchrun --nproc_per_node 1): nothing to refuse
    assert "one process" not in invoke(cmd, *args).output


# ---------------------------------------------------------------- the pipeline, command by command

@pytest.fixture(scope="module")
def pipeline(fmnist, tmp_path_factory):
    """train-teacher -> dump-logits -> train-student -> report, as a user would type them."""
    root = tmp_path_factory.mktemp("cli")
    teacher, cache, runs, report = root / "teacher.pt", root / "cache", root / "runs", root / "report"
    with pytest.MonkeyPatch.context() as mp:  # dump-logits installs a SIGTERM handler
        mp.setattr(signal, "signal", lambda *a: None)
        res = SimpleNamespace(root=root, teacher=teacher, cache=cache, runs=runs, report=report)
        res.train_teacher = invoke("train-teacher", "--data", fmnist.spec, "--arch", "mlp_100", "--epochs", 2,
                                   "--batch-size", 64, "--device", "cpu", "--out", teacher)
        res.dump = invoke("dump-logits", "--teacher", teacher, "--data", fmnist.spec, "--views", 2, "--policy",
                          "crop-flip", "--padding", 2, "--seed", 3, "--shard-rows", 300, "--batch-size", 128,
                          "--device", "cpu", "--out", cache)
        res.train_student = invoke("train-student", "--cache", cache, "--student", "mlp_100", "--student", "cnn_tiny",
                                   "--epochs", 2, "--temperature", "2,4", "--alpha", "0,0.9", "--seed", 0,
                                   "--batch-size", 128, "--device", "cpu", "--out", runs)
        res.report_run = invoke("report", runs, "--out", report)
    return res


def test_train_teacher_command(pipeline, fmnist):
    r = ok(pipeline.train_teacher)
    assert str(pipeline.teacher) in r.output and "test top-1" in r.output
    import torch
    ckpt = torch.load(pipeline.teacher, weights_only=True)
    assert ckpt["arch"] == "mlp_100" and ckpt["num_classes"] == 10 and ckpt["image_shape"] == [1, 28, 28]
    assert ckpt["dataset"]["spec"] == fmnist.spec
    assert ckpt["test_top1"] > 0.5  # 2 epochs on 512 images: about 0.58, where chance is 0.1
    # each epoch's test top-1 is printed and kept, so a teacher that is not learning shows early
    hist = ckpt["history"]
    assert [h["epoch"] for h in hist] == [1, 2] and hist[-1]["test_top1"] == ckpt["test_top1"]
    assert all(0 <= h["train_top1"] <= 1 and h["loss"] > 0 for h in hist)
    assert "teacher epoch 1/2: train top-1" in r.output and f"test top-1 {hist[0]['test_top1']:.4f}" in r.output
    # each epoch's loss line says how long the training took so far and, but for the last, how long it will take
    assert re.search(r"teacher epoch 1/2: teacher loss .*; \d+s elapsed, ~\d+s left\n", r.output), r.output
    assert re.search(r"teacher epoch 2/2: teacher loss .*; \d+s elapsed\n", r.output), r.output


def test_inspect_a_checkpoint(pipeline, tmp_path):
    """inspect FILE.pt: a kdpipe checkpoint's model, data, training, test top-1 and per-epoch history
    (--json: the whole record but the weights); any other file is refused in one line."""
    import torch
    ckpt = torch.load(pipeline.teacher, weights_only=True)
    out = ok(invoke("inspect", pipeline.teacher)).output
    assert "kdpipe checkpoint 1, teacher" in out and "kdpipe:mlp_100, 79,510 parameters, input (1, 28, 28)" in out
    assert f"top-1 {ckpt['test_top1']:.4f}" in out and "2 epochs, sgd lr 0.05 cosine" in out
    assert "test top-1 by epoch: " + ", ".join(f"{h['test_top1']:.4f}" for h in ckpt["history"]) in out
    record = json.loads(ok(invoke("inspect", "--json", pipeline.teacher)).output)
    assert "state_dict" not in record and record["history"] == ckpt["history"]
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    assert_one_line_error(invoke("inspect", tmp_path / "notes.pt"),
                          "notes.pt is a file but not a kdpipe checkpoint")


def test_inspect_a_run_directory_shows_its_student(pipeline):
    """inspect RUN_DIR, as export takes a run: its student.pt (it was refused as 'not a kdpipe cache')."""
    run = pipeline.runs / "mlp_100-T4-a0.9-e2-s0"
    assert ok(invoke("inspect", run)).output == ok(invoke("inspect", run / "student.pt")).output
    assert "student" in ok(invoke("inspect", run)).output


def test_inspect_a_training_checkpoint_that_is_gone_says_the_training_removed_it(tmp_path):
    """The README has users follow a teacher's training with inspect FILE.pt.checkpoint: once the training ended,
    that file is gone, and inspect said "no cache at ...: the directory does not exist"."""
    assert_one_line_error(invoke("inspect", tmp_path / "teacher.pt.checkpoint"),
                          f"no training checkpoint at {tmp_path / 'teacher.pt.checkpoint'}: a training removes its "
                          f"checkpoint when it ends (inspect what it saved, {tmp_path / 'teacher.pt'})")
    assert_one_line_error(invoke("inspect", tmp_path / "runs" / "checkpoints" / "pass-s0-0123456789.pt"),
                          f"(inspect what it saved, {tmp_path / 'runs' / '<run>' / 'student.pt'})")
    assert_one_line_error(invoke("inspect", tmp_path / "c"), "no cache at")  # any other path: as before


def test_dump_logits_command_summarises(pipeline):
    r = ok(pipeline.dump)
    out = r.stdout
    assert "1,024 rows" in out and "MB on disk" in out and "images/s" in out
    assert "teacher top-1 on its views" in out and "on the clean test split" in out
    m = json.loads((pipeline.cache / "manifest.json").read_text())
    assert m["rows"] == 1024 and m["views"]["K"] == 2 and m["views"]["seed"] == 3
    assert m["views"]["spec"] == "crop:2+flip" and m["logits"]["dtype"] == "float16"
    assert len(m["shards"]) == 4
    for s in m["shards"]:
        with h5py.File(pipeline.cache / s["file"], "r") as f:
            assert all("description" in f[k].attrs for k in f)


def test_dump_logits_again_does_nothing(pipeline, fmnist):
    def state():  # contents of every file; times of all but the manifest (touched for make on purpose)
        return {p.name: (p.read_bytes(), None if p.name == "manifest.json" else p.stat().st_mtime_ns)
                for p in pipeline.cache.iterdir()}

    before = state()
    r = ok(invoke("dump-logits", "--teacher", pipeline.teacher, "--data", fmnist.spec, "--views", 2, "--policy",
                  "crop-flip", "--padding", 2, "--seed", 3, "--shard-rows", 300, "--batch-size", 128,
                  "--device", "cpu", "--out", pipeline.cache))
    assert "already complete" in r.output
    assert state() == before


def test_inspect_command(pipeline):
    r = ok(invoke("inspect", pipeline.cache))
    for fragment in ("mlp_100", "K=2", "crop:2+flip (crop v1, flip v1)", "float16", "1,024", "512 samples", "10 classes", "raw"):
        assert fragment in r.output, fragment
    from kdpipe.cache import format as fmt
    columns = next(line for line in r.output.splitlines() if line.strip().startswith("columns"))
    for col in fmt.shard_columns("raw"):  # each declared column of a raw cache, as the first shard holds it
        assert f"{col.path} {col.np_dtype(json.loads((pipeline.cache / 'manifest.json').read_text())).str}" in columns
    r = ok(invoke("inspect", "--json", pipeline.cache))
    assert json.loads(r.output) == json.loads((pipeline.cache / "manifest.json").read_text())


def test_verify_cache_command(pipeline, tmp_path):
    assert ok(invoke("verify-cache", pipeline.cache)).output.strip().endswith("OK")
    r = ok(invoke("verify-cache", pipeline.cache, "--teacher", pipeline.teacher, "--sample", 64, "--device", "cpu"))
    assert "64" in r.output and r.output.strip().endswith("OK")
    bad = tmp_path / "bad"
    shutil.copytree(pipeline.cache, bad)
    with h5py.File(bad / "shard-00001.h5", "r") as f:
        off = f["logits"].id.get_offset()
    with open(bad / "shard-00001.h5", "r+b") as fh:
        fh.seek(off + 10)
        b = fh.read(1)
        fh.seek(off + 10)
        fh.write(bytes([b[0] ^ 0x40]))
    r = invoke("verify-cache", bad)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "shard-00001.h5" in r.stderr and "logits" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--sample", 1000], "--sample is for the teacher check, which needs the teacher: give --teacher FILE"),
    (["--trust-pickle"], "--trust-pickle is for the teacher check"),
    (["--seed", 5], "--seed is for the teacher check"),  # the seed of the rows it samples: ignored without a word
    (["--data-root", "/elsewhere"], "--data-root is for the teacher check"),
    (["--teacher", "t.pt", "--teacher-weights", "t.pt"], "give the teacher file once"),
])
def test_verify_cache_refuses_teacher_options_it_would_ignore(pipeline, args, message):
    """verify-cache --sample 1000 (no teacher) printed OK after checking the checksums only, as if 1000 rows
    had been re-computed; --teacher with --teacher-weights used one of the two without a word."""
    assert_one_line_error(invoke("verify-cache", pipeline.cache, *args), message)


def test_train_student_command_runs_the_sweep(pipeline):
    r = ok(pipeline.train_student)
    assert "6 run(s) written" in r.output
    names = {f"{a}-{tag}-e2-s0" for a in ("mlp_100", "cnn_tiny") for tag in ("scratch", "T2-a0.9", "T4-a0.9")}
    assert {p.name for p in pipeline.runs.iterdir()} == names
    for name in names:
        m = json.loads((pipeline.runs / name / "metrics.json").read_text())
        c = json.loads((pipeline.runs / name / "config.json").read_text())
        assert m["name"] == c["run"] == name and c["batch_size"] == 128 and c["epochs"] == 2
        if name.startswith("mlp_100"):  # 16 steps: about 0.45 top-1 and 0.7 agreement, where chance is 0.1
            assert m["test_top1"] > 0.3 and m["teacher_agreement"] > 0.5, m
        # (16 steps of cnn_tiny stay near chance; test_student recomputes a saved student's accuracy.)
        assert (pipeline.runs / name / "student.pt").is_file()


def test_train_student_with_dkd(pipeline, tmp_path):
    r = ok(invoke("train-student", "--cache", pipeline.cache, "--student", "mlp_100", "--loss", "dkd:beta=4,warmup=1",
                  "--epochs", 2, "--batch-size", 128, "--device", "cpu", "--out", tmp_path / "runs"))
    assert "1 run(s) written" in r.output and "tckd" in r.output
    name = "mlp_100-dkd_beta4_warmup1-e2-s0"  # T and alpha not given: DKD's defaults, left out of the name
    m = json.loads((tmp_path / "runs" / name / "metrics.json").read_text())
    assert m["loss"] == {"name": "dkd", "options": {"temperature": 4.0, "alpha": 1.0, "beta": 4.0, "warmup": 1}}
    assert set(m["train_terms"]) == {"ce", "tckd", "nckd"} and len(m["train_terms"]["nckd"]) == 2
    ok(invoke("report", tmp_path / "runs", pipeline.runs, "--out", tmp_path / "rep"))
    rows = [line for line in (tmp_path / "rep" / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert any("| KD | dkd (beta 4, warmup 1) | 4 | 1 |" in line for line in rows)
    assert any("| scratch | ce |" in line for line in rows)  # alpha 0 trained on cross-entropy alone


def test_report_command(pipeline):
    r = ok(pipeline.report_run)
    assert "report of 6 run(s)" in r.output
    text = (pipeline.report / "report.md").read_text()
    assert "| mlp_100 | teacher |" in text
    assert sum(line.startswith("| cnn_tiny |") for line in text.splitlines()) == 3
    pngs = sorted(pipeline.report.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    for p in pngs:
        assert f"({p.name})" in text


def test_make_rules_command(tmp_path):
    spec = REPO / "pipelines" / "default.toml"
    r = ok(invoke("make-rules", spec))
    assert "manifest.json:" in r.output and "metrics.json" in r.output and "report.md:" in r.output
    assert "dump-logits" in r.output and "train-student" in r.output
    assert_one_line_error(invoke("make-rules", tmp_path / "absent.toml"), "absent.toml")


def test_train_teacher_refuses_to_overwrite_a_teacher_without_overwrite(pipeline, fmnist, tmp_path):
    """A second train-teacher into the same file is refused before any training, the first teacher kept
    byte for byte; --overwrite replaces it. Make runs the teacher rule with --overwrite (it retrains a
    teacher whose settings changed), but the flag is not in the step's stamp: a pipeline from before
    the flag does not retrain its teacher for it."""
    import hashlib

    from kdpipe.pipeline import load_pipeline, make_rules
    teacher = tmp_path / "t.pt"
    shutil.copy(pipeline.teacher, teacher)
    before = hashlib.sha256(teacher.read_bytes()).hexdigest()
    args = ["train-teacher", "--data", fmnist.spec, "--arch", "mlp_100", "--epochs", 1, "--device", "cpu",
            "--out", teacher]
    res = invoke(*args)
    assert_one_line_error(res, f"{teacher} already exists: give another --out, or --overwrite to replace it")
    assert "training teacher" not in res.output
    assert hashlib.sha256(teacher.read_bytes()).hexdigest() == before
    ok(invoke(*args, "--overwrite"))
    assert hashlib.sha256(teacher.read_bytes()).hexdigest() != before
    rules = make_rules(load_pipeline(REPO / "pipelines" / "default.toml"), str(tmp_path / "stamps"))
    assert "--out runs/default/teacher.pt --overwrite" in rules
    stamp = (tmp_path / "stamps" / "teacher.cmd").read_text()
    assert stamp.rstrip().endswith("--out runs/default/teacher.pt") and "--overwrite" not in stamp


def test_make_rules_pass_a_blocks_train_samples(tmp_path):
    spec = (REPO / "pipelines" / "default.toml").read_text()
    block = spec.index("[[students]]")
    spec = spec[:block] + '[[students]]\narchs = ["mlp_100"]\nepochs = 2\ntrain_samples = 500\n'
    (tmp_path / "p.toml").write_text(spec)
    r = ok(invoke("make-rules", tmp_path / "p.toml"))
    assert "--train-samples 500" in r.output
    (tmp_path / "p.toml").write_text(spec.replace("train_samples", "train_sample"))
    assert_one_line_error(invoke("make-rules", tmp_path / "p.toml"), "unknown key(s) in [[students]] #1: train_sample")


def test_make_rules_of_a_dkd_block_name_the_runs_train_student_writes(tmp_path):
    spec = (REPO / "pipelines" / "default.toml").read_text()
    block = spec.index("[[students]]")
    spec = spec[:block] + '[[students]]\narchs = ["mlp_100"]\nepochs = 2\nloss = "dkd:beta=4,warmup=1"\n'
    (tmp_path / "p.toml").write_text(spec)
    r = ok(invoke("make-rules", tmp_path / "p.toml"))
    # the name test_train_student_with_dkd finds train-student writing for these options
    assert "students/mlp_100-dkd_beta4_warmup1-e2-s0/metrics.json" in r.output
    assert "--loss dkd:beta=4,warmup=1" in r.output
    (tmp_path / "p.toml").write_text(spec.replace("beta=4", "beta"))
    assert_one_line_error(invoke("make-rules", tmp_path / "p.toml"), "bad loss option 'beta'")


# ---------------------------------------------------------------- bad input: one line, exit 2

@pytest.fixture(scope="module")
def five_classes(fmnist, tmp_path_factory):
    p = tmp_path_factory.mktemp("five") / "five.npz"
    np.savez(p, x_train=fmnist.x_train[:64], y_train=fmnist.y_train[:64] % 5, x_test=fmnist.x_test[:32],
             y_test=fmnist.y_test[:32] % 5)
    return p


def test_bad_input_unknown_dataset(tmp_path):
    assert_one_line_error(invoke("train-teacher", "--data", "svhn", "--arch", "mlp_100", "--device", "cpu",
                                 "--out", tmp_path / "t.pt"), "unknown dataset 'svhn'")


@pytest.mark.parametrize("data, root, message", [
    ("npz:{tmp}/absent.npz", None, "no such file"),
    ("fashion-mnist", "{tmp}", "apt-get install dataset-fashion-mnist"),
    ("mnist", "{tmp}", "MNIST IDX files"),
    ("imagefolder:{tmp}/nothing", None, "no such folder"),
    ("cifar10", "{tmp}", "cifar-10-batches-py"),
])
def test_bad_input_missing_data(tmp_path, data, root, message):
    args = ["--data", data.format(tmp=tmp_path)] + (["--data-root", root.format(tmp=tmp_path)] if root else [])
    assert_one_line_error(invoke("train-teacher", *args, "--arch", "mlp_100", "--device", "cpu",
                                 "--out", tmp_path / "t.pt"), message)
    assert not (tmp_path / "t.pt").exists()


def test_bad_input_unknown_architecture(fmnist, pipeline, tmp_path):
    assert_one_line_error(invoke("train-teacher", "--data", fmnist.spec, "--arch", "resnet_nope", "--device", "cpu",
                                 "--out", tmp_path / "t.pt"), "unknown architecture 'resnet_nope'")
    assert_one_line_error(invoke("train-student", "--cache", pipeline.cache, "--student", "mlp_100", "--student",
                                 "mlp_nope", "--device", "cpu", "--out", tmp_path / "runs"),
                          "unknown architecture 'mlp_nope'")
    assert_one_line_error(invoke("dump-logits", "--teacher-arch", "nope", "--teacher-weights", pipeline.teacher,
                                 "--data", fmnist.spec, "--views", 1, "--device", "cpu", "--out", tmp_path / "c"),
                          "unknown architecture 'nope'")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "t.pt").exists()


@pytest.mark.parametrize("command", ["inspect", "verify-cache", "train-student"])
def test_bad_input_a_directory_that_is_not_a_cache(tmp_path, command):
    (tmp_path / "empty").mkdir()
    extra = ["--student", "mlp_100", "--device", "cpu", "--out", tmp_path / "runs"] if command == "train-student" else []
    args = ["--cache", tmp_path / "empty"] if command == "train-student" else [tmp_path / "empty"]
    assert_one_line_error(invoke(command, *args, *extra), "not a kdpipe cache")
    assert_one_line_error(invoke(command, *(["--cache"] if command == "train-student" else []),
                                 tmp_path / "absent", *extra), "does not exist")


def test_bad_input_teacher_classes_differ_from_the_datasets(pipeline, five_classes, tmp_path):
    r = invoke("dump-logits", "--teacher", pipeline.teacher, "--data", f"npz:{five_classes}", "--views", 1,
               "--device", "cpu", "--out", tmp_path / "c")
    assert_one_line_error(r, "predicts 10 classes")
    assert "has 5" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["dump-logits", "--teacher", "{tmp}/absent.pt", "--data", "{spec}", "--views", "1", "--out", "{tmp}/c"],
     "does not exist"),
    (["dump-logits", "--teacher", "{teacher}", "--data", "{spec}", "--views", "0", "--out", "{tmp}/c"],
     "--views must be >= 1"),
    (["dump-logits", "--data", "{spec}", "--views", "1", "--out", "{tmp}/c"], "give a teacher"),
    (["train-student", "--cache", "{cache}", "--student", "mlp_100", "--alpha", "1.5", "--out", "{tmp}/r"],
     "loss kd: --alpha must lie in [0, 1], got 1.5"),
    (["train-student", "--cache", "{cache}", "--student", "mlp_100", "--temperature", "0", "--out", "{tmp}/r"],
     "temperature must be > 0"),
    (["train-student", "--cache", "{cache}", "--student", "mlp_100", "--loss", "hinton", "--out", "{tmp}/r"],
     "unknown loss 'hinton'; known losses (options=defaults): kd (temperature=4, alpha=0.9); dkd ("),
    (["train-student", "--cache", "{cache}", "--student", "mlp_100", "--loss", "dkd:gamma=1", "--out", "{tmp}/r"],
     "loss dkd has no option gamma; its options (with defaults): temperature=4, alpha=1, beta=8, warmup=20"),
    (["train-student", "--cache", "{cache}", "--student", "mlp_100", "--loss", "dkd:beta", "--out", "{tmp}/r"],
     "bad loss option 'beta'"),
    (["train-student", "--cache", "{cache}", "--student", "mlp_100", "--epochs", "0", "--out", "{tmp}/r"],
     "--epochs must be >= 1"),
    (["report", "{tmp}", "--out", "{tmp}/rep"], "holds no runs"),
    (["train-teacher", "--data", "{spec}", "--arch", "mlp_100", "--device", "cuda:7", "--out", "{tmp}/t.pt"],
     "cuda:7"),
    (["dump-logits", "--teacher", "{teacher}", "--data", "{spec}", "--views", "1", "--policy", "crop:2+blur:3",
      "--out", "{tmp}/c"], "unknown view op 'blur'"),
    (["dump-logits", "--teacher", "{teacher}", "--data", "{spec}", "--views", "1", "--policy", "pad-crop:28:wrap",
      "--out", "{tmp}/c"], "pad-crop mode 'wrap' is not one of constant, edge, reflect, symmetric"),
])
def test_bad_input_other_cases(pipeline, fmnist, tmp_path, args, message):
    fill = dict(tmp=tmp_path, spec=fmnist.spec, teacher=pipeline.teacher, cache=pipeline.cache)
    assert_one_line_error(invoke(*[a.format(**fill) for a in args]), message)


# ---------------------------------------------------------------- image store kinds through the CLI

def test_photos_of_any_size_with_image_size_through_both_stages(tmp_path, monkeypatch):
    """--image-size S is given to stage one only: the manifest records it, stage two reloads alike."""
    from test_data import make_photo_folder
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    make_photo_folder(tmp_path / "photos", per_class=4)
    data = f"imagefolder:{tmp_path / 'photos'}"
    teacher, cache, runs = tmp_path / "t.pt", tmp_path / "cache", tmp_path / "runs"
    r = invoke("train-teacher", "--data", data, "--arch", "cnn_tiny", "--out", teacher)  # after the headers' progress
    assert r.exit_code == 2 and r.stderr.strip().splitlines()[-1].startswith("Error: ") and "differ in size" in r.stderr
    ok(invoke("train-teacher", "--data", data, "--image-size", 24, "--arch", "cnn_tiny", "--epochs", 1,
              "--batch-size", 4, "--padding", 2, "--device", "cpu", "--out", teacher))
    ok(invoke("dump-logits", "--teacher", teacher, "--data", data, "--image-size", 24, "--views", 2,
              "--padding", 2, "--batch-size", 4, "--device", "cpu", "--out", cache))
    d = json.loads((cache / "manifest.json").read_text())["dataset"]
    assert d["kind"] == "photos" and d["image_size"] == 24 and d["image_shape"] == [3, 24, 24]
    ok(invoke("train-student", "--cache", cache, "--student", "cnn_tiny", "--epochs", 2, "--batch-size", 4,
              "--device", "cpu", "--out", runs))
    (run,) = runs.iterdir()  # one student, trained on the photos as stage one stored them
    assert (run / "student.pt").is_file() and (run / "metrics.json").is_file()
    # Another size is decoded anew (progress lines first), then refused: the teacher takes 24 x 24.
    r = invoke("dump-logits", "--teacher", teacher, "--data", data, "--image-size", 32, "--views", 2,
               "--device", "cpu", "--out", tmp_path / "c32")
    assert r.exit_code == 2 and r.stderr.strip().splitlines()[-1] == \
        "Error: the teacher takes inputs (3, 24, 24), the views are (3, 32, 32): dump the data and views it was " \
        f"trained on (--data {data}, --image-size 24, --policy crop:2+flip)"


def _teacher_and_cache_of_resize(data, given: str, mode: str, teacher, cache, cropped) -> dict:
    """A 16 x 16 teacher trained on photos stored by --resize `given` (canonically `mode`); given the default centre
    crops, dump-logits refuses in one line naming `mode`; dumped with `given`, the cache's manifest dataset."""
    ok(invoke("train-teacher", "--data", data, "--image-size", 16, "--resize", given, "--arch", "cnn_tiny",
              "--epochs", 1, "--batch-size", 4, "--padding", 2, "--device", "cpu", "--out", teacher))
    r = invoke("dump-logits", "--teacher", teacher, "--data", data, "--image-size", 16, "--views", 2, "--padding", 2,
               "--force", "--device", "cpu", "--out", cropped)
    assert r.exit_code == 2 and r.stderr.strip().splitlines()[-1] == (
        f"Error: the teacher was trained on photos resized by {mode} (--resize {mode}), the data given is resized by "
        f"crop: dump the data it was trained on (--data {data}, --image-size 16, --resize {mode}, --policy "
        "crop:2+flip)"), r.stderr
    ok(invoke("dump-logits", "--teacher", teacher, "--data", data, "--image-size", 16, "--resize", given,
              "--views", 2, "--padding", 2, "--batch-size", 4, "--force", "--device", "cpu", "--out", cache))
    return json.loads((Path(cache) / "manifest.json").read_text())["dataset"]


def test_squashed_photos_through_both_stages_and_a_teacher_fed_other_photos_is_refused(tmp_path, monkeypatch):
    """--resize squash is given to stage one only: the manifest records it, and stage two, its validation split,
    verify-cache and --like reload the photos squashed. A teacher trained on squashed photos given centre crops of
    the same size was probed above chance and dumped worse logits silently: refused, naming --resize squash."""
    from test_data import _aspect_folder
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    sizes = [(60, 20), (20, 60), (33, 33), (45, 30), (16, 40), (50, 50)]
    _aspect_folder(tmp_path / "photos", sizes)
    _aspect_folder(tmp_path / "other", sizes, seed=1)
    (tmp_path / "other" / "test").rename(tmp_path / "photos" / "val")
    data = f"imagefolder:{tmp_path / 'photos'}"
    teacher, cache, runs = tmp_path / "t.pt", tmp_path / "cache", tmp_path / "runs"
    assert_one_line_error(invoke("dump-logits", "--teacher", teacher, "--data", data, "--resize", "squash",
                                 "--views", 2, "--out", cache), "--resize squash says how photos are brought to "
                                                                "--image-size S: give --image-size S too")
    d = _teacher_and_cache_of_resize(data, "squash", "squash", teacher, cache, tmp_path / "cropped")
    assert d["kind"] == "photos" and d["image_size"] == 16 and d["resize"] == "pil-bicubic-squash/1"
    ok(invoke("verify-cache", cache, "--teacher", teacher, "--sample", 8))
    ok(invoke("train-student", "--cache", cache, "--student", "cnn_tiny", "--epochs", 1, "--batch-size", 4,
              "--val-split", "--device", "cpu", "--out", runs))
    (run,) = runs.iterdir()  # trained on the photos as stage one stored them, best epoch picked on val/ squashed
    from kdpipe.data import load_dataset
    val = load_dataset(data, "val", image_size=16, resize="squash")
    assert json.loads((run / "metrics.json").read_text())["val_data"]["fingerprint"] == val.fingerprint
    assert_one_line_error(invoke("dump-logits", "--teacher", teacher, "--like", cache, "--resize", "crop",
                                 "--force", "--out", tmp_path / "like"),
                          f"--resize crop conflicts with --like {cache}, whose resize is squash")
    ok(invoke("dump-logits", "--teacher", teacher, "--like", cache, "--batch-size", 4, "--force", "--device", "cpu",
              "--out", tmp_path / "like"))
    like = json.loads((tmp_path / "like" / "manifest.json").read_text())["dataset"]
    assert like["fingerprint"] == d["fingerprint"]



def test_a_teacher_of_bilinear_crops_of_another_shorter_side_is_given_those_photos(tmp_path, monkeypatch):
    """--resize crop:R:bilinear (torchvision's Resize(R) + CenterCrop(S)) through stage one: a kdpipe teacher trained
    on those photos and given bicubic centre crops of S is refused, naming its mode; --like takes the mode however
    it is spelled, and refuses another; the manifest and export card name the transform."""
    from test_data import _aspect_folder
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    _aspect_folder(tmp_path / "photos", [(60, 20), (20, 60), (33, 33), (45, 30), (16, 40), (50, 50)])
    data = f"imagefolder:{tmp_path / 'photos'}"
    teacher, cache = tmp_path / "t.pt", tmp_path / "cache"
    d = _teacher_and_cache_of_resize(data, "crop:bilinear:20", "crop:20:bilinear", teacher, cache,
                                     tmp_path / "cropped")
    assert d["resize"] == "pil-bilinear-shorter-side-20+center-crop/1"
    assert "(photos decoded by --image-size 16 --resize crop:20:bilinear)" in ok(invoke("inspect", cache)).output
    ok(invoke("dump-logits", "--teacher", teacher, "--like", cache, "--resize", "CROP:bilinear:20", "--batch-size", 4,
              "--force", "--device", "cpu", "--out", tmp_path / "like"))
    assert json.loads((tmp_path / "like" / "manifest.json").read_text())["dataset"]["fingerprint"] == d["fingerprint"]
    assert_one_line_error(invoke("dump-logits", "--teacher", teacher, "--like", cache, "--resize", "crop:20",
                                 "--force", "--out", tmp_path / "like2"),
                          f"--resize crop:20 conflicts with --like {cache}, whose resize is crop:20:bilinear")
    from kdpipe.export import load_model, preprocessing
    card = "\n".join(preprocessing(load_model(teacher)))
    assert "resize its shorter side to 20 and its longer side to int(20 * longer / shorter), rounded down (PIL " \
           "bilinear" in card and "torchvision's Resize(20, BILINEAR) then CenterCrop(16)" in card

def test_float_features_train_a_teacher_dump_and_train_a_student(tmp_path, monkeypatch):
    """Tabular data: an npz of float64 (N, D) features, views `none`, an MLP teacher and student."""
    from test_data import make_features_npz
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    make_features_npz(tmp_path / "tab.npz")
    data = f"npz:{tmp_path / 'tab.npz'}"
    teacher, cache, runs = tmp_path / "t.pt", tmp_path / "cache", tmp_path / "runs"
    assert_one_line_error(invoke("train-teacher", "--data", data, "--arch", "cnn_tiny", "--policy", "none",
                                 "--out", teacher), "cnn_tiny takes images (C, H, W), not feature vectors (12,)")
    r = ok(invoke("train-teacher", "--data", data, "--arch", "mlp_100", "--policy", "none", "--epochs", 4,
                  "--batch-size", 32, "--device", "cpu", "--out", teacher))
    assert float(r.output.strip().splitlines()[-1].split("(test top-1 ")[1].rstrip(")")) > 0.8  # easy blobs
    assert "images" not in r.output, r.output
    r = ok(invoke("dump-logits", "--teacher", teacher, "--data", data, "--policy", "none", "--views", 1,
                  "--batch-size", 64, "--device", "cpu", "--out", cache))
    assert " rows/s)" in r.output and "images/s" not in r.output, r.output
    assert "views are one view" not in r.output
    # K views that draw nothing are one view K times: said, since --views 1 trains students the same
    r = ok(invoke("dump-logits", "--teacher", teacher, "--data", data, "--policy", "none", "--views", 3,
                  "--batch-size", 64, "--device", "cpu", "--out", tmp_path / "cache3"))
    assert "note: --policy none draws nothing at random, so the 3 views are one view computed 3 times: --views 1 " \
           "trains students the same" in r.output, r.output
    shown = ok(invoke("inspect", cache)).output
    assert " rows/s on cpu" in shown and re.search(r"test top-1 0\.\d{4}\n", shown), shown  # not 0.98000001...
    m = json.loads((cache / "manifest.json").read_text())
    assert m["dataset"]["kind"] == "features" and m["dataset"]["image_shape"] == [12]
    x = np.load(tmp_path / "tab.npz")["x_train"].astype(np.float32)
    np.testing.assert_allclose(m["input"]["mean"], x.astype(np.float64).mean(0), rtol=1e-6)
    r = ok(invoke("train-student", "--cache", cache, "--student", "mlp_100", "--epochs", 3, "--batch-size", 32,
                  "--device", "cpu", "--out", runs))
    for p in runs.iterdir():
        assert json.loads((p / "metrics.json").read_text())["test_top1"] > 0.8, p.name
    assert " rows/s per student" in r.output and "images" not in r.output, r.output  # a table's rows, not images


def test_train_teacher_overwrite_replaces_only_kdpipes_checkpoints(tmp_path, monkeypatch):
    """train-teacher --data npz:d.npz --out d.npz --overwrite replaced the data with the teacher (make reruns steps with
    --overwrite); a user's own weights at --out went the same way. Refused before training; a kdpipe checkpoint of
    other settings is still replaced."""
    from test_data import make_features_npz
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    make_features_npz(tmp_path / "tab.npz")
    data = tmp_path / "tab.npz"
    before = data.read_bytes()
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "mine.pth")
    args = ["train-teacher", "--data", f"npz:{data}", "--arch", "mlp_100", "--epochs", 1, "--batch-size", 32,
            "--device", "cpu", "--overwrite", "--out"]
    for target in (data, tmp_path / "mine.pth"):
        assert_one_line_error(invoke(*args, target), f"{target} is not a kdpipe checkpoint (the data, or weights of "
                              "your own?): --overwrite replaces only kdpipe's checkpoints")
    assert data.read_bytes() == before and set(torch.load(tmp_path / "mine.pth")) == {"fc.weight"}
    ok(invoke(*args, tmp_path / "t.pt"))
    r = ok(invoke(*[a if a != 1 else 2 for a in args], tmp_path / "t.pt"))  # other epochs: trained again
    assert "holds a teacher of other settings" in r.output


def test_feature_vectors_default_to_views_none_and_refuse_crop_flips_options(tmp_path, monkeypatch):
    """The default views, crop-flip, fit no feature vector: a tabular user's first train-teacher was refused until
    given --policy none. Feature vectors now default to none; images keep crop-flip; --padding or --size with the
    default on feature vectors (options of crop-flip, which would be ignored) are refused."""
    from test_data import make_features_npz
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    make_features_npz(tmp_path / "tab.npz")
    data = f"npz:{tmp_path / 'tab.npz'}"
    teacher, cache = tmp_path / "t.pt", tmp_path / "cache"
    for cmd, args in (("train-teacher", ["--arch", "mlp_100", "--epochs", 1, "--out", tmp_path / "x.pt"]),
                      ("dump-logits", ["--teacher", teacher, "--views", 1, "--out", tmp_path / "x"])):
        assert_one_line_error(invoke(cmd, "--data", data, "--padding", 2, *args),
                              "--padding is an option of crop-flip, the default views of images; "
                              f"{data} holds feature vectors, whose default views are none: leave --padding out")
    ok(invoke("train-teacher", "--data", data, "--arch", "mlp_100", "--epochs", 1, "--batch-size", 32,
              "--device", "cpu", "--out", teacher))
    assert json.loads(ok(invoke("inspect", teacher, "--json")).output)["view_policy"]["spec"] == "none"
    ok(invoke("dump-logits", "--teacher", teacher, "--data", data, "--views", 1, "--device", "cpu", "--out", cache))
    assert json.loads((cache / "manifest.json").read_text())["views"]["spec"] == "none"
    # an image op asked for on feature vectors is still refused, naming what fits
    assert_one_line_error(invoke("train-teacher", "--data", data, "--arch", "mlp_100", "--policy", "crop-flip",
                                 "--out", tmp_path / "y.pt"),
                          "view op crop does not apply to samples of shape (12,)")


@pytest.mark.parametrize("cmd, seed", [
    (cmd, seed) for cmd in ("train-teacher", "train-student", "dump-logits", "verify-cache")
    for seed in ["-1", "99999999999999999999"] + (["0,-2"] if cmd == "train-student" else [])])
def test_a_seed_out_of_range_is_one_line_before_any_work(tmp_path, cmd, seed):
    """A seed past int64 gave an OverflowError traceback from torch; train-student took negative seeds, which
    train-teacher and dump-logits refuse."""
    args = {"train-teacher": ["--data", "fashion-mnist", "--arch", "mlp_100", "--out", str(tmp_path / "o")],
            "dump-logits": ["--data", "fashion-mnist", "--teacher", str(tmp_path / "t.pt"), "--out", str(tmp_path / "o")],
            "train-student": ["--cache", str(tmp_path), "--student", "mlp_100", "--out", str(tmp_path / "o")],
            "verify-cache": [str(tmp_path), "--teacher", str(tmp_path / "t.pt")]}[cmd]
    r = CliRunner().invoke(main, [cmd, *args, "--seed", seed])
    assert r.exit_code == 2 and "--seed" in r.output and "Traceback" not in r.output, r.output
    assert "0..4294967295" in r.output or "0<=x<=4294967295" in r.output, r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["--temperature", "--alpha", "--seed", "--lr"])
def test_a_sweep_list_of_no_number_is_refused(tmp_path, flag):
    """`--temperature ,` trained at the loss's default without a word."""
    r = CliRunner().invoke(main, ["train-student", "--cache", str(tmp_path), "--student", "mlp_100", flag, ",",
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "',' holds no number" in r.output, r.output


# ---------------------------------------------------------------- odd values: one line, never a traceback

@pytest.mark.parametrize("device", ["meta", "mps", "xla"])
def test_a_device_torch_knows_but_kdpipe_does_not_run_on_is_one_line(tmp_path, device):
    """torch.device('meta') and friends parsed, then training failed with a RuntimeError or
    NotImplementedError traceback."""
    r = invoke("train-teacher", "--data", f"npz:{tmp_path}/absent.npz", "--arch", "mlp_100", "--device", device,
               "--out", tmp_path / "t.pt")
    assert_one_line_error(r, f"device '{device}' is not one kdpipe runs on")


@pytest.mark.parametrize("cmd, flag, message", [
    ("train-teacher", "--momentum", "--momentum must be a finite number, got nan"),
    ("train-teacher", "--checkpoint-every", "Invalid value for '--checkpoint-every': 'nan' is not a number"),
    ("train-student", "--checkpoint-every", "Invalid value for '--checkpoint-every': 'nan' is not a number"),
    ("compress", "--lr", "--lr must be a finite number, got nan"),
])
def test_nan_is_refused_where_no_range_caught_it(fmnist, tmp_path, cmd, flag, message):
    """NaN fails no comparison, so click's FloatRange let it through: train-teacher --momentum nan trained a
    teacher at chance without a word (train-student's was checked), --checkpoint-every nan never checkpointed
    within an epoch, compress --lr nan fine-tuned the pruned models to NaN."""
    args = {"train-teacher": ["--data", f"npz:{tmp_path}/absent.npz", "--arch", "mlp_100", "--out", tmp_path / "t.pt"],
            "train-student": ["--cache", tmp_path, "--student", "mlp_100", "--out", tmp_path / "r"],
            "compress": ["--data", fmnist.spec, "--teacher", tmp_path / "t.pt", "--out", tmp_path / "c"]}[cmd]
    assert_one_line_error(invoke(cmd, *args, flag, "nan"), message)


def test_a_learning_rate_past_float32_is_one_line(tmp_path):
    """--lr 1e300 passed every check, then the optimizer's step raised a RuntimeError traceback."""
    r = invoke("train-teacher", "--data", f"npz:{tmp_path}/absent.npz", "--arch", "mlp_100", "--lr", "1e300",
               "--out", tmp_path / "t.pt")
    assert_one_line_error(r, "--lr must lie within float32's range")


def test_a_model_too_large_for_memory_is_one_line(fmnist, tmp_path):
    """mlp:99999999999 ended in a 30-line traceback from torch's allocator (and a CUDA OOM mid-sweep in one
    from the step): now one line that says what ran out and what to change, exit code 1."""
    r = invoke("train-teacher", "--data", fmnist.spec, "--arch", "mlp:99999999999", "--epochs", 1,
               "--device", "cpu", "--out", tmp_path / "t.pt")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: out of memory: an allocation of "), r.stderr
    assert "GiB failed; use a smaller --batch-size or a smaller model" in lines[0]
    assert not (tmp_path / "t.pt").exists()


@pytest.mark.parametrize("error, line", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                            "79.11 GiB of which 1.25 GiB is free. Including non-PyTorch memory, this process has "
                            "77.85 GiB memory in use. See documentation for Memory Management"),
     "out of memory: an allocation of 2.00 GiB on GPU 0 failed (1.25 GiB free of 79.11 GiB); use a smaller "
     "--batch-size"),
    (MemoryError(), "out of memory: MemoryError; use a smaller --batch-size"),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), None),
])
def test_out_of_memory_line(error, line):
    from kdpipe.cli import out_of_memory_line
    got = out_of_memory_line(error)
    assert got == line if line is None else got.startswith(line), got


@pytest.mark.parametrize("cmd, args", [
    ("train-teacher", ["--arch", "mlp_100"]), ("dump-logits", ["--teacher", "t.pt", "--views", "1"]),
    ("train-student", ["--cache", "c", "--student", "mlp_100"]), ("report", ["r"]),
    ("compress", ["--teacher", "t.pt"]), ("export", ["r", "--format", "torchscript"]),
])
@pytest.mark.parametrize("out", ["", "  "])
def test_an_empty_out_is_refused(tmp_path, monkeypatch, cmd, args, out):
    """--out "" (an unset shell variable) wrote into the current folder: "1 run(s) written under "."""
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(invoke(cmd, *args, "--out", out), "Invalid value for '--out': is empty")
    assert list(tmp_path.iterdir()) == []


def test_a_limit_too_small_to_hold_every_class_says_so(fmnist, tmp_path):
    """--limit 5 of ten classes said "the labels start at 1, not 0: number the classes from 0 (subtract 1)",
    which would have had the user renumber labels that were right."""
    r = invoke("train-teacher", "--data", fmnist.spec, "--limit", 5, "--arch", "mlp_100", "--device", "cpu",
               "--out", tmp_path / "t.pt")
    assert_one_line_error(r, "--limit 5 keeps no sample of class(es) ")
    assert "of the 10: give a larger --limit" in r.stderr and "subtract" not in r.stderr


@pytest.mark.parametrize("code, message", [
    ("Net = 3\n", "Net is a int, not a class or function that builds the model"),
    ("import torch\nclass Net(torch.nn.Module):\n    def __init__(self, num_classes, image_shape):\n"
     "        super().__init__()\n    def forward(self, x):\n        return x.flatten(1)[:, :10] * 0\n",
     "has no trainable parameters"),
    ("import torch\ndef Net(num_classes, image_shape):\n    m = torch.nn.Sequential(torch.nn.Flatten(), "
     "torch.nn.Linear(784, num_classes))\n    return m.requires_grad_(False)\n", "has no trainable parameters"),
])
def test_a_user_architecture_that_cannot_train_is_one_line(fmnist, tmp_path, code, message):
    """A factory that is not callable gave a TypeError traceback; a model with nothing to train, a RuntimeError
    from backward() in the first step."""
    (tmp_path / "nets.py").write_text(code)
    assert_one_line_error(invoke("train-teacher", "--data", fmnist.spec, "--arch", f"{tmp_path / 'nets.py'}:Net",
                                 "--epochs", 1, "--device", "cpu", "--out", tmp_path / "t.pt"), message)
    assert not (tmp_path / "t.pt").exists()


def test_a_tilde_in_out_is_the_home_folder(fmnist, tmp_path, monkeypatch):
    """`--out=~/teacher.pt` reaches kdpipe unexpanded (the shell expands no ~ after '--out='): it wrote a folder
    named '~' in the current one, where --data npz:~/... and --data-root ~/... are read from the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    ok(invoke("train-teacher", "--data", fmnist.spec, "--arch", "mlp_100", "--epochs", 1, "--device", "cpu",
              "--out=~/teacher.pt"))
    assert (tmp_path / "home" / "teacher.pt").is_file() and not (tmp_path / "~").exists()
