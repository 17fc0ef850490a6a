"""The Video tab: text-to-video with AnimateDiff over the loaded model and its motion adapter; clips longer than the
adapter's run with FreeNoise (``genreg.video.generate_video``). The clip plays in the page and downloads as MP4/GIF."""

from __future__ import annotations

import gradio as gr
import torch

from genreg.checks import require_positive_int
from genreg.video import clip_length, generate_video, save_video

from .common import GPU, StopButton, endpoint, reporting, session_of, step_reporter
from .workspace import Workspace

EXAMPLE = "a red circle moving to the right"
DISPLAY_SCALE = 4  # tiny-world frames are 64 pixels: shown at 256


def build(ws: Workspace, stop_button: StopButton) -> None:
    """The tab's form and its ``/generate_video`` endpoint."""
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(
                EXAMPLE,
                label="Prompt",
                info="name the motion: moving to the right/left, moving up/down, growing, turning <colour>",
                elem_id="video-prompt",
            )
            with gr.Row():
                frames = gr.Number(16, label="Frames", precision=0, minimum=1, info="over 16: FreeNoise windows")
                steps = gr.Number(25, label="Steps", precision=0, minimum=1)
            with gr.Row():
                guidance = gr.Number(5.0, label="Guidance scale", minimum=0)
                seed = gr.Number(0, label="Seed", precision=0)
                fps = gr.Number(8, label="Frames per second", precision=0, minimum=1)
            with gr.Row():
                run = gr.Button("Generate video", variant="primary", elem_id="video-run")
                stop_button()
        with gr.Column(scale=3):
            player = gr.Video(label="Clip", autoplay=True, loop=True, interactive=False, elem_id="video-player")
            summary = gr.Markdown(elem_id="video-report")
            files = gr.File(label="Download", file_count="multiple", interactive=False)

    def generate(values, request, progress):
        n_frames = require_positive_int("Frames", int(values["frames"]))
        n_steps = require_positive_int("Steps", int(values["steps"]))
        rate = require_positive_int("Frames per second", int(values["fps"]))
        text = (values["prompt"] or "").strip()
        if not text:
            raise ValueError(f'the prompt is empty; describe the clip, e.g. "{EXAMPLE}"')
        pipe = ws.video_pipeline()
        with ws.job("video", session_of(request)) as stop:

            def on_step_end(p, i, t, callback_kwargs):
                if stop.is_set():
                    p._interrupt = True
                return callback_kwargs

            with reporting(pipe, step_reporter(progress, "video")):
                out = generate_video(
                    pipe,
                    text,
                    num_frames=n_frames,
                    num_inference_steps=n_steps,
                    guidance_scale=float(values["guidance"]),
                    generator=torch.Generator().manual_seed(int(values["seed"])),
                    callback_on_step_end=on_step_end,
                )
        clip = out.frames[0]
        folder = ws.scratch_dir()
        mp4 = save_video(clip, folder / "genreg-video.mp4", fps=rate, scale=DISPLAY_SCALE)
        gif = save_video(clip, folder / "genreg-video.gif", fps=rate)
        how = f" with FreeNoise ({clip_length(pipe)}-frame windows)" if n_frames > clip_length(pipe) else ""
        stopped = "**Stopped**: the clip is unfinished. " if stop.is_set() else ""
        return str(mp4), f"{stopped}{len(clip)} frames{how}, {n_steps} steps.", [str(mp4), str(gif)]

    inputs = {"prompt": prompt, "frames": frames, "steps": steps, "guidance": guidance, "seed": seed, "fps": fps}
    run.click(
        endpoint(list(inputs), generate),
        list(inputs.values()),
        [player, summary, files],
        api_name="generate_video",
        **GPU,
    )
