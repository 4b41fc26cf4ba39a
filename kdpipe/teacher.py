"""Train a teacher; dump its logits over the augmentation-fixed dataset (stage one)."""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from kdpipe import KDPipeError
from kdpipe.cache import format as fmt
from kdpipe.cache.writer import CacheWriter, differences
from kdpipe.checkpoint import FIXED_LAYOUT_KINDS, PROGRAM_KINDS, LoadedModel, save_checkpoint
from kdpipe.data import RECORD_ONLY, ImageData, resize_mode
from kdpipe.distributed import SINGLE, Dist
from kdpipe.engine import OptimConfig, build_run, predict, steps_per_epoch, train_pass, warmup_note
from kdpipe.evaluate import cpu_latency_ms, cpu_name, eval_params, top1
from kdpipe.losses import create_loss
from kdpipe.models import count_parameters, model_recipe
from kdpipe.normalization import resolve_input
from kdpipe.resume import DEFAULT_EVERY_MINUTES, PassCheckpoint, RunLocks, resume_file, settings
from kdpipe.sweep import check_warmup
from kdpipe.util import Progress, channels_last, ensure_parent, error_line, human_bytes, images_tensor
from kdpipe.views import ViewPolicy


def teacher_checkpoint_path(out) -> Path:
    """Where train-teacher keeps the checkpoint of a training in progress: beside the teacher it will save."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoint")


class _History:
    """The teacher's per-epoch record (loss, train and test top-1), kept in its checkpoint."""

    def __init__(self):
        self.epochs: list[dict] = []

    def state(self) -> list[dict]:
        return list(self.epochs)

    def load(self, state) -> None:
        self.epochs = list(state)


def train_teacher(train: ImageData, test: ImageData, arch: str, epochs: int, out, *, policy: ViewPolicy,
                  batch_size: int = 128, optim: OptimConfig | None = None, seed: int = 0,
                  device=torch.device("cpu"), amp: bool = False, log=print, arch_args: dict | None = None,
                  checkpoint_every: float = DEFAULT_EVERY_MINUTES, overwrite: bool = False) -> dict:
    """Train `arch` (a kdpipe.models spec, with `arch_args`) with fresh random views every epoch; save a
    kdpipe checkpoint at `out`.

    The training survives crashes as stage two's passes do (kdpipe.resume): a checkpoint of the weights,
    optimizer, schedule, data position and RNG states goes to OUT.checkpoint at every epoch's end and
    every `checkpoint_every` minutes (0: epoch ends only), and after a held Ctrl-C or SIGTERM (then
    KeyboardInterrupt). The same call resumes from it and ends with the weights an uninterrupted training
    gives; one with other settings is refused unless `overwrite` (then it starts over). The checkpoint is
    removed once the teacher is saved. A teacher at `out` trained with the same settings on the same data (its
    checkpoint records them) is kept, not trained again, even with `overwrite` (result["kept"])."""
    check_warmup((optim or OptimConfig()).warmup_epochs, epochs)
    out = ensure_parent(out, "teacher output")
    locks = RunLocks(log)  # one training of OUT at a time: both would write OUT.checkpoint
    locks.acquire_path(out.with_name(out.name + ".lock"), f"the teacher {out}", "trained")
    try:
        optim = optim or OptimConfig()
        mean, std = train.channel_stats()
        in_shape = policy.output_shape(train.image_shape)
        epoch_steps = steps_per_epoch(len(train), batch_size)
        if note := warmup_note(optim, epoch_steps, epochs * epoch_steps):
            log(note)
        run = build_run("teacher", arch, create_loss("kd", alpha=0.0), seed, train.num_classes, in_shape, optim,
                        epochs * epoch_steps, device, arch_args=arch_args, epoch_steps=epoch_steps)
        images = images_tensor(train.images, device)
        labels = torch.from_numpy(train.labels).to(device)

        def fresh_views(epoch):  # a new draw every epoch: ordinary online augmentation
            return torch.from_numpy(policy.sample_view(seed + 1_000_003, epoch, train.images.shape)).to(device), None

        # What must match for a checkpoint to be resumed (the data and a model's own code by content, not by where
        # they lie now: weights resumed into a network whose file was edited since would mix two models).
        config = {"role": "teacher", "arch": arch, "arch_args": arch_args or {},
                  "arch_file_sha256": model_recipe(arch, arch_args).get("sha256"), "epochs": epochs,
                  "batch_size": batch_size, "optim": optim.settings(), "policy": policy.identity(), "seed": seed,
                  "amp": amp, "train": {k: v for k, v in train.identity().items() if k not in ("spec", *RECORD_ONLY)},
                  "test": {k: v for k, v in test.identity().items() if k not in ("spec", *RECORD_ONLY)},
                  "device": str(device)}
        ck_path = teacher_checkpoint_path(out)
        kept = _same_teacher(out, config, log)
        if kept is not None:  # make reruns the step for a data file merely touched: hours of training are kept
            teacher_checkpoint_path(out).unlink(missing_ok=True)
            log(f"{out} already holds a teacher trained with these settings on this data (test top-1 "
                f"{kept['test_top1']:.4f}): kept (delete it to train again)")
            return kept
        history = _History()  # per epoch: the loss, top-1 on the views trained on, test top-1 (a teacher that is
        # not learning shows in the first epochs, not at the end of a long run)
        resume_from = resume_file(ck_path, {"teacher": config}, overwrite, log, "a teacher training")
        ckpt = PassCheckpoint(out.parent, seed, {"teacher": config}, epochs, checkpoint_every, log=log,
                              resume_from=resume_from, tracks={"teacher": history}, path=ck_path,
                              what="the teacher's training")
        ckpt.restore([run])
        log(f"training teacher {arch} ({count_parameters(run.model):,} parameters) on {train.spec} "
            f"({len(train)} {'rows' if train.kind == 'features' else 'images'}) for {epochs} epochs on {device}, {optim.optimizer} lr {optim.lr:g} "
            f"{optim.schedule}")
        if ckpt.state is not None:
            e, s = ckpt.position
            at = f"epoch {e + 1}/{epochs}, step {s}" if s else f"{e}/{epochs} epochs done"
            log(f"  resuming from {ck_path}: {at} (delete it to start over)")
        test_images, test_labels = images_tensor(test.images, device), torch.from_numpy(test.labels).to(device)
        params = torch.from_numpy(eval_params(policy, test.image_shape, len(test))).to(device)

        def on_epoch_end(epoch):
            if not math.isfinite(run.history[-1]):  # NaN weights: no teacher to save, nor a checkpoint to resume
                ckpt.remove()
                raise KDPipeError(f"the teacher's training diverged: its loss became {run.history[-1]} in epoch "
                                  f"{epoch + 1}, so its weights are not usable and nothing was saved to {out}: lower "
                                  f"--lr (it was {optim.lr:g}) and train again")
            logits = predict(run.model, test_images, policy, params, mean, std, amp=amp)
            if not torch.isfinite(logits).all():  # the epoch's last steps overflowed the weights: its loss was finite
                ckpt.remove()
                raise KDPipeError(f"the teacher's training diverged: its outputs on the test split became "
                                  f"non-finite (NaN or infinite) in epoch {epoch + 1}, so its weights are not usable "
                                  f"and nothing was saved to {out}: lower --lr (it was {optim.lr:g}) and train again")
            acc = top1(logits, test_labels)
            history.epochs.append({"epoch": epoch + 1, "loss": run.history[-1], "train_top1": run.train_top1[-1],
                                   "test_top1": acc})
            log(f"  teacher epoch {epoch + 1}/{epochs}: train top-1 {run.train_top1[-1]:.4f}, test top-1 {acc:.4f}")

        with ckpt.holding_interrupts():  # Ctrl-C / SIGTERM: a checkpoint where it stopped, then KeyboardInterrupt
            stats = train_pass([run], images, labels, policy, mean, std, epochs, batch_size, seed, fresh_views,
                               amp=amp, label="teacher", log=log, on_epoch_end=on_epoch_end, checkpoint=ckpt)
        acc = history.epochs[-1]["test_top1"]
        latency = cpu_latency_ms(run.model, in_shape)
        size = save_checkpoint(out, run.model, arch=arch, num_classes=train.num_classes, image_shape=in_shape,
                               mean=mean, std=std, class_names=train.class_names, dataset=train.identity(),
                               test_top1=acc, arch_args=arch_args,
                               extra={"view_policy": policy.identity(), "epochs": epochs, "cpu_latency_ms": latency,
                                      "train_wall_s": stats["wall_s"], "role": "teacher",
                                      "training": optim.settings(), "history": history.state(),
                                      "settings": settings(config)})
        ckpt.remove()
        log(f"teacher {arch}: test top-1 {acc:.4f}, {stats['wall_s']:.1f}s; saved {out} ({size / 1e6:.2f} MB)")
        return {"test_top1": acc, "path": str(out), "bytes": size, **stats}
    finally:
        locks.release()


