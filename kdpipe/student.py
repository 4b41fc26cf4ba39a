"""Stage two: train students from a cache (and, for comparison, with the teacher online)."""

from __future__ import annotations

import csv
import functools
import io
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import kdpipe
from kdpipe import KDPipeError
from kdpipe.cache.reader import Cache
from kdpipe.cache.writer import atomic_write_bytes, atomic_write_json
from kdpipe.checkpoint import save_checkpoint
from kdpipe.data import KINDS, SOURCES, ImageData, check_splits, limited, load_dataset, moved_spec, resize_mode
from kdpipe.distributed import SINGLE, Dist
from kdpipe.engine import (OptimConfig, Run, build_run, make_optimizer, predict, sample_unit, steps_per_epoch, train_pass,
                           warmup_note)
from kdpipe.ensemble import cache_dirs_list, ensemble_tag, open_caches
from kdpipe.features import plain
from kdpipe.evaluate import agreement, cpu_latency_ms, cpu_name, eval_params, top1
from kdpipe.cache import format as fmt
from kdpipe.losses import Outputs, TopKTargets, create_loss
from kdpipe.models import check_model, count_parameters, create_model, model_recipe
from kdpipe.resume import (DEFAULT_EVERY_MINUTES, PassCheckpoint, RunLocks, plan_runs_dir,
                           remove_finished_checkpoints)
from kdpipe.sweep import check_warmup, names_before, parse_loss, plan_sweep
from kdpipe.util import ensure_out_dir, images_tensor, rng_states, seeded_generator
from kdpipe.views import policy_from_identity


def load_cache_data(cache: Cache, data_root=None, data_spec: str | None = None) -> tuple[ImageData, ImageData | None]:
    """The train split the cache was dumped from (checked) and its test split (for evaluation).

    Moved data: `data_spec` (--data SPEC) replaces the spec the manifest records; `data_root`
    (--data-root DIR) is where a path source (imagefolder:, files:, csv:, npz:) lies now, or the folder of
    the other sources. Either way the fingerprint check refuses a dataset that is not the cache's.
    """
    d = cache.manifest["dataset"]
    spec, root, src = _data_where(cache, data_root, data_spec)
    kind = d.get("kind", "dense")
    if kind not in KINDS:
        raise KDPipeError(f"the cache's data is of kind {kind!r}, which this version cannot load "
                          f"(it knows {', '.join(KINDS)}): upgrade kdpipe")
    size = d.get("image_size")  # photos: decoded the same way as in stage one, without asking again
    resize = resize_mode(d)  # and by the same resize (crop or squash)
    try:
        train = limited(load_dataset(spec, d["split"], root, size, resize), d.get("limit"),
                        d.get("limit_sampled", False))
    except KDPipeError as e:
        arg = spec.partition(":")[2]
        gone = Path(arg).expanduser() if src is not None and src.path else Path(root) if root else None
        if data_root is None and data_spec is None and gone is not None and not gone.exists():
            raise KDPipeError(f"{e} (if the cache's data moved, pass --data-root DIR or --data SPEC "
                              "to say where it is now)") from None
        raise
    cache.check_dataset(train)
    if train.kind != kind:
        raise KDPipeError(f"the cache was dumped from {kind} data, {spec} now loads as {train.kind}")
    test = None
    ev = cache.manifest.get("eval")
    if ev:
        test = limited(load_dataset(spec, "test", root, size, resize), ev["dataset"].get("limit"),
                       ev["dataset"].get("limit_sampled", False))
        if test.fingerprint != ev["dataset"]["fingerprint"]:
            raise KDPipeError(f"the test split of {spec} differs from the one the cache's teacher "
                              f"was evaluated on (fingerprint: cache has {ev['dataset']['fingerprint'][:12]}, "
                              f"given {test.fingerprint[:12]})")
    return train, test


def _data_where(cache: Cache, data_root=None, data_spec: str | None = None):
    """(spec, data root, Source) of the cache's dataset where it lies now (see load_cache_data)."""
    d = cache.manifest["dataset"]
    kind, _, arg = d["spec"].partition(":")
    src = SOURCES.get(kind.lower())
    builtin = src is not None and not src.path  # finds its files in a folder, which the manifest records
    spec = data_spec or moved_spec(d["spec"], data_root)
    root = data_root
    if root is None and builtin and not data_spec:
        root = _from_dump_folder(d, d.get("source"))
    if data_root is None and data_spec is None and src is not None and src.path and arg:
        spec = f"{kind}:{_from_dump_folder(d, arg)}"
    return spec, root, src


def _from_dump_folder(d: dict, path):
    """A relative `path` the manifest's dataset records (`--data imagefolder:photos`), read from the folder the dump
    ran in (the manifest's `workdir`) where it is not there from this one: stage two run from another folder said
    the data had moved. The path as recorded where it is there, where the dump's folder is not recorded, or where
    the data is not found there either (the moved-data message then names it as the dump gave it)."""
    if not path or not d.get("workdir"):
        return path
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or not (Path(d["workdir"]) / p).exists():
        return path
    return str(Path(d["workdir"]) / p)


def load_validation_split(cache: Cache, train: ImageData, test: ImageData | None, data_root=None,
                          data_spec: str | None = None) -> ImageData:
    """The data source's own validation split (--val-split: Food-11's validation/, imagefolder's val/, a CSV's
    val rows, an npz's x_val), decoded as the cache's data was (the manifest's image size and resize; `limit` samples
    where the cache's data was limited, drawn as --limit draws from each split) and checked against the train
    split (classes, shape). A source without one is refused by its loader, in one line; so is a validation
    split that holds the same data as the test split (selecting on it would select on the test set)."""
    spec, root, _ = _data_where(cache, data_root, data_spec)
    d = cache.manifest["dataset"]
    val = limited(load_dataset(spec, "val", root, d.get("image_size"), resize_mode(d)), d.get("limit"),
                  d.get("limit_sampled", False))
    check_splits(train, val)
    if val.fingerprint in (train.fingerprint, test.fingerprint if test is not None else None):
        same = "train" if val.fingerprint == train.fingerprint else "test"
        raise KDPipeError(f"{spec}: the validation split holds the same data as the {same} split: give the data a "
                          "validation split of its own, or use --val-fraction F")
    return val


