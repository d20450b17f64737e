"""Claiming a shard directory for a plan, so that re-running the same command resumes it.

The first run records the plan (``.shardify/plan.json``, with the digest of what the shards will hold) and
its layout (which utterance goes into which shard); a later run with the same plan writes only the shards
that are not finished. A run whose list lost utterances of unfinished shards (a bad line removed) resumes
without them; any other change of list or configuration is refused with what changed. One lock per part
keeps two runs from writing into one directory at once.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from speakerid.data.index import FORMAT, LAYOUT, STATE_DIR, VERSION, finished_shards, read_json, write_json_atomic
from speakerid.data.lists import MAX_LISTED, utterance_key
from speakerid.data.plan import Item, PackPlan, plan_digest
from speakerid.errors import SpeakeridError
from speakerid.tempfiles import atomic_write

if TYPE_CHECKING:
    from speakerid.data.pack import PackListener


def _plan_record(plan: PackPlan) -> dict:
    return {
        "format": FORMAT, "version": VERSION, "config": plan.config.record(), "digest": plan.digest,
        "names": plan.names, "speakers": plan.speakers, "skipped": plan.skipped,
    }


def claim_directory(out_dir: Path, plan: PackPlan, listener: PackListener) -> PackPlan:
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
    with atomic_write(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(json.dumps(layout, separators=(",", ":")).encode())


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
    finished = finished_shards(out_dir, existing["names"])
    lost = [(name, src) for name, shard in zip(existing["names"], layout) for src, spk, _ in shard
            if (src, spk) not in listed and name in finished]
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


@contextmanager
def part_lock(out_dir: Path, part: int, parts: int, listener: PackListener):
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
