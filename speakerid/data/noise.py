"""Augmentation banks (MUSAN noise/speech/music, RIRs) read from shards packed with ``--kind noise``.

A bank keeps a bounded reservoir of clips per category and refreshes it from an endless, seeded walk over
its shards, so memory stays at ``reservoir × clip length`` whatever the bank's size while, over time,
every file is used. Clips are int16; the batched augmentation on the training device mixes them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from speakerid.audio import decode, wrap_pad
from speakerid.data.batches import Faults, read_shard
from speakerid.data.index import member_intact
from speakerid.data.shardio import ShardFailures, ShardUnavailable
from speakerid.data.shardset import ShardSet
from speakerid.errors import SpeakeridError


def _shard_clips(shards: ShardSet, url: str, faults: Faults) -> Iterator[tuple[str, np.ndarray]]:
    """(category, samples) of one shard's members; damaged members are counted and skipped."""
    for sample in read_shard(url, faults, shards.io_timeout):
        try:
            meta = json.loads(sample["json"])
            if not member_intact(meta, sample[shards.encoding]):
                raise ValueError("crc32 mismatch")
            audio, _ = decode(sample[shards.encoding])
        except (KeyError, ValueError, RuntimeError):
            faults.corrupt_members += 1
            continue
        yield meta.get("category", "noise"), audio


def _files(shards: ShardSet, share: list[int], seed: int, faults: Faults) -> Iterator[tuple[str, np.ndarray]]:
    """(category, samples) of every member, pass after pass, shards in a seeded order."""
    failures = ShardFailures()
    for pass_number in range(2**62):
        order = np.random.default_rng([seed, pass_number]).permutation(share)
        produced = 0
        for i in order:
            try:
                for clip in _shard_clips(shards, shards.urls[i], faults):
                    produced += 1
                    yield clip
                failures.succeeded(shards.urls[i])
            except ShardUnavailable as error:  # skipped in this pass; the K-th failure in a row is an error
                faults.damaged_shards += 1
                failures.failed(shards.urls[i], error)
        if not produced:
            last = f"; the last failure: {failures.last}" if failures.last else ""
            raise SpeakeridError(f"{shards.location}: no readable clip in this reader's shards{last}")


@dataclass
class NoiseBank:
    """Random clips per category. ``clip_samples=None`` keeps whole files (RIRs), cut to ``max_samples``."""

    shards: ShardSet
    clip_samples: int | None
    seed: int = 0
    stream: int = 0
    n_streams: int = 1
    reservoir: int = 256  # clips kept per category
    refresh: int = 4  # new files read per take(), replacing random reservoir slots
    max_samples: int = 16000  # whole-file mode: longer files are cut (an RIR's tail is negligible after 1 s)
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        if self.shards.kind != "noise":
            raise SpeakeridError(f"{self.shards.location}: augmentation reads noise shards, these are {self.shards.kind!r}")
        share = list(range(self.stream % len(self.shards), len(self.shards), self.n_streams)) or [self.stream % len(self.shards)]
        self._source = _files(self.shards, share, self.seed, self.faults)
        self._rng = np.random.default_rng([self.seed, self.stream, 7])
        self._clips: dict[str, list[np.ndarray]] = defaultdict(list)
        categories = {k.split("/", 1)[0] for s in self.shards.index["shards"] for k in s["keys"]}
        self.categories = sorted(categories)
        files = sum(self.shards.index["shards"][i]["samples"] for i in share)
        for _ in range(min(self.reservoir * len(self.categories), files)):  # fill: one pass at most
            self._read_one()

    def _clip(self, audio: np.ndarray) -> np.ndarray:
        if self.clip_samples is None:
            return audio[: self.max_samples].copy()
        padded = wrap_pad(audio, self.clip_samples)
        start = int(self._rng.integers(0, len(padded) - self.clip_samples + 1))
        return padded[start:start + self.clip_samples].copy()

    def _read_one(self) -> None:
        category, audio = next(self._source)
        clips = self._clips[category]
        if len(clips) < self.reservoir:
            clips.append(self._clip(audio))
        else:
            clips[int(self._rng.integers(len(clips)))] = self._clip(audio)

    def take(self, category: str, k: int) -> np.ndarray:
        """``k`` random clips of ``category``: int16 (k, clip_samples), or (k, longest) zero-padded for whole files."""
        if category not in self._clips or not self._clips[category]:
            raise SpeakeridError(f"{self.shards.location}: no clips of category {category!r}; it has {', '.join(self.categories)}")
        for _ in range(self.refresh):
            self._read_one()
        clips = self._clips[category]
        chosen = [clips[int(i)] for i in self._rng.integers(len(clips), size=k)]
        if self.clip_samples is not None:
            return np.stack(chosen)
        out = np.zeros((k, max(len(c) for c in chosen)), dtype=np.int16)
        for row, c in enumerate(chosen):
            out[row, :len(c)] = c
        return out
