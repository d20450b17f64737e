"""Augmentation banks (MUSAN noise/speech/music, RIRs) read from shards packed with ``--kind noise``.

A bank keeps a bounded reservoir of clips per category and refreshes it from an endless, seeded walk over
its shards, so memory stays at ``reservoir × clip length`` whatever the bank's size while, over time,
every file is used. Clips are int16; the batched augmentation on the training device mixes them.

The reservoir after ``s`` training steps is a pure function of (seed, stream, s): ``refresh`` files are read
per step, and each file's slot and crop start come from its own generator, seeded by (seed, stream, its
position in the walk). The walk (pass after pass, shards in a seeded order, members in tar order) is known
from the index, so a resumed bank finds which file sits in each slot without reading the files before it,
and decodes only those.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from speakerid.audio import decode, wrap_pad
from speakerid.data.index import member_intact
from speakerid.data.shardio import Faults, ShardFailures, ShardUnavailable, read_shard
from speakerid.data.shardset import ShardSet
from speakerid.errors import SpeakeridError

FILE_DRAWS = 11  # tags the per-file generators' seeds apart from the other generators of (seed, stream)


class _Walk:
    """The bank's endless file order: pass after pass over its shards in a seeded order, members in tar order."""

    def __init__(self, index_shards: list[dict], share: list[int], seed: int) -> None:
        self.keys = {i: index_shards[i]["keys"] for i in share}
        self.position = {i: {key: j for j, key in enumerate(keys)} for i, keys in self.keys.items()}
        self.share, self.seed = share, seed
        self.per_pass = sum(len(keys) for keys in self.keys.values())
        self._cached: tuple[int, list[tuple[int, int]]] = (-1, [])

    def order(self, pass_number: int) -> list[int]:
        return [int(i) for i in np.random.default_rng([self.seed, pass_number]).permutation(self.share)]

    def file(self, c: int) -> tuple[int, int]:
        """(shard, member) of walk position c."""
        pass_number = c // self.per_pass
        if self._cached[0] != pass_number:
            self._cached = (pass_number, [(i, j) for i in self.order(pass_number) for j in range(len(self.keys[i]))])
        return self._cached[1][c % self.per_pass]

    def category(self, c: int) -> str:
        i, j = self.file(c)
        return self.keys[i][j].split("/", 1)[0]


