"""Deterministic synthetic speaker corpus, shaped like VoxCeleb (for the demo, the tests and the benchmarks).

Synthesis model (source-filter speech, vectorised with numpy):
- source: a glottal flow pulse train (Rosenberg pulse, open quotient per speaker) accumulated from an f0
  contour (speaker mean and range, phrase declination, smooth random movement), with per-period jitter
  and shimmer, differentiated (lip radiation), plus aspiration noise modulated by the glottal flow;
- filter: the time-varying vocal-tract envelope is a product of second-order resonance magnitudes
  |H_k(f)| = F_k^2 / sqrt((F_k^2 - f^2)^2 + (B_k f)^2) on formant tracks F1..F4 interpolated between phone
  targets (scaled by the speaker's vocal-tract length and idiolect offsets), times a fixed speaker part
  (F5, an extra resonance, spectral tilt); it is applied to all STFT frames at once (sqrt-Hann, 75 %
  overlap, weighted overlap-add). Frication, aspiration and background noise are drawn directly as
  complex Gaussian STFT coefficients with the right power spectrum;
- recording: every utterance of one "video" shares a channel (band limits, a random mild EQ, a noise
  floor); each utterance gets its own background noise (SNR 15-40 dB) and loudness.
Every utterance is drawn from its own RNG seeded by (seed, speaker, utterance), so the corpus is
bit-identical whatever the number of worker processes.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile

# Separate random streams, so that adding an utterance never changes a speaker, a channel or the trials.
# Each stream's key has a fixed length: numpy's SeedSequence treats [a, b] and [a, b, 0] as the same seed.
_SPEAKER_STREAM, _VIDEO_STREAM, _UTTERANCE_STREAM, _TRIAL_STREAM, _VIDEO_ID_STREAM = 0, 1, 2, 3, 4
TEST_SPEAKER_OFFSET = 10000  # held-out speakers are id10000.. like VoxCeleb1 next to VoxCeleb2 dev
_VIDEO_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
_PEAK_LIMIT = 0.89  # fraction of int16 full scale never exceeded
_FRICATION_LEVEL = 0.3  # noise sources relative to the glottal source, set from long-term spectra
_ASPIRATION_LEVEL = 0.6
BACKGROUND_SNR_DB = (15.0, 40.0)  # per utterance
_HIGHER_POLE_CORRECTION_DB = 8.0  # per octave above 800 Hz: brings the long-term spectrum near real speech


@dataclass(frozen=True)
class CorpusSpec:
    n_speakers: int = 40  # training speakers
    utts_per_speaker: int = 20
    n_test_speakers: int = 10
    test_utts_per_speaker: int = 10
    videos_per_speaker: int = 4  # a "video" = a recording session with its own channel
    min_seconds: float = 2.0
    max_seconds: float = 12.0
    n_trials: int = 2000  # capped by what the test set allows
    sample_rate: int = 16000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.n_speakers <= TEST_SPEAKER_OFFSET:
            raise ValueError(f"n_speakers must be in [0, {TEST_SPEAKER_OFFSET}], got {self.n_speakers}")
        if min(self.utts_per_speaker, self.n_test_speakers, self.test_utts_per_speaker) < 0:
            raise ValueError("speaker and utterance counts must not be negative")
        if self.videos_per_speaker < 1:
            raise ValueError(f"videos_per_speaker must be at least 1, got {self.videos_per_speaker}")
        if not 0.5 <= self.min_seconds <= self.max_seconds:
            raise ValueError(f"need 0.5 <= min_seconds <= max_seconds, got {self.min_seconds}, {self.max_seconds}")
        if self.seed < 0:
            raise ValueError(f"seed must not be negative, got {self.seed}")
        if self.sample_rate < 8000:
            raise ValueError(f"sample_rate must be at least 8000 Hz, got {self.sample_rate}")


@dataclass(frozen=True)
class CorpusInfo:
    root: Path  # OUT/wav: list paths are relative to it
    train_list: Path
    test_list: Path
    trials: Path
    corpus_json: Path
    n_speakers: int
    n_test_speakers: int
    n_utterances: int  # train + test
    n_trials: int
    hours: float  # train + test
    train_hours: float
    test_hours: float
    n_written: int  # files synthesised by this call (the rest already existed)


# --------------------------------------------------------------------------------------------------
# Phones


@dataclass(frozen=True)
class Phone:
    name: str
    formants_hz: tuple[float, float, float, float] | None  # adult-male F1..F4; None: carried over from neighbours
    bandwidths_hz: tuple[float, float, float, float]
    voicing: float  # level of the glottal source
    frication: float  # level of the noise source at the constriction
    frication_hz: float  # centre of the frication noise spectrum
    frication_bandwidth_hz: float
    aspiration: float  # glottal noise through the vocal tract (h, release of voiceless stops)
    gain_db: float
    duration_s: float  # typical duration at an average speaking rate


def _vowel(name: str, f1: float, f2: float, f3: float, f4: float = 3500.0) -> Phone:
    return Phone(name, (f1, f2, f3, f4), (60 + 0.05 * f1, 70 + 0.04 * f2, 110 + 0.02 * f3, 220.0),
                 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.10)


def _sonorant(name: str, formants: tuple[float, float, float, float], gain_db: float, duration_s: float,
              bandwidths: tuple[float, float, float, float] = (90.0, 150.0, 200.0, 300.0)) -> Phone:
    return Phone(name, formants, bandwidths, 1.0, 0.0, 0.0, 1.0, 0.0, gain_db, duration_s)


def _noise(name: str, voicing: float, frication: float, centre: float, bandwidth: float,
           aspiration: float, gain_db: float, duration_s: float) -> Phone:
    return Phone(name, None, (80.0, 120.0, 170.0, 250.0), voicing, frication, centre, bandwidth, aspiration,
                 gain_db, duration_s)


# Peterson & Barney (1952) adult-male vowel formants; consonants from classic formant-synthesis tables.
PHONES: tuple[Phone, ...] = (
    _vowel("i", 270, 2290, 3010, 3700),
    _vowel("I", 390, 1990, 2550),
    _vowel("E", 530, 1840, 2480),
    _vowel("ae", 660, 1720, 2410),
    _vowel("a", 730, 1090, 2440),
    _vowel("O", 570, 840, 2410),
    _vowel("U", 440, 1020, 2240),
    _vowel("u", 300, 870, 2240),
    _vowel("V", 640, 1190, 2390),
    _vowel("3", 490, 1350, 1690),
    _vowel("@", 500, 1500, 2500),
    _sonorant("m", (280, 1000, 2200, 3300), -9.0, 0.065, (100.0, 250.0, 300.0, 400.0)),
    _sonorant("n", (280, 1500, 2500, 3300), -9.0, 0.060, (100.0, 250.0, 300.0, 400.0)),
    _sonorant("N", (280, 2000, 2600, 3300), -10.0, 0.065, (100.0, 250.0, 300.0, 400.0)),
    _sonorant("l", (360, 1100, 2700, 3500), -4.0, 0.055),
    _sonorant("r", (350, 1100, 1500, 3300), -3.0, 0.055),
    _sonorant("w", (300, 700, 2200, 3300), -4.0, 0.050),
    _sonorant("j", (280, 2200, 2950, 3500), -3.0, 0.050),
    _noise("s", 0.0, 1.0, 6000, 3000, 0.0, 0.0, 0.095),
    _noise("z", 0.5, 0.7, 6000, 3000, 0.0, 0.0, 0.075),
    _noise("S", 0.0, 1.0, 3300, 2200, 0.0, 0.0, 0.100),
    _noise("f", 0.0, 0.55, 5000, 8000, 0.0, 0.0, 0.090),
    _noise("v", 0.5, 0.4, 5000, 8000, 0.0, 0.0, 0.065),
    _noise("T", 0.0, 0.45, 5500, 7000, 0.0, 0.0, 0.085),
    _noise("h", 0.0, 0.0, 1000, 1000, 0.8, 0.0, 0.065),
    _noise("closure", 0.0, 0.0, 1000, 1000, 0.0, 0.0, 0.055),
    _noise("voiced_closure", 0.12, 0.0, 1000, 1000, 0.0, -6.0, 0.050),
    _noise("burst_labial", 0.0, 1.4, 1200, 2500, 0.0, 0.0, 0.012),
    _noise("burst_alveolar", 0.0, 1.4, 4500, 3000, 0.0, 0.0, 0.012),
    _noise("burst_velar", 0.0, 1.4, 2200, 1200, 0.0, 0.0, 0.014),
    _noise("release", 0.0, 0.0, 1000, 1000, 0.6, 0.0, 0.035),
    _noise("pause", 0.0, 0.0, 1000, 1000, 0.0, 0.0, 0.250),
)
PHONE_INDEX = {phone.name: i for i, phone in enumerate(PHONES)}
VOWELS = ("i", "I", "E", "ae", "a", "O", "U", "u", "V", "3", "@")
DIPHTHONGS = (("a", "I"), ("E", "I"), ("O", "I"), ("@", "U"), ("a", "U"))
# A consonant is a short sequence of phones: a stop is closure + burst (+ aspirated release).
CONSONANTS: dict[str, tuple[str, ...]] = {
    "p": ("closure", "burst_labial", "release"), "b": ("voiced_closure", "burst_labial"),
    "t": ("closure", "burst_alveolar", "release"), "d": ("voiced_closure", "burst_alveolar"),
    "k": ("closure", "burst_velar", "release"), "g": ("voiced_closure", "burst_velar"),
    "s": ("s",), "z": ("z",), "S": ("S",), "f": ("f",), "v": ("v",), "T": ("T",), "h": ("h",),
    "m": ("m",), "n": ("n",), "N": ("N",), "l": ("l",), "r": ("r",), "w": ("w",), "j": ("j",),
}
_ONSETS = tuple(c for c in CONSONANTS if c != "N")
_CODAS = tuple(c for c in CONSONANTS if c not in ("h", "w", "j"))

_TABLE_FORMANTS = np.array([p.formants_hz or (np.nan,) * 4 for p in PHONES], dtype=np.float64)
_TABLE_BANDWIDTHS = np.array([p.bandwidths_hz for p in PHONES], dtype=np.float64)
_TABLE_VOICING = np.array([p.voicing for p in PHONES])
_TABLE_FRICATION = np.array([p.frication for p in PHONES])
_TABLE_ASPIRATION = np.array([p.aspiration for p in PHONES])
_TABLE_GAIN = 10.0 ** (np.array([p.gain_db for p in PHONES]) / 20.0)
_TABLE_DURATION = np.array([p.duration_s for p in PHONES])
_FRICATIVE_PHONES = np.flatnonzero(_TABLE_FRICATION > 0)  # the noise spectra to precompute per utterance


# --------------------------------------------------------------------------------------------------
# Speakers and channels


@dataclass(frozen=True)
class SpeakerParams:
    speaker_index: int
    f0_hz: float  # mean pitch
    f0_range_semitones: float  # standard deviation of the intonation movement
    formant_scale: float  # inverse vocal-tract length relative to an adult male
    bandwidth_scale: float
    tilt_db_per_octave: float  # extra source tilt above 500 Hz (negative: darker voice)
    open_quotient: float  # fraction of the glottal period with the glottis open
    breathiness: float  # aspiration noise level relative to the voiced source
    jitter: float  # relative period-to-period f0 perturbation
    shimmer: float  # relative period-to-period amplitude perturbation
    speaking_rate: float  # relative to an average speaker
    extra_resonance_hz: float  # a fixed speaker resonance (piriform-sinus-like)
    extra_resonance_bandwidth_hz: float
    extra_resonance_gain: float
    formant_offsets: tuple[tuple[float, float, float, float], ...] = field(repr=False)  # idiolect, per phone


@dataclass(frozen=True)
class ChannelParams:
    video_id: str
    highpass_hz: float
    lowpass_hz: float
    tilt_db_per_octave: float  # microphone / distance colouring
    eq_centres_hz: tuple[float, ...]
    eq_gains_db: tuple[float, ...]
    eq_widths_octaves: tuple[float, ...]
    noise_floor_snr_db: float  # level of the session's stationary noise floor below the speech
    noise_floor_tilt_db_per_octave: float


def speaker_params(seed: int, speaker_index: int) -> SpeakerParams:
    """The voice of one speaker; training (index < 10000) and held-out speakers share the distribution."""
    rng = np.random.default_rng([seed, _SPEAKER_STREAM, speaker_index])
    group = rng.choice(3, p=[0.45, 0.45, 0.10])  # male / female / child-like voices
    f0_centre, size_centre = ((115.0, 1.0), (205.0, 1.15), (270.0, 1.25))[group]
    f0_hz = float(np.clip(f0_centre * np.exp(rng.normal(0.0, 0.2)), 75.0, 320.0))
    formant_scale = float(np.clip(size_centre * np.exp(rng.normal(0.0, 0.07)), 0.8, 1.3))
    n_phones = len(PHONES)
    # Idiolect: each phone's formant targets sit a little off the average, differently for every speaker.
    offsets = np.exp(rng.normal(0.0, [0.07, 0.06, 0.04, 0.03], size=(n_phones, 4)))
    return SpeakerParams(
        speaker_index=speaker_index,
        f0_hz=f0_hz,
        f0_range_semitones=float(rng.uniform(1.0, 3.5)),
        formant_scale=formant_scale,
        bandwidth_scale=float(np.exp(rng.uniform(np.log(0.7), np.log(1.6)))),
        tilt_db_per_octave=float(rng.uniform(-6.0, 3.0)),
        open_quotient=float(rng.uniform(0.35, 0.8)),
        breathiness=float(np.exp(rng.uniform(np.log(0.01), np.log(0.3)))),
        jitter=float(rng.uniform(0.003, 0.02)),
        shimmer=float(rng.uniform(0.02, 0.10)),
        speaking_rate=float(np.exp(rng.normal(0.0, 0.12))),
        extra_resonance_hz=float(rng.uniform(2500.0, 5000.0) * formant_scale),
        extra_resonance_bandwidth_hz=float(rng.uniform(100.0, 400.0)),
        extra_resonance_gain=float(rng.uniform(0.5, 5.0)),
        formant_offsets=tuple(tuple(float(v) for v in row) for row in offsets),
    )


@lru_cache(maxsize=1024)
def video_ids(seed: int, speaker_index: int, n_videos: int) -> tuple[str, ...]:
    """11-character YouTube-like ids, distinct within the speaker; the first k do not depend on n_videos."""
    rng = np.random.default_rng([seed, _VIDEO_ID_STREAM, speaker_index])
    ids: list[str] = []
    while len(ids) < n_videos:
        candidate = "".join(_VIDEO_ID_ALPHABET[i] for i in rng.integers(0, len(_VIDEO_ID_ALPHABET), 11))
        if candidate not in ids:
            ids.append(candidate)
    return tuple(ids)


def channel_params(seed: int, speaker_index: int, video_index: int, sample_rate: int = 16000) -> ChannelParams:
    """The recording channel of one video: shared by all its utterances."""
    rng = np.random.default_rng([seed, _VIDEO_STREAM, speaker_index, video_index])
    n_bands = 3
    return ChannelParams(
        video_id=video_ids(seed, speaker_index, video_index + 1)[video_index],
        highpass_hz=float(np.exp(rng.uniform(np.log(50.0), np.log(200.0)))),
        lowpass_hz=float(min(rng.uniform(5000.0, 8000.0), 0.48 * sample_rate)),
        tilt_db_per_octave=float(rng.uniform(-1.5, 1.5)),
        eq_centres_hz=tuple(float(c) for c in np.exp(rng.uniform(np.log(200.0), np.log(6000.0), n_bands))),
        eq_gains_db=tuple(float(g) for g in rng.uniform(-5.0, 5.0, n_bands)),
        eq_widths_octaves=tuple(float(w) for w in rng.uniform(0.3, 1.2, n_bands)),
        noise_floor_snr_db=float(rng.uniform(30.0, 50.0)),
        noise_floor_tilt_db_per_octave=float(rng.uniform(-6.0, 0.0)),
    )


# --------------------------------------------------------------------------------------------------
# Synthesis


def _stft_size(sample_rate: int) -> int:
    return 1 << int(round(math.log2(0.032 * sample_rate)))  # 32 ms frames: 512 at 16 kHz


def _tilt(freqs: np.ndarray, db_per_octave: float, corner_hz: float = 500.0) -> np.ndarray:
    octaves = np.log2(np.maximum(freqs, corner_hz) / corner_hz)
    return 10.0 ** (db_per_octave * octaves / 20.0)


def _resonance(freqs: np.ndarray, centre: np.ndarray | float, bandwidth: np.ndarray | float) -> np.ndarray:
    """Magnitude of a second-order resonance with unit gain at 0 Hz (cascade formant synthesis)."""
    centre_sq = np.square(centre)
    return centre_sq / np.hypot(centre_sq - np.square(freqs), bandwidth * freqs)


def _bandpass(freqs: np.ndarray, centre: float, bandwidth: float) -> np.ndarray:
    """Magnitude of a second-order band-pass with unit gain at its centre."""
    return bandwidth * freqs / np.hypot(centre**2 - freqs**2, bandwidth * freqs)


def channel_response(channel: ChannelParams, freqs: np.ndarray) -> np.ndarray:
    """Magnitude response of a video's channel: 2nd-order high-pass, 4th-order low-pass, tilt and EQ bumps."""
    ratio_high = np.maximum(freqs, 1.0) / channel.highpass_hz
    highpass = ratio_high**2 / np.sqrt(1.0 + ratio_high**4)
    lowpass = 1.0 / np.sqrt(1.0 + (freqs / channel.lowpass_hz) ** 8)
    log_freqs = np.log2(np.maximum(freqs, 20.0))
    eq_db = np.zeros_like(freqs)
    for centre, gain, width in zip(channel.eq_centres_hz, channel.eq_gains_db, channel.eq_widths_octaves):
        eq_db += gain * np.exp(-0.5 * ((log_freqs - np.log2(centre)) / width) ** 2)
    return highpass * lowpass * _tilt(freqs, channel.tilt_db_per_octave) * 10.0 ** (eq_db / 20.0)


