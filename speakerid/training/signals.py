"""Stopping cleanly: SIGTERM/SIGUSR1/SIGINT set a flag that the loop reads at each step; batches are fetched in a
thread so a stop also ends a wait for data (``next_batch``); the launcher's store tells whether the stop reached
every rank."""

from __future__ import annotations

import functools
import math
import queue
import signal
import threading
import time
from pathlib import Path

from accelerate import Accelerator

from speakerid.errors import SpeakeridError
from speakerid.training.checkpoints import latest_checkpoint
from speakerid.training.state import Progress


class StopFlag:
    """SIGTERM/SIGUSR1/SIGINT (Slurm pre-emption and `scancel`, Kubernetes, Ctrl-C) ask for a checkpoint and exit 0:
    at the next step, or at once while the loop waits for data."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.event = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                signal.signal(sig, lambda signum, frame: self.event.set())

    def __bool__(self) -> bool:
        return self.event.is_set()

    def agreed(self, accelerator: Accelerator) -> bool:
        """Every rank stops at the same step, whichever rank saw the signal (a collective: all ranks ask each step)."""
        if accelerator.num_processes > 1:
            if self:
                accelerator.set_trigger()
            if accelerator.check_trigger():
                self.event.set()
        return bool(self)


def restoring_signal_handlers(function):
    """A caller of train() (a notebook, a test, the demo) gets its own SIGTERM/SIGUSR1/SIGINT handlers back when
    it returns or raises: StopFlag's would otherwise swallow a later Ctrl-C."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return function(*args, **kwargs)
        previous = {sig: signal.getsignal(sig) for sig in StopFlag.SIGNALS}
        try:
            return function(*args, **kwargs)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    return wrapper


class BatchFetcher:
    """``next(batches)`` in a daemon thread while the main thread waits with a timeout: a stop request ends a wait
    for data that never comes (a stalled shard server), and nothing joins the stuck thread at exit."""

    def __init__(self, batches) -> None:
        self.requests, self.results = queue.SimpleQueue(), queue.SimpleQueue()
        self.pending = False
        threading.Thread(target=self._serve, args=(batches,), daemon=True, name="speakerid-batches").start()

    def _serve(self, batches) -> None:
        while self.requests.get():
            try:
                self.results.put((next(batches), None))
            except BaseException as error:  # raised again in the main thread
                self.results.put((None, error))

    def next(self, stop: StopFlag | None = None, timeout: float | None = None) -> dict | None:
        """The next batch; None once ``stop`` is set while waiting, or after ``timeout`` seconds (the request stays
        pending for the next call)."""
        if not self.pending:
            self.requests.put(True)
            self.pending = True
        deadline = time.monotonic() + timeout if timeout is not None else math.inf
        while True:
            try:
                batch, error = self.results.get(timeout=0.2)
                break
            except queue.Empty:
                if stop or time.monotonic() > deadline:
                    return None
        self.pending = False
        if error is not None:
            raise error
        return batch


STOP_GRACE_S = 30.0  # after a stop, how long a rank still waits for the batch that another rank's step needs


def every_rank_stopped_waiting(accelerator: Accelerator, progress: Progress, timeout: float = 10.0) -> bool:
    """Did the stop reach every rank while it waited for data? Asked through the launcher's store, not a collective:
    a rank already in this step's gradient all-reduce would meet a checkpoint's collectives and hang or mix them up.
    The first rank to decide decides for all, so a late rank never checkpoints alone."""
    if accelerator.num_processes == 1:
        return True
    from torch.distributed.distributed_c10d import _get_default_store  # no public accessor for the rendezvous store

    store, key = _get_default_store(), f"speakerid/stopped-waiting/{progress.batch}"
    store.add(f"{key}/count", 1)
    deadline = time.monotonic() + timeout
    while not (everyone := store.add(f"{key}/count", 0) >= accelerator.num_processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    return store.compare_set(f"{key}/decision", "", "stop" if everyone else "wait") == b"stop"


def next_batch(batches: BatchFetcher, stop: StopFlag, accelerator: Accelerator, progress: Progress,
               run_dir: Path) -> dict | None:
    """The next batch; None when a stop came while waiting for it on every rank (the loop checkpoints and exits).

    A rank stopped while another is already inside this step waits STOP_GRACE_S more for its batch, so that all
    stop at the step's end; if the batch still has not come it raises, as no rank can checkpoint this moment."""
    batch = batches.next(stop)
    if batch is None and every_rank_stopped_waiting(accelerator, progress):
        return None
    if batch is None:  # another rank is inside this step already: wait on, all stop at its end
        batch = batches.next(timeout=STOP_GRACE_S)
    if batch is None:  # that rank cannot leave the step's collectives to checkpoint, nor can this one join
        raise SpeakeridError(
            f"rank {accelerator.process_index}: stopped while waiting for data that has not come {STOP_GRACE_S:.0f} s "
            f"later, while another rank is already inside step {progress.step + 1}: no checkpoint of this moment; the "
            f"run resumes from {latest_checkpoint(run_dir) or 'the start'} (the reader's warnings name the shard)")
    return batch
