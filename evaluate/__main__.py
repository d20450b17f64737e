"""python -m evaluate from the checkout: the code is speakerid/cli/evaluate.py (installed: speakerid evaluate)."""

from speakerid.cli.evaluate import build_parser, main  # noqa: F401  (build_parser: tests and the README check)

if __name__ == "__main__":
    from speakerid.runtime import exit_process

    exit_process(main())
