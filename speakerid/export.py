"""python -m speakerid.export: a checkpoint → TorchScript and ONNX files that run without speakerid (front-end included).

    python -m speakerid.export runs/resnet34 --out runs/resnet34/portable
    python -m speakerid.export runs/resnet34 --out DIR --format onnx --opset 18
    python -m speakerid.export baseline_lite_ap.model --model ResNetSE34L --option nOut=512 --out DIR

Each file takes a float32 waveform batch ``(batch, time)`` at the checkpoint's sample rate (full scale, [-1, 1))
and returns embeddings ``(batch, D)``; batch and time are dynamic. ``export.json`` beside them records the
sample rate, embedding size, input/output names, opset, the source checkpoint's sha256 and the differences
measured against the PyTorch model: every export is run on noise of several lengths (none of them the
length traced) and refused when a unit-norm embedding differs by more than the tolerance.

TorchScript is ``torch.jit.trace``: every registered model traces, while ``torch.jit.script`` refuses the
front-ends' plain Python (e.g. ``torch.finfo`` in the Kaldi fbank).
ONNX uses the dynamo exporter (``torch.onnx.export(dynamo=True)``): the TorchScript-based exporter cannot
export ``torch.stft`` with complex output, which the seeds' mel front-ends use.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from speakerid.cli.help import parser as help_parser
from speakerid.errors import SpeakeridError

if TYPE_CHECKING:
    from torch import Tensor, nn
# torch is imported inside the functions that use it: `speakerid export --help` stays instant

console = Console(stderr=True, soft_wrap=True)

FORMATS = ("torchscript", "onnx")
FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
EXPORTERS = {"torchscript": "torch.jit.trace", "onnx": "torch.onnx.export(dynamo=True)"}
META_NAME = "export.json"
INPUT_NAME, OUTPUT_NAME = "waveform", "embedding"
DEFAULT_OPSET = 18  # the dynamo exporter's own opset; STFT and DFT are in ONNX since opset 17
# max |difference| between unit-norm embeddings of the export and of PyTorch; measured ≤ 3.5e-7 for every
# registered model on CPU (docs/export.md), so 1e-4 leaves room for other CPUs and onnxruntime versions
DEFAULT_TOLERANCE = 1e-4
TRACE_SECONDS = 2.0  # the example traced; verification uses other lengths, so a length baked into the trace shows
VERIFY_SECONDS = (0.5, 1.3, 3.0, 7.1)
EXTRA_HINT = "pip install 'speakerid-toolkit[export]'"


@dataclass
class LengthCheck:
    seconds: float
    samples: int
    differences: dict[str, float] = field(default_factory=dict)  # format → max abs diff of unit-norm embeddings
    skipped: str = ""  # why PyTorch itself cannot embed this length (a model's minimum input)


@dataclass
class ExportResult:
    directory: Path
    files: dict[str, Path]
    checks: list[LengthCheck]
    meta: dict


def _require_onnx() -> None:
    """onnx, onnxscript (the dynamo exporter's back end) and onnxruntime (verification), or one clear error."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError as error:
            raise SpeakeridError(f"--format onnx needs the {module} package, which is not installed ({error}); "
                                 f"install the export extra: {EXTRA_HINT} (or export --format torchscript only)"
                                 ) from error


def _noise(batch: int, samples: int, seed: int) -> Tensor:
    import torch
    generator = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(batch, samples, generator=generator)  # speech-like level at full scale


def _unit(embeddings: Tensor) -> Tensor:
    import torch
    return torch.nn.functional.normalize(embeddings.to(torch.float32), dim=-1)


def export_torchscript(model: nn.Module, name: str, example: Tensor, path: Path) -> None:
    """``torch.jit.trace`` → ``path``. Python control flow on tensor values is refused: a trace keeps one branch."""
    import torch
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always", torch.jit.TracerWarning)
        try:
            traced = torch.jit.trace(model, (example,), check_trace=False)
        except Exception as error:  # any tracing failure is this model's, reported with what to do
            raise SpeakeridError(f"model {name} cannot be traced to TorchScript: {type(error).__name__}: "
                                 f"{_first_line(error)}. Make its forward plain tensor operations, or export "
                                 "--format onnx only") from error
    # torch's own input checks (e.g. instance_norm's spatial size) warn too and are harmless: only model code counts
    torch_dir = str(Path(torch.__file__).parent)
    tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)
              and not str(w.filename).startswith(torch_dir)]
    if tracer:
        where = f"{Path(tracer[0].filename).name}:{tracer[0].lineno}"
        raise SpeakeridError(
            f"model {name} cannot be exported: its forward has Python control flow on tensor values or lengths "
            f"({where}: {_first_line(tracer[0].message)}), so a trace would keep the branch of the example only. "
            "Rewrite it with tensor operations (torch.where, masks) and export again")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(traced, str(path))


