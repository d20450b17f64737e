"""Writing one planned shard: decode each utterance, encode it, tar it, and rename the tar into place when whole.

A canonical wav input (16-bit PCM mono at the corpus rate, see :func:`~speakerid.audio.canonical_pcm`) is not
decoded: its PCM bytes are the samples, and for wav shards its bytes (re-headered when its header is not the
44 bytes ``encode`` writes) are the member, byte for byte what decoding and re-encoding would give.
A shard is written to a hidden temporary name, hashed while it is written, fsynced, its stats stored in
``.shardify/<name>.json``, and only then renamed to ``<name>.tar``: a ``.tar`` that exists is complete. Writing
(:func:`start_shard`) and making durable (:func:`finish_shard`) are two steps, so the fsync of one shard runs in a
thread of the packing process while the next shard is written (``speakerid.data.pool``).
Shards are bit-reproducible (fixed member times and owners), so a resumed run, a run with other
``--workers`` and a ``--part``/``merge`` run all produce the same shards. Undecodable inputs are collected,
not raised, so that one run names every bad file.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import tarfile
import threading
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from speakerid.audio import AudioError, canonical_pcm, encode, read_audio, wav_header
from speakerid.data.index import STATE_DIR, write_json_atomic
from speakerid.data.plan import Item, PackConfig

Progress = Callable[[int, int], None]  # (utterances, input bytes) just finished

# SIGINT/SIGTERM set this flag and the writers stop at the next utterance. A KeyboardInterrupt raised by
# the default handler can land inside soundfile's cffi callbacks, where cffi swallows it and packing goes on.
stop_requested = threading.Event()


def request_stop(signum, frame) -> None:
    stop_requested.set()


@contextmanager
def stop_on_signals():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stop_requested.clear()
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


WRITEBACK_BYTES = 8 * 1024**2  # start writing the shard to disk every this many bytes


def _writeback_starter():
    """Linux's ``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)``: start writing a range to disk and return
    at once, so the disk works while the next members are read and the shard's fsync waits for its tail only.
    None where there is none; the fsync alone then does it all (it is the guarantee either way)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):  # TypeError: no CDLL(None) (Windows)
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


_start_writeback = _writeback_starter()


