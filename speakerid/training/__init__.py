"""The Accelerate training loop and its parts, in the order a run meets them.

``build.py`` turns the config into the model + loss, optimizer, LR schedule and on-device augmenter (with the
checks said before the first step, mixed precision and the margin warm-up); ``state.py`` is what speakerid itself
checkpoints (``Progress``: epoch, step, reader position; ``TrainingState``: the LR schedule and the epoch's data
report); ``checkpoints.py`` claims the run directory and saves, rotates and loads ``checkpoints/step-NNNNNNNN``;
``signals.py`` turns SIGTERM/SIGUSR1/SIGINT into a clean stop, also while waiting for data (``StopFlag``,
``BatchFetcher``); ``logs.py`` writes ``metrics.jsonl`` and draws the progress bar; ``epoch.py`` exports and
validates at an epoch's end; ``loop.py`` holds ``train()`` (the loop, on one screen) and ``training_step``.
"""

from speakerid.training.build import (build_augmenter, build_model_and_loss, build_optimizer, build_scheduler,
                                      check_config, margin_at, resolve_mixed_precision)
from speakerid.training.checkpoints import claim_run_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from speakerid.training.loop import TrainResult, train, training_step
from speakerid.training.signals import StopFlag
from speakerid.training.state import Progress, TrainingState

__all__ = ["Progress", "StopFlag", "TrainResult", "TrainingState", "build_augmenter", "build_model_and_loss",
           "build_optimizer", "build_scheduler", "check_config", "claim_run_dir", "latest_checkpoint",
           "load_checkpoint", "margin_at", "resolve_mixed_precision", "save_checkpoint", "train", "training_step"]
