"""The training loop: build, ``accelerator.prepare``, resume, then for each batch: int16 → float on the device →
model on (N·M, L) → loss on (N, M, D) → backward/step → log → checkpoint; at each epoch's end export and validate."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from speakerid.config import Config, save_config
from speakerid.data.batches import BatchConfig, EpochMeter, batches_per_epoch, train_loader, usable_utterances
from speakerid.data.shardset import ShardSet
from speakerid.errors import SpeakeridError
from speakerid.features import int16_to_float
from speakerid.training.build import (build_augmenter, build_model_and_loss, build_optimizer, build_scheduler,
                                      check_config, margin_at, resolve_mixed_precision)
from speakerid.training.checkpoints import claim_run_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from speakerid.training.epoch import end_of_epoch
from speakerid.training.logs import EpochBar, MetricsLog
from speakerid.training.signals import (STOP_GRACE_S, BatchFetcher, StopFlag, every_rank_stopped_waiting,
                                        restoring_signal_handlers)
from speakerid.training.state import Progress, TrainingState


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

    ``validate(model, loss, epoch) -> dict`` is called every test_interval epochs (and its EER drives the
    plateau schedule); ``export(model, run_dir)`` after every epoch. Both default to speakerid.evaluation's.
    """
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(config.train.mixed_precision),
                              gradient_accumulation_steps=config.optim.grad_accum,
                              log_with="tensorboard" if config.train.tensorboard else None,
                              project_dir=config.train.run_dir)
    set_seed(config.train.seed)
    shards = ShardSet.open(config.data.train_shards, urls=config.data.train_urls, io_timeout=config.data.io_timeout)
    check_config(config, shards)
    # Everything a typo can break is built before the run directory is claimed: a failed start writes nothing.
    model, loss = build_model_and_loss(config, n_classes=len(shards.index["speakers"]))
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, list(model.parameters()) + list(loss.parameters()))
    data = BatchConfig(n_speakers=config.data.n_speakers, utts_per_speaker=config.data.utts_per_speaker,
                       max_frames=config.data.max_frames, max_seg_per_spk=config.data.max_seg_per_spk,
                       open_shards=config.data.open_shards, pool_factor=config.data.pool_factor, seed=config.train.seed,
                       shard_retries=config.data.shard_retries)
    rank, world = accelerator.process_index, accelerator.num_processes
    per_epoch = batches_per_epoch(shards.index, data, world, config.data.workers)
    scheduler = build_scheduler(config, optimizer, per_epoch // config.optim.grad_accum)
    augmenter = build_augmenter(config, accelerator)
    run_dir = claim_run_dir(config, force)
    checkpoint = latest_checkpoint(run_dir)
    progress = Progress.load(checkpoint / "progress.json") if checkpoint is not None else Progress()
    # The loader is not prepared: each rank reads its own streams; the start position comes from progress.
    loader = train_loader(shards, data, rank=rank, world_size=world, workers=config.data.workers,
                          start_batch=progress.batch, pin_memory=torch.cuda.is_available())
    if accelerator.is_main_process:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    if config.train.tensorboard:
        accelerator.init_trackers("tensorboard")

    model, loss, optimizer = accelerator.prepare(model, loss, optimizer)
    if config.train.compile:
        model = torch.compile(model)
    # per-epoch coverage of this rank's share of the usable utterances, and damaged input skipped
    meter = EpochMeter(usable_utterances(shards.index, data, world * max(1, config.data.workers)) // world)
    own_state = TrainingState(scheduler, meter)
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint, own_state)
        accelerator.print(f"resuming from {checkpoint} (epoch {progress.epoch}, step {progress.step})")
    stop = StopFlag()  # before the workers fork: they inherit it until their worker_init_fn leaves the signals to us
    batches = BatchFetcher(iter(loader))
    saved_step = progress.step if checkpoint is not None else None
    metrics = MetricsLog(run_dir / "metrics.jsonl", accelerator)
    bar = EpochBar(accelerator.is_main_process)
    last_loss, validations = float("nan"), []

    def finish(stopped: bool) -> TrainResult:
        bar.close()
        loader.close()
        accelerator.end_training()
        return TrainResult(run_dir, progress, stopped, last_loss, validations)

    final_margin = getattr(accelerator.unwrap_model(loss), "margin", None)

    while progress.epoch < config.train.max_epoch:
        model.train()
        loss.train()
        if config.loss.margin_warmup_end:
            accelerator.unwrap_model(loss).set_margin(margin_at(config, progress.epoch, final_margin))
        bar.start(progress.epoch, per_epoch, done=progress.batch - progress.epoch * per_epoch)
        while progress.batch < (progress.epoch + 1) * per_epoch:
            waited = time.perf_counter()
            batch = batches.next(stop)
            if batch is None and every_rank_stopped_waiting(accelerator, progress):
                if saved_step != progress.step:  # the state as of the last batch consumed
                    save_checkpoint(accelerator, run_dir, progress, config.train.keep_checkpoints, own_state)
                return finish(True)
            if batch is None:  # another rank is inside this step already: wait on, all stop at its end
                batch = batches.next(timeout=STOP_GRACE_S)
            if batch is None:  # that rank cannot leave the step's collectives to checkpoint, nor can this one join
                raise SpeakeridError(
                    f"rank {rank}: stopped while waiting for data that has not come {STOP_GRACE_S:.0f} s later, while "
                    f"another rank is already inside step {progress.step + 1}: no checkpoint of this moment; the run "
                    f"resumes from {latest_checkpoint(run_dir) or 'the start'} (the reader's warnings name the shard)")
            meter.update(batch)
            started = time.perf_counter()
            # the step's augmentation is a function of (seed, rank, batch index): exact on resume, nothing saved
            generator = augmenter.at_step(progress.batch) if augmenter is not None else None
            with accelerator.accumulate(model, loss):
                value, accuracy, augmented = training_step(model, loss, batch, accelerator, config, augmenter, generator)
                optimizer.step()
                if config.schedule.interval == "step" and accelerator.sync_gradients and config.schedule.name != "plateau":
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            progress.batch += 1
            progress.step += accelerator.sync_gradients
            last_loss = value
            if not math.isfinite(value):
                raise SpeakeridError(
                    f"loss is {value} at step {progress.step} (epoch {progress.epoch}); batch keys: "
                    f"{batch['keys'][:3]}…; last good checkpoint: {latest_checkpoint(run_dir) or 'none'}. "
                    "Lower optim.lr, check the data, or try train.mixed_precision=no"
                )
            ended = time.perf_counter()
            record = {"loss": value, "accuracy": accuracy, "lr": optimizer.param_groups[0]["lr"],
                      **({"margin": accelerator.unwrap_model(loss).margin} if config.loss.margin_warmup_end else {}),
                      **({"augmented": augmented} if augmenter is not None else {}),
                      "utterances_per_s": batch["labels"].numel() * config.data.utts_per_speaker * world / (ended - waited),
                      "data_wait": (started - waited) / (ended - waited)}
            bar.update(record)
            if progress.step % config.train.log_every == 0:
                metrics.write(step=progress.step, epoch=progress.epoch, **record)
            if world > 1:  # every rank stops at the same step, whichever rank saw the signal
                if stop:
                    accelerator.set_trigger()
                if accelerator.check_trigger():
                    stop.event.set()
            if stop or (stop_after_steps and progress.step >= stop_after_steps) or (
                    config.train.save_every_steps and progress.step % config.train.save_every_steps == 0):
                save_checkpoint(accelerator, run_dir, progress, config.train.keep_checkpoints, own_state)
                saved_step = progress.step
                if stop or (stop_after_steps and progress.step >= stop_after_steps):
                    return finish(bool(stop))
            if config.train.max_steps and progress.step >= config.train.max_steps:
                break
        epoch_done = progress.batch >= (progress.epoch + 1) * per_epoch
        if epoch_done:
            progress.epoch += 1
            data_report = meter.report()
            metrics.write(step=progress.step, epoch=progress.epoch, **{f"data_{k}": v for k, v in data_report.items()})
            if data_report.get("corrupt_members") or data_report.get("damaged_shards"):
                accelerator.print(f"epoch {progress.epoch}: skipped {data_report['corrupt_members']} damaged member(s) "
                                  f"and the rest of {data_report['damaged_shards']} damaged shard(s) (see the warnings)")
            meter.next_epoch()
            result = end_of_epoch(config, accelerator, model, loss, progress, run_dir, validate, export)
            if result:
                validations.append(result)
                metrics.write(step=progress.step, epoch=progress.epoch, **result)
            if config.schedule.name == "plateau":
                if result:
                    scheduler.step(result["eer"])
            elif config.schedule.interval == "epoch":
                scheduler.step()
        save_checkpoint(accelerator, run_dir, progress, config.train.keep_checkpoints, own_state)
        saved_step = progress.step
        if not epoch_done or (config.train.max_steps and progress.step >= config.train.max_steps):
            break  # max_steps reached (inside an epoch or at its end)
    return finish(False)


def training_step(model, loss, batch: dict, accelerator: Accelerator, config: Config, augmenter=None,
                  generator: torch.Generator | None = None) -> tuple[float, float, int]:
    """int16 (N, M, L) → float on the device → (augmented) → embeddings (N·M, D) → loss on (N, M, D) → backward.

    Returns (loss, accuracy %, utterances augmented). Reading the loss waits for the device once a step; the loop
    needs it anyway, for the NaN check and the per-step rate."""
    audio = batch["audio"].to(accelerator.device, non_blocking=True)
    labels = batch["labels"].to(accelerator.device, non_blocking=True)
    n, m, length = audio.shape
    waveforms = int16_to_float(audio.reshape(n * m, length))
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
