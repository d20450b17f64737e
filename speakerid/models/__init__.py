"""Speaker-embedding networks: a registry name → constructor, with typed, checked keyword options.

Every model maps float waveforms ``(B, samples)`` at full scale ([-1, 1), see ``speakerid.features``) to
embeddings ``(B, D)``; its front-end is part of it. The seeds' option names are accepted as aliases
(``nOut`` for ``n_out``; the seeds already say ``encoder_type``, ``n_mels``, ``log_input``).

Where things live: ``resnet_se`` (the seeds' ResNetSE34L/V2/34), ``vggvox`` (VGGVox40), ``resnet`` (the
WeSpeaker-style ResNet34), ``ecapa`` (ECAPA-TDNN), ``pooling`` (SAP, ASP, TAP, max and (channel-attentive)
statistics pooling); the front-ends (spectrogram, HTK mel, Kaldi fbank) are in ``speakerid.features``. Adding
a model is a file here and a line in ``MODELS`` below. Every model calls ``self.spec_augment`` (an ``nn.Identity``)
on its features right after the front-end: training puts SpecAugment's masks there (``speakerid.specaugment``).
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field

from torch import nn

from speakerid.errors import SpeakeridError
from speakerid.models.ecapa import ECAPATDNN
from speakerid.models.resnet import ResNet34
from speakerid.models.resnet_se import ResNetSE34, ResNetSE34L, ResNetSE34V2
from speakerid.models.vggvox import VGGVox40
from speakerid.options import fits_annotation

MODELS: dict[str, type[nn.Module]] = {
    "ResNetSE34L": ResNetSE34L,
    "ResNetSE34V2": ResNetSE34V2,
    "ResNetSE34": ResNetSE34,
    "VGGVox40": VGGVox40,
    "ECAPA_TDNN": ECAPATDNN,
    "ResNet34": ResNet34,
}
# voxceleb_trainer names a model by its file (models/VGGVox.py)
MODEL_ALIASES: dict[str, str] = {"VGGVox": "VGGVox40", "ECAPA-TDNN": "ECAPA_TDNN"}
OPTION_ALIASES: dict[str, str] = {"nOut": "n_out"}


def resolve_name(name: str) -> str:
    """The registry name for ``name`` (aliases included); SpeakeridError listing the valid names otherwise."""
    canonical = MODEL_ALIASES.get(name, name)
    if canonical not in MODELS:
        valid = ", ".join([*MODELS, *MODEL_ALIASES])
        raise SpeakeridError(f"unknown model {name!r}; valid models: {valid}")
    return canonical


def model_options(name: str) -> dict[str, inspect.Parameter]:
    """The keyword options of model ``name`` (canonical spellings), with their defaults."""
    parameters = inspect.signature(MODELS[resolve_name(name)]).parameters
    return {key: p for key, p in parameters.items()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def canonical_options(name: str, options: dict[str, object]) -> dict[str, object]:
    """Seed aliases → speakerid spellings, checking that each option exists and has the annotated type."""
    name = resolve_name(name)
    accepted = model_options(name)
    hints = typing.get_type_hints(MODELS[name].__init__)
    resolved: dict[str, object] = {}
    for key, value in options.items():
        canonical = OPTION_ALIASES.get(key, key)
        if canonical not in accepted:
            valid = ", ".join(f"{k}={p.default!r}" for k, p in accepted.items())
            raise SpeakeridError(f"model {name} has no option {key!r}; valid options: {valid}")
        if canonical in resolved:
            raise SpeakeridError(f"model {name}: option {canonical!r} given twice (as {key!r} and another spelling)")
        _check_type(name, key, value, hints.get(canonical))
        resolved[canonical] = value
    return resolved


def _check_type(model: str, key: str, value: object, annotation: object) -> None:
    if not fits_annotation(value, annotation):
        raise SpeakeridError(f"model {model}: option {key}={value!r} should be of type {annotation.__name__}")


def build_model(name: str, **options: object) -> nn.Module:
    """Construct model ``name`` (e.g. ``build_model("ResNetSE34L", nOut=512, encoder_type="SAP")``)."""
    canonical = resolve_name(name)
    return MODELS[canonical](**canonical_options(canonical, options))


@dataclass
class ModelSummary:
    """Parameter counts of one model: total, trainable, and per top-level child."""

    name: str
    n_parameters: int
    n_trainable: int
    by_module: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        width = max([len(k) for k in self.by_module] + [10])
        lines = [f"{self.name}: {self.n_parameters:,} parameters ({self.n_parameters / 1e6:.2f} M), "
                 f"{self.n_trainable:,} trainable"]
        lines += [f"  {key:<{width}} {count:>12,}" for key, count in self.by_module.items()]
        return "\n".join(lines)


def summary(model_or_name: nn.Module | str, *, show: bool = True, **options: object) -> ModelSummary:
    """Count a model's parameters (``options`` build it when a name is given); print them when ``show``."""
    if isinstance(model_or_name, str):
        model = build_model(model_or_name, **options)
        name = resolve_name(model_or_name)
    else:
        model, name = model_or_name, type(model_or_name).__name__
    by_module: dict[str, int] = {}
    for key, parameter in model.named_parameters():
        top = key.split(".", 1)[0]
        by_module[top] = by_module.get(top, 0) + parameter.numel()
    result = ModelSummary(
        name=name,
        n_parameters=sum(p.numel() for p in model.parameters()),
        n_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        by_module=by_module,
    )
    if show:
        print(result)
    return result


__all__ = [
    "ECAPATDNN", "MODELS", "MODEL_ALIASES", "ModelSummary", "OPTION_ALIASES", "ResNet34", "ResNetSE34",
    "ResNetSE34L", "ResNetSE34V2", "VGGVox40", "build_model", "canonical_options", "model_options",
    "resolve_name", "summary",
]
