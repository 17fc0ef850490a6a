"""The Memorization tab: search which blocks to fine-tune so that the model learns without copying, with the registered
searches (kind "search": MemControl), then draw the training captions with the Pareto front's knee.

The form is the search's config (the storage and the held-out folder stay on the command line: the app keeps the
study in the run folder's ``study.db`` and writes the held-out set itself) and the shared ``TrainConfig`` of the inner
fine-tunes. The data is a tiny-world memorization kit: short captions, a few images repeated many times. Running the
same run folder again adds trials to its study; the shared model is left as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gradio as gr
import pandas as pd
from PIL import Image

from genreg import registry
from genreg.methods.memcontrol import FINETUNE, choose, quality_key
from genreg.registry import Method
from genreg.training import TrainConfig, list_checkpoints, load_checkpoint

from .common import (
    GPU,
    StopButton,
    endpoint,
    enlarge,
    follow_training_defaults,
    sample,
    session_of,
    train_shared_model,
)
from .forms import MethodForm, build_form, make_config
from .workspace import RUN_FILE, Workspace, preserved

INTRO = (
    "Find which transformer blocks to fine-tune, and at which learning rate, so that the model learns a small, "
    "repetitive set without copying it: each trial fine-tunes adapters on one choice of blocks and is scored by "
    "memorization of the training images and by quality on held-out captions. The study is kept in its run folder: "
    "running the same folder again adds trials. The shared model is not changed."
)
TRAIN_KIT = {"unique": 12, "repeated": 6, "copies": 6, "seed": 0}  # the fine-tuning set: some images repeated
HELD_OUT_KIT = {"unique": 24, "repeated": 0, "copies": 1, "seed": 1}  # the quality objective's reference
# Training settings a search sets itself (the learning rate is searched; trials write one checkpoint at their end).
UNUSED = (
    "learning_rate",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "resume_from_checkpoint",
    "validation_steps",
)
COLUMNS = [
    "trial",
    "mask",
    "learning rate",
    "memorization",
    "quality (Frechet distance or error rate)",
    "trainable %",
    "knee",
]


def front_table(rows: list[dict], knee: dict) -> pd.DataFrame:
    """The Pareto rows of a search's ``pareto.json``, least memorization first; the knee marked."""
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["memorization"])
    table = [
        [
            r["trial"],
            "".join(str(bit) for bit in r["mask"]),
            f"{r['learning_rate']:.2e}",
            round(r["memorization"], 4),
            round(r[quality_key(r)], 4),
            round(100 * r["trainable_fraction"], 3),
            "knee" if r["trial"] == knee["trial"] else "",
        ]
        for r in front
    ]
    return pd.DataFrame(table, columns=COLUMNS)


def knee_result(ws: Workspace, folder: Path, pareto: Path, knee: dict, config, stop, progress) -> Path:
    """The knee trial's model as a stage-2 result: its final checkpoint resumed with the settings it was trained with
    (no further step), so the result is exactly the model the trial scored."""
    trial_dir = folder / "trials" / f"trial-{knee['trial']}"
    checkpoints = list_checkpoints(trial_dir)
    if not checkpoints:
        raise FileNotFoundError(f"trial {knee['trial']} left no checkpoint in run folder {folder.name}: run a new one")
    step, _, _, state = load_checkpoint(checkpoints[-1])
    recorded = dict(state.get("run", {}).get("train", {}))
    batch = recorded.pop("global_batch", 1)
    train = TrainConfig(
        **recorded,
        output_dir=str(trial_dir),
        max_train_steps=step,
        train_batch_size=batch,
        checkpointing_steps=0,
        resume_from_checkpoint="latest",
        report_to="none",
        mixed_precision=ws.mixed_precision,
    )
    stage2 = FINETUNE.config(
        train_data_dir=config.train_data_dir,
        pareto=str(pareto),
        trial=knee["trial"],
        family=config.family,
        lora_rank=config.lora_rank,
        lora_modules=config.lora_modules,
        resolution=config.resolution,
        center_crop=config.center_crop,
        flip_p=config.flip_p,
    )
    return train_shared_model(ws, FINETUNE, stage2, train, stop, progress)[0]


def knee_pairs(ws: Workspace, sampler: Method, result: Path, data: Path, stop, progress) -> tuple[list, str]:
    """Gallery items, each distinct training caption drawn with the knee's model (caption k: seed k) beside its
    nearest training image, and a line that counts the copies; nothing when Stop was pressed."""
    from genreg.metrics import nearest_training
    from genreg.tinyworld import render
    from genreg.tinyworld.concepts import read_kit_scenes

    scenes = read_kit_scenes(data)
    options = sampler.config(prompt=[caption for caption, _, _ in scenes], num_images=1, guidance="cfg")
    with preserved(ws.base.unet), FINETUNE.apply(ws.base.unet, result, 1.0):  # loading an adapter freezes the rest
        images = sample(ws.pipeline(sampler), options.pipeline_kwargs(), stop, progress, "drawing with the knee")[0]
    if stop.is_set():  # Stop means stop now: no half-drawn images
        return [], ""
    generated = images.images
    training = [render(scene, generated[0].width)[0] for _, scene, _ in scenes]
    index, similarity = nearest_training(generated, training)
    items, own = [], []
    for k, ((caption, _, repeated), image) in enumerate(zip(scenes, generated, strict=True)):
        j = int(index[k])
        own += [(repeated, j == k)]
        nearest = "its own training image" if j == k else f"the training image of '{scenes[j][0]}'"
        items += [
            (enlarge(image), f"{caption}{' (repeated)' if repeated else ''} · seed {k}"),
            (enlarge(training[j]), f"nearest: {nearest} · similarity {float(similarity[k]):.2f}"),
        ]
    repeated = [same for was_repeated, same in own if was_repeated]
    line = (
        f"{sum(same for _, same in own)} of {len(own)} training captions are drawn nearest to their own training "
        f"image ({sum(repeated)} of {len(repeated)} repeated ones)."
    )
    return items, line


