"""Training losses: a registry from the seeds' names to loss classes, and ``build_loss`` to make one.

Every loss is an ``nn.Module`` whose ``forward(x, labels)`` takes embeddings ``(N, M, D)`` (N speaker rows
× M utterances) and global speaker labels ``(N,)`` and returns ``(loss, accuracy)``: accuracy is a
detached 0-d tensor in percent (the seeds' convention), top-1 unless the class says
``accuracy_kind = "eer"`` (triplet, contrastive: the EER of their pair distances, as the seed reports).
Its parameters carry the seeds' names, so a voxceleb_trainer / masked-proxy ``__L__.*`` state_dict loads.
Class attributes tell the rest of the toolkit what a loss needs: ``min_utts_per_speaker`` /
``max_utts_per_speaker`` (M), ``test_normalize`` (L2-normalise embeddings at test time).

Where things live: one loss per file, named as the seeds name it (``softmax``, ``amsoftmax``, ``aamsoftmax``:
classification; ``proto``, ``angleproto``, ``ge2e``, ``softmaxproto``: prototypical; ``pairwise``: triplet and
contrastive with hard-negative mining; ``proxynca``, ``proxyanchor``, ``masked_proxy``: proxy losses).
``base`` holds the contract and the shared pieces (input checks, same-speaker masking, ``ScaledCosineLoss``);
``distributed`` gathers every rank's batch for ``cross_rank_negatives``; the pairwise losses' EER is
``speakerid.metrics``'. Adding a loss is a file here and a line in ``LOSSES`` below.
"""

from __future__ import annotations

import inspect
import typing

from speakerid.errors import SpeakeridError
from speakerid.losses.aamsoftmax import AAMSoftmax
from speakerid.losses.amsoftmax import AMSoftmax
from speakerid.losses.angleproto import AngleProto
from speakerid.losses.base import SpeakerLoss
from speakerid.losses.ge2e import GE2E
from speakerid.losses.masked_proxy import MMP, MP, MMPBalance, MPBalance
from speakerid.losses.pairwise import Contrastive, Triplet
from speakerid.losses.proto import Proto
from speakerid.losses.proxyanchor import ProxyAnchor
from speakerid.losses.proxynca import ProxyNCA
from speakerid.losses.softmax import Softmax
from speakerid.losses.softmaxproto import SoftmaxProto
from speakerid.options import fits_annotation

LOSSES: dict[str, type[SpeakerLoss]] = {
    cls.name: cls
    for cls in (Softmax, AMSoftmax, AAMSoftmax, GE2E, Proto, AngleProto, Triplet, Contrastive, SoftmaxProto,
                MP, MPBalance, MMP, MMPBalance, ProxyAnchor, ProxyNCA)
}
# Other spellings of a loss name used by the seeds' command lines.
LOSS_ALIASES: dict[str, str] = {"mmp_balance2": "mmp_balance"}

REQUIRED = inspect.Parameter.empty


def loss_class(name: str) -> type[SpeakerLoss]:
    """The class registered under ``name`` (or one of its aliases); SpeakeridError listing the valid names."""
    name = LOSS_ALIASES.get(name, name)
    if name not in LOSSES:
        raise SpeakeridError(f"unknown loss {name!r}; valid losses: {', '.join(LOSSES)}")
    return LOSSES[name]


def loss_options(name: str) -> dict[str, object]:
    """Keyword → default for a loss's constructor (``REQUIRED`` where there is none)."""
    signature = inspect.signature(loss_class(name).__init__)
    return {p.name: p.default for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY}


def _check_type(name: str, key: str, value: object, kind: object) -> object:
    if not fits_annotation(value, kind):
        raise SpeakeridError(f"loss {name!r} option {key!r} must be {getattr(kind, '__name__', kind)}, "
                             f"got {value!r} ({type(value).__name__})")
    return float(value) if kind is float else value


def build_loss(name: str, **kwargs: object) -> SpeakerLoss:
    """Construct loss ``name`` from keyword options (the seeds' spellings, e.g. ``n_classes``, also work).

    A wrong name, an unknown or missing option, or a value of the wrong type raises SpeakeridError that
    lists what is valid.
    """
    cls = loss_class(name)
    options = loss_options(name)
    hints = typing.get_type_hints(cls.__init__)
    resolved: dict[str, object] = {}
    for key, value in kwargs.items():
        key = cls.keyword_aliases.get(key, key)
        if key not in options:
            valid = ", ".join(f"{k}={'<required>' if d is REQUIRED else repr(d)}" for k, d in options.items())
            raise SpeakeridError(f"loss {cls.name!r} has no option {key!r}; valid options: {valid or '(none)'}")
        resolved[key] = _check_type(cls.name, key, value, hints.get(key))
    missing = [k for k, d in options.items() if d is REQUIRED and k not in resolved]
    if missing:
        raise SpeakeridError(f"loss {cls.name!r} needs option(s) {', '.join(missing)}")
    return cls(**resolved)


__all__ = ["LOSSES", "LOSS_ALIASES", "REQUIRED", "SpeakerLoss", "build_loss", "loss_class", "loss_options",
           *(cls.__name__ for cls in LOSSES.values())]