def check_split_use(cache: Cache, allow_test_split: bool) -> None:
    """Refuse to train on a cache dumped from the test split unless told to."""
    d = cache.manifest["dataset"]
    if d["split"] != "train" and not allow_test_split:
        raise KDPipeError(f"cache {cache.path} was dumped from the {d['split']} split of {d['spec']}: training a "
                          "student on it leaks the test set into the student; dump --split train, or pass "
                          "--allow-test-split if that is what you want")


def _signed(a: np.ndarray) -> np.ndarray:
    """Unsigned integer columns (a top-k cache's uint16 classes) as int64, which torch indexes with."""
    return a.astype(np.int64) if a.dtype.kind == "u" else a


def check_codec_use(cache: Cache, losses) -> None:
    """Refuse, in one line, a loss that cannot train from the cache's targets: from a top-k cache, a loss
    that needs dense logits (every one but those with `topk`), or a temperature the dump did not declare."""
    lg = cache.manifest["logits"]
    if lg["codec"] != "topk":
        return
    from kdpipe.losses import topk_losses
    for loss in losses:
        if not loss.needs_teacher:
            continue
        if not loss.topk:
            able = ", ".join(topk_losses())
            raise KDPipeError(f"loss {loss.name} needs every teacher logit, and cache {cache.path} holds only the top "
                              f"{lg['k']} (codec {fmt.describe_codec(lg)}): use a loss that takes top-k targets "
                              f"({able}), or a cache dumped with --codec raw")
        for m in loss.members:
            if fmt.declared_temperature(lg, m["temperature"]) is None:
                raise KDPipeError(f"temperature {m['temperature']:g} was not declared when cache {cache.path} was "
                                  f"dumped (codec {fmt.describe_codec(lg)}): train at one of "
                                  f"{', '.join(f'{t:g}' for t in lg['temperatures'])}, or dump again with it in "
                                  "--temperatures")


class CachedViews:
    """The engine's view source over a cache (engine.ViewSource): for an epoch, view e mod K's replay
    parameters and teacher logits, on the device, read as contiguous slices of the memory maps.
    With `rows` (a distributed rank's sample indices) only those rows are read, placed at their index.
    `logits=False` reads the parameters only (an online teacher computes the logits). From a cache of
    the top-k codec the epoch's targets are a kdpipe.losses.TopKTargets instead of dense logits. `features` (a
    cached feature column, features/<layer>): the epoch's targets are then logits with features (WithFeatures)."""

    def __init__(self, cache: Cache, device, logits: bool = True, policy=None, features: str | None = None):
        self.cache, self.device, self.logits, self.policy = cache, device, logits, policy
        self.features = features if logits else None
        self.n = cache.num_samples
        self.drawn = policy_from_identity(cache.manifest["views"])  # what the stored parameters must be views of
        self.data_shape = (self.n, *cache.manifest["dataset"]["image_shape"])

    def __call__(self, epoch: int, rows: torch.Tensor | None = None):
        cache, device, n = self.cache, self.device, self.n
        v = epoch % cache.num_views
        if rows is None:
            params = torch.from_numpy(self._in_range(cache.read_view(v, "view_params"), v * n, v)).to(device)
            logits = self._targets(lambda name: _signed(cache.read_view(v, name)), v) if self.logits else None
            if self.features:
                return params, WithFeatures(logits, torch.from_numpy(cache.read_view(v, self.features)).to(device))
            return params, logits
        share = torch.unique(rows)
        at = (v * n + share.cpu().numpy()).astype(np.int64)
        params = torch.zeros((n, len(cache.columns)), dtype=torch.int32, device=device)
        if cache.columns:
            params[share] = torch.from_numpy(self._in_range(cache.read_rows("view_params", at), at, v)).to(device)
            partners = None if self.policy is None else self.policy.partners(params[share])
            if partners is not None:  # mixed views replay their partners' views too
                extra = np.setdiff1d(partners.clamp(min=0).cpu().numpy(), share.cpu().numpy())
                if len(extra):
                    rows = (v * n + extra).astype(np.int64)
                    params[torch.from_numpy(extra).to(device)] = torch.from_numpy(
                        self._in_range(cache.read_rows("view_params", rows), rows, v)).to(device)
        logits = None
        if self.logits:
            def read(name):
                part = torch.from_numpy(_signed(cache.read_rows(name, at))).to(device)
                full = torch.zeros((n, *part.shape[1:]), dtype=part.dtype, device=device)
                full[share] = part
                return full
            logits = self._targets(read, v)
            if self.features:
                return params, WithFeatures(logits, read(self.features))
        return params, logits

    def _targets(self, read, v: int):
        """The epoch's teacher targets from read(column) (rows in sample order) of view v: the logits tensor,
        or for the top-k codec a TopKTargets."""
        lg = self.cache.manifest["logits"]
        if lg["codec"] != "topk":
            return self._finite(torch.as_tensor(read("logits"), device=self.device), v)
        values, indices, rest = (torch.as_tensor(read(name), device=self.device) for name in fmt.TOPK_COLUMNS)
        self._finite(values, v)
        return TopKTargets(values, indices.long(), rest,
                           torch.tensor(lg["temperatures"], dtype=torch.float32, device=self.device),
                           tuple(float(t) for t in lg["temperatures"]), self.cache.num_classes)

    def _finite(self, logits: torch.Tensor, v: int) -> torch.Tensor:
        """`logits` (view v's rows, in sample order), refused when some are NaN or Inf: a dump never writes
        those (its writer refuses them), so the shards changed since (stage two does not re-hash them), and
        training on them would only end in a loss of NaN, blamed on the learning rate."""
        bad = ~torch.isfinite(logits).all(1)
        if not bool(bad.any()):
            return logits
        rows = (v * self.n + bad.nonzero().flatten().cpu().numpy()).tolist()
        raise self._damaged("NaN or Inf teacher logits", rows, v)

    def _in_range(self, params: np.ndarray, rows, v: int) -> np.ndarray:
        """`params` of cache rows `rows` (their numbers, or the first one's of a view's rows in sample order),
        refused when some lie outside what the cache's view ops draw (ViewPolicy.outside): damage since the dump
        (stage two does not re-hash the shards), which would crash the replay (a crop's shift beyond the padding,
        a partner beyond the samples) or quietly replay a view no teacher saw (a rotation beyond the spec's)."""
        bad = np.flatnonzero(self.drawn.outside(params, self.data_shape))
        if not len(bad):
            return params
        rows = (rows + bad if np.isscalar(rows) else np.asarray(rows)[bad]).tolist()
        raise self._damaged(f"view parameters that its views ({self.drawn.spec}) never draw", rows, v)

    def _damaged(self, what: str, rows: list, v: int) -> KDPipeError:
        """The one-line refusal of a cache whose rows `rows` of view v hold `what`, which a dump never writes."""
        cache = self.cache
        shards = sorted({s["file"] for s in cache.manifest["shards"] for r in rows
                         if s["row_start"] <= r < s["row_stop"]})
        return KDPipeError(f"cache {cache.path} holds {what} in {len(rows)} row(s) of view {v} "
                           f"(rows {', '.join(map(str, rows[:5]))}{', ...' if len(rows) > 5 else ''} in "
                           f"{', '.join(shards)}), which a dump never writes: the cache is damaged; run kdpipe "
                           f"verify-cache {cache.path} and repair it as it says")


