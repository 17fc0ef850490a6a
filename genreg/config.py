"""Config dataclasses -> command-line flags (and back): scripts, the CLI and the app read the same definitions.

Each field carries its help text in ``metadata["help"]``; flags keep the field names, as diffusers' example scripts
do (``--learning_rate``, ``--max_train_steps``). Validation lives in each dataclass's ``__post_init__``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with help text and surface metadata: ``choices=``; ``place=`` "main" (default),
    "advanced" or "hidden" (where the app shows it; hidden fields are not shown); ``aliases=`` extra command-line
    spellings; and form hints (``labels``, ``minimum``/``maximum``/``step``, ``lines``, and ``file_types`` for a
    path to a file the user brings: the app asks for an upload of those types)."""
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return dataclasses.field(**factory, metadata={"help": help, **kwargs})


def field_type(annotation: Any) -> tuple[type, bool]:
    """(scalar type, takes several) of an annotation: ``int``, ``int | None``, ``list[str]``, ``tuple[int, ...]``,
    ``str | list[str]`` (one or several)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        many = [a for a in args if typing.get_origin(a) in (list, tuple)]
        if many:
            return typing.get_args(many[0])[0], True
        return args[0], False
    if typing.get_origin(annotation) in (list, tuple):
        return args[0], True
    return annotation, False


def may_be_none(annotation: Any) -> bool:
    """Whether an annotation such as ``int | None`` or ``list[str] | None`` admits None (an unset value)."""
    return type(None) in typing.get_args(annotation)


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    skip: tuple[str, ...] = (),
    dashes: bool = False,
    unset_is_none: bool = False,
    positional: tuple[str, ...] = (),
) -> None:
    """One ``--flag`` per field of dataclass ``cls`` (booleans become ``--flag/--no-flag``), plus the field's
    ``aliases``; fields named in ``positional`` become positional arguments.

    ``dashes`` accepts ``--like-this`` beside diffusers' ``--like_this``; ``unset_is_none`` leaves flags the user did
    not give as None, so that a preset's values survive (see :func:`given`).
    """
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind, many = field_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"default": None if unset_is_none else default, "help": f.metadata.get("help", "")}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if many:
                kwargs["nargs"] = "+"
        if f.name in positional:
            group.add_argument(f.name, metavar=f.name.upper(), **kwargs)
            continue
        names = ["--" + f.name]
        if dashes and "_" in f.name:
            names.append("--" + f.name.replace("_", "-"))
        group.add_argument(*names, *f.metadata.get("aliases", ()), dest=f.name, **kwargs)


def given(cls: type, ns: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` that parsed flags set (None = not given), sequences as the field's type wants them."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(ns, f.name, None)
        if value is not None:
            wants_tuple = tuple in (
                typing.get_origin(hints[f.name]),
                *map(typing.get_origin, typing.get_args(hints[f.name])),
            )
            one_or_many = typing.get_origin(hints[f.name]) in (typing.Union, types.UnionType) and any(
                typing.get_origin(a) is None for a in typing.get_args(hints[f.name]) if a is not type(None)
            )
            if one_or_many and isinstance(value, list) and len(value) == 1:
                value = value[0]  # "str | list[str]": one given is that one
            out[f.name] = tuple(value) if wants_tuple and isinstance(value, list) else value
    return out


def place_of(f: dataclasses.Field) -> str:
    """Where a surface shows field ``f``: "main", "advanced" or "hidden"."""
    return f.metadata.get("place", "main")


def from_namespace(cls: type[T], ns: argparse.Namespace, **overrides: Any) -> T:
    """Builds dataclass ``cls`` from the parsed flags that name its fields."""
    return cls(**(given(cls, ns) | overrides))


def to_argv(obj: Any) -> list[str]:
    """The flags that rebuild dataclass instance ``obj`` through ``add_arguments`` and ``from_namespace``; None
    fields are left out (their default is None)."""
    argv: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(f"--{f.name}" if value else f"--no-{f.name}")
        elif isinstance(value, (list, tuple)):
            argv += [f"--{f.name}", *map(str, value)]
        else:
            argv += [f"--{f.name}", str(value)]
    return argv
