"""flac decoding, libsndfile (soundfile) against dr_flac (miniaudio), on the same members in one process.

    python benchmarks/flac_decode.py [--calls 300] [--seconds 5] [--json OUT]

For each case, the best of three rounds of ``calls`` calls, alternated: a training crop (L = 32,240 samples at a
random start: open, seek, decode the crop) and a whole member, through ``speakerid.audio`` as the reader calls
it (``read_crop(…, verified=False)`` is libsndfile, ``verified=True`` dr_flac; ``decode``) against
``soundfile.read``; the samples are compared first. Members: speech-like (voiced bursts, pauses, noise) and a
random walk (harder to predict: more bits a sample, slower to decode), 16 kHz mono 16-bit, written by shardify's
encoder.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import soundfile

import checkout  # noqa: F401 (this checkout's speakerid first on sys.path)
from speakerid.audio import crop_start, decode, encode, read_crop

RATE, L = 16000, 32240


def members(seconds: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    speech = 6000 * np.sin(2 * np.pi * 140 * t) * (np.sin(2 * np.pi * 3 * t) > 0) + rng.normal(0, 300, n)
    speech[n // 3:n // 3 + RATE // 4] = 0
    walk = np.cumsum(rng.standard_normal(n)) * 20
    walk -= np.convolve(walk, np.ones(50) / 50, "same")
    return {name: np.clip(x, -32768, 32767).astype(np.int16) for name, x in (("speech-like", speech), ("random walk", walk))}


def per_call_ms(fn, calls: int) -> float:
    start = time.perf_counter()
    for k in range(calls):
        fn(k)
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each member")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    n = int(args.seconds * RATE)
    us = np.random.default_rng(1).uniform(0, 1, max(args.calls, 5)).tolist()
    rows = []
    for name, samples in members(args.seconds).items():
        data = encode(samples, RATE, "flac")
        cases = {
            "crop": (lambda k: read_crop(data, "flac", n, L, us[k]),
                     lambda k: read_crop(data, "flac", n, L, us[k], verified=True)),
            "whole": (lambda k: soundfile.read(io.BytesIO(data), dtype="int16")[0], lambda k: decode(data)[0]),
        }
        for case, (libsndfile, dr_flac) in cases.items():
            for k in range(5):  # same samples, and each side warmed
                expected = samples if case == "whole" else samples[crop_start(n, L, us[k]):][:L]
                assert np.array_equal(libsndfile(k), expected) and np.array_equal(dr_flac(k), expected), (name, case)
            rounds = [(per_call_ms(libsndfile, args.calls), per_call_ms(dr_flac, args.calls)) for _ in range(3)]
            base, fast = min(r[0] for r in rounds), min(r[1] for r in rounds)
            rows.append({"member": name, "case": case, "bytes": len(data), "libsndfile_ms": base, "dr_flac_ms": fast,
                         "ratio": base / fast})
            print(f"{name:12s} {case:6s} {len(data) / 1e3:6.1f} kB  libsndfile {base:.3f} ms  dr_flac {fast:.3f} ms  "
                  f"{base / fast:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds": args.seconds, "calls": args.calls, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
