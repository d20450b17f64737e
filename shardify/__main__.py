"""python -m shardify from the checkout: the code is speakerid/cli/shardify.py (installed: speakerid shardify)."""

import sys

from speakerid.cli.shardify import build_parser, main  # noqa: F401  (build_parser: tests and the README check)

if __name__ == "__main__":
    sys.exit(main())
