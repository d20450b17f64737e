"""Every command shown in the README's code blocks parses with the real parsers (and its keys exist)."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from speakerid.config import load_config
from speakerid.errors import SpeakeridError

REPO = Path(__file__).resolve().parents[1]
PARSERS = {"shardify": "shardify.__main__", "evaluate": "evaluate.__main__", "train": "train.__main__",
           "speakerid.data.synthetic": "speakerid.data.synthetic.__main__", "speakerid.demo": "speakerid.demo",
           "speakerid.config": None, "speakerid.average": "speakerid.average"}


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            command = re.sub(r"\s+#.*$", "", command).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def _check(argv: list[str], command: str) -> None:
    argv = [a for a in argv if a not in ("…", "...")]
    while argv and re.fullmatch(r"[A-Z_]+=.*", argv[0]):  # leading VAR=value environment assignments
        argv = argv[1:]
    if argv[:1] == ["sbatch"]:
        scripts = [a for a in argv if a.endswith(".sbatch")]
        assert scripts and all((REPO / s).is_file() for s in scripts), f"no such Slurm script: {command}"
        return
    if argv[:2] == ["accelerate", "launch"]:
        rest = argv[2:]
        while rest and rest[0].startswith("-") and rest[0] != "-m":  # accelerate's own flags and their values
            rest = rest[2:] if rest[0] in ("--num_processes", "--num_machines", "--machine_rank", "--main_process_ip") else rest[1:]
        argv = ["python", "-m", *rest[1:]] if rest[:1] == ["-m"] else ["python", "-m", *rest]
    if argv[0] == "make":
        makefile = (REPO / "Makefile").read_text()
        for target in argv[1:]:
            if "=" not in target:
                assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), f"no make target {target!r}: {command}"
        return
    if argv[:1] == ["python"] and argv[1].startswith("benchmarks/"):
        result = subprocess.run([sys.executable, argv[1], "--help"], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, f"{command}: {result.stderr}"
        return
    if argv[:1] == ["accelerate"] or argv[:2] == ["pip", "install"]:
        return  # accelerate's own commands (accelerate config), installs
    assert argv[:2] == ["python", "-m"], f"unrecognised README command: {command}"
    module, args = argv[2], argv[3:]
    assert module in PARSERS, f"README shows python -m {module}, which is not a front door: {command}"
    if PARSERS[module] is None:
        return
    parser = importlib.import_module(PARSERS[module]).build_parser()
    try:
        parsed = parser.parse_args(args)
    except SystemExit as exit_:
        raise AssertionError(f"README command does not parse: {command}") from exit_
    if module == "train":
        config = parsed.config and str(REPO / parsed.config)
        load_config(config, parsed.overrides)  # every override names a real key


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    _check(shlex.split(command.replace("$RANK", "0").replace("$HEAD", "127.0.0.1")), command)


def test_the_readme_shows_the_three_jobs():
    commands = " ".join(readme_commands())
    for needed in ("make demo", "make test", "python -m shardify pack", "accelerate launch train", "python -m evaluate"):
        assert needed in commands


def test_the_readme_examples_of_a_new_model_and_loss_train(monkeypatch):
    """The two files shown under "Adding a model or a loss", registered as the README says, train a step."""
    import torch

    from speakerid.losses import LOSSES
    from speakerid.models import MODELS
    from speakerid.training import build_model_and_loss

    text = (REPO / "README.md").read_text()
    section = text[text.index("### Adding a model or a loss"):text.index("## Benchmarks")]
    model_code, loss_code = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    model_ns, loss_ns = {}, {}
    exec(compile(model_code, "README:tinycnn.py", "exec"), model_ns)
    exec(compile(loss_code, "README:cosproto.py", "exec"), loss_ns)
    monkeypatch.setitem(MODELS, "TinyCNN", model_ns["TinyCNN"])
    monkeypatch.setitem(LOSSES, "cosproto", loss_ns["CosProto"])

    config = load_config(None, ["model.name=TinyCNN", "model.options.n_out=32", "loss.name=cosproto",
                                "loss.options.scale=20", "data.n_speakers=4", "data.utts_per_speaker=2"])
    model, loss = build_model_and_loss(config, n_classes=10)
    torch.manual_seed(0)
    waveforms = 0.1 * torch.randn(8, 16240)
    value, accuracy = loss(model(waveforms).reshape(4, 2, -1), torch.arange(4))
    value.backward()
    assert torch.isfinite(value) and 0 <= accuracy <= 100
    assert all(p.grad is not None for p in model.fc.parameters())
    with pytest.raises(SpeakeridError, match="scale"):  # options are type-checked like the built-in ones
        build_model_and_loss(load_config(None, ["model.name=TinyCNN", "loss.name=cosproto",
                                                "loss.options.scale=loud"]), n_classes=10)