def _phone_sequence(speaker: SpeakerParams, rng: np.random.Generator, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """Random syllables (C)V(C) and pauses filling `seconds`: phone indices and durations."""
    phones: list[int] = []
    durations: list[float] = []
    rate = speaker.speaking_rate * np.exp(rng.normal(0.0, 0.08))  # this utterance's tempo

    def add(name: str, duration: float | None = None) -> None:
        index = PHONE_INDEX[name]
        phones.append(index)
        durations.append(duration if duration is not None else
                         _TABLE_DURATION[index] / rate * float(np.exp(rng.normal(0.0, 0.25))))

    add("pause", float(rng.uniform(0.05, 0.3)))
    total = durations[0]
    while total < seconds:
        start = len(durations)
        if rng.random() < 0.75:
            for name in CONSONANTS[_ONSETS[rng.integers(len(_ONSETS))]]:
                add(name)
        if rng.random() < 0.2:
            for name in DIPHTHONGS[rng.integers(len(DIPHTHONGS))]:
                add(name, _TABLE_DURATION[PHONE_INDEX[name]] * 0.7 / rate)
        else:
            add(VOWELS[rng.integers(len(VOWELS))])
        if rng.random() < 0.3:
            for name in CONSONANTS[_CODAS[rng.integers(len(_CODAS))]]:
                add(name)
        if rng.random() < 0.08:
            add("pause", float(rng.uniform(0.12, 0.5)))
        total += sum(durations[start:])
    return np.asarray(phones), np.asarray(durations)


def _smooth(track: np.ndarray, width: int) -> np.ndarray:
    """Moving average along the first axis, same length (edges held)."""
    if width <= 1:
        return track
    kernel = np.ones(width) / width
    padded = np.pad(track, [(width // 2, width - 1 - width // 2)] + [(0, 0)] * (track.ndim - 1), mode="edge")
    if track.ndim == 1:
        return np.convolve(padded, kernel, mode="valid")
    return np.stack([np.convolve(padded[:, j], kernel, mode="valid") for j in range(track.shape[1])], axis=1)


def _f0_contour(speaker: SpeakerParams, rng: np.random.Generator, frame_times: np.ndarray,
                phrase_starts: np.ndarray) -> np.ndarray:
    """f0 per frame: speaker mean, phrase declination and a smooth random movement within the range."""
    knot_times = np.arange(frame_times[0], frame_times[-1] + 0.25, 0.25)
    movement = np.interp(frame_times, knot_times, rng.normal(0.0, speaker.f0_range_semitones, len(knot_times)))
    phrase_index = np.searchsorted(phrase_starts, frame_times, side="right") - 1
    time_in_phrase = frame_times - phrase_starts[np.maximum(phrase_index, 0)]
    fall = float(rng.uniform(1.5, 4.0))  # semitones: each phrase starts high and settles low
    declination = fall * (0.5 - (1.0 - np.exp(-time_in_phrase / 1.5)))
    semitones = float(rng.normal(0.0, 1.0)) + _smooth(movement, 9) + declination
    return speaker.f0_hz * 2.0 ** (np.clip(semitones, -12.0, 12.0) / 12.0)


def _glottal_source(speaker: SpeakerParams, rng: np.random.Generator, f0_per_sample: np.ndarray,
                    sample_rate: int) -> np.ndarray:
    """Differentiated Rosenberg pulses with per-period jitter and shimmer, plus flow-modulated aspiration."""
    phase = np.cumsum(f0_per_sample / sample_rate)
    n_periods = int(phase[-1]) + 2
    jitter = 1.0 + speaker.jitter * rng.standard_normal(n_periods)
    phase = np.cumsum(f0_per_sample * jitter[phase.astype(np.int64)] / sample_rate)
    period = phase.astype(np.int64)
    position = (phase - period).astype(np.float32)  # 0..1 within the glottal cycle
    opening = 0.6 * speaker.open_quotient
    closing = speaker.open_quotient - opening
    is_opening = position < opening
    cosine = np.cos(np.where(is_opening, (np.pi / opening) * position, (0.5 * np.pi / closing) * (position - opening)))
    flow = np.where(is_opening, 0.5 * (1.0 - cosine), np.where(position < speaker.open_quotient, cosine, 0.0))
    shimmer = np.maximum(1.0 + speaker.shimmer * rng.standard_normal(period[-1] + 1, dtype=np.float32), 0.2)
    flow *= shimmer[period]
    # Scaling by the period in samples keeps the source level independent of the pitch.
    source = np.diff(flow, prepend=np.float32(0.0)) * np.float32(0.25 * sample_rate / speaker.f0_hz)
    aspiration = rng.standard_normal(len(flow), dtype=np.float32) * (0.2 + flow) * np.float32(speaker.breathiness)
    return (source + aspiration).astype(np.float32)


def synthesize_utterance(speaker: SpeakerParams, seed: int | Sequence[int] | np.random.Generator,
                         seconds: float, channel: ChannelParams | None = None,
                         sample_rate: int = 16000) -> np.ndarray:
    """One utterance of `speaker` recorded through `channel`: int16 samples, round(seconds * sample_rate) long."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    n_samples = int(round(seconds * sample_rate))
    n_fft = _stft_size(sample_rate)
    hop = n_fft // 4
    pad = n_fft
    n_frames = (n_samples + 2 * pad - n_fft) // hop + 1
    padded_length = (n_frames - 1) * hop + n_fft
    frame_times = (np.arange(n_frames) * hop + n_fft / 2 - pad) / sample_rate
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)

    # Phones → per-frame tracks.
    phones, durations = _phone_sequence(speaker, rng, padded_length / sample_rate)
    ends = np.cumsum(durations) - pad / sample_rate
    starts = ends - durations
    frame_segment = np.minimum(np.searchsorted(ends, frame_times), len(phones) - 1)
    frame_phone = phones[frame_segment]
    targets = _TABLE_FORMANTS[phones] * np.asarray(speaker.formant_offsets)[phones] * speaker.formant_scale
    has_target = ~np.isnan(targets[:, 0])
    # Two knots per phone with a target (its steady part); consonants without one are bridged.
    knot_times = np.stack([starts + 0.3 * durations, ends - 0.3 * durations], axis=1)[has_target].ravel()
    knot_values = np.repeat(targets[has_target], 2, axis=0)
    formants = np.stack([np.interp(frame_times, knot_times, knot_values[:, k]) for k in range(4)], axis=1)
    formants = np.minimum(_smooth(formants, 3), 0.45 * sample_rate)
    bandwidths = _smooth(_TABLE_BANDWIDTHS[frame_phone], 3) * speaker.bandwidth_scale
    # Syllable stress: a random level per phone, smoothed.
    loudness = _smooth(np.exp(rng.normal(0.0, 0.25, len(phones)))[frame_segment], 5)
    voicing = _smooth(_TABLE_VOICING[frame_phone] * _TABLE_GAIN[frame_phone], 3) * loudness
    aspiration = _smooth(_TABLE_ASPIRATION[frame_phone], 3) * loudness
    # Frication level per frame, and which fricative's noise spectrum (the dominant one across a boundary).
    frication_by_type = _smooth(_TABLE_FRICATION[frame_phone][:, None]
                                * (frame_phone[:, None] == _FRICATIVE_PHONES[None, :]), 2)
    frication_type = np.argmax(frication_by_type, axis=1)
    frication = frication_by_type.sum(axis=1) * loudness
    phrase_starts = np.concatenate([[frame_times[0]], ends[phones == PHONE_INDEX["pause"]]])

    # Source.
    f0 = _f0_contour(speaker, rng, frame_times, phrase_starts)
    f0_per_sample = np.interp(np.arange(padded_length), np.arange(n_frames) * hop + n_fft / 2, f0)
    source = _glottal_source(speaker, rng, f0_per_sample, sample_rate)

    # Filter, all frames at once.
    window = np.sqrt(np.hanning(n_fft + 1)[:n_fft]).astype(np.float32)  # periodic sqrt-Hann: WOLA at 75 % overlap
    frames = np.lib.stride_tricks.sliding_window_view(source, n_fft)[::hop] * window
    spectrum = np.fft.rfft(frames)
    freqs32 = freqs.astype(np.float32)
    freqs_sq = np.square(freqs32)
    power = np.ones((n_frames, len(freqs)), dtype=np.float32)
    for k in range(4):  # squared magnitudes, one square root at the end
        centre_sq = np.square(formants[:, k:k + 1]).astype(np.float32)
        bandwidth = bandwidths[:, k:k + 1].astype(np.float32)
        power *= np.square(centre_sq) / (np.square(centre_sq - freqs_sq) + np.square(bandwidth * freqs32))
    envelope = np.sqrt(power)
    speaker_fixed = (_resonance(freqs, 4500.0 * speaker.formant_scale, 300.0 * speaker.bandwidth_scale)
                     * _tilt(freqs, speaker.tilt_db_per_octave + _HIGHER_POLE_CORRECTION_DB, 800.0)
                     * (1.0 + speaker.extra_resonance_gain *
                        _bandpass(freqs, speaker.extra_resonance_hz, speaker.extra_resonance_bandwidth_hz)))
    recording = channel_response(channel, freqs) if channel is not None else np.ones_like(freqs)
    envelope *= (speaker_fixed * recording).astype(np.float32)
    spectrum *= envelope * voicing.astype(np.float32)[:, None]
    speech_power = float(np.sum(np.square(spectrum.real)) + np.sum(np.square(spectrum.imag)))

    # Noise sources as power spectra per frame: frication, aspiration (h, stop release) and background.
    frication_shapes = np.stack([
        _bandpass(freqs, PHONES[i].frication_hz * speaker.formant_scale, PHONES[i].frication_bandwidth_hz) ** 2
        for i in _FRICATIVE_PHONES]) * (_FRICATION_LEVEL**2 * recording**2)
    white_power = n_fft / 2  # E|X_k|^2 of unit-variance white noise under the sqrt-Hann window
    # A gather, not a matrix product: BLAS threads would oversubscribe the cores of a process pool.
    noise_power = frication_shapes.astype(np.float32)[frication_type] * np.square(frication).astype(np.float32)[:, None]
    noise_power += np.square(envelope * (_ASPIRATION_LEVEL * aspiration).astype(np.float32)[:, None])
    noise_power *= white_power
    speech_power += float(noise_power.sum())
    background_snr_db = rng.uniform(*BACKGROUND_SNR_DB)
    background = _tilt(freqs, rng.uniform(-6.0, 0.0), 100.0) ** 2 * recording**2
    noise_power += background * (speech_power / (10 ** (background_snr_db / 10) * background.sum() * n_frames))
    if channel is not None:
        floor = _tilt(freqs, channel.noise_floor_tilt_db_per_octave, 100.0) ** 2
        noise_power += floor * (speech_power / (10 ** (channel.noise_floor_snr_db / 10) * floor.sum() * n_frames))
    noise = rng.standard_normal((2, n_frames, len(freqs)), dtype=np.float32)
    spectrum += (noise[0] + 1j * noise[1]) * np.sqrt(noise_power / 2).astype(np.float32)

    # Weighted overlap-add.
    frames = np.fft.irfft(spectrum, n=n_fft) * window
    blocks = np.zeros((n_frames + 3, hop), dtype=np.float32)
    quarters = frames.reshape(n_frames, 4, hop)
    for q in range(4):
        blocks[q:q + n_frames] += quarters[:, q]
    signal = blocks.ravel()[pad:pad + n_samples]

    # Loudness of this utterance, never clipping.
    level_dbfs = rng.uniform(-32.0, -18.0)
    rms = float(np.sqrt(np.mean(np.square(signal, dtype=np.float64)))) + 1e-12
    gain = min(10 ** (level_dbfs / 20) / rms, _PEAK_LIMIT / (float(np.max(np.abs(signal))) + 1e-12))
    return np.round(signal * (gain * 32767.0)).astype(np.int16)


# --------------------------------------------------------------------------------------------------
# Corpus


@dataclass(frozen=True)
class _Utterance:
    speaker_index: int
    utt_index: int  # 0-based within the speaker
    video_index: int
    relpath: str  # idNNNNN/<video>/<utt>.wav, relative to OUT/wav
    n_samples: int


def speaker_id(speaker_index: int) -> str:
    return f"id{speaker_index:05d}"


def _utterance_seconds(spec: CorpusSpec, speaker_index: int, utt_index: int) -> tuple[np.random.Generator, int]:
    """The utterance's RNG and its length in samples (the first draw, so a plan needs no synthesis)."""
    rng = np.random.default_rng([spec.seed, _UTTERANCE_STREAM, speaker_index, utt_index])
    seconds = rng.uniform(spec.min_seconds, spec.max_seconds)
    low, high = math.ceil(spec.min_seconds * spec.sample_rate), math.floor(spec.max_seconds * spec.sample_rate)
    return rng, int(np.clip(round(seconds * spec.sample_rate), low, high))


def plan_corpus(spec: CorpusSpec) -> tuple[list[_Utterance], list[_Utterance]]:
    """Training and held-out utterances, in list order; utterance u of a speaker goes to video u % K."""
    def speaker_utterances(speaker_index: int, n_utts: int) -> list[_Utterance]:
        videos = video_ids(spec.seed, speaker_index, min(spec.videos_per_speaker, n_utts))
        utterances = []
        for u in range(n_utts):
            v = u % spec.videos_per_speaker
            relpath = f"{speaker_id(speaker_index)}/{videos[v]}/{u // spec.videos_per_speaker + 1:05d}.wav"
            utterances.append(_Utterance(speaker_index, u, v, relpath, _utterance_seconds(spec, speaker_index, u)[1]))
        return utterances

    train = [utt for s in range(spec.n_speakers) for utt in speaker_utterances(s, spec.utts_per_speaker)]
    test = [utt for t in range(spec.n_test_speakers)
            for utt in speaker_utterances(TEST_SPEAKER_OFFSET + t, spec.test_utts_per_speaker)]
    return train, test


@lru_cache(maxsize=64)
def _speaker(seed: int, speaker_index: int) -> SpeakerParams:
    return speaker_params(seed, speaker_index)


@lru_cache(maxsize=256)
def _channel(seed: int, speaker_index: int, video_index: int, sample_rate: int) -> ChannelParams:
    return channel_params(seed, speaker_index, video_index, sample_rate)


def _write_utterances(spec: CorpusSpec, wav_root: str, utterances: Sequence[_Utterance]) -> tuple[int, int]:
    """Synthesise and write utterances (skipping complete files); returns (done, newly written)."""
    written = 0
    for utt in utterances:
        path = Path(wav_root) / utt.relpath
        if path.exists():
            try:
                info = soundfile.info(str(path))
                if (info.frames, info.samplerate, info.channels, info.subtype) == (
                        utt.n_samples, spec.sample_rate, 1, "PCM_16"):
                    continue
            except RuntimeError:
                pass  # unreadable: rewrite it
        rng, n_samples = _utterance_seconds(spec, utt.speaker_index, utt.utt_index)
        audio = synthesize_utterance(_speaker(spec.seed, utt.speaker_index), rng, n_samples / spec.sample_rate,
                                     _channel(spec.seed, utt.speaker_index, utt.video_index, spec.sample_rate),
                                     spec.sample_rate)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        soundfile.write(str(partial), audio, spec.sample_rate, subtype="PCM_16", format="WAV")
        os.replace(partial, path)  # a file under its final name is always complete
        written += 1
    return len(utterances), written


def make_trials(spec: CorpusSpec, test: Sequence[_Utterance]) -> list[tuple[int, str, str]]:
    """Half target, half non-target pairs of held-out utterances; targets across videos where possible.

    No utterance is paired with itself and no pair appears twice (in either order). There are
    min(n_trials // 2, target pairs, non-target pairs) trials of each label, in random order.
    """
    rng = np.random.default_rng([spec.seed, _TRIAL_STREAM])
    speakers = np.array([u.speaker_index for u in test], dtype=np.int64)
    videos = np.array([u.video_index for u in test], dtype=np.int64)
    n = len(test)
    # Target pairs: enumerated speaker by speaker (a speaker has few utterances).
    target_pairs = []
    for speaker in np.unique(speakers):
        members = np.flatnonzero(speakers == speaker)
        first, second = np.triu_indices(len(members), k=1)
        target_pairs.append(np.stack([members[first], members[second]], axis=1))
    targets = np.concatenate(target_pairs) if target_pairs else np.zeros((0, 2), dtype=np.int64)
    n_nontarget_pairs = (n * n - int(np.sum(np.unique(speakers, return_counts=True)[1] ** 2))) // 2
    n_each = min(spec.n_trials // 2, len(targets), n_nontarget_pairs)

    cross_video = videos[targets[:, 0]] != videos[targets[:, 1]]
    targets = np.concatenate([rng.permutation(targets[cross_video]), rng.permutation(targets[~cross_video])])[:n_each]
    if n_each > n_nontarget_pairs // 2:
        # Most non-target pairs are wanted: enumerate them (there are fewer than n_trials).
        first, second = np.triu_indices(n, k=1)
        different = speakers[first] != speakers[second]
        candidates = np.stack([first[different], second[different]], axis=1)
        nontargets = candidates[rng.choice(len(candidates), size=n_each, replace=False)]
    else:
        seen: set[tuple[int, int]] = set()
        while len(seen) < n_each:  # rejection sampling: most random pairs qualify
            for a, b in rng.integers(0, n, size=(2 * (n_each - len(seen)) + 16, 2)):
                pair = (min(a, b), max(a, b))
                if speakers[a] != speakers[b] and pair not in seen and len(seen) < n_each:
                    seen.add(pair)
        nontargets = np.array(sorted(seen), dtype=np.int64).reshape(-1, 2)

    pairs = np.concatenate([targets, nontargets])
    labels = np.concatenate([np.ones(len(targets), dtype=np.int64), np.zeros(len(nontargets), dtype=np.int64)])
    swap = rng.random(len(pairs)) < 0.5  # which side is the enrolment utterance
    pairs = np.where(swap[:, None], pairs[:, ::-1], pairs)
    return [(int(labels[i]), test[pairs[i, 0]].relpath, test[pairs[i, 1]].relpath)
            for i in rng.permutation(len(pairs))]


def _chunks(utterances: Sequence[_Utterance], size: int) -> Iterable[list[_Utterance]]:
    for start in range(0, len(utterances), size):
        yield list(utterances[start:start + size])


def generate_corpus(out_dir: str | os.PathLike, spec: CorpusSpec = CorpusSpec(), workers: int = 1,
                    progress: Callable[[int], None] | None = None) -> CorpusInfo:
    """Write the corpus under out_dir (wav/, train_list.txt, test_list.txt, trials.txt, corpus.json).

    Re-running with the same spec reproduces the same files; complete files are kept, not rewritten.
    """
    out = Path(out_dir)
    wav_root = out / "wav"
    wav_root.mkdir(parents=True, exist_ok=True)
    train, test = plan_corpus(spec)
    utterances = train + test
    chunks = list(_chunks(utterances, 8))
    n_written = 0
    if workers <= 1:
        for chunk in chunks:
            done, written = _write_utterances(spec, str(wav_root), chunk)
            n_written += written
            if progress is not None:
                progress(done)
    else:
        # fork: the children inherit the imported module; nothing here touches threads or torch.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(_write_utterances, spec, str(wav_root), chunk) for chunk in chunks]
            for future in as_completed(futures):
                done, written = future.result()
                n_written += written
                if progress is not None:
                    progress(done)

    train_list = out / "train_list.txt"
    test_list = out / "test_list.txt"
    trials_path = out / "trials.txt"
    _write_text(train_list, "".join(sorted(f"{speaker_id(u.speaker_index)} {u.relpath}\n" for u in train)))
    _write_text(test_list, "".join(sorted(f"{u.relpath}\n" for u in test)))
    trials = make_trials(spec, test)
    _write_text(trials_path, "".join(f"{label} {a} {b}\n" for label, a, b in trials))

    train_hours = sum(u.n_samples for u in train) / spec.sample_rate / 3600
    test_hours = sum(u.n_samples for u in test) / spec.sample_rate / 3600
    corpus_json = out / "corpus.json"
    speaker_videos: dict[int, set[int]] = {}
    for u in utterances:
        speaker_videos.setdefault(u.speaker_index, set()).add(u.video_index)
    speaker_indices = sorted(speaker_videos)
    summary = {
        "spec": asdict(spec),
        "counts": {
            "train_speakers": spec.n_speakers, "train_utterances": len(train),
            "test_speakers": spec.n_test_speakers, "test_utterances": len(test),
            "trials": len(trials), "target_trials": sum(label for label, _, _ in trials),
        },
        "hours": {"train": train_hours, "test": test_hours, "total": train_hours + test_hours},
        "speakers": {speaker_id(s): asdict(_speaker(spec.seed, s)) for s in speaker_indices},
        "videos": {speaker_id(s): [asdict(_channel(spec.seed, s, v, spec.sample_rate)) for v in sorted(videos)]
                   for s, videos in speaker_videos.items()},
    }
    _write_text(corpus_json, json.dumps(summary, indent=1) + "\n")
    return CorpusInfo(
        root=wav_root, train_list=train_list, test_list=test_list, trials=trials_path, corpus_json=corpus_json,
        n_speakers=spec.n_speakers, n_test_speakers=spec.n_test_speakers, n_utterances=len(utterances),
        n_trials=len(trials), hours=train_hours + test_hours, train_hours=train_hours, test_hours=test_hours,
        n_written=n_written,
    )


def _write_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


# --------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    defaults = CorpusSpec()
    parser = argparse.ArgumentParser(prog="python -m speakerid.data.synthetic",
                                     description="Write a deterministic synthetic VoxCeleb-shaped speaker corpus.")
    parser.add_argument("--out", required=True, help="output directory (wav/, lists, trials.txt, corpus.json)")
    parser.add_argument("--speakers", type=int, default=defaults.n_speakers, help="training speakers")
    parser.add_argument("--utts", type=int, default=defaults.utts_per_speaker, help="utterances per training speaker")
    parser.add_argument("--test-speakers", type=int, default=defaults.n_test_speakers, help="held-out speakers")
    parser.add_argument("--test-utts", type=int, default=defaults.test_utts_per_speaker,
                        help="utterances per held-out speaker")
    parser.add_argument("--videos", type=int, default=defaults.videos_per_speaker, help="videos (sessions) per speaker")
    parser.add_argument("--min-seconds", type=float, default=defaults.min_seconds)
    parser.add_argument("--max-seconds", type=float, default=defaults.max_seconds)
    parser.add_argument("--trials", type=int, default=defaults.n_trials, help="trials wanted (capped by the test set)")
    parser.add_argument("--sample-rate", type=int, default=defaults.sample_rate)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--workers", type=int, default=1, help="processes (the output does not depend on it)")
    return parser


def main(argv: Sequence[str] | None = None) -> CorpusInfo:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        spec = CorpusSpec(n_speakers=args.speakers, utts_per_speaker=args.utts, n_test_speakers=args.test_speakers,
                          test_utts_per_speaker=args.test_utts, videos_per_speaker=args.videos,
                          min_seconds=args.min_seconds, max_seconds=args.max_seconds, n_trials=args.trials,
                          sample_rate=args.sample_rate, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console()
    n_total = spec.n_speakers * spec.utts_per_speaker + spec.n_test_speakers * spec.test_utts_per_speaker
    started = time.perf_counter()
    with Progress(TextColumn("synthesising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("utterances", total=n_total)
        info = generate_corpus(args.out, spec, workers=args.workers, progress=lambda n: bar.advance(task, n))
    elapsed = time.perf_counter() - started

    table = Table(title=f"synthetic corpus in {args.out}", show_header=False)
    table.add_row("training", f"{spec.n_speakers} speakers, {spec.n_speakers * spec.utts_per_speaker} utterances, "
                              f"{info.train_hours:.2f} h  →  {info.train_list}")
    table.add_row("held-out", f"{spec.n_test_speakers} speakers, "
                              f"{spec.n_test_speakers * spec.test_utts_per_speaker} utterances, "
                              f"{info.test_hours:.2f} h  →  {info.test_list}")
    table.add_row("trials", f"{info.n_trials}  →  {info.trials}")
    speed = f" ({info.hours * 3600 / elapsed:.0f}x real time)" if info.n_written == info.n_utterances else ""
    table.add_row("written", f"{info.n_written} new files in {elapsed:.1f} s{speed}")
    console.print(table)
    return info


if __name__ == "__main__":
    main()
