"""Writing a planned shard set: atomic shards, resume, worker processes, SLURM parts and their merge.

Each shard is written to a hidden temporary name, hashed while it is written, fsynced, its stats stored
in ``.shardify/<name>.json``, and only then renamed to ``<name>.tar``: a ``.tar`` that exists is complete.
A re-run of the same command skips those and writes the rest; an interrupted run leaves no ``index.json``,
so ``verify`` refuses the directory until packing finishes. Shards are bit-reproducible (fixed member
times and owners), so a resumed run, a run with other ``--workers`` and a ``--part``/``merge`` run all
produce the same shards and the same index.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gzip
import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
import zlib
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import webdataset as wds

from speakerid import __version__
from speakerid.audio import AudioError, encode, read_audio
from speakerid.data.index import (FORMAT, INDEX_NAME, STATE_DIR, VERSION, read_json,
                                  write_json_atomic)
from speakerid.data.lists import MAX_LISTED, utterance_key
from speakerid.data.plan import Item, PackConfig, PackPlan, plan_digest
from speakerid.errors import SpeakeridError
from speakerid.tempfiles import remove_dead_temporaries

log = logging.getLogger(__name__)

LAYOUT = "layout.json.gz"  # in STATE_DIR: the plan's utterances per shard, to resume a list that lost some

Progress = Callable[[int, int], None]  # (utterances, input bytes) just finished

# SIGINT/SIGTERM set this flag and the writers stop at the next utterance. A KeyboardInterrupt raised by
# the default handler can land inside soundfile's cffi callbacks, where cffi swallows it and packing goes on.
_stop = threading.Event()


def _request_stop(signum, frame) -> None:
    _stop.set()


@contextmanager
def _stop_on_signals():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _stop.clear()
    previous = {sig: signal.signal(sig, _request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _HashingWriter:
    """File wrapper that hashes and counts every byte the tar writer emits."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


@dataclass
class ShardJob:
    out_dir: Path
    root: Path
    name: str
    items: list[Item]
    config: PackConfig
    skip_bad: bool


@dataclass
class ShardResult:
    name: str
    written: bool
    stats: dict | None
    bad: list[dict] = field(default_factory=list)  # {"src", "reason"} of inputs that could not be decoded
    input_bytes: int = 0


def _metadata(item: Item, samples: int, config: PackConfig) -> dict:
    meta = {"samples": samples, "sr": config.sample_rate, "src": item.src}
    if config.kind == "noise":
        meta["category"] = item.spk
    else:
        meta["spk"] = item.spk
    if config.kind == "train":
        meta.update(label=item.label, chunk=item.chunk)
    return meta


def write_shard(job: ShardJob, progress: Progress | None = None) -> ShardResult:
    """Decode, encode and tar one shard's utterances; rename into place only when complete."""
    config = job.config
    final = job.out_dir / job.name
    tmp = job.out_dir / f".{job.name}.tmp-{os.getpid()}"
    bad: list[dict] = []
    n_samples = duration = input_bytes = 0
    speakers, chunks = set(), set()
    per_label: dict[int, int] = {}
    keys: list[str] = []
    try:
        with open(tmp, "wb") as f:
            out = _HashingWriter(f)
            with wds.TarWriter(out, user="speakerid", group="speakerid", mode=0o444, mtime=0) as tar:
                for item in job.items:
                    if _stop.is_set():
                        raise KeyboardInterrupt
                    path = job.root / item.src
                    try:
                        audio = read_audio(path, config.sample_rate, resample=config.resample, downmix=config.downmix,
                                           min_seconds=config.shortest)
                    except AudioError as error:
                        bad.append({"src": item.src, "reason": str(error).removeprefix(f"{path}: ")})
                        continue
                    finally:
                        size = path.stat().st_size if path.exists() else 0
                        input_bytes += size
                        if progress:
                            progress(1, size)
                    if bad and not job.skip_bad:
                        continue  # this shard will not be kept: only look for more bad files
                    encoded = encode(audio, config.sample_rate, config.encoding)
                    meta = {**_metadata(item, len(audio), config), "crc32": zlib.crc32(encoded)}  # readers check it
                    tar.write({"__key__": item.key, config.encoding: encoded,
                               "json": json.dumps(meta, sort_keys=True).encode()})
                    n_samples += 1
                    duration += len(audio)
                    speakers.add(item.spk)
                    chunks.add(item.chunk)
                    per_label[item.label] = per_label.get(item.label, 0) + 1
                    keys.append(item.key)
            f.flush()
            os.fsync(f.fileno())
        if bad and not job.skip_bad:
            tmp.unlink()
            return ShardResult(job.name, False, None, bad, input_bytes)
        stats = {
            "name": job.name, "bytes": out.bytes, "sha256": out.sha256.hexdigest(), "samples": n_samples,
            "chunks": len(chunks) if config.kind == "train" else n_samples, "speakers": len(speakers),
            "duration": round(duration / config.sample_rate, 3), "skipped": bad,
        }
        if config.kind == "train":  # lets a reader size an epoch (tuples per speaker) from the index alone
            stats["labels"] = {str(label): n for label, n in sorted(per_label.items())}
        else:
            stats["keys"] = keys
        write_json_atomic(job.out_dir / STATE_DIR / f"{job.name}.json", stats)
        os.replace(tmp, final)
        return ShardResult(job.name, True, stats, bad, input_bytes)
    finally:
        tmp.unlink(missing_ok=True)


