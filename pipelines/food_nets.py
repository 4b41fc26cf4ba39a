"""The food-photos pipeline's student: a MobileNet-style network of depthwise-separable convolutions
(Howard et al. 2017) with a width parameter. kdpipe builds it from the pipeline's
`archs = ["pipelines/food_nets.py:DSNet"]` and `arch_args = "width=16"`, passing num_classes and
image_shape; the checkpoint records this file's sha256."""

from __future__ import annotations

import torch.nn as nn


def _separable(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """A 3x3 depthwise convolution and a 1x1 pointwise one, each followed by BatchNorm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(inplace=True),
        nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class DSNet(nn.Module):
    """Stem (3x3, stride 2, `width` channels), then separable blocks doubling the channels at each
    stride-2 stage (width, 2w, 4w, 8w, 8w), global average pooling, dropout and a linear classifier."""

    def __init__(self, num_classes: int, image_shape=(3, 224, 224), width: int = 16, dropout: float = 0.2):
        super().__init__()
        w = int(width)
        self.features = nn.Sequential(
            nn.Conv2d(image_shape[0], w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            _separable(w, w, 1), _separable(w, 2 * w, 2), _separable(2 * w, 4 * w, 2),
            _separable(4 * w, 8 * w, 2), _separable(8 * w, 8 * w, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(8 * w, num_classes))

    def forward(self, x):
        return self.head(self.features(x))
