"""Planning a shard set: which utterance goes into which shard, decided before any audio is read.

Training sets are "grouped per speaker": each speaker's utterances are shuffled and cut into chunks of
``chunk_size`` (one speaker, contiguous in the tar); all chunks of all speakers are shuffled and packed
into shards of a target size. A reader holding a few shards therefore sees many speakers, each as short
runs, which is what drawing N speakers × M utterances without random access needs. Evaluation and noise
sets keep one utterance per chunk in sorted path order.

The plan is a pure function of the list, the configuration and the input file sizes, so every SLURM array
task (``--part i --parts n``) computes the same plan and writes its own share of it, and a re-run can tell
finished shards from missing ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from speakerid.audio import COMPRESSED_EXTENSIONS, ENCODINGS, MIN_SECONDS, check_decoders
from speakerid.data.lists import MAX_LISTED, ListEntry, listed, utterance_key
from speakerid.errors import SpeakeridError

KINDS = ("train", "eval", "noise")
DEFAULT_SHARD_SIZE = 256 * 1024**2

# Output bytes per input byte, to aim at --shard-size from file sizes alone (the index records real sizes).
# VoxCeleb2's AAC is about 8 kB/s against 32 kB/s of 16-bit PCM; FLAC keeps about 60% of PCM on speech.
_SIZE_RATIO = {
    (".wav", "wav"): 1.0, (".wav", "flac"): 0.6,
    (".flac", "wav"): 1.7, (".flac", "flac"): 1.0,
    (".m4a", "wav"): 4.0, (".m4a", "flac"): 2.4,
}


@dataclass(frozen=True)
class PackConfig:
    """Everything that decides the content of a shard set (and so must match when a run resumes)."""

    kind: str = "train"
    encoding: str = "flac"
    sample_rate: int = 16000
    chunk_size: int = 16
    shard_size: int = DEFAULT_SHARD_SIZE
    max_utts: int | None = None
    seed: int = 0
    prefix: str | None = None
    resample: bool = False
    downmix: bool = False
    min_seconds: float | None = None  # shorter files are refused (or skipped with --skip-bad), never tiled into crops

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SpeakeridError(f"unknown kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.encoding not in ENCODINGS:
            raise SpeakeridError(f"unknown encoding {self.encoding!r}; choose one of {', '.join(ENCODINGS)}")
        if self.min_seconds is not None and self.min_seconds < 0:
            raise SpeakeridError(f"--min-seconds must be 0 or more, got {self.min_seconds}")
        if self.chunk_size < 1:
            raise SpeakeridError(f"--chunk-size must be at least 1, got {self.chunk_size}")
        if self.shard_size < 1:
            raise SpeakeridError(f"--shard-size must be positive, got {self.shard_size}")
        if self.max_utts is not None and self.max_utts < 1:
            raise SpeakeridError(f"--max-utts must be at least 1, got {self.max_utts}")
        if self.kind == "train" and self.max_utts is not None and self.max_utts < self.chunk_size:
            raise SpeakeridError(
                f"--max-utts {self.max_utts} is smaller than --chunk-size {self.chunk_size}: a speaker chunk "
                "never spans two shards; raise --max-utts or lower --chunk-size"
            )

    def record(self) -> dict:
        """The settings that determine the shards. An unset --min-seconds is left out, so that a directory half
        packed before the option existed still resumes."""
        record = asdict(self)
        if record["min_seconds"] is None:
            del record["min_seconds"]
        return record

    @property
    def shortest(self) -> float:
        """--min-seconds, by default MIN_SECONDS for speech (train, eval) and none for noise banks (short RIRs)."""
        if self.min_seconds is not None:
            return self.min_seconds
        return 0.0 if self.kind == "noise" else MIN_SECONDS

    @property
    def shard_prefix(self) -> str:
        return self.prefix or self.kind


@dataclass(frozen=True, slots=True)
class Item:
    """One planned utterance (slots: a VoxCeleb2 plan holds a million)."""

    key: str
    src: str  # path relative to the audio root, as listed
    spk: str  # speaker (train, eval) or category (noise: first path component, e.g. MUSAN's noise/speech/music)
    label: int  # 0..S-1 on training sets, -1 elsewhere
    chunk: int  # global chunk number (train), -1 elsewhere
    est_bytes: int


@dataclass
class PackPlan:
    config: PackConfig
    names: list[str]
    shards: list[list[Item]]
    speakers: dict[str, int]
    skipped: list[dict] = field(default_factory=list)  # missing inputs left out with --skip-bad
    digest: str = ""

    @property
    def n_items(self) -> int:
        return sum(len(s) for s in self.shards)


# Files one pool task stats: a future per file costs more than the stat (VoxCeleb2's 1.09 M futures took 73 s where
# a plain loop took 15 s), so a pool gets chunks.
STAT_CHUNK = 4096


def _size(path: str) -> int | str:
    """The file's size, or why it cannot be used."""
    try:
        size = os.stat(path).st_size
    except OSError as error:
        return error.strerror or str(error)
    return size if size > 0 else "empty file"