def _same_teacher(out: Path, config: dict, log=print) -> dict | None:
    """train_teacher's result for the teacher at `out` when it was trained with `config`'s settings (which its
    checkpoint records), else None: a file of other settings, of an older kdpipe, or not a teacher is replaced,
    with a line saying why (make reruns the step with --overwrite: hours of training go)."""
    if not out.is_file():
        return None
    try:
        obj = torch.load(out, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a checkpoint kdpipe wrote
        obj = None
    if not isinstance(obj, dict) or "kdpipe_checkpoint" not in obj:
        # --overwrite replaced it: train-teacher --data npz:d.npz --out d.npz --overwrite replaced the data
        raise KDPipeError(f"{out} is not a kdpipe checkpoint (the data, or weights of your own?): --overwrite replaces "
                          "only kdpipe's checkpoints: give another --out, or move the file aside")
    if obj.get("role") != "teacher":
        log(f"{out} is not a teacher checkpoint of kdpipe's: it is replaced")
        return None
    if "settings" not in obj:
        log(f"{out} was saved by an older kdpipe, which did not record the settings it was trained with, so it "
            "cannot be kept as one of these: it is trained again (Ctrl-C now and move it aside to keep it)")
        return None
    if obj["settings"] != settings(config):
        log(f"{out} holds a teacher of other settings "
            f"({', '.join(differences(obj['settings'], settings(config)))}): it is trained again")
        return None
    os.utime(out)  # up to date for make, whose prerequisite may merely have been touched
    return {"test_top1": obj["test_top1"], "path": str(out), "bytes": out.stat().st_size, "kept": True}


# ---------------------------------------------------------------- stage one

AMP_DTYPE = torch.bfloat16  # --amp's autocast dtype (as in engine.py); the manifest records it


PROBE_SAMPLES = 256  # training samples the teacher is checked on before a dump
CHANCE_P = 1e-3  # the probe refuses a teacher whose top-1 is not above chance at this significance


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (exact for the probe's n)."""
    if k <= 0:
        return 1.0
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
            for i in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def probe_rows(n: int) -> np.ndarray:
    """The samples of the probe: PROBE_SAMPLES spread over the split (all of a smaller one), in order."""
    if n <= PROBE_SAMPLES:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, PROBE_SAMPLES, replace=False))


