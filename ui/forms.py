"""Config dataclasses -> Gradio form components, and form values -> config objects.

A field becomes a checkbox (bool), a radio or dropdown (``choices`` in its metadata), a slider (``minimum`` and
``maximum``), a number (int, float) or a text box (str; a list of strings takes one per line). Its label is the field
name in words and its help text becomes the component's info line, so a form always says what the flags say.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from collections.abc import Iterable
from typing import Any

import gradio as gr


def _kind(annotation: Any) -> tuple[type, bool, bool]:
    """(scalar type, is a list, may be None) of a field annotation such as ``int``, ``str | None`` or
    ``list[str] | None``."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0]
    if typing.get_origin(annotation) in (list, tuple):
        return typing.get_args(annotation)[0], True, optional
    return annotation, False, optional


def label_of(name: str) -> str:
    return name.replace("_", " ").capitalize()


def default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def form_fields(cls: type, include: Iterable[str] | None = None, skip: Iterable[str] = ()) -> list[dataclasses.Field]:
    """The fields of ``cls`` a form can show (scalars and lists of strings), in ``include`` order when given."""
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    names = list(include) if include is not None else list(by_name)
    out = []
    for name in names:
        if name in skip:
            continue
        kind, many, _ = _kind(hints[name])
        if kind in (bool, int, float, str) and (not many or kind is str):
            out.append(by_name[name])
    return out


def component(cls: type, field: dataclasses.Field, value: Any = None, **kwargs: Any) -> gr.Component:
    """The input component of one field of dataclass ``cls`` (``value`` replaces the field's default)."""
    kind, many, _ = _kind(typing.get_type_hints(cls)[field.name])
    meta = field.metadata
    value = default_of(field) if value is None else value
    common = {"label": meta.get("label", label_of(field.name)), "info": meta.get("help") or None} | kwargs
    if kind is bool:
        return gr.Checkbox(value=bool(value), **common)
    if "choices" in meta:
        labels = meta.get("labels", {})
        choices = [(labels.get(c, c), c) for c in meta["choices"]]
        widget = gr.Radio if len(choices) <= 4 else gr.Dropdown
        return widget(choices=choices, value=value, **common)
    if many:
        text = "\n".join(value) if value else ""
        return gr.Textbox(value=text, lines=3, placeholder="one per line", **common)
    if kind in (int, float) and "minimum" in meta and "maximum" in meta:
        step = meta.get("step", 1 if kind is int else None)
        return gr.Slider(meta["minimum"], meta["maximum"], value=value, step=step, **common)
    if kind is int:
        return gr.Number(value=value, precision=0, **common)
    if kind is float:
        return gr.Number(value=value, **common)
    return gr.Textbox(value="" if value is None else str(value), lines=meta.get("lines", 1), **common)


def build_form(
    cls: type,
    include: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    values: dict | None = None,
    prefix: str | None = None,
    columns: int = 1,
) -> dict[str, gr.Component]:
    """Components for the fields of ``cls``, by field name, ``columns`` to a row; ``values`` replaces defaults. With
    ``prefix`` each gets the element id ``{prefix}-{field-name}`` (for styling and browser tests)."""
    values = values or {}
    form = {}
    chosen = form_fields(cls, include, skip)
    for start in range(0, len(chosen), columns):
        with gr.Row() if columns > 1 else contextlib.nullcontext():
            for f in chosen[start : start + columns]:
                ids = {"elem_id": f"{prefix}-{f.name.replace('_', '-')}"} if prefix else {}
                form[f.name] = component(cls, f, values.get(f.name), **ids)
    return form


def coerce(cls: type, name: str, value: Any) -> Any:
    """A form value as field ``name`` of ``cls`` takes it; raises ValueError naming the field when it cannot."""
    kind, many, optional = _kind(typing.get_type_hints(cls)[name])
    label = label_of(name)
    if value is None or (isinstance(value, str) and not value.strip() and kind is not str):
        if optional:
            return None
        raise ValueError(f"{label} is empty: give a value")
    if many:
        items = [line.strip() for line in str(value).replace(",", "\n").splitlines() if line.strip()]
        return items or (None if optional else [])
    if kind is bool:
        return bool(value)
    if kind is int:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{label} must be a whole number, got {value!r}") from None
        if not math.isfinite(number) or number != int(number):
            raise ValueError(f"{label} must be a whole number, got {value!r}")
        return int(number)
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{label} must be a number, got {value!r}") from None
    text = str(value).strip()
    return None if optional and not text else text


def make_config(cls: type, values: dict[str, Any], **fixed: Any):
    """``cls(**values, **fixed)`` with each form value coerced to its field's type (validation errors pass through)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: coerce(cls, k, v) for k, v in values.items() if k in names}
    return cls(**(kwargs | fixed))
