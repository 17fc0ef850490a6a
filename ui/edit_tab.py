"""The Edit tab: real-image editing with the registered editors (kind "editor").

An editor's config is one request, whose fields are keyword arguments of its pipeline (``source_prompt``,
``target_prompt``, ``num_inference_steps``, and a ``preset`` where it has presets); its ``settings`` dataclass holds
the expert settings, passed whole as the pipeline's ``config=``. Picking a preset fills the settings in from
``settings.preset(name)``. Rendered tiny-world scenes, chosen or random, give something to edit at once.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import gradio as gr
from PIL import Image

from genreg.io import load_image, save_image
from genreg.registry import Method

from .common import (
    GPU,
    HELPER,
    Interrupted,
    StopButton,
    endpoint,
    enlarge,
    readable_upload,
    reporting,
    session_of,
    step_reporter,
)
from .forms import MethodForm, make_config
from .workspace import Workspace


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Crops the centred square of ``image`` and resizes it to ``size`` (the model's native resolution)."""
    w, h = image.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    if (w, h) == (size, size):
        return image
    # Area averaging for whole-number reductions gives back exactly a render that was enlarged for display.
    resample = Image.Resampling.BOX if s % size == 0 else Image.Resampling.LANCZOS
    return image.resize((size, size), resample, box=box)


def picture_of(path: str, size: int) -> tuple[Image.Image, list[str]]:
    """The uploaded image at ``path`` fitted to the model's native ``size``, and a line saying so where it changed."""
    try:
        original = load_image(path)
    except ValueError:
        raise ValueError(f"{Path(path).name} is not a readable image file; upload a PNG, JPEG or WebP image") from None
    lines = []
    if original.width != original.height or original.width % size:  # enlarged renders go back exactly
        lines.append(
            f"The {original.width}x{original.height} image was cropped and resized to {size}x{size}, the model's "
            "native size."
        )
    return fit_square(original, size), lines


def scenes() -> dict[str, tuple]:
    """Rendered tiny-world scenes to edit, by their description: (scene, suggested target prompt)."""
    from genreg.tinyworld import Obj, Scene

    return {
        "a large red circle on the left": (
            Scene((Obj("circle", "red", "large", "left"),)),
            "a large blue circle on the left",
        ),
        "a large green square in the center": (
            Scene((Obj("square", "green", "large", "center"),)),
            "a large green triangle in the center",
        ),
        "a small yellow star at the top and a large purple diamond at the bottom": (
            Scene((Obj("star", "yellow", "small", "top"), Obj("diamond", "purple", "large", "bottom"))),
            "a small orange star at the top and a large purple diamond at the bottom",
        ),
        "a large orange cross on the right on a black background": (
            Scene((Obj("cross", "orange", "large", "right"),), "black"),
            "a large orange cross on the right on a white background",
        ),
    }


def random_scene(seed: int) -> tuple:
    """A random base-world scene, its prompt, and a target prompt that changes the first object's colour; both name
    every pattern and outline (with them named, inversion keeps 67.5% of scenes whole against 21.7%:
    bench/results/guide_and_rescale_named.md)."""
    from genreg.tinyworld import COLORS, HELD_OUT, sample_scene, scene_prompt

    rng = random.Random(seed)
    scene = sample_scene(rng)
    source = scene_prompt(scene, background=scene.background == "black", details=True)
    first = scene.objects[0]
    colors = [c for c in COLORS if c != first.color and c not in HELD_OUT["color"]]
    new = dataclasses.replace(first, color=rng.choice(colors))
    target = scene_prompt(
        dataclasses.replace(scene, objects=(new, *scene.objects[1:])), scene.background == "black", details=True
    )
    return scene, source, target


def _summary(method: Method, options, settings, seconds: float) -> str:
    n = options.num_inference_steps
    preset = f" ({options.preset} preset)" if hasattr(options, "preset") else ""
    guided = f", guided on the first {settings.guided_steps(n)}" if hasattr(settings, "guided_steps") else ""
    return f"**{method.title}**{preset}: {n} inversion + {n} editing steps{guided}; {seconds:.1f} s."


