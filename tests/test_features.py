"""Front-ends against independent numpy references written from the formulas (and torchaudio, where it imports)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speakerid.errors import SpeakeridError
from speakerid.features import (
    KaldiFbank,
    MelSpectrogram,
    PreEmphasis,
    Spectrogram,
    int16_to_float,
    kaldi_log_fbank,
    n_frames_centered,
    n_frames_kaldi,
    seed_log_mel,
)

SR = 16000


def speechlike(batch: int = 2, samples: int = 8000, seed: int = 0) -> np.ndarray:
    """Full-scale test signal: noise plus two tones (energy in every mel band), float64."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / SR
    tones = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 3100 * t)
    return 0.05 * rng.standard_normal((batch, samples)) + tones


# ---- numpy references ---------------------------------------------------------------------------------

def np_window(name: str, length: int, periodic: bool = True) -> np.ndarray:
    n = np.arange(length)
    denominator = length if periodic else length - 1
    if name == "hamming":
        return 0.54 - 0.46 * np.cos(2 * np.pi * n / denominator)
    return 0.5 - 0.5 * np.cos(2 * np.pi * n / denominator)


def np_htk_mel_matrix(n_mels: int, n_fft: int = 512, f_max: float = SR / 2) -> np.ndarray:
    """(n_fft//2+1, n_mels) triangles with corners equally spaced on mel = 2595·log10(1 + f/700)."""
    to_mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    to_hz = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    corners = to_hz(np.linspace(to_mel(0.0), to_mel(f_max), n_mels + 2))
    freqs = np.linspace(0, SR // 2, n_fft // 2 + 1)
    matrix = np.zeros((len(freqs), n_mels))
    for m in range(n_mels):
        lo, mid, hi = corners[m], corners[m + 1], corners[m + 2]
        for k, f in enumerate(freqs):
            if lo < f <= mid:
                matrix[k, m] = (f - lo) / (mid - lo)
            elif mid < f < hi:
                matrix[k, m] = (hi - f) / (hi - mid)
    return matrix


def np_mel_spectrogram(x: np.ndarray, n_mels: int, window: str, preemphasis: bool = False) -> np.ndarray:
    """Seed front-end by hand: [pre-emphasis], reflect-pad 256, frames of 512 every 160, centered 400-window."""
    if preemphasis:
        previous = np.concatenate([x[:, 1:2], x[:, :-1]], axis=1)  # x[-1] := x[1]
        x = x - float(np.float32(0.97)) * previous  # the seed's filter is a float32 tensor
    padded = np.pad(x, ((0, 0), (256, 256)), mode="reflect")
    frames = 1 + x.shape[1] // 160
    window512 = np.zeros(512)
    window512[56:456] = np_window(window, 400)
    stacked = np.stack([padded[:, t * 160:t * 160 + 512] for t in range(frames)], axis=1)  # (B, T, 512)
    power = np.abs(np.fft.rfft(stacked * window512, axis=-1)) ** 2
    return np.einsum("btk,km->bmt", power, np_htk_mel_matrix(n_mels))


def np_kaldi_fbank(x: np.ndarray, n_mels: int = 80) -> np.ndarray:
    """compute-fbank-feats defaults (dither 0) on int16-valued samples, (B, n_mels, frames)."""
    frames = 1 + (x.shape[1] - 400) // 160
    stacked = np.stack([x[:, t * 160:t * 160 + 400] for t in range(frames)], axis=1)
    stacked = stacked - stacked.mean(axis=-1, keepdims=True)
    previous = np.concatenate([stacked[..., :1], stacked[..., :-1]], axis=-1)
    stacked = stacked - 0.97 * previous
    stacked = stacked * np_window("hann", 400, periodic=False) ** 0.85
    power = np.abs(np.fft.rfft(stacked, n=512, axis=-1)) ** 2  # (B, T, 257)
    to_mel = lambda f: 1127 * np.log(1 + f / 700)  # noqa: E731
    lo_mel, hi_mel = to_mel(20.0), to_mel(SR / 2)
    delta = (hi_mel - lo_mel) / (n_mels + 1)
    bins_mel = to_mel(np.arange(256) * SR / 512)
    banks = np.zeros((n_mels, 257))
    for m in range(n_mels):
        left, centre, right = lo_mel + m * delta, lo_mel + (m + 1) * delta, lo_mel + (m + 2) * delta
        up = (bins_mel - left) / (centre - left)
        down = (right - bins_mel) / (right - centre)
        banks[m, :256] = np.maximum(0, np.minimum(up, down))
    energies = np.einsum("btk,mk->bmt", power, banks)
    return np.log(np.maximum(energies, np.finfo(np.float32).eps))


def assert_close_relative(actual: torch.Tensor, expected: np.ndarray, rtol: float, floor: float = 0.0) -> None:
    """|a − e| ≤ rtol·|e| + floor·max|e| everywhere (``floor``: float32 FFT rounding on near-empty bands)."""
    actual = actual.detach().double().numpy()
    bound = rtol * np.abs(expected) + floor * np.abs(expected).max()
    excess = np.abs(actual - expected) / bound
    at = np.unravel_index(excess.argmax(), excess.shape)
    assert excess.max() <= 1, f"error {abs(actual[at] - expected[at]):.3g} at {at} where expected is {expected[at]:.4g}"


# ---- seed log-mel -----------------------------------------------------------------------------------

SEED_FRONTENDS = [("hamming", 40, False), ("hann", 40, False), ("hamming", 64, True)]  # L, VGGVox, V2


def seed_frontend(window: str, n_mels: int, preemphasis: bool) -> torch.nn.Module:
    mel = MelSpectrogram(n_mels=n_mels, window=window)
    return torch.nn.Sequential(PreEmphasis(), mel) if preemphasis else mel


@pytest.mark.parametrize("window,n_mels,preemphasis", SEED_FRONTENDS)
def test_mel_spectrogram_float32_matches_numpy_reference(window, n_mels, preemphasis):
    x = speechlike().astype(np.float32)
    ours = seed_frontend(window, n_mels, preemphasis)(torch.from_numpy(x))
    assert ours.shape == (2, n_mels, n_frames_centered(x.shape[1]))
    # 1e-5 relative; the floor (1e-6 of the largest value) covers float32 FFT rounding in near-empty bands
    assert_close_relative(ours, np_mel_spectrogram(x.astype(np.float64), n_mels, window, preemphasis),
                          rtol=1e-5, floor=1e-6)


def test_preemphasis_reflects_one_sample_on_the_left():
    x = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    y = PreEmphasis(0.97)(x)
    torch.testing.assert_close(y, torch.tensor([[1 - 0.97 * 2, 2 - 0.97 * 1, 4 - 0.97 * 2, 8 - 0.97 * 4]]))


def test_seed_log_mel_is_log_plus_instance_norm_in_float32_without_grad():
    x = torch.from_numpy(speechlike(seed=2)).float().requires_grad_(True)
    torchfb = MelSpectrogram(n_mels=40)
    features = seed_log_mel(torchfb, x, log_input=True)
    assert features.shape == (2, 1, 40, 51) and features.dtype == torch.float32 and not features.requires_grad
    logmel = np.log(np_mel_spectrogram(speechlike(seed=2).astype(np.float32).astype(np.float64), 40, "hamming") + 1e-6)
    expected = (logmel - logmel.mean(-1, keepdims=True)) / np.sqrt(logmel.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(features[:, 0].double().numpy(), expected, atol=2e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = seed_log_mel(torchfb, x, log_input=True)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, features)


def test_buffers_carry_torchaudio_names():
    keys = set(torch.nn.Sequential(PreEmphasis(), MelSpectrogram(n_mels=64)).state_dict())
    assert keys == {"0.flipped_filter", "1.spectrogram.window", "1.mel_scale.fb"}
    assert MelSpectrogram(n_mels=40).state_dict()["mel_scale.fb"].shape == (257, 40)


def test_front_ends_match_torchaudio_when_it_imports():
    try:
        import torchaudio  # noqa: PLC0415 (optional: its PyPI wheels are CUDA builds)
    except Exception as error:  # ImportError, or OSError from a CUDA-only build
        pytest.skip(f"torchaudio unusable here: {type(error).__name__}: {error}")
    x = torch.from_numpy(speechlike(seed=3)).float()
    for window_fn, window, n_mels in ((torch.hamming_window, "hamming", 40), (torch.hann_window, "hann", 40),
                                      (torch.hamming_window, "hamming", 64)):
        reference = torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=512, win_length=400, hop_length=160,
                                                         window_fn=window_fn, n_mels=n_mels)
        ours = MelSpectrogram(n_mels=n_mels, window=window)
        assert set(ours.state_dict()) == set(reference.state_dict())
        torch.testing.assert_close(ours.mel_scale.fb, reference.mel_scale.fb, rtol=0, atol=1e-7)
        assert_close_relative(ours(x), reference(x).double().numpy(), rtol=1e-5)
    reference = torchaudio.compliance.kaldi.fbank(x[:1] * 32768, num_mel_bins=80, dither=0.0)
    torch.testing.assert_close(KaldiFbank(80)(x[:1])[0].t(), reference, rtol=1e-5, atol=1e-5)


# ---- Kaldi fbank ------------------------------------------------------------------------------------

def test_kaldi_fbank_matches_numpy_reference():
    x = speechlike(samples=4800, seed=4)
    ours = KaldiFbank(n_mels=80)(torch.from_numpy(x).float())
    expected = np_kaldi_fbank(x.astype(np.float32).astype(np.float64) * 32768)
    assert ours.shape == (2, 80, n_frames_kaldi(4800)) == (2, 80, 28)
    np.testing.assert_allclose(ours.double().numpy(), expected, rtol=1e-5, atol=1e-4)


def test_kaldi_fbank_mean_normalisation_and_float32_under_autocast():
    x = torch.from_numpy(speechlike(seed=5)).float()
    plain = KaldiFbank(80)(x)
    fbank = KaldiFbank(80, subtract_mean=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        normalised = kaldi_log_fbank(fbank, x)
    assert normalised.dtype == torch.float32
    torch.testing.assert_close(normalised, plain - plain.mean(-1, keepdim=True))
    assert fbank.state_dict() == {}  # window and banks are derived, not weights


def test_kaldi_fbank_rejects_input_shorter_than_one_frame():
    with pytest.raises(SpeakeridError, match="at least 400 samples"):
        KaldiFbank(80)(torch.zeros(1, 399))


def test_unknown_window_is_a_user_error():
    with pytest.raises(SpeakeridError, match="hamming, hann"):
        Spectrogram(window="blackman")


def test_int16_to_float_is_full_scale():
    samples = torch.tensor([-32768, -1, 0, 16384, 32767], dtype=torch.int16)
    torch.testing.assert_close(int16_to_float(samples),
                               torch.tensor([-1.0, -1 / 32768, 0.0, 0.5, 32767 / 32768]))
