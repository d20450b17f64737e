"""Model throughput: training-step (forward + backward) utterances per second for each architecture.

One step = front-end + network forward on a batch of 2-second crops (32,240 samples, the seeds'
max_frames 200), then backward of a stand-in scalar (mean square of the embeddings: the loss itself
is negligible next to the network). No optimizer step. On the CPU the default batch is 32; on a GPU it
is the seeds' 200 speakers × 2 utterances = 400, with bf16 autocast when ``--bf16``.

    python benchmarks/model_throughput.py [--models ResNetSE34L ECAPA_TDNN_C512] [--batch 32] [--steps 3]
    python benchmarks/model_throughput.py --device cuda --bf16            # batch 400 × 2 s
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from common import machine, matmul_flops_per_s, network_seconds, step_flops

from speakerid.models import build_model, summary

CROP_SAMPLES = 200 * 160 + 240  # max_frames 200 → 32,240 samples (2.015 s)
SAMPLE_RATE = 16000

# benchmark name → (registry name, options): the published recipes' settings
PRESETS: dict[str, tuple[str, dict]] = {
    "ResNetSE34L": ("ResNetSE34L", {"n_out": 512, "encoder_type": "SAP"}),
    "ResNetSE34V2": ("ResNetSE34V2", {"n_out": 512, "encoder_type": "ASP", "n_mels": 64}),
    "ResNetSE34": ("ResNetSE34", {"n_out": 512}),
    "VGGVox40": ("VGGVox40", {"n_out": 512, "encoder_type": "SAP"}),
    "ECAPA_TDNN_C512": ("ECAPA_TDNN", {"channels": 512}),
    "ECAPA_TDNN_C1024": ("ECAPA_TDNN", {"channels": 1024}),
    "ResNet34": ("ResNet34", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(PRESETS), choices=list(PRESETS), metavar="MODEL",
                        help=f"any of: {', '.join(PRESETS)} (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 … (default cpu)")
    parser.add_argument("--batch", type=int, help="utterances per step (default 32 on cpu, 400 on a GPU)")
    parser.add_argument("--samples", type=int, default=CROP_SAMPLES, help=f"samples per utterance (default {CROP_SAMPLES})")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (front-ends stay float32)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: all cores)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch_size = args.batch or (32 if device.type == "cpu" else 400)
    console = Console()
    generator = torch.Generator().manual_seed(0)
    batch = (0.1 * torch.randn(batch_size, args.samples, generator=generator)).to(device)
    seconds_of_audio = batch_size * args.samples / SAMPLE_RATE

    rows = []
    for preset in args.models:
        name, options = PRESETS[preset]
        torch.manual_seed(0)
        model = build_model(name, **options).to(device).train()
        with console.status(f"{preset}: {args.warmup} warm-up + {args.steps} timed steps …"):
            seconds = network_seconds(model, batch, args.steps, args.warmup, args.bf16)
            flops = step_flops(model, batch[:2]) * batch_size / 2
        rows.append({"model": preset, "parameters": summary(model, show=False).n_parameters,
                     "step_s": seconds, "utts_per_s": batch_size / seconds,
                     "audio_x_realtime": seconds_of_audio / seconds, "step_flops": flops,
                     "flops_per_s": flops / seconds})
        del model

    # The physical limit: the device's measured dense matmul rate in the precision the steps ran in.
    with console.status("measuring the matmul rate …"):
        matmul_rate = matmul_flops_per_s(device, torch.bfloat16 if args.bf16 else torch.float32)
    for row in rows:
        row["limit_utts_per_s"] = matmul_rate / (row["step_flops"] / batch_size)
        row["share_of_matmul_rate"] = row["flops_per_s"] / matmul_rate

    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or platform.machine()}, {args.threads} threads"
    table = Table(title=f"forward+backward, batch {batch_size} × {args.samples:,} samples, "
                        f"{'bf16 autocast' if args.bf16 else 'float32'}, {device} ({where}), torch {torch.__version__}")
    for column in ("model", "parameters", "s / step", "utterances / s", "audio × realtime", "GFLOP / utt",
                   "TFLOP/s", "share of matmul rate", "limit utt/s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        table.add_row(row["model"], f"{row['parameters'] / 1e6:.2f} M", f"{row['step_s']:.2f}",
                      f"{row['utts_per_s']:.1f}", f"{row['audio_x_realtime']:.1f}",
                      f"{row['step_flops'] / batch_size / 1e9:.2f}", f"{row['flops_per_s'] / 1e12:.3f}",
                      f"{row['share_of_matmul_rate']:.0%}", f"{row['limit_utts_per_s']:.0f}")
    console.print(table)
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]).as_posix()), *sys.argv[1:]])
    console.print(f"measured {'bf16' if args.bf16 else 'float32'} matmul rate: {matmul_rate / 1e12:.3f} TFLOP/s; FLOPs "
                  "counted by torch's FlopCounterMode (convolutions and matmuls, forward + backward)")
    console.print(f"command: {command}", highlight=False, soft_wrap=True)
    if args.json:
        args.json.write_text(json.dumps({"command": command, "device": str(device), "where": where,
                                         "batch": batch_size, "samples": args.samples, "bf16": args.bf16,
                                         "matmul_flops_per_s": matmul_rate, "machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
