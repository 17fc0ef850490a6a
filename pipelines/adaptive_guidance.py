"""Adaptive Guidance and LinearAG for SD 1.x/2.x and SDXL pipelines (Castillo et al., arXiv 2312.12487).

pipe = AdaptiveGuidancePipeline.from_pipe(base)
out = pipe("a red circle on the left", guidance="ag", gamma_bar=0.99)
out.images, out.nfe
"""

from __future__ import annotations

from dataclasses import dataclass

import PIL.Image
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import BaseOutput

from genreg.guidance import Guidance, guided_call, make_guidance


@dataclass
class AdaptiveGuidancePipelineOutput(BaseOutput):
    """Images, plus ``nfe``: network evaluations spent on each image, and ``gammas`` (steps, images): AG's cosine
    at each step where it was measured (NaN elsewhere), or None."""

    images: list[PIL.Image.Image] | torch.Tensor
    nfe: list[int]
    gammas: torch.Tensor | None = None
    nsfw_content_detected: list[bool] | None = None


class AdaptiveGuidanceMixin:
    """Adds ``guidance="cfg" | "ag" | "linear_ag"`` (or any ``genreg.guidance.Guidance`` policy) to a diffusers
    text-to-image pipeline; every other argument is the stock pipeline's."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        guidance: str | Guidance = "ag",
        gamma_bar: float = 0.99,
        guidance_space: str = "x0",
        min_cfg_steps: int = 1,
        linear_ag_coefficients=None,
        linear_until: float = 0.5,
        **kwargs,
    ):
        """Runs the stock pipeline under a guidance policy.

        Args:
            guidance: "cfg" (plain CFG), "ag" (Adaptive Guidance), "linear_ag" (LinearAG), or a policy object.
            gamma_bar: AG's cosine threshold; above 1 never switches (plain CFG).
            guidance_space: where AG measures the cosine: "x0" (default), "epsilon" or "v".
            min_cfg_steps: steps that always get CFG under AG.
            linear_ag_coefficients: path or ``LinearAGCoefficients`` fitted for these sampling settings.
            linear_until: fraction of the steps in which LinearAG alternates CFG and regressed steps.
        """
        policy = (
            guidance
            if not isinstance(guidance, str)
            else make_guidance(
                guidance, gamma_bar, guidance_space, min_cfg_steps, linear_ag_coefficients, linear_until
            )
        )
        out, nfe, gammas = guided_call(super().__call__, self, policy, prompt, **kwargs)
        result = AdaptiveGuidancePipelineOutput(
            images=out.images,
            nfe=nfe,
            gammas=gammas,
            nsfw_content_detected=getattr(out, "nsfw_content_detected", None),
        )
        return result if kwargs.get("return_dict", True) else result.to_tuple()


class AdaptiveGuidancePipeline(AdaptiveGuidanceMixin, StableDiffusionPipeline):
    """SD 1.x / 2.x (epsilon or v-prediction) with Adaptive Guidance / LinearAG."""


class AdaptiveGuidanceXLPipeline(AdaptiveGuidanceMixin, StableDiffusionXLPipeline):
    """SDXL with Adaptive Guidance / LinearAG."""
