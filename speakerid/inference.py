"""Self-describing inference checkpoints: weights in safetensors, what they are in JSON, loading runs no code.

A checkpoint is a directory::

    model.safetensors   the model's state dict (weights and buffers; no loss, no optimizer)
    speakerid.json      {"format": "speakerid-inference", "version": 1, "model": {"name", "options"},
                         "loss": {"name", "test_normalize"}, "sample_rate", "speakers", "embedding_dim",
                         "weights_sha256", "extra"}

:func:`load_inference_checkpoint` also accepts a training run directory (its ``export/``, which the training
loop rewrites at every epoch end) and a voxceleb_trainer ``.model`` file, whose architecture the caller names
(the file does not say it). Either way the result is a :class:`LoadedModel` in eval mode with the sha256
of its weights, which keys the embedding cache of ``python -m evaluate``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from speakerid.checkpoint import import_voxceleb_trainer, load_exact, route_options
from speakerid.data.index import write_json_atomic
from speakerid.errors import SpeakeridError
from speakerid.losses import loss_class
from speakerid.models import build_model, canonical_options, resolve_name
from speakerid.tempfiles import remove_dead_temporaries

FORMAT = "speakerid-inference"
VERSION = 1
WEIGHTS_NAME = "model.safetensors"
META_NAME = "speakerid.json"
EXPORT_DIR = "export"  # inside a training run directory


@dataclass
class LoadedModel:
    model: nn.Module  # in eval mode, on the CPU
    meta: dict  # speakerid.json's content (for a .model file: the same fields, from the caller's options)
    test_normalize: bool  # L2-normalise embeddings before the seeds' crop scoring (the loss's choice)
    fingerprint: str = ""  # sha256 of the weights (and, for a .model file, of the options given)
    source: Path = field(default_factory=Path)


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare module behind DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def _embedding_dim(model: nn.Module, sample_rate: int) -> int:
    """Run one second of silence through the model in eval mode (training mode and BN statistics untouched)."""
    was_training = model.training
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, sample_rate + 240, device=device))
    finally:
        model.train(was_training)
    return int(out.shape[-1])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_inference_checkpoint(directory: str | os.PathLike, model: nn.Module, *, model_name: str,
                              model_options: dict, loss_name: str, sample_rate: int = 16000,
                              speakers: dict | None = None, extra: dict | None = None) -> Path:
    """Write ``directory/model.safetensors`` and ``directory/speakerid.json``; returns the directory.

    Each file is written under a temporary name and renamed into place, weights first; the JSON records
    the weights' sha256, so a reader never pairs new weights with an old description unnoticed.
    ``model`` may be wrapped (DDP, torch.compile) and in training mode: neither is changed.
    """
    directory = Path(directory)
    name = resolve_name(model_name)
    options = canonical_options(name, dict(model_options))
    bare = _unwrap(model)
    state = {key: value.detach().to("cpu").contiguous().clone() for key, value in bare.state_dict().items()}
    meta = {
        "format": FORMAT, "version": VERSION,
        "model": {"name": name, "options": options},
        "loss": {"name": loss_name, "test_normalize": bool(loss_class(loss_name).test_normalize)},
        "sample_rate": int(sample_rate),
        "speakers": dict(speakers or {}),
        "embedding_dim": _embedding_dim(bare, sample_rate),
        "extra": dict(extra or {}),
    }
    try:
        json.dumps(meta)
    except TypeError as error:
        raise SpeakeridError(f"checkpoint metadata must be JSON (model options, speakers, extra): {error}") from error
    directory.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(directory, [WEIGHTS_NAME, META_NAME])  # an export killed mid-write (a pre-empted epoch end)
    weights = directory / WEIGHTS_NAME
    tmp = directory / f".{WEIGHTS_NAME}.tmp-{os.getpid()}"
    save_file(state, str(tmp), metadata={"format": FORMAT})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    meta["weights_sha256"] = _sha256(tmp)
    os.replace(tmp, weights)
    write_json_atomic(directory / META_NAME, meta)
    return directory


def load_inference_checkpoint(path: str | os.PathLike, *, model: str | None = None, loss: str | None = None,
                              options: dict | None = None) -> LoadedModel:
    """Load a speakerid checkpoint directory, a training run directory, or a voxceleb_trainer ``.model`` file.

    ``model``/``loss``/``options`` (the seeds' shared keyword arguments: ``nOut``, ``encoder_type``, …) name
    the architecture of a ``.model`` file; for the other forms they must be left out.
    """
    path = Path(path)
    if not path.exists():
        raise SpeakeridError(f"{path}: no such checkpoint (expected a speakerid checkpoint directory, a training "
                             "run directory or a voxceleb_trainer .model file)")
    if path.is_file() and path.name in (META_NAME, WEIGHTS_NAME):
        path = path.parent
    if path.is_dir():
        if model is not None or loss is not None or options:
            raise SpeakeridError(f"{path}: a speakerid checkpoint describes its own model; --model/--loss/--option "
                                 "are for voxceleb_trainer .model files only")
        if (path / META_NAME).exists():
            return _load_directory(path)
        if (path / "config.yaml").exists():
            export = path / EXPORT_DIR
            if (export / META_NAME).exists():
                return _load_directory(export)
            raise SpeakeridError(
                f"{path} is a training run directory without an inference export: {export / META_NAME} and "
                f"{export / WEIGHTS_NAME} are missing. Training writes them at the end of every epoch; "
                "let the run finish an epoch, or point --checkpoint at another export")
        raise SpeakeridError(f"{path}: neither a speakerid checkpoint ({META_NAME} + {WEIGHTS_NAME}) nor a training "
                             "run directory (config.yaml + export/)")
    return _load_voxceleb_trainer(path, model, loss, dict(options or {}))


def _read_meta(directory: Path) -> dict:
    meta_path = directory / META_NAME
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as error:
        raise SpeakeridError(f"{meta_path}: cannot read the checkpoint description: {error}") from error
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    if found != FORMAT:
        raise SpeakeridError(f"{meta_path}: not a {FORMAT} description (format {found!r})")
    if meta.get("version") != VERSION:
        raise SpeakeridError(f"{meta_path}: version {meta.get('version')!r}; this speakerid reads version {VERSION}: "
                             "upgrade speakerid")
    for key in ("model", "loss"):
        if not isinstance(meta.get(key), dict) or "name" not in meta[key]:
            raise SpeakeridError(f"{meta_path}: {key!r} must be a mapping with a 'name'")
    return meta


def _load_directory(directory: Path) -> LoadedModel:
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        raise SpeakeridError(f"{directory}: {META_NAME} is there but {WEIGHTS_NAME} is missing")
    for attempt in range(2):  # a writer replaces the weights, then the JSON: retry once if caught in between
        meta = _read_meta(directory)
        sha = _sha256(weights)
        expected = meta.get("weights_sha256")
        if expected in (None, sha):
            break
        if attempt == 0:
            time.sleep(1.0)
    else:
        raise SpeakeridError(f"{weights}: sha256 {sha[:12]}… does not match the {expected[:12]}… recorded in "
                             f"{directory / META_NAME}: the checkpoint was modified or is being written; re-export it")
    name = meta["model"]["name"]
    try:
        network = build_model(name, **meta["model"].get("options", {}))
        test_normalize = bool(meta["loss"].get("test_normalize", loss_class(meta["loss"]["name"]).test_normalize))
    except SpeakeridError as error:
        raise SpeakeridError(f"{directory / META_NAME}: {error}") from error
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise SpeakeridError(f"{weights}: not a readable safetensors file: {error}") from error
    load_exact(network, state, f"model {name} with options {meta['model'].get('options', {})}", weights)
    return LoadedModel(network.eval(), meta, test_normalize, sha, directory)


def _load_voxceleb_trainer(path: Path, model: str | None, loss: str | None, options: dict) -> LoadedModel:
    if model is None:
        raise SpeakeridError(
            f"{path}: a voxceleb_trainer .model file does not record its architecture; name it with --model "
            "(and --loss, and the training options, e.g. --model ResNetSE34L --loss angleproto --option nOut=512 "
            "--option encoder_type=SAP)")
    name = resolve_name(model)
    model_kwargs, _ = route_options(name, loss, options)  # loss-only options (nClasses, margin…) are not needed
    network, _ = import_voxceleb_trainer(path, name, None, **model_kwargs)
    test_normalize = bool(loss_class(loss).test_normalize) if loss is not None else True
    resolved = canonical_options(name, model_kwargs)
    meta = {
        "format": "voxceleb_trainer", "version": None,
        "model": {"name": name, "options": resolved},
        "loss": {"name": loss, "test_normalize": test_normalize},
        "sample_rate": 16000, "speakers": {}, "embedding_dim": _embedding_dim(network, 16000),
        "extra": {"source": str(path)},
    }
    options_digest = hashlib.sha256(json.dumps([name, resolved], sort_keys=True).encode()).hexdigest()
    fingerprint = hashlib.sha256((_sha256(path) + options_digest).encode()).hexdigest()
    return LoadedModel(network, meta, test_normalize, fingerprint, path)
