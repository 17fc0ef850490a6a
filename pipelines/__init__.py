"""Diffusers pipelines of genreg's methods, imported as ``genreg.pipelines``."""

from .adaptive_guidance import (
    AdaptiveGuidanceMixin,
    AdaptiveGuidancePipeline,
    AdaptiveGuidancePipelineOutput,
    AdaptiveGuidanceXLPipeline,
)

__all__ = [
    "AdaptiveGuidanceMixin",
    "AdaptiveGuidancePipeline",
    "AdaptiveGuidancePipelineOutput",
    "AdaptiveGuidanceXLPipeline",
]