class WithFeatures:
    """An epoch's teacher targets with cached features (engine.teacher_rows): a batch's rows are
    Outputs(logits, features), both float32; losses take what they use (kdpipe.losses.Outputs)."""

    def __init__(self, logits: torch.Tensor, features: torch.Tensor):
        self.logits, self.features = logits, features

    def rows(self, idx):
        lg = self.logits.rows(idx) if hasattr(self.logits, "rows") else self.logits[idx].float()  # TopKTargets
        return Outputs(lg, self.features[idx].float())


def hint_feature(cache: Cache, given: str | None, option: str = "--hint-feature LAYER") -> dict:
    """The cached feature a hint loss distils from (the manifest's features entry): the one given
    (`option`, --hint-feature LAYER), or the cache's only one."""
    feats = cache.manifest.get("features", [])
    if not feats:
        raise KDPipeError(f"cache {cache.path} holds no features, which a hint loss needs: dump it with "
                          "--features LAYER")
    layers = [f["layer"] for f in feats]
    if given is None:
        if len(feats) > 1:
            raise KDPipeError(f"cache {cache.path} holds several features ({', '.join(layers)}): say which one the "
                              f"hint uses with {option}")
        return feats[0]
    if given not in layers:
        raise KDPipeError(f"cache {cache.path} has no feature {given!r}; it holds: {', '.join(layers)}")
    return feats[layers.index(given)]


PROJECTOR_SEED = 20150218  # with a run's seed, the seed of its hint projector's initial weights


def with_projector(r: Run, hint: dict, in_shape, device, total_steps: int, epoch_steps: int) -> dict:
    """Give run r a hint projector (kdpipe.features.HintStudent) from its layer hint["student_layer"] to the
    cached feature's shape, and rebuild its optimizer and schedule over both. Returns the run's hint record."""
    from kdpipe.features import HintStudent, layer_shape, make_projector
    layer = hint["student_layer"]
    shape = layer_shape(r.model, layer, in_shape, device)
    # drawn from the run's seed alone: from the global RNG, it depended on the runs built before it in the pass, so the
    # same run began from another projector when a sweep gave it company
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeded_generator(r.seed, PROJECTOR_SEED).initial_seed())
        proj = make_projector(shape, hint["teacher_shape"], layer, hint["teacher_feature"])
    proj = proj.to(device)
    r.model = HintStudent(r.model, layer, proj)
    r.optimizer, r.scheduler, r.warmup_steps = make_optimizer(r.model, r.optim, total_steps, epoch_steps)
    return {**hint, "student_shape": list(shape), "projector": repr(proj).replace("\n", "")}


def clean_test_logits(model, test: ImageData, policy, mean, std, device, amp: bool = False) -> torch.Tensor:
    """A model's logits (on the CPU) on the clean test split, as stage two evaluates every student."""
    timg = images_tensor(test.images, device)
    tp = torch.from_numpy(eval_params(policy, test.image_shape, len(test))).to(device)
    return predict(model, timg, policy, tp, mean, std, amp=amp).cpu()


# Warn from this many epochs per view. Measured on CIFAR-10 (DESIGN.md, "Stage two"): one fixed view
# (K = 1) trained students worse than no teacher at all, K = E/6 lost about half a point, K close to E
# matched online KD.
VIEW_REUSE_WARN = 2.0


def views_warning(epochs: int, k: int) -> str | None:
    """The warning stage two gives when each of the cache's K views is reused epochs / K >= 2 times."""
    if epochs / k < VIEW_REUSE_WARN:
        return None
    return (f"warning: {epochs} epochs over K = {k} views: each view is seen {epochs / k:.1f} times, and too few "
            f"views overfit. Measured on CIFAR-10: one fixed view per sample (K = 1) trained students worse than "
            f"no teacher at all, K = epochs/6 lost about half a point, K close to the epochs matched online KD. "
            f"Dump with --views {epochs} to match the epochs")


TRAINING_SUBSET_SEED = 20150309  # --train-samples' subset: fixed, so every run and seed sees the same samples


def training_subset(rows: np.ndarray, size: int) -> np.ndarray:
    """The sample indices --train-samples trains on, sorted: the first `size` of a permutation of `rows` (the
    samples not held out for validation) drawn from a fixed seed (a larger size keeps the smaller one's)."""
    return np.sort(rows[np.random.default_rng(TRAINING_SUBSET_SEED).permutation(len(rows))[:size]])


def _releasing_run_locks(train):
    """train_students holds a lock on each run it may train (kdpipe.resume.RunLocks), released however it ends."""
    @functools.wraps(train)
    def wrapper(*args, **kwargs):
        locks = RunLocks(kwargs.get("log", print))
        try:
            return train(*args, locks=locks, **kwargs)
        finally:
            locks.release()
    return wrapper


class Results(list):
    """train_students' metrics, one per run (finished runs it skipped first); ``skipped`` counts those."""
    skipped = 0


