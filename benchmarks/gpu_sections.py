"""The GPU check's own sections (``gpu_check.py`` runs each as a subprocess): the front-end against torchaudio, and a
bf16 and an fp16 training step of every registered loss.

    python benchmarks/gpu_sections.py frontend --device cuda --json OUT.json [--tiny]
    python benchmarks/gpu_sections.py losses --device cuda --json OUT.json [--tiny]

Each writes ``{"status": "ok" | "failed" | "skipped", "rows": [...], "error": ..., "details": ...}``; a row is
``{"figure", "speakerid", "baseline", "ratio", "note"}`` as in gpu_check.py's table.

frontend: speakerid's plain-torch ``MelSpectrogram`` (the seeds' log-mel; hamming 40 and 64 mels, hann 40) and
``KaldiFbank`` (80 bins) against torchaudio's ``transforms.MelSpectrogram`` and ``compliance.kaldi.fbank`` on the
device: the largest difference relative to the reference's largest value (fails above 1e-3), and the forward time
of a batch (GPU: 400 × 2 s; tiny: 4 × 0.5 s) on each side. torchaudio is imported inside the function only (its
wheels break next to a CPU torch): where it cannot load, the section is skipped and says why.

losses: for every loss in ``speakerid.losses.LOSSES``, N × M = 2 embeddings (GPU: N = 64, D = 256; tiny: N = 8,
D = 32) from a linear layer, ``torch.autocast`` in bf16, then in fp16 with a ``torch.amp.GradScaler`` (the seeds'
``--mixedprec`` path), 3 optimizer steps each, up to 20 while the scaler skips every step (it skips a step whose
scaled gradients overflow and halves its scale, from 65,536): every loss value finite and at least one step taken. On a CPU an fp16 step that torch cannot run there is reported as skipped,
with torch's error.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path

import torch

from speakerid.data.synthetic import speaker_params, synthesize_utterance
from speakerid.features import KaldiFbank, MelSpectrogram

TOLERANCE = 1e-3  # relative to the reference's largest value


def row(figure: str, speakerid, baseline=None, ratio=None, note: str = "") -> dict:
    return {"figure": figure, "speakerid": speakerid, "baseline": baseline, "ratio": ratio, "note": note}


def timed(fn, x: torch.Tensor, repeats: int = 5) -> float:
    """Best seconds of ``fn(x)`` after one warm-up (synchronised on CUDA)."""
    def sync() -> None:
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
    fn(x)
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def frontend(device: torch.device, tiny: bool) -> dict:
    try:
        import torchaudio  # noqa: PLC0415 (never at module level: its wheels break next to a CPU torch)
    except Exception as error:  # ImportError, or OSError from a CUDA build of torchaudio next to a CPU torch
        return {"status": "skipped", "rows": [], "error": f"skipped: torchaudio not importable here "
                                                         f"({type(error).__name__}: {str(error)[:200]})"}
    seconds, batch = (0.5, 4) if tiny else (2.0, 400)
    voices = [torch.from_numpy(synthesize_utterance(speaker_params(0, i), [0, i], seconds)).float() / 32768
              for i in range(min(batch, 8))]  # 8 voices, repeated: synthesis costs more than the check
    x = torch.stack([voices[i % len(voices)] for i in range(batch)]).to(device)
    rows, worst = [], 0.0
    windows = {"hamming": torch.hamming_window, "hann": torch.hann_window}
    with torch.no_grad():
        for window, n_mels in (("hamming", 40), ("hann", 40), ("hamming", 64)):
            ours = MelSpectrogram(n_mels=n_mels, window=window).to(device)
            reference = torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=512, win_length=400,
                                                             hop_length=160, window_fn=windows[window],
                                                             n_mels=n_mels).to(device)
            a, b = ours(x), reference(x)
            difference = ((a - b).abs().max() / b.abs().max()).item()
            worst = max(worst, difference)
            t_ours, t_ref = timed(ours, x), timed(reference, x)
            rows.append(row(f"MelSpectrogram {window} {n_mels} mels: max |Δ| / max |torchaudio|", difference,
                            note=f"forward of {batch} × {seconds:g} s: {1e3 * t_ours:.2f} ms vs torchaudio "
                                 f"{1e3 * t_ref:.2f} ms ({t_ref / t_ours:.2f}×)"))
        fbank = KaldiFbank(80).to(device)
        a = fbank(x[:4])  # (B, 80, frames)
        b = torch.stack([torchaudio.compliance.kaldi.fbank(x[i:i + 1] * 32768, num_mel_bins=80, dither=0.0).t()
                         for i in range(min(4, batch))])
        difference = ((a - b).abs().max() / b.abs().max()).item()
        worst = max(worst, difference)
        rows.append(row("KaldiFbank 80: max |Δ| / max |torchaudio kaldi.fbank|", difference,
                        note=f"{min(4, batch)} utterances; torchaudio {torchaudio.__version__}"))
    failed = worst > TOLERANCE
    return {"status": "failed" if failed else "ok", "rows": rows,
            "error": f"front-end differs from torchaudio by {worst:.2e} (> {TOLERANCE:g})" if failed else None,
            "details": {"torchaudio": torchaudio.__version__, "device": str(device)}}


def loss_steps(name: str, dtype: torch.dtype, device: torch.device, n: int, d: int) -> dict:
    """3 optimizer steps of loss NAME under autocast(dtype); fp16 through a GradScaler."""
    from speakerid.losses import LOSSES, build_loss, loss_options  # noqa: PLC0415

    m = 2
    LOSSES[name].check_utts_per_speaker(m)
    accepted = loss_options(name)
    options = {k: v for k, v in (("nOut", d), ("nClasses", 4 * n)) if k in accepted}
    torch.manual_seed(0)
    encoder = torch.nn.Linear(64, d).to(device)
    loss = build_loss(name, **options).to(device)
    parameters = list(encoder.parameters()) + list(loss.parameters())
    optimizer = torch.optim.SGD(parameters, lr=0.01)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    before = [p.detach().clone() for p in parameters]
    values = []
    for step in range(20):  # at least 3 steps; more while the scaler skips overflowing ones (it halves its scale)
        x = torch.randn(n * m, 64, device=device)
        labels = torch.randperm(4 * n, device=device)[:n]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=dtype):
            value, _ = loss(encoder(x).view(n, m, d), labels)
        scaler.scale(value).backward()
        scaler.step(optimizer)
        scaler.update()
        values.append(value.detach().float().item())
        stepped = any(not torch.equal(a, p.detach()) for a, p in zip(before, parameters))
        if step >= 2 and stepped:
            break
    finite = all(v == v and abs(v) != float("inf") for v in values)
    return {"losses": values, "finite": finite, "stepped": stepped, "steps": len(values),
            "scale": scaler.get_scale() if scaler.is_enabled() else None}


def losses(device: torch.device, tiny: bool) -> dict:
    from speakerid.losses import LOSSES  # noqa: PLC0415

    n, d = (8, 32) if tiny else (64, 256)
    rows, failures, details = [], [], {}
    for name in LOSSES:
        cells, notes = [], []
        for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            try:
                result = loss_steps(name, dtype, device, n, d)
            except Exception as error:  # noqa: BLE001 (reported per loss and precision)
                message = f"{type(error).__name__}: {str(error)[:160]}"
                details[f"{name}/{label}"] = {"error": message, "traceback": traceback.format_exc()[-2000:]}
                if device.type == "cpu" and dtype == torch.float16:
                    cells.append("skipped")
                    notes.append(f"fp16 skipped on the CPU: {message}")
                else:
                    cells.append("FAILED")
                    failures.append(f"{name} {label}: {message}")
                continue
            details[f"{name}/{label}"] = result
            ok = result["finite"] and result["stepped"]
            cells.append("ok" if ok else "FAILED")
            notes.append(f"{label} loss {result['losses'][-1]:.3g}" + (f" ({result['steps']} steps, scale "
                                                                       f"{result['scale']:g})" if result["scale"] else ""))
            if not ok:
                failures.append(f"{name} {label}: losses {result['losses']}, a step taken: {result['stepped']}")
        rows.append(row(f"{name}: bf16 / fp16 (GradScaler) steps", " / ".join(cells), note="; ".join(notes)))
    return {"status": "failed" if failures else "ok", "rows": rows, "error": "; ".join(failures) or None,
            "details": details | {"n_speakers": n, "utts_per_speaker": 2, "dim": d, "device": str(device)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("section", choices=["frontend", "losses"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    result = {"frontend": frontend, "losses": losses}[args.section](device, args.tiny)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, args.json)
    for r in result["rows"]:
        print(f"{r['figure']}: {r['speakerid']}  {r['note']}")
    print(f"{args.section}: {result['status']} {result.get('error') or ''}")


if __name__ == "__main__":
    main()
