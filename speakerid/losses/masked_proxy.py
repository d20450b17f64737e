"""Masked proxy losses (Lian et al., Interspeech 2021): mp, mp_balance, mmp, mmp_balance.

Every training speaker has a learnable proxy (``proxies``, nClasses × nOut, Kaiming-normal fan_out,
L2-normalised in the loss). For the speakers present in the batch the proxy is masked: replaced by the
batch centroid of that speaker, so a query is compared with in-batch centroids and out-of-batch proxies.
The "balance" regulator pulls each in-batch proxy toward its centroid.

Batch layout. ``*_balance`` treat each (N, M, D) row on its own: query = utterance 0, centroid = mean of
utterances 1..M−1. ``mp``/``mmp`` group utterances by label (the seed's unbalanced batches): the first
utterance of a label (in row-major order) is its query and the mean of all its other utterances the
centroid. With distinct labels both layouts give the same numbers. Rows sharing a label (one speaker on
two ranks) share one masked center: the mean of their centroids.

As the masked-proxy trainer L2-normalises every embedding before these losses, they normalise
utterances themselves (idempotent for normalised input). The seed returns 0 as accuracy; here it is the
top-1 (%) of each query over all classes (in-batch centers + out-of-batch proxies).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speakerid.losses.base import SpeakerLoss, l2_normalise, log1p_sum_exp, seed_l2_norm, top1



class _MaskedProxyLoss(SpeakerLoss):
    """Proxies, scale ``w`` and bias ``b``, and the query/centroid/center bookkeeping the four losses share."""

    min_utts_per_speaker = 2
    test_normalize = True
    keyword_aliases = {"n_classes": "nClasses", "sz_embed": "nOut"}
    grouped: ClassVar[bool] = False          # mp/mmp: group utterances by label instead of by row
    frozen_w2_b2: ClassVar[bool] = False     # the seed's unused w2/b2 (kept for checkpoint names)

    def __init__(self, *, nOut: int, nClasses: int, w_init: float, b_init: float, cross_rank_negatives: bool) -> None:
        super().__init__()
        self.proxies = nn.Parameter(torch.empty(nClasses, nOut))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")
        self.w = nn.Parameter(torch.tensor(w_init))
        self.b = nn.Parameter(torch.tensor(b_init))
        if self.frozen_w2_b2:
            # Unused by the seed's formula; no gradient, so DDP does not wait for one.
            self.w2 = nn.Parameter(torch.tensor(w_init), requires_grad=False)
            self.b2 = nn.Parameter(torch.tensor(b_init), requires_grad=False)
        self.cross_rank_negatives = cross_rank_negatives

    def queries(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Queries (R, D), their centroids (R, D), their labels (R,), the batch's classes U (K,) and each
        query's index into U; from L2-normalised utterances."""
        x, labels = self.global_batch(x, labels)
        x = l2_normalise(x)
        if not self.grouped:
            classes, where = torch.unique(labels, return_inverse=True)
            return x[:, 0], x[:, 1:].mean(dim=1), labels, classes, where
        n, m, d = x.shape
        flat, flat_labels = x.reshape(n * m, d), labels.repeat_interleave(m)
        classes, where, counts = torch.unique(flat_labels, return_inverse=True, return_counts=True)
        positions = torch.arange(n * m, device=x.device)
        first = torch.full_like(classes, n * m).scatter_reduce(0, where, positions, reduce="amin")
        query = flat[first]
        sums = torch.zeros(len(classes), d, dtype=x.dtype, device=x.device).index_add(0, where, flat)
        centroid = (sums - query) / (counts - 1).to(x.dtype)[:, None]
        return query, centroid, classes, classes, torch.arange(len(classes), device=x.device)

    @staticmethod
    def class_centroids(centroid: Tensor, where: Tensor, n_classes: int) -> Tensor:
        """Mean of the row centroids per batch class (K, D): the row's own centroid when labels are distinct."""
        sums = torch.zeros(n_classes, centroid.shape[1], dtype=centroid.dtype, device=centroid.device)
        counts = torch.zeros(n_classes, dtype=centroid.dtype, device=centroid.device)
        sums = sums.index_add(0, where, centroid)
        counts = counts.index_add(0, where, torch.ones_like(where, dtype=centroid.dtype))
        return sums / counts[:, None]


