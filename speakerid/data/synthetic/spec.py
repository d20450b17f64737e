"""What a synthetic corpus is: its shape (:class:`CorpusSpec`), its speaker ids and the keys of its random streams.

Every draw comes from its own stream, keyed by the corpus seed, the stream and the speaker (and video or
utterance), so that adding an utterance never changes a speaker, a channel or the trials, and the corpus
is bit-identical whatever the number of worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass

# Separate random streams, so that adding an utterance never changes a speaker, a channel or the trials.
# Each stream's key has a fixed length: numpy's SeedSequence treats [a, b] and [a, b, 0] as the same seed.
SPEAKER_STREAM, VIDEO_STREAM, UTTERANCE_STREAM, TRIAL_STREAM, VIDEO_ID_STREAM = 0, 1, 2, 3, 4
TEST_SPEAKER_OFFSET = 10000  # held-out speakers are id10000.. like VoxCeleb1 next to VoxCeleb2 dev


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



def speaker_id(speaker_index: int) -> str:
    return f"id{speaker_index:05d}"
