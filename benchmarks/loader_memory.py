"""The loader benchmark's memory figures: each DataLoader worker's resident set, measured (the kernel's high-water
mark VmHWM in /proc/PID/status, and the same for a worker of an empty DataLoader: what any worker costs before it
reads anything), and speakerid's per-worker bytes from a formula over the reader stages' data structures (pool and
partial-tuple peaks replayed without decoding).
"""

from __future__ import annotations

import gc
import math
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

import checkout  # noqa: F401 (this checkout's speakerid first on sys.path)
from speakerid.data.batch_config import BatchConfig
from speakerid.data.shardset import ShardSet

MB = 1e6


# ------------------------------------------------------------------------------------------ measured


def children() -> list[int]:
    """PIDs of this process's children (the DataLoader workers while a loader is live)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                found.append(int(entry))
    return found


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssShmem of a process, in bytes."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def wait_children_gone(timeout: float = 30.0) -> None:
    end = time.time() + timeout
    while children() and time.time() < end:
        time.sleep(0.05)


class _Idle(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> int:
        return i


def idle_worker_rss(workers: int) -> float:
    """VmHWM of a worker of an empty DataLoader forked from this process now: every worker's floor."""
    gc.collect()
    loader = torch.utils.data.DataLoader(_Idle(), batch_size=1, num_workers=workers)
    it = iter(loader)
    next(it)
    hwm = max(proc_status(pid).get("VmHWM", 0) for pid in children())
    del it, loader
    gc.collect()
    wait_children_gone()
    return hwm

# ------------------------------------------------------------------------------------------ the formula


def mean_member_bytes(shards: list[Path], ext: str) -> float:
    """Mean size of the audio members (headers only are read)."""
    sizes = []
    for shard in shards:
        with tarfile.open(shard, "r:") as tar:
            sizes.extend(m.size for m in tar.getmembers() if m.name.endswith("." + ext))
    return float(np.mean(sizes))


def replay_peaks(shards: ShardSet, config: BatchConfig, workers: int, n_batches: int) -> dict:
    """Largest pool (tuples) and partial-tuple count (utterances) of the row's worker streams over the epoch.

    Each worker's stream is replayed in this process without decoding (``batches(skip=…)`` makes the same
    draws), with Pool.add and group_tuples wrapped to record their sizes; restored afterwards.
    """
    from speakerid.data import batches as module  # group_tuples is wrapped where TrainStream.stages looks it up
    from speakerid.data.stages import Pool

    peaks = {"pool": 0, "partials": 0}
    stock_add, stock_group = Pool.add, module.group_tuples

    def add(self, t) -> None:
        stock_add(self, t)
        peaks["pool"] = max(peaks["pool"], self.size)

    def group(utterances, m, quota=None):
        state = {"in": 0, "out": 0, "released": 0}
        seen = {}

        def counted():
            for utt in utterances:
                state["in"] += 1
                peaks["partials"] = max(peaks["partials"], state["in"] - m * state["out"] - state["released"])
                yield utt
                seen[utt.label] = seen.get(utt.label, 0) + 1
                if quota is not None and seen[utt.label] == quota.get(utt.label, 0):  # its leftover let go
                    state["released"] += quota[utt.label] % m

        for t in stock_group(counted(), m, quota):
            state["out"] += 1
            yield t

    Pool.add, module.group_tuples = add, group
    try:
        streams = max(1, workers)
        for stream in range(streams):
            next(module.TrainStream(shards, config, stream, streams).batches(skip=math.ceil(n_batches / streams) + 1))
    finally:
        Pool.add, module.group_tuples = stock_add, stock_group
    return peaks


# batches a worker keeps in shared memory: since issue 15 it reuses up to BUFFER_SLOTS = 4 (speakerid.data.loader),
# about 3 touched at a time (the one being filled, the one queued, the one the consumer holds); the 2026-12-02 run
# measured 298 MB against 298 with 3 (wav)
BATCH_BUFFERS = 3


def memory_model(config: BatchConfig, encoding: str, member_bytes: float, idle_mb: float, peaks: dict) -> dict:
    """speakerid's resident bytes per worker, from the reader stages' data structures.

      idle      a worker before it reads anything (interpreter, torch, numpy; measured)
      pool      P tuples × M utterances: P ≥ ⌈pool_factor·N⌉, and more while the pool holds < N distinct speakers
      partials  Q utterances waiting in group_tuples for the rest of their M-tuple
      payload   p = 2·L bytes (wav: the int16 crop is cut when parsed) | b̄ (flac: the whole member until emission)
      batches   3 × N·M·2L (see BATCH_BUFFERS)
    """
    n, m, length = config.n_speakers, config.utts_per_speaker, config.crop_samples
    payload = 2 * length if encoding == "wav" else member_bytes
    pool = peaks["pool"] * m * payload
    design_pool = math.ceil(config.pool_factor * n) * m * payload
    partials = peaks["partials"] * payload
    batches = BATCH_BUFFERS * n * m * 2 * length
    total = idle_mb * MB + pool + partials + batches
    return {"payload_bytes": payload, "pool_tuples": peaks["pool"], "partial_utts": peaks["partials"],
            "pool_mb": pool / MB, "design_pool_mb": design_pool / MB, "partials_mb": partials / MB,
            "batches_mb": batches / MB, "idle_mb": idle_mb, "estimate_mb": total / MB,
            "design_estimate_mb": (total - pool + design_pool) / MB}
