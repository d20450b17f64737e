"""The end of an epoch: export the inference checkpoint, and validate (EER, minDCF) every test_interval epochs."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator

from speakerid.config import Config
from speakerid.training.state import Progress


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
