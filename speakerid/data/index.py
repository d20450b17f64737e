"""``index.json``: what a shard directory holds; writing it once every shard is finished, loading it, and
``verify``: re-checking every shard against it.

The index records the format version, sample rate, encoding, the speaker → label map (sorted ids →
0..S-1, as voxceleb_trainer numbers them) and, per shard, its file name, bytes, sha256, utterances, chunks,
speakers and duration. Evaluation and noise sets also list each shard's keys, so a reader knows what is
where without opening a tar.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from speakerid import __version__
from speakerid.audio import ENCODINGS, decode
from speakerid.data.lists import MAX_LISTED
from speakerid.errors import SpeakeridError
from speakerid.tempfiles import atomic_write, remove_dead_temporaries

FORMAT = "speakerid-shards"
VERSION = 1
INDEX_NAME = "index.json"
STATE_DIR = ".shardify"  # plan.json and per-shard stats while (and after) packing
LAYOUT = "layout.json.gz"  # in STATE_DIR: the plan's utterances per shard, to resume a list that lost some


def write_json_atomic(path: Path, obj) -> None:
    """Write to a temporary name, fsync, rename: readers see the old file or the new one, never half."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


def read_json(path: Path, fix: str):
    """A JSON file shardify wrote; a damaged one is one message naming it and ``fix``."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SpeakeridError(f"{path}: cannot read it ({error}): {fix}") from error


def is_finished(out_dir: Path, name: str) -> bool:
    """The shard's tar and its stats are in place and agree on its size (a resumed run skips it)."""
    stats_path = out_dir / STATE_DIR / f"{name}.json"
    tar = out_dir / name
    if not (tar.exists() and stats_path.exists()):
        return False
    try:
        return json.loads(stats_path.read_text())["bytes"] == tar.stat().st_size
    except (OSError, ValueError, KeyError):
        return False


def finished_shards(out_dir: Path, names: Iterable[str]) -> set[str]:
    """The shards among ``names`` that are finished (as :func:`is_finished` says), from one listing of the directory
    and one of its state folder, not a few lookups per shard: a re-run of VoxCeleb2 checks thousands."""
    wanted = set(names)
    state = out_dir / STATE_DIR
    try:
        with os.scandir(out_dir) as listing:
            tars = {entry.name: entry for entry in listing if entry.name in wanted}
        stats = {name for name in os.listdir(state) if name.endswith(".json")} if tars else set()
    except FileNotFoundError:
        return set()
    finished = set()
    for name, entry in tars.items():
        if f"{name}.json" not in stats:
            continue
        try:
            if json.loads((state / f"{name}.json").read_text())["bytes"] == entry.stat().st_size:
                finished.add(name)
        except (OSError, ValueError, KeyError):
            pass
    return finished


def write_index(out_dir: str | Path) -> Path:
    """Build ``index.json`` from the plan and every shard's stats (``shardify merge`` after parts)."""
    out_dir = Path(out_dir)
    plan_path = out_dir / STATE_DIR / "plan.json"
    if not plan_path.exists():
        raise SpeakeridError(f"{out_dir}: no {STATE_DIR}/plan.json; run `shardify pack` into it first")
    plan = read_json(plan_path, f"delete {out_dir} and re-pack")
    finished = finished_shards(out_dir, plan["names"])
    unfinished = [(i, name) for i, name in enumerate(plan["names"]) if name not in finished]
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


def load_index(shard_dir: str | Path) -> dict:
    shard_dir = Path(shard_dir)
    path = shard_dir / INDEX_NAME
    if not path.exists():
        unfinished = (shard_dir / STATE_DIR / "plan.json").exists()
        hint = (
            "packing has not finished (or its parts were not merged): re-run the same `shardify pack` "
            "command to resume, or `speakerid shardify merge` after all parts"
            if unfinished else "it is not a shard directory written by shardify"
        )
        raise SpeakeridError(f"{path}: no index; {hint}")
    fix = ("`speakerid shardify merge " + str(shard_dir) + "` rebuilds it from " + str(shard_dir / STATE_DIR)
           if (shard_dir / STATE_DIR / "plan.json").exists() else "re-pack the shards")
    index = read_json(path, f"the index is damaged (truncated?); {fix}")
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise SpeakeridError(
            f"{path}: format {index.get('format')!r} version {index.get('version')!r}, expected {FORMAT!r} "
            f"version {VERSION}; re-pack with this speakerid"
        )
    return index


def member_intact(meta: dict, audio: bytes) -> bool:
    """The audio bytes match the crc32 shardify wrote in the member's json (members of older packs have none)."""
    return "crc32" not in meta or zlib.crc32(audio) == meta["crc32"]


