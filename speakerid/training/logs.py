"""What a run shows and records: ``metrics.jsonl`` (main process, mirrored to Accelerate's trackers), the rich
progress bar per epoch, and the step's throughput figures."""

from __future__ import annotations

import json
import time
from pathlib import Path

from accelerate import Accelerator


def step_rates(batch: dict, utts_per_speaker: int, world: int, waited: float, started: float) -> dict:
    """Utterances per second over all ranks, and the share of the step spent waiting for data (waited: asked for
    the batch; started: got it; the step ends now)."""
    ended = time.perf_counter()
    return {"utterances_per_s": batch["labels"].numel() * utts_per_speaker * world / (ended - waited),
            "data_wait": (started - waited) / (ended - waited)}


class MetricsLog:
    """One JSON object per line in the run directory (main process), mirrored to Accelerate's trackers."""

    def __init__(self, path: Path, accelerator: Accelerator) -> None:
        self.path, self.accelerator = path, accelerator

    def write(self, **record) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        self.accelerator.log(scalars, step=record.get("step"))


class EpochBar:
    """A rich progress bar per epoch on the main process: loss, top-1, lr, utterances/s, data-wait %."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.progress = None
        self.smoothed: dict[str, float] = {}

    def start(self, epoch: int, total: int, done: int) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

        self.close()
        self.progress = RichProgress(TextColumn(f"[bold]epoch {epoch + 1}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), transient=False)
        self.progress.start()
        self.task = self.progress.add_task("", total=total, completed=done, stats="")

    def update(self, record: dict) -> None:
        if not self.progress:
            return
        for key, value in record.items():  # exponential moving average: a readable, steady display
            self.smoothed[key] = value if key not in self.smoothed else 0.9 * self.smoothed[key] + 0.1 * value
        s = self.smoothed
        self.progress.update(self.task, advance=1, stats=(
            f"loss {s['loss']:.3f} top1 {s['accuracy']:.1f}% lr {s['lr']:.2e} "
            f"{s['utterances_per_s']:.0f} utt/s data-wait {100 * s['data_wait']:.0f}%"))

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
            self.progress = None
