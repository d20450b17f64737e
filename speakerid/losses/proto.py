"""Prototypical loss (Snell et al. 2017) as voxceleb_trainer's ``proto``: negative squared Euclidean distance."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from speakerid.losses.base import SpeakerLoss, mask_same_speaker, squared_distances, top1


class Proto(SpeakerLoss):
    """Cross-entropy over ``−‖x_i0 − mean_{m≥1} x_jm‖²`` (N×N), each query's own prototype as the target.

    No normalisation anywhere (and test_normalize is False, as in the seed). Quirk kept: distances are
    F.pairwise_distance's, i.e. ``‖a − b + 1e-6‖``. Same-label rows are left out of a query's softmax.
    """

    name = "proto"
    min_utts_per_speaker = 2
    test_normalize = False

    def __init__(self, *, cross_rank_negatives: bool = False) -> None:
        super().__init__()
        self.cross_rank_negatives = cross_rank_negatives

    def forward(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        x, labels = self.global_batch(x, labels)
        logits = -squared_distances(x[:, 0], x[:, 1:].mean(dim=1))
        logits = mask_same_speaker(logits, labels)
        target = torch.arange(len(labels), device=x.device)
        return F.cross_entropy(logits, target), top1(logits, target)
