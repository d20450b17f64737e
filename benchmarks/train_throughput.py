"""Training throughput: utterances/s and data-wait fraction of speakerid's training loop against a
voxceleb_trainer-style loop (one file per utterance, per-sample CPU augmentation), same model, loss,
optimizer, batch and machine, in the same run; with and without MUSAN/RIR augmentation.

Both sides train ResNetSE34L (nOut 512, SAP) with angleproto (``--model``/``--loss``: another network or loss, e.g.
ECAPA_TDNN_C1024 + aamsoftmax, the modern recipe's) and Adam (lr 0.001) on batches of N speakers × M utterances, random crops of max_frames·160 + 240 samples, from the same synthetic corpus (page cache warm:
every wav file, shard and bank file is read once with ``cat > /dev/null`` first). Each variant runs
``--warmup`` untimed optimizer steps (worker start-up, allocator and kernel warm-up), then ``--steps`` timed
ones. Per step: *wait* = time blocked in ``next(loader)``, *total* = from that call to the end of the step
(both loops end every step with ``.item()`` of the loss, a device synchronisation). utterances/s =
N·M·steps ÷ Σ total; data-wait = Σ wait ÷ Σ total.

speakerid: the real loop's pieces (speakerid.training): ``train_loader`` over wav shards (int16 batches
assembled in the workers, pinned on CUDA), model/loss/optimizer built by ``build_model_and_loss`` /
``build_optimizer`` and ``accelerator.prepare``-d, ``training_step`` (int16 → float on the device, batched
on-device augmentation by ``build_augmenter``'s Augmenter over MUSAN/RIR shards, autocast, backward),
``optimizer.step``. Mixed precision: Accelerate's, ``--mixed-precision auto`` = bf16 where supported.

baseline (written from the description of clovaai/voxceleb_trainer's trainSpeakerNet.py, SpeakerNet.py and
DatasetLoader.py): a map-style dataset whose item is a speaker tuple of M file indices; each file read whole
by ``soundfile.read`` (float64), wrap-padded when short, one random crop; with ``--augment`` each utterance
draws one of five outcomes (clean, reverb, music, speech, noise) and is augmented on the CPU inside the
DataLoader worker: additive noise reads 1 (noise, music) or 3–7 (speech) whole MUSAN files from disk and
mixes random crops at per-clip SNRs; reverb reads one RIR file and convolves with ``scipy.signal.convolve``;
the seed's speaker-tuple sampler; ``DataLoader(batch_size=N, pin_memory=False, drop_last=True)`` with
default collation (float32 (N, M, L)); in the main process the seed's ``transpose(1, 0)`` → ``reshape`` copy
→ ``.to(device)``; on CUDA ``torch.autocast(fp16)`` around model and loss with a GradScaler (the seed's
``--mixedprec``), on the CPU float32 (the seed's autocast is CUDA-only).

    python benchmarks/train_throughput.py                       # CPU: N=16, 2 workers, 15 steps after 3
    python benchmarks/train_throughput.py --device cuda         # GPU: N=200, 16 workers, 50 steps after 10
        [--model ResNetSE34L|ECAPA_TDNN_C1024] [--loss angleproto|aamsoftmax|…] [--n-speakers N] [--utts-per-speaker M] [--max-frames F] [--workers W] [--steps S] [--warmup K]
        [--augment | --no-augment] [--repeats R] [--mixed-precision auto|bf16|fp16|no] [--corpus DIR] [--json out.json]

A GPU machine without webdataset/soundfile (it cannot reach PyPI): on a machine that can,
``pip download webdataset braceexpand soundfile -d wheels --only-binary=:all: --python-version 3.X
--platform manylinux2014_x86_64`` (also fetches their dependencies: cffi, pycparser, pyyaml, numpy; soundfile's
manylinux wheel bundles libsndfile), carry ``wheels/``, then ``pip install --no-index --find-links wheels
webdataset braceexpand soundfile``. scipy, accelerate and rich are needed too (same way if missing); run from the
checkout with ``PYTHONPATH=.`` (speakerid is not installed there).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import glob
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from common import (SeedAugment, cat_seconds, machine, matmul_flops_per_s, network_seconds, pack_banks,
                    pack_shards, seed_loader, shutdown, step_flops, train_corpus, write_banks)

from speakerid.config import load_config
from speakerid.data.batches import train_loader
from speakerid.data.shardset import ShardSet
from speakerid.training import (build_augmenter, build_model_and_loss, build_optimizer, resolve_mixed_precision,
                                training_step)

# per device: batch N, loader workers, timed and warm-up steps, corpus size (one baseline epoch ≥ warm-up + steps)
DEFAULTS = {
    "cpu": {"n_speakers": 16, "workers": 2, "steps": 15, "warmup": 3, "corpus_speakers": 48, "corpus_utts": 24},
    "cuda": {"n_speakers": 200, "workers": 16, "steps": 50, "warmup": 10, "corpus_speakers": 1000, "corpus_utts": 32},
}


# --model → (registry name, options): the published recipes' settings (configs/resnetse34l_*.yaml, ecapa_*.yaml)
MODEL_PRESETS = {
    "ResNetSE34L": ("ResNetSE34L", {"n_out": 512, "encoder_type": "SAP"}),
    "ECAPA_TDNN_C1024": ("ECAPA_TDNN", {"channels": 1024, "n_mels": 80, "n_out": 192}),
}
LOSS_OPTIONS = {"aamsoftmax": {"margin": 0.2, "scale": 30.0}}  # --loss: the recipes' options (ecapa_aamsoftmax.yaml)


# ---------------------------------------------------------------------------------- the baseline loop


class EndlessEpochs:
    """next() over epoch after epoch, as the seed's loop does; a new epoch re-forks the workers (counted)."""

    def __init__(self, loader, sampler) -> None:
        self.loader, self.sampler, self.epochs = loader, sampler, 0
        self.it = iter(loader)

    def __next__(self):
        try:
            return next(self.it)
        except StopIteration:
            self.epochs += 1
            self.sampler.epoch = self.epochs
            self.it = iter(self.loader)
            return next(self.it)

    def close(self) -> None:
        shutdown(self.it)


