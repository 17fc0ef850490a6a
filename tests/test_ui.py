"""The web app, launched in-process on the bundled model: through gradio_client, and clicked in a headless Chromium.

Results are checked for being real images and for what the app promises (NFE, checkpoints, readable errors, one job
at a time), never for particular pixels: the bundled model is retrained from time to time.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from gradio_client.utils import Status  # noqa: E402

from genreg.embeddings import load_learned_embeds  # noqa: E402

KIT = "dotted-purple-circle"
TOKEN = f"<{KIT}>"
TINY_TRAIN = {"train_batch_size": 2, "checkpointing_steps": 2, "report_to": "none"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def progress_of(job) -> str:
    """The description of a job's latest progress update ('' before the first)."""
    units = job.status().progress_data
    return (units[-1].desc or "") if units else ""


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def is_real_image(path, side: int | None = None) -> bool:
    """An image file of the expected size that is not one flat colour."""
    a = pixels(path)
    return (side is None or a.shape[:2] == (side, side)) and a.std() > 1.0


def test_forms_come_from_the_config_dataclasses():
    import gradio as gr
    from genreg.ui.forms import build_form, make_config

    from genreg.methods.adaptive_guidance import GenerateOptions
    from genreg.training import TrainConfig

    with gr.Blocks():
        form = build_form(GenerateOptions)
        train = build_form(TrainConfig, include=("max_train_steps", "checkpoints_total_limit", "lr_scheduler"))
    assert list(form) == [f.name for f in dataclasses.fields(GenerateOptions)]
    assert isinstance(form["guidance"], gr.Radio) and isinstance(form["num_images"], gr.Slider)
    assert form["gamma_bar"].info.startswith("AG:")  # the help text of the field
    assert isinstance(train["lr_scheduler"], gr.Radio) and isinstance(train["max_train_steps"], gr.Number)

    options = make_config(GenerateOptions, {"prompt": "a red circle", "num_images": 2.0, "seed": "3"})
    assert options.num_images == 2 and options.seed == 3
    assert make_config(TrainConfig, {"checkpoints_total_limit": None}).checkpoints_total_limit is None
    with pytest.raises(ValueError, match="Num images must be a whole number"):
        make_config(GenerateOptions, {"num_images": 2.5})
    with pytest.raises(ValueError, match="LinearAG needs linear_ag_coefficients"):
        make_config(GenerateOptions, {"guidance": "linear_ag"})


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from genreg.ui import launch

    runs = tmp_path_factory.mktemp("runs")
    demo = launch("tinyworld", port=free_port(), runs_dir=runs, block=False, quiet=True)
    try:
        yield demo
    finally:
        demo.close()


@pytest.fixture(scope="module")
def url(app) -> str:
    return app.local_url


@pytest.fixture
def client(url) -> Client:
    """A fresh client per test: its own session, so a Stop in one test cannot reach another's jobs."""
    return Client(url, verbose=False, download_files=True)


def test_app_binds_locally_without_analytics(app, url):
    assert url.startswith("http://127.0.0.1:")
    assert app.analytics_enabled is False and os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    ws = app.workspace
    assert ws.model_name == "tinyworld" and ws.can_edit


