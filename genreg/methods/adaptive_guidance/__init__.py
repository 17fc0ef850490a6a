"""Adaptive Guidance and LinearAG (Castillo et al., 2023, arXiv 2312.12487): training-free CFG speed-ups.
``policies`` holds the method's math as guidance policies, ``calibration`` fits gamma_bar and LinearAG's
coefficients to a model, ``options`` is one generate request."""

from __future__ import annotations

from ...registry import Method, register
from .calibration import CalibrationRecorder, calibrate, gamma_bar_for_nfe, switch_nfe
from .options import GUIDANCE_LABELS, GUIDANCES, GenerateOptions, SampleResult, generate
from .policies import (
    LINEAR_AG_FEATURES,
    AdaptiveGuidance,
    LinearAG,
    LinearAGCoefficients,
    LinearAGFitter,
    linear_ag_cfg_steps,
    linear_ag_estimated_steps,
    make_guidance,
    sampling_settings,
)

METHOD = register(
    Method(
        name="adaptive-guidance",
        kind="sampler",
        title="Adaptive Guidance",
        help="generate images with CFG, or with Adaptive Guidance / LinearAG at fewer network evaluations"
        " (Castillo et al., arXiv 2312.12487)",
        config=GenerateOptions,
        run=generate,
        command="generate",
        pipeline="genreg.pipelines.AdaptiveGuidancePipeline",
    )
)

__all__ = [
    "GUIDANCES",
    "GUIDANCE_LABELS",
    "LINEAR_AG_FEATURES",
    "METHOD",
    "AdaptiveGuidance",
    "CalibrationRecorder",
    "GenerateOptions",
    "LinearAG",
    "LinearAGCoefficients",
    "LinearAGFitter",
    "SampleResult",
    "calibrate",
    "gamma_bar_for_nfe",
    "generate",
    "linear_ag_cfg_steps",
    "linear_ag_estimated_steps",
    "make_guidance",
    "sampling_settings",
    "switch_nfe",
]
