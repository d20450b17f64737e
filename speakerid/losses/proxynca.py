"""ProxyNCA (Movshovitz-Attias et al. 2017) with label smoothing, as in the masked-proxy repository."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speakerid.losses.base import SpeakerLoss, l2_normalise, top1


class ProxyNCA(SpeakerLoss):
    """Smoothed cross-entropy of ``−‖scaling_x·x̂ − scaling_p·p̂_c‖²`` over all proxies (positive included).

    Target distribution: 1 − smoothing_const on the label, smoothing_const / (nClasses − 1) elsewhere.
    Every utterance is a sample (labels repeated M times). Parameter (seed name): ``proxies``, initialised
    ``randn / 8``. The seed returns 0 as accuracy; here it is the top-1 (%) of the nearest proxy.
    """

    name = "proxynca"
    test_normalize = True
    keyword_aliases = {"n_classes": "nClasses", "sz_embedding": "nOut"}

    def __init__(self, *, nOut: int = 512, nClasses: int = 5994, smoothing_const: float = 0.1,
                 scaling_x: float = 1.0, scaling_p: float = 3.0) -> None:
        super().__init__()
        self.proxies = nn.Parameter(torch.randn(nClasses, nOut) / 8)
        self.smoothing_const, self.scaling_x, self.scaling_p = smoothing_const, scaling_x, scaling_p

    def forward(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        x, labels = self.flatten(*self.check_input(x, labels))
        p = l2_normalise(self.proxies) * self.scaling_p
        x = l2_normalise(x) * self.scaling_x
        dist = (x * x).sum(1)[:, None] + (p * p).sum(1)[None, :] - 2.0 * x @ p.T   # torch.cdist(x, p) ** 2
        n_classes = p.shape[0]
        target = torch.full_like(dist, self.smoothing_const / (n_classes - 1))
        target = target.scatter(1, labels[:, None], 1.0 - self.smoothing_const)
        loss = -(target * F.log_softmax(-dist, dim=1)).sum(dim=1).mean()
        return loss, top1(-dist, labels)
