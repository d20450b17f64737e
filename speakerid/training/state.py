"""What a checkpoint holds of speakerid's own: the position (epoch, step, batch) in ``progress.json`` and, per rank,
the LR schedule and the label space (JSON) and the epoch's data report (safetensors). Nothing here is pickled."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from speakerid.data.meter import EpochMeter
from speakerid.errors import SpeakeridError


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


@dataclass
class TrainingState:
    """Everything speakerid itself checkpoints beside accelerate's files: the position (``progress.json``, written last
    by the main process, so a checkpoint without it is incomplete; read first, as the reader starts from it) and, one
    file per rank, the LR schedule (``training_state_<rank>.json``) and the epoch's data report so far.

    Not ``register_for_checkpointing``: accelerate reads those back with a full pickle load, which runs whatever
    code a planted file holds.
    """

    progress: Progress
    scheduler: object
    meter: EpochMeter  # the epoch's data report so far, so the report after a resume covers the whole epoch
    label_space: dict = field(default_factory=dict)  # speakerid.speed.label_space: what the loss's labels mean

    @staticmethod
    def path(checkpoint: Path, rank: int) -> Path:
        return checkpoint / f"training_state_{rank}.json"

    @staticmethod
    def meter_path(checkpoint: Path, rank: int) -> Path:
        return checkpoint / f"data_meter_{rank}.safetensors"

    def save(self, checkpoint: Path, rank: int) -> None:
        """This rank's files; ``progress.json`` follows once every rank's are written (checkpoints.save_checkpoint)."""
        self.path(checkpoint, rank).write_text(json.dumps({"scheduler": self.scheduler.state_dict(),
                                                           "label_space": self.label_space}))
        self.meter.save(self.meter_path(checkpoint, rank))

    def load(self, checkpoint: Path, rank: int) -> str | None:
        """Load; returns a note when the checkpoint (an earlier speakerid's) lacks part of this state."""
        path = self.path(checkpoint, rank)
        if path.exists():
            state = json.loads(path.read_text())
        else:  # an earlier speakerid registered the scheduler with accelerate: read its file without running code
            state = {"scheduler": torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=True)}
        saved = state.get("label_space")  # absent in an earlier speakerid's checkpoint: speakers only, no speeds
        if saved and self.label_space and saved != self.label_space:
            raise SpeakeridError(f"{checkpoint}: the run was trained with the label space {saved} but is configured "
                                 f"for {self.label_space} (augment.speed_perturb or the training shards changed); "
                                 "use a new train.run_dir")
        self.scheduler.load_state_dict(state["scheduler"])
        if not self.meter_path(checkpoint, rank).exists():
            return f"{checkpoint} holds no data report: this epoch's report covers only the part after the resume"
        self.meter.load(self.meter_path(checkpoint, rank))
        return None
