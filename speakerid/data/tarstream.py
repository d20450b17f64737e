"""A lean reader of POSIX tar streams: (name, bytes) of each regular member, in order.

Python's ``tarfile`` in stream mode (what webdataset iterates with) reads 10 kB records, re-joins them and
parses every header field in Python: about 0.08 ms an utterance, the largest cost of streaming wav shards
(benchmarks/README.md). Shards need much less: one 512-byte header read, its checksum, the size, one payload
read, the padding skipped. GNU long names (``L``) and pax ``path`` records are honoured; other member types
(directories, links) are skipped. A damaged header or a short read raises :class:`TarError`.
"""

from __future__ import annotations

import os
from typing import BinaryIO, Iterator

BLOCK = 512


class TarError(ValueError):
    """The stream is not a well-formed tar from this point on (truncated, or a header fails its checksum)."""


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    while len(data) < n:  # pipes and sockets may return short reads
        more = stream.read(n - len(data))
        if not more:
            raise TarError(f"truncated: wanted {n} bytes, the stream ended after {len(data)}")
        data += more
    return data


def _number(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    text = field.rstrip(b"\0 ").strip()
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header ("LEN key=value\\n" records)."""
    position = 0
    while position < len(data):
        space = data.index(b" ", position)
        length = int(data[position:space])
        key, _, value = data[space + 1:position + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        position += length
    return None


def _header(header: bytes) -> tuple[bytes, int, str]:
    """(type flag, payload size, name in the header's own fields) of one checked 512-byte header."""
    stored = _number(header[148:156])
    if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
        raise TarError("header checksum mismatch: the shard is damaged here")
    name = header[:100].rstrip(b"\0").decode("utf-8")
    prefix = header[345:500].rstrip(b"\0") if header[257:262] == b"ustar" else b""
    if prefix:
        name = prefix.decode("utf-8") + "/" + name
    return header[156:157], _number(header[124:136]), name


def _named(kind: bytes, data: bytes, long_name: str | None) -> tuple[bool, str | None]:
    """(is this a member to yield, the long name carried to the next header) for GNU ``L`` and pax headers."""
    if kind == b"L":
        return False, data.rstrip(b"\0").decode("utf-8")
    if kind in (b"x", b"g"):
        return False, _pax_path(data) or long_name
    if kind not in (b"0", b"\0", b"7"):
        return False, None
    return True, long_name


def iter_tar(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    long_name: str | None = None
    while True:
        header = stream.read(BLOCK)
        if not header:
            return  # a stream that ends without the two zero blocks: accepted, as tar(1) does
        if len(header) < BLOCK:
            header += _read_exact(stream, BLOCK - len(header))
        if header == bytes(BLOCK):
            return  # end-of-archive marker
        kind, size, name = _header(header)
        data = _read_exact(stream, size)
        padding = -size % BLOCK
        if padding:
            _read_exact(stream, padding)
        member, long_name = _named(kind, data, long_name)
        if member:
            yield (name if long_name is None else long_name), data
            long_name = None


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) < n:
        raise TarError(f"truncated: wanted {n} bytes at offset {offset}, the file ends after {len(data)}")
    return data


def iter_tar_offsets(fd: int) -> Iterator[tuple[str, int, int]]:
    """(name, offset of its data, size) of each regular member of a local tar file, reading only the headers.

    Random access for a reader that wants a part of a member (a crop of a wav): the payloads are not read.
    """
    long_name: str | None = None
    position = 0
    while True:
        header = os.pread(fd, BLOCK, position)
        if not header:
            return
        if len(header) < BLOCK:
            raise TarError(f"truncated: a header at offset {position} ends after {len(header)} bytes")
        if header == bytes(BLOCK):
            return
        kind, size, name = _header(header)
        offset = position + BLOCK
        position = offset + size + (-size % BLOCK)
        data = _pread_exact(fd, size, offset) if kind in (b"L", b"x", b"g") else b""
        member, long_name = _named(kind, data, long_name)
        if member:
            yield (name if long_name is None else long_name), offset, size
            long_name = None
