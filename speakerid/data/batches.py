"""Training batches of N distinct speakers × M utterances, streamed from shards.

Every (rank, DataLoader worker) pair is one *stream*. A stream owns a fixed share of the shards (balanced
by utterance count) and walks it pass after pass, without end:

    shards of the pass (seeded order) → interleave K open shards → parse members → per-speaker quota
    (max_seg_per_spk) → M-tuples per speaker → pool → batches of N distinct speakers → crops (decoded last)

Tuples still in the pool when a pass ends stay there and are drawn first in the next pass, so nothing is
lost at pass ends; an utterance is used at most once per pass. An epoch is a fixed number of batches per
rank, computed from the index (usable tuples ÷ (N × world size)), so every rank yields the same count
whatever the shard sizes. Everything random is drawn from generators seeded by (seed, stream, pass), and
the audio is decoded only when a batch is emitted, so the stream is a pure function of (seed, rank,
world size, workers, batch index) and skipping to batch k reads the skipped shards without decoding them.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict, deque
from dataclasses import dataclass, field, fields
from typing import Iterator

import numpy as np
import torch

from speakerid.audio import read_crop
from speakerid.data.loader import TrainLoader, forward_errors
from speakerid.data.shardio import DEFAULT_SHARD_RETRIES, Faults, ShardFailures, ShardUnavailable
from speakerid.data.shardset import ShardSet, assign_streams
from speakerid.data.stages import Pool, Utterance, apply_quota, group_tuples, interleave, parse
from speakerid.errors import SpeakeridError

log = logging.getLogger("speakerid.data")

# voxceleb_trainer's option names, accepted wherever a BatchConfig is built from a dict.
ALIASES = {"batch_size": "n_speakers", "nPerSpeaker": "utts_per_speaker", "nDataLoaderThread": "workers"}


@dataclass(frozen=True)
class BatchConfig:
    n_speakers: int = 200  # N (the seeds' batch_size)
    utts_per_speaker: int = 2  # M (nPerSpeaker)
    max_frames: int = 200  # crop = max_frames · 160 + 240 samples
    max_seg_per_spk: int = 500  # a speaker's utterances used per pass, at most
    open_shards: int = 4  # shards a stream reads at once, interleaved, to mix speakers
    pool_factor: float = 2.0  # draw a batch once the pool holds pool_factor × N tuples
    seed: int = 0
    shard_retries: int = DEFAULT_SHARD_RETRIES  # a shard failing this many passes in a row is an error

    def __post_init__(self) -> None:
        for name in ("n_speakers", "utts_per_speaker", "max_frames", "max_seg_per_spk", "open_shards",
                     "shard_retries"):
            if getattr(self, name) < 1:
                raise SpeakeridError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.pool_factor < 1:
            raise SpeakeridError(f"pool_factor must be at least 1, got {self.pool_factor}")
        if self.max_seg_per_spk < self.utts_per_speaker:
            raise SpeakeridError(f"max_seg_per_spk {self.max_seg_per_spk} < utts_per_speaker {self.utts_per_speaker}")

    @property
    def crop_samples(self) -> int:
        return self.max_frames * 160 + 240

    @classmethod
    def from_dict(cls, options: dict) -> "BatchConfig":
        """Build from a dict using either speakerid's or voxceleb_trainer's names."""
        valid = {f.name for f in fields(cls)}
        resolved = {}
        for key, value in options.items():
            name = ALIASES.get(key, key)
            if name not in valid:
                raise SpeakeridError(f"unknown batch option {key!r}; valid: {', '.join(sorted(valid | set(ALIASES)))}")
            resolved[name] = value
        return cls(**resolved)


# -------------------------------------------------------------------------------------- planning from the index


@dataclass
class StreamPlan:
    """What the index says one stream will see in a pass."""

    shards: list[int]
    quota: dict[int, int]  # label → utterances usable per pass (max_seg_per_spk, split over streams)
    usable_tuples: int
    speakers: int  # labels with at least one usable tuple


def plan_streams(index: dict, config: BatchConfig, n_streams: int) -> list[StreamPlan]:
    if index["kind"] != "train":
        raise SpeakeridError(f"training batches need a training shard set, this one is of kind {index['kind']!r}")
    shards = index["shards"]
    if any("labels" not in s for s in shards):
        raise SpeakeridError("the shard index has no per-shard label counts (an early shardify wrote it): re-pack the shards")
    assignment = assign_streams([s["samples"] for s in shards], n_streams)
    total: dict[int, int] = defaultdict(int)
    for s in shards:
        for label, n in s["labels"].items():
            total[int(label)] += n
    plans = []
    m = config.utts_per_speaker
    for share in assignment:
        counts: dict[int, int] = defaultdict(int)
        for i in share:
            for label, n in shards[i]["labels"].items():
                counts[int(label)] += n
        # A speaker's cap is split over streams in proportion to what each holds, so a pass over all
        # streams uses at most max_seg_per_spk of its utterances, as the seed's sampler does per epoch.
        quota = {label: min(n, config.max_seg_per_spk * n // total[label]) for label, n in counts.items()}
        tuples = {label: q // m for label, q in quota.items()}
        plans.append(StreamPlan(share, quota, sum(tuples.values()), sum(1 for t in tuples.values() if t)))
    return plans


def batches_per_epoch(index: dict, config: BatchConfig, world_size: int, workers: int = 1) -> int:
    """The same number on every rank: usable tuples of all streams ÷ (N × world size)."""
    plans = plan_streams(index, config, world_size * max(1, workers))
    return sum(p.usable_tuples for p in plans) // (config.n_speakers * world_size)


def usable_utterances(index: dict, config: BatchConfig, n_streams: int) -> int:
    """Utterances that can appear in a pass (the denominator of the per-epoch coverage)."""
    m = config.utts_per_speaker
    return sum((q // m) * m for p in plan_streams(index, config, n_streams) for q in p.quota.values())


# -------------------------------------------------------------------------------------------------- stream


@dataclass
class TrainStream:
    """The endless batch stream of one (rank, worker)."""

    shards: ShardSet
    config: BatchConfig
    stream: int
    n_streams: int
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        self.plan = plan_streams(self.shards.index, self.config, self.n_streams)[self.stream]
        if self.plan.speakers < self.config.n_speakers:
            raise SpeakeridError(
                f"reader stream {self.stream} of {self.n_streams} holds {self.plan.speakers} speakers with at least "
                f"{self.config.utts_per_speaker} utterances, but a batch needs {self.config.n_speakers} distinct "
                "speakers: lower n_speakers (batch_size), use fewer ranks × workers, or re-pack into more shards"
            )

    def batches(self, skip: int = 0) -> Iterator[dict]:
        """Batches of this stream, the first ``skip`` drawn without decoding and not yielded."""
        config = self.config
        pool = Pool()
        emitted = 0
        failures = ShardFailures(config.shard_retries)

        def drain(rng: np.random.Generator, pass_number: int, min_pool: float) -> Iterator[dict]:
            """Draw batches while the pool holds min_pool tuples of at least N speakers."""
            nonlocal emitted
            while pool.size >= min_pool and pool.speakers >= config.n_speakers:
                decode = emitted >= skip
                batch = self._draw(pool, rng, pass_number, decode=decode)
                if batch is None:
                    return
                emitted += 1
                if decode:
                    yield batch

        for pass_number in range(2**62):
            rng = np.random.default_rng([config.seed, self.stream, self.n_streams, pass_number])
            order = rng.permutation(self.plan.shards)
            urls = [self.shards.urls[i] for i in order]
            samples = interleave(urls, config.open_shards, rng, self.faults, failures, self.shards.io_timeout)
            utterances = apply_quota(parse(samples, self.shards.encoding, config.crop_samples, rng, pass_number,
                                           self.faults), self.plan.quota)
            drawn = emitted
            for t in group_tuples(utterances, config.utts_per_speaker):
                pool.add(t)
                yield from drain(rng, pass_number, config.pool_factor * config.n_speakers)
            yield from drain(rng, pass_number, 0)  # the pass is over: draw what it allows, carry the rest
            if emitted == drawn:  # a whole readable pass always gives a batch: without one, the next would not either
                self._no_batch_in_a_pass(urls, failures.last)

    def _no_batch_in_a_pass(self, urls: list[str], last_failure: ShardUnavailable | None) -> None:
        shown = ", ".join(urls[:3]) + (f" and {len(urls) - 3} more" if len(urls) > 3 else "")
        raise SpeakeridError(
            f"reader stream {self.stream} of {self.n_streams} read a whole pass over its {len(urls)} shard(s) "
            f"({shown}) without getting one batch ({self.faults.damaged_shards} shard read(s) failed or were "
            f"damaged, {self.faults.corrupt_members} corrupt member(s) so far"
            + (f"; the last failure: {last_failure}" if last_failure else "") + "): check that the shards can be "
            "read (`python -m shardify verify`, the server or pipe: command)"
        )

    def _crop(self, utt: Utterance, decode: bool) -> object:
        """The utterance's int16 crop (a flac member is decoded here); None, counted, when it does not decode.

        Skipping (decode=False) still decodes flac crops without a checksum, so a skipped batch drops exactly
        the tuples a decoded one drops; a member whose crc32 the parser verified is taken as sound."""
        if isinstance(utt.payload, np.ndarray) or (utt.checked and not decode):
            return utt.payload
        try:
            return read_crop(utt.payload, "flac", utt.samples, self.config.crop_samples, utt.u)
        except (ValueError, RuntimeError) as error:
            if utt.checked:  # skipping would have kept it: dropping it here would make resume inexact
                raise SpeakeridError(f"{utt.key}: member passes its crc32 but does not decode ({error}); "
                                     "find such members with `shardify verify --decode` and re-pack") from error
            self.faults.corrupt_members += 1
            log.warning("%s: skipping an undecodable member: %s", utt.key, error)
            return None

    def _draw(self, pool: Pool, rng: np.random.Generator, pass_number: int, decode: bool) -> dict | None:
        n, m, length = self.config.n_speakers, self.config.utts_per_speaker, self.config.crop_samples
        chosen: list[list[Utterance]] = []
        crops = np.empty((n, m, length), dtype=np.int16) if decode else None
        for label in pool.draw_order(rng, pass_number):
            t = pool.pop(label)
            tuple_crops = [self._crop(utt, decode) for utt in t]
            if any(crop is None for crop in tuple_crops):  # a member that does not decode: drop the tuple
                continue
            if decode:
                crops[len(chosen)] = np.stack(tuple_crops)
            chosen.append(t)
            if len(chosen) == n:
                break
        if len(chosen) < n:  # undecodable members left too few speakers: put the good tuples back
            for t in chosen:
                pool.tuples.setdefault(t[0].label, deque()).appendleft(t)
                pool.size += 1
            return None
        return {
            "audio": torch.from_numpy(crops) if decode else None,
            "labels": torch.tensor([t[0].label for t in chosen], dtype=torch.long),
            "keys": [[u.key for u in t] for t in chosen],
            "tuple_passes": [t[0].pass_number for t in chosen],  # the pass each tuple was read in
            "stream": self.stream,
            "pass": pass_number,
            "faults": self.faults.as_dict(),
        }


# ---------------------------------------------------------------------------------------------- DataLoader


class TrainBatches(torch.utils.data.IterableDataset):
    """One rank's endless batch stream, split over its DataLoader workers; starts at rank batch ``start_batch``.

    Rank batch k comes from worker k % W (its (k // W)-th batch): DataLoader workers are rotated by
    ``start_batch`` so a resumed loader's first fetch is exactly batch ``start_batch``.
    """

    def __init__(self, shards: ShardSet, config: BatchConfig, *, rank: int = 0, world_size: int = 1,
                 workers: int = 0, start_batch: int = 0) -> None:
        super().__init__()
        self.shards, self.config = shards, config
        self.rank, self.world_size, self.workers, self.start_batch = rank, world_size, workers, start_batch
        self.n_streams = world_size * max(1, workers)
        for stream in range(rank * max(1, workers), (rank + 1) * max(1, workers)):
            TrainStream(shards, config, stream, self.n_streams)  # fail at start-up, not inside a worker
        self.batches_per_epoch = batches_per_epoch(shards.index, config, world_size, workers)
        if self.batches_per_epoch < 1:
            raise SpeakeridError(
                f"the shards hold too few usable speaker tuples for one batch of {config.n_speakers} speakers per rank "
                f"on {world_size} rank(s); lower n_speakers"
            )

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        n_workers = info.num_workers if info else 1
        if n_workers != max(1, self.workers):
            raise SpeakeridError(f"TrainBatches was built for {self.workers} workers, the DataLoader has {n_workers}")
        worker = ((info.id if info else 0) + self.start_batch) % n_workers
        skip = max(0, math.ceil((self.start_batch - worker) / n_workers))
        stream = TrainStream(self.shards, self.config, self.rank * n_workers + worker, self.n_streams)
        yield from forward_errors(stream.batches(skip))


def train_loader(shards: ShardSet, config: BatchConfig, *, rank: int = 0, world_size: int = 1, workers: int = 0,
                 start_batch: int = 0, pin_memory: bool = False) -> TrainLoader:
    """A DataLoader over whole batches assembled in the workers (batch_size=None: no collation)."""
    dataset = TrainBatches(shards, config, rank=rank, world_size=world_size, workers=workers, start_batch=start_batch)
    return TrainLoader(dataset, workers=workers, pin_memory=pin_memory)
