"""The options of the training batches, declared once: field, default, help, seed name and validation.

The run config's ``data`` section is built from these fields (speakerid/config.py), ``shardify read`` makes its
flags from them, and the reader (speakerid/data/batches.py) takes a :class:`BatchConfig`. Light to import:
no torch, no numpy.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from speakerid.errors import SpeakeridError
from speakerid.options import option


@dataclass(frozen=True)
class BatchConfig:
    n_speakers: int = option(200, "N distinct speakers per batch and rank", seed="batch_size")
    utts_per_speaker: int = option(2, "M utterances per speaker", seed="nPerSpeaker")
    max_frames: int = option(200, "training crop of max_frames·160 + 240 samples", seed="max_frames")
    max_seg_per_spk: int = option(500, "a speaker's utterances used per pass, at most", seed="max_seg_per_spk")
    open_shards: int = option(4, "shards each reader stream reads at once")
    pool_factor: float = option(2.0, "draw a batch once the pool holds pool_factor × N speaker tuples")
    seed: int = option(0, "everything random: shard order, interleaving, crop positions, batch draws")
    shard_retries: int = option(3, "a shard whose reading fails this many passes in a row stops training")
    extra_samples: int = option(0, "samples read beyond the crop (speed perturbation cuts the crop after resampling)")

    def __post_init__(self) -> None:
        for name in ("n_speakers", "utts_per_speaker", "max_frames", "max_seg_per_spk", "open_shards",
                     "shard_retries"):
            if getattr(self, name) < 1:
                raise SpeakeridError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.extra_samples < 0:
            raise SpeakeridError(f"extra_samples must be at least 0, got {self.extra_samples}")
        if self.pool_factor < 1:
            raise SpeakeridError(f"pool_factor must be at least 1, got {self.pool_factor}")
        if self.max_seg_per_spk < self.utts_per_speaker:
            raise SpeakeridError(f"max_seg_per_spk {self.max_seg_per_spk} < utts_per_speaker {self.utts_per_speaker}")

    @property
    def crop_samples(self) -> int:
        return self.max_frames * 160 + 240

    @property
    def read_samples(self) -> int:
        """Samples the reader crops per utterance: the crop, plus what speed perturbation needs to cut it after."""
        return self.crop_samples + self.extra_samples

    @classmethod
    def from_dict(cls, options: dict) -> "BatchConfig":
        """Build from a dict using either speakerid's or voxceleb_trainer's names."""
        valid = {f.name for f in dataclasses.fields(cls)}
        resolved = {}
        for key, value in options.items():
            name = ALIASES.get(key, key)
            if name not in valid:
                raise SpeakeridError(f"unknown batch option {key!r}; valid: {', '.join(sorted(valid | set(ALIASES)))}")
            resolved[name] = value
        return cls(**resolved)


# voxceleb_trainer's option names → BatchConfig's, from the declaration above.
ALIASES = {f.metadata["seed"]: f.name for f in dataclasses.fields(BatchConfig) if "seed" in f.metadata}


def batch_fields(exclude: tuple[str, ...] = ()) -> list[tuple[str, type, dataclasses.Field]]:
    """BatchConfig's fields as ``dataclasses.make_dataclass`` entries (name, type, field with the same default and
    metadata): how the run config's data section holds the batch options without declaring them again."""
    types = typing.get_type_hints(BatchConfig)
    return [(f.name, types[f.name], dataclasses.field(default=f.default, metadata=f.metadata))
            for f in dataclasses.fields(BatchConfig) if f.name not in exclude]
