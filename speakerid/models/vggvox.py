"""VGGVox40 (VGG-M on 40 log-mels; voxceleb_trainer's ``VGGVox``), with MAX, TAP or SAP pooling over time.

Parameter names and shapes equal the seed's (``netcnn.<i>``, ``sap_linear``, ``attention``, ``fc``).
Seed quirk: its MelSpectrogram keeps torchaudio's default (Hann) window, unlike the ResNets' Hamming.
"""

from __future__ import annotations

from torch import Tensor, nn

from speakerid.features import MelSpectrogram, seed_log_mel
from speakerid.models.pooling import self_attentive_pool, temporal_average_pool, temporal_max_pool
from speakerid.models.resnet_se import check_choice, xavier_parameter

N_MELS = 40  # the last convolution's (4, 1) kernel consumes exactly the 4 frequency rows 40 mels leave


def conv_bn_relu(in_channels: int, out_channels: int, kernel: tuple[int, int], stride: tuple[int, int] = (1, 1),
                 padding: tuple[int, int] = (1, 1)) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size=kernel, stride=stride, padding=padding),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class VGGVox40(nn.Module):
    """VGG-M: five conv blocks and a (4, 1) conv over frequency → 512 channels per frame, pooled over time."""

    encoders = ("SAP", "TAP", "MAX")

    def __init__(self, n_out: int = 1024, encoder_type: str = "SAP", log_input: bool = True) -> None:
        super().__init__()
        check_choice("encoder_type", encoder_type, self.encoders, "VGGVox40")
        self.encoder_type, self.log_input, self.n_out = encoder_type, log_input, n_out
        self.netcnn = nn.Sequential(
            *conv_bn_relu(1, 96, (5, 7), stride=(1, 2), padding=(2, 2)),
            nn.MaxPool2d(kernel_size=(1, 3), stride=(1, 2)),
            *conv_bn_relu(96, 256, (5, 5), stride=(2, 2), padding=(1, 1)),
            nn.MaxPool2d(kernel_size=(3, 3), stride=(2, 2)),
            *conv_bn_relu(256, 384, (3, 3)),
            *conv_bn_relu(384, 256, (3, 3)),
            *conv_bn_relu(256, 256, (3, 3)),
            nn.MaxPool2d(kernel_size=(3, 3), stride=(2, 2)),
            *conv_bn_relu(256, 512, (4, 1), padding=(0, 0)),
        )
        if encoder_type == "SAP":
            self.sap_linear = nn.Linear(512, 512)
            self.attention = xavier_parameter(512, 1)
        self.fc = nn.Linear(512, n_out)
        self.torchfb = MelSpectrogram(n_mels=N_MELS, window="hann", f_min=0.0, f_max=8000.0)
        self.spec_augment = nn.Identity()  # SpecAugment's hook: masks in training (speakerid.specaugment.attach)

    def forward(self, waveform: Tensor) -> Tensor:
        x = self.netcnn(self.spec_augment(seed_log_mel(self.torchfb, waveform, self.log_input)))  # (B, 512, 1, T')
        x = x.flatten(1, 2).transpose(1, 2)  # (B, T', 512)
        if self.encoder_type == "SAP":
            return self.fc(self_attentive_pool(x, self.sap_linear, self.attention))
        pool = temporal_max_pool if self.encoder_type == "MAX" else temporal_average_pool
        return self.fc(pool(x))
