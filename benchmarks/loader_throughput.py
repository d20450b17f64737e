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
import random
import shlex
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common import cat_seconds, machine, page_cache_seconds  # noqa: E402

from speakerid.data.batches import BatchConfig, train_loader  # noqa: E402
from speakerid.data.lists import read_train_list  # noqa: E402
from speakerid.data.pack import pack  # noqa: E402
from speakerid.data.plan import PackConfig, make_plan  # noqa: E402
from speakerid.data.shardset import ShardSet  # noqa: E402
from speakerid.data.synthetic import CorpusSpec, generate_corpus  # noqa: E402

MB = 1e6


# ------------------------------------------------------------------------------------------------ baseline


def round_down(value: int, divisor: int) -> int:
    return value - value % divisor


def load_crop(path: str, crop_samples: int) -> np.ndarray:
    """voxceleb_trainer's training read: the whole file as float64, wrap-padded to L+1 if short, one random crop."""
    audio, _ = soundfile.read(path)
    if len(audio) <= crop_samples:
        audio = np.pad(audio, (0, crop_samples + 1 - len(audio)), mode="wrap")
    start = int(random.random() * (len(audio) - crop_samples))
    return np.stack([audio[start:start + crop_samples]], axis=0).astype(np.float64)  # (1, L) float64


class FilePerUtterance(torch.utils.data.Dataset):
    """Item = a speaker tuple of M file indices → (float32 (M, L), label)."""

    def __init__(self, paths: list[str], labels: list[int], crop_samples: int) -> None:
        self.paths, self.data_label, self.crop_samples = paths, labels, crop_samples

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, indices: list[int]):
        feat = np.concatenate([load_crop(self.paths[i], self.crop_samples) for i in indices], axis=0)
        return torch.FloatTensor(feat), self.data_label[indices[0]]


class SpeakerTupleSampler(torch.utils.data.Sampler):
    """The seed's train_dataset_sampler, single rank."""

    def __init__(self, labels: list[int], m: int, max_seg_per_spk: int, batch_size: int, seed: int = 0) -> None:
        self.labels, self.m, self.max_seg, self.batch_size, self.seed, self.epoch = labels, m, max_seg_per_spk, batch_size, seed, 0
        self.num_samples = len(self._tuples())

    def _tuples(self) -> list[list[int]]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        by_speaker: dict[int, list[int]] = {}
        for index in torch.randperm(len(self.labels), generator=g).tolist():
            by_speaker.setdefault(self.labels[index], []).append(index)
        tuples, tuple_labels = [], []
        for label in sorted(by_speaker):
            files = by_speaker[label]
            used = round_down(min(len(files), self.max_seg), self.m)
            for start in range(0, used, self.m):
                tuples.append(files[start:start + self.m])
                tuple_labels.append(label)
        kept_labels: list[int] = []
        kept: list[list[int]] = []
        for i in torch.randperm(len(tuples), generator=g).tolist():
            batch_start = round_down(len(kept_labels), self.batch_size)
            if tuple_labels[i] not in kept_labels[batch_start:]:  # one tuple per speaker in a batch
                kept_labels.append(tuple_labels[i])
                kept.append(tuples[i])
        return kept[:round_down(len(kept), self.batch_size)]

    def __iter__(self):
        tuples = self._tuples()
        self.num_samples = len(tuples)
        return iter(tuples)

    def __len__(self) -> int:
        return self.num_samples


def seed_worker(worker_id: int) -> None:
    np.random.seed(np.random.get_state()[1][0] + worker_id)


def baseline_loader(paths: list[str], labels: list[int], config: BatchConfig, workers: int):
    dataset = FilePerUtterance(paths, labels, config.crop_samples)
    sampler = SpeakerTupleSampler(labels, config.utts_per_speaker, config.max_seg_per_spk, config.n_speakers,
                                  config.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.n_speakers, num_workers=workers, sampler=sampler,
                                         pin_memory=False, worker_init_fn=seed_worker, drop_last=True)
    return loader, len(sampler) // config.n_speakers


# ------------------------------------------------------------------------------------------ measurements


def children() -> list[int]:
    """PIDs of this process's children (the DataLoader workers while a loader is live)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                found.append(int(entry))
    return found


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssShmem of a process, in bytes."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def wait_children_gone(timeout: float = 30.0) -> None:
    end = time.time() + timeout
    while children() and time.time() < end:
        time.sleep(0.05)


class _Idle(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> int:
        return i


def idle_worker_rss(workers: int) -> float:
    """VmHWM of a worker of an empty DataLoader forked from this process now: every worker's floor."""
    gc.collect()
    loader = torch.utils.data.DataLoader(_Idle(), batch_size=1, num_workers=workers)
    it = iter(loader)
    next(it)
    hwm = max(proc_status(pid).get("VmHWM", 0) for pid in children())
    del it, loader
    gc.collect()
    wait_children_gone()
    return hwm


