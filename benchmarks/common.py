"""What the benchmarks share: the machine's description and the physical limits measured in the same run.

Two limits recur. Reading bytes from the page cache (``cat > /dev/null``) bounds everything that reads audio
or shards. The machine's measured matrix-multiply rate (float32 on a CPU, bf16 on a GPU) bounds the
network: a training step cannot run faster than its counted FLOPs at that rate.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def machine() -> str:
    """CPU model, cores, memory, Python, torch, the GPU if any and the load average now."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB{gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f} at start")


def cat_seconds(files: list[Path]) -> float:
    """Wall time of ``cat FILES > /dev/null`` (in batches, to stay under the argument-length limit)."""
    start = time.perf_counter()
    for i in range(0, len(files), 2000):
        subprocess.run(["cat", *map(str, files[i:i + 2000])], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def page_cache_seconds(files: list[Path], repeats: int = 3) -> float:
    """Time to read FILES from the page cache: one warming pass, then the best of ``repeats``."""
    cat_seconds(files)
    return min(cat_seconds(files) for _ in range(repeats))


def matmul_flops_per_s(device: torch.device | str, dtype: torch.dtype | None = None, size: int | None = None,
                       seconds: float = 1.0) -> float:
    """Measured dense matmul rate: float32 on a CPU (what training there runs), bf16 on a GPU by default."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        a @ b
    sync()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * size**3 / best


def step_flops(model: torch.nn.Module, batch: torch.Tensor, backward: bool = True) -> float:
    """FLOPs of one forward (and backward of a scalar of the output) counted by torch's FlopCounterMode.

    Matrix multiplies and convolutions are counted; the FFT front-end, norms and activations are not, so the
    resulting limit is slightly optimistic (a faster-than-possible bound is still a bound)."""
    counter = FlopCounterMode(display=False)
    with counter:
        if backward:
            model(batch).square().mean().backward()
        else:
            with torch.no_grad():
                model(batch)
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def network_seconds(model: torch.nn.Module, batch: torch.Tensor, steps: int, warmup: int = 1, bf16: bool = False,
                    backward: bool = True) -> float:
    """Seconds per step of the network alone (no data, loss or optimizer): forward, and backward of a stand-in
    scalar (the mean square of the embeddings) unless ``backward`` is false; ``steps`` timed after ``warmup``."""
    device = batch.device

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward), torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                                              enabled=bf16):
            embeddings = model(batch)
        if backward:
            embeddings.float().square().mean().backward()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps
