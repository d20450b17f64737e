"""speakerid evaluate (checkout: python -m evaluate): embed test audio with a checkpoint, score trial lists, report
EER and minDCF.

CKPT is a speakerid inference checkpoint, a training run directory (its export/) or a voxceleb_trainer
.model file. Parsing and printing only: the work is done by speakerid.evaluation.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from speakerid.cli.help import parser as help_parser
from speakerid.errors import SpeakeridError

console = Console(stderr=True, soft_wrap=True)


PROG = "python -m evaluate"
DESCRIPTION = """\
Embed test audio with a checkpoint, score trial lists, report EER and minDCF. CKPT is a speakerid inference
checkpoint, a training run directory (its export/) or a voxceleb_trainer .model file."""
EXAMPLES = """\
  {prog} --checkpoint CKPT --trials veri_test2.txt [list_test_all2.txt …] --audio ROOT_OR_SHARDS
  {prog} --checkpoint baseline_lite_ap.model --model ResNetSE34L --loss angleproto \\
      --option nOut=512 --option encoder_type=SAP --trials veri_test.txt --audio voxceleb1/wav \\
      --eval-frames 400 --num-eval 10                  (the seeds' 10-crop protocol)
  {prog} --embed --checkpoint CKPT --audio ROOT_OR_SHARDS [--list LIST] --out emb.safetensors
  {prog} … --calibration-trials cal.txt --calibration-audio TRAIN_SHARDS [--quality duration norm]
                                                       (calibrated LLRs: Cllr, actual DCF; cal.txt from
                                                        speakerid shardify calibration-trials)
  accelerate launch -m speakerid evaluate …            (extraction spread over the processes)"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = help_parser(prog, DESCRIPTION, EXAMPLES)
    parser.add_argument("--checkpoint", required=True,
                        help="speakerid checkpoint directory, training run directory, or voxceleb_trainer .model file")
    parser.add_argument("--model", help=".model files: the architecture (e.g. ResNetSE34L)")
    parser.add_argument("--loss", help=".model files: the training loss (decides test-time normalisation)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", dest="options",
                        help=".model files: a training option, seed spelling (nOut=512, encoder_type=SAP); repeatable")
    parser.add_argument("--audio", required=True, help="audio folder the lists' paths are relative to, or eval shards")
    parser.add_argument("--trials", nargs="+", default=[], help="VoxCeleb-format trial lists ('label enroll test')")
    parser.add_argument("--out", help="output directory (evaluation; default eval/NAME) or file (--embed)")
    parser.add_argument("--embed", action="store_true", dest="embed_only",
                        help="write embeddings instead of scoring trials")
    parser.add_argument("--list", dest="audio_list", metavar="LIST",
                        help="--embed: 'relpath' or 'speaker relpath' lines (default: everything in --audio)")

    g = parser.add_argument_group("extraction")
    g.add_argument("--eval-frames", type=int, default=0, help="0: whole utterances (default); 400: the seeds' crops")
    g.add_argument("--num-eval", type=int, default=10, help="crops per utterance with --eval-frames (seeds: 10)")
    g.add_argument("--trim-tolerance", type=float, default=0.02,
                   help="whole utterances: fraction of an utterance trimmed at most so that it batches (default 0.02)")
    g.add_argument("--batch-seconds", type=float, default=0.0, help="audio per forward pass (default 40 CPU / 1200 GPU)")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: bf16 (or fp16) on GPU, fp32 on CPU")
    g.add_argument("--no-channels-last", action="store_false", dest="channels_last",
                   help="keep the default memory format")
    g.add_argument("--workers", type=int, default=1, help="audio-decoding DataLoader workers per process")
    cache = g.add_mutually_exclusive_group()
    cache.add_argument("--cache", help="embedding cache file (default OUT/embeddings.safetensors)")
    cache.add_argument("--no-cache", action="store_true", help="neither read nor write an embedding cache")

    s = parser.add_argument_group("scoring")
    s.add_argument("--cohort", help="training shards (or an audio folder) for mean subtraction / AS-Norm")
    s.add_argument("--cohort-speakers", type=int, default=2000, help="cohort speakers, at most (default 2000)")
    s.add_argument("--cohort-utts", type=int, default=4, dest="cohort_utts_per_speaker", metavar="COHORT_UTTS",
                   help="utterances per cohort speaker, at most (default 4)")
    s.add_argument("--mean-subtraction", action="store_true", help="subtract the cohort's mean embedding")
    s.add_argument("--as-norm", action="store_true", help="adaptive s-norm with the top-k cohort speakers")
    s.add_argument("--top-k", type=int, default=300, help="AS-Norm top-k (default 300)")
    s.add_argument("--threshold", type=float,
                   help="actual DCF threshold (default: the EER threshold of the first labelled list)")

    c = parser.add_argument_group("calibration")
    c.add_argument("--calibration-trials", metavar="LIST",
                   help="labelled trials of training speakers (python -m shardify calibration-trials): fit a "
                        "logistic-regression calibration on them and apply it to every list")
    c.add_argument("--calibration-audio", metavar="SHARDS",
                   help="the training shards the calibration list was drawn from (or an audio folder / eval shards)")
    c.add_argument("--quality", nargs="+", choices=("duration", "norm"), default=[],
                   help="quality measures beside the score (QMF): duration (log seconds), norm (embedding norm); "
                        "the map is then no longer monotone, so EER/minDCF may change too")
    c.add_argument("--calibration-prior", type=float, default=0.05,
                   help="effective prior p_target the calibration is weighted for (default 0.05)")
    c.add_argument("--calibration", metavar="JSON",
                   help="apply the calibration.json of an earlier run (same checkpoint, protocol, normalisation) "
                        "instead of fitting one")
    return parser


class RichProgress:
    """The library's progress callback (main process only) as a rich progress bar."""

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.tasks: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if self.bar is None:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=console, transient=True)
            self.bar.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total)
        self.bar.update(self.tasks[stage], completed=done)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    progress = RichProgress()
    try:
        from speakerid.evaluation import EmbedReport, run_command

        report = run_command(**vars(args), progress=progress)
    except SpeakeridError as error:
        progress.stop()
        console.print(f"[red]error:[/] {escape(str(error))}", highlight=False)
        return 2
    progress.stop()
    if isinstance(report, EmbedReport):
        print_extraction(report.extraction)
        console.print(escape(f"{report.n_utterances} embeddings of {report.embedding_dim} values → {report.path}"),
                      highlight=False)
    elif report is not None:
        print_report(report)
    return 0


