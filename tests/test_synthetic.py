"""The synthetic speaker corpus: layout, determinism, trials, and that speakers are learnable but not trivially."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.fft
import soundfile

from speakerid.data.synthetic import (
    CorpusSpec,
    channel_params,
    generate_corpus,
    speaker_params,
    synthesize_utterance,
)
from speakerid.metrics import eer

SMALL = CorpusSpec(n_speakers=6, utts_per_speaker=4, n_test_speakers=4, test_utts_per_speaker=4,
                   videos_per_speaker=2, min_seconds=2.0, max_seconds=4.0, n_trials=60, seed=7)
RELPATH = re.compile(r"^(id\d{5})/[A-Za-z0-9_-]{11}/\d{5}\.wav$")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small")
    generate_corpus(out, SMALL)
    return out


def read_trials(path: Path) -> list[tuple[int, str, str]]:
    trials = []
    for line in path.read_text().splitlines():
        label, enrol, test = line.split()
        trials.append((int(label), enrol, test))
    return trials


def all_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_layout_and_list_formats(small_corpus: Path) -> None:
    root = small_corpus / "wav"
    train = [line.split() for line in (small_corpus / "train_list.txt").read_text().splitlines()]
    test = (small_corpus / "test_list.txt").read_text().splitlines()
    assert len(train) == SMALL.n_speakers * SMALL.utts_per_speaker
    assert len(test) == SMALL.n_test_speakers * SMALL.test_utts_per_speaker
    for speaker, relpath in train:
        assert RELPATH.match(relpath) and relpath.split("/")[0] == speaker
    for relpath in test:
        assert RELPATH.match(relpath)
    listed = [relpath for _, relpath in train] + test
    assert sorted(listed) == sorted(str(p.relative_to(root)) for p in root.rglob("*.wav"))  # nothing unlisted
    for relpath in listed:
        info = soundfile.info(str(root / relpath))
        assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
        assert SMALL.min_seconds * 16000 <= info.frames <= SMALL.max_seconds * 16000
    # Utterances are numbered 00001.. within each video, videos_per_speaker videos per speaker.
    videos = {}
    for relpath in listed:
        speaker, video, utt = relpath.split("/")
        videos.setdefault((speaker, video), []).append(utt)
    assert all(sorted(utts) == [f"{i:05d}.wav" for i in range(1, len(utts) + 1)] for utts in videos.values())
    assert len(videos) == (SMALL.n_speakers + SMALL.n_test_speakers) * SMALL.videos_per_speaker

    corpus = json.loads((small_corpus / "corpus.json").read_text())
    assert corpus["spec"]["n_speakers"] == SMALL.n_speakers
    assert corpus["counts"]["test_utterances"] == len(test)
    assert len(corpus["speakers"]) == SMALL.n_speakers + SMALL.n_test_speakers
    assert corpus["hours"]["total"] > 0


def test_train_and_test_speakers_are_disjoint(small_corpus: Path) -> None:
    train_speakers = {line.split()[0] for line in (small_corpus / "train_list.txt").read_text().splitlines()}
    test_speakers = {line.split("/")[0] for line in (small_corpus / "test_list.txt").read_text().splitlines()}
    assert train_speakers == {f"id{i:05d}" for i in range(SMALL.n_speakers)}
    assert test_speakers == {f"id{10000 + i:05d}" for i in range(SMALL.n_test_speakers)}


def test_trials_are_well_formed(small_corpus: Path) -> None:
    trials = read_trials(small_corpus / "trials.txt")
    test = set((small_corpus / "test_list.txt").read_text().splitlines())
    # 4 speakers x 4 utterances: 6 target pairs each (4 across the 2 videos), so 24 trials of each label.
    labels = [label for label, _, _ in trials]
    assert labels.count(1) == labels.count(0) == 24
    unordered = set()
    cross_video_targets = 0
    for label, enrol, test_utt in trials:
        assert label in (0, 1)
        assert enrol in test and test_utt in test and enrol != test_utt
        assert (enrol.split("/")[0] == test_utt.split("/")[0]) == (label == 1)
        cross_video_targets += label == 1 and enrol.split("/")[1] != test_utt.split("/")[1]
        unordered.add(frozenset((enrol, test_utt)))
    assert len(unordered) == len(trials)
    assert cross_video_targets == 16  # every cross-video pair is used before any same-video pair


def test_trials_are_capped_by_the_test_set(tmp_path: Path) -> None:
    spec = CorpusSpec(n_speakers=0, n_test_speakers=3, test_utts_per_speaker=3, min_seconds=2.0, max_seconds=2.0)
    info = generate_corpus(tmp_path, spec)
    trials = read_trials(info.trials)
    assert len(trials) == info.n_trials == 2 * 9  # 3 speakers x 3 target pairs each, as many non-targets
    assert len({frozenset((a, b)) for _, a, b in trials}) == len(trials)


def test_generation_is_bit_identical_across_runs_and_workers(small_corpus: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    info = generate_corpus(again, SMALL, workers=2)
    assert info.n_written == info.n_utterances == 40
    reference = all_files(small_corpus)
    assert all_files(again) == reference

    # Re-running into the same directory keeps complete files and rewrites a damaged one identically.
    damaged = again / "wav" / (again / "test_list.txt").read_text().splitlines()[0]
    damaged.write_bytes(damaged.read_bytes()[:100])
    info = generate_corpus(again, SMALL)
    assert info.n_written == 1
    assert all_files(again) == reference


def test_utterances_differ_but_a_seed_reproduces_one() -> None:
    speaker = speaker_params(0, 3)
    channel = channel_params(0, 3, 0)
    first = synthesize_utterance(speaker, [0, 3, 1], 2.5, channel)
    second = synthesize_utterance(speaker, [0, 3, 2], 2.5, channel)
    assert first.dtype == np.int16 and first.shape == (40000,)
    assert not np.array_equal(first, second)
    assert np.array_equal(first, synthesize_utterance(speaker, [0, 3, 1], 2.5, channel))
    assert speaker_params(0, 3) == speaker and speaker_params(0, 4) != speaker
    # Loud enough to be heard, never clipped.
    for samples in (first, second):
        assert 300 < np.sqrt(np.mean(samples.astype(np.float64) ** 2)) and np.abs(samples).max() < 32000


def test_command_line_writes_a_corpus(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "speakerid.data.synthetic", "--out", str(out), "--speakers", "2", "--utts", "2",
         "--test-speakers", "2", "--test-utts", "2", "--min-seconds", "2", "--max-seconds", "2.5",
         "--workers", "2"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "trials" in result.stdout
    assert len((out / "train_list.txt").read_text().splitlines()) == 4
    assert (out / "trials.txt").read_text()


# --------------------------------------------------------------------------------------------------
# Learnability: a fixed (untrained) embedding must beat chance clearly, but leave a network headroom.


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int) -> np.ndarray:
    def to_mel(hz): return 2595.0 * np.log10(1.0 + hz / 700.0)
    def to_hz(mel): return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    edges = to_hz(np.linspace(to_mel(20.0), to_mel(sample_rate / 2), n_mels + 2))
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    low, centre, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    return np.maximum(0.0, np.minimum((freqs - low) / (centre - low), (high - freqs) / (high - centre)))


def mfcc_statistics(samples: np.ndarray, sample_rate: int, rng: np.random.Generator,
                    crop_seconds: float = 2.0) -> np.ndarray:
    """Mean and std over time of MFCCs 1..19 (25 ms / 10 ms, 40 mel bands) on a random crop."""
    crop = int(crop_seconds * sample_rate)
    start = rng.integers(0, len(samples) - crop + 1)
    signal = samples[start:start + crop].astype(np.float64)
    frames = np.lib.stride_tricks.sliding_window_view(signal, 400)[::160] * np.hamming(400)
    log_mel = np.log(np.abs(np.fft.rfft(frames, 512)) ** 2 @ mel_filterbank(40, 512, sample_rate).T + 1e-6)
    mfcc = scipy.fft.dct(log_mel, norm="ortho", axis=1)[:, 1:20]  # c0 (loudness) left out
    return np.concatenate([mfcc.mean(axis=0), mfcc.std(axis=0)])


def fixed_feature_eer(out: Path, seed: int = 0) -> float:
    """EER (%) of cosine scoring on MFCC statistics of random 2-s crops, over out/trials.txt."""
    rng = np.random.default_rng(seed)
    utterances = (out / "test_list.txt").read_text().splitlines()
    embeddings = np.stack([mfcc_statistics(soundfile.read(str(out / "wav" / u), dtype="int16")[0], 16000, rng)
                           for u in utterances])
    embeddings = (embeddings - embeddings.mean(axis=0)) / embeddings.std(axis=0)  # standardise each dimension
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    index = {u: i for i, u in enumerate(utterances)}
    trials = read_trials(out / "trials.txt")
    scores = [embeddings[index[a]] @ embeddings[index[b]] for _, a, b in trials]
    return eer(scores, [label for label, _, _ in trials])[0]  # the seeds' convention (tuneThreshold.py)


def test_fixed_feature_baseline_is_above_chance_but_not_trivial(tmp_path: Path) -> None:
    # The held-out half of the default corpus (speaker streams are independent of n_speakers).
    info = generate_corpus(tmp_path, CorpusSpec(n_speakers=0), workers=2)
    assert info.n_trials >= 800
    eer = fixed_feature_eer(tmp_path)
    assert 5.0 < eer < 35.0, f"fixed-feature EER {eer:.1f}% is outside (5, 35)"
