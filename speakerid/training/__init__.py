"""The Accelerate training loop and its parts, in the order a run meets them.

``build.py`` turns the config into a ``Run`` (``build_run``: accelerator, model + loss, optimizer, LR schedule,
on-device augmenter and speed perturbation, the label space, the rank's batch loader, the claimed run directory),
with the checks said before the first step, mixed precision and the margin warm-up; ``init_from.py`` starts a new
run from trained weights (``train.init_from``: a run directory, an inference checkpoint or a voxceleb_trainer
``.model`` file), exactly or not at all; ``state.py`` is what speakerid itself checkpoints (``TrainingState``:
``Progress`` — epoch, step, reader position — the LR schedule, the epoch's data report and the label space); ``checkpoints.py``
claims the run directory and saves, rotates and loads ``checkpoints/step-NNNNNNNN`` (``Checkpoints``);
``signals.py`` turns SIGTERM/SIGUSR1/SIGINT into a clean stop at the next step or while waiting for data
(``StopFlag``, ``BatchFetcher``, ``next_batch``); ``logs.py`` writes ``metrics.jsonl``, draws the progress bar and
measures a step's throughput; ``trackers.py`` checks ``train.log_with`` (Accelerate's experiment trackers) before the
Accelerator starts and gives them the resolved config; ``epoch.py`` starts an epoch and ends it (data report, export, validation, schedule);
``loop.py`` holds ``train()`` — the loop, on one screen — with ``optimizer_step`` and ``training_step``. After a
run, ``average.py`` averages the model weights of its last checkpoints into an inference checkpoint
(``average_checkpoints``; its front door is ``python -m speakerid.average``).
"""

from speakerid.training.build import (build_augmenter, build_model_and_loss, build_optimizer, build_scheduler,
                                      check_config, margin_at, resolve_mixed_precision)
from speakerid.training.loop import TrainResult, train, training_step
from speakerid.training.signals import StopFlag
from speakerid.training.state import Progress, TrainingState

__all__ = ["Progress", "StopFlag", "TrainResult", "TrainingState", "build_augmenter", "build_model_and_loss",
           "build_optimizer", "build_scheduler", "check_config", "margin_at", "resolve_mixed_precision", "train",
           "training_step"]
