"""Reader stages: each takes an iterator and yields the next kind of item (WeSpeaker's processor chain).

In the order :meth:`TrainStream.stages <speakerid.data.batches.TrainStream.stages>` lists them for one pass:
shard URLs → :func:`interleave` (K shards read at once, through speakerid.data.shardio) → :func:`parse`
(member bytes → :class:`Utterance`) → :func:`apply_quota` (max_seg_per_spk) → :func:`group_tuples` (M-tuples of
a speaker) → :class:`Batcher` (a :class:`Pool` of tuples → batches of N distinct speakers, crops decoded last).
:func:`run_stages` feeds a source through such a list; a new stage is a function here and one entry there.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
import torch

from speakerid.audio import read_crop, read_wav_crop_at
from speakerid.data.index import member_intact
from speakerid.data.loader import BatchBuffers
from speakerid.data.shardio import (DEFAULT_IO_TIMEOUT, Faults, Located, ShardFailures, ShardUnavailable, Verified,
                                    read_shard)
from speakerid.errors import SpeakeridError

if TYPE_CHECKING:
    from speakerid.data.batches import BatchConfig

log = logging.getLogger("speakerid.data")

Stage = Callable[[Iterator], Iterator]  # one step of the reader: takes the previous step's items, yields its own


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
               failures: ShardFailures | None = None, io_timeout: float = DEFAULT_IO_TIMEOUT,
               verified: Verified | None = None) -> Iterator[dict]:
    """Read up to ``open_shards`` shards at once, taking each next sample from a random open one.

    A shard whose transport fails is counted as damaged and left for this pass; ``failures`` stops the
    K-th failure in a row of one shard (across passes) with an error naming it. ``verified`` (kept across
    passes) lets a local shard read whole once be read crop by crop afterwards (speakerid.data.shardio).
    """
    failures = failures or ShardFailures()
    pending = deque(urls)
    readers = []
    while pending or readers:
        while pending and len(readers) < open_shards:
            url = pending.popleft()
            readers.append((url, read_shard(url, faults, io_timeout, verified)))
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
    """Member bytes → Utterance; a wav crop is cut here (a slice, no decoding), flac waits for emission.

    A wav member located in a verified local shard (shardio.Located) is not read whole: its crc32 was checked
    when the shard was first read (a failure then is remembered in ``__failed__``), and only its header and the
    crop's bytes are read now. The crop is the same: same draw, same bytes."""
    for sample in samples:
        try:
            meta = json.loads(sample["json"])
            data = sample[encoding]
            located = isinstance(data, Located)
            if sample["__key__"] in sample.get("__failed__", ()) or not (located or member_intact(meta, data)):
                faults.corrupt_members += 1
                log.warning("%s in %s: audio bytes fail their crc32, member skipped",
                            sample["__key__"], sample["__url__"])
                sample.get("__failed__", set()).add(sample["__key__"])
                continue
            n, label = int(meta["samples"]), int(meta["label"])
            u = float(rng.random())
            if located:  # only the header and the crop's bytes are read
                payload = read_wav_crop_at(data.fd, data.offset, data.size, n, crop_samples, u, data.pcm)
            elif encoding == "wav":  # cut the crop now (a slice of the PCM): the pool holds 2·L bytes, not the file
                payload = read_crop(data, "wav", n, crop_samples, u)
            else:
                payload = data
        except (KeyError, ValueError, TypeError) as error:
            faults.corrupt_members += 1
            log.warning("%s: skipping a damaged sample: %r", sample.get("__key__"), error)
            continue
        except OSError as error:  # reading a located crop: the shard was readable a pass ago
            raise SpeakeridError(f"{sample['__url__']}: read error: {error}; check the storage") from error
        yield Utterance(sample["__key__"], label, n, u, payload, pass_number, checked="crc32" in meta)


def apply_quota(utterances: Iterator[Utterance], quota: dict[int, int]) -> Iterator[Utterance]:
    """At most ``quota[label]`` utterances of a speaker per pass (max_seg_per_spk)."""
    used: dict[int, int] = defaultdict(int)
    for utt in utterances:
        if used[utt.label] < quota.get(utt.label, 0):
            used[utt.label] += 1
            yield utt


def group_tuples(utterances: Iterator[Utterance], m: int, quota: dict[int, int] | None = None) -> Iterator[list[Utterance]]:
    """Consecutive utterances of a speaker → M-tuples. Fewer than M left at the pass end are not usable.

    With ``quota`` (the utterances of each speaker this pass can give, apply_quota's): a speaker's leftover is
    let go as soon as its last utterance of the pass has come, not held (crop or flac member) to the pass end."""
    partial: dict[int, list[Utterance]] = defaultdict(list)
    seen: dict[int, int] = defaultdict(int)
    for utt in utterances:
        group = partial[utt.label]
        group.append(utt)
        if len(group) == m:
            yield list(group)
            group.clear()
        if quota is not None:
            seen[utt.label] += 1
            if seen[utt.label] >= quota.get(utt.label, 0):  # no more of this speaker in this pass
                del partial[utt.label]


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

    def put_back(self, t: list[Utterance]) -> None:
        """Return a popped tuple to the front of its speaker's queue."""
        self.tuples.setdefault(t[0].label, deque()).appendleft(t)
        self.size += 1


