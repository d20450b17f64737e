"""The training loop: Accelerate owns devices, DDP and precision; this file owns epochs, schedules, logs,
checkpoints and resume.

    build (model, loss, data, optimizer, schedule) → accelerator.prepare → for each batch: int16 → float on
    the device → model on (N·M, L) → loss on (N, M, D) → backward/step → log → checkpoint

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl`` and ``checkpoints/step-NNNNNNNN``
(``accelerator.save_state``, ``training_state_<rank>.json`` and ``progress.json``; nothing speakerid owns is
pickled). Running the same command again resumes from the latest checkpoint: model, loss parameters,
optimizer, scheduler, scaler, RNG states and the position in the data stream (the reader skips ahead without
decoding). SIGTERM/SIGUSR1/SIGINT (Slurm pre-emption, Kubernetes, Ctrl-C; DataLoader workers ignore them) save
a checkpoint at the next step, or at once while waiting for data, and exit 0, so a requeued job resumes.
"""

from __future__ import annotations

import functools
import json
import math
import pickle
import queue
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from speakerid.config import Config, diff_configs, save_config
from speakerid.data.batches import BatchConfig, EpochMeter, batches_per_epoch, train_loader, usable_utterances
from speakerid.data.shardset import ShardSet
from speakerid.errors import SpeakeridError
from speakerid.features import int16_to_float
from speakerid.losses import build_loss, loss_class, loss_options
from speakerid.models import build_model, canonical_options, model_options


# ------------------------------------------------------------------------------------------------ building


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


# ------------------------------------------------------------------------------------------------ run dir


def claim_run_dir(config: Config, force: bool) -> Path:
    run_dir = Path(config.train.run_dir)
    resolved = run_dir / "config.yaml"
    if resolved.exists():
        import yaml

        previous = yaml.safe_load(resolved.read_text())
        diffs = [d for d in diff_configs(previous, config.to_dict()) if not d.startswith(("train.max_epoch", "train.max_steps"))]
        if diffs and not force:
            raise SpeakeridError(
                f"{run_dir} holds a run of another configuration ({'; '.join(diffs[:5])}"
                f"{' …' if len(diffs) > 5 else ''}); use a new train.run_dir, or --force to resume it with the new settings"
            )
    return run_dir


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "progress.json").exists())
    return done[-1] if done else None


@dataclass
class Progress:
    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken
    batch: int = 0  # rank batches consumed (the reader's stream position)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__))

    @classmethod
    def load(cls, path: Path) -> "Progress":
        return cls(**json.loads(path.read_text()))


# ------------------------------------------------------------------------------------------------ signals


class StopFlag:
    """SIGTERM/SIGUSR1/SIGINT (Slurm pre-emption and `scancel`, Kubernetes, Ctrl-C) ask for a checkpoint and exit 0:
    at the next step, or at once while the loop waits for data."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.event = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                signal.signal(sig, lambda signum, frame: self.event.set())

    def __bool__(self) -> bool:
        return self.event.is_set()


def restoring_signal_handlers(function):
    """A caller of train() (a notebook, a test, the demo) gets its own SIGTERM/SIGUSR1/SIGINT handlers back when
    it returns or raises: StopFlag's would otherwise swallow a later Ctrl-C."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return function(*args, **kwargs)
        previous = {sig: signal.getsignal(sig) for sig in StopFlag.SIGNALS}
        try:
            return function(*args, **kwargs)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    return wrapper


class BatchFetcher:
    """``next(batches)`` in a daemon thread while the main thread waits with a timeout: a stop request ends a wait
    for data that never comes (a stalled shard server), and nothing joins the stuck thread at exit."""

    def __init__(self, batches) -> None:
        self.requests, self.results = queue.SimpleQueue(), queue.SimpleQueue()
        self.pending = False
        threading.Thread(target=self._serve, args=(batches,), daemon=True, name="speakerid-batches").start()

    def _serve(self, batches) -> None:
        while self.requests.get():
            try:
                self.results.put((next(batches), None))
            except BaseException as error:  # raised again in the main thread
                self.results.put((None, error))

    def next(self, stop: StopFlag | None = None, timeout: float | None = None) -> dict | None:
        """The next batch; None once ``stop`` is set while waiting, or after ``timeout`` seconds (the request stays
        pending for the next call)."""
        if not self.pending:
            self.requests.put(True)
            self.pending = True
        deadline = time.monotonic() + timeout if timeout is not None else math.inf
        while True:
            try:
                batch, error = self.results.get(timeout=0.2)
                break
            except queue.Empty:
                if stop or time.monotonic() > deadline:
                    return None
        self.pending = False
        if error is not None:
            raise error
        return batch


