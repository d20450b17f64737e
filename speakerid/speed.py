"""Speed perturbation, batched on the training device: each speed is a new speaker identity (as WeSpeaker, 3D-Speaker).

Speed s plays the audio at rate s (sox/Kaldi ``speed``, WeSpeaker's ``speed_perturb``): the waveform is resampled
from 16000·s Hz to 16000 Hz, so s = 0.9 makes it 1/0.9 times longer and every frequency f becomes f·s (pitch and
formants move, which is why the modern recipes count a perturbed speaker as another speaker).

- One speed per speaker row, drawn uniformly from ``speeds``: all M utterances of a row share it, so an N×M batch
  still holds N distinct identities.
- Label space: speed index k (1.0 is k = 0, then the other speeds in the order given) turns label y into
  y + k·n_speakers, so the classification and proxy losses have n_speakers × len(speeds) classes and speed 1.0 keeps
  the original labels. :func:`label_space` is what the run records in its checkpoints and export.
- Length: the reader delivers ``read_samples(crop)`` samples per utterance (enough for the fastest speed, plus an edge
  on both sides); after resampling every row is cut back to the crop, skipping the edge where the filter saw padding.
- Resampling: windowed-sinc (Hann window, 6 zero crossings, roll-off 0.99) on the rational ratio reduced by gcd
  (0.9 → 9:10), applied as one strided ``conv1d`` with a polyphase kernel: the formula of
  ``torchaudio.functional.resample``'s ``sinc_interp_hann``, written in plain torch (torchaudio is not imported).
- Determinism: the speeds are drawn from the step's CPU generator (:func:`speakerid.augment.step_generator`), before
  the augmentation draws, so a resumed run perturbs what an uninterrupted one does.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor

from speakerid.augment import step_generator
from speakerid.errors import SpeakeridError
from speakerid.features import frontend_context

SAMPLE_RATE = 16000
ZERO_CROSSINGS = 6  # torchaudio's lowpass_filter_width default
ROLLOFF = 0.99  # torchaudio's rolloff default: the cut-off lies 1 % under the lower Nyquist frequency
EDGE = 32  # output samples skipped at the start of each row: the filter's left half reaches into zero padding there


def check_speeds(speeds, where: str = "augment.speed_perturb") -> tuple[float, ...]:
    """The configured speeds as a tuple, with 1.0 first (k = 0 keeps the original labels); [] means off."""
    if not isinstance(speeds, (list, tuple)):
        raise SpeakeridError(f"{where}: give a list of speeds, e.g. [0.9, 1.0, 1.1] ([] for none), got {speeds!r}")
    speeds = list(speeds)
    if not speeds:
        return ()
    if any(isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.5 <= s <= 2.0 for s in speeds):
        raise SpeakeridError(f"{where}: speeds are numbers between 0.5 and 2.0, got {speeds}; e.g. [0.9, 1.0, 1.1]")
    if len(set(speeds)) != len(speeds) or 1.0 not in speeds:
        raise SpeakeridError(f"{where}: give distinct speeds including 1.0 (the original speakers), got {speeds}; "
                             "e.g. [0.9, 1.0, 1.1], or [] for no speed perturbation")
    return (1.0, *(float(s) for s in speeds if s != 1.0))


def label_space(speeds, n_speakers: int) -> dict:
    """What the run's labels mean (label + k·n_speakers, k the index in speeds): recorded in training checkpoints
    and in the inference export."""
    speeds = check_speeds(speeds) or (1.0,)
    return {"n_speakers": n_speakers, "speeds": list(speeds), "n_classes": n_speakers * len(speeds)}


def speed_ratio(speed: float, sample_rate: int = SAMPLE_RATE) -> tuple[int, int]:
    """(orig, new): resample from sample_rate·speed to sample_rate, reduced by gcd (0.9 → (9, 10), 1.1 → (11, 10))."""
    ratio = Fraction(round(sample_rate * speed), sample_rate)
    return ratio.numerator, ratio.denominator


def read_samples(crop_samples: int, speeds) -> int:
    """Samples to read per utterance so every speed still yields ``crop_samples`` after the edge is skipped."""
    speeds = check_speeds(speeds)
    if not speeds:
        return crop_samples
    fastest = max(Fraction(*speed_ratio(s)) for s in speeds)  # exact: (crop + 2·EDGE)·0.9 must not round down
    return math.ceil((crop_samples + 2 * EDGE) * fastest)


def sinc_kernel(orig: int, new: int, device: torch.device | str = "cpu") -> tuple[Tensor, int]:
    """The polyphase kernel (new, 1, 2·width + orig) and its half-width in input samples (torchaudio's formula)."""
    base = min(orig, new) * ROLLOFF
    width = math.ceil(ZERO_CROSSINGS * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = (torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx) * base
    t = t.clamp(-ZERO_CROSSINGS, ZERO_CROSSINGS)
    window = torch.cos(t * math.pi / ZERO_CROSSINGS / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    return (sinc * window * (base / orig)).to(device=device, dtype=torch.float32), width


def resample(waveforms: Tensor, orig: int, new: int) -> Tensor:
    """(B, L) float → (B, ceil(L·new/orig)): a batched band-limited resampling, one conv1d on the waveforms' device."""
    if orig == new:
        return waveforms
    kernel, width = sinc_kernel(orig, new, waveforms.device)
    length = waveforms.shape[-1]
    padded = F.pad(waveforms.unsqueeze(1), (width, width + orig))
    out = F.conv1d(padded, kernel, stride=orig)  # (B, new, frames): phase p of frame j is output sample j·new + p
    return out.transpose(1, 2).reshape(waveforms.shape[0], -1)[:, : math.ceil(length * new / orig)]


class SpeedPerturb:
    """``draw`` one speed index per speaker row from the step's generator; ``apply`` resamples and crops the batch;
    ``labels`` maps speaker labels into the perturbed label space."""

    def __init__(self, speeds, n_speakers: int, crop_samples: int, seed: int = 0, stream: int = 0) -> None:
        self.speeds = check_speeds(speeds)
        self.seed, self.stream = seed, stream
        if not self.speeds:
            raise SpeakeridError("SpeedPerturb needs speeds, e.g. [0.9, 1.0, 1.1]")
        self.n_speakers, self.crop_samples = n_speakers, crop_samples
        self.read_samples = read_samples(crop_samples, self.speeds)

    def at_step(self, step: int) -> torch.Generator:
        """The step's generator when no augmenter makes it (the same one :meth:`Augmenter.at_step` returns)."""
        return step_generator(self.seed, self.stream, step)

    def draw(self, rows: int, generator: torch.Generator | None = None) -> Tensor:
        """(rows,) int64 speed indices, uniform over the speeds (WeSpeaker: random.randint over its list)."""
        return torch.randint(len(self.speeds), (rows,), generator=generator)

    def labels(self, labels: Tensor, indices: Tensor) -> Tensor:
        return labels + indices.to(labels.device) * self.n_speakers

    def apply(self, waveforms: Tensor, indices: Tensor) -> Tensor:
        """float (N, M, read_samples) → (N, M, crop_samples): row i played at speeds[indices[i]], one conv per speed."""
        n, m, length = waveforms.shape
        if length != self.read_samples:
            raise SpeakeridError(f"speed perturbation expects crops of {self.read_samples} samples from the reader "
                                 f"(data read with the same augment.speed_perturb), got {length}")
        out = torch.empty(n, m, self.crop_samples, dtype=waveforms.dtype, device=waveforms.device)
        with frontend_context(waveforms.device.type):  # float32, no autocast, no gradient: it is data preparation
            for k, speed in enumerate(self.speeds):
                rows = torch.nonzero(indices == k).squeeze(1).to(waveforms.device)
                if len(rows):
                    flat = waveforms[rows].reshape(len(rows) * m, length)
                    played = resample(flat, *speed_ratio(speed))[:, EDGE: EDGE + self.crop_samples]
                    out[rows] = played.reshape(len(rows), m, self.crop_samples).to(out.dtype)
        return out
