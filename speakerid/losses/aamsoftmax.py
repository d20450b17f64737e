"""Additive angular-margin softmax (ArcFace; voxceleb_trainer aamsoftmax)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speakerid.losses.base import SpeakerLoss, l2_normalise, top1


class AAMSoftmax(SpeakerLoss):
    """Cross-entropy of ``scale · cos(θ_y + margin)`` for the target class and ``scale · cos θ_j`` elsewhere.

    Parameter (seed name): ``weight`` shaped (nClasses, nOut), Xavier-normal. As in the seed, past
    θ + m > π the target logit becomes ``cos θ − sin(π − m)·m`` (the ``th``/``mm`` fallback keeps it
    decreasing), or ``cos θ`` when cos θ ≤ 0 with ``easy_margin``; accuracy is taken on the margin logits.
    """

    name = "aamsoftmax"
    test_normalize = True

    def __init__(self, *, nOut: int, nClasses: int, margin: float = 0.3, scale: float = 15.0,
                 easy_margin: bool = False) -> None:
        super().__init__()
        self.scale, self.easy_margin = scale, easy_margin
        self.weight = nn.Parameter(torch.empty(nClasses, nOut))
        nn.init.xavier_normal_(self.weight, gain=1)
        self.set_margin(margin)

    def set_margin(self, margin: float) -> None:
        """Change the margin (the training loop's margin warm-up); the fallback constants follow it."""
        self.margin = margin
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.th = math.cos(math.pi - margin)
        self.mm = math.sin(math.pi - margin) * margin

    def forward(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        x, labels = self.flatten(*self.check_input(x, labels))
        cosine = l2_normalise(x, dim=1) @ l2_normalise(self.weight, dim=1).T
        sine = (1.0 - cosine * cosine).clamp(0, 1).sqrt()
        phi = cosine * self.cos_m - sine * self.sin_m  # cos(θ + m)
        if self.easy_margin:
            phi = torch.where(cosine > 0, phi, cosine)
        else:
            phi = torch.where(cosine > self.th, phi, cosine - self.mm)
        target = F.one_hot(labels, cosine.shape[1]).bool()
        logits = self.scale * torch.where(target, phi, cosine)
        return F.cross_entropy(logits, labels), top1(logits, labels)
