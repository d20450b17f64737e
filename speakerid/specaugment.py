"""SpecAugment for speaker embeddings: time and frequency masks on the features, batched on the training device,
right after each model's front-end, in training mode only. Off by default (``augment.spec_augment``).

What WeSpeaker computes (wenet-e2e/wespeaker, ``wespeaker/dataset/processor.py: spec_aug``; its recipes say
``spec_aug: False`` and ``spec_aug_conf: {num_t_mask: 1, num_f_mask: 1, max_t: 10, max_f: 8, prob: 0.6}``), per
training utterance on the CPU, after the fbank and its mean normalisation (``apply_cmvn``):

- with probability ``prob`` the utterance is masked; otherwise it is left alone;
- ``num_t_mask`` time masks, each ``start = randint(0, frames − 1)``, ``width = randint(1, max_t)`` (both ends
  included), covering frames ``[start, min(frames, start + width))``; then ``num_f_mask`` frequency masks the same
  way over the feature bins with ``max_f``; masks may overlap;
- the masked cells are set to 0, which after mean normalisation is each band's mean.

speakerid draws the same per utterance and masks the whole batch at once. Deliberate differences:

- the fill is each band's mean over the utterance's frames, taken before masking. Every front-end here ends in a
  per-band mean normalisation (instance norm in the seeds' models, CMN in ECAPA_TDNN and ResNet34), so that is 0 up
  to rounding, WeSpeaker's value; on a front-end without it, 0 would be an arbitrary loudness and the mean stays
  neutral (the choice of ESPnet's ``replace_with_zero=False``);
- widths count the model's own feature bins and frames (10 ms): ``spec_freq_width`` 8 is up to 10 % of 80 fbanks
  (WeSpeaker's models), 20 % of the seeds' 40 mels, 3 % of ResNetSE34's 257 STFT bins.

The hook: every model holds ``self.spec_augment`` (an ``nn.Identity`` until training attaches a
:class:`SpecAugment`, see :func:`attach`) and calls it on its features right after the front-end. SpecAugment has no
parameters or buffers, so state dicts, the seeds' weight import and inference checkpoints are unchanged, and
``model.eval()`` (validation, export, evaluation) turns it off.

Determinism: as MUSAN/RIR augmentation (speakerid.augment), every draw comes from a CPU ``torch.Generator``;
:meth:`SpecAugment.at_step` seeds it from (seed, rank, step), so a resumed run masks what an uninterrupted one masks,
with nothing to checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from speakerid.augment import step_generator
from speakerid.errors import SpeakeridError
from speakerid.features import frontend_context

SPEC_AUGMENT_STREAM = 29  # step_generator's purpose: independent of the MUSAN/RIR draws (13) of the same step


@dataclass(frozen=True)
class SpecAugmentConfig:
    """WeSpeaker's spec_aug_conf; the names in the run config are ``augment.spec_<field>``."""

    prob: float = 0.6  # prob: share of utterances masked
    time_masks: int = 1  # num_t_mask
    time_width: int = 10  # max_t, frames (10 ms each)
    freq_masks: int = 1  # num_f_mask
    freq_width: int = 8  # max_f, feature bins

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise SpeakeridError(f"augment.spec_prob must lie in [0, 1], got {self.prob}")
        for name in ("time_masks", "freq_masks"):
            if getattr(self, name) < 0:
                raise SpeakeridError(f"augment.spec_{name} must be ≥ 0 (0: no such masks), got {getattr(self, name)}")
        for name in ("time_width", "freq_width"):
            if getattr(self, name) < 1:
                raise SpeakeridError(f"augment.spec_{name} (the widest mask) must be ≥ 1, got {getattr(self, name)}; "
                                     f"set augment.spec_{name.split('_')[0]}_masks=0 for none")


