"""What makes a genreg pipeline a drop-in for the stock diffusers pipeline it extends: the stock ``__call__``'s full
signature (positional order, defaults, docstring) with genreg's keyword arguments added, and a saved pipeline that
any diffusers loads (``model_index.json`` names the stock class)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable

from genreg.guidance import stock_class


def merged_signature(stock: Callable, extra: list[inspect.Parameter]) -> inspect.Signature:
    """``stock``'s parameters, then ``extra`` (keyword-only), then stock's ``**kwargs`` if it has one."""
    params = list(inspect.signature(stock).parameters.values())
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    return inspect.Signature([p for p in params if p not in var_kw] + extra + var_kw)


def bind_stock(stock: Callable, args: tuple, kwargs: dict) -> dict:
    """The stock call's arguments by name, positional ones mapped as the stock signature orders them."""
    signature = inspect.signature(stock)
    named = dict(signature.bind_partial(*args, **kwargs).arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in named:
            named |= named.pop(name)
    return named


def with_stock_signature(cls: type, run: Callable, extra: list[inspect.Parameter], extra_doc: str) -> None:
    """Gives ``cls`` a ``__call__`` that runs ``run(self, *args, **kwargs)`` and shows the stock pipeline's
    signature and docstring with ``extra`` parameters (documented by ``extra_doc``) added."""
    stock = stock_class(cls).__call__

    def __call__(self, *args, **kwargs):
        return run(self, *args, **kwargs)

    __call__.__signature__ = merged_signature(stock, extra)
    __call__.__doc__ = (stock.__doc__ or "").rstrip() + "\n\n        genreg:\n" + extra_doc
    __call__.__qualname__ = f"{cls.__name__}.__call__"
    cls.__call__ = __call__


class StockSaveMixin:
    """Writes the stock pipeline's class name into ``model_index.json``: ``DiffusionPipeline.from_pretrained`` (and
    any tool that reads the index) loads a saved genreg pipeline as the stock one; the genreg class's own
    ``from_pretrained`` still gives the genreg pipeline."""

    def to_json_string(self) -> str:
        data = json.loads(super().to_json_string())
        data["_class_name"] = stock_class(type(self)).__name__
        return json.dumps(data, indent=2, sort_keys=True) + "\n"
