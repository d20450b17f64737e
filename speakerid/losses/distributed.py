"""Cross-rank negatives: every rank sees the global batch, and gradients reach each rank's own embeddings.

With ``cross_rank_negatives=True`` a metric loss gathers embeddings and labels from all ranks and computes
the loss of the whole global batch (the same value on every rank). The gather's backward sums the
gradient of every rank's copy of the loss and hands each rank the slice for its own rows, so after DDP
averages the model's gradients over ranks they equal the gradient of the global-batch loss, exactly as
if one process had computed it on the concatenated batch (the loss's own w/b/proxies too).
Outside torch.distributed (or with one process) gathering is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from speakerid.errors import SpeakeridError


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; backward: sum the gradient over ranks, keep our slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_batch(x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """All ranks' (N, M, D) embeddings and (N,) labels, concatenated in rank order."""
    if not _distributed():
        return x, labels
    shape = torch.tensor(x.shape, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        raise SpeakeridError("cross_rank_negatives needs the same batch shape (N, M, D) on every rank; got "
                             + ", ".join(str(tuple(s.tolist())) for s in shapes))
    all_labels = [torch.empty_like(labels) for _ in shapes]
    dist.all_gather(all_labels, labels.contiguous())
    return _GatherRows.apply(x), torch.cat(all_labels)
