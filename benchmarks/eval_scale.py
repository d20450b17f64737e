"""Evaluation at VoxCeleb scale: AS-Norm over O, E and H at once, and what choosing the cohort reads.

1. AS-Norm. Three trial lists shaped like VoxCeleb1-O, -E and -H (cleaned), scaled by ``--scale`` (default
   1/5: 30,700 utterances; O's 4,874 are a subset of E's, H's are 95 % of E's; 7,544 + 115,964 + 110,179
   trials), random 256-dim embeddings, a cohort of ``--cohort-speakers`` per-speaker means (default 2,000).
   Baseline: ``score_trials`` as it was: each trial's two keys made from their paths, each list normalised on
   its own (``as_norm`` per list computes the top-k statistics of every utterance that list names); speakerid:
   ``score_trials`` over the three lists (each utterance's key and statistics once). Plain cosine scoring of
   the three lists, before and after, is shown beside.
2. The cohort's choice. A VoxCeleb2-shaped training shard set written for the run: ``--speakers`` speakers
   (default 1,000; VoxCeleb2 dev has 5,994, which takes about 10 minutes to write on 2 busy cores) with
   VoxCeleb2's spread of utterances (30–330, mean about 180), chunks of 16, shards of 1,760 utterances
   (VoxCeleb2 at 256 MB of FLAC), audio members of 32 bytes per second (a thousandth of 16-bit PCM: the bytes
   read are the audio's share, the tar headers aside; no json members: readers take the key's speaker); the
   cohort is ``--cohort-speakers`` scaled by
   speakers / 5,994 (2,000 of 5,994 → 334 of 1,000) × ``--cohort-utts``. Baseline: the first speakers read,
   until each has its utterances (the choice before, every process reading it); speakerid: the choice from
   index.json (``plan_cohort``), each of ``--processes`` processes reading its share. Counted: shards opened,
   members and audio bytes read.

    python benchmarks/eval_scale.py [--scale 0.2] [--speakers 1000] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import machine

from speakerid.data.index import FORMAT, VERSION
from speakerid.data.lists import Trial, utterance_key
from speakerid.evaluation import cohort as cohort_module
from speakerid.evaluation.cohort import cohort_selection
from speakerid.evaluation.embeddings import Embeddings
from speakerid.evaluation.scoring import (ScoreConfig, as_norm, cosine_scores, score_trials, speaker_means,
                                          trial_indices)
from speakerid.evaluation.trials import TrialList

# VoxCeleb1: O (cleaned) 4,874 utterances / 37,720 trials; E and H over all 145,375 (E) and 138,137 (H)
# utterances of the dev+test set / 579,818 and 550,894 trials (cleaned lists).
O_UTTS, E_UTTS, H_UTTS = 4874, 145375, 138137
O_TRIALS, E_TRIALS, H_TRIALS = 37720, 579818, 550894


def trial_list(name: str, keys: list[str], rows: np.ndarray) -> TrialList:
    return TrialList(name, Path(name), [Trial(int(i % 2), f"{keys[a]}.wav", f"{keys[b]}.wav", f"{name}:{i}")
                                        for i, (a, b) in enumerate(rows)])


def as_norm_figures(scale: float, cohort_speakers: int, top_k: int, dim: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    n_utts = int(E_UTTS * scale)
    keys = [f"id{i // 100:05d}/v/{i:06d}" for i in range(n_utts)]
    emb = Embeddings(keys, rng.normal(size=(n_utts, 1, dim)).astype(np.float32))
    n_o, n_h = int(O_UTTS * scale), int(H_UTTS * scale)
    rows = {"O": rng.integers(0, n_o, size=(int(O_TRIALS * scale), 2)),
            "E": rng.integers(0, n_utts, size=(int(E_TRIALS * scale), 2)),
            "H": rng.integers(n_utts - n_h, n_utts, size=(int(H_TRIALS * scale), 2))}
    lists = [trial_list(name, keys, r) for name, r in rows.items()]
    cohort_keys = [f"c{i // 4:05d}/v/{i:06d}" for i in range(cohort_speakers * 4)]
    cohort = Embeddings(cohort_keys, rng.normal(size=(len(cohort_keys), 1, dim)).astype(np.float32),
                        [k.split("/")[0] for k in cohort_keys])
    config = ScoreConfig(cohort="shards", as_norm=True, top_k=top_k)

    def per_list(normalise: bool):  # before: score_trials as it was, each list on its own
        values, means = emb.values[:, 0], speaker_means(cohort)
        out = []
        for t in lists:
            pairs = trial_indices([(utterance_key(t_.enroll), utterance_key(t_.test)) for t_ in t.trials], emb.keys)
            scores = cosine_scores(values, pairs)
            out.append(as_norm(values, pairs, means, top_k=top_k, scores=scores) if normalise else scores)
        return out

    def timed(fn):
        best, result = float("inf"), None
        for _ in range(repeats):
            started = time.perf_counter()
            result = fn()
            best = min(best, time.perf_counter() - started)
        return best, result

    plain_before_s, _ = timed(lambda: per_list(False))
    plain_s, _ = timed(lambda: score_trials(emb, lists))
    before_s, before = timed(lambda: per_list(True))
    after_s, after = timed(lambda: score_trials(emb, lists, cohort=cohort, scoring=config))
    difference = max(float(np.abs(a - b).max()) for a, b in zip(before, after))
    return {"utterances": n_utts, "trials": {k: len(r) for k, r in rows.items()}, "cohort_speakers": cohort_speakers,
            "top_k": top_k, "plain_before_s": plain_before_s, "plain_s": plain_s, "per_list_s": before_s,
            "once_s": after_s, "speed_up": before_s / after_s, "plain_speed_up": plain_before_s / plain_s,
            "as_norm_part_before_s": before_s - plain_before_s, "as_norm_part_after_s": after_s - plain_s,
            "max_score_difference": difference}


def write_shards(out: Path, n_speakers: int, chunk: int, shard_utts: int, seed: int = 0) -> None:
    """A VoxCeleb2-shaped training shard set, grouped per speaker as shardify packs it, with tiny audio members."""
    rng = np.random.default_rng(seed)
    speakers = [f"id{i:05d}" for i in range(n_speakers)]
    chunks = []
    for spk in speakers:
        n = int(rng.integers(30, 331))
        utts = [(spk, f"{spk}/v{j // 8:03d}/{j:05d}", int(rng.uniform(4, 12) * 32)) for j in range(n)]
        chunks += [utts[i:i + chunk] for i in range(0, n, chunk)]
    order = rng.permutation(len(chunks))
    shards, current = [], []
    for i in order:
        current += chunks[i]
        if len(current) >= shard_utts:
            shards.append(current)
            current = []
    if current:
        shards.append(current)
    label = {spk: i for i, spk in enumerate(speakers)}
    entries = []
    for s, members in enumerate(shards):
        name = f"train-{s:06d}.tar"
        with tarfile.open(out / name, "w") as tar:
            for spk, key, size in members:
                info = tarfile.TarInfo(f"{key}.flac")
                info.size = size
                tar.addfile(info, io.BytesIO(bytes(size)))
        counts: dict[str, int] = {}
        for spk, _, _ in members:
            counts[str(label[spk])] = counts.get(str(label[spk]), 0) + 1
        entries.append({"name": name, "bytes": (out / name).stat().st_size, "sha256": "", "samples": len(members),
                        "labels": counts, "audio_bytes": sum(m[2] for m in members)})
    index = {"format": FORMAT, "version": VERSION, "kind": "train", "sample_rate": 16000, "encoding": "flac",
             "speakers": label, "shards": entries}
    (out / "index.json").write_text(json.dumps(index))


class Reads:
    """Counts what the cohort's reader takes from the shards: shards opened, members, audio bytes."""

    def __init__(self) -> None:
        self.shards, self.members, self.audio_bytes = 0, 0, 0
        self.real = cohort_module.read_shard

    def __call__(self, url, *args, **kwargs):
        self.shards += 1
        for sample in self.real(url, *args, **kwargs):
            self.members += 1
            self.audio_bytes += len(sample.get("flac", b""))
            yield sample


