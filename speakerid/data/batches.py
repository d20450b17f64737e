"""Training batches of N distinct speakers × M utterances, streamed from shards.

Every (rank, DataLoader worker) pair is one *stream* (:class:`TrainStream`). A stream owns a fixed share of
the shards (balanced by utterance count) and walks it pass after pass, without end, through the reader
stages of speakerid.data.stages, listed in order in :meth:`TrainStream.stages`:

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

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

import numpy as np
import torch

from speakerid.data.batch_config import BatchConfig
from speakerid.data.loader import BatchBuffers, TrainLoader, forward_errors
from speakerid.data.shardio import Faults, ShardFailures, ShardUnavailable, Verified
from speakerid.data.shardset import ShardSet, assign_streams
from speakerid.data.stages import Batcher, Stage, apply_quota, group_tuples, interleave, parse, run_stages
from speakerid.errors import SpeakeridError


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
    buffers: BatchBuffers | None = None  # a DataLoader worker's reused batch tensors; None: a fresh one a batch

    def __post_init__(self) -> None:
        self.plan = plan_streams(self.shards.index, self.config, self.n_streams)[self.stream]
        if self.plan.speakers < self.config.n_speakers:
            raise SpeakeridError(
                f"reader stream {self.stream} of {self.n_streams} holds {self.plan.speakers} speakers with at least "
                f"{self.config.utts_per_speaker} utterances, but a batch needs {self.config.n_speakers} distinct "
                "speakers: lower n_speakers (batch_size), use fewer ranks × workers, or re-pack into more shards"
            )

    def stages(self, rng: np.random.Generator, pass_number: int, failures: ShardFailures,
               batcher: Batcher, verified: Verified | None = None) -> list[Stage]:
        """One pass of the reader, in order: each stage takes what the one above it yields; add a stage here."""
        config, faults = self.config, self.faults
        return [
            # shard URLs → samples, from up to open_shards shards at once (a random one each time)
            partial(interleave, open_shards=config.open_shards, rng=rng, faults=faults, failures=failures,
                    io_timeout=self.shards.io_timeout, verified=verified),
            # → Utterance (a wav crop is cut here, a flac member waits for emission)
            partial(parse, encoding=self.shards.encoding, crop_samples=config.read_samples, rng=rng,
                    pass_number=pass_number, faults=faults),
            partial(apply_quota, quota=self.plan.quota),  # at most max_seg_per_spk utterances of a speaker
            partial(group_tuples, m=config.utts_per_speaker, quota=self.plan.quota),  # → M-tuples of one speaker
            partial(batcher, rng=rng, pass_number=pass_number),  # → pool → batches of N speakers, crops decoded
        ]

    def batches(self, skip: int = 0) -> Iterator[dict]:
        """Batches of this stream, the first ``skip`` drawn without decoding and not yielded."""
        failures = ShardFailures(self.config.shard_retries)  # failures in a row of a shard, across passes
        batcher = Batcher(self.config, self.stream, self.faults, skip, self.buffers)  # its pool carries tuples across passes
        # local wav shards read whole (crc32-checked) once; later passes read only each crop's bytes
        verified = Verified("wav" if self.shards.encoding == "wav" else None)
        for pass_number in itertools.count():
            rng = np.random.default_rng([self.config.seed, self.stream, self.n_streams, pass_number])
            urls = [self.shards.urls[i] for i in rng.permutation(self.plan.shards)]
            drawn = batcher.drawn
            yield from run_stages(self.stages(rng, pass_number, failures, batcher, verified), urls)
            if batcher.drawn == drawn:  # a whole readable pass always gives a batch: without one, the next would not either
                self._no_batch_in_a_pass(urls, failures.last)

    def _no_batch_in_a_pass(self, urls: list[str], last_failure: ShardUnavailable | None) -> None:
        shown = ", ".join(urls[:3]) + (f" and {len(urls) - 3} more" if len(urls) > 3 else "")
        raise SpeakeridError(
            f"reader stream {self.stream} of {self.n_streams} read a whole pass over its {len(urls)} shard(s) "
            f"({shown}) without getting one batch ({self.faults.damaged_shards} shard read(s) failed or were "
            f"damaged, {self.faults.corrupt_members} corrupt member(s) so far"
            + (f"; the last failure: {last_failure}" if last_failure else "") + "): check that the shards can be "
            "read (`speakerid shardify verify`, the server or pipe: command)"
        )


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
        self.buffer_tokens: torch.Tensor | None = None  # set by TrainLoader: its workers' batch-buffer slots
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
        tokens = self.buffer_tokens[info.id] if info is not None and self.buffer_tokens is not None else None
        config = self.config
        buffers = BatchBuffers((config.n_speakers, config.utts_per_speaker, config.read_samples), tokens,
                               info.id if info else 0)
        stream = TrainStream(self.shards, config, self.rank * n_workers + worker, self.n_streams, buffers=buffers)
        yield from forward_errors(stream.batches(skip))


def train_loader(shards: ShardSet, config: BatchConfig, *, rank: int = 0, world_size: int = 1, workers: int = 0,
                 start_batch: int = 0, pin_memory: bool = False) -> TrainLoader:
    """A DataLoader over whole batches assembled in the workers (batch_size=None: no collation)."""
    dataset = TrainBatches(shards, config, rank=rank, world_size=world_size, workers=workers, start_batch=start_batch)
    return TrainLoader(dataset, workers=workers, pin_memory=pin_memory)