@_releasing_run_locks
def train_students(cache_dir, students: list[str], epochs: int, out, *, loss: str = "kd", temperatures=(),
                   alphas=(), seeds=(0,), batch_size: int = 128, optim: OptimConfig | None = None,
                   device=torch.device("cpu"), data_root=None, amp: bool = False,
                   online_teacher=None, dist=None, log=print, fuse: bool | str | None = None,
                   data_spec: str | None = None, allow_test_split: bool = False,
                   arch_args: dict | None = None, lrs=(), val_fraction: float = 0.0, train_samples: int | None = None,
                   overwrite: bool = False, checkpoint_every: float = DEFAULT_EVERY_MINUTES,
                   keep_checkpoints: bool = False, val_split: bool = False, teacher_weights=None,
                   locks: RunLocks | None = None, hint_layer: str | None = None,
                   hint_feature_name: str | None = None) -> list[dict]:
    """Train every (student, T, alpha, seed) from the cache; write RUNS/<name>/{student.pt, metrics.json,
    config.json}. `students` are kdpipe.models specs; `arch_args` (--arch-args) go to every one of them.
    Runs with the same seed share one pass over the data (one read and replay per batch).

    `optim` gives the optimizer and schedule; `lrs`, when given, is a sweep axis over its learning rate.
    `val_fraction` > 0 holds that share of the cache's samples out of training (validation_rows: the same
    rows for every run and seed); each epoch then evaluates every run on them, and each run keeps its best
    epoch's weights (student-best.pt) besides the last (student.pt). `val_split` instead picks the best epoch
    on the data source's own validation split (load_validation_split), which is never trained on: every
    training sample of the cache is trained on, and the validation split's fingerprint is part of each run's
    settings (config.json), so a rerun or resume with other validation data is refused by name. Every epoch
    also evaluates on the test split: metrics.json's "history" and history.csv hold, per epoch, the loss
    terms, train top-1 (on the views stepped on), validation and test top-1 and agreement with the teacher
    on the test split.

    `loss` is a spec, NAME[:OPTION=VALUE,...] (kdpipe.sweep.parse_loss, kdpipe.losses); T and alpha are
    its temperature and alpha, swept; empty `temperatures` or `alphas`: the loss's default (kd: 4, 0.9).

    With `online_teacher` (a module), the teacher runs in every step on the same replayed views
    instead of the cached logits (for comparisons; the cache still supplies the view parameters).

    `train_samples` N: every run trains on the same N samples (the first N of a permutation drawn from a fixed
    seed, whatever the runs' seeds), each with its cached views: scratch runs see N labels, KD runs N labels
    and the teacher's logits of the same views (Hinton et al. 2015, section 5: soft targets as a regularizer
    when labelled data is scarce).

    `fuse` (see engine.train_pass): runs of one architecture in a pass step as one vmapped network
    (True, or "compile" under torch.compile), or one by one (False); None picks what was measured fastest.

    With `dist` (kdpipe.distributed.Dist from torchrun, world > 1) every run is DistributedDataParallel:
    `batch_size` is per rank (the effective batch is batch_size x world; the learning rate is used as
    given), each rank reads only its share of every epoch's rows, and rank 0 alone writes the runs'
    files and returns their metrics (the other ranks return []).

    `data_root` / `data_spec`: where the cache's data lies now (load_cache_data). A cache of the test
    split is refused unless `allow_test_split`.

    Crashes (kdpipe.resume): each pass writes a checkpoint at the end of every epoch and every
    `checkpoint_every` minutes (0: only at epoch ends), removed when the pass ends unless
    `keep_checkpoints`. Called again with the same arguments, it returns the metrics of finished runs
    without training them and resumes the others from their checkpoint; a run directory holding a run with
    other settings is refused unless `overwrite` (which starts that run over). A run that another command
    is training at the same time is refused (RUN/.lock, kdpipe.resume.RunLocks).

    Ensembles (kdpipe.ensemble): `cache_dir` may be a list of caches of the same views; the runs then train
    against their teachers' probabilities at T, mixed with `teacher_weights` (default: equal).

    A loss with a feature term (``kd+hint``, ``kd:1,hint:50``; kdpipe.losses.HintLoss) needs a cache with
    features (dump-logits --features) and `hint_layer`, the student's module path whose output a learned
    projector (kdpipe.features) maps onto the cached feature `hint_feature_name` (needed when the cache holds
    several). The projector trains in the run's optimizer, is in its checkpoints, is saved as the run's
    projector.pt and is not part of student.pt. Such runs step unfused.
    """
    ctx = dist or SINGLE
    world = ctx.world
    if world > 1 and fuse:  # asked for, and DDP wraps each run's own model: said, not dropped without a word
        log(f"--fuse {'compile' if fuse == 'compile' else 'on'}: under torchrun every run is its own "
            "DistributedDataParallel model, so the runs step one by one")
        fuse = False
    optim = optim or OptimConfig()
    if epochs <= 0:
        raise KDPipeError(f"--epochs must be >= 1, got {epochs}")
    if batch_size <= 0:
        raise KDPipeError(f"--batch-size must be >= 1, got {batch_size}")
    check_warmup(optim.warmup_epochs, epochs)
    if not students:
        raise KDPipeError("give at least one --student")
    loss_name, loss_options = parse_loss(loss)
    training = {k: v for k, v in optim.settings().items() if k != "lr"}
    ens_tag = ensemble_tag(len(cache_dirs_list(cache_dir)), teacher_weights)  # "" for one cache
    planned = plan_sweep(students, temperatures, alphas, seeds, loss_name, loss_options, list(lrs) or [optim.lr],
                         epochs, batch_size, val_fraction=val_fraction, train_samples=train_samples,
                         val_split=val_split, extra_tag=ens_tag, arch_args=arch_args, **training)
    losses = {name: create_loss(loss_name, **loss_options, **{k: v for k, v in zip(("temperature", "alpha"), p[1:3])
                                                               if v is not None})
              for name, p, _ in planned}  # bad options fail here, before any training
    hinted = any(x.needs_features for x in losses.values())
    if not all(x.trains_logits for x in losses.values()):
        raise KDPipeError(f"--loss {loss} trains only the student's features, never its logits: the student would not "
                          "learn to classify; compose it with a loss on the logits, e.g. --loss kd+hint")
    if hinted and online_teacher is not None:
        raise KDPipeError(f"--loss {loss} distils cached features: it cannot run with an online teacher")
    if hinted and not hint_layer:
        raise KDPipeError(f"--loss {loss} needs --hint-layer MODULE: the student's layer (its path in "
                          "named_modules(), e.g. features.3) that the projector maps onto the teacher's features")
    if not hinted and (hint_layer or hint_feature_name):
        raise KDPipeError(f"--hint-layer and --hint-feature go with a loss that has a hint term (e.g. kd+hint), "
                          f"not --loss {loss}")
    if fuse is not False and not all(x.fusable for x in losses.values()):
        if fuse or device.type == "cuda":  # asked for, or what auto would pick on a GPU
            log(f"--loss {loss}: its runs step unfused (a composed or hint loss has no fused form)")
        fuse = False
    with ctx.together("opening the cache"):
        cache, ensemble = open_caches(cache_dir, teacher_weights)
        m = cache.manifest
        if ensemble is not None and online_teacher is not None:
            raise KDPipeError("an online teacher and an ensemble of caches exclude each other: give one cache")
        if ensemble is not None and hinted:
            raise KDPipeError(f"--loss {loss} distils one cache's features: give one --cache, not an ensemble")
        check_split_use(cache, allow_test_split)
        if online_teacher is None:
            check_codec_use(cache, losses.values())
        policy = policy_from_identity(m["views"])
        train, test = load_cache_data(cache, data_root, data_spec)
        val = load_validation_split(cache, train, test, data_root, data_spec) if val_split else None
        in_shape = tuple(m["input"]["shape"])
        for arch in students:  # fail on a bad name, or a model that returns no logits, before any training
            check_model(arch, cache.num_classes, in_shape, arch_args)
        hint = None
        if hinted:
            feat = hint_feature(cache, hint_feature_name)
            hint = {"student_layer": hint_layer, "teacher_feature": feat["layer"],
                    "teacher_shape": list(feat["shape"])}
            for arch in students:  # an unknown layer or shapes without a projector fail before any training
                from kdpipe.features import layer_shape, make_projector
                model = create_model(arch, cache.num_classes, in_shape, arch_args)
                make_projector(layer_shape(model, hint_layer, in_shape, torch.device("cpu")), feat["shape"],
                               hint_layer, feat["layer"])
        out = ensure_out_dir(out, "runs directory") if ctx.is_main else Path(out)
    # per-node copies of a cache are fine; different caches are not
    ids = ctx.all_gather(m["cache_id"] if ensemble is None else ensemble.identity())
    if len(set(ids)) > 1:
        raise KDPipeError("the ranks opened different caches (" + ", ".join(f"rank {r}: id {i[:12]}" for r, i in
                          enumerate(ids)) + "): every rank must read the same cache")
    k = cache.num_views
    warning = views_warning(epochs, k) if policy.is_random else None  # --policy none: all views are one
    if warning:
        log(warning)
    mean, std = m["input"]["mean"], m["input"]["std"]
    images = images_tensor(train.images, device)
    labels = torch.from_numpy(train.labels).to(device)
    n = len(train)
    val_rows = validation_rows(n, val_fraction)
    train_rows = None
    if len(val_rows):
        keep = np.ones(n, dtype=bool)
        keep[val_rows] = False
        train_rows = torch.from_numpy(np.flatnonzero(keep))
        log(f"validation: {len(val_rows)} of {n} samples ({val_fraction:g}) held out of training; each run keeps "
            "its best epoch by validation top-1")
    if val is not None:
        log(f"validation: the data's own validation split, {len(val)} samples of {val.spec} (not trained on); each "
            "run keeps its best epoch by validation top-1")
    n_train = n - len(val_rows)
    if n_train < 1:
        raise KDPipeError(f"--val-fraction {val_fraction:g} leaves no training samples: lower it")
    if train_samples is not None:
        if not 1 <= train_samples <= n_train:
            raise KDPipeError(f"--train-samples must be between 1 and the {n_train} samples the cache has for "
                              f"training, got {train_samples}")
        rows = np.arange(n) if train_rows is None else train_rows.numpy()
        train_rows = torch.from_numpy(training_subset(rows, train_samples))
        n_train = train_samples
        log(f"training on {n_train} of the cache's {n} samples (a fixed subset, the same for every run)")
    if policy.mixer is not None and train_rows is not None:
        # the partners were drawn at the dump from every sample: rows kept out still reach training through them
        log(f"warning: the cache's views mix each sample with a partner drawn from all {n} samples "
            f"({policy.mixer.name}), so the samples left out of training (--val-fraction, --train-samples) reach "
            "it as partners, their images and labels mixed in: "
            + ("validation top-1 reads high and picks the best epoch less surely; hold out a validation split "
               "of the data's own (--val-split), or use a cache dumped without mixing" if len(val_rows) else
               "the student sees more than the subset's images; use a cache dumped without mixing for a clean "
               "subset"))
    if world > 1 and n_train < batch_size * world:
        raise KDPipeError(f"{n_train} training samples are fewer than one global batch ({batch_size} per rank x "
                          f"{world} ranks): lower --batch-size")
    epoch_steps = steps_per_epoch(n_train, batch_size * world)
    total_steps = epochs * epoch_steps
    for note in dict.fromkeys(warmup_note(OptimConfig.from_settings(st), epoch_steps, total_steps)
                              for _, _, st in planned):
        if note:  # a warm-up too short to warm up: said once per setting
            log(note)
    log(f"batch {batch_size}" + (f" per rank x {world} ranks = effective batch {batch_size * world} "
                                 f"(DistributedDataParallel, {ctx.backend})" if world > 1 else "")
        + f", {optim.optimizer}, peak lr " + ", ".join(sorted({format(st["lr"], "g") for _, _, st in planned}))
        + (" (as given: not scaled with the world size)" if world > 1 else "")
        + f", {total_steps // epochs} steps per epoch")

    view_source = CachedViews(cache, device, logits=online_teacher is None, policy=policy,
                              features=f"features/{hint['teacher_feature']}" if hint else None)
    teacher_test = cache.read_test_logits()
    if ensemble is not None:
        log(f"ensemble of {len(ensemble.caches)} teachers, their probabilities at T mixed: {ensemble.describe()}")
        view_source, teacher_test = ensemble.view_source(device, policy), ensemble.test()
    configs = {name: _run_config(name, p[0], arch_args, losses[name], p[3], cache, epochs, batch_size, world,
                                 OptimConfig.from_settings(st), val_fraction, train_samples, amp, device, val)
               | ({} if ensemble is None else ensemble.config()) for name, p, st in planned}
    for name in configs:
        if losses[name].needs_features:  # a setting: another layer or feature is another run
            configs[name]["hint"] = hint
    _check_ranks_agree(ctx, configs)
    plan = None
    with ctx.together("checking the runs directory"):
        if ctx.is_main:
            if locks is not None:  # another command training one of these runs is refused, before anything changes
                locks.acquire(out, configs)
            older = {name: names_before(name, st, epochs, batch_size, arch_args) for name, _, st in planned}
            plan = plan_runs_dir(out, configs, overwrite, log, older)
    plan = ctx.broadcast(plan)
    results = Results()
    results.skipped = len(plan.finished) if ctx.is_main else 0
    for name, metrics in plan.finished.items():
        log(f"{name}: already finished ({out / name / 'metrics.json'}), skipped")
        if ctx.is_main:
            results.append(metrics)
    # A pass per seed; runs that resume from different checkpoints (or none) go in separate passes.
    passes: dict[tuple, list] = {}
    for name, p, st in planned:
        if name not in plan.finished:
            passes.setdefault((p[3], plan.resume.get(name, "")), []).append((name, p, st))
    evaluate = _Evaluator(images, labels, val_rows, test, teacher_test, policy, mean, std, amp, device, val)
    for (seed, resume_from), group in sorted(passes.items()):
        runs: list[Run] = [build_run(name, p[0], losses[name], p[3], cache.num_classes, in_shape,
                                     OptimConfig.from_settings(st), total_steps, device, arch_args=arch_args,
                                     epoch_steps=epoch_steps)
                           for name, p, st in group]
        hints = {r.name: with_projector(r, hint, in_shape, device, total_steps, epoch_steps)
                 for r in runs if r.loss.needs_features}
        if ctx.rank > 0:  # one init on every rank (the run's seed), then each rank its own dropout masks: every run's
            # stream starts on rank r from (seed, r), as a run alone does, whichever runs share the pass
            torch.manual_seed(seeded_generator(seed, ctx.rank).initial_seed())
            for r in runs:
                r.rng = rng_states(device)
        tracks = {r.name: _Track() for r in runs}
        if ctx.is_main:
            for r in runs:  # config.json at the start: a run directory without metrics.json is unfinished
                atomic_write_json(ensure_out_dir(out / r.name, "run directory") / "config.json", configs[r.name])
        with ctx.together("reading the pass checkpoint"):  # every rank reads it: --out must be shared
            ckpt = PassCheckpoint(out, seed, {r.name: configs[r.name] for r in runs}, epochs, checkpoint_every,
                                  dist=ctx, log=log, resume_from=resume_from or None, tracks=tracks)
            ckpt.restore(runs)
        log(f"training {len(runs)} student run(s) in one pass (seed {seed}) from {cache.path} on {device}"
            + (f" x {world} ranks" if world > 1 else "") + ": " + ", ".join(r.name for r in runs))
        if resume_from:
            e, s = ckpt.position
            log(f"  resuming from {resume_from}: " + (f"epoch {e + 1}/{epochs}, step {s}" if s else
                                                      f"{e}/{epochs} epochs done"))
        t0 = time.perf_counter()
        for r in runs:
            r.model = ctx.wrap(r.model)  # DistributedDataParallel when world > 1

        def on_epoch_end(epoch, runs=runs, tracks=tracks):
            for r in runs:
                tracks[r.name].add(r, epoch, evaluate(plain(ctx.unwrap(r.model)), r.loss))

        with ckpt.holding_interrupts():  # Ctrl-C / SIGTERM: a checkpoint where it stopped, then KeyboardInterrupt
            stats = train_pass(runs, images, labels, policy, mean, std, epochs, batch_size, seed, view_source,
                               online_teacher=online_teacher, amp=amp, label=f"students s{seed}", log=log,
                               dist=ctx, fuse=fuse, train_rows=train_rows, on_epoch_end=on_epoch_end,
                               checkpoint=ckpt)
        for r in runs:
            r.model = ctx.unwrap(r.model)
        if not ctx.is_main:
            continue
        for r in runs:
            results.append(_finish_run(r, cache, tracks[r.name], in_shape, out, stats, epochs, len(runs),
                                       configs[r.name], amp, device, log, world=world, val_rows=val_rows,
                                       val_fraction=val_fraction, train_samples=n_train, val=val, ensemble=ensemble,
                                       ensemble_test=teacher_test if ensemble is not None else None,
                                       hint=hints.get(r.name), test_samples=len(test) if test is not None else None))
        if not keep_checkpoints:
            ckpt.remove()
        unit = sample_unit(images)
        log(f"pass of seed {seed}: {time.perf_counter() - t0:.1f}s, {stats['images_per_s']:,.0f} {unit}/s "
            f"per student, {stats['student_images_per_s']:,.0f} student-{unit}/s in all")
    if ctx.is_main and not keep_checkpoints:
        remove_finished_checkpoints(out, log)
    return results


