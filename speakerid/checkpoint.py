"""Import voxceleb_trainer ``.model`` files into speakerid models (and losses), running no code from the file.

voxceleb_trainer saves ``SpeakerNet.state_dict()`` in three layouts, all read here:
- ``{"model_state_dict": …, "optimizer_state_dict": …, "epoch": …}`` (current master's saveParameters);
- a bare state dict with ``__S__.`` (model) and ``__L__.`` (loss) prefixes, possibly under ``module.``
  when saved from its DDP wrapper;
- ``{"model": state_dict}`` without prefixes (its legacy model-only form).
Files are read with ``torch.load(weights_only=True)``: a pickle that needs anything beyond tensors and
plain containers is refused with the loader's reason.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from speakerid.errors import SpeakeridError
from speakerid.models import build_model, model_options, resolve_name
from speakerid.models import OPTION_ALIASES as MODEL_OPTION_ALIASES

log = logging.getLogger(__name__)

MODEL_PREFIX = "__S__."
LOSS_PREFIX = "__L__."
LISTED = 10  # keys named per category in an error message; the rest are counted
GENERIC_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation")  # torch's paragraphs


def read_voxceleb_trainer_state(path: str | Path) -> dict[str, Tensor]:
    """The flat SpeakerNet state dict stored in ``path`` (``module.`` stripped; legacy form given ``__S__.``)."""
    path = Path(path)
    if not path.is_file():
        raise SpeakeridError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():  # the refusal below says what matters; torch's protocol warning is noise
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError (bad zip), EOFError…: all mean "not a safe weights file"
        raise SpeakeridError(f"{path}: refused by torch.load(weights_only=True): {_load_reason(error)}; "
                             f"speakerid never unpickles code, so re-save the weights from a trusted "
                             f"environment as a plain state dict") from error
    if isinstance(loaded, Mapping) and "model_state_dict" in loaded:
        loaded = loaded["model_state_dict"]
    if not isinstance(loaded, Mapping):
        raise SpeakeridError(f"{path}: expected a state dict (a mapping of names to tensors), found {type(loaded).__name__}")
    if len(loaded) == 1 and "model" in loaded and isinstance(loaded["model"], Mapping):
        loaded = {MODEL_PREFIX + key: value for key, value in loaded["model"].items()}
    state: dict[str, Tensor] = {}
    for key, value in loaded.items():
        if not isinstance(value, Tensor):
            raise SpeakeridError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        name = _strip_module(str(key))
        if name in state:
            raise SpeakeridError(f"{path}: {name!r} appears twice (with and without a 'module.' prefix)")
        state[name] = value
    if not any(key.startswith((MODEL_PREFIX, LOSS_PREFIX)) for key in state):
        state = {MODEL_PREFIX + key: value for key, value in state.items()}  # a bare model state dict
    return state


def _load_reason(error: Exception) -> str:
    """The refused global, or else the informative line of torch.load's message (its first lines are generic advice)."""
    text = str(error)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:
        return (f"Unsupported global {refused.group(1)}: the file is a pickle that needs code, not a plain weights "
                "file (nothing in it was run)")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].split(". Please use", 1)[0].strip()
            if reason:
                return reason
    informative = [line for line in lines if not line.startswith(GENERIC_ADVICE)]
    return informative[0] if informative else type(error).__name__


def _strip_module(key: str) -> str:
    # DistributedDataParallel (and the seed's WrappedModel) put `module.` in front; the seed strips all of them
    parts = [part for part in key.split(".") if part != "module"]
    return ".".join(parts)


