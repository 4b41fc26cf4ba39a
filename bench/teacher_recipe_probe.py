"""Which optimizer and lr let a torchvision ResNet-50 (zero-init residuals) start learning on CIFAR-10?

A short probe behind pipelines/cifar10-resnet.toml's teacher recipe (BENCHMARKS.md §9): for each
setting, 150 steps of batch 128 on a fixed 10,000-image draw of the train split (random horizontal
flip per batch), lr warmed up linearly over the first 78 steps (one epoch of those images), then the
mean training loss of each 25 steps and top-1 on the first 2,000 test images. Plain torch, no kdpipe
training code: it tells the recipe apart from kdpipe's engine.

    python bench/teacher_recipe_probe.py imagefolder:PATH/cifar10 [sgd:0.02 sgd:0.01 adam:0.001 ...]
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
import torchvision

from kdpipe.data import load_dataset

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def probe(x, y, xt, yt, opt_name: str, lr: float, steps: int = 150, warm: int = 78) -> str:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    m = torchvision.models.resnet50(num_classes=10, zero_init_residual=True)
    dec = [p for p in m.parameters() if p.ndim > 1]
    nod = [p for p in m.parameters() if p.ndim <= 1]
    groups = [{"params": dec, "weight_decay": 5e-4 if opt_name == "sgd" else 0}, {"params": nod, "weight_decay": 0}]
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9) if opt_name == "sgd" else torch.optim.Adam(groups, lr=lr)
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warm)
        b = torch.from_numpy(rng.choice(len(x), 128, replace=False))
        xb = x[b]
        if rng.random() < 0.5:
            xb = xb.flip(3)
        loss = torch.nn.functional.cross_entropy(m(xb), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    m.eval()
    with torch.no_grad():
        acc = (m(xt).argmax(1) == yt).float().mean().item()
    return (f"{opt_name:5s} lr {lr:<6g} loss per 25 steps " + " ".join(f"{np.mean(losses[i:i + 25]):.2f}"
                                                                     for i in range(0, steps, 25))
            + f"   test top-1 {acc:.3f}")


def main(spec: str, settings: list[str]) -> None:
    torch.set_num_threads(2)
    train, test = load_dataset(spec, "train"), load_dataset(spec, "test")
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    idx = np.random.default_rng(0).choice(len(train), 10_000, replace=False)
    x = (torch.from_numpy(np.asarray(train.images)[idx]).float() / 255 - mean) / std
    y = torch.from_numpy(train.labels[idx])
    xt = (torch.from_numpy(np.array(test.images[:2000])).float() / 255 - mean) / std
    yt = torch.from_numpy(test.labels[:2000])
    print(f"# python bench/teacher_recipe_probe.py {spec} {' '.join(settings)}  (torch {torch.__version__})")
    for s in settings:
        name, lr = s.split(":")
        t0 = time.perf_counter()
        print(probe(x, y, xt, yt, name, float(lr)) + f"   ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["sgd:0.1", "sgd:0.05", "sgd:0.02", "sgd:0.01", "adam:0.001"])
