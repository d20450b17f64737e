"""Softmax + angular prototypical (voxceleb_trainer softmaxproto; the ResNetSE34V2 recipe)."""

from __future__ import annotations

from torch import Tensor

from speakerid.losses.angleproto import AngleProto
from speakerid.losses.base import SpeakerLoss
from speakerid.losses.softmax import Softmax


class SoftmaxProto(SpeakerLoss):
    """``softmax(all N·M utterances) + angleproto(x)``; accuracy is the softmax's top-1, as in the seed.

    Parameters (seed names): ``softmax.fc.weight``, ``softmax.fc.bias``, ``angleproto.w``, ``angleproto.b``.
    The seed asserts M = 2 and repeats labels twice, so M must be exactly 2.
    """

    name = "softmaxproto"
    min_utts_per_speaker = 2
    max_utts_per_speaker = 2
    test_normalize = True

    def __init__(self, *, nOut: int, nClasses: int, init_w: float = 10.0, init_b: float = -5.0) -> None:
        super().__init__()
        self.softmax = Softmax(nOut=nOut, nClasses=nClasses)
        self.angleproto = AngleProto(init_w=init_w, init_b=init_b)

    def forward(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        x, labels = self.check_input(x, labels)
        loss_s, accuracy = self.softmax(x, labels)
        loss_p, _ = self.angleproto(x, labels)
        return loss_s + loss_p, accuracy
