"""The table of genreg's methods: each method package registers itself here, and the `genreg` command and the web
app are generated from the table (subcommands, flags, tabs and forms), so adding a method touches neither.

``import genreg.methods`` registers every method; this module itself imports none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

KINDS = ("sampler", "editor", "trainer", "finetuner", "unlearner", "search", "video")
TRAINING = ("trainer", "finetuner", "unlearner")  # the kinds `genreg train NAME` runs


@dataclass(frozen=True)
class Method:
    """One method as the surfaces see it.

    ``config`` is the dataclass a request or run is described by (its fields' metadata carry help text and where a
    field appears: ``place="main" | "advanced" | "hidden"``). ``run`` does the work:
    a sampler's ``run(pipe, options)``; a video method's ``run(pipe, prompts, settings, **sampling)`` on an AnimateDiff
    pipeline (``config`` is then its settings, the request is `genreg generate-video`'s); an editor's
    ``run(pipe, image, options, **settings)`` (``settings``: fields of the method's ``settings`` dataclass that the
    user changed);
    a trainer's (a token's), finetuner's (the model's weights) or unlearner's (a new model without a concept)
    ``run(pipe, config, train: TrainConfig, **fit_kwargs) -> Path``; a search's the same, ``train`` setting its inner
    runs.
    ``pipeline`` names the diffusers pipeline class of the method (``"genreg.pipelines.X"``), where it has one.
    """

    name: str  # e.g. "cross-init": the CLI's subcommand (trainers: `genreg train NAME`) and the app's key
    kind: str
    title: str  # what people call it: "Cross Initialization"
    help: str  # one line: what it does, and its paper
    config: type
    run: Callable
    command: str | None = None  # the top-level `genreg` subcommand of a sampler or editor, e.g. "generate"
    settings: type | None = None  # a dataclass of expert settings whose given fields override ``config``'s preset
    pipeline: str | None = None
    train_defaults: dict = field(default_factory=dict)  # a trainer's defaults over TrainConfig's
    apply: Callable | None = None  # a finetuner's result as a context: ``apply(model, result_path, alpha)``

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: unknown kind {self.kind!r}; choose one of {', '.join(KINDS)}")


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Adds ``method`` to the table (once per name)."""
    if method.name in METHODS and METHODS[method.name] != method:
        raise ValueError(f"a method named {method.name!r} is registered already")
    METHODS[method.name] = method
    return method


def _of_kind(method: Method, kind: str | tuple[str, ...] | None) -> bool:
    return kind is None or method.kind in ((kind,) if isinstance(kind, str) else kind)


def methods(kind: str | tuple[str, ...] | None = None) -> list[Method]:
    """The registered methods of ``kind`` (one kind or several) or all, in registration order."""
    return [m for m in METHODS.values() if _of_kind(m, kind)]


def get(name: str, kind: str | tuple[str, ...] | None = None) -> Method:
    """The method called ``name``; the error lists the known ones."""
    method = METHODS.get(name)
    if method is None or not _of_kind(method, kind):
        known = ", ".join(m.name for m in methods(kind))
        what = kind if isinstance(kind, str) else "method"
        raise ValueError(f"unknown {what} {name!r}; choose one of {known}")
    return method
