"""shardify at VoxCeleb2 scale: planning time and memory, pack memory per worker, re-run time, with tiny files.

The corpus is ``--utts`` hard links of a few 0.1-s wavs (VoxCeleb2's shape: ~182 utterances a speaker, 8 a video),
so its size on disk is a few files and its cost is the file count: what planning and resuming pay per file.
Each phase runs in a fresh subprocess, which reports its wall time and peak RSS (``ru_maxrss``):

- plan: read the list and ``make_plan`` it; baseline in the same run: read the list's lines and ``os.stat`` every
  file in a plain loop (the least any planner that checks the files exist can do);
- pack a part: plan, then write the shards of ``--part 0`` of a ``--parts`` run (a few shards) with 2 workers,
  at two corpus sizes: the parent's and the largest worker's peak RSS (flat in corpus size, or growing?);
- re-run: plan, then ``pack`` a directory whose shards are all finished (``--max-utts``-sized shards, so it has
  thousands): the time of ``pack`` alone, against a plain ``os.scandir`` of the directory.

    python benchmarks/shardify_scale.py [--utts 100000] [--rerun-utts 20000] [--dir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile

import checkout  # noqa: F401 (this checkout's speakerid first on sys.path)

UTTS_PER_SPEAKER = 182  # VoxCeleb2 dev: 1,092,009 utterances of 5,994 speakers
UTTS_PER_VIDEO = 8
LINKS_PER_FILE = 50_000


def make_corpus(root: Path, utts: int) -> Path:
    """``utts`` hard links of 0.1-s wavs in SPEAKER/VIDEO/UTT.wav folders, and its train list."""
    listing = root / f"train_list_{utts}.txt"
    if listing.exists():
        return listing
    audio = root / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(utts):
        source = root / f"source-{i // LINKS_PER_FILE}.wav"  # a filesystem caps the links of one file (ext4: 65,000)
        if not source.exists():
            soundfile.write(source, (np.sin(np.arange(1600) / 5) * 8000).astype(np.int16), 16000, subtype="PCM_16")
        spk, rest = divmod(i, UTTS_PER_SPEAKER)
        video, utt = divmod(rest, UTTS_PER_VIDEO)
        rel = f"id{spk:05d}/v{video:03d}/{utt:05d}.wav"
        path = audio / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(source, path)
        lines.append(f"id{spk:05d} {rel}\n")
    tmp = listing.with_suffix(".tmp")
    tmp.write_text("".join(lines))
    tmp.replace(listing)
    return listing


def peak_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


# --- the phases, each run in its own process (python shardify_scale.py --phase NAME …) -----------------------

def phase_stat(listing: Path, root: Path) -> dict:
    start = time.perf_counter()
    relpaths = [line.split()[1] for line in listing.read_text().splitlines() if line.strip()]
    sizes = [os.stat(root / rel).st_size for rel in relpaths]
    return {"seconds": time.perf_counter() - start, "peak_mb": peak_mb(), "files": len(sizes)}


def _plan(listing: Path, root: Path, max_utts: int | None = None):
    from speakerid.data.lists import read_train_list
    from speakerid.data.plan import PackConfig, make_plan

    config = PackConfig(encoding="wav", chunk_size=16, max_utts=max_utts or 1024, min_seconds=0.0)
    return make_plan(read_train_list(listing), root, config)


def phase_plan(listing: Path, root: Path) -> dict:
    start = time.perf_counter()
    plan = _plan(listing, root)
    return {"seconds": time.perf_counter() - start, "peak_mb": peak_mb(), "shards": len(plan.names)}


def _memory_mb(pid: int) -> dict[str, float]:
    """A process's resident, proportional and private memory (Linux's smaps_rollup), in MB."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[name] = int(value.split()[0]) / 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"],
            "private": fields["Private_Clean"] + fields["Private_Dirty"]}


def _watch_workers(peaks: dict, stop: threading.Event) -> None:
    """Sample the pool workers' memory until ``stop``: a forked worker's RSS counts the pages it shares with its
    parent, its private memory is what it costs on its own (what the copy-on-write of the plan adds)."""
    me = os.getpid()
    while not stop.wait(0.05):
        children = set()
        for task in os.listdir(f"/proc/{me}/task"):
            with contextlib.suppress(OSError):
                children.update(map(int, Path(f"/proc/{me}/task/{task}/children").read_text().split()))
        for pid in children:
            with contextlib.suppress(OSError, KeyError):
                for name, mb in _memory_mb(pid).items():
                    peaks[name] = max(peaks.get(name, 0.0), mb)


def phase_pack_part(listing: Path, root: Path, out: Path, parts: int) -> dict:
    from speakerid.data.pack import pack

    plan = _plan(listing, root)
    planned_mb = peak_mb()
    peaks: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_workers, args=(peaks, stop), daemon=True)
    watcher.start()
    start = time.perf_counter()
    report = pack(plan, root, out, workers=2, part=0, parts=parts)
    seconds = time.perf_counter() - start
    stop.set()
    watcher.join()
    return {"seconds": seconds, "plan_peak_mb": planned_mb, "peak_mb": peak_mb(),
            "worker_peak_mb": peak_mb(resource.RUSAGE_CHILDREN), "written": len(report.written),
            "worker_private_mb": peaks.get("private"), "worker_pss_mb": peaks.get("pss")}