class _MP(_MaskedProxyLoss):
    """mp / mp_balance: CE(w·q·center + b) over all classes + λ·CE(w·centroid·proxy + b) over batch classes."""

    frozen_w2_b2 = True

    def __init__(self, *, nOut: int = 512, nClasses: int = 5994, w_init: float = 10.0, b_init: float = -5.0,
                 lambda_init: float = 0.5, cross_rank_negatives: bool = False) -> None:
        super().__init__(nOut=nOut, nClasses=nClasses, w_init=w_init, b_init=b_init,
                         cross_rank_negatives=cross_rank_negatives)
        self.lambda_init = lambda_init

    def forward(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        query, centroid, query_labels, classes, where = self.queries(x, labels)
        proxies = l2_normalise(self.proxies)
        # Quirk kept: in-batch centers are the raw mean of unit vectors (not re-normalised), as in the seed.
        centers = proxies.index_copy(0, classes, self.class_centroids(centroid, where, len(classes)))
        logits = self.w * (query @ centers.T) + self.b
        masked_proxy = F.cross_entropy(logits, query_labels)
        balance = F.cross_entropy(self.w * (centroid @ proxies[classes].T) + self.b, where)
        return masked_proxy + self.lambda_init * balance, top1(logits, query_labels)


class MPBalance(_MP):
    """Masked proxy loss on balanced batches (``mp_balance``, the paper's recommended loss). Init w=10, b=−5, λ=0.5."""

    name = "mp_balance"


class MP(_MP):
    """Masked proxy loss with utterances grouped by label (``mp``; the seed's Python loops, vectorised)."""

    name = "mp"
    grouped = True


class _MMP(_MaskedProxyLoss):
    """mmp / mmp_balance: the multi-similarity-style three-term loss of the seed's MMP_Balance2.

    Quirks kept: b enters as ``−w·s + b`` for the positive pairs and ``w·s − b`` elsewhere (init b = +5);
    the positive term is ``log(1 + Σ_i exp(…))``, a sum over the batch inside one log, while the other two
    are means over queries; centroids are normalised for the centers but not in the balance regulator.
    """

    balance: ClassVar[bool] = False

    def forward(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        query, centroid, query_labels, classes, where = self.queries(x, labels)
        proxies = l2_normalise(self.proxies)
        centers = proxies.index_copy(0, classes,
                                     seed_l2_norm(self.class_centroids(centroid, where, len(classes))))
        sim = query @ centers.T                                                     # (R, nClasses)
        in_batch = torch.zeros(len(centers), dtype=torch.bool, device=sim.device).index_fill(0, classes, True)
        own = F.one_hot(query_labels, len(centers)).bool()
        positive = log1p_sum_exp(-self.w * sim.gather(1, query_labels[:, None]).squeeze(1) + self.b, dim=0)
        out_of_batch = log1p_sum_exp(self.w * sim - self.b, keep=~in_batch[None, :]).mean()
        other_in_batch = log1p_sum_exp(self.w * sim - self.b, keep=in_batch[None, :] & ~own).mean()
        loss = positive + out_of_batch + other_in_batch
        if self.balance:
            loss = loss + self.lambda_init * F.cross_entropy(
                self.w * (centroid @ proxies[classes].T) - self.b, where)
        return loss, top1(sim, query_labels)


class MMPBalance(_MMP):
    """``mmp_balance`` (the seed's ``mmp_balance2`` / MMP_Balance2): three terms + λ · balance regulator."""

    name = "mmp_balance"
    balance = True
    keyword_aliases = {**_MaskedProxyLoss.keyword_aliases, "_lambda": "lambda_init"}

    def __init__(self, *, nOut: int = 512, nClasses: int = 5994, w_init: float = 10.0, b_init: float = 5.0,
                 lambda_init: float = 0.5, cross_rank_negatives: bool = False) -> None:
        super().__init__(nOut=nOut, nClasses=nClasses, w_init=w_init, b_init=b_init,
                         cross_rank_negatives=cross_rank_negatives)
        self.lambda_init = lambda_init


class MMP(_MMP):
    """``mmp``: the seed's file does not run (its return uses an undefined name), so this is mmp_balance's
    three-term loss on mp's label grouping without the balance regulator; init b = +5 as in mmp_balance
    (the broken file's default of −5 was copied from mp). Keeps the file's unused, frozen ``w2``/``b2``."""

    name = "mmp"
    grouped = True
    frozen_w2_b2 = True

    def __init__(self, *, nOut: int = 512, nClasses: int = 5994, w_init: float = 10.0, b_init: float = 5.0,
                 cross_rank_negatives: bool = False) -> None:
        super().__init__(nOut=nOut, nClasses=nClasses, w_init=w_init, b_init=b_init,
                         cross_rank_negatives=cross_rank_negatives)