def file_sizes(root: str | Path, relpaths: list[str], threads: int = 1) -> list[int | str]:
    """Each file's size, or why it cannot be read. ``threads`` > 1 stats chunks of STAT_CHUNK files in parallel
    (network filesystems answer many stats at once); on a local disk a plain loop is the fastest."""
    base = str(root)
    join = os.path.join
    if threads <= 1 or len(relpaths) <= STAT_CHUNK:
        return [_size(join(base, rel)) for rel in relpaths]
    chunks = [relpaths[i:i + STAT_CHUNK] for i in range(0, len(relpaths), STAT_CHUNK)]
    with ThreadPoolExecutor(threads) as pool:
        return [size for sizes in pool.map(lambda chunk: [_size(join(base, rel)) for rel in chunk], chunks)
                for size in sizes]


def make_plan(entries: list[ListEntry], root: str | Path, config: PackConfig, *, skip_bad: bool = False,
              stat_threads: int = 1) -> PackPlan:
    """Check the listed files exist and plan the shards (``stat_threads`` > 1: stat in parallel, for network
    filesystems)."""
    root = Path(root)
    keys = _keys_without_duplicates(entries)
    try:
        check_decoders(root / e.relpath for e in entries if e.relpath.lower().endswith(COMPRESSED_EXTENSIONS))
    except SpeakeridError as error:
        raise SpeakeridError(f"{error}. Nothing was written.") from None
    speakers = {spk: label for label, spk in enumerate(sorted({e.spk for e in entries}))} if config.kind == "train" else {}

    sizes = file_sizes(root, [e.relpath for e in entries], stat_threads)
    missing = [(e, s) for e, s in zip(entries, sizes) if isinstance(s, str)]
    if missing and not skip_bad:
        shown = listed([f"{e.where}: {root / e.relpath}: {reason}" for e, reason in missing])
        raise SpeakeridError(
            f"{len(missing)} of {len(entries)} listed audio files cannot be read:\n{shown}\n"
            "Check --root, fix or remove these lines, or pass --skip-bad to leave them out (they are then "
            "counted in the summary and the index). Nothing was written."
        )
    skipped = [{"src": e.relpath, "reason": reason} for e, reason in missing]
    usable = [i for i, s in enumerate(sizes) if not isinstance(s, str)]  # indices: no tuple per file
    if not usable:
        raise SpeakeridError("no listed audio file can be read; check --root")
    ratios: dict[str, float] = {}

    def item(i: int, chunk: int) -> Item:
        entry = entries[i]
        ext = os.path.splitext(entry.relpath)[1].lower()
        ratio = ratios.get(ext) or ratios.setdefault(ext, _SIZE_RATIO.get((ext, config.encoding), 1.0))
        return Item(keys[i], entry.relpath, entry.spk, speakers.get(entry.spk, -1), chunk, int(sizes[i] * ratio))

    if config.kind == "train":
        chunks = _speaker_chunks(entries, usable, speakers, config, item)
        order = np.random.default_rng([config.seed, 2]).permutation(len(chunks))
        chunks = [chunks[i] for i in order]
    else:
        chunks = [[item(i, -1)] for i in sorted(usable, key=lambda i: entries[i].relpath)]

    shards = _pack(chunks, config)
    names = [f"{config.shard_prefix}-{i:06d}.tar" for i in range(len(shards))]
    plan = PackPlan(config, names, shards, speakers, skipped)
    plan.digest = plan_digest(plan)
    return plan


