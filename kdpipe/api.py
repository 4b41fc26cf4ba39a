"""kdpipe's public Python API: train students in your own loop from a cache that dump-logits wrote.

    import kdpipe

    data = kdpipe.open_cache("cache/default")           # checks the dataset against the cache
    loss_fn = kdpipe.create_loss("kd", temperature=4, alpha=0.9)
    for epoch in range(epochs):
        for x, teacher_logits, labels in data.epoch(epoch, batch_size=128):
            terms = loss_fn(model(x), teacher_logits, labels, epoch)
            sum(terms.values()).backward()
            ...

The batches come from the code train-student runs, not a copy of it: the view of epoch e (e mod K)
is read as contiguous slices of the shards' memory maps (kdpipe.student.CachedViews), the epoch is
shuffled as kdpipe.engine.batches shuffles it, and each batch is replayed on the device from the
stored view parameters (kdpipe.engine.replay_batch), so `x` is bit for bit the input the teacher saw
for that row. For a cache of mixed views (mixup, cutmix) `labels` is a kdpipe.losses.MixedLabels (both
labels and the stored share of each), which the registry's losses take as they take plain labels.
The README's section "The Python API" is a complete example, run by tests/test_api.py.

Several caches of the same views (dump-logits --like) open as an ensemble: open_cache(["cache/a",
"cache/b"], weights=[0.7, 0.3]) yields, in place of one teacher's logits, a kdpipe.ensemble.EnsembleTargets
(every teacher's rows and the weights), which the registry's losses mix at their temperature as
train-student does (the weighted mean of the teachers' probabilities at T).

For a torch DataLoader over rows instead (worker processes, your own sampler; one cache), see
kdpipe.cache.reader.CachedLogitsDataset.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from kdpipe import KDPipeError
from kdpipe.cache.reader import CachedLogitsDataset
from kdpipe.ensemble import mixture_log_probs, open_caches
from kdpipe.engine import batches, replay_batch, steps_per_epoch
from kdpipe.evaluate import top1
from kdpipe.losses import Loss, create_loss, known_losses
from kdpipe.models import create_model
from kdpipe.student import CachedViews, check_split_use, clean_test_logits, hint_feature, load_cache_data
from kdpipe.util import images_tensor, pick_device, seeded_generator
from kdpipe.views import policy_from_identity

__all__ = ["open_cache", "CacheData", "EpochBatches", "create_loss", "known_losses", "Loss", "create_model",
           "CachedLogitsDataset"]


def open_cache(cache_dir, device="cpu", *, data_root=None, data=None, allow_test_split: bool = False,
               features: str | bool | None = None, weights=None) -> "CacheData":
    """Open a finished cache and the dataset it was dumped from, ready to yield training batches.

    cache_dir: a cache, or a list of caches of the same views (an ensemble: the first is the primary, whose
    input normalization the batches get), weighted by `weights` (one positive weight per cache, summing to
    1; equal if None), as train-student's --cache A --cache B --teacher-weights.
    device: where batches are replayed and returned ("cpu", "cuda", "cuda:1", "auto" or a torch.device).
    data_root / data: where the cache's dataset lies now if it moved (as train-student's --data-root and
    --data); its fingerprint must match the cache's. allow_test_split: accept a cache of the test split.
    features: a layer the cache holds features of (dump-logits --features), or True for its only one: each
    batch's teacher targets are then a kdpipe.losses.Outputs (.logits, .features, both float32).
    Raises kdpipe.KDPipeError with one line saying what is wrong (unfinished cache, data not found or not
    the cache's, ...).
    """
    return CacheData(cache_dir, device, data_root=data_root, data=data, allow_test_split=allow_test_split,
                     features=features, weights=weights)


class CacheData:
    """A cache with its dataset loaded (and checked) for training on `device`.

    Attributes: cache (kdpipe.cache.reader.Cache), manifest, num_classes, num_views (K), num_samples,
    input_shape (what the student takes, e.g. (1, 28, 28)), class_names, mean and std (the input
    normalization the teacher was given, applied to every batch; mean 0 and std 1, pixels in [0, 1], where
    grey images were fed to an RGB teacher as Grayscale(3) + Normalize: input.grey_to_rgb), policy (the view
    composition), train and test (kdpipe.data.ImageData; test is None where the cache has no test logits), device,
    feature (the manifest's record of the cached feature batches carry, or None), ensemble
    (kdpipe.ensemble.Ensemble, or None for one cache: then cache is its primary and the other attributes
    are the primary's, which the other caches share).
    """

    def __init__(self, cache_dir, device="cpu", *, data_root=None, data=None, allow_test_split: bool = False,
                 features: str | bool | None = None, weights=None):
        if not isinstance(cache_dir, (str, os.PathLike, list, tuple)):
            raise KDPipeError(f"open_cache takes a cache folder (a str or path), or a list of them, got "
                              f"{type(cache_dir).__name__} {cache_dir!r}")
        self.device = pick_device(str(device))  # a torch.device too: checked, not left to fail deep in torch
        self.cache, self.ensemble = open_caches(cache_dir, weights)
        if self.ensemble is not None and features not in (None, False):
            raise KDPipeError("features= distils one cache's features: open one cache, not an ensemble")
        for c in self.ensemble.caches if self.ensemble is not None else [self.cache]:
            check_split_use(c, allow_test_split)
        m = self.manifest = self.cache.manifest
        self.train, self.test = load_cache_data(self.cache, data_root, data)
        self.policy = policy_from_identity(m["views"])
        self.mean, self.std = m["input"]["mean"], m["input"]["std"]
        self.input_shape = tuple(m["input"]["shape"])
        self.num_classes, self.num_views = self.cache.num_classes, self.cache.num_views
        self.num_samples = self.cache.num_samples
        self.class_names = list(m["dataset"]["class_names"])
        self._images = images_tensor(self.train.images, self.device)
        self._labels = torch.from_numpy(self.train.labels).to(self.device)
        self.feature = None
        if features is not None and features is not False:
            self.feature = hint_feature(self.cache, None if features is True else str(features),
                                        option="open_cache(..., features='LAYER')")
        if self.ensemble is not None:
            self._views = self.ensemble.view_source(self.device, self.policy)
        else:
            self._views = CachedViews(self.cache, self.device,
                                      features=self.feature["path"] if self.feature else None)

    def __repr__(self) -> str:
        what = repr(str(self.cache.path)) if self.ensemble is None else f"ensemble {self.ensemble.describe()!r}"
        return (f"CacheData({what}, {self.num_samples} samples x {self.num_views} views, "
                f"{self.num_classes} classes, input {self.input_shape}, on {self.device})")

    def epoch(self, epoch: int, batch_size: int = 128, seed: int = 0) -> "EpochBatches":
        """The batches of one epoch: view `epoch` mod K of every sample, shuffled by (seed, epoch) as
        train-student shuffles them; the last partial batch is dropped (as train-student does), and a batch_size
        above the number of samples gives one batch of them all."""
        return EpochBatches(self, int(epoch), int(batch_size), int(seed))

    def steps_per_epoch(self, batch_size: int) -> int:
        if int(batch_size) < 1:
            raise KDPipeError(f"batch_size must be >= 1, got {batch_size}")
        return steps_per_epoch(self.num_samples, int(batch_size))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, amp: bool = False) -> float:
        """Top-1 accuracy of `model` on the clean test split, computed as train-student computes it (in eval
        mode; each module's training mode is restored afterwards, so a loop that calls it mid-training trains on
        with its dropout and batch statistics)."""
        if self.test is None:
            raise KDPipeError(f"cache {self.cache.path} holds no test split to evaluate on: evaluate on your own "
                              "held-out data, or dump a cache of data with a test split")
        modes = [(m, m.training) for m in model.modules()]
        try:
            return top1(clean_test_logits(model, self.test, self.policy, self.mean, self.std, self.device, amp),
                        self.test.labels)
        finally:
            for m, training in modes:
                m.training = training

    def teacher_test_logits(self, temperature: float | None = None) -> torch.Tensor | None:
        """The teacher's logits on the clean test split (float32, CPU), or None. For an ensemble, give the
        temperature the teachers are mixed at: the result is T * log p_ens(T), logits whose softmax at T is
        the weighted mean of the teachers' probabilities at T (their top-1 is the ensemble's prediction)."""
        if self.ensemble is None:
            t = self.cache.read_test_logits()
            return None if t is None else torch.from_numpy(t)
        if temperature is None:
            raise KDPipeError("an ensemble's test logits are its teachers' probabilities mixed at a temperature: "
                              "call teacher_test_logits(temperature=T)")
        test = self.ensemble.test()
        if test is None:
            return None
        return float(temperature) * mixture_log_probs(test.logits, test.log_weights, float(temperature))


class EpochBatches:
    """An iterable over one epoch's batches (x, teacher_logits, labels), all on the device: x the replayed,
    normalized views (float32), teacher_logits (B, classes) float32, labels (B,) int64. len() is the
    number of batches. From a cache of the top-k codec (manifest["logits"]["codec"] == "topk") the teacher
    targets are a kdpipe.losses.TopKTargets (values (B, k), indices (B, k), rest (B, temperatures)), which
    the kd loss takes in their place, at a temperature the dump declared. From an ensemble they are a
    kdpipe.ensemble.EnsembleTargets (logits (M, B, C) of the M teachers, log_weights (M,)), which the
    losses mix at their temperature; its at_temperature(T) is log p_ens(T)."""

    def __init__(self, data: CacheData, epoch: int, batch_size: int, seed: int):
        if batch_size <= 0:
            raise KDPipeError(f"batch_size must be >= 1, got {batch_size}")
        self.data, self.epoch, self.batch_size, self.seed = data, epoch, batch_size, seed

    def __len__(self) -> int:
        return self.data.steps_per_epoch(self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        d = self.data
        params, logits = d._views(self.epoch)
        for idx in batches(d.num_samples, self.batch_size, seeded_generator(self.seed, self.epoch), d.device):
            yield replay_batch(d._images, d._labels, d.policy, params, logits, idx, d.mean, d.std)
