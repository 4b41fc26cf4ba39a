"""Stage two survives crashes: per-pass checkpoints, resuming, and what a runs directory may hold.

A pass (the runs of one seed that share a read and replay of the data, kdpipe.engine.train_pass)
writes one checkpoint file, RUNS/checkpoints/pass-s<seed>-<digest of its run names>.pt, at the end
of every epoch and every `--checkpoint-every` minutes within one. It holds, for every run of the
pass, the weights (with BatchNorm statistics), the optimizer and schedule state, the per-epoch losses
so far; the data order position (epoch, step); the loss sums of the epoch so far, the torch RNG
states and each run's own random stream (engine.Run.rng), per rank. Fused runs are synced back into
their own modules first (FusedRuns.sync_to_runs) and stacked again on resume, so the file never holds
the stack. Writes go to a temporary file, which
is fsynced and renamed over the previous checkpoint: a crash leaves the old or the new one, whole.

Each run's directory gets config.json when its pass starts and metrics.json when it ends, so
a run directory with config.json and no metrics.json is unfinished. Rerunning the same command
skips finished runs, resumes unfinished ones from the furthest checkpoint that holds them, and
refuses (unless --overwrite) a directory holding a run with other settings, naming each difference.

Two commands never train one run at once: a run being trained holds RUN/.lock (RunLocks: a file naming
the pid, host and start of its process, which keeps it flock'ed). Another command that would train it is
refused in one line naming that process; a lock whose process is gone (same host) is taken over. Runs of one runs
directory that differ may train at the same time (a pipeline's [[students]] blocks under make -j).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdpipe import KDPipeError
from kdpipe.cache.writer import atomic_write_json, atomic_write_stream, being_written, differences
from kdpipe.util import pid_runs as _pid_runs, try_flock

CHECKPOINT_DIR = "checkpoints"
# What a finished run writes into its directory (kdpipe.student; projector.pt: kdpipe.features.PROJECTOR_FILE)
RUN_FILES = ("metrics.json", "config.json", "student.pt", "student-best.pt", "history.csv", "projector.pt")
CHECKPOINT_VERSION = 1
DEFAULT_EVERY_MINUTES = 10.0
# Keys of a run's config.json that do not change what it computes (where it ran, which versions, where the
# cache lies now): a rerun may differ in them. Every other key is a setting that must match to resume or skip.
NOT_SETTINGS = ("run", "device", "cache", "ensemble_paths", "kdpipe_version", "torch_version")
# Under torchrun the ranks agree every this many steps whether a timed checkpoint is due (one all-reduce).
DIST_CHECK_STEPS = 8


def settings(config: dict) -> dict:
    """What must match for a run directory to be resumed or skipped: its config.json but NOT_SETTINGS (as JSON
    reads it back, so that a tuple and the list config.json holds compare equal). A kd run at alpha 0 (scratch)
    uses no temperature: its T is no setting (it records the sweep's first T: a sweep of other Ts has the same run)."""
    out = json.loads(json.dumps({k: v for k, v in config.items() if k not in NOT_SETTINGS}))
    loss = out.get("loss")
    if isinstance(loss, dict) and loss.get("name") == "kd" and (loss.get("options") or {}).get("alpha") == 0:
        out["temperature"] = None
        out["loss"] = {**loss, "options": {k: v for k, v in loss["options"].items() if k != "temperature"}}
    return out


def checkpoint_path(out: Path, seed: int, names) -> Path:
    digest = hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:10]
    return Path(out) / CHECKPOINT_DIR / f"pass-s{seed}-{digest}.pt"


