"""Config dataclasses -> Gradio form components, and form values -> config objects.

A field becomes a checkbox (bool), a radio or dropdown (``choices`` in its metadata), a slider (``minimum`` and
``maximum``), a number (int, float), an upload (``file_types``: a file the user brings, never a server path typed in)
or a text box (str; a list of strings takes one per line). Its label is the field name in words and its help text
becomes the component's info line, so a form always says what the flags say. Its
``place`` metadata says where it goes: the main form, the "advanced" accordion, or nowhere ("hidden": the app sets
it or leaves its default). :class:`MethodForm` puts the forms of several methods of one kind in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

import gradio as gr

from genreg.config import field_type, may_be_none, place_of
from genreg.registry import Method

from .common import HELPER

SHOWN = ("main", "advanced")


def _kind(annotation: Any) -> tuple[type, bool, bool]:
    """(scalar type, takes several, may be None) of a field as a form sees it: a field that takes one value or
    several (``str | list[str]``) takes one."""
    kind, many = field_type(annotation)
    if (
        many
        and typing.get_origin(annotation) in (typing.Union, types.UnionType)
        and kind in typing.get_args(annotation)
    ):
        many = False
    return kind, many, may_be_none(annotation)


def label_of(name: str) -> str:
    """A field name in words: ``max_train_steps`` -> "Max train steps"."""
    return name.replace("_", " ").capitalize()


def default_of(field: dataclasses.Field) -> Any:
    """The default value of a dataclass field (None when it has none)."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def is_upload(field: dataclasses.Field) -> bool:
    """Whether a field names a file the user uploads (``file_types`` in its metadata)."""
    return "file_types" in field.metadata


def form_fields(
    cls: type, include: Iterable[str] | None = None, skip: Iterable[str] = (), places: Iterable[str] = SHOWN
) -> list[dataclasses.Field]:
    """The fields of ``cls`` a form can show (scalars and lists of strings) whose place is one of ``places``, in
    ``include`` order when given."""
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    names = list(include) if include is not None else list(by_name)
    places, out = set(places), []
    for name in names:
        if name in skip or place_of(by_name[name]) not in places:
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
    if is_upload(field):
        label, info = common.pop("label"), common.pop("info")
        label = f"{label} — {info}" if info else label  # a File has no info line
        return gr.File(value=value or None, file_types=list(meta["file_types"]), label=label, **common)
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


def _wide(cls: type, field: dataclasses.Field) -> bool:
    """Whether a field's component takes a whole row: a text area or a list of choices."""
    _, many, _ = _kind(typing.get_type_hints(cls)[field.name])
    return many or field.metadata.get("lines", 1) > 1 or "choices" in field.metadata


def lay_out(
    items: list[tuple[type, dataclasses.Field]],
    columns: int = 1,
    values: dict | None = None,
    prefix: str | None = None,
) -> dict[str, gr.Component]:
    """Components of ``(dataclass, field)`` pairs by field name: wide ones alone, the others ``columns`` to a row.
    ``values`` replaces defaults; with ``prefix`` each gets the element id ``{prefix}-{field-name}``."""
    values, form = values or {}, {}
    rows: list[list[tuple[type, dataclasses.Field]]] = []
    for cls, f in items:
        if columns == 1 or _wide(cls, f) or not rows or len(rows[-1]) == columns or _wide(*rows[-1][-1]):
            rows.append([])
        rows[-1].append((cls, f))
    for row in rows:
        with gr.Row() if len(row) > 1 else contextlib.nullcontext():
            for cls, f in row:
                ids = {"elem_id": f"{prefix}-{f.name.replace('_', '-')}"} if prefix else {}
                form[f.name] = component(cls, f, values.get(f.name), **ids)
    return form


def build_form(
    cls: type,
    include: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    values: dict | None = None,
    prefix: str | None = None,
    columns: int = 1,
    place: str | None = None,
) -> dict[str, gr.Component]:
    """Components for the fields of ``cls`` shown in ``place`` (None: main and advanced), by field name (see
    :func:`lay_out`)."""
    chosen = form_fields(cls, include, skip, SHOWN if place is None else (place,))
    return lay_out([(cls, f) for f in chosen], columns, values, prefix)


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