def print_extraction(stats) -> None:
    speed = f", {stats.audio_seconds / stats.seconds:.0f}× real time" if stats.embedded and stats.seconds else ""
    cached = f"; {stats.from_cache} reused from the cache" if stats.from_cache else ""
    console.print(escape(f"embedded {stats.embedded} of {stats.utterances} utterances in {stats.seconds:.1f} s"
                         f"{speed}{cached}" + (f" ({stats.cache_note})" if stats.cache_note else "")), highlight=False)


def print_report(report) -> None:
    print_extraction(report.extraction)
    table = Table(title=f"speaker verification (normalisation: {report.normalisation}, {report.world_size} process(es))")
    calibrated = report.calibration is not None
    columns = ["trial list", "trials", "EER %", "minDCF 0.05", "minDCF 0.01", "actDCF 0.05", "minCllr"]
    if calibrated:
        columns += ["Cllr (cal)", "actDCF 0.05 (cal)"] + (["EER % (cal)"] if not report.calibration.monotone else [])
    for column in columns:
        table.add_column(column, justify="left" if column == "trial list" else "right")
    for result in report.lists:
        m = result.metrics
        if m is None:
            table.add_row(escape(result.name), f"{result.n_trials:,}", "scores only", *[""] * (len(columns) - 3))
            continue
        row = [escape(result.name), f"{result.n_trials:,}", f"{m.eer:.4f}", f"{m.min_dcf_05:.5f}",
               f"{m.min_dcf_01:.5f}", f"{result.actual_dcf['p_target_0.05']:.5f}", f"{result.min_cllr:.4f}"]
        if calibrated:
            cal = result.calibrated
            row += [f"{cal['cllr']:.4f}", f"{cal['actual_dcf']['p_target_0.05']:.5f}"]
            row += [f"{cal['eer']:.4f}"] if not report.calibration.monotone else []
        table.add_row(*row)
    Console(soft_wrap=True).print(table)
    if calibrated:
        fit = report.calibration
        console.print(escape(f"calibration: {' + '.join(fit.features)} fitted on {fit.n_target} target / "
                             f"{fit.n_nontarget} non-target trials of {fit.trials} at p_target {fit.p_target:g} → "
                             f"{report.out_dir / 'calibration.json'}; calibrated LLRs in llr-*.txt"), highlight=False)
        if fit.weights[0] <= 0:
            console.print("[yellow]warning:[/] the calibration's score weight is not positive: on the calibration "
                          "trials higher scores do not mean 'same speaker' (an untrained model, or the wrong list?)")
    for result in report.lists:
        console.print(escape(f"scores: {result.scores_path}"), highlight=False)
    console.print(escape(f"summary: {report.summary_path}"), highlight=False)
    if report.det_path is not None:
        console.print(escape(f"DET curve: {report.det_path}"), highlight=False)
    elif any(r.metrics for r in report.lists):
        console.print("DET curve skipped: matplotlib is not installed (pip install matplotlib)")


if __name__ == "__main__":
    from speakerid.runtime import exit_process

    exit_process(main())