def _run_config(name, arch, arch_args, loss, seed, cache: Cache, epochs, batch_size, world, optim: OptimConfig,
                val_fraction: float, train_samples: int | None, amp, device, val: ImageData | None = None) -> dict:
    """A run's config.json: its settings (kdpipe.resume.settings) and where it ran. With the data's validation
    split (`val`), its identity (sample count, fingerprint) is a setting: other validation data is other settings."""
    opts = loss.options
    code = model_recipe(arch, arch_args).get("sha256")  # a student of the user's own code: that code, by content
    return {"run": name, "student": arch, "arch_args": arch_args or {},
            **({"student_file_sha256": code} if code else {}), "loss": {"name": loss.name, "options": opts},
            "temperature": opts.get("temperature"), "alpha": opts.get("alpha"), "seed": seed,
            "epochs": epochs, "batch_size": batch_size, "world_size": world,
            "effective_batch_size": batch_size * world, "lr": optim.lr, "optim": asdict(optim),
            "val_fraction": val_fraction, "train_samples": train_samples, "val_split": _val_identity(val),
            "amp": amp, "device": str(device),
            "cache": str(cache.path.resolve()), "cache_id": cache.manifest["cache_id"],
            "view_schedule": "epoch e uses view e mod K", "kdpipe_version": kdpipe.__version__,
            "torch_version": torch.__version__}


