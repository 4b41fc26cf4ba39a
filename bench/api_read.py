"""The Python API's batches against train-student's loop, on the same cache, model and optimizer.

Dumps a cache of the first N Fashion-MNIST train images (Debian's package, as an npz) with K views from an
untrained cnn_tiny teacher (the logits' values do not matter here), then times, side by side:
  - read:     iterating kdpipe.api epochs alone (read the view, replay every batch);
  - api loop: the README's own loop (mlp_100, kd loss, SGD) over those batches;
  - engine:   kdpipe's own train_pass (what train-student runs) with the same model, loss and SGD.
Usage: python bench/api_read.py [--samples 20000] [--epochs 2] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import kdpipe
from kdpipe.checkpoint import load_teacher, save_checkpoint
from kdpipe.data import load_dataset
from kdpipe.engine import OptimConfig, build_run, train_pass
from kdpipe.models import create_model
from kdpipe.student import CachedViews
from kdpipe.teacher import dump_logits
from kdpipe.util import images_tensor
from kdpipe.views import create_policy


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="kdpipe-api-bench-"))
    full = load_dataset("fashion-mnist", "train")
    np.savez(tmp / "fm.npz", x_train=full.images[:a.samples, 0], y_train=full.labels[:a.samples],
             x_test=full.images[:10, 0], y_test=full.labels[:10])
    train = load_dataset(f"npz:{tmp / 'fm.npz'}", "train")
    policy = create_policy("crop:2+flip")
    torch.manual_seed(0)
    teacher = create_model("cnn_tiny", 10, (1, 28, 28))
    mean, std = train.channel_stats()
    save_checkpoint(tmp / "t.pt", teacher, arch="cnn_tiny", num_classes=10, image_shape=(1, 28, 28), mean=mean,
                    std=std, class_names=train.class_names, dataset=train.identity(), test_top1=None)
    dump_logits(load_teacher(tmp / "t.pt"), train, None, tmp / "cache", policy=policy, views=a.epochs,
                log=lambda *x: None)

    data = kdpipe.open_cache(tmp / "cache")
    t0 = time.perf_counter()
    for e in range(a.epochs):
        for x, t, y in data.epoch(e, a.batch_size):
            pass
    read_s = time.perf_counter() - t0

    optim = OptimConfig(lr=0.05)
    steps = a.epochs * data.steps_per_epoch(a.batch_size)
    run = build_run("api", "mlp_100", "kd", 0, 10, data.input_shape, optim, steps, torch.device("cpu"))
    t0 = time.perf_counter()
    for e in range(a.epochs):
        for x, t, y in data.epoch(e, a.batch_size):
            terms = run.loss(run.model(x), t, y, e)
            run.optimizer.zero_grad(set_to_none=True)
            sum(terms.values()).backward()
            run.optimizer.step()
            run.scheduler.step()
    api_s = time.perf_counter() - t0

    run2 = build_run("engine", "mlp_100", "kd", 0, 10, data.input_shape, optim, steps, torch.device("cpu"))
    m = data.manifest
    stats = train_pass([run2], images_tensor(data.train.images, "cpu"), torch.from_numpy(data.train.labels),
                       data.policy, m["input"]["mean"], m["input"]["std"], a.epochs, a.batch_size, 0,
                       CachedViews(data.cache, torch.device("cpu")), log=lambda *x: None, fuse=False)
    n = a.epochs * data.steps_per_epoch(a.batch_size) * a.batch_size
    print(f"machine: {platform.machine()} {platform.processor() or ''}, 1 torch thread, "
          f"{a.samples} samples x {a.epochs} epochs, batch {a.batch_size}")
    print(f"read only (kdpipe.api batches):      {read_s:6.2f} s  {n / read_s:9,.0f} images/s")
    print(f"own loop over kdpipe.api (mlp_100):   {api_s:6.2f} s  {n / api_s:9,.0f} images/s")
    print(f"train_pass, as train-student runs it: {stats['wall_s']:6.2f} s  {stats['images_per_s']:9,.0f} images/s")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