@dataclass
class MaskPlan:
    """Everything random about one batch's masks; :meth:`SpecAugment.apply` is a pure function of it and the features.

    Spans are ``[start, start + width)`` cut at the feature's end; rows not ``masked`` are left alone.
    """

    masked: Tensor  # (B,) bool
    time_start: Tensor  # (B, time_masks) int64, frames
    time_width: Tensor  # (B, time_masks) int64, ≥ 1
    freq_start: Tensor  # (B, freq_masks) int64, bins
    freq_width: Tensor  # (B, freq_masks) int64, ≥ 1

    def mask(self, n_bins: int, n_frames: int, device: torch.device | str = "cpu") -> Tensor:
        """(B, n_bins, n_frames) bool: True where a time or frequency mask of a masked row lies."""
        time = _spans(self.time_start, self.time_width, n_frames, device)  # (B, n_frames)
        freq = _spans(self.freq_start, self.freq_width, n_bins, device)  # (B, n_bins)
        return (time[:, None, :] | freq[:, :, None]) & self.masked.to(device)[:, None, None]


def _spans(start: Tensor, width: Tensor, length: int, device: torch.device | str) -> Tensor:
    """(B, length) bool: the union over each row's spans [start, start + width)."""
    positions = torch.arange(length, device=device)
    start, end = start.to(device)[..., None], (start + width).to(device)[..., None]  # (B, K, 1)
    return ((positions >= start) & (positions < end)).any(dim=1)


class SpecAugment(nn.Module):
    """``spec_augment(features (B, …, n_bins, n_frames)) → same shape``: masked in training mode, untouched in eval mode.

    No parameters, no buffers. Draws come from ``self.generator`` (:meth:`at_step` sets it for a training step).
    """

    def __init__(self, config: SpecAugmentConfig, seed: int = 0, stream: int = 0) -> None:
        super().__init__()
        self.config = config
        self.seed, self.stream = seed, stream
        self.generator = torch.Generator().manual_seed(seed)
        self.last_masked = 0  # utterances masked by the last training-mode call, for the metrics log

    def extra_repr(self) -> str:
        return str(self.config)

    def at_step(self, step: int) -> None:
        """Masks of training step ``step`` drawn from (seed, stream, step) alone: exact on resume, nothing saved."""
        self.generator = step_generator(self.seed, self.stream, step, purpose=SPEC_AUGMENT_STREAM)

    def forward(self, features: Tensor) -> Tensor:
        if not self.training:
            return features
        plan = self.draw(features.shape[0], features.shape[-2], features.shape[-1])
        self.last_masked = int(plan.masked.sum())
        return self.apply(features, plan)

    def draw(self, batch: int, n_bins: int, n_frames: int, generator: torch.Generator | None = None) -> MaskPlan:
        """Which rows are masked, and every mask's start and width, on the CPU (WeSpeaker's randint ranges)."""
        c, g = self.config, self.generator if generator is None else generator
        masked = torch.rand(batch, generator=g, dtype=torch.float64) < c.prob
        time_start = torch.randint(0, n_frames, (batch, c.time_masks), generator=g)
        time_width = torch.randint(1, c.time_width + 1, (batch, c.time_masks), generator=g)
        freq_start = torch.randint(0, n_bins, (batch, c.freq_masks), generator=g)
        freq_width = torch.randint(1, c.freq_width + 1, (batch, c.freq_masks), generator=g)
        return MaskPlan(masked, time_start, time_width, freq_start, freq_width)

    @staticmethod
    def apply(features: Tensor, plan: MaskPlan) -> Tensor:
        """Masked cells become their band's mean over the utterance's frames; every other cell is returned bit-exact."""
        if not bool(plan.masked.any()):
            return features
        batch, n_bins, n_frames = features.shape[0], features.shape[-2], features.shape[-1]
        with frontend_context(features.device.type):
            mask = plan.mask(n_bins, n_frames, features.device)
            mask = mask.reshape(batch, *[1] * (features.dim() - 3), n_bins, n_frames)
            return torch.where(mask, features.mean(dim=-1, keepdim=True), features)


def attach(model: nn.Module, spec_augment: SpecAugment, name: str) -> None:
    """Put ``spec_augment`` in ``model``'s hook (its ``spec_augment`` attribute, an ``nn.Identity`` by default)."""
    if not isinstance(getattr(model, "spec_augment", None), nn.Module):
        raise SpeakeridError(
            f"model {name} has no SpecAugment hook: give it `self.spec_augment = nn.Identity()` in __init__ and call "
            "`features = self.spec_augment(features)` right after its front-end (as speakerid/models/* do), "
            "or set augment.spec_augment=false"
        )
    model.spec_augment = spec_augment


__all__ = ["MaskPlan", "SpecAugment", "SpecAugmentConfig", "attach"]
