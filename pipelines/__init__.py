"""Diffusers pipelines of genreg's methods, imported as ``genreg.pipelines``."""

from .adaptive_guidance import (
    AdaptiveGuidanceMixin,
    AdaptiveGuidancePipeline,
    AdaptiveGuidancePipelineOutput,
    AdaptiveGuidanceXLPipeline,
)
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
    "GuideAndRescaleMixin",
    "GuideAndRescalePipeline",
    "GuideAndRescalePipelineOutput",
    "GuideAndRescaleXLPipeline",
    "OneStepPipeline",
]