# ------------------------------------------------------------------------------------------ measuring


def timed_steps(next_batch, step, warmup: int, steps: int) -> dict:
    """``warmup`` untimed steps, then ``steps`` timed ones: wait in next_batch(), total to the step's end."""
    for _ in range(warmup):
        step(next_batch())
    waits, totals, losses = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next_batch()
        t1 = time.perf_counter()
        losses.append(step(batch))  # ends with .item(): the device is synchronised
        t2 = time.perf_counter()
        waits.append(t1 - t0)
        totals.append(t2 - t0)
    return {"wait_s": waits, "step_s": totals, "losses": losses, "seconds": sum(totals),
            "data_wait": sum(waits) / sum(totals), "mean_step_s": sum(totals) / steps,
            "median_step_s": float(np.median(totals))}


def config_for(args, shards_dir: Path, augment: bool, banks: tuple[Path, Path] | None):
    model_name, model_options = MODEL_PRESETS[args.model]
    overrides = [
        f"model.name={model_name}", *(f"model.options.{k}={v}" for k, v in model_options.items()),
        f"loss.name={args.loss}", *(f"loss.options.{k}={v}" for k, v in LOSS_OPTIONS.get(args.loss, {}).items()),
        "optim.name=adam", "optim.lr=0.001", f"data.train_shards={shards_dir}", f"data.n_speakers={args.n_speakers}",
        f"data.utts_per_speaker={args.utts_per_speaker}", f"data.max_frames={args.max_frames}",
        f"data.workers={args.workers}", f"train.mixed_precision={args.mixed_precision}", f"train.seed={args.seed}",
        f"augment.enabled={str(augment).lower()}",
    ]
    if augment:
        overrides += [f"augment.musan_shards={banks[0]}", f"augment.rir_shards={banks[1]}"]
    return load_config(None, overrides)


def run_speakerid(args, accelerator, shards: ShardSet, augment: bool, banks) -> dict:
    config = config_for(args, Path(shards.location), augment, banks)
    torch.manual_seed(args.seed)
    model, loss = build_model_and_loss(config, n_classes=len(shards.index["speakers"]))
    optimizer = build_optimizer(config, list(model.parameters()) + list(loss.parameters()))
    model, loss = model.train(), loss.train()
    model, loss, optimizer = accelerator.prepare(model, loss, optimizer)
    augmenter = build_augmenter(config, accelerator)
    generator = torch.Generator().manual_seed(config.train.seed + 1000)
    data = config.batch_config()
    it = iter(train_loader(shards, data, workers=config.data.workers, pin_memory=accelerator.device.type == "cuda"))

    def step(batch) -> float:
        with accelerator.accumulate(model, loss):
            value, _, _ = training_step(model, loss, batch, accelerator, config, augmenter, generator)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return value

    try:
        result = timed_steps(lambda: next(it), step, args.warmup, args.steps)
    finally:
        shutdown(it)
        del it
        accelerator.free_memory()
    result["precision"] = {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)
    return result