def export_onnx(model: nn.Module, name: str, example: Tensor, path: Path, opset: int, min_samples: int) -> None:
    """The dynamo exporter with dynamic batch and time axes → one self-contained ``path`` (weights inside)."""
    import torch
    _require_onnx()
    batch, time = torch.export.Dim("batch", min=1), torch.export.Dim("time", min=min_samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings(), _quiet("torch.onnx", "torch.export", "torch._dynamo"):
            warnings.simplefilter("ignore")  # the exporter's chatter (torchvision absent, deprecations); failures raise
            torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes={INPUT_NAME: {0: batch, 1: time}}, opset_version=opset, dynamo=True,
                              external_data=False, verbose=False)
    except Exception as error:  # torch.export's and onnxscript's errors alike: name the model and the way out
        raise SpeakeridError(
            f"model {name} cannot be exported to ONNX with a dynamic time axis: {type(error).__name__}: "
            f"{_first_line(error)}. The usual cause is Python control flow on tensor values or lengths in its "
            "forward (rewrite it with tensor operations: torch.where, masks), or an operator ONNX opset "
            f"{opset} lacks (try --opset with a newer one). --format torchscript exports without ONNX") from error


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _first_line(message: object) -> str:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


def _runners(files: dict[str, Path]) -> dict[str, object]:
    """Each written file, loaded back the way a user would: torch.jit.load, onnxruntime.InferenceSession."""
    import torch
    runners: dict[str, object] = {}
    if "torchscript" in files:
        module = torch.jit.load(str(files["torchscript"]), map_location="cpu")
        runners["torchscript"] = lambda w: module(w)
    if "onnx" in files:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
        runners["onnx"] = lambda w: torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: w.numpy()})[0])
    return runners


def verify(model: nn.Module, files: dict[str, Path], sample_rate: int, seconds: tuple[float, ...],
           shortest: int | None = None, batch: int = 2) -> list[LengthCheck]:
    """Max abs difference of unit-norm embeddings, export vs PyTorch, on noise of each length.

    ``shortest`` (samples), when given, is checked first: the dynamic axis's lower bound must work too.
    """
    import torch
    runners = _runners(files)
    checks = []
    lengths = [round(length * sample_rate) for length in seconds]
    for i, samples in enumerate(([shortest] if shortest else []) + lengths):
        length = samples / sample_rate
        check = LengthCheck(length, samples)
        waveform = _noise(batch, check.samples, seed=1000 + i)
        try:
            with torch.no_grad():
                reference = _unit(model(waveform))
        except (RuntimeError, ValueError, SpeakeridError) as error:  # too short for this architecture even in PyTorch
            check.skipped = f"PyTorch rejects it: {_first_line(error)}"
            checks.append(check)
            continue
        for fmt, run in runners.items():
            try:
                with torch.no_grad():
                    exported = _unit(run(waveform))
                check.differences[fmt] = float((exported - reference).abs().max()) if exported.shape == \
                    reference.shape else float("inf")
            except Exception as error:  # a fixed length baked into the file fails here: report, do not hide
                raise SpeakeridError(f"{files[fmt]}: the exported model fails on {check.samples} samples "
                                     f"({length} s) where PyTorch runs: {type(error).__name__}: {_first_line(error)}. "
                                     "Its forward probably depends on the input length in Python; rewrite that "
                                     "part with tensor operations") from error
        checks.append(check)
    return checks