def build(ws: Workspace, methods: list[Method], stop_button: StopButton) -> None:
    """The tab's form, generated from the editors' configs and settings, and its ``/edit`` endpoint."""
    from genreg.tinyworld import render

    examples = scenes()
    with gr.Row():
        with gr.Column(scale=2):
            image = readable_upload(
                gr.Image(
                    label="Image to edit",
                    type="filepath",
                    sources=["upload", "clipboard"],
                    format="png",
                    height=256,
                    elem_classes="pixelated",
                    elem_id="edit-input",
                )
            )
            pick = gr.Dropdown(choices=list(examples), value=None, label="…or pick a rendered tiny-world scene")
            with gr.Row(equal_height=True):
                seed = gr.Number(0, precision=0, label="Random scene seed", min_width=100, elem_id="edit-seed")
                shuffle = gr.Button("Random scene", elem_id="edit-random", min_width=100)
            form = MethodForm(methods, lambda m: (m.config, *([m.settings] if m.settings else [])), prefix="edit")
            form.area("main")
            with gr.Accordion("Expert settings (set by the preset)", open=False):
                form.area("advanced")
            with gr.Row():
                run = gr.Button("Edit", variant="primary", elem_id="edit-run")
                stop_button()
        with gr.Column(scale=3):
            with gr.Row():
                before = gr.Image(
                    label="Before", format="png", interactive=False, elem_id="edit-before", elem_classes="pixelated"
                )
                after = gr.Image(
                    label="After", format="png", interactive=False, elem_id="edit-after", elem_classes="pixelated"
                )
            summary = gr.Markdown(elem_id="edit-report")
            file = gr.File(label="Download the edited image (full resolution)", interactive=False)
    form.follow_picker()

    def use_scene(name):
        if not name:
            return gr.update(), gr.update(), gr.update()
        scene, target = examples[name]
        return enlarge(render(scene)[0]), name, target

    def use_random(value):
        scene, source, target = random_scene(int(value or 0))
        return enlarge(render(scene)[0]), source, target

    prompts = [form.fields["source_prompt"], form.fields["target_prompt"]]
    pick.change(use_scene, [pick], [image, *prompts], **HELPER)
    shuffle.click(use_random, [seed], [image, *prompts], **HELPER)

    settings_classes = {m.settings for m in methods if m.settings is not None}
    settings_names = [n for n, (cls, _) in form.union.items() if cls in settings_classes and n in form.fields]

    def use_preset(name, preset):
        settings = form.methods[name].settings
        if not preset or not hasattr(settings, "preset"):
            return [gr.update() for _ in settings_names]
        values = settings.preset(preset)
        return [gr.update(value=getattr(values, n)) if hasattr(values, n) else gr.update() for n in settings_names]

    if "preset" in form.fields:
        preset_box = form.fields["preset"]
        preset_box.change(use_preset, [form.picker, preset_box], [form.fields[n] for n in settings_names], **HELPER)

    def edit(values, request, progress):
        path = values.pop("image")
        if not path:
            raise ValueError("no image to edit: upload one, or pick a rendered tiny-world scene")
        method, own = form.split(values)
        options = make_config(method.config, own[method.config], files=ws.confined)
        settings = make_config(method.settings, own[method.settings], files=ws.confined) if method.settings else None
        picture, lines = picture_of(path, ws.native_size)
        pipe = ws.pipeline(method)
        with ws.job("edit", session_of(request)) as stop:
            start = time.perf_counter()
            try:
                with reporting(pipe, step_reporter(progress, "inverting, then editing", stop)):
                    out = pipe(picture, **dataclasses.asdict(options), config=settings)
            except Interrupted:
                return enlarge(picture), None, "**Stopped**: the edit was interrupted; nothing was written.", None
            seconds = time.perf_counter() - start
        edited = out.images[0]
        lines.append(_summary(method, options, settings, seconds))
        path = save_image(edited, ws.scratch_dir() / "genreg-edit.png")
        return enlarge(picture), enlarge(edited), "\n\n".join(lines), str(path)

    inputs = {"image": image} | form.inputs()
    run.click(
        endpoint(list(inputs), edit),
        list(inputs.values()),
        [before, after, summary, file],
        api_name="edit",
        **GPU,
    )
