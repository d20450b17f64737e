"""The phone inventory of the synthetic voices: formant targets, sources and durations, and the same as tables.

A speaker scales and shifts these targets (:mod:`.voices`); :mod:`.synthesis` strings phones into random
syllables and interpolates their targets frame by frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
ONSETS = tuple(c for c in CONSONANTS if c != "N")
CODAS = tuple(c for c in CONSONANTS if c not in ("h", "w", "j"))

TABLE_FORMANTS = np.array([p.formants_hz or (np.nan,) * 4 for p in PHONES], dtype=np.float64)
TABLE_BANDWIDTHS = np.array([p.bandwidths_hz for p in PHONES], dtype=np.float64)
TABLE_VOICING = np.array([p.voicing for p in PHONES])
TABLE_FRICATION = np.array([p.frication for p in PHONES])
TABLE_ASPIRATION = np.array([p.aspiration for p in PHONES])
TABLE_GAIN = 10.0 ** (np.array([p.gain_db for p in PHONES]) / 20.0)
TABLE_DURATION = np.array([p.duration_s for p in PHONES])
FRICATIVE_PHONES = np.flatnonzero(TABLE_FRICATION > 0)  # the noise spectra to precompute per utterance
