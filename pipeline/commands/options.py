"""Click options built from a config dataclass's fields: one declaration per setting.

A setting is declared once, as a field of its config (`TrainConfig`, `DenoiseConfig`,
`SweepConfig`): its name gives the option's name (`batch_size` -> `--batch-size`), its
type the option's type (a `bool` becomes `--x/--no-x`), its default the option's default,
and its `metadata` the rest:

    help          the help text; "{default}" in it shows the field's default
    choices       the values allowed (click.Choice)
    min, max      the range of a number (click.IntRange / click.FloatRange)
    flag_only     a bool field as a flag that only turns on (`--overwrite`), no `--no-...`
    names         the option's names when not `--field-name` (`--arch-arg`, an old alias)
    metavar, multiple   as click's
    argument      a positional argument with this metavar instead of an option
    show_default  with `left_out_is_none`: "[default: ...]" after the help text

`options_from(Config, ...)` returns one decorator adding these options in field order.
Two kinds of commands use it. `n2n denoise` takes the dataclass defaults as the options'
defaults (shown in `--help`). `n2n train` and `n2n sweep` merge the options over a config
file (or a saved sweep), so there an option left out is None (`left_out_is_none=True`) and
the dataclass default applies only when nothing else gives the value.
"""
from __future__ import annotations

import dataclasses
import types
import typing

import click

METADATA_KEYS = {"help", "choices", "min", "max", "flag_only", "names", "metavar", "multiple", "argument",
                 "show_default"}


def options_from(config_class, *, only=None, exclude=(), overrides=None, left_out_is_none: bool = False):
    """A decorator adding a click parameter for each field of `config_class` (all, those in
    `only`, less those in `exclude`), in field order. `overrides`: {field: click keyword
    arguments} for what one command does differently (say, `required=True`)."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    overrides = overrides or {}
    unknown = sorted((set(only or ()) | set(exclude) | set(overrides)) - set(fields))
    if unknown:
        raise ValueError(f"{config_class.__name__} has no fields {unknown}")
    hints = typing.get_type_hints(config_class)
    chosen = [f for name, f in fields.items() if (only is None or name in only) and name not in exclude]
    decorators = [_parameter(f, _base_type(hints[f.name]), left_out_is_none, overrides.get(f.name, {}))
                  for f in chosen]

    def decorate(command):
        for add in reversed(decorators):  # click lists a function's parameters bottom-up
            command = add(command)
        return command

    return decorate


def field_default(f: dataclasses.Field):
    """A field's default (None when it has none)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def shown(value) -> str:
    """A default as `--help` shows it: on/off for a flag, 900 for 900.0."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def option_names(f: dataclasses.Field) -> tuple[str, ...]:
    """The names of the option that field `f` declares (`--batch-size`; `--x/--no-x` for a bool)."""
    names = f.metadata.get("names") or (f"--{f.name.replace('_', '-')}",)
    return names


def _base_type(hint):
    """int for `int | None`; the hint itself otherwise."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        kinds = [k for k in typing.get_args(hint) if k is not type(None)]
        return kinds[0] if len(kinds) == 1 else hint
    return hint


def _parameter(f: dataclasses.Field, kind, left_out_is_none: bool, override: dict):
    spec = dict(f.metadata)
    unknown = sorted(set(spec) - METADATA_KEYS)
    if unknown:
        raise ValueError(f"field {f.name}: unknown option metadata {unknown} (known: {sorted(METADATA_KEYS)})")
    if "argument" in spec:
        return click.argument(f.name, metavar=spec["argument"], **override)
    default = field_default(f)
    text = spec.get("help", "").replace("{default}", shown(default))
    names = option_names(f)
    kwargs: dict = {}
    if kind is bool and spec.get("flag_only"):
        kwargs["is_flag"] = True
    elif kind is bool:
        names = tuple(f"{name}/--no-{name[2:]}" for name in names)
    elif "choices" in spec:
        kwargs["type"] = click.Choice(list(spec["choices"]))
    elif "min" in spec or "max" in spec:
        kwargs["type"] = (click.FloatRange if kind is float else click.IntRange)(spec.get("min"), spec.get("max"))
    elif kind in (int, float):
        kwargs["type"] = kind
    for key in ("metavar", "multiple"):
        if key in spec:
            kwargs[key] = spec[key]
    if left_out_is_none:
        if kind is bool:  # else a flag left out would be False (a value not given stays unset)
            kwargs["default"] = None
        if spec.get("show_default"):
            text += f" [default: {shown(default)}]"
    else:
        kwargs["default"] = default
        kwargs["show_default"] = default is not None and not kwargs.get("is_flag")
    if text:
        kwargs["help"] = text
    kwargs.update(override)
    return click.option(f.name, *names, **kwargs)
