"""Temporal pooling: frame-level features → one utterance-level vector.

The seeds keep their pooling parameters on the model itself (``sap_linear``, ``attention``), so their
poolings are functions taking those parameters: a seed state dict then loads without renaming. The
modern models' poolings are modules.

Shapes: functions take ``(B, T, D)`` (time before features) unless named ``…_channels_first``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SEED_ENCODERS = ("SAP", "ASP", "TAP", "MAX")


def attention_weights(x: Tensor, sap_linear: nn.Linear, attention: Tensor) -> Tensor:
    """Self-attention weights over time, ``(B, T, 1)``: softmax_t(tanh(W x_t + b) · u) (Okabe et al. / Cai et al.)."""
    scores = torch.matmul(torch.tanh(sap_linear(x)), attention).squeeze(-1)  # (B, T)
    return F.softmax(scores, dim=1).unsqueeze(-1)


def weighted_mean_std(x: Tensor, weights: Tensor, dim: int, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Weighted mean and standard deviation along ``dim``; variance clamped at ``eps`` (the seeds' 1e-5)."""
    mean = torch.sum(x * weights, dim=dim)
    variance = torch.sum(x * x * weights, dim=dim) - mean * mean
    return mean, torch.sqrt(variance.clamp(min=eps))


def self_attentive_pool(x: Tensor, sap_linear: nn.Linear, attention: Tensor) -> Tensor:
    """SAP: attention-weighted mean over time, ``(B, T, D)`` → ``(B, D)``."""
    return torch.sum(x * attention_weights(x, sap_linear, attention), dim=1)


def attentive_statistics_pool(x: Tensor, sap_linear: nn.Linear, attention: Tensor) -> Tensor:
    """ASP: attention-weighted mean and standard deviation over time, ``(B, T, D)`` → ``(B, 2D)``."""
    mean, std = weighted_mean_std(x, attention_weights(x, sap_linear, attention), dim=1)
    return torch.cat([mean, std], dim=1)


def temporal_average_pool(x: Tensor) -> Tensor:
    """TAP: mean over time, ``(B, T, D)`` → ``(B, D)``."""
    return x.mean(dim=1)


def temporal_max_pool(x: Tensor) -> Tensor:
    """MAX: maximum over time, ``(B, T, D)`` → ``(B, D)``."""
    return x.amax(dim=1)


def statistics_pool_channels_first(x: Tensor, eps: float = 1e-7) -> Tensor:
    """Mean and standard deviation over time, ``(B, D, T)`` → ``(B, 2D)``; unbiased variance + eps, as WeSpeaker's TSTP."""
    mean = x.mean(dim=-1)
    std = torch.sqrt(x.var(dim=-1, unbiased=True) + eps)
    return torch.cat([mean, std], dim=1)


class StatisticsPooling(nn.Module):
    """Statistics pooling (x-vector style) over time: ``(B, D, T)`` → ``(B, 2D)``."""

    def forward(self, x: Tensor) -> Tensor:
        return statistics_pool_channels_first(x)


class ChannelAttentiveStatisticsPooling(nn.Module):
    """ECAPA-TDNN's attentive statistics pooling: per-channel attention with global context, ``(B, D, T)`` → ``(B, 2D)``.

    Attention input = [h_t; mean(h); std(h)] (3D channels), bottleneck → tanh → D logits, softmax over time
    (Desplanques et al., 2020, eq. 5–7).
    """

    def __init__(self, channels: int, bottleneck: int = 128, global_context: bool = True) -> None:
        super().__init__()
        self.global_context = global_context
        in_channels = channels * 3 if global_context else channels
        self.attention = nn.Sequential(
            nn.Conv1d(in_channels, bottleneck, kernel_size=1),
            nn.Tanh(),
            nn.Conv1d(bottleneck, channels, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        context = x
        if self.global_context:
            frames = x.shape[-1]
            mean = x.mean(dim=-1, keepdim=True)
            std = torch.sqrt(x.var(dim=-1, keepdim=True, unbiased=False).clamp(min=1e-5))
            context = torch.cat([x, mean.expand(-1, -1, frames), std.expand(-1, -1, frames)], dim=1)
        weights = F.softmax(self.attention(context), dim=-1)
        mean, std = weighted_mean_std(x, weights, dim=-1)
        return torch.cat([mean, std], dim=1)
