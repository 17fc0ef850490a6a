"""What every tab shares: the GPU queue settings, the endpoint wrapper that names API parameters and turns failures
into readable errors, Stop buttons, progress reporting, and display helpers."""

from __future__ import annotations

import inspect
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
from PIL import Image

from genreg.io import save_image

from .workspace import Workspace, preserved

logger = logging.getLogger(__name__)

GPU = {"concurrency_id": "gpu", "concurrency_limit": 1}  # one GPU-bound job at a time, the rest queued
HELPER = {"queue": False, "api_visibility": "undocumented"}  # instant form updates that touch no model
DISPLAY_SIDE = 256  # small images are enlarged to at least this many pixels for display (nearest neighbour)

StopButton = Callable[[], gr.Button]  # makes one more Stop button (see stop_buttons)


class Interrupted(Exception):
    """The user pressed Stop during a call that has no interrupt flag of its own."""


def endpoint(names: list[str], body: Callable[[dict, gr.Request, gr.Progress], object]) -> Callable:
    """A Gradio handler whose parameters are ``names`` (so API callers pass them by name) and which turns every
    failure into a readable ``gr.Error``: bad input says what is wrong, anything else names the error and leaves the
    details to the server log. The app keeps serving either way."""

    def handler(*args):
        *values, request, progress = args
        try:
            return body(dict(zip(names, values, strict=True)), request, progress)
        except gr.Error:
            raise
        except (ValueError, FileNotFoundError, KeyError) as err:
            raise gr.Error(str(err).strip("'\""), print_exception=False) from None
        except Exception as err:
            logger.exception("request failed")
            raise gr.Error(
                f"{type(err).__name__}: {err} (the server log has the details)", print_exception=False
            ) from None

    # Default None everywhere: an API caller may leave out an input that has no value in the form (an upload).
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(n, kind, default=None) for n in names]
    params.append(inspect.Parameter("request", kind, default=None, annotation=gr.Request))
    params.append(inspect.Parameter("progress", kind, default=gr.Progress()))
    handler.__signature__ = inspect.Signature(params)
    handler.__annotations__ = {"request": gr.Request}
    return handler


def session_of(request: gr.Request | None) -> str:
    """The browser session of a request ('local' for a caller without one)."""
    return getattr(request, "session_hash", None) or "local"


def stop_buttons(ws: Workspace) -> StopButton:
    """Makes Stop buttons: each asks the running job of its browser session to stop after the current step. They run
    outside the queue (a Stop must not wait behind the job it stops); the first is the API's ``/stop``."""

    def stop(request: gr.Request):
        ws.stop(session_of(request))

    made = []

    def make() -> gr.Button:
        button = gr.Button("Stop", variant="stop", elem_classes="stop-button")
        if made:
            button.click(stop, None, None, queue=False, api_visibility="private")
        else:
            button.click(stop, None, None, queue=False, api_name="stop")
        made.append(button)
        return button

    return make


def readable_upload(image: gr.Image) -> gr.Image:
    """Makes an unreadable upload fail with a message that names the file (Gradio's own error describes its
    internals). Patched on the instance: subclassing a component makes Gradio write a stub file beside this module."""
    stock = image.preprocess

    def preprocess(payload):
        try:
            return stock(payload)
        except gr.Error:
            raise
        except Exception:
            name = getattr(payload, "orig_name", None) or Path(getattr(payload, "path", "") or "the file").name
            raise gr.Error(
                f"{name} is not a readable image file; upload a PNG, JPEG or WebP image", print_exception=False
            ) from None

    image.preprocess = preprocess
    return image


def enlarge(image: Image.Image) -> Image.Image:
    """Small images enlarged by a whole factor with nearest-neighbour pixels, so that they display sharp."""
    factor = max(1, math.ceil(DISPLAY_SIDE / max(image.size)))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def seeded(images: list[Image.Image], seed: int, notes: list[str] | None = None) -> list[tuple[Image.Image, str]]:
    """Gallery items: each image enlarged for display and captioned with its seed (image k: ``seed + k``) and note."""
    notes = notes or [""] * len(images)
    return [(enlarge(im), f"seed {seed + k}{note}") for k, (im, note) in enumerate(zip(images, notes, strict=True))]


def save_all(ws: Workspace, images: list[Image.Image], stem: str) -> list[str]:
    """Writes ``images`` at full resolution into a new scratch folder for download; returns their paths."""
    folder = ws.scratch_dir()
    return [str(save_image(im, folder / f"{stem}-{k}.png")) for k, im in enumerate(images)]


# ---------------------------------------------------------------------------------------------------------------------
# progress


class _StepBar:
    """Stands in for a pipeline's tqdm bar: forwards each finished step to ``report(done, total)``."""

    def __init__(self, report: Callable[[int, int], None], total: int, iterable=None):
        self.report, self.total, self.iterable, self.n = report, total, iterable, 0
        report(0, total)

    def update(self, n: int = 1) -> None:
        self.n += n
        self.report(self.n, self.total)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def set_postfix(self, *args, **kwargs) -> None:
        return None

    def close(self) -> None:
        return None


@contextmanager
def reporting(pipe, report: Callable[[int, int], None]) -> Iterator[None]:
    """Routes the progress bars of ``pipe``'s calls to ``report(done, total)`` for the length of the block."""

    def progress_bar(iterable=None, total=None):
        return _StepBar(report, total if total is not None else len(iterable), iterable)

    pipe.progress_bar = progress_bar
    try:
        yield
    finally:
        del pipe.progress_bar


