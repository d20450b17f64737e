"""Building a run from its config: ``build_run`` makes everything train() needs before its first step (``Run``) from
the builders below it: model + loss, optimizer, LR schedule, on-device augmenter, mixed precision, the margin
warm-up, and the checks said before the first step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

from speakerid.config import Config, save_config
from speakerid.data.batches import batches_per_epoch, train_loader, usable_utterances
from speakerid.data.meter import EpochMeter
from speakerid.data.shardset import ShardSet
from speakerid.errors import SpeakeridError
from speakerid.losses import build_loss, loss_class, loss_options
from speakerid.models import build_model, canonical_options, model_options
from speakerid.speed import SpeedPerturb
from speakerid.training.checkpoints import claim_run_dir, latest_checkpoint
from speakerid.training.init_from import check_init_skip, describe, init_weights, run_label_space, save_record
from speakerid.training.state import Progress, TrainingState
from speakerid.training.trackers import logging_dir, start_trackers, tracker_names


@dataclass
class Run:
    """What train() builds before its first step; model, loss and optimizer are not prepared yet."""

    config: Config
    accelerator: Accelerator
    run_dir: Path
    model: torch.nn.Module
    loss: torch.nn.Module
    optimizer: torch.optim.Optimizer
    augmenter: object | None  # speakerid.augment.Augmenter, when augment.enabled
    spec_augment: object | None  # speakerid.specaugment.SpecAugment in the model's hook, when augment.spec_augment
    loader: object  # the rank's DataLoader of whole batches, starting at state.progress.batch
    per_epoch: int  # batches per epoch, the same on every rank
    state: TrainingState
    checkpoint: Path | None  # the latest complete checkpoint, to resume from
    speed: object | None = None  # speakerid.speed.SpeedPerturb, when augment.speed_perturb lists speeds


def build_run(config: Config, force: bool) -> Run:
    """Everything a typo can break is built before the run directory is claimed: a failed start writes nothing."""
    trackers = tracker_names(config)  # before the Accelerator: a missing package fails before a process group waits
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(config.train.mixed_precision),
                              gradient_accumulation_steps=config.optim.grad_accum, log_with=trackers or None,
                              project_config=ProjectConfiguration(project_dir=config.train.run_dir,
                                                                  logging_dir=logging_dir(config.train.run_dir)))
    if config.train.tensorboard:
        accelerator.print("train.tensorboard is deprecated: use train.log_with=[tensorboard]")
    set_seed(config.train.seed)
    shards = ShardSet.open(config.data.train_shards, urls=config.data.train_urls, io_timeout=config.data.io_timeout)
    check_config(config, shards)
    if config.schedule.name == "plateau" and not config.validation.trials:
        accelerator.print("warning: schedule.name=plateau lowers the learning rate when the validation EER stops "
                          "improving, but validation.trials is unset: the rate stays at optim.lr for the whole run "
                          "(set validation.trials and validation.audio, or choose another schedule.name)")
    speakers = shards.index["speakers"]
    # init_from starts a new run; a run directory with a checkpoint resumes from it instead (its own weights)
    checkpoint = latest_checkpoint(Path(config.train.run_dir))
    labels = run_label_space(config, len(speakers), checkpoint)  # each speed its own speakers
    model, loss = build_model_and_loss(config, n_classes=labels["n_classes"])
    init = None
    if config.train.init_from and checkpoint is None:
        init = init_weights(config, model, loss, n_classes=labels["n_classes"], speakers=speakers, space=labels)
        accelerator.print(describe(init))
    elif config.train.init_from:
        check_init_skip(config)
        accelerator.print(f"resuming {checkpoint}: train.init_from ({config.train.init_from}) applies to a new run only")
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, list(model.parameters()) + list(loss.parameters()))
    data = config.batch_config()
    rank, world = accelerator.process_index, accelerator.num_processes
    per_epoch = batches_per_epoch(shards.index, data, world, config.data.workers)
    scheduler = build_scheduler(config, optimizer, per_epoch // config.optim.grad_accum)
    augmenter = build_augmenter(config, accelerator)
    speed = (SpeedPerturb(config.augment.speed_perturb, len(speakers), data.crop_samples,
                          seed=config.train.seed, stream=rank) if config.augment.speed_perturb else None)
    spec_augment = build_spec_augment(config, accelerator, model)
    run_dir = claim_run_dir(config, force)
    progress = Progress.load(checkpoint / "progress.json") if checkpoint is not None else Progress()
    # The loader is not prepared: each rank reads its own streams; the start position comes from progress.
    loader = train_loader(shards, data, rank=rank, world_size=world, workers=config.data.workers,
                          start_batch=progress.batch, pin_memory=torch.cuda.is_available())
    if accelerator.is_main_process:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        if init is not None:
            save_record(init, run_dir)
    start_trackers(accelerator, config, trackers)
    # per-epoch coverage of this rank's share of the usable utterances, and damaged input skipped
    meter = EpochMeter(usable_utterances(shards.index, data, world * max(1, config.data.workers)) // world)
    return Run(config, accelerator, run_dir, model, loss, optimizer, augmenter, spec_augment, loader, per_epoch,
               TrainingState(progress, scheduler, meter, labels), checkpoint, speed)


def resolve_mixed_precision(choice: str) -> str:
    """auto: bf16 where the GPU supports it, fp16 (with loss scaling) on other GPUs, fp32 on the CPU."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def build_model_and_loss(config: Config, n_classes: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    model = build_model(config.model.name, **config.model.options)
    options = dict(config.loss.options)
    accepted = loss_options(config.loss.name)
    given = canonical_options(config.model.name, config.model.options)
    n_out = given.get("n_out", model_options(config.model.name)["n_out"].default)
    if "nOut" in accepted and "nOut" not in options and n_out is not None:
        options["nOut"] = n_out
    if "nClasses" in accepted and "nClasses" not in options:
        options["nClasses"] = n_classes
    elif "nClasses" in accepted and options["nClasses"] < n_classes:
        raise SpeakeridError(f"loss.options.nClasses is {options['nClasses']} but the labels need {n_classes} classes "
                             "(speakers × augment.speed_perturb speeds); leave nClasses out: it is filled from the data")
    return model, build_loss(config.loss.name, **options)


