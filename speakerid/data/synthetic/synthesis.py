"""One utterance of a synthetic voice: source-filter speech, vectorised with numpy.

The model:
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

import math
from collections.abc import Sequence

import numpy as np

from speakerid.data.synthetic.phones import (CODAS, CONSONANTS, DIPHTHONGS, FRICATIVE_PHONES, ONSETS, PHONE_INDEX,
                                             PHONES, TABLE_ASPIRATION, TABLE_BANDWIDTHS, TABLE_DURATION,
                                             TABLE_FORMANTS, TABLE_FRICATION, TABLE_GAIN, TABLE_VOICING, VOWELS)
from speakerid.data.synthetic.voices import ChannelParams, SpeakerParams

_PEAK_LIMIT = 0.89  # fraction of int16 full scale never exceeded
_FRICATION_LEVEL = 0.3  # noise sources relative to the glottal source, set from long-term spectra
_ASPIRATION_LEVEL = 0.6
BACKGROUND_SNR_DB = (15.0, 40.0)  # per utterance
_HIGHER_POLE_CORRECTION_DB = 8.0  # per octave above 800 Hz: brings the long-term spectrum near real speech


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
                         TABLE_DURATION[index] / rate * float(np.exp(rng.normal(0.0, 0.25))))

    add("pause", float(rng.uniform(0.05, 0.3)))
    total = durations[0]
    while total < seconds:
        start = len(durations)
        if rng.random() < 0.75:
            for name in CONSONANTS[ONSETS[rng.integers(len(ONSETS))]]:
                add(name)
        if rng.random() < 0.2:
            for name in DIPHTHONGS[rng.integers(len(DIPHTHONGS))]:
                add(name, TABLE_DURATION[PHONE_INDEX[name]] * 0.7 / rate)
        else:
            add(VOWELS[rng.integers(len(VOWELS))])
        if rng.random() < 0.3:
            for name in CONSONANTS[CODAS[rng.integers(len(CODAS))]]:
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
    targets = TABLE_FORMANTS[phones] * np.asarray(speaker.formant_offsets)[phones] * speaker.formant_scale
    has_target = ~np.isnan(targets[:, 0])
    # Two knots per phone with a target (its steady part); consonants without one are bridged.
    knot_times = np.stack([starts + 0.3 * durations, ends - 0.3 * durations], axis=1)[has_target].ravel()
    knot_values = np.repeat(targets[has_target], 2, axis=0)
    formants = np.stack([np.interp(frame_times, knot_times, knot_values[:, k]) for k in range(4)], axis=1)
    formants = np.minimum(_smooth(formants, 3), 0.45 * sample_rate)
    bandwidths = _smooth(TABLE_BANDWIDTHS[frame_phone], 3) * speaker.bandwidth_scale
    # Syllable stress: a random level per phone, smoothed.
    loudness = _smooth(np.exp(rng.normal(0.0, 0.25, len(phones)))[frame_segment], 5)
    voicing = _smooth(TABLE_VOICING[frame_phone] * TABLE_GAIN[frame_phone], 3) * loudness
    aspiration = _smooth(TABLE_ASPIRATION[frame_phone], 3) * loudness
    # Frication level per frame, and which fricative's noise spectrum (the dominant one across a boundary).
    frication_by_type = _smooth(TABLE_FRICATION[frame_phone][:, None]
                                * (frame_phone[:, None] == FRICATIVE_PHONES[None, :]), 2)
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
        for i in FRICATIVE_PHONES]) * (_FRICATION_LEVEL**2 * recording**2)
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
