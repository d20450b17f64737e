"""Crop-only wav reads, A/B in one process: speakerid's reader (workers = 0) in passes 1–2 of one stream, with
local wav shards read whole every pass (the previous path: ``Verified.located`` patched to False) and read crop
by crop after their first, crc32-checked pass; alternated ``repeats`` times in the same run.

    python benchmarks/loader_crop_reads.py CORPUS_DIR [repeats]
"""

import os
import sys
import time
from pathlib import Path

from common import pack_shards, train_corpus

from speakerid.data import shardio
from speakerid.data.batch_config import BatchConfig
from speakerid.data.batches import TrainStream
from speakerid.data.shardset import ShardSet


def main() -> None:
    corpus = train_corpus(Path(sys.argv[1]), 300, 16, min_seconds=2.0, max_seconds=8.0)
    shards = ShardSet.open(pack_shards(corpus, "wav", 4, 32))
    config = BatchConfig(n_speakers=100, utts_per_speaker=2)
    located = shardio.Verified.located
    for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 2):
        for mode in ("whole", "crops"):
            shardio.Verified.located = located if mode == "crops" else (lambda self, url: False)
            batches = TrainStream(shards, config, 0, 1).batches()
            batch = next(batches)
            while batch["pass"] < 1:
                batch = next(batches)
            start, n = time.perf_counter(), 0
            while batch["pass"] < 3:
                batch, n = next(batches), n + 1
            seconds = time.perf_counter() - start
            print(f"{mode}: passes 1-2, {n} batches, {n * config.n_speakers * config.utts_per_speaker / seconds:.0f} "
                  f"crops/s, load {os.getloadavg()[0]:.1f}", flush=True)
    shardio.Verified.located = located


if __name__ == "__main__":
    main()
