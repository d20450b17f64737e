"""Proxy-Anchor loss (Kim et al., CVPR 2020) as in the masked-proxy repository."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speakerid.losses.base import SpeakerLoss, log1p_sum_exp, seed_l2_norm, top1



class ProxyAnchor(SpeakerLoss):
    """Σ_{p ∈ batch classes} log(1 + Σ_{x ∈ p} e^{−α(cos − mrg)}) / |batch classes|
    + Σ_{all p} log(1 + Σ_{x ∉ p} e^{α(cos + mrg)}) / nClasses.

    Every utterance is a sample (labels repeated M times, as the seed ran it with one utterance per
    speaker). Parameter (seed name): ``proxies`` (nClasses, nOut), Kaiming-normal fan_out. The seed
    returns 0 as accuracy; here it is the top-1 (%) of the nearest proxy.
    """

    name = "proxyanchor"
    test_normalize = True
    keyword_aliases = {"n_classes": "nClasses", "sz_embed": "nOut"}

    def __init__(self, *, nOut: int = 512, nClasses: int = 5994, mrg: float = 0.1, alpha: float = 30.0) -> None:
        super().__init__()
        self.proxies = nn.Parameter(torch.empty(nClasses, nOut))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")
        self.mrg, self.alpha = mrg, alpha

    def forward(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        x, labels = self.flatten(*self.check_input(x, labels))
        cos = seed_l2_norm(x) @ seed_l2_norm(self.proxies).T       # (B, nClasses)
        positive = F.one_hot(labels, cos.shape[1]).bool()
        n_batch_classes = len(torch.unique(labels))
        pos_term = log1p_sum_exp(-self.alpha * (cos - self.mrg), keep=positive, dim=0).sum() / n_batch_classes
        neg_term = log1p_sum_exp(self.alpha * (cos + self.mrg), keep=~positive, dim=0).sum() / cos.shape[1]
        return pos_term + neg_term, top1(cos, labels)
