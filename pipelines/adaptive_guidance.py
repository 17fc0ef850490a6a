"""Adaptive Guidance and LinearAG for SD 1.x/2.x and SDXL pipelines (Castillo et al., arXiv 2312.12487).

pipe = AdaptiveGuidancePipeline.from_pipe(base)
out = pipe("a red circle on the left", guidance="ag", gamma_bar=0.99)
out.images, out.nfe
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import PIL.Image
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import BaseOutput

from genreg.guidance import Guidance, guided_call, stock_call
from genreg.methods.adaptive_guidance import make_guidance

from .contract import StockSaveMixin, bind_stock, with_stock_signature


@dataclass
class AdaptiveGuidancePipelineOutput(BaseOutput):
    """Images, plus ``nfe``: network evaluations spent on each image, and ``gammas`` (steps, images): AG's cosine
    at each step where it was measured (NaN elsewhere), or None."""

    images: list[PIL.Image.Image] | torch.Tensor
    nfe: list[int]
    gammas: torch.Tensor | None = None
    nsfw_content_detected: list[bool] | None = None


_P = inspect.Parameter
AG_PARAMETERS = [
    _P("guidance", _P.KEYWORD_ONLY, default="ag", annotation="str | Guidance"),
    _P("gamma_bar", _P.KEYWORD_ONLY, default=0.99, annotation="float"),
    _P("guidance_space", _P.KEYWORD_ONLY, default="x0", annotation="str"),
    _P("min_cfg_steps", _P.KEYWORD_ONLY, default=1, annotation="int"),
    _P("linear_ag_coefficients", _P.KEYWORD_ONLY, default=None),
    _P("linear_until", _P.KEYWORD_ONLY, default=0.5, annotation="float"),
]
AG_DOC = """            guidance: "ag" (Adaptive Guidance, the default), "cfg" (plain CFG, the stock behaviour),
                "linear_ag" (LinearAG), or a ``genreg.guidance.Guidance`` policy object.
            gamma_bar: AG's cosine threshold; above 1 never switches (plain CFG).
            guidance_space: where AG measures the cosine: "x0" (default), "epsilon" or "v".
            min_cfg_steps: steps that always get CFG under AG.
            linear_ag_coefficients: path or ``LinearAGCoefficients`` fitted for these sampling settings.
            linear_until: fraction of the steps in which LinearAG alternates CFG and regressed steps.

        Returns an ``AdaptiveGuidancePipelineOutput`` (the stock fields plus ``nfe`` and ``gammas``), or with
        ``return_dict=False`` exactly the stock pipeline's tuple.
"""


def _guided(
    self,
    *args,
    guidance: str | Guidance = "ag",
    gamma_bar: float = 0.99,
    guidance_space: str = "x0",
    min_cfg_steps: int = 1,
    linear_ag_coefficients=None,
    linear_until: float = 0.5,
    **kwargs,
):
    """Runs the stock pipeline's ``__call__`` (positional arguments in its order) under a guidance policy."""
    stock = stock_call(self)
    named = bind_stock(stock, args, kwargs)
    return_dict = named.pop("return_dict", True)
    if isinstance(guidance, str):
        guidance = make_guidance(
            guidance, gamma_bar, guidance_space, min_cfg_steps, linear_ag_coefficients, linear_until
        )
    elif guidance is None or not hasattr(guidance, "plan"):
        raise ValueError(f"guidance must be 'cfg', 'ag', 'linear_ag' or a policy object, not {guidance!r}")
    out, nfe, gammas = guided_call(stock, self, guidance, named.pop("prompt", None), **named)
    if not return_dict:  # the stock tuple, None entries included
        return tuple(getattr(out, f.name) for f in dataclasses.fields(out))
    return AdaptiveGuidancePipelineOutput(
        images=out.images, nfe=nfe, gammas=gammas, nsfw_content_detected=getattr(out, "nsfw_content_detected", None)
    )


class AdaptiveGuidanceMixin(StockSaveMixin):
    """Adds ``guidance="cfg" | "ag" | "linear_ag"`` (or any ``genreg.guidance.Guidance`` policy) to a diffusers
    text-to-image pipeline; every other argument, positional or not, is the stock pipeline's."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        with_stock_signature(cls, _guided, AG_PARAMETERS, AG_DOC)


class AdaptiveGuidancePipeline(AdaptiveGuidanceMixin, StableDiffusionPipeline):
    """SD 1.x / 2.x (epsilon or v-prediction) with Adaptive Guidance / LinearAG."""


class AdaptiveGuidanceXLPipeline(AdaptiveGuidanceMixin, StableDiffusionXLPipeline):
    """SDXL with Adaptive Guidance / LinearAG."""
