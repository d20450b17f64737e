"""What every command's ``--help`` shares: defaults shown, examples kept as written, the config keys pointed to."""

from __future__ import annotations

import argparse

OPTIONS_POINTER = ("Every config key (train's KEY=VALUE, the YAML recipes), with its default and help: "
                   "speakerid options, or docs/options.md.")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Description and epilog printed as written (examples are neither re-wrapped nor cut); an option's default is
    appended to its help unless the help already states it or there is none to state (None, False, [])."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or default is None or default is False or default == []
                or default is argparse.SUPPRESS or isinstance(action, argparse._StoreTrueAction)):
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text  # a required positional has no default
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def examples(lines: str, prog: str) -> str:
    """An epilog: the example lines with ``{prog}`` filled in, then the pointer to the config keys."""
    return "examples:\n" + lines.format(prog=prog).rstrip() + "\n\n" + OPTIONS_POINTER


def parser(prog: str, description: str, example_lines: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, epilog=examples(example_lines, prog),
                                   formatter_class=HelpFormatter)
