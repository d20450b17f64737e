"""The training loop: build, ``accelerator.prepare``, resume, then for each batch: int16 → float on the
device → model on (N·M, L) → loss on (N, M, D) → backward/step → log → checkpoint; at each epoch's end export
and validate."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from speakerid.config import Config
from speakerid.errors import SpeakeridError
from speakerid.features import int16_to_float
from speakerid.training.build import Run, build_run
from speakerid.training.checkpoints import Checkpoints, latest_checkpoint
from speakerid.training.epoch import end_of_epoch, start_epoch
from speakerid.training.logs import EpochBar, MetricsLog, step_rates
from speakerid.training.signals import BatchFetcher, StopFlag, next_batch, restoring_signal_handlers
from speakerid.training.state import Progress


@dataclass
class TrainResult:
    run_dir: Path
    progress: Progress
    stopped_by_signal: bool
    last_loss: float
    validations: list[dict]


@restoring_signal_handlers
def train(config: Config, *, force: bool = False, stop_after_steps: int | None = None,
          validate=None, export=None) -> TrainResult:
    """Train as configured; resume from the run directory's latest checkpoint if there is one.

    ``validate(model, loss, accelerator) -> dict`` is called every test_interval epochs (and its EER drives the
    plateau schedule); ``export(model, run_dir)`` after every epoch. Both default to speakerid.evaluation's.
    """
    run = build_run(config, force)
    accelerator, progress, per_epoch = run.accelerator, run.state.progress, run.per_epoch
    model, loss, optimizer = accelerator.prepare(run.model, run.loss, run.optimizer)
    if config.train.compile:
        model = torch.compile(model)
    checkpoints = Checkpoints(accelerator, run.run_dir, config.train.keep_checkpoints, run.state)
    if run.checkpoint is not None:
        checkpoints.resume(run.checkpoint)
    if reached(config.train.max_steps, progress.step):  # a finished run run again: return at once, train nothing
        accelerator.print(f"{run.run_dir}: already at step {progress.step} of train.max_steps={config.train.max_steps}"
                          "; nothing to train (raise train.max_steps to continue)")
        return finish(run, EpochBar(False), TrainResult(run.run_dir, progress, False, float("nan"), []), stopped=False)
    stop = StopFlag()  # before the workers fork: they inherit it until their worker_init_fn leaves the signals to us
    batches = BatchFetcher(iter(run.loader))
    metrics, bar = MetricsLog(run.run_dir / "metrics.jsonl", accelerator), EpochBar(accelerator.is_main_process)
    result = TrainResult(run.run_dir, progress, stopped_by_signal=False, last_loss=float("nan"), validations=[])
    final_margin = getattr(accelerator.unwrap_model(loss), "margin", None)

    while progress.epoch < config.train.max_epoch:
        start_epoch(run, model, loss, final_margin)
        bar.start(progress.epoch, per_epoch, done=progress.batch - progress.epoch * per_epoch)
        while progress.batch < (progress.epoch + 1) * per_epoch:
            waited = time.perf_counter()
            batch = next_batch(batches, stop, accelerator, progress, run.run_dir)
            if batch is None:  # the stop reached every rank while it waited for data
                checkpoints.save_unless_saved()
                return finish(run, bar, result, stopped=True)
            run.state.meter.update(batch)
            started = time.perf_counter()
            record = optimizer_step(run, model, loss, optimizer, batch)
            record.update(step_rates(batch, config.data.utts_per_speaker, accelerator.num_processes, waited, started))
            result.last_loss = record["loss"]
            bar.update(record)
            if progress.step % config.train.log_every == 0:
                metrics.write(step=progress.step, epoch=progress.epoch, **record)
            halt = stop.agreed(accelerator) or reached(stop_after_steps, progress.step)
            if halt or (config.train.save_every_steps and progress.step % config.train.save_every_steps == 0):
                checkpoints.save()
            if halt:
                return finish(run, bar, result, stopped=bool(stop))
            if reached(config.train.max_steps, progress.step):
                break
        epoch_done = progress.batch >= (progress.epoch + 1) * per_epoch
        if epoch_done and (validation := end_of_epoch(run, model, loss, metrics, validate, export)):
            result.validations.append(validation)
        checkpoints.save()
        if not epoch_done or reached(config.train.max_steps, progress.step):
            break  # max_steps reached (inside an epoch or at its end)
    return finish(run, bar, result, stopped=False)


def reached(limit: int | None, step: int) -> bool:
    """A step limit that is set (not 0 or None) and reached."""
    return bool(limit) and step >= limit


def finish(run: Run, bar: EpochBar, result: TrainResult, stopped: bool) -> TrainResult:
    bar.close()
    run.loader.close()
    run.accelerator.end_training()
    result.stopped_by_signal = stopped
    return result


def optimizer_step(run: Run, model, loss, optimizer, batch: dict) -> dict:
    """One batch through training_step and the optimizer (accumulating as configured); the step's record."""
    config, accelerator, progress = run.config, run.accelerator, run.state.progress
    # the step's speeds and augmentation are a function of (seed, rank, batch index): exact on resume, nothing saved
    generator = run.augmenter.at_step(progress.batch) if run.augmenter is not None else None
    if generator is None and run.speed is not None:
        generator = run.speed.at_step(progress.batch)
    if run.spec_augment is not None:  # the model's SpecAugment hook draws this step's masks from the same triple
        run.spec_augment.at_step(progress.batch)
    with accelerator.accumulate(model, loss):
        value, accuracy, augmented = training_step(model, loss, batch, accelerator, config, run.augmenter, generator,
                                                   run.speed)
        optimizer.step()
        if config.schedule.interval == "step" and accelerator.sync_gradients and config.schedule.name != "plateau":
            run.state.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    progress.batch += 1
    progress.step += accelerator.sync_gradients
    if not math.isfinite(value):
        raise SpeakeridError(
            f"loss is {value} at step {progress.step} (epoch {progress.epoch}); batch keys: "
            f"{batch['keys'][:3]}…; last good checkpoint: {latest_checkpoint(run.run_dir) or 'none'}. "
            "Lower optim.lr, check the data, or try train.mixed_precision=no"
        )
    return {"loss": value, "accuracy": accuracy, "lr": optimizer.param_groups[0]["lr"],
            **({"margin": accelerator.unwrap_model(loss).margin} if config.loss.margin_warmup_end else {}),
            **({"augmented": augmented} if run.augmenter is not None else {}),
            **({"spec_masked": run.spec_augment.last_masked} if run.spec_augment is not None else {})}