def _check_ranks_agree(ctx: Dist, configs: dict) -> None:
    """Refuse, on every rank, runs whose settings differ between the ranks (a node given another --epochs, --lr
    or --alpha): DDP would average gradients of different runs, and rank 0 would write its own settings alone."""
    from kdpipe.cache.writer import differences
    from kdpipe.resume import settings
    plans = ctx.all_gather({name: settings(c) for name, c in configs.items()})
    for r, other in enumerate(plans):
        if other == plans[0]:  # every rank sees the same list, so every rank raises
            continue
        # the runs in planned order, paired: their names hold some settings (the epochs), so name the settings
        pairs = list(zip(plans[0].values(), other.values())) if len(other) == len(plans[0]) else []
        diffs = list(dict.fromkeys(d.replace(" was ", ": rank 0 has ", 1).replace(", now ", f", rank {r} has ", 1)
                                   for a, b in pairs for d in differences(a, b)))
        if not diffs:
            diffs = [f"runs: rank 0 has {', '.join(sorted(plans[0]))}, rank {r} has {', '.join(sorted(other))}"]
        raise KDPipeError(f"rank {r} was given other arguments than rank 0 (" + "; ".join(diffs) + "): every rank "
                          "must run the same train-student command")


def _val_identity(val: ImageData | None) -> dict | None:
    """What a run records of the validation split it selected on (config.json, metrics.json): not its spec,
    which changes when the data moves (--data-root), but what it holds."""
    if val is None:
        return None
    return {"split": val.split, "num_samples": len(val), "fingerprint": val.fingerprint,
            **({"limit": val.limit} if getattr(val, "limit", None) else {})}


