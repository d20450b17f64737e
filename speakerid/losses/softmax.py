"""Softmax: a linear classifier over the training speakers with cross-entropy (voxceleb_trainer softmax)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from speakerid.losses.base import SpeakerLoss, top1


class Softmax(SpeakerLoss):
    """Cross-entropy of ``fc(x)``; every utterance of the (N, M, D) batch is one sample (labels repeated M times).

    Parameters (seed names): ``fc.weight`` (nClasses, nOut), ``fc.bias`` (nClasses,).
    """

    name = "softmax"
    test_normalize = True

    def __init__(self, *, nOut: int, nClasses: int) -> None:
        super().__init__()
        self.fc = nn.Linear(nOut, nClasses)

    def forward(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        x, labels = self.flatten(*self.check_input(x, labels))
        logits = self.fc(x)
        return F.cross_entropy(logits, labels), top1(logits, labels)
