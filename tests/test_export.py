"""python -m speakerid.export: TorchScript and ONNX files that give the PyTorch model's embeddings at any length.

Real checkpoints of tiny models, real files loaded back with torch.jit.load and onnxruntime, compared with the
PyTorch model on lengths and a batch size different from the traced example (2 s, batch 2).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import soundfile
import torch
from torch import Tensor, nn

from speakerid.errors import SpeakeridError
from speakerid.export import TRACE_SECONDS, _min_samples, export_checkpoint, main
from speakerid.inference import load_inference_checkpoint, save_inference_checkpoint
from speakerid.models import MODELS, build_model
from tests.conftest import REPO, run_module

TINY = {  # the widths tests/test_recipes.py trains at
    "ResNetSE34L": {"n_out": 32},
    "ResNet34": {"base_channels": 4, "n_mels": 40, "n_out": 32},
    "ECAPA_TDNN": {"channels": 16, "mfa_channels": 48, "attention_channels": 8, "se_bottleneck": 8, "scale": 4,
                   "n_mels": 40, "n_out": 32},
}
CHECK_SECONDS = (0.5, 1.3, 3.0)  # the export's own check; the test compares at other lengths below
TEST_SAMPLES = (11_200, 27_520, 40_000)  # 0.7 s, 1.72 s, 2.5 s: none is the traced 2 s


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def save_checkpoint(directory, name: str, options: dict, model: nn.Module | None = None):
    """A checkpoint whose BatchNorm statistics are not the identity, as a trained one's."""
    torch.manual_seed(0)
    model = model or build_model(name, **options)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif key.endswith("running_mean"):
                tensor.normal_(0, 0.1)
    return save_inference_checkpoint(directory, model.eval(), model_name=name, model_options=options,
                                     loss_name="aamsoftmax")