class Batcher:
    """The last stage: M-tuples → pool → batches of N distinct speakers, crops decoded at emission.

    The pool and the count of drawn batches live across passes: tuples left when a pass ends are drawn first in
    the next. The first ``skip`` batches are drawn without decoding and not yielded (resume skips ahead this way).
    """

    def __init__(self, config: BatchConfig, stream: int, faults: Faults, skip: int = 0,
                 buffers: BatchBuffers | None = None) -> None:
        self.config, self.stream, self.faults, self.skip = config, stream, faults, skip
        self.pool = Pool()
        self.drawn = 0
        shape = (config.n_speakers, config.utts_per_speaker, config.read_samples)
        self.buffers = buffers or BatchBuffers(shape)  # where a batch's crops are filled

    def __call__(self, tuples: Iterator[list[Utterance]], rng: np.random.Generator,
                 pass_number: int) -> Iterator[dict]:
        for t in tuples:
            self.pool.add(t)
            yield from self._drain(rng, pass_number, self.config.pool_factor * self.config.n_speakers)
        yield from self._drain(rng, pass_number, 0)  # the pass is over: draw what it allows, carry the rest

    def _drain(self, rng: np.random.Generator, pass_number: int, min_pool: float) -> Iterator[dict]:
        """Draw batches while the pool holds min_pool tuples of at least N speakers."""
        while self.pool.size >= min_pool and self.pool.speakers >= self.config.n_speakers:
            decode = self.drawn >= self.skip
            batch = self.draw(rng, pass_number, decode=decode)
            if batch is None:
                return
            self.drawn += 1
            if decode:
                yield batch

    def crop(self, utt: Utterance, decode: bool) -> object:
        """The utterance's int16 crop (a flac member is decoded here); None, counted, when it does not decode.

        Skipping (decode=False) still decodes flac crops without a checksum, so a skipped batch drops exactly
        the tuples a decoded one drops; a member whose crc32 the parser verified is taken as sound."""
        if isinstance(utt.payload, np.ndarray) or (utt.checked and not decode):
            return utt.payload
        try:
            return read_crop(utt.payload, "flac", utt.samples, self.config.read_samples, utt.u, verified=utt.checked)
        except (ValueError, RuntimeError) as error:
            if utt.checked:  # skipping would have kept it: dropping it here would make resume inexact
                raise SpeakeridError(f"{utt.key}: member passes its crc32 but does not decode ({error}); "
                                     "find such members with `shardify verify --decode` and re-pack") from error
            self.faults.corrupt_members += 1
            log.warning("%s: skipping an undecodable member: %s", utt.key, error)
            return None

    def draw(self, rng: np.random.Generator, pass_number: int, decode: bool) -> dict | None:
        """One batch from the pool; None (the pool unchanged but for dropped tuples) when too few speakers decode."""
        pool = self.pool
        n = self.config.n_speakers
        chosen: list[list[Utterance]] = []
        audio, ticket = self.buffers.take() if decode else (None, None)
        crops = audio.numpy() if decode else None
        for label in pool.draw_order(rng, pass_number):
            t = pool.pop(label)
            tuple_crops = [self.crop(utt, decode) for utt in t]
            if any(crop is None for crop in tuple_crops):  # a member that does not decode: drop the tuple
                continue
            if decode:
                for j, crop in enumerate(tuple_crops):
                    crops[len(chosen), j] = crop
            chosen.append(t)
            if len(chosen) == n:
                break
        if len(chosen) < n:  # undecodable members left too few speakers: put the good tuples back
            for t in chosen:
                pool.put_back(t)
            self.buffers.give_back(ticket)
            return None
        return {
            "audio": audio,
            "buffer": ticket,  # (worker, slot, token) of a reused batch buffer, freed by the loader; or None
            "labels": torch.tensor([t[0].label for t in chosen], dtype=torch.long),
            "keys": [[u.key for u in t] for t in chosen],
            "tuple_passes": [t[0].pass_number for t in chosen],  # the pass each tuple was read in
            "stream": self.stream,
            "pass": pass_number,
            "faults": self.faults.as_dict(),
        }


def run_stages(stages: list[Stage], source: Iterable) -> Iterator:
    """Feed ``source`` through ``stages`` in order (webdataset's DataPipeline.iterator1, without its extras)."""
    return functools.reduce(lambda items, stage: stage(items), stages, source)
