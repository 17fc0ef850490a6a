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
    """A dataclass field with help text (``choices=`` may be given too)."""
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return dataclasses.field(**factory, metadata={"help": help, **kwargs})


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(scalar type, is_sequence) of an annotation: ``int``, ``int | None``, ``list[str]``, ``tuple[int, ...]``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0]
        args = list(typing.get_args(annotation))
    if typing.get_origin(annotation) in (list, tuple):
        return args[0], True
    return annotation, False


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    skip: tuple[str, ...] = (),
    dashes: bool = False,
    unset_is_none: bool = False,
) -> None:
    """One ``--flag`` per field of dataclass ``cls`` (booleans become ``--flag/--no-flag``).

    ``dashes`` spells flags ``--like-this`` instead of diffusers' ``--like_this``; ``unset_is_none`` leaves flags the
    user did not give as None, so that a preset's values survive (see :func:`given`).
    """
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind, many = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": None if unset_is_none else default,
            "help": f.metadata.get("help", ""),
        }
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if many:
                kwargs["nargs"] = "+"
        group.add_argument("--" + (f.name.replace("_", "-") if dashes else f.name), **kwargs)


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
            out[f.name] = tuple(value) if wants_tuple and isinstance(value, list) else value
    return out


def from_namespace(cls: type[T], ns: argparse.Namespace, **overrides: Any) -> T:
    """Builds dataclass ``cls`` from the parsed flags that name its fields."""
    return cls(**(given(cls, ns) | overrides))
