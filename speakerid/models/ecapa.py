"""ECAPA-TDNN (Desplanques et al., Interspeech 2020) on 80 Kaldi fbanks with mean normalisation.

Conv1D(k=5) → three SE-Res2Blocks (k=3, dilation 2/3/4, scale 8) → multi-layer feature aggregation
(concatenation + 1×1 conv to 1536) → attentive statistics pooling with global context → BN → FC(192) → BN.
``channels`` 512 or 1024 are the paper's two sizes (6.2 M and 14.7 M parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speakerid.errors import SpeakeridError
from speakerid.features import KaldiFbank, kaldi_log_fbank
from speakerid.models.pooling import ChannelAttentiveStatisticsPooling


class Conv1dReluBn(nn.Module):
    """Conv1d → ReLU → BatchNorm1d (the TDNN layer of the paper's Figure 2)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation,
                              padding=dilation * (kernel_size - 1) // 2)
        self.bn = nn.BatchNorm1d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(F.relu(self.conv(x)))


class Res2Conv1d(nn.Module):
    """Res2Net conv: channels split into ``scale`` groups; group i (i ≥ 1) sees group i plus the previous output.

    The last group passes through unchanged, as in Res2Net (Gao et al.).
    """

    def __init__(self, channels: int, kernel_size: int, dilation: int, scale: int = 8) -> None:
        super().__init__()
        if channels % scale:
            raise SpeakeridError(f"ECAPA_TDNN: channels={channels} must be divisible by scale={scale}")
        self.width = channels // scale
        self.blocks = nn.ModuleList(Conv1dReluBn(self.width, self.width, kernel_size, dilation)
                                    for _ in range(scale - 1))

    def forward(self, x: Tensor) -> Tensor:
        groups = torch.split(x, self.width, dim=1)
        outputs = []
        previous = None
        for group, block in zip(groups, self.blocks):
            previous = block(group if previous is None else group + previous)
            outputs.append(previous)
        outputs.append(groups[-1])
        return torch.cat(outputs, dim=1)


class SqueezeExcitation1d(nn.Module):
    """SE over channels of a 1-D sequence: mean over time → FC → ReLU → FC → sigmoid → rescale."""

    def __init__(self, channels: int, bottleneck: int = 128) -> None:
        super().__init__()
        self.linear1 = nn.Linear(channels, bottleneck)
        self.linear2 = nn.Linear(bottleneck, channels)

    def forward(self, x: Tensor) -> Tensor:
        scale = torch.sigmoid(self.linear2(F.relu(self.linear1(x.mean(dim=-1)))))
        return x * scale.unsqueeze(-1)


class SERes2Block(nn.Module):
    """1×1 conv → Res2 dilated conv → 1×1 conv → SE, with a residual connection around them."""

    def __init__(self, channels: int, kernel_size: int, dilation: int, scale: int = 8, se_bottleneck: int = 128) -> None:
        super().__init__()
        self.conv_in = Conv1dReluBn(channels, channels)
        self.res2 = Res2Conv1d(channels, kernel_size, dilation, scale)
        self.conv_out = Conv1dReluBn(channels, channels)
        self.se = SqueezeExcitation1d(channels, se_bottleneck)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.se(self.conv_out(self.res2(self.conv_in(x))))


class ECAPATDNN(nn.Module):
    """ECAPA-TDNN: waveform (B, samples) at full scale → 192-dim embeddings (``n_out``)."""

    def __init__(self, channels: int = 1024, n_mels: int = 80, n_out: int = 192, mfa_channels: int = 1536,
                 attention_channels: int = 128, se_bottleneck: int = 128, scale: int = 8) -> None:
        super().__init__()
        self.n_mels, self.n_out = n_mels, n_out
        self.fbank = KaldiFbank(n_mels=n_mels, subtract_mean=True)
        self.spec_augment = nn.Identity()  # SpecAugment's hook: masks in training (speakerid.specaugment.attach)
        self.layer1 = Conv1dReluBn(n_mels, channels, kernel_size=5)
        self.layer2 = SERes2Block(channels, 3, dilation=2, scale=scale, se_bottleneck=se_bottleneck)
        self.layer3 = SERes2Block(channels, 3, dilation=3, scale=scale, se_bottleneck=se_bottleneck)
        self.layer4 = SERes2Block(channels, 3, dilation=4, scale=scale, se_bottleneck=se_bottleneck)
        self.mfa = nn.Conv1d(channels * 3, mfa_channels, kernel_size=1)
        self.pool = ChannelAttentiveStatisticsPooling(mfa_channels, attention_channels, global_context=True)
        self.pool_bn = nn.BatchNorm1d(mfa_channels * 2)
        self.fc = nn.Linear(mfa_channels * 2, n_out)
        self.fc_bn = nn.BatchNorm1d(n_out)

    def forward(self, waveform: Tensor) -> Tensor:
        x = self.spec_augment(kaldi_log_fbank(self.fbank, waveform))  # (B, n_mels, T)
        out1 = self.layer1(x)
        out2 = self.layer2(out1)
        out3 = self.layer3(out2)
        out4 = self.layer4(out3)
        x = F.relu(self.mfa(torch.cat([out2, out3, out4], dim=1)))
        return self.fc_bn(self.fc(self.pool_bn(self.pool(x))))
