"""Angular prototypical loss (Chung et al. 2020, "In defence of metric learning", eq. 6–7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from speakerid.losses.base import ScaledCosineLoss, l2_normalise, mask_same_speaker, top1


def angular_prototypical_logits(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """(N, N) logits ``w · cos(x_i0, mean_{m≥1} x_jm) + b``: row i = speaker i's query, column j = j's prototype."""
    query = x[:, 0]
    prototype = x[:, 1:].mean(dim=1)
    return w * (l2_normalise(query) @ l2_normalise(prototype).T) + b


class AngleProto(ScaledCosineLoss):
    """Cross-entropy over the N×N scaled cosine matrix, each query's own prototype as the target.

    Query = utterance 0, prototype = mean of utterances 1..M−1; learnable ``w`` (init_w) and ``b`` (init_b).
    Quirk kept: the seed's ``torch.clamp(self.w, 1e-6)`` is not in place, so w is left unclamped.
    Rows with the same label as the query are left out of its softmax (not treated as negatives).
    """

    name = "angleproto"

    def forward(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        x, labels = self.global_batch(x, labels)
        logits = mask_same_speaker(angular_prototypical_logits(x, self.w, self.b), labels)
        target = torch.arange(len(labels), device=x.device)
        return F.cross_entropy(logits, target), top1(logits, target)
