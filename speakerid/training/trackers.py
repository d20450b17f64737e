"""Experiment trackers (``train.log_with``): Accelerate's tracker registry, checked at start-up.

Every name is checked against the Accelerate version installed (``accelerate.tracking.LOGGER_TYPE_TO_CLASS``) and
its own availability check (``accelerate.utils.is_<name>_available``) before the Accelerator exists, so a typo or a
missing package fails before any data is read or a process group waits — Accelerate itself would drop a missing
tracker with a debug message and log nothing. Logs go under ``<run_dir>/logs`` (docs/logging.md).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import accelerate.utils
from accelerate.tracking import LOGGER_TYPE_TO_CLASS

from speakerid.config import Config
from speakerid.errors import SpeakeridError

# Trackers with an extra of their own in setup.cfg (pip install 'speakerid-toolkit[NAME]'); tests check the two agree.
EXTRAS = ("tensorboard", "wandb")
# The others' pip names, where they differ from the tracker name.
PIP_NAMES = {"comet_ml": "comet-ml"}


def tracker_names(config: Config) -> list[str]:
    """``train.log_with`` with the deprecated ``train.tensorboard`` folded in, each name known and installed."""
    names = list(dict.fromkeys(config.train.log_with))  # order kept, repeats dropped (as Accelerate does)
    if config.train.tensorboard:
        if names and "tensorboard" not in names:
            raise SpeakeridError(
                f"train.tensorboard=true (deprecated: it means train.log_with=[tensorboard]) disagrees with "
                f"train.log_with={names}: add tensorboard to train.log_with and drop train.tensorboard")
        names = names or ["tensorboard"]
    valid = sorted(LOGGER_TYPE_TO_CLASS)
    for name in names:
        if not isinstance(name, str) or name not in LOGGER_TYPE_TO_CLASS:
            raise SpeakeridError(f"train.log_with: unknown tracker {name!r}; the trackers Accelerate "
                                 f"{accelerate.__version__} knows: {', '.join(valid)}")
        available = getattr(accelerate.utils, f"is_{name}_available", None)
        if available is not None and not available():
            raise SpeakeridError(f"train.log_with: {name} is not installed; {install_hint(name)}, "
                                 f"or drop {name} from train.log_with")
    return names


def install_hint(name: str) -> str:
    if name in EXTRAS:
        return f"pip install 'speakerid-toolkit[{name}]'"
    return f"pip install {PIP_NAMES.get(name, name)}"


def logging_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "logs"


def init_kwargs(names: list[str], run_dir: str | Path) -> dict[str, dict]:
    """Per-tracker keyword arguments that keep local files under the run directory and name the run after it
    (TensorBoard and Aim get the logging directory from Accelerate itself)."""
    logs, run = logging_dir(run_dir), Path(run_dir).resolve().name
    known = {"wandb": {"dir": str(logs), "name": run}, "dvclive": {"dir": str(logs / "dvclive")},
             "mlflow": {"run_name": run}}
    return {name: known[name] for name in names if name in known}


def flat_config(config: Config) -> dict[str, str | int | float | bool]:
    """The resolved config as ``{"section.key": value}``; lists, mappings and None as text (what every tracker's
    hyper-parameter store takes: TensorBoard's hparams accept only numbers, strings and booleans)."""
    flat: dict[str, str | int | float | bool] = {}

    def add(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                add(f"{prefix}.{key}", inner)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)

    for section, values in dataclasses.asdict(config).items():
        add(section, values)
    return flat


def start_trackers(accelerator: accelerate.Accelerator, config: Config, names: list[str]) -> None:
    """Start the trackers on the main process with the resolved config as their hyper-parameters."""
    if names:
        accelerator.init_trackers(config.train.project, config=flat_config(config),
                                  init_kwargs=init_kwargs(names, config.train.run_dir))