def test_tabs_and_forms_come_from_the_registry(app):
    from genreg.ui.forms import form_fields
    from genreg.ui.train_tab import offered

    from genreg import registry
    from genreg.config import place_of
    from genreg.training import TrainConfig

    tabs = [c["props"]["label"] for c in app.get_config_file()["components"] if c["type"] == "tabitem"]
    # a tab per kind, then Video (AnimateDiff over the loaded model)
    assert tabs == ["Generate", "Edit", "Personalize", "Fine-tune", "Unlearn", "Memorization", "Video"]
    params = {
        name: {p["parameter_name"] for p in endpoint["parameters"]}
        for name, endpoint in app.get_api_info()["named_endpoints"].items()
    }
    kinds = (
        ("sampler", "/generate"),
        ("editor", "/edit"),
        ("trainer", "/personalize"),
        ("finetuner", "/finetune"),
        ("search", "/search"),
    )
    for kind, api in kinds:
        for method in offered(registry.methods(kind)) if kind == "trainer" else registry.methods(kind):
            classes = [method.config, *([method.settings] if method.settings else [])]
            assert {f.name for cls in classes for f in form_fields(cls)} <= params[api], method.name
    hidden = {f.name for f in dataclasses.fields(TrainConfig) if place_of(f) == "hidden"}
    assert hidden == {"output_dir", "mixed_precision"}  # set by the app, not shown
    shown = params["/personalize"] | params["/edit"] | params["/finetune"] | params["/search"]
    assert not (hidden | {"train_data_dir", "chunk_size"}) & shown
    # Server-side settings of the search: the app keeps the study in the run folder and writes the held-out set.
    assert not {"storage", "validation_data_dir", "learning_rate", "resume_from_checkpoint"} & params["/search"]
    assert {"n_trials", "sampler", "family", "lora_rank", "lr_min", "lr_max", "reduce"} <= params["/search"]
    assert {"max_train_steps", "train_batch_size", "seed", "concept", "run_folder"} <= params["/search"]
    # every token trainer is offered, and HiFi Tuner (its subject is sampled and used by /replace_subject)
    offered_names = [m.name for m in offered(registry.methods("trainer"))]
    assert offered_names == ["cross-init", "textual-inversion", "core", "hifi-tuner"]
    assert {"subject_word", "stepwise_steps", "mask_guidance"} <= params["/personalize"]
    assert {"image", "source", "target", "subject", "null_steps"} <= params["/replace_subject"]


def test_generate_returns_images_nfe_and_downloads(client):
    gallery, report, cfg_gallery, files = client.predict(
        prompt="a red circle on the left",
        guidance="ag",
        num_inference_steps=10,
        num_images=2,
        compare_with_cfg=True,
        api_name="/generate",
    )
    assert len(gallery) == 2 and all(is_real_image(item["image"], 256) for item in gallery)
    nfe = [int(item["caption"].split("·")[1].split()[0]) for item in gallery]
    assert all(10 <= n <= 20 for n in nfe)  # AG: between conditional-only and full CFG
    assert "NFE per image vs 20 for CFG" in report and "CFG on the same seeds took" in report
    assert cfg_gallery["visible"] and len(cfg_gallery["value"]) == 2
    assert len(files) == 2 and all(is_real_image(f, 64) for f in files)  # the native-size originals


