"""accelerate launch train from the checkout: the code is speakerid/cli/train.py (installed: speakerid train)."""

from speakerid.cli.train import build_parser, main  # noqa: F401  (build_parser: tests and the README check)

if __name__ == "__main__":
    from speakerid.runtime import exit_process

    exit_process(main())
