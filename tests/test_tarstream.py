"""The lean tar reader against Python's tarfile, on GNU, pax and ustar archives."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest

from speakerid.data.tarstream import TarError, iter_tar, iter_tar_offsets


def _archive(fmt: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    rng = np.random.default_rng(fmt)
    members = [(f"id{i:05d}/video/{i:05d}.{ext}", rng.bytes(int(rng.integers(0, 3000))))
               for i in range(20) for ext in ("flac", "json")]
    members.append(("x" * 150 + "/long-name.wav", b"long"))  # beyond the 100-byte name field
    members.append(("empty.json", b""))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("a-directory"), None) if fmt != tarfile.USTAR_FORMAT else None
        for name, data in members:
            if fmt == tarfile.USTAR_FORMAT and len(name) > 100:
                name = "p" * 60 + "/" + "n" * 60  # ustar splits long paths into prefix + name
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    expected = [(m.name, tarfile.open(fileobj=io.BytesIO(buffer.getvalue())).extractfile(m).read())
                for m in tarfile.open(fileobj=io.BytesIO(buffer.getvalue())) if m.isfile()]
    return buffer.getvalue(), expected


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_members_equal_tarfile(fmt):
    data, expected = _archive(fmt)
    assert list(iter_tar(io.BytesIO(data))) == expected


class _Trickle(io.RawIOBase):
    """A pipe-like stream that returns at most 7 bytes a read."""

    def __init__(self, data: bytes) -> None:
        self.data, self.position = data, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        chunk = self.data[self.position:self.position + min(7, n if n >= 0 else 7)]
        self.position += len(chunk)
        return chunk


def test_short_reads_are_completed():
    data, expected = _archive(tarfile.GNU_FORMAT)
    assert list(iter_tar(_Trickle(data))) == expected


def test_truncation_and_damage_are_errors():
    data, _ = _archive(tarfile.GNU_FORMAT)
    with pytest.raises(TarError, match="truncated"):
        list(iter_tar(io.BytesIO(data[: len(data) // 2 + 100])))
    damaged = bytearray(data)
    damaged[10] ^= 0xFF  # inside the name field of the first header
    with pytest.raises(TarError, match="checksum"):
        list(iter_tar(io.BytesIO(bytes(damaged))))


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_offsets_of_a_local_file_locate_every_member(fmt, tmp_path):
    data, expected = _archive(fmt)
    path = tmp_path / "shard.tar"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        found = [(name, data[offset:offset + size]) for name, offset, size in iter_tar_offsets(fd)]
    finally:
        os.close(fd)
    assert found == expected