def step_reporter(progress: gr.Progress, desc: str, stop: threading.Event | None = None) -> Callable[[int, int], None]:
    """Progress of a pipeline call; with ``stop``, raises Interrupted at the next step once Stop was pressed."""

    def report(done: int, total: int) -> None:
        if stop is not None and stop.is_set():
            raise Interrupted
        progress((done, total), desc=desc, unit="steps")

    return report


def sample(
    pipe, kwargs: dict, stop: threading.Event, progress: gr.Progress, desc: str, call: Callable | None = None
) -> tuple[object, float, int]:
    """Runs a text-to-image pipeline (or ``call``, a function that calls ``pipe`` and passes its step-end callback
    on) with live progress; Stop sets ``pipe._interrupt`` (diffusers' own flag), so the loop ends after the current
    step. Returns (output, seconds, steps done)."""
    done = [0]

    def on_step_end(p, i, t, callback_kwargs):
        done[0] = i + 1
        if stop.is_set():
            p._interrupt = True
        return callback_kwargs

    with reporting(pipe, step_reporter(progress, desc)):
        start = time.perf_counter()
        out = (call or pipe)(**kwargs, callback_on_step_end=on_step_end)
        seconds = time.perf_counter() - start
    return out, seconds, done[0]


RESUME = "Resume from checkpoint ('latest' or a checkpoint-N folder of the run)"


def resume_setting(ws: Workspace, train_values: dict, folder: Path) -> bool:
    """Whether a training request resumes; a checkpoint it names must lie in its run folder (rewritten resolved)."""
    resume = str(train_values.get("resume_from_checkpoint") or "").strip()
    if resume not in ("", "latest"):  # a checkpoint named by the user: one in the runs folder, nowhere else
        train_values["resume_from_checkpoint"] = str(ws.confined(resume, RESUME, base=folder, uploads=False))
    return bool(resume)


def run_summary(method, what: str, train, done: int, stopped: bool, seconds: float, folder: Path) -> str:
    """A training request's report: steps, time, the run folder and its newest checkpoint, and how to go on."""
    from genreg.training import list_checkpoints

    reached = list_checkpoints(folder)[-1].name if list_checkpoints(folder) else "no checkpoint"
    steps = f"**stopped** at step {done} of {train.max_train_steps}" if stopped else f"{train.max_train_steps} steps"
    lines = [f"**{method.title}** of {what}: {steps} in {seconds:.1f} s. Run folder `{folder.name}` ({reached})."]
    if stopped:
        lines.append("Press **Train** again to resume it: the run folder and 'latest' are filled in.")
    elif not done:
        lines.append("Nothing left to train: the run had already reached max_train_steps; raise it to go on.")
    else:
        lines.append(f"To train it further, raise max_train_steps and resume `{folder.name}` from 'latest'.")
    return "\n\n".join(lines)


def follow_training_defaults(form, train: dict) -> None:
    """Picking a method in ``form`` puts its ``train_defaults`` into the shared training fields ``train``."""

    def use_defaults(method) -> list:
        return [
            gr.update(value=method.train_defaults[n]) if n in method.train_defaults else gr.update() for n in train
        ]

    form.follow_picker(list(train.values()), use_defaults)


def follow_source(source: gr.Radio, kit: list, upload: gr.Component) -> None:
    """The data-source radio shows the kit's components for "kit" and the upload box otherwise."""

    def use(value) -> list:
        return [gr.update(visible=value == "kit") for _ in kit] + [gr.update(visible=value != "kit")]

    source.change(use, [source], [*kit, upload], **HELPER)


def train_shared_model(
    ws: Workspace, method, config, train, stop: threading.Event, progress: gr.Progress, trials: int | None = None
):
    """Runs a finetuner or unlearner on the shared model (which it leaves as it was; modes and flags restored) with
    live progress; returns (its result, steps done, whether Stop ended it early, seconds).

    With ``trials`` the method is a search of that many inner runs, each from step 1: progress names the trial, and
    Stop abandons the running one at its next training or sampling step (a trial is scored by sampling), so the result
    is None (Interrupted is raised through the search, which records the trial as failed: cut short, it would be
    scored as if fully trained)."""
    done, trial = [0], [1]

    def on_step(step: int, loss: float) -> None:
        if step <= done[0]:  # a search's next trial has begun
            trial[0] += 1
        done[0] = step
        desc = f"training · loss {loss:.4f}"
        if trials is not None:
            desc = f"trial {trial[0]} of {trials} · {'scoring' if step == train.max_train_steps else desc}"
        progress((step, train.max_train_steps), desc=desc, unit="steps")

    def should_stop() -> bool:
        if trials is not None and stop.is_set():
            raise Interrupted
        return stop.is_set()

    start = time.perf_counter()
    with preserved(ws.base.unet, ws.base.vae, ws.base.text_encoder):
        try:
            path = method.run(ws.base, config, train, should_stop=should_stop, on_step=on_step)
        except Interrupted:
            path = None
    stopped = path is None if trials is not None else stop.is_set() and done[0] < train.max_train_steps
    return path, done[0], stopped, time.perf_counter() - start
