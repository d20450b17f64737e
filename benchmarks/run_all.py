"""Every benchmark in one run, one table: each figure, its baseline and the physical limit, measured together.

    python benchmarks/run_all.py                          # 2 CPU cores: about 5 minutes
    python benchmarks/run_all.py --device cuda            # a GPU machine: the seeds' batch sizes, bf16
    python benchmarks/run_all.py --readme README.md       # also replace the table between the README's markers

Each benchmark runs as its own process (``benchmarks/*.py --json``) at a size that fits 2 cores and 10 minutes
on a CPU, or at the seeds' sizes with ``--device cuda``; its full output goes to ``OUT/<name>.log`` and its
figures to ``OUT/<name>.json``. The table's columns:

- speakerid: the figure; baseline: the same job done the way voxceleb_trainer (or a plain webdataset script)
  does it, in the same run on the same data; ratio: how many times faster speakerid is;
- limit: the physical limit measured in the same run (page-cache read speed for shards, the DataLoader's
  transport for batches, the device's measured matmul rate times the network's counted FLOPs for training
  and evaluation) and "of limit": the share of it that speakerid reaches.

Each script's own table (in its log) has more columns; ``benchmarks/README.md`` explains each baseline.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common import machine

HERE = Path(__file__).resolve().parent


@dataclass
class Row:
    benchmark: str
    figure: str
    speakerid: float
    baseline: float | None = None
    ratio: float | None = None       # speakerid's speed over the baseline's (> 1: speakerid is faster)
    limit: float | None = None
    limit_what: str = ""
    of_limit: float | None = None    # share of the physical limit reached


def steps(device: str, out: Path, smoke: bool = False) -> list[tuple[str, list[str]]]:
    """(name, arguments) of each benchmark: small on a CPU, the seeds' sizes on a GPU, tiny for ``--smoke``."""
    if smoke:  # checks that every benchmark runs and reports (the test suite); its figures mean nothing
        return [
            ("shardify", ["shardify_throughput.py", "--speakers", "4", "--utts", "3", "--workers", "1"]),
            ("loader", ["loader_throughput.py", "--speakers", "8", "--utts", "4", "-n", "4", "--encodings", "wav",
                        "--workers", "1", "--repeats", "1", "--min-seconds", "2.2", "--max-seconds", "3",
                        "--corpus", str(out / "loader-corpus")]),
            ("model", ["model_throughput.py", "--device", device, "--models", "ResNetSE34L", "--batch", "2",
                       "--steps", "1", "--warmup", "0"]),
            ("train", ["train_throughput.py", "--device", device, "-n", "4", "--workers", "1", "--steps", "1",
                       "--warmup", "1", "--max-frames", "50", "--corpus-speakers", "6", "--corpus-utts", "4",
                       "--corpus", str(out / "train-corpus")]),
            ("eval", ["eval_speed.py", "--device", device, "--utterances", "24", "--trials", "40", "--speakers", "8",
                      "--min-seconds", "2", "--max-seconds", "3", "--eval-frames", "100", "--num-eval", "2",
                      "--corpus", str(out / "eval-corpus")]),
        ]
    if device == "cuda":
        return [
            ("shardify", ["shardify_throughput.py", "--speakers", "120", "--utts", "20", "--workers", "8"]),
            ("loader", ["loader_throughput.py", "--encodings", "wav", "--workers", "8", "--repeats", "2",
                        "--corpus", str(out / "loader-corpus")]),
            ("model", ["model_throughput.py", "--device", "cuda", "--bf16", "--models", "ResNetSE34L", "ResNetSE34V2",
                       "ECAPA_TDNN_C512"]),
            ("train", ["train_throughput.py", "--device", "cuda", "--corpus", str(out / "train-corpus")]),
            ("eval", ["eval_speed.py", "--device", "cuda", "--workers", "8", "--corpus", str(out / "eval-corpus")]),
        ]
    return [
        ("shardify", ["shardify_throughput.py", "--speakers", "60", "--utts", "20", "--workers", "2"]),
        ("loader", ["loader_throughput.py", "--speakers", "300", "--utts", "16", "-n", "100", "--encodings", "wav",
                    "--workers", "2", "--repeats", "2", "--epochs", "2", "--cold", "--corpus", str(out / "loader-corpus")]),
        ("model", ["model_throughput.py", "--models", "ResNetSE34L", "--batch", "32", "--steps", "3"]),
        ("train", ["train_throughput.py", "--steps", "12", "--warmup", "3", "--repeats", "2", "--corpus-speakers", "48",
                   "--corpus-utts", "24", "--corpus", str(out / "train-corpus")]),
        ("eval", ["eval_speed.py", "--utterances", "400", "--trials", "3000", "--threads", "2",
                  "--corpus", str(out / "eval-corpus")]),
    ]