def load_checkpoint(path: Path, missing_ok: bool = False) -> dict | None:
    """A pass checkpoint (tensors memory-mapped until used); a file that does not load is one line. With
    `missing_ok`, None for one that is no longer there (another command training other runs of the same runs
    directory removed it, its pass finished, between a listing and the load)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a damaged file
        if missing_ok and not Path(path).exists():
            return None
        raise KDPipeError(f"cannot read the checkpoint {path} ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}):"
                          " delete it to start its runs over") from None
    if not isinstance(obj, dict) or obj.get("kdpipe_pass_checkpoint") != CHECKPOINT_VERSION:
        raise KDPipeError(f"{path} is not a pass checkpoint of this kdpipe version: delete it to start its runs over")
    return obj


WORLD_SETTINGS = ("world_size ", "effective_batch_size ")


def _other_settings_advice(diffs: dict[str, list[str]], worlds: set) -> str:
    """What to do about runs with other settings: where only the world size differs (a run begun under torchrun,
    rerun without it, or the reverse), rerun with the processes it was begun with, which resumes it."""
    advice = "pass --overwrite to start them over, or choose another --out"
    if len(worlds) != 1 or not all(x.startswith(WORLD_SETTINGS) for d in diffs.values() for x in d):
        return advice
    (w,) = worlds
    how = f"under torchrun --nproc-per-node {w}" if w and w > 1 else "as one process (without torchrun)"
    return f"they were begun with {w or 1} process(es): run the same command {how} to resume them, or " + advice


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise KDPipeError(f"cannot read {path}: {e}; delete the run directory {path.parent} to start it over") from None


@dataclass
class Plan:
    """What a train-student command does with each of its runs, decided before any training."""

    finished: dict[str, dict] = field(default_factory=dict)  # run name -> its metrics.json: skipped
    resume: dict[str, str] = field(default_factory=dict)  # run name -> the checkpoint it continues from
    checkpoints: dict[str, dict] = field(default_factory=dict)  # checkpoint path -> its position and seed


def plan_runs_dir(out: Path, configs: dict[str, dict], overwrite: bool = False, log=print,
                  older: dict[str, list[str]] | None = None) -> Plan:
    """Check RUNS against the runs to train (name -> config.json to be); say what to skip and resume.

    A run directory or checkpoint holding a run of that name with other settings is refused, naming the
    differences, unless `overwrite`: then that run starts over (its files go; a checkpoint file goes when
    it holds no other run). `older`: run name -> the names older kdpipes gave it (kdpipe.sweep.names_before),
    whose finished runs of the same settings are moved to today's name first."""
    out = Path(out)
    ckdir = out / CHECKPOINT_DIR
    held: dict[str, dict] = {}  # checkpoint path -> header (runs' settings, position, seed)
    if ckdir.is_dir():
        _remove_dead_temporaries(ckdir)
        for p in sorted(ckdir.glob("pass-*.pt")):
            c = load_checkpoint(p, missing_ok=True)
            if c is None:
                continue
            held[str(p)] = {"runs": c["runs"], "position": list(c["position"]), "seed": c["seed"],
                            "epochs": c["epochs"]}
    _adopt_older_names(out, configs, held, older or {}, log)
    for name in configs:  # a run's files are written by rename too: a kill left .student.pt.tmp-PID (a whole
        if (out / name).is_dir():  # model's size) in it for good, beside the run its rerun finished
            _remove_dead_temporaries(out / name)
    diffs: dict[str, list[str]] = {}
    worlds = set()  # the world sizes the differing runs were begun with
    for name, cfg in configs.items():
        want = settings(cfg)
        found = []
        if (out / name / "config.json").is_file():
            found.append(settings(_read_json(out / name / "config.json")))
        found += [h["runs"][name] for h in held.values() if name in h["runs"]]
        d = sorted({x for old in found for x in differences(old, want)})
        worlds |= {old.get("world_size") for old in found if differences(old, want)}
        if not found and (out / name / "metrics.json").is_file():
            d = ["a metrics.json without the config.json that says its settings"]
        if d:
            diffs[name] = d
    if diffs and not overwrite:
        listed = "; ".join(f"{n} ({', '.join(d)})" for n, d in diffs.items())
        raise KDPipeError(f"{out} holds {len(diffs)} run(s) with other settings: {listed}: "
                          + _other_settings_advice(diffs, worlds))
    dropped: dict[str, set] = {}  # checkpoint path -> runs to take out of it that it holds beside others
    for name, d in diffs.items():
        log(f"--overwrite: starting {name} over ({', '.join(d)})")
        # every output of the run: a student-best.pt of the run's older settings (with a validation split) stayed
        # beside the new run, which keeps no best epoch without one, read as its best epoch's weights
        for f in RUN_FILES:
            (out / name / f).unlink(missing_ok=True)
        for p, h in list(held.items()):
            if name in h["runs"]:
                del h["runs"][name]
                dropped.setdefault(p, set()).add(name)
                if not h["runs"]:
                    Path(p).unlink(missing_ok=True)
                    del held[p]
    # out of the file too: else the next command found the old settings there again and started the run over again
    _drop_from_checkpoints({p: names for p, names in dropped.items() if p in held})
    plan = Plan(checkpoints=held)
    for name in configs:
        if (out / name / "metrics.json").is_file():
            plan.finished[name] = _read_json(out / name / "metrics.json")
            os.utime(out / name / "metrics.json")  # up to date for make, whose prerequisite may merely have been touched
            continue
        best = max(((h["position"], p) for p, h in held.items() if name in h["runs"]), default=None)
        if best is not None:
            plan.resume[name] = best[1]
    return plan


