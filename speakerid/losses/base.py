"""What every loss shares: the (N, M, D) + labels contract, input checks (``check_input``; ``global_batch`` also
gathers every rank's rows for ``cross_rank_negatives``), the learnable w/b of ``ScaledCosineLoss`` (angleproto,
ge2e) and a few masked-softmax helpers.

A loss takes embeddings ``(N, M, D)`` (N speaker rows × M utterances) and global speaker labels ``(N,)``
and returns ``(loss, accuracy)``. ``accuracy`` is a detached 0-d tensor in percent, as the seeds print it:
top-1 accuracy for most losses, an EER for the pairwise losses (see ``accuracy_kind``).

Two rows may carry the same label (the same speaker drawn on two ranks, or by an unbalanced sampler).
Metric losses therefore decide "same speaker" by label: a row whose label equals the target's is removed
from the softmax denominator instead of being pushed away as a negative.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speakerid.errors import SpeakeridError
from speakerid.losses.distributed import gather_batch

# F.pairwise_distance adds this to the difference before the norm; the seeds' distances include it.
PAIRWISE_EPS = 1e-6


class SpeakerLoss(nn.Module):
    """Base class: subclasses set the class attributes and implement ``forward(x, labels)``."""

    name: ClassVar[str] = ""
    # Utterances per speaker row (M) the formula needs; None means no upper bound.
    min_utts_per_speaker: ClassVar[int] = 1
    max_utts_per_speaker: ClassVar[int | None] = None
    # Whether the seed L2-normalises embeddings at test time with this loss.
    test_normalize: ClassVar[bool] = True
    # What the second return value measures, in percent: "top1" accuracy or "eer" of the pair scores.
    accuracy_kind: ClassVar[str] = "top1"
    # Seed spellings of constructor keywords, accepted by build_loss: {seed name: our name}.
    keyword_aliases: ClassVar[dict[str, str]] = {}
    # Metric losses taking the option set it per instance: compute on every rank's rows (losses/distributed.py).
    cross_rank_negatives: bool = False

    @classmethod
    def check_utts_per_speaker(cls, m: int) -> None:
        """Raise SpeakeridError when M utterances per speaker is outside what this loss computes with."""
        lo, hi = cls.min_utts_per_speaker, cls.max_utts_per_speaker
        if m < lo or (hi is not None and m > hi):
            need = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
            raise SpeakeridError(
                f"loss '{cls.name}' needs {need} utterances per speaker (M, the seeds' nPerSpeaker); "
                f"got M={m}: change utts_per_speaker or pick another loss")

    def check_input(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Validate shapes, upcast half precision to float32 and return (x, labels as long)."""
        if x.dim() != 3:
            raise SpeakeridError(f"loss '{self.name}' takes embeddings shaped (N, M, D); got {tuple(x.shape)}")
        if labels.shape != (x.shape[0],):
            raise SpeakeridError(f"loss '{self.name}' takes one label per speaker row: labels shaped "
                                 f"({x.shape[0]},) for embeddings {tuple(x.shape)}; got {tuple(labels.shape)}")
        self.check_utts_per_speaker(x.shape[1])
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # exp/log-sum-exp in half precision overflows at the seeds' scales (w=10, alpha=30)
        return x, labels.to(device=x.device, dtype=torch.long)

    def global_batch(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``check_input``, then all ranks' rows in rank order when ``cross_rank_negatives`` is set."""
        x, labels = self.check_input(x, labels)
        return gather_batch(x, labels) if self.cross_rank_negatives else (x, labels)

    def flatten(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(N, M, D), (N,) → (N·M, D), (N·M,): row i's utterances stay contiguous (as softmaxproto does)."""
        n, m, d = x.shape
        return x.reshape(n * m, d), labels.repeat_interleave(m)



class ScaledCosineLoss(SpeakerLoss):
    """Base of the seeds' metric losses on cosines scaled by a learnable ``w`` and shifted by a learnable ``b``
    (angleproto, ge2e): the two parameters, initialised from ``init_w``/``init_b``, and the cross-rank option."""

    min_utts_per_speaker = 2
    test_normalize = True

    def __init__(self, *, init_w: float = 10.0, init_b: float = -5.0, cross_rank_negatives: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(init_w))
        self.b = nn.Parameter(torch.tensor(init_b))
        self.cross_rank_negatives = cross_rank_negatives

def top1(logits: Tensor, target: Tensor) -> Tensor:
    """Percentage of rows whose largest logit is the target, detached (the seeds' utils.accuracy, k=1)."""
    correct = logits.detach().argmax(dim=-1) == target
    return correct.sum().to(torch.float32) * 100.0 / correct.numel()


def same_speaker_elsewhere(labels: Tensor) -> Tensor:
    """(N, N) bool: True where rows i ≠ j share a label. Those pairs are never negatives of each other."""
    same = labels[:, None] == labels[None, :]
    return same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)


def mask_same_speaker(logits: Tensor, labels: Tensor) -> Tensor:
    """Drop from the softmax (set to -inf) every column j ≠ i whose label equals row i's.

    ``logits`` is (N, ..., N) with the row speaker first and the column speaker last.
    """
    mask = same_speaker_elsewhere(labels)
    mask = mask.view(mask.shape[0], *([1] * (logits.dim() - 2)), mask.shape[1])
    return logits.masked_fill(mask, float("-inf"))


def log1p_sum_exp(z: Tensor, keep: Tensor | None = None, dim: int = -1) -> Tensor:
    """log(1 + Σ exp z) over ``dim``, only where ``keep``; stable (log-sum-exp with a 0 for the "1")."""
    if keep is not None:
        z = z.masked_fill(~keep, float("-inf"))
    zero = torch.zeros_like(z.narrow(dim, 0, 1))
    return torch.logsumexp(torch.cat([zero, z], dim=dim), dim=dim)


def squared_distances(a: Tensor, b: Tensor, eps: float = PAIRWISE_EPS) -> Tensor:
    """(P, Q) matrix of ‖a_p − b_q + eps‖², i.e. F.pairwise_distance(a_p, b_q)² as the seeds compute it."""
    a = a + eps  # a − b + eps = (a + eps) − b
    sq = (a * a).sum(-1)[:, None] + (b * b).sum(-1)[None, :] - 2.0 * a @ b.T
    return sq.clamp_min(0.0)


def l2_normalise(x: Tensor, dim: int = -1) -> Tensor:
    """F.normalize: x / max(‖x‖, 1e-12)."""
    return F.normalize(x, p=2.0, dim=dim)


def seed_l2_norm(x: Tensor, dim: int = -1) -> Tensor:
    """The masked-proxy repository's l2_norm: x / sqrt(Σx² + 1e-12)."""
    return x / (x.pow(2).sum(dim=dim, keepdim=True) + 1e-12).sqrt()
