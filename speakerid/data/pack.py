"""The pack job: write a plan's shards into a directory (this part's share, resuming), then its index.

The flow: :mod:`~speakerid.data.plan` decides which utterance goes into which shard; :mod:`~speakerid.data.resume`
claims the directory for that plan (or checks it is the same) and locks this part; :mod:`~speakerid.data.pool`
runs one :mod:`~speakerid.data.writer` job a shard, in worker processes; :func:`~speakerid.data.index.write_index`
writes ``index.json`` when every shard is finished (at once, or by ``shardify merge`` after ``--parts``). An
interrupted run leaves no ``index.json``, so ``verify`` refuses the directory until packing finishes; a
re-run of the same command skips the finished shards and writes the rest.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from speakerid.data.index import LAYOUT, STATE_DIR, finished_shards, write_index
from speakerid.data.lists import listed
from speakerid.data.plan import PackPlan
from speakerid.data.pool import run_jobs
from speakerid.data.resume import claim_directory, part_lock
from speakerid.data.writer import ShardJob, ShardResult, stop_on_signals, stop_requested
from speakerid.errors import SpeakeridError
from speakerid.tempfiles import remove_dead_temporaries

log = logging.getLogger(__name__)


@dataclass
class PackReport:
    plan: PackPlan
    out_dir: Path
    part: int
    parts: int
    written: list[str]
    resumed: list[str]
    skipped: list[dict]  # everything left out with --skip-bad: missing at planning + undecodable
    utterances: int
    input_bytes: int
    output_bytes: int
    duration: float
    seconds: float
    index_path: Path | None


class PackListener:
    """What a front end hears while packing (the CLI draws a rich progress bar from it)."""

    def started(self, plan: PackPlan, todo_utterances: int, resumed_shards: int) -> None: ...

    def advance(self, utterances: int, input_bytes: int) -> None: ...

    def shard_done(self, result: ShardResult) -> None: ...

    def note(self, text: str) -> None:
        log.warning("%s", text)


def pack(plan: PackPlan, root: str | Path, out_dir: str | Path, *, workers: int = 1, part: int = 0,
         parts: int = 1, skip_bad: bool = False, listener: PackListener | None = None) -> PackReport:
    """Write this part's shards of ``plan`` into ``out_dir`` (resuming), then the index when whole."""
    if parts < 1 or not 0 <= part < parts:
        raise SpeakeridError(f"--part {part} --parts {parts}: need 0 <= part < parts")
    listener = listener or PackListener()
    root, out_dir = Path(root), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SpeakeridError(f"--out {out_dir} is a file; --out names the directory the shards go to")
    try:
        return _pack_part(plan, root, out_dir, part, parts, workers, skip_bad, listener)
    except OSError as error:  # a full disk, a quota, a read-only or vanished directory: not a bug to trace
        raise write_error(out_dir, error) from error


def write_error(out_dir: Path, error: OSError) -> SpeakeridError:
    where = f"{error.filename}: " if error.filename else ""
    fix = ("free space (or raise the quota)" if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
           else "fix the directory's permissions or mount")
    return SpeakeridError(
        f"{out_dir}: cannot write the shards: {where}{error.strerror or error}. {fix.capitalize()} and re-run the "
        "same command: finished shards are kept, the unfinished one is a hidden temporary, never a .tar"
    )


def _pack_part(plan: PackPlan, root: Path, out_dir: Path, part: int, parts: int, workers: int, skip_bad: bool,
               listener: PackListener) -> PackReport:
    plan = claim_directory(out_dir, plan, listener)
    with part_lock(out_dir, part, parts, listener):
        return _write_part(plan, root, out_dir, part, parts, workers, skip_bad, listener)


def _write_part(plan: PackPlan, root: Path, out_dir: Path, part: int, parts: int, workers: int, skip_bad: bool,
                listener: PackListener) -> PackReport:
    mine = [i for i in range(len(plan.names)) if i % parts == part]
    # temporaries of an interrupted run of this part (shards, their stats); other parts' live files are left alone
    remove_dead_temporaries(out_dir, [plan.names[i] for i in mine], locked=True)
    shared = ["plan.json", LAYOUT] if parts == 1 else []  # with parts, another part may be writing them now
    remove_dead_temporaries(out_dir / STATE_DIR, [f"{plan.names[i]}.json" for i in mine] + shared, locked=True)
    finished = finished_shards(out_dir, [plan.names[i] for i in mine])  # one listing, not lookups per shard
    resumed = [plan.names[i] for i in mine if plan.names[i] in finished]
    jobs = [ShardJob(out_dir, root, plan.names[i], plan.shards[i], plan.config, skip_bad)
            for i in mine if plan.names[i] not in resumed]
    listener.started(plan, sum(len(j.items) for j in jobs), len(resumed))

    start = time.perf_counter()
    with stop_on_signals():
        results = run_jobs(jobs, workers, listener)
        if stop_requested.is_set():
            raise KeyboardInterrupt
    seconds = time.perf_counter() - start

    bad = [b for r in results for b in r.bad]
    if bad and not skip_bad:
        shown = listed([f"{root / b['src']}: {b['reason']}" for b in bad])
        kept = sum(r.written for r in results) + len(resumed)
        raise SpeakeridError(
            f"{len(bad)} audio file(s) cannot be decoded or used:\n{shown}\n"
            "Fix or remove them from the list, or re-run with --skip-bad to leave them out (they are then "
            f"counted in the summary and the index). The {kept} finished shard(s) are kept: the re-run resumes."
        )
    index_path = write_index(out_dir) if parts == 1 else None
    stats = [r.stats for r in results if r.stats]
    return PackReport(
        plan, out_dir, part, parts, [r.name for r in results if r.written], resumed,
        plan.skipped + bad, sum(s["samples"] for s in stats), sum(r.input_bytes for r in results),
        sum(s["bytes"] for s in stats), sum(s["duration"] for s in stats), seconds, index_path,
    )