def chance_level(labels: np.ndarray, num_classes: int) -> float:
    """The top-1 that a teacher blind to its inputs can reach: the most common class's share of the split
    (1 / classes for balanced data), never below 1 / classes."""
    share = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).max() / max(1, len(labels))
    return max(1.0 / num_classes, float(share))


def check_teacher_outputs(logits: np.ndarray, labels: np.ndarray, num_classes: int,
                          chance: float | None = None, what: str = "training samples") -> tuple[str | None, str]:
    """(a reason to stop, or None; a summary) from the teacher's outputs on the probe's clean views:
    rows that look like probabilities (all non-negative, each summing to 1), or a top-1 accuracy that a
    one-sided binomial test cannot tell from chance at CHANCE_P. Chance is 1 / classes unless given
    (chance_level). A probe too small for the test ever to reject, e.g. 8 samples of 2 classes, skips
    the test and says so."""
    n = len(labels)
    correct = int((logits.argmax(1) == labels).sum())
    chance = 1.0 / num_classes if chance is None else chance
    p = binomial_tail(correct, n, chance)
    summary = f"probe: teacher top-1 {correct / n:.3f} on {n} {what} (chance {chance:.3f}, p = {p:.2g})"
    fix = "check the input normalization (--normalize, --input-range, --mean/--std), the teacher's class order " \
          "and --teacher-output, or pass --force"
    # Rows summing to 1 within bfloat16's rounding (2^-9 of each probability: a teacher saved in bfloat16 runs so).
    if np.isfinite(logits).all() and (logits >= 0).all() and np.allclose(logits.sum(1), 1.0, atol=1e-2):
        return ("the teacher's outputs look like probabilities (non-negative, every row sums to 1), not raw logits: "
                "give the model without its final softmax, or pick its logits with --teacher-output; or pass "
                "--force"), summary
    if binomial_tail(n, n, chance) > CHANCE_P:  # even a perfect teacher could not be told from chance
        return None, summary + "; too few samples to test for chance level"
    if p > CHANCE_P:
        return (f"the teacher's top-1 on {n} {what} is {correct / n:.3f}, no better than chance "
                f"({chance:.3f}; binomial p = {p:.2g}): {fix}"), summary
    return None, summary


NORM_SCREEN = 64  # probe samples the teacher first runs on under each other normalization
NORM_MARGIN = 0.1  # a top-1 this much higher under another normalization, and beyond noise, stops the dump


def check_normalization(run, given: np.ndarray, labels: np.ndarray, norm: dict, stats, what: str,
                        rgb: bool = False) -> str | None:
    """A reason to stop, or None: the teacher's top-1 on the probe under the normalization given (`given`: its
    logits) against the other usual ones (kdpipe.normalization.alternatives; `stats`: the data's own mean and std).
    A teacher fed other inputs than it was trained on is still above chance, and its cache silently worse: an
    ImageNet-normalized teacher given --input-range 0-1. `run(mean, std, k)`: its logits on the first k probe
    samples under that normalization. Each other one is tried on NORM_SCREEN samples, and confirmed on all by
    McNemar's exact test (of the samples the two get differently, the other gets right more often than chance at
    CHANCE_P). `rgb`: grey images reach the teacher repeated to 3 channels, so 3-channel presets are tried too (their
    3 values given to `run`)."""
    from kdpipe.normalization import alternatives, asked_as
    n = len(labels)
    if n < NORM_SCREEN:
        return None
    right = given.argmax(1) == labels
    a, a_screen = float(right.mean()), float(right[:NORM_SCREEN].mean())
    for how, mean, std in alternatives(norm, len(stats[0]), *stats, rgb=rgb):
        if float((run(mean, std, NORM_SCREEN).argmax(1) == labels[:NORM_SCREEN]).mean()) < a_screen + NORM_MARGIN:
            continue
        other = run(mean, std, n).argmax(1) == labels
        b, gained, lost = float(other.mean()), int((other & ~right).sum()), int((right & ~other).sum())
        if b - a >= NORM_MARGIN and binomial_tail(gained, gained + lost, 0.5) < CHANCE_P:
            return (f"the teacher's top-1 on {n} {what} is {a:.3f} with {asked_as(norm)}, and {b:.3f} with {how}: "
                    "it was likely trained with inputs normalized so; give the normalization it was trained with, "
                    "or pass --force")
    return None


def check_teacher_stable(first: np.ndarray, again: np.ndarray, atol: float, rtol: float) -> str | None:
    """A reason to stop, or None: the teacher's outputs on the probe's inputs, run twice in batches of
    different sizes, must agree within (atol, rtol), verify-cache's tolerance for float16. Dropout or batch
    norm left in training mode (which a traced or scripted model keeps from when it was traced) breaks
    this, and the cache would then hold logits the teacher does not give again."""
    off = ~np.isclose(first, again, rtol=rtol, atol=atol, equal_nan=True).all(axis=1)  # NaN: the writer's to name
    if not off.any():
        return None
    return (f"the teacher's outputs change when it runs again on the same inputs ({int(off.sum())} of {len(off)} "
            f"probe samples, max |diff| {float(np.nanmax(np.abs(first - again)[off])):.3g}, batches of another "
            "size): it "
            "has dropout or batch norm in training mode, or other randomness; save or export it after "
            "model.eval() (a traced or scripted model keeps the mode it was traced in), or pass --force")


