"""The corpus on disk: which utterances there are, their wav files, the lists, the trials and ``corpus.json``.

Shaped like VoxCeleb: ``wav/idNNNNN/<video>/<utt>.wav``, a training list of ``speaker relpath`` lines, a
held-out list and a trial list of half target, half non-target pairs. The plan needs no synthesis (each
utterance's length is the first draw of its own stream), so lists and trials are known up front; files
are synthesised in chunks, in worker processes if asked, and a re-run keeps complete files.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile

from speakerid.data.synthetic.spec import (TEST_SPEAKER_OFFSET, TRIAL_STREAM, UTTERANCE_STREAM, CorpusSpec,
                                           speaker_id)
from speakerid.data.synthetic.synthesis import synthesize_utterance
from speakerid.data.synthetic.voices import (ChannelParams, SpeakerParams, channel_params, speaker_params,
                                             video_ids)


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


@dataclass(frozen=True)
class _Utterance:
    speaker_index: int
    utt_index: int  # 0-based within the speaker
    video_index: int
    relpath: str  # idNNNNN/<video>/<utt>.wav, relative to OUT/wav
    n_samples: int


def _utterance_seconds(spec: CorpusSpec, speaker_index: int, utt_index: int) -> tuple[np.random.Generator, int]:
    """The utterance's RNG and its length in samples (the first draw, so a plan needs no synthesis)."""
    rng = np.random.default_rng([spec.seed, UTTERANCE_STREAM, speaker_index, utt_index])
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
    rng = np.random.default_rng([spec.seed, TRIAL_STREAM])
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


def _synthesise(spec: CorpusSpec, wav_root: str, chunks: list[list[_Utterance]],
                workers: int) -> Iterator[tuple[int, int]]:
    """(done, newly written) of each chunk as it finishes: here, or in ``workers`` processes."""
    if workers <= 1:
        for chunk in chunks:
            yield _write_utterances(spec, wav_root, chunk)
        return
    # fork: the children inherit the imported module; nothing here touches threads or torch.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(_write_utterances, spec, wav_root, chunk) for chunk in chunks]
        for future in as_completed(futures):
            yield future.result()


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
    n_written = 0
    for done, written in _synthesise(spec, str(wav_root), list(_chunks(utterances, 8)), workers):
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
