"""A shard set as a reader sees it: the index, one URL per shard, and which stream reads which shard.

Shard URLs are anything webdataset opens: local paths, brace patterns (``train-{000000..000099}.tar``),
``pipe:`` commands and ``http(s)://`` URLs. By default they are the index's shard names beside the
index; ``urls=`` overrides them (e.g. an object store behind ``pipe:``), and each index entry must then
be named by exactly one URL, in any order.
"""

from __future__ import annotations

import heapq
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from speakerid.data.index import FORMAT, INDEX_NAME, VERSION, load_index
from speakerid.data.shardio import DEFAULT_IO_TIMEOUT, ShardUnavailable, open_shard
from speakerid.errors import SpeakeridError


def _is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def _read_remote_index(url: str, io_timeout: float) -> dict:
    try:
        with open_shard(url, io_timeout) as f:
            index = json.loads(f.read())
    except ShardUnavailable as error:
        raise SpeakeridError(f"cannot read the shard index: {error}") from error
    except ValueError as error:
        raise SpeakeridError(f"{url}: cannot read the shard index: {error}") from error
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise SpeakeridError(f"{url}: not a {FORMAT} v{VERSION} index; re-pack with this speakerid")
    return index


@dataclass
class ShardSet:
    index: dict
    urls: list[str]  # urls[i] reads index["shards"][i]
    location: str
    io_timeout: float = DEFAULT_IO_TIMEOUT  # seconds without a byte from a remote shard (data.io_timeout)

    @classmethod
    def open(cls, location: str | os.PathLike, urls: str | list[str] | None = None, *, check: bool = True,
             io_timeout: float = DEFAULT_IO_TIMEOUT) -> "ShardSet":
        """``location``: a shard directory, its index.json, or an http(s) URL of either."""
        if not io_timeout > 0:
            raise SpeakeridError(f"data.io_timeout must be a positive number of seconds, got {io_timeout}")
        location = str(location)
        if _is_url(location):
            index_url = location if location.endswith(".json") else location.rstrip("/") + "/" + INDEX_NAME
            index = _read_remote_index(index_url, io_timeout)
            base = index_url.rsplit("/", 1)[0]
            default = [f"{base}/{s['name']}" for s in index["shards"]]
        else:
            directory = Path(location).parent if location.endswith(".json") else Path(location)
            index = load_index(directory)
            default = [str(directory / s["name"]) for s in index["shards"]]
        names = [s["name"] for s in index["shards"]]
        if urls is None:
            chosen = default
        else:
            expanded = [u for pattern in ([urls] if isinstance(urls, str) else urls) for u in braceexpand.braceexpand(pattern)]
            chosen = _match_urls(names, expanded, location)
        shards = cls(index, chosen, location, io_timeout)
        if check:
            shards.check()
        return shards

    def check(self) -> None:
        """Start-up checks: every local shard exists with the index's size; every http shard answers."""
        for entry, url in zip(self.index["shards"], self.urls):
            if url.startswith("pipe:"):
                continue  # a command: nothing to look at before running it
            if _is_url(url):
                try:
                    urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=self.io_timeout).close()
                except (urllib.error.URLError, OSError) as error:
                    raise SpeakeridError(f"{url}: cannot open this shard: {error}") from error
                continue
            path = Path(url.removeprefix("file:"))
            if not path.exists():
                raise SpeakeridError(f"{path}: shard named by the index is missing")
            if path.stat().st_size != entry["bytes"]:
                raise SpeakeridError(
                    f"{path}: {path.stat().st_size} bytes, the index says {entry['bytes']}: the index does not match "
                    "the shards (run `speakerid shardify verify` and re-pack what it reports)"
                )

    @property
    def kind(self) -> str:
        return self.index["kind"]

    @property
    def encoding(self) -> str:
        return self.index["encoding"]

    @property
    def sample_rate(self) -> int:
        return self.index["sample_rate"]

    def __len__(self) -> int:
        return len(self.urls)


def _match_urls(names: list[str], urls: list[str], location: str) -> list[str]:
    by_name: dict[str, list[str]] = {name: [] for name in names}
    for url in urls:
        hits = [name for name in names if name in url]
        if len(hits) != 1:
            raise SpeakeridError(f"shard URL {url!r} names {len(hits)} shards of {location}'s index; expected exactly one")
        by_name[hits[0]].append(url)
    unmatched = [n for n, u in by_name.items() if len(u) != 1]
    if unmatched:
        raise SpeakeridError(
            f"the shard URLs do not match the index of {location}: {len(unmatched)} shard(s) named by the index are "
            f"given by {', '.join(str(len(by_name[n])) for n in unmatched[:3])} URL(s), e.g. {unmatched[0]}"
        )
    return [by_name[n][0] for n in names]


def assign_streams(weights: list[int], n_streams: int) -> list[list[int]]:
    """Split shards over streams (rank × worker) so that each stream gets about the same weight.

    Longest-processing-time first: the heaviest shard goes to the lightest stream. Deterministic (ties
    by index), so every rank computes the same assignment.
    """
    if len(weights) < n_streams:
        raise SpeakeridError(
            f"{len(weights)} shard(s) for {n_streams} reader streams (ranks × DataLoader workers): every stream "
            "needs at least one shard. Re-pack with a smaller --shard-size or use fewer workers."
        )
    heap = [(0, s) for s in range(n_streams)]
    streams: list[list[int]] = [[] for _ in range(n_streams)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, s = heapq.heappop(heap)
        streams[s].append(i)
        heapq.heappush(heap, (load + weights[i], s))
    return [sorted(s) for s in streams]
