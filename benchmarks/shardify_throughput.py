"""shardify throughput: MB of input audio per second for wav and flac shards with 1 and 2 workers.

The physical limit beside it, measured in the same run on the same files: ``cat > /dev/null`` of the
inputs (page cache warm), then of the shards written. Ratios are against that limit, never absolute.

    python benchmarks/shardify_throughput.py [--speakers 60 --utts 20] [--corpus DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from speakerid.data.lists import read_train_list  # noqa: E402
from speakerid.data.plan import PackConfig, make_plan  # noqa: E402
from speakerid.data.synthetic import CorpusSpec, generate_corpus  # noqa: E402
from speakerid.data.writer import pack  # noqa: E402


def cat_seconds(files: list[Path]) -> float:
    """Wall time of ``cat FILES > /dev/null`` (in batches, to stay under the argument-length limit)."""
    start = time.perf_counter()
    for i in range(0, len(files), 2000):
        subprocess.run(["cat", *map(str, files[i:i + 2000])], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speakers", type=int, default=60)
    parser.add_argument("--utts", type=int, default=20)
    parser.add_argument("--corpus", type=Path, help="reuse/create the synthetic corpus here (default: a temp dir)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--encodings", nargs="+", default=["wav", "flac"])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    console = Console(width=130)

    scratch = Path(tempfile.mkdtemp(prefix="shardify-bench-"))
    corpus_dir = args.corpus or scratch / "corpus"
    spec = CorpusSpec(n_speakers=args.speakers, utts_per_speaker=args.utts, n_test_speakers=0, n_trials=0)
    with console.status("generating the synthetic corpus …"):
        corpus = generate_corpus(corpus_dir, spec, workers=os.cpu_count() or 1)
    entries = read_train_list(corpus.train_list)
    inputs = [corpus.root / e.relpath for e in entries]
    input_mb = sum(p.stat().st_size for p in inputs) / 1e6
    cat_seconds(inputs)  # warm the page cache: every figure below reads from memory
    cat_in = min(cat_seconds(inputs) for _ in range(3))

    rows = []
    for encoding in args.encodings:
        for workers in args.workers:
            out = scratch / f"{encoding}-{workers}"
            start = time.perf_counter()
            plan = make_plan(entries, corpus.root, PackConfig(encoding=encoding, shard_size=16 * 1024**2))
            report = pack(plan, corpus.root, out, workers=workers)
            seconds = time.perf_counter() - start
            shards = [out / name for name in plan.names]
            cat_seconds(shards)
            cat_out = min(cat_seconds(shards) for _ in range(3))
            rows.append({
                "encoding": encoding, "workers": workers, "utterances": len(entries), "input_mb": input_mb,
                "output_mb": report.output_bytes / 1e6, "seconds": seconds, "mb_per_s": input_mb / seconds,
                "utt_per_s": len(entries) / seconds, "cat_inputs_mb_per_s": input_mb / cat_in,
                "cat_outputs_mb_per_s": report.output_bytes / 1e6 / cat_out,
            })
            shutil.rmtree(out)

    table = Table(title=f"shardify throughput: {len(entries)} utterances, {input_mb:.0f} MB of 16 kHz wav, "
                        f"{corpus.hours:.2f} h (page cache warm)")
    for column in ("encoding", "workers", "MB/s in", "utt/s", "vs cat inputs", "out MB", "cat inputs MB/s",
                   "cat shards MB/s"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["encoding"], str(r["workers"]), f"{r['mb_per_s']:.1f}", f"{r['utt_per_s']:.0f}",
                      f"{r['mb_per_s'] / r['cat_inputs_mb_per_s']:.3f}×", f"{r['output_mb']:.0f}",
                      f"{r['cat_inputs_mb_per_s']:.0f}", f"{r['cat_outputs_mb_per_s']:.0f}")
    console.print(table)
    console.print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"Python {platform.python_version()}; command: python {' '.join(sys.argv)}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "cores": os.cpu_count()}, indent=1))
    shutil.rmtree(scratch, ignore_errors=True)  # a --corpus given by the user lies outside it and is kept


if __name__ == "__main__":
    main()