class _ShardTar:
    """The bytes webdataset's ``TarWriter(user=group="speakerid", mode=0o444, mtime=0)`` writes, hashed and counted.

    Each member goes out as its header, its bytes and its padding (tarfile's stream mode cuts every member into
    10 kB writes); a test holds the output byte-identical to webdataset's. Every ``WRITEBACK_BYTES`` the written
    range is handed to the disk (:func:`_writeback_starter`).
    """

    def __init__(self, f):
        self.f, self.sha256, self.bytes, self.handed = f, hashlib.sha256(), 0, 0

    def _write(self, data) -> None:
        self.sha256.update(data)
        self.bytes += len(data)
        self.f.write(data)

    def write(self, sample: dict) -> None:
        """``{"__key__": key, ext: bytes, …}`` → members ``key.ext`` in sorted order, as webdataset writes them."""
        key = sample["__key__"]
        for ext in sorted(k for k in sample if not k.startswith("_")):
            data = sample[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "speakerid", "speakerid"
            self._write(info.tobuf())
            self._write(data)
            if len(data) % tarfile.BLOCKSIZE:
                self._write(tarfile.NUL * (tarfile.BLOCKSIZE - len(data) % tarfile.BLOCKSIZE))
        if _start_writeback is not None and self.bytes - self.handed >= WRITEBACK_BYTES:
            self.f.flush()
            _start_writeback(self.f.fileno(), self.handed, self.bytes - self.handed, 2)  # 2: SYNC_FILE_RANGE_WRITE
            self.handed = self.bytes

    def close(self) -> None:
        """The end-of-archive blocks and the padding to a whole record, as tarfile writes them."""
        self._write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        if self.bytes % tarfile.RECORDSIZE:
            self._write(tarfile.NUL * (tarfile.RECORDSIZE - self.bytes % tarfile.RECORDSIZE))


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


class _InputBuffer:
    """Reads each input file into one reused buffer: a fresh ``bytes`` a file costs its pages' faults and zeroing,
    as much again as reading it. A view stays valid until the next read (a larger file gets a new buffer)."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def read(self, path: Path) -> memoryview | bytes:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size >= len(self.buffer):
                self.buffer = bytearray(max(size + 1, 2 * len(self.buffer)))
            view, n = memoryview(self.buffer), 0
            while got := f.readinto(view[n:]):
                n += got
            if n == len(view):  # the file grew past its size while read: the rest as bytes
                return bytes(view) + f.read()
            return view[:n]


def _read(path: Path, config: PackConfig, buffer: _InputBuffer) -> tuple[np.ndarray, memoryview | bytes | None]:
    """The utterance as int16 samples, and the file's bytes when it is canonical wav (then nothing is decoded)."""
    if path.suffix.lower() == ".wav":
        try:
            data = buffer.read(path)
        except OSError:
            data = None  # read_audio below names the problem
        pcm = canonical_pcm(data, config.sample_rate) if data is not None else None
        n = len(pcm) // 2 if pcm is not None else 0
        if n and n >= config.shortest * config.sample_rate:  # else read_audio refuses it with today's message
            return np.frombuffer(pcm, "<i2").astype(np.int16, copy=False), data
    return read_audio(path, config.sample_rate, resample=config.resample, downmix=config.downmix,
                      min_seconds=config.shortest), None


def _encode(audio: np.ndarray, data: memoryview | bytes | None, config: PackConfig) -> memoryview | bytes:
    """The member's bytes: a canonical wav's own bytes (re-headered if need be) for wav shards, else encoded."""
    if data is None or config.encoding != "wav":
        return encode(audio, config.sample_rate, config.encoding)
    header = wav_header(len(audio), config.sample_rate)
    if len(data) == len(header) + 2 * len(audio) and data[:len(header)] == header:
        return data
    return header + audio.astype("<i2", copy=False).tobytes()


@dataclass
class WrittenShard:
    """A shard whose bytes are all in its temporary file, neither durable nor in place yet (:func:`finish_shard`,
    in any process: a pack worker hands it to its parent); ``tmp`` is None for a shard not kept (bad inputs
    without --skip-bad), whose result says so."""
    out_dir: Path
    tmp: Path | None
    result: ShardResult


def start_shard(job: ShardJob, progress: Progress | None = None) -> WrittenShard:
    """Write the shard's tar to a temporary name (not yet fsynced) and count what it holds; :func:`finish_shard`
    makes it durable and puts it in place. Split so the CPU can write the next shard while the disk works."""
    config = job.config
    tmp = job.out_dir / f".{job.name}.tmp-{os.getpid()}"
    bad: list[dict] = []
    n_samples = duration = input_bytes = 0
    speakers, chunks = set(), set()
    per_label: dict[int, int] = {}
    keys: list[str] = []
    buffer = _InputBuffer()
    try:
        with open(tmp, "wb", buffering=1 << 20) as f:
            tar = _ShardTar(f)
            for item in job.items:
                if stop_requested.is_set():
                    raise KeyboardInterrupt
                path = job.root / item.src
                data = None
                try:
                    audio, data = _read(path, config, buffer)
                except AudioError as error:
                    bad.append({"src": item.src, "reason": str(error).removeprefix(f"{path}: ")})
                    continue
                finally:
                    size = len(data) if data is not None else path.stat().st_size if path.exists() else 0
                    input_bytes += size
                    if progress:
                        progress(1, size)
                if bad and not job.skip_bad:
                    continue  # this shard will not be kept: only look for more bad files
                encoded = _encode(audio, data, config)
                meta = {**_metadata(item, len(audio), config), "crc32": zlib.crc32(encoded)}  # readers check it
                tar.write({"__key__": item.key, config.encoding: encoded,
                           "json": json.dumps(meta, sort_keys=True).encode()})
                n_samples += 1
                duration += len(audio)
                speakers.add(item.spk)
                chunks.add(item.chunk)
                per_label[item.label] = per_label.get(item.label, 0) + 1
                keys.append(item.key)
            tar.close()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if bad and not job.skip_bad:
        tmp.unlink()
        return WrittenShard(job.out_dir, None, ShardResult(job.name, False, None, bad, input_bytes))
    stats = {
        "name": job.name, "bytes": tar.bytes, "sha256": tar.sha256.hexdigest(), "samples": n_samples,
        "chunks": len(chunks) if config.kind == "train" else n_samples, "speakers": len(speakers),
        "duration": round(duration / config.sample_rate, 3), "skipped": bad,
    }
    if config.kind == "train":  # lets a reader size an epoch (tuples per speaker) from the index alone
        stats["labels"] = {str(label): n for label, n in sorted(per_label.items())}
    else:
        stats["keys"] = keys
    return WrittenShard(job.out_dir, tmp, ShardResult(job.name, True, stats, bad, input_bytes))


def finish_shard(written: WrittenShard) -> ShardResult:
    """fsync the shard's temporary, store its stats, then rename it to its name: a ``.tar`` that exists is complete.
    (fsync of any descriptor of a file flushes the file's written pages: Linux's fsync(2).)"""
    if written.tmp is None:
        return written.result
    try:
        fd = os.open(written.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        name = written.result.name
        write_json_atomic(written.out_dir / STATE_DIR / f"{name}.json", written.result.stats)
        os.replace(written.tmp, written.out_dir / name)
        return written.result
    finally:
        written.tmp.unlink(missing_ok=True)
