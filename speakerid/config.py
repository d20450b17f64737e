"""Typed run configuration: a YAML file plus dotted ``key=value`` overrides, resolved in one place.

    cfg = load_config("configs/demo.yaml", ["optim.lr=0.01", "batch_size=100"])

Sections are dataclasses; every field has a type, a default and a one-line help (docs/options.md, the option
reference, is generated from them). The data section's batch options are :class:`BatchConfig`'s, declared once in
speakerid/data/batch_config.py; ``Config.batch_config()`` hands them to the reader. Unknown keys are errors that list the valid ones, so a typo never does
nothing silently. voxceleb_trainer's option names are accepted as aliases (``trainfunc``,
``nPerSpeaker``, ``batch_size``, ``max_frames``, ``nOut``, ``lr_decay``, ``test_interval``, …), at the top
level of the YAML or on the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from speakerid.data.batch_config import ALIASES as BATCH_ALIASES
from speakerid.data.batch_config import BatchConfig, batch_fields
from speakerid.errors import SpeakeridError
from speakerid.options import option


@dataclass
class ModelSection:
    name: str = option("ResNetSE34L", "architecture: a key of speakerid.models.MODELS")
    options: dict = option({}, "keyword arguments of the model, e.g. {n_out: 512, encoder_type: SAP, n_mels: 40}")


@dataclass
class LossSection:
    name: str = option("angleproto", "loss: a key of speakerid.losses.LOSSES")
    options: dict = option({}, "keyword arguments of the loss (nOut and nClasses are filled from the model and the data)")
    margin_warmup_start: int = option(0, "am/aamsoftmax: margin 0 until this epoch, then rising linearly …")
    margin_warmup_end: int = option(0, "… to loss.options.margin at this epoch (0: no warm-up)")


# The batch options (n_speakers … shard_retries) are BatchConfig's, declared once in speakerid/data/batch_config.py;
# the seed is train.seed.
DataSection = dataclasses.make_dataclass("DataSection", [
    ("train_shards", str, option("", "training shard directory, its index.json, or an http(s) URL of either")),
    ("train_urls", str | None, option(None, "shard URLs instead of the index's neighbours (brace pattern, pipe:, http)")),
    *batch_fields(exclude=("seed", "extra_samples")),
    ("workers", int, option(4, "DataLoader workers per rank")),
    ("io_timeout", float, option(60.0, "seconds without a byte from an http(s) or pipe: shard before it is an error")),
], namespace={"__module__": __name__})


@dataclass
class AugmentSection:
    enabled: bool = option(False, "MUSAN/RIR augmentation on the training device")
    musan_shards: str = option("", "MUSAN noise/speech/music shards (shardify pack --kind noise)")
    rir_shards: str = option("", "RIR shards (shardify pack --kind noise --root RIRS_NOISES/simulated_rirs)")
    aug_prob: float = option(0.8, "share of utterances augmented (reverb, music, speech, noise in the seed's 1:1:1:1); "
                                  "0.8: the seed's 4 in 5; WeSpeaker's recipes: 0.6")
    speed_perturb: list = option([], "speeds, each a new speaker identity, drawn per speaker row ([]: off; "
                                     "modern recipes: [0.9, 1.0, 1.1])")
    # SpecAugment (speakerid/specaugment.py); defaults are WeSpeaker's spec_aug_conf, equal to SpecAugmentConfig's
    spec_augment: bool = option(False, "SpecAugment: time and frequency masks on the features after the front-end, in training")
    spec_prob: float = option(0.6, "SpecAugment: share of utterances masked")
    spec_time_masks: int = option(1, "SpecAugment: time masks per masked utterance")
    spec_time_width: int = option(10, "SpecAugment: widest time mask, frames (10 ms); widths drawn from 1 to it")
    spec_freq_masks: int = option(1, "SpecAugment: frequency masks per masked utterance")
    spec_freq_width: int = option(8, "SpecAugment: widest frequency mask, feature bins (mels, fbanks)")


@dataclass
class OptimSection:
    name: Literal["adam", "adamw", "sgd"] = option("adam", "optimizer")
    lr: float = option(0.001, "learning rate")
    weight_decay: float = option(0.0, "weight decay")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(False, "SGD Nesterov momentum")
    grad_clip: float = option(0.0, "clip the gradient norm to this (0: off)")
    grad_accum: int = option(1, "batches accumulated per optimizer step")


@dataclass
class ScheduleSection:
    name: Literal["steplr", "cosine", "exponential", "onecycle", "plateau", "constant"] = option("steplr", "LR schedule")
    interval: Literal["epoch", "step"] = option("epoch", "step the schedule every epoch (as the seeds) or every optimizer step")
    step_size: int = option(10, "steplr: epochs (or steps) between decays")
    gamma: float = option(0.95, "steplr: decay factor")
    warmup: int = option(0, "cosine/exponential/onecycle: warm-up length in schedule intervals")
    min_lr: float = option(0.0, "cosine/exponential: final learning rate (exponential: above 0)")
    plateau_factor: float = option(0.7, "plateau: factor on the validation EER plateau (masked-proxy recipe)")
    plateau_patience: int = option(3, "plateau: validations without improvement before a decay")


@dataclass
class ValidationSection:
    trials: str = option("", "trial list scored every test_interval epochs ('' disables validation)")
    audio: str = option("", "eval shards (shardify pack --kind eval) or an audio root for the trial list")
    eval_frames: int = option(0, "0: whole utterances; else crops of eval_frames·160 + 240 samples")
    num_eval: int = option(10, "crops per utterance when eval_frames > 0")


@dataclass
class TrainSection:
    run_dir: str = option("runs/default", "run directory: resolved config, metrics.jsonl, checkpoints")
    max_epoch: int = option(500, "epochs to train")
    max_steps: int = option(0, "stop after this many optimizer steps (0: no limit)")
    test_interval: int = option(10, "validate every this many epochs")
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = option("auto", "auto: bf16 where supported, else fp16 on GPU, fp32 on CPU")
    seed: int = option(0, "seed of the data stream, initialisation and augmentation")
    save_every_steps: int = option(0, "also checkpoint every this many steps (0: at epoch ends only)")
    keep_checkpoints: int = option(3, "checkpoints kept in the run directory")
    compile: bool = option(False, "torch.compile the model")
    channels_last: bool = option(False, "channels_last memory format for the 2-D CNNs")
    log_with: list = option([], "experiment trackers, Accelerate's names: [tensorboard], [wandb], [tensorboard, mlflow], …; "
                                "local logs under run_dir/logs (docs/logging.md)")
    project: str = option("speakerid", "the trackers' project (TensorBoard: run_dir/logs/PROJECT; wandb, comet_ml: "
                                       "the project; mlflow: the experiment); the run is named after run_dir")
    tensorboard: bool = option(False, "deprecated: means train.log_with=[tensorboard]")
    log_every: int = option(10, "steps between metrics.jsonl records")
    init_from: str = option("", "a new run starts from these weights: a run directory (its latest complete checkpoint), "
                                "an inference checkpoint or a voxceleb_trainer .model file; ignored when resuming")
    init_skip: list = option([], "parts of init_from not loaded: [loss] starts the loss's parameters afresh")


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossSection = field(default_factory=LossSection)
    data: DataSection = field(default_factory=DataSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def batch_config(self) -> BatchConfig:
        """What the reader takes: the data section's batch options, seeded with train.seed, reading longer crops when
        speed perturbation cuts them after resampling."""
        from speakerid.speed import read_samples  # torch: not needed to read a config

        options = {f.name: getattr(self.data, f.name) for f in dataclasses.fields(BatchConfig)
                   if f.name not in ("seed", "extra_samples")}
        crop = BatchConfig(**options).crop_samples
        return BatchConfig(**options, seed=self.train.seed,
                           extra_samples=read_samples(crop, self.augment.speed_perturb) - crop)


# voxceleb_trainer's option names → speakerid's dotted keys.
ALIASES = {
    "model": "model.name", "trainfunc": "loss.name", "nOut": "model.options.n_out",
    "encoder_type": "model.options.encoder_type", "n_mels": "model.options.n_mels", "log_input": "model.options.log_input",
    "nClasses": "loss.options.nClasses", "margin": "loss.options.margin", "scale": "loss.options.scale",
    "hard_rank": "loss.options.hard_rank", "hard_prob": "loss.options.hard_prob",
    **{seed: f"data.{name}" for seed, name in BATCH_ALIASES.items()},  # batch_size, nPerSpeaker, max_frames, …
    "nDataLoaderThread": "data.workers", "train_path": "data.train_shards",
    "augment": "augment.enabled", "musan_path": "augment.musan_shards", "rir_path": "augment.rir_shards",
    "optimizer": "optim.name", "lr": "optim.lr", "weight_decay": "optim.weight_decay",
    "scheduler": "schedule.name", "lr_decay": "schedule.gamma",
    "test_interval": "train.test_interval", "max_epoch": "train.max_epoch", "save_path": "train.run_dir",
    "seed": "train.seed", "mixedprec": "train.mixed_precision", "initial_model": "train.init_from",
    "test_list": "validation.trials", "test_path": "validation.audio", "eval_frames": "validation.eval_frames",
    "num_eval": "validation.num_eval",
}
# The seeds' values that differ in form from speakerid's.
_VALUE_ALIASES = {("train.mixed_precision", True): "auto", ("train.mixed_precision", False): "no"}


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise SpeakeridError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 (PyYAML) reads 1e-3 as a string: it needs 1.0e-3
            return float(value)
        except ValueError:
            pass
    if annotation is list:
        if not isinstance(value, list):
            raise SpeakeridError(f"{where}: expected a list in brackets, e.g. [a, b], got {value!r}")
        return list(value)
    if annotation is dict:
        if not isinstance(value, dict):
            raise SpeakeridError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation in (int, float, str, bool) and not (isinstance(value, annotation) and
                                                      not (annotation is int and isinstance(value, bool))):
        raise SpeakeridError(f"{where}: expected {annotation.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _set(config: Config, dotted: str, value: Any, where: str) -> None:
    """Set one dotted key (after alias resolution) with type checking; ``*.options.x`` are free-form."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    key = dotted if dotted in sections and isinstance(value, dict) else ALIASES.get(dotted, dotted)
    value = _VALUE_ALIASES.get((key, value), value) if isinstance(value, (str, bool)) else value
    parts = key.split(".")
    if parts[0] not in sections:
        valid = sorted(set(sections) | set(ALIASES))
        raise SpeakeridError(f"{where}: unknown key {dotted!r}{_did_you_mean(dotted, valid)}; "
                             f"valid sections and seed aliases: {', '.join(valid)}")
    section = getattr(config, parts[0])
    if len(parts) == 1:
        if not isinstance(value, dict):
            raise SpeakeridError(f"{where}: {dotted!r} is a section; give it a mapping or use {dotted}.KEY=VALUE")
        for k, v in value.items():
            _set(config, f"{parts[0]}.{k}", v, where)
        return
    types_ = _field_types(type(section))
    name = parts[1]
    if name not in types_:
        raise SpeakeridError(f"{where}: unknown key '{parts[0]}.{name}'{_did_you_mean(name, list(types_))}; "
                             f"valid keys of {parts[0]}: {', '.join(sorted(types_))}")
    if len(parts) > 2:
        if types_[name] is not dict:
            raise SpeakeridError(f"{where}: {parts[0]}.{name} has no sub-keys")
        getattr(section, name)[".".join(parts[2:])] = value
        return
    setattr(section, name, _coerce(value, types_[name], f"{where}: {parts[0]}.{name}"))


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (numbers, booleans, lists, mappings, null)."""
    if "=" not in text:
        raise SpeakeridError(f"override {text!r}: expected KEY=VALUE, e.g. optim.lr=0.01")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise SpeakeridError(f"override {text!r}: the value is not valid YAML: {error}") from error
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults ← YAML file ← overrides, in that order; every key checked."""
    config = Config()
    if path is not None:
        path = recipe_path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise SpeakeridError(f"{path}: cannot read the config: {error}") from error
        if not isinstance(data, dict):
            raise SpeakeridError(f"{path}: a config is a mapping of sections (model:, loss:, data:, …)")
        for key, value in data.items():
            _set(config, key, value, str(path))
    for text in overrides:
        key, value = parse_override(text)
        _set(config, key, value, "command line")
    return config


