"""Audio I/O: decode files to mono int16 at the corpus rate, and encode/decode shard members.

Samples stay int16 on the CPU side of speakerid (half the bytes of float32, exact for 16-bit sources);
float conversion happens on the training device. Source wav/flac files are read and shard members encoded
with soundfile; flac shard members are decoded with dr_flac (miniaudio), 2.2–2.7× faster than libsndfile for a
training crop and bit-identical (a crop of a member without a crc32 still goes to libsndfile); VoxCeleb2's .m4a (AAC) with PyAV, or the ``ffmpeg`` program when PyAV is not
installed.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import struct
import subprocess
from pathlib import Path

import miniaudio
import numpy as np
import soundfile

from speakerid.errors import SpeakeridError

AUDIO_EXTENSIONS = (".wav", ".flac", ".m4a", ".ogg", ".opus", ".mp3", ".aac")
COMPRESSED_EXTENSIONS = (".m4a", ".aac", ".mp4")  # decoded with PyAV or ffmpeg, the rest with soundfile
ENCODINGS = ("flac", "wav")
MIN_SECONDS = 0.1  # shorter audio is refused by shardify (--min-seconds) and by evaluation: no speaker in it

M4A_HELP = (
    "decoding .m4a (AAC) needs PyAV or the ffmpeg program: `pip install 'speakerid-toolkit[m4a]'` "
    "(or `pip install av`), or put ffmpeg on PATH; or convert the files to wav/flac first"
)


class AudioError(SpeakeridError):
    """An audio file that cannot be used as it is: unreadable, wrong rate or channel count."""


class DecoderMissing(SpeakeridError):
    """No program or library here decodes this format: a property of the machine, not of one file."""


def m4a_decoder() -> str | None:
    """'av', 'ffmpeg', or None when neither PyAV nor the ffmpeg program is available."""
    try:
        import av  # noqa: F401  (optional extra)

        return "av"
    except ImportError:
        return "ffmpeg" if shutil.which("ffmpeg") and shutil.which("ffprobe") else None


def check_decoders(paths) -> None:
    """Fail before any work when the listed files need a decoder this machine lacks."""
    needing = next((p for p in paths if Path(p).suffix.lower() in COMPRESSED_EXTENSIONS), None)
    if needing is not None and m4a_decoder() is None:
        raise DecoderMissing(f"{needing}: {M4A_HELP}")


def read_audio(
    path: str | Path,
    sample_rate: int = 16000,
    *,
    resample: bool = False,
    downmix: bool = False,
    min_seconds: float = 0.0,
) -> np.ndarray:
    """Decode ``path`` to a 1-D int16 array at ``sample_rate``.

    A different rate is an error unless ``resample``; more than one channel is an error unless ``downmix``;
    fewer than ``min_seconds`` of audio, or a wav shorter than its header says, is an error.
    """
    path = Path(path)
    samples, rate = decode_file(path)
    if samples.shape[1] > 1:
        if not downmix:
            raise AudioError(f"{path}: {samples.shape[1]} channels, expected mono; pass --downmix to average them")
        samples = np.round(samples.astype(np.float64).mean(axis=1, keepdims=True)).astype(np.int16)
    mono = samples[:, 0]
    if rate != sample_rate:
        if not resample:
            raise AudioError(f"{path}: sample rate {rate} Hz, expected {sample_rate} Hz; pass --resample to convert")
        mono = resample_int16(mono, rate, sample_rate)
    if mono.size == 0:
        raise AudioError(f"{path}: no audio samples")
    if mono.size < min_seconds * sample_rate:
        raise AudioError(f"{path}: {mono.size / sample_rate:.3f} s of audio, shorter than the minimum {min_seconds} s")
    return np.ascontiguousarray(mono)


def decode_file(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode ``path`` as it is: int16 samples ``(n, channels)`` and the file's sample rate."""
    path = Path(path)
    try:
        if path.suffix.lower() in COMPRESSED_EXTENSIONS:
            return _decode_with_av_or_ffmpeg(path)
        return _decode_with_soundfile(path)
    except (AudioError, DecoderMissing):
        raise
    except (OSError, RuntimeError, ValueError, soundfile.LibsndfileError) as error:
        raise AudioError(f"{path}: cannot decode: {error}") from error