def run_baseline(args, device: torch.device, paths, labels, augment: bool, banks, shards_dir: Path) -> dict:
    config = config_for(args, shards_dir, False, None)  # the same model, loss and optimizer settings
    crop = args.max_frames * 160 + 240
    n, m = args.n_speakers, args.utts_per_speaker
    torch.manual_seed(args.seed)
    model, loss = build_model_and_loss(config, n_classes=len(set(labels)))
    model, loss = model.to(device).train(), loss.to(device).train()
    optimizer = build_optimizer(config, list(model.parameters()) + list(loss.parameters()))
    amp = device.type == "cuda"  # the seed's --mixedprec: torch.autocast("cuda") fp16 + GradScaler
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    loader, sampler = seed_loader(paths, labels, crop, n, m, 500, args.seed, args.workers,
                                  SeedAugment(*banks, crop) if augment else None)
    per_epoch = len(sampler) // n
    batches = EndlessEpochs(loader, sampler)

    def step(batch) -> float:
        data, data_label = batch
        data = data.transpose(1, 0)  # (M, N, L), as the seed's train_network
        model.zero_grad(set_to_none=True)
        loss.zero_grad(set_to_none=True)
        label = data_label.long().to(device)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            x = data.reshape(-1, data.size(-1)).to(device)  # a copy on the CPU (transposed), then a pageable copy
            out = model(x)
            out = out.reshape(m, -1, out.size(-1)).transpose(1, 0)  # (N, M, D)
            value, _ = loss(out, label)
        if amp:
            scaler.scale(value).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            value.backward()
            optimizer.step()
        return value.detach().cpu().item()

    try:
        result = timed_steps(lambda: next(batches), step, args.warmup, args.steps)
    finally:
        batches.close()
    result.update(precision="fp16 + GradScaler" if amp else "fp32", epoch_rollovers=batches.epochs,
                  batches_per_epoch=per_epoch)
    del batches, loader
    gc.collect()
    return result


