"""Evaluation wall time: speakerid's `evaluate` against voxceleb_trainer's evaluation loop, same model, same audio.

The test set is VoxCeleb1-O-shaped synthetic audio (by default 4,874 utterances of 4–20 s over 40 speakers and
37,720 trials; ``--utterances``/``--trials`` scale it down). The model is ResNetSE34L (nOut 512, SAP), weights
seeded, not trained: the comparison is between two implementations of one protocol, so what matters is that
both give the same EER, not its value.

Baseline, written from voxceleb_trainer's ``evaluateFromList`` and ``loadWAV``: a DataLoader with batch size 1
reads each file (soundfile, float64 → float32), cuts the 10 crops of 400 frames at ``linspace(0, len − L, 10)``
(wrap-padding short files), one forward pass per utterance (its 10 crops); then a Python loop over the trial
lines: L2-normalise both, ``torch.cdist`` of the 10×10 crops, score = −mean; EER from sklearn's ``roc_curve``
as ``tuneThresholdfromScore``.

speakerid: ``speakerid.evaluation.evaluate`` with the same protocol (``--eval-frames 400 --num-eval 10``,
no cache), and with its default whole-utterance protocol (a different protocol: its EER differs).

    python benchmarks/eval_speed.py [--utterances 1000 --trials 7740] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from common import machine, matmul_flops_per_s, network_seconds, step_flops

from speakerid.data.synthetic import CorpusSpec, generate_corpus
from speakerid.evaluation import ExtractConfig, evaluate
from speakerid.inference import load_inference_checkpoint, save_inference_checkpoint
from speakerid.metrics import eer_from_roc
from speakerid.models import build_model

SPEAKERS = 40  # VoxCeleb1 test: 40 speakers, 4,874 utterances, 37,720 trials (veri_test.txt)


# ------------------------------------------------------------------------------------- the baseline


def load_wav(path: str, max_frames: int, num_eval: int) -> np.ndarray:
    """voxceleb_trainer's loadWAV(evalmode=True)."""
    max_audio = max_frames * 160 + 240
    audio, _ = soundfile.read(path)
    audiosize = audio.shape[0]
    if audiosize <= max_audio:
        shortage = max_audio - audiosize + 1
        audio = np.pad(audio, (0, shortage), "wrap")
        audiosize = audio.shape[0]
    startframe = np.linspace(0, audiosize - max_audio, num=num_eval)
    return np.stack([audio[int(asf):int(asf) + max_audio] for asf in startframe]).astype(np.float64)


class TestDataset(torch.utils.data.Dataset):
    def __init__(self, test_list, test_path, eval_frames, num_eval):
        self.test_list, self.test_path, self.eval_frames, self.num_eval = test_list, test_path, eval_frames, num_eval

    def __getitem__(self, index):
        audio = load_wav(os.path.join(self.test_path, self.test_list[index]), self.eval_frames, self.num_eval)
        return torch.FloatTensor(audio), self.test_list[index]

    def __len__(self):
        return len(self.test_list)


def baseline(model, trials_path: Path, root: Path, eval_frames: int = 400, num_eval: int = 10, workers: int = 1,
             test_normalize: bool = True, device: str = "cpu") -> tuple[float, np.ndarray, float]:
    """(EER %, scores, seconds spent scoring) the way voxceleb_trainer's evaluateFromList computes them."""
    model.to(device).eval()
    lines = open(trials_path).read().splitlines()
    files = sorted({name for line in lines for name in line.split()[-2:]})
    loader = torch.utils.data.DataLoader(TestDataset(files, str(root), eval_frames, num_eval), batch_size=1,
                                         shuffle=False, num_workers=workers, drop_last=False)
    feats = {}
    for data in loader:
        with torch.no_grad():
            feats[data[1][0]] = model(data[0][0].to(device)).detach().cpu()
    scoring_started = time.perf_counter()
    all_scores, all_labels = [], []
    for line in lines:
        data = line.split()
        ref_feat, com_feat = feats[data[1]], feats[data[2]]
        if test_normalize:
            ref_feat = F.normalize(ref_feat, p=2, dim=1)
            com_feat = F.normalize(com_feat, p=2, dim=1)
        dist = torch.cdist(ref_feat.reshape(num_eval, -1), com_feat.reshape(num_eval, -1)).detach().cpu().numpy()
        all_scores.append(-1 * np.mean(dist))
        all_labels.append(int(data[0]))
    eer = eer_from_roc(np.array(all_scores), np.array(all_labels))[0]  # tuneThresholdfromScore
    return eer, np.array(all_scores), time.perf_counter() - scoring_started