def imageio_ffmpeg_frames(video) -> int:
    """Frames of the video a /generate_video call returned (a path, or gradio's {"video": path, ...})."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(video["video"] if isinstance(video, dict) else video)
    next(reader)
    return sum(1 for _ in reader)


def test_video_tab_plays_a_clip_and_offers_mp4_and_gif(client):
    import imageio_ffmpeg

    video, report, files = client.predict(
        prompt="a red circle moving to the right",
        frames=16,
        steps=3,
        guidance=5.0,
        seed=0,
        fps=8,
        api_name="/generate_video",
    )
    reader = imageio_ffmpeg.read_frames(video["video"] if isinstance(video, dict) else video)
    assert next(reader)["size"] == (256, 256) and sum(1 for _ in reader) == 16  # 64-pixel frames shown at 256
    assert report.startswith("16 frames, 3 steps")
    assert sorted(Path(f).suffix for f in files) == [".gif", ".mp4"]
    with pytest.raises(AppError, match="Value 0 is less than minimum value 1"):  # the form refuses it
        client.predict(
            prompt="a red circle moving up", frames=0, steps=3, guidance=5.0, seed=0, fps=8, api_name="/generate_video"
        )
    with pytest.raises(AppError, match="pick a video method"):
        client.predict(prompt="a red circle moving up\na red circle moving down", api_name="/generate_video")


def test_video_tab_makes_a_multi_prompt_video_with_cono(client):
    video, report, files = client.predict(
        prompt="a red circle moving to the right\na red circle moving to the left",
        method="cono",
        frames=36,
        steps=2,
        guidance=5.0,
        seed=0,
        fps=8,
        look_back=0.5,
        api_name="/generate_video",
    )
    assert imageio_ffmpeg_frames(video) == 36
    assert report.startswith("36 frames by CoNo (") and len(files) == 2


def test_stop_interrupts_sampling(client):
    job = client.submit(
        prompt="a blue square at the top", guidance="cfg", num_inference_steps=150, num_images=4, api_name="/generate"
    )
    wait_for(lambda: job.status().code == Status.PROGRESS, what="sampling to start")
    client.predict(api_name="/stop")
    gallery, report, _, _ = job.result(timeout=120)
    assert "**Stopped** after" in report and "of 150 steps" in report
    assert len(gallery) == 4  # the unfinished images are still shown


def test_two_generate_requests_queue_and_both_complete(app, url):
    first, second = Client(url, verbose=False), Client(url, verbose=False)
    before = len(app.workspace.history)
    job1 = first.submit(
        prompt="a green star", guidance="cfg", num_inference_steps=60, num_images=4, api_name="/generate"
    )
    wait_for(lambda: job1.status().code in (Status.PROCESSING, Status.PROGRESS), what="the first job to start")
    job2 = second.submit(prompt="a red cross", num_inference_steps=5, num_images=1, api_name="/generate")
    seen = []
    while not job2.done():
        status = job2.status()
        seen.append((status.code, status.rank))
        time.sleep(0.02)
    assert any(code == Status.IN_QUEUE for code, _ in seen), seen  # the second waited its turn, position shown
    assert len(job1.result(timeout=120)[0]) == 4 and len(job2.result(timeout=120)[0]) == 1
    runs = app.workspace.history[before:]
    assert len(runs) == 2 and runs[0].end <= runs[1].start  # one at a time


def test_bad_input_gives_a_readable_error_and_the_app_keeps_serving(client, tmp_path):
    note = tmp_path / "notes.png"
    note.write_text("this is not an image")
    with pytest.raises(AppError) as err:
        client.predict(
            method="textual-inversion", source="upload", images=[handle_file(note)], api_name="/personalize"
        )
    assert "notes.png is not a readable image file" in str(err.value) and "Traceback" not in str(err.value)
    with pytest.raises(AppError, match="not a readable image file"):
        client.predict(
            image=handle_file(note),
            source_prompt="a red circle",
            target_prompt="a blue circle",
            api_name="/edit",
        )
    with pytest.raises(AppError, match="prompt 0 is empty"):
        client.predict(prompt="  ", api_name="/generate")
    with pytest.raises(AppError, match="not in the list of choices"):  # the picker offers the allowed models only
        client.predict(model="./no-such-model", api_name="/load_model")
    with pytest.raises(AppError, match="--allow-model-switch"):  # and switching is off: the loaded model keeps serving
        client.predict(model="tinyworld", api_name="/load_model")
    gallery = client.predict(prompt="a large red cross", num_inference_steps=10, num_images=1, api_name="/generate")[0]
    assert is_real_image(gallery[0]["image"])


def test_personalize_from_uploads_then_generate_with_the_token(app, client, tmp_path):
    from genreg.tinyworld.subjects import SUBJECTS, write_kit

    kit = write_kit(SUBJECTS[KIT], tmp_path / "kit")
    uploads = [handle_file(p) for p in sorted(kit.glob("*.png"))]
    gallery, report, embeds, run_folder, resume, prompt = client.predict(
        method="textual-inversion",
        source="upload",
        images=uploads,
        placeholder_token=TOKEN,
        initializer_token="circle",
        max_train_steps=4,
        **TINY_TRAIN,
        api_name="/personalize",
    )
    assert len(gallery) == 4 and all(is_real_image(item["image"]) for item in gallery)
    assert "4 steps" in report and run_folder == "" and resume == ""
    token, vectors = load_learned_embeds(embeds)
    assert token == TOKEN and vectors.shape[0] == 2
    folder = next(app.workspace.runs_dir.glob("textual-inversion-*"))
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert len(list((folder / "data").glob("*.png"))) == 4

    base = app.workspace.base  # the shared model never learns the token, and its modes and flags are back
    assert TOKEN not in base.tokenizer.get_vocab() and not base.unet.training
    assert all(p.requires_grad for p in base.unet.parameters())

    images = client.predict(
        embeddings=handle_file(embeds),
        prompt=prompt,
        num_inference_steps=5,
        num_images=2,
        api_name="/generate_with_token",
    )
    assert prompt == f"a large {TOKEN} in the center" and len(images) == 2

    from safetensors.torch import save_file

    for name, key, value in (("nan", TOKEN, torch.full_like(vectors, float("nan"))), ("word", "star", vectors)):
        bad = tmp_path / f"{name}.safetensors"
        save_file({key: value.contiguous()}, str(bad))
        message = "NaN or infinite" if name == "nan" else "would take over that word"
        with pytest.raises(AppError, match=message):
            client.predict(embeddings=handle_file(bad), prompt="a star", api_name="/generate_with_token")


def test_picking_a_method_puts_in_its_own_defaults_of_shared_fields():
    import gradio as gr
    from genreg.ui.forms import MethodForm

    import genreg.methods  # noqa: F401
    from genreg import registry

    trainers = registry.methods("trainer")
    with gr.Blocks():
        form = MethodForm(trainers, lambda m: (m.config,), prefix="t", values={"placeholder_token": "<x>"})
        form.area("main")
    assert trainers[0].name == "cross-init" and form.own_defaults("cross-init") == {}
    assert form.own_defaults("core") == {"num_vectors": 1}  # CoRe's one vector against the shared input's two
    assert form.own_defaults("textual-inversion") == {}


def test_personalize_with_core_samples_with_its_stage2_unet_and_leaves_the_model(app, client):
    base = app.workspace.base
    weights = {k: v.clone() for k, v in base.unet.state_dict().items()}
    gallery, report, embeds, *_ = client.predict(
        method="core",
        source="kit",
        subject=KIT,
        placeholder_token="<core-subject>",
        num_vectors=1,
        max_train_steps=2,
        unet_steps=2,
        unet_lora_rank=2,
        **TINY_TRAIN,
        api_name="/personalize",
    )
    assert len(gallery) == 4 and all(is_real_image(item["image"]) for item in gallery)
    folder = next(app.workspace.runs_dir.glob("core-*"))
    assert (folder / "pytorch_lora_weights.safetensors").is_file() and load_learned_embeds(embeds)[1].shape[0] == 1
    tuned = app.workspace._personal[1].unet  # the samples' UNet: the shared one's copy with the LoRA
    assert tuned is not base.unet and getattr(tuned, "peft_config", None)
    assert all(torch.equal(v, base.unet.state_dict()[k]) for k, v in weights.items())
    assert not getattr(base.unet, "peft_config", None)


def test_personalize_with_hifi_tuner_samples_the_subject_and_replaces_an_object(app, client, tmp_path):
    from genreg.methods.hifi_tuner import HiFiSubject

    gallery, report, subject_file, *_, prompt = client.predict(
        method="hifi-tuner",
        source="kit",
        subject=KIT,
        subject_word="circle",
        stepwise_steps=1,
        num_inference_steps=3,
        max_train_steps=2,
        **TINY_TRAIN,
        api_name="/personalize",
    )
    assert len(gallery) == 4 and all(is_real_image(item["image"]) for item in gallery)
    assert "Later stages (the step-wise sets): 3 steps" in report and prompt == "a large circle in the center"
    subject = HiFiSubject.load(subject_file)
    assert subject.step_vectors.shape[0] == 3 and subject.subject_word == "circle"
    assert not getattr(app.workspace.base.unet, "training", False)

    subject_upload = handle_file(subject_file)
    images = client.predict(embeddings=subject_upload, prompt=prompt, num_images=2, api_name="/generate_with_token")
    assert len(images) == 2 and all(is_real_image(item["image"]) for item in images)

    from genreg.tinyworld import Obj, Scene, render

    scene = tmp_path / "scene.png"
    render(Scene((Obj("square", "green", "large", "center"),)))[0].save(scene)
    prompts = {"source": "a large green square in the center", "target": "a large green circle in the center"}
    pair, text, replaced = client.predict(
        image=handle_file(scene), subject=subject_upload, null_steps=1, **prompts, api_name="/replace_subject"
    )
    assert [item["caption"] for item in pair] == ["reconstruction", "replaced"]
    assert all(is_real_image(item["image"]) for item in pair) and is_real_image(replaced)
    assert "3 steps, 1 null-text steps each" in text
    _, _, embeds, *_ = client.predict(
        method="textual-inversion",
        source="kit",
        subject=KIT,
        placeholder_token=TOKEN,
        max_train_steps=1,
        **TINY_TRAIN,
        api_name="/personalize",
    )
    tuned = dataclasses.replace(subject, unet="unet").save(tmp_path / "db_subject.safetensors")
    with pytest.raises(AppError, match="DreamBooth-variant subject"):
        client.predict(image=handle_file(scene), subject=handle_file(tuned), **prompts, api_name="/replace_subject")
    with pytest.raises(AppError, match="Replace needs a HiFi Tuner subject"):
        client.predict(image=handle_file(scene), subject=handle_file(embeds), **prompts, api_name="/replace_subject")
    with pytest.raises(AppError, match="swap the object's word"):
        client.predict(
            image=handle_file(scene),
            subject=subject_upload,
            source=prompts["source"],
            target=prompts["source"],
            api_name="/replace_subject",
        )


def test_stopped_training_writes_a_checkpoint_and_resumes(app, client):
    job = client.submit(
        method="cross-init",
        source="kit",
        subject=KIT,
        placeholder_token=TOKEN,
        subject_class="tinyworld",
        max_train_steps=500,
        **(TINY_TRAIN | {"checkpointing_steps": 0}),
        api_name="/personalize",
    )
    wait_for(lambda: progress_of(job).startswith("training"), what="training to start")
    client.predict(api_name="/stop")
    gallery, report, embeds, run_folder, resume, _ = job.result(timeout=120)
    assert "**stopped** at step" in report and run_folder and resume == "latest" and gallery == []
    folder = app.workspace.runs_dir / run_folder
    (checkpoint,) = folder.glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert 0 < step < 500 and load_learned_embeds(embeds)[0] == TOKEN

    gallery, report, _, run_folder_after, resume_after, _ = client.predict(
        method="cross-init",
        source="kit",
        subject=KIT,
        placeholder_token=TOKEN,
        subject_class="tinyworld",
        run_folder=run_folder,
        resume_from_checkpoint=resume,
        max_train_steps=step + 2,
        **TINY_TRAIN,
        api_name="/personalize",
    )
    assert f"{step + 2} steps" in report and len(gallery) == 4 and run_folder_after == "" and resume_after == ""
    assert (folder / f"checkpoint-{step + 2}" / "learned_embeds.safetensors").is_file()


def test_finetune_a_concept_kit_shows_before_and_after_and_leaves_the_model(app, client):
    from genreg.methods.sara import SaRADelta

    unet = app.workspace.base.unet
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    before, after, report, result = client.predict(
        method="sara",
        source="kit",
        concept="checkered",
        prompt="a large checkered red circle in the center",
        threshold=0.01,
        max_train_steps=2,
        **TINY_TRAIN,
        api_name="/finetune",
    )
    assert len(before) == len(after) == 4 and all(is_real_image(item["image"]) for item in before + after)
    assert "2 steps" in report and SaRADelta.load(result).num_entries > 0
    assert all(torch.equal(v, weights[k]) for k, v in unet.state_dict().items())  # the shared model as it was
    assert not unet.training and all(p.requires_grad for p in unet.parameters())
    folder = next(app.workspace.runs_dir.glob("sara-*"))
    assert len(list((folder / "data").glob("*.png"))) == 24 and (folder / "data" / "metadata.jsonl").is_file()
    with pytest.raises(AppError, match="threshold must be a positive number"):
        client.predict(method="sara", source="kit", concept="checkered", threshold=0.0, api_name="/finetune")
    with pytest.raises(AppError, match="have no caption"):
        client.predict(
            method="sara",
            source="upload",
            images=[handle_file(next(folder.glob("data/*.png")))],
            threshold=0.01,
            max_train_steps=1,
            **TINY_TRAIN,
            api_name="/finetune",
        )


def test_unlearn_draws_teacher_and_one_step_student_and_leaves_the_model(app, client):
    unet = app.workspace.base.unet
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    teacher, student, report = client.predict(
        method="sfd",
        forget="star",
        override="circle",
        prompt="a large red star in the center",
        max_train_steps=1,
        train_batch_size=1,
        checkpointing_steps=1,
        report_to="none",
        api_name="/unlearn",
    )
    assert len(teacher) == len(student) == 4 and all(is_real_image(item["image"]) for item in teacher + student)
    assert "1 steps" in report and "`star` (drawn as `circle`)" in report
    assert all(torch.equal(v, weights[k]) for k, v in unet.state_dict().items())
    assert (next(app.workspace.runs_dir.glob("sfd-*")) / "generator" / "model_index.json").is_file()
    with pytest.raises(AppError, match="forget and override are the same"):
        client.predict(method="sfd", forget="star", override="star", api_name="/unlearn")


def test_memorization_search_stops_continues_its_study_and_shows_the_front_and_the_knee(app, client, monkeypatch):
    import optuna
    from genreg.ui import memorization_tab

    # Small kits keep each trial's scoring (a generation per held-out caption) and the knee's drawings short.
    monkeypatch.setattr(memorization_tab, "TRAIN_KIT", {"unique": 2, "repeated": 1, "copies": 3, "seed": 0})
    monkeypatch.setattr(memorization_tab, "HELD_OUT_KIT", {"unique": 4, "repeated": 0, "copies": 1, "seed": 1})
    unet = app.workspace.base.unet
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    settings = {"method": "memcontrol", "concept": "cyan", "n_trials": 1, "train_batch_size": 2, "report_to": "none"}
    job = client.submit(**settings, max_train_steps=500, api_name="/search")
    wait_for(lambda: progress_of(job).startswith("trial 1 of 1"), timeout=120, what="the first trial to train")
    client.predict(api_name="/stop")
    plot, _, pairs, report, run_folder = job.result(timeout=120)
    assert "**stopped**" in report and plot is None and pairs == [] and run_folder
    folder = app.workspace.runs_dir / run_folder
    assert (folder / "study.db").is_file() and not (folder / "pareto.json").exists()

    # The same run folder continues the study.
    plot, front, pairs, report, run_folder_after = client.predict(
        **settings, max_train_steps=2, run_folder=run_folder, api_name="/search"
    )
    assert is_real_image(plot) and run_folder_after == "" and "holds 1 finished trials" in report
    storage = f"sqlite:///{folder / 'study.db'}"
    trials = optuna.load_study(study_name="memcontrol", storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]  # the stopped trial was not scored part-trained
    assert front["headers"] == memorization_tab.COLUMNS
    ((trial, mask, _, memorization, distance, trainable, knee),) = front["data"]  # one finished trial: the front
    assert trial == 1 and set(mask) <= {"0", "1"} and "1" in mask and knee == "knee"
    assert memorization > 0 and distance >= 0 and 0 < trainable < 100
    assert len(pairs) == 2 * 3 and all(is_real_image(item["image"]) for item in pairs)  # 3 distinct captions
    assert pairs[0]["caption"].endswith("seed 0") and pairs[1]["caption"].startswith("nearest: ")
    knee_dir = folder / "trials" / "trial-1"  # the knee's model: stage 2 from the trial's checkpoint, no step more
    assert (knee_dir / "pytorch_lora_weights.safetensors").is_file()
    assert [p.name for p in knee_dir.glob("checkpoint-*")] == ["checkpoint-2"]
    assert all(torch.equal(v, weights[k]) for k, v in unet.state_dict().items())  # the shared model as it was
    assert not unet.training and all(p.requires_grad for p in unet.parameters())

    with pytest.raises(AppError, match=f"run folder {run_folder} trains cyan with memcontrol"):
        client.predict(method="memcontrol", concept="moon", run_folder=run_folder, api_name="/search")
    before = sorted(p.name for p in app.workspace.runs_dir.iterdir())
    with pytest.raises(AppError, match="n_trials must be at least 1, got 0"):
        client.predict(method="memcontrol", n_trials=0, api_name="/search")
    with pytest.raises(AppError, match="flip_p must be 0 for the kit"):
        client.predict(method="memcontrol", flip_p=0.5, api_name="/search")
    assert sorted(p.name for p in app.workspace.runs_dir.iterdir()) == before  # nothing written


def test_edit_shows_before_and_after(client, tmp_path):
    from genreg.tinyworld import Obj, Scene, render

    path = tmp_path / "scene.png"
    render(Scene((Obj("circle", "red", "large", "left"),)))[0].save(path)
    before, after, report, file = client.predict(
        image=handle_file(path),
        source_prompt="a large red circle on the left",
        target_prompt="a large blue circle on the left",
        preset="local",
        num_inference_steps=8,
        api_name="/edit",
    )
    assert is_real_image(before, 256) and is_real_image(after, 256) and is_real_image(file, 64)
    assert not np.array_equal(pixels(before), pixels(after))
    assert "Guide-and-Rescale" in report and "guided on the first 5" in report


def test_a_random_scene_to_edit_names_every_detail_and_changes_one_colour():
    from genreg.tinyworld.world import parse_prompt
    from ui.edit_tab import random_scene

    for seed in range(6):
        scene, source, target = random_scene(seed)
        named, wanted = parse_prompt(source), parse_prompt(target)
        assert all("pattern" in o and "outline" in o for o in named.objects + wanted.objects), source
        changed = [(a, b) for a, b in zip(named.objects, wanted.objects, strict=True) if a != b]
        assert len(changed) == 1 and {k for k in changed[0][0] if changed[0][0][k] != changed[0][1][k]} == {"color"}


def test_stop_interrupts_an_edit(client, tmp_path):
    from genreg.tinyworld import Obj, Scene, render

    path = tmp_path / "scene.png"
    render(Scene((Obj("square", "green", "large", "center"),)))[0].save(path)
    job = client.submit(
        image=handle_file(path),
        source_prompt="a large green square in the center",
        target_prompt="a large green triangle in the center",
        num_inference_steps=100,
        api_name="/edit",
    )
    wait_for(lambda: job.status().code == Status.PROGRESS, what="the edit to start")
    client.predict(api_name="/stop")
    before, after, report, file = job.result(timeout=120)
    assert "**Stopped**" in report and after is None and file is None and is_real_image(before)


def test_genreg_ui_command_starts_the_app_on_localhost(monkeypatch):
    import genreg.ui

    from genreg.cli import main

    calls = []
    monkeypatch.setattr(genreg.ui, "launch", lambda *args, **kwargs: calls.append((args, kwargs)))
    assert main(["ui"]) == 0
    assert calls[0][0] == ("tinyworld",) and calls[0][1]["host"] == "127.0.0.1" and calls[0][1]["port"] == 7860
    assert calls[0][1]["models"] == [] and calls[0][1]["model_switch"] is False  # the model is fixed by default
    main(["ui", "--model", "some/dir", "--host", "0.0.0.0", "--port", "8000"])
    assert calls[1][0] == ("some/dir",) and calls[1][1]["host"] == "0.0.0.0" and calls[1][1]["port"] == 8000
    main(["ui", "--allow-model", "other/dir", "--allow-model", "owner/name", "--allow-model-switch"])
    assert calls[2][1]["models"] == ["other/dir", "owner/name"] and calls[2][1]["model_switch"] is True


def test_launch_prints_its_address(capsys, tmp_path):
    from genreg.ui import launch

    port = free_port()
    demo = launch("tinyworld", port=port, runs_dir=tmp_path, block=False)
    try:
        assert f"http://127.0.0.1:{port}" in capsys.readouterr().out
    finally:
        demo.close()


@pytest.mark.slow
def test_genreg_ui_command_prints_its_address(tmp_path):
    port = free_port()
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "genreg.cli", "ui", "--port", str(port), "--runs-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in line, line
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------------------------------
# in a real browser


# The README's screenshots: a random scene (green cross to purple) whose edit keeps every attribute, and the kit that
# textual inversion learns best (identity 0.81-0.94 at 320 steps in the personalization benchmark).
SHOWCASE_EDIT_SEED = 3
SHOWCASE_SUBJECT = "dotted-purple-circle"


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    if executable is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def shots(tmp_path) -> Path:
    """Where screenshots go: $GENREG_UI_SCREENSHOTS when set (the README's come from there), else a temp folder."""
    folder = Path(os.environ.get("GENREG_UI_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def shown_image(page, selector: str, timeout: float = 120_000):
    """Waits until an <img> under ``selector`` has loaded pixels; returns its natural width."""
    img = page.locator(f"{selector} img").first
    img.wait_for(state="visible", timeout=timeout)
    page.wait_for_function(
        "sel => { const i = document.querySelector(sel + ' img'); return i && i.complete && i.naturalWidth > 0; }",
        arg=selector,
        timeout=timeout,
    )
    return img.evaluate("i => i.naturalWidth")


def screenshot(page, path: Path) -> None:
    page.mouse.move(0, 0)  # no hover highlight on the button just clicked
    page.screenshot(path=str(path), full_page=True)


def set_number(page, elem_id: str, value) -> None:
    """Types into the number box of a Gradio slider or number field."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def test_browser_generate_edit_and_personalize_by_clicking(browser, url, shots):
    # For the README's screenshots the edit and the training run as long as the benchmarks do, so they show an edit
    # that succeeded and a subject that was learnt; the test itself clicks through short runs.
    showcase = bool(os.environ.get("GENREG_UI_SCREENSHOTS"))
    wait = 1_200_000 if showcase else 120_000
    page = browser.new_page(viewport={"width": 1360, "height": 1000})
    try:
        page.goto(url)
        page.locator("#gen-run").wait_for(timeout=60_000)
        page.locator("#gen-prompt textarea").fill("a large green star in the center")
        set_number(page, "gen-num-images", 4)
        page.locator("#gen-run").click()
        assert shown_image(page, "#gen-gallery") >= 64
        page.locator("#gen-report").get_by_text("NFE per image").wait_for(timeout=60_000)
        screenshot(page, shots / "ui-generate.png")

        page.get_by_role("tab", name="Edit").click()
        set_number(page, "edit-seed", SHOWCASE_EDIT_SEED if showcase else 0)
        page.locator("#edit-random").click()
        shown_image(page, "#edit-input")
        set_number(page, "edit-num-inference-steps", 25 if showcase else 10)
        page.locator("#edit-run").click()
        assert shown_image(page, "#edit-after", wait) >= 64
        shown_image(page, "#edit-before")
        page.locator("#edit-report").get_by_text("Guide-and-Rescale").wait_for(timeout=60_000)
        screenshot(page, shots / "ui-edit.png")

        page.get_by_role("tab", name="Personalize").click()
        if showcase:
            from playwright.sync_api import expect

            page.locator("#pers-method").get_by_text("Textual Inversion", exact=True).click()
            page.locator("#pers-subject input").click()
            page.get_by_role("option", name=SHOWCASE_SUBJECT, exact=True).click()
            token = page.locator("#pers-placeholder-token").locator("input, textarea")
            expect(token).to_have_value(f"<{SHOWCASE_SUBJECT}>")  # the kit's values are in the form
        set_number(page, "pers-max-train-steps", 320 if showcase else 6)
        set_number(page, "pers-train-batch-size", 8 if showcase else 2)
        page.locator("#pers-run").click()
        assert shown_image(page, "#pers-gallery", wait) >= 64
        page.locator("#pers-report").get_by_text("Run folder").wait_for(timeout=60_000)
        screenshot(page, shots / "ui-personalize.png")
    finally:
        page.close()