def training_step(model, loss, batch: dict, accelerator: Accelerator, config: Config, augmenter=None,
                  generator: torch.Generator | None = None, speed=None) -> tuple[float, float, int]:
    """int16 (N, M, L) → float on the device → (speed-perturbed: labels too) → (augmented) → embeddings (N·M, D) →
    loss on (N, M, D) → backward.

    Returns (loss, accuracy %, utterances augmented). Reading the loss waits for the device once a step; the loop
    needs it anyway, for the NaN check and the per-step rate."""
    audio = batch["audio"].to(accelerator.device, non_blocking=True)
    labels = batch["labels"].to(accelerator.device, non_blocking=True)
    waveforms = int16_to_float(audio)
    if speed is not None:  # drawn before the augmentation, from the same step generator
        speeds = speed.draw(len(labels), generator)
        waveforms, labels = speed.apply(waveforms, speeds), speed.labels(labels, speeds)
    n, m, length = waveforms.shape
    waveforms = waveforms.reshape(n * m, length)
    augmented = 0
    if augmenter is not None:
        plan = augmenter.draw(n * m, generator)
        waveforms = augmenter.apply(waveforms, plan)
        augmented = n * m - plan.counts()["none"]
    with accelerator.autocast():
        embeddings = model(waveforms)
    value, accuracy = loss(embeddings.float().reshape(n, m, -1), labels)  # the loss in float32, outside autocast
    accelerator.backward(value)
    if config.optim.grad_clip and accelerator.sync_gradients:
        accelerator.clip_grad_norm_(list(model.parameters()) + list(loss.parameters()), config.optim.grad_clip)
    return float(value.detach()), float(accuracy), augmented
