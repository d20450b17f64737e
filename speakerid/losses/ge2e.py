"""Generalised end-to-end loss (Wan et al. 2018, softmax variant) as voxceleb_trainer's ``ge2e``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from speakerid.losses.base import ScaledCosineLoss, l2_normalise, mask_same_speaker, top1


class GE2E(ScaledCosineLoss):
    """Cross-entropy over N·M rows of ``w · max(cos(x_im, c_j), 1e-6) + b``, target j = i.

    c_j is speaker j's centroid; for its own speaker an utterance uses the centroid without itself (eq. 8).
    Quirks kept: cosines are clamped to ≥ 1e-6 before scaling (negative cosines become 1e-6), and the
    seed's non-in-place ``torch.clamp(self.w, 1e-6)`` leaves w unclamped. Same-label rows are left out.
    """

    name = "ge2e"

    def forward(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        x, labels = self.global_batch(x, labels)
        n, m, _ = x.shape
        centroids = x.mean(dim=1)                                   # (N, D)
        leave_one_out = (x.sum(dim=1, keepdim=True) - x) / (m - 1)  # (N, M, D): own centroid without x_im
        x_unit = l2_normalise(x)
        cos = torch.einsum("imd,jd->imj", x_unit, l2_normalise(centroids))          # (N, M, N)
        cos_own = (x_unit * l2_normalise(leave_one_out)).sum(dim=-1)                 # (N, M)
        own = torch.eye(n, dtype=torch.bool, device=x.device)[:, None, :]
        cos = torch.where(own, cos_own[:, :, None], cos).clamp(min=1e-6)
        logits = mask_same_speaker(cos * self.w + self.b, labels).reshape(n * m, n)
        target = torch.arange(n, device=x.device).repeat_interleave(m)
        return F.cross_entropy(logits, target), top1(logits, target)
