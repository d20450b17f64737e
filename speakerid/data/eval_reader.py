"""Evaluation audio: whole utterances (or the seeds' evenly spaced crops), each exactly once across ranks
and DataLoader workers, in batches of similar length to limit padding.

Sources: eval shards packed by ``shardify pack --kind eval`` (their index lists each shard's keys), or an
audio tree plus the relative paths to read (from trial lists). Work is split over streams (rank × worker)
whole shards or whole files at a time, balanced by size, so no utterance is read twice. :class:`AudioSource`
is what ``--audio`` names: it tells the two kinds apart, checks that every wanted utterance is there,
fingerprints them for the embedding cache and opens the loader of a rank's share.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from speakerid.audio import decode, read_audio, wrap_pad
from speakerid.data.index import member_intact
from speakerid.data.lists import listed, scan_audio_tree, utterance_key
from speakerid.data.loader import ReaderLoader, forward_errors
from speakerid.data.shardio import Faults, read_shard
from speakerid.data.shardset import ShardSet, assign_streams
from speakerid.errors import SpeakeridError


@dataclass(frozen=True)
class EvalConfig:
    eval_frames: int = 0  # 0: the whole utterance; else crops of eval_frames · 160 + 240 samples
    num_eval: int = 10  # crops per utterance when eval_frames > 0 (voxceleb_trainer: 10)
    max_batch_samples: int = 16000 * 240  # padded samples per batch (batch size × longest utterance)
    sort_buffer: int = 256  # utterances gathered and sorted by length before cutting batches


def eval_crops(samples: np.ndarray, eval_frames: int, num_eval: int) -> np.ndarray:
    """voxceleb_trainer's test crops: wrap-pad to L + 1 if short, starts at linspace(0, len − L, num_eval)."""
    length = eval_frames * 160 + 240
    padded = wrap_pad(samples, length)
    starts = np.linspace(0, len(padded) - length, num=num_eval)
    return np.stack([padded[int(s):int(s) + length] for s in starts])


@dataclass
class AudioTree:
    """Utterances read straight from files: ``root / relpath``."""

    root: Path
    relpaths: list[str]
    sample_rate: int = 16000

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        missing = [p for p in self.relpaths if not (self.root / p).exists()]
        if missing:
            shown = "\n".join(f"  {self.root / p}" for p in missing[:10])
            raise SpeakeridError(f"{len(missing)} of {len(self.relpaths)} utterances are not under {self.root}:\n{shown}"
                                 + ("\n  …" if len(missing) > 10 else ""))


def _batches_by_length(items: Iterator[tuple[str, np.ndarray]], config: EvalConfig) -> Iterator[dict]:
    """Sort a buffer of utterances by length, cut batches under the padded-samples budget."""

    def flush(buffer):
        buffer.sort(key=lambda kv: len(kv[1]))
        start = 0
        while start < len(buffer):
            end = start + 1
            while end < len(buffer) and (end + 1 - start) * len(buffer[end][1]) <= config.max_batch_samples:
                end += 1
            yield _collate(buffer[start:end], config)
            start = end

    buffer: list[tuple[str, np.ndarray]] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= config.sort_buffer:
            yield from flush(buffer)
            buffer = []
    if buffer:
        yield from flush(buffer)


def _collate(group: list[tuple[str, np.ndarray]], config: EvalConfig) -> dict:
    keys = [k for k, _ in group]
    if config.eval_frames:
        audio = np.stack([eval_crops(a, config.eval_frames, config.num_eval) for _, a in group])
        return {"keys": keys, "audio": torch.from_numpy(audio), "lengths": torch.full((len(group),), audio.shape[-1])}
    lengths = [len(a) for _, a in group]
    audio = np.zeros((len(group), max(lengths)), dtype=np.int16)
    for row, (_, a) in enumerate(group):
        audio[row, :len(a)] = a
    return {"keys": keys, "audio": torch.from_numpy(audio), "lengths": torch.tensor(lengths)}


class EvalUtterances(torch.utils.data.IterableDataset):
    """Batches ``{"keys", "audio" int16 (B, T) or (B, num_eval, L), "lengths"}`` of one rank's share."""

    def __init__(self, source: ShardSet | AudioTree, config: EvalConfig = EvalConfig(), *, keys: set[str] | None = None,
                 rank: int = 0, world_size: int = 1, workers: int = 0) -> None:
        super().__init__()
        self.source, self.config, self.keys = source, config, keys
        self.rank, self.world_size, self.workers = rank, world_size, workers
        if isinstance(source, ShardSet):
            if source.kind != "eval":
                raise SpeakeridError(f"{source.location}: evaluation reads eval shards, these are of kind {source.kind!r}")
            self.weights = [s["samples"] for s in source.index["shards"]]
        else:
            self.weights = [max(1, (source.root / p).stat().st_size) for p in source.relpaths]
        self.n_streams = world_size * max(1, workers)
        if keys is not None and isinstance(source, ShardSet):
            present = {k for s in source.index["shards"] for k in s["keys"]}
            missing = sorted(set(keys) - present)
            if missing:
                raise SpeakeridError(
                    f"{len(missing)} utterance(s) asked for are not in the shards of {source.location}, e.g. "
                    + ", ".join(missing[:10]) + ": pack them with `shardify pack --kind eval` or fix the trial list"
                )

    def _share(self, stream: int) -> list[int]:
        if len(self.weights) < self.n_streams:  # few shards/files: some streams stay idle, none reads twice
            return list(range(stream, len(self.weights), self.n_streams))
        return assign_streams(self.weights, self.n_streams)[stream]

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        share = self._share(self.rank * n_workers + worker)
        yield from forward_errors(_batches_by_length(self._utterances(share), self.config))

    def _utterances(self, share: list[int]) -> Iterator[tuple[str, np.ndarray]]:
        if isinstance(self.source, AudioTree):
            for i in share:
                relpath = self.source.relpaths[i]
                key = utterance_key(relpath)
                if self.keys is None or key in self.keys:
                    try:
                        audio = read_audio(self.source.root / relpath, self.source.sample_rate)
                    except SpeakeridError as error:
                        raise SpeakeridError(f"utterance {key}: {str(error).rstrip('.')}; evaluation needs every "
                                             "utterance of the trial lists: replace the file, or remove the trials "
                                             "naming it") from error
                    yield key, audio
            return
        faults = Faults()
        encoding = self.source.encoding
        for i in share:
            url = self.source.urls[i]
            for sample in read_shard(url, faults, self.source.io_timeout):
                key = sample["__key__"]
                if self.keys is not None and key not in self.keys:
                    continue
                try:
                    if not member_intact(json.loads(sample["json"]), sample[encoding]):
                        raise ValueError("its audio bytes fail their crc32")
                    audio, _ = decode(sample[encoding])
                except (KeyError, ValueError, RuntimeError) as error:
                    raise SpeakeridError(f"{url}: member {key} cannot be decoded ({error}); "
                                         "run `speakerid shardify verify` on the eval shards") from error
                yield key, audio
            if faults.damaged_shards or faults.corrupt_members:
                raise SpeakeridError(f"{url}: damaged eval shard ({faults.as_dict()}); evaluation needs every "
                                     "utterance: run `speakerid shardify verify` and re-pack it")


