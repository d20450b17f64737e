"""The ``speakerid`` command: one installed command whose subcommands are the front doors.

    speakerid shardify pack …   = python -m shardify pack …     (speakerid/cli/shardify.py)
    speakerid train …           = accelerate launch train …     (speakerid/cli/train.py)
    speakerid evaluate …        = python -m evaluate …          (speakerid/cli/evaluate.py)
    speakerid average …         = python -m speakerid.average …
    speakerid export …          = python -m speakerid.export …
    speakerid options           = python -m speakerid.config

Each subcommand's module has ``build_parser(prog)`` and ``main(argv=None, prog=…) -> int`` and does parsing and
printing only. The checkout's ``python -m shardify|train|evaluate`` are shims over the same modules; only
``speakerid`` is installed, so ``train`` and ``evaluate`` never shadow same-named PyPI packages. A module is
imported only when its subcommand runs, so ``speakerid --help`` stays quick.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import sys
from typing import NoReturn

from speakerid.cli.help import OPTIONS_POINTER, HelpFormatter

# name → (module with main(argv, prog), one line of what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "shardify": ("speakerid.cli.shardify", "pack audio into WebDataset tar shards; verify, merge and read them"),
    "train": ("speakerid.cli.train", "train a model from shards (one CPU … many nodes under accelerate launch)"),
    "evaluate": ("speakerid.cli.evaluate", "embed test audio, score trial lists: EER, minDCF, Cllr"),
    "average": ("speakerid.average", "average a run's last checkpoints into one inference checkpoint"),
    "export": ("speakerid.export", "export a checkpoint to TorchScript / ONNX, to run without speakerid"),
    "options": ("speakerid.cli.options", "list every config key with its default and help"),
}

EXAMPLES = """\
examples:
  speakerid shardify pack --list train_list.txt --root voxceleb2/dev/aac --out shards/vox2
  speakerid train --config configs/resnetse34l_angleproto.yaml data.train_shards=shards/vox2
  accelerate launch -m speakerid train --config configs/resnetse34l_angleproto.yaml     (every GPU)
  speakerid evaluate --checkpoint runs/resnetse34l_angleproto --trials veri_test2.txt --audio voxceleb1/wav
  speakerid average runs/resnetse34l_angleproto --last 3 --out runs/resnetse34l_angleproto/averaged
  speakerid options | grep optim.
  speakerid COMMAND --help                  (a command's own options, defaults and examples)

"""


def build_parser() -> argparse.ArgumentParser:
    from speakerid import __version__

    width = max(map(len, COMMANDS)) + 2
    listing = "\n".join(f"  {name:<{width}}{text}" for name, (_, text) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="speakerid", usage="%(prog)s [-h] [--version] COMMAND [ARGS …]", formatter_class=HelpFormatter,
        epilog=EXAMPLES + OPTIONS_POINTER,
        description="Train and evaluate speaker-recognition networks from WebDataset shards.\n\ncommands:\n" + listing)
    parser.add_argument("command", metavar="COMMAND", nargs="?", help=argparse.SUPPRESS)  # listed in the description
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def run(argv: list[str] | None = None) -> int:
    """Parse ``speakerid COMMAND …`` and run the command; its exit status."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    known = f"the commands are: {', '.join(COMMANDS)} (speakerid --help says what each does)"
    if args.command is None:
        parser.error(f"a command is required; {known}")
    if args.command not in COMMANDS:
        close = difflib.get_close_matches(args.command, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        parser.error(f"unknown command {args.command!r}{hint}; {known}")
    module_name, _ = COMMANDS[args.command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise  # a missing dependency of the module, with Python's own message
        parser.exit(2, f"speakerid: error: 'speakerid {args.command}' is not available in this installation: its "
                       f"module {module_name} is missing (a speakerid-toolkit older than the command?); "
                       "reinstall speakerid-toolkit from a current checkout or wheel\n")
    prog = f"speakerid {args.command}"
    if "prog" in inspect.signature(module.main).parameters:
        return module.main(args.args, prog=prog)
    return module.main(args.args)


def main(argv: list[str] | None = None) -> NoReturn:
    """The console script: run, then leave as the front doors do under ``accelerate launch`` (speakerid.runtime)."""
    code = run(argv)
    if "torch.distributed" in sys.modules:  # it may have run distributed: leave without gloo's exit abort
        from speakerid.runtime import exit_process

        exit_process(code)
    sys.exit(code)