def _adopt_older_names(out: Path, configs: dict[str, dict], held: dict[str, dict], older: dict[str, list[str]],
                       log=print) -> None:
    """Runs that an older kdpipe named otherwise (`older`: name -> its older names, kdpipe.sweep.names_before:
    without the epochs of plain SGD runs, without --arch-args) move to their names of today when their settings
    match, so that the same command skips a finished one (and Make finds its metrics.json) and resumes an
    unfinished one, instead of training it again beside the old directory (_rename_in_checkpoints). One of
    other settings stays where it is, with a line saying so."""
    why = "run names hold the epochs and --arch-args now"
    renamed: dict[str, str] = {}  # old -> new, of the runs that pass checkpoints hold
    moves: list[tuple[str, str, bool]] = []  # (old, new, finished)
    for name, cfg in configs.items():
        if (out / name / "config.json").exists():
            continue
        # held under today's name without its directory: renamed in its checkpoint by a command stopped before it
        # moved the directory (a pass writes config.json before its first checkpoint)
        renamed_before = any(name in h["runs"] for h in held.values())
        for old in older.get(name, []):
            if old in configs:
                continue
            finished = (out / old / "metrics.json").is_file() and (out / old / "config.json").is_file()
            holding = [h["runs"][old] for h in held.values() if old in h["runs"]]
            left = renamed_before and not finished and (out / old / "config.json").is_file()
            if not finished and not holding and not left:
                continue  # none, or begun and lost before its first checkpoint: nothing to carry over
            was = settings(_read_json(out / old / "config.json")) if finished or left else holding[0]
            if was.get("arch_args") != settings(cfg).get("arch_args"):
                continue  # a run of other --arch-args (or none), which today's names tell apart: not this one
            d = differences(was, settings(cfg))
            if d:
                log(f"{out / old}, named by an older kdpipe ({why}), has other settings ({', '.join(d)}): left "
                    f"as it is; {name} is trained")
                continue
            moves.append((old, name, finished))
            if holding:
                renamed[old] = name
            break
    # the checkpoints first: a crash between the two leaves the work resumable (a run directory left at its old
    # name is an unfinished run the report lists)
    _rename_in_checkpoints(held, renamed)
    for old, name, finished in moves:
        if (out / old).is_dir():
            (out / name).mkdir(parents=True, exist_ok=True)
            for f in (out / old).iterdir():
                if f.name != LOCK_FILE:
                    os.replace(f, out / name / f.name)
            for f in ("config.json", "metrics.json"):
                if (out / name / f).is_file():
                    atomic_write_json(out / name / f, {**_read_json(out / name / f), "run": name})
            with contextlib.suppress(OSError):
                (out / old / LOCK_FILE).unlink(missing_ok=True)
                (out / old).rmdir()
        log(f"{out / old}: finished by an older kdpipe ({why}): moved to {out / name}" if finished else
            f"{out / old}, begun by an older kdpipe ({why}): moved to {out / name}, and renamed in its pass "
            "checkpoint, to be resumed")


def _rename_in_checkpoints(held: dict[str, dict], renamed: dict[str, str]) -> None:
    """Rename runs (old -> new) in the pass checkpoints that hold them, in place, and in `held`, their headers."""
    for p, h in held.items():
        if any(old in h["runs"] for old in renamed):
            h["runs"] = _rekey_checkpoint(p, lambda k: renamed.get(k, k))


def _drop_from_checkpoints(dropped: dict[str, set]) -> None:
    """Take runs (checkpoint path -> run names) out of the pass checkpoints that hold them beside other runs, in
    place."""
    for p, names in dropped.items():
        _rekey_checkpoint(p, lambda k: None if k in names else k)


