"""Who speaks and through what: a speaker's voice and a video's recording channel, drawn from the corpus seed.

Training speakers (index < 10000) and held-out speakers share one distribution of voices; every
utterance of one "video" shares a channel (band limits, a random mild EQ, a noise floor).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from speakerid.data.synthetic.phones import PHONES
from speakerid.data.synthetic.spec import SPEAKER_STREAM, VIDEO_ID_STREAM, VIDEO_STREAM

_VIDEO_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"


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
    rng = np.random.default_rng([seed, SPEAKER_STREAM, speaker_index])
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
    rng = np.random.default_rng([seed, VIDEO_ID_STREAM, speaker_index])
    ids: list[str] = []
    while len(ids) < n_videos:
        candidate = "".join(_VIDEO_ID_ALPHABET[i] for i in rng.integers(0, len(_VIDEO_ID_ALPHABET), 11))
        if candidate not in ids:
            ids.append(candidate)
    return tuple(ids)


def channel_params(seed: int, speaker_index: int, video_index: int, sample_rate: int = 16000) -> ChannelParams:
    """The recording channel of one video: shared by all its utterances."""
    rng = np.random.default_rng([seed, VIDEO_STREAM, speaker_index, video_index])
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
