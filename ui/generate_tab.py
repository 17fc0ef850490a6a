"""The Generate tab: text-to-image with the registered samplers (kind "sampler").

A sampler's config describes one request and gives its pipeline's keyword arguments (``pipeline_kwargs(**changes)``,
in diffusers' words, with ``num_inference_steps``, ``num_images`` and ``seed`` among its fields). Where the pipeline
counts the network evaluations of each image (``out.nfe``) and the config's ``guidance`` field offers "cfg", the tab
reports the evaluations saved against CFG (``options.cfg_nfe``) and can rerun the seeds under CFG to time them.
"""

from __future__ import annotations

import dataclasses

import gradio as gr

from genreg.registry import Method

from .common import GPU, StopButton, endpoint, sample, save_all, seeded, session_of
from .forms import MethodForm, make_config
from .workspace import Workspace


def _guidance_field(method: Method) -> dataclasses.Field | None:
    return next((f for f in dataclasses.fields(method.config) if f.name == "guidance"), None)


def offers_cfg(method: Method) -> bool:
    """Whether the sampler can also run plain CFG (its ``guidance`` field offers "cfg")."""
    field = _guidance_field(method)
    return field is not None and "cfg" in field.metadata.get("choices", ())


def _name_of(method: Method, options) -> str:
    """What a request ran: its guidance, as the form labels it (e.g. "Adaptive Guidance"), or the method's title."""
    field = _guidance_field(method)
    if field is None:
        return method.title
    return field.metadata.get("labels", {}).get(options.guidance, options.guidance)


def report(method: Method, options, out, seconds: float, done: int, cfg: tuple | None) -> str:
    """What a request did: whether it was stopped, its network evaluations against CFG's, and the time."""
    name, nfe = _name_of(method, options), getattr(out, "nfe", None)
    lines = []
    if done < options.num_inference_steps:
        lines.append(f"**Stopped** after {done} of {options.num_inference_steps} steps: the images are unfinished.")
    if not (nfe and offers_cfg(method)):
        lines.append(f"**{name}**: {len(out.images)} images in {seconds:.2f} s.")
        return "\n\n".join(lines)
    mean_nfe = sum(nfe) / len(nfe)
    if options.guidance == "cfg":
        lines.append(f"**CFG**: {mean_nfe:g} network evaluations (NFE) per image; {seconds:.2f} s.")
        return "\n\n".join(lines)
    saved = 1 - mean_nfe / options.cfg_nfe
    lines.append(
        f"**{name}**: {mean_nfe:g} NFE per image vs {options.cfg_nfe} for CFG: **{saved:.0%} fewer**. "
        f"{seconds:.2f} s for {len(out.images)} images."
    )
    if cfg is not None:
        cfg_seconds = cfg[1]
        lines.append(
            f"CFG on the same seeds took {cfg_seconds:.2f} s: **{cfg_seconds - seconds:.2f} s saved** "
            f"({1 - seconds / cfg_seconds:.0%} of the time)."
        )
    else:
        estimate = seconds * options.cfg_nfe / mean_nfe if mean_nfe else float("nan")
        lines.append(f"CFG would take about {estimate:.2f} s: about {estimate - seconds:.2f} s saved (from NFE).")
    return "\n\n".join(lines)


def build(ws: Workspace, methods: list[Method], stop_button: StopButton) -> None:
    """The tab's form, generated from the samplers' configs, and its ``/generate`` endpoint."""
    with gr.Row():
        with gr.Column(scale=2):
            form = MethodForm(methods, lambda m: (m.config,), prefix="gen")
            form.area("main", columns=2)
            with gr.Accordion("Advanced settings", open=False):
                form.area("advanced")
            compare = gr.Checkbox(
                False,
                label="Compare with CFG",
                info="also run plain CFG on the same seeds and measure the time saved",
                visible=offers_cfg(form.first),
            )
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="gen-run")
                stop_button()
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Images", columns=4, format="png", height=360, elem_id="gen-gallery")
            summary = gr.Markdown(elem_id="gen-report")
            cfg_gallery = gr.Gallery(label="CFG on the same seeds", columns=4, format="png", height=360, visible=False)
            files = gr.File(label="Download (full resolution)", file_count="multiple", interactive=False)
    form.follow_picker([compare], lambda m: [gr.update(visible=offers_cfg(m))])

    def generate(values, request, progress):
        compare_with_cfg = bool(values.pop("compare_with_cfg"))
        method, own = form.split(values)
        options = make_config(method.config, own[method.config], files=ws.confined)
        pipe = ws.pipeline(method)
        with ws.job("generate", session_of(request)) as stop:
            out, seconds, done = sample(pipe, options.pipeline_kwargs(), stop, progress, _name_of(method, options))
            cfg = None
            if compare_with_cfg and offers_cfg(method) and options.guidance != "cfg" and not stop.is_set():
                cfg = sample(pipe, options.pipeline_kwargs(guidance="cfg"), stop, progress, "CFG (comparison)")
        nfe = getattr(out, "nfe", None)
        cfg_update = (
            gr.update(value=seeded(cfg[0].images, options.seed), visible=True)
            if cfg is not None
            else gr.update(value=None, visible=False)
        )
        return (
            seeded(out.images, options.seed, [f" · {n} NFE" for n in nfe] if nfe else None),
            report(method, options, out, seconds, done, cfg),
            cfg_update,
            save_all(ws, out.images, "genreg"),
        )

    inputs = form.inputs() | {"compare_with_cfg": compare}
    run.click(
        endpoint(list(inputs), generate),
        list(inputs.values()),
        [gallery, summary, cfg_gallery, files],
        api_name="generate",
        **GPU,
    )
