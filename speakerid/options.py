"""Options that arrive from YAML and the command line: declared with their help, checked against annotations."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def option(default: Any, help: str, **kw) -> Any:
    """A dataclass field with its help text (kept in metadata for the generated option reference and flags).

    ``seed="nPerSpeaker"`` names the seeds' spelling of the option, accepted as an alias wherever it is read.
    """
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def fits_annotation(value: object, annotation: object) -> bool:
    """Whether ``value`` is what a plain ``bool``/``int``/``float``/``str`` annotation asks for (an int is a float;
    any other annotation accepts anything). YAML and overrides can hand over "512" or 1 where 512 or True is
    meant: the registries refuse rather than guess."""
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True