def phase_rerun(listing: Path, root: Path, out: Path, max_utts: int) -> dict:
    from speakerid.data.pack import pack

    plan = _plan(listing, root, max_utts)
    first = time.perf_counter()
    pack(plan, root, out, workers=2)
    packed = time.perf_counter() - first
    start = time.perf_counter()
    report = pack(plan, root, out, workers=2)
    seconds = time.perf_counter() - start
    assert not report.written and len(report.resumed) == len(plan.names)
    start = time.perf_counter()
    with os.scandir(out) as listing_:
        names = sum(1 for _ in listing_)
    return {"seconds": seconds, "first_pack_seconds": packed, "shards": len(plan.names),
            "scandir_seconds": time.perf_counter() - start, "entries": names}


def run_phase(*args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, __file__, "--phase", *map(str, args)], capture_output=True, text=True,
                            env=env)
    if result.returncode != 0:
        raise SystemExit(f"phase {args[0]} failed:\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--utts", type=int, default=100_000, help="utterances of the planning corpus")
    parser.add_argument("--small", type=int, default=25_000, help="the smaller corpus of the pack-memory pair")
    parser.add_argument("--rerun-utts", type=int, default=20_000, help="utterances of the re-run corpus")
    parser.add_argument("--rerun-max-utts", type=int, default=16, help="utterances a shard in the re-run corpus")
    parser.add_argument("--dir", type=Path, help="keep the corpora here (default: a temporary folder)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", choices=("plan", "pack", "rerun"), nargs="+", default=("plan", "pack", "rerun"),
                        help="run only these measurements")
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        name, *rest = args.phase
        paths = [Path(p) for p in rest[:3]]
        if name == "stat":
            out = phase_stat(*paths[:2])
        elif name == "plan":
            out = phase_plan(*paths[:2])
        elif name == "pack_part":
            out = phase_pack_part(*paths[:3], int(rest[3]))
        else:
            out = phase_rerun(*paths[:3], int(rest[3]))
        print(json.dumps(out))
        return

    work = args.dir or Path(tempfile.mkdtemp(prefix="shardify_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    audio = work / "audio"
    results: dict = {"utts": args.utts, "load_at_start": os.getloadavg()[0]}
    try:
        start = time.perf_counter()
        big = make_corpus(work, args.utts)
        small = make_corpus(work, args.small)
        rerun = make_corpus(work, args.rerun_utts)
        results["corpus_seconds"] = time.perf_counter() - start
        if "plan" in args.only:
            results["stat"] = run_phase("stat", big, audio)
            results["plan"] = run_phase("plan", big, audio)
        for label, listing in (("small", small), ("big", big)) if "pack" in args.only else ():
            out = work / f"pack_{label}"
            shutil.rmtree(out, ignore_errors=True)
            parts = max(1, int(listing.stem.rsplit("_", 1)[1]) // 1024 // 4)  # ~4 shards of 1,024 in part 0
            results[f"pack_part_{label}"] = {**run_phase("pack_part", listing, audio, out, parts), "parts": parts}
        if "rerun" in args.only:
            out = work / "rerun"
            shutil.rmtree(out, ignore_errors=True)
            results["rerun"] = run_phase("rerun", rerun, audio, out, args.rerun_max_utts)
        results["load_at_end"] = os.getloadavg()[0]
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    print(f"load {results['load_at_start']:.2f} → {results['load_at_end']:.2f}")
    if "plan" in args.only:
        s, p = results["stat"], results["plan"]
        print(f"plan {args.utts:,} utts: {p['seconds']:.2f} s, peak {p['peak_mb']:.0f} MB "
              f"(baseline: list + stat loop {s['seconds']:.2f} s, peak {s['peak_mb']:.0f} MB; "
              f"{p['seconds'] / s['seconds']:.2f}× the baseline's time; "
              f"1.09 M extrapolated: {p['seconds'] * 1_092_009 / args.utts:.0f} s)")
    for label, n in (("small", args.small), ("big", args.utts)) if "pack" in args.only else ():
        r = results[f"pack_part_{label}"]
        print(f"pack part 0 of {r['parts']} at {n:,} utts: parent peak {r['peak_mb']:.0f} MB "
              f"(after planning {r['plan_peak_mb']:.0f}), largest worker peak {r['worker_peak_mb']:.0f} MB "
              f"(private {r['worker_private_mb']:.0f} MB, PSS {r['worker_pss_mb']:.0f} MB), "
              f"{r['written']} shards in {r['seconds']:.2f} s")
    if "rerun" in args.only:
        r = results["rerun"]
        print(f"re-run of {r['shards']:,} finished shards ({args.rerun_utts:,} utts): pack() {r['seconds']:.3f} s "
              f"(baseline: one scandir of the {r['entries']:,} entries {r['scandir_seconds'] * 1000:.1f} ms; "
              f"first pack {r['first_pack_seconds']:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
