"""shardify's writer: canonical wav passes through undecoded with the same shards, everything else is decoded."""

from __future__ import annotations

import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import webdataset as wds

import speakerid.data.writer as writer
from speakerid.audio import canonical_pcm, encode, read_audio, wav_header
from speakerid.data.index import load_index
from speakerid.data.lists import read_train_list
from speakerid.data.pack import pack
from speakerid.data.plan import PackConfig, make_plan
from speakerid.errors import SpeakeridError

RATE = 16000


def _tone(n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 3000).astype(np.int16)


def _chunk(tag: bytes, payload: bytes) -> bytes:
    return tag + struct.pack("<I", len(payload)) + payload + b"\0" * (len(payload) & 1)


def _riff(*chunks: bytes) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _fmt(rate: int = RATE, channels: int = 1, bits: int = 16, extra: bytes = b"") -> bytes:
    align = channels * bits // 8
    return _chunk(b"fmt ", struct.pack("<HHIIHH", 1, channels, rate, rate * align, align, bits) + extra)


def _soundfile_wav(samples: np.ndarray, rate: int = RATE, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def canonical_variants() -> dict[str, bytes]:
    """16-bit PCM mono 16 kHz wav files that differ from what shardify writes only around the samples."""
    a, b, c, d, e = (_tone(RATE + 320 * i, i) for i in range(5))
    return {
        "plain.wav": _soundfile_wav(a),  # exactly encode()'s bytes: copied as they are
        "list_after.wav": _riff(_fmt(), _chunk(b"data", b.tobytes()), _chunk(b"LIST", b"INFOISFT\x03\0\0\0ab\0")),
        "junk_before.wav": _riff(_chunk(b"JUNK", b"xyz"), _fmt(), _chunk(b"data", c.tobytes())),
        "fmt18.wav": _riff(_fmt(extra=b"\0\0"), _chunk(b"data", d.tobytes())),
        "trailing.wav": _riff(_fmt(), _chunk(b"data", e.tobytes())) + b"\0\0\0\0\0\0\0\0",
    }


def other_variants() -> dict[str, bytes]:
    """wav files that must be decoded (resampled, down-mixed, converted): never passed through."""
    x = _tone(RATE, 9)
    return {
        "rate8k.wav": _soundfile_wav(x, rate=8000),
        "stereo.wav": _soundfile_wav(np.stack([x, x // 2], axis=1)),
        "pcm24.wav": _soundfile_wav(x, subtype="PCM_24"),
        "float.wav": _soundfile_wav(x.astype(np.float32) / 32768, subtype="FLOAT"),
        "extensible.wav": _soundfile_wav(x, fmt="WAVEX"),
    }


def _corpus(root: Path, files: dict[str, bytes]) -> Path:
    lines = []
    for i, (name, data) in enumerate(sorted(files.items())):
        path = root / f"spk{i % 2}" / "v" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        lines.append(f"spk{i % 2} {path.relative_to(root)}")
    listed = root.parent / f"{root.name}.txt"
    listed.write_text("\n".join(lines) + "\n")
    return listed


def _pack(listed: Path, root: Path, out: Path, encoding: str, **config) -> dict[str, bytes]:
    plan = make_plan(read_train_list(listed), root, PackConfig(encoding=encoding, chunk_size=1, shard_size=80_000,
                                                               **config))
    pack(plan, root, out)
    return {name: (out / name).read_bytes() for name in plan.names}


@pytest.fixture
def decoded(monkeypatch):
    """Records every file the writer decodes."""
    paths: list[str] = []

    def spy(path, *args, **kwargs):
        paths.append(Path(path).name)
        return read_audio(path, *args, **kwargs)

    monkeypatch.setattr(writer, "read_audio", spy)
    return paths


@pytest.mark.parametrize("encoding", ["wav", "flac"])
def test_canonical_wav_is_not_decoded_and_gives_the_shards_decoding_gives(tmp_path, monkeypatch, decoded, encoding):
    root = tmp_path / "root"
    listed = _corpus(root, canonical_variants())
    passed = _pack(listed, root, tmp_path / "pass", encoding)
    assert decoded == []  # every file was canonical: nothing went through libsndfile
    assert len(passed) > 1

    monkeypatch.setattr(writer, "canonical_pcm", lambda data, rate: None)  # today's path: decode, re-encode
    reference = _pack(listed, root, tmp_path / "decode", encoding)
    assert sorted(decoded) == sorted(canonical_variants())
    assert passed == reference  # byte for byte: members, json (samples, crc32), tar headers
    strip = lambda index: {k: v for k, v in index.items() if k != "created"}  # noqa: E731
    assert strip(load_index(tmp_path / "pass")) == strip(load_index(tmp_path / "decode"))


def test_other_wav_is_decoded_as_before(tmp_path, decoded):
    root = tmp_path / "root"
    files = {**other_variants(), **dict(list(canonical_variants().items())[:1])}
    listed = _corpus(root, files)
    shards = _pack(listed, root, tmp_path / "out", "wav", resample=True, downmix=True)
    assert sorted(decoded) == sorted(other_variants())
    members = {}
    for shard in shards.values():
        with tarfile.open(fileobj=io.BytesIO(shard)) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".wav")})
    assert len(members) == len(files)
    for member in members.values():  # every member is canonical whatever its source was
        assert canonical_pcm(member, RATE) is not None and member[:44] == wav_header((len(member) - 44) // 2, RATE)


def test_canonical_pcm_accepts_only_what_decoding_leaves_unchanged():
    for name, data in canonical_variants().items():
        pcm = canonical_pcm(data, RATE)
        assert pcm is not None, name
        np.testing.assert_array_equal(np.frombuffer(pcm, "<i2"), soundfile.read(io.BytesIO(data), dtype="int16")[0])
    for name, data in other_variants().items():
        assert canonical_pcm(data, RATE) is None, name
    plain = canonical_variants()["plain.wav"]
    assert canonical_pcm(plain, 8000) is None  # another corpus rate
    assert canonical_pcm(plain[:-2], RATE) is None  # truncated: decoding names it
    assert canonical_pcm(_riff(_fmt(), _chunk(b"data", b"\1\2\3")), RATE) is None  # half a sample
    assert canonical_pcm(b"RIFF\0\0\0\0WAVEfmt ", RATE) is None
    assert canonical_pcm(_riff(_chunk(b"data", b"\0\0"), _fmt()), RATE) is None  # data before fmt
    short_riff = bytearray(plain)
    short_riff[4:8] = struct.pack("<I", 36)  # the RIFF chunk ends where the samples begin
    assert canonical_pcm(bytes(short_riff), RATE) is None


def test_wav_header_is_the_header_encode_writes():
    for n in (1, 2, 1601, 48000):
        x = _tone(n, n)
        assert encode(x, RATE, "wav") == wav_header(n, RATE) + x.tobytes()


def test_truncated_canonical_wav_is_still_reported_by_name(tmp_path, decoded):
    root = tmp_path / "root"
    whole = canonical_variants()["plain.wav"]
    listed = _corpus(root, {"cut.wav": whole[: len(whole) // 2], "ok.wav": whole})
    with pytest.raises(SpeakeridError, match=r"cut\.wav: truncated: its header announces"):
        _pack(listed, root, tmp_path / "out", "wav")
    assert "cut.wav" in decoded and "ok.wav" not in decoded


def test_shard_tar_writes_the_bytes_webdatasets_tar_writer_writes(tmp_path):
    samples = [{"__key__": "id1/v/0001", "wav": b"x" * 512, "json": b"{}"},
               {"__key__": "id1/v/0002", "wav": b"y" * 1000, "json": b'{"a": 1}'},
               {"__key__": "id\u00e9/v/long-" + "n" * 120, "flac": b"", "json": b"z" * 10241}]
    expected = io.BytesIO()
    with wds.TarWriter(expected, user="speakerid", group="speakerid", mode=0o444, mtime=0) as tar:
        for sample in samples:
            tar.write(sample)
    with open(tmp_path / "t.tar", "wb") as f:
        ours = writer._ShardTar(f)
        for sample in samples:
            ours.write(sample)
        ours.close()
    written = (tmp_path / "t.tar").read_bytes()
    assert written == expected.getvalue()
    assert ours.bytes == len(written)


def test_a_shard_is_handed_to_the_disk_while_it_is_written_and_stays_the_same(tmp_path, monkeypatch):
    root = tmp_path / "root"
    listed = _corpus(root, canonical_variants())
    reference = _pack(listed, root, tmp_path / "whole", "wav")
    handed: list[tuple[int, int]] = []
    real = writer._start_writeback
    if real is None:
        pytest.skip("no sync_file_range here (not Linux): the shard's fsync does it all")

    def spy(fd, offset, n, flags):
        handed.append((offset, n))
        return real(fd, offset, n, flags)

    monkeypatch.setattr(writer, "_start_writeback", spy)
    monkeypatch.setattr(writer, "WRITEBACK_BYTES", 1)  # after every utterance
    assert _pack(listed, root, tmp_path / "handed", "wav") == reference
    assert len(handed) == len(canonical_variants())
    assert handed[0][0] == 0 and all(n > 0 for _, n in handed)
    assert all(b in (0, a + n) for (a, n), (b, _) in zip(handed, handed[1:]))  # contiguous, from 0 in each shard