def check_class_names(teacher: LoadedModel, data: ImageData, log=print) -> None:
    """Output i of the teacher is taken as the data's class i. A teacher that records its classes (a kdpipe
    checkpoint) and names one of the data's classes at another index would fill the cache with another
    class's logits (two swapped classes still pass the probe): refused. Other names are said in a note."""
    names = [str(c) for c in (teacher.info.get("class_names") or [])]
    ours = [str(c) for c in data.class_names]
    if not names or names == ours or len(names) != len(ours):
        return
    where = {c: i for i, c in enumerate(ours)}
    moved = [(i, c) for i, c in enumerate(names) if c in where and where[c] != i]
    if moved:
        i, c = moved[0]
        raise KDPipeError(f"the teacher's classes are in another order than the data's: its output {i} is {c!r}, "
                          f"which is class {where[c]} of {data.spec} ({len(moved)} of {len(names)} classes "
                          "moved): give the data its classes in the teacher's order, or use a teacher trained "
                          "on this order")
    log(f"note: the teacher was trained on classes {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}; "
        f"{data.spec} has {', '.join(ours[:4])}{', ...' if len(ours) > 4 else ''}: output i is taken as class i")


def note_unseen_ops(teacher: LoadedModel, policy: ViewPolicy, log=print) -> None:
    """Say which of the views' geometric ops a kdpipe teacher never saw in training (its checkpoint's view_policy):
    the default crop-flip over digits a teacher trained on crop:2 cached flipped digits, its top-1 on them far below
    its clean top-1, without a word. A mixing op (function matching) is new to the teacher by design: not said."""
    trained = teacher.info.get("view_policy") or {}
    if teacher.kind != "kdpipe" or not isinstance(trained.get("ops"), list):
        return
    seen = {op.get("name") for op in trained["ops"]}
    unseen = [op.name for op in policy.ops if op is not policy.mixer and op.name != "none" and op.name not in seen]
    if unseen:
        log(f"note: the teacher was trained on views {trained.get('spec')}, and these views ({policy.spec}) add "
            f"{', '.join(unseen)}, which it never saw: its logits there may be worse than on its own views (a flip is "
            f"wrong for digits and text); give --policy {trained.get('spec')} for the views it was trained on")


def _grey_hint(teacher: LoadedModel, x: torch.Tensor, e: Exception) -> str:
    """What to do where a teacher that holds its own architecture wants 3 channels and the views are grey."""
    if teacher.kind in PROGRAM_KINDS and x.dim() == 4 and x.shape[1] == 1 and "3 channels" in str(e):
        return " (an RGB teacher on grey images: give --arch-args in_chans=3 to repeat them to 3 channels)"
    return ""


def _dump_identity(teacher: LoadedModel, data: ImageData, policy: ViewPolicy, views: int, seed: int,
                   logits_dtype: str, shard_rows: int, batch_size: int, norm: dict,
                   codec: dict | None = None, features=(), amp: bool = False) -> dict:
    extra = {"logits_codec": codec} if codec else {}  # raw caches keep the identity (and ids) they always had
    if amp:  # a resumed dump must not add float32 shards to bf16-autocast ones, or the other way round
        extra["autocast"] = str(AMP_DTYPE).removeprefix("torch.")
    if features:  # none: the identity of earlier versions
        extra["features"] = [dict(f) for f in features]
    # The file's sha256 covers a state dict's weights only: the options its architecture is built with and
    # the user's code it is built from make the teacher too (added only where present, so that the
    # identities, and ids, of the caches of other teachers stay what they were).
    built = {}
    if teacher.kind != "kdpipe" and (teacher.model or {}).get("args"):  # a program's: in_chans=3
        built["arch_args"] = teacher.model["args"]
    if teacher.code:
        built["code_sha256"] = teacher.code
    return {"format_version": fmt.FORMAT_VERSION, **extra,
            "teacher": {"fingerprint": teacher.fingerprint, "arch": teacher.arch, "kind": teacher.kind,
                        "output": teacher.output or "auto", **built},
            "dataset": {k: v for k, v in data.identity().items() if k not in ("class_names", *RECORD_ONLY)},
            "views": {**policy.identity(), "seed": int(seed), "K": int(views)},
            "logits_dtype": logits_dtype, "shard_rows": int(shard_rows), "batch_size": int(batch_size),
            "input": {"mean": [float(m) for m in norm["mean"]], "std": [float(s) for s in norm["std"]],
                      "normalization": {"source": norm["source"], "value": norm["value"]},
                      # grey images fed to an RGB teacher as Grayscale(3) + Normalize: only where so (older ids)
                      **({"grey_to_rgb": {k: [float(v) for v in norm["grey_to_rgb"][k]] for k in ("mean", "std")}}
                         if norm.get("grey_to_rgb") else {})}}


SIZE_FACTOR = 10  # a cache over this many times the decoded dataset's bytes needs --yes


def planned_size(data: ImageData, test: ImageData | None, policy: ViewPolicy, views: int,
                 logits_dtype: str, codec: dict | None = None, features=()) -> dict:
    """What a dump will write, from the cache columns' declarations (kdpipe/cache/format.py) of its codec
    (`codec`: format.codec_identity's record; None: raw): rows, bytes per row, and bytes in all (shards
    and the eval file; HDF5's metadata adds a few KB per file). `features`: the cached features
    ({"layer", "shape"}, feature_shapes); "feature_bytes" is their share of a row."""
    m = {"dataset": {"num_classes": data.num_classes, "num_samples": len(data)},
         "views": {"columns": list(policy.columns)}, "logits_dtype": logits_dtype, "logits_codec": codec,
         "features": list(features)}
    rows = len(data) * views
    per_row = fmt.row_bytes(m)
    feature_bytes = per_row - fmt.row_bytes({**m, "features": []})
    eval_bytes = len(test) * fmt.eval_row_bytes(m) if test is not None else 0
    return {"rows": rows, "row_bytes": per_row, "feature_bytes": feature_bytes, "eval_bytes": eval_bytes,
            "bytes": rows * per_row + eval_bytes, "data_bytes": int(data.images.nbytes)}


