"""speakerid average (also python -m speakerid.average): average the model weights of a run's last checkpoints into
an inference checkpoint.

Parsing and printing only: the work is done by speakerid.training.average.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from speakerid.cli.help import parser as help_parser
from speakerid.errors import SpeakeridError

console = Console(stderr=True, soft_wrap=True)


PROG = "python -m speakerid.average"
DESCRIPTION = "Average the model weights of a run's last checkpoints into an inference checkpoint."
EXAMPLES = """\
  {prog} RUN_DIR --last 3 --out RUN_DIR/averaged
  {prog} RUN_DIR --checkpoints step-00012000 step-00013000 --out DIR
  speakerid evaluate --checkpoint RUN_DIR/averaged --trials … --audio …     (then evaluate it)"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = help_parser(prog, DESCRIPTION, EXAMPLES)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the training run directory (train.run_dir)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--last", type=int, metavar="K",
                       help="the run's newest K complete checkpoints (it keeps train.keep_checkpoints of them)")
    which.add_argument("--checkpoints", nargs="+", metavar="CKPT",
                       help="chosen checkpoints: paths, or names under RUN_DIR/checkpoints (step-NNNNNNNN)")
    parser.add_argument("--out", required=True, help="the inference checkpoint directory to write")
    return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        from speakerid.training.average import average_checkpoints

        result = average_checkpoints(args.run_dir, args.out, last=args.last, chosen=args.checkpoints or [])
    except SpeakeridError as error:
        console.print(f"[red]error:[/] {escape(str(error))}", highlight=False)
        return 2
    evaluate = "speakerid evaluate" if prog.startswith("speakerid") else "python -m evaluate"
    for checkpoint, step, epoch in zip(result.checkpoints, result.steps, result.epochs):
        console.print(escape(f"  {checkpoint}  (epoch {epoch}, step {step})"), highlight=False)
    console.print(escape(f"averaged {len(result.checkpoints)} checkpoint(s) → {result.path}; evaluate it with "
                         f"{evaluate} --checkpoint {result.path} …"), highlight=False)
    return 0


if __name__ == "__main__":
    from speakerid.runtime import exit_process

    exit_process(main())