# --------------------------------------------------------------------------------------------- main


def make_corpus(directory: Path, utterances: int, trials: int, speakers: int = SPEAKERS, min_seconds: float = 4.0,
                max_seconds: float = 20.0):
    spec = CorpusSpec(n_speakers=0, utts_per_speaker=0, n_test_speakers=speakers,
                      test_utts_per_speaker=math.ceil(utterances / speakers), videos_per_speaker=6,
                      min_seconds=min_seconds, max_seconds=max_seconds, n_trials=trials, seed=1)
    return generate_corpus(directory, spec, workers=max(1, os.cpu_count() or 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--utterances", type=int, default=4874, help="test utterances (VoxCeleb1-O: 4,874)")
    parser.add_argument("--trials", type=int, default=37720, help="trials (VoxCeleb1-O: 37,720)")
    parser.add_argument("--speakers", type=int, default=SPEAKERS, help=f"test speakers (VoxCeleb1: {SPEAKERS})")
    parser.add_argument("--min-seconds", type=float, default=4.0)
    parser.add_argument("--max-seconds", type=float, default=20.0)
    parser.add_argument("--eval-frames", type=int, default=400, help="crop frames, both systems (the seeds: 400)")
    parser.add_argument("--num-eval", type=int, default=10, help="crops per utterance, both systems (the seeds: 10)")
    parser.add_argument("--corpus", default="/tmp/eval_speed_corpus", help="synthetic corpus folder (reused)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both systems")
    parser.add_argument("--workers", type=int, default=1, help="decoding workers, both systems")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="both systems (default: cuda when there is one; speakerid runs bf16 there, the baseline fp32)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    console = Console(width=160)

    started = time.perf_counter()
    info = make_corpus(Path(args.corpus) / f"u{args.utterances}-t{args.trials}-s{args.speakers}-"
                                           f"{args.min_seconds:g}-{args.max_seconds:g}", args.utterances, args.trials,
                       args.speakers, args.min_seconds, args.max_seconds)
    protocol = f"{args.num_eval} × {args.eval_frames} frames"
    console.print(f"corpus: {info.n_utterances} utterances, {info.test_hours:.2f} h, {info.n_trials} trials "
                  f"({time.perf_counter() - started:.0f} s)")
    torch.manual_seed(0)
    model = build_model("ResNetSE34L", n_out=512, encoder_type="SAP").eval()
    checkpoint = save_inference_checkpoint(Path(args.corpus) / "ckpt", model, model_name="ResNetSE34L",
                                           model_options={"n_out": 512, "encoder_type": "SAP"}, loss_name="angleproto")
    loaded = load_inference_checkpoint(checkpoint)
    figures = {}

    # The physical limit of the crops protocol: its counted forward FLOPs at the measured matmul rate, in the
    # precision speakerid runs (bf16 on a GPU, float32 on a CPU).
    # On a CPU (Winograd convolutions: fewer multiplications than counted) the bound is the network alone instead:
    # the forward of one utterance's crops (speakerid's CPU batch: 40 s of audio), already in memory, in the faster
    # memory format, times the utterances.
    crops = 0.1 * torch.randn(args.num_eval, args.eval_frames * 160 + 240, device=device)
    model.to(device)
    rate = matmul_flops_per_s(device)
    flop_seconds = info.n_utterances * step_flops(model, crops, backward=False) / rate
    per_utterance = []
    with torch.inference_mode():
        for memory_format in (torch.contiguous_format, torch.channels_last):
            model.to(memory_format=memory_format)
            per_utterance.append(min(network_seconds(model, crops, steps=3, warmup=1, bf16=device.type == "cuda",
                                                     backward=False) for _ in range(4)))  # a bound: the best run
    model.to(memory_format=torch.contiguous_format)
    network_alone_seconds = info.n_utterances * min(per_utterance)
    limit_seconds, limit_what = ((flop_seconds, "counted forward FLOPs at the bf16 matmul rate") if device.type == "cuda"
                                 else (network_alone_seconds, "the network alone, forward of each utterance's crops"))
    model.cpu()

    if not args.skip_baseline:
        t = time.perf_counter()
        base_eer, base_scores, scoring = baseline(model, info.trials, info.root, args.eval_frames, args.num_eval,
                                                  workers=args.workers, device=device)
        seconds = time.perf_counter() - t
        figures["baseline"] = {"seconds": seconds, "eer": base_eer, "extraction_seconds": seconds - scoring,
                               "scoring_seconds": scoring}
        console.print(f"baseline: {figures['baseline']}")

    for name, config in (("speakerid crops", ExtractConfig(eval_frames=args.eval_frames, num_eval=args.num_eval,
                                                             workers=args.workers)),
                         ("speakerid whole utterances", ExtractConfig(workers=args.workers))):
        t = time.perf_counter()
        out = Path(args.corpus) / "out" / name.split()[1]
        report = evaluate(loaded, [info.trials], info.root, out, config, cache=None)
        seconds = time.perf_counter() - t
        figures[name] = {"seconds": seconds, "eer": report.lists[0].metrics.eer,
                         "extraction_seconds": report.extraction.seconds,
                         "scoring_seconds": seconds - report.extraction.seconds}  # + file checks, writing outputs
        if name == "speakerid crops" and "baseline" in figures:
            scores = np.array([float(line.split()[0]) for line in open(report.lists[0].scores_path)])
            figures[name]["max_score_difference_vs_baseline"] = float(np.abs(scores - base_scores).max())
        console.print(f"{name}: {figures[name]}")

    table = Table(title=f"evaluation wall time: {info.n_utterances} utterances ({info.test_hours:.2f} h), "
                        f"{info.n_trials} trials, ResNetSE34L, {args.threads} thread(s)")
    for column in ("system", "protocol", "wall s", "speed-up", "extract s", "score+metrics s", "EER %",
                   "|ΔEER| vs baseline"):
        table.add_column(column)
    base = figures.get("baseline")
    for name, figure in figures.items():
        whole = "whole" in name
        speedup = f"{base['seconds'] / figure['seconds']:.2f}×" if base else "—"
        delta = f"{abs(figure['eer'] - base['eer']):.4f}" if base and not whole else "—"
        table.add_row(name if name != "baseline" else "voxceleb_trainer-style baseline",
                      "whole utterances" if whole else protocol,
                      f"{figure['seconds']:.1f}", speedup, f"{figure['extraction_seconds']:.1f}",
                      f"{figure['scoring_seconds']:.2f}", f"{figure['eer']:.4f}", delta)
    console.print(table)
    console.print(f"limits of the {protocol} protocol: its counted forward FLOPs at the measured matmul rate "
                  f"({rate / 1e12:.3f} TFLOP/s) {flop_seconds:.1f} s; the network alone {network_alone_seconds:.1f} s; "
                  f"the limit used: {limit_what}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    about = machine()
    console.print(f"command: python {shlex.join(sys.argv)}  ({about}; load average {load:.2f} at end)")
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "utterances": info.n_utterances,
                                               "trials": info.n_trials, "hours": info.test_hours,
                                               "threads": args.threads, "load_average": load, "device": str(device),
                                               "limit_seconds": limit_seconds, "limit_what": limit_what,
                                               "matmul_flops_per_s": rate,
                                               "flop_bound_seconds": flop_seconds,
                                               "network_alone_seconds": network_alone_seconds,
                                               "protocol": protocol,
                                               "machine": about, "command": "python " + shlex.join(sys.argv)},
                                              indent=1))


if __name__ == "__main__":
    main()
