"""The Unlearn tab: forget a concept with the registered unlearners (kind "unlearner", e.g. Score Forgetting
Distillation), then draw the same prompts and seeds with the teacher (25 steps, CFG) and the one-step student.

The form is the unlearner's config (prompt files stay on the command line: the app uses the tiny-world prompt sets)
and the shared ``TrainConfig``. A run writes checkpoints into its own folder under the app's runs folder, so a stopped
run resumes; the shared model is the frozen teacher and is left as it was.
"""

from __future__ import annotations

import gradio as gr
import torch

from genreg import registry
from genreg.registry import Method
from genreg.training import TrainConfig

from .common import (
    GPU,
    StopButton,
    endpoint,
    follow_training_defaults,
    resume_setting,
    run_summary,
    sample,
    seeded,
    session_of,
    train_shared_model,
)
from .forms import MethodForm, build_form, make_config
from .workspace import Workspace

INTRO = (
    "Forget a concept while distilling the model into a one-step generator, from prompts alone: where a prompt names "
    "the concept, the student draws what the teacher draws for the override. The run writes checkpoints, so a stopped "
    "run can be resumed; the shared model is the teacher and is not changed."
)
PROMPT = "a large red star in the center"


def build(ws: Workspace, methods: list[Method], stop_button: StopButton) -> None:
    """The tab's form, generated from the unlearners' configs and TrainConfig, and its ``/unlearn`` endpoint."""
    from genreg.pipelines import OneStepPipeline

    sampler = registry.methods("sampler")[0]
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=2):
            form = MethodForm(
                methods, lambda m: (m.config,), prefix="ul", values={"forget": "star", "override": "circle"}
            )
            form.area("main", columns=2)
            defaults = form.first.train_defaults
            train = build_form(TrainConfig, place="main", values=defaults, prefix="ul", columns=3)
            with gr.Row():
                run_folder = gr.Textbox("", label="Run folder", info="a folder name in the runs folder; empty: new")
                prompt = gr.Textbox(PROMPT, label="Sample prompt", info="drawn by the teacher and by the student")
            with gr.Accordion("Advanced", open=False):
                form.area("advanced", columns=2)
                train |= build_form(TrainConfig, place="advanced", values=defaults, prefix="ul", columns=2)
            with gr.Row():
                run = gr.Button("Unlearn", variant="primary", elem_id="ul-run")
                stop_button()
        with gr.Column(scale=3):
            teacher = gr.Gallery(label="Teacher, 25 steps", columns=4, format="png", height=200, elem_id="ul-teacher")
            student = gr.Gallery(label="Student, one step", columns=4, format="png", height=200, elem_id="ul-student")
            summary = gr.Markdown(elem_id="ul-report")

    follow_training_defaults(form, train)

    def unlearn(values, request, progress):
        text = str(values.pop("prompt") or "").strip()
        method, own = form.split(values)
        config = make_config(method.config, own[method.config], files=ws.confined)
        train_values = {n: values.pop(n) for n in train}
        folder = ws.run_folder(values.pop("run_folder"), method.name, config.forget)
        resume_setting(ws, train_values, folder)
        train_config = make_config(
            TrainConfig, train_values, output_dir=str(folder), mixed_precision=ws.mixed_precision
        )
        options = sampler.config(prompt=text, guidance="cfg")  # the teacher as it is
        with ws.job("unlearn", session_of(request)) as stop, ws.cleaned_up(folder):
            path, done, stopped, seconds = train_shared_model(ws, method, config, train_config, stop, progress)
            drawn = ([], [])
            if not stopped:  # Stop means stop now: no samples
                kwargs = options.pipeline_kwargs()
                first = sample(ws.pipeline(sampler), kwargs, stop, progress, "sampling with the teacher")[0].images
                one_step = OneStepPipeline.from_pretrained(path).to(ws.base.device)
                one_step.set_progress_bar_config(disable=True)
                generators = [torch.Generator().manual_seed(options.seed + k) for k in range(len(first))]
                drawn = (first, one_step([text] * len(first), generator=generators).images)
        report = run_summary(
            method,
            f"`{config.forget}` (drawn as `{config.override}`)",
            train_config,
            done,
            stopped,
            seconds,
            folder,
        )
        return seeded(drawn[0], options.seed), seeded(drawn[1], options.seed), report

    inputs = form.inputs() | {"run_folder": run_folder, "prompt": prompt} | train
    run.click(
        endpoint(list(inputs), unlearn),
        list(inputs.values()),
        [teacher, student, summary],
        api_name="unlearn",
        **GPU,
    )
