"""DataLoaders of the readers: whole batches come from the workers, their errors reach the caller as one message.

:func:`forward_errors` (worker side) and :class:`ReaderLoader` (main side) carry a worker's SpeakeridError to
the caller as the message it was raised with (training and evaluation readers); :class:`WorkerSignals` leaves
cluster signals to the main process; :class:`TrainLoader` is the training DataLoader, closable at once, whose
workers fill their batches in reused shared memory (:class:`BatchBuffers`).
"""

from __future__ import annotations

import atexit
import itertools
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


BUFFER_SLOTS = 4  # a worker's reused batches: 2 prefetched (one being filled), the consumer's current and last one
_tokens = itertools.count(1)


class BatchBuffers:
    """A DataLoader worker's int16 batch tensors, in shared memory and reused once the training process let go.

    A fresh shared-memory batch costs about as much to create and fault in as reading its crops (10–17 ms for
    13 MB against 2.5 ms to refill one), and torch copies a private one into shared memory to send it. Slot s of
    a worker is free while ``tokens[s]`` is 0; a batch filled in it carries ``(worker, slot, token)`` as
    ``batch["buffer"]`` and the training process (:meth:`TrainLoader.__iter__`) sets the token back to 0 once
    nothing refers to that batch any more. With no free slot (a consumer that keeps batches), a fresh buffer is
    used: a worker never waits. Without ``tokens`` (no workers), every batch is a fresh private tensor.
    """

    def __init__(self, shape: tuple[int, ...], tokens: torch.Tensor | None = None, worker: int = 0) -> None:
        self.shape, self.tokens, self.worker = shape, tokens, worker
        self.slots: list[torch.Tensor | None] = [None] * (len(tokens) if tokens is not None else 0)

    def take(self) -> tuple[torch.Tensor, tuple[int, int, int] | None]:
        """A batch tensor to fill, and its ticket (None: a fresh tensor, nobody needs to hand it back)."""
        for slot, buffer in enumerate(self.slots):
            if int(self.tokens[slot]) == 0:
                if buffer is None:
                    buffer = self.slots[slot] = torch.empty(self.shape, dtype=torch.int16).share_memory_()
                token = os.getpid() << 32 | next(_tokens)  # unique to this worker process and this use
                self.tokens[slot] = token
                return buffer, (self.worker, slot, token)
        fresh = torch.empty(self.shape, dtype=torch.int16)
        return (fresh.share_memory_() if torch.utils.data.get_worker_info() is not None else fresh), None

    def give_back(self, ticket: tuple[int, int, int] | None) -> None:
        """A batch that was not sent after all: its slot is free again."""
        if ticket is not None:
            self.tokens[ticket[1]] = 0


def _free_when_dropped(batches: Iterator[dict], tokens: torch.Tensor) -> Iterator[dict]:
    """Main side of BatchBuffers: a batch's slot is freed once its storage is gone (the consumer dropped the batch
    and every view of it), or as soon as it arrives when the pin-memory thread has copied it already."""
    from torch.multiprocessing.reductions import StorageWeakRef  # noqa: PLC0415 (torch's own test for this)

    held: list[tuple[StorageWeakRef, tuple[int, int, int]]] = []
    for batch in batches:
        if "error" in batch:
            raise SpeakeridError(batch["error"])
        ticket = batch.get("buffer")
        if ticket is not None:
            if batch["audio"].is_pinned():
                _free(tokens, ticket)
            else:
                held.append((StorageWeakRef(batch["audio"].untyped_storage()), ticket))
        yield batch
        del batch  # this frame's reference would keep the batch alive until the next one arrives
        still = []
        for ref, ticket in held:
            if ref.expired():
                _free(tokens, ticket)
            else:
                still.append((ref, ticket))
        held = still


def _free(tokens: torch.Tensor, ticket: tuple[int, int, int]) -> None:
    worker, slot, token = ticket
    if int(tokens[worker, slot]) == token:  # (a worker writes a slot only while it is 0: no race)
        tokens[worker, slot] = 0


class TrainLoader(ReaderLoader):
    """The DataLoader of the training batches; ``close()`` stops its workers, even one stuck on a dead server."""

    def __init__(self, dataset: torch.utils.data.IterableDataset, *, workers: int, pin_memory: bool) -> None:
        self.worker_signals = WorkerSignals()
        super().__init__(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                         persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None,
                         worker_init_fn=self.worker_signals if workers > 0 else None)
        atexit.register(self.worker_signals.close)  # runs before multiprocessing's own exit handler terminates them
        # each worker's batch-buffer tokens (BatchBuffers), shared before the workers fork
        self.buffer_tokens = torch.zeros(workers, BUFFER_SLOTS, dtype=torch.int64).share_memory_() if workers else None
        dataset.buffer_tokens = self.buffer_tokens

    def __iter__(self) -> Iterator[dict]:
        if self.buffer_tokens is None:
            return super().__iter__()
        self.iterator = torch.utils.data.DataLoader.__iter__(self)
        return _free_when_dropped(self.iterator, self.buffer_tokens)

    def close(self) -> None:
        self.worker_signals.close()
        shutdown = getattr(self.iterator, "_shutdown_workers", None)  # torch has no public close for an iterator
        if shutdown is not None:
            shutdown()
