"""Additive-margin softmax (CosFace; voxceleb_trainer amsoftmax)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speakerid.losses.base import SpeakerLoss, l2_normalise, top1


class AMSoftmax(SpeakerLoss):
    """Cross-entropy of ``scale · (cos θ_j − margin·[j = y])`` with x and the class weights L2-normalised.

    Parameter (seed name): ``W`` shaped (nOut, nClasses), Xavier-normal. Quirk kept: the returned accuracy is
    taken on the margin-penalised logits, as in the seed.
    """

    name = "amsoftmax"
    test_normalize = True

    def __init__(self, *, nOut: int, nClasses: int, margin: float = 0.3, scale: float = 15.0) -> None:
        super().__init__()
        self.margin, self.scale = margin, scale
        self.W = nn.Parameter(torch.empty(nOut, nClasses))
        nn.init.xavier_normal_(self.W, gain=1)

    def set_margin(self, margin: float) -> None:
        """Change the margin (the training loop's margin warm-up)."""
        self.margin = margin

    def forward(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        x, labels = self.flatten(*self.check_input(x, labels))
        cosine = l2_normalise(x, dim=1) @ l2_normalise(self.W, dim=0)
        margin = F.one_hot(labels, cosine.shape[1]).to(cosine.dtype) * self.margin
        logits = self.scale * (cosine - margin)
        return F.cross_entropy(logits, labels), top1(logits, labels)
