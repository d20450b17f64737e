"""Loader throughput: crops/s for one epoch of N speakers × M utterances, speakerid's shard reader against a
voxceleb_trainer-style loader of one file per utterance, with the same DataLoader workers, in the same run.

Both sides deliver batches of N = 200 speakers × M = 2 random 2-s crops (max_frames 200 → 32,240 samples)
from the same synthetic corpus, with the page cache warm (every wav file and every shard is read once with
``cat > /dev/null`` before anything is timed). An epoch is timed from ``iter(loader)`` (which forks the
workers: their start-up, and for speakerid the filling of the pool before the first batch, are included on
both sides) to the arrival of its last batch in the main process. The baseline is written from the
description of voxceleb_trainer's loader: a map-style Dataset whose item is a speaker tuple of M file
indices, each file read whole with ``soundfile.read`` (float64), wrap-padded if short and randomly cropped;
its ``train_dataset_sampler`` (tuples per speaker, shuffled, a tuple dropped when its speaker is already in
the batch being filled); ``DataLoader(batch_size=N, sampler=…, drop_last=True)`` with default collation.

Peak memory per worker is the kernel's high-water mark of the resident set (VmHWM in /proc/PID/status) of
every DataLoader worker, read just after the epoch's last batch arrives (the workers are still alive); the
"idle" figure is the same for a worker of an empty DataLoader forked from the same process (interpreter,
torch, numpy: what any worker costs before it reads anything).

    python benchmarks/loader_throughput.py [--speakers 300 --utts 24] [--workers 1 2] [--encodings wav flac]
                                           [--repeats 3] [--corpus DIR] [--json out.json] [--profile]
                                           [--epochs 2] [--cold]

``--epochs 2`` times speakerid's second epoch too (a local wav shard is crc32-checked whole in a stream's first
pass, then read crop by crop): its "after the first batch" figure is then that of the later epochs. ``--cold``
adds rows with the page cache dropped (as root: ``sync; echo 3 > /proc/sys/vm/drop_caches``) before each
side's run and each epoch, where storage, not the CPU, is what one file per utterance pays for.

Also printed: the DataLoader's own ceiling (workers that only hand over ready batches), and speakerid's
per-worker memory from a formula over its data structures (pool and partial-tuple peaks replayed without
decoding) beside the measurement.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import json
import math
import os
import pstats
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from common import cat_seconds, machine, pack_shards, page_cache_seconds, seed_loader, shutdown, train_corpus
from loader_memory import (MB, children, idle_worker_rss, mean_member_bytes, memory_model, proc_status, replay_peaks,
                           wait_children_gone)

from speakerid.data.batch_config import BatchConfig
from speakerid.data.batches import train_loader
from speakerid.data.shardset import ShardSet


# ------------------------------------------------------------------------------------------ measurements


def drop_page_cache() -> str | None:
    """Empty the kernel's page cache (``sync; echo 3 > /proc/sys/vm/drop_caches``); why not, when it cannot."""
    if os.geteuid() != 0:
        return "not root: /proc/sys/vm/drop_caches is writable by root only"
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as error:
        return f"cannot drop the page cache: {error}"
    return None


def time_epoch(loader, n_batches: int, workers: int, check, epochs: int = 1, cold: bool = False) -> dict:
    """Seconds from iter(loader) to the n-th batch received; crops counted; workers' memory at the end.

    ``epochs`` > 1 (speakerid's endless loader): the same iterator goes on, and the figure after the first batch
    is that of the epochs after the first. ``cold``: the page cache is dropped at every epoch's start (the
    drop itself is not timed)."""
    gc.collect()
    crops, paused = 0, 0.0

    def now() -> float:  # the clock without the page-cache drops
        return time.perf_counter() - paused

    if cold:
        drop_page_cache()
    start = now()
    it = iter(loader)
    first = None
    marks = []  # (time, crops) at each later epoch's start
    for k in range(n_batches * epochs):
        if k and k % n_batches == 0:
            if cold:
                t = time.perf_counter()
                drop_page_cache()
                paused += time.perf_counter() - t
            marks.append((now(), crops))
        batch = next(it)
        if k == 0:
            first = now() - start
        crops += check(batch)
        del batch
    seconds = now() - start
    statuses = [proc_status(pid) for pid in children()] if workers else []
    if workers:
        shutdown(it)
    del it
    gc.collect()
    wait_children_gone()
    if marks:  # the epochs after the first: what most of a training run is
        end = start + seconds
        steady = (crops - marks[0][1]) / (end - marks[0][0])
    else:
        steady = (crops - crops / n_batches) / (seconds - first) if n_batches > 1 else None
    return {
        "seconds": seconds, "first_batch_s": first, "batches": n_batches, "epochs": epochs, "crops": crops,
        "crops_per_s": crops / seconds, "first_epoch_crops_per_s": (marks[0][1] / (marks[0][0] - start) if marks
                                                                    else crops / seconds),
        "steady_crops_per_s": steady,
        "worker_hwm_mb": [s.get("VmHWM", 0) / MB for s in statuses],
        "worker_rss_end_mb": [s.get("VmRSS", 0) / MB for s in statuses],
        "worker_anon_end_mb": [s.get("RssAnon", 0) / MB for s in statuses],
    }


