"""Shard-member codecs: flac crops and whole members decoded by dr_flac give libsndfile's samples, or one error."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from speakerid.audio import crop_start, decode, encode, read_crop

RATE = 16000
L = 32240  # a 200-frame training crop


def speech_like(n: int, seed: int) -> np.ndarray:
    """Voiced bursts, pauses and noise at a speech-like level: every flac predictor order and rice partition."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / RATE
    voiced = np.sin(2 * np.pi * rng.uniform(90, 250) * t) * (np.sin(2 * np.pi * 3 * t) > 0)
    x = 6000 * voiced + rng.normal(0, rng.uniform(30, 3000), n)
    x[rng.integers(0, n):][:RATE // 4] = 0  # a pause
    return np.clip(x, -32768, 32767).astype(np.int16)


def libsndfile_crop(data: bytes, n: int, u: float) -> np.ndarray:
    """The crop as libsndfile reads it (the reference the dr_flac path must equal)."""
    whole, _ = soundfile.read(io.BytesIO(data), dtype="int16")
    padded = whole if n > L else np.pad(whole, (0, L + 1 - n), mode="wrap")
    start = crop_start(n, L, u)
    return padded[start:start + L]


@pytest.mark.parametrize("seconds", [0.3, 2.0, 2.1, 4.7, 8.0])
def test_flac_crops_and_whole_members_are_libsndfiles_samples(seconds):
    n = int(seconds * RATE)
    source = speech_like(n, seed=n)
    data = encode(source, RATE, "flac")
    samples, rate = decode(data)
    assert rate == RATE and samples.dtype == np.int16 and np.array_equal(samples, source)
    for u in np.random.default_rng(n).uniform(0, 1, 25).tolist() + [0.0, 0.999999]:
        for verified in (True, False):  # dr_flac, libsndfile
            crop = read_crop(data, "flac", n, L, u, verified=verified)
            assert crop.dtype == np.int16 and crop.shape == (L,)
            assert np.array_equal(crop, libsndfile_crop(data, n, u)), f"{seconds} s, u = {u}, verified={verified}"


def test_a_damaged_or_truncated_flac_member_is_an_error_not_fewer_samples():
    n = 5 * RATE
    data = encode(speech_like(n, seed=1), RATE, "flac")
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF  # a frame that fails its CRC: dr_flac drops it, libsndfile stops
    with pytest.raises(ValueError, match="frame fails its CRC"):  # whole: short of its STREAMINFO length
        decode(bytes(damaged))
    # a crop over it from unverified bytes goes to libsndfile; dr_flac would give a shifted crop of the full length
    with pytest.raises(RuntimeError):
        read_crop(bytes(damaged), "flac", n, L, 0.5)
    with pytest.raises(ValueError, match="ends before sample"):  # truncated
        read_crop(data[:len(data) // 3], "flac", n, L, 0.9, verified=True)
    with pytest.raises(ValueError, match="ends early"):
        read_crop(data[:len(data) // 2], "flac", n, L, 0.4, verified=True)
    with pytest.raises((ValueError, RuntimeError)):  # the reader counts both as an undecodable member
        read_crop(data[:len(data) // 3], "flac", n, L, 0.9)
    with pytest.raises(ValueError, match="not a decodable flac stream"):
        decode(b"fLaC" + bytes(40))


@pytest.mark.parametrize("channels, subtype", [(2, "PCM_16"), (1, "PCM_24")])
def test_a_flac_member_that_is_not_mono_16_bit_is_refused(channels, subtype):
    samples = np.zeros((RATE, channels), dtype=np.int16).squeeze()
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, RATE, format="FLAC", subtype=subtype)
    with pytest.raises(ValueError, match="not 1 of 16"):
        decode(buffer.getvalue())