def _rekey_checkpoint(path, key) -> dict:
    """Rewrite the pass checkpoint at `path` whole (by rename) with each run's entries (settings, state, each rank's
    sums, right answers and random stream) under key(name), or without them where that is None; returns its runs'
    settings."""
    obj = torch.load(path, map_location="cpu", weights_only=True)

    def re_key(d: dict) -> dict:
        return {key(k): v for k, v in d.items() if key(k) is not None}
    obj["runs"], obj["state"] = re_key(obj["runs"]), re_key(obj["state"])
    for part in obj["ranks"]:
        part["sums"], part["correct"] = re_key(part["sums"]), re_key(part["correct"])
        if "streams" in part:
            part["streams"] = re_key(part["streams"])
    atomic_write_stream(Path(path), lambda f: torch.save(obj, f))
    return obj["runs"]


def resume_file(path: Path, configs: dict[str, dict], overwrite: bool = False, log=print,
                what: str = "a training") -> str | None:
    """The checkpoint at `path` to resume from, when it holds these runs (name -> config) with the same
    settings; None when there is none. One with other settings is refused, naming the differences, unless
    `overwrite`: then it is removed (the training starts over)."""
    path = Path(path)
    _remove_dead_temporaries(path.parent, f".{path.name}.tmp-*")
    if not path.is_file():
        return None
    held = load_checkpoint(path)["runs"]
    d = sorted({x for name, cfg in configs.items() for x in differences(held.get(name, {}), settings(cfg))})
    if not d:
        return str(path)
    if not overwrite:
        raise KDPipeError(f"{path} is the checkpoint of {what} with other settings ({', '.join(d)}): pass "
                          "--overwrite to start over, or delete it")
    log(f"--overwrite: the checkpoint {path} had other settings ({', '.join(d)}); starting over")
    path.unlink(missing_ok=True)
    return None


def _remove_dead_temporaries(ckdir: Path, pattern: str = ".*.tmp-*") -> None:
    """Remove the checkpoint writes a crash interrupted (.NAME.tmp-PID), not those of a live command training
    other runs of the same runs directory: its pid runs here, or (another machine's, where the folder is shared)
    it holds the write's lock (being_written)."""
    for p in ckdir.glob(pattern):
        pid = p.name.rpartition("-")[2]
        if not (pid.isdigit() and int(pid) != os.getpid() and _pid_runs(int(pid))) and not being_written(p):
            p.unlink(missing_ok=True)


def remove_finished_checkpoints(out: Path, log=print) -> None:
    """Remove the checkpoints every run of which has finished (metrics.json), and the folder once empty."""
    ckdir = Path(out) / CHECKPOINT_DIR
    if not ckdir.is_dir():
        return
    for p in sorted(ckdir.glob("pass-*.pt")):
        c = load_checkpoint(p, missing_ok=True)
        if c is not None and all((Path(out) / name / "metrics.json").is_file() for name in c["runs"]):
            p.unlink(missing_ok=True)
    _remove_dead_temporaries(ckdir)
    try:
        ckdir.rmdir()  # only when empty
    except OSError:
        pass


