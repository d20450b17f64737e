"""Keyword options that arrive from YAML and the command line, checked against a constructor's annotations."""

from __future__ import annotations


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