def _keys_without_duplicates(entries: list[ListEntry]) -> list[str]:
    """Each entry's shard key; two entries with one key are an error naming both lines."""
    keys = [utterance_key(e.relpath) for e in entries]
    if len(set(keys)) == len(keys):
        return keys
    by_key: dict[str, list[ListEntry]] = defaultdict(list)
    for key, entry in zip(keys, entries):
        by_key[key].append(entry)
    clashes = [group for group in by_key.values() if len(group) > 1]
    shown = "\n".join(
        "  " + " and ".join(f"{e.where} ({e.relpath})" for e in group) for group in clashes[:MAX_LISTED]
    )
    raise SpeakeridError(
        f"{len(clashes)} utterance(s) are listed more than once (or differ only by extension or dots, "
        f"which give the same shard key):\n{shown}\nRemove the duplicate lines."
    )


def _speaker_chunks(entries: list[ListEntry], usable: list[int], speakers, config: PackConfig, item) -> list[list[Item]]:
    by_speaker: dict[str, list[int]] = defaultdict(list)
    for i in usable:
        by_speaker[entries[i].spk].append(i)
    chunks: list[list[Item]] = []
    for spk in sorted(by_speaker):
        utts = by_speaker[spk]
        # Shuffled before chunking so that a chunk mixes the speaker's videos instead of one session.
        order = np.random.default_rng([config.seed, 1, speakers[spk]]).permutation(len(utts))
        for start in range(0, len(utts), config.chunk_size):
            number = len(chunks)
            chunks.append([item(utts[i], number) for i in order[start:start + config.chunk_size]])
    return chunks


def _pack(chunks: list[list[Item]], config: PackConfig) -> list[list[Item]]:
    """Cut the chunks, in order, into as few shards as the limit allows (--max-utts or --shard-size), balanced.

    Filling each shard to the limit gives the fewest shards but left a tail shard of a few chunks, so of a few
    speakers, which a reader holding it sees as a poor speaker mix. Here, with that many shards, each shard takes
    chunks while the middle of the next stays within the mean of what is left ((size left) / (shards left)), and
    more where stopping would leave the rest unable to fit the shards left. A chunk never splits (one larger than
    the limit is a shard alone)."""
    if config.max_utts:
        sizes, limit = [len(chunk) for chunk in chunks], config.max_utts
    else:
        sizes, limit = [sum(i.est_bytes for i in chunk) for chunk in chunks], config.shard_size
    needs = _shards_needed(sizes, limit)
    ends, left, index = [0], sum(sizes), 0
    for shards_left in range(needs[0], 0, -1):
        target, size = left / shards_left, 0
        while index < len(sizes) and (size == 0 or size + sizes[index] <= limit
                                      and (size + sizes[index] / 2 <= target or needs[index] >= shards_left)):
            size += sizes[index]
            index += 1
        left -= size
        ends.append(index)
    return [[item for chunk in chunks[a:b] for item in chunk] for a, b in zip(ends, ends[1:])]


def _shards_needed(sizes: list[int], limit: int) -> list[int]:
    """For each chunk index, the fewest shards within the limit that hold it and every chunk after it (filling
    each to the limit, which is the fewest for chunks kept in order); one more entry, 0, for none left."""
    ends, end, size = [], 0, 0  # ends[i]: where a shard filled from chunk i ends
    for start in range(len(sizes)):
        if end == start:
            end, size = start + 1, sizes[start]
        while end < len(sizes) and size + sizes[end] <= limit:
            size += sizes[end]
            end += 1
        ends.append(end)
        size -= sizes[start]
    needs = [0] * (len(sizes) + 1)
    for start in range(len(sizes) - 1, -1, -1):
        needs[start] = 1 + needs[ends[start]]
    return needs


def plan_digest(plan: PackPlan) -> str:
    """sha256 of what the shards will hold; equal digests mean equal shard sets."""
    h = hashlib.sha256()
    h.update(json.dumps(plan.config.record(), sort_keys=True).encode())
    for name, items in zip(plan.names, plan.shards):
        h.update(name.encode())  # one update a shard hashes the same bytes as one an utterance, faster
        h.update("".join(f"\0{i.key}\0{i.src}\0{i.spk}\0{i.label}\0{i.chunk}" for i in items).encode())
    return h.hexdigest()