# ------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=list(MODEL_PRESETS), default="ResNetSE34L", help="network, both sides")
    parser.add_argument("--loss", default="angleproto", help="loss (speakerid's registry name), both sides")
    parser.add_argument("-n", "--n-speakers", type=int, help="N, speakers per batch (cpu 16, cuda 200)")
    parser.add_argument("-m", "--utts-per-speaker", type=int, default=2, help="M (default 2)")
    parser.add_argument("--max-frames", type=int, default=200, help="crop of max_frames·160 + 240 samples (200: 2 s)")
    parser.add_argument("--workers", type=int, help="DataLoader workers, both sides (cpu 2, cuda 16)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per variant (cpu 15, cuda 50)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (cpu 3, cuda 10)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side and setting, alternated; best shown")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                        help="only with (--augment) or only without (--no-augment); default: both")
    parser.add_argument("--mixed-precision", choices=["auto", "bf16", "fp16", "no"], default="auto",
                        help="speakerid's on cuda (Accelerate): auto = bf16 where supported, else fp16; "
                             "cpu: fp32 always")
    parser.add_argument("--corpus", type=Path, help="reuse/create corpus, shards and banks here (default: a temp dir)")
    parser.add_argument("--corpus-speakers", type=int, help="speakers in the built-in corpus (cpu 48, cuda 1000)")
    parser.add_argument("--corpus-utts", type=int, help="utterances per speaker (cpu 24, cuda 32)")
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--max-seconds", type=float, default=8.0)
    parser.add_argument("--chunk-size", type=int, default=4, help="shardify --chunk-size of the training shards")
    parser.add_argument("--shard-mb", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    console = Console(width=150)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    started = datetime.datetime.now().astimezone()
    about_machine = machine()
    if args.device == "cuda":
        about_machine += f"; {torch.cuda.get_device_name(0)}"

    # ---- data: corpus, wav shards, noise and RIR banks (as shards for speakerid, as files for the baseline)
    scratch = Path(tempfile.mkdtemp(prefix="train-bench-"))
    root = args.corpus or scratch / "corpus"
    prep = {}
    t = time.perf_counter()
    with console.status("generating the synthetic corpus …"):
        corpus = train_corpus(root, args.corpus_speakers, args.corpus_utts, min_seconds=args.min_seconds,
                              max_seconds=args.max_seconds)
    prep["corpus_s"] = time.perf_counter() - t
    inputs, n_speakers = corpus.inputs, corpus.n_speakers
    t = time.perf_counter()
    with console.status("packing wav shards and the augmentation banks …"):
        shard_dir = pack_shards(corpus, "wav", args.chunk_size, args.shard_mb)
        shards = ShardSet.open(shard_dir)
        musan_files, rir_files = write_banks(root / "banks", seed=args.seed)
        bank_shards = (pack_banks(musan_files, root / "banks-shards" / "musan"),
                       pack_banks(rir_files, root / "banks-shards" / "rirs"))
    prep["pack_s"] = time.perf_counter() - t
    t = time.perf_counter()
    bank_files = [Path(p) for p in glob.glob(str(root / "banks" / "**" / "*.wav"), recursive=True)]
    cat_seconds(inputs + [Path(u) for u in shards.urls] + bank_files
        + [p for d in bank_shards for p in d.glob("*.tar")])  # page cache warm: every figure reads from memory
    prep["warm_s"] = time.perf_counter() - t

    # ---- measurements: per augmentation setting, speakerid then the baseline
    from accelerate import Accelerator

    mixed = resolve_mixed_precision(args.mixed_precision) if args.device == "cuda" else "no"
    accelerator = Accelerator(mixed_precision=mixed, cpu=args.device == "cpu")
    device = accelerator.device
    settings = [True, False] if args.augment is None else [args.augment]
    rows = []
    utts = args.n_speakers * args.utts_per_speaker * args.steps
    for augment in settings:
        runs = {"speakerid": [], "baseline": []}
        for repeat in range(args.repeats):  # alternated, so load from other jobs falls on both sides alike
            with console.status(f"speakerid, augmentation {'on' if augment else 'off'}, run {repeat + 1} …"):
                runs["speakerid"].append(run_speakerid(args, accelerator, shards, augment, bank_shards))
            with console.status(f"baseline, augmentation {'on' if augment else 'off'}, run {repeat + 1} …"):
                runs["baseline"].append(run_baseline(args, device, corpus.paths, corpus.labels, augment,
                                                     (musan_files, rir_files), shard_dir))
        for side in runs.values():
            for r in side:
                r["utterances_per_s"] = utts / r["seconds"]
        # the best run of each side: other jobs on a shared machine only ever slow a run down
        sid, base = (max(runs[k], key=lambda r: r["utterances_per_s"]) for k in ("speakerid", "baseline"))
        rows.append({"augment": augment, "speakerid": sid, "baseline": base,
                     "ratio": sid["utterances_per_s"] / base["utterances_per_s"],
                     "median_ratio": base["median_step_s"] / sid["median_step_s"],
                     "all_utterances_per_s": {k: [r["utterances_per_s"] for r in v] for k, v in runs.items()}})

    # ---- physical limits. The network's counted FLOPs per utterance at the device's measured matmul rate (bf16
    # on a GPU, what speakerid trains in there; float32 on a CPU), and the network alone (forward + backward of
    # the same batch, no data, loss or optimizer). On a CPU oneDNN runs 3×3 convolutions with Winograd-type
    # algorithms, fewer multiplications than counted, so there the FLOP figure is no bound and the network alone is.
    crop = args.max_frames * 160 + 240
    batch_size = args.n_speakers * args.utts_per_speaker
    with console.status("the network alone, counted FLOPs and the matmul rate …"):
        torch.manual_seed(args.seed)
        probe, _ = build_model_and_loss(config_for(args, shard_dir, False, None), n_classes=n_speakers)
        probe = probe.to(device).train()
        flops_per_utt = step_flops(probe, torch.randn(2, crop, device=device)) / 2
        batch = 0.1 * torch.randn(batch_size, crop, device=device)
        network_s = min(network_seconds(probe, batch, steps=max(2, args.steps // 4), warmup=1,
                                        bf16=device.type == "cuda") for _ in range(2 + args.repeats))  # the best run
        del probe, batch
        matmul_rate = matmul_flops_per_s(device)
    flop_bound = matmul_rate / flops_per_utt
    network_bound = batch_size / network_s
    limit = {"flops_per_utterance": flops_per_utt, "matmul_flops_per_s": matmul_rate,
             "matmul_dtype": "bf16" if device.type == "cuda" else "float32",
             "flop_bound_utterances_per_s": flop_bound, "network_alone_utterances_per_s": network_bound}
    if device.type == "cuda":
        limit.update(utterances_per_s=flop_bound, what="counted FLOPs at the bf16 matmul rate")
    else:
        limit.update(utterances_per_s=network_bound, what="the network alone, forward + backward")

    # ---- report
    table = Table(title=(f"training throughput, {args.model} + {args.loss}, Adam: N={args.n_speakers} × "
                         f"M={args.utts_per_speaker}"
                         f" crops of {crop} samples; {args.workers} loader workers; {args.steps} timed steps after "
                         f"{args.warmup}; {device.type}; best of {args.repeats}"))
    for column in ("variant", "augmentation", "precision", "utterances/s", "data-wait", "s/step mean", "s/step median",
                   "ratio sid/base", "ratio of medians"):
        table.add_column(column, justify="left" if column in ("variant", "precision") else "right")
    for r in rows:
        for name, side in (("speakerid", r["speakerid"]), ("voxceleb_trainer-style", r["baseline"])):
            table.add_row(name, "on" if r["augment"] else "off", side["precision"], f"{side['utterances_per_s']:.1f}",
                          f"{100 * side['data_wait']:.1f} %", f"{side['mean_step_s']:.3f}",
                          f"{side['median_step_s']:.3f}",
                          f"[bold]{r['ratio']:.2f}×[/bold]" if name == "speakerid" else "",
                          f"{r['median_ratio']:.2f}×" if name == "speakerid" else "")
    console.print(table)
    console.print(
        f"corpus: {len(inputs)} utterances of {n_speakers} speakers, {corpus.info.train_hours:.1f} h, wav shards "
        f"({len(shards)}, chunk {args.chunk_size}); banks: {len(bank_files)} wav files (MUSAN-like noise/speech/music, "
        f"RIRs), packed as noise shards for speakerid, read as files by the baseline. data-wait = time blocked in "
        "next(loader) ÷ step time; utterances/s and the ratio from the summed step times, the ratio of medians "
        "(baseline's median step ÷ speakerid's) is less sensitive to other jobs' load; speakerid augments on the "
        "training device, the baseline per utterance in its workers.")
    for r in rows:
        if r["baseline"]["epoch_rollovers"]:
            console.print(f"[yellow]note: the baseline crossed {r['baseline']['epoch_rollovers']} epoch end(s) "
                          f"({r['baseline']['batches_per_epoch']} batches an epoch; workers re-forked as in the seed): "
                          "a larger --corpus-speakers/--corpus-utts avoids it")
    console.print(f"limits: {flops_per_utt / 1e9:.2f} GFLOP per utterance (forward + backward, counted) at the "
                  f"measured {limit['matmul_dtype']} matmul rate {matmul_rate / 1e12:.3f} TFLOP/s = "
                  f"{flop_bound:.0f} utterances/s; the network alone: {network_bound:.0f} utterances/s. Against "
                  f"{limit['what']}, speakerid reaches "
                  + ", ".join(f"{r['speakerid']['utterances_per_s'] / limit['utterances_per_s']:.0%} "
                              f"(augmentation {'on' if r['augment'] else 'off'})" for r in rows))
    if args.device == "cpu":
        console.print("CPU: both sides run float32 (the seed's autocast is CUDA-only); the network's forward/backward "
                      "sets the pace here and the loader workers share the same cores, so ratios near 1 are expected.")
    else:
        for r in rows:
            sid = r["speakerid"]
            console.print(f"targets, augmentation {'on' if r['augment'] else 'off'}: data-wait < 5 %: "
                          f"{100 * sid['data_wait']:.1f} % ({'met' if sid['data_wait'] < 0.05 else 'NOT met'}); "
                          f"≥ 2× the baseline: {r['ratio']:.2f}× ({'met' if r['ratio'] >= 2 else 'NOT met'})")
    ended = datetime.datetime.now().astimezone()
    console.print(f"machine: {about_machine}, {os.getloadavg()[0]:.2f} at end; "
                  f"date {started.isoformat(timespec='seconds')}"
                  f" ({(ended - started).total_seconds():.0f} s); preparation "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in prep.items()))
    console.print(f"command: {command}")
    if args.json:
        args.json.write_text(json.dumps({
            "command": command, "date": started.isoformat(timespec="seconds"), "machine": about_machine,
            "config": {k: v for k, v in vars(args).items() if k != "json" and not isinstance(v, Path)}
            | {"crop_samples": crop, "utterances": len(inputs), "speakers": n_speakers, "hours": corpus.info.train_hours,
               "shards": len(shards)},
            "preparation_s": prep, "rows": rows, "limit": limit,
        }, indent=1, default=str))
    shutil.rmtree(scratch, ignore_errors=True)  # a --corpus given by the user lies outside it and is kept


if __name__ == "__main__":
    main()