def build(ws: Workspace, methods: list[Method], stop_button: StopButton) -> None:
    """The tab's form, generated from the searches' configs and TrainConfig, and its ``/search`` endpoint."""
    from genreg.tinyworld.concepts import CONCEPTS, write_memorization_kit

    sampler = registry.methods("sampler")[0]
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=2):
            form = MethodForm(methods, lambda m: (m.config,), prefix="mem", values={"flip_p": 0.0})
            concept_box = gr.Dropdown(
                list(CONCEPTS),
                value="cyan",
                label="Concept kit",
                info="renders of a value the bundled model never saw, short captions, some images repeated",
            )
            form.area("main", columns=2)
            defaults = form.first.train_defaults
            train = build_form(TrainConfig, place="main", skip=UNUSED, values=defaults, prefix="mem", columns=3)
            run_folder = gr.Textbox(
                "", label="Run folder", info="a folder name in the runs folder; one that holds a study: add trials"
            )
            with gr.Accordion("Advanced", open=False):
                form.area("advanced", columns=2)
                train |= build_form(
                    TrainConfig, place="advanced", skip=UNUSED, values=defaults, prefix="mem", columns=2
                )
            with gr.Row():
                run = gr.Button("Search", variant="primary", elem_id="mem-run")
                stop_button()
        with gr.Column(scale=3):
            plot = gr.Image(label="Pareto front", type="pil", format="png", height=320, elem_id="mem-pareto")
            front = gr.Dataframe(headers=COLUMNS, label="The front", interactive=False, elem_id="mem-front")
            pairs = gr.Gallery(
                label="The knee: each training caption drawn, beside its nearest training image",
                columns=4,
                format="png",
                height=420,
                elem_id="mem-pairs",
            )
            summary = gr.Markdown(elem_id="mem-report")

    follow_training_defaults(form, train)

    def search(values, request, progress):
        concept = values.pop("concept")
        method, own = form.split(values)
        train_values = {n: values.pop(n) for n in train}
        if concept not in CONCEPTS:
            raise ValueError(f"unknown concept kit {concept!r}; choose one of {', '.join(CONCEPTS)}")
        folder = ws.run_folder(values.pop("run_folder"), method.name, concept)
        data, held_out = folder / "data", folder / "held-out"
        # Validate every setting before writing anything.
        config = make_config(
            method.config,
            own[method.config],
            files=ws.confined,
            train_data_dir=str(data),
            validation_data_dir=str(held_out),
        )
        if config.flip_p:
            raise ValueError(f"flip_p must be 0 for the kit, got {config.flip_p}: its captions name left and right")
        train_config = make_config(
            TrainConfig, train_values, output_dir=str(folder), mixed_precision=ws.mixed_precision
        )

        def fill(data: Path) -> None:
            write_memorization_kit(data, concept, **TRAIN_KIT)
            shutil.rmtree(held_out, ignore_errors=True)
            write_memorization_kit(held_out, concept, **HELD_OUT_KIT)

        title = f"**{method.title}** of `{concept}`"
        with ws.job("search", session_of(request)) as stop:
            with ws.cleaned_up(folder):  # a new folder goes when the search fails; a Stop keeps its study
                ws.prepare_run(folder, method.name, concept, (folder / RUN_FILE).is_file(), fill)
                pareto, _, stopped, seconds = train_shared_model(
                    ws, method, config, train_config, stop, progress, trials=config.n_trials
                )
            if stopped:
                report = (
                    f"{title}: **stopped** after {seconds:.1f} s; the study in run folder `{folder.name}` keeps its "
                    "finished trials. Press **Search** again to continue it: the run folder is filled in."
                )
                return None, None, [], report, folder.name
            rows, knee = json.loads(pareto.read_text())["trials"], choose(pareto)
            with Image.open(folder / "pareto.png") as image:
                plot_image = image.convert("RGB")
            items, line = [], ""
            if not stop.is_set():
                result = knee_result(ws, folder, pareto, knee, config, stop, progress)
                items, line = knee_pairs(ws, sampler, result, data, stop, progress)
        report = [
            f"{title}: {config.n_trials} trials in {seconds:.1f} s. The study in run folder `{folder.name}` holds "
            f"{len(rows)} finished trials, {sum(bool(r['pareto']) for r in rows)} on the front.",
            f"The knee: trial {knee['trial']} (mask `{''.join(map(str, knee['mask']))}`, learning rate "
            f"{knee['learning_rate']:.2e}). {line or '**Stopped** before drawing with it.'}",
            f"To add trials to this study, enter `{folder.name}` as the run folder and press **Search** again.",
        ]
        return plot_image, front_table(rows, knee), items, "\n\n".join(report), ""

    inputs = form.inputs() | {"concept": concept_box, "run_folder": run_folder} | train
    run.click(
        endpoint(list(inputs), search),
        list(inputs.values()),
        [plot, front, pairs, summary, run_folder],
        api_name="search",
        **GPU,
    )