def unit(x: Tensor | np.ndarray) -> Tensor:
    return torch.nn.functional.normalize(torch.as_tensor(x, dtype=torch.float32), dim=-1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name → (checkpoint, export directory, result): each tiny model exported once for the tests below."""
    done = {}

    def export(name: str):
        if name not in done:
            root = tmp_path_factory.mktemp(name)
            checkpoint = save_checkpoint(root / "ckpt", name, TINY[name])
            done[name] = checkpoint, root / "out", export_checkpoint(checkpoint, root / "out", seconds=CHECK_SECONDS)
        return done[name]

    return export


@pytest.mark.parametrize("name", list(TINY))
def test_export_gives_pytorch_embeddings_at_other_lengths(name, exported):
    checkpoint, out, result = exported(name)
    reference_model = load_inference_checkpoint(checkpoint).model
    scripted = torch.jit.load(str(out / "model.ts"))
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["waveform"]
    assert [o.name for o in session.get_outputs()] == ["embedding"]
    generator = torch.Generator().manual_seed(5)
    for samples in TEST_SAMPLES:
        assert samples != TRACE_SECONDS * 16000
        waveform = 0.1 * torch.randn(3, samples, generator=generator)
        with torch.no_grad():
            expected = unit(reference_model(waveform))
            from_ts = unit(scripted(waveform))
        from_onnx = unit(session.run(["embedding"], {"waveform": waveform.numpy()})[0])
        assert expected.shape == (3, 32)
        assert (from_ts - expected).abs().max() <= 1e-4, (name, samples)
        assert (from_onnx - expected).abs().max() <= 1e-4, (name, samples)
    meta = json.loads((out / "export.json").read_text())
    assert meta["sample_rate"] == 16000 and meta["embedding_dim"] == 32
    assert meta["input"]["name"] == "waveform" and meta["output"]["name"] == "embedding"
    assert meta["opset"] == 18 and meta["source"]["model"] == name
    assert meta["source"]["sha256"] == load_inference_checkpoint(checkpoint).fingerprint
    assert set(meta["tolerance"]["measured"]) == {"torchscript", "onnx"}
    assert max(meta["tolerance"]["measured"].values()) <= meta["tolerance"]["bound"] == 1e-4
    # the shortest input the time axis accepts first, then the export's lengths
    assert [row["samples"] for row in meta["verification"]] == [meta["input"]["min_samples"], 8000, 20800, 48000]
    assert all(set(row) == {"seconds", "samples", "torchscript", "onnx"} for row in meta["verification"])
    assert result.files == {"torchscript": out / "model.ts", "onnx": out / "model.onnx"}
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx", "model.ts"]  # weights inside


def test_the_docs_onnxruntime_example_runs(exported, tmp_path, monkeypatch):
    """docs/export.md's Python example, run as written on a real export and two wav files."""
    _, out, _ = exported("ResNetSE34L")
    text = (REPO / "docs" / "export.md").read_text()
    example = text.split("```python\n")[1].split("```")[0]
    (tmp_path / "portable").symlink_to(out)
    generator = np.random.default_rng(3)
    for name in ("a.wav", "b.wav"):
        soundfile.write(tmp_path / name, (0.1 * generator.standard_normal(24_000)).astype(np.float32), 16_000)
    monkeypatch.chdir(tmp_path)  # the example's paths are relative
    namespace: dict = {}
    exec(compile(example, "docs/export.md", "exec"), namespace, namespace)  # noqa: S102 (our own docs)
    assert -1.0 <= namespace["score"] <= 1.0 and namespace["a"].shape == (32,)
    reference = load_inference_checkpoint(exported("ResNetSE34L")[0]).model
    audio, _ = soundfile.read(tmp_path / "a.wav", dtype="float32")
    with torch.no_grad():
        expected = unit(reference(torch.from_numpy(audio)[None]))[0]
    assert (unit(namespace["a"]) - expected).abs().max() <= 1e-4


def test_command_line_exports_one_format_and_prints_the_table(tmp_path):
    checkpoint = save_checkpoint(tmp_path / "ckpt", "ResNetSE34L", TINY["ResNetSE34L"])
    result = run_module("speakerid.export", checkpoint, "--out", tmp_path / "out", "--format", "torchscript")
    assert "max |Δ|" in result.stderr and "7.1 s" in result.stderr and "113600" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["export.json", "model.ts"]
    meta = json.loads((tmp_path / "out" / "export.json").read_text())
    assert meta["files"] == {"torchscript": "model.ts"} and meta["opset"] is None
    assert meta["exporters"] == {"torchscript": "torch.jit.trace"}
    assert [row["samples"] for row in meta["verification"]] == [375, 8000, 20800, 48000, 113600]


class ValueBranch(nn.Module):
    """A front-end with Python control flow on tensor values: no trace or graph export can keep both branches."""

    def __init__(self, n_out: int = 8) -> None:
        super().__init__()
        self.frames = nn.Linear(400, n_out)

    def forward(self, waveform: Tensor) -> Tensor:
        x = self.frames(waveform.unfold(-1, 400, 160)).mean(dim=1)
        if waveform.abs().max() > 0.5:  # a loud input is treated differently, decided in Python
            x = -x
        return x


class LengthBranch(ValueBranch):
    """A front-end that decides in Python on the input length: a trace keeps the traced length's branch."""

    def forward(self, waveform: Tensor) -> Tensor:
        x = self.frames(waveform.unfold(-1, 400, 160)).mean(dim=1)
        if waveform.shape[-1] > 24_000:
            x = -x
        return x


class NoisyOutput(ValueBranch):
    """Exportable, but not deterministic: its embeddings change on every call, so no export can match them."""

    def forward(self, waveform: Tensor) -> Tensor:
        x = self.frames(waveform.unfold(-1, 400, 160)).mean(dim=1)
        return x + torch.randn_like(x)


@pytest.fixture
def registered(monkeypatch):
    for model in (ValueBranch, LengthBranch, NoisyOutput):
        monkeypatch.setitem(MODELS, model.__name__, model)


# the dynamo exporter refuses a branch on values; on a length it falls back to a specialised graph, which the
# export's own verification at other lengths refuses
@pytest.mark.parametrize("name, onnx_error", [
    ("ValueBranch", r"model ValueBranch cannot be exported to ONNX with a dynamic time axis: .*control flow"),
    ("LengthBranch", r"model LengthBranch: the export differs from PyTorch by more than the tolerance 0.0001 \(onnx"),
], ids=["ValueBranch", "LengthBranch"])
def test_python_control_flow_is_refused_naming_the_model(registered, tmp_path, name, onnx_error):
    checkpoint = save_checkpoint(tmp_path / "ckpt", name, {"n_out": 8})
    with pytest.raises(SpeakeridError, match=rf"model {name} cannot be exported: .*control flow on tensor "
                                             rf"values or lengths \(test_export.py:\d+.*torch.where"):
        export_checkpoint(checkpoint, tmp_path / "ts", formats=("torchscript",), seconds=CHECK_SECONDS)
    with pytest.raises(SpeakeridError, match=onnx_error):
        export_checkpoint(checkpoint, tmp_path / "onnx", formats=("onnx",), seconds=CHECK_SECONDS)
    assert not (tmp_path / "ts" / "model.ts").exists() and not (tmp_path / "onnx" / "export.json").exists()


def test_an_export_that_differs_fails_verification_and_leaves_no_file(registered, tmp_path, capsys):
    checkpoint = save_checkpoint(tmp_path / "ckpt", "NoisyOutput", {"n_out": 8})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "export.json").write_text("{}")  # an earlier export's: it no longer describes the files
    assert main([str(checkpoint), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "max |Δ|" in err and "tolerance 0.0001" in err  # the table is printed before the refusal
    assert "error: model NoisyOutput: the export differs from PyTorch by more than the tolerance 0.0001 " in err
    assert "torchscript" in err.split("error:")[1] and "onnx" in err.split("error:")[1]
    assert "files were removed" in err and list((tmp_path / "out").iterdir()) == []


def test_a_voxceleb_trainer_model_file_exports_with_its_options(tmp_path, capsys):
    torch.manual_seed(1)
    model = build_model("ResNetSE34L", nOut=32, encoder_type="ASP").eval()
    torch.save({f"__S__.{k}": v for k, v in model.state_dict().items()}, tmp_path / "baseline.model")
    argv = [str(tmp_path / "baseline.model"), "--model", "ResNetSE34L", "--loss", "angleproto", "--option", "nOut=32",
            "--option", "encoder_type=ASP", "--format", "torchscript", "--out", str(tmp_path / "out")]
    assert main(argv) == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "out" / "export.json").read_text())
    assert meta["source"]["options"] == {"n_out": 32, "encoder_type": "ASP"} and meta["embedding_dim"] == 32
    assert meta["source"]["sha256"] == hashlib.sha256((tmp_path / "baseline.model").read_bytes()).hexdigest()
    waveform = 0.1 * torch.randn(1, 30_000)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(tmp_path / "out" / "model.ts"))(waveform), model(waveform), atol=1e-5)


