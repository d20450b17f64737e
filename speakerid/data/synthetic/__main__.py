"""python -m speakerid.data.synthetic --out DIR: write the synthetic corpus, with a progress bar and a summary."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from speakerid.data.synthetic.corpus import CorpusInfo, generate_corpus
from speakerid.data.synthetic.spec import CorpusSpec


def build_parser() -> argparse.ArgumentParser:
    defaults = CorpusSpec()
    parser = argparse.ArgumentParser(prog="python -m speakerid.data.synthetic",
                                     description="Write a deterministic synthetic VoxCeleb-shaped speaker corpus.")
    parser.add_argument("--out", required=True, help="output directory (wav/, lists, trials.txt, corpus.json)")
    parser.add_argument("--speakers", type=int, default=defaults.n_speakers, help="training speakers")
    parser.add_argument("--utts", type=int, default=defaults.utts_per_speaker, help="utterances per training speaker")
    parser.add_argument("--test-speakers", type=int, default=defaults.n_test_speakers, help="held-out speakers")
    parser.add_argument("--test-utts", type=int, default=defaults.test_utts_per_speaker,
                        help="utterances per held-out speaker")
    parser.add_argument("--videos", type=int, default=defaults.videos_per_speaker, help="videos (sessions) per speaker")
    parser.add_argument("--min-seconds", type=float, default=defaults.min_seconds)
    parser.add_argument("--max-seconds", type=float, default=defaults.max_seconds)
    parser.add_argument("--trials", type=int, default=defaults.n_trials, help="trials wanted (capped by the test set)")
    parser.add_argument("--sample-rate", type=int, default=defaults.sample_rate)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--workers", type=int, default=1, help="processes (the output does not depend on it)")
    return parser


def main(argv: Sequence[str] | None = None) -> CorpusInfo:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        spec = CorpusSpec(n_speakers=args.speakers, utts_per_speaker=args.utts, n_test_speakers=args.test_speakers,
                          test_utts_per_speaker=args.test_utts, videos_per_speaker=args.videos,
                          min_seconds=args.min_seconds, max_seconds=args.max_seconds, n_trials=args.trials,
                          sample_rate=args.sample_rate, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console()
    n_total = spec.n_speakers * spec.utts_per_speaker + spec.n_test_speakers * spec.test_utts_per_speaker
    started = time.perf_counter()
    with Progress(TextColumn("synthesising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("utterances", total=n_total)
        info = generate_corpus(args.out, spec, workers=args.workers, progress=lambda n: bar.advance(task, n))
    elapsed = time.perf_counter() - started

    table = Table(title=f"synthetic corpus in {args.out}", show_header=False)
    table.add_row("training", f"{spec.n_speakers} speakers, {spec.n_speakers * spec.utts_per_speaker} utterances, "
                              f"{info.train_hours:.2f} h  →  {info.train_list}")
    table.add_row("held-out", f"{spec.n_test_speakers} speakers, "
                              f"{spec.n_test_speakers * spec.test_utts_per_speaker} utterances, "
                              f"{info.test_hours:.2f} h  →  {info.test_list}")
    table.add_row("trials", f"{info.n_trials}  →  {info.trials}")
    speed = f" ({info.hours * 3600 / elapsed:.0f}x real time)" if info.n_written == info.n_utterances else ""
    table.add_row("written", f"{info.n_written} new files in {elapsed:.1f} s{speed}")
    console.print(table)
    return info


if __name__ == "__main__":
    main()
