"""Reading training batches as training reads them, to measure what the storage delivers: speed, coverage, faults.

``python -m shardify read`` prints the :class:`ReadReport` that :func:`read_epochs` returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from speakerid.data.batch_config import BatchConfig
from speakerid.data.batches import train_loader, usable_utterances
from speakerid.data.meter import EpochMeter
from speakerid.data.shardset import ShardSet


@dataclass(frozen=True)
class ReadReport:
    batches_per_epoch: int  # on every rank
    batches: int  # read now
    seconds: float  # from the loader's first fetch, worker start-up included
    crops: int
    coverage: float  # share of this rank's usable utterances seen
    corrupt_members: int
    damaged_shards: int

    @property
    def crops_per_second(self) -> float:
        return self.crops / self.seconds


def read_epochs(shards: ShardSet, config: BatchConfig, *, rank: int = 0, world_size: int = 1, workers: int = 0,
                epochs: float = 1.0, progress: Callable[[int, int], None] | None = None) -> ReadReport:
    """Read ``epochs`` epochs (at least one batch) of rank ``rank``'s batches; ``progress(done, total)`` after each."""
    loader = train_loader(shards, config, rank=rank, world_size=world_size, workers=workers)
    per_epoch = loader.dataset.batches_per_epoch
    total = max(1, int(per_epoch * epochs))
    meter = EpochMeter(usable_utterances(shards.index, config, world_size * max(1, workers)) // world_size)
    start = time.perf_counter()
    for done, batch in enumerate(loader, start=1):
        meter.update(batch)
        if progress is not None:
            progress(done, total)
        if done == total:
            break
    seconds = time.perf_counter() - start
    seen = meter.report()
    return ReadReport(per_epoch, total, seconds, seen["crops"], seen["coverage"], seen["corrupt_members"],
                      seen["damaged_shards"])