# Worker-process side of the pool: progress goes back to the parent through a queue.
_queue = None


def _init_worker(queue, parent: int) -> None:
    global _queue
    _queue = queue
    _die_with_parent(parent)
    _stop.clear()
    signal.signal(signal.SIGINT, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)


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


def _write_in_worker(job: ShardJob) -> ShardResult:
    return write_shard(job, lambda n, b: _queue.put((n, b)))


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
    plan = _claim_directory(out_dir, plan, listener)
    with _part_lock(out_dir, part, parts, listener):
        return _write_part(plan, root, out_dir, part, parts, workers, skip_bad, listener)


@contextmanager
def _part_lock(out_dir: Path, part: int, parts: int, listener: PackListener):
    """One writer per part of a directory (a double-submitted array task would delete the other's temporaries).

    flock is released by the kernel when its holder dies, so a killed run never blocks the next one."""
    path = out_dir / STATE_DIR / (f"lock-part-{part}-of-{parts}" if parts > 1 else "lock")
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise SpeakeridError(
                f"{out_dir}{f' (part {part} of {parts})' if parts > 1 else ''} is being packed by {holder} (lock: "
                f"{path}). Let that run finish (or stop it), then re-run this command to resume; two runs into "
                "one directory would destroy each other's shards") from None
        except OSError as error:  # a filesystem without locks (some NFS/Lustre mounts)
            listener.note(f"{path}: cannot lock ({error.strerror}); make sure no other run packs this part")
        f.seek(0)
        if previous := f.read().strip():
            listener.note(f"taking over the lock of {previous}: that run ended without releasing it (killed?)")
        f.seek(0)
        f.truncate()
        f.write(f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)  # emptied, not deleted: a run opening it meanwhile would lock a different file


def _write_part(plan: PackPlan, root: Path, out_dir: Path, part: int, parts: int, workers: int, skip_bad: bool,
                listener: PackListener) -> PackReport:
    mine = [i for i in range(len(plan.names)) if i % parts == part]
    # temporaries of an interrupted run of this part (shards, their stats); other parts' live files are left alone
    remove_dead_temporaries(out_dir, [plan.names[i] for i in mine], locked=True)
    shared = ["plan.json", LAYOUT] if parts == 1 else []  # with parts, another part may be writing them now
    remove_dead_temporaries(out_dir / STATE_DIR, [f"{plan.names[i]}.json" for i in mine] + shared, locked=True)
    resumed = [plan.names[i] for i in mine if _is_finished(out_dir, plan.names[i])]
    jobs = [ShardJob(out_dir, root, plan.names[i], plan.shards[i], plan.config, skip_bad)
            for i in mine if plan.names[i] not in resumed]
    listener.started(plan, sum(len(j.items) for j in jobs), len(resumed))

    start = time.perf_counter()
    with _stop_on_signals():
        results = _run_jobs(jobs, workers, listener)
        if _stop.is_set():
            raise KeyboardInterrupt
    seconds = time.perf_counter() - start

    bad = [b for r in results for b in r.bad]
    if bad and not skip_bad:
        shown = "\n".join(f"  {root / b['src']}: {b['reason']}" for b in bad[:MAX_LISTED])
        more = f"\n  … and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        kept = sum(r.written for r in results) + len(resumed)
        raise SpeakeridError(
            f"{len(bad)} audio file(s) cannot be decoded or used:\n{shown}{more}\n"
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


def _run_jobs(jobs: list[ShardJob], workers: int, listener: PackListener) -> list[ShardResult]:
    results: list[ShardResult] = []
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            if _stop.is_set():
                break
            results.append(write_shard(job, listener.advance))
            listener.shard_done(results[-1])
        return results
    context = get_context("fork")  # workers import nothing heavy (no torch), fork starts them instantly
    queue = context.Queue()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(queue, os.getpid())) as pool:
        futures = [pool.submit(_write_in_worker, job) for job in jobs]
        try:
            pending = set(futures)
            while pending:
                if _stop.is_set():
                    raise KeyboardInterrupt
                done, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                _drain(queue, listener)
                for future in done:
                    results.append(future.result())
                    listener.shard_done(results[-1])
            _drain(queue, listener)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return results