def margin_at(config: Config, epoch: int, final: float) -> float:
    """Margin warm-up (as modern AAM recipes): 0 before margin_warmup_start, linear up to the end epoch."""
    start, end = config.loss.margin_warmup_start, config.loss.margin_warmup_end
    if end <= 0 or epoch >= end:
        return final
    if epoch < start:
        return 0.0
    return final * (epoch - start) / max(1, end - start)


def build_optimizer(config: Config, parameters) -> torch.optim.Optimizer:
    o = config.optim
    if o.name == "sgd":
        return torch.optim.SGD(parameters, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(parameters, lr=o.lr, weight_decay=o.weight_decay)


def build_scheduler(config: Config, optimizer, steps_per_epoch: int):
    s = config.schedule
    per_step = s.interval == "step"
    total = config.train.max_epoch * (steps_per_epoch if per_step else 1)
    if s.name == "steplr":  # the seeds: StepLR(step_size=test_interval, gamma=lr_decay) stepped per epoch
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=s.step_size, gamma=s.gamma)
    if s.name == "cosine":
        def factor(i: int) -> float:
            if i < s.warmup:
                return (i + 1) / s.warmup
            progress = (i - s.warmup) / max(1, total - s.warmup)
            floor = s.min_lr / config.optim.lr
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if s.name == "exponential":  # WeSpeaker's ExponentialDecrease: lr → min_lr geometrically, warm-up from 0
        if not 0 < s.min_lr <= config.optim.lr:
            raise SpeakeridError(f"schedule.name=exponential decays optim.lr ({config.optim.lr}) to schedule.min_lr "
                                 f"({s.min_lr}): give a min_lr above 0 and at most optim.lr")

        def exponential(i: int) -> float:
            warm = min(1.0, i / s.warmup) if s.warmup else 1.0
            return warm * (s.min_lr / config.optim.lr) ** (min(i, total) / max(1, total))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, exponential)
    if s.name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.optim.lr, total_steps=max(2, total),
                                                   pct_start=max(s.warmup, 1) / max(2, total))
    if s.name == "plateau":  # masked-proxy recipe: stepped with the validation EER
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=s.plateau_factor,
                                                          patience=s.plateau_patience)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)


