"""Start a new run from trained weights (``train.init_from``; the seeds' ``initial_model``).

The source is one of three things, told apart by what it holds:
- a speakerid run directory (``config.yaml``): its latest complete checkpoint (``checkpoints/step-*`` with its
  ``progress.json``), model and loss parameters both;
- an inference checkpoint (``speakerid.json`` + ``model.safetensors``, e.g. a run's ``export/``): the model alone;
- a voxceleb_trainer ``.model`` file: its ``__S__.`` (model) and ``__L__.`` (loss) tensors, read with
  ``torch.load(weights_only=True)``; the file does not name its architecture, this run's config does.

Everything is loaded exactly or not at all: a checkpoint of another architecture, or a loss head for another number
of speakers, is an error naming every tensor that does not fit and the fix (``train.init_skip=[loss]`` loads the
model alone). Only the weights come over: optimizer, schedule, epoch and data position start afresh (resuming a
run, which continues one, is re-running it on its own run directory). A run directory that already has a checkpoint
resumes from it and ``init_from`` is not applied again, so a resumed fine-tuning run keeps its own weights.

A source trained with speed perturbation has a class head of n_speakers × speeds rows (label + k·n_speakers). A run
without ``augment.speed_perturb`` that loads that head (large-margin fine-tuning) keeps it whole, as WeSpeaker's
``do_lm`` stage does (``num_class *= 3`` stays, only its data loses the perturbation): :func:`run_label_space` makes
the source's label space the run's, with ``data_speeds: [1.0]`` (only labels 0..n_speakers-1 occur; the rows of the
other speeds stay in the softmax as negatives), recorded in the run's checkpoints and export so resume and export agree.
A run with speed perturbation loads such a head only for the same speeds in the same order (row k is speed k)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from speakerid.config import Config
from speakerid.errors import SpeakeridError

SKIPPABLE = ("loss",)
ACCELERATE_FILES = ("model.safetensors", "model_1.safetensors")  # save_state's names, in prepare order: model, loss


@dataclass
class InitSource:
    """The tensors of an ``init_from`` source and what it says about itself."""

    path: Path  # what was read: a checkpoint folder, an inference checkpoint or a .model file
    kind: str
    model_state: dict[str, torch.Tensor]
    loss_state: dict[str, torch.Tensor] | None  # None: the source holds no loss parameters
    model_name: str | None  # the recorded architecture (None: a .model file does not record it)
    loss_name: str | None
    train_shards: str | None = None  # a run directory's training shards, whose speakers its class head knows
    model_options: dict | None = None  # the recorded model options (None: a .model file does not record them)
    label_space: dict | None = None  # a run directory's: what its class head's rows mean (speakerid.speed.label_space)


def read_init_source(path: str | Path) -> InitSource:
    path = Path(path)
    if not path.exists():
        raise SpeakeridError(f"train.init_from: {path} does not exist (give a run directory, an inference checkpoint "
                             "directory or a voxceleb_trainer .model file)")
    if path.is_dir() and (path / "config.yaml").exists():
        return _read_run_directory(path)
    if path.is_dir() and (path / "speakerid.json").exists():
        from speakerid.inference import load_inference_checkpoint

        loaded = load_inference_checkpoint(path)  # checks the recorded sha256 and the tensors against the metadata
        return InitSource(path, "inference checkpoint", dict(loaded.model.state_dict()), None,
                          loaded.meta["model"]["name"], loaded.meta["loss"].get("name"),
                          model_options=loaded.meta["model"].get("options", {}))
    if path.is_file():
        from speakerid.checkpoint import read_voxceleb_trainer_state, split_state

        model_state, loss_state, other = split_state(read_voxceleb_trainer_state(path))
        if other:
            raise SpeakeridError(f"train.init_from: {path}: {len(other)} tensors under neither __S__. nor __L__. "
                                 f"({', '.join(other[:10])})")
        return InitSource(path, "voxceleb_trainer .model file", model_state, loss_state or None, None, None)
    raise SpeakeridError(f"train.init_from: {path} is neither a run directory (config.yaml), an inference checkpoint "
                         "(speakerid.json + model.safetensors) nor a voxceleb_trainer .model file")


def _read_run_directory(run_dir: Path) -> InitSource:
    from speakerid.training.checkpoints import latest_checkpoint

    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise SpeakeridError(f"train.init_from: {run_dir} has no complete checkpoint (checkpoints/step-*/progress.json); "
                             "let that run save one, or point init_from at its export/ (the model alone)")
    try:
        recorded = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise SpeakeridError(f"train.init_from: {run_dir / 'config.yaml'}: cannot read it: {error}") from error
    states = []
    for name in ACCELERATE_FILES:
        file = checkpoint / name
        try:
            states.append(_strip_wrappers(load_file(str(file))) if file.exists() else None)
        except (SafetensorError, OSError) as error:
            raise SpeakeridError(f"train.init_from: {file}: not a readable safetensors file: {error}") from error
    if states[0] is None:
        raise SpeakeridError(f"train.init_from: {checkpoint} holds no {ACCELERATE_FILES[0]}")
    return InitSource(checkpoint, "run directory, latest checkpoint", states[0], states[1] or {},
                      recorded.get("model", {}).get("name"), recorded.get("loss", {}).get("name"),
                      recorded.get("data", {}).get("train_shards") or None, recorded.get("model", {}).get("options", {}),
                      saved_label_space(checkpoint))


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as the bare module has them: torch.compile's ``_orig_mod.`` and DDP's ``module.`` taken out."""
    return {".".join(p for p in key.split(".") if p not in ("_orig_mod", "module")): value for key, value in state.items()}


