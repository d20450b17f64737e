"""Each training technique with and without it, at the same compute: held-out EER on the built-in corpus (issue 13).

    OMP_NUM_THREADS=2 python benchmarks/techniques.py [--json techniques.json] [--smoke]

One baseline (ResNetSE34L + aamsoftmax, crops of 1 s, N × M=1, Adam at a constant rate; what trains meaningfully in
about a minute on 2 cores) trained ``--steps`` optimizer steps; each technique is the baseline with that one
change, at the same number of steps:

- speed perturbation: ``augment.speed_perturb=[0.9,1.0,1.1]`` (each speed a new speaker identity);
- SpecAugment: ``augment.spec_augment=true`` (WeSpeaker's masks);
- MUSAN/RIR: ``augment.enabled=true``, ``aug_prob`` 0.6, on common.write_banks's MUSAN- and RIR-like banks;
- large-margin fine-tuning: ``--steps − --lm-steps`` base steps, then ``--lm-steps`` from it (``train.init_from``)
  with margin 0.4, crops twice as long and a tenth of the learning rate (configs/*_lm.yaml's recipe, scaled);
- checkpoint averaging: the baseline run's last ``--average`` checkpoints (``speakerid.average``; saved every
  ``--save-every`` steps) against its last one;
- score calibration: the baseline's scores against the same scores calibrated on ``shardify calibration-trials``
  of the training shards: EER unchanged by design, so the row is Cllr (and actual DCF 0.05 beside it).

Every model is scored the same way (whole utterances, cosine, no normalisation) on the corpus's held-out speakers.
The table prints technique, figure without → with and Δ; ``--json`` writes the rows, the command and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from common import machine, pack_banks, write_banks

from speakerid.config import load_config
from speakerid.data.lists import entries_from_trials, read_train_list
from speakerid.data.pack import pack
from speakerid.data.plan import PackConfig, make_plan
from speakerid.data.synthetic import CorpusSpec, generate_corpus
from speakerid.evaluation import ExtractConfig, evaluate
from speakerid.evaluation.calibration import CalibrationConfig
from speakerid.evaluation.calibration_trials import make_calibration_trials
from speakerid.evaluation.trials import read_trial_lists
from speakerid.inference import load_inference_checkpoint
from speakerid.metrics import cllr
from speakerid.training import train
from speakerid.training.average import average_checkpoints

TECHNIQUES = ("speed", "specaug", "musan", "lm", "average", "calibration")


def baseline_overrides(args, shards: Path, seed: int) -> list[str]:
    """The baseline recipe as dotted overrides of the config defaults (no YAML file: it is this script's)."""
    return ["model.name=ResNetSE34L", "model.options={n_out: 128, encoder_type: SAP, log_input: true}",
            "loss.name=aamsoftmax", "loss.options={margin: 0.2, scale: 30.0}",
            "loss.margin_warmup_start=1", "loss.margin_warmup_end=2",  # margin 0.2 from step 0: no learning in 150 steps
            f"data.train_shards={shards}", f"data.n_speakers={args.batch}", "data.utts_per_speaker=1",
            f"data.max_frames={args.frames}", "data.workers=1",
            "optim.name=adam", f"optim.lr={args.lr}", "schedule.name=constant",
            "validation.trials=", "train.max_epoch=100000", f"train.max_steps={args.steps}",
            f"train.save_every_steps={args.save_every}", f"train.keep_checkpoints={args.average}",
            "train.mixed_precision=no", f"train.log_every={max(1, args.steps // 10)}", f"train.seed={seed}"]


def run_training(run_dir: Path, overrides: list[str], console: Console) -> float:
    """Train from scratch (an earlier run of the same name is removed: resuming would add steps); seconds spent."""
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    result = train(load_config(None, [*overrides, f"train.run_dir={run_dir}"]))
    if result.stopped_by_signal:  # SIGTERM/SIGINT reached the trainer: the whole benchmark stops, no table
        console.print(f"stopped by a signal while training {run_dir} (step {result.progress.step}): no table written")
        raise SystemExit(143)
    seconds = time.perf_counter() - started
    console.print(f"trained {run_dir.name} in {seconds:.0f} s")
    return seconds


def score(run_dir: Path, last: int, name: str, trials: Path, eval_shards: Path, out: Path,
          calibration: CalibrationConfig = CalibrationConfig()):
    """The run's last ``last`` checkpoints averaged (1: the last one) → evaluate on the held-out trials."""
    model_dir = out / "models" / name
    average_checkpoints(run_dir, model_dir, last=last)
    report = evaluate(load_inference_checkpoint(model_dir), [trials], eval_shards, out / "eval" / name,
                      ExtractConfig(), cache=None, calibration=calibration)
    return report.lists[0]


def raw_cllr(result, trials: Path) -> float:
    """Cllr of the raw cosine scores read as log-likelihood ratios: what an uncalibrated system reports."""
    scores = np.array([float(line.split()[0]) for line in result.scores_path.read_text().splitlines()])
    return cllr(scores, read_trial_lists([trials])[0].labels)


def one_seed(args, seed: int, corpus, shards: Path, eval_shards: Path, banks, console: Console,
             seconds: dict[str, float]):
    """Every row trained and scored with one training seed (same corpus, shards and trials): (baseline, rows)."""
    out = args.out / f"seed-{seed}"
    base, runs, trials = baseline_overrides(args, shards, seed), out / "runs", corpus.trials

    def timed(name: str, overrides: list[str]) -> None:
        seconds[f"{name}/{seed}"] = run_training(runs / name, overrides, console)

    timed("baseline", base)
    baseline = score(runs / "baseline", 1, "baseline", trials, eval_shards, out)
    rows: list[dict] = []

    def eer_row(technique: str, change: str, result) -> None:
        rows.append({"technique": technique, "change": change, "figure": "EER %",
                     "without": baseline.metrics.eer, "with": result.metrics.eer,
                     "min_dcf_05": [baseline.metrics.min_dcf_05, result.metrics.min_dcf_05]})

    single = {"speed": ("speed perturbation", ["augment.speed_perturb=[0.9,1.0,1.1]"]),
              "specaug": ("SpecAugment", ["augment.spec_augment=true"])}
    if banks:
        single["musan"] = ("MUSAN/RIR", ["augment.enabled=true", "augment.aug_prob=0.6",
                                         f"augment.musan_shards={banks[0]}", f"augment.rir_shards={banks[1]}"])
    for key, (technique, change) in single.items():
        if key in args.only:
            timed(key, [*base, *change])
            eer_row(technique, " ".join(c for c in change if "_shards=" not in c),
                    score(runs / key, 1, key, trials, eval_shards, out))
    if "lm" in args.only:
        base_steps = args.steps - args.lm_steps
        timed("lm-base", [*base, f"train.max_steps={base_steps}"])
        timed("lm", [*base, "train.init_from=" + str(runs / "lm-base"), f"train.max_steps={args.lm_steps}",
                     "loss.options={margin: 0.4, scale: 30.0}", "loss.margin_warmup_start=0",
                     "loss.margin_warmup_end=0", f"data.max_frames={2 * args.frames}", f"optim.lr={args.lr / 10}"])
        eer_row("large-margin fine-tuning", f"{base_steps} base + {args.lm_steps} steps at margin 0.4, "
                f"{2 * args.frames}-frame crops, lr {args.lr / 10:g}", score(runs / "lm", 1, "lm", trials,
                                                                             eval_shards, out))
    if "average" in args.only:
        eer_row("checkpoint averaging", f"last {args.average} checkpoints, every {args.save_every} steps",
                score(runs / "baseline", args.average, "average", trials, eval_shards, out))
    if "calibration" in args.only:
        cal_trials = out / "calibration-trials.txt"
        pairs = 16 if args.smoke else 5000
        make_calibration_trials(shards, cal_trials, pairs=pairs, seed=seed)
        calibrated = score(runs / "baseline", 1, "calibrated", trials, eval_shards, out,
                           CalibrationConfig(calibration_trials=str(cal_trials), calibration_audio=str(shards)))
        rows.append({"technique": "score calibration", "change": f"--calibration-trials ({pairs:,} training-speaker pairs)",
                     "figure": "Cllr", "without": raw_cllr(baseline, trials), "with": calibrated.calibrated["cllr"],
                     "eer": [baseline.metrics.eer, calibrated.calibrated["eer"]],
                     "actual_dcf_05": calibrated.calibrated["actual_dcf"]["p_target_0.05"]})
    return baseline.metrics, rows


def mean_row(per_seed: list[dict]) -> dict:
    """One technique's row over the seeds: means of its figures, and each seed's own Δ (the spread to read it by)."""
    first = per_seed[0]
    mean = {key: (np.mean([r[key] for r in per_seed], axis=0).tolist() if key in ("min_dcf_05", "eer") else
                  float(np.mean([r[key] for r in per_seed])))
            for key in first if key not in ("technique", "change", "figure")}
    deltas = [r["with"] - r["without"] for r in per_seed]
    return {"technique": first["technique"], "change": first["change"], "figure": first["figure"], **mean,
            "delta": float(np.mean(deltas)), "delta_per_seed": deltas}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/speakerid-techniques"),
                        help="corpus, shards, runs and evaluations (a re-run reuses the corpus and shards, retrains)")
    # 200 training speakers × 10 did not learn in 150 steps of N=32 (loss at log 200, EER 46.6 %); 40 × 20 does
    parser.add_argument("--speakers", type=int, default=40, help="training speakers of the built-in corpus")
    parser.add_argument("--utts", type=int, default=20, help="utterances per training speaker")
    parser.add_argument("--test-speakers", type=int, default=10, help="held-out speakers (their trials are scored)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of every row")
    parser.add_argument("--lm-steps", type=int, default=30, help="of --steps, the large-margin fine-tuning's")
    parser.add_argument("--batch", type=int, default=32, help="speakers per batch (N; M = 1)")
    parser.add_argument("--frames", type=int, default=100, help="training crop, frames of 10 ms (LM: twice this)")
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--average", type=int, default=5, help="checkpoints averaged")
    parser.add_argument("--save-every", type=int, default=10, help="steps between the baseline's checkpoints")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                        help="training seeds: every row is trained once per seed; the table shows the means")
    parser.add_argument("--only", nargs="+", choices=TECHNIQUES, default=list(TECHNIQUES))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="corpus and packing processes")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite): the figures mean nothing")
    parser.add_argument("--json", type=Path)
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.speakers, args.utts, args.test_speakers, args.batch = 6, 3, 3, 4
        args.steps, args.lm_steps, args.save_every, args.average, args.frames = 6, 2, 2, 2, 40
        args.seeds = args.seeds[:1]
    seeds = args.seeds
    command = " ".join(["python", *sys.argv]) if argv is None else "techniques.main(" + " ".join(argv) + ")"
    console = Console(stderr=True)
    started = datetime.datetime.now().astimezone()
    about_machine = machine()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    corpus = generate_corpus(out / "corpus", CorpusSpec(n_speakers=args.speakers, utts_per_speaker=args.utts,
                                                        n_test_speakers=args.test_speakers), workers=args.workers)
    shards, eval_shards = out / "shards" / "train", out / "shards" / "eval"
    pack(make_plan(read_train_list(corpus.train_list), corpus.root, PackConfig(encoding="wav")), corpus.root, shards,
         workers=args.workers)
    pack(make_plan(entries_from_trials([corpus.trials]), corpus.root, PackConfig(kind="eval", encoding="wav")),
         corpus.root, eval_shards, workers=args.workers)
    console.print(f"corpus: {corpus.n_speakers} training + {corpus.n_test_speakers} held-out speakers, "
                  f"{corpus.hours:.2f} h, {corpus.n_trials} trials")
    banks = write_banks(out / "banks") if "musan" in args.only else None
    banks = banks and (pack_banks(banks[0], out / "shards" / "musan"), pack_banks(banks[1], out / "shards" / "rirs"))
    seconds: dict[str, float] = {}
    per_seed = [one_seed(args, seed, corpus, shards, eval_shards, banks, console, seconds) for seed in seeds]
    baselines = [baseline for baseline, _ in per_seed]
    baseline = {"eer": float(np.mean([b.eer for b in baselines])), "eer_per_seed": [b.eer for b in baselines],
                "min_dcf_05": float(np.mean([b.min_dcf_05 for b in baselines]))}
    rows = [mean_row([seed_rows[i] for _, seed_rows in per_seed]) for i in range(len(per_seed[0][1]))]

    table = Table(title=f"techniques at {args.steps} steps, mean of {len(seeds)} seed(s): held-out EER "
                        f"({corpus.n_trials} trials; baseline EER {baseline['eer']:.2f} %)")
    for column in ("technique", "change", "figure", "without → with", "Δ", "Δ per seed"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(r["technique"], r["change"], r["figure"], f"{r['without']:.3f} → {r['with']:.3f}",
                      f"{r['delta']:+.3f}", " ".join(f"{d:+.2f}" for d in r["delta_per_seed"]))
    Console().print(table)
    ended = datetime.datetime.now().astimezone()
    console.print(f"machine: {about_machine}; {(ended - started).total_seconds():.0f} s in all; training s: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    console.print(f"command: {command}")
    if args.json:
        args.json.write_text(json.dumps({
            "command": command, "date": started.isoformat(timespec="seconds"), "machine": about_machine,
            "seconds": (ended - started).total_seconds(), "training_seconds": seconds,
            "config": {k: v for k, v in vars(args).items() if not isinstance(v, Path)} | {"trials": corpus.n_trials},
            "baseline": baseline, "rows": rows,
        }, indent=1, default=str))
    return rows


if __name__ == "__main__":
    main()
