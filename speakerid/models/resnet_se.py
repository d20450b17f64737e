"""The seeds' squeeze-and-excitation ResNet-34 family (voxceleb_trainer): ResNetSE34L, ResNetSE34V2, ResNetSE34.

Parameter and buffer names and shapes equal voxceleb_trainer's, so its ``__S__.`` state dicts load
with strict=True. Seed quirks kept on purpose: each block runs conv1 → ReLU → BatchNorm (ReLU before
BN), and ResNetSE34V2's stem does the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speakerid.errors import SpeakeridError
from speakerid.features import (
    WINDOWS,
    MelSpectrogram,
    PreEmphasis,
    Spectrogram,
    frontend_context,
    seed_log_mel,
)
from speakerid.models.pooling import attentive_statistics_pool, self_attentive_pool, weighted_mean_std

LAYERS_34 = (3, 4, 6, 3)


class SELayer(nn.Module):
    """Squeeze-and-excitation over channels: global average → FC(C/r) → ReLU → FC(C) → sigmoid → rescale."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        scale = self.fc(x.mean(dim=(2, 3)))
        return x * scale[:, :, None, None]


class SEBasicBlock(nn.Module):
    """Basic residual block with SE; the seed applies ReLU before the first BatchNorm."""

    def __init__(self, inplanes: int, planes: int, stride: int | tuple[int, int] = 1, reduction: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = SELayer(planes, reduction)
        self.downsample = None
        # the seed tests `stride != 1` on a tuple, so every layer given a tuple stride gets a projection
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(F.relu(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


def make_layer(inplanes: int, planes: int, blocks: int, stride: int | tuple[int, int] = 1) -> nn.Sequential:
    """``blocks`` SE basic blocks; the first one carries the stride (and the projection)."""
    return nn.Sequential(SEBasicBlock(inplanes, planes, stride),
                         *(SEBasicBlock(planes, planes) for _ in range(blocks - 1)))


def resnet34_layers(filters: tuple[int, int, int, int], last_stride: tuple[int, int]) -> tuple[nn.Sequential, ...]:
    """The seeds' four SE stages (3, 4, 6, 3 blocks); stages 2 and 3 halve time and frequency."""
    strides = (1, (2, 2), (2, 2), last_stride)
    inputs = (filters[0], *filters[:3])
    return tuple(make_layer(i, f, blocks, stride) for i, f, blocks, stride in zip(inputs, filters, LAYERS_34, strides))


def init_seed_weights(model: nn.Module) -> None:
    """The seeds' initialisation: Kaiming-normal (fan_out) convolutions, BatchNorm weight 1 and bias 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.constant_(module.weight, 1.0)
            nn.init.constant_(module.bias, 0.0)


def xavier_parameter(*size: int) -> nn.Parameter:
    parameter = nn.Parameter(torch.empty(*size))
    nn.init.xavier_normal_(parameter)
    return parameter


def check_choice(option: str, value: str, valid: tuple[str, ...], model: str) -> None:
    if value not in valid:
        raise SpeakeridError(f"{model}: {option}={value!r} is not available; valid: {', '.join(valid)}")


class ResNetSE34L(nn.Module):
    """Fast ResNet-34 ("In defence of metric learning"): 40 log-mels (Hamming), filters 16/32/64/128, SAP or ASP.

    Mean over frequency after layer4, then pooling over time. ``window="hann"`` gives the masked-proxy
    repository's variant (torchaudio's default window; its AvgPool2d((5, 1)) equals this mean at 40 mels).
    """

    encoders = ("SAP", "ASP")

    def __init__(self, n_out: int = 256, encoder_type: str = "SAP", n_mels: int = 40, log_input: bool = True,
                 window: str = "hamming") -> None:
        super().__init__()
        check_choice("encoder_type", encoder_type, self.encoders, "ResNetSE34L")
        check_choice("window", window, WINDOWS, "ResNetSE34L")
        filters = (16, 32, 64, 128)
        self.encoder_type, self.n_mels, self.log_input, self.n_out = encoder_type, n_mels, log_input, n_out
        self.torchfb = MelSpectrogram(n_mels=n_mels, window=window)
        self.spec_augment = nn.Identity()  # SpecAugment's hook: masks in training (speakerid.specaugment.attach)
        self.conv1 = nn.Conv2d(1, filters[0], kernel_size=7, stride=(2, 1), padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet34_layers(filters, last_stride=(1, 1))
        self.sap_linear = nn.Linear(filters[3], filters[3])
        self.attention = xavier_parameter(filters[3], 1)
        self.fc = nn.Linear(filters[3] * (2 if encoder_type == "ASP" else 1), n_out)
        init_seed_weights(self)

    def forward(self, waveform: Tensor) -> Tensor:
        x = self.spec_augment(seed_log_mel(self.torchfb, waveform, self.log_input))
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = x.mean(dim=2).transpose(1, 2)  # mean over frequency → (B, T, C)
        pool = attentive_statistics_pool if self.encoder_type == "ASP" else self_attentive_pool
        return self.fc(pool(x, self.sap_linear, self.attention))


class ResNetSE34V2(nn.Module):
    """H/ASP ResNet-34: pre-emphasis + log-mels (Hamming), filters 32/64/128/256, channel-wise attention over time.

    Frequency is kept (channels × n_mels/8 features per frame); attention = 1×1 conv → ReLU → BN → 1×1 conv
    → softmax over time, per feature. Quirk kept: the stem is conv (with bias) → ReLU → BN.
    """

    encoders = ("SAP", "ASP")

    def __init__(self, n_out: int = 256, encoder_type: str = "SAP", n_mels: int = 40, log_input: bool = True) -> None:
        super().__init__()
        check_choice("encoder_type", encoder_type, self.encoders, "ResNetSE34V2")
        filters = (32, 64, 128, 256)
        self.encoder_type, self.n_mels, self.log_input, self.n_out = encoder_type, n_mels, log_input, n_out
        self.torchfb = nn.Sequential(PreEmphasis(), MelSpectrogram(n_mels=n_mels, window="hamming"))
        self.spec_augment = nn.Identity()  # SpecAugment's hook: masks in training (speakerid.specaugment.attach)
        self.conv1 = nn.Conv2d(1, filters[0], kernel_size=3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet34_layers(filters, last_stride=(2, 2))
        # frequency left after three stride-2 layers; the seed writes int(n_mels / 8), equal wherever it runs
        features = filters[3] * math.ceil(n_mels / 8)
        self.attention = nn.Sequential(
            nn.Conv1d(features, 128, kernel_size=1),
            nn.ReLU(),
            nn.BatchNorm1d(128),
            nn.Conv1d(128, features, kernel_size=1),
            nn.Softmax(dim=2),
        )
        self.fc = nn.Linear(features * (2 if encoder_type == "ASP" else 1), n_out)
        init_seed_weights(self)

    def forward(self, waveform: Tensor) -> Tensor:
        x = self.spec_augment(seed_log_mel(self.torchfb, waveform, self.log_input))
        x = self.bn1(F.relu(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, C·F, T)
        weights = self.attention(x)
        if self.encoder_type == "SAP":
            return self.fc(torch.sum(x * weights, dim=2))
        mean, std = weighted_mean_std(x, weights, dim=2)
        return self.fc(torch.cat([mean, std], dim=1))


class ResNetSE34(nn.Module):
    """Thin ResNet-34 (the seed's older ResNetSE34): 257-bin STFT magnitude, not mel; filters 16/32/64/128; SAP.

    Quirks kept: the STFT is not centered (frames = 1 + (N − 512) // 160), log (when log_input) has no floor,
    and the Hann window is made in forward in the seed, so it is not in its state dicts (nor here).
    """

    encoders = ("SAP",)

    def __init__(self, n_out: int = 256, encoder_type: str = "SAP", log_input: bool = False) -> None:
        super().__init__()
        check_choice("encoder_type", encoder_type, self.encoders, "ResNetSE34")
        filters = (16, 32, 64, 128)
        self.encoder_type, self.log_input, self.n_out = encoder_type, log_input, n_out
        self.stft = Spectrogram(512, 400, 160, window="hann", power=1.0, center=False, persistent=False)
        self.spec_augment = nn.Identity()  # SpecAugment's hook: masks in training (speakerid.specaugment.attach)
        self.conv1 = nn.Conv2d(1, filters[0], kernel_size=7, stride=(2, 1), padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.maxPool = nn.MaxPool2d(kernel_size=(3, 3), stride=(2, 1), padding=1)  # noqa: N815 (seed's name)
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet34_layers(filters, last_stride=(2, 2))
        self.sap_linear = nn.Linear(filters[3], filters[3])
        self.attention = xavier_parameter(filters[3], 1)
        self.fc = nn.Linear(filters[3], n_out)
        init_seed_weights(self)

    def forward(self, waveform: Tensor) -> Tensor:
        with frontend_context(waveform.device.type):
            x = self.stft(waveform.to(torch.float32))
            if self.log_input:
                x = x.log()
            x = F.instance_norm(x, eps=1e-5).unsqueeze(1)
        x = self.spec_augment(x)
        x = self.maxPool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = x.mean(dim=2).transpose(1, 2)
        return self.fc(self_attentive_pool(x, self.sap_linear, self.attention))