class PassCheckpoint:
    """One pass's checkpoint: where it goes, the state the pass resumes from, and when to write the next.

    The pass's runs must be restored (`restore`) before they are wrapped for DistributedDataParallel
    and handed to train_pass with `checkpoint=` this object; train_pass then starts at `position`,
    calls `sums`, `due` and `save`, and after a save `stop_if_interrupted` (see holding_interrupts).
    """

    def __init__(self, out: Path, seed: int, configs: dict[str, dict], epochs: int, every_minutes: float,
                 dist=None, log=print, resume_from: str | None = None, tracks: dict | None = None,
                 path: Path | None = None, what: str = "the pass"):
        from kdpipe.distributed import SINGLE
        # path: where it goes when not in OUT/checkpoints/ (a teacher's: beside the file it will be saved to)
        self.path = Path(path) if path is not None else checkpoint_path(out, seed, configs)
        self.what = what  # what the log line says it is the checkpoint of
        self.seed, self.epochs = seed, epochs
        self.runs = {name: settings(c) for name, c in configs.items()}
        self.every_s = every_minutes * 60 if every_minutes and every_minutes > 0 else math.inf
        self.dist = dist or SINGLE
        self.log = log
        self.state = load_checkpoint(Path(resume_from)) if resume_from else None
        self.position = tuple(self.state["position"]) if self.state else (0, 0)
        self.seen = self.state["seen"] if self.state else 0
        self.wall_s = self.state["wall_s"] if self.state else 0.0
        self.tracks = tracks or {}  # run name -> an object with state() and load(state): saved beside the run
        self.written = False
        self.last = time.monotonic()
        self._steps = 0
        self.interrupted = False  # a Ctrl-C or SIGTERM held by holding_interrupts, until the step ends
        self.shared_rng = False  # resumed from a checkpoint without the runs' own streams (train_pass notes it)

    @contextlib.contextmanager
    def holding_interrupts(self):
        """Around train_pass in one process: the first Ctrl-C or SIGTERM is held until the step in progress
        ends; train_pass then writes the checkpoint there and raises KeyboardInterrupt (stop_if_interrupted),
        so no work is lost. A second one interrupts at once. Under torchrun, or off the main thread, signals
        are left as they are (a rank cannot write alone; the last checkpoint is kept)."""
        if self.dist.world > 1 or threading.current_thread() is not threading.main_thread():
            yield
            return

        def hold(signum, frame):
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
            self.log(f"\n{signal.Signals(signum).name}: writing a checkpoint after this step, then stopping "
                     "(again to stop at once)")
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, hold)
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def stop_if_interrupted(self) -> None:
        """Raise the held interrupt, once the checkpoint is written."""
        if self.interrupted:
            raise KeyboardInterrupt

    # ---------------------------------------------------------------- resume

    def restore(self, runs) -> None:
        """Load each run's weights, optimizer, schedule and losses so far, and this rank's RNG states and runs'
        random streams. A checkpoint of an older kdpipe holds none of the latter (its runs drew from the one global
        stream): each run's stream then starts from that (train_pass notes where that changes what runs draw)."""
        if self.state is None:
            return
        for r in runs:
            s = self.state["state"][r.name]
            try:
                r.model.load_state_dict(s["model"])
                r.optimizer.load_state_dict(s["optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:  # the network its spec builds now is another one
                raise KDPipeError(f"{self.path} holds weights of {r.name} that do not fit the model {r.arch} builds "
                                  f"now ({str(e).strip().splitlines()[-1].strip()[:160]}): its code changed since the "
                                  "checkpoint was written; delete the checkpoint to start over") from None
            r.scheduler.load_state_dict(s["scheduler"])
            r.history = list(s["history"])
            r.terms = {k: list(v) for k, v in s["terms"].items()}
            r.train_top1 = list(s["train_top1"])
            r.own_s, r.train_s = s["own_s"], s["train_s"]
            if r.name in self.tracks:
                self.tracks[r.name].load(s["track"])
        part = self._rank_part()
        torch.set_rng_state(part["rng"]["cpu"])
        cuda = part["rng"].get("cuda")
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        streams = part.get("streams")
        self.shared_rng = streams is None
        for r in runs:
            own = (streams or {}).get(r.name)
            if own is None:  # from the global generators as restored above, where the pass starts
                r.rng = None
            else:  # the device's state where it runs on one now and was saved from one; else the state built
                r.rng = [own["cpu"]] + ([own["cuda"]] if "cuda" in own and r.rng and len(r.rng) > 1 else
                                        (r.rng or [])[1:])

    def _rank_part(self) -> dict:
        return self.state["ranks"][self.dist.rank]

    def sums(self, units, runs, device) -> list[dict]:
        """The epoch's loss sums up to `position` (this rank's), per unit as train_pass keeps them."""
        part = self._rank_part()["sums"]
        out = []
        for u in units:
            names = list(part[runs[u[0]].name])
            out.append({n: torch.stack([part[runs[i].name][n] for i in u]).to(device) for n in names})
        return out

    def correct(self, units, runs, device) -> list[torch.Tensor]:
        """The epoch's counts of right answers up to `position` (this rank's), per unit as train_pass keeps them."""
        part = self._rank_part()["correct"]
        return [torch.stack([part[runs[i].name] for i in u]).to(device) for u in units]

    # ---------------------------------------------------------------- writing

    def due(self) -> bool:
        """Whether a timed checkpoint is due (called after every step; under torchrun the ranks agree)."""
        if self.every_s == math.inf:
            return False
        late = time.monotonic() - self.last >= self.every_s
        if self.dist.world == 1:
            return late
        self._steps += 1
        if self._steps % DIST_CHECK_STEPS:
            return False
        device = self.dist.device or torch.device("cpu")
        return self.dist.all_mean(torch.tensor([float(late)], device=device)).item() > 0

    def save(self, runs, units, epoch: int, step: int, sums, seen: int, wall_s: float, correct=None) -> None:
        """Write the pass at (epoch, step): `step` batches of `epoch` done (0: the epoch has not begun).
        Fused runs must have been synced into their modules. Every rank calls it; rank 0 writes."""
        from kdpipe.distributed import Dist
        own, right = {}, {}
        if sums is not None:
            for k, u in enumerate(units):
                for j, i in enumerate(u):
                    own[runs[i].name] = {n: v[j].detach().cpu().clone() for n, v in sums[k].items()}
                    right[runs[i].name] = correct[k][j].detach().cpu().clone()
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        streams = {r.name: {k: v.clone() for k, v in zip(("cpu", "cuda"), r.rng)} for r in runs if r.rng}
        parts = self.dist.gather({"sums": own, "correct": right, "rng": rng, "streams": streams})
        self.last = time.monotonic()
        if not self.dist.is_main:
            return
        state = {}
        for r in runs:
            model = Dist.unwrap(r.model)
            state[r.name] = {"model": _cpu(model.state_dict()), "optimizer": _cpu(r.optimizer.state_dict()),
                             "scheduler": r.scheduler.state_dict(), "history": list(r.history),
                             "terms": {k: list(v) for k, v in r.terms.items()},
                             "train_top1": list(r.train_top1), "own_s": r.own_s, "train_s": r.train_s,
                             "track": self.tracks[r.name].state() if r.name in self.tracks else None}
        obj = {"kdpipe_pass_checkpoint": CHECKPOINT_VERSION, "seed": self.seed, "epochs": self.epochs,
               "runs": self.runs, "position": [epoch, step], "seen": seen, "wall_s": wall_s,
               "ranks": parts, "state": state}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        atomic_write_stream(self.path, lambda f: torch.save(obj, f))
        self.last = time.monotonic()
        if not self.written:
            self.written = True
            self.log(f"  checkpoint of {self.what}: {self.path} ({self.path.stat().st_size / 1e6:.2f} MB, written in "
                     f"{time.perf_counter() - t0:.2f}s) at every epoch's end"
                     + (f" and every {self.every_s / 60:g} min" if self.every_s < math.inf else ""))

    def remove(self) -> None:
        if self.dist.is_main:
            self.path.unlink(missing_ok=True)


def _cpu(obj):
    """A copy of a state dict (nested dicts, lists, tensors) with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


LOCK_FILE = ".lock"


class RunLocks:
    """Exclusive locks on what one command writes: the run directories a train-student call trains
    (RUN/.lock), a cache a dump writes (OUT/.lock, rank 0's), a teacher train-teacher trains (OUT.lock).

    A lock is a file holding its process's pid, host and start time (for the refusal's line), which that
    process keeps open with an exclusive flock until release() removes it. The flock, not the file, decides:
    the kernel drops it when its process ends however it ends, so a lock left by a process that is gone is
    taken over (whatever process its pid names now), and two commands can never both hold one (the file is
    never judged by its content while another process is between creating it and writing its pid). A lock
    that another process holds is a one-line refusal naming it, as is one naming another host (it cannot be
    checked from here), and one a process of this very process's left unreleased (a call that raised) is
    taken back. Where the file system has no locks, the pid decides (same host: whether it still runs)."""

    def __init__(self, log=print):
        self.log = log
        self.held: list[tuple[Path, int]] = []  # (lock file, the open descriptor holding its flock)

    def acquire(self, out: Path, names) -> None:
        for name in names:
            self.acquire_path(Path(out) / name / LOCK_FILE, f"run {name}", "trained")

    def acquire_path(self, path: Path, what: str, doing: str) -> None:
        """Lock `path` (a lock file) for `what` (e.g. "run R"), or raise, saying it is being `doing` (e.g.
        "trained") by the holder. Whatever this object holds is released when it raises."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        path = Path(path)
        fd = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                raise KDPipeError(f"{path} is a directory where kdpipe keeps a lock file: remove it")
            for _ in range(10):
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                except PermissionError:
                    if not path.is_file():
                        raise
                    gone = _refuse_foreign(path, what, doing, me)  # another user's lock file, which this one
                    if gone is not None:  # cannot write: its process was gone, and it is removed (a fresh file takes it)
                        if gone.get("pid") is not None:
                            self.log(f"{what}: the process that held it (pid {gone.get('pid')}) is gone")
                        continue
                    raise KDPipeError(f"{path} is another user's lock, whose process is gone, and this user may not "
                                      "remove it: remove it as that user (or one who may), then run again") from None
                locked = try_flock(fd)
                if not _same_file(fd, path):  # released (removed) or taken back between the open and the flock
                    os.close(fd)
                    fd = None
                    continue
                holder = _read_lock_fd(fd)
                mine = holder.get("pid") == me["pid"] and holder.get("host") == me["host"]
                if locked is False and mine:  # this process's own, from a call that raised: a fresh file takes it
                    os.close(fd)
                    fd = None
                    path.unlink(missing_ok=True)
                    continue
                if locked is False or _alive_elsewhere(holder, me, locked):
                    raise _held_error(path, what, doing, holder)
                if holder.get("pid") is not None and not mine:
                    self.log(f"{what}: the process that held it (pid {holder.get('pid')}) is gone")
                # "flock": this record's process holds its flock (judged by it); a record without it is an older
                # kdpipe's, which took none, or one of a file system without locks: judged by its pid
                data = json.dumps({**me, **({"flock": True} if locked else {})}).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
                self.held.append((path, fd))
                fd = None
                return
            raise KDPipeError(f"cannot take the lock {path}: it was removed and created again each time: retry")
        except OSError as e:
            if fd is not None:
                os.close(fd)
            self.release()
            raise KDPipeError(f"cannot create the lock file {path}: {e.strerror or e}") from None
        except BaseException:
            if fd is not None:
                os.close(fd)
            self.release()
            raise

    def release(self) -> None:
        for path, fd in self.held:
            try:
                if _same_file(fd, path):  # not taken back by a later call of this process
                    path.unlink(missing_ok=True)
            except OSError:
                pass
            finally:
                os.close(fd)  # drops the flock: after the unlink, so no other process locks the file we remove
        self.held = []


def _held_error(path: Path, what: str, doing: str, holder: dict) -> KDPipeError:
    since = (f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"
             if holder.get("pid") is not None else "which is starting")
    return KDPipeError(f"{what} is being {doing} by another kdpipe ({since}): wait for it to finish, "
                       f"or remove {path} if that process is gone")


def _refuse_foreign(path: Path, what: str, doing: str, me: dict) -> dict | None:
    """For a lock file this user may not write (another user's): the refusal naming its holder where that one may
    still run (its flock taken, or its pid running here); where it is gone, its record once the file is removed, as
    older kdpipes removed it (a folder the users share, which each may write), else None (the caller says to remove
    it). The file is removed while its shared flock is held, so no process takes it over meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        holder = _read_lock_fd(fd)
        locked = try_flock(fd, shared=True)  # a shared lock conflicts with the holder's
        if locked is False or _alive_elsewhere(holder, me, locked):
            raise _held_error(path, what, doing, holder)
        if not _same_file(fd, path):
            return {}  # removed or replaced meanwhile: judged again
        try:
            path.unlink()
        except OSError:
            return None
        return holder
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is still the file at `path` (not removed, nor replaced by another)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_lock_fd(fd: int) -> dict:
    try:
        obj = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}  # written by hand, or half-written by a process that died at once: nobody holds it
    return obj if isinstance(obj, dict) else {}


def _alive_elsewhere(holder: dict, me: dict, locked: bool | None) -> bool:
    """Whether the lock's process may still be running, its flock being free (`locked` True) or unknown (None,
    no locks here): one of another host may (it cannot be checked from here); one of this host runs no more when
    it held its flock (its record says so) and that is free (the kernel drops it with its process), else when its
    pid no longer runs (an older kdpipe's lock, which took no flock: a free flock says nothing of it)."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    if holder.get("host") != me["host"]:
        return True
    if locked and holder.get("flock") is True:
        return False
    return pid != me["pid"] and _pid_runs(pid)