def resample_int16(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Polyphase resampling (scipy's windowed-sinc FIR), rounded and clipped back to int16."""
    from scipy.signal import resample_poly

    g = math.gcd(rate_in, rate_out)
    out = resample_poly(samples.astype(np.float64), rate_out // g, rate_in // g)
    return float_to_int16(out)


def float_to_int16(x: np.ndarray, scale: float = 1.0) -> np.ndarray:
    return np.clip(np.round(x * scale), -32768, 32767).astype(np.int16)


def _decode_with_soundfile(path: Path) -> tuple[np.ndarray, int]:
    if path.suffix.lower() == ".wav":
        _check_wav_complete(path)
    samples, rate = soundfile.read(str(path), dtype="int16", always_2d=True)
    return samples, rate


def _check_wav_complete(path: Path) -> None:
    """libsndfile silently reads a truncated wav (a copy cut short) as a shorter one: compare with its header."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if f.read(12)[8:12] != b"WAVE":
            return  # not RIFF/WAVE: soundfile says what it is
        position = 12
        while position + 8 <= size:
            f.seek(position)
            chunk = f.read(8)
            declared = int.from_bytes(chunk[4:8], "little")
            if chunk[:4] == b"data":
                held = size - position - 8
                if held < declared != 0xFFFFFFFF:  # 0xFFFFFFFF: written by a stream that could not seek back
                    raise AudioError(f"{path}: truncated: its header announces {declared} bytes of audio, the file "
                                     f"holds {held}; copy it again from the source")
                return
            position += 8 + declared + (declared & 1)


def _decode_with_av_or_ffmpeg(path: Path) -> tuple[np.ndarray, int]:
    decoder = m4a_decoder()
    if decoder is None:
        raise DecoderMissing(f"{path}: {M4A_HELP}")
    return _decode_with_av(path) if decoder == "av" else _decode_with_ffmpeg(path)


def _decode_with_av(path: Path) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioError(f"{path}: no audio stream")
            stream = container.streams.audio[0]
            planes = [frame.to_ndarray() for frame in container.decode(stream)]
            rate = stream.codec_context.sample_rate
    except av.FFmpegError as error:
        raise AudioError(f"{path}: cannot decode: {error}") from error
    if not planes:
        raise AudioError(f"{path}: no audio samples")
    # AAC decodes to planar float (channels, n); packed formats come as (1, n·channels).
    channels = stream.codec_context.channels if hasattr(stream.codec_context, "channels") else planes[0].shape[0]
    data = np.concatenate([p if p.shape[0] == channels else p.reshape(-1, channels).T for p in planes], axis=1)
    if np.issubdtype(data.dtype, np.floating):
        data = float_to_int16(data, 32768.0)
    else:
        data = data.astype(np.int16)
    return data.T, rate


def _decode_with_ffmpeg(path: Path) -> tuple[np.ndarray, int]:
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries", "stream=sample_rate,channels",
         "-of", "json", str(path)],
        capture_output=True, text=True,
    )
    if probe.returncode != 0:
        raise AudioError(f"{path}: ffprobe cannot read it: {probe.stderr.strip()}")
    streams = json.loads(probe.stdout).get("streams", [])
    if not streams:
        raise AudioError(f"{path}: no audio stream")
    rate, channels = int(streams[0]["sample_rate"]), int(streams[0]["channels"])
    decoded = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-f", "s16le", "-acodec", "pcm_s16le", "-"],
        capture_output=True,
    )
    if decoded.returncode != 0:
        raise AudioError(f"{path}: ffmpeg cannot decode it: {decoded.stderr.decode(errors='replace').strip()}")
    return np.frombuffer(decoded.stdout, dtype="<i2").reshape(-1, channels), rate


def encode(samples: np.ndarray, sample_rate: int, encoding: str) -> bytes:
    """int16 samples → the bytes of a shard member (``flac``, or ``wav`` 16-bit PCM)."""
    if encoding not in ENCODINGS:
        raise SpeakeridError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, sample_rate, format=encoding.upper(), subtype="PCM_16")
    return buffer.getvalue()


def wav_header(n_samples: int, sample_rate: int) -> bytes:
    """The 44-byte header ``encode(…, "wav")`` writes for ``n_samples`` of 16-bit PCM mono."""
    n_bytes = 2 * n_samples
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + n_bytes, b"WAVE", b"fmt ", 16, 1, 1, sample_rate,
                       2 * sample_rate, 2, 16, b"data", n_bytes)


def canonical_pcm(data: bytes, sample_rate: int) -> memoryview | None:
    """The PCM bytes of a wav file that ``read_audio`` would return unchanged, or None for anything else.

    Canonical: RIFF/WAVE, a plain PCM fmt chunk (format 1, not extensible) with 1 channel of 16 bits at
    ``sample_rate``, and a complete data chunk of whole samples. What follows the data chunk (a LIST chunk,
    trailing bytes) is left out, as libsndfile leaves it out. Anything else (other rates, stereo, 24-bit,
    float, a truncated or odd data chunk, a header it cannot follow) is None: decode it, which also gives the
    error such a file deserves.
    """
    view = memoryview(data)
    if len(view) < 12 or view[0:4] != b"RIFF" or view[8:12] != b"WAVE":
        return None
    riff_end = 8 + int.from_bytes(view[4:8], "little")  # a data chunk past it: let libsndfile judge the file
    fmt_ok, position = False, 12
    while position + 8 <= len(view):
        chunk, size = view[position:position + 4], int.from_bytes(view[position + 4:position + 8], "little")
        position += 8
        if chunk == b"fmt ":
            if size not in (16, 18) or position + 16 > len(view):
                return None
            tag, channels, rate, byte_rate, align, bits = struct.unpack_from("<HHIIHH", view, position)
            fmt_ok = (tag, channels, rate, byte_rate, align, bits) == (1, 1, sample_rate, 2 * sample_rate, 2, 16)
            if not fmt_ok:
                return None
        elif chunk == b"data":
            if not fmt_ok or size % 2 or position + size > min(len(view), riff_end):
                return None
            return view[position:position + size]
        position += size + (size & 1)
    return None


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """The bytes of a shard member (wav or flac) → (int16 samples, sample rate)."""
    if bytes(data[:4]) == b"fLaC":
        return flac_samples(data)
    samples, rate = soundfile.read(io.BytesIO(data), dtype="int16")
    return samples, rate


def flac_samples(data: bytes, start: int = 0, count: int | None = None) -> tuple[np.ndarray, int]:
    """Samples [start, start + count) of a mono 16-bit flac member (to its end when count is None), and its rate.

    Decoded by dr_flac through miniaudio's C bindings: it seeks to ``start`` and decodes only the frames the
    crop needs. libsndfile takes 1.06–1.12 ms for a 2-s crop on the reference machine, dr_flac 0.40–0.52 ms,
    with the same samples (benchmarks/README.md). Fewer samples than asked (a stream that ends early) is a
    ValueError, never a shortened array. dr_flac drops a frame that fails its CRC and goes on: a whole member
    then comes out short of its STREAMINFO length (an error), but a crop after that frame comes out shifted, so
    crops are cut with it only from bytes checked against their crc32 (``read_crop(…, verified=True)``)."""
    lib, ffi = miniaudio.lib, miniaudio.ffi
    source = ffi.from_buffer(data)
    flac = lib.ma_dr_flac_open_memory(source, len(source), ffi.NULL)
    if flac == ffi.NULL:
        raise ValueError("not a decodable flac stream")
    try:
        if flac.channels != 1 or flac.bitsPerSample != 16:
            raise ValueError(f"flac member is {flac.channels} channel(s) of {flac.bitsPerSample} bits, not 1 of 16")
        total = flac.totalPCMFrameCount
        if count is None:
            if total == 0:  # a stream that does not state its length (shardify's always do)
                raise ValueError("flac member does not state its length in its STREAMINFO")
            count = max(total - start, 0)
        if start and not lib.ma_dr_flac_seek_to_pcm_frame(flac, start):
            raise ValueError(f"flac member ends before sample {start}")
        samples = np.empty(count, dtype=np.int16)
        got = lib.ma_dr_flac_read_pcm_frames_s16(flac, count, ffi.from_buffer("ma_int16[]", samples))
        if got != count:
            raise ValueError(f"flac member decodes to {start + got} samples where {start + count} were asked "
                             "(it ends early or a frame fails its CRC)")
        return samples, flac.sampleRate
    finally:
        lib.ma_dr_flac_close(flac)


# ------------------------------------------------------------------------------------------------ crops
# A training crop is L = max_frames·160 + 240 samples. As in voxceleb_trainer, a file shorter than L is
# first wrap-padded to L + 1 samples, and the crop starts at int(u · (len − L)) for u uniform in [0, 1).


def crop_start(n_samples: int, crop_samples: int, u: float) -> int:
    """The seeds' crop start for a file of ``n_samples`` (after wrap-padding) and a uniform draw ``u``."""
    padded = max(n_samples, crop_samples + 1)
    return int(u * (padded - crop_samples))


def wrap_pad(samples: np.ndarray, crop_samples: int) -> np.ndarray:
    if len(samples) > crop_samples:
        return samples
    return np.pad(samples, (0, crop_samples + 1 - len(samples)), mode="wrap")


def wav_data_span(head: bytes | memoryview, size: int) -> tuple[int, int] | None:
    """(byte offset, byte length) of the 16-bit PCM in a RIFF/WAVE member of ``size`` bytes beginning with
    ``head``; None when its chunks before the data run past ``head`` (read more of the member)."""
    view = memoryview(head)
    if len(view) < 12 or bytes(view[0:4]) != b"RIFF" or bytes(view[8:12]) != b"WAVE":
        raise ValueError("not a RIFF/WAVE member")
    position = 12
    while position + 8 <= size:
        if position + 24 > len(view) and len(view) < size:
            return None
        chunk, length = bytes(view[position:position + 4]), int.from_bytes(view[position + 4:position + 8], "little")
        position += 8
        if chunk == b"fmt ":
            audio_format, _, _, _, _, bits = np.frombuffer(view[position:position + 16], dtype="<u2", count=8)[[0, 1, 2, 3, 6, 7]]
            if audio_format != 1 or bits != 16:
                raise ValueError("wav member is not 16-bit PCM")
        elif chunk == b"data":
            end = min(position + length, size)
            end -= (end - position) % 2
            return position, end - position
        position += length + (length & 1)
    raise ValueError("wav member has no data chunk")


def wav_pcm(data: bytes | memoryview) -> memoryview:
    """The 16-bit PCM payload of a RIFF/WAVE member as an int16 view, without copying or decoding."""
    view = memoryview(data)
    start, length = wav_data_span(view, len(view))
    pcm = view[start:start + length]
    return pcm.cast("h") if np.little_endian else np.frombuffer(pcm, "<i2")


def read_crop(data: bytes, encoding: str, n_samples: int, crop_samples: int, u: float, *,
              verified: bool = False) -> np.ndarray:
    """Decode only the crop of a shard member: wav slices the PCM, flac seeks. Returns int16 (crop_samples,).

    A flac member whose bytes were ``verified`` against their crc32 is decoded by dr_flac (:func:`flac_samples`),
    any other by libsndfile, which stops at a damaged frame where dr_flac would skip it."""
    start = crop_start(n_samples, crop_samples, u)
    if n_samples <= crop_samples:  # short file: decode it whole, wrap-pad, then crop
        whole = np.asarray(wav_pcm(data)) if encoding == "wav" else decode(data)[0]
        return wrap_pad(whole, crop_samples)[start:start + crop_samples].copy()
    if encoding == "wav":
        pcm = wav_pcm(data)
        if len(pcm) < start + crop_samples:
            raise ValueError(f"wav member holds {len(pcm)} samples, its json says {n_samples}")
        return np.array(pcm[start:start + crop_samples], dtype=np.int16)
    if verified:
        return flac_samples(data, start, crop_samples)[0]
    with soundfile.SoundFile(io.BytesIO(data)) as f:
        f.seek(start)
        crop = f.read(crop_samples, dtype="int16")
    if len(crop) != crop_samples:
        raise ValueError(f"flac member decodes to fewer samples than its json says ({n_samples})")
    return crop


def wav_pcm_at(fd: int, offset: int, size: int) -> tuple[int, int]:
    """(file offset, byte length) of the 16-bit PCM of the wav member lying at ``offset`` in the open file ``fd``,
    from its header alone (the whole member is read only when its chunks before the audio pass 4 kB)."""
    span = wav_data_span(os.pread(fd, min(size, 4096), offset), size)
    if span is None:
        span = wav_data_span(os.pread(fd, size, offset), size)
        if span is None:
            raise ValueError("wav member is cut short before its audio: the shard is shorter than its header says")
    return offset + span[0], span[1]


def read_wav_crop_at(fd: int, offset: int, size: int, n_samples: int, crop_samples: int, u: float,
                     pcm: tuple[int, int] | None = None) -> np.ndarray:
    """:func:`read_crop` of a wav member lying at ``offset`` in the open file ``fd``, reading only its header and
    the crop's bytes (the whole member when it is shorter than the crop); only the crop's bytes when its ``pcm``
    span (:func:`wav_pcm_at`) is known. Same crop, same errors."""
    if n_samples <= crop_samples:
        return read_crop(os.pread(fd, size, offset), "wav", n_samples, crop_samples, u)
    pcm_offset, pcm_bytes = pcm or wav_pcm_at(fd, offset, size)
    start = crop_start(n_samples, crop_samples, u)
    if pcm_bytes // 2 < start + crop_samples:
        raise ValueError(f"wav member holds {pcm_bytes // 2} samples, its json says {n_samples}")
    crop = np.empty(crop_samples, dtype="<i2")
    if os.preadv(fd, [crop], pcm_offset + 2 * start) != 2 * crop_samples:
        raise ValueError("wav member ends before its crop: the shard is shorter than its header says")
    return crop.astype(np.int16, copy=False)