def source_label_space(path: str | Path) -> dict | None:
    """The label space a source's class head was trained for: a run directory's latest checkpoint's
    ``training_state_0.json``, an inference checkpoint's ``extra.label_space``; None where the source does not say."""
    from speakerid.training.checkpoints import latest_checkpoint

    path = Path(path)
    if path.is_dir() and (path / "config.yaml").exists():
        checkpoint = latest_checkpoint(path)
        return saved_label_space(checkpoint) if checkpoint is not None else None
    if path.is_dir() and (path / "speakerid.json").exists():
        return _read_json(path / "speakerid.json").get("extra", {}).get("label_space") or None
    return None


def saved_label_space(checkpoint: Path) -> dict | None:
    file = checkpoint / "training_state_0.json"
    if not file.exists():  # an earlier speakerid's checkpoint: speakers only, no speeds
        return None
    return _read_json(file).get("label_space") or None


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise SpeakeridError(f"train.init_from: {file}: cannot read it: {error}") from error


def run_label_space(config: Config, n_speakers: int, checkpoint: Path | None) -> dict:
    """What this run's labels and class head mean. Its own speeds (:func:`speakerid.speed.label_space`), except for a
    run without speed perturbation whose loss comes from a speed-perturbed source of as many speakers: it keeps the
    source's head (every speed's rows) and trains on speed 1.0 alone (``data_speeds``). ``checkpoint`` (the run's own,
    when it resumes) is where a resumed run finds that space, so it no longer needs the source."""
    from speakerid.speed import label_space

    own = label_space(config.augment.speed_perturb, n_speakers)
    if config.augment.speed_perturb or not config.train.init_from or "loss" in config.train.init_skip:
        return own
    recorded = saved_label_space(checkpoint) if checkpoint is not None else source_label_space(config.train.init_from)
    if not recorded or len(recorded.get("speeds", [])) < 2 or recorded.get("n_speakers") != n_speakers:
        return own  # nothing to keep; a head for other speakers is refused by init_weights, naming the fix
    speeds = [float(s) for s in recorded["speeds"]]
    return {"n_speakers": n_speakers, "speeds": speeds, "n_classes": n_speakers * len(speeds), "data_speeds": [1.0]}


def describe_head(space: dict) -> str:
    """One line for the log and init_from.json when a run keeps a speed-perturbed source's class head."""
    n, speeds = space["n_speakers"], space["speeds"]
    return (f"speeds {speeds} of the source kept ({space['n_classes']} rows = {n} speakers × {len(speeds)} speeds); "
            f"this run trains on speed 1.0 alone (labels 0..{n - 1}), the other speeds' rows stay as negatives "
            "(WeSpeaker's large-margin stage)")


def check_init_skip(config: Config) -> None:
    unknown = [part for part in config.train.init_skip if part not in SKIPPABLE]
    if unknown:
        raise SpeakeridError(f"train.init_skip: {unknown} not understood; it lists parts of init_from not loaded: "
                             f"{', '.join(SKIPPABLE)}")