def cohort_figures(n_speakers: int, cohort_speakers: int, utts: int, processes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        started = time.perf_counter()
        write_shards(out, n_speakers, 16, 1760)
        written_s = time.perf_counter() - started
        index = json.loads((out / "index.json").read_text())
        total = {"shards": len(index["shards"]), "members": sum(s["samples"] for s in index["shards"]),
                 "audio_bytes": sum(s["audio_bytes"] for s in index["shards"])}
        config = ScoreConfig(cohort=str(out), cohort_speakers=cohort_speakers, cohort_utts_per_speaker=utts)
        figures = {"total": total, "write_s": written_s}
        for name, read in (("before", lambda rank: cohort_module._in_reading_order(
                                str(out), 16000, cohort_speakers, utts, 0, 1)),  # every process read all of it
                           ("after", lambda rank: cohort_selection(config, 16000, rank, processes))):
            per_process, chosen, seconds = [], [], 0.0
            for rank in range(processes):
                reads = Reads()
                cohort_module.read_shard = reads
                try:
                    started = time.perf_counter()
                    chosen += [(k, s) for k, s, _ in read(rank)]
                    seconds += time.perf_counter() - started
                finally:
                    cohort_module.read_shard = reads.real
                per_process.append({"shards": reads.shards, "members": reads.members,
                                    "audio_bytes": reads.audio_bytes})
                if name == "before":
                    per_process *= processes  # the same reading on every process
                    break
            figures[name] = {"per_process": per_process, "seconds": seconds,
                             "speakers": len({s for _, s in chosen}), "utterances": len(set(chosen))}
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=0.2, help="share of VoxCeleb1's O/E/H utterances and trials")
    parser.add_argument("--cohort-speakers", type=int, default=2000)
    parser.add_argument("--cohort-utts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=300)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--speakers", type=int, default=1000, help="training speakers (VoxCeleb2 dev: 5,994)")
    parser.add_argument("--processes", type=int, default=2, help="evaluation processes sharing the cohort")
    parser.add_argument("--repeats", type=int, default=2, help="AS-Norm timings: the best of this many")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip", choices=["as-norm", "cohort"], help="run only the other part")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    figures: dict = {"machine": machine(), "args": vars(args)}
    if args.skip != "as-norm":
        a = figures["as_norm"] = as_norm_figures(args.scale, args.cohort_speakers, args.top_k, args.dim, args.repeats)
        print(f"O+E+H ({a['utterances']} utterances, trials {a['trials']}, cohort {a['cohort_speakers']}, "
              f"top {a['top_k']}): plain {a['plain_before_s']:.2f} s → {a['plain_s']:.2f} s "
              f"({a['plain_speed_up']:.2f}×); AS-Norm {a['per_list_s']:.2f} s → {a['once_s']:.2f} s "
              f"({a['speed_up']:.2f}×; its own part {a['as_norm_part_before_s']:.2f} s → "
              f"{a['as_norm_part_after_s']:.2f} s); max score difference {a['max_score_difference']:.1e}")
    if args.skip != "cohort":
        chosen = max(2, round(args.cohort_speakers * args.speakers / 5994))
        c = figures["cohort"] = cohort_figures(args.speakers, chosen, args.cohort_utts, args.processes)
        t = c["total"]
        print(f"cohort choice, {args.speakers} speakers, {t['shards']} shards, {t['members']} utterances "
              f"(written in {c['write_s']:.0f} s), {chosen} speakers × {args.cohort_utts}, "
              f"{args.processes} processes:")
        for name in ("before", "after"):
            f = c[name]
            shards = sum(p["shards"] for p in f["per_process"])
            audio = sum(p["audio_bytes"] for p in f["per_process"])
            most = max(p["shards"] for p in f["per_process"])
            print(f"  {name}: {f['speakers']} speakers, {f['utterances']} utterances; shards opened "
                  f"{shards} over all processes (at most {most} = {most / t['shards']:.1%} of the set by one), "
                  f"audio bytes read {audio} ({audio / t['audio_bytes'] / args.processes:.1%} of the set per "
                  f"process on average), {f['seconds']:.2f} s reading")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
