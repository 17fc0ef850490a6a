"""Text-to-video on stock AnimateDiff: a motion adapter loaded beside an image model, and clips written as GIF or MP4.

pipe = load_video_pipeline("tinyworld")            # the bundled image model + its bundled motion adapter
frames = pipe("a red circle moving to the right", num_frames=16).frames[0]
save_video(frames, "circle.mp4")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AnimateDiffPipeline, DiffusionPipeline, MotionAdapter
from PIL import Image

from .io import atomic_write
from .models import load_pipeline, require_multi_step

VIDEO_EXTENSIONS = (".gif", ".mp4")
DOMAIN_ADAPTER = "pytorch_lora_weights.safetensors"  # AnimateDiff's domain adapter, when an adapter comes with one


def motion_adapter_path(name_or_path: str | os.PathLike = "tinyworld") -> Path:
    """``"tinyworld"`` (the bundled adapter, trained by scripts/train_tinyworld_video.py) or a local directory that
    ``MotionAdapter.from_pretrained`` reads."""
    if str(name_or_path) == "tinyworld":
        from .tinyworld import motion_adapter_path as bundled

        return bundled()
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no motion adapter in {path}: give a directory written by MotionAdapter.save_pretrained (config.json and "
            "diffusion_pytorch_model.safetensors), or 'tinyworld'"
        )
    return path


def with_motion(base: DiffusionPipeline, motion_adapter: str | os.PathLike = "tinyworld") -> AnimateDiffPipeline:
    """A stock ``AnimateDiffPipeline`` view of the image pipeline ``base`` (``from_pipe``: text encoder, VAE and
    scheduler shared) with the motion adapter ``motion_adapter``, and its domain adapter (diffusers LoRA weights beside
    it, loaded as adapter "domain") when it has one. An adapter is made for one UNet layout
    (its widths); a mismatch is refused with both named."""
    require_multi_step(base, type(base).__name__, "text-to-video")
    folder = motion_adapter_path(motion_adapter)
    adapter = MotionAdapter.from_pretrained(folder, torch_dtype=base.dtype)
    widths = tuple(base.unet.config.block_out_channels)
    if tuple(adapter.config.block_out_channels) != widths:
        raise ValueError(
            f"the motion adapter {motion_adapter} was made for a UNet of widths "
            f"{tuple(adapter.config.block_out_channels)}, but this model's are {widths}: use an adapter trained for "
            "it (SD 1.x adapters for SD 1.x models; the bundled one for 'tinyworld')"
        )
    pipe = AnimateDiffPipeline.from_pipe(base, motion_adapter=adapter, dtype=base.dtype).to(base.device)
    domain = folder / DOMAIN_ADAPTER
    if domain.is_file():  # trained with these motion modules; UNet weights only (pipe.load_lora_weights would warn)
        pipe.unet.load_lora_adapter(str(domain), prefix="unet", adapter_name="domain")
    return pipe


def add_domain_adapter(unet, rank: int) -> int:
    """AnimateDiff's domain adapter (Guo et al. 2024, v3): LoRA of ``rank`` on the image layers' self- and
    cross-attention projections, trained beside the motion modules so that the image layers learn the video frames'
    domain (here: objects between the still images' slots and sizes) and the motion modules learn motion alone. The
    image weights stay frozen; returns the trainable count (motion modules and LoRA)."""
    from .adapters import add_adapter, attention_blocks

    add_adapter(unet, [1] * len(attention_blocks(unet)), "lora", rank)
    for name, p in unet.named_parameters():
        if "motion_modules" in name:
            p.requires_grad_(True)
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def load_video_pipeline(
    model: str | os.PathLike = "tinyworld",
    motion_adapter: str | os.PathLike = "tinyworld",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> AnimateDiffPipeline:
    """``with_motion`` over the image model ``model`` as ``load_pipeline`` finds it."""
    return with_motion(load_pipeline(model, device=device, dtype=dtype), motion_adapter)


def clip_length(pipe_or_adapter: AnimateDiffPipeline | str | os.PathLike) -> int:
    """The number of frames the motion adapter is run on at once: 16 (AnimateDiff's and the bundled adapter's), or its
    position table's length when shorter; of a pipeline, or of an adapter (``motion_adapter_path``) read from its
    config alone."""
    if isinstance(pipe_or_adapter, AnimateDiffPipeline):
        return min(16, pipe_or_adapter.unet.config.motion_max_seq_length)
    return min(16, MotionAdapter.load_config(motion_adapter_path(pipe_or_adapter))["motion_max_seq_length"])


def generate_video(pipe: AnimateDiffPipeline, prompt: str, num_frames: int = 16, context_stride: int = 4, **kwargs):
    """Runs ``pipe`` for ``num_frames`` frames; longer than ``clip_length``, with FreeNoise (diffusers' sliding windows
    of that length over shuffled noise, every ``context_stride`` frames), switched off again afterwards. ``kwargs``
    go to the pipeline (``num_inference_steps``, ``guidance_scale``, ``generator``, ``output_type``, ...)."""
    context = clip_length(pipe)
    if num_frames > context:
        pipe.enable_free_noise(context_length=context, context_stride=context_stride)
    try:
        return pipe(prompt, num_frames=num_frames, **kwargs)
    finally:
        if num_frames > context:
            pipe.disable_free_noise()


def check_video_path(path: str | os.PathLike) -> Path:
    """Refuses, before any work, an output path that is not a .gif or .mp4 file."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() not in VIDEO_EXTENSIONS:
        raise ValueError(f"output {path} is not a video file name: end it in {' or '.join(VIDEO_EXTENSIONS)}")
    return path


def save_video(
    frames: Sequence[Image.Image] | np.ndarray, path: str | os.PathLike, fps: int = 8, scale: int = 1
) -> Path:
    """Writes frames (PIL images, or an array (F, H, W, 3) uint8 or float in [0, 1]) as GIF or MP4 (H.264), atomically;
    ``scale`` enlarges each frame by nearest-neighbour first (tiny-world frames are 64 pixels)."""
    path = check_video_path(path)
    images = [f if isinstance(f, Image.Image) else Image.fromarray(_uint8(f)) for f in frames]
    if scale > 1:
        images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    if path.suffix.lower() == ".gif":

        def write(tmp: Path) -> None:
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=1000 / fps, loop=0)

    else:
        import imageio_ffmpeg

        def write(tmp: Path) -> None:
            size = images[0].size
            writer = imageio_ffmpeg.write_frames(
                str(tmp), size, fps=fps, codec="libx264", macro_block_size=1, output_params=["-f", "mp4"]
            )
            writer.send(None)  # starts ffmpeg
            for im in images:
                writer.send(np.ascontiguousarray(np.asarray(im.convert("RGB"))).tobytes())
            writer.close()

    return atomic_write(path, write)


def _uint8(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame)
    return frame if frame.dtype == np.uint8 else (np.clip(frame, 0, 1) * 255 + 0.5).astype(np.uint8)
