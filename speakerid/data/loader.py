"""DataLoaders of the readers: whole batches come from the workers, their errors reach the caller as one message.

:func:`forward_errors` (worker side) and :class:`ReaderLoader` (main side) carry a worker's SpeakeridError to
the caller as the message it was raised with (training and evaluation readers); :class:`WorkerSignals` leaves
cluster signals to the main process; :class:`TrainLoader` is the training DataLoader, closable at once.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
from typing import Iterator

import torch

from speakerid.errors import SpeakeridError


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

    def __init__(self, dataset: torch.utils.data.IterableDataset, *, workers: int, pin_memory: bool) -> None:
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