def check_speakerid(config: BatchConfig):
    n, m, length = config.n_speakers, config.utts_per_speaker, config.crop_samples

    def check(batch: dict) -> int:
        audio = batch["audio"]
        assert audio.shape == (n, m, length) and audio.dtype == torch.int16, audio.shape
        assert len(set(batch["labels"].tolist())) == n, "speakers repeated in a batch"
        return n * m

    return check


def check_baseline(config: BatchConfig):
    n, m, length = config.n_speakers, config.utts_per_speaker, config.crop_samples

    def check(batch) -> int:
        audio, labels = batch
        assert audio.shape == (n, m, length) and audio.dtype == torch.float32, audio.shape
        assert len(set(labels.tolist())) == n, "speakers repeated in a batch"
        return n * m

    return check


class _ReadyBatches(torch.utils.data.IterableDataset):
    """A worker that only copies a ready (N, M, L) batch into a fresh shared-memory tensor and sends it: the
    DataLoader's own cost for a new batch (a private tensor would be copied into shared memory once more)."""

    def __init__(self, shape: tuple[int, int, int], dtype) -> None:
        self.shape, self.dtype = shape, dtype

    def __iter__(self):
        source = torch.from_numpy(np.ones(self.shape, dtype=self.dtype))
        while True:
            batch = torch.empty(self.shape, dtype=source.dtype).share_memory_()
            batch.copy_(source)
            yield {"audio": batch}


def transport_ceiling(config: BatchConfig, workers: int, dtype, batches: int = 64) -> float:
    """Crops/s of a DataLoader whose workers do nothing but hand over batches (first batch excluded)."""
    shape = (config.n_speakers, config.utts_per_speaker, config.crop_samples)
    loader = torch.utils.data.DataLoader(_ReadyBatches(shape, dtype), batch_size=None, num_workers=workers)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        del batch
    seconds = time.perf_counter() - start
    shutdown(it)
    del it, loader
    gc.collect()
    wait_children_gone()
    return batches * shape[0] * shape[1] / seconds


# ---------------------------------------------------------------------------------------------- profile


def profile_reader(shards: ShardSet, config: BatchConfig, n_batches: int, console: Console) -> list[dict]:
    """cProfile of speakerid's reader in the main process (workers=0): where a batch's time goes."""
    loader = train_loader(shards, config, workers=0)
    profiler = cProfile.Profile()
    it = iter(loader)
    start = time.perf_counter()
    profiler.enable()
    for _ in range(n_batches):
        next(it)
    profiler.disable()
    seconds = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    total = sum(v[2] for v in stats.stats.values())  # tottime
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:12]
    table = Table(title=f"cProfile, speakerid {shards.encoding} reader, workers=0, {n_batches} batches in "
                        f"{seconds:.2f} s ({n_batches * config.n_speakers * config.utts_per_speaker / seconds:.0f} "
                        "crops/s under the profiler); own time (tottime)")
    for column in ("function", "calls", "own s", "share"):
        table.add_column(column, justify="right" if column != "function" else "left")
    rows = []
    for (file, line, name), (_, calls, tottime, _, _) in top:
        where = f"{Path(file).name}:{line} {name}" if line else name
        table.add_row(where, str(calls), f"{tottime:.3f}", f"{tottime / total:.0%}")
        rows.append({"function": where, "calls": calls, "tottime": tottime, "share": tottime / total})
    console.print(table)

    def cumulative(file_end: str, name: str) -> float:
        return sum(v[3] for (file, _, fn), v in stats.stats.items() if file.endswith(file_end) and fn == name)

    tar = cumulative("tariterators.py", "tar_file_iterator")
    interleaved = cumulative("stages.py", "interleave")
    parsed = cumulative("stages.py", "parse")
    drawn = cumulative("stages.py", "draw")
    stages = {"tar reading (webdataset tar_file_iterator → tarfile 'r|*')": tar,
              "rest of read_shard + interleave": interleaved - tar, "parse (json, wav_pcm, wav crop)": parsed - interleaved,
              "_draw (draw order, flac decode, copy into the batch)": drawn,
              "quota, tuples, pool, rest": total - parsed - drawn}
    console.print("  by stage (cumulative): " + "; ".join(f"{k} {v / total:.0%}" for k, v in stages.items()))
    rows.append({"stages": {k: v / total for k, v in stages.items()}})
    return rows