def init_weights(config: Config, model: nn.Module, loss: nn.Module, n_classes: int,
                 speakers: dict[str, int] | None = None, space: dict | None = None) -> dict:
    """Load ``config.train.init_from`` into the freshly built ``model`` and ``loss``, exactly; what was done, as a
    record (``source``, ``kind``, ``model_tensors``, ``loss``) for the run directory and the log. ``speakers`` (this
    run's speaker → label map) is compared with a source run's, whose class weights are loaded only for the same
    speakers under the same labels."""
    from speakerid.checkpoint import state_problems
    from speakerid.losses import loss_class, loss_options
    from speakerid.models import resolve_name

    check_init_skip(config)
    source = read_init_source(config.train.init_from)
    where = f"train.init_from: {source.path} ({source.kind})"
    if source.model_name is not None and resolve_name(source.model_name) != resolve_name(config.model.name):
        raise SpeakeridError(f"{where} holds a {source.model_name} model but this run configures {config.model.name}: "
                             f"set model.name={source.model_name} (and its options), or start from weights of a "
                             f"{config.model.name}")
    problems = state_problems(model, source.model_state, f"model {config.model.name}")
    if problems:
        raise SpeakeridError(f"{where} does not fit model {config.model.name} with options {config.model.options} "
                             f"({'; '.join(problems)}): init_from needs the architecture and options the source was "
                             "trained with (n_out, n_mels, encoder_type, channels, …)")
    record = {"source": str(source.path), "kind": source.kind, "model_tensors": len(source.model_state),
              "model_options_changed": _changed_options(config, source)}
    if "loss" in config.train.init_skip:
        record["loss"] = "not loaded (train.init_skip)"
    elif source.loss_state is None:
        record["loss"] = "not in the source: the loss starts from its initialisation"
    else:
        if source.loss_name is not None and loss_class(source.loss_name) is not loss_class(config.loss.name):
            raise SpeakeridError(f"{where} was trained with loss {source.loss_name}, this run uses {config.loss.name}: "
                                 "its parameters cannot be loaded; add train.init_skip=[loss] to load the model alone")
        problems = state_problems(loss, source.loss_state, f"loss {config.loss.name}")
        if problems:
            raise SpeakeridError(f"{where}: the loss's parameters do not fit loss {config.loss.name} "
                                 f"({'; '.join(problems)}); a class head (nClasses) for another number of speakers "
                                 f"than this run's {n_classes} cannot be loaded: add train.init_skip=[loss] to load "
                                 "the model alone")
        per_class = "nClasses" in loss_options(config.loss.name)  # a class head (weights, proxies) per speaker
        unchecked = _same_speakers(source, speakers, where, config.data.io_timeout) if per_class else ""
        if per_class and space and source.label_space and source.label_space.get("speeds") != space.get("speeds"):
            raise SpeakeridError(f"{where}: its class head's rows are speeds {source.label_space.get('speeds')} "
                                 f"(label + k·n_speakers), this run's are {space.get('speeds')}: the rows would belong "
                                 "to other speeds; set augment.speed_perturb to the source's speeds (or [] to keep its "
                                 "head for unperturbed fine-tuning), or add train.init_skip=[loss]")
        loss.load_state_dict(source.loss_state, strict=True)
        record["loss"] = f"{len(source.loss_state)} tensor{'' if len(source.loss_state) == 1 else 's'} loaded{unchecked}"
        if per_class and space and "data_speeds" in space:
            record["class_head"] = describe_head(space)
    model.load_state_dict(source.model_state, strict=True)
    return record


def _same_speakers(source: InitSource, speakers: dict[str, int] | None, where: str, io_timeout: float) -> str:
    """'' when the source run's speakers are this run's (same names, same labels); raises when they are not; a note
    when they cannot be compared (a .model file or an inference checkpoint does not say, or the shards moved)."""
    if speakers is None or source.train_shards is None:
        return ""
    from speakerid.data.shardset import ShardSet

    try:
        theirs = ShardSet.open(source.train_shards, check=False, io_timeout=io_timeout).index["speakers"]
    except SpeakeridError as error:
        return f" (its speakers not compared: {str(error).splitlines()[0]})"
    if theirs == speakers:
        return ""
    differ = sorted({name for name in set(theirs) | set(speakers) if theirs.get(name) != speakers.get(name)})
    raise SpeakeridError(f"{where}: its loss was trained on the speakers of {source.train_shards}; {len(differ)} "
                         f"speakers are in one run and not the other, or have another label ({', '.join(differ[:5])}"
                         f"{' …' if len(differ) > 5 else ''}): its class weights would belong to other speakers; add "
                         "train.init_skip=[loss] to load the model alone")


def _changed_options(config: Config, source: InitSource) -> dict[str, list]:
    """Model options that change no tensor's shape but differ from the source's (a front-end's log_input, window…):
    {option: [source's, this run's]}, said when the run starts."""
    from speakerid.models import canonical_options, model_options

    if source.model_options is None:
        return {}
    defaults = {key: p.default for key, p in model_options(config.model.name).items()}
    theirs = {**defaults, **canonical_options(config.model.name, source.model_options)}
    ours = {**defaults, **canonical_options(config.model.name, config.model.options)}
    return {key: [theirs[key], ours[key]] for key in defaults if theirs[key] != ours[key]}


def describe(record: dict) -> str:
    changed = "; ".join(f"{key} {a!r} → {b!r}" for key, (a, b) in record["model_options_changed"].items())
    head = f"; class head: {record['class_head']}" if "class_head" in record else ""
    return (f"initialised from {record['source']} ({record['kind']}): model {record['model_tensors']} tensors; "
            f"loss {record['loss']}{head}" + (f"; model options changed from the source's: {changed}" if changed else ""))


def save_record(record: dict, run_dir: Path) -> None:
    (run_dir / "init_from.json").write_text(json.dumps(record, indent=1) + "\n")