VAL_SEED = 20_151_031  # the validation rows depend on this, the number of samples and the fraction only


def validation_rows(n: int, fraction: float) -> np.ndarray:
    """The sorted sample indices held out for validation: round(fraction * n) of them, drawn by a fixed
    seed, so every run, seed and call with this fraction holds out the same rows."""
    if not 0 <= fraction < 1:
        raise KDPipeError(f"--val-fraction must lie in [0, 1), got {fraction}")
    k = int(round(fraction * n))
    if fraction > 0 and k == 0:  # else no run validates, keeps a best epoch or says why
        raise KDPipeError(f"--val-fraction {fraction:g} of the cache's {n} samples holds out none of them: give at "
                          f"least {1 / n:.3g}, or leave --val-fraction out")
    return np.sort(np.random.default_rng(VAL_SEED).permutation(n)[:k]).astype(np.int64)


class _Evaluator:
    """Per epoch: top-1 on the held-out validation rows or the data's validation split `val` (clean view) and on
    the test split, and top-1 agreement with the teacher's test logits."""

    def __init__(self, images, labels, val_rows, test, teacher_test, policy, mean, std, amp, device, val=None):
        self.policy, self.mean, self.std, self.amp = policy, mean, std, amp
        self.val = None
        if val is not None:
            self.val = (images_tensor(val.images, device),
                        torch.from_numpy(eval_params(policy, val.image_shape, len(val))).to(device), val.labels)
        elif len(val_rows):
            idx = torch.from_numpy(val_rows).to(device)
            vimg = images[idx]
            self.val = (vimg, torch.from_numpy(eval_params(policy, tuple(vimg.shape[1:]), len(idx))).to(device),
                        labels[idx].cpu())
        self.test = None
        if test is not None:
            self.test = (images_tensor(test.images, device),
                         torch.from_numpy(eval_params(policy, test.image_shape, len(test))).to(device), test.labels)
        self.teacher_test = teacher_test

    def __call__(self, model, loss=None) -> dict:
        out = {}
        if self.val is not None:
            out["val_top1"] = top1(predict(model, self.val[0], self.policy, self.val[1], self.mean, self.std,
                                           amp=self.amp).cpu(), self.val[2])
        if self.test is not None:
            logits = predict(model, self.test[0], self.policy, self.test[1], self.mean, self.std, amp=self.amp).cpu()
            out["test_top1"] = top1(logits, self.test[2])
            if hasattr(self.teacher_test, "agreements"):  # an ensemble's, at the run's T (kdpipe.ensemble)
                out.update(self.teacher_test.agreements(logits, loss))
            elif self.teacher_test is not None:
                out["teacher_agreement"] = agreement(logits, self.teacher_test)
        return out


class _Track:
    """A run's per-epoch history and, with a validation split, its best epoch and that epoch's weights."""

    def __init__(self):
        self.history: list[dict] = []
        self.best_epoch, self.best_val, self.best_state, self.best_eval = None, None, None, {}

    def add(self, r: Run, epoch: int, ev: dict) -> None:
        row = {"epoch": epoch + 1, "loss": r.history[-1], **{k: v[-1] for k, v in r.terms.items()},
               "train_top1": r.train_top1[-1], **ev, "lr": r.optimizer.param_groups[0]["lr"]}
        self.history.append(row)
        val = ev.get("val_top1")
        # ties: the earlier epoch; never an epoch whose loss or weights are NaN or infinite (a diverged run's
        # argmax of NaN logits still scores the share of class 0, which may beat the epochs before)
        if val is not None and math.isfinite(r.history[-1]) and (self.best_val is None or val > self.best_val):
            model = plain(Dist.unwrap(r.model))  # the student without a hint projector
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            if all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()):
                self.best_epoch, self.best_val, self.best_eval, self.best_state = epoch + 1, val, ev, state

    def state(self) -> dict:
        """What a pass checkpoint keeps of it (kdpipe.resume)."""
        return {"history": list(self.history), "best_epoch": self.best_epoch, "best_val": self.best_val,
                "best_state": self.best_state, "best_eval": dict(self.best_eval)}

    def load(self, state: dict) -> None:
        self.history = list(state["history"])
        self.best_epoch, self.best_val = state["best_epoch"], state["best_val"]
        self.best_state, self.best_eval = state["best_state"], dict(state["best_eval"])

    def csv(self) -> bytes:
        keys = list(dict.fromkeys(k for row in self.history for k in row))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        for row in self.history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        return buf.getvalue().encode()


