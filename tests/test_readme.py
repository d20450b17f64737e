"""The README front page and the docs/ pages: every command in their bash blocks parses with the real parsers (and
its keys exist), every relative link points to a file, the front page stays short and shows the three jobs, and
the "Adding a model or a loss" example trains."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from speakerid.cli import COMMANDS
from speakerid.config import load_config
from speakerid.errors import SpeakeridError

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PARSERS = {"shardify": "shardify.__main__", "evaluate": "evaluate.__main__", "train": "train.__main__",
           "speakerid.data.synthetic": "speakerid.data.synthetic.__main__", "speakerid.demo": "speakerid.demo",
           "speakerid.config": None, "speakerid.average": "speakerid.average", "speakerid.export": "speakerid.export"}
# `speakerid <sub> …` (the console command, or `python -m speakerid <sub>`) is the front door `python -m <module> …`
SUBCOMMANDS = {name: module for name, (module, _) in COMMANDS.items()}  # the dispatcher's own table
PARSERS.update({module: module for module in SUBCOMMANDS.values()})
# other programs' commands the pages may show; anything else in a bash block must be a speakerid command
EXTERNAL = {"pip", "accelerate", "tensorboard", "wandb", "nvidia-smi", "tar", "ls", "cat", "cd", "mkdir", "rm", "cp",
            "git", "curl", "wget", "sha256sum", "export", "source", "ffmpeg", "squeue", "scancel"}
ACCELERATE_VALUE_FLAGS = {"--num_processes", "--num_machines", "--machine_rank", "--main_process_ip",
                          "--main_process_port", "--config_file", "--mixed_precision", "--gpu_ids",
                          "--num_cpu_threads_per_process"}


def page_commands(page: Path) -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            command = re.sub(r"\s+#.*$", "", command).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def readme_commands() -> list[str]:
    return page_commands(REPO / "README.md")


ALL_COMMANDS = [pytest.param(command, id=f"{page.name}:{command[:60]}")
                for page in PAGES for command in page_commands(page)]


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
            rest = rest[2:] if rest[0] in ACCELERATE_VALUE_FLAGS else rest[1:]
        if rest[:1] == ["speakerid"]:  # accelerate launch $(which speakerid) train …
            argv = rest
        else:
            argv = ["python", "-m", *rest[1:]] if rest[:1] == ["-m"] else ["python", "-m", *rest]
    if argv[:3] == ["python", "-m", "speakerid"]:  # python -m speakerid <sub> … is the console command
        argv = argv[2:]
    if argv[:1] == ["speakerid"]:
        if argv[1:2] in (["--help"], ["-h"], ["--version"]):
            return
        assert argv[1:2] and argv[1] in SUBCOMMANDS, f"speakerid has no subcommand {argv[1:2]}: {command}"
        argv = ["python", "-m", SUBCOMMANDS[argv[1]], *argv[2:]]
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
    if argv[:1] == ["python3"]:
        argv = ["python", *argv[1:]]
    if argv[0] in EXTERNAL or argv[:2] == ["python", "-c"] or argv[:3] in tuple(["python", "-m", p] for p in ("pip", "venv", "build", "pytest")):
        return  # accelerate's own commands (accelerate config), installs, wheels, other programs
    assert argv[:2] == ["python", "-m"], f"unrecognised command: {command}"
    module, args = argv[2], argv[3:]
    assert module in PARSERS, f"the docs show python -m {module}, which is not a front door: {command}"
    if PARSERS[module] is None:
        assert not args, f"{module} takes no arguments: {command}"
        return
    parser = importlib.import_module(PARSERS[module]).build_parser()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            parsed = parser.parse_args(args)
    except SystemExit as exit_:
        if exit_.code == 0 and ({"-h", "--help"} & set(args)):
            return  # --help printed the usage
        raise AssertionError(f"command does not parse: {command}") from exit_
    if module in ("train", "speakerid.cli.train"):
        config = parsed.config and (str(REPO / parsed.config) if (REPO / parsed.config).exists() else parsed.config)
        load_config(config, parsed.overrides)  # every override names a real key


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_every_documented_command_parses(command):
    command = command.replace("$(which speakerid)", "speakerid").split(" | ")[0]  # a pipe's first command is ours
    _check(shlex.split(command.replace("$RANK", "0").replace("$HEAD", "127.0.0.1")), command)


def test_a_wrong_documented_command_fails_the_check():
    """The check is real: a misspelt flag or key, an unknown subcommand or front door each fail it."""
    for wrong in ("speakerid shardify pack --rooot audio --out shards", "speakerid evalute --checkpoint runs/x",
                  "accelerate launch -m speakerid train --config configs/demo.yaml optim.lrr=0.1",
                  "python -m trainer --config configs/demo.yaml", "speakerid options --all"):
        with pytest.raises((AssertionError, SpeakeridError)):
            _check(shlex.split(wrong), wrong)


def test_the_other_forms_of_a_command_are_checked_too():
    for right in ("speakerid shardify --help", "speakerid --help", "tensorboard --logdir runs/demo",
                  "accelerate launch --config_file a.yaml -m speakerid train --config configs/demo.yaml optim.lr=0.1",
                  "python3 -m shardify verify shards/vox2", "python -c 'import speakerid'"):
        _check(shlex.split(right), right)
    for wrong in ("speakerid", "speakerid shardify --rooot x --help", "unzip vox.zip",
                  "accelerate launch --config_file a.yaml -m speakerid train --config configs/demo.yaml optim.lrr=0.1"):
        with pytest.raises((AssertionError, SpeakeridError)):
            _check(shlex.split(wrong), wrong)


def test_the_readme_shows_the_three_jobs():
    commands = " ".join(readme_commands())
    for needed in ("make demo", "make test", "speakerid shardify pack", "accelerate launch -m speakerid train",
                   "speakerid evaluate"):
        assert needed in commands, f"README.md shows no {needed!r} command"


def test_the_readme_is_a_short_front_page():
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= 200, f"README.md has {lines} lines: move reference material to a page under docs/"


def test_the_readme_shows_the_python_api():
    text = (REPO / "README.md").read_text()
    for call in ("speakerid.load_model(", "model.embed(", "model.score(", "model.verify(", "model.score_trials("):
        assert call in text, f"README.md does not show {call}"


def test_the_readme_examples_of_a_new_model_and_loss_train(monkeypatch):
    """The two files shown under "Adding a model or a loss" (docs/layout.md), registered as it says, train a step."""
    import torch

    from speakerid.losses import LOSSES
    from speakerid.models import MODELS
    from speakerid.training import build_model_and_loss

    text = (REPO / "docs" / "layout.md").read_text()
    section = text[text.index("## Adding a model or a loss"):]
    model_code, loss_code = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    model_ns, loss_ns = {}, {}
    exec(compile(model_code, "docs/layout.md:tinycnn.py", "exec"), model_ns)
    exec(compile(loss_code, "docs/layout.md:cosproto.py", "exec"), loss_ns)
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


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces → hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    headings = re.findall(r"^#+\s+(.*?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def broken_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code is not Markdown
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s):, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        relative = file.relative_to(REPO).as_posix() if file.is_relative_to(REPO) else str(file)
        if not file.exists():
            broken.append(f"{target} (no file {relative})")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {relative})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_points_to_a_file(page):
    assert not broken_links(page), f"{page.relative_to(REPO)}: broken links {broken_links(page)}"


def test_the_link_check_finds_a_broken_link(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n")
    page = tmp_path / "README.md"
    page.write_text("[a](docs/a.md) [a](docs/a.md#a-page) [x](docs/x.md) [b](docs/a.md#nope)\n"
                    "```bash\n[not](a-link.md)\n```\n")
    assert broken_links(page) == ["docs/x.md (no file docs/x.md)", "docs/a.md#nope (no heading #nope in docs/a.md)"]



PYTHON_BLOCKS = [pytest.param(code, id=f"{page.name}:{i}") for page in PAGES
                 for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))]


@pytest.mark.parametrize("code", PYTHON_BLOCKS)
def test_every_python_example_is_valid_python(code):
    compile(code, "<docs>", "exec")  # a SyntaxError names the line; what they do is tested where they run
