"""Pairwise losses with hard-negative mining: triplet and contrastive (voxceleb_trainer triplet / pairwise)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from speakerid.errors import SpeakeridError
from speakerid.losses.base import PAIRWISE_EPS, SpeakerLoss, l2_normalise, squared_distances
from speakerid.metrics import eer_from_roc


def pair_eer(pos_dist: Tensor, neg_dist: Tensor) -> Tensor:
    """EER in percent of the scores −distance (positives labelled 1), as the seed's tuneThresholdfromScore.

    On the CPU, as the seed's ``.cpu().numpy()``; in float64 (the same scores, and bf16 distances read too).
    """
    scores = -torch.cat([pos_dist, neg_dist]).detach().double().cpu().numpy()
    truth = np.r_[np.ones(len(pos_dist)), np.zeros(len(neg_dist))]
    return torch.tensor(eer_from_roc(scores, truth)[0], dtype=torch.float32)


def _random_pick(candidates: Tensor) -> Tensor:
    """Per row, a uniformly random column among the True entries of ``candidates`` (N, N)."""
    noise = torch.rand(candidates.shape, device=candidates.device)
    return noise.masked_fill(~candidates, -1.0).argmax(dim=1)


class PairwiseLoss(SpeakerLoss):
    """Shared part: anchors = utterance 0, positives = utterance 1 (both L2-normalised), mined negatives.

    ``hard_rank`` ≥ 0: with probability ``hard_prob`` a negative is drawn uniformly from the hard_rank + 1
    most similar ones, otherwise from all of them; ``hard_rank`` < 0: semi-hard mining, a negative with
    d_pos² < d_neg² < d_pos² + margin, any negative when none is. Negatives are the other rows' positives
    whose label differs from the anchor's (the seed excluded the anchor's own row only, and its semi-hard
    fallback could even pick it). Random draws use torch's generator.
    """

    min_utts_per_speaker = 2
    max_utts_per_speaker = 2
    test_normalize = True
    accuracy_kind = "eer"

    def __init__(self, *, hard_rank: int = 0, hard_prob: float = 0.0, margin: float = 0.0) -> None:
        super().__init__()
        self.hard_rank, self.hard_prob, self.margin = hard_rank, hard_prob, margin

    @torch.no_grad()
    def mine_hard_negatives(self, similarity: Tensor, labels: Tensor) -> Tensor:
        """Index of one positive per anchor row to use as its negative; ``similarity`` = −d²(anchor_i, positive_j)."""
        allowed = labels[:, None] != labels[None, :]
        n_allowed = allowed.sum(dim=1)
        if bool((n_allowed == 0).any()):
            raise SpeakeridError(f"loss '{self.name}' needs at least two different speakers in a batch")
        if self.hard_rank < 0:
            own = similarity.diagonal()[:, None]
            semi_hard = allowed & (similarity > own - self.margin) & (similarity < own)
            has_semi_hard = semi_hard.any(dim=1, keepdim=True)
            return _random_pick(torch.where(has_semi_hard, semi_hard, allowed))
        # Sorted by similarity with the not-allowed columns last; rank r among the allowed is column order[r].
        order = similarity.masked_fill(~allowed, float("-inf")).argsort(dim=1, descending=True, stable=True)
        top = torch.clamp(n_allowed, max=self.hard_rank + 1)
        hard = torch.rand(len(labels), device=similarity.device) < self.hard_prob
        span = torch.where(hard, top, n_allowed)
        rank = (torch.rand(len(labels), device=similarity.device) * span).long().clamp(max=span - 1)
        return order.gather(1, rank[:, None]).squeeze(1)

    def pair_distances(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(d(anchor_i, positive_i), d(anchor_i, mined negative_i)), F.pairwise_distance style (+1e-6)."""
        x, labels = self.check_input(x, labels)
        anchor, positive = l2_normalise(x[:, 0]), l2_normalise(x[:, 1])
        negidx = self.mine_hard_negatives(-squared_distances(anchor.detach(), positive.detach()), labels)
        pos_dist = F.pairwise_distance(anchor, positive, eps=PAIRWISE_EPS)
        neg_dist = F.pairwise_distance(anchor, positive[negidx], eps=PAIRWISE_EPS)
        return pos_dist, neg_dist


class Triplet(PairwiseLoss):
    """Triplet loss ``mean relu(d_pos² − d_neg² + margin)`` on mined negatives; "accuracy" is the pair EER (%)."""

    name = "triplet"

    def forward(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        pos_dist, neg_dist = self.pair_distances(x, labels)
        loss = F.relu(pos_dist.pow(2) - neg_dist.pow(2) + self.margin).mean()
        return loss, pair_eer(pos_dist, neg_dist)


class Contrastive(PairwiseLoss):
    """Contrastive loss: mean over the 2N pairs of d_pos² and relu(margin − d_neg)²; "accuracy" is the pair EER (%).

    As the voxceleb_trainer/masked-proxy ``PairwiseLoss('contrastive')`` with their trainer's L2 normalisation.
    """

    name = "contrastive"

    def forward(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        pos_dist, neg_dist = self.pair_distances(x, labels)
        loss = torch.cat([pos_dist.pow(2), F.relu(self.margin - neg_dist).pow(2)]).mean()
        return loss, pair_eer(pos_dist, neg_dist)
