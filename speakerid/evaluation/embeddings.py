"""Embeddings keyed by utterance, their file (safetensors, or .npy + keys), and the embedding cache's check.

A cache is keyed by the sha256 of the weights, the extraction settings and the audio (its resolved folder,
index path or URL, and per utterance its file's size and mtime or its shard's sha256): a second run embeds
only what the cache lacks or what changed; another checkpoint, other settings or other audio rebuild it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speakerid.errors import SpeakeridError

CACHE_FORMAT = "speakerid-embeddings"
CACHE_VERSION = "1"


@dataclass
class Embeddings:
    """Embeddings keyed by utterance: ``values`` (U, D) for whole utterances, (U, C, D) for crops."""

    keys: list[str]
    values: np.ndarray
    speakers: list[str] | None = None  # cohort embeddings: each row's speaker
    samples: list[int | None] | None = None  # whole utterances: each row's audio length before trimming, if known

    def rows(self, keys: Iterable[str]) -> np.ndarray:
        position = {k: i for i, k in enumerate(self.keys)}
        return self.values[[position[k] for k in keys]]

    def save(self, path: str | os.PathLike, metadata: dict | None = None) -> Path:
        """safetensors (keys and metadata in its header) or, for a ``.npy`` path, the array + ``.keys.txt``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        if path.suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, self.values)
            path.with_suffix(".keys.txt").write_text("".join(f"{k}\n" for k in self.keys))
        else:
            from safetensors.numpy import save_file

            header = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "keys": json.dumps(self.keys),
                      "speakers": json.dumps(self.speakers),
                      **({"samples": json.dumps(self.samples)} if self.samples is not None else {}),
                      **{k: json.dumps(v, sort_keys=True) for k, v in (metadata or {}).items()}}
            save_file({"embeddings": np.ascontiguousarray(self.values, dtype=np.float32)}, str(tmp), metadata=header)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple["Embeddings", dict]:
        """(embeddings, metadata) from a file written by :meth:`save`."""
        path = Path(path)
        if path.suffix == ".npy":
            keys = path.with_suffix(".keys.txt").read_text().split()
            return cls(keys, np.load(path)), {}
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                header = f.metadata() or {}
                values = f.get_tensor("embeddings")
        except Exception as error:  # SafetensorError, OSError, a missing tensor
            raise SpeakeridError(f"{path}: not a speakerid embeddings file: {error}") from error
        if header.get("format") != CACHE_FORMAT:
            raise SpeakeridError(f"{path}: not a speakerid embeddings file (format {header.get('format')!r})")
        meta = {k: json.loads(v) for k, v in header.items()
                if k not in ("format", "version", "keys", "speakers", "samples")}
        return cls(json.loads(header["keys"]), values, json.loads(header.get("speakers", "null")),
                   json.loads(header.get("samples", "null"))), meta


def read_cache(path: Path | None, settings: dict) -> tuple[Embeddings | None, dict, str]:
    """(cached embeddings, their per-key audio fingerprints, why the cache was (not) reused)."""
    if path is None:
        return None, {}, "no cache"
    if not path.exists():
        return None, {}, f"new cache {path}"
    try:
        cached, meta = Embeddings.load(path)
    except SpeakeridError as error:
        return None, {}, f"unreadable cache rebuilt ({error})"
    stored = meta.get("settings", {})
    if stored.get("weights_sha256") != settings["weights_sha256"]:
        return None, {}, f"the checkpoint changed since {path} was written: cache rebuilt"
    if stored.get("audio") != settings.get("audio"):
        return None, {}, f"{path} holds embeddings of other audio ({stored.get('audio')}): cache rebuilt"
    if stored != settings:
        changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        return None, {}, f"extraction settings changed ({', '.join(changed)}): cache rebuilt"
    return cached, meta.get("fingerprints") or {}, f"reused {path}"


def drop_changed(cached: Embeddings, stored: dict[str, str], current: dict[str, str]) -> tuple[Embeddings, int]:
    """The cached rows whose audio is unchanged (same fingerprint, or not asked for now); how many were dropped."""
    keep = [i for i, k in enumerate(cached.keys) if k not in current or stored.get(k) == current[k]]
    kept = Embeddings([cached.keys[i] for i in keep], cached.values[keep], cached.speakers,
                      [cached.samples[i] for i in keep] if cached.samples is not None else None)
    return kept, len(cached.keys) - len(keep)