def eval_loader(source: ShardSet | AudioTree, config: EvalConfig = EvalConfig(), *, keys: set[str] | None = None,
                rank: int = 0, world_size: int = 1, workers: int = 0) -> ReaderLoader:
    dataset = EvalUtterances(source, config, keys=keys, rank=rank, world_size=world_size, workers=workers)
    return ReaderLoader(dataset, batch_size=None, num_workers=workers)


def names_shards(location: str) -> bool:
    """Whether ``location`` (an --audio or --cohort argument) names shards: a URL, an index.json, or a directory
    holding one; anything else is an audio folder."""
    return location.startswith(("http://", "https://")) or location.endswith(".json") or \
        (Path(location) / "index.json").exists()


@dataclass
class AudioSource:
    """Evaluation audio: eval shards (``shardify pack --kind eval``) or a folder of files named by relative path."""

    location: str
    shards: ShardSet | None = None
    root: Path | None = None

    @classmethod
    def open(cls, location: str | os.PathLike) -> "AudioSource":
        text = str(location)
        path = Path(text)
        if names_shards(text):
            return cls(text, shards=ShardSet.open(text))
        if path.is_dir():
            return cls(text, root=path)
        raise SpeakeridError(f"{text}: --audio must be an audio folder, an eval shard directory (with index.json) "
                             "or its URL; nothing is there")

    def available_keys(self) -> set[str]:
        if self.shards is not None:
            if self.shards.kind != "eval":
                raise SpeakeridError(f"{self.location}: evaluation reads eval shards (shardify pack --kind eval), "
                                     f"these are of kind {self.shards.kind!r}")
            return {k for s in self.shards.index["shards"] for k in s["keys"]}
        return {utterance_key(e.relpath) for e in scan_audio_tree(self.root)}

    def identity(self) -> str:
        """The audio as the embedding cache records it: the resolved folder or index path, or the URL."""
        if self.location.startswith(("http://", "https://")):
            return self.location
        return str(Path(self.location).resolve())

    def fingerprints(self, relpaths: dict[str, str]) -> dict[str, str]:
        """key → a cheap content fingerprint: its file's size and mtime, or its shard's sha256 (from the index)."""
        if self.shards is None:
            stats = {key: (self.root / rel).stat() for key, rel in relpaths.items()}  # one stat per file
            return {key: f"{st.st_size}-{st.st_mtime_ns}" for key, st in stats.items()}
        shard_of = {k: s["sha256"][:16] for s in self.shards.index["shards"] for k in s["keys"]}
        return {key: shard_of[key] for key in relpaths}

    def describe(self, key: str, relpath: str) -> str:
        """An utterance as an error names it: with its file, or with its eval shards."""
        return f"{key} ({self.root / relpath})" if self.shards is None else f"{key} in {self.location}"

    def check(self, wanted: dict[str, tuple[str, str]]) -> None:
        """``wanted``: key → (relpath, where it is named). Raise, counting every missing one, listing ten."""
        if self.shards is not None:
            present = self.available_keys()
            missing = [(rel, where) for key, (rel, where) in wanted.items() if key not in present]
        else:
            missing = [(rel, where) for rel, where in wanted.values() if not (self.root / rel).is_file()]
        if missing:
            shown = listed([f"{rel}  (named at {where})" for rel, where in missing])
            raise SpeakeridError(
                f"{len(missing)} of {len(wanted)} utterances are not in {self.location}:\n{shown}\n"
                "Point --audio at the folder (or eval shards) that holds them, pack them with `speakerid shardify "
                "pack --kind eval --trials …`, or remove those trials from the list")

    def loader(self, relpaths: dict[str, str], config: EvalConfig, *, rank: int = 0, world_size: int = 1,
               workers: int = 0, sample_rate: int = 16000) -> ReaderLoader:
        """This rank's share of the utterances ``relpaths`` (key → relpath), as :func:`eval_loader` batches."""
        if self.shards is not None:
            return eval_loader(self.shards, config, keys=set(relpaths), rank=rank, world_size=world_size,
                               workers=workers)
        tree = AudioTree(self.root, [relpaths[k] for k in sorted(relpaths)], sample_rate)
        return eval_loader(tree, config, rank=rank, world_size=world_size, workers=workers)
