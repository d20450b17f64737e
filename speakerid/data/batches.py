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

import atexit
import hashlib
import json
import logging
import math
import multiprocessing
import os
import signal
from collections import defaultdict, deque
from dataclasses import dataclass, field, fields
from typing import Iterator

import numpy as np
import torch

from speakerid.audio import read_crop
from speakerid.data.index import member_intact
from speakerid.data.shardset import ShardSet, assign_streams
from speakerid.data.shardio import (DEFAULT_IO_TIMEOUT, DEFAULT_SHARD_RETRIES, Faults, ShardFailures, ShardUnavailable,
                                    read_shard)
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


# ------------------------------------------------------------------------------------------------ stages


@dataclass
class Utterance:
    key: str
    label: int
    samples: int
    u: float  # the crop position draw, made when the utterance is read
    payload: object  # wav: the int16 crop, cut at once; flac: the member bytes, decoded at emission
    pass_number: int
    checked: bool = False  # its json carries a crc32 the parser verified


def interleave(urls: list[str], open_shards: int, rng: np.random.Generator, faults: Faults,
               failures: ShardFailures | None = None, io_timeout: float = DEFAULT_IO_TIMEOUT) -> Iterator[dict]:
    """Read up to ``open_shards`` shards at once, taking each next sample from a random open one.

    A shard whose transport fails is counted as damaged and left for this pass; ``failures`` stops the
    K-th failure in a row of one shard (across passes) with an error naming it.
    """
    failures = failures or ShardFailures()
    pending = deque(urls)
    readers = []
    while pending or readers:
        while pending and len(readers) < open_shards:
            url = pending.popleft()
            readers.append((url, read_shard(url, faults, io_timeout)))
        i = int(rng.integers(len(readers)))
        url, reader = readers[i]
        try:
            yield next(reader)
        except StopIteration:
            readers.pop(i)
            failures.succeeded(url)
        except ShardUnavailable as error:
            readers.pop(i)
            faults.damaged_shards += 1
            log.warning("%s (skipped in this pass)", error)
            failures.failed(url, error)


def parse(samples: Iterator[dict], encoding: str, crop_samples: int, rng: np.random.Generator,
          pass_number: int, faults: Faults) -> Iterator[Utterance]:
    """Member bytes → Utterance; a wav crop is cut here (a slice, no decoding), flac waits for emission."""
    for sample in samples:
        try:
            meta = json.loads(sample["json"])
            data = sample[encoding]
            if not member_intact(meta, data):
                faults.corrupt_members += 1
                log.warning("%s in %s: audio bytes fail their crc32, member skipped",
                            sample["__key__"], sample["__url__"])
                continue
            n, label = int(meta["samples"]), int(meta["label"])
            u = float(rng.random())
            if encoding == "wav":  # cut the crop now (a slice of the PCM): the pool holds 2·L bytes, not the file
                payload = read_crop(data, "wav", n, crop_samples, u)
            else:
                payload = data
        except (KeyError, ValueError, TypeError) as error:
            faults.corrupt_members += 1
            log.warning("%s: skipping a damaged sample: %r", sample.get("__key__"), error)
            continue
        yield Utterance(sample["__key__"], label, n, u, payload, pass_number, checked="crc32" in meta)


def apply_quota(utterances: Iterator[Utterance], quota: dict[int, int]) -> Iterator[Utterance]:
    """At most ``quota[label]`` utterances of a speaker per pass (max_seg_per_spk)."""
    used: dict[int, int] = defaultdict(int)
    for utt in utterances:
        if used[utt.label] < quota.get(utt.label, 0):
            used[utt.label] += 1
            yield utt


def group_tuples(utterances: Iterator[Utterance], m: int) -> Iterator[list[Utterance]]:
    """Consecutive utterances of a speaker → M-tuples. Fewer than M left at the pass end are not usable."""
    partial: dict[int, list[Utterance]] = defaultdict(list)
    for utt in utterances:
        group = partial[utt.label]
        group.append(utt)
        if len(group) == m:
            yield list(group)
            group.clear()


class Pool:
    """Speaker tuples waiting for a batch, by label; older passes' tuples are drawn first."""

    def __init__(self) -> None:
        self.tuples: dict[int, deque] = {}
        self.size = 0

    def add(self, t: list[Utterance]) -> None:
        self.tuples.setdefault(t[0].label, deque()).append(t)
        self.size += 1

    @property
    def speakers(self) -> int:
        return len(self.tuples)

    def draw_order(self, rng: np.random.Generator, current_pass: int) -> list[int]:
        """Labels in the order to try them: carried-over speakers first, each tier weighted by tuple count."""
        labels = np.fromiter(self.tuples, dtype=np.int64, count=len(self.tuples))
        counts = np.array([len(self.tuples[x]) for x in labels], dtype=np.float64)
        carried = np.array([self.tuples[x][0][0].pass_number < current_pass for x in labels])
        order = []
        for tier in (carried, ~carried):
            if tier.any():
                p = counts[tier] / counts[tier].sum()
                order.extend(rng.choice(labels[tier], size=int(tier.sum()), replace=False, p=p).tolist())
        return order

    def pop(self, label: int) -> list[Utterance]:
        queue = self.tuples[label]
        t = queue.popleft()
        if not queue:
            del self.tuples[label]
        self.size -= 1
        return t


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


