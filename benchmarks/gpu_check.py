"""The device check: every GPU measurement in one command, one table, one JSON (``bash benchmarks/gpu_check.sh OUT``).

    bash benchmarks/gpu_check.sh OUT_DIR                      # on the GPU machine: installs .whl/, then runs this
    bash benchmarks/gpu_check.sh OUT_DIR --tiny --device cpu  # the rehearsal the test suite runs
    python benchmarks/gpu_check.py --out OUT_DIR [--device cuda|cpu] [--tiny] [--only SECTION …]

Each section runs as its own process (its output appended to OUT/gpu_check.log) under a time budget (its timeout),
and all of them under ``--total-budget`` (GPU 450 s: with gpu_check.sh's set-up, under 8 minutes on one H100/H200);
a section that fails, crashes or runs out of time is a FAILED row with its error, and the rest still run. The
corpora are generated (speakerid.data.synthetic) and packed (speakerid's shardify) in a temporary folder, removed
at the end. Sizes on the GPU (``--tiny``: a few utterances each, on any device; ResNetSE34L with augmentation
only and ECAPA without, so that each path runs once):

- ``train_resnetse34l_bf16`` (budget 130 s, pays for the corpus): benchmarks/train_throughput.py, ResNetSE34L +
  angleproto, N = 200 × M = 2 crops of 2 s, 16 loader workers, 20 timed steps after 5, augmentation on and off;
  speakerid in bf16 against the voxceleb_trainer-style loop (``--mixedprec``: fp16 autocast + GradScaler, per-file
  reads, CPU augmentation) in the same process. Corpus: 600 speakers × 24 utterances of 2–8 s (≈ 20 h) in wav
  shards, MUSAN/RIR-like banks.
- ``train_resnetse34l_fp16`` (70 s): the same with speakerid in fp16 (Accelerate's GradScaler path).
- ``train_ecapa_c1024_aam_bf16`` (90 s): the same for ECAPA-TDNN (C = 1024, 80 fbank, 192-dim) + AAM-softmax
  (m 0.2, s 30), the modern recipe's cost.
- ``eval_vox1o`` (130 s): benchmarks/eval_speed.py on a VoxCeleb1-O-shaped set (4,874 utterances of 4–20 s, 40
  speakers, 37,720 trials), ResNetSE34L, 8 decoding workers: speakerid (bf16) with 10 × 400-frame crops and whole
  utterances against the per-utterance baseline (fp32); the EERs side by side.
- ``frontend_torchaudio`` (20 s): gpu_sections.py frontend: the plain-torch front-ends against torchaudio's on the
  device (largest relative difference, forward time of 400 × 2 s).
- ``losses_amp`` (30 s): gpu_sections.py losses: a bf16 and an fp16 (GradScaler) step of every registered loss.

On a CPU (``--device cpu``) the training benchmarks run fp32 (their baseline's autocast is CUDA-only), so the fp16
training section is skipped there with that reason; the losses section runs fp16 + GradScaler on the CPU as far as
torch allows. OUT/gpu_check.json holds the environment (GPU, torch, CUDA, cuDNN), every section's status, rows,
error, seconds and the benchmarks' own JSON. Exit status 1 when any section failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

from common import machine

HERE = Path(__file__).resolve().parent


@dataclass
class Section:
    name: str
    budget_s: float
    command: list[str] | None = None    # None: skipped, with ``skip``
    parse: Callable[[dict], dict] | None = None
    skip: str = ""                      # why it does not run here
    note: str = ""                      # what to know about its figures here
    result: dict = field(default_factory=dict)


def row(figure: str, speakerid, baseline=None, ratio=None, note: str = "") -> dict:
    return {"figure": figure, "speakerid": speakerid, "baseline": baseline, "ratio": ratio, "note": note}


# ---------------------------------------------------------------------------- the benchmarks' JSON → table rows


def train_rows(figures: dict) -> dict:
    limit, rows = figures["limit"], []
    for r in figures["rows"]:
        sid, base = r["speakerid"], r["baseline"]
        setting = f"augmentation {'on' if r['augment'] else 'off'}"
        rows.append(row(f"utterances/s, {setting}", sid["utterances_per_s"], base["utterances_per_s"], r["ratio"],
                        f"{sid['precision']} vs {base['precision']}; {sid['utterances_per_s'] / limit['utterances_per_s']:.0%}"
                        f" of {limit['what']} ({limit['utterances_per_s']:.0f}/s)"))
        rows.append(row(f"data-wait %, {setting}", 100 * sid["data_wait"], 100 * base["data_wait"], None,
                        "time blocked on the loader ÷ step time (target < 5 %)"))
    return {"status": "ok", "rows": rows}


def eval_rows(figures: dict) -> dict:
    f, rows = figures["figures"], []
    base = f.get("baseline")
    for name, protocol in (("speakerid crops", figures["protocol"]), ("speakerid whole utterances", "whole utterances")):
        sid = f[name]
        note = f"EER {sid['eer']:.4f} %"
        if base:
            note += f" vs baseline {base['eer']:.4f} %" + (" (another protocol)" if "whole" in name else
                                                           f" (|Δ| {abs(sid['eer'] - base['eer']):.4f})")
        if "max_score_difference_vs_baseline" in sid:
            note += f"; max score difference {sid['max_score_difference_vs_baseline']:.2g}"
        rows.append(row(f"seconds, {protocol} (lower is better)", sid["seconds"], base and base["seconds"],
                        base and base["seconds"] / sid["seconds"], note))
    return {"status": "ok", "rows": rows}


def own_rows(figures: dict) -> dict:
    return figures  # gpu_sections.py writes status, rows and error itself


# --------------------------------------------------------------------------------------------- the plan


def plan(device: str, tiny: bool, scratch: Path) -> list[Section]:
    py = [sys.executable]
    train = py + [str(HERE / "train_throughput.py"), "--device", device, "--corpus", str(scratch / "train-corpus")]
    if tiny:
        train += ["-n", "4", "--workers", "1", "--steps", "1", "--warmup", "1", "--max-frames", "50",
                  "--corpus-speakers", "6", "--corpus-utts", "4"]
        evaluate = ["--utterances", "24", "--trials", "40", "--speakers", "8", "--min-seconds", "2",
                    "--max-seconds", "3", "--eval-frames", "100", "--num-eval", "2"]
    else:
        train += ["-n", "200", "-m", "2", "--max-frames", "200", "--workers", "16", "--steps", "20", "--warmup", "5",
                  "--corpus-speakers", "600", "--corpus-utts", "24"]
        evaluate = ["--utterances", "4874", "--trials", "37720", "--speakers", "40", "--workers", "8"]
    budget = (lambda gpu_s: 600.0) if tiny else (lambda gpu_s: gpu_s)  # tiny: a rehearsal on shared, loaded cores
    cpu_fp32 = "cpu: fp32 (train_throughput's baseline autocast is CUDA-only)"
    fp16_skip = ("skipped: fp16 + GradScaler training is the CUDA path (train_throughput runs fp32 on a CPU); the "
                 "losses section runs fp16 + GradScaler steps on the CPU")
    sections = [
        Section("train_resnetse34l_bf16", budget(130), train + ["--mixed-precision", "bf16"]
                + (["--augment"] if tiny else []), train_rows),
        Section("train_resnetse34l_fp16", budget(70), train + ["--mixed-precision", "fp16"], train_rows),
        Section("train_ecapa_c1024_aam_bf16", budget(90), train + ["--mixed-precision", "bf16", "--model",
                "ECAPA_TDNN_C1024", "--loss", "aamsoftmax"] + (["--no-augment"] if tiny else []), train_rows),
        Section("eval_vox1o", budget(130), py + [str(HERE / "eval_speed.py"), "--device", device, "--corpus",
                str(scratch / "eval-corpus")] + evaluate, eval_rows),
        Section("frontend_torchaudio", budget(20), py + [str(HERE / "gpu_sections.py"), "frontend", "--device",
                device] + (["--tiny"] if tiny else []), own_rows),
        Section("losses_amp", budget(30), py + [str(HERE / "gpu_sections.py"), "losses", "--device", device]
                + (["--tiny"] if tiny else []), own_rows),
    ]
    if device == "cpu":
        sections[1].command, sections[1].skip = None, fp16_skip
        sections[0].note = sections[2].note = cpu_fp32
    return sections


# ------------------------------------------------------------------------------------------------- running


def run_section(section: Section, seconds_left: float, scratch: Path, log) -> dict:
    if section.command is None:
        return {"status": "skipped", "rows": [], "error": section.skip}
    if seconds_left < 5:
        return {"status": "skipped", "rows": [], "error": "skipped: the total budget ran out before this section"}
    out = scratch / f"{section.name}.json"
    command = section.command + ["--json", str(out)]
    timeout = min(section.budget_s, seconds_left)
    log.write(f"\n===== {section.name}: {shlex.join(command)} (timeout {timeout:.0f} s)\n")
    log.flush()
    # its own process group, so that a section out of time is stopped with its loader and packing workers
    done = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "160"})
    try:
        done.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(done.pid, signal.SIGKILL)
        done.wait()
        return {"status": "failed", "rows": [], "error": f"timed out after {timeout:.0f} s (its budget; see "
                                                         "gpu_check.log for how far it got)"}
    if done.returncode != 0 or not out.exists():
        log.flush()
        tail = Path(log.name).read_text(errors="replace").rsplit(f"===== {section.name}:", 1)[-1]
        lines = [line for line in tail.splitlines()[1:] if line.strip()][-6:]
        return {"status": "failed", "rows": [], "error": f"exit status {done.returncode}: " + " | ".join(lines)}
    figures = json.loads(out.read_text())
    try:
        result = section.parse(figures)
    except Exception as error:  # noqa: BLE001 (a benchmark whose JSON changed shape: report, keep going)
        return {"status": "failed", "rows": [], "error": f"reading its figures: {type(error).__name__}: {error}",
                "figures": figures}
    if section.note:
        result["note"] = section.note
    return result | {"figures": figures}


def environment(device: str) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "device": device, "machine": machine(), "host": platform.node()}
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 1024**3, 1),
                "multiprocessors": props.multi_processor_count, "bf16_supported": torch.cuda.is_bf16_supported()}
    return env


def fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:,.1f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="gpu_check.json and gpu_check.log go here")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="every section at a few utterances (the rehearsal)")
    parser.add_argument("--only", nargs="+", metavar="SECTION", help="run these sections only")
    parser.add_argument("--total-budget", type=float, help="seconds for all sections (GPU 450, --tiny 2400)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (on a CPU machine: --device cpu --tiny)")
    total = args.total_budget or (2400.0 if args.tiny else 450.0)
    args.out.mkdir(parents=True, exist_ok=True)
    console = Console(width=180)
    started = datetime.datetime.now().astimezone()
    deadline = time.monotonic() + total
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    sections = plan(args.device, args.tiny, scratch)
    if args.only:
        unknown = set(args.only) - {s.name for s in sections}
        if unknown:
            parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; sections: "
                         + ", ".join(s.name for s in sections))
        sections = [s for s in sections if s.name in args.only]
    env = environment(args.device)
    console.print(f"gpu_check: {env['machine']}; torch {env['torch']}, CUDA {env['cuda']}, {env.get('gpu', 'no GPU')}")
    try:
        with open(args.out / "gpu_check.log", "w") as log:
            for i, section in enumerate(sections, 1):
                t, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
                section.result = run_section(section, deadline - time.monotonic(), scratch, log)
                section.result["seconds"] = time.perf_counter() - t
                now = resource.getrusage(resource.RUSAGE_CHILDREN)  # its processes' CPU time (waited-for ones)
                section.result["cpu_s"] = now.ru_utime + now.ru_stime - cpu.ru_utime - cpu.ru_stime
                section.result["budget_s"] = section.budget_s
                console.print(f"[{i}/{len(sections)}] {section.name}: {section.result['status']} "
                              f"({section.result['seconds']:.0f} s of {section.budget_s:.0f})")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    table = Table(title=f"gpu_check ({args.device}{', tiny' if args.tiny else ''}): {env.get('gpu', env['machine'])}")
    for column in ("section", "figure", "speakerid", "baseline", "ratio", "note"):
        table.add_column(column, overflow="fold")
    for s in sections:
        r = s.result
        if r["status"] != "ok":
            table.add_row(s.name, r["status"].upper(), "", "", "", str(r.get("error") or ""))
        for line in r["rows"]:
            note = "; ".join(filter(None, [line["note"], r.get("note", "")]))
            table.add_row(s.name, line["figure"], fmt(line["speakerid"]), fmt(line["baseline"]),
                          f"{line['ratio']:.2f}×" if line["ratio"] else "—", note)
    console.print(table)
    failed = [s.name for s in sections if s.result["status"] == "failed"]
    ended = datetime.datetime.now().astimezone()
    report = {"command": "python benchmarks/gpu_check.py " + shlex.join(sys.argv[1:]), "date": started.isoformat(
              timespec="seconds"), "seconds": (ended - started).total_seconds(), "environment": env,
              "load_average_end": os.getloadavg()[0], "tiny": args.tiny, "total_budget_s": total, "failed": failed,
              "sections": {s.name: s.result for s in sections}}
    tmp = args.out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, args.out / "gpu_check.json")
    console.print(f"{len(sections) - len(failed)} of {len(sections)} sections without failure"
                  + (f"; FAILED: {', '.join(failed)}" if failed else "")
                  + f"; {report['seconds']:.0f} s; {args.out / 'gpu_check.json'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
