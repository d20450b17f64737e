"""speakerid shardify (checkout: python -m shardify): pack a speaker corpus into WebDataset tar shards, verify them,
merge parts, read them as training batches, draw calibration trials.

Parsing and printing only: the work is done by speakerid.data.
"""

from __future__ import annotations

import argparse
import re
import sys

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from speakerid.audio import MIN_SECONDS
from speakerid.data.batch_config import BatchConfig, batch_fields
from speakerid.data import index as shard_index
from speakerid.data import lists, pack
from speakerid.data.plan import DEFAULT_SHARD_SIZE, KINDS, PackConfig, make_plan
from speakerid.cli.help import HelpFormatter, examples
from speakerid.errors import SpeakeridError

console = Console(stderr=True, soft_wrap=True)  # messages keep whole paths on one line

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def byte_size(text: str) -> int:
    """'256MB', '1GiB', '500k' or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 256MB, 1GiB, 500000)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return ""


PROG = "python -m shardify"
DESCRIPTION = "Pack a speaker corpus into WebDataset tar shards, verify them, merge parts, read them."
EXAMPLES = {
    "pack": """\
  {prog} --list train_list.txt --root AUDIO_ROOT --out SHARD_DIR
  {prog} --kind eval --trials veri_test2.txt --root VOX1_WAV --out EVAL_SHARDS
  {prog} --kind noise --root musan_split --out MUSAN_SHARDS
  {prog} … --part 3 --parts 16          (one SLURM array task; then: shardify merge SHARD_DIR)""",
    "verify": "  {prog} SHARD_DIR [--decode]",
    "merge": "  {prog} SHARD_DIR                     (after `pack --part i --parts n` array tasks)",
    "read": """\
  {prog} SHARD_DIR_OR_URL --batch-size 200 --nPerSpeaker 2 --workers 8
                                        (one epoch of training batches: speed, coverage, faults)""",
    "calibration-trials": """\
  {prog} TRAIN_SHARDS --out cal.txt --pairs 5000 --seed 0
                                        (a trial list of training speakers for score calibration)""",
}


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    every = "\n".join(lines.replace("{prog}", f"{{prog}} {name}") for name, lines in EXAMPLES.items())
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=examples(every, prog),
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                              epilog=examples(EXAMPLES[name], f"{prog} {name}"), formatter_class=HelpFormatter)

    p = add("pack", "pack audio into tar shards (resumes when re-run)")
    p.add_argument("--list", help="train: 'speaker relpath' lines; eval: 'relpath' or 'speaker relpath' lines "
                                  "(without it, every audio file under --root; train: speaker = first folder)")
    p.add_argument("--trials", nargs="+", default=[], help="eval: trial lists whose utterances to pack")
    p.add_argument("--root", required=True, help="folder the list's paths are relative to")
    p.add_argument("--out", required=True, help="shard directory (created; resumed if it holds this plan)")
    p.add_argument("--kind", choices=KINDS, default="train",
                   help="train: speaker chunks, shuffled; eval: test audio keyed by path; noise: MUSAN/RIR banks")
    p.add_argument("--encoding", choices=("flac", "wav"), default="flac",
                   help="flac (default, ~60%% of the bytes) or wav 16-bit PCM (fastest to read)")
    p.add_argument("--chunk-size", type=int, default=16, help="utterances per speaker chunk (train)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shard-size", type=byte_size, default=DEFAULT_SHARD_SIZE,
                      help="target shard size, estimated from input file sizes (default 256MiB)")
    size.add_argument("--max-utts", type=int, help="utterances per shard instead of a byte target")
    p.add_argument("--seed", type=int, default=0, help="seed of the chunking and shuffling")
    p.add_argument("--sample-rate", type=int, default=16000,
                   help="sample rate of the shards; files at another rate are errors unless --resample")
    p.add_argument("--resample", action="store_true", help="resample files at another rate instead of failing")
    p.add_argument("--downmix", action="store_true", help="average multi-channel files instead of failing")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out missing/undecodable/truncated/too short files (counted in the summary and index) "
                        "instead of failing")
    p.add_argument("--min-seconds", type=float,
                   help=f"shortest usable file; shorter ones are errors (default {MIN_SECONDS} s as evaluation "
                        "requires; noise: none)")
    p.add_argument("--prefix", help="shard file name prefix (default: the kind)")
    p.add_argument("--workers", type=int, default=1, help="processes encoding shards in parallel")
    p.add_argument("--part", type=int, default=0, help="this task's part, 0 <= part < parts (SLURM array)")
    p.add_argument("--parts", type=int, default=1, help="number of parts; then run `merge` once all are done")

    v = add("verify", "re-check every shard against index.json")
    v.add_argument("shard_dir", help="the shard directory holding index.json")
    v.add_argument("--decode", action="store_true", help="also decode every audio member")
    v.add_argument("--workers", type=int, default=2, help="processes checking shards in parallel")

    m = add("merge", "write index.json once every part of a --parts run has finished")
    m.add_argument("shard_dir", help="the shard directory all parts wrote to")

    r = add("read", "read training batches for an epoch: crops/s, coverage, faults")
    r.add_argument("shards", help="shard directory, its index.json, or an http(s) URL of either")
    r.add_argument("--urls", help="shard URLs instead of the index's neighbours (brace pattern, pipe:, http)")
    for name, type_, option in batch_fields():  # the run config's data.* options: same defaults, help, seed names
        flags = dict.fromkeys(f"--{n.replace('_', '-')}" for n in (option.metadata.get("seed"), name) if n)
        r.add_argument(*flags, dest=name, type=type_, default=option.default, help=option.metadata["help"])
    r.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    r.add_argument("--world-size", type=int, default=1, help="read as rank --rank of this many")
    r.add_argument("--rank", type=int, default=0, help="the rank to read as, 0 <= rank < world size")
    r.add_argument("--epochs", type=float, default=1.0, help="epochs to read (fractions allowed)")
    r.add_argument("--io-timeout", type=float, default=60.0, help="seconds without a byte from an http/pipe: shard")

    c = add("calibration-trials", "draw a calibration trial list of training speakers from shards")
    c.add_argument("shards", help="training shard directory, its index.json, or an http(s) URL of either")
    c.add_argument("--out", required=True, help="trial list to write ('1|0 enroll test', shard keys)")
    c.add_argument("--pairs", type=int, default=5000, help="target pairs, and as many non-target pairs (default 5000)")
    c.add_argument("--seed", type=int, default=0, help="seed of the drawing (default 0)")
    c.add_argument("--max-shards", type=int, default=8,
                   help="read the first this many shards (index order) for utterances (default 8)")
    return parser


class RichListener(pack.PackListener):
    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("utts"),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
        )
        self.task = None
        self.bytes = 0

    def note(self, text):
        console.print(f"[yellow]note[/]: {escape(text)}", highlight=False)

    def started(self, plan, todo_utterances, resumed_shards):
        if resumed_shards:
            console.print(f"resuming: {resumed_shards} finished shard(s) kept")
        self.progress.start()
        self.task = self.progress.add_task("packing", total=todo_utterances, rate="")

    def advance(self, utterances, input_bytes):
        self.bytes += input_bytes
        elapsed = self.progress.tasks[0].elapsed or 1e-9
        self.progress.update(self.task, advance=utterances, rate=f"{self.bytes / 1e6 / elapsed:6.1f} MB/s")

    def stop(self):
        if self.task is not None:
            self.progress.stop()


def run_pack(args) -> int:
    config = PackConfig(
        kind=args.kind, encoding=args.encoding, sample_rate=args.sample_rate, chunk_size=args.chunk_size,
        shard_size=args.shard_size, max_utts=args.max_utts, seed=args.seed, prefix=args.prefix,
        resample=args.resample, downmix=args.downmix, min_seconds=args.min_seconds,
    )
    entries = lists.pack_inputs(args.kind, args.root, args.list, args.trials)
    if args.kind == "train" and not args.list:
        console.print(f"no --list: {len(entries)} audio files under {args.root}, "
                      f"{len({e.spk for e in entries})} speakers (the first folder of each path)")
    with console.status(f"planning {len(entries)} utterances …"):
        plan = make_plan(entries, args.root, config, skip_bad=args.skip_bad)
    listener = RichListener()
    try:
        report = pack.pack(plan, args.root, args.out, workers=args.workers, part=args.part, parts=args.parts,
                           skip_bad=args.skip_bad, listener=listener)
    except KeyboardInterrupt:
        listener.stop()
        console.print(f"[yellow]interrupted[/]: finished shards are kept in {escape(args.out)}; re-run the same command to resume")
        return 130
    finally:
        listener.stop()
    print_pack_summary(report, args.prog)
    return 0


def print_pack_summary(report: pack.PackReport, prog: str = PROG) -> None:
    plan = report.plan
    table = Table(show_header=False, title=f"shardify pack → {plan.config.kind} shards" + (
        f" (part {report.part} of {report.parts})" if report.parts > 1 else ""))
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    rate = report.input_bytes / 1e6 / report.seconds if report.seconds else 0.0
    rows = [
        ("speakers", f"{len(plan.speakers) or len({i.spk for s in plan.shards for i in s})}"),
        ("utterances planned", f"{plan.n_items}"),
        ("utterances written now", f"{report.utterances}"),
        ("hours written now", f"{report.duration / 3600:.2f}"),
        ("shards (written now / resumed / planned)", f"{len(report.written)} / {len(report.resumed)} / {len(plan.names)}"),
        ("bytes in → out", f"{human_bytes(report.input_bytes)} → {human_bytes(report.output_bytes)}"),
        ("throughput", f"{rate:.1f} MB/s of input, {report.utterances / max(report.seconds, 1e-9):.0f} utt/s"),
        ("skipped (--skip-bad)", f"{len(report.skipped)}"),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for item in report.skipped[:10]:
        console.print(escape(f"  skipped {item['src']}: {item['reason']}"), highlight=False)
    if report.index_path:
        console.print(escape(f"index: {report.index_path}"), highlight=False)
    else:
        console.print(escape(f"part {report.part} of {report.parts} done; once every part is: {prog} merge {report.out_dir}"), highlight=False)


def run_verify(args) -> int:
    result = shard_index.verify(args.shard_dir, decode_audio=args.decode, workers=args.workers)
    totals = result.index["totals"]
    table = Table(title=f"shardify verify {args.shard_dir}")
    for column in ("shards", "ok", "bad", "utterances", "hours", "bytes"):
        table.add_column(column, justify="right")
    table.add_row(str(len(result.checks)), str(len(result.checks) - len(result.bad)), str(len(result.bad)),
                  str(totals["samples"]), f"{totals['duration'] / 3600:.2f}", human_bytes(totals["bytes"]))
    console.print(table)
    for check in result.bad:
        for problem in check.problems:  # every bad member, one line each
            console.print(f"[red]BAD[/] {escape(check.name)}: {escape(problem)}", highlight=False)
    for stray in result.strays:
        console.print(f"[yellow]note[/]: {escape(stray)} is in the directory but not in the index")
    if not result.ok:
        console.print(escape("re-pack the bad shards: delete them (and their .shardify/<name>.json) and re-run the pack command"))
        return 1
    return 0


def run_merge(args) -> int:
    try:
        path = shard_index.write_index(args.shard_dir)
    except OSError as error:  # a full disk while writing index.json
        raise pack.write_error(args.shard_dir, error) from error
    totals = shard_index.load_index(args.shard_dir)["totals"]
    console.print(escape(f"merged {totals['shards']} shards, {totals['samples']} utterances → {path}"), highlight=False)
    return 0


def run_read(args) -> int:
    from speakerid.data.read_check import read_epochs
    from speakerid.data.shardset import ShardSet

    shards = ShardSet.open(args.shards, urls=args.urls, io_timeout=args.io_timeout)
    config = BatchConfig(**{name: getattr(args, name) for name, _, _ in batch_fields()})
    with Progress(TextColumn("[bold]reading"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task("read", total=None)
        report = read_epochs(shards, config, rank=args.rank, world_size=args.world_size, workers=args.workers,
                             epochs=args.epochs,
                             progress=lambda done, total: progress.update(task, completed=done, total=total))
    table = Table(show_header=False, title=f"shardify read: N={config.n_speakers} × M={config.utts_per_speaker}, "
                                           f"{config.crop_samples} samples, {args.workers} worker(s), rank {args.rank} of {args.world_size}")
    for row in (("batches per epoch (every rank)", f"{report.batches_per_epoch}"), ("batches read", f"{report.batches}"),
                ("crops/s (start-up included)", f"{report.crops_per_second:.0f}"),
                ("coverage of this rank's usable utterances", f"{report.coverage:.1%}"),
                ("corrupt members / damaged shards skipped", f"{report.corrupt_members} / {report.damaged_shards}")):
        table.add_row(*row)
    console.print(table)
    return 0


def run_calibration_trials(args) -> int:
    from speakerid.evaluation.calibration_trials import make_calibration_trials

    report = make_calibration_trials(args.shards, args.out, pairs=args.pairs, seed=args.seed,
                                     max_shards=args.max_shards)
    faults = f"; skipped: {report.faults}" if report.faults else ""
    same = f"; {report.same_video_targets} target pairs from one video" if report.same_video_targets else ""
    console.print(escape(f"{report.n_target} target + {report.n_nontarget} non-target trials of {report.speakers} "
                         f"training speakers ({report.utterances} utterances in {report.shards_read} shard(s)){faults}"
                         f"{same} → {report.path}"), highlight=False)
    return 0


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    args.prog = prog  # hints name the command as the user typed it
    try:
        return {"pack": run_pack, "verify": run_verify, "merge": run_merge, "read": run_read,
                "calibration-trials": run_calibration_trials}[args.command](args)
    except SpeakeridError as error:
        console.print(f"[red]error:[/] {escape(str(error))}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
