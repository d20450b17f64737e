"""speakerid train (checkout: accelerate launch train): train a model from shards, resuming a run directory.

Trains any registered model with any registered loss from shards, on one CPU, one GPU, many GPUs or many
nodes, with the same command. Re-running it on an existing run directory resumes from the latest checkpoint.
Parsing and printing only: the work is done by speakerid.training.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from speakerid.cli.help import parser as help_parser
from speakerid.config import load_config
from speakerid.errors import SpeakeridError

console = Console(stderr=True, soft_wrap=True)


PROG = "accelerate launch train"
DESCRIPTION = """\
Train any registered model with any registered loss from shards, on one CPU, one GPU, many GPUs or many nodes,
with the same command. Re-running it on an existing run directory resumes from its latest checkpoint."""
EXAMPLES = """\
  {prog} --config configs/resnetse34l_angleproto.yaml
  {prog} --config configs/demo.yaml data.train_shards=SHARD_DIR optim.lr=0.01 batch_size=100
  {prog} data.train_shards=SHARD_DIR model.name=ResNetSE34V2 loss.name=softmaxproto   (no YAML: defaults + keys)
  accelerate launch -m speakerid train --config configs/X.yaml      (every GPU of this machine)
  accelerate launch $(which speakerid) train --config configs/X.yaml"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = help_parser(prog, DESCRIPTION, EXAMPLES)
    parser.add_argument("--config", help="YAML recipe: a file, or the name of an installed recipe (resnet34_aamsoftmax; the checkout's "
                        "configs/ holds the same files); without it, the defaults of speakerid options")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. optim.lr=0.01 batch_size=100 (all: speakerid options)")
    parser.add_argument("--force", action="store_true", help="resume a run directory whose config differs")
    # Testing only (accepted, not shown): checkpoint and exit after this many steps.
    parser.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        from speakerid.training import train

        config = load_config(args.config, args.overrides)
        result = train(config, force=args.force, stop_after_steps=args.stop_after_steps)
    except SpeakeridError as error:
        console.print(f"[red]error:[/] {escape(str(error))}", highlight=False)
        return 2
    state = "stopped by signal; re-run the same command to resume" if result.stopped_by_signal else "done"
    console.print(escape(f"{state}: epoch {result.progress.epoch}, step {result.progress.step}, "
                         f"last loss {result.last_loss:.4f}, run directory {result.run_dir}"), highlight=False)
    return 0


if __name__ == "__main__":
    from speakerid.runtime import exit_process

    exit_process(main())