def embeds(model: nn.Module, samples: int) -> bool:
    try:
        with torch.no_grad():
            return bool(torch.isfinite(model(0.1 * torch.randn(1, samples))).all())
    except (RuntimeError, ValueError, SpeakeridError):
        return False


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.filterwarnings("ignore:var\\(\\)")
def test_the_shortest_input_of_every_registered_model(name):
    """The dynamic time axis's lower bound: PyTorch gives a finite embedding there, and none 10 ms shorter."""
    model = build_model(name).eval()
    shortest = _min_samples(model, 16_000)
    assert 160 < shortest < 16_000
    assert embeds(model, shortest) and not embeds(model, shortest - 160)


def test_a_training_run_directory_exports_its_inference_export(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  name: ResNetSE34L\n")  # what marks a run directory
    assert main([str(run), "--format", "torchscript", "--out", str(tmp_path / "early")]) == 2
    assert "training run directory without an inference export" in capsys.readouterr().err
    save_checkpoint(run / "export", "ResNetSE34L", TINY["ResNetSE34L"])  # what training writes at each epoch end
    assert main([str(run), "--format", "torchscript", "--out", str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "export.json").read_text())
    assert meta["source"]["path"] == str(run / "export") and meta["source"]["model"] == "ResNetSE34L"


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "neither a speakerid checkpoint" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not weights")
    assert main([str(tmp_path / "notes.txt"), "--model", "ResNetSE34L", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "notes.txt: refused by torch.load" in err and "Traceback" not in err
    assert main([str(tmp_path / "notes.txt"), "--model", "ResNetSE34L", "--option", "nOut", "--out", "x"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_onnxruntime_names_the_extra_and_torchscript_needs_none(tmp_path):
    checkpoint = save_checkpoint(tmp_path / "ckpt", "ResNetSE34L", TINY["ResNetSE34L"])
    code = ("import sys; sys.modules['onnxruntime'] = None  # as if not installed\n"
            "from speakerid.export import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, str(checkpoint), "--out", str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "needs the onnxruntime package" in result.stderr
    assert "pip install 'speakerid-toolkit[export]'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    # TorchScript alone needs none of the export extra
    code = ("import sys; sys.modules.update(onnx=None, onnxscript=None, onnxruntime=None)\n"
            "from speakerid.export import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, str(checkpoint), "--out", str(tmp_path / "out"), "--format",
                             "torchscript"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["export.json", "model.ts"]


def test_the_front_door_imports_without_torch():
    """`speakerid export --help` (K's command builds every parser) must not pay for importing torch."""
    code = "import sys, speakerid.export as e; e.build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
