"""Diffusers pipelines of genreg's methods, imported as ``genreg.pipelines``."""

from .adaptive_guidance import (
    AdaptiveGuidanceMixin,
    AdaptiveGuidancePipeline,
    AdaptiveGuidancePipelineOutput,
    AdaptiveGuidanceXLPipeline,
)
from .cono import CoNoPipeline, CoNoPipelineOutput
from .guide_and_rescale import (
    GuideAndRescaleMixin,
    GuideAndRescalePipeline,
    GuideAndRescalePipelineOutput,
    GuideAndRescaleXLPipeline,
)
from .one_step import OneStepPipeline

__all__ = [
    "AdaptiveGuidanceMixin",
    "AdaptiveGuidancePipeline",
    "AdaptiveGuidancePipelineOutput",
    "AdaptiveGuidanceXLPipeline",
    "CoNoPipeline",
    "CoNoPipelineOutput",
    "GuideAndRescaleMixin",
    "GuideAndRescalePipeline",
    "GuideAndRescalePipelineOutput",
    "GuideAndRescaleXLPipeline",
    "OneStepPipeline",
]