# ------------------------------------------------------------------------------- one table from the JSON files


def shardify_rows(figures: dict) -> list[Row]:
    return [Row(f"shardify pack, {r['encoding']}, {r['workers']} workers", "MB/s of input audio", r["mb_per_s"],
                r["baseline_mb_per_s"], r["mb_per_s"] / r["baseline_mb_per_s"], r["cat_inputs_mb_per_s"],
                "page-cache read of the inputs", r["mb_per_s"] / r["cat_inputs_mb_per_s"])
            for r in figures["rows"]]


def loader_rows(figures: dict) -> list[Row]:
    config, rows = figures["config"], []
    for r in figures["rows"]:
        transport = figures["transport_ceiling_crops_per_s"].get(str(r["workers"]), {}).get("int16")
        limits = [(r["page_cache_crops_per_s"], "page-cache read of the shards")]
        if transport:
            limits.append((transport, "DataLoader transport of ready batches"))
        limit, what = min(limits)
        # after the first batch on both sides, as the transport ceiling is measured: a VoxCeleb2 epoch is thousands
        # of batches, so the workers' start-up (in the benchmark's own whole-epoch figures) does not count there
        sid, base = r["speakerid"]["steady_crops_per_s"], r["baseline"]["steady_crops_per_s"]
        rows.append(Row(f"loader, {r['encoding']} shards, {r['workers']} workers, "
                        + ("page cache dropped, " if r.get("storage") == "cold" else "") +
                        f"N={config['n_speakers']}×M={config['utts_per_speaker']}",
                        "crops/s (2-s crops) after the first batch", sid, base, sid / base, limit, what, sid / limit))
    return rows


def model_rows(figures: dict) -> list[Row]:
    """On a GPU the limit is the counted FLOPs at the measured matmul rate. On a CPU there is none to show: the
    network alone is what it measures, and oneDNN's Winograd convolutions beat the counted-FLOP figure."""
    precision, gpu = ("bf16" if figures["bf16"] else "float32"), figures["device"].startswith("cuda")
    return [Row(f"{r['model']} forward+backward, batch {figures['batch']}, {precision}", "utterances/s",
                r["utts_per_s"], limit=r["limit_utts_per_s"] if gpu else None,
                limit_what=f"counted FLOPs at the {precision} matmul rate" if gpu else "",
                of_limit=r["share_of_matmul_rate"] if gpu else None) for r in figures["rows"]]


def train_rows(figures: dict) -> list[Row]:
    limit, config, rows = figures["limit"], figures["config"], []
    for r in figures["rows"]:
        sid, base = r["speakerid"], r["baseline"]
        name = (f"training step, ResNetSE34L + angleproto, N={config['n_speakers']}×M={config['utts_per_speaker']}, "
                f"augmentation {'on' if r['augment'] else 'off'}, {sid['precision']}")
        rows.append(Row(name, "utterances/s", sid["utterances_per_s"], base["utterances_per_s"], r["ratio"],
                        limit["utterances_per_s"], limit["what"], sid["utterances_per_s"] / limit["utterances_per_s"]))
        rows.append(Row("  … its data-wait (time blocked on the loader)", "% of step time", 100 * sid["data_wait"],
                        100 * base["data_wait"]))
    return rows


def eval_rows(figures: dict) -> list[Row]:
    f, rows = figures["figures"], []
    base = f.get("baseline")
    hours = f"{figures['utterances']} utterances, {figures['trials']} trials"
    for name, protocol in (("speakerid crops", f"{figures['protocol']} crops"),
                           ("speakerid whole utterances", "whole utterances")):
        seconds = f[name]["seconds"]
        limit = figures["limit_seconds"] if name == "speakerid crops" else None
        rows.append(Row(f"evaluate ({hours}), {protocol}", "seconds (lower is better)", seconds,
                        base["seconds"] if base else None, base["seconds"] / seconds if base else None, limit,
                        figures["limit_what"] if limit else "",
                        limit / seconds if limit else None))
    return rows


READERS = {"shardify": shardify_rows, "loader": loader_rows, "model": model_rows, "train": train_rows,
           "eval": eval_rows}


def number(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3g}"


