"""Running shard jobs: one after another, or in forked worker processes that report progress through a queue.

Workers leave SIGINT/SIGTERM to a stop flag (the writer stops at the next utterance) and die with their
parent, so a ``kill -9`` of shardify leaves no orphan writing into the directory.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from multiprocessing import get_context
from typing import TYPE_CHECKING

from speakerid.data.writer import (ShardJob, ShardResult, WrittenShard, finish_shard, request_stop, start_shard,
                                   stop_requested)

if TYPE_CHECKING:
    from speakerid.data.pack import PackListener


def run_jobs(jobs: list[ShardJob], workers: int, listener: PackListener) -> list[ShardResult]:
    """Write each job's shard, telling ``listener`` the progress; stops early once a stop is requested."""
    results: list[ShardResult] = []
    if workers <= 1 or len(jobs) <= 1:
        return _run_in_turn(jobs, listener)
    context = get_context("fork")  # workers import nothing heavy (no torch), fork starts them instantly
    queue = context.Queue()
    # A forked worker shares the parent's plan (a million records at VoxCeleb2 scale) until its garbage collector
    # writes to their headers, copying every page: frozen objects are never collected, so a worker's own memory
    # is its shard's, flat in corpus size.
    gc.freeze()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(queue, os.getpid())) as pool, \
            ThreadPoolExecutor(workers, thread_name_prefix="shardify-finish") as finisher:
        # a worker writes a shard's tar and hands it back unsynced; the fsync and rename happen here, in a thread,
        # while the worker writes its next shard
        writing = {pool.submit(_write_in_worker, job) for job in jobs}
        finishing: set = set()
        try:
            while writing or finishing:
                if stop_requested.is_set():
                    raise KeyboardInterrupt
                done, _ = wait(writing | finishing, timeout=0.1, return_when=FIRST_COMPLETED)
                _drain(queue, listener)
                for future in done:
                    if future in writing:
                        writing.discard(future)
                        finishing.add(finisher.submit(finish_shard, future.result()))
                    else:
                        finishing.discard(future)
                        results.append(future.result())
                        listener.shard_done(results[-1])
            _drain(queue, listener)
        except BaseException:
            for future in writing:
                future.cancel()
            pool.shutdown(wait=True)  # a running writer stops at its next utterance and removes its temporary
            for future in writing:  # written, never finished: a stop leaves no temporary behind
                if future.done() and not future.cancelled() and future.exception() is None:
                    written = future.result()
                    if written.tmp is not None:
                        written.tmp.unlink(missing_ok=True)
            raise
        finally:
            gc.unfreeze()
    return results


def _run_in_turn(jobs: list[ShardJob], listener: PackListener) -> list[ShardResult]:
    """The jobs one after another in this process, each shard's fsync and rename in a thread while the next shard
    is written (the disk and the CPU work at once; at most one shard waits for the disk). A stop or an error
    still finishes the shard already written, and stops there."""
    results: list[ShardResult] = []
    with ThreadPoolExecutor(1, thread_name_prefix="shardify-finish") as finisher:
        finishing = None
        for job in jobs:
            if stop_requested.is_set():
                break
            written = start_shard(job, listener.advance)
            if finishing is not None:
                results.append(finishing.result())
                listener.shard_done(results[-1])
            finishing = finisher.submit(finish_shard, written)
        if finishing is not None:
            results.append(finishing.result())
            listener.shard_done(results[-1])
    return results


def _drain(queue, listener: PackListener) -> None:
    while not queue.empty():
        try:
            n, b = queue.get_nowait()
        except Exception:  # queue.Empty: raced with another reader; nothing more now
            return
        listener.advance(n, b)


# Worker-process side of the pool: progress goes back to the parent through a queue.
_queue = None


def _init_worker(queue, parent: int) -> None:
    global _queue
    _queue = queue
    _die_with_parent(parent)
    stop_requested.clear()
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)


def _die_with_parent(parent: int) -> None:
    """A worker blocked on the pool's task pipe never notices its parent die (kill -9): make it die too."""
    try:  # Linux: the kernel sends SIGKILL when the parent exits; its temporary is removed by the next run
        if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) != 0:  # 1 = PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):  # not Linux: watch for being re-parented instead
        threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _write_in_worker(job: ShardJob) -> WrittenShard:
    return start_shard(job, lambda n, b: _queue.put((n, b)))