def time_epoch(loader, n_batches: int, workers: int, check) -> dict:
    """Seconds from iter(loader) to the n-th batch received; crops counted; workers' memory at the end."""
    gc.collect()
    crops = 0
    start = time.perf_counter()
    it = iter(loader)
    first = None
    for k in range(n_batches):
        batch = next(it)
        if k == 0:
            first = time.perf_counter() - start
        crops += check(batch)
        del batch
    seconds = time.perf_counter() - start
    statuses = [proc_status(pid) for pid in children()] if workers else []
    if workers and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    del it
    gc.collect()
    wait_children_gone()
    return {
        "seconds": seconds, "first_batch_s": first, "batches": n_batches, "crops": crops,
        "crops_per_s": crops / seconds,
        "steady_crops_per_s": (crops - crops / n_batches) / (seconds - first) if n_batches > 1 else None,
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


def mean_member_bytes(shard_dir: Path, names: list[str], ext: str) -> float:
    """Mean size of the audio members (headers only are read)."""
    sizes = []
    for name in names:
        with tarfile.open(shard_dir / name, "r:") as tar:
            sizes.extend(m.size for m in tar.getmembers() if m.name.endswith("." + ext))
    return float(np.mean(sizes))


def replay_peaks(shards: ShardSet, config: BatchConfig, workers: int, n_batches: int) -> dict:
    """Largest pool (tuples) and partial-tuple count (utterances) of the row's worker streams over the epoch.

    Each worker's stream is replayed in this process without decoding (``batches(skip=…)`` makes the same
    draws), with Pool.add and group_tuples wrapped to record their sizes; restored afterwards.
    """
    from speakerid.data import batches as module

    peaks = {"pool": 0, "partials": 0}
    stock_add, stock_group = module.Pool.add, module.group_tuples

    def add(self, t) -> None:
        stock_add(self, t)
        peaks["pool"] = max(peaks["pool"], self.size)

    def group(utterances, m):
        state = {"in": 0, "out": 0}

        def counted():
            for utt in utterances:
                state["in"] += 1
                peaks["partials"] = max(peaks["partials"], state["in"] - m * state["out"])
                yield utt

        for t in stock_group(counted(), m):
            state["out"] += 1
            yield t

    module.Pool.add, module.group_tuples = add, group
    try:
        streams = max(1, workers)
        for stream in range(streams):
            next(module.TrainStream(shards, config, stream, streams).batches(skip=math.ceil(n_batches / streams) + 1))
    finally:
        module.Pool.add, module.group_tuples = stock_add, stock_group
    return peaks


BATCH_BUFFERS = 3  # crops being filled + the previous batch + its shared-memory copy made by the queue's feeder thread


def memory_model(config: BatchConfig, encoding: str, member_bytes: float, idle_mb: float, peaks: dict) -> dict:
    """speakerid's resident bytes per worker, from batches.py's data structures.

      idle      a worker before it reads anything (interpreter, torch, numpy; measured)
      pool      P tuples × M utterances: P ≥ ⌈pool_factor·N⌉, and more while the pool holds < N distinct speakers
      partials  Q utterances waiting in group_tuples for the rest of their M-tuple
      payload   p = 2·L bytes (wav: the int16 crop is cut when parsed) | b̄ (flac: the whole member until emission)
      batches   3 × N·M·2L (see BATCH_BUFFERS; measured with a worker that only yields ready batches)
    """
    n, m, length = config.n_speakers, config.utts_per_speaker, config.crop_samples
    payload = 2 * length if encoding == "wav" else member_bytes
    pool = peaks["pool"] * m * payload
    design_pool = math.ceil(config.pool_factor * n) * m * payload
    partials = peaks["partials"] * payload
    batches = BATCH_BUFFERS * n * m * 2 * length
    total = idle_mb * MB + pool + partials + batches
    return {"payload_bytes": payload, "pool_tuples": peaks["pool"], "partial_utts": peaks["partials"],
            "pool_mb": pool / MB, "design_pool_mb": design_pool / MB, "partials_mb": partials / MB,
            "batches_mb": batches / MB, "idle_mb": idle_mb, "estimate_mb": total / MB,
            "design_estimate_mb": (total - pool + design_pool) / MB}


class _ReadyBatches(torch.utils.data.IterableDataset):
    """A worker that only copies a ready (N, M, L) batch and sends it: the DataLoader's own cost."""

    def __init__(self, shape: tuple[int, int, int], dtype) -> None:
        self.shape, self.dtype = shape, dtype

    def __iter__(self):
        source = np.ones(self.shape, dtype=self.dtype)
        while True:
            yield {"audio": torch.from_numpy(source.copy())}


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
    if hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
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
    interleaved = cumulative("batches.py", "interleave")
    parsed = cumulative("batches.py", "parse")
    drawn = cumulative("batches.py", "_draw")
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
    parser.add_argument("--profile", action="store_true", help="also cProfile speakerid's reader with workers=0")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    console = Console(width=150)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    started = datetime.datetime.now().astimezone()
    about_machine = machine()

    scratch = Path(tempfile.mkdtemp(prefix="loader-bench-"))
    root = args.corpus or scratch / "corpus"
    cores = os.cpu_count() or 1
    spec = CorpusSpec(n_speakers=args.speakers, utts_per_speaker=args.utts, n_test_speakers=0, n_trials=0,
                      min_seconds=args.min_seconds, max_seconds=args.max_seconds)
    t = time.perf_counter()
    with console.status("generating the synthetic corpus …"):
        corpus = generate_corpus(root, spec, workers=cores)
    prep = {"corpus_s": time.perf_counter() - t}
    entries = read_train_list(corpus.train_list)
    inputs = [corpus.root / e.relpath for e in entries]
    speakers = sorted({e.spk for e in entries})
    label_of = {spk: i for i, spk in enumerate(speakers)}
    paths, labels = [str(p) for p in inputs], [label_of[e.spk] for e in entries]
    config = BatchConfig(n_speakers=args.n_speakers, utts_per_speaker=args.utts_per_speaker, max_frames=args.max_frames)

    shard_sets, member_bytes = {}, {}
    for encoding in args.encodings:
        t = time.perf_counter()
        out = root / f"shards-{encoding}-c{args.chunk_size}-{args.shard_mb}mb"
        with console.status(f"packing {encoding} shards …"):
            plan = make_plan(entries, corpus.root, PackConfig(encoding=encoding, chunk_size=args.chunk_size,
                                                              shard_size=args.shard_mb * 1024**2))
            pack(plan, corpus.root, out, workers=cores)
        shard_sets[encoding] = ShardSet.open(out)
        member_bytes[encoding] = mean_member_bytes(out, plan.names, encoding)
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
    for encoding in args.encodings:
        shards = shard_sets[encoding]
        for workers in args.workers:
            with console.status(f"{encoding}, {workers} worker(s) …"):
                idle = idle_worker_rss(workers) / MB if workers else 0.0
                sid_runs, base_runs = [], []
                for _ in range(args.repeats):
                    loader = train_loader(shards, config, workers=workers)
                    n_sid = loader.dataset.batches_per_epoch
                    sid_runs.append(time_epoch(loader, n_sid, workers, check_speakerid(config)))
                    del loader
                    base_loader, n_base = baseline_loader(paths, labels, config, workers)
                    base_runs.append(time_epoch(base_loader, n_base, workers, check_baseline(config)))
                    del base_loader
            sid, base = best(sid_runs), best(base_runs)
            rows.append({"encoding": encoding, "workers": workers, "speakerid": sid, "baseline": base,
                         "speakerid_runs": sid_runs, "baseline_runs": base_runs,
                         "ratio": sid["crops_per_s"] / base["crops_per_s"],
                         "steady_ratio": (sid["steady_crops_per_s"] / base["steady_crops_per_s"]
                                          if sid["steady_crops_per_s"] and base["steady_crops_per_s"] else None),
                         "idle_worker_mb": idle, "shards": len(shards), "mean_member_bytes": member_bytes[encoding],
                         # an epoch reads each shard at most once, so its crops at page-cache read speed:
                         "page_cache_crops_per_s": sid["crops"] / shard_read_s[encoding],
                         "shard_read_mb_per_s": sum(Path(u).stat().st_size for u in shards.urls) / MB
                         / shard_read_s[encoding]})
    # After every timed run: the replay grows this process, and workers forked later would inherit that.
    with console.status("replaying the streams for the memory formula …"):
        for r in rows:
            r["peaks"] = replay_peaks(shard_sets[r["encoding"]], config, r["workers"], r["speakerid"]["batches"])
            r["memory_model"] = memory_model(config, r["encoding"], r["mean_member_bytes"], r["idle_worker_mb"],
                                             r["peaks"])

    title = (f"loader throughput, one epoch: N={config.n_speakers} × M={config.utts_per_speaker} crops of "
             f"{config.crop_samples} samples; {len(entries)} utterances of {len(speakers)} speakers, "
             f"{input_mb:.0f} MB of wav, {corpus.train_hours:.1f} h (page cache warm; best of {args.repeats})")
    table = Table(title=title)
    for column in ("encoding", "workers", "batches sid/base", "speakerid crops/s", "baseline crops/s", "ratio",
                   "ratio after 1st batch", "1st batch s sid/base", "peak RSS/worker sid", "formula sid",
                   "peak RSS/worker base", "idle worker"):
        table.add_column(column, justify="right")
    for r in rows:
        sid, base = r["speakerid"], r["baseline"]
        table.add_row(
            r["encoding"], str(r["workers"]), f"{sid['batches']}/{base['batches']}", f"{sid['crops_per_s']:.0f}",
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
                              f"({r['shard_read_mb_per_s']:.0f} MB/s)" for r in rows))
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
                       "open_shards": config.open_shards, "speakers": len(speakers), "utterances": len(entries),
                       "input_mb": input_mb, "hours": corpus.train_hours, "repeats": args.repeats},
            "preparation_s": prep, "transport_ceiling_crops_per_s": ceilings, "rows": rows, "profiles": profiles,
        }, indent=1))
    shutil.rmtree(scratch, ignore_errors=True)  # a --corpus given by the user lies outside it and is kept


if __name__ == "__main__":
    main()
