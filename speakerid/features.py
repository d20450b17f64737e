"""Front-ends in plain torch: waveforms ``(B, samples)`` → features ``(B, n_bins, frames)``.

Input convention: float waveforms at full scale, ``int16 / 32768`` in [-1, 1). That is what
voxceleb_trainer's ``loadWAV`` feeds its models (``soundfile.read`` with its default float64 dtype);
the masked-proxy fork and older voxceleb_trainer read with ``scipy.io.wavfile`` and fed int16-valued
floats instead. log + InstanceNorm removes a constant gain, so the two differ only through the
``+1e-6`` floor. ``int16_to_float`` is the one conversion speakerid uses.

Two families:

- the seeds' log-mel (``MelSpectrogram`` with ``PreEmphasis``), equal to
  ``torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=512, win_length=400, hop_length=160,
  window_fn=…, n_mels=n)``, with the same submodule and buffer names so a seed state dict loads;
- a Kaldi-style fbank (``KaldiFbank``), equal to ``torchaudio.compliance.kaldi.fbank`` with dither 0, for
  the modern models (ECAPA-TDNN, ResNet34).

Features are computed in float32 without gradient, even under autocast (``frontend_context``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speakerid.errors import SpeakeridError

INT16_FULL_SCALE = 32768.0
WINDOWS = ("hamming", "hann")


def int16_to_float(samples: Tensor) -> Tensor:
    """int16 samples → float32 at full scale [-1, 1), the input every speakerid model expects."""
    return samples.to(torch.float32) / INT16_FULL_SCALE


@contextlib.contextmanager
def frontend_context(device_type: str) -> Iterator[None]:
    """No gradient, no autocast: the seeds compute their features this way (float32 even under AMP)."""
    with torch.no_grad(), torch.autocast(device_type=device_type, enabled=False):
        yield


def _window(name: str, length: int) -> Tensor:
    # periodic windows, as torch.hamming_window / torch.hann_window give by default (torchaudio's window_fn)
    # torch builds a periodic window as a view of a longer one; clone so the buffer owns its storage
    # (safetensors, and so accelerate's save_state, refuse to store a view)
    if name == "hamming":
        return torch.hamming_window(length).clone()
    if name == "hann":
        return torch.hann_window(length).clone()
    raise SpeakeridError(f"window {name!r} is not known; use one of {', '.join(WINDOWS)}")


class PreEmphasis(nn.Module):
    """y[t] = x[t] − coef·x[t−1], with x[−1] := x[1] (reflect pad of 1 on the left; the seed's PreEmphasis)."""

    def __init__(self, coef: float = 0.97) -> None:
        super().__init__()
        self.coef = coef
        # the seed keeps the filter as a buffer, so its state dicts carry `…flipped_filter`
        self.register_buffer("flipped_filter", torch.tensor([[[-coef, 1.0]]]))

    def forward(self, waveform: Tensor) -> Tensor:
        padded = F.pad(waveform.unsqueeze(1), (1, 0), mode="reflect")
        return F.conv1d(padded, self.flipped_filter.to(waveform.dtype)).squeeze(1)


class Spectrogram(nn.Module):
    """|STFT|^power, ``(B, samples)`` → ``(B, n_fft//2 + 1, frames)``; window buffer named ``window`` as torchaudio's."""

    def __init__(
        self,
        n_fft: int = 512,
        win_length: int = 400,
        hop_length: int = 160,
        window: str = "hamming",
        power: float = 2.0,
        center: bool = True,
        persistent: bool = True,
    ) -> None:
        super().__init__()
        self.n_fft, self.win_length, self.hop_length = n_fft, win_length, hop_length
        self.power, self.center = power, center
        self.register_buffer("window", _window(window, win_length), persistent=persistent)

    def forward(self, waveform: Tensor) -> Tensor:
        spec = torch.stft(
            waveform, self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
            window=self.window.to(waveform.dtype),
            center=self.center, pad_mode="reflect", normalized=False, onesided=True, return_complex=True,
        )
        return spec.abs() if self.power == 1.0 else spec.abs().pow(self.power)


def mel_to_hz_htk(mel: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def htk_mel_filterbank(n_stft: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                       f_max: float | None = None) -> Tensor:
    """Triangular filters on the HTK mel scale, no area normalisation: ``(n_stft, n_mels)`` float32.

    Computed in float32 arithmetic from float64 end points, as torchaudio does, so the matrix equals the
    ``fb`` buffer in the seeds' checkpoints (a float64 computation differs by up to 5e-6).
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    bin_hz = torch.linspace(0, sample_rate // 2, n_stft)
    mel_low, mel_high = (2595.0 * math.log10(1.0 + f / 700.0) for f in (f_min, f_max))
    hz_edges = mel_to_hz_htk(torch.linspace(mel_low, mel_high, n_mels + 2))
    lower, centre, upper = hz_edges[:-2], hz_edges[1:-1], hz_edges[2:]
    rising = (bin_hz[:, None] - lower) / (centre - lower)
    falling = (upper - bin_hz[:, None]) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


class MelScale(nn.Module):
    """Power spectrogram → mel energies; filter matrix buffer ``fb`` of shape (n_stft, n_mels), as torchaudio's."""

    def __init__(self, n_mels: int = 40, sample_rate: int = 16000, f_min: float = 0.0, f_max: float | None = None,
                 n_stft: int = 257, persistent: bool = True) -> None:
        super().__init__()
        self.register_buffer("fb", htk_mel_filterbank(n_stft, n_mels, sample_rate, f_min, f_max),
                             persistent=persistent)

    def forward(self, spec: Tensor) -> Tensor:
        return torch.matmul(spec.transpose(-1, -2), self.fb.to(spec.dtype)).transpose(-1, -2)


class MelSpectrogram(nn.Module):
    """The seeds' ``torchaudio.transforms.MelSpectrogram`` (children ``spectrogram`` and ``mel_scale``), in plain torch.

    Centered STFT with reflect padding, power 2, HTK mel scale without normalisation, f_min..f_max (sr/2).
    """

    def __init__(self, n_mels: int = 40, sample_rate: int = 16000, n_fft: int = 512, win_length: int = 400,
                 hop_length: int = 160, window: str = "hamming", f_min: float = 0.0,
                 f_max: float | None = None) -> None:
        super().__init__()
        self.n_mels = n_mels
        self.spectrogram = Spectrogram(n_fft, win_length, hop_length, window=window, power=2.0)
        self.mel_scale = MelScale(n_mels, sample_rate, f_min, f_max, n_stft=n_fft // 2 + 1)

    def forward(self, waveform: Tensor) -> Tensor:
        return self.mel_scale(self.spectrogram(waveform))


def seed_log_mel(torchfb: nn.Module, waveform: Tensor, log_input: bool = True) -> Tensor:
    """The seeds' feature block: ``InstanceNorm1d(log(torchfb(x) + 1e-6))`` over time, float32, no gradient.

    Returns ``(B, 1, n_mels, frames)``, ready for a 2-D CNN. Quirk kept: the ``+1e-6`` is added even when
    ``log_input`` is False.
    """
    with frontend_context(waveform.device.type):
        features = torchfb(waveform.to(torch.float32)) + 1e-6
        if log_input:
            features = features.log()
        # InstanceNorm1d(n_mels) without affine and without running statistics: per band, over time
        features = F.instance_norm(features, eps=1e-5)
    return features.unsqueeze(1)


def povey_window(length: int) -> Tensor:
    """Kaldi's default window: a symmetric Hann window raised to 0.85."""
    return torch.hann_window(length, periodic=False).pow(0.85)


def kaldi_mel_filterbank(n_mels: int, n_fft: int, sample_rate: float, low_freq: float = 20.0,
                         high_freq: float = 0.0) -> Tensor:
    """Kaldi's mel banks (mel = 1127·ln(1 + f/700)), ``(n_mels, n_fft//2 + 1)``; the Nyquist column is zero.

    ``high_freq <= 0`` is an offset from Nyquist, as in Kaldi. float32 arithmetic from float64 end points,
    as torchaudio.compliance.kaldi computes it.
    """
    nyquist = sample_rate / 2
    high_freq = high_freq + nyquist if high_freq <= 0 else high_freq
    mel_low, mel_high = (1127.0 * math.log(1.0 + f / 700.0) for f in (low_freq, high_freq))
    delta = (mel_high - mel_low) / (n_mels + 1)
    edges = mel_low + torch.arange(n_mels + 2, dtype=torch.float32) * delta
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    bins = 1127.0 * (1.0 + sample_rate / n_fft * torch.arange(n_fft // 2, dtype=torch.float32) / 700.0).log()
    rising, falling = (bins - left) / (centre - left), (right - bins) / (right - centre)
    return F.pad(torch.clamp(torch.minimum(rising, falling), min=0.0), (0, 1))


class KaldiFbank(nn.Module):
    """Kaldi ``compute-fbank-feats`` defaults, batched: ``(B, samples)`` full-scale → ``(B, n_mels, frames)``.

    25 ms Povey window, 10 ms shift, snip_edges (frames = 1 + (N − 400) // 160), per-frame DC removal,
    pre-emphasis 0.97 inside each frame (first sample against itself), zero-pad to 512, power spectrum,
    mel banks 20 Hz–Nyquist, ``log(max(x, float32 eps))``, no dither. The waveform is first multiplied by
    ``input_scale`` (32768: Kaldi and WeSpeaker compute on int16-valued samples, which sets what the
    eps floor means). ``subtract_mean`` removes each band's mean over time (CMN).
    """

    def __init__(self, n_mels: int = 80, sample_rate: int = 16000, frame_length_ms: float = 25.0,
                 frame_shift_ms: float = 10.0, low_freq: float = 20.0, high_freq: float = 0.0,
                 preemphasis: float = 0.97, input_scale: float = INT16_FULL_SCALE,
                 subtract_mean: bool = False) -> None:
        super().__init__()
        self.n_mels = n_mels
        self.frame_length = int(sample_rate * frame_length_ms / 1000)
        self.frame_shift = int(sample_rate * frame_shift_ms / 1000)
        self.n_fft = 1 << (self.frame_length - 1).bit_length()  # round_to_power_of_two
        self.preemphasis, self.input_scale, self.subtract_mean = preemphasis, input_scale, subtract_mean
        # derived constants, not weights: kept out of state dicts
        self.register_buffer("window", povey_window(self.frame_length), persistent=False)
        self.register_buffer("banks", kaldi_mel_filterbank(n_mels, self.n_fft, sample_rate, low_freq, high_freq),
                             persistent=False)

    def forward(self, waveform: Tensor) -> Tensor:
        # not while tracing: a Python test on the length would be baked into the trace (speakerid.export)
        if not torch.jit.is_tracing() and waveform.shape[-1] < self.frame_length:
            raise SpeakeridError(f"KaldiFbank needs at least {self.frame_length} samples, got {waveform.shape[-1]}")
        frames = (waveform * self.input_scale).unfold(-1, self.frame_length, self.frame_shift)  # (B, m, 400)
        frames = frames - frames.mean(dim=-1, keepdim=True)
        if self.preemphasis:
            previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
            frames = frames - self.preemphasis * previous
        spectrum = torch.fft.rfft(frames * self.window.to(frames.dtype), n=self.n_fft).abs().pow(2)  # (B, m, 257)
        energies = torch.matmul(spectrum, self.banks.t().to(spectrum.dtype))
        features = energies.clamp(min=torch.finfo(torch.float32).eps).log().transpose(-1, -2)  # Kaldi's float eps
        if self.subtract_mean:
            features = features - features.mean(dim=-1, keepdim=True)
        return features


def kaldi_log_fbank(fbank: KaldiFbank, waveform: Tensor) -> Tensor:
    """Apply ``fbank`` in float32 without gradient (autocast off), as every front-end here runs."""
    with frontend_context(waveform.device.type):
        return fbank(waveform.to(torch.float32))


def n_frames_centered(n_samples: int, hop_length: int = 160) -> int:
    """Frames of a centered STFT: 1 + N // hop (32,240 samples → 202)."""
    return 1 + n_samples // hop_length


def n_frames_kaldi(n_samples: int, frame_length: int = 400, frame_shift: int = 160) -> int:
    """Frames with Kaldi's snip_edges: 1 + (N − frame_length) // shift (32,240 samples → 200)."""
    return 1 + (n_samples - frame_length) // frame_shift if n_samples >= frame_length else 0


__all__ = [
    "INT16_FULL_SCALE", "KaldiFbank", "MelScale", "MelSpectrogram", "PreEmphasis", "Spectrogram",
    "frontend_context", "htk_mel_filterbank", "int16_to_float", "kaldi_log_fbank", "kaldi_mel_filterbank",
    "n_frames_centered", "n_frames_kaldi", "povey_window", "seed_log_mel",
]
