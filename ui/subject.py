"""HiFi Tuner in the Personalize tab: its result is a subject file (encoder-output vectors, not a token), sampled
through the stock pipeline of the loaded model with its per-step vectors (``generate``), and the Replace action puts
a learnt subject in place of an object of an image (``replace_subject``, Algorithm 3). The object is picked by naming
it: the source caption names it, the target prompt swaps its word for the subject's."""

from __future__ import annotations

import inspect
import time
from functools import partial
from pathlib import Path

import gradio as gr
import safetensors
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from genreg.io import save_image
from genreg.methods.hifi_tuner import HiFiSubject, HiFiTunerConfig, Replacement, generate, replace_subject
from genreg.methods.hifi_tuner.subject import SPACE
from genreg.registry import Method

from .common import GPU, Interrupted, StopButton, endpoint, enlarge, readable_upload, sample, session_of, step_reporter
from .edit_tab import picture_of
from .workspace import Workspace

STOCK_KWARGS = set(inspect.signature(StableDiffusionPipeline.__call__).parameters)
# a rendered scene to start from, and its prompts for the Personalize tab's first kit (a circle)
EXAMPLE = ("a large green square in the center", "a large green circle in the center")


def learns_subject(method: Method) -> bool:
    """Whether trainer ``method`` makes a HiFi Tuner subject rather than a token."""
    return issubclass(method.config, HiFiTunerConfig)


def is_subject_file(path: str | Path) -> bool:
    """Whether ``path`` is a HiFi Tuner subject file (a token embedding, or anything unreadable, is not)."""
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("space") == SPACE
    except (OSError, safetensors.SafetensorError):
        return False


def load_subject(path: str | Path) -> HiFiSubject:
    """The HiFi Tuner subject in ``path``; one of the DreamBooth variant is refused: it is in its tuned UNet, which
    the app does not load."""
    subject = HiFiSubject.load(path)
    if subject.unet:
        raise ValueError(
            f"{Path(path).name} is a DreamBooth-variant subject: it lives in its tuned UNet ({subject.unet}), which "
            "the app does not load; sample it from Python with the UNet loaded, or train the embedding variant here"
        )
    return subject


def subject_samples(ws: Workspace, path: str | Path, kwargs: dict, stop, progress) -> list:
    """The images of the sampler's request ``kwargs`` drawn with the subject in ``path`` by the stock pipeline of the
    loaded model (CFG; a step-wise subject at the step count it was made for)."""
    subject = load_subject(path)
    request = {k: v for k, v in kwargs.items() if k in STOCK_KWARGS}
    request["num_inference_steps"] = subject.num_inference_steps or request.get("num_inference_steps", 50)
    draw = partial(generate, ws.base, subject)
    out = sample(ws.base, request, stop, progress, "sampling with the subject", call=draw)[0]
    return out.images


def build_replace(ws: Workspace, subject_file: gr.File, stop_button: StopButton) -> None:
    """The Replace action under the Personalize tab (``/replace_subject``): the subject is the tab's learnt one."""
    from genreg.tinyworld import Obj, Scene, render

    gr.Markdown(
        "### Replace an object with the subject (HiFi Tuner)\nThe image is inverted under its caption, the null "
        "text fitted, and redrawn with the object's word swapped for the subject's, keeping the rest of the scene's "
        "attention. Needs a HiFi Tuner subject above."
    )
    example = enlarge(render(Scene((Obj("square", "green", "large", "center"),)))[0]) if ws.is_bundled else None
    with gr.Row():
        image = readable_upload(
            gr.Image(example, label="Image", type="filepath", format="png", height=200, elem_classes="pixelated")
        )
        with gr.Column():
            source = gr.Textbox(
                EXAMPLE[0] if example else "", label="Source caption", info="what the image shows, naming the object"
            )
            target = gr.Textbox(
                EXAMPLE[1] if example else "",
                label="Target prompt",
                info="the source caption with the object's word swapped for the subject's word",
            )
            with gr.Row():
                guidance = gr.Number(7.5, label="Guidance scale", minimum=1.0)
                null_steps = gr.Number(10, precision=0, label="Null-text steps per step", minimum=0)
            with gr.Row():
                run = gr.Button("Replace", variant="primary", elem_id="replace-run")
                stop_button()
        result = gr.Gallery(label="Reconstruction · replaced", columns=2, format="png", height=200)
    summary = gr.Markdown(elem_id="replace-report")
    download = gr.File(label="Download the replaced image", interactive=False)

    def replace(values, request, progress):
        path, subject_path = values["image"], values["subject"]
        if not subject_path or not is_subject_file(subject_path):
            raise ValueError("Replace needs a HiFi Tuner subject: train one with HiFi Tuner, or upload its file")
        if not path:
            raise ValueError("no image: upload one")
        picture, lines = picture_of(path, ws.native_size)
        subject = load_subject(subject_path)
        settings = Replacement(null_text_steps=int(values["null_steps"] or 0))
        with ws.job("replace", session_of(request)) as stop:
            start = time.perf_counter()
            try:
                replaced, info = replace_subject(
                    ws.base,
                    subject,
                    picture,
                    str(values["source"] or ""),
                    str(values["target"] or ""),
                    guidance_scale=float(values["guidance"] or 7.5),
                    settings=settings,
                    on_step=step_reporter(progress, "inverting, fitting the null text, redrawing", stop),
                )
            except Interrupted:
                return [], "**Stopped**: the replacement was interrupted; nothing was written.", None
            seconds = time.perf_counter() - start
        steps = len(info["inverted"][1])  # one null text per sampling step
        done = f"{steps} steps, {settings.null_text_steps} null-text steps each; {seconds:.1f} s."
        lines.append(f"**HiFi Tuner replacement** of `{values['source']}` by `{values['target']}`: {done}")
        file = save_image(replaced, ws.scratch_dir() / "genreg-replaced.png")
        images = [(enlarge(info["reconstruction"]), "reconstruction"), (enlarge(replaced), "replaced")]
        return images, "\n\n".join(lines), str(file)

    inputs = {"image": image, "source": source, "target": target, "guidance": guidance, "null_steps": null_steps}
    inputs["subject"] = subject_file
    run.click(
        endpoint(list(inputs), replace),
        list(inputs.values()),
        [result, summary, download],
        api_name="replace_subject",
        **GPU,
    )