def feature_shapes(teacher: LoadedModel, layers, in_shape) -> list[dict]:
    """[{"layer", "shape"}] of the teacher's modules at these paths, from one forward pass of PROBE_BATCH
    blank inputs on the teacher's current device (kdpipe.features: unknown layers and modules without hooks
    are refused in one line)."""
    from kdpipe.features import PROBE_BATCH, FeatureTap, hook_root
    if not layers:
        return []
    if len(set(layers)) != len(layers):
        raise KDPipeError(f"--features names a layer twice: {', '.join(layers)}")
    root = hook_root(teacher.module, teacher.kind)
    dev = next(iter(teacher.module.parameters()), torch.zeros(0)).device
    with torch.no_grad(), FeatureTap(root, layers) as tap:
        try:
            teacher.module.eval()(torch.zeros((PROBE_BATCH, *in_shape), device=dev))
        except KDPipeError:
            raise
        except Exception as e:
            raise KDPipeError(f"the teacher fails on inputs of shape {(PROBE_BATCH, *tuple(in_shape))}: "
                              f"{error_line(e)}" + _grey_hint(teacher, torch.zeros(1, *in_shape), e)) from None
        got = tap.take(PROBE_BATCH)
    return [{"layer": layer, "shape": [int(v) for v in got[layer].shape[1:]]} for layer in layers]


# A shard is built in memory before it is written (its logits in float32 and as stored, HDF5's image of the file:
# about five times its bytes); rows of many classes or of large cached features are held to this many bytes a shard.
SHARD_BYTES = 512 << 20


