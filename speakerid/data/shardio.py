"""Shard I/O: every reader of shards (training, evaluation, cohort, noise bank) opens and iterates them here.

:func:`open_shard` opens local paths, ``pipe:`` commands and http(s) URLs, every remote wait bounded: a remote
shard that sends no byte for ``io_timeout`` seconds (a dead or stopped server, a stalled command) raises
:class:`ShardUnavailable` naming the URL; so do a refused connection, an HTTP error, a connection cut
mid-shard and a ``pipe:`` command that exits non-zero. There is no limit on a whole shard: big shards on
slow links are fine as long as bytes keep coming. A stalled command's process group is killed.
:func:`read_shard` iterates one shard's members grouped into samples (the tar format itself is parsed by
speakerid.data.tarstream); a damaged tail is skipped and counted in :class:`Faults`.
:class:`ShardFailures` turns repeated failures of one shard into an error instead of endless retries.
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import select
import signal
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Iterator

import webdataset as wds

from speakerid.audio import wav_pcm_at
from speakerid.data.index import split_member
from speakerid.data.tarstream import iter_tar, iter_tar_offsets
from speakerid.errors import SpeakeridError

log = logging.getLogger("speakerid.data")

DEFAULT_IO_TIMEOUT = 60.0  # seconds without a byte from a remote shard
REMEMBERED_UTTERANCES = 200_000  # a stream's shard layouts kept for crop-only passes (~150 MB)
READ_AHEAD = 4 << 20  # bytes of a crop-read shard asked of the storage ahead of the reader (Readahead)
DEFAULT_SHARD_RETRIES = 3  # failed reads in a row of one shard before it is an error


class ShardUnavailable(SpeakeridError):
    """A remote shard could not be read (the transport failed, not the tar): worth a retry in a later pass."""


def _stalled(url: str, timeout: float) -> ShardUnavailable:
    return ShardUnavailable(f"{url}: no data for {timeout:g} s; is the server or command alive? "
                            "(raise data.io_timeout if the storage is just slow)")


class _HttpShard(io.RawIOBase):
    """An http(s) response whose every socket read waits at most ``timeout`` seconds."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url, self.timeout = url, timeout
        try:
            self.response = urllib.request.urlopen(url, timeout=timeout)
        except TimeoutError as error:
            raise _stalled(url, timeout) from error
        except urllib.error.HTTPError as error:
            raise ShardUnavailable(f"{url}: the server answered {error.code} {error.reason}") from error
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            if isinstance(getattr(error, "reason", None), TimeoutError):
                raise _stalled(url, timeout) from error
            raise ShardUnavailable(f"{url}: cannot connect: {getattr(error, 'reason', error)}") from error

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            return self.response.readinto(buffer)
        except TimeoutError as error:
            raise _stalled(self.url, self.timeout) from error
        except (OSError, http.client.HTTPException) as error:  # reset, or closed before Content-Length bytes
            raise ShardUnavailable(f"{self.url}: the connection broke mid-shard: {error!r}") from error

    def close(self) -> None:
        if not self.closed:
            self.response.close()
        super().close()


class _PipeShard(io.RawIOBase):
    """The stdout of a ``pipe:`` command (in its own process group), read with a stall timeout.

    Read to the end, the command must exit 0; closed early or stalled, its process group is killed.
    """

    def __init__(self, url: str, timeout: float) -> None:
        self.url, self.timeout, self.at_end = url, timeout, False
        self.process = subprocess.Popen(url.removeprefix("pipe:"), shell=True, stdout=subprocess.PIPE,
                                        start_new_session=True)  # its own group: a kill reaches its children
        self.fd = self.process.stdout.fileno()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        ready, _, _ = select.select([self.fd], [], [], self.timeout)
        if not ready:
            self._kill()
            raise _stalled(self.url, self.timeout)
        data = os.read(self.fd, len(buffer))
        buffer[:len(data)] = data
        self.at_end = not data
        return len(data)

    def _kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        if not self.at_end:  # the reader stopped early: the rest of the output is not wanted
            self._kill()
        self.process.stdout.close()
        try:
            status = self.process.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:  # closed its output but does not exit
            self._kill()
            raise _stalled(self.url, self.timeout) from None
        if self.at_end and status != 0:
            raise ShardUnavailable(f"{self.url}: the command exited with status {status}")