RECIPES = Path(__file__).resolve().parent / "recipes"  # the published recipes, installed with the package


def recipe_path(path: str | Path) -> Path:
    """A YAML file, or the name of a recipe installed with speakerid (``resnet34_aamsoftmax`` or
    ``resnet34_aamsoftmax.yaml``; the checkout's ``configs/`` is the same folder), as a path."""
    path = Path(path)
    if path.exists() or len(path.parts) > 1:
        return path
    recipe = RECIPES / (path.name if path.suffix == ".yaml" else path.name + ".yaml")
    if recipe.is_file():
        return recipe
    names = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    raise SpeakeridError(f"{path}: no such config file, and not the name of an installed recipe ({names})")


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def diff_configs(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs."""
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += diff_configs(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} → {y!r}")
    return out


def option_reference() -> str:
    """Markdown tables of every option (docs/options.md is generated from this)."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = section.type if isinstance(section.type, type) else typing.get_type_hints(Config)[section.name]
        lines += [f"**{section.name}**", "", "| key | default | meaning |", "| --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            aliases = [a for a, k in ALIASES.items() if k == f"{section.name}.{f.name}"]
            alias = f" (seed: {', '.join(aliases)})" if aliases else ""
            lines.append(f"| `{section.name}.{f.name}` | `{default!r}` | {f.metadata.get('help', '')}{alias} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m speakerid.config: print the option reference (README's is generated from it)
    print(option_reference())