STOP_GRACE_S = 30.0  # after a stop, how long a rank still waits for the batch that another rank's step needs


def every_rank_stopped_waiting(accelerator: Accelerator, progress: Progress, timeout: float = 10.0) -> bool:
    """Did the stop reach every rank while it waited for data? Asked through the launcher's store, not a collective:
    a rank already in this step's gradient all-reduce would meet a checkpoint's collectives and hang or mix them up.
    The first rank to decide decides for all, so a late rank never checkpoints alone."""
    if accelerator.num_processes == 1:
        return True
    from torch.distributed.distributed_c10d import _get_default_store  # no public accessor for the rendezvous store

    store, key = _get_default_store(), f"speakerid/stopped-waiting/{progress.batch}"
    store.add(f"{key}/count", 1)
    deadline = time.monotonic() + timeout
    while not (everyone := store.add(f"{key}/count", 0) >= accelerator.num_processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    return store.compare_set(f"{key}/decision", "", "stop" if everyone else "wait") == b"stop"


# ------------------------------------------------------------------------------------------------ the loop


@dataclass
class TrainResult:
    run_dir: Path
    progress: Progress
    stopped_by_signal: bool
    last_loss: float
    validations: list[dict]


@dataclass
class TrainingState:
    """speakerid's own resumable state, one JSON file per rank beside accelerate's files.

    Not ``register_for_checkpointing``: accelerate reads those back with a full pickle load, which runs whatever
    code a planted file holds.
    """

    scheduler: object
    meter: EpochMeter  # the epoch's data report so far, so the report after a resume covers the whole epoch

    @staticmethod
    def path(checkpoint: Path, rank: int) -> Path:
        return checkpoint / f"training_state_{rank}.json"

    @staticmethod
    def meter_path(checkpoint: Path, rank: int) -> Path:
        return checkpoint / f"data_meter_{rank}.safetensors"

    def save(self, checkpoint: Path, rank: int) -> None:
        self.path(checkpoint, rank).write_text(json.dumps({"scheduler": self.scheduler.state_dict()}))
        self.meter.save(self.meter_path(checkpoint, rank))

    def load(self, checkpoint: Path, rank: int) -> str | None:
        """Load; returns a note when the checkpoint (an earlier speakerid's) lacks part of this state."""
        path = self.path(checkpoint, rank)
        if path.exists():
            state = json.loads(path.read_text())
        else:  # an earlier speakerid registered the scheduler with accelerate: read its file without running code
            state = {"scheduler": torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=True)}
        self.scheduler.load_state_dict(state["scheduler"])
        if not self.meter_path(checkpoint, rank).exists():
            return f"{checkpoint} holds no data report: this epoch's report covers only the part after the resume"
        self.meter.load(self.meter_path(checkpoint, rank))
        return None


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, own_state: TrainingState) -> None:
    """accelerate's files (safetensors; torch.load with weights_only) and speakerid's JSON; one clear error each."""
    try:
        load_accelerate_state(accelerator, checkpoint)
        note = own_state.load(checkpoint, accelerator.process_index)
        if note:
            accelerator.print(note)
    except pickle.UnpicklingError as error:
        raise SpeakeridError(f"{checkpoint}: a file holds more than tensors and plain values, so loading it could run "
                             f"code; refused ({str(error).splitlines()[0]}). Resume only from checkpoints you wrote, "
                             "or use a new train.run_dir") from None
    except (RuntimeError, ValueError) as error:
        shapes = re.findall(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) from "
                            r"checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)", str(error))
        if not shapes and "state_dict" not in str(error) and "parameter group" not in str(error):
            raise
        what = ("; ".join(f"{name} saved {saved}, configured {now}" for name, saved, now in shapes[:4])
                if shapes else str(error).strip().splitlines()[0])
        raise SpeakeridError(f"{checkpoint}: the run's saved state does not fit the configured model and optimizer "
                             f"({what}{' …' if len(shapes) > 4 else ''}); --force keeps the run's weights, so a model of "
                             "another size cannot resume it: use a new train.run_dir") from None