def make_config(cls: type, values: dict[str, Any], files: Callable[[str, str], Any] | None = None, **fixed: Any):
    """``cls(**values, **fixed)`` with each form value coerced to its field's type (validation errors pass through).
    An empty upload leaves its field's default; ``files(path, label)`` checks and resolves each uploaded path (the
    app's ``Workspace.confined``)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        field = fields.get(name)
        if field is None or (is_upload(field) and not str(value or "").strip()):
            continue
        kwargs[name] = coerce(cls, name, value)
        if is_upload(field) and files is not None:
            kwargs[name] = str(files(kwargs[name], field.metadata.get("label", label_of(name))))
    return cls(**(kwargs | fixed))


# ---------------------------------------------------------------------------------------------------------------------
# the methods of one tab


def help_line(method: Method) -> str:
    """What a method is, in one line of Markdown."""
    return f"**{method.title}**: {method.help}"


class MethodForm:
    """The inputs of the methods of one tab: a picker (hidden when there is one method), the method's help line, and
    the union of the fields of each method's dataclasses (``classes(method)``), each shown while a method that has it
    is picked. A field keeps its name as its key and API parameter name; a name two methods share is one input.

    Made inside the Blocks layout: the picker and help line go where the form is made, fields where :meth:`area` is
    called.
    """

    def __init__(
        self,
        methods: list[Method],
        classes: Callable[[Method], tuple[type, ...]],
        prefix: str,
        values: dict | None = None,
    ):
        self.methods = {m.name: m for m in methods}
        self.first, self.prefix, self.values = methods[0], prefix, values or {}
        self.classes = {m.name: classes(m) for m in methods}
        self.own: dict[str, dict[str, type]] = {}  # method name -> {field name: the dataclass that has it}
        self.union: dict[str, tuple[type, dataclasses.Field]] = {}  # field name -> where its component comes from
        for m in methods:
            self.own[m.name] = {}
            for cls in self.classes[m.name]:
                for f in form_fields(cls):
                    self.own[m.name][f.name] = cls
                    self.union.setdefault(f.name, (cls, f))
        self.fields: dict[str, gr.Component] = {}
        self.picker = gr.Radio(
            [(m.title, m.name) for m in methods],
            value=self.first.name,
            label="Method",
            visible=len(methods) > 1,
            elem_id=f"{prefix}-method",
        )
        self.help = gr.Markdown(help_line(self.first))

    def area(self, place: str, columns: int = 1) -> dict[str, gr.Component]:
        """Lays out the union's fields shown in ``place`` ("main" or "advanced"); returns them by name."""
        items = [item for item in self.union.values() if place_of(item[1]) == place]
        made = lay_out(items, columns, self.values, self.prefix)
        for name, comp in made.items():
            comp.visible = name in self.own[self.first.name]
        self.fields |= made
        return made

    def follow_picker(
        self, more: Iterable[gr.Component] = (), updates: Callable[[Method], list] | None = None
    ) -> None:
        """Shows the picked method's help and fields; ``updates(method)`` gives the updates of the components
        ``more``."""

        def use(name: str) -> list:
            method = self.methods[name]
            own = self.own_defaults(name)
            shown = [
                gr.update(visible=n in self.own[name], **({"value": own[n]} if n in own else {})) for n in self.fields
            ]
            return [help_line(method), *shown, *(updates(method) if updates else [])]

        self.picker.change(use, [self.picker], [self.help, *self.fields.values(), *more], **HELPER)

    def own_defaults(self, name: str) -> dict:
        """The defaults of method ``name``'s fields that differ from those of the shared input (a name two methods
        share, e.g. CoRe's one vector against Cross Initialization's two): picking the method puts them in."""
        found = {}
        for n, cls in self.own[name].items():
            field = next(f for f in dataclasses.fields(cls) if f.name == n)
            shared = self.union[n][1]
            if n not in self.values and shared is not field and field.default != shared.default:
                found[n] = field.default
        return found

    def split(self, values: dict) -> tuple[Method, dict[type, dict]]:
        """Takes the picked method (``values["method"]``; None: the first) and every field out of the values of a
        request; returns the method and its own fields' values, by dataclass."""
        name = values.pop("method", None) or self.first.name
        given = {n: values.pop(n, None) for n in self.fields}
        if name not in self.methods:
            raise ValueError(f"unknown method {name!r}; choose one of {', '.join(self.methods)}")
        own: dict[type, dict] = {cls: {} for cls in self.classes[name]}
        for n, cls in self.own[name].items():
            if n in given:
                own[cls][n] = given[n]
        return self.methods[name], own

    def inputs(self) -> dict[str, gr.Component]:
        """The picker and every field, by API parameter name."""
        return {"method": self.picker, **self.fields}