# ------------------------------------------------------------------------------------------------- main


def best(runs: list[dict]) -> dict:
    """The run with the highest crops/s (others on a shared machine only ever slow a run down); memory: the max."""
    chosen = dict(max(runs, key=lambda r: r["crops_per_s"]))
    chosen["worker_hwm_mb"] = [max(col) for col in zip(*(r["worker_hwm_mb"] for r in runs))] if runs[0]["worker_hwm_mb"] else []
    chosen["all_crops_per_s"] = [r["crops_per_s"] for r in runs]
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speakers", type=int, default=300)
    parser.add_argument("--utts", type=int, default=24, help="utterances per speaker")
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--max-seconds", type=float, default=8.0)
    parser.add_argument("--corpus", type=Path, help="reuse/create the corpus and its shards here (default: a temp dir)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--encodings", nargs="+", default=["wav", "flac"])
    parser.add_argument("--repeats", type=int, default=3, help="epochs per side and row, alternated; the best is shown")
    parser.add_argument("-n", "--n-speakers", type=int, default=200, help="N, speakers per batch")
    parser.add_argument("-m", "--utts-per-speaker", type=int, default=2, help="M")
    parser.add_argument("--max-frames", type=int, default=200)
    parser.add_argument("--chunk-size", type=int, default=4)
    parser.add_argument("--shard-mb", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1,
                        help="speakerid epochs per timed run; > 1: its figure after the first batch is that of the "
                             "later epochs (local wav shards: crop-only reads once the first pass checked them)")
    parser.add_argument("--cold", action="store_true",
                        help="also rows with the page cache dropped before each side's run and each epoch (root only; "
                             "skipped with the reason otherwise)")
    parser.add_argument("--profile", action="store_true", help="also cProfile speakerid's reader with workers=0")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    console = Console(width=150)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    started = datetime.datetime.now().astimezone()
    about_machine = machine()

    scratch = Path(tempfile.mkdtemp(prefix="loader-bench-"))
    t = time.perf_counter()
    with console.status("generating the synthetic corpus …"):
        corpus = train_corpus(args.corpus or scratch / "corpus", args.speakers, args.utts,
                              min_seconds=args.min_seconds, max_seconds=args.max_seconds)
    prep = {"corpus_s": time.perf_counter() - t}
    inputs, n_speakers = corpus.inputs, corpus.n_speakers
    config = BatchConfig(n_speakers=args.n_speakers, utts_per_speaker=args.utts_per_speaker, max_frames=args.max_frames)

    shard_sets, member_bytes = {}, {}
    for encoding in args.encodings:
        t = time.perf_counter()
        with console.status(f"packing {encoding} shards …"):
            shard_sets[encoding] = ShardSet.open(pack_shards(corpus, encoding, args.chunk_size, args.shard_mb))
        member_bytes[encoding] = mean_member_bytes([Path(u) for u in shard_sets[encoding].urls], encoding)
        prep[f"pack_{encoding}_s"] = time.perf_counter() - t

    t = time.perf_counter()
    cat_seconds(inputs)  # warm the page cache: every figure below reads from memory
    # ... and the physical limit for a reader of shards: reading every shard's bytes from the page cache
    shard_read_s = {e: page_cache_seconds([Path(u) for u in shards.urls]) for e, shards in shard_sets.items()}
    prep["warm_s"] = time.perf_counter() - t
    input_mb = sum(p.stat().st_size for p in inputs) / MB

    ceilings = {}
    with console.status("DataLoader transport ceilings …"):
        for workers in args.workers:
            if workers:
                ceilings[workers] = {name: max(transport_ceiling(config, workers, dtype) for _ in range(3))
                                     for name, dtype in (("int16", np.int16), ("float32", np.float32))}

    rows = []
    cold_skipped = None
    storages = ["warm"]
    if args.cold:
        cold_skipped = drop_page_cache()
        if cold_skipped:
            console.print(f"cold-storage rows skipped: {cold_skipped}")
        else:
            storages.append("cold")
    for storage, encoding, workers in ((st, e, w) for st in storages for e in args.encodings for w in args.workers):
        cold = storage == "cold"
        shards = shard_sets[encoding]
        if not cold:
            cat_seconds(inputs + [Path(u) for u in shards.urls])  # warm again after the cold rows' drops
        with console.status(f"{storage}, {encoding}, {workers} worker(s) …"):
            idle = idle_worker_rss(workers) / MB if workers else 0.0
            sid_runs, base_runs = [], []
            for _ in range(args.repeats):
                loader = train_loader(shards, config, workers=workers)
                n_sid = loader.dataset.batches_per_epoch
                sid_runs.append(time_epoch(loader, n_sid, workers, check_speakerid(config), args.epochs, cold))
                del loader
                base_loader, sampler = seed_loader(corpus.paths, corpus.labels, config.crop_samples,
                                                   config.n_speakers, config.utts_per_speaker,
                                                   config.max_seg_per_spk, config.seed, workers)
                n_base = len(sampler) // config.n_speakers
                base_runs.append(time_epoch(base_loader, n_base, workers, check_baseline(config), cold=cold))
                del base_loader
        sid, base = best(sid_runs), best(base_runs)
        rows.append({"encoding": encoding, "workers": workers, "storage": storage, "speakerid": sid,
                     "baseline": base,
                     "speakerid_runs": sid_runs, "baseline_runs": base_runs,
                     "ratio": sid["crops_per_s"] / base["crops_per_s"],
                     "steady_ratio": (sid["steady_crops_per_s"] / base["steady_crops_per_s"]
                                      if sid["steady_crops_per_s"] and base["steady_crops_per_s"] else None),
                     "idle_worker_mb": idle, "shards": len(shards), "mean_member_bytes": member_bytes[encoding],
                     # an epoch reads each shard at most once, so its crops at page-cache read speed:
                     "page_cache_crops_per_s": sid["crops"] / sid["epochs"] / shard_read_s[encoding],
                     "shard_read_mb_per_s": sum(Path(u).stat().st_size for u in shards.urls) / MB
                     / shard_read_s[encoding]})
    # After every timed run: the replay grows this process, and workers forked later would inherit that.
    with console.status("replaying the streams for the memory formula …"):
        models = {}
        for r in rows:  # the same streams warm or cold: replayed once
            if (r["encoding"], r["workers"]) not in models:
                peaks = replay_peaks(shard_sets[r["encoding"]], config, r["workers"], r["speakerid"]["batches"])
                models[r["encoding"], r["workers"]] = peaks, memory_model(
                    config, r["encoding"], r["mean_member_bytes"], r["idle_worker_mb"], peaks)
            r["peaks"], r["memory_model"] = models[r["encoding"], r["workers"]]

    title = (f"loader throughput, one epoch: N={config.n_speakers} × M={config.utts_per_speaker} crops of "
             f"{config.crop_samples} samples; {len(inputs)} utterances of {n_speakers} speakers, "
             f"{input_mb:.0f} MB of wav, {corpus.info.train_hours:.1f} h (page cache warm, or dropped before each run and "
             f"epoch: cold; speakerid epochs per run {args.epochs}; best of {args.repeats})")
    table = Table(title=title)
    for column in ("page cache", "encoding", "workers", "batches sid/base", "speakerid crops/s", "baseline crops/s", "ratio",
                   "ratio after 1st batch" if args.epochs == 1 else f"ratio, sid epochs 2–{args.epochs}",
                   "1st batch s sid/base", "peak RSS/worker sid", "formula sid",
                   "peak RSS/worker base", "idle worker"):
        table.add_column(column, justify="right")
    for r in rows:
        sid, base = r["speakerid"], r["baseline"]
        table.add_row(
            r["storage"], r["encoding"], str(r["workers"]), f"{sid['batches']}/{base['batches']}", f"{sid['crops_per_s']:.0f}",
            f"{base['crops_per_s']:.0f}", f"{r['ratio']:.2f}×",
            f"{r['steady_ratio']:.2f}×" if r["steady_ratio"] else "-",
            f"{sid['first_batch_s']:.2f}/{base['first_batch_s']:.2f}",
            f"{max(sid['worker_hwm_mb'], default=0):.0f} MB", f"{r['memory_model']['estimate_mb']:.0f} MB",
            f"{max(base['worker_hwm_mb'], default=0):.0f} MB", f"{r['idle_worker_mb']:.0f} MB")
    console.print(table)
    console.print(
        "Epoch = from iter(loader) (worker fork and start-up included on both sides) to the last batch received; "
        "crops/s = crops delivered ÷ that time. RSS = VmHWM of each worker at the epoch's end (max over workers "
        "and repeats); idle = a worker of an empty DataLoader.")
    console.print("page-cache read of the shards (the physical limit), crops/s: "
                  + "; ".join(f"{r['encoding']} ×{r['workers']}: {r['page_cache_crops_per_s']:.0f} "
                              f"({r['shard_read_mb_per_s']:.0f} MB/s)" for r in rows if r["storage"] == "warm"))
    if ceilings:
        console.print("DataLoader transport ceiling (workers only copy and hand over a ready (N, M, L) batch), crops/s: "
                      + "; ".join(f"{w} worker(s): int16 {c['int16']:.0f}, float32 {c['float32']:.0f}"
                                  for w, c in ceilings.items()))
    console.print(
        "speakerid RSS/worker ≈ idle + (P·M + Q)·p + 3·N·M·2L, P = largest pool in tuples (≥ ⌈pool_factor·N⌉ = "
        f"{math.ceil(config.pool_factor * config.n_speakers)}; larger while the pool holds < N distinct speakers), "
        "Q = utterances waiting in partial M-tuples, p = 2L (wav: crop cut when parsed) or b̄ (flac: whole member "
        f"until emission); L={config.crop_samples}, M={config.utts_per_speaker}, N={config.n_speakers}, "
        + ", ".join(f"b̄({e})={b / 1e3:.0f} kB" for e, b in member_bytes.items()))
    for r in rows:
        mm = r["memory_model"]
        console.print(
            f"  {r['encoding']} ×{r['workers']}: idle {mm['idle_mb']:.0f} + pool {mm['pool_mb']:.0f} (P={mm['pool_tuples']}) "
            f"+ partials {mm['partials_mb']:.1f} (Q={mm['partial_utts']}) + batches {mm['batches_mb']:.0f} = "
            f"{mm['estimate_mb']:.0f} MB (with P = ⌈pool_factor·N⌉: {mm['design_estimate_mb']:.0f} MB); measured "
            f"{', '.join(f'{x:.0f}' for x in r['speakerid']['worker_hwm_mb']) or '-'} MB")
    ended = datetime.datetime.now().astimezone()
    console.print(f"machine: {about_machine}, {os.getloadavg()[0]:.2f} at end; date {started.isoformat(timespec='seconds')}"
                  f" ({(ended - started).total_seconds():.0f} s); preparation "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in prep.items()))
    console.print(f"command: {command}")

    profiles = {}
    if args.profile:
        for encoding in args.encodings:
            profiles[encoding] = profile_reader(shard_sets[encoding], config, min(6, rows[0]["speakerid"]["batches"]),
                                                console)

    if args.json:
        args.json.write_text(json.dumps({
            "command": command, "date": started.isoformat(timespec="seconds"), "machine": about_machine,
            "config": {"n_speakers": config.n_speakers, "utts_per_speaker": config.utts_per_speaker,
                       "crop_samples": config.crop_samples, "pool_factor": config.pool_factor,
                       "open_shards": config.open_shards, "speakers": n_speakers, "utterances": len(inputs),
                       "input_mb": input_mb, "hours": corpus.info.train_hours, "repeats": args.repeats,
                       "epochs": args.epochs, "cold_skipped": cold_skipped},
            "preparation_s": prep, "transport_ceiling_crops_per_s": ceilings, "rows": rows, "profiles": profiles,
        }, indent=1))
    shutil.rmtree(scratch, ignore_errors=True)  # a --corpus given by the user lies outside it and is kept


if __name__ == "__main__":
    main()
