"""Checkpoint averaging: the mean of the model weights of several checkpoints of one run, written as an inference
checkpoint that ``python -m evaluate`` takes as it takes a run's ``export/`` (``python -m speakerid.average``).

Floating-point tensors — weights and BatchNorm running statistics alike, as WeSpeaker's ``average_model.py`` does —
are summed in float64, divided by the number of checkpoints and cast back to their own dtype. Integer tensors
(BatchNorm's ``num_batches_tracked``) count something rather than estimate it: they take the last checkpoint's value.
Only the model is averaged (accelerate's ``model.safetensors``); the loss (``model_1.safetensors``) is not part of an
inference checkpoint. Checkpoints are read one at a time, so memory holds one model and the float64 sums.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from speakerid.checkpoint import load_exact
from speakerid.config import load_config
from speakerid.data.lists import listed
from speakerid.errors import SpeakeridError
from speakerid.training.checkpoints import complete_checkpoints
from speakerid.training.state import TrainingState

MODEL_WEIGHTS = "model.safetensors"  # accelerate's save_state: the first prepared module, the model (the loss is _1)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP/torch.compile key prefixes, should a saved state carry them


@dataclass
class AveragedCheckpoint:
    path: Path  # the inference checkpoint written
    checkpoints: list[Path]  # the checkpoints averaged, oldest first
    steps: list[int]
    epochs: list[int]


def select_checkpoints(run_dir: str | Path, *, last: int | None = None, chosen: list[str | Path] = ()) -> list[Path]:
    """The run's newest ``last`` complete checkpoints, or the ``chosen`` ones (paths, or names under checkpoints/)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise SpeakeridError(f"{run_dir}: not a training run directory (no config.yaml); give a run's train.run_dir")
    done = complete_checkpoints(run_dir)
    if (last is None) == (not chosen):
        raise SpeakeridError("name the checkpoints to average: either the last K of the run or chosen ones, not both")
    if last is not None:
        if last < 1:
            raise SpeakeridError(f"--last {last}: average at least one checkpoint")
        if len(done) < last:
            held = ", ".join(p.name for p in done) or "none"
            raise SpeakeridError(
                f"{run_dir}: --last {last} asks for {last} checkpoints but the run holds {len(done)} complete "
                f"one(s) ({held}); average those (--last {len(done)}) or keep more while training: "
                f"train.keep_checkpoints={last} keeps the newest {last} (one is saved at every epoch end, and every "
                "train.save_every_steps steps when set)")
        return done[-last:]
    paths: list[Path] = []
    for given in chosen:
        path = Path(given)
        if not path.exists() and (run_dir / "checkpoints" / path).exists():
            path = run_dir / "checkpoints" / path
        if not (path / "progress.json").is_file() or not (path / MODEL_WEIGHTS).is_file():
            held = ", ".join(p.name for p in done) or "none"
            raise SpeakeridError(f"{given}: not a complete training checkpoint ({MODEL_WEIGHTS} and progress.json, "
                                 f"which is written last); {run_dir} holds: {held}")
        if any(path.resolve() == p.resolve() for p in paths):
            raise SpeakeridError(f"{given}: named twice; each checkpoint counts once in the mean")
        paths.append(path)
    return paths


def _read_weights(checkpoint: Path) -> dict[str, Tensor]:
    path = checkpoint / MODEL_WEIGHTS
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise SpeakeridError(f"{path}: not a readable safetensors file: {error}") from error
    bare = {}
    for key, tensor in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        bare[key] = tensor
    return bare


def _check_same_layout(first: Path, reference: dict[str, Tensor], checkpoint: Path, state: dict[str, Tensor]) -> None:
    missing = [f"{key}: missing" for key in reference if key not in state]
    extra = [f"{key}: not in {first.name}" for key in state if key not in reference]
    differ = [f"{key}: {tuple(state[key].shape)} {state[key].dtype} here, {tuple(value.shape)} {value.dtype} in "
              f"{first.name}" for key, value in reference.items()
              if key in state and (state[key].shape != value.shape or state[key].dtype != value.dtype)]
    problems = missing + extra + differ
    if problems:
        raise SpeakeridError(
            f"{checkpoint / MODEL_WEIGHTS}: its tensors do not match {first / MODEL_WEIGHTS}, so the two cannot be "
            f"averaged:\n{listed(problems)}\nAverage checkpoints of one architecture (one run, or runs of the same "
            "model options)")


def average_weights(checkpoints: list[Path]) -> dict[str, Tensor]:
    """The mean of the checkpoints' model tensors (float64 sums, cast back); integer tensors from the last one."""
    if not checkpoints:
        raise SpeakeridError("no checkpoints to average")
    first = checkpoints[0]
    reference = _read_weights(first)
    sums = {key: value.double() for key, value in reference.items() if value.is_floating_point()}
    last = reference
    for checkpoint in checkpoints[1:]:
        state = _read_weights(checkpoint)
        _check_same_layout(first, reference, checkpoint, state)
        for key in sums:
            sums[key] += state[key].double()
        last = state
    n = len(checkpoints)
    return {key: (sums[key] / n).to(value.dtype) if key in sums else last[key].clone()
            for key, value in reference.items()}


def average_checkpoints(run_dir: str | Path, out: str | Path, *, last: int | None = None,
                        chosen: list[str | Path] = ()) -> AveragedCheckpoint:
    """Average the run's last ``last`` (or the ``chosen``) checkpoints into the inference checkpoint ``out``.

    The architecture comes from the run's ``config.yaml``; ``speakerid.json``'s ``extra`` records the run's config
    and which checkpoints were averaged (paths, steps, epochs).
    """
    from speakerid.inference import EXPORT_DIR, save_inference_checkpoint
    from speakerid.models import build_model

    run_dir, out = Path(run_dir), Path(out)
    if out.resolve() in (run_dir.resolve(), (run_dir / EXPORT_DIR).resolve()):
        raise SpeakeridError(f"--out {out}: the run directory and its {EXPORT_DIR}/ (rewritten at every epoch end) are "
                             "the run's own; write the average elsewhere, e.g. RUN/averaged")
    checkpoints = select_checkpoints(run_dir, last=last, chosen=chosen)
    config = load_config(run_dir / "config.yaml")
    progress = [json.loads((c / "progress.json").read_text()) for c in checkpoints]
    model = build_model(config.model.name, **config.model.options)
    load_exact(model, average_weights(checkpoints), f"model {config.model.name} of {run_dir / 'config.yaml'}",
               checkpoints[0] / MODEL_WEIGHTS)
    steps, epochs = [int(p["step"]) for p in progress], [int(p["epoch"]) for p in progress]
    averaged = {"checkpoints": [str(c) for c in checkpoints], "steps": steps, "epochs": epochs,
                "integer_tensors": "the last checkpoint's"}
    state = TrainingState.path(checkpoints[-1], rank=0)  # what the loss's labels meant (speed perturbation)
    label_space = json.loads(state.read_text()).get("label_space", {}) if state.is_file() else {}
    save_inference_checkpoint(out, model.eval(), model_name=config.model.name, model_options=config.model.options,
                              loss_name=config.loss.name,
                              extra={"config": config.to_dict(), "label_space": label_space, "averaged": averaged})
    return AveragedCheckpoint(out, checkpoints, steps, epochs)
