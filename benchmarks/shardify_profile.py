"""Where shardify's writer spends its time: cProfile of ``pack(…, workers=1)`` in this process, largest self times.

    python benchmarks/shardify_profile.py [--corpus DIR] [--speakers 60 --utts 20] [--encoding wav] [--top 18]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import tempfile
import time
from pathlib import Path

from common import train_corpus

from speakerid.data.pack import pack
from speakerid.data.plan import PackConfig, make_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, help="reuse/create the synthetic corpus here (default: a temp dir)")
    parser.add_argument("--speakers", type=int, default=60)
    parser.add_argument("--utts", type=int, default=20)
    parser.add_argument("--encoding", default="wav", choices=["wav", "flac"])
    parser.add_argument("--top", type=int, default=18)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="shardify-profile-"))
    corpus = train_corpus(args.corpus or scratch / "corpus", args.speakers, args.utts)
    plan = make_plan(corpus.entries, corpus.info.root, PackConfig(encoding=args.encoding, shard_size=16 * 1024**2))
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    pack(plan, corpus.info.root, scratch / "shards", workers=1)
    profile.disable()
    print(f"{len(corpus.entries)} utterances packed as {args.encoding} in {time.perf_counter() - start:.2f} s "
          "(under the profiler)")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
    shutil.rmtree(scratch, ignore_errors=True)  # a --corpus given by the user lies outside it and is kept


if __name__ == "__main__":
    main()
