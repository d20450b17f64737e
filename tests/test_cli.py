"""The `speakerid` command: every command's --help, the dispatcher's errors, and the installed wheel running the job
chain (and `accelerate launch`) from outside the checkout."""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from speakerid.cli import COMMANDS, run
from tests.conftest import REPO

# (argv before --help, the prog shown): every command, shardify's subcommands included.
HELPS = [(["shardify"], "speakerid shardify"), (["train"], "speakerid train"), (["evaluate"], "speakerid evaluate"),
         (["average"], "speakerid average"), (["options"], "speakerid options")]
HELPS += [(["shardify", sub], f"speakerid shardify {sub}")
          for sub in ("pack", "verify", "merge", "read", "calibration-trials")]
HELPS.append((["export"], "speakerid export"))


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        run([*argv, "--help"])
    assert exit_.value.code in (0, None), f"speakerid {' '.join(argv)} --help exited {exit_.value.code}"
    return capsys.readouterr().out


def _parser_of(argv: list[str]) -> argparse.ArgumentParser:
    """The real parser behind `speakerid ARGV`: the command module's, or one of shardify's subparsers."""
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    takes_prog = "prog" in inspect.signature(module.build_parser).parameters
    parser = module.build_parser(f"speakerid {argv[0]}") if takes_prog else module.build_parser()
    for name in argv[1:]:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _option_block(text: str, flag: str) -> str:
    """The lines --help prints for one option: its first line and the deeper-indented lines after it."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(flag + " ") or line.strip() == flag
                 or line.lstrip().startswith(flag + ","))
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith(" " * 8) or line.lstrip().startswith("-"):
            break
        block.append(line)
    return " ".join(block)


@pytest.mark.parametrize("argv, prog", HELPS, ids=[" ".join(a) for a, _ in HELPS])
def test_every_command_help_shows_defaults_examples_and_no_testing_flags(argv, prog, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # narrow: examples must still come out as written, not re-wrapped
    text = _help(argv, capsys)
    assert text.startswith(f"usage: {prog}")
    example_lines = [line for line in text.splitlines() if line.startswith(f"  {prog}")]
    assert example_lines, f"{prog} --help shows no example line"
    if argv != ["export"]:  # export takes a checkpoint, no config keys
        assert "speakerid options" in text  # where the config keys are
    assert "testing" not in text.lower()
    for action in _parser_of(argv)._actions:
        if action.help == argparse.SUPPRESS:  # hidden: not shown
            assert not any(flag in text for flag in action.option_strings), action.option_strings
        elif action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
            block = _option_block(text, action.option_strings[0])
            assert "default" in block, f"{prog} --help: {action.option_strings[0]} does not show its default: {block}"


def test_examples_are_printed_as_written(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    text = _help(["evaluate"], capsys)
    assert ("  speakerid evaluate --checkpoint CKPT --trials veri_test2.txt [list_test_all2.txt …] "
            "--audio ROOT_OR_SHARDS\n") in text
    assert "  speakerid evaluate --checkpoint baseline_lite_ap.model --model ResNetSE34L --loss angleproto \\\n" in text


def test_train_hides_its_testing_flag_but_accepts_it(capsys):
    text = _help(["train"], capsys)
    assert "--stop-after-steps" not in text
    args = _parser_of(["train"]).parse_args(["--stop-after-steps", "3", "optim.lr=0.1"])
    assert args.stop_after_steps == 3 and args.overrides == ["optim.lr=0.1"]


def test_top_level_help_lists_every_command_with_a_line_and_an_example(capsys):
    text = _help([], capsys)
    for name, (_, line) in COMMANDS.items():
        assert f"  {name}" in text and line in text
    assert "  speakerid train --config" in text and "accelerate launch -m speakerid train" in text


def test_unknown_or_missing_command_is_one_clear_error_listing_the_commands(capsys):
    cases = ((["trian"], "unknown command 'trian' (did you mean 'train'?)"), ([], "a command is required"))
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_:
            run(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert expected in err and "shardify, train, evaluate, average, export, options" in err


def test_a_subcommand_whose_module_is_missing_says_so(capsys, monkeypatch):
    monkeypatch.setitem(COMMANDS, "export", ("speakerid.no_such_export_module", "export"))
    with pytest.raises(SystemExit) as exit_:
        run(["export", "--help"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "'speakerid export' is not available" in err and "speakerid.no_such_export_module" in err


def test_options_lists_every_config_key(capsys):
    assert run(["options"]) == 0
    out = capsys.readouterr().out
    for key in ("`model.name`", "`optim.lr`", "`train.max_epoch`", "`data.train_shards`"):
        assert key in out


# ------------------------------------------------------------------------------------------ the installed wheel


def _dependencies_dir(tmp: Path) -> Path:
    """This interpreter's site-packages without speakerid itself (no editable finder, no dist-info): what the fresh
    venv sees through a .pth file, so that installing the wheel downloads nothing."""
    site = Path(sysconfig.get_paths()["purelib"])
    deps = tmp / "deps"
    deps.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("speakerid", "__editable__", "_speakerid")) or name.endswith(".pth"):
            continue
        (deps / entry.name).symlink_to(entry)
    return deps


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A wheel of the checkout installed into a fresh venv; (venv, environment for running it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"  # a copy, so that building leaves no build/ or egg-info in the checkout
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "speakerid", source / "speakerid", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", COLUMNS="200", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")

    def check(cmd, **kw):
        result = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=kw.pop("env", env), **kw)
        assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        return result

    check([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", source])
    wheel = next((tmp / "dist").glob("speakerid_toolkit-*.whl"))
    venv = tmp / "venv"
    check([sys.executable, "-m", "venv", "--without-pip", venv])
    purelib = check([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    (Path(purelib.stdout.strip()) / "speakerid_deps.pth").write_text(f"{_dependencies_dir(tmp)}\n")
    check([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", wheel])
    env = {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}"}
    return venv, env


def _run(cmd, env, cwd, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    if check:
        assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def _train_keys(shards: Path, run_dir: Path) -> list[str]:
    return [f"data.train_shards={shards}", f"train.run_dir={run_dir}", "batch_size=4", "max_frames=20",
            "model.options.n_out=32", "data.workers=0", "max_epoch=1", "train.mixed_precision=no"]


@pytest.fixture(scope="module")
def installed_shards(installed, corpus, tmp_path_factory):
    """The corpus packed by the installed `speakerid shardify pack`, run outside the checkout."""
    venv, env = installed
    work = tmp_path_factory.mktemp("installed_shards")
    shards = work / "shards"
    _run(["speakerid", "shardify", "pack", "--list", corpus.train_list, "--root", corpus.root, "--out", shards,
          "--chunk-size", "2", "--max-utts", "6"], env, work)
    return shards


def test_the_installed_command_runs_the_job_chain_outside_the_checkout(installed, installed_shards, corpus, tmp_path):
    venv, env = installed
    work = tmp_path / "work"  # outside the checkout: nothing of it is importable from here
    work.mkdir()
    where = _run([venv / "bin" / "python", "-c", "import speakerid; print(speakerid.__file__)"], env, work)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    assert shutil.which("speakerid", path=env["PATH"]) == str(venv / "bin" / "speakerid")
    site = Path(where.stdout.strip()).parents[1]
    assert not [name for name in ("train", "evaluate", "shardify") if (site / name).exists()]  # never shadow PyPI's

    top = _run(["speakerid", "--help"], env, work)
    assert all(name in top.stdout for name in COMMANDS)
    assert "`train.max_epoch`" in _run(["speakerid", "options"], env, work).stdout
    wrong = _run(["speakerid", "evalute"], env, work, check=False)
    assert wrong.returncode == 2 and "unknown command 'evalute'" in wrong.stderr and "evaluate" in wrong.stderr

    assert (installed_shards / "index.json").is_file()  # speakerid shardify pack
    # a recipe by name: the published recipes are installed with the package (no checkout here)
    trained = _run(["speakerid", "train", "--config", "demo", *_train_keys(installed_shards, work / "run")], env, work)
    assert "done: epoch 1" in trained.stderr
    evaluated = _run(["speakerid", "evaluate", "--checkpoint", work / "run", "--trials", corpus.trials,
                      "--audio", corpus.root, "--out", work / "eval", "--workers", "0"], env, work)
    assert "EER" in evaluated.stdout and (work / "eval" / "summary.json").is_file()


@pytest.mark.parametrize("how", ["-m speakerid", "$(which speakerid)"])
def test_accelerate_launch_trains_with_the_installed_command_on_two_processes(installed, installed_shards, tmp_path,
                                                                              how):
    venv, env = installed
    target = ["-m", "speakerid"] if how == "-m speakerid" else [venv / "bin" / "speakerid"]
    launch = [venv / "bin" / "python", "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]
    train = ["train", *_train_keys(installed_shards, tmp_path / "run"), "--stop-after-steps", "2"]
    result = _run([*launch, *target, *train], {**env, "ACCELERATE_USE_CPU": "true"}, tmp_path)
    output = result.stdout + result.stderr
    assert "step 2" in output, output
    checkpoint = next((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert (checkpoint / "model.safetensors").is_file()
    assert (checkpoint / "random_states_1.pkl").is_file()  # accelerate saved the second process's state: 2 ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hints_name_the_command_as_typed(corpus, tmp_path, capsys):
    """`speakerid shardify pack --part 0 --parts 2` says to run `speakerid shardify merge`, not the checkout's form."""
    code = run(["shardify", "pack", "--list", str(corpus.train_list), "--root", str(corpus.root),
                "--out", str(tmp_path / "shards"), "--chunk-size", "2", "--max-utts", "12", "--part", "0", "--parts", "2"])
    assert code == 0
    assert f"once every part is: speakerid shardify merge {tmp_path / 'shards'}" in capsys.readouterr().err


def test_top_level_help_does_not_import_torch():
    """`speakerid --help` and a mistyped command answer at once: no command module (nor torch) is imported."""
    code = ("import sys\nfrom speakerid.cli import run\nfor argv in (['--help'], ['trian']):\n"
            "    try:\n        run(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('speakerid.cli.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "['speakerid.cli.help']"
