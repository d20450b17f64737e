"""Importing voxceleb_trainer `.model` files: every layout it writes, exact embeddings, clear refusals."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch
from conftest import run_module

from speakerid.checkpoint import import_voxceleb_trainer, read_voxceleb_trainer_state
from speakerid.errors import SpeakeridError
from speakerid.models import build_model

OPTIONS = {"nOut": 64, "encoder_type": "ASP", "n_mels": 40, "log_input": True}


def trained(name: str = "ResNetSE34L", **options) -> torch.nn.Module:
    """A model whose every tensor (BatchNorm statistics included) differs from a fresh one."""
    torch.manual_seed(1)
    model = build_model(name, **(options or OPTIONS))
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not key.startswith("torchfb"):
                tensor.add_(0.05 * torch.randn_like(tensor))
                if key.endswith("running_var"):
                    tensor.abs_().add_(0.5)
    return model.eval()


def speakernet_state(model: torch.nn.Module, loss: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The keys voxceleb_trainer's SpeakerNet.state_dict() has: ``__S__.`` model, ``__L__.`` loss."""
    state = {f"__S__.{k}": v.clone() for k, v in model.state_dict().items()}
    if loss is not None:
        state.update({f"__L__.{k}": v.clone() for k, v in loss.state_dict().items()})
    return state


def layouts(state: dict[str, torch.Tensor]) -> dict[str, object]:
    return {
        "master": {"model_state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 0.001}]},
                   "scheduler_state_dict": {"last_epoch": 3}, "epoch": 3},
        "bare": state,
        "ddp": {f"module.{k}": v for k, v in state.items()},
        "legacy": {"model": {k[len("__S__."):]: v for k, v in state.items() if k.startswith("__S__.")}},
        "model-only": {k[len("__S__."):]: v for k, v in state.items() if k.startswith("__S__.")},
    }


@pytest.mark.parametrize("layout", ["master", "bare", "ddp", "legacy", "model-only"])
def test_every_layout_imports_with_identical_embeddings(tmp_path, layout):
    source = trained()
    path = tmp_path / "model000000003.model"
    torch.save(layouts(speakernet_state(source))[layout], path)
    model, loss = import_voxceleb_trainer(path, "ResNetSE34L", **OPTIONS)
    assert loss is None and not model.training
    x = 0.1 * torch.randn(2, 8000)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_seed_option_names_and_other_models(tmp_path):
    source = trained("VGGVox", nOut=32, encoder_type="SAP")
    path = tmp_path / "vgg.model"
    torch.save(speakernet_state(source), path)
    model, _ = import_voxceleb_trainer(path, "VGGVox", nOut=32, encoder_type="SAP")
    x = 0.1 * torch.randn(2, 16240)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_loss_parameters_are_imported_with_the_loss(tmp_path):
    losses = pytest.importorskip("speakerid.losses", reason="speakerid.losses is not in this tree yet")
    source = trained()
    loss = losses.build_loss("angleproto")
    with torch.no_grad():
        for parameter in loss.parameters():
            parameter.add_(1.25)
    path = tmp_path / "ap.model"
    torch.save({"model_state_dict": speakernet_state(source, loss), "epoch": 1}, path)
    model, imported = import_voxceleb_trainer(path, "ResNetSE34L", "angleproto", **OPTIONS)
    assert set(imported.state_dict()) == set(loss.state_dict()) and len(loss.state_dict()) > 0
    assert all(torch.equal(imported.state_dict()[k], v) for k, v in loss.state_dict().items())
    # without a loss name the __L__ tensors are left out, the model still loads
    model_only, none = import_voxceleb_trainer(path, "ResNetSE34L", **OPTIONS)
    assert none is None


def test_shared_options_reach_both_model_and_loss(tmp_path):
    losses = pytest.importorskip("speakerid.losses", reason="speakerid.losses is not in this tree yet")
    source = trained()
    loss = losses.build_loss("aamsoftmax", nOut=64, nClasses=10)
    path = tmp_path / "aam.model"
    torch.save(speakernet_state(source, loss), path)
    for size in ({"nOut": 64}, {"n_out": 64}):  # the seed's spelling and ours both reach the loss's nOut
        options = {**OPTIONS, **size, "nClasses": 10}
        options.pop("nOut") if "n_out" in size else None
        model, imported = import_voxceleb_trainer(path, "ResNetSE34L", "aamsoftmax", **options)
        assert all(torch.equal(imported.state_dict()[k], v) for k, v in loss.state_dict().items())
    with pytest.raises(SpeakeridError, match="shape mismatch"):
        import_voxceleb_trainer(path, "ResNetSE34L", "aamsoftmax", **OPTIONS, nClasses=11)
    with pytest.raises(SpeakeridError, match="unknown loss"):
        import_voxceleb_trainer(path, "ResNetSE34L", "arcface", **OPTIONS)