def cells(row: Row) -> list[str]:
    return [row.benchmark, row.figure, number(row.speakerid), number(row.baseline),
            f"{row.ratio:.2f}×" if row.ratio is not None else "—",
            f"{number(row.limit)} ({row.limit_what})" if row.limit is not None else "—",
            f"{row.of_limit:.0%}" if row.of_limit is not None else "—"]


COLUMNS = ("benchmark", "figure", "speakerid", "baseline (same run)", "ratio", "physical limit (same run)",
           "of limit")


def markdown(rows: list[Row], header: list[str]) -> str:
    lines = [line for paragraph in header for line in (paragraph, "")]  # one paragraph each
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def replace_between_markers(path: Path, text: str, begin: str = "<!-- bench:begin -->",
                            end: str = "<!-- bench:end -->") -> None:
    content = path.read_text()
    if begin not in content or end not in content:
        raise SystemExit(f"{path}: no '{begin}' … '{end}' markers to put the table between; add them where the "
                         "table belongs")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}{end}{tail}")


# ------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, help="logs, JSON and corpora (default: a new temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every benchmark runs")
    parser.add_argument("--only", nargs="+", choices=list(READERS), help="run only these benchmarks")
    parser.add_argument("--readme", type=Path, help="also write the table into this file between "
                                                    "<!-- bench:begin --> and <!-- bench:end -->")
    parser.add_argument("--markdown", type=Path, help="also write the table here as Markdown")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="speakerid-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    console = Console(width=max(160, Console().width))
    command = "python benchmarks/run_all.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    started = datetime.datetime.now().astimezone()
    about = machine()

    rows: list[Row] = []
    loaded: dict[str, dict] = {}
    failed: list[str] = []
    seconds: dict[str, float] = {}
    for name, arguments in steps(args.device, out, args.smoke):
        if args.only and name not in args.only:
            continue
        log, figures = out / f"{name}.log", out / f"{name}.json"
        argv_step = [sys.executable, str(HERE / arguments[0]), *arguments[1:], "--json", str(figures)]
        t = time.perf_counter()
        with console.status(f"{name}: {shlex.join(argv_step[1:])} (log: {log}) …"), open(log, "w") as sink:
            done = subprocess.run(argv_step, stdout=sink, stderr=subprocess.STDOUT, cwd=HERE.parent)
        seconds[name] = time.perf_counter() - t
        if done.returncode != 0 or not figures.exists():
            failed.append(name)
            console.print(f"[red]{name} failed (exit {done.returncode}); its output: {log}[/red]")
            continue
        console.print(f"{name}: {seconds[name]:.0f} s")
        loaded[name] = json.loads(figures.read_text())
        rows += READERS[name](loaded[name])

    total = sum(seconds.values())
    table = Table(title=f"speakerid benchmarks, {started:%Y-%m-%d %H:%M %Z}", show_lines=False)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("benchmark", "figure") else "right",
                         overflow="fold")
    for row in rows:
        table.add_row(*cells(row))
    console.print(table)
    header = [f"Measured {started:%Y-%m-%d} on {about} by `{command.strip()}` ({total / 60:.1f} min).",
              "Ratio: how many times faster speakerid is than the baseline; of limit: the share of the physical limit "
              "that speakerid reaches."]
    if args.device == "cpu" and "model" in loaded:
        share = loaded["model"]["rows"][0]["share_of_matmul_rate"]
        header.append(f"On a CPU the network's counted FLOPs at the measured matmul rate are no limit (oneDNN's Winograd "
                      f"convolutions do fewer multiplications than counted; ResNetSE34L ran at {share:.0%} of that "
                      "figure), so the training and evaluation limits are the network alone on the same batch.")
    for line in header:
        console.print(line, highlight=False)
    console.print(f"logs and JSON: {out}")
    text = markdown(rows, header)
    if args.markdown:
        args.markdown.write_text(text)
    if args.readme and failed:
        console.print(f"[red]{args.readme} left as it was: a table without {', '.join(failed)} is not the latest "
                      "complete run[/red]")
    elif args.readme:
        replace_between_markers(args.readme, text)
        console.print(f"table written into {args.readme}")
    (out / "summary.json").write_text(json.dumps({"command": command, "date": started.isoformat(timespec="seconds"),
                                                  "machine": about, "seconds": seconds, "failed": failed,
                                                  "rows": [vars(r) for r in rows]}, indent=1))
    if failed:
        console.print(f"[red]failed: {', '.join(failed)}[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