def open_shard(url: str, io_timeout: float = DEFAULT_IO_TIMEOUT):
    """A binary stream of one shard. Local paths get a large buffer (the reader is sequential); http(s) and
    ``pipe:`` wait at most ``io_timeout`` s for each byte; other schemes go through webdataset's gopen."""
    if url.startswith(("http://", "https://")):
        return io.BufferedReader(_HttpShard(url, io_timeout), 1 << 20)
    if url.startswith("pipe:"):
        return io.BufferedReader(_PipeShard(url, io_timeout), 1 << 20)
    try:
        if "://" not in url:
            return open(url.removeprefix("file:"), "rb", buffering=1 << 20)
        return wds.gopen(url)
    except OSError as error:  # e.g. a missing file on a network filesystem: maybe back in the next pass
        raise ShardUnavailable(f"{url}: cannot open this shard: {error}") from error


class ShardFailures:
    """Transport failures in a row per shard URL: the ``limit``-th is an error, a good read starts over."""

    def __init__(self, limit: int = DEFAULT_SHARD_RETRIES) -> None:
        self.limit, self.streak = limit, {}
        self.last: ShardUnavailable | None = None  # named in the error of a pass that gave nothing

    def failed(self, url: str, error: ShardUnavailable) -> None:
        self.last = error
        self.streak[url] = self.streak.get(url, 0) + 1
        if self.streak[url] >= self.limit:
            raise SpeakeridError(f"{error} — failed {self.streak[url]} times in a row (data.shard_retries="
                                 f"{self.limit}); check that the shard's server or command works") from error

    def succeeded(self, url: str) -> None:
        self.streak.pop(url, None)


@dataclass
class Faults:
    """Damaged input met by a stream, skipped and counted (never a crash, never a silent loss)."""

    corrupt_members: int = 0
    damaged_shards: int = 0

    def as_dict(self) -> dict:
        return {"corrupt_members": self.corrupt_members, "damaged_shards": self.damaged_shards}


def local_path(url: str) -> str | None:
    """The file path of a local shard URL (a plain path or ``file:``); None for pipe:, http(s) and the rest."""
    if url.startswith("file:"):
        return url.removeprefix("file://") if url.startswith("file://") else url.removeprefix("file:")
    return None if url.startswith("pipe:") or "://" in url else url


@dataclass
class Located:
    """A member left unread in a local shard: where it lies, for a reader that wants only part of it (a crop)."""

    fd: int
    offset: int
    size: int
    url: str
    pcm: tuple[int, int] | None = None  # a wav member's 16-bit PCM: (file offset, byte length); None: read its header


class Verified:
    """Local shards a stream has read whole, every member checked against its crc32 by the parser, each with
    the keys of the members that failed. In later passes such a shard's audio members of the chosen extension
    are not read but located (:class:`Located`): the parser reads only the crop's bytes.

    The first such pass reads the shard's tar headers, json members and wav headers; it is remembered
    (``layouts``: each sample's key, json bytes and PCM span, about 0.75 kB an utterance, for at most
    ``max_remembered`` utterances: shards beyond are read by their headers every pass) and replayed in later
    passes while the file's size and modification time are unchanged, so they read only the crops' bytes."""

    def __init__(self, extension: str | None, max_remembered: int | None = None) -> None:
        self.extension = extension  # "wav": crops are byte ranges; None: nothing is located
        self.shards: dict[str, set[str]] = {}
        self.layouts: dict[str, tuple[tuple[int, int], list[tuple[str, tuple]]]] = {}  # url → (size, mtime), samples
        self.max_remembered = REMEMBERED_UTTERANCES if max_remembered is None else max_remembered
        self.remembered = 0  # utterances in layouts

    def located(self, url: str) -> bool:
        return self.extension is not None and url in self.shards and local_path(url) is not None


def read_shard(url: str, faults: Faults, io_timeout: float = DEFAULT_IO_TIMEOUT,
               verified: Verified | None = None) -> Iterator[dict]:
    """One shard's samples as {__key__, __url__, json, <encoding>: bytes}; a damaged tail is counted and skipped.

    With ``verified``: each sample also has ``__failed__``, the set of this shard's keys whose audio failed its
    crc32 (the parser adds to it); a local shard read to its end is remembered there, and its next reads
    locate (:class:`Located`) instead of reading the audio members of ``verified.extension``.
    A transport failure (see open_shard) raises ShardUnavailable: the caller decides to retry or stop.
    """
    if verified is not None and verified.located(url):
        yield from _read_located(url, faults, verified)
        return
    failed: set[str] = set()
    stream = open_shard(url, io_timeout)
    damage = None
    try:
        sample: dict = {}
        for name, data in iter_tar(stream):
            key, ext = split_member(name)
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample["__key__"], sample["__url__"] = key, url
            if verified is not None:
                sample["__failed__"] = failed
            sample[ext] = data
        if sample:
            yield sample
    except ValueError as error:  # TarError: a truncated or garbled tar ends this shard early
        damage = error
    except OSError as error:  # a local read error (NFS, disk): maybe passing, like a network one
        raise ShardUnavailable(f"{url}: read error: {error}") from error
    finally:
        stream.close()  # a pipe: command that failed raises here: its exit, not the tar, is the cause
    if damage is not None:
        faults.damaged_shards += 1
        log.warning("%s: shard damaged, rest of it skipped: %s", url, damage)
    elif verified is not None and local_path(url) is not None:
        verified.shards[url] = failed


