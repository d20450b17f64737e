"""An epoch's start and end. Start: model and loss in training mode, the margin warm-up. End: the reader's data
report, the inference checkpoint export, validation (EER, minDCF) every test_interval epochs, and the LR schedule
stepped per epoch or on the validation EER (plateau)."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator

from speakerid.config import Config
from speakerid.training.build import Run, margin_at
from speakerid.training.logs import MetricsLog
from speakerid.training.state import Progress


def start_epoch(run: Run, model, loss, final_margin: float | None) -> None:
    model.train()
    loss.train()
    if run.config.loss.margin_warmup_end:
        run.accelerator.unwrap_model(loss).set_margin(margin_at(run.config, run.state.progress.epoch, final_margin))


def end_of_epoch(run: Run, model, loss, metrics: MetricsLog, validate, export) -> dict | None:
    """Count the epoch, log its data report, export, validate, step the schedule; returns the validation figures."""
    config, accelerator, state = run.config, run.accelerator, run.state
    progress = state.progress
    progress.epoch += 1
    data_report = state.meter.report()
    metrics.write(step=progress.step, epoch=progress.epoch, **{f"data_{k}": v for k, v in data_report.items()})
    if data_report.get("corrupt_members") or data_report.get("damaged_shards"):
        accelerator.print(f"epoch {progress.epoch}: skipped {data_report['corrupt_members']} damaged member(s) "
                          f"and the rest of {data_report['damaged_shards']} damaged shard(s) (see the warnings)")
    state.meter.next_epoch()
    result = export_and_validate(config, accelerator, model, loss, progress, run.run_dir, validate, export,
                                 label_space=state.label_space)
    if result:
        metrics.write(step=progress.step, epoch=progress.epoch, **result)
    if config.schedule.name == "plateau":
        if result:
            state.scheduler.step(result["eer"])
    elif config.schedule.interval == "epoch":
        state.scheduler.step()
    return result


def export_and_validate(config: Config, accelerator: Accelerator, model, loss, progress: Progress, run_dir: Path,
                        validate, export, label_space: dict | None = None) -> dict | None:
    """Export the inference checkpoint; validate every test_interval epochs (when a trial list is set)."""
    unwrapped = accelerator.unwrap_model(model)
    if export is None:
        export = default_export(config, label_space)
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


def default_export(config: Config, label_space: dict | None = None):
    """Writes run_dir/export/ (safetensors + JSON, with the label space in ``extra``) through speakerid.inference."""
    try:
        from speakerid.inference import save_inference_checkpoint
    except ImportError:
        return False

    def export(model, run_dir: Path) -> None:
        save_inference_checkpoint(run_dir / "export", model, model_name=config.model.name,
                                  model_options=config.model.options, loss_name=config.loss.name,
                                  extra={"config": config.to_dict(), "label_space": dict(label_space or {})})
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
