"""speakerid options (also python -m speakerid.config): every run-config key with its default and help, as the
Markdown tables of docs/options.md."""

from __future__ import annotations

import argparse
import sys

from speakerid.cli.help import HelpFormatter

PROG = "speakerid options"
DESCRIPTION = """\
Every config key of a training run (train's KEY=VALUE overrides and the YAML recipes' sections) with its default
and its help, as Markdown tables (docs/options.md is this output). The seeds' option names are shown beside the
keys they set."""
EXAMPLES = """\
examples:
  {prog}
  {prog} | grep optim.           (one section)
  speakerid train --config configs/demo.yaml optim.lr=0.01 train.max_epoch=5   (keys set on the command line)"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EXAMPLES.format(prog=prog),
                                   formatter_class=HelpFormatter)


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    build_parser(prog).parse_args(argv)
    from speakerid.config import option_reference

    sys.stdout.write(option_reference() + "\n")
    return 0