def check_config(config: Config, shards: ShardSet) -> None:
    """What can be wrong before the first step, said before the first step."""
    m, n = config.data.utts_per_speaker, config.data.n_speakers
    cls = loss_class(config.loss.name)
    cls.check_utts_per_speaker(m)
    if config.loss.margin_warmup_end and not hasattr(cls, "set_margin"):
        raise SpeakeridError(f"loss.margin_warmup_end is set but {config.loss.name} has no margin to warm up")
    if config.data.workers < 0:
        raise SpeakeridError(f"data.workers is {config.data.workers}: give 0 (batches read in the training process) "
                             "or more (DataLoader worker processes per rank)")
    speakers = len(shards.index["speakers"])
    if n > speakers:
        raise SpeakeridError(f"data.n_speakers (batch_size) is {n} but the training shards hold {speakers} speakers; "
                             "a batch needs N distinct speakers: lower it")


def build_augmenter(config: Config, accelerator: Accelerator):
    if not config.augment.enabled:
        return None
    from speakerid.augment import AUG_TYPES, AugmentConfig, Augmenter
    from speakerid.data.noise import NoiseBank

    if not 0.0 <= config.augment.aug_prob <= 1.0:
        raise SpeakeridError(f"augment.aug_prob must be between 0 and 1 (the share of utterances augmented), "
                             f"got {config.augment.aug_prob}")
    if not config.augment.musan_shards and not config.augment.rir_shards:
        raise SpeakeridError("augment.enabled needs augment.musan_shards and/or augment.rir_shards "
                             "(shardify pack --kind noise); or set augment.enabled=false")
    crop = config.data.max_frames * 160 + 240
    stream, n_streams = accelerator.process_index, accelerator.num_processes
    musan = (NoiseBank(ShardSet.open(config.augment.musan_shards, io_timeout=config.data.io_timeout), clip_samples=crop,
                       seed=config.train.seed, stream=stream, n_streams=n_streams)
             if config.augment.musan_shards else None)
    rirs = (NoiseBank(ShardSet.open(config.augment.rir_shards, io_timeout=config.data.io_timeout), clip_samples=None,
                      seed=config.train.seed, stream=stream, n_streams=n_streams)
            if config.augment.rir_shards else None)
    # without a bank for a type, that type is never drawn (its probability goes to "none")
    no_musan = {"p_music": 0.0, "p_speech": 0.0, "p_noise": 0.0} if musan is None else {}
    no_rir = {"p_reverb": 0.0} if rirs is None else {}
    # augment.aug_prob shares out among the augmentation types in the seed's proportions
    seed = AugmentConfig()
    shares = {f"p_{kind}": getattr(seed, f"p_{kind}") / (1.0 - seed.p_none) * config.augment.aug_prob
              for kind in AUG_TYPES if kind != "none"}
    shares.update(no_musan, **no_rir)
    p_none = 1.0 - sum(shares.values())
    return Augmenter(AugmentConfig(**shares, p_none=p_none), musan, rirs, seed=config.train.seed, stream=stream)


def build_spec_augment(config: Config, accelerator: Accelerator, model: torch.nn.Module):
    """SpecAugment in the model's hook (after its front-end), drawing per (seed, rank, step); None when off."""
    if not config.augment.spec_augment:
        return None
    from speakerid.specaugment import SpecAugment, SpecAugmentConfig, attach

    a = config.augment
    spec = SpecAugment(SpecAugmentConfig(prob=a.spec_prob, time_masks=a.spec_time_masks, time_width=a.spec_time_width,
                                         freq_masks=a.spec_freq_masks, freq_width=a.spec_freq_width),
                       seed=config.train.seed, stream=accelerator.process_index)
    attach(model, spec, config.model.name)
    return spec
