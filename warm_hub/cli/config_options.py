"""Click options built from config dataclass fields: the field's default and `metadata["help"]` are the option's.

One home for a default, as mergekit builds its CLI from its options model: a default changed in the dataclass
changes the CLI, its `--help` and the Python API together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import click


def _field_name(param_decls: tuple[str, ...]) -> str:
    """The Python name click gives the option: an explicit name, else the first long flag in snake case."""
    for decl in param_decls:
        if not decl.startswith("-"):
            return decl
    long = next(decl for decl in param_decls if decl.startswith("--"))
    return long.split("/")[0].removeprefix("--").replace("-", "_")


def config_option(config: type, *param_decls: str, **attrs: Any) -> Callable:
    """`click.option(*param_decls, **attrs)` taking default and help from the `config` field it fills.

    Args:
        config: the dataclass whose field the option sets (named by `param_decls` as click names it).
        *param_decls: the option's flags, and its Python name when that differs from the flag.
        **attrs: other `click.option` settings; an explicit `default` or `help` wins over the field's.

    Returns:
        The click decorator. A `multiple` option gets no click default (an empty tuple means "not given"); its
        help says the field's default instead.
    """
    spec = config.__dataclass_fields__[_field_name(param_decls)]
    help_text = attrs.pop("help", spec.metadata["help"])
    if spec.default is not dataclasses.MISSING:
        default = spec.default
    elif spec.default_factory is not dataclasses.MISSING:
        default = spec.default_factory()
    else:
        default = None  # a required field: the option is required too, or the dataclass refuses the call
    if attrs.get("multiple"):
        if default:
            help_text += f"  [default: {','.join(str(value) for value in default)}]"
    else:
        attrs.setdefault("default", default)
    return click.option(*param_decls, help=help_text, **attrs)


__all__ = ["config_option"]