def test_mismatches_name_the_keys(tmp_path):
    state = speakernet_state(trained())
    path = tmp_path / "x.model"
    torch.save(state, path)
    with pytest.raises(SpeakeridError, match=r"shape mismatch: fc\.weight: file \(64, 256\), model ResNetSE34L \(32, 256\)"):
        import_voxceleb_trainer(path, "ResNetSE34L", **{**OPTIONS, "nOut": 32})
    with pytest.raises(SpeakeridError, match=r"shape mismatch.*fc\.weight: file \(64, 256\), model ResNetSE34L \(64, 128\)"):
        import_voxceleb_trainer(path, "ResNetSE34L", **{**OPTIONS, "encoder_type": "SAP"})

    damaged = dict(state)
    del damaged["__S__.layer2.0.bn1.running_mean"]
    damaged["__S__.extra.weight"] = torch.zeros(3)
    torch.save(damaged, path)
    with pytest.raises(SpeakeridError) as error:
        import_voxceleb_trainer(path, "ResNetSE34L", **OPTIONS)
    assert "1 missing: layer2.0.bn1.running_mean" in str(error.value)
    assert "1 unexpected: extra.weight" in str(error.value)


def test_bad_options_and_files_are_user_errors(tmp_path):
    path = tmp_path / "x.model"
    torch.save(speakernet_state(trained()), path)
    with pytest.raises(SpeakeridError, match="taken by neither"):
        import_voxceleb_trainer(path, "ResNetSE34L", nOut=64, encoder_type="ASP", max_frames=200)
    with pytest.raises(SpeakeridError, match="unknown model"):
        import_voxceleb_trainer(path, "ResNetSE50", **OPTIONS)
    with pytest.raises(SpeakeridError, match="no such checkpoint file"):
        import_voxceleb_trainer(tmp_path / "missing.model", "ResNetSE34L")
    (tmp_path / "garbage.model").write_bytes(b"not a checkpoint at all")
    with pytest.raises(SpeakeridError, match="refused by torch.load"):
        read_voxceleb_trainer_state(tmp_path / "garbage.model")


class Payload:
    """Unpickling this calls open(marker, "w"): a file appearing means code from the checkpoint ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pickle_that_runs_code_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.model"
    payload = {"__S__.conv1.weight": torch.zeros(1), "hook": Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:  # a plain pickle, as torch.save wrote before 1.6 (no tensor: pickling one would itself need a global)
        path.write_bytes(pickle.dumps({"hook": Payload(marker)}, protocol=2))
    with pytest.raises(SpeakeridError, match=r"refused by torch.load\(weights_only=True\): .*open") as error:
        import_voxceleb_trainer(path, "ResNetSE34L", **OPTIONS)
    assert "Unsupported global" in str(error.value)
    assert not marker.exists()


class Shell:
    """Unpickling this runs a shell command (os.system, whose module torch blocks outright)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class Exec:
    """Unpickling this runs Python source through builtins.exec."""

    def __init__(self, source):
        self.source = source

    def __reduce__(self):
        return (exec, (self.source,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
@pytest.mark.parametrize("payload, refused", [(Shell, os.system.__module__ + ".system"), (Exec, "exec")])
def test_the_refused_global_is_named_not_torchs_advice(tmp_path, writer, payload, refused):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.model"
    hook = payload(f"touch {marker}") if payload is Shell else payload(f"open({str(marker)!r}, 'w')")
    if writer == "torch.save":
        torch.save({"__S__.conv1.weight": torch.zeros(1), "hook": hook}, path)
    else:
        path.write_bytes(pickle.dumps({"hook": hook}, protocol=2))
    with pytest.raises(SpeakeridError) as error:
        import_voxceleb_trainer(path, "ResNetSE34L", **OPTIONS)
    message = str(error.value)
    assert f"Unsupported global {refused}" in message and "not a plain weights file" in message, message
    assert "weights_only=True" in message and "In PyTorch 2.6" not in message and "\n" not in message
    assert not marker.exists()


def test_a_newer_pickle_protocol_is_one_message_without_torchs_warning(tmp_path):
    path = tmp_path / "p4.model"
    path.write_bytes(pickle.dumps({"hook": Shell("true")}, protocol=4))  # torch's loader stops at its FRAME opcode
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SpeakeridError, match="refused by torch.load"):
        warnings.simplefilter("always")
        read_voxceleb_trainer_state(path)
    assert not [w for w in caught if "pickle protocol" in str(w.message)]


def test_the_cli_refuses_a_malicious_model_in_one_line(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.model"
    path.write_bytes(pickle.dumps({"hook": Shell(f"touch {marker}")}, protocol=2))
    result = run_module("evaluate", "--checkpoint", path, "--model", "ResNetSE34L", "--trials", tmp_path / "t.txt",
                        "--audio", tmp_path, check=False, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and not marker.exists()
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # no UserWarning, no traceback
    assert f"{path}: refused by torch.load(weights_only=True): Unsupported global" in result.stderr