def forward_errors(batches: Iterator[dict]) -> Iterator[dict]:
    """Worker side of ReaderLoader: a SpeakeridError becomes a last {"error": message} item."""
    try:
        yield from batches
    except SpeakeridError as error:
        if torch.utils.data.get_worker_info() is None:
            raise
        yield {"error": str(error)}  # raised, torch would wrap it in the worker's traceback


class ReaderLoader(torch.utils.data.DataLoader):
    """A DataLoader whose workers' errors reach the caller as the one clear message they were raised with."""

    iterator = None  # torch's iterator of the latest __iter__ (TrainLoader.close shuts its workers down)

    def __iter__(self) -> Iterator[dict]:
        self.iterator = super().__iter__()
        return _raise_worker_errors(self.iterator)


def _raise_worker_errors(batches: Iterator[dict]) -> Iterator[dict]:
    for batch in batches:
        if "error" in batch:
            raise SpeakeridError(batch["error"])
        yield batch


class WorkerSignals:
    """DataLoader workers leave SIGTERM/SIGINT/SIGUSR1 to the main process until it closes the loader.

    A cluster signals the whole process group (Slurm, Kubernetes, Ctrl-C, the launcher's forwarding): a worker
    that died of it would take the run down before the main process saved its checkpoint. Once the loader is
    closing, the signal ends the worker as usual, so the DataLoader's own terminate() still works.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self) -> None:
        self.closing = multiprocessing.RawValue("b", 0)  # shared with the forked workers, read in a signal handler

    def __call__(self, worker_id: int) -> None:  # the DataLoader's worker_init_fn
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.closing.value:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def close(self) -> None:
        self.closing.value = 1


class TrainLoader(ReaderLoader):
    """The DataLoader of the training batches; ``close()`` stops its workers, even one stuck on a dead server."""

    def __init__(self, dataset: TrainBatches, *, workers: int, pin_memory: bool) -> None:
        self.worker_signals = WorkerSignals()
        super().__init__(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                         persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None,
                         worker_init_fn=self.worker_signals if workers > 0 else None)
        atexit.register(self.worker_signals.close)  # runs before multiprocessing's own exit handler terminates them

    def close(self) -> None:
        self.worker_signals.close()
        shutdown = getattr(self.iterator, "_shutdown_workers", None)  # torch has no public close for an iterator
        if shutdown is not None:
            shutdown()


def train_loader(shards: ShardSet, config: BatchConfig, *, rank: int = 0, world_size: int = 1, workers: int = 0,
                 start_batch: int = 0, pin_memory: bool = False) -> TrainLoader:
    """A DataLoader over whole batches assembled in the workers (batch_size=None: no collation)."""
    dataset = TrainBatches(shards, config, rank=rank, world_size=world_size, workers=workers, start_batch=start_batch)
    return TrainLoader(dataset, workers=workers, pin_memory=pin_memory)


class EpochMeter:
    """Per-epoch coverage (share of usable utterances seen) and faults, from the batches a rank consumed.

    Faults are cumulative per stream in each batch; the epoch's count is the growth of their sum. Utterance keys
    are kept as 64-bit hashes (8 bytes each) so the state a checkpoint saves stays small at VoxCeleb scale.
    """

    def __init__(self, usable: int) -> None:
        self.usable = usable
        self.seen: set[int] = set()
        self.crops = 0
        self._faults_at: dict[int, dict] = {}
        self._faults_start: dict[int, dict] = {}

    def update(self, batch: dict) -> None:
        for t in batch["keys"]:
            self.seen.update(key_hash(k) for k in t)
            self.crops += len(t)
        self._faults_at[batch["stream"]] = batch["faults"]

    def report(self) -> dict:
        faults = {k: sum(f[k] - self._faults_start.get(s, {}).get(k, 0) for s, f in self._faults_at.items())
                  for k in ("corrupt_members", "damaged_shards")}
        return {"coverage": len(self.seen) / max(1, self.usable), "utterances_seen": len(self.seen),
                "usable": self.usable, "crops": self.crops, **faults}

    def next_epoch(self) -> None:
        self.seen.clear()
        self.crops = 0
        self._faults_start = {s: dict(f) for s, f in self._faults_at.items()}

    def save(self, path) -> None:
        """The epoch so far as safetensors (hashes) + JSON metadata: a resumed run reports the whole epoch."""
        from safetensors.numpy import save_file

        state = {"crops": self.crops, "faults_at": self._faults_at, "faults_start": self._faults_start}
        seen = np.fromiter(sorted(self.seen), dtype=np.uint64, count=len(self.seen))
        save_file({"seen": seen}, str(path), metadata={"state": json.dumps(state)})

    def load(self, path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            state = json.loads(f.metadata()["state"])
            self.seen = set(f.get_tensor("seen").tolist())
        self.crops = state["crops"]
        self._faults_at = {int(s): f for s, f in state["faults_at"].items()}  # JSON keys are strings
        self._faults_start = {int(s): f for s, f in state["faults_start"].items()}


def key_hash(key: str) -> int:
    """A stable 64-bit hash of an utterance key (Python's hash() changes between processes)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
