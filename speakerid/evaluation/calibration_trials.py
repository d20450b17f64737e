"""Calibration trial lists drawn from training shards, and the audio of their utterances.

:func:`make_calibration_trials` (``python -m shardify calibration-trials``) reads the members' JSON of the first
``max_shards`` training shards (index order; shardify shuffled the speaker chunks into them, so they hold a
random sample of chunks) and draws ``pairs`` target and ``pairs`` non-target trials, reproducibly from
``seed``: a target pair is two utterances of one speaker, from two different videos when the speaker has
them (cross-session, like VoxCeleb's trials); a non-target pair two utterances of two speakers. Each pair
occurs once. The list is a VoxCeleb-format trial list (``1|0 enroll test``) naming shard keys
(``spk/video/utt``), which ``python -m evaluate --calibration-trials LIST --calibration-audio SHARDS`` reads
back from the same shards (:func:`shard_items`: it stops reading once it has every utterance).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from accelerate import PartialState

from speakerid.audio import decode
from speakerid.data.eval_reader import AudioSource, names_shards
from speakerid.data.lists import speaker_of
from speakerid.data.shardio import Faults, read_shard
from speakerid.data.shardset import ShardSet
from speakerid.errors import SpeakeridError
from speakerid.evaluation.embeddings import Embeddings
from speakerid.evaluation.extract import ExtractConfig, Progress, cache_settings, extract, prepare_item, source_items
from speakerid.evaluation.trials import TrialList, wanted_utterances
from speakerid.inference import LoadedModel
from speakerid.tempfiles import atomic_write

DEFAULT_MAX_SHARDS = 8  # ~2 GB of 256 MB shards: thousands of speakers' chunks


@dataclass
class CalibrationTrialsReport:
    path: Path
    n_target: int
    n_nontarget: int
    speakers: int  # speakers with at least one utterance in the shards read
    utterances: int  # utterances in the shards read
    shards_read: int
    same_video_targets: int = 0  # target pairs from one video (the speaker had no other video in the shards read)
    faults: dict = field(default_factory=dict)


def _training_shards(location: str) -> ShardSet:
    shards = ShardSet.open(location)
    if shards.kind != "train":
        raise SpeakeridError(f"{location}: calibration trials are drawn from training shards (speakers the test lists "
                             f"do not contain); these are of kind {shards.kind!r}")
    return shards


def read_speakers(shards: ShardSet, max_shards: int) -> tuple[dict[str, list[str]], int, Faults]:
    """speaker → its utterance keys (reading order) in the first ``max_shards`` shards; how many shards were read."""
    if max_shards < 1:
        raise SpeakeridError(f"--max-shards must be at least 1, got {max_shards}")
    faults = Faults()
    speakers: dict[str, list[str]] = {}
    urls = shards.urls[:max_shards]
    for url in urls:
        for sample in read_shard(url, faults, shards.io_timeout):
            key = sample["__key__"]
            try:
                speaker = json.loads(sample["json"]).get("spk") or speaker_of(key)
            except (KeyError, ValueError):
                speaker = speaker_of(key)
            speakers.setdefault(speaker, []).append(key)
    return speakers, len(urls), faults


def _video(key: str) -> str:
    parts = key.split("/")
    return parts[1] if len(parts) >= 3 else key  # spk/video/utt; a flat key is its own session


def draw_trials(speakers: dict[str, list[str]], pairs: int, seed: int) -> list[tuple[int, str, str]]:
    """``pairs`` target and ``pairs`` non-target trials (label, enroll, test), each pair once, from ``seed``."""
    names = sorted(speakers)
    multi = [s for s in names if len(speakers[s]) >= 2]
    if pairs < 1:
        raise SpeakeridError(f"--pairs must be at least 1, got {pairs}")
    if not multi or len(names) < 2:
        raise SpeakeridError(f"the shards read hold {len(names)} speaker(s), {len(multi)} with two or more utterances; "
                             "calibration trials need at least two speakers and one with two utterances: read more "
                             "shards (--max-shards)")
    n_target_pairs = sum(len(speakers[s]) * (len(speakers[s]) - 1) // 2 for s in multi)
    n_utts = sum(len(v) for v in speakers.values())
    n_nontarget_pairs = (n_utts * n_utts - sum(len(v) ** 2 for v in speakers.values())) // 2
    if pairs > n_target_pairs or pairs > n_nontarget_pairs // 2:
        raise SpeakeridError(f"--pairs {pairs}: the shards read allow {n_target_pairs} target pairs and "
                             f"{n_nontarget_pairs} non-target pairs; ask for fewer or read more shards (--max-shards)")
    rng = np.random.default_rng(seed)
    seen: set[tuple[str, str]] = set()
    trials: list[tuple[int, str, str]] = []

    def add(label: int, a: str, b: str) -> None:
        pair = (a, b) if a < b else (b, a)
        if pair not in seen:
            seen.add(pair)
            trials.append((label, a, b))

    while len(trials) < pairs:  # targets: a speaker uniformly, then two of its utterances, other video if any
        keys = speakers[multi[rng.integers(len(multi))]]
        a = keys[rng.integers(len(keys))]
        others = [k for k in keys if _video(k) != _video(a)] or [k for k in keys if k != a]
        add(1, a, others[rng.integers(len(others))])
    while len(trials) < 2 * pairs:  # non-targets: two speakers uniformly, one utterance each
        first, second = rng.choice(len(names), size=2, replace=False)
        a, b = speakers[names[first]], speakers[names[second]]
        add(0, a[rng.integers(len(a))], b[rng.integers(len(b))])
    return trials


def make_calibration_trials(shards: str | os.PathLike, out: str | os.PathLike, *, pairs: int = 5000, seed: int = 0,
                            max_shards: int = DEFAULT_MAX_SHARDS) -> CalibrationTrialsReport:
    """Draw a calibration trial list from training shards and write it to ``out`` (see the module docstring)."""
    shard_set = _training_shards(str(shards))
    speakers, read, faults = read_speakers(shard_set, max_shards)
    trials = draw_trials(speakers, pairs, seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        f.write("".join(f"{label} {a} {b}\n" for label, a, b in trials))
    same_video = sum(1 for label, a, b in trials if label == 1 and _video(a) == _video(b))
    return CalibrationTrialsReport(out, pairs, pairs, len(speakers), sum(len(v) for v in speakers.values()), read,
                                   same_video, faults.as_dict() if faults.damaged_shards or faults.corrupt_members else {})


def shard_items(location: str, keys: dict[str, str], config: ExtractConfig,
                state: PartialState) -> Iterator[tuple[str, np.ndarray, int]]:
    """This process's share of the utterances ``keys`` (key → where it is named) of training shards, as Embedder
    items ``(key, audio, samples)``: shards in index order, until every one was read; wanted utterance i (in
    reading order) is embedded by process i mod world size."""
    shards = _training_shards(location)
    wanted, found = set(keys), 0
    faults = Faults()
    for url in shards.urls:
        for sample in read_shard(url, faults, shards.io_timeout):
            key = sample["__key__"]
            if key not in wanted:
                continue
            wanted.discard(key)
            if found % state.num_processes == state.process_index:
                try:
                    audio = decode(sample[shards.encoding])[0]
                except (KeyError, ValueError, RuntimeError) as error:
                    raise SpeakeridError(f"{url}: member {key} cannot be decoded ({error}); run `speakerid shardify "
                                         "verify` on the shards") from error
                yield key, prepare_item(f"{location}: {key}", audio, config), len(audio)
            found += 1
            if not wanted:
                return
    if wanted:
        missing = sorted(wanted)
        raise SpeakeridError(f"{len(missing)} utterance(s) of the calibration trials are not in {location}, e.g. "
                             f"{missing[0]} (named at {keys[missing[0]]}): draw the list from these shards "
                             "(speakerid shardify calibration-trials)")


@dataclass
class CalibrationAudio:
    """Where the calibration list's utterances are read from: training shards (streamed until every one was
    found) or an evaluation source (:class:`AudioSource`: a folder or eval shards, checked up front)."""

    location: str
    wanted: dict[str, tuple[str, str]]  # key → (relpath, where it is named)
    source: AudioSource | None = None  # None: training shards

    @classmethod
    def open(cls, location: str, trial_list: TrialList) -> "CalibrationAudio":
        """Open and check what can be checked before any audio is read."""
        wanted = wanted_utterances([trial_list])
        if names_shards(location) and ShardSet.open(location).kind == "train":
            return cls(location, wanted)
        if not names_shards(location) and not Path(location).is_dir():
            raise SpeakeridError(f"{location}: --calibration-audio must be the training shards the calibration list was "
                                 "drawn from (a directory with index.json, or its URL), an audio folder or eval shards; "
                                 "nothing is there")
        source = AudioSource.open(location)
        source.check(wanted)
        return cls(location, wanted, source)

    def identity(self) -> str:
        return (self.source or AudioSource(self.location)).identity()

    def items(self, missing: list[str], config: ExtractConfig, state: PartialState):
        if self.source is None:
            return shard_items(self.location, {k: self.wanted[k][1] for k in missing}, config, state)
        return source_items(self.source, {k: self.wanted[k][0] for k in missing}, config, state)


def calibration_embeddings(loaded: LoadedModel, audio: CalibrationAudio, config: ExtractConfig, state: PartialState,
                           *, cache: Path | None = None, progress: Progress | None = None) -> Embeddings | None:
    """Embeddings of every utterance of the calibration list on the main process (None elsewhere), cached like
    the trials'."""
    settings = cache_settings(loaded, config, state.device, audio=audio.identity())
    return extract(loaded, lambda missing, st: audio.items(missing, config, st), sorted(audio.wanted), config, state,
                   cache=cache, settings=settings, progress=progress, stage="calibration")[0]