def _rows_within(limit: int, data, policy, views, logits_dtype, codec, feats, shard_rows: int, log) -> int:
    """The rows of one shard whose stored bytes stay within `limit` (at least one); said where it is fewer than
    `shard_rows`."""
    row = planned_size(data, None, policy, views, logits_dtype, codec, feats)["row_bytes"]
    rows, want = max(1, limit // row), min(shard_rows, len(data) * views)
    if rows < want:
        log(f"note: shards of {want:,} rows of {row:,} bytes would take {human_bytes(want * row)} each "
            f"(built in memory before they are written): writing shards of {rows:,} rows instead")
    return rows


def check_planned_size(plan: dict, out_dir, yes: bool, log=print) -> None:
    """Refuse (unless `yes`) a dump whose cache would exceed the free space where it goes, or
    SIZE_FACTOR times the decoded dataset; either way say the planned size. The cache files already in
    OUT count as free: a resumed dump keeps them (a finished one writes nothing), --overwrite removes them."""
    out = Path(out_dir).resolve()
    where = next((p for p in (out, *out.parents) if p.exists()), Path("/"))
    have = sum(f.stat().st_size for f in (*out.glob("shard-*.h5"), out / fmt.EVAL_FILE) if f.is_file())
    free = shutil.disk_usage(where).free + have
    size = (f"{human_bytes(plan['bytes'])} ({plan['rows']:,} rows x {plan['row_bytes']} bytes"
            + (f", of which {plan['feature_bytes']} of features" if plan.get("feature_bytes") else "")
            + (f", plus {human_bytes(plan['eval_bytes'])} of test logits)" if plan["eval_bytes"] else ")"))
    why = []
    if plan["bytes"] > free:
        why.append(f"more than the {human_bytes(free - have)} free on {where}"
                   + (f" and the {human_bytes(have)} of it already in {out_dir}" if have else ""))
    if plan["bytes"] > SIZE_FACTOR * plan["data_bytes"]:
        why.append(f"more than {SIZE_FACTOR}x the decoded dataset ({human_bytes(plan['data_bytes'])})")
    if why and not yes:
        smaller = ("cache a smaller --features layer (a pooled one: most of each row is features), or dump fewer "
                   "--views" if 2 * plan.get("feature_bytes", 0) > plan["row_bytes"] else "dump fewer --views")
        raise KDPipeError(f"the cache would take {size}, " + " and ".join(why) +
                          f": pass --yes to dump it anyway, or {smaller}")
    log(f"planned cache size {size}" + (f", {' and '.join(why)} (--yes)" if why else ""))


def check_resize(teacher: LoadedModel, data: ImageData, command: str = "dump-logits") -> None:
    """Refuse photos decoded by another resize (crop, squash, another shorter side or filter) than the ones a
    kdpipe teacher was trained on at this size: its inputs have the same shape, so the probe passed and the cache
    held worse logits, silently (compress measured every row on them)."""
    d = teacher.info.get("dataset") or {}
    if data.kind != "photos" or d.get("kind") != "photos" or d.get("image_size") != data.image_size:
        return
    trained, given = resize_mode(d), data.resize
    if trained != given:
        fix = f"dump the data it was trained on{_trained_with(teacher)}" if command == "dump-logits" else \
            f"give {command} --resize {trained}"
        raise KDPipeError(f"the teacher was trained on photos resized by {trained} (--resize {trained}), the data "
                          f"given is resized by {given}: {fix}")


def note_timm_resize(teacher: LoadedModel, data: ImageData, log=print) -> None:
    """A timm teacher given as weights (no kdpipe record of its photos) is evaluated in timm by Resize(floor(S /
    crop_pct), its interpolation) + CenterCrop(S), from its pretrained_cfg: where the photos are stored otherwise,
    say which --resize stores exactly those (a note: the user's own evaluation may have differed)."""
    from kdpipe.data import RESIZE_FILTERS, ResizeMode
    if data.kind != "photos" or (teacher.info.get("dataset") or {}).get("kind") or \
            not str(teacher.arch).startswith("timm:"):
        return
    cfg = next((m.pretrained_cfg for m in teacher.module.modules() if isinstance(getattr(m, "pretrained_cfg", None),
                                                                                  dict)), None)
    if not cfg or cfg.get("crop_mode", "center") != "center" or cfg.get("interpolation") not in RESIZE_FILTERS:
        return
    s, pct, interp = data.image_size, float(cfg.get("crop_pct") or 0.875), cfg["interpolation"]
    r = math.floor(s / pct)
    if r < s:
        return
    mode = str(ResizeMode("crop", r, interp).at(s))
    if mode != data.resize:
        log(f"note: timm evaluates {teacher.arch} on Resize({r}, {interp}) + CenterCrop({s}) (its pretrained_cfg: "
            f"crop_pct {pct:g}), which --resize {mode} stores exactly; these photos are stored by --resize "
            f"{data.resize}: give --resize {mode} if your teacher was evaluated so")


def _trained_with(teacher: LoadedModel) -> str:
    """The dump-logits options of the data and views a kdpipe teacher was trained on, as its checkpoint records
    them (" (--data fashion-mnist, --image-size 24, --policy crop:2+flip)"); "" where it records none."""
    d, v = teacher.info.get("dataset") or {}, teacher.info.get("view_policy") or {}
    opts = [f"--{k} {x}" for k, x in (("data", d.get("spec")), ("image-size", d.get("image_size")),
                                       ("resize", resize_mode(d) if resize_mode(d) != "crop" else None),
                                       ("policy", v.get("spec"))) if x]
    return f" ({', '.join(opts)})" if opts else ""


def dump_logits(teacher: LoadedModel, data: ImageData, test: ImageData | None, out_dir, *, policy: ViewPolicy,
                views: int, seed: int = 0, logits_dtype: str = "float16", batch_size: int = 512,
                shard_rows: int = 65536, device=torch.device("cpu"), amp: bool = False,
                overwrite: bool = False, mean=None, std=None, input_range: str | None = None,
                normalize: str | None = None, force: bool = False, dist: Dist | None = None, log=print,
                codec: str = "raw", temperatures=(), features=()) -> dict:
    """Stage one: run the teacher once over K views of every sample; write shards, then the manifest.

    Resumable: complete shards of an earlier run with the same identity are kept. Under torchrun
    (`dist`, see kdpipe.distributed): rank 0 checks OUT (identity, --overwrite) before the other ranks
    start; the ranks check the existing shards between them (rank r those with index r mod world),
    share what is complete, and split the shards still to compute round-robin, so a cache begun with
    any world size is finished correctly with any other. Rank 0 gathers the shard entries and writes
    the manifest. A failure on any rank stops every rank with a message naming it.

    The input normalization is explicit (kdpipe.normalization.resolve_input: a kdpipe checkpoint's own, or
    mean/std, input_range or the normalize preset). Before the dump, the teacher runs on the clean views
    of PROBE_SAMPLES training samples: outputs that look like probabilities, or a top-1 no better than
    chance, stop it (check_teacher_outputs) unless `force`. `codec` "raw" stores the logits, "topk:K" the K
    largest with their classes and the rest mass at each of `temperatures` (kdpipe/cache/format.py). The
    cache protocol
    (OUT, resume, shard files, manifest) is kdpipe.cache.writer.CacheWriter's: this function runs the
    teacher and hands it each shard's logits, row indices and view parameters.

    `features`: module paths of the teacher (kdpipe.features) whose outputs are stored too, float16, for
    every row (columns features/<layer>; the manifest's ``features`` records layers and shapes).
    """
    ctx = dist or SINGLE
    rank, world = ctx.rank, ctx.world
    if views <= 0:
        raise KDPipeError(f"--views must be >= 1, got {views}")
    if batch_size <= 0 or shard_rows <= 0:
        raise KDPipeError("batch size and shard rows must be >= 1")
    if logits_dtype not in fmt.LOGITS_DTYPES:
        raise KDPipeError(f"unknown logits dtype {logits_dtype!r}: use {', '.join(fmt.LOGITS_DTYPES)}")
    try:
        codec_ident = fmt.codec_identity(fmt.parse_codec(codec), temperatures, data.num_classes)
    except ValueError as e:
        raise KDPipeError(str(e)) from None
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise KDPipeError(f"output {out_dir} is a file, not a directory: choose another path")
    in_shape = policy.output_shape(data.image_shape)
    if teacher.num_classes is not None and teacher.num_classes != data.num_classes:
        raise KDPipeError(f"the teacher predicts {teacher.num_classes} classes, the dataset {data.spec} "
                          f"has {data.num_classes}: dump the data it was trained on{_trained_with(teacher)}, or give "
                          "a teacher trained on this data")
    if teacher.image_shape is not None and tuple(teacher.image_shape) != tuple(in_shape):
        raise KDPipeError(f"the teacher takes inputs {tuple(teacher.image_shape)}, the views are {tuple(in_shape)}: "
                          f"dump the data and views it was trained on{_trained_with(teacher)}")
    check_resize(teacher, data)
    note_timm_resize(teacher, data, log)
    if views > 1 and not policy.is_random and rank == 0:  # stage two replays view e mod K: every epoch sees the same
        log(f"note: --policy {policy.spec} draws nothing at random, so the {views} views are one view computed "
            f"{views} times: --views 1 trains students the same at 1/{views} of the dump's cost and disk")
    check_class_names(teacher, data, log)
    if rank == 0:
        note_unseen_ops(teacher, policy, log)
    norm = resolve_input(teacher, in_shape, mean=mean, std=std, input_range=input_range, preset=normalize)
    mean, std = norm["mean"], norm["std"]  # of the views; an RGB teacher of grey images normalizes each channel too
    teacher.set_grey_to_rgb(norm.get("grey_to_rgb"))
    n = len(data)
    feats = feature_shapes(teacher, list(features), in_shape)
    shard_rows = min(shard_rows, n * views, _rows_within(SHARD_BYTES, data, policy, views, logits_dtype, codec_ident,
                                                         feats, shard_rows, log))
    ident = _dump_identity(teacher, data, policy, views, seed, logits_dtype, shard_rows, batch_size, norm, codec_ident,
                           feats, amp)

    def label_of(sidx: np.ndarray, vparams: np.ndarray) -> np.ndarray:
        """The class a row's view shows most: its sample's, or a mixed view's partner's where the partner has
        the larger share (what the teacher's top-1 on its views is scored against)."""
        own = data.labels[sidx]
        if policy.mixer is None:
            return own
        partner, share = policy.mixing(torch.from_numpy(np.asarray(vparams, dtype=np.int64)), data.image_shape)
        return np.where(share.numpy() >= 0.5, own, data.labels[partner.numpy()])

    writer = CacheWriter(out_dir, ident, overwrite=overwrite, dist=ctx, log=log, label_of=label_of)

    use_channels_last = device.type == "cuda"  # recorded in the manifest: verify-cache re-runs the teacher alike
    teacher_mod = teacher.module.to(device).eval()
    if use_channels_last and teacher.kind not in FIXED_LAYOUT_KINDS:
        teacher_mod = teacher_mod.to(memory_format=torch.channels_last)
    images = images_tensor(data.images, device)
    labels = data.labels
    param_cache: dict[int, np.ndarray] = {}

    def view_params(k: int) -> np.ndarray:
        if k not in param_cache:
            param_cache.clear()
            param_cache[k] = policy.sample_view(seed, k, data.images.shape)
        return param_cache[k]

    # Probe the teacher on the clean views of a few hundred training samples before spending time or
    # touching OUT: its output shape, then outputs that are probabilities or at chance level, then outputs
    # that change when it runs again on the same inputs in other batches.
    sel = probe_rows(n)

    def probe(bs: int, rows: np.ndarray = sel, mean=mean, std=std) -> np.ndarray:
        chunks = []
        with torch.no_grad():
            pp = torch.from_numpy(eval_params(policy, data.image_shape, len(rows))).to(device)
            for b in range(0, len(rows), bs):
                x = policy.replay(images[torch.from_numpy(rows[b:b + bs]).to(device)], pp[b:b + bs], mean, std)
                try:
                    out = teacher_mod(x)
                except KDPipeError:
                    raise
                except Exception as e:
                    raise KDPipeError(f"the teacher fails on inputs of shape {tuple(x.shape)}: {error_line(e)}"
                                      + _grey_hint(teacher, x, e)) from None
                if out.ndim != 2 or out.shape[1] != data.num_classes:
                    raise KDPipeError(f"the teacher outputs shape {tuple(out.shape[1:])} per image, the dataset "
                                      f"{data.spec} has {data.num_classes} classes: give a teacher with one output "
                                      "per class of this data (fine-tuned on it), or pick its logits with "
                                      "--teacher-output NAME|INDEX")
                chunks.append(out.float().cpu())
        return torch.cat(chunks).numpy()

    first = probe(batch_size)
    stop, summary = check_teacher_outputs(first, labels[sel], data.num_classes,
                                          chance_level(labels, data.num_classes),
                                          "training samples" if data.split == "train" else f"{data.split} samples")
    log(summary)
    # At least float16's tolerance, even for a float32 cache: on CUDA, kernels picked by batch size (TF32
    # convolutions) differ in the last bits, while dropout or batch statistics move logits far more.
    from kdpipe.verify import tolerance
    tol = tolerance({"logits": {"dtype": "float16"},
                     "dump": {"amp": amp, "autocast_dtype": str(AMP_DTYPE).removeprefix("torch.") if amp else None}})
    unstable = check_teacher_stable(first, probe(min(batch_size, len(sel)) // 2 or 2), *tol)  # 2 after batches of 1
    likelier = None
    if stop is None and norm["source"] != "checkpoint" and len(in_shape) == 3:
        step = max(1, max(data.images.shape[2:]) // 64)  # every step-th pixel: 256 photos of 288 px took 0.5 GB
        pixels = np.asarray(data.images[sel, :, ::step, ::step], dtype=np.float32) / 255.0  # the probe's samples
        stats = pixels.mean(axis=(0, 2, 3)), pixels.std(axis=(0, 2, 3)).clip(min=1e-3)

        def probe_as(m, s, k):  # 3 values for grey images: fed to the RGB teacher as Grayscale(3) + Normalize
            rgb = len(m) != data.image_shape[0]
            teacher.set_grey_to_rgb({"mean": m, "std": s} if rgb else None)
            try:
                return probe(batch_size, sel[:k], [0.0] if rgb else m, [1.0] if rgb else s)
            finally:
                teacher.set_grey_to_rgb(norm.get("grey_to_rgb"))

        likelier = check_normalization(probe_as, first, labels[sel], norm, stats,
                                       "training samples" if data.split == "train" else f"{data.split} samples",
                                       rgb=teacher.repeats_grey)
    for reason in (stop, unstable, likelier):
        if reason is None:
            continue
        if not force:
            raise KDPipeError(reason)
        log(f"warning (--force): {reason}")

    try:  # OUT stays locked (OUT/.lock, rank 0's) from its check to the manifest: one dump at a time
        finished = writer.open()
        if finished is not None:
            return finished
        todo = writer.resume()
        todo_rows = sum(writer.plan[i][1] - writer.plan[i][0] for i in todo)
        prog = Progress("dump-logits" + (f" (rank 0 of {world})" if world > 1 else ""), todo_rows, "rows",
                        stream=ctx.progress_stream)
        autocast = torch.autocast(device.type, dtype=AMP_DTYPE) if amp else torch.autocast(device.type, enabled=False)
        from contextlib import nullcontext

        from kdpipe.features import FeatureTap, hook_root
        tap = FeatureTap(hook_root(teacher_mod, teacher.kind), [f["layer"] for f in feats]) if feats else nullcontext()
        t_start = time.perf_counter()
        with writer.writing(), tap:
            for i in todo:
                s, e = writer.plan[i]
                rows = np.arange(s, e, dtype=np.int64)
                vidx = (rows // n).astype(np.int32)
                sidx = rows % n
                vparams = np.empty((e - s, len(policy.columns)), dtype=np.int32)
                pparams = np.empty_like(vparams) if policy.mixer is not None else None  # the partners' rows
                for k in np.unique(vidx):
                    sel = vidx == k
                    vparams[sel] = view_params(int(k))[sidx[sel]]
                    if pparams is not None:
                        pparams[sel] = policy.partner_params(view_params(int(k)), vparams[sel])
                # The shard's logits stay on the device until the shard is done: one copy and one wait per
                # shard, not per batch (indices and view parameters go up once per shard too).
                with torch.no_grad():
                    dev_sidx = torch.from_numpy(sidx).to(device)
                    dev_params = torch.from_numpy(vparams).to(device)
                    dev_pparams = None if pparams is None else torch.from_numpy(pparams).to(device)
                    lg_dev = torch.empty((e - s, data.num_classes), dtype=torch.float32, device=device)
                    # features go to float16 on the device (an overflow becomes inf, which the writer refuses)
                    ft_dev = {f["layer"]: torch.empty((e - s, *f["shape"]), dtype=torch.float16, device=device)
                              for f in feats}
                    for b in range(0, e - s, batch_size):
                        bi = dev_sidx[b:b + batch_size]
                        x = policy.replay_rows(images, bi, dev_params[b:b + batch_size], mean, std,
                                               None if dev_pparams is None else dev_pparams[b:b + batch_size])
                        if use_channels_last:
                            x = channels_last(x)
                        with autocast:
                            lg_dev[b:b + len(bi)] = teacher_mod(x).float()
                        if feats:
                            for layer, v in tap.take(len(bi)).items():
                                ft_dev[layer][b:b + len(bi)] = v.to(torch.float16)
                        prog.update(len(bi))
                    lg = lg_dev.cpu().numpy()
                    ft = {fmt.feature_column(f["layer"], f["shape"]).name: ft_dev[f["layer"]].cpu().numpy()
                          for f in feats}
                # The writer refuses logits its dtype cannot hold, then writes the shard in the background
                # while the teacher computes the next one.
                writer.put(i, {"logits": lg, "sample_index": sidx, "view_index": vidx, "labels": labels[sidx],
                               "view_params": vparams, **ft})
        compute_s = time.perf_counter() - t_start
        if device.type == "cuda":
            torch.cuda.synchronize()

        done = writer.collect(todo_rows, compute_s)
        if done is None:  # not rank 0: rank 0 writes the manifest
            return {"rank": rank, "rows": todo_rows, "wall_s": compute_s}

        # Teacher top-1 on its views (counted shard by shard) and on the clean test split (kept for agreement).
        rows_computed, compute_s = done["rows_computed"], done["compute_wall_s"]
        summary = {"rows": writer.rows, "views_top1": done["views_top1"], "batch_size": batch_size,
                   "device": str(device), "device_type": device.type, "amp": amp,
                   "autocast_dtype": str(AMP_DTYPE).removeprefix("torch.") if amp else None,
                   "channels_last": use_channels_last, "rows_computed": rows_computed, "compute_wall_s": compute_s,
                   "rows_per_s": rows_computed / compute_s if compute_s > 0 else None, "world_size": world}
        eval_entry = None
        if test is not None:
            if test.num_classes != data.num_classes or test.image_shape != data.image_shape:
                raise KDPipeError("the test split's classes or image shape differ from the dumped split's")
            tp = torch.from_numpy(eval_params(policy, test.image_shape, len(test))).to(device)
            timg = images_tensor(test.images, device)
            tl = predict(teacher_mod, timg, policy, tp, mean, std, batch_size=batch_size, amp=amp).cpu().numpy()
            summary["test_top1"] = top1(tl, test.labels)
            eval_entry = writer.write_eval({"test_logits": tl, "test_labels": test.labels}, test.identity())
        teacher_cpu = teacher.module.to("cpu")
        teacher_info = {**teacher.identity(), "image_shape": list(in_shape),
                        "parameters": count_parameters(teacher_cpu),
                        "file_bytes": Path(teacher.file).stat().st_size,
                        "test_top1": summary.get("test_top1"), "cpu_latency_ms": cpu_latency_ms(teacher_cpu, in_shape),
                        # where: the report sets it beside students' latencies, which train-student measured
                        "cpu_latency_on": cpu_name()}
        m = writer.write_manifest({
            "teacher": teacher_info, "teachers": [{"name": "teacher", "logits_dataset": fmt.SHARD_COLUMNS[
                                                       "logits" if codec_ident is None else "logits_topk_values"].path,
                                                       **teacher_info}],
            # workdir: a relative --data path is read from there by stage two run in another folder (--like: CACHE's)
            "dataset": {**data.identity(), "source": data.source,
                        "workdir": getattr(data, "workdir", None) or os.getcwd()},
            "views": {**policy.identity(), "seed": int(seed), "K": int(views)},
            "num_classes": data.num_classes, "input": {**ident["input"], "shape": list(in_shape)},
            "dump": summary}, eval_entry)
        return {**summary, "bytes": m["bytes"], "out": str(out_dir), "resumed_shards": len(writer.kept)}
    finally:
        writer.release()