def split_state(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str]]:
    """(model part, loss part, keys under neither prefix)."""
    model_state = {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    loss_state = {k[len(LOSS_PREFIX):]: v for k, v in state.items() if k.startswith(LOSS_PREFIX)}
    other = [k for k in state if not k.startswith((MODEL_PREFIX, LOSS_PREFIX))]
    return model_state, loss_state, other


def load_exact(module: nn.Module, state: Mapping[str, Tensor], what: str, path: str | Path) -> None:
    """``load_state_dict(strict=True)``, after naming every missing key, unexpected key and shape mismatch."""
    problems = state_problems(module, state, what)
    if problems:
        raise SpeakeridError(f"{path}: the file does not fit {what} ({'; '.join(problems)}); check the model/loss "
                             f"name and options (n_out/nOut, encoder_type, n_mels, nClasses) used for training")
    module.load_state_dict(state, strict=True)


def state_problems(module: nn.Module, state: Mapping[str, Tensor], what: str) -> list[str]:
    """Every missing key, unexpected key and shape mismatch of ``state`` against ``module``, one entry per kind."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {tuple(state[k].shape)}, {what} {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            shown = ", ".join(items[:LISTED]) + (f", … ({len(items) - LISTED} more)" if len(items) > LISTED else "")
            problems.append(f"{len(items)} {label}: {shown}")
    return problems


def _loss_keyword(loss: str, key: str) -> str | None:
    """The loss's spelling of option ``key``, or None when the loss does not take it."""
    from speakerid.losses import loss_class, loss_options

    options = loss_options(loss)
    spelled = loss_class(loss).keyword_aliases.get(key, key)
    if spelled in options:
        return spelled
    # the seeds share one embedding size between model and loss: n_out (ours) is the loss's nOut
    if MODEL_OPTION_ALIASES.get(key, key) == "n_out" and "nOut" in options:
        return "nOut"
    return None


def route_options(model: str, loss: str | None, options: Mapping[str, object]) -> tuple[dict, dict]:
    """Split the seed-style shared options between model and loss (an option both take goes to both)."""
    accepted = set(model_options(model))
    model_kwargs: dict[str, object] = {}
    loss_kwargs: dict[str, object] = {}
    for key, value in options.items():
        to_model = MODEL_OPTION_ALIASES.get(key, key) in accepted
        loss_key = _loss_keyword(loss, key) if loss is not None else None
        if not to_model and loss_key is None:
            takers = f"model {model}" + (f" nor loss {loss}" if loss else "")
            raise SpeakeridError(f"option {key!r} is taken by neither {takers}; model options: {', '.join(accepted)}")
        if to_model:
            model_kwargs[key] = value
        if loss_key is not None:
            loss_kwargs[loss_key] = value
    return model_kwargs, loss_kwargs


def import_voxceleb_trainer(path: str | Path, model: str, loss: str | None = None,
                            **options: object) -> tuple[nn.Module, nn.Module | None]:
    """Build ``model`` (and ``loss``) with ``options`` and load a voxceleb_trainer ``.model`` file into them.

    ``options`` are the seed's shared keyword arguments (``nOut=512, encoder_type="SAP", nClasses=5994`` …),
    each given to whichever of model and loss accepts it. Every model key must match exactly; loss keys
    are loaded when ``loss`` is given and otherwise ignored (counted in the log). The model is returned
    in eval mode, on the CPU.
    """
    model = resolve_name(model)
    if loss is not None:
        from speakerid.losses import loss_class

        loss_class(loss)  # an unknown loss name fails here, listing the valid ones
    state = read_voxceleb_trainer_state(path)
    model_state, loss_state, other = split_state(state)
    if other:
        raise SpeakeridError(f"{path}: {len(other)} keys under neither __S__. nor __L__.: {', '.join(other[:LISTED])}")
    model_kwargs, loss_kwargs = route_options(model, loss, options)
    network = build_model(model, **model_kwargs)
    load_exact(network, model_state, f"model {model}", path)
    loss_module = None
    if loss is not None:
        from speakerid.losses import build_loss

        loss_module = build_loss(loss, **loss_kwargs)
        load_exact(loss_module, loss_state, f"loss {loss}", path)
        loss_module.eval()
    elif loss_state:
        log.info("%s: %d loss tensors (%s) not loaded: no loss named", path, len(loss_state),
                 ", ".join(list(loss_state)[:LISTED]))
    return network.eval(), loss_module