def load_accelerate_state(accelerator: Accelerator, checkpoint: Path) -> None:
    from accelerate.utils import load

    rng_states = checkpoint / f"random_states_{accelerator.process_index}.pkl"
    if rng_states.exists():  # accelerate skips an unreadable one with an info log: the resume would not be exact
        load(rng_states)
    try:
        accelerator.load_state(str(checkpoint))
    except RuntimeError as error:
        # custom_checkpoint_*.pkl (an earlier speakerid's, or planted): accelerate has loaded all the rest and stops
        # here, before unpickling them; TrainingState reads what speakerid needs without running code
        if "Number of custom checkpoints" not in str(error):
            raise


def build_augmenter(config: Config, accelerator: Accelerator):
    if not config.augment.enabled:
        return None
    from speakerid.augment import AugmentConfig, Augmenter
    from speakerid.data.noise import NoiseBank

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
    base = AugmentConfig()
    p_none = base.p_none + sum(getattr(base, k) for k in {**no_musan, **no_rir})
    return Augmenter(AugmentConfig(**no_musan, **no_rir, p_none=p_none), musan, rirs, seed=config.train.seed, stream=stream)


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


def end_of_epoch(config: Config, accelerator: Accelerator, model, loss, progress: Progress, run_dir: Path,
                 validate, export) -> dict | None:
    """Export the inference checkpoint; validate every test_interval epochs (when a trial list is set)."""
    unwrapped = accelerator.unwrap_model(model)
    if export is None:
        export = default_export(config)
    if accelerator.is_main_process and export is not False:
        export(unwrapped, run_dir)
    accelerator.wait_for_everyone()
    if not config.validation.trials or progress.epoch % config.train.test_interval:
        return None
    if validate is None:
        validate = default_validate(config)
    model.eval()
    result = validate(unwrapped, accelerator.unwrap_model(loss), accelerator)
    model.train()
    accelerator.print(f"epoch {progress.epoch}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result


def default_export(config: Config):
    """Writes run_dir/export/ (safetensors + JSON) through speakerid.inference, when it is available."""
    try:
        from speakerid.inference import save_inference_checkpoint
    except ImportError:
        return False

    def export(model, run_dir: Path) -> None:
        save_inference_checkpoint(run_dir / "export", model, model_name=config.model.name,
                                  model_options=config.model.options, loss_name=config.loss.name,
                                  extra={"config": config.to_dict()})
    return export


def default_validate(config: Config):
    """EER and minDCF of the validation trials through speakerid.evaluation, on every process's share.

    The main process scores; its figures are broadcast so every rank steps a plateau schedule alike.
    """
    from accelerate.utils import broadcast_object_list

    from speakerid.evaluation import ExtractConfig, evaluate
    from speakerid.inference import LoadedModel

    def validate(model, loss, accelerator: Accelerator) -> dict:
        loaded = LoadedModel(model=model, meta={"model": {"name": config.model.name}}, test_normalize=loss.test_normalize)
        out_dir = Path(config.train.run_dir) / "validation"
        extract = ExtractConfig(eval_frames=config.validation.eval_frames, num_eval=config.validation.num_eval,
                                workers=0, channels_last=False)  # channels_last would convert the training weights
        report = evaluate(loaded, [config.validation.trials], config.validation.audio, out_dir, extract,
                          cache=None, accelerator=accelerator)
        figures = [None]
        if report is not None:
            metrics = report.lists[0].metrics
            figures = [{"eer": metrics.eer, "min_dcf_05": metrics.min_dcf_05, "min_dcf_01": metrics.min_dcf_01}]
        if accelerator.num_processes > 1:
            broadcast_object_list(figures, from_process=0)
        return figures[0]

    return validate


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


def save_checkpoint(accelerator: Accelerator, run_dir: Path, progress: Progress, keep: int,
                    own_state: "TrainingState") -> Path:
    path = run_dir / "checkpoints" / f"step-{progress.step:08d}"
    accelerator.save_state(str(path))
    path.mkdir(parents=True, exist_ok=True)
    own_state.save(path, accelerator.process_index)
    accelerator.wait_for_everyone()  # every rank's state is written before progress.json marks the checkpoint complete
    if accelerator.is_main_process:
        progress.save(path / "progress.json")  # written last: a checkpoint without it is incomplete
        done = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "progress.json").exists())
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


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