def _data_record(d: dict) -> dict:
    """What a run's metrics record of its data beside the spec: the fingerprint and how the data was stored (image
    size, resize, --limit), so that the report tells apart runs on one spec decoded otherwise (other test images)."""
    return {"fingerprint": d["fingerprint"], **({"limit": d["limit"]} if d.get("limit") else {}),
            **({"image_size": d["image_size"], "resize": resize_mode(d)} if d.get("image_size") else {})}


def _finish_run(r: Run, cache: Cache, track: _Track, in_shape, out: Path, stats, epochs, runs_in_pass,
                config: dict, amp, device, log, world: int = 1, val_rows=(), val_fraction: float = 0.0,
                train_samples: int | None = None, val: ImageData | None = None, ensemble=None,
                ensemble_test=None, hint: dict | None = None, test_samples: int | None = None) -> dict:
    rdir = ensure_out_dir(out / r.name, "run directory")
    hinted = r.model
    r.model = plain(r.model)  # what the run saves, measures and exports: the student alone
    opts = r.loss.options
    last = track.history[-1] if track.history else {}
    training = {**r.optim.settings(), "val_fraction": val_fraction, "val_split": val is not None,
                "val_samples": len(val) if val is not None else len(val_rows)}
    metrics = {"name": r.name, "arch": r.arch, "loss": {"name": r.loss.name, "options": opts},
               "temperature": opts.get("temperature"), "alpha": opts.get("alpha"),
               "uses_teacher": r.loss.needs_teacher, "seed": r.seed,
               "parameters": count_parameters(r.model), "epochs": epochs, "train_samples": train_samples,
               "train_loss": r.history, "train_terms": r.terms, "train_top1": r.train_top1,
               "train_s": r.train_s, "train_own_s": r.own_s,
               "train_wall_s": stats["wall_s"], "images_per_s": stats["images_per_s"],
               "runs_in_pass": runs_in_pass, "world_size": world, "batch_size": config["batch_size"],
               "effective_batch_size": config["effective_batch_size"], "lr": r.optim.lr,
               "optimizer": r.optim.optimizer, "schedule": r.optim.schedule, "training": training,
               "cache": {"path": str(cache.path.resolve()), "cache_id": cache.manifest["cache_id"],
                         "views": cache.num_views, "logits_dtype": cache.logits_dtype,
                         "logits_codec": fmt.describe_codec(cache.manifest["logits"])},
               "teacher": cache.manifest["teacher"], "dataset": cache.manifest["dataset"]["spec"],
               "data": _data_record(cache.manifest["dataset"]), "history": track.history}
    if val is not None:
        metrics["val_data"] = {"spec": val.spec, **_val_identity(val)}
    for key in ("test_top1", "teacher_agreement", "val_top1"):
        if key in last:
            metrics[key] = last[key]
    if "test_top1" in last and test_samples:  # the report counts errors out of them (Hinton's 74 of 10,000)
        metrics["test_samples"] = test_samples
    if ensemble is not None:
        metrics.update(ensemble.run_metrics(r.loss, last, ensemble_test))
    diverged = next((e + 1 for e, v in enumerate(r.history) if not math.isfinite(v)), None)
    if diverged is not None:  # a NaN or infinite loss: the weights are not a trained student
        metrics["diverged_epoch"] = diverged
    if hint is not None:  # the projector is saved beside the student, never in it
        from kdpipe.features import PROJECTOR_FILE, save_projector
        size = save_projector(rdir / PROJECTOR_FILE, hinted, hint)
        metrics["hint"] = {**hint, "file": PROJECTOR_FILE, "bytes": size,
                           "projector_parameters": count_parameters(hinted.projector)}
    metrics["cpu_latency_ms"] = cpu_latency_ms(r.model, in_shape)
    metrics["cpu_latency_on"] = cpu_name()  # the CPU and torch's threads: the report says where each latency was taken
    common = dict(arch=r.arch, num_classes=cache.num_classes, image_shape=in_shape,
                  mean=cache.manifest["input"]["mean"], std=cache.manifest["input"]["std"],
                  class_names=cache.manifest["dataset"]["class_names"],
                  dataset={k: v for k, v in cache.manifest["dataset"].items()}, arch_args=r.arch_args)
    # the views' policy, whose clean view is what the student sees at test time (kdpipe compress measures it so)
    view_policy = policy_from_identity(cache.manifest["views"]).identity()
    if track.best_epoch is not None:
        chosen = {"selected_by": "val_top1", "validation": "val_split" if val is not None else "val_fraction"}
        best_model = create_model(r.arch, cache.num_classes, in_shape, r.arch_args)
        best_model.load_state_dict(track.best_state)
        save_checkpoint(rdir / "student-best.pt", best_model, **common, test_top1=track.best_eval.get("test_top1"),
                        extra={"role": "student", "run": r.name, "epoch": track.best_epoch, "view_policy": view_policy,
                               **chosen})
        metrics["best"] = {"epoch": track.best_epoch, "checkpoint": "student-best.pt", **chosen, **track.best_eval}
    metrics["size_bytes"] = save_checkpoint(
        rdir / "student.pt", r.model, **common, test_top1=metrics.get("test_top1"),
        extra={"role": "student", "run": r.name, "epoch": epochs, "view_policy": view_policy})
    atomic_write_json(rdir / "config.json", config)
    atomic_write_bytes(rdir / "history.csv", track.csv())
    atomic_write_json(rdir / "metrics.json", metrics)  # last: its presence marks a finished run
    best = metrics.get("best")
    log(f"  {r.name}: test top-1 {metrics.get('test_top1', float('nan')):.4f}, agreement "
        f"{metrics.get('teacher_agreement', float('nan')):.4f}"
        + (f"; best epoch {best['epoch']} (val top-1 {best['val_top1']:.4f}, test top-1 "
           f"{best.get('test_top1', float('nan')):.4f})" if best else "") + f" -> {rdir}")
    return metrics
