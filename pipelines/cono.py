"""CoNo long and multi-prompt video on AnimateDiff (Wang, Li, Chen, arXiv 2406.05082).

pipe = CoNoPipeline.from_pipe(animatediff)            # or genreg.video.with_motion(base) first
out = pipe(["a red circle moving to the right", "a red circle moving to the left"], num_frames=36)
out.frames[0], out.prompt_of_frame
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from diffusers import AnimateDiffPipeline
from diffusers.utils import BaseOutput

from genreg.checks import require_positive_int
from genreg.guidance import Guidance
from genreg.methods.adaptive_guidance import make_guidance
from genreg.methods.cono import CoNoSampler, CoNoSettings
from genreg.video import clip_length

from .contract import StockSaveMixin


@dataclass
class CoNoPipelineOutput(BaseOutput):
    """``frames``: (1, F, H, W, 3) in [0, 1] (``output_type="np"``) or one list of PIL images; ``prompt_of_frame``:
    which prompt drew each frame; ``clip_starts``: where each newly drawn clip's frames begin (after the first);
    ``nfe``: network evaluations of the whole video."""

    frames: np.ndarray | list
    prompt_of_frame: list[int]
    clip_starts: list[int]
    nfe: int


class CoNoPipeline(StockSaveMixin, AnimateDiffPipeline):
    """AnimateDiff whose ``__call__`` makes videos of any length from one prompt or a sequence of prompts by CoNo:
    clips drawn in turn from shuffles of one noise group, each looking back at the last (DDIM, eta 0)."""

    def __call__(
        self,
        prompt: str | list[str],
        num_frames: int = 48,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        negative_prompt: str | None = None,
        generator: torch.Generator | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "np",
        *,
        guidance: str | Guidance = "cfg",
        gamma_bar: float = 0.99,
        settings: CoNoSettings | None = None,
        **knobs,
    ) -> CoNoPipelineOutput:
        """``prompt``: one prompt (a long video) or several (the stages share them in order). ``guidance``: "cfg",
        "ag" (Adaptive Guidance, per clip) or a ``genreg.guidance`` policy. ``settings`` or keyword ``knobs`` (any
        ``CoNoSettings`` field: ``guided_frames``, ``look_back``, ``consistency_scale``, ``internal_stage``, ...)."""
        require_positive_int("num_frames", num_frames)
        require_positive_int("num_inference_steps", num_inference_steps)
        if output_type not in ("np", "pil"):
            raise ValueError(f"output_type must be 'np' or 'pil', got {output_type!r}")
        unknown = set(knobs) - {f.name for f in fields(CoNoSettings)}
        if unknown:
            raise TypeError(f"unknown CoNo setting(s) {', '.join(sorted(unknown))}; see CoNoSettings")
        settings = CoNoSettings(**(vars(settings) if settings else {}) | knobs)
        if isinstance(guidance, str):
            guidance = make_guidance(guidance, gamma_bar, "x0", 1, None, 0.5)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        sampler = CoNoSampler(self, settings, guidance, clip=clip_length(self))
        result = sampler(
            prompts, num_frames, num_inference_steps, guidance_scale, negative_prompt, generator, height, width
        )
        frames = result.frames[None]
        if output_type == "pil":
            frames = [self.video_processor.numpy_to_pil(result.frames)]
        return CoNoPipelineOutput(
            frames=frames, prompt_of_frame=result.prompt_of_frame, clip_starts=result.clip_starts, nfe=result.nfe
        )
