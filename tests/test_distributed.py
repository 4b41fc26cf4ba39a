"""torchrun-launched runs on the CPU (gloo): the sharded dump, resumption across world sizes,
failures that stop every rank, and DistributedDataParallel students.

Every multi-process run is a real `python -m torch.distributed.run --standalone --nproc_per_node N
-m kdpipe ...` subprocess; single-process references run in-process through click's CliRunner.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdpipe import KDPipeError
from kdpipe.cache.reader import Cache
from kdpipe.checkpoint import save_checkpoint
from kdpipe.cli import main
from kdpipe.engine import batches
from kdpipe.models import create_model
from kdpipe.cache.writer import wait_visible
from kdpipe.util import seeded_generator

from conftest import fashion_mnist_arrays

N_TRAIN, N_TEST = 96, 32
VIEWS, SHARD_ROWS = 3, 40  # 288 rows in 8 shards, the last one short
LAUNCH_TIMEOUT_S = 180  # a hang fails the test instead of stalling the suite


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dist")
    (x_train, y_train), (x_test, y_test) = fashion_mnist_arrays("train", N_TRAIN), fashion_mnist_arrays("test", N_TEST)
    np.savez(d / "tiny.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    torch.manual_seed(0)
    save_checkpoint(d / "teacher.pt", create_model("cnn_tiny", 10, (1, 28, 28)), arch="cnn_tiny", num_classes=10,
                    image_shape=(1, 28, 28), mean=[0.286], std=[0.353], class_names=[str(i) for i in range(10)],
                    dataset={}, test_top1=None)
    return d


def dump_args(work: Path, out: Path, *extra) -> list[str]:
    return ["dump-logits", "--teacher", str(work / "teacher.pt"), "--data", f"npz:{work / 'tiny.npz'}",
            "--views", str(VIEWS), "--shard-rows", str(SHARD_ROWS), "--batch-size", "16", "--device", "cpu",
            "--force", "--out", str(out), *extra]  # --force: the teacher is untrained


def student_args(cache: Path, out: Path, batch_size: int) -> list[str]:
    return ["train-student", "--cache", str(cache), "--student", "mlp_100", "--student", "cnn_tiny",
            "--seed", "0,1", "--epochs", "2", "--batch-size", str(batch_size), "--device", "cpu", "--out", str(out)]


def single(args: list[str]) -> str:
    """The kdpipe CLI in this process (one process, no torchrun; one thread, like each torchrun worker)."""
    threads = torch.get_num_threads()
    try:
        res = CliRunner().invoke(main, args, env={"WORLD_SIZE": None, "RANK": None, "KDPIPE_THREADS": "1"})
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output


def torchrun(args: list[str], nproc: int = 2, program=("-m", "kdpipe")) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", KDPIPE_DIST_TIMEOUT="120")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *program, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def assert_same_cache(a: Path, b: Path) -> None:
    """Same rows, view parameters, labels and bit-identical logits; same identity and shard layout."""
    ca, cb = Cache(a), Cache(b)
    ma, mb = ca.manifest, cb.manifest
    for key in ("cache_id", "identity", "rows", "row_order", "views", "num_classes", "logits", "input"):
        assert ma[key] == mb[key], key
    assert [(s["file"], s["row_start"], s["row_stop"], s["sha256"]) for s in ma["shards"]] == \
           [(s["file"], s["row_start"], s["row_stop"], s["sha256"]) for s in mb["shards"]]
    for name in ("logits", "sample_index", "view_index", "labels", "view_params"):
        x, y = ca.read(name, 0, ca.rows), cb.read(name, 0, cb.rows)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), f"{name} differs"
    assert np.array_equal(ca.read_test_logits(), cb.read_test_logits())
    assert ma["dump"]["views_top1"] == mb["dump"]["views_top1"]
    assert not list(Path(b).glob(".rank-*")) and not list(Path(b).glob(".*.tmp-*"))


def stat_of(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


@pytest.fixture(scope="module")
def reference(work) -> Path:
    """The single-process dump."""
    out = work / "ref"
    single(dump_args(work, out))
    return out


@pytest.fixture(scope="module")
def sharded(work) -> tuple[Path, str]:
    """The same dump by 2 torchrun processes, and its stdout."""
    out = work / "sharded"
    return out, ok(torchrun(dump_args(work, out)))


# ---------------------------------------------------------------- in-process units

@pytest.mark.parametrize("world", [2, 3])
def test_rank_batches_partition_the_global_batches(world):
    n, b = 50, 4
    one = batches(n, b * world, seeded_generator(7, 1), "cpu")
    per_rank = [batches(n, b, seeded_generator(7, 1), "cpu", rank, world) for rank in range(world)]
    assert all(len(p) == len(one) for p in per_rank)
    for step, whole in enumerate(one):
        assert torch.equal(torch.cat([p[step] for p in per_rank]), whole)


def test_read_rows_is_read_at_those_rows(reference):
    c = Cache(reference)
    rows = np.array([0, 5, 39, 40, 41, 150, c.rows - 1])  # across shard boundaries
    for name in ("logits", "view_params", "labels"):
        assert np.array_equal(c.read_rows(name, rows), c.read(name, 0, c.rows)[rows])
    with pytest.raises(IndexError):
        c.read_rows("logits", [3, 2])


def test_rank0_refuses_shards_it_cannot_see(tmp_path):
    # Ranks on other nodes write shards rank 0 must see: the cache has to be on a shared filesystem.
    (tmp_path / "shard-00000.h5").write_bytes(b"")
    wait_visible(tmp_path, {"shard-00000.h5": 0}, patience_s=0)
    with pytest.raises(KDPipeError, match=r"shard-00001.h5 \(rank 1\).*shared by every node"):
        wait_visible(tmp_path, {"shard-00000.h5": 0, "shard-00001.h5": 1}, patience_s=0)


# ---------------------------------------------------------------- stage one under torchrun

def test_sharded_dump_equals_single_process_dump(reference, sharded):
    out, stdout = sharded
    assert_same_cache(reference, out)
    assert Cache(out).manifest["dump"]["world_size"] == 2
    assert stdout.count("done:") == 1  # rank 0 alone reports


def test_world_size_change_on_resume(work, reference, sharded):
    # A cache begun by one process, finished by two: shards 1, 2, 5 lost, shard 6 torn. Rank 1 of 2 must
    # reuse shards that rank 0 of 1 wrote.
    part = work / "from1to2"
    shutil.copytree(reference, part)
    (part / "manifest.json").unlink()
    for i in (1, 2, 5):
        (part / f"shard-0000{i}.h5").unlink()
    with open(part / "shard-00006.h5", "r+b") as f:
        f.truncate(100)
    kept = {i: stat_of(part / f"shard-0000{i}.h5") for i in (0, 3, 4, 7)}
    stdout = ok(torchrun(dump_args(work, part)))
    assert "resuming: 4 complete shard(s) kept, 4 to compute on 2 ranks" in stdout
    assert_same_cache(reference, part)
    assert {i: stat_of(part / f"shard-0000{i}.h5") for i in kept} == kept  # finished shards untouched

    # Rerunning the finished command is a no-op on every rank (rank 0 must not leave the others waiting).
    again = ok(torchrun(dump_args(work, part)))
    assert "already complete" in again

    # And the other way: a cache begun by two processes, finished by one.
    back = work / "from2to1"
    shutil.copytree(sharded[0], back)
    (back / "manifest.json").unlink()
    for i in (0, 3):
        (back / f"shard-0000{i}.h5").unlink()
    assert "resuming: 6 complete shard(s) kept, 2 to compute" in single(dump_args(work, back))
    assert_same_cache(reference, back)


def test_rank0_refusal_stops_every_rank(work, reference):
    # Rank 0 checks OUT before the others start; its refusal must end them too, not leave them waiting.
    out = work / "mismatch"
    shutil.copytree(reference, out)
    before = {p.name: stat_of(p) for p in out.iterdir()}
    proc = torchrun(dump_args(work, out)[:-2] + ["--seed", "1", "--out", str(out)])
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "holds a cache made with other arguments" in text
    assert "checking the cache directory failed on rank 0" in text  # what rank 1 says
    assert {p.name: stat_of(p) for p in out.iterdir()} == before


def test_failure_on_one_rank_stops_all_and_keeps_finished_shards(work, reference):
    # Shards 1 and 2 are to compute: rank 0 gets shard 1, rank 1 shard 2, whose path is a directory
    # here so that writing it fails. Rank 0 finishes its shard; both exit with an error naming rank 1.
    out = work / "failing"
    shutil.copytree(reference, out)
    (out / "manifest.json").unlink()
    for i in (1, 2):
        (out / f"shard-0000{i}.h5").unlink()
    (out / "shard-00002.h5").mkdir()
    proc = torchrun(dump_args(work, out))
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "computing logits failed on rank 1" in text
    assert not (out / "manifest.json").exists()
    assert (out / "shard-00001.h5").is_file()  # rank 0's finished shard is kept for the rerun
    (out / "shard-00002.h5").rmdir()
    assert "resuming: 7 complete shard(s) kept, 1 to compute" in single(dump_args(work, out))
    assert_same_cache(reference, out)


def test_a_rank_whose_data_does_not_load_stops_every_rank_with_its_line(work, tmp_path):
    """Each rank loaded the data and teacher before joining the process group: a rank that could not (a node
    without its copy) ended with its line while the others waited at the rendezvous for the whole
    KDPIPE_DIST_TIMEOUT (30 minutes across nodes; in one node torchrun killed them after 30 s), then a traceback."""
    repo = Path(__file__).resolve().parent.parent
    wrapper = tmp_path / "rank1_lacks_data.py"
    wrapper.write_text(f"import os, sys\nsys.path.insert(0, {str(repo)!r})\nfrom kdpipe.cli import main\n"
                       "argv = sys.argv[1:]\nif os.environ['RANK'] == '1':\n"
                       "    argv = [a.replace('tiny.npz', 'missing.npz') for a in argv]\nmain(argv)\n")
    out = tmp_path / "cache"
    proc = torchrun(dump_args(work, out), program=[str(wrapper)])
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "loading the data and the teacher failed on rank 1: npz:" in text and "missing.npz" in text, text
    assert "SIGKILL" not in text, text  # not killed after ignoring torchrun's SIGTERM at the rendezvous
    assert not out.exists()


# ---------------------------------------------------------------- stage two under torchrun

@pytest.mark.parametrize("extra, words", [
    (["--epochs", "3"], "(epochs: rank 0 has 2, rank 1 has 3)"),
    (["--alpha", "0.1"], "(alpha: rank 0 has 0.9, rank 1 has 0.1; loss.options.alpha: rank 0 has 0.9, rank 1 has 0.1)"),
    (["--alpha", "0,0.9"], "(runs: rank 0 has cnn_tiny-T4-a0.9-e2-s0, cnn_tiny-T4-a0.9-e2-s1, mlp_100-T4-a0.9-e2-s0, "
                           "mlp_100-T4-a0.9-e2-s1, rank 1 has cnn_tiny-T4-a0.9-e2-s0, cnn_tiny-T4-a0.9-e2-s1, "
                           "cnn_tiny-scratch-e2-s0,"),
])
def test_ranks_given_other_student_arguments_are_refused(work, reference, tmp_path, extra, words):
    """A node given another --epochs or --alpha than the others (several nodes each run the command) trained its
    own runs under DDP, gradients averaged with rank 0's, and rank 0 wrote its settings alone (or rank 0 finished
    and rank 1 crashed waiting for it): every rank refuses in one line, naming the difference."""
    repo = Path(__file__).resolve().parent.parent
    wrapper = tmp_path / "rank1_differs.py"
    wrapper.write_text(f"import os, sys\nsys.path.insert(0, {str(repo)!r})\nfrom kdpipe.cli import main\n"
                       f"extra = {extra!r} if os.environ['RANK'] == '1' else []\nmain(sys.argv[1:] + extra)\n")
    out = tmp_path / "runs"
    proc = torchrun(student_args(reference, out, batch_size=16), program=[str(wrapper)])
    assert proc.returncode != 0
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("Error:")]
    assert lines and all(x == lines[0] for x in lines), proc.stdout + proc.stderr
    assert "rank 1 was given other arguments than rank 0 " + words in lines[0]
    assert not list(out.glob("*/*"))


def test_ddp_students_write_one_set_of_outputs_and_match_single_process(work, reference):
    one, two = work / "runs1", work / "runs2"
    single(student_args(reference, one, batch_size=32))
    stdout = ok(torchrun(student_args(reference, two, batch_size=16)))
    assert stdout.count("run(s) written under") == 1  # rank 0 alone logs
    assert "batch 16 per rank x 2 ranks = effective batch 32" in stdout
    names = sorted(p.name for p in one.iterdir())
    assert len(names) == 4 and sorted(p.name for p in two.iterdir()) == names
    for name in names:
        assert sorted(p.name for p in (two / name).iterdir()) == ["config.json", "history.csv", "metrics.json",
                                                                  "student.pt"]
        m1 = json.loads((one / name / "metrics.json").read_text())
        m2 = json.loads((two / name / "metrics.json").read_text())
        c2 = json.loads((two / name / "config.json").read_text())
        for d in (m2, c2):
            assert (d["world_size"], d["batch_size"], d["effective_batch_size"], d["lr"]) == (2, 16, 32, 0.05)
        assert (m1["world_size"], m1["effective_batch_size"]) == (1, 32)
        # 2 ranks x 16 is the single-process batch of 32: an MLP (no BatchNorm) follows the same path up
        # to float rounding; a CNN's BatchNorm sees 16 images per rank, within seed noise of the same.
        if name.startswith("mlp_100"):
            np.testing.assert_allclose(m2["train_loss"], m1["train_loss"], rtol=1e-4)
            assert abs(m2["test_top1"] - m1["test_top1"]) <= 1 / N_TEST
            # train top-1: each rank's share, averaged over the ranks, is the single process's
            np.testing.assert_allclose(m2["train_top1"], m1["train_top1"], atol=2 / N_TRAIN)
        else:
            np.testing.assert_allclose(m2["train_loss"], m1["train_loss"], rtol=0.05)
        state = torch.load(two / name / "student.pt", weights_only=True)["state_dict"]
        assert not any(k.startswith("module.") for k in state)  # saved unwrapped from DDP


def test_ddp_students_on_mixed_views_read_their_partners_rows(work):
    """Each rank reads only its share of a view's rows, and for mixed views its rows' partners too: the
    2-rank MLP follows the single-process run (a partner row left unread would replay another view)."""
    cache, one, two = work / "mixed", work / "mixed-runs1", work / "mixed-runs2"
    single(dump_args(work, cache, "--policy", "crop:2+flip+mixup:0.4"))
    def args(out, b):
        return ["train-student", "--cache", str(cache), "--student", "mlp_100", "--alpha", "0.5", "--epochs", "2",
                "--batch-size", str(b), "--device", "cpu", "--out", str(out)]
    single(args(one, 32))
    ok(torchrun(args(two, 16)))
    (name,) = [p.name for p in one.iterdir()]
    m1, m2 = (json.loads((d / name / "metrics.json").read_text()) for d in (one, two))
    np.testing.assert_allclose(m2["train_loss"], m1["train_loss"], rtol=1e-4)
    assert abs(m2["test_top1"] - m1["test_top1"]) <= 1 / N_TEST


def test_ddp_students_with_a_hint_match_single_process(work):
    """kd+hint under DistributedDataParallel: each rank reads its rows' cached features with their logits,
    the hint projector trains inside the DDP model beside the student and is saved once, unwrapped; the
    2-rank MLP (2 x 16 images) follows the single process (32), term for term."""
    cache, one, two = work / "feat", work / "feat-runs1", work / "feat-runs2"
    single(dump_args(work, cache, "--features", "head.2"))

    def args(out, b):
        return ["train-student", "--cache", str(cache), "--student", "mlp_100", "--loss", "kd+hint",
                "--hint-layer", "net.2", "--epochs", "2", "--batch-size", str(b), "--device", "cpu", "--out", str(out)]
    single(args(one, 32))
    ok(torchrun(args(two, 16)))
    (name,) = [p.name for p in one.iterdir()]
    assert "projector.pt" in {p.name for p in (two / name).iterdir()}
    m1, m2 = (json.loads((d / name / "metrics.json").read_text()) for d in (one, two))
    assert m2["world_size"] == 2 and set(m2["train_terms"]) == {"ce", "kd", "hint"}
    for term in ("ce", "kd", "hint"):
        np.testing.assert_allclose(m2["train_terms"][term], m1["train_terms"][term], rtol=1e-4, err_msg=term)
    p1, p2 = (torch.load(d / name / "projector.pt", weights_only=True)["state_dict"] for d in (one, two))
    assert set(p2) == set(p1) and not any(k.startswith("module.") for k in p2)
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], atol=1e-5, rtol=1e-4)


DROPOUT_SPY = """
import hashlib, sys, torch
from kdpipe.distributed import from_env
from kdpipe.student import train_students
seen = []
forward = torch.nn.Dropout.forward
def spy(self, x):
    if self.training and not seen:  # the generator's state when the first mask is drawn decides the masks
        seen.append(hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16])
    return forward(self, x)