def _drain(queue, listener: PackListener) -> None:
    while not queue.empty():
        try:
            n, b = queue.get_nowait()
        except Exception:  # queue.Empty: raced with another reader; nothing more now
            return
        listener.advance(n, b)


def _is_finished(out_dir: Path, name: str) -> bool:
    stats_path = out_dir / STATE_DIR / f"{name}.json"
    tar = out_dir / name
    if not (tar.exists() and stats_path.exists()):
        return False
    try:
        return json.loads(stats_path.read_text())["bytes"] == tar.stat().st_size
    except (OSError, ValueError, KeyError):
        return False


def _plan_record(plan: PackPlan) -> dict:
    return {
        "format": FORMAT, "version": VERSION, "config": plan.config.record(), "digest": plan.digest,
        "names": plan.names, "speakers": plan.speakers, "skipped": plan.skipped,
    }


def _claim_directory(out_dir: Path, plan: PackPlan, listener: PackListener) -> PackPlan:
    """Create ``out_dir`` for this plan, or check that what it holds was packed with the same plan.

    Returns the plan to write: ``plan``, or the directory's own plan without the utterances the list lost."""
    state = out_dir / STATE_DIR
    plan_path = state / "plan.json"
    if plan_path.exists():
        existing = read_json(plan_path, f"delete {out_dir} and re-pack")
        if existing.get("digest") == plan.digest:
            return plan
        ours = plan.config.record()
        theirs = existing.get("config", {})
        diffs = [f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} now" for k in sorted(ours.keys() | theirs.keys())
                 if theirs.get(k) != ours.get(k)]
        what = "; ".join(diffs) if diffs else _without_lost_utterances(out_dir, plan, existing)
        if isinstance(what, PackPlan):
            return _record_lost(out_dir, what, existing, listener)
        raise SpeakeridError(
            f"{out_dir} holds shards of a different configuration ({what}). "
            "Use a new --out directory, or delete this one to re-pack."
        )
    if out_dir.exists() and any(out_dir.glob("*.tar")):
        raise SpeakeridError(
            f"{out_dir} already holds .tar files that shardify did not plan there; use a new --out directory"
        )
    state.mkdir(parents=True, exist_ok=True)
    _write_layout(state / LAYOUT, plan)  # before plan.json: a plan.json on disk always has its layout
    write_json_atomic(plan_path, _plan_record(plan))
    return plan


def _write_layout(path: Path, plan: PackPlan) -> None:
    """Which utterance is in which shard (gzip: VoxCeleb2's is tens of MB of JSON), atomically."""
    layout = [[[i.src, i.spk, i.chunk] for i in items] for items in plan.shards]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(json.dumps(layout, separators=(",", ":")).encode())
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)