def checks_table(checks: list[LengthCheck], formats: list[str], tolerance: float) -> Table:
    table = Table(title=f"export vs PyTorch: max |Δ| of unit-norm embeddings (tolerance {tolerance:g})")
    table.add_column("length", justify="right")
    table.add_column("samples", justify="right")
    for fmt in formats:
        table.add_column(fmt, justify="right")
    for check in checks:
        if check.skipped:
            skipped = [escape(check.skipped)] + [""] * (len(formats) - 1)
            table.add_row(f"{check.seconds:.3g} s", str(check.samples), *skipped)
            continue
        cells = []
        for fmt in formats:
            value = check.differences[fmt]
            colour = "green" if value <= tolerance else "red"
            cells.append(f"[{colour}]{value:.2e}[/]")
        table.add_row(f"{check.seconds:.3g} s", str(check.samples), *cells)
    return table


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, formats: tuple[str, ...] = FORMATS,
                      opset: int = DEFAULT_OPSET, tolerance: float = DEFAULT_TOLERANCE,
                      seconds: tuple[float, ...] = VERIFY_SECONDS, model: str | None = None,
                      loss: str | None = None, options: dict | None = None,
                      console: Console | None = None) -> ExportResult:
    """Export ``checkpoint`` (anything ``load_inference_checkpoint`` reads) to ``out``, verified; see the module doc."""
    import torch
    from speakerid.inference import WEIGHTS_NAME, _sha256, load_inference_checkpoint

    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise SpeakeridError(f"--format {' '.join(unknown) or '(none)'}: choose from {', '.join(FORMATS)}")
    if "onnx" in formats:
        _require_onnx()  # before the slow part
    loaded = load_inference_checkpoint(checkpoint, model=model, loss=loss, options=options)
    network, name = loaded.model.eval(), loaded.meta["model"]["name"]
    sample_rate = int(loaded.meta.get("sample_rate", 16000))
    weights = loaded.source / WEIGHTS_NAME if loaded.source.is_dir() else loaded.source
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SpeakeridError(f"--out {out}: exists and is not a directory; name a directory to write the exports in")
    example = _noise(2, round(TRACE_SECONDS * sample_rate), seed=0)
    min_samples = _min_samples(network, sample_rate)
    files = {fmt: out / FILES[fmt] for fmt in formats}
    (out / META_NAME).unlink(missing_ok=True)  # it described the files about to be replaced
    try:
        checks, worst = _write_and_verify(network, name, files, example, opset, min_samples, sample_rate, seconds,
                                          tolerance, console)
    except SpeakeridError:
        for path in files.values():
            path.unlink(missing_ok=True)  # a half-written export, or one that does not match its model, is not used
        raise
    meta = {
        "format": "speakerid-export", "version": 1,
        "files": {fmt: FILES[fmt] for fmt in formats},
        "sample_rate": sample_rate,
        "embedding_dim": int(loaded.meta.get("embedding_dim") or 0) or _embedding_dim(network, sample_rate),
        "input": {"name": INPUT_NAME, "shape": ["batch", "time"], "dtype": "float32",
                  "scale": "full scale: int16 samples / 32768", "min_samples": min_samples},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", "embedding_dim"], "dtype": "float32",
                   "normalize_before_scoring": loaded.test_normalize},
        "opset": opset if "onnx" in formats else None,
        "exporters": {fmt: EXPORTERS[fmt] for fmt in formats},
        "torch_version": torch.__version__,
        "source": {"path": str(loaded.source), "sha256": _sha256(weights), "model": name,
                   "options": loaded.meta["model"].get("options", {}), "loss": loaded.meta["loss"].get("name")},
        "tolerance": {"metric": "max abs difference of unit-norm embeddings vs PyTorch", "bound": tolerance,
                      "measured": worst},
        "verification": [{"seconds": round(c.seconds, 4), "samples": c.samples, **c.differences,
                          **({"skipped": c.skipped} if c.skipped else {})} for c in checks],
    }
    from speakerid.data.index import write_json_atomic

    write_json_atomic(out / META_NAME, meta)
    return ExportResult(out, files, checks, meta)