@dataclass
class NoiseBank:
    """Random clips per category. ``clip_samples=None`` keeps whole files (RIRs), cut to ``max_samples``."""

    shards: ShardSet
    clip_samples: int | None
    seed: int = 0
    stream: int = 0
    n_streams: int = 1
    reservoir: int = 256  # clips kept per category
    refresh: int = 4  # new files read per training step (seek), replacing reservoir slots
    max_samples: int = 16000  # whole-file mode: longer files are cut (an RIR's tail is negligible after 1 s)
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        if self.shards.kind != "noise":
            raise SpeakeridError(f"{self.shards.location}: augmentation reads noise shards, these are {self.shards.kind!r}")
        share = list(range(self.stream % len(self.shards), len(self.shards), self.n_streams)) or [self.stream % len(self.shards)]
        self._walk = _Walk(self.shards.index["shards"], share, self.seed)
        if not self._walk.per_pass:
            raise SpeakeridError(f"{self.shards.location}: no clip in this reader's shards")
        self._rng = np.random.default_rng([self.seed, self.stream, 7])
        categories = {k.split("/", 1)[0] for s in self.shards.index["shards"] for k in s["keys"]}
        self.categories = sorted(categories)
        counts = Counter(self._walk.category(c) for c in range(self._walk.per_pass))
        self._capacity = {k: min(self.reservoir, n) for k, n in counts.items()}
        # the first files of each category in the first pass fill its slots in order
        self._fill_slot: dict[int, int] = {}
        filled: Counter = Counter()
        for c in range(self._walk.per_pass):
            k = self._walk.category(c)
            if filled[k] < self._capacity[k]:
                self._fill_slot[c] = filled[k]
                self._fill_end = c + 1
            filled[k] += 1
        self._slots: dict[str, list[np.ndarray | None]] = {}
        self._next: int | None = None  # walk position of the next file to read; None until the first seek
        self._reader: Iterator[tuple[int, dict | None]] | None = None
        self._failures = ShardFailures()  # a shard failing shard_retries reads in a row is an error

    # -------------------------------------------------------------------------------- where each file goes

    def _draws(self, c: int) -> tuple[int, float]:
        """File c's slot and crop position, from its own generator: the same however the bank reaches c."""
        rng = np.random.default_rng([self.seed, self.stream, FILE_DRAWS, c])
        slot = int(rng.integers(self._capacity[self._walk.category(c)]))
        return self._fill_slot.get(c, slot), float(rng.random())

    def _clip(self, c: int, sample: dict | None) -> np.ndarray | None:
        """File c as the bank keeps it; None (counted) when it is missing from its shard, fails its crc32 or does
        not decode."""
        try:
            if not member_intact(json.loads(sample["json"]), sample[self.shards.encoding]):
                raise ValueError("crc32 mismatch")
            audio, _ = decode(sample[self.shards.encoding])
        except (TypeError, KeyError, ValueError, RuntimeError):
            self.faults.corrupt_members += 1
            return None
        if self.clip_samples is None:
            return audio[: self.max_samples].copy()
        padded = wrap_pad(audio, self.clip_samples)
        start = int(self._draws(c)[1] * (len(padded) - self.clip_samples + 1))
        return padded[start:start + self.clip_samples].copy()

    # -------------------------------------------------------------------------------- reading

    def _read(self, i: int) -> Iterator[dict]:
        """Shard i's samples; a transport failure ends the shard early (counted; the K-th in a row is an error)."""
        url, failed = self.shards.urls[i], False
        try:
            yield from read_shard(url, self.faults, self.shards.io_timeout)
        except ShardUnavailable as error:
            failed = True
            self.faults.damaged_shards += 1
            self._failures.failed(url, error)
        finally:
            if not failed:
                self._failures.succeeded(url)

    def _members(self, start: int) -> Iterator[tuple[int, dict | None]]:
        """(walk position, sample) from ``start`` on, shards read in walk order; None for a member a damaged shard lacks."""
        per_pass = self._walk.per_pass
        for pass_number in itertools.count(start // per_pass):
            base = pass_number * per_pass
            for i in self._walk.order(pass_number):
                n = len(self._walk.keys[i])
                expected = max(0, start - base)
                if expected < n:
                    for sample in self._read(i):
                        j = self._walk.position[i].get(sample["__key__"], -1)
                        if j < expected:
                            continue
                        for missing in range(expected, j):
                            yield base + missing, None
                        yield base + j, sample
                        expected = j + 1
                    for missing in range(expected, n):
                        yield base + missing, None
                base += n

    def _decoded(self, positions: list[int]) -> Iterator[tuple[int, np.ndarray | None]]:
        """The clips of the files at ``positions`` (any order), each shard read once."""
        wanted: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))  # shard → member → positions
        for c in positions:
            i, j = self._walk.file(c)
            wanted[i][j].append(c)
        for i, members in sorted(wanted.items()):
            for sample in self._read(i):
                for c in members.pop(self._walk.position[i].get(sample["__key__"], -1), []):
                    yield c, self._clip(c, sample)
                if not members:
                    break  # the rest of this shard is not wanted
            for c in itertools.chain.from_iterable(members.values()):
                yield c, self._clip(c, None)

    # -------------------------------------------------------------------------------- positioning

    def seek(self, step: int) -> None:
        """Put the reservoir where it is after ``step`` training steps: read on when close, else rebuild."""
        target = self._fill_end + self.refresh * step
        if self._next is not None and 0 <= target - self._next <= sum(self._capacity.values()):
            self._read_forward(target)
        else:
            self._rebuild(target)

    def _read_forward(self, target: int) -> None:
        if self._reader is None:
            self._reader = self._members(self._next)
        while self._next < target:
            c, sample = next(self._reader)
            clip = self._clip(c, sample)
            if clip is not None:  # a file that does not decode leaves its slot as it was
                self._slots[self._walk.category(c)][self._draws(c)[0]] = clip
            self._next += 1

    def _rebuild(self, target: int) -> None:
        """Each slot holds the last file before ``target`` that went to it and decodes: found walking backwards."""
        self._slots = {k: [None] * n for k, n in self._capacity.items()}
        open_slots = {(k, j) for k, n in self._capacity.items() for j in range(n)}
        candidates: dict[tuple[str, int], list[int]] = defaultdict(list)  # newest first, not yet tried
        c = target
        while open_slots:
            missing = {s for s in open_slots if not candidates[s]}
            while missing and c > 0:
                c -= 1
                slot = (self._walk.category(c), self._draws(c)[0])
                if slot in open_slots:
                    candidates[slot].append(c)
                    missing.discard(slot)
            trying = {candidates[s].pop(0): s for s in open_slots if candidates[s]}
            if not trying:
                break  # the walk's start is reached: these slots stay empty
            for position, clip in self._decoded(list(trying)):
                if clip is not None:
                    k, j = trying[position]
                    self._slots[k][j] = clip
                    open_slots.discard((k, j))
        self._next, self._reader = target, None

    # -------------------------------------------------------------------------------- drawing

    def take(self, category: str, k: int, generator: torch.Generator | None = None) -> np.ndarray:
        """``k`` random clips of ``category``: int16 (k, clip_samples), or (k, longest) zero-padded for whole files."""
        if category not in self.categories:
            raise SpeakeridError(f"{self.shards.location}: no clips of category {category!r}; it has {', '.join(self.categories)}")
        if category not in self._capacity:
            raise SpeakeridError(f"{self.shards.location}: the shards of reader stream {self.stream} of {self.n_streams} hold "
                                 f"no {category!r} clips; re-pack the bank into more, smaller shards (--max-utts)")
        if self._next is None:
            self.seek(0)
        clips = [c for c in self._slots[category] if c is not None]
        if not clips:
            raise SpeakeridError(f"{self.shards.location}: no {category!r} clip of this reader's shards decodes "
                                 f"({self.faults.corrupt_members} damaged members); check them with `shardify verify --decode`")
        picks = (torch.randint(len(clips), (k,), generator=generator).tolist() if generator is not None
                 else self._rng.integers(len(clips), size=k))
        chosen = [clips[int(i)] for i in picks]
        if self.clip_samples is not None:
            return np.stack(chosen)
        out = np.zeros((k, max(len(c) for c in chosen)), dtype=np.int16)
        for row, c in enumerate(chosen):
            out[row, :len(c)] = c
        return out
