"""Settings whose command-line options are derived from the dataclass that holds them.

A setting is declared once, as a dataclass field made by `setting(default, help, ...)`; `options(Cls, names)`
turns those fields into click options (flag, type, help and the `[default: ...]` shown, all read off the field)
and `from_options(Cls, values)` builds the dataclass from what the user gave, so a default is written in one
place and an option left out keeps it. Options reach the command under the field's name, so one command can
take several such groups as keyword arguments and hand each group to its dataclass.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import click

_CLI = "d2m.cli"


@dataclass(frozen=True)
class OptionSpec:
    help: str
    flag: str | None = None            # "--heal-tokens", or "--host-first/--route-first"; default: --field-name
    choices: tuple[str, ...] | None = None
    type: Any = None                   # a click type; default: from the field's annotation
    bounds: tuple[float, float] | None = None   # an inclusive range of a number
    default_text: str | None = None    # what `[default: ...]` says when the default is computed later


def setting(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, **spec) -> Any:
    """A dataclass field that is also a command-line option (`OptionSpec`'s fields as keywords)."""
    return field(default=default, default_factory=default_factory, metadata={_CLI: OptionSpec(help, **spec)})


def _field(cls, name: str) -> dataclasses.Field:
    try:
        return next(f for f in fields(cls) if f.name == name)
    except StopIteration:
        raise TypeError(f"{cls.__name__} has no field {name!r}") from None


def _base_type(cls, name: str):
    """The field's annotation with `| None` removed (dataclasses here use postponed annotations)."""
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


class CommaList(click.ParamType):
    """`4,6,8` -> (4, 6, 8): a tuple setting on the command line."""

    name = "LIST"

    def __init__(self, item: type):
        self.item = item

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(self.item(v.strip()) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r}: give comma-separated {self.item.__name__} values, e.g. 1,2,3", param, ctx)


def _to_enum(kind):
    return lambda ctx, param, value: None if value is None else kind(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def _default_text(f: dataclasses.Field, spec: OptionSpec) -> str | None:
    if spec.default_text is not None:
        return spec.default_text
    value = _default(f)
    if value is None:
        return None
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, bool):
        if spec.flag and "/" in spec.flag:
            on, off = spec.flag.split("/")
            return (on if value else off).lstrip("-")
        return None                    # a plain flag is off by default
    return str(value)


def make_option(cls, name: str) -> Callable:
    """The click option of one `setting` field of `cls`. Its default is None: an option left out is not passed
    on, so the dataclass keeps its own default."""
    f = _field(cls, name)
    spec: OptionSpec = f.metadata[_CLI]
    flag = spec.flag or "--" + name.replace("_", "-")
    base = _base_type(cls, name)
    help_text = spec.help
    shown = _default_text(f, spec)
    if shown is not None:
        help_text += f" [default: {shown}]"
    kwargs: dict[str, Any] = {"default": None, "help": help_text}
    if base is bool and "/" not in flag:
        kwargs.update(is_flag=True, default=None)
    elif spec.choices:
        kwargs["type"] = click.Choice(spec.choices)
    elif isinstance(base, type) and issubclass(base, enum.Enum):
        kwargs.update(type=click.Choice([m.value for m in base]), callback=_to_enum(base))
    elif typing.get_origin(base) is tuple:
        kwargs["type"] = CommaList(typing.get_args(base)[0])
    elif spec.type is not None:
        kwargs["type"] = spec.type
    elif spec.bounds is not None:
        kwargs["type"] = (click.FloatRange if base is float else click.IntRange)(*spec.bounds)
    elif base is Path:
        kwargs["type"] = click.Path(path_type=Path)
    elif base is not bool:
        kwargs["type"] = base
    return click.option(flag, name, **kwargs)


def options(cls, names: Iterable[str]) -> Callable:
    """Decorate a click command with the options of these fields of `cls` (in this order in --help)."""
    made = [make_option(cls, n) for n in names]

    def decorate(fn):
        for option in reversed(made):
            fn = option(fn)
        return fn
    return decorate


def from_options(cls, values: dict[str, Any], base: Any = None, **fixed) -> Any:
    """`base` (or `cls()`) with every `setting` of `cls` that `values` gives (not None) replaced, plus `fixed`.
    Other fields are never taken from `values`, so one command's option groups cannot leak into each other."""
    names = set(option_names(cls))
    given = {k: v for k, v in values.items() if k in names and v is not None}
    return replace(base if base is not None else cls(), **given, **fixed)


def option_names(cls) -> list[str]:
    """The fields of `cls` that are command-line settings, in declaration order."""
    return [f.name for f in fields(cls) if _CLI in f.metadata]
