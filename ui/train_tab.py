"""The Personalize tab: teach the model a new token, or a HiFi Tuner subject, with the registered trainers (kind
"trainer").

The form is a trainer's config (its ``train_data_dir`` is hidden: the app writes the training images there) and the
shared ``TrainConfig`` (``output_dir`` and ``mixed_precision`` hidden: the app sets them); picking a trainer shows its
own fields and puts in its ``train_defaults``. A run writes checkpoints into its own folder under the app's runs
folder, as the training scripts do, so a stopped run resumes. The learned token is sampled with the first registered
sampler; a HiFi Tuner subject (encoder-output vectors, named by its class word) through the stock pipeline, and the
Replace action below puts it into another image (``subject``).
"""

from __future__ import annotations

import time

import gradio as gr

from genreg import registry
from genreg.embeddings import EmbeddingConfig
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
)
from .forms import MethodForm, build_form, make_config
from .subject import build_replace, is_subject_file, learns_subject, subject_samples
from .workspace import Workspace

SOURCES = [("Tiny-world subject kit", "kit"), ("My images", "upload")]
TOKEN_PROMPT = "a large {} in the center"
INTRO = (
    "Teach the model a new word for a subject from a few images: the trainer learns a token embedding (HiFi Tuner: "
    "vectors that the subject's class word brings into a prompt) and writes checkpoints as the training scripts do, "
    "so a stopped run can be resumed. The shared model is not changed; the token lives in its own copy of the text "
    "encoder."
)


def offered(methods: list[Method]) -> list[Method]:
    """The trainers this tab runs: those that learn a token, and HiFi Tuner (a subject of encoder-output vectors)."""
    return [m for m in methods if issubclass(m.config, EmbeddingConfig) or learns_subject(m)]


def kit_values(subject, bundled: bool = True) -> dict:
    """Form values that suit tiny-world subject ``subject``: its token and its shape as the initializer word (and as
    HiFi Tuner's subject word); on the bundled model also no flips (kit captions name positions), its shape as Cross
    Initialization's class and the tiny world's contexts as CoRe's."""
    values = {"placeholder_token": f"<{subject.name}>", "initializer_token": subject.shape}
    values["subject_word"] = subject.shape
    if bundled:
        values |= {"subject_class": f"tinyworld:{subject.shape}", "flip_p": 0.0, "prompt_set": "tinyworld"}
    return values


def kit_images(name: str) -> list:
    """The rendered reference images of tiny-world subject kit ``name``, enlarged for display."""
    from genreg.tinyworld import render
    from genreg.tinyworld.subjects import SUBJECTS, reference_scenes

    return [enlarge(render(scene)[0]) for scene in reference_scenes(SUBJECTS[name])]