torch.nn.Dropout.forward = spy
dist = from_env(torch.device("cpu"))
train_students(sys.argv[1], ["mlp:32:dropout=0.5"], 1, sys.argv[2], batch_size=16, device=torch.device("cpu"),
               dist=dist, log=lambda *a, **k: None)
print(f"rank {dist.rank} dropout rng {seen[0]}", flush=True)
dist.close()
"""


def test_ddp_ranks_draw_their_own_dropout_masks(work, reference, tmp_path):
    """Every rank seeds its model with the run's seed (DDP starts from one set of weights), and then trained on the
    same generator: each rank's dropout masks were rank 0's, row for row, so the global batch held `world` copies
    of each mask."""
    script = tmp_path / "dropout_spy.py"
    script.write_text(DROPOUT_SPY)
    out = ok(torchrun([str(reference), str(tmp_path / "runs")], program=(str(script),)))
    states = sorted(line.split()[-1] for line in out.splitlines() if " dropout rng " in line)
    assert len(states) == 2 and states[0] != states[1], out


def test_a_ranks_error_of_several_lines_reaches_the_other_ranks_as_one_line():
    """A rank's failure is gathered by every healthy rank, which raises it as a KDPipeError. CUDA's errors (and
    TorchScript's, which hold their traceback) span lines: the healthy ranks' 'one line' error held them all."""
    from kdpipe.distributed import Dist
    sent = []
    failing = Dist(rank=1, world=2)
    failing.all_gather = lambda obj: sent.append(obj) or [None, obj]
    err = RuntimeError("CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously reported "
                       "at some other API call, so the stacktrace below might be incorrect.\nFor debugging consider "
                       "passing CUDA_LAUNCH_BLOCKING=1")
    with pytest.raises(RuntimeError):
        with failing.together("the teacher's pass"):
            raise err
    healthy = Dist(rank=0, world=2)
    healthy.all_gather = lambda obj: [obj, sent[0]]
    with pytest.raises(KDPipeError) as e:
        with healthy.together("the teacher's pass"):
            pass
    assert str(e.value) == "the teacher's pass failed on rank 1: RuntimeError: CUDA error: device-side assert triggered"


def test_a_joined_rank_that_fails_with_its_line_ends_at_once(monkeypatch, tmp_path):
    """A rank that had joined the process group and failed with its one line (exit 2) went through the
    interpreter's teardown of the gloo group, which aborted it now and then ('terminate called without an active
    exception', exit -6): torchrun then named a SIGABRT as the failure. It ends with os._exit after its line now,
    as a successful rank does; outside a joined group click exits as before."""
    import torch.distributed as td
    exits = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    args = ["dump-logits", "--teacher", str(tmp_path / "t.pt"), "--data", "mnist", "--views", "0",
            "--out", str(tmp_path / "c")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and exits == []  # not joined: click's own exit
    monkeypatch.setattr(td, "is_initialized", lambda: True)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and exits == [2]
    assert [x for x in res.output.splitlines() if x] == ["Error: --views must be >= 1, got 0"]


@pytest.mark.parametrize("raised", [
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:13210: Connection "
    "reset by peer. This is typically caused by a remote worker hanging or bugs in the application.",
    "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 120000ms for recv operation",
])
def test_a_rank_whose_peer_died_says_so_in_one_line(monkeypatch, tmp_path, raised):
    """A rank killed outright (SIGKILL, out of memory) left the other ranks in a collective (DDP's backward, a
    broadcast), whose gloo error was a page of traceback on each surviving rank: now one line, exit 1."""
    import torch.distributed as td
    import kdpipe.student

    def dies(*args, **kwargs):
        raise RuntimeError(raised)

    monkeypatch.setattr(kdpipe.student, "train_students", dies)
    monkeypatch.setattr(os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    monkeypatch.setattr(td, "is_initialized", lambda: True)
    res = CliRunner().invoke(main, ["train-student", "--cache", str(tmp_path), "--student", "mlp_100", "--device",
                                    "cpu", "--out", str(tmp_path / "runs")])
    lines = [x for x in res.output.splitlines() if x]
    assert res.exit_code == 1 and len(lines) == 1, res.output + repr(res.exception)
    assert lines[0].startswith("Error: another rank of this torchrun job stopped or stopped answering (")
    assert "run the same command again to resume" in lines[0]
    monkeypatch.setattr(td, "is_initialized", lambda: False)  # one process: such an error is a bug, its traceback shown
    res = CliRunner().invoke(main, ["train-student", "--cache", str(tmp_path), "--student", "mlp_100", "--device",
                                    "cpu", "--out", str(tmp_path / "runs")])
    assert isinstance(res.exception, RuntimeError)