def _write_and_verify(network: nn.Module, name: str, files: dict[str, Path], example: Tensor, opset: int,
                      min_samples: int, sample_rate: int, seconds: tuple[float, ...], tolerance: float,
                      console: Console | None) -> tuple[list[LengthCheck], dict[str, float]]:
    """Write each file, run it at every length, print the table; SpeakeridError when a difference is too large."""
    if "torchscript" in files:
        export_torchscript(network, name, example, files["torchscript"])
    if "onnx" in files:
        export_onnx(network, name, example, files["onnx"], opset, min_samples)
    checks = verify(network, files, sample_rate, seconds, shortest=min_samples)
    if console is not None:
        console.print(checks_table(checks, list(files), tolerance))
    measured = [c for c in checks if not c.skipped]
    if not measured:
        raise SpeakeridError(f"model {name}: none of the verification lengths {seconds} s runs in PyTorch; "
                             "give longer ones")
    worst = {fmt: max(c.differences[fmt] for c in measured) for fmt in files}
    failed = {fmt: value for fmt, value in worst.items() if not value <= tolerance}
    if failed:
        detail = ", ".join(f"{fmt} {value:.2e}" for fmt, value in failed.items())
        raise SpeakeridError(
            f"model {name}: the export differs from PyTorch by more than the tolerance {tolerance:g} ({detail}; "
            "table above); the files were removed. The usual cause is a forward that depends on the input length "
            "in Python (a trace keeps the traced length's branch); rewrite it with tensor operations. --tolerance "
            "raises the bound if the difference is numerical")
    return checks, worst


def _embedding_dim(network: nn.Module, sample_rate: int) -> int:
    import torch
    with torch.no_grad():
        return int(network(_noise(1, sample_rate, seed=0)).shape[-1])


def _min_samples(network: nn.Module, sample_rate: int) -> int:
    """The shortest input the PyTorch model embeds (finite output), to 10 ms: the dynamic axis's lower bound."""
    import torch
    step = sample_rate // 100
    low, high = 0, sample_rate  # every registered model embeds one second
    while high - low > step:
        middle = (low + high) // 2
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. var() over one frame: the NaN it gives is checked below
                embeds = bool(torch.isfinite(network(_noise(1, middle, seed=0))).all())
        except (RuntimeError, ValueError, SpeakeridError):
            embeds = False
        low, high = (low, middle) if embeds else (middle, high)
    return high


PROG = "python -m speakerid.export"
EXAMPLES = """\
  {prog} runs/resnet34 --out runs/resnet34/portable
  {prog} runs/resnet34 --out DIR --format onnx --opset 18
  {prog} baseline_lite_ap.model --model ResNetSE34L --option nOut=512 --out DIR   (a voxceleb_trainer file)"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = help_parser(prog, __doc__.split("\n\n")[0].split(": ", 1)[1], EXAMPLES)
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a speakerid checkpoint directory, a training run directory, or a voxceleb_trainer "
                             ".model file (with --model)")
    parser.add_argument("--out", required=True, help="the directory to write model.ts, model.onnx and export.json in")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS), dest="formats",
                        help="which files to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest accepted max abs difference of unit-norm embeddings vs PyTorch")
    parser.add_argument("--model", help="architecture of a voxceleb_trainer .model file (e.g. ResNetSE34L)")
    parser.add_argument("--loss", help="loss of a voxceleb_trainer .model file (sets whether to normalise)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="model option of a voxceleb_trainer .model file (e.g. nOut=512); repeatable")
    return parser


def _parse_options(pairs: list[str]) -> dict:
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SpeakeridError(f"--option {pair!r}: expected KEY=VALUE (e.g. --option nOut=512)")
        options[key] = yaml.safe_load(value)
    return options


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        result = export_checkpoint(args.checkpoint, args.out, formats=tuple(args.formats), opset=args.opset,
                                   tolerance=args.tolerance, model=args.model, loss=args.loss,
                                   options=_parse_options(args.option), console=console)
    except SpeakeridError as error:
        console.print(f"[red]error:[/] {escape(str(error))}", highlight=False)
        return 2
    for fmt, path in result.files.items():
        console.print(escape(f"  {fmt:<12} {path}"), highlight=False)
    console.print(escape(f"wrote {result.directory / META_NAME}: input {INPUT_NAME!r} (batch, time) float32 at "
                         f"{result.meta['sample_rate']} Hz → output {OUTPUT_NAME!r} (batch, "
                         f"{result.meta['embedding_dim']})"), highlight=False)
    return 0


if __name__ == "__main__":
    from speakerid.runtime import exit_process

    exit_process(main())
