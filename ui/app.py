"""The genreg web app: Generate, Edit and Personalize tabs over one shared model.

Forms come from the config dataclasses (``genreg.options``, the trainers' configs in ``genreg.registry``,
``GuideAndRescaleConfig``) and the work is done by the method pipelines and trainers: this module only lays out,
validates input into configs, reports progress and shows results. Every GPU-bound event is in the concurrency group
``"gpu"`` with a limit of one, so jobs run one at a time and the others wait in the queue with their position shown.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import gradio as gr
from PIL import Image

from genreg.io import load_image, save_image
from genreg.options import GUIDANCE_LABELS, EditOptions, GenerateOptions
from genreg.registry import TRAINERS
from genreg.training import TrainConfig, list_checkpoints

from .forms import build_form, form_fields, make_config
from .workspace import Interrupted, Workspace, fit_square, native_size, reporting

logger = logging.getLogger(__name__)

GPU = {"concurrency_id": "gpu", "concurrency_limit": 1}  # one GPU-bound job at a time, the rest queued
HELPER = {"queue": False, "api_visibility": "undocumented"}  # instant form updates that touch no model
DISPLAY_SIDE = 256  # small images are enlarged to at least this many pixels for display (nearest neighbour)

CSS = """
.pixelated img { image-rendering: pixelated; }
"""

# Where each trainer or TrainConfig field goes in the Personalize form; fields not named here go under "Advanced".
MAIN_METHOD_FIELDS = ("placeholder_token", "num_vectors", "initializer_token", "subject_class", "reg_weight")
MAIN_TRAIN_FIELDS = ("max_train_steps", "train_batch_size", "learning_rate", "checkpointing_steps", "seed")
APP_TRAIN_FIELDS = ("output_dir", "mixed_precision", "resume_from_checkpoint")  # set by the app, or shown apart
EDIT_GAR_FIELDS = (
    "guidance_scale",
    "self_attn_scale",
    "feature_scale",
    "guided_fraction",
    "rescale_lower",
    "rescale_upper",
    "feature_loss",
    "feature_prompt",
    "inversion",
    "feature_layer",
    "gradient_checkpointing",
)
SOURCES = [("Tiny-world subject kit", "kit"), ("My images", "upload")]
TOKEN_PROMPT = "a large {} in the center"


# ---------------------------------------------------------------------------------------------------------------------
# helpers


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


def session_of(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


def enlarge(image: Image.Image) -> Image.Image:
    """Small images enlarged by a whole factor with nearest-neighbour pixels, so that they display sharp."""
    factor = max(1, math.ceil(DISPLAY_SIDE / max(image.size)))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def step_reporter(progress: gr.Progress, desc: str, stop=None) -> Callable[[int, int], None]:
    """Progress of a pipeline call; with ``stop``, raises Interrupted at the next step once Stop was pressed."""

    def report(done: int, total: int) -> None:
        if stop is not None and stop.is_set():
            raise Interrupted
        progress((done, total), desc=desc, unit="steps")

    return report


def sample(pipe, kwargs: dict, stop, progress: gr.Progress, desc: str):
    """Runs a text-to-image pipeline with live progress; Stop sets ``pipe._interrupt`` (diffusers' own flag), so the
    loop ends after the current step. Returns (output, seconds, steps done)."""
    done = [0]

    def on_step_end(p, i, t, callback_kwargs):
        done[0] = i + 1
        if stop.is_set():
            p._interrupt = True
        return callback_kwargs

    with reporting(pipe, step_reporter(progress, desc)):
        start = time.perf_counter()
        out = pipe(**kwargs, callback_on_step_end=on_step_end)
        seconds = time.perf_counter() - start
    return out, seconds, done[0]


def save_all(ws: Workspace, images: list[Image.Image], stem: str) -> list[str]:
    folder = ws.scratch_dir()
    return [str(save_image(im, folder / f"{stem}-{k}.png")) for k, im in enumerate(images)]


# ---------------------------------------------------------------------------------------------------------------------
# the app


def build_app(ws: Workspace) -> gr.Blocks:
    """The Blocks app over workspace ``ws`` (one loaded model)."""
    # Gradio's own upload and result cache: files older than a day are deleted, checked every hour.
    with gr.Blocks(title="genreg", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(
            "# genreg\nGenerate with fewer network evaluations, edit real images, and teach the model new subjects. "
            "One job runs at a time; others wait in the queue."
        )
        with gr.Row():
            model_box = gr.Dropdown(
                choices=["tinyworld"],
                value=ws.model_name,
                allow_custom_value=True,
                label="Model",
                info="'tinyworld' (bundled) or the path of a local diffusers directory",
                scale=3,
            )
            load_btn = gr.Button("Load model", scale=0, min_width=160)
        model_info = gr.Markdown(ws.describe())

        def load_model(values, request, progress):
            with ws.job("load", session_of(request)):
                progress(0, desc=f"loading {values['model']}")
                ws.load(values["model"])
            return ws.describe()

        load_btn.click(endpoint(["model"], load_model), [model_box], [model_info], api_name="load_model", **GPU)

        stop_button = stop_buttons(ws)
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                _generate_tab(ws, stop_button)
            if ws.can_edit:
                with gr.Tab("Edit", id="edit"):
                    _edit_tab(ws, stop_button)
            with gr.Tab("Personalize", id="personalize"):
                _personalize_tab(ws, stop_button)
    demo.workspace = ws  # what tests and callers read back (history of jobs, the loaded model)
    return demo


def stop_buttons(ws: Workspace) -> Callable[[], gr.Button]:
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


def _generate_tab(ws: Workspace, stop_button: Callable[[], gr.Button]) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            form = build_form(
                GenerateOptions,
                include=("prompt", "negative_prompt", "guidance", "guidance_scale", "num_inference_steps"),
                prefix="gen",
            )
            with gr.Row():
                form |= build_form(GenerateOptions, include=("num_images", "seed"), prefix="gen")
            with gr.Accordion("Adaptive Guidance and LinearAG settings", open=False):
                form |= build_form(
                    GenerateOptions,
                    include=("gamma_bar", "guidance_space", "min_cfg_steps", "linear_ag_coefficients"),
                    prefix="gen",
                )
            form["compare_with_cfg"] = gr.Checkbox(
                False, label="Compare with CFG", info="also run plain CFG on the same seeds and measure the time saved"
            )
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="gen-run")
                stop_button()
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Images", columns=4, format="png", height=360, elem_id="gen-gallery")
            report = gr.Markdown(elem_id="gen-report")
            cfg_gallery = gr.Gallery(label="CFG on the same seeds", columns=4, format="png", height=360, visible=False)
            files = gr.File(label="Download (full resolution)", file_count="multiple", interactive=False)

    def generate(values, request, progress):
        compare = bool(values.pop("compare_with_cfg"))
        options = make_config(GenerateOptions, values)
        name = GUIDANCE_LABELS[options.guidance]
        with ws.job("generate", session_of(request)) as stop:
            out, seconds, done = sample(ws.generator, options.pipeline_kwargs(), stop, progress, name)
            cfg = None
            if compare and options.guidance != "cfg" and not stop.is_set():
                cfg = sample(ws.generator, options.pipeline_kwargs(guidance="cfg"), stop, progress, "CFG (comparison)")
        images = out.images
        captions = [f"seed {options.seed + k} · {n} NFE" for k, n in enumerate(out.nfe)]
        lines = []
        if done < options.num_inference_steps:
            lines.append(
                f"**Stopped** after {done} of {options.num_inference_steps} steps: the images are unfinished."
            )
        mean_nfe = sum(out.nfe) / len(out.nfe)
        if options.guidance == "cfg":
            lines.append(f"**CFG**: {mean_nfe:g} network evaluations (NFE) per image; {seconds:.2f} s.")
        else:
            saved = 1 - mean_nfe / options.cfg_nfe
            estimate = seconds * options.cfg_nfe / mean_nfe if mean_nfe else float("nan")
            lines.append(
                f"**{name}**: {mean_nfe:g} NFE per image vs {options.cfg_nfe} for CFG: **{saved:.0%} fewer**. "
                f"{seconds:.2f} s for {len(images)} images."
            )
            if cfg is not None:
                cfg_seconds = cfg[1]
                lines.append(
                    f"CFG on the same seeds took {cfg_seconds:.2f} s: **{cfg_seconds - seconds:.2f} s saved** "
                    f"({1 - seconds / cfg_seconds:.0%} of the time)."
                )
            else:
                lines.append(
                    f"CFG would take about {estimate:.2f} s: about {estimate - seconds:.2f} s saved (from NFE)."
                )
        cfg_update = (
            gr.update(
                value=[(enlarge(im), f"seed {options.seed + k}") for k, im in enumerate(cfg[0].images)], visible=True
            )
            if cfg is not None
            else gr.update(value=None, visible=False)
        )
        return (
            [(enlarge(im), c) for im, c in zip(images, captions, strict=True)],
            "\n\n".join(lines),
            cfg_update,
            save_all(ws, images, "genreg"),
        )

    names = list(form)
    run.click(
        endpoint(names, generate),
        [form[n] for n in names],
        [gallery, report, cfg_gallery, files],
        api_name="generate",
        **GPU,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Edit


def _edit_scenes() -> dict[str, tuple]:
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


def _random_scene(seed: int) -> tuple:
    """A random base-world scene, its prompt, and a target prompt that changes the first object's colour."""
    from genreg.tinyworld import COLORS, HELD_OUT, sample_scene, scene_prompt

    rng = random.Random(seed)
    scene = sample_scene(rng)
    source = scene_prompt(scene, background=scene.background == "black")
    first = scene.objects[0]
    colors = [c for c in COLORS if c != first.color and c not in HELD_OUT["color"]]
    new = dataclasses.replace(first, color=rng.choice(colors))
    target = scene_prompt(dataclasses.replace(scene, objects=(new, *scene.objects[1:])), scene.background == "black")
    return scene, source, target


def _edit_tab(ws: Workspace, stop_button: Callable[[], gr.Button]) -> None:
    from genreg.methods.guide_and_rescale import GuideAndRescaleConfig
    from genreg.tinyworld import render

    scenes = _edit_scenes()
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
            pick = gr.Dropdown(choices=list(scenes), value=None, label="…or pick a rendered tiny-world scene")
            with gr.Row(equal_height=True):
                seed = gr.Number(0, precision=0, label="Random scene seed", min_width=100)
                shuffle = gr.Button("Random scene", elem_id="edit-random", min_width=100)
            form = build_form(EditOptions, prefix="edit")
            gar_fields = form_fields(GuideAndRescaleConfig, include=EDIT_GAR_FIELDS)
            with gr.Accordion("Guide-and-Rescale settings (set by the preset)", open=False):
                form |= build_form(GuideAndRescaleConfig, include=[f.name for f in gar_fields], prefix="edit")
            with gr.Row():
                run = gr.Button("Edit", variant="primary", elem_id="edit-run")
                stop_button()
        with gr.Column(scale=3):
            with gr.Row():
                before = gr.Image(label="Before", format="png", interactive=False, elem_id="edit-before")
                after = gr.Image(label="After", format="png", interactive=False, elem_id="edit-after")
            report = gr.Markdown(elem_id="edit-report")
            file = gr.File(label="Download the edited image (full resolution)", interactive=False)

    def use_scene(name):
        if not name:
            return gr.update(), gr.update(), gr.update()
        scene, target = scenes[name]
        return enlarge(render(scene)[0]), name, target

    def use_random(value):
        scene, source, target = _random_scene(int(value or 0))
        return enlarge(render(scene)[0]), source, target

    pick.change(use_scene, [pick], [image, form["source_prompt"], form["target_prompt"]], **HELPER)
    shuffle.click(use_random, [seed], [image, form["source_prompt"], form["target_prompt"]], **HELPER)
    gar_names = [f.name for f in gar_fields]

    def use_preset(name):
        preset = GuideAndRescaleConfig.preset(name)
        return [getattr(preset, n) for n in gar_names]

    form["preset"].change(use_preset, [form["preset"]], [form[n] for n in gar_names], **HELPER)

    def edit(values, request, progress):
        path = values.pop("image")
        if not path:
            raise ValueError("no image to edit: upload one, or pick a rendered tiny-world scene")
        options = make_config(
            EditOptions,
            {n: values[n] for n in ("source_prompt", "target_prompt", "preset")}
            | {"num_inference_steps": values["num_inference_steps"]},
        )
        config = make_config(GuideAndRescaleConfig, {n: values[n] for n in gar_names})
        try:
            original = load_image(path)
        except ValueError:
            raise ValueError(
                f"{Path(path).name} is not a readable image file; upload a PNG, JPEG or WebP image"
            ) from None
        size = native_size(ws.base)
        picture = fit_square(original, size)
        lines = []
        if original.width != original.height or original.width % size:  # enlarged renders go back exactly
            lines.append(
                f"The {original.width}x{original.height} image was cropped and resized to {size}x{size}, the "
                "model's native size."
            )
        with ws.job("edit", session_of(request)) as stop:
            n = options.num_inference_steps
            start = time.perf_counter()
            try:
                with reporting(ws.editor, step_reporter(progress, "inverting, then editing", stop)):
                    out = ws.editor(
                        picture,
                        source_prompt=options.source_prompt,
                        target_prompt=options.target_prompt,
                        preset=options.preset,
                        config=config,
                        num_inference_steps=n,
                    )
            except Interrupted:
                return enlarge(picture), None, "**Stopped**: the edit was interrupted; nothing was written.", None
            seconds = time.perf_counter() - start
        edited = out.images[0]
        guided = config.guided_steps(n)
        lines.append(
            f"**Guide-and-Rescale** ({options.preset} preset): {n} inversion + {n} editing steps, guided on the first "
            f"{guided}; {seconds:.1f} s."
        )
        path = save_image(edited, ws.scratch_dir() / "genreg-edit.png")
        return enlarge(picture), enlarge(edited), "\n\n".join(lines), str(path)

    names = ["image", *form]
    run.click(
        endpoint(names, edit),
        [image, *form.values()],
        [before, after, report, file],
        api_name="edit",
        **GPU,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Personalize


def _personalize_tab(ws: Workspace, stop_button: Callable[[], gr.Button]) -> None:
    from genreg.tinyworld import render
    from genreg.tinyworld.subjects import SUBJECTS, reference_scenes

    methods = list(TRAINERS)
    first = methods[0]
    method_fields = {m: [f.name for f in form_fields(TRAINERS[m].config, skip=("train_data_dir",))] for m in methods}
    union = list(dict.fromkeys(n for m in methods for n in method_fields[m]))
    owner = {n: next(TRAINERS[m].config for m in methods if n in method_fields[m]) for n in union}
    kit = ws.is_bundled
    subject = next(iter(SUBJECTS.values()))
    start_values = {"placeholder_token": f"<{subject.name}>", "initializer_token": subject.shape}
    if kit:
        # kit captions name positions; Cross Initialization averages the names of the subject's class (its shape)
        start_values |= {"flip_p": 0.0, "subject_class": f"tinyworld:{subject.shape}"}

    def kit_images(name):
        return [enlarge(render(scene)[0]) for scene in reference_scenes(SUBJECTS[name])]

    def method_rows(fields: dict, names: list[str]) -> None:
        """The trainers' own fields, two to a row; those of the other method are hidden until it is chosen."""
        for start in range(0, len(names), 2):
            with gr.Row():
                for name in names[start : start + 2]:
                    comp = build_form(owner[name], include=[name], values=start_values, prefix="pers")[name]
                    comp.visible = name in method_fields[first]
                    fields[name] = comp

    gr.Markdown(
        "Teach the model a new word for a subject from a few images: the trainer learns a token embedding and "
        "writes checkpoints as the training scripts do, so a stopped run can be resumed. The shared model is not "
        "changed; the token lives in its own copy of the text encoder."
    )
    with gr.Row():
        with gr.Column(scale=2):
            method = gr.Radio([(TRAINERS[m].help.split(":")[0], m) for m in methods], value=first, label="Method")
            method_help = gr.Markdown(TRAINERS[first].help)
            source = gr.Radio(SOURCES, value="kit" if kit else "upload", label="Training images")
            subject_box = gr.Dropdown(
                list(SUBJECTS),
                value=subject.name,
                label="Subject kit",
                info="rendered references of one object whose fill pattern and outline no word names",
                visible=kit,
            )
            preview = gr.Gallery(
                kit_images(subject.name), label="Kit references", columns=4, height=160, format="png", visible=kit
            )
            uploads = gr.File(label="Subject images", file_count="multiple", file_types=["image"], visible=not kit)
            fields: dict[str, gr.Component] = {}
            method_rows(fields, [n for n in union if n in MAIN_METHOD_FIELDS])
            train_defaults = TRAINERS[first].train_defaults
            fields |= build_form(
                TrainConfig, include=MAIN_TRAIN_FIELDS, values=train_defaults, prefix="pers", columns=3
            )
            with gr.Row():
                run_folder = gr.Textbox(
                    "",
                    label="Run folder",
                    info="a folder name in the app's runs folder (--runs-dir); empty: a new one",
                    elem_id="pers-run-folder",
                )
                fields |= build_form(TrainConfig, include=("resume_from_checkpoint",), prefix="pers")
            sample_prompt = gr.Textbox(
                TOKEN_PROMPT, label="Sample prompt", info="images drawn after training; {} stands for the token"
            )
            with gr.Accordion("Advanced", open=False):
                method_rows(fields, [n for n in union if n not in MAIN_METHOD_FIELDS])
                fields |= build_form(
                    TrainConfig,
                    skip=(*MAIN_TRAIN_FIELDS, *APP_TRAIN_FIELDS),
                    values=train_defaults,
                    prefix="pers",
                    columns=2,
                )
            with gr.Row():
                run = gr.Button("Train", variant="primary", elem_id="pers-run")
                stop_button()
        with gr.Column(scale=3):
            gallery = gr.Gallery(
                label="Samples with the learned token", columns=4, format="png", height=240, elem_id="pers-gallery"
            )
            report = gr.Markdown(elem_id="pers-report")
            embeds = gr.File(
                label="Learned embedding (learned_embeds.safetensors; or upload one)",
                file_types=[".safetensors"],
                elem_id="pers-embeds",
            )
            gr.Markdown("### Generate with the learned token")
            token_form = {"prompt": gr.Textbox(TOKEN_PROMPT.format(f"<{subject.name}>"), label="Prompt", lines=2)}
            with gr.Row():
                token_form |= build_form(GenerateOptions, include=("guidance", "num_inference_steps"), prefix="token")
            with gr.Row():
                token_form |= build_form(GenerateOptions, include=("num_images", "seed"), prefix="token")
            with gr.Row():
                token_run = gr.Button("Generate with the token", variant="primary")
                stop_button()
            token_gallery = gr.Gallery(label="Images", columns=4, format="png", height=240, elem_id="token-gallery")

    # form updates: the method's own fields and training defaults; the kit's token, initializer and preview
    method_names = list(fields)

    def use_method(name):
        trainer = TRAINERS[name]
        updates = [trainer.help]
        for n in union:
            updates.append(gr.update(visible=n in method_fields[name]))
        for n in [n for n in method_names if n in {f.name for f in dataclasses.fields(TrainConfig)}]:
            default = trainer.train_defaults.get(n)
            updates.append(gr.update(value=default) if default is not None else gr.update())
        return updates

    train_names = [n for n in method_names if n in {f.name for f in dataclasses.fields(TrainConfig)}]
    method.change(
        use_method, [method], [method_help, *[fields[n] for n in union], *[fields[n] for n in train_names]], **HELPER
    )

    def use_source(value):
        is_kit = value == "kit"
        return gr.update(visible=is_kit), gr.update(visible=is_kit), gr.update(visible=not is_kit)

    source.change(use_source, [source], [subject_box, preview, uploads], **HELPER)

    def use_subject(name):
        s = SUBJECTS[name]
        token = f"<{s.name}>"
        return kit_images(name), token, s.shape, f"tinyworld:{s.shape}", 0.0, TOKEN_PROMPT.format(token)

    kit_fields = [fields[n] for n in ("placeholder_token", "initializer_token", "subject_class", "flip_p")]
    subject_box.change(use_subject, [subject_box], [preview, *kit_fields, token_form["prompt"]], **HELPER)

    def personalize(values, request, progress):
        name = values.pop("method")
        trainer = TRAINERS[name]
        use_kit = values.pop("source") == "kit"
        kit_name, files = values.pop("subject"), values.pop("images") or []
        prompt_template = values.pop("sample_prompt") or TOKEN_PROMPT
        own = set(method_fields[name])
        config_values = {k: v for k, v in values.items() if k in own}
        train_values = {k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
        token = str(config_values.get("placeholder_token") or "").strip()
        folder = ws.run_folder(values.pop("run_folder"), name, token)
        resume = bool(str(train_values.get("resume_from_checkpoint") or "").strip())
        # Validate every setting before writing anything; the data folder is filled in later.
        make_config(trainer.config, config_values, train_data_dir=str(folder / "data"))
        train = make_config(TrainConfig, train_values, output_dir=str(folder), mixed_precision=ws.mixed_precision)
        if "{}" not in prompt_template and token not in prompt_template:
            raise ValueError(f"the sample prompt must contain {{}} or {token} where the learned token goes")
        with ws.job("personalize", session_of(request)) as stop:
            data = ws.prepare_run(folder, name, token, resume, kit_name if use_kit else None, files)
            config = make_config(trainer.config, config_values, train_data_dir=str(data))
            steps = [0]

            def on_step(step: int, loss: float) -> None:
                steps[0] = step
                progress((step, train.max_train_steps), desc=f"training · loss {loss:.4f}", unit="steps")

            progress(0, desc="preparing the training images")
            start = time.perf_counter()
            path = ws.train(name, config, train, should_stop=stop.is_set, on_step=on_step)
            seconds = time.perf_counter() - start
            stopped = stop.is_set() and steps[0] < train.max_train_steps
            prompt = prompt_template.replace("{}", token)
            images = []
            if not stopped:  # a stopped run shows no samples: Stop means stop now
                pipe = ws.personalized(path)
                options = GenerateOptions(prompt=prompt)
                out, _, _ = sample(pipe, options.pipeline_kwargs(), stop, progress, "sampling with the token")
                images = out.images
        reached = list_checkpoints(folder)[-1].name if list_checkpoints(folder) else "no checkpoint"
        lines = [
            f"**{trainer.help.split(':')[0]}** of `{token}`: "
            + (
                f"**stopped** at step {steps[0]} of {train.max_train_steps}"
                if stopped
                else f"{train.max_train_steps} steps"
            )
            + f" in {seconds:.1f} s. Run folder `{folder.name}` ({reached}).",
        ]
        if stopped:
            lines.append("Press **Train** again to resume it: the run folder and 'latest' are filled in.")
        elif not steps[0]:
            lines.append("Nothing left to train: the run had already reached max_train_steps; raise it to go on.")
        else:
            lines.append(f"To train it further, raise max_train_steps and resume `{folder.name}` from 'latest'.")
        if images:
            lines.append(f"Samples: `{prompt}`.")
        shown = [(enlarge(im), f"seed {k}") for k, im in enumerate(images)]
        keep = ws.keep(path)
        return (
            shown,
            "\n\n".join(lines),
            str(keep),
            folder.name if stopped else "",
            "latest" if stopped else "",
            TOKEN_PROMPT.format(token),
        )

    names = ["method", "source", "subject", "images", "run_folder", "sample_prompt", *method_names]
    inputs = [method, source, subject_box, uploads, run_folder, sample_prompt, *[fields[n] for n in method_names]]
    run.click(
        endpoint(names, personalize),
        inputs,
        [gallery, report, embeds, run_folder, fields["resume_from_checkpoint"], token_form["prompt"]],
        api_name="personalize",
        **GPU,
    )

    def generate_with_token(values, request, progress):
        embeds_path = values.pop("embeddings")
        if not embeds_path:
            raise ValueError("no learned embedding: train a token first, or upload a learned_embeds.safetensors")
        options = make_config(GenerateOptions, values)
        with ws.job("generate", session_of(request)) as stop:
            pipe = ws.personalized(embeds_path)
            out, _, _ = sample(pipe, options.pipeline_kwargs(), stop, progress, "sampling with the token")
        return [(enlarge(im), f"seed {options.seed + k}") for k, im in enumerate(out.images)]

    token_names = ["embeddings", *token_form]
    token_run.click(
        endpoint(token_names, generate_with_token),
        [embeds, *token_form.values()],
        [token_gallery],
        api_name="generate_with_token",
        **GPU,
    )


# ---------------------------------------------------------------------------------------------------------------------
# launching


def theme() -> gr.themes.Base:
    """The default look with the system's fonts, so a page never asks a font server for anything."""
    return gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def launch(
    model: str = "tinyworld",
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str | None = None,
    dtype=None,
    runs_dir: str | Path = "genreg-runs",
    block: bool = True,
    quiet: bool = False,
) -> gr.Blocks:
    """Loads ``model``, builds the app and serves it on ``host:port`` (127.0.0.1 by default: this machine only).

    With ``block=False`` it returns the running app at once (``demo.close()`` stops it).
    """
    ws = Workspace(model, device=device, dtype=dtype, runs_dir=runs_dir)
    demo = build_app(ws)
    demo.queue(default_concurrency_limit=1)
    try:
        _, url, _ = demo.launch(
            server_name=host,
            server_port=port,
            prevent_thread_lock=True,
            show_error=True,
            quiet=True,
            ssr_mode=False,
            mcp_server=False,
            enable_monitoring=False,
            max_file_size="100mb",
            theme=theme(),
            css=CSS,
        )
    except OSError as err:
        raise ValueError(f"cannot serve on {host}:{port} ({err}); pass another --port or --host") from None
    if not quiet:
        print(f"genreg app running on {url} (model {ws.model_name}); press Ctrl+C to stop", flush=True)
    if block:
        try:
            demo.block_thread()
        finally:
            demo.close()
    return demo