def _without_lost_utterances(out_dir: Path, plan: PackPlan, existing: dict) -> PackPlan | str:
    """The directory's plan less the utterances the list lost (after `remove the bad line and re-run`), or
    why the list cannot resume it. Only unfinished shards may lose utterances; labels must not move."""
    try:
        layout = json.loads(gzip.decompress((out_dir / STATE_DIR / LAYOUT).read_bytes()))
    except (OSError, ValueError):  # packed by an older shardify, or damaged
        return "the list or the input files changed since it was started, or an older shardify started it"
    listed = {(i.src, i.spk) for items in plan.shards for i in items}
    planned = {(src, spk) for shard in layout for src, spk, _ in shard}
    added = sorted(listed - planned)
    if added:
        return f"{len(added)} utterance(s) are new to it, e.g. {added[0][0]}"
    if existing.get("speakers") != plan.speakers:
        return "a speaker lost all its utterances, which would renumber the labels of the finished shards"
    lost = [(name, src) for name, shard in zip(existing["names"], layout) for src, spk, _ in shard
            if (src, spk) not in listed and _is_finished(out_dir, name)]
    if lost:
        shown = ", ".join(f"{src} (in {name})" for name, src in lost[:MAX_LISTED])
        names = sorted({name for name, _ in lost})
        to_delete = ", ".join(names[:MAX_LISTED]) + (" …" if len(names) > MAX_LISTED else "")
        raise SpeakeridError(
            f"{out_dir}: the list no longer has {len(lost)} utterance(s) of finished shards: {shown}. To re-pack "
            f"those shards without them, delete {to_delete} (and {STATE_DIR}/<name>.json of each) and re-run; or use "
            "a new --out directory.")
    shards = [[Item(utterance_key(src), src, spk, plan.speakers.get(spk, -1), chunk, 0)
               for src, spk, chunk in shard if (src, spk) in listed] for shard in layout]
    kept = PackPlan(plan.config, existing["names"], shards, plan.speakers, plan.skipped)
    kept.digest = plan_digest(kept)
    return kept


def _record_lost(out_dir: Path, plan: PackPlan, existing: dict, listener: PackListener) -> PackPlan:
    if plan.digest != existing.get("digest"):
        state = out_dir / STATE_DIR
        lost = sum(map(len, json.loads(gzip.decompress((state / LAYOUT).read_bytes())))) - plan.n_items
        listener.note(f"the list lost {lost} utterance(s) of unfinished shards since {out_dir} was started: "
                      "resuming without them")
        _write_layout(state / LAYOUT, plan)
        write_json_atomic(state / "plan.json", _plan_record(plan))
    return plan


def write_index(out_dir: str | Path) -> Path:
    """Build ``index.json`` from the plan and every shard's stats (``shardify merge`` after parts)."""
    out_dir = Path(out_dir)
    plan_path = out_dir / STATE_DIR / "plan.json"
    if not plan_path.exists():
        raise SpeakeridError(f"{out_dir}: no {STATE_DIR}/plan.json; run `shardify pack` into it first")
    plan = read_json(plan_path, f"delete {out_dir} and re-pack")
    unfinished = [(i, name) for i, name in enumerate(plan["names"]) if not _is_finished(out_dir, name)]
    if unfinished:
        shown = ", ".join(f"{name} (shard {i})" for i, name in unfinished[:MAX_LISTED])
        raise SpeakeridError(
            f"{out_dir}: {len(unfinished)} of {len(plan['names'])} shards are not finished: {shown}"
            f"{' …' if len(unfinished) > MAX_LISTED else ''}. Shard i belongs to --part i % parts: re-run "
            "those parts (they resume), then merge again."
        )
    shards = [json.loads((out_dir / STATE_DIR / f"{name}.json").read_text()) for name in plan["names"]]
    skipped = plan["skipped"] + [b for s in shards for b in s.pop("skipped")]
    config = plan["config"]
    index = {
        "format": FORMAT, "version": VERSION, "tool": f"speakerid-toolkit {__version__}",
        "kind": config["kind"], "sample_rate": config["sample_rate"], "encoding": config["encoding"],
        "config": config, "plan_digest": plan["digest"], "speakers": plan["speakers"], "shards": shards,
        "totals": {
            "shards": len(shards), "samples": sum(s["samples"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards), "duration": round(sum(s["duration"] for s in shards), 3),
            "speakers": len(plan["speakers"]) if plan["speakers"] else None, "skipped": len(skipped),
        },
        "skipped": skipped,
    }
    if config["kind"] != "train":
        index["totals"]["speakers"] = len({k.split("/", 1)[0] for s in shards for k in s["keys"]})
    path = out_dir / INDEX_NAME
    remove_dead_temporaries(out_dir, [INDEX_NAME], locked=True)  # of a merge or a last part killed while writing it
    remove_dead_temporaries(out_dir / STATE_DIR, ["plan.json", LAYOUT], locked=True)  # of parts killed while claiming: all done now
    write_json_atomic(path, index)
    return path