def split_member(name: str) -> tuple[str, str]:
    """A tar member name → (sample key, extension), split as webdataset does: at the first dot of the last
    path component (``id00012/21Uxsk56VDQ/00001.flac`` → ``id00012/21Uxsk56VDQ/00001``, ``flac``)."""
    head, slash, last = name.rpartition("/")
    stem, _, ext = last.partition(".")
    return head + slash + stem, ext


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes and counts what passes through it (one pass: hash + parse)."""

    def __init__(self, raw):
        self.raw, self.sha256, self.bytes = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        if n:
            self.sha256.update(memoryview(buffer)[:n])
            self.bytes += n
        return n


@dataclass
class ShardCheck:
    name: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_shard(path: Path, expected: dict, encoding: str, *, decode_audio: bool = False) -> ShardCheck:
    """Hash and parse one shard in a single read; compare with its index entry."""
    check = ShardCheck(expected["name"])
    if not path.exists():
        check.problems.append("missing")
        return check
    size = path.stat().st_size
    if size != expected["bytes"]:
        check.problems.append(f"{size} bytes, index says {expected['bytes']}")
    members: Counter = Counter()
    keys: set[str] = set()
    declared: dict[str, int] = {}  # key → "samples" in its json
    decoded: dict[str, int] = {}  # key → samples actually decoded (with decode_audio)
    metas: dict[str, dict] = {}  # key → its json, and audio: key → its bytes' crc32 (checked against each other)
    audio_crc: dict[str, int] = {}
    with open(path, "rb", buffering=0) as raw:
        reader = _HashingReader(raw)
        try:
            with tarfile.open(fileobj=io.BufferedReader(reader, 1 << 20), mode="r|") as tar:
                for member in tar:
                    key, ext = split_member(member.name)
                    data = tar.extractfile(member).read() if member.isfile() else b""
                    members[ext] += 1
                    keys.add(key)
                    if ext == "json":
                        metas[key] = json.loads(data)
                        declared[key] = metas[key].get("samples", -1)
                    elif ext in ENCODINGS:
                        audio_crc[key] = zlib.crc32(data)
                        if decode_audio:
                            try:
                                decoded[key] = len(decode(data)[0])
                            except (RuntimeError, ValueError) as error:  # name this member, go on to the next
                                check.problems.append(f"member {member.name} does not decode: {error}")
        except (tarfile.TarError, json.JSONDecodeError, OSError, RuntimeError, ValueError) as error:
            check.problems.append(f"unreadable: {error}")
        while reader.read(1 << 20):  # the tar's end padding counts towards the hash
            pass
    failing = sorted(k for k, crc in audio_crc.items() if metas.get(k, {}).get("crc32", crc) != crc)
    if failing:  # every one, by key: the members to re-pack (or the ones a reader skips)
        check.problems.append(f"{len(failing)} member(s) fail their crc32: {', '.join(failing)}")
    digest = reader.sha256.hexdigest()
    if digest != expected["sha256"]:
        check.problems.append(f"sha256 {digest[:16]}… does not match the index's {expected['sha256'][:16]}…")
    if not check.problems:
        n_audio, n_json = members[encoding], members["json"]
        if not (n_audio == n_json == len(keys) == expected["samples"]):
            check.problems.append(
                f"{n_audio} audio and {n_json} json members for {len(keys)} keys, index says {expected['samples']} utterances"
            )
        for key in (k for k, n in decoded.items() if declared.get(k) != n):
            check.problems.append(f"member {key} decodes to {decoded[key]} samples, its json says {declared.get(key)}")
    return check


@dataclass
class VerifyReport:
    shard_dir: Path
    checks: list[ShardCheck]
    strays: list[str]  # .tar files in the directory that the index does not name
    index: dict

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def bad(self) -> list[ShardCheck]:
        return [c for c in self.checks if not c.ok]


def verify(shard_dir: str | Path, *, decode_audio: bool = False, workers: int = 2) -> VerifyReport:
    """Re-check every shard named by the index: present, size, sha256, tar structure, member counts."""
    shard_dir = Path(shard_dir)
    index = load_index(shard_dir)
    encoding = index["encoding"]
    with ThreadPoolExecutor(max(1, workers)) as pool:  # hashlib and file reads release the GIL
        checks = list(pool.map(
            lambda entry: check_shard(shard_dir / entry["name"], entry, encoding, decode_audio=decode_audio),
            index["shards"],
        ))
    named = {s["name"] for s in index["shards"]}
    strays = sorted(p.name for p in shard_dir.glob("*.tar") if p.name not in named)
    return VerifyReport(shard_dir, checks, strays, index)
