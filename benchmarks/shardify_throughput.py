"""shardify throughput: MB of input audio per second for wav and flac shards with 1 and 2 workers.

Measured in the same run on the same files, page cache warm:
- the baseline: webdataset's ``ShardWriter`` fed the files in list order by one process, as a ten-line packing
  script does (wav: the file's bytes as they are; flac: read with soundfile and encoded, as shardify does),
  without shardify's per-speaker grouping, validation, checksums or atomic renames;
- the physical limit: ``cat > /dev/null`` of the inputs, then of the shards written;
- the disk's share: writing the same shard bytes to new files and fsyncing each (what any writer whose shards
  must survive a crash pays; the baseline leaves them dirty in the page cache).

    python benchmarks/shardify_throughput.py [--speakers 60 --utts 20] [--corpus DIR] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common import machine, page_cache_seconds, train_corpus

from speakerid.data.plan import PackConfig, make_plan
from speakerid.data.pack import pack


def naive_pack(entries, root: Path, out: Path, encoding: str, shard_bytes: int) -> float:
    """The baseline: one process, files in list order, one sample per file through ``wds.ShardWriter``."""
    import io

    import soundfile
    import webdataset as wds

    out.mkdir(parents=True)
    start = time.perf_counter()
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxsize=shard_bytes, verbose=0) as sink:
        for i, entry in enumerate(entries):
            path = root / entry.relpath
            if encoding == "wav":
                audio = path.read_bytes()
            else:
                data, rate = soundfile.read(path, dtype="int16")
                buffer = io.BytesIO()
                soundfile.write(buffer, data, rate, format="FLAC", subtype="PCM_16")
                audio = buffer.getvalue()
            sink.write({"__key__": f"{i:09d}", encoding: audio, "cls": entry.spk.encode()})
    return time.perf_counter() - start


def durable_write_seconds(files: list[Path], scratch: Path) -> float:
    """Seconds to write ``files``' bytes to new files and fsync each (the reads are not counted)."""
    seconds = 0.0
    for path in files:
        data = path.read_bytes()
        copy = scratch / f"durable-{path.name}"
        start = time.perf_counter()
        with open(copy, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        seconds += time.perf_counter() - start
        copy.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speakers", type=int, default=60)
    parser.add_argument("--utts", type=int, default=20)
    parser.add_argument("--corpus", type=Path, help="reuse/create the synthetic corpus here (default: a temp dir)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--encodings", nargs="+", default=["wav", "flac"])
    parser.add_argument("--repeats", type=int, default=3, help="each side's best of this many runs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    console = Console(width=130)

    scratch = Path(tempfile.mkdtemp(prefix="shardify-bench-"))
    corpus_dir = args.corpus or scratch / "corpus"
    with console.status("generating the synthetic corpus …"):
        corpus = train_corpus(corpus_dir, args.speakers, args.utts)
    entries, inputs = corpus.entries, corpus.inputs
    input_mb = sum(p.stat().st_size for p in inputs) / 1e6
    cat_in = page_cache_seconds(inputs)  # and the cache is warm: every figure below reads from memory

    shard_bytes = 16 * 1024**2
    baselines = {}
    for encoding in args.encodings:
        out = scratch / f"baseline-{encoding}"
        best = float("inf")
        for _ in range(args.repeats):
            best = min(best, naive_pack(entries, corpus.info.root, out, encoding, shard_bytes))
            shutil.rmtree(out)
        baselines[encoding] = input_mb / best

    rows = []
    for encoding in args.encodings:
        for workers in args.workers:
            out = scratch / f"{encoding}-{workers}"
            seconds = float("inf")
            for _ in range(args.repeats):
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                plan = make_plan(entries, corpus.info.root, PackConfig(encoding=encoding, shard_size=shard_bytes))
                report = pack(plan, corpus.info.root, out, workers=workers)
                seconds = min(seconds, time.perf_counter() - start)
            shards = [out / name for name in plan.names]
            cat_out = page_cache_seconds(shards)
            durable = durable_write_seconds(shards, scratch)
            rows.append({
                "encoding": encoding, "workers": workers, "utterances": len(entries), "input_mb": input_mb,
                "output_mb": report.output_bytes / 1e6, "seconds": seconds, "mb_per_s": input_mb / seconds,
                "utt_per_s": len(entries) / seconds, "baseline_mb_per_s": baselines[encoding], "repeats": args.repeats,
                "cat_inputs_mb_per_s": input_mb / cat_in, "cat_outputs_mb_per_s": report.output_bytes / 1e6 / cat_out,
                "write_fsync_mb_per_s": input_mb / durable,  # MB of input, as the other figures
            })
            shutil.rmtree(out)

    table = Table(title=f"shardify throughput: {len(entries)} utterances, {input_mb:.0f} MB of 16 kHz wav, "
                        f"{corpus.info.hours:.2f} h (page cache warm)")
    for column in ("encoding", "workers", "MB/s in", "utt/s", "baseline MB/s", "vs baseline", "vs cat inputs",
                   "out MB", "cat inputs MB/s", "cat shards MB/s", "write+fsync MB/s"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["encoding"], str(r["workers"]), f"{r['mb_per_s']:.1f}", f"{r['utt_per_s']:.0f}",
                      f"{r['baseline_mb_per_s']:.1f}", f"{r['mb_per_s'] / r['baseline_mb_per_s']:.2f}×",
                      f"{r['mb_per_s'] / r['cat_inputs_mb_per_s']:.3f}×", f"{r['output_mb']:.0f}",
                      f"{r['cat_inputs_mb_per_s']:.0f}", f"{r['cat_outputs_mb_per_s']:.0f}",
                      f"{r['write_fsync_mb_per_s']:.0f}")
    console.print(table)
    about = machine()
    command = "python " + " ".join(sys.argv)
    console.print(f"machine: {about}; command: {command}")
    console.print(f"baseline: webdataset ShardWriter, one process, files in list order; each side the best of "
                  f"{args.repeats} runs")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "cores": os.cpu_count(), "machine": about, "command": command,
                                         "hours": corpus.info.hours}, indent=1))
    shutil.rmtree(scratch, ignore_errors=True)  # a --corpus given by the user lies outside it and is kept


if __name__ == "__main__":
    main()
