"""The newcomer's path in one command (``make demo`` runs it): built-in corpus → shards → train → evaluate.

    python -m speakerid.demo [--out data/demo] [--epochs N] [key=value …]

Generates the built-in synthetic corpus, packs training and evaluation shards with shardify, scores the
untrained model on the held-out speakers' trials, trains ``configs/demo.yaml`` (``--workers`` are the
corpus and packing processes; the recipe sets the DataLoader workers), scores the trained model,
and prints one closing table: hours of audio, shards, training speed, the EER before and after, and where
the checkpoint, scores and DET plot are. The test suite runs this same function at a reduced size.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from speakerid.config import load_config
from speakerid.data.lists import entries_from_trials, read_train_list
from speakerid.data.pack import pack
from speakerid.data.plan import PackConfig, make_plan
from speakerid.data.synthetic import CorpusSpec, generate_corpus

RECIPE = Path(__file__).resolve().parent / "recipes" / "demo.yaml"  # the checkout's configs/demo.yaml
DEMO_CORPUS = CorpusSpec(n_speakers=200, utts_per_speaker=10, n_test_speakers=20)  # 1,800 held-out trials


@dataclass
class DemoReport:
    recipe: str
    hours: float
    train_shards: int
    eval_shards: int
    utterances_per_s: float
    eer_before: float
    eer_after: float
    min_dcf_after: float
    checkpoint: Path
    scores: Path
    det: Path | None
    seconds: float


def _eer(checkpoint_dir: Path, trials: Path, audio: Path, out: Path):
    from speakerid.evaluation import ExtractConfig, evaluate
    from speakerid.inference import load_inference_checkpoint

    report = evaluate(load_inference_checkpoint(checkpoint_dir), [trials], audio, out, ExtractConfig(), cache=None)
    return report, report.lists[0].metrics


def run_demo(out: str | Path = "data/demo", *, spec: CorpusSpec = DEMO_CORPUS, epochs: int | None = None,
             workers: int = 2, overrides: list[str] = (), console: Console | None = None) -> DemoReport:
    """The whole demo; ``epochs`` None trains the recipe's ``train.max_epoch``."""
    console = console or Console(stderr=True)
    started = time.perf_counter()
    out = Path(out)
    with console.status("generating the built-in corpus …"):
        corpus = generate_corpus(out / "corpus", spec, workers=workers)
    console.print(f"corpus: {corpus.n_speakers} training + {corpus.n_test_speakers} held-out speakers, "
                  f"{corpus.n_utterances} utterances, {corpus.hours:.2f} h, {corpus.n_trials} trials")

    train_shards, eval_shards = out / "shards" / "train", out / "shards" / "eval"
    with console.status("packing shards …"):
        train_plan = make_plan(read_train_list(corpus.train_list), corpus.root,
                               PackConfig(encoding="wav", shard_size=16 * 1024**2))
        pack(train_plan, corpus.root, train_shards, workers=workers)
        eval_plan = make_plan(entries_from_trials([corpus.trials]), corpus.root,
                              PackConfig(kind="eval", encoding="wav", shard_size=16 * 1024**2))
        pack(eval_plan, corpus.root, eval_shards, workers=workers)
    console.print(f"shards: {len(train_plan.names)} training, {len(eval_plan.names)} evaluation in {out / 'shards'}")

    run_dir = out / "run"
    config = load_config(RECIPE, [f"data.train_shards={train_shards}", f"validation.trials={corpus.trials}",
                                  f"validation.audio={eval_shards}", f"train.run_dir={run_dir}",
                                  *([f"train.max_epoch={epochs}"] if epochs else []), *overrides])

    from accelerate.utils import set_seed

    from speakerid.inference import save_inference_checkpoint
    from speakerid.training import build_model_and_loss, train

    set_seed(config.train.seed)  # as train() does: "before" is the network training starts from
    untrained, _ = build_model_and_loss(config, n_classes=spec.n_speakers)
    save_inference_checkpoint(out / "untrained", untrained, model_name=config.model.name,
                              model_options=config.model.options, loss_name=config.loss.name)
    _, before = _eer(out / "untrained", corpus.trials, eval_shards, out / "eval-untrained")
    console.print(f"untrained model: EER {before.eer:.2f} % on the held-out speakers")

    result = train(config)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["utterances_per_s"] for r in records if "utterances_per_s" in r]
    report, after = _eer(run_dir, corpus.trials, eval_shards, out / "eval")
    return DemoReport(
        recipe=f"{config.model.name} + {config.loss.name}, {config.train.max_epoch} epochs of "
               f"N={config.data.n_speakers} × M={config.data.utts_per_speaker} ({RECIPE.name})",
        hours=corpus.hours, train_shards=len(train_plan.names), eval_shards=len(eval_plan.names),
        utterances_per_s=sum(speeds) / max(1, len(speeds)), eer_before=before.eer, eer_after=after.eer,
        min_dcf_after=after.min_dcf_05, checkpoint=result.run_dir / "export", scores=report.lists[0].scores_path,
        det=report.det_path, seconds=time.perf_counter() - started,
    )


def print_report(report: DemoReport, console: Console) -> None:
    table = Table(title="speakerid demo", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # paths are printed whole, to be copied
    for row in (
        ("trained", report.recipe),
        ("audio", f"{report.hours:.2f} h"),
        ("shards (train / eval)", f"{report.train_shards} / {report.eval_shards}"),
        ("training speed", f"{report.utterances_per_s:.0f} utterances/s"),
        ("EER before training", f"{report.eer_before:.2f} %"),
        ("EER after training", f"{report.eer_after:.2f} % (minDCF 0.05: {report.min_dcf_after:.3f})"),
        ("checkpoint", str(report.checkpoint)),
        ("scores", str(report.scores)),
        ("DET plot", str(report.det) if report.det else "install matplotlib for det.png"),
        ("wall time", f"{report.seconds / 60:.1f} min"),
    ):
        table.add_row(*row)
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m speakerid.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/demo")
    parser.add_argument("--epochs", type=int, help="epochs to train (default: configs/demo.yaml's train.max_epoch)")
    parser.add_argument("--speakers", type=int, default=DEMO_CORPUS.n_speakers, help="training speakers")
    parser.add_argument("--utts", type=int, default=DEMO_CORPUS.utts_per_speaker, help="utterances per training speaker")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides of configs/demo.yaml")
    return parser


def main(argv: list[str] | None = None) -> DemoReport:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    report = run_demo(args.out, spec=replace(DEMO_CORPUS, n_speakers=args.speakers, utts_per_speaker=args.utts),
                      epochs=args.epochs, workers=args.workers, overrides=args.overrides, console=console)
    print_report(report, console)
    return report


if __name__ == "__main__":
    main()
