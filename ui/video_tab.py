"""The Video tab: text-to-video with AnimateDiff over the loaded model and its motion adapter (FreeNoise past the
adapter's clip length, ``genreg.video.generate_video``), or with a registered video method (kind "video": CoNo), which
takes one prompt per line for a multi-prompt video. The clip plays in the page and downloads as MP4 and GIF."""

from __future__ import annotations

import gradio as gr
import torch

from genreg.checks import require_positive_int
from genreg.registry import Method
from genreg.video import clip_length, generate_video, save_video

from .common import GPU, HELPER, Interrupted, StopButton, endpoint, reporting, session_of, step_reporter
from .forms import build_form, make_config
from .workspace import Workspace

EXAMPLE = "a red circle moving to the right"
PLAIN = "animatediff"
DISPLAY_SCALE = 4  # tiny-world frames are 64 pixels: shown at 256


def build(ws: Workspace, methods: list[Method], stop_button: StopButton) -> None:
    """The tab's form (the video methods' settings generated from their configs) and its ``/generate_video``."""
    by_name = {m.name: m for m in methods}
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(
                EXAMPLE,
                lines=2,
                label="Prompt",
                info="name the motion (moving to the right/left, moving up/down, growing, turning <colour>); "
                "with a video method, one prompt per line makes a multi-prompt video",
                elem_id="video-prompt",
            )
            method = gr.Radio(
                [("AnimateDiff (FreeNoise when longer)", PLAIN), *((m.title, m.name) for m in methods)],
                value=PLAIN,
                label="Method",
            )
            with gr.Row():
                frames = gr.Number(16, label="Frames", precision=0, minimum=1, info="over 16: a long video")
                steps = gr.Number(25, label="Steps", precision=0, minimum=1)
            with gr.Row():
                guidance = gr.Number(5.0, label="Guidance scale", minimum=0)
                seed = gr.Number(0, label="Seed", precision=0)
                fps = gr.Number(8, label="Frames per second", precision=0, minimum=1)
            settings, groups = {}, {}
            for m in methods:
                with gr.Accordion(f"{m.title} settings", open=False, visible=False) as groups[m.name]:
                    gr.Markdown(f"**{m.title}**: {m.help}")
                    settings |= build_form(m.config, prefix=f"video-{m.name}")
            with gr.Row():
                run = gr.Button("Generate video", variant="primary", elem_id="video-run")
                stop_button()
        with gr.Column(scale=3):
            player = gr.Video(label="Clip", autoplay=True, loop=True, interactive=False, elem_id="video-player")
            summary = gr.Markdown(elem_id="video-report")
            files = gr.File(label="Download", file_count="multiple", interactive=False)
    method.change(
        lambda name: [gr.update(visible=n == name) for n in groups], [method], list(groups.values()), **HELPER
    )

    def generate(values, request, progress):
        n_frames = require_positive_int("Frames", int(values.pop("frames")))
        n_steps = require_positive_int("Steps", int(values.pop("steps")))
        rate = require_positive_int("Frames per second", int(values.pop("fps")))
        prompts = [line.strip() for line in (values.pop("prompt") or "").splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f'the prompt is empty; describe the clip, e.g. "{EXAMPLE}"')
        chosen = by_name.get(values.pop("method") or PLAIN)
        if chosen is None and len(prompts) > 1:
            raise ValueError("one prompt per line makes a multi-prompt video: pick a video method (CoNo)")
        sampling = {
            "num_frames": n_frames,
            "num_inference_steps": n_steps,
            "guidance_scale": float(values.pop("guidance")),
            "generator": torch.Generator().manual_seed(int(values.pop("seed"))),
        }
        options = make_config(chosen.config, values) if chosen else None  # refused before any work
        pipe = ws.video_pipeline(chosen)
        with ws.job("video", session_of(request)) as stop:
            try:
                with reporting(pipe, step_reporter(progress, chosen.title if chosen else "video", stop)):
                    if chosen is None:
                        clip = generate_video(pipe, prompts[0], **sampling).frames[0]
                        long = n_frames > clip_length(pipe)
                        how = f" with FreeNoise ({clip_length(pipe)}-frame windows)" if long else ""
                    else:
                        out = pipe(prompts, settings=options, **sampling)
                        clip, how = out.frames[0], f" by {chosen.title} ({out.nfe} network evaluations)"
            except Interrupted:
                return None, "**Stopped**: no clip was finished.", []
        folder = ws.scratch_dir()
        mp4 = save_video(clip, folder / "genreg-video.mp4", fps=rate, scale=DISPLAY_SCALE)
        gif = save_video(clip, folder / "genreg-video.gif", fps=rate)
        return str(mp4), f"{len(clip)} frames{how}, {n_steps} steps.", [str(mp4), str(gif)]

    inputs = {
        "prompt": prompt,
        "method": method,
        "frames": frames,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "fps": fps,
        **settings,
    }
    run.click(
        endpoint(list(inputs), generate),
        list(inputs.values()),
        [player, summary, files],
        api_name="generate_video",
        **GPU,
    )