def build(ws: Workspace, methods: list[Method], stop_button: StopButton) -> None:
    """The tab's form, generated from the trainers' configs and TrainConfig, and its ``/personalize`` and
    ``/generate_with_token`` endpoints."""
    from genreg.tinyworld.subjects import SUBJECTS, write_kit

    methods = offered(methods)
    sampler = registry.methods("sampler")[0]
    kit = ws.is_bundled
    subject = next(iter(SUBJECTS.values()))
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=2):
            form = MethodForm(methods, lambda m: (m.config,), prefix="pers", values=kit_values(subject, kit))
            source = gr.Radio(SOURCES, value="kit" if kit else "upload", label="Training images")
            subject_box = gr.Dropdown(
                list(SUBJECTS),
                value=subject.name,
                label="Subject kit",
                info="rendered references of one object whose fill pattern and outline no word names",
                visible=kit,
                elem_id="pers-subject",
            )
            preview = gr.Gallery(
                kit_images(subject.name), label="Kit references", columns=4, height=160, format="png", visible=kit
            )
            uploads = gr.File(label="Subject images", file_count="multiple", file_types=["image"], visible=not kit)
            form.area("main", columns=2)
            defaults = form.first.train_defaults
            train = build_form(TrainConfig, place="main", values=defaults, prefix="pers", columns=3)
            with gr.Row():
                run_folder = gr.Textbox(
                    "",
                    label="Run folder",
                    info="a folder name in the app's runs folder (--runs-dir); empty: a new one",
                    elem_id="pers-run-folder",
                )
                sample_prompt = gr.Textbox(
                    TOKEN_PROMPT, label="Sample prompt", info="images drawn after training; {} stands for the token"
                )
            with gr.Accordion("Advanced", open=False):
                form.area("advanced", columns=2)
                train |= build_form(TrainConfig, place="advanced", values=defaults, prefix="pers", columns=2)
            with gr.Row():
                run = gr.Button("Train", variant="primary", elem_id="pers-run")
                stop_button()
        with gr.Column(scale=3):
            gallery = gr.Gallery(
                label="Samples with the learned token", columns=4, format="png", height=240, elem_id="pers-gallery"
            )
            summary = gr.Markdown(elem_id="pers-report")
            embeds = gr.File(
                label="Learned embedding (learned_embeds.safetensors, or HiFi Tuner's hifi_subject.safetensors; or "
                "upload one)",
                file_types=[".safetensors"],
                elem_id="pers-embeds",
            )
            gr.Markdown("### Generate with the learned token")
            token_prompt = {"prompt": TOKEN_PROMPT.format(f"<{subject.name}>")}
            token_form = build_form(sampler.config, place="main", values=token_prompt, prefix="token", columns=2)
            with gr.Row():
                token_run = gr.Button("Generate with the token", variant="primary")
                stop_button()
            token_gallery = gr.Gallery(label="Images", columns=4, format="png", height=240, elem_id="token-gallery")

    # form updates: the trainer's own fields and training defaults; the kit's token, initializer and preview
    follow_training_defaults(form, train)
    follow_source(source, [subject_box, preview], uploads)
    kit_names = [n for n in kit_values(subject) if n in form.fields]

    def use_subject(name):
        values = kit_values(SUBJECTS[name])
        return [kit_images(name), *[values[n] for n in kit_names], TOKEN_PROMPT.format(values["placeholder_token"])]

    kit_fields = [form.fields[n] for n in kit_names]
    subject_box.change(use_subject, [subject_box], [preview, *kit_fields, token_form["prompt"]], **HELPER)

    def personalize(values, request, progress):
        use_kit = values.pop("source") == "kit"
        kit_name, images = values.pop("subject"), values.pop("images") or []
        prompt_template = values.pop("sample_prompt") or TOKEN_PROMPT
        method, own = form.split(values)
        config_values, train_values = own[method.config], {n: values.pop(n) for n in train}
        subject_run = learns_subject(method)  # HiFi Tuner: prompts name the subject by its class word
        token = str(config_values.get("subject_word" if subject_run else "placeholder_token") or "").strip()
        folder = ws.run_folder(values.pop("run_folder"), method.name, token)
        resume = resume_setting(ws, train_values, folder)
        # Validate every setting before writing anything; the data folder is filled in later.
        make_config(method.config, config_values, files=ws.confined, train_data_dir=str(folder / "data"))
        train_config = make_config(
            TrainConfig, train_values, output_dir=str(folder), mixed_precision=ws.mixed_precision
        )
        if "{}" not in prompt_template and token not in prompt_template:
            raise ValueError(f"the sample prompt must contain {{}} or {token} where the learned token goes")

        def fill(data) -> None:
            if use_kit:
                if kit_name not in SUBJECTS:
                    raise ValueError(f"unknown subject kit {kit_name!r}; choose one of {', '.join(SUBJECTS)}")
                write_kit(SUBJECTS[kit_name], data)
            else:
                ws.write_uploads(images, data)

        with ws.job("personalize", session_of(request)) as stop, ws.cleaned_up(folder):
            data = ws.prepare_run(folder, method.name, token, resume, fill)
            config = make_config(method.config, config_values, files=ws.confined, train_data_dir=str(data))
            steps = [0]
            # a two-stage trainer (CoRe) counts its later stages on after max_train_steps
            later = config.later_steps() if hasattr(config, "later_steps") else 0
            total = train_config.max_train_steps + later

            def on_step(step: int, loss: float) -> None:
                steps[0] = step
                progress((step, total), desc=f"training · loss {loss:.4f}", unit="steps")

            progress(0, desc="preparing the training images")
            start = time.perf_counter()
            path = ws.train(method, config, train_config, should_stop=stop.is_set, on_step=on_step)
            seconds = time.perf_counter() - start
            stopped = stop.is_set() and steps[0] < total
            prompt = prompt_template.replace("{}", token)
            samples = []
            if not stopped and subject_run:  # a stopped run shows no samples: Stop means stop now
                request = sampler.config(prompt=prompt).pipeline_kwargs()
                samples = subject_samples(ws, path, request, stop, progress)
            elif not stopped:
                options = sampler.config(prompt=prompt)
                pipe = ws.personalized(path, sampler, tuned=folder)
                samples = sample(pipe, options.pipeline_kwargs(), stop, progress, "sampling with the token")[0].images
        text = run_summary(method, f"`{token}`", train_config, steps[0], stopped, seconds, folder)
        if later:
            stages = "the step-wise sets" if subject_run else "UNet tuning, test-time optimization"
            text += f"\n\nLater stages ({stages}): {later} steps after the first's."
        if samples:
            text += f"\n\nSamples: `{prompt}`."
        return (
            seeded(samples, 0),
            text,
            str(ws.keep(path)),
            folder.name if stopped else "",
            "latest" if stopped else "",
            TOKEN_PROMPT.format(token),
        )

    inputs = {"source": source, "subject": subject_box, "images": uploads, "run_folder": run_folder}
    inputs = form.inputs() | inputs | {"sample_prompt": sample_prompt} | train
    run.click(
        endpoint(list(inputs), personalize),
        list(inputs.values()),
        [gallery, summary, embeds, run_folder, train["resume_from_checkpoint"], token_form["prompt"]],
        api_name="personalize",
        **GPU,
    )

    def generate_with_token(values, request, progress):
        embeds_path = values.pop("embeddings")
        if not embeds_path:
            raise ValueError("no learned embedding: train a token first, or upload a learned_embeds.safetensors")
        options = make_config(sampler.config, values, files=ws.confined)
        with ws.job("generate", session_of(request)) as stop:
            if is_subject_file(embeds_path):
                images = subject_samples(ws, embeds_path, options.pipeline_kwargs(), stop, progress)
                return seeded(images, options.seed)
            pipe = ws.personalized(embeds_path, sampler)
            out, _, _ = sample(pipe, options.pipeline_kwargs(), stop, progress, "sampling with the token")
        return seeded(out.images, options.seed)

    token_inputs = {"embeddings": embeds} | token_form
    token_run.click(
        endpoint(list(token_inputs), generate_with_token),
        list(token_inputs.values()),
        [token_gallery],
        api_name="generate_with_token",
        **GPU,
    )

    build_replace(ws, embeds, stop_button)
