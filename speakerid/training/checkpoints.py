"""The run directory and its checkpoints: claim it (refusing another configuration), find the latest complete
checkpoint, save one (``accelerator.save_state`` + speakerid's JSON, ``progress.json`` last) keeping the newest
``train.keep_checkpoints``, and load one without running code from a pickle. ``Checkpoints`` is what the loop holds."""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from speakerid.config import Config, diff_configs
from speakerid.errors import SpeakeridError
from speakerid.training.state import TrainingState


def claim_run_dir(config: Config, force: bool) -> Path:
    run_dir = Path(config.train.run_dir)
    resolved = run_dir / "config.yaml"
    if resolved.exists():
        import yaml

        previous = yaml.safe_load(resolved.read_text())
        # a longer run, or one logged otherwise, is the same run resumed
        same_run = ("train.max_epoch", "train.max_steps", "train.log_with", "train.project", "train.tensorboard",
                    "train.log_every")
        diffs = [d for d in diff_configs(previous, config.to_dict()) if not d.startswith(same_run)]
        if diffs and not force:
            raise SpeakeridError(
                f"{run_dir} holds a run of another configuration ({'; '.join(diffs[:5])}"
                f"{' …' if len(diffs) > 5 else ''}); use a new train.run_dir, or --force to resume it with the new settings"
            )
    return run_dir


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """``checkpoints/step-*`` that hold their ``progress.json``, oldest first."""
    return sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "progress.json").exists())


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


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


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainingState, keep: int) -> Path:
    """Save ``checkpoints/step-NNNNNNNN`` and keep the newest ``keep`` complete ones. The rotation is ours: accelerate's
    ``ProjectConfiguration(total_limit=…, automatic_checkpoint_naming=True)`` names folders ``checkpoint_<n-th save>``
    (the run directory's layout is ``step-NNNNNNNN``) and deletes before saving, counting incomplete checkpoints."""
    path = run_dir / "checkpoints" / f"step-{state.progress.step:08d}"
    accelerator.save_state(str(path))
    path.mkdir(parents=True, exist_ok=True)
    state.save(path, accelerator.process_index)
    accelerator.wait_for_everyone()  # every rank's state is written before progress.json marks the checkpoint complete
    if accelerator.is_main_process:
        state.progress.save(path / "progress.json")  # written last: a checkpoint without it is incomplete
        for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


class Checkpoints:
    """One run's ``checkpoints/step-NNNNNNNN``: resume from one, save one (keeping the newest ``keep``), and the step
    saved last, so a stop right after a save does not write the same checkpoint again."""

    def __init__(self, accelerator: Accelerator, run_dir: Path, keep: int, state: TrainingState) -> None:
        self.accelerator, self.run_dir, self.keep, self.state = accelerator, run_dir, keep, state
        self.saved_step: int | None = None

    def resume(self, checkpoint: Path) -> None:
        load_checkpoint(self.accelerator, checkpoint, self.state)
        progress = self.state.progress
        self.accelerator.print(f"resuming from {checkpoint} (epoch {progress.epoch}, step {progress.step})")
        self.saved_step = progress.step

    def save(self) -> Path:
        path = save_checkpoint(self.accelerator, self.run_dir, self.state, self.keep)
        self.saved_step = self.state.progress.step
        return path

    def save_unless_saved(self) -> None:
        """The state as of the last batch consumed, unless the latest checkpoint already holds it."""
        if self.saved_step != self.state.progress.step:
            self.save()
