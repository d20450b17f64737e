"""accelerate launch train --config configs/X.yaml [key=value …]   (also: accelerate launch -m train …)

Trains any registered model with any registered loss from shards, on one CPU, one GPU, many GPUs or many
nodes, with the same command. Re-running it on an existing run directory resumes from the latest checkpoint.
Parsing and printing only: the work is done by speakerid.training.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.markup import escape

from speakerid.config import load_config
from speakerid.errors import SpeakeridError

console = Console(stderr=True, soft_wrap=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accelerate launch train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides, e.g. optim.lr=0.01 batch_size=100")
    parser.add_argument("--force", action="store_true", help="resume a run directory whose config differs")
    parser.add_argument("--stop-after-steps", type=int, help="checkpoint and exit after this many steps (testing)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
