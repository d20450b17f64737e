"""ResNet34 for speaker embeddings (the r-vector / WeSpeaker recipe): 80 Kaldi fbanks, base width 32,
statistics pooling over time, a linear layer to 256 dimensions.

Basic blocks [3, 4, 6, 3] with 32/64/128/256 channels and strides 1/2/2/2 on the (frequency, time) plane;
the frequency axis (n_mels / 8 rows after layer4) is folded into the channels before pooling.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from speakerid.features import KaldiFbank, kaldi_log_fbank
from speakerid.models.pooling import StatisticsPooling


class BasicBlock(nn.Module):
    """conv3×3 → BN → ReLU → conv3×3 → BN, plus the (projected) input, → ReLU (He et al., 2016)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class ResNet34(nn.Module):
    """ResNet34 + statistics pooling: waveform (B, samples) at full scale → ``n_out``-dim embeddings."""

    def __init__(self, n_mels: int = 80, n_out: int = 256, base_channels: int = 32) -> None:
        super().__init__()
        self.n_mels, self.n_out = n_mels, n_out
        self.fbank = KaldiFbank(n_mels=n_mels, subtract_mean=True)
        self.spec_augment = nn.Identity()  # SpecAugment's hook: masks in training (speakerid.specaugment.attach)
        widths = [base_channels * m for m in (1, 2, 4, 8)]
        self.conv1 = nn.Conv2d(1, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_channels = widths[0]
        layers = []
        for width, blocks, stride in zip(widths, (3, 4, 6, 3), (1, 2, 2, 2)):
            layers.append(nn.Sequential(*(BasicBlock(in_channels if i == 0 else width, width, stride if i == 0 else 1)
                                          for i in range(blocks))))
            in_channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        stats_dim = widths[3] * math.ceil(n_mels / 8) * 2  # three stride-2 layers: ceil(n/2) three times
        self.pool = StatisticsPooling()
        self.fc = nn.Linear(stats_dim, n_out)

    def forward(self, waveform: Tensor) -> Tensor:
        x = self.spec_augment(kaldi_log_fbank(self.fbank, waveform)).unsqueeze(1)  # (B, 1, n_mels, T)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x.flatten(1, 2)))