class Readahead:
    """Keeps the next ``window`` bytes of a file read crop by crop in flight (``posix_fadvise`` WILLNEED, which
    returns at once): the kernel's own readahead follows sequential reads, not the crops' scattered ones, so on
    cold storage each crop would otherwise be one synchronous read. Costs a syscall every ``window`` bytes."""

    def __init__(self, fd: int, window: int = READ_AHEAD) -> None:
        self.fd, self.window, self.asked = fd, window, 0

    def reach(self, offset: int) -> None:
        """The reader is at ``offset``: ask for up to ``offset + 2·window`` once less than ``window`` is ahead."""
        if offset + self.window > self.asked:
            end = offset + 2 * self.window
            os.posix_fadvise(self.fd, self.asked, end - self.asked, os.POSIX_FADV_WILLNEED)
            self.asked = end


def _read_located(url: str, faults: Faults, verified: Verified) -> Iterator[dict]:
    """read_shard of a verified local shard: its remembered layout replayed, or its tar headers, small members and
    wav headers read (and remembered when the whole shard was read); audio members located."""
    try:
        fd = os.open(local_path(url), os.O_RDONLY)
    except OSError as error:
        raise ShardUnavailable(f"{url}: cannot open this shard: {error}") from error
    failed = verified.shards[url]
    try:
        stat = os.fstat(fd)
        signature = (stat.st_size, stat.st_mtime_ns)
        remembered = verified.layouts.pop(url, None)  # put back once replayed; a changed file is read again
        verified.remembered -= len(remembered[1]) if remembered is not None else 0
        if remembered is not None and remembered[0] == signature:
            ahead = Readahead(fd)
            for key, members in remembered[1]:
                sample = {"__key__": key, "__url__": url, "__failed__": failed}
                for ext, value in members:
                    if isinstance(value, tuple):
                        ahead.reach(value[0])
                        sample[ext] = Located(fd, value[0], value[1], url, value[2])
                    else:
                        sample[ext] = value
                yield sample
            verified.layouts[url] = remembered
            verified.remembered += len(remembered[1])
            return
        layout = []
        for sample in _located_samples(fd, url, failed, verified.extension):
            layout.append((sample["__key__"], tuple(
                (ext, (value.offset, value.size, value.pcm) if isinstance(value, Located) else value)
                for ext, value in sample.items() if not ext.startswith("__"))))
            yield sample
        if verified.remembered + len(layout) <= verified.max_remembered:
            verified.layouts[url] = (signature, layout)
            verified.remembered += len(layout)
    except ValueError as error:  # read whole in an earlier pass, so the file changed since: as a damaged tail
        faults.damaged_shards += 1
        log.warning("%s: shard damaged, rest of it skipped: %s", url, error)
    except OSError as error:
        raise ShardUnavailable(f"{url}: read error: {error}") from error
    finally:
        os.close(fd)


def _located_samples(fd: int, url: str, failed: set[str], extension: str) -> Iterator[dict]:
    """A verified local shard's samples from its tar headers: small members read, ``extension`` members located
    with their PCM span (left to the parser, which names the member, when the wav header does not parse)."""
    sample: dict = {}
    for name, offset, size in iter_tar_offsets(fd):
        key, ext = split_member(name)
        if sample and sample["__key__"] != key:
            yield sample
            sample = {}
        sample["__key__"], sample["__url__"], sample["__failed__"] = key, url, failed
        if ext == extension:
            try:
                pcm = wav_pcm_at(fd, offset, size)
            except ValueError:
                pcm = None
            sample[ext] = Located(fd, offset, size, url, pcm)
        else:
            sample[ext] = os.pread(fd, size, offset)
    if sample:
        yield sample
