"""Guide-and-Rescale editing pipelines for SD 1.x/2.x and SDXL (Titov et al., arXiv 2409.01322).

pipe = GuideAndRescalePipeline.from_pipe(base)
out = pipe(image, source_prompt="a red circle on the left", target_prompt="a blue circle on the left")
out.images[0]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import PIL.Image
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import BaseOutput

from genreg.methods.guide_and_rescale import GuideAndRescaleConfig, edit

from .contract import StockSaveMixin


@dataclass
class GuideAndRescalePipelineOutput(BaseOutput):
    """The edited images, and the DDIM-inversion trajectory [z_0, ..., z_N] of the input image."""

    images: list[PIL.Image.Image] | torch.Tensor
    inverted_latents: list[torch.Tensor]


class GuideAndRescaleMixin(StockSaveMixin):
    """Adds Guide-and-Rescale editing as ``__call__`` to a diffusers SD or SDXL pipeline (build with ``from_pipe``)."""

    def __call__(
        self,
        image,
        source_prompt: str,
        target_prompt: str,
        preset: str = "local",
        *,
        config: GuideAndRescaleConfig | None = None,
        guidance_scale: float | None = None,
        self_attn_scale: float | None = None,
        feature_scale: float | None = None,
        guided_fraction: float | None = None,
        rescale_range: tuple[float, float] | None = None,
        num_inference_steps: int = 50,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        **config_changes,
    ):
        """Edits ``image`` (a PIL image, uint8 array or file path) from ``source_prompt`` towards ``target_prompt``.

        Args:
            preset: "local" (object edits) or "style" (stylisation): the official configurations.
            config: a full ``GuideAndRescaleConfig`` instead of a preset.
            guidance_scale, self_attn_scale, feature_scale, guided_fraction: override the preset's values.
            rescale_range: (lower, upper) bounds of the guider's norm relative to the CFG term's norm.
            num_inference_steps: DDIM steps, for inversion and for editing.
            height, width: output size (multiples of the model's factor); default: the image's own size.
            generator: unused: inversion and DDIM sampling with eta = 0 are deterministic. Accepted for symmetry.
            callback_on_step_end: diffusers-style ``f(pipe, step, timestep, {"latents": ...})`` after each editing
                step; may return ``{"latents": ...}`` to replace them.
            config_changes: any other ``GuideAndRescaleConfig`` field, e.g. ``inversion="negative-prompt"``,
                ``self_attn_levels=(1, 2)``, ``gradient_checkpointing=True``.
        """
        named = {
            "guidance_scale": guidance_scale,
            "self_attn_scale": self_attn_scale,
            "feature_scale": feature_scale,
            "guided_fraction": guided_fraction,
        }
        changes = {k: v for k, v in named.items() if v is not None} | config_changes
        if rescale_range is not None:
            if len(rescale_range) != 2:
                raise ValueError(f"rescale_range must be (lower, upper), got {rescale_range!r}")
            changes |= {"rescale_lower": rescale_range[0], "rescale_upper": rescale_range[1]}

        callback = None
        if callback_on_step_end is not None:

            def callback(i, t, latents):
                returned = callback_on_step_end(self, i, t, {"latents": latents})
                return returned.get("latents") if isinstance(returned, dict) else None

        out = edit(
            self,
            image,
            source_prompt,
            target_prompt,
            preset=preset,
            config=config,
            num_inference_steps=num_inference_steps,
            height=height,
            width=width,
            output_type=output_type,
            callback=callback,
            **changes,
        )
        result = GuideAndRescalePipelineOutput(images=out.images, inverted_latents=out.inverted)
        return result if return_dict else result.to_tuple()


class GuideAndRescalePipeline(GuideAndRescaleMixin, StableDiffusionPipeline):
    """SD 1.x / 2.x (epsilon or v-prediction) real-image editing with Guide-and-Rescale."""


class GuideAndRescaleXLPipeline(GuideAndRescaleMixin, StableDiffusionXLPipeline):
    """SDXL real-image editing with Guide-and-Rescale."""
