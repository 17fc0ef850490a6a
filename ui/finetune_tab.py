"""The Fine-tune tab: change the model's own weights with the registered finetuners (kind "finetuner", e.g. SaRA).

The form is a finetuner's config (``train_data_dir`` hidden: the app writes the data there) and the shared
``TrainConfig``. The data is a tiny-world new-concept kit (renders of a value the bundled model never saw, captions
that name it) or uploaded images with their captions. A run writes checkpoints into its own folder under the app's
runs folder, so a stopped run resumes; the shared model is left as it was, and the result (a file) is merged only
while the after-images are drawn: before and after use the same prompt and seeds.
"""

from __future__ import annotations

import gradio as gr

from genreg import registry
from genreg.registry import Method
from genreg.training import TrainConfig

from .common import (
    GPU,
    HELPER,
    StopButton,
    endpoint,
    enlarge,
    follow_source,
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

SOURCES = [("Tiny-world concept kit", "kit"), ("My captioned images", "upload")]
INTRO = (
    "Fine-tune the model's own weights on captioned images. The run writes checkpoints as the training scripts do, "
    "so a stopped run can be resumed; the shared model is not changed: the result is a file that is merged only "
    "while the after-images are drawn, beside before-images of the same prompt and seeds."
)


def concept_prompt(concept: str) -> str:
    from genreg.tinyworld.concepts import concept_prompts

    return concept_prompts(concept, 1)[0][0]


def concept_images(concept: str, n: int = 4) -> list:
    """The first renders of the concept kit ``concept``, enlarged for display."""
    from genreg.tinyworld import render
    from genreg.tinyworld.concepts import concept_scenes

    return [enlarge(render(scene)[0]) for scene in concept_scenes(concept, n, seed=0)]


def build(ws: Workspace, methods: list[Method], stop_button: StopButton) -> None:
    """The tab's form, generated from the finetuners' configs and TrainConfig, and its ``/finetune`` endpoint."""
    from genreg.tinyworld.concepts import CONCEPTS, write_concept_kit

    sampler = registry.methods("sampler")[0]
    kit, concept = ws.is_bundled, next(iter(CONCEPTS))
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=2):
            form = MethodForm(methods, lambda m: (m.config,), prefix="ft", values={"flip_p": 0.0} if kit else {})
            source = gr.Radio(SOURCES, value="kit" if kit else "upload", label="Training data")
            concept_box = gr.Dropdown(
                list(CONCEPTS),
                value=concept,
                label="Concept kit",
                info="renders of a value the bundled model never saw, with captions that name it",
                visible=kit,
            )
            preview = gr.Gallery(
                concept_images(concept), label="Kit renders", columns=4, height=160, format="png", visible=kit
            )
            uploads = gr.File(
                label="Images with captions (a .txt beside each image, or metadata.jsonl)",
                file_count="multiple",
                file_types=["image", ".txt", ".jsonl"],
                visible=not kit,
            )
            form.area("main", columns=2)
            defaults = form.first.train_defaults
            train = build_form(TrainConfig, place="main", values=defaults, prefix="ft", columns=3)
            with gr.Row():
                run_folder = gr.Textbox(
                    "", label="Run folder", info="a folder name in the app's runs folder; empty: a new one"
                )
                prompt = gr.Textbox(concept_prompt(concept), label="Sample prompt", info="drawn before and after")
            with gr.Accordion("Advanced", open=False):
                form.area("advanced", columns=2)
                train |= build_form(TrainConfig, place="advanced", values=defaults, prefix="ft", columns=2)
                alpha = gr.Slider(0.0, 2.0, 1.0, step=0.1, label="Scale of the update when sampling (alpha)")
            with gr.Row():
                run = gr.Button("Train", variant="primary", elem_id="ft-run")
                stop_button()
        with gr.Column(scale=3):
            before = gr.Gallery(label="Before", columns=4, format="png", height=200, elem_id="ft-before")
            after = gr.Gallery(label="After", columns=4, format="png", height=200, elem_id="ft-after")
            summary = gr.Markdown(elem_id="ft-report")
            result = gr.File(label="Result (download)", elem_id="ft-result")

    follow_training_defaults(form, train)
    follow_source(source, [concept_box, preview], uploads)
    concept_box.change(lambda c: (concept_images(c), concept_prompt(c)), [concept_box], [preview, prompt], **HELPER)

    def finetune(values, request, progress):
        use_kit, name, images = values.pop("source") == "kit", values.pop("concept"), values.pop("images") or []
        text, scale = str(values.pop("prompt") or "").strip(), float(values.pop("alpha"))
        method, own = form.split(values)
        config_values, train_values = own[method.config], {n: values.pop(n) for n in train}
        subject = name if use_kit else "images"
        folder = ws.run_folder(values.pop("run_folder"), method.name, subject)
        resume = resume_setting(ws, train_values, folder)
        # Validate every setting before writing anything; the data folder is filled in later.
        make_config(method.config, config_values, files=ws.confined, train_data_dir=str(folder / "data"))
        train_config = make_config(
            TrainConfig, train_values, output_dir=str(folder), mixed_precision=ws.mixed_precision
        )
        options = sampler.config(prompt=text)
        if use_kit and name not in CONCEPTS:
            raise ValueError(f"unknown concept kit {name!r}; choose one of {', '.join(CONCEPTS)}")

        def fill(data) -> None:
            if use_kit:
                write_concept_kit(name, data)
            else:
                ws.write_uploads(images, data, captions=True)

        with ws.job("finetune", session_of(request)) as stop, ws.cleaned_up(folder):
            data = ws.prepare_run(folder, method.name, subject, resume, fill)
            config = make_config(method.config, config_values, files=ws.confined, train_data_dir=str(data))
            path, done, stopped, seconds = train_shared_model(ws, method, config, train_config, stop, progress)
            drawn = ([], [])
            if not stopped:  # Stop means stop now: no samples
                pipe = ws.pipeline(sampler)
                first = sample(pipe, options.pipeline_kwargs(), stop, progress, "sampling before")[0].images
                with method.apply(ws.base.unet, path, scale):
                    drawn = (
                        first,
                        sample(pipe, options.pipeline_kwargs(), stop, progress, "sampling after")[0].images,
                    )
        report = run_summary(method, subject, train_config, done, stopped, seconds, folder)
        return seeded(drawn[0], options.seed), seeded(drawn[1], options.seed), report, str(ws.keep(path))

    inputs = {"source": source, "concept": concept_box, "images": uploads, "run_folder": run_folder}
    inputs = form.inputs() | inputs | {"prompt": prompt, "alpha": alpha} | train
    run.click(
        endpoint(list(inputs), finetune),
        list(inputs.values()),
        [before, after, summary, result],
        api_name="finetune",
        **GPU,
    )
